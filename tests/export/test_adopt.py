"""abl-guard adopt on ONNX files the project did not write: one built with onnx.helper (NHWC uint8 in, Softmax out),
a torchvision ResNet exported by torch's TorchScript exporter with normalisation outside the graph, and scikit-learn
MLPs converted by skl2onnx (with and without ZipMap). Each goes adopt -> calibrate --data FOLDER -> scan, and the
false-positive rate on fresh clean digits must fall inside the bundle's validation interval."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from abl_guard.cli import main
from abl_guard.export import AdoptError, adopt, list_taps, read_metadata
from abl_guard.guard.model import OnnxModel

FPR = 0.05
TOL = 1e-5  # float outputs of the original and the adopted graph (identical graphs up to added Identity nodes)


# ------------------------------------------------------------------------------------------------ data and models


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """Digits as PNG files in class sub-folders (ImageFolder layout)."""
    from PIL import Image

    for i, (img, y) in enumerate(zip(images, labels)):
        d = root / str(int(y))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[..., 0]).save(d / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory, digits_train, digits_test) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("digits")
    return (write_folder(d / "clean", digits_train.images, digits_train.labels),
            write_folder(d / "fresh", digits_test.images, digits_test.labels))


def lstsq_head(features: np.ndarray, labels: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Ridge least-squares weights ``(in, k)`` and bias mapping features to one-hot labels (a quick trained head)."""
    fb = np.c_[features, np.ones(len(features))]
    sol = np.linalg.solve(fb.T @ fb + 1e-2 * np.eye(fb.shape[1]), fb.T @ np.eye(k)[labels])
    return (sol[:-1] * 5).astype(np.float32), (sol[-1] * 5).astype(np.float32)


def build_nhwc_uint8_softmax(path: Path, images: np.ndarray, labels: np.ndarray, batch: int | str = 1,
                             flat_shape: tuple[int, int] = (-1, 64)) -> Path:
    """uint8 (batch, 8, 8, 1) -> cast, /255, normalise -> reshape -> dense+relu -> dense -> Softmax ``probs``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    x = (images.reshape(len(images), -1).astype(np.float32) / 255 - 0.3) / 0.4
    w1 = rng.normal(0, 1 / 8, (64, 48)).astype(np.float32)
    b1 = rng.normal(0, 0.1, 48).astype(np.float32)
    w2, b2 = lstsq_head(np.maximum(x @ w1 + b1, 0), labels)
    consts = {"scale": np.float32(1 / 255), "mean": np.float32(0.3), "std": np.float32(0.4),
              "shape": np.array(flat_shape, np.int64), "W1": w1, "B1": b1, "W2": w2, "B2": b2}
    nodes = [
        helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["f", "scale"], ["s"]),
        helper.make_node("Sub", ["s", "mean"], ["c"]),
        helper.make_node("Div", ["c", "std"], ["n"]),
        helper.make_node("Reshape", ["n", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "W1"], ["h"], name="dense1"),
        helper.make_node("Add", ["h", "B1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["feat"], name="relu1"),
        helper.make_node("MatMul", ["feat", "W2"], ["z"]),
        helper.make_node("Add", ["z", "B2"], ["zb"]),
        helper.make_node("Softmax", ["zb"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(nodes, "foreign", [helper.make_tensor_value_info("image", TensorProto.UINT8,
                                                                              [batch, 8, 8, 1])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [batch, 10])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="hand-written")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def guard_from_folder(runner: CliRunner, model: Path, clean: Path, out: Path, *extra: str) -> dict:
    res = runner.invoke(main, ["calibrate", str(model), "--data", str(clean), "--fpr", str(FPR), "--fractions",
                               "0.4,0.4,0.2", "-o", str(out), *extra])
    assert res.exit_code == 0, res.output
    return json.loads((out / "manifest.json").read_text())


def scan_rate(runner: CliRunner, bundle: Path, fresh: Path, out: Path) -> tuple[float, float, int]:
    """``(flag rate, accuracy against the folder labels, n)`` of a scan of ``fresh``."""
    res = runner.invoke(main, ["scan", str(bundle), str(fresh), "-o", str(out)])
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert recs and all(r.get("error") is None for r in recs)
    flags = np.array([r["flagged"] for r in recs])
    truth = np.array([int(Path(r["id"]).parent.name) for r in recs])
    pred = np.array([int(r["class_name"]) for r in recs])
    return float(flags.mean()), float(np.mean(pred == truth)), len(recs)


def assert_fpr_in_ci(manifest: dict, rate: float, n: int) -> None:
    """The fresh inputs' flag rate agrees with the validation part's (two-sided Fisher exact test at 1%): both are
    samples, so the fresh rate alone need not fall inside the validation rate's 95% interval."""
    from scipy.stats import fisher_exact

    v = manifest["calibration"]["validation"]
    k = round(rate * n)
    p = fisher_exact([[v["k"], v["n"] - v["k"]], [k, n - k]]).pvalue
    assert p > 0.01, (rate, v["rate"], v["ci95"], p)


# ------------------------------------------------------------------------------------------------ the three models


def test_onnx_helper_nhwc_uint8_softmax(tmp_path, folders, digits_train, digits_test):
    clean, fresh = folders
    src = build_nhwc_uint8_softmax(tmp_path / "foreign.onnx", digits_train.images, digits_train.labels, batch=1)
    runner = CliRunner()
    res = runner.invoke(main, ["adopt", str(src), "-o", str(tmp_path / "g.onnx"), "--check-data", str(fresh)])
    assert res.exit_code == 0, res.output
    meta = read_metadata(tmp_path / "g.onnx")
    assert (meta["input_layout"], meta["input_dtype"], meta["input_shape"]) == ("NHWC", "uint8", [1, 8, 8])
    assert meta["taps"]["penultimate"]["tensor"] == "feat" and meta["output_activation"] == "softmax"
    assert meta["model_outputs"] == ["probs"] and "fixed_batch" not in meta  # batch 1 made dynamic

    # the original output is unchanged, at a batch size the original file did not allow
    x = digits_test.images[:7]
    orig = ort.InferenceSession(str(src))
    want = np.concatenate([orig.run(None, {"image": x[i : i + 1]})[0] for i in range(len(x))])
    new = ort.InferenceSession(str(tmp_path / "g.onnx"))
    got, logits = new.run(["probs", "logits"], {"image": x})
    np.testing.assert_allclose(got, want, atol=TOL)
    np.testing.assert_allclose(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), want, atol=1e-5)

    manifest = guard_from_folder(runner, tmp_path / "g.onnx", clean, tmp_path / "b.guard")
    assert manifest["provenance"]["calibration_data"]["predicted_labels"] == 0  # labels from the class folders
    rate, acc, n = scan_rate(runner, tmp_path / "b.guard", fresh, tmp_path / "v.jsonl")
    assert n == len(digits_test.labels) and acc > 0.85
    assert_fpr_in_ci(manifest, rate, n)


def _tiny_resnet(size: int, clean: Path, mean: float, std: float):
    """torchvision's ResNet (BasicBlock, one block per stage); its fc fitted by least squares on the clean digits."""
    import torch
    from torchvision.models.resnet import BasicBlock, ResNet

    from abl_guard.guard.labelled import read_calibration_data

    torch.manual_seed(0)
    net = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10).eval()
    data = read_calibration_data([clean], (3, size, size), [str(i) for i in range(10)], labels="given")
    data.images, data.labels = data.images[::3], data.labels[::3]  # a third is plenty for a least-squares head
    feats = []
    hook = net.fc.register_forward_pre_hook(lambda _m, args: feats.append(args[0].detach().numpy()))
    with torch.no_grad():
        net(torch.from_numpy((data.images - mean) / std))
    hook.remove()
    w, b = lstsq_head(feats[0].astype(np.float64), data.labels)
    with torch.no_grad():
        net.fc.weight.copy_(torch.from_numpy(w.T))
        net.fc.bias.copy_(torch.from_numpy(b))
    return net


def test_torchvision_resnet_torchscript_export_normalisation_outside(tmp_path, folders, digits_test):
    import torch

    clean, fresh = folders
    size, mean, std = 16, 0.45, 0.25
    net = _tiny_resnet(size, clean, mean, std)
    src = tmp_path / "resnet.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.rand(1, 3, size, size),), str(src), dynamo=False, input_names=["pixels"],
                          output_names=["scores"], opset_version=17)
    runner = CliRunner()
    res = runner.invoke(main, ["adopt", str(src), "-o", str(tmp_path / "g.onnx"), "--mean", f"{mean},{mean},{mean}",
                               "--std", f"{std},{std},{std}", "--classes", ",".join(map(str, range(10))),
                               "--check-data", str(fresh)])
    assert res.exit_code == 0, res.output
    assert isinstance(ort.InferenceSession(str(tmp_path / "g.onnx")).get_inputs()[0].shape[0], str)  # was fixed: 1
    meta = read_metadata(tmp_path / "g.onnx")
    assert meta["normalization"] == {"mean": [mean] * 3, "std": [std] * 3, "applied": "runtime"}
    assert meta["output_activation"] == "none" and meta["taps"]["penultimate"]["tensor"].endswith("Flatten_output_0")

    # the runtime applies the normalisation the graph leaves out: logits equal torch on normalised input
    model = OnnxModel(tmp_path / "g.onnx")
    x = np.random.default_rng(1).random((5, 3, size, size), dtype=np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy((x - mean) / std)).numpy()
    np.testing.assert_allclose(model.run(x, ["logits"])["logits"], want, atol=1e-4)
    assert model.dense_head("penultimate")[0]["weight"].shape == (10, 512)  # the Gemm head stays one chain

    manifest = guard_from_folder(runner, tmp_path / "g.onnx", clean, tmp_path / "b.guard")
    rate, acc, n = scan_rate(runner, tmp_path / "b.guard", fresh, tmp_path / "v.jsonl")
    assert acc > 0.8  # 8x8 PNGs resized to 16x16 RGB and normalised: the model sees what it was fitted on
    assert_fpr_in_ci(manifest, rate, n)


@pytest.mark.parametrize("zipmap", [False, True])
def test_skl2onnx_mlp(tmp_path, folders, digits_train, zipmap):
    from skl2onnx import to_onnx
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    clean, fresh = folders
    x = digits_train.images.reshape(len(digits_train.images), -1).astype(np.float32) * np.float32(16 / 255)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier(hidden_layer_sizes=(32,), max_iter=80, random_state=0).fit(x, digits_train.labels)
    onx = to_onnx(clf, x[:1], options={id(clf): {"zipmap": zipmap}}, target_opset=17)
    src = tmp_path / "mlp.onnx"
    src.write_bytes(onx.SerializeToString())

    runner = CliRunner()
    res = runner.invoke(main, ["adopt", str(src), "-o", str(tmp_path / "g.onnx")])
    assert res.exit_code == 4 and "--input-shape" in res.output  # a flat input does not say its image size
    res = runner.invoke(main, ["adopt", str(src), "-o", str(tmp_path / "g.onnx"), "--input-shape", "1,8,8",
                               "--input-range", "0,16", "--check-data", str(fresh)])
    assert res.exit_code == 0, res.output
    meta = read_metadata(tmp_path / "g.onnx")
    assert meta["input_layout"] == "flat" and meta["input_range"] == [0.0, 16.0]
    assert meta["class_names"] == [str(i) for i in range(10)]
    assert meta["model_outputs"] == (["output_label", "output_probability"] if zipmap else ["label", "probabilities"])

    # the original outputs (ZipMap dictionaries included) are what the adopted file returns
    sess_o, sess_n = ort.InferenceSession(str(src)), ort.InferenceSession(str(tmp_path / "g.onnx"))
    a, b = sess_o.run(None, {"X": x[:6]}), sess_n.run(meta["model_outputs"], {"X": x[:6]})
    np.testing.assert_array_equal(a[0], b[0])
    if zipmap:
        assert [d.keys() for d in a[1]] == [d.keys() for d in b[1]]
        np.testing.assert_allclose([list(d.values()) for d in a[1]], [list(d.values()) for d in b[1]], atol=TOL)
    else:
        np.testing.assert_allclose(a[1], b[1], atol=TOL)
    # sklearn's own prediction is what the guard's logits argmax says
    logits = OnnxModel(tmp_path / "g.onnx").run(x[:50].reshape(-1, 1, 8, 8) / np.float32(16), ["logits"])["logits"]
    np.testing.assert_array_equal(logits.argmax(1), clf.predict(x[:50]))

    manifest = guard_from_folder(runner, tmp_path / "g.onnx", clean, tmp_path / "b.guard")
    rate, acc, n = scan_rate(runner, tmp_path / "b.guard", fresh, tmp_path / "v.jsonl")
    assert acc > 0.85
    assert_fpr_in_ci(manifest, rate, n)


# ------------------------------------------------------------------------------------------------ behaviour


def test_fixed_batch_kept_when_the_graph_bakes_it_in(tmp_path, digits_train, digits_test):
    src = build_nhwc_uint8_softmax(tmp_path / "f.onnx", digits_train.images, digits_train.labels, batch=2,
                                   flat_shape=(2, 64))
    rep = adopt(src, tmp_path / "g.onnx")
    assert rep.metadata["fixed_batch"] == 2 and rep.batch.startswith("fixed at 2")
    model = OnnxModel(tmp_path / "g.onnx", batch_size=4)
    x = digits_test.images[:5].transpose(0, 3, 1, 2).astype(np.float32) / 255  # 5: the last chunk is padded
    got = model.run(x, ["logits"])["logits"]
    orig = ort.InferenceSession(str(src))
    u8 = digits_test.images[:6]
    want = np.concatenate([orig.run(None, {"image": u8[i : i + 2]})[0] for i in (0, 2, 4)])[:5]
    np.testing.assert_allclose(np.exp(got) / np.exp(got).sum(1, keepdims=True), want, atol=1e-5)


def test_refuses_what_is_not_a_classifier(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((64, 1), np.float32), "W")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"]),
                           helper.make_node("Squeeze", ["y"], ["score"])], "regressor",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                          [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "r.onnx"))
    with pytest.raises(AdoptError, match="no 2-D float output"):
        adopt(tmp_path / "r.onnx", tmp_path / "out.onnx", input_shape=(1, 8, 8))
    res = CliRunner().invoke(main, ["adopt", str(tmp_path / "r.onnx"), "-o", str(tmp_path / "out.onnx"),
                                    "--input-shape", "1,8,8"])
    assert res.exit_code == 4 and "not a classifier" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "out.onnx").exists()


def test_taps_by_node_name_list_taps_and_refusals(tmp_path, digits_train):
    src = build_nhwc_uint8_softmax(tmp_path / "f.onnx", digits_train.images, digits_train.labels, batch="N")
    cands = {c.tensor: c for c in list_taps(src)}
    assert cands["feat"].role == "penultimate" and cands["zb"].role == "logits" and cands["h"].shape[-1] == 48
    rep = adopt(src, tmp_path / "g.onnx", taps={"hidden": "dense1", "pre": "hb"})  # a node name and a tensor
    assert rep.taps == {"penultimate": "feat", "hidden": "h", "pre": "hb"} and rep.batch == "dynamic"
    model = OnnxModel(tmp_path / "g.onnx")
    assert model.tap_names == ["penultimate", "hidden", "pre"] and model.model_outputs == ["probs"]
    out = model.run(np.zeros((3, 1, 8, 8), np.float32))
    assert out["hidden"].shape == (3, 48) and np.allclose(np.maximum(out["pre"], 0), out["penultimate"])
    with pytest.raises(FileExistsError):
        adopt(src, tmp_path / "g.onnx")
    with pytest.raises(AdoptError, match="no tensor or node named"):
        adopt(src, tmp_path / "h.onnx", taps={"x": "nope"})
    with pytest.raises(AdoptError, match="already carries abl-guard metadata"):
        adopt(tmp_path / "g.onnx", tmp_path / "h.onnx")
    with pytest.raises(AdoptError, match="class names"):
        adopt(src, tmp_path / "h.onnx", class_names=["a", "b"])
    res = CliRunner().invoke(main, ["adopt", str(src), "--list-taps"])
    assert res.exit_code == 0 and "feat" in res.output and "<- penultimate" in res.output
