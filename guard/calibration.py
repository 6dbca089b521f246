"""Statistics of calibration: conformal p-values, their combination, the threshold, its check, and stream alarms.

The guard turns every detector's raw score into a conformal p-value against that detector's scores on clean
calibration inputs (two-sided detectors use both tails and report which fired), combines the p-values into one, and
flags an input when the combined p-value is at or below a threshold chosen so that the *guard as a whole* flags the
target fraction of clean inputs. The realised false-positive rate is then measured on a held-out clean split and
reported with a Clopper-Pearson interval.

Issue 16 asked that a combination never lose to its best detector. Two tools, and what measurement says:

* **Tails beyond the calibration range.** A conformal p-value cannot fall below ``1 / (n + 1)``, so every input
  beyond the most extreme clean score ties with every other. The Calibrator extends each tail with an exponential
  (the generalised Pareto tail with shape 0, peaks over threshold: Pickands 1975) fitted to the most extreme clean
  scores; inside the calibration range the p-value stays exactly conformal, so only inputs beyond it rank
  differently.
* **Other combinations**: Cauchy (Liu & Xie, JASA 2020), the harmonic mean ``hmp`` (Wilson, PNAS 2019) and min-p
  are driven by the smallest p-values and beat Fisher when the other detectors are pure noise (unit tests). On the
  real detectors of ``bench/results/detect_converged.md`` — correlated, each weakly informative — Fisher's sum of
  logs loses least to the best member, so it stays the default. No clean-data-only combination reached "never below
  the best member minus 0.005" there (re-weighting by the clean p-values' correlation, or taking the most surprising
  standardised detector, lost more than Fisher); choosing strong members matters more than the combination.
* **The adaptive test** (:class:`AdaptiveCombiner`, ``combine="adaptive"``): Fisher's and min-p's statistics, each
  calibrated on the clean inputs, the more surprising kept. It flags more than Fisher where one member alone sees an
  input and less where the evidence is spread (``bench/results/fusion_study_adaptive.md``), so it is an opt-in.

The guard sets its threshold on the combined value of clean inputs, so every combination is calibrated; they differ
only in how they rank inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class _LazyStats:
    """``scipy.stats``, imported on first use: it takes over a second to import and serving rarely needs it."""

    def __getattr__(self, name: str) -> Any:
        import scipy.stats

        return getattr(scipy.stats, name)


stats = _LazyStats()

COMBINERS = ("fisher", "min-p", "cauchy", "hmp", "adaptive")
#: share of the calibration scores (at least TAIL_MIN of them) whose excesses fit each exponential tail
TAIL_SHARE = 0.05
TAIL_MIN = 5


def conformal_pvalues(reference: np.ndarray, scores: np.ndarray, two_sided: bool = False,
                      leave_one_out: bool = False, tails: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """p-values of ``scores`` against clean ``reference`` scores; returns ``(p, tail)``.

    One-sided (high = suspicious): ``p = (1 + #{ref >= s}) / (n + 1)``. Two-sided:
    ``p = min(1, 2 * min(p_high, p_low))`` with ``tail`` "high" or "low" naming the side that fired.
    With ``leave_one_out`` the scores *are* the reference and each is compared with the other ``n - 1``
    (so calibration p-values are distributed like those of fresh inputs). With ``tails`` scores beyond the
    reference range get exponential-tail p-values below ``1 / (n + 1)`` (see :func:`tail_scales`).
    """
    ref = np.sort(np.asarray(reference, dtype=np.float64))
    p, low = _conformal(ref, scores, two_sided, leave_one_out, tail_scales(ref) if tails else None)
    return p, np.where(low, "low", "high").astype(object)


def tail_scales(ref: np.ndarray) -> tuple[float, float]:
    """Scales ``(beta_high, beta_low)`` of exponential tails fitted to a sorted clean reference: the mean excess of
    the ``m = max(TAIL_MIN, TAIL_SHARE * n)`` most extreme scores over the next one (the maximum-likelihood
    exponential fit to peaks over that threshold). 0 where the extreme scores tie (no extrapolation)."""
    n = len(ref)
    if n < 2:
        return 0.0, 0.0
    m = int(min(n - 1, max(TAIL_MIN, np.ceil(TAIL_SHARE * n))))
    hi = float(np.mean(ref[n - m:]) - ref[n - m - 1])
    lo = float(ref[m] - np.mean(ref[:m]))
    ok = np.isfinite([hi, lo]) & (np.array([hi, lo]) > 0)
    return (hi if ok[0] else 0.0), (lo if ok[1] else 0.0)


def _conformal(ref: np.ndarray, scores: np.ndarray, two_sided: bool, leave_one_out: bool,
               tails: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`conformal_pvalues` on an already sorted reference; the tail as a boolean ``low`` mask."""
    s = np.asarray(scores, dtype=np.float64)
    n = len(ref)
    if n == 0:
        raise ValueError("no reference scores")
    ge = n - np.searchsorted(ref, s, side="left")  # #{ref >= s}
    if leave_one_out:
        ge, n = ge - 1, n - 1
    p_high = (1.0 + ge) / (n + 1.0)
    if tails is not None and tails[0] > 0 and n >= 1:
        p_high = _extend(p_high, ge == 0, s, ref, tails[0], n, leave_one_out, high=True)
    if not two_sided:
        return p_high, np.zeros(len(s), bool)
    le = np.searchsorted(ref, s, side="right") - (1 if leave_one_out else 0)  # #{ref <= s}
    p_low = (1.0 + le) / (n + 1.0)
    if tails is not None and tails[1] > 0 and n >= 1:
        p_low = _extend(p_low, le == 0, s, ref, tails[1], n, leave_one_out, high=False)
    low = p_low < p_high
    return np.minimum(1.0, 2.0 * np.minimum(p_high, p_low)), low


def _extend(p: np.ndarray, beyond: np.ndarray, s: np.ndarray, ref: np.ndarray, beta: float, n: int,
            leave_one_out: bool, high: bool) -> np.ndarray:
    """Replace the p-values of scores beyond every (other) reference score by ``exp(-excess / beta) / (n + 1)``,
    the excess measured from the most extreme other reference score: continuous with the conformal value at the
    edge, smaller beyond it."""
    if not beyond.any():
        return p
    edge = np.full(len(s), ref[-1] if high else ref[0])
    if leave_one_out and len(ref) >= 2:  # the reference's own extreme point is compared with the runner-up
        edge[beyond] = ref[-2] if high else ref[1]
    excess = (s - edge) if high else (edge - s)
    out = p.copy()
    with np.errstate(over="ignore", invalid="ignore"):
        tail = np.exp(-np.maximum(excess, 0.0) / beta) / (n + 1.0)
    out[beyond] = np.minimum(p[beyond], np.where(np.isnan(tail[beyond]), p[beyond], tail[beyond]))
    return out


def fisher_sf(half_stat: np.ndarray, k: int) -> np.ndarray:
    """``chi2_{2k}.sf(2 L)`` for ``L = -sum log p`` in closed form: ``exp(-L) sum_{i<k} L^i / i!`` (the Poisson
    tail), a few numpy operations where scipy's distribution machinery costs more than a detector on a serving
    batch."""
    L = np.asarray(half_stat, np.float64)
    term = np.ones_like(L)
    total = np.ones_like(L)
    for i in range(1, k):
        term = term * L / i
        total += term
    with np.errstate(divide="ignore"):
        return np.exp(np.log(total) - L)


def combine_pvalues(pvals: np.ndarray, method: str = "fisher") -> np.ndarray:
    """Combine per-detector p-values ``(N, k)`` into one p-value per input.

    ``fisher``: ``chi2_{2k}.sf(-2 sum log p)``; ``min-p``: Bonferroni ``min(1, k * min p)``; ``cauchy``: Liu & Xie's
    Cauchy combination; ``hmp``: the harmonic mean ``k / sum(1 / p)``. Detectors are correlated, so none is exactly
    calibrated on its own — the guard's threshold is set empirically on calibration data.
    """
    p = np.clip(np.asarray(pvals, dtype=np.float64), 1e-300, 1.0)
    if p.ndim != 2:
        raise ValueError("pvals must be (N, k)")
    k = p.shape[1]
    if method == "fisher":
        return fisher_sf(-np.log(p).sum(axis=1), k)
    if method == "min-p":
        return np.minimum(1.0, k * p.min(axis=1))
    if method == "cauchy":
        # tan((1/2 - p) pi) = 1 / tan(p pi), accurate for tiny p; p = 1 would be -inf: keep it just below 1
        t = (1.0 / np.tan(np.pi * np.minimum(p, 1.0 - 1e-12))).mean(axis=1)
        # 1/2 - arctan(t) / pi, written as arctan(1 / t) / pi for t > 0 to keep tiny p-values exact
        with np.errstate(divide="ignore"):
            return np.where(t > 0, np.arctan(1.0 / np.maximum(t, 1e-300)) / np.pi, 0.5 - np.arctan(t) / np.pi)
    if method == "hmp":
        return np.minimum(1.0, k / (1.0 / p).sum(axis=1))
    if method == "adaptive":
        raise ValueError("the adaptive combination is calibrated on clean inputs: use Calibrator or AdaptiveCombiner")
    raise ValueError(f"unknown combination {method!r}; choose from {COMBINERS}")


#: the adaptive combination's powers of the members' surprises: 1 ranks as Fisher's sum, inf as min-p's maximum
ADAPTIVE_POWERS: tuple[float, ...] = (1.0, float("inf"))


def power_statistics(pvals: np.ndarray, powers: Sequence[float] = ADAPTIVE_POWERS) -> np.ndarray:
    """``(N, len(powers))`` power means of the members' surprises ``s = -log p``: ``(mean s^g)^(1/g)``, the maximum
    for ``g = inf`` (Pan et al.'s sum-of-powered-scores family, Genetics 2014, on p-values instead of scores)."""
    s = -np.log(np.clip(np.asarray(pvals, dtype=np.float64), 1e-300, 1.0))
    if s.ndim != 2:
        raise ValueError("pvals must be (N, k)")
    cols = []
    for g in powers:
        if np.isinf(g):
            cols.append(s.max(axis=1))
        else:
            cols.append(np.mean(s ** g, axis=1) ** (1.0 / g))
    return np.stack(cols, axis=1)


class AdaptiveCombiner:
    """Pan et al.'s adaptive test (aSPU, Genetics 2014) over the members' p-values, calibrated on clean data.

    Each power statistic of :func:`power_statistics` — power 1 ranks inputs as Fisher's sum does, power ``inf`` as
    min-p — is turned into a conformal p-value against the same statistic of the clean calibration inputs (their
    leave-one-out member p-values, so they are distributed as a fresh clean input's; exponential tails beyond the
    range as for the members), and the combination is the smallest of them, corrected for their number (Sidak).
    Fisher alone dilutes one strong member with the ones that see nothing; min-p alone misses evidence spread over
    several; the adaptive test follows whichever statistic is more surprising *by the standard of clean inputs*,
    which a raw ``min(Fisher p, k * min p)`` cannot do: with correlated members Fisher's chi-square p-value is far
    too small on clean inputs, so it wins every comparison. Measured in ``bench/results/fusion_study_adaptive.md``.
    Deviation from the paper: Pan et al. raise score statistics to the powers 1-8 and inf and find the smallest
    p-value's own null by permutation; here two powers of the members' surprises, Sidak-corrected, against clean
    calibration inputs (other power sets trade the same way: that page's notes).
    """

    def __init__(self, calibration_p: np.ndarray, powers: Sequence[float] = ADAPTIVE_POWERS,
                 tails: bool = True) -> None:
        self.powers = tuple(float(g) for g in powers)
        stats_ = power_statistics(calibration_p, self.powers)
        self.ref = [np.sort(stats_[:, j]) for j in range(len(self.powers))]
        self._tails = [tail_scales(r) if tails else None for r in self.ref]

    def __call__(self, pvals: np.ndarray, leave_one_out: bool = False) -> np.ndarray:
        """Combined p-values of ``(N, k)`` member p-values; with ``leave_one_out`` they must be the calibration
        inputs' own, in calibration order."""
        st = power_statistics(pvals, self.powers)
        # a calibration input's q counts the other calibration inputs above it on the scale of a fresh input's,
        # (1 + #above) / (n + 1): with leave-one-out's (1 + #above) / n the fresh inputs would gain one rank on each
        # statistic against the threshold set on the calibration inputs, about 0.1% more clean flags per power
        scale = len(self.ref[0]) / (len(self.ref[0]) + 1.0) if leave_one_out else 1.0
        q = scale * np.stack([_conformal(r, st[:, j], False, leave_one_out, t)[0]
                              for j, (r, t) in enumerate(zip(self.ref, self._tails))], axis=1)
        # Sidak over the powers: 1 - (1 - min q)^G is below 1 for every q below 1, so (unlike a clipped Bonferroni
        # product) no clean-looking inputs tie at 1 and the ranking inside the calibration range stays strict
        return -np.expm1(len(self.powers) * np.log1p(-np.minimum(q.min(axis=1), 1.0 - 1e-16)))


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


# ------------------------------------------------------------------------------------------------ the calibrator


def min_calibration_size(fpr: float) -> int:
    """Fewest calibration inputs that can resolve ``fpr`` conformally: ``floor(fpr * (n + 1)) >= 1``."""
    return max(1, int(np.ceil(1.0 / fpr - 1e-9)) - 1)


class Calibrator:
    """Clean calibration scores per detector -> per-detector conformal p-values, combined p-value and threshold.

    Pooled calibration (``mondrian=False``) compares every input with all calibration inputs and uses one threshold.
    Mondrian calibration (Vovk et al., *Algorithmic Learning in a Random World*, ch. 4: conformal prediction
    conditional on a category, here the *predicted* class) compares an input predicted as class ``c`` only with
    calibration inputs predicted as ``c``, and gives each class its own threshold; the false-positive rate then holds
    per predicted class, so no class pays all the false alarms. A class with fewer calibration inputs than
    :func:`min_calibration_size` falls back to the pooled reference and threshold (listed in ``fallback_classes``).

    ``scores`` are the calibration inputs' raw detector scores in calibration order and ``pred`` their predicted
    labels; both are what a bundle stores. ``tails`` extends each detector's p-values beyond its calibration range
    with an exponential tail (module docstring). Read-only after construction, so one instance serves many threads.
    """

    def __init__(self, scores: Mapping[str, np.ndarray], pred: np.ndarray, two_sided: Sequence[bool], combine: str,
                 num_classes: int, p_threshold: float = 0.0, mondrian: bool = False,
                 class_thresholds: Sequence[float] | None = None, fallback_classes: Sequence[int] = (),
                 tails: bool = True) -> None:
        if combine not in COMBINERS:
            raise ValueError(f"unknown combination {combine!r}; choose from {COMBINERS}")
        self.names = list(scores)
        self.two_sided = [bool(t) for t in two_sided]
        if len(self.two_sided) != len(self.names):
            raise ValueError(f"{len(self.names)} detectors but {len(self.two_sided)} two_sided flags")
        self.combine = combine
        self.num_classes = int(num_classes)
        self.pred = np.asarray(pred, np.int64)
        self.scores = {n: np.asarray(scores[n], np.float64) for n in self.names}
        for n, v in self.scores.items():
            if v.shape != self.pred.shape:
                raise ValueError(f"{n}: {v.shape} calibration scores for {self.pred.shape} predicted labels")
        self.mondrian = bool(mondrian)
        self.p_threshold = float(p_threshold)
        self.fallback_classes = [int(c) for c in fallback_classes]
        self.class_thresholds = (np.asarray(class_thresholds, np.float64) if class_thresholds is not None
                                 else np.full(self.num_classes, self.p_threshold))
        self.tails = bool(tails)
        self.ref = {n: np.sort(v) for n, v in self.scores.items()}
        self._class_ref: dict[int, dict[str, np.ndarray]] = {}
        if self.mondrian:
            for c in range(self.num_classes):
                m = self.pred == c
                if c not in self.fallback_classes and m.any():
                    self._class_ref[c] = {n: np.sort(v[m]) for n, v in self.scores.items()}
        self._tails = {id(r): tail_scales(r) for refs in (self.ref, *self._class_ref.values()) for r in refs.values()}
        self._adaptive: AdaptiveCombiner | None = None
        if combine == "adaptive" and len(self.names) > 1:
            # the second stage's reference: the calibration inputs' pooled leave-one-out member p-values
            P_cal = self._member_pvalues(self.scores, self.pred, True, True)[0]
            self._adaptive = AdaptiveCombiner(P_cal, tails=self.tails)

    @property
    def n(self) -> int:
        return len(self.pred)

    @classmethod
    def fit(cls, scores: Mapping[str, np.ndarray], pred: np.ndarray, two_sided: Sequence[bool], combine: str,
            fpr: float, num_classes: int, mondrian: bool = False, tails: bool = True) -> Calibrator:
        """Calibrate on clean ``scores`` (``{detector: (n,)}``) of inputs the model predicted as ``pred``.

        Thresholds come from leave-one-out combined p-values of the calibration inputs (:func:`threshold_for_fpr`):
        the pooled one from all of them, each Mondrian class's from its own.
        """
        pred = np.asarray(pred, np.int64)
        need = min_calibration_size(fpr)
        if len(pred) < need:
            raise ValueError(f"{len(pred)} calibration inputs cannot resolve a false-positive rate of {fpr}; "
                             f"need at least {need}")
        fallback: list[int] = []
        if mondrian:
            counts = np.bincount(pred, minlength=num_classes)
            fallback = [c for c in range(num_classes) if counts[c] < need]
        cal = cls(scores, pred, two_sided, combine, num_classes, 0.0, mondrian, None, fallback, tails)
        pooled, _, _ = cal.pvalues(cal.scores, pred, leave_one_out=True, pooled=True)
        cal.p_threshold = threshold_for_fpr(pooled, fpr)
        thr = np.full(num_classes, cal.p_threshold)
        if mondrian:
            loo, _, _ = cal.pvalues(cal.scores, pred, leave_one_out=True)
            for c in cal._class_ref:
                thr[c] = threshold_for_fpr(loo[pred == c], fpr)
        cal.class_thresholds = thr
        return cal

    def thresholds(self, pred: np.ndarray) -> np.ndarray:
        """The p-value threshold that applies to each input (its predicted class's under Mondrian)."""
        pred = np.asarray(pred, np.int64)
        if not self.mondrian or self.class_thresholds is None:
            return np.full(len(pred), self.p_threshold)
        return self.class_thresholds[np.clip(pred, 0, self.num_classes - 1)]

    def pvalues(self, scores: Mapping[str, np.ndarray], pred: np.ndarray, leave_one_out: bool = False,
                pooled: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(combined (N,), per-detector p (N, k), low_tail (N, k) bool)`` for inputs predicted as ``pred``.

        With ``leave_one_out`` the scores must be the calibration scores themselves (in calibration order).
        """
        P, low = self._member_pvalues(scores, pred, leave_one_out, pooled)
        if P.shape[1] == 1:
            combined = P[:, 0].copy()
        elif self._adaptive is not None:
            combined = self._adaptive(P, leave_one_out)
        else:
            combined = combine_pvalues(P, self.combine)
        return combined, P, low

    def _member_pvalues(self, scores: Mapping[str, np.ndarray], pred: np.ndarray, leave_one_out: bool,
                        pooled: bool) -> tuple[np.ndarray, np.ndarray]:
        """Each detector's conformal p-values ``(N, k)`` and which tail fired."""
        pred = np.asarray(pred, np.int64)
        N, k = len(pred), len(self.names)
        P = np.empty((N, k))
        low = np.zeros((N, k), bool)
        groups: list[tuple[np.ndarray | None, dict[str, np.ndarray]]] = []
        if self.mondrian and not pooled:
            rest = np.ones(N, bool)
            for c, ref in self._class_ref.items():
                m = pred == c
                if m.any():
                    groups.append((m, ref))
                    rest &= ~m
            if rest.any():
                groups.append((rest, self.ref))
        else:
            groups.append((None, self.ref))
        for mask, ref in groups:
            m = slice(None) if mask is None else mask
            for j, name in enumerate(self.names):
                r = ref[name]
                P[m, j], low[m, j] = _conformal(r, np.asarray(scores[name], np.float64)[m], self.two_sided[j],
                                                leave_one_out, self._tails[id(r)] if self.tails else None)
        return P, low

    def to_json(self) -> dict:
        return {
            "combine": self.combine, "p_threshold": self.p_threshold, "mondrian": self.mondrian, "tails": self.tails,
            "class_thresholds": [float(t) for t in self.class_thresholds] if self.mondrian else None,
            "fallback_classes": self.fallback_classes if self.mondrian else None,
        }


# ------------------------------------------------------------------------------------------------ class alarm


def alarm_null(clean_flag_pred: np.ndarray, cal_pred: np.ndarray, num_classes: int,
               prior_flags: float | None = None) -> tuple[np.ndarray, str]:
    """The alarm's null hypothesis: how a *clean* stream's flags spread over the predicted classes, as the
    concentration parameters of a Dirichlet distribution (its uncertainty included) — returns ``(alpha, method)``.

    ``clean_flag_pred`` are the predicted labels of the clean inputs flagged at the guard's threshold (the calibration
    part's leave-one-out flags and the validation part's flags); ``prior_flags`` pseudo-flags (default: one per
    class) are spread like the calibration distribution of predicted labels ``cal_pred``.

    Why not the predicted-label distribution itself: with pooled calibration hard classes collect most false alarms,
    and even with Mondrian calibration each class's *realised* false-positive rate varies with its calibration
    sample (conformally it is ``Beta(k, n + 1 - k)``, ``k = floor(fpr (n + 1))``: about 0.3%-1.8% for n = 600 at
    1%), so clean flags do not follow the predicted labels closely enough for a sharp binomial test. Under Mondrian
    the leave-one-out flags plus one pseudo-flag per class give exactly that ``k`` per class. Few clean flags make the
    Dirichlet broad, which the beta-binomial test honours: less power, no false alarms from a noisy estimate.
    """
    shares = np.bincount(np.asarray(cal_pred, np.int64), minlength=num_classes)[:num_classes] + 1.0
    flags = np.bincount(np.asarray(clean_flag_pred, np.int64), minlength=num_classes)[:num_classes]
    prior = (num_classes if prior_flags is None else prior_flags) * shares / shares.sum()
    return flags.astype(np.float64) + prior, "clean-flags-at-threshold"


@dataclass
class DriftAlarm:
    """The drift alarm: does the stream as a whole depart from the clean calibration data?

    Drift is not a backdoor: another camera, another dataset or corrupted inputs raise the flag rate and change the
    prediction mix for every class alike. Each test is one-sided where that makes sense; the smallest p-value,
    Bonferroni-adjusted over the tests run, is compared with ``alpha``.
    """

    fired: bool
    p_value: float
    alpha: float
    tests: list[dict[str, Any]]

    def message(self) -> str:
        parts = "; ".join(f"{t['name']} {t['summary']} (p = {t['p_value']:.2g})" for t in self.tests)
        if self.fired:
            return f"DRIFT: the stream departs from the clean calibration data — {parts}"
        if not self.tests:  # nothing scored yet (every input an error): no test ran
            return "no drift alarm (no input scored: no test ran)"
        return f"no drift alarm (smallest Bonferroni p = {self.p_value:.2g}, alpha {self.alpha:g}; {parts})"

    def to_json(self) -> dict[str, Any]:
        return {"fired": self.fired, "p_value": self.p_value, "alpha": self.alpha, "message": self.message(),
                "tests": self.tests}

    def with_scores(self, stream_scores: np.ndarray, calibration_scores: np.ndarray) -> DriftAlarm:
        """This alarm with the score-distribution test added (for a caller that holds the stream's guard scores)."""
        tests = [t for t in self.tests if t["name"] != "scores"]
        tests += drift_alarm(0, 0, stream_scores=stream_scores, calibration_scores=calibration_scores).tests
        if not tests:
            return self
        p_min = min(1.0, min(t["p_value"] for t in tests) * len(tests))
        return DriftAlarm(bool(p_min < self.alpha), float(p_min), self.alpha, tests)


@dataclass
class ClassAlarm:
    """The target-class alarm: are the flagged inputs concentrated on one predicted class, beyond what the stream's
    own prediction mix explains? ``drift`` is the drift alarm of the same stream (None without calibration data)."""

    fired: bool
    target: int | None
    target_name: str | None
    flagged_total: int
    flagged_on_target: int
    expected_on_target: float
    p_value: float
    alpha: float
    per_class: list[dict]
    min_flags: int = 5
    conditional: bool = False
    drift: DriftAlarm | None = field(default=None)

    def message(self) -> str:
        if self.fired:
            given = " given the stream's prediction mix" if self.conditional else ""
            text = (f"suspected backdoor target: {self.target} ({self.target_name}) — {self.flagged_on_target} of "
                    f"{self.flagged_total} flagged inputs predicted as it, {self.expected_on_target:.1f} expected"
                    f"{given}; p = {self.p_value:.2g} (Bonferroni over classes)")
        else:
            top = min(self.per_class, key=lambda r: r["p_value"], default=None)
            few = (f"; class {top['class']} is the most concentrated, but {top['flagged']} flags are fewer than the "
                   f"{self.min_flags} an alarm needs" if top is not None and self.p_value < self.alpha else "")
            text = (f"no target-class alarm ({self.flagged_total} flagged; smallest Bonferroni p = "
                    f"{self.p_value:.2g}, alpha {self.alpha:g}{few})")
        return text + ("\n" + self.drift.message() if self.drift is not None else "")

    def to_json(self) -> dict:
        return {"fired": self.fired, "target": self.target, "target_name": self.target_name,
                "flagged_total": self.flagged_total, "flagged_on_target": self.flagged_on_target,
                "expected_on_target": self.expected_on_target, "p_value": self.p_value, "alpha": self.alpha,
                "min_flags": self.min_flags, "conditional": self.conditional, "message": self.message(),
                "per_class": self.per_class, "drift": self.drift.to_json() if self.drift is not None else None}


def stream_null(null: Sequence[float], predicted_by_class: Sequence[int],
                calibration_counts: Sequence[int]) -> np.ndarray:
    """The clean-flag Dirichlet of :func:`alarm_null` re-weighted to the stream's own prediction mix.

    ``null[c]`` holds how many clean flags class ``c`` got, over the calibration share ``pi_c`` of inputs predicted
    as ``c``: the ratio is the class's flag propensity (hard classes collect more clean flags). A clean stream
    predicted as ``c`` ``n_c`` times then expects a share ``q_c ~ n_c * null[c] / pi_c`` of its flags. The total
    concentration (the null's certainty) is kept. A shifted stream whose predictions are not the calibration mix
    thus no longer looks like a concentration on the classes it happens to predict more often.
    """
    a = np.asarray(null, np.float64)
    n = np.asarray(predicted_by_class, np.float64)
    pi = np.asarray(calibration_counts, np.float64) + 1.0
    if not (a.shape == n.shape == pi.shape):
        raise ValueError(f"{len(a)} null parameters, {len(n)} stream counts, {len(pi)} calibration counts")
    pi = pi / pi.sum()
    w = n * a / pi
    if w.sum() <= 0:
        return a
    return a.sum() * w / w.sum()


def target_class_alarm(flagged_by_class: Sequence[int], null: Sequence[float],
                       class_names: Sequence[str] | None = None, alpha: float = 1e-3,
                       min_flags: int = 5, predicted_by_class: Sequence[int] | None = None,
                       calibration_counts: Sequence[int] | None = None, min_ratio: float = 2.0) -> ClassAlarm:
    """Is the flagged-label distribution concentrated on one class? One-sided test per class, Bonferroni over classes.

    ``flagged_by_class[c]`` counts flagged inputs predicted as ``c`` (``F`` in all). ``null`` holds the Dirichlet
    concentrations from :func:`alarm_null`: class ``c``'s clean share is ``Beta(a_c, A - a_c)`` and the test is the
    beta-binomial tail ``P(X >= k_c)``, ``X ~ BetaBinom(F, a_c, A - a_c)`` (plain probabilities summing to 1 are
    taken as known shares: the binomial test). Fires when the smallest adjusted p-value is below ``alpha`` and that
    class holds at least ``min_flags`` flags — ABL's second observation: a backdoor sends its inputs to one class.

    With ``predicted_by_class`` (the stream's prediction counts) and ``calibration_counts`` (the calibration part's)
    the test is *conditional* on the stream's own prediction mix (:func:`stream_null`): a backdoor raises the flag
    rate within its target class relative to the rest of the stream, while a stream that merely predicts some class
    more often — a distribution shift — does not fire. Classes the stream never predicts cannot fire. The conditional
    alarm also needs an effect: the class's flag rate at least ``min_ratio`` times the rest of the stream's. A backdoor
    concentrates flags on its target (tens of times the rest's rate), while a shifted stream flagged almost everywhere
    only tilts the rates (100% against 96%), which the clean flag propensities can still make "significant".
    """
    k = np.asarray(flagged_by_class, np.int64)
    a = np.asarray(null, np.float64)
    if k.shape != a.shape:
        raise ValueError(f"{len(k)} class counts but {len(a)} null parameters")
    conditional = predicted_by_class is not None and calibration_counts is not None
    if conditional:
        a = stream_null(a, predicted_by_class, calibration_counts)  # type: ignore[arg-type]
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(k))]
    F, K, A = int(k.sum()), len(k), float(a.sum())
    pi = a / A if A > 0 else np.full(K, 1.0 / max(K, 1))
    if not F:
        raw = np.ones(K)
    elif abs(A - 1.0) < 1e-9 and not conditional:
        raw = stats.binom.sf(k - 1, F, pi)
    else:
        # a class the stream never predicts holds no flags, the only class it predicts holds all: nothing to test
        pos = (a > 0) & (a < A) & (k > 0)
        raw = np.ones(K)
        raw[pos] = stats.betabinom.sf(k[pos] - 1, F, a[pos], A - a[pos])
    adj = np.minimum(1.0, raw * K)
    ratio = np.full(K, np.inf)
    if conditional:  # flag rate of the class over that of the rest of the stream
        n = np.asarray(predicted_by_class, np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = (k / n) / ((F - k) / (n.sum() - n))
        ratio = np.where(np.isnan(ratio), 0.0, ratio)
    per_class = [{"class": c, "name": names[c], "flagged": int(k[c]), "expected": float(F * pi[c]),
                  "p_value": float(adj[c])} | ({"rate_ratio": float(ratio[c])} if conditional else {})
                 for c in range(K)]
    c = int(np.argmin(adj)) if K else 0
    fired = bool(K and adj[c] < alpha and k[c] >= min_flags and ratio[c] >= min_ratio)
    return ClassAlarm(fired, c if fired else None, names[c] if fired else None, F, int(k[c]) if K else 0,
                      float(F * pi[c]) if K else 0.0, float(adj[c]) if K else 1.0, alpha, per_class, min_flags,
                      conditional)


def drift_alarm(flagged: int, scanned: int, predicted_by_class: Sequence[int] | None = None,
                calibration_counts: Sequence[int] | None = None, clean_flags: tuple[int, int] | None = None,
                stream_scores: np.ndarray | None = None, calibration_scores: np.ndarray | None = None,
                alpha: float = 1e-3) -> DriftAlarm:
    """Does the stream depart from the clean calibration data? Runs the tests whose inputs are given.

    * ``flag rate``: more flags than clean data gives. Clean data was flagged ``k`` of ``n`` times
      (``clean_flags``, the validation part); the clean rate's uncertainty is ``Beta(k + 1, n - k + 1)``, so the
      stream's flag count is tested against the beta-binomial upper tail (a plain binomial test against the target
      rate would cry wolf on a long stream whenever the realised rate sits a little above it).
    * ``prediction mix``: the stream's predicted classes against the calibration part's (chi-square test of
      homogeneity on the 2 x K table; Cochran's rule is not enforced, tiny streams rarely fire).
    * ``scores``: the stream's guard scores against the calibration part's leave-one-out scores (two-sample
      Kolmogorov-Smirnov), where a caller holds both (the report does; the streaming scan does not keep scores).
    """
    tests: list[dict[str, Any]] = []
    if clean_flags is not None and scanned > 0:
        k, n = int(clean_flags[0]), int(clean_flags[1])
        p = float(stats.betabinom.sf(flagged - 1, scanned, k + 1, n - k + 1))
        tests.append({"name": "flag rate", "p_value": p, "stream_rate": flagged / scanned,
                      "clean_rate": k / n if n else None,
                      "summary": f"{flagged / scanned:.2%} flagged vs {k / max(n, 1):.2%} of clean inputs"})
    if predicted_by_class is not None and calibration_counts is not None and scanned > 0:
        table = np.array([calibration_counts, predicted_by_class], np.float64)
        table = table[:, table.sum(axis=0) > 0]
        if table.shape[1] >= 2 and (table.sum(axis=1) > 0).all():
            chi2, p, dof, _ = stats.chi2_contingency(table, correction=False)
            share = table[1] / table[1].sum() - table[0] / table[0].sum()
            tests.append({"name": "prediction mix", "p_value": float(p), "chi2": float(chi2), "dof": int(dof),
                          "max_share_change": float(np.abs(share).max()),
                          "summary": f"class shares moved by up to {np.abs(share).max():.1%}"})
    if stream_scores is not None and calibration_scores is not None and len(stream_scores) and len(calibration_scores):
        res = stats.ks_2samp(np.asarray(stream_scores, np.float64), np.asarray(calibration_scores, np.float64))
        tests.append({"name": "scores", "p_value": float(res.pvalue), "ks": float(res.statistic),
                      "summary": f"guard-score distribution KS {res.statistic:.2f}"})
    if not tests:
        return DriftAlarm(False, 1.0, alpha, [])
    p_min = min(1.0, min(t["p_value"] for t in tests) * len(tests))
    return DriftAlarm(bool(p_min < alpha), float(p_min), alpha, tests)


def stream_alarms(flagged_by_class: Sequence[int], predicted_by_class: Sequence[int],
                  calibration: Mapping[str, Any] | Sequence[float], class_names: Sequence[str] | None = None,
                  alpha: float = 1e-3, stream_scores: np.ndarray | None = None,
                  calibration_scores: np.ndarray | None = None) -> ClassAlarm | None:
    """Both stream alarms from a scan's counts and a bundle's ``calibration`` manifest section: the target-class
    alarm conditional on the stream's prediction mix, with the drift alarm attached (``.drift``).

    ``calibration`` may also be a bare Dirichlet null (older callers): then only the unconditional class alarm runs.
    Returns None when the bundle holds no alarm null.
    """
    if not isinstance(calibration, Mapping):
        return target_class_alarm(flagged_by_class, calibration, class_names, alpha=alpha)
    null = (calibration.get("alarm_null") or {}).get("dirichlet")
    if null is None:
        return None
    K = len(null)
    flags = list(flagged_by_class)[:K] + [0] * max(0, K - len(flagged_by_class))
    preds = list(predicted_by_class)[:K] + [0] * max(0, K - len(predicted_by_class))
    counts = _counts(calibration.get("predicted_class_counts"), K)
    alarm = target_class_alarm(flags, null, class_names, alpha=alpha, predicted_by_class=preds if counts else None,
                               calibration_counts=counts)
    val = calibration.get("validation")
    clean = None
    if isinstance(val, Mapping):
        kn = _counts([val.get("k"), val.get("n")], 2)
        clean = (kn[0], kn[1]) if kn is not None and kn[0] <= kn[1] else None
    alarm.drift = drift_alarm(int(sum(flags)), int(sum(preds)), preds if counts else None, counts, clean,
                              stream_scores, calibration_scores, alpha)
    return alarm


def _counts(v: Any, k: int) -> list[int] | None:
    """``v`` as ``k`` non-negative integer counts, or None when a (hand-edited) manifest holds anything else."""
    if not isinstance(v, (list, tuple)) or len(v) != k:
        return None
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) and x >= 0 for x in v):
        return None
    return [int(x) for x in v]
