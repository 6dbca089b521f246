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
    exp = {"expanded": expanded, "n_seed": 40, "n_removed": 400, "target": 3, "n_target_label": 900,
           "estimated_poison": 380.0, "mixture": {"separation": 5.0}, "reason": "no second population"}
    un = {} if probe is None else {"isolated_accuracy_after": probe}
    return {"isolation": iso, "expansion": exp, "unlearning": un}


@pytest.mark.parametrize("share, probe, status", [(0.95, 0.05, "removed"), (0.95, 0.9, "likely-present"),
                                                  (0.4, 0.05, "not-found"), (0.95, None, "likely-present")])
def test_verdict_from_the_runs_own_evidence(share, probe, status):
    from abl_guard.abl.config import ABLConfig
    from abl_guard.abl.report import summary_lines, verdict

    rep = _report(share, probe)
    v = verdict(rep, ABLConfig())
    assert v["status"] == status and v["target"] == 3
    assert any("grew to 400" in e for e in v["evidence"])
    rep["verdict"] = v
    assert any(f"backdoor {status}" in line for line in summary_lines(rep))


def test_verdict_says_when_the_seed_was_not_expanded():
    from abl_guard.abl.config import ABLConfig
    from abl_guard.abl.report import verdict

    v = verdict(_report(0.95, 0.9, expanded=False), ABLConfig())
    assert any("not expanded: no second population" in e for e in v["evidence"])
