"""Every ABL knob is honoured: by the config, by the CLI, and in behaviour."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from abl_guard.abl.abl import ABLConfig, run_abl, summary_lines
from abl_guard.abl.train import TrainConfig


def unlearn_cfg(**knobs: object) -> ABLConfig:
    """A config of the unlearn flow (isolation, clean stage on the same model, guarded unlearning)."""
    return ABLConfig.for_mode("unlearn", **knobs)  # type: ignore[arg-type]

FAST = dict(isolation_ratio=0.05, lr=0.05, batch_size=64, device="cpu", eval_every=0)


def test_from_train_maps_the_shared_options_and_splits_the_epochs():
    t = TrainConfig(epochs=10, batch_size=32, lr=0.02, momentum=0.8, weight_decay=1e-3, lr_milestones=(6,),
                    lr_gamma=0.5, augment="crop", seed=4, device="cpu", precision="bf16",
                    memory_format="channels-last")
    c = ABLConfig.from_train(t, {"mode": "unlearn"})
    assert (c.isolation_epochs, c.clean_epochs) == (2, 8)  # the paper's 20% of T
    assert (c.batch_size, c.lr, c.momentum, c.weight_decay, c.lr_milestones, c.lr_gamma, c.augment, c.seed,
            c.device, c.precision, c.memory_format) == (32, 0.02, 0.8, 1e-3, (6,), 0.5, "crop", 4, "cpu", "bf16",
                                                         "channels-last")
    assert ABLConfig.from_train(t, {"isolation_epochs": 3, "mode": "paper"}).clean_epochs == 7
    assert ABLConfig.from_train(TrainConfig(epochs=100)).isolation_epochs == 20
    # retrain mode (the default): the isolation epochs are extra, at most 20% of T, the clean stage a full T
    r = ABLConfig.from_train(t)
    assert (r.mode, r.isolation_epochs, r.clean_epochs, r.isolation_stop, r.unlearning_epochs) == (
        "retrain", 2, 10, "auto", 0)
    assert [c.lr_at(e) for e in (0, 5, 6, 9)] == [0.02, 0.02, 0.01, 0.01]
    # the remaining schedule: T minus the isolation epochs run, its milestones scaled (6 of 10 -> epoch 5 of 8)
    assert r.clean_stage_epochs(2) == 10
    rem = ABLConfig.from_train(t, {"retrain_epochs": "remaining"})
    assert (rem.clean_stage_epochs(2), rem.clean_stage_epochs(1), rem.clean_stage_epochs(12)) == (8, 9, 1)
    assert [rem.lr_at(e, 8) for e in (0, 4, 5, 7)] == [0.02, 0.02, 0.01, 0.01]
    assert [rem.lr_at(e, 10) for e in (5, 6)] == [0.02, 0.01]  # the whole schedule: unchanged
    assert ABLConfig.from_train(t, {"mode": "unlearn", "retrain_epochs": "remaining"}).clean_stage_epochs(2) == 8
    with pytest.raises(ValueError, match="unknown ABL parameter"):
        ABLConfig.from_train(t, {"gama": 0.5})
    with pytest.raises(ValueError, match="clean stage is --epochs"):
        ABLConfig.from_train(t, {"clean_epochs": 5})
    with pytest.raises(ValueError, match="exceed"):
        ABLConfig.from_train(t, {"isolation_epochs": 11, "mode": "unlearn"})


@pytest.mark.parametrize("bad", [dict(lga="mean"), dict(isolation_ratio=0.0), dict(isolation_ratio=1.0),
                                 dict(holdout=0.6), dict(max_ca_drop=-1), dict(unlearning_lr=0),
                                 dict(isolation_epochs=0), dict(unlearning_bn="off"), dict(eval_every=-1),
                                 dict(isolation_score="z"), dict(isolation_reference=1.0),
                                 dict(isolation_labels="majority"), dict(unlearning="descent"),
                                 dict(unlearning_ascent="up"),
                                 dict(unlearning_bound=-1.0), dict(expansion_recheck_epoch=-1),
                                 dict(expansion_recheck_scale=0.0), dict(expansion_recheck_scale=1.5),
                                 dict(expansion_recheck_passes=0), dict(expansion_recheck_min_mean=1.0),
                                 dict(expansion_recheck_min_mean=-0.1), dict(expansion_recheck_method="x"),
                                 dict(expansion_recheck_count_sd=-1.0)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        ABLConfig(**bad)


def test_epoch_knobs_set_the_stage_lengths_and_ratio_holdout_seed_the_split(small_poisoned):
    d = small_poisoned
    cfg = unlearn_cfg(isolation_epochs=2, clean_epochs=1, unlearning_epochs=2, max_ca_drop=1.0, holdout=0.1, **FAST)
    res = run_abl(d.model(width=8), d.images, d.labels, cfg, quiet=True)
    assert [h["stage"] for h in res.history] == ["isolation", "isolation", "clean", "unlearning", "unlearning"]
    assert len(res.holdout) == 60 and res.report["isolation"]["n_pool"] == 540
    assert len(res.isolated) == 27 and not np.isin(res.isolated, res.holdout).any()
    assert np.isnan(res.losses[res.holdout]).all() and np.isfinite(np.delete(res.losses, res.holdout)).all()

    other = run_abl(d.model(width=8), d.images, d.labels,
                    unlearn_cfg(isolation_epochs=1, clean_epochs=0, unlearning_epochs=0, holdout=0.0, seed=5,
                              **{**FAST, "isolation_ratio": 0.1}), quiet=True)
    assert len(other.holdout) == 0 and len(other.isolated) == 60
    assert not other.report["unlearning"]["guard"]["enabled"]
    assert [h["stage"] for h in other.history] == ["isolation"]


def test_gamma_and_lga_form_change_the_isolation_training(small_poisoned):
    d = small_poisoned

    def iso_losses(**kw):
        cfg = unlearn_cfg(isolation_epochs=2, clean_epochs=0, unlearning_epochs=0, **{**FAST, **kw})
        return run_abl(d.model(width=8), d.images, d.labels, cfg, quiet=True).losses

    base = iso_losses()
    # gamma inside the loss range of this barely trained model: the two forms now take different steps
    assert not np.allclose(iso_losses(gamma=2.2), iso_losses(gamma=2.2, lga="per-example"), equal_nan=True)
    ascent = iso_losses(gamma=50.0)  # gamma above every loss: pure gradient ascent, losses grow
    assert np.nanmean(ascent) > np.nanmean(base) + 1.0


def test_isolation_labels_target_unlearns_only_the_majority_label(small_poisoned):
    d = small_poisoned
    # a ratio well above the poisoning rate, so the lowest-loss candidates spill over into other labels
    cfg = unlearn_cfg(isolation_epochs=2, clean_epochs=0, unlearning_epochs=1, max_ca_drop=1.0,
                    **{**FAST, "isolation_ratio": 0.3})
    every = run_abl(d.model(width=8), d.images, d.labels, cfg, poison_indices=d.poison, quiet=True)
    cfg.isolation_labels = "target"
    target = run_abl(d.model(width=8), d.images, d.labels, cfg, poison_indices=d.poison, quiet=True)
    iso_all, iso_target = every.report["isolation"], target.report["isolation"]
    np.testing.assert_array_equal(every.losses, target.losses)  # same isolation training and ranking
    majority = iso_all["isolated_majority_label"]
    assert 0 < len(target.isolated) < len(every.isolated) == iso_all["n_candidates"]
    assert set(target.isolated) == {i for i in every.isolated if d.labels[i] == majority}
    assert iso_target["n_returned"] == len(every.isolated) - len(target.isolated) and iso_all["n_returned"] == 0
    assert iso_target["isolated_majority_label"] == majority  # label statistics describe the candidates
    assert iso_target["isolated_majority_fraction"] == iso_all["isolated_majority_fraction"] < 1.0
    assert iso_target["candidate_precision"] == iso_all["precision"]
    assert iso_target["precision"] > iso_all["precision"]  # the other labels held only clean examples
    assert target.report["unlearning"]["guard"]["suspected_target"] == majority
    assert any("went back to the clean set" in line for line in summary_lines(target.report))
    assert not any("went back" in line for line in summary_lines(every.report))


@pytest.mark.slow
def test_unlearning_lr_and_bn_mode_are_honoured(small_poisoned):
    d = small_poisoned
    snaps = {}

    def run(**kw):
        def save_stage(path, model, stage):
            snaps[(kw.get("unlearning_bn", "train"), kw.get("unlearning_lr"), stage)] = copy.deepcopy(
                model.state_dict())

        cfg = unlearn_cfg(isolation_epochs=1, clean_epochs=2, unlearning_epochs=1, max_ca_drop=1.0, **{**FAST, **kw})
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            res = run_abl(d.model(width=8), d.images, d.labels, cfg, out_dir=tmp, quiet=True, save_stage=save_stage)
        return res.report["unlearning"]

    small, big = run(unlearning_lr=1e-5), run(unlearning_lr=1e-2)
    assert big["isolated_accuracy_after"] < small["isolated_accuracy_after"]

    run(unlearning_lr=1e-2, unlearning_bn="frozen")
    key = "block1.0.1.running_mean"
    clean_stats = snaps[("frozen", 1e-2, "clean")][key]
    assert torch.equal(snaps[("frozen", 1e-2, "unlearning")][key], clean_stats)  # frozen: running stats kept
    assert not torch.equal(snaps[("train", 1e-2, "unlearning")][key], snaps[("train", 1e-2, "clean")][key])


@pytest.mark.slow
def test_eval_every_sets_how_often_evaluate_runs(small_poisoned):
    d = small_poisoned
    calls = []

    def evaluate(model):
        calls.append(1)
        return d.evaluate(model)

    # stage ends (3) and unlearning epochs (2) always; every=1 adds isolation epochs 1-2 and clean epoch 1
    # (the last epoch of a stage is covered by its stage end); every=2 adds isolation epoch 2 only
    for every, expected in ((0, 5), (1, 5 + 3), (2, 5 + 1)):
        calls.clear()
        cfg = unlearn_cfg(isolation_epochs=3, clean_epochs=2, unlearning_epochs=2, max_ca_drop=1.0,
                        **{**FAST, "eval_every": every})
        run_abl(d.model(width=8), d.images, d.labels, cfg, evaluate=evaluate, quiet=True)
        assert len(calls) == expected, every


# ------------------------------------------------------------------------------------------------ CLI

ABL_FLAGS = {
    "mode": ("--abl-mode", "unlearn", "unlearn"),
    "gamma": ("--abl-gamma", "0.3", 0.3),
    "lga": ("--abl-lga", "per-example", "per-example"),
    "isolation_epochs": ("--abl-isolation-epochs", "3", 3),
    "isolation_stop": ("--abl-isolation-stop", "auto", "auto"),
    "isolation_concentration": ("--abl-isolation-concentration", "0.8", 0.8),
    "isolation_ratio": ("--abl-isolation-ratio", "0.05", 0.05),
    "isolation_score": ("--abl-isolation-score", "loss", "loss"),
    "isolation_reference": ("--abl-isolation-reference", "0.75", 0.75),
    "isolation_labels": ("--abl-isolation-labels", "target", "target"),
    "isolation_extra_epochs": ("--abl-isolation-extra-epochs", "2", 2),
    "expansion_method": ("--abl-expansion-method", "classifier", "classifier"),
    "expansion_scan_method": ("--abl-expansion-scan-method", "spectral", "spectral"),
    "expansion_scan_separation": ("--abl-expansion-scan-separation", "0", 0.0),
    "expansion_scan_count_sd": ("--abl-expansion-scan-count-sd", "0", 0.0),
    "expansion_input_separation": ("--abl-expansion-input-separation", "0", 0.0),
    "input_scan": ("--abl-input-scan", "last", "last"),
    "retrain_epochs": ("--abl-retrain-epochs", "remaining", "remaining"),
    "restart": ("--abl-restart", "always", "always"),
    "expansion_posterior": ("--abl-expansion-posterior", "0.1", 0.1),
    "expansion_scan_share": ("--abl-expansion-scan-share", "0", 0.0),
    "expansion_separation": ("--abl-expansion-separation", "3", 3.0),
    "expansion_max_share": ("--abl-expansion-max-share", "0.7", 0.7),
    "expansion_union_sd": ("--abl-expansion-union-sd", "0", 0.0),
    "expansion_capped_count_sd": ("--abl-expansion-capped-count-sd", "0", 0.0),
    "expansion_off_label_ratio": ("--abl-expansion-off-label-ratio", "0", 0.0),
    "expansion_recheck_epoch": ("--abl-expansion-recheck-epoch", "2", 2),
    "expansion_recheck_scale": ("--abl-expansion-recheck-scale", "0.5", 0.5),
    "expansion_recheck_passes": ("--abl-expansion-recheck-passes", "2", 2),
    "expansion_recheck_min_mean": ("--abl-expansion-recheck-min-mean", "0", 0.0),
    "expansion_recheck_method": ("--abl-expansion-recheck-method", "pixel", "pixel"),
    "expansion_recheck_count_sd": ("--abl-expansion-recheck-count-sd", "3", 3.0),
    "residual_unlearning_epochs": ("--abl-residual-unlearning-epochs", "3", 3),
    "residual_unlearning_lr": ("--abl-residual-unlearning-lr", "0.004", 0.004),
    "residual_max_ca_drop": ("--abl-residual-max-ca-drop", "0.005", 0.005),
    "unlearning": ("--abl-unlearning", "ascent", "ascent"),
    "unlearning_bound": ("--abl-unlearning-bound", "0", 0.0),
    "unlearning_ascent": ("--abl-unlearning-ascent", "complement", "complement"),
    "unlearning_epochs": ("--abl-unlearning-epochs", "7", 7),
    "unlearning_lr": ("--abl-unlearning-lr", "0.001", 0.001),
    "unlearning_bn": ("--abl-unlearning-bn", "frozen", "frozen"),
    "max_ca_drop": ("--abl-max-ca-drop", "0.1", 0.1),
    "holdout": ("--abl-holdout", "0.05", 0.05),
    "eval_every": ("--abl-eval-every", "2", 2),
}


def test_every_abl_knob_has_a_cli_option_with_the_config_default():
    from abl_guard.cli import train

    opts = {p.name: p for p in train.params}
    assert set(ABL_FLAGS) == set(ABLConfig.ABL_KNOBS)
    for knob in ABLConfig.ABL_KNOBS:
        p = opts[f"abl_{knob}"]
        # the knobs whose default depends on --abl-mode show none on the command line (ABLConfig resolves them)
        per_mode = ("isolation_epochs", "isolation_stop", "isolation_labels", "unlearning_epochs",
                    "residual_unlearning_epochs")
        default = None if knob in per_mode else getattr(ABLConfig(), knob)
        assert p.default == default, knob


@pytest.fixture
def captured(monkeypatch):
    import abl_guard.abl.experiment as abl_experiment
    seen = {}

    def fake_run(cfg, out_dir, quiet=False):
        seen["cfg"] = cfg
        return {"metrics": {"clean_accuracy": 0.5}, "train_seconds": 0.0, "device": "cpu"}

    monkeypatch.setattr(abl_experiment, "run_experiment", fake_run)
    return seen


def test_cli_passes_every_knob_through(captured, tmp_path):
    from abl_guard.cli import main

    args = ["train", "--dataset", "digits", "--defense", "abl", "--epochs", "12", "-o", str(tmp_path),
            "--precision", "bf16", "--memory-format", "channels-last", "--resume", "--seed", "3"]
    for flag, text, _ in ABL_FLAGS.values():
        args += [flag, text]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    cfg = captured["cfg"]
    assert cfg.resume and cfg.train.precision == "bf16" and cfg.train.memory_format == "channels-last"
    abl_cfg = ABLConfig.from_train(cfg.train, cfg.defense_params)
    for knob, (_, _, value) in ABL_FLAGS.items():
        assert getattr(abl_cfg, knob) == value, knob
    assert abl_cfg.clean_epochs == 9 and abl_cfg.seed == 3  # unlearn mode: T - T_te


def test_abl_mode_presets_and_explicit_knobs_win(captured, tmp_path):
    """--abl-mode paper sets every default the paper's; an explicit option still wins over the preset."""
    from abl_guard.cli import main

    base = ["train", "--dataset", "digits", "--defense", "abl", "--epochs", "10", "-o", str(tmp_path)]
    r = CliRunner().invoke(main, base + ["--abl-mode", "paper", "--abl-unlearning-lr", "0.002"])
    assert r.exit_code == 0, r.output
    c = ABLConfig.from_train(captured["cfg"].train, captured["cfg"].defense_params)
    assert (c.mode, c.isolation_score, c.isolation_labels, c.isolation_stop, c.unlearning_bound, c.holdout,
            c.isolation_ratio, c.unlearning_epochs, c.clean_epochs) == ("paper", "loss", "all", "fixed", 0.0, 0.0,
                                                                        0.01, 5, 8)
    assert c.unlearning_lr == 0.002
    r = CliRunner().invoke(main, base)
    c = ABLConfig.from_train(captured["cfg"].train, captured["cfg"].defense_params)
    assert (c.mode, c.isolation_labels, c.isolation_stop, c.unlearning_epochs, c.clean_epochs) == (
        "retrain", "target", "auto", 0, 10)
    direct, via_cli = ABLConfig.for_mode("unlearn"), ABLConfig.from_train(captured["cfg"].train, {"mode": "unlearn"})
    for knob in set(ABLConfig.ABL_KNOBS) - {"isolation_epochs"}:  # the one set from --epochs
        assert getattr(direct, knob) == getattr(via_cli, knob), knob
    with pytest.raises(ValueError, match="mode"):
        ABLConfig.for_mode("fast")


def test_cli_defense_param_route_and_conflicts(captured, tmp_path):
    from abl_guard.cli import main

    base = ["train", "--dataset", "digits", "-o", str(tmp_path)]
    r = CliRunner().invoke(main, base + ["--defense", "abl", "--defense-param", "gamma=0.25"])
    assert r.exit_code == 0, r.output
    assert ABLConfig.from_train(captured["cfg"].train, captured["cfg"].defense_params).gamma == 0.25
    r = CliRunner().invoke(main, base + ["--defense", "abl", "--abl-gamma", "0.3", "--defense-param", "gamma=0.2"])
    assert r.exit_code == 2 and "gamma" in r.output
    r = CliRunner().invoke(main, base + ["--abl-gamma", "0.3"])  # --defense none
    assert r.exit_code == 2 and "--defense abl" in r.output


def test_isolation_stop_auto_ends_the_isolation_once_concentrated(small_poisoned):
    """isolation_stop=auto asks after every isolation epoch whether the isolated fraction is concentrated in one
    label; with a threshold every set meets it stops after the first epoch; isolation_stop=fixed runs them all."""
    d = small_poisoned
    early = run_abl(d.model(width=8), d.images, d.labels,
                    unlearn_cfg(isolation_epochs=3, clean_epochs=1, unlearning_epochs=0, isolation_stop="auto",
                                isolation_concentration=0.01, **FAST), quiet=True)
    assert [h["stage"] for h in early.history] == ["isolation", "clean"]
    assert early.report["isolation"]["epoch"] == 1 and early.report["isolation"]["stopped_early"]
    full = run_abl(d.model(width=8), d.images, d.labels,
                   unlearn_cfg(isolation_epochs=3, clean_epochs=1, unlearning_epochs=0, isolation_stop="fixed",
                               isolation_concentration=0.01, **FAST), quiet=True)
    assert [h["stage"] for h in full.history] == ["isolation"] * 3 + ["clean"]
    assert full.report["isolation"]["epoch"] == 3 and not full.report["isolation"]["stopped_early"]
