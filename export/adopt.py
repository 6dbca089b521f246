"""Adopt someone else's ONNX classifier: add the taps and metadata the guard needs, keep everything else as it was.

A deployed model usually arrives as an ONNX file from another exporter (torch's TorchScript exporter, skl2onnx, tf2onnx,
...) whose source is gone. :func:`adopt` works on the graph alone (the ``onnx`` package; no torch):

* finds the classifier output — a 2-D float tensor, or the probabilities a ZipMap turns into dictionaries — and the
  **logits**: the input of a final Softmax/LogSoftmax, else the output itself;
* finds the **penultimate features** — the data input of the last Gemm/MatMul producing the logits, walking back
  through bias Adds, Flatten/Reshape/Squeeze, Identity and Cast — and adds any taps named by tensor or node;
* exposes each as an extra graph output (an Identity named after the tap, which the tensor's consumers then read, so
  a dense head stays a single chain for :func:`abl_guard.guard.model.dense_head`);
* makes a fixed batch axis dynamic (and keeps it fixed, recorded as ``fixed_batch``, when the graph bakes the batch
  into a shape and then fails the check);
* records the input contract (layout, dtype, value range, runtime normalisation, size) and class names in the same
  ``abl_guard`` metadata ``abl-guard export`` writes;
* checks with onnxruntime that every original output is unchanged on random and (optionally) real inputs, that the
  taps have one row per input and that softmax(logits) reproduces softmax outputs, and refuses on any mismatch.

Taps are what Jin et al.'s activation- and feature-space lenses read (NIC, Mahalanobis; see DESIGN.md).
Deviation from ``export``: normalisation outside the graph is recorded (``"applied": "runtime"``) and done by the
runtime, because the graph is never rewritten beyond added outputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from abl_guard.guard.model import LOGITS_NAME, METADATA_KEY, MODEL_FORMAT
from abl_guard.guard.preprocess import InputContract

log = logging.getLogger(__name__)

PENULTIMATE = "penultimate"
#: how many real inputs (``check_data``) the parity check runs at most
CHECK_INPUTS = 64
#: ops a walk from the logits back to the last dense layer may pass through
_PASS_OPS = {"Add", "Sub", "Identity", "Flatten", "Reshape", "Squeeze", "Cast"}
_SOFTMAX_OPS = {"Softmax", "LogSoftmax"}
_ACTIVATIONS = ("softmax", "logsoftmax")
_FLOAT_TYPES = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16"}
_INPUT_DTYPES = {1: "float32", 10: "float16", 11: "float64", 2: "uint8"}


class AdoptError(ValueError):
    """The model cannot be adopted (not a single-input classifier, a tap that does not exist, a failed check)."""


@dataclass
class AdoptReport:
    """What :func:`adopt` wrote: the file, its outputs, the check's largest differences and the metadata."""

    path: Path
    outputs: list[str]
    taps: dict[str, str]
    parity: dict[str, float]
    batch: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class TapCandidate:
    """A float tensor of the graph that could be a tap (``--list-taps``)."""

    tensor: str
    node: str
    op: str
    shape: list[int | str | None]
    dtype: str
    role: str = ""


# ------------------------------------------------------------------------------------------------ graph helpers


def _load(path: str | os.PathLike) -> Any:
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 - protobuf decode errors have many types
        raise AdoptError(f"{path}: not a readable ONNX file ({type(e).__name__}: {e})") from None


def _constants(graph: Any) -> set[str]:
    names = {i.name for i in graph.initializer}
    names.update(n.output[0] for n in graph.node if n.op_type == "Constant" and n.output)
    return names


def _producers(graph: Any) -> dict[str, Any]:
    return {o: node for node in graph.node for o in node.output if o}


def _dims(value_info: Any) -> list[int | str | None] | None:
    """The shape of a tensor ValueInfo (int, symbolic name or None per axis), or None when not a tensor/unknown."""
    t = value_info.type
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.tensor_type.shape.dim]


def _infer(proto: Any) -> dict[str, Any]:
    """Tensor name -> ValueInfo for every tensor onnx shape inference can type (inputs, outputs, intermediates)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception as e:  # noqa: BLE001 - inference failing is not fatal: fewer shapes are known
        log.warning("onnx shape inference failed (%s); shapes come from onnxruntime only", e)
        inferred = proto
    g = inferred.graph
    return {v.name: v for v in (*g.input, *g.value_info, *g.output)}


def _real_inputs(graph: Any) -> list[Any]:
    inits = {i.name for i in graph.initializer}
    return [i for i in graph.input if i.name not in inits]


def tap_name(ref: str) -> str:
    """The output name a tap gets when only its tensor or node is given: the reference as an identifier."""
    name = re.sub(r"[^A-Za-z0-9_]+", "_", ref).strip("_")
    return name or "tap"


def _classifier_candidates(graph: Any, infos: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(graph output, probability/score tensor)`` pairs: 2-D float outputs, and ZipMap outputs via their input."""
    producers = _producers(graph)
    out = []
    for o in graph.output:
        node = producers.get(o.name)
        if node is not None and node.op_type == "ZipMap":
            out.append((o.name, node.input[0]))
            continue
        info = infos.get(o.name, o)
        dims = _dims(info)
        if dims is not None and len(dims) == 2 and info.type.tensor_type.elem_type in _FLOAT_TYPES:
            out.append((o.name, o.name))
    return out


def _describe_outputs(graph: Any, infos: Mapping[str, Any]) -> str:
    parts = []
    for o in graph.output:
        info = infos.get(o.name, o)
        t = info.type
        if t.HasField("tensor_type"):
            dtype = _FLOAT_TYPES.get(t.tensor_type.elem_type, f"elem_type {t.tensor_type.elem_type}")
            parts.append(f"{o.name} ({dtype} {_dims(info)})")
        else:
            parts.append(f"{o.name} ({t.WhichOneof('value')})")
    return ", ".join(parts) or "none"


def _walk_to_logits(graph: Any, scores: str) -> tuple[str, str]:
    """``(logits tensor, activation)``: the input of a final Softmax/LogSoftmax (through Identity), else ``scores``."""
    producers = _producers(graph)
    t = scores
    for _ in range(len(graph.node) + 1):
        node = producers.get(t)
        if node is None:
            break
        if node.op_type == "Identity":
            t = node.input[0]
            continue
        if node.op_type in _SOFTMAX_OPS:
            return node.input[0], node.op_type.lower()
        break
    return scores, "none"


def find_penultimate(graph: Any, logits: str) -> str | None:
    """The data input of the last Gemm/MatMul that produces ``logits`` (through bias Add, Flatten, Reshape, ...)."""
    producers, consts = _producers(graph), _constants(graph)
    t = logits
    for _ in range(len(graph.node) + 1):
        node = producers.get(t)
        if node is None:
            return None
        if node.op_type in ("Gemm", "MatMul"):
            data = [i for i in node.input[:2] if i and i not in consts]
            if len(data) != 1:
                return None
            if node.op_type == "Gemm":
                attrs = {a.name: a.i for a in node.attribute if a.name in ("transA",)}
                if attrs.get("transA", 0) or data[0] != node.input[0]:
                    return None
            return data[0]
        if node.op_type not in _PASS_OPS:
            return None
        data = [i for i in node.input if i and i not in consts]
        if len(data) != 1:
            return None
        t = data[0]
    return None


def _resolve(graph: Any, ref: str, tensors: set[str]) -> str:
    """A tap reference (tensor name, or node name for the node's first output) -> tensor name."""
    if ref in tensors:
        return ref
    for node in graph.node:
        if node.name == ref and node.output:
            return node.output[0]
    raise AdoptError(f"no tensor or node named {ref!r} in the graph; `abl-guard adopt MODEL --list-taps` lists them")


def _expose(proto: Any, tensor: str, name: str, infos: Mapping[str, Any]) -> None:
    """Make ``tensor`` a graph output called ``name``: an Identity ``tensor -> name`` placed right after its producer,
    and every node that read ``tensor`` reads ``name`` instead (so the graph computes exactly what it did)."""
    from onnx import helper

    g = proto.graph
    if any(o.name == name for o in g.output):
        return
    if name != tensor:
        node = helper.make_node("Identity", [tensor], [name], name=f"abl_guard/{name}")
        for n in g.node:
            for i, inp in enumerate(n.input):
                if inp == tensor:
                    n.input[i] = name
        producers = _producers(g)
        pos = 0
        if tensor in producers:
            pos = next(k for k, n in enumerate(g.node) if n is producers[tensor]) + 1
        g.node.insert(pos, node)
    info = infos.get(tensor)
    elem = info.type.tensor_type.elem_type if info is not None and info.type.HasField("tensor_type") else 1
    dims = _dims(info) if info is not None else None
    shape = None if dims is None else ["batch", *dims[1:]] if dims else []
    g.output.append(helper.make_tensor_value_info(name, elem, shape))


def _make_batch_dynamic(proto: Any) -> int | None:
    """Replace a fixed leading dimension of the input and of the outputs that share it by ``batch``; returns the
    fixed size it had (None when the batch axis was dynamic already)."""
    g = proto.graph
    dims = _real_inputs(g)[0].type.tensor_type.shape.dim
    if not dims or not dims[0].HasField("dim_value"):
        return None
    fixed = int(dims[0].dim_value)
    dims[0].dim_param = "batch"
    for o in g.output:
        if o.type.HasField("tensor_type") and o.type.tensor_type.HasField("shape"):
            od = o.type.tensor_type.shape.dim
            if od and od[0].HasField("dim_value") and od[0].dim_value == fixed:
                od[0].dim_param = "batch"
    del g.value_info[:]  # intermediate shapes may bake the batch in; onnxruntime re-infers them
    return fixed


# ------------------------------------------------------------------------------------------------ contract


def _graph_input(graph: Any) -> tuple[Any, str, list[int | str | None]]:
    """The graph's one real input, its dtype (float or uint8) and its dims."""
    inputs = _real_inputs(graph)
    if len(inputs) != 1:
        raise AdoptError(f"the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); abl-guard "
                         "guards single-input image classifiers")
    inp = inputs[0]
    if not inp.type.HasField("tensor_type"):
        raise AdoptError(f"input {inp.name!r} is not a tensor")
    elem = inp.type.tensor_type.elem_type
    if elem not in _INPUT_DTYPES:
        raise AdoptError(f"input {inp.name!r} has element type {elem}; images must be float or uint8")
    return inp, _INPUT_DTYPES[elem], _dims(inp) or []


def _layout(name: str, dims: Sequence[int | str | None], layout: str | None) -> str:
    """``layout`` checked against the input's rank, or read from it (rank 4: where the 1/3/4 channels sit)."""
    rank = len(dims)
    if layout is None:
        if rank == 2:
            layout = "flat"
        elif rank == 3:
            layout = "NHW"
        elif rank == 4:
            chan = {1, 3, 4}
            nchw, nhwc = dims[1] in chan and dims[3] not in chan, dims[3] in chan and dims[1] not in chan
            if nchw == nhwc:
                raise AdoptError(f"cannot tell the layout of input shape {list(dims)}; pass --layout NCHW or NHWC")
            layout = "NCHW" if nchw else "NHWC"
        else:
            raise AdoptError(f"input {name!r} has rank {rank}; expected an image batch (rank 2-4)")
    want_rank = {"NCHW": 4, "NHWC": 4, "NHW": 3, "flat": 2}.get(layout)
    if want_rank is None:
        raise AdoptError(f"layout must be NCHW, NHWC, NHW or flat, got {layout!r}")
    if rank and rank != want_rank:
        raise AdoptError(f"layout {layout} needs a rank-{want_rank} input, the graph's is {list(dims)}")
    return layout


def _image_shape(dims: Sequence[int | str | None], layout: str,
                 input_shape: Sequence[int] | None) -> tuple[int, int, int]:
    """(C, H, W): ``input_shape`` checked against the graph's fixed dims, or read from them."""
    if input_shape is None:
        fixed = [d for d in dims[1:] if isinstance(d, int) and d > 0]
        if layout == "flat" or not fixed or len(fixed) != len(dims) - 1:
            raise AdoptError(f"the graph does not fix the image size (input {list(dims)}, layout {layout}); pass "
                             "--input-shape C,H,W")
        return {"NCHW": lambda: (fixed[0], fixed[1], fixed[2]), "NHWC": lambda: (fixed[2], fixed[0], fixed[1]),
                "NHW": lambda: (1, fixed[0], fixed[1])}[layout]()
    c, h, w = (int(v) for v in input_shape)
    native = {"NCHW": [c, h, w], "NHWC": [h, w, c], "NHW": [h, w], "flat": [c * h * w]}[layout]
    for got, need in zip(dims[1:], native):
        if isinstance(got, int) and got > 0 and got != need:
            raise AdoptError(f"--input-shape {c},{h},{w} as {layout} is {native}; the graph takes {list(dims[1:])}")
    return c, h, w


def _value_range(dtype: str, value_range: Sequence[float] | None, mean: Sequence[float] | None,
                 std: Sequence[float] | None) -> tuple[float, float]:
    """The input's value range: 0..255 for uint8 (which takes no normalisation outside the graph), else given or
    [0, 1]."""
    if dtype == "uint8":
        if value_range is not None and tuple(map(float, value_range)) != (0.0, 255.0):
            raise AdoptError("a uint8 input takes values 0..255; --input-range does not apply")
        if mean is not None or std is not None:
            raise AdoptError("a uint8 input cannot be normalised outside the graph; --mean/--std do not apply")
        return (0.0, 255.0)
    if (mean is None) != (std is None):
        raise AdoptError("--mean and --std go together")
    return (0.0, 1.0) if value_range is None else (float(value_range[0]), float(value_range[1]))


def _input_contract(graph: Any, layout: str | None, input_shape: Sequence[int] | None,
                    value_range: Sequence[float] | None, mean: Sequence[float] | None,
                    std: Sequence[float] | None) -> InputContract:
    """What the graph's input takes (layout, size, dtype, range, normalisation outside the graph), from the graph
    where it says and the options where it does not."""
    inp, dtype, dims = _graph_input(graph)
    layout = _layout(inp.name, dims, layout)
    shape = _image_shape(dims, layout, input_shape)
    rng = _value_range(dtype, value_range, mean, std)
    try:
        return InputContract(shape, layout, dtype, rng, tuple(map(float, mean)) if mean is not None else None,
                             tuple(map(float, std)) if std is not None else None)
    except ValueError as e:
        raise AdoptError(str(e)) from None


# ------------------------------------------------------------------------------------------------ checks


def _session(path_or_bytes: str | bytes) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(path_or_bytes, sess_options=opts, providers=["CPUExecutionProvider"])


def _run_batched(sess: Any, names: Sequence[str], input_name: str, x: np.ndarray,
                 fixed: int | None) -> list[Any]:
    """Run ``x`` through ``sess`` (in chunks of ``fixed`` when the graph fixes the batch); outputs concatenated."""
    if not fixed or len(x) == fixed:
        return sess.run(list(names), {input_name: x})
    parts: list[list[Any]] = [[] for _ in names]
    for s in range(0, len(x), fixed):
        chunk = x[s : s + fixed]
        n = len(chunk)
        if n < fixed:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - n, axis=0)])
        for k, out in enumerate(sess.run(list(names), {input_name: chunk})):
            parts[k].append(out[:n])
    return [np.concatenate(p) if isinstance(p[0], np.ndarray) else [v for q in p for v in q] for p in parts]


def _difference(a: Any, b: Any) -> float:
    """Largest absolute difference between two outputs (inf when they differ in kind, shape or an exact value)."""
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        if a.shape != b.shape or a.dtype != b.dtype:
            return float("inf")
        if not np.issubdtype(a.dtype, np.floating):
            return 0.0 if np.array_equal(a, b) else float("inf")
        if a.size == 0:
            return 0.0
        both_nan = np.isnan(a) & np.isnan(b)
        diff = np.where(both_nan, 0.0, np.abs(a.astype(np.float64) - b.astype(np.float64)))
        return float(np.nan_to_num(diff, nan=np.inf).max())
    if isinstance(a, list) and isinstance(b, list):  # ZipMap: a list of {class: probability}
        if len(a) != len(b):
            return float("inf")
        worst = 0.0
        for x, y in zip(a, b):
            if not (isinstance(x, dict) and isinstance(y, dict)) or x.keys() != y.keys():
                return float("inf")
            worst = max([worst, *(abs(float(x[k]) - float(y[k])) for k in x)])
        return worst
    return 0.0 if a == b else float("inf")


def _random_inputs(contract: InputContract, n: int, seed: int) -> np.ndarray:
    """Canonical random images: uniform noise, plus flat grey and extreme images."""
    rng = np.random.default_rng(seed)
    c, h, w = contract.shape
    x = rng.random((n, c, h, w), dtype=np.float32)
    if n >= 3:
        x[0], x[1], x[2] = 0.0, 1.0, 0.5
    return x


def _check(original: bytes, adopted: bytes, contract: InputContract, input_name: str,
           model_outputs: Sequence[str], taps: Sequence[str], probs: str | None, activation: str,
           orig_fixed: int | None, new_fixed: int | None, real: np.ndarray | None, atol: float, rtol: float,
           seed: int) -> dict[str, float]:
    """Run both graphs on the same inputs: every original output must match, softmax(logits) must reproduce a
    softmax output ``probs``, and logits and taps must have one row per input. Returns the largest differences."""
    orig, new = _session(original), _session(adopted)
    batches = [_random_inputs(contract, 5 if not new_fixed else new_fixed + 1, seed)]
    if real is not None and len(real):
        batches.append(np.ascontiguousarray(real, dtype=np.float32))
    worst: dict[str, float] = {n: 0.0 for n in model_outputs}
    names = [*model_outputs, LOGITS_NAME, *taps]
    for x in batches:
        native = contract.to_native(x)
        want = _run_batched(orig, model_outputs, input_name, native, orig_fixed)
        got = _run_batched(new, names, input_name, native, new_fixed)
        for name, a, b in zip(model_outputs, want, got):
            d = _difference(a, b)
            floats = isinstance(a, np.ndarray) and a.size and np.issubdtype(a.dtype, np.floating)
            scale = float(np.nanmax(np.abs(np.where(np.isfinite(a), a, 0)))) if floats else 0.0
            if not d <= atol + rtol * scale:
                raise AdoptError(f"output {name!r} changed after adoption (max |diff| {d:.3g}); refusing to write "
                                 "a model that does not compute what the original did")
            worst[name] = max(worst[name], d)
        outs = dict(zip(names, got))
        logits = outs[LOGITS_NAME]
        if not isinstance(logits, np.ndarray) or logits.ndim != 2 or logits.shape[0] != len(x):
            raise AdoptError(f"logits have shape {getattr(logits, 'shape', None)} for {len(x)} inputs; expected "
                             f"({len(x)}, classes)")
        for t in taps:
            arr = outs[t]
            if not isinstance(arr, np.ndarray) or arr.ndim < 2 or arr.shape[0] != len(x):
                raise AdoptError(f"tap {t!r} has shape {getattr(arr, 'shape', None)} for {len(x)} inputs; a tap "
                                 "needs one row per input")
        if probs is not None and activation in _ACTIVATIONS:
            z = logits.astype(np.float64)
            z = z - z.max(axis=1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
            want_p = np.asarray(outs[probs], np.float64)
            d = float(np.abs((logp if activation == "logsoftmax" else np.exp(logp)) - want_p).max())
            if not d <= 1e-4:
                raise AdoptError(f"{activation}(logits) differs from output {probs!r} by {d:.3g}; the logits adopt "
                                 "found are not what the classifier output is computed from")
            worst["softmax(logits)"] = max(worst.get("softmax(logits)", 0.0), d)
    return worst


def _zipmap_classes(graph: Any) -> list[str] | None:
    """Class labels a ZipMap node carries (scikit-learn converters): the default class names."""
    for node in graph.node:
        if node.op_type == "ZipMap":
            for a in node.attribute:
                if a.name == "classlabels_int64s" and a.ints:
                    return [str(v) for v in a.ints]
                if a.name == "classlabels_strings" and a.strings:
                    return [v.decode() for v in a.strings]
    return None


def _write(dst: Path, data: bytes) -> None:
    """Write atomically: a temporary file beside ``dst``, then rename."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------------ adopt's steps


@dataclass
class _Plan:
    """What :func:`adopt` found in the graph: its input, the classifier output and its logits, the taps."""

    contract: InputContract
    input_name: str
    classifier_output: str
    scores: str  # the classifier output's float scores (the ZipMap's input when it has one)
    logits: str
    activation: str
    model_outputs: list[str]
    taps: dict[str, str]  # tap name -> tensor


@dataclass
class _Tolerance:
    """How the parity check runs: the real inputs it adds to the random ones, its tolerances and seed."""

    real: np.ndarray | None
    atol: float
    rtol: float
    seed: int


def _read_source(src: Path, dst: Path, overwrite: bool) -> tuple[bytes, Any]:
    """The original file's bytes and its parsed graph, refusing an existing output and an adopted source."""
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --force to replace it")
    if dst.resolve() == src.resolve():
        raise AdoptError("the output must be a new file; the original stays as it is")
    original_bytes = src.read_bytes()
    proto = _load(src)
    if any(p.key == METADATA_KEY for p in proto.metadata_props):
        raise AdoptError(f"{src} already carries abl-guard metadata; calibrate it directly")
    return original_bytes, proto


def _with_check_data(check_inputs: np.ndarray | None, check_data: Sequence[str | os.PathLike] | None,
                     contract: InputContract) -> np.ndarray | None:
    """``check_inputs`` plus the first :data:`CHECK_INPUTS` readable inputs of ``check_data`` (read like scan)."""
    if not check_data:
        return check_inputs
    from abl_guard.guard.labelled import read_calibration_data

    real = read_calibration_data(check_data, contract.shape, ["0", "1"], count=CHECK_INPUTS,
                                 labels="predicted").images
    if not len(real):
        raise AdoptError(f"no readable inputs in {', '.join(map(str, check_data))} for the check")
    return real if check_inputs is None else np.concatenate([check_inputs, real])


def _choose_classifier(graph: Any, infos: Mapping[str, Any], output: str | None) -> tuple[str, str]:
    """``(classifier output, its float scores)``: the one named ``output``, else the first candidate."""
    cands = _classifier_candidates(graph, infos)
    if output is not None:
        cands = [c for c in cands if c[0] == output]
        if not cands:
            raise AdoptError(f"output {output!r} is not a 2-D float (or ZipMap) output; outputs: "
                             f"{_describe_outputs(graph, infos)}")
    if not cands:
        raise AdoptError(f"no 2-D float output, so not a classifier abl-guard can guard; outputs: "
                         f"{_describe_outputs(graph, infos)}")
    if len(cands) > 1:
        log.warning("several classifier outputs (%s); using %s (choose with --output)",
                    ", ".join(c[0] for c in cands), cands[0][0])
    return cands[0]


def _choose_taps(graph: Any, logits: str, tensors: set[str], taps: Mapping[str, str] | None,
                 penultimate: str | None) -> dict[str, str]:
    """Tap name -> tensor: the penultimate features (found, or ``penultimate``) and the ``taps`` asked for."""
    tap_map: dict[str, str] = {}
    pen = penultimate or find_penultimate(graph, logits)
    if pen is not None:
        tap_map[PENULTIMATE] = _resolve(graph, pen, tensors)
    for name, ref in (taps or {}).items():
        if name in tap_map and penultimate is None and name == PENULTIMATE:
            log.info("tap %s given explicitly; replaces the automatic choice %s", name, tap_map[name])
        tap_map[name] = _resolve(graph, ref, tensors)
    if PENULTIMATE not in tap_map:
        raise AdoptError("cannot find the penultimate features (no Gemm/MatMul before the logits); name them with "
                         "--tap penultimate=TENSOR (`--list-taps` lists the tensors)")
    for name in (LOGITS_NAME, *tap_map):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", name):
            raise AdoptError(f"tap name {name!r} must be a plain identifier")
    if len({LOGITS_NAME, *tap_map}) != len(tap_map) + 1:
        raise AdoptError(f"a tap cannot be called {LOGITS_NAME!r}")
    return tap_map


def _plan(proto: Any, contract: InputContract, output: str | None, taps: Mapping[str, str] | None,
          penultimate: str | None) -> _Plan:
    """Find the classifier, its logits and the taps, and expose logits and taps as graph outputs (in place)."""
    g = proto.graph
    infos = _infer(proto)
    tensors = set(_producers(g)) | {i.name for i in g.input} | {i.name for i in g.initializer}
    classifier_output, scores = _choose_classifier(g, infos, output)
    logits, activation = _walk_to_logits(g, scores)
    model_outputs = [o.name for o in g.output]
    tap_map = _choose_taps(g, logits, tensors, taps, penultimate)
    exposures = [(logits, LOGITS_NAME), *((t, n) for n, t in tap_map.items())]
    for tensor, name in exposures:
        if name != tensor and (name in tensors or name in model_outputs):
            raise AdoptError(f"the graph already has a tensor named {name!r} that is not the {name} adopt chose "
                             f"({tensor!r}); rename the tap (--tap OTHER=TENSOR)")
    for tensor, name in exposures:
        _expose(proto, tensor, name, infos)
    return _Plan(contract, _real_inputs(g)[0].name, classifier_output, scores, logits, activation, model_outputs,
                 tap_map)


def _metadata(proto: Any, src: Path, original_bytes: bytes, plan: _Plan,
              class_names: Sequence[str] | None) -> dict[str, Any]:
    """The ``abl_guard`` metadata (class names may still be empty: :func:`_probe_classes` fills them in)."""
    names = [str(n) for n in class_names] if class_names is not None else _zipmap_classes(proto.graph)
    return {
        "format": MODEL_FORMAT,
        "input_name": plan.input_name,
        **plan.contract.to_metadata(),
        "class_names": list(names or []),
        "outputs": [LOGITS_NAME, *plan.taps],
        "taps": {name: {"tensor": tensor} for name, tensor in plan.taps.items()},
        "model_outputs": plan.model_outputs,
        "classifier_output": plan.classifier_output,
        "output_activation": plan.activation,
        "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
        "adopted": {"source_file": src.name, "source_sha256": hashlib.sha256(original_bytes).hexdigest(),
                    "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
                    "logits_tensor": plan.logits},
    }


def _serialise(model: Any, meta: Mapping[str, Any], extra: Mapping[str, Any]) -> bytes:
    """``model``'s bytes with ``meta`` (+ ``extra``) as its only ``abl_guard`` metadata entry (``model`` is edited)."""
    for p in list(model.metadata_props):
        if p.key == METADATA_KEY:
            model.metadata_props.remove(p)
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps({**meta, **extra})
    return model.SerializeToString()


def _probe_classes(surgery: Any, meta: dict[str, Any], plan: _Plan, fixed: int | None, seed: int) -> None:
    """Run the model once: it must run on what the contract feeds and give ``(N, classes >= 2)`` logits; class
    names default to the class indices (set in ``meta``)."""
    contract = plan.contract
    try:
        probe = _session(_serialise(surgery, meta, {}))
        x = contract.to_native(_random_inputs(contract, fixed or 2, seed))
        z = probe.run([LOGITS_NAME], {plan.input_name: x})[0]
    except Exception as e:  # noqa: BLE001 - onnxruntime errors: the graph does not run on what the contract feeds
        raise AdoptError(f"the model does not run on inputs of the contract ({contract.layout} {contract.dtype} "
                         f"{contract.native_shape()}): {str(e).splitlines()[0][:300]}") from None
    num_classes = int(z.shape[1]) if z.ndim == 2 else 0
    if num_classes < 2:
        raise AdoptError(f"the logits have shape {z.shape}; a classifier needs (N, classes >= 2)")
    if not meta["class_names"]:
        meta["class_names"] = [str(i) for i in range(num_classes)]
    if len(meta["class_names"]) != num_classes:
        raise AdoptError(f"{len(meta['class_names'])} class names for a model with {num_classes} classes")


def _checked_model(original_bytes: bytes, surgery: Any, dynamic: Any, meta: Mapping[str, Any], plan: _Plan,
                   fixed: int | None, tol: _Tolerance) -> tuple[bytes, dict[str, float], str, dict[str, Any]]:
    """The adopted model's bytes once the parity check passes: with a dynamic batch when it works, else (a graph
    that bakes its batch into a shape) with the file's fixed batch. Returns ``(bytes, parity, batch, extra)``."""
    probs = plan.classifier_output if plan.classifier_output == plan.scores else None

    def check(data: bytes, new_fixed: int | None) -> dict[str, float]:
        return _check(original_bytes, data, plan.contract, plan.input_name, plan.model_outputs, list(plan.taps),
                      probs, plan.activation, fixed, new_fixed, tol.real, tol.atol, tol.rtol, tol.seed)

    try:
        data = _serialise(dynamic, meta, {})
        parity = check(data, None)
        return data, parity, "dynamic" if fixed is None else f"made dynamic (the file fixed it at {fixed})", {}
    except Exception as e:  # noqa: BLE001 - a graph baking the batch into a shape fails at run time or differs
        if fixed is None:
            if isinstance(e, AdoptError):
                raise
            raise AdoptError(f"the adopted model fails to run: {str(e).splitlines()[0][:300]}") from None
        reason = str(e).splitlines()[0][:200]
    log.warning("the graph fixes the batch at %d and fails with another batch size (%s); keeping it fixed "
                "(the runtime pads the last chunk)", fixed, reason)
    extra = {"fixed_batch": fixed}
    data = _serialise(surgery, meta, extra)
    return data, check(data, fixed), f"fixed at {fixed} (with another batch size: {reason})", extra


# ------------------------------------------------------------------------------------------------ public API


def list_taps(path: str | os.PathLike) -> list[TapCandidate]:
    """Every float tensor of the graph with its producing node and (inferred) shape — the candidate taps — with the
    logits and penultimate features adopt would pick marked in ``role``."""
    proto = _load(path)
    g = proto.graph
    infos = _infer(proto)
    roles: dict[str, str] = {}
    cands = _classifier_candidates(g, infos)
    if cands:
        logits, _ = _walk_to_logits(g, cands[0][1])
        roles[logits] = "logits"
        pen = find_penultimate(g, logits)
        if pen:
            roles[pen] = PENULTIMATE
    out = []
    for node in g.node:
        for t in node.output:
            info = infos.get(t)
            if not t or info is None or not info.type.HasField("tensor_type"):
                continue
            elem = info.type.tensor_type.elem_type
            if elem not in _FLOAT_TYPES:
                continue
            out.append(TapCandidate(t, node.name, node.op_type, _dims(info) or [], _FLOAT_TYPES[elem],
                                    roles.get(t, "")))
    return out


def adopt(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    taps: Mapping[str, str] | None = None,
    penultimate: str | None = None,
    output: str | None = None,
    layout: str | None = None,
    input_shape: Sequence[int] | None = None,
    value_range: Sequence[float] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
    check_inputs: np.ndarray | None = None,
    check_data: Sequence[str | os.PathLike] | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    overwrite: bool = False,
    seed: int = 0,
) -> AdoptReport:
    """Write ``dst``: ``src`` with ``logits``, ``penultimate`` and ``taps`` as extra outputs and the guard's metadata.

    ``taps`` maps output names to tensor or node names; ``penultimate`` overrides the automatic choice. ``output``
    names the classifier output when the graph has several 2-D float outputs. ``layout`` / ``input_shape`` (C, H, W)
    / ``value_range`` / ``mean`` / ``std`` describe what the graph takes (read from the graph where it says); mean
    and std are on the value-range scale and applied by the runtime. ``check_inputs`` are real canonical images
    (float NCHW [0, 1]) for the parity check; ``check_data`` are paths read like ``scan`` reads them (the first
    :data:`CHECK_INPUTS` readable inputs are used). Tolerances: an original float output may differ by ``atol + rtol *
    max|output|`` (graph optimisations may fuse differently once intermediates are outputs); other outputs exactly.
    Raises :class:`AdoptError` with a one-line reason.
    """
    import onnx

    src, dst = Path(src), Path(dst)
    original_bytes, proto = _read_source(src, dst, overwrite)
    contract = _input_contract(proto.graph, layout, input_shape, value_range, mean, std)
    check_inputs = _with_check_data(check_inputs, check_data, contract)
    plan = _plan(proto, contract, output, taps, penultimate)
    meta = _metadata(proto, src, original_bytes, plan, class_names)
    surgery = proto  # the graph with the added outputs, batch as in the file
    dynamic = onnx.ModelProto()
    dynamic.CopyFrom(surgery)
    fixed = _make_batch_dynamic(dynamic)
    try:
        onnx.checker.check_model(dynamic)
    except Exception as e:  # noqa: BLE001 - the checker raises several types
        raise AdoptError(f"the adopted graph does not validate: {str(e).splitlines()[0]}") from None
    _probe_classes(surgery, meta, plan, fixed, seed)
    data, parity, batch, extra = _checked_model(original_bytes, surgery, dynamic, meta, plan, fixed,
                                                _Tolerance(check_inputs, atol, rtol, seed))
    _write(dst, data)
    log.info("adopted %s -> %s (logits %s, taps %s; batch %s)", src, dst, plan.logits, plan.taps, batch)
    return AdoptReport(dst, [LOGITS_NAME, *plan.taps], dict(plan.taps), parity, batch, {**meta, **extra})
