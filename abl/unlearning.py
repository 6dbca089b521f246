"""ABL's unlearning stage (Li et al., NeurIPS 2021), behind a clean-accuracy guard that is not in the paper.

Gradient ascent on the isolated set ``D_b`` with its own (possibly poisoned) labels at a small learning rate breaks
the link between the trigger and the target class. Deviations, each with a switch back: by default every step also
descends on a batch of the presumed-clean set, the paper's ``L_GGA = E_Dc[l] - E_Db[l]``
(``docs/abl.md#unlearning-objective``); the ascent on an example stops once its cross-entropy exceeds a bound
(``docs/abl.md#bounded-ascent``); every epoch is checked by a clean-accuracy guard on a held-out split of the training
data, which keeps the best passing epoch (``docs/abl.md#clean-accuracy-guard``); the official loop's unevaluated
first epoch is a real one (``docs/abl.md#unlearning-epochs``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .config import BN_MODES, ABLConfig
from .losses import ascent_term
from .report import held_out_counts, held_out_probe
from .state import ABLRun, model_state
from .train import ArrayBatches, accuracy, make_optimizer, predict_logits

log = logging.getLogger(__name__)

Batches = Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def cycle_batches(batches: ArrayBatches) -> Batches:
    """Endless mini-batches: one reshuffled pass of ``batches`` after another."""
    if len(batches) == 0:
        raise ValueError("cannot cycle over an empty set of batches")
    while True:
        yield from batches


def unlearning_epoch(model: nn.Module, batches: ArrayBatches, optimizer: torch.optim.Optimizer,
                     bn: str = "train", autocast_dtype: torch.dtype | None = None,
                     channels_last: bool = False,
                     clean: Batches | None = None,
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
    if bn not in BN_MODES:
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


def held_out_firing(guard: dict[str, Any], metrics: dict[str, float]) -> float:
    """:func:`report.held_out_probe` of a model whose held-out metrics are ``metrics``, clipped to [0, 1] (1 when the
    split's excess of the label is too small to read: nothing to rank by)."""
    v = held_out_probe({**guard, "final": metrics})
    return 1.0 if v is None else float(min(1.0, max(0.0, v)))


def _rank(iso_acc: float, est_acc: float, epoch: int) -> tuple[float, int]:
    """Selection key, smaller is better: higher estimated accuracy minus the ASR probe, then the later epoch."""
    return (-round(est_acc - iso_acc, 4), -epoch)


def unlearning_report(run: ABLRun, images: np.ndarray, labels: np.ndarray, isolated: np.ndarray,
                      holdout: np.ndarray) -> dict[str, Any]:
    """``run.report["unlearning"]``, with the guard's record (:func:`_guard_record`) filled in on first use."""
    un = run.report.setdefault("unlearning", {})
    if "guard" not in un:
        un.update(_guard_record(run, images[isolated], labels[isolated], images[holdout], labels[holdout]))
    return un


def _guard_record(run: ABLRun, iso_images: np.ndarray, iso_labels: np.ndarray, hold_x: np.ndarray,
                  hold_y: np.ndarray) -> dict[str, Any]:
    """The unlearning report before the first epoch: the guard's suspected target, prior and baseline."""
    target = int(np.bincount(iso_labels).argmax()) if len(iso_labels) else -1
    counts = held_out_counts(hold_y, target)
    prior = counts["target_prior"]
    base = guard_metrics(run.model, hold_x, hold_y, target, run.device)
    enabled = bool(len(hold_y)) and not np.isnan(base["nontarget_accuracy"])
    if not enabled:
        log.warning("ABL: no held-out split, unlearning runs without the clean-accuracy guard")
    elif len(hold_y) < 200:
        log.warning("ABL: the clean-accuracy guard has only %d held-out examples", len(hold_y))
    return {
        "guard": {"n_holdout": counts["n_holdout"], "n_nontarget": counts["n_nontarget"],
                  "suspected_target": target, "enabled": enabled,
                  "baseline": {**base, "estimated_accuracy": estimated_accuracy(base, prior)},
                  "target_prior": prior},
        "epochs_run": 0, "trajectory": [], "rejected_epochs": [], "selected_epoch": 0,
        "isolated_accuracy_before": accuracy(run.model, iso_images, iso_labels, run.device),
    }


def _guard_reasons(guard: dict[str, Any], metrics: dict[str, float], max_drop: float) -> list[str]:
    """Why the guard rejects an epoch with these held-out ``metrics`` (empty: it passes)."""
    reasons = []
    if guard["enabled"]:
        if guard["baseline"]["nontarget_accuracy"] - metrics["nontarget_accuracy"] > max_drop:
            reasons.append("non-target accuracy drop")
        if guard["baseline"]["estimated_accuracy"] - metrics["estimated_accuracy"] > max_drop:
            reasons.append("estimated accuracy drop (target class)")
    return reasons


@dataclass
class _Unlearner:
    """The unlearning loop's state: data, optimiser, batches and the best passing epoch so far."""

    run: ABLRun
    cfg: ABLConfig
    iso_images: np.ndarray
    iso_labels: np.ndarray
    hold_x: np.ndarray
    hold_y: np.ndarray
    opt: torch.optim.Optimizer
    batches: ArrayBatches
    clean_batches: ArrayBatches | None
    best_model: dict[str, torch.Tensor]
    best_key: tuple[float, int]
    #: rank epochs by the held-out probe instead of the isolated set (residual unlearning: the ascent set *is* the
    #: probed population, so only held-out copies of the poison say whether the backdoor still generalises)
    held_out: bool = False

    def probe(self, g: dict[str, float], iso_acc: float) -> float:
        """The selection's ASR probe for an epoch whose held-out metrics are ``g``."""
        if not self.held_out:
            return iso_acc
        return held_out_firing(self.un["guard"], g)

    @property
    def un(self) -> dict[str, Any]:
        return self.run.report["unlearning"]

    def resume(self, saved: dict[str, Any] | None) -> int:
        """Restore optimiser and best epoch from a state saved inside the stage; returns the first epoch to run."""
        if saved is None:
            return 0
        if "optimizer" in saved:
            self.opt.load_state_dict(saved["optimizer"])
        if "best_model" in saved:
            self.best_model = saved["best_model"]
            self.best_key = tuple(json.loads(saved["best_key_json"]))
        return int(saved["epoch"])

    def epoch(self, e: int) -> None:
        """Unlearning epoch ``e`` (0-based): train, check the guard, record, keep it if it is the best so far."""
        run, cfg, un = self.run, self.cfg, self.un
        guard = un["guard"]
        t0 = time.perf_counter()
        clean = None
        if self.clean_batches is not None:  # reseeded per epoch, so a resumed run draws the same clean batches
            self.clean_batches.generator.manual_seed(cfg.seed + 3 + 1009 * e)
            clean = cycle_batches(self.clean_batches)
        loss = unlearning_epoch(run.train_model, self.batches, self.opt, cfg.unlearning_bn, run.autocast_dtype,
                                run.channels_last, clean=clean, bound=cfg.unlearning_bound,
                                ascent=cfg.unlearning_ascent)
        loss = distributed.mean_over_ranks(loss)
        distributed.sync_buffers(run.model)  # the guard below sees the same model on every rank
        g = guard_metrics(run.model, self.hold_x, self.hold_y, guard["suspected_target"], run.device)
        iso_acc = accuracy(run.model, self.iso_images, self.iso_labels, run.device)
        secs = time.perf_counter() - t0
        run.add_time("unlearning", secs)
        g["estimated_accuracy"] = estimated_accuracy(g, guard["target_prior"])
        reasons = _guard_reasons(guard, g, cfg.max_ca_drop)
        rec: dict[str, Any] = {"stage": "unlearning", "epoch": cfg.total_epochs + e + 1, "loss": loss,
                               "lr": cfg.unlearning_lr, "seconds": secs, "guard_nontarget_accuracy":
                               g["nontarget_accuracy"], "guard_target_rate": g["target_rate"],
                               "guard_estimated_accuracy": g["estimated_accuracy"], "isolated_accuracy": iso_acc,
                               "guard_rejected": reasons}
        probe = self.probe(g, iso_acc)
        if self.held_out:
            rec["held_out_probe"] = probe
        if run.evaluate is not None:  # always: unlearning epochs are few and their CA / ASR path is the point
            rec.update(run.evaluate(run.model))
        run.history.append(rec)
        un["trajectory"].append({k: v for k, v in rec.items() if k not in ("stage", "lr")})
        if reasons:
            un["rejected_epochs"].append(e + 1)
        key = _rank(probe, g["estimated_accuracy"], e + 1)
        keep = not guard["enabled"] or (not reasons and key < self.best_key)
        if distributed.broadcast_scalar(float(keep)):  # rank 0's decision, so every rank keeps the same epoch
            self.best_model, self.best_key = model_state(run.model), key
            un["selected_epoch"] = e + 1
        log.info("ABL unlearning epoch %d: isolated CE %.4f, held-out non-target acc %.4f, target rate %.4f, "
                 "isolated acc %.4f%s", e + 1, loss, g["nontarget_accuracy"], g["target_rate"], iso_acc,
                 f" -> rejected by the guard ({', '.join(reasons)})" if reasons else "")
        un["epochs_run"] = e + 1
        run.snapshot("unlearning", e + 1, self.opt, self.batches,
                     {"best_model": self.best_model, "best_key_json": json.dumps(self.best_key)})


def unlearn(run: ABLRun, images: np.ndarray, labels: np.ndarray, isolated: np.ndarray, holdout: np.ndarray,
            cfg: ABLConfig | None = None, ascend: np.ndarray | None = None) -> None:
    """Unlearning epochs on the isolated set; the guard then keeps the best epoch that passed it.

    An epoch *passes* the guard unless (a) accuracy on held-out non-target examples is more than ``max_ca_drop`` below
    its value before unlearning, or (b) the clean accuracy estimated without trusting target labels
    (:func:`estimated_accuracy`, with ``prior`` the median share of the other labels among held-out examples) is more
    than ``max_ca_drop`` below its value before unlearning. (b) charges the target class: after a successful
    unlearning only clean target images should still be predicted as the target, and a model that stops predicting
    the target class (the classic unlearning failure) loses up to ``prior`` of estimated accuracy.

    Every epoch runs (joint unlearning often dips in its first epoch and recovers as the clean term repairs the
    model); at the end the model is set to the passing epoch — the state before unlearning counts as epoch 0 — with the
    highest estimated accuracy minus the fraction of isolated examples still predicted as their own labels (the ASR
    probe; ties: the later epoch). Without a held-out split the last epoch is kept. Results go to
    ``run.report["unlearning"]``; a run resumed inside this stage continues from its saved epoch.

    ``cfg`` overrides the run's unlearning settings (retrain mode's residual unlearning); ``ascend``, when given, is
    the set the ascent runs on (the removed set): ``isolated`` is then only probed (the verdict's seed probe), and
    the selection reads the held-out probe instead (:func:`held_out_firing`: the held-out copies of the poison were
    never trained on, so they say whether the backdoor still generalises).
    """
    cfg, model, device = cfg or run.cfg, run.model, run.device
    iso_images, iso_labels = images[isolated], labels[isolated]
    hold_x, hold_y = images[holdout], labels[holdout]
    ascent_set = isolated if ascend is None else ascend
    un = unlearning_report(run, images, labels, isolated, holdout)
    guard = un["guard"]
    guard["max_ca_drop"] = cfg.max_ca_drop  # the drop this stage allows (the residual unlearning: its own)
    batches = ArrayBatches(images[ascent_set], labels[ascent_set], device, cfg.batch_size, augment="none",
                           seed=cfg.seed + 2)
    clean_batches = None
    if cfg.unlearning == "joint":
        rest = np.setdiff1d(np.setdiff1d(np.arange(len(labels)), holdout), ascent_set)
        clean_batches = ArrayBatches(images, labels, device, cfg.batch_size, augment=cfg.augment, seed=cfg.seed + 3,
                                     indices=rest)
    before = (held_out_firing(guard, guard["baseline"]) if ascend is not None else un["isolated_accuracy_before"])
    loop = _Unlearner(run, cfg, iso_images, iso_labels, hold_x, hold_y,
                      make_optimizer(model, cfg.unlearning_lr, cfg.momentum, cfg.weight_decay), batches, clean_batches,
                      model_state(model), _rank(before, guard["baseline"]["estimated_accuracy"], 0),
                      held_out=ascend is not None)
    start = loop.resume(run.saved_for("unlearning"))
    run.restore_rng(batches)
    for e in range(start, cfg.unlearning_epochs):
        loop.epoch(e)
    model.load_state_dict(loop.best_model)
    if un["selected_epoch"] != un["epochs_run"]:
        log.info("ABL: keeping unlearning epoch %d (the best that passed the guard)", un["selected_epoch"])
    un["isolated_accuracy_after"] = accuracy(model, iso_images, iso_labels, device)
    final = guard_metrics(model, hold_x, hold_y, guard["suspected_target"], device)
    un["guard"]["final"] = {**final, "estimated_accuracy": estimated_accuracy(final, guard["target_prior"])}
