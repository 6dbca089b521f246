"""Training under torchrun (DDP, gloo on CPU): two ranks train what one process trains, and a failing rank is an
error rather than a hang. Ranks are started as torchrun starts them (its environment variables), on 8x8 digits."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from abl_guard.abl import distributed

WORKER = Path(__file__).with_name("ddp_worker.py")
#: two ranks vs one: the same batches and averaged gradients, summed in another order (float32 rounding only)
MODEL_ATOL = 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, mode: str, out: Path, timeout_s: float = 60.0) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), mode, str(out), str(timeout_s)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A group of 1 and a group of 2 ranks, started at once (torch's import overlaps), each training plain then ABL."""
    tmp = tmp_path_factory.mktemp("ddp")
    groups = []
    for w in (1, 2):
        (tmp / str(w)).mkdir()
        groups.append(launch(w, "both", tmp / str(w)))
    for procs in groups:
        logs = [p.communicate(timeout=240)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-3000:]
    return tmp


def outputs(tmp: Path, mode: str) -> list[dict]:
    return [{"result": json.loads((tmp / str(w) / f"{mode}.json").read_text()),
             "model": dict(np.load(tmp / str(w) / f"{mode}_model.npz"))} for w in (1, 2)]


def test_two_ranks_train_the_model_one_process_trains(runs):
    one, two = outputs(runs, "plain")
    assert two["result"]["world"] == 2 and one["result"]["world"] == 1
    for k, v in one["model"].items():
        np.testing.assert_allclose(two["model"][k], v, atol=MODEL_ATOL, err_msg=k)
    np.testing.assert_allclose(two["result"]["loss"], one["result"]["loss"], rtol=1e-4)
    assert one["result"]["loss"][-1] < one["result"]["loss"][0]  # it trained


def test_retrain_mode_removes_the_same_examples_on_two_ranks(runs):
    """Retrain mode under torchrun: the seed (the majority label of the isolated 5%) and its expansion are rank 0's
    on every rank and the same as one process's."""
    one, two = outputs(runs, "retrain")
    assert 0 < len(one["result"]["isolated"]) <= 30
    assert two["result"]["isolated"] == one["result"]["isolated"]
    assert set(one["result"]["isolated"]) <= set(one["result"]["removed"])
    assert two["result"]["removed"] == one["result"]["removed"]


def test_abl_isolates_and_unlearns_the_same_on_two_ranks(runs):
    """The isolation ranks the whole training set (losses gathered from both ranks), rank 0's isolated set and
    guard decisions hold everywhere, and the model after unlearning is one process's within tolerance."""
    one, two = outputs(runs, "abl")
    assert len(one["result"]["isolated"]) == 30  # 5% of the 608 examples outside the held-out split
    assert two["result"]["isolated"] == one["result"]["isolated"]
    assert two["result"]["selected_epoch"] == one["result"]["selected_epoch"]
    assert two["result"]["rejected"] == one["result"]["rejected"]
    for k, v in one["model"].items():
        np.testing.assert_allclose(two["model"][k], v, atol=MODEL_ATOL, err_msg=k)
    np.testing.assert_allclose(two["result"]["loss"], one["result"]["loss"], rtol=1e-4)
    assert "abl_state.pt" in two["result"]["files"]  # rank 0 wrote the run's files...
    assert not any((runs / "2" / "rank1").iterdir())  # ...rank 1 none


def test_a_failing_rank_is_an_error_not_a_hang(tmp_path):
    t = time.monotonic()
    procs = launch(2, "fail", tmp_path, timeout_s=10.0)
    logs = [p.communicate(timeout=90)[0] for p in procs]
    assert procs[1].returncode != 0 and "injected failure" in logs[1]
    assert procs[0].returncode != 0, logs[0][-2000:]  # rank 0 got an error from its collective, did not hang
    assert time.monotonic() - t < 60


def test_torchrun_environment_is_checked(monkeypatch):
    assert distributed.torchrun_env({}) is None
    assert distributed.torchrun_env({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}) == (
        1, 2, 1)
    with pytest.raises(distributed.DistributedError, match="MASTER_PORT"):
        distributed.torchrun_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"})
    with pytest.raises(distributed.DistributedError, match="malformed"):
        distributed.torchrun_env({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert distributed.current() is None and distributed.is_main()
    assert len(distributed.shard(10, 0, 0)) == 10  # outside a group: the whole permutation
