"""Which poisoned copies did a retrain-mode removal take? Its share of each source class (issue 17, diagnostic).

All-to-one poison relabels images of every other class to the target; a label scan that splits the target label may
take only the copies that look least like it. This script runs ``bench/abl.py`` with the given arguments up to the
start of the clean stage (the isolation, the scans and the removal, exactly as the benchmark runs them), stops there,
and tabulates the poisoned copies in the training pool by their original class (Fashion-MNIST's own labels at the
same indices): how many the removal took. Run, e.g. for WaNet 3% seed 1:

    .venv/bin/python bench/abl_removal_sources.py --out bench/results/abl_removal_sources_r03_wanet_s1_amd -- \\
        --train-limit 0 --epochs 8 --lr 0.05 --lr-milestones 5,7 --abl-mode retrain --skip-clean --threads 1 \\
        --seeds 1 --attacks wanet --rate 0.03 --baselines bench/results/abl_retrain_r03_wanet_s1_amd.json

(the ``--baselines`` file only saves the no-defence training; ``bench/abl.py``'s own ``--out`` goes to a scratch
path).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from _common import cpu_name, write_results

import abl_guard.abl.abl as abl_mod
from abl_guard.abl.data import load_fashion_mnist

HERE = Path(__file__).resolve().parent
NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


class _StopAtCleanStageError(Exception):
    pass


def removal(bench_args: list[str]) -> dict[str, np.ndarray]:
    """Run ``bench/abl.py bench_args`` until the clean stage starts; its removal, pool, poison indices and labels."""
    grabbed: dict[str, np.ndarray] = {}

    def grab(self: Any, pool: np.ndarray, batches: Any, poison_indices: Any, opt: Any) -> None:
        grabbed.update(removed=np.asarray(self.run.removed), pool=np.asarray(pool),
                       poison=np.asarray(poison_indices), labels=np.asarray(self.labels),
                       target=np.asarray(self.run.report.get("expansion", {}).get("target", -1)))
        raise _StopAtCleanStageError

    spec = importlib.util.spec_from_file_location("bench_abl", HERE / "abl.py")
    assert spec is not None and spec.loader is not None
    bench_abl = importlib.util.module_from_spec(spec)
    sys.modules["bench_abl"] = bench_abl
    spec.loader.exec_module(bench_abl)
    real = abl_mod._Stages._recheck
    abl_mod._Stages._recheck = grab  # type: ignore[method-assign]
    argv = sys.argv
    with tempfile.TemporaryDirectory() as tmp:
        sys.argv = ["bench/abl.py", *bench_args, "--out", str(Path(tmp) / "run")]
        try:
            bench_abl.main()
        except _StopAtCleanStageError:
            pass
        finally:
            sys.argv = argv
            abl_mod._Stages._recheck = real  # type: ignore[method-assign]
    if not grabbed:
        raise SystemExit("error: the run ended before a clean stage with a fresh model (nothing found?)")
    return grabbed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(HERE.parent / ".data" / "fashion-mnist"))
    ap.add_argument("--out", required=True)
    ap.add_argument("bench_args", nargs=argparse.REMAINDER, help="after --: bench/abl.py's arguments")
    args = ap.parse_args()
    bench_args = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    g = removal(bench_args)
    raw = load_fashion_mnist("train", args.data).labels
    clean = np.setdiff1d(np.arange(len(g["labels"])), g["poison"])
    if not np.array_equal(raw[clean], g["labels"][clean]):
        raise SystemExit("error: the run's training set is not Fashion-MNIST's train split in its own order")
    pool_poison = np.intersect1d(g["poison"], g["pool"])
    took = np.isin(pool_poison, g["removed"])
    rows = []
    for c in range(len(NAMES)):
        m = raw[pool_poison] == c
        if m.any():
            rows.append({"source": NAMES[c], "in_pool": int(m.sum()), "removed": int(took[m].sum())})
    record = {"command": "python bench/abl_removal_sources.py " + " ".join(sys.argv[1:]), "cpu": cpu_name(),
              "target": int(g["target"]), "removed": int(len(g["removed"])),
              "removed_clean": int(len(g["removed"]) - np.isin(g["removed"], g["poison"]).sum()), "rows": rows}
    write_results(args.out, record, render(record), keep_notes=True)


def render(r: dict[str, Any]) -> str:
    lines = ["# Which poisoned copies the removal took, by source class", "", f"`{r['command']}` — {r['cpu']}", "",
             f"Target label {r['target']}; the removal: {r['removed']} examples, {r['removed_clean']} of them clean.",
             "", "| source class | poisoned copies in the pool | removed | share |", "|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['source']} | {row['in_pool']} | {row['removed']} | "
                     f"{row['removed'] / row['in_pool']:.0%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
