"""The served model: one onnxruntime session yielding logits and every tap in one pass.

A model is an ONNX file carrying ``abl_guard`` metadata: written by ``abl-guard export`` (float NCHW [0, 1] in,
normalisation in the graph) or by ``abl-guard adopt`` from someone else's classifier (any layout, dtype and
normalisation, recorded as an :class:`~abl_guard.guard.preprocess.InputContract`; the file keeps its own outputs).
Callers and detectors always hand :class:`OnnxModel` the canonical float NCHW [0, 1] batch; the contract is applied
right before onnxruntime.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .preprocess import InputContract

log = logging.getLogger(__name__)

METADATA_KEY = "abl_guard"
MODEL_FORMAT = "abl-guard-onnx/1"
#: the output holding the pre-softmax class scores in every abl-guard model
LOGITS_NAME = "logits"


def model_metadata(session: ort.InferenceSession, path: str | os.PathLike = "<model>") -> dict[str, Any]:
    """The ``abl_guard`` JSON metadata written by ``abl-guard export`` or ``abl-guard adopt``."""
    raw = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if raw is None:
        raise ValueError(f"{path} has no abl-guard metadata; wrap it first with `abl-guard adopt {path} -o "
                         "guarded.onnx` (or export a torch checkpoint with `abl-guard export`)")
    meta = json.loads(raw)
    if meta.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path}: unsupported model metadata format {meta.get('format')!r} (expected {MODEL_FORMAT})")
    return meta


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``abl_guard`` metadata of a model file, read with onnxruntime only (no torch, no onnx)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    return model_metadata(sess, path)


def tap_names_of(meta: dict[str, Any], outputs: Sequence[str]) -> list[str]:
    """The taps a model exposes: the metadata's ``taps`` in output order (older files: every output but logits)."""
    taps = meta.get("taps")
    if isinstance(taps, dict) and taps:
        return [n for n in outputs if n in taps]
    return [n for n in outputs if n != LOGITS_NAME]


class OnnxModel:
    """An exported or adopted abl-guard model. ``run(x)`` maps float32 NCHW [0, 1] batches to named outputs.

    onnxruntime's ``InferenceSession.run`` is thread-safe, so one instance serves concurrent callers.
    Calling the instance (``model(x)``) is the ``ModelFn`` that detectors needing extra passes receive.
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None,
                 batch_size: int = 256, intra_op_threads: int | None = None,
                 allow_spinning: bool | None = None) -> None:
        self.path = Path(path)
        opts = ort.SessionOptions()
        if intra_op_threads:
            opts.intra_op_num_threads = int(intra_op_threads)
        if allow_spinning is not None:  # idle worker threads busy-wait by default: fast on a dedicated machine
            opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
        opts.log_severity_level = 3
        available = ort.get_available_providers()
        chosen = list(providers) if providers else [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                                                     if p in available]
        self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=chosen)
        self.meta = model_metadata(self.session, self.path)
        self.input_name: str = self.meta["input_name"]
        self.contract = InputContract.from_metadata(self.meta)
        self.input_shape: tuple[int, int, int] = self.contract.shape
        self.class_names: list[str] = list(self.meta["class_names"])
        session_outputs = [o.name for o in self.session.get_outputs()]
        if LOGITS_NAME not in session_outputs:
            raise ValueError(f"{self.path} has no {LOGITS_NAME!r} output")
        self.tap_names: list[str] = tap_names_of(self.meta, session_outputs)
        #: what the guard reads (logits and taps); an adopted file also keeps its own outputs (``model_outputs``)
        self.output_names: list[str] = [LOGITS_NAME, *self.tap_names]
        self.model_outputs: list[str] = [n for n in self.meta.get("model_outputs", [LOGITS_NAME])
                                         if n in session_outputs]
        fixed = self.meta.get("fixed_batch")
        #: a graph that could not be given a dynamic batch axis runs in chunks of exactly this size (padded)
        self.fixed_batch: int | None = int(fixed) if fixed else None
        self.batch_size = int(batch_size)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def run(self, x: np.ndarray, outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run canonical float32 NCHW [0, 1] images in chunks of ``batch_size``; returns ``{name: array}`` for
        ``outputs`` (default: logits and every tap). The input contract is applied to each chunk."""
        names = list(outputs) if outputs is not None else self.output_names
        unknown = set(names) - set(self.output_names)
        if unknown:
            raise KeyError(f"model has no outputs {sorted(unknown)}; it has {self.output_names}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"model input must be (N, {', '.join(map(str, self.input_shape))}), got {x.shape}")
        step = self.fixed_batch or self.batch_size
        parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for s in range(0, len(x), step):
            chunk = x[s : s + step]
            n = len(chunk)
            if self.fixed_batch and n < self.fixed_batch:  # pad with copies of the last row, drop their outputs
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.fixed_batch - n, axis=0)])
            for name, arr in zip(names, self.session.run(names, {self.input_name: self.contract.to_native(chunk)})):
                parts[name].append(arr[:n])
        # one chunk: its arrays as they are (a concatenate would copy every tap again)
        return {n: (v[0] if len(v) == 1 else np.concatenate(v) if v else np.zeros((0,), np.float32))
                for n, v in parts.items()}

    __call__ = run

    def dense_head(self, tap: str) -> list[dict[str, Any]]:
        """The layers between output ``tap`` and ``logits`` when they are a pure dense head; see :func:`dense_head`."""
        if tap not in self.tap_names:
            raise KeyError(f"model has no tap {tap!r}; it has {self.tap_names}")
        return dense_head(self.path, tap)


#: ONNX ops a dense head may consist of (Gemm / MatMul+Add are the dense layers)
_HEAD_OPS = {"Gemm", "MatMul", "Add", "Relu", "Flatten", "Identity"}


def dense_head(path: str | os.PathLike, tap: str, output: str = LOGITS_NAME) -> list[dict[str, Any]]:
    """Read the dense layers that map graph tensor ``tap`` to ``output`` from an ONNX file.

    Walks the graph from ``tap`` to ``output``; every step must be the only consumer of its input and one of Gemm
    (``transA = 0``), MatMul with a constant right operand, Add of a constant bias, Relu, Flatten (axis 1) or
    Identity. Returns ``[{"op": "linear", "weight": (out, in), "bias": (out,)}, {"op": "relu"}, {"op": "flatten"},
    ...]`` as float32 arrays in application order, so ``logits = head(tap)`` can be recomputed (and mutated) in
    numpy. Raises ``ValueError`` naming the first node that is not part of a dense head.
    """
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    g = proto.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for node in g.node:  # Constant nodes are initializers too, for our purposes
        if node.op_type == "Constant" and node.attribute:
            a = node.attribute[0]
            if a.name == "value":
                inits[node.output[0]] = numpy_helper.to_array(a.t)
    consumers: dict[str, list[Any]] = {}
    for node in g.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    layers: list[dict[str, Any]] = []
    current = tap
    for _ in range(len(g.node) + 1):
        if current == output:
            return layers
        nodes = [n for n in consumers.get(current, []) if n.op_type != "Constant"]
        if len(nodes) != 1:
            raise ValueError(f"{path}: tensor {current!r} has {len(nodes)} consumers; not a dense head after {tap!r}")
        node = nodes[0]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        others = [i for i in node.input if i != current]
        if node.op_type not in _HEAD_OPS or any(i and i not in inits for i in others) \
                or (node.op_type != "Add" and node.input[0] != current):
            raise ValueError(f"{path}: node {node.name or node.op_type!r} ({node.op_type}) after tap {tap!r} is not "
                             "part of a dense head (Gemm/MatMul/Add/Relu/Flatten with constant weights)")
        if node.op_type == "Gemm":
            if attrs.get("transA", 0):
                raise ValueError(f"{path}: Gemm with transA after tap {tap!r} is not supported")
            b = inits[node.input[1]].astype(np.float32)
            w = (b if attrs.get("transB", 0) else b.T) * np.float32(attrs.get("alpha", 1.0))
            bias = np.zeros(w.shape[0], np.float32)
            if len(node.input) > 2 and node.input[2]:
                bias = np.broadcast_to(inits[node.input[2]].astype(np.float32) * np.float32(attrs.get("beta", 1.0)),
                                       (w.shape[0],)).copy()
            layers.append({"op": "linear", "weight": np.ascontiguousarray(w), "bias": bias})
        elif node.op_type == "MatMul":
            w = inits[node.input[1]].astype(np.float32)
            if w.ndim != 2:
                raise ValueError(f"{path}: MatMul with a {w.ndim}-D weight after tap {tap!r} is not supported")
            layers.append({"op": "linear", "weight": np.ascontiguousarray(w.T), "bias": np.zeros(w.shape[1],
                                                                                                  np.float32)})
        elif node.op_type == "Add":
            if not layers or layers[-1]["op"] != "linear":
                raise ValueError(f"{path}: Add after tap {tap!r} does not follow a dense layer")
            layers[-1]["bias"] = layers[-1]["bias"] + np.broadcast_to(inits[others[0]].astype(np.float32),
                                                                      layers[-1]["bias"].shape)
        elif node.op_type == "Relu":
            layers.append({"op": "relu"})
        elif node.op_type == "Flatten":
            if attrs.get("axis", 1) != 1:
                raise ValueError(f"{path}: Flatten with axis != 1 after tap {tap!r} is not supported")
            layers.append({"op": "flatten"})
        current = node.output[0]
    raise ValueError(f"{path}: no path from {tap!r} to {output!r}")
