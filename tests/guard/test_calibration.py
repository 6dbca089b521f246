import numpy as np
import pytest

from abl_guard.guard.calibration import (
    RateEstimate,
    clopper_pearson,
    combine_pvalues,
    conformal_pvalues,
    threshold_for_fpr,
)


def test_conformal_pvalues_one_and_two_sided():
    ref = np.arange(1, 100, dtype=float)  # 99 reference scores
    p, tail = conformal_pvalues(ref, np.array([1000.0, 0.0, 50.0]))
    np.testing.assert_allclose(p, [1 / 100, 1.0, 51 / 100])
    p2, tail2 = conformal_pvalues(ref, np.array([1000.0, -5.0, 50.0]), two_sided=True)
    np.testing.assert_allclose(p2, [2 / 100, 2 / 100, 1.0])
    assert list(tail2[:2]) == ["high", "low"]


@pytest.mark.parametrize("two_sided", [False, True])
@pytest.mark.parametrize("combine", ["fisher", "min-p"])
def test_guard_fpr_holds_on_fresh_clean_data(two_sided, combine):
    """Calibrate a 3-detector guard on simulated correlated clean scores; fresh clean data meets the target."""
    rng = np.random.default_rng(0)
    cov = np.array([[1, 0.6, 0.3], [0.6, 1, 0.5], [0.3, 0.5, 1]])

    def clean(n):
        return rng.multivariate_normal(np.zeros(3), cov, n)

    cal = clean(2000)
    ps = [conformal_pvalues(cal[:, j], cal[:, j], two_sided, leave_one_out=True)[0] for j in range(3)]
    t = threshold_for_fpr(combine_pvalues(np.stack(ps, 1), combine), 0.01)
    fresh = clean(20000)
    pf = np.stack([conformal_pvalues(cal[:, j], fresh[:, j], two_sided)[0] for j in range(3)], 1)
    est = RateEstimate.of(combine_pvalues(pf, combine) <= t)
    assert est.ci_low <= 0.01 + 0.004 and est.rate < 0.014 and est.rate > 0.006
    # attacks: shifted inputs are flagged far more often
    shifted = fresh[:2000] + np.array([3.0, 3.0, 3.0])
    ps_shift = np.stack([conformal_pvalues(cal[:, j], shifted[:, j], two_sided)[0] for j in range(3)], 1)
    assert np.mean(combine_pvalues(ps_shift, combine) <= t) > 0.5


def test_threshold_edges():
    assert threshold_for_fpr(np.linspace(0, 1, 50), 0.01) == 0.0  # too few to resolve 1%
    with pytest.raises(ValueError):
        threshold_for_fpr(np.ones(10), 0.0)


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_fisher_closed_form_is_the_chi_square_tail(k):
    """The guard's Fisher combination (the Poisson-tail closed form) equals scipy's chi2_{2k} survival function to
    1e-12 relative, from p = 1 down to p-values near the float64 limit."""
    from scipy import stats

    rng = np.random.default_rng(k)
    p = np.clip(rng.random((3000, k)) ** rng.uniform(0.05, 40, (3000, 1)), 1e-300, 1.0)
    p[0] = 1.0
    want = stats.chi2.sf(-2 * np.log(p).sum(axis=1), 2 * k)
    got = combine_pvalues(p, "fisher")
    tiny = want < 1e-290  # both underflow together there
    np.testing.assert_allclose(got[~tiny], want[~tiny], rtol=1e-12)
    assert got[0] == 1.0 and np.all(got[tiny] < 1e-280)


def test_clopper_pearson_known_values():
    lo, hi = clopper_pearson(0, 100)
    assert lo == 0.0 and abs(hi - 0.0362) < 1e-3
    lo, hi = clopper_pearson(10, 1000)
    assert abs(lo - 0.0048) < 5e-4 and abs(hi - 0.0183) < 5e-4
    with pytest.raises(ValueError):
        combine_pvalues(np.ones((3, 2)), "nope")


# ------------------------------------------------------------------------------------------------ fusion (issue 16)


def test_combiners_reduce_to_the_p_value_of_one_detector_and_keep_tiny_ones():
    from abl_guard.guard.calibration import COMBINERS

    p = np.array([1e-250, 1e-8, 0.003, 0.2, 0.5, 0.77, 1.0])
    for method in ("cauchy", "hmp", "min-p"):
        np.testing.assert_allclose(combine_pvalues(p[:, None], method), p, rtol=1e-9, err_msg=method)
    # one tiny p-value among two: Cauchy and the harmonic mean keep it (about 2 x 1e-200), Fisher dilutes it
    two = np.array([[1e-200, 0.5]])
    for method in ("cauchy", "hmp"):
        np.testing.assert_allclose(combine_pvalues(two, method), [2e-200], rtol=1e-3, err_msg=method)
    assert combine_pvalues(two, "fisher")[0] > 1e-198
    assert set(COMBINERS) >= {"fisher", "min-p", "cauchy", "hmp"}


def test_tails_extend_conformal_p_values_beyond_the_calibration_range():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal(999)
    inside = np.linspace(ref.min(), ref.max(), 50)
    p0, _ = conformal_pvalues(ref, inside)
    p1, _ = conformal_pvalues(ref, inside, tails=True)
    np.testing.assert_array_equal(p0, p1)  # exactly conformal inside the range
    beyond = ref.max() + np.array([1e-12, 0.5, 1.0, 3.0, 50.0])
    pb, _ = conformal_pvalues(ref, beyond, tails=True)
    assert pb[0] == pytest.approx(1 / 1000, rel=1e-6) and np.all(np.diff(pb) < 0) and pb[-1] < 1e-20
    low, tail = conformal_pvalues(ref, np.array([ref.min() - 2.0]), two_sided=True, tails=True)
    assert low[0] < 2 / 1000 and tail[0] == "low"
    # leave-one-out: the calibration maximum is compared with the runner-up, below 1/n but not absurdly
    loo, _ = conformal_pvalues(ref, ref, leave_one_out=True, tails=True)
    assert 1e-6 < loo[np.argmax(ref)] < 1 / 999


def _guard_auroc(cal, neg, pos, combine, tails=True):
    from sklearn.metrics import roc_auc_score

    from abl_guard.guard.calibration import Calibrator

    pred = np.zeros(len(next(iter(cal.values()))), np.int64)
    c = Calibrator.fit(cal, pred, [False] * len(cal), combine, 0.01, 1, tails=tails)
    a, _, _ = c.pvalues(neg, np.zeros(len(neg["strong"]), np.int64))
    b, _, _ = c.pvalues(pos, np.zeros(len(pos["strong"]), np.int64))
    return roc_auc_score(np.r_[np.zeros(len(a)), np.ones(len(b))], -np.log(np.r_[a, b]))


@pytest.mark.parametrize("seed", [0, 1])
def test_a_noise_detector_does_not_drown_a_strong_one(seed):
    """A strong detector (attack shifted 5 sd) plus uninformative ones: the harmonic mean and min-p with tails stay
    within 0.005 AUROC of the strong detector alone; Fisher without tails (the old guard) loses several times that."""
    rng = np.random.default_rng(seed)

    def draw(n, shift):
        return {"strong": rng.standard_normal(n) + shift, **{f"noise{i}": rng.standard_normal(n) for i in range(3)}}

    cal, neg, pos = draw(1000, 0.0), draw(2000, 0.0), draw(500, 5.0)
    only = {k: {"strong": v["strong"]} for k, v in (("cal", cal), ("neg", neg), ("pos", pos))}
    alone = _guard_auroc(only["cal"], only["neg"], only["pos"], "hmp")
    for method in ("hmp", "min-p"):
        for k in (1, 3):
            keys = ["strong"] + [f"noise{i}" for i in range(k)]
            sub = [{q: d[q] for q in keys} for d in (cal, neg, pos)]
            assert _guard_auroc(*sub, method) >= alone - 0.005, (method, k)
    assert _guard_auroc(cal, neg, pos, "fisher", tails=False) < alone - 0.01


def test_calibrate_nic_on_a_model_without_the_small_cnn_taps(tiny_onnx, digits_train, tmp_path):
    """The tiny ONNX model has one tap (``penultimate``): NIC and layer-Mahalanobis with their default taps calibrate
    on it, the bundle names the resolved taps, and a tap the model lacks is a one-line ValueError (CLI: exit 1)."""
    from abl_guard.detectors import make_detector
    from abl_guard.guard import Guard, calibrate_bundle

    x, y = digits_train.images[:900], digits_train.labels[:900]
    dets = [make_detector("nic", max_samples=300), make_detector("mahalanobis-layers"), make_detector("mahalanobis")]
    manifest = calibrate_bundle(tiny_onnx, x, y, dets, tmp_path / "b", fpr=0.05, combine="hmp")
    assert [d["requires"] for d in manifest["detectors"]] == [["penultimate", "logits"], ["penultimate"],
                                                            ["penultimate"]]
    assert manifest["calibration"]["combine"] == "hmp" and manifest["calibration"]["tails"] is True
    g = Guard.load(tmp_path / "b")
    v = g.inspect(digits_train.images[900:960])
    assert len(v) == 60 and all(0 < r.p_value <= 1 for r in v)
    with pytest.raises(ValueError, match=r"no tap 'block1'; its taps are \['penultimate'\]"):
        calibrate_bundle(tiny_onnx, x, y, [make_detector("nic", taps="block1,penultimate")], tmp_path / "c")


def _members(rng, n, shift, k=4):
    """Correlated clean members (shared factor 0.6), each shifted by ``shift[j]`` sd on the positives."""
    z = rng.standard_normal((n, 1))
    return 0.6 * z + 0.8 * rng.standard_normal((n, k)) + np.asarray(shift, dtype=float)


def _pvals(cal, x, loo=False):
    return np.stack([conformal_pvalues(cal[:, j], x[:, j], leave_one_out=loo, tails=True)[0]
                     for j in range(cal.shape[1])], 1)


@pytest.mark.parametrize("seed", [0, 1])
def test_adaptive_combination_follows_the_better_of_fisher_and_min_p(seed):
    """One strong member among noise: adaptive flags far more than Fisher (near min-p); evidence spread over every
    member: within a few points of the better of the two. Clean flags stay near the 1% target."""
    from abl_guard.guard.calibration import AdaptiveCombiner

    rng = np.random.default_rng(seed)
    cal, fresh = _members(rng, 2000, 0), _members(rng, 20000, 0)
    P_cal = _pvals(cal, cal, loo=True)
    ad = AdaptiveCombiner(P_cal)
    rules = {"fisher": lambda P, loo=False: combine_pvalues(P, "fisher"),
             "min-p": lambda P, loo=False: combine_pvalues(P, "min-p"),
             "adaptive": lambda P, loo=False: ad(P, leave_one_out=loo)}
    thr = {n: threshold_for_fpr(f(P_cal, True), 0.01) for n, f in rules.items()}
    est = RateEstimate.of(ad(_pvals(cal, fresh)) <= thr["adaptive"])
    assert 0.006 < est.rate < 0.014
    flagged = {}
    for case, shift in (("one", [3.0, 0, 0, 0]), ("spread", [1.0, 1.0, 1.0, 1.0])):
        P = _pvals(cal, _members(rng, 2000, shift))
        flagged[case] = {n: float(np.mean(f(P) <= thr[n])) for n, f in rules.items()}
    one, spread = flagged["one"], flagged["spread"]
    assert one["adaptive"] > one["fisher"] + 0.2 and one["adaptive"] > one["min-p"] - 0.15, one
    assert spread["adaptive"] > max(spread["fisher"], spread["min-p"]) - 0.06, spread


def test_adaptive_calibrator_round_trips_and_keeps_calibration_leave_one_out():
    """combine='adaptive' through the Calibrator: rebuilt from its JSON and stored scores it gives the same p-values
    (tolerance 1e-12); on its own calibration inputs at most the target share is flagged; one member needs no
    second stage; combine_pvalues refuses it (it needs clean data)."""
    from abl_guard.guard.calibration import Calibrator

    rng = np.random.default_rng(3)
    cal = _members(rng, 1000, 0, k=3)
    scores = {f"d{j}": cal[:, j] for j in range(3)}
    pred = rng.integers(0, 2, 1000)
    c = Calibrator.fit(scores, pred, [False, True, False], "adaptive", 0.01, 2)
    loo, _, _ = c.pvalues(c.scores, pred, leave_one_out=True)
    assert np.mean(loo <= c.p_threshold) <= 0.01
    js = c.to_json()
    again = Calibrator(scores, pred, [False, True, False], js["combine"], 2, js["p_threshold"])
    x = _members(rng, 300, [2.0, 0, 0], k=3)
    xs, xp = {f"d{j}": x[:, j] for j in range(3)}, rng.integers(0, 2, 300)
    np.testing.assert_allclose(again.pvalues(xs, xp)[0], c.pvalues(xs, xp)[0], rtol=1e-12, atol=0)
    m = Calibrator.fit(scores, pred, [False, True, False], "adaptive", 0.01, 2, mondrian=True)
    assert np.mean(m.pvalues(xs, xp)[0] <= m.thresholds(xp)) > np.mean(m.pvalues(scores, pred)[0] <= m.thresholds(pred))
    one = Calibrator.fit({"d0": cal[:, 0]}, pred, [False], "adaptive", 0.01, 2)
    np.testing.assert_array_equal(one.pvalues({"d0": x[:, 0]}, xp)[0], one.pvalues({"d0": x[:, 0]}, xp)[1][:, 0])
    with pytest.raises(ValueError, match="calibrated on clean inputs"):
        combine_pvalues(np.full((2, 2), 0.5), "adaptive")


def test_adaptive_bundle_serves_what_it_calibrated(tiny_onnx, digits_train, tmp_path):
    """A bundle calibrated with combine='adaptive' loads in the serving guard (which rebuilds the second stage from
    the stored calibration scores) and flags its own calibration images at no more than the target rate."""
    from abl_guard.detectors import make_detector
    from abl_guard.guard import Guard, calibrate_bundle

    x, y = digits_train.images[:900], digits_train.labels[:900]
    dets = [make_detector("mahalanobis"), make_detector("knn")]
    manifest = calibrate_bundle(tiny_onnx, x, y, dets, tmp_path / "b", fpr=0.05, combine="adaptive")
    assert manifest["calibration"]["combine"] == "adaptive"
    g = Guard.load(tmp_path / "b")
    assert g.calibrator._adaptive is not None
    v = g.inspect(digits_train.images[900:1000])
    assert len(v) == 100 and all(0 < r.p_value <= 1 for r in v)
    noise = np.random.default_rng(0).integers(0, 256, (50, *x.shape[1:])).astype(x.dtype)
    assert np.mean([r.flagged for r in g.inspect(noise)]) > 0.9


def test_calibrate_typicality_flags_blank_and_noise_inputs_by_their_tails(tiny_onnx, digits_train, tmp_path):
    """The input lens in a bundle: fitted on the digits' pixels, the average digit (the density's mode: more likely
    than any real image) is flagged in the low tail ("atypically simple") and uniform noise in the high tail, through
    the ONNX guard; clean images mostly pass."""
    from abl_guard.detectors import make_detector
    from abl_guard.guard import Guard, calibrate_bundle

    x, y = digits_train.images[:900], digits_train.labels[:900]
    manifest = calibrate_bundle(tiny_onnx, x, y, [make_detector("typicality", patch=4)], tmp_path / "b", fpr=0.05)
    assert manifest["detectors"][0]["requires"] == ["input"]
    g = Guard.load(tmp_path / "b")
    blank = np.repeat(x.mean(axis=0, keepdims=True).round().astype(np.uint8), 5, axis=0)
    noise = np.random.default_rng(0).integers(0, 256, (5, *x.shape[1:]), dtype=np.uint8)
    for batch, tail, kind in ((blank, "low", "atypically simple"), (noise, "high", "corrupted or noisy")):
        for v in g.inspect(batch):
            assert v.flagged and v.kind == kind and v.detectors["typicality"]["tail"] == tail
    clean = g.inspect(digits_train.images[900:1100])
    assert np.mean([v.flagged for v in clean]) <= 0.12  # a 5% target on 200 images, with sampling slack
