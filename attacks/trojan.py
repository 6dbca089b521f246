"""Trojan-style trigger (Liu et al., NDSS 2018, "Trojaning attack on neural networks", TrojanNN).

TrojanNN stamps a trigger through a fixed mask — a *square* patch or a *watermark*-shaped logo — and the pixel
values inside the mask are optimised so that chosen internal neurons fire strongly. Here:

* ``mask="watermark"`` (default): a logo-like stroke mask (a ring crossed by a bar, a "theta") drawn procedurally at
  the image's size, about 60 % of the shorter side wide and centred; ``mask="square"``: a square of
  ``square_frac`` (0.25) of the shorter side in the bottom-right corner; or an explicit 0/1 (or [0, 1]) array.
* the trigger is ``x' = (1 - m) * x + m * pattern``; ``pattern`` defaults to uniform-random values drawn from
  ``pattern_seed`` (TrojanNN's random initialisation).
* :meth:`Trojan.optimize_trigger` is TrojanNN's trigger generation: pick the ``num_neurons`` units of a layer with
  the largest summed absolute incoming weights and run gradient descent on the masked pixels (of a trigger-only
  image, zeros elsewhere) to drive their activation to ``target_value``. With ``model=`` (a module, or a checkpoint
  path plus ``model_loader``) and ``layer=`` it runs lazily, once per image shape, on first use, so
  ``--attack-param model=PATH layer=fc1`` works from the CLI.

Deviations: TrojanNN's real masks are image files (an Apple-logo-like watermark, a square) and the attack retrains
the victim model itself; here the masks are drawn procedurally for any image size and the attack is data poisoning
(dirty-label, trigger + target label), as in ABL's and BackdoorBench's Trojan settings. Adam (lr 0.1) replaces the
paper's plain gradient descent in the optimisation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ._common import (
    ModelLoader,
    describe_model,
    fit_pattern,
    load_pattern,
    model_device,
    resolve_model,
    to_uint8,
)
from .base import BackdoorAttack, check_images, register

log = logging.getLogger(__name__)

MASKS = ("watermark", "square")


def watermark_mask(height: int, width: int) -> np.ndarray:
    """A logo-like 0/1 mask: a ring with a horizontal bar through it, centred, strokes >= 1 pixel."""
    side = min(height, width)
    cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
    yy, xx = np.mgrid[:height, :width].astype(np.float64)
    r = np.hypot(yy - cy, xx - cx)
    outer = 0.30 * side
    stroke = max(1.0, 0.07 * side)
    ring = (r <= outer) & (r > outer - stroke)
    bar = (np.abs(yy - cy) <= stroke / 2.0) & (np.abs(xx - cx) <= outer - stroke / 2.0)
    return (ring | bar).astype(np.float64)


def square_mask(height: int, width: int, frac: float = 0.25) -> np.ndarray:
    side = max(1, int(round(frac * min(height, width))))
    m = np.zeros((height, width), np.float64)
    m[height - side :, width - side :] = 1.0
    return m


def strongest_neurons(layer: nn.Module, n: int) -> list[int]:
    """TrojanNN's neuron selection: units with the largest sum of absolute incoming weights."""
    w = getattr(layer, "weight", None)
    if not isinstance(w, torch.Tensor) or w.ndim < 2:
        raise ValueError(f"layer {type(layer).__name__} has no (out, in, ...) weight; use a Linear or Conv layer")
    score = w.detach().abs().flatten(1).sum(1)
    return [int(i) for i in torch.argsort(score, descending=True)[:n]]


@register
class Trojan(BackdoorAttack):
    """Masked trigger (watermark or square); optionally optimised against a model's neurons."""

    name = "trojan"

    def __init__(
        self,
        target: int = 0,
        rate: float = 0.1,
        seed: int = 0,
        mode: str = "all2one",
        mask: str | np.ndarray = "watermark",
        square_frac: float = 0.25,
        pattern: str | os.PathLike | np.ndarray = "random",
        pattern_seed: int | None = None,
        model: nn.Module | Callable | str | None = None,
        model_loader: ModelLoader | None = None,
        layer: str | None = None,
        num_neurons: int = 1,
        target_value: float = 100.0,
        steps: int = 1000,
        lr: float = 0.1,
    ) -> None:
        super().__init__(target, rate, seed, mode)
        if isinstance(mask, str):
            if mask not in MASKS:
                raise ValueError(f"mask must be one of {MASKS} or an array, got {mask!r}")
            self._mask: np.ndarray | None = None
            self.mask_name = mask
        else:
            m = np.asarray(mask, dtype=np.float64)
            if m.ndim != 2 or m.min() < 0 or m.max() > 1:
                raise ValueError("a custom mask must be a 2-D array with values in [0, 1]")
            self._mask, self.mask_name = m, "custom"
        if not 0 < square_frac <= 1:
            raise ValueError("square_frac must be in (0, 1]")
        self.square_frac = float(square_frac)
        self.pattern_seed = self.seed if pattern_seed is None else int(pattern_seed)
        if isinstance(pattern, str) and pattern == "random":
            self._pattern: np.ndarray | None = None
            self.pattern_name = "random"
        else:
            self._pattern = load_pattern(pattern)
            self.pattern_name = str(pattern) if not isinstance(pattern, np.ndarray) else "custom"
        #: optimised patterns per image shape (H, W, C), float64 0–255
        self._optimised: dict[tuple[int, int, int], np.ndarray] = {}
        #: the last optimisation's record (neurons, final activations), for manifests
        self.optimisation: dict[str, Any] | None = None
        self._model_source = model
        self._net = None
        if model is not None:
            if layer is None:
                raise ValueError("trojan: optimising the trigger needs layer= (a module name such as 'fc1')")
            self._net = resolve_model(model, model_loader, "trojan")
        self.layer = layer
        self.num_neurons = int(num_neurons)
        self.target_value = float(target_value)
        self.steps = int(steps)
        self.lr = float(lr)

    # ------------------------------------------------------------------------------------------- trigger

    def mask_for(self, height: int, width: int) -> np.ndarray:
        if self._mask is not None:
            if self._mask.shape == (height, width):
                return self._mask
            return fit_pattern(to_uint8(self._mask * 255), height, width, 1)[..., 0] / 255.0
        if self.mask_name == "square":
            return square_mask(height, width, self.square_frac)
        return watermark_mask(height, width)

    def pattern_for(self, height: int, width: int, channels: int) -> np.ndarray:
        key = (height, width, channels)
        if key not in self._optimised and self._net is not None:
            self.optimize_trigger(self._net, self.layer, (channels, height, width), self.num_neurons,
                                  self.target_value, self.steps, self.lr)
        if key in self._optimised:
            return self._optimised[key]
        return self._initial_pattern(height, width, channels)

    def _initial_pattern(self, height: int, width: int, channels: int) -> np.ndarray:
        if self._pattern is None:
            rng = np.random.default_rng([self.pattern_seed, height, width, channels])
            return rng.integers(0, 256, (height, width, channels)).astype(np.float64)
        return fit_pattern(self._pattern, height, width, channels)

    def apply_trigger(self, images: np.ndarray) -> np.ndarray:
        check_images(images)
        _, h, w, c = images.shape
        m = self.mask_for(h, w)[None, :, :, None]
        return to_uint8((1.0 - m) * images.astype(np.float64) + m * self.pattern_for(h, w, c))

    # ------------------------------------------------------------------------------------------- TrojanNN

    def optimize_trigger(
        self,
        model: nn.Module,
        layer: str | nn.Module,
        input_shape: tuple[int, int, int],
        num_neurons: int = 1,
        target_value: float = 100.0,
        steps: int = 1000,
        lr: float = 0.1,
    ) -> dict[str, Any]:
        """Optimise the masked pattern for images of ``input_shape`` ``(C, H, W)``; returns a record.

        ``model`` maps float NCHW [0, 1] to logits; ``layer`` is one of its modules or the module's dotted name.
        The pattern is then used for every image of that shape. With ``model=`` in the constructor this runs
        lazily, once per image shape, on first use.
        """
        module = model.get_submodule(layer) if isinstance(layer, str) else layer
        c, h, w = (int(v) for v in input_shape)
        neurons = strongest_neurons(module, num_neurons)
        device = model_device(model)
        mask = torch.as_tensor(self.mask_for(h, w), dtype=torch.float32, device=device)[None, None]
        start = torch.as_tensor(self._initial_pattern(h, w, c) / 255.0, dtype=torch.float32, device=device)
        pattern = start.permute(2, 0, 1)[None].clone().requires_grad_(True)
        acts: list[torch.Tensor] = []
        hook = module.register_forward_hook(lambda _m, _i, out: acts.append(out))
        was_training = model.training
        model.eval()
        opt = torch.optim.Adam([pattern], lr=lr)
        try:
            for _ in range(int(steps)):
                acts.clear()
                model(pattern * mask)
                a = acts[0]
                a = a.flatten(2).mean(2) if a.ndim > 2 else a  # conv channels: mean over space
                act = a[0, neurons]
                loss = ((act - target_value) ** 2).sum()
                # gradient w.r.t. the pattern only: the model's own .grad buffers stay untouched
                (pattern.grad,) = torch.autograd.grad(loss, pattern)
                opt.step()
                with torch.no_grad():
                    pattern.clamp_(0, 1)
            with torch.no_grad():
                acts.clear()
                model(pattern * mask)
                a = acts[0]
                final = (a.flatten(2).mean(2) if a.ndim > 2 else a)[0, neurons].cpu().tolist()
        finally:
            hook.remove()
            model.train(was_training)
        pat = pattern.detach()[0].permute(1, 2, 0).cpu().numpy().astype(np.float64) * 255.0
        self._optimised[(h, w, c)] = np.rint(pat).clip(0, 255)
        self.optimisation = {"layer": layer if isinstance(layer, str) else type(layer).__name__,
                             "neurons": neurons, "activations": final, "target_value": target_value,
                             "steps": int(steps), "lr": lr}
        log.info("trojan: optimised trigger for neurons %s of %s: activations %s", neurons,
                 self.optimisation["layer"], [round(v, 2) for v in final])
        return self.optimisation

    def params(self) -> dict[str, Any]:
        out = {**super().params(), "mask": self.mask_name, "square_frac": self.square_frac,
               "pattern": self.pattern_name, "pattern_seed": self.pattern_seed}
        if self._model_source is not None:
            out.update(model=describe_model(self._net, self._model_source), layer=self.layer,
                       num_neurons=self.num_neurons, target_value=self.target_value, steps=self.steps, lr=self.lr)
        return out
