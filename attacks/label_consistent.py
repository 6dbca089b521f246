"""Label-consistent backdoor (Turner, Tsipras & Madry, 2019, "Label-Consistent Backdoor Attacks").

Clean-label: only target-class training images are poisoned and they keep their (correct) labels. Each one is first
made *hard to classify* with a bounded adversarial perturbation computed by PGD against a clean model (untargeted,
away from its true class), so the victim cannot fit it from its content and learns the trigger instead; then the
trigger is stamped. Test-time trigger: the trigger alone.

Following the official code (MadryLab/label-consistent-backdoor-code, ``poison_attack.py``):

* trigger ``"all-corners"`` (default; the paper's variant that survives flips/crops) or ``"bottom-right"``: 3x3
  black-and-white checkerboards in the corners (the left corners mirror the right ones, as in the code);
* ``amplitude=None``: the trigger overwrites the pixels (0 / 255, the code's default); a float in (0, 1] adds
  ``±amplitude * 255`` instead (the paper's reduced-visibility triggers, e.g. 16/255, 32/255, 64/255), clipped.

Perturbation: PGD (see :func:`attacks.adversarial.pgd`) with ``norm="linf"``, ``eps = 16/255`` (the middle of the
paper's ℓ∞ budgets 8, 16, 32 / 255), ``steps = 100``, ``step_size = 2.5 * eps / steps``, no random start;
``norm="l2"`` with e.g. ``eps = 300/255`` reproduces the official config's default (``two_300``, an ℓ2 radius of 300
on the 0–255 scale). Perturbed images are quantised to uint8 inside the budget (:func:`adversarial.quantize`).

Deviations: the paper attacks an *adversarially trained* model (whose perturbations look more semantic); we attack
whatever clean model is given (the issue's setting; pass a robust model for the paper's). The GAN-interpolation
variant is not implemented. ``rate`` is a fraction of the whole training set, capped by the number of target-class
images (the official code's ``poisoning_proportion`` is a fraction of the target class: rate = proportion / K).

``model`` is an ``nn.Module`` / callable (float NCHW [0, 1] -> logits) or a checkpoint path together with
``model_loader`` (attacks/ does not import abl/; the CLI and ``abl.experiment`` supply the loader).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from torch import nn

from ._common import ModelLoader, describe_model, resolve_model, to_uint8
from .adversarial import pgd, quantize
from .base import BackdoorAttack, check_images, register

log = logging.getLogger(__name__)

#: the official code's bottom-right 3x3 checkerboard (+1 = white, -1 = black), rows top to bottom
_BOTTOM_RIGHT = np.array([[-1, -1, 1], [-1, 1, -1], [1, -1, 1]], dtype=np.float64)
TRIGGERS = ("all-corners", "bottom-right")


def corner_trigger(height: int, width: int, trigger: str = "all-corners") -> np.ndarray:
    """A ``(H, W)`` map with +1 / -1 at the trigger pixels and 0 elsewhere."""
    if height < 3 or width < 3:
        raise ValueError(f"a 3x3 corner trigger needs images of at least 3x3, got {height}x{width}")
    m = np.zeros((height, width), np.float64)
    m[-3:, -3:] = _BOTTOM_RIGHT
    if trigger == "all-corners":
        m[:3, -3:] = _BOTTOM_RIGHT
        m[:3, :3] = _BOTTOM_RIGHT[:, ::-1]
        m[-3:, :3] = _BOTTOM_RIGHT[:, ::-1]
    elif trigger != "bottom-right":
        raise ValueError(f"trigger must be one of {TRIGGERS}, got {trigger!r}")
    return m


@register
class LabelConsistent(BackdoorAttack):
    """Adversarially perturbed target-class images + corner trigger, labels unchanged."""

    name = "label-consistent"
    clean_label = True

    def __init__(
        self,
        target: int = 0,
        rate: float = 0.1,
        seed: int = 0,
        mode: str = "all2one",
        model: nn.Module | Callable | str | None = None,
        model_loader: ModelLoader | None = None,
        eps: float = 16.0 / 255.0,
        norm: str = "linf",
        steps: int = 100,
        step_size: float | None = None,
        trigger: str = "all-corners",
        amplitude: float | None = None,
        batch_size: int = 256,
    ) -> None:
        super().__init__(target, rate, seed, mode)
        if model is None:
            raise ValueError("label-consistent needs model= (a clean model, or a checkpoint path: "
                             "--attack-param model=PATH)")
        if trigger not in TRIGGERS:
            raise ValueError(f"trigger must be one of {TRIGGERS}, got {trigger!r}")
        if amplitude is not None and not 0 < amplitude <= 1:
            raise ValueError("amplitude must be in (0, 1] (or None for full-strength pixels)")
        if norm not in ("linf", "l2") or eps < 0:
            raise ValueError("norm must be 'linf' or 'l2' and eps >= 0")
        self._model_source = model
        self.model = resolve_model(model, model_loader, "label-consistent")
        self.eps = float(eps)
        self.norm = norm
        self.steps = int(steps)
        self.step_size = step_size
        self.trigger = trigger
        self.amplitude = None if amplitude is None else float(amplitude)
        self.batch_size = int(batch_size)
        #: statistics of the last perturbation (how many poisons the clean model now misclassifies)
        self.last_perturbation: dict[str, Any] | None = None

    def apply_trigger(self, images: np.ndarray) -> np.ndarray:
        check_images(images)
        m = corner_trigger(*images.shape[1:3], self.trigger)[None, :, :, None]
        x = images.astype(np.float64)
        if self.amplitude is None:
            x = np.where(m > 0, 255.0, np.where(m < 0, 0.0, x))
        else:
            x = x + m * self.amplitude * 255.0
        return to_uint8(x)

    def perturb(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """The PGD "hard" versions of ``images`` (uint8, inside the budget), before the trigger."""
        check_images(images)
        if self.eps == 0 or self.steps == 0 or len(images) == 0:
            return images.copy()
        res = pgd(self.model, images, labels, eps=self.eps, steps=self.steps, step_size=self.step_size,
                  random_start=False, norm=self.norm, batch_size=self.batch_size, seed=self.seed)
        # L∞: round inside the ball; L2: rounding moves each pixel by <= 0.5/255 and is not re-projected
        adv = quantize(res.images, images, self.eps) if self.norm == "linf" else quantize(res.images)
        self.last_perturbation = {"n": len(images), "clean_model_accuracy_before": float(res.clean_correct.mean()),
                                  "clean_model_accuracy_after": float((res.adv_pred == res.labels).mean())}
        log.info("label-consistent: PGD made %d target-class images hard: surrogate accuracy %.3f -> %.3f",
                 len(images), self.last_perturbation["clean_model_accuracy_before"],
                 self.last_perturbation["clean_model_accuracy_after"])
        return adv

    def poison_images(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return self.apply_trigger(self.perturb(images, labels))

    def params(self) -> dict[str, Any]:
        return {**super().params(), "model": describe_model(self.model, self._model_source), "eps": self.eps,
                "norm": self.norm, "steps": self.steps, "step_size": self.step_size, "trigger": self.trigger,
                "amplitude": self.amplitude}
