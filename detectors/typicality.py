"""Input lens: is the image itself typical of the clean data, before the model has seen it?

The model's features answer "does this look like a class?"; an input far from the training distribution can still
land near a class cluster (a blurred, upscaled thumbnail of another dataset looks like a bag to a Fashion-MNIST model).
This detector asks the pixels directly, with a density model that needs no training and no gradient.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy.linalg import solve_triangular

from ._util import check_images, subsample
from .base import Detector, ModelFn, Observations, register

#: patch-matrix elements per scoring chunk (float64: 64 MiB), whatever the image size
_CHUNK_ELEMENTS = 1 << 23


def image_patches(x: np.ndarray, patch: int) -> np.ndarray:
    """``(N, C, H, W)`` -> ``(N, K, C * patch * patch)``: the non-overlapping ``patch x patch`` tiles of each image,
    row-major from the top left; a remainder narrower than a tile at the bottom or right is left out."""
    n, c, h, w = x.shape
    gh, gw = h // patch, w // patch
    if gh == 0 or gw == 0:
        raise ValueError(f"images of {h}x{w} are smaller than the {patch}x{patch} patch")
    t = x[:, :, : gh * patch, : gw * patch].reshape(n, c, gh, patch, gw, patch)
    return t.transpose(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, c * patch * patch)


def constant_frame(x: np.ndarray, patch: int) -> tuple[int, int, int, int]:
    """How many rows (top, bottom) and columns (left, right) at the border of ``(N, C, H, W)`` images are the same
    value in every image and channel — a zero-padding frame; none when cutting it would leave less than a tile."""
    rows = x.max(axis=(0, 1, 3)) == x.min(axis=(0, 1, 3))
    cols = x.max(axis=(0, 1, 2)) == x.min(axis=(0, 1, 2))

    def run(flags: np.ndarray) -> int:
        return int(np.argmin(flags)) if not flags.all() else len(flags)

    top, bottom, left, right = run(rows), run(rows[::-1]), run(cols), run(cols[::-1])
    if x.shape[2] - top - bottom < patch or x.shape[3] - left - right < patch:
        return (0, 0, 0, 0)
    return (top, bottom, left, right)


@register
class PatchTypicality(Detector):
    """A typicality test (Nalisnick et al., arXiv 1906.02994) on a Gaussian density of the image's patches.

    Fit: the mean ``mu`` and covariance ``Sigma`` of every non-overlapping ``patch x patch`` tile of the clean
    reference images (one Gaussian shared by all positions; at most ``max_patches`` tiles, a seeded subset).
    Score: the mean over an image's tiles of ``(t - mu)^T Sigma^-1 (t - mu)``, i.e. the image's negative
    log-likelihood per tile up to constants. The statistic is **two-sided**, as Nalisnick et al.'s test is: inputs
    are flagged when their likelihood is atypically *high* as well as low, because density models give simple
    inputs (blank, smooth, upscaled images of another dataset) more likelihood than the data they were fitted on.
    Deviation from the paper: the density is this closed-form Gaussian instead of a trained deep generative model
    (Glow, PixelCNN), so the guard needs no second network and no torch, and the test is per input (their M = 1) with
    the guard's empirical two-sided p-value as its threshold (measured in ``bench/results/detect_converged_typicality*``
    and docs/detectors.md#typicality). ``shrinkage`` adds ``shrinkage * mean(diag(Sigma))`` to the diagonal (constant
    background pixels make ``Sigma`` singular); 0 is the exact estimator where it is invertible. ``crop_frame``: rows
    and columns at the image's border that are constant over every reference image (a model's zero padding) are cut
    off before tiling — they carry no density, and content meeting the padding with a sharp edge otherwise raises the
    border tiles' distance while a smooth interior lowers the rest, and the mean cancels the two (measured on the
    WRN-16-1's padded input in docs/detectors.md#typicality).
    """

    name = "typicality"
    two_sided = True
    tail_kinds = {"high": "corrupted or noisy", "low": "atypically simple"}

    def __init__(self, patch: int = 7, shrinkage: float = 1e-3, max_patches: int = 200_000, seed: int = 0,
                 crop_frame: bool = True, chunk_size: int = 4096) -> None:
        super().__init__(chunk_size)
        if patch < 1:
            raise ValueError("patch must be >= 1")
        if shrinkage < 0:
            raise ValueError("shrinkage must be >= 0")
        if max_patches < 2:
            raise ValueError("max_patches must be >= 2")
        self.patch = int(patch)
        self.shrinkage = float(shrinkage)
        self.max_patches = int(max_patches)
        self.seed = int(seed)
        self.crop_frame = bool(crop_frame)
        self.frame_: tuple[int, int, int, int] = (0, 0, 0, 0)  # rows cut at the top, bottom; columns left, right
        self.mean_: np.ndarray | None = None
        self.chol_: np.ndarray | None = None
        self.whiten_: np.ndarray | None = None  # L^-1
        self.input_shape_: tuple[int, ...] | None = None

    @property
    def requires(self) -> tuple[str, ...]:
        return ("input",)

    def fit(self, reference: Observations, labels: np.ndarray | None = None,
            model: ModelFn | None = None) -> PatchTypicality:
        x = check_images(self._get(reference, "input"), "PatchTypicality")
        self.frame_ = constant_frame(x, self.patch) if self.crop_frame else (0, 0, 0, 0)
        tiles = self._sampled_tiles(self.crop(x))
        if len(tiles) < 2:
            raise ValueError("PatchTypicality needs at least two reference patches")
        mean = tiles.mean(axis=0)
        centered = tiles - mean
        cov = centered.T @ centered / len(tiles)
        cov[np.diag_indices_from(cov)] += self.shrinkage * max(float(np.mean(np.diag(cov))), 1e-12)
        try:
            chol = np.linalg.cholesky(cov)
        except np.linalg.LinAlgError:
            raise ValueError("the reference patches' covariance is singular (constant images?); "
                             "use shrinkage > 0") from None
        self.mean_, self.chol_ = mean, chol
        self.input_shape_ = tuple(int(s) for s in x.shape[1:])
        self._whiten()
        return self

    def crop(self, x: np.ndarray) -> np.ndarray:
        """``(N, C, H, W)`` images without the fitted constant frame (``frame_``)."""
        top, bottom, left, right = self.frame_
        return x[:, :, top:x.shape[2] - bottom, left:x.shape[3] - right]

    def _sampled_tiles(self, x: np.ndarray) -> np.ndarray:
        """The seeded subset of at most ``max_patches`` of every reference tile, ``(n, D)`` float64, gathered a
        chunk of images at a time so that memory stays bounded by the subset, not by the reference set."""
        per_image = image_patches(x[:1], self.patch).shape[1]
        idx = subsample(len(x) * per_image, self.max_patches, self.seed)  # sorted
        step = max(1, _CHUNK_ELEMENTS // int(np.prod(x.shape[1:])))  # an image's tiles hold at most its pixels
        out = []
        for start in range(0, len(x), step):
            lo, hi = np.searchsorted(idx, [start * per_image, min(start + step, len(x)) * per_image])
            if hi > lo:
                sel = idx[lo:hi] - start * per_image
                tiles = image_patches(x[start:start + step], self.patch)
                out.append(tiles[sel // per_image, sel % per_image].astype(np.float64))
        return np.concatenate(out) if out else np.empty((0, x.shape[1] * self.patch**2))

    def _whiten(self) -> None:
        assert self.chol_ is not None
        self.whiten_ = solve_triangular(self.chol_, np.eye(len(self.chol_)), lower=True)

    def score(self, batch: Observations, model: ModelFn | None = None) -> np.ndarray:
        return self.tile_distances(batch).mean(axis=1)

    def tile_distances(self, batch: Observations) -> np.ndarray:
        """``(N, K)``: each tile's squared Mahalanobis distance under the fitted Gaussian (the score is their mean),
        a chunk of images at a time (bounded memory)."""
        self._check_fitted("mean_", "whiten_", "input_shape_")
        assert self.mean_ is not None and self.whiten_ is not None and self.input_shape_ is not None
        x = self.crop(check_images(self._get(batch, "input"), "PatchTypicality", self.input_shape_))
        c, h, w = x.shape[1:]
        n_tiles = (h // self.patch) * (w // self.patch)
        rows = max(1, min(self.chunk_size, _CHUNK_ELEMENTS // (n_tiles * c * self.patch**2)))
        out = np.empty((len(x), n_tiles))
        for start in range(0, len(x), rows):
            s = slice(start, min(start + rows, len(x)))
            z = (image_patches(x[s], self.patch).astype(np.float64) - self.mean_) @ self.whiten_.T
            out[s] = (z**2).sum(axis=2)
        return out

    def reference_tiles(self, reference: Observations) -> np.ndarray:
        """The tiles :meth:`fit` estimates from for ``reference`` (frame cut, the seeded subset), ``(n, D)``."""
        return self._sampled_tiles(self.crop(check_images(self._get(reference, "input"), "PatchTypicality")))

    def state_dict(self) -> dict[str, np.ndarray]:
        self._check_fitted("mean_", "chol_", "input_shape_")
        assert self.mean_ is not None and self.chol_ is not None and self.input_shape_ is not None
        return {"mean": self.mean_, "chol": self.chol_, "input_shape": np.asarray(self.input_shape_, dtype=np.int64),
                "frame": np.asarray(self.frame_, dtype=np.int64)}

    def _load_state(self, state: Mapping[str, np.ndarray]) -> None:
        mean = np.asarray(state["mean"], dtype=np.float64)
        chol = np.asarray(state["chol"], dtype=np.float64)
        shape = tuple(int(s) for s in np.asarray(state["input_shape"]).ravel())
        frame = tuple(int(v) for v in np.asarray(state.get("frame", np.zeros(4))).ravel())
        if len(shape) != 3 or chol.shape != (len(mean), len(mean)) or len(mean) != shape[0] * self.patch**2:
            raise ValueError("PatchTypicality state does not match its patch size")
        if len(frame) != 4 or min(frame) < 0 or shape[1] - frame[0] - frame[1] < self.patch \
                or shape[2] - frame[2] - frame[3] < self.patch:
            raise ValueError("PatchTypicality state has a malformed frame")
        self.mean_, self.chol_, self.input_shape_ = mean, chol, shape
        self.frame_ = frame  # type: ignore[assignment]
        self._whiten()
