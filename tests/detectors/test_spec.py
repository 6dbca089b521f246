"""Detector sets written as text (detectors/spec.py): the ``--detectors`` grammar and its default."""

from __future__ import annotations

import pytest

from abl_guard.detectors import KNNDistance, Mahalanobis, make_detectors, parse_detector_specs


def test_parse_names_and_inline_parameters():
    assert parse_detector_specs(" mahalanobis, knn ,gram,") == [("mahalanobis", {}), ("knn", {}), ("gram", {})]
    assert parse_detector_specs("mahalanobis:tap=@0:ridge=0,knn:k=5:max-bank=100") == [
        ("mahalanobis", {"tap": "@0", "ridge": 0}), ("knn", {"k": 5, "max_bank": 100})]
    assert parse_detector_specs("knn:tap=pool") == [("knn", {"tap": "pool"})]  # not JSON: kept as a string


@pytest.mark.parametrize("text, needle", [("", "no detectors"), (" , ", "no detectors"), ("nope", "unknown detector"),
                                          ("knn:k", "knn:KEY=VALUE"), ("knn:=3", "knn:KEY=VALUE")])
def test_parse_errors_are_one_line_value_errors(text, needle):
    with pytest.raises(ValueError, match=needle) as e:
        parse_detector_specs(text)
    assert "\n" not in str(e.value)


def test_make_detectors_applies_inline_parameters_then_overrides_by_instance():
    dets = make_detectors("mahalanobis,knn,mahalanobis:tap=@0:ridge=0.5", {"mahalanobis#2": {"ridge": 0.25}})
    assert [type(d) for d in dets] == [Mahalanobis, KNNDistance, Mahalanobis]
    assert (dets[0].tap, dets[0].ridge) == (None, 1e-6)
    assert (dets[2].tap, dets[2].ridge) == ("@0", 0.25)  # the override wins over the inline value
    with pytest.raises(ValueError, match=r"not selected: \['knn#2'\]"):
        make_detectors("knn", {"knn#2": {"k": 3}})
    with pytest.raises(TypeError):
        make_detectors("knn:nope=1")


def test_a_second_mahalanobis_on_a_multi_tap_model_reads_the_first_tap(random_cnn_onnx, tmp_path, caplog):
    """Calibrating with a second Mahalanobis at the first tap: four detectors, the second resolved to the first tap;
    a detector that resolves exactly as an earlier one does is dropped with a warning."""
    import numpy as np

    from abl_guard.guard import calibrate_bundle

    default = "mahalanobis,knn,gram,mahalanobis:tap=@0"
    path, _ = random_cnn_onnx
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (400, 8, 8, 1), dtype=np.uint8)
    y = np.arange(400) % 10
    manifest = calibrate_bundle(path, x, y, make_detectors(default), tmp_path / "b", fpr=0.1, seed=0)
    dets = manifest["detectors"]
    assert [(d["name"], d["type"]) for d in dets] == [("mahalanobis", "mahalanobis"), ("knn", "knn"),
                                                     ("gram", "gram"), ("mahalanobis#2", "mahalanobis")]
    assert dets[3]["params"]["tap"] == "@0" and dets[3]["requires"] == ["block1"]
    assert "block1" in manifest["taps"] and "penultimate" in manifest["taps"]
    caplog.set_level("WARNING")
    manifest = calibrate_bundle(path, x, y, make_detectors("knn,mahalanobis,knn:k=50"), tmp_path / "c", fpr=0.1)
    assert [d["name"] for d in manifest["detectors"]] == ["knn", "mahalanobis"]
    assert "knn#2 reads penultimate exactly as knn does on this model: dropped" in caplog.text
