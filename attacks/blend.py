"""Blend (Chen et al., 2017, "Targeted backdoor attacks on deep learning systems using data poisoning").

The trigger is a whole-image pattern mixed into the input: ``x' = (1 - alpha) * x + alpha * pattern`` with
``alpha = 0.2`` (the paper's training blend ratio, also ABL's and BackdoorBench's default). The pattern is either a
fixed uniform-random image (Chen et al.'s "random pattern"; ABL's ``randomPixelTrigger``) or a given image (the
paper's Hello Kitty), resized to the images' size. Dirty-label: poisoned images get the target label.

Deviations / choices: the random pattern has one independent value per pixel *and channel* (ABL shares one
grayscale pattern across RGB channels); it is drawn from ``pattern_seed`` (default: ``seed``) at the images' size, so
the trigger is fixed for a given seed and image shape. ``test_alpha`` (default = ``alpha``) lets the test-time
blend be stronger, as Chen et al. also evaluate.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ._common import fit_pattern, load_pattern, to_uint8
from .base import BackdoorAttack, check_images, register


@register
class Blend(BackdoorAttack):
    """Blended-pattern trigger; ``pattern`` is ``"random"``, a uint8 array, or a ``.npy`` / image file path."""

    name = "blend"

    def __init__(
        self,
        target: int = 0,
        rate: float = 0.1,
        seed: int = 0,
        mode: str = "all2one",
        alpha: float = 0.2,
        test_alpha: float | None = None,
        pattern: str | os.PathLike | np.ndarray = "random",
        pattern_seed: int | None = None,
    ) -> None:
        super().__init__(target, rate, seed, mode)
        for a in (alpha, test_alpha):
            if a is not None and not 0.0 < a <= 1.0:
                raise ValueError(f"blend ratio must be in (0, 1], got {a}")
        self.alpha = float(alpha)
        self.test_alpha = float(test_alpha) if test_alpha is not None else self.alpha
        self.pattern_seed = self.seed if pattern_seed is None else int(pattern_seed)
        if isinstance(pattern, str) and pattern == "random":
            self._pattern: np.ndarray | None = None
            self.pattern_name = "random"
        else:
            self._pattern = load_pattern(pattern)
            self.pattern_name = str(pattern) if not isinstance(pattern, np.ndarray) else "custom"

    def pattern_for(self, height: int, width: int, channels: int) -> np.ndarray:
        """The trigger pattern at this image shape, float64 on the 0–255 scale ``(H, W, C)``."""
        if self._pattern is None:
            rng = np.random.default_rng([self.pattern_seed, height, width, channels])
            return rng.integers(0, 256, (height, width, channels)).astype(np.float64)
        return fit_pattern(self._pattern, height, width, channels)

    def blend(self, images: np.ndarray, alpha: float) -> np.ndarray:
        check_images(images)
        p = self.pattern_for(*images.shape[1:])
        return to_uint8((1.0 - alpha) * images.astype(np.float64) + alpha * p)

    def apply_trigger(self, images: np.ndarray) -> np.ndarray:
        return self.blend(images, self.test_alpha)

    def poison_images(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return self.blend(images, self.alpha)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "alpha": self.alpha, "test_alpha": self.test_alpha, "pattern": self.pattern_name,
                "pattern_seed": self.pattern_seed}
