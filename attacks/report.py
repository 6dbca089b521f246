"""What a poisoning run produced, as plain data: a JSON-able manifest and an image grid (numpy; the CLI saves it)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import BackdoorAttack, PoisonedData


def example_grid(clean: np.ndarray, poisoned: np.ndarray, n: int = 8, scale: int | None = None,
                 gap: int = 2) -> np.ndarray:
    """An RGB uint8 grid: row 1 clean images, row 2 their poisoned versions, row 3 the absolute difference
    (stretched to the full range per image, so invisible triggers such as WaNet's warp show up).

    ``scale`` enlarges each image by pixel repetition (default: to at least 64 pixels).
    """
    if clean.shape != poisoned.shape or clean.ndim != 4:
        raise ValueError(f"clean {clean.shape} and poisoned {poisoned.shape} must be equal (N, H, W, C) arrays")
    n = min(n, len(clean))
    _, h, w, c = clean.shape
    scale = scale or max(1, -(-64 // max(h, w)))
    diff = np.abs(poisoned[:n].astype(np.int16) - clean[:n].astype(np.int16)).astype(np.float64)
    peak = diff.reshape(n, -1).max(1).reshape(n, 1, 1, 1) if n else np.ones((0, 1, 1, 1))
    diff = np.where(peak > 0, diff * 255.0 / np.maximum(peak, 1), 0).astype(np.uint8)
    rows = [clean[:n], poisoned[:n], diff]
    hh, ww = h * scale, w * scale
    grid = np.full((3 * hh + 4 * gap, max(n, 1) * ww + (max(n, 1) + 1) * gap, 3), 255, np.uint8)
    for r, imgs in enumerate(rows):
        for i in range(n):
            img = imgs[i] if c == 3 else np.repeat(imgs[i], 3, axis=2)
            img = img.repeat(scale, 0).repeat(scale, 1)
            y0, x0 = gap + r * (hh + gap), gap + i * (ww + gap)
            grid[y0 : y0 + hh, x0 : x0 + ww] = img
    return grid


def poison_manifest(attack: BackdoorAttack, poisoned: PoisonedData, labels: np.ndarray, num_classes: int,
                    **extra: Any) -> dict[str, Any]:
    """Counts and parameters of a poisoned set (labels are the clean ones)."""
    labels = np.asarray(labels, np.int64)
    idx = poisoned.poison_indices
    changed = int((poisoned.labels != labels).sum())
    out: dict[str, Any] = {
        "attack": attack.name,
        "params": attack.params(),
        "clean_label": bool(attack.clean_label),
        "num_classes": int(num_classes),
        "n_images": int(len(labels)),
        "n_poisoned": int(len(idx)),
        "poison_fraction": float(len(idx) / max(len(labels), 1)),
        "n_labels_changed": changed,
        "poisoned_source_classes": {str(k): int(v) for k, v in zip(*np.unique(labels[idx], return_counts=True))},
    }
    cross = getattr(poisoned, "cross_indices", None)
    if cross is not None:
        out["n_cross"] = int(len(cross))
    for key in ("optimisation", "last_perturbation"):
        value = getattr(attack, key, None)
        if value:
            out[key] = value
    out.update(extra)
    return out
