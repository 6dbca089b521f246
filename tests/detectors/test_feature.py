"""Feature-space lens: Mahalanobis (one tap and several), k-NN distance, deep k-NN, the early-layer probe — checked
against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.covariance import EmpiricalCovariance
from sklearn.neighbors import NearestNeighbors

from abl_guard.detectors import (
    DeepKNN,
    KNNDistance,
    LayerMahalanobis,
    LayerProbe,
    Mahalanobis,
    NotFittedError,
    make_detector,
)


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


def _dknn_want(obs_fit, y, obs_test, taps, k):
    """The paper's nonconformity by scikit-learn: per tap, normalise, centre on the bank mean, k nearest neighbours
    (Euclidean), count labels; the score is (taps x k) minus the largest label count."""
    counts = np.zeros((len(obs_test[taps[0]]), int(y.max()) + 1), int)
    for t in taps:
        f = obs_fit[t].reshape(len(obs_fit[t]), -1).astype(np.float64)
        q = obs_test[t].reshape(len(obs_test[t]), -1).astype(np.float64)
        f /= np.linalg.norm(f, axis=1, keepdims=True)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        c = f.mean(0)
        idx = NearestNeighbors(n_neighbors=k).fit(f - c).kneighbors(q - c)[1]
        for i, row in enumerate(idx):
            counts[i] += np.bincount(y[row], minlength=counts.shape[1])
    return len(taps) * k - counts.max(1)


def test_dknn_matches_the_papers_nonconformity_by_sklearn():
    x, y = _clusters(n=300, d=8)
    rng = np.random.default_rng(4)
    conv = (rng.normal(size=(300, 3, 2, 2)) + y[:, None, None, None]).astype(np.float32)
    fit = {"block": conv, "penultimate": x, "logits": x[:, :3] * 2}
    test_x, _ = _clusters(n=40, d=8, seed=5)
    test = {"block": (rng.normal(size=(40, 3, 2, 2)) + 1).astype(np.float32), "penultimate": test_x,
            "logits": test_x[:, :3] * 2}
    det = DeepKNN(taps=["block", "penultimate", "logits"], k=7, max_bank=None, pool=False, chunk_size=9).fit(fit, y)
    assert det.requires == ("block", "penultimate", "logits")
    got = det.score(test)
    np.testing.assert_array_equal(got, _dknn_want(fit, y, test, ["block", "penultimate", "logits"], 7))
    # pool=True reads a conv tap by its channel means
    pooled = DeepKNN(taps=["block"], k=7, max_bank=None).fit(fit, y)
    np.testing.assert_array_equal(pooled.score(test), _dknn_want({"block": conv.mean((2, 3))}, y,
                                                                {"block": test["block"].mean((2, 3))}, ["block"], 7))
    # scores are integers in [0, taps * k]; the bank's own points sit in agreeing neighbourhoods
    assert set(np.unique(got)) <= set(range(0, 22))
    assert np.median(det.score(fit)) < np.median(got)


def test_dknn_flags_inputs_whose_layers_disagree():
    """An input that looks like class 0 at the first tap and class 1 at the second (what an adversarial example or
    a trigger does to the layers) scores above every consistent input."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 5, (3, 6))
    y = rng.integers(0, 3, 600)
    obs = {"a": centres[y] + rng.normal(size=(600, 6)), "b": centres[y][:, ::-1] + rng.normal(size=(600, 6))}
    det = DeepKNN(taps=["a", "b"], k=20).fit(obs, y)
    yt = rng.integers(0, 3, 100)
    clean = {"a": centres[yt] + rng.normal(size=(100, 6)), "b": centres[yt][:, ::-1] + rng.normal(size=(100, 6))}
    mixed = {"a": centres[np.zeros(20, int)] + rng.normal(size=(20, 6)),
             "b": centres[np.ones(20, int)][:, ::-1] + rng.normal(size=(20, 6))}
    assert det.score(mixed).min() > det.score(clean).max()
    np.testing.assert_array_equal(det.score(mixed), 20.0)


def test_dknn_taps_default_to_every_tap_and_logits_and_the_state_round_trips():
    x, y = _clusters(n=200, d=6)
    obs = {"input": np.zeros((200, 1, 2, 2), np.float32), "block1": x[:, :4], "penultimate": x,
           "logits": x[:, :3]}
    det = DeepKNN(k=5, max_bank=150, seed=2).fit(obs, y)
    assert det.taps_ == ["block1", "penultimate", "logits"]
    assert len(det.bank_labels_) == 150
    back = DeepKNN.from_state(det.get_params(), det.state_dict())
    np.testing.assert_array_equal(back.score(obs), det.score(obs))
    # the batch shape does not change a score (float64 search)
    one = np.concatenate([det.score({k: v[i:i + 1] for k, v in obs.items()}) for i in range(0, 200, 7)])
    np.testing.assert_array_equal(one, det.score(obs)[::7])
    bad = det.state_dict()
    bad["labels"] = bad["labels"][:10]
    with pytest.raises(ValueError, match="dknn state"):
        DeepKNN.from_state(det.get_params(), bad)


def test_dknn_errors():
    x, y = _clusters(n=30, d=4)
    obs = {"penultimate": x, "logits": x[:, :3]}
    with pytest.raises(NotFittedError):
        DeepKNN().score(obs)
    with pytest.raises(ValueError, match="labels"):
        DeepKNN().fit(obs)
    with pytest.raises(ValueError, match="k=75"):
        DeepKNN().fit(obs, y)
    with pytest.raises(ValueError, match="no tap 'nope'"):
        DeepKNN(taps=["nope"], k=3).fit(obs, y)
    det = DeepKNN(k=3).fit(obs, y)
    with pytest.raises(ValueError, match="features"):
        det.score({"penultimate": np.ones((2, 5)), "logits": np.ones((2, 3))})


def _balanced(per_class=60, d=5, k=3, seed=0):
    """Clusters with equal class counts (scikit-learn's LDA weights class covariances by its priors)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(k), per_class)
    centres = rng.normal(0, 2.0, (k, d))
    mix = rng.normal(size=(d, d))
    return (centres[y] + rng.normal(size=(len(y), d)) @ mix).astype(np.float32), y


def test_probe_is_the_lda_posterior_of_the_predicted_label():
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    x, y = _balanced()
    test, _ = _balanced(per_class=10, seed=1)
    pred = np.random.default_rng(2).integers(0, 3, len(test))
    logits = np.eye(3)[pred]
    det = LayerProbe(tap="penultimate", shrinkage=0.0, chunk_size=7).fit({"penultimate": x, "logits": np.eye(3)[y]}, y)
    assert det.grid_ == 0 and det.requires == ("penultimate", "logits")
    lda = LinearDiscriminantAnalysis(solver="lsqr", priors=np.full(3, 1 / 3)).fit(x.astype(np.float64), y)
    want = -lda.predict_log_proba(test.astype(np.float64))[np.arange(len(test)), pred]
    np.testing.assert_allclose(det.score({"penultimate": test, "logits": logits}), want, rtol=1e-6, atol=1e-8)


def test_probe_folds_overlapping_pooling_bins_into_its_coefficients():
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    from abl_guard.detectors._util import adaptive_avg_pool

    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(3), 80)
    act = (rng.normal(size=(len(y), 2, 5, 5)) + y[:, None, None, None] * rng.normal(size=(1, 2, 5, 5))).astype(
        np.float32)
    det = LayerProbe(tap="block", grid=3, shrinkage=0.0).fit({"block": act, "logits": np.eye(3)[y]}, y)
    assert det.grid_ == 3 and det.folded_.shape == (2 * 5 * 5, 3)  # 5 -> 3 bins overlap (0:2, 1:4, 3:5)
    test = rng.normal(size=(20, 2, 5, 5)).astype(np.float32)
    pooled = adaptive_avg_pool(act, 3)
    lda = LinearDiscriminantAnalysis(solver="lsqr", priors=np.full(3, 1 / 3)).fit(pooled, y)
    np.testing.assert_allclose(det.class_log_posterior({"block": test}),
                               lda.predict_log_proba(adaptive_avg_pool(test, 3)), rtol=1e-6, atol=1e-8)


def test_probe_flags_a_prediction_its_early_layer_disagrees_with():
    x, y = _balanced(per_class=80, d=6, k=4)
    conv = np.repeat(np.repeat(x[:, :, None, None], 4, axis=2), 4, axis=3)  # (N, 6, 4, 4): a conv tap
    conv = conv + np.random.default_rng(3).normal(0, 0.3, conv.shape).astype(np.float32)
    det = make_detector("probe").fit({"block": conv, "logits": np.eye(4)[y]}, y)
    assert det.tap_ == "block" and det.grid_ == 4  # "@0": the first tap; 6 * 4 * 4 features fit max_features
    agree = det.score({"block": conv, "logits": np.eye(4)[y]})
    flipped = det.score({"block": conv, "logits": np.eye(4)[(y + 1) % 4]})
    assert np.median(agree) < 0.1 < np.median(flipped)
    assert np.mean(flipped > np.quantile(agree, 0.99)) > 0.9
    back = LayerProbe.from_state(det.get_params(), det.state_dict())
    np.testing.assert_array_equal(back.score({"block": conv, "logits": np.eye(4)[y]}), agree)


def test_probe_grid_shrinks_to_max_features_and_unknown_classes_score_inf():
    rng = np.random.default_rng(0)
    act = rng.normal(size=(90, 16, 8, 8)).astype(np.float32)
    y = np.repeat([0, 2, 3], 30)  # class 1 absent
    obs = {"block": act, "logits": np.eye(4)[y]}
    det = LayerProbe(max_features=100).fit(obs, y)
    assert det.grid_ == 2  # 16 * 3 * 3 = 144 > 100 >= 16 * 2 * 2
    s = det.score({"block": act[:3], "logits": np.eye(5)[[0, 1, 4]]})
    assert np.isfinite(s[0]) and s[1] == np.inf and s[2] == np.inf


def test_probe_errors():
    x, y = _balanced()
    obs = {"penultimate": x, "logits": np.eye(3)[y]}
    with pytest.raises(NotFittedError):
        LayerProbe().score(obs)
    with pytest.raises(ValueError, match="labels"):
        LayerProbe().fit(obs)
    for bad in ({"grid": 0}, {"max_features": 0}, {"shrinkage": 1.5}, {"shrinkage": "wide"}):
        with pytest.raises(ValueError):
            LayerProbe(**bad)
    det = LayerProbe().fit(obs, y)
    for wrong in (np.ones((2, 4)), np.ones((2, 5, 1, 1))):
        with pytest.raises(ValueError, match="shape"):
            det.score({"penultimate": wrong, "logits": np.ones((2, 3))})


def test_probe_says_it_is_uninformative_at_the_feature_tap():
    x, y = _balanced()
    conv = np.repeat(np.repeat(x[:, :, None, None], 2, axis=2), 2, axis=3)
    obs = {"block": conv, "penultimate": x, "logits": np.eye(3)[y]}
    assert LayerProbe().fit(obs, y).uninformative() is None  # "@0": the conv block
    assert "feature tap" in LayerProbe(tap="@-1").fit(obs, y).uninformative()
    assert "feature tap" in LayerProbe().fit({"penultimate": x, "logits": np.eye(3)[y]}, y).uninformative()
    assert make_detector("mahalanobis").fit(obs, y).uninformative() is None


def test_probe_auto_shrinkage_is_ledoit_wolfs_intensity():
    from sklearn.covariance import ledoit_wolf_shrinkage

    rng = np.random.default_rng(5)
    y = np.repeat(np.arange(3), 20)
    x = (rng.normal(size=(60, 40)) + y[:, None]).astype(np.float32)  # 40 features, 60 inputs: worth shrinking
    obs = {"penultimate": x, "logits": np.eye(3)[y]}
    det = LayerProbe(shrinkage="auto").fit(obs, y)
    centred = x.astype(np.float64) - np.stack([x[y == c].mean(0) for c in range(3)]).astype(np.float64)[y]
    assert det.shrinkage_ == pytest.approx(ledoit_wolf_shrinkage(centred, assume_centered=True), rel=1e-6)
    assert 0.0 < det.shrinkage_ < 1.0
    fixed = LayerProbe(shrinkage=det.shrinkage_).fit(obs, y)
    np.testing.assert_allclose(det.score(obs), fixed.score(obs), rtol=1e-9)


def test_probe_pools_first_when_the_folded_map_would_be_too_big(monkeypatch):
    import abl_guard.detectors.feature as feature

    rng = np.random.default_rng(6)
    y = np.repeat(np.arange(3), 40)
    act = (rng.normal(size=(len(y), 3, 6, 6)) + y[:, None, None, None]).astype(np.float32)
    obs = {"block": act, "logits": np.eye(3)[y]}
    folded = LayerProbe(grid=4).fit(obs, y)
    monkeypatch.setattr(feature, "FOLD_MAX_ENTRIES", 10)
    pooled = LayerProbe(grid=4).fit(obs, y)
    assert folded.folded_ is not None and pooled.folded_ is None
    np.testing.assert_allclose(pooled.score(obs), folded.score(obs), rtol=1e-9, atol=1e-12)
