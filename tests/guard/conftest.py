"""Guard fixtures: a tiny exported-style ONNX model built with onnx.helper (no torch) and a bundle calibrated on the
8x8 digits. The model is a random-feature MLP whose head is fitted by least squares on the digits, so predictions are
mostly right and the penultimate features are class-structured (what Mahalanobis needs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


def build_tiny_onnx(path: Path, images: np.ndarray, labels: np.ndarray, hidden: int = 48, seed: int = 0) -> Path:
    """input (N,1,8,8) float [0,1] -> flatten -> W1 -> relu = ``penultimate`` -> W2 -> ``logits``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from abl_guard.guard.model import METADATA_KEY, MODEL_FORMAT

    rng = np.random.default_rng(seed)
    x = images.reshape(len(images), -1).astype(np.float32) / 255.0
    w1 = rng.normal(0, 1 / np.sqrt(64), (64, hidden)).astype(np.float32)
    b1 = rng.normal(0, 0.1, hidden).astype(np.float32)
    h = np.maximum(x @ w1 + b1, 0)
    onehot = np.eye(10, dtype=np.float32)[labels]
    hb = np.c_[h, np.ones(len(h), np.float32)]
    sol = np.linalg.lstsq(hb.T @ hb + 1e-2 * np.eye(hidden + 1), hb.T @ onehot, rcond=None)[0].astype(np.float32)
    w2, b2 = sol[:-1] * 5.0, sol[-1] * 5.0
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((w1, "W1"), (b1, "B1"), (w2, "W2"), (b2, "B2"), (np.array([-1, 64], np.int64), "shape"))]
    nodes = [
        helper.make_node("Reshape", ["input", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "W1"], ["h1"]),
        helper.make_node("Add", ["h1", "B1"], ["h1b"]),
        helper.make_node("Relu", ["h1b"], ["penultimate"]),
        helper.make_node("MatMul", ["penultimate", "W2"], ["l1"]),
        helper.make_node("Add", ["l1", "B2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10]),
         helper.make_tensor_value_info("penultimate", TensorProto.FLOAT, ["N", hidden])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    meta = {"format": MODEL_FORMAT, "input_name": "input", "input_shape": [1, 8, 8], "input_layout": "NCHW",
            "input_range": [0.0, 1.0], "class_names": [str(i) for i in range(10)], "outputs": ["logits", "penultimate"],
            "taps": {"penultimate": {"module": "fc:in"}}, "arch": "tiny-mlp", "dataset": "digits"}
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory, digits_train) -> Path:
    return build_tiny_onnx(tmp_path_factory.mktemp("model") / "tiny.onnx", digits_train.images, digits_train.labels)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_onnx, digits_train) -> Path:
    """Mahalanobis, pooled calibration at 5% (the digits are small), directory bundle."""
    from abl_guard.detectors import make_detector
    from abl_guard.guard import calibrate_bundle

    out = tmp_path_factory.mktemp("bundle") / "tiny.guard"
    calibrate_bundle(tiny_onnx, digits_train.images, digits_train.labels, [make_detector("mahalanobis")], out,
                     fpr=0.05, fractions=(0.4, 0.4, 0.2), seed=0, provenance={"dataset": "digits"})
    return out
