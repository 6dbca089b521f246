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

Hostile names and concurrent writers (issue 12):

* Every text a record carries is made valid Unicode the same way in both formats (:func:`safe_text`): a file name's
  undecodable byte ``0xff`` (a surrogate-escaped ``str``) becomes the four characters ``\\xff``, a lone surrogate
  from JSON becomes ``\\udxxx``. ``--resume`` matches ids through the same mapping, so such inputs resume cleanly.
  Valid names are left alone, so the mapping is not injective: a name that literally holds ``\\xff`` collides with
  one holding the byte. A text longer than :data:`MAX_TEXT` keeps its start and a hash of the whole
  (:func:`record_text`), so a record, and a line read back, stay bounded.
* CSV string cells (id, source, error, class_name, kind, tail, detector names in the header) that a spreadsheet would
  run as a formula (first character ``= + - @``, tab or CR) get a leading ``'`` (OWASP's CSV-injection advice); so
  does a cell that starts with ``'`` itself and the empty string, so reading strips exactly one quote and every id
  round-trips. Numeric cells (negative scores) are never touched. Rows holding a CR are written fully quoted.
* The output file is locked (``flock``, exclusive, non-blocking) before it is truncated or read for ``--resume`` and
  stays locked to the end; a second scan into it is refused with :class:`ScanError`. The lock is on the file itself,
  which truncation, repair and appends all keep (no stale lock files); only regular files are locked, so ``-o
  /dev/null`` and pipes still work. An output that is one of the named inputs, lies inside a named input folder or is
  a protected path (the bundle) is refused before anything is opened.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import logging
import math
import os
import signal
import stat
import sys
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import IO, Any

import numpy as np

from .calibration import ClassAlarm, RateEstimate, stream_alarms
from .progress import progress_bar
from .runtime import Guard
from .sources import InputItem, SourceLimits, safe_text

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: concurrent scans into one output are not prevented
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

FORMATS = ("jsonl", "csv")
CSV_BASE = ["id", "source", "error", "label", "class_name", "confidence", "flagged", "p_value", "score",
            "threshold", "kind", "resized"]
#: CSV columns holding free text (plus every detector's ``.tail``): formula-neutralised on write, restored on read
CSV_TEXT = frozenset({"id", "source", "error", "class_name", "kind"})
#: inputs scored per batch at most: a batch is held as float32 images (224x224x3: 600 KB each, 2.4 GB at the cap)
MAX_BATCH_SIZE = 4096
#: characters of any text in a record (ids, sources, errors): a longer one keeps a prefix and the hash of the whole
MAX_TEXT = 4096
#: bytes of one line of a verdict file read back (a record of MAX_TEXT-long texts is well below it)
MAX_LINE_BYTES = 1 << 20


class ScanError(RuntimeError):
    """The scan cannot start: the output to resume is not a verdict file of this format (or holds an odd record), is
    not a regular file, is being written by another scan, or would overwrite an input."""


class ScanOutputError(ScanError):
    """The output is being written by another scan, or would overwrite what this scan reads (an input, the bundle)."""


def check_batch_size(batch_size: int) -> int:
    """``batch_size`` if it is an integer in ``[1, MAX_BATCH_SIZE]``; raises ``ValueError`` otherwise."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ValueError(f"batch size must be an integer from 1 to {MAX_BATCH_SIZE}, got {batch_size!r}")
    return batch_size




def record_text(text: str) -> str:
    """``text`` as a record holds it: :func:`safe_text`, and at most :data:`MAX_TEXT` characters — a longer text
    keeps its start and the SHA-256 of the whole, so distinct ids stay distinct and ``--resume`` still matches them
    (a 64 MB JSONL id would otherwise make a 64 MB record, past what a CSV reader accepts). Idempotent."""
    if text.isascii() and len(text) <= MAX_TEXT:  # the common case, without the regex
        return text
    text = safe_text(text)
    if len(text) <= MAX_TEXT:
        return text
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
    tail = f"...[{len(text)} chars, sha256 {digest}]"
    return text[: MAX_TEXT - len(tail)] + tail


def clean_record(v: Any) -> Any:
    """A record made writable in both formats: text as :func:`record_text`, non-finite floats as ``None`` (JSON has
    no NaN), numpy scalars as Python numbers."""
    t = type(v)
    if t is str:
        return record_text(v)
    if t is float:
        return v if math.isfinite(v) else None
    if v is None or t is bool or t is int:
        return v
    if isinstance(v, dict):
        return {record_text(str(k)): clean_record(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean_record(x) for x in v]
    if isinstance(v, np.generic):
        return clean_record(v.item())
    if isinstance(v, str):  # a str subclass
        return record_text(str(v))
    if isinstance(v, float):
        return clean_record(float(v))
    return v


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")


def _csv_cell(text: str) -> str:
    """A text cell a spreadsheet shows as text: a leading ``'`` before a formula character, a ``'`` and the empty
    string (so that :func:`_csv_text` can strip exactly one quote)."""
    return "'" + text if not text or text.startswith(_FORMULA_START) else text


def _csv_text(cell: str) -> str:
    """Inverse of :func:`_csv_cell`."""
    return cell[1:] if cell.startswith("'") else cell


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

    def finish(self, class_names: Sequence[str], null_probs: Sequence[float] | Mapping[str, Any] | None,
               alpha: float = 1e-3) -> None:
        """Tally the counts and run the stream alarms; ``null_probs`` is the bundle's calibration section (the
        class alarm conditional on the stream's prediction mix, plus the drift alarm) or just its alarm null."""
        name = {i: n for i, n in enumerate(class_names)}
        self.flagged_by_class = {name.get(c, str(c)): k for c, k in self._flag_counts.most_common()}
        self.predicted_by_class = {name.get(c, str(c)): k for c, k in sorted(self._pred_counts.items())}
        self.kinds = dict(self._kinds.most_common())
        self.error_reasons = dict(self._reasons.most_common())
        cal, raw = (null_probs, None) if isinstance(null_probs, Mapping) else (None, null_probs)
        if cal is not None and isinstance(cal.get("alarm_null"), Mapping):
            raw = cal["alarm_null"].get("dirichlet")
        null = _alarm_null(raw, len(class_names))
        if null is not None:
            counts = [self._flag_counts.get(c, 0) for c in range(len(null))]
            preds = [self._pred_counts.get(c, 0) for c in range(len(null))]
            self.alarm = stream_alarms(counts, preds, {**cal, "alarm_null": {"dirichlet": null}} if cal else null,
                                       class_names, alpha)

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


def _alarm_null(null: Any, k: int) -> list[float] | None:
    """The bundle's alarm null (Dirichlet concentrations, one per class) when it is well-formed, else ``None``."""
    if null is None:
        return None
    ok = (isinstance(null, list) and len(null) == k
          and all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) and a >= 0
                  for a in null))
    if not ok:
        log.warning("the bundle's alarm null is malformed (not %d non-negative numbers); no target-class alarm", k)
        return None
    return [float(a) for a in null]


# ------------------------------------------------------------------------------------------------ writers


def _csv_columns(detectors: Sequence[str]) -> list[str]:
    return CSV_BASE + [f"{record_text(d)}.{k}" for d in detectors for k in ("score", "p_value", "tail")]


def _is_text_column(column: str) -> bool:
    return column in CSV_TEXT or column.endswith(".tail")


def _csv_row(rec: Mapping[str, Any], columns: Sequence[str]) -> list[Any]:
    flat = dict(rec)
    for d, v in (rec.get("detectors") or {}).items():
        for k in ("score", "p_value", "tail"):
            flat[f"{d}.{k}"] = v.get(k) if isinstance(v, Mapping) else None
    out = []
    for c in columns:
        v = flat.get(c)
        if v is None:
            out.append("")
        elif isinstance(v, bool):
            out.append("true" if v else "false")
        elif _is_text_column(c):
            out.append(_csv_cell(str(v)))
        else:
            out.append(v)
    return out


class RecordWriter:
    """Writes verdict records as JSONL or CSV (the bundle's detector columns), one write + flush per batch; the local
    and the Ray scan share it."""

    def __init__(self, f: IO[str], fmt: str, detectors: Sequence[str], header: bool) -> None:
        self.f, self.fmt = f, fmt
        self.columns = _csv_columns(detectors)
        if fmt == "csv" and header:
            self.write([], header=True)

    def _csv(self, records: Sequence[Mapping[str, Any]], header: bool) -> str:
        buf = io.StringIO()
        plain = csv.writer(buf, lineterminator="\n")
        # csv quotes a field holding the line terminator but not a lone CR, which its reader then rejects
        quoted = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL)
        rows = [[_csv_cell(c) for c in self.columns]] if header else []
        rows += [_csv_row(r, self.columns) for r in records]
        for row in rows:
            (quoted if any(isinstance(c, str) and "\r" in c for c in row) else plain).writerow(row)
        return buf.getvalue()

    def write(self, records: Sequence[Mapping[str, Any]], header: bool = False) -> None:
        """One ``write`` + ``flush`` per batch: a batch is on disk whole or (before the write) not at all. Total:
        every record is made writable first (:func:`clean_record`)."""
        records = [clean_record(r) for r in records]
        if self.fmt == "jsonl":
            text = "".join(json.dumps(r, allow_nan=False, default=json_default) + "\n" for r in records)
        else:
            text = self._csv(records, header)
        try:
            self.f.write(text)
        except UnicodeEncodeError:  # a stream that is not UTF-8 (stdout under LANG=C): escape what it cannot encode
            enc = getattr(self.f, "encoding", None) or "ascii"
            self.f.write(text.encode(enc, "backslashreplace").decode(enc))
        self.f.flush()


def json_default(o: Any) -> Any:
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
        raw = self.f.readline(MAX_LINE_BYTES + 1)
        if not raw:
            raise StopIteration
        if len(raw) > MAX_LINE_BYTES:  # never hold a whole line of a file that is not ours
            self.consumed += len(raw)
            self.count += 1
            raise ValueError(f"a line longer than {MAX_LINE_BYTES} bytes")
        self.consumed += len(raw)
        self.count += 1
        self.last_complete = raw.endswith(b"\n")
        return raw.decode("utf-8")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_record(rec: Any) -> str | None:
    """Why ``rec`` is not a verdict record this module could have written (``None`` when it is one): a text ``id``;
    an error record has a text ``error``; a verdict an integer ``label``, booleans for ``flagged`` / ``resized``,
    numbers (or null) for the scores and a text ``kind`` / ``class_name`` where present."""
    if not isinstance(rec, dict):
        return f"a {type(rec).__name__}, not an object"
    if not isinstance(rec.get("id"), str):
        return "no text 'id'"
    if rec.get("error") is not None:
        return None if isinstance(rec["error"], str) and rec["error"] else "'error' is not a non-empty text"
    label = rec.get("label")
    if isinstance(label, bool) or not isinstance(label, int):
        return f"label {label!r} is not an integer"
    for k in ("flagged", "resized"):
        if rec.get(k) is not None and not isinstance(rec[k], bool):
            return f"{k!r} is not true/false"
    for k in ("confidence", "p_value", "score", "threshold"):
        if rec.get(k) is not None and not _is_number(rec[k]):
            return f"{k!r} is not a number"
    for k in ("kind", "class_name", "source"):
        if rec.get(k) is not None and not isinstance(rec[k], str):
            return f"{k!r} is not a text"
    dets = rec.get("detectors")
    if dets is not None:
        if not isinstance(dets, dict) or not all(isinstance(v, dict) for v in dets.values()):
            return "'detectors' is not an object of objects"
        for v in dets.values():
            if any(v.get(k) is not None and not _is_number(v[k]) for k in ("score", "p_value")):
                return "a detector score is not a number"
    return None


def read_records(path: str | os.PathLike, fmt: str | None = None, repair: bool = False,
                 expect_columns: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
    """Records of a verdict file in order. A torn last record (no final newline, or unparseable at the very end) is
    dropped — and cut off the file with ``repair``; anything unparseable before it raises :class:`ScanError`, and so
    do a complete record that is not a verdict record (:func:`check_record`), a CSV header other than
    ``expect_columns`` and a path that is not a regular file."""
    path = Path(path)
    fmt = output_format(path, fmt)
    good_end = 0
    try:
        st = path.stat()
    except (OSError, ValueError) as e:
        raise ScanError(f"{path}: cannot read the verdict file: {e}") from e
    if not stat.S_ISREG(st.st_mode):
        raise ScanError(f"{path} is not a regular file (a directory, pipe or device); it holds no verdict records")
    size = st.st_size
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
                    row = [_csv_text(c) for c in row]
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
                why = None if rec is None else check_record(rec)
                if why is not None:  # complete and parseable, so not torn: a file this scan did not write
                    raise ScanError(f"{path}: record ending on line {lines.count} is not a verdict record ({why}); "
                                    f"refusing to use it")
            except StopIteration:
                break
            except (ValueError, UnicodeDecodeError, csv.Error, RecursionError) as e:
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


def _csv_bool(v: str) -> bool:
    if v not in ("true", "false"):
        raise ValueError(f"{v!r} is not true/false")
    return v == "true"


def _csv_record(row: dict[str, str]) -> dict[str, Any]:
    """A CSV row as the record it was written from (text cells unquoted, numbers and booleans parsed); raises
    ``ValueError`` on a cell that does not parse."""
    rec: dict[str, Any] = {k: (_csv_text(v) if k in CSV_TEXT else v) for k, v in row.items()
                           if v != "" and "." not in k}
    for k in ("label",):
        if k in rec:
            rec[k] = int(rec[k])
    for k in ("flagged", "resized"):
        if k in rec:
            rec[k] = _csv_bool(rec[k])
    for k in ("confidence", "p_value", "score", "threshold"):
        if k in rec:
            rec[k] = float(rec[k])
    dets: dict[str, dict[str, Any]] = {}
    for k, v in row.items():
        if "." in k and v != "":
            d, _, what = k.rpartition(".")
            dets.setdefault(d, {})[what] = _csv_text(v) if what == "tail" else float(v)
    if dets:
        rec["detectors"] = dets
    return rec


class DoneIds:
    """``skip(id)`` for ``--resume``: True (and one fewer left) while the output still holds that id."""

    def __init__(self, ids: Counter) -> None:
        self.left = ids

    def __call__(self, iid: str) -> bool:
        iid = record_text(iid)  # records hold ids as written (see record_text)
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


def batch_records(guard: Guard, batch: list[InputItem]) -> list[dict[str, Any]]:
    """One record per item of ``batch``, in order: a verdict, or an error record (a failing batch is retried input by
    input, so one bad input cannot lose the others). The local and the Ray scan share it."""
    good = [(it, it.image) for it in batch if it.error is None and it.image is not None]
    verdicts: dict[int, dict[str, Any]] = {}
    if good:
        try:
            vs = guard.inspect(np.stack([image for _, image in good]))
            verdicts = {id(it): v.to_json() for (it, _), v in zip(good, vs)}
        except Exception as e:  # noqa: BLE001 - a failing batch must not lose its inputs
            log.warning("batch failed (%s); retrying inputs one by one", e)
            for it, image in good:
                try:
                    verdicts[id(it)] = guard.inspect(image[None])[0].to_json()
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
    check_batch_size(batch_size)
    summary = summary or ScanSummary()
    writer = RecordWriter(out, fmt, guard.detector_names, header)
    bar = progress_bar(desc="scan", unit="img", quiet=quiet)
    with _StopFlag() as stop:
        try:
            for batch in _batches(items, batch_size):
                recs = batch_records(guard, batch)
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
    summary.finish(guard.class_names, guard.manifest.get("calibration") or None, alarm_alpha)
    return summary


def existing_output(guard: Guard, path: Path, fmt: str) -> tuple[ScanSummary, Counter]:
    """The summary and id counts of an output to resume into; repairs a torn last record. Raises :class:`ScanError`
    on a path that is not a regular file and on a record that is not a verdict of this bundle."""
    summary = ScanSummary(output=str(path))
    ids: Counter = Counter()
    if path.exists() and (not path.is_file() or path.stat().st_size > 0):
        cols = _csv_columns(guard.detector_names) if fmt == "csv" else None
        k = len(guard.class_names)
        for rec in read_records(path, fmt, repair=True, expect_columns=cols):
            if rec.get("error") is None and not 0 <= rec["label"] < k:
                raise ScanError(f"{path}: record {record_text(rec['id'])[:80]!r} has label {rec['label']}, not a "
                                f"class of this bundle (0-{k - 1}); refusing to resume into it")
            summary.add(rec)
            ids[record_text(rec["id"])] += 1
    summary.resumed = summary.total
    return summary, ids


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
        return os.path.realpath(a) == os.path.realpath(b)
    except (OSError, ValueError):
        return False


def check_output_path(path: str | os.PathLike, inputs: Iterable[str | os.PathLike],
                      protect: Iterable[str | os.PathLike] = (), what: str = "output") -> None:
    """Refuse (:class:`ScanOutputError`) an output that would overwrite what the scan reads: a named input file
    (also through a link), a file inside a named input folder (the walk would scan the output as one of its own
    inputs), or a ``protect``-ed path (the bundle; inside it too when it is a folder). Only the named paths are
    compared — the files a JSONL input refers to are not."""
    if str(path) == "-":
        return
    real = os.path.realpath(path)
    for src in [*inputs, *protect]:
        if str(src) == "-":
            continue
        try:
            is_dir = os.path.isdir(src)
        except ValueError:  # a NUL in the name: not a path that exists
            continue
        if is_dir:
            root = os.path.realpath(src)
            if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
                raise ScanOutputError(f"the {what} {path} lies inside the folder {src} that this scan reads; "
                                      f"write it elsewhere")
        elif _same_file(path, src):
            raise ScanOutputError(f"the {what} {path} is {src}, which this scan reads; refusing to overwrite it")


def _lock(f: IO[str], path: Path) -> None:
    """An exclusive, non-blocking ``flock`` on the open output (released when it is closed, or the process dies)."""
    if fcntl is None:
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ScanOutputError(f"{path} is being written by another scan (it is locked); wait for that scan "
                                  f"or choose another output") from e
        log.warning("cannot lock %s (%s); concurrent scans into it are not prevented", path, e)


@contextlib.contextmanager
def locked_output(path: Path, resume: bool) -> Iterator[IO[str]]:
    """The output opened for appending and locked; emptied (after locking) unless resuming. A directory, and for
    ``resume`` anything but a regular file, is refused."""
    if path.is_dir():
        raise ScanError(f"{path} is a directory; the output must be a file")
    if resume and path.exists() and not path.is_file():
        raise ScanError(f"{path} is not a regular file (a pipe or device); cannot resume into it")
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a", encoding="utf-8", newline="")  # noqa: SIM115 - closed below; "a" truncates nothing unlocked
    try:
        if stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            _lock(f, path)
            if not resume:
                f.truncate(0)
        elif resume:
            raise ScanError(f"{path} is not a regular file (a pipe or device); cannot resume into it")
        yield f
    finally:
        f.close()


def _scan_open(guard: Guard, items: Iterable[InputItem], f: IO[str], p: Path, batch_size: int, quiet: bool,
               fmt: str, resume: bool, alarm_alpha: float, prior: ScanSummary | None) -> ScanSummary:
    """:func:`scan` into the locked output ``f`` (at ``p``)."""
    if resume:
        summary = prior if prior is not None else existing_output(guard, p, fmt)[0]
        append = os.fstat(f.fileno()).st_size > 0
    else:
        summary, append = ScanSummary(output=str(p)), False
    return scan(guard, items, f, batch_size, quiet, fmt, not append, summary, alarm_alpha)


def scan_to_file(guard: Guard, items: Iterable[InputItem], path: str | os.PathLike, batch_size: int = 256,
                 quiet: bool = False, fmt: str | None = None, resume: bool = False, alarm_alpha: float = 1e-3,
                 prior: ScanSummary | None = None) -> ScanSummary:
    """Scan ``items`` into ``path`` (``-`` = stdout). With ``resume`` the records are appended to an existing file
    (its torn last record cut off) and counted in the summary; the caller filters out the inputs it already holds —
    :func:`scan_sources` does both. ``prior`` is that file's summary when the caller has read it already. The file
    is locked while the scan writes it (:class:`ScanError` when another scan holds it)."""
    fmt = output_format(path, fmt)
    check_batch_size(batch_size)
    if str(path) == "-":
        return scan(guard, items, sys.stdout, batch_size, quiet, fmt, alarm_alpha=alarm_alpha)
    p = Path(path)
    with locked_output(p, resume) as f:
        return _scan_open(guard, items, f, p, batch_size, quiet, fmt, resume, alarm_alpha, prior)


def scan_sources(guard: Guard, sources: Sequence[str], path: str | os.PathLike, *, batch_size: int = 256,
                 quiet: bool = False, fmt: str | None = None, resume: bool = False, stdin: IO[str] | None = None,
                 alarm_alpha: float = 1e-3, protect: Sequence[str | os.PathLike] = (),
                 limits: SourceLimits | None = None) -> ScanSummary:
    """Scan input sources (folders, files, ``-``) into ``path``; the whole ``abl-guard scan`` minus the printing.

    The output is checked against the inputs and ``protect`` (:func:`check_output_path`) and locked before it is
    read (``resume``) or emptied, so a refused scan leaves it as it was."""
    from .sources import iter_inputs

    fmt = output_format(path, fmt)
    check_batch_size(batch_size)
    if resume and str(path) == "-":
        raise ScanError("--resume needs an output file, not stdout")
    check_output_path(path, sources, protect)
    with contextlib.ExitStack() as stack:
        out = None if str(path) == "-" else stack.enter_context(locked_output(Path(path), resume))
        prior, skip = None, None
        if resume:
            prior, ids = existing_output(guard, Path(path), fmt)
            skip = DoneIds(ids)
        items = iter_inputs(sources, guard.input_shape, skip=skip, stdin=stdin, limits=limits)
        if out is None:
            summary = scan(guard, items, sys.stdout, batch_size, quiet, fmt, alarm_alpha=alarm_alpha)
        else:
            summary = _scan_open(guard, items, out, Path(path), batch_size, quiet, fmt, resume, alarm_alpha, prior)
    if skip is not None and skip.left:
        log.warning("%d records in %s match no input of this scan (inputs changed since?)", sum(skip.left.values()),
                    path)
    return summary
