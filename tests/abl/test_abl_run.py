"""ABL end to end on tiny digits: ASR drops vs no defence, unlearning raises the isolated loss, the guard, resume."""

from __future__ import annotations

import copy
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from abl_guard.abl.abl import ABLConfig, cycle_batches, run_abl, unlearning_epoch
from abl_guard.abl.train import ArrayBatches, TrainConfig, per_example_loss, set_cpu_threads, train_plain


def unlearn_cfg(**knobs: object) -> ABLConfig:
    """A config of the unlearn flow (isolation, clean stage on the same model, guarded unlearning)."""
    return ABLConfig.for_mode("unlearn", **knobs)  # type: ignore[arg-type]

CPU = torch.device("cpu")
#: 6 training epochs (2 isolation + 4 clean); 5% isolation because 10% of 1,437 images are poisoned
E2E = dict(isolation_epochs=2, clean_epochs=4, isolation_ratio=0.05, lr=0.05, batch_size=64, unlearning_epochs=4,
           device="cpu", eval_every=0)


@pytest.fixture
def two_threads():
    """Pin torch to 2 CPU threads (CI's default on this 2-core machine) whatever OMP_NUM_THREADS says: the thread
    count changes float reduction order, and this end-to-end check sits a point above its accuracy floor."""
    set_cpu_threads(2)
    yield
    set_cpu_threads(None)


@pytest.mark.slow
def test_abl_clearly_lowers_asr_vs_no_defence(poisoned_digits, two_threads):
    d = poisoned_digits
    plain = d.model()
    train_plain(plain, d.images, d.labels, TrainConfig(epochs=6, lr=0.05, batch_size=64, device="cpu"), quiet=True)
    base = d.evaluate(plain)
    assert base["attack_success_rate"] > 0.9 and base["clean_accuracy"] > 0.9

    # 8x8 digits: the 3x3 trigger covers 14% of the image; the paper's raw-loss ranking isolates better than the
    # class-relative one on this tiny set (exploratory, see abl/abl.py), and a 72-image isolated set needs a higher
    # lr than the default to move in 4 epochs. The guard runs with its default margin on its 29 held-out images.
    cfg = unlearn_cfg(**E2E, isolation_score="loss", unlearning_lr=5e-3)
    res = run_abl(d.model(), d.images, d.labels, cfg, evaluate=d.evaluate, poison_indices=d.poison, quiet=True)
    rep = res.report
    assert rep["isolation"]["precision"] >= 0.9
    assert rep["stages"]["clean"]["attack_success_rate"] > 0.9  # the clean stage still learns the other poisons
    final = rep["stages"]["unlearning"]
    assert final["attack_success_rate"] < base["attack_success_rate"] - 0.5
    assert final["clean_accuracy"] > 0.9
    un = rep["unlearning"]
    assert un["selected_epoch"] >= 1 and un["isolated_accuracy_after"] < 0.5 < un["isolated_accuracy_before"]
    assert [h["stage"] for h in res.history] == ["isolation"] * 2 + ["clean"] * 4 + ["unlearning"] * 4


def test_unlearning_increases_loss_on_the_isolated_set(small_poisoned):
    d = small_poisoned
    model = d.model()
    train_plain(model, d.images, d.labels, TrainConfig(epochs=3, lr=0.05, batch_size=64, device="cpu"), quiet=True)
    iso = d.poison[:30]
    before = per_example_loss(model, d.images[iso], d.labels[iso], CPU).mean()
    opt = torch.optim.SGD(model.parameters(), lr=5e-4, momentum=0.9)
    batches = ArrayBatches(d.images[iso], d.labels[iso], CPU, 16, seed=0)
    ascent_ce = [unlearning_epoch(model, batches, opt) for _ in range(3)]
    after = per_example_loss(model, d.images[iso], d.labels[iso], CPU).mean()
    assert after > before + 0.5
    assert ascent_ce[-1] > ascent_ce[0]  # the reported (positive) cross-entropy grows
    with pytest.raises(ValueError):
        unlearning_epoch(model, batches, opt, bn="none")


def test_joint_unlearning_step_is_clean_descent_minus_isolated_ascent(small_poisoned):
    d = small_poisoned
    iso, clean_idx = d.poison[:16], np.setdiff1d(np.arange(len(d.labels)), d.poison)[:16]
    model = d.model(width=8)
    start = copy.deepcopy(model.state_dict())
    # the expected gradient: one forward pass of [isolated; clean], CE(clean) - CE(isolated) (BatchNorm sees both)
    x = torch.cat([ArrayBatches(d.images[iso], d.labels[iso], CPU, 16, shuffle=False).__iter__().__next__()[0],
                   ArrayBatches(d.images[clean_idx], d.labels[clean_idx], CPU, 16, shuffle=False).__iter__()
                   .__next__()[0]])
    y = torch.as_tensor(np.concatenate([d.labels[iso], d.labels[clean_idx]]))
    model.train()
    per = F.cross_entropy(model(x), y, reduction="none")
    model.zero_grad()
    (per[16:].mean() - per[:16].mean()).backward()
    expected = {n: p.detach() - 0.1 * p.grad for n, p in model.named_parameters()}

    model.load_state_dict(start)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    clean = cycle_batches(ArrayBatches(d.images, d.labels, CPU, 16, shuffle=False, indices=clean_idx))
    ce = unlearning_epoch(model, ArrayBatches(d.images[iso], d.labels[iso], CPU, 16, shuffle=False), opt,
                          clean=clean)
    assert ce == pytest.approx(float(per[:16].mean().detach()), rel=1e-5)  # reports the isolated CE only
    for n, p in model.named_parameters():
        assert torch.allclose(p, expected[n], atol=1e-6), n
    # bound: an isolated example whose CE is above it gets no ascent; with every example above, only clean descent
    model.load_state_dict(start)
    model.train()
    per = F.cross_entropy(model(x), y, reduction="none")
    model.zero_grad()
    per[16:].mean().backward()
    expected = {n: p.detach() - 0.1 * p.grad for n, p in model.named_parameters()}
    model.load_state_dict(start)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    clean = cycle_batches(ArrayBatches(d.images, d.labels, CPU, 16, shuffle=False, indices=clean_idx))
    unlearning_epoch(model, ArrayBatches(d.images[iso], d.labels[iso], CPU, 16, shuffle=False), opt, clean=clean,
                     bound=1e-9)
    for n, p in model.named_parameters():
        assert torch.allclose(p, expected[n], atol=1e-6), n
    # the clean batches cycle: a 1-batch clean set feeds any number of isolated batches
    unlearning_epoch(model, ArrayBatches(d.images[d.poison[:48]], d.labels[d.poison[:48]], CPU, 16), opt,
                     clean=clean)
    with pytest.raises(ValueError, match="empty"):
        next(cycle_batches(ArrayBatches(d.images, d.labels, CPU, 16, indices=np.zeros(0, np.int64))))


@pytest.mark.slow
def test_guard_keeps_the_best_epoch_that_passed_it(small_poisoned):
    d = small_poisoned
    cfg = unlearn_cfg(isolation_epochs=1, clean_epochs=2, unlearning_epochs=4, unlearning_lr=0.5, isolation_ratio=0.05,
                    lr=0.05, batch_size=64, device="cpu", eval_every=0, holdout=0.1, max_ca_drop=0.0,
                    unlearning="ascent", unlearning_bound=0.0)
    res = run_abl(d.model(width=16), d.images, d.labels, cfg, evaluate=d.evaluate, quiet=True)
    un = res.report["unlearning"]
    g = un["guard"]
    assert g["enabled"] and g["n_holdout"] == 60
    assert un["epochs_run"] == 4 and un["rejected_epochs"]  # every epoch runs; a destructive lr gets rejected
    for i, t in enumerate(un["trajectory"], 1):
        failed = (g["baseline"]["nontarget_accuracy"] - t["guard_nontarget_accuracy"] > 0.0
                  or g["baseline"]["estimated_accuracy"] - t["guard_estimated_accuracy"] > 0.0)
        assert failed == (i in un["rejected_epochs"]) == bool(t["guard_rejected"])
    sel = un["selected_epoch"]
    assert sel not in un["rejected_epochs"]
    # the kept model is the selected epoch (or the model before unlearning), never a rejected one
    kept_iso_acc = un["isolated_accuracy_before"] if sel == 0 else un["trajectory"][sel - 1]["isolated_accuracy"]
    assert un["isolated_accuracy_after"] == pytest.approx(kept_iso_acc)
    # ... the one with the best estimated held-out accuracy minus the isolated-set probe
    score = {i: t["guard_estimated_accuracy"] - t["isolated_accuracy"] for i, t in enumerate(un["trajectory"], 1)
             if i not in un["rejected_epochs"]}
    score[0] = g["baseline"]["estimated_accuracy"] - un["isolated_accuracy_before"]
    assert score[sel] >= max(score.values()) - 1e-4
    assert g["final"]["nontarget_accuracy"] >= g["baseline"]["nontarget_accuracy"]
    if sel == 0:
        assert any("guard" in w for w in res.report["warnings"])


@pytest.fixture(scope="module")
def resume_reference(small_poisoned, tmp_path_factory):
    d = small_poisoned
    cfg = unlearn_cfg(isolation_epochs=3, clean_epochs=2, unlearning_epochs=2, isolation_ratio=0.05, lr=0.05,
                    batch_size=64, device="cpu", eval_every=1, unlearning_lr=2e-3, max_ca_drop=1.0)
    model = d.model()
    res = run_abl(model, d.images, d.labels, cfg, out_dir=tmp_path_factory.mktemp("ref"), evaluate=d.evaluate,
                  quiet=True)
    return cfg, model, res


class _InterruptError(Exception):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("stop_at_call", [2, 4, 7])  # isolation epoch 2, clean epoch 1, unlearning epoch 2
def test_resume_continues_an_interrupted_run_exactly(small_poisoned, resume_reference, tmp_path, stop_at_call):
    d = small_poisoned
    cfg, ref_model, ref = resume_reference
    calls = {"n": 0}

    def flaky(model):
        calls["n"] += 1
        if calls["n"] == stop_at_call:
            raise _InterruptError
        return d.evaluate(model)

    with pytest.raises(_InterruptError):
        run_abl(d.model(), d.images, d.labels, cfg, out_dir=tmp_path, evaluate=flaky, quiet=True)
    assert (tmp_path / "abl_state.pt").exists()
    model = d.model(seed=123)  # a different init: everything must come from the state file
    res = run_abl(model, d.images, d.labels, cfg, out_dir=tmp_path, evaluate=d.evaluate, quiet=True, resume=True)
    np.testing.assert_array_equal(res.isolated, ref.isolated)
    assert [(h["stage"], h["epoch"]) for h in res.history] == [(h["stage"], h["epoch"]) for h in ref.history]
    for (k, a), (_, b) in zip(model.state_dict().items(), ref_model.state_dict().items()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), k
    assert res.report["stages"]["unlearning"]["clean_accuracy"] == pytest.approx(
        ref.report["stages"]["unlearning"]["clean_accuracy"], abs=0.01)
    # resuming a finished run changes nothing
    again = run_abl(d.model(seed=7), d.images, d.labels, cfg, out_dir=tmp_path, quiet=True, resume=True)
    assert again.report["stages"] == res.report["stages"]


@pytest.mark.slow
def test_resume_refuses_a_changed_configuration(small_poisoned, tmp_path):
    d = small_poisoned
    cfg = unlearn_cfg(isolation_epochs=1, clean_epochs=0, unlearning_epochs=0, isolation_ratio=0.05, device="cpu",
                    eval_every=0, lr=0.05)
    run_abl(d.model(), d.images, d.labels, cfg, out_dir=tmp_path, quiet=True)
    cfg.gamma = 0.3
    with pytest.raises(ValueError, match="cannot resume"):
        run_abl(d.model(), d.images, d.labels, cfg, out_dir=tmp_path, quiet=True, resume=True)


def test_bf16_and_channels_last_run_on_cpu(small_poisoned):
    d = small_poisoned
    cfg = unlearn_cfg(isolation_epochs=1, clean_epochs=3, unlearning_epochs=1, isolation_ratio=0.05, lr=0.05,
                    batch_size=32, device="cpu", eval_every=0, precision="bf16", memory_format="channels-last")
    model = d.model(width=16)
    res = run_abl(model, d.images, d.labels, cfg, evaluate=d.evaluate, quiet=True)
    losses = [h["loss"] for h in res.history]
    assert all(np.isfinite(losses))
    assert losses[3] < 0.7 * losses[1]  # the clean stage learns under bf16 autocast
    assert res.report["stages"]["clean"]["clean_accuracy"] > 0.3
    assert model.block1[0][0].weight.is_contiguous()  # converted back for saving / export
    with pytest.raises(ValueError):
        run_abl(d.model(), d.images, d.labels, ABLConfig(device="cpu", precision="fp16"), quiet=True)


def test_loss_fn_sees_float32_logits_under_bf16_autocast(small_poisoned):
    from abl_guard.abl.train import train_one_epoch

    d = small_poisoned
    seen = []

    def loss_fn(logits, y):
        seen.append(logits.dtype)
        return F.cross_entropy(logits, y)

    model = d.model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = ArrayBatches(d.images[:128], d.labels[:128], CPU, 64)
    train_one_epoch(model, batches, opt, loss_fn, quiet=True, autocast_dtype=torch.bfloat16, channels_last=True)
    assert seen == [torch.float32, torch.float32]


@pytest.mark.slow
def test_retrain_mode_removes_the_backdoor_and_says_so(poisoned_digits, two_threads):
    """The default mode: isolation stops once the backdoor is learned, the seed grows to the rest of the poison, a
    fresh model trained on what remains no longer has the backdoor, and the verdict says so from its own evidence."""
    d = poisoned_digits
    # tiny digits: 10% poison is about half of label 0, and the conservative posterior adds clean 0s to the removed
    # share, so the plausibility cap is raised from 0.6 (on Fashion-MNIST 10% BadNets removed 45% of the label)
    # a 15% held-out split holds about 25 poisoned copies, enough for the held-out probe to confirm the removal (the
    # default 2% holds 3 here, and the verdict could only say removed-unconfirmed)
    cfg = ABLConfig(isolation_epochs=2, clean_epochs=6, isolation_ratio=0.05, lr=0.05, batch_size=64, device="cpu",
                    eval_every=0, expansion_max_share=0.8, holdout=0.15, expansion_input_separation=0.0)
    res = run_abl(d.model(), d.images, d.labels, cfg, evaluate=d.evaluate, poison_indices=d.poison, quiet=True)
    rep = res.report
    stages = [h["stage"] for h in res.history]
    assert stages.count("clean") == 6 and 1 <= stages.count("isolation") <= 2 and "unlearning" not in stages
    assert rep["isolation"]["precision"] >= 0.9
    exp = rep["expansion"]
    assert exp["expanded"], exp.get("reason")
    assert exp["method"] == "spectral"  # the default
    assert exp["recall"] >= 0.95 and exp["precision"] >= 0.5  # removing clean 0s is cheap
    assert np.isin(res.isolated, res.removed).all() and not np.isin(res.removed, res.holdout).any()
    final = rep["stages"]["unlearning"]  # after the (empty) unlearning stage: the retrained model
    assert final["attack_success_rate"] < 0.2 and final["clean_accuracy"] > 0.9
    assert rep["verdict"]["status"] == "removed" and rep["verdict"]["target"] == 0
    assert rep["unlearning"]["isolated_accuracy_after"] <= 0.2


def test_retrain_on_the_remaining_schedule_trains_as_many_epochs_as_plain_training(small_poisoned):
    """``retrain_epochs="remaining"``: the clean stage is T minus the isolation epochs run, on the scaled lr
    schedule, so that isolation + clean stage = T epochs."""
    d = small_poisoned
    cfg = ABLConfig(isolation_epochs=2, isolation_stop="fixed", clean_epochs=5, lr_milestones=(3,), lr_gamma=0.1,
                    isolation_ratio=0.05, lr=0.05, batch_size=64, device="cpu", eval_every=0,
                    retrain_epochs="remaining", input_scan="last")
    res = run_abl(d.model(width=8), d.images, d.labels, cfg, poison_indices=d.poison, quiet=True)
    clean = [h for h in res.history if h["stage"] == "clean"]
    assert sum(h["stage"] == "isolation" for h in res.history) == 2 and len(clean) == 3
    # milestone 3 of 5 scaled to 3 epochs: round(1.8) = 2
    assert [h["lr"] for h in clean] == pytest.approx([0.05, 0.05, 0.005], rel=1e-9)
    assert res.report["config"]["retrain_epochs"] == "remaining"


def test_retrain_continues_the_isolation_model_when_nothing_is_found(small_poisoned, monkeypatch):
    """``restart="found"`` (the default): when the seed does not expand and no scan finds anything, the clean stage
    continues the isolation model for the rest of the schedule (T epochs in all, the global lr schedule) instead of
    a fresh model's whole schedule; ``restart="always"`` keeps the fresh start."""
    import abl_guard.abl.abl as abl_mod
    from abl_guard.abl.report import summary_lines

    d = small_poisoned
    fresh: list[int] = []
    real = abl_mod.reinitialise
    monkeypatch.setattr(abl_mod, "reinitialise", lambda model, seed: (fresh.append(seed), real(model, seed)))
    base = dict(isolation_epochs=2, isolation_stop="fixed", clean_epochs=4, lr_milestones=(3,), lr_gamma=0.1,
                isolation_ratio=0.05, lr=0.05, batch_size=64, device="cpu", eval_every=0, expansion_separation=50.0,
                expansion_scan_method="spectral", expansion_input_separation=0.0)
    res = run_abl(d.model(width=8), d.images, d.labels, ABLConfig(**base), poison_indices=d.poison, quiet=True)
    assert not res.report["expansion"]["expanded"] and not res.report["expansion"]["scan"]["expanded"]
    clean = [h for h in res.history if h["stage"] == "clean"]
    assert [h["epoch"] for h in clean] == [3, 4]
    assert [h["lr"] for h in clean] == pytest.approx([0.05, 0.005], rel=1e-9)
    assert res.report["clean_stage"] == {"continued": True, "from_epoch": 2} and fresh == []
    assert any("continued the isolation model from epoch 2" in line for line in summary_lines(res.report))
    np.testing.assert_array_equal(res.removed, np.sort(res.isolated))  # the seed is still left out

    res = run_abl(d.model(width=8), d.images, d.labels, ABLConfig(**base, restart="always"), quiet=True)
    assert [h["epoch"] for h in res.history if h["stage"] == "clean"] == [1, 2, 3, 4]
    assert "clean_stage" not in res.report and len(fresh) == 1
    assert not any("continued" in line for line in summary_lines(res.report))


def test_never_restart_continues_the_isolation_model_after_a_find(small_poisoned, monkeypatch):
    """``restart="never"``: even when the seed expanded, the isolation model continues (no re-initialisation, the
    global lr schedule) on the pool minus everything removed; ``"found"`` starts a fresh model for the same find."""
    import abl_guard.abl.abl as abl_mod
    from abl_guard.abl.report import summary_lines

    d = small_poisoned
    real_expand, real_batches = abl_mod.expand_seed, abl_mod.ArrayBatches
    fresh: list[int] = []
    trained_on: dict[int, np.ndarray] = {}

    def batches(images, labels, device, batch_size, *, seed, indices=None, **kw):  # the clean stage's set (seed+1)
        trained_on[seed] = np.asarray(indices)
        return real_batches(images, labels, device, batch_size, seed=seed, indices=indices, **kw)

    monkeypatch.setattr(abl_mod, "expand_seed", lambda *a, **kw: real_expand(*a, **{**kw, "min_separation": 0.0}))
    monkeypatch.setattr(abl_mod, "reinitialise", lambda model, seed: fresh.append(seed))
    monkeypatch.setattr(abl_mod, "ArrayBatches", batches)
    base = dict(isolation_epochs=2, isolation_stop="fixed", clean_epochs=4, lr_milestones=(3,), lr_gamma=0.1,
                isolation_ratio=0.05, lr=0.05, batch_size=64, device="cpu", eval_every=0, expansion_separation=50.0,
                expansion_scan_method="spectral", expansion_input_separation=0.0, residual_unlearning_epochs=0,
                expansion_recheck_epoch=0)  # the pixel recheck's own restart is tested below
    res = run_abl(d.model(width=8), d.images, d.labels, ABLConfig(**base, restart="never"), quiet=True)
    assert res.report["expansion"]["expanded"] and len(res.removed) > len(res.isolated)
    clean = [h for h in res.history if h["stage"] == "clean"]
    assert [h["epoch"] for h in clean] == [3, 4] and fresh == []
    assert [h["lr"] for h in clean] == pytest.approx([0.05, 0.005], rel=1e-9)
    assert res.report["clean_stage"] == {"continued": True, "from_epoch": 2}
    assert not np.isin(trained_on[1], res.removed).any()
    assert len(trained_on[1]) + len(res.removed) == len(trained_on[0])  # the pool (isolation) minus the removed
    assert any("--abl-restart never" in line for line in summary_lines(res.report))

    res = run_abl(d.model(width=8), d.images, d.labels, ABLConfig(**base), quiet=True)
    assert res.report["expansion"]["expanded"] and "clean_stage" not in res.report and len(fresh) == 1
    assert [h["epoch"] for h in res.history if h["stage"] == "clean"] == [1, 2, 3, 4]


def test_capped_expansion_is_refused_without_a_held_out_count_excess(small_poisoned, monkeypatch):
    """``expansion_capped_count_sd``: a capped seed expansion that no scan confirmed is kept only when the held-out
    split holds that many sd more of its label than a clean label's share; refused, only the seed is removed and the
    isolation model continues (3 sd, the default). Off (0): the capped expansion stays the outcome."""
    import abl_guard.abl.abl as abl_mod

    d = small_poisoned
    real_expand = abl_mod.expand_seed

    def capped_expand(*args, **kw):  # every seed expands, marked capped (as a clean sub-type's expansion is)
        e = real_expand(*args, **{**kw, "min_separation": 0.0})
        e.report.update(expanded=True, capped=True)
        return e

    monkeypatch.setattr(abl_mod, "expand_seed", capped_expand)
    base = dict(isolation_epochs=1, isolation_stop="fixed", clean_epochs=2, isolation_ratio=0.05, lr=0.05,
                batch_size=64, device="cpu", eval_every=0, expansion_separation=50.0,
                expansion_scan_method="spectral", expansion_input_separation=0.0)

    def run(excess: float, need: float):
        monkeypatch.setattr(abl_mod, "held_out_excess", lambda counts: (excess, 10.0))
        return run_abl(d.model(width=8), d.images, d.labels, ABLConfig(**base, expansion_capped_count_sd=need),
                       quiet=True)

    refused = run(excess=5.0, need=3.0)  # 0.5 sd: no dirty-label copies in the held-out split
    exp = refused.report["expansion"]
    assert exp["capped_count"] == pytest.approx({"excess": 5.0, "excess_sd": 0.5, "need_sd": 3.0,
                                                 "n_capped_removal": exp["capped_count"]["n_capped_removal"],
                                                 "kept": False})
    assert not exp["expanded"] and "refused by the held-out count" in exp["reason"]
    np.testing.assert_array_equal(refused.removed, np.sort(refused.isolated))  # the seed alone
    assert exp["capped_count"]["n_capped_removal"] > len(refused.removed)
    assert refused.report["clean_stage"]["continued"] is True

    kept = run(excess=40.0, need=3.0)  # 4 sd: kept, and a fresh model
    assert kept.report["expansion"]["capped_count"]["kept"] is True and kept.report["expansion"]["expanded"]
    assert len(kept.removed) > len(kept.isolated) and "clean_stage" not in kept.report

    off = run(excess=5.0, need=0.0)
    assert "capped_count" not in off.report["expansion"] and off.report["expansion"]["expanded"]


def test_retrain_mode_scans_every_label_when_the_seed_does_not_expand(small_poisoned, monkeypatch):
    """The fallback's wiring: an unexpandable seed leads to the label scan; with nothing found the seed alone is
    removed (and the scan is in the report); a scan that finds the poison replaces the seed as removed and probed."""
    import abl_guard.abl.abl as abl_mod
    from abl_guard.abl.expansion import Expansion

    d = small_poisoned
    # no split is ever that clear: the seed never expands, nor does the spectral scan find anything (the contrastive
    # scan's variance-ratio route ignores the separation, and finds this poison: test_contrastive_scan_in_the_pipeline)
    cfg = ABLConfig(isolation_epochs=1, clean_epochs=2, isolation_ratio=0.05, lr=0.05, batch_size=64, device="cpu",
                    eval_every=0, expansion_separation=50.0, expansion_scan_method="spectral",
                    expansion_input_separation=0.0)
    res = run_abl(d.model(), d.images, d.labels, cfg, poison_indices=d.poison, quiet=True)
    exp = res.report["expansion"]
    assert not exp["expanded"] and exp["method"] == "spectral"
    assert not exp["scan"]["expanded"] and len(exp["scan"]["labels"]) == 10
    np.testing.assert_array_equal(res.removed, np.sort(res.isolated))

    seen = {}

    def found_poison(features, labels, pool, **kw):  # a scan that finds exactly the poison of label 0
        seen.update(kw, features=features, pool=pool)
        p = np.intersect1d(d.poison, pool)
        return Expansion(p, 0, p, np.ones(len(p)), np.ones(len(p)),
                         {"method": "spectral-scan", "expanded": True, "target": 0, "n_removed": len(p), "n_seed": 0,
                          "n_expanded": len(p), "mixture": {"weight_seedlike": 0.1, "separation": 3.0}}, p)

    monkeypatch.setattr(abl_mod, "scan_labels", found_poison)
    res = run_abl(d.model(), d.images, d.labels, cfg, poison_indices=d.poison, quiet=True)
    rep = res.report
    p = np.intersect1d(d.poison, np.setdiff1d(np.arange(len(d.labels)), res.holdout))
    assert seen["max_weight"] == cfg.expansion_scan_share and seen["min_separation"] == 50.0
    assert seen["features"].shape[0] == len(d.labels) and np.abs(seen["features"][seen["pool"]]).sum() > 0
    assert rep["expansion"]["method"] == "spectral-scan" and rep["expansion"]["seed"]["expanded"] is False
    assert rep["expansion"]["recall"] == 1.0 and rep["expansion"]["removed_clean"] == 0
    np.testing.assert_array_equal(res.removed, p)
    np.testing.assert_array_equal(res.isolated, p)  # the probes read the scanned population, not the seed
    assert rep["unlearning"]["guard"]["suspected_target"] == 0 and rep["verdict"]["target"] == 0

    # a seed whose expansion was capped (a clean sub-type, as at 1% poison) is also checked by the scan, which wins
    real_expand = abl_mod.expand_seed

    def capped_expand(*args, **kw):
        e = real_expand(*args, **{**kw, "min_separation": 0.0})
        e.report.update(expanded=True, capped=True)
        return e

    monkeypatch.setattr(abl_mod, "expand_seed", capped_expand)
    res = run_abl(d.model(), d.images, d.labels, cfg, poison_indices=d.poison, quiet=True)
    assert res.report["expansion"]["method"] == "spectral-scan"
    assert res.report["expansion"]["seed"]["capped"] is True
    assert any("was capped" in e for e in res.report["verdict"]["evidence"])
    np.testing.assert_array_equal(res.removed, p)
    monkeypatch.setattr(abl_mod, "expand_seed", real_expand)

    cfg.expansion_scan_share = 0.0  # off: the seed's outcome, no scan
    res = run_abl(d.model(), d.images, d.labels, cfg, poison_indices=d.poison, quiet=True)
    assert "scan" not in res.report["expansion"] and res.report["expansion"]["method"] == "spectral"


def test_isolation_extends_until_a_separate_population_is_found(small_poisoned, monkeypatch):
    """Nothing separate by T_te: the isolation model trains on, one epoch at a time, up to isolation_extra_epochs,
    and stops at the first epoch whose seed or label scan finds a population; 0 = off."""
    import abl_guard.abl.abl as abl_mod
    from abl_guard.abl.expansion import Expansion

    d = small_poisoned
    real_scan = abl_mod.scan_labels
    calls = []

    def scan_found_at(k):
        def scan(features, labels, pool, **kw):
            calls.append(1)
            if len(calls) < k:
                return real_scan(features, labels, pool, **{**kw, "min_separation": 50.0})  # nothing yet
            p = np.intersect1d(d.poison, pool)
            return Expansion(p, 0, p, np.ones(len(p)), np.ones(len(p)),
                             {"method": "spectral-scan", "expanded": True, "target": 0, "n_removed": len(p),
                              "n_seed": 0, "n_expanded": len(p), "mixture": {"weight_seedlike": 0.1,
                                                                             "separation": 3.0}}, p)
        return scan

    def isolation_epochs(res):
        return sum(h["stage"] == "isolation" for h in res.history)

    cfg = ABLConfig(isolation_epochs=1, clean_epochs=1, isolation_ratio=0.05, lr=0.05, batch_size=64, device="cpu",
                    eval_every=0, expansion_separation=50.0, isolation_extra_epochs=2, expansion_scan_method="spectral",
                    expansion_input_separation=0.0)
    assert ABLConfig.for_mode("paper").isolation_extra_epochs == 0
    assert ABLConfig.for_mode("unlearn").isolation_extra_epochs == 0

    monkeypatch.setattr(abl_mod, "scan_labels", scan_found_at(2))  # found after the first extra epoch
    res = run_abl(d.model(), d.images, d.labels, cfg, poison_indices=d.poison, quiet=True)
    assert isolation_epochs(res) == 2 and len(calls) == 2
    assert res.report["isolation"]["epoch"] == 2 and res.report["isolation"]["extra_epochs"] == 1
    assert res.report["isolation"]["extension_found"] is True
    assert res.report["expansion"]["method"] == "spectral-scan"
    np.testing.assert_array_equal(res.removed, np.intersect1d(d.poison, res.removed))

    calls.clear()
    monkeypatch.setattr(abl_mod, "scan_labels", scan_found_at(1))  # found at T_te: no extension
    res = run_abl(d.model(), d.images, d.labels, cfg, poison_indices=d.poison, quiet=True)
    assert isolation_epochs(res) == 1 and res.report["isolation"]["extra_epochs"] == 0
    assert res.report["expansion"]["method"] == "spectral-scan"

    calls.clear()
    monkeypatch.setattr(abl_mod, "scan_labels", scan_found_at(99))  # never: every extra epoch, then T_te's outcome
    never = run_abl(d.model(), d.images, d.labels, cfg, poison_indices=d.poison, quiet=True)
    assert isolation_epochs(never) == 3 and never.report["isolation"]["extra_epochs"] == 2 and len(calls) == 3
    assert not never.report["expansion"]["expanded"] and not never.report["expansion"]["scan"]["expanded"]
    assert never.report["isolation"]["extension_found"] is False

    calls.clear()
    cfg.isolation_extra_epochs = 0  # off: T_te as before — and the same outcome the fruitless extension kept
    res = run_abl(d.model(), d.images, d.labels, cfg, poison_indices=d.poison, quiet=True)
    assert isolation_epochs(res) == 1 and len(calls) == 1
    np.testing.assert_array_equal(never.removed, res.removed)
    np.testing.assert_array_equal(never.isolated, res.isolated)


def test_contrastive_scan_in_the_pipeline(small_poisoned, monkeypatch):
    """The default scan on the 600-image BadNets set: the seed never expands (separation 50), and the contrastive
    scan's variance-ratio route finds label 0 and removes poison only. The isolation's one pass over the pool gives
    the losses and the features the seed expansion and the scan read: no second feature pass."""
    import abl_guard.abl.abl as abl_mod

    def no_second_pass(*_a, **_k):
        raise AssertionError("a second feature pass over the pool")

    monkeypatch.setattr(abl_mod, "pooled_features", no_second_pass)
    monkeypatch.setattr(abl_mod, "expansion_features", no_second_pass)
    d = small_poisoned
    cfg = ABLConfig(isolation_epochs=1, clean_epochs=2, isolation_ratio=0.05, lr=0.05, batch_size=64, device="cpu",
                    eval_every=0, expansion_separation=50.0, expansion_input_separation=0.0)
    assert cfg.expansion_scan_method == "contrastive"
    res = run_abl(d.model(), d.images, d.labels, cfg, poison_indices=d.poison, quiet=True)
    exp = res.report["expansion"]
    assert exp["method"] == "spectral-scan" and exp["scan_method"] == "contrastive" and exp["target"] == 0
    assert np.isin(res.removed, d.poison).mean() >= 0.9 and np.isin(d.poison, res.removed).mean() >= 0.8


def test_input_scan_replaces_the_model_based_outcome(small_poisoned, monkeypatch):
    """The default: before the isolation epochs the raw inputs of every label are scanned; the BadNets patch splits
    label 0, so the epochs are skipped and exactly the poison outside the held-out split is removed and probed, the
    (untrained) model-based outcome in the report; with ``input_scan="last"`` the isolation runs first and the same
    poison is removed; an input scan that finds nothing leaves the model-based outcome, with the scan in its
    report."""
    import abl_guard.abl.abl as abl_mod
    from abl_guard.abl.report import summary_lines

    d = small_poisoned
    cfg = ABLConfig(isolation_epochs=1, clean_epochs=2, isolation_ratio=0.05, lr=0.05, batch_size=64, device="cpu",
                    eval_every=0, retrain_epochs="remaining")
    assert cfg.expansion_input_separation == 10.0 and cfg.input_scan == "first"
    res = run_abl(d.model(width=8), d.images, d.labels, cfg, poison_indices=d.poison, quiet=True)
    stages = [h["stage"] for h in res.history]
    assert "isolation" not in stages and stages.count("clean") == 2  # nothing to subtract from the schedule
    assert res.report["isolation"]["skipped"] is True and res.report["isolation"]["epoch"] == 0
    assert res.report["verdict"]["evidence"][0].startswith("isolation skipped")
    assert not any("isolation" in w for w in res.report["warnings"])
    exp = res.report["expansion"]
    assert exp["space"] == "input" and exp["method"] == "spectral-scan" and exp["target"] == 0
    np.testing.assert_array_equal(res.removed, np.setdiff1d(d.poison, res.holdout))
    np.testing.assert_array_equal(res.isolated, res.removed)  # the scan's core is what the final model is probed on
    assert exp["recall"] == 1.0 and exp["removed_clean"] == 0 and "seed" in exp and "labels" not in exp["seed"]
    assert any("raw inputs found a separate population" in e for e in res.report["verdict"]["evidence"])
    assert any("input label scan" in line for line in summary_lines(res.report))
    assert any("isolation: skipped" in line for line in summary_lines(res.report))
    last = run_abl(d.model(width=8), d.images, d.labels, replace(cfg, input_scan="last"), poison_indices=d.poison,
                   quiet=True)
    assert [h["stage"] for h in last.history].count("isolation") >= 1 and not last.report["isolation"]["skipped"]
    np.testing.assert_array_equal(last.removed, res.removed)

    real = abl_mod.scan_inputs
    monkeypatch.setattr(abl_mod, "scan_inputs", lambda *a, **k: real(*a, **{**k, "min_separation": 1e9}))
    res = run_abl(d.model(width=8), d.images, d.labels, cfg, poison_indices=d.poison, quiet=True)
    exp = res.report["expansion"]
    assert "space" not in exp and exp["input_scan"]["expanded"] is False and exp["input_scan"]["space"] == "input"


def test_residual_unlearning_runs_when_the_retrained_model_still_fires(poisoned_digits, monkeypatch, two_threads):
    """Retrain mode: an input scan that removes only half of the BadNets poison leaves the rest to teach the fresh
    model the backdoor again; the held-out probe then fires, so the removed half is unlearned from the retrained
    model (joint, complementary-label ascent, behind the guard), which lowers the attack success, and the verdict says
    so. With ``residual_unlearning_epochs=0`` the retrained model is kept as it is."""
    import abl_guard.abl.abl as abl_mod
    from abl_guard.abl.report import HELD_OUT_FIRING

    real = abl_mod.scan_inputs

    def half_found(*a, **k):  # the real scan's find, every other example dropped
        e = real(*a, **k)
        assert e.report["expanded"]
        e.removed, e.core = e.removed[::2], e.core[::2]
        e.report.update(n_removed=len(e.removed), n_expanded=len(e.removed), estimated_poison=float(len(e.removed)))
        return e

    monkeypatch.setattr(abl_mod, "scan_inputs", half_found)
    d = poisoned_digits
    # a 25% held-out split holds about 36 poisoned copies: enough for the held-out probe to be read on 1,437 images
    # (a 360-example split cannot resolve the default 1-point guard of the residual unlearning: 2 points here)
    cfg = ABLConfig(isolation_epochs=1, clean_epochs=8, isolation_ratio=0.05, lr=0.05, lr_milestones=(6,),
                    batch_size=32, device="cpu", eval_every=0, holdout=0.25, residual_max_ca_drop=0.02)
    assert cfg.residual_unlearning_epochs == 5 and cfg.unlearning_epochs == 0
    assert ABLConfig().residual_max_ca_drop == 0.01
    assert all(ABLConfig.for_mode(m).residual_unlearning_epochs == 0 for m in ("unlearn", "paper"))
    res = run_abl(d.model(), d.images, d.labels, cfg, evaluate=d.evaluate, poison_indices=d.poison, quiet=True)
    rep, un = res.report, res.report["unlearning"]
    trained_on = np.setdiff1d(d.poison, res.holdout)
    assert rep["expansion"]["target"] == 0 and 0.4 <= np.isin(trained_on, res.removed).mean() <= 0.6
    retrained = rep["stages"]["clean"]["attack_success_rate"]
    assert retrained > 0.5  # the half left in place taught the backdoor again
    assert un["residual"]["ran"] is True and un["residual"]["verdict_before"] == "likely-present"
    assert un["residual"]["n_unlearned"] == len(res.removed)
    assert un["epochs_run"] == 5 and [h["stage"] for h in res.history].count("unlearning") == 5
    final = rep["stages"]["unlearning"]
    assert final["attack_success_rate"] < retrained - 0.3 and un["selected_epoch"] >= 1
    # the selection reads the held-out probe (the ascent set itself is no evidence): it falls with the ASR
    probes = [t["held_out_probe"] for t in un["trajectory"]]
    assert probes[un["selected_epoch"] - 1] < HELD_OUT_FIRING <= un["residual"]["held_out_probe_before"]
    assert final["clean_accuracy"] > rep["stages"]["clean"]["clean_accuracy"] - 0.05
    assert any("were unlearned from it" in e for e in rep["verdict"]["evidence"])
    # its own clean-accuracy guard (residual_max_ca_drop, recorded): every epoch past it is rejected
    guard = un["guard"]
    assert guard["max_ca_drop"] == cfg.residual_max_ca_drop
    allowed = cfg.residual_max_ca_drop
    for t in un["trajectory"]:
        too_far = guard["baseline"]["estimated_accuracy"] - t["guard_estimated_accuracy"] > allowed or \
            guard["baseline"]["nontarget_accuracy"] - t["guard_nontarget_accuracy"] > allowed
        assert bool(t["guard_rejected"]) == too_far
    # at 0 every epoch that loses any estimated accuracy is rejected (the wiring, not the run, is under test)
    from abl_guard.abl.unlearning import _guard_reasons
    assert _guard_reasons(guard, {"nontarget_accuracy": guard["baseline"]["nontarget_accuracy"],
                                  "estimated_accuracy": guard["baseline"]["estimated_accuracy"] - 0.005}, 0.0)

    off = run_abl(d.model(), d.images, d.labels, replace(cfg, residual_unlearning_epochs=0), evaluate=d.evaluate,
                  poison_indices=d.poison, quiet=True)
    assert "residual" not in off.report["unlearning"] and off.report["unlearning"]["epochs_run"] == 0
    assert off.report["verdict"]["status"] == "likely-present"
    assert off.report["stages"]["unlearning"]["attack_success_rate"] == pytest.approx(retrained, abs=1e-9)


def test_capped_expansion_is_kept_when_the_held_out_count_says_the_scan_took_too_little(poisoned_digits, monkeypatch):
    """A capped seed expansion replaced by a scan's find in the same label: when the held-out split holds more of the
    label than the find's poison estimate by 3 sd or more (a third of the poison found here), both are removed;
    when the find explains the count (all of the poison), the scan's find alone is."""
    import abl_guard.abl.abl as abl_mod
    from abl_guard.abl.expansion import Expansion

    d = poisoned_digits
    real_expand = abl_mod.expand_seed
    seen: dict[str, np.ndarray] = {}

    def capped_expand(*args, **kw):
        e = real_expand(*args, **{**kw, "min_separation": 0.0})
        e.report.update(expanded=True, capped=True)
        seen["seed"] = e.removed
        return e

    def found(share):
        def scan(features, labels, pool, **kw):
            p = np.intersect1d(d.poison, pool)
            p = p[: int(len(p) * share)]
            return Expansion(p, 0, p, np.ones(len(p)), np.ones(len(p)),
                             {"method": "spectral-scan", "expanded": True, "target": 0, "n_removed": len(p),
                              "n_seed": 0, "n_expanded": len(p), "estimated_poison": float(len(p)),
                              "mixture": {"weight_seedlike": 0.1, "separation": 3.0}}, p)
        return scan

    monkeypatch.setattr(abl_mod, "expand_seed", capped_expand)
    monkeypatch.setattr(abl_mod, "scan_labels", found(1 / 3))
    # a 25% held-out split: about 36 poisoned copies, a class's count sd about 5.4
    cfg = ABLConfig(isolation_epochs=1, isolation_stop="fixed", clean_epochs=1, isolation_ratio=0.05, lr=0.05,
                    batch_size=64, device="cpu", eval_every=0, holdout=0.25, expansion_input_separation=0.0,
                    residual_unlearning_epochs=0)
    res = run_abl(d.model(width=8), d.images, d.labels, cfg, poison_indices=d.poison, quiet=True)
    exp = res.report["expansion"]
    third = np.intersect1d(d.poison, np.setdiff1d(np.arange(len(d.labels)), res.holdout))
    third = third[: len(third) // 3]
    assert exp["method"] == "spectral-scan" and exp["union_with_seed"]["short_sd"] >= 3.0
    np.testing.assert_array_equal(res.removed, np.union1d(third, seen["seed"]))
    assert any("capped expansion removed" in e for e in res.report["verdict"]["evidence"])

    off = run_abl(d.model(width=8), d.images, d.labels, replace(cfg, expansion_union_sd=0.0), poison_indices=d.poison,
                  quiet=True)
    assert "union_with_seed" not in off.report["expansion"]
    np.testing.assert_array_equal(off.removed, third)

    monkeypatch.setattr(abl_mod, "scan_labels", found(1.0))
    res = run_abl(d.model(width=8), d.images, d.labels, cfg, poison_indices=d.poison, quiet=True)
    assert "union_with_seed" not in res.report["expansion"]
    np.testing.assert_array_equal(res.removed, np.intersect1d(d.poison, np.setdiff1d(np.arange(len(d.labels)),
                                                                                     res.holdout)))


def test_off_label_scan_acts_when_nothing_else_is_found(small_poisoned, monkeypatch):
    """The off-label scan's wiring: when neither the seed nor the label scan finds anything it reads the same pass's
    class probabilities, and its find stops the isolation at that check (epoch 1 of 2), replaces the outcome (the
    seed's in its report), is what a fresh model is trained without and what the final model is probed on; with
    nothing found it goes in the report; 0 turns it off."""
    import abl_guard.abl.abl as abl_mod
    from abl_guard.abl.expansion import Expansion
    from abl_guard.abl.report import summary_lines

    d = small_poisoned
    fresh: list[int] = []
    real_init = abl_mod.reinitialise
    monkeypatch.setattr(abl_mod, "reinitialise", lambda model, seed: (fresh.append(seed), real_init(model, seed)))
    cfg = ABLConfig(isolation_epochs=2, clean_epochs=2, isolation_ratio=0.05, lr=0.05, batch_size=64, device="cpu",
                    eval_every=0, expansion_separation=50.0, expansion_scan_method="spectral",
                    expansion_input_separation=0.0)
    assert cfg.expansion_off_label_ratio == 4.0
    res = run_abl(d.model(width=8), d.images, d.labels, cfg, poison_indices=d.poison, quiet=True)
    exp = res.report["expansion"]
    assert not exp["expanded"] and exp["off_label_scan"]["expanded"] is False  # tiny data: nothing to find
    assert exp["off_label_scan"]["space"] == "predictions" and res.report["isolation"]["epoch"] == 2

    seen: dict = {}

    def found_poison(probs, labels, pool, **kw):  # a scan that finds exactly label 0's poison
        seen.update(kw, probs=probs, pool=pool)
        p = np.intersect1d(d.poison, pool)
        return Expansion(p, 0, p, np.ones(len(p)), np.ones(len(p)),
                         {"method": "spectral-scan", "space": "predictions", "expanded": True, "capped": False,
                          "target": 0, "n_removed": len(p), "n_seed": 0, "n_expanded": len(p), "target_floor": 12,
                          "runner_up_floor": 0, "estimated_poison": float(len(p))}, p)

    monkeypatch.setattr(abl_mod, "scan_off_label", found_poison)
    fresh.clear()
    res = run_abl(d.model(width=8), d.images, d.labels, cfg, poison_indices=d.poison, quiet=True)
    rep = res.report
    p = np.intersect1d(d.poison, np.setdiff1d(np.arange(len(d.labels)), res.holdout))
    assert seen["min_ratio"] == 4.0 and seen["max_share"] == cfg.expansion_max_share
    assert seen["probs"].shape == (len(seen["pool"]), 10)
    np.testing.assert_allclose(seen["probs"].sum(1), 1.0, atol=1e-9)
    assert rep["isolation"]["epoch"] == 1 and rep["isolation"]["stopped_early"]  # found at the first check
    assert rep["expansion"]["space"] == "predictions" and rep["expansion"]["seed"]["expanded"] is False
    assert rep["expansion"]["recall"] == 1.0 and rep["expansion"]["removed_clean"] == 0
    assert rep["expansion"]["core_precision"] == 1.0
    np.testing.assert_array_equal(res.removed, p)
    np.testing.assert_array_equal(res.isolated, p)  # the probes read the scan's core
    assert len(fresh) == 1 and "clean_stage" not in rep  # a find: a fresh model
    assert rep["verdict"]["target"] == 0
    assert any("confidently predicted as every other class" in e for e in rep["verdict"]["evidence"])
    assert any("off-label scan: floor 12" in line for line in summary_lines(rep))

    seen.clear()
    res = run_abl(d.model(width=8), d.images, d.labels, replace(cfg, expansion_off_label_ratio=0.0), quiet=True)
    assert not seen and "off_label_scan" not in res.report["expansion"]


def _half_found_and_epochs_recorded(monkeypatch: pytest.MonkeyPatch, half: np.ndarray) -> list[set[int]]:
    """The recheck tests' setting: the isolation's off-label scan finds ``half`` the poison (label 0), and every
    training epoch's example indices are recorded in the returned list."""
    import abl_guard.abl.abl as abl_mod
    from abl_guard.abl.expansion import Expansion

    def isolation_find(probs, labels, pool, **kw):
        p = np.intersect1d(half, pool)
        return Expansion(p, 0, p, np.ones(len(p)), np.ones(len(p)),
                         {"method": "spectral-scan", "space": "predictions", "expanded": True, "capped": False,
                          "target": 0, "n_removed": len(p), "n_seed": 0, "n_expanded": len(p), "target_floor": 12,
                          "runner_up_floor": 0, "estimated_poison": float(len(p))}, p)

    trained: list[set[int]] = []
    real_epoch = abl_mod.train_one_epoch

    def epoch(model, batches, *a, **kw):
        trained.append(set(batches.indices.tolist()))
        return real_epoch(model, batches, *a, **kw)

    monkeypatch.setattr(abl_mod, "train_one_epoch", epoch)
    monkeypatch.setattr(abl_mod, "scan_off_label", isolation_find)
    return trained


def test_clean_stage_recheck_removes_the_poison_the_removal_missed(small_poisoned, monkeypatch):
    """The clean stage's recheck: after the fresh model's first epoch its class probabilities for the removed label's
    remaining examples go to :func:`below_own_threshold`, whose examples are removed from the next epoch on (run.removed
    and the batches), with the counts in ``report["recheck"]``; 0 turns it off, and a continued isolation model
    (nothing found) is not rechecked."""
    import abl_guard.abl.abl as abl_mod
    from abl_guard.abl.expansion import Expansion

    d = small_poisoned
    half = d.poison[: len(d.poison) // 2]

    seen: list = []
    real_rule = abl_mod.below_own_threshold

    def rule(probs, labels, pool, target, scale=1.0, min_mean=0.0):  # the real rule's report, the rest of the poison
        seen.append((probs, np.asarray(pool), target))
        _, rep = real_rule(probs, labels, pool, target, scale, min_mean)
        return np.intersect1d(d.poison, pool), rep

    trained = _half_found_and_epochs_recorded(monkeypatch, half)
    monkeypatch.setattr(abl_mod, "below_own_threshold", rule)
    cfg = ABLConfig(isolation_epochs=2, clean_epochs=3, isolation_ratio=0.05, lr=0.05, batch_size=64, device="cpu",
                    eval_every=0, expansion_separation=50.0, expansion_scan_method="spectral",
                    expansion_input_separation=0.0, expansion_recheck_epoch=1, expansion_recheck_method="confidence")
    # on by default since 2026-12-05, with the pixel rule (docs/abl.md#pixel-space-recheck)
    assert (ABLConfig().expansion_recheck_epoch, ABLConfig().expansion_recheck_method) == (1, "pixel-restart")
    res = run_abl(d.model(width=8), d.images, d.labels, cfg, poison_indices=d.poison, quiet=True)
    pool = np.setdiff1d(np.arange(len(d.labels)), res.holdout)
    rest_half = np.setdiff1d(pool, half)
    rec = res.report["recheck"]
    assert len(seen) == 1 and seen[0][2] == 0
    np.testing.assert_array_equal(seen[0][1], rest_half[d.labels[rest_half] == 0])  # what the model trains on
    assert seen[0][0].shape == (len(seen[0][1]), 10)
    np.testing.assert_allclose(seen[0][0].sum(1), 1.0, atol=1e-9)
    missed = len(np.intersect1d(d.poison, pool)) - len(np.intersect1d(half, pool))
    assert rec["epoch"] == 1 and rec["target"] == 0 and rec["n_target_label"] == len(seen[0][1])
    assert rec["n_poison_in_rest"] == missed and rec["removed_poison"] == missed and rec["removed_clean"] == 0
    np.testing.assert_array_equal(res.removed, np.intersect1d(d.poison, pool))
    assert trained[-3:] == [set(rest_half.tolist())] + [set(np.setdiff1d(pool, d.poison).tolist())] * 2

    seen.clear()
    res = run_abl(d.model(width=8), d.images, d.labels, replace(cfg, expansion_recheck_epoch=0), quiet=True)
    assert not seen and "recheck" not in res.report

    monkeypatch.setattr(abl_mod, "scan_off_label", lambda probs, labels, pool, **kw: Expansion(
        np.zeros(0, np.int64), -1, np.zeros(0, np.int64), np.zeros(0), np.zeros(0),
        {"expanded": False, "n_seed": 0, "reason": "none"}))
    res = run_abl(d.model(width=8), d.images, d.labels, cfg, quiet=True)
    assert res.report["clean_stage"]["continued"] and "recheck" not in res.report and not seen


def test_clean_stage_recheck_passes_take_what_the_earlier_ones_left(small_poisoned, monkeypatch):
    """``expansion_recheck_passes`` = 2: a pass after clean epochs 1 and 2, each on what the model still trains on,
    with the skip threshold passed to the rule; ``report["recheck"]`` sums the passes and lists them, and the verdict's
    evidence names each."""
    import abl_guard.abl.abl as abl_mod

    d = small_poisoned
    half = d.poison[: len(d.poison) // 2]

    seen: list = []
    real_rule = abl_mod.below_own_threshold

    def rule(probs, labels, pool, target, scale=1.0, min_mean=0.0):  # each pass takes half of the poison left
        seen.append((np.asarray(pool), scale, min_mean))
        _, rep = real_rule(probs, labels, pool, target, scale, 0.0)
        left = np.intersect1d(d.poison, pool)
        take = left[: (len(left) + 1) // 2] if len(seen) == 1 else left
        return take, {**rep, "n_removed": len(take)}

    trained = _half_found_and_epochs_recorded(monkeypatch, half)
    monkeypatch.setattr(abl_mod, "below_own_threshold", rule)
    cfg = ABLConfig(isolation_epochs=2, clean_epochs=4, isolation_ratio=0.05, lr=0.05, batch_size=64, device="cpu",
                    eval_every=0, expansion_separation=50.0, expansion_scan_method="spectral",
                    expansion_input_separation=0.0, expansion_recheck_epoch=1, expansion_recheck_passes=2,
                    expansion_recheck_scale=0.5, expansion_recheck_min_mean=0.3, expansion_recheck_method="confidence")
    assert ABLConfig().expansion_recheck_passes == 1 and ABLConfig().expansion_recheck_min_mean == 0.5
    res = run_abl(d.model(width=8), d.images, d.labels, cfg, poison_indices=d.poison, quiet=True)
    pool = np.setdiff1d(np.arange(len(d.labels)), res.holdout)
    rest = np.setdiff1d(pool, half)
    missed = np.intersect1d(d.poison, rest)
    first = missed[: (len(missed) + 1) // 2]
    assert [(s, m) for _, s, m in seen] == [(0.5, 0.3), (0.5, 0.3)]
    np.testing.assert_array_equal(seen[0][0], rest[d.labels[rest] == 0])
    after = np.setdiff1d(rest, first)
    np.testing.assert_array_equal(seen[1][0], after[d.labels[after] == 0])
    clean = set(np.setdiff1d(pool, d.poison).tolist())
    assert trained[-4:] == [set(rest.tolist()), set(after.tolist()), clean, clean]
    rec = res.report["recheck"]
    assert [p["epoch"] for p in rec["passes"]] == [1, 2] and rec["epoch"] == 1
    assert [p["removed_poison"] for p in rec["passes"]] == [len(first), len(missed) - len(first)]
    assert rec["removed_poison"] == rec["n_poison_in_rest"] == len(missed) and rec["removed_clean"] == 0
    assert rec["n_removed"] == len(missed) and rec["scale"] == 0.5
    ev = [e for e in res.report["verdict"]["evidence"] if "clean-stage recheck" in e]
    assert len(ev) == 1 and "after epoch 1: " in ev[0] and "after epoch 2: " in ev[0]


def test_pixel_recheck_removes_the_missed_poison_from_the_next_epoch_on(small_poisoned, monkeypatch):
    """``expansion_recheck_method="pixel"``: after the fresh model's first clean epoch, the fresh model's
    probabilities for the removal choose the positives of a pixel-space CNN, whose flags among the label's remaining
    examples (most of the BadNets poison the removal missed) are removed from the next epoch on; the report says what
    it trained on and the verdict's evidence names it."""
    import abl_guard.abl.abl as abl_mod

    d = small_poisoned
    half = d.poison[: len(d.poison) // 2]
    seen: list = []
    real = abl_mod.pixel_recheck

    def spy(images, labels, removed, rest, target, p_target, seed, device="cpu", epochs=8):
        seen.append((np.asarray(removed).copy(), np.asarray(rest).copy(), target, np.asarray(p_target)))
        return real(images, labels, removed, rest, target, p_target, seed, device, epochs)

    trained = _half_found_and_epochs_recorded(monkeypatch, half)
    monkeypatch.setattr(abl_mod, "pixel_recheck", spy)
    cfg = ABLConfig(isolation_epochs=2, clean_epochs=3, isolation_ratio=0.05, lr=0.05, batch_size=64, device="cpu",
                    eval_every=0, expansion_separation=50.0, expansion_scan_method="spectral",
                    expansion_input_separation=0.0, expansion_recheck_epoch=1, expansion_recheck_method="pixel",
                    expansion_recheck_passes=2)  # one pass whatever passes says
    res = run_abl(d.model(width=8), d.images, d.labels, cfg, poison_indices=d.poison, quiet=True)
    pool = np.setdiff1d(np.arange(len(d.labels)), res.holdout)
    rest = np.setdiff1d(pool, half)
    missed = np.intersect1d(d.poison, rest)
    assert len(seen) == 1 and seen[0][2] == 0
    np.testing.assert_array_equal(seen[0][0], np.intersect1d(half, pool))
    np.testing.assert_array_equal(seen[0][1], rest)
    assert seen[0][3].shape == (len(seen[0][0]),) and ((seen[0][3] >= 0) & (seen[0][3] <= 1)).all()
    rec = res.report["recheck"]
    assert rec["method"] == "pixel" and rec["epoch"] == 1 and rec["positives"] > 0
    assert rec["n_poison_in_rest"] == len(missed) and rec["removed_poison"] >= 0.8 * len(missed)
    assert rec["removed_clean"] <= 3
    flagged = np.setdiff1d(res.removed, np.intersect1d(half, pool))
    assert len(flagged) == rec["n_removed"] and set(flagged) <= set(rest[d.labels[rest] == 0])
    assert trained[-3:] == [set(rest.tolist())] + [set(np.setdiff1d(rest, flagged).tolist())] * 2
    ev = [e for e in res.report["verdict"]["evidence"] if "pixel-space recheck" in e]
    assert len(ev) == 1 and f"removed {rec['n_removed']} more of label 0" in ev[0]


def test_pixel_restart_recheck_trains_a_whole_schedule_again_without_the_flags(small_poisoned, monkeypatch):
    """``pixel-restart``: when the pixel recheck flagged examples after clean epoch 1, the model is reinitialised
    (the seed's fresh weights), the optimiser's state cleared, and the clean stage runs all its epochs again without
    them; the recheck is not repeated and the report and the evidence say it restarted. A flag-free recheck does not
    restart."""
    import abl_guard.abl.abl as abl_mod

    d = small_poisoned
    half = d.poison[: len(d.poison) // 2]
    fresh_starts: list[int] = []
    real_reinit = abl_mod.reinitialise
    monkeypatch.setattr(abl_mod, "reinitialise", lambda m, seed: (fresh_starts.append(seed), real_reinit(m, seed)))
    trained = _half_found_and_epochs_recorded(monkeypatch, half)
    cfg = ABLConfig(isolation_epochs=2, clean_epochs=3, isolation_ratio=0.05, lr=0.05, batch_size=64, device="cpu",
                    eval_every=0, expansion_separation=50.0, expansion_scan_method="spectral",
                    expansion_input_separation=0.0, expansion_recheck_epoch=1, expansion_recheck_method="pixel-restart")
    res = run_abl(d.model(width=8), d.images, d.labels, cfg, poison_indices=d.poison, quiet=True)
    pool = np.setdiff1d(np.arange(len(d.labels)), res.holdout)
    rest = np.setdiff1d(pool, half)
    rec = res.report["recheck"]
    assert rec["restarted"] and rec["n_removed"] > 0 and len(rec["passes"]) == 1
    flagged = np.setdiff1d(res.removed, np.intersect1d(half, pool))
    assert len(flagged) == rec["n_removed"]
    assert trained[-4:] == [set(rest.tolist())] + [set(np.setdiff1d(rest, flagged).tolist())] * 3
    assert fresh_starts == [cfg.seed, cfg.seed]  # the clean stage's fresh model, and its restart
    clean = [h["epoch"] for h in res.history if h["stage"] == "clean"]
    assert clean == [1, 1, 2, 3]
    assert any("started again from fresh weights" in e for e in res.report["verdict"]["evidence"])

    fresh_starts.clear()
    monkeypatch.setattr(abl_mod, "pixel_recheck", lambda *a, **k: (np.zeros(0, np.int64), {
        "method": "pixel", "target": 0, "n_target_label": 1, "n_removed": 0, "positives": 20}))
    res = run_abl(d.model(width=8), d.images, d.labels, cfg, quiet=True)
    assert fresh_starts == [cfg.seed] and "restarted" not in res.report["recheck"]
    assert [h["epoch"] for h in res.history if h["stage"] == "clean"] == [1, 2, 3]


def test_clean_stage_recheck_does_not_run_after_an_input_scan_find(small_poisoned, monkeypatch):
    """The input scan's find (the BadNets patch) was whole in every stored run, so the recheck, though asked for, is
    not run: the fresh model is not queried, nothing beyond the scan's find is removed, and the report and the
    verdict's evidence say why."""
    import abl_guard.abl.abl as abl_mod

    d = small_poisoned
    called: list = []
    monkeypatch.setattr(abl_mod, "below_own_threshold", lambda *a, **k: called.append(a))
    cfg = ABLConfig(isolation_epochs=1, clean_epochs=2, isolation_ratio=0.05, lr=0.05, batch_size=64, device="cpu",
                    eval_every=0, retrain_epochs="remaining", expansion_recheck_epoch=1)
    res = run_abl(d.model(width=8), d.images, d.labels, cfg, poison_indices=d.poison, quiet=True)
    assert res.report["expansion"]["space"] == "input" and not called
    np.testing.assert_array_equal(res.removed, np.setdiff1d(d.poison, res.holdout))
    assert res.report["recheck"] == {"target": 0, "n_removed": 0, "passes": [], "not_run": "input-scan"}
    assert any("the clean-stage recheck did not run: the input scan found the population" in e
               for e in res.report["verdict"]["evidence"])
    assert not any("--abl-expansion-recheck-epoch 1" in e for e in res.report["verdict"]["evidence"])


def test_clean_stage_recheck_is_recorded_as_not_run_under_torchrun(small_poisoned, monkeypatch):
    """The recheck reads the whole training set in one process: under torchrun it is not run, and the report and
    the verdict's evidence say so instead of leaving no trace of a configured step."""
    import abl_guard.abl.abl as abl_mod

    d = small_poisoned
    half = d.poison[: len(d.poison) // 2]
    called: list = []
    monkeypatch.setattr(abl_mod, "pixel_recheck", lambda *a, **k: called.append(a))
    _half_found_and_epochs_recorded(monkeypatch, half)
    real = abl_mod.distributed.current
    # torchrun as the recheck sees it; the rest of the run stays one process
    monkeypatch.setattr(abl_mod.distributed, "current",
                        lambda: object() if sys._getframe(1).f_code.co_name == "_recheck" else real())
    cfg = ABLConfig(isolation_epochs=2, clean_epochs=2, isolation_ratio=0.05, lr=0.05, batch_size=64, device="cpu",
                    eval_every=0, expansion_separation=50.0, expansion_scan_method="spectral",
                    expansion_input_separation=0.0, expansion_recheck_epoch=1, expansion_recheck_method="pixel-restart")
    res = run_abl(d.model(width=8), d.images, d.labels, cfg, poison_indices=d.poison, quiet=True)
    assert not called
    assert res.report["recheck"] == {"target": 0, "n_removed": 0, "passes": [], "not_run": "distributed"}
    assert any("this run was distributed (torchrun)" in e for e in res.report["verdict"]["evidence"])


def test_pixel_recheck_count_top_up_removes_what_it_returns_and_says_so(small_poisoned, monkeypatch):
    """The count top-up's wiring in the clean stage: after the pixel flags, :func:`count_top_up` gets the label's
    remaining examples (those not flagged) with the fresh model's probabilities of the label and the configured sd;
    what it returns is removed too, counted against the ground truth, named in the evidence, and the clean stage
    restarts without it. 0 turns it off."""
    import abl_guard.abl.abl as abl_mod

    d = small_poisoned
    half = d.poison[: len(d.poison) // 2]
    _half_found_and_epochs_recorded(monkeypatch, half)
    monkeypatch.setattr(abl_mod, "pixel_recheck", lambda *a, **k: (np.zeros(0, np.int64), {
        "method": "pixel", "target": 0, "n_target_label": 1, "n_removed": 0, "positives": 20, "quantile": 0.98}))
    calls: list = []

    def top_up(labels, rest, target, in_target, p_target, min_sd):
        calls.append((np.asarray(rest).copy(), target, np.asarray(in_target).copy(), np.asarray(p_target), min_sd))
        take = np.intersect1d(d.poison, in_target)  # the copies the removal left
        return take, {"min_sd": min_sd, "excess": 40.0, "sd": 8.0, "balanced": True, "n_removed": len(take)}

    monkeypatch.setattr(abl_mod, "count_top_up", top_up)
    cfg = ABLConfig(isolation_epochs=2, clean_epochs=2, isolation_ratio=0.05, lr=0.05, batch_size=64, device="cpu",
                    eval_every=0, expansion_separation=50.0, expansion_scan_method="spectral",
                    expansion_input_separation=0.0, expansion_recheck_count_sd=3.0)  # pixel-restart, the default
    assert ABLConfig().expansion_recheck_count_sd == 0.0  # opt-in
    res = run_abl(d.model(width=8), d.images, d.labels, cfg, poison_indices=d.poison, quiet=True)
    pool = np.setdiff1d(np.arange(len(d.labels)), res.holdout)
    rest = np.setdiff1d(pool, half)
    missed = np.intersect1d(d.poison, rest)
    assert len(calls) == 1 and calls[0][1] == 0 and calls[0][4] == 3.0
    np.testing.assert_array_equal(calls[0][0], rest)
    np.testing.assert_array_equal(calls[0][2], rest[d.labels[rest] == 0])
    assert calls[0][3].shape == calls[0][2].shape and ((calls[0][3] >= 0) & (calls[0][3] <= 1)).all()
    rec = res.report["recheck"]
    assert rec["n_removed"] == len(missed) and rec["count_top_up"]["removed_poison"] == len(missed)
    assert rec["restarted"] and set(missed) <= set(res.removed)
    assert any("the recheck's count top-up" in e and f"its {len(missed)} examples" in e
               for e in res.report["verdict"]["evidence"])
    calls.clear()
    res = run_abl(d.model(width=8), d.images, d.labels, replace(cfg, expansion_recheck_count_sd=0.0), quiet=True)
    assert not calls and "count_top_up" not in res.report["recheck"]
