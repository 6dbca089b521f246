"""Single-file bundle archives: round-trip, and every way of tampering with one is refused."""

import json
import zipfile

import pytest

from abl_guard.guard import BundleError, Guard
from abl_guard.guard.bundle import BUNDLE_VERSION, MANIFEST, manifest_digest, open_bundle, pack_bundle, read_manifest


@pytest.fixture
def archive(tiny_bundle, tmp_path):
    return pack_bundle(tiny_bundle, tmp_path / "tiny.guard.zip")


def rewrite(src, dst, change):
    """Copy an archive member by member, letting ``change(name, data)`` return new bytes (or None to drop)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = change(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info, data)
    return dst


def test_archive_round_trip_gives_identical_verdicts(tiny_bundle, archive, digits_test):
    a, b = Guard.load(tiny_bundle), Guard.load(archive)
    assert a.manifest == b.manifest == read_manifest(archive)
    x = digits_test.images[:40]
    va, vb = a.inspect(x), b.inspect(x)
    assert [v.to_json() for v in va] == [v.to_json() for v in vb]
    with zipfile.ZipFile(archive) as zf:
        assert set(zf.namelist()) == {MANIFEST, *a.manifest["files"]}


def test_calibrate_writes_an_archive_directly(tiny_onnx, digits_train, tmp_path):
    from abl_guard.detectors import make_detector
    from abl_guard.guard import calibrate_bundle

    out = tmp_path / "direct.zip"
    m = calibrate_bundle(tiny_onnx, digits_train.images, digits_train.labels, [make_detector("mahalanobis")], out,
                         fpr=0.05)
    assert out.is_file() and zipfile.is_zipfile(out)
    assert not any(p.name.startswith(".bundle-") for p in tmp_path.iterdir()), "staging directory left behind"
    assert Guard.load(out).manifest == m
    with pytest.raises(BundleError, match="exists"):
        calibrate_bundle(tiny_onnx, digits_train.images, digits_train.labels, [make_detector("mahalanobis")], out,
                         fpr=0.05)


@pytest.mark.parametrize("how", ["flip-model", "flip-detector", "drop-calibration", "threshold", "version",
                                 "escape", "not-a-zip"])
def test_tampered_archive_refused(archive, tmp_path, how):
    bad = tmp_path / "bad.zip"
    if how == "not-a-zip":
        bad.write_bytes(archive.read_bytes()[:200])
        match = "not a readable bundle archive"
    else:
        def change(name, data):
            if how.startswith("flip") and name == {"flip-model": "model.onnx",
                                                   "flip-detector": "detectors/mahalanobis.npz"}[how]:
                blob = bytearray(data)
                blob[len(blob) // 2] ^= 0x01
                return bytes(blob)
            if how == "drop-calibration" and name == "calibration.npz":
                return None
            if name == MANIFEST and how in ("threshold", "version", "escape"):
                m = json.loads(data)
                if how == "threshold":  # an edit that would silence the guard
                    m["calibration"]["p_threshold"] = 1e-30
                elif how == "version":
                    m["format_version"] = BUNDLE_VERSION + 1
                    m["manifest_sha256"] = manifest_digest(m)
                else:
                    m["files"]["../../evil.npz"] = "0" * 64
                    m["manifest_sha256"] = manifest_digest(m)
                return json.dumps(m).encode()
            return data

        rewrite(archive, bad, change)
        match = {"flip-model": "SHA-256", "flip-detector": "SHA-256", "drop-calibration": "missing",
                 "threshold": "manifest_sha256", "version": f"version {BUNDLE_VERSION + 1}",
                 "escape": "outside"}[how]
    with pytest.raises(BundleError, match=match):
        Guard.load(bad)
    assert not (tmp_path.parent / "evil.npz").exists()


def test_directory_manifest_edit_refused(tiny_bundle, tmp_path):
    import shutil

    bad = tmp_path / "bad.guard"
    shutil.copytree(tiny_bundle, bad)
    m = json.loads((bad / MANIFEST).read_text())
    m["calibration"]["p_threshold"] = 0.5
    (bad / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="manifest_sha256"):
        Guard.load(bad)


def test_symlink_member_refused(archive, tmp_path):
    bad = tmp_path / "link.zip"
    with zipfile.ZipFile(archive) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "calibration.npz":
                info.external_attr = (0o120777 << 16)  # a symbolic link
            zout.writestr(info, data)
    with pytest.raises(BundleError, match="symbolic link"):
        Guard.load(bad)


def test_open_bundle_extracts_only_listed_files_and_cleans_up(archive, tmp_path):
    extra = tmp_path / "extra.zip"
    rewrite(archive, extra, lambda n, d: d)
    with zipfile.ZipFile(extra, "a") as zf:
        zf.writestr("payload.py", "print('never extracted')")
    with open_bundle(extra) as (root, manifest):
        assert not (root / "payload.py").exists()
        assert (root / "model.onnx").is_file()
        kept = root
    assert not kept.exists()
