"""FGSM, PGD and CW-L2 against a tiny digits model: budgets respected, success well above chance, reproducible."""

import numpy as np
import pytest
import torch

from abl_guard.attacks import cw_l2, default_eps, fgsm, pgd, quantize, run_attack
from abl_guard.attacks.adversarial import evaluate, predict


@pytest.fixture(scope="module")
def test_set(digits_test):
    return digits_test.images[:120], digits_test.labels[:120]


def test_model_is_accurate(digits_model, test_set):
    x, y = test_set
    assert (predict(digits_model, x) == y).mean() > 0.9


@pytest.mark.parametrize("attack", [fgsm, pgd])
def test_linf_attacks_stay_in_budget_and_succeed(attack, digits_model, test_set):
    x, y = test_set
    eps = 0.15
    r = attack(digits_model, x, y, eps=eps)
    assert r.images.dtype == np.float32 and r.images.shape == x.shape
    assert r.images.min() >= 0 and r.images.max() <= 1
    assert np.abs(r.images - x / 255.0).max() <= eps + 1e-6
    assert r.success_rate > 0.5, "far above the ~2 % a 98 %-accurate model misclassifies by chance"
    assert np.array_equal(r.success, r.adv_pred != y)
    assert np.array_equal(r.adv_pred, predict(digits_model, r.images))


def test_pgd_beats_fgsm_and_grows_with_eps(digits_model, test_set):
    x, y = test_set
    rates = [pgd(digits_model, x, y, eps=e).success_rate for e in (0.03, 0.1, 0.2)]
    assert rates[0] < rates[1] < rates[2] and rates[2] > 0.9
    assert pgd(digits_model, x, y, eps=0.1).success_rate >= fgsm(digits_model, x, y, eps=0.1).success_rate


def test_pgd_l2_ball(digits_model, test_set):
    x, y = test_set
    r = pgd(digits_model, x, y, eps=1.0, norm="l2", steps=10)
    d = np.sqrt(((r.images - x / 255.0) ** 2).reshape(len(x), -1).sum(1))
    assert d.max() <= 1.0 + 1e-4 and r.success_rate > 0.5
    with pytest.raises(ValueError):
        pgd(digits_model, x, y, norm="l2")  # an L2 radius has no default


def test_determinism_batch_independence_and_input_types(digits_model, test_set):
    x, y = test_set
    a = pgd(digits_model, x, y, eps=0.1, seed=1)
    b = pgd(digits_model, x, y, eps=0.1, seed=1, batch_size=7)
    c = pgd(digits_model, x, y, eps=0.1, seed=2)
    assert np.allclose(a.images, b.images, atol=1e-6), "same seed, any batch size"
    assert not np.allclose(a.images, c.images)
    f = pgd(digits_model, x.astype(np.float32) / 255.0, y, eps=0.1, seed=1)
    assert np.allclose(a.images, f.images, atol=1e-6), "uint8 and float [0,1] inputs are the same images"
    with pytest.raises(ValueError):
        pgd(digits_model, x.astype(np.float32), y)  # floats outside [0, 1]


def test_targeted(digits_model, test_set):
    x, y = test_set
    keep = y != 3
    r = pgd(digits_model, x[keep], y[keep], eps=0.25, steps=20, targets=3)
    assert np.array_equal(r.success, r.adv_pred == 3) and r.success_rate > 0.5


def test_cw_l2_finds_small_perturbations(digits_model, test_set):
    x, y = test_set[0][:40], test_set[1][:40]
    r = cw_l2(digits_model, x, y, steps=50, binary_search_steps=4)
    assert r.success_rate > 0.6
    d = np.sqrt(((r.images - x / 255.0) ** 2).reshape(len(x), -1).sum(1))
    assert np.all(d[~r.success] < 1e-3), "failures come back unchanged"
    # CW's perturbations are far smaller in L2 than a PGD-L∞ example at a comparable success rate
    p = pgd(digits_model, x, y, eps=0.2)
    dp = np.sqrt(((p.images - x / 255.0) ** 2).reshape(len(x), -1).sum(1))
    both = r.success & p.success
    assert np.median(d[both]) < np.median(dp[both])


def test_quantize_stays_in_the_ball(digits_model, test_set):
    x, y = test_set
    eps = 0.1  # 25.5 / 255: plain rounding can exceed it
    r = pgd(digits_model, x, y, eps=eps)
    q = quantize(r.images, x, eps)
    assert q.dtype == np.uint8 and np.abs(q.astype(int) - x).max() <= 25
    plain = quantize(r.images)
    assert np.abs(plain.astype(int) - x).max() == 26, "rounding alone leaves the ball here"
    _, success_q = evaluate(digits_model, q, y)
    assert abs(success_q[r.clean_correct].mean() - r.success_rate) < 0.2


def test_dispatch_defaults_and_mode_restored(digits_model, test_set):
    x, y = test_set
    assert default_eps(3) == 8 / 255 and default_eps(1) == 0.1
    digits_model.train()
    r = run_attack("fgsm", digits_model, x[:10], y[:10])
    assert digits_model.training, "the model's train/eval mode is restored"
    digits_model.eval()
    assert r.params["eps"] == 0.1 and r.summary()["n"] == 10
    with pytest.raises(ValueError):
        run_attack("deepfool", digits_model, x, y)
    with pytest.raises(TypeError):
        run_attack("fgsm", digits_model, x, y, steps=3)
    assert torch.is_grad_enabled()
