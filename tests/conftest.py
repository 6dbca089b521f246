"""Shared fixtures: tiny data that trains in seconds (scikit-learn's 8x8 digits ship with the package)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits_train():
    from abl.data import load_dataset

    return load_dataset("digits", "train")


@pytest.fixture(scope="session")
def digits_test():
    from abl.data import load_dataset

    return load_dataset("digits", "test")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def random_images(n: int = 16, h: int = 12, w: int = 12, c: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)
