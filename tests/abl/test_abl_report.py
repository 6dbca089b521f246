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
