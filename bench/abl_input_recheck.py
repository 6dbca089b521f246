"""Can a pixel-space classifier find the poison a retrain-mode removal left behind? (issue 17, exploratory)

WaNet 10% on some CPUs keeps its backdoor after ABL's retrain mode: the removal (seed expansion, label scan or
off-label scan) takes most of the poison, and the few hundred copies it leaves teach the fresh model the warp again
(docs/abl.md#clean-stage-recheck). The warp is one fixed field, so a small CNN trained on raw pixels to tell the
removed examples (positives) from other labels' examples (negatives: all-to-one poison leaves them clean, and
WaNet's noise-mode images among them teach that only the exact warp counts) might recognise the left-behind copies
in the target label. This script measures that on a finished ``abl-guard train --defense abl`` run directory
(``removed_indices.npy``; the poison is re-created from the same attack, seed and rate, and checked against the
run's ``poison_indices.npy``), scoring the target label's remaining examples and flagging those above the 99.5%
quantile of held-out other-label examples. Variants (what the positives and negatives are):

* ``oracle``: the removed examples that are poison (ground truth: the ceiling, not a method);
* ``removed``: every removed example; negatives other labels only;
* ``fresh``: the removed examples a fresh model trained one epoch on what remains (the retrain's own first clean
  epoch) gives a probability of the target label under 0.05 — poison made from another class looks like that class
  to a model that never trained on it, while the clean target-label examples the removal took look like the label;
* ``fresh+safe``: as ``fresh``, with the target label's remaining examples the fresh model gives more than 0.5 added
  to the negatives (so the label's own appearance is not what the classifier learns), and only the others flagged.

Run (after ``abl-guard train --attack wanet --attack-param rate=0.1 --defense abl --epochs 8 --lr 0.05
--lr-milestones 5,7 --seed S --threads 1 --out RUN``):

    .venv/bin/python bench/abl_input_recheck.py RUN [RUN ...] --seeds S[,S ...] --out bench/results/abl_input_recheck
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import cpu_name, write_results
from sklearn.metrics import roc_auc_score
from torch import nn

from abl_guard.abl.experiment import make_evaluator, prepare_data
from abl_guard.abl.models import build_model
from abl_guard.abl.pixel_recheck import HELD_OUT, POSITIVE_MAX, QUANTILE, choose_positives, fit_pixel, margin
from abl_guard.abl.run_config import ExperimentConfig
from abl_guard.abl.train import PlainTrainer, TrainConfig, predict_logits, softmax_rows

VARIANTS = ("oracle", "removed", "fresh", "fresh+safe")
CPU = torch.device("cpu")
#: the fresh model's probability of the target over which a remaining target-label example is a negative (fresh+safe)
SAFE_MIN = 0.5


def fit(x: np.ndarray, pos: np.ndarray, neg: np.ndarray, epochs: int) -> nn.Module:
    """The library's binary pixel-space CNN (:func:`abl_guard.abl.pixel_recheck.fit_pixel`, seed 0), ``pos`` against
    ``neg`` (indices into ``x``)."""
    return fit_pixel(x, pos, neg, seed=0, device=CPU, epochs=epochs)


def logit_margin(net: nn.Module, x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The binary classifier's positive-minus-negative logit for ``x[idx]``."""
    return margin(net, x, idx, CPU)


def retrain(data: Any, drop: np.ndarray, seed: int) -> dict[str, float]:
    """A fresh small CNN trained on every training example not in ``drop`` with the benchmark's schedule (8 epochs,
    SGD lr 0.05, divided by 10 at epochs 5 and 7); its CA and ASR on the test set."""
    x, y = data.train.images, data.train.labels
    keep = np.setdiff1d(np.arange(len(y)), drop)
    torch.manual_seed(seed)
    model = build_model("small-cnn", x.shape[-1], data.train.spec.num_classes, x.shape[1], data.train.spec.mean,
                        data.train.spec.std)
    cfg = TrainConfig(seed=seed, device="cpu", epochs=8, lr=0.05, lr_milestones=(5, 7))
    trainer = PlainTrainer(model, x[keep], y[keep], cfg)
    for _ in range(cfg.epochs):
        trainer.epoch(quiet=True)
    model.eval()
    return make_evaluator(data, CPU)(model)


def study(run: Path, seed: int, attack: str, rate: float, target: int, epochs: int,
          retrain_with: str | None = None) -> dict[str, Any]:
    cfg = ExperimentConfig(attack=attack, attack_params={"rate": rate, "target": target},
                           train=TrainConfig(seed=seed, device="cpu"))
    data = prepare_data(cfg)
    x, y, poison = data.train.images, data.train.labels, np.asarray(data.poison_indices)
    stored = run / "poison_indices.npy"
    if stored.exists() and not np.array_equal(np.sort(poison), np.sort(np.load(stored))):
        raise SystemExit(f"{run}: the re-created poison does not match the run's (attack, seed or rate differ)")
    removed = np.load(run / "removed_indices.npy")
    rest = np.setdiff1d(np.where(y == target)[0], removed)
    is_poison = np.isin(rest, poison)
    rng = np.random.default_rng(0)
    others = np.where(y != target)[0]
    rng.shuffle(others)
    held_out, train_others = others[:HELD_OUT], others[HELD_OUT:]
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    fresh = build_model("small-cnn", x.shape[-1], data.train.spec.num_classes, x.shape[1], data.train.spec.mean,
                        data.train.spec.std)
    keep = np.setdiff1d(np.arange(len(y)), removed)
    PlainTrainer(fresh, x[keep], y[keep], TrainConfig(seed=seed, device="cpu", epochs=1, lr=0.05)).epoch(quiet=True)
    fresh.eval()
    p_removed = softmax_rows(predict_logits(fresh, x[removed], CPU))[:, target]
    p_rest = softmax_rows(predict_logits(fresh, x[rest], CPU))[:, target]
    fresh_seconds = time.perf_counter() - t0
    removed_poison = np.isin(removed, poison)
    rec: dict[str, Any] = {
        "run": str(run), "seed": seed, "removed": int(len(removed)), "removed_poison": int(removed_poison.sum()),
        "left_poison": int(is_poison.sum()), "left_clean": int((~is_poison).sum()),
        "fresh_seconds": fresh_seconds, "variants": {}}
    safe = p_rest > SAFE_MIN
    # the library's rule, read off the first three runs: the filtered removal when the fresh model calls at least
    # half of the removal another class, else the whole removal (the fresh model has relearned the trigger)
    _, auto, rec["fresh_other_share"] = choose_positives(removed, p_removed)
    for variant in VARIANTS:
        if variant == "oracle":
            pos = removed[removed_poison]
        elif variant == "removed":
            pos = removed
        else:
            pos = removed[p_removed < POSITIVE_MAX]
        neg = train_others[:len(pos)]
        if variant == "fresh+safe":
            neg = np.r_[neg, rest[safe]]
        t0 = time.perf_counter()
        net = fit(x, pos, neg, epochs)
        s_rest, s_held = logit_margin(net, x, rest), logit_margin(net, x, held_out)
        seconds = time.perf_counter() - t0
        flag = s_rest > np.quantile(s_held, QUANTILE)
        if variant == "fresh+safe":
            flag &= ~safe
            s_rest = np.where(safe, -np.inf, s_rest)
        order = np.argsort(-s_rest)
        taken_poison, taken_clean = np.cumsum(is_poison[order]), np.cumsum(~is_poison[order])
        at_clean = {str(n): int(taken_poison[min(np.searchsorted(taken_clean, n), len(order) - 1)])
                    for n in (25, 50, 100, 200)}
        rec["variants"][variant] = {
            "positives": int(len(pos)), "positives_clean": int((~np.isin(pos, poison)).sum()),
            "negatives": int(len(neg)), "auroc": float(roc_auc_score(is_poison, np.nan_to_num(s_rest, neginf=-1e9))),
            "flagged_poison": int((flag & is_poison).sum()), "flagged_clean": int((flag & ~is_poison).sum()),
            "poison_at_clean": at_clean, "seconds": seconds}
        if variant == retrain_with or (retrain_with == "auto" and variant == auto):
            rec["retrain"] = {"variant": variant, "removed_only": retrain(data, removed, seed),
                              "with_flags": retrain(data, np.r_[removed, rest[flag]], seed)}
    return rec


def render(r: dict[str, Any]) -> str:
    lines = ["# A pixel-space classifier for the poison a retrain-mode removal left behind (exploratory)", "",
             f"`{r['command']}` — {r['cpu']}, 1 thread; classifier {r['epochs']} epochs; flagged above the "
             f"{QUANTILE:.1%} quantile of {HELD_OUT:,} held-out other-label examples.", "",
             "| run | removed (poison / clean) | left in the label (poison / clean) | variant | positives (clean) | "
             "AUROC left poison vs clean | flagged poison / clean | poison flagged at 25 / 50 / 100 / 200 clean | "
             "seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for m in r["runs"]:
        head = [f"seed {m['seed']}", f"{m['removed_poison']:,} / {m['removed'] - m['removed_poison']:,}",
                f"{m['left_poison']:,} / {m['left_clean']:,}"]
        for name, v in m["variants"].items():
            at = " / ".join(str(v["poison_at_clean"][k]) for k in ("25", "50", "100", "200"))
            lines.append("| " + " | ".join(head + [
                name, f"{v['positives']:,} ({v['positives_clean']:,})", f"{v['auroc']:.3f}",
                f"{v['flagged_poison']} / {v['flagged_clean']}", at, f"{v['seconds']:.0f}"]) + " |")
            head = ["", "", ""]
    done = [m for m in r["runs"] if "retrain" in m]
    if done:
        lines += ["", "A fresh small CNN retrained (8 epochs, lr 0.05 ÷10 at 5 and 7) on everything but the removal, "
                  "and on everything but the removal and the variant's flags (every training image counted; the "
                  "ABL pipeline also holds a split out):", "",
                  "| run | variant (share of the removal the fresh model calls another class) | "
                  "CA % / ASR %: removal only | removal + flags |", "|---|---|---|---|"]
        for m in done:
            a, b = m["retrain"]["removed_only"], m["retrain"]["with_flags"]
            lines.append(f"| seed {m['seed']} | {m['retrain']['variant']} ({m['fresh_other_share']:.0%}) | "
                         f"{100 * a['clean_accuracy']:.2f} / "
                         f"{100 * a['attack_success_rate']:.2f} | {100 * b['clean_accuracy']:.2f} / "
                         f"{100 * b['attack_success_rate']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="abl-guard train --defense abl output directories")
    ap.add_argument("--seeds", required=True, help="the seed of each run, comma-separated")
    ap.add_argument("--attack", default="wanet")
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--target", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=8, help="the pixel classifier's epochs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--retrain", help="per run, comma-separated: the variant whose flags to retrain without "
                                      "(a fresh model with and without them; 'auto': fresh when the fresh model "
                                      "calls at least half of the removal another class, else removed; '-': none)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "abl_input_recheck"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    if len(seeds) != len(args.runs):
        raise SystemExit("give one seed per run")
    again = args.retrain.split(",") if args.retrain else ["-"] * len(seeds)
    if len(again) != len(seeds) or not set(again) <= {*VARIANTS, "auto", "-"}:
        raise SystemExit(f"--retrain: one of {', '.join(VARIANTS)}, auto or '-' per run")
    runs = [study(run, s, args.attack, args.rate, args.target, args.epochs, None if v == "-" else v)
            for run, s, v in zip(args.runs, seeds, again)]
    record = {"command": "python bench/abl_input_recheck.py " + " ".join(sys.argv[1:]), "cpu": cpu_name(),
              "epochs": args.epochs, "runs": runs}
    write_results(args.out, record, render(record), keep_notes=True)


if __name__ == "__main__":
    main()
