"""What an ABL run reports: isolation statistics, failure warnings, a human summary, and the isolation artifacts.

The isolation report adds precision / recall / AUROC when the poison indices are known (benchmarks, tests); the
failure warnings use only quantities available without ground truth, so a user training on data of unknown
provenance learns when ABL probably did not work (``docs/abl.md#failure-warnings``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from .config import ABLConfig
from .expansion import OFF_LABEL_SPACE, SCAN_METHOD
from .isolation import isolation_scores

log = logging.getLogger(__name__)


def rank_auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` (higher = more positive; ties count half); NaN with a single class."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    if n_pos == 0 or n_pos == len(positive):
        return float("nan")
    # AUROC depends on the order only: dense ranks keep order and ties, and let infinities / NaN (ranked last) through
    dense = np.unique(scores, return_inverse=True)[1].reshape(-1)
    return float(roc_auc_score(positive, dense))


def isolation_report(losses: np.ndarray, isolated: np.ndarray, labels: np.ndarray, pool: np.ndarray,
                     poison_indices: np.ndarray | None, cfg: ABLConfig,
                     scores: np.ndarray | None = None, candidates: np.ndarray | None = None) -> dict[str, Any]:
    """Statistics of the isolation at ``T_te``; precision / recall / AUROC when the ground truth is known.

    ``scores``: the ranked scores of every example (NaN outside ``pool``); computed from ``losses`` when omitted.
    ``candidates``: the lowest-scoring fraction ``p`` when ``isolated`` keeps only part of it
    (``isolation_labels="target"``); the label statistics describe the candidates, precision / recall ``isolated``.
    """
    candidates = isolated if candidates is None else np.asarray(candidates, np.int64)
    pool_losses = losses[pool]
    if scores is None:
        scores = np.full(len(losses), np.nan)
        scores[pool] = isolation_scores(pool_losses, labels[pool], cfg.isolation_score, cfg.isolation_reference)
    scores = np.asarray(scores, np.float64)
    rest = np.setdiff1d(pool, isolated)
    counts = np.bincount(labels[candidates], minlength=int(labels.max()) + 1)
    iso_med = float(np.median(losses[isolated]))
    rest_med = float(np.median(losses[rest])) if len(rest) else float("nan")
    loss_gap = float(np.log10(max(rest_med, 1e-12)) - np.log10(max(iso_med, 1e-12)))
    rep: dict[str, Any] = {
        "n_pool": int(len(pool)), "n_isolated": int(len(isolated)), "ratio": cfg.isolation_ratio,
        "lga": cfg.lga, "gamma": cfg.gamma, "epoch": cfg.isolation_epochs, "score": cfg.isolation_score,
        "cutoff_loss": float(losses[isolated].max()),
        "isolated_loss_median": iso_med, "rest_loss_median": rest_med,
        # how far below the bulk the isolated losses sit (orders of magnitude); large = a clear low-loss cluster
        "loss_gap_log10": loss_gap,
        # the same for the ranked score (orders of magnitude below the typical loss of the example's own label)
        "score_gap_log10": float((np.median(scores[rest]) - np.median(scores[isolated])) / np.log(10)
                                 if cfg.isolation_score == "class-relative" and len(rest) else loss_gap),
        "pool_loss_quantiles": {str(q): float(np.quantile(pool_losses, q)) for q in (0.01, 0.05, 0.1, 0.25, 0.5)},
        "isolated_label_counts": {str(i): int(c) for i, c in enumerate(counts) if c},
        "isolated_majority_label": int(counts.argmax()),
        "isolated_majority_fraction": float(counts.max() / max(1, len(candidates))),
        # candidates of other labels returned to the clean set (isolation_labels="target")
        "n_candidates": int(len(candidates)), "n_returned": int(len(candidates) - len(isolated)),
        "labels": cfg.isolation_labels,
    }
    if poison_indices is not None:
        rep.update(_ground_truth_stats(losses, scores, isolated, candidates, pool, poison_indices))
    return rep


def _ground_truth_stats(losses: np.ndarray, scores: np.ndarray, isolated: np.ndarray, candidates: np.ndarray,
                        pool: np.ndarray, poison_indices: np.ndarray) -> dict[str, Any]:
    """Precision / recall / AUROC of the isolation against the known poison indices."""
    pool_losses = losses[pool]
    poison = np.intersect1d(np.asarray(poison_indices, np.int64), pool)
    is_poison = np.isin(pool, poison)
    hits = int(np.isin(isolated, poison).sum())
    return {
        "n_poison_in_pool": int(len(poison)),
        "true_positives": hits,
        "precision": hits / max(1, len(isolated)),
        "candidate_precision": int(np.isin(candidates, poison).sum()) / max(1, len(candidates)),
        "recall": hits / len(poison) if len(poison) else float("nan"),
        # recall is capped by ratio * n_pool / n_poison: ABL isolates a fixed fraction, not every poison
        "max_recall": min(1.0, len(isolated) / len(poison)) if len(poison) else float("nan"),
        "auroc": rank_auroc(-scores[pool], is_poison),  # of the score used for the isolation
        "auroc_loss": rank_auroc(-pool_losses.astype(np.float64), is_poison),
        "poison_loss_median": float(np.median(losses[poison])) if len(poison) else float("nan"),
        "clean_loss_median": float(np.median(pool_losses[~is_poison])) if (~is_poison).any() else float("nan"),
    }


def expansion_report(exp: Any, removed: np.ndarray, poison_indices: np.ndarray | None,
                     pool: np.ndarray) -> dict[str, Any]:
    """The seed expansion's statistics (:func:`abl_guard.abl.expansion.expand_seed`), with precision / recall of
    everything removed, the poison it missed and the share of poison in a scan's core when the ground truth is
    known."""
    rep = {**exp.report, "n_removed": int(len(removed)), "n_pool": int(len(pool))}
    if poison_indices is not None:
        poison = np.intersect1d(np.asarray(poison_indices, np.int64), pool)
        hits = int(np.isin(removed, poison).sum())
        rep.update(n_poison_in_pool=int(len(poison)), removed_poison=hits, missed_poison=int(len(poison) - hits),
                   removed_clean=int(len(removed) - hits), precision=hits / max(1, len(removed)),
                   recall=hits / len(poison) if len(poison) else float("nan"))
        core = np.asarray(exp.core, np.int64)
        if len(core):  # what the final model is probed on (a scan's find)
            rep["core_precision"] = float(np.isin(core, poison).mean())
        row = next((r for r in exp.report.get("labels", []) if r.get("label") == exp.target), {})
        if row.get("count_excess", 0) > 0 and len(exp.scores) == len(exp.candidates) > 0:
            # how much of the poison the label's top-scoring k x its count excess holds (a count-matched find's cap)
            order = np.asarray(exp.candidates, np.int64)[np.argsort(-np.asarray(exp.scores), kind="stable")]
            rep["poison_at_count_excess"] = {
                str(k): [int(np.isin(order[: int(np.ceil(k * row["count_excess"]))], poison).sum()),
                         int(min(len(order), np.ceil(k * row["count_excess"])))] for k in (1.0, 1.25, 1.5, 2.0)}
        cells = np.asarray(exp.cells, np.int64)
        if len(cells) and len(cells) == len(exp.candidates):  # the off-label scan: each cell's size and poison
            bad = np.isin(np.asarray(exp.candidates, np.int64), poison)
            rep["cell_poison"] = {str(b): [int((cells == b).sum()), int((bad & (cells == b)).sum())]
                                  for b in np.unique(cells) if b != exp.target}
    return rep


#: the seed-probe rate at or below which a retrained model is judged free of the isolated backdoor
PROBE_CLEAN = 0.2
#: the held-out probe (:func:`held_out_probe`) at or above which the backdoor is judged to be still firing: every
#: stored removal (ASR <= 3.4%) read 0.05-0.28, the partial ones (ASR 19-29%) 0.33-0.51
#: (docs/abl.md#residual-unlearning)
HELD_OUT_FIRING = 0.3
#: binomial standard deviations by which the held-out split's count of the seed's label must fall short of the
#: removal's poison estimate for the removed population to be judged a clean sub-type (:func:`count_contradicts`)
COUNT_SHORTFALL_SD = 3.0
NOT_PROOF = (" (this is not proof of a clean model: a backdoor learned no faster than the clean data, too little "
             "poison for the isolation to single out, or clean-label poison the label scan misses, stays unseen)")


def held_out_excess(guard: dict[str, Any]) -> tuple[float, float] | None:
    """``(excess, sd)``: how many more examples of the suspected target label the held-out split holds than a clean
    class's share (``target_prior``, the other labels' median count) would give, and one binomial standard deviation
    of a clean class's count there. None without a split or a prior."""
    n, n_non, prior = guard.get("n_holdout", 0), guard.get("n_nontarget", 0), guard.get("target_prior")
    if not n or prior is None or not np.isfinite(prior):
        return None
    return float(n - n_non - prior * n), float(np.sqrt(n * prior * (1.0 - prior)))


def held_out_counts(y: np.ndarray, target: int) -> dict[str, Any]:
    """The held-out split's counts (labels ``y``) that :func:`held_out_excess` reads: ``n_holdout``, ``n_nontarget``
    and ``target_prior``, the other labels' median share (NaN without them)."""
    others = np.bincount(y[y != target]) if len(y) else np.zeros(0, np.int64)
    prior = float(np.median(others[others > 0]) / len(y)) if (others > 0).any() else float("nan")
    return {"n_holdout": int(len(y)), "n_nontarget": int((y != target).sum()), "target_prior": prior}


def held_out_shortfall(counts: dict[str, Any], exp: dict[str, Any], n_removed: int, n_pool: int,
                       min_excess: int = 10) -> float | None:
    """By how many sd the held-out split's excess of the label exceeds the poison a removal estimates
    (``estimated_poison``, at most ``n_removed``, scaled to the split): positive when the label holds more poison
    than the removal took. None without a split, or when the excess is under ``min_excess`` examples (as
    :func:`held_out_probe`: a split of a few dozen examples says nothing)."""
    got = held_out_excess(counts)
    if got is None or not n_pool or got[1] <= 0 or got[0] < min_excess:
        return None
    excess, sd = got
    expected = min(float(exp.get("estimated_poison", np.inf)), float(n_removed)) * counts["n_holdout"] / n_pool
    return float((excess - expected) / sd)


def held_out_probe(guard: dict[str, Any], min_excess: int = 10, expected_poison: float | None = None) -> float | None:
    """How much of the held-out split's excess of the suspected target label the final model predicts as that label.

    The held-out split is a random part of the (possibly poisoned) training data, so it holds its share of the poison,
    all labelled with the target: the target label's share ``s`` of it exceeds a clean class's share ``prior`` by about
    the poison's share. A clean model predicts the target for about ``prior`` of the held-out examples, a model whose
    backdoor still fires for about ``s``: the probe ``(target_rate - prior) / (s - prior)`` is near 0 for the first and
    near 1 for the second. None when the excess is under ``min_excess`` examples or under three binomial standard
    deviations of a clean class's count (``3 sqrt(n prior (1 - prior))``: on clean data a 1,200-example split drew 18
    more of one class than its share, and the probe read 0.94 — ``bench/results/abl_retrain_clean_data.md``), and None
    when ``expected_poison`` (the poisoned copies the removal's own estimate puts in the split,
    :func:`expected_held_out_poison`) is under that noise while the excess is under four sd: then an excess that
    passes is mostly clean examples of the label, which a clean model predicts as the label, and the probe reads
    0.5–0.7 on removed 1% backdoors; an excess of four sd or more says there is more poison than the removal
    estimated (WaNet 5%: 8 sd against an estimate of 2.5), and the probe is read
    (``docs/abl.md#the-held-out-probe-at-1-poison``).
    """
    counts, final = held_out_excess(guard), guard.get("final") or guard.get("baseline")
    if counts is None or final is None:
        return None
    excess, sd = counts
    if excess < max(min_excess, 3.0 * sd):
        return None
    if expected_poison is not None and expected_poison < 3.0 * sd and excess < 4.0 * sd:
        return None
    return float((final["target_rate"] - guard["target_prior"]) / (excess / guard["n_holdout"]))


def expected_held_out_poison(report: dict[str, Any]) -> float | None:
    """The poisoned copies the held-out split holds by the removal's own estimate: the expansion's estimated poison
    (at most what it removed) as a share of the training pool, times the split's size. None when nothing was
    removed (then the held-out probe is the only evidence and reads the observed excess alone)."""
    exp, guard = report.get("expansion", {}), report.get("unlearning", {}).get("guard", {})
    if not exp.get("expanded") or not exp.get("n_pool") or not guard.get("n_holdout"):
        return None
    est = min(float(exp.get("estimated_poison", np.inf)), float(exp["n_removed"]))
    return est * guard["n_holdout"] / exp["n_pool"]


def count_shortfall(report: dict[str, Any]) -> tuple[float, float, float] | None:
    """``(expected, excess, sd)`` when the removal claims more poison than its label's held-out count shows.

    All-to-one dirty-label poison adds its copies to the target label, so a random held-out split holds the removal's
    estimate of poisoned copies (:func:`expected_held_out_poison`) *on top of* a clean class's count. When the split's
    excess of the removal's label falls :data:`COUNT_SHORTFALL_SD` binomial sd or more short of that estimate, the
    removed population did not add to its label: a clean sub-type, or clean-label poison (images of the target class).
    Like the held-out probe it reads the other labels' median count as a clean class's share, so it assumes roughly
    balanced classes. None when nothing was removed, the held-out split's suspect is another label, or the counts
    agree."""
    exp, guard = report.get("expansion", {}), report.get("unlearning", {}).get("guard", {})
    if not exp.get("expanded") or guard.get("suspected_target") != exp.get("target"):
        return None
    expected, counts = expected_held_out_poison(report), held_out_excess(guard)
    if expected is None or counts is None or expected - counts[0] < COUNT_SHORTFALL_SD * counts[1]:
        return None
    return expected, counts[0], counts[1]


def count_contradicts(report: dict[str, Any]) -> tuple[float, float, float] | None:
    """:func:`count_shortfall` of a seed expansion capped at the max share (a large population: a clean sub-type, or
    much poison) after which the label scan found nothing: then the population is a clean sub-type (clean data seed
    1: 59 expected, 18 found, 4.0 sd short; every seed-path removal of a backdoor measured 0.5 sd short or better,
    ``docs/abl.md#the-count-check``). Clean-label poison, which adds nothing to its label either, is the scans' to
    find."""
    exp = report.get("expansion", {})
    if found_by_scan(exp) or not exp.get("capped") or "scan" not in exp:
        return None
    return count_shortfall(report)


def _clean_sub_type_line(report: dict[str, Any], target: Any) -> str | None:
    """The verdict's line when the label's held-out count calls the seed's capped expansion a clean sub-type — it
    claimed poison the count does not show (:func:`count_contradicts`), or was refused for it
    (:func:`refused_by_count`) — and no scan found another population; None otherwise."""
    if (short := count_contradicts(report)) is not None:
        return _count_line(short, target) + "so it is a clean sub-type, and the label scan found no other population"
    if (refused := refused_by_count(report)) is not None:
        return (f"the seed's capped expansion ({refused['n_capped_removal']} examples of label {target}) was refused: "
                f"the held-out split holds {refused['excess_sd']:.1f} sd of that label beyond a clean class's share "
                f"(need {refused['need_sd']:g}), so it is a clean sub-type, the seed a part of it, and the label scan "
                "found no other population")
    return None


def refused_by_count(report: dict[str, Any]) -> dict[str, Any] | None:
    """The ``capped_count`` record of a capped seed expansion that the count refused (only the seed removed, the
    outcome "nothing found"; ``--abl-expansion-capped-count-sd``), when no scan found anything instead: the
    refusal's reading is a clean sub-type, and the seed is part of it, so the seed probe (a clean model still calls
    clean examples by their label) says nothing (clean data seed 1, Intel Xeon, 2026-12-04: 587 sandals, 1.8 sd,
    ``bench/results/abl_retrain_clean_data_today_s1_intel.md``). None otherwise."""
    exp = report.get("expansion", {})
    rec = exp.get("capped_count")
    if found_by_scan(exp) or not isinstance(rec, dict) or rec.get("kept") is not False:
        return None
    return rec


def clean_label_find(report: dict[str, Any]) -> tuple[float, float, float] | None:
    """:func:`count_shortfall` of the input scan's find (:func:`abl_guard.abl.expansion.scan_inputs`): a
    fixed-pattern population that adds nothing to its label is clean-label poison (SIG 5%: 60 expected, 3 found;
    clean labels never split that far in raw pixels, ``docs/abl.md#input-space-label-scan``)."""
    return count_shortfall(report) if found_by_input_scan(report.get("expansion", {})) else None


def found_by_scan(exp: dict[str, Any]) -> bool:
    """Whether an expansion report is the label scan's find (:func:`abl_guard.abl.expansion.scan_labels`)."""
    return exp.get("method") == SCAN_METHOD and bool(exp.get("expanded"))


def found_by_input_scan(exp: dict[str, Any]) -> bool:
    """Whether an expansion report is the input-space scan's find (:func:`abl_guard.abl.expansion.scan_inputs`)."""
    return found_by_scan(exp) and exp.get("space") == "input"


def found_by_off_label_scan(exp: dict[str, Any]) -> bool:
    """Whether an expansion report is the off-label scan's find (:func:`abl_guard.abl.expansion.scan_off_label`)."""
    return found_by_scan(exp) and exp.get("space") == OFF_LABEL_SPACE


def _isolation_line(iso: dict[str, Any], share: float, target: Any) -> str:
    if iso.get("skipped"):
        return "isolation skipped: the scan of the raw inputs found a separate population before it"
    return (f"isolation after {iso.get('epoch', '?')} epoch(s): {share:.0%} of the lowest-scoring "
            f"{iso.get('n_candidates', '?')} examples carry label {target}")


def _count_line(short: tuple[float, float, float], target: Any) -> str:
    expected, excess, sd = short
    return (f"count check: the removal's estimate puts about {expected:.0f} poisoned copies of label {target} in the "
            f"held-out split, but it holds {excess:.0f} more of that label than a clean class's share "
            f"({(expected - excess) / sd:.1f} sd short): the removed population did not add to its label as all-to-one "
            "dirty-label poison does, ")


def expansion_evidence(exp: dict[str, Any]) -> str:
    """The verdict's line on what was removed: the input scan's, the label scan's or the seed's expansion."""
    mix = exp.get("mixture", {})
    if found_by_input_scan(exp):
        return (f"a scan of every label's raw inputs found a separate population of {mix['weight_seedlike']:.0%} of "
                f"label {exp['target']} (separation {mix['separation']:.1f}: a fixed-pattern trigger): "
                f"{exp['n_removed']} examples removed instead of the model-based outcome")
    if found_by_off_label_scan(exp):
        return (f"nothing separate grew from the isolated seed ({exp.get('seed', {}).get('reason', 'not expanded')}); "
                f"label {exp['target']} is confidently predicted as every other class (off-label floor "
                f"{exp['target_floor']}, the next label {exp['runner_up_floor']}: poison of every class the model has "
                f"not learned yet): its {exp['n_removed']} examples predicted as another class removed")
    if found_by_scan(exp):
        seed = exp.get("seed", {})
        why = (f"the isolated seed's expansion in label {seed.get('target')} was capped at the max share (a large "
               "population: a clean sub-type, or much poison)" if seed.get("expanded") else
               f"the isolated seed did not expand ({seed.get('reason', 'no second population')})")
        union = exp.get("union_with_seed")
        took = (f"{exp['n_removed']} examples removed instead" if not union else
                f"it and the capped expansion removed, {exp['n_removed']} examples, because the held-out split holds "
                f"{union['short_sd']:.1f} sd more of the label than the scan's find explains")
        row = next((r for r in exp.get("labels", []) if r.get("label") == exp["target"]), {})
        count = (f"; the label holds {row['count_excess']:.0f} more examples than the median label, about the "
                 "population's size (what all-to-one dirty-label poison adds)" if row.get("count_route") else "")
        return (f"{why}; a scan of every label found a separate population of {mix['weight_seedlike']:.0%} of label "
                f"{exp['target']} (separation {mix['separation']:.1f}{count}): {took}")
    if exp.get("expanded"):
        return (f"the seed of {exp['n_seed']} grew to {exp['n_removed']} removed examples of label {exp['target']} "
                f"({exp['n_target_label']} in the label; estimated poison "
                f"{exp.get('estimated_poison', float('nan')):.0f}, separation {mix['separation']:.1f})")
    return f"the seed was not expanded: {exp.get('reason', '')}"


def _residual_lines(un: dict[str, Any]) -> list[str]:
    """The evidence line of retrain mode's residual unlearning when it ran (``abl.py``'s ``_Stages._residual``)."""
    res = un.get("residual") or {}
    if not res.get("ran"):
        return []
    return [f"the retrained model still fired (held-out probe {res['held_out_probe_before']:.2f}), so the "
            f"{res['n_unlearned']} removed examples were unlearned from it: epoch {un.get('selected_epoch', 0)} of "
            f"{un.get('epochs_run', 0)} kept by the guard"]


def _recheck_lines(report: dict[str, Any]) -> list[str]:
    """The evidence line of retrain mode's clean-stage recheck when it ran (``abl.py``'s ``_Stages._recheck``): one
    clause per pass, a skipped pass with the mean that skipped it."""
    rec = report.get("recheck")
    if not rec:
        return []
    if rec.get("not_run") == "input-scan":
        return ["the clean-stage recheck did not run: the input scan found the population, and its finds missed no "
                "poison in any stored run, so the recheck could only remove clean examples"]
    if rec.get("not_run") == "distributed":
        return ["the clean-stage recheck did not run: it reads the whole training set in one process, and this run "
                "was distributed (torchrun)"]
    if rec.get("method") == "pixel":
        return _pixel_lines(rec) + _top_up_lines(rec)
    passes = rec.get("passes") or [rec]
    scale = rec.get("scale", 1.0)
    if len(passes) == 1 and not passes[0].get("skipped"):
        return [f"the clean-stage recheck after epoch {rec['epoch']} removed {rec['n_removed']} more of label "
                f"{rec['target']}'s {rec['n_target_label']} remaining examples (under its mean probability x "
                f"{scale:g}: {rec.get('threshold', float('nan')):.2f})"]
    parts = [f"after epoch {p['epoch']}: skipped, the label's mean probability {p.get('mean_probability', 0.0):.2f} "
             f"too low" if p.get("skipped") else
             f"after epoch {p['epoch']}: {p['n_removed']} of {p['n_target_label']} under "
             f"{p.get('threshold', float('nan')):.2f}" for p in passes]
    return [f"the clean-stage recheck removed {rec['n_removed']} more of label {rec['target']}'s examples (under its "
            f"mean probability x {scale:g}; " + "; ".join(parts) + ")"]


def _pixel_lines(rec: dict[str, Any]) -> list[str]:
    """The pixel-space recheck's evidence line: skipped, rejected (the positives are no one pattern) or its flags;
    ``n_removed`` less what the count top-up took (:func:`_top_up_lines`)."""
    first = (rec.get("passes") or [rec])[0]
    if first.get("skipped"):
        return [f"the pixel-space recheck after epoch {rec['epoch']} was skipped: too few positives "
                f"({rec.get('positives', 0)}) or other-label examples to train on"]
    if first.get("inconsistent"):
        return [f"the pixel-space recheck after epoch {rec['epoch']} flagged nothing: its classifier recalled "
                f"{first['positive_recall']:.0%} of the {first['validation']} positives it did not train on, so "
                "the removal is no one pattern to look for"]
    flagged = rec["n_removed"] - (rec.get("count_top_up") or {}).get("n_removed", 0)
    return [f"the pixel-space recheck after epoch {rec['epoch']} removed {flagged} more of label "
            f"{rec['target']}'s {rec['n_target_label']} remaining examples: a pixel CNN trained on "
            f"{rec.get('positives', 0)} removed examples ({rec.get('positive_rule', '?')} rule; the fresh model "
            f"called {rec.get('fresh_other_share', 0.0):.0%} of the removal another class) scored them above "
            f"the {100 * first.get('quantile', 0.995):.1f}% quantile of held-out other labels"
            + ("; the clean stage then started again from fresh weights" if rec.get("restarted") else "")]


def _top_up_lines(rec: dict[str, Any]) -> list[str]:
    """The count top-up's evidence line when it removed anything (``pixel_recheck.count_top_up``)."""
    top = rec.get("count_top_up") or {}
    if not top.get("n_removed"):
        return []
    return [f"after the recheck label {rec['target']} still held {top['excess']:.0f} more examples than the median "
            f"label ({top['excess'] / top['sd']:.1f} sd), so its {top['n_removed']} examples the fresh model placed "
            "least surely in it were removed too (the recheck's count top-up)"]


#: the caveat of a retrain-mode ``removed`` verdict: its probes cannot tell a partial removal from a whole one (WaNet
#: 10% runs that kept 7.5-15.6% ASR read held-out probes of -0.08 to 0.25, inside the whole removals' -0.32 to 0.28;
#: docs/abl.md#clean-stage-recheck)
PARTIAL_REMOVAL_LINE = ("a removal that missed part of the poison reads the same on both probes (WaNet 10%: runs that "
                        "kept 7.5-15.6% ASR read held-out probes of -0.08 to 0.25)")


def _recheck_hint(status: str, report: dict[str, Any], cfg: ABLConfig) -> list[str]:
    """A retrain-mode verdict of ``removed``: :data:`PARTIAL_REMOVAL_LINE`; of ``likely-present`` or ``removed``
    without the clean-stage recheck: the knob that may help, and its measured cost. Neither after an input-scan find,
    which missed no poison in any stored run and after which the recheck does not run."""
    exp = report.get("expansion", {})
    if not cfg.retrain or status not in ("likely-present", "removed") or found_by_input_scan(exp):
        return []
    caveat = [PARTIAL_REMOVAL_LINE] if status == "removed" else []
    if cfg.expansion_recheck_epoch or "recheck" in report:
        return caveat
    return caveat + [
        "poison the removal missed can teach a fresh model the backdoor again, and this run turned the clean-stage "
        "recheck off: the pixel-space recheck (the default: --abl-expansion-recheck-epoch 1 "
        "--abl-expansion-recheck-method pixel-restart) looks for more of what the removal took and trains the fresh "
        "model again without it (WaNet 3-10%, runs that had kept 4.3-19.0% ASR: 1.7-2.1% at CA -1.0 to +0.1 "
        "points; docs/abl.md#pixel-space-recheck)"]


def verdict(report: dict[str, Any], cfg: ABLConfig) -> dict[str, Any]:
    """Whether the backdoor is gone, with the evidence, from quantities available without ground truth.

    Two probes of the final model: the seed probe (how much of the isolated seed it still maps to the seed's label —
    a clean model predicts a triggered image's own content) and :func:`held_out_probe` (whether the held-out copies of
    the poison still fire). ``status``: ``likely-present`` when the held-out probe reaches :data:`HELD_OUT_FIRING`;
    otherwise ``not-found`` when the isolation never concentrated in one label and no seed expanded to a separate
    population of its label (no fast-learned all-to-one backdoor was seen), ``removed`` when the seed probe is at
    most :data:`PROBE_CLEAN` and the held-out probe was read (below the firing level), ``removed-unconfirmed`` when
    the seed probe is that low but the held-out probe cannot be read (at 1% poison: about 12 poisoned copies in 1,200),
    ``not-found`` also when a capped seed expansion claims poison its label's held-out count does not show
    (:func:`count_contradicts`: a clean sub-type) or was refused for it (:func:`refused_by_count`),
    ``removed-unconfirmed`` also when the input scan's find is such a
    population (:func:`clean_label_find`: clean-label poison), else ``likely-present`` (with a clean-label attack,
    whose poison really is of the target class, the seed probe cannot tell, and the evidence says so). When a label
    scan (not the seed) found the suspected poison, the target is the scanned label and the seed probe reads the
    scanned population's core.
    ``held_out_probe``: the probe's value, None when it was not read. Measured against the attack's ASR in
    ``docs/abl.md#retrain-mode-measured``.
    """
    iso = report.get("isolation", {})
    un = report.get("unlearning", {})
    exp = report.get("expansion", {})
    evidence: list[str] = []
    share = float(iso.get("isolated_majority_fraction", 0.0))
    target = iso.get("isolated_majority_label")
    evidence.append(_isolation_line(iso, share, target))
    scanned = found_by_scan(exp)
    if scanned:  # the label scan (not the seed) found the suspected target
        target = exp["target"]
    if exp:
        evidence.append(expansion_evidence(exp))
    probe = un.get("isolated_accuracy_after")
    if probe is not None:
        probed = "the scanned population's core" if scanned else "the isolated seed"
        evidence.append(f"the final model predicts label {target} for {probe:.0%} of {probed}")
    guard = un.get("guard", {})
    expected = expected_held_out_poison(report)
    held = held_out_probe(guard, expected_poison=expected)
    if held is None and expected is not None and held_out_probe(guard) is not None:
        evidence.append(f"held-out probe not read: the removal's estimate puts about {expected:.0f} poisoned copies "
                        f"in the {guard['n_holdout']} held-out examples, within the sampling noise of a class's count "
                        "there, so the label's excess in the split is mostly clean examples")
    if held is not None:
        evidence.append(f"held-out probe {held:.2f}: the final model predicts label {target} for "
                        f"{held:.0%} of the held-out split's excess of that label (0: a clean model, 1: the poison "
                        "still fires)")
    evidence += _residual_lines(un) + _recheck_lines(report)
    if held is not None and held >= HELD_OUT_FIRING:
        status = "likely-present"
    elif share < cfg.isolation_concentration and not exp.get("expanded"):
        status = "not-found"
        evidence.append("no label held the isolated examples: no fast-learned all-to-one backdoor was seen"
                        + NOT_PROOF)
    elif probe is not None and probe <= PROBE_CLEAN and held is not None:
        status = "removed"
    elif probe is not None and probe <= PROBE_CLEAN:
        status = "removed-unconfirmed"
        short = clean_label_find(report)
        evidence.append("the held-out split cannot confirm it: " + (
            _count_line(short, target) + "so it is clean-label poison, whose held-out copies carry their own label"
            if short is not None else
            "too few poisoned copies are held out to read whether they still fire, and a backdoor left partly in place "
            "can read the same on the probe above (Trojan 1%: ASR 30.7%, probe 14%)"))
    elif (sub_type := _clean_sub_type_line(report, target)) is not None:
        status = "not-found"
        evidence.append(sub_type + NOT_PROOF)
    elif (short := clean_label_find(report)) is not None:
        status = "removed-unconfirmed"
        evidence.append(_count_line(short, target) + "so the removed fixed-pattern population is clean-label poison "
                        "(images of the target class, which a clean model still calls the target): no probe can tell "
                        "whether any of it left behind still fires")
    else:
        status = "likely-present"
        evidence.append("a clean model predicts a triggered image's own content; if the poison is clean-label (images "
                        "of the target class) this probe cannot tell")
    evidence += _recheck_hint(status, report, cfg)
    return {"status": status, "target": target, "evidence": evidence, "held_out_probe": held}


#: the label scan's qualifying labels from which a run warns: at most 1 in 241 stored scans of the small CNN on
#: 20,000-60,000 images, 6-7 with PreAct-ResNet-18 on 5,000 (``docs/abl.md#failure-warnings``)
SCAN_MANY_QUALIFYING = 3


def failure_warnings(report: dict[str, Any], cfg: ABLConfig) -> list[str]:
    """Evidence that ABL likely failed, from quantities available without ground truth.

    Thresholds come from measured successful BadNets runs versus clean data (``docs/abl.md#failure-warnings``).
    """
    out: list[str] = []
    iso = report.get("isolation", {})
    if iso.get("skipped"):  # no isolation epoch ran (the input scan found the poison first): nothing to judge there
        iso = {}
    un = report.get("unlearning", {})
    gap = iso.get("score_gap_log10", iso.get("loss_gap_log10", float("inf")))
    if gap < 1.0:
        out.append(f"isolation loss gap is small ({gap:.2f} orders of magnitude between the isolated examples and "
                   f"the rest, {iso.get('score', 'loss')} score): "
                   "no clearly fast-learned cluster, so the isolated set may be mostly clean examples "
                   "(clean data, a slow-learned trigger, or a poisoning rate below the isolation ratio)")
    if iso and iso.get("isolated_majority_fraction", 1.0) < 0.5:
        out.append(f"the isolated examples spread over several labels (majority {iso['isolated_majority_fraction']:.0%}"
                   "): an all-to-one backdoor would concentrate them on its target class")
    after = un.get("isolated_accuracy_after")
    if after is not None and after > 0.2 and cfg.unlearning_epochs > 0:
        out.append(f"after unlearning the model still predicts the isolated examples' labels {after:.0%} of the time "
                   "(ASR probe on the isolated set): the backdoor link is probably not broken")
    if un.get("epochs_run") and un.get("guard", {}).get("enabled") and not un.get("selected_epoch"):
        allowed = un["guard"].get("max_ca_drop", cfg.max_ca_drop)  # the stage's own (residual unlearning: its own)
        out.append(f"no unlearning epoch passed the clean-accuracy guard (drop > {allowed:.3f} in all "
                   f"{un['epochs_run']}), so the model is the one before unlearning: unlearning the isolated set "
                   "costs clean accuracy here (the isolated set holds clean examples, the unlearning lr is too high, "
                   "or the model's backdoor and clean features are entangled); the backdoor is probably still in "
                   "place")
    scan = report.get("expansion") or {}  # a label scan's find records its qualifying labels
    many = scan.get("qualifying") or []
    if len(many) >= SCAN_MANY_QUALIFYING:
        out.append(f"the label scan qualified {len(many)} labels ({', '.join(map(str, many))}): an all-to-one "
                   "backdoor sets one label apart, so its routes do not separate poison from clean sub-types at this "
                   "data size and feature width (wide features, a few hundred examples per label), and its find "
                   f"(label {scan.get('target')}) may be a clean population (docs/abl.md#failure-warnings)")
    if "precision" in iso and iso["precision"] < 0.5:
        out.append(f"isolation precision is {iso['precision']:.0%} against the known poison indices")
    return out


def _stage_line(name: str, s: dict[str, Any], skipped: bool) -> str:
    if name == "isolation" and skipped:
        return f"{name:>10}: skipped (the input scan found a separate population first)"
    parts = [f"{name:>10}:"]
    if "clean_accuracy" in s:
        parts.append(f"CA {100 * s['clean_accuracy']:.2f}%")
    if "attack_success_rate" in s:
        parts.append(f"ASR {100 * s['attack_success_rate']:.2f}%")
    parts.append(f"({s.get('seconds', 0.0):.0f}s)")
    return " ".join(parts)


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A short human summary of an ABL report (for the CLI)."""
    skipped = bool(report.get("isolation", {}).get("skipped"))
    lines = [_stage_line(name, s, skipped) for name in ("isolation", "clean", "unlearning")
             if (s := report.get("stages", {}).get(name)) is not None]
    continued = report.get("clean_stage", {})
    if continued.get("continued"):
        why = ("--abl-restart never" if report.get("config", {}).get("restart") == "never"
               else "nothing found beyond the seed")
        lines.append(f"     clean: continued the isolation model from epoch {continued['from_epoch']} ({why}, so no "
                     "fresh start)")
    iso = report.get("isolation", {})
    if iso and not skipped:
        msg = (f"isolated {iso['n_isolated']} of {iso['n_pool']} (majority label {iso['isolated_majority_label']}, "
               f"{iso['isolated_majority_fraction']:.0%}; loss gap {iso['loss_gap_log10']:.1f} decades)")
        if iso.get("n_returned"):
            msg += (f"; {iso['n_returned']} of the {iso['n_candidates']} lowest-scoring examples had another label "
                    "and went back to the clean set")
        if "precision" in iso:
            msg += f"; precision {100 * iso['precision']:.1f}%, recall {100 * iso['recall']:.1f}%"
        lines.append(msg)
    un = report.get("unlearning", {})
    if un:
        rejected = un.get("rejected_epochs", [])
        lines.append(f"unlearning: {un.get('epochs_run', 0)} epoch(s), kept epoch {un.get('selected_epoch', 0)}"
                     + (f" (epochs {rejected} rejected by the CA guard)" if rejected else "")
                     + f"; isolated-set accuracy {100 * un.get('isolated_accuracy_before', float('nan')):.1f}% -> "
                       f"{100 * un.get('isolated_accuracy_after', float('nan')):.1f}%")
    exp = report.get("expansion", {})
    if exp:
        how = (f"off-label scan: floor {exp['target_floor']}, next label {exp['runner_up_floor']}"
               if found_by_off_label_scan(exp) else
               f"{'input ' if found_by_input_scan(exp) else ''}label scan: a population of "
               f"{exp['mixture']['weight_seedlike']:.0%} of the label" if found_by_scan(exp) else
               f"seed {exp.get('n_seed', 0)}, expanded {exp.get('n_expanded', 0)}")
        msg = (f" expansion ({exp.get('method', 'classifier')}): removed {exp.get('n_removed', 0)} examples of label "
               f"{exp.get('target')} ({how}{', capped at the max share' if exp.get('capped') else ''})")
        if "recall" in exp:
            msg += (f"; poison recall {100 * exp['recall']:.2f}% ({exp['missed_poison']} missed), "
                    f"{exp['removed_clean']} clean removed")
        lines.append(msg)
    v = report.get("verdict")
    if v:
        lines.append(f"   verdict: backdoor {v['status']} (target {v['target']})")
        lines += [f"            - {e}" for e in v["evidence"]]
    lines += [f"WARNING: {w}" for w in report.get("warnings", [])]
    return lines


def write_isolation_artifacts(out: Path | None, images: np.ndarray, labels: np.ndarray, losses: np.ndarray,
                              scores: np.ndarray, isolated: np.ndarray, pool: np.ndarray,
                              poison_indices: np.ndarray | None,
                              report: dict[str, Any]) -> None:
    """Write the isolated set (indices, CSV, losses, scores) and its plots to ``out``; list them in the report."""
    if out is None:
        return
    files = report["files"]
    np.save(out / "isolated_indices.npy", isolated.astype(np.int64))
    np.save(out / "isolation_losses.npy", losses.astype(np.float32))
    np.save(out / "isolation_scores.npy", scores.astype(np.float32))
    with open(out / "isolated.csv", "w") as f:
        f.write("rank,index,label,loss,score\n")
        for r, i in enumerate(isolated):
            f.write(f"{r},{int(i)},{int(labels[i])},{float(losses[i]):.6g},{float(scores[i]):.6g}\n")
    files.update({"isolated_indices": "isolated_indices.npy", "isolated_csv": "isolated.csv",
                  "isolation_losses": "isolation_losses.npy", "isolation_scores": "isolation_scores.npy"})
    try:
        from .abl_plots import isolated_grid_png, loss_histogram_png

        relative = report.get("isolation", {}).get("score") == "class-relative"
        loss_histogram_png(out / "isolation_hist.png", losses, pool, isolated, poison_indices,
                           scores=scores if relative else None)
        isolated_grid_png(out / "isolated_grid.png", images[isolated], labels[isolated])
        files.update({"loss_histogram": "isolation_hist.png", "isolated_grid": "isolated_grid.png"})
    except ImportError as e:  # matplotlib is a declared dependency; keep training if a minimal install lacks it
        log.warning("ABL: could not write the isolation plots (%s)", e)
