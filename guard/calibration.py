"""Statistics of calibration: conformal p-values, their combination, the threshold, and its check.

The guard turns every detector's raw score into a conformal p-value against that detector's scores on clean
calibration inputs (two-sided detectors use both tails and report which fired), combines the p-values into one, and
flags an input when the combined p-value is at or below a threshold chosen so that the *guard as a whole* flags the
target fraction of clean inputs. The realised false-positive rate is then measured on a held-out clean split and
reported with a Clopper-Pearson interval.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

COMBINERS = ("fisher", "min-p")


def conformal_pvalues(reference: np.ndarray, scores: np.ndarray, two_sided: bool = False,
                      leave_one_out: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """p-values of ``scores`` against clean ``reference`` scores; returns ``(p, tail)``.

    One-sided (high = suspicious): ``p = (1 + #{ref >= s}) / (n + 1)``. Two-sided:
    ``p = min(1, 2 * min(p_high, p_low))`` with ``tail`` "high" or "low" naming the side that fired.
    With ``leave_one_out`` the scores *are* the reference and each is compared with the other ``n - 1``
    (so calibration p-values are distributed like those of fresh inputs).
    """
    ref = np.sort(np.asarray(reference, dtype=np.float64))
    s = np.asarray(scores, dtype=np.float64)
    n = len(ref)
    if n == 0:
        raise ValueError("no reference scores")
    ge = n - np.searchsorted(ref, s, side="left")  # #{ref >= s}
    le = np.searchsorted(ref, s, side="right")  # #{ref <= s}
    if leave_one_out:
        ge, le, n = ge - 1, le - 1, n - 1
    p_high = (1.0 + ge) / (n + 1.0)
    if not two_sided:
        return p_high, np.full(len(s), "high", dtype=object)
    p_low = (1.0 + le) / (n + 1.0)
    tail = np.where(p_low < p_high, "low", "high").astype(object)
    return np.minimum(1.0, 2.0 * np.minimum(p_high, p_low)), tail


def combine_pvalues(pvals: np.ndarray, method: str = "fisher") -> np.ndarray:
    """Combine per-detector p-values ``(N, k)`` into one p-value per input.

    ``fisher``: ``chi2_{2k}.sf(-2 sum log p)``; ``min-p``: Bonferroni ``min(1, k * min p)``. Detectors are correlated,
    so neither is exactly calibrated on its own — the guard's threshold is set empirically on calibration data.
    """
    p = np.clip(np.asarray(pvals, dtype=np.float64), 1e-300, 1.0)
    if p.ndim != 2:
        raise ValueError("pvals must be (N, k)")
    k = p.shape[1]
    if method == "fisher":
        return stats.chi2.sf(-2.0 * np.log(p).sum(axis=1), 2 * k)
    if method == "min-p":
        return np.minimum(1.0, k * p.min(axis=1))
    raise ValueError(f"unknown combination {method!r}; choose from {COMBINERS}")


def threshold_for_fpr(calibration_p: np.ndarray, fpr: float) -> float:
    """The largest threshold ``t`` with ``#{p_cal <= t} <= floor(fpr * (n + 1)) - 1`` — conformal: a fresh clean
    input's combined p-value falls at or below ``t`` with probability at most ``fpr``. Returns 0 (flag nothing)
    when the calibration set is too small for the target."""
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    p = np.sort(np.asarray(calibration_p, dtype=np.float64))
    k = int(np.floor(fpr * (len(p) + 1)))
    if k < 1:
        return 0.0
    # flag p <= t for t just below the k-th smallest calibration p-value
    return float(np.nextafter(p[k - 1], -np.inf)) if k <= len(p) else 1.0


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact binomial confidence interval for a rate ``k / n``."""
    if n <= 0:
        return 0.0, 1.0
    a = 1.0 - confidence
    lo = 0.0 if k == 0 else float(stats.beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - a / 2, k + 1, n - k))
    return lo, hi


@dataclass
class RateEstimate:
    rate: float
    ci_low: float
    ci_high: float
    k: int
    n: int

    @classmethod
    def of(cls, flags: np.ndarray) -> RateEstimate:
        k, n = int(np.sum(flags)), int(len(flags))
        lo, hi = clopper_pearson(k, n)
        return cls(k / n if n else float("nan"), lo, hi, k, n)

    def to_json(self) -> dict:
        return {"rate": self.rate, "ci95": [self.ci_low, self.ci_high], "k": self.k, "n": self.n}
