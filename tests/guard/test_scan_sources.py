"""Scanning: every input — good or malformed, from any source kind — gets exactly one record, in input order."""

import base64
import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from abl_guard.guard import Guard
from abl_guard.guard.scan import read_records, scan_sources
from abl_guard.guard.sources import SourceLimits, iter_inputs


@pytest.fixture(scope="module")
def guard(tiny_bundle):
    return Guard.load(tiny_bundle)


def png_bytes(a):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def messy(tmp_path, digits_test):
    """A folder and a JSONL file holding every kind of good and bad input; returns (sources, expected)."""
    im = digits_test.images
    d = tmp_path / "in"
    (d / "sub" / "deeper").mkdir(parents=True)
    exp = {}  # id -> None (verdict expected) or an error substring
    for i, ext in enumerate(["png", "bmp", "webp"]):
        Image.fromarray(im[i, ..., 0]).save(d / f"ok{i}.{ext}")
        exp[str(d / f"ok{i}.{ext}")] = None
    big = Image.fromarray(np.kron(im[3, ..., 0], np.ones((4, 4), np.uint8))).convert("RGB")
    big.save(d / "sub" / "big.jpg")  # resized + converted
    exp[str(d / "sub" / "big.jpg")] = None
    (d / "sub" / "deeper" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    exp[str(d / "sub" / "deeper" / "corrupt.png")] = "unreadable image"
    (d / "empty.jpg").write_bytes(b"")
    exp[str(d / "empty.jpg")] = "unreadable image: not an image format Pillow reads"  # no file-object repr
    (d / "notes.txt").write_text("not an image")
    exp[str(d / "notes.txt")] = "unsupported file type"
    (d / ".hidden.png").write_bytes(b"scanned: hiding a file must not hide it from the guard")
    exp[str(d / ".hidden.png")] = "unreadable image"
    np.save(d / "batch.npy", im[:5])
    exp.update({f"{d / 'batch.npy'}#{i}": None for i in range(5)})
    fl = (im[5:9].astype(np.float32) / 255).copy()
    fl[1, 0, 0, 0] = np.nan
    fl[2] *= 3.0  # out of [0, 1]
    np.save(d / "floats.npy", fl)
    exp.update({f"{d / 'floats.npy'}#0": None, f"{d / 'floats.npy'}#1": "NaN",
                f"{d / 'floats.npy'}#2": "[0, 1]", f"{d / 'floats.npy'}#3": None})
    np.save(d / "wrong_size.npy", np.zeros((2, 5, 5), np.uint8))
    exp[str(d / "wrong_size.npy")] = "do not fit the model"  # decided from the header: one record, not one per row
    np.save(d / "one_image.npy", im[9])  # a single (8, 8, 1) image
    exp[str(d / "one_image.npy")] = None
    np.save(d / "flat.npy", np.zeros(10))
    exp[str(d / "flat.npy")] = "holds no images"
    np.save(d / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    exp[str(d / "objects.npy")] = "unreadable array file"
    np.savez_compressed(d / "packed.npz", images=im[10:13], labels=np.arange(3))
    exp.update({f"{d / 'packed.npz'}#{i}": None for i in range(3)})
    np.savez(d / "nokey.npz", a=im[:2], b=im[:2])
    exp[str(d / "nokey.npz")] = "no 'images' array"
    (d / "broken.npz").write_bytes(b"PK\x03\x04 broken zip")
    exp[str(d / "broken.npz")] = "unreadable array file"
    j = tmp_path / "list.jsonl"
    lines = [
        json.dumps({"path": "in/ok0.png"}),  # relative to the JSONL file
        json.dumps({"id": "b64-ok", "image": base64.b64encode(png_bytes(im[20, ..., 0])).decode()}),
        json.dumps({"id": "dataurl", "image": "data:image/png;base64,"
                    + base64.b64encode(png_bytes(im[21, ..., 0])).decode()}),
        json.dumps({"id": "b64-bad", "image": "@@@not base64@@@"}),
        json.dumps({"id": "b64-notimage", "image": base64.b64encode(b"hello").decode()}),
        "{this is not json",
        json.dumps([1, 2, 3]),
        json.dumps({"id": "nothing"}),
        json.dumps("in/ok1.bmp"),
        json.dumps({"path": "in/missing.png"}),
        "",
    ]
    j.write_text("\n".join(lines) + "\n")
    exp.update({f"{j}:1": None, "b64-ok": None, "dataurl": None, "b64-bad": "invalid base64",
                "b64-notimage": "unreadable image", f"{j}:6": "invalid JSON", f"{j}:7": "object or a path",
                "nothing": "neither a 'path' nor an 'image'", f"{j}:9": None, f"{j}:10": "no such file"})
    exp[str(tmp_path / "nope")] = "no such file or directory"
    return [str(d), str(j), str(tmp_path / "nope")], exp


def test_every_input_gets_exactly_one_record(guard, messy, tmp_path):
    sources, exp = messy
    out = tmp_path / "v.jsonl"
    s = scan_sources(guard, sources, out, batch_size=4, quiet=True)
    recs = list(read_records(out))
    ids = [r["id"] for r in recs]
    assert sorted(ids) == sorted(exp) and len(ids) == len(set(ids)), set(ids) ^ set(exp)
    for r in recs:
        want = exp[r["id"]]
        if want is None:
            assert "error" not in r and isinstance(r["flagged"], bool), r
        else:
            assert want in r["error"], (r, want)
    n_err = sum(v is not None for v in exp.values())
    assert s.total == len(exp) and s.errors == n_err and s.scanned == len(exp) - n_err
    assert s.resized == 1 and [r for r in recs if r.get("resized")][0]["id"].endswith("big.jpg")
    assert sum(s.error_reasons.values()) == n_err and s.error_reasons["unreadable image"] >= 3


def test_order_is_input_order(guard, tmp_path, digits_test):
    d = tmp_path / "f"
    (d / "b").mkdir(parents=True)
    (d / "a").mkdir()
    for name in ["z.png", "a/2.png", "a/10.png", "b/1.png", "m.png"]:
        Image.fromarray(digits_test.images[0, ..., 0]).save(d / name)
    np.save(tmp_path / "x.npy", digits_test.images[:3])
    items = list(iter_inputs([str(tmp_path / "x.npy"), str(d)], guard.input_shape))
    assert [i.id for i in items] == [f"{tmp_path / 'x.npy'}#{k}" for k in range(3)] + [
        str(d / n) for n in ["a/10.png", "a/2.png", "b/1.png", "m.png", "z.png"]]


def test_npz_is_streamed_not_loaded(guard, tmp_path, digits_test, monkeypatch):
    np.savez(tmp_path / "a.npz", images=digits_test.images)
    called = []
    real = np.lib.npyio.NpzFile.__getitem__
    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", lambda self, k: called.append(k) or real(self, k))
    items = list(iter_inputs([str(tmp_path / "a.npz")], guard.input_shape))
    assert not called, "the images member was loaded whole"
    assert len(items) == len(digits_test.images)
    ref = guard.inspect_arrays(digits_test.images)
    got = guard.inspect_arrays(np.stack([i.image for i in items]))
    np.testing.assert_array_equal(got.labels, ref.labels)


def test_truncated_npz_member_is_one_error_record(guard, tmp_path, digits_test):
    """A member shorter than its header declares is refused before any row is read: one record for the file."""
    full = tmp_path / "full.npz"
    np.savez(full, images=digits_test.images[:56])
    raw = zipfile.ZipFile(full).read("images.npy")
    cut = tmp_path / "cut.npz"
    with zipfile.ZipFile(cut, "w") as zf:
        zf.writestr("images.npy", raw[: len(raw) - 100])  # the last two rows are cut off
    items = list(iter_inputs([str(cut)], guard.input_shape))
    assert [i.id for i in items] == [str(cut)]
    assert "header declares shape (56, 8, 8, 1)" in items[0].error and "holds 3484" in items[0].error


def test_stdin_jsonl_and_csv_output(guard, tmp_path, digits_test):
    lines = "".join(json.dumps({"id": f"s{i}", "image": base64.b64encode(png_bytes(digits_test.images[i, ..., 0]))
                                .decode()}) + "\n" for i in range(5)) + "oops\n"
    out = tmp_path / "v.csv"
    s = scan_sources(guard, ["-"], out, stdin=io.StringIO(lines), quiet=True)
    recs = list(read_records(out))
    assert [r["id"] for r in recs] == ["s0", "s1", "s2", "s3", "s4", "-:6"]
    assert s.total == 6 and s.errors == 1 and "invalid JSON" in recs[-1]["error"]
    assert isinstance(recs[0]["flagged"], bool) and isinstance(recs[0]["label"], int)
    assert set(recs[0]["detectors"]["mahalanobis"]) == {"score", "p_value", "tail"}
    header = out.read_text().splitlines()[0].split(",")
    assert header[:3] == ["id", "source", "error"] and "mahalanobis.p_value" in header
    ref = guard.inspect(digits_test.images[:5])
    assert [r["label"] for r in recs[:5]] == [v.label for v in ref]


def test_failing_batch_is_retried_one_by_one(guard, tmp_path, digits_test, monkeypatch):
    """A scoring failure on one input must not cost the rest of its batch their verdicts."""
    np.save(tmp_path / "x.npy", digits_test.images[:10])
    real = guard.inspect
    poison = digits_test.images[3].astype(np.float32).transpose(2, 0, 1) / 255

    def flaky(x):
        if any(np.array_equal(row, poison) for row in np.asarray(x)):
            raise RuntimeError("boom")
        return real(x)

    monkeypatch.setattr(guard, "inspect", flaky)
    s = scan_sources(guard, [str(tmp_path / "x.npy")], tmp_path / "v.jsonl", batch_size=4, quiet=True)
    recs = list(read_records(tmp_path / "v.jsonl"))
    assert len(recs) == 10 and s.errors == 1
    assert "scoring failed: RuntimeError: boom" in recs[3]["error"]
    assert all("label" in r for i, r in enumerate(recs) if i != 3)


def test_npy_streaming_fortran_and_truncated(guard, tmp_path, digits_test):
    im = digits_test.images[:56]
    np.save(tmp_path / "c.npy", im)
    np.save(tmp_path / "f.npy", np.asfortranarray(im))
    c = [i.image for i in iter_inputs([str(tmp_path / "c.npy")], guard.input_shape)]
    f = [i.image for i in iter_inputs([str(tmp_path / "f.npy")], guard.input_shape)]
    np.testing.assert_array_equal(np.stack(c), np.stack(f))
    small = SourceLimits(block_bytes=5 * 64)  # 12 blocks of 5 rows (the last of 1): Fortran order read block-wise
    f = [i.image for i in iter_inputs([str(tmp_path / "f.npy")], guard.input_shape, limits=small)]
    np.testing.assert_array_equal(np.stack(c), np.stack(f))
    raw = (tmp_path / "c.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(raw[:-100])  # the last two 64-byte rows lose bytes
    (tmp_path / "long.npy").write_bytes(raw + b"\0" * 64)  # one row more than the header says
    for name in ("cut.npy", "long.npy"):
        items = list(iter_inputs([str(tmp_path / name)], guard.input_shape))
        assert [i.id for i in items] == [str(tmp_path / name)] and "header declares" in items[0].error
