"""GuardedSession: a drop-in for onnxruntime.InferenceSession on an adopted foreign model (onnx.helper-built, NHWC
uint8 input, Softmax output), returning the model's own outputs plus the guard's verdicts of the same call."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from abl_guard.guard import Guard, GuardedSession, InputContract, InputError


def build_foreign(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """uint8 (N, 8, 8, 1) -> cast, /255 -> reshape -> dense+relu -> dense -> Softmax ``probs`` (weights: a random
    hidden layer and a least-squares head on the digits)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    x = images.reshape(len(images), -1).astype(np.float32) / 255
    w1 = rng.normal(0, 1 / 8, (64, 48)).astype(np.float32)
    b1 = rng.normal(0, 0.1, 48).astype(np.float32)
    hb = np.c_[np.maximum(x @ w1 + b1, 0), np.ones(len(x))]
    sol = np.linalg.solve(hb.T @ hb + 1e-2 * np.eye(49), hb.T @ np.eye(10)[labels]) * 5
    consts = {"scale": np.float32(1 / 255), "shape": np.array([-1, 64], np.int64), "W1": w1, "B1": b1,
              "W2": sol[:-1].astype(np.float32), "B2": sol[-1].astype(np.float32)}
    nodes = [helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["f", "scale"], ["s"]),
             helper.make_node("Reshape", ["s", "shape"], ["flat"]),
             helper.make_node("MatMul", ["flat", "W1"], ["h"]),
             helper.make_node("Add", ["h", "B1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["feat"]),
             helper.make_node("MatMul", ["feat", "W2"], ["z"]),
             helper.make_node("Add", ["z", "B2"], ["zb"]),
             helper.make_node("Softmax", ["zb"], ["probs"], axis=1)]
    graph = helper.make_graph(nodes, "foreign",
                              [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 8, 8, 1])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def foreign(tmp_path_factory, digits_train) -> dict:
    from abl_guard.detectors import make_detector
    from abl_guard.export import adopt
    from abl_guard.guard import calibrate_bundle

    d = tmp_path_factory.mktemp("session")
    src = build_foreign(d / "foreign.onnx", digits_train.images, digits_train.labels)
    adopt(src, d / "adopted.onnx")
    calibrate_bundle(d / "adopted.onnx", digits_train.images, digits_train.labels,
                     [make_detector("mahalanobis"), make_detector("squeeze")], d / "b.guard", fpr=0.05,
                     fractions=(0.4, 0.4, 0.2), seed=0)
    return {"src": src, "bundle": d / "b.guard"}


def test_run_returns_the_models_own_outputs_and_verdicts(foreign, digits_test):
    sess = GuardedSession(foreign["bundle"])
    orig = ort.InferenceSession(str(foreign["src"]))
    x = digits_test.images[:40]  # what the deployed model takes: uint8 NHWC
    assert [i.name for i in sess.get_inputs()] == ["image"] and [o.name for o in sess.get_outputs()] == ["probs"]
    assert sess.last_verdicts is None
    (probs,) = sess.run(None, {"image": x})
    np.testing.assert_allclose(probs, orig.run(None, {"image": x})[0], atol=1e-6)
    verdicts = sess.last_verdicts
    assert len(verdicts) == len(x) and [v.label for v in verdicts] == probs.argmax(1).tolist()
    # the same decisions as the Guard on the same images handed over in the canonical form
    ref = Guard.load(foreign["bundle"]).inspect(x)
    assert [v.flagged for v in verdicts] == [v.flagged for v in ref]
    np.testing.assert_allclose([v.p_value for v in verdicts], [v.p_value for v in ref], rtol=1e-6, atol=1e-12)
    outs, verdicts2 = sess.run_with_verdicts(["probs"], {"image": x[:3]})
    assert len(outs) == 1 and len(verdicts2) == 3 and len(sess.last_verdicts) == 3


def test_chunks_and_input_detectors_see_the_canonical_input(foreign, digits_test):
    """Batches beyond batch_size run in chunks; the squeeze detector gets the uint8 images back as [0, 1] floats."""
    small = GuardedSession(foreign["bundle"], batch_size=16)
    big = GuardedSession(foreign["bundle"])
    x = digits_test.images[:50]
    a, b = small.run(None, {"image": x})[0], big.run(None, {"image": x})[0]
    np.testing.assert_allclose(a, b, atol=1e-6)
    ia, ib = small.last_inspection, big.last_inspection
    np.testing.assert_array_equal(ia.flagged, ib.flagged)
    np.testing.assert_allclose(ia.scores["squeeze"], ib.scores["squeeze"], atol=1e-6)


def test_thread_safe_verdicts_per_thread(foreign, digits_test):
    sess = GuardedSession(foreign["bundle"])
    batches = [digits_test.images[i * 7 : i * 7 + 5 + i] for i in range(6)]
    want = [Guard.load(foreign["bundle"]).predict(b)[1].tolist() for b in batches[:1]]
    results: dict[int, list[bool]] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(5):
                sess.run(None, {"image": batches[i]})
                results[i] = [v.flagged for v in sess.last_verdicts]
                assert len(results[i]) == len(batches[i])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results[0] == want[0] and all(len(results[i]) == len(batches[i]) for i in range(len(batches)))


def test_wrong_names_are_refused(foreign, digits_test):
    sess = GuardedSession(foreign["bundle"])
    with pytest.raises(ValueError, match="unknown output names"):
        sess.run(["logits_nope"], {"image": digits_test.images[:2]})
    with pytest.raises(ValueError, match="takes one input"):
        sess.run(None, {"x": digits_test.images[:2]})


@pytest.mark.parametrize("layout,dtype,rng,mean,std", [
    ("NHWC", "uint8", (0.0, 255.0), None, None),
    ("NCHW", "float32", (0.0, 1.0), (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)),
    ("flat", "float32", (0.0, 16.0), None, None),
    ("NHWC", "float16", (-1.0, 1.0), (0.1,), (0.5,)),
])
def test_input_contract_round_trip(layout, dtype, rng, mean, std):
    c = InputContract((3, 4, 5), layout, dtype, rng, mean, std)
    x = np.random.default_rng(0).random((6, 3, 4, 5), dtype=np.float32)
    if dtype == "uint8":
        x = np.rint(x * 255) / np.float32(255)  # representable exactly
    native = c.to_native(x)
    assert native.shape == (6, *c.native_shape()) and native.dtype == np.dtype(dtype)
    tol = 2e-3 if dtype == "float16" else 1e-5
    np.testing.assert_allclose(c.from_native(native), x, atol=tol)
    if layout == "NCHW" and mean is not None:  # normalisation on the value-range scale, per channel
        np.testing.assert_allclose(native[:, 1], (x[:, 1] - 0.5) / 0.3, atol=1e-5)
    with pytest.raises(InputError):
        c.from_native(native[:, :2])


def test_input_contract_refuses_inconsistent_specs():
    with pytest.raises(ValueError, match="uint8"):
        InputContract((1, 8, 8), "NHWC", "uint8", (0.0, 1.0))
    with pytest.raises(ValueError, match="NHW holds one channel"):
        InputContract((3, 8, 8), "NHW")
    with pytest.raises(ValueError, match="std must be positive"):
        InputContract((1, 8, 8), "NCHW", "float32", (0.0, 1.0), (0.5,), (0.0,))
