"""Every registered detector goes through the guard: calibrated into one bundle, loaded back, scoring the same."""

from __future__ import annotations

import json

import numpy as np

from abl_guard.detectors import REGISTRY, make_detector
from abl_guard.guard.records import SCORE_ATOL, SCORE_RTOL

#: small settings so the whole bundle fits in seconds on the 8x8 digits
PARAMS = {
    "mutation": {"tap": "pool", "n_mutants": 30},
    "strip": {"n_blend": 16},
    "knn": {"k": 10},
    "nic": {"max_samples": 600},
}


def test_bundle_with_every_detector_round_trips(tiny_backdoored, tmp_path):
    from abl_guard.guard import Guard, calibrate_bundle
    from abl_guard.guard.runtime import needed_outputs, observe

    test = tiny_backdoored["test"]
    names = sorted(REGISTRY)
    dets = [make_detector(n, **PARAMS.get(n, {})) for n in names]
    manifest = calibrate_bundle(tiny_backdoored["onnx"], test.images, test.labels, dets, tmp_path / "b",
                                fpr=0.05, fractions=(0.5, 0.3, 0.2), seed=0)
    assert [d["type"] for d in manifest["detectors"]] == names
    saved = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert {d["name"]: d["two_sided"] for d in saved["detectors"]}["strip"] is True

    guard = Guard.load(tmp_path / "b")
    assert guard.detector_names == names
    trig = tiny_backdoored["triggered"].images[:40]
    x = trig.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    ins = guard.inspect_arrays(trig)
    obs = observe(guard.model, x, needed_outputs(dets))
    for name, fitted, loaded in zip(names, dets, guard.detectors):
        assert type(fitted) is type(loaded) and loaded.get_params() == fitted.get_params()
        # the stated contract (guard/records.py): scores agree to SCORE_RTOL across batch shapes and CPUs
        np.testing.assert_allclose(ins.scores[name], fitted.score(obs, guard.model), rtol=SCORE_RTOL,
                                   atol=SCORE_ATOL, err_msg=name)
    assert ins.flagged.mean() > 0.5
    kinds = {k for d in guard.detectors for k in d.tail_kinds.values()}
    assert {v.kind for v in guard.verdicts(ins) if v.flagged} <= kinds
