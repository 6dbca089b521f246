"""The configuration of one training run: :class:`TrainConfig` (plain SGD) and :class:`ExperimentConfig` (data,
attack, defence, training) — the one source of their defaults and help texts.

Torch-free on purpose: the command line builds its ``train`` options from these dataclasses
(``dataclasses.fields`` with ``metadata={"help": ..., "choices": ...}``) and ``abl-guard --help`` must stay fast.
A field with ``help`` in its metadata becomes a command-line option of the same name (``lr_gamma`` ->
``--lr-gamma``); ``choices`` restricts its values; ``cli_default`` replaces the default shown and used on the command
line when the real default depends on other options. ABL's own knobs live in :mod:`abl_guard.abl.config`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

AUGMENTATIONS = ("none", "crop", "crop-flip")
PRECISIONS = ("auto", "fp32", "bf16")
MEMORY_FORMATS = ("auto", "channels-last", "contiguous")
#: the training defences (abl/experiment.py's DEFENSES implements exactly these)
DEFENSE_NAMES = ("none", "abl")
#: fraction of a single-split dataset .npz held out as the test set when no separate test data is given
NPZ_TEST_FRACTION = 0.2


def _opt(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field whose metadata carries its command-line help (and choices)."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """Plain SGD training (the no-defence baseline). Defaults suit the small CNN on Fashion-MNIST."""

    epochs: int = _opt(10, "Training epochs (with --defense abl: ABL's total T, isolation + clean stage).")
    batch_size: int = _opt(128, "Mini-batch size.")
    lr: float = _opt(0.01, "SGD learning rate (Nesterov momentum).")
    momentum: float = _opt(0.9, "SGD momentum.")
    weight_decay: float = _opt(5e-4, "SGD weight decay.")
    lr_milestones: tuple[int, ...] = _opt((), "Comma-separated epochs where the learning rate is multiplied by "
                                              "--lr-gamma.")
    lr_gamma: float = _opt(0.1, "Learning-rate factor at each milestone.")
    augment: str = _opt("none", "Training augmentation.", choices=AUGMENTATIONS)
    seed: int = _opt(0, "Random seed (data subsets, poisoning, initialisation, batches).")
    device: str = _opt("auto", "auto, cpu, cuda, cuda:1, ...")
    precision: str = _opt("auto", "Autocast precision of the forward pass; auto = bf16 on CUDA (when supported), "
                                  "fp32 on CPU.", choices=PRECISIONS)
    memory_format: str = _opt("auto", "Tensor layout for training; auto = channels-last on CUDA only.",
                              choices=MEMORY_FORMATS)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.lr_milestones = tuple(int(m) for m in self.lr_milestones)
        for name, choices in (("augment", AUGMENTATIONS), ("precision", PRECISIONS),
                              ("memory_format", MEMORY_FORMATS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")
        if self.lr <= 0 or self.lr_gamma <= 0:
            raise ValueError(f"lr and lr_gamma must be > 0, got {self.lr} and {self.lr_gamma}")
        if self.momentum < 0 or self.weight_decay < 0:
            raise ValueError(f"momentum and weight_decay must be >= 0, got {self.momentum} and {self.weight_decay}")
        if any(m < 1 for m in self.lr_milestones):
            raise ValueError(f"lr_milestones must be epochs >= 1, got {list(self.lr_milestones)}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["lr_milestones"] = list(self.lr_milestones)
        return d


@dataclass
class ExperimentConfig:
    """One training run: which data, which attack (for evaluation), which defence, how to train."""

    dataset: str = _opt("fashion-mnist", "fashion-mnist, digits, cifar10, gtsrb, imagefolder, or a dataset .npz "
                                         "(one split, or train_*/test_* arrays).")
    data_root: str | None = _opt(None, "Where the dataset files are.", path=True)
    test_data: str | None = _opt(None, "Test on this dataset (.npz or name) instead of --dataset's test split. A "
                                       "single-split .npz without it is tested on a held-out "
                                       f"{NPZ_TEST_FRACTION:.0%} of itself.", path=True)
    attack: str | None = _opt("badnets", "Poisoning attack (badnets, blend, trojan, sig, wanet, label-consistent), "
                                         "or 'none'.")
    attack_params: dict[str, Any] = field(default_factory=dict)
    arch: str = _opt("small-cnn", "small-cnn, preact-resnet18 or wrn-16-1.")
    defense: str = _opt("none", "Training defence.", choices=DEFENSE_NAMES)
    defense_params: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    pad: int | None = _opt(None, "Zero-pad images to this size (e.g. 32 for ResNets).")
    train_limit: int | None = _opt(None, "Use a random subset of this many training images.")
    test_limit: int | None = _opt(None, "Use a random subset of this many test images.")
    #: continue an interrupted run from the state in the run directory (not part of the run's identity)
    resume: bool = _opt(False, "Continue an interrupted --defense abl run from its run directory.")
    #: with --defense abl, write the training images ABL kept (not part of the run's identity)
    save_cleansed: bool = _opt(False, "With --defense abl: also write cleansed.npz, the training images without the "
                                      "ones ABL removed or unlearned: a reference for `calibrate --fit-data`.")
    #: torch CPU threads (not part of the run's identity); None = $OMP_NUM_THREADS when set, else the available cores
    threads: int | None = _opt(None, "CPU threads for torch (intra- and inter-op). [default: $OMP_NUM_THREADS when "
                                     "set, else the cores available; under contention fewer threads are faster]")

    def __post_init__(self) -> None:
        if self.defense not in DEFENSE_NAMES:
            raise ValueError(f"unknown defence {self.defense!r}; choose from {list(DEFENSE_NAMES)}")
        for name in ("pad", "train_limit", "test_limit", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.resume and self.defense != "abl":
            raise ValueError("--resume is supported for --defense abl only (plain training keeps no resume state)")
        if self.save_cleansed and self.defense != "abl":
            raise ValueError("--save-cleansed needs --defense abl (plain training removes nothing)")

    def to_json(self) -> dict:
        return {"dataset": self.dataset, "data_root": self.data_root, "test_data": self.test_data,
                "attack": self.attack, "attack_params": self.attack_params, "arch": self.arch,
                "defense": self.defense, "defense_params": self.defense_params, "train": self.train.to_json(),
                "pad": self.pad, "train_limit": self.train_limit, "test_limit": self.test_limit}
