"""Scan output against hostile names and careless invocations (issue 12): undecodable and formula-like ids, two scans
into one file, an output that is an input, bad batch sizes, odd records and odd files to resume into."""

import base64
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from abl_guard.cli import main
from abl_guard.guard import Guard
from abl_guard.guard.scan import (
    MAX_BATCH_SIZE,
    RecordWriter,
    ScanError,
    ScanOutputError,
    ScanSummary,
    read_records,
    safe_text,
    scan_sources,
    scan_to_file,
)
from abl_guard.guard.sources import iter_inputs


@pytest.fixture(scope="module")
def guard(tiny_bundle):
    return Guard.load(tiny_bundle)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[..., 0]).save(buf, format="PNG")
    return buf.getvalue()


def _jsonl(path: Path, ids, images) -> Path:
    path.write_text("".join(json.dumps({"id": i, "image": base64.b64encode(_png(x)).decode()}) + "\n"
                            for i, x in zip(ids, images)))
    return path


def run(*args):
    return CliRunner().invoke(main, ["-q", *map(str, args)])


# ------------------------------------------------------------------------------------------------ case 4: ids


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_case4_undecodable_ids_are_written_escaped_and_resume(guard, digits_test, tmp_path, fmt):
    """A file name with byte 0xff (a surrogate-escaped str) and a JSONL id with a lone surrogate: the CSV writer
    crashed with UnicodeEncodeError after the header, and so did --resume."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        raw = os.fsencode(folder) + b"/img" + bytes([0xFF, 0x30 + i]) + b".png"
        with open(raw, "wb") as f:
            f.write(_png(digits_test.images[i]))
    jl = _jsonl(tmp_path / "in.jsonl", ["\ud800lone", "ok", "tail\udfff"], digits_test.images[3:6])
    sources = [str(folder), str(jl)]
    out = tmp_path / f"v.{fmt}"
    s = scan_sources(guard, sources, out, batch_size=2, quiet=True, fmt=fmt)
    assert s.total == 6 and s.errors == 0
    out.read_bytes().decode("utf-8")  # valid UTF-8 throughout
    ids = [r["id"] for r in read_records(out)]
    assert ids == [f"{folder}/img\\xff{i}.png" for i in range(3)] + ["\\ud800lone", "ok", "tail\\udfff"]
    full = list(read_records(out))

    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[: (1 if fmt == "csv" else 0) + 2]))  # keep two records, the rest to resume
    s = scan_sources(guard, sources, out, batch_size=2, quiet=True, fmt=fmt, resume=True)
    assert s.resumed == 2 and s.total == 6
    assert [r["id"] for r in read_records(out)] == ids  # nothing rescanned twice, nothing lost
    again = scan_sources(guard, sources, out, batch_size=2, quiet=True, fmt=fmt, resume=True)
    assert again.resumed == 6 and [r["label"] for r in read_records(out)] == [r["label"] for r in full]


def test_case4_both_formats_escape_ids_the_same_way(guard, digits_test, tmp_path):
    jl = _jsonl(tmp_path / "in.jsonl", ["\udcff", "=1+2", "", "é\u2028"], digits_test.images[:4])
    got = {}
    for fmt in ("csv", "jsonl"):
        out = tmp_path / f"v.{fmt}"
        scan_sources(guard, [str(jl)], out, quiet=True)
        got[fmt] = [r["id"] for r in read_records(out)]
    assert got["csv"] == got["jsonl"] == ["\\xff", "=1+2", "", "é\u2028"]


def test_safe_text_is_idempotent_and_leaves_valid_text_alone():
    assert safe_text("plain é 🙂") == "plain é 🙂"
    assert safe_text("a\udcffb\ud800") == "a\\xffb\\ud800"
    assert safe_text(safe_text("a\udcffb\ud800")) == safe_text("a\udcffb\ud800")


def test_writer_survives_a_stream_that_is_not_utf8():
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="ascii", newline="")
    RecordWriter(stream, "csv", ["mahalanobis"], header=True).write([{"id": "é", "error": "unreadable image: é"}])
    assert b"\\xe9" in raw.getvalue()


# ------------------------------------------------------------------------------------------------ CSV injection

FORMULAS = ["=HYPERLINK(\"http://x\")", "+1", "-2", "@SUM(A1)", "\tx", "\rx", "'quoted", "", "a\rb", "plain",
            "x,\"y\"\nz"]


def test_csv_formula_cells_neutralised_and_ids_round_trip(guard, digits_test, tmp_path):
    jl = _jsonl(tmp_path / "in.jsonl", FORMULAS, np.resize(digits_test.images[:4], (len(FORMULAS), 8, 8, 1)))
    out = tmp_path / "v.csv"
    scan_sources(guard, [str(jl)], out, quiet=True)
    import csv

    rows = list(csv.reader(io.StringIO(out.read_bytes().decode("utf-8"), newline="")))
    cells = [r[0] for r in rows[1:]]
    assert not any(c[:1] in ("=", "+", "-", "@", "\t", "\r") for c in cells)  # nothing a spreadsheet would run
    assert cells[:8] == ["'" + f for f in FORMULAS[:8]]
    assert [r["id"] for r in read_records(out)] == FORMULAS
    before = out.read_bytes()
    s = scan_sources(guard, [str(jl)], out, quiet=True, resume=True)
    assert s.resumed == len(FORMULAS) and out.read_bytes() == before  # every id matched: nothing rescanned


def test_csv_numeric_cells_are_not_mangled(tmp_path):
    out = tmp_path / "n.csv"
    rec = {"id": "-neg", "label": 3, "class_name": "=c", "confidence": 0.5, "flagged": True, "p_value": 1e-7,
           "score": -1.5, "threshold": -0.25, "kind": "backdoor",
           "detectors": {"m": {"score": -3.25, "p_value": 0.5, "tail": "low"}}}
    with open(out, "w", encoding="utf-8", newline="") as f:
        RecordWriter(f, "csv", ["m"], header=True).write([rec])
    row = out.read_text().splitlines()[1].split(",")
    assert row[0] == "'-neg" and "-1.5" in row and "-0.25" in row and "-3.25" in row and "'=c" in row
    (back,) = read_records(out)
    assert back["id"] == "-neg" and back["class_name"] == "=c"
    assert back["score"] == pytest.approx(-1.5, abs=0) and back["detectors"]["m"]["score"] == pytest.approx(-3.25)


def test_non_finite_floats_are_written_as_null(tmp_path):
    rec = {"id": "x", "label": 1, "flagged": False, "p_value": float("nan"), "score": float("inf")}
    for fmt in ("jsonl", "csv"):
        out = tmp_path / f"nan.{fmt}"
        with open(out, "w", encoding="utf-8", newline="") as f:
            RecordWriter(f, fmt, [], header=True).write([rec])
        (back,) = read_records(out)
        assert "p_value" not in back or back["p_value"] is None
        assert "score" not in back or back["score"] is None


IDS = st.text(alphabet=st.sampled_from(["a", "é", "=", "+", "-", "@", "'", "\t", "\r", "\n", ",", '"', "\x00",
                                        "\ud800", "\udcff", "\\", " ", "🙂"]), max_size=8)


@settings(max_examples=60, deadline=None, database=None, derandomize=True)
@given(ids=st.lists(IDS, min_size=1, max_size=6))
def test_any_id_round_trips_through_both_formats(tmp_path_factory, ids):
    d = tmp_path_factory.mktemp("rt")
    for fmt in ("csv", "jsonl"):
        out = d / f"v.{fmt}"
        with open(out, "w", encoding="utf-8", newline="") as f:
            RecordWriter(f, fmt, ["m"], header=True).write([{"id": i, "error": "unreadable: " + i} for i in ids])
        back = list(read_records(out))
        assert [r["id"] for r in back] == [safe_text(i) for i in ids]
        assert [r["error"] for r in back] == [safe_text("unreadable: " + i) for i in ids]


# ------------------------------------------------------------------------------------------------ case 6: lock


def test_case6_second_scan_into_a_locked_output_is_refused(guard, digits_test, tmp_path):
    """Two scans writing one output interleaved and both exited 0; the second is now refused while the first runs."""
    np.save(tmp_path / "a.npy", digits_test.images[:20])
    out = tmp_path / "v.jsonl"
    started, release, result = threading.Event(), threading.Event(), {}

    def slow_items():
        started.set()
        assert release.wait(60)
        yield from iter_inputs([str(tmp_path / "a.npy")], guard.input_shape)

    def first():
        result["summary"] = scan_to_file(guard, slow_items(), out, batch_size=4, quiet=True)

    t = threading.Thread(target=first)
    t.start()
    assert started.wait(60)
    try:
        for resume in (False, True):
            with pytest.raises(ScanOutputError, match="being written by another scan"):
                scan_sources(guard, [str(tmp_path / "a.npy")], out, quiet=True, resume=resume)
    finally:
        release.set()
        t.join(60)
    assert result["summary"].total == 20
    assert [r["id"] for r in read_records(out)] == [f"{tmp_path / 'a.npy'}#{i}" for i in range(20)]
    s = scan_sources(guard, [str(tmp_path / "a.npy")], out, quiet=True, resume=True)  # the lock went with the scan
    assert s.resumed == 20


@pytest.mark.skipif(sys.platform == "win32", reason="flock")
def test_case6_cli_refuses_an_output_another_process_locked(tiny_bundle, digits_test, tmp_path):
    np.save(tmp_path / "a.npy", digits_test.images[:5])
    out = tmp_path / "v.jsonl"
    out.write_text('{"id": "kept", "error": "x"}\n')
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
                               "print('locked', flush=True); sys.stdin.read()", str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in ([], ["--resume"]):
            r = run("scan", tiny_bundle, tmp_path / "a.npy", "-o", out, *extra)
            assert r.exit_code == 6, r.output
            assert "being written by another scan" in r.output and "Traceback" not in r.output
        assert out.read_text() == '{"id": "kept", "error": "x"}\n'  # neither truncated nor appended to
    finally:
        holder.communicate("", timeout=30)
    assert run("scan", tiny_bundle, tmp_path / "a.npy", "-o", out).exit_code == 0


# ------------------------------------------------------------------------------------------------ case 7: -o = input


def test_case7_output_naming_an_input_is_refused(guard, tiny_bundle, digits_test, tmp_path):
    """`scan B x.npy -o x.npy` truncated the input before reading it and exited 0."""
    x = tmp_path / "x.npy"
    np.save(x, digits_test.images[:5])
    before = x.read_bytes()
    (tmp_path / "link.npy").symlink_to(x)
    os.link(x, tmp_path / "hard.npy")
    for out in (x, tmp_path / "link.npy", tmp_path / "hard.npy", tmp_path / "sub" / ".." / "x.npy"):
        with pytest.raises(ScanOutputError, match="which this scan reads"):
            scan_sources(guard, [str(x)], out, quiet=True)
    r = run("scan", tiny_bundle, x, "-o", x)
    assert r.exit_code == 6 and "refusing to overwrite" in r.output
    assert x.read_bytes() == before


def test_case7_output_inside_an_input_folder_or_the_bundle_is_refused(guard, tiny_bundle, digits_test, tmp_path):
    import shutil

    tiny_bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))  # a copy: the shared one must survive a bug
    folder = tmp_path / "imgs"
    (folder / "deep").mkdir(parents=True)
    np.save(folder / "a.npy", digits_test.images[:3])
    for out in (folder / "v.jsonl", folder / "deep" / "v.csv"):
        with pytest.raises(ScanOutputError, match="lies inside the folder"):
            scan_sources(guard, [str(folder)], out, quiet=True)
        assert not out.exists()
    with pytest.raises(ScanOutputError, match="lies inside the folder"):
        scan_sources(guard, [str(folder / "a.npy")], tiny_bundle / "v.jsonl", quiet=True, protect=[tiny_bundle])
    r = run("scan", tiny_bundle, folder / "a.npy", "-o", tiny_bundle / "model.onnx")
    assert r.exit_code == 6 and (tiny_bundle / "model.onnx").stat().st_size > 1000
    r = run("scan", tiny_bundle, folder / "a.npy", "-o", tmp_path / "v.jsonl", "--summary-json", folder / "a.npy")
    assert r.exit_code == 6 and "--summary-json" in r.output
    # beside the folder is fine, and the stdout output is never compared
    assert scan_sources(guard, [str(folder)], tmp_path / "imgs.jsonl", quiet=True).total == 3


# ------------------------------------------------------------------------------------------------ case 8: batch size


@pytest.mark.parametrize("bad", [0, -1, MAX_BATCH_SIZE + 1, True, 2.0])
def test_case8_bad_batch_size_raises_before_touching_the_output(guard, digits_test, tmp_path, bad):
    np.save(tmp_path / "a.npy", digits_test.images[:3])
    out = tmp_path / "v.jsonl"
    with pytest.raises(ValueError, match="batch size"):
        scan_sources(guard, [str(tmp_path / "a.npy")], out, batch_size=bad, quiet=True)
    with pytest.raises(ValueError, match="batch size"):
        scan_to_file(guard, iter([]), out, batch_size=bad, quiet=True)
    assert not out.exists()


@pytest.mark.parametrize("bad", ["0", "-1", "4097"])
def test_case8_cli_batch_size_is_a_usage_error(tiny_bundle, digits_test, tmp_path, bad):
    np.save(tmp_path / "a.npy", digits_test.images[:3])
    r = run("scan", tiny_bundle, tmp_path / "a.npy", "-o", tmp_path / "v.jsonl", "--batch-size", bad)
    assert r.exit_code == 2 and "batch-size" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "v.jsonl").exists()


def test_cli_batch_cap_is_the_library_cap():
    opt = next(p for p in main.commands["scan"].params if p.name == "batch_size")
    assert (opt.type.min, opt.type.max) == (1, MAX_BATCH_SIZE)


# ------------------------------------------------------------------------------------------------ odd files to resume

ODD = {
    "label-not-int": '{"id": "a", "label": "three", "flagged": false}\n',
    "label-float": '{"id": "a", "label": 1.5}\n',
    "label-bool": '{"id": "a", "label": true}\n',
    "label-out-of-range": '{"id": "a", "label": 99, "flagged": true}\n',
    "lacks-label": '{"id": "a", "flagged": true}\n',
    "id-not-text": '{"id": 7, "label": 1}\n',
    "flagged-not-bool": '{"id": "a", "label": 1, "flagged": "yes"}\n',
    "detectors-not-object": '{"id": "a", "label": 1, "detectors": [1]}\n',
    "error-not-text": '{"id": "a", "error": {"x": 1}}\n',
}


@pytest.mark.parametrize("case", sorted(ODD))
def test_resume_refuses_odd_records_with_one_line(guard, tmp_path, case):
    out = tmp_path / "odd.jsonl"
    text = '{"id": "ok", "error": "x"}\n' + ODD[case]
    out.write_text(text)
    with pytest.raises(ScanError, match="refusing"):
        scan_sources(guard, [], out, quiet=True, resume=True)
    assert out.read_text() == text  # untouched


def test_resume_refuses_odd_csv_cells(guard, tmp_path):
    header = "id,source,error,label,class_name,confidence,flagged,p_value,score,threshold,kind,resized," \
             "mahalanobis.score,mahalanobis.p_value,mahalanobis.tail\n"
    for row in ("a,,,x,,,,,,,,,,,\n", "a,,,1,,,maybe,,,,,,,,\n", "a,,,1,,,,,,,,,notanumber,,\n"):
        out = tmp_path / "odd.csv"
        out.write_text(header + row + "b,,err,,,,,,,,,,,,\n")
        with pytest.raises(ScanError, match="refusing"):
            scan_sources(guard, [], out, quiet=True, resume=True)


def test_cli_resume_odd_record_is_one_line(tiny_bundle, tmp_path):
    out = tmp_path / "odd.jsonl"
    out.write_text('{"id": "a", "label": "three"}\n{"id": "b", "error": "x"}\n')
    r = run("scan", tiny_bundle, "-", "-o", out, "--resume")
    assert r.exit_code == 1 and "not a verdict record" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs")
def test_resume_into_a_fifo_or_directory_is_refused(guard, tmp_path):
    fifo = tmp_path / "v.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(ScanError, match="not a regular file"):  # refused before an open that would block
        scan_sources(guard, [], fifo, quiet=True, resume=True)
    d = tmp_path / "dir.jsonl"
    d.mkdir()
    for resume in (True, False):
        with pytest.raises(ScanError, match="directory"):
            scan_sources(guard, [], d, quiet=True, resume=resume)
    with pytest.raises(ScanError, match="not a regular file"):
        list(read_records(d))


def test_malformed_alarm_null_gives_no_alarm_not_a_crash():
    s = ScanSummary()
    s.add({"id": "a", "label": 0, "flagged": True})
    for null in (["x", 1.0], [1.0], {"a": 1}, [float("nan"), 1.0], [-1.0, 2.0]):
        s.finish(["c0", "c1"], null)
        assert s.alarm is None
    s.finish(["c0", "c1"], [1.0, 1.0])
    assert s.alarm is not None


# ------------------------------------------------------------------------------------------------ bounded records


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_overlong_ids_are_bounded_distinct_and_resume(guard, digits_test, tmp_path, fmt):
    """A 200,000-character id (the sources bound JSONL ids; a library caller need not) made a record past the CSV
    reader's field limit, so --resume refused the file."""
    from abl_guard.guard.scan import MAX_TEXT, DoneIds, existing_output
    from abl_guard.guard.sources import InputItem

    np.save(tmp_path / "a.npy", digits_test.images[:3])
    images = [it.image for it in iter_inputs([str(tmp_path / "a.npy")], guard.input_shape)]
    ids = ["é" * 200_000, "é" * 200_000 + "x", "short"]
    out = tmp_path / f"v.{fmt}"
    scan_to_file(guard, [InputItem(i, x) for i, x in zip(ids, images)], out, quiet=True)
    got = [r["id"] for r in read_records(out)]
    assert len(set(got)) == 3 and got[2] == "short" and all(len(i) <= MAX_TEXT for i in got)
    assert got[0].startswith("é" * 1000) and "sha256" in got[0]
    _, done = existing_output(guard, out, fmt)
    skip = DoneIds(done)
    assert [skip(i) for i in ids] == [True, True, True] and not skip.left  # resume matches the long ids


def test_resume_refuses_a_file_with_an_endless_line(guard, tmp_path):
    out = tmp_path / "big.jsonl"
    out.write_bytes(b"x" * (3 << 20) + b"\n" + b'{"id": "a", "error": "x"}\n')
    with pytest.raises(ScanError, match="longer than"):
        scan_sources(guard, [], out, quiet=True, resume=True)
    assert out.stat().st_size == (3 << 20) + 27
