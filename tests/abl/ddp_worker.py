"""One rank of the DDP tests, started the way torchrun starts it (RANK, WORLD_SIZE, MASTER_ADDR, ... in the
environment): ``python ddp_worker.py MODE OUT_DIR [TIMEOUT_S]``; MODE is plain, abl, both (the two in one start-up)
or fail (rank 1 raises while rank 0 waits in a collective). Rank 0 writes what the test compares to ``OUT_DIR``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from abl_guard.abl import distributed
from abl_guard.abl.abl import ABLConfig, run_abl
from abl_guard.abl.data import load_dataset
from abl_guard.abl.run_config import TrainConfig
from abl_guard.abl.train import set_seed, train_plain
from abl_guard.attacks import make_attack


def mlp(seed: int) -> nn.Module:
    """BatchNorm-free, so that N ranks and one process train the same function (CPU has no SyncBatchNorm)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def data(n: int = 640):
    train = load_dataset("digits", "train")
    p = make_attack("badnets", target=0, rate=0.1, seed=0).poison(train.images[:n], train.labels[:n], 10)
    return p.images, p.labels, p.poison_indices


def train(mode: str, ctx: distributed.DistContext, out: Path) -> None:
    """Plain training or ABL of the BatchNorm-free model; rank 0 saves ``{mode}_model.npz`` and ``{mode}.json``."""
    set_seed(0)
    images, labels, poison = data()
    model = mlp(0)
    cfg = TrainConfig(epochs=3 if mode == "plain" else 4, lr=0.05, batch_size=64, device="cpu", seed=0)
    if mode == "plain":
        history = train_plain(model, images, labels, cfg, quiet=True)
        result = {"world": ctx.world_size, "loss": [h["loss"] for h in history]}
    else:
        # unlearn mode compares models across world sizes (retrain mode's fresh model amplifies the float noise of an
        # uneven last batch, so it compares the isolated and removed sets only)
        abl = ABLConfig.from_train(cfg, {"mode": "unlearn" if mode == "abl" else "retrain", "isolation_epochs": 2,
                                         "isolation_ratio": 0.05, "holdout": 0.05, "unlearning_epochs": 2,
                                         "unlearning_lr": 0.01, "eval_every": 0,
                                         # the clean-stage recheck runs in one process only (torchrun: not run,
                                         # and said so), so the sets compared are the removal's
                                         **({"expansion_input_separation": 0.0, "expansion_recheck_epoch": 0}
                                            if mode == "retrain" else {})})
        res = run_abl(model, images, labels, abl, out_dir=out / f"rank{ctx.rank}", poison_indices=poison, quiet=True)
        un = res.report["unlearning"]
        result = {"world": ctx.world_size, "loss": [h["loss"] for h in res.history],
                  "isolated": res.isolated.tolist(), "removed": res.removed.tolist(),
                  "selected_epoch": un["selected_epoch"], "rejected": un["rejected_epochs"],
                  "files": sorted(p.name for p in (out / f"rank{ctx.rank}").iterdir())}
    if distributed.is_main():
        np.savez(out / f"{mode}_model.npz", **{k: v.numpy() for k, v in model.state_dict().items()})
        (out / f"{mode}.json").write_text(json.dumps(result))


def main(mode: str, out: Path, timeout_s: float) -> None:
    torch.set_num_threads(1)
    with distributed.distributed(device="cpu", timeout_s=timeout_s) as ctx:
        assert ctx is not None, "start with torchrun's environment"
        if mode == "fail":
            if ctx.rank == 1:
                raise RuntimeError("injected failure on rank 1")
            distributed.gather_per_example(np.zeros(3), np.arange(3), 3)  # waits for rank 1, which is gone
            return
        for m in ("plain", "abl", "retrain") if mode == "both" else (mode,):
            train(m, ctx, out)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 60.0)
