"""Property-based fuzzing of the scan sources: random bytes as .png/.npy/.npz/.jsonl, random .npy headers (shapes,
dtypes, Fortran flags, versions, data shorter or longer than declared), mutated valid files and random JSONL lines.

Invariants, for every input: exactly one item per input file (or per array row, plus at most one record for a lost
tail) and per non-blank JSONL line; no exception escapes; every item is a model-ready image or an error; memory stays
bounded (tracemalloc peak); nothing is written; and skipping every id of a first pass yields nothing (resume)."""

import io
import json
import math
import os
import struct
import tempfile
import tracemalloc
import zipfile
from collections import Counter

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from abl_guard.guard.sources import SourceLimits, iter_inputs

SHAPE = (1, 8, 8)
LIMITS = SourceLimits(max_pixels=64 * 64, max_line_bytes=2048, block_bytes=4096, max_whole_array_bytes=8192)
PEAK = 8 * 2**20  # inputs are at most tens of KB: anything near this is a file's claim being believed
FUZZ = settings(max_examples=40, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def npy_header(shape, descr, fortran, version):
    d = repr({"descr": descr, "fortran_order": fortran, "shape": tuple(shape)}).encode("latin1")
    fmt, size = ("<H", 10) if version == (1, 0) else ("<I", 12)
    d += b" " * ((64 - (size + len(d) + 1) % 64) % 64) + b"\n"
    return b"\x93NUMPY" + bytes(version) + struct.pack(fmt, len(d)) + d


def snapshot(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            st_ = os.lstat(os.path.join(d, f))
            out[os.path.join(d, f)] = (st_.st_size, st_.st_mtime_ns)
    return out


def expected_lines(raw: bytes) -> int:
    """Non-blank lines of a JSONL byte string, the way a line is one input: split on newlines; a line that is not
    UTF-8 or too long counts; a decodable one counts unless it is whitespace (a first-line BOM aside)."""
    n = 0
    for k, seg in enumerate(raw.split(b"\n")):
        if len(seg) > LIMITS.max_line_bytes:
            n += 1
            continue
        try:
            text = seg.decode("utf-8")
        except UnicodeDecodeError:
            n += 1
            continue
        if k == 0 and text.startswith("\ufeff"):
            text = text[1:]
        n += bool(text.strip())
    return n


def check_items(items, paths):
    """Group the items by input file and check each group's shape; returns {path: [items]}."""
    for it in items:
        assert (it.image is None) != (it.error is None), it
        if it.image is not None:
            assert it.image.shape == SHAPE and it.image.dtype == np.float32
            assert np.isfinite(it.image).all() and it.image.min() >= 0.0 and it.image.max() <= 1.0
        else:
            assert isinstance(it.error, str) and 0 < len(it.error) <= 500
            it.error.encode("utf-8")  # writable as UTF-8
    groups = {}
    for it in items:
        key = next((p for p in paths if it.id == p or it.id.startswith(p + "#")), None)
        assert key is not None, it.id
        groups.setdefault(key, []).append(it)
    return groups


def run_inputs(root, paths, stdin=None):
    """iter_inputs over ``paths`` checking memory and that nothing is written; then the resume property."""
    before = snapshot(root)
    tracemalloc.start()
    try:
        items = list(iter_inputs(paths, SHAPE, stdin=stdin() if stdin else None, limits=LIMITS))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < PEAK, peak
    assert snapshot(root) == before
    left = Counter(i.id for i in items)
    asked = Counter()

    def skip(iid):
        asked[iid] += 1
        if left[iid]:
            left[iid] -= 1
            return True
        return False

    assert list(iter_inputs(paths, SHAPE, skip=skip, stdin=stdin() if stdin else None, limits=LIMITS)) == []
    assert asked == Counter(i.id for i in items)
    return items


def check_array_group(group, path):
    """An array file: one record for the file, or its rows ``#0..#m-1`` in order plus at most one record for the
    rest of the file."""
    ids = [i.id for i in group]
    if ids == [path]:
        return
    tail = ids[-1] == path
    rows = ids[:-1] if tail else ids
    assert rows == [f"{path}#{k}" for k in range(len(rows))], ids[:5]


DTYPES = ["|u1", "<f4", ">f8", "<f2", "<i4", "|b1", "<c8", "|O", "<U2", "|V4", "<M8[s]", [("a", "|u1")],
          "|u1", "<f4"]
dims = st.one_of(st.integers(0, 12), st.sampled_from([8, 8, 1, 1]), st.integers(0, 2**62))


@st.composite
def npy_bytes(draw):
    shape = draw(st.one_of(st.lists(dims, max_size=5), st.sampled_from([[3, 8, 8, 1], [2, 1, 8, 8], [8, 8, 1],
                                                                        [4, 8, 8], [0, 8, 8, 1]])))
    descr = draw(st.sampled_from(DTYPES))
    fortran = draw(st.booleans())
    version = draw(st.sampled_from([(1, 0), (2, 0), (1, 0), (3, 0)]))
    head = npy_header(shape, descr, fortran, version)
    try:
        exact = math.prod(shape) * np.dtype(descr if isinstance(descr, str) else descr).itemsize
    except TypeError:
        exact = 0
    size = draw(st.sampled_from(["exact", "short", "long", "random"]))
    if size == "exact" and exact <= 20_000:
        n = exact
    elif size == "short":
        n = draw(st.integers(0, max(0, min(exact - 1, 20_000))))
    elif size == "long":
        n = min(exact, 20_000) + draw(st.integers(1, 200))
    else:
        n = draw(st.integers(0, 2000))
    data = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(0, 256, n, dtype=np.uint8).tobytes()
    if descr in ("<f4", ">f8", "<f2") and draw(st.booleans()):  # floats in [0, 1] so that rows can pass
        dt = np.dtype(descr)
        data = (np.random.default_rng(n).random(n // dt.itemsize)).astype(dt).tobytes()
    return head + data


@given(data=npy_bytes(), container=st.sampled_from(["npy", "npz-stored", "npz-deflated"]))
@settings(FUZZ, max_examples=120)
def test_fuzz_npy_headers_and_sizes(data, container):
    with tempfile.TemporaryDirectory() as root:
        path = os.path.join(root, f"a.{container[:3]}")
        if container == "npy":
            with open(path, "wb") as f:
                f.write(data)
        else:
            method = zipfile.ZIP_STORED if container == "npz-stored" else zipfile.ZIP_DEFLATED
            with zipfile.ZipFile(path, "w", method) as zf:
                zf.writestr("images.npy", data)
        items = run_inputs(root, [path])
        groups = check_items(items, [path])
        assert list(groups) == [path]
        check_array_group(groups[path], path)


@st.composite
def mutated(draw):
    """A valid small file of some kind with random bytes overwritten, inserted or cut."""
    kind = draw(st.sampled_from(["png", "npy", "npz", "jsonl", "gif", "bmp"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    img = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    buf = io.BytesIO()
    if kind in ("png", "gif", "bmp"):
        Image.fromarray(img).save(buf, format=kind.upper())
    elif kind == "npy":
        np.save(buf, rng.integers(0, 256, (3, 8, 8, 1), dtype=np.uint8))
    elif kind == "npz":
        np.savez_compressed(buf, images=rng.integers(0, 256, (3, 8, 8, 1), dtype=np.uint8), labels=np.arange(3))
    else:
        buf.write(b'{"id": "a", "path": "x.png"}\n["b"]\n{"image": "iVBORw0KGgo="}\n')
    raw = bytearray(buf.getvalue())
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "insert", "cut"]))
        at = draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[at] = draw(st.integers(0, 255))
        elif op == "insert":
            raw[at:at] = draw(st.binary(max_size=16))
        else:
            del raw[at : at + draw(st.integers(1, 64))]
    return kind, bytes(raw)


@given(files=st.lists(mutated(), min_size=1, max_size=4))
@settings(FUZZ, max_examples=100)
def test_fuzz_mutated_files_in_a_folder(files):
    with tempfile.TemporaryDirectory() as root:
        d = os.path.join(root, "in")
        os.mkdir(d)
        paths = []
        for k, (kind, raw) in enumerate(files):
            p = os.path.join(d, f"{k}.{kind}")
            with open(p, "wb") as f:
                f.write(raw)
            paths.append(p)
        items = run_inputs(root, [d])  # a folder: JSONL inside is data ("unsupported file type")
        groups = check_items(items, paths)
        assert list(groups) == paths  # input order, nothing dropped
        for p in paths:
            if p.endswith((".npy", ".npz")):
                check_array_group(groups[p], p)
            else:
                assert len(groups[p]) == 1


@given(raw=st.binary(max_size=3000), ext=st.sampled_from([".png", ".npy", ".npz", ".jsonl", ".tif", ".webp"]))
@settings(FUZZ, max_examples=100)
def test_fuzz_random_bytes_as_any_file(raw, ext):
    with tempfile.TemporaryDirectory() as root:
        path = os.path.join(root, "x" + ext)
        with open(path, "wb") as f:
            f.write(raw)
        items = run_inputs(root, [path])
        if ext == ".jsonl":
            assert len(items) == expected_lines(raw)
            for it in items:
                assert (it.image is None) != (it.error is None)
        else:
            groups = check_items(items, [path])
            if ext in (".npy", ".npz"):
                check_array_group(groups[path], path)
            else:
                assert len(groups[path]) == 1


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                                                      max_size=4), max_leaves=12)
line_objects = st.fixed_dictionaries({}, optional={
    "id": st.one_of(st.text(max_size=30), st.integers(), st.floats(), json_values),
    "path": st.one_of(st.text(max_size=30), st.sampled_from(["/dev/zero", "..", "/", "a\x00b", "x.png"]),
                      json_values),
    "image": st.one_of(st.binary(max_size=200).map(lambda b: __import__("base64").b64encode(b).decode()),
                       st.text(max_size=40), st.just("data:image/png;base64,"), json_values),
})
lines = st.one_of(
    line_objects.map(lambda o: json.dumps(o).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=80).map(lambda b: b.replace(b"\n", b"")),
    st.sampled_from([b"[" * 5000, b"{" * 3000, b'{"id": ' + b"9" * 5000 + b"}", b"\xef\xbb\xbf{}", b"  ",
                     b"\xff\xfe", b'"' + b"a" * 3000 + b'"', b"\r"]),
)


@given(body=st.lists(lines, max_size=12), trailing=st.booleans(), via=st.sampled_from(["file", "stdin-bytes",
                                                                                     "stdin-text"]))
@settings(FUZZ, max_examples=150)
def test_fuzz_jsonl_lines(body, trailing, via):
    raw = b"\n".join(body) + (b"\n" if trailing and body else b"")
    with tempfile.TemporaryDirectory() as root:
        cwd = os.getcwd()
        os.chdir(root)  # relative "path" lines resolve here, for stdin
        try:
            if via == "file":
                path = os.path.join(root, "l.jsonl")
                with open(path, "wb") as f:
                    f.write(raw)
                items = run_inputs(root, [path])
            else:
                def stream():
                    b = io.BytesIO(raw)
                    return b if via == "stdin-bytes" else io.TextIOWrapper(b, encoding="utf-8")
                items = run_inputs(root, ["-"], stdin=stream)
        finally:
            os.chdir(cwd)
    assert len(items) == expected_lines(raw)
    for it in items:
        assert (it.image is None) != (it.error is None)
        if it.error is not None:
            assert len(it.error) <= 500
            it.error.encode("utf-8")
        it.id.encode("utf-8")
