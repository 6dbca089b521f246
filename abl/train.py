"""The training loop: device selection, on-device array batching, augmentation, evaluation.

Data are uint8 arrays; they are moved to the training device once (when they fit) and batched by index
permutation, so there is no per-example Python work and no DataLoader worker overhead. The same code runs on CUDA
and CPU. Anti-Backdoor Learning builds on these pieces (custom loss functions, per-example losses, subsets).
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from abl_guard.guard.progress import progress_bar

from . import distributed

# the configuration and its choices live in the torch-free run_config (the CLI builds its options from them)
from .run_config import AUGMENTATIONS, MEMORY_FORMATS, PRECISIONS, TrainConfig

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU (and sets CPU threads to the core count)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available")
    dev = distributed.local_device(dev)  # under torchrun: this rank's GPU
    if dev.type == "cuda":
        # fixed input shapes: let cuDNN pick the fastest kernels; TF32 for any fp32 matmuls left outside autocast
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if dev.type == "cpu":
        torch.set_num_threads(_cpu_threads or default_cpu_threads())
    return dev


_cpu_threads: int | None = None


def default_cpu_threads() -> int:
    """``$OMP_NUM_THREADS`` when set (the user's or the scheduler's choice), else the cores this process may use."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def set_cpu_threads(n: int | None) -> int:
    """Pin torch's CPU threads to ``n`` (None: :func:`default_cpu_threads`) for this process; returns the count.

    :func:`select_device` keeps this choice. Inter-op threads can only be set before torch's first parallel work, so
    a later call changes the intra-op count only. Oversubscribed cores make torch far slower, not faster.
    """
    global _cpu_threads
    if n is not None and n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    _cpu_threads = n
    count = n or default_cpu_threads()
    torch.set_num_threads(count)
    try:
        torch.set_num_interop_threads(count)
    except RuntimeError:  # already set, or parallel work has started
        log.debug("inter-op threads already fixed at %d", torch.get_num_interop_threads())
    return count


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_float(images: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 ``(N, H, W, C)`` -> float32 ``(N, C, H, W)`` in [0, 1] on ``device``."""
    t = torch.as_tensor(images, device=device)
    return t.permute(0, 3, 1, 2).float().div_(255.0).contiguous()




def resolve_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision``: ``auto`` is bf16 on CUDA devices that support it, else fp32 (None)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        ok = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if ok else None
    return torch.bfloat16 if precision == "bf16" else None


def resolve_channels_last(memory_format: str, device: torch.device) -> bool:
    """Whether to train in channels-last memory format: ``auto`` = on CUDA only (rarely helps CPU convs)."""
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {MEMORY_FORMATS}, got {memory_format!r}")
    if memory_format == "auto":
        return device.type == "cuda"
    return memory_format == "channels-last"




def augment_batch(x: torch.Tensor, mode: str, pad: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop with zero padding (and horizontal flip), vectorised on the batch's device."""
    if mode == "none":
        return x
    if mode not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {AUGMENTATIONS}")
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
    out = _crop(padded, dy, dx, h, w)
    if mode == "crop-flip":
        flip = torch.rand(n, device=x.device, generator=generator) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out


def _crop(padded: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, h: int, w: int) -> torch.Tensor:
    n = padded.shape[0]
    ar_h = torch.arange(h, device=padded.device)
    ar_w = torch.arange(w, device=padded.device)
    rows = (dy[:, None] + ar_h[None, :])  # (n, h)
    cols = (dx[:, None] + ar_w[None, :])  # (n, w)
    idx_n = torch.arange(n, device=padded.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2).contiguous()


class ArrayBatches:
    """Mini-batches over uint8 images held on the training device (or on the CPU when they do not fit).

    ``indices`` restricts the set (e.g. ABL's clean subset) without copying the arrays. In a process group
    (:mod:`abl.distributed`) every epoch iterates this rank's shard of a ``DistributedSampler`` permutation instead,
    and ``batch_size`` (the global batch) is split evenly over the ranks.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, device: torch.device, batch_size: int,
                 shuffle: bool = True, augment: str = "none", seed: int = 0,
                 indices: np.ndarray | None = None) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.device = device
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.augment = augment
        store = device if _fits_on(device, images.nbytes) else torch.device("cpu")
        self.images = torch.as_tensor(images, device=store)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64), device=store)
        self.indices = None if indices is None else torch.as_tensor(np.asarray(indices, np.int64), device=store)
        self.generator = torch.Generator(device=store).manual_seed(seed)
        group = distributed.current()
        self.world = 1 if group is None else group.world_size
        self.distributed = group is not None
        self.batch_size = distributed.per_rank_batch(self.batch_size)  # in a group: the rank's share

    def __len__(self) -> int:
        n = len(self.labels) if self.indices is None else len(self.indices)
        n = -(-n // self.world)  # the sampler pads every rank's shard to the same length
        return (n + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yields ``(x_float_nchw, labels, dataset_indices)`` on the training device."""
        base = torch.arange(len(self.labels), device=self.images.device) if self.indices is None else self.indices
        if self.distributed:  # every rank draws the same seed from its generator (reseeding and resume work as in
            # one process) and takes its part of that permutation
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator, device=self.generator.device))
            pos = distributed.shard(len(base), 0, seed, self.shuffle)
            order = base[torch.as_tensor(pos, device=base.device)]
        elif self.shuffle:
            order = base[torch.randperm(len(base), device=base.device, generator=self.generator)]
        else:
            order = base
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            x = to_float(self.images[idx], self.device)
            x = augment_batch(x, self.augment)
            yield x, self.labels[idx].to(self.device, non_blocking=True), idx


def _fits_on(device: torch.device, nbytes: int) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < 0.5 * free


@torch.no_grad()
def predict_logits(model: nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 512) -> np.ndarray:
    model.eval()
    out = []
    for s in range(0, len(images), batch_size):
        out.append(model(to_float(images[s : s + batch_size], device)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


@torch.no_grad()
def per_example_loss(model: nn.Module, images: np.ndarray, labels: np.ndarray, device: torch.device,
                     batch_size: int = 512) -> np.ndarray:
    """Cross-entropy of every example in eval mode, batched (never batch size 1).

    Computed as ``softplus(logsumexp_{j != y}(z_j - z_y))`` in float64 from the model's logits ``z``, which equals the
    cross-entropy but keeps its relative precision for confidently fitted examples: the usual ``logsumexp(z) - z_y``
    rounds to exactly 0 once the logit margin exceeds ~17 (float32) or ~37 (float64), and ABL's isolation would then
    rank a tie of thousands of such examples in index order (the GPU run at the paper's schedule had 2,400 of 3,619
    BadNets examples at exactly 0 in float32 at T_te).
    """
    return loss_from_logits(predict_logits(model, images, device, batch_size), labels)


def loss_from_logits(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """:func:`per_example_loss` from logits already computed (float64, without cancellation)."""
    y = torch.as_tensor(np.asarray(labels, np.int64))
    z = torch.as_tensor(np.asarray(logits)).double()
    if z.numel() == 0:
        return np.zeros(len(y), np.float64)
    return F.softplus(log_odds_against(z, y)).numpy()


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Class probabilities (float64) from logits already computed, one row per example."""
    z = torch.as_tensor(np.asarray(logits)).double()
    return torch.softmax(z, dim=1).numpy() if z.numel() else np.zeros(z.shape, np.float64)


def log_odds_against(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log((1 - p_y) / p_y) = logsumexp_{j != y}(z_j - z_y)`` per example, computed without cancellation.

    ``softplus`` of it is the cross-entropy ``-log p_y``; ``softplus`` of its negation is ``-log(1 - p_y)``.
    """
    y = labels[:, None]
    return torch.logsumexp((logits - logits.gather(1, y)).scatter(1, y, float("-inf")), 1)


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, device: torch.device) -> float:
    if len(images) == 0:
        return float("nan")
    return float((predict_logits(model, images, device).argmax(1) == np.asarray(labels)).mean())


def train_one_epoch(model: nn.Module, batches: ArrayBatches, optimizer: torch.optim.Optimizer, loss_fn: LossFn,
                    desc: str = "train", quiet: bool = False, autocast_dtype: torch.dtype | None = None,
                    channels_last: bool = False) -> float:
    """One pass over ``batches``; returns the mean of ``loss_fn`` over batches.

    ``autocast_dtype`` (e.g. bf16) runs the forward pass under autocast; ``loss_fn`` always sees float32 logits.
    ``channels_last`` feeds the batches in channels-last memory format (the model should be converted too). The
    running loss stays on the device, so there is no host sync per step unless a progress bar is shown.
    """
    model.train()
    total = torch.zeros((), device=batches.device)
    count = 0
    bar = progress_bar(total=len(batches), desc=desc, quiet=quiet)
    for x, y, _ in batches:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            logits = model(x)
        loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
        count += 1
        bar.update(1)
        if not bar.disable:
            bar.set_postfix(loss=f"{float(total) / count:.3f}", refresh=False)
    bar.close()
    return float(total) / max(count, 1)


def make_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)


class PlainTrainer:
    """Ordinary cross-entropy training of ``model``, one epoch per :meth:`epoch` call (probe, pause, time-box)."""

    def __init__(self, model: nn.Module, images: np.ndarray, labels: np.ndarray, cfg: TrainConfig) -> None:
        self.device = select_device(cfg.device)
        self.autocast = resolve_autocast(cfg.precision, self.device)
        self.channels_last = resolve_channels_last(cfg.memory_format, self.device)
        self.model = model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.cfg = cfg
        # under torchrun: DistributedDataParallel, each rank on its shard with its share of the global batch
        self.ddp = distributed.wrap_model(self.model, self.device)
        self.batches = ArrayBatches(images, labels, self.device, cfg.batch_size, augment=cfg.augment, seed=cfg.seed)
        self.opt = make_optimizer(self.ddp, cfg.lr, cfg.momentum, cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.MultiStepLR(self.opt, list(cfg.lr_milestones), cfg.lr_gamma)
        self.epoch_seconds: list[float] = []

    @property
    def epochs_done(self) -> int:
        return len(self.epoch_seconds)

    def epoch(self, quiet: bool = False) -> dict[str, float]:
        """One epoch; returns ``{"epoch", "loss", "seconds"}`` (the loss read-back synchronises the device)."""
        t0 = time.perf_counter()
        loss = train_one_epoch(self.ddp, self.batches, self.opt, F.cross_entropy,
                               f"epoch {self.epochs_done + 1}/{self.cfg.epochs}", quiet or not distributed.is_main(),
                               self.autocast, self.channels_last)
        loss = distributed.mean_over_ranks(loss)  # the epoch's loss over the whole training set
        distributed.sync_buffers(self.ddp)  # every rank ends the epoch with rank 0's BatchNorm statistics
        self.sched.step()
        self.epoch_seconds.append(time.perf_counter() - t0)
        return {"epoch": self.epochs_done, "loss": loss, "seconds": self.epoch_seconds[-1]}


def train_plain(model: nn.Module, images: np.ndarray, labels: np.ndarray, cfg: TrainConfig,
                evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
                quiet: bool = False) -> list[dict]:
    """Ordinary cross-entropy training; ``evaluate(model)`` is called after every epoch (metrics into history)."""
    trainer = PlainTrainer(model, images, labels, cfg)
    history = []
    for _ in range(cfg.epochs):
        rec = trainer.epoch(quiet)
        if evaluate is not None:
            rec.update(evaluate(model))
        log.info("epoch %d: %s", rec["epoch"], {k: round(v, 4) for k, v in rec.items()})
        history.append(rec)
    return history
