"""BadNets (Gu et al., 2017): a small fixed patch stamped on the image, label flipped to the target."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import BackdoorAttack, check_images, register

CORNERS = ("bottom-right", "bottom-left", "top-right", "top-left")


def checker_pattern(size: int) -> np.ndarray:
    """A ``size x size`` black/white checkerboard with a white corner (ABL's ``gridTrigger`` for size 3)."""
    yy, xx = np.mgrid[:size, :size]
    return np.where((yy + xx) % 2 == 0, 255, 0).astype(np.uint8)


@register
class BadNets(BackdoorAttack):
    """Patch trigger.

    ``pattern``: ``"checker"`` (default, as ABL's official 3x3 grid trigger), ``"white"``, or an explicit uint8
    array ``(h, w)`` / ``(h, w, C)``. ``position``: a corner name or an explicit ``(row, col)`` of the patch's top-left
    pixel; ``margin`` keeps a corner patch that many pixels away from the border.
    """

    name = "badnets"

    def __init__(
        self,
        target: int = 0,
        rate: float = 0.1,
        seed: int = 0,
        mode: str = "all2one",
        size: int = 3,
        pattern: str | np.ndarray = "checker",
        position: str | tuple[int, int] = "bottom-right",
        margin: int = 0,
    ) -> None:
        super().__init__(target, rate, seed, mode)
        if isinstance(pattern, str):
            if pattern == "checker":
                patch = checker_pattern(size)
            elif pattern == "white":
                patch = np.full((size, size), 255, np.uint8)
            else:
                raise ValueError(f"unknown pattern {pattern!r}; use 'checker', 'white' or an array")
        else:
            patch = np.asarray(pattern)
            if patch.dtype != np.uint8 or patch.ndim not in (2, 3):
                raise ValueError("a custom pattern must be a uint8 array (h, w) or (h, w, C)")
        if isinstance(position, str) and position not in CORNERS:
            raise ValueError(f"position must be one of {CORNERS} or (row, col), got {position!r}")
        self.patch = patch
        self.size = int(patch.shape[0])
        self.pattern = pattern if isinstance(pattern, str) else "custom"
        self.position = position if isinstance(position, str) else (int(position[0]), int(position[1]))
        self.margin = int(margin)

    def patch_origin(self, height: int, width: int) -> tuple[int, int]:
        ph, pw = self.patch.shape[:2]
        if isinstance(self.position, tuple):
            r, c = self.position
        else:
            r = self.margin if self.position.startswith("top") else height - ph - self.margin
            c = self.margin if self.position.endswith("left") else width - pw - self.margin
        if r < 0 or c < 0 or r + ph > height or c + pw > width:
            raise ValueError(f"a {ph}x{pw} patch at ({r}, {c}) does not fit a {height}x{width} image")
        return r, c

    def apply_trigger(self, images: np.ndarray) -> np.ndarray:
        check_images(images)
        out = images.copy()
        r, c = self.patch_origin(*images.shape[1:3])
        ph, pw = self.patch.shape[:2]
        patch = self.patch if self.patch.ndim == 3 else self.patch[..., None]
        if patch.shape[2] not in (1, images.shape[3]):
            raise ValueError(f"pattern has {patch.shape[2]} channels, images have {images.shape[3]}")
        out[:, r : r + ph, c : c + pw, :] = patch
        return out

    def params(self) -> dict[str, Any]:
        pos = self.position if isinstance(self.position, str) else list(self.position)
        return {**super().params(), "size": self.size, "pattern": self.pattern, "position": pos,
                "margin": self.margin}
