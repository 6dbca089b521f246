"""One training run end to end: load data, poison it, train with a defence, measure CA / ASR, save artifacts.

A run directory holds ``model.pt`` (weights only), ``run.json`` (config, metrics, history, hashes) and, when an
attack was applied, ``poison_indices.npy`` (the ground truth, for isolation reports and benchmarks).

:func:`validate_experiment` runs the cheap checks (configs, dataset class count, attack parameters) before any work,
so a bad argument fails at once and leaves no run directory. A one-split dataset ``.npz`` has no test split: without
``test_data`` the run tests on a seeded held-out part of it (recorded as ``test_source``), never on its training data.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from abl_guard.attacks import BackdoorAttack, TriggeredSet, make_attack

from . import distributed
from .checkpoint import load_checkpoint, save_checkpoint
from .data import LabelledImages, holdout_split, load_dataset, npz_splits, pad_to, peek_num_classes
from .models import build_model
from .run_config import DEFENSE_NAMES, NPZ_TEST_FRACTION, ExperimentConfig
from .train import accuracy, select_device, set_cpu_threads, set_seed, train_plain

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    train: LabelledImages
    test: LabelledImages
    poison_indices: np.ndarray
    triggered: TriggeredSet | None
    attack: BackdoorAttack | None
    #: where the test set came from (the dataset's test split, --test-data, or a held-out part of the .npz)
    test_source: str = "test split"


def _limit(data: LabelledImages, n: int | None, seed: int) -> LabelledImages:
    if n is None or n >= len(data):
        return data
    idx = np.sort(np.random.default_rng(seed).choice(len(data), n, replace=False))
    return data.subset(idx)


def _attack_params(cfg: ExperimentConfig) -> dict[str, Any]:
    params = {"seed": cfg.train.seed, **cfg.attack_params}
    if isinstance(params.get("model"), str):  # a checkpoint path (e.g. label-consistent's clean model)
        params["model_loader"] = lambda path: load_checkpoint(path, select_device(cfg.train.device))[0]
    return params


def make_run_attack(cfg: ExperimentConfig) -> BackdoorAttack | None:
    """The configured attack (None for no attack); unknown or bad parameters are a ``ValueError``."""
    if not cfg.attack:
        return None
    try:
        return make_attack(cfg.attack, **_attack_params(cfg))
    except TypeError as e:  # an unexpected keyword: an unknown attack parameter
        raise ValueError(f"{cfg.attack}: bad attack parameter ({e})") from e


def validate_experiment(cfg: ExperimentConfig) -> BackdoorAttack | None:
    """Cheap checks before any work: the configs, the dataset and its class count, the attack and its target.

    Returns the attack it built (None without one), for :func:`prepare_data`. Raises ``ValueError`` (bad values),
    :class:`~abl_guard.abl.data.DatasetNotFoundError` / :class:`~abl_guard.abl.data.DatasetError` (data).
    """
    if cfg.defense == "abl":
        from .config import ABLConfig

        ABLConfig.from_train(cfg.train, cfg.defense_params)  # validates every knob
    elif cfg.defense_params:
        raise ValueError(f"--defense {cfg.defense} takes no defence parameters, got {sorted(cfg.defense_params)}")
    k = peek_num_classes(cfg.dataset, cfg.data_root)
    if cfg.test_data is not None and (k_test := peek_num_classes(cfg.test_data, cfg.data_root)) != k:
        raise ValueError(f"--test-data {cfg.test_data} has {k_test} classes, --dataset {cfg.dataset} has {k}")
    attack = make_run_attack(cfg)
    if attack is not None and not 0 <= attack.target < k:
        raise ValueError(f"attack target {attack.target} is not a class of {cfg.dataset} (0..{k - 1})")
    return attack


def _test_set(cfg: ExperimentConfig, train: LabelledImages) -> tuple[LabelledImages, LabelledImages, str]:
    """(train, test, where the test set came from); a one-split .npz is never tested on its own training data."""
    if cfg.test_data is not None:
        test = load_dataset(cfg.test_data, "test", cfg.data_root)
        if test.images.shape[1:] != train.images.shape[1:]:
            raise ValueError(f"--test-data images are {test.images.shape[1:]}, training images "
                             f"{train.images.shape[1:]}")
        return train, test, f"test data {cfg.test_data}"
    if cfg.dataset.endswith(".npz") and "test" not in npz_splits(cfg.dataset):
        rest, held = holdout_split(train, NPZ_TEST_FRACTION, cfg.train.seed + 7)
        log.warning("%s holds one split: testing on a held-out %.0f%% of it (%d images; pass --test-data to test "
                    "on separate data)", cfg.dataset, 100 * NPZ_TEST_FRACTION, len(held))
        return rest, held, f"held-out {NPZ_TEST_FRACTION:.0%} of {cfg.dataset}"
    return train, load_dataset(cfg.dataset, "test", cfg.data_root), "test split"


def prepare_data(cfg: ExperimentConfig, attack: BackdoorAttack | None = None) -> PreparedData:
    """Load, pad, subset and poison the data; ``attack`` defaults to the configured one (:func:`make_run_attack`)."""
    train, test, test_source = _test_set(cfg, load_dataset(cfg.dataset, "train", cfg.data_root))
    if cfg.pad:
        train, test = pad_to(train, cfg.pad), pad_to(test, cfg.pad)
    train = _limit(train, cfg.train_limit, cfg.train.seed)
    test = _limit(test, cfg.test_limit, cfg.train.seed + 1)
    attack = attack if attack is not None else make_run_attack(cfg)
    if attack is None:
        return PreparedData(train, test, np.zeros(0, np.int64), None, None, test_source)
    k = train.spec.num_classes
    poisoned = attack.poison(train.images, train.labels, k)
    triggered = attack.triggered(test.images, test.labels, k)
    log.info("%s: poisoned %d of %d training images (target %d)", cfg.attack, len(poisoned.poison_indices),
             len(train), attack.target)
    return PreparedData(LabelledImages(poisoned.images, poisoned.labels, train.spec), test,
                        poisoned.poison_indices, triggered, attack, test_source)


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
    extra: dict[str, Any] = {"abl": result.report}
    if cfg.save_cleansed and distributed.is_main():
        extra["cleansed"] = write_cleansed(out_dir, data.train, result.dropped,
                                           data.poison_indices if data.attack is not None else np.zeros(0, np.int64))
    return result.history, extra


DEFENSES: dict[str, Defense] = {"none": _defense_none, "abl": _defense_abl}
assert tuple(DEFENSES) == DEFENSE_NAMES, "run_config.DEFENSE_NAMES lists the defences implemented here"


def run_experiment(cfg: ExperimentConfig, out_dir: str | Path, quiet: bool = False) -> dict[str, Any]:
    """Train per ``cfg`` and write the run directory; returns the run record (also in ``run.json``).

    Everything is validated (:func:`validate_experiment`) and the data prepared before the run directory is created.
    """
    attack = validate_experiment(cfg)
    set_cpu_threads(cfg.threads)
    set_seed(cfg.train.seed)
    data = prepare_data(cfg, attack)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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
        "n_test": len(data.test),
        "test_source": data.test_source,
        "n_poisoned": int(len(data.poison_indices)),
        "device": str(device),
        "torch": torch.__version__,
        "host": platform.node(),
        **extra,
    }
    group = distributed.current()  # under torchrun: every rank holds the same model; rank 0 writes the run
    if group is not None:
        record["world_size"] = group.world_size
        record["backend"] = group.backend
    if not distributed.is_main():
        return record
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


def write_cleansed(out: Path, train: LabelledImages, dropped: np.ndarray, poison_indices: np.ndarray) -> dict[str, Any]:
    """Write ``cleansed.npz``: the training images without ``dropped`` and return its record (with the poison left in
    it when the attack is known)."""
    keep = np.setdiff1d(np.arange(len(train)), dropped)
    train.subset(keep).save_npz(out / "cleansed.npz")
    log.info("cleansed.npz: %d of %d training images", len(keep), len(train))
    return {"file": "cleansed.npz", "n": int(len(keep)), "n_dropped": int(len(train) - len(keep)),
            "poisoned_left": int(np.isin(poison_indices, keep).sum()) if len(poison_indices) else None}


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")
