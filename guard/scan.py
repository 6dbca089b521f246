"""Batch scanning: every input gets exactly one record — a verdict or an error — streamed to JSONL."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import IO, Any

import numpy as np

from .progress import progress_bar
from .runtime import Guard
from .sources import InputItem

log = logging.getLogger(__name__)


@dataclass
class ScanSummary:
    total: int = 0
    scanned: int = 0
    errors: int = 0
    flagged: int = 0
    resized: int = 0
    flagged_by_class: dict[str, int] = field(default_factory=dict)
    kinds: dict[str, int] = field(default_factory=dict)

    @property
    def flag_rate(self) -> float:
        return self.flagged / self.scanned if self.scanned else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "flag_rate": self.flag_rate}


def _batches(items: Iterable[InputItem], n: int) -> Iterator[list[InputItem]]:
    it = iter(items)
    while batch := list(islice(it, n)):
        yield batch


def scan(guard: Guard, items: Iterable[InputItem], out: IO[str], batch_size: int = 256,
         quiet: bool = False) -> ScanSummary:
    """Score ``items`` in batches, writing one JSON line per input (in input order) to ``out``."""
    summary = ScanSummary()
    by_class: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    bar = progress_bar(desc="scan", unit="img", quiet=quiet)
    for batch in _batches(items, batch_size):
        good = [it for it in batch if it.error is None]
        verdicts = {}
        if good:
            try:
                vs = guard.inspect(np.stack([it.image for it in good]))
                verdicts = {id(it): v for it, v in zip(good, vs)}
            except Exception as e:  # noqa: BLE001 - a failing batch must not lose its inputs
                log.warning("batch failed (%s); retrying inputs one by one", e)
                for it in good:
                    try:
                        verdicts[id(it)] = guard.inspect(it.image[None])[0]
                    except Exception as e1:  # noqa: BLE001
                        it.error = f"scoring failed: {e1}"
        for it in batch:
            summary.total += 1
            rec: dict[str, Any] = {"id": it.id}
            v = verdicts.get(id(it))
            if v is None:
                summary.errors += 1
                rec["error"] = it.error or "not scored"
            else:
                summary.scanned += 1
                rec.update(v.to_json())
                if it.resized:
                    rec["resized"] = True
                    summary.resized += 1
                if v.flagged:
                    summary.flagged += 1
                    by_class[v.class_name] += 1
                    kinds[v.kind or "anomalous"] += 1
            out.write(json.dumps(rec) + "\n")
        out.flush()
        bar.update(len(batch))
    bar.close()
    summary.flagged_by_class = dict(by_class.most_common())
    summary.kinds = dict(kinds.most_common())
    return summary


def scan_to_file(guard: Guard, items: Iterable[InputItem], path: str | os.PathLike, batch_size: int = 256,
                 quiet: bool = False) -> ScanSummary:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        return scan(guard, items, f, batch_size, quiet)
