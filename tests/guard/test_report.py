"""The scan report: self-contained HTML / PNG with the flag rate, histograms, thumbnails and the alarm."""

import base64
import re

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from abl_guard.guard import Guard
from abl_guard.guard.report import build_report, write_html, write_png
from abl_guard.guard.scan import scan_sources


@pytest.fixture(scope="module")
def scanned(tiny_bundle, digits_test, tmp_path_factory):
    """A scan of clean digits plus 30 off-manifold inputs that the tiny model predicts as one class."""
    d = tmp_path_factory.mktemp("report")
    g = Guard.load(tiny_bundle)
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (400, 8, 8, 1), dtype=np.uint8)
    labels = g.predict(noise)[0]
    target = np.bincount(labels).argmax()
    planted = noise[labels == target][:30]
    assert len(planted) == 30
    np.save(d / "clean.npy", digits_test.images)
    np.save(d / "planted.npy", planted)
    Image.fromarray(digits_test.images[0, ..., 0]).save(d / "one.png")
    (d / "bad.png").write_bytes(b"nope")
    out = d / "v.jsonl"
    s = scan_sources(g, [str(d / "clean.npy"), str(d / "planted.npy"), str(d / "one.png"), str(d / "bad.png")],
                     out, quiet=True)
    return d, out, s, int(target)


def test_report_data_matches_the_scan(scanned, tiny_bundle):
    d, out, s, target = scanned
    data = build_report(out, tiny_bundle, max_thumbnails=12)
    assert data.summary.to_json() | {"output": None} == s.to_json() | {"output": None}
    assert data.summary.alarm.fired and data.summary.alarm.target == target
    assert len(data.top_flagged) == min(12, s.flagged)
    scores = [r["score"] for r in data.top_flagged]
    assert scores == sorted(scores, reverse=True)  # the most suspicious first
    assert len(data.calibration_scores["mahalanobis"]) > 0 and data.thresholds
    assert len(data.detector_scores["mahalanobis"]) + len(data.detector_flagged["mahalanobis"]) == s.scanned


def test_html_is_self_contained(scanned, tiny_bundle, tmp_path):
    d, out, s, target = scanned
    page = write_html(build_report(out, tiny_bundle), tmp_path / "r.html").read_text()
    assert not re.search(r'(src|href)="(?!data:)', page), "external resources"
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(imgs) == 3  # overview, detector histograms, thumbnails
    for b in imgs:
        assert base64.b64decode(b).startswith(b"\x89PNG")
    assert f"suspected backdoor target: {target}" in page and "ALARM" in page
    assert f"{s.flagged} (" in page and "unreadable image: 1" in page


def test_thumbnails_are_the_flagged_inputs(scanned, tiny_bundle):
    from abl_guard.guard.report import THUMB, _thumbnails

    d, out, s, _ = scanned
    data = build_report(out, tiny_bundle, max_thumbnails=4)
    grid = _thumbnails(data.top_flagged, cols=4)
    assert grid.shape == (THUMB + 4, 4 * (THUMB + 2) + 2, 3)
    first = data.top_flagged[0]
    arr_path, _, row = first["id"].rpartition("#")
    want = np.load(arr_path)[int(row), ..., 0]
    tile = grid[2 : 2 + THUMB, 2 : 2 + THUMB, 0]
    np.testing.assert_array_equal(tile[:: THUMB // 8, :: THUMB // 8], want)  # nearest-neighbour upscale


def test_png_and_csv_and_no_bundle(scanned, tiny_bundle, tmp_path):
    d, out, s, _ = scanned
    png = write_png(build_report(out, tiny_bundle), tmp_path / "r.png")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 600 and im.size[1] > 600
    g = Guard.load(tiny_bundle)
    csv_out = tmp_path / "v.csv"
    scan_sources(g, [str(d / "clean.npy"), str(d / "planted.npy")], csv_out, quiet=True)
    data = build_report(csv_out)  # no bundle: no calibration histograms, no alarm
    assert data.summary.alarm is None and data.calibration_scores is None
    page = write_html(data, tmp_path / "nb.html").read_text()
    assert "pass <code>--bundle</code>" in page


def test_cli_report(scanned, tiny_bundle, tmp_path):
    from abl_guard.cli import main

    d, out, s, target = scanned
    r = CliRunner().invoke(main, ["report", str(out), "--bundle", str(tiny_bundle), "-o", str(tmp_path / "x.html")])
    assert r.exit_code == 0, r.output
    assert f"suspected backdoor target: {target}" in r.output and (tmp_path / "x.html").stat().st_size > 10_000
    r = CliRunner().invoke(main, ["report", str(out), "--png", "-o", str(tmp_path / "x.out")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "x.out").read_bytes().startswith(b"\x89PNG")


def test_report_refuses_to_overwrite_its_own_input(tmp_path):
    from click.testing import CliRunner

    from abl_guard.cli import main

    v = tmp_path / "v.jsonl"
    v.write_text('{"id": "a", "error": "x"}\n')
    r = CliRunner().invoke(main, ["report", str(v), "-o", str(v)])
    assert r.exit_code == 2 and "being reported on" in r.output
    assert v.read_text() == '{"id": "a", "error": "x"}\n'
