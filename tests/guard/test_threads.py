"""The Python API: concurrent callers, automatic batching, accepted input forms and clear validation errors."""

import threading

import numpy as np
import pytest
from PIL import Image

from abl_guard.guard import Guard, InputError


@pytest.fixture(scope="module")
def guard(tiny_bundle):
    return Guard.load(tiny_bundle, batch_size=32)


def test_concurrent_callers_get_the_sequential_answers(guard, digits_test):
    x = digits_test.images
    slices = [x[i : i + 45] for i in range(0, 360, 45)]
    want = [guard.inspect_arrays(s) for s in slices]
    got: dict[tuple[int, int], object] = {}
    errors = []
    barrier = threading.Barrier(8)

    def worker(t):
        try:
            barrier.wait()
            for rep in range(6):
                k = (t + rep) % len(slices)
                if rep % 2:
                    got[(t, rep)] = (k, guard.inspect_arrays(slices[k]))
                else:
                    got[(t, rep)] = (k, guard.predict(slices[k]))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(got) == 48
    for k, res in got.values():
        if isinstance(res, tuple):
            labels, flags = res
            np.testing.assert_array_equal(labels, want[k].labels)
            np.testing.assert_array_equal(flags, want[k].flagged)
        else:
            np.testing.assert_array_equal(res.labels, want[k].labels)
            np.testing.assert_allclose(res.p_value, want[k].p_value, rtol=1e-6)


def test_automatic_batching_matches_small_batches(guard, digits_test, monkeypatch):
    x = digits_test.images[:100]  # > batch_size 32: four chunks
    seen = []
    real = guard._inspect_float
    monkeypatch.setattr(guard, "_inspect_float", lambda xf: seen.append(len(xf)) or real(xf))
    whole = guard.inspect_arrays(x)
    assert seen == [32, 32, 32, 4]
    parts = [guard.inspect_arrays(x[i : i + 10]) for i in range(0, 100, 10)]
    np.testing.assert_array_equal(whole.labels, np.concatenate([p.labels for p in parts]))
    np.testing.assert_allclose(whole.p_value, np.concatenate([p.p_value for p in parts]), rtol=1e-6)
    assert len(guard.inspect(x)) == 100


def test_input_forms_agree(guard, digits_test):
    u8 = digits_test.images[:6]  # (N, 8, 8, 1) uint8
    ref = guard.inspect_arrays(u8)
    forms = {
        "NHW uint8": u8[..., 0],
        "NHWC float": u8.astype(np.float32) / 255,
        "NCHW float64": u8.transpose(0, 3, 1, 2) / 255.0,
        "PIL list": [Image.fromarray(i[..., 0]) for i in u8],
        "PIL RGB": [Image.fromarray(i[..., 0]).convert("RGB") for i in u8],
    }
    for name, x in forms.items():
        got = guard.inspect_arrays(x)
        np.testing.assert_array_equal(got.labels, ref.labels, err_msg=name)
        np.testing.assert_allclose(got.p_value, ref.p_value, rtol=1e-5, err_msg=name)
    one = guard.inspect(u8[0])  # a single (H, W, C) image
    assert len(one) == 1 and one[0].label == ref.labels[0]
    assert len(guard.inspect(Image.fromarray(u8[1, ..., 0]))) == 1
    big = [Image.fromarray(np.kron(i[..., 0], np.ones((4, 4), np.uint8))).convert("RGB") for i in u8]
    assert len(guard.inspect(big)) == 6  # converted to grayscale and resized to 8x8


@pytest.mark.parametrize("bad, match", [
    (np.zeros((2, 9, 9, 1), np.uint8), r"uint8 images must be \(N, 8, 8, 1\)"),
    (np.zeros((2, 8, 8, 3), np.float32), r"float images must be"),
    (np.zeros((2, 8, 8, 1), np.int32), "integer images must be uint8"),
    (np.full((2, 8, 8, 1), np.nan, np.float32), "NaN or infinite"),
    (np.full((2, 1, 8, 8), np.inf, np.float32), "NaN or infinite"),
    (np.full((2, 1, 8, 8), 255.0, np.float32), r"scaled to \[0, 1\]"),
    (np.zeros((0, 8, 8, 1), np.uint8), "non-empty"),
    (np.array(["a", "b"]), "unsupported dtype"),
    ([[1, 2], "x"], "cannot convert|non-empty numeric"),
])
def test_input_validation_errors(guard, bad, match):
    with pytest.raises(InputError, match=match):
        guard.inspect(bad)
    with pytest.raises(ValueError):  # InputError is a ValueError
        guard.predict(bad)


def test_verdict_fields(guard, digits_test):
    v = guard.inspect(digits_test.images[:3])[0]
    j = v.to_json()
    assert set(j) == {"label", "class_name", "confidence", "flagged", "score", "threshold", "p_value", "kind",
                      "detectors"}
    assert set(j["detectors"]["mahalanobis"]) == {"score", "p_value", "tail"}
    assert 0 < j["confidence"] <= 1 and j["flagged"] == (v.p_value <= v.p_threshold)
    assert (j["kind"] is None) == (not j["flagged"])


def test_blas_cap_held_while_scoring_and_restored(guard, digits_test, monkeypatch):
    from threadpoolctl import threadpool_info

    def blas_threads():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    before = blas_threads()
    seen = []
    det = guard.detectors[0]
    real = det.score
    monkeypatch.setattr(det, "score", lambda obs, model=None: seen.append(blas_threads()) or real(obs, model))
    guard.predict(digits_test.images[:16])
    guard.predict(digits_test.images[:1])  # too small to bother
    assert seen[0] == [1] * len(before) and seen[1] == before
    assert blas_threads() == before
