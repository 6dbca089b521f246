"""The served model: one onnxruntime session yielding logits and every tap in one pass."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)

METADATA_KEY = "abl_guard"
MODEL_FORMAT = "abl-guard-onnx/1"


def model_metadata(session: ort.InferenceSession, path: str | os.PathLike = "<model>") -> dict[str, Any]:
    """The ``abl_guard`` JSON metadata written by ``abl-guard export``."""
    raw = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if raw is None:
        raise ValueError(f"{path} has no abl-guard metadata; export it with `abl-guard export`")
    meta = json.loads(raw)
    if meta.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path}: unsupported model metadata format {meta.get('format')!r} (expected {MODEL_FORMAT})")
    return meta


class OnnxModel:
    """An exported abl-guard model. ``run(x)`` maps float32 NCHW [0, 1] batches to named outputs.

    onnxruntime's ``InferenceSession.run`` is thread-safe, so one instance serves concurrent callers.
    Calling the instance (``model(x)``) is the ``ModelFn`` that detectors needing extra passes receive.
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None,
                 batch_size: int = 256, intra_op_threads: int | None = None) -> None:
        self.path = Path(path)
        opts = ort.SessionOptions()
        if intra_op_threads:
            opts.intra_op_num_threads = int(intra_op_threads)
        opts.log_severity_level = 3
        available = ort.get_available_providers()
        chosen = list(providers) if providers else [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                                                     if p in available]
        self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=chosen)
        self.meta = model_metadata(self.session, self.path)
        self.input_name: str = self.meta["input_name"]
        self.input_shape: tuple[int, int, int] = tuple(int(v) for v in self.meta["input_shape"])  # type: ignore
        self.class_names: list[str] = list(self.meta["class_names"])
        self.output_names: list[str] = [o.name for o in self.session.get_outputs()]
        self.tap_names: list[str] = [n for n in self.output_names if n != "logits"]
        self.batch_size = int(batch_size)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def run(self, x: np.ndarray, outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run in chunks of ``batch_size``; returns ``{name: array}`` for ``outputs`` (default: all)."""
        names = list(outputs) if outputs is not None else self.output_names
        unknown = set(names) - set(self.output_names)
        if unknown:
            raise KeyError(f"model has no outputs {sorted(unknown)}; it has {self.output_names}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"model input must be (N, {', '.join(map(str, self.input_shape))}), got {x.shape}")
        parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for s in range(0, len(x), self.batch_size):
            for n, arr in zip(names, self.session.run(names, {self.input_name: x[s : s + self.batch_size]})):
                parts[n].append(arr)
        return {n: (np.concatenate(v) if v else np.zeros((0,), np.float32)) for n, v in parts.items()}

    __call__ = run
