"""Anti-Backdoor Learning (Li, Lyu, Koren, Lyu, Li, Ma — NeurIPS 2021, arXiv 2110.11571).

Training on poisoned data is treated as a clean task and a backdoor task learned together. Backdoor examples are
learned much faster, so ABL runs in three stages on one model:

1. **Isolation** (epochs ``0 .. T_te``): training with local gradient ascent (LGA), ``sign(l - gamma) * l``. The loss
   hovers around ``gamma`` instead of reaching zero, so clean examples stay near ``gamma`` while the fast-learned
   backdoor examples fall far below it. At ``T_te`` the per-example loss of every training example is computed in eval
   mode, without augmentation, batched; the lowest-scoring fraction ``p`` is the isolated set ``D_b``.
2. **Clean stage** (epochs ``T_te .. T``): ordinary cross-entropy training on the rest, ``D_c = D \\ D_b``.
3. **Unlearning**: gradient ascent on ``D_b`` with its own (possibly poisoned) labels at a small learning rate, which
   breaks the link between the trigger and the target class — by default together with descent on ``D_c``, the
   paper's global gradient ascent ``L_GGA = E_Dc[l] - E_Db[l]``.

Defaults are the paper's (``gamma = 0.5``, ``p = 1%``, ``T_te = 20`` of ``T = 100``) and the official code's
(unlearning lr 5e-4 for 5 epochs, batch size 128, SGD with Nesterov momentum 0.9), except for the three measured
choices below (isolation score, unlearning objective and its bound), which each have a switch back to the paper.
All numbers quoted here are from ``bench/abl.py`` (``bench/results/abl*.md``) unless marked exploratory: attacks at
10% on 20,000 Fashion-MNIST training images, the small CNN, T = 10 epochs with T_te = 2. At the paper's own schedule
(``bench/abl_gpu.py``, ``bench/results/abl_gpu.md``: NVIDIA H200, PreAct-ResNet-18, Fashion-MNIST padded to 32x32,
37,000 images, BadNets 10%, T = 100, T_te = 20, p = 1%, one seed) these defaults took ASR from 100% to 0.48% at a CA
cost of 0.8 points, isolating only poison (precision 100%), in 1.14x the wall time of plain training.

Deviations from the paper and the official code (``bboylyg/ABL``), each deliberate:

* **LGA form.** ``lga="flooding"`` (default) applies ``|L - gamma| + gamma`` to the mini-batch *mean* loss ``L`` as the
  official code and BackdoorBench do (same gradient as ``sign(L - gamma) * L``); ``lga="per-example"`` applies
  ``sign(l_i - gamma) * l_i`` to each example and then averages (BackdoorBox; closer to the paper's E[.] notation).
  Flooding is the default because it isolated better on average in our measurement (``bench/abl.py
  --lga-compare``: BadNets on Fashion-MNIST, raw-loss ranking, 6 seeds x 3 schedules, mean precision of the
  isolated 1% 70% vs 58%) and ranks the poison better overall (AUROC 0.87-0.92 vs 0.67-0.83): per-example ascent
  also pushes the backdoor examples back up towards ``gamma``, which shrinks the loss gap the isolation relies on
  (2.7-3.2 decades between the isolated set and the rest with flooding, 0.5-0.7 per example).
* **Isolation score** (``isolation_score``). The paper ranks the raw per-example loss (``"loss"``). The default
  ``"class-relative"`` ranks ``log l_i`` minus the median log-loss of the example's own label
  (:func:`isolation_scores`), using the paper's second premise (a backdoor is tied to one target class): an
  intrinsically easy clean class then no longer passes for a fast-learned backdoor. Measured on the same isolation
  runs (``bench/results/abl_isolation.md``, p = 1%, seeds 0-2): precision BadNets 99.8% vs 67.5% (seed 0: the raw
  loss isolated trousers, 3%), Blend 85.5% vs 66.2%, Trojan 74.8% vs 33.2%. On the tiny 8x8 digits set (1,437 images,
  5% isolated) both rank poorly (exploratory: 54-61% vs 21-91%; the end-to-end test uses ``"loss"``). Both fail where
  the whole target class is poisoned (SIG / label-consistent at 10% = every target image).
* **Unlearning objective** (``unlearning``). The official code runs plain ascent ``-CE(D_b)`` after the clean stage
  (``"ascent"``); on our models that removes the backdoor only together with most of the clean accuracy, even from a
  pure-poison isolated set, the target class collapsing first (``--unlearning-sweep``, ``bench/results/abl.md`` as of
  commit 3363b3b: BadNets, ascent at 5e-4 reached ASR 0.8% at CA 26.3% and 1.2% at 64.4%, from 86.9% and 84.5%).
  The default ``"joint"`` uses the paper's own
  ``L_GGA = E_Dc[l] - E_Db[l]`` in the unlearning stage: each step descends on a batch of ``D_c`` and ascends on a
  batch of ``D_b`` in one forward pass, the clean stage still running before it as in the official code.
* **Bounded ascent** (``unlearning_bound``, default 5; 0 = unbounded as in the paper). The ascent term of an isolated
  example is dropped once its cross-entropy exceeds the bound (its target probability is below ``e^-5``): unbounded
  ascent keeps a constant push on the target logit long after the link is broken, which is what erodes the clean
  task (exploratory, BadNets seed 0, p = 5%, lr 5e-4: joint unbounded fell to CA 32.5% by epoch 8; bounded at 5 it
  dipped to 74% in epochs 2-3, then held 81.9-83.5% with ASR 0.4-2.2% in epochs 5-10). Results with all three
  defaults: ``bench/results/abl.md``. On a converged model the bound sets a CA / ASR trade-off
  (``bench/results/abl_sched_sweep.md``, BadNets seed 0, 10 unguarded epochs from CA 87.4%: bound 1 -> 86.3% / ASR
  20.9%, bound 2 -> 85.2% / 8.4%, bound 5 -> 82.6% / 1.4%).
* **One schedule, not two scripts.** Isolation and clean stage share one SGD optimiser and one step schedule over the
  global epoch count (``lr_milestones`` are global epochs, as for plain training), so ``--epochs`` means the same total
  training ``T`` with and without ABL. The official code restarts the optimiser between its scripts and runs
  10 + 60 epochs (the paper: 20 + 80). The isolation stage uses no augmentation (official code); the clean stage uses
  ``augment``. The official isolation loader does not shuffle; ours does.
* **Unlearning runs a real epoch each time** (the official loop only evaluates in its epoch 0, so its "5 epochs" are
  4 ascent epochs). BatchNorm is in train mode during unlearning, as in the official code.
* **Clean-accuracy guard on unlearning** (not in the paper). Unlearning is learning-rate sensitive (BackdoorBench
  issue #12) and can wreck the model. ABL assumes *no* clean data, so the guard uses a small random held-out split of
  the *training* data (``holdout``, default 2%), which never takes part in training. That split may itself be
  poisoned, and all-to-one and clean-label poisons carry the target label, so the guard watches two things that do not
  trust target labels (:func:`guard_metrics`): accuracy on held-out examples whose label is not the suspected target
  (the isolated set's majority label), and an estimate of the whole clean accuracy that charges the target class by
  the fraction of held-out examples *predicted* as the suspected target (:func:`estimated_accuracy`). The second
  catches the typical unlearning failure (measured on digits): the model stops predicting the target class. An epoch
  where either check fails by more than ``max_ca_drop`` is rejected; all epochs run (joint unlearning often dips in
  its first epoch and recovers) and the model kept is the passing epoch (the pre-unlearning model counts as epoch 0)
  with the best estimated held-out accuracy minus the fraction of isolated examples still predicted as their own
  labels. ``holdout = 0`` trains on everything and disables the guard (the last epoch is kept).
* **Isolated loss ranking** never uses batch size 1 (the official code does); eval-mode BatchNorm makes it identical.
  The per-example loss is computed in float64 as ``softplus(logsumexp_{j != y}(z_j - z_y))`` (equal to the
  cross-entropy), so examples fitted with large logit margins keep distinct losses instead of tying at exactly 0.

Options measured and *not* made the default (each kept as a switch; ``--unlearning-sweep`` in
``bench/results/abl_unlearning.md``: BadNets, Blend, Trojan x seeds 0-2, p = 5%, the main table's schedule,
unguarded unlearning from the same clean-stage model):

* ``isolation_reference`` (default 0.5): the class-relative score measures against the median of the label's
  log-loss, which lands inside the poison once over half of a label is poisoned (10% all-to-one poisoning makes the
  target label about half poison). The 75th percentile would stay on the clean part, but isolated no better: mean
  precision BadNets 97% vs 95% for the median, Blend 68% vs 69%, Trojan 67% vs 69% (raw loss: 70%, 64%, 24%).
* ``unlearning_ascent="complement"`` (default ``"negated-ce"``, the paper): minimising ``-log(1 - p_y)`` on the
  isolated examples instead of ``log p_y`` pushes at full strength while an example is still fitted and fades once
  it is unlearned, which should avoid the slow-then-runaway ascent seen on Blend. After 5 epochs (mean of 3 seeds,
  CA / ASR %, complement vs the paper's term): BadNets 82.4 / 9.0 vs 80.3 / 0.8, Trojan 72.9 / 18.9 vs 78.4 / 8.4,
  Blend 65.7 / 15.2 vs 73.4 / 33.3, with deeper CA dips on the way (lowest CA Blend 33% vs 47%).
* ``unlearning_epochs=10`` instead of the official 5 (``bench/results/abl_u10.md``, Blend, guarded): ASR per seed
  98.9%, 11.4%, 99.9% (5 epochs: 99.6 ± 0.6%). Seed 0 reached CA 81.1% / ASR 3.1% in epoch 9, but its held-out
  non-target accuracy (about 360 examples: a standard error near 2 points, the size of the guard's margin) was 2.8
  points below the start and the guard rejected it. With a 5% held-out split as well (``holdout=0.05``,
  ``bench/results/abl_u10_h5.md``) Blend was removed in all three seeds (ASR 0.01%, 0.38%, 1.86% at CA 84.6%, 83.8%,
  83.1%; no defence 81.4 ± 2.8%), but BadNets (CA 71.1% in one seed; ASR back to 9.9% in another, relearned from the
  unisolated poison in the clean batches) and Trojan (ASR 63.8% in one seed) were not better than with the defaults.
* ``isolation_labels="target"`` (default ``"all"``, the paper): unlearn only the isolated examples that carry the
  majority label of the lowest-scoring fraction (:func:`keep_target_label`) — the paper's premise of an all-to-one
  backdoor — and return the others to the clean set. In the main table every false positive of BadNets, Blend and
  Trojan had another label (precision equal to the majority share), and with this switch the unlearned set was
  95.9-100% poison in all nine runs of ``bench/results/abl_sched.md`` (BadNets, Blend, Trojan x seeds 0-2; the full
  lowest 5%: 88-100%, 61-77%, 31-90%). It did not make ABL succeed there: that benchmark trains to convergence (lr
  divided by 10 at epoch 7; no-defence CA 86.7-88.1%), and unlearning even a pure-poison set removed the backdoor (ASR
  0-3.3% by the fifth epoch) only at a cost of 13-59 CA points at the lowest and 6-17 at the fifth epoch, so the guard
  rejected those epochs and the backdoor stayed in 8 of 9 runs (ASR >= 99.2%; the ninth kept epoch 1, ASR 49.6%). The
  loss is not confined to the target class (held-out non-target accuracy fell as well). Frozen BatchNorm statistics
  gave the same first-epoch dip, and BackdoorBench's lr 1e-4 a smaller dip but the same CA after 10 epochs
  (``bench/results/abl_sched_sweep.md``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .train import (
    ArrayBatches,
    LossFn,
    TrainConfig,
    accuracy,
    log_odds_against,
    make_optimizer,
    per_example_loss,
    predict_logits,
    resolve_autocast,
    resolve_channels_last,
    select_device,
    train_one_epoch,
)

log = logging.getLogger(__name__)

LGA_FORMS = ("flooding", "per-example")
ISOLATION_SCORES = ("class-relative", "loss")
ISOLATION_LABELS = ("all", "target")
UNLEARNING_MODES = ("joint", "ascent")
ASCENT_FORMS = ("negated-ce", "complement")
STAGES = ("isolation", "clean", "unlearning", "done")
STATE_FILE = "abl_state.pt"
STATE_FORMAT = "abl-guard-abl-state/1"

# ------------------------------------------------------------------------------------------------- losses


def lga_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float, form: str = "flooding") -> torch.Tensor:
    """Local gradient ascent loss.

    ``flooding``: ``|L - gamma| + gamma`` on the batch-mean cross-entropy ``L`` (gradient ``sign(L - gamma) dL``).
    ``per-example``: ``mean_i sign(l_i - gamma) * l_i``; every example below ``gamma`` is pushed back up on its own.
    """
    if form == "flooding":
        return (F.cross_entropy(logits, labels) - gamma).abs() + gamma
    if form == "per-example":
        per = F.cross_entropy(logits, labels, reduction="none")
        return (torch.sign(per - gamma) * per).mean()
    raise ValueError(f"lga form must be one of {LGA_FORMS}, got {form!r}")


def cycle_batches(batches: ArrayBatches) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Endless mini-batches: one reshuffled pass of ``batches`` after another."""
    if len(batches) == 0:
        raise ValueError("cannot cycle over an empty set of batches")
    while True:
        yield from batches


def ascent_term(logits: torch.Tensor, labels: torch.Tensor, form: str = "negated-ce") -> torch.Tensor:
    """Per-example loss whose *minimisation* unlearns ``labels`` (the ascent half of ABL's unlearning).

    ``negated-ce`` (the paper): ``-CE = log p_y``. Its gradient ``-(1 - p_y)`` on the label logit vanishes while the
    example is still fitted (``p_y`` near 1) and grows to 1 as ``p_y`` falls, so the ascent starts slowly and then
    runs away. ``complement``: ``-log(1 - p_y)``, the cross-entropy towards "any class but y" (a complementary
    label). Its gradient on the label logit is ``p_y``: full strength while the example is fitted, vanishing once
    ``p_y`` is small, so it breaks the link and then stops pushing by itself.
    """
    if form == "negated-ce":
        return -F.cross_entropy(logits, labels, reduction="none")
    if form == "complement":
        return F.softplus(-log_odds_against(logits, labels))
    raise ValueError(f"ascent form must be one of {ASCENT_FORMS}, got {form!r}")


def unlearning_epoch(model: nn.Module, batches: ArrayBatches, optimizer: torch.optim.Optimizer,
                     bn: str = "train", autocast_dtype: torch.dtype | None = None,
                     channels_last: bool = False,
                     clean: Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
                     bound: float = 0.0, ascent: str = "negated-ce") -> float:
    """One pass of gradient ascent over ``batches`` (the isolated set); returns their mean cross-entropy (positive).

    ``clean=None`` (``unlearning="ascent"``, the official code): every step minimises ``-CE(isolated batch)``.
    With ``clean`` (an endless iterator of batches of the presumed-clean set; ``unlearning="joint"``) every step
    minimises the paper's global-gradient-ascent objective ``CE(clean batch) - CE(isolated batch)`` on one forward
    pass of both batches, so the descent on clean data holds clean accuracy while the ascent breaks the backdoor.
    ``bound > 0`` stops the ascent on an isolated example once its cross-entropy exceeds ``bound`` (0: unbounded,
    the paper), so the ascent cannot run away once the backdoor link is broken. ``ascent`` picks the ascent term
    (:func:`ascent_term`): the paper's negated cross-entropy or the complementary-label loss.
    ``bn="train"`` (official code) lets BatchNorm use and update the statistics of the step's batch;
    ``bn="frozen"`` keeps every BatchNorm layer in eval mode (running statistics from the clean stage).
    """
    if bn not in ("train", "frozen"):
        raise ValueError(f"unlearning bn must be 'train' or 'frozen', got {bn!r}")
    model.train()
    if bn == "frozen":
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.eval()
    total = torch.zeros((), device=batches.device)
    count = 0
    for x, y, _ in batches:
        n_iso = len(y)
        if clean is not None:
            xc, yc, _ = next(clean)
            x, y = torch.cat([x, xc]), torch.cat([y, yc])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            logits = model(x)
        logits = logits.float()
        iso = F.cross_entropy(logits[:n_iso], y[:n_iso], reduction="none")
        term = ascent_term(logits[:n_iso], y[:n_iso], ascent)
        pushed = (term * (iso.detach() < bound)).mean() if bound > 0 else term.mean()
        loss = pushed if clean is None else F.cross_entropy(logits[n_iso:], y[n_iso:]) + pushed
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += iso.detach().mean()
        count += 1
    return float(total) / max(count, 1)


def isolate_lowest(scores: np.ndarray, ratio: float) -> np.ndarray:
    """Positions of the lowest-score fraction ``ratio`` of ``scores`` (at least one), lowest first (stable on ties)."""
    scores = np.asarray(scores, dtype=np.float64)
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"isolation ratio must be in (0, 1), got {ratio}")
    if scores.ndim != 1 or len(scores) == 0:
        raise ValueError("scores must be a non-empty 1-D array")
    k = max(1, int(round(ratio * len(scores))))
    return np.argsort(scores, kind="stable")[:k]


def keep_target_label(candidates: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, int]:
    """The ``candidates`` (dataset indices) whose label is their majority label, in their order, and that label.

    ABL's second premise is an all-to-one backdoor: every poisoned example carries the target label, which is the
    majority label of a good isolated set. Candidates with another label are then clean examples that merely rank low
    (the most typical images of their own class); unlearning them costs clean accuracy and removes no backdoor.
    Ties between labels go to the smaller label.
    """
    candidates = np.asarray(candidates, np.int64)
    if len(candidates) == 0:
        raise ValueError("no isolation candidates")
    cand_labels = np.asarray(labels)[candidates]
    target = int(np.bincount(cand_labels).argmax())
    return candidates[cand_labels == target], target


def isolation_scores(losses: np.ndarray, labels: np.ndarray, mode: str = "class-relative",
                     reference: float = 0.5) -> np.ndarray:
    """The score ABL ranks at ``T_te`` (lowest = most suspect).

    ``loss``: the per-example loss itself (the paper). ``class-relative``:
    ``log(l_i) - quantile_{j: y_j = y_i}(log(l_j), reference)``, i.e. how far below the typical loss *of its own
    label* an example sits (``reference = 0.5``: the label's median). An intrinsically easy class (Fashion-MNIST
    trousers) then no longer looks like a fast-learned backdoor, while all-to-one and clean-label poisons, which share
    the target label with clean examples that are learned at the normal pace, stand out even more.
    The median is the typical *clean* loss only while less than half of a label is poisoned; 10% all-to-one poisoning
    of a balanced 10-class set makes the target label about half poison. A higher ``reference`` quantile ``q`` stays
    at the clean part's median while poison (if all of it sits below the clean loss) is up to ``2q - 1`` of a label.
    """
    if not 0.0 < reference < 1.0:
        raise ValueError(f"the reference quantile must be in (0, 1), got {reference}")
    losses = np.asarray(losses, dtype=np.float64)
    labels = np.asarray(labels)
    if losses.shape != labels.shape:
        raise ValueError(f"losses {losses.shape} and labels {labels.shape} differ in shape")
    if mode == "loss":
        return losses
    if mode != "class-relative":
        raise ValueError(f"isolation score must be one of {ISOLATION_SCORES}, got {mode!r}")
    log_loss = np.log(np.maximum(losses, np.finfo(np.float32).tiny))
    out = np.empty_like(log_loss)
    for y in np.unique(labels):
        m = labels == y
        out[m] = log_loss[m] - np.quantile(log_loss[m], reference)
    return out


def rank_auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` (higher = more positive) (Mann-Whitney U; ties averaged)."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    avg_rank = ends - (counts - 1) / 2.0  # 1-based average rank of each distinct value
    ranks = avg_rank[inverse]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


# ------------------------------------------------------------------------------------------------- config


@dataclass
class ABLConfig:
    """Every ABL knob. ``isolation_epochs + clean_epochs`` is the paper's total ``T`` (20 + 80)."""

    gamma: float = 0.5
    lga: str = "flooding"
    isolation_epochs: int = 20
    isolation_ratio: float = 0.01
    isolation_score: str = "class-relative"
    isolation_reference: float = 0.5
    isolation_labels: str = "all"
    clean_epochs: int = 80
    lr: float = 0.1
    lr_milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.1
    unlearning: str = "joint"
    unlearning_bound: float = 5.0
    unlearning_ascent: str = "negated-ce"
    unlearning_epochs: int = 5
    unlearning_lr: float = 5e-4
    unlearning_bn: str = "train"
    max_ca_drop: float = 0.02
    holdout: float = 0.02
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 1e-4
    augment: str = "none"
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    memory_format: str = "auto"
    eval_every: int = 1

    #: the knobs a caller may set through ``--defense-param`` / ``--abl-*`` (the rest come from the training options)
    ABL_KNOBS = ("gamma", "lga", "isolation_epochs", "isolation_ratio", "isolation_score", "isolation_reference",
                 "isolation_labels",
                 "unlearning", "unlearning_bound", "unlearning_ascent", "unlearning_epochs", "unlearning_lr",
                 "unlearning_bn", "max_ca_drop", "holdout", "eval_every")

    def __post_init__(self) -> None:
        self.lr_milestones = tuple(int(m) for m in self.lr_milestones)
        if self.lga not in LGA_FORMS:
            raise ValueError(f"lga must be one of {LGA_FORMS}, got {self.lga!r}")
        if self.isolation_score not in ISOLATION_SCORES:
            raise ValueError(f"isolation_score must be one of {ISOLATION_SCORES}, got {self.isolation_score!r}")
        if self.isolation_labels not in ISOLATION_LABELS:
            raise ValueError(f"isolation_labels must be one of {ISOLATION_LABELS}, got {self.isolation_labels!r}")
        if not 0.0 < self.isolation_reference < 1.0:
            raise ValueError(f"isolation_reference must be in (0, 1), got {self.isolation_reference}")
        if self.unlearning not in UNLEARNING_MODES:
            raise ValueError(f"unlearning must be one of {UNLEARNING_MODES}, got {self.unlearning!r}")
        if self.unlearning_ascent not in ASCENT_FORMS:
            raise ValueError(f"unlearning_ascent must be one of {ASCENT_FORMS}, got {self.unlearning_ascent!r}")
        if self.isolation_epochs < 1:
            raise ValueError("isolation_epochs (T_te) must be >= 1")
        if self.clean_epochs < 0 or self.unlearning_epochs < 0:
            raise ValueError("clean_epochs and unlearning_epochs must be >= 0")
        if not 0.0 < self.isolation_ratio < 1.0:
            raise ValueError(f"isolation_ratio must be in (0, 1), got {self.isolation_ratio}")
        if not 0.0 <= self.holdout < 0.5:
            raise ValueError(f"holdout must be in [0, 0.5), got {self.holdout}")
        if self.unlearning_bound < 0:
            raise ValueError("unlearning_bound must be >= 0 (0 = unbounded ascent)")
        if self.max_ca_drop < 0:
            raise ValueError("max_ca_drop must be >= 0")
        if self.lr <= 0 or self.unlearning_lr <= 0:
            raise ValueError("learning rates must be > 0")
        if self.unlearning_bn not in ("train", "frozen"):
            raise ValueError(f"unlearning_bn must be 'train' or 'frozen', got {self.unlearning_bn!r}")
        if self.batch_size < 1 or self.eval_every < 0:
            raise ValueError("batch_size must be >= 1 and eval_every >= 0")

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


# ------------------------------------------------------------------------------------------------- result


@dataclass
class ABLResult:
    """What :func:`run_abl` returns; ``report`` is JSON-able and goes into the run record under ``abl``."""

    history: list[dict[str, Any]]
    report: dict[str, Any]
    isolated: np.ndarray  # dataset indices, lowest loss first
    holdout: np.ndarray  # dataset indices never trained on
    losses: np.ndarray  # per-example loss at T_te, NaN for held-out examples


SaveStage = Callable[[Path, nn.Module, str], None]
Evaluate = Callable[[nn.Module], dict[str, float]]


def _fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(str(images.shape).encode())
    h.update(np.ascontiguousarray(images).data)
    h.update(np.ascontiguousarray(labels, dtype=np.int64).data)
    return h.hexdigest()


class _State:
    """Resume state: one file, rewritten atomically after every epoch (weights, optimiser, RNGs, partial report)."""

    def __init__(self, out_dir: Path | None) -> None:
        self.path = None if out_dir is None else Path(out_dir) / STATE_FILE

    def save(self, blob: dict[str, Any]) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        torch.save({"format": STATE_FORMAT, **blob}, tmp)
        os.replace(tmp, self.path)

    def load(self) -> dict[str, Any] | None:
        if self.path is None or not self.path.exists():
            return None
        blob = torch.load(self.path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != STATE_FORMAT:
            raise ValueError(f"{self.path} is not an ABL resume state")
        return blob


def _rng_state(batches: ArrayBatches | None) -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    if batches is not None:
        out["batches"] = batches.generator.get_state()
    return out


def _set_rng_state(state: dict[str, torch.Tensor], batches: ArrayBatches | None) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if batches is not None and "batches" in state:
        batches.generator.set_state(state["batches"])


def _sd(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------- the run


def run_abl(model: nn.Module, images: np.ndarray, labels: np.ndarray, cfg: ABLConfig,
            out_dir: str | Path | None = None, evaluate: Evaluate | None = None,
            poison_indices: np.ndarray | None = None, quiet: bool = False, resume: bool = False,
            save_stage: SaveStage | None = None) -> ABLResult:
    """Train ``model`` with ABL on ``images``/``labels`` (uint8 NHWC, int64) and return its history and report.

    ``evaluate(model)`` (CA / ASR on test data) runs after every stage, every unlearning epoch and every
    ``eval_every`` isolation / clean epochs (0: none).
    ``poison_indices`` (ground truth, when known) adds precision / recall / AUROC of the isolation to the report.
    ``out_dir`` receives the isolated indices, the loss histogram, the isolated-image grid, stage checkpoints (via
    ``save_stage(path, model, stage)``) and the resume state; ``resume=True`` continues from that state.
    """
    out = None if out_dir is None else Path(out_dir)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    device = select_device(cfg.device)
    autocast_dtype = resolve_autocast(cfg.precision, device)
    channels_last = resolve_channels_last(cfg.memory_format, device)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    step_kw = {"quiet": quiet, "autocast_dtype": autocast_dtype, "channels_last": channels_last}

    # the held-out split (never trained on) for the clean-accuracy guard of the unlearning stage
    n_hold = int(round(cfg.holdout * n))
    rng = np.random.default_rng(cfg.seed + 7919)
    holdout = np.sort(rng.choice(n, n_hold, replace=False)) if n_hold else np.zeros(0, np.int64)
    pool = np.setdiff1d(np.arange(n), holdout)

    state_io = _State(out)
    config_json = json.dumps(cfg.to_json(), sort_keys=True)
    fingerprint = _fingerprint(images, labels)
    history: list[dict[str, Any]] = []
    report: dict[str, Any] = {"config": cfg.to_json(), "stages": {}, "seconds": {}, "warnings": [], "files": {},
                              "holdout": {"n": int(len(holdout)), "fraction": cfg.holdout}}
    stage, epoch_in_stage = "isolation", 0
    isolated = np.zeros(0, np.int64)
    losses = np.full(n, np.nan, np.float32)
    opt = make_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay)
    saved: dict[str, Any] | None = state_io.load() if resume else None
    pending_rng: dict[str, Any] = {}  # RNG state to restore at the first stage that runs after a resume
    if resume and saved is None:
        log.warning("--resume: no ABL state in %s, starting from scratch", out)
    if saved is not None:
        if saved["config_json"] != config_json or saved["fingerprint"] != fingerprint:
            raise ValueError(f"cannot resume from {state_io.path}: the ABL configuration or the training data "
                             "differ from the interrupted run")
        model.load_state_dict(saved["model"])
        history = json.loads(saved["history_json"])
        report = json.loads(saved["report_json"])
        stage, epoch_in_stage = str(saved["stage"]), int(saved["epoch"])
        isolated = saved["isolated"].numpy().astype(np.int64)
        losses = saved["losses"].numpy()
        if stage in ("isolation", "clean") and "optimizer" in saved:
            opt.load_state_dict(saved["optimizer"])
        pending_rng.update(saved.get("rng", {}))
        log.info("resuming ABL at stage %s, epoch %d", stage, epoch_in_stage)

    def snapshot(stage_: str, epoch_: int, optimizer: torch.optim.Optimizer | None,
                 batches: ArrayBatches | None, extra: dict[str, Any] | None = None) -> None:
        if state_io.path is None:  # no run directory: nothing to resume from, so skip the device-to-host copy
            return
        blob: dict[str, Any] = {"stage": stage_, "epoch": epoch_, "model": _sd(model), "config_json": config_json,
                                "fingerprint": fingerprint, "history_json": json.dumps(history),
                                "report_json": json.dumps(report), "isolated": torch.as_tensor(isolated),
                                "losses": torch.as_tensor(losses), "rng": _rng_state(batches)}
        if optimizer is not None:
            blob["optimizer"] = optimizer.state_dict()
        blob.update(extra or {})
        state_io.save(blob)

    def add_time(key: str, seconds: float) -> None:
        report["seconds"][key] = report["seconds"].get(key, 0.0) + seconds

    def stage_end(name: str) -> None:
        metrics = evaluate(model) if evaluate is not None else {}
        report["stages"][name] = {**metrics, "seconds": report["seconds"].get(name, 0.0)}
        log.info("ABL after %s: %s", name, {k: round(v, 4) for k, v in metrics.items()})
        if save_stage is not None and out is not None:
            save_stage(out / f"stage_{name}.pt", model, name)
            report["files"][f"stage_{name}"] = f"stage_{name}.pt"

    def run_epochs(name: str, first_epoch: int, n_epochs: int, batches: ArrayBatches, optimizer,
                   loss_fn: LossFn, lr_of: Callable[[int], float]) -> None:
        nonlocal epoch_in_stage
        if pending_rng:
            _set_rng_state(pending_rng, batches)
            pending_rng.clear()
        for e in range(epoch_in_stage, n_epochs):
            t0 = time.perf_counter()
            lr = lr_of(first_epoch + e)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = train_one_epoch(model, batches, optimizer, loss_fn,
                                   f"ABL {name} {e + 1}/{n_epochs}", **step_kw)
            secs = time.perf_counter() - t0
            add_time(name, secs)
            rec: dict[str, Any] = {"stage": name, "epoch": first_epoch + e + 1, "loss": loss, "lr": lr,
                                   "seconds": secs}
            if evaluate is not None and cfg.eval_every and (e + 1) % cfg.eval_every == 0 and e + 1 < n_epochs:
                rec.update(evaluate(model))
            log.info("ABL %s epoch %d: %s", name, first_epoch + e + 1,
                     {k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()})
            history.append(rec)
            epoch_in_stage = e + 1
            snapshot(name, epoch_in_stage, optimizer, batches)

    # ---------------------------------------------------------------- stage 1: LGA isolation training
    if stage == "isolation":
        batches = ArrayBatches(images, labels, device, cfg.batch_size, augment="none", seed=cfg.seed,
                               indices=pool)

        def lga(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return lga_loss(logits, y, cfg.gamma, cfg.lga)

        run_epochs("isolation", 0, cfg.isolation_epochs, batches, opt, lga, cfg.lr_at)
        del batches
        stage_end("isolation")
        t0 = time.perf_counter()
        pool_losses = per_example_loss(model, images[pool], labels[pool], device, batch_size=max(512, cfg.batch_size))
        losses = np.full(n, np.nan, np.float32)
        losses[pool] = pool_losses
        pool_scores = isolation_scores(pool_losses, labels[pool], cfg.isolation_score, cfg.isolation_reference)
        candidates = pool[isolate_lowest(pool_scores, cfg.isolation_ratio)]
        isolated = keep_target_label(candidates, labels)[0] if cfg.isolation_labels == "target" else candidates
        add_time("isolate", time.perf_counter() - t0)
        scores = np.full(n, np.nan, np.float32)
        scores[pool] = pool_scores
        report["isolation"] = isolation_report(losses, isolated, labels, pool, poison_indices, cfg, scores,
                                               candidates)
        _write_isolation_artifacts(out, images, labels, losses, scores, isolated, pool, poison_indices, report)
        stage, epoch_in_stage = "clean", 0
        snapshot(stage, 0, opt, None)

    # ---------------------------------------------------------------- stage 2: clean training on D \ D_b
    if stage == "clean":
        rest = np.setdiff1d(pool, isolated)
        batches = ArrayBatches(images, labels, device, cfg.batch_size, augment=cfg.augment, seed=cfg.seed + 1,
                               indices=rest)
        run_epochs("clean", cfg.isolation_epochs, cfg.clean_epochs, batches, opt, F.cross_entropy, cfg.lr_at)
        del batches
        stage_end("clean")
        stage, epoch_in_stage = "unlearning", 0
        snapshot(stage, 0, None, None)

    # ---------------------------------------------------------------- stage 3: unlearning D_b
    if stage == "unlearning":
        _unlearn(model, images, labels, isolated, holdout, cfg, device, report, history, step_kw, evaluate,
                 saved if saved is not None and saved["stage"] == "unlearning" else None, dict(pending_rng),
                 snapshot, add_time)
        pending_rng.clear()
        stage_end("unlearning")
        report["warnings"] = failure_warnings(report, cfg)
        for w in report["warnings"]:
            log.warning("ABL: %s", w)
        stage = "done"
        report["seconds"]["total"] = sum(v for k, v in report["seconds"].items() if k != "total")
        snapshot("done", 0, None, None)
    elif stage == "done":
        log.info("ABL state in %s is complete; nothing to resume", out)

    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    return ABLResult(history, report, isolated, holdout, losses)


def guard_metrics(model: nn.Module, images: np.ndarray, labels: np.ndarray, target: int,
                  device: torch.device) -> dict[str, float]:
    """The two quantities the unlearning guard watches on the held-out split (one batched forward pass).

    ``nontarget_accuracy``: accuracy on held-out examples whose label is not the suspected target (all-to-one and
    clean-label poisons carry the target label, so these are clean). ``target_rate``: the fraction of all held-out
    examples predicted as the suspected target; it cannot be scored against the (possibly poisoned) labels, but it
    reveals the classic unlearning failure where the model stops predicting the target class altogether.
    """
    if len(labels) == 0:
        return {"nontarget_accuracy": float("nan"), "target_rate": float("nan")}
    pred = predict_logits(model, images, device).argmax(1)
    keep = labels != target
    return {"nontarget_accuracy": float((pred[keep] == labels[keep]).mean()) if keep.any() else float("nan"),
            "target_rate": float((pred == target).mean())}


def estimated_accuracy(metrics: dict[str, float], prior: float) -> float:
    """Clean accuracy estimated from :func:`guard_metrics` without trusting target labels.

    ``(1 - prior) * nontarget_accuracy + prior * min(1, target_rate / prior)``: the non-target classes weighted by
    their share, the target class by its share times a recall bounded by how many held-out examples are predicted as
    the target at all (``prior`` = the share a clean target class would have). While a backdoor is active the
    triggered held-out examples inflate ``target_rate``, so the estimate before unlearning is an upper bound.
    """
    if not prior > 0:
        return float(metrics["nontarget_accuracy"])
    recall = min(1.0, metrics["target_rate"] / prior)
    return float((1.0 - prior) * metrics["nontarget_accuracy"] + prior * recall)


def _unlearn(model: nn.Module, images: np.ndarray, labels: np.ndarray, isolated: np.ndarray, holdout: np.ndarray,
             cfg: ABLConfig, device: torch.device, report: dict[str, Any], history: list[dict[str, Any]],
             step_kw: dict[str, Any], evaluate: Evaluate | None, saved: dict[str, Any] | None,
             rng_state: dict[str, Any], snapshot: Callable[..., None], add_time: Callable[[str, float], None]) -> None:
    """Unlearning epochs on the isolated set; the guard then keeps the best epoch that passed it.

    An epoch *passes* the guard unless (a) accuracy on held-out non-target examples is more than ``max_ca_drop`` below
    its value before unlearning, or (b) the clean accuracy estimated without trusting target labels
    (:func:`estimated_accuracy`, with ``prior`` the median share of the other labels among held-out examples) is more
    than ``max_ca_drop`` below its value before unlearning. (b) charges the target class: after a successful
    unlearning only clean target images should still be predicted as the target, and a model that stops predicting
    the target class (the classic unlearning failure) loses up to ``prior`` of estimated accuracy. An earlier
    version bounded the target-prediction rate alone; it rejected unlearning epochs whose test CA was within half a
    point of the start (the lost target recall was paid back by the other classes).

    Every epoch runs (joint unlearning often dips in its first epoch and recovers as the clean term repairs the
    model); at the end the model is set to the passing epoch — the state before unlearning counts as epoch 0 — with the
    highest estimated accuracy minus the fraction of isolated examples still predicted as their own labels (the ASR
    probe; ties: the later epoch). Without a held-out split the last epoch is kept.
    """
    iso_images, iso_labels = images[isolated], labels[isolated]
    hold_x, hold_y = images[holdout], labels[holdout]
    un = report.setdefault("unlearning", {})
    if "guard" not in un:
        target = int(np.bincount(iso_labels).argmax()) if len(iso_labels) else -1
        others = np.bincount(hold_y[hold_y != target]) if len(hold_y) else np.zeros(0, np.int64)
        prior = float(np.median(others[others > 0]) / len(hold_y)) if (others > 0).any() else float("nan")
        base = guard_metrics(model, hold_x, hold_y, target, device)
        enabled = bool(len(hold_y)) and not np.isnan(base["nontarget_accuracy"])
        un.update({
            "guard": {"n_holdout": int(len(hold_y)), "n_nontarget": int((hold_y != target).sum()),
                      "suspected_target": target, "max_ca_drop": cfg.max_ca_drop, "enabled": enabled,
                      "baseline": {**base, "estimated_accuracy": estimated_accuracy(base, prior)},
                      "target_prior": prior},
            "epochs_run": 0, "trajectory": [], "rejected_epochs": [], "selected_epoch": 0,
            "isolated_accuracy_before": accuracy(model, iso_images, iso_labels, device),
        })
        if not enabled:
            log.warning("ABL: no held-out split, unlearning runs without the clean-accuracy guard")
        elif len(hold_y) < 200:
            log.warning("ABL: the clean-accuracy guard has only %d held-out examples", len(hold_y))
    guard = un["guard"]
    target = guard["suspected_target"]

    def rank(iso_acc: float, est_acc: float, epoch: int) -> tuple[float, int]:
        return (-round(est_acc - iso_acc, 4), -epoch)  # higher estimated accuracy minus the ASR probe, later epoch

    opt = make_optimizer(model, cfg.unlearning_lr, cfg.momentum, cfg.weight_decay)
    batches = ArrayBatches(iso_images, iso_labels, device, cfg.batch_size, augment="none", seed=cfg.seed + 2)
    clean_batches = None
    if cfg.unlearning == "joint":
        rest = np.setdiff1d(np.setdiff1d(np.arange(len(labels)), holdout), isolated)
        clean_batches = ArrayBatches(images, labels, device, cfg.batch_size, augment=cfg.augment, seed=cfg.seed + 3,
                                     indices=rest)
    start = 0
    best_sd = _sd(model)
    best_key = rank(un["isolated_accuracy_before"], guard["baseline"]["estimated_accuracy"], 0)
    if saved is not None:
        start = int(saved["epoch"])
        if "optimizer" in saved:
            opt.load_state_dict(saved["optimizer"])
        if "best_model" in saved:
            best_sd = saved["best_model"]
            best_key = tuple(json.loads(saved["best_key_json"]))
    if rng_state:
        _set_rng_state(rng_state, batches)
    for e in range(start, cfg.unlearning_epochs):
        t0 = time.perf_counter()
        clean = None
        if clean_batches is not None:  # reseeded per epoch, so a resumed run draws the same clean batches
            clean_batches.generator.manual_seed(cfg.seed + 3 + 1009 * e)
            clean = cycle_batches(clean_batches)
        loss = unlearning_epoch(model, batches, opt, cfg.unlearning_bn, step_kw["autocast_dtype"],
                                step_kw["channels_last"], clean=clean, bound=cfg.unlearning_bound,
                                ascent=cfg.unlearning_ascent)
        g = guard_metrics(model, hold_x, hold_y, target, device)
        iso_acc = accuracy(model, iso_images, iso_labels, device)
        secs = time.perf_counter() - t0
        add_time("unlearning", secs)
        reasons = []
        g["estimated_accuracy"] = estimated_accuracy(g, guard["target_prior"])
        if guard["enabled"]:
            if guard["baseline"]["nontarget_accuracy"] - g["nontarget_accuracy"] > cfg.max_ca_drop:
                reasons.append("non-target accuracy drop")
            if guard["baseline"]["estimated_accuracy"] - g["estimated_accuracy"] > cfg.max_ca_drop:
                reasons.append("estimated accuracy drop (target class)")
        rec: dict[str, Any] = {"stage": "unlearning", "epoch": cfg.total_epochs + e + 1, "loss": loss,
                               "lr": cfg.unlearning_lr, "seconds": secs, "guard_nontarget_accuracy":
                               g["nontarget_accuracy"], "guard_target_rate": g["target_rate"],
                               "guard_estimated_accuracy": g["estimated_accuracy"], "isolated_accuracy": iso_acc,
                               "guard_rejected": reasons}
        if evaluate is not None:  # always: unlearning epochs are few and their CA / ASR path is the point
            rec.update(evaluate(model))
        history.append(rec)
        un["trajectory"].append({k: v for k, v in rec.items() if k not in ("stage", "lr")})
        if reasons:
            un["rejected_epochs"].append(e + 1)
        key = rank(iso_acc, g["estimated_accuracy"], e + 1)
        if not guard["enabled"] or (not reasons and key < best_key):
            best_sd, best_key = _sd(model), key
            un["selected_epoch"] = e + 1
        log.info("ABL unlearning epoch %d: isolated CE %.4f, held-out non-target acc %.4f, target rate %.4f, "
                 "isolated acc %.4f%s", e + 1, loss, g["nontarget_accuracy"], g["target_rate"], iso_acc,
                 f" -> rejected by the guard ({', '.join(reasons)})" if reasons else "")
        un["epochs_run"] = e + 1
        snapshot("unlearning", e + 1, opt, batches, {"best_model": best_sd, "best_key_json": json.dumps(best_key)})
    model.load_state_dict(best_sd)
    if un["selected_epoch"] != un["epochs_run"]:
        log.info("ABL: keeping unlearning epoch %d (the best that passed the guard)", un["selected_epoch"])
    un["isolated_accuracy_after"] = accuracy(model, iso_images, iso_labels, device)
    final = guard_metrics(model, hold_x, hold_y, target, device)
    un["guard"]["final"] = {**final, "estimated_accuracy": estimated_accuracy(final, guard["target_prior"])}


# ------------------------------------------------------------------------------------------------- reports


def isolation_report(losses: np.ndarray, isolated: np.ndarray, labels: np.ndarray, pool: np.ndarray,
                     poison_indices: np.ndarray | None, cfg: ABLConfig,
                     scores: np.ndarray | None = None, candidates: np.ndarray | None = None) -> dict[str, Any]:
    """Statistics of the isolation at ``T_te``; precision / recall / AUROC when the ground truth is known.

    ``scores``: the ranked scores of every example (NaN outside ``pool``); computed from ``losses`` when omitted.
    ``candidates``: the lowest-scoring fraction ``p`` when ``isolated`` keeps only part of it
    (``isolation_labels="target"``); the label statistics describe the candidates, precision / recall ``isolated``.
    """
    candidates = isolated if candidates is None else np.asarray(candidates, np.int64)
    pool_losses = losses[pool]
    if scores is None:
        scores = np.full(len(losses), np.nan)
        scores[pool] = isolation_scores(pool_losses, labels[pool], cfg.isolation_score, cfg.isolation_reference)
    scores = np.asarray(scores, np.float64)
    rest = np.setdiff1d(pool, isolated)
    counts = np.bincount(labels[candidates], minlength=int(labels.max()) + 1)
    iso_med = float(np.median(losses[isolated]))
    rest_med = float(np.median(losses[rest])) if len(rest) else float("nan")
    loss_gap = float(np.log10(max(rest_med, 1e-12)) - np.log10(max(iso_med, 1e-12)))
    rep: dict[str, Any] = {
        "n_pool": int(len(pool)), "n_isolated": int(len(isolated)), "ratio": cfg.isolation_ratio,
        "lga": cfg.lga, "gamma": cfg.gamma, "epoch": cfg.isolation_epochs, "score": cfg.isolation_score,
        "cutoff_loss": float(losses[isolated].max()),
        "isolated_loss_median": iso_med, "rest_loss_median": rest_med,
        # how far below the bulk the isolated losses sit (orders of magnitude); large = a clear low-loss cluster
        "loss_gap_log10": loss_gap,
        # the same for the ranked score (orders of magnitude below the typical loss of the example's own label)
        "score_gap_log10": float((np.median(scores[rest]) - np.median(scores[isolated])) / np.log(10)
                                 if cfg.isolation_score == "class-relative" and len(rest) else loss_gap),
        "pool_loss_quantiles": {str(q): float(np.quantile(pool_losses, q)) for q in (0.01, 0.05, 0.1, 0.25, 0.5)},
        "isolated_label_counts": {str(i): int(c) for i, c in enumerate(counts) if c},
        "isolated_majority_label": int(counts.argmax()),
        "isolated_majority_fraction": float(counts.max() / max(1, len(candidates))),
        # candidates of other labels returned to the clean set (isolation_labels="target")
        "n_candidates": int(len(candidates)), "n_returned": int(len(candidates) - len(isolated)),
        "labels": cfg.isolation_labels,
    }
    if poison_indices is not None:
        poison = np.intersect1d(np.asarray(poison_indices, np.int64), pool)
        is_poison = np.isin(pool, poison)
        hits = int(np.isin(isolated, poison).sum())
        rep.update({
            "n_poison_in_pool": int(len(poison)),
            "true_positives": hits,
            "precision": hits / max(1, len(isolated)),
            "candidate_precision": int(np.isin(candidates, poison).sum()) / max(1, len(candidates)),
            "recall": hits / len(poison) if len(poison) else float("nan"),
            # recall is capped by ratio * n_pool / n_poison: ABL isolates a fixed fraction, not every poison
            "max_recall": min(1.0, len(isolated) / len(poison)) if len(poison) else float("nan"),
            "auroc": rank_auroc(-scores[pool], is_poison),  # of the score used for the isolation
            "auroc_loss": rank_auroc(-pool_losses.astype(np.float64), is_poison),
            "poison_loss_median": float(np.median(losses[poison])) if len(poison) else float("nan"),
            "clean_loss_median": float(np.median(pool_losses[~is_poison])) if (~is_poison).any() else float("nan"),
        })
    return rep


def failure_warnings(report: dict[str, Any], cfg: ABLConfig) -> list[str]:
    """Evidence that ABL likely failed, from quantities available without ground truth.

    Thresholds come from the measurements in ``bench/results/abl.md`` (successful BadNets runs vs clean data).
    """
    out: list[str] = []
    iso = report.get("isolation", {})
    un = report.get("unlearning", {})
    gap = iso.get("score_gap_log10", iso.get("loss_gap_log10", float("inf")))
    if gap < 1.0:
        out.append(f"isolation loss gap is small ({gap:.2f} orders of magnitude between the isolated examples and "
                   f"the rest, {iso.get('score', 'loss')} score): "
                   "no clearly fast-learned cluster, so the isolated set may be mostly clean examples "
                   "(clean data, a slow-learned trigger, or a poisoning rate below the isolation ratio)")
    if iso and iso.get("isolated_majority_fraction", 1.0) < 0.5:
        out.append(f"the isolated examples spread over several labels (majority {iso['isolated_majority_fraction']:.0%}"
                   "): an all-to-one backdoor would concentrate them on its target class")
    after = un.get("isolated_accuracy_after")
    if after is not None and after > 0.2 and cfg.unlearning_epochs > 0:
        out.append(f"after unlearning the model still predicts the isolated examples' labels {after:.0%} of the time "
                   "(ASR probe on the isolated set): the backdoor link is probably not broken")
    if un.get("epochs_run") and un.get("guard", {}).get("enabled") and not un.get("selected_epoch"):
        out.append(f"no unlearning epoch passed the clean-accuracy guard (drop > {cfg.max_ca_drop:.3f} in all "
                   f"{un['epochs_run']}), so the model is the one before unlearning: unlearning the isolated set "
                   "costs clean accuracy here (the isolated set holds clean examples, the unlearning lr is too high, "
                   "or the model's backdoor and clean features are entangled); the backdoor is probably still in "
                   "place")
    if "precision" in iso and iso["precision"] < 0.5:
        out.append(f"isolation precision is {iso['precision']:.0%} against the known poison indices")
    return out


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A short human summary of an ABL report (for the CLI)."""
    lines = []
    for name in ("isolation", "clean", "unlearning"):
        s = report.get("stages", {}).get(name)
        if s is None:
            continue
        parts = [f"{name:>10}:"]
        if "clean_accuracy" in s:
            parts.append(f"CA {100 * s['clean_accuracy']:.2f}%")
        if "attack_success_rate" in s:
            parts.append(f"ASR {100 * s['attack_success_rate']:.2f}%")
        parts.append(f"({s.get('seconds', 0.0):.0f}s)")
        lines.append(" ".join(parts))
    iso = report.get("isolation", {})
    if iso:
        msg = (f"isolated {iso['n_isolated']} of {iso['n_pool']} (majority label {iso['isolated_majority_label']}, "
               f"{iso['isolated_majority_fraction']:.0%}; loss gap {iso['loss_gap_log10']:.1f} decades)")
        if iso.get("n_returned"):
            msg += (f"; {iso['n_returned']} of the {iso['n_candidates']} lowest-scoring examples had another label "
                    "and went back to the clean set")
        if "precision" in iso:
            msg += f"; precision {100 * iso['precision']:.1f}%, recall {100 * iso['recall']:.1f}%"
        lines.append(msg)
    un = report.get("unlearning", {})
    if un:
        rejected = un.get("rejected_epochs", [])
        lines.append(f"unlearning: {un.get('epochs_run', 0)} epoch(s), kept epoch {un.get('selected_epoch', 0)}"
                     + (f" (epochs {rejected} rejected by the CA guard)" if rejected else "")
                     + f"; isolated-set accuracy {100 * un.get('isolated_accuracy_before', float('nan')):.1f}% -> "
                       f"{100 * un.get('isolated_accuracy_after', float('nan')):.1f}%")
    lines += [f"WARNING: {w}" for w in report.get("warnings", [])]
    return lines


def _write_isolation_artifacts(out: Path | None, images: np.ndarray, labels: np.ndarray, losses: np.ndarray,
                               scores: np.ndarray, isolated: np.ndarray, pool: np.ndarray,
                               poison_indices: np.ndarray | None,
                               report: dict[str, Any]) -> None:
    if out is None:
        return
    files = report["files"]
    np.save(out / "isolated_indices.npy", isolated.astype(np.int64))
    np.save(out / "isolation_losses.npy", losses.astype(np.float32))
    np.save(out / "isolation_scores.npy", scores.astype(np.float32))
    with open(out / "isolated.csv", "w") as f:
        f.write("rank,index,label,loss,score\n")
        for r, i in enumerate(isolated):
            f.write(f"{r},{int(i)},{int(labels[i])},{float(losses[i]):.6g},{float(scores[i]):.6g}\n")
    files.update({"isolated_indices": "isolated_indices.npy", "isolated_csv": "isolated.csv",
                  "isolation_losses": "isolation_losses.npy", "isolation_scores": "isolation_scores.npy"})
    try:
        from .abl_plots import isolated_grid_png, loss_histogram_png

        relative = report.get("isolation", {}).get("score") == "class-relative"
        loss_histogram_png(out / "isolation_hist.png", losses, pool, isolated, poison_indices,
                           scores=scores if relative else None)
        isolated_grid_png(out / "isolated_grid.png", images[isolated], labels[isolated])
        files.update({"loss_histogram": "isolation_hist.png", "isolated_grid": "isolated_grid.png"})
    except ImportError as e:  # matplotlib is a declared dependency; keep training if a minimal install lacks it
        log.warning("ABL: could not write the isolation plots (%s)", e)


__all__ = ["ABLConfig", "ABLResult", "LGA_FORMS", "failure_warnings", "isolate_lowest", "isolation_report",
           "keep_target_label",
           "lga_loss", "rank_auroc", "run_abl", "summary_lines", "ascent_term"]
