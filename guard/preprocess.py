"""Turning what callers hand the guard into the model's input: float32 NCHW in [0, 1].

Accepted: uint8 images ``(N, H, W, C)``, ``(N, H, W)`` (grayscale) or one image ``(H, W[, C])``; float images in
[0, 1] as NHWC or NCHW; PIL images (converted and resized). Anything else is an :class:`InputError` saying why.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class InputError(ValueError):
    """An input does not fit the model's input spec; the message says how."""


def pil_to_array(img: Any, input_shape: Sequence[int]) -> tuple[np.ndarray, bool]:
    """A PIL image -> uint8 ``(H, W, C)`` in the model's channels and size; returns ``(array, resized)``."""
    from PIL import Image

    c, h, w = input_shape
    mode = "L" if c == 1 else "RGB"
    if img.mode != mode:
        img = img.convert(mode)
    resized = img.size != (w, h)
    if resized:
        img = img.resize((w, h), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return (arr[..., None] if arr.ndim == 2 else arr), resized


def to_model_input(x: Any, input_shape: Sequence[int]) -> np.ndarray:
    """Validate and convert a batch to float32 ``(N, C, H, W)`` in [0, 1]."""
    c, h, w = (int(v) for v in input_shape)
    if isinstance(x, (list, tuple)) and x and all(hasattr(i, "convert") and hasattr(i, "size") for i in x):
        x = np.stack([pil_to_array(i, (c, h, w))[0] for i in x])
    elif hasattr(x, "convert") and hasattr(x, "size") and not isinstance(x, np.ndarray):
        x = pil_to_array(x, (c, h, w))[0][None]
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except Exception as e:  # noqa: BLE001 - any conversion failure is an input error
            raise InputError(f"cannot convert {type(x).__name__} to an array: {e}") from e
    if x.dtype == object or x.size == 0:
        raise InputError(f"expected a non-empty numeric image batch, got dtype {x.dtype} shape {x.shape}")
    if x.dtype == np.uint8:
        if x.ndim == 2 and x.shape == (h, w) and c == 1:
            x = x[None, :, :, None]
        elif x.ndim == 3 and x.shape == (h, w, c):
            x = x[None]
        elif x.ndim == 3 and c == 1 and x.shape[1:] == (h, w):
            x = x[..., None]
        if x.ndim != 4 or x.shape[1:] != (h, w, c):
            raise InputError(f"uint8 images must be (N, {h}, {w}, {c}) (NHWC), got {x.shape}")
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)
    if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
        raise InputError(f"integer images must be uint8, got {x.dtype}")
    if not np.issubdtype(x.dtype, np.floating):
        raise InputError(f"unsupported dtype {x.dtype}")
    if x.ndim == 3 and x.shape in ((c, h, w), (h, w, c)):
        x = x[None]
    if x.ndim == 4 and x.shape[1:] == (c, h, w):
        out = x
    elif x.ndim == 4 and x.shape[1:] == (h, w, c):
        out = x.transpose(0, 3, 1, 2)
    else:
        raise InputError(f"float images must be (N, {c}, {h}, {w}) or (N, {h}, {w}, {c}), got {x.shape}")
    out = np.ascontiguousarray(out, dtype=np.float32)
    if not np.isfinite(out).all():
        raise InputError("images contain NaN or infinite values")
    lo, hi = float(out.min()), float(out.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise InputError(f"float images must be scaled to [0, 1]; got values in [{lo:.3g}, {hi:.3g}]")
    return np.clip(out, 0.0, 1.0)
