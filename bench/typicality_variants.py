"""Why ``typicality`` is one Gaussian over the tiles and scores their mean distance (issue 16's input lens).

Nalisnick et al. (arXiv 1906.02994) test typicality because a good density model gives some out-of-distribution
inputs *more* likelihood than its own data. This script measures, model-free on Fashion-MNIST, how the choice of
density and of per-input statistic moves each far-OOD set's two-sided conformal p-value (the guard's, with its
exponential tails) against 1,000 clean test images, the density fitted on 10,000 training images:

* densities over the same 7x7 tiles: the detector's Gaussian, and Gaussian mixtures with 8 and 32 full-covariance
  components (scikit-learn, ``reg_covar`` 1e-4, fitted on 100,000 of the tiles) — closer to a deep density;
* statistics of an input's tile distances under the Gaussian: the mean (the detector's), the mean log, the median,
  the mean square root.

The OOD sets are ``bench/detect_converged.py``'s (``ood_sets``), built from other test images. Run:

    .venv/bin/python bench/typicality_variants.py --out bench/results/typicality_variants
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _common import cpu_name, write_results
from detect_converged import ood_sets

from abl_guard.abl.data import load_fashion_mnist
from abl_guard.detectors.typicality import PatchTypicality, image_patches
from abl_guard.guard.calibration import conformal_pvalues

FPR = 0.01


def nchw(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).transpose(0, 3, 1, 2).astype(np.float32) / 255.0


def variants(fit: np.ndarray, components: list[int], seed: int) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Score functions (higher = farther from the data's typical set is *not* implied: the test is two-sided)."""
    g = PatchTypicality(seed=seed).fit({"input": nchw(fit)})

    def dist(x: np.ndarray) -> np.ndarray:
        return g.tile_distances({"input": nchw(x)})

    def tiles(x: np.ndarray) -> np.ndarray:
        return image_patches(g.crop(nchw(x)), g.patch).astype(np.float64)

    out: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "gaussian, mean distance (the detector)": lambda x: dist(x).mean(1),
        "gaussian, mean log(1 + distance)": lambda x: np.log1p(dist(x)).mean(1),
        "gaussian, median distance": lambda x: np.median(dist(x), 1),
        "gaussian, mean sqrt(distance)": lambda x: np.sqrt(dist(x)).mean(1),
    }
    from sklearn.mixture import GaussianMixture

    sample = g.reference_tiles({"input": nchw(fit)})
    sample = sample[np.random.default_rng(seed).permutation(len(sample))[:100_000]]
    for k in components:
        t0 = time.perf_counter()
        gm = GaussianMixture(k, covariance_type="full", reg_covar=1e-4, random_state=seed, max_iter=100).fit(sample)
        print(f"mixture of {k} fitted in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

        def nll(x: np.ndarray, gm: Any = gm) -> np.ndarray:
            t = tiles(x)
            n, m, d = t.shape
            return -gm.score_samples(t.reshape(-1, d)).reshape(n, m).mean(1)
        out[f"mixture of {k} gaussians, mean -log-likelihood"] = nll
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parent.parent / ".data" / "fashion-mnist"))
    ap.add_argument("--components", default="8,32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "typicality_variants"))
    args = ap.parse_args()
    train, test = load_fashion_mnist("train", args.data).images, load_fashion_mnist("test", args.data).images
    rng = np.random.default_rng(args.seed)
    fit = train[rng.choice(len(train), 10_000, replace=False)]
    perm = rng.permutation(len(test))
    cal = test[perm[:1000]]
    sets = {"clean (other test images)": test[perm[1000:2000]], **ood_sets(test[perm[2000:]], 1000, args.seed)}
    rows: dict[str, Any] = {}
    for name, f in variants(fit, [int(k) for k in args.components.split(",") if k], args.seed).items():
        ref = f(cal)
        rows[name] = {}
        for s, x in sets.items():
            p, tail = conformal_pvalues(ref, f(x), two_sided=True, tails=True)
            rows[name][s] = {"flagged": float((p <= FPR).mean()), "median_p": float(np.median(p)),
                             "p90": float(np.quantile(p, 0.9)), "low_tail": float(np.mean(tail == "low"))}
    record = {"command": "python bench/typicality_variants.py " + " ".join(sys.argv[1:]), "cpu": cpu_name(),
              "fpr": FPR, "rows": rows}
    write_results(args.out, record, render(record), keep_notes=True)


def render(r: dict[str, Any]) -> str:
    sets = list(next(iter(r["rows"].values())))
    lines = ["# typicality: density and statistic", "", f"`{r['command']}` — {r['cpu']}", "",
             "Two-sided conformal p-values against 1,000 clean Fashion-MNIST test images (exponential tails beyond "
             "the range); flagged at p <= 0.01, the median p-value and its 90% quantile (of 1,000 inputs; 256 "
             "constant images), and the share whose low tail fired. A density fitted on 10,000 training images.", ""]
    lines.append("| variant | " + " | ".join(sets) + " |")
    lines.append("|---|" + "---|" * len(sets))
    for name, row in r["rows"].items():
        cells = [f"{100 * v['flagged']:.1f}% (p {v['median_p']:.1e} / {v['p90']:.1e}, low {100 * v['low_tail']:.0f}%)"
                 for v in row.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
