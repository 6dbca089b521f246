"""Process-group plumbing for training under ``torchrun`` (DistributedDataParallel, Li et al.'s ABL included).

``torchrun --nproc_per_node N -m abl_guard.cli train ...`` starts N processes that find each other through the
environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``);
:func:`distributed` joins them into one process group — NCCL when training on CUDA (each rank on its local GPU),
gloo on CPU — with a timeout, so a rank that dies or stalls makes the others fail with an error instead of waiting
forever. Without those variables (or with ``WORLD_SIZE=1``) everything here is a no-op and training is single-process.

What the training code asks of this module:

* a shard of the examples per rank and epoch (:func:`shard`, PyTorch's ``DistributedSampler``: one seeded
  permutation cut round-robin, padded to equal length) — the union of the ranks' j-th batches is the j-th batch of
  the single-process run with the same global batch size, so N processes train the same model as one (up to float
  reduction order, and BatchNorm, whose batch statistics are per rank on CPU where PyTorch has no SyncBatchNorm);
* per-example values computed on shards and gathered into one whole-training-set array on every rank
  (:func:`gather_per_example`: ABL's isolation ranks the whole set);
* decisions made once and broadcast from rank 0 (:func:`broadcast_array`, :func:`broadcast_scalar`), so every rank
  unlearns the same examples and the held-out guard stops or keeps the same epoch everywhere;
* identical models on every rank after an epoch (:func:`sync_buffers`: BatchNorm running statistics), and files
  written by rank 0 only (:func:`is_main`).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

#: seconds a collective (and joining the group) may wait for the other ranks before it fails
DEFAULT_TIMEOUT_S = 600.0
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """The torchrun environment is malformed, or the process group cannot be formed."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in the group."""

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def torchrun_env(environ: dict[str, str] | None = None) -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from torchrun's variables, or None outside torchrun (no ``WORLD_SIZE``).
    Raises :class:`DistributedError` when they are present but malformed or incomplete."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return None
    missing = [k for k in _ENV if k not in env and k != "LOCAL_RANK"]
    if missing:
        raise DistributedError(f"WORLD_SIZE is set but {', '.join(missing)} are not: start with torchrun")
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", env["RANK"]))
    except ValueError as e:
        raise DistributedError(f"malformed torchrun environment: {e}") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise DistributedError(f"malformed torchrun environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}")
    return rank, world, local


def current() -> DistContext | None:
    """The group this process has joined (of any size: a group of one trains like N ranks do), else None."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    rank = dist.get_rank()
    return DistContext(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)), dist.get_backend())


def is_main() -> bool:
    """Rank 0, or a single process: the one that writes files and prints."""
    ctx = current()
    return ctx is None or ctx.is_main


def wants_cuda(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def init_process_group(rank: int, world_size: int, local_rank: int, device: str = "auto",
                       timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """Join the group (``MASTER_ADDR`` / ``MASTER_PORT`` from the environment): NCCL and ``cuda:LOCAL_RANK`` when
    ``device`` is CUDA (``auto`` with a GPU), gloo otherwise."""
    backend = "nccl" if wants_cuda(device) else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise DistributedError("--device cuda requested under torchrun but CUDA is not available")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    try:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as e:  # noqa: BLE001 - store timeouts, refused connections: one message
        raise DistributedError(f"cannot join the process group as rank {rank} of {world_size} ({backend}): "
                               f"{type(e).__name__}: {e}") from e
    log.info("rank %d of %d joined the %s process group", rank, world_size, backend)
    return DistContext(rank, world_size, local_rank, backend)


@contextlib.contextmanager
def distributed(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[DistContext | None]:
    """Join the group torchrun describes for the duration of the block (None, and nothing done, outside torchrun);
    leaves it on exit, also on an error. ``--nproc_per_node 1`` forms a group of one, which samples and trains
    exactly like N ranks with the same global batch."""
    env = torchrun_env()
    if env is None or (dist.is_available() and dist.is_initialized()):
        yield current()
        return
    ctx = init_process_group(*env, device=device, timeout_s=timeout_s)
    try:
        yield ctx
        # a normal exit waits for every rank before any tears the group down: a rank leaving while gloo still served
        # another's last collective aborted the process at teardown ("terminate called without an active exception",
        # one CI run of the DDP tests); an error skips this and leaves at once
        with contextlib.suppress(Exception):
            dist.barrier()
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """``cuda`` without an index becomes this rank's GPU under torchrun; anything else is returned unchanged."""
    ctx = current()
    if ctx is not None and device.type == "cuda" and device.index is None:
        return torch.device("cuda", ctx.local_rank % torch.cuda.device_count())
    return device


def per_rank_batch(batch_size: int) -> int:
    """The batch each rank trains on: the global ``batch_size`` split evenly (hyper-parameters keep their meaning
    whatever the number of processes). Raises ``ValueError`` when it does not split."""
    ctx = current()
    if ctx is None:
        return batch_size
    if batch_size % ctx.world_size:
        raise ValueError(f"--batch-size {batch_size} is the global batch; it must be a multiple of the "
                         f"{ctx.world_size} processes")
    return batch_size // ctx.world_size


class _Range:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def shard(n: int, epoch: int, seed: int, shuffle: bool = True) -> np.ndarray:
    """This rank's positions in ``range(n)`` for ``epoch`` (``DistributedSampler``: every rank gets the same count;
    the last positions repeat the first when ``n`` does not split). A single process gets the whole permutation."""
    from torch.utils.data import DistributedSampler

    ctx = current()
    world, rank = (1, 0) if ctx is None else (ctx.world_size, ctx.rank)
    sampler = DistributedSampler(_Range(n), num_replicas=world, rank=rank, shuffle=shuffle, seed=seed,
                                 drop_last=False)
    sampler.set_epoch(epoch)
    return np.fromiter(iter(sampler), np.int64, count=len(sampler))


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` (SyncBatchNorm on CUDA); the model itself outside a group."""
    ctx = current()
    if ctx is None:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[device.index])
    return DistributedDataParallel(model)


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def sync_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank, so all ranks hold the same model."""
    if current() is None:
        return
    with torch.no_grad():
        for b in unwrap(model).buffers():
            dist.broadcast(b, 0)


def _device_for_collectives() -> torch.device:
    ctx = current()
    return torch.device("cuda", torch.cuda.current_device()) if ctx and ctx.backend == "nccl" else torch.device("cpu")


def gather_per_example(values: np.ndarray, positions: np.ndarray, n: int) -> np.ndarray:
    """The whole-set array of per-example ``values`` computed by each rank at its ``positions`` (from
    :func:`shard`); identical on every rank. Positions a rank saw twice (the sampler's padding) hold the same value."""
    values = np.asarray(values, np.float64)
    ctx = current()
    if ctx is None:
        out = np.full(n, np.nan)
        out[positions] = values
        return out
    dev = _device_for_collectives()
    v = torch.as_tensor(values, device=dev)
    p = torch.as_tensor(np.asarray(positions, np.int64), device=dev)
    vs = [torch.empty_like(v) for _ in range(ctx.world_size)]
    ps = [torch.empty_like(p) for _ in range(ctx.world_size)]
    dist.all_gather(vs, v)
    dist.all_gather(ps, p)
    out = np.full(n, np.nan)
    for vv, pp in zip(vs, ps):
        out[pp.cpu().numpy()] = vv.cpu().numpy()
    if np.isnan(out).any():
        raise DistributedError(f"{int(np.isnan(out).sum())} examples were on no rank's shard")
    return out


def broadcast_array(arr: np.ndarray | None, dtype: np.dtype | type = np.int64) -> np.ndarray:
    """Rank 0's 1-D ``arr`` on every rank (other ranks may pass None): one decision, made once."""
    if current() is None:
        return np.asarray(arr, dtype)
    dev = _device_for_collectives()
    n = torch.tensor([0 if arr is None else len(arr)], dtype=torch.int64, device=dev)
    dist.broadcast(n, 0)
    buf = torch.empty(int(n.item()), dtype=torch.float64 if np.dtype(dtype).kind == "f" else torch.int64, device=dev)
    if is_main():
        buf.copy_(torch.as_tensor(np.asarray(arr, dtype)))
    dist.broadcast(buf, 0)
    return buf.cpu().numpy().astype(dtype)


def broadcast_scalar(value: float) -> float:
    """Rank 0's ``value`` on every rank."""
    return float(broadcast_array(np.array([value], np.float64), np.float64)[0])


def mean_over_ranks(value: float) -> float:
    """The mean of ``value`` over the ranks (a per-rank mean over equal shards -> the global mean)."""
    ctx = current()
    if ctx is None:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_device_for_collectives())
    dist.all_reduce(t)
    return float(t.item()) / ctx.world_size


def barrier() -> None:
    if current() is not None:
        dist.barrier()
