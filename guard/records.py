"""When two verdict records of the same input agree: the project's reproducibility contract, in one place.

The model pass is onnxruntime's and is bit-identical across batch sizes on the CPUs measured, but the detectors are
numpy and BLAS: a matrix product's blocking depends on the batch's shape and on the CPU's kernel (OpenBLAS picks
"Haswell", "SkylakeX", ... at run time), so a score may differ in its last digits between a full scan, a resumed scan,
a micro-batched service call and another machine. The contract is therefore:

* everything that is not a float is identical: ids, sources, errors, labels, class names, resize notes, tails;
* floats (scores, p-values, confidences, thresholds) agree within ``SCORE_RTOL`` relative (``SCORE_ATOL`` absolute);
* decisions (``flagged``, ``kind``) are identical — except for an input whose score sits on a calibration score: there
  the last-digit noise can move a conformal p-value by one rank, which changes the decision only at the threshold.
  Such an input is recognised by a per-detector p-value that differs beyond the tolerance while its raw score agrees.

:func:`record_differences` applies the contract (tests, resumed scans, the HTTP service and distributed scans are all
checked with it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

#: relative tolerance on every float of a verdict record across batch sizes, resumes and CPUs
SCORE_RTOL = 1e-5
#: absolute tolerance (for values near zero, e.g. tiny p-values)
SCORE_ATOL = 1e-9

_FLOAT_KEYS = ("confidence", "p_value", "score", "threshold")
_DECISION_KEYS = ("flagged", "kind")


def floats_close(a: Any, b: Any, rtol: float = SCORE_RTOL, atol: float = SCORE_ATOL) -> bool:
    """``a`` and ``b`` agree as floats within the tolerance (``None`` only equals ``None``; NaN equals NaN)."""
    if a is None or b is None:
        return a is None and b is None
    fa, fb = float(a), float(b)
    if math.isnan(fa) or math.isnan(fb):
        return math.isnan(fa) and math.isnan(fb)
    if math.isinf(fa) or math.isinf(fb):
        return fa == fb
    return abs(fa - fb) <= atol + rtol * max(abs(fa), abs(fb))


def _rank_moved(a: Mapping[str, Any], b: Mapping[str, Any], rtol: float, atol: float) -> bool:
    """Some detector's p-value moved (a calibration rank changed) while its raw score agrees: float noise at a tie."""
    da, db = a.get("detectors") or {}, b.get("detectors") or {}
    for name in set(da) & set(db):
        pa, pb = da[name].get("p_value"), db[name].get("p_value")
        if pa is not None and pb is not None and not floats_close(pa, pb, rtol, atol):
            return True
    return False


def record_differences(a: Mapping[str, Any], b: Mapping[str, Any], rtol: float = SCORE_RTOL,
                       atol: float = SCORE_ATOL) -> list[str]:
    """What differs between two records of one input beyond the contract above (empty = they agree)."""
    out: list[str] = []
    keys = set(a) | set(b)
    moved = _rank_moved(a, b, rtol, atol)
    for k in sorted(keys - {"detectors"}):
        va, vb = a.get(k), b.get(k)
        if k in _FLOAT_KEYS:
            if not floats_close(va, vb, rtol, atol) and not (moved and k in ("p_value", "score")):
                out.append(f"{k}: {va!r} != {vb!r}")
        elif k in _DECISION_KEYS:
            if va != vb and not moved:
                out.append(f"{k}: {va!r} != {vb!r}")
        elif va != vb:
            out.append(f"{k}: {va!r} != {vb!r}")
    da, db = a.get("detectors") or {}, b.get("detectors") or {}
    if set(da) != set(db):
        out.append(f"detectors: {sorted(da)} != {sorted(db)}")
    for name in sorted(set(da) & set(db)):
        for k in sorted(set(da[name]) | set(db[name])):
            va, vb = da[name].get(k), db[name].get(k)
            if k == "tail":
                same = va == vb or moved
            elif k == "p_value":
                same = moved or floats_close(va, vb, rtol, atol)
            else:
                same = floats_close(va, vb, rtol, atol)
            if not same:
                out.append(f"{name}.{k}: {va!r} != {vb!r}")
    return out


def stream_differences(got: Sequence[Mapping[str, Any]], ref: Sequence[Mapping[str, Any]],
                       rtol: float = SCORE_RTOL, atol: float = SCORE_ATOL, limit: int = 10) -> list[str]:
    """Differences between two record streams: the same ids in the same order, each pair per the contract."""
    ids_got, ids_ref = [r.get("id") for r in got], [r.get("id") for r in ref]
    if ids_got != ids_ref:
        return [f"ids differ: {len(ids_got)} records vs {len(ids_ref)}; first mismatch at "
                f"{next((i for i, (x, y) in enumerate(zip(ids_got, ids_ref)) if x != y), min(len(got), len(ref)))}"]
    out: list[str] = []
    for ra, rb in zip(got, ref):
        diff = record_differences(ra, rb, rtol, atol)
        if diff:
            out.append(f"{ra.get('id')}: " + "; ".join(diff))
            if len(out) >= limit:
                break
    return out
