import json
import shutil
from pathlib import Path

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


# ------------------------------------------------------------------------------------------------ issue 12: hostile


def _copy(tiny_bundle, tmp_path, name="b"):
    dst = tmp_path / name
    shutil.copytree(tiny_bundle, dst)
    return dst, json.loads((dst / "manifest.json").read_text())


def _write(bundle_dir, manifest, rehash=True):
    from abl_guard.guard.bundle import manifest_digest

    if rehash:  # what an attacker does: the self-hash is not a signature
        manifest["manifest_sha256"] = manifest_digest(manifest)
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))


def _field(manifest, where):
    return {"model": manifest["model"], "calibration": manifest["calibration"],
            "detector": manifest["detectors"][0]}[where]


@pytest.mark.parametrize("where, key", [("model", "file"), ("calibration", "file"), ("detector", "state_file")])
@pytest.mark.parametrize("how", ["absolute", "dotdot", "unlisted", "nul", "backslash", "dot-slash"])
def test_case14_manifest_file_fields_must_be_hashed_members(tiny_bundle, tmp_path, where, key, how):
    """model.file / calibration.file / state_file pointing outside the bundle (or at an unlisted file) were loaded
    unhashed once the self-hash was recomputed; only `files` entries were checked."""
    b, m = _copy(tiny_bundle, tmp_path)
    original = _field(m, where)[key]
    outside = tmp_path / "outside" / Path(original).name
    outside.parent.mkdir()
    shutil.copyfile(b / original, outside)  # a working file, just not one the manifest hashes
    shutil.copyfile(b / original, b / ("extra_" + Path(original).name))
    name = {"absolute": str(outside), "dotdot": f"../outside/{Path(original).name}",
            "unlisted": "extra_" + Path(original).name, "nul": original + "\x00.txt",
            "backslash": original.replace("/", "\\") if "/" in original else "..\\" + original,
            "dot-slash": "./" + original}[how]
    _field(m, where)[key] = name
    _write(b, m)
    with pytest.raises(BundleError, match="outside the bundle|not among the files"):
        Guard.load(b)


def test_case14_symlink_escaping_the_bundle_refused(tiny_bundle, tmp_path):
    b, m = _copy(tiny_bundle, tmp_path)
    outside = tmp_path / "elsewhere.npz"
    shutil.move(b / "calibration.npz", outside)
    (b / "calibration.npz").symlink_to(outside)  # same bytes, same hash: only the location gives it away
    with pytest.raises(BundleError, match="links outside the bundle"):
        Guard.load(b)


def test_case15_deep_or_huge_manifest_refused(tiny_bundle, tmp_path):
    """A deeply nested manifest raised RecursionError out of json; huge ones were read whole."""
    from abl_guard.guard.bundle import BundleLimits

    b, m = _copy(tiny_bundle, tmp_path)
    (b / "manifest.json").write_text("[" * 200_000)
    with pytest.raises(BundleError, match="not valid JSON"):
        Guard.load(b)
    (b / "manifest.json").write_text('{"format": ' + "7" * 5000 + "}")  # int beyond Python's digit limit
    with pytest.raises(BundleError, match="not valid JSON"):
        Guard.load(b)
    nested: dict = {}
    for _ in range(100):
        nested = {"x": nested}
    _write(b, {**m, "provenance": nested})
    with pytest.raises(BundleError, match="nests deeper than 64"):
        Guard.load(b)
    _write(b, {**m, "provenance": {"pad": "x" * (1 << 20)}})
    with pytest.raises(BundleError, match="larger than"):
        Guard.load(b)
    _write(b, m)
    assert Guard.load(b, limits=BundleLimits(max_manifest_bytes=1 << 16)).manifest == m
    with pytest.raises(BundleError, match="bytes, more than 100$"):
        Guard.load(b, limits=BundleLimits(max_total_bytes=100))


def test_case15_nul_in_names_refused(tiny_bundle, tmp_path):
    with pytest.raises(BundleError, match="not a guard bundle"):
        Guard.load(str(tiny_bundle) + "\x00x")
    b, m = _copy(tiny_bundle, tmp_path)
    m["files"]["calibration.npz\x00evil"] = m["files"]["calibration.npz"]
    _write(b, m)
    with pytest.raises(BundleError, match="not a plain relative path"):
        Guard.load(b)


def test_case15_model_that_is_not_onnx_refused(tiny_bundle, tmp_path):
    from abl_guard.guard.bundle import sha256_file

    b, m = _copy(tiny_bundle, tmp_path)
    (b / "model.onnx").write_bytes(b"this is not a protobuf \xff" * 10)
    m["files"]["model.onnx"] = sha256_file(b / "model.onnx")
    _write(b, m)
    with pytest.raises(BundleError, match="not a usable abl-guard ONNX model"):
        Guard.load(b)


def test_case15_calibrate_on_a_file_that_is_not_onnx_is_one_line(tmp_path):
    from click.testing import CliRunner

    from abl_guard.cli import main

    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01 not onnx")
    r = CliRunner().invoke(main, ["-q", "calibrate", str(junk), "--dataset", "digits", "-o", str(tmp_path / "g")])
    assert r.exit_code not in (0, 2) and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1 and "ONNX" in r.output


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="FIFOs")
def test_fifo_in_a_bundle_is_refused_not_waited_on(tiny_bundle, tmp_path):
    import os

    b, m = _copy(tiny_bundle, tmp_path)
    (b / "calibration.npz").unlink()
    os.mkfifo(b / "calibration.npz")
    with pytest.raises(BundleError, match="missing|not a regular file"):
        Guard.load(b)
    c, _ = _copy(tiny_bundle, tmp_path, "c")
    (c / "manifest.json").unlink()
    os.mkfifo(c / "manifest.json")
    with pytest.raises(BundleError, match="not a guard bundle"):
        Guard.load(c)


def test_npz_declaring_more_than_it_holds_refused(tiny_bundle, tmp_path):
    """A hashed .npz whose header declares 8 TB: refused from the header, never allocated."""
    import io
    import zipfile

    from abl_guard.guard.bundle import sha256_file

    b, m = _copy(tiny_bundle, tmp_path)
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": (10**12,)})
    with zipfile.ZipFile(b / "calibration.npz", "w") as zf:
        zf.writestr("pred.npy", buf.getvalue() + b"\x00" * 64)
    m["files"]["calibration.npz"] = sha256_file(b / "calibration.npz")
    _write(b, m)
    with pytest.raises(BundleError, match="declares shape"):
        Guard.load(b)


def test_case14_report_reads_only_hashed_members(tiny_bundle, tmp_path):
    """`report --bundle` opened calibration.file by itself: it goes through the loader's one resolver too."""
    from abl_guard.guard.report import build_report

    b, m = _copy(tiny_bundle, tmp_path)
    outside = tmp_path / "outside.npz"
    shutil.copyfile(b / m["calibration"]["file"], outside)
    m["calibration"]["file"] = str(outside)
    _write(b, m)
    verdicts = tmp_path / "v.jsonl"
    verdicts.write_text('{"id": "a", "error": "x"}\n')
    with pytest.raises(BundleError, match="outside the bundle|not among the files"):
        build_report(verdicts, b)
