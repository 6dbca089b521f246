"""How well does each detector separate malicious inputs from clean ones? AUROC and TPR at 1% / 5% FPR.

Fashion-MNIST, the small CNN trained briefly with plain SGD on a random training subset. One model per backdoor attack
in ``attacks.REGISTRY`` (each poisoned with the attack's defaults: rate 0.1, target 0), plus the BadNets model
trained with Anti-Backdoor Learning (``--defense abl``). For each model every detector is fitted on clean test images,
its clean score distribution is taken on a second clean split (conformal p-values, as the guard does), and it is
evaluated on a third clean split (the negatives) against:

* triggered inputs of that model's attack: non-target test images with the trigger, kept only when the backdoor
  fires (the model predicts the target) — the protocol of STRIP / BackdoorBench; the ASR is reported alongside;
* adversarial inputs (BadNets and ABL models): FGSM and PGD-L∞ (eps 0.1) and CW-L2 against that model, successful
  ones on correctly classified images only.

Scores: one-sided detectors are ranked by their raw score; two-sided ones (mutation, squeezing, STRIP) by the guard's
two-sided conformal p-value, ties at the extreme broken by how far beyond the clean range the score lies. The
"high-tail AUROC" of a two-sided detector (raw score, higher = positive) says which side fired: below 0.5 means the
malicious inputs sit in the *low* tail (backdoor-like: over-stable). "guard" rows combine detectors' p-values with
Fisher's method, as the guard does by default.

Run:  .venv/bin/python bench/detect.py            (full, about 25 minutes on 2 shared CPU cores)
      .venv/bin/python bench/detect.py --quick    (smoke: 2 attacks, tiny splits, a few minutes)
Trained models are cached in ``--work`` (runs/detect) and reused when their configuration matches.
Writes bench/results/detect.json and bench/results/detect.md (``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import cpu_name
from sklearn.metrics import roc_auc_score, roc_curve

from abl_guard.abl.checkpoint import load_checkpoint
from abl_guard.abl.data import load_dataset
from abl_guard.abl.experiment import ExperimentConfig, run_experiment
from abl_guard.abl.models import model_taps
from abl_guard.abl.train import TrainConfig
from abl_guard.attacks import REGISTRY as ATTACKS
from abl_guard.attacks import make_attack
from abl_guard.attacks.adversarial import run_attack
from abl_guard.detectors import make_detector
from abl_guard.export import export_onnx
from abl_guard.guard.calibration import combine_pvalues, conformal_pvalues
from abl_guard.guard.model import OnnxModel
from abl_guard.guard.preprocess import to_model_input
from abl_guard.guard.runtime import needed_outputs, observe

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.detect")

ORDER = ["badnets", "blend", "trojan", "sig", "wanet", "label-consistent"]
#: (row name, registered detector, parameters, lens)
DETECTORS: list[tuple[str, str, dict[str, Any], str]] = [
    ("mutation (σ=0.65)", "mutation", {"tap": "pool", "std_factor": 0.65}, "sensitivity"),
    ("mutation (σ=0.30)", "mutation", {"tap": "pool", "std_factor": 0.30}, "sensitivity"),
    ("squeeze", "squeeze", {}, "sensitivity"),
    ("nic", "nic", {}, "activation"),
    ("mahalanobis", "mahalanobis", {}, "feature"),
    ("mahalanobis-layers", "mahalanobis-layers", {}, "feature"),
    ("knn", "knn", {}, "feature"),
    ("msp", "msp", {}, "baseline"),
    ("energy", "energy", {}, "baseline"),
    ("msp (two-sided)", "msp", {"two_sided": True}, "baseline"),
    ("energy (two-sided)", "energy", {"two_sided": True}, "baseline"),
    ("strip", "strip", {}, "baseline"),
]
BASELINES = [row for row, _, _, lens in DETECTORS if lens == "baseline"]
GUARDS = {
    "guard: lenses (fisher)": ["mutation (σ=0.65)", "squeeze", "nic", "mahalanobis-layers", "knn"],
    "guard: lenses + strip (fisher)": ["mutation (σ=0.65)", "squeeze", "nic", "mahalanobis-layers", "knn", "strip"],
}
ADVERSARIAL = [("fgsm", {"eps": 0.1}), ("pgd", {"eps": 0.1}), ("cw", {})]


# ------------------------------------------------------------------------------------------------ metrics


def rank_scores(cal: np.ndarray, scores: np.ndarray, two_sided: bool) -> np.ndarray:
    """Scores on one "higher = more suspicious" scale, as the guard ranks them (see the module docstring)."""
    if not two_sided:
        return np.asarray(scores, np.float64)
    p, _ = conformal_pvalues(cal, scores, two_sided=True)
    lo, med, hi = np.min(cal), np.median(cal), np.max(cal)
    beyond = np.maximum((scores - med) / max(hi - med, 1e-12), (med - scores) / max(med - lo, 1e-12))
    return -np.log(p) + 1e-6 * np.tanh(beyond)  # p-value levels are >= log(1 + 1/n) apart; the tie-break is smaller


def metrics(neg: np.ndarray, pos: np.ndarray) -> dict[str, float]:
    if len(pos) == 0 or len(neg) == 0:
        return {"auroc": float("nan"), "tpr@1": float("nan"), "tpr@5": float("nan")}
    y = np.r_[np.zeros(len(neg)), np.ones(len(pos))]
    s = np.r_[neg, pos]
    fpr, tpr, _ = roc_curve(y, s)
    return {"auroc": float(roc_auc_score(y, s)),
            "tpr@1": float(tpr[fpr <= 0.01].max()), "tpr@5": float(tpr[fpr <= 0.05].max())}


# ------------------------------------------------------------------------------------------------ models


def train_cached(cfg: ExperimentConfig, out: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train (or reuse a run directory whose configuration matches) and return ``(model, run record)``."""
    want = json.loads(json.dumps(cfg.to_json(), default=str))
    run_json = out / "run.json"
    if run_json.exists() and (out / "model.pt").exists():
        rec = json.loads(run_json.read_text())
        if rec.get("config") == want:
            log.info("reusing %s", out)
            return load_checkpoint(out / "model.pt")[0].eval(), {**rec, "reused_cache": True}
    t0 = time.perf_counter()
    rec = run_experiment(cfg, out, quiet=True)
    log.info("trained %s in %.0fs: %s", out.name, time.perf_counter() - t0, rec["metrics"])
    return load_checkpoint(out / "model.pt")[0].eval(), rec


def export(model: torch.nn.Module, spec, path: Path, taps: dict[str, str] | None = None) -> Path:
    """The model to ONNX with ``taps`` (default: its declared taps)."""
    export_onnx(model, path, input_shape=spec.input_shape, taps=taps or model_taps(model), class_names=spec.class_names,
                mean=spec.mean, std=spec.std)
    return path


# ------------------------------------------------------------------------------------------------ evaluation


def evaluate_model(name: str, onnx_path: Path, splits: dict[str, Any], positives: dict[str, np.ndarray],
                   args: argparse.Namespace) -> dict[str, Any]:
    """Fit every detector on the fit split and score calibration, clean evaluation and positive sets."""
    model = OnnxModel(onnx_path, intra_op_threads=args.threads)
    dets = [(row, make_detector(kind, **params)) for row, kind, params, _ in DETECTORS]
    outputs = needed_outputs([d for _, d in dets])
    fit_x, fit_y = splits["fit"]
    obs_fit = observe(model, to_model_input(fit_x, model.input_shape), outputs)
    fit_seconds = {}
    for row, d in dets:
        t0 = time.perf_counter()
        d.fit(obs_fit, fit_y, model)
        fit_seconds[row] = time.perf_counter() - t0
    del obs_fit
    outputs = needed_outputs([d for _, d in dets])  # detectors with unset taps resolved them at fit

    def score_all(images: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        x = to_model_input(images, model.input_shape)
        t0 = time.perf_counter()
        obs = observe(model, x, outputs)
        forward = time.perf_counter() - t0
        out, secs = {}, {"forward": forward}
        for row, d in dets:
            t0 = time.perf_counter()
            out[row] = np.asarray(d.score(obs, model), np.float64)
            secs[row] = time.perf_counter() - t0
        return out, secs

    cal, _ = score_all(splits["cal"][0])
    neg_raw, secs = score_all(splits["eval"][0])
    clean_acc = float(np.mean(model(to_model_input(splits["eval"][0], model.input_shape),
                                    outputs=["logits"])["logits"].argmax(1) == splits["eval"][1]))
    two = {row: d.two_sided for row, d in dets}

    def ranked(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        r = {row: rank_scores(cal[row], raw[row], two[row]) for row, _ in dets}
        for g, members in GUARDS.items():
            P = np.stack([conformal_pvalues(cal[m], raw[m], two[m])[0] for m in members], axis=1)
            r[g] = -np.log(combine_pvalues(P, "fisher"))
        return r

    neg = ranked(neg_raw)
    results: dict[str, Any] = {}
    for pname, images in positives.items():
        if len(images) == 0:
            results[pname] = {"n": 0}
            continue
        pos_raw, _ = score_all(images)
        pos = ranked(pos_raw)
        res: dict[str, Any] = {"n": int(len(images)), "detectors": {}}
        for row in neg:
            m = metrics(neg[row], pos[row])
            if row in two and two[row]:
                m["high_tail_auroc"] = metrics(neg_raw[row], pos_raw[row])["auroc"]
            res["detectors"][row] = m
        results[pname] = res
        log.info("%s / %s (n=%d): %s", name, pname, len(images),
                 ", ".join(f"{k} {v['auroc']:.3f}" for k, v in res["detectors"].items()))
    n_eval = len(splits["eval"][0])
    forward = secs.pop("forward")
    return {
        "clean_accuracy_eval_split": clean_acc,
        "fit_seconds": fit_seconds,
        "score_cost_vs_forward": {row: s / max(forward, 1e-9) for row, s in secs.items()},
        "forward_ms_per_input": 1000 * forward / n_eval,
        "positives": results,
    }


def triggered_successes(model: torch.nn.Module, attack, images: np.ndarray, labels: np.ndarray, k: int,
                        limit: int) -> tuple[np.ndarray, float]:
    from abl_guard.abl.train import predict_logits

    trig = attack.triggered(images, labels, k)
    pred = predict_logits(model, trig.images, torch.device("cpu")).argmax(1)
    ok = pred == trig.labels
    return trig.images[ok][:limit], float(ok.mean()) if len(ok) else float("nan")


def adversarial_sets(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, n: int, n_cw: int,
                     seed: int) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    sets, info = {}, []
    for name, params in ADVERSARIAL:
        m = n_cw if name == "cw" else n
        if m <= 0:
            continue
        t0 = time.perf_counter()
        res = run_attack(name, model, images[:m], labels[:m], seed=seed, **params)
        keep = res.success & res.clean_correct
        label = f"{name}" + (f" eps={params['eps']}" if "eps" in params else "")
        sets[label] = res.images[keep]
        info.append({**res.summary(), "set": label, "kept": int(keep.sum()), "seconds": time.perf_counter() - t0})
    return sets, info


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke mode: 2 attacks, small splits, no CW")
    ap.add_argument("--train-size", type=int, default=8000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--attacks", default=None, help="comma-separated (default: every registered attack)")
    ap.add_argument("--no-abl", action="store_true")
    ap.add_argument("--lc-steps", type=int, default=20, help="label-consistent PGD steps (its default: 100)")
    ap.add_argument("--n-fit", type=int, default=1500)
    ap.add_argument("--n-cal", type=int, default=1000)
    ap.add_argument("--n-eval", type=int, default=1000)
    ap.add_argument("--n-trig", type=int, default=500)
    ap.add_argument("--n-adv", type=int, default=300)
    ap.add_argument("--n-cw", type=int, default=64, help="CW-L2 is slow on CPU (about 1-2 s per image)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=str(ROOT / "runs" / "detect"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "detect"))
    args = ap.parse_args()
    if args.quick:
        args.train_size, args.epochs = min(args.train_size, 4000), min(args.epochs, 2)
        args.n_fit, args.n_cal, args.n_eval, args.n_trig, args.n_adv, args.n_cw = 400, 300, 300, 150, 100, 0
        args.attacks = args.attacks or "badnets,blend"
        args.no_abl = True
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    test = load_dataset("fashion-mnist", "test")
    spec, k = test.spec, test.spec.num_classes
    perm = np.random.default_rng(args.seed).permutation(len(test))
    bounds = np.cumsum([args.n_fit, args.n_cal, args.n_eval])
    parts = np.split(perm, bounds)
    splits = {name: (test.images[idx], test.labels[idx]) for name, idx in zip(("fit", "cal", "eval"), parts)}
    src = parts[3]
    src_x, src_y = test.images[src], test.labels[src]

    names = [a.strip() for a in args.attacks.split(",")] if args.attacks else \
        [a for a in ORDER if a in ATTACKS] + sorted(set(ATTACKS) - set(ORDER))
    missing = [a for a in ORDER if a not in ATTACKS]
    work = Path(args.work)
    train_cfg = TrainConfig(epochs=args.epochs, lr=args.lr, seed=args.seed, device="cpu")

    def cfg(attack: str | None, defense: str = "none", **attack_params: Any) -> ExperimentConfig:
        return ExperimentConfig(dataset="fashion-mnist", attack=attack,
                                attack_params={"rate": 0.1, "target": 0, **attack_params}, defense=defense,
                                train=train_cfg, train_limit=args.train_size, test_limit=2000)

    runs: list[dict[str, Any]] = []
    plan: list[tuple[str, str, str, dict[str, Any]]] = [(a, a, "none", {}) for a in names]
    if not args.no_abl and "badnets" in names:
        plan.insert(1, ("badnets + ABL", "badnets", "abl", {}))
    clean_path, clean_model = None, None
    for label, attack_name, defense, extra in plan:
        t0 = time.perf_counter()
        entry: dict[str, Any] = {"model": label, "attack": attack_name, "defense": defense}
        try:
            params = dict(extra)
            if attack_name == "label-consistent":
                if clean_path is None:
                    clean_model, _ = train_cached(cfg(None), work / "clean")
                    clean_path = str(work / "clean" / "model.pt")
                params.update(model=clean_path, steps=args.lc_steps)
            run_dir = work / f"{attack_name}-{defense}"
            model, rec = train_cached(cfg(attack_name, defense, **params), run_dir)
            entry["training"] = {"metrics": rec["metrics"], "train_seconds": rec.get("train_seconds"),
                                 "n_poisoned": rec.get("n_poisoned"), "reused_cache": rec.get("reused_cache", False)}
            # the same (seeded) trigger the model was poisoned with; label-consistent's surrogate only shapes the
            # training perturbation, its test-time trigger does not use it
            trigger_params = {k_: v for k_, v in params.items() if k_ not in ("model", "steps")}
            if attack_name == "label-consistent":
                trigger_params["model"] = clean_model
            attack = make_attack(attack_name, seed=args.seed, rate=0.1, target=0, **trigger_params)
            trig, asr = triggered_successes(model, attack, src_x, src_y, k, args.n_trig)
            entry["asr_on_source_split"] = asr
            positives = {f"triggered ({attack_name})": trig}
            if attack_name == "badnets" and args.n_adv > 0:
                adv, info = adversarial_sets(model, src_x, src_y, args.n_adv, args.n_cw, args.seed)
                positives.update(adv)
                entry["adversarial"] = info
            onnx_path = export(model, spec, run_dir / "model.onnx")
            entry.update(evaluate_model(label, onnx_path, splits, positives, args))
        except Exception as e:  # one broken attack or defence must not sink the whole benchmark
            log.error("%s failed: %s", label, e)
            entry["error"] = f"{type(e).__name__}: {e}"
            entry["traceback"] = traceback.format_exc(limit=4)
        entry["seconds"] = time.perf_counter() - t0
        runs.append(entry)

    record = {
        "command": "python bench/detect.py " + " ".join(sys.argv[1:]),
        "cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__, "quick": args.quick,
        "dataset": "fashion-mnist", "arch": "small-cnn", "train_size": args.train_size, "epochs": args.epochs,
        "lr": args.lr, "seed": args.seed,
        "splits": {"fit": args.n_fit, "cal": args.n_cal, "eval": args.n_eval, "source": int(len(src))},
        "limits": {"triggered": args.n_trig, "adversarial": args.n_adv, "cw": args.n_cw},
        "attacks_registered": sorted(ATTACKS), "attacks_missing_from_registry": missing,
        "detectors": [{"row": r, "detector": d, "params": p, "lens": lens} for r, d, p, lens in DETECTORS],
        "guards": GUARDS, "runs": runs, "wall_seconds": time.perf_counter() - t_start,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2, default=float))
    out.with_suffix(".md").write_text(render(record))
    print(f"-> {out.with_suffix('.md')} ({record['wall_seconds']:.0f}s)")


# ------------------------------------------------------------------------------------------------ report


def _cell(m: dict[str, float]) -> str:
    if not m or np.isnan(m.get("auroc", np.nan)):
        return "–"
    return f"{m['auroc']:.3f} / {100 * m['tpr@1']:.0f} / {100 * m['tpr@5']:.0f}"


def render(r: dict[str, Any]) -> str:
    reused_t = [(run["model"], run["training"]["train_seconds"] or 0.0) for run in r["runs"]
                if run.get("training", {}).get("reused_cache")]
    reused = [m for m, _ in reused_t]
    lines = [
        "# Detectors: AUROC and TPR at 1% / 5% FPR",
        "",
        f"`{r['command']}` — {r['cpu']}, {r['threads']} thread(s), torch {r['torch']}; "
        f"wall {r['wall_seconds'] / 60:.1f} min{' (quick smoke mode)' if r['quick'] else ''}"
        + (f", with {len(reused)} model(s) reused from the cache of an earlier identical run ({', '.join(reused)}; "
           f"their training took {sum(t for _, t in reused_t) / 60:.1f} min more)" if reused else "") + ".",
        "",
        f"Fashion-MNIST, small CNN trained {r['epochs']} epochs (SGD lr {r['lr']}) on {r['train_size']:,} random "
        "training images; each backdoor at its defaults (rate 0.1, target 0). Clean test splits: "
        f"fit {r['splits']['fit']}, calibration {r['splits']['cal']}, evaluation (negatives) {r['splits']['eval']}; "
        f"positives from the remaining {r['splits']['source']} test images: triggered non-target images on which "
        f"the backdoor fires (at most {r['limits']['triggered']}), and successful FGSM / PGD-L∞ (eps 0.1, at most "
        f"{r['limits']['adversarial']} attacked) and CW-L2 ({r['limits']['cw']} attacked) examples.",
        "",
        "Each cell: **AUROC / TPR % at 1% FPR / TPR % at 5% FPR**. Two-sided detectors are ranked by the guard's "
        "two-sided p-value; their high-tail AUROC (raw score) is listed separately — below 0.5 means the "
        "malicious inputs are *over-stable* (backdoor-like), above 0.5 *unstable* (adversarial-like).",
        "",
    ]
    if r["attacks_missing_from_registry"]:
        lines += [f"Attacks not in the registry at run time (not evaluated): "
                  f"{', '.join(r['attacks_missing_from_registry'])}.", ""]
    rows = [d["row"] for d in r["detectors"]] + list(r["guards"])
    summary: list[str] = []
    for run in r["runs"]:
        lines.append(f"## {run['model']}")
        lines.append("")
        if "error" in run:
            lines += [f"**Failed:** `{run['error']}`", ""]
            continue
        t = run["training"]["metrics"]
        lines.append(f"Training: CA {100 * t['clean_accuracy']:.2f}%, ASR {100 * t.get('attack_success_rate', 0):.2f}%"
                     f" ({run['training']['train_seconds']:.0f}s). ASR on the source split "
                     f"{100 * run['asr_on_source_split']:.1f}%. Clean accuracy on the evaluation split "
                     f"{100 * run['clean_accuracy_eval_split']:.1f}%.")
        if run.get("adversarial"):
            lines.append("Adversarial sets: " + "; ".join(
                f"{a['set']}: {a['kept']} successful of {a['n']} ({100 * a['success_rate']:.0f}% success)"
                for a in run["adversarial"]))
        lines.append("")
        sets = [s for s, v in run["positives"].items() if v.get("n")]
        empty = [s for s, v in run["positives"].items() if not v.get("n")]
        if empty:
            lines += [f"No positives (backdoor never fired / attack never succeeded): {', '.join(empty)}.", ""]
        if not sets:
            continue
        lines.append("| detector | " + " | ".join(f"{s} (n={run['positives'][s]['n']})" for s in sets)
                     + " | high-tail AUROC | score cost (× forward) | fit s |")
        lines.append("|---" * (len(sets) + 4) + "|")
        for row in rows:
            cells = [_cell(run["positives"][s]["detectors"].get(row, {})) for s in sets]
            ht = [run["positives"][s]["detectors"].get(row, {}).get("high_tail_auroc") for s in sets]
            ht_txt = ", ".join(f"{v:.2f}" for v in ht if v is not None) or "–"
            cost = run["score_cost_vs_forward"].get(row)
            fit = run["fit_seconds"].get(row)
            lines.append(f"| {row} | " + " | ".join(cells) + f" | {ht_txt} | "
                         + ("–" if cost is None else f"{cost:.1f}") + " | "
                         + ("–" if fit is None else f"{fit:.1f}") + " |")
        lines.append("")
        for s in sets:
            det = run["positives"][s]["detectors"]
            base = max(BASELINES, key=lambda b: det[b]["auroc"])
            losers = [row for row in rows if row not in BASELINES and det[row]["auroc"] < det[base]["auroc"]]
            best = max(rows, key=lambda row: det[row]["auroc"])
            summary.append(f"- **{run['model']} / {s}**: best {best} ({det[best]['auroc']:.3f}); best baseline "
                           f"{base} ({det[base]['auroc']:.3f}); below that baseline: "
                           f"{', '.join(losers) if losers else 'none'}.")
    lines += ["## Who beats the baselines (AUROC)", "", *summary, ""]
    lines += [
        "## Caveats",
        "",
        "- One seed, small models trained for minutes on a CPU (their clean accuracy is listed per model): the "
        "numbers rank the detectors on this setup; they are not the papers' numbers.",
        "- Positives are only the inputs on which the attack works (backdoor fires / adversarial example fools the "
        "model); negatives are clean test images, misclassified ones included.",
        "- Score costs are ratios to one forward pass in the same run, on CPU cores shared with other jobs: "
        "expect noise of a factor of two.",
        "- Mutation fuzzes only the dense head after the `pool` tap (fc1 and fc, as Jin et al. fuzz every Dense "
        "layer); σ = 0.65 · max(W) is their backdoor setting, σ = 0.30 their MNIST adversarial setting.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
