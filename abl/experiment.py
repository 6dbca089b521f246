"""One training run end to end: load data, poison it, train with a defence, measure CA / ASR, save artifacts.

A run directory holds ``model.pt`` (weights only), ``run.json`` (config, metrics, history, hashes) and, when an
attack was applied, ``poison_indices.npy`` (the ground truth, for isolation reports and benchmarks).
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from abl_guard.attacks import BackdoorAttack, TriggeredSet, make_attack

from .checkpoint import load_checkpoint, save_checkpoint
from .data import LabelledImages, load_dataset, pad_to
from .models import build_model
from .train import TrainConfig, accuracy, select_device, set_seed, train_plain

log = logging.getLogger(__name__)


@dataclass
class ExperimentConfig:
    dataset: str = "fashion-mnist"
    data_root: str | None = None
    attack: str | None = "badnets"
    attack_params: dict[str, Any] = field(default_factory=dict)
    arch: str = "small-cnn"
    defense: str = "none"
    defense_params: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    pad: int | None = None
    train_limit: int | None = None
    test_limit: int | None = None
    #: continue an interrupted run from the state in the run directory (not part of the run's identity)
    resume: bool = False

    def to_json(self) -> dict:
        return {"dataset": self.dataset, "data_root": self.data_root, "attack": self.attack,
                "attack_params": self.attack_params, "arch": self.arch, "defense": self.defense,
                "defense_params": self.defense_params, "train": self.train.to_json(), "pad": self.pad,
                "train_limit": self.train_limit, "test_limit": self.test_limit}


@dataclass
class PreparedData:
    train: LabelledImages
    test: LabelledImages
    poison_indices: np.ndarray
    triggered: TriggeredSet | None
    attack: BackdoorAttack | None


def _limit(data: LabelledImages, n: int | None, seed: int) -> LabelledImages:
    if n is None or n >= len(data):
        return data
    idx = np.sort(np.random.default_rng(seed).choice(len(data), n, replace=False))
    return data.subset(idx)


def prepare_data(cfg: ExperimentConfig) -> PreparedData:
    train = load_dataset(cfg.dataset, "train", cfg.data_root)
    test = load_dataset(cfg.dataset, "test", cfg.data_root)
    if cfg.pad:
        train, test = pad_to(train, cfg.pad), pad_to(test, cfg.pad)
    train = _limit(train, cfg.train_limit, cfg.train.seed)
    test = _limit(test, cfg.test_limit, cfg.train.seed + 1)
    if not cfg.attack:
        return PreparedData(train, test, np.zeros(0, np.int64), None, None)
    params = {"seed": cfg.train.seed, **cfg.attack_params}
    if isinstance(params.get("model"), str):  # a checkpoint path (e.g. label-consistent's clean model)
        params["model_loader"] = lambda path: load_checkpoint(path, select_device(cfg.train.device))[0]
    attack = make_attack(cfg.attack, **params)
    k = train.spec.num_classes
    poisoned = attack.poison(train.images, train.labels, k)
    triggered = attack.triggered(test.images, test.labels, k)
    log.info("%s: poisoned %d of %d training images (target %d)", cfg.attack, len(poisoned.poison_indices),
             len(train), attack.target)
    return PreparedData(LabelledImages(poisoned.images, poisoned.labels, train.spec), test,
                        poisoned.poison_indices, triggered, attack)


def make_evaluator(data: PreparedData, device: torch.device) -> Callable[[nn.Module], dict[str, float]]:
    def evaluate(model: nn.Module) -> dict[str, float]:
        out = {"clean_accuracy": accuracy(model, data.test.images, data.test.labels, device)}
        if data.triggered is not None:
            out["attack_success_rate"] = accuracy(model, data.triggered.images, data.triggered.labels, device)
        return out

    return evaluate


#: a defence trains ``model`` on ``data`` and returns (history, extra record fields)
Defense = Callable[..., tuple[list[dict], dict[str, Any]]]


def _defense_none(model: nn.Module, data: PreparedData, cfg: ExperimentConfig, out_dir: Path,
                  evaluate: Callable[[nn.Module], dict[str, float]], quiet: bool) -> tuple[list[dict], dict]:
    if cfg.defense_params:
        raise ValueError(f"--defense none takes no defence parameters, got {sorted(cfg.defense_params)}")
    if cfg.resume:
        raise ValueError("--resume is supported for --defense abl only (plain training keeps no resume state)")
    history = train_plain(model, data.train.images, data.train.labels, cfg.train, evaluate, quiet)
    return history, {}


def _defense_abl(model: nn.Module, data: PreparedData, cfg: ExperimentConfig, out_dir: Path,
                 evaluate: Callable[[nn.Module], dict[str, float]], quiet: bool) -> tuple[list[dict], dict]:
    """Anti-Backdoor Learning (abl/abl.py); stage checkpoints, isolation files and resume state go to ``out_dir``."""
    from .abl import ABLConfig, run_abl

    abl_cfg = ABLConfig.from_train(cfg.train, cfg.defense_params)
    spec = data.train.spec

    def save_stage(path: Path, m: nn.Module, stage: str) -> None:
        save_checkpoint(path, m, cfg.arch, spec, extra={"defense": "abl", "stage": stage})

    result = run_abl(model, data.train.images, data.train.labels, abl_cfg, out_dir=out_dir, evaluate=evaluate,
                     poison_indices=data.poison_indices if data.attack is not None else None, quiet=quiet,
                     resume=cfg.resume, save_stage=save_stage)
    return result.history, {"abl": result.report}


DEFENSES: dict[str, Defense] = {"none": _defense_none, "abl": _defense_abl}


def run_experiment(cfg: ExperimentConfig, out_dir: str | Path, quiet: bool = False) -> dict[str, Any]:
    """Train per ``cfg`` and write the run directory; returns the run record (also in ``run.json``)."""
    if cfg.defense not in DEFENSES:
        raise ValueError(f"unknown defence {cfg.defense!r}; choose from {sorted(DEFENSES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.train.seed)
    data = prepare_data(cfg)
    device = select_device(cfg.train.device)
    spec = data.train.spec
    c, h, _ = spec.input_shape
    model = build_model(cfg.arch, c, spec.num_classes, h, spec.mean, spec.std).to(device)
    evaluate = make_evaluator(data, device)
    t0 = time.perf_counter()
    history, extra = DEFENSES[cfg.defense](model, data, cfg, out, evaluate, quiet)
    seconds = time.perf_counter() - t0
    metrics = evaluate(model)
    record: dict[str, Any] = {
        "config": cfg.to_json(),
        "spec": spec.to_json(),
        "attack": None if data.attack is None else {"name": data.attack.name, **data.attack.params()},
        "metrics": metrics,
        "history": history,
        "train_seconds": seconds,
        "n_train": len(data.train),
        "n_poisoned": int(len(data.poison_indices)),
        "device": str(device),
        "torch": torch.__version__,
        "host": platform.node(),
        **extra,
    }
    if data.attack is not None:
        np.save(out / "poison_indices.npy", data.poison_indices)
        record["poison_indices_file"] = "poison_indices.npy"
    record["checkpoint"] = "model.pt"
    record["checkpoint_sha256"] = save_checkpoint(
        out / "model.pt", model.cpu(), cfg.arch, spec,
        extra={"metrics": metrics, "attack": record["attack"], "defense": cfg.defense},
    )
    (out / "run.json").write_text(json.dumps(record, indent=2, default=_json_default))
    return record


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")
