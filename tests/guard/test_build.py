"""guard/build.py (bundle writing) split from guard/runtime.py (serving): the names stay importable from where they
were, serving does not load the calibration-time module, and ``calibrate --data`` with nothing readable is a usage
error."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner


def test_calibrate_bundle_is_reexported_where_it_was():
    import abl_guard.guard
    import abl_guard.guard.build as build
    import abl_guard.guard.runtime as runtime

    assert runtime.calibrate_bundle is build.calibrate_bundle is abl_guard.guard.calibrate_bundle
    from abl_guard.guard.runtime import calibrate_bundle, file_key, needed_outputs, observe  # noqa: F401

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        runtime.nope  # noqa: B018


@pytest.mark.parametrize("first", ["abl_guard.guard.build", "abl_guard.guard.runtime"])
def test_either_module_imports_first_and_serving_leaves_build_unloaded(first):
    code = (f"import sys, importlib; importlib.import_module({first!r})\n"
            "from abl_guard.guard.runtime import Guard, calibrate_bundle\n"
            "from abl_guard.guard.build import calibrate_bundle as c2\n"
            "assert calibrate_bundle is c2\n")
    if first.endswith("runtime"):
        code = ("import sys; import abl_guard.guard.runtime, abl_guard.guard.session, abl_guard.guard.scan\n"
                "assert 'abl_guard.guard.build' not in sys.modules, 'serving loaded build'\n") + code
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_split_is_seeded_and_checks_its_sizes():
    from abl_guard.guard.build import _split

    a = _split(100, (0.5, 0.3, 0.2), seed=3)
    b = _split(100, (0.5, 0.3, 0.2), seed=3)
    assert [len(p) for p in a] == [50, 30, 20]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert len(np.unique(np.concatenate(a))) == 100  # a partition
    assert [len(p) for p in _split(100, (40, 30, 10), seed=0)] == [40, 30, 10]  # counts
    with pytest.raises(ValueError, match="exceed"):
        _split(50, (40, 30, 10), seed=0)
    with pytest.raises(ValueError, match="sum to 1"):
        _split(100, (0.5, 0.3, 0.3), seed=0)


def test_read_clean_data_and_the_cli_refuse_sources_with_nothing_readable(tiny_onnx, tmp_path):
    from abl_guard.cli import main
    from abl_guard.guard.build import EmptyDataError, read_clean_data

    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(EmptyDataError, match="no readable images"):
        read_clean_data(tiny_onnx, [str(tmp_path / "junk.png")])
    r = CliRunner().invoke(main, ["calibrate", str(tiny_onnx), "--data", str(tmp_path / "junk.png"),
                                  "-o", str(tmp_path / "b")])
    assert r.exit_code == 2 and "--data" in r.output and "no readable images" in r.output
    assert not (tmp_path / "b").exists()


def test_read_clean_data_reads_like_scan_and_records_provenance(tiny_onnx, digits_train, tmp_path):
    from abl_guard.guard.build import read_clean_data

    np.savez(tmp_path / "d.npz", images=digits_train.images[:30], labels=digits_train.labels[:30])
    clean = read_clean_data(tiny_onnx, [str(tmp_path / "d.npz")], start=5, count=20)
    assert clean.images.shape == (20, 1, 8, 8) and clean.images.dtype == np.float32
    np.testing.assert_array_equal(clean.labels, digits_train.labels[5:25])
    assert clean.predicted == 0
    assert clean.provenance["sources"] == [str(tmp_path / "d.npz")] and clean.provenance["start"] == 5
    assert clean.provenance["inputs"] == 20 and clean.provenance["skipped_unreadable"] == 0


def test_split_held_out_gives_calibration_and_validation_parts_only():
    from abl_guard.guard.build import _split_held_out

    cal, val = _split_held_out(100, (0.5, 0.3, 0.2), seed=1)
    assert (len(cal), len(val)) == (60, 40)  # the last two fractions, rescaled
    assert len(np.unique(np.r_[cal, val])) == 100
    assert [len(p) for p in _split_held_out(100, (5000, 30, 20), seed=0)] == [30, 20]  # counts; the fit count unused
    with pytest.raises(ValueError, match="exceed"):
        _split_held_out(40, (1, 30, 20), seed=0)


def test_calibrate_bundle_fits_the_detectors_on_separate_fit_images(tiny_onnx, digits_train, digits_test, tmp_path):
    from abl_guard.detectors import make_detector
    from abl_guard.guard import Guard, calibrate_bundle

    knn = make_detector("knn", k=5, max_bank=None)
    m = calibrate_bundle(tiny_onnx, digits_test.images, digits_test.labels, [knn, make_detector("mahalanobis")],
                         tmp_path / "b", fpr=0.05, fractions=(0.5, 0.3, 0.2), seed=0,
                         fit_images=digits_train.images, fit_labels=digits_train.labels)
    split = m["calibration"]["split"]
    n_test = len(digits_test.images)
    assert split == {"fit": len(digits_train.images), "calibration": round(0.6 * n_test),
                     "validation": n_test - round(0.6 * n_test), "fit_from": "fit_images"}
    assert knn.bank_.shape[0] == len(digits_train.images)  # the bank is the fit images, all of them
    g = Guard.load(tmp_path / "b")
    assert g.inspect_arrays(digits_test.images[:50]).flagged.mean() < 0.5
    # held-out images that are also fit images would set the threshold on distances to themselves
    with pytest.raises(ValueError, match="also in the fit data"):
        calibrate_bundle(tiny_onnx, digits_train.images[:300], digits_train.labels[:300], [make_detector("knn", k=5)],
                         tmp_path / "c", fpr=0.05, fit_images=digits_train.images, fit_labels=digits_train.labels)
    with pytest.raises(ValueError, match="fit labels"):
        calibrate_bundle(tiny_onnx, digits_test.images, digits_test.labels, [make_detector("knn", k=5)],
                         tmp_path / "d", fpr=0.05, fit_images=digits_train.images, fit_labels=digits_train.labels[:9])


def test_cli_calibrate_fit_data(tiny_onnx, digits_train, digits_test, tmp_path):
    import json

    from abl_guard.cli import main

    np.savez(tmp_path / "fit.npz", images=digits_train.images, labels=digits_train.labels)
    np.savez(tmp_path / "cal.npz", images=digits_test.images, labels=digits_test.labels)
    base = ["calibrate", str(tiny_onnx), "--data", str(tmp_path / "cal.npz"), "--detectors", "mahalanobis,knn:k=5",
            "--fpr", "0.05"]
    r = CliRunner().invoke(main, [*base, "--fit-data", str(tmp_path / "fit.npz"), "--fit-count", "500",
                                  "-o", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    assert "fitted on 500 separate clean images" in r.output
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["calibration"]["split"]["fit"] == 500
    assert manifest["provenance"]["fit_data"]["sources"] == [str(tmp_path / "fit.npz")]
    r = CliRunner().invoke(main, [*base, "--fit-data", str(tmp_path / "cal.npz"), "-o", str(tmp_path / "c")])
    assert r.exit_code == 2 and "also in the fit data" in r.output and not (tmp_path / "c").exists()
    r = CliRunner().invoke(main, [*base, "--fit-data", str(tmp_path / "fit.npz"), "--fit-split", "train",
                                  "-o", str(tmp_path / "d")])
    assert r.exit_code == 2 and "not both" in r.output
    # a budget of a few kilobytes keeps only a few hundred of the 500 fit images, and says so
    r = CliRunner().invoke(main, [*base, "--fit-data", str(tmp_path / "fit.npz"), "--fit-count", "500",
                                  "--fit-memory", "0.00002", "-o", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    split = json.loads((tmp_path / "e" / "manifest.json").read_text())["calibration"]["split"]
    assert split["fit_offered"] == 500 and 0 < split["fit"] < 500
    assert f"fitted on a random {split['fit']} of 500 fit images" in r.output


def test_fit_pass_stays_within_its_memory_budget(tiny_onnx, digits_train, digits_test, tmp_path, caplog):
    from abl_guard.detectors import make_detector
    from abl_guard.guard import calibrate_bundle
    from abl_guard.guard.model import OnnxModel
    from abl_guard.guard.preprocess import to_model_input

    model = OnnxModel(tiny_onnx)
    x = to_model_input(digits_train.images[:1], model.input_shape)
    per = x[0].nbytes + sum(a.nbytes for a in model.run(x, None).values())
    knn = make_detector("knn", k=5, max_bank=None)
    with caplog.at_level("WARNING", logger="abl_guard.guard.build"):
        m = calibrate_bundle(tiny_onnx, digits_test.images, digits_test.labels, [knn], tmp_path / "b", fpr=0.05,
                             fit_images=digits_train.images, fit_labels=digits_train.labels, fit_memory=300 * per)
    split = m["calibration"]["split"]
    assert split["fit"] == 300 and split["fit_offered"] == len(digits_train.images)
    assert knn.bank_.shape[0] == 300  # the detector saw only the subset
    assert "fitting on a random 300" in caplog.text
    # within the budget nothing is dropped and the manifest says nothing about it
    m = calibrate_bundle(tiny_onnx, digits_test.images, digits_test.labels, [make_detector("knn", k=5)],
                         tmp_path / "c", fpr=0.05, fit_images=digits_train.images, fit_labels=digits_train.labels,
                         fit_memory=len(digits_train.images) * per)
    assert m["calibration"]["split"]["fit"] == len(digits_train.images)
    assert "fit_offered" not in m["calibration"]["split"]


@pytest.mark.parametrize("n_cal", [30, 90, 120, 607])
def test_too_small_a_calibration_part_names_an_fpr_and_a_count_that_resolve(n_cal):
    """The suggested --fpr is rounded up (1/121 would print as 0.00826, which 120 inputs cannot resolve) and the
    suggested image count gives the part enough at the same share."""
    import math
    import re

    from abl_guard.guard.build import _check_split
    from abl_guard.guard.calibration import min_calibration_size

    n = int(n_cal / 0.3)
    parts = (np.arange(n // 2), np.arange(n_cal), np.arange(max(10, n - n // 2 - n_cal)))
    with pytest.raises(ValueError) as e:
        _check_split(n, parts, 0.001)
    msg = str(e.value)
    fpr = float(re.search(r"--fpr to at least ([0-9.e-]+)", msg).group(1))
    assert min_calibration_size(fpr) <= n_cal and fpr <= 1 / (n_cal + 1) + 1e-4  # resolves, and no more than that
    count = int(re.search(r"give at least (\d+) clean images", msg).group(1))
    assert math.floor(count * n_cal / n) >= min_calibration_size(0.001) - 1  # the same share, enough (±1 rounding)
