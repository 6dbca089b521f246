"""Input sources for scanning: image folders and files, ``.npy`` / ``.npz`` arrays, JSONL streams (``-`` = stdin).

Every input becomes exactly one :class:`InputItem` holding either the model-ready image or the reason it could not be
read, in a deterministic order; a source never silently drops an input, never stops at a bad one and never raises.
Inputs are untrusted, so reading them is bounded (:class:`SourceLimits`): memory holds one block of rows, one JSONL
line or one decoded image at a time; nothing but a regular file is ever opened (FIFOs, sockets, devices, dangling or
looping symlinks become error records without being opened, so they cannot block a scan); ``.npy`` headers are read
by hand with a size cap and must agree with the file's (or the zip member's) size before a single row is read; images
are decoded only by the plugins of :data:`IMAGE_FORMATS` (never EPS/Ghostscript) and only below ``max_pixels``, read
from the header first; JSONL is read as bytes with a bounded line length, and any line that is not UTF-8, not JSON,
too deep or too large is one error record. Pickle is never loaded. Sources only read; they write nothing. A FIFO
named as an input is refused like any other (stream through ``-`` instead).

Ids (what a verdict record is keyed by, and what ``--resume`` matches) are canonical, so that the same input spelled
another way (relative or absolute, from another working directory) resumes: file paths are made absolute and
normalised lexically (:func:`os.path.abspath`: ``.`` and ``..`` removed, symlinks not resolved — and the file read is
the one the id names). Image files are keyed by that path, array rows by ``PATH#ROW``, JSONL lines by their ``"id"``
field (kept as given) or ``PATH:LINE`` (``-:LINE`` for stdin). A file that cannot be read at all, or whose rows cannot
fit the model, gets one record keyed by its path. Bytes that are not UTF-8 in file names (and lone surrogates in JSONL
ids) appear in ids and messages as backslash escapes, so every record can be written as UTF-8. ``source`` says where to
re-read an input (the report's thumbnails): the image path, ``PATH#ROW`` or ``PATH:LINE``.

JSONL lines are objects with ``"path"`` (an image file; relative paths are taken from the JSONL file's directory, or
the working directory for stdin) or ``"image"`` (base64 of an encoded PNG/JPEG/..., a ``data:`` URL is fine), and
optionally ``"id"`` (a string or a number); a line that is just a JSON string is a path. Hidden files and folders
(names starting with ``.``) are scanned like any other — hiding a file must not hide it from the guard; with
``skip_hidden`` each gets a ``skipped: hidden`` error record instead (a hidden folder one record, not walked).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import io
import json
import logging
import math
import os
import re
import stat
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from .preprocess import InputError, pil_to_array, to_model_input

log = logging.getLogger(__name__)

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
ARRAY_EXTS = {".npy", ".npz"}
JSONL_EXTS = {".jsonl", ".ndjson"}
NPZ_KEYS = ("images", "x", "inputs")
STDIN = "-"
#: The Pillow plugins an image may be decoded by: those of :data:`IMAGE_EXTS` (those this Pillow has).
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "GIF", "TIFF")

Skip = Callable[[str], bool]

_MAX_NPY_HEADER = 10_000  # numpy's own max_header_size, checked *before* the header is read (numpy reads it first)
_MAX_JSON_TOKENS = 10_000  # '{', '[', ',' and ':' in one JSONL line: an input line is one small object
_MAX_ID_CHARS = 4096
_MAX_PATH_CHARS = 4096
_MAX_MESSAGE_CHARS = 500
_DEFLATE_MAX_RATIO = 1032  # deflate cannot expand more than ~1032:1; a member claiming more is lying


@dataclass(frozen=True)
class SourceLimits:
    """Bounds on what one untrusted input may cost; an input beyond them gets an error record.

    ``max_pixels``: width x height of an encoded image, checked from its header before decoding (Pillow's own
    decompression-bomb limit still applies above it). ``max_line_bytes``: one JSONL line (an over-long line is skipped
    to its newline without being held). ``skip_hidden``: give hidden files/folders a ``skipped: hidden`` record instead
    of scanning them. ``block_bytes``: array rows read at a time. ``max_whole_array_bytes``: a Fortran-order ``.npz``
    member (which cannot be streamed row by row) is loaded whole only up to this size. ``max_zip_directory_bytes``: the
    central directory of an ``.npz`` (whose entries zipfile holds in memory).
    """

    max_pixels: int = 40_000_000
    max_line_bytes: int = 64 * 2**20
    skip_hidden: bool = False
    block_bytes: int = 64 * 2**20
    max_whole_array_bytes: int = 256 * 2**20
    max_zip_directory_bytes: int = 2**20

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_line_bytes", "block_bytes", "max_whole_array_bytes",
                     "max_zip_directory_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SourceLimits.{name} must be a positive integer, got {v!r}")


DEFAULT_LIMITS = SourceLimits()


@dataclass
class InputItem:
    """``image`` is float32 ``(C, H, W)`` in [0, 1] when readable; otherwise ``error`` says why."""

    id: str
    image: np.ndarray | None = None
    error: str | None = None
    resized: bool = False
    source: str | None = None


class SourceError(ValueError):
    """An input refused or unreadable before decoding; the message is the error record's text."""


def _never(_id: str) -> bool:
    return False


_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape_surrogate(m: re.Match[str]) -> str:
    c = ord(m.group())
    return f"\\x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"\\u{c:04x}"


def safe_text(text: str) -> str:
    """``text`` as valid Unicode: a surrogate-escaped byte (a file name's undecodable ``0xff``) becomes ``\\xff``,
    any other lone surrogate ``\\udxxx``; valid text is returned unchanged (idempotent). Ids are made with it here and
    records are written through it (:mod:`guard.scan`), so both sides of ``--resume`` agree."""
    return _SURROGATE.sub(_escape_surrogate, text) if _SURROGATE.search(text) else text



def b64_image_bytes(data: str) -> bytes:
    """The bytes of a base64 image string (a ``data:`` URL is fine); raises ``ValueError`` when it is not base64."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error as e:
        raise ValueError(str(e)) from e


def error_text(s: str) -> str:
    """An error record's text: valid Unicode (:func:`safe_text`), capped at a few hundred characters."""
    s = safe_text(s)
    return s if len(s) <= _MAX_MESSAGE_CHARS else s[: _MAX_MESSAGE_CHARS - 1] + "…"


def unreadable_image(e: Exception) -> str:
    """The error text of an image Pillow could not decode: the reason, without Pillow's file-object repr."""
    from PIL import UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):  # "cannot identify image file <_io.BufferedReader name=7>"
        return "unreadable image: not an image format Pillow reads (or an empty file)"
    return error_text(f"unreadable image: {type(e).__name__}: {e}")


def canonical_id(path: str | os.PathLike) -> str:
    """The id a scan gives the file at ``path`` (its rows: ``ID#ROW``, its JSONL lines: ``ID:LINE``): absolute,
    normalised lexically without resolving symlinks, valid Unicode — the same however the path is spelled."""
    return safe_text(os.path.abspath(os.fsdecode(path)))


def _error(skip: Skip, iid: str, msg: str, source: str | None = None) -> Iterator[InputItem]:
    """An error record — unless ``--resume`` already holds ``iid`` (asked exactly once, like a verdict)."""
    if not skip(iid):
        yield InputItem(iid, error=error_text(msg), source=source if source is not None else iid)


# ------------------------------------------------------------------------------------------------ safe opening


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a file"


def _check_regular(path: str) -> os.stat_result:
    """``stat`` a path (following symlinks) and insist on a regular file; raises :class:`SourceError` saying why."""
    if "\x00" in path:
        raise SourceError("invalid path: it contains a NUL byte")
    if len(path) > _MAX_PATH_CHARS:
        raise SourceError(f"invalid path: longer than {_MAX_PATH_CHARS} characters")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.lexists(path):
            raise SourceError(f"dangling symbolic link: {path}") from None
        raise SourceError(f"no such file: {path}") from None
    except OSError as e:  # a symlink loop (ELOOP), a component that is not a folder, permissions
        raise SourceError(f"unreadable file: {e.strerror or type(e).__name__}: {path}") from None
    except ValueError as e:  # a name the file system cannot encode
        raise SourceError(f"invalid path: {e}") from None
    if not stat.S_ISREG(st.st_mode):
        link = " (a symbolic link; symlinked folders are not followed)" if os.path.islink(path) else ""
        raise SourceError(f"not a regular file: {_kind(st.st_mode)}{link}: {path}")
    return st


def _open_regular(path: str) -> IO[bytes]:
    """Open a regular file for reading, never blocking: anything else is refused before ``open`` (``stat``), and
    ``O_NONBLOCK`` plus an ``fstat`` re-check cover a file swapped for a FIFO in between."""
    _check_regular(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise SourceError(f"unreadable file: {e.strerror or type(e).__name__}: {path}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SourceError(f"not a regular file: {_kind(st.st_mode)}: {path}")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


# ------------------------------------------------------------------------------------------------ images


@functools.lru_cache(maxsize=1)
def _pil_formats() -> tuple[str, ...]:
    from PIL import Image

    Image.init()
    return tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)  # naming one this build lacks is a KeyError


def _decode(src: IO[bytes], input_shape: Sequence[int], max_pixels: int) -> tuple[np.ndarray, bool]:
    from PIL import Image

    try:
        img_cm = Image.open(src, formats=_pil_formats())  # reads the header only
    except Image.DecompressionBombError as e:
        raise SourceError(f"image too large: {e}") from None
    with img_cm as img:
        w, h = img.size
        if w * h > max_pixels:
            raise SourceError(f"image too large: {w}x{h} = {w * h} pixels, the limit is {max_pixels} (--max-pixels)")
        img.load()
        arr, resized = pil_to_array(img, input_shape)
    if arr.dtype != np.uint8:  # 16-bit / float images arrive as float (H, W, C) in [0, 1]: hand them over as CHW
        arr = arr.transpose(2, 0, 1)
    return to_model_input(arr[None], input_shape)[0], resized


def decode_image(data: bytes | str | os.PathLike, input_shape: Sequence[int], *,
                 max_pixels: int = DEFAULT_LIMITS.max_pixels) -> tuple[np.ndarray, bool]:
    """An encoded image (bytes or a path) -> float32 ``(C, H, W)`` in the model's spec; returns ``(x, resized)``.

    Raises :class:`SourceError` for a path that is not a regular file or an image above ``max_pixels``, and
    Pillow's or :class:`~guard.preprocess.InputError`'s exceptions for an undecodable image."""
    if isinstance(data, bytes):
        return _decode(io.BytesIO(data), input_shape, max_pixels)
    with _open_regular(os.fsdecode(data)) as f:
        return _decode(f, input_shape, max_pixels)


def _image_item(path: str, input_shape: Sequence[int], limits: SourceLimits, item_id: str | None = None,
                ) -> InputItem:
    """The item of an image file at ``path`` (absolute); keyed by ``item_id`` or the path's canonical id."""
    src = safe_text(path)
    iid = src if item_id is None else item_id
    try:
        with _open_regular(path) as f:
            x, resized = _decode(f, input_shape, limits.max_pixels)
        return InputItem(iid, x, resized=resized, source=src)
    except SourceError as e:
        return InputItem(iid, error=error_text(str(e)), source=src)
    except Exception as e:  # noqa: BLE001 - PIL raises many types; every input still gets an answer
        return InputItem(iid, error=unreadable_image(e), source=src)


def _bytes_item(raw: bytes, input_shape: Sequence[int], limits: SourceLimits, iid: str, ref: str) -> InputItem:
    try:
        x, resized = _decode(io.BytesIO(raw), input_shape, limits.max_pixels)
        return InputItem(iid, x, resized=resized, source=ref)
    except SourceError as e:
        return InputItem(iid, error=error_text(str(e)), source=ref)
    except Exception as e:  # noqa: BLE001
        return InputItem(iid, error=unreadable_image(e), source=ref)


# ------------------------------------------------------------------------------------------------ arrays


def _read_exact(fp: IO[bytes], n: int, what: str) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        got = fp.read(n - len(buf))
        if not got:
            raise SourceError(f"unreadable array file: truncated {what}")
        buf += got
    return bytes(buf)


def read_npy_header(fp: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """``(shape, fortran_order, dtype, header_bytes)`` of a ``.npy`` stream, reading at most the capped header;
    object dtypes and invalid shapes raise :class:`SourceError`. The one header reader of the guard: input files,
    ``.npz`` members, bundle arrays and the service's ``.npy`` bodies all go through it.

    numpy's own reader reads a header of any declared length before checking it (up to 4 GiB in format 2.0)."""
    magic = _read_exact(fp, 8, "header")
    if magic[:6] != b"\x93NUMPY":
        raise SourceError("unreadable array file: not a .npy array (bad magic)")
    version = (magic[6], magic[7])
    if version not in ((1, 0), (2, 0)):
        raise SourceError(f"unreadable array file: unsupported .npy format version {version[0]}.{version[1]}")
    size_bytes = _read_exact(fp, 2 if version == (1, 0) else 4, "header")
    hlen = int.from_bytes(size_bytes, "little")
    if hlen > _MAX_NPY_HEADER:
        raise SourceError(f"unreadable array file: .npy header of {hlen} bytes (the limit is {_MAX_NPY_HEADER})")
    header = _read_exact(fp, hlen, "header")
    buf = io.BytesIO(magic + size_bytes + header)
    np.lib.format.read_magic(buf)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = reader(buf)
    shape = tuple(shape)
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise SourceError(f"unreadable array file: invalid shape {shape}")
    if dtype.hasobject:
        raise SourceError("unreadable array file: object arrays are never loaded (they would need pickle)")
    return shape, bool(fortran), dtype, len(magic) + len(size_bytes) + hlen


class _ArrayStream:
    """Row blocks of a ``.npy`` stream (a file, or a member of an ``.npz`` zip) read front to back with plain reads:
    neither loaded whole nor memory-mapped, so memory stays at one block. Before any row is read, the header must
    agree with the bytes the container holds (``available``: the file's size, or the member's size in the zip's
    directory). A Fortran-order ``.npy`` file is read block by block too, one seek per pixel position (its rows are
    strided through the whole file); a Fortran-order ``.npz`` member cannot be seeked, so it is loaded whole when not
    above ``max_whole``."""

    def __init__(self, fp: IO[bytes], available: int, closers: Sequence[Any] = (), npy_file: bool = False,
                 max_whole: int = DEFAULT_LIMITS.max_whole_array_bytes) -> None:
        self._fp, self._closers, self._npy_file = fp, [fp, *closers], npy_file
        self.problem = "the file is truncated"
        try:
            self.shape, fortran, self.dtype, self.header_bytes = read_npy_header(fp)
            self.ndim = len(self.shape)
            self.row_items = math.prod(self.shape[1:]) if self.ndim > 1 else 1
            self.data_bytes = math.prod(self.shape) * self.dtype.itemsize
            if self.header_bytes + self.data_bytes != available:
                raise SourceError(f"unreadable array file: the header declares shape {self.shape} of {self.dtype} "
                                  f"({self.data_bytes} bytes of data) but the file holds "
                                  f"{max(available - self.header_bytes, 0)}")
            self._full: np.ndarray | None = None
            self._fortran = fortran and self.ndim > 1 and self.data_bytes > 0
            if self._fortran and not npy_file:
                if self.data_bytes <= max_whole:
                    raw = _read_exact(fp, self.data_bytes, "data")
                    self._full = np.frombuffer(raw, self.dtype).reshape(self.shape, order="F")
                else:
                    raise SourceError(f"unreadable array file: a Fortran-order .npz member of {self.data_bytes} "
                                      f"bytes cannot be streamed (limit {max_whole}); save it C-ordered")
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 1

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` — fewer when the data turns out truncated or unreadable (``self.problem`` then says
        why; the complete rows before it still come back); sequential calls only."""
        if self._full is not None:
            return np.array(self._full[start:stop])
        if self._fortran:
            return self._read_fortran(start, stop)
        row_bytes = self.row_items * self.dtype.itemsize
        want = (stop - start) * row_bytes
        buf = bytearray()
        try:
            while len(buf) < want:
                got = self._fp.read(want - len(buf))
                if not got:
                    self.problem = "the file is truncated"
                    break
                buf += got
        except Exception as e:  # noqa: BLE001 - a zip's CRC error or broken deflate stream, an I/O error
            self.problem = f"{type(e).__name__}: {e}"
        n = len(buf) // row_bytes  # only complete rows
        return np.frombuffer(bytes(buf[: n * row_bytes]), self.dtype).reshape((n, *self.shape[1:]))

    def _read_fortran(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of a Fortran-order file: element ``(row, j)`` (``j`` the Fortran-flat index of a
        pixel) lies at ``row + N * j``, so each pixel position is one contiguous run of the block's rows."""
        n, k, size = self.shape[0], stop - start, self.dtype.itemsize
        out = np.empty((self.row_items, k), self.dtype)
        for j in range(self.row_items):
            self._fp.seek(self.header_bytes + (start + n * j) * size)
            out[j] = np.frombuffer(_read_exact(self._fp, k * size, "data"), self.dtype)
        return np.ascontiguousarray(out.T.reshape((k, *self.shape[1:]), order="F"))

    @property
    def seekable(self) -> bool:
        return self._full is None and self._npy_file and not self._fortran

    def seek_row(self, row: int) -> None:
        self._fp.seek(self.header_bytes + row * self.row_items * self.dtype.itemsize)

    def read_all(self) -> np.ndarray:
        """The whole array (the caller checked that it is one image's size)."""
        if self._full is not None:
            return np.array(self._full)
        raw = _read_exact(self._fp, self.data_bytes, "data")
        return np.frombuffer(raw, self.dtype).reshape(self.shape, order="F" if self._fortran else "C")

    def close(self) -> None:
        self._full = None
        for c in self._closers:
            with contextlib.suppress(Exception):  # closing what a hostile file left behind must not raise
                c.close()


def _open_npz(fp: IO[bytes], limits: SourceLimits) -> tuple[zipfile.ZipFile, zipfile.ZipInfo]:
    """The zip of an ``.npz`` and its images member (``images``/``x``/``inputs``, or the only member)."""
    # the end record (CPython internals, hence getattr): bound the central directory before it is parsed
    end, size_at = getattr(zipfile, "_EndRecData", None), getattr(zipfile, "_ECD_SIZE", None)
    if end is not None and size_at is not None:
        rec = end(fp)
        if rec is None:
            raise SourceError("unreadable array file: not a zip file")
        if rec[size_at] > limits.max_zip_directory_bytes:
            raise SourceError(f"unreadable array file: zip directory of {rec[size_at]} bytes (limit "
                              f"{limits.max_zip_directory_bytes})")
        fp.seek(0)
    zf = zipfile.ZipFile(fp)
    try:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            raise SourceError("unreadable array file: the zip holds two members of the same name")
        arrays = {n[:-4]: i for n, i in zip(names, infos) if n.endswith(".npy")}
        key = next((k for k in NPZ_KEYS if k in arrays), None)
        if key is None and len(infos) == 1 and arrays:
            key = next(iter(arrays))
        if key is None:
            shown = ", ".join(repr(n) for n in names[:10]) + (", ..." if len(names) > 10 else "")
            raise SourceError(f"unreadable array file: no 'images' array among [{shown}]")
        if "/" in key or "\\" in key or ".." in key or "\x00" in key:
            raise SourceError(f"unreadable array file: suspicious member name {key!r}")
        info = arrays[key]
        if info.compress_type == zipfile.ZIP_STORED:
            ok = info.compress_size == info.file_size
        elif info.compress_type == zipfile.ZIP_DEFLATED:
            ok = info.file_size <= info.compress_size * _DEFLATE_MAX_RATIO + 1024
        else:
            raise SourceError(f"unreadable array file: zip compression method {info.compress_type} is not "
                              f"accepted (stored or deflated only)")
        if not ok:
            raise SourceError(f"unreadable array file: member {key!r} claims {info.file_size} bytes from "
                              f"{info.compress_size} compressed (a zip bomb or a corrupt directory)")
        return zf, info
    except BaseException:
        zf.close()
        raise


def _open_array(path: str, limits: SourceLimits) -> _ArrayStream:
    fp = _open_regular(path)
    try:
        if path.lower().endswith(".npy"):
            return _ArrayStream(fp, os.fstat(fp.fileno()).st_size, npy_file=True)
        zf, info = _open_npz(fp, limits)
        try:
            member = zf.open(info)
        except BaseException:
            zf.close()
            raise
        return _ArrayStream(member, info.file_size, closers=(zf, fp), max_whole=limits.max_whole_array_bytes)
    except BaseException:
        fp.close()
        raise


def _rows_reason(shape: tuple[int, ...], dtype: np.dtype, input_shape: Sequence[int]) -> str | None:
    """Why the rows of an array of ``shape`` / ``dtype`` cannot be model inputs — None when they can. Decided from
    the header alone, so a file whose rows can never fit is one record, not one per row."""
    c, h, w = (int(v) for v in input_shape)
    if len(shape) < 3 or len(shape) > 4:
        return (f"array of {len(shape)} dimensions holds no images (expected (N, H, W[, C]) or (N, C, H, W)), "
                f"shape {shape[:8]}{'...' if len(shape) > 8 else ''}")
    if shape[0] == 0:
        return f"holds no rows: shape {shape}"
    row = shape[1:]
    if math.prod(row) == 0:
        return f"rows hold no pixels: shape {shape}"
    if math.prod(row) != c * h * w:
        return f"rows of shape {row} do not fit the model's input {(c, h, w)}"
    if dtype.fields is not None or dtype.subdtype is not None:
        return f"unsupported dtype {dtype}"
    try:
        to_model_input(np.zeros((1, *row), dtype), input_shape)
    except InputError as e:
        return str(e)
    return None


def _is_one_image(shape: tuple[int, ...], input_shape: Sequence[int]) -> bool:
    c, h, w = (int(v) for v in input_shape)
    return shape in ((h, w, c), (c, h, w)) or (c == 1 and shape == (h, w))


def _rows_to_items(ids: Sequence[str], chunk: np.ndarray, input_shape: Sequence[int]) -> Iterator[InputItem]:
    try:
        xs = to_model_input(chunk, input_shape)
        if len(xs) != len(ids):  # e.g. rows that together look like one image
            raise InputError(f"rows of shape {chunk.shape[1:]} do not fit the model")
        for iid, x in zip(ids, xs):
            yield InputItem(iid, x, source=iid)
    except InputError:
        for j, iid in enumerate(ids):  # find which rows are bad (NaN, out of range), keep the good ones
            try:
                x = to_model_input(chunk[j : j + 1], input_shape)
                if len(x) != 1:
                    raise InputError(f"row of shape {chunk.shape[1:]} does not fit the model") from None
                yield InputItem(iid, x[0], source=iid)
            except InputError as e:
                yield InputItem(iid, error=error_text(f"invalid input: {e}"), source=iid)


def _array_items(path: str, input_shape: Sequence[int], skip: Skip, limits: SourceLimits,
                 batch: int = 1024) -> Iterator[InputItem]:
    """Items of an array file at ``path`` (absolute): one per row, or one for the file (a single image, or a file
    that cannot be read or whose rows cannot fit the model)."""
    pid = safe_text(path)
    try:
        stream = _open_array(path, limits)
    except SourceError as e:
        yield from _error(skip, pid, str(e))
        return
    except Exception as e:  # noqa: BLE001 - corrupt headers, bad zips: one error record
        yield from _error(skip, pid, f"unreadable array file: {type(e).__name__}: {e}")
        return
    try:
        shape, n = stream.shape, len(stream)
        if stream.ndim in (2, 3) and _is_one_image(shape, input_shape):
            if not skip(pid):  # the file holds a single image
                try:
                    yield InputItem(pid, to_model_input(stream.read_all(), input_shape)[0], source=pid)
                except InputError as e:
                    yield InputItem(pid, error=error_text(f"invalid input: {e}"), source=pid)
                except Exception as e:  # noqa: BLE001
                    msg = f"unreadable array file: {type(e).__name__}: {e}"
                    yield InputItem(pid, error=error_text(msg), source=pid)
            return
        reason = _rows_reason(shape, stream.dtype, input_shape)
        if reason is not None:
            yield from _error(skip, pid, f"invalid input: {reason}")
            return
        per = max(1, min(batch, limits.block_bytes // (stream.row_items * stream.dtype.itemsize)))
        for start in range(0, n, per):
            stop = min(start + per, n)
            try:
                chunk = stream.read(start, stop)  # the stream is sequential: rows are read even when all are skipped
                problem = stream.problem
            except Exception as e:  # noqa: BLE001 - a Fortran-order block that cannot be read whole
                chunk, problem = None, f"{type(e).__name__}: {e}"
            avail = 0 if chunk is None else len(chunk)
            ids = [f"{pid}#{i}" for i in range(start, start + avail)]
            todo = [i for i, iid in enumerate(ids) if not skip(iid)]
            if todo and chunk is not None:  # (todo is empty when no rows were read)
                yield from _rows_to_items([ids[i] for i in todo], chunk if len(todo) == avail else chunk[todo],
                                          input_shape)
            if avail < stop - start:  # the rest of the file is lost: one record for it, not one per row
                yield from _error(skip, pid, f"unreadable array rows: rows {start + avail}-{n - 1} of {n} lost: "
                                               f"{problem}")
                return
    finally:
        stream.close()


# ------------------------------------------------------------------------------------------------ JSONL


def capped_lines(stream: IO[Any], max_bytes: int) -> Iterator[tuple[int, Any]]:
    """``(line number, line)`` with the line's bytes (or characters, for a text stream) capped: an over-long line is
    read on to its end in bounded pieces and handed out as ``None``."""
    lineno = 0
    while True:
        line = stream.readline(max_bytes + 1)
        if not line:
            return
        lineno += 1
        nl = b"\n" if isinstance(line, bytes) else "\n"
        if len(line) > max_bytes and not line.endswith(nl):
            while (rest := stream.readline(2**20)) and not rest.endswith(nl):
                pass
            yield lineno, None
        else:
            yield lineno, line


def _jsonl_items(name: str, stream: IO[Any], base: str, input_shape: Sequence[int], skip: Skip,
                 limits: SourceLimits) -> Iterator[InputItem]:
    lineno = 0
    try:
        for lineno, line in capped_lines(stream, limits.max_line_bytes):
            yield from _jsonl_line(name, lineno, line, base, input_shape, skip, limits)
    except Exception as e:  # noqa: BLE001 - the stream itself failed (EIO, a text stream's decode error)
        ref = f"{name}:{lineno + 1}"
        yield from _error(skip, ref, f"unreadable JSONL stream: {type(e).__name__}: {e}")


def _jsonl_line(name: str, lineno: int, line: Any, base: str, input_shape: Sequence[int], skip: Skip,
                limits: SourceLimits) -> Iterator[InputItem]:
    ref = f"{name}:{lineno}"
    if line is None:
        yield from _error(skip, ref, f"invalid JSON line: longer than {limits.max_line_bytes} bytes "
                                     f"(--max-line-bytes)")
        return
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield from _error(skip, ref, f"invalid JSON line: not UTF-8 ({e.reason} at byte {e.start})")
            return
    if lineno == 1 and line.startswith("\ufeff"):
        line = line[1:]
    if not line.strip():
        return
    tokens = line.count("{") + line.count("[") + line.count(",") + line.count(":")
    if tokens > _MAX_JSON_TOKENS:
        yield from _error(skip, ref, f"invalid JSON line: more than {_MAX_JSON_TOKENS} values (an input line is one "
                                     f"small object)")
        return
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as e:  # bad JSON, 5,000-digit numbers, nesting beyond the stack
        yield from _error(skip, ref, f"invalid JSON line: {type(e).__name__}: {e}")
        return
    if isinstance(obj, str):
        obj = {"path": obj}
    if not isinstance(obj, dict):
        yield from _error(skip, ref, f"JSONL line must be an object or a path string, got {type(obj).__name__}")
        return
    raw_id = obj.get("id")
    if raw_id is None:
        iid = ref
    elif isinstance(raw_id, (str, int, float)) and not isinstance(raw_id, bool):
        iid = safe_text(str(raw_id))
        if len(iid) > _MAX_ID_CHARS:
            yield from _error(skip, ref, f"invalid id: longer than {_MAX_ID_CHARS} characters")
            return
    else:
        yield from _error(skip, ref, f"invalid id: must be a string or a number, got {type(raw_id).__name__}")
        return
    if skip(iid):
        return
    if isinstance(obj.get("path"), str):
        p = obj["path"]
        if "\x00" in p or len(p) > _MAX_PATH_CHARS:
            reason = "it contains a NUL byte" if "\x00" in p else f"longer than {_MAX_PATH_CHARS} characters"
            yield InputItem(iid, error=f"invalid path: {reason}", source=ref)
            return
        yield _image_item(os.path.abspath(os.path.join(base, p)), input_shape, limits, iid)
    elif isinstance(obj.get("image"), str):
        try:
            raw = b64_image_bytes(obj["image"])
        except ValueError as e:
            yield InputItem(iid, error=error_text(f"invalid base64 image: {e}"), source=ref)
            return
        yield _bytes_item(raw, input_shape, limits, iid, ref)
    else:
        yield InputItem(iid, error="JSONL line has neither a 'path' nor an 'image' (base64) string", source=ref)


# ------------------------------------------------------------------------------------------------ all sources


def _walk(root: str, skip_hidden: bool = False) -> Iterator[tuple[str, str | None]]:
    """``(path, problem)`` for every entry under ``root`` in path order (names sorted, sub-folders where their name
    sorts), holding only the listings of the folders on the current path in memory. Symlinked folders are not
    followed (no cycles; they get a record). A folder that cannot be listed, and with ``skip_hidden`` a hidden entry,
    comes with the problem to report instead of being dropped."""

    def listing(d: str) -> tuple[Iterator[tuple[str, bool]], str | None]:
        try:
            with os.scandir(d) as it:
                entries = []
                for e in it:
                    try:
                        is_dir = e.is_dir(follow_symlinks=False)
                    except OSError:
                        is_dir = False  # reported when it is read
                    entries.append((e.name, is_dir))
            return iter(sorted(entries)), None
        except OSError as e:
            return iter(()), f"unreadable folder: {e.strerror or type(e).__name__}: {d}"

    it, problem = listing(root)
    if problem:
        yield root, problem
    stack = [(root, it)]
    while stack:
        d, it = stack[-1]
        nxt = next(it, None)
        if nxt is None:
            stack.pop()
            continue
        name, is_dir = nxt
        path = os.path.join(d, name)
        if skip_hidden and name.startswith("."):
            yield path, f"skipped: hidden {'folder (not walked)' if is_dir else 'file'} (--skip-hidden)"
        elif is_dir:
            sub, problem = listing(path)
            if problem:
                yield path, problem
            stack.append((path, sub))
        else:
            yield path, None


def _file_items(path: str, input_shape: Sequence[int], skip: Skip, limits: SourceLimits,
                in_folder: bool = False) -> Iterator[InputItem]:
    """The items of one named or walked file at ``path`` (absolute, normalised)."""
    pid = safe_text(path)
    ext = os.path.splitext(pid)[1].lower()
    if ext in IMAGE_EXTS:
        if not skip(pid):
            yield _image_item(path, input_shape, limits)
    elif ext in ARRAY_EXTS:
        yield from _array_items(path, input_shape, skip, limits)
    elif ext in JSONL_EXTS and not in_folder:
        try:
            f = _open_regular(path)
        except SourceError as e:
            yield from _error(skip, pid, str(e))
            return
        with f:
            yield from _jsonl_items(pid, f, os.path.dirname(path), input_shape, skip, limits)
    else:
        try:
            _check_regular(path)  # a FIFO or a dangling link says so rather than "unsupported"
            msg = f"unsupported file type: {safe_text(ext) or '(none)'}"
        except SourceError as e:
            msg = str(e)
        yield from _error(skip, pid, msg)


def _stdin_stream(stdin: IO[Any] | None) -> IO[Any]:
    """The stream to read ``-`` from: bytes where possible (each line decoded on its own, so a bad byte costs one
    line); ``sys.stdin`` and text wrappers are read through their binary buffer."""
    stream = stdin if stdin is not None else sys.stdin
    if isinstance(stream, io.TextIOWrapper) and getattr(stream, "buffer", None) is not None:
        return stream.buffer
    return stream


def iter_inputs(sources: Iterable[str | os.PathLike], input_shape: Sequence[int], skip: Skip | None = None,
                stdin: IO[str] | IO[bytes] | None = None, *, limits: SourceLimits | None = None,
                ) -> Iterator[InputItem]:
    """Items from folders (recursive, sorted), image files, array files and JSONL files, in order; never raises.

    ``-`` reads JSONL from ``stdin`` (default ``sys.stdin``, read as bytes). ``skip(id)`` is asked exactly once for
    every record a source would yield — before an input is decoded where the id is known up front (``--resume``);
    a skipped input yields nothing. JSONL files inside folders are data, not inputs: they get an "unsupported file
    type" record like any other non-image file. ``limits`` bounds what one input may cost (:class:`SourceLimits`).
    """
    skip = skip or _never
    limits = limits or DEFAULT_LIMITS
    for src in sources:
        raw = os.fsdecode(src)
        if raw == STDIN:
            yield from _jsonl_items(STDIN, _stdin_stream(stdin), os.getcwd(), input_shape, skip, limits)
            continue
        path = os.path.abspath(raw)
        try:
            is_dir = "\x00" not in raw and os.path.isdir(path)
        except (OSError, ValueError):
            is_dir = False
        if is_dir:
            for f, problem in _walk(path, limits.skip_hidden):
                if problem is not None:
                    yield from _error(skip, safe_text(f), problem)
                else:
                    yield from _file_items(f, input_shape, skip, limits, in_folder=True)
        elif "\x00" in raw:
            yield from _error(skip, safe_text(path), "invalid path: it contains a NUL byte")
        elif not os.path.lexists(path):
            yield from _error(skip, safe_text(path), "no such file or directory")
        else:
            yield from _file_items(path, input_shape, skip, limits)


# ------------------------------------------------------------------------------------------------ re-reading


def read_source(source: str, limits: SourceLimits | None = None) -> np.ndarray | None:
    """Re-read an input for display from a record's ``source``: uint8 ``(H, W, C)``, or ``None`` when it cannot be
    read (stdin, moved files, anything the scan would refuse). Images are shown as stored, arrays as given (floats
    scaled from [0, 1]). The same bounds as the scan apply (a verdict file is as untrusted as its inputs)."""
    limits = limits or DEFAULT_LIMITS
    try:
        path, sep, row = source.rpartition("#")
        if sep and row.isdigit() and os.path.splitext(path)[1].lower() in ARRAY_EXTS:
            return _display(_array_row(path, int(row), limits))
        path, sep, line = source.rpartition(":")
        if sep and line.isdigit() and os.path.splitext(path)[1].lower() in JSONL_EXTS:
            with _open_regular(path) as f:
                for lineno, text in capped_lines(f, limits.max_line_bytes):
                    if lineno == int(line):
                        obj = json.loads(text)
                        obj = {"path": obj} if isinstance(obj, str) else obj
                        if isinstance(obj.get("path"), str):
                            return _pil_display(os.path.join(os.path.dirname(path), obj["path"]), limits)
                        data = obj["image"].partition(",")[2] if obj["image"].startswith("data:") else obj["image"]
                        return _pil_display(base64.b64decode(data, validate=True), limits)
            return None
        if os.path.splitext(source)[1].lower() in IMAGE_EXTS:
            return _pil_display(source, limits)
    except Exception as e:  # noqa: BLE001 - a thumbnail that cannot be shown is not an error
        log.debug("cannot re-read %s: %s", source, e)
    return None


def _array_row(path: str, row: int, limits: SourceLimits) -> np.ndarray:
    """Row ``row`` of an array file, streamed up to it (an ``.npz`` member cannot be seeked cheaply)."""
    stream = _open_array(path, limits)
    try:
        if row >= len(stream) or stream.ndim < 3:
            raise IndexError(f"{path} has no row {row}")
        row_bytes = stream.row_items * stream.dtype.itemsize
        if stream.seekable:  # a C-order .npy file: go straight to the row
            stream.seek_row(row)
            return np.array(stream.read(row, row + 1)[0])
        per = max(1, limits.block_bytes // max(row_bytes, 1))
        for start in range(0, row + 1, per):
            chunk = stream.read(start, min(start + per, len(stream)))
            if row < start + len(chunk):
                return np.array(chunk[row - start])
            if len(chunk) < per:
                break
        raise IndexError(f"{path}: row {row} is beyond the data")
    finally:
        stream.close()


def _pil_display(src: str | bytes, limits: SourceLimits) -> np.ndarray:
    from PIL import Image

    with (_open_regular(src) if isinstance(src, str) else io.BytesIO(src)) as f, \
            Image.open(f, formats=_pil_formats()) as img:
        w, h = img.size
        if w * h > limits.max_pixels:
            raise SourceError(f"image too large: {w}x{h}")
        img.load()
        if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
            arr, _ = pil_to_array(img, (1, h, w))
            return (arr * 255.0 + 0.5).astype(np.uint8)
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
