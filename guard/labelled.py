"""Calibration data read as the model will see it: the scan's sources, decoding and resizing, plus labels.

``calibrate --data PATH...`` takes what ``scan`` takes (folders, image files, ``.npy`` / ``.npz``, JSONL) through
:func:`abl_guard.guard.sources.iter_inputs`, so a guard is calibrated on exactly the pixels it will later score
(same resize, same channel conversion, same value scaling). Labels come from the source when it has them:

* a folder in the ImageFolder layout (``ROOT/<class>/...``) whose sub-folder names are the model's class names or
  class indices;
* an ``.npz`` with a ``labels`` array beside its images (integers, or class names);
* JSONL lines with a ``label`` field (an index or a class name).

Every other input (loose image files, ``.npy``, a folder whose sub-folders are not classes, stdin) takes the model's
**predicted** label. What that assumes: class-conditional detectors (Mahalanobis' class means) then model the clean
inputs as the model sorts them, and the validation accuracy measures agreement with those predictions (1.0 by
construction) rather than accuracy; the false-positive calibration itself needs no labels and is unaffected.
"""

from __future__ import annotations

import json
import logging
import os
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .sources import SourceLimits, canonical_id, capped_lines, iter_inputs, safe_text

log = logging.getLogger(__name__)

LABEL_MODES = ("auto", "given", "predicted")
MISSING = -1


class LabelError(ValueError):
    """A source's labels cannot be used (unknown class, or labels required and missing); one-line message."""


@dataclass
class CalibrationData:
    """Canonical images (float32 NCHW [0, 1]), labels (``-1`` where the source has none) and what was skipped."""

    images: np.ndarray
    labels: np.ndarray
    ids: list[str]
    errors: list[tuple[str, str]] = field(default_factory=list)
    label_sources: dict[str, str] = field(default_factory=dict)
    #: how many labels :func:`fill_predicted` filled in with the model's prediction
    predicted: int = 0

    @property
    def n_missing(self) -> int:
        return int(np.sum(self.labels == MISSING))

    @property
    def n_predicted(self) -> int:
        """Inputs whose label is (or will be) the model's prediction."""
        return self.predicted + self.n_missing

    def provenance(self) -> dict[str, Any]:
        """What the bundle's manifest records about the calibration inputs."""
        reasons: dict[str, int] = {}
        for _, err in self.errors:
            key = err.split(":", 1)[0]
            reasons[key] = reasons.get(key, 0) + 1
        return {"inputs": len(self.labels), "labelled": int(len(self.labels) - self.n_predicted),
                "predicted_labels": self.n_predicted, "skipped_unreadable": len(self.errors),
                "skipped_reasons": reasons, "labels_by_source": dict(self.label_sources)}


def _class_index(value: Any, class_names: Sequence[str]) -> int | None:
    """A label given as an index or a class name -> the class index (None when it is neither)."""
    names = {str(n): i for i, n in enumerate(class_names)}
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value) if 0 <= int(value) < len(class_names) else None
    text = str(value)
    if text in names:
        return names[text]
    if text.lstrip("-").isdigit():
        v = int(text)
        return v if 0 <= v < len(class_names) else None
    return None


class _FolderLabels:
    """ImageFolder layout: the first path component under ``root`` names the class."""

    def __init__(self, root: Path, class_names: Sequence[str]) -> None:
        self.roots = list(dict.fromkeys([root, root.absolute(), root.resolve()]))
        subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir(follow_symlinks=False)
                         and not e.name.startswith("."))
        self.mapping = {d: _class_index(d, class_names) for d in subdirs}
        self.unknown = [d for d, v in self.mapping.items() if v is None]
        self.usable = bool(subdirs) and not self.unknown

    def __call__(self, item_id: str) -> int:
        path = Path(item_id)
        for root in self.roots:  # ids may name files as given, absolute or resolved
            try:
                parts = path.relative_to(root).parts
                break
            except ValueError:
                continue
        else:
            return MISSING
        if len(parts) < 2:
            return MISSING
        v = self.mapping.get(parts[0])
        return MISSING if v is None else v


def _npz_labels(path: Path, class_names: Sequence[str]) -> dict[str, int] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if "labels" not in z.files:
                return None
            labels = z["labels"]
    except Exception as e:  # noqa: BLE001 - unreadable labels: the images' own errors say more
        log.warning("%s: cannot read its labels (%s); using predicted labels", path, e)
        return None
    out = {}
    for row, value in enumerate(np.asarray(labels).reshape(-1)):
        idx = _class_index(value.item() if hasattr(value, "item") else value, class_names)
        if idx is None:
            raise LabelError(f"{path}: label {value!r} of row {row} is not one of the model's classes "
                             f"{list(class_names)[:10]}")
        out[f"{canonical_id(path)}#{row}"] = idx  # keyed like guard.sources keys array rows
    return out


def _jsonl_labels(path: Path, class_names: Sequence[str]) -> dict[str, deque[int]]:
    """id -> labels in line order (an id may repeat), keyed the way :mod:`guard.sources` keys JSONL lines."""
    out: dict[str, deque[int]] = {}
    name = canonical_id(path)
    with open(path, "rb") as f:  # lines split and capped exactly as guard.sources reads them
        for lineno, raw in capped_lines(f, SourceLimits().max_line_bytes):
            if raw is None or not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (ValueError, RecursionError):  # the scan side gives such a line its error record
                continue
            if not isinstance(obj, dict) or "label" not in obj:
                continue
            iid = safe_text(str(obj["id"])) if obj.get("id") is not None else f"{name}:{lineno}"
            idx = _class_index(obj["label"], class_names)
            if idx is None:
                raise LabelError(f"{path}:{lineno}: label {obj['label']!r} is not one of the model's classes "
                                 f"{list(class_names)[:10]}")
            out.setdefault(iid, deque()).append(idx)
    return out


def _labeller(src: str, class_names: Sequence[str], mode: str) -> tuple[Any, str]:
    """A function ``id -> label`` for one source, and a word on where its labels come from."""
    none = (lambda _id: MISSING), "predicted"
    if mode == "predicted" or src == "-":
        return none
    path = Path(src)
    if path.is_dir():
        folder = _FolderLabels(path, class_names)
        if folder.usable:
            return folder, "folder classes"
        if folder.unknown:
            msg = (f"{src}: sub-folders {folder.unknown[:5]} are not class names or indices of the model "
                   f"({list(class_names)[:10]})")
            if mode == "given":
                raise LabelError(msg)
            log.warning("%s; using predicted labels", msg)
        return none
    suffix = path.suffix.lower()
    if suffix == ".npz" and path.is_file():
        table = _npz_labels(path, class_names)
        if table is not None:
            return (lambda i: table.get(i, MISSING)), "npz labels"
    elif suffix in (".jsonl", ".ndjson") and path.is_file():
        queues = _jsonl_labels(path, class_names)
        if queues:
            return (lambda i: queues[i].popleft() if queues.get(i) else MISSING), "jsonl label field"
    return none


def read_calibration_data(sources: Iterable[str | os.PathLike], input_shape: Sequence[int],
                          class_names: Sequence[str], *, start: int = 0, count: int | None = None,
                          labels: str = "auto") -> CalibrationData:
    """Read up to ``count`` readable inputs (after skipping the first ``start`` inputs) from ``sources``.

    ``labels``: ``auto`` takes labels where a source has them, ``given`` refuses inputs without one, ``predicted``
    ignores them (the caller fills in the model's predictions for every ``-1``). Unreadable inputs are skipped and
    listed in ``errors`` (the caller reports them). Memory is ``count`` canonical images.
    """
    if labels not in LABEL_MODES:
        raise ValueError(f"labels must be one of {LABEL_MODES}, got {labels!r}")
    images: list[np.ndarray] = []
    ys: list[int] = []
    ids: list[str] = []
    errors: list[tuple[str, str]] = []
    by_source: dict[str, str] = {}
    seen = 0
    for src in sources:
        if count is not None and len(images) >= count:
            break
        label_of, how = _labeller(str(src), class_names, labels)
        by_source[str(src)] = how
        for item in iter_inputs([src], input_shape):
            seen += 1
            if seen <= start:
                continue
            if item.image is None:
                errors.append((item.id, item.error or "unreadable"))
                continue
            y = label_of(item.id)
            if y == MISSING and labels == "given":
                raise LabelError(f"{item.id}: no label (labels come from class sub-folders, an npz 'labels' array "
                                 "or a JSONL 'label' field); use --labels auto to take the model's prediction")
            images.append(item.image)
            ys.append(y)
            ids.append(item.id)
            if count is not None and len(images) >= count:
                break
    c, h, w = (int(v) for v in input_shape)
    arr = np.stack(images) if images else np.zeros((0, c, h, w), np.float32)
    if errors:
        log.warning("%d calibration inputs could not be read and were skipped (first: %s: %s)", len(errors),
                    *errors[0])
    return CalibrationData(arr, np.asarray(ys, np.int64), ids, errors, by_source)


def fill_predicted(data: CalibrationData, model_path: str | os.PathLike) -> CalibrationData:
    """Give every input without a label (``-1``) the model's predicted label, in place; returns ``data``."""
    missing = data.labels == MISSING
    if missing.any():
        from .model import OnnxModel

        logits = OnnxModel(model_path).run(data.images[missing], ["logits"])["logits"]
        data.labels[missing] = logits.argmax(1)
        data.predicted += int(missing.sum())
        log.info("%d of %d calibration inputs take the model's predicted label", int(missing.sum()), len(missing))
    return data
