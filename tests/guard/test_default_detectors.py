"""`abl-guard calibrate` without --detectors: the measured default set (bench/results/detect_converged.md) on models
that have none of the small CNN's tap names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from abl_guard.cli import calibrate, main


def default_set() -> list[str]:
    from abl_guard.detectors import parse_detector_specs

    opt = next(p for p in calibrate.params if p.name == "detector_names")
    return [n for n, _ in parse_detector_specs(str(opt.default))]


def renamed_taps(src: Path, dst: Path, name: str) -> Path:
    """The tiny model with its only tap renamed from ``penultimate`` to ``name`` (graph and metadata)."""
    import onnx

    from abl_guard.guard.model import METADATA_KEY

    m = onnx.load(str(src))
    for node in m.graph.node:
        node.input[:] = [name if i == "penultimate" else i for i in node.input]
        node.output[:] = [name if o == "penultimate" else o for o in node.output]
    for out in m.graph.output:
        if out.name == "penultimate":
            out.name = name
    entry = next(e for e in m.metadata_props if e.key == METADATA_KEY)
    meta = json.loads(entry.value)
    meta["outputs"] = ["logits", name]
    meta["taps"] = {name: meta["taps"]["penultimate"]}
    entry.value = json.dumps(meta)
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))
    return dst


def test_default_set_is_the_measured_one():
    opt = next(p for p in calibrate.params if p.name == "detector_names")
    assert opt.default == "mahalanobis,knn,gram"


@pytest.mark.parametrize("tap", ["penultimate", "dense_1/Relu:0"])
def test_default_calibrate_adapts_to_the_models_taps(tiny_onnx, tmp_path, digits_test, tap):
    """Every default detector resolves its taps from the model: no --detector-param needed, the bundle records the
    resolved taps, and the calibrated guard holds its false-positive rate on fresh clean digits."""
    from abl_guard.guard import Guard

    model = tiny_onnx if tap == "penultimate" else renamed_taps(tiny_onnx, tmp_path / "foreign.onnx", tap)
    r = CliRunner().invoke(main, ["-q", "calibrate", str(model), "--dataset", "digits", "--split", "train",
                                  "--count", "1400", "--fpr", "0.05", "-o", str(tmp_path / "g")])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "g" / "manifest.json").read_text())
    # the tiny model's only tap is both the penultimate and the first: the second Mahalanobis would repeat the first
    # and is dropped (guard/build.py), so the evidence is not counted twice
    assert [d["type"] for d in manifest["detectors"]] == ["mahalanobis", "knn", "gram"]
    assert manifest["taps"] == [tap]
    guard = Guard.load(tmp_path / "g", intra_op_threads=1)
    labels, flagged = guard.predict(digits_test.images)
    assert np.mean(labels == digits_test.labels) > 0.8
    assert flagged.mean() <= 0.05 + 0.04  # 5% target; 360 fresh inputs, so a few points of sampling error
    noise = np.random.default_rng(0).integers(0, 256, (200, 8, 8, 1), dtype=np.uint8)
    assert guard.predict(noise)[1].mean() > 0.9  # and it still sees what is not a digit


def test_probe_at_the_feature_tap_is_dropped_from_a_set_and_kept_alone(tiny_onnx, tmp_path):
    """The tiny model's only tap is its feature tap: ``probe`` (an early layer against the prediction) has nothing
    earlier to read there, so calibrate drops it from a set with others (it would dilute them) but not when alone."""
    common = ["-q", "calibrate", str(tiny_onnx), "--dataset", "digits", "--split", "train", "--count", "600",
              "--fpr", "0.05"]
    r = CliRunner().invoke(main, [*common, "--detectors", "mahalanobis,probe,knn", "-o", str(tmp_path / "set")])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "set" / "manifest.json").read_text())
    assert [d["type"] for d in manifest["detectors"]] == ["mahalanobis", "knn"]
    r = CliRunner().invoke(main, [*common, "--detectors", "probe", "-o", str(tmp_path / "alone")])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "alone" / "manifest.json").read_text())
    assert [d["type"] for d in manifest["detectors"]] == ["probe"]
