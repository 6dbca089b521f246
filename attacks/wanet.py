"""WaNet (Nguyen & Tran, ICLR 2021, "WaNet — Imperceptible warping-based backdoor attack").

The trigger is a fixed, smooth warping field applied with ``grid_sample``, following the official code
(VinAIResearch/Warping-based_Backdoor_Attack-release, ``train.py``):

* a random ``k x k`` field of 2-D offsets in [-1, 1] (``k = 4``), normalised by its mean absolute value and upsampled
  bicubically (``align_corners=True``) to the image size;
* warped sampling grid ``clamp((identity + s * noise / size) * grid_rescale, -1, 1)`` with ``s = 0.5``,
  ``grid_rescale = 1``; images are resampled bilinearly (``align_corners=True``);
* **noise mode**: ``cross_ratio * (number of backdoor samples)`` further training images (``cross_ratio = 2``) are
  warped with the same field plus independent per-pixel noise ``U(-1, 1) / size`` and keep their true labels, so the
  network learns that only the exact warp means "target".

Deviations from the official code, all forced by a static poisoned dataset instead of on-the-fly batches:
the backdoor and noise-mode images are chosen once (``rate`` and ``rate * cross_ratio`` of the set) rather than
afresh in every mini-batch, and each image is quantised back to uint8 after warping. Backdoor images come from
non-target classes for all-to-one (the official code also warps target-class images in a batch; the ASR set excludes
them either way); all-to-all uses ``label + 1 mod K`` (the official code's ``remainder(label, K)`` omits the ``+ 1``).
For non-square images the offsets are scaled per axis (x by the width, y by the height); the official code divides
both by the height. The official training also applies random crop/rotation augmentation, which is a training
choice (``abl-guard train --augment``) and not part of the trigger.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ._common import nhwc_to_tensor, tensor_to_nhwc
from .base import BackdoorAttack, PoisonedData, check_images, register


@dataclass
class WaNetPoisonedData(PoisonedData):
    """:class:`PoisonedData` plus the noise-mode ("cross") images: warped with noise, labels unchanged."""

    cross_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


@register
class WaNet(BackdoorAttack):
    """Warping trigger with noise-mode cross samples."""

    name = "wanet"

    def __init__(
        self,
        target: int = 0,
        rate: float = 0.1,
        seed: int = 0,
        mode: str = "all2one",
        k: int = 4,
        s: float = 0.5,
        grid_rescale: float = 1.0,
        cross_ratio: float = 2.0,
        batch_size: int = 1024,
    ) -> None:
        super().__init__(target, rate, seed, mode)
        if k < 2:
            raise ValueError("k (the control grid size) must be >= 2")
        if cross_ratio < 0:
            raise ValueError("cross_ratio must be >= 0")
        self.k = int(k)
        self.s = float(s)
        self.grid_rescale = float(grid_rescale)
        self.cross_ratio = float(cross_ratio)
        self.batch_size = int(batch_size)
        gen = torch.Generator().manual_seed(self.seed)
        ins = torch.rand(1, 2, self.k, self.k, generator=gen, dtype=torch.float64) * 2 - 1
        #: the k x k control field (channel 0: x offsets, channel 1: y offsets), fixed by the seed
        self.control = ins / ins.abs().mean()

    def grid(self, height: int, width: int) -> torch.Tensor:
        """The backdoor sampling grid ``(1, H, W, 2)`` (x, y in [-1, 1]) for this image size."""
        noise = F.interpolate(self.control, size=(height, width), mode="bicubic", align_corners=True)
        noise = noise.permute(0, 2, 3, 1)  # (1, H, W, 2)
        ys = torch.linspace(-1, 1, height, dtype=torch.float64)
        xs = torch.linspace(-1, 1, width, dtype=torch.float64)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        identity = torch.stack((gx, gy), dim=2)[None]
        scale = torch.tensor([width, height], dtype=torch.float64)
        return torch.clamp((identity + self.s * noise / scale) * self.grid_rescale, -1, 1)

    def _warp(self, images: np.ndarray, noise_gen: torch.Generator | None = None) -> np.ndarray:
        check_images(images)
        n, h, w, _ = images.shape
        grid = self.grid(h, w)
        scale = torch.tensor([w, h], dtype=torch.float64)
        out = np.empty_like(images)
        for start in range(0, n, self.batch_size):
            x = nhwc_to_tensor(images[start : start + self.batch_size]).double()
            g = grid.expand(len(x), -1, -1, -1)
            if noise_gen is not None:
                ins = torch.rand(len(x), h, w, 2, generator=noise_gen, dtype=torch.float64) * 2 - 1
                g = torch.clamp(g + ins / scale, -1, 1)
            out[start : start + len(x)] = tensor_to_nhwc(F.grid_sample(x, g, mode="bilinear", align_corners=True))
        return out

    def apply_trigger(self, images: np.ndarray) -> np.ndarray:
        return self._warp(images)

    def noise_mode(self, images: np.ndarray, seed: int | None = None) -> np.ndarray:
        """Noise-mode images: the warp plus random per-pixel grid noise (deterministic given ``seed``)."""
        gen = torch.Generator().manual_seed(self.seed + 1 if seed is None else int(seed))
        return self._warp(images, gen)

    def select_cross_indices(self, labels: np.ndarray, poison_indices: np.ndarray) -> np.ndarray:
        """``round(cross_ratio * len(poison_indices))`` of the remaining images (any class), sorted."""
        rest = np.setdiff1d(np.arange(len(labels)), poison_indices)
        n = min(int(round(self.cross_ratio * len(poison_indices))), len(rest))
        rng = np.random.default_rng([self.seed, 1])
        return np.sort(rng.choice(rest, size=n, replace=False)).astype(np.int64) if n else np.zeros(0, np.int64)

    def poison(self, images: np.ndarray, labels: np.ndarray, num_classes: int) -> WaNetPoisonedData:
        base = super().poison(images, labels, num_classes)
        cross = self.select_cross_indices(np.asarray(labels), base.poison_indices)
        out = base.images
        if len(cross):
            out[cross] = self.noise_mode(images[cross])
        return WaNetPoisonedData(out, base.labels, base.poison_indices, cross)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "k": self.k, "s": self.s, "grid_rescale": self.grid_rescale,
                "cross_ratio": self.cross_ratio}
