"""ABL's isolation at ``T_te`` (Li et al., NeurIPS 2021): rank every training example, isolate the lowest fraction.

After the LGA epochs, the per-example loss of the pool is computed in eval mode without augmentation and ranked;
the lowest fraction ``p`` is the isolated set ``D_b``. Deviations, each a switch: the default score is
class-relative rather than the raw loss (``docs/abl.md#isolation-score``), ``isolation_labels="target"`` keeps only
the majority label (``docs/abl.md#measured-options``), and the ranking is batched in float64
(``docs/abl.md#isolated-loss-ranking``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import distributed
from .config import ISOLATION_SCORES, ABLConfig
from .train import per_example_loss


@dataclass
class Isolation:
    """The outcome of the isolation: every array is indexed by dataset position (NaN outside the pool)."""

    losses: np.ndarray  # per-example loss at T_te (float32)
    scores: np.ndarray  # the ranked score (float32)
    candidates: np.ndarray  # the lowest-scoring fraction ``p``, lowest first
    isolated: np.ndarray  # the candidates that will be unlearned (all of them unless isolation_labels="target")


def isolate(model: nn.Module, images: np.ndarray, labels: np.ndarray, pool: np.ndarray, cfg: ABLConfig,
            device: torch.device, pool_losses: np.ndarray | None = None) -> Isolation:
    """Score the ``pool`` (dataset indices) with ``model`` and isolate its lowest-scoring fraction per ``cfg``
    (``pool_losses``: the pool's per-example losses, when a pass that also took features computed them)."""
    n = len(labels)
    if pool_losses is None:
        # under torchrun each rank scores its shard of the pool and the ranking sees all of them (gathered)
        pos = distributed.shard(len(pool), 0, cfg.seed, shuffle=False)
        pool_losses = distributed.gather_per_example(
            per_example_loss(model, images[pool[pos]], labels[pool[pos]], device,
                             batch_size=max(512, cfg.batch_size)), pos, len(pool))
    losses = np.full(n, np.nan, np.float32)
    losses[pool] = pool_losses
    pool_scores = isolation_scores(pool_losses, labels[pool], cfg.isolation_score, cfg.isolation_reference)
    candidates = pool[isolate_lowest(pool_scores, cfg.isolation_ratio)]
    isolated = keep_target_label(candidates, labels)[0] if cfg.isolation_labels == "target" else candidates
    candidates, isolated = distributed.broadcast_array(candidates), distributed.broadcast_array(isolated)  # rank 0's
    scores = np.full(n, np.nan, np.float32)
    scores[pool] = pool_scores
    return Isolation(losses, scores, candidates, isolated)


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
