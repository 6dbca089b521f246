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


# ------------------------------------------------------------------------------------------------ issue 12: bombs


def _declare(path, name, size):
    """Rewrite the uncompressed size the zip's central directory declares for ``name`` (what a zip bomb lies about)."""
    import struct

    blob = bytearray(path.read_bytes())
    i = blob.find(b"PK\x01\x02")
    while i >= 0:
        n = struct.unpack_from("<H", blob, i + 28)[0]
        if blob[i + 46 : i + 46 + n] == name.encode():
            struct.pack_into("<I", blob, i + 24, size)
            path.write_bytes(bytes(blob))
            return path
        i = blob.find(b"PK\x01\x02", i + 46)
    raise AssertionError(f"{name} not in {path}")


@pytest.fixture
def no_extraction(monkeypatch):
    """Fails the test if a bundle archive starts extracting (the temporary directory is created only for that)."""
    import abl_guard.guard.bundle as bundle_mod

    def refuse(*a, **k):
        raise AssertionError("extraction started")

    monkeypatch.setattr(bundle_mod.tempfile, "TemporaryDirectory", refuse)


@pytest.mark.parametrize("member, size, match", [("model.onnx", 2_100_000_000, "to 2100000000 .*zip bomb"),
                                                 ("model.onnx", 3_000_000_000, "more than 2147483648"),
                                                 ("manifest.json", 1_000_000_000, "declares 1000000000 bytes")])
def test_case13_zip_bomb_refused_from_the_zip_directory(archive, tmp_path, no_extraction, member, size, match):
    """model.onnx 3.3 MB -> 2.1 GB and manifest.json -> 1 GB were refused only after writing 2.1 GB and reading the
    manifest whole; the declared sizes now refuse them before anything is extracted or read."""
    bad = _declare(rewrite(archive, tmp_path / "bomb.zip", lambda n, d: d), member, size)
    with pytest.raises(BundleError, match=match):
        Guard.load(bad)
    with pytest.raises(BundleError, match=match):
        read_manifest(bad, verify=False)


def test_case13_real_deflate_bomb_refused_under_a_cap_and_streamed_otherwise(archive, tmp_path, monkeypatch):
    """A 64 MB model of zeros (64 KB deflated) with a valid hash: refused by the expansion ratio or a size cap before
    extraction, and extracted with bounded memory (streamed, hashed in chunks) when the limits allow it."""
    import hashlib
    import tracemalloc

    from abl_guard.guard.bundle import BundleLimits

    zeros = b"\x00" * (64 << 20)
    bad = tmp_path / "zeros.zip"
    with zipfile.ZipFile(archive) as zin, zipfile.ZipFile(bad, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == MANIFEST:
                m = json.loads(data)
                m["files"]["model.onnx"] = hashlib.sha256(zeros).hexdigest()
                m["manifest_sha256"] = manifest_digest(m)
                data = json.dumps(m).encode()
            zout.writestr(info.filename, zeros if info.filename == "model.onnx" else data)
    del zeros
    assert bad.stat().st_size < 1 << 20
    for limits, match in ((None, "zip bomb"), (BundleLimits(max_total_bytes=1 << 20), "more than 1048576")):
        with pytest.raises(BundleError, match=match), open_bundle(bad, limits):
            pass
    tracemalloc.start()
    try:
        with pytest.raises(BundleError, match="not a usable abl-guard ONNX model"):
            Guard.load(bad, limits=BundleLimits(max_ratio=10_000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak  # 64 MB went through 1 MiB blocks


def test_case13_member_yielding_more_than_it_declares_stops(archive, tmp_path):
    bad = _declare(rewrite(archive, tmp_path / "lie.zip", lambda n, d: d), "calibration.npz", 100)
    with pytest.raises(BundleError, match="CRC|more than the 100 bytes|SHA-256"):
        Guard.load(bad)


def test_case13_too_many_members_refused(archive, tmp_path, no_extraction):
    bad = rewrite(archive, tmp_path / "many.zip", lambda n, d: d)
    with zipfile.ZipFile(bad, "a") as zf:
        for i in range(1001):
            zf.writestr(f"junk/{i}", b"")
    with pytest.raises(BundleError, match="entries"):
        Guard.load(bad)


@pytest.mark.parametrize("name", ["../evil.npz", "/tmp/evil.npz", "model.onnx\x00.npz", "a\\..\\evil.npz"])
def test_case14_archive_file_fields_must_be_hashed_members(archive, tmp_path, name):
    def change(n, data):
        if n == MANIFEST:
            m = json.loads(data)
            m["calibration"]["file"] = name
            m["manifest_sha256"] = manifest_digest(m)
            return json.dumps(m).encode()
        return data

    bad = rewrite(archive, tmp_path / "field.zip", change)
    with pytest.raises(BundleError, match="outside the bundle"):
        Guard.load(bad)


def test_case15_archive_with_a_deep_manifest_refused(archive, tmp_path):
    bad = rewrite(archive, tmp_path / "deep.zip", lambda n, d: b"[" * 100_000 if n == MANIFEST else d)
    with pytest.raises(BundleError, match="not valid JSON"):
        Guard.load(bad)
