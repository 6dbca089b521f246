"""Adversarial examples against a trained classifier: FGSM, PGD-L∞ and Carlini–Wagner L2.

Implemented here rather than taken from torchattacks / Foolbox / ART on purpose: each attack is a few dozen lines
of torch, the project then needs no extra dependency (and none of those libraries' pins on torch/numpy), and we
control the details the evaluation depends on — seeded random starts, batching on the model's device, the
success criterion, and what happens at uint8 quantisation. The algorithms follow their papers:

* **FGSM** (Goodfellow et al., ICLR 2015): ``x + eps * sign(grad_x loss)``.
* **PGD-L∞** (Madry et al., ICLR 2018): uniform random start in the eps-ball, ``steps`` signed-gradient steps of
  ``step_size``, projection onto the ball and [0, 1] after each. Defaults: ``steps = 10``,
  ``step_size = 2.5 * eps / steps`` (Madry et al.'s rule; 2/255 for eps = 8/255). ``norm="l2"`` gives PGD-L2
  (used by the label-consistent attack's L2 variant).
* **CW-L2** (Carlini & Wagner, S&P 2017): tanh change of variables, Adam on
  ``||x' - x||² + c * max(Z_y - max_{i≠y} Z_i, -kappa)`` (targeted: ``max(max_{i≠t} Z_i - Z_t, -kappa)``),
  binary search on ``c`` per example, smallest successful perturbation kept, early abort when the loss stalls.
  Deviation: fewer iterations than the paper (5 binary-search steps x 100 iterations, initial ``c = 1``, instead of
  9 x 10,000 from ``c = 1e-3``) so it runs on a CPU; raise them through the parameters for the paper's strength.

Defaults for ``eps`` (:func:`default_eps`): 8/255 for colour images (the CIFAR-10 standard), 0.1 for grayscale
(the usual Fashion-MNIST budget; MNIST papers use 0.3).

Inputs and outputs. The model maps float ``(N, C, H, W)`` in [0, 1] to logits (abl-guard models normalise inside).
Images are numpy ``(N, H, W, C)``, uint8 or float in [0, 1]. Results are float32 ``(N, H, W, C)`` in [0, 1]:
adversarial examples are valid images but not necessarily on the uint8 grid. :func:`quantize` rounds them to uint8
*inside* the L∞ ball (rounding alone can leave it when ``eps * 255`` is not an integer); quantising can undo a small
perturbation, so re-measure success afterwards (:func:`evaluate`; the CLI reports both rates).

Success: untargeted — the prediction differs from the true label; targeted — it equals the target.
``success_rate`` is measured over the examples the model classifies correctly before the attack (the usual
convention: an already-misclassified input is not an attack success). Everything runs in batches on the model's
device; random starts come from a CPU generator seeded by ``seed``, so results do not depend on the batch size and
are reproducible on CPU (GPU kernels may differ in the last bits).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._common import model_device

log = logging.getLogger(__name__)

Model = nn.Module | Callable[[torch.Tensor], torch.Tensor]
ATTACKS = ("fgsm", "pgd", "cw")


def default_eps(channels: int) -> float:
    """8/255 for colour images, 0.1 for grayscale."""
    return 8.0 / 255.0 if channels == 3 else 0.1


@dataclass
class AdversarialResult:
    """Adversarial examples and how they fared.

    ``images``: float32 ``(N, H, W, C)`` in [0, 1]; ``labels``: true labels; ``targets``: target labels for a
    targeted attack (else ``None``); ``clean_pred`` / ``adv_pred``: predictions before / after; ``success``: bool per
    example (see the module docstring).
    """

    attack: str
    images: np.ndarray
    labels: np.ndarray
    clean_pred: np.ndarray
    adv_pred: np.ndarray
    success: np.ndarray
    targets: np.ndarray | None = None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def clean_correct(self) -> np.ndarray:
        return self.clean_pred == self.labels

    @property
    def success_rate(self) -> float:
        """Fraction of correctly classified inputs that the attack fooled (NaN when none was correct)."""
        ok = self.clean_correct
        return float(self.success[ok].mean()) if ok.any() else float("nan")

    def summary(self) -> dict[str, Any]:
        return {"attack": self.attack, **self.params, "n": int(len(self.labels)),
                "clean_accuracy": float(self.clean_correct.mean()) if len(self.labels) else float("nan"),
                "n_clean_correct": int(self.clean_correct.sum()), "success_rate": self.success_rate,
                "adv_accuracy": float((self.adv_pred == self.labels).mean()) if len(self.labels) else float("nan")}


# ------------------------------------------------------------------------------------------------- helpers


def as_float_images(images: np.ndarray) -> np.ndarray:
    """uint8 or float ``(N, H, W, C)`` -> float32 in [0, 1] (floats must already be in [0, 1])."""
    if not isinstance(images, np.ndarray) or images.ndim != 4:
        raise ValueError(f"images must be a numpy array (N, H, W, C), got {getattr(images, 'shape', type(images))}")
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be uint8 or float, got {images.dtype}")
    if images.size and (images.min() < 0 or images.max() > 1):
        raise ValueError("float images must lie in [0, 1]")
    return images.astype(np.float32)


def _nchw(x: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(x, device=device).permute(0, 3, 1, 2).contiguous()


def _nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().permute(0, 2, 3, 1).float().cpu().numpy()


class _EvalMode:
    """Put a module in eval mode for the attack and restore its mode afterwards."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.was_training = isinstance(model, nn.Module) and model.training

    def __enter__(self) -> None:
        if isinstance(self.model, nn.Module):
            self.model.eval()

    def __exit__(self, *exc: object) -> None:
        if isinstance(self.model, nn.Module):
            self.model.train(self.was_training)


@torch.no_grad()
def predict(model: Model, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Predicted labels for uint8 or float [0, 1] images ``(N, H, W, C)``."""
    x = as_float_images(images)
    device = model_device(model)
    out = []
    with _EvalMode(model):
        for s in range(0, len(x), batch_size):
            out.append(model(_nchw(x[s : s + batch_size], device)).argmax(1).cpu())
    return torch.cat(out).numpy().astype(np.int64) if out else np.zeros(0, np.int64)


def _success(pred: np.ndarray, labels: np.ndarray, targets: np.ndarray | None) -> np.ndarray:
    return pred == targets if targets is not None else pred != labels


def quantize(adv: np.ndarray, clean: np.ndarray | None = None, eps: float | None = None) -> np.ndarray:
    """Round float [0, 1] adversarial images to uint8; with ``clean`` (uint8) and ``eps``, stay inside the L∞ ball.

    Rounding moves a pixel by at most 0.5/255, which can push it past ``eps`` when ``eps * 255`` is not an integer;
    clipping to ``clean ± floor(eps * 255)`` keeps the quantised image a valid example at the same budget.
    """
    q = np.clip(np.rint(np.asarray(adv, np.float64) * 255.0), 0, 255)
    if eps is not None:
        if clean is None or clean.dtype != np.uint8:
            raise ValueError("quantize with eps needs the clean uint8 images")
        r = math.floor(eps * 255.0 + 1e-6)
        c = clean.astype(np.float64)
        q = np.clip(q, c - r, c + r)
    return q.astype(np.uint8)


def evaluate(model: Model, adv: np.ndarray, labels: np.ndarray, targets: np.ndarray | None = None,
             batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Predictions on (e.g. quantised) adversarial images and the success mask."""
    pred = predict(model, adv, batch_size)
    return pred, _success(pred, np.asarray(labels), targets)


def _targets_array(targets: int | np.ndarray | None, n: int) -> np.ndarray | None:
    if targets is None:
        return None
    t = np.full(n, int(targets), np.int64) if np.isscalar(targets) else np.asarray(targets, np.int64)
    if t.shape != (n,):
        raise ValueError(f"targets shape {t.shape} does not match {n} images")
    return t


def _run(name: str, model: Model, images: np.ndarray, labels: np.ndarray, targets: int | np.ndarray | None,
         batch_size: int, params: dict[str, Any],
         step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Generator], torch.Tensor],
         seed: int) -> AdversarialResult:
    x_all = as_float_images(images)
    y_all = np.asarray(labels, np.int64)
    if y_all.shape != (len(x_all),):
        raise ValueError(f"labels shape {y_all.shape} does not match {len(x_all)} images")
    t_all = _targets_array(targets, len(x_all))
    device = model_device(model)
    gen = torch.Generator().manual_seed(int(seed))
    adv = np.empty_like(x_all)
    clean_pred = np.empty(len(x_all), np.int64)
    from abl_guard.guard.progress import progress_bar  # lazily: importing guard/ loads the onnxruntime side too

    bar = progress_bar(total=len(x_all), desc=name)
    with _EvalMode(model):
        for s in range(0, len(x_all), batch_size):
            x = _nchw(x_all[s : s + batch_size], device)
            y = torch.as_tensor(y_all[s : s + batch_size], device=device)
            t = None if t_all is None else torch.as_tensor(t_all[s : s + batch_size], device=device)
            with torch.no_grad():
                clean_pred[s : s + len(x)] = model(x).argmax(1).cpu().numpy()
            adv[s : s + len(x)] = _nhwc(step(x, y, t, gen).clamp(0, 1))
            bar.update(len(x))
    bar.close()
    adv_pred, success = evaluate(model, adv, y_all, t_all, batch_size)
    res = AdversarialResult(name, adv, y_all, clean_pred, adv_pred, success, t_all,
                            {**params, "targeted": t_all is not None, "seed": int(seed)})
    log.info("%s: success rate %.4f on %d correctly classified of %d", name, res.success_rate,
             int(res.clean_correct.sum()), len(y_all))
    return res


def _loss_grad(model: Model, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    """Gradient of the attacker's objective (ascend): CE on the true label, or minus CE on the target."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        loss = F.cross_entropy(logits, y, reduction="sum") if t is None else -F.cross_entropy(
            logits, t, reduction="sum")
        (g,) = torch.autograd.grad(loss, x)
    return g


# ------------------------------------------------------------------------------------------------- attacks


def fgsm(model: Model, images: np.ndarray, labels: np.ndarray, eps: float | None = None,
         targets: int | np.ndarray | None = None, batch_size: int = 256, seed: int = 0) -> AdversarialResult:
    """Fast gradient sign method, one step of size ``eps`` (L∞)."""
    eps = default_eps(images.shape[-1]) if eps is None else float(eps)

    def step(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
        return x + eps * _loss_grad(model, x, y, t).sign()

    return _run("fgsm", model, images, labels, targets, batch_size, {"eps": eps}, step, seed)


def pgd(model: Model, images: np.ndarray, labels: np.ndarray, eps: float | None = None, steps: int = 10,
        step_size: float | None = None, random_start: bool = True, targets: int | np.ndarray | None = None,
        norm: str = "linf", batch_size: int = 256, seed: int = 0) -> AdversarialResult:
    """Projected gradient descent (Madry et al.), random start by default.

    ``norm="linf"`` (default): signed steps, projection onto the L∞ ball. ``norm="l2"``: steps along the
    L2-normalised gradient, projection onto the L2 ball, random start on its sphere (as in Madry et al.'s
    robustness library); ``eps`` then has no default and is an L2 radius on the [0, 1] scale.
    """
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    if eps is None:
        if norm == "l2":
            raise ValueError("PGD-L2 needs an explicit eps")
        eps = default_eps(images.shape[-1])
    eps = float(eps)
    if steps < 1:
        raise ValueError("steps must be >= 1")
    alpha = 2.5 * eps / steps if step_size is None else float(step_size)

    def l2_normalise(v: torch.Tensor) -> torch.Tensor:
        return v / v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (v.ndim - 1)))

    def project(adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if norm == "linf":
            return torch.min(torch.max(adv, x - eps), x + eps).clamp(0, 1)
        d = adv - x
        n = d.flatten(1).norm(dim=1).view(-1, *([1] * (d.ndim - 1)))
        return (x + d * torch.clamp(eps / n.clamp_min(1e-12), max=1.0)).clamp(0, 1)

    def step(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
        adv = x.clone()
        if random_start:
            if norm == "linf":
                noise = eps * (torch.rand(x.shape, generator=gen, dtype=x.dtype) * 2 - 1)
            else:
                noise = eps * l2_normalise(torch.randn(x.shape, generator=gen, dtype=x.dtype))
            adv = (x + noise.to(x.device)).clamp(0, 1)
        for _ in range(steps):
            g = _loss_grad(model, adv, y, t)
            adv = project(adv + alpha * (g.sign() if norm == "linf" else l2_normalise(g)), x)
        return adv

    return _run("pgd", model, images, labels, targets, batch_size,
                {"eps": eps, "steps": int(steps), "step_size": alpha, "random_start": bool(random_start),
                 "norm": norm}, step, seed)


def cw_l2(model: Model, images: np.ndarray, labels: np.ndarray, c: float = 1.0, kappa: float = 0.0,
          steps: int = 100, lr: float = 0.01, binary_search_steps: int = 5, abort_early: bool = True,
          targets: int | np.ndarray | None = None, batch_size: int = 256, seed: int = 0) -> AdversarialResult:
    """Carlini–Wagner L2 with a per-example binary search on ``c``; failed examples come back unchanged."""
    if steps < 1 or binary_search_steps < 1:
        raise ValueError("steps and binary_search_steps must be >= 1")

    def step(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
        n = len(x)
        k = None
        w0 = torch.atanh((x * 2 - 1).clamp(-1 + 1e-6, 1 - 1e-6))
        const = torch.full((n,), float(c), device=x.device)
        lower = torch.zeros(n, device=x.device)
        upper = torch.full((n,), 1e10, device=x.device)
        best_l2 = torch.full((n,), float("inf"), device=x.device)
        best_adv = x.clone()
        label = y if t is None else t
        for _ in range(binary_search_steps):
            w = w0.clone().requires_grad_(True)
            opt = torch.optim.Adam([w], lr=lr)
            found = torch.zeros(n, dtype=torch.bool, device=x.device)
            prev = float("inf")
            for it in range(steps):
                with torch.enable_grad():
                    adv = (torch.tanh(w) + 1) / 2
                    logits = model(adv)
                    k = k or logits.shape[1]
                    onehot = F.one_hot(label, k).bool()
                    real = logits[onehot]
                    other = logits.masked_fill(onehot, float("-inf")).amax(1)
                    margin = (real - other) if t is None else (other - real)
                    f = torch.clamp(margin, min=-kappa)
                    l2 = (adv - x).flatten(1).pow(2).sum(1)
                    loss = (l2 + const * f).sum()
                    (w.grad,) = torch.autograd.grad(loss, w)
                opt.step()
                with torch.no_grad():
                    # success with the kappa margin, judged at the iterate the loss was computed on
                    ok = margin.detach() <= -kappa if kappa > 0 else (
                        logits.argmax(1) != y if t is None else logits.argmax(1) == t)
                    better = ok & (l2.detach() < best_l2)
                    best_l2 = torch.where(better, l2.detach(), best_l2)
                    best_adv[better] = adv.detach()[better]
                    found |= ok
                if abort_early and it % max(1, steps // 10) == 0:
                    cur = float(loss.detach())
                    if cur > prev * 0.9999:
                        break
                    prev = cur
            with torch.no_grad():
                upper = torch.where(found, torch.minimum(upper, const), upper)
                lower = torch.where(found, lower, torch.maximum(lower, const))
                const = torch.where(upper < 1e9, (lower + upper) / 2, const * 10)
        return best_adv

    return _run("cw", model, images, labels, targets, batch_size,
                {"c": float(c), "kappa": float(kappa), "steps": int(steps), "lr": float(lr),
                 "binary_search_steps": int(binary_search_steps)}, step, seed)


def run_attack(name: str, model: Model, images: np.ndarray, labels: np.ndarray, **params: Any) -> AdversarialResult:
    """Dispatch by name (``fgsm``, ``pgd``, ``cw``); unknown parameters raise ``TypeError``."""
    fns: dict[str, Callable[..., AdversarialResult]] = {"fgsm": fgsm, "pgd": pgd, "cw": cw_l2}
    try:
        fn = fns[name]
    except KeyError:
        raise ValueError(f"unknown adversarial attack {name!r}; choose from {list(ATTACKS)}") from None
    return fn(model, images, labels, **params)
