"""Feature-space lens: where the penultimate features fall relative to the clean class clusters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.linalg import cho_solve, solve_triangular

from ._util import adaptive_avg_pool, subsample
from .base import Detector, ModelFn, Observations, flatten_features, register
from .taps import PENULTIMATE, parse_taps, resolve_tap, resolve_taps, taps_state, with_taps


def class_means(feats: np.ndarray, labels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-class means ``(max label + 1, D)`` of ``feats`` (NaN rows for labels absent from the reference) and the
    within-class residuals ``(N, D)``: what a tied-covariance Gaussian classifier is fitted from."""
    labels = np.asarray(labels)
    if labels.shape != (len(feats),):
        raise ValueError(f"labels shape {labels.shape} does not match {len(feats)} reference inputs")
    classes = np.unique(labels)
    means = np.full((int(classes.max()) + 1, feats.shape[1]), np.nan)
    centered = np.empty_like(feats)
    for c in classes:
        m = labels == c
        means[c] = feats[m].mean(axis=0)
        centered[m] = feats[m] - means[c]
    return means, centered


@register
class Mahalanobis(Detector):
    """Class-conditional Gaussians with a shared (tied) covariance (Lee et al., NeurIPS 2018).

    Fit: class means ``mu_c`` of the features of clean reference inputs (true labels) and the pooled within-class
    covariance ``Sigma``. Score: ``min_c (f - mu_c)^T Sigma^-1 (f - mu_c)`` — Lee et al.'s confidence score negated,
    so higher = more suspicious.

    Scoring whitens with the Cholesky factor (``Sigma = L L^T``; ``d^2 = ||L^-1 f - L^-1 mu_c||^2``) instead of
    forming ``Sigma^-1`` or an einsum over classes; ``L^-1`` (as well conditioned as ``L``) is formed once, so a batch
    costs one matrix product. Deviations from the paper: no input pre-processing (the
    FGSM-style step needs gradients, which a serving runtime does not have) and no per-layer logistic regression
    (the guard combines detectors by p-values). ``ridge`` adds ``ridge * mean(diag(Sigma))`` to the diagonal so
    rank-deficient features (e.g. ReLU units that are always 0) stay invertible; set 0 for the exact estimator.
    ``tap=None`` reads ``penultimate``, or the model's last tap when it has none (resolved at fit, :mod:`.taps`).
    """

    name = "mahalanobis"
    tail_kinds = {"high": "off-manifold"}

    def __init__(self, tap: str | None = None, ridge: float = 1e-6, chunk_size: int = 4096) -> None:
        super().__init__(chunk_size)
        if ridge < 0:
            raise ValueError("ridge must be >= 0")
        self.tap = tap
        self.ridge = float(ridge)
        self.tap_: str | None = None  # the resolved tap
        self.means_: np.ndarray | None = None
        self.chol_: np.ndarray | None = None
        self.whitened_means_: np.ndarray | None = None
        self.whiten_: np.ndarray | None = None  # L^-1

    @property
    def requires(self) -> tuple[str, ...]:
        return (self.tap_,) if self.tap_ is not None else ("logits",)

    def fit(self, reference: Observations, labels: np.ndarray | None = None,
            model: ModelFn | None = None) -> Mahalanobis:
        if labels is None:
            raise ValueError("Mahalanobis.fit needs the reference labels (class-conditional means)")
        self.tap_ = resolve_tap(self.tap, reference, model, "Mahalanobis")
        reference = with_taps(reference, [self.tap_], model, "Mahalanobis")
        feats = flatten_features(self._get(reference, self.tap_)).astype(np.float64)
        if len(feats) <= feats.shape[1] and self.ridge == 0:
            raise ValueError("fewer reference inputs than feature dimensions: the covariance is singular; "
                             "use ridge > 0 or more data")
        # classes absent from the reference get an infinitely distant (NaN) mean, so they never win the min
        self.means_, centered = class_means(feats, labels)
        cov = centered.T @ centered / len(feats)
        cov[np.diag_indices_from(cov)] += self.ridge * max(float(np.mean(np.diag(cov))), 1e-12)
        self.chol_ = np.linalg.cholesky(cov)
        self._whiten_means()
        return self

    def _whiten_means(self) -> None:
        assert self.means_ is not None and self.chol_ is not None
        present = ~np.isnan(self.means_[:, 0])
        self.whiten_ = solve_triangular(self.chol_, np.eye(len(self.chol_)), lower=True)
        self.whitened_means_ = self.means_[present] @ self.whiten_.T

    def score(self, batch: Observations, model: ModelFn | None = None) -> np.ndarray:
        self._check_fitted("chol_", "whiten_", "whitened_means_", "tap_")
        assert self.tap_ is not None and self.chol_ is not None and self.whitened_means_ is not None
        assert self.whiten_ is not None
        feats = flatten_features(self._get(with_taps(batch, [self.tap_], model, "Mahalanobis"), self.tap_))
        if feats.shape[1] != self.chol_.shape[0]:
            raise ValueError(f"{self.tap_!r} has {feats.shape[1]} features, fitted on {self.chol_.shape[0]}")
        out = np.empty(len(feats))
        wm = self.whitened_means_
        wm_sq = (wm**2).sum(axis=1)
        for s in self._chunks(len(feats)):
            z = feats[s].astype(np.float64) @ self.whiten_.T
            d2 = (z**2).sum(axis=1)[:, None] - 2.0 * z @ wm.T + wm_sq[None, :]
            out[s] = np.maximum(d2.min(axis=1), 0.0)
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        self._check_fitted("chol_", "means_", "tap_")
        assert self.means_ is not None and self.chol_ is not None and self.tap_ is not None
        return {"means": self.means_, "chol": self.chol_, "tap": taps_state([self.tap_])}

    def _load_state(self, state: Mapping[str, np.ndarray]) -> None:
        # bundles written before taps were resolved at fit name the tap only in the parameters
        self.tap_ = str(state["tap"][0]) if "tap" in state else self.tap
        if self.tap_ is None:
            raise ValueError("Mahalanobis state names no tap")
        self.means_ = np.asarray(state["means"], dtype=np.float64)
        self.chol_ = np.asarray(state["chol"], dtype=np.float64)
        self._whiten_means()


@register
class LayerMahalanobis(Detector):
    """Class-conditional tied-covariance Mahalanobis (Lee et al., NeurIPS 2018) on several taps, combined.

    One :class:`Mahalanobis` per tap (conv activations globally average-pooled, as Lee et al. do). Each layer's score
    is standardised by the mean and standard deviation of its scores on the clean fit reference, and the layer scores
    are averaged. Deviation: Lee et al. weight the layers with a logistic regression trained on validation
    adversarial or OOD data; the guard never sees attack data at calibration, so the layers get equal weight.
    ``taps=None`` reads every tap of the model in metadata order, ``penultimate`` last (resolved at fit).
    """

    name = "mahalanobis-layers"
    tail_kinds = {"high": "off-manifold"}

    def __init__(self, taps: Sequence[str] | None = None, ridge: float = 1e-6,
                 chunk_size: int = 4096) -> None:
        super().__init__(chunk_size)
        self.taps = parse_taps(taps)
        self.ridge = float(ridge)
        self.taps_: list[str] | None = None  # the resolved taps
        self.layers_: list[Mahalanobis] | None = None
        self.z_mean_: np.ndarray | None = None
        self.z_std_: np.ndarray | None = None

    @property
    def requires(self) -> tuple[str, ...]:
        return tuple(self.taps_) if self.taps_ is not None else ("logits",)

    def fit(self, reference: Observations, labels: np.ndarray | None = None,
            model: ModelFn | None = None) -> LayerMahalanobis:
        self.taps_ = resolve_taps(self.taps, reference, model, "LayerMahalanobis")
        reference = with_taps(reference, self.taps_, model, "LayerMahalanobis")
        layers = [Mahalanobis(tap=t, ridge=self.ridge, chunk_size=self.chunk_size).fit(reference, labels)
                  for t in self.taps_]
        scores = np.stack([m.score(reference) for m in layers], axis=1)
        self.layers_ = layers
        self.z_mean_ = scores.mean(axis=0)
        self.z_std_ = np.maximum(scores.std(axis=0), 1e-12)
        return self

    def layer_scores(self, batch: Observations, model: ModelFn | None = None) -> np.ndarray:
        """Standardised per-layer scores ``(N, len(taps))``."""
        self._check_fitted("layers_", "z_mean_", "taps_")
        assert self.layers_ is not None and self.taps_ is not None
        batch = with_taps(batch, self.taps_, model, "LayerMahalanobis")
        return (np.stack([m.score(batch) for m in self.layers_], axis=1) - self.z_mean_) / self.z_std_

    def score(self, batch: Observations, model: ModelFn | None = None) -> np.ndarray:
        return self.layer_scores(batch, model).mean(axis=1)

    def state_dict(self) -> dict[str, np.ndarray]:
        self._check_fitted("layers_", "z_mean_")
        assert self.layers_ is not None and self.z_mean_ is not None and self.z_std_ is not None
        state = {"z_mean": self.z_mean_, "z_std": self.z_std_, "taps": taps_state(self.taps_ or [])}
        for i, m in enumerate(self.layers_):
            state.update({f"{i}__{k}": v for k, v in m.state_dict().items()})
        return state

    def _load_state(self, state: Mapping[str, np.ndarray]) -> None:
        self.taps_ = [str(t) for t in state["taps"]] if "taps" in state else self.taps
        if not self.taps_:
            raise ValueError("mahalanobis-layers state names no taps")
        self.layers_ = []
        for i, t in enumerate(self.taps_):
            m = Mahalanobis(tap=t, ridge=self.ridge, chunk_size=self.chunk_size)
            m._load_state({k.split("__", 1)[1]: v for k, v in state.items() if k.startswith(f"{i}__")})
            self.layers_.append(m)
        self.z_mean_ = np.asarray(state["z_mean"], np.float64)
        self.z_std_ = np.asarray(state["z_std"], np.float64)


@register
class KNNDistance(Detector):
    """Deep nearest neighbours (Sun, Ming, Zhu, Li — ICML 2022): the distance from the L2-normalised penultimate
    feature to its ``k``-th nearest neighbour among the normalised clean reference features.

    ``k = 50`` is the paper's CIFAR-10 setting (also OpenOOD's); the bank is the fit reference, subsampled to
    ``max_bank`` (seeded) to bound memory and scoring time — Sun et al. show the score is robust to sampling the bank.
    Brute force: for unit vectors ``||a - b||^2 = 2 - 2 a.b``, so each chunk is one matrix product and a partial sort;
    the k-th neighbour's distance is then recomputed exactly in float64, so scores do not depend on the batch shape.
    ``tap=None`` reads ``penultimate``, or the model's last tap when it has none (resolved at fit, :mod:`.taps`).
    """

    name = "knn"
    tail_kinds = {"high": "off-manifold"}

    def __init__(self, tap: str | None = None, k: int = 50, max_bank: int | None = 10000, seed: int = 0,
                 chunk_size: int = 1024) -> None:
        super().__init__(chunk_size)
        if k < 1:
            raise ValueError("k must be >= 1")
        self.tap = tap
        self.k = int(k)
        self.max_bank = None if max_bank is None else int(max_bank)
        self.seed = int(seed)
        self.tap_: str | None = None  # the resolved tap
        self.bank_: np.ndarray | None = None

    @property
    def requires(self) -> tuple[str, ...]:
        return (self.tap_,) if self.tap_ is not None else ("logits",)

    @staticmethod
    def normalise(feats: np.ndarray) -> np.ndarray:
        feats = np.asarray(feats, np.float32)
        return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)

    def fit(self, reference: Observations, labels: np.ndarray | None = None,
            model: ModelFn | None = None) -> KNNDistance:
        self.tap_ = resolve_tap(self.tap, reference, model, "KNNDistance")  # one-line error when the tap is missing
        reference = with_taps(reference, [self.tap_], model, "KNNDistance")
        feats = flatten_features(self._get(reference, self.tap_))
        if len(feats) < self.k:
            raise ValueError(f"k={self.k} needs at least {self.k} reference inputs, got {len(feats)}")
        idx = subsample(len(feats), self.max_bank, self.seed)
        if len(idx) < self.k:
            raise ValueError(f"max_bank={self.max_bank} is smaller than k={self.k}")
        self.bank_ = np.ascontiguousarray(self.normalise(feats[idx]))
        return self

    def score(self, batch: Observations, model: ModelFn | None = None) -> np.ndarray:
        self._check_fitted("bank_", "tap_")
        assert self.bank_ is not None and self.tap_ is not None
        feats = flatten_features(self._get(with_taps(batch, [self.tap_], model, "KNNDistance"), self.tap_))
        if feats.shape[1] != self.bank_.shape[1]:
            raise ValueError(f"{self.tap_!r} has {feats.shape[1]} features, fitted on {self.bank_.shape[1]}")
        out = np.empty(len(feats))
        for s in self._chunks(len(feats)):
            q = self.normalise(feats[s])
            # float32 cosine similarities (chunk, bank) find the k-th neighbour: the k-th largest similarity, by a
            # values-only partition (a third cheaper than argpartition) and one comparison for its index
            sims = q @ self.bank_.T
            kth_sim = np.partition(sims, len(self.bank_) - self.k, axis=1)[:, len(self.bank_) - self.k]
            kth = np.argmax(sims == kth_sim[:, None], axis=1)
            # its distance again in float64 as ||a - b||: the float32 2 - 2ab loses digits to cancellation for near
            # neighbours and its rounding follows the GEMM's blocking (batch shape, CPU kernel)
            diff = q.astype(np.float64) - self.bank_[kth].astype(np.float64)
            out[s] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        self._check_fitted("bank_", "tap_")
        assert self.bank_ is not None and self.tap_ is not None
        return {"bank": self.bank_, "tap": taps_state([self.tap_])}

    def _load_state(self, state: Mapping[str, np.ndarray]) -> None:
        bank = np.asarray(state["bank"], np.float32)
        if bank.ndim != 2 or len(bank) < self.k:
            raise ValueError(f"knn state bank has shape {bank.shape}; need (>= k={self.k}, D)")
        # bundles written before the tap was resolved at fit name it only in the parameters (then always set)
        self.tap_ = str(state["tap"][0]) if "tap" in state else (self.tap or PENULTIMATE)
        self.bank_ = bank


@register
class DeepKNN(Detector):
    """Deep k-nearest neighbours (Papernot & McDaniel, arXiv 1803.04765, 2018): do the nearest clean neighbours agree
    on a label at every layer?

    Fit: per tap, the activations of the clean reference (true labels) are L2-normalised and centred on their mean —
    the paper's cosine neighbourhoods — and kept as the bank (a seeded subsample of ``max_bank``). Score: the ``k``
    nearest bank points at each tap vote with their labels; the nonconformity of label ``j`` is the number of
    neighbours over all taps whose label is not ``j`` (the paper's alpha), and the score is the smallest nonconformity
    over labels, so the guard's calibration p-value is the paper's credibility (the p-value of the DkNN's own
    prediction). ``k = 75`` and the layers (every hidden layer plus the logits) are the paper's; ``taps=None`` reads
    every tap of the model and ``logits``.

    Deviations (measured in ``bench/results/detect_converged_dknn.md``): convolutional taps are globally
    average-pooled, as Lee et al.'s layer-wise Mahalanobis does, so the bank stays small enough to ship in a bundle
    (``pool=False`` flattens them as the paper does); the search is exact (float64) instead of locality-sensitive
    hashing; and the calibration scores are this minimum on clean inputs rather than the true label's nonconformity,
    so the threshold holds the false-positive rate on exactly the statistic scored at test time.
    """

    name = "dknn"
    tail_kinds = {"high": "inconsistent-layers"}

    def __init__(self, taps: Sequence[str] | None = None, k: int = 75, max_bank: int | None = 10000,
                 seed: int = 0, pool: bool = True, chunk_size: int = 256) -> None:
        super().__init__(chunk_size)
        if k < 1:
            raise ValueError("k must be >= 1")
        self.taps = parse_taps(taps)
        self.k = int(k)
        self.max_bank = None if max_bank is None else int(max_bank)
        self.seed = int(seed)
        self.pool = bool(pool)
        self.taps_: list[str] | None = None
        self.banks_: list[np.ndarray] | None = None
        self.centers_: list[np.ndarray] | None = None
        self.bank_labels_: np.ndarray | None = None

    @property
    def requires(self) -> tuple[str, ...]:
        return tuple(self.taps_) if self.taps_ is not None else ("logits",)

    def _resolve(self, reference: Observations, model: ModelFn | None) -> list[str]:
        if self.taps is None:
            return [*resolve_taps(None, reference, model, "DeepKNN"), "logits"]
        hidden = [t for t in self.taps if t != "logits"]
        resolved = iter(resolve_taps(hidden, reference, model, "DeepKNN") if hidden else [])
        return [t if t == "logits" else next(resolved) for t in self.taps]

    def _features(self, obs: Observations, tap: str) -> np.ndarray:
        feats = flatten_features(self._get(obs, tap), pool=self.pool).astype(np.float64)
        return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)

    def fit(self, reference: Observations, labels: np.ndarray | None = None,
            model: ModelFn | None = None) -> DeepKNN:
        if labels is None:
            raise ValueError("DeepKNN.fit needs the reference labels (the neighbours vote with them)")
        self.taps_ = self._resolve(reference, model)
        reference = with_taps(reference, [t for t in self.taps_ if t != "logits"], model, "DeepKNN")
        labels = np.asarray(labels)
        n = len(self._get(reference, self.taps_[0]))
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any():
            raise ValueError(f"labels must be {n} non-negative integers, got shape {labels.shape} {labels.dtype}")
        idx = subsample(n, self.max_bank, self.seed)
        if len(idx) < self.k:
            raise ValueError(f"k={self.k} needs at least {self.k} bank inputs, got {len(idx)}")
        self.banks_, self.centers_ = [], []
        for t in self.taps_:
            feats = self._features(reference, t)[idx]
            center = feats.mean(axis=0)
            # rounded to float32 as the bundle stores it, so a reloaded guard scores exactly as the fitted one
            self.banks_.append((feats - center).astype(np.float32).astype(np.float64))
            self.centers_.append(center)
        self.bank_labels_ = labels[idx].astype(np.int64)
        return self

    def neighbour_counts(self, batch: Observations, model: ModelFn | None = None) -> np.ndarray:
        """``(N, classes)``: how many of the ``k`` nearest neighbours at each tap, summed over taps, have each label."""
        self._check_fitted("banks_", "centers_", "bank_labels_", "taps_")
        assert self.banks_ is not None and self.centers_ is not None and self.bank_labels_ is not None
        assert self.taps_ is not None
        batch = with_taps(batch, [t for t in self.taps_ if t != "logits"], model, "DeepKNN")
        n_cls = int(self.bank_labels_.max()) + 1
        n = len(self._get(batch, self.taps_[0]))
        counts = np.zeros((n, n_cls), np.int64)
        for t, bank, center in zip(self.taps_, self.banks_, self.centers_):
            feats = self._features(batch, t)
            if feats.shape[1] != bank.shape[1]:
                raise ValueError(f"{t!r} has {feats.shape[1]} features, fitted on {bank.shape[1]}")
            bank_sq = np.einsum("ij,ij->i", bank, bank)
            for s in self._chunks(n):
                q = feats[s] - center
                # ||q - b||^2 up to the per-row constant ||q||^2, in float64 so near-ties resolve the same way
                # whatever the batch shape
                d = bank_sq[None, :] - 2.0 * (q @ bank.T)
                nn_idx = np.argpartition(d, self.k - 1, axis=1)[:, : self.k]
                lab = self.bank_labels_[nn_idx]
                rows = np.repeat(np.arange(s.start, s.stop), self.k)
                np.add.at(counts, (rows, lab.ravel()), 1)
        return counts

    def score(self, batch: Observations, model: ModelFn | None = None) -> np.ndarray:
        assert self.taps_ is not None or self.banks_ is None
        counts = self.neighbour_counts(batch, model)
        total = self.k * len(self.taps_ or [])
        return (total - counts.max(axis=1)).astype(np.float64)

    def state_dict(self) -> dict[str, np.ndarray]:
        self._check_fitted("banks_", "centers_", "bank_labels_", "taps_")
        assert self.banks_ is not None and self.centers_ is not None and self.bank_labels_ is not None
        state = {"labels": self.bank_labels_, "taps": taps_state(self.taps_ or [])}
        for i, (b, c) in enumerate(zip(self.banks_, self.centers_)):
            state[f"bank{i}"] = b.astype(np.float32)
            state[f"center{i}"] = c
        return state

    def _load_state(self, state: Mapping[str, np.ndarray]) -> None:
        self.taps_ = [str(t) for t in state["taps"]]
        labels = np.asarray(state["labels"], np.int64)
        banks = [np.asarray(state[f"bank{i}"], np.float64) for i in range(len(self.taps_))]
        centers = [np.asarray(state[f"center{i}"], np.float64) for i in range(len(self.taps_))]
        if not self.taps_ or any(b.ndim != 2 or len(b) != len(labels) or len(b) < self.k for b in banks) \
                or any(c.shape != (b.shape[1],) for b, c in zip(banks, centers)) or (labels < 0).any():
            raise ValueError(f"dknn state does not hold {len(self.taps_)} banks of >= k={self.k} labelled rows")
        self.banks_, self.centers_, self.bank_labels_ = banks, centers, labels


#: the largest folded probe map (entries) kept; beyond it (a 1,000-class model's stem) scoring pools first
FOLD_MAX_ENTRIES = 1 << 22


@register
class LayerProbe(Detector):
    """Does an early layer agree with the model's prediction? The posterior of the *predicted* label under a
    class-conditional Gaussian classifier with a tied covariance (Lee et al., NeurIPS 2018 — linear discriminant
    analysis) fitted on an early tap.

    A small perturbation that moves the network's decision (FGSM, PGD, CW-L2) leaves the early features close to the
    source class, so a linear probe there still says "source" while the model says "target"; a clean input's early
    features agree with the model's prediction. This is the nonconformity idea of Papernot & McDaniel's deep k-NN
    (``dknn``: do the neighbours at each layer agree with the label?) with Lee et al.'s parametric classifier in place
    of the neighbours, at one early layer, where the adversarial perturbation is still small. It is this project's
    construction, not a published detector: measured against the baselines and every other detector in
    ``bench/results/detect_converged_probe.md`` (docs/detectors.md, ``probe``).

    Fit: the tap's activations (conv maps average-pooled to a ``grid x grid`` map per channel, the grid shrunk until
    the feature count is at most ``max_features``, so any model's first tap fits; 2-D taps are used as they are), the
    class means of the clean reference (its labels: true or the model's predictions) and the pooled within-class
    covariance shrunk towards the scaled identity, ``(1 - s) Sigma + s mean(diag Sigma) I`` — without shrinkage the
    ~1,500 features of a first conv block overfit a few thousand reference inputs (``shrinkage=0`` is plain LDA;
    ``"auto"`` takes Ledoit & Wolf's intensity for the within-class residuals, the same target).
    Score: ``-log p(pred | f) = d_pred / 2 + log sum_c exp(-d_c / 2)`` with ``d_c`` the squared Mahalanobis distance
    to class ``c`` (equal priors), ``pred`` the model's argmax — computed as LDA's linear discriminants with the pooling
    folded in, one ``(C*H*W, K)`` product per input (up to :data:`FOLD_MAX_ENTRIES`; pooled first beyond it); a
    prediction of a class absent from the reference scores ``inf``. ``tap="@0"`` is the model's first tap (by
    position, :mod:`.taps`).
    """

    name = "probe"
    tail_kinds = {"high": "inconsistent-layers"}

    def __init__(self, tap: str | None = "@0", grid: int = 7, max_features: int = 2048,
                 shrinkage: float | str = 0.1, chunk_size: int = 1024) -> None:
        super().__init__(chunk_size)
        if grid < 1 or max_features < 1:
            raise ValueError("grid and max_features must be >= 1")
        if shrinkage != "auto" and (isinstance(shrinkage, str) or not 0.0 <= shrinkage <= 1.0):
            raise ValueError("shrinkage must be in [0, 1] or 'auto' (Ledoit-Wolf)")
        self.tap = tap
        self.grid = int(grid)
        self.max_features = int(max_features)
        self.shrinkage: float | str = shrinkage if shrinkage == "auto" else float(shrinkage)
        self.shrinkage_: float | None = None  # the intensity used (Ledoit-Wolf's with "auto")
        self.tap_: str | None = None
        self.grid_: int | None = None  # the grid actually used (0: a 2-D tap)
        self.shape_: tuple[int, ...] | None = None  # the tap's per-input shape
        self.last_tap_: str | None = None  # the model's feature tap at fit (not state: only the build needs it)
        self.means_: np.ndarray | None = None
        self.chol_: np.ndarray | None = None
        self.coef_: np.ndarray | None = None  # Sigma^-1 mu_c, (D, K)
        self.folded_: np.ndarray | None = None  # the same with the pooling folded in, (C*H*W, K), when small enough
        self.intercept_: np.ndarray | None = None
        self.present_: np.ndarray | None = None

    @property
    def requires(self) -> tuple[str, ...]:
        return (self.tap_, "logits") if self.tap_ is not None else ("logits",)

    def uninformative(self) -> str | None:
        """The probe compares an *early* layer with the prediction: at the model's feature tap (a model adopted with
        only ``penultimate``) the probe follows the decision it should check (PGD-L2 0.507 there against 0.903 at
        the first conv block, bench/results/detect_converged_probe.md)."""
        if self.tap_ is not None and self.tap_ == self.last_tap_:
            return f"reads {self.tap_!r}, the model's feature tap: no earlier layer to check the prediction against"
        return None

    def _features(self, act: np.ndarray) -> np.ndarray:
        assert self.grid_ is not None
        return act.astype(np.float64) if self.grid_ == 0 else adaptive_avg_pool(act, self.grid_)

    def fit(self, reference: Observations, labels: np.ndarray | None = None,
            model: ModelFn | None = None) -> LayerProbe:
        if labels is None:
            raise ValueError("LayerProbe.fit needs the reference labels (class-conditional means)")
        self.tap_ = resolve_tap(self.tap, reference, model, "LayerProbe")
        self.last_tap_ = resolve_tap(None, reference, model, "LayerProbe")
        act = self._get(with_taps(reference, [self.tap_], model, "LayerProbe"), self.tap_)
        if act.ndim == 4:
            c, h, w = act.shape[1:]
            g = min(self.grid, h, w)
            while g > 1 and c * g * g > self.max_features:
                g -= 1
            self.grid_ = g
        elif act.ndim == 2:
            self.grid_ = 0
        else:
            raise ValueError(f"LayerProbe needs (N, C, H, W) or (N, D) activations at {self.tap_!r}, got {act.shape}")
        self.shape_ = tuple(int(v) for v in act.shape[1:])
        feats = self._features(act)
        means, centered = class_means(feats, labels)
        cov = centered.T @ centered / len(feats)
        scale = max(float(np.mean(np.diag(cov))), 1e-12)
        if self.shrinkage == "auto":
            from sklearn.covariance import ledoit_wolf_shrinkage

            self.shrinkage_ = float(ledoit_wolf_shrinkage(centered, assume_centered=True))
        else:
            self.shrinkage_ = float(self.shrinkage)
        cov *= 1.0 - self.shrinkage_
        # shrinkage towards the scaled identity, plus a ridge far below it so that s = 0 stays factorable
        cov[np.diag_indices_from(cov)] += (self.shrinkage_ + 1e-9) * scale
        self.chol_ = np.linalg.cholesky(cov)
        self.means_ = means
        self._discriminants()
        return self

    def _discriminants(self) -> None:
        # -d_c / 2 = f.a_c + b_c - f' Sigma^-1 f / 2, and the last term is the same for every class: the posterior is
        # a softmax of K linear functions (a_c = Sigma^-1 mu_c, b_c = -mu_c.a_c / 2). The pooling is linear too, so it
        # is folded into the coefficients: scoring is one (C*H*W, K) product on the raw tap
        assert self.means_ is not None and self.chol_ is not None and self.grid_ is not None
        assert self.shape_ is not None
        self.present_ = ~np.isnan(self.means_[:, 0])
        mu = np.where(self.present_[:, None], np.nan_to_num(self.means_), 0.0)
        a = cho_solve((self.chol_, True), mu.T)  # (D, K)
        self.intercept_ = -0.5 * np.einsum("kd,dk->k", mu, a)
        self.coef_ = a
        self.folded_ = None
        c, h, w = self.shape_ if len(self.shape_) == 3 else (0, 0, 0)
        if self.grid_ == 0 or c * h * w * a.shape[1] > FOLD_MAX_ENTRIES:  # e.g. a 1,000-class model's stem: pool
            return
        g_h, g_w = min(self.grid_, h), min(self.grid_, w)
        cells = a.reshape(c, g_h, g_w, -1)
        full = np.zeros((c, h, w, a.shape[1]))
        for i in range(g_h):  # adaptive_avg_pool's bins: a pixel may sit in two overlapping ones
            r0, r1 = (i * h) // g_h, -((-(i + 1) * h) // g_h)
            for j in range(g_w):
                c0, c1 = (j * w) // g_w, -((-(j + 1) * w) // g_w)
                full[:, r0:r1, c0:c1, :] += cells[:, i, j, None, None, :] / ((r1 - r0) * (c1 - c0))
        self.folded_ = full.reshape(c * h * w, -1)

    def class_log_posterior(self, batch: Observations, model: ModelFn | None = None) -> np.ndarray:
        """``log p(c | f)`` of every class ``(N, K)`` under the probe (``-inf`` for classes absent at fit)."""
        self._check_fitted("coef_", "intercept_", "tap_", "present_", "shape_")
        assert self.coef_ is not None and self.intercept_ is not None and self.present_ is not None
        assert self.tap_ is not None and self.shape_ is not None
        act = self._get(with_taps(batch, [self.tap_], model, "LayerProbe"), self.tap_)
        if tuple(act.shape[1:]) != tuple(self.shape_):
            raise ValueError(f"{self.tap_!r} has shape {tuple(act.shape[1:])} per input, fitted on "
                             f"{tuple(self.shape_)}")
        out = np.empty((len(act), self.coef_.shape[1]))
        for s in self._chunks(len(act)):
            lin = (act[s].reshape(len(act[s]), -1).astype(np.float64) @ self.folded_ if self.folded_ is not None
                   else self._features(act[s]) @ self.coef_)
            e = np.where(self.present_[None, :], lin + self.intercept_, -np.inf)
            top = e.max(axis=1, keepdims=True)
            out[s] = e - (top + np.log(np.exp(e - top).sum(axis=1, keepdims=True)))
        return out

    def score(self, batch: Observations, model: ModelFn | None = None) -> np.ndarray:
        logp = self.class_log_posterior(batch, model)
        logits = self._get(batch, "logits", ndim=2)
        if len(logits) != len(logp):
            raise ValueError(f"{len(logits)} logits for {len(logp)} activations")
        pred = np.asarray(logits).argmax(axis=1)
        if pred.max(initial=0) >= logp.shape[1]:  # a class the reference never had: no posterior at all
            logp = np.pad(logp, ((0, 0), (0, int(pred.max()) + 1 - logp.shape[1])), constant_values=-np.inf)
        return -logp[np.arange(len(pred)), pred]

    def state_dict(self) -> dict[str, np.ndarray]:
        self._check_fitted("chol_", "means_", "tap_", "grid_", "shape_")
        assert self.means_ is not None and self.chol_ is not None and self.tap_ is not None
        return {"means": self.means_, "chol": self.chol_, "tap": taps_state([self.tap_]),
                "grid": np.array(self.grid_, np.int64), "shape": np.array(self.shape_, np.int64)}

    def _load_state(self, state: Mapping[str, np.ndarray]) -> None:
        self.tap_ = str(state["tap"][0])
        self.grid_ = int(state["grid"])
        self.shape_ = tuple(int(v) for v in np.asarray(state["shape"]).ravel())
        self.means_ = np.asarray(state["means"], np.float64)
        self.chol_ = np.asarray(state["chol"], np.float64)
        self._discriminants()
