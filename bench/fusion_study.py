"""Combinations of the guard's per-detector p-values, studied offline on saved scores (issue 16 item 3).

``bench/detect_converged.py --save-scores DIR`` writes every set's raw detector scores; this script re-calibrates
each member set exactly as the guard does (``guard.calibration.Calibrator``: conformal p-values with exponential
tails, the threshold for 1% FPR from leave-one-out calibration p-values) and compares ways of combining the members'
p-values, none of which sees attack data:

* the guard's combinations: ``fisher`` (the default), ``hmp``, ``min-p``;
* *lens-grouped Fisher*: Fisher within each of Jin et al.'s lenses (sensitivity, activation space, feature space: the
  lens each detector row names), then Fisher (or Bonferroni min-p) across the lenses' p-values — one lens's members
  count as one piece of evidence, so a lone member of its lens weighs as much as a lens; for the default plus the
  probe also grouped by tap (the feature-tap members | the first-tap probe);
* the *truncated product* (Zaykin et al., Genet. Epidemiol. 2002): the sum of ``-log p`` over the members with
  ``p <= tau`` only, so members that see nothing add no noise;
* the *omnibus* of Fisher and min-p (their Bonferroni min): flags what either would;
* the *adaptive* test (``guard.calibration.AdaptiveCombiner``: Pan et al.'s aSPU, Genetics 2014): the power means
  of the members' surprises at powers 1 (Fisher's ranking) and inf (min-p's), each made a conformal p-value against
  the clean calibration inputs' own, the smaller one kept — the omnibus done with calibrated statistics; also with
  the powers 1, 2, 4, inf.

For every set it reports the AUROC against the clean evaluation split (``-log`` of the combined p-value), the share
flagged at the combination's own 1% threshold, and the shortfall against the best single member (the issue's target:
never below the best member minus 0.005). For Fisher, the guard's combination, it also gives the shortfall's paired
bootstrap interval: clean and positive inputs resampled with replacement, every member and the combination scored on
the same resample, the best member chosen again in each (so the interval carries the choice's own optimism), and the
share of resamples below -0.005 — with ~100 CW inputs a shortfall of 0.01 is within the sampling noise. Run:

    .venv/bin/python bench/fusion_study.py DIR/badnets-none-scores.npz [...] --out bench/results/fusion_study
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _common import cpu_name, write_results
from detect import metrics
from detect_converged import EXTRA_TAP_ROWS, FIVE, FPR, ROWS, extra_tap_rows, load_scores, two_sided

from abl_guard.guard.calibration import AdaptiveCombiner, Calibrator, combine_pvalues, threshold_for_fpr

Combination = Callable[[np.ndarray], np.ndarray]
NOT_POSITIVE = ("fit", "cal", "val", "eval")
BOOT = 1000  # bootstrap resamples of Fisher's shortfall

#: (study label, members, extra groupings {row: groups of member positions, combined across by Fisher; or
#: (groups, the combination across)}) — the lens grouping is always studied
Grouping = list[list[int]] | tuple[list[list[int]], str]
STUDIES: list[tuple[str, list[str], dict[str, Grouping]]] = [
    ("default", ["mahalanobis", "knn", "gram"], {}),
    ("default + probe", ["mahalanobis", "knn", "gram", "probe"], {"tap-grouped fisher": [[0, 1, 2], [3]]}),
    ("default + two probes", ["mahalanobis", "knn", "gram", "probe", "probe (second tap)"],
     {"tap-grouped fisher": [[0, 1, 2], [3, 4]]}),
    # the input lens (pixels, not the model) beside the default: as a fourth Fisher member, or kept apart — Fisher
    # over the model's members, then Bonferroni min-p of that and the input lens ("input apart")
    ("default + typicality", ["mahalanobis", "knn", "gram", "typicality"],
     {"input apart (fisher, then min-p)": ([[0, 1, 2], [3]], "min-p")}),
    ("default + probe + typicality", ["mahalanobis", "knn", "gram", "probe", "typicality"],
     {"input apart (fisher, then min-p)": ([[0, 1, 2, 3], [4]], "min-p")}),
    ("five", FIVE, {}),
    # Sastry & Oore's ten Gram orders in place of the default's first order (scores from a run with that row)
    ("default, gram at the paper's powers", ["mahalanobis", "knn", "gram (paper powers)"], {}),
    # and at every layer given to --extra-taps (the paper's setting on a model whose declared taps are its blocks)
    ("default, gram at extra taps", ["mahalanobis", "knn", EXTRA_TAP_ROWS[0]], {}),
    ("default, gram at extra taps and the paper's powers", ["mahalanobis", "knn", EXTRA_TAP_ROWS[1]], {}),
]
#: every row saved scores can hold: detect_converged's, and the --extra-taps rows (their taps do not matter here)
ALL_ROWS = ROWS + extra_tap_rows(None)
LENS = {row: lens for row, _, _, lens in ALL_ROWS}


def lens_groups(members: list[str]) -> list[list[int]]:
    """Member positions grouped by their lens, in order of first appearance."""
    order = list(dict.fromkeys(LENS[m] for m in members))
    return [[i for i, m in enumerate(members) if LENS[m] == lens] for lens in order]


def grouped(groups: list[list[int]], across: str) -> Combination:
    """Fisher within each group, then ``across`` (a guard combination) over the groups' p-values."""
    def comb(P: np.ndarray) -> np.ndarray:
        G = np.stack([combine_pvalues(P[:, g], "fisher") for g in groups], axis=1)
        return G[:, 0] if len(groups) == 1 else combine_pvalues(np.clip(G, 1e-300, 1.0), across)
    return comb


def truncated(tau: float) -> Combination:
    """Zaykin's truncated product, as a monotone pseudo p-value (thresholds are empirical); ties (no member under
    ``tau``) broken by Fisher's sum."""
    def comb(P: np.ndarray) -> np.ndarray:
        surprise = -np.log(np.clip(P, 1e-300, 1.0))
        W = np.where(surprise >= -np.log(tau), surprise, 0.0).sum(axis=1)
        total = surprise.sum(axis=1)
        return np.exp(-W) * (1.0 - 1e-9 * total / (1.0 + total))
    return comb


def omnibus(P: np.ndarray) -> np.ndarray:
    return np.minimum(1.0, 2.0 * np.minimum(combine_pvalues(P, "fisher"), combine_pvalues(P, "min-p")))


def adaptive(P_cal: np.ndarray, powers: tuple[float, ...]) -> Combination:
    """The adaptive combination fitted on the calibration inputs' leave-one-out member p-values ``P_cal``; applied
    to ``P_cal`` itself it compares each calibration input with the others only."""
    comb = AdaptiveCombiner(P_cal, powers)

    def f(P: np.ndarray) -> np.ndarray:
        return comb(P, leave_one_out=P is P_cal)
    return f


def combinations(groups: list[list[int]], extra: dict[str, Grouping],
                 P_cal: np.ndarray) -> dict[str, Combination]:
    return {"fisher": lambda P: combine_pvalues(P, "fisher"), "hmp": lambda P: combine_pvalues(P, "hmp"),
            "min-p": lambda P: combine_pvalues(P, "min-p"),
            "lens-grouped fisher": grouped(groups, "fisher"), "lens-grouped min-p": grouped(groups, "min-p"),
            **{name: grouped(*g) if isinstance(g, tuple) else grouped(g, "fisher") for name, g in extra.items()},
            "truncated 0.05": truncated(0.05), "truncated 0.1": truncated(0.1), "omnibus": omnibus,
            "adaptive": adaptive(P_cal, (1.0, np.inf)), "adaptive 1,2,4,inf": adaptive(P_cal, (1.0, 2.0, 4.0, np.inf))}


def _neglog(p: np.ndarray) -> np.ndarray:
    return -np.log(np.maximum(p, 1e-300))


def auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    """Mann-Whitney AUROC, ties counted half (sklearn's ``roc_auc_score``), by binary search in sorted negatives."""
    s = np.sort(neg)
    both = np.searchsorted(s, pos, "left") + np.searchsorted(s, pos, "right")
    return float(both.sum() / (2.0 * len(neg) * len(pos)))


def shortfall_interval(neg: np.ndarray, pos: np.ndarray, n_boot: int = BOOT, seed: int = 0,
                       target: float = -0.005) -> dict[str, Any]:
    """Paired bootstrap of ``AUROC(last column) - max_j AUROC(column j < last)`` for suspicion scores ``neg`` (clean,
    ``(n, k + 1)``) and ``pos`` (``(m, k + 1)``): the 2.5% / 97.5% quantiles and the share of resamples below
    ``target``."""
    rng = np.random.default_rng(seed)
    k = neg.shape[1] - 1
    d = np.empty(n_boot)
    for b in range(n_boot):
        i, j = rng.integers(0, len(neg), len(neg)), rng.integers(0, len(pos), len(pos))
        n_b, p_b = neg[i], pos[j]
        d[b] = auroc(n_b[:, k], p_b[:, k]) - max(auroc(n_b[:, c], p_b[:, c]) for c in range(k))
    lo, hi = np.quantile(d, [0.025, 0.975])
    return {"ci95": [float(lo), float(hi)], "below_target": float(np.mean(d < target)), "resamples": n_boot}


def study(scores: dict[str, dict[str, np.ndarray]], preds: dict[str, np.ndarray], members: list[str],
          extra: dict[str, Grouping], two: dict[str, bool], k: int) -> dict[str, Any]:
    """Every combination's AUROC / flagged share per positive set, and each set's best single member."""
    c = Calibrator.fit({m: scores["cal"][m] for m in members}, preds["cal"], [two[m] for m in members], "fisher",
                       FPR, k)
    P_cal = c.pvalues(c.scores, preds["cal"], leave_one_out=True)[1]
    P_neg = c.pvalues({m: scores["eval"][m] for m in members}, preds["eval"])[1]
    positives = [s for s in scores if s not in NOT_POSITIVE and not s.startswith("surrogate")]
    P_pos = {s: c.pvalues({m: scores[s][m] for m in members}, preds[s])[1] for s in positives}
    best = {}
    for s in positives:
        aurocs = [metrics(_neglog(P_neg[:, j]), _neglog(P_pos[s][:, j]))["auroc"] for j in range(len(members))]
        best[s] = {"member": members[int(np.argmax(aurocs))], "auroc": float(max(aurocs)),
                   "members": dict(zip(members, map(float, aurocs))), "n": len(P_pos[s])}
    rows: dict[str, Any] = {}
    groups = lens_groups(members)
    for name, comb in combinations(groups, extra, P_cal).items():
        thr = threshold_for_fpr(comb(P_cal), FPR)
        neg = comb(P_neg)
        res: dict[str, Any] = {"clean_flagged": float((neg <= thr).mean()), "sets": {}}
        for s in positives:
            pos = comb(P_pos[s])
            au = metrics(_neglog(neg), _neglog(pos))["auroc"]
            res["sets"][s] = {"auroc": float(au), "flagged": float((pos <= thr).mean()),
                              "shortfall": float(au - best[s]["auroc"])}
            if name == "fisher":
                res["sets"][s]["shortfall_bootstrap"] = shortfall_interval(
                    np.c_[_neglog(P_neg), _neglog(neg)], np.c_[_neglog(P_pos[s]), _neglog(pos)])
        res["worst_shortfall"] = min(v["shortfall"] for v in res["sets"].values())
        rows[name] = res
    return {"members": members, "groups": [[members[i] for i in g] for g in groups], "best": best, "rows": rows}


def render(r: dict[str, Any]) -> str:
    out = ["# Combinations of the guard's p-values, on saved scores", "",
           f"`{r['command']}` — {r['cpu']}. Each member set calibrated as the guard does (conformal p-values with "
           "tails, 1% FPR from leave-one-out calibration p-values); AUROC against the clean evaluation split, "
           "flagged = share of the set at the combination's own threshold; Δ = AUROC minus the best single member's "
           "on that set (issue 16's target: ≥ −0.005 everywhere). See the module docstring for the combinations.", ""]
    for model in r["models"]:
        out += [f"## {model['file']}", ""]
        for st in model["studies"]:
            names = list(st["rows"])
            out += [f"### {st['label']}: {', '.join(st['members'])} (lenses: "
                    f"{' | '.join(', '.join(g) for g in st['groups'])})", "",
                    "| set | n | best member | " + " | ".join(names) + " | fisher Δ: 95% interval, share < −0.005 |",
                    "|---|---|---|" + "---|" * (len(names) + 1)]
            for s, b in st["best"].items():
                cells = [f"{st['rows'][n]['sets'][s]['auroc']:.3f} ({st['rows'][n]['sets'][s]['shortfall']:+.3f}), "
                         f"{100 * st['rows'][n]['sets'][s]['flagged']:.1f}%" for n in names]
                boot = st["rows"]["fisher"]["sets"][s]["shortfall_bootstrap"]
                cells.append(f"[{boot['ci95'][0]:+.3f}, {boot['ci95'][1]:+.3f}], {100 * boot['below_target']:.0f}%")
                out.append(f"| {s} | {b['n']} | {b['member']} {b['auroc']:.3f} | " + " | ".join(cells) + " |")
            out.append("| clean flagged | | | " + " | ".join(f"{100 * st['rows'][n]['clean_flagged']:.1f}%"
                                                              for n in names) + " | |")
            out.append("| **worst Δ** | | | " + " | ".join(f"**{st['rows'][n]['worst_shortfall']:+.3f}**"
                                                           for n in names) + " | |")
            out.append("")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("scores", nargs="+", help="npz files written by detect_converged.py --save-scores")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "fusion_study"))
    args = ap.parse_args()
    two = two_sided(ALL_ROWS)
    models = []
    for path in map(Path, args.scores):
        scores, preds = load_scores(path)
        have = set(scores["cal"])
        studies = [{"label": label, **study(scores, preds, members, extra, two, args.classes)}
                   for label, members, extra in STUDIES if set(members) <= have]
        models.append({"file": path.name, "studies": studies})
    record = {"command": "python bench/fusion_study.py " + " ".join(sys.argv[1:]), "cpu": cpu_name(), "fpr": FPR,
              "models": models}
    write_results(args.out, record, render(record), keep_notes=True)


if __name__ == "__main__":
    main()
