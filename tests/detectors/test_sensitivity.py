"""Sensitivity lens: model mutation (Gaussian fuzzing of the dense head) and input squeezing."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import median_filter

from abl_guard.detectors import InputSqueezing, ModelMutation, NoiseLogOdds, NotFittedError, make_detector
from abl_guard.detectors.sensitivity import bit_depth, median_smooth


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# ------------------------------------------------------------------------------------------ dense head from ONNX


def test_dense_head_reproduces_exported_logits(random_cnn_onnx):
    from abl_guard.guard.model import OnnxModel

    path, _ = random_cnn_onnx
    model = OnnxModel(path)
    x = np.random.default_rng(0).random((7, 1, 8, 8)).astype(np.float32)
    obs = model(x)
    assert [la["op"] for la in model.dense_head("pool")] == ["linear", "relu", "linear"]
    assert [la["op"] for la in model.dense_head("penultimate")] == ["linear"]
    for tap in ("pool", "penultimate"):
        h = obs[tap]
        for la in model.dense_head(tap):
            h = h @ la["weight"].T + la["bias"] if la["op"] == "linear" else np.maximum(h, 0)
        np.testing.assert_allclose(h, obs["logits"], atol=1e-5)
    with pytest.raises(ValueError, match="not part of a dense head"):
        model.dense_head("block3")
    with pytest.raises(KeyError):
        model.dense_head("nope")


def test_dense_head_reads_matmul_add_graphs(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from abl_guard.guard.model import dense_head

    rng = np.random.default_rng(1)
    w1, b1 = rng.normal(size=(6, 5)).astype(np.float32), rng.normal(size=5).astype(np.float32)
    w2, b2 = rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["feat", "W1"], ["a"]), helper.make_node("Add", ["B1", "a"], ["b"]),
             helper.make_node("Relu", ["b"], ["c"]), helper.make_node("MatMul", ["c", "W2"], ["d"]),
             helper.make_node("Add", ["d", "B2"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("feat", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(a, n) for a, n in ((w1, "W1"), (b1, "B1"), (w2, "W2"),
                                                                           (b2, "B2"))])
    onnx.save(helper.make_model(graph), str(tmp_path / "g.onnx"))
    head = dense_head(tmp_path / "g.onnx", "feat")
    assert [la["op"] for la in head] == ["linear", "relu", "linear"]
    np.testing.assert_array_equal(head[0]["weight"], w1.T)
    np.testing.assert_array_equal(head[0]["bias"], b1)
    np.testing.assert_array_equal(head[2]["weight"], w2.T)


# ------------------------------------------------------------------------------------------ model mutation


def _fitted_mutation(mlp_head, n=300, **kw):
    head = mlp_head()
    a = np.abs(np.random.default_rng(0).normal(size=(n, 16))).astype(np.float32)
    det = ModelMutation(tap="pool", **kw).fit(head.observe(a), model=head)
    return det, head, a


def test_mutants_follow_jin_et_al_gaussian_fuzzing(mlp_head):
    det, head, _ = _fitted_mutation(mlp_head, n_mutants=400, std_factor=0.65)
    for w, m in ((head.w1, det.mutants_[0]), (head.w2, det.mutants_[1])):
        noise = m - w[None]
        assert m.shape == (400, *w.shape)
        assert abs(noise.mean() - w.mean()) < 0.02 * abs(w).max()
        assert noise.std() == pytest.approx(0.65 * w.max(), rel=0.03)
    np.testing.assert_array_equal(det.biases_[0], head.b1)  # biases untouched


def test_mutation_scores_match_brute_force(mlp_head):
    for stat in ("lcr", "drop", "lcr+drop"):
        det, head, a = _fitted_mutation(mlp_head, n_mutants=20, statistic=stat, std_factor=0.5)
        a = a[:40]
        p0 = _softmax(head.forward(a))
        y0 = p0.argmax(1)
        lcr = np.zeros(len(a))
        drop = np.zeros(len(a))
        for m in range(20):
            pm = _softmax(head.forward(a, det.mutants_[0][m], det.mutants_[1][m]))
            lcr += (pm.argmax(1) != y0) / 20
            drop += (p0[np.arange(len(a)), y0] - pm[np.arange(len(a)), y0]) / 20
        want = {"lcr": lcr, "drop": drop, "lcr+drop": lcr + drop}[stat]
        np.testing.assert_allclose(det.score(head.observe(a)), want, atol=1e-5)
        assert det.two_sided and set(det.tail_kinds) == {"high", "low"}


def test_mutation_without_noise_changes_nothing_and_chunks_agree(mlp_head):
    det, head, a = _fitted_mutation(mlp_head, std_factor=0.0, mean_factor=0.0, n_mutants=5)
    np.testing.assert_allclose(det.score(head.observe(a)), 0.0, atol=1e-6)
    det, head, a = _fitted_mutation(mlp_head, n_mutants=30)
    small = ModelMutation.from_state({**det.get_params(), "chunk_size": 7}, det.state_dict())
    np.testing.assert_allclose(small.score(head.observe(a)), det.score(head.observe(a)), atol=1e-12)


def test_mutation_is_seeded_and_round_trips(mlp_head):
    d1, head, a = _fitted_mutation(mlp_head, seed=3)
    d2, _, _ = _fitted_mutation(mlp_head, seed=3)
    d3, _, _ = _fitted_mutation(mlp_head, seed=4)
    np.testing.assert_array_equal(d1.mutants_[0], d2.mutants_[0])
    assert not np.array_equal(d1.mutants_[0], d3.mutants_[0])
    back = make_detector("mutation", **d1.get_params())
    back._load_state(d1.state_dict())
    np.testing.assert_array_equal(back.score(head.observe(a)), d1.score(head.observe(a)))


def test_mutation_errors(mlp_head):
    head = mlp_head()
    a = np.ones((10, 16), np.float32)
    with pytest.raises(NotFittedError):
        ModelMutation(tap="pool").score(head.observe(a))
    with pytest.raises(ValueError, match="dense_head"):
        ModelMutation(tap="pool").fit(head.observe(a), model=None)
    wrong = head.observe(a)
    wrong["logits"] = wrong["logits"] + 1.0  # the head no longer explains the logits
    with pytest.raises(ValueError, match="does not reproduce"):
        ModelMutation(tap="pool").fit(wrong, model=head)
    det, _, _ = _fitted_mutation(mlp_head)
    with pytest.raises(ValueError, match="features"):
        det.score({"pool": np.ones((3, 9), np.float32), "logits": np.ones((3, 5))})
    with pytest.raises(ValueError, match="statistic"):
        ModelMutation(statistic="sprt")


def test_mutation_finds_backdoor_inputs_stable(tiny_backdoored):
    """Jin et al.'s observation on a real backdoored model: triggered inputs flip less under mutation."""
    from abl_guard.guard.model import OnnxModel
    from abl_guard.guard.preprocess import to_model_input
    from abl_guard.guard.runtime import observe

    model = OnnxModel(tiny_backdoored["onnx"])
    test = tiny_backdoored["test"]
    ref = observe(model, to_model_input(test.images[:150], model.input_shape))
    det = ModelMutation(tap="pool").fit(ref, model=model)
    clean = det.score(observe(model, to_model_input(test.images[150:], model.input_shape)))
    trig = det.score(observe(model, to_model_input(tiny_backdoored["triggered"].images, model.input_shape)))
    assert np.median(trig) < np.median(clean)


# ------------------------------------------------------------------------------------------ input squeezing


def test_squeezers_match_xu_et_al():
    x = np.random.default_rng(0).random((3, 2, 5, 5)).astype(np.float32)
    np.testing.assert_array_equal(bit_depth(x, 1), (x >= 0.5).astype(np.float32))
    np.testing.assert_allclose(bit_depth(x, 5), np.rint(x * 31) / 31)
    nhwc = x.transpose(0, 2, 3, 1)  # Xu et al. filter NHWC batches with size (1, k, k, 1)
    want = median_filter(nhwc, size=(1, 2, 2, 1), mode="reflect").transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(median_smooth(x, 2), want)


def test_squeeze_score_is_max_l1_with_one_call_per_chunk(linear_model):
    model = linear_model()
    x = np.random.default_rng(1).random((50, 1, 6, 6)).astype(np.float32)
    det = InputSqueezing(median=2, chunk_size=16).fit(model.observe(x))
    assert det.bits_ == 1  # Xu et al.'s grayscale configuration
    model.calls = 0
    got = det.score(model.observe(x), model)
    assert model.calls == 4  # ceil(50 / 16): both squeezers of a chunk in one call
    p = _softmax(model.logits(x))
    l1 = [np.abs(_softmax(model.logits(v)) - p).sum(1) for v in (bit_depth(x, 1), median_smooth(x, 2))]
    np.testing.assert_allclose(got, np.maximum(*l1), atol=1e-12)
    back = InputSqueezing.from_state(det.get_params(), det.state_dict())
    np.testing.assert_array_equal(back.score(model.observe(x), model), got)


def test_squeeze_config_and_errors(linear_model):
    rgb = linear_model(shape=(3, 4, 4))
    x = np.random.default_rng(2).random((5, 3, 4, 4)).astype(np.float32)
    assert InputSqueezing().fit(rgb.observe(x)).bits_ == 5
    only_median = InputSqueezing(bits=0).fit(rgb.observe(x))
    assert len(only_median.squeeze(x)) == 1
    with pytest.raises(ValueError, match="model"):
        only_median.score(rgb.observe(x), None)
    with pytest.raises(ValueError, match="shape"):
        only_median.score({"input": np.zeros((2, 3, 5, 5), np.float32), "logits": np.zeros((2, 4))}, rgb)
    with pytest.raises(NotFittedError):
        InputSqueezing().score(rgb.observe(x), rgb)
    with pytest.raises(ValueError):
        InputSqueezing(bits=0, median=0)


# ------------------------------------------------------------------------------------------ noise log-odds


def _odds_brute_force(det, model, x):
    """Roth et al.'s statistic written out per input and per setting, from the detector's own noise bank."""
    out = []
    for xi in x:
        base = model.logits(xi[None])[0]
        y = int(base.argmax())
        zs = []
        for j, noise in enumerate(det.noise_bank()):
            noisy = np.clip(xi[None] + noise, 0, 1).astype(np.float32)
            ln = model.logits(noisy).mean(0)
            g = (ln - ln[y]) - (base - base[y])
            zs.append((g - det.mu_[j, y]) / det.sd_[j, y])
        z = np.mean(zs, axis=0)
        z[y] = -np.inf
        out.append(z.max())
    return np.array(out)


def test_odds_matches_roth_et_al_statistic(linear_model):
    model = linear_model(scale=0.5)
    rng = np.random.default_rng(3)
    ref = rng.random((60, 1, 6, 6)).astype(np.float32)
    det = NoiseLogOdds(noise="n0.3,u0.2", n_samples=5, min_class=2).fit(model.observe(ref), None, model)
    assert [b.shape for b in det.noise_bank()] == [(5, 1, 6, 6)] * 2
    # per predicted class: the mean and spread of the clean shifts (the class's own entry is 0)
    y = model.logits(ref).argmax(1)
    c = int(np.bincount(y).argmax())
    g = det.shifts(ref, model.logits(ref), model)
    np.testing.assert_allclose(det.mu_[:, c], g[:, y == c].mean(1), atol=1e-12)
    others = np.arange(4) != c
    np.testing.assert_allclose(det.sd_[:, c][:, others], g[:, y == c].std(1)[:, others], atol=1e-12)
    x = rng.random((9, 1, 6, 6)).astype(np.float32)
    got = det.score(model.observe(x), model)
    np.testing.assert_allclose(got, _odds_brute_force(det, model, x), rtol=1e-9, atol=1e-9)


def test_odds_does_not_depend_on_the_batch_and_round_trips(linear_model):
    model = linear_model(scale=0.5)
    rng = np.random.default_rng(4)
    ref = rng.random((40, 1, 6, 6)).astype(np.float32)
    x = rng.random((11, 1, 6, 6)).astype(np.float32)
    det = NoiseLogOdds(n_samples=4, chunk_size=3).fit(model.observe(ref), None, model)
    whole = det.score(model.observe(x), model)
    model.calls = 0
    one = np.array([det.score(model.observe(x[i : i + 1]), model)[0] for i in range(len(x))])
    assert model.calls == len(x)  # one call per input: its noisy copies go through together
    np.testing.assert_allclose(one, whole, rtol=1e-9, atol=1e-9)  # common random numbers, tolerance for float sums
    back = NoiseLogOdds.from_state(det.get_params(), det.state_dict())
    np.testing.assert_allclose(back.score(model.observe(x), model), whole, rtol=1e-12, atol=1e-12)
    other_seed = NoiseLogOdds(n_samples=4, seed=1).fit(model.observe(ref), None, model)
    assert not np.allclose(other_seed.score(model.observe(x), model), whole)


def test_odds_paper_setting_and_pooled_fallback(linear_model):
    det = NoiseLogOdds(noise="paper")
    assert det.draws == 256 and len(det.settings) == 9
    assert {k for k, _ in det.settings} == {"n", "u", "s"} and {e for _, e in det.settings} == {0.003, 0.005, 0.008}
    assert NoiseLogOdds().draws == 16 and NoiseLogOdds(n_samples=3, noise="paper").draws == 3
    model = linear_model(scale=0.5)
    ref = np.random.default_rng(5).random((30, 1, 6, 6)).astype(np.float32)
    counts = np.bincount(model.logits(ref).argmax(1), minlength=4)
    det = NoiseLogOdds(n_samples=3, min_class=int(counts.max())).fit(model.observe(ref), None, model)
    rare = counts < counts.max()
    np.testing.assert_array_equal(det.pooled_, rare)
    assert rare.any()
    # a rare class gets the pooled statistics: every reference input's shift against each other class
    g = det.shifts(ref, model.logits(ref), model)
    y = model.logits(ref).argmax(1)
    pooled = np.where(np.eye(4, dtype=bool)[y][None], np.nan, g)
    for c in np.flatnonzero(rare):
        np.testing.assert_allclose(det.mu_[:, c], np.nanmean(pooled, axis=1), atol=1e-12)


def test_odds_errors(linear_model):
    for bad in ("x0.1", "n", "n-1", "nabc", ""):
        with pytest.raises(ValueError, match="noise"):
            NoiseLogOdds(noise=bad)
    with pytest.raises(ValueError, match="n_samples"):
        NoiseLogOdds(n_samples=0)
    with pytest.raises(ValueError, match="min_class"):
        NoiseLogOdds(min_class=1)
    model = linear_model()
    x = np.random.default_rng(6).random((8, 1, 6, 6)).astype(np.float32)
    with pytest.raises(NotFittedError):
        NoiseLogOdds().score(model.observe(x), model)
    det = NoiseLogOdds(n_samples=2).fit(model.observe(x), None, model)
    with pytest.raises(ValueError, match="model"):
        det.score(model.observe(x), None)
    with pytest.raises(ValueError, match="shape"):
        det.score({"input": np.zeros((2, 1, 5, 5), np.float32), "logits": np.zeros((2, 4))}, model)
    state = det.state_dict()
    with pytest.raises(ValueError, match="noise settings"):
        NoiseLogOdds.from_state({**det.get_params(), "noise": "n0.1,n0.2"}, state)


def test_odds_flags_pgd_examples_on_a_trained_model(tiny_backdoored):
    """Roth et al.'s observation on a real model: noise pulls a PGD example's log-odds back towards its true class."""
    from abl_guard.attacks.adversarial import predict, quantize, run_attack
    from abl_guard.guard.model import OnnxModel
    from abl_guard.guard.preprocess import to_model_input
    from abl_guard.guard.runtime import observe

    model = OnnxModel(tiny_backdoored["onnx"])
    test = tiny_backdoored["test"]
    ref = observe(model, to_model_input(test.images[:200], model.input_shape), ["logits"])
    det = NoiseLogOdds().fit(ref, model=model)
    x, y = test.images[200:], test.labels[200:]
    res = run_attack("pgd", tiny_backdoored["model"], x, y, eps=0.15, steps=20, seed=0)
    adv = quantize(res.images, x, 0.15)
    ok = res.clean_correct & (predict(tiny_backdoored["model"], adv) != y)
    assert ok.sum() >= 20
    clean = det.score(observe(model, to_model_input(x, model.input_shape), ["logits"]), model)
    attacked = det.score(observe(model, to_model_input(adv[ok], model.input_shape), ["logits"]), model)
    assert np.median(attacked) > np.quantile(clean, 0.9)
