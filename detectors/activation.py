"""Activation-space lens: NIC (Ma, Liu, Tao, Lee, Zhang — NDSS 2019), value and provenance invariants.

Every learned piece is kept as plain arrays (scaler, PCA basis, one-class-SVM support vectors and dual coefficients,
probe weights) and evaluated in numpy, so the bundle holds no pickled estimator; scikit-learn only does the fitting
(and is imported only then, so serving does not load it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ._util import adaptive_avg_pool, softmax, subsample
from .base import Detector, ModelFn, NotFittedError, Observations, register
from .taps import parse_taps, resolve_taps, taps_state, with_taps

log = logging.getLogger(__name__)


@dataclass
class RbfOneClassSVM:
    """A fitted RBF one-class SVM as arrays: ``f(x) = sum_i a_i exp(-gamma ||x - s_i||^2) + b`` (scikit-learn's
    ``decision_function``: positive inside the learned support, negative outside)."""

    support: np.ndarray  # (n_sv, d)
    dual: np.ndarray  # (n_sv,)
    intercept: float
    gamma: float

    @staticmethod
    def resolve_gamma(x: np.ndarray, gamma: float | str) -> float:
        """The kernel width scikit-learn would use: ``"scale"`` = ``1 / (d * var(x))`` (1 if the variance is 0),
        ``"auto"`` = ``1 / d``; resolved here so the fitted value is ours, not read from a private attribute."""
        if not isinstance(gamma, str):
            return float(gamma)
        x = np.asarray(x, np.float64)
        if gamma == "scale":
            var = float(x.var())
            return 1.0 / (x.shape[1] * var) if var != 0 else 1.0
        if gamma == "auto":
            return 1.0 / x.shape[1]
        raise ValueError(f"gamma must be a number, 'scale' or 'auto', got {gamma!r}")

    @classmethod
    def fit(cls, x: np.ndarray, nu: float, gamma: float | str) -> RbfOneClassSVM:
        from sklearn.svm import OneClassSVM

        g = cls.resolve_gamma(x, gamma)
        svm = OneClassSVM(kernel="rbf", nu=nu, gamma=g).fit(x)
        return cls(np.asarray(svm.support_vectors_, np.float64), np.asarray(svm.dual_coef_, np.float64).ravel(),
                   float(svm.intercept_[0]), g)

    def decision(self, x: np.ndarray, chunk: int = 2048) -> np.ndarray:
        out = np.empty(len(x))
        s_sq = (self.support**2).sum(axis=1)
        for start in range(0, len(x), chunk):
            xc = np.asarray(x[start : start + chunk], np.float64)
            d2 = (xc**2).sum(axis=1)[:, None] - 2.0 * xc @ self.support.T + s_sq[None]
            out[start : start + chunk] = np.exp(-self.gamma * np.maximum(d2, 0.0)) @ self.dual + self.intercept
        return out

    def to_state(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}support": self.support, f"{prefix}dual": self.dual,
                f"{prefix}scalars": np.array([self.intercept, self.gamma])}

    @classmethod
    def from_state(cls, state: Mapping[str, np.ndarray], prefix: str) -> RbfOneClassSVM:
        intercept, gamma = (float(v) for v in state[f"{prefix}scalars"])
        return cls(np.asarray(state[f"{prefix}support"], np.float64), np.asarray(state[f"{prefix}dual"], np.float64),
                   intercept, gamma)


@register
class NIC(Detector):
    """NIC's value and provenance invariants, combined by a final one-class SVM.

    Per tapped layer: activations are average-pooled to a ``grid x grid`` map per channel (conv layers), standardised,
    and PCA-reduced to ``max_dim`` dimensions when wider. *Value invariant*: an RBF one-class SVM on those features.
    *Provenance invariant*: per layer a linear probe (multinomial logistic regression, i.e. a linear layer + softmax
    trained with cross-entropy) predicts the model's label from the layer's features; for each pair of consecutive
    layers a one-class SVM models the concatenated probe probabilities — how the evidence for each class evolves
    through the network. The VI and PI decision values are standardised and fed to a final one-class SVM; the score
    is its negated decision value (higher = more suspicious). NIC's public code never trains its probes (random dense
    layers in ``svm_2.2.py``); these are trained.

    Fit cost is kept sane on CPU: the reference is subsampled to ``max_samples`` (seeded) and split in two halves —
    the per-layer models (scalers, PCA, VI/PI SVMs, probes) are fitted on the first, the final SVM on the per-layer
    decision values of the *second*, so it sees the spread of fresh clean inputs rather than the SVMs' own training
    points. With 4,000 samples a fit takes seconds to a few tens of seconds on one core.

    Deviations from NIC: pooled (not full, flattened) activations and PCA to 64 rather than 5,000 dimensions (cost);
    one ``nu``/``gamma`` for all layer SVMs (NIC tunes them per layer; ``nu = 0.1, gamma = "scale"`` is its PI/final
    setting); the layers are the model's taps (``taps=None``: every tap in metadata order, ``penultimate`` last,
    resolved at fit — :mod:`detectors.taps`), not every layer.
    """

    name = "nic"
    tail_kinds = {"high": "activation-anomaly"}

    def __init__(self, taps: Sequence[str] | None = None, grid: int = 2,
                 max_dim: int = 64, nu: float = 0.1, gamma: float | str = "scale", final_nu: float = 0.1,
                 probe_c: float = 1.0, max_samples: int = 4000, seed: int = 0, chunk_size: int = 4096) -> None:
        super().__init__(chunk_size)
        self.taps = parse_taps(taps)
        if grid < 1 or max_dim < 1:
            raise ValueError("grid and max_dim must be >= 1")
        if not (0 < nu <= 1 and 0 < final_nu <= 1):
            raise ValueError("nu and final_nu must be in (0, 1]")
        if max_samples < 20:
            raise ValueError("max_samples must be >= 20")
        self.grid = int(grid)
        self.max_dim = int(max_dim)
        self.nu = float(nu)
        self.gamma = gamma if isinstance(gamma, str) else float(gamma)
        self.final_nu = float(final_nu)
        self.probe_c = float(probe_c)
        self.max_samples = int(max_samples)
        self.seed = int(seed)
        self.taps_: list[str] | None = None  # the resolved taps
        self.num_classes_: int | None = None
        self.layers_: list[dict[str, np.ndarray]] = []
        self.vi_: list[RbfOneClassSVM] = []
        self.pi_: list[RbfOneClassSVM] = []
        self.final_: RbfOneClassSVM | None = None
        self.final_mean_: np.ndarray | None = None
        self.final_std_: np.ndarray | None = None

    @property
    def requires(self) -> tuple[str, ...]:
        return (*self.taps_, "logits") if self.taps_ is not None else ("logits",)

    # ------------------------------------------------------------------ features

    def _pooled(self, obs: Observations, tap: str, rows: slice | np.ndarray) -> np.ndarray:
        return adaptive_avg_pool(self._get(obs, tap)[rows], self.grid).astype(np.float64)

    def _project(self, x: np.ndarray, layer: Mapping[str, np.ndarray]) -> np.ndarray:
        if x.shape[1] != len(layer["mean"]):
            raise ValueError(f"a tapped layer has {x.shape[1]} pooled features, fitted on {len(layer['mean'])}")
        z = (x - layer["mean"]) / layer["scale"]
        if layer["components"].size:
            z = (z - layer["pca_mean"]) @ layer["components"].T
        return z

    def _probe_proba(self, z: np.ndarray, layer: Mapping[str, np.ndarray]) -> np.ndarray:
        """Probe probabilities over all ``num_classes_`` (classes absent from the fit data get probability 0)."""
        assert self.num_classes_ is not None
        p = softmax(z @ layer["probe_coef"].T + layer["probe_intercept"])
        full = np.zeros((len(z), self.num_classes_))
        full[:, layer["probe_classes"]] = p
        return full

    def _decisions(self, obs: Observations, rows: slice | np.ndarray) -> np.ndarray:
        """Per-layer VI and per-pair PI decision values ``(n, 2L - 1)`` for the selected rows."""
        zs = [self._project(self._pooled(obs, t, rows), layer) for t, layer in zip(self.taps_ or [], self.layers_)]
        probs = [self._probe_proba(z, layer) for z, layer in zip(zs, self.layers_)]
        cols = [svm.decision(z) for svm, z in zip(self.vi_, zs)]
        cols += [svm.decision(np.hstack([probs[i], probs[i + 1]])) for i, svm in enumerate(self.pi_)]
        return np.stack(cols, axis=1)

    # ------------------------------------------------------------------ fit / score

    def fit(self, reference: Observations, labels: np.ndarray | None = None, model: ModelFn | None = None) -> NIC:
        from sklearn.decomposition import PCA
        from sklearn.linear_model import LogisticRegression

        t0 = time.perf_counter()
        self.taps_ = resolve_taps(self.taps, reference, model, "NIC")
        reference = with_taps(reference, self.taps_, model, "NIC")
        logits = self._get(reference, "logits", 2)
        self.num_classes_ = int(logits.shape[1])
        n = len(logits)
        if n < 20:
            raise ValueError(f"NIC needs at least 20 reference inputs, got {n}")
        idx = subsample(n, self.max_samples, self.seed)
        idx = idx[np.random.default_rng(self.seed + 1).permutation(len(idx))]
        a_idx, b_idx = np.sort(idx[: len(idx) // 2]), np.sort(idx[len(idx) // 2 :])
        pred = logits.argmax(axis=1)
        if len(np.unique(pred[a_idx])) < 2:
            raise ValueError("NIC's probes need reference inputs the model assigns to at least two classes")

        self.layers_, self.vi_, zs = [], [], []
        for tap in self.taps_:
            x = self._pooled(reference, tap, a_idx)
            mean, scale = x.mean(axis=0), x.std(axis=0)
            scale = np.where(scale > 1e-8, scale, 1.0)
            z = (x - mean) / scale
            layer = {"mean": mean, "scale": scale, "pca_mean": np.zeros(0), "components": np.zeros((0, 0))}
            if z.shape[1] > self.max_dim:
                pca = PCA(n_components=min(self.max_dim, len(z)), svd_solver="full", random_state=self.seed).fit(z)
                layer["pca_mean"], layer["components"] = pca.mean_, pca.components_
                z = (z - pca.mean_) @ pca.components_.T
            probe = LogisticRegression(C=self.probe_c, max_iter=2000).fit(z, pred[a_idx])
            layer["probe_coef"] = probe.coef_ if len(probe.classes_) > 2 else np.vstack([-probe.coef_, probe.coef_])
            layer["probe_intercept"] = (probe.intercept_ if len(probe.classes_) > 2
                                        else np.concatenate([-probe.intercept_, probe.intercept_]))
            if len(probe.classes_) == 2:  # binary logistic regression: softmax over (-w, w) / 2 is the same model
                layer["probe_coef"], layer["probe_intercept"] = layer["probe_coef"] / 2, layer["probe_intercept"] / 2
            layer["probe_classes"] = probe.classes_.astype(np.int64)
            self.layers_.append(layer)
            self.vi_.append(RbfOneClassSVM.fit(z, self.nu, self.gamma))
            zs.append(z)
        probs = [self._probe_proba(z, layer) for z, layer in zip(zs, self.layers_)]
        self.pi_ = [RbfOneClassSVM.fit(np.hstack([probs[i], probs[i + 1]]), self.nu, self.gamma)
                    for i in range(len(self.taps_) - 1)]

        d = self._decisions(reference, b_idx)
        self.final_mean_ = d.mean(axis=0)
        self.final_std_ = np.maximum(d.std(axis=0), 1e-12)
        self.final_ = RbfOneClassSVM.fit((d - self.final_mean_) / self.final_std_, self.final_nu, "scale")
        log.info("NIC fitted on %d + %d inputs, %d layers, in %.1fs", len(a_idx), len(b_idx), len(self.taps_),
                 time.perf_counter() - t0)
        return self

    def _check(self) -> None:
        if self.final_ is None or not self.layers_:
            raise NotFittedError("NIC is not fitted: call fit() first")

    def layer_decisions(self, batch: Observations) -> np.ndarray:
        """The per-layer VI and per-pair PI decision values ``(N, 2L - 1)`` (positive = like clean data)."""
        self._check()
        assert self.taps_ is not None
        n = len(self._get(batch, self.taps_[0]))
        return np.concatenate([self._decisions(batch, s) for s in self._chunks(n)]) if n else np.zeros((0, 0))

    def score(self, batch: Observations, model: ModelFn | None = None) -> np.ndarray:
        self._check()
        assert self.final_ is not None and self.taps_ is not None
        batch = with_taps(batch, self.taps_, model, "NIC")
        n = len(self._get(batch, self.taps_[0]))
        out = np.empty(n)
        for s in self._chunks(n):
            d = (self._decisions(batch, s) - self.final_mean_) / self.final_std_
            out[s] = -self.final_.decision(d)
        return out

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, np.ndarray]:
        self._check()
        assert self.final_ is not None and self.final_mean_ is not None and self.final_std_ is not None
        state: dict[str, np.ndarray] = {"num_classes": np.array(self.num_classes_, np.int64),
                                        "final_mean": self.final_mean_, "final_std": self.final_std_,
                                        "taps": taps_state(self.taps_ or [])}
        for i, layer in enumerate(self.layers_):
            state.update({f"layer{i}__{k}": v for k, v in layer.items()})
            state.update(self.vi_[i].to_state(f"vi{i}__"))
        for i, svm in enumerate(self.pi_):
            state.update(svm.to_state(f"pi{i}__"))
        state.update(self.final_.to_state("final__"))
        return state

    def _load_state(self, state: Mapping[str, np.ndarray]) -> None:
        self.num_classes_ = int(state["num_classes"])
        # bundles written before taps were resolved at fit name them only in the parameters
        self.taps_ = [str(t) for t in state["taps"]] if "taps" in state else self.taps
        if not self.taps_:
            raise ValueError("NIC state names no taps")
        keys = ("mean", "scale", "pca_mean", "components", "probe_coef", "probe_intercept", "probe_classes")
        L = len(self.taps_)
        self.layers_ = [{k: np.asarray(state[f"layer{i}__{k}"]) for k in keys} for i in range(L)]
        self.vi_ = [RbfOneClassSVM.from_state(state, f"vi{i}__") for i in range(L)]
        self.pi_ = [RbfOneClassSVM.from_state(state, f"pi{i}__") for i in range(L - 1)]
        self.final_ = RbfOneClassSVM.from_state(state, "final__")
        self.final_mean_ = np.asarray(state["final_mean"], np.float64)
        self.final_std_ = np.asarray(state["final_std"], np.float64)


def gram_features(act: np.ndarray, powers: int) -> np.ndarray:
    """Sastry & Oore's higher-order Gram features of one layer: ``(N, C, ...) -> (N, powers * C)``.

    For ``p = 1..powers``: ``G_p = rowsum(F^p (F^p)^T)`` with ``F`` the ``C x HW`` map (elementwise power), then the
    signed ``p``-th root. ``rowsum(F^p (F^p)^T)_c = sum_s F^p_cs * sum_c' F^p_c's``, so no ``C x C`` matrix is formed.
    For ``powers > 1`` each input's map is divided by its largest magnitude first and the result multiplied back by
    its square (the ``p``-th root of a homogeneous degree-``2p`` form), so large activations cannot overflow.
    """
    a = np.asarray(act)
    if a.dtype.itemsize < 4:  # float16 outputs of an adopted model: sums of products would overflow at 65504
        a = a.astype(np.float32)
    # the spatial size spelled out: -1 cannot be inferred for an empty batch
    a = a.reshape(len(a), a.shape[1], int(np.prod(a.shape[2:]))) if a.ndim > 2 else a[:, :, None]
    if powers == 1:  # two products per input in the activations' own precision (float32 for an ONNX model)
        s = np.matmul(np.ones((1, a.shape[1]), a.dtype), a)  # channel sums (N, 1, HW): BLAS beats a ufunc reduce
        return np.matmul(a, s.transpose(0, 2, 1))[:, :, 0].astype(np.float64)
    out = np.empty((len(a), powers, a.shape[1]))
    # a few inputs at a time, so the float64 copies stay in cache through the p passes (the same numbers: inputs are
    # independent); docs/detectors.md#gram has the cost
    step = max(1, _GRAM_BLOCK_BYTES // max(1, 8 * a.shape[1] * a.shape[2]))
    for i in range(0, len(a), step):
        out[i : i + step] = _gram_powers(a[i : i + step], powers)
    return out.reshape(len(a), powers * a.shape[1])


#: bytes of float64 activations :func:`gram_features` raises to its powers at once (about an L2 cache)
_GRAM_BLOCK_BYTES = 1 << 20


def _gram_powers(a: np.ndarray, powers: int) -> np.ndarray:
    """:func:`gram_features`' rescaled higher orders of ``(n, C, HW)`` activations: ``(n, powers, C)``."""
    a = a.astype(np.float64)
    m = np.abs(a).max(axis=(1, 2)) if a.size else np.zeros(len(a))
    m = np.where(np.isfinite(m) & (m > 0), m, 1.0)
    b = a / m[:, None, None]
    bp = b.copy()
    ones = np.ones((1, a.shape[1]))
    out = np.empty((len(a), powers, a.shape[1]))
    for p in range(1, powers + 1):
        if p > 1:
            bp *= b
        s = np.matmul(ones, bp)  # channel sums (n, 1, HW): BLAS beats a ufunc reduce, as for the first order
        g = np.matmul(bp, s.transpose(0, 2, 1))[:, :, 0]
        out[:, p - 1] = np.sign(g) * np.abs(g) ** (1.0 / p) * (m * m)[:, None]
    return out


@register
class GramDeviation(Detector):
    """Gram-matrix deviations (Sastry & Oore, *Detecting Out-of-Distribution Examples with Gram Matrices*, ICML 2020).

    Per tapped layer and power ``p = 1..powers``: the row sums of the ``p``-th order Gram matrix of the layer's
    channels (:func:`gram_features`) — which channels fire together, and how strongly. Fit records, for each class
    the model *predicts* on the clean reference, the minimum and maximum of every such value. An input's deviation at
    a layer is ``sum (min - g)+ / |min + 1e-6| + (g - max)+ / |max + 1e-6|`` over the values, against the bounds of its
    own predicted class, divided by its max-softmax probability; the score is the sum over layers of the deviation
    divided by its mean on held-out clean inputs — the paper's total deviation, higher = more anomalous.

    The paper's bounds come from the training set and its normaliser from held-out test inputs; here the fit
    reference is split (seeded): ``holdout`` of it normalises, the rest bounds. ``taps=None`` reads every
    convolutional (spatial) tap of the model, else every tap (resolved at fit, :mod:`.taps`). Deviations: the
    default uses ``powers=1`` (the paper's ``powers=10`` computes ten Gram orders at 20-40 times the cost: on the small
    CNNs no better, at most 0.002 AUROC above it anywhere and below it on PGD, CW and three triggers —
    ``bench/results/detect_converged.md`` and ``_more.md``; on a WRN-16-1 better on far-OOD digits, 0.996 against
    0.978, but the default set with it runs at 0.32x bare — ``detect_converged_wrn_gram_powers.md``,
    ``serve_gram_powers.md``); a
    predicted class with fewer than ``min_class`` bounding inputs uses the bounds pooled over all classes.
    """

    name = "gram"
    tail_kinds = {"high": "activation-anomaly"}

    def __init__(self, taps: Sequence[str] | None = None, powers: int = 1, holdout: float = 0.2, min_class: int = 3,
                 seed: int = 0, chunk_size: int = 512) -> None:
        super().__init__(chunk_size)
        self.taps = parse_taps(taps, "the conv taps")
        if powers < 1:
            raise ValueError("powers must be >= 1 (the paper uses 10)")
        if not 0 < holdout < 1:
            raise ValueError("holdout must be in (0, 1)")
        if min_class < 1:
            raise ValueError("min_class must be >= 1")
        self.powers = int(powers)
        self.holdout = float(holdout)
        self.min_class = int(min_class)
        self.seed = int(seed)
        self.taps_: list[str] | None = None  # the resolved taps
        self.sizes_: np.ndarray | None = None  # Gram values per tap (powers * channels)
        self.lo_: np.ndarray | None = None  # (classes, D) lower bounds
        self.hi_: np.ndarray | None = None  # (classes, D) upper bounds
        self.pooled_: np.ndarray | None = None  # (classes,) True where the pooled bounds stand in
        self.norm_: np.ndarray | None = None  # (taps,) mean held-out deviation
        self._inv_lo = self._inv_hi = np.zeros(0)
        self._starts = np.zeros(0, np.intp)

    def _prepare(self) -> None:
        """The paper's ``1 / |bound + 1e-6|`` and the taps' column offsets, derived once from the state."""
        assert self.lo_ is not None and self.hi_ is not None and self.sizes_ is not None
        self._inv_lo, self._inv_hi = 1.0 / np.abs(self.lo_ + 1e-6), 1.0 / np.abs(self.hi_ + 1e-6)
        self._starts = np.r_[0, np.cumsum(self.sizes_)[:-1]].astype(np.intp)

    @property
    def requires(self) -> tuple[str, ...]:
        return (*self.taps_, "logits") if self.taps_ is not None else ("logits",)

    def _features(self, obs: Observations, rows: slice | np.ndarray) -> np.ndarray:
        assert self.taps_ is not None
        return np.hstack([gram_features(self._get(obs, t)[rows], self.powers) for t in self.taps_])

    def _deviations(self, g: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """Per-tap deviations ``(n, taps)`` of Gram values ``g`` from the bounds of each input's predicted class,
        divided by its max-softmax probability."""
        assert self.lo_ is not None and self.hi_ is not None and self.sizes_ is not None
        pred = logits.argmax(axis=1)
        lo, hi = self.lo_[pred], self.hi_[pred]
        below = np.maximum(lo - g, 0.0)
        below *= self._inv_lo[pred]
        above = np.maximum(g - hi, 0.0)
        above *= self._inv_hi[pred]
        below += above
        per_tap = np.add.reduceat(below, self._starts, axis=1)
        return per_tap / softmax(logits).max(axis=1)[:, None]

    def fit(self, reference: Observations, labels: np.ndarray | None = None,
            model: ModelFn | None = None) -> GramDeviation:
        taps = resolve_taps(self.taps, reference, model, "GramDeviation")
        reference = with_taps(reference, taps, model, "GramDeviation")
        if self.taps is None:  # the paper's layers are convolutional feature maps
            taps = [t for t in taps if self._get(reference, t).ndim >= 3] or taps
        self.taps_ = taps
        logits = self._get(reference, "logits", 2)
        n, k = logits.shape
        n_hold = int(round(self.holdout * n))
        if n_hold < 1 or n - n_hold < 1:
            raise ValueError(f"GramDeviation needs reference inputs both to bound and to hold out; {n} inputs with "
                             f"holdout={self.holdout} leave {n - n_hold} and {n_hold}")
        perm = np.random.default_rng(self.seed).permutation(n)
        bound, held = np.sort(perm[n_hold:]), np.sort(perm[:n_hold])
        g = self._features(reference, bound)
        self.sizes_ = np.array([self.powers * self._get(reference, t).shape[1] for t in taps], np.int64)
        pred = logits[bound].argmax(axis=1)
        counts = np.bincount(pred, minlength=k)
        self.lo_ = np.repeat(g.min(axis=0)[None], k, axis=0)
        self.hi_ = np.repeat(g.max(axis=0)[None], k, axis=0)
        for c in np.flatnonzero(counts >= self.min_class):
            self.lo_[c], self.hi_[c] = g[pred == c].min(axis=0), g[pred == c].max(axis=0)
        self.pooled_ = counts < self.min_class
        self._prepare()
        self.norm_ = self._deviations(self._features(reference, held), logits[held]).mean(axis=0) + 1e-7
        return self

    def layer_scores(self, batch: Observations, model: ModelFn | None = None) -> np.ndarray:
        """Normalised per-tap deviations ``(N, taps)``; :meth:`score` is their sum."""
        self._check_fitted("lo_", "hi_", "norm_", "taps_")
        assert self.taps_ is not None and self.lo_ is not None and self.norm_ is not None
        batch = with_taps(batch, self.taps_, model, "GramDeviation")
        logits = self._get(batch, "logits", 2)
        if logits.shape[1] != len(self.lo_):
            raise ValueError(f"GramDeviation: {logits.shape[1]} classes, fitted on {len(self.lo_)}")
        out = np.empty((len(logits), len(self.taps_)))
        for s in self._chunks(len(logits)):
            g = self._features(batch, s)
            if g.shape[1] != self.lo_.shape[1]:
                raise ValueError(f"GramDeviation: the taps give {g.shape[1]} Gram values, fitted on "
                                 f"{self.lo_.shape[1]}")
            out[s] = self._deviations(g, logits[s]) / self.norm_
        return out

    def score(self, batch: Observations, model: ModelFn | None = None) -> np.ndarray:
        return np.nan_to_num(self.layer_scores(batch, model).sum(axis=1), nan=np.inf)

    def state_dict(self) -> dict[str, np.ndarray]:
        self._check_fitted("lo_", "hi_", "norm_", "taps_", "sizes_", "pooled_")
        assert self.lo_ is not None and self.hi_ is not None and self.norm_ is not None
        assert self.sizes_ is not None and self.pooled_ is not None
        return {"lo": self.lo_, "hi": self.hi_, "norm": self.norm_, "sizes": self.sizes_, "pooled": self.pooled_,
                "taps": taps_state(self.taps_ or [])}

    def _load_state(self, state: Mapping[str, np.ndarray]) -> None:
        lo, hi = np.asarray(state["lo"], np.float64), np.asarray(state["hi"], np.float64)
        sizes, norm = np.asarray(state["sizes"], np.int64), np.asarray(state["norm"], np.float64)
        taps = [str(t) for t in state["taps"]]
        if (lo.shape != hi.shape or lo.ndim != 2 or len(sizes) != len(taps) or len(norm) != len(taps)
                or int(sizes.sum()) != lo.shape[1] or not taps):
            raise ValueError(f"gram state is inconsistent: bounds {lo.shape} / {hi.shape}, {len(taps)} taps, "
                             f"sizes {sizes.tolist()}, norm {norm.shape}")
        self.lo_, self.hi_, self.sizes_, self.norm_, self.taps_ = lo, hi, sizes, norm, taps
        self.pooled_ = np.asarray(state["pooled"], bool)
        self._prepare()
