"""Detector test fixtures: tiny numpy models with the ``ModelFn`` signature (counting their calls), and a small
untrained SmallCNN exported to ONNX (seconds)."""

from __future__ import annotations

import numpy as np
import pytest


class LinearImageModel:
    """``logits = flatten(x) @ W + b`` for float NCHW inputs; counts calls and the images it saw."""

    def __init__(self, shape: tuple[int, int, int] = (1, 6, 6), num_classes: int = 4, seed: int = 0,
                 scale: float = 3.0) -> None:
        rng = np.random.default_rng(seed)
        self.shape = shape
        self.w = rng.normal(0, scale, (int(np.prod(shape)), num_classes))
        self.b = rng.normal(0, 0.1, num_classes)
        self.calls = 0
        self.images = 0

    def logits(self, x: np.ndarray) -> np.ndarray:
        return x.reshape(len(x), -1).astype(np.float64) @ self.w + self.b

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        assert x.ndim == 4 and tuple(x.shape[1:]) == self.shape and x.dtype == np.float32
        self.calls += 1
        self.images += len(x)
        return {"logits": self.logits(x)}

    def observe(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {"input": x.astype(np.float32), "logits": self.logits(x)}


class MLPHead:
    """A model whose layers after a tap are ``fc1 -> relu -> fc2``: what ``OnnxModel.dense_head`` returns."""

    def __init__(self, d_in: int = 16, hidden: int = 12, num_classes: int = 5, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.w1 = rng.normal(0, 1 / np.sqrt(d_in), (hidden, d_in)).astype(np.float32)
        self.b1 = rng.normal(0, 0.1, hidden).astype(np.float32)
        self.w2 = rng.normal(0, 1 / np.sqrt(hidden), (num_classes, hidden)).astype(np.float32)
        self.b2 = rng.normal(0, 0.1, num_classes).astype(np.float32)

    def dense_head(self, tap: str) -> list[dict]:
        assert tap == "pool"
        return [{"op": "linear", "weight": self.w1, "bias": self.b1}, {"op": "relu"},
                {"op": "linear", "weight": self.w2, "bias": self.b2}]

    def forward(self, a: np.ndarray, w1: np.ndarray | None = None, w2: np.ndarray | None = None) -> np.ndarray:
        w1 = self.w1 if w1 is None else w1
        w2 = self.w2 if w2 is None else w2
        return np.maximum(a @ w1.T + self.b1, 0) @ w2.T + self.b2

    def observe(self, a: np.ndarray) -> dict[str, np.ndarray]:
        return {"pool": a.astype(np.float32), "logits": self.forward(a.astype(np.float32))}


@pytest.fixture
def linear_model() -> type[LinearImageModel]:
    return LinearImageModel


@pytest.fixture
def mlp_head() -> type[MLPHead]:
    return MLPHead


@pytest.fixture(scope="session")
def random_cnn_onnx(tmp_path_factory):
    """An untrained SmallCNN for 8x8 inputs exported with its taps: ``(path, torch model)``."""
    import torch

    from abl_guard.abl.models import build_model
    from abl_guard.export import export_onnx

    torch.manual_seed(0)
    model = build_model("small-cnn", 1, 10, 8, (0.5,), (0.5,)).eval()
    path = tmp_path_factory.mktemp("cnn") / "cnn.onnx"
    export_onnx(model, path, input_shape=(1, 8, 8), taps=model.TAPS, class_names=[str(i) for i in range(10)],
                mean=(0.5,), std=(0.5,))
    return path, model
