import json
import shutil

import numpy as np
import pytest

from abl_guard.detectors import Mahalanobis
from abl_guard.guard import BundleError, Guard, calibrate_bundle
from abl_guard.guard.bundle import BUNDLE_VERSION


@pytest.fixture(scope="module")
def bundle(tiny_backdoored, tmp_path_factory):
    d = tmp_path_factory.mktemp("bundle") / "g"
    t = tiny_backdoored
    clean = t["test"]
    manifest = calibrate_bundle(t["onnx"], clean.images, clean.labels, [Mahalanobis()], d, fpr=0.05,
                                provenance={"test": True})
    return d, manifest


def test_manifest_contents(bundle):
    d, m = bundle
    assert m["format_version"] == BUNDLE_VERSION and m["model"]["metadata"]["input_shape"] == [1, 8, 8]
    assert m["detectors"][0]["type"] == "mahalanobis" and len(m["detectors"][0]["sha256"]) == 64
    cal = m["calibration"]
    assert cal["split"] == {"fit": 180, "calibration": 108, "validation": 72}
    assert 0 <= cal["validation"]["ci95"][0] <= cal["validation"]["rate"] <= cal["validation"]["ci95"][1]
    assert set(m["files"]) == {"model.onnx", "calibration.npz", "detectors/mahalanobis.npz"}
    assert json.loads((d / "manifest.json").read_text()) == m


def test_load_and_inspect(bundle, tiny_backdoored):
    d, _ = bundle
    g = Guard.load(d)
    v = g.inspect(tiny_backdoored["test"].images[:5])
    assert len(v) == 5 and all(0 < x.p_value <= 1 for x in v)
    assert set(v[0].to_json()) >= {"label", "confidence", "flagged", "score", "threshold", "p_value", "detectors"}
    labels, flags = g.predict(tiny_backdoored["test"].images[:5])
    assert labels.tolist() == [x.label for x in v] and flags.dtype == bool


@pytest.mark.parametrize("tamper", ["model", "detector", "calibration", "missing", "version", "escape"])
def test_tampered_or_wrong_version_refused(bundle, tmp_path, tamper):
    d, _ = bundle
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    if tamper in ("model", "detector", "calibration"):
        f = {"model": "model.onnx", "detector": "detectors/mahalanobis.npz", "calibration": "calibration.npz"}[tamper]
        blob = bytearray((bad / f).read_bytes())
        blob[len(blob) // 2] ^= 0x01
        (bad / f).write_bytes(bytes(blob))
        match = "SHA-256"
    elif tamper == "missing":
        (bad / "calibration.npz").unlink()
        match = "missing"
    elif tamper == "version":
        manifest["format_version"] = 99
        (bad / "manifest.json").write_text(json.dumps(manifest))
        match = "version 99"
    else:
        manifest["files"]["../outside.npz"] = "0" * 64
        (bad / "manifest.json").write_text(json.dumps(manifest))
        match = "outside"
    with pytest.raises(BundleError, match=match):
        Guard.load(bad)


def test_arrays_load_without_pickle(bundle):
    d, _ = bundle
    with np.load(d / "detectors" / "mahalanobis.npz", allow_pickle=False) as z:
        assert {"means", "chol"} <= set(z.files)
