"""BadNets (Gu et al., 2017): a small fixed patch stamped on the image, label flipped to the target."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ._common import load_pattern
from .base import BackdoorAttack, check_images, register

CORNERS = ("bottom-right", "bottom-left", "top-right", "top-left")


def checker_pattern(size: int) -> np.ndarray:
    """A ``size x size`` black/white checkerboard with a white corner (ABL's ``gridTrigger`` for size 3)."""
    yy, xx = np.mgrid[:size, :size]
    return np.where((yy + xx) % 2 == 0, 255, 0).astype(np.uint8)


def _pattern_from_list(values: list | tuple) -> np.ndarray:
    """A nested list of 0-255 integers (rows, or rows of channel values) as a uint8 patch."""
    try:
        arr = np.asarray(values)
    except ValueError as e:  # ragged rows
        raise ValueError(f"a pattern list must be rectangular ({e})") from e
    if arr.ndim not in (2, 3) or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 \
            or arr.max() > 255:
        raise ValueError(f"a pattern list must be a non-empty (h, w) or (h, w, C) grid of integers 0-255, got "
                         f"shape {arr.shape} dtype {arr.dtype}")
    return arr.astype(np.uint8)


@register
class BadNets(BackdoorAttack):
    """Patch trigger.

    ``pattern``: ``"checker"`` (default, as ABL's official 3x3 grid trigger), ``"white"``, an explicit uint8 array
    ``(h, w)`` / ``(h, w, C)``, a nested list of 0-255 integers (an inline JSON array on the command line), or a
    ``.npy`` / image file path (read without pickle, as Blend does). ``position``: a corner name or an explicit
    ``(row, col)`` of the patch's top-left pixel; ``margin`` keeps a corner patch that many pixels away from the border.
    """

    name = "badnets"

    def __init__(
        self,
        target: int = 0,
        rate: float = 0.1,
        seed: int = 0,
        mode: str = "all2one",
        size: int = 3,
        pattern: str | os.PathLike | np.ndarray | list = "checker",
        position: str | tuple[int, int] = "bottom-right",
        margin: int = 0,
    ) -> None:
        super().__init__(target, rate, seed, mode)
        if isinstance(pattern, str) and pattern in ("checker", "white"):
            patch = checker_pattern(size) if pattern == "checker" else np.full((size, size), 255, np.uint8)
        elif isinstance(pattern, (list, tuple)):
            patch = _pattern_from_list(pattern)
        elif isinstance(pattern, (str, os.PathLike)):
            if not str(pattern).lower().endswith((".npy", ".png", ".bmp", ".jpg", ".jpeg", ".gif", ".webp")):
                raise ValueError(f"unknown pattern {pattern!r}; use 'checker', 'white', an array, or a .npy / image "
                                 "file")
            try:
                patch = load_pattern(pattern)
            except (OSError, ValueError) as e:  # missing, unreadable, or an object / non-uint8 array
                raise ValueError(f"pattern {str(pattern)!r}: {e}") from e
        else:
            patch = np.asarray(pattern)
            if patch.dtype != np.uint8 or patch.ndim not in (2, 3):
                raise ValueError("a custom pattern must be a uint8 array (h, w) or (h, w, C)")
        if isinstance(position, str) and position not in CORNERS:
            raise ValueError(f"position must be one of {CORNERS} or (row, col), got {position!r}")
        self.patch = patch
        self.size = int(patch.shape[0])
        self.pattern = pattern if isinstance(pattern, str) else "custom"  # a file's path, or the array's "custom"
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
