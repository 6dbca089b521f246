"""The Calibrator: the guard's FPR holds on fresh clean data (pooled and Mondrian), per class under Mondrian."""

import numpy as np
import pytest

from abl_guard.guard.calibration import Calibrator, RateEstimate, min_calibration_size

K = 4
COV = np.array([[1, 0.6, 0.3], [0.6, 1, 0.5], [0.3, 0.5, 1]])
CHOL = np.linalg.cholesky(COV)


def simulate(n, rng, shift=None):
    """Clean scores of 3 correlated detectors whose scale depends on the predicted class (class 3 is 'hard':
    its clean scores run high, so a pooled threshold makes it pay most false positives)."""
    pred = rng.integers(0, K, n)
    z = rng.standard_normal((n, 3)) @ CHOL.T
    scale = np.array([1.0, 1.0, 1.2, 2.0])[pred][:, None]
    z = z * scale + (0 if shift is None else shift)
    return {f"d{j}": z[:, j] for j in range(3)}, pred


@pytest.mark.parametrize("combine", ["fisher", "min-p"])
@pytest.mark.parametrize("mondrian", [False, True])
def test_fpr_holds_on_fresh_clean_data_within_validation_interval(combine, mondrian):
    """Twenty independent calibrations: the fresh-data FPR falls inside the validation part's 95% Clopper-Pearson
    interval about 95% of the time (>= 16 of 20 fails by chance with probability 0.3%) and averages the target."""
    inside, rates = 0, []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        cal_s, cal_p = simulate(3000, rng)
        cal = Calibrator.fit(cal_s, cal_p, [False, True, False], combine, 0.01, K, mondrian)
        val_s, val_p = simulate(4000, rng)
        comb, _, _ = cal.pvalues(val_s, val_p)
        val = RateEstimate.of(comb <= cal.thresholds(val_p))
        fresh_s, fresh_p = simulate(50_000, rng)
        comb_f, _, _ = cal.pvalues(fresh_s, fresh_p)
        rate = float(np.mean(comb_f <= cal.thresholds(fresh_p)))
        inside += val.ci_low <= rate <= val.ci_high
        rates.append(rate)
    assert inside >= 16, (inside, rates)
    assert 0.008 < np.mean(rates) < 0.012, rates
    assert max(rates) < 0.018, rates
    # shifted (attacked) inputs are flagged far more often
    att_s, att_p = simulate(2000, rng, shift=np.array([4.0, 4.0, 4.0]))
    comb_a, _, _ = cal.pvalues(att_s, att_p)
    assert np.mean(comb_a <= cal.thresholds(att_p)) > 0.3


def test_mondrian_spreads_false_positives_over_classes():
    rng = np.random.default_rng(2)
    cal_s, cal_p = simulate(4000, rng)
    fresh_s, fresh_p = simulate(40000, rng)
    per_class = {}
    for mondrian in (False, True):
        cal = Calibrator.fit(cal_s, cal_p, [False, False, False], "fisher", 0.02, K, mondrian)
        comb, _, _ = cal.pvalues(fresh_s, fresh_p)
        flags = comb <= cal.thresholds(fresh_p)
        per_class[mondrian] = np.array([flags[fresh_p == c].mean() for c in range(K)])
    # pooled: the hard class pays most of the false positives; Mondrian: every class is near the target
    assert per_class[False][3] > 0.05 and per_class[False][0] < 0.01
    assert np.all(np.abs(per_class[True] - 0.02) < 0.008), per_class[True]


def test_mondrian_small_class_falls_back_to_pooled():
    rng = np.random.default_rng(3)
    s, p = simulate(2000, rng)
    p[p == 2] = 0
    p[:30] = 2  # only 30 calibration inputs predicted as class 2: too few for a 1% threshold
    cal = Calibrator.fit(s, p, [False] * 3, "fisher", 0.01, K, mondrian=True)
    assert cal.fallback_classes == [2] and min_calibration_size(0.01) == 99
    assert cal.class_thresholds[2] == cal.p_threshold
    assert cal.class_thresholds[3] != cal.p_threshold
    q, _, _ = cal.pvalues({k: v[:5] for k, v in s.items()}, np.full(5, 2))
    pooled = Calibrator.fit(s, p, [False] * 3, "fisher", 0.01, K, mondrian=False)
    np.testing.assert_allclose(q, pooled.pvalues({k: v[:5] for k, v in s.items()}, np.full(5, 2))[0])


def test_rebuilt_calibrator_gives_identical_pvalues():
    rng = np.random.default_rng(4)
    s, p = simulate(1500, rng)
    cal = Calibrator.fit(s, p, [True, False, False], "min-p", 0.02, K, mondrian=True)
    js = cal.to_json()
    again = Calibrator(s, p, [True, False, False], js["combine"], K, js["p_threshold"], js["mondrian"],
                       js["class_thresholds"], js["fallback_classes"])
    new_s, new_p = simulate(300, rng)
    for a, b in zip(cal.pvalues(new_s, new_p), again.pvalues(new_s, new_p)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(cal.thresholds(new_p), again.thresholds(new_p))


def test_calibrator_rejects_too_little_data_and_bad_input():
    rng = np.random.default_rng(5)
    s, p = simulate(50, rng)
    with pytest.raises(ValueError, match="need at least 99"):
        Calibrator.fit(s, p, [False] * 3, "fisher", 0.01, K)
    with pytest.raises(ValueError, match="unknown combination"):
        Calibrator(s, p, [False] * 3, "mean", K)
    with pytest.raises(ValueError, match="two_sided"):
        Calibrator(s, p, [False], "fisher", K)


def test_mondrian_bundle_end_to_end(tiny_onnx, digits_train, digits_test, tmp_path):
    from abl_guard.detectors import make_detector
    from abl_guard.guard import Guard, calibrate_bundle

    m = calibrate_bundle(tiny_onnx, digits_train.images, digits_train.labels, [make_detector("mahalanobis")],
                         tmp_path / "m.guard", fpr=0.05, fractions=(0.3, 0.5, 0.2), mondrian=True)
    cal = m["calibration"]
    assert cal["mondrian"] and len(cal["class_thresholds"]) == 10 and cal["fallback_classes"] == []
    assert len(set(cal["class_thresholds"])) > 1  # classes really differ
    assert set(cal["validation"]["per_class"]) <= set(m["class_names"])
    lo, hi = cal["validation"]["ci95"]
    assert lo <= cal["validation"]["rate"] <= hi
    g = Guard.load(tmp_path / "m.guard")
    verdicts = g.inspect(digits_test.images[:50])
    for v in verdicts:  # each verdict carries its predicted class's threshold
        assert v.p_threshold == pytest.approx(cal["class_thresholds"][v.label])
        assert v.flagged == (v.p_value <= v.p_threshold)
