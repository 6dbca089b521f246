"""Activation-space lens: NIC's value and provenance invariants; Sastry & Oore's Gram-matrix deviations."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.svm import OneClassSVM

from abl_guard.detectors import NIC, GramDeviation, NotFittedError, activation, make_detector
from abl_guard.detectors.activation import RbfOneClassSVM, gram_features

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


# ------------------------------------------------------------------------------------------ gram


def _brute_gram(act, powers):
    """Sastry & Oore's G_p row sums, one input and one power at a time, from the explicit C x C matrix."""
    out = []
    for a in np.asarray(act, np.float64):
        f = a.reshape(a.shape[0], -1)
        row = []
        for p in range(1, powers + 1):
            g = ((f**p) @ (f**p).T).sum(axis=1)
            row.append(np.sign(g) * np.abs(g) ** (1 / p))
        out.append(np.concatenate(row))
    return np.array(out)


@pytest.mark.parametrize("powers", [1, 3])
def test_gram_features_match_the_explicit_matrix(powers):
    rng = np.random.default_rng(0)
    act = rng.normal(0, 1.5, (5, 3, 4, 4)).astype(np.float32)  # negative values: the signed root matters
    np.testing.assert_allclose(gram_features(act, powers), _brute_gram(act, powers), rtol=1e-5, atol=1e-4)
    vec = rng.normal(size=(4, 6)).astype(np.float32)  # a dense tap is a 1 x 1 map
    np.testing.assert_allclose(gram_features(vec, powers), _brute_gram(vec[:, :, None], powers), rtol=1e-5,
                               atol=1e-4)


def test_gram_features_in_blocks_of_inputs_give_the_same_numbers(monkeypatch):
    """The higher orders run a few inputs at a time (cache-sized blocks); any block size gives the same features."""
    act = np.random.default_rng(3).normal(0, 1.5, (7, 3, 4, 4)).astype(np.float32)
    whole = gram_features(act, 4)
    monkeypatch.setattr(activation, "_GRAM_BLOCK_BYTES", 3 * 8 * 3 * 16)  # three inputs per block: 3 + 3 + 1
    np.testing.assert_allclose(gram_features(act, 4), whole, rtol=1e-12)
    np.testing.assert_allclose(whole, _brute_gram(act, 4), rtol=1e-5, atol=1e-4)
    for powers in (1, 4):  # an empty batch is an empty feature matrix, not a reshape error
        assert gram_features(act[:0], powers).shape == (0, powers * 3)


def test_gram_features_of_float16_activations_are_computed_in_float32():
    act = (np.random.default_rng(2).random((3, 8, 6, 6)) * 40).astype(np.float16)  # sums reach ~1e6 > 65504
    g = gram_features(act, 1)
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, _brute_gram(act.astype(np.float64), 1), rtol=1e-5)


def test_gram_features_do_not_overflow_on_huge_activations():
    act = np.random.default_rng(1).random((3, 2, 5, 5)).astype(np.float32) + 0.1
    g = gram_features(act, 10)
    big = gram_features(act * np.float32(1e30), 10)  # (1e30)^20 overflows float64 without the rescaling
    assert np.all(np.isfinite(big))
    np.testing.assert_allclose(big, g * 1e60, rtol=1e-6)  # a degree-2 homogeneous statistic


def _gram_net(labels, seed, spread=0.7, rho=0.0):
    """Non-negative conv-like maps whose channel means depend on the class; ``rho`` mixes channel 0 into 1
    (a changed correlation, the paper's out-of-distribution signature)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(100).uniform(0.5, 2.0, (K, 4))
    n = len(labels)
    conv = centres[labels][:, :, None, None] + rng.normal(0, spread, (n, 4, 3, 3))
    conv[:, 1] = (1 - rho) * conv[:, 1] + rho * 3 * conv[:, 0]
    return {"conv": np.maximum(conv, 0).astype(np.float32),
            "penultimate": rng.normal(0, 1, (n, 5)).astype(np.float32),
            "logits": (6.0 * np.eye(K)[labels] + rng.normal(0, 0.3, (n, K))).astype(np.float32)}


def test_gram_matches_the_paper_deviation_and_reads_conv_taps():
    labels = np.random.default_rng(0).integers(0, K, 400)
    ref = _gram_net(labels, 0)
    det = GramDeviation(powers=2, holdout=0.25).fit(ref)
    assert det.taps_ == ["conv"] and det.requires == ("conv", "logits")  # taps=None: the spatial taps only
    # bounds: per predicted class, the min / max of the 300 bounding inputs -> those score exactly 0
    g_ref = _brute_gram(ref["conv"], 2)
    pred = ref["logits"].argmax(1)
    scores = det.score(ref)
    inside = scores == 0
    assert inside.sum() >= 300
    for c in range(K):
        m = inside & (pred == c)
        np.testing.assert_allclose(det.lo_[c], g_ref[m].min(0), rtol=1e-5)
        np.testing.assert_allclose(det.hi_[c], g_ref[m].max(0), rtol=1e-5)
    # the normaliser: the mean deviation of the held-out 100 (the bounding inputs contribute 0)
    new = _gram_net(np.random.default_rng(3).integers(0, K, 50), 3, rho=0.5)
    conf = np.exp(new["logits"] - new["logits"].max(1, keepdims=True))
    conf = (conf / conf.sum(1, keepdims=True)).max(1)
    g = _brute_gram(new["conv"], 2)
    want = []
    for i, c in enumerate(new["logits"].argmax(1)):
        lo, hi = det.lo_[c], det.hi_[c]
        dev = (np.maximum(lo - g[i], 0) / np.abs(lo + 1e-6) + np.maximum(g[i] - hi, 0) / np.abs(hi + 1e-6)).sum()
        want.append(dev / conf[i] / det.norm_[0])
    np.testing.assert_allclose(det.score(new), want, rtol=1e-5)
    held = ~inside
    raw = det.score(ref) * det.norm_[0]
    np.testing.assert_allclose(det.norm_[0], raw.sum() / 100 + 1e-7, rtol=1e-6)
    assert held.sum() <= 100


def test_gram_flags_changed_correlations_and_round_trips():
    from sklearn.metrics import roc_auc_score

    ref = _gram_net(np.random.default_rng(0).integers(0, K, 600), 0)
    det = GramDeviation().fit(ref)
    clean = _gram_net(np.random.default_rng(1).integers(0, K, 200), 1)
    shifted = _gram_net(np.random.default_rng(2).integers(0, K, 200), 2, rho=0.6)
    s_clean, s_shift = det.score(clean), det.score(shifted)
    assert roc_auc_score(np.r_[np.zeros(200), np.ones(200)], np.r_[s_clean, s_shift]) > 0.95
    # one input at a time scores as the whole batch does
    single = np.concatenate([det.score({k: v[i : i + 1] for k, v in shifted.items()}) for i in range(20)])
    np.testing.assert_allclose(single, s_shift[:20], rtol=1e-6)
    back = make_detector("gram").from_state(det.get_params(), det.state_dict())
    np.testing.assert_array_equal(back.score(shifted), s_shift)
    assert back.requires == det.requires


def test_gram_pooled_fallback_explicit_taps_and_errors():
    labels = np.r_[np.zeros(200, int), np.ones(200, int), np.full(2, 2)]  # class 2: too few to bound; 3: none
    ref = _gram_net(labels, 0)
    det = GramDeviation(taps="conv,penultimate", holdout=0.2, seed=1).fit(ref)
    assert det.taps_ == ["conv", "penultimate"] and len(det.norm_) == 2
    assert det.pooled_.tolist() == [False, False, True, True]
    np.testing.assert_array_equal(det.lo_[3], det.lo_[2])  # both use the bounds pooled over all classes
    assert np.all(det.lo_[3] <= det.lo_[0]) and np.all(det.hi_[3] >= det.hi_[0])
    dense_only = {k: v for k, v in ref.items() if k != "conv"}
    assert GramDeviation().fit(dense_only).taps_ == ["penultimate"]  # no spatial tap: every tap
    with pytest.raises(ValueError, match="no tap 'block9'"):
        GramDeviation(taps=["block9"]).fit(ref)
    with pytest.raises(ValueError, match="powers"):
        GramDeviation(powers=0)
    with pytest.raises(ValueError, match="holdout"):
        GramDeviation(holdout=1.0)
    with pytest.raises(ValueError, match="bound and to hold out"):
        GramDeviation(holdout=0.5).fit({k: v[:1] for k, v in ref.items()})
    with pytest.raises(NotFittedError):
        GramDeviation().score(ref)
    with pytest.raises(ValueError, match="classes"):
        det.score({**ref, "logits": ref["logits"][:, :3]})
    state = det.state_dict()
    with pytest.raises(ValueError, match="inconsistent"):
        GramDeviation.from_state(det.get_params(), {**state, "sizes": state["sizes"][:1]})


def test_gram_flags_far_out_of_distribution_inputs_on_a_trained_model(tiny_backdoored):
    """The paper's use on a real model: inverted digits and noise images fall outside the clean Gram bounds."""
    from abl_guard.guard.model import OnnxModel
    from abl_guard.guard.preprocess import to_model_input
    from abl_guard.guard.runtime import observe

    model = OnnxModel(tiny_backdoored["onnx"])
    test = tiny_backdoored["test"]

    def obs(images):
        return observe(model, to_model_input(images, model.input_shape), ["logits", *model.tap_names])

    det = GramDeviation().fit(obs(test.images[:250]), model=model)
    assert det.taps_ == ["block1", "block2", "block3"]
    clean = det.score(obs(test.images[250:]))
    inverted = det.score(obs(255 - test.images[250:]))
    noise = det.score(obs(np.random.default_rng(0).integers(0, 256, test.images[250:].shape, dtype=np.uint8)))
    thr = np.quantile(clean, 0.95)
    assert (inverted > thr).mean() > 0.9 and (noise > thr).mean() > 0.9
