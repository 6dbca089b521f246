"""The state of one ABL run, shared by its stages and saved after every epoch so an interrupted run can resume.

:class:`ABLRun` carries what the stages read and update (model, history, report, isolated set, the stage and epoch
reached); :meth:`ABLRun.snapshot` writes it atomically to one file in the run directory (weights, optimiser, RNG
states and the partial report; ``torch.load(weights_only=True)`` on the way back, never pickle), and
:meth:`ABLRun.resume_from` restores it. A resume is refused when the configuration or the training data differ.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import distributed
from .config import ABLConfig
from .train import ArrayBatches

log = logging.getLogger(__name__)

STAGES = ("isolation", "clean", "unlearning", "done")
STATE_FILE = "abl_state.pt"
STATE_FORMAT = "abl-guard-abl-state/1"

SaveStage = Callable[[Path, nn.Module, str], None]
Evaluate = Callable[[nn.Module], dict[str, float]]


def fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    """SHA-256 of the training arrays, so a resume cannot silently continue on other data."""
    h = hashlib.sha256()
    h.update(str(images.shape).encode())
    h.update(np.ascontiguousarray(images).data)
    h.update(np.ascontiguousarray(labels, dtype=np.int64).data)
    return h.hexdigest()


class ResumeFile:
    """Resume state: one file, rewritten atomically after every epoch (weights, optimiser, RNGs, partial report)."""

    def __init__(self, out_dir: Path | None) -> None:
        self.path = None if out_dir is None else Path(out_dir) / STATE_FILE

    def save(self, blob: dict[str, Any]) -> None:
        if self.path is None or not distributed.is_main():  # under torchrun every rank reads it, rank 0 writes it
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


def rng_state(batches: ArrayBatches | None) -> dict[str, torch.Tensor]:
    """The global torch RNG states and, when given, the batch shuffler's."""
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    if batches is not None:
        out["batches"] = batches.generator.get_state()
    return out


def set_rng_state(state: dict[str, torch.Tensor], batches: ArrayBatches | None) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if batches is not None and "batches" in state:
        batches.generator.set_state(state["batches"])


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A host copy of the model's weights (independent of later training steps)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


@dataclass
class ABLRun:
    """One ABL run: its fixed context (model, config, device, evaluator) and the state the stages advance."""

    model: nn.Module
    cfg: ABLConfig
    device: torch.device
    resume_file: ResumeFile
    config_json: str
    fingerprint: str
    n: int  # training examples
    evaluate: Evaluate | None = None
    quiet: bool = False
    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    stage: str = "isolation"
    epoch: int = 0  # epochs done in ``stage``
    isolated: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    removed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # retrain mode: seed + expansion
    losses: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    pending_rng: dict[str, Any] = field(default_factory=dict)  # restored at the first stage that runs after a resume
    saved: dict[str, Any] | None = None  # the state resumed from
    net: nn.Module | None = None  # what training steps run through: the model in DistributedDataParallel under torchrun

    def __post_init__(self) -> None:
        if len(self.losses) != self.n:
            self.losses = np.full(self.n, np.nan, np.float32)

    @property
    def train_model(self) -> nn.Module:
        return self.model if self.net is None else self.net

    @property
    def step_kw(self) -> dict[str, Any]:
        """The keyword arguments of every training epoch (progress bar, autocast, memory format)."""
        return {"quiet": self.quiet, "autocast_dtype": self.autocast_dtype, "channels_last": self.channels_last}

    def add_time(self, key: str, seconds: float) -> None:
        self.report["seconds"][key] = self.report["seconds"].get(key, 0.0) + seconds

    def restore_rng(self, batches: ArrayBatches | None) -> None:
        """After a resume, put back the RNG states saved with the interrupted epoch (once)."""
        if self.pending_rng:
            set_rng_state(self.pending_rng, batches)
            self.pending_rng.clear()

    def snapshot(self, stage: str, epoch: int, optimizer: torch.optim.Optimizer | None,
                 batches: ArrayBatches | None, extra: dict[str, Any] | None = None) -> None:
        """Save the resume state: ``epoch`` epochs of ``stage`` are done."""
        if self.resume_file.path is None or not distributed.is_main():  # nothing to write here: skip the host copy
            return
        blob: dict[str, Any] = {"stage": stage, "epoch": epoch, "model": model_state(self.model),
                                "config_json": self.config_json, "fingerprint": self.fingerprint,
                                "history_json": json.dumps(self.history), "report_json": json.dumps(self.report),
                                "isolated": torch.as_tensor(self.isolated),
                                "removed": torch.as_tensor(self.removed), "losses": torch.as_tensor(self.losses),
                                "rng": rng_state(batches)}
        if optimizer is not None:
            blob["optimizer"] = optimizer.state_dict()
        blob.update(extra or {})
        self.resume_file.save(blob)

    def resume_from(self, saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
        """Continue from a saved state (``optimizer``: the isolation / clean stages' shared optimiser)."""
        if saved["config_json"] != self.config_json or saved["fingerprint"] != self.fingerprint:
            raise ValueError(f"cannot resume from {self.resume_file.path}: the ABL configuration or the training data "
                             "differ from the interrupted run")
        self.saved = saved
        self.model.load_state_dict(saved["model"])
        self.history = json.loads(saved["history_json"])
        self.report = json.loads(saved["report_json"])
        self.stage, self.epoch = str(saved["stage"]), int(saved["epoch"])
        self.isolated = saved["isolated"].numpy().astype(np.int64)
        self.removed = saved["removed"].numpy().astype(np.int64) if "removed" in saved else self.isolated.copy()
        self.losses = saved["losses"].numpy()
        if self.stage in ("isolation", "clean") and "optimizer" in saved:
            optimizer.load_state_dict(saved["optimizer"])
        self.pending_rng.update(saved.get("rng", {}))
        log.info("resuming ABL at stage %s, epoch %d", self.stage, self.epoch)

    def saved_for(self, stage: str) -> dict[str, Any] | None:
        """The resumed state when it was saved inside ``stage``, else None."""
        return self.saved if self.saved is not None and self.saved["stage"] == stage else None
