"""Seed expansion: from ABL's small, high-precision isolated set to the rest of the poison (not in the paper).

ABL's isolation (Li et al., NeurIPS 2021) finds the fastest-learned examples; on converged models the lowest-scoring
fraction of the target label is nearly pure poison but holds only part of it (``docs/abl.md#retrain-mode``). Every
poisoned example carries the same trigger, so in the features of the model that has just learned it the poison is one
population of the target label and the clean examples another. :func:`expand_seed` scores every example of the
target label, splits the scores with a two-component Gaussian mixture, and marks as poison every example whose
posterior of the seed-like component reaches ``min_posterior``. A small ``min_posterior`` removes some clean examples
of the target class to miss less poison: a missed poisoned example can reinstall the backdoor when the model is
retrained (46 of 5,900 kept a 19% attack success), a removed clean one costs little.

Two scores (``method``):

* ``spectral`` (default): the spectral signature of Tran, Li & Madry (NeurIPS 2018) — the projection of the target
  label's centred features on their top singular direction — on the pooled output of the last convolutional block
  (:func:`pooled_features`), signed so that the seed scores high. Unsupervised apart from that sign, so the split does
  not inherit the seed's bias towards the easiest poison. Tran et al. use the squared projection on a converged model
  and remove 1.5 times the expected poison; here the signed projection on the isolation-stage model, split by the
  mixture — measured in ``bench/results/abl_retrain_*spectral*``.
* ``classifier``: positive-unlabelled learning (Elkan & Noto, KDD 2008) — a cross-fitted logistic regression seed vs
  the rest of the label on the penultimate features (:func:`penultimate_features`), refitted ``rounds - 1`` times
  with the previous round's seed-like component as positives. Misses more poison on Blend and Trojan (the seed is
  the easiest poison, and the classifier learns what makes it easy: ``docs/abl.md#seed-expansion``).

When the two components are not separated (Ashman's D below ``min_separation``) there is no evidence of a second
population, and when the seed-like one is most of the label (its mixture weight over ``max_share``; 10% all-to-one
poisoning of a balanced 10-class set makes about 47% of the target label poison) it is more likely a sub-type of a
clean class: in both cases only the seed is removed and the report says why. Otherwise at most ``max_share`` of the
label is removed — the highest scores, when the conservative posterior would take more (``report["capped"]``).
Pure numpy / scikit-learn on feature arrays; the feature extractors are the only torch functions here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import EXPANSION_METHODS

log = logging.getLogger(__name__)

#: ``report["method"]`` of an :class:`Expansion` found by :func:`scan_labels` rather than grown from the seed
SCAN_METHOD = "spectral-scan"


@dataclass
class Expansion:
    """The outcome of :func:`expand_seed`; indices are dataset positions."""

    removed: np.ndarray  # the seed plus every expanded example, sorted
    target: int  # the seed's majority label (the suspected target class)
    candidates: np.ndarray  # the examples of the target label that were scored (not the seed), sorted
    scores: np.ndarray  # seed-like scores (spectral projection or out-of-fold log-odds), aligned with ``candidates``
    posterior: np.ndarray  # posterior of the seed-like mixture component, aligned with ``candidates``
    report: dict[str, Any] = field(default_factory=dict)
    #: the examples most likely poison (posterior >= 0.5; :func:`scan_labels` only): what the final model is probed on
    core: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    #: the confident class of each candidate, -1 for none (:func:`scan_off_label` only): its cells, for the report
    cells: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def ashman_d(m1: float, s1: float, m2: float, s2: float) -> float:
    """Ashman's D, the separation of two Gaussian components (> 2: clearly bimodal)."""
    return float(np.sqrt(2.0) * abs(m1 - m2) / np.sqrt(s1 ** 2 + s2 ** 2 + 1e-12))


def _out_of_fold_scores(x: np.ndarray, y: np.ndarray, folds: int, seed: int, c: float) -> np.ndarray:
    """Decision scores of a logistic regression ``y`` vs not-``y``, each row scored by a fit that did not see it."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    folds = int(min(folds, y.sum(), (~y).sum()))
    if folds < 2:
        raise ValueError("seed expansion needs at least 2 seed and 2 other examples of the target label")
    out = np.zeros(len(y), np.float64)
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        clf = LogisticRegression(C=c, max_iter=3000, class_weight="balanced")
        clf.fit(x[train], y[train])
        out[test] = clf.decision_function(x[test])
    return out


def _two_components(scores: np.ndarray, seed: int) -> tuple[np.ndarray, dict[str, float]]:
    """Posterior of the higher-mean component of a 1-D two-component Gaussian mixture, and the mixture's summary."""
    from sklearn.mixture import GaussianMixture

    gm = GaussianMixture(2, random_state=seed).fit(scores[:, None])
    means = gm.means_.ravel()
    sds = np.sqrt(gm.covariances_.ravel())
    hi = int(np.argmax(means))
    lo = 1 - hi
    post = gm.predict_proba(scores[:, None])[:, hi]
    return post, {"mean_seedlike": float(means[hi]), "mean_other": float(means[lo]), "sd_seedlike": float(sds[hi]),
                  "sd_other": float(sds[lo]), "weight_seedlike": float(gm.weights_[hi]),
                  "separation": ashman_d(means[hi], sds[hi], means[lo], sds[lo])}


def target_examples(labels: np.ndarray, seed_idx: np.ndarray, pool: np.ndarray) -> tuple[int, np.ndarray]:
    """The seed's majority label (the suspected target) and the ``pool`` examples that carry it."""
    labels = np.asarray(labels)
    target = int(np.bincount(labels[np.asarray(seed_idx, np.int64)]).argmax())
    pool = np.asarray(pool, np.int64)
    return target, pool[labels[pool] == target]


def spectral_scores(x: np.ndarray, seed_mask: np.ndarray) -> np.ndarray:
    """Tran et al.'s spectral signature, signed: each row of ``x`` (one label's features), centred, projected on the
    top right singular vector of the centred matrix; the sign makes the seed's (``seed_mask``) median the higher."""
    s = _top_projection(x)
    return -s if np.median(s[seed_mask]) < np.median(s[~seed_mask]) else s


def _top_projection(x: np.ndarray) -> np.ndarray:
    """The rows of ``x``, centred, projected on the top right singular vector of the centred matrix (unsigned)."""
    xc = np.asarray(x, np.float64)
    xc = xc - xc.mean(0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    return xc @ vt[0]


def _keep(post: np.ndarray, scores: np.ndarray, min_posterior: float, max_share: float) -> tuple[np.ndarray, bool]:
    """Which scored examples to remove: posterior >= ``min_posterior``, or — when that would be more than
    ``max_share`` of them — the ``max_share`` with the highest scores; and whether that cap applied."""
    keep = post >= min_posterior
    cap = int(np.floor(max_share * len(post)))
    if keep.sum() <= cap:
        return keep, False
    keep = np.zeros(len(post), bool)
    keep[np.argsort(-scores, kind="stable")[:cap]] = True
    return keep, True


def _classifier_scores(x: np.ndarray, y: np.ndarray, rounds: int, folds: int, random_state: int, c: float
                       ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """The ``classifier`` method: out-of-fold seed-vs-rest scores of standardised ``x``, self-trained ``rounds - 1``
    times; returns ``(scores of every row, posterior of the non-seed rows, mixture summary)``."""
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    scores_all = _out_of_fold_scores(x, y, folds, random_state, c)  # round 1: the seed vs the rest
    post, mix = _two_components(scores_all[~y], random_state)
    for _ in range(rounds - 1):  # then: the seed and the rest's seed-like component vs the other component
        positive = y.copy()
        positive[~y] = post >= 0.5
        if positive.sum() - y.sum() < 2 or (~positive).sum() < 2:
            break
        scores_all = _out_of_fold_scores(x, positive, folds, random_state, c)
        post, mix = _two_components(scores_all[~y], random_state)
    return scores_all, post, mix


def expand_seed(features: np.ndarray, labels: np.ndarray, seed_idx: np.ndarray, pool: np.ndarray, *,
                method: str = "spectral", min_posterior: float = 0.01, min_separation: float = 2.0,
                max_share: float = 0.6, rounds: int = 2, folds: int = 5,
                c: float = 0.01, random_state: int = 0) -> Expansion:
    """Grow the isolated ``seed_idx`` to every example of its label that looks like it (see the module docstring).

    ``features``: one row per dataset example (at least every example of ``pool``): :func:`pooled_features` for
    ``method="spectral"``, :func:`penultimate_features` for ``"classifier"``; ``labels``: the dataset's labels;
    ``pool``: the dataset indices that may be removed (the training pool, not the held-out split). ``rounds``, ``folds``
    and ``c`` are the classifier's: ``rounds > 1`` refits it with the previous round's seed-like component as
    positives (self-training), which sharpens the split when the seed is small.
    """
    if method not in EXPANSION_METHODS:
        raise ValueError(f"unknown expansion method {method!r}; choose from {EXPANSION_METHODS}")
    labels = np.asarray(labels)
    seed_idx = np.asarray(seed_idx, np.int64)
    if len(seed_idx) == 0:
        raise ValueError("seed expansion needs a non-empty seed")
    if not 0.0 < min_posterior < 1.0:
        raise ValueError(f"min_posterior must be in (0, 1), got {min_posterior}")
    target, in_target = target_examples(labels, seed_idx, pool)
    seed_t = np.intersect1d(seed_idx, in_target)
    cand = np.setdiff1d(in_target, seed_t)
    report: dict[str, Any] = {"target": target, "n_seed": int(len(seed_t)), "n_target_label": int(len(in_target)),
                              "method": method, "min_posterior": min_posterior, "min_separation": min_separation}
    if len(seed_t) < 2 or len(cand) < 2:
        report.update(expanded=False, reason="too few examples to compare", n_expanded=0)
        return Expansion(np.sort(seed_idx), target, cand, np.zeros(len(cand)), np.zeros(len(cand)), report)
    x = np.asarray(features, np.float64)[in_target]
    y = np.isin(in_target, seed_t)
    if method == "spectral":
        scores_all = spectral_scores(x, y)
        post, mix = _two_components(scores_all[~y], random_state)
    else:
        scores_all, post, mix = _classifier_scores(x, y, rounds, folds, random_state, c)
    scores = scores_all[~y]
    report["mixture"] = mix
    report["seed_score_median"] = float(np.median(scores_all[y]))
    if mix["separation"] < min_separation:
        report.update(expanded=False, n_expanded=0,
                      reason=f"no second population in the target label (separation {mix['separation']:.2f} < "
                             f"{min_separation:g})")
        log.info("seed expansion: %s", report["reason"])
        return Expansion(np.sort(seed_idx), target, cand, scores, post, report)
    weight = mix["weight_seedlike"]
    if weight > max_share:
        report.update(expanded=False, n_expanded=0,
                      reason=f"the seed-like population is {weight:.0%} of label {target} (more than "
                             f"{max_share:.0%}): more likely a sub-type of a clean class than poison")
        log.info("seed expansion: %s", report["reason"])
        return Expansion(np.sort(seed_idx), target, cand, scores, post, report)
    # the conservative posterior may take most of the label: then the highest scores only
    keep, report["capped"] = _keep(post, scores, min_posterior, max_share)
    expanded = cand[keep]
    report["expanded_share"] = float(len(expanded) / len(cand))
    removed = np.union1d(seed_idx, expanded)
    report.update(expanded=True, n_expanded=int(len(expanded)), n_removed=int(len(removed)),
                  estimated_poison=float(len(seed_t) + post.sum()))
    log.info("seed expansion: %d seed + %d expanded of %d in label %d (separation %.2f)", len(seed_t),
             len(expanded), len(in_target), target, mix["separation"])
    return Expansion(removed, target, cand, scores, post, report)


def _oriented_split(x: np.ndarray, random_state: int) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """One label's spectral projection (centred ``x`` on its top right singular vector), signed so that the smaller
    mixture component is the higher one; returns ``(scores, posterior of that component, mixture summary)``."""
    s, post, mix, _ = _oriented_split_of(_top_projection(x), random_state)
    return s, post, mix


def _oriented_split_of(s: np.ndarray, random_state: int) -> tuple[np.ndarray, np.ndarray, dict[str, float], float]:
    """1-D scores ``s`` split by a two-component mixture, signed so that the smaller component is the higher one;
    also returns the sign applied (+1 or -1)."""
    post, mix = _two_components(s, random_state)
    if mix["weight_seedlike"] <= 0.5:
        return s, post, mix, 1.0
    post, mix = _two_components(-s, random_state)
    return -s, post, mix, -1.0


def _contrastive_directions(feats: np.ndarray, labels: np.ndarray, pool: np.ndarray, label_set: np.ndarray,
                            ridge: float) -> dict[int, tuple[np.ndarray, float]]:
    """Per label: the top generalised eigenvector of (its covariance, the pooled within-class covariance of the
    *other* labels + ``ridge`` x its mean eigenvalue) and that eigenvalue (the variance ratio)."""
    from scipy.linalg import eigh

    d = feats.shape[1]

    def scatter(y: int) -> np.ndarray:
        x = feats[pool[labels[pool] == y]]
        xc = x - x.mean(0)
        return xc.T @ xc

    # two passes (the total, then each label's own again) so that only a few d x d matrices are held at once: with
    # raw 32x32x3 inputs (d = 3,072) and 43 labels, one per label would take 3 GB
    total: Any = 0
    dof = {}
    for y in label_set:
        total = total + scatter(int(y))
        dof[int(y)] = int((labels[pool] == y).sum()) - 1
    total_dof = sum(dof.values())
    out = {}
    for y in dof:
        own = scatter(y)
        others = (total - own) / max(total_dof - dof[y], 1)
        ref = others + ridge * max(float(np.trace(others)) / d, 1e-12) * np.eye(d)
        lam, vec = eigh(own / max(dof[y], 1), ref, subset_by_index=[d - 1, d - 1])
        out[y] = (vec[:, 0], float(lam[0]))
    return out


def _away_from_others(s: np.ndarray, post: np.ndarray, others: np.ndarray) -> np.ndarray:
    """The posterior of whichever mixture component lies farther from the other labels' median projection (a
    population that is not what the other labels look like along this direction)."""
    a = post >= 0.5
    if a.any() and (~a).any():
        ref = float(np.median(others))
        if abs(float(np.median(s[a])) - ref) < abs(float(np.median(s[~a])) - ref):
            return 1.0 - post
    return post


#: how far, as a factor either way, a suspect component's size may be from its label's count excess to qualify it
COUNT_BAND = 1.5
#: the largest ratio of the other labels' largest to smallest count under which label counts are read at all
COUNT_BALANCE = 1.2
#: a count-matched find removes at most this many times its label's count excess (the highest scores)
COUNT_REMOVE = 1.25
#: the contrastive scan reads a label's variance ratio only when the label holds at least this many examples per
#: feature dimension: below about one, its covariance is singular and the ratio along its own span is unbounded
#: (clean labels of PreAct-ResNet-18, 512 features from ~450 examples: 115-16,264); the small CNN's scans had 39 or more
RATIO_MIN_PER_DIM = 2.0


def label_excess(sizes: Mapping[int, int], label: int) -> tuple[float, float, bool] | None:
    """``(excess, sd, balanced)`` of ``label`` against the other labels' ``sizes``: how many more examples it holds
    than the median label, the Poisson sd of a label's count (the square root of that median), and whether the other
    labels are balanced (:data:`COUNT_BALANCE`). None when fewer than two other labels, or an empty one, leave no
    median to read — all-to-one poison adds its copies to one label, which this reads on balanced data."""
    others = [n for y, n in sizes.items() if y != label]
    if len(others) < 2 or min(others) <= 0:
        return None
    median = float(np.median(list(sizes.values())))
    return float(sizes[label] - median), float(np.sqrt(median)), max(others) / min(others) <= COUNT_BALANCE


def _count_match(sizes: dict[int, int], label: int, minority: float, min_sd: float) -> tuple[float, bool]:
    """``(excess, match)``: :func:`label_excess`'s excess, and whether it is at least ``min_sd`` sd, the other labels
    are balanced and ``minority`` (the suspect component's size) is within :data:`COUNT_BAND` x of it."""
    read = label_excess(sizes, label)
    if read is None:
        return 0.0, False
    excess, sd, balanced = read
    match = (balanced and excess >= min_sd * sd and excess > 0
             and 1.0 / COUNT_BAND <= minority / excess <= COUNT_BAND)
    return excess, bool(match)


def scan_labels(features: np.ndarray, labels: np.ndarray, pool: np.ndarray, *, max_weight: float = 0.2,
                min_separation: float = 2.0, min_posterior: float = 0.01, max_share: float = 0.6,
                random_state: int = 0, method: str = "spectral", min_ratio: float = 100.0,
                ridge: float = 1e-3, min_wide_separation: float = 5.0, min_minority: float = 0.0,
                min_minority_count: int = 0, min_count_sd: float = 0.0) -> Expansion:
    """Look in every label of ``pool`` for a small population set apart from the rest; remove the clearest one.

    The fallback when the isolated seed did not expand or its expansion was capped (at 1% poison the loss-based
    isolation singles out an easy clean class, not the poison): per label, the spectral projection of its features
    (Tran et al.'s use, every label), split by a two-component mixture and oriented so that the smaller component
    scores high. A label qualifies when that component is at most ``max_weight`` of it and the two are at least
    ``min_separation`` apart (Ashman's D); among qualifying labels the best separated is the suspected target, and
    its examples whose posterior of the small component reaches ``min_posterior`` are removed (at most ``max_share``
    of the label, the highest scores). ``max_weight`` is the deviation that separates poison from clean sub-types:
    on isolation-stage models the 1% poison was 7-14% of its label, the smaller component of every clean label's
    split 25% or more (``docs/abl.md#label-scan``). ``report["labels"]`` holds every label's split.

    ``method="contrastive"`` (not in Tran et al.) projects each label on the direction along which it varies most
    *relative to the other labels' pooled within-class covariance* (the top generalised eigenvector; ``ridge``
    regularises the reference), so that ordinary clean sub-type variation — which every label has — no longer
    dominates the split; under an all-to-one attack the other labels are poison-free. The suspect component is the
    one farther from the other labels' median projection, a label also qualifies when its variance ratio reaches
    ``min_ratio`` (5-10% poison is too large a share of its label for ``max_weight``), and the qualifying label with
    the largest ratio is chosen. ``min_ratio`` = 100 was set on 15 saved isolation-stage models (clean labels <= 66,
    5-10% poison 122-362), measured in ``docs/abl.md#contrastive-label-scan``; the ratio is read only for a label of at
    least :data:`RATIO_MIN_PER_DIM` examples per feature dimension (``docs/abl.md#failure-warnings``: wide features on
    a few hundred examples per label gave clean labels ratios of 115-16,264). A label also qualifies, whatever the
    share, when its two components are ``min_wide_separation`` apart (clean labels' contrastive splits reached D 4.0
    at most, Trojan 5% poison 6.8 at a variance ratio of 75: ``docs/abl.md#wide-separation-route``). A label whose
    suspect component holds under ``min_minority`` of it or under ``min_minority_count`` examples never qualifies (a
    handful of outliers can sit far from the rest).

    With ``min_count_sd`` > 0 (contrastive only; not in Tran et al.) a label also qualifies, whatever the share, when
    it holds at least ``min_count_sd`` sd (the square root of the median label's count) more examples than the median
    label, its suspect component's size is within :data:`COUNT_BAND` x of that excess and its two components are
    ``min_separation`` apart: all-to-one dirty-label poison adds its copies to its label, and at 5% it is a third of
    the label, beyond ``max_weight``; such a find removes at most :data:`COUNT_REMOVE` x the excess, the highest
    projections, and gives the excess as its poison estimate. Only when every other label's count is within
    :data:`COUNT_BALANCE` of each other (the balanced classes the count check also assumes); measured in
    ``docs/abl.md#count-matched-route``. A label qualifying by its count outranks every label that qualifies by its
    split alone: on 5,000 images and PreAct-ResNet-18 features five clean labels reached variance ratios of 232-1,389
    and the largest was chosen over the poisoned label's count excess of 584 (``docs/abl.md#count-matched-route``).
    """
    labels = np.asarray(labels)
    pool = np.asarray(pool, np.int64)
    feats = np.asarray(features, np.float64)
    label_set = np.array([y for y in np.unique(labels[pool]) if (labels[pool] == y).sum() >= 10])
    directions = _contrastive_directions(feats, labels, pool, label_set, ridge) if method == "contrastive" else {}
    sizes = {int(y): int((labels[pool] == y).sum()) for y in label_set}
    rows: list[dict[str, Any]] = []
    qualifying: list[int] = []
    found: list[tuple[bool, float, int, np.ndarray, np.ndarray, np.ndarray, dict[str, float]]] = []
    for y in label_set:
        idx = pool[labels[pool] == y]
        row: dict[str, Any] = {"label": int(y), "n": int(len(idx))}
        counted = False  # qualifies by the count-matched route
        if method == "contrastive":
            u, ratio = directions[int(y)]
            mu = feats[idx].mean(0)
            s, post, mix, sign = _oriented_split_of((feats[idx] - mu) @ u, random_state)
            others = sign * (feats[pool[labels[pool] != y]] @ u - mu @ u)
            post = _away_from_others(s, post, others)
            row["ratio"] = float(round(ratio, 2))
            ratio_read = len(idx) >= RATIO_MIN_PER_DIM * feats.shape[1]
            if not ratio_read:
                row["ratio_read"] = False
            ok = ((mix["weight_seedlike"] <= max_weight and mix["separation"] >= min_separation)
                  or (ratio_read and ratio >= min_ratio) or mix["separation"] >= min_wide_separation)
            if min_count_sd > 0:
                excess, by_count = _count_match(sizes, int(y), mix["weight_seedlike"] * len(idx), min_count_sd)
                row.update(count_excess=float(round(excess, 1)), count_route=bool(by_count))
                counted = by_count and mix["separation"] >= min_separation
                ok = ok or counted
            key = ratio
        else:
            s, post, mix = _oriented_split(feats[idx], random_state)
            ok = mix["weight_seedlike"] <= max_weight and mix["separation"] >= min_separation
            key = mix["separation"]
        row.update(minority=float(round(mix["weight_seedlike"], 4)), separation=float(round(mix["separation"], 3)))
        rows.append(row)
        ok = ok and mix["weight_seedlike"] >= min_minority and mix["weight_seedlike"] * len(idx) >= min_minority_count
        if ok:
            qualifying.append(int(y))
            found.append((counted, key, int(y), idx, s, post, mix))
    # a label whose count excess matches its component outranks labels that qualify by their split alone
    best = max(found, key=lambda f: (f[0], f[1]))[1:] if found else None
    report: dict[str, Any] = {"method": SCAN_METHOD, "scan_method": method, "max_weight": max_weight,
                              "min_separation": min_separation, "min_posterior": min_posterior, "labels": rows,
                              "n_seed": 0}
    if method == "contrastive":
        report.update(min_ratio=min_ratio, min_wide_separation=min_wide_separation, min_count_sd=min_count_sd)
    if best is None:
        report.update(expanded=False, n_expanded=0, target=None,
                      reason=f"no label holds a separate population of at most {max_weight:.0%} of it"
                             + (f", a variance ratio of {min_ratio:g} or a separation of {min_wide_separation:g}"
                                if method == "contrastive" else "")
                             + (", or one the size of its label's count excess" if method == "contrastive"
                                and min_count_sd > 0 else ""))
        log.info("label scan: %s", report["reason"])
        empty = np.zeros(0, np.int64)
        return Expansion(empty, -1, empty, np.zeros(0), np.zeros(0), report, empty)
    _, target, idx, s, post, mix = best
    keep, report["capped"] = _keep(post, post if method == "contrastive" else s, min_posterior, max_share)
    row = next(r for r in rows if r["label"] == target)
    if row.get("count_route") and keep.sum() > COUNT_REMOVE * row["count_excess"]:
        # the label's count excess sizes the poison: the component's highest-scoring that many, with a margin
        keep = np.zeros(len(post), bool)
        keep[np.argsort(-s, kind="stable")[: int(np.ceil(COUNT_REMOVE * row["count_excess"]))]] = True
        report["count_capped"] = True
    removed = np.sort(idx[keep])
    core = np.sort(idx[post >= 0.5])
    report.update(expanded=True, target=target, n_target_label=int(len(idx)), mixture=mix, n_core=int(len(core)),
                  n_expanded=int(len(removed)), n_removed=int(len(removed)),
                  expanded_share=float(len(removed) / len(idx)), estimated_poison=float(post.sum()),
                  qualifying=qualifying)
    if row.get("count_route"):  # the count excess is the poison estimate the route was matched on
        report["estimated_poison"] = float(row["count_excess"])
    log.info("label scan: removed %d of %d in label %d (minority %.0f%%, separation %.2f)", len(removed), len(idx),
             target, 100 * mix["weight_seedlike"], mix["separation"])
    return Expansion(removed, target, idx, s, post, report, core)


#: the most values per image :func:`input_features` keeps (32x32x3); larger images are average-pooled to fit
INPUT_MAX_DIM = 3072


def input_features(images: np.ndarray, max_dim: int = INPUT_MAX_DIM, chunk: int = 1024) -> np.ndarray:
    """uint8 ``(N, H, W, C)`` images as scan features: scaled to [0, 1] and flattened, one float32 row per image;
    images with more than ``max_dim`` values are first averaged over ``k x k`` pixel blocks, the smallest ``k`` that
    fits (in chunks of ``chunk`` images, so memory stays near the output's)."""
    x = np.asarray(images)
    if x.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got shape {x.shape}")
    n, h, w, c = x.shape
    k = 1
    while (h // k) * (w // k) * c > max_dim and k < min(h, w):
        k += 1
    hh, ww = h // k, w // k
    out = np.empty((n, hh * ww * c), np.float32)
    for i in range(0, n, chunk):
        part = x[i:i + chunk, :hh * k, :ww * k].astype(np.float32)
        if k > 1:
            part = part.reshape(len(part), hh, k, ww, k, c).mean((2, 4))
        out[i:i + chunk] = part.reshape(len(part), -1) / 255.0
    return out


def scan_inputs(images: np.ndarray, labels: np.ndarray, pool: np.ndarray, *, min_separation: float = 10.0,
                min_posterior: float = 0.01, max_share: float = 0.6, random_state: int = 0,
                min_minority: float = 0.01, min_minority_count: int = 10) -> Expansion:
    """:func:`scan_labels`' contrastive scan on the raw inputs (:func:`input_features`) instead of a model's features.

    A fixed-pattern trigger (a patch, a blended image, a sine overlay) moves every poisoned input the same way in pixel
    space, so the poisoned part of the target label splits from the rest along the label's top contrastive direction
    — the direction along which it varies most relative to the other labels' pooled within-class covariance — with
    no model at all. Only the wide-separation route applies (a label qualifies when its two components are at least
    ``min_separation`` apart, Ashman's D, and its suspect component holds at least ``min_minority`` of it and
    ``min_minority_count`` examples): on Fashion-MNIST's raw pixels clean labels split at D <= 2.82 and BadNets,
    Blend and Trojan poison at 1-10% and SIG at 1-5% at D 19.5-317; on the 8x8 digits clean labels reach 6.7, and
    one outlier image alone 28 (hence the minimum component); warping triggers (WaNet) do not split (D about 2). Not
    in ABL, nor in Tran et al. (who scan features): measured in ``docs/abl.md#input-space-label-scan``."""
    exp = scan_labels(input_features(images), labels, pool, max_weight=0.0, min_posterior=min_posterior,
                      max_share=max_share, random_state=random_state, method="contrastive", min_ratio=np.inf,
                      min_wide_separation=min_separation, min_minority=min_minority,
                      min_minority_count=min_minority_count)
    exp.report.update(space="input", max_weight=None, min_ratio=None, min_wide_separation=min_separation,
                      min_minority=min_minority, min_minority_count=min_minority_count)
    if not exp.report["expanded"]:
        exp.report["reason"] = f"no label's raw inputs split into two populations {min_separation:g} apart"
    return exp


#: ``report["space"]`` of :func:`scan_off_label`'s find: it reads the model's predictions, not features
OFF_LABEL_SPACE = "predictions"
#: the fewest examples the off-label floor must count before :func:`scan_off_label` acts on it
OFF_LABEL_MIN_FLOOR = 10
#: the most examples, in units of the floor, an off-label cell may hold to enter :func:`scan_off_label`'s core: the
#: unlearned poison puts about the floor in every cell, so a fuller cell also holds the label's clean confusions
#: (docs/abl.md#off-label-scan)
OFF_LABEL_CORE_RATIO = 1.25


def self_confidence(probs: np.ndarray, given: np.ndarray, c: int) -> float:
    """Confident learning's threshold for class ``c``: its mean probability over the examples given it (inf when
    none is)."""
    mine = np.asarray(given) == c
    return float(probs[mine, c].mean()) if mine.any() else float("inf")


def _pool_probs(probs: np.ndarray, pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``pool`` as int64 indices and ``probs`` as float64, one row per pool entry (ValueError otherwise)."""
    pool = np.asarray(pool, np.int64)
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or len(probs) != len(pool):
        raise ValueError(f"probs must be (len(pool), K) = ({len(pool)}, K), got {probs.shape}")
    return probs, pool


def confident_classes(probs: np.ndarray, given: np.ndarray, num_classes: int) -> np.ndarray:
    """Confident learning's per-example class (Northcutt et al., JAIR 2021): the most probable class among those
    whose probability reaches that class's threshold — the mean probability of the class over the examples given it
    — or -1 where no class does."""
    probs = np.asarray(probs, np.float64)
    thr = np.array([self_confidence(probs, given, c) for c in range(num_classes)])
    above = np.where(probs >= thr, probs, -1.0)
    return np.where(above.max(1) >= 0, above.argmax(1), -1)


def off_label_counts(classes: np.ndarray, given: np.ndarray, num_classes: int) -> np.ndarray:
    """``(K, K)`` counts of examples by given label (rows) and class (columns); class -1 is not counted."""
    counts = np.zeros((num_classes, num_classes), np.int64)
    ok = np.asarray(classes) >= 0
    np.add.at(counts, (np.asarray(given)[ok], np.asarray(classes, np.int64)[ok]), 1)
    return counts


def _floor(row: np.ndarray, label: int, present: list[int], rank: int) -> int:
    """The ``rank``-th smallest of ``row``'s counts over the other present classes (0 when there are fewer)."""
    cells = np.sort([row[b] for b in present if b != label])
    return int(cells[rank - 1]) if len(cells) >= rank else 0


def scan_off_label(probs: np.ndarray, labels: np.ndarray, pool: np.ndarray, *, min_ratio: float = 4.0,
                   min_floor: int = OFF_LABEL_MIN_FLOOR, rank: int = 2, max_share: float = 0.6,
                   core_ratio: float = OFF_LABEL_CORE_RATIO) -> Expansion:
    """Look for the label that images of *every* other class were given, by what the model predicts for them.

    ``probs`` holds the model's class probabilities for each entry of ``pool``. All-to-one dirty-label poison is
    images of every other class labelled ``t``. A backdoor the model learns slowly (WaNet at 1%: 14-20% attack success
    after one or two epochs) leaves most of its poisoned training examples predicted as their own class early in
    training, so label ``t``'s row of confident learning's joint (Northcutt et al., JAIR 2021: given label x
    :func:`confident_classes`) has a floor under *every* off-label cell — classes no clean example of ``t`` is
    mistaken for included — while a clean label is confidently mistaken only for its neighbours (its rarer off-label
    cells are 0 on Fashion-MNIST). Each label's *floor* is its ``rank``-th smallest off-label count (the second: one
    source class may be learned already, or absent); the label with the highest floor qualifies when that floor is at
    least ``min_floor`` and ``min_ratio`` times the runner-up label's floor plus one. Its examples the model predicts
    (argmax) as another class are removed, unless they are more than ``max_share`` of the label (a label mistaken for
    everything is hard, not poisoned: nothing found). ``core`` — what the final model is probed on — is the label's
    examples confidently predicted as a class ``b`` whose own examples are predicted as ``t`` no more often than the
    floor and whose cell holds at most ``core_ratio`` times the floor (cells the poison explains and no clean
    confusion, either way, does); the poison estimate is the floor times the other classes. Not in ABL: confident
    learning's joint, specialised to all-to-one noise and read from in-sample predictions during the isolation
    epochs, measured in ``docs/abl.md#off-label-scan``.
    """
    probs, pool = _pool_probs(probs, pool)
    given = np.asarray(labels)[pool]
    k = probs.shape[1]
    conf = confident_classes(probs, given, k)
    counts = off_label_counts(conf, given, k)
    present = [a for a in range(k) if (given == a).sum() >= 10]
    floors = {a: _floor(counts[a], a, present, rank) for a in present}
    report: dict[str, Any] = {"method": SCAN_METHOD, "space": OFF_LABEL_SPACE, "rank": rank, "min_floor": min_floor,
                              "min_ratio": min_ratio, "floors": {str(a): f for a, f in floors.items()}, "n_seed": 0}
    empty = np.zeros(0, np.int64)
    ranked = sorted(floors, key=lambda a: floors[a], reverse=True)
    t = ranked[0] if ranked else -1
    floor = floors.get(t, 0)
    runner_up = floors[ranked[1]] if len(ranked) > 1 else 0
    in_t = given == t
    off = probs[in_t].argmax(1) != t
    why = None
    if not ranked or floor < min_floor or floor < min_ratio * (runner_up + 1):
        why = (f"no label is confidently predicted as every other class: the highest off-label floor is {floor} "
               f"(label {t}), under {min_floor} or {min_ratio:g} x (the next label's {runner_up} + 1)")
    elif off.mean() > max_share:
        why = f"label {t} is predicted as another class for {off.mean():.0%} of it (over {max_share:.0%}): a hard label"
    report.update(candidate=int(t), target_floor=floor, runner_up_floor=runner_up)
    if why is not None:
        report.update(expanded=False, n_expanded=0, target=None, reason=why)
        log.info("off-label scan: %s", why)
        return Expansion(empty, -1, empty, np.zeros(0), np.zeros(0), report, empty)
    idx = pool[in_t]
    removed = np.sort(idx[off])
    core_classes = [b for b in present if b != t and counts[b, t] <= floor and counts[t, b] <= core_ratio * floor]
    core = np.sort(idx[np.isin(conf[in_t], core_classes)])
    report.update(expanded=True, capped=False, target=int(t), n_target_label=int(len(idx)), n_core=int(len(core)),
                  core_ratio=core_ratio,
                  n_expanded=int(len(removed)), n_removed=int(len(removed)),
                  expanded_share=float(len(removed) / len(idx)), estimated_poison=float(floor * (len(present) - 1)),
                  off_label_row={str(b): int(counts[t, b]) for b in range(k)}, core_classes=core_classes)
    log.info("off-label scan: label %d is confidently predicted as every other class (floor %d, next label %d); "
             "removed the %d of its %d examples predicted as another class", t, floor, runner_up, len(removed),
             len(idx))
    return Expansion(removed, int(t), idx, off.astype(np.float64), off.astype(np.float64), report, core,
                     conf[in_t].astype(np.int64))


def below_own_threshold(probs: np.ndarray, labels: np.ndarray, pool: np.ndarray, target: int, scale: float = 1.0,
                        min_mean: float = 0.0) -> tuple[np.ndarray, dict[str, Any]]:
    """``target``'s examples of ``pool`` that the model does not confidently place in it: confident learning's per-class
    threshold (Northcutt et al., JAIR 2021) — the mean probability of ``target`` over the label's examples, times
    ``scale`` (1: theirs) — applied to that one label; returns ``(removed dataset indices, report)``. ``probs`` holds
    one row per entry of ``pool``. Nothing is removed (``report["skipped"]``) when that mean is under ``min_mean``: a
    model that has not learned the label yet puts the threshold inside its clean bulk. Used by ABL's clean-stage
    recheck on a fresh model that has not learned the poison the removal missed, which it predicts as the images' own
    classes (``docs/abl.md#clean-stage-recheck``)."""
    probs, pool = _pool_probs(probs, pool)
    given = np.asarray(labels)[pool]
    in_t = given == target
    if not in_t.any():
        return np.zeros(0, np.int64), {"target": int(target), "n_target_label": 0, "n_removed": 0}
    p = probs[in_t, target]
    mean = self_confidence(probs, given, target)
    thr = mean * scale
    skipped = mean < min_mean
    removed = np.zeros(0, np.int64) if skipped else np.sort(pool[in_t][p < thr])
    row = np.bincount(probs[in_t].argmax(1), minlength=probs.shape[1])
    return removed, {"target": int(target), "mean_probability": mean, "threshold": thr,
                     "n_target_label": int(in_t.sum()), "n_removed": int(len(removed)),
                     "predicted_row": {str(b): int(c) for b, c in enumerate(row)},
                     **({"skipped": True} if skipped else {})}


def recheck_totals(passes: list[dict[str, Any]], scale: float) -> dict[str, Any]:
    """``report["recheck"]`` from its passes' reports (:func:`below_own_threshold`'s or
    :func:`abl_guard.abl.pixel_recheck.pixel_recheck`'s, with their ``epoch``): the first pass's epoch, label count,
    mean, threshold and predicted row (or the pixel rule's positives), the removed counts summed over the passes,
    and the passes themselves."""
    first = passes[0]
    out = {k: first[k] for k in ("epoch", "target", "mean_probability", "threshold", "n_target_label",
                                 "predicted_row", "n_poison_in_rest", "method", "positives", "positive_rule",
                                 "fresh_other_share", "restarted", "count_top_up") if k in first}
    out.update(scale=scale, n_removed=sum(p["n_removed"] for p in passes), passes=passes)
    if all("removed_poison" in p for p in passes):
        out.update(removed_poison=sum(p["removed_poison"] for p in passes),
                   removed_clean=sum(p["removed_clean"] for p in passes))
    return out


def penultimate_features(model: Any, images: np.ndarray, indices: np.ndarray, device: Any,
                         batch_size: int = 512) -> np.ndarray:
    """The features entering the model's final linear layer (its ``penultimate`` tap, or the input of its last
    ``nn.Linear`` when it declares no taps) for ``images[indices]``, in eval mode, one float32 row per index."""
    return _module_features(model, _tap_or_linear(model, "penultimate", last=True), images, indices, device,
                            batch_size)


def pooled_features(model: Any, images: np.ndarray, indices: np.ndarray, device: Any,
                    batch_size: int = 512) -> np.ndarray:
    """The pooled output of the model's last convolutional block (its ``pool`` tap, or the input of its *first*
    ``nn.Linear`` — the same for the project's models and torchvision's) for ``images[indices]``, in eval mode."""
    return _module_features(model, _tap_or_linear(model, "pool", last=False), images, indices, device, batch_size)


def expansion_features(method: str, model: Any, images: np.ndarray, indices: np.ndarray, device: Any) -> np.ndarray:
    """The features ``method`` scores (:func:`pooled_features` for ``spectral``, :func:`penultimate_features` for
    ``classifier``) for ``images[indices]``."""
    extract = pooled_features if method == "spectral" else penultimate_features
    return extract(model, images, indices, device)


def _tap_or_linear(model: Any, tap: str, last: bool) -> str:
    """The module spec (``name`` or ``name:in``) of the model's declared ``tap``, else of its first / last linear
    layer's input."""
    import torch

    from .models import model_taps

    try:
        taps = model_taps(model)
    except ValueError:  # a model without declared taps
        taps = {}
    if tap in taps:
        return taps[tap]
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not linear:
        raise ValueError(f"{type(model).__name__} declares no {tap!r} tap and has no linear layer")
    return f"{linear[-1] if last else linear[0]}:in"


def logits_and_pooled_features(model: Any, images: np.ndarray, indices: np.ndarray, device: Any,
                               batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """The logits and :func:`pooled_features` of ``images[indices]`` from one forward pass (eval mode): the isolation's
    loss ranking and the expansion's features of the same model cost one pass, not two."""
    logits: list[Any] = []
    feats = _module_features(model, _tap_or_linear(model, "pool", last=False), images, indices, device, batch_size,
                             logits=logits)
    return np.concatenate(logits) if logits else np.zeros((0, 0), np.float32), feats


def _module_features(model: Any, spec: str, images: np.ndarray, indices: np.ndarray, device: Any,
                     batch_size: int, logits: list[Any] | None = None) -> np.ndarray:
    """One flattened float32 row per index of the input (``name:in``) or output (``name``) of module ``name``;
    ``logits``, when given, receives the model's float32 outputs batch by batch."""
    import torch

    from .train import to_float

    name, _, side = spec.partition(":")
    module = dict(model.named_modules())[name]
    grabbed: list[torch.Tensor] = []

    def keep(_m: Any, args: Any, output: Any = None) -> None:
        t = args[0] if side == "in" else output
        grabbed.append(torch.flatten(t, 1).float().cpu())

    handle = (module.register_forward_pre_hook(keep) if side == "in"
              else module.register_forward_hook(lambda m, a, o: keep(m, a, o)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for s in range(0, len(indices), batch_size):
                out = model(to_float(images[indices[s: s + batch_size]], device))
                if logits is not None:
                    logits.append(out.float().cpu().numpy())
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(grabbed).numpy() if grabbed else np.zeros((0, 0), np.float32)
