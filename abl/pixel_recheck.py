"""Retrain mode's pixel-space recheck (``--abl-expansion-recheck-method pixel``): a small binary CNN trained on raw
pixels to tell the removed examples from other labels' examples, which flags the removed label's remaining examples
that look like the removal — the poison it missed (``docs/abl.md#pixel-space-recheck``).

A warping trigger (WaNet) is one fixed field, learnable from the removal itself: on three WaNet 10% runs whose
removal missed 211-2,309 copies, the classifier trained on the removal's poison flagged 97-100% of them at 9-33 clean
images (``bench/results/abl_input_recheck_wanet_r10_amd.md``). The positives are chosen from the removal by the
fresh clean-stage model, which has not trained on them: poison made from other classes looks like those classes to
it (probability of the target under :data:`POSITIVE_MAX`), while the clean target-label examples the removal took
look like the label and would teach the classifier the label instead of the trigger. When the fresh model calls less
than :data:`FRESH_SHARE` of the removal another class it has already relearned the trigger from what was missed, and
every removed example is a positive (the rule was read off those three runs, then tested on WaNet 5% and 1%). The
classifier must recall the tenth of the positives it did not train on: a removal that is mostly clean (WaNet 1%'s
off-label scan) is no one pattern, and then nothing is flagged."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .expansion import label_excess
from .train import predict_logits, to_float

log = logging.getLogger(__name__)

#: a removed example is a positive when the fresh model gives its label's class less than this probability
POSITIVE_MAX = 0.05
#: ... provided at least this share of the removal is below it; otherwise every removed example is a positive
FRESH_SHARE = 0.5
#: flag above this quantile of held-out other-label examples' scores (an expected 0.5% of clean examples) when the
#: positives are the whole removal (clean examples among them teach the classifier some of the label itself)
QUANTILE = 0.995
#: ... and above this one when the fresh model filtered them (purer positives: a looser threshold catches the copies
#: that look least like the removal; WaNet 5% seed 1 on the AMD EPYC: 342 of 843 flagged at 0.995, 605 at 0.98)
QUANTILE_FILTERED = 0.98
#: at most this many other-label examples are held out for the threshold (at most half of them)
HELD_OUT = 10000
#: nothing is flagged when the classifier recalls less than this of the positives held out from its training
MIN_POSITIVE_RECALL = 0.5
#: at least this many positives are held out for that recall (a tenth when more), and trained on
MIN_VALIDATION = 10
EPOCHS = 8
BATCH = 128


def pixel_net(channels: int) -> nn.Module:
    """The binary classifier: three 3x3 convolutions (32, 32, 64) with two 2x2 max-pools, a 128-unit hidden layer."""
    return nn.Sequential(nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.LazyLinear(128), nn.ReLU(), nn.Linear(128, 2))


def fit_pixel(images: np.ndarray, pos: np.ndarray, neg: np.ndarray, seed: int, device: torch.device | str = "cpu",
              epochs: int = EPOCHS) -> nn.Module:
    """``pixel_net`` trained on ``images[pos]`` (class 1) against ``images[neg]`` (class 0): Adam 1e-3, batch 128,
    ``epochs`` epochs, on raw [0, 1] pixels. Seeded by ``seed`` without touching the global RNG streams (the ABL run's
    own batches continue as they would have)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = pixel_net(images.shape[-1]).to(device)
        idx = np.r_[pos, neg].astype(np.int64)
        y = np.r_[np.ones(len(pos)), np.zeros(len(neg))].astype(np.int64)
        net(to_float(images[idx[:2]], device))  # materialise the lazy layer before the optimiser sees it
        opt = torch.optim.Adam(net.parameters(), 1e-3)
        net.train()
        for _ in range(epochs):
            perm = torch.randperm(len(idx)).numpy()
            for i in range(0, len(perm), BATCH):  # uint8 until the batch: memory is one batch of floats
                b = perm[i:i + BATCH]
                loss = F.cross_entropy(net(to_float(images[idx[b]], device)),
                                       torch.as_tensor(y[b], device=device))
                opt.zero_grad()
                loss.backward()
                opt.step()
    return net.eval()


def margin(net: nn.Module, images: np.ndarray, idx: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """The classifier's positive-minus-negative logit for ``images[idx]``."""
    if not len(idx):
        return np.zeros(0, np.float32)
    lo = predict_logits(net, images[idx], torch.device(device))
    return lo[:, 1] - lo[:, 0]


def choose_positives(removed: np.ndarray, p_target: np.ndarray) -> tuple[np.ndarray, str, float]:
    """The removal's examples to train on, the rule that chose them (``fresh``/``removed``) and the share of the
    removal the fresh model calls another class (``p_target``: its probability of the label, one per removed index)."""
    other = np.asarray(p_target) < POSITIVE_MAX
    share = float(other.mean()) if len(other) else 0.0
    if share >= FRESH_SHARE:
        return np.asarray(removed)[other], "fresh", share
    return np.asarray(removed), "removed", share


def pixel_recheck(images: np.ndarray, labels: np.ndarray, removed: np.ndarray, rest: np.ndarray, target: int,
                  p_target: np.ndarray, seed: int, device: torch.device | str = "cpu",
                  epochs: int = EPOCHS) -> tuple[np.ndarray, dict[str, Any]]:
    """The pixel-space recheck: returns ``(flagged dataset indices, report)``. ``removed`` is the removal,
    ``p_target`` the fresh model's probability of ``target`` for each of them, and ``rest`` what the model trains
    on. The classifier is trained on the positives (:func:`choose_positives`) but a validation tenth (at least
    :data:`MIN_VALIDATION`), against as many other-label examples of ``rest``; ``target``'s examples in ``rest`` are
    flagged above the :data:`QUANTILE` of held-out other-label examples (:data:`QUANTILE_FILTERED` when the fresh model
    filtered the positives). Its recall of the validation positives at
    that threshold is their consistency: under :data:`MIN_POSITIVE_RECALL` the positives are no one pattern (WaNet
    1%: the off-label scan's removal is 70% clean) and nothing is flagged."""
    t0 = time.perf_counter()
    labels = np.asarray(labels)
    rest = np.asarray(rest, np.int64)
    in_t = rest[labels[rest] == target]
    pos, rule, share = choose_positives(removed, p_target)
    others = rest[labels[rest] != target]
    rng = np.random.default_rng(seed)
    others = others[rng.permutation(len(others))]
    n_held = min(HELD_OUT, len(others) // 2)
    n_val = max(MIN_VALIDATION, len(pos) // 10)
    order = rng.permutation(len(pos))
    val, train = pos[order[:n_val]], pos[order[n_val:]]
    held, neg = others[:n_held], others[n_held:n_held + len(train)]
    rep: dict[str, Any] = {"method": "pixel", "target": int(target), "n_target_label": int(len(in_t)),
                           "positives": int(len(pos)), "positive_rule": rule, "fresh_other_share": share,
                           "validation": int(len(val)), "negatives": int(len(neg)), "held_out": int(n_held)}
    if len(train) < MIN_VALIDATION or len(neg) < MIN_VALIDATION or n_held < 100 or not len(in_t):
        rep.update(n_removed=0, skipped=True, seconds=time.perf_counter() - t0)
        return np.zeros(0, np.int64), rep
    net = fit_pixel(images, np.sort(train), neg, seed, device, epochs)
    s_held, s_t = margin(net, images, held, device), margin(net, images, in_t, device)
    quantile = QUANTILE_FILTERED if rule == "fresh" else QUANTILE
    thr = float(np.quantile(s_held, quantile))
    recall = float(np.mean(margin(net, images, val, device) > thr))
    consistent = recall >= MIN_POSITIVE_RECALL
    flagged = np.sort(in_t[s_t > thr]) if consistent else np.zeros(0, np.int64)
    rep.update(threshold=thr, quantile=quantile, positive_recall=recall, n_above=int((s_t > thr).sum()),
               n_removed=int(len(flagged)), seconds=time.perf_counter() - t0,
               **({} if consistent else {"inconsistent": True}))
    log.info("ABL pixel recheck: %d positives (%s rule, %.0f%% of the removal called another class), validation "
             "recall %.2f; %d of label %d's %d remaining examples above the held-out %.1f%% quantile%s", len(pos),
             rule, 100 * share, recall, int((s_t > thr).sum()), target, len(in_t), 100 * quantile,
             "" if consistent else f" — none removed: the positives are no one pattern (under {MIN_POSITIVE_RECALL})")
    return flagged, rep


def count_top_up(labels: np.ndarray, rest: np.ndarray, target: int, in_target: np.ndarray, p_target: np.ndarray,
                 min_sd: float) -> tuple[np.ndarray, dict[str, Any]]:
    """The recheck's count top-up: returns ``(dataset indices, report)``. After the removal and the classifier's
    flags, ``target`` may still hold more of ``rest`` than the median label — all-to-one poison adds its copies to
    one label, and a removal that took one part of them leaves the rest (WaNet 3% seed 1 on the AMD EPYC: 833
    removed, 981 copies left, 1,104 more examples than the median label). When that excess is at least ``min_sd`` sd
    (Poisson: the square root of the median count) and the other labels are balanced (both read by
    :func:`~abl_guard.abl.expansion.label_excess`), the
    ``excess`` examples of ``in_target`` (the label's examples in ``rest``) whose fresh-model probability of the label
    ``p_target`` is lowest are returned: poison made from other classes that the model has not learned yet looks like
    those classes. Clean examples removed with the poison pull the count down, so a removal that took too much never
    fires it; the rule assumes roughly balanced classes."""
    labels = np.asarray(labels)
    in_target = np.asarray(in_target, np.int64)
    counts = np.bincount(labels[np.asarray(rest, np.int64)], minlength=int(target) + 1)
    rep: dict[str, Any] = {"min_sd": float(min_sd), "n_removed": 0}
    sizes = {int(y): int(counts[y]) for y in np.flatnonzero(counts)}  # the labels present
    read = label_excess(sizes, int(target)) if min_sd > 0 and int(target) in sizes else None
    if read is None:
        return np.zeros(0, np.int64), rep
    excess, sd, balanced = read
    rep.update(excess=excess, sd=sd, balanced=bool(balanced))
    if not (balanced and excess >= min_sd * sd and len(in_target)):
        return np.zeros(0, np.int64), rep
    k = int(min(len(in_target), round(excess)))
    take = np.sort(in_target[np.argsort(np.asarray(p_target), kind="stable")[:k]])
    rep["n_removed"] = int(len(take))
    log.info("ABL recheck count top-up: label %d still holds %.0f more examples than the median label (%.1f sd); "
             "its %d examples the fresh model places least surely in it are removed too", target, excess,
             excess / sd, len(take))
    return take, rep


__all__ = ["EPOCHS", "FRESH_SHARE", "HELD_OUT", "MIN_POSITIVE_RECALL", "MIN_VALIDATION", "POSITIVE_MAX", "QUANTILE",
           "QUANTILE_FILTERED", "choose_positives", "count_top_up", "fit_pixel", "margin", "pixel_net", "pixel_recheck"]
