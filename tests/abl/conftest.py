"""Tiny poisoned data for the ABL tests: sklearn's 8x8 digits with BadNets (10%, target 0)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from abl_guard.abl.models import SmallCNN, build_model
from abl_guard.abl.train import accuracy


@dataclass
class Poisoned:
    images: np.ndarray
    labels: np.ndarray
    poison: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    trig_images: np.ndarray
    trig_labels: np.ndarray
    spec: object

    def model(self, seed: int = 0, width: int = 32) -> torch.nn.Module:
        """The project's small CNN; the knob tests use a narrower one (``width``) to stay fast."""
        torch.manual_seed(seed)
        c, h, _ = self.spec.input_shape
        if width == 32:
            return build_model("small-cnn", c, 10, h, self.spec.mean, self.spec.std)
        return SmallCNN(c, 10, h, width=width, mean=self.spec.mean, std=self.spec.std)

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        dev = next(model.parameters()).device
        return {"clean_accuracy": accuracy(model, self.test_images, self.test_labels, dev),
                "attack_success_rate": accuracy(model, self.trig_images, self.trig_labels, dev)}


@pytest.fixture(scope="session")
def poisoned_digits(digits_train, digits_test) -> Poisoned:
    from abl_guard.attacks import make_attack

    atk = make_attack("badnets", rate=0.1, target=0, seed=0)
    p = atk.poison(digits_train.images, digits_train.labels, 10)
    trig = atk.triggered(digits_test.images, digits_test.labels, 10)
    return Poisoned(p.images, p.labels, p.poison_indices, digits_test.images, digits_test.labels, trig.images,
                    trig.labels, digits_train.spec)


@pytest.fixture(scope="session")
def small_poisoned(poisoned_digits) -> Poisoned:
    """A 600-image subset (60 poisoned) for the many short knob tests."""
    rng = np.random.default_rng(1)
    idx = np.sort(rng.choice(len(poisoned_digits.labels), 600, replace=False))
    d = poisoned_digits
    return Poisoned(d.images[idx], d.labels[idx], np.flatnonzero(np.isin(idx, d.poison)), d.test_images,
                    d.test_labels, d.trig_images, d.trig_labels, d.spec)
