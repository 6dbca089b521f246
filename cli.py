"""abl-guard command line: a thin click group over the rooms (abl/, attacks/, export/, guard/)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

log = logging.getLogger("abl_guard")


def parse_kv(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; values are parsed as JSON when they parse, else kept as strings."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors; no progress bars.")
@click.version_option(package_name="abl-guard")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Train with Anti-Backdoor Learning, export to ONNX with taps, and guard deployed classifiers."""
    from guard.progress import set_quiet

    _setup_logging(verbose, quiet)
    set_quiet(quiet)
    ctx.obj = {"quiet": quiet}


# ------------------------------------------------------------------------------------------------ train


@main.command()
@click.option("--dataset", default="fashion-mnist", show_default=True,
              help="fashion-mnist, digits, cifar10, gtsrb, imagefolder, or a dataset .npz.")
@click.option("--data-root", type=click.Path(), default=None, help="Where the dataset files are.")
@click.option("--attack", default="badnets", show_default=True, help="Poisoning attack, or 'none'.")
@click.option("--rate", type=float, default=0.1, show_default=True, help="Poisoning rate.")
@click.option("--target", type=int, default=0, show_default=True, help="Attack target class.")
@click.option("--attack-param", "attack_params", multiple=True, metavar="KEY=VALUE",
              help="Extra attack parameter (repeatable), e.g. size=4 position=top-left.")
@click.option("--defense", default="none", show_default=True, help="Training defence.")
@click.option("--defense-param", "defense_params", multiple=True, metavar="KEY=VALUE",
              help="Extra defence parameter (repeatable).")
@click.option("--arch", default="small-cnn", show_default=True,
              help="small-cnn, preact-resnet18 or wrn-16-1.")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--lr", type=float, default=0.01, show_default=True)
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option("--lr-milestones", default="", help="Comma-separated epochs where lr is divided by 10.")
@click.option("--augment", type=click.Choice(["none", "crop", "crop-flip"]), default="none", show_default=True)
@click.option("--pad", type=int, default=None, help="Zero-pad images to this size (e.g. 32 for ResNets).")
@click.option("--train-limit", type=int, default=None, help="Use a random subset of the training set.")
@click.option("--test-limit", type=int, default=None, help="Use a random subset of the test set.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Run directory (model.pt, run.json, poison_indices.npy).")
@click.pass_context
def train(ctx: click.Context, dataset: str, data_root: str | None, attack: str, rate: float, target: int,
          attack_params: tuple[str, ...], defense: str, defense_params: tuple[str, ...], arch: str, epochs: int,
          batch_size: int, lr: float, momentum: float, weight_decay: float, lr_milestones: str, augment: str,
          pad: int | None, train_limit: int | None, test_limit: int | None, seed: int, device: str,
          out_dir: str) -> None:
    """Train a classifier on (possibly poisoned) data; reports clean accuracy (CA) and attack success (ASR)."""
    from abl.experiment import ExperimentConfig, run_experiment
    from abl.train import TrainConfig

    milestones = tuple(int(m) for m in lr_milestones.split(",") if m.strip())
    cfg = ExperimentConfig(
        dataset=dataset, data_root=data_root,
        attack=None if attack == "none" else attack,
        attack_params={"rate": rate, "target": target, **parse_kv(attack_params)},
        arch=arch, defense=defense, defense_params=parse_kv(defense_params),
        train=TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                          weight_decay=weight_decay, lr_milestones=milestones, augment=augment, seed=seed,
                          device=device),
        pad=pad, train_limit=train_limit, test_limit=test_limit,
    )
    record = run_experiment(cfg, out_dir, quiet=ctx.obj["quiet"])
    m = record["metrics"]
    msg = f"CA {100 * m['clean_accuracy']:.2f}%"
    if "attack_success_rate" in m:
        msg += f"  ASR {100 * m['attack_success_rate']:.2f}%"
    click.echo(f"{msg}  ({record['train_seconds']:.0f}s on {record['device']}) -> {Path(out_dir) / 'model.pt'}")


if __name__ == "__main__":
    main()
