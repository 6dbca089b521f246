"""torch -> ONNX with named taps, a dynamic batch axis, metadata and a parity check.

The exported graph has one input, ``input`` (float32 NCHW in [0, 1]; normalisation happens inside the graph), and
outputs ``logits`` followed by one output per tap, named after the tap. A tap is a module path whose output is
exposed (``"layer3"``) or, with a ``:in`` suffix, whose *input* is exposed (``"fc:in"``: the penultimate features).

Metadata is a JSON document under the ``abl_guard`` key of the model's ``metadata_props``; the runtime reads it with
onnxruntime alone (:func:`abl_guard.guard.model.read_metadata`), so serving needs neither torch nor onnx.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from abl_guard.guard.bundle import sha256_file
from abl_guard.guard.model import LOGITS_NAME, METADATA_KEY
from abl_guard.guard.model import MODEL_FORMAT as FORMAT

log = logging.getLogger(__name__)

INPUT_NAME = "input"


class ParityError(RuntimeError):
    """onnxruntime's outputs differ from torch's by more than the tolerance."""


class TapWrapper(nn.Module):
    """Runs ``model`` and returns ``(logits, *taps)`` captured by forward (pre-)hooks on named modules."""

    def __init__(self, model: nn.Module, taps: Mapping[str, str], tap_root: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.tap_names = list(taps)
        if len(set(self.tap_names)) != len(self.tap_names) or LOGITS_NAME in self.tap_names or INPUT_NAME in taps:
            raise ValueError(f"tap names must be unique and not {LOGITS_NAME!r}/{INPUT_NAME!r}: {self.tap_names}")
        modules = dict((tap_root or model).named_modules())
        self._store: dict[str, torch.Tensor] = {}
        self._handles = []
        for name, spec in taps.items():
            path, _, where = spec.partition(":")
            if path not in modules or path == "":
                raise ValueError(f"tap {name!r}: no module {path!r}; available: {_short_list(modules)}")
            if where not in ("", "in", "out"):
                raise ValueError(f"tap {name!r}: suffix must be ':in' or ':out', got {spec!r}")
            mod = modules[path]
            if where == "in":
                self._handles.append(mod.register_forward_pre_hook(self._pre_hook(name)))
            else:
                self._handles.append(mod.register_forward_hook(self._hook(name)))

    def _pre_hook(self, name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(_mod: nn.Module, args: tuple) -> None:
            self._store[name] = args[0]

        return hook

    def _hook(self, name: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def hook(_mod: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            # clone: a following in-place op (ReLU(inplace=True)) must not change what the tap shows
            self._store[name] = out.clone()

        return hook

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self._store.clear()
        logits = self.model(x)
        missing = [n for n in self.tap_names if n not in self._store]
        if missing:
            raise RuntimeError(f"taps {missing} were not reached in the forward pass")
        out = (logits, *(self._store[n] for n in self.tap_names))
        self._store.clear()
        return out

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()


def _short_list(modules: Mapping[str, nn.Module], n: int = 30) -> str:
    names = [k for k in modules if k]
    return ", ".join(names[:n]) + (" ..." if len(names) > n else "")


def default_penultimate(model: nn.Module) -> str:
    """The input of the last ``nn.Linear`` module (the features the classifier reads)."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the model has no nn.Linear layer; name the penultimate tap explicitly")
    return f"{linears[-1]}:in"


@dataclass
class ExportReport:
    path: Path
    outputs: list[str]
    parity: dict[str, float]
    sha256: str
    metadata: dict[str, Any]


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    input_shape: Sequence[int],
    taps: Mapping[str, str],
    class_names: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    tap_root: nn.Module | None = None,
    extra_metadata: Mapping[str, Any] | None = None,
    opset: int = 18,
    atol: float = 1e-4,
    parity_inputs: np.ndarray | None = None,
    seed: int = 0,
) -> ExportReport:
    """Export ``model`` (float NCHW [0, 1] -> logits, normalisation inside) with ``taps`` to one ONNX file.

    Verifies parity on ``parity_inputs`` (or 8 seeded random images) with a batch size different from the trace's,
    so the dynamic batch axis is exercised; raises :class:`ParityError` above ``atol``.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    wrapper = TapWrapper(model, taps, tap_root).eval()
    c, h, w = (int(v) for v in input_shape)
    example = torch.rand(2, c, h, w, generator=torch.Generator().manual_seed(seed))
    out_names = [LOGITS_NAME, *wrapper.tap_names]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, (example,), str(path), input_names=[INPUT_NAME], output_names=out_names,
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}}, opset_version=opset,
            external_data=False, dynamo=True, verbose=False,
        )
    metadata = {
        "format": FORMAT,
        "input_name": INPUT_NAME,
        "input_shape": [c, h, w],
        "input_layout": "NCHW",
        "input_range": [0.0, 1.0],
        "normalization": {"mean": list(map(float, mean)), "std": list(map(float, std)), "applied": "in-graph"},
        "class_names": list(class_names),
        "outputs": out_names,
        "taps": {name: {"module": spec} for name, spec in taps.items()},
        "torch_version": torch.__version__,
        "opset": opset,
        **(extra_metadata or {}),
    }
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    onnx.save(proto, str(path))

    if parity_inputs is None:
        parity_inputs = torch.rand(8, c, h, w, generator=torch.Generator().manual_seed(seed + 1)).numpy()
    parity = check_parity(wrapper, path, parity_inputs, out_names)
    wrapper.remove_hooks()
    worst = max(parity.values())
    if worst > atol:
        raise ParityError(f"onnxruntime differs from torch by {worst:.3g} > {atol:g}: {parity}")
    log.info("exported %s (%s); parity max |diff| %.2e", path, ", ".join(out_names), worst)
    return ExportReport(path, out_names, parity, sha256_file(path), metadata)


def check_parity(wrapper: TapWrapper, path: str | os.PathLike, inputs: np.ndarray,
                 names: Sequence[str]) -> dict[str, float]:
    """Max absolute difference between torch and onnxruntime, per output."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.ascontiguousarray(inputs, dtype=np.float32)
    got = sess.run(list(names), {INPUT_NAME: x})
    with torch.no_grad():
        want = wrapper(torch.from_numpy(x))
    return {n: float(np.max(np.abs(g - t.numpy()))) if g.size else 0.0 for n, g, t in zip(names, got, want)}


# ------------------------------------------------------------------------------------------- foreign models


class NormalizedModel(nn.Module):
    """Wraps a model trained elsewhere so the exported graph takes [0, 1] images: ``net((x - mean) / std)``."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def build_foreign_model(arch: str, weights: str | os.PathLike | None, num_classes: int,
                        kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """A torchvision architecture by name (``resnet18``) or a class path (``package.module:Class``), with a
    state-dict file loaded with ``weights_only=True`` (a dict holding ``state_dict`` / ``model`` is unwrapped)."""
    import importlib

    kwargs = dict(kwargs or {})
    if ":" in arch:
        module_name, _, cls_name = arch.partition(":")
        cls = getattr(importlib.import_module(module_name), cls_name)
        net = cls(**kwargs)
    else:
        import torchvision

        try:
            net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
        except ValueError as e:
            raise ValueError(f"unknown torchvision architecture {arch!r}: {e}") from None
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
        net.load_state_dict(state)
    return net.eval()
