"""The serving path never imports torch: adopt, calibrate --data, scan and report run in a fresh interpreter that
checks ``sys.modules`` afterwards; a command that needs torch names the extra to install (exit 7) when torch is
missing; ``import abl_guard.guard`` loads nothing heavy (scipy.stats, onnxruntime) until a name is used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

TRAIN_MODULES = ("torch", "torchvision", "onnxscript")

#: runs the CLI in-process and exits 99 when a torch module got imported; argv[1] == "block" hides torch entirely
WRAPPER = """
import os, sys
class Block:  # importing torch raises ModuleNotFoundError, as on a serving install
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "onnxscript"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
if sys.argv[1] == "block":
    sys.meta_path.insert(0, Block())
from abl_guard.cli import main
code = 0
try:
    main(sys.argv[2:], prog_name="abl-guard")
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else 1
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "onnxscript"))
if loaded:
    print("TORCH IMPORTED:", loaded[:5], file=sys.stderr)
    code = 99
sys.stdout.flush(); sys.stderr.flush()
os._exit(code)
"""


def cli(*args: str, block: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", WRAPPER, "block" if block else "watch", *args],
                          capture_output=True, text=True, timeout=300, env=env)


def build_foreign(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """float NCHW (N, 1, 8, 8) in [0, 1] -> Flatten -> Gemm+Relu -> Gemm ``scores`` (no Softmax), no metadata."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    x = images.reshape(len(images), -1).astype(np.float32) / 255
    w1 = rng.normal(0, 1 / 8, (40, 64)).astype(np.float32)
    b1 = rng.normal(0, 0.1, 40).astype(np.float32)
    hb = np.c_[np.maximum(x @ w1.T + b1, 0), np.ones(len(x))]
    sol = np.linalg.solve(hb.T @ hb + 1e-2 * np.eye(41), hb.T @ np.eye(10)[labels]) * 5
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "W1"), (b1, "B1"),
                                                         (sol[:-1].T.astype(np.float32), "W2"),
                                                         (sol[-1].astype(np.float32), "B2"))]
    nodes = [helper.make_node("Flatten", ["pixels"], ["flat"], axis=1),
             helper.make_node("Gemm", ["flat", "W1", "B1"], ["h"], transB=1),
             helper.make_node("Relu", ["h"], ["feat"]),
             helper.make_node("Gemm", ["feat", "W2", "B2"], ["scores"], transB=1)]
    graph = helper.make_graph(nodes, "gemm-mlp",
                              [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _folder(root: Path, images: np.ndarray, labels: np.ndarray | None) -> Path:
    from PIL import Image

    for i, img in enumerate(images):
        d = root / str(int(labels[i])) if labels is not None else root
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[..., 0]).save(d / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def served(tmp_path_factory, digits_train, digits_test) -> Path:
    d = tmp_path_factory.mktemp("serving")
    build_foreign(d / "model.onnx", digits_train.images, digits_train.labels)
    _folder(d / "clean", digits_train.images[:800], digits_train.labels[:800])
    _folder(d / "fresh", digits_test.images[:60], None)  # no labels: scan does not need them
    return d


def test_adopt_calibrate_scan_report_never_import_torch(served):
    d = served
    r = cli("adopt", str(d / "model.onnx"), "-o", str(d / "g.onnx"), "--check-data", str(d / "fresh"))
    assert r.returncode == 0, r.stderr
    r = cli("calibrate", str(d / "g.onnx"), "--data", str(d / "clean"), "--fpr", "0.05", "--fractions",
            "0.4,0.4,0.2", "-o", str(d / "b.guard"), block=True)
    assert r.returncode == 0, r.stderr
    assert "clean accuracy" in r.stdout and "n/a" not in r.stdout  # labels came from the class folders
    r = cli("scan", str(d / "b.guard"), str(d / "fresh"), "-o", str(d / "v.jsonl"))
    assert r.returncode == 0, r.stderr
    assert len((d / "v.jsonl").read_text().splitlines()) == 60
    r = cli("report", str(d / "v.jsonl"), "-o", str(d / "r.html"), "--bundle", str(d / "b.guard"), block=True)
    assert r.returncode == 0, r.stderr  # block=True: works with torch absent altogether


def test_calibrate_with_predicted_labels_says_so(served):
    d = served
    if not (d / "g.onnx").exists():
        assert cli("adopt", str(d / "model.onnx"), "-o", str(d / "g.onnx")).returncode == 0
    r = cli("calibrate", str(d / "g.onnx"), "--data", str(d / "clean"), "--labels", "predicted", "--fpr", "0.05",
            "--fractions", "0.4,0.4,0.2", "-o", str(d / "p.guard"), block=True)
    assert r.returncode == 0, r.stderr
    assert "clean accuracy n/a (predicted labels)" in r.stdout
    man = json.loads((d / "p.guard" / "manifest.json").read_text())
    assert man["provenance"]["calibration_data"]["predicted_labels"] == man["calibration"]["split"]["fit"] + \
        man["calibration"]["split"]["calibration"] + man["calibration"]["split"]["validation"]


def test_commands_needing_torch_name_the_extra(tmp_path):
    r = cli("poison", "--attack", "badnets", "--dataset", "digits", "--limit", "20", "-o", str(tmp_path / "p.npz"),
            block=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 7, r.stderr
    assert "pip install 'abl-guard[train]'" in lines[-1] and "Traceback" not in r.stderr


def test_importing_the_guard_is_lazy():
    code = ("import sys, abl_guard.guard, abl_guard.export\n"
            "heavy = [m for m in ('scipy.stats', 'onnx', 'torch', 'sklearn') if m in sys.modules]\n"
            "print(','.join(heavy))\n"
            "from abl_guard.guard import Guard, GuardedSession\n"
            "print('scipy.stats' in sys.modules, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.rstrip("\n").split("\n")
    assert first == "" and second == "False False"
