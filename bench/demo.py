"""The abl-guard demo: poison Fashion-MNIST with BadNets, train, export, calibrate, scan a mixed stream.

Runs the real CLI for every step (so what it shows is what a user gets) and prints clean accuracy (CA), attack
success rate (ASR), and the guard's detection rate on triggered inputs and false-positive rate on clean ones.
Usage: python bench/demo.py [--epochs 3] [--out runs/demo] [--dataset fashion-mnist]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
# the repository root first: bench/abl.py would otherwise shadow the abl package for scripts run from bench/

from _common import cpu_name  # noqa: E402


def run(cmd: list[str]) -> None:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--fpr", type=float, default=0.01)
    ap.add_argument("--detectors", default="mahalanobis")
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--n-triggered", type=int, default=1000)
    ap.add_argument("--results", default=None, metavar="STEM",
                    help="Also write STEM.md and STEM.json (e.g. bench/results/demo) with the machine's CPU.")
    args = ap.parse_args()

    from abl_guard.abl.data import load_dataset
    from abl_guard.attacks import make_attack

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cli = str(BIN / "abl-guard")
    root = ["--data-root", args.data_root] if args.data_root else []
    t0 = time.perf_counter()
    run([cli, "train", "--dataset", args.dataset, *root, "--attack", "badnets", "--rate", "0.1", "--target", "0",
         "--epochs", str(args.epochs), "--lr", "0.05", "-o", str(out / "train")])
    run([cli, "export", str(out / "train" / "model.pt"), "-o", str(out / "model.onnx")])
    # calibrate on the first half of the clean test split; the stream below uses the second half only
    run([cli, "calibrate", str(out / "model.onnx"), "--dataset", args.dataset, *root, "--split", "test",
         "--start", "0", "--count", "5000", "--fpr", str(args.fpr), "--detectors", args.detectors,
         "-o", str(out / "model.guard"), "--force"])

    test = load_dataset(args.dataset, "test", args.data_root)
    held = test.subset(slice(5000, None))
    attack = make_attack("badnets", target=0)
    trig = attack.triggered(held.images, held.labels, held.spec.num_classes)
    pick = np.random.default_rng(0).choice(len(trig.images), min(args.n_triggered, len(trig.images)), replace=False)
    images = np.concatenate([held.images, trig.images[pick]])
    is_triggered = np.r_[np.zeros(len(held), bool), np.ones(len(pick), bool)]
    stream = out / "stream.npy"
    np.save(stream, images)
    run([cli, "scan", str(out / "model.guard"), str(stream), "-o", str(out / "verdicts.jsonl"),
         "--summary-json", str(out / "scan_summary.json")])

    with open(out / "verdicts.jsonl") as f:
        records = [json.loads(line) for line in f]
    flagged = np.array([r.get("flagged", False) for r in records])
    labels = np.array([r.get("label", -1) for r in records])
    hit = labels[is_triggered] == attack.target  # triggered inputs on which the backdoor fired
    metrics = json.loads((out / "train" / "run.json").read_text())["metrics"]
    manifest = json.loads((out / "model.guard" / "manifest.json").read_text())
    val = manifest["calibration"]["validation"]
    rows = [
        ("clean accuracy (CA)", f"{metrics['clean_accuracy']:.2%}"),
        ("attack success rate (ASR)", f"{metrics['attack_success_rate']:.2%}"),
        (f"guard detection rate on triggered inputs (n={is_triggered.sum()})", f"{flagged[is_triggered].mean():.2%}"),
        ("  ... on triggered inputs where the backdoor fired", f"{flagged[is_triggered][hit].mean():.2%}"
         if hit.any() else "n/a"),
        (f"guard false-positive rate on clean inputs (n={(~is_triggered).sum()})",
         f"{flagged[~is_triggered].mean():.2%}"),
        ("calibration: target FPR / validation FPR",
         f"{args.fpr:.2%} / {val['rate']:.2%} (95% CI {val['ci95'][0]:.2%}-{val['ci95'][1]:.2%})"),
        ("detectors", ", ".join(d["name"] for d in manifest["detectors"])),
        ("wall time", f"{time.perf_counter() - t0:.0f} s on {os.cpu_count()} CPU cores"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n== abl-guard demo: BadNets on " + args.dataset + " ==")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    (out / "demo_summary.json").write_text(json.dumps(dict(rows), indent=2))
    if args.results:
        cpu = cpu_name()
        cmd = "python bench/demo.py " + " ".join(sys.argv[1:])
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.results}.json").write_text(json.dumps(
            {"command": cmd, "cpu": cpu, "cores": os.cpu_count(), "rows": dict(rows),
             "scan_summary": json.loads((out / "scan_summary.json").read_text())}, indent=2))
        md = [f"# abl-guard demo: BadNets on {args.dataset}", "", f"Command: `{cmd}`  ", f"Machine: {cpu}, "
              f"{os.cpu_count()} cores, no GPU.", "", "| metric | value |", "|---|---|"]
        md += [f"| {k.strip()} | {v} |" for k, v in rows]
        Path(f"{args.results}.md").write_text("\n".join(md) + "\n")
    return 0



if __name__ == "__main__":
    raise SystemExit(main())
