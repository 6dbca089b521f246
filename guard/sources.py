"""Input sources for scanning: image folders and files, ``.npy`` / ``.npz`` arrays, JSONL streams (``-`` = stdin).

Every input becomes an :class:`InputItem` holding either the model-ready image or the reason it could not be read;
a source never silently drops an input and never stops at a bad one. Memory does not grow with the number of inputs:
folders are walked directory by directory, ``.npy`` files are memory-mapped, ``.npz`` members are streamed row
block by row block out of the zip, and JSONL is read line by line.

Ids (what a verdict record is keyed by, and what ``--resume`` matches): the file path for image files,
``PATH#ROW`` for array rows, and for JSONL lines the line's ``"id"`` field or ``PATH:LINE`` (``-:LINE`` for stdin).
``source`` says where to re-read an input (the report's thumbnails): the image path, ``PATH#ROW`` or ``PATH:LINE``.

JSONL lines are objects with ``"path"`` (an image file; relative paths are taken from the JSONL file's directory, or
the working directory for stdin) or ``"image"`` (base64 of an encoded PNG/JPEG/..., a ``data:`` URL is fine), and
optionally ``"id"``; a line that is just a JSON string is a path.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import logging
import os
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from .preprocess import InputError, pil_to_array, to_model_input

log = logging.getLogger(__name__)

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
ARRAY_EXTS = {".npy", ".npz"}
JSONL_EXTS = {".jsonl", ".ndjson"}
NPZ_KEYS = ("images", "x", "inputs")
STDIN = "-"

Skip = Callable[[str], bool]


@dataclass
class InputItem:
    """``image`` is float32 ``(C, H, W)`` in [0, 1] when readable; otherwise ``error`` says why."""

    id: str
    image: np.ndarray | None = None
    error: str | None = None
    resized: bool = False
    source: str | None = None


def _never(_id: str) -> bool:
    return False


def decode_image(data: bytes | str | os.PathLike, input_shape: Sequence[int]) -> tuple[np.ndarray, bool]:
    """An encoded image (bytes or a path) -> float32 ``(C, H, W)`` in the model's spec; returns ``(x, resized)``."""
    from PIL import Image

    src = io.BytesIO(data) if isinstance(data, bytes) else data
    with Image.open(src) as img:
        img.load()
        arr, resized = pil_to_array(img, input_shape)
    return to_model_input(arr[None], input_shape)[0], resized


def _image_item(path: Path, input_shape: Sequence[int], item_id: str | None = None) -> InputItem:
    iid = item_id or str(path)
    try:
        x, resized = decode_image(path, input_shape)
        return InputItem(iid, x, resized=resized, source=str(path))
    except FileNotFoundError:
        return InputItem(iid, error=f"no such file: {path}", source=str(path))
    except Exception as e:  # noqa: BLE001 - PIL raises many types; every input still gets an answer
        return InputItem(iid, error=f"unreadable image: {type(e).__name__}: {e}", source=str(path))


# ------------------------------------------------------------------------------------------------ arrays


def _npz_rows(path: Path) -> tuple[str, _ArrayStream]:
    """Choose the images member of an ``.npz`` and return ``(key, stream)``."""
    with np.load(path, allow_pickle=False) as z:
        files = list(z.files)
    key = next((k for k in NPZ_KEYS if k in files), None)
    if key is None and len(files) == 1:
        key = files[0]
    if key is None:
        raise ValueError(f"no 'images' array among {files}")
    zf = zipfile.ZipFile(path)
    try:
        return key, _ArrayStream(zf.open(f"{key}.npy"), zf, lambda: _load_npz_member(path, key))
    except BaseException:
        zf.close()
        raise


def _load_npz_member(path: Path, key: str) -> np.ndarray:
    with np.load(path, allow_pickle=False) as z:
        return z[key]


class _ArrayStream:
    """Row blocks of a ``.npy`` stream (a file, or a member of an ``.npz`` zip) read front to back with plain reads:
    neither loaded whole nor memory-mapped, so memory stays at one block (mapped pages would count towards the
    process's resident memory as a scan touches them). Fortran-order arrays are loaded whole (``load_all``)."""

    def __init__(self, fp: IO[bytes], owner: Any = None, load_all: Callable[[], np.ndarray] | None = None) -> None:
        self._fp, self._owner = fp, owner
        try:
            version = np.lib.format.read_magic(fp)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
        except BaseException:
            self.close()
            raise
        if dtype.hasobject:
            self.close()
            raise ValueError("object arrays are never loaded (they would need pickle)")
        self.shape, self.dtype, self.ndim = tuple(shape), dtype, len(shape)
        self._row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        self._full = None
        if fortran and len(shape) > 1:
            self.close()
            if load_all is None:
                raise ValueError("Fortran-order array cannot be streamed")
            self._full = load_all()

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 0

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` — fewer when the data is truncated; sequential calls only."""
        if self._full is not None:
            return self._full[start:stop]
        row_bytes = self._row * self.dtype.itemsize
        raw = self._fp.read((stop - start) * row_bytes)
        got = len(raw) // row_bytes  # a truncated file yields its complete rows only
        return np.frombuffer(raw[: got * row_bytes], self.dtype).reshape((got, *self.shape[1:]))

    def close(self) -> None:
        self._fp.close()
        if self._owner is not None:
            self._owner.close()


def _rows_to_items(ids: Sequence[str], chunk: np.ndarray, input_shape: Sequence[int]) -> Iterator[InputItem]:
    try:
        xs = to_model_input(chunk, input_shape)
        if len(xs) != len(ids):  # e.g. rows that together look like one image
            raise InputError(f"rows of shape {chunk.shape[1:]} do not fit the model")
        for iid, x in zip(ids, xs):
            yield InputItem(iid, x, source=iid)
    except InputError:
        for j, iid in enumerate(ids):  # find which rows are bad, keep the good ones
            try:
                x = to_model_input(chunk[j : j + 1], input_shape)
                if len(x) != 1:
                    raise InputError(f"row of shape {chunk.shape[1:]} does not fit the model") from None
                yield InputItem(iid, x[0], source=iid)
            except InputError as e:
                yield InputItem(iid, error=f"invalid input: {e}", source=iid)


def _is_one_image(shape: tuple[int, ...], input_shape: Sequence[int]) -> bool:
    c, h, w = (int(v) for v in input_shape)
    return shape in ((h, w, c), (c, h, w)) or (c == 1 and shape == (h, w))


def _array_items(path: Path, input_shape: Sequence[int], skip: Skip, batch: int = 1024) -> Iterator[InputItem]:
    member = None
    try:
        if path.suffix.lower() == ".npy":
            fp = open(path, "rb")  # noqa: SIM115 - the stream owns and closes it
            member = _ArrayStream(fp, None, lambda: np.load(path, mmap_mode="r", allow_pickle=False))
        else:
            _, member = _npz_rows(path)
        n, ndim, read = len(member), member.ndim, member.read
    except FileNotFoundError:
        yield InputItem(str(path), error=f"no such file: {path}", source=str(path))
        return
    except Exception as e:  # noqa: BLE001 - corrupt headers, pickled arrays, bad zips: one error record
        yield InputItem(str(path), error=f"unreadable array file: {type(e).__name__}: {e}", source=str(path))
        return
    try:
        if ndim in (2, 3) and _is_one_image(member.shape, input_shape):
            if not skip(str(path)):  # the file holds a single image
                try:
                    yield InputItem(str(path), to_model_input(read(0, n), input_shape)[0], source=str(path))
                except InputError as e:
                    yield InputItem(str(path), error=f"invalid input: {e}", source=str(path))
            return
        if ndim < 3:
            yield InputItem(str(path), error=f"array of {ndim} dimensions holds no images "
                                             f"(expected (N, H, W[, C]) or (N, C, H, W))", source=str(path))
            return
        for start in range(0, n, batch):
            stop = min(start + batch, n)
            ids = [f"{path}#{i}" for i in range(start, stop)]
            todo = [i for i, iid in enumerate(ids) if not skip(iid)]
            try:
                chunk = read(start, stop)  # the stream is sequential: rows are read even when all are skipped
            except Exception as e:  # noqa: BLE001 - an unreadable file: every remaining row gets the reason
                chunk, reason = None, f"unreadable array rows: {type(e).__name__}: {e}"
            else:
                reason = "unreadable array rows: the file is truncated"
            avail = 0 if chunk is None else len(chunk)
            ok = [i for i in todo if i < avail]
            if ok:
                yield from _rows_to_items([ids[i] for i in ok], chunk[ok] if len(ok) < avail else chunk,
                                          input_shape)
            if avail < stop - start:  # truncated: the lost rows of this chunk and all later rows
                lost = [ids[i] for i in todo if i >= avail]
                lost += [f"{path}#{i}" for i in range(stop, n) if not skip(f"{path}#{i}")]
                for iid in lost:
                    yield InputItem(iid, error=reason, source=iid)
                return
    finally:
        if member is not None:
            member.close()


# ------------------------------------------------------------------------------------------------ JSONL


def _jsonl_items(name: str, stream: IO[str], base: Path, input_shape: Sequence[int],
                 skip: Skip) -> Iterator[InputItem]:
    for lineno, line in enumerate(stream, 1):
        if not line.strip():
            continue
        ref = f"{name}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if not skip(ref):
                yield InputItem(ref, error=f"invalid JSON line: {e}", source=ref)
            continue
        if isinstance(obj, str):
            obj = {"path": obj}
        if not isinstance(obj, dict):
            if not skip(ref):
                yield InputItem(ref, error=f"JSONL line must be an object or a path string, got "
                                           f"{type(obj).__name__}", source=ref)
            continue
        iid = str(obj["id"]) if obj.get("id") is not None else ref
        if skip(iid):
            continue
        if isinstance(obj.get("path"), str):
            p = Path(obj["path"])
            yield _image_item(p if p.is_absolute() else base / p, input_shape, iid)
        elif isinstance(obj.get("image"), str):
            data = obj["image"]
            if data.startswith("data:"):
                data = data.partition(",")[2]
            try:
                raw = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError) as e:
                yield InputItem(iid, error=f"invalid base64 image: {e}", source=ref)
                continue
            try:
                x, resized = decode_image(raw, input_shape)
                yield InputItem(iid, x, resized=resized, source=ref)
            except Exception as e:  # noqa: BLE001
                yield InputItem(iid, error=f"unreadable image: {type(e).__name__}: {e}", source=ref)
        else:
            yield InputItem(iid, error="JSONL line has neither a 'path' nor an 'image' (base64) string",
                            source=ref)


# ------------------------------------------------------------------------------------------------ all sources


def _walk(root: Path) -> Iterator[Path]:
    """Files under ``root`` in path order (names sorted, sub-folders where their name sorts), holding only the
    listings of the folders on the current path in memory; hidden entries are skipped, symlinked folders not
    followed (no cycles)."""

    def listing(d: Path) -> Iterator[tuple[str, bool]]:
        try:
            with os.scandir(d) as it:
                entries = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in it if not e.name.startswith("."))
        except OSError as e:
            log.warning("cannot list %s: %s", d, e)
            entries = []
        return iter(entries)

    stack = [(root, listing(root))]
    while stack:
        d, it = stack[-1]
        nxt = next(it, None)
        if nxt is None:
            stack.pop()
        elif nxt[1]:
            stack.append((d / nxt[0], listing(d / nxt[0])))
        else:
            yield d / nxt[0]


def _file_items(path: Path, input_shape: Sequence[int], skip: Skip, in_folder: bool = False) -> Iterator[InputItem]:
    ext = path.suffix.lower()
    if ext in IMAGE_EXTS:
        if not skip(str(path)):
            yield _image_item(path, input_shape)
    elif ext in ARRAY_EXTS:
        yield from _array_items(path, input_shape, skip)
    elif ext in JSONL_EXTS and not in_folder:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                yield from _jsonl_items(str(path), f, path.parent, input_shape, skip)
        except OSError as e:
            if not skip(str(path)):
                yield InputItem(str(path), error=f"unreadable JSONL file: {e}", source=str(path))
    elif not skip(str(path)):
        yield InputItem(str(path), error=f"unsupported file type: {ext or '(none)'}", source=str(path))


def iter_inputs(sources: Iterable[str | os.PathLike], input_shape: Sequence[int], skip: Skip | None = None,
                stdin: IO[str] | None = None) -> Iterator[InputItem]:
    """Items from folders (recursive, sorted), image files, array files and JSONL files, in order.

    ``-`` reads JSONL from ``stdin`` (default ``sys.stdin``). ``skip(id)`` is asked before an input is decoded
    (``--resume``); a skipped input yields nothing. JSONL files inside folders are data, not inputs: they get an
    "unsupported file type" record like any other non-image file.
    """
    skip = skip or _never
    for src in sources:
        if str(src) == STDIN:
            yield from _jsonl_items(STDIN, stdin or sys.stdin, Path.cwd(), input_shape, skip)
            continue
        path = Path(src)
        if path.is_dir():
            for f in _walk(path):
                yield from _file_items(f, input_shape, skip, in_folder=True)
        elif path.is_file():
            yield from _file_items(path, input_shape, skip)
        elif not skip(str(path)):
            yield InputItem(str(path), error="no such file or directory", source=str(path))


# ------------------------------------------------------------------------------------------------ re-reading


def read_source(source: str) -> np.ndarray | None:
    """Re-read an input for display from a record's ``source``: uint8 ``(H, W, C)``, or ``None`` when it cannot be
    read (stdin, moved files). Images are shown as stored, arrays as given (floats scaled from [0, 1])."""
    try:
        path, sep, row = source.rpartition("#")
        if sep and row.isdigit() and Path(path).suffix.lower() in ARRAY_EXTS:
            return _display(_array_row(Path(path), int(row)))
        path, sep, line = source.rpartition(":")
        if sep and line.isdigit() and Path(path).suffix.lower() in JSONL_EXTS and Path(path).is_file():
            with open(path, encoding="utf-8", errors="replace") as f:
                for i, text in enumerate(f, 1):
                    if i == int(line):
                        obj = json.loads(text)
                        obj = {"path": obj} if isinstance(obj, str) else obj
                        if isinstance(obj.get("path"), str):
                            p = Path(obj["path"])
                            return _pil_display(p if p.is_absolute() else Path(path).parent / p)
                        data = obj["image"].partition(",")[2] if obj["image"].startswith("data:") else obj["image"]
                        return _pil_display(io.BytesIO(base64.b64decode(data)))
            return None
        if Path(source).suffix.lower() in IMAGE_EXTS and Path(source).is_file():
            return _pil_display(Path(source))
    except Exception as e:  # noqa: BLE001 - a thumbnail that cannot be shown is not an error
        log.debug("cannot re-read %s: %s", source, e)
    return None


def _array_row(path: Path, row: int) -> np.ndarray:
    if path.suffix.lower() == ".npy":
        return np.array(np.load(path, mmap_mode="r", allow_pickle=False)[row])
    return _npz_images(str(path))[row]


@functools.lru_cache(maxsize=2)
def _npz_images(path: str) -> np.ndarray:
    key, member = _npz_rows(Path(path))
    member.close()
    return _load_npz_member(Path(path), key)


def _pil_display(src: Any) -> np.ndarray:
    from PIL import Image

    with Image.open(src) as img:
        img = img.convert("RGB") if img.mode not in ("L", "RGB") else img
        arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def _display(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.dtype != np.uint8:
        a = np.clip(np.nan_to_num(a.astype(np.float64)) * 255.0, 0, 255).astype(np.uint8)
    return a
