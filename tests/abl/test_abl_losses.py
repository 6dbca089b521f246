"""LGA loss (both forms), unlearning loss, isolation ranking and the AUROC helper."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from abl_guard.abl.abl import (
    ascent_term,
    estimated_accuracy,
    isolate_lowest,
    isolation_scores,
    keep_target_label,
    lga_loss,
    rank_auroc,
)


def _logits_with_losses(target_losses: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-class logits whose per-example cross-entropy equals ``target_losses`` (label 0)."""
    ls = torch.tensor(target_losses, dtype=torch.float64)
    # CE = log(1 + exp(-m)) for margin m = z0 - z1  =>  m = -log(exp(CE) - 1)
    margin = -torch.log(torch.expm1(ls))
    logits = torch.stack([margin, torch.zeros_like(margin)], 1).requires_grad_(True)
    return logits, torch.zeros(len(target_losses), dtype=torch.long)


def _grad(loss_fn, logits, labels):
    logits = logits.detach().clone().requires_grad_(True)
    loss = loss_fn(logits, labels)
    (g,) = torch.autograd.grad(loss, logits)
    return loss.detach(), g


@pytest.mark.parametrize("losses,above", [([1.0, 2.0, 0.8], True), ([0.1, 0.2, 0.05], False)])
def test_flooding_is_descent_above_gamma_and_ascent_below(losses, above):
    logits, y = _logits_with_losses(losses)
    ce_val, ce_grad = _grad(F.cross_entropy, logits, y)
    val, grad = _grad(lambda z, t: lga_loss(z, t, 0.5, "flooding"), logits, y)
    sign = 1.0 if above else -1.0
    assert torch.allclose(grad, sign * ce_grad)
    assert torch.isclose(val, (ce_val - 0.5).abs() + 0.5)
    # the batch-mean form flips the sign for the whole batch even when single examples sit on the other side
    mixed, y2 = _logits_with_losses([0.01, 3.0])  # mean 1.5 > gamma: plain descent for both
    _, g_mixed = _grad(lambda z, t: lga_loss(z, t, 0.5, "flooding"), mixed, y2)
    _, g_ce = _grad(F.cross_entropy, mixed, y2)
    assert torch.allclose(g_mixed, g_ce)


def test_per_example_lga_flips_each_example_on_its_own():
    logits, y = _logits_with_losses([0.01, 0.2, 3.0, 1.0])  # two below gamma = 0.5, two above
    val, grad = _grad(lambda z, t: lga_loss(z, t, 0.5, "per-example"), logits, y)
    _, per_grad = _grad(lambda z, t: F.cross_entropy(z, t, reduction="sum"), logits, y)
    signs = torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=torch.float64)[:, None]
    assert torch.allclose(grad, signs * per_grad / 4)
    assert torch.isclose(val, torch.tensor((-0.01 - 0.2 + 3.0 + 1.0) / 4, dtype=torch.float64))
    # the batch-mean form would descend on all four here (mean 1.05 > gamma)
    _, g_flood = _grad(lambda z, t: lga_loss(z, t, 0.5, "flooding"), logits, y)
    assert (torch.sign(g_flood[:2, 0]) != torch.sign(grad[:2, 0])).all()


def test_gamma_moves_the_switch_point():
    logits, y = _logits_with_losses([0.3, 0.3])
    _, g_low = _grad(lambda z, t: lga_loss(z, t, 0.2, "flooding"), logits, y)
    _, g_high = _grad(lambda z, t: lga_loss(z, t, 0.5, "flooding"), logits, y)
    assert torch.allclose(g_low, -g_high)


def test_lga_rejects_unknown_form():
    logits, y = _logits_with_losses([1.0])
    with pytest.raises(ValueError, match="lga form"):
        lga_loss(logits, y, 0.5, "batch")


def test_ascent_terms():
    logits, y = _logits_with_losses([0.01, 2.0])
    neg = ascent_term(logits, y, "negated-ce")
    assert torch.allclose(neg, -F.cross_entropy(logits, y, reduction="none"))
    comp = ascent_term(logits, y, "complement")
    p_y = F.softmax(logits.double(), 1).gather(1, y[:, None])[:, 0]
    assert torch.allclose(comp.double(), -torch.log1p(-p_y), rtol=1e-4)
    # on a fitted example (p_y = 0.99) the complement pushes the label logit at full strength (p_y), -CE barely
    z = logits.detach().clone().requires_grad_(True)
    ascent_term(z, y, "complement")[0].backward()
    g_comp = z.grad[0, y[0]].item()
    z.grad = None
    ascent_term(z, y, "negated-ce")[0].backward()
    g_neg = z.grad[0, y[0]].item()
    assert g_comp == pytest.approx(p_y[0].item(), rel=1e-4) and abs(g_neg) == pytest.approx(1 - p_y[0].item(), rel=1e-3)
    assert g_comp > 50 * abs(g_neg)
    with pytest.raises(ValueError, match="ascent form"):
        ascent_term(logits, y, "up")


def test_isolate_lowest_picks_the_lowest_fraction(rng):
    losses = rng.exponential(size=1000)
    iso = isolate_lowest(losses, 0.05)
    assert len(iso) == 50
    assert set(iso) == set(np.argsort(losses)[:50])
    assert losses[iso].max() <= np.sort(losses)[50]
    assert list(losses[iso]) == sorted(losses[iso])  # lowest first
    assert len(isolate_lowest(losses[:10], 0.01)) == 1  # at least one
    assert list(isolate_lowest(np.zeros(10), 0.3)) == [0, 1, 2]  # stable on ties
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError):
            isolate_lowest(losses, bad)


def test_keep_target_label_keeps_the_majority_label_in_rank_order():
    labels = np.array([0, 3, 3, 1, 3, 0, 3, 2])
    candidates = np.array([6, 0, 1, 3, 2, 4])  # labels 3, 0, 3, 1, 3, 3: label 3 is the majority
    kept, target = keep_target_label(candidates, labels)
    assert target == 3
    np.testing.assert_array_equal(kept, [6, 1, 2, 4])
    kept, target = keep_target_label(np.array([3, 0]), labels)  # a tie goes to the smaller label
    assert target == 0 and list(kept) == [0]
    with pytest.raises(ValueError, match="no isolation candidates"):
        keep_target_label(np.zeros(0, np.int64), labels)


def test_rank_auroc_matches_sklearn(rng):
    from sklearn.metrics import roc_auc_score

    scores = np.round(rng.normal(size=300), 1)  # many ties
    pos = rng.random(300) < 0.3
    scores[pos] += 0.8
    assert rank_auroc(scores, pos) == pytest.approx(roc_auc_score(pos, scores))
    assert np.isnan(rank_auroc(scores, np.zeros(300, bool)))


def test_class_relative_score_ignores_an_intrinsically_easy_class(rng):
    # label 1 is an easy class (every loss tiny); label 0 holds 40 fast-learned poisons among normal examples
    labels = np.repeat([0, 1, 2], 200)
    losses = np.exp(rng.normal(-1.0, 0.5, size=600))
    losses[200:400] = np.exp(rng.normal(-9.0, 0.5, size=200))  # easy class: far below everything
    poison = np.arange(40)
    losses[poison] = np.exp(rng.normal(-6.0, 0.3, size=40))
    raw = isolate_lowest(isolation_scores(losses, labels, "loss"), 40 / 600)
    rel = isolate_lowest(isolation_scores(losses, labels, "class-relative"), 40 / 600)
    assert np.all(labels[raw] == 1)  # the paper's raw ranking isolates the easy class
    assert set(rel) == set(poison)
    np.testing.assert_array_equal(isolation_scores(losses, labels, "loss"), losses)
    scores = isolation_scores(losses, labels, "class-relative")
    for y in (0, 1, 2):  # centred on each label's median log-loss
        assert np.median(scores[labels == y]) == pytest.approx(0.0, abs=1e-12)
    assert np.isfinite(isolation_scores(np.array([0.0, 1.0]), np.array([0, 0]), "class-relative")).all()
    with pytest.raises(ValueError, match="isolation score"):
        isolation_scores(losses, labels, "rank")
    with pytest.raises(ValueError, match="shape"):
        isolation_scores(losses, labels[:10], "loss")


def test_class_relative_reference_quantile_survives_a_majority_poisoned_label(rng):
    # label 0: 120 poisons in a tight low-loss cluster + 80 clean; labels 1, 2 clean with a spread low tail
    labels = np.repeat([0, 1, 2], 200)
    losses = np.exp(rng.normal(-1.0, 1.0, size=600))
    poison = np.arange(120)
    losses[poison] = np.exp(rng.normal(-8.0, 0.2, size=120))
    k = 40 / 600
    median_ref = isolate_lowest(isolation_scores(losses, labels, "class-relative"), k)
    q75_ref = isolate_lowest(isolation_scores(losses, labels, "class-relative", reference=0.75), k)
    # the median of label 0 lies inside the poison cluster, so the poison scores about 0 and clean tails win
    assert len(np.intersect1d(median_ref, poison)) < 20
    assert set(q75_ref) <= set(poison)
    with pytest.raises(ValueError, match="quantile"):
        isolation_scores(losses, labels, "class-relative", reference=0.0)


def test_estimated_accuracy_charges_a_lost_target_class():
    # 10% target prior: full non-target accuracy but no target predictions at all costs the whole target share
    assert estimated_accuracy({"nontarget_accuracy": 1.0, "target_rate": 0.0}, 0.1) == pytest.approx(0.9)
    # a backdoor that inflates the target rate cannot raise the target recall above 1
    assert estimated_accuracy({"nontarget_accuracy": 0.8, "target_rate": 0.3}, 0.1) == pytest.approx(0.82)
    assert estimated_accuracy({"nontarget_accuracy": 0.8, "target_rate": 0.05}, 0.1) == pytest.approx(0.77)
    assert estimated_accuracy({"nontarget_accuracy": 0.8, "target_rate": 0.05}, float("nan")) == 0.8
