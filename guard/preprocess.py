"""Turning what callers hand the guard into the model's input: float32 NCHW in [0, 1].

Accepted: uint8 images ``(N, H, W, C)``, ``(N, H, W)`` (grayscale) or one image ``(H, W[, C])``; float images in
[0, 1] as NHWC or NCHW; PIL images (converted and resized). Anything else is an :class:`InputError` saying why.

PIL images in 16-bit modes (``I;16*``, and ``I`` holding 16-bit values, as 16-bit PNG/TIFF decode) are scaled from
[0, 65535] to [0, 1] at full precision, and float images (``F``) must already lie in [0, 1]; converting them to 8 bits
the way Pillow does would clip every value above 255 to white.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


class InputError(ValueError):
    """An input does not fit the model's input spec; the message says how."""


WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def pil_to_array(img: Any, input_shape: Sequence[int]) -> tuple[np.ndarray, bool]:
    """A PIL image -> ``(H, W, C)`` in the model's channels and size; returns ``(array, resized)``.

    The array is uint8 for 8-bit images and float32 in [0, 1] for 16-bit and float images (:data:`WIDE_MODES`)."""
    from PIL import Image

    c, h, w = input_shape
    if img.mode in WIDE_MODES:
        return _wide_to_array(img, (c, h, w))
    mode = "L" if c == 1 else "RGB"
    if img.mode != mode:
        img = img.convert(mode)
    resized = img.size != (w, h)
    if resized:
        img = img.resize((w, h), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return (arr[..., None] if arr.ndim == 2 else arr), resized


def _wide_to_array(img: Any, input_shape: Sequence[int]) -> tuple[np.ndarray, bool]:
    """A single-channel 16-bit / 32-bit integer / float PIL image -> float32 ``(H, W, C)`` in [0, 1]."""
    from PIL import Image

    c, h, w = input_shape
    lo, hi = img.getextrema()
    if img.mode == "F":
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 1.0:
            raise InputError(f"float images must be scaled to [0, 1]; got values in [{lo:.3g}, {hi:.3g}]")
        scale = 1.0
    else:
        if lo < 0 or hi > 65535:
            raise InputError(f"integer images must hold 16-bit values; got values in [{lo}, {hi}]")
        scale = 1.0 / 65535.0
    arr = np.asarray(img).astype(np.float32) * np.float32(scale)  # 'I;16B' has no PIL conversion to 'F'
    resized = img.size != (w, h)
    if resized:
        arr = np.asarray(Image.fromarray(arr, mode="F").resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
    arr = np.clip(arr, 0.0, 1.0)[..., None]  # bilinear weights sum to one; clip only float rounding
    return (np.repeat(arr, c, axis=-1) if c != 1 else arr), resized


def to_model_input(x: Any, input_shape: Sequence[int]) -> np.ndarray:
    """Validate and convert a batch to float32 ``(N, C, H, W)`` in [0, 1]."""
    c, h, w = (int(v) for v in input_shape)
    if isinstance(x, (list, tuple)) and x and all(hasattr(i, "convert") and hasattr(i, "size") for i in x):
        x = _stack_pil([pil_to_array(i, (c, h, w))[0] for i in x])
    elif hasattr(x, "convert") and hasattr(x, "size") and not isinstance(x, np.ndarray):
        x = _stack_pil([pil_to_array(x, (c, h, w))[0]])
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
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, refused just below
        out = np.ascontiguousarray(out, dtype=np.float32)
    if not np.isfinite(out).all():
        raise InputError("images contain NaN or infinite values")
    lo, hi = float(out.min()), float(out.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise InputError(f"float images must be scaled to [0, 1]; got values in [{lo:.3g}, {hi:.3g}]")
    return np.clip(out, 0.0, 1.0)


def _stack_pil(arrays: list[np.ndarray]) -> np.ndarray:
    """``(H, W, C)`` arrays of :func:`pil_to_array` -> one batch: uint8 NHWC, or float32 NCHW in [0, 1] when any is
    16-bit/float (NCHW so that a model with ``C == H == W`` cannot read the layout the other way round)."""
    if all(a.dtype == np.uint8 for a in arrays):
        return np.stack(arrays)
    return np.stack([(a.astype(np.float32) / np.float32(255.0) if a.dtype == np.uint8 else a).transpose(2, 0, 1)
                     for a in arrays])


# ------------------------------------------------------------------------------------------------ input contract

#: how a model's graph lays out one image: ``flat`` is the row-major (H, W, C) image as one vector (scikit-learn style)
LAYOUTS = ("NCHW", "NHWC", "NHW", "flat")
DTYPES = ("float32", "float16", "float64", "uint8")


@dataclass(frozen=True)
class InputContract:
    """What a model's graph takes, and how the guard's canonical input maps to it.

    The guard works on one canonical form everywhere — float32 NCHW in [0, 1] of ``shape`` (C, H, W), what
    :func:`to_model_input` and the input sources produce — so calibration, scanning and the detectors that perturb
    inputs (squeezing, STRIP) never depend on a model's conventions. :meth:`to_native` applies the contract just
    before onnxruntime: scale to ``value_range`` (uint8: round to 0..255), normalise ``(v - mean) / std`` per channel
    on that scale when ``mean``/``std`` are set (models that normalise outside their graph), cast to ``dtype`` and
    lay out as ``layout``. :meth:`from_native` inverts it (clipped to [0, 1]) for inputs a caller hands in already in
    the model's form (:class:`~abl_guard.guard.session.GuardedSession`).
    """

    shape: tuple[int, int, int]
    layout: str = "NCHW"
    dtype: str = "float32"
    value_range: tuple[float, float] = (0.0, 1.0)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        c, h, w = self.shape
        if self.layout not in LAYOUTS:
            raise ValueError(f"input layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"input dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.layout == "NHW" and c != 1:
            raise ValueError(f"layout NHW holds one channel, the shape has {c}")
        lo, hi = self.value_range
        if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
            raise ValueError(f"input range must be two finite numbers LO < HI, got {self.value_range}")
        if self.dtype == "uint8" and (lo, hi) != (0.0, 255.0):
            raise ValueError("uint8 inputs take the range [0, 255]")
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std go together")
        if self.mean is not None and self.std is not None:
            if self.dtype == "uint8":
                raise ValueError("a uint8 input cannot be normalised outside the graph")
            for name, v in (("mean", self.mean), ("std", self.std)):
                if len(v) not in (1, c) or not all(np.isfinite(v)):
                    raise ValueError(f"{name} needs 1 or {c} finite values, got {list(v)}")
            if min(self.std) <= 0:
                raise ValueError(f"std must be positive, got {list(self.std)}")

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> InputContract:
        """The contract recorded in a model's ``abl_guard`` metadata (exported models: float NCHW [0, 1])."""
        norm = meta.get("normalization") or {}
        runtime = norm.get("applied") == "runtime"
        lo, hi = (float(v) for v in meta.get("input_range", (0.0, 1.0)))
        return cls(tuple(int(v) for v in meta["input_shape"]), str(meta.get("input_layout", "NCHW")),  # type: ignore[arg-type]
                   str(meta.get("input_dtype", "float32")), (lo, hi),
                   tuple(float(v) for v in norm["mean"]) if runtime else None,
                   tuple(float(v) for v in norm["std"]) if runtime else None)

    @property
    def is_identity(self) -> bool:
        """True when the model takes the canonical form as it is."""
        return (self.layout == "NCHW" and self.dtype == "float32" and self.value_range == (0.0, 1.0)
                and self.mean is None)

    def native_shape(self) -> tuple[int, ...]:
        """The shape of one input as the graph takes it (without the batch axis)."""
        c, h, w = self.shape
        return {"NCHW": (c, h, w), "NHWC": (h, w, c), "NHW": (h, w), "flat": (c * h * w,)}[self.layout]

    def _norm(self) -> tuple[np.ndarray, np.ndarray]:
        shape = (1, -1, 1, 1)
        return (np.asarray(self.mean, np.float32).reshape(shape), np.asarray(self.std, np.float32).reshape(shape))

    def to_native(self, x: np.ndarray) -> np.ndarray:
        """Canonical float32 ``(N, C, H, W)`` in [0, 1] -> the array the graph takes."""
        if self.is_identity:
            return np.ascontiguousarray(x, dtype=np.float32)
        if self.dtype == "uint8":
            v = np.clip(np.rint(np.asarray(x, np.float32) * np.float32(255.0)), 0, 255).astype(np.uint8)
        else:
            lo, hi = self.value_range
            v = np.asarray(x, np.float32)
            if (lo, hi) != (0.0, 1.0):
                v = np.float32(lo) + v * np.float32(hi - lo)
            if self.mean is not None:
                mean, std = self._norm()
                v = (v - mean) / std
            v = v.astype(self.dtype, copy=False)
        n = len(v)
        if self.layout == "NHWC":
            v = v.transpose(0, 2, 3, 1)
        elif self.layout == "NHW":
            v = v[:, 0]
        elif self.layout == "flat":
            v = v.transpose(0, 2, 3, 1).reshape(n, -1)
        return np.ascontiguousarray(v)

    def from_native(self, x: np.ndarray) -> np.ndarray:
        """The graph's input form -> canonical float32 ``(N, C, H, W)`` in [0, 1] (values outside are clipped)."""
        c, h, w = self.shape
        v = np.asarray(x)
        want = self.native_shape()
        if v.ndim != len(want) + 1 or tuple(v.shape[1:]) != want:
            raise InputError(f"model input must be (N, {', '.join(map(str, want))}) ({self.layout}), got {v.shape}")
        if self.layout == "NHWC":
            v = v.transpose(0, 3, 1, 2)
        elif self.layout == "NHW":
            v = v[:, None]
        elif self.layout == "flat":
            v = v.reshape(len(v), h, w, c).transpose(0, 3, 1, 2)
        if self.dtype == "uint8":
            out = v.astype(np.float32) / np.float32(255.0)
        else:
            out = v.astype(np.float32)
            if self.mean is not None:
                mean, std = self._norm()
                out = out * std + mean
            lo, hi = self.value_range
            if (lo, hi) != (0.0, 1.0):
                out = (out - np.float32(lo)) / np.float32(hi - lo)
        if not np.isfinite(out).all():
            raise InputError("model input contains NaN or infinite values")
        return np.ascontiguousarray(np.clip(out, 0.0, 1.0), dtype=np.float32)

    def to_metadata(self) -> dict[str, Any]:
        """The metadata keys :meth:`from_metadata` reads."""
        norm = ({"mean": list(self.mean), "std": list(self.std), "applied": "runtime"}
                if self.mean is not None and self.std is not None else None)
        return {"input_shape": list(self.shape), "input_layout": self.layout, "input_dtype": self.dtype,
                "input_range": [float(v) for v in self.value_range], "normalization": norm}
