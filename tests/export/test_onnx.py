import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from abl_guard.abl.models import build_model
from abl_guard.cli import main
from abl_guard.export import ParityError, default_penultimate, export_onnx, read_metadata


def _small():
    torch.manual_seed(0)
    return build_model("small-cnn", 1, 10, 8, [0.3], [0.4]).eval()


def test_export_outputs_dynamic_batch_and_metadata(tmp_path):
    m = _small()
    rep = export_onnx(m, tmp_path / "m.onnx", input_shape=(1, 8, 8), taps=m.TAPS, class_names=list("abcdefghij"),
                      mean=[0.3], std=[0.4], extra_metadata={"source_checkpoint_sha256": "0" * 64})
    assert rep.outputs == ["logits", *m.TAPS] and max(rep.parity.values()) < 1e-4
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"))
    assert [o.name for o in sess.get_outputs()] == rep.outputs and sess.get_inputs()[0].name == "input"
    for n in (1, 5, 33):  # dynamic batch axis
        out = sess.run(None, {"input": np.random.default_rng(n).random((n, 1, 8, 8), dtype=np.float32)})
        assert out[0].shape == (n, 10)
    meta = read_metadata(tmp_path / "m.onnx")
    assert meta["class_names"] == list("abcdefghij") and meta["normalization"]["mean"] == [0.3]
    assert meta["taps"]["penultimate"]["module"] == "fc:in" and meta["source_checkpoint_sha256"] == "0" * 64


def test_parity_failure_is_loud(tmp_path):
    m = _small()
    with pytest.raises(ParityError):
        export_onnx(m, tmp_path / "m.onnx", input_shape=(1, 8, 8), taps={"penultimate": "fc:in"},
                    class_names=list("abcdefghij"), mean=[0.3], std=[0.4], atol=-1.0)


def test_bad_tap_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no module 'nope'"):
        export_onnx(_small(), tmp_path / "m.onnx", input_shape=(1, 8, 8), taps={"x": "nope"},
                    class_names=list("abcdefghij"), mean=[0.3], std=[0.4])


def test_cli_exports_a_foreign_torchvision_model(tmp_path):
    import torchvision

    net = torchvision.models.resnet18(num_classes=4).eval()
    assert default_penultimate(net) == "fc:in"
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    res = CliRunner().invoke(main, ["-q", "export", str(tmp_path / "sd.pt"), "-o", str(tmp_path / "r.onnx"),
                                    "--arch", "resnet18", "--num-classes", "4", "--input-shape", "3,32,32",
                                    "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--tap", "layer3",
                                    "--class-names", "a,b,c,d"])
    assert res.exit_code == 0, res.output
    meta = read_metadata(tmp_path / "r.onnx")
    assert meta["outputs"] == ["logits", "layer3", "penultimate"] and meta["arch"] == "resnet18"
    sess = ort.InferenceSession(str(tmp_path / "r.onnx"))
    x = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    logits = sess.run(["logits"], {"input": x})[0]
    with torch.no_grad():
        want = net((torch.from_numpy(x) - 0.5) / 0.25).numpy()
    assert np.abs(logits - want).max() < 1e-4


def test_cli_rejects_non_checkpoint(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "sd.pt")
    res = CliRunner().invoke(main, ["export", str(tmp_path / "sd.pt"), "-o", str(tmp_path / "m.onnx")])
    assert res.exit_code != 0 and "not an abl-guard checkpoint" in res.output
