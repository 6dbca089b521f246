"""The reproducibility contract (guard/records.py): floats within a stated tolerance, decisions exactly, except where
float noise moved a conformal rank; and the guard meets it across batch sizes."""

from __future__ import annotations

import pytest

from abl_guard.guard import Guard
from abl_guard.guard.records import SCORE_RTOL, floats_close, record_differences, stream_differences


def rec(**kw):
    base = {"id": "a", "label": 1, "class_name": "1", "confidence": 0.9, "flagged": False, "score": 1.2,
            "threshold": 2.0, "p_value": 0.063, "kind": None,
            "detectors": {"mahalanobis": {"score": 12.5, "p_value": 0.063, "tail": "high"}}}
    base.update(kw)
    return base


def test_floats_close_rules():
    assert floats_close(1.0, 1.0 + 0.5 * SCORE_RTOL)
    assert not floats_close(1.0, 1.0 + 3 * SCORE_RTOL)
    assert floats_close(None, None) and not floats_close(None, 0.0)
    assert floats_close(float("nan"), float("nan")) and not floats_close(float("nan"), 1.0)
    assert floats_close(float("inf"), float("inf")) and not floats_close(float("inf"), 1e300)


def test_last_digit_noise_agrees_but_real_differences_do_not():
    a = rec()
    assert record_differences(a, rec(confidence=0.9 * (1 + 1e-7), score=1.2 * (1 - 1e-7))) == []
    assert record_differences(a, rec(confidence=0.91)) == ["confidence: 0.9 != 0.91"]
    assert record_differences(a, rec(label=2)) == ["label: 1 != 2"]
    assert record_differences(a, rec(id="b")) == ["id: 'a' != 'b'"]
    assert record_differences(a, rec(error="x")) == ["error: None != 'x'"]


def test_a_flag_may_differ_only_where_a_rank_moved():
    a = rec()
    # same ranks (per-detector p-values agree): a different decision is a real difference
    assert "flagged: False != True" in record_differences(a, rec(flagged=True))
    # the raw score agrees within tolerance but its p-value moved by one calibration rank: a tie at the threshold
    tie = rec(flagged=True, p_value=0.05, score=1.3,
              detectors={"mahalanobis": {"score": 12.5 * (1 + 1e-7), "p_value": 0.05, "tail": "high"}})
    assert record_differences(a, tie) == []
    # ... but not when the raw score itself differs
    far = rec(flagged=True, p_value=0.05, detectors={"mahalanobis": {"score": 13.0, "p_value": 0.05, "tail": "high"}})
    assert any(d.startswith("mahalanobis.score") for d in record_differences(a, far))


def test_stream_differences_checks_ids_and_order():
    assert stream_differences([rec(id="a"), rec(id="b")], [rec(id="a"), rec(id="b")]) == []
    assert stream_differences([rec(id="b"), rec(id="a")], [rec(id="a"), rec(id="b")])[0].startswith("ids differ")
    assert stream_differences([rec(id="a")], [rec(id="a"), rec(id="b")])[0].startswith("ids differ")


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_guard_verdicts_meet_the_contract_across_batch_sizes(tiny_bundle, digits_test, batch):
    guard = Guard.load(tiny_bundle)
    x = digits_test.images[:64]
    ref = [v.to_json() for v in guard.inspect(x)]
    got = [v.to_json() for s in range(0, len(x), batch) for v in guard.inspect(x[s: s + batch])]
    for r in ref + got:
        r["id"] = "same"
    assert [record_differences(g, r) for g, r in zip(got, ref)] == [[]] * len(ref)
