"""Anti-Backdoor Learning (Li, Lyu, Koren, Lyu, Li, Ma — NeurIPS 2021, arXiv 2110.11571): the driver.

Training on poisoned data is treated as a clean task and a backdoor task learned together; backdoor examples are
learned much faster, so :func:`run_abl` runs three stages on one model:

1. **Isolation** (epochs ``0 .. T_te``): local gradient ascent (:func:`~abl_guard.abl.losses.lga_loss`) keeps the
   loss near ``gamma``; the lowest-scoring fraction ``p`` of the training set is isolated as ``D_b``
   (:mod:`abl_guard.abl.isolation`).
2. **Clean stage** (epochs ``T_te .. T``): ordinary cross-entropy training on ``D_c = D \\ D_b``.
3. **Unlearning**: gradient ascent on ``D_b`` at a small learning rate, behind a clean-accuracy guard
   (:mod:`abl_guard.abl.unlearning`).

``mode="paper"`` keeps every default the paper's (``gamma = 0.5``, ``p = 1%``, ``T_te = 20`` of ``T = 100``) and
the official code's (unlearning lr 5e-4 for 5 epochs, batch 128, SGD with Nesterov momentum 0.9).
The default ``mode="retrain"`` replaces stages 2 and 3, because unlearning a converged model cost 6–17 CA points and
kept the backdoor (``docs/abl.md#retrain-mode``): the isolation ends once its isolated set is concentrated in one
label, that high-precision seed is expanded to the rest of the poison in its label
(:mod:`abl_guard.abl.expansion`), and a freshly initialised model is trained for the full schedule on what remains;
the report's ``verdict`` says, with its evidence, whether the backdoor is gone. ``mode="unlearn"`` is the first
release's default. Other deviations, each in one sentence with its measurements in ``docs/abl.md``:

* the isolation and clean stages share one optimiser and one lr schedule over the global epoch count, so ``--epochs``
  is the same ``T`` with and without ABL (``docs/abl.md#one-schedule``);
* the isolation score is class-relative by default, the LGA form the official code's flooding, the unlearning
  objective the paper's joint ``L_GGA`` with a bounded ascent (``docs/abl.md#deviations``);
* a held-out split of the training data guards the unlearning stage (``docs/abl.md#clean-accuracy-guard``);
* a run directory keeps stage checkpoints, the isolated set and a resume state (:mod:`abl_guard.abl.state`).

This module keeps every public name of the room importable from ``abl_guard.abl.abl`` as before the split.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .config import (
    ASCENT_FORMS,
    BN_MODES,
    ISOLATION_LABELS,
    ISOLATION_SCORES,
    LGA_FORMS,
    UNLEARNING_MODES,
    ABLConfig,
)
from .expansion import (
    Expansion,
    below_own_threshold,
    expand_seed,
    expansion_features,
    logits_and_pooled_features,
    pooled_features,
    recheck_totals,
    scan_inputs,
    scan_labels,
    scan_off_label,
    target_examples,
)
from .isolation import Isolation, isolate, isolate_lowest, isolation_scores, keep_target_label
from .losses import ascent_term, lga_loss
from .pixel_recheck import count_top_up, pixel_recheck
from .report import (
    HELD_OUT_FIRING,
    expansion_report,
    failure_warnings,
    found_by_input_scan,
    found_by_scan,
    held_out_counts,
    held_out_excess,
    held_out_shortfall,
    isolation_report,
    rank_auroc,
    summary_lines,
    verdict,
    write_isolation_artifacts,
)
from .state import STAGES, STATE_FILE, STATE_FORMAT, ABLRun, Evaluate, ResumeFile, SaveStage, fingerprint
from .train import (
    ArrayBatches,
    LossFn,
    loss_from_logits,
    make_optimizer,
    predict_logits,
    resolve_autocast,
    resolve_channels_last,
    select_device,
    softmax_rows,
    train_one_epoch,
)
from .unlearning import (
    cycle_batches,
    estimated_accuracy,
    guard_metrics,
    unlearn,
    unlearning_epoch,
    unlearning_report,
)

log = logging.getLogger(__name__)


@dataclass
class ABLResult:
    """What :func:`run_abl` returns; ``report`` is JSON-able and goes into the run record under ``abl``."""

    history: list[dict[str, Any]]
    report: dict[str, Any]
    isolated: np.ndarray  # dataset indices, lowest loss first
    removed: np.ndarray  # what the clean stage did not train on (retrain mode: the seed and its expansion; sorted)
    holdout: np.ndarray  # dataset indices never trained on
    losses: np.ndarray  # per-example loss at T_te, NaN for held-out examples

    @property
    def dropped(self) -> np.ndarray:
        """Dataset indices the final model's clean stage did not train on: the removed (or unlearned) examples and
        the held-out ones, which no stage screened (sorted)."""
        return np.union1d(self.removed, self.holdout)


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
    run = _start(model, images, labels, cfg, out, evaluate, quiet)
    holdout = _holdout_split(len(labels), cfg)
    pool = np.setdiff1d(np.arange(len(labels)), holdout)
    run.report["holdout"] = {"n": int(len(holdout)), "fraction": cfg.holdout}
    opt = make_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay)
    saved = run.resume_file.load() if resume else None
    if resume and saved is None:
        log.warning("--resume: no ABL state in %s, starting from scratch", out)
    if saved is not None:
        run.resume_from(saved, opt)
    # under torchrun every rank runs every stage on its shard; rank 0 alone writes artifacts and checkpoints
    stages = _Stages(run, images, labels, out if distributed.is_main() else None, save_stage)
    if run.stage == "isolation":
        stages.isolation(pool, opt, poison_indices)
    if run.stage == "clean":
        stages.clean(pool, opt, poison_indices)
    if run.stage == "unlearning":
        stages.unlearning(holdout)
    elif run.stage == "done":
        log.info("ABL state in %s is complete; nothing to resume", out)
    if run.channels_last:
        model.to(memory_format=torch.contiguous_format)
    return ABLResult(run.history, run.report, run.isolated, run.removed if cfg.retrain else run.isolated, holdout,
                     run.losses)


def _start(model: nn.Module, images: np.ndarray, labels: np.ndarray, cfg: ABLConfig, out: Path | None,
           evaluate: Evaluate | None, quiet: bool) -> ABLRun:
    """Put ``model`` on the configured device and open a fresh run state."""
    device = select_device(cfg.device)
    channels_last = resolve_channels_last(cfg.memory_format, device)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    report: dict[str, Any] = {"config": cfg.to_json(), "stages": {}, "seconds": {}, "warnings": [], "files": {}}
    return ABLRun(model, cfg, device, ResumeFile(out), json.dumps(cfg.to_json(), sort_keys=True),
                  fingerprint(images, labels), len(labels), evaluate, quiet or not distributed.is_main(),
                  resolve_autocast(cfg.precision, device), channels_last, report=report,
                  net=distributed.wrap_model(model, device) if distributed.current() else None)


def _holdout_split(n: int, cfg: ABLConfig) -> np.ndarray:
    """The held-out split (never trained on) for the clean-accuracy guard of the unlearning stage."""
    n_hold = int(round(cfg.holdout * n))
    rng = np.random.default_rng(cfg.seed + 7919)
    return np.sort(rng.choice(n, n_hold, replace=False)) if n_hold else np.zeros(0, np.int64)


def _separate(exp: Expansion | None) -> bool:
    """Whether an outcome found a separate population: an uncapped seed expansion, or the label scan's."""
    if exp is None:
        return True
    return bool(exp.report.get("expanded")) and not (exp.report.get("capped") and not len(exp.core))


def reinitialise(model: nn.Module, seed: int) -> None:
    """Retrain mode: draw fresh weights for every layer (and reset BatchNorm statistics), deterministically from
    ``seed`` so that every torchrun rank, and a resumed run, starts the clean stage from the same model."""
    state = torch.get_rng_state()
    torch.manual_seed(seed + 104729)
    try:
        for module in model.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    finally:
        torch.set_rng_state(state)


@dataclass
class _Stages:
    """The three stages of one run, each advancing ``run`` and saving its resume state as it goes."""

    run: ABLRun
    images: np.ndarray
    labels: np.ndarray
    out: Path | None
    save_stage: SaveStage | None
    #: the pool's pooled features from the last isolation pass (retrain mode, one process), for the expansion and
    #: the label scan of the same model: ``(pool, features)``, a row per pool entry
    pool_features: tuple[np.ndarray, np.ndarray] | None = None
    #: the input-space label scan of the pool, ``(pool, Expansion)``, once computed (it needs no model)
    input_scan: tuple[np.ndarray, Expansion] | None = None
    #: the pool's logits from the last isolation pass (retrain mode, one process), for the off-label scan of the same
    #: model: ``(pool, logits)``, a row per pool entry (the pass's own array: the probabilities are computed only when
    #: the scan runs)
    pool_logits: tuple[np.ndarray, np.ndarray] | None = None
    #: set by the pixel-restart recheck when it removed examples: the clean stage starts again from fresh weights
    restart_clean: bool = False

    def isolation(self, pool: np.ndarray, opt: torch.optim.Optimizer, poison_indices: np.ndarray | None) -> None:
        """Stage 1: LGA training on the pool, then the isolation of ``D_b`` at ``T_te``."""
        run, cfg = self.run, self.run.cfg
        batches = ArrayBatches(self.images, self.labels, run.device, cfg.batch_size, augment="none", seed=cfg.seed,
                               indices=pool)

        def lga(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return lga_loss(logits, y, cfg.gamma, cfg.lga)

        found: list[tuple[Isolation, Expansion | None]] = []  # what ended the stage early (isolation_stop=auto)
        at_te: list[tuple[Isolation, Expansion | None]] = []  # the outcome at T_te (scanned), when extended
        extended: list[tuple[Isolation, Expansion | None]] = []  # an extension epoch's outcome that found one

        def learned() -> bool:
            if run.epoch >= cfg.isolation_epochs:  # the extension: stop once a separate population is found
                return self._extension_found(pool, at_te, extended)
            iso, exp = self._isolate(pool)
            share = np.bincount(self.labels[iso.candidates]).max() / max(1, len(iso.candidates))
            ok = share >= cfg.isolation_concentration and (exp is None or bool(exp.report["expanded"]))
            log.info("ABL isolation: %.0f%% of the lowest-scoring fraction in one label%s", 100 * share,
                     "" if exp is None else f"; seed expansion: {exp.report.get('reason', 'separate population')}")
            if not ok:  # poison not learned yet shows in the predictions: stop before it is
                off = self._off_label(pool, exp)
                ok = off is not exp
                exp = off
            if ok:
                found.append((iso, exp))
            return ok

        auto = cfg.isolation_stop == "auto"
        extra = cfg.isolation_extra_epochs if auto and cfg.retrain else 0
        skip = run.epoch == 0 and self._input_scan_first(pool)  # a fixed-pattern population: no isolation epochs
        self._epochs("isolation", 0, 0 if skip else cfg.isolation_epochs + extra, batches, opt, lga,
                     stop=learned if auto else None)
        del batches
        self._end("isolation")
        if skip:  # the untrained model's losses only fill the isolation record; the input scan's find decides
            iso, exp = self._isolate(pool)
        elif found:  # stopped before T_te: concentrated, and the seed expanded (perhaps capped: then scanned)
            iso, exp = found[0][0], self._off_label(pool, self._scan_if_needed(pool, found[0][1]))
        else:
            iso, exp = self._final_outcome(pool, at_te, extended)
        exp = self._prefer_input_scan(pool, exp)
        run.losses, run.isolated = iso.losses, iso.isolated
        run.report["isolation"] = isolation_report(iso.losses, iso.isolated, self.labels, pool, poison_indices, cfg,
                                                   iso.scores, iso.candidates)
        extra_run = max(0, run.epoch - cfg.isolation_epochs)
        run.report["isolation"].update(epoch=run.epoch, stop=cfg.isolation_stop, stopped_early=bool(found),
                                       extra_epochs=extra_run, extension_found=bool(extra_run and _separate(exp)),
                                       skipped=bool(skip))
        write_isolation_artifacts(self.out, self.images, self.labels, iso.losses, iso.scores, iso.isolated, pool,
                                  poison_indices, run.report)
        if exp is not None:
            if len(exp.core):  # label scan: its suspected poison, not the seed, is what the final model is probed on
                run.isolated = distributed.broadcast_array(exp.core)
            run.removed = distributed.broadcast_array(exp.removed)  # rank 0's, so every rank trains on the same set
            run.report["expansion"] = expansion_report(exp, run.removed, poison_indices, pool)
            self._save_removed()
            self.pool_features, self.pool_logits = None, None
            # rank 0's decision, as for the removed set, so that every rank starts the clean stage from one model
            fresh = cfg.restart == "always" or (cfg.restart == "found" and bool(exp.report.get("expanded")))
            if distributed.broadcast_scalar(float(fresh)):
                reinitialise(run.model, cfg.seed)
                opt.state.clear()
            else:  # nothing found beyond the seed (a fresh model would only learn the same data again), or never
                run.report["clean_stage"] = {"continued": True, "from_epoch": int(run.epoch)}
                log.info("ABL: the isolation model continues for the rest of the schedule (%s)",
                         "restart=never" if cfg.restart == "never" else "nothing separate found")
        run.stage, run.epoch = "clean", 0
        run.snapshot("clean", 0, opt, None)

    def _extension_found(self, pool: np.ndarray, at_te: list[tuple[Isolation, Expansion | None]],
                         extended: list[tuple[Isolation, Expansion | None]]) -> bool:
        """At T_te and after each extension epoch: the outcome (the first one kept as ``at_te``); True, and it is
        kept in ``extended``, when it found a separate population."""
        outcome = self._outcome(pool)
        if not at_te:
            at_te.append(outcome)
        if _separate(outcome[1]):
            extended.append(outcome)
            return True
        return False

    def _final_outcome(self, pool: np.ndarray, at_te: list[tuple[Isolation, Expansion | None]],
                       extended: list[tuple[Isolation, Expansion | None]]) -> tuple[Isolation, Expansion | None]:
        """The stage's outcome when it was not stopped before T_te: what an extension epoch (or T_te) found; else
        the last epoch's if it finds one; else the one at T_te stands (the extension only adds a finding)."""
        if extended:
            return extended[0]
        iso, exp = self._outcome(pool)
        if at_te and not _separate(exp):
            return at_te[0]
        return iso, exp

    def _scan_if_needed(self, pool: np.ndarray, exp: Expansion | None) -> Expansion | None:
        """A seed that did not expand, or whose expansion hit the max-share cap (the mark of a clean sub-type, and
        of some 5-10% poisons), is checked against a scan of every label: a small separate population wins."""
        if exp is not None and (not exp.report.get("expanded") or exp.report.get("capped")) \
                and self.run.cfg.expansion_scan_share > 0:
            return self._scan(pool, exp)
        return exp

    def _outcome(self, pool: np.ndarray) -> tuple[Isolation, Expansion | None]:
        """Isolation, seed expansion and (when needed) the label scan with the current model."""
        iso, exp = self._isolate(pool)
        return iso, self._off_label(pool, self._scan_if_needed(pool, exp))

    def _isolate(self, pool: np.ndarray) -> tuple[Isolation, Expansion | None]:
        """Isolate with the current model and, in retrain mode, expand the seed to the rest of its label."""
        run, cfg = self.run, self.run.cfg
        t0 = time.perf_counter()
        self.pool_features, self.pool_logits, losses = None, None, None
        if cfg.retrain and distributed.current() is None:  # one pass: the losses and the expansion's features
            logits, feats = logits_and_pooled_features(run.model, self.images, pool, run.device,
                                                       max(512, cfg.batch_size))
            self.pool_features, losses = (pool, feats), loss_from_logits(logits, self.labels[pool])
            self.pool_logits = (pool, logits)
        iso = isolate(run.model, self.images, self.labels, pool, cfg, run.device, pool_losses=losses)
        run.add_time("isolate", time.perf_counter() - t0)
        if not cfg.retrain:
            return iso, None
        t0 = time.perf_counter()
        _, in_target = target_examples(self.labels, iso.isolated, pool)
        if cfg.expansion_method == "spectral" and self.pool_features is not None:  # rows of the pass above
            full = self._dataset_rows(self.pool_features[1][np.searchsorted(pool, in_target)], in_target)
        else:
            full = self._dataset_rows(expansion_features(cfg.expansion_method, run.model, self.images, in_target,
                                                         run.device), in_target)
        exp = expand_seed(full, self.labels, iso.isolated, pool, method=cfg.expansion_method,
                          min_posterior=cfg.expansion_posterior,
                          min_separation=cfg.expansion_separation, max_share=cfg.expansion_max_share,
                          random_state=cfg.seed)
        run.add_time("expansion", time.perf_counter() - t0)
        return iso, exp

    def _dataset_rows(self, feats: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """``feats`` (one row per entry of ``indices``) placed at those dataset positions, zeros elsewhere."""
        full = np.zeros((len(self.labels), feats.shape[1]), np.float32)
        full[indices] = feats
        return full

    def _scan(self, pool: np.ndarray, seed_exp: Expansion) -> Expansion:
        """The seed did not expand, or its expansion was capped: scan every label for a small separate population
        (:func:`scan_labels`), which replaces the seed's outcome when found; otherwise the seed's expansion stays the
        outcome and the scan goes in its report."""
        run, cfg = self.run, self.run.cfg
        t0 = time.perf_counter()
        cached = self.pool_features  # from the isolation pass of this same model (_isolate), when there was one
        if cached is not None and np.array_equal(cached[0], pool):
            full = self._dataset_rows(cached[1], pool)
        else:
            full = self._dataset_rows(pooled_features(run.model, self.images, pool, run.device), pool)
        scan = scan_labels(full, self.labels, pool, max_weight=cfg.expansion_scan_share,
                           min_separation=cfg.expansion_separation, min_posterior=cfg.expansion_posterior,
                           max_share=cfg.expansion_max_share, random_state=cfg.seed,
                           method=cfg.expansion_scan_method,
                           min_wide_separation=cfg.expansion_scan_separation or float("inf"),
                           min_count_sd=cfg.expansion_scan_count_sd)
        run.add_time("expansion", time.perf_counter() - t0)
        scan.report["seed"] = {k: v for k, v in seed_exp.report.items() if k != "labels"}
        if scan.report["expanded"]:
            return self._union_if_short(pool, seed_exp, scan)
        seed_exp.report["scan"] = scan.report
        return self._refuse_capped_without_count(pool, seed_exp)

    def _refuse_capped_without_count(self, pool: np.ndarray, seed_exp: Expansion) -> Expansion:
        """A capped seed expansion that no scan confirmed, when ``expansion_capped_count_sd`` is set: kept only if the
        held-out split holds that many sd more of its label than a clean label's share (dirty-label poison adds its
        copies to its label; a clean sub-type adds nothing); otherwise only the seed is removed, and the outcome is
        "nothing found" (so the isolation model continues). Recorded in ``report["capped_count"]``."""
        need = self.run.cfg.expansion_capped_count_sd
        if not (need and seed_exp.report.get("capped") and seed_exp.report.get("expanded")):
            return seed_exp
        got = held_out_excess(self._held_out_counts(pool, seed_exp.target))
        if got is None or got[1] <= 0:
            return seed_exp
        excess_sd = got[0] / got[1]
        record = {"excess": got[0], "excess_sd": excess_sd, "need_sd": need,
                  "n_capped_removal": int(len(seed_exp.removed)), "kept": bool(excess_sd >= need)}
        seed_exp.report["capped_count"] = record
        if record["kept"]:
            return seed_exp
        seed = np.setdiff1d(seed_exp.removed, seed_exp.candidates)
        log.info("ABL: the capped expansion of label %d is refused: the held-out split holds %.1f sd of it beyond a "
                 "clean label's share (need %.1f); only the seed (%d) is removed", seed_exp.target, excess_sd, need,
                 len(seed))
        report = {**seed_exp.report, "expanded": False, "n_expanded": 0, "n_removed": int(len(seed)),
                  "reason": f"capped expansion refused by the held-out count ({excess_sd:.1f} sd < {need:g})"}
        return replace(seed_exp, removed=seed, report=report)

    def _held_out_counts(self, pool: np.ndarray, target: int) -> dict[str, Any]:
        """The held-out split's (everything outside ``pool``) counts of ``target`` that the count checks read."""
        return held_out_counts(self.labels[np.setdiff1d(np.arange(len(self.labels)), pool)], target)

    def _union_if_short(self, pool: np.ndarray, seed_exp: Expansion, scan: Expansion) -> Expansion:
        """A capped seed expansion replaced by the scan's find in the same label, where the held-out split holds
        more of that label than the scan's own poison estimate by ``expansion_union_sd`` sd or more: the label
        holds more poison than the scan took (WaNet at 5-10%: the poison is 30-50% of the label, the scan's component
        at most ``expansion_scan_share``), so the capped expansion was poison too and both are removed. A clean
        sub-type adds nothing to its label's held-out count (the count check of the verdict), so it stays refused."""
        need = self.run.cfg.expansion_union_sd
        if not (need and seed_exp.report.get("capped") and seed_exp.target == scan.target):
            return scan
        counts = self._held_out_counts(pool, scan.target)
        short = held_out_shortfall(counts, scan.report, len(scan.removed), len(pool))
        if short is None or short < need:
            return scan
        removed = np.union1d(scan.removed, seed_exp.removed)
        est = max(float(scan.report.get("estimated_poison", 0.0)), float(seed_exp.report.get("estimated_poison", 0.0)))
        scan.report.update(union_with_seed={"short_sd": short, "n_scan": int(len(scan.removed)),
                                            "n_seed_expansion": int(len(seed_exp.removed))},
                           n_removed=int(len(removed)), estimated_poison=est)
        log.info("ABL: the held-out split holds %.1f sd more of label %d than the scan took; the capped seed "
                 "expansion is removed too (%d examples)", short, scan.target, len(removed))
        return replace(scan, removed=removed)

    def _off_label(self, pool: np.ndarray, exp: Expansion | None) -> Expansion | None:
        """Retrain mode: when nothing beyond the seed was found (no expansion, or one refused by the count), the
        off-label scan of the same isolation pass's predictions (:func:`scan_off_label`: dirty-label poison the model
        has not learned yet); its find replaces the outcome, which goes in its report as the seed's. Needs the one-pass
        predictions (not under torchrun)."""
        cfg = self.run.cfg
        cached = self.pool_logits
        if exp is None or not cfg.expansion_off_label_ratio or exp.report.get("expanded") or cached is None \
                or not np.array_equal(cached[0], pool):
            return exp
        t0 = time.perf_counter()
        scan = scan_off_label(softmax_rows(cached[1]), self.labels, pool, min_ratio=cfg.expansion_off_label_ratio,
                              max_share=cfg.expansion_max_share)
        self.run.add_time("expansion", time.perf_counter() - t0)
        if not scan.report["expanded"]:
            exp.report["off_label_scan"] = scan.report
            return exp
        scan.report["seed"] = {k: v for k, v in exp.report.items() if k != "labels"}
        return scan

    def _input_scan(self, pool: np.ndarray) -> Expansion:
        """The input-space label scan of the pool (:func:`scan_inputs`; model-free, so computed once per run)."""
        cfg = self.run.cfg
        if self.input_scan is None or not np.array_equal(self.input_scan[0], pool):
            t0 = time.perf_counter()
            scan = scan_inputs(self.images, self.labels, pool, min_separation=cfg.expansion_input_separation,
                               min_posterior=cfg.expansion_posterior, max_share=cfg.expansion_max_share,
                               random_state=cfg.seed)
            self.run.add_time("expansion", time.perf_counter() - t0)
            self.input_scan = (pool, scan)
        return self.input_scan[1]

    def _input_scan_first(self, pool: np.ndarray) -> bool:
        """Retrain mode with ``input_scan="first"``: whether the input scan finds a population before any isolation
        epoch (then the epochs are skipped)."""
        cfg = self.run.cfg
        if not (cfg.retrain and cfg.expansion_input_separation and cfg.input_scan == "first"):
            return False
        found = bool(self._input_scan(pool).report["expanded"])
        if found:
            log.info("ABL: the input scan found a separate population; the isolation epochs are skipped")
        return found

    def _prefer_input_scan(self, pool: np.ndarray, exp: Expansion | None) -> Expansion | None:
        """Retrain mode: a label whose raw inputs split into two far-apart populations (:func:`scan_inputs`, a
        fixed-pattern trigger) replaces the model-based outcome, which goes in its report; otherwise the input scan
        goes in the model-based outcome's report."""
        cfg = self.run.cfg
        if exp is None or not cfg.expansion_input_separation:
            return exp
        scan = self._input_scan(pool)
        if not scan.report["expanded"]:
            exp.report["input_scan"] = scan.report
            return exp
        scanned = found_by_scan(exp.report)
        seed = exp.report.get("seed", exp.report) if scanned else exp.report
        scan.report["seed"] = {k: v for k, v in seed.items() if k not in ("labels", "scan")}
        if scanned:
            scan.report["feature_scan"] = {k: v for k, v in exp.report.items() if k != "seed"}
        return scan

    def clean(self, pool: np.ndarray, opt: torch.optim.Optimizer, poison_indices: np.ndarray | None = None) -> None:
        """Stage 2: ordinary training on ``D \\ D_b`` (the schedule continues from the isolation epochs)."""
        run, cfg = self.run, self.run.cfg
        rest = np.setdiff1d(pool, run.removed if cfg.retrain else run.isolated)
        batches = ArrayBatches(self.images, self.labels, run.device, cfg.batch_size, augment=cfg.augment,
                               seed=cfg.seed + 1, indices=rest)
        recheck = self._recheck(pool, batches, poison_indices, opt)
        # retrain mode: a fresh model on its own schedule (whole, or what the isolation left of it: then its lr
        # milestones are scaled to it), or the isolation model continued when nothing was found; otherwise the
        # schedule continues after T_te
        iso_run = int(run.report.get("isolation", {}).get("epoch", cfg.isolation_epochs))
        continued = run.report.get("clean_stage", {}).get("continued", False)
        if continued:
            self._epochs("clean", iso_run, max(1, cfg.clean_epochs - iso_run), batches, opt, F.cross_entropy)
        else:
            n = cfg.clean_stage_epochs(iso_run)
            self._epochs("clean", 0 if cfg.retrain else cfg.isolation_epochs, n, batches, opt, F.cross_entropy,
                         stop=recheck, length=n if cfg.retrain else None)
            if self.restart_clean:  # the pixel recheck took poison the model trained on: a whole schedule again
                self.restart_clean = False
                run.epoch = 0
                run.snapshot("clean", 0, opt, batches)
                self._epochs("clean", 0, n, batches, opt, F.cross_entropy, stop=recheck, length=n)
        del batches
        self._end("clean")
        run.stage, run.epoch = "unlearning", 0
        run.snapshot("unlearning", 0, None, None)

    def _save_removed(self) -> None:
        """Write ``run.removed`` (retrain mode's removed set) to the run directory, and name it in the report."""
        if self.out is not None and distributed.is_main():
            np.save(self.out / "removed_indices.npy", self.run.removed.astype(np.int64))
            self.run.report["files"]["removed_indices"] = "removed_indices.npy"

    def _recheck(self, pool: np.ndarray, batches: ArrayBatches, poison_indices: np.ndarray | None,
                 opt: torch.optim.Optimizer) -> Callable[[], bool] | None:
        """Retrain mode's recheck of the fresh model (``expansion_recheck_epoch``; one process): after that clean-stage
        epoch (and each of the next ``expansion_recheck_passes`` - 1), the removed label's examples that the fresh
        model does not confidently place in it (:func:`below_own_threshold`, confident learning's per-class threshold
        × ``expansion_recheck_scale``; a pass is skipped when the label's mean probability is under
        ``expansion_recheck_min_mean``) are removed too, from the next epoch on, and recorded in
        ``report["recheck"]``: the totals, and each pass under ``passes``. The poison the removal missed (WaNet at
        10%: 600-1,000 copies, about 1% of what the fresh model trains on) is not learned yet after one epoch, so the
        model predicts those copies as their own classes; the rule also takes the label's least typical clean
        examples, at a cost in clean accuracy (``docs/abl.md#clean-stage-recheck``). The stage never stops early.
        None when it does not apply (no fresh model, no target), and when the input scan found the population: its
        finds were whole in every stored run, so the recheck could only take clean examples there (the report says
        it did not run). ``expansion_recheck_method`` ``pixel`` / ``pixel-restart``: one pass, whose removed examples
        are :func:`pixel_recheck`'s flags (positives chosen by the fresh model's probabilities for the removal); with
        ``pixel-restart`` a pass that flagged any reinitialises the model and the optimiser, and ``check`` returns
        True so that :meth:`clean` runs the whole schedule again (``docs/abl.md#pixel-space-recheck``)."""
        run, cfg = self.run, self.run.cfg
        exp = run.report.get("expansion", {})
        target = exp.get("target")
        fresh = cfg.retrain and not run.report.get("clean_stage", {}).get("continued", False)
        if not (fresh and cfg.expansion_recheck_epoch and target is not None and int(target) >= 0):
            return None
        t = int(target)
        if distributed.current() is not None:
            log.warning("ABL recheck not run: it reads the whole training set in one process (torchrun run)")
            run.report["recheck"] = {"target": t, "n_removed": 0, "passes": [], "not_run": "distributed"}
            return None
        if found_by_input_scan(exp):
            log.info("ABL recheck not run: the input scan found label %d's population, whole in every measured run", t)
            run.report["recheck"] = {"target": t, "n_removed": 0, "passes": [], "not_run": "input-scan"}
            return None
        first = cfg.expansion_recheck_epoch
        pixel = cfg.expansion_recheck_method.startswith("pixel")
        n_passes = 1 if pixel else cfg.expansion_recheck_passes

        def check() -> bool:
            passes = run.report.get("recheck", {}).get("passes", [])
            if not first <= run.epoch < first + n_passes \
                    or run.epoch in {p["epoch"] for p in passes}:
                return False
            t0 = time.perf_counter()
            rest = np.setdiff1d(pool, run.removed)
            if pixel:
                more, rec = self._pixel_pass(rest, t, poison_indices)
            else:
                in_t = rest[self.labels[rest] == t]
                logits = predict_logits(run.model, self.images[in_t], run.device, max(512, cfg.batch_size))
                more, rec = below_own_threshold(softmax_rows(logits), self.labels, in_t, t,
                                                cfg.expansion_recheck_scale, cfg.expansion_recheck_min_mean)
            rec = {"epoch": int(run.epoch), **rec}
            if poison_indices is not None:
                missed = np.intersect1d(np.asarray(poison_indices, np.int64), rest)
                hits = int(np.isin(more, missed).sum())
                rec.update(n_poison_in_rest=int(len(missed)), removed_poison=hits, removed_clean=int(len(more) - hits))
            if len(more):  # a skipped or empty pass leaves the removed set, the batches and the file as they are
                run.removed = np.union1d(run.removed, more)
                batches.indices = torch.as_tensor(np.setdiff1d(rest, more), device=batches.images.device)
                self._save_removed()
            if pixel:
                pass  # pixel_recheck logs its own line
            elif rec.get("skipped"):
                log.info("ABL recheck after clean epoch %d skipped: label %d's mean probability %.2f is under %g",
                         run.epoch, t, rec["mean_probability"], cfg.expansion_recheck_min_mean)
            else:
                log.info("ABL recheck after clean epoch %d: %d of label %d's %d remaining examples are under %.2f "
                         "(its mean probability x %g); removed too", run.epoch, len(more), t, rec["n_target_label"],
                         rec.get("threshold", float("nan")), cfg.expansion_recheck_scale)
            restart = len(more) > 0 and cfg.expansion_recheck_method == "pixel-restart"
            if restart:  # the model has trained an epoch on what was flagged: fresh weights, the schedule again
                rec["restarted"] = True
                reinitialise(run.model, cfg.seed)
                opt.state.clear()
                self.restart_clean = True
                log.info("ABL pixel recheck: the clean stage starts again from fresh weights without the flagged")
            run.report["recheck"] = recheck_totals(passes + [rec], cfg.expansion_recheck_scale)
            run.add_time("expansion", time.perf_counter() - t0)
            return restart

        return check

    def _pixel_pass(self, rest: np.ndarray, t: int, poison_indices: np.ndarray | None) -> tuple[np.ndarray, dict]:
        """The pixel recheck's one pass on the fresh model (:func:`pixel_recheck`), then its count top-up
        (:func:`count_top_up`, ``expansion_recheck_count_sd``): the label's remaining examples to remove, and the
        pass's report."""
        run, cfg = self.run, self.run.cfg
        batch = max(512, cfg.batch_size)
        p_removed = softmax_rows(predict_logits(run.model, self.images[run.removed], run.device, batch))[:, t]
        more, rec = pixel_recheck(self.images, self.labels, run.removed, rest, t, p_removed, cfg.seed, run.device)
        if cfg.expansion_recheck_count_sd > 0:  # the label may still hold copies the classifier missed
            after = np.setdiff1d(rest, more)
            in_t = after[self.labels[after] == t]
            p_in = softmax_rows(predict_logits(run.model, self.images[in_t], run.device, batch))[:, t]
            extra, top = count_top_up(self.labels, after, t, in_t, p_in, cfg.expansion_recheck_count_sd)
            if poison_indices is not None:
                top["removed_poison"] = int(np.isin(extra, np.asarray(poison_indices, np.int64)).sum())
            rec["count_top_up"] = top
            more = np.union1d(more, extra).astype(np.int64)
            rec["n_removed"] = int(len(more))
        return more, rec

    def unlearning(self, holdout: np.ndarray) -> None:
        """Stage 3: unlearning ``D_b`` behind the guard, then the failure warnings and the total time."""
        run = self.run
        residual = self._residual(holdout)
        if residual is None:
            unlearn(run, self.images, self.labels, run.isolated, holdout)
        else:
            unlearn(run, self.images, self.labels, run.isolated, holdout, cfg=residual, ascend=run.removed)
        run.pending_rng.clear()
        self._end("unlearning")
        run.report["verdict"] = verdict(run.report, run.cfg)
        run.report["warnings"] = failure_warnings(run.report, run.cfg)
        for w in run.report["warnings"]:
            log.warning("ABL: %s", w)
        run.stage = "done"
        run.report["seconds"]["total"] = sum(v for k, v in run.report["seconds"].items() if k != "total")
        run.snapshot("done", 0, None, None)

    def _residual(self, holdout: np.ndarray) -> ABLConfig | None:
        """Retrain mode's residual unlearning: when the retrained model's own evidence says the backdoor is still
        there — the held-out probe fires on it: poison the removal missed taught it again (the seed probe alone,
        which cannot tell clean-label poison, does not start it) — the unlearning stage runs on the *removed* set
        (joint, complementary-label ascent, ``residual_*`` epochs and lr) behind the unlearning guard at
        ``residual_max_ca_drop``, with the isolated core as its probe; otherwise None (no unlearning, as before).
        Decided once and recorded in ``report["unlearning"]["residual"]``, so a resumed run decides alike."""
        run, cfg = self.run, self.run.cfg
        if not (cfg.retrain and cfg.residual_unlearning_epochs and not cfg.unlearning_epochs and len(run.removed)):
            return None
        un = unlearning_report(run, self.images, self.labels, run.isolated, holdout)
        if "residual" not in un:
            before = {**un, "isolated_accuracy_after": un["isolated_accuracy_before"]}
            now = verdict({**run.report, "unlearning": before}, cfg)
            held = now["held_out_probe"]
            un["residual"] = {"ran": held is not None and held >= HELD_OUT_FIRING, "verdict_before": now["status"],
                              "held_out_probe_before": held,
                              "epochs": cfg.residual_unlearning_epochs, "lr": cfg.residual_unlearning_lr,
                              "n_unlearned": int(len(run.removed))}
            if un["residual"]["ran"]:
                log.warning("ABL: the retrained model still fires on the held-out poison (probe %.2f); unlearning "
                            "the %d removed examples from it", held, len(run.removed))
        if not un["residual"]["ran"]:
            return None
        return replace(cfg, unlearning_epochs=cfg.residual_unlearning_epochs, unlearning_lr=cfg.residual_unlearning_lr,
                       unlearning="joint", unlearning_ascent="complement", unlearning_bound=0.0,
                       max_ca_drop=cfg.residual_max_ca_drop)

    def _epochs(self, name: str, first_epoch: int, n_epochs: int, batches: ArrayBatches,
                optimizer: torch.optim.Optimizer, loss_fn: LossFn, stop: Callable[[], bool] | None = None,
                length: int | None = None) -> None:
        """Train epochs ``run.epoch .. n_epochs`` of stage ``name`` on the global-epoch lr schedule (scaled to
        ``length`` epochs: :meth:`ABLConfig.lr_at`); ``stop()``, asked after every epoch, ends the stage early when
        it returns True."""
        run, cfg = self.run, self.run.cfg
        run.restore_rng(batches)
        for e in range(run.epoch, n_epochs):
            t0 = time.perf_counter()
            lr = cfg.lr_at(first_epoch + e, length)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = train_one_epoch(run.train_model, batches, optimizer, loss_fn, f"ABL {name} {e + 1}/{n_epochs}",
                                   **run.step_kw)
            loss = distributed.mean_over_ranks(loss)  # the epoch's loss over every rank's shard
            distributed.sync_buffers(run.model)  # every rank continues from rank 0's BatchNorm statistics
            secs = time.perf_counter() - t0
            run.add_time(name, secs)
            rec: dict[str, Any] = {"stage": name, "epoch": first_epoch + e + 1, "loss": loss, "lr": lr,
                                   "seconds": secs}
            if run.evaluate is not None and cfg.eval_every and (e + 1) % cfg.eval_every == 0 and e + 1 < n_epochs:
                rec.update(run.evaluate(run.model))
            log.info("ABL %s epoch %d: %s", name, first_epoch + e + 1,
                     {k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()})
            run.history.append(rec)
            run.epoch = e + 1
            if stop is not None and e + 1 < n_epochs and stop():
                log.info("ABL %s: stopping after epoch %d of at most %d", name, e + 1, n_epochs)
                return
            run.snapshot(name, run.epoch, optimizer, batches)

    def _end(self, name: str) -> None:
        """After a stage: evaluate, record, and save the stage checkpoint."""
        run = self.run
        metrics = run.evaluate(run.model) if run.evaluate is not None else {}
        run.report["stages"][name] = {**metrics, "seconds": run.report["seconds"].get(name, 0.0)}
        log.info("ABL after %s: %s", name, {k: round(v, 4) for k, v in metrics.items()})
        if self.save_stage is not None and self.out is not None:
            self.save_stage(self.out / f"stage_{name}.pt", run.model, name)
            run.report["files"][f"stage_{name}"] = f"stage_{name}.pt"


__all__ = ["ABLConfig", "ABLResult", "ABLRun", "ASCENT_FORMS", "BN_MODES", "Evaluate", "ISOLATION_LABELS",
           "ISOLATION_SCORES", "Isolation", "LGA_FORMS", "STAGES", "STATE_FILE", "STATE_FORMAT", "SaveStage",
           "UNLEARNING_MODES", "ascent_term", "cycle_batches", "estimated_accuracy", "expand_seed",
           "failure_warnings", "guard_metrics", "isolate", "isolate_lowest", "isolation_report", "isolation_scores",
           "keep_target_label", "lga_loss", "rank_auroc", "reinitialise", "run_abl", "summary_lines", "unlearn",
           "unlearning_epoch", "verdict"]
