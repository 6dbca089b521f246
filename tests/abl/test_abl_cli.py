"""`abl-guard train --defense abl` end to end on digits: run record, artifacts, summary, resume of a finished run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from abl_guard.cli import main


@pytest.mark.slow
def test_train_abl_writes_the_run_record_and_isolation_artifacts(tmp_path):
    out = tmp_path / "run"
    args = ["-q", "train", "--dataset", "digits", "--defense", "abl", "--abl-mode", "unlearn", "--epochs", "4",
            "--lr", "0.05", "--batch-size", "64", "--abl-isolation-ratio", "0.05", "--abl-unlearning-epochs", "2",
            "--abl-max-ca-drop", "1.0", "--abl-eval-every", "0", "--device", "cpu", "--save-cleansed", "-o", str(out)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    for stage in ("isolation", "clean", "unlearning"):
        assert stage in r.output
    assert "precision" in r.output and "ASR" in r.output

    rec = json.loads((out / "run.json").read_text())
    abl = rec["abl"]
    assert set(abl["stages"]) == {"isolation", "clean", "unlearning"}
    for s in abl["stages"].values():
        assert 0 <= s["clean_accuracy"] <= 1 and 0 <= s["attack_success_rate"] <= 1
    iso = abl["isolation"]
    assert iso["n_isolated"] == round(0.05 * iso["n_pool"])
    assert 0 <= iso["precision"] <= 1 and 0 <= iso["recall"] <= 1 and 0 <= iso["auroc"] <= 1
    assert abl["config"]["isolation_epochs"] == 1 and abl["config"]["clean_epochs"] == 3
    assert isinstance(abl["warnings"], list)
    for name in ("isolated_indices.npy", "isolated.csv", "isolation_losses.npy", "isolation_scores.npy",
                 "isolation_hist.png",
                 "isolated_grid.png", "stage_isolation.pt", "stage_clean.pt", "stage_unlearning.pt", "model.pt"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "isolation_hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    isolated = np.load(out / "isolated_indices.npy", allow_pickle=False)
    losses = np.load(out / "isolation_losses.npy", allow_pickle=False)
    scores = np.load(out / "isolation_scores.npy", allow_pickle=False)
    assert len(isolated) == iso["n_isolated"] and np.all(np.diff(scores[isolated]) >= 0)  # lowest score first
    assert iso["score"] == "class-relative" and np.isfinite(losses[isolated]).all()
    rest = np.setdiff1d(np.flatnonzero(np.isfinite(scores)), isolated)
    assert scores[isolated].max() <= scores[rest].min()
    assert len((out / "isolated.csv").read_text().splitlines()) == len(isolated) + 1
    # the cleansed set is what the clean stage trained on: neither the unlearned nor the held-out examples
    c = rec["cleansed"]
    n_train, n_held = rec["n_train"], abl["holdout"]["n"]
    assert c["n"] == n_train - n_held - len(isolated) and c["n_dropped"] == n_held + len(isolated)
    with np.load(out / "cleansed.npz", allow_pickle=False) as z:
        assert len(z["images"]) == len(z["labels"]) == c["n"]
    poisoned = np.load(out / "poison_indices.npy", allow_pickle=False)
    assert 0 <= c["poisoned_left"] <= len(poisoned) - np.isin(poisoned, isolated).sum()
    assert f"cleansed training set: {c['n']} images" in r.output
    # stage checkpoints load as ordinary abl-guard checkpoints
    from abl_guard.abl.checkpoint import load_checkpoint

    _, meta = load_checkpoint(out / "stage_clean.pt")
    assert meta["stage"] == "clean" and meta["defense"] == "abl"

    # --resume on a finished run is a no-op that reports the same numbers
    r2 = CliRunner().invoke(main, args + ["--resume"])
    assert r2.exit_code == 0, r2.output
    rec2 = json.loads((out / "run.json").read_text())
    assert rec2["metrics"] == rec["metrics"] and rec2["abl"]["stages"] == abl["stages"]


def test_save_cleansed_needs_abl(tmp_path):
    r = CliRunner().invoke(main, ["train", "--dataset", "digits", "--epochs", "1", "--save-cleansed", "-o",
                                  str(tmp_path)])
    assert r.exit_code == 2 and "--defense abl" in r.output


def test_resume_needs_abl(tmp_path):
    r = CliRunner().invoke(main, ["train", "--dataset", "digits", "--epochs", "1", "--resume", "-o", str(tmp_path)])
    assert r.exit_code == 2 and "defense abl" in r.output  # a usage error, one line (tests/test_cli_errors.py)
