"""ONNX models for the guard: ``adopt`` adds taps and metadata to someone else's classifier (torch-free), ``export``
writes one from a torch model with named taps, metadata and a parity check (needs the ``train`` extra).

The torch exporter is imported on first use of one of its names, so ``import abl_guard.export`` (and adopt) work on a
serving install without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from abl_guard.guard.model import LOGITS_NAME, METADATA_KEY, read_metadata
from abl_guard.guard.model import MODEL_FORMAT as FORMAT

from .adopt import AdoptError, AdoptReport, adopt, list_taps

#: names served lazily from export/onnx.py (imports torch)
_TORCH_NAMES = ("INPUT_NAME", "ExportReport", "NormalizedModel", "ParityError", "TapWrapper", "build_foreign_model",
                "default_penultimate", "export_onnx")

__all__ = [
    "FORMAT", "LOGITS_NAME", "METADATA_KEY", "AdoptError", "AdoptReport", "adopt", "list_taps", "read_metadata",
    *_TORCH_NAMES,
]


def __getattr__(name: str) -> Any:
    if name in _TORCH_NAMES:
        return getattr(importlib.import_module(".onnx", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
