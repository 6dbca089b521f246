"""Batch scanning: every input gets exactly one record — a verdict or an error — streamed to JSONL or CSV.

* Inputs are pulled from a lazy source and scored ``batch_size`` at a time; records are written in input order, one
  batch per write, so memory is constant in the number of inputs (a resumed scan also keeps the ids already done).
* ``resume=True`` reads the existing output, drops a torn last line (a killed process), and skips the inputs whose
  ids it holds — counted, so an id that occurs twice in the input is scanned twice. Nothing is duplicated, nothing
  is lost, and the summary covers the whole file.
* Ctrl-C (SIGINT) or SIGTERM stop the scan after the batch being written; the file then ends on a complete record
  and ``--resume`` picks up where it stopped. A second Ctrl-C outside a write stops at once, still leaving complete
  records only.
* The summary counts records, errors (by reason), flags by predicted class and kind, and runs the target-class alarm
  (:func:`guard.calibration.target_class_alarm`) against the bundle's clean null distribution.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import signal
import sys
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import IO, Any

import numpy as np

from .calibration import ClassAlarm, RateEstimate, target_class_alarm
from .progress import progress_bar
from .runtime import Guard
from .sources import InputItem

log = logging.getLogger(__name__)

FORMATS = ("jsonl", "csv")
CSV_BASE = ["id", "source", "error", "label", "class_name", "confidence", "flagged", "p_value", "score",
            "threshold", "kind", "resized"]


class ScanError(RuntimeError):
    """The scan cannot start (e.g. the output to resume is not a verdict file of this format)."""


def output_format(path: str | os.PathLike, fmt: str | None = None) -> str:
    """``fmt`` if given, else ``csv`` for a ``.csv`` output and ``jsonl`` otherwise."""
    if fmt:
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}")
        return fmt
    return "csv" if str(path).lower().endswith(".csv") else "jsonl"


def _error_reason(msg: str) -> str:
    """The category of an error message: the text before its first colon (``unreadable image``)."""
    return msg.split(":", 1)[0].strip()[:80] or "error"


# ------------------------------------------------------------------------------------------------ summary


@dataclass
class ScanSummary:
    """Counts over every record of the output (including those a resumed scan found already there)."""

    total: int = 0
    scanned: int = 0
    errors: int = 0
    flagged: int = 0
    resized: int = 0
    resumed: int = 0
    interrupted: bool = False
    output: str | None = None
    flagged_by_class: dict[str, int] = field(default_factory=dict)
    predicted_by_class: dict[str, int] = field(default_factory=dict)
    kinds: dict[str, int] = field(default_factory=dict)
    error_reasons: dict[str, int] = field(default_factory=dict)
    alarm: ClassAlarm | None = None
    _flag_counts: Counter = field(default_factory=Counter, repr=False)
    _pred_counts: Counter = field(default_factory=Counter, repr=False)
    _kinds: Counter = field(default_factory=Counter, repr=False)
    _reasons: Counter = field(default_factory=Counter, repr=False)

    @property
    def flag_rate(self) -> float:
        return self.flagged / self.scanned if self.scanned else 0.0

    def add(self, rec: Mapping[str, Any]) -> None:
        self.total += 1
        if rec.get("error"):
            self.errors += 1
            self._reasons[_error_reason(str(rec["error"]))] += 1
            return
        self.scanned += 1
        label = int(rec["label"])
        self._pred_counts[label] += 1
        if rec.get("resized") in (True, "true", "True", "1"):
            self.resized += 1
        if rec.get("flagged") in (True, "true", "True", "1"):
            self.flagged += 1
            self._flag_counts[label] += 1
            self._kinds[rec.get("kind") or "anomalous"] += 1

    def finish(self, class_names: Sequence[str], null_probs: Sequence[float] | None, alpha: float = 1e-3) -> None:
        name = {i: n for i, n in enumerate(class_names)}
        self.flagged_by_class = {name.get(c, str(c)): k for c, k in self._flag_counts.most_common()}
        self.predicted_by_class = {name.get(c, str(c)): k for c, k in sorted(self._pred_counts.items())}
        self.kinds = dict(self._kinds.most_common())
        self.error_reasons = dict(self._reasons.most_common())
        if null_probs is not None:
            counts = [self._flag_counts.get(c, 0) for c in range(len(null_probs))]
            self.alarm = target_class_alarm(counts, null_probs, class_names, alpha=alpha)

    def to_json(self) -> dict[str, Any]:
        rate = RateEstimate.of(np.r_[np.ones(self.flagged, bool), np.zeros(self.scanned - self.flagged, bool)])
        return {
            "total": self.total, "scanned": self.scanned, "errors": self.errors, "flagged": self.flagged,
            "flag_rate": self.flag_rate, "flag_rate_ci95": [rate.ci_low, rate.ci_high], "resized": self.resized,
            "resumed": self.resumed, "interrupted": self.interrupted, "output": self.output,
            "flagged_by_class": self.flagged_by_class, "predicted_by_class": self.predicted_by_class,
            "kinds": self.kinds, "error_reasons": self.error_reasons,
            "alarm": self.alarm.to_json() if self.alarm else None,
        }

    def lines(self) -> list[str]:
        """The human summary (what ``abl-guard scan`` prints on stderr)."""
        out = [f"scanned {self.total} inputs: {self.flagged} flagged ({self.flag_rate:.2%} of {self.scanned} scored), "
               f"{self.errors} errors" + (f", {self.resumed} from an earlier run" if self.resumed else "")
               + (" — INTERRUPTED, rerun with --resume" if self.interrupted else "")]
        if self.resized:
            out.append(f"warning: {self.resized} images were resized/converted to the model's input spec")
        if self.error_reasons:
            out.append("errors by reason: " + ", ".join(f"{k} {v}" for k, v in self.error_reasons.items()))
        if self.flagged_by_class:
            out.append("flagged by predicted class: " + ", ".join(f"{k} {v}" for k, v in
                                                                  self.flagged_by_class.items()))
        if self.kinds:
            out.append("flagged by kind: " + ", ".join(f"{k} {v}" for k, v in self.kinds.items()))
        if self.alarm is not None:
            out.append(("ALARM: " if self.alarm.fired else "") + self.alarm.message())
        return out


# ------------------------------------------------------------------------------------------------ writers


def _csv_columns(detectors: Sequence[str]) -> list[str]:
    return CSV_BASE + [f"{d}.{k}" for d in detectors for k in ("score", "p_value", "tail")]


def _csv_row(rec: Mapping[str, Any], columns: Sequence[str]) -> list[Any]:
    flat = dict(rec)
    for d, v in (rec.get("detectors") or {}).items():
        for k in ("score", "p_value", "tail"):
            flat[f"{d}.{k}"] = v.get(k)
    out = []
    for c in columns:
        v = flat.get(c)
        out.append("" if v is None else ("true" if v is True else "false" if v is False else v))
    return out


class _Writer:
    def __init__(self, f: IO[str], fmt: str, detectors: Sequence[str], header: bool) -> None:
        self.f, self.fmt = f, fmt
        self.columns = _csv_columns(detectors)
        if fmt == "csv" and header:
            self.write([], header=True)

    def write(self, records: Sequence[Mapping[str, Any]], header: bool = False) -> None:
        """One ``write`` + ``flush`` per batch: a batch is on disk whole or (before the write) not at all."""
        if self.fmt == "jsonl":
            text = "".join(json.dumps(r, allow_nan=False, default=_json_default) + "\n" for r in records)
        else:
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            if header:
                w.writerow(self.columns)
            w.writerows(_csv_row(r, self.columns) for r in records)
            text = buf.getvalue()
        self.f.write(text)
        self.f.flush()


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"cannot serialise {type(o).__name__}")


# ------------------------------------------------------------------------------------------------ resume


class _Lines:
    """Decoded lines of a binary file, counting the bytes handed out (csv.reader pulls lines only as it needs them,
    so after each row ``consumed`` is the byte offset where that row ends)."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.consumed, self.last_complete, self.count = f, 0, True, 0

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        raw = self.f.readline()
        if not raw:
            raise StopIteration
        self.consumed += len(raw)
        self.count += 1
        self.last_complete = raw.endswith(b"\n")
        return raw.decode("utf-8")


def read_records(path: str | os.PathLike, fmt: str | None = None, repair: bool = False,
                 expect_columns: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
    """Records of a verdict file in order. A torn last record (no final newline, or unparseable at the very end) is
    dropped — and cut off the file with ``repair``; anything unparseable before it raises :class:`ScanError`, and so
    does a CSV header other than ``expect_columns``."""
    path = Path(path)
    fmt = output_format(path, fmt)
    good_end = 0
    size = path.stat().st_size
    with open(path, "rb") as f:
        lines = _Lines(f)
        rows: Iterator[Any] = csv.reader(lines, strict=True) if fmt == "csv" else lines
        header: list[str] | None = None
        while True:
            try:
                row = next(rows)
                if fmt == "jsonl":
                    rec = json.loads(row) if row.strip() else None
                    if rec is not None and (not isinstance(rec, dict) or "id" not in rec):
                        raise ValueError("not a verdict record")
                elif header is None:
                    if row[: len(CSV_BASE)] != CSV_BASE:
                        raise ValueError("not an abl-guard CSV header")
                    if expect_columns is not None and row != list(expect_columns):
                        raise ScanError(f"{path}: its columns {row[len(CSV_BASE):]} are not this bundle's "
                                        f"{list(expect_columns)[len(CSV_BASE):]}; refusing to resume into it")
                    header, rec = row, None
                else:
                    if len(row) != len(header):
                        raise ValueError(f"{len(row)} fields, the header has {len(header)}")
                    rec = _csv_record(dict(zip(header, row)))
                if not lines.last_complete:
                    raise ValueError("no final newline")
            except StopIteration:
                break
            except (ValueError, UnicodeDecodeError, csv.Error) as e:
                if lines.consumed < size:
                    raise ScanError(f"{path}: record ending on line {lines.count} is not a valid {fmt} verdict "
                                    f"record ({e}); refusing to resume into it") from e
                log.warning("%s: dropping a torn last record (%d bytes) left by an interrupted run", path,
                            size - good_end)
                break
            good_end = lines.consumed
            if rec is not None:
                yield rec
    if repair and good_end != size:
        with open(path, "r+b") as f:
            f.truncate(good_end)


def _csv_record(row: dict[str, str]) -> dict[str, Any]:
    rec: dict[str, Any] = {k: v for k, v in row.items() if v != "" and "." not in k}
    for k in ("label",):
        if k in rec:
            rec[k] = int(rec[k])
    for k in ("flagged", "resized"):
        if k in rec:
            rec[k] = rec[k] == "true"
    for k in ("confidence", "p_value", "score", "threshold"):
        if k in rec:
            rec[k] = float(rec[k])
    dets: dict[str, dict[str, Any]] = {}
    for k, v in row.items():
        if "." in k and v != "":
            d, _, what = k.rpartition(".")
            dets.setdefault(d, {})[what] = v if what == "tail" else float(v)
    if dets:
        rec["detectors"] = dets
    return rec


class _DoneIds:
    """``skip(id)`` for ``--resume``: True (and one fewer left) while the output still holds that id."""

    def __init__(self, ids: Counter) -> None:
        self.left = ids

    def __call__(self, iid: str) -> bool:
        n = self.left.get(iid, 0)
        if n:
            if n == 1:
                del self.left[iid]
            else:
                self.left[iid] = n - 1
            return True
        return False


# ------------------------------------------------------------------------------------------------ the scan


class _StopFlag:
    """SIGINT/SIGTERM -> stop after the batch being written; a second SIGINT raises, but never inside a write."""

    def __init__(self) -> None:
        self.requested = 0
        self.writing = False
        self.deferred = False
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, _frame: Any) -> None:
        self.requested += 1
        if signum == signal.SIGINT and self.requested >= 2:
            if self.writing:
                self.deferred = True
            else:
                raise KeyboardInterrupt

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _batches(items: Iterable[InputItem], n: int) -> Iterator[list[InputItem]]:
    it = iter(items)
    while batch := list(islice(it, n)):
        yield batch


def _records(guard: Guard, batch: list[InputItem]) -> list[dict[str, Any]]:
    good = [it for it in batch if it.error is None]
    verdicts: dict[int, dict[str, Any]] = {}
    if good:
        try:
            vs = guard.inspect(np.stack([it.image for it in good]))
            verdicts = {id(it): v.to_json() for it, v in zip(good, vs)}
        except Exception as e:  # noqa: BLE001 - a failing batch must not lose its inputs
            log.warning("batch failed (%s); retrying inputs one by one", e)
            for it in good:
                try:
                    verdicts[id(it)] = guard.inspect(it.image[None])[0].to_json()
                except Exception as e1:  # noqa: BLE001
                    it.error = f"scoring failed: {type(e1).__name__}: {e1}"
    out = []
    for it in batch:
        rec: dict[str, Any] = {"id": it.id}
        if it.source is not None and it.source != it.id:
            rec["source"] = it.source
        v = verdicts.get(id(it))
        if v is None:
            rec["error"] = it.error or "not scored"
        else:
            rec.update(v)
            if it.resized:
                rec["resized"] = True
        out.append(rec)
    return out


def scan(guard: Guard, items: Iterable[InputItem], out: IO[str], batch_size: int = 256, quiet: bool = False,
         fmt: str = "jsonl", header: bool = True, summary: ScanSummary | None = None,
         alarm_alpha: float = 1e-3) -> ScanSummary:
    """Score ``items`` in batches, writing one record per input (in input order) to ``out``."""
    summary = summary or ScanSummary()
    writer = _Writer(out, fmt, guard.detector_names, header)
    bar = progress_bar(desc="scan", unit="img", quiet=quiet)
    with _StopFlag() as stop:
        try:
            for batch in _batches(items, batch_size):
                recs = _records(guard, batch)
                stop.writing = True
                try:
                    writer.write(recs)
                finally:
                    stop.writing = False
                for r in recs:
                    summary.add(r)
                bar.update(len(batch))
                bar.set_postfix(flagged=summary.flagged, errors=summary.errors, refresh=False)
                if stop.deferred:
                    raise KeyboardInterrupt
                if stop.requested:
                    summary.interrupted = True
                    break
        except KeyboardInterrupt:
            summary.interrupted = True
        finally:
            bar.close()
    if summary.interrupted:
        log.warning("scan interrupted after %d records; the output ends on a complete record — rerun with --resume",
                    summary.total)
    cal = guard.manifest.get("calibration", {})
    null = (cal.get("alarm_null") or {}).get("dirichlet")
    summary.finish(guard.class_names, null, alarm_alpha)
    return summary


def _existing(guard: Guard, path: Path, fmt: str) -> tuple[ScanSummary, Counter]:
    """The summary and id counts of an output to resume into; repairs a torn last record."""
    summary = ScanSummary(output=str(path))
    ids: Counter = Counter()
    if path.exists() and path.stat().st_size > 0:
        cols = _csv_columns(guard.detector_names) if fmt == "csv" else None
        for rec in read_records(path, fmt, repair=True, expect_columns=cols):
            summary.add(rec)
            ids[str(rec["id"])] += 1
    summary.resumed = summary.total
    return summary, ids


def scan_to_file(guard: Guard, items: Iterable[InputItem], path: str | os.PathLike, batch_size: int = 256,
                 quiet: bool = False, fmt: str | None = None, resume: bool = False, alarm_alpha: float = 1e-3,
                 prior: ScanSummary | None = None) -> ScanSummary:
    """Scan ``items`` into ``path`` (``-`` = stdout). With ``resume`` the records are appended to an existing file
    (its torn last record cut off) and counted in the summary; the caller filters out the inputs it already holds —
    :func:`scan_sources` does both. ``prior`` is that file's summary when the caller has read it already."""
    fmt = output_format(path, fmt)
    if str(path) == "-":
        return scan(guard, items, sys.stdout, batch_size, quiet, fmt, alarm_alpha=alarm_alpha)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if resume:
        summary = prior if prior is not None else _existing(guard, p, fmt)[0]
        append = p.exists() and p.stat().st_size > 0
    else:
        summary, append = ScanSummary(output=str(p)), False
    with open(p, "a" if append else "w", encoding="utf-8", newline="") as f:
        return scan(guard, items, f, batch_size, quiet, fmt, not append, summary, alarm_alpha)


def scan_sources(guard: Guard, sources: Sequence[str], path: str | os.PathLike, *, batch_size: int = 256,
                 quiet: bool = False, fmt: str | None = None, resume: bool = False, stdin: IO[str] | None = None,
                 alarm_alpha: float = 1e-3) -> ScanSummary:
    """Scan input sources (folders, files, ``-``) into ``path``; the whole ``abl-guard scan`` minus the printing."""
    from .sources import iter_inputs

    fmt = output_format(path, fmt)
    prior, skip = None, None
    if resume:
        if str(path) == "-":
            raise ScanError("--resume needs an output file, not stdout")
        prior, ids = _existing(guard, Path(path), fmt)
        skip = _DoneIds(ids)
    items = iter_inputs(sources, guard.input_shape, skip=skip, stdin=stdin)
    summary = scan_to_file(guard, items, path, batch_size, quiet, fmt, resume, alarm_alpha, prior)
    if skip is not None and skip.left:
        log.warning("%d records in %s match no input of this scan (inputs changed since?)", sum(skip.left.values()),
                    path)
    return summary
