"""Input sources for scanning: image folders and files, ``.npy`` / ``.npz`` arrays.

Every input becomes an :class:`InputItem` holding either the model-ready image or the reason it could not be read;
a source never silently drops an input. Arrays are memory-mapped where the format allows it, so scanning memory does
not grow with the number of inputs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .preprocess import InputError, pil_to_array, to_model_input

log = logging.getLogger(__name__)

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
ARRAY_EXTS = {".npy", ".npz"}


@dataclass
class InputItem:
    """``image`` is float32 ``(C, H, W)`` in [0, 1] when readable; otherwise ``error`` says why."""

    id: str
    image: np.ndarray | None = None
    error: str | None = None
    resized: bool = False


def _image_item(path: Path, input_shape: Sequence[int]) -> InputItem:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            arr, resized = pil_to_array(img, input_shape)
        return InputItem(str(path), to_model_input(arr[None], input_shape)[0], resized=resized)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        return InputItem(str(path), error=f"unreadable image: {e}")


def _array_items(path: Path, input_shape: Sequence[int], batch: int = 1024) -> Iterator[InputItem]:
    try:
        if path.suffix == ".npy":
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as z:
                key = next((k for k in ("images", "x", "inputs") if k in z.files), None)
                if key is None and len(z.files) == 1:
                    key = z.files[0]
                if key is None:
                    raise ValueError(f"no 'images' array among {z.files}")
                arr = z[key]
    except (OSError, ValueError) as e:
        yield InputItem(str(path), error=f"unreadable array file: {e}")
        return
    if arr.ndim < 2:
        yield InputItem(str(path), error=f"array of shape {arr.shape} holds no images")
        return
    for start in range(0, len(arr), batch):
        chunk = np.asarray(arr[start : start + batch])
        try:
            xs = to_model_input(chunk, input_shape)
            for i, x in enumerate(xs):
                yield InputItem(f"{path}#{start + i}", x)
        except InputError:
            for i in range(len(chunk)):  # find which rows are bad, keep the good ones
                try:
                    yield InputItem(f"{path}#{start + i}", to_model_input(chunk[i : i + 1], input_shape)[0])
                except InputError as e:
                    yield InputItem(f"{path}#{start + i}", error=str(e))


def iter_inputs(sources: Iterable[str | os.PathLike], input_shape: Sequence[int]) -> Iterator[InputItem]:
    """Items from folders (recursive, sorted), image files and array files, in order."""
    for src in sources:
        path = Path(src)
        if path.is_dir():
            for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
                yield from _file_items(f, input_shape)
        elif path.is_file():
            yield from _file_items(path, input_shape)
        else:
            yield InputItem(str(path), error="no such file or directory")


def _file_items(path: Path, input_shape: Sequence[int]) -> Iterator[InputItem]:
    ext = path.suffix.lower()
    if ext in IMAGE_EXTS:
        yield _image_item(path, input_shape)
    elif ext in ARRAY_EXTS:
        yield from _array_items(path, input_shape)
    else:
        yield InputItem(str(path), error=f"unsupported file type {ext or '(none)'}")
