"""The input-space label scan (``abl/expansion.py scan_inputs``) on poisoned training sets, no model trained.

For every attack, poison rate and seed: poison Fashion-MNIST as ``bench/abl.py`` does (target 0), leave out a 2%
held-out split, and scan every label's raw pixels the contrastive way. Reports what the scan removed (poison recall,
clean images removed) and every label's split (minority share, Ashman's D), so that the threshold (D 10) can be read
against the clean labels' largest split and the poisoned labels' smallest. Rate 0 is clean data.

    python bench/abl_input_scan.py --attacks badnets,blend,trojan,wanet,sig --rates 0,0.01,0.05,0.1 --seeds 0,1,2 \\
        --out bench/results/abl_input_scan

About 10 s per configuration on one core (60,000 images). Label-consistent needs a trained surrogate model and is not
run here (``bench/abl.py`` runs it).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from abl_guard.abl.expansion import scan_inputs
from abl_guard.abl.experiment import ExperimentConfig, prepare_data
from abl_guard.abl.train import TrainConfig

log = logging.getLogger("bench.abl_input_scan")


def one(attack: str, rate: float, seed: int, holdout: float, separation: float) -> dict[str, Any]:
    """The scan of one poisoned training set: what it removed and every label's split."""
    cfg = ExperimentConfig(attack=attack if rate > 0 else "badnets", attack_params={"rate": rate, "target": 0},
                           train=TrainConfig(epochs=8, lr=0.05, seed=seed, device="cpu"))
    data = prepare_data(cfg)
    labels = data.train.labels
    poison = np.asarray(data.poison_indices if rate > 0 else [], np.int64)
    rng = np.random.default_rng(seed)
    pool = np.setdiff1d(np.arange(len(labels)), rng.choice(len(labels), int(holdout * len(labels)), replace=False))
    t0 = time.perf_counter()
    exp = scan_inputs(data.train.images, labels, pool, min_separation=separation, random_state=seed)
    secs = time.perf_counter() - t0
    hit = int(np.isin(exp.removed, poison).sum())
    rows = exp.report["labels"]
    poisoned = {0} if rate > 0 else set()
    clean_rows = [r for r in rows if r["label"] not in poisoned]
    return {"attack": attack if rate > 0 else "clean", "rate": rate, "seed": seed, "found": exp.report.get("target"),
            "removed": int(len(exp.removed)), "poison_in_pool": int(np.isin(pool, poison).sum()),
            "removed_poison": hit, "removed_clean": int(len(exp.removed) - hit), "seconds": round(secs, 1),
            "target_split": next((r for r in rows if r["label"] == 0), None) if rate > 0 else None,
            "max_clean_separation": max(r["separation"] for r in clean_rows),
            "max_clean_separation_counted": max(r["separation"] for r in clean_rows  # scan_inputs' minimum component
                                                if r["minority"] * r["n"] >= exp.report["min_minority_count"]
                                                and r["minority"] >= exp.report["min_minority"]),
            "labels": rows}


def render(runs: list[dict[str, Any]], command: str) -> str:
    out = ["# Input-space label scan: raw pixels, no model", "", f"`{command}`", "",
           "Fashion-MNIST, 60,000 training images, target 0, a 2% held-out split left out; the scan of "
           "`abl/expansion.py scan_inputs` (contrastive direction per label on the raw pixels, two-component split; a "
           "label qualifies at Ashman's D >= the threshold with a suspect component of at least 1% and 10 images). "
           "target split: label 0's minority share and D; largest clean D: over every other label (and every label "
           "on clean data), among splits whose small component holds at least 1% and 10 images.", "",
           "| attack | rate | seed | found | removed | poison recall | clean removed | target split (share, D) | "
           "largest clean D | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        t = r["target_split"]
        recall = f"{100 * r['removed_poison'] / r['poison_in_pool']:.2f}%" if r["poison_in_pool"] else "—"
        split = f"{100 * t['minority']:.1f}%, {t['separation']:.1f}" if t else "—"
        found = r["found"] if r["found"] is not None else "—"
        out.append(f"| {r['attack']} | {100 * r['rate']:g}% | {r['seed']} | {found} | {r['removed']} | {recall} "
                   f"| {r['removed_clean']} | {split} | "
                   f"{r['max_clean_separation_counted']:.2f} | {r['seconds']} |")
    clean = max(r["max_clean_separation_counted"] for r in runs)
    by_attack: dict[str, float] = {}
    for r in runs:
        if r["target_split"]:
            by_attack[r["attack"]] = min(by_attack.get(r["attack"], np.inf), r["target_split"]["separation"])
    out += ["", f"Largest clean-label D (counted splits): **{clean:.2f}**. Smallest target-label D per attack: "
            + ", ".join(f"{a} {d:.1f}" for a, d in by_attack.items()) + "."]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attacks", default="badnets,blend,trojan,wanet,sig")
    ap.add_argument("--rates", default="0,0.01,0.05,0.1")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--holdout", type=float, default=0.02)
    ap.add_argument("--separation", type=float, default=10.0)
    ap.add_argument("--out", default="bench/results/abl_input_scan")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    runs = []
    rates = [float(r) for r in args.rates.split(",")]
    for seed in [int(s) for s in args.seeds.split(",")]:
        if 0.0 in rates:
            runs.append(one("badnets", 0.0, seed, args.holdout, args.separation))
        for attack in args.attacks.split(","):
            for rate in rates:
                if rate > 0:
                    runs.append(one(attack, rate, seed, args.holdout, args.separation))
                    log.info("%s %g seed %d: found %s, %d removed (%d poison)", attack, rate, seed,
                             runs[-1]["found"], runs[-1]["removed"], runs[-1]["removed_poison"])
    runs.sort(key=lambda r: (r["attack"], r["rate"], r["seed"]))
    command = "python bench/abl_input_scan.py " + " ".join(sys.argv[1:])
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "runs": runs}, indent=1))
    out.with_suffix(".md").write_text(render(runs, command))
    log.info("-> %s.md", out)


if __name__ == "__main__":
    main()
