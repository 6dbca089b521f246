"""The Ray Data scan on a local two-CPU Ray cluster: the same records as the local scan (ids, order, errors, flags;
scores within guard.records' tolerance), resume, Parquet in and out, a user's Ray dataset, the CLI."""

import base64
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import ray  # `make test` installs abl-guard[ray]: a missing Ray fails here rather than skipping
import ray.data
from click.testing import CliRunner
from PIL import Image

from abl_guard.cli import main
from abl_guard.guard import Guard
from abl_guard.guard.ray_scan import RayScanConfig, plan_reads, read_verdicts, scan_dataset, scan_sources_ray
from abl_guard.guard.records import stream_differences
from abl_guard.guard.scan import read_records, scan_sources

#: small read tasks and batches, so that a scan of ~100 inputs spans many tasks, blocks and actor batches
CFG = RayScanConfig(concurrency=1, batch_size=8, rows_per_task=13, rows_per_file=20)


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module (its start-up is the slow part)."""
    ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def png(a):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory, digits_test):
    """Arrays (one NaN row), a folder of images with junk in it, a JSONL file with good and bad lines."""
    im = digits_test.images
    d = tmp_path_factory.mktemp("rayin")
    fl = im[:40].astype(np.float32) / 255
    fl[7, 0, 0, 0] = np.nan  # an error record in the middle of an array
    np.save(d / "a.npy", fl)
    (d / "imgs").mkdir()
    for i in range(9):
        Image.fromarray(im[100 + i, ..., 0]).save(d / "imgs" / f"img{i}.png")
    (d / "imgs" / "junk.txt").write_text("an error record")
    (d / "imgs" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    lines = [json.dumps({"id": f"j{i}", "image": base64.b64encode(png(im[200 + i, ..., 0])).decode()})
             for i in range(12)]
    lines[4] = "{not json"
    lines[9] = json.dumps({"id": "nopath"})
    (d / "list.jsonl").write_text("\n".join(lines) + "\n")
    np.save(d / "noise.npy", np.random.default_rng(0).integers(0, 256, (30, 8, 8, 1), dtype=np.uint8))
    return d, [str(d / "a.npy"), str(d / "imgs"), str(d / "list.jsonl"), str(d / "noise.npy")]


@pytest.fixture(scope="module")
def local(tiny_bundle, data, tmp_path_factory):
    """The local scan's records and summary (the reference)."""
    out = tmp_path_factory.mktemp("local") / "ref.jsonl"
    summary = scan_sources(Guard.load(tiny_bundle), data[1], out, batch_size=16, quiet=True)
    return list(read_records(out)), summary


def test_plan_numbers_inputs_like_the_local_scan(tiny_bundle, data, local):
    ref, _ = local
    plan = plan_reads([str(s) for s in data[1]], Guard.load(tiny_bundle).input_shape)
    assert plan.total == plan.count == len(ref) and plan.todo == [(0, len(ref))]
    tasks = plan.tasks(13)
    assert sum(b - a for _, runs in tasks for a, b in runs) == len(ref)
    assert [first for first, _ in tasks] == sorted(first for first, _ in tasks)  # tasks start in source order


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_records_equal_the_local_scan(cluster, tiny_bundle, data, local, tmp_path, fmt):
    ref, ref_summary = local
    out = tmp_path / ("out.parquet" if fmt == "parquet" else f"out.{fmt}")
    summary = scan_sources_ray(tiny_bundle, data[1], out, cfg=CFG, quiet=True)
    got = list(read_verdicts(out))
    assert stream_differences(got, ref) == []
    errors = [r["error"] for r in got if r.get("error")]
    assert len(errors) == 5 and any("NaN" in e for e in errors) and any("unsupported file type" in e for e in errors)
    assert sum(bool(r.get("flagged")) for r in got) > 0  # the noise array is flagged: decisions are compared
    a, b = summary.to_json(), ref_summary.to_json()
    a.pop("output"), b.pop("output")
    assert a == b  # counts, flags by class, alarms: computed over the whole stream, as locally


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_resume_skips_what_is_written(cluster, tiny_bundle, data, local, tmp_path, fmt):
    ref, _ = local
    if fmt == "jsonl":
        out = tmp_path / "r.jsonl"
        lines = (tmp_path / "full.jsonl")
        scan_sources(Guard.load(tiny_bundle), data[1], lines, batch_size=16, quiet=True)
        raw = lines.read_bytes().splitlines(keepends=True)
        out.write_bytes(b"".join(raw[:37]) + raw[37][:25])  # 37 records and a torn one (a killed scan)
    else:
        out = tmp_path / "r.parquet"
        scan_sources_ray(tiny_bundle, data[1], out, cfg=CFG, quiet=True)
        parts = sorted(out.glob("part-*.parquet"))
        assert len(parts) > 2
        for p in parts[2:]:
            p.unlink()  # a scan killed after two parts
        (out / ".part-000002.parquet.tmp").write_bytes(b"half a part")
    summary = scan_sources_ray(tiny_bundle, data[1], out, cfg=CFG, quiet=True, resume=True)
    assert summary.resumed == (37 if fmt == "jsonl" else 2 * CFG.rows_per_file)
    assert stream_differences(list(read_verdicts(out)), ref) == []
    assert summary.total == len(ref)
    again = scan_sources_ray(tiny_bundle, data[1], out, cfg=CFG, quiet=True, resume=True)  # nothing left
    assert again.total == again.resumed == len(ref) and stream_differences(list(read_verdicts(out)), ref) == []


def test_parquet_input_and_a_user_dataset(cluster, tiny_bundle, digits_test, tmp_path):
    """A Parquet file with an image-bytes column, and a Ray dataset built in memory, against the local scan of the
    same images as JSONL (same ids; ``source`` differs by construction and is left out of the comparison)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    im = digits_test.images
    blobs = [png(im[300 + i, ..., 0]) for i in range(25)]
    blobs[3] = b"\x89PNG\r\n\x1a\n truncated"
    ids = [f"p{i}" for i in range(25)]
    pq.write_table(pa.table({"id": ids, "image": blobs}), tmp_path / "in.parquet")
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": i, "image": base64.b64encode(b).decode()}) + "\n"
                                               for i, b in zip(ids, blobs)))
    scan_sources(Guard.load(tiny_bundle), [str(tmp_path / "in.jsonl")], tmp_path / "ref.jsonl", quiet=True)

    def strip(recs):
        return [{k: v for k, v in r.items() if k != "source"} for r in recs]

    ref = strip(read_records(tmp_path / "ref.jsonl"))
    assert ref[3]["error"].startswith("unreadable image")
    scan_sources_ray(tiny_bundle, [str(tmp_path / "in.parquet")], tmp_path / "pq.jsonl", cfg=CFG, quiet=True)
    got = list(read_records(tmp_path / "pq.jsonl"))
    assert got[0]["source"] == f"{tmp_path / 'in.parquet'}#0"
    assert stream_differences(strip(got), ref) == []

    ds = ray.data.from_items([{"id": i, "image": b} for i, b in zip(ids, blobs)])
    summary = scan_dataset(ds, tiny_bundle, tmp_path / "ds.jsonl", cfg=CFG, quiet=True)
    assert summary.total == 25 and summary.errors == 1
    assert stream_differences(strip(read_records(tmp_path / "ds.jsonl")), ref) == []
    # resume on a dataset: ids already written are not scored again
    lines = (tmp_path / "ds.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "ds.jsonl").write_text("".join(lines[:10]))
    summary = scan_dataset(ds, tiny_bundle, tmp_path / "ds.jsonl", cfg=CFG, quiet=True, resume=True)
    assert summary.resumed == 10 and summary.total == 25
    assert stream_differences(strip(read_records(tmp_path / "ds.jsonl")), ref) == []

    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    scan_sources_ray(tiny_bundle, [str(tmp_path / "broken.parquet")], tmp_path / "b.jsonl", cfg=CFG, quiet=True)
    (rec,) = read_records(tmp_path / "b.jsonl")
    assert rec["id"] == str(tmp_path / "broken.parquet") and rec["error"].startswith("unreadable Parquet file")


def test_cli_engine_ray(cluster, tiny_bundle, data, local, tmp_path):
    ref, _ = local
    out = tmp_path / "cli.jsonl"
    r = CliRunner().invoke(main, ["-q", "scan", str(tiny_bundle), *data[1], "-o", str(out), "--engine", "ray",
                                  "--concurrency", "1", "--batch-size", "8", "--summary-json",
                                  str(tmp_path / "s.json")])
    assert r.exit_code == 0, r.output
    assert stream_differences(list(read_records(out)), ref) == []
    assert json.loads((tmp_path / "s.json").read_text())["total"] == len(ref)
    r = CliRunner().invoke(main, ["-q", "scan", str(tiny_bundle), "-", "-o", str(out), "--engine", "ray"])
    assert r.exit_code == 2 and "stdin" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["-q", "scan", str(tiny_bundle), *data[1], "-o", str(tmp_path / "x.parquet")])
    assert r.exit_code == 2 and "--engine ray" in r.output  # Parquet output is the Ray engine's
    r = CliRunner().invoke(main, ["-q", "scan", str(tiny_bundle), *data[1], "-o", str(out), "--address", "x"])
    assert r.exit_code == 2 and "--engine ray" in r.output


def test_the_ray_scan_never_imports_torch():
    code = ("import sys, abl_guard.guard.ray_scan as m; import ray.data; "
            "m.RayScanConfig(); assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_without_ray_the_cli_names_the_extra(tiny_bundle, data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as on a core install
    r = CliRunner().invoke(main, ["-q", "scan", str(tiny_bundle), *data[1], "-o", str(tmp_path / "o.jsonl"),
                                  "--engine", "ray"])
    assert r.exit_code == 7 and "abl-guard[ray]" in r.output and "Traceback" not in r.output
