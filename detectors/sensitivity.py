"""Sensitivity lens: how much the prediction moves when the model (mutation) or the input (squeezing) is perturbed.

Both statistics are two-sided (Jin et al., arXiv 2006.14871 / IEEE TDSC 2023): an adversarial input sits on a knife
edge and moves a lot (high tail), a backdoor input is over-determined by its trigger and barely moves (low tail).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

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


#: Roth et al.'s detection noise (their ``noise_eps_detect`` for [0, 1] inputs): Gaussian (n), uniform (u) and sign
#: (s) noise at three magnitudes, 256 draws each
PAPER_NOISE = ("n0.003", "s0.003", "u0.003", "n0.005", "s0.005", "u0.005", "s0.008", "n0.008", "u0.008")
PAPER_SAMPLES = 256
#: elements of float32 scratch per model call of the noisy copies, about 64 MB
_NOISE_BUDGET = 1 << 24


def _parse_noise(noise: str | Sequence[str]) -> tuple[tuple[str, float], ...]:
    """``"n0.05"`` / ``"n0.003,u0.005"`` / ``"paper"`` -> ``((kind, eps), ...)`` with kind in n, u, s."""
    items = PAPER_NOISE if noise == "paper" else (noise.split(",") if isinstance(noise, str) else list(noise))
    out = []
    for item in (str(i).strip() for i in items):
        kind, mag = item[:1], item[1:]
        try:
            eps = float(mag)
        except ValueError:
            eps = -1.0
        if kind not in ("n", "u", "s") or not np.isfinite(eps) or eps <= 0:
            raise ValueError(f"noise setting {item!r} must be a kind n (Gaussian), u (uniform) or s (sign) followed "
                             "by a magnitude > 0, e.g. n0.05; or noise='paper'")
        out.append((kind, eps))
    if not out:
        raise ValueError("noise names no setting")
    return tuple(out)


@register
class NoiseLogOdds(Detector):
    """The odds are odd (Roth, Kilcher, Hofmann, ICML 2019): how random input noise moves the log-odds of the
    predicted class ``y`` against every other class ``z``, compared with how it moves them on clean inputs.

    For each noise setting, ``g_z(x) = mean_eta [f_z - f_y](clip(x + eta)) - [f_z - f_y](x)`` over ``n_samples``
    draws (``f`` the logits; Roth et al.'s "alignment" of the penultimate shift with ``w_y - w_z``, which is the same
    quantity with the biases cancelled, so any ONNX classifier works). Fit stores, per predicted class ``y``, the
    mean and standard deviation of ``g_z`` over the clean reference; the score is
    ``max_{z != y} mean_settings (g_z - mu_{y,z}) / sd_{y,z}`` — Roth et al.'s detection statistic, whose threshold
    the guard calibrates. An adversarial input sits just across a decision boundary, and noise pulls its log-odds
    back towards the true class far more than it moves a clean input's: one-sided, high = adversarial-like.

    ``noise="paper"`` with ``n_samples=None`` is Roth et al.'s setting (their ``noise_eps_detect``: Gaussian, uniform
    and sign noise at 0.003, 0.005 and 0.008 on [0, 1] inputs, 256 draws each: 2,304 extra passes per input).
    Deviations: the default is one Gaussian setting, ``n0.05`` with 16 draws (16 extra passes): on our converged
    Fashion-MNIST model it separates PGD at least as well as the paper's setting at 1/144 of its cost
    (``bench/results/detect_converged.md``); every input sees the same seeded noise draws (common random numbers,
    so a score does not depend on the batch it came in — Roth et al. draw afresh per input); a class with fewer than
    ``min_class`` reference inputs (Roth et al. then never flag it) is compared with the pooled reference.
    """

    name = "odds"
    needs_model = True
    tail_kinds = {"high": "adversarial-like"}

    def __init__(self, noise: str | Sequence[str] = "n0.05", n_samples: int | None = None, min_class: int = 3,
                 seed: int = 0, chunk_size: int = 4096) -> None:
        super().__init__(chunk_size)
        self.settings = _parse_noise(noise)  # validates
        self.noise = noise if isinstance(noise, str) else ",".join(str(n) for n in noise)
        if n_samples is not None and int(n_samples) < 1:
            raise ValueError("n_samples must be >= 1 (or None: 256 for noise='paper', else 16)")
        if min_class < 2:
            raise ValueError("min_class must be >= 2 (a standard deviation needs two inputs)")
        self.n_samples = None if n_samples is None else int(n_samples)
        self.min_class = int(min_class)
        self.seed = int(seed)
        self.input_shape_: tuple[int, ...] | None = None
        self.mu_: np.ndarray | None = None  # (settings, K, K): per predicted class y, the mean shift of each z
        self.sd_: np.ndarray | None = None
        self.pooled_: np.ndarray | None = None  # (K,) bool: classes compared with the pooled reference
        self._bank: list[np.ndarray] | None = None

    @property
    def draws(self) -> int:
        """Noise draws per setting."""
        if self.n_samples is not None:
            return self.n_samples
        return PAPER_SAMPLES if self.noise == "paper" else 16

    @property
    def requires(self) -> tuple[str, ...]:
        return ("input", "logits")

    def noise_bank(self) -> list[np.ndarray]:
        """Per setting, the ``(draws, C, H, W)`` float32 noise every input sees (seeded, drawn once)."""
        self._check_fitted("input_shape_")
        assert self.input_shape_ is not None
        if self._bank is None:
            rng = np.random.default_rng(self.seed)
            shape = (self.draws, *self.input_shape_)
            bank = []
            for kind, eps in self.settings:
                if kind == "n":
                    v = rng.standard_normal(shape)
                elif kind == "u":
                    v = rng.uniform(-1.0, 1.0, shape)
                else:
                    v = np.sign(rng.uniform(-1.0, 1.0, shape))
                bank.append((eps * v).astype(np.float32))
            self._bank = bank
        return self._bank

    def shifts(self, x: np.ndarray, logits: np.ndarray, model: ModelFn | None) -> np.ndarray:
        """``(settings, N, K)``: the mean log-odds shift ``g_z`` of each input against its predicted class."""
        bank = self.noise_bank()
        logits = np.asarray(logits, np.float64)
        y = logits.argmax(axis=1)
        base = logits - logits[np.arange(len(y)), y][:, None]  # the clean log-odds f_z - f_y
        n, per_image = len(x), int(np.prod(x.shape[1:]))
        rows = max(1, min(self.chunk_size, _NOISE_BUDGET // max(1, self.draws * per_image)))
        out = np.empty((len(bank), n, logits.shape[1]))
        for j, noise in enumerate(bank):
            for start in range(0, n, rows):
                s = slice(start, min(start + rows, n))
                noisy = np.clip(x[s][None] + noise[:, None], 0.0, 1.0).reshape(-1, *x.shape[1:])
                ln = model_logits(model, noisy, "NoiseLogOdds").reshape(self.draws, s.stop - s.start, -1).mean(0)
                out[j, s] = ln - ln[np.arange(s.stop - s.start), y[s]][:, None] - base[s]
        return out

    def fit(self, reference: Observations, labels: np.ndarray | None = None,
            model: ModelFn | None = None) -> NoiseLogOdds:
        x = check_images(self._get(reference, "input"), "NoiseLogOdds")
        logits = self._get(reference, "logits", 2)
        if len(x) < self.min_class:
            raise ValueError(f"NoiseLogOdds needs at least {self.min_class} reference inputs, got {len(x)}")
        self.input_shape_ = tuple(int(v) for v in x.shape[1:])
        self._bank = None
        g = self.shifts(x, logits, model)
        k = logits.shape[1]
        y = np.asarray(logits).argmax(axis=1)
        own = np.zeros((len(y), k), bool)
        own[np.arange(len(y)), y] = True
        rest = np.where(own[None], np.nan, g)  # a class's shift against itself is 0 by construction
        mu = np.repeat(np.nanmean(rest, axis=1)[:, None], k, axis=1)
        sd = np.repeat(np.nanstd(rest, axis=1)[:, None], k, axis=1)
        counts = np.bincount(y, minlength=k)
        for c in np.flatnonzero(counts >= self.min_class):
            mu[:, c] = g[:, y == c].mean(axis=1)
            sd[:, c] = g[:, y == c].std(axis=1)
        self.mu_ = np.nan_to_num(mu)
        self.sd_ = np.maximum(np.nan_to_num(sd), 1e-9)
        self.pooled_ = counts < self.min_class
        return self

    def score(self, batch: Observations, model: ModelFn | None = None) -> np.ndarray:
        self._check_fitted("mu_", "sd_", "input_shape_")
        assert self.mu_ is not None and self.sd_ is not None
        x = check_images(self._get(batch, "input"), "NoiseLogOdds", self.input_shape_)
        logits = self._get(batch, "logits", 2)
        if logits.shape[1] != self.mu_.shape[1]:
            raise ValueError(f"NoiseLogOdds: {logits.shape[1]} classes, fitted on {self.mu_.shape[1]}")
        y = logits.argmax(axis=1)
        out = np.empty(len(x))
        for s in self._chunks(len(x)):
            z = ((self.shifts(x[s], logits[s], model) - self.mu_[:, y[s]]) / self.sd_[:, y[s]]).mean(axis=0)
            z[np.arange(len(z)), y[s]] = -np.inf
            out[s] = z.max(axis=1) if z.shape[1] > 1 else 0.0
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        self._check_fitted("mu_", "sd_", "input_shape_")
        assert self.mu_ is not None and self.sd_ is not None and self.pooled_ is not None
        return {"mu": self.mu_, "sd": self.sd_, "pooled": self.pooled_,
                "input_shape": np.array(self.input_shape_, np.int64)}

    def _load_state(self, state: Mapping[str, np.ndarray]) -> None:
        mu, sd = np.asarray(state["mu"], np.float64), np.asarray(state["sd"], np.float64)
        if mu.shape != sd.shape or mu.ndim != 3 or mu.shape[0] != len(self.settings) or mu.shape[1] != mu.shape[2]:
            raise ValueError(f"odds state has shapes {mu.shape} / {sd.shape} for {len(self.settings)} noise settings")
        self.mu_, self.sd_ = mu, sd
        self.pooled_ = np.asarray(state["pooled"], bool)
        self.input_shape_ = tuple(int(v) for v in state["input_shape"])
        self._bank = None
