"""Batch scanning on Ray Data: the guard as a stateful ``map_batches`` actor, with the local scan's records.

``abl-guard scan --engine ray`` and :func:`scan_dataset` run the same scoring as :func:`guard.scan.scan` on a Ray
cluster (a local one by default, ``--address`` for a running one): each actor loads the bundle once — shipped to it
through the object store as the hashed ``.zip`` archive and verified by :meth:`Guard.load` — and turns batches into
records with the local scan's own batch function, so a record is a verdict or an error exactly as there (a failing
batch is retried input by input; a malformed input is an error record, never a failed job). The driver writes the
records in input order with the local scan's writer (JSONL / CSV), or as Parquet part files, and computes the
summary and the stream alarms (:class:`guard.scan.ScanSummary`) over the whole stream, resumed records included.

Reading sources (``scan_sources_ray``): the driver first enumerates every input with
:func:`guard.sources.iter_inputs` — asking its ``skip`` hook for every id and answering "skip", so nothing is decoded —
which numbers the inputs and applies ``--resume`` (the local scan's counted id matching). Read tasks then decode
contiguous ranges of those numbers in parallel, each by running ``iter_inputs`` from the source that holds its range
and keeping only its numbers; the records therefore carry the local scan's ids, sources and errors, in its order.
Named ``.parquet`` files are a source too (an ``image`` column of encoded bytes or ``{"bytes": ...}``, an optional
``id`` column; ids default to ``PATH#ROW``). Paths are made absolute on the driver and must be readable by the
workers (shared storage on a multi-node cluster); stdin (``-``) cannot be scanned on Ray.

Deviations from the local scan, each stated once: records are scored in batches of the actor's blocks, so scores may
differ in their last digits (:mod:`guard.records` states the tolerance); a read task re-walks the listing up to its
range (array files are re-read up to it), which costs I/O but no decoding; on a user's Ray dataset ``--resume`` skips
every occurrence of an id already written (ids are expected to be unique there; the local scan counts occurrences);
Ctrl-C stops the driver after the batch being written, as locally, but the Parquet output keeps only whole part files.
Never imports torch.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import json
import logging
import math
import os
import re
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .progress import progress_bar
from .runtime import Guard
from .scan import (
    CSV_BASE,
    DoneIds,
    RecordWriter,
    ScanError,
    ScanSummary,
    batch_records,
    check_batch_size,
    check_output_path,
    clean_record,
    existing_output,
    json_default,
    locked_output,
    read_records,
)
from .sources import (
    DEFAULT_LIMITS,
    InputItem,
    SourceError,
    SourceLimits,
    decode_image,
    error_text,
    iter_inputs,
    safe_text,
    unreadable_image,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

#: output formats of the Ray scan: the local scan's two, and a folder of Parquet part files
RAY_FORMATS = ("jsonl", "csv", "parquet")
PARQUET_EXTS = (".parquet", ".pq")
#: columns a user's dataset may hold its images in (encoded bytes, ``{"bytes": ...}`` or an array) and its ids in
IMAGE_COLUMNS = ("image", "img", "bytes")
ID_COLUMNS = ("id", "path")
_PART = re.compile(r"part-(\d{6})\.parquet")
_BLOCK_BYTES = 32 * 2**20  # decoded inputs per block handed from a read task to the actors


class RayScanError(ScanError):
    """The Ray scan cannot start: Ray is missing, the cluster cannot be reached, or the input cannot go on Ray."""


@dataclass(frozen=True)
class RayScanConfig:
    """How the scan uses the cluster. ``concurrency``: guard actors (default: the cluster's CPUs minus one, so the
    read tasks keep a core). ``threads``: onnxruntime intra-op threads per actor (each actor reserves one CPU).
    ``rows_per_task``: inputs decoded per read task. ``rows_per_file``: records per Parquet part file.
    ``address``: a running cluster (``auto`` or ``ray://host:port``); ``None`` starts a local one with ``num_cpus``
    and ``object_store_memory`` (Ray's defaults when ``None``)."""

    address: str | None = None
    concurrency: int | None = None
    threads: int = 1
    batch_size: int = 256
    rows_per_task: int = 4096
    rows_per_file: int = 100_000
    num_cpus: int | None = None
    object_store_memory: int | None = None

    def __post_init__(self) -> None:
        check_batch_size(self.batch_size)
        for name in ("threads", "rows_per_task", "rows_per_file"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.concurrency is not None and (isinstance(self.concurrency, bool) or self.concurrency < 1):
            raise ValueError(f"concurrency must be a positive integer, got {self.concurrency!r}")


def _ray() -> Any:
    """The ``ray`` module; a ``ModuleNotFoundError`` naming ``ray`` (the CLI's exit 7, "install the extra")."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ModuleNotFoundError("the Ray scan needs Ray Data: pip install 'abl-guard[ray]'", name="ray") from e
    return ray


@contextlib.contextmanager
def ray_cluster(cfg: RayScanConfig, quiet: bool = False) -> Iterator[Any]:
    """The ``ray`` module with a connection: the one already open, ``cfg.address``, or a local cluster started here
    (and shut down on exit). Raises :class:`RayScanError` when the cluster cannot be reached."""
    ray = _ray()
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": not quiet,
                                  "logging_level": logging.WARNING}
        if cfg.address is None:
            kwargs.update(num_cpus=cfg.num_cpus, object_store_memory=cfg.object_store_memory)
        try:
            ray.init(address=cfg.address, **kwargs)
        except Exception as e:  # noqa: BLE001 - ConnectionError, RuntimeError, ValueError: all "cannot connect"
            raise RayScanError(f"cannot start or reach the Ray cluster ({cfg.address or 'local'}): "
                               f"{type(e).__name__}: {e}") from e
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


# ------------------------------------------------------------------------------------------------ Parquet input


def _is_parquet(src: str) -> bool:
    return src.lower().endswith(PARQUET_EXTS) and os.path.isfile(src)


def _image_bytes(v: Any) -> Any:
    """The encoded bytes of a Parquet/Arrow image cell: bytes, or a ``{"bytes": ...}`` struct (Hugging Face)."""
    if isinstance(v, Mapping):
        return v.get("bytes")
    return v


def _decode_item(iid: str, value: Any, input_shape: Sequence[int], limits: SourceLimits, ref: str) -> InputItem:
    """One item from a dataset cell — encoded bytes or an image array — with the local sources' error messages."""
    from .preprocess import InputError, to_model_input

    value = _image_bytes(value)
    if value is None:
        return InputItem(iid, error="invalid input: no image in this row", source=ref)
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            x, resized = decode_image(bytes(value), input_shape, max_pixels=limits.max_pixels)
            return InputItem(iid, x, resized=resized, source=ref)
        except SourceError as e:
            return InputItem(iid, error=error_text(str(e)), source=ref)
        except Exception as e:  # noqa: BLE001 - PIL raises many types; every input still gets an answer
            return InputItem(iid, error=unreadable_image(e), source=ref)
    try:
        arr = np.asarray(value)
        if arr.dtype == object:
            raise InputError(f"an image cell must be bytes or a numeric array, got {type(value).__name__}")
        x = to_model_input(arr[None], input_shape)
        if len(x) != 1:
            raise InputError(f"array of shape {arr.shape} does not fit the model")
        return InputItem(iid, x[0], source=ref)
    except InputError as e:
        return InputItem(iid, error=error_text(f"invalid input: {e}"), source=ref)
    except Exception as e:  # noqa: BLE001
        return InputItem(iid, error=error_text(f"invalid input: {type(e).__name__}: {e}"), source=ref)


def _parquet_items(path: str, input_shape: Sequence[int], skip: Callable[[str], bool], limits: SourceLimits,
                   batch_rows: int = 256) -> Iterator[InputItem]:
    """Items of a Parquet file: one per row (ids from an ``id`` column or ``PATH#ROW``), or one error record for a
    file that cannot be read or holds no image column. ``skip`` is asked once per record before decoding."""
    pid = safe_text(path)
    try:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        col = next((c for c in IMAGE_COLUMNS if c in names), None)
        if col is None:
            raise SourceError(f"invalid input: no image column ({'/'.join(IMAGE_COLUMNS)}) among {names[:10]}")
        id_col = "id" if "id" in names else None
        batches = pf.iter_batches(batch_size=batch_rows, columns=[col] + ([id_col] if id_col else []))
    except SourceError as e:
        if not skip(pid):
            yield InputItem(pid, error=error_text(str(e)), source=pid)
        return
    except Exception as e:  # noqa: BLE001 - not Parquet, truncated footer, unreadable
        if not skip(pid):
            yield InputItem(pid, error=error_text(f"unreadable Parquet file: {type(e).__name__}: {e}"), source=pid)
        return
    row = 0
    try:
        for b in batches:
            images = b.column(col).to_pylist()
            ids = b.column(id_col).to_pylist() if id_col else [None] * len(images)
            for value, raw_id in zip(images, ids):
                ref = f"{pid}#{row}"
                row += 1
                iid = ref if raw_id is None else safe_text(str(raw_id))
                if not skip(iid):
                    yield _decode_item(iid, value, input_shape, limits, ref)
    except Exception as e:  # noqa: BLE001 - a corrupt row group: one record for the rest of the file
        if not skip(pid):
            yield InputItem(pid, error=error_text(f"unreadable Parquet rows from {row}: {type(e).__name__}: {e}"),
                            source=pid)


def _source_items(sources: Sequence[str], input_shape: Sequence[int], skip: Callable[[str], bool],
                  limits: SourceLimits) -> Generator[InputItem, None, None]:
    """The local scan's items (``iter_inputs``) with named Parquet files read by :func:`_parquet_items`."""
    for src in sources:
        if _is_parquet(src):
            yield from _parquet_items(src, input_shape, skip, limits)
        else:
            yield from iter_inputs([src], input_shape, skip, limits=limits)


# ------------------------------------------------------------------------------------------------ the read plan


@dataclass
class ReadPlan:
    """The inputs of a scan, numbered in the local scan's order without decoding them.

    Every record the sources yield gets the next number (whether ``--resume`` skips it or not, so every read task
    numbers alike); ``todo`` holds the runs ``[start, stop)`` of numbers to scan, ``starts[i]`` the first number of
    ``sources[i]``."""

    sources: list[str]
    starts: list[int]
    todo: list[tuple[int, int]]
    total: int

    @property
    def count(self) -> int:
        return sum(b - a for a, b in self.todo)

    def tasks(self, rows_per_task: int) -> list[tuple[int, list[tuple[int, int]]]]:
        """``(first source, runs)`` for each read task: consecutive numbers, ``rows_per_task`` of them at most."""
        out: list[list[tuple[int, int]]] = []
        cur: list[tuple[int, int]] = []
        n = 0
        for a, b in self.todo:
            while a < b:
                take = min(b - a, rows_per_task - n)
                cur.append((a, a + take))
                a, n = a + take, n + take
                if n == rows_per_task:
                    out.append(cur)
                    cur, n = [], 0
        if cur:
            out.append(cur)
        return [(bisect.bisect_right(self.starts, runs[0][0]) - 1, runs) for runs in out]


def plan_reads(sources: Sequence[str], input_shape: Sequence[int], skip: Callable[[str], bool] | None = None,
               limits: SourceLimits | None = None) -> ReadPlan:
    """Number every input of ``sources`` (absolute paths) in order; ``skip`` (``--resume``) marks those not to scan.

    Nothing is decoded: the sources' ``skip`` hook is answered "skip" for every id (array files are still read).
    A record the sources yield without asking (none do today) is numbered and scanned."""
    limits = limits or DEFAULT_LIMITS
    todo: list[tuple[int, int]] = []
    counter = 0
    starts: list[int] = []

    def keep(o: int) -> None:
        if todo and todo[-1][1] == o:
            todo[-1] = (todo[-1][0], o + 1)
        else:
            todo.append((o, o + 1))

    def ask(iid: str) -> bool:
        nonlocal counter
        o, counter = counter, counter + 1
        if skip is None or not skip(iid):
            keep(o)
        return True

    for src in sources:
        starts.append(counter)
        for _item in _source_items([src], input_shape, ask, limits):  # only records nobody asked about arrive
            keep(counter)
            counter += 1
    return ReadPlan(list(sources), starts, todo, counter)


class _Runs:
    """Membership in sorted runs of numbers, asked in increasing order."""

    def __init__(self, runs: Sequence[tuple[int, int]]) -> None:
        self.runs, self.i = list(runs), 0
        self.last = runs[-1][1] - 1 if runs else -1

    def __contains__(self, o: int) -> bool:
        while self.i < len(self.runs) and self.runs[self.i][1] <= o:
            self.i += 1
        return self.i < len(self.runs) and self.runs[self.i][0] <= o


def _item_rows(items: Sequence[tuple[int, InputItem]]) -> dict[str, Any]:
    """A block (dict of numpy columns) of decoded items: ``x`` holds the float32 input's bytes (model shape)."""
    return {
        "seq": np.array([o for o, _ in items], np.int64),
        "id": np.array([safe_text(it.id) for _, it in items], dtype=object),
        "source": np.array([None if it.source is None else safe_text(it.source) for _, it in items], dtype=object),
        "error": np.array([it.error for _, it in items], dtype=object),
        "resized": np.array([bool(it.resized) for _, it in items], bool),
        "x": np.array([None if it.image is None else np.ascontiguousarray(it.image, np.float32).tobytes()
                       for _, it in items], dtype=object),
    }


def read_range(sources: Sequence[str], first: int, base: int, runs: Sequence[tuple[int, int]],
               input_shape: Sequence[int], limits: SourceLimits, block_rows: int) -> Iterator[dict[str, Any]]:
    """One read task: the items numbered in ``runs``, decoded, in blocks of ``block_rows``.

    Walks the sources from ``sources[first]`` (whose first number is ``base``), numbering every asked id like
    :func:`plan_reads` and keeping its own; stops once past its last number. Raises ``RuntimeError`` when the
    sources hand out an item other than the one just asked about (the numbering would be wrong)."""
    want = _Runs(runs)
    counter = base
    pending: deque[tuple[int, str]] = deque()

    def ask(iid: str) -> bool:
        nonlocal counter
        o, counter = counter, counter + 1
        if o in want:
            pending.append((o, iid))
            return False
        return True

    block: list[tuple[int, InputItem]] = []
    gen = _source_items(sources[first:], input_shape, ask, limits)
    try:
        for item in gen:
            if pending:
                o, iid = pending.popleft()
                if iid != item.id:
                    raise RuntimeError(f"input sources broke the skip contract: asked about {iid!r}, got {item.id!r}")
            else:  # a record nobody asked about: numbered like plan_reads does
                o, counter = counter, counter + 1
                if o not in want:
                    continue
            block.append((o, item))
            if len(block) >= block_rows:
                yield _item_rows(block)
                block = []
            if counter > want.last and not pending:
                break
    finally:
        gen.close()
    if block:
        yield _item_rows(block)


def _item_types() -> dict[str, Any]:
    import pyarrow as pa

    return {"seq": pa.int64(), "id": pa.string(), "source": pa.string(), "error": pa.string(),
            "resized": pa.bool_(), "x": pa.binary()}


class _PlanSource:
    """A Ray ``Datasource`` of :func:`read_range` tasks (created lazily so that this module imports without Ray)."""

    @staticmethod
    def make(plan: ReadPlan, input_shape: Sequence[int], limits: SourceLimits, rows_per_task: int) -> Any:
        import pyarrow as pa
        from ray.data.block import BlockMetadata
        from ray.data.datasource import Datasource, ReadTask

        _ITEM_TYPES = _item_types()  # noqa: N806 - a constant of the closure below
        row_bytes = 4 * math.prod(int(v) for v in input_shape)
        block_rows = max(1, min(rows_per_task, _BLOCK_BYTES // row_bytes))
        shape = tuple(int(v) for v in input_shape)

        def task_fn(first: int, runs: list[tuple[int, int]]) -> Callable[[], Iterator[Any]]:
            def read() -> Iterator[Any]:
                for cols in read_range(plan.sources, first, plan.starts[first], runs, shape, limits, block_rows):
                    yield pa.table({k: pa.array(list(v) if v.dtype == object else v, type=_ITEM_TYPES[k])
                                    for k, v in cols.items()})
            return read

        class PlanDatasource(Datasource):
            def estimate_inmemory_data_size(self) -> int | None:
                return plan.count * (row_bytes + 256)

            def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                               data_context: Any = None) -> list[Any]:
                out = []
                for first, runs in plan.tasks(rows_per_task):
                    n = sum(b - a for a, b in runs)
                    meta = BlockMetadata(num_rows=n, size_bytes=n * (row_bytes + 256), input_files=None,
                                         exec_stats=None)
                    out.append(ReadTask(task_fn(first, runs), meta))
                return out

            def get_name(self) -> str:
                return "GuardInputs"

        return PlanDatasource()


# ------------------------------------------------------------------------------------------------ the actor


def bundle_archive(bundle: str | os.PathLike) -> bytes:
    """The bundle as the bytes of its ``.zip`` archive (a folder is packed first), for shipping to the actors."""
    from .bundle import is_archive, pack_bundle

    if is_archive(bundle):
        return Path(bundle).read_bytes()
    with tempfile.TemporaryDirectory(prefix="abl-guard-ray-") as d:
        return pack_bundle(bundle, Path(d) / "bundle.zip").read_bytes()


class GuardActor:
    """The ``map_batches`` callable class: loads (and hash-checks) the bundle once per actor, then turns each batch
    into records with the local scan's batch function. Input batches (numpy format) are either decoded items from
    the read tasks (``seq``, ``id``, ``source``, ``error``, ``resized``, ``x``) or a user's rows (an image column of
    bytes or arrays, an ``id``/``path`` column); the output is ``seq``, ``id`` and the record as JSON text."""

    def __init__(self, archive: bytes, batch_size: int = 256, threads: int | None = 1,
                 image_column: str | None = None, id_column: str | None = None, skip_ids: Any = None,
                 limits: SourceLimits | None = None) -> None:
        with tempfile.TemporaryDirectory(prefix="abl-guard-actor-") as d:
            path = Path(d) / "bundle.zip"
            path.write_bytes(archive)
            self.guard = Guard.load(path, batch_size=batch_size, intra_op_threads=threads)
        self.shape = tuple(self.guard.input_shape)
        self.image_column, self.id_column = image_column, id_column
        self.skip_ids = frozenset(skip_ids or ())
        self.limits = limits or DEFAULT_LIMITS

    def _items(self, batch: Mapping[str, Any]) -> tuple[list[int], list[InputItem]]:
        if "x" in batch and "seq" in batch:
            items = []
            for iid, src, err, rs, x in zip(batch["id"], batch["source"], batch["error"], batch["resized"],
                                            batch["x"]):
                img = np.frombuffer(x, np.float32).reshape(self.shape) if isinstance(x, bytes) else None
                items.append(InputItem(str(iid), img, err if isinstance(err, str) else None, bool(rs),
                                       src if isinstance(src, str) else None))
            return [int(s) for s in batch["seq"]], items
        if self.id_column is None or self.image_column is None:
            raise ValueError("rows that are not the read tasks' decoded items need image_column and id_column")
        ids = [safe_text(str(v)) for v in batch[self.id_column]]
        keep = [i for i, iid in enumerate(ids) if iid not in self.skip_ids]
        images = batch[self.image_column]
        return [-1] * len(keep), [_decode_item(ids[i], images[i], self.shape, self.limits, ids[i]) for i in keep]

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        seqs, items = self._items(batch)
        recs = batch_records(self.guard, items) if items else []  # the local scan's batch -> records
        return {"seq": np.array(seqs, np.int64), "id": np.array([r["id"] for r in recs], dtype=object),
                "record": np.array([json.dumps(clean_record(r), allow_nan=False, default=json_default) for r in recs],
                                   dtype=object)}


def _compute(ray: Any, cfg: RayScanConfig) -> tuple[Any, int]:
    n = cfg.concurrency
    if n is None:
        n = max(1, int(ray.cluster_resources().get("CPU", 2)) - 1)
    return ray.data.ActorPoolStrategy(size=n), n


def verdict_dataset(ds: Any, bundle: str | os.PathLike, cfg: RayScanConfig | None = None, *,
                    image_column: str | None = None, id_column: str | None = None,
                    skip_ids: Iterable[str] = (), limits: SourceLimits | None = None) -> Any:
    """The lazy Ray dataset of verdict records (``seq``, ``id``, ``record`` as JSON) of a dataset of images.

    ``ds``: rows with an image column (``image_column``, default the first of :data:`IMAGE_COLUMNS`) of encoded
    bytes, ``{"bytes": ...}`` or arrays (what ``ray.data.read_images`` gives), and an id column (``id_column``,
    default ``id`` else ``path``). Rows whose id is in ``skip_ids`` are dropped before decoding."""
    ray = _ray()
    cfg = cfg or RayScanConfig()
    names = list(ds.schema().names)
    image_column = image_column or next((c for c in IMAGE_COLUMNS if c in names), None)
    id_column = id_column or next((c for c in ID_COLUMNS if c in names), None)
    if image_column not in names or id_column not in names:
        raise ValueError(f"the dataset needs an image column ({'/'.join(IMAGE_COLUMNS)}) and an id column "
                         f"({'/'.join(ID_COLUMNS)}); it has {names[:20]}")
    compute, _ = _compute(ray, cfg)
    return ds.map_batches(GuardActor, batch_size=cfg.batch_size, batch_format="numpy", compute=compute,
                          num_cpus=1, fn_constructor_kwargs={
                              "archive": bundle_archive(bundle), "batch_size": cfg.batch_size,
                              "threads": cfg.threads, "image_column": image_column, "id_column": id_column,
                              "skip_ids": sorted(skip_ids), "limits": limits})


def _source_dataset(ray: Any, plan: ReadPlan, bundle: str | os.PathLike, shape: Sequence[int], cfg: RayScanConfig,
                    limits: SourceLimits) -> Any:
    ds = ray.data.read_datasource(_PlanSource.make(plan, shape, limits, cfg.rows_per_task))
    compute, _ = _compute(ray, cfg)
    return ds.map_batches(GuardActor, batch_size=cfg.batch_size, batch_format="numpy", compute=compute,
                          num_cpus=1, fn_constructor_kwargs={"archive": bundle_archive(bundle),
                                                             "batch_size": cfg.batch_size, "threads": cfg.threads,
                                                             "limits": limits})


# ------------------------------------------------------------------------------------------------ Parquet output


def parquet_columns(detectors: Sequence[str]) -> list[str]:
    """The columns of a Parquet verdict part: the CSV columns (one per detector score, p-value and tail)."""
    return CSV_BASE + [safe_text(f"{d}.{k}") for d in detectors for k in ("score", "p_value", "tail")]


def _parquet_schema(detectors: Sequence[str]) -> Any:
    import pyarrow as pa

    types = {"label": pa.int64(), "flagged": pa.bool_(), "resized": pa.bool_(), "confidence": pa.float64(),
             "p_value": pa.float64(), "score": pa.float64(), "threshold": pa.float64()}
    fields = []
    for c in parquet_columns(detectors):
        t = types.get(c) or (pa.float64() if c.endswith((".score", ".p_value")) else pa.string())
        fields.append(pa.field(c, t))
    return pa.schema(fields)


def _parquet_table(records: Sequence[Mapping[str, Any]], schema: Any) -> Any:
    import pyarrow as pa

    cols: dict[str, list[Any]] = {n: [] for n in schema.names}
    for rec in records:
        rec = clean_record(rec)
        flat = {k: v for k, v in rec.items() if k != "detectors"}
        for d, v in (rec.get("detectors") or {}).items():
            for k in ("score", "p_value", "tail"):
                flat[f"{d}.{k}"] = v.get(k)
        for n in schema.names:
            cols[n].append(flat.get(n))
    return pa.table(cols, schema=schema)


def _parquet_records(table: Any) -> Iterator[dict[str, Any]]:
    """Records of a Parquet verdict part (null cells left out, detector columns nested back)."""
    for row in table.to_pylist():
        rec: dict[str, Any] = {}
        dets: dict[str, dict[str, Any]] = {}
        for k, v in row.items():
            if v is None:
                continue
            if "." in k:
                d, _, what = k.rpartition(".")
                dets.setdefault(d, {})[what] = v
            else:
                rec[k] = v
        if dets:
            rec["detectors"] = dets
        yield rec


def _parts(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _PART.fullmatch(p.name)) if folder.is_dir() else []


def read_parquet_records(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Records of a Parquet verdict folder in order (its ``part-NNNNNN.parquet`` files, each written whole)."""
    import pyarrow.parquet as pq

    folder = Path(path)
    if not folder.is_dir():
        raise ScanError(f"{folder} is not a Parquet verdict folder")
    for part in _parts(folder):
        try:
            table = pq.read_table(part)
        except Exception as e:  # noqa: BLE001 - a damaged part: refuse rather than guess
            raise ScanError(f"{part}: not a readable Parquet verdict part ({type(e).__name__}: {e})") from e
        yield from _parquet_records(table)


def read_verdicts(path: str | os.PathLike, fmt: str | None = None) -> Iterator[dict[str, Any]]:
    """Records of a verdict output of either engine: JSONL / CSV files, or a Parquet folder."""
    if ray_output_format(path, fmt) == "parquet":
        return read_parquet_records(path)
    return read_records(path, fmt)


class _ParquetWriter:
    """Writes records as ``part-NNNNNN.parquet`` files of ``rows_per_file`` records, each atomically (a hidden
    temporary file renamed into place), so the folder only ever holds whole parts."""

    def __init__(self, folder: Path, detectors: Sequence[str], rows_per_file: int, first_part: int) -> None:
        self.folder, self.rows = folder, rows_per_file
        self.schema = _parquet_schema(detectors)
        self.buffer: list[Mapping[str, Any]] = []
        self.part = first_part

    def write(self, records: Sequence[Mapping[str, Any]]) -> None:
        self.buffer.extend(records)
        while len(self.buffer) >= self.rows:
            self._flush(self.buffer[: self.rows])
            self.buffer = self.buffer[self.rows :]

    def close(self) -> None:
        if self.buffer:
            self._flush(self.buffer)
            self.buffer = []

    def _flush(self, records: Sequence[Mapping[str, Any]]) -> None:
        import pyarrow.parquet as pq

        name = f"part-{self.part:06d}.parquet"
        tmp = self.folder / f".{name}.tmp"
        pq.write_table(_parquet_table(records, self.schema), tmp)
        os.replace(tmp, self.folder / name)
        self.part += 1


@contextlib.contextmanager
def _locked_folder(folder: Path, resume: bool) -> Iterator[None]:
    """The Parquet output folder created and ``flock``-ed (exclusive, non-blocking); emptied of parts unless
    resuming. Only this scan's own files (parts and their temporaries) are ever removed."""
    from .scan import ScanOutputError

    if folder.exists() and not folder.is_dir():
        raise ScanError(f"{folder} is a file; a Parquet output is a folder of part files")
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise ScanOutputError(f"{folder} is being written by another scan (it is locked)") from e
        for p in folder.iterdir():
            stale = p.name.startswith(".part-") and p.name.endswith(".parquet.tmp")
            if stale or (not resume and _PART.fullmatch(p.name)):
                p.unlink()
        yield
    finally:
        os.close(fd)


def ray_output_format(path: str | os.PathLike, fmt: str | None = None) -> str:
    """``fmt`` if given, else ``parquet`` for a ``.parquet`` name or an existing folder, ``csv`` for ``.csv``,
    ``jsonl`` otherwise."""
    if fmt:
        if fmt not in RAY_FORMATS:
            raise ValueError(f"format must be one of {RAY_FORMATS}")
        return fmt
    s = str(path).lower().rstrip("/")
    if s.endswith(PARQUET_EXTS) or (str(path) != "-" and os.path.isdir(path)):
        return "parquet"
    return "csv" if s.endswith(".csv") else "jsonl"


# ------------------------------------------------------------------------------------------------ the scan


def _write_stream(ray_ds: Any, summary: ScanSummary, write: Callable[[list[dict[str, Any]]], None],
                  ordered: bool, quiet: bool, total: int | None) -> None:
    """Pull the records in order and write them batch by batch; Ctrl-C stops after the batch being written."""
    bar = progress_bar(desc="scan (ray)", unit="img", quiet=quiet, total=total)
    last = -1
    try:
        for batch in ray_ds.iter_batches(batch_size=None, batch_format="numpy"):
            recs = [json.loads(r) for r in batch["record"]]
            if ordered:
                seqs = batch["seq"]
                if len(seqs) and (seqs[0] <= last or np.any(np.diff(seqs) <= 0)):
                    raise RuntimeError("Ray returned records out of input order (preserve_order was not honoured)")
                last = int(seqs[-1]) if len(seqs) else last
            write(recs)
            for r in recs:
                summary.add(r)
            bar.update(len(recs))
    except KeyboardInterrupt:
        summary.interrupted = True
        log.warning("scan interrupted after %d records; rerun with --resume", summary.total)
    finally:
        bar.close()


def _run(ray: Any, make_ds: Callable[[set[str] | None], Any], guard: Guard, output: str | os.PathLike,
         fmt: str, resume: bool, cfg: RayScanConfig, quiet: bool, alarm_alpha: float, ordered: bool,
         prepare: Callable[[Callable[[str], bool] | None], int | None] | None = None) -> ScanSummary:
    """Lock and (resume) read the output, build the dataset, stream its records into the output, summarise."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start)
    ctx.execution_options.preserve_order = True  # records leave the actors in input order
    ctx.enable_progress_bars = ctx.print_on_execution_start = False  # the scan's own bar and summary report
    path = Path(output)
    try:
        if fmt == "parquet":
            with _locked_folder(path, resume):
                summary, ids = ScanSummary(output=str(path)), Counter[str]()
                if resume:
                    for rec in read_parquet_records(path):
                        summary.add(rec)
                        ids[safe_text(rec["id"])] += 1
                    summary.resumed = summary.total
                parts = _parts(path)
                first = int(_PART.fullmatch(parts[-1].name).group(1)) + 1 if parts else 0  # type: ignore[union-attr]
                total = prepare(DoneIds(Counter(ids)) if resume else None) if prepare else None
                writer = _ParquetWriter(path, guard.detector_names, cfg.rows_per_file, first)
                try:
                    if total != 0:  # nothing left to scan: no dataset (Ray refuses one without read tasks)
                        _write_stream(make_ds(set(ids) if resume else None), summary, writer.write, ordered,
                                      quiet, total)
                finally:
                    writer.close()
        else:
            with locked_output(path, resume) as f:
                summary, ids = (existing_output(guard, path, fmt) if resume
                                else (ScanSummary(output=str(path)), Counter()))
                total = prepare(DoneIds(Counter(ids)) if resume else None) if prepare else None
                w = RecordWriter(f, fmt, guard.detector_names, header=os.fstat(f.fileno()).st_size == 0)
                if total != 0:
                    _write_stream(make_ds(set(ids) if resume else None), summary, w.write, ordered, quiet,
                                  total)
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start = saved
    summary.output = str(path)
    summary.finish(guard.class_names, guard.manifest.get("calibration") or None, alarm_alpha)
    return summary


def scan_dataset(ds: Any, bundle: str | os.PathLike, output: str | os.PathLike, *, fmt: str | None = None,
                 resume: bool = False, cfg: RayScanConfig | None = None, quiet: bool = False,
                 alarm_alpha: float = 1e-3, image_column: str | None = None,
                 id_column: str | None = None) -> ScanSummary:
    """Scan a Ray dataset of images (see :func:`verdict_dataset`) into ``output`` (JSONL / CSV file or Parquet
    folder), in the dataset's order, and return the summary over the whole output. Needs a connected Ray
    (``ray.init`` or :func:`ray_cluster`). ``resume`` skips the ids already written (every occurrence)."""
    _ray()
    cfg = cfg or RayScanConfig()
    fmt = ray_output_format(output, fmt)
    if str(output) == "-":
        raise ScanError("the Ray scan writes to a file or folder, not stdout")
    check_output_path(output, [], [bundle])
    guard = Guard.load(bundle)
    ray = _ray()

    def make(done: set[str] | None) -> Any:
        return verdict_dataset(ds, bundle, cfg, image_column=image_column, id_column=id_column,
                               skip_ids=done or ())

    return _run(ray, make, guard, output, fmt, resume, cfg, quiet, alarm_alpha, ordered=False)


def scan_sources_ray(bundle: str | os.PathLike, sources: Sequence[str], output: str | os.PathLike, *,
                     fmt: str | None = None, resume: bool = False, cfg: RayScanConfig | None = None,
                     quiet: bool = False, alarm_alpha: float = 1e-3,
                     limits: SourceLimits | None = None) -> ScanSummary:
    """``abl-guard scan --engine ray``: the local scan's sources (plus named Parquet files) scanned on Ray, with the
    local scan's records in its order; connects to ``cfg.address`` or starts a local cluster for the scan."""
    cfg = cfg or RayScanConfig()
    limits = limits or DEFAULT_LIMITS
    fmt = ray_output_format(output, fmt)
    if str(output) == "-":
        raise ScanError("the Ray scan writes to a file or folder, not stdout")
    if any(os.fsdecode(s) == "-" for s in sources):
        raise ScanError("stdin ('-') cannot be scanned on Ray: save the JSONL to a file the workers can read")
    check_output_path(output, sources, [bundle])
    guard = Guard.load(bundle)  # fails fast (BundleError) before a cluster is started
    shape = tuple(guard.input_shape)
    absolute = [os.path.abspath(os.fsdecode(s)) for s in sources]
    plan: ReadPlan | None = None

    def prepare(skip: Callable[[str], bool] | None) -> int:
        nonlocal plan
        t = time.perf_counter()
        plan = plan_reads(absolute, shape, skip, limits)
        log.info("planned %d inputs (%d to scan) in %.1fs", plan.total, plan.count, time.perf_counter() - t)
        return plan.count

    with ray_cluster(cfg, quiet) as ray:
        def make(_done: set[str] | None) -> Any:
            assert plan is not None
            return _source_dataset(ray, plan, bundle, shape, cfg, limits)

        summary = _run(ray, make, guard, output, fmt, resume, cfg, quiet, alarm_alpha, ordered=True,
                       prepare=prepare)
    return summary
