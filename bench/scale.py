"""Past one machine: the Ray Data scan against the local scan, and DDP training with 2 gloo processes against 1.

Everything runs on this machine's CPUs, so the numbers are per-core rates and fixed costs — what ``docs/scale.md``
multiplies out for a cluster — not a cluster measurement:

* DDP: ``torchrun --standalone --nproc_per_node {1,2} -m abl_guard.cli train`` on a Fashion-MNIST subset (small CNN,
  no attack, one torch thread per rank, the same global batch), time per epoch from the run record and the final
  clean accuracy; the 1-process run is a group of one, so both runs see the same batches.
* Scan: that model exported to ONNX and calibrated into a bundle; the same ``--n-scan`` Fashion-MNIST images (the
  training images repeated) as one ``.npy`` scanned by the local scan (1 and 2 onnxruntime threads) and by
  ``--engine ray`` on a local ``ray.init(num_cpus=2)`` cluster (1 guard actor + the read tasks); Ray's fixed cost is
  measured as the cluster start and as a scan of a few hundred inputs. The two outputs are compared with
  ``guard.records.stream_differences`` (the reproducibility contract).

    python bench/scale.py                    # ~10 minutes on 2 shared cores
    python bench/scale.py --n-scan 2000 --ddp-train 1000 --ddp-epochs 1 --out runs/scale-smoke   # the path works
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import cpu_name, write_markdown_keeping_notes

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("bench.scale")
CLI = [sys.executable, "-m", "abl_guard.cli", "-q"]


def run(cmd: list[str], env: dict[str, str] | None = None) -> float:
    """Run a command to completion (raising on failure); returns its wall seconds."""
    t = time.perf_counter()
    r = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t


def ddp(world: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    out = work / f"ddp{world}"
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc_per_node={world}"]
    wall = run([*torchrun, "-m", "abl_guard.cli", "-q", "train", "--dataset", "fashion-mnist", "--attack", "none",
                "--train-limit", str(args.ddp_train), "--test-limit", str(args.ddp_test), "--epochs",
                str(args.ddp_epochs), "--batch-size", "128", "--lr", "0.05", "--device", "cpu", "--threads", "1",
                "-o", str(out)], env={"OMP_NUM_THREADS": "1"})
    rec = json.loads((out / "run.json").read_text())
    epochs = [h["seconds"] for h in rec["history"]]
    return {"world_size": rec.get("world_size", 1), "backend": rec.get("backend"), "wall_s": wall,
            "epoch_s": epochs, "median_epoch_s": statistics.median(epochs),
            "images_per_s": args.ddp_train / statistics.median(epochs),
            "final_loss": rec["history"][-1]["loss"], "clean_accuracy": rec["metrics"]["clean_accuracy"],
            "train_seconds": rec["train_seconds"], "checkpoint": str(out / "model.pt")}


def make_bundle(checkpoint: str, work: Path) -> Path:
    onnx, bundle = work / "model.onnx", work / "bundle"
    run([*CLI, "export", checkpoint, "-o", str(onnx)])
    run([*CLI, "calibrate", str(onnx), "--dataset", "fashion-mnist", "--count", "3000", "--fpr", "0.01",
         "-o", str(bundle), "--force"])
    return bundle


def scans(bundle: Path, n: int, work: Path) -> dict[str, Any]:
    from abl_guard.abl.data import load_dataset
    from abl_guard.guard import Guard
    from abl_guard.guard.ray_scan import RayScanConfig, scan_sources_ray
    from abl_guard.guard.records import stream_differences
    from abl_guard.guard.scan import read_records, scan_sources

    images = load_dataset("fashion-mnist", "train").images
    data = work / "inputs.npy"
    np.save(data, np.resize(images, (n, *images.shape[1:])))
    small = work / "small.npy"
    np.save(small, images[:256])
    out: dict[str, Any] = {"n": n}
    for threads in (1, 2):
        g = Guard.load(bundle, intra_op_threads=threads)
        t = time.perf_counter()
        s = scan_sources(g, [str(data)], work / f"local{threads}.jsonl", batch_size=256, quiet=True)
        sec = time.perf_counter() - t
        out[f"local_{threads}thread"] = {"seconds": sec, "images_per_s": n / sec, "flagged": s.flagged,
                                         "errors": s.errors}
    import ray

    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    out["ray_init_s"] = time.perf_counter() - t
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        cfg = RayScanConfig(concurrency=1, threads=1, batch_size=256)
        t = time.perf_counter()
        scan_sources_ray(bundle, [str(small)], work / "ray_small.jsonl", cfg=cfg, quiet=True)
        out["ray_first_small_scan_s"] = time.perf_counter() - t  # the cluster's worker processes start here
        t = time.perf_counter()
        scan_sources_ray(bundle, [str(small)], work / "ray_small.jsonl", cfg=cfg, quiet=True)
        out["ray_small_scan_s"] = time.perf_counter() - t  # a scan's own fixed cost on a warm cluster
        t = time.perf_counter()
        s = scan_sources_ray(bundle, [str(data)], work / "ray.jsonl", cfg=cfg, quiet=True)
        sec = time.perf_counter() - t
        out["ray_1actor"] = {"seconds": sec, "images_per_s": n / sec, "flagged": s.flagged, "errors": s.errors,
                             "marginal_images_per_s": (n - 256) / max(sec - out["ray_small_scan_s"], 1e-9)}
    finally:
        ray.shutdown()
    diffs = stream_differences(list(read_records(work / "ray.jsonl")), list(read_records(work / "local1.jsonl")))
    out["ray_vs_local_differences"] = diffs
    out["driver_records_per_s"] = driver_rate(work / "local1.jsonl", work)
    return out


def driver_rate(records_path: Path, work: Path) -> float:
    """Records per second one driver core turns into output: what ``--engine ray`` does per record on the driver
    (parse the actor's JSON, write it with the local scan's writer, add it to the summary), on a scan's records."""
    from abl_guard.guard.scan import RecordWriter, ScanSummary, read_records

    texts = [json.dumps(r) for r in read_records(records_path)]
    dets = sorted((json.loads(texts[0]).get("detectors") or {}).keys())
    summary = ScanSummary()
    with open(work / "driver.jsonl", "w", encoding="utf-8") as f:
        w = RecordWriter(f, "jsonl", dets, header=False)
        t = time.perf_counter()
        for s in range(0, len(texts), 256):
            recs = [json.loads(x) for x in texts[s : s + 256]]
            w.write(recs)
            for r in recs:
                summary.add(r)
        sec = time.perf_counter() - t
    return len(texts) / sec


def markdown(res: dict[str, Any]) -> str:
    d1, d2, sc = res["ddp"]["1"], res["ddp"]["2"], res["scan"]
    lines = [
        "# Past one machine: Ray Data scan and DDP training on this machine's CPUs (`bench/scale.py`)",
        "",
        f"Command: `{res.get('command', 'python bench/scale.py')}`",
        "",
        f"Machine: {res['machine']['cpu']}, {res['machine']['cores']} cores (shared with other work while measured: "
        f"load average {res['machine']['load_before']:.1f} before the run), Python {res['machine']['python']}, "
        f"torch {res['machine']['torch']}, onnxruntime {res['machine']['onnxruntime']}, ray {res['machine']['ray']}.",
        "",
        "## DDP (gloo) — small CNN, Fashion-MNIST subset, no attack, global batch 128, 1 torch thread per rank",
        "",
        f"{res['args']['ddp_train']} training images, {res['args']['ddp_test']} test images, "
        f"{res['args']['ddp_epochs']} epochs.",
        "",
        "| processes | median epoch s | images/s | final train loss | clean accuracy % | wall s (with start-up) |",
        "|---|---|---|---|---|---|",
    ]
    for k, d in (("1", d1), ("2", d2)):
        lines.append(f"| {k} | {d['median_epoch_s']:.2f} | {d['images_per_s']:.0f} | {d['final_loss']:.4f} | "
                     f"{100 * d['clean_accuracy']:.2f} | {d['wall_s']:.1f} |")
    lines += [
        "",
        f"Speed-up per epoch, 2 processes vs 1: **{d1['median_epoch_s'] / d2['median_epoch_s']:.2f}x**.",
        "",
        f"## Scan — the same {sc['n']:,} inputs (one `.npy`), that model's bundle (Mahalanobis, 1% FPR)",
        "",
        "| engine | seconds | images/s | flagged | errors |",
        "|---|---|---|---|---|",
    ]
    for k, label in (("local_1thread", "local, 1 onnxruntime thread"), ("local_2thread", "local, 2 threads"),
                     ("ray_1actor", "ray, local cluster num_cpus=2: 1 guard actor + read tasks")):
        r = sc[k]
        lines.append(f"| {label} | {r['seconds']:.1f} | {r['images_per_s']:.0f} | {r['flagged']} | {r['errors']} |")
    lines += [
        "",
        f"Ray's fixed costs: `ray.init(num_cpus=2)` {sc['ray_init_s']:.1f} s; the first scan of 256 inputs "
        f"{sc['ray_first_small_scan_s']:.1f} s (worker processes start), the next {sc['ray_small_scan_s']:.1f} s "
        f"(plan, actor start, bundle load, per scan); marginal rate of the large scan "
        f"{sc['ray_1actor']['marginal_images_per_s']:.0f} images/s. The driver's own work per record (parse, write, "
        f"summarise) runs at {sc['driver_records_per_s']:,.0f} records/s on one core.",
        "",
        "Ray records vs local records (`stream_differences`): "
        + ("**identical within the contract**" if not sc["ray_vs_local_differences"] else
           f"{len(sc['ray_vs_local_differences'])} differences: {sc['ray_vs_local_differences'][:3]}"),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-scan", type=int, default=100_000)
    ap.add_argument("--ddp-train", type=int, default=6000)
    ap.add_argument("--ddp-test", type=int, default=2000)
    ap.add_argument("--ddp-epochs", type=int, default=3)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "scale")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale")
    ap.add_argument("--driver-only", action="store_true",
                    help="only (re)measure the driver's records/s from --work's local scan and update --out")
    args = ap.parse_args()
    if args.driver_only:
        res = json.loads(Path(f"{args.out}.json").read_text())
        res.setdefault("command", "python bench/scale.py")
        res["scan"]["driver_records_per_s"] = driver_rate(args.work / "local1.jsonl", args.work)
        Path(f"{args.out}.json").write_text(json.dumps(res, indent=2))
        write_markdown_keeping_notes(f"{args.out}.md", markdown(res))
        print(markdown(res))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    import onnxruntime
    import ray
    import torch

    res: dict[str, Any] = {
        "command": "python " + " ".join(["bench/scale.py", *sys.argv[1:]]),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "load_before": os.getloadavg()[0],
                    "python": platform.python_version(), "torch": torch.__version__,
                    "onnxruntime": onnxruntime.__version__, "ray": ray.__version__},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "ddp": {},
    }
    for world in (1, 2):
        log.info("DDP with %d process(es)", world)
        res["ddp"][str(world)] = ddp(world, args, args.work)
    log.info("bundle")
    bundle = make_bundle(res["ddp"]["1"]["checkpoint"], args.work)
    log.info("scans of %d inputs", args.n_scan)
    res["scan"] = scans(bundle, args.n_scan, args.work)
    res["machine"]["load_after"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(res, indent=2))
    write_markdown_keeping_notes(f"{args.out}.md", markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
