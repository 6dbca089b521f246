"""One source of defaults (issue 13): train's options come from the config dataclasses, --config files feed them."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from click.testing import CliRunner

from abl_guard.abl.config import ABLConfig
from abl_guard.abl.run_config import ExperimentConfig, TrainConfig
from abl_guard.cli import calibrate, main, train


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def captured(monkeypatch):
    import abl_guard.abl.experiment as experiment

    seen = {}

    def fake_run(cfg, out_dir, quiet=False):
        seen["cfg"], seen["out"] = cfg, out_dir
        return {"metrics": {"clean_accuracy": 0.5}, "train_seconds": 0.0, "device": "cpu"}

    monkeypatch.setattr(experiment, "run_experiment", fake_run)
    return seen


def test_every_documented_field_is_an_option_with_its_default_and_help():
    opts = {p.name: p for p in train.params}
    for cls, prefix, names in ((ExperimentConfig, "", None), (TrainConfig, "", None),
                               (ABLConfig, "abl_", ABLConfig.ABL_KNOBS)):
        for f in dataclasses.fields(cls):
            if names is not None and f.name not in names or names is None and "help" not in f.metadata:
                continue
            p = opts[prefix + f.name]
            default = f.metadata.get("cli_default", f.default)
            assert p.help == f.metadata["help"], f.name
            if isinstance(default, tuple):
                assert p.default == ",".join(map(str, default)), f.name
            else:
                assert p.default == default, f.name
            if "choices" in f.metadata:
                assert list(p.type.choices) == list(f.metadata["choices"]), f.name
    assert opts["abl_isolation_epochs"].default is None  # 20% of --epochs, resolved by ABLConfig.from_train


def test_max_ca_drop_help_says_what_the_code_does():
    text = ABLConfig.__dataclass_fields__["max_ca_drop"].metadata["help"]
    assert "every unlearning epoch runs" in text and "best passing epoch is kept" in text
    assert "roll" not in text and "stop" not in text.lower()


def test_defaults_reach_the_configs_unchanged(captured, tmp_path):
    r = run("train", "--dataset", "digits", "--defense", "abl", "-o", tmp_path)
    assert r.exit_code == 0, r.output
    cfg = captured["cfg"]
    assert cfg.train == TrainConfig()
    abl = ABLConfig.from_train(cfg.train, cfg.defense_params)
    for knob in ABLConfig.ABL_KNOBS:
        if knob != "isolation_epochs":
            assert getattr(abl, knob) == getattr(ABLConfig(), knob), knob
    assert abl.isolation_epochs == 2  # 20% of the default 10 epochs


def test_config_file_sets_options_and_flags_override_it(captured, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('dataset = "digits"\nepochs = 12\nlr-milestones = [6, 9]\nlr_gamma = 0.5\ndefense = "abl"\n'
                    'resume = true\nthreads = 1\nout = "RUN"\n'
                    '[abl]\ngamma = 0.3\nisolation-ratio = 0.05\n'
                    '[attack-param]\nsize = 4\nposition = "top-left"\n')
    r = run("train", "--config", toml, "--epochs", "20", "--abl-isolation-ratio", "0.1")
    assert r.exit_code == 0, r.output
    cfg = captured["cfg"]
    assert captured["out"] == "RUN" and cfg.dataset == "digits" and cfg.resume and cfg.threads == 1
    assert (cfg.train.epochs, cfg.train.lr_milestones, cfg.train.lr_gamma) == (20, (6, 9), 0.5)  # flag wins
    assert cfg.attack_params == {"rate": 0.1, "target": 0, "size": 4, "position": "top-left"}
    abl = ABLConfig.from_train(cfg.train, cfg.defense_params)
    assert (abl.gamma, abl.isolation_ratio, abl.isolation_epochs) == (0.3, 0.1, 4)


@pytest.mark.parametrize("text, needle", [
    ("epoch = 3\n", "'epoch'"),
    ("[abl]\ngama = 0.3\n", "'abl_gama'"),
    ("config = 'other.toml'\n", "'config'"),
    ("epochs = 'many'\n", "--epochs"),
    ("augment = 'mixup'\n", "--augment"),
    ("defense = 'abl'\n[abl]\nholdout = 0.9\n", "holdout"),
    ("dataset = \"dig\\u0000its\"\n", "NUL byte"),
    ("epochs = \n", "not valid TOML"),
])
def test_config_file_errors_are_usage_errors(tmp_path, text, needle):
    toml = tmp_path / "run.toml"
    toml.write_text(text)
    r = run("train", "--dataset", "digits", "--config", toml, "-o", tmp_path / "run")
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert needle in r.output.splitlines()[-1], r.output
    assert not (tmp_path / "run").exists()


def test_defense_param_is_an_alias_with_the_same_validation(captured, tmp_path):
    r = run("train", "--dataset", "digits", "--defense", "abl", "--defense-param", "unlearning-lr=0.001",
            "-o", tmp_path)
    assert r.exit_code == 0, r.output
    assert ABLConfig.from_train(captured["cfg"].train, captured["cfg"].defense_params).unlearning_lr == 0.001
    for bad in ("unlearning_lr=0", "lga=mean", "clean_epochs=3"):
        r = run("train", "--dataset", "digits", "--defense", "abl", "--defense-param", bad, "-o", tmp_path / "x")
        assert r.exit_code == 2 and "Traceback" not in r.output, (bad, r.output)


def test_calibrate_reads_a_config_file(tmp_path):
    junk = tmp_path / "m.onnx"
    junk.write_text("not onnx")
    toml = tmp_path / "cal.toml"
    toml.write_text('count = -5\n')
    r = run("calibrate", junk, "--config", toml, "-o", tmp_path / "b")
    assert r.exit_code == 2 and "--count" in r.output  # the file's values go through the same click checks
    toml.write_text('detectors = ["mahalanobis", "nope"]\n[detector-param.mahalanobis]\nridge = 0.1\n')
    r = run("calibrate", junk, "--config", toml, "-o", tmp_path / "b")
    assert r.exit_code == 2 and "unknown detector 'nope'" in r.output  # list joined, table flattened, then checked
    toml.write_text('detectors = "mahalanobis"\n[detector-param.mahalanobis]\nridge = 0.1\n')
    r = run("calibrate", junk, "--config", toml, "-o", tmp_path / "b")
    assert r.exit_code == 4 and "not a valid ONNX model" in r.output  # got past every argument check
    toml.write_text('fpr_target = 0.1\n')
    r = run("calibrate", junk, "--config", toml, "-o", tmp_path / "b")
    assert r.exit_code == 2 and "'fpr_target'" in r.output
    assert any(p.name == "config" for p in calibrate.params)


def test_help_stays_torch_free():
    code = ("import sys\nfrom abl_guard.cli import main\n"
            "for args in (['--help'], ['train', '--help'], ['calibrate', '--help']):\n"
            "    try:\n        main(args)\n    except SystemExit as e:\n        assert e.code == 0, args\n"
            "heavy = [m for m in ('torch', 'torchvision', 'scipy', 'onnx', 'onnxruntime') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--abl-max-ca-drop" in r.stdout and "--lr-gamma" in r.stdout


def test_a_detector_named_twice_takes_its_own_parameters():
    import click

    from abl_guard.cli import _calibration_detectors

    dets = _calibration_detectors("knn,knn,odds", ("knn#2.tap=pool", "knn.k=10", "odds.n_samples=4"))
    assert [d.name for d in dets] == ["knn", "knn", "odds"]
    assert (dets[0].tap, dets[0].k) == (None, 10) and (dets[1].tap, dets[1].k) == ("pool", 50)
    assert dets[2].draws == 4
    with pytest.raises(click.BadParameter, match="knn#3"):
        _calibration_detectors("knn,knn", ("knn#3.tap=pool",))
