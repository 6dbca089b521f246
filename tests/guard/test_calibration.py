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


def test_clopper_pearson_known_values():
    lo, hi = clopper_pearson(0, 100)
    assert lo == 0.0 and abs(hi - 0.0362) < 1e-3
    lo, hi = clopper_pearson(10, 1000)
    assert abs(lo - 0.0048) < 5e-4 and abs(hi - 0.0183) < 5e-4
    with pytest.raises(ValueError):
        combine_pvalues(np.ones((3, 2)), "nope")
