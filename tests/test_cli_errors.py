"""Every command fails with one readable line and a documented exit status (issue 12), before doing any work."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from abl_guard.cli import EXIT_CODES, main, map_error

ROOT = Path(__file__).resolve().parents[1]


def run(*args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], **kw)


def assert_one_line_error(r, code: int, *needles: str) -> str:
    """Exit ``code``, no traceback, and exactly one ``Error:`` line (click's usage lines may precede it)."""
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, r.output
    assert r.output.rstrip().endswith(errors[0])  # the message is the last line, and one line
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@pytest.fixture
def junk(tmp_path) -> Path:
    p = tmp_path / "not_a_model.png"
    p.write_text("definitely not a model\n")
    return p


@pytest.fixture
def digits_npz(tmp_path, digits_train) -> Path:
    p = tmp_path / "digits.npz"
    digits_train.save_npz(p)
    return p


# ------------------------------------------------------------------------------------------------ the table


def test_exit_codes_are_documented_in_help_and_readme():
    r = run("--help")
    assert r.exit_code == 0
    for code, text in EXIT_CODES.items():
        assert re.search(rf"^\s*{code}\s+{re.escape(text[:40])}", r.output, re.M), code
    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", readme, re.M))
    assert {int(k): v for k, v in rows.items()} == EXIT_CODES


def test_commands_are_listed_in_workflow_order():
    listed = [line.split()[0] for line in run("--help").output.split("Commands:")[1].split("Exit status")[0]
              .splitlines() if line.startswith("  ") and line.split()]
    order = ["poison", "train", "adversarial", "export", "adopt", "calibrate", "scan", "report", "serve"]
    assert listed == [name for name in order if name in listed] and {"train", "export", "scan"} <= set(listed)


def test_map_error_kinds():
    from abl_guard.abl.data import DatasetError, DatasetNotFoundError
    from abl_guard.guard.bundle import BundleError
    from abl_guard.guard.preprocess import InputError

    assert map_error(BundleError("x")).exit_code == 5
    assert map_error(FileExistsError("x")).exit_code == 6
    for e in (InputError("x"), DatasetError("x"), DatasetNotFoundError("x"), PermissionError("x")):
        assert map_error(e).exit_code == 4, e
    assert map_error(KeyboardInterrupt()).exit_code == 130
    assert map_error(RuntimeError("bug")) is None
    try:
        np.zeros(3).reshape(2, 2)  # a ValueError raised inside numpy is a bug, not a validation message
    except ValueError as e:
        assert map_error(e) is None
    try:
        from abl_guard.abl.run_config import TrainConfig

        TrainConfig(epochs=0)
    except ValueError as e:  # raised by abl-guard's own validation: a usage error
        assert map_error(e).exit_code == 2
    assert map_error(BundleError("a\nb\n  c")).message == "a b c"  # always one line


def test_unexpected_errors_are_one_line_and_a_traceback_only_with_vv(monkeypatch, tmp_path):
    import abl_guard.abl.experiment as experiment

    def boom(cfg, out_dir, quiet=False):
        raise ZeroDivisionError("bug\nsecond line")

    monkeypatch.setattr(experiment, "run_experiment", boom)
    args = ["train", "--dataset", "digits", "--attack", "none", "-o", tmp_path / "r"]
    assert_one_line_error(run(*args), 1, "internal error: ZeroDivisionError: bug second line", "-vv")
    r = run("-vv", *args)
    assert r.exit_code == 1 and isinstance(r.exception, ZeroDivisionError)

    def interrupted(cfg, out_dir, quiet=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "run_experiment", interrupted)
    assert_one_line_error(run(*args), 130, "interrupted")


def test_nul_bytes_in_arguments_are_usage_errors(tmp_path):
    assert_one_line_error(run("export", "model\x00.pt", "-o", tmp_path / "x.onnx"), 2, "NUL byte")
    assert_one_line_error(run("scan", tmp_path, "in\x00put", "-o", "-"), 2, "NUL byte")


# ------------------------------------------------------------------------------------------------ export


def test_export_of_a_file_that_is_not_a_checkpoint(junk, tmp_path):
    assert_one_line_error(run("export", junk, "-o", tmp_path / "x.onnx"), 4, "not a loadable abl-guard checkpoint")
    assert not (tmp_path / "x.onnx").exists()
    r = run("export", junk, "-o", tmp_path / "x.onnx", "--arch", "resnet18", "--num-classes", "10",
            "--input-shape", "3,x,32", "--mean", "0.5", "--std", "0.2")
    assert_one_line_error(r, 2, "--input-shape")


# ------------------------------------------------------------------------------------------------ calibrate


def test_calibrate_checks_its_arguments_before_opening_the_model(junk, tmp_path):
    out = tmp_path / "bundle"
    assert_one_line_error(run("calibrate", junk, "--detectors", "foo", "-o", out), 2, "unknown detector 'foo'")
    assert_one_line_error(run("calibrate", junk, "--detector-param", "mahalanobis.nope=1", "-o", out), 2)
    assert_one_line_error(run("calibrate", junk, "--detectors", "knn:k", "-o", out), 2, "knn:KEY=VALUE")
    assert_one_line_error(run("calibrate", junk, "--detectors", "knn:nope=1", "-o", out), 2, "nope")
    assert_one_line_error(run("calibrate", junk, "--detectors", "knn", "--detector-param", "knn#2.k=3", "-o", out), 2,
                          "knn#2")
    # a detector's own '-' is kept (only the parameter key's '-' reads as '_'): these get past every argument check
    for args in (("--detectors", "mahalanobis-layers", "--detector-param", "mahalanobis-layers.ridge=0"),
                 ("--detectors", "knn,knn:tap=@-2:k=5", "--detector-param", "knn#2.k=7")):
        assert_one_line_error(run("calibrate", junk, *args, "-o", tmp_path / "new"), 4, "not a valid ONNX model")
    assert_one_line_error(run("calibrate", junk, "--count", "-5", "-o", out), 2, "--count")
    assert_one_line_error(run("calibrate", junk, "--start", "-1", "-o", out), 2, "--start")
    assert_one_line_error(run("calibrate", junk, "--fpr", "0", "-o", out), 2, "--fpr")
    assert_one_line_error(run("calibrate", junk, "--fractions", "0.5,0.5", "-o", out), 2, "--fractions")
    out.mkdir()
    assert_one_line_error(run("calibrate", junk, "-o", out), 6, "exists", "--force")
    assert_one_line_error(run("calibrate", junk, "-o", tmp_path / "new"), 4, "not a valid ONNX model")
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------------------ train


@pytest.mark.parametrize("args, code, needle", [
    (["--rate", "2"], 2, "--rate"),
    (["--target", "99"], 2, "target 99 is not a class of digits"),
    (["--target", "-1"], 2, "--target"),
    (["--resume"], 2, "defense abl"),
    (["--epochs", "0"], 2, "epochs"),
    (["--threads", "0"], 2, "threads"),
    (["--lr-milestones", "3,x"], 2, "--lr-milestones"),
    (["--attack-param", "nope=1"], 2, "nope"),
    (["--attack-param", "pattern=[[1,2],[3]]"], 2, "pattern"),
    (["--defense", "abl", "--abl-isolation-ratio", "2"], 2, "isolation_ratio"),
    (["--defense", "abl", "--defense-param", "isolation_ratio=2"], 2, "isolation_ratio"),
    (["--defense", "abl", "--defense-param", "gama=0.5"], 2, "gama"),
    (["--defense", "abl", "--abl-isolation-epochs", "20", "--epochs", "5"], 2, "exceed"),
    (["--defense", "bogus"], 2, "--defense"),
])
def test_train_validates_before_any_work(tmp_path, args, code, needle):
    out = tmp_path / "run"
    assert_one_line_error(run("train", "--dataset", "digits", *args, "-o", out), code, needle)
    assert not out.exists()  # failed before the run directory was created


def test_train_data_errors_are_input_errors(tmp_path):
    out = tmp_path / "run"
    assert_one_line_error(run("train", "--dataset", tmp_path / "missing.npz", "-o", out), 4, "does not exist")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 truncated zip")
    assert_one_line_error(run("train", "--dataset", bad, "-o", out), 4, "bad.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    assert_one_line_error(run("train", "--dataset", tmp_path / "other.npz", "-o", out), 4, "not an abl-guard dataset")
    assert_one_line_error(run("train", "--dataset", "fashion-mnist", "--data-root", tmp_path, "-o", out), 4,
                          "Fashion-MNIST")
    assert not out.exists()


def test_a_one_split_npz_is_never_tested_on_its_training_data(tmp_path, digits_npz, digits_test):
    base = ["-q", "train", "--dataset", digits_npz, "--attack", "none", "--epochs", "1", "--device", "cpu",
            "--threads", "1"]
    r = run(*base, "-o", tmp_path / "a")
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "a" / "run.json").read_text())
    assert rec["test_source"].startswith("held-out 20%") and "tested on held-out" in r.output
    assert rec["n_train"] + rec["n_test"] == 1437 and rec["n_test"] == round(0.2 * 1437)

    test_npz = tmp_path / "test.npz"
    digits_test.save_npz(test_npz)
    r = run(*base, "--test-data", test_npz, "-o", tmp_path / "b")
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "b" / "run.json").read_text())
    assert rec["n_train"] == 1437 and rec["n_test"] == len(digits_test) and rec["test_source"].startswith("test data")

    # one .npz with both splits
    both = tmp_path / "both.npz"
    with np.load(digits_npz) as z:
        np.savez(both, train_images=z["images"][:300], train_labels=z["labels"][:300], spec=z["spec"],
                 test_images=digits_test.images, test_labels=digits_test.labels)
    r = run(*base[:3], both, *base[4:], "-o", tmp_path / "c")
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "c" / "run.json").read_text())
    assert (rec["n_train"], rec["n_test"], rec["test_source"]) == (300, len(digits_test), "test split")


def test_threads_pin_torch_and_survive_device_selection(tmp_path):
    import torch

    from abl_guard.abl.train import select_device, set_cpu_threads

    before = torch.get_num_threads()
    try:
        r = run("-q", "train", "--dataset", "digits", "--attack", "none", "--epochs", "1", "--train-limit", "100",
                "--test-limit", "50", "--device", "cpu", "--threads", "1", "-o", tmp_path / "r")
        assert r.exit_code == 0, r.output
        assert torch.get_num_threads() == 1
        set_cpu_threads(2)
        select_device("cpu")  # used to reset the count to every core
        assert torch.get_num_threads() == 2
    finally:
        set_cpu_threads(None)
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------ poison / attacks


def test_badnets_pattern_from_npy_and_inline_json(tmp_path):
    patch = np.array([[255, 0], [0, 255]], np.uint8)
    np.save(tmp_path / "patch.npy", patch)
    for value in (tmp_path / "patch.npy", "[[255,0],[0,255]]"):
        out = tmp_path / "p.npz"
        r = run("-q", "poison", "--attack", "badnets", "--dataset", "digits", "--rate", "0.05", "--attack-param",
                f"pattern={value}", "--attack-param", "position=top-left", "-o", out)
        assert r.exit_code == 0, r.output
        man = json.loads((tmp_path / "p.json").read_text())
        idx = np.load(tmp_path / man["files"]["poison_indices"], allow_pickle=False)
        with np.load(out, allow_pickle=False) as z:
            assert np.array_equal(z["images"][idx][:, :2, :2, 0], np.broadcast_to(patch, (len(idx), 2, 2)))
    np.save(tmp_path / "obj.npy", np.array([object()], dtype=object), allow_pickle=True)
    r = run("poison", "--attack", "badnets", "--dataset", "digits", "--attack-param", f"pattern={tmp_path / 'obj.npy'}",
            "-o", tmp_path / "q.npz")
    assert_one_line_error(r, 2, "obj.npy")
    r = run("poison", "--attack", "badnets", "--dataset", "digits", "--attack-param", "pattern=[[300]]",
            "-o", tmp_path / "q.npz")
    assert_one_line_error(r, 2, "0-255")


def test_poison_validates_before_loading(tmp_path):
    out = tmp_path / "p.npz"
    assert_one_line_error(run("poison", "--attack", "badnets", "--dataset", "digits", "--target", "10", "-o", out),
                          2, "not a class of digits")
    assert_one_line_error(run("poison", "--attack", "badnets", "--dataset", "digits", "--rate", "-0.1", "-o", out),
                          2, "--rate")
    assert_one_line_error(run("poison", "--attack", "nope", "--dataset", "digits", "-o", out), 2, "unknown attack")
    assert_one_line_error(run("poison", "--attack", "label-consistent", "--dataset", "digits", "-o", out), 2, "model")
    assert_one_line_error(run("poison", "--attack", "blend", "--dataset", "digits", "--attack-param", "zap=1",
                              "-o", out), 2, "zap")
    assert not out.exists()


def test_adversarial_checks_options_before_loading(junk, tmp_path):
    out = tmp_path / "a.npz"
    assert_one_line_error(run("adversarial", junk, "--attack", "cw", "--eps", "0.1", "-o", out), 2, "does not apply")
    assert_one_line_error(run("adversarial", junk, "--threads", "0", "-o", out), 2, "--threads")
    assert_one_line_error(run("adversarial", junk, "--eps", "0", "-o", out), 2, "--eps")
    assert_one_line_error(run("adversarial", junk, "-o", out), 4, "not a loadable abl-guard checkpoint")


# ------------------------------------------------------------------------------------------------ report


def test_report_with_a_directory_that_is_not_a_bundle(tmp_path):
    verdicts = tmp_path / "v.jsonl"
    verdicts.write_text("")
    (tmp_path / "nb").mkdir()
    r = run("report", verdicts, "--bundle", tmp_path / "nb", "-o", tmp_path / "r.html")
    assert_one_line_error(r, 5, "not a guard bundle")
