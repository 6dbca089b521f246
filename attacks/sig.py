"""SIG (Barni, Kallas & Tondi, ICIP 2019, "A new backdoor attack in CNNs by training set corruption without label
poisoning").

Clean-label: only target-class training images are poisoned and their labels are kept. The trigger is an additive
horizontal sinusoidal signal ``v(i, j) = delta * sin(2 * pi * j * f / m)`` (``j`` the column, ``m`` the image width),
``delta = 20`` on the 0–255 scale and ``f = 6`` — the paper's and BackdoorBench's defaults — added to every channel
and clipped to [0, 255]. The paper's ramp signal ``v(i, j) = j * delta / m`` is available as ``signal="ramp"``.

Choices: ``test_delta`` (default = ``delta``) may differ from the training amplitude, as in the paper's experiments.
ABL's own code instead blends a stored sinusoid in with alpha = 0.2; we follow the paper (additive). The poisoning
``rate`` is a fraction of the whole training set, capped by the number of target-class images (see
:meth:`BackdoorAttack.select_indices`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._common import to_uint8
from .base import BackdoorAttack, check_images, register

SIGNALS = ("sine", "ramp")


@register
class SIG(BackdoorAttack):
    """Additive sinusoidal (or ramp) signal; clean-label, all-to-one only."""

    name = "sig"
    clean_label = True

    def __init__(
        self,
        target: int = 0,
        rate: float = 0.1,
        seed: int = 0,
        mode: str = "all2one",
        delta: float = 20.0,
        frequency: float = 6.0,
        test_delta: float | None = None,
        signal: str = "sine",
    ) -> None:
        super().__init__(target, rate, seed, mode)
        if signal not in SIGNALS:
            raise ValueError(f"signal must be one of {SIGNALS}, got {signal!r}")
        if delta <= 0 or (test_delta is not None and test_delta <= 0):
            raise ValueError("delta must be positive")
        self.delta = float(delta)
        self.frequency = float(frequency)
        self.test_delta = self.delta if test_delta is None else float(test_delta)
        self.signal = signal

    def signal_for(self, width: int, delta: float) -> np.ndarray:
        """The 1-D signal along the columns, float64 on the 0–255 scale (constant down each column)."""
        j = np.arange(width, dtype=np.float64)
        if self.signal == "sine":
            return delta * np.sin(2.0 * np.pi * j * self.frequency / width)
        return delta * j / width

    def add_signal(self, images: np.ndarray, delta: float) -> np.ndarray:
        check_images(images)
        v = self.signal_for(images.shape[2], delta)[None, None, :, None]
        return to_uint8(images.astype(np.float64) + v)

    def apply_trigger(self, images: np.ndarray) -> np.ndarray:
        return self.add_signal(images, self.test_delta)

    def poison_images(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return self.add_signal(images, self.delta)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "delta": self.delta, "frequency": self.frequency, "test_delta": self.test_delta,
                "signal": self.signal}
