"""Seed expansion (abl/expansion.py): from a small isolated seed to the rest of the poison, and nothing without it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from abl_guard.abl.expansion import (
    ashman_d,
    below_own_threshold,
    expand_seed,
    input_features,
    penultimate_features,
    pooled_features,
    recheck_totals,
    scan_inputs,
    scan_labels,
    scan_off_label,
    spectral_scores,
)
from abl_guard.abl.models import SmallCNN

METHODS = ("spectral", "classifier")


def _label_with_poison(n_clean: int = 600, n_poison: int = 300, shift: float = 6.0, dim: int = 16,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features of a dataset with labels 0..2; label 0 holds ``n_poison`` examples shifted along one direction."""
    rng = np.random.default_rng(seed)
    n_other = 400
    feats = rng.normal(size=(n_clean + n_poison + n_other, dim))
    feats[n_clean: n_clean + n_poison, 0] += shift  # the trigger: one shared direction
    labels = np.r_[np.zeros(n_clean + n_poison, np.int64), rng.integers(1, 3, n_other)]
    poison = np.arange(n_clean, n_clean + n_poison)
    return feats, labels, poison


@pytest.mark.parametrize("method", METHODS)
def test_expansion_recovers_the_poison_from_a_small_seed(method: str):
    feats, labels, poison = _label_with_poison()
    seed = poison[:30]
    pool = np.arange(len(labels))
    exp = expand_seed(feats, labels, seed, pool, method=method)
    assert exp.target == 0 and exp.report["expanded"] and exp.report["method"] == method
    found = np.isin(poison, exp.removed).mean()
    clean_removed = len(np.setdiff1d(exp.removed, poison))
    assert found >= 0.98  # a 6-sigma shift in 16 dimensions
    assert clean_removed <= 90  # the conservative posterior (0.01) removes some clean examples (15% at most here)
    assert np.isin(seed, exp.removed).all()
    assert exp.report["mixture"]["separation"] > 2
    assert np.all(labels[exp.removed] == 0)  # nothing outside the target label is touched


@pytest.mark.parametrize("method", METHODS)
def test_no_second_population_removes_only_the_seed(method: str):
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(900, 16))
    labels = np.r_[np.zeros(600, np.int64), np.ones(300, np.int64)]
    seed = np.arange(30)  # an arbitrary part of a homogeneous label
    exp = expand_seed(feats, labels, seed, np.arange(900), method=method)
    assert not exp.report["expanded"] and "separation" in exp.report["reason"]
    np.testing.assert_array_equal(exp.removed, seed)


@pytest.mark.parametrize("method", METHODS)
def test_held_out_examples_are_never_removed(method: str):
    feats, labels, poison = _label_with_poison()
    pool = np.setdiff1d(np.arange(len(labels)), poison[-50:])  # the last 50 poisons are held out
    exp = expand_seed(feats, labels, poison[:30], pool, method=method)
    assert not np.isin(poison[-50:], exp.removed).any()


def test_bad_arguments_are_errors():
    feats, labels, poison = _label_with_poison()
    with pytest.raises(ValueError, match="non-empty"):
        expand_seed(feats, labels, np.zeros(0, np.int64), np.arange(len(labels)))
    with pytest.raises(ValueError, match="min_posterior"):
        expand_seed(feats, labels, poison[:30], np.arange(len(labels)), min_posterior=1.0)
    few = expand_seed(feats, labels, poison[:1], np.arange(len(labels)))
    assert not few.report["expanded"] and "too few" in few.report["reason"]
    with pytest.raises(ValueError, match="expansion method"):
        expand_seed(feats, labels, poison[:30], np.arange(len(labels)), method="kmeans")


def test_expansion_removes_at_most_max_share_of_the_label():
    """Overlapping populations: the conservative posterior would take most of the label; the cap keeps the highest
    scores, which still hold the poison."""
    feats, labels, poison = _label_with_poison(n_clean=500, n_poison=400, shift=4.0, seed=2)
    cand = np.setdiff1d(np.flatnonzero(labels == 0), poison[:30])
    wide = expand_seed(feats, labels, poison[:30], np.arange(len(labels)), min_posterior=1e-6, max_share=0.95)
    assert wide.report["expanded"] and wide.report["expanded_share"] > 0.5  # the premise: the posterior takes more
    exp = expand_seed(feats, labels, poison[:30], np.arange(len(labels)), min_posterior=1e-6, max_share=0.5)
    assert exp.report["expanded"] and exp.report["capped"]
    assert exp.report["n_expanded"] == int(np.floor(0.5 * len(cand)))
    assert np.isin(poison, exp.removed).mean() >= 0.97
    # a seed-like population that is most of the label is refused outright
    most = expand_seed(feats, labels, poison[:30], np.arange(len(labels)), min_posterior=1e-6, max_share=0.3)
    assert not most.report["expanded"] and "sub-type" in most.report["reason"]


def test_spectral_expansion_is_not_limited_to_what_makes_the_seed_easy():
    """The seed is the fastest-learned poison: here the poisons that also carry a strong second feature. A classifier
    seed-vs-rest learns that second feature too; the spectral direction is the label's own (the trigger, shared by all
    poisons), so the poisons without the second feature are found as well."""
    rng = np.random.default_rng(5)
    n_clean, n_poison, dim = 600, 400, 16
    feats = rng.normal(size=(n_clean + n_poison + 300, dim))
    feats[n_clean: n_clean + n_poison, 0] += 6.0  # the trigger
    easy = np.arange(n_clean, n_clean + 40)
    feats[easy, 1] += 8.0  # what made the seed easy: only the seed has it
    labels = np.r_[np.zeros(n_clean + n_poison, np.int64), np.ones(300, np.int64)]
    poison = np.arange(n_clean, n_clean + n_poison)
    exp = expand_seed(feats, labels, easy, np.arange(len(labels)), method="spectral")
    assert exp.report["expanded"] and np.isin(poison, exp.removed).mean() >= 0.99
    s = spectral_scores(feats[labels == 0], np.isin(np.flatnonzero(labels == 0), easy))
    assert np.median(s[poison]) > np.median(s[:n_clean])  # signed by the seed: poison scores high


def test_ashman_d():
    assert ashman_d(0.0, 1.0, 0.0, 1.0) == pytest.approx(0.0)
    assert ashman_d(0.0, 1.0, 4.0, 1.0) == pytest.approx(4.0, rel=1e-6)


def test_pooled_features_are_the_pooled_last_conv_block():
    torch.manual_seed(0)
    model = SmallCNN(1, 10, 8, width=8)
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    feats = pooled_features(model, images, np.array([0, 2, 4]), torch.device("cpu"), batch_size=2)
    model.eval()
    with torch.no_grad():
        x = model.normalize(torch.from_numpy(images[[0, 2, 4]]).permute(0, 3, 1, 2).float() / 255)
        want = model.block3(model.block2(model.block1(x))).mean((2, 3))
    np.testing.assert_allclose(feats, want.numpy(), rtol=1e-5, atol=1e-6)  # float32 pooling order


def test_one_pass_gives_the_logits_and_the_pooled_features():
    from abl_guard.abl.expansion import logits_and_pooled_features
    from abl_guard.abl.train import loss_from_logits, per_example_loss, predict_logits

    torch.manual_seed(0)
    model = SmallCNN(1, 10, 8, width=8).eval()
    images = np.random.default_rng(0).integers(0, 256, (70, 8, 8, 1), dtype=np.uint8)
    idx = np.arange(3, 70, 2)
    labels = np.arange(len(images)) % 10
    logits, feats = logits_and_pooled_features(model, images, idx, torch.device("cpu"), batch_size=16)
    # float tolerance: the same batches as the reference passes, but BLAS may order sums differently across calls
    np.testing.assert_allclose(logits, predict_logits(model, images[idx], torch.device("cpu"), 16), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(feats, pooled_features(model, images, idx, torch.device("cpu"), batch_size=16),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss_from_logits(logits, labels[idx]),
                               per_example_loss(model, images[idx], labels[idx], torch.device("cpu"), 16),
                               rtol=1e-4, atol=1e-6)


def test_penultimate_features_are_the_final_layers_input():
    torch.manual_seed(0)
    model = SmallCNN(1, 10, 8, width=8)
    images = np.random.default_rng(0).integers(0, 256, (7, 8, 8, 1), dtype=np.uint8)
    feats = penultimate_features(model, images, np.array([1, 3, 5]), torch.device("cpu"), batch_size=2)
    assert feats.shape == (3, 128)
    assert model.training  # restored
    with torch.no_grad():
        model.eval()
        logits = model(torch.from_numpy(images[[1, 3, 5]]).permute(0, 3, 1, 2).float() / 255)
    np.testing.assert_allclose(feats @ model.fc.weight.detach().numpy().T + model.fc.bias.detach().numpy(),
                               logits.numpy(), rtol=1e-4, atol=1e-5)


def _labels_with_subtypes(share_poison: float, subtype_share: float = 0.4, n_per_label: int = 500, k: int = 5,
                          dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``k`` labels; every label has a clean sub-type (``subtype_share`` of it, 4 sd apart along its own direction),
    and label 2 additionally ``share_poison`` of poison 8 sd away along a shared trigger direction."""
    rng = np.random.default_rng(seed)
    feats, labels = [], []
    for y in range(k):
        x = rng.normal(size=(n_per_label, dim))
        x[: int(subtype_share * n_per_label), 1 + y] += 4.0
        feats.append(x)
        labels.append(np.full(n_per_label, y))
    n_poison = int(round(share_poison * n_per_label / (1 - share_poison)))
    poison_x = rng.normal(size=(n_poison, dim))
    poison_x[:, 0] += 8.0
    feats.append(poison_x)
    labels.append(np.full(n_poison, 2))
    return np.vstack(feats), np.concatenate(labels), np.arange(k * n_per_label, k * n_per_label + n_poison)


def test_label_scan_finds_a_small_separate_population_and_ignores_clean_subtypes():
    feats, labels, poison = _labels_with_subtypes(0.1)
    pool = np.arange(len(labels))
    exp = scan_labels(feats, labels, pool)
    r = exp.report
    assert r["expanded"] and r["method"] == "spectral-scan" and exp.target == 2 and r["qualifying"] == [2]
    assert np.isin(poison, exp.removed).all()
    assert np.all(labels[exp.removed] == 2)
    assert np.isin(exp.core, poison).mean() >= 0.95 and len(exp.core) >= 0.95 * len(poison)
    assert len(np.setdiff1d(exp.removed, poison)) <= 0.1 * 500  # an 8-sd population: few clean ones pass 0.01
    # every other label split into its clean sub-type, which is too large (40% of its label) to be poison
    others = [row for row in r["labels"] if row["label"] != 2]
    assert len(others) == 4 and all(row["minority"] > 0.3 for row in others)


def test_label_scan_finds_nothing_in_clean_data():
    feats, labels, _ = _labels_with_subtypes(0.0)
    feats, labels = feats[: 5 * 500], labels[: 5 * 500]
    exp = scan_labels(feats, labels, np.arange(len(labels)))
    assert not exp.report["expanded"] and exp.target == -1
    assert len(exp.removed) == 0 and len(exp.core) == 0 and "no label" in exp.report["reason"]


def test_label_scan_respects_its_knobs_and_the_pool():
    feats, labels, poison = _labels_with_subtypes(0.1)
    # a threshold below the poison's share (10% of the label): nothing qualifies
    assert not scan_labels(feats, labels, np.arange(len(labels)), max_weight=0.05).report["expanded"]
    # held-out examples are never removed
    pool = np.setdiff1d(np.arange(len(labels)), poison[:10])
    exp = scan_labels(feats, labels, pool)
    assert exp.report["expanded"] and not np.isin(poison[:10], exp.removed).any()
    # at most max_share of the label, the highest scores
    capped = scan_labels(feats, labels, pool, max_share=0.05)
    assert capped.report["capped"] and len(capped.removed) == int(0.05 * np.sum(labels[pool] == 2))


def _shared_subtypes(share_poison: float, shift: float, trigger_sd: float = 1.0, n_per_label: int = 600, k: int = 6,
                     dim: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``k`` labels whose clean sub-type (40% of each, 4 sd apart) lies along one direction *shared* by all labels
    (as a style varies across every class), and label 2 with ``share_poison`` of poison ``shift`` away along the
    trigger direction, along which every clean example varies with ``trigger_sd``."""
    rng = np.random.default_rng(seed)
    n_poison = int(round(share_poison * n_per_label / (1 - share_poison)))
    x = rng.normal(size=(k * n_per_label + n_poison, dim))
    labels = np.r_[np.repeat(np.arange(k), n_per_label), np.full(n_poison, 2)]
    x[:, 0] *= trigger_sd
    for y in range(k):
        x[y * n_per_label: y * n_per_label + int(0.4 * n_per_label), 1] += 4.0
    poison = np.arange(k * n_per_label, len(x))
    x[poison, 0] += shift
    return x, labels, poison


def test_contrastive_scan_sees_past_subtypes_every_label_shares():
    """The spectral scan splits each label along its largest variation — the shared clean sub-type, 40% of every
    label — and finds nothing; against the other labels' covariance that variation is ordinary, and the contrastive
    scan splits label 2 along the trigger instead."""
    feats, labels, poison = _shared_subtypes(0.1, shift=5.0)
    pool = np.arange(len(labels))
    assert not scan_labels(feats, labels, pool).report["expanded"]
    exp = scan_labels(feats, labels, pool, method="contrastive")
    r = exp.report
    assert r["expanded"] and r["scan_method"] == "contrastive" and exp.target == 2 and r["qualifying"] == [2]
    assert np.isin(poison, exp.removed).mean() >= 0.95
    assert np.isin(exp.core, poison).mean() >= 0.85
    assert all(row["ratio"] < 10 for row in r["labels"] if row["label"] != 2)


def test_contrastive_scan_takes_a_large_share_by_its_variance_ratio():
    """Poison that is 40% of its label fails the share test; its variance ratio (the other labels hardly vary along
    the trigger) qualifies it, and the component away from the other labels is removed, not the smaller one."""
    feats, labels, poison = _shared_subtypes(0.4, shift=3.0, trigger_sd=0.1)
    pool = np.arange(len(labels))
    exp = scan_labels(feats, labels, pool, method="contrastive")
    row = next(r for r in exp.report["labels"] if r["label"] == 2)
    assert row["ratio"] >= 100 and exp.target == 2
    assert np.isin(poison, exp.removed).mean() >= 0.99 and np.isin(exp.removed, poison).mean() >= 0.95
    # (it is 30 sd away, so the separation route takes it too)
    assert scan_labels(feats, labels, pool, method="contrastive", min_ratio=1e6).target == 2
    assert not scan_labels(feats, labels, pool, method="contrastive", min_ratio=1e6,
                           min_wide_separation=np.inf).report["expanded"]


def test_contrastive_scan_takes_a_large_share_by_its_separation():
    """Poison that is 35% of its label, 8 sd away along a direction the other labels vary along as much as it does
    within each component: the share test fails and the variance ratio stays about 16, but the split's separation
    (D about 8) qualifies it; without that route nothing is found."""
    feats, labels, poison = _shared_subtypes(0.35, shift=8.0)
    pool = np.arange(len(labels))
    exp = scan_labels(feats, labels, pool, method="contrastive")
    row = next(r for r in exp.report["labels"] if r["label"] == 2)
    assert row["ratio"] < 100 and row["minority"] > 0.2 and row["separation"] >= 5.0
    assert exp.target == 2 and exp.report["qualifying"] == [2] and exp.report["min_wide_separation"] == 5.0
    assert np.isin(poison, exp.removed).mean() >= 0.99 and np.isin(exp.removed, poison).mean() >= 0.95
    off = scan_labels(feats, labels, pool, method="contrastive", min_wide_separation=np.inf)
    assert not off.report["expanded"] and "separation of inf" in off.report["reason"]


def test_contrastive_scan_finds_nothing_in_clean_data():
    feats, labels, _ = _shared_subtypes(0.0, shift=0.0)
    exp = scan_labels(feats, labels, np.arange(len(labels)), method="contrastive")
    assert not exp.report["expanded"] and exp.target == -1 and "variance ratio" in exp.report["reason"]


def test_input_features_scale_flatten_and_pool_large_images():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    f = input_features(small)
    assert f.dtype == np.float32 and f.shape == (5, 64)
    np.testing.assert_allclose(f, small.reshape(5, -1) / 255.0, rtol=0, atol=1e-7)
    big = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)  # 12,288 values: 2x2 blocks give 3,072
    g = input_features(big, chunk=2)
    assert g.shape == (3, 32 * 32 * 3)
    block = big[1, 2:4, 6:8, 2].astype(np.float64).mean() / 255.0
    assert g[1].reshape(32, 32, 3)[1, 3, 2] == pytest.approx(block, abs=1e-6)
    with pytest.raises(ValueError, match="N, H, W, C"):
        input_features(big[0])


@pytest.mark.parametrize("attack", ["badnets", "blend", "sig"])
def test_input_scan_finds_fixed_pattern_poison_without_a_model(digits_train, attack):
    """5% of the 8x8 digits poisoned into label 0: its raw inputs split at D 78-117 (clean labels at 6.7 at most)."""
    from abl_guard.attacks import make_attack

    p = make_attack(attack, rate=0.05, target=0, seed=0).poison(digits_train.images, digits_train.labels, 10)
    pool = np.arange(len(p.labels))
    exp = scan_inputs(p.images, p.labels, pool)
    rep = exp.report
    assert rep["expanded"] and rep["space"] == "input" and exp.target == 0 and rep["mixture"]["separation"] >= 10
    np.testing.assert_array_equal(exp.removed, np.sort(p.poison_indices))  # every poison, no clean image
    np.testing.assert_array_equal(exp.core, exp.removed)
    # the held-out examples are never removed
    held = p.poison_indices[:20]
    assert not np.isin(scan_inputs(p.images, p.labels, np.setdiff1d(pool, held)).removed, held).any()


def test_input_scan_finds_nothing_in_clean_data_nor_in_one_outlier(digits_train):
    """Clean digits: one label's split isolates a single outlier image at D 28; the minimum component keeps it out."""
    pool = np.arange(len(digits_train.labels))
    exp = scan_inputs(digits_train.images, digits_train.labels, pool)
    rep = exp.report
    assert not rep["expanded"] and exp.target == -1 and "raw inputs" in rep["reason"]
    assert max(r["separation"] for r in rep["labels"]) > 10  # the outlier
    assert max(r["separation"] for r in rep["labels"] if r["minority"] * r["n"] >= 10) < 10
    assert scan_inputs(digits_train.images, digits_train.labels, pool, min_minority=0.0,
                       min_minority_count=0).report["expanded"]


def _predictions(per_class: int = 300, poison_per_class: int = 20, confusion: float = 0.1,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class probabilities of a 10-class set: each label mistaken for its next class ``confusion`` of the time (a
    clean neighbour), and label 0 also holding ``poison_per_class`` images of every other class, predicted as that
    class (poison the model has not learned yet)."""
    rng = np.random.default_rng(seed)
    k = 10
    labels = np.repeat(np.arange(k), per_class)
    pred = labels.copy()
    confused = rng.random(len(labels)) < confusion
    pred[confused] = (labels[confused] + 1) % k
    src = np.repeat(np.arange(1, k), poison_per_class)
    labels = np.r_[labels, np.zeros(len(src), np.int64)]
    pred = np.r_[pred, src]
    probs = np.full((len(labels), k), 0.1 / (k - 1))
    probs[np.arange(len(labels)), pred] = 0.9
    return probs, labels, np.arange(k * per_class, len(labels))


def test_off_label_scan_finds_the_label_given_to_every_class():
    """Label 0 is predicted as all nine other classes; every clean label only as its neighbour: label 0 is found and
    its examples predicted as another class removed — the poison and its own neighbour confusions (clean)."""
    probs, labels, poison = _predictions()
    pool = np.arange(len(labels))
    exp = scan_off_label(probs, labels, pool)
    rep = exp.report
    assert rep["expanded"] and exp.target == 0 and rep["space"] == "predictions" and rep["method"] == "spectral-scan"
    assert rep["target_floor"] == 20 and rep["runner_up_floor"] == 0
    off = pool[(labels == 0) & (probs.argmax(1) != 0)]
    np.testing.assert_array_equal(exp.removed, off)
    assert np.isin(poison, exp.removed).all() and len(exp.removed) > len(poison)  # the neighbour confusions too
    # the core leaves out class 9, which label 9's clean neighbour confusion also feeds, and class 1, whose cell also
    # holds label 0's own clean confusions (about 30 beside the 20 poisons: over 1.25 x the floor): every poisoned
    # image of classes 2-8 is there and nothing else
    assert set(rep["core_classes"]) == set(range(2, 9)) and rep["core_ratio"] == 1.25
    assert np.isin(exp.core, exp.removed).all() and np.isin(exp.core, poison).all()
    src = probs[poison].argmax(1)
    assert np.isin(poison[(src >= 2) & (src <= 8)], exp.core).all()
    # with room for the fuller cell, class 1 and its clean confusions are in
    wide = scan_off_label(probs, labels, pool, core_ratio=4.0)
    assert set(wide.report["core_classes"]) == set(range(1, 9)) and not np.isin(wide.core, poison).all()
    # each candidate's cell, for the report's per-cell poison counts
    np.testing.assert_array_equal(exp.cells, probs[exp.candidates].argmax(1))
    assert rep["estimated_poison"] == 20 * 9 and rep["n_removed"] == len(exp.removed)
    # held-out examples are never removed
    held = poison[::3]
    rest = np.setdiff1d(pool, held)
    exp = scan_off_label(probs[rest], labels, rest)
    assert exp.report["expanded"] and not np.isin(exp.removed, held).any() and np.isin(exp.removed, pool).all()


def test_off_label_scan_finds_nothing_without_poison_nor_in_a_hard_label():
    probs, labels, _ = _predictions(poison_per_class=0)
    pool = np.arange(len(labels))
    exp = scan_off_label(probs, labels, pool)
    assert not exp.report["expanded"] and exp.target == -1 and len(exp.removed) == 0
    assert "every other class" in exp.report["reason"] and exp.report["target_floor"] == 0
    # too few per class for the floor, or a ratio over the next label's floor that is not reached
    probs, labels, _ = _predictions(poison_per_class=5)
    assert not scan_off_label(probs, labels, np.arange(len(labels))).report["expanded"]
    assert scan_off_label(probs, labels, np.arange(len(labels)), min_floor=5).report["expanded"]
    probs, labels, _ = _predictions()
    assert not scan_off_label(probs, labels, np.arange(len(labels)), min_ratio=25.0).report["expanded"]
    # a label predicted as another class for most of it is hard, not poisoned
    probs, labels, _ = _predictions(poison_per_class=200)
    exp = scan_off_label(probs, labels, np.arange(len(labels)))
    assert not exp.report["expanded"] and "hard label" in exp.report["reason"]
    assert scan_off_label(probs, labels, np.arange(len(labels)), max_share=0.9).report["expanded"]
    with pytest.raises(ValueError, match="len\\(pool\\)"):
        scan_off_label(probs[1:], labels, np.arange(len(labels)))


def test_expansion_report_counts_the_poison_of_each_off_label_cell():
    """With the ground truth known, the report gives the core's poison share and every off-label cell's size and
    poison count (how the core's ratio was chosen, docs/abl.md#off-label-scan)."""
    from abl_guard.abl.report import expansion_report

    probs, labels, poison = _predictions()
    pool = np.arange(len(labels))
    exp = scan_off_label(probs, labels, pool)
    rep = expansion_report(exp, exp.removed, poison, pool)
    assert rep["core_precision"] == 1.0
    cells = rep["cell_poison"]
    assert "0" not in cells and set(cells) == {str(b) for b in range(1, 10)}
    assert all(p == 20 for _, p in cells.values())  # every class's poison sits in its own cell
    assert cells["1"][0] > 30 and all(n == 20 for b, (n, _) in cells.items() if b != "1")
    assert sum(n for n, _ in cells.values()) == int((probs[exp.candidates].argmax(1) != 0).sum())


def test_contrastive_scan_takes_a_label_whose_split_matches_its_count_excess():
    """Poison that is 35% of its label, 4 sd away: too large a share, too small a variance ratio and too close for the
    other routes, but its label holds that many more examples than the median label — what all-to-one dirty-label
    poison adds — and the split's smaller component is about that size: the count-matched route takes it. Not when
    the label holds no excess, nor when the other labels' counts are not balanced."""
    feats, labels, poison = _shared_subtypes(0.35, shift=4.0)
    pool = np.arange(len(labels))
    assert not scan_labels(feats, labels, pool, method="contrastive").report["expanded"]
    exp = scan_labels(feats, labels, pool, method="contrastive", min_count_sd=3.0)
    row = next(r for r in exp.report["labels"] if r["label"] == 2)
    assert exp.target == 2 and exp.report["qualifying"] == [2] and exp.report["min_count_sd"] == 3.0
    assert row["count_route"] and row["count_excess"] == len(poison) and row["separation"] < 5.0
    assert not any(r["count_route"] for r in exp.report["labels"] if r["label"] != 2)
    assert np.isin(poison, exp.removed).mean() >= 0.9
    assert len(exp.removed) <= np.ceil(1.25 * len(poison))  # at most 1.25 x the excess, the highest scores
    assert exp.report["estimated_poison"] == len(poison)  # the excess the route matched, for the count checks
    # with the ground truth, the report says how much poison the top 1-2 x the excess hold (how 1.25 was chosen)
    from abl_guard.abl.report import expansion_report

    at = expansion_report(exp, exp.removed, poison, pool)["poison_at_count_excess"]
    assert list(at) == ["1.0", "1.25", "1.5", "2.0"] and at["1.25"][1] == int(np.ceil(1.25 * len(poison)))
    hits = [at[k][0] for k in at]
    assert hits == sorted(hits) and at["1.25"][0] == int(np.isin(exp.removed, poison).sum())
    # the same poison in a label that holds no excess (as many clean examples of it left out of the pool)
    clean2 = np.flatnonzero(labels == 2)[: len(poison)]
    no_excess = np.setdiff1d(pool, clean2)
    exp = scan_labels(feats, labels, no_excess, method="contrastive", min_count_sd=3.0)
    assert not exp.report["expanded"] and "count excess" in exp.report["reason"]
    # counts are read only when the other labels are balanced (within 1.2x of each other)
    unbalanced = np.setdiff1d(pool, np.flatnonzero(labels == 0)[:200])
    assert not scan_labels(feats, labels, unbalanced, method="contrastive", min_count_sd=3.0).report["expanded"]


def test_contrastive_scan_prefers_the_label_whose_count_matches_over_a_larger_ratio():
    """A clean label that varies widely along a direction of its own reaches a larger variance ratio than the poisoned
    label (as five clean labels did on 5,000 images of PreAct-ResNet-18 features, bench/results/abl_gpu_attacks.md):
    by ratio alone the scan takes the clean label; a label that also qualifies by its count excess outranks it."""
    feats, labels, poison = _shared_subtypes(0.35, shift=4.0)
    feats[labels == 4, 3] *= 6.0  # label 4: a wide clean direction, a variance ratio far above label 2's
    pool = np.arange(len(labels))
    by_ratio = scan_labels(feats, labels, pool, method="contrastive", min_ratio=10.0)
    assert by_ratio.target == 4 and by_ratio.report["qualifying"] == [4]
    exp = scan_labels(feats, labels, pool, method="contrastive", min_ratio=10.0, min_count_sd=3.0)
    ratios = {r["label"]: r["ratio"] for r in exp.report["labels"]}
    assert exp.report["qualifying"] == [2, 4] and ratios[4] > ratios[2]
    assert exp.target == 2 and np.isin(poison, exp.removed).mean() >= 0.9


def test_below_own_threshold_takes_what_the_model_does_not_place_in_the_label():
    """Confident learning's per-class threshold on one label: its examples whose probability of it is under the mean
    over them; other labels' examples are never taken; the report counts what the model predicts for the label."""
    labels = np.array([0] * 6 + [1] * 4)
    pool = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9]) + 100  # dataset indices, not positions
    full = np.zeros(110, np.int64)
    full[pool] = labels
    p0 = np.array([0.9, 0.95, 0.85, 0.1, 0.2, 0.9, 0.05, 0.05, 0.9, 0.1])  # mean over label 0: 0.65
    probs = np.stack([p0, 1 - p0], 1)
    removed, rep = below_own_threshold(probs, full, pool, 0)
    np.testing.assert_array_equal(removed, [103, 104])
    assert rep["threshold"] == pytest.approx(0.65, abs=1e-12) and rep["n_target_label"] == 6
    assert rep["n_removed"] == 2 and rep["predicted_row"] == {"0": 4, "1": 2}
    removed, rep = below_own_threshold(probs, full, pool, 0, scale=0.25)  # under 0.1625: only the 0.1
    np.testing.assert_array_equal(removed, [103])
    assert rep["threshold"] == pytest.approx(0.1625, abs=1e-12)
    removed, rep = below_own_threshold(probs, full, pool, 1)  # label 1: p1 = 0.95, 0.95, 0.1, 0.9; mean 0.725
    np.testing.assert_array_equal(removed, [108])
    assert below_own_threshold(probs, full, pool, 7)[1]["n_removed"] == 0
    with pytest.raises(ValueError):
        below_own_threshold(probs[1:], full, pool, 0)


def test_below_own_threshold_skips_a_label_the_model_has_not_learned():
    """Under ``min_mean`` (the label's mean probability) nothing is removed and the report says so; at or above it the
    rule is unchanged."""
    labels = np.array([0] * 6 + [1] * 4)
    pool = np.arange(10)
    p0 = np.array([0.9, 0.95, 0.85, 0.1, 0.2, 0.9, 0.05, 0.05, 0.9, 0.1])  # mean over label 0: 0.65
    probs = np.stack([p0, 1 - p0], 1)
    removed, rep = below_own_threshold(probs, labels, pool, 0, min_mean=0.7)
    assert len(removed) == 0 and rep["skipped"] and rep["n_removed"] == 0
    assert rep["mean_probability"] == pytest.approx(0.65, abs=1e-12) and rep["n_target_label"] == 6
    removed, rep = below_own_threshold(probs, labels, pool, 0, min_mean=0.6)
    np.testing.assert_array_equal(removed, [3, 4])
    assert "skipped" not in rep


def test_recheck_totals_sum_the_passes_and_keep_the_first_passs_label_statistics():
    first = {"epoch": 1, "target": 0, "mean_probability": 0.6, "threshold": 0.3, "n_target_label": 100,
             "predicted_row": {"0": 90, "1": 10}, "n_removed": 12, "n_poison_in_rest": 9, "removed_poison": 8,
             "removed_clean": 4}
    second = {"epoch": 2, "target": 0, "mean_probability": 0.7, "threshold": 0.35, "n_target_label": 88,
              "predicted_row": {"0": 85, "1": 3}, "n_removed": 5, "n_poison_in_rest": 1, "removed_poison": 1,
              "removed_clean": 4}
    tot = recheck_totals([first, second], 0.5)
    assert tot["epoch"] == 1 and tot["threshold"] == 0.3 and tot["n_target_label"] == 100
    assert tot["n_poison_in_rest"] == 9 and tot["scale"] == 0.5 and tot["passes"] == [first, second]
    assert (tot["n_removed"], tot["removed_poison"], tot["removed_clean"]) == (17, 9, 8)
    unknown = recheck_totals([{k: v for k, v in first.items() if "poison" not in k and k != "removed_clean"}], 1.0)
    assert unknown["n_removed"] == 12 and "removed_poison" not in unknown and "removed_clean" not in unknown


def test_contrastive_scan_reads_a_variance_ratio_only_with_enough_examples_per_dimension(monkeypatch):
    """The poisoned label qualifies by its variance ratio in 12 dimensions; with 400 more dimensions of noise every
    label holds under two examples per dimension and every label's ratio inflates past the threshold (clean labels
    1.2-1.4 -> 4.4-4.5; PreAct-ResNet-18's 512 features on ~450 examples per label gave clean labels 115-16,264), so
    every label would qualify: the ratio is not read there, nothing qualifies by it, and the rows say so."""
    from abl_guard.abl import expansion

    feats, labels, poison = _shared_subtypes(0.1, shift=5.0)
    pool = np.arange(len(labels))
    only_ratio = {"method": "contrastive", "max_weight": 0.0, "min_wide_separation": np.inf, "min_ratio": 3.0}
    exp = scan_labels(feats, labels, pool, **only_ratio)
    assert exp.target == 2 and exp.report["qualifying"] == [2]
    assert not any("ratio_read" in r for r in exp.report["labels"])
    wide = np.c_[feats, np.random.default_rng(1).normal(size=(len(feats), 400))]
    exp = scan_labels(wide, labels, pool, **only_ratio)
    assert not exp.report["expanded"]
    assert all(r["ratio_read"] is False and r["ratio"] > 3.0 for r in exp.report["labels"])
    monkeypatch.setattr(expansion, "RATIO_MIN_PER_DIM", 0.0)  # read regardless: every label qualifies
    assert len(scan_labels(wide, labels, pool, **only_ratio).report["qualifying"]) == 6
