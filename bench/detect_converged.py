"""Detectors and guards on a *converged* model: backdoor, adversarial (uint8) and out-of-distribution inputs.

Fashion-MNIST, the small CNN trained on all 60,000 training images (poisoned by the attack at rate 0.1, target 0;
SGD lr 0.05, divided by 10 at epochs 5 and 8, 9 epochs), so that its clean accuracy is ~90% rather than the 64-74% of
``bench/detect.py``'s two-epoch models. The test set is split (seeded) into fit 2,000 / calibration 1,000 /
validation 1,000 / evaluation (negatives) 1,000 and a source part for the positives:

* triggered: non-target source images with the trigger on which the backdoor fires;
* adversarial, against the same model, on correctly classified source images, *quantised to uint8* (what a deployed
  guard sees) and kept only when still successful: FGSM and PGD-L∞ (eps 0.1), PGD-L2 (eps 1.5, 20 steps), CW-L2 with
  kappa 0 and kappa 5 (the margin survives rounding);
* out-of-distribution: scikit-learn's 8x8 digits upscaled to 28x28, uniform noise, Fashion-MNIST with heavy Gaussian
  noise (sd 0.4), inverted Fashion-MNIST, constant images.

Every detector is fitted on the fit split; single rows are ranked as in ``bench/detect.py``. Guard rows combine
detectors the way the guard does (``guard.calibration.Calibrator``: conformal p-values with or without the
exponential tails, a combination, the threshold for 1% FPR from leave-one-out calibration p-values) and also report
the share of each set flagged *at the guard's own threshold*. The stream alarms run on clean, shifted and backdoor
streams. Run:

    .venv/bin/python bench/detect_converged.py [--attacks badnets,blend] [--work /tmp/abl-guard-converged]

Trained models are cached in ``--work`` and reused when their configuration matches. Writes
bench/results/detect_converged.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import cpu_name, write_markdown_keeping_notes
from detect import DETECTORS, export, metrics, rank_scores, train_cached, triggered_successes

from abl_guard.abl.data import load_dataset
from abl_guard.abl.experiment import ExperimentConfig
from abl_guard.abl.train import TrainConfig
from abl_guard.attacks import make_attack
from abl_guard.attacks.adversarial import predict, quantize, run_attack
from abl_guard.detectors import make_detector
from abl_guard.guard.calibration import Calibrator, alarm_null, stream_alarms
from abl_guard.guard.model import OnnxModel
from abl_guard.guard.preprocess import to_model_input
from abl_guard.guard.runtime import needed_outputs, observe

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.detect_converged")

#: detect.py's rows plus squeezer variants: Xu et al.'s 1-bit setting is for near-binary MNIST digits
ROWS = DETECTORS + [("squeeze (4-bit)", "squeeze", {"bits": 4}, "sensitivity"),
                    ("squeeze (median only)", "squeeze", {"bits": 0}, "sensitivity")]
TRAIN = {"epochs": 9, "lr": 0.05, "lr_milestones": (5, 8)}
FPR = 0.01
#: the five-detector guard of issue 16, and one with every lens and STRIP
FIVE = ["mahalanobis", "nic", "knn", "mutation (σ=0.65)", "squeeze"]
ALL = FIVE + ["mahalanobis-layers", "strip"]
#: (row, members, combination, tails)
GUARDS: list[tuple[str, list[str], str, bool]] = [
    ("default guard (mahalanobis)", ["mahalanobis"], "hmp", True),
    ("five: fisher, no tails (old)", FIVE, "fisher", False),
    ("five: fisher", FIVE, "fisher", True),
    ("five: cauchy", FIVE, "cauchy", True),
    ("five: min-p", FIVE, "min-p", True),
    ("five: hmp", FIVE, "hmp", True),
    ("five: hmp, no tails", FIVE, "hmp", False),
    ("all + strip: hmp", ALL, "hmp", True),
    ("one pass: mahalanobis + layers + knn, hmp", ["mahalanobis", "mahalanobis-layers", "knn"], "hmp", True),
    ("one pass: mahalanobis + layers + knn, fisher", ["mahalanobis", "mahalanobis-layers", "knn"], "fisher", True),
    ("one pass: layers + knn, fisher", ["mahalanobis-layers", "knn"], "fisher", True),
    ("one pass: layers + knn + nic, fisher", ["mahalanobis-layers", "knn", "nic"], "fisher", True),
    ("layers alone", ["mahalanobis-layers"], "fisher", True),
]
ADVERSARIAL: list[tuple[str, str, dict[str, Any], str]] = [
    ("fgsm eps=0.1", "fgsm", {"eps": 0.1}, "n_adv"),
    ("pgd-linf eps=0.1", "pgd", {"eps": 0.1, "steps": 20}, "n_adv"),
    ("pgd-l2 eps=1.5", "pgd", {"eps": 1.5, "steps": 20, "norm": "l2"}, "n_adv"),
    ("cw-l2 kappa=0", "cw", {"kappa": 0.0}, "n_cw"),
    ("cw-l2 kappa=5", "cw", {"kappa": 5.0}, "n_cw"),
]


def ood_sets(test_x: np.ndarray, n: int, seed: int) -> dict[str, np.ndarray]:
    """uint8 (N, 28, 28, 1) out-of-distribution sets built from what ships here (no downloads)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    digits = load_digits().images[:n]  # 0..16, 8x8
    up = np.stack([np.asarray(Image.fromarray((d * 255 / 16).astype(np.uint8)).resize((28, 28), Image.BILINEAR))
                   for d in digits])[..., None]
    base = test_x[rng.choice(len(test_x), n, replace=False)].astype(np.float64)
    noisy = np.clip(base + rng.normal(0, 0.4 * 255, base.shape), 0, 255).astype(np.uint8)
    return {
        "ood: digits upscaled": up.astype(np.uint8),
        "ood: uniform noise": rng.integers(0, 256, (n, 28, 28, 1)).astype(np.uint8),
        "ood: fmnist + noise sd 0.4": noisy,
        "ood: fmnist inverted": (255 - base).astype(np.uint8),
        "ood: constant images": np.repeat(np.linspace(0, 255, 256).astype(np.uint8), 28 * 28).reshape(256, 28, 28, 1),
    }


def adversarial_sets(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, args: argparse.Namespace
                     ) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """Successful adversarial examples *after* uint8 quantisation, on correctly classified images."""
    sets, info = {}, []
    for label, name, params, size in ADVERSARIAL:
        m = getattr(args, size)
        if m <= 0:
            continue
        t0 = time.perf_counter()
        res = run_attack(name, model, x[:m], y[:m], seed=args.seed, **params)
        eps = params.get("eps") if name != "pgd" or params.get("norm", "linf") == "linf" else None
        q = quantize(res.images, x[:m], eps) if eps is not None else quantize(res.images)
        ok = res.clean_correct & (predict(model, q) != y[:m])
        sets[label] = q[ok]
        info.append({**res.summary(), "set": label, "kept_after_uint8": int(ok.sum()),
                     "success_before_uint8": int((res.success & res.clean_correct).sum()),
                     "seconds": time.perf_counter() - t0})
        log.info("%s: %d of %d successful after uint8 (%.0fs)", label, ok.sum(), m, time.perf_counter() - t0)
    return sets, info


def score_sets(onnx_path: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], sets: dict[str, np.ndarray],
               threads: int) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray], dict[str, Any]]:
    """Raw scores ``{set: {row: (n,)}}`` and predictions ``{set: (n,)}`` of every detector row."""
    model = OnnxModel(onnx_path, intra_op_threads=threads)
    dets = [(row, make_detector(kind, **params)) for row, kind, params, _ in ROWS]
    fit_x, fit_y = splits["fit"]
    obs = observe(model, to_model_input(fit_x, model.input_shape), needed_outputs([d for _, d in dets]))
    timing: dict[str, Any] = {"fit_seconds": {}, "score_seconds": {}}
    for row, d in dets:
        t0 = time.perf_counter()
        d.fit(obs, fit_y, model)
        timing["fit_seconds"][row] = time.perf_counter() - t0
    del obs
    outputs = needed_outputs([d for _, d in dets])  # the resolved taps: one forward pass per set
    scores: dict[str, dict[str, np.ndarray]] = {}
    preds: dict[str, np.ndarray] = {}
    everything = {**{k: v[0] for k, v in splits.items() if k != "fit"}, **sets}
    for name, images in everything.items():
        if len(images) == 0:
            continue
        x = to_model_input(images, model.input_shape)
        t0 = time.perf_counter()
        o = observe(model, x, outputs)
        fwd = time.perf_counter() - t0
        preds[name] = o["logits"].argmax(1)
        scores[name] = {}
        for row, d in dets:
            t0 = time.perf_counter()
            scores[name][row] = np.asarray(d.score(o, model), np.float64)
            if name == "eval":
                timing["score_seconds"][row] = time.perf_counter() - t0
        if name == "eval":
            timing["forward_seconds"] = fwd
        log.info("scored %s (%d)", name, len(images))
    return scores, preds, timing


def evaluate(scores: dict[str, dict[str, np.ndarray]], preds: dict[str, np.ndarray], k: int,
             two: dict[str, bool]) -> dict[str, Any]:
    rows = list(two)
    cal = scores["cal"]
    out: dict[str, Any] = {}
    guards = {}
    for gname, members, combine, tails in GUARDS:
        guards[gname] = Calibrator.fit({m: cal[m] for m in members}, preds["cal"], [two[m] for m in members],
                                       combine, FPR, k, tails=tails)

    def ranked(s: dict[str, np.ndarray], p: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        r = {row: rank_scores(cal[row], s[row], two[row]) for row in rows}
        flags = {}
        for gname, members, _, _ in GUARDS:
            c = guards[gname]
            comb, _, _ = c.pvalues({m: s[m] for m in members}, p)
            r[gname] = -np.log(np.maximum(comb, 1e-300))
            flags[gname] = comb <= c.thresholds(p)
        return r, flags

    neg, neg_flags = ranked(scores["eval"], preds["eval"])
    out["clean eval (negatives)"] = {"n": int(len(preds["eval"])),
                                     "flagged": {g: float(f.mean()) for g, f in neg_flags.items()}}
    for name in scores:
        if name in ("cal", "val", "eval"):
            continue
        pos, pos_flags = ranked(scores[name], preds[name])
        res: dict[str, Any] = {"n": int(len(preds[name])), "detectors": {}, "flagged": {}}
        for row in neg:
            m = metrics(neg[row], pos[row])
            if row in two and two[row]:
                m["high_tail_auroc"] = metrics(scores["eval"][row], scores[name][row])["auroc"]
            res["detectors"][row] = m
        res["flagged"] = {g: float(f.mean()) for g, f in pos_flags.items()}
        out[name] = res
    return {"sets": out, "guards": guards}


def _stream(scores: dict[str, dict[str, np.ndarray]], preds: dict[str, np.ndarray], c: Calibrator,
            section: dict[str, Any], k: int, parts: list[tuple[str, slice]]) -> dict[str, Any]:
    """Flag one stream (concatenated parts of the scored sets) and run both alarms, and the old unconditional one."""
    s = {m: np.concatenate([scores[p][m][sl] for p, sl in parts]) for m in c.names}
    pr = np.concatenate([preds[p][sl] for p, sl in parts])
    comb, _, _ = c.pvalues(s, pr)
    fl = comb <= c.thresholds(pr)
    flags, predicted = np.bincount(pr[fl], minlength=k), np.bincount(pr, minlength=k)
    a = stream_alarms(flags, predicted, section)
    old = stream_alarms(flags, predicted, section["alarm_null"]["dirichlet"])
    assert a is not None and old is not None and a.drift is not None
    return {"n": int(len(pr)), "flag_rate": float(fl.mean()), "class_alarm": a.fired, "target": a.target,
            "class_p": a.p_value, "drift": a.drift.fired, "drift_p": a.drift.p_value,
            "old_unconditional_alarm": old.fired, "old_target": old.target}


def alarms(scores: dict[str, dict[str, np.ndarray]], preds: dict[str, np.ndarray], guards: dict[str, Calibrator],
           k: int, triggered: str | None) -> dict[str, Any]:
    """Both stream alarms for two guards on clean, shifted and backdoor streams (the bundle's null built as
    calibrate_bundle builds it: leave-one-out calibration flags plus validation flags)."""
    out: dict[str, Any] = {}
    for gname in ("default guard (mahalanobis)", "five: fisher", "one pass: layers + knn, fisher"):
        c = guards[gname]
        names = c.names
        loo, _, _ = c.pvalues({m: scores["cal"][m] for m in names}, preds["cal"], leave_one_out=True)
        vcomb, _, _ = c.pvalues({m: scores["val"][m] for m in names}, preds["val"])
        vflags = vcomb <= c.thresholds(preds["val"])
        clean_flags = np.r_[preds["cal"][loo <= c.thresholds(preds["cal"])], preds["val"][vflags]]
        null, method = alarm_null(clean_flags, preds["cal"], k)
        section = {"alarm_null": {"method": method, "dirichlet": null.tolist()},
                   "predicted_class_counts": np.bincount(preds["cal"], minlength=k).tolist(),
                   "validation": {"k": int(vflags.sum()), "n": int(len(vflags))}}

        streams = {"clean (evaluation split)": [("eval", slice(None))]}
        for name in scores:
            if name.startswith("ood:"):
                streams[f"shifted: {name[5:]}"] = [(name, slice(None))]
        if triggered is not None and triggered in scores:
            streams["backdoor: clean + 60 triggered"] = [("eval", slice(None)), (triggered, slice(0, 60))]
            if "ood: digits upscaled" in scores:
                streams["backdoor in a shifted stream: digits + 60 triggered"] = [
                    ("ood: digits upscaled", slice(None)), (triggered, slice(0, 60))]
        out[gname] = {s: _stream(scores, preds, c, section, k, parts) for s, parts in streams.items()}
    return out


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attacks", default="badnets")
    ap.add_argument("--work", default="/tmp/abl-guard-converged")
    ap.add_argument("--n-trig", type=int, default=1000)
    ap.add_argument("--n-adv", type=int, default=1000)
    ap.add_argument("--n-cw", type=int, default=32)
    ap.add_argument("--n-ood", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "detect_converged"))
    ap.add_argument("--smoke", action="store_true",
                    help="plumbing check: a 1-epoch model on 3,000 images, tiny sets, results under /tmp")
    args = ap.parse_args()
    train, train_limit = dict(TRAIN), None
    if args.smoke:
        train, train_limit = {"epochs": 1, "lr": 0.05, "lr_milestones": ()}, 3000
        args.n_trig, args.n_adv, args.n_cw, args.n_ood = 60, 40, 4, 50
        args.work, args.out = "/tmp/abl-guard-converged-smoke", "/tmp/abl-guard-converged-smoke/detect_converged"
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    test = load_dataset("fashion-mnist", "test")
    spec, k = test.spec, test.spec.num_classes
    perm = np.random.default_rng(args.seed).permutation(len(test))
    parts = np.split(perm, np.cumsum([2000, 1000, 1000, 1000]))
    splits = {n: (test.images[i], test.labels[i]) for n, i in zip(("fit", "cal", "val", "eval"), parts)}
    src_x, src_y = test.images[parts[4]], test.labels[parts[4]]
    train_cfg = TrainConfig(epochs=train["epochs"], lr=train["lr"], lr_milestones=train["lr_milestones"],
                            seed=args.seed, device="cpu")
    runs = []
    for attack_name in [a.strip() for a in args.attacks.split(",") if a.strip()]:
        t0 = time.perf_counter()
        cfg = ExperimentConfig(dataset="fashion-mnist", attack=attack_name, attack_params={"rate": 0.1, "target": 0},
                               defense="none", train=train_cfg, train_limit=train_limit, test_limit=2000)
        run_dir = Path(args.work) / f"{attack_name}-none"
        model, rec = train_cached(cfg, run_dir)
        torch.set_num_threads(args.threads)  # training resets torch's thread count
        attack = make_attack(attack_name, seed=args.seed, rate=0.1, target=0)
        trig, asr = triggered_successes(model, attack, src_x, src_y, k, args.n_trig)
        trig_name = f"triggered ({attack_name})"
        sets: dict[str, np.ndarray] = {trig_name: trig}
        adv_info: list[dict[str, Any]] = []
        if attack_name == "badnets":
            adv, adv_info = adversarial_sets(model, src_x, src_y, args)
            sets.update(adv)
            sets.update(ood_sets(src_x, args.n_ood, args.seed))
        onnx_path = export(model, spec, run_dir / "model.onnx")
        scores, preds, timing = score_sets(onnx_path, splits, sets, args.threads)
        two = {row: make_detector(kind, **params).two_sided for row, kind, params, _ in ROWS}
        ev = evaluate(scores, preds, k, two)
        al = alarms(scores, preds, ev["guards"], k, trig_name)
        runs.append({"model": attack_name, "training": {"metrics": rec["metrics"],
                                                        "train_seconds": rec.get("train_seconds"),
                                                        "reused_cache": rec.get("reused_cache", False)},
                     "asr_on_source_split": asr,
                     "clean_accuracy_eval_split": float(np.mean(preds["eval"] == splits["eval"][1])),
                     "adversarial": adv_info, "results": ev["sets"], "alarms": al, "timing": timing,
                     "seconds": time.perf_counter() - t0})
    record = {"command": "python bench/detect_converged.py " + " ".join(sys.argv[1:]), "cpu": cpu_name(),
              "threads": args.threads, "torch": torch.__version__,
              "train": {**train, "train_size": train_limit or 60000},
              "splits": {"fit": 2000, "cal": 1000, "val": 1000, "eval": 1000, "source": int(len(src_x))},
              "detectors": [{"row": r, "detector": d, "params": p, "lens": lens} for r, d, p, lens in ROWS],
              "guards": [{"row": g, "members": m, "combine": c, "tails": t} for g, m, c, t in GUARDS],
              "fpr": FPR, "runs": runs, "wall_seconds": time.perf_counter() - t_start}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2, default=float))
    write_markdown_keeping_notes(out.with_suffix(".md"), render(record))
    print(f"-> {out.with_suffix('.md')} ({record['wall_seconds'] / 60:.1f} min)")


def render(r: dict[str, Any]) -> str:
    rows = [d["row"] for d in r["detectors"]] + [g["row"] for g in r["guards"]]
    lines = ["# Detectors and guards on a converged model", "",
             f"`{r['command']}` — {r['cpu']}, {r['threads']} thread(s), torch {r['torch']}; wall "
             f"{r['wall_seconds'] / 60:.1f} min.", "",
             f"Fashion-MNIST, small CNN trained on all {r['train']['train_size']:,} training images, "
             f"{r['train']['epochs']} epochs, SGD lr {r['train']['lr']} (÷10 at epochs "
             f"{', '.join(map(str, r['train']['lr_milestones']))}); test splits fit / calibration / validation / "
             f"evaluation {r['splits']['fit']} / {r['splits']['cal']} / {r['splits']['val']} / {r['splits']['eval']}, "
             f"positives from the other {r['splits']['source']}. Adversarial examples are quantised to uint8 and kept "
             "only when still successful.", "",
             "Cells: **AUROC / TPR % at 1% FPR (ROC)**; for guard rows also **/ % flagged at the guard's own 1% "
             "threshold**. Two-sided detectors are ranked by the guard's two-sided p-value.", ""]
    for run in r["runs"]:
        t = run["training"]["metrics"]
        lines += [f"## {run['model']}", "",
                  f"CA {100 * t['clean_accuracy']:.2f}%, ASR {100 * t.get('attack_success_rate', 0):.2f}% "
                  f"(training {run['training']['train_seconds'] or 0:.0f}s"
                  f"{', cached' if run['training']['reused_cache'] else ''}); clean accuracy on the evaluation split "
                  f"{100 * run['clean_accuracy_eval_split']:.1f}%; ASR on the source split "
                  f"{100 * run['asr_on_source_split']:.1f}%.", ""]
        if run["adversarial"]:
            lines += ["Adversarial sets: " + "; ".join(
                f"{a['set']}: {a['kept_after_uint8']} of {a['n']} successful after uint8 "
                f"({a['success_before_uint8']} before)" for a in run["adversarial"]), ""]
        res = run["results"]
        sets = [s for s, v in res.items() if s != "clean eval (negatives)" and v.get("n")]
        lines.append("| detector / guard | " + " | ".join(f"{s} (n={res[s]['n']})" for s in sets)
                     + " | clean flagged % |")
        lines.append("|---" * (len(sets) + 2) + "|")
        for row in rows:
            cells = []
            for s in sets:
                m = res[s]["detectors"].get(row)
                if not m or np.isnan(m.get("auroc", np.nan)):
                    cells.append("–")
                    continue
                c = f"{m['auroc']:.3f} / {100 * m['tpr@1']:.0f}"
                if row in res[s]["flagged"]:
                    c += f" / {100 * res[s]['flagged'][row]:.0f}"
                cells.append(c)
            clean = res["clean eval (negatives)"]["flagged"].get(row)
            lines.append(f"| {row} | " + " | ".join(cells) + f" | {'–' if clean is None else f'{100 * clean:.1f}'} |")
        lines.append("")
        # does the guard keep up with its best member?
        lines += ["Guard vs its best member (AUROC; the target is guard >= best - 0.005):", ""]
        for g in r["guards"]:
            if len(g["members"]) < 2:
                continue
            worst = min(((res[s]["detectors"][g["row"]]["auroc"]
                          - max(res[s]["detectors"][m]["auroc"] for m in g["members"]), s) for s in sets),
                        default=(float("nan"), ""))
            lines.append(f"- {g['row']}: worst shortfall {worst[0]:+.3f} ({worst[1]})")
        lines += ["", "Stream alarms (1% FPR guard; class alarm conditional on the stream's prediction mix; the old "
                      "unconditional test alongside):", "",
                  "| guard | stream | n | flagged % | class alarm (target, p) | drift (p) | old class alarm |",
                  "|---|---|---|---|---|---|---|"]
        for g, streams in run["alarms"].items():
            for s, a in streams.items():
                lines.append(f"| {g} | {s} | {a['n']} | {100 * a['flag_rate']:.1f} | "
                             f"{'FIRED ' + str(a['target']) if a['class_alarm'] else 'no'} ({a['class_p']:.2g}) | "
                             f"{'FIRED' if a['drift'] else 'no'} ({a['drift_p']:.2g}) | "
                             f"{'fired ' + str(a['old_target']) if a['old_unconditional_alarm'] else 'no'} |")
        lines.append("")
        tm = run["timing"]
        fwd = tm.get("forward_seconds", 0.0)
        lines += ["Score cost on the evaluation split (× one forward pass): " + ", ".join(
            f"{row} {s / max(fwd, 1e-9):.1f}" for row, s in tm["score_seconds"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
