"""Shared fixtures: tiny data that trains in seconds (scikit-learn's 8x8 digits ship with the package)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits_train():
    from abl_guard.abl.data import load_dataset

    return load_dataset("digits", "train")


@pytest.fixture(scope="session")
def digits_test():
    from abl_guard.abl.data import load_dataset

    return load_dataset("digits", "test")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def random_images(n: int = 16, h: int = 12, w: int = 12, c: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


@pytest.fixture(scope="session")
def tiny_backdoored(tmp_path_factory, digits_train, digits_test):
    """A small CNN trained on BadNets-poisoned digits (seconds), its checkpoint and its ONNX export.

    Returns a dict: ``model`` (torch, eval), ``checkpoint``, ``onnx``, ``attack``, ``train``, ``test``, ``metrics``.
    """
    from abl_guard.abl.checkpoint import save_checkpoint
    from abl_guard.abl.data import LabelledImages
    from abl_guard.abl.models import build_model
    from abl_guard.abl.train import TrainConfig, accuracy, set_seed, train_plain
    from abl_guard.attacks import make_attack
    from abl_guard.export import export_onnx

    set_seed(0)
    attack = make_attack("badnets", target=0, rate=0.1, seed=0)
    spec = digits_train.spec
    p = attack.poison(digits_train.images, digits_train.labels, spec.num_classes)
    model = build_model("small-cnn", 1, 10, 8, spec.mean, spec.std)
    train_plain(model, p.images, p.labels, TrainConfig(epochs=12, lr=0.05, batch_size=64, device="cpu"), quiet=True)
    model.eval()
    trig = attack.triggered(digits_test.images, digits_test.labels, 10)
    metrics = {
        "clean_accuracy": accuracy(model, digits_test.images, digits_test.labels, "cpu"),
        "attack_success_rate": accuracy(model, trig.images, trig.labels, "cpu"),
    }
    d = tmp_path_factory.mktemp("tiny")
    ckpt = d / "model.pt"
    save_checkpoint(ckpt, model, "small-cnn", spec, extra={"metrics": metrics})
    onnx_path = d / "model.onnx"
    export_onnx(model, onnx_path, input_shape=spec.input_shape, taps=model.TAPS, class_names=spec.class_names,
                mean=spec.mean, std=spec.std)
    return {"model": model, "checkpoint": ckpt, "onnx": onnx_path, "attack": attack,
            "train": LabelledImages(p.images, p.labels, spec), "test": digits_test, "metrics": metrics,
            "triggered": trig}
