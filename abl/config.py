"""Every knob of an Anti-Backdoor Learning run (Li et al., NeurIPS 2021) in one validated dataclass.

:class:`ABLConfig` is the one source of defaults and help: the CLI's ``--abl-*`` options are generated from the
``ABL_KNOBS`` fields (default, ``metadata["help"]``, ``metadata["choices"]``), ``--defense-param`` and config files go
through the same :meth:`ABLConfig.from_train`, which fills the rest from the shared training options. Torch-free, so
``abl-guard --help`` stays fast. The defaults and each deviation from the paper are described in ``docs/abl.md``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .run_config import TrainConfig  # torch-free, so the CLI reads these fields cheaply

LGA_FORMS = ("flooding", "per-example")
ISOLATION_SCORES = ("class-relative", "loss")
ISOLATION_LABELS = ("all", "target")
UNLEARNING_MODES = ("joint", "ascent")
ASCENT_FORMS = ("negated-ce", "complement")
BN_MODES = ("train", "frozen")


def _knob(default: Any, help: str, **extra: Any) -> Any:
    """An ABL knob: its metadata is the ``--abl-*`` option's help (and ``choices``; ``cli_default`` when the
    command-line default depends on other options) — one source of default and help."""
    return field(default=default, metadata={"help": help, **extra})


#: the string knobs and their allowed values (validated first, in this order)
_CHOICES = {"lga": LGA_FORMS, "isolation_score": ISOLATION_SCORES, "isolation_labels": ISOLATION_LABELS,
            "unlearning": UNLEARNING_MODES, "unlearning_ascent": ASCENT_FORMS, "unlearning_bn": BN_MODES}


@dataclass
class ABLConfig:
    """Every ABL knob. ``isolation_epochs + clean_epochs`` is the paper's total ``T`` (20 + 80)."""

    gamma: float = _knob(0.5, "LGA threshold gamma; the isolation loss is sign(loss - gamma) * loss.")
    lga: str = _knob("flooding", "LGA on the batch-mean loss (official code) or on every example (BackdoorBox).",
                     choices=LGA_FORMS)
    isolation_epochs: int = _knob(20, "Isolation epochs T_te, part of --epochs (the rest is the clean stage). "
                                  "[default: 20% of --epochs, the paper's 20 of 100]", cli_default=None)
    isolation_ratio: float = _knob(0.01, "Fraction p of the training set isolated as suspected poison (lowest "
                                   "score at T_te).")
    isolation_score: str = _knob("class-relative", "Rank by the loss relative to the median loss of the example's "
                                 "own label (class-relative) or by the raw loss (the paper).", choices=ISOLATION_SCORES)
    isolation_reference: float = _knob(0.5, "The quantile of its label's log-loss that the class-relative score "
                                       "measures an example against (0.5 = the median; higher stays on the clean "
                                       "examples when over half a label is poisoned).")
    isolation_labels: str = _knob("all", "Unlearn every isolated example (all, the paper) or only those with the "
                                  "isolated set's majority label, the suspected target of an all-to-one backdoor "
                                  "(target; the others go back to the clean set).", choices=ISOLATION_LABELS)
    clean_epochs: int = 80
    lr: float = 0.1
    lr_milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.1
    unlearning: str = _knob("joint", "Unlearning objective: CE(clean batch) - CE(isolated batch) per step (joint, "
                            "the paper's L_GGA) or -CE(isolated batch) alone (ascent, the official code).",
                            choices=UNLEARNING_MODES)
    unlearning_bound: float = _knob(5.0, "Stop the ascent on an isolated example once its cross-entropy exceeds "
                                    "this (0 = unbounded, the paper).")
    unlearning_ascent: str = _knob("negated-ce", "The ascent term on isolated examples: -CE (the paper) or "
                                   "-log(1 - p_label) (complementary label: strongest while the example is still "
                                   "fitted, fading once it is unlearned).", choices=ASCENT_FORMS)
    unlearning_epochs: int = _knob(5, "Gradient-ascent epochs on the isolated set, after --epochs.")
    unlearning_lr: float = _knob(5e-4, "Unlearning learning rate (official code 5e-4).")
    unlearning_bn: str = _knob("train", "BatchNorm during unlearning: batch statistics (official code) or frozen "
                               "running statistics.", choices=BN_MODES)
    max_ca_drop: float = _knob(0.02, "Clean-accuracy guard of the unlearning stage: every unlearning epoch runs; "
                               "an epoch passes when its held-out accuracy (non-target examples, and estimated "
                               "without trusting target labels) is at most this far below its value before "
                               "unlearning, and the best passing epoch is kept (0.02 = 2 points; the state "
                               "before unlearning counts as epoch 0).")
    holdout: float = _knob(0.02, "Fraction of the training set held out (never trained on) for the unlearning "
                           "guard; 0 disables the guard (the last epoch is kept).")
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 1e-4
    augment: str = "none"
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    memory_format: str = "auto"
    eval_every: int = _knob(1, "Evaluate CA/ASR every N isolation/clean epochs (0 = only after each stage; "
                            "unlearning epochs are always evaluated).")

    #: the knobs a caller may set through ``--defense-param`` / ``--abl-*`` (the rest come from the training options)
    ABL_KNOBS = ("gamma", "lga", "isolation_epochs", "isolation_ratio", "isolation_score", "isolation_reference",
                 "isolation_labels",
                 "unlearning", "unlearning_bound", "unlearning_ascent", "unlearning_epochs", "unlearning_lr",
                 "unlearning_bn", "max_ca_drop", "holdout", "eval_every")

    def __post_init__(self) -> None:
        self.lr_milestones = tuple(int(m) for m in self.lr_milestones)
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        for bad, message in self._range_errors():
            if bad:
                raise ValueError(message)

    def _range_errors(self) -> list[tuple[bool, str]]:
        """(violated, message) for every numeric range, in the order they are checked."""
        return [
            (not 0.0 < self.isolation_reference < 1.0,
             f"isolation_reference must be in (0, 1), got {self.isolation_reference}"),
            (self.isolation_epochs < 1, "isolation_epochs (T_te) must be >= 1"),
            (self.clean_epochs < 0 or self.unlearning_epochs < 0, "clean_epochs and unlearning_epochs must be >= 0"),
            (not 0.0 < self.isolation_ratio < 1.0, f"isolation_ratio must be in (0, 1), got {self.isolation_ratio}"),
            (not 0.0 <= self.holdout < 0.5, f"holdout must be in [0, 0.5), got {self.holdout}"),
            (self.unlearning_bound < 0, "unlearning_bound must be >= 0 (0 = unbounded ascent)"),
            (self.max_ca_drop < 0, "max_ca_drop must be >= 0"),
            (self.lr <= 0 or self.unlearning_lr <= 0, "learning rates must be > 0"),
            (self.batch_size < 1 or self.eval_every < 0, "batch_size must be >= 1 and eval_every >= 0"),
        ]

    @property
    def total_epochs(self) -> int:
        return self.isolation_epochs + self.clean_epochs

    def lr_at(self, epoch: int) -> float:
        """Step schedule over global epochs (isolation and clean stage share it)."""
        return self.lr * self.lr_gamma ** sum(1 for m in self.lr_milestones if epoch >= m)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["lr_milestones"] = list(self.lr_milestones)
        return d

    @classmethod
    def from_train(cls, train: TrainConfig, params: dict[str, Any] | None = None) -> ABLConfig:
        """Build from the shared training options plus ABL knobs (``params``; unknown keys are an error).

        ``train.epochs`` is the total ``T``; ``isolation_epochs`` defaults to 20% of it (the paper's 20 of 100, at
        least 1) and the clean stage takes the rest.
        """
        params = dict(params or {})
        unknown = sorted(set(params) - set(cls.ABL_KNOBS))
        if unknown:
            hint = " (the clean stage is --epochs minus the isolation epochs)" if "clean_epochs" in unknown else ""
            raise ValueError(f"unknown ABL parameter(s) {unknown}{hint}; known: {list(cls.ABL_KNOBS)}")
        iso = params.pop("isolation_epochs", None)
        iso = max(1, int(round(0.2 * train.epochs))) if iso is None else int(iso)
        clean = train.epochs - iso
        if clean < 0:
            raise ValueError(f"isolation epochs ({iso}) exceed the total --epochs ({train.epochs})")
        return cls(isolation_epochs=iso, clean_epochs=clean, lr=train.lr, lr_milestones=train.lr_milestones,
                   lr_gamma=train.lr_gamma, batch_size=train.batch_size, momentum=train.momentum,
                   weight_decay=train.weight_decay, augment=train.augment, seed=train.seed, device=train.device,
                   precision=train.precision, memory_format=train.memory_format, **params)
