"""Weights-only checkpoints: a state dict plus a JSON description of the model and its data."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from abl_guard.guard.bundle import sha256_file

from .data import DatasetSpec
from .models import build_model

FORMAT = "abl-guard-checkpoint/1"


def save_checkpoint(path: str | os.PathLike, model: nn.Module, arch: str, spec: DatasetSpec,
                    extra: dict[str, Any] | None = None) -> str:
    """Save ``model``'s weights and its description; returns the file's SHA-256."""
    meta = {"format": FORMAT, "arch": arch, "spec": spec.to_json(), "taps": dict(getattr(model, "TAPS", {})),
            **(extra or {})}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    torch.save({"state_dict": state, "meta_json": json.dumps(meta)}, tmp)
    os.replace(tmp, path)
    return sha256_file(path)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model from a checkpoint written by :func:`save_checkpoint` (``weights_only=True``)."""
    blob = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(blob, dict) or "meta_json" not in blob or "state_dict" not in blob:
        raise ValueError(f"{path} is not an abl-guard checkpoint (for a bare state dict use `export --arch`)")
    meta = json.loads(blob["meta_json"])
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported checkpoint format {meta.get('format')!r} (expected {FORMAT})")
    spec = DatasetSpec.from_json(meta["spec"])
    c, h, _ = spec.input_shape
    model = build_model(meta["arch"], c, spec.num_classes, h, spec.mean, spec.std)
    model.load_state_dict(blob["state_dict"])
    model.to(device).eval()
    return model, meta
