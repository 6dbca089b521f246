"""train -> export -> calibrate -> scan through the real CLI, on tiny data (seconds)."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from abl_guard.cli import main


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e")
    r = CliRunner()
    res = r.invoke(main, ["-q", "train", "--dataset", "digits", "--attack", "badnets", "--rate", "0.1", "--epochs",
                          "12", "--lr", "0.05", "--batch-size", "64", "--device", "cpu", "-o", str(d / "run")])
    assert res.exit_code == 0, res.output
    res = r.invoke(main, ["-q", "export", str(d / "run" / "model.pt"), "-o", str(d / "model.onnx")])
    assert res.exit_code == 0, res.output
    res = r.invoke(main, ["-q", "calibrate", str(d / "model.onnx"), "--dataset", "digits", "--split", "train",
                          "--count", "1400", "--fpr", "0.05", "-o", str(d / "guard")])
    assert res.exit_code == 0, res.output
    return d, r


@pytest.mark.slow
def test_train_record_and_artifacts(pipeline):
    d, _ = pipeline
    rec = json.loads((d / "run" / "run.json").read_text())
    assert rec["metrics"]["clean_accuracy"] > 0.8
    assert rec["metrics"]["attack_success_rate"] > 0.8, "the BadNets backdoor must be implanted"
    idx = np.load(d / "run" / rec["poison_indices_file"], allow_pickle=False)
    assert len(idx) == rec["n_poisoned"] == round(0.1 * rec["n_train"])


def test_export_parity_recorded(pipeline):
    from abl_guard.export import read_metadata

    d, _ = pipeline
    meta = read_metadata(d / "model.onnx")
    assert meta["outputs"][0] == "logits" and "penultimate" in meta["outputs"]
    assert meta["input_shape"] == [1, 8, 8] and len(meta["class_names"]) == 10
    assert len(meta["source_checkpoint_sha256"]) == 64


def test_scan_flags_triggered_far_more_than_clean(pipeline):
    from abl_guard.abl.data import load_dataset
    from abl_guard.attacks import make_attack

    d, r = pipeline
    test = load_dataset("digits", "test")
    trig = make_attack("badnets", target=0).triggered(test.images, test.labels, 10)
    np.save(d / "clean.npy", test.images)
    np.save(d / "trig.npy", trig.images)
    res = r.invoke(main, ["-q", "scan", str(d / "guard"), str(d / "clean.npy"), str(d / "trig.npy"),
                          "-o", str(d / "v.jsonl"), "--summary-json", str(d / "s.json")])
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in (d / "v.jsonl").read_text().splitlines()]
    assert len(recs) == len(test) + len(trig.images)
    flags = np.array([rec["flagged"] for rec in recs])
    clean_rate, trig_rate = flags[: len(test)].mean(), flags[len(test):].mean()
    assert clean_rate < 0.15
    assert trig_rate > 0.6 and trig_rate > 4 * clean_rate
    summary = json.loads((d / "s.json").read_text())
    assert summary["total"] == len(recs) and summary["errors"] == 0


def test_tampered_bundle_is_refused(pipeline):
    import shutil

    d, r = pipeline
    bad = d / "tampered"
    shutil.copytree(d / "guard", bad)
    det = next((bad / "detectors").glob("*.npz"))
    blob = bytearray(det.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte inside the detector state
    det.write_bytes(bytes(blob))
    res = r.invoke(main, ["-q", "scan", str(bad), str(d / "clean.npy"), "-o", str(d / "x.jsonl")])
    assert res.exit_code != 0
    assert "SHA-256" in res.output
