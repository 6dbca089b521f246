"""ABL's isolation and label scans alone (no clean stage): which label the default (retrain) mode would clean, and how
much of the poison that removal holds, for any architecture, data size and schedule — on the CPU in minutes where the
whole run needs a GPU.

Trains the isolation stage of ``mode="retrain"`` (the library's defaults: the input scan first, isolation epochs
until the isolated set concentrates in one label, the seed expansion and the label scans) on a seeded subset of
Fashion-MNIST, then stops before the clean stage (``clean_epochs = 0``). The record keeps the expansion report (every
label's split, the qualifying labels, the chosen target), the removed poison / clean counts, the isolation numbers
and the run's warnings; not the verdict, whose probes would read the untrained model a skipped clean stage leaves.

    python bench/abl_scan_check.py --arch preact-resnet18 --pad 32 --train-limit 5000 --epochs 100 --lr 0.1 \\
        --milestones 20,70 --weight-decay 1e-4 --augment crop-flip --attack wanet --rate 0.1 \
        --out bench/results/abl_scan_check_wanet_preact5k
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np
import torch
from _common import cpu_name, write_results

from abl_guard.abl.abl import ABLConfig, run_abl
from abl_guard.abl.experiment import ExperimentConfig, prepare_data
from abl_guard.abl.models import build_model
from abl_guard.abl.train import TrainConfig, set_cpu_threads, set_seed

log = logging.getLogger("bench.abl_scan_check")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="small-cnn")
    ap.add_argument("--pad", type=int, default=0, help="pad the images to this size (32 for the CIFAR ResNets)")
    ap.add_argument("--train-limit", type=int, default=0, help="0 = all 60,000 training images")
    ap.add_argument("--epochs", type=int, default=8, help="T (isolation runs at most 20%% of it)")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--milestones", default="5,7")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--augment", default="none", help="none, or crop-flip (the paper's setting)")
    ap.add_argument("--attack", default="wanet")
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True, help="results path without suffix")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    set_cpu_threads(a.threads)
    milestones = tuple(int(x) for x in a.milestones.split(",") if x)
    train = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, momentum=0.9,
                        weight_decay=a.weight_decay, lr_milestones=milestones, augment=a.augment, seed=a.seed,
                        device=a.device)
    cfg = ExperimentConfig(dataset="fashion-mnist", data_root=a.data_root, attack=a.attack,
                           attack_params={"rate": a.rate, "target": 0}, arch=a.arch, pad=a.pad or None,
                           train_limit=a.train_limit or None, train=train)
    data = prepare_data(cfg)
    spec = data.train.spec
    c, h, _ = spec.input_shape
    set_seed(a.seed)
    model = build_model(a.arch, c, spec.num_classes, h, spec.mean, spec.std)
    abl_cfg = ABLConfig.from_train(train, {"mode": "retrain", "eval_every": 0})
    abl_cfg.clean_epochs = 0
    t0 = time.perf_counter()
    res = run_abl(model, data.train.images, data.train.labels, abl_cfg, poison_indices=data.poison_indices,
                  quiet=True)
    secs = time.perf_counter() - t0
    rep, poison = res.report, data.poison_indices
    exp = rep.get("expansion") or {}
    rows = exp.get("labels") or (exp.get("scan") or {}).get("labels") or []
    record = {
        "command": "python bench/abl_scan_check.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                               vars(a).items() if v not in (None, "")),
        "cpu": cpu_name() if a.device == "cpu" else torch.cuda.get_device_name(0), "threads": a.threads,
        "torch": torch.__version__, "settings": vars(a), "n_train": len(data.train), "n_poisoned": int(len(poison)),
        "seconds": secs,
        "isolation_epochs_run": sum(1 for r in res.history if r.get("stage") == "isolation"),
        "isolation": {k: (rep.get("isolation") or {}).get(k) for k in ("n_isolated", "precision", "skipped")},
        "n_removed": int(len(res.removed)), "removed_poison": int(np.isin(res.removed, poison).sum()),
        "poison_in_pool": int(len(np.setdiff1d(poison, res.holdout))),
        "target": exp.get("target"), "qualifying": exp.get("qualifying"), "labels": rows, "expansion": exp,
        "warnings": rep.get("warnings"),
    }
    md = "\n".join([
        f"# ABL's scans alone: {a.attack} {a.rate:.0%}, {a.arch}, {len(data.train):,} images "
        "(`bench/abl_scan_check.py`)",
        "", f"`{record['command']}` — {record['cpu']}, {secs:.0f} s.", "",
        f"Isolation epochs run: {record['isolation_epochs_run']}; isolation {record['isolation']}.",
        f"Chosen label: **{record['target']}** (qualifying: {record['qualifying']}); removed {record['n_removed']:,}, "
        f"of which poison {record['removed_poison']:,} of the pool's {record['poison_in_pool']:,}.", "",
        *[f"Warning: {w}" for w in record["warnings"] or []], "",
        "| label | n | variance ratio | count excess | count route | minority | separation |",
        "|---|---|---|---|---|---|---|",
        *[f"| {r['label']} | {r['n']} | {r.get('ratio', '—')} | {r.get('count_excess', '—')} | "
          f"{r.get('count_route', '—')} | {r['minority']} | {r['separation']} |" for r in rows],
    ]) + "\n"
    write_results(a.out, json.loads(json.dumps(record, default=float)), md, keep_notes=True)
    print(md)


if __name__ == "__main__":
    main()
