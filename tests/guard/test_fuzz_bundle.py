"""Property-based fuzzing of the bundle loader (issue 12): random JSON as the manifest, mutated valid manifests (random
fields, hostile ``files`` names and file references, the self-hash recomputed as an attacker would), random bytes as
an archive, zips with random members and names (``../``, absolute, NUL, backslashes), and byte flips of a valid
archive.

Invariants, for every bundle: :class:`BundleError`, or a successful load whose guard answers an input — no other
exception escapes; nothing is written outside the loader's temporary directory, and that is removed; memory stays
bounded (tracemalloc peak)."""

import hashlib
import io
import json
import os
import shutil
import tempfile
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from abl_guard.guard import BundleError, Guard
from abl_guard.guard.bundle import MANIFEST, manifest_digest, pack_bundle

FUZZ = settings(max_examples=40, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PEAK = 32 * 2**20  # the valid bundle is ~50 KB; anything near this is a size claim being believed

HOSTILE = ["../evil.npz", "../../evil.npz", "/tmp/abl-guard-fuzz-evil", "a\x00b.npz", "a\\..\\evil", "", ".", "./x",
           "x/", "detectors/../calibration.npz", MANIFEST, "detectors//mahalanobis.npz", "x" * 300, "évil", "\udcff",
           "model.onnx", "calibration.npz", "detectors/mahalanobis.npz", "detectors", "calibration.npz/x"]
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
                    | st.sampled_from(HOSTILE),
                    lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=8), ch, max_size=4),
                    max_leaves=12)
# where a mutation lands: manifest paths (strings are keys, ints list indices)
PATHS = [("model", "file"), ("calibration", "file"), ("detectors", 0, "state_file"), ("detectors", 0, "type"),
         ("detectors", 0, "params"), ("detectors", 0, "name"), ("detectors", 0, "two_sided"), ("detectors",),
         ("calibration", "p_threshold"), ("calibration", "combine"), ("calibration", "mondrian"),
         ("calibration", "class_thresholds"), ("calibration", "alarm_null"), ("class_names",), ("files",),
         ("format_version",), ("model",), ("calibration",), ("input",), ("detectors", 0, "tail_kinds")]
EVIL = Path("/tmp/abl-guard-fuzz-evil")


@pytest.fixture(scope="module")
def valid(tiny_bundle):
    """The tiny bundle's files as bytes and its manifest."""
    m = json.loads((tiny_bundle / MANIFEST).read_text())
    return {name: (tiny_bundle / name).read_bytes() for name in m["files"]}, m


@pytest.fixture(scope="module")
def image(digits_test):
    return digits_test.images[:1]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """``in/`` holds what an example writes; ``tmp/`` is the loader's temporary directory (must end up empty)."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "in").mkdir()
    (root / "tmp").mkdir()
    old = tempfile.tempdir
    tempfile.tempdir = str(root / "tmp")
    yield root
    tempfile.tempdir = old


def snapshot(root):
    return {os.path.join(d, f) for d, _, files in os.walk(root) for f in files}


def check_load(bundle, sandbox, image):
    """The invariants around one load of ``bundle`` (a path under ``sandbox/in``)."""
    before = snapshot(sandbox)
    tracemalloc.start()
    try:
        try:
            g = Guard.load(bundle)
        except BundleError as e:
            assert str(e) and "\n" not in str(e).strip()
            g = None
        if g is not None:  # a bundle that loads is usable
            labels, flags = g.predict(image)
            assert labels.shape == (1,) and flags.dtype == bool
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < PEAK, peak
    assert snapshot(sandbox) == before, "the loader wrote outside its temporary directory (or left it behind)"
    assert not os.listdir(sandbox / "tmp")
    assert not EVIL.exists() and not (sandbox / "evil.npz").exists()


def fresh(sandbox):
    return Path(tempfile.mkdtemp(dir=sandbox / "in"))


def write_dir(root, files, manifest):
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


def zip_name(name):
    """A name zipfile can store (it cuts names at NUL and cannot encode lone surrogates), or None."""
    name = name.replace("\x00", "") or "x"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return name


def write_zip(path, members, symlink_first=False):
    """An archive of ``(name, data)`` members (names zipfile cannot store dropped, duplicates once)."""
    seen = set()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            name = zip_name(name)
            if name is None or name in seen:
                continue
            info = zipfile.ZipInfo(name)
            if symlink_first and not seen:
                info.external_attr = 0o120777 << 16
            seen.add(name)
            zf.writestr(info, data)
    return path


def mutate(manifest, path, value, delete):
    """Set (or delete) ``manifest[path]`` where the path exists; returns whether anything changed."""
    node = manifest
    for key in path[:-1]:
        ok = (isinstance(node, dict) and key in node) or (isinstance(node, list) and isinstance(key, int)
                                                          and key < len(node))
        if not ok:
            return False
        node = node[key]
    last = path[-1]
    if isinstance(node, dict):
        if delete:
            node.pop(last, None)
        else:
            node[last] = value
        return True
    if isinstance(node, list) and isinstance(last, int) and last < len(node):
        node[last] = value
        return True
    return False


@FUZZ
@given(value=JSON, as_dict=st.booleans(), rehash=st.booleans())
def test_random_json_manifest_is_refused(valid, sandbox, image, value, as_dict, rehash):
    files, _ = valid
    manifest = value
    if as_dict:  # past the format check, so the deeper checks see it
        manifest = {**(value if isinstance(value, dict) else {"x": value}), "format": "abl-guard-bundle",
                    "format_version": 2}
        if rehash:
            manifest["manifest_sha256"] = manifest_digest(manifest)
    root = write_dir(fresh(sandbox), files, manifest)
    check_load(root, sandbox, image)
    shutil.rmtree(root)


@FUZZ
@given(ops=st.lists(st.tuples(st.sampled_from(PATHS), JSON | st.sampled_from(HOSTILE), st.booleans()), max_size=3),
       extra=st.dictionaries(st.sampled_from(HOSTILE) | st.text(max_size=6), st.sampled_from(["0" * 64, "model"]),
                             max_size=2),
       rehash=st.booleans(), archive=st.booleans())
def test_mutated_manifest_is_refused_or_loads(valid, sandbox, image, ops, extra, rehash, archive):
    files, m = valid
    manifest = json.loads(json.dumps(m))
    for path, value, delete in ops:
        mutate(manifest, path, value, delete)
    if isinstance(manifest.get("files"), dict):
        for name, digest in extra.items():  # random `files` entries, some with a real file's hash
            manifest["files"][name] = hashlib.sha256(files["model.onnx"]).hexdigest() if digest == "model" else digest
    if rehash:
        manifest["manifest_sha256"] = manifest_digest(manifest)
    work = fresh(sandbox)
    if archive:
        members = [(MANIFEST, json.dumps(manifest).encode())] + list(files.items())
        members += [(n, files["model.onnx"]) for n in extra]
        bundle = write_zip(work / "b.zip", members)
    else:
        bundle = write_dir(work / "b", files, manifest)
    check_load(bundle, sandbox, image)
    shutil.rmtree(work)


@FUZZ
@given(data=st.binary(max_size=600), prefix=st.sampled_from([b"", b"PK\x03\x04", b"PK\x05\x06"]))
def test_random_bytes_archive_is_refused(sandbox, image, data, prefix):
    work = fresh(sandbox)
    (work / "b.zip").write_bytes(prefix + data)
    check_load(work / "b.zip", sandbox, image)
    shutil.rmtree(work)


@FUZZ
@given(members=st.lists(st.tuples(st.sampled_from(HOSTILE) | st.text(max_size=10), st.binary(max_size=64)),
                        max_size=4),
       listed=st.booleans(), symlink=st.booleans())
def test_zip_with_random_members_is_refused(valid, sandbox, image, members, listed, symlink):
    """Random member names (``../``, absolute, NUL, backslashes); with ``listed`` a manifest that lists them with
    their real hashes, so only the name checks stand between them and the disk."""
    _, m = valid
    work = fresh(sandbox)
    members = [(zip_name(n), d) for n, d in members if zip_name(n) is not None]
    entries = list(members)
    if listed:
        manifest = {**m, "files": {n: hashlib.sha256(d).hexdigest() for n, d in members}}
        manifest["files"].setdefault("model.onnx", "0" * 64)
        manifest["manifest_sha256"] = manifest_digest(manifest)
        entries.append((MANIFEST, json.dumps(manifest).encode()))
    path = write_zip(work / "b.zip", entries, symlink_first=symlink)
    check_load(path, sandbox, image)
    shutil.rmtree(work)


@pytest.fixture(scope="module")
def archive_bytes(tiny_bundle, tmp_path_factory):
    return pack_bundle(tiny_bundle, tmp_path_factory.mktemp("arch") / "b.zip").read_bytes()


@FUZZ
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.none() | st.floats(0, 1))
def test_flipped_archive_is_refused_or_loads(archive_bytes, sandbox, image, flips, cut):
    blob = bytearray(archive_bytes)
    for where, byte in flips:
        blob[int(where * len(blob))] = byte
    if cut is not None:
        blob = blob[: int(cut * len(blob))]
    work = fresh(sandbox)
    (work / "b.zip").write_bytes(bytes(blob))
    check_load(work / "b.zip", sandbox, image)
    shutil.rmtree(work)


def test_fuzz_harness_sees_a_valid_bundle_load(valid, sandbox, image):
    """The harness itself: an unmodified bundle (directory and archive) loads and answers."""
    files, m = valid
    work = fresh(sandbox)
    check_load(write_dir(work / "b", files, m), sandbox, image)
    check_load(write_zip(work / "b.zip", [(MANIFEST, json.dumps(m).encode()), *files.items()]), sandbox, image)
    assert Guard.load(work / "b.zip").manifest == m
    shutil.rmtree(work)


def test_npz_members_of_random_shapes_never_allocate_their_claim(valid, sandbox, image):
    """A hashed calibration.npz whose .npy headers claim huge shapes is refused from the header."""
    files, m = valid
    for shape in [(2**40,), (2**20, 2**20), (0, 2**62)]:
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": shape})
        npz = io.BytesIO()
        with zipfile.ZipFile(npz, "w") as zf:
            zf.writestr("pred.npy", buf.getvalue() + b"\x00" * 16)
        bad = {**files, "calibration.npz": npz.getvalue()}
        manifest = {**m, "files": {**m["files"], "calibration.npz": hashlib.sha256(npz.getvalue()).hexdigest()}}
        manifest["manifest_sha256"] = manifest_digest(manifest)
        work = fresh(sandbox)
        check_load(write_dir(work / "b", bad, manifest), sandbox, image)
        shutil.rmtree(work)
