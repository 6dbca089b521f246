"""Baselines: max-softmax, energy, STRIP."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import logsumexp, softmax

from abl_guard.detectors import Energy, MaxSoftmax, NotFittedError, Strip, detector_from_state, make_detector


def test_msp_and_energy_match_their_formulas():
    logits = np.random.default_rng(0).normal(0, 3, (40, 7))
    obs = {"logits": logits}
    msp = MaxSoftmax(chunk_size=7).fit(obs)
    np.testing.assert_allclose(msp.score(obs), -softmax(logits, axis=1).max(1))
    en = Energy(temperature=2.0).fit(obs)
    np.testing.assert_allclose(en.score(obs), -2.0 * logsumexp(logits / 2.0, axis=1))
    assert not msp.two_sided and not en.two_sided
    # an over-confident input is extreme on the low tail of both scores
    assert msp.score({"logits": np.eye(7)[:1] * 100})[0] <= msp.score(obs).min()


def test_two_sided_variant_survives_the_bundle_round_trip():
    obs = {"logits": np.random.default_rng(1).normal(size=(10, 3))}
    det = make_detector("energy", two_sided=True).fit(obs)
    back = detector_from_state("energy", det.get_params(), det.state_dict())
    assert back.two_sided and type(back).two_sided is False
    np.testing.assert_array_equal(back.score(obs), det.score(obs))
    with pytest.raises(ValueError, match="classes"):
        back.score({"logits": np.zeros((2, 4))})
    with pytest.raises(NotFittedError):
        MaxSoftmax().score(obs)


def test_strip_blends_and_entropy_with_one_call_per_chunk(linear_model):
    model = linear_model(num_classes=5)
    rng = np.random.default_rng(2)
    ref = rng.random((100, 1, 6, 6)).astype(np.float32)
    x = rng.random((23, 1, 6, 6)).astype(np.float32)
    det = Strip(n_blend=8, alpha=0.5, seed=0, chunk_size=40).fit(model.observe(ref))
    assert det.clean_.shape == (8, 1, 6, 6)
    assert all(any(np.array_equal(c, r) for r in ref) for c in det.clean_)  # drawn from the reference
    model.calls = 0
    got = det.score(model.observe(x), model)
    assert model.calls == 5 and model.images == 23 * 8  # 40 // 8 = 5 inputs (40 blends) per call
    want = []
    for xi in x:
        p = softmax(model.logits(np.clip(0.5 * xi[None] + 0.5 * det.clean_, 0, 1)), axis=1)
        want.append(np.mean(-(p * np.log2(p)).sum(1)))
    np.testing.assert_allclose(got, want, atol=1e-9)
    back = Strip.from_state(det.get_params(), det.state_dict())
    np.testing.assert_array_equal(back.score(model.observe(x), model), got)


def test_strip_is_seeded_and_checks_inputs(linear_model):
    model = linear_model()
    ref = np.random.default_rng(3).random((80, 1, 6, 6)).astype(np.float32)
    a = Strip(n_blend=16, seed=1).fit(model.observe(ref))
    b = Strip(n_blend=16, seed=1).fit(model.observe(ref))
    c = Strip(n_blend=16, seed=2).fit(model.observe(ref))
    np.testing.assert_array_equal(a.clean_, b.clean_)
    assert not np.array_equal(a.clean_, c.clean_)
    with pytest.raises(ValueError, match="n_blend"):
        Strip(n_blend=100).fit(model.observe(ref))
    with pytest.raises(ValueError, match="shape"):
        a.score({"input": np.zeros((2, 1, 5, 5), np.float32)}, model)
    with pytest.raises(ValueError, match="model"):
        a.score(model.observe(ref[:2]), None)
    with pytest.raises(NotFittedError):
        Strip().score(model.observe(ref), model)
    with pytest.raises(ValueError, match="n_blend"):
        Strip.from_state({"n_blend": 8}, a.state_dict())


def test_strip_sees_low_entropy_on_triggered_inputs(tiny_backdoored):
    from abl_guard.guard.model import OnnxModel
    from abl_guard.guard.preprocess import to_model_input
    from abl_guard.guard.runtime import observe

    model = OnnxModel(tiny_backdoored["onnx"])
    test, trig_set = tiny_backdoored["test"], tiny_backdoored["triggered"]
    ref = observe(model, to_model_input(test.images[:150], model.input_shape))
    det = Strip(n_blend=32).fit(ref)
    clean = det.score(observe(model, to_model_input(test.images[150:], model.input_shape)), model)
    trig = det.score(observe(model, to_model_input(trig_set.images[trig_set.indices >= 150], model.input_shape)),
                     model)
    assert np.median(trig) < np.median(clean)
