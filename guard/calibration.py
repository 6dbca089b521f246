"""Statistics of calibration: conformal p-values, their combination, the threshold, and its check.

The guard turns every detector's raw score into a conformal p-value against that detector's scores on clean
calibration inputs (two-sided detectors use both tails and report which fired), combines the p-values into one, and
flags an input when the combined p-value is at or below a threshold chosen so that the *guard as a whole* flags the
target fraction of clean inputs. The realised false-positive rate is then measured on a held-out clean split and
reported with a Clopper-Pearson interval.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    p, low = _conformal(np.sort(np.asarray(reference, dtype=np.float64)), scores, two_sided, leave_one_out)
    return p, np.where(low, "low", "high").astype(object)


def _conformal(ref: np.ndarray, scores: np.ndarray, two_sided: bool, leave_one_out: bool
               ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`conformal_pvalues` on an already sorted reference; the tail as a boolean ``low`` mask."""
    s = np.asarray(scores, dtype=np.float64)
    n = len(ref)
    if n == 0:
        raise ValueError("no reference scores")
    ge = n - np.searchsorted(ref, s, side="left")  # #{ref >= s}
    if leave_one_out:
        ge, n = ge - 1, n - 1
    p_high = (1.0 + ge) / (n + 1.0)
    if not two_sided:
        return p_high, np.zeros(len(s), bool)
    le = np.searchsorted(ref, s, side="right") - (1 if leave_one_out else 0)  # #{ref <= s}
    p_low = (1.0 + le) / (n + 1.0)
    low = p_low < p_high
    return np.minimum(1.0, 2.0 * np.minimum(p_high, p_low)), low


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
    labels; both are what a bundle stores. Read-only after construction, so one instance serves many threads.
    """

    def __init__(self, scores: Mapping[str, np.ndarray], pred: np.ndarray, two_sided: Sequence[bool], combine: str,
                 num_classes: int, p_threshold: float = 0.0, mondrian: bool = False,
                 class_thresholds: Sequence[float] | None = None, fallback_classes: Sequence[int] = ()) -> None:
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
        self.ref = {n: np.sort(v) for n, v in self.scores.items()}
        self._class_ref: dict[int, dict[str, np.ndarray]] = {}
        if self.mondrian:
            for c in range(self.num_classes):
                m = self.pred == c
                if c not in self.fallback_classes and m.any():
                    self._class_ref[c] = {n: np.sort(v[m]) for n, v in self.scores.items()}

    @property
    def n(self) -> int:
        return len(self.pred)

    @classmethod
    def fit(cls, scores: Mapping[str, np.ndarray], pred: np.ndarray, two_sided: Sequence[bool], combine: str,
            fpr: float, num_classes: int, mondrian: bool = False) -> Calibrator:
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
        cal = cls(scores, pred, two_sided, combine, num_classes, 0.0, mondrian, None, fallback)
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
                P[m, j], low[m, j] = _conformal(ref[name], np.asarray(scores[name], np.float64)[m],
                                                self.two_sided[j], leave_one_out)
        combined = P[:, 0].copy() if k == 1 else combine_pvalues(P, self.combine)
        return combined, P, low

    def to_json(self) -> dict:
        return {
            "combine": self.combine, "p_threshold": self.p_threshold, "mondrian": self.mondrian,
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
class ClassAlarm:
    """The target-class alarm: are the flagged inputs concentrated on one predicted class?"""

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

    def message(self) -> str:
        if self.fired:
            return (f"suspected backdoor target: {self.target} ({self.target_name}) — {self.flagged_on_target} of "
                    f"{self.flagged_total} flagged inputs predicted as it, {self.expected_on_target:.1f} expected; "
                    f"p = {self.p_value:.2g} (Bonferroni over classes)")
        top = min(self.per_class, key=lambda r: r["p_value"], default=None)
        few = (f"; class {top['class']} is the most concentrated, but {top['flagged']} flags are fewer than the "
               f"{self.min_flags} an alarm needs" if top is not None and self.p_value < self.alpha else "")
        return (f"no target-class alarm ({self.flagged_total} flagged; smallest Bonferroni p = {self.p_value:.2g}, "
                f"alpha {self.alpha:g}{few})")

    def to_json(self) -> dict:
        return {"fired": self.fired, "target": self.target, "target_name": self.target_name,
                "flagged_total": self.flagged_total, "flagged_on_target": self.flagged_on_target,
                "expected_on_target": self.expected_on_target, "p_value": self.p_value, "alpha": self.alpha,
                "min_flags": self.min_flags, "message": self.message(), "per_class": self.per_class}


def target_class_alarm(flagged_by_class: Sequence[int], null: Sequence[float],
                       class_names: Sequence[str] | None = None, alpha: float = 1e-3,
                       min_flags: int = 5) -> ClassAlarm:
    """Is the flagged-label distribution concentrated on one class? One-sided test per class, Bonferroni over classes.

    ``flagged_by_class[c]`` counts flagged inputs predicted as ``c`` (``F`` in all). ``null`` holds the Dirichlet
    concentrations from :func:`alarm_null`: class ``c``'s clean share is ``Beta(a_c, A - a_c)`` and the test is the
    beta-binomial tail ``P(X >= k_c)``, ``X ~ BetaBinom(F, a_c, A - a_c)`` (plain probabilities summing to 1 are
    taken as known shares: the binomial test). Fires when the smallest adjusted p-value is below ``alpha`` and that
    class holds at least ``min_flags`` flags — ABL's second observation: a backdoor sends its inputs to one class.
    """
    k = np.asarray(flagged_by_class, np.int64)
    a = np.asarray(null, np.float64)
    if k.shape != a.shape:
        raise ValueError(f"{len(k)} class counts but {len(a)} null parameters")
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(k))]
    F, K, A = int(k.sum()), len(k), float(a.sum())
    pi = a / A if A > 0 else np.full(K, 1.0 / max(K, 1))
    if not F:
        raw = np.ones(K)
    elif abs(A - 1.0) < 1e-9:
        raw = stats.binom.sf(k - 1, F, pi)
    else:
        raw = stats.betabinom.sf(k - 1, F, a, A - a)
    adj = np.minimum(1.0, raw * K)
    per_class = [{"class": c, "name": names[c], "flagged": int(k[c]), "expected": float(F * pi[c]),
                  "p_value": float(adj[c])} for c in range(K)]
    c = int(np.argmin(adj)) if K else 0
    fired = bool(K and adj[c] < alpha and k[c] >= min_flags)
    return ClassAlarm(fired, c if fired else None, names[c] if fired else None, F, int(k[c]) if K else 0,
                      float(F * pi[c]) if K else 0.0, float(adj[c]) if K else 1.0, alpha, per_class, min_flags)
