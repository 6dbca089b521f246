"""`abl-guard poison`, `abl-guard adversarial` and `abl-guard train --attack NAME` end to end on the digits."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from abl_guard.abl.data import load_npz
from abl_guard.cli import main

ATTACKS = ["badnets", "blend", "trojan", "sig", "wanet", "label-consistent"]


@pytest.fixture(scope="module")
def clean_ckpt(tmp_path_factory, digits_train):
    """A default small-cnn checkpoint trained for one epoch on the digits (one thread: ~1 s)."""
    import torch
    import torch.nn.functional as F

    from abl_guard.abl.checkpoint import save_checkpoint
    from abl_guard.abl.models import build_model
    from abl_guard.abl.train import ArrayBatches, make_optimizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    spec = digits_train.spec
    model = build_model("small-cnn", 1, 10, 8, spec.mean, spec.std)
    opt = make_optimizer(model, 0.05, 0.9, 5e-4)
    for x, y, _ in ArrayBatches(digits_train.images, digits_train.labels, torch.device("cpu"), 64):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("clean") / "model.pt"
    save_checkpoint(path, model.eval(), "small-cnn", spec)
    return str(path)


def _extra(name, ckpt):
    return ["--attack-param", f"model={ckpt}", "--attack-param", "steps=3"] if name == "label-consistent" else []


@pytest.mark.parametrize("name", ATTACKS)
def test_poison_writes_dataset_manifest_and_grid(name, clean_ckpt, tmp_path):
    out = tmp_path / "p.npz"
    r = CliRunner().invoke(main, ["-q", "poison", "--attack", name, "--dataset", "digits", "--rate", "0.05",
                                  "--target", "1", "--seed", "3", "--device", "cpu", "-o", str(out),
                                  *_extra(name, clean_ckpt)])
    assert r.exit_code == 0, r.output
    ds = load_npz(out)
    man = json.loads((tmp_path / "p.json").read_text())
    idx = np.load(tmp_path / man["files"]["poison_indices"], allow_pickle=False)
    assert len(ds) == man["n_images"] == 1437 and ds.images.dtype == np.uint8
    assert man["n_poisoned"] == len(idx) > 0 and man["attack"] == name and man["params"]["seed"] == 3
    if man["clean_label"]:
        assert man["n_labels_changed"] == 0 and set(man["poisoned_source_classes"]) == {"1"}
    else:
        assert man["n_labels_changed"] == len(idx) and np.all(ds.labels[idx] == 1)
    grid = np.asarray(Image.open(tmp_path / "p.png"))
    assert grid.ndim == 3 and grid.shape[2] == 3 and grid.shape[1] > grid.shape[0]
    if name == "wanet":
        cross = np.load(tmp_path / man["files"]["cross_indices"], allow_pickle=False)
        assert man["n_cross"] == len(cross) == 2 * len(idx)
    if name == "label-consistent":
        assert man["params"]["model"] == clean_ckpt and "last_perturbation" in man


def test_poisoned_npz_trains_and_triggered_set(clean_ckpt, tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["-q", "poison", "--attack", "blend", "--dataset", "digits", "--triggered-out",
                             str(tmp_path / "t.npz"), "-o", str(tmp_path / "p.npz")])
    assert r.exit_code == 0, r.output
    with np.load(tmp_path / "t.npz", allow_pickle=False) as z:
        assert np.all(z["target_labels"] == 0) and np.all(z["labels"] != 0) and len(z["images"]) == len(z["indices"])
    r = runner.invoke(main, ["-q", "train", "--dataset", str(tmp_path / "p.npz"), "--attack", "none", "--epochs",
                             "1", "--train-limit", "200", "--device", "cpu", "-o", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output


def test_label_consistent_needs_a_model(tmp_path):
    r = CliRunner().invoke(main, ["-q", "poison", "--attack", "label-consistent", "--dataset", "digits", "-o",
                                  str(tmp_path / "p.npz")])
    assert r.exit_code == 2 and "model" in r.output  # a usage error, one line (tests/test_cli_errors.py)


@pytest.mark.parametrize("name", ATTACKS)
def test_train_with_every_attack(name, clean_ckpt, tmp_path):
    r = CliRunner().invoke(main, ["-q", "train", "--dataset", "digits", "--attack", name, "--epochs", "1",
                                  "--train-limit", "200", "--test-limit", "50", "--device", "cpu", "-o",
                                  str(tmp_path), *_extra(name, clean_ckpt)])
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "run.json").read_text())
    assert rec["attack"]["name"] == name and 0 <= rec["metrics"]["attack_success_rate"] <= 1
    assert rec["n_poisoned"] == len(np.load(tmp_path / "poison_indices.npy")) > 0


def test_adversarial_cli(clean_ckpt, tmp_path):
    out = tmp_path / "adv.npz"
    r = CliRunner().invoke(main, ["-q", "adversarial", clean_ckpt, "--attack", "pgd", "--eps", "0.1", "--limit",
                                  "60", "--device", "cpu", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "success" in r.output and "(uint8)" in r.output
    ds = load_npz(out)  # the quantised examples load as a dataset
    with np.load(out, allow_pickle=False) as z:
        f = z["images_float"]
        assert f.dtype == np.float32 and f.shape == ds.images.shape == (60, 8, 8, 1)
        assert np.array_equal(z["success"], z["adv_pred"] != z["labels"])
        assert np.array_equal(z["success_uint8"], z["adv_pred_uint8"] != z["labels"])
        summary = json.loads(str(z["summary"]))
        assert summary["attack"] == "pgd" and summary["eps"] == 0.1 and summary["n"] == 60
    from abl_guard.abl.data import load_dataset

    orig = load_dataset("digits", "test").images[:60]
    assert np.abs(ds.images.astype(int) - orig).max() <= 25 and np.abs(f - orig / 255).max() <= 0.1 + 1e-6


def test_poison_trojan_with_trigger_optimisation(clean_ckpt, tmp_path):
    r = CliRunner().invoke(main, ["-q", "poison", "--attack", "trojan", "--dataset", "digits", "--device", "cpu",
                                  "--attack-param", f"model={clean_ckpt}", "--attack-param", "layer=fc1",
                                  "--attack-param", "steps=20", "-o", str(tmp_path / "p.npz")])
    assert r.exit_code == 0, r.output
    man = json.loads((tmp_path / "p.json").read_text())
    assert man["params"]["layer"] == "fc1" and man["params"]["model"] == clean_ckpt
    assert len(man["optimisation"]["neurons"]) == 1 and man["optimisation"]["steps"] == 20


def test_adversarial_cli_rejects_options_that_do_not_apply(clean_ckpt, tmp_path):
    for args in (["--attack", "cw", "--eps", "0.1"], ["--attack", "fgsm", "--steps", "5"]):
        r = CliRunner().invoke(main, ["-q", "adversarial", clean_ckpt, *args, "--limit", "5", "-o",
                                      str(tmp_path / "a.npz")])
        assert r.exit_code == 2 and "does not apply" in r.output
