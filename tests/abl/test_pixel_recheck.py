"""The pixel-space recheck (abl/pixel_recheck.py): which removed examples it trains on, and that it flags the copies
of a fixed-pattern trigger the removal missed."""

from __future__ import annotations

import numpy as np
import torch

from abl_guard.abl.pixel_recheck import (
    FRESH_SHARE,
    MIN_VALIDATION,
    POSITIVE_MAX,
    QUANTILE,
    QUANTILE_FILTERED,
    choose_positives,
    count_top_up,
    fit_pixel,
    pixel_recheck,
)


def test_positives_are_what_the_fresh_model_calls_another_class_when_most_of_the_removal_is():
    removed = np.arange(10, 20)
    p = np.array([0.01] * 6 + [0.9] * 4)  # 60% another class: the filtered removal
    pos, rule, share = choose_positives(removed, p)
    assert rule == "fresh" and share == 0.6 and list(pos) == list(range(10, 16))
    p = np.array([0.01] * 4 + [0.9] * 6)  # under FRESH_SHARE: the fresh model relearned the trigger; all of it
    pos, rule, share = choose_positives(removed, p)
    assert FRESH_SHARE > 0.4 and rule == "removed" and share == 0.4 and list(pos) == list(removed)
    pos, rule, _ = choose_positives(removed, np.full(10, POSITIVE_MAX))  # the bound is exclusive
    assert rule == "removed"


def test_pixel_recheck_flags_the_missed_half_of_a_patch_trigger(poisoned_digits):
    """BadNets on the 8x8 digits: trained on half of the poison (and the target label's clean examples the fresh
    model places in the label, which the rule leaves out), the classifier flags nearly all of the other half among
    the target label's remaining examples, and few of its clean ones."""
    d = poisoned_digits
    poison = np.sort(d.poison)
    half, missed = poison[::2], poison[1::2]
    clean_t = np.setdiff1d(np.flatnonzero(d.labels == 0), poison)
    removed = np.r_[half, clean_t[:10]]
    p_target = np.r_[np.full(len(half), 0.01), np.full(10, 0.9)]
    rest = np.setdiff1d(np.arange(len(d.labels)), removed)
    flagged, rep = pixel_recheck(d.images, d.labels, removed, rest, 0, p_target, seed=0)
    assert rep["method"] == "pixel" and rep["positive_rule"] == "fresh"
    assert rep["n_target_label"] == int((d.labels[rest] == 0).sum()) and rep["n_removed"] == len(flagged)
    assert set(flagged) <= set(rest[d.labels[rest] == 0])
    hit = np.isin(flagged, missed)
    assert hit.sum() >= 0.9 * len(missed) and (~hit).sum() <= 5, (hit.sum(), len(missed), (~hit).sum())
    assert rep["positive_recall"] >= 0.7 and rep["validation"] == MIN_VALIDATION and "inconsistent" not in rep
    assert rep["positives"] == len(half) and rep["negatives"] == len(half) - MIN_VALIDATION
    assert rep["quantile"] == QUANTILE_FILTERED  # positives the fresh model filtered: the looser threshold


def test_whole_removal_positives_are_flagged_at_the_stricter_quantile(poisoned_digits):
    """When the positives are the whole removal (the fresh model filtered under half of it), clean examples among
    them teach the classifier some of the label: the threshold is the stricter quantile."""
    d = poisoned_digits
    poison = np.sort(d.poison)
    half = poison[::2]
    clean_t = np.setdiff1d(np.flatnonzero(d.labels == 0), poison)
    removed = np.r_[half, clean_t[:10]]
    rest = np.setdiff1d(np.arange(len(d.labels)), removed)
    p_fresh = np.r_[np.full(len(half), 0.01), np.full(10, 0.9)]
    p_whole = np.full(len(removed), 0.9)  # the fresh model calls none of it another class
    _, fresh = pixel_recheck(d.images, d.labels, removed, rest, 0, p_fresh, seed=0)
    flagged, whole = pixel_recheck(d.images, d.labels, removed, rest, 0, p_whole, seed=0)
    assert fresh["positive_rule"] == "fresh" and fresh["quantile"] == QUANTILE_FILTERED
    assert whole["positive_rule"] == "removed" and whole["quantile"] == QUANTILE > QUANTILE_FILTERED
    assert whole["n_removed"] == len(flagged)


def test_pixel_recheck_flags_nothing_when_the_positives_are_no_one_pattern(poisoned_digits):
    """Positives drawn from the same labels as the negatives (a removal of clean examples): the classifier does not
    recall the positives it did not train on, so nothing is flagged even though the patch poison is there."""
    d = poisoned_digits
    rng = np.random.default_rng(0)
    removed = np.sort(rng.choice(np.flatnonzero(d.labels != 0), 60, replace=False))
    rest = np.setdiff1d(np.arange(len(d.labels)), removed)
    flagged, rep = pixel_recheck(d.images, d.labels, removed, rest, 0, np.full(60, 0.01), seed=0)
    assert rep["inconsistent"] and rep["positive_recall"] < 0.2 and len(flagged) == 0 and rep["n_removed"] == 0


def test_pixel_recheck_skips_without_enough_positives(poisoned_digits):
    d = poisoned_digits
    removed = np.sort(d.poison)[:19]
    rest = np.setdiff1d(np.arange(len(d.labels)), removed)
    flagged, rep = pixel_recheck(d.images, d.labels, removed, rest, 0, np.zeros(19), seed=0)
    assert len(flagged) == 0 and rep["skipped"] and rep["n_removed"] == 0


def test_fit_pixel_is_seeded_and_leaves_the_global_rng_alone(poisoned_digits):
    d = poisoned_digits
    torch.manual_seed(123)
    state = torch.get_rng_state()
    pos, neg = np.sort(d.poison)[:20], np.flatnonzero(d.labels != 0)[:20]
    a = fit_pixel(d.images, pos, neg, seed=3, epochs=1)
    assert torch.equal(torch.get_rng_state(), state)
    b = fit_pixel(d.images, pos, neg, seed=3, epochs=1)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)  # same seed, same CPU: the same weights


def test_count_top_up_takes_the_labels_excess_least_surely_placed_examples():
    """All-to-one poison adds its copies to one label: when the label still holds at least ``min_sd`` Poisson sd more
    examples than the median label, that many of them — those the fresh model gives the label the least probability —
    are returned; under the bound, or with unbalanced other labels, none."""
    labels = np.repeat(np.arange(4), [1000, 1000, 1000, 1000])
    extra = np.arange(4000, 4200)  # 200 more examples of label 0: the copies a removal left
    labels = np.concatenate([labels, np.zeros(200, np.int64)])
    rest = np.arange(len(labels))
    in_t = rest[labels == 0]
    p = np.where(np.isin(in_t, extra), 0.01, 0.9) + np.linspace(0, 1e-3, len(in_t))  # the copies: least sure
    take, rep = count_top_up(labels, rest, 0, in_t, p, 3.0)
    # median over the four labels' sizes (1200, 1000, 1000, 1000) is 1000: 200 = 6.3 sd
    assert rep["excess"] == 200.0 and np.isclose(rep["sd"], np.sqrt(1000.0), rtol=1e-12) and rep["balanced"]
    np.testing.assert_array_equal(take, extra)
    assert rep["n_removed"] == 200
    take, rep = count_top_up(labels, rest, 0, in_t, p, 7.0)  # 200 < 7 sd (221): nothing
    assert len(take) == 0 and rep["n_removed"] == 0
    take, _ = count_top_up(labels, rest, 0, in_t, p, 0.0)  # 0 = off
    assert len(take) == 0
    unbalanced = np.concatenate([labels, np.full(300, 2, np.int64)])  # another label 30% over: not balanced
    rest_u = np.arange(len(unbalanced))
    take, rep = count_top_up(unbalanced, rest_u, 0, in_t, p, 3.0)
    assert len(take) == 0 and not rep["balanced"]
    fewer = np.setdiff1d(rest, extra[:150])  # a removal that took most of the copies: 50 left, 1.6 sd
    take, rep = count_top_up(labels, fewer, 0, np.setdiff1d(in_t, extra[:150]), p[~np.isin(in_t, extra[:150])], 3.0)
    assert rep["excess"] == 50.0 and len(take) == 0


def test_pixel_recheck_runs_on_colour_images_and_flags_a_colour_patch():
    """The recheck is on by default, so it meets CIFAR-10 / GTSRB-shaped inputs: on 16x16 RGB noise images with a red
    3x3 patch on 80 of them (relabelled 0), trained on half of those, it flags most of the other half and few clean
    examples of label 0."""
    rng = np.random.default_rng(0)
    n = 1200
    images = rng.integers(0, 256, (n, 16, 16, 3)).astype(np.uint8)
    labels = rng.integers(0, 10, n)
    poison = np.sort(rng.choice(n, 80, replace=False))
    images[poison, 12:15, 12:15] = (255, 0, 0)
    labels[poison] = 0
    half, missed = poison[::2], poison[1::2]
    rest = np.setdiff1d(np.arange(n), half)
    flagged, rep = pixel_recheck(images, labels, half, rest, 0, np.full(len(half), 0.01), seed=0)
    clean_t = np.setdiff1d(rest[labels[rest] == 0], poison)
    assert rep["positive_rule"] == "fresh" and not rep.get("inconsistent")
    assert np.isin(missed, flagged).mean() >= 0.8
    assert np.isin(clean_t, flagged).mean() <= 0.1
