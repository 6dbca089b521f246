import numpy as np
import pytest
from sklearn.covariance import EmpiricalCovariance

from abl_guard.detectors import Mahalanobis, NotFittedError, detector_from_state, make_detector


def _data(n=600, d=6, k=3, seed=0):
    r = np.random.default_rng(seed)
    labels = r.integers(0, k, n)
    means = r.normal(0, 3, (k, d))
    A = r.normal(0, 1, (d, d))
    feats = means[labels] + r.normal(0, 1, (n, d)) @ A.T
    return feats, labels


def test_matches_sklearn_empirical_covariance():
    feats, labels = _data()
    det = Mahalanobis(ridge=0.0).fit({"penultimate": feats}, labels)
    means = np.stack([feats[labels == c].mean(0) for c in range(3)])
    ref = EmpiricalCovariance(assume_centered=True).fit(feats - means[labels])
    x = np.random.default_rng(1).normal(0, 4, (50, 6))
    want = np.min(np.stack([ref.mahalanobis(x - means[c]) for c in range(3)], 1), axis=1)
    got = det.score({"penultimate": x})
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-8)


def test_chunked_equals_unchunked_and_state_roundtrip():
    feats, labels = _data()
    a = Mahalanobis(chunk_size=7).fit({"penultimate": feats}, labels)
    b = Mahalanobis(chunk_size=10_000).fit({"penultimate": feats}, labels)
    x = feats[:100] + 0.5
    np.testing.assert_allclose(a.score({"penultimate": x}), b.score({"penultimate": x}))
    back = detector_from_state("mahalanobis", a.get_params(), a.state_dict())
    np.testing.assert_allclose(back.score({"penultimate": x}), a.score({"penultimate": x}))
    assert all(isinstance(v, np.ndarray) and v.dtype != object for v in a.state_dict().values())


def test_outliers_score_higher_and_4d_taps_are_pooled():
    feats, labels = _data()
    det = Mahalanobis().fit({"penultimate": feats}, labels)
    assert det.score({"penultimate": feats + 20}).mean() > 10 * det.score({"penultimate": feats}).mean()
    maps = np.repeat(feats[:, :, None, None], 3, axis=2).repeat(3, axis=3)
    det4 = Mahalanobis(tap="block").fit({"block": maps}, labels)
    np.testing.assert_allclose(det4.score({"block": maps[:5]}), det.score({"penultimate": feats[:5]}), rtol=1e-6)


def test_errors():
    feats, labels = _data()
    with pytest.raises(NotFittedError):
        Mahalanobis().score({"penultimate": feats})
    with pytest.raises(ValueError, match="labels"):
        Mahalanobis().fit({"penultimate": feats})
    det = Mahalanobis().fit({"penultimate": feats}, labels)
    with pytest.raises(ValueError, match="features"):
        det.score({"penultimate": feats[:, :4]})
    with pytest.raises(KeyError, match="penultimate"):
        det.score({"logits": feats})
    with pytest.raises(TypeError):
        make_detector("mahalanobis", nonsense=1)
