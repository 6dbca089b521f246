"""Sensitivity lens: how much the prediction moves when the model (mutation) or the input (squeezing) is perturbed.

Both statistics are two-sided (Jin et al., arXiv 2006.14871 / IEEE TDSC 2023): an adversarial input sits on a knife
edge and moves a lot (high tail), a backdoor input is over-determined by its trigger and barely moves (low tail).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
from scipy.ndimage import median_filter

from ._util import check_images, model_logits, softmax
from .base import Detector, ModelFn, NotFittedError, Observations, register
from .taps import resolve_tap, taps_state, with_taps

log = logging.getLogger(__name__)

_OPS = {"linear": 0, "relu": 1, "flatten": 2}
_OP_NAMES = {v: k for k, v in _OPS.items()}
#: elements of float32 scratch per chunk of the mutant head pass (M x rows x width), about 64 MB
_HEAD_BUDGET = 1 << 24

STATISTICS = ("lcr+drop", "lcr", "drop")


@register
class ModelMutation(Detector):
    """Model-mutation testing (Wang et al., ICSE 2019) as revised by Jin et al.: Gaussian fuzzing of the dense layers.

    Fit draws ``n_mutants`` mutants once (seeded) and stores them: every dense weight matrix ``W`` of the head after
    ``tap`` becomes ``W + N(mean(W) * mean_factor, (max(W) * std_factor)^2)``, biases untouched — exactly Jin et al.'s
    ``gaussian_fuzzing.py`` (mean factor 1.0; std factor 0.65 for backdoor detection, 0.30-0.35 for adversarial
    detection; 100 mutants; no accuracy filter). Score: the label-change rate (LCR) of the mutants against the
    unmutated model's prediction, plus (``statistic="lcr+drop"``, default) the mean drop of that predicted class's
    probability, so that inputs with equal LCR (e.g. many at 0) still rank. Two-sided: a low score is backdoor-like
    (the trigger holds the label), a high one adversarial-like.

    The cheap path: only the dense layers after ``tap`` are mutated, so one model pass gives the tapped activations
    and every mutant is a batched numpy head pass (``M`` matrix products per layer). The head's weights come from the
    model at fit time (``model.dense_head(tap)``, read from the ONNX graph by ``guard.model.OnnxModel``) and are
    checked to reproduce the model's logits on the reference. With the SmallCNN, ``tap="pool"`` fuzzes both dense
    layers (fc1 and fc) as Jin et al. fuzz every Dense layer; the default (``tap=None``) is ``penultimate`` (fuzz
    the classifier only), or the model's last tap when it has none (resolved at fit, :mod:`.taps`).

    Deviations: the SPRT is replaced by the explicit LCR over all mutants (Jin et al.'s SPRT settings amount to an LCR
    threshold of about 0.16 — see the research brief — and a calibrated score gives AUROCs); the reference label is
    the unmutated model's prediction for every input (Jin et al.'s code uses the ground truth or the attack target);
    where ``max(W) <= 0`` the noise scale uses ``max|W|``. Mutating convolutional layers through onnxruntime
    initializer overrides (the "deep" path) is not implemented.
    """

    name = "mutation"
    two_sided = True
    needs_model = True
    tail_kinds = {"high": "adversarial-like", "low": "backdoor-like"}

    def __init__(self, tap: str | None = None, n_mutants: int = 100, mean_factor: float = 1.0,
                 std_factor: float = 0.65, statistic: str = "lcr+drop", seed: int = 0, check_tol: float = 1e-3,
                 chunk_size: int = 4096) -> None:
        super().__init__(chunk_size)
        if n_mutants < 1:
            raise ValueError("n_mutants must be >= 1")
        if std_factor < 0:
            raise ValueError("std_factor must be >= 0")
        if statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
        self.tap = tap
        self.tap_: str | None = None  # the resolved tap: penultimate (or the model's last tap) when unset
        self.n_mutants = int(n_mutants)
        self.mean_factor = float(mean_factor)
        self.std_factor = float(std_factor)
        self.statistic = statistic
        self.seed = int(seed)
        self.check_tol = float(check_tol)
        self.ops_: np.ndarray | None = None
        self.weights_: list[np.ndarray] = []
        self.biases_: list[np.ndarray] = []
        self.mutants_: list[np.ndarray] = []

    @property
    def requires(self) -> tuple[str, ...]:
        return (self.tap_, "logits") if self.tap_ is not None else ("logits",)

    # ------------------------------------------------------------------ fit

    def fit(self, reference: Observations, labels: np.ndarray | None = None,
            model: ModelFn | None = None) -> ModelMutation:
        head = getattr(model, "dense_head", None)
        if head is None:
            raise ValueError("ModelMutation.fit needs a model with dense_head(tap) (guard.model.OnnxModel) to read "
                             "the weights of the dense layers after the tap")
        self.tap_ = resolve_tap(self.tap, reference, model, "ModelMutation")
        reference = with_taps(reference, [self.tap_], model, "ModelMutation")
        layers = head(self.tap_)
        if not any(layer["op"] == "linear" for layer in layers):
            raise ValueError(f"no dense layer follows tap {self.tap_!r}: nothing to mutate")
        self.ops_ = np.array([_OPS[layer["op"]] for layer in layers], np.int64)
        self.weights_ = [np.asarray(la["weight"], np.float32) for la in layers if la["op"] == "linear"]
        self.biases_ = [np.asarray(la["bias"], np.float32) for la in layers if la["op"] == "linear"]
        self._check_head(reference)
        rng = np.random.default_rng(self.seed)
        mutants = [np.empty((self.n_mutants, *w.shape), np.float32) for w in self.weights_]
        for m in range(self.n_mutants):  # Jin et al.: each mutant fuzzes every dense layer in turn
            for k, w in enumerate(self.weights_):
                scale = float(w.max())
                if scale <= 0:
                    scale = float(np.abs(w).max())
                noise = rng.normal(float(w.mean()) * self.mean_factor, scale * self.std_factor, size=w.shape)
                mutants[k][m] = w + noise
        self.mutants_ = mutants
        return self

    def _check_head(self, reference: Observations) -> None:
        """The numpy head must reproduce the model's logits, else the mutants would mean nothing."""
        acts = self._activations(reference)[:256]
        want = self._get(reference, "logits", 2)[:256].astype(np.float64)
        got = self._head_pass(acts, [w[None] for w in self.weights_])[0]
        err = float(np.max(np.abs(got - want))) if len(want) else 0.0
        if err > self.check_tol * (1.0 + float(np.max(np.abs(want), initial=0.0))):
            raise ValueError(f"the dense head after {self.tap_!r} does not reproduce the logits (max |diff| {err:.3g})")

    # ------------------------------------------------------------------ score

    def _activations(self, obs: Observations) -> np.ndarray:
        assert self.tap_ is not None
        a = self._get(obs, self.tap_)
        if a.ndim == 2:
            return a
        assert self.ops_ is not None
        if self.ops_[0] == _OPS["flatten"]:
            return a.reshape(len(a), -1)
        raise ValueError(f"tap {self.tap_!r} is {a.ndim}-D and the head does not start by flattening it")

    def _head_pass(self, acts: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
        """``acts (n, d)`` through the head with stacked weights ``(M, out, in)`` per layer -> logits ``(M, n, K)``."""
        assert self.ops_ is not None
        h: np.ndarray = acts.astype(np.float32)[None]
        k = 0
        for op in self.ops_:
            name = _OP_NAMES[int(op)]
            if name == "linear":
                h = np.matmul(h, weights[k].transpose(0, 2, 1)) + self.biases_[k]
                k += 1
            elif name == "relu":
                h = np.maximum(h, 0.0)
        return h

    def score(self, batch: Observations, model: ModelFn | None = None) -> np.ndarray:
        if self.ops_ is None or not self.mutants_:
            raise NotFittedError("ModelMutation is not fitted: call fit() first")
        assert self.tap_ is not None
        batch = with_taps(batch, [self.tap_], model, "ModelMutation")
        acts = self._activations(batch)
        if acts.shape[1] != self.weights_[0].shape[1]:
            raise ValueError(f"{self.tap_!r} has {acts.shape[1]} features, the head expects "
                             f"{self.weights_[0].shape[1]}")
        logits = self._get(batch, "logits", 2)
        if len(logits) != len(acts):
            raise ValueError(f"{len(logits)} logits for {len(acts)} activations")
        p0 = softmax(logits)
        y0 = p0.argmax(axis=1)
        width = max(max(w.shape) for w in self.weights_)
        rows = max(1, min(self.chunk_size, _HEAD_BUDGET // (self.n_mutants * width)))
        out = np.empty(len(acts))
        for start in range(0, len(acts), rows):
            s = slice(start, min(start + rows, len(acts)))
            lm = self._head_pass(acts[s], self.mutants_).astype(np.float64)  # (M, n, K)
            lm -= lm.max(axis=2, keepdims=True)
            np.exp(lm, out=lm)
            lm /= lm.sum(axis=2, keepdims=True)
            idx = np.arange(s.stop - s.start)
            y = y0[s]
            lcr = (lm.argmax(axis=2) != y[None]).mean(axis=0)
            drop = p0[s][idx, y] - lm[:, idx, y].mean(axis=0)
            out[s] = {"lcr": lcr, "drop": drop, "lcr+drop": lcr + drop}[self.statistic]
        return out

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, np.ndarray]:
        if self.ops_ is None or not self.mutants_:
            raise NotFittedError("ModelMutation is not fitted: call fit() first")
        state: dict[str, np.ndarray] = {"ops": self.ops_, "tap": taps_state([self.tap_ or ""])}
        for k, (w, b, m) in enumerate(zip(self.weights_, self.biases_, self.mutants_)):
            state[f"weight_{k}"], state[f"bias_{k}"], state[f"mutants_{k}"] = w, b, m
        return state

    def _load_state(self, state: Mapping[str, np.ndarray]) -> None:
        # bundles written before taps were resolved at fit name the tap only in the parameters
        self.tap_ = str(state["tap"][0]) if "tap" in state else self.tap
        if not self.tap_:
            raise ValueError("mutation state names no tap")
        self.ops_ = np.asarray(state["ops"], np.int64)
        n = int(np.sum(self.ops_ == _OPS["linear"]))
        self.weights_ = [np.asarray(state[f"weight_{k}"], np.float32) for k in range(n)]
        self.biases_ = [np.asarray(state[f"bias_{k}"], np.float32) for k in range(n)]
        self.mutants_ = [np.asarray(state[f"mutants_{k}"], np.float32) for k in range(n)]
        if any(len(m) != self.n_mutants for m in self.mutants_):
            raise ValueError(f"state holds {len(self.mutants_[0])} mutants, params say {self.n_mutants}")


def bit_depth(x: np.ndarray, bits: int) -> np.ndarray:
    """Xu et al.'s bit-depth reduction of [0, 1] inputs: ``rint(x * (2^b - 1)) / (2^b - 1)``."""
    levels = float(2**bits - 1)
    return np.rint(x * levels) / levels


def median_smooth(x: np.ndarray, size: int) -> np.ndarray:
    """Xu et al.'s local median filter: ``size x size`` per channel, scipy's ``mode="reflect"`` (NCHW batch)."""
    return median_filter(x, size=(1, 1, size, size), mode="reflect")


@register
class InputSqueezing(Detector):
    """Feature squeezing (Xu, Evans, Qi, NDSS 2018): ``max_s ||softmax(x) - softmax(s(x))||_1`` over squeezers.

    Squeezers: bit-depth reduction to ``bits`` bits and a ``median x median`` median filter (``0`` disables one).
    ``bits=None`` picks Xu et al.'s configuration by channel count at fit: 1 bit for grayscale (their MNIST setting,
    with the 2x2 median), 5 bits for colour (their CIFAR-10 setting). Every squeezed variant of a chunk goes through
    the model in one call. Two-sided (Jin et al.'s revision): a large change is adversarial-like, an unusually small
    one backdoor-like (a patch trigger survives squeezing and keeps the prediction pinned).

    Deviations: the non-local-means squeezer of Xu et al.'s colour configurations is left out (it needs OpenCV);
    thresholds are the guard's conformal calibration rather than Xu et al.'s 95th percentile of training scores.
    """

    name = "squeeze"
    two_sided = True
    needs_model = True
    tail_kinds = {"high": "adversarial-like", "low": "backdoor-like"}

    def __init__(self, bits: int | None = None, median: int = 2, chunk_size: int = 4096) -> None:
        super().__init__(chunk_size)
        if bits is not None and not 0 <= int(bits) <= 8:
            raise ValueError("bits must be in 0..8 (0 disables bit-depth reduction) or None (auto)")
        if median < 0 or median == 1:
            raise ValueError("median must be 0 (disabled) or a window size >= 2")
        if bits == 0 and median == 0:
            raise ValueError("at least one squeezer must be enabled")
        self.bits = None if bits is None else int(bits)
        self.median = int(median)
        self.bits_: int | None = None
        self.input_shape_: tuple[int, ...] | None = None

    @property
    def requires(self) -> tuple[str, ...]:
        return ("input", "logits")

    def fit(self, reference: Observations, labels: np.ndarray | None = None,
            model: ModelFn | None = None) -> InputSqueezing:
        x = check_images(self._get(reference, "input"), "InputSqueezing")
        self.input_shape_ = tuple(int(v) for v in x.shape[1:])
        self.bits_ = self.bits if self.bits is not None else (1 if x.shape[1] == 1 else 5)
        return self

    def squeeze(self, x: np.ndarray) -> list[np.ndarray]:
        """The squeezed variants of a float NCHW batch, in order (bit depth, median)."""
        self._check_fitted("bits_")
        out = []
        if self.bits_:
            out.append(bit_depth(x, self.bits_))
        if self.median:
            out.append(median_smooth(x, self.median))
        return out

    def score(self, batch: Observations, model: ModelFn | None = None) -> np.ndarray:
        self._check_fitted("bits_", "input_shape_")
        x = check_images(self._get(batch, "input"), "InputSqueezing", self.input_shape_)
        logits = self._get(batch, "logits", 2)
        out = np.empty(len(x))
        for s in self._chunks(len(x)):
            variants = self.squeeze(x[s])
            p = softmax(logits[s])
            pv = softmax(model_logits(model, np.concatenate(variants), "InputSqueezing"))
            pv = pv.reshape(len(variants), len(p), -1)
            out[s] = np.abs(pv - p[None]).sum(axis=2).max(axis=0)
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        self._check_fitted("bits_", "input_shape_")
        return {"bits": np.array(self.bits_, np.int64), "input_shape": np.array(self.input_shape_, np.int64)}

    def _load_state(self, state: Mapping[str, np.ndarray]) -> None:
        self.bits_ = int(state["bits"])
        self.input_shape_ = tuple(int(v) for v in state["input_shape"])
