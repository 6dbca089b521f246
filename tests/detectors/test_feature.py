"""Feature-space lens: Mahalanobis (one tap and several), k-NN distance — checked against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.covariance import EmpiricalCovariance
from sklearn.neighbors import NearestNeighbors

from abl_guard.detectors import KNNDistance, LayerMahalanobis, Mahalanobis, NotFittedError, make_detector


def _clusters(n=400, d=6, k=3, seed=0, spread=4.0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    centres = rng.normal(0, spread, (k, d))
    mix = rng.normal(size=(d, d))
    return (centres[labels] + rng.normal(size=(n, d)) @ mix).astype(np.float32), labels


def test_mahalanobis_matches_sklearn_empirical_covariance():
    x, y = _clusters()
    det = Mahalanobis(ridge=0.0, chunk_size=37).fit({"penultimate": x}, y)
    x64 = x.astype(np.float64)
    means = np.stack([x64[y == c].mean(0) for c in range(3)])
    cov = EmpiricalCovariance(assume_centered=True).fit(x64 - means[y])
    test, _ = _clusters(n=50, seed=1)
    test = test.astype(np.float64)
    want = np.min([cov.mahalanobis(test - m) for m in means], axis=0)
    np.testing.assert_allclose(det.score({"penultimate": test}), want, rtol=1e-6)


def test_layer_mahalanobis_combines_standardised_layer_scores():
    x, y = _clusters(d=5)
    conv = np.random.default_rng(2).normal(size=(len(x), 4, 3, 3)) + y[:, None, None, None]
    obs = {"block": conv.astype(np.float32), "penultimate": x}
    det = make_detector("mahalanobis-layers", taps=["block", "penultimate"]).fit(obs, y)
    assert det.requires == ("block", "penultimate")
    singles = [Mahalanobis(tap=t).fit(obs, y) for t in ("block", "penultimate")]
    raw = np.stack([m.score(obs) for m in singles], axis=1)
    np.testing.assert_allclose(det.score(obs), ((raw - raw.mean(0)) / raw.std(0)).mean(1), rtol=1e-9)
    z = det.layer_scores(obs)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-9)
    back = LayerMahalanobis.from_state(det.get_params(), det.state_dict())
    np.testing.assert_array_equal(back.score(obs), det.score(obs))
    far = {"block": conv[:5] + 50, "penultimate": x[:5] + 50}
    assert det.score(far).min() > det.score(obs).max()
    assert LayerMahalanobis(taps="a,b").taps == ["a", "b"]
    with pytest.raises(ValueError):
        LayerMahalanobis(taps=["a", "a"])


def test_knn_matches_sklearn_nearest_neighbors():
    x, _ = _clusters(n=300, d=8)
    test, _ = _clusters(n=70, d=8, seed=3)
    det = KNNDistance(k=5, max_bank=None, chunk_size=16).fit({"penultimate": x})
    zx = x / np.linalg.norm(x, axis=1, keepdims=True)
    zt = test / np.linalg.norm(test, axis=1, keepdims=True)
    want = NearestNeighbors(n_neighbors=5).fit(zx).kneighbors(zt)[0][:, -1]
    np.testing.assert_allclose(det.score({"penultimate": test}), want, atol=1e-4)
    # L2 normalisation: the score ignores the feature norm
    np.testing.assert_allclose(det.score({"penultimate": 7 * test}), want, atol=1e-4)


def test_knn_bank_is_seeded_and_round_trips():
    x, _ = _clusters(n=300, d=8)
    a = KNNDistance(k=3, max_bank=100, seed=0).fit({"penultimate": x})
    b = KNNDistance(k=3, max_bank=100, seed=0).fit({"penultimate": x})
    c = KNNDistance(k=3, max_bank=100, seed=1).fit({"penultimate": x})
    assert a.bank_.shape == (100, 8)
    np.testing.assert_array_equal(a.bank_, b.bank_)
    assert not np.array_equal(a.bank_, c.bank_)
    back = make_detector("knn", **a.get_params())
    back._load_state(a.state_dict())
    np.testing.assert_array_equal(back.score({"penultimate": x[:9]}), a.score({"penultimate": x[:9]}))


def test_knn_errors():
    x, _ = _clusters(n=30, d=4)
    with pytest.raises(NotFittedError):
        KNNDistance().score({"penultimate": x})
    with pytest.raises(ValueError, match="k=50"):
        KNNDistance(k=50).fit({"penultimate": x})
    det = KNNDistance(k=3).fit({"penultimate": x})
    with pytest.raises(ValueError, match="features"):
        det.score({"penultimate": np.ones((2, 5))})
    with pytest.raises(KeyError, match="penultimate"):
        det.score({"logits": np.ones((2, 4))})
