"""Feature-space lens: where the penultimate features fall relative to the clean class clusters."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy.linalg import solve_triangular

from .base import Detector, ModelFn, Observations, flatten_features, register


@register
class Mahalanobis(Detector):
    """Class-conditional Gaussians with a shared (tied) covariance (Lee et al., NeurIPS 2018).

    Fit: class means ``mu_c`` of the features of clean reference inputs (true labels) and the pooled within-class
    covariance ``Sigma``. Score: ``min_c (f - mu_c)^T Sigma^-1 (f - mu_c)`` — Lee et al.'s confidence score negated,
    so higher = more suspicious.

    Scoring whitens with the Cholesky factor (``Sigma = L L^T``; ``d^2 = ||L^-1 f - L^-1 mu_c||^2``) instead of
    forming ``Sigma^-1`` or an einsum over classes. Deviations from the paper: no input pre-processing (the
    FGSM-style step needs gradients, which a serving runtime does not have) and no per-layer logistic regression
    (the guard combines detectors by p-values). ``ridge`` adds ``ridge * mean(diag(Sigma))`` to the diagonal so
    rank-deficient features (e.g. ReLU units that are always 0) stay invertible; set 0 for the exact estimator.
    """

    name = "mahalanobis"
    tail_kinds = {"high": "off-manifold"}

    def __init__(self, tap: str = "penultimate", ridge: float = 1e-6, chunk_size: int = 4096) -> None:
        super().__init__(chunk_size)
        if ridge < 0:
            raise ValueError("ridge must be >= 0")
        self.tap = tap
        self.ridge = float(ridge)
        self.means_: np.ndarray | None = None
        self.chol_: np.ndarray | None = None
        self.whitened_means_: np.ndarray | None = None

    @property
    def requires(self) -> tuple[str, ...]:
        return (self.tap,)

    def get_params(self) -> dict[str, Any]:
        return {"tap": self.tap, "ridge": self.ridge, "chunk_size": self.chunk_size}

    def fit(self, reference: Observations, labels: np.ndarray | None = None,
            model: ModelFn | None = None) -> Mahalanobis:
        if labels is None:
            raise ValueError("Mahalanobis.fit needs the reference labels (class-conditional means)")
        feats = flatten_features(self._get(reference, self.tap)).astype(np.float64)
        labels = np.asarray(labels)
        if labels.shape != (len(feats),):
            raise ValueError(f"labels shape {labels.shape} does not match {len(feats)} reference inputs")
        classes = np.unique(labels)
        if len(feats) <= feats.shape[1] and self.ridge == 0:
            raise ValueError("fewer reference inputs than feature dimensions: the covariance is singular; "
                             "use ridge > 0 or more data")
        means = np.zeros((int(classes.max()) + 1, feats.shape[1]))
        centered = np.empty_like(feats)
        present = np.zeros(len(means), bool)
        for c in classes:
            m = labels == c
            means[c] = feats[m].mean(axis=0)
            centered[m] = feats[m] - means[c]
            present[c] = True
        cov = centered.T @ centered / len(feats)
        cov[np.diag_indices_from(cov)] += self.ridge * max(float(np.mean(np.diag(cov))), 1e-12)
        self.chol_ = np.linalg.cholesky(cov)
        # classes absent from the reference get an infinitely distant mean, so they never win the min
        self.means_ = np.where(present[:, None], means, np.nan)
        self._whiten_means()
        return self

    def _whiten_means(self) -> None:
        assert self.means_ is not None and self.chol_ is not None
        present = ~np.isnan(self.means_[:, 0])
        self.whitened_means_ = solve_triangular(self.chol_, self.means_[present].T, lower=True).T

    def score(self, batch: Observations, model: ModelFn | None = None) -> np.ndarray:
        self._check_fitted("chol_", "whitened_means_")
        feats = flatten_features(self._get(batch, self.tap))
        if feats.shape[1] != self.chol_.shape[0]:
            raise ValueError(f"{self.tap!r} has {feats.shape[1]} features, fitted on {self.chol_.shape[0]}")
        out = np.empty(len(feats))
        wm = self.whitened_means_
        wm_sq = (wm**2).sum(axis=1)
        for s in self._chunks(len(feats)):
            z = solve_triangular(self.chol_, feats[s].astype(np.float64).T, lower=True).T
            d2 = (z**2).sum(axis=1)[:, None] - 2.0 * z @ wm.T + wm_sq[None, :]
            out[s] = np.maximum(d2.min(axis=1), 0.0)
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        self._check_fitted("chol_", "means_")
        return {"means": self.means_, "chol": self.chol_}

    def _load_state(self, state: Mapping[str, np.ndarray]) -> None:
        self.means_ = np.asarray(state["means"], dtype=np.float64)
        self.chol_ = np.asarray(state["chol"], dtype=np.float64)
        self._whiten_means()
