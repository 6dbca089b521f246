"""Activation-space lens: NIC's value and provenance invariants."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.svm import OneClassSVM

from abl_guard.detectors import NIC, NotFittedError, make_detector
from abl_guard.detectors.activation import RbfOneClassSVM

K = 4


def _network(labels, seed, mismatch_first=None):
    """Synthetic 3-layer activations: a conv-like layer, two dense layers; each layer's features cluster by class.
    ``mismatch_first`` gives the first layer another class's features (a provenance break, like a trigger
    flipping the evidence mid-network)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(100)  # fixed network: the same class centres for every call
    c1 = centres.normal(0, 2, (K, 3, 4, 4))
    c2 = centres.normal(0, 2, (K, 10))
    c3 = centres.normal(0, 2, (K, 8))
    first = labels if mismatch_first is None else mismatch_first
    n = len(labels)
    return {
        "conv": (c1[first] + rng.normal(0, 0.7, (n, 3, 4, 4))).astype(np.float32),
        "dense": (c2[labels] + rng.normal(0, 0.7, (n, 10))).astype(np.float32),
        "penultimate": (c3[labels] + rng.normal(0, 0.7, (n, 8))).astype(np.float32),
        "logits": (6.0 * np.eye(K)[labels] + rng.normal(0, 0.3, (n, K))).astype(np.float32),
    }


TAPS = ["conv", "dense", "penultimate"]


@pytest.fixture(scope="module")
def fitted():
    labels = np.random.default_rng(0).integers(0, K, 800)
    return NIC(taps=TAPS, grid=2, max_dim=9, max_samples=800).fit(_network(labels, 0))


def test_rbf_osvm_arrays_match_sklearn():
    x = np.random.default_rng(0).normal(size=(200, 5))
    t = np.random.default_rng(1).normal(size=(60, 5)) * 1.5
    ref = OneClassSVM(kernel="rbf", nu=0.1, gamma="scale").fit(x)
    ours = RbfOneClassSVM.fit(x, 0.1, "scale")
    np.testing.assert_allclose(ours.decision(t, chunk=7), ref.decision_function(t), atol=1e-9)
    back = RbfOneClassSVM.from_state(ours.to_state("p__"), "p__")
    np.testing.assert_array_equal(back.decision(t), ours.decision(t))


def test_nic_layers_probes_and_pca(fitted):
    assert fitted.requires == (*TAPS, "logits")
    # conv: 3 channels x 2 x 2 grid = 12 pooled features > max_dim = 9 -> PCA; penultimate (8) stays as it is
    assert fitted.layers_[0]["components"].shape == (9, 12)
    assert fitted.layers_[2]["components"].size == 0
    labels = np.random.default_rng(5).integers(0, K, 300)
    obs = _network(labels, 5)
    for tap, layer in zip(TAPS, fitted.layers_):  # probes are trained (NIC's public code leaves them random)
        z = fitted._project(fitted._pooled(obs, tap, slice(None)), layer)
        assert (fitted._probe_proba(z, layer).argmax(1) == labels).mean() > 0.9
    assert fitted.layer_decisions(obs).shape == (300, 2 * len(TAPS) - 1)


def test_nic_flags_value_and_provenance_anomalies(fitted):
    labels = np.random.default_rng(7).integers(0, K, 400)
    clean = fitted.score(_network(labels, 7))
    assert np.mean(clean > np.quantile(clean, 0.5)) == pytest.approx(0.5, abs=0.01)
    far = _network(labels[:50], 8)
    far["dense"] = far["dense"] + 15.0  # off the activation manifold
    assert np.mean(fitted.score(far) > np.quantile(clean, 0.99)) > 0.9
    # provenance break: every layer alone looks like clean data of some class, but the first layer disagrees
    flipped = _network(labels[:100], 9, mismatch_first=(labels[:100] + 1) % K)
    dec_clean = fitted.layer_decisions(_network(labels, 7))
    dec_flip = fitted.layer_decisions(flipped)
    vi_conv, pi_conv_dense = 0, len(TAPS)
    assert np.median(dec_flip[:, vi_conv]) > np.quantile(dec_clean[:, vi_conv], 0.05)  # values look normal
    assert np.mean(dec_flip[:, pi_conv_dense] < np.quantile(dec_clean[:, pi_conv_dense], 0.05)) > 0.8
    assert np.mean(fitted.score(flipped) > np.quantile(clean, 0.95)) > 0.8


def test_nic_is_seeded_round_trips_and_chunks(fitted):
    labels = np.random.default_rng(0).integers(0, K, 800)
    again = NIC(taps=TAPS, grid=2, max_dim=9, max_samples=800).fit(_network(labels, 0))
    obs = _network(np.random.default_rng(3).integers(0, K, 50), 3)
    np.testing.assert_array_equal(again.score(obs), fitted.score(obs))
    back = make_detector("nic", **{**fitted.get_params(), "chunk_size": 9})
    back._load_state(fitted.state_dict())
    np.testing.assert_allclose(back.score(obs), fitted.score(obs), atol=1e-10)


def test_nic_errors(fitted):
    labels = np.random.default_rng(0).integers(0, K, 100)
    with pytest.raises(NotFittedError):
        NIC(taps=TAPS).score(_network(labels, 0))
    bad = _network(labels, 0)
    bad["dense"] = bad["dense"][:, :7]
    with pytest.raises(ValueError, match="features"):
        fitted.score(bad)
    one_class = _network(np.zeros(50, np.int64), 0)
    with pytest.raises(ValueError, match="two classes"):
        NIC(taps=TAPS).fit(one_class)
    with pytest.raises(ValueError):
        NIC(taps=[])
    assert NIC(taps="a,b").taps == ["a", "b"]
