"""Hostile inputs to the scan sources (issue 12): each gets exactly one record, fast, in bounded memory — never a hang,
a traceback or a flood of records. Tests are named after the reported cases (case1 ... case12) and their family."""

import base64
import io
import json
import os
import socket
import stat
import struct
import threading
import tracemalloc
import zipfile
import zlib
from collections import Counter

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from abl_guard.cli import main
from abl_guard.guard import Guard
from abl_guard.guard.scan import read_records, scan_sources
from abl_guard.guard.sources import SourceLimits, canonical_id, decode_image, iter_inputs, read_source

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def guard(tiny_bundle):
    return Guard.load(tiny_bundle)


def png_bytes(a, **kw):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", **kw)
    return buf.getvalue()


def items_of(sources, **kw):
    return list(iter_inputs([str(s) for s in sources], SHAPE, **kw))


def run_with_timeout(fn, timeout=20.0):
    """``fn()`` in a daemon thread; fails (instead of hanging the suite) when it does not return in time."""
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("v", fn()), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the source blocked"
    return out["v"]


def npy_header(shape, descr="|u1", fortran=False, version=(1, 0)):
    d = repr({"descr": descr, "fortran_order": fortran, "shape": tuple(shape)}).encode("latin1")
    fmt, size = ("<H", 10) if version == (1, 0) else ("<I", 12)
    d += b" " * ((64 - (size + len(d) + 1) % 64) % 64) + b"\n"
    return b"\x93NUMPY" + bytes(version) + struct.pack(fmt, len(d)) + d


def peak_bytes(fn):
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ------------------------------------------------------------------------------------------------ case 1


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
def test_case1_fifo_and_other_non_regular_files_are_error_records_never_opened(tmp_path, monkeypatch, digits_test):
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(digits_test.images[0, ..., 0]).save(d / "a.png")
    os.mkfifo(d / "b.png")
    os.mkfifo(d / "c.npy")
    os.mkfifo(d / "d.txt")
    monkeypatch.chdir(tmp_path)  # AF_UNIX paths are short
    sock = socket.socket(socket.AF_UNIX)
    sock.bind("in/e.png")
    os.symlink("/dev/null", d / "f.png")
    os.symlink(d / "missing.png", d / "g.png")  # dangling
    os.symlink(d / "h.png", d / "h.png")  # a loop onto itself
    os.symlink(tmp_path, d / "i_link")  # a symlinked folder: not followed (a cycle)
    os.mkfifo(tmp_path / "top.npz")
    j = tmp_path / "list.jsonl"
    j.write_text(json.dumps({"path": "in/b.png"}) + "\n" + json.dumps({"id": "dev", "path": "/dev/zero"}) + "\n")
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: opened.append(os.fsdecode(p)) or real_open(p, *a, **k))
    try:
        items = run_with_timeout(lambda: items_of([d, tmp_path / "top.npz", j]))
    finally:
        sock.close()
    by_id = {i.id: i for i in items}
    assert len(items) == len(by_id) == 12
    assert by_id[str(d / "a.png")].error is None
    for name, kind in [("b.png", "a FIFO"), ("c.npy", "a FIFO"), ("d.txt", "a FIFO"), ("e.png", "a socket"),
                       ("f.png", "a character device"), ("i_link", "a folder (a symbolic link")]:
        assert by_id[str(d / name)].error.startswith(f"not a regular file: {kind}"), by_id[str(d / name)]
    assert by_id[str(d / "g.png")].error.startswith("dangling symbolic link")
    assert by_id[str(d / "h.png")].error.startswith("unreadable file: Too many levels of symbolic links")
    assert by_id[str(tmp_path / "top.npz")].error.startswith("not a regular file: a FIFO")
    assert by_id[f"{j}:1"].error.startswith("not a regular file: a FIFO")
    assert by_id["dev"].error.startswith("not a regular file: a character device")
    assert not {p for p in opened if not p.endswith(("a.png", "list.jsonl"))}, opened


def test_case1_a_file_swapped_for_a_fifo_after_the_check_is_refused_by_fstat(tmp_path, monkeypatch):
    """``O_NONBLOCK`` + ``fstat``: even when the ``stat`` check is raced, a FIFO never blocks the scan."""
    from abl_guard.guard import sources

    os.mkfifo(tmp_path / "x.png")
    monkeypatch.setattr(sources, "_check_regular", lambda p: None)  # the race: the check saw a regular file
    items = run_with_timeout(lambda: items_of([tmp_path / "x.png"]))
    assert [i.error for i in items] == [f"not a regular file: a FIFO: {tmp_path / 'x.png'}"]


# ------------------------------------------------------------------------------------------------ case 2


def test_case2_deep_nesting_huge_numbers_and_bad_ids_are_one_record_each(tmp_path, digits_test):
    good = json.dumps({"id": "ok", "image": base64.b64encode(png_bytes(digits_test.images[0, ..., 0])).decode()})
    lines = ["[" * 100_000, '{"id": ' + "9" * 5000 + "}", "[" * 900 + "]" * 900, '{"a": ' + "[" * 5000 + "]" * 5000
             + "}", json.dumps({"id": ["x"], "path": "a.png"}), json.dumps({"id": "y" * 5000, "path": "a.png"}),
             "[" + ",".join(["0"] * 20_000) + "]", good]
    j = tmp_path / "evil.jsonl"
    j.write_text("\n".join(lines) + "\n")
    items = items_of([j])
    assert [i.id for i in items] == [f"{j}:{k}" for k in range(1, 8)] + ["ok"]
    errs = [i.error for i in items[:-1]]
    assert all(e.startswith(("invalid JSON line", "JSONL line must be", "invalid id", "JSONL line has neither"))
               for e in errs), errs
    assert "more than 10000 values" in errs[0] and "ValueError" in errs[1] and "invalid id" in errs[4]
    assert "longer than 4096" in errs[5] and items[-1].error is None


def test_case2_resume_survives_the_same_lines(guard, tmp_path):
    j = tmp_path / "evil.jsonl"
    j.write_text("[" * 100_000 + "\n" + '{"id": ' + "9" * 5000 + "}\n")
    out = tmp_path / "v.jsonl"
    s1 = scan_sources(guard, [str(j)], out, quiet=True)
    s2 = scan_sources(guard, [str(j)], out, quiet=True, resume=True)
    assert s1.total == s1.errors == 2 and s2.total == 2 and s2.resumed == 2
    assert [r["id"] for r in read_records(out)] == [f"{j}:1", f"{j}:2"]


def test_case2_over_long_line_is_one_record_and_never_held_whole(tmp_path, digits_test):
    good = json.dumps({"id": "after", "image": base64.b64encode(png_bytes(digits_test.images[1, ..., 0])).decode()})
    j = tmp_path / "long.jsonl"
    with open(j, "wb") as f:
        f.write(b'{"id": "before", "path": "nope.png"}\n')
        f.write(b'{"id": "x", "image": "' + b"A" * (20 * 2**20) + b'"}\n')  # 20 MiB
        f.write(good.encode() + b"\n")
        f.write(b"B" * (3 * 2**20))  # an over-long last line without a newline
    limits = SourceLimits(max_line_bytes=2**16)
    got = []
    peak = peak_bytes(lambda: got.extend(iter_inputs([str(j)], SHAPE, limits=limits)))
    assert [i.id for i in got] == ["before", f"{j}:2", "after", f"{j}:4"]
    assert "longer than 65536 bytes" in got[1].error and "longer than 65536 bytes" in got[3].error
    assert got[2].error is None
    assert peak < 8 * 2**20, peak  # pieces of the line, never the line


# ------------------------------------------------------------------------------------------------ case 3


def test_case3_npy_header_that_disagrees_with_the_file_size_is_one_record(tmp_path):
    p = tmp_path / "liar.npy"
    p.write_bytes(npy_header((30_000_000, 8, 8, 1)).ljust(128, b" "))
    got = []
    peak = peak_bytes(lambda: got.extend(iter_inputs([str(p)], SHAPE)))
    assert len(got) == 1 and got[0].id == str(p) and "header declares shape (30000000, 8, 8, 1)" in got[0].error
    assert peak < 2 * 2**20, peak


def test_case3_npz_member_size_is_checked_against_the_zip_directory(tmp_path, digits_test):
    p = tmp_path / "liar.npz"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("images.npy", npy_header((30_000_000, 8, 8, 1)) + digits_test.images[:3].tobytes())
    got = items_of([p])
    assert len(got) == 1 and "header declares shape (30000000, 8, 8, 1)" in got[0].error


def _patch_sizes(path, size):
    """Make a single-member stored zip claim ``size`` bytes (local header and central directory)."""
    raw = bytearray(path.read_bytes())
    loc = raw.find(b"PK\x03\x04")
    raw[loc + 18 : loc + 26] = struct.pack("<II", size, size)
    cen = raw.find(b"PK\x01\x02")
    raw[cen + 20 : cen + 28] = struct.pack("<II", size, size)
    path.write_bytes(bytes(raw))


def test_case3_a_lying_zip_directory_costs_one_record_not_one_per_declared_row(tmp_path, digits_test):
    """The directory, the header and the shape agree on 30,000,000 rows; the data holds 3: the rows read get verdicts
    and the rest of the file ONE record (never 30,000,000 records or a list of their ids)."""
    p = tmp_path / "lying_dir.npz"
    head = npy_header((30_000_000, 8, 8, 1))
    with zipfile.ZipFile(p, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("images.npy", head + digits_test.images[:3].tobytes())
    _patch_sizes(p, len(head) + 30_000_000 * 64)
    got = []
    peak = peak_bytes(lambda: got.extend(iter_inputs([str(p)], SHAPE, limits=SourceLimits(block_bytes=4096))))
    k = len(got) - 1  # rows read before the data ran out (zipfile may drop a partial read's bytes)
    assert [i.id for i in got] == [f"{p}#{r}" for r in range(k)] + [str(p)] and k <= 3
    assert got[-1].error.startswith(f"unreadable array rows: rows {k}-29999999 of 30000000 lost: EOFError")
    assert peak < 4 * 2**20, peak


def test_case3_rows_are_streamed_in_blocks_with_batch_sized_id_lists(tmp_path, monkeypatch):
    """A genuinely large array: memory stays at one block while the items are consumed one at a time."""
    n = 60_000
    p = tmp_path / "big.npy"
    np.save(p, np.random.default_rng(0).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8))  # 3.8 MB
    count = 0

    def consume():
        nonlocal count
        for it in iter_inputs([str(p)], SHAPE):
            count += it.error is None

    peak = peak_bytes(consume)
    assert count == n
    assert peak < 2 * 2**20, peak  # one block of 1024 rows as float32 is 256 KB; all 60,000 ids would be ~6 MB


# ------------------------------------------------------------------------------------------------ case 5


def _unreadable_folder(d, digits_test):
    d.mkdir()
    np.save(d / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.savez(d / "pickled.npz", images=np.array([{"a": 1}], dtype=object))
    np.save(d / "flat.npy", np.zeros(10))
    np.save(d / "zero_rows.npy", np.zeros((0, 8, 8, 1), np.uint8))
    np.save(d / "wrong.npy", np.zeros((3, 5, 5), np.uint8))
    (d / "bad.png").write_bytes(b"\x89PNG nope")
    (d / "cut.npy").write_bytes(npy_header((5, 8, 8, 1)) + b"\0" * 10)
    (d / "notes.txt").write_text("x")
    (d / "broken.npz").write_bytes(b"PK\x03\x04 broken")
    fl = digits_test.images[:3].astype(np.float32) / 255
    fl[1, 0, 0, 0] = np.inf
    np.save(d / "inf.npy", fl)
    np.save(d / "ok.npy", digits_test.images[:4])
    return d


def test_case5_resume_never_duplicates_error_records(guard, tmp_path, digits_test):
    d = _unreadable_folder(tmp_path / "in", digits_test)
    out = tmp_path / "v.jsonl"
    first = scan_sources(guard, [str(d)], out, quiet=True)
    ids = [r["id"] for r in read_records(out)]
    assert first.errors == 9 + 1 and len(ids) == len(set(ids)) == first.total == 9 + 3 + 4  # 9 bad files, 1 inf row
    for _ in range(2):
        again = scan_sources(guard, [str(d)], out, quiet=True, resume=True)
        assert again.total == first.total and again.resumed == first.total
        assert [r["id"] for r in read_records(out)] == ids


def test_case5_every_record_respects_skip_exactly_once(tmp_path, digits_test):
    """Skipping every id of a first pass yields nothing, and ``skip`` is asked once per record it suppresses."""
    d = _unreadable_folder(tmp_path / "in", digits_test)
    j = tmp_path / "l.jsonl"
    j.write_text('[[\n"in/ok.npy"\n{"id": 1}\n\xff\n{"path": "in/bad.png"}\n{"id": "", "path": "in/bad.png"}\n')
    sources = [d, j, tmp_path / "missing", tmp_path / "l.jsonl"]
    first = items_of(sources)
    left = Counter(i.id for i in first)
    asked = Counter()

    def skip(iid):
        asked[iid] += 1
        if left[iid]:
            left[iid] -= 1
            return True
        return False

    assert "" in left  # an empty id is an id like any other (not replaced by the path)
    assert items_of(sources, skip=skip) == []
    assert asked == Counter(i.id for i in first)


# ------------------------------------------------------------------------------------------------ case 9


def test_case9_ids_are_canonical_so_resume_matches_any_spelling(guard, tmp_path, monkeypatch, digits_test):
    data = tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    for k in range(3):
        Image.fromarray(digits_test.images[k, ..., 0]).save(data / "imgs" / f"{k}.png")
    np.save(data / "a.npy", digits_test.images[:5])
    (data / "l.jsonl").write_text(json.dumps({"path": "imgs/0.png"}) + "\n")
    out = tmp_path / "v.jsonl"
    monkeypatch.chdir(data)
    first = scan_sources(guard, ["imgs", "a.npy", "./l.jsonl"], out, quiet=True)
    ids = [r["id"] for r in read_records(out)]
    assert ids == [str(data / "imgs" / f"{k}.png") for k in range(3)] + [f"{data / 'a.npy'}#{k}" for k in range(5)] \
        + [f"{data / 'l.jsonl'}:1"]
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    again = scan_sources(guard, ["../data/imgs/", str(data / "sub" / ".." / "a.npy"), "../data//l.jsonl"], out,
                         quiet=True, resume=True)
    assert again.resumed == first.total == again.total == 9
    assert [r["id"] for r in read_records(out)] == ids
    assert canonical_id("../data/./a.npy") == str(data / "a.npy")


# ------------------------------------------------------------------------------------------------ case 10


def test_case10_hidden_files_and_folders_are_scanned_or_accounted_for(tmp_path, digits_test):
    d = tmp_path / "in"
    (d / ".secret" / "deep").mkdir(parents=True)
    for p in [d / ".x.png", d / "y.png", d / ".secret" / "deep" / "z.png"]:
        Image.fromarray(digits_test.images[0, ..., 0]).save(p)
    got = items_of([d])
    assert [i.id for i in got] == [str(d / ".secret" / "deep" / "z.png"), str(d / ".x.png"), str(d / "y.png")]
    assert all(i.error is None for i in got)
    got = items_of([d], limits=SourceLimits(skip_hidden=True))
    assert [(i.id, i.error) for i in got] == [
        (str(d / ".secret"), "skipped: hidden folder (not walked) (--skip-hidden)"),
        (str(d / ".x.png"), "skipped: hidden file (--skip-hidden)"), (str(d / "y.png"), None)]


def test_case10_cli_skip_hidden(tiny_bundle, tmp_path, digits_test):
    d = tmp_path / "in"
    d.mkdir()
    for p in [d / ".x.png", d / "y.png"]:
        Image.fromarray(digits_test.images[0, ..., 0]).save(p)
    r = CliRunner().invoke(main, ["-q", "scan", str(tiny_bundle), str(d), "-o", str(tmp_path / "a.jsonl")])
    assert r.exit_code == 0, r.output
    assert all("label" in rec for rec in read_records(tmp_path / "a.jsonl"))
    r = CliRunner().invoke(main, ["-q", "scan", str(tiny_bundle), str(d), "-o", str(tmp_path / "b.jsonl"),
                                  "--skip-hidden"])
    assert r.exit_code == 0, r.output
    recs = list(read_records(tmp_path / "b.jsonl"))
    assert [r.get("error") for r in recs] == ["skipped: hidden file (--skip-hidden)", None]


# ------------------------------------------------------------------------------------------------ case 11


def test_case11_empty_and_zero_size_arrays_are_one_record(tmp_path):
    np.save(tmp_path / "none.npy", np.zeros((0, 8, 8, 1), np.uint8))
    np.save(tmp_path / "flat.npy", np.zeros((1000, 0, 8), np.float32))
    np.savez(tmp_path / "none.npz", images=np.zeros((0, 1, 8, 8), np.float32))
    np.save(tmp_path / "dims.npy", np.zeros((1,) * 40, np.uint8))  # dimension counts beyond reason
    got = items_of([tmp_path / n for n in ("none.npy", "flat.npy", "none.npz", "dims.npy")])
    assert [i.id for i in got] == [str(tmp_path / n) for n in ("none.npy", "flat.npy", "none.npz", "dims.npy")]
    assert "holds no rows" in got[0].error and "holds no rows" in got[2].error
    assert "rows hold no pixels" in got[1].error and "40 dimensions" in got[3].error


def test_case11_16bit_images_are_scaled_not_clipped(tmp_path):
    a16 = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1000 + 65535 - 63000).astype(np.uint16)
    (tmp_path / "g16.png").write_bytes(png_bytes(a16))
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode == "I;16"
    x, resized = decode_image(str(tmp_path / "g16.png"), SHAPE)
    np.testing.assert_allclose(x[0], a16 / 65535.0, rtol=0, atol=1e-6)
    assert not resized
    big = np.kron(a16, np.ones((2, 2), np.uint16))  # 16x16: resized like its 8-bit twin, up to 8-bit quantisation
    x2, resized = decode_image(png_bytes(big), SHAPE)
    x8, _ = decode_image(png_bytes(np.round(big / 257.0).astype(np.uint8)), SHAPE)
    assert resized and x2.min() >= 0.0 and x2.max() <= 1.0
    np.testing.assert_allclose(x2, x8, rtol=0, atol=1.5 / 255)
    Image.fromarray(a16.astype(np.int32), mode="I").save(tmp_path / "i32.tif")
    x3, _ = decode_image(str(tmp_path / "i32.tif"), (3, 8, 8))
    np.testing.assert_allclose(x3, np.repeat((a16 / 65535.0)[None], 3, 0), rtol=0, atol=1e-6)
    Image.fromarray(np.full((8, 8), 70_000, np.int32), mode="I").save(tmp_path / "wide.tif")
    Image.fromarray(np.full((8, 8), 0.25, np.float32), mode="F").save(tmp_path / "f.tif")
    Image.fromarray(np.full((8, 8), 7.0, np.float32), mode="F").save(tmp_path / "f7.tif")
    got = items_of([tmp_path / "wide.tif", tmp_path / "f.tif", tmp_path / "f7.tif"])
    assert "16-bit values" in got[0].error and got[2].error and "[0, 1]" in got[2].error
    np.testing.assert_allclose(got[1].image, 0.25, rtol=0, atol=1e-7)


def _png_claiming(w, h):
    """A tiny PNG whose header claims ``w`` x ``h`` pixels (its data would not decode: it must never be tried)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns at open
def test_case11_pixel_cap_is_checked_from_the_header_before_decoding(tmp_path, monkeypatch, tiny_bundle):
    (tmp_path / "huge.png").write_bytes(_png_claiming(13_000, 13_000))  # 169 megapixels in 0.1 KB
    (tmp_path / "bomb.png").write_bytes(_png_claiming(20_000, 20_000))  # beyond Pillow's own bomb limit
    loads = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: loads.append(self.size) or real_load(self))
    got = items_of([tmp_path / "huge.png", tmp_path / "bomb.png"])
    assert got[0].error == "image too large: 13000x13000 = 169000000 pixels, the limit is 40000000 (--max-pixels)"
    assert got[1].error.startswith("image too large")
    got = items_of([tmp_path / "bomb.png"], limits=SourceLimits(max_pixels=10**12))
    assert got[0].error.startswith("image too large") and "DecompressionBomb" not in got[0].error.split(":")[0]
    assert not loads
    ok = tmp_path / "16.png"
    ok.write_bytes(png_bytes(np.zeros((16, 16), np.uint8)))
    assert items_of([ok], limits=SourceLimits(max_pixels=255))[0].error.startswith("image too large: 16x16")
    assert items_of([ok], limits=SourceLimits(max_pixels=256))[0].error is None
    r = CliRunner().invoke(main, ["-q", "scan", str(tiny_bundle), str(ok), "-o", str(tmp_path / "v.jsonl"),
                                  "--max-pixels", "100"])
    assert r.exit_code == 0, r.output
    assert next(read_records(tmp_path / "v.jsonl"))["error"].startswith("image too large")


def test_case11_cli_defaults_are_the_source_limits():
    cmd = main.commands["scan"]
    helps = {p.name: p.help for p in cmd.params}
    assert f"[default: {SourceLimits().max_pixels}]" in helps["max_pixels"]
    assert f"[default: {SourceLimits().max_line_bytes} " in helps["max_line_bytes"]
    assert SourceLimits().skip_hidden is False
    with pytest.raises(ValueError, match="max_pixels"):
        SourceLimits(max_pixels=0)


# ------------------------------------------------------------------------------------------------ case 12


def test_case12_undecodable_stdin_bytes_cost_one_line(tiny_bundle, tmp_path, digits_test):
    good = json.dumps({"id": "ok", "image": base64.b64encode(png_bytes(digits_test.images[0, ..., 0])).decode()})
    data = b"\xff\xfe\n" + good.encode() + b"\n" + b'{"id": "caf\xc3\xa9", "path": "x.png"}\n'
    out = tmp_path / "v.jsonl"
    r = CliRunner().invoke(main, ["-q", "scan", str(tiny_bundle), "-", "-o", str(out)], input=data)
    assert r.exit_code == 0, r.output
    recs = list(read_records(out))
    assert [x["id"] for x in recs] == ["-:1", "ok", "café"]
    assert recs[0]["error"].startswith("invalid JSON line: not UTF-8") and "label" in recs[1]
    wrapped = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")  # a strict text stream is read via its buffer
    assert [i.id for i in iter_inputs(["-"], SHAPE, stdin=wrapped)] == ["-:1", "ok", "café"]


# ------------------------------------------------------------------------------------------------ the family


def test_hostile_zips_are_one_record_each(tmp_path, digits_test):
    np.savez(tmp_path / "ok.npz", images=digits_test.images[:2])
    raw = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "half.npz").write_bytes(raw[: len(raw) // 2])
    with zipfile.ZipFile(tmp_path / "slash.npz", "w") as zf:
        zf.writestr("../evil.npy", (tmp_path / "ok.npz").read_bytes()[:10])
    with zipfile.ZipFile(tmp_path / "sub.npz", "w") as zf:
        zf.writestr("a/b.npy", b"x")
    with zipfile.ZipFile(tmp_path / "dup.npz", "w") as zf:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            zf.writestr("images.npy", b"x")
            zf.writestr("images.npy", b"y")
    head = npy_header((10, 8, 8, 1))
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("images.npy", head + b"\0" * (10 * 64) + b"\0" * (8 * 2**20))  # 8 MB of zeros past the data
    with zipfile.ZipFile(tmp_path / "ratio.npz", "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("images.npy", head + b"\0" * 640)
    raw = bytearray((tmp_path / "ratio.npz").read_bytes())  # claim 4 GB uncompressed from a deflated 700 bytes
    for sig, off in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        at = raw.find(sig)
        raw[at + off : at + off + 2] = struct.pack("<H", zipfile.ZIP_DEFLATED)
        raw[at + off + 14 : at + off + 18] = struct.pack("<I", 2**32 - 1)
    (tmp_path / "ratio.npz").write_bytes(bytes(raw))
    with zipfile.ZipFile(tmp_path / "bz.npz", "w", zipfile.ZIP_BZIP2) as zf:
        zf.writestr("images.npy", head + b"\0" * 640)
    names = ["half", "slash", "sub", "dup", "bomb", "ratio", "bz"]
    got = items_of([tmp_path / f"{n}.npz" for n in names])
    assert [i.id for i in got] == [str(tmp_path / f"{n}.npz") for n in names]
    errs = dict(zip(names, (i.error for i in got)))
    assert all(e.startswith("unreadable array file") for e in errs.values()), errs
    assert "suspicious member name '../evil'" in errs["slash"] and "'a/b'" in errs["sub"]
    assert "same name" in errs["dup"] and "header declares" in errs["bomb"] and "zip bomb" in errs["ratio"]
    assert "compression method 12" in errs["bz"]


def test_hostile_npy_headers(tmp_path):
    (tmp_path / "v2.npy").write_bytes(b"\x93NUMPY\x02\x00" + struct.pack("<I", 3 * 2**30) + b"{" * 100)
    (tmp_path / "v9.npy").write_bytes(b"\x93NUMPY\x09\x00" + b"\0" * 100)
    (tmp_path / "neg.npy").write_bytes(npy_header((-5, 8, 8, 1)))
    (tmp_path / "nest.npy").write_bytes(npy_header((1, 8, 8, 1))[:10] + b"(" * 5000)
    (tmp_path / "struct.npy").write_bytes(npy_header((1, 8, 8, 1), descr=[("a", "|u1")]) + b"\0" * 64)
    (tmp_path / "i4.npy").write_bytes(npy_header((2, 8, 8, 1), descr="<i4") + b"\0" * 512)
    (tmp_path / "magic.npy").write_bytes(b"not an array at all")
    (tmp_path / "empty.npy").write_bytes(b"")
    names = ["v2", "v9", "neg", "nest", "struct", "i4", "magic", "empty"]
    got = []
    peak = peak_bytes(lambda: got.extend(items_of([tmp_path / f"{n}.npy" for n in names])))
    assert [i.id for i in got] == [str(tmp_path / f"{n}.npy") for n in names]
    errs = dict(zip(names, (i.error for i in got)))
    assert all(e and len(e) <= 500 for e in errs.values()), errs
    assert "header of 3221225472 bytes" in errs["v2"] and "version 9.0" in errs["v9"]
    assert "invalid input: integer images must be uint8" in errs["i4"] and "bad magic" in errs["magic"]
    assert peak < 2 * 2**20, peak


def test_fortran_npz_member_above_the_whole_load_limit_is_refused(tmp_path, digits_test):
    np.savez(tmp_path / "f.npz", images=np.asfortranarray(digits_test.images[:20]))
    ok = items_of([tmp_path / "f.npz"])
    assert len(ok) == 20 and all(i.error is None for i in ok)
    got = items_of([tmp_path / "f.npz"], limits=SourceLimits(max_whole_array_bytes=1000))
    assert len(got) == 1 and "cannot be streamed" in got[0].error


def test_nul_bytes_odd_names_and_unreadable_paths(guard, tmp_path, digits_test):
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(digits_test.images[0, ..., 0]).save(os.fsencode(d) + b"/\xff.png")  # not UTF-8
    (d / "locked.png").write_bytes(png_bytes(digits_test.images[1, ..., 0]))
    os.chmod(d / "locked.png", 0)
    (d / "sub").mkdir()
    os.chmod(d / "sub", 0)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"  # never handed to Ghostscript
    (d / "ps.png").write_bytes(eps)
    j = tmp_path / "l.jsonl"
    j.write_text("\ufeff" + json.dumps({"path": "a\u0000b"}) + "\n" + json.dumps({"id": "s\ud800", "path": "x"})
                 + "\n" + json.dumps({"path": "p" * 5000}) + "\n")
    try:
        out = tmp_path / "v.csv"
        s = scan_sources(guard, [str(d), str(j), "nul\x00here.png"], out, quiet=True)
        recs = list(read_records(out))
    finally:
        os.chmod(d / "locked.png", 0o644)
        os.chmod(d / "sub", 0o755)
    ids = [r["id"] for r in recs]
    root = os.geteuid() == 0  # root reads chmod-000 files and lists chmod-000 folders
    nul = os.path.abspath("nul\x00here.png")
    assert set(ids) == {str(d / "locked.png"), str(d / "ps.png"), str(d / "\\xff.png"), f"{j}:1", "s\\ud800",
                        f"{j}:3", nul} | (set() if root else {str(d / "sub")})
    by = {r["id"]: r for r in recs}
    assert "label" in by[str(d / "\\xff.png")]
    assert "not an image format Pillow reads" in by[str(d / "ps.png")]["error"]  # EPS: not a format scan opens
    if not root:
        assert by[str(d / "locked.png")]["error"].startswith("unreadable file: Permission denied")
        assert by[str(d / "sub")]["error"].startswith("unreadable folder: Permission denied")
    assert by[f"{j}:1"]["error"] == "invalid path: it contains a NUL byte"
    assert by["s\\ud800"]["error"].startswith("no such file")
    assert by[f"{j}:3"]["error"].startswith("invalid path: longer than 4096")
    assert by[nul]["error"] == "invalid path: it contains a NUL byte"
    assert s.total == len(recs) == len(set(ids))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns at open
def test_read_source_is_as_careful_as_the_scan(tmp_path, digits_test):
    os.mkfifo(tmp_path / "f.png")
    os.mkfifo(tmp_path / "f.npy")
    (tmp_path / "huge.png").write_bytes(_png_claiming(13_000, 13_000))
    np.savez(tmp_path / "a.npz", images=digits_test.images[:5])
    np.save(tmp_path / "a.npy", digits_test.images[:5])
    (tmp_path / "l.jsonl").write_text(json.dumps({"path": "f.png"}) + "\n")
    got = run_with_timeout(lambda: [read_source(str(tmp_path / s)) for s in
                                    ("f.png", "f.npy#0", "huge.png", "l.jsonl:1", "a.npz#9")])
    assert got == [None] * 5
    np.testing.assert_array_equal(read_source(f"{tmp_path / 'a.npz'}#3"), digits_test.images[3])
    np.testing.assert_array_equal(read_source(f"{tmp_path / 'a.npy'}#4"), digits_test.images[4])


def test_mode_bits_are_not_a_way_around(tmp_path):
    """A setuid/sticky regular file is still a regular file; only the file type matters."""
    p = tmp_path / "x.png"
    p.write_bytes(b"junk")
    os.chmod(p, stat.S_IRUSR | stat.S_ISVTX)
    got = items_of([p])
    assert len(got) == 1 and got[0].error.startswith("unreadable image")


def test_nan_and_inf_rows_are_one_error_record_each(tmp_path, digits_test):
    x = digits_test.images[:6].astype(np.float64) / 255
    x[1, 0, 0, 0], x[2, 3, 3, 0], x[3, 7, 7, 0], x[4, 1, 1, 0] = np.nan, np.inf, -np.inf, 1e300  # 1e300: inf as f4
    np.save(tmp_path / "x.npy", x)
    got = items_of([tmp_path / "x.npy"])
    assert [i.id for i in got] == [f"{tmp_path / 'x.npy'}#{k}" for k in range(6)]
    assert [i.error is None for i in got] == [True, False, False, False, False, True]
    assert all("NaN or infinite" in i.error for i in got[1:5])
