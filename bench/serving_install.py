"""Measure a serving-only install: a fresh venv without torch, ``pip install .`` (the core distribution), its size on
disk, its startup times, and adopt + calibrate + scan run inside it on a foreign ONNX classifier.

Usage::

    python bench/serving_install.py [--venv DIR] [--keep] [--out bench/results/serving_install] [--render]

Writes ``OUT.md`` and ``OUT.json``. The foreign model is built inside the serving venv with ``onnx.helper`` (NHWC
uint8 input, Softmax output, a least-squares head on scikit-learn's 8x8 digits), so the run needs nothing the core
install does not bring. Needs network access to a package index (or the local wheel cache pip is configured with).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name, write_markdown_keeping_notes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench/results/serving_install"

#: run by the serving venv's python in a work directory: a foreign model, clean and fresh PNG folders
SETUP = r'''
import numpy as np, onnx
from pathlib import Path
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from sklearn.datasets import load_digits

d = load_digits()
images = np.clip(np.rint(d.images * 255 / 16), 0, 255).astype(np.uint8)
labels = d.target
for name, idx in (("clean", range(0, 1400)), ("fresh", range(1400, len(labels)))):
    for i in idx:
        p = Path(name) / str(labels[i])
        p.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(p / f"{i}.png")
rng = np.random.default_rng(0)
x = images[:1400].reshape(1400, -1).astype(np.float32) / 255
w1 = rng.normal(0, 1 / 8, (64, 48)).astype(np.float32)
b1 = rng.normal(0, 0.1, 48).astype(np.float32)
hb = np.c_[np.maximum(x @ w1 + b1, 0), np.ones(1400)]
sol = np.linalg.solve(hb.T @ hb + 1e-2 * np.eye(49), hb.T @ np.eye(10)[labels[:1400]]) * 5
consts = {"scale": np.float32(1 / 255), "shape": np.array([-1, 64], np.int64), "W1": w1, "B1": b1,
          "W2": sol[:-1].astype(np.float32), "B2": sol[-1].astype(np.float32)}
nodes = [helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["f", "scale"], ["s"]), helper.make_node("Reshape", ["s", "shape"], ["flat"]),
         helper.make_node("MatMul", ["flat", "W1"], ["h"]), helper.make_node("Add", ["h", "B1"], ["hb"]),
         helper.make_node("Relu", ["hb"], ["feat"]), helper.make_node("MatMul", ["feat", "W2"], ["z"]),
         helper.make_node("Add", ["z", "B2"], ["zb"]), helper.make_node("Softmax", ["zb"], ["probs"], axis=1)]
g = helper.make_graph(nodes, "foreign", [helper.make_tensor_value_info("image", TensorProto.UINT8, [1, 8, 8, 1])],
                      [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 10])],
                      [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
m.ir_version = 8
onnx.save(m, "foreign.onnx")
'''


def run(cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> tuple[float, str]:
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return time.perf_counter() - t, r.stdout or r.stderr  # the result line: stdout (scan's summary: stderr)


def du(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            p = Path(root) / f
            if not p.is_symlink():
                total += p.stat().st_size
    return total


def best_of(cmd: list[str], env: dict, n: int = 3) -> float:
    return min(run(cmd, env=env)[0] for _ in range(n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", type=Path, default=None, help="Where to create the venv (default: a temporary dir).")
    ap.add_argument("--keep", action="store_true", help="Keep the venv and the work directory.")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--render", action="store_true", help="Only re-render OUT.md from OUT.json.")
    args = ap.parse_args()
    if args.render:
        print(render(json.loads(args.out.with_suffix(".json").read_text()), args.out))
        return

    tmp = Path(tempfile.mkdtemp(prefix="abl-guard-serving-"))
    venv = args.venv or tmp / "venv"
    work = tmp / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    try:
        t_venv, _ = run([sys.executable, "-m", "venv", str(venv)])
        py, cli = venv / "bin/python", venv / "bin/abl-guard"
        base = du(venv)
        src = tmp / "src"  # build from a copy: setuptools writes build/ and *.egg-info beside the sources
        _, files = run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO)
        for rel in files.splitlines():
            if (REPO / rel).is_file():
                (src / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / rel, src / rel)
        t_pip, _ = run([str(py), "-m", "pip", "install", "-q", "--no-cache-dir", str(src)], env=env)
        size = du(venv)
        _, freeze = run([str(py), "-m", "pip", "list", "--format=json"], env=env)
        packages = {p["name"].lower(): p["version"] for p in json.loads(freeze[freeze.index("["):])}
        no_torch = not any(p in packages for p in ("torch", "torchvision", "onnxscript"))
        site = next((venv / "lib").glob("python*/site-packages"))
        biggest = sorted(((du(p), p.name) for p in site.iterdir() if p.is_dir()), reverse=True)[:8]

        run([str(py), "-c", SETUP], cwd=work, env=env)
        steps = {}
        steps["adopt"], out_adopt = run([str(cli), "adopt", "foreign.onnx", "-o", "guarded.onnx", "--check-data",
                                         "fresh"], cwd=work, env=env)
        steps["calibrate"], out_cal = run([str(cli), "calibrate", "guarded.onnx", "--data", "clean", "--fpr", "0.05",
                                           "-o", "guard.bundle"], cwd=work, env=env)
        steps["scan"], out_scan = run([str(cli), "scan", "guard.bundle", "fresh", "-o", "verdicts.jsonl"], cwd=work,
                                      env=env)
        recs = [json.loads(line) for line in (work / "verdicts.jsonl").read_text().splitlines()]
        manifest = json.loads((work / "guard.bundle/manifest.json").read_text())
        flagged = sum(bool(r.get("flagged")) for r in recs)
        startup = {"import abl_guard.guard": best_of([str(py), "-c", "import abl_guard.guard"], env),
                   "abl-guard --help": best_of([str(cli), "--help"], env),
                   "python -c pass": best_of([str(py), "-c", "pass"], env)}
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    val = manifest["calibration"]["validation"]
    result = {
        "command": "python bench/serving_install.py" + (f" --out {args.out}" if args.out != DEFAULT_OUT else ""),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
        "venv_bytes": size, "venv_bytes_empty": base, "install_seconds": round(t_pip, 1),
        "torch_free": no_torch, "packages": packages,
        "largest_site_packages": [{"name": n, "bytes": b} for b, n in biggest],
        "steps_seconds": {k: round(v, 2) for k, v in steps.items()},
        "startup_seconds": {k: round(v, 3) for k, v in startup.items()},
        "scan": {"inputs": len(recs), "flagged": flagged, "rate": flagged / max(len(recs), 1)},
        "validation": {"rate": val["rate"], "ci95": val["ci95"], "n": val["n"]},
        "outputs": {"adopt": out_adopt.strip().splitlines()[0], "calibrate": out_cal.strip().splitlines()[0],
                    "scan": out_scan.strip().splitlines()[0]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(render(result, args.out))


def render(result: dict, out: Path) -> str:
    """Write ``OUT.md`` from the measured ``result`` (notes below the notes mark survive); returns the text."""
    mb = 1 << 20
    size, base = result["venv_bytes"], result["venv_bytes_empty"]
    steps, startup, val = result["steps_seconds"], result["startup_seconds"], result["validation"]
    scan = result["scan"]
    rows = "\n".join(f"| {d['name']} | {d['bytes'] / mb:.0f} |" for d in result["largest_site_packages"])
    md = f"""`{result.get('command', 'python bench/serving_install.py')}`

# Serving-only install (no torch)

A fresh venv, `pip install .` (the core distribution, no extras), then adopt, calibrate and scan inside it on a foreign
ONNX classifier (onnx.helper: NHWC uint8 in, Softmax out; 8x8 digits as PNG folders). Machine:
{result['machine']['cpu']}, {result['machine']['cores']} cores (shared), Python {result['machine']['python']}.

| | |
|---|---|
| venv size on disk | **{size / mb:.0f} MB** (an empty venv: {base / mb:.0f} MB) |
| torch / torchvision / onnxscript installed | {'no' if result['torch_free'] else 'YES'} |
| `pip install .` | {result['install_seconds']:.0f} s |
| adopt / calibrate / scan (each a fresh process) | {steps['adopt']:.1f} s / {steps['calibrate']:.1f} s / \
{steps['scan']:.1f} s |
| `import abl_guard.guard` / `abl-guard --help` (best of 3; bare `python -c pass`) | \
{startup['import abl_guard.guard']:.2f} s / {startup['abl-guard --help']:.2f} s ({startup['python -c pass']:.2f} s) |
| scan of {scan['inputs']} fresh clean digits | {scan['flagged']} flagged ({scan['rate']:.1%}); calibrated \
validation FPR {val['rate']:.1%} (95% CI {val['ci95'][0]:.1%}-{val['ci95'][1]:.1%}, n = {val['n']}) |

Largest installed packages (MB):

| package | MB |
|---|---|
{rows}

Output lines:

```
{result['outputs']['adopt']}
{result['outputs']['calibrate']}
{result['outputs']['scan']}
```
"""
    write_markdown_keeping_notes(out.with_suffix(".md"), md)
    return md


if __name__ == "__main__":
    main()
