"""A tiny classifier trained on the digits fixture, shared by the attack tests (trains in a few seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread per attack test: these models are tiny, and a busy shared CPU punishes a second thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits_model(digits_train):
    """A width-8 SmallCNN trained for 10 epochs on the 8x8 digits (~98 % test accuracy), in eval mode on the CPU.

    Trained with one thread: on a shared 2-core machine two threads can be 20x slower for a model this small.
    """
    from abl_guard.abl.models import SmallCNN
    from abl_guard.abl.train import ArrayBatches, make_optimizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        spec = digits_train.spec
        model = SmallCNN(1, 10, 8, width=8, mean=spec.mean, std=spec.std)
        batches = ArrayBatches(digits_train.images, digits_train.labels, torch.device("cpu"), 64, seed=0)
        opt = make_optimizer(model, 0.05, 0.9, 5e-4)
        model.train()
        for _ in range(10):
            for x, y, _ in batches:
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.zero_grad(set_to_none=True)
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def make_data(n: int = 200, h: int = 10, w: int = 10, c: int = 1, k: int = 10, seed: int = 0):
    """Random uint8 images (values kept off the extremes so additive triggers are visible) and labels."""
    r = np.random.default_rng(seed)
    return r.integers(30, 200, (n, h, w, c), dtype=np.uint8), r.integers(0, k, n).astype(np.int64)


@pytest.fixture
def make_images():
    return make_data
