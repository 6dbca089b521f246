"""How much a guard's 1% threshold moves with the draw of its calibration images, studied offline on saved scores.

``bench/detect_converged.py`` calibrates each guard on one split of 1,000 clean test images and reports the share of
each set flagged at the guard's own threshold, and its clean false-positive rate on another 1,000. Both are one draw.
This script pools the calibration and evaluation splits' clean scores (2,000 images of the same test set), draws
``--splits`` random halves, calibrates the member set on one half exactly as the guard does
(``guard.calibration.Calibrator``: conformal p-values with exponential tails, Fisher's combination or ``--combine``'s,
the threshold from leave-one-out calibration p-values) and measures the other half's false-positive rate and every
positive set's flagged share. The spread is what a user calibrating on 1,000 clean images should expect; ``--alone``
also calibrates each member by itself on the same draws, and ``--combine fisher,adaptive`` compares combinations on
the same draws. Run:

    .venv/bin/python bench/split_study.py DIR/badnets-none-scores.npz [...] --out bench/results/split_study
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
from _common import cpu_name, write_results
from detect_converged import FPR, load_scores, two_sided
from fusion_study import ALL_ROWS, NOT_POSITIVE

from abl_guard.guard.calibration import Calibrator

DEFAULT = "mahalanobis,knn,gram"


def spread(scores: dict[str, dict[str, np.ndarray]], preds: dict[str, np.ndarray], members: list[str],
           two: dict[str, bool], k: int, splits: int, seed: int = 0, combine: str = "fisher") -> dict[str, Any]:
    """Clean FPR and each positive set's flagged share over ``splits`` random halves of the pooled clean images."""
    pooled = {m: np.r_[scores["cal"][m], scores["eval"][m]] for m in members}
    pred = np.r_[preds["cal"], preds["eval"]]
    n_cal = len(preds["cal"])
    positives = [s for s in scores if s not in NOT_POSITIVE and not s.startswith("surrogate")]
    rng = np.random.default_rng(seed)
    fpr, flagged = [], {s: [] for s in positives}
    for _ in range(splits):
        perm = rng.permutation(len(pred))
        cal, held = perm[:n_cal], perm[n_cal:]
        c = Calibrator.fit({m: pooled[m][cal] for m in members}, pred[cal], [two[m] for m in members], combine,
                           FPR, k)
        thr = c.p_threshold  # from the calibration half's leave-one-out combined p-values (Calibrator.fit)
        fpr.append(float((c.pvalues({m: pooled[m][held] for m in members}, pred[held])[0] <= thr).mean()))
        for s in positives:
            flagged[s].append(float((c.pvalues({m: scores[s][m] for m in members}, preds[s])[0] <= thr).mean()))

    def summary(v: list[float]) -> dict[str, float]:
        a = np.asarray(v)
        return {"mean": float(a.mean()), "sd": float(a.std()), "p5": float(np.quantile(a, 0.05)),
                "p95": float(np.quantile(a, 0.95)), "min": float(a.min()), "max": float(a.max())}

    return {"members": members, "combine": combine, "n_calibration": n_cal, "n_held_out": len(pred) - n_cal,
            "splits": splits,
            "clean_fpr": summary(fpr), "flagged": {s: summary(v) for s, v in flagged.items()}}


def _cell(v: dict[str, float]) -> str:
    """A summary cell: the mean in bold, then (5th–95th percentile; min–max), in percent."""
    return (f"**{100 * v['mean']:.1f}** ({100 * v['p5']:.1f}–{100 * v['p95']:.1f}; "
            f"{100 * v['min']:.1f}–{100 * v['max']:.1f})")


def render(r: dict[str, Any]) -> str:
    lines = ["# The guard's threshold over random calibration splits", "",
             f"`{r['command']}` — {r['cpu']}.", "",
             "Each model's 2,000 clean calibration and evaluation images pooled, split at random into "
             f"{r['models'][0]['n_calibration']:,} to calibrate on and the rest to measure the clean false-positive "
             f"rate, {r['models'][0]['splits']} times; the guard `{','.join(r['models'][0]['members'])}` at "
             f"{r['fpr']:.0%} FPR calibrated as `calibrate` does. Cells: **mean %** (5th–95th percentile; min–max).",
             ""]
    for m in r["models"]:
        cols = {f"guard ({m.get('combine', 'fisher')}): flagged %": m, **{f"guard ({c})": v for c, v in
                                                                             m.get("combines", {}).items()},
                **{f"{a} alone": v for a, v in m.get("alone", {}).items()}}
        lines += [f"## {m['file']}", "", "| set | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        lines.append("| clean (held-out half) |" + "".join(f" {_cell(v['clean_fpr'])} |" for v in cols.values()))
        lines += [f"| {s} |" + "".join(f" {_cell(v['flagged'][s])} |" for v in cols.values())
                  for s in m["flagged"]]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("scores", nargs="+", help="npz files written by detect_converged.py --save-scores")
    ap.add_argument("--members", default=DEFAULT, help="the guard's detector rows (default: calibrate's default set)")
    ap.add_argument("--alone", action="store_true",
                    help="also calibrate each member alone on the same draws (which member sees what)")
    ap.add_argument("--combine", default="fisher",
                    help="combinations to compare on the same draws, comma-separated (the first is the guard's)")
    ap.add_argument("--splits", type=int, default=100)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "split_study"))
    args = ap.parse_args()
    two = two_sided(ALL_ROWS)
    members = args.members.split(",")
    models = []
    first, *more = args.combine.split(",")
    for path in map(Path, args.scores):
        scores, preds = load_scores(path)
        models.append({"file": path.name, **spread(scores, preds, members, two, args.classes, args.splits,
                                                   combine=first)})
        if more:
            models[-1]["combines"] = {c: spread(scores, preds, members, two, args.classes, args.splits, combine=c)
                                      for c in more}
        if args.alone and len(members) > 1:
            models[-1]["alone"] = {m: spread(scores, preds, [m], two, args.classes, args.splits) for m in members}
    record = {"command": "python bench/split_study.py " + " ".join(sys.argv[1:]), "cpu": cpu_name(), "fpr": FPR,
              "models": models}
    write_results(args.out, record, render(record), keep_notes=True)


if __name__ == "__main__":
    main()
