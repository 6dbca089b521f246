"""Small helpers shared by the attacks: float conversion, rounding back to uint8, trigger patterns and models."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: luminance weights (ITU-R BT.601) for turning an RGB pattern into a grayscale one
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)

ModelLoader = Callable[[str], nn.Module]


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Round a float array on the 0–255 scale to uint8 (clipping first)."""
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def nhwc_to_tensor(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 ``(N, H, W, C)`` -> float32 ``(N, C, H, W)`` in [0, 1]."""
    return torch.as_tensor(images, device=device).permute(0, 3, 1, 2).float().div(255.0).contiguous()


def tensor_to_nhwc(x: torch.Tensor) -> np.ndarray:
    """float ``(N, C, H, W)`` in [0, 1] -> uint8 ``(N, H, W, C)`` (rounded)."""
    return to_uint8(x.detach().permute(0, 2, 3, 1).cpu().numpy().astype(np.float64) * 255.0)


def load_pattern(pattern: str | os.PathLike | np.ndarray) -> np.ndarray:
    """A trigger pattern as a uint8 array ``(h, w)`` or ``(h, w, C)``.

    Accepts an array, a ``.npy`` file (loaded without pickle) or an image file. Image files are decoded with Pillow,
    imported only here and only for a path, so the attacks themselves stay numpy + torch.
    """
    if isinstance(pattern, np.ndarray):
        arr = pattern
    else:
        path = Path(pattern)
        if not path.is_file():
            raise ValueError(f"pattern file {path} does not exist")
        if path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            from PIL import Image

            with Image.open(path) as img:
                arr = np.asarray(img.convert("RGB") if img.mode not in ("L", "RGB") else img)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3)):
        raise ValueError(f"a pattern must be uint8 (h, w), (h, w, 1) or (h, w, 3); got {arr.dtype} {arr.shape}")
    return arr


def fit_pattern(pattern: np.ndarray, height: int, width: int, channels: int) -> np.ndarray:
    """Resize a uint8 pattern to ``(height, width)`` (bilinear) and match ``channels``; returns float64 0–255."""
    p = pattern.astype(np.float64)
    if p.ndim == 2:
        p = p[..., None]
    if p.shape[2] == 3 and channels == 1:
        p = (p @ _LUMA)[..., None]
    elif p.shape[2] == 1 and channels == 3:
        p = np.repeat(p, 3, axis=2)
    elif p.shape[2] != channels:
        raise ValueError(f"pattern has {p.shape[2]} channels, images have {channels}")
    if p.shape[:2] != (height, width):
        t = torch.as_tensor(p, dtype=torch.float64).permute(2, 0, 1)[None]
        t = F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)
        p = t[0].permute(1, 2, 0).numpy().clip(0, 255)
    return p


def resolve_model(model: Any, model_loader: ModelLoader | None, who: str) -> nn.Module | Callable | None:
    """A model argument: a module / callable is used as is; a path string needs ``model_loader``.

    attacks/ may not import abl/, so reading an abl-guard checkpoint is the caller's job (the CLI and
    ``abl.experiment`` pass ``model_loader=lambda p: load_checkpoint(p)[0]``).
    """
    if model is None or callable(model):
        return model
    if isinstance(model, (str, os.PathLike)):
        if model_loader is None:
            raise ValueError(
                f"{who}: model={str(model)!r} is a path; pass an nn.Module, or model_loader= that reads it "
                "(e.g. lambda p: abl.checkpoint.load_checkpoint(p)[0])"
            )
        return model_loader(str(model))
    raise TypeError(f"{who}: model must be an nn.Module, a callable or a checkpoint path, got {type(model)}")


def model_device(model: Any) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for parameter-free callables)."""
    if isinstance(model, nn.Module):
        for t in model.parameters():
            return t.device
        for t in model.buffers():
            return t.device
    return torch.device("cpu")


def describe_model(model: Any, source: Any) -> str | None:
    """What to record for a model parameter in JSON: the path when one was given, else the class name."""
    if source is None and model is None:
        return None
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return f"<{type(model).__name__}>"
