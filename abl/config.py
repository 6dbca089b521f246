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
MODES = ("retrain", "unlearn", "paper")
ISOLATION_STOPS = ("auto", "fixed")
EXPANSION_METHODS = ("spectral", "classifier")
#: the label scan's direction per label (abl/expansion.py scan_labels)
SCAN_METHODS = ("spectral", "contrastive")
#: retrain mode's clean-stage recheck rule (abl/abl.py _Stages._recheck)
RECHECK_METHODS = ("confidence", "pixel", "pixel-restart")
#: retrain mode's clean-stage length: a whole schedule, or what is left of it after the isolation epochs
RETRAIN_SCHEDULES = ("full", "remaining")
#: when retrain mode's clean stage starts from fresh weights: only after a find, every time, or never (the isolation
#: model continues on the cleansed set, the residual unlearning removing what it learned: docs/abl.md#never-restart)
RESTARTS = ("found", "always", "never")
#: when retrain mode's input-space label scan runs: before the isolation epochs (a find skips them) or after them
INPUT_SCAN_ORDERS = ("first", "last")

#: what each ``mode`` changes from the dataclass defaults (which are ``retrain``'s); explicit knobs win over it
PRESETS: dict[str, dict[str, Any]] = {
    "retrain": {},
    # the first release's default: isolation, clean stage on the same model, guarded joint unlearning
    "unlearn": {"isolation_labels": "all", "isolation_stop": "fixed", "unlearning_epochs": 5,
                "isolation_extra_epochs": 0, "residual_unlearning_epochs": 0, "expansion_recheck_epoch": 0},
    # every default the paper's (Li et al. 2021): raw-loss ranking of p = 1% at T_te, every isolated example
    # unlearned with the unbounded L_GGA for 5 epochs at lr 5e-4 (official code), no held-out guard
    "paper": {"isolation_labels": "all", "isolation_stop": "fixed", "isolation_score": "loss", "lga": "flooding",
              "isolation_ratio": 0.01, "unlearning": "joint", "unlearning_bound": 0.0,
              "unlearning_ascent": "negated-ce", "unlearning_epochs": 5, "unlearning_lr": 5e-4,
              "unlearning_bn": "train", "holdout": 0.0, "isolation_extra_epochs": 0,
              "residual_unlearning_epochs": 0, "expansion_recheck_epoch": 0},
}


def _knob(default: Any, help: str, **extra: Any) -> Any:
    """An ABL knob: its metadata is the ``--abl-*`` option's help (and ``choices``; ``cli_default`` when the
    command-line default depends on other options) — one source of default and help."""
    return field(default=default, metadata={"help": help, **extra})


#: the string knobs and their allowed values (validated first, in this order)
_CHOICES = {"mode": MODES, "isolation_stop": ISOLATION_STOPS, "expansion_method": EXPANSION_METHODS,
            "expansion_scan_method": SCAN_METHODS, "retrain_epochs": RETRAIN_SCHEDULES,
            "restart": RESTARTS, "input_scan": INPUT_SCAN_ORDERS, "lga": LGA_FORMS, "isolation_score": ISOLATION_SCORES,
            "isolation_labels": ISOLATION_LABELS,
            "expansion_recheck_method": RECHECK_METHODS,
            "unlearning": UNLEARNING_MODES, "unlearning_ascent": ASCENT_FORMS, "unlearning_bn": BN_MODES}


@dataclass
class ABLConfig:
    """Every ABL knob. The defaults are ``mode="retrain"``'s; :meth:`for_mode` / :meth:`from_train` apply another
    mode's :data:`PRESETS`. In ``unlearn`` / ``paper`` mode ``isolation_epochs + clean_epochs`` is the paper's total
    ``T`` (20 + 80); in ``retrain`` mode the clean stage is a full schedule of its own (``clean_epochs = T``)."""

    mode: str = _knob("retrain", "retrain: isolate a seed, expand it to the rest of the poison, retrain from scratch "
                      "on the cleansed set (docs/abl.md#retrain-mode); unlearn: the first release's guarded "
                      "unlearning on the same model; paper: every default the paper's (Li et al. 2021).",
                      choices=MODES)
    gamma: float = _knob(0.5, "LGA threshold gamma; the isolation loss is sign(loss - gamma) * loss.")
    lga: str = _knob("flooding", "LGA on the batch-mean loss (official code) or on every example (BackdoorBox).",
                     choices=LGA_FORMS)
    isolation_epochs: int = _knob(20, "Isolation epochs T_te, part of --epochs (the rest is the clean stage). "
                                  "[default: 20% of --epochs, the paper's 20 of 100]", cli_default=None)
    isolation_stop: str = _knob("auto", "auto: end the isolation at the first epoch whose isolated fraction is "
                                "concentrated in one label (and, in retrain mode, whose seed expands to a separate "
                                "population: the backdoor is learned), at most --abl-isolation-epochs; fixed: always "
                                "run them all (the paper). [default: auto in retrain mode, else fixed]",
                                choices=ISOLATION_STOPS, cli_default=None)
    isolation_concentration: float = _knob(0.9, "isolation_stop=auto: the share of the isolated fraction that one "
                                           "label must hold.")
    isolation_ratio: float = _knob(0.01, "Fraction p of the training set isolated as suspected poison (lowest "
                                   "score at T_te).")
    isolation_score: str = _knob("class-relative", "Rank by the loss relative to the median loss of the example's "
                                 "own label (class-relative) or by the raw loss (the paper).", choices=ISOLATION_SCORES)
    isolation_reference: float = _knob(0.5, "The quantile of its label's log-loss that the class-relative score "
                                       "measures an example against (0.5 = the median; higher stays on the clean "
                                       "examples when over half a label is poisoned).")
    isolation_labels: str = _knob("target", "Keep every isolated example (all, the paper) or only those with the "
                                  "isolated set's majority label, the suspected target of an all-to-one backdoor "
                                  "(target; the others go back to the clean set). [default: target in retrain mode, "
                                  "else all]", choices=ISOLATION_LABELS, cli_default=None)
    expansion_method: str = _knob("spectral", "retrain mode: how the seed is expanded — spectral: the top singular "
                                  "direction of the target label's pooled conv features, oriented by the seed "
                                  "(Tran et al. 2018); classifier: a cross-fitted seed-vs-rest logistic regression "
                                  "on the penultimate features (abl/expansion.py).", choices=EXPANSION_METHODS)
    expansion_posterior: float = _knob(0.01, "retrain mode: remove every example of the target label whose posterior "
                                       "of looking like the isolated seed reaches this (abl/expansion.py).")
    expansion_max_share: float = _knob(0.6, "retrain mode: refuse an expansion whose seed-like population is more "
                                       "than this share of the target label (a clean sub-type, not poison), and "
                                       "remove at most this share (the highest scores).")
    expansion_separation: float = _knob(2.0, "retrain mode: expand the seed only when the target label's scores "
                                        "split into two populations at least this far apart (Ashman's D).")
    expansion_scan_share: float = _knob(0.2, "retrain mode: when the isolated seed does not expand (or its "
                                        "expansion is capped), look in every label for a separate population of at "
                                        "most this share of it and remove the clearest instead (abl/expansion.py "
                                        "scan_labels); 0 = off.")
    expansion_scan_method: str = _knob("contrastive", "retrain mode's label scan, per label — contrastive: its top "
                                       "direction of variance relative to the other labels' within-class "
                                       "covariance, which also accepts a label whose variance ratio reaches 100; "
                                       "spectral: the label's top singular direction (Tran et al.; the scan before "
                                       "2026-12-02); abl/expansion.py, docs/abl.md#contrastive-label-scan.",
                                       choices=SCAN_METHODS)
    expansion_scan_separation: float = _knob(5.0, "retrain mode's contrastive label scan: a label also qualifies "
                                             "when its two components are at least this far apart (Ashman's D), "
                                             "whatever their shares — clean labels reached 4.0 at most; 0 = off "
                                             "(docs/abl.md#wide-separation-route).")
    expansion_scan_count_sd: float = _knob(3.0, "retrain mode's contrastive label scan: a label also qualifies "
                                           "when it holds this many sd more examples than the median label and its "
                                           "split's smaller component is about that excess (all-to-one dirty-label "
                                           "poison adds its copies to its label; read only when the other labels' "
                                           "counts are balanced); 0 = off (before 2026-12-04; "
                                           "docs/abl.md#count-matched-route).")
    expansion_input_separation: float = _knob(10.0, "retrain mode: scan every label's raw inputs the contrastive "
                                              "way (no model; when: --abl-input-scan); a label whose two "
                                              "components are at least this far apart (Ashman's D) is removed "
                                              "instead of the model-based outcome — fixed-pattern triggers split "
                                              "at 19.5-317, clean labels at 2.82 at most on Fashion-MNIST; 0 = off "
                                              "(docs/abl.md#input-space-label-scan).")
    input_scan: str = _knob("first", "retrain mode's input-space label scan — first: before the isolation epochs, and "
                            "a find skips them (ABL then costs about one training schedule); last: after them, the "
                            "isolation running whatever the scan finds (docs/abl.md#input-space-label-scan).",
                            choices=INPUT_SCAN_ORDERS)
    retrain_epochs: str = _knob("full", "retrain mode's clean stage — full: a whole schedule of its own (--epochs), "
                                "so ABL trains the isolation epochs more than plain training; remaining: --epochs "
                                "minus the isolation epochs run, the lr milestones scaled to it, so ABL trains as "
                                "many epochs as plain training (docs/abl.md#retrain-schedule).",
                                choices=RETRAIN_SCHEDULES)
    restart: str = _knob("found", "retrain mode's clean stage — found: a fresh model only when the seed expanded or "
                         "a scan found a separate population; otherwise the isolation model continues for the rest "
                         "of the schedule on the pool minus the seed, so that nothing found costs no second training "
                         "(docs/abl.md#nothing-found-no-restart); always: a fresh model every time (before "
                         "2026-12-03); never: the isolation model always continues, on the pool minus what was "
                         "removed, and the residual unlearning removes what it learned from the poison "
                         "(docs/abl.md#never-restart).", choices=RESTARTS)
    isolation_extra_epochs: int = _knob(0, "retrain mode, isolation_stop=auto: when neither the seed nor the label "
                                        "scan finds a separate population after the isolation epochs, keep "
                                        "training the isolation model up to this many more epochs, checking after "
                                        "each (at 1% poison some backdoors separate only later); if none is "
                                        "found the outcome at T_te stands. 0 = off (default: with 2 it removed "
                                        "Blend 1% in two more seeds but also a clean sub-type of clean data, "
                                        "docs/abl.md#isolation-extension).")
    expansion_union_sd: float = _knob(3.0, "retrain mode: when the label scan's find replaces a capped seed "
                                      "expansion in the same label and the held-out split holds this many sd more "
                                      "of the label than the find's poison estimate, remove both (the label holds "
                                      "more poison than the scan took). 0 = off "
                                      "(docs/abl.md#capped-expansion-kept-by-the-count).")
    expansion_capped_count_sd: float = _knob(3.0, "retrain mode: a capped seed expansion that no label scan "
                                             "confirmed is kept only when the held-out split holds at least this "
                                             "many sd more of its label than a clean label's share (dirty-label "
                                             "poison adds its copies there, a clean sub-type does not); otherwise "
                                             "only the seed is removed and the isolation model continues. 0 = off "
                                             "(before 2026-12-03; docs/abl.md#capped-expansion-refused-by-the-count).")
    expansion_off_label_ratio: float = _knob(4.0, "retrain mode: when nothing separate was found at an isolation "
                                             "check, look for the label the model confidently predicts as every "
                                             "other class (confident learning's joint: dirty-label poison it has not "
                                             "learned yet, WaNet at 1%); its floor — the second-rarest off-label "
                                             "cell — must reach 10 and this many times the next label's + 1, and its "
                                             "examples predicted as another class are removed. 0 = off "
                                             "(docs/abl.md#off-label-scan).")
    expansion_recheck_epoch: int = _knob(1, "retrain mode: after this epoch of a fresh model's clean stage, recheck "
                                         "the removed label for poison the removal missed "
                                         "(--abl-expansion-recheck-method); 0 = off. On by default since 2026-12-05 "
                                         "with pixel-restart: on WaNet 3-10% (AMD EPYC) 5 of the 6 runs whose "
                                         "removal had missed copies went from ASR 2.7-19.0% to 1.7-2.1% (not 3% "
                                         "seed 1), at up to 0.4 CA points where nothing was missed; 1.3-1.7x plain "
                                         "training where it runs. It does not run after an input-scan find, nor "
                                         "when nothing was found "
                                         "(docs/abl.md#pixel-space-recheck).")
    expansion_recheck_method: str = _knob("pixel-restart", "the clean-stage recheck's rule: pixel-restart (a "
                                          "binary CNN on raw pixels, trained on the removal against other labels, "
                                          "flags the label's remaining examples that look like the removal; when "
                                          "it flags any the fresh model starts again without them), pixel (the "
                                          "same, the model continues), or confidence (the fresh model's "
                                          "probability of the label under its mean: poison not learned yet and "
                                          "the label's least typical clean examples, 0.8-2.2 CA points; passes "
                                          "per --abl-expansion-recheck-passes; docs/abl.md#clean-stage-recheck, "
                                          "docs/abl.md#pixel-space-recheck).",
                                          choices=RECHECK_METHODS)
    expansion_recheck_count_sd: float = _knob(0.0, "the pixel recheck's count top-up (opt-in): when the removed "
                                              "label still holds this many sd more examples than the median label "
                                              "after the removal and the flags (Poisson sd; balanced classes only), "
                                              "its that many examples the fresh model places least surely in it are "
                                              "removed too (a removal that took one part of the poison; WaNet 3% "
                                              "seed 1: ASR 20.0% -> 5.5%, but WaNet 5% seed 1 1.9% -> 3.0%; "
                                              "docs/abl.md#count-top-up). 0 = off; 3 was measured.")
    expansion_recheck_scale: float = _knob(1.0, "the clean-stage recheck's threshold as a multiple of the label's "
                                           "mean probability (1: confident learning's; lower takes fewer clean "
                                           "examples and less of the missed poison).")
    expansion_recheck_passes: int = _knob(1, "the clean-stage recheck's passes: one after each epoch from "
                                          "--abl-expansion-recheck-epoch on (a second pass takes poison the first "
                                          "left, once the model places the label's clean examples more surely).")
    expansion_recheck_min_mean: float = _knob(0.5, "a clean-stage recheck pass is skipped when the label's mean "
                                              "probability over its remaining examples is under this: a model that "
                                              "has not learned the label would put the threshold in its clean bulk.")
    residual_unlearning_epochs: int = _knob(5, "retrain mode: when the retrained model's own evidence says the "
                                            "backdoor is still there (verdict likely-present: the held-out probe "
                                            "fires), unlearn the removed set from it for this many epochs — joint, "
                                            "complementary-label ascent, behind the unlearning guard. 0 = off "
                                            "(docs/abl.md#residual-unlearning). [default: 5 in retrain mode, "
                                            "else 0]", cli_default=None)
    residual_unlearning_lr: float = _knob(2e-3, "retrain mode: the residual unlearning's learning rate.")
    residual_max_ca_drop: float = _knob(0.01, "retrain mode: the residual unlearning's clean-accuracy guard (as "
                                        "--abl-max-ca-drop, 0.01 = 1 point: a retrained model's accuracy is the "
                                        "one to keep; at 2 points WaNet 10% seed 2 lost 2.6 CA points for a "
                                        "backdoor still at 9.4%, docs/abl.md#residual-unlearning).")
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
    unlearning_epochs: int = _knob(0, "Gradient-ascent epochs on the isolated set, after the clean stage. "
                                   "[default: 0 in retrain mode, 5 otherwise]", cli_default=None)
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
    ABL_KNOBS = ("mode", "gamma", "lga", "isolation_epochs", "isolation_stop", "isolation_concentration",
                 "isolation_ratio", "isolation_score", "isolation_reference",
                 "isolation_labels", "expansion_method", "expansion_posterior", "expansion_separation",
                 "expansion_max_share", "expansion_scan_share", "expansion_scan_method", "expansion_scan_separation",
                 "expansion_scan_count_sd", "expansion_input_separation", "input_scan", "retrain_epochs", "restart",
                 "isolation_extra_epochs",
                 "expansion_union_sd", "expansion_capped_count_sd", "expansion_off_label_ratio",
                 "expansion_recheck_epoch", "expansion_recheck_method", "expansion_recheck_scale",
                 "expansion_recheck_passes", "expansion_recheck_min_mean", "expansion_recheck_count_sd",
                 "residual_unlearning_epochs",
                 "residual_unlearning_lr", "residual_max_ca_drop",
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
            (self.isolation_extra_epochs < 0, "isolation_extra_epochs must be >= 0 (0 = off)"),
            (self.clean_epochs < 0 or self.unlearning_epochs < 0, "clean_epochs and unlearning_epochs must be >= 0"),
            (self.residual_unlearning_epochs < 0, "residual_unlearning_epochs must be >= 0 (0 = off)"),
            (self.expansion_union_sd < 0, "expansion_union_sd must be >= 0 (0 = off)"),
            (self.expansion_capped_count_sd < 0, "expansion_capped_count_sd must be >= 0 (0 = off)"),
            (self.expansion_recheck_epoch < 0, "expansion_recheck_epoch must be >= 0 (0 = off)"),
            (not 0.0 < self.expansion_recheck_scale <= 1.0, "expansion_recheck_scale must be in (0, 1]"),
            (self.expansion_recheck_passes < 1, "expansion_recheck_passes must be >= 1"),
            (self.expansion_recheck_count_sd < 0, "expansion_recheck_count_sd must be >= 0 (0 = off)"),
            (not 0.0 <= self.expansion_recheck_min_mean < 1.0, "expansion_recheck_min_mean must be in [0, 1)"),
            (not 0.0 < self.isolation_ratio < 1.0, f"isolation_ratio must be in (0, 1), got {self.isolation_ratio}"),
            (not 0.0 <= self.holdout < 0.5, f"holdout must be in [0, 0.5), got {self.holdout}"),
            (self.unlearning_bound < 0, "unlearning_bound must be >= 0 (0 = unbounded ascent)"),
            (self.max_ca_drop < 0, "max_ca_drop must be >= 0"),
            (self.residual_max_ca_drop < 0, "residual_max_ca_drop must be >= 0"),
            (not 0.0 < self.isolation_concentration <= 1.0, "isolation_concentration must be in (0, 1]"),
            (not 0.0 < self.expansion_posterior < 1.0, "expansion_posterior must be in (0, 1)"),
            (not 0.0 < self.expansion_max_share <= 1.0, "expansion_max_share must be in (0, 1]"),
            (not 0.0 <= self.expansion_scan_share < 0.5, "expansion_scan_share must be in [0, 0.5) (0 = off)"),
            (self.expansion_scan_separation < 0, "expansion_scan_separation must be >= 0 (0 = off)"),
            (self.expansion_scan_count_sd < 0, "expansion_scan_count_sd must be >= 0 (0 = off)"),
            (self.expansion_input_separation < 0, "expansion_input_separation must be >= 0 (0 = off)"),
            (self.lr <= 0 or self.unlearning_lr <= 0 or self.residual_unlearning_lr <= 0,
             "learning rates must be > 0"),
            (self.batch_size < 1 or self.eval_every < 0, "batch_size must be >= 1 and eval_every >= 0"),
        ]

    @property
    def total_epochs(self) -> int:
        return self.isolation_epochs + self.clean_epochs

    @property
    def retrain(self) -> bool:
        """Whether the clean stage retrains a freshly initialised model on the cleansed set (``mode="retrain"``)."""
        return self.mode == "retrain"

    @classmethod
    def for_mode(cls, mode: str = "retrain", **knobs: Any) -> ABLConfig:
        """The config of ``mode`` (its :data:`PRESETS` over the defaults), with ``knobs`` set on top."""
        if mode not in PRESETS:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        return cls(mode=mode, **{**PRESETS[mode], **knobs})

    def lr_at(self, epoch: int, length: int | None = None) -> float:
        """Step schedule over global epochs (isolation and clean stage share it); ``length``: a stage of that many
        epochs that stands for the whole ``clean_epochs`` schedule, its milestones scaled to it (rounded, at least
        epoch 1)."""
        milestones = self.lr_milestones
        if length is not None and length != self.clean_epochs and self.clean_epochs > 0:
            milestones = tuple(max(1, round(m * length / self.clean_epochs)) for m in milestones)
        return self.lr * self.lr_gamma ** sum(1 for m in milestones if epoch >= m)

    def clean_stage_epochs(self, isolation_epochs_run: int) -> int:
        """The clean stage's length: ``clean_epochs``, or in retrain mode with ``retrain_epochs="remaining"`` what is
        left of it after the isolation epochs run (at least 1)."""
        if self.retrain and self.retrain_epochs == "remaining":
            return max(1, self.clean_epochs - isolation_epochs_run)
        return self.clean_epochs

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["lr_milestones"] = list(self.lr_milestones)
        return d

    @classmethod
    def from_train(cls, train: TrainConfig, params: dict[str, Any] | None = None) -> ABLConfig:
        """Build from the shared training options plus ABL knobs (``params``; unknown keys are an error).

        ``params["mode"]`` picks the preset the other params override. ``train.epochs`` is the total ``T``;
        ``isolation_epochs`` defaults to 20% of it (the paper's 20 of 100, at least 1) and the clean stage takes the
        rest — in ``retrain`` mode the clean stage is a full ``T`` of its own and ``isolation_epochs`` its maximum.
        """
        params = dict(params or {})
        mode = params.get("mode", "retrain")
        if mode not in PRESETS:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        params = {**PRESETS[mode], **params}
        unknown = sorted(set(params) - set(cls.ABL_KNOBS))
        if unknown:
            hint = " (the clean stage is --epochs minus the isolation epochs)" if "clean_epochs" in unknown else ""
            raise ValueError(f"unknown ABL parameter(s) {unknown}{hint}; known: {list(cls.ABL_KNOBS)}")
        iso = params.pop("isolation_epochs", None)
        iso = max(1, int(round(0.2 * train.epochs))) if iso is None else int(iso)
        clean = train.epochs if mode == "retrain" else train.epochs - iso
        if iso > train.epochs:
            raise ValueError(f"isolation epochs ({iso}) exceed the total --epochs ({train.epochs})")
        return cls(isolation_epochs=iso, clean_epochs=clean, lr=train.lr, lr_milestones=train.lr_milestones,
                   lr_gamma=train.lr_gamma, batch_size=train.batch_size, momentum=train.momentum,
                   weight_decay=train.weight_decay, augment=train.augment, seed=train.seed, device=train.device,
                   precision=train.precision, memory_format=train.memory_format, **params)
