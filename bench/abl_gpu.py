"""ABL at the paper's schedule on a GPU: PreAct-ResNet-18, Fashion-MNIST padded to 32x32, 100 epochs.

One run of plain training (the no-defence model) and one ABL run on the same poisoned data (BadNets, 10% of the
training set relabelled to class 0), on one device, timed in the same process so the ratio of ABL's wall time to
plain training's is a ratio measured in one run:

* schedule (the paper's, section 1.3 of the research brief): T = 100 epochs, SGD lr 0.1 (momentum 0.9, Nesterov,
  weight decay 1e-4), lr / 10 at epochs 20 and 70, batch 128, random crop (pad 4) + horizontal flip; ABL: T_te = 20
  LGA epochs (flooding, gamma 0.5), isolation ratio p = 1%, 80 clean-stage epochs, 5 unlearning epochs at lr 5e-4
  (the library defaults: class-relative isolation score, joint bounded unlearning, the clean-accuracy guard).
  Deviation: the paper's Cutout is not applied (the project's augmentations are crop and flip).
* device path: data held on the GPU, bf16 autocast, channels-last (``--precision`` / ``--memory-format`` auto), no
  per-example Python work; ABL writes its per-epoch resume state and artifacts to ``--workdir`` as the CLI does.
* the plain run starts with ``--probe-epochs`` timed epochs; with ``--budget`` (seconds for the whole script) the
  projected ABL time is checked against what is left, and the training set is cut (and the plain run restarted on
  it) when the full set would not fit — the results then say so. After ABL, plain training continues to ``--epochs``
  or until the budget runs out; its per-epoch time is what the ratio uses when it stops early.

    python bench/abl_gpu.py --data-root .data/fashion-mnist --budget 520   # on the GPU machine
    python bench/abl_gpu.py --smoke                                       # seconds, any device: the path works
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]

from _common import cpu_name, write_markdown_keeping_notes  # noqa: E402

from abl_guard.abl.abl import ABLConfig, run_abl  # noqa: E402
from abl_guard.abl.checkpoint import save_checkpoint  # noqa: E402
from abl_guard.abl.experiment import ExperimentConfig, PreparedData, make_evaluator, prepare_data  # noqa: E402
from abl_guard.abl.models import build_model  # noqa: E402
from abl_guard.abl.train import (  # noqa: E402
    PlainTrainer,
    TrainConfig,
    resolve_autocast,
    resolve_channels_last,
    select_device,
    set_seed,
)

log = logging.getLogger("bench.abl_gpu")
ARCH = "preact-resnet18"


def plain_trainer(data: PreparedData, cfg: TrainConfig) -> PlainTrainer:
    """The no-defence run, advanced epoch by epoch so it can be probed, paused for ABL and time-boxed."""
    set_seed(cfg.seed)
    spec = data.train.spec
    c, h, _ = spec.input_shape
    model = build_model(ARCH, c, spec.num_classes, h, spec.mean, spec.std)
    return PlainTrainer(model, data.train.images, data.train.labels, cfg)


def plain_epoch(plain: PlainTrainer) -> None:
    rec = plain.epoch(quiet=True)
    log.info("plain epoch %d: loss %.4f, %.2fs", rec["epoch"], rec["loss"], rec["seconds"])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {cpu_name()} ({torch.get_num_threads()} threads)"


def experiment(args: argparse.Namespace, train_limit: int | None) -> ExperimentConfig:
    train = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=0.9,
                        weight_decay=args.weight_decay, lr_milestones=tuple(args.milestones), lr_gamma=0.1,
                        augment=args.augment, seed=args.seed, device=args.device)
    return ExperimentConfig(dataset="fashion-mnist", data_root=args.data_root, attack="badnets",
                            attack_params={"rate": args.rate, "target": 0}, arch=ARCH, pad=32,
                            train_limit=train_limit, test_limit=args.test_limit, train=train)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=None, help="folder of the Fashion-MNIST IDX files (default: Debian's)")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--isolation-epochs", type=int, default=20)
    ap.add_argument("--unlearning-epochs", type=int, default=5)
    ap.add_argument("--isolation-ratio", type=float, default=0.01)
    ap.add_argument("--milestones", type=lambda s: [int(x) for x in s.split(",") if x], default=[20, 70])
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--augment", default="crop-flip")
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--probe-epochs", type=int, default=3)
    ap.add_argument("--budget", type=float, default=0.0, help="seconds for the whole script (0: no limit)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workdir", default="/tmp/abl-gpu-run")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "abl_gpu"))
    ap.add_argument("--smoke", action="store_true", help="2 epochs on 2,000 images: checks the path only")
    args = ap.parse_args()
    if args.smoke:
        args.epochs, args.isolation_epochs, args.unlearning_epochs, args.milestones = 2, 1, 1, [1]
        args.train_limit, args.test_limit, args.probe_epochs, args.eval_every = 2000, 1000, 1, 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t_start = time.perf_counter()
    device = select_device(args.device)

    def left() -> float:
        return args.budget - (time.perf_counter() - t_start) if args.budget else float("inf")

    cfg = experiment(args, args.train_limit)
    data = prepare_data(cfg)
    n_full = len(data.train)
    plain = plain_trainer(data, cfg.train)
    for _ in range(args.probe_epochs):
        plain_epoch(plain)
    probe = statistics.median(plain.epoch_seconds[1:] or plain.epoch_seconds)  # the first epoch pays warm-up
    # ABL: the same number of epochs on 97% of the data (2% held out, p isolated) plus isolation and unlearning
    projected = probe * (args.epochs + 2) * 1.15 + 20
    cut = None
    if projected > left() - 60:
        frac = max(0.05, (left() - 60 - 20) / (probe * (args.epochs + 2) * 1.15))
        cut = int(n_full * min(1.0, frac)) // 1000 * 1000
        log.warning("the full set would need about %.0fs for ABL, %.0fs are left: training on %d of %d images",
                    projected, left(), cut, n_full)
        cfg = experiment(args, cut)
        data = prepare_data(cfg)
        plain = None
    evaluate = make_evaluator(data, device)

    # ---------------------------------------------------------------- ABL
    spec = data.train.spec
    c, h, _ = spec.input_shape
    set_seed(args.seed)
    abl_model = build_model(ARCH, c, spec.num_classes, h, spec.mean, spec.std)
    abl_cfg = ABLConfig.from_train(cfg.train, {"isolation_epochs": args.isolation_epochs,
                                               "unlearning_epochs": args.unlearning_epochs,
                                               "isolation_ratio": args.isolation_ratio,
                                               "eval_every": args.eval_every})
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    def save_stage(path: Path, m: torch.nn.Module, stage: str) -> None:
        save_checkpoint(path, m, ARCH, spec, extra={"defense": "abl", "stage": stage})

    t0 = time.perf_counter()
    res = run_abl(abl_model, data.train.images, data.train.labels, abl_cfg, out_dir=work, evaluate=evaluate,
                  poison_indices=data.poison_indices, quiet=True, save_stage=save_stage)
    if device.type == "cuda":
        torch.cuda.synchronize()
    abl_wall = time.perf_counter() - t0
    abl_metrics = evaluate(abl_model.to(device))
    log.info("ABL done in %.1fs: %s", abl_wall, abl_metrics)

    # ---------------------------------------------------------------- plain training: the rest of its epochs
    if plain is None:
        plain = plain_trainer(data, cfg.train)
    while plain.epochs_done < args.epochs:
        last = plain.epoch_seconds[-1] if plain.epoch_seconds else 0.0
        if left() < last + 25:
            log.warning("budget: plain training stops after %d of %d epochs", plain.epochs_done, args.epochs)
            break
        plain_epoch(plain)
    plain_metrics = evaluate(plain.model)

    # ---------------------------------------------------------------- record
    rep = res.report
    iso_secs = [r["seconds"] for r in res.history if r["stage"] == "isolation"]
    clean_secs = [r["seconds"] for r in res.history if r["stage"] == "clean"]
    plain_median = statistics.median(plain.epoch_seconds[1:] or plain.epoch_seconds)
    plain_total = (sum(plain.epoch_seconds) if plain.epochs_done == args.epochs
                   else plain.epoch_seconds[0] + plain_median * (args.epochs - 1))
    record: dict[str, Any] = {
        "device": device_name(device), "torch": torch.__version__, "host": platform.node(),
        "cuda": torch.version.cuda, "arch": ARCH, "settings": vars(args), "n_train": len(data.train),
        "n_train_full": n_full, "train_cut": cut, "n_poisoned": int(len(data.poison_indices)),
        "precision": str(resolve_autocast(cfg.train.precision, device)),
        "channels_last": resolve_channels_last(cfg.train.memory_format, device),
        "data_held_on": str(plain.batches.images.device),
        "plain": {"epochs_run": plain.epochs_done, "epoch_seconds": plain.epoch_seconds,
                  "median_epoch_seconds": plain_median, "total_seconds_for_T": plain_total,
                  "total_is_projected": plain.epochs_done != args.epochs, "metrics": plain_metrics,
                  "probe_restarted": cut is not None},
        "abl": {"wall_seconds": abl_wall, "metrics": abl_metrics, "stages": rep["stages"],
                "seconds": rep["seconds"], "isolation": rep.get("isolation"),
                "unlearning": {k: rep.get("unlearning", {}).get(k) for k in
                               ("epochs_run", "selected_epoch", "rejected_epochs", "trajectory")},
                "warnings": rep["warnings"],
                "median_isolation_epoch_seconds": statistics.median(iso_secs[1:] or iso_secs),
                "median_clean_epoch_seconds": statistics.median(clean_secs) if clean_secs else None},
        "ratio_abl_wall_over_plain": abl_wall / plain_total,
        "ratio_abl_compute_over_plain": rep["seconds"]["total"] / plain_total,
        "script_seconds": time.perf_counter() - t_start,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2, default=str))
    md = render(record)
    write_markdown_keeping_notes(out.with_suffix(".md"), md)
    print(md)


def render(r: dict[str, Any]) -> str:
    s, p, a = r["settings"], r["plain"], r["abl"]
    iso = a["isolation"] or {}
    pct = lambda v: f"{100 * v:.2f}" if isinstance(v, float) else "—"  # noqa: E731
    lines = [
        "# ABL on GPU at the paper's schedule (`bench/abl_gpu.py`)", "",
        f"Device: **{r['device']}**, torch {r['torch']} (CUDA {r['cuda']}), autocast {r['precision']}, "
        f"channels-last {r['channels_last']}, training data held on {r.get('data_held_on')}. "
        f"Data: Fashion-MNIST padded to 32×32, {r['n_train']:,} training images"
        f"{' (cut from ' + format(r['n_train_full'], ',') + ' to fit the time budget)' if r['train_cut'] else ''}, "
        f"BadNets {s['rate']:.0%} → class 0 ({r['n_poisoned']:,} poisoned), seed {s['seed']}. Model {r['arch']}, "
        f"SGD lr {s['lr']} / 10 at {s['milestones']}, batch {s['batch_size']}, wd {s['weight_decay']}, "
        f"augmentation {s['augment']}; T = {s['epochs']} epochs. ABL: T_te = {s['isolation_epochs']}, "
        f"p = {s['isolation_ratio']:.0%}, {s['unlearning_epochs']} unlearning epochs (library defaults otherwise).",
        "",
        "| run | epochs | CA % | ASR % | median epoch s | total s |",
        "|---|---|---|---|---|---|",
        f"| no defence | {p['epochs_run']} of {s['epochs']} | {pct(p['metrics']['clean_accuracy'])} | "
        f"{pct(p['metrics'].get('attack_success_rate'))} | {p['median_epoch_seconds']:.2f} | "
        f"{p['total_seconds_for_T']:.1f}{' (projected to T)' if p['total_is_projected'] else ''} |",
        f"| ABL | {s['isolation_epochs']} LGA + {s['epochs'] - s['isolation_epochs']} clean + "
        f"{a['unlearning']['epochs_run']} unlearning | {pct(a['metrics']['clean_accuracy'])} | "
        f"{pct(a['metrics'].get('attack_success_rate'))} | LGA {a['median_isolation_epoch_seconds']:.2f}, clean "
        f"{(a['median_clean_epoch_seconds'] or 0):.2f} | {a['wall_seconds']:.1f} (wall, with evaluation every "
        f"{s['eval_every']} epochs, per-epoch resume state and artifacts) |",
        "",
        f"**ABL wall time / plain training for the same T: {r['ratio_abl_wall_over_plain']:.3f}** (target ≤ 1.2); "
        f"ABL's training, isolation and unlearning time alone (no evaluation, resume state or artifacts): "
        f"{r['ratio_abl_compute_over_plain']:.3f}.",
        "ABL stage seconds (training compute, excluding evaluation): "
        + ", ".join(f"{k} {v:.1f}" for k, v in a["seconds"].items()) + ".",
        f"Isolation at T_te: precision {pct(iso.get('precision'))}%, recall {pct(iso.get('recall'))}%, "
        f"AUROC {iso.get('auroc', float('nan')):.3f}. Unlearning: kept epoch {a['unlearning']['selected_epoch']}, "
        f"rejected {a['unlearning']['rejected_epochs']}.",
        "",
        "CA / ASR after each ABL stage: " + "; ".join(
            f"{k} {pct(v.get('clean_accuracy'))} / {pct(v.get('attack_success_rate'))}" for k, v in a["stages"].items())
        + ".",
    ]
    if a["warnings"]:
        lines += ["", "Warnings: " + " | ".join(a["warnings"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
