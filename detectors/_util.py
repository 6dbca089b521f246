"""Small numpy helpers shared by the detectors (softmax, extra model passes, pooling, input checks)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .base import ModelFn


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (numerically stable)."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def model_logits(model: ModelFn | None, x: np.ndarray, who: str) -> np.ndarray:
    """Logits of ``model`` on float NCHW ``x``; asks for the ``logits`` output only when the model allows it."""
    if model is None:
        raise ValueError(f"{who} runs extra model passes: score(batch, model) needs the model callable")
    x = np.ascontiguousarray(x, dtype=np.float32)
    try:
        out: Mapping[str, np.ndarray] = model(x, outputs=("logits",))  # type: ignore[call-arg]
    except TypeError:  # a plain ModelFn without the outputs= keyword
        out = model(x)
    if "logits" not in out:
        raise KeyError(f"{who}: the model returned no 'logits' (got {sorted(out)})")
    return np.asarray(out["logits"], np.float64)


def check_images(x: np.ndarray, who: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """``x`` must be a float NCHW batch (values in [0, 1]); ``shape`` optionally fixes ``(C, H, W)``."""
    if x.ndim != 4:
        raise ValueError(f"{who}: 'input' must be a float NCHW batch, got shape {x.shape}")
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        raise ValueError(f"{who}: inputs have shape {tuple(x.shape[1:])}, fitted on {tuple(shape)}")
    return x


def adaptive_avg_pool(x: np.ndarray, grid: int) -> np.ndarray:
    """``(N, C, H, W)`` -> ``(N, C * g * g)`` by adaptive average pooling to a ``g x g`` grid (torch's bin edges:
    ``floor(i * H / g)`` to ``ceil((i + 1) * H / g)``); ``grid = 1`` is global average pooling; 2-D passes through."""
    if x.ndim == 2:
        return x
    if x.ndim != 4:
        raise ValueError(f"expected (N, C, H, W) or (N, D) activations, got shape {x.shape}")
    n, c, h, w = x.shape
    g_h, g_w = min(grid, h), min(grid, w)
    out = np.empty((n, c, g_h, g_w), dtype=np.float64)
    for i in range(g_h):
        r0, r1 = (i * h) // g_h, -((-(i + 1) * h) // g_h)
        for j in range(g_w):
            c0, c1 = (j * w) // g_w, -((-(j + 1) * w) // g_w)
            out[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
    return out.reshape(n, -1)


def subsample(n: int, max_n: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset of size ``min(n, max_n)`` (all of them when ``max_n`` is None)."""
    if max_n is None or n <= max_n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_n, replace=False))
