"""The ABL report helpers after the split: AUROC through scikit-learn keeps the old degenerate-case behaviour."""

from __future__ import annotations

import numpy as np
import pytest

from abl_guard.abl.abl import rank_auroc
from abl_guard.abl.report import rank_auroc as report_rank_auroc


def test_rank_auroc_is_reexported_from_the_driver():
    assert rank_auroc is report_rank_auroc


def test_rank_auroc_orders_infinities_and_nan_like_the_mann_whitney_ranks():
    pos = np.array([True, True, False, False])
    assert rank_auroc(np.array([np.inf, 5.0, 1.0, -np.inf]), pos) == 1.0
    assert rank_auroc(np.array([-np.inf, 0.0, 1.0, 2.0]), pos) == 0.0
    # NaN ranks last (above every number), ties count half
    assert rank_auroc(np.array([np.nan, 1.0, 1.0, 0.0]), pos) == pytest.approx(0.875, abs=1e-12)


def test_rank_auroc_is_nan_with_a_single_class():
    assert np.isnan(rank_auroc(np.arange(4.0), np.ones(4, bool)))
    assert np.isnan(rank_auroc(np.arange(4.0), np.zeros(4, bool)))


def _report(share: float, probe: float | None, expanded: bool = True) -> dict:
    iso = {"isolated_majority_fraction": share, "isolated_majority_label": 3, "epoch": 2, "n_candidates": 100,
           "n_isolated": 95, "n_pool": 9000, "loss_gap_log10": 2.0}
    exp = {"expanded": expanded, "method": "spectral", "n_seed": 40, "n_removed": 400, "target": 3,
           "n_target_label": 900, "estimated_poison": 380.0, "mixture": {"separation": 5.0},
           "reason": "no second population"}
    un = {} if probe is None else {"isolated_accuracy_after": probe}
    return {"isolation": iso, "expansion": exp, "unlearning": un}


@pytest.mark.parametrize("share, probe, expanded, status", [
    # no held-out split recorded: the seed probe alone cannot confirm a removal
    (0.95, 0.05, True, "removed-unconfirmed"), (0.95, 0.9, True, "likely-present"),
    (0.95, None, True, "likely-present"),
    # a diffuse lowest fraction whose seed still split its label into two populations: a backdoor was seen
    (0.4, 0.05, True, "removed-unconfirmed"),
    (0.4, 0.05, False, "not-found")])
def test_verdict_from_the_runs_own_evidence(share, probe, expanded, status):
    from abl_guard.abl.config import ABLConfig
    from abl_guard.abl.report import summary_lines, verdict

    rep = _report(share, probe, expanded)
    v = verdict(rep, ABLConfig())
    assert v["status"] == status and v["target"] == 3
    assert any(("grew to 400" if expanded else "not expanded") in e for e in v["evidence"])
    rep["verdict"] = v
    assert any(f"backdoor {status}" in line for line in summary_lines(rep))
    assert any("expansion (spectral): removed 400" in line for line in summary_lines(rep))


def test_verdict_says_when_the_seed_was_not_expanded():
    from abl_guard.abl.config import ABLConfig
    from abl_guard.abl.report import verdict

    v = verdict(_report(0.95, 0.9, expanded=False), ABLConfig())
    assert any("not expanded: no second population" in e for e in v["evidence"])


def test_held_out_probe_reads_whether_the_held_out_poison_still_fires():
    from abl_guard.abl.report import held_out_probe

    # 1,200 held out, 21% labelled target (10% poison on top of a 9% class share)
    guard = {"n_holdout": 1200, "n_nontarget": 948, "target_prior": 0.09}
    assert held_out_probe({**guard, "final": {"target_rate": 0.09}}) == pytest.approx(0.0, abs=1e-9)
    assert held_out_probe({**guard, "final": {"target_rate": 0.21}}) == pytest.approx(1.0, abs=1e-9)
    assert held_out_probe({**guard, "final": {"target_rate": 0.15}}) == pytest.approx(0.5, abs=1e-9)
    # no excess of the target label (a wrong suspected target, or no poison held out): cannot tell
    assert held_out_probe({"n_holdout": 1200, "n_nontarget": 1092, "target_prior": 0.09,
                           "final": {"target_rate": 0.3}}) is None
    assert held_out_probe({}) is None
    # clean data: 135 of 1,200 held out carry a label whose share is 9.75% (117 expected, sd 10): noise, not poison
    assert held_out_probe({"n_holdout": 1200, "n_nontarget": 1065, "target_prior": 0.0975,
                           "final": {"target_rate": 0.1117}}) is None


def test_verdict_trusts_the_held_out_probe_over_the_seed_probe():
    from abl_guard.abl.config import ABLConfig
    from abl_guard.abl.report import verdict

    rep = _report(0.95, 0.05)  # the seed probe alone would say removed
    rep["unlearning"]["guard"] = {"n_holdout": 1200, "n_nontarget": 948, "target_prior": 0.09,
                                  "final": {"target_rate": 0.2}}
    v = verdict(rep, ABLConfig())
    assert v["status"] == "likely-present" and any("held-out probe 0.92" in e for e in v["evidence"])
    rep["unlearning"]["guard"]["final"] = {"target_rate": 0.095}
    assert verdict(rep, ABLConfig())["status"] == "removed"
    # a partial removal (WaNet 5%, ASR 21%: probe 0.42) fires; the removals stored read 0.28 at most
    rep["unlearning"]["guard"]["final"] = {"target_rate": 0.09 + 0.42 * 0.12}
    assert verdict(rep, ABLConfig())["status"] == "likely-present"
    rep["unlearning"]["guard"]["final"] = {"target_rate": 0.09 + 0.28 * 0.12}
    assert verdict(rep, ABLConfig())["status"] == "removed"
    low = _report(0.5, 1.0)  # not concentrated, yet the held-out poison fires
    low["unlearning"]["guard"] = {**rep["unlearning"]["guard"], "final": {"target_rate": 0.2}}
    assert verdict(low, ABLConfig())["status"] == "likely-present"


def test_a_firing_or_removed_verdict_points_to_the_recheck_and_a_recheck_is_evidence():
    from abl_guard.abl.config import ABLConfig
    from abl_guard.abl.report import verdict

    rep = _report(0.95, 0.05)
    rep["unlearning"]["guard"] = {"n_holdout": 1200, "n_nontarget": 948, "target_prior": 0.09,
                                  "final": {"target_rate": 0.2}}
    hint = "--abl-expansion-recheck-epoch 1"
    off = ABLConfig(expansion_recheck_epoch=0)  # the recheck is on by default: the hint is for a run that turned it off
    assert off.retrain and any(hint in e for e in verdict(rep, off)["evidence"])
    assert not any(hint in e for e in verdict(rep, ABLConfig())["evidence"])
    assert not any(hint in e for e in verdict(rep, ABLConfig.for_mode("paper"))["evidence"])
    rep["unlearning"]["guard"]["final"] = {"target_rate": 0.095}  # removed: a partial removal reads the same
    caveat = "a removal that missed part of the poison reads the same on both probes"
    ev = verdict(rep, off)["evidence"]
    assert verdict(rep, off)["status"] == "removed"
    assert any(caveat in e for e in ev) and any(hint in e for e in ev)
    ev = verdict(rep, ABLConfig())["evidence"]  # the caveat stays, the hint goes
    assert any(caveat in e for e in ev) and not any(hint in e for e in ev)
    ev = verdict(rep, ABLConfig.for_mode("paper"))["evidence"]  # measured in retrain mode only
    assert not any(caveat in e for e in ev) and not any(hint in e for e in ev)
    scanned = {**rep, "expansion": {**rep.get("expansion", {}), "method": "spectral-scan", "space": "input",
                                    "expanded": True, "target": 0,
                                    "mixture": {"weight_seedlike": 0.5, "separation": 286.0}}}
    ev = verdict(scanned, ABLConfig())["evidence"]  # an input-scan find: whole in every stored run, no recheck there
    assert verdict(scanned, ABLConfig())["status"] == "removed"
    assert not any(caveat in e for e in ev) and not any(hint in e for e in ev)
    rep["recheck"] = {"epoch": 1, "target": 0, "threshold": 0.66, "n_target_label": 4180, "n_removed": 1568}
    ev = verdict(rep, ABLConfig(expansion_recheck_epoch=1))["evidence"]
    assert "the clean-stage recheck after epoch 1 removed 1568 more of label 0's 4180 remaining examples " \
           "(under its mean probability x 1: 0.66)" in ev
    rep["recheck"].update(scale=0.5, threshold=0.33)
    assert any("(under its mean probability x 0.5: 0.33)" in e for e in verdict(rep, ABLConfig())["evidence"])
    rep["recheck"].update(n_removed=1700, passes=[
        {"epoch": 1, "n_removed": 1700, "n_target_label": 4180, "threshold": 0.33, "mean_probability": 0.66},
        {"epoch": 2, "n_removed": 0, "n_target_label": 2480, "threshold": 0.05, "mean_probability": 0.10,
         "skipped": True}])
    assert "the clean-stage recheck removed 1700 more of label 0's examples (under its mean probability x 0.5; " \
           "after epoch 1: 1700 of 4180 under 0.33; after epoch 2: skipped, the label's mean probability 0.10 too " \
           "low)" in verdict(rep, ABLConfig())["evidence"]


@pytest.mark.parametrize("probe, status", [(0.05, "removed-unconfirmed"), (0.9, "likely-present")])
def test_verdict_of_a_label_scan_names_the_scanned_label(probe, status):
    from abl_guard.abl.config import ABLConfig
    from abl_guard.abl.report import summary_lines, verdict

    rep = _report(1.0, probe, expanded=False)  # the seed: 100% label 3, not expanded
    seed = rep["expansion"]
    rep["expansion"] = {"method": "spectral-scan", "expanded": True, "target": 0, "n_removed": 700, "n_seed": 0,
                        "n_expanded": 700, "mixture": {"weight_seedlike": 0.1, "separation": 3.3},
                        "seed": seed}
    v = verdict(rep, ABLConfig())
    assert v["status"] == status and v["target"] == 0
    assert any("scan of every label found a separate population of 10% of label 0" in e for e in v["evidence"])
    assert any("scanned population's core" in e for e in v["evidence"])
    rep["verdict"] = v
    assert any("label scan: a population of 10% of the label" in line for line in summary_lines(rep))


def _one_percent_removal(target_rate: float, n_removed: int) -> dict:
    """A label scan that removed ``n_removed`` of a 58,800-example pool, and a 1,200-example held-out split whose
    target label drew 149 examples (a class's share 9.67%: an excess of 33, 2.9 sd of a class's count)."""
    rep = _report(0.5, 0.02, expanded=True)
    rep["expansion"].update(n_removed=n_removed, estimated_poison=float(n_removed), n_pool=58_800)
    rep["unlearning"]["guard"] = {"n_holdout": 1200, "n_nontarget": 1051, "target_prior": 0.09666666666666666,
                                  "final": {"target_rate": target_rate}}
    return rep


def test_held_out_probe_is_not_read_when_the_removal_puts_too_little_poison_in_the_split():
    from abl_guard.abl.config import ABLConfig
    from abl_guard.abl.report import expected_held_out_poison, held_out_probe, verdict

    # Blend 1% seed 1 (bench/results/abl_retrain_r01_blend_contrast_s1.json): ASR 0.00%, yet the probe read 0.61
    # because the label's excess in the split was mostly clean T-shirts, which a clean model predicts as T-shirts
    rep = _one_percent_removal(0.1133, 600)
    guard = rep["unlearning"]["guard"]
    assert held_out_probe(guard) == pytest.approx(0.61, abs=0.01)
    assert expected_held_out_poison(rep) == pytest.approx(600 * 1200 / 58_800, rel=1e-9)
    assert held_out_probe(guard, expected_poison=expected_held_out_poison(rep)) is None
    v = verdict(rep, ABLConfig())
    assert v["status"] == "removed-unconfirmed"
    assert any("held-out probe not read" in e and "about 12 poisoned copies" in e for e in v["evidence"])
    # at 5% the removal puts about 60 copies in the split, over the noise (3 sd = 31): the probe is read
    rep = _one_percent_removal(0.1133, 3000)
    assert held_out_probe(rep["unlearning"]["guard"], expected_poison=expected_held_out_poison(rep)) is not None
    assert verdict(rep, ABLConfig())["status"] == "likely-present"
    rep["unlearning"]["guard"]["final"] = {"target_rate": 0.0967}
    assert verdict(rep, ABLConfig())["status"] == "removed"
    # WaNet 5% seed 1 (bench/results/abl_retrain_r05_wanet_s1.json): the scan removed 81% of the poison and
    # estimated 1,256; the split's excess of the label (85, 8 sd) says there is more, so the probe is read: 0.51,
    # the backdoor still fires (ASR 29%)
    wanet = _one_percent_removal(0.12833, 2412)
    wanet["expansion"]["estimated_poison"] = 1256.4
    wanet["unlearning"]["guard"].update(n_nontarget=1004, target_prior=0.0925)
    assert expected_held_out_poison(wanet) < 31
    assert held_out_probe(wanet["unlearning"]["guard"], expected_poison=expected_held_out_poison(wanet)) == \
        pytest.approx(0.506, abs=0.001)
    assert verdict(wanet, ABLConfig())["status"] == "likely-present"
    # the estimate is the expansion's, capped by what it removed; nothing removed: no estimate
    rep["expansion"].update(estimated_poison=5000.0)
    assert expected_held_out_poison(rep) == pytest.approx(3000 * 1200 / 58_800, rel=1e-9)
    rep["expansion"]["expanded"] = False
    assert expected_held_out_poison(rep) is None


def _capped_seed_on_clean_data(n_nontarget: int) -> dict:
    """Clean data seed 1 (bench/results/abl_retrain_clean_data_current_s1.json): the seed (587 sandals) expanded to
    the 60% cap, 3,753 removed with an estimate of 2,908 poisoned; the label scan found nothing; the retrained model
    still calls every seed example a sandal."""
    rep = _report(0.95, 1.0)
    rep["expansion"].update(target=5, capped=True, n_removed=3753, estimated_poison=2907.7, n_pool=58_800,
                            scan={"expanded": False, "reason": "no label holds a separate population"})
    rep["isolation"]["isolated_majority_label"] = 5
    rep["unlearning"]["guard"] = {"n_holdout": 1200, "n_nontarget": n_nontarget, "target_prior": 0.0975,
                                  "suspected_target": 5, "final": {"target_rate": (1200 - n_nontarget) / 1200}}
    return rep


def test_count_check_calls_a_capped_clean_sub_type_not_found():
    from abl_guard.abl.config import ABLConfig
    from abl_guard.abl.report import count_contradicts, held_out_excess, verdict

    # 135 sandals held out against a class's 117: 18 more, where the removal's estimate puts 59 poisoned copies
    rep = _capped_seed_on_clean_data(1065)
    excess, sd = held_out_excess(rep["unlearning"]["guard"])
    assert excess == pytest.approx(18.0, abs=1e-9) and sd == pytest.approx(10.27, abs=0.01)
    expected, got, _ = count_contradicts(rep)
    assert expected == pytest.approx(2907.7 * 1200 / 58_800, rel=1e-9) and got == pytest.approx(18.0)
    v = verdict(rep, ABLConfig())
    assert v["status"] == "not-found" and v["held_out_probe"] is None
    assert any("count check" in e and "4.0 sd short" in e and "clean sub-type" in e for e in v["evidence"])
    # the same removal where the split holds the estimate's copies (59 more sandals): poison that still fires
    rep = _capped_seed_on_clean_data(1065 - 41)
    assert count_contradicts(rep) is None and verdict(rep, ABLConfig())["status"] == "likely-present"
    # 2.9 sd short is within the noise: no verdict from the counts
    rep = _capped_seed_on_clean_data(1065 - 11)
    assert count_contradicts(rep) is None
    # only a capped seed expansion after which the scan ran and found nothing; never the scan's own find (clean-label
    # poison adds nothing to its label), an uncapped expansion, or a seed whose label is not the guard's suspect
    for change in ({"capped": False}, {"method": "spectral-scan"}, {"target": 4}):
        rep = _capped_seed_on_clean_data(1065)
        rep["expansion"].update(change)
        assert count_contradicts(rep) is None
    rep = _capped_seed_on_clean_data(1065)
    del rep["expansion"]["scan"]
    assert count_contradicts(rep) is None


def test_an_input_scan_find_its_label_count_does_not_show_is_clean_label_poison():
    """SIG 5% seed 0 (bench/results/abl_retrain_r05_sig_input.json): the input scan removed 2,939 sine-overlaid
    T-shirts (D 25.7; ASR 58.89% -> 0.12%) and a clean model still calls 43% of them T-shirts, so the core probe
    cannot tell; the held-out split holds 3 more T-shirts than a class's share where 60 were estimated."""
    from abl_guard.abl.config import ABLConfig
    from abl_guard.abl.report import clean_label_find, count_contradicts, verdict

    rep = _report(0.48, 0.43, expanded=False)
    rep["expansion"] = {"method": "spectral-scan", "space": "input", "expanded": True, "target": 0,
                        "n_removed": 2939, "estimated_poison": 2939.0, "n_pool": 58_800, "n_seed": 0,
                        "n_expanded": 2939, "mixture": {"weight_seedlike": 0.4997, "separation": 25.7},
                        "seed": rep["expansion"]}
    rep["unlearning"]["guard"] = {"n_holdout": 1200, "n_nontarget": 1078, "target_prior": 0.09916666666666667,
                                  "suspected_target": 0, "final": {"target_rate": 0.0717}}
    expected, excess, _ = clean_label_find(rep)
    assert expected == pytest.approx(2939 * 1200 / 58_800, rel=1e-9) and excess == pytest.approx(3.0, abs=1e-9)
    assert count_contradicts(rep) is None  # a scan's find, not a capped seed
    v = verdict(rep, ABLConfig())
    assert v["status"] == "removed-unconfirmed" and v["target"] == 0
    assert any("raw inputs found a separate population of 50% of label 0" in e for e in v["evidence"])
    assert any("clean-label poison" in e and "5.5 sd short" in e for e in v["evidence"])
    # label-consistent 5% (abl_retrain_r05_lc_input.json): the core probe reads 9%; the evidence says why the held-out
    # split cannot confirm it
    rep["unlearning"]["isolated_accuracy_after"] = 0.09
    v = verdict(rep, ABLConfig())
    assert v["status"] == "removed-unconfirmed"
    assert any("clean-label poison, whose held-out copies carry their own label" in e for e in v["evidence"])
    rep["unlearning"]["isolated_accuracy_after"] = 0.43
    # the model-based label scan's find is not read this way (a clean sub-type can split features that far)
    rep["expansion"]["space"] = "features"
    assert clean_label_find(rep) is None and verdict(rep, ABLConfig())["status"] == "likely-present"
    # a dirty-label find adds its copies to the label (Trojan 1% seed 2: 12 expected, 24 found): no shortfall
    rep["expansion"].update(space="input", n_removed=587, estimated_poison=587.0)
    rep["unlearning"]["guard"].update(n_nontarget=1057, target_prior=0.0991666)
    assert clean_label_find(rep) is None


def test_the_evidence_names_a_count_matched_scan_find():
    from abl_guard.abl.report import expansion_evidence

    exp = {"method": "spectral-scan", "expanded": True, "target": 0, "n_removed": 3400,
           "mixture": {"weight_seedlike": 0.39, "separation": 2.16},
           "seed": {"expanded": False, "reason": "capped expansion refused by the held-out count"},
           "labels": [{"label": 0, "count_excess": 3260.0, "count_route": True},
                      {"label": 1, "count_excess": -4.0, "count_route": False}]}
    line = expansion_evidence(exp)
    assert "39% of label 0" in line and "3260 more examples than the median label" in line
    exp["labels"][0]["count_route"] = False
    assert "median label" not in expansion_evidence(exp)


def test_a_capped_expansion_refused_by_the_count_reads_not_found():
    """Clean data seed 1 with the defaults of 2026-12-04 (bench/results/abl_retrain_clean_data_today_s1_intel.json):
    the seed (587 sandals) expanded to the cap, the count refused it (1.8 sd < 3), only the seed was removed and no
    scan found anything; the final model still calls the seed's sandals sandals. That is a clean sub-type, not a
    backdoor left in place: `not-found`, where the seed probe alone said `likely-present`."""
    from abl_guard.abl.config import ABLConfig
    from abl_guard.abl.report import refused_by_count, verdict

    def rep(probe: float, kept: bool = False) -> dict:
        r = _report(0.95, probe, expanded=kept)
        r["isolation"]["isolated_majority_label"] = 5
        r["expansion"].update(target=5, capped=True, n_removed=587, scan={"expanded": False},
                              capped_count={"excess": 18.2, "excess_sd": 1.8, "need_sd": 3.0,
                                            "n_capped_removal": 3753, "kept": kept},
                              reason="capped expansion refused by the held-out count (1.8 sd < 3)")
        return r

    v = verdict(rep(1.0), ABLConfig())
    assert v["status"] == "not-found" and v["target"] == 5
    assert any("capped expansion (3753 examples of label 5) was refused" in e and "1.8 sd" in e
               and "not proof" in e for e in v["evidence"])
    # a seed the final model no longer calls by its label was poison: the removal reads as before
    assert verdict(rep(0.05), ABLConfig())["status"] == "removed-unconfirmed"
    # a kept capped expansion, or the scan's own find, is not a refusal
    assert refused_by_count(rep(1.0, kept=True)) is None
    found = rep(1.0)
    found["expansion"].update(method="spectral-scan", expanded=True)
    assert refused_by_count(found) is None


def test_a_label_scan_that_qualifies_many_labels_warns():
    """An all-to-one backdoor sets one label apart; when the scan qualifies three or more (PreAct-ResNet-18 features
    on 5,000 images: six or seven), the run warns that its find may be a clean population; one or two qualifying
    labels (every stored small-CNN scan) do not warn."""
    from abl_guard.abl.abl import ABLConfig
    from abl_guard.abl.report import SCAN_MANY_QUALIFYING, failure_warnings

    cfg = ABLConfig()
    many = {"expanded": True, "target": 1, "qualifying": [0, 1, 3, 5, 7, 8]}
    found = failure_warnings({"expansion": many}, cfg)
    assert SCAN_MANY_QUALIFYING == 3
    assert [w for w in found if "qualified 6 labels (0, 1, 3, 5, 7, 8)" in w and "label 1" in w]
    for q in ([0], [0, 4]):
        assert not any("qualified" in w for w in failure_warnings({"expansion": {**many, "qualifying": q}}, cfg))
