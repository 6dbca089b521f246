"""The poisoning interface every backdoor attack implements.

Attacks work on plain arrays: ``uint8`` images ``(N, H, W, C)`` and ``int64`` labels, so they serve training here and
users' own pipelines alike. An attack is described by three things:

* :meth:`BackdoorAttack.apply_trigger` — how a clean image becomes a triggered one (the test-time trigger);
* :meth:`BackdoorAttack.select_indices` — which training examples are poisoned (dirty-label attacks draw from
  non-target classes; clean-label attacks draw from the target class only and keep labels);
* :meth:`BackdoorAttack.poison_images` — what happens to the selected training images (by default the trigger;
  attacks such as WaNet's noise mode or label-consistent perturbations override it).

:meth:`BackdoorAttack.poison` and :meth:`BackdoorAttack.triggered` are shared, so callers never change when a new
attack is added: ``make_attack(name, **params).poison(images, labels, num_classes)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np


@dataclass
class PoisonedData:
    """A poisoned training set and the indices that were poisoned (sorted, into the returned arrays)."""

    images: np.ndarray
    labels: np.ndarray
    poison_indices: np.ndarray


@dataclass
class TriggeredSet:
    """Triggered test images for attack-success-rate measurement.

    ``labels`` are the attacker's intended labels, ``source_labels`` the true ones and ``indices`` the positions in
    the clean set the images came from. For all-to-one attacks target-class images are excluded.
    """

    images: np.ndarray
    labels: np.ndarray
    source_labels: np.ndarray
    indices: np.ndarray


def check_images(images: np.ndarray) -> np.ndarray:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            f"images must be a uint8 array (N, H, W, C); got {getattr(images, 'dtype', type(images))} "
            f"{getattr(images, 'shape', '')}"
        )
    return images


class BackdoorAttack(ABC):
    """Base class: poisoning rate, target class, seed and all-to-one / all-to-all mode."""

    name: ClassVar[str]
    clean_label: ClassVar[bool] = False

    def __init__(self, target: int = 0, rate: float = 0.1, seed: int = 0, mode: str = "all2one") -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"poisoning rate must be in [0, 1], got {rate}")
        if mode not in ("all2one", "all2all"):
            raise ValueError(f"mode must be 'all2one' or 'all2all', got {mode!r}")
        if self.clean_label and mode != "all2one":
            raise ValueError(f"{self.name} is a clean-label attack and only supports all2one")
        self.target = int(target)
        self.rate = float(rate)
        self.seed = int(seed)
        self.mode = mode

    # --------------------------------------------------------------------------------------- to override

    @abstractmethod
    def apply_trigger(self, images: np.ndarray) -> np.ndarray:
        """Return triggered copies of a uint8 ``(N, H, W, C)`` batch (the input is never modified)."""

    def poison_images(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Transform the selected training images; the default stamps the test-time trigger."""
        return self.apply_trigger(images)

    def params(self) -> dict[str, Any]:
        """JSON-able parameters, enough to rebuild the attack with :func:`make_attack`."""
        return {"target": self.target, "rate": self.rate, "seed": self.seed, "mode": self.mode}

    # --------------------------------------------------------------------------------------- shared

    def target_labels(self, labels: np.ndarray, num_classes: int) -> np.ndarray:
        labels = np.asarray(labels, dtype=np.int64)
        if self.mode == "all2all":
            return (labels + 1) % num_classes
        return np.full_like(labels, self.target)

    def _eligible(self, labels: np.ndarray) -> np.ndarray:
        if self.clean_label:
            return np.flatnonzero(labels == self.target)
        if self.mode == "all2one":
            return np.flatnonzero(labels != self.target)
        return np.arange(len(labels))

    def select_indices(self, labels: np.ndarray) -> np.ndarray:
        """``round(rate * N)`` indices (N = whole set), drawn from the eligible examples, sorted.

        For clean-label attacks the count is capped by the number of target-class examples.
        """
        labels = np.asarray(labels)
        eligible = self._eligible(labels)
        n = min(int(round(self.rate * len(labels))), len(eligible))
        rng = np.random.default_rng(self.seed)
        return np.sort(rng.choice(eligible, size=n, replace=False)) if n else np.zeros(0, np.int64)

    def poison(self, images: np.ndarray, labels: np.ndarray, num_classes: int) -> PoisonedData:
        """Poison a training set; deterministic given the seed."""
        check_images(images)
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (len(images),):
            raise ValueError(f"labels shape {labels.shape} does not match {len(images)} images")
        idx = self.select_indices(labels)
        out_images = images.copy()
        out_labels = labels.copy()
        if len(idx):
            out_images[idx] = self.poison_images(images[idx], labels[idx])
            if not self.clean_label:
                out_labels[idx] = self.target_labels(labels[idx], num_classes)
        return PoisonedData(out_images, out_labels, idx.astype(np.int64))

    def triggered(self, images: np.ndarray, labels: np.ndarray, num_classes: int) -> TriggeredSet:
        """The ASR set: triggered test images (non-target classes only for all-to-one)."""
        check_images(images)
        labels = np.asarray(labels, dtype=np.int64)
        idx = np.flatnonzero(labels != self.target) if self.mode == "all2one" else np.arange(len(labels))
        return TriggeredSet(
            self.apply_trigger(images[idx]), self.target_labels(labels[idx], num_classes), labels[idx], idx
        )


REGISTRY: dict[str, type[BackdoorAttack]] = {}


def register(cls: type[BackdoorAttack]) -> type[BackdoorAttack]:
    REGISTRY[cls.name] = cls
    return cls


def make_attack(name: str, **params: Any) -> BackdoorAttack:
    """Build a registered attack by name; unknown parameters are an error, never silently ignored."""
    try:
        cls = REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; choose from {sorted(REGISTRY)}") from None
    return cls(**params)
