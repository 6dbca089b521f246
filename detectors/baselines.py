"""Baselines every lens must be compared with: max-softmax confidence, the energy score and STRIP."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy.special import logsumexp

from ._util import check_images, model_logits, softmax, subsample
from .base import Detector, ModelFn, Observations, register


class _LogitScore(Detector):
    """A one-pass score of the logits; ``two_sided=True`` also flags the over-confident tail (Jin et al.'s view of
    backdoor inputs), ``False`` is the baseline as published (only the low-confidence tail)."""

    tail_kinds = {"high": "low-confidence", "low": "over-confident"}

    def __init__(self, two_sided: bool = False, chunk_size: int = 4096) -> None:
        super().__init__(chunk_size)
        self.two_sided = bool(two_sided)  # type: ignore[misc]  # instance override of the class default
        self.num_classes_: int | None = None

    def fit(self, reference: Observations, labels: np.ndarray | None = None,
            model: ModelFn | None = None) -> _LogitScore:
        self.num_classes_ = int(self._get(reference, "logits", 2).shape[1])
        return self

    def _stat(self, logits: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def score(self, batch: Observations, model: ModelFn | None = None) -> np.ndarray:
        self._check_fitted("num_classes_")
        logits = self._get(batch, "logits", 2)
        if logits.shape[1] != self.num_classes_:
            raise ValueError(f"logits have {logits.shape[1]} classes, fitted on {self.num_classes_}")
        out = np.empty(len(logits))
        for s in self._chunks(len(logits)):
            out[s] = self._stat(logits[s].astype(np.float64))
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        self._check_fitted("num_classes_")
        return {"num_classes": np.array(self.num_classes_, np.int64)}

    def _load_state(self, state: Mapping[str, np.ndarray]) -> None:
        self.num_classes_ = int(state["num_classes"])


@register
class MaxSoftmax(_LogitScore):
    """Maximum softmax probability (Hendrycks & Gimpel, ICLR 2017), negated: ``-max_c softmax(x)_c``."""

    name = "msp"

    def _stat(self, logits: np.ndarray) -> np.ndarray:
        return -softmax(logits).max(axis=1)


@register
class Energy(_LogitScore):
    """Energy score (Liu et al., NeurIPS 2020): ``E(x) = -T logsumexp(logits / T)``; high energy = unlike training
    data. ``temperature`` defaults to the paper's T = 1."""

    name = "energy"

    def __init__(self, temperature: float = 1.0, two_sided: bool = False, chunk_size: int = 4096) -> None:
        super().__init__(two_sided, chunk_size)
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        self.temperature = float(temperature)

    def _stat(self, logits: np.ndarray) -> np.ndarray:
        t = self.temperature
        return -t * logsumexp(logits / t, axis=1)


@register
class Strip(Detector):
    """STRIP (Gao et al., ACSAC 2019): superimpose the input on ``n_blend`` clean held-out images and take the mean
    entropy (bits) of the predictions on the blends.

    A trigger keeps pulling every blend to the target class, so triggered inputs have abnormally **low** entropy;
    we report it two-sided (Jin et al.'s view), the high tail being inputs whose prediction is unusually fragile
    (adversarial-like). Defaults are BackdoorBench's: ``n_blend = 64`` and the blend
    ``(1 - alpha) * x + alpha * clean`` with ``alpha = 0.5``. All blends of a chunk go through the model in one call;
    a chunk holds ``chunk_size // n_blend`` inputs, so a call never exceeds ``chunk_size`` images.

    Deviations: the ``n_blend`` clean images are drawn once at fit (seeded) from the reference inputs and stored in
    the state, and every input is blended with that same set (Gao et al. draw afresh per input; a fixed set makes the
    score deterministic and the calibration exact). Gao et al.'s code adds the two images at full weight and
    saturates; the convex blend follows BackdoorBench.
    """

    name = "strip"
    two_sided = True
    needs_model = True
    tail_kinds = {"high": "adversarial-like", "low": "backdoor-like"}

    def __init__(self, n_blend: int = 64, alpha: float = 0.5, seed: int = 0, chunk_size: int = 4096) -> None:
        super().__init__(chunk_size)
        if n_blend < 1:
            raise ValueError("n_blend must be >= 1")
        if not 0.0 < alpha < 1.0:
            raise ValueError("alpha must be in (0, 1)")
        self.n_blend = int(n_blend)
        self.alpha = float(alpha)
        self.seed = int(seed)
        self.clean_: np.ndarray | None = None

    @property
    def requires(self) -> tuple[str, ...]:
        return ("input",)

    def fit(self, reference: Observations, labels: np.ndarray | None = None, model: ModelFn | None = None) -> Strip:
        x = check_images(self._get(reference, "input"), "Strip")
        if len(x) < self.n_blend:
            raise ValueError(f"STRIP needs at least n_blend={self.n_blend} clean reference images, got {len(x)}")
        self.clean_ = np.ascontiguousarray(x[subsample(len(x), self.n_blend, self.seed)], dtype=np.float32)
        return self

    def blend(self, x: np.ndarray) -> np.ndarray:
        """``(n, C, H, W)`` -> ``(n * n_blend, C, H, W)``: input ``i``'s blends are rows ``i * n_blend ...``."""
        self._check_fitted("clean_")
        assert self.clean_ is not None
        b = (1.0 - self.alpha) * x[:, None] + self.alpha * self.clean_[None]
        return np.clip(b, 0.0, 1.0, out=b).reshape(-1, *x.shape[1:]).astype(np.float32, copy=False)

    def score(self, batch: Observations, model: ModelFn | None = None) -> np.ndarray:
        self._check_fitted("clean_")
        assert self.clean_ is not None
        x = check_images(self._get(batch, "input"), "Strip", self.clean_.shape[1:])
        per_call = max(1, self.chunk_size // self.n_blend)
        out = np.empty(len(x))
        for start in range(0, len(x), per_call):
            s = slice(start, min(start + per_call, len(x)))
            p = softmax(model_logits(model, self.blend(x[s]), "Strip"))
            h = -(p * np.log2(np.clip(p, 1e-12, None))).sum(axis=1)
            out[s] = h.reshape(-1, self.n_blend).mean(axis=1)
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        self._check_fitted("clean_")
        assert self.clean_ is not None
        return {"clean": self.clean_}

    def _load_state(self, state: Mapping[str, np.ndarray]) -> None:
        clean = np.asarray(state["clean"], np.float32)
        if len(clean) != self.n_blend:
            raise ValueError(f"state holds {len(clean)} clean images, params say n_blend={self.n_blend}")
        self.clean_ = clean
