"""`abl-guard scan` / `calibrate` as a pipeline sees them: exit codes, summary JSON, stdin, formats, archives."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from abl_guard.cli import main


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, digits_test):
    d = tmp_path_factory.mktemp("cli")
    np.save(d / "clean.npy", digits_test.images[:60])
    np.save(d / "noise.npy", np.random.default_rng(0).integers(0, 256, (40, 8, 8, 1), dtype=np.uint8))
    (d / "bad.png").write_bytes(b"nope")
    return d


def run(*args, input=None):
    return CliRunner().invoke(main, ["-q", *map(str, args)], input=input)


def test_exit_codes(tiny_bundle, inputs, tmp_path):
    clean, noise, bad = inputs / "clean.npy", inputs / "noise.npy", inputs / "bad.png"
    r = run("scan", tiny_bundle, clean, "-o", tmp_path / "a.jsonl")
    assert r.exit_code == 0, r.output
    r = run("scan", tiny_bundle, noise, "-o", tmp_path / "b.jsonl", "--fail-on-flag")
    assert r.exit_code == 3 and "flagged" in r.output
    r = run("scan", tiny_bundle, bad, "-o", tmp_path / "c.jsonl")
    assert r.exit_code == 0  # an error record is an answer...
    r = run("scan", tiny_bundle, bad, "-o", tmp_path / "c.jsonl", "--fail-on-error")
    assert r.exit_code == 1  # ...unless the pipeline asks otherwise
    r = run("scan", tiny_bundle, noise, bad, "-o", tmp_path / "d.jsonl", "--fail-on-error", "--fail-on-flag")
    assert r.exit_code == 3  # flags take precedence
    r = run("scan", inputs, clean, "-o", tmp_path / "e.jsonl")  # not a bundle
    assert r.exit_code == 1 and "not a guard bundle" in r.output
    (tmp_path / "junk.jsonl").write_text("junk\nmore junk\n")
    r = run("scan", tiny_bundle, clean, "-o", tmp_path / "junk.jsonl", "--resume")
    assert r.exit_code == 1 and "refusing to resume" in r.output


def test_summary_json_and_alarm_exit(tiny_bundle, inputs, tmp_path):
    s_path = tmp_path / "s.json"
    r = run("scan", tiny_bundle, inputs / "clean.npy", inputs / "noise.npy", inputs / "bad.png",
            "-o", tmp_path / "v.csv", "--summary-json", s_path, "--fail-on-alarm")
    s = json.loads(s_path.read_text())
    assert s["total"] == 101 and s["errors"] == 1 and s["scanned"] == 100
    assert s["flagged"] == sum(s["flagged_by_class"].values()) and 0 <= s["flag_rate"] <= 1
    assert s["flag_rate_ci95"][0] <= s["flag_rate"] <= s["flag_rate_ci95"][1]
    assert s["alarm"] is not None and set(s["alarm"]) >= {"fired", "target", "p_value", "message", "per_class"}
    assert r.exit_code == (3 if s["alarm"]["fired"] else 0)
    assert (tmp_path / "v.csv").read_text().startswith("id,source,error,label")
    assert "scanned 101 inputs" in r.output


def test_stdin_and_stdout(tiny_bundle, digits_test, tmp_path):
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(digits_test.images[0, ..., 0]).save(buf, format="PNG")
    line = json.dumps({"id": "x", "image": base64.b64encode(buf.getvalue()).decode()})
    r = CliRunner().invoke(main, ["-q", "scan", str(tiny_bundle), "-", "-o", "-"], input=line + "\n")
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout.splitlines()[0])
    assert rec["id"] == "x" and "label" in rec


def test_calibrate_cli_mondrian_archive(tiny_onnx, tmp_path):
    r = run("calibrate", tiny_onnx, "--dataset", "digits", "--split", "train", "--count", "1400", "--fpr", "0.05",
            "--mondrian", "--fractions", "500,600,300", "-o", tmp_path / "g.zip")
    assert r.exit_code == 0, r.output
    assert "Mondrian" in r.output and "validation FPR per predicted class" in r.output and "95% CI" in r.output
    from abl_guard.guard import Guard

    m = Guard.load(tmp_path / "g.zip").manifest
    assert m["calibration"]["split"] == {"fit": 500, "calibration": 600, "validation": 300}
    assert m["provenance"]["calibration_data"]["dataset"] == "digits"
    assert m["provenance"]["model"]["onnx_sha256"] == m["files"]["model.onnx"]
    assert {"input", "class_names", "taps", "detectors", "calibration", "package_version"} <= set(m)
    assert m["input"]["shape"] == [1, 8, 8] and m["taps"] == ["penultimate"]
    r = run("calibrate", tiny_onnx, "--dataset", "digits", "--split", "train", "--count", "100", "--fpr", "0.01",
            "-o", tmp_path / "small")
    assert r.exit_code == 2 and "cannot resolve a false-positive rate" in r.output  # a usage error (--count/--fpr)
    # the message says what would do: 330 images give the calibration part (0.3) the 99 that 1% needs
    assert "give at least 330 clean images" in r.output and "--fpr to at least 0.0323" in r.output
    r = run("calibrate", tiny_onnx, "--dataset", "digits", "--split", "train", "--count", "330", "--fpr", "0.01",
            "-o", tmp_path / "enough")
    assert r.exit_code == 0, r.output
