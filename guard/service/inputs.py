"""Request bodies -> validated model inputs, through the same decoding code as ``abl-guard scan``.

A body is raw image bytes (``image/png``, ``image/jpeg``, ...: one input), ``application/x-npy`` (one image or a
batch; header checked against the body size and read with ``allow_pickle=False``), ``application/json``
(``{"inputs": [{"image": "<base64>", "id": ...}, ...]}``, a ``data:`` URL is fine) or ``multipart/form-data`` (one
input per file part; ``.npy`` parts may hold a batch); ``application/octet-stream`` is read as ``.npy`` when it starts
with the ``.npy`` magic, else as an image. Images go through :func:`guard.sources.decode_image` (PIL, the scan's
formats, pixel count checked from the header, converted and resized to the model's input like a scanned folder);
arrays through :func:`guard.preprocess.to_model_input`. Multipart bodies are parsed in memory (the body is already
size-bounded), never spooled to disk.

Anything wrong raises :class:`RequestError` carrying the HTTP status, a metrics reason and a one-line message; a
request with one bad input is refused whole, naming the input.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..preprocess import InputError, to_model_input
from ..sources import SourceError, b64_image_bytes, decode_image, read_npy_header, unreadable_image

NPY_MAGIC = b"\x93NUMPY"
NPY_TYPES = ("application/x-npy", "application/npy")


_BUFFER_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


class RequestError(Exception):
    """A request the service refuses: ``status`` (4xx/5xx), ``reason`` (a metrics label) and a one-line message."""

    def __init__(self, status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        text = _BUFFER_REPR.sub("the data", " ".join(str(message).split()))
        self.status, self.reason, self.message = status, reason, text[:500]
        self.headers = headers or {}


@dataclass
class Limits:
    max_inputs: int = 256
    max_pixels: int = 4096 * 4096


@dataclass
class Inputs:
    """Validated inputs of one request: float32 ``(N, C, H, W)`` in [0, 1], their ids and which were resized."""

    x: np.ndarray
    ids: list[str]
    resized: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def decode_one_image(data: bytes, input_shape: Sequence[int], limits: Limits, what: str) -> tuple[np.ndarray, bool]:
    """An encoded image -> float32 ``(C, H, W)``; refuses undecodable images and too many pixels (checked by
    :func:`~guard.sources.decode_image` from the header, before any pixel is decoded)."""
    if not data:
        raise RequestError(400, "undecodable_image", f"{what}: empty image")
    try:
        return decode_image(data, input_shape, max_pixels=limits.max_pixels)
    except SourceError as e:
        if str(e).startswith("image too large"):
            raise RequestError(413, "too_many_pixels", f"{what}: {e}") from e
        raise RequestError(400, "undecodable_image", f"{what}: {e}") from e
    except InputError as e:
        raise RequestError(422, "invalid_input", f"{what}: {e}") from e
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for undecodable data
        raise RequestError(400, "undecodable_image", f"{what}: {unreadable_image(e)}") from e


_NPY_HEADERS: dict[bytes, tuple[tuple[int, ...], bool, np.dtype]] = {}  # header text -> parsed (bounded)


def _npy_header(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """``(shape, fortran_order, dtype, data offset)`` of an ``.npy`` payload. numpy parses the header text with
    ``ast.literal_eval``, the costliest step of a small request, so parsed headers are remembered (at most 256):
    clients send the same shape again and again."""
    if len(data) < 10 or not data.startswith(NPY_MAGIC):
        raise ValueError("no .npy magic string")
    major = data[6]
    if major == 1:
        end = 10 + int.from_bytes(data[8:10], "little")
    elif major == 2:
        end = 12 + int.from_bytes(data[8:12], "little")
    else:
        raise ValueError(f"unsupported .npy format version {major}")
    if end > len(data):
        raise ValueError("truncated .npy header")
    key = data[:end]
    hit = _NPY_HEADERS.get(key)
    if hit is None:
        hit = read_npy_header(io.BytesIO(key))[:3]
        if len(_NPY_HEADERS) >= 256:
            _NPY_HEADERS.clear()
        _NPY_HEADERS[key] = hit
    shape, fortran, dtype = hit
    return tuple(shape), bool(fortran), dtype, end


def decode_npy(data: bytes, input_shape: Sequence[int], what: str) -> np.ndarray:
    """An ``.npy`` payload -> float32 ``(N, C, H, W)``. The header's shape and dtype must account for the body
    exactly before anything is allocated, and object arrays are refused by the header reader (what
    ``np.load(allow_pickle=False)`` refuses); the data is then viewed in place with ``np.frombuffer``, never
    unpickled."""
    try:
        shape, fortran, dtype, offset = _npy_header(data)
    except Exception as e:  # noqa: BLE001 - numpy raises ValueError, SyntaxError, ... on bad headers
        raise RequestError(400, "malformed_npy", f"{what}: not a readable .npy payload: {e}") from e
    count = math.prod(shape)  # Python integers: a forged header cannot overflow into a matching size
    if len(data) - offset != count * dtype.itemsize:
        raise RequestError(400, "malformed_npy", f"{what}: the .npy header declares {shape} {dtype} "
                                                 f"({count * dtype.itemsize} bytes) but the payload holds "
                                                 f"{len(data) - offset}")
    arr = np.frombuffer(data, dtype, count, offset).reshape(shape, order="F" if fortran else "C")
    try:
        return to_model_input(arr, input_shape)
    except InputError as e:
        raise RequestError(422, "invalid_input", f"{what}: {e}") from e


def _check_count(n: int, limits: Limits) -> None:
    if n > limits.max_inputs:
        raise RequestError(413, "too_many_inputs", f"{n} inputs in one request exceed the limit of "
                                                   f"{limits.max_inputs} (--max-inputs)")


def _one_part(data: bytes, ctype: str, name: str, input_shape: Sequence[int],
              limits: Limits) -> tuple[np.ndarray, list[str], list[bool]]:
    """A body or a multipart part holding one image or one ``.npy`` array -> ``(x, ids, resized)``."""
    if ctype in NPY_TYPES or (ctype in ("", "application/octet-stream") and data.startswith(NPY_MAGIC)):
        x = decode_npy(data, input_shape, f"input {name!r}")
        return x, [name] if len(x) == 1 else [f"{name}#{i}" for i in range(len(x))], [False] * len(x)
    if ctype.startswith("image/") or ctype in ("", "application/octet-stream"):
        x1, resized = decode_one_image(data, input_shape, limits, f"input {name!r}")
        return x1[None], [name], [resized]
    raise RequestError(415, "unsupported_media_type", f"input {name!r}: content type {ctype!r} is neither an image nor "
                                                      "application/x-npy")


def _from_json(body: bytes, input_shape: Sequence[int], limits: Limits) -> Inputs:
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting too deep
        raise RequestError(400, "bad_json", f"invalid JSON: {type(e).__name__}: {e}") from e
    if isinstance(obj, dict) and "inputs" not in obj and "image" in obj:
        obj = {"inputs": [obj]}
    if not isinstance(obj, dict) or not isinstance(obj.get("inputs"), list):
        raise RequestError(400, "bad_json", 'expected {"inputs": [{"image": "<base64>", "id": ...}, ...]}')
    items = obj["inputs"]
    if not items:
        raise RequestError(400, "no_inputs", "the request holds no inputs")
    _check_count(len(items), limits)
    xs, ids, resized = [], [], []
    for i, it in enumerate(items):
        if not isinstance(it, dict) or not isinstance(it.get("image"), str):
            raise RequestError(400, "bad_json", f'input {i}: expected an object with an "image" base64 string')
        iid = str(it["id"]) if it.get("id") is not None else str(i)
        try:
            raw = b64_image_bytes(it["image"])
        except ValueError as e:
            raise RequestError(400, "bad_base64", f"input {i} ({iid!r}): invalid base64: {e}") from e
        x, r = decode_one_image(raw, input_shape, limits, f"input {i} ({iid!r})")
        xs.append(x)
        ids.append(iid)
        resized.append(r)
    return Inputs(np.stack(xs), ids, resized)


def _parse_multipart(body: bytes, content_type: str, max_parts: int) -> list[tuple[str, str, bytes]]:
    """``(name, content type, data)`` per part, parsed in memory with python-multipart's streaming parser."""
    from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise RequestError(400, "bad_multipart", "multipart/form-data without a boundary")
    parts: list[dict[str, Any]] = []
    cur: dict[str, Any] = {}

    def on_part_begin() -> None:
        if len(parts) >= max_parts:
            raise RequestError(413, "too_many_inputs", f"more than {max_parts} parts in one request (--max-inputs)")
        cur.clear()
        cur.update(headers={}, field=b"", value=b"", data=[])

    def on_header_field(data: bytes, start: int, end: int) -> None:
        cur["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        cur["value"] += data[start:end]

    def on_header_end() -> None:
        cur["headers"][cur["field"].decode("latin-1").lower()] = cur["value"].decode("latin-1")
        cur["field"], cur["value"] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        cur["data"].append(data[start:end])

    def on_part_end() -> None:
        _, disp = parse_options_header(cur["headers"].get("content-disposition", ""))
        name = (disp.get(b"filename") or disp.get(b"name") or str(len(parts)).encode()).decode("utf-8", "replace")
        parts.append({"name": name, "type": media_type(cur["headers"].get("content-type")),
                      "data": b"".join(cur["data"])})

    callbacks = {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                 "on_header_value": on_header_value, "on_header_end": on_header_end, "on_part_data": on_part_data,
                 "on_part_end": on_part_end}
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except MultipartParseError as e:
        raise RequestError(400, "bad_multipart", f"malformed multipart body: {e}") from e
    return [(p["name"], p["type"], p["data"]) for p in parts]


def _from_multipart(body: bytes, content_type: str, input_shape: Sequence[int], limits: Limits) -> Inputs:
    parts = _parse_multipart(body, content_type, limits.max_inputs)
    if not parts:
        raise RequestError(400, "no_inputs", "the multipart body holds no parts")
    xs, ids, resized = [], [], []
    for i, (name, ctype, data) in enumerate(parts):
        x, pid, r = _one_part(data, ctype, name or str(i), input_shape, limits)
        xs.append(x)
        ids += pid
        resized += r
        _check_count(len(ids), limits)
    return Inputs(np.concatenate(xs), ids, resized)


def parse_inputs(body: bytes, content_type: str | None, input_shape: Sequence[int], limits: Limits,
                 input_id: str | None = None) -> Inputs:
    """Validated inputs of a request body; ``input_id`` names a single raw image or array (``X-Input-ID``)."""
    ctype = media_type(content_type)
    if not body:
        raise RequestError(400, "no_inputs", "empty request body")
    if ctype == "application/json":
        return _from_json(body, input_shape, limits)
    if ctype == "multipart/form-data":
        return _from_multipart(body, content_type or "", input_shape, limits)
    if ctype.startswith("image/") or ctype in NPY_TYPES or ctype == "application/octet-stream":
        x, ids, resized = _one_part(body, ctype, input_id or "0", input_shape, limits)
        if len(ids) > 1 and input_id is None:
            ids = [str(i) for i in range(len(ids))]
        _check_count(len(ids), limits)
        return Inputs(x, ids, resized)
    raise RequestError(415, "unsupported_media_type",
                       f"content type {ctype or '(none)'!r} is not accepted; send image/*, application/x-npy, "
                       "application/json or multipart/form-data")
