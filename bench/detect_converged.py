"""Detectors and guards on a *converged* model: backdoor, adversarial (uint8) and out-of-distribution inputs.

Fashion-MNIST, the small CNN trained on all 60,000 training images (poisoned by the attack at rate 0.1, target 0;
SGD lr 0.05, divided by 10 at epochs 5 and 8, 9 epochs), so that its clean accuracy is ~90% rather than the 64-74% of
``bench/detect.py``'s two-epoch models. The test set is split (seeded) into fit 2,000 / calibration 1,000 /
validation 1,000 / evaluation (negatives) 1,000 and a source part for the positives:

* triggered: non-target source images with the trigger on which the backdoor fires;
* adversarial, against the same model, on correctly classified source images, *quantised to uint8* (what a deployed
  guard sees) and kept only when still successful: FGSM and PGD-L∞ (eps 0.1), PGD-L2 (eps 1.5, 20 steps), CW-L2 with
  kappa 0 and kappa 5 (the margin survives rounding);
* out-of-distribution: scikit-learn's 8x8 digits upscaled to 28x28, uniform noise, Fashion-MNIST with heavy Gaussian
  noise (sd 0.4), inverted Fashion-MNIST, constant images.

Every detector is fitted on the fit split; single rows are ranked as in ``bench/detect.py``. Guard rows combine
detectors the way the guard does (``guard.calibration.Calibrator``: conformal p-values with or without the
exponential tails, a combination, the threshold for 1% FPR from leave-one-out calibration p-values) and also report
the share of each set flagged *at the guard's own threshold*. The stream alarms run on clean, shifted and backdoor
streams.

With ``--adaptive 0,1,10`` an adaptive attacker (issue 16 item 6) runs too: white-box PGD at the same budgets whose
objective also lowers the attacked detectors' own scores, re-implemented in torch from their fitted state
(:class:`TorchGuardScore`, checked against the numpy scores), one set per attacked detector set, norm and weight.
Two clean-data-only re-weightings of Fisher's combination (:func:`fusion_rows`) and the worst AUROC per attack family
(how ``calibrate``'s default set is chosen) are reported as well. Run:

    .venv/bin/python bench/detect_converged.py [--attacks badnets,blend] [--work DIR] [--adaptive 0,1,10]

Trained models are cached in ``--work`` and reused when their configuration matches. Writes
bench/results/detect_converged.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import cpu_name, write_markdown_keeping_notes
from detect import DETECTORS, export, metrics, rank_scores, train_cached, triggered_successes

from abl_guard.abl.data import load_dataset, pad_to
from abl_guard.abl.experiment import ExperimentConfig
from abl_guard.abl.models import model_taps
from abl_guard.abl.train import TrainConfig
from abl_guard.attacks import make_attack
from abl_guard.attacks.adversarial import predict, quantize, run_attack
from abl_guard.detectors import make_detector
from abl_guard.guard.calibration import Calibrator, alarm_null, stream_alarms
from abl_guard.guard.model import OnnxModel
from abl_guard.guard.preprocess import to_model_input
from abl_guard.guard.runtime import needed_outputs, observe

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.detect_converged")

#: detect.py's rows plus squeezer variants: Xu et al.'s 1-bit setting is for near-binary MNIST digits
ROWS = DETECTORS + [("squeeze (4-bit)", "squeeze", {"bits": 4}, "sensitivity"),
                    ("squeeze (median only)", "squeeze", {"bits": 0}, "sensitivity"),
                    # Roth et al.'s noise log-odds: the default (one Gaussian setting, 16 draws) and the paper's nine
                    # noise settings (8 draws each here rather than 256, to keep the run in minutes)
                    ("odds", "odds", {}, "sensitivity"),
                    ("odds (paper noise, 8 draws)", "odds", {"noise": "paper", "n_samples": 8}, "sensitivity"),
                    # Sun et al.'s k-NN one layer earlier: the pooled last conv block
                    # (by position, so the row exists on any model: the small CNN's "pool", WRN's block3)
                    ("knn (pool)", "knn", {"tap": "@-2"}, "feature"),
                    # Sastry & Oore's Gram-matrix deviations: the default (first-order Gram) and the paper's 10 orders
                    ("gram", "gram", {}, "activation"),
                    ("gram (paper powers)", "gram", {"powers": 10}, "activation"),
                    # Lee et al.'s Mahalanobis at the model's first tap (an early conv block, by position)
                    ("mahalanobis (first tap)", "mahalanobis", {"tap": "@0"}, "feature"),
                    # Papernot & McDaniel's deep k-NN: label agreement of the neighbours at every tap and the logits
                    # (conv taps pooled, the default; flattened as in the paper)
                    ("dknn", "dknn", {}, "feature"),
                    ("dknn (flattened as in the paper)", "dknn", {"pool": False}, "feature"),
                    # the paper's k = 75 is 0.1% of its 60,000-image bank; the guard's bank is the clean reference
                    # (2,000 here), so a proportionally smaller k as well
                    ("dknn (k=10)", "dknn", {"k": 10}, "feature"),
                    ("dknn (k=10) flattened", "dknn", {"k": 10, "pool": False}, "feature"),
                    # this project's early-layer probe: does a shrunk LDA on the first tap agree with the prediction?
                    ("probe", "probe", {}, "feature"),
                    ("probe (plain LDA)", "probe", {"shrinkage": 0.0}, "feature"),
                    ("probe (second tap)", "probe", {"tap": "@1"}, "feature"),
                    ("probe (Ledoit-Wolf shrinkage)", "probe", {"shrinkage": "auto"}, "feature"),
                    # what calibrate drops: the probe at the feature tap (a model adopted with only penultimate)
                    ("probe (feature tap)", "probe", {"tap": "@-1"}, "feature"),
                    # Nalisnick et al.'s typicality test on a Gaussian density of the pixels' patches (7x7, and 4x4)
                    ("typicality", "typicality", {}, "input"),
                    ("typicality (4x4 patches)", "typicality", {"patch": 4}, "input")]


#: the rows ``--extra-taps`` adds (all in the activation-space lens)
EXTRA_TAP_ROWS = ("gram (extra taps)", "gram (extra taps) (paper powers)")


def extra_tap_rows(taps: list[str] | None) -> list[tuple[str, str, dict[str, Any], str]]:
    """``--extra-taps``' rows: Gram deviations at exactly those modules (first order and the paper's ten orders), the
    paper's every-layer setting where the model's declared taps are only its block outputs; ``taps=None`` leaves the
    taps unset (the rows' kind and lens, for scripts that read saved scores)."""
    at = {} if taps is None else {"taps": list(taps)}
    return [(EXTRA_TAP_ROWS[0], "gram", at, "activation"),
            (EXTRA_TAP_ROWS[1], "gram", {**at, "powers": 10}, "activation")]


def two_sided(rows: list[tuple[str, str, dict[str, Any], str]]) -> dict[str, bool]:
    """Whether each row's detector is two-sided (its guard reads both tails)."""
    return {row: make_detector(kind, **params).two_sided for row, kind, params, _ in rows}


def export_with_taps(model: torch.nn.Module, spec: Any, path: Path, extra: list[str]) -> Path:
    """:func:`detect.export`, with ``extra`` modules exposed as taps of the same names after the declared ones (so
    positional taps such as ``@0`` still name the declared taps)."""
    declared = model_taps(model)
    return export(model, spec, path, {**declared, **{t: t for t in extra if t not in declared}})


def keep_rows(names: str) -> None:
    """``--rows``: keep only the named detector rows (the baselines always), the guards and fusion rows made of them
    only, and the adaptive attacker only when its targets remain. Changes :data:`ROWS`, :data:`GUARDS` and
    :data:`FUSION_STUDY` in place."""
    want = {n.strip() for n in names.split(",") if n.strip()}
    unknown = want - {r[0] for r in ROWS}
    if unknown:
        raise SystemExit(f"--rows: no detector row {sorted(unknown)}; rows are {[r[0] for r in ROWS]}")
    ROWS[:] = [r for r in ROWS if r[0] in want or r[3] == "baseline"]
    kept = {r[0] for r in ROWS}
    GUARDS[:] = [g for g in GUARDS if set(g[1]) <= kept]
    FUSION_STUDY[:] = [f for f in FUSION_STUDY if set(f[1]) <= kept]
    for rows in [r for r in ADAPTIVE_TARGETS if not set(r) <= kept]:
        del ADAPTIVE_TARGETS[rows]


def adapt_rows(taps: dict[str, str]) -> None:
    """Point rows that name the small CNN's ``pool`` tap at ``penultimate`` on a model without one (WRN / PreAct: their
    pooled features feed the classifier directly, so mutation there fuzzes the classifier as on the small CNN's
    pool it fuzzes both dense layers). Changes :data:`ROWS` in place; the record lists the taps used."""
    if "pool" in taps:
        return
    for i, (row, kind, params, lens) in enumerate(ROWS):
        if params.get("tap") == "pool":
            ROWS[i] = (row, kind, {**params, "tap": "penultimate"}, lens)


TRAIN = {"epochs": 9, "lr": 0.05, "lr_milestones": (5, 8)}
FPR = 0.01
#: the five-detector guard of issue 16, and one with every lens and STRIP
FIVE = ["mahalanobis", "nic", "knn", "mutation (σ=0.65)", "squeeze"]
ALL = FIVE + ["mahalanobis-layers", "strip"]
#: (row, members, combination, tails)
GUARDS: list[tuple[str, list[str], str, bool]] = [
    ("default guard (mahalanobis)", ["mahalanobis"], "hmp", True),
    ("five: fisher, no tails (old)", FIVE, "fisher", False),
    ("five: fisher", FIVE, "fisher", True),
    ("five: cauchy", FIVE, "cauchy", True),
    ("five: min-p", FIVE, "min-p", True),
    ("five: hmp", FIVE, "hmp", True),
    ("five: hmp, no tails", FIVE, "hmp", False),
    ("all + strip: hmp", ALL, "hmp", True),
    ("one pass: mahalanobis + layers + knn, hmp", ["mahalanobis", "mahalanobis-layers", "knn"], "hmp", True),
    ("one pass: mahalanobis + layers + knn, fisher", ["mahalanobis", "mahalanobis-layers", "knn"], "fisher", True),
    ("one pass: layers + knn, fisher", ["mahalanobis-layers", "knn"], "fisher", True),
    ("one pass: mahalanobis + knn, fisher", ["mahalanobis", "knn"], "fisher", True),
    ("one pass: layers + knn + nic, fisher", ["mahalanobis-layers", "knn", "nic"], "fisher", True),
    ("layers alone", ["mahalanobis-layers"], "fisher", True),
    ("mahalanobis + knn + odds, fisher", ["mahalanobis", "knn", "odds"], "fisher", True),
    ("layers + knn + odds, fisher", ["mahalanobis-layers", "knn", "odds"], "fisher", True),
    ("layers + knn + knn (pool), fisher", ["mahalanobis-layers", "knn", "knn (pool)"], "fisher", True),
    ("layers + knn + knn (pool) + odds, fisher", ["mahalanobis-layers", "knn", "knn (pool)", "odds"], "fisher", True),
    ("mahalanobis + knn + gram, fisher", ["mahalanobis", "knn", "gram"], "fisher", True),
    ("mahalanobis + knn + gram, hmp", ["mahalanobis", "knn", "gram"], "hmp", True),
    # the default with Sastry & Oore's ten Gram orders (fusion_study_gram_powers.md: closer to its best member)
    ("mahalanobis + knn + gram (paper powers), fisher", ["mahalanobis", "knn", "gram (paper powers)"], "fisher", True),
    ("layers + knn + gram, fisher", ["mahalanobis-layers", "knn", "gram"], "fisher", True),
    ("layers + knn + knn (pool) + odds + gram, fisher",
     ["mahalanobis-layers", "knn", "knn (pool)", "odds", "gram"], "fisher", True),
    ("mahalanobis + knn + gram + first tap, fisher",
     ["mahalanobis", "knn", "gram", "mahalanobis (first tap)"], "fisher", True),
    ("mahalanobis + knn + gram + first tap, hmp",
     ["mahalanobis", "knn", "gram", "mahalanobis (first tap)"], "hmp", True),
    ("mahalanobis + knn + gram + dknn, fisher", ["mahalanobis", "knn", "gram", "dknn"], "fisher", True),
    ("mahalanobis + knn + gram + dknn, hmp", ["mahalanobis", "knn", "gram", "dknn"], "hmp", True),
    # the logit lens in the guard: CW-L2 at kappa 0 lands just past the boundary, where max-softmax is low
    ("mahalanobis + knn + gram + msp, fisher", ["mahalanobis", "knn", "gram", "msp"], "fisher", True),
    ("mahalanobis + knn + gram + dknn (k=10) flattened, fisher",
     ["mahalanobis", "knn", "gram", "dknn (k=10) flattened"], "fisher", True),
    ("mahalanobis + knn + gram + first tap + dknn, fisher",
     ["mahalanobis", "knn", "gram", "mahalanobis (first tap)", "dknn"], "fisher", True),
    # the early-layer probe: the adversarial lens the others lack (CW-L2 at either kappa)
    ("mahalanobis + knn + gram + probe, fisher", ["mahalanobis", "knn", "gram", "probe"], "fisher", True),
    ("mahalanobis + knn + gram + probe, hmp", ["mahalanobis", "knn", "gram", "probe"], "hmp", True),
    ("mahalanobis + knn + gram + probe (Ledoit-Wolf), fisher",
     ["mahalanobis", "knn", "gram", "probe (Ledoit-Wolf shrinkage)"], "fisher", True),
    ("mahalanobis + knn + gram + probe (feature tap), fisher", ["mahalanobis", "knn", "gram", "probe (feature tap)"],
     "fisher", True),
    ("mahalanobis + knn + probe, fisher", ["mahalanobis", "knn", "probe"], "fisher", True),
    # the input lens beside the default: far out-of-distribution inputs the features place near a class
    ("mahalanobis + knn + gram + typicality, fisher", ["mahalanobis", "knn", "gram", "typicality"], "fisher", True),
    ("mahalanobis + knn + gram + typicality, hmp", ["mahalanobis", "knn", "gram", "typicality"], "hmp", True),
    ("mahalanobis + knn + gram + typicality, min-p", ["mahalanobis", "knn", "gram", "typicality"], "min-p", True),
    ("mahalanobis + knn + gram + probe + typicality, fisher",
     ["mahalanobis", "knn", "gram", "probe", "typicality"], "fisher", True),
    ("layers + knn + probe, fisher", ["mahalanobis-layers", "knn", "probe"], "fisher", True),
    ("layers + knn + gram + probe, fisher", ["mahalanobis-layers", "knn", "gram", "probe"], "fisher", True),
    ("mahalanobis + layers + knn + gram + probe, fisher",
     ["mahalanobis", "mahalanobis-layers", "knn", "gram", "probe"], "fisher", True),
    # the probe at the first two taps: the second tap's probe is the strongest member on CW-L2 at kappa 0
    ("mahalanobis + knn + gram + probe + probe (second tap), fisher",
     ["mahalanobis", "knn", "gram", "probe", "probe (second tap)"], "fisher", True),
    ("probe + probe (second tap), fisher", ["probe", "probe (second tap)"], "fisher", True),
    # Pan et al.'s adaptive test over Fisher's and min-p's statistics, each calibrated on the clean inputs
    ("mahalanobis + knn + gram, adaptive", ["mahalanobis", "knn", "gram"], "adaptive", True),
    ("mahalanobis + knn + gram + probe + probe (second tap), adaptive",
     ["mahalanobis", "knn", "gram", "probe", "probe (second tap)"], "adaptive", True),
]
#: fusion from clean data only (issue 16 item 3): member sets whose Fisher guard is re-weighted, see ``fusion_rows``
FUSION_STUDY: list[tuple[str, list[str]]] = [
    ("five", FIVE),
    ("layers + knn", ["mahalanobis-layers", "knn"]),
    ("mahalanobis + layers + knn", ["mahalanobis", "mahalanobis-layers", "knn"]),
    ("mahalanobis + knn + gram", ["mahalanobis", "knn", "gram"]),
    ("mahalanobis + knn + gram + probe", ["mahalanobis", "knn", "gram", "probe"]),
]
ADVERSARIAL: list[tuple[str, str, dict[str, Any], str]] = [
    ("fgsm eps=0.1", "fgsm", {"eps": 0.1}, "n_adv"),
    ("pgd-linf eps=0.1", "pgd", {"eps": 0.1, "steps": 20}, "n_adv"),
    ("pgd-l2 eps=1.5", "pgd", {"eps": 1.5, "steps": 20, "norm": "l2"}, "n_adv"),
    ("cw-l2 kappa=0", "cw", {"kappa": 0.0}, "n_cw"),
    ("cw-l2 kappa=5", "cw", {"kappa": 5.0}, "n_cw"),
]


def ood_sets(test_x: np.ndarray, n: int, seed: int) -> dict[str, np.ndarray]:
    """uint8 (N, H, W, 1) out-of-distribution sets, the size of ``test_x``, built from what ships here (no downloads).

    The digits are upscaled to the Fashion-MNIST image (28x28) and placed like it (zero-padded when the model's input
    is padded), so a padded model sees the same content as the small CNN does.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    size = test_x.shape[1]
    digits = load_digits().images[:n]  # 0..16, 8x8
    up = np.stack([np.asarray(Image.fromarray((d * 255 / 16).astype(np.uint8)).resize((28, 28), Image.BILINEAR))
                   for d in digits])[..., None]
    up = place_like_test(up, size)
    base = test_x[rng.choice(len(test_x), n, replace=False)].astype(np.float64)
    natural = natural_crops(n, size, np.random.default_rng([seed, 11]))  # its own stream: the other sets as before
    noisy = np.clip(base + rng.normal(0, 0.4 * 255, base.shape), 0, 255).astype(np.uint8)
    return {
        "ood: digits upscaled": up.astype(np.uint8),
        "ood: uniform noise": rng.integers(0, 256, (n, size, size, 1)).astype(np.uint8),
        "ood: fmnist + noise sd 0.4": noisy,
        "ood: fmnist inverted": (255 - base).astype(np.uint8),
        "ood: natural-image crops": natural,
        "ood: constant images": np.repeat(np.linspace(0, 255, 256).astype(np.uint8),
                                          size * size).reshape(256, size, size, 1),
    }


def natural_crops(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` uint8 ``(size, size, 1)`` grey crops of scikit-learn's two bundled photographs (a temple, a flower):
    random squares of 48-240 pixels, resized (antialiased bilinear) to 28x28 and placed like the test images."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(im, dtype=np.float64).mean(axis=2).astype(np.uint8) for im in load_sample_images().images]
    out = []
    for _ in range(n):
        im = photos[int(rng.integers(len(photos)))]
        s = int(rng.integers(48, 241))
        r, c = int(rng.integers(0, im.shape[0] - s + 1)), int(rng.integers(0, im.shape[1] - s + 1))
        out.append(np.asarray(Image.fromarray(im[r:r + s, c:c + s]).resize((28, 28), Image.BILINEAR)))
    return place_like_test(np.stack(out)[..., None], size)


def place_like_test(x: np.ndarray, size: int) -> np.ndarray:
    """28x28 ``(N, 28, 28, 1)`` images zero-padded to ``size`` as :func:`abl_guard.abl.data.pad_to` places the test
    images (the same content the small CNN sees, wherever a padded model's input puts it)."""
    if size <= 28:
        return x
    a, b = (size - 28) // 2, size - 28 - (size - 28) // 2
    return np.pad(x, ((0, 0), (a, b), (a, b), (0, 0)))


SURROGATE = "surrogate: "


def surrogate_sets(val_x: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Model-free corruptions of the clean validation images (no attack, no gradient): the stand-in anomalies that
    ``--surrogates`` weights the fusion by. Gaussian noise (sd 0.1), random-sign noise (±0.1, FGSM's size without its
    direction) and a Gaussian blur (sigma 1), uint8 like every other set."""
    from scipy import ndimage

    rng = np.random.default_rng([seed, 7])
    x = val_x.astype(np.float64)
    blur = np.stack([ndimage.gaussian_filter(im[..., 0], 1.0) for im in x])[..., None]
    return {
        f"{SURROGATE}gaussian noise sd 0.1": np.clip(x + rng.normal(0, 0.1 * 255, x.shape), 0, 255).astype(np.uint8),
        f"{SURROGATE}random-sign noise 0.1": np.clip(x + 0.1 * 255 * rng.choice([-1.0, 1.0], x.shape), 0,
                                                      255).astype(np.uint8),
        f"{SURROGATE}gaussian blur 1": np.clip(np.rint(blur), 0, 255).astype(np.uint8),
    }


def adversarial_sets(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, args: argparse.Namespace
                     ) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """Successful adversarial examples *after* uint8 quantisation, on correctly classified images."""
    sets, info = {}, []
    for label, name, params, size in ADVERSARIAL:
        m = getattr(args, size)
        if m <= 0:
            continue
        t0 = time.perf_counter()
        res = run_attack(name, model, x[:m], y[:m], seed=args.seed, **params)
        eps = params.get("eps") if name != "pgd" or params.get("norm", "linf") == "linf" else None
        q = quantize(res.images, x[:m], eps) if eps is not None else quantize(res.images)
        ok = res.clean_correct & (predict(model, q) != y[:m])
        sets[label] = q[ok]
        info.append({**res.summary(), "set": label, "kept_after_uint8": int(ok.sum()),
                     "success_before_uint8": int((res.success & res.clean_correct).sum()),
                     "seconds": time.perf_counter() - t0})
        log.info("%s: %d of %d successful after uint8 (%.0fs)", label, ok.sum(), m, time.perf_counter() - t0)
    return sets, info


#: the adaptive attacker's norms: the non-adaptive PGD rows' budgets and steps
ADAPTIVE_NORMS: list[tuple[str, dict[str, Any]]] = [
    ("pgd-linf eps=0.1", {"eps": 0.1, "steps": 20, "norm": "linf"}),
    ("pgd-l2 eps=1.5", {"eps": 1.5, "steps": 20, "norm": "l2"}),
]
#: detector rows attacked together -> the guard row that scores with exactly those detectors
ADAPTIVE_TARGETS: dict[tuple[str, ...], str] = {
    ("mahalanobis",): "default guard (mahalanobis)",
    ("mahalanobis-layers",): "layers alone",
    ("mahalanobis-layers", "knn"): "one pass: layers + knn, fisher",
    ("mahalanobis", "knn"): "one pass: mahalanobis + knn, fisher",
    ("mahalanobis-layers", "knn", "knn (pool)", "odds"): "layers + knn + knn (pool) + odds, fisher",
    ("mahalanobis", "knn", "gram"): "mahalanobis + knn + gram, fisher",
    ("mahalanobis", "knn", "gram", "mahalanobis (first tap)"): "mahalanobis + knn + gram + first tap, fisher",
    ("mahalanobis", "knn", "gram", "probe"): "mahalanobis + knn + gram + probe, fisher",
}
#: other guard rows shown in the adaptive table (transfer: an attack on some detectors, scored by the others)
SHOWN_UNDER_ADAPTIVE = ("one pass: mahalanobis + layers + knn, fisher",)
KAPPA = 5.0  # logit margin the adaptive attacker aims for, so that uint8 rounding rarely undoes it


class TorchGuardScore(torch.nn.Module):
    """*Fitted* Mahalanobis, mahalanobis-layers, knn, odds, gram and probe detectors' scores, differentiable in torch.

    Built from each detector's own state — resolved taps, whitened class means and Cholesky factor of the tied
    covariance, the layers' standardisation, the k-NN bank and ``k``, the odds detector's fixed noise draws and
    per-class statistics — on the torch model the ONNX file was exported from, so the attacker descends exactly the
    functions the guard scores (checked against the detectors' numpy scores). One forward pass with hooks on the union
    of taps (plus one per noise draw for odds); returns ``(logits, scores (N, n_detectors))``.
    """

    def __init__(self, model: torch.nn.Module, detectors: list[Any]) -> None:
        super().__init__()
        from abl_guard.abl.models import model_taps
        from abl_guard.export.onnx import TapWrapper

        self.parts: list[tuple[str, Any]] = []
        taps: list[str] = []
        for d in detectors:
            if d.name == "odds":  # Roth et al.'s statistic on the detector's own (fixed) noise draws
                self.parts.append(("odds", ([torch.as_tensor(b) for b in d.noise_bank()],
                                            torch.as_tensor(d.mu_, dtype=torch.float64),
                                            torch.as_tensor(d.sd_, dtype=torch.float64))))
                continue
            if d.name == "gram":  # first-order Gram values against the predicted class's bounds
                if d.powers != 1:
                    raise ValueError("the adaptive attacker differentiates gram with powers=1 only")
                self.parts.append(("gram", (list(d.taps_), *(torch.as_tensor(v, dtype=torch.float64) for v in
                                                             (d.lo_, d.hi_, d.norm_)), d.sizes_.tolist())))
                taps += list(d.taps_)
                continue
            if d.name == "knn":
                self.parts.append(("knn", (d.tap_, torch.as_tensor(d.bank_, dtype=torch.float64), d.k)))
                taps.append(d.tap_)
                continue
            if d.name == "probe":  # the early tap's LDA posterior of the predicted label
                if d.folded_ is None:
                    raise ValueError("the adaptive attacker differentiates a probe with a folded map only")
                self.parts.append(("probe", (d.tap_, torch.as_tensor(d.folded_, dtype=torch.float64),
                                             torch.as_tensor(d.intercept_, dtype=torch.float64),
                                             torch.as_tensor(d.present_))))
                taps.append(d.tap_)
                continue
            layers = getattr(d, "layers_", None) or [d]
            multi = getattr(d, "layers_", None) is not None
            self.parts.append(("mahalanobis", (
                [m.tap_ for m in layers],
                [torch.as_tensor(m.chol_, dtype=torch.float64) for m in layers],
                [torch.as_tensor(m.whitened_means_, dtype=torch.float64) for m in layers],
                torch.as_tensor(d.z_mean_ if multi else np.zeros(1), dtype=torch.float64),
                torch.as_tensor(d.z_std_ if multi else np.ones(1), dtype=torch.float64))))
            taps += [m.tap_ for m in layers]
        spec = model_taps(model)
        self.wrapper = TapWrapper(model, {t: spec[t] for t in dict.fromkeys(taps)})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, *acts = self.wrapper(x)
        act = dict(zip(self.wrapper.tap_names, acts))
        out = []
        for kind, state in self.parts:
            if kind == "odds":
                out.append(self._odds(x, logits, *state))
                continue
            if kind == "gram":
                out.append(self._gram(logits, act, *state))
                continue
            if kind == "probe":
                tap, coef, intercept, present = state  # the pooling is folded into coef: the raw tap, flattened
                e = (act[tap].flatten(1).double() @ coef + intercept).masked_fill(~present[None], -torch.inf)
                logp = torch.log_softmax(e, dim=1)
                out.append(-logp.gather(1, logits.argmax(1)[:, None])[:, 0])
                continue
            if kind == "knn":
                tap, bank, k = state
                a = act[tap]  # conv maps are globally average-pooled, as detectors.base.flatten_features does
                f = (a.mean(dim=(2, 3)) if a.ndim == 4 else a.flatten(1)).double()
                q = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
                out.append(torch.cdist(q, bank).kthvalue(k, dim=1).values)
                continue
            taps, chols, wms, z_mean, z_std = state
            per_layer = []
            for tap, chol, wm in zip(taps, chols, wms):
                a = act[tap]
                f = (a.mean(dim=(2, 3)) if a.ndim == 4 else a.flatten(1)).double()
                z = torch.linalg.solve_triangular(chol, f.T, upper=False).T
                per_layer.append(((z[:, None, :] - wm[None]) ** 2).sum(-1).min(dim=1).values)
            out.append(((torch.stack(per_layer, dim=1) - z_mean) / z_std).mean(dim=1))
        return logits, torch.stack(out, dim=1)

    @staticmethod
    def _gram(logits: torch.Tensor, act: dict[str, torch.Tensor], taps: list[str], lo: torch.Tensor, hi: torch.Tensor,
              norm: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        g = []
        for t in taps:
            a = act[t].double()
            a = a.flatten(2) if a.ndim > 2 else a[:, :, None]
            g.append((a @ a.sum(dim=1)[:, :, None])[:, :, 0])
        gv = torch.cat(g, dim=1)
        pred = logits.argmax(1)
        lo_p, hi_p = lo[pred], hi[pred]
        dev = (torch.relu(lo_p - gv) / (lo_p + 1e-6).abs() + torch.relu(gv - hi_p) / (hi_p + 1e-6).abs())
        per_tap = torch.stack([c.sum(dim=1) for c in dev.split(sizes, dim=1)], dim=1)
        conf = torch.softmax(logits.double(), dim=1).max(dim=1).values
        return (per_tap / conf[:, None] / norm).sum(dim=1)

    def _odds(self, x: torch.Tensor, logits: torch.Tensor, bank: list[torch.Tensor], mu: torch.Tensor,
              sd: torch.Tensor) -> torch.Tensor:
        base = logits.double()
        y = base.argmax(1)
        own = torch.nn.functional.one_hot(y, base.shape[1]).bool()
        z = torch.zeros_like(base)
        for j, noise in enumerate(bank):
            noisy = (x[None] + noise[:, None]).clamp(0, 1).reshape(-1, *x.shape[1:])
            ln = self.wrapper(noisy)[0].double().reshape(len(noise), len(x), -1).mean(0)
            g = (ln - ln.gather(1, y[:, None])) - (base - base.gather(1, y[:, None]))
            z = z + (g - mu[j][y]) / sd[j][y]
        return (z / len(bank)).masked_fill(own, -torch.inf).max(dim=1).values

    def close(self) -> None:
        self.wrapper.remove_hooks()


def adaptive_pgd(scorer: TorchGuardScore, x: np.ndarray, y: np.ndarray, lam: float, scale: tuple[Any, Any],
                 eps: float, steps: int, norm: str, seed: int, batch: int = 250) -> np.ndarray:
    """White-box PGD against model *and* guard, ascending
    ``min(max_{j!=y} z_j - z_y, KAPPA) - lam * sum_d (s_d - mu_d) / sd_d``.

    ``s_d`` are the guard detectors' scores (:class:`TorchGuardScore`), standardised by their clean fit scores
    (``scale`` = ``(mu, sd)``, one entry per detector) so that ``lam`` is in units of the clean spread. The clipped
    margin (Carlini & Wagner's detector-evasion loss, AISec 2017) stops pushing the class once it is ``KAPPA`` logits
    wrong, leaving the step to the detector term. Same budget, steps, step size (2.5 eps / steps) and random start
    as ``attacks.adversarial.pgd``.
    Returns float [0, 1] NHWC images (quantise before use).
    """
    gen = torch.Generator().manual_seed(seed)
    alpha = 2.5 * eps / steps
    mu, sd = scale
    out = np.empty(x.shape, np.float32)

    def unit(v: torch.Tensor) -> torch.Tensor:
        return v / v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)

    def project(adv: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        if norm == "linf":
            return torch.min(torch.max(adv, x0 - eps), x0 + eps).clamp(0, 1)
        d = adv - x0
        n = d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        return (x0 + d * torch.clamp(eps / n.clamp_min(1e-12), max=1.0)).clamp(0, 1)

    for s0 in range(0, len(x), batch):
        x0 = torch.as_tensor(x[s0 : s0 + batch].astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()
        yy = torch.as_tensor(y[s0 : s0 + batch].astype(np.int64))
        noise = (eps * (torch.rand(x0.shape, generator=gen) * 2 - 1) if norm == "linf"
                 else eps * unit(torch.randn(x0.shape, generator=gen)))
        adv = (x0 + noise).clamp(0, 1)
        for _ in range(steps):
            adv = adv.detach().requires_grad_(True)
            logits, score = scorer(adv)
            true = logits.gather(1, yy[:, None])[:, 0]
            other = logits.masked_fill(torch.nn.functional.one_hot(yy, logits.shape[1]).bool(), -1e9).max(1).values
            obj = torch.clamp(other - true, max=KAPPA).sum() - lam * ((score - mu) / sd).sum()  # over inputs, dets
            (g,) = torch.autograd.grad(obj, adv)
            adv = project(adv.detach() + alpha * (g.sign() if norm == "linf" else unit(g)), x0)
        out[s0 : s0 + len(x0)] = adv.detach().permute(0, 2, 3, 1).numpy()
    return out


def _torch_scores(scorer: TorchGuardScore, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        xt = torch.as_tensor(images.astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()
        parts = [scorer(xt[i : i + 500])[1] for i in range(0, len(xt), 500)]
    return torch.cat(parts).numpy() if parts else np.zeros((0, len(scorer.parts)))


def adaptive_sets(model: torch.nn.Module, dets: dict[str, Any], fit_x: np.ndarray, x: np.ndarray, y: np.ndarray,
                  obs_check: dict[str, np.ndarray], lambdas: list[float], seed: int, onnx_model: OnnxModel
                  ) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """The adaptive attacker's sets: for each attacked detector set, norm and ``lam``, the successful uint8 examples."""
    sets, info = {}, []
    model.eval()
    ok_clean = predict(model, x) == y
    x, y = x[ok_clean], y[ok_clean]
    for rows, guard_row in ADAPTIVE_TARGETS.items():
        scorer = TorchGuardScore(model, [dets[r] for r in rows])
        clean = _torch_scores(scorer, fit_x)  # the clean scale, and parity with the detectors' own scores
        err = 0.0
        for j, r in enumerate(rows):
            ref = dets[r].score(obs_check, onnx_model)
            err = max(err, float(np.max(np.abs(clean[: len(ref), j] - ref) / np.maximum(np.abs(ref), 1.0))))
        if err > 1e-3:
            raise RuntimeError(f"the torch scores of {rows} disagree with the detectors' (rel. error {err:.2g})")
        mu, sd = torch.as_tensor(clean.mean(0)), torch.as_tensor(clean.std(0))
        for label, params in ADAPTIVE_NORMS:
            for lam in lambdas:
                t0 = time.perf_counter()
                adv = adaptive_pgd(scorer, x, y, lam, (mu, sd), params["eps"], params["steps"], params["norm"], seed)
                q = quantize(adv, x, params["eps"]) if params["norm"] == "linf" else quantize(adv)
                ok = predict(model, q) != y
                name = f"adaptive {label} λ={lam:g} vs {' + '.join(rows)}"
                sets[name] = q[ok]
                s_adv = (_torch_scores(scorer, q[ok]) - clean.mean(0)) / clean.std(0)
                info.append({"set": name, "attacked": list(rows), "guard_row": guard_row, "norm": label,
                             "lambda": lam, "n": int(len(x)), "kept_after_uint8": int(ok.sum()),
                             "parity_rel_error": err,
                             "mean_standardised_scores": s_adv.mean(0).tolist() if len(s_adv) else None,
                             "seconds": time.perf_counter() - t0})
                log.info("%s: %d of %d successful after uint8 (%.0fs)", name, ok.sum(), len(x),
                         time.perf_counter() - t0)
        scorer.close()
    return sets, info


def fit_rows(onnx_path: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], threads: int
             ) -> tuple[OnnxModel, list[tuple[str, Any]], dict[str, Any], dict[str, np.ndarray]]:
    """Every detector row fitted on the fit split; also the observations of its first 256 inputs (parity checks)."""
    model = OnnxModel(onnx_path, intra_op_threads=threads)
    dets = [(row, make_detector(kind, **params)) for row, kind, params, _ in ROWS]
    fit_x, fit_y = splits["fit"]
    obs = observe(model, to_model_input(fit_x, model.input_shape), needed_outputs([d for _, d in dets]))
    timing: dict[str, Any] = {"fit_seconds": {}, "score_seconds": {}}
    for row, d in dets:
        t0 = time.perf_counter()
        d.fit(obs, fit_y, model)
        timing["fit_seconds"][row] = time.perf_counter() - t0
    head = observe(model, to_model_input(fit_x[:256], model.input_shape), needed_outputs([d for _, d in dets]))
    return model, dets, timing, head


def score_sets(fitted: tuple[OnnxModel, list[tuple[str, Any]], dict[str, Any], Any],
               splits: dict[str, tuple[np.ndarray, np.ndarray]], sets: dict[str, np.ndarray]
               ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray], dict[str, Any]]:
    """Raw scores ``{set: {row: (n,)}}`` and predictions ``{set: (n,)}`` of every (fitted) detector row."""
    model, dets, timing, _ = fitted
    outputs = needed_outputs([d for _, d in dets])  # the resolved taps: one forward pass per set
    scores: dict[str, dict[str, np.ndarray]] = {}
    preds: dict[str, np.ndarray] = {}
    everything = {**{k: v[0] for k, v in splits.items() if k != "fit"}, **sets}
    for name, images in everything.items():
        if len(images) == 0:
            continue
        x = to_model_input(images, model.input_shape)
        t0 = time.perf_counter()
        o = observe(model, x, outputs)
        fwd = time.perf_counter() - t0
        preds[name] = o["logits"].argmax(1)
        scores[name] = {}
        for row, d in dets:
            t0 = time.perf_counter()
            scores[name][row] = np.asarray(d.score(o, model), np.float64)
            if name == "eval":
                timing["score_seconds"][row] = time.perf_counter() - t0
        if name == "eval":
            timing["forward_seconds"] = fwd
        log.info("scored %s (%d)", name, len(images))
    return scores, preds, timing


def surrogate_weights(c: Calibrator, L_cal: np.ndarray, scores: dict[str, dict[str, np.ndarray]],
                      preds: dict[str, np.ndarray]) -> np.ndarray | None:
    """Per member ``max(0, 2 AUROC - 1)``, its best AUROC over the surrogate sets (``-log p`` against the calibration
    part's leave-one-out ``-log p``), normalised; None without surrogate sets or when no member separates any."""
    names = [n for n in scores if n.startswith(SURROGATE)]
    if not names:
        return None
    best = np.zeros(len(c.names))
    for n in names:
        _, P, _ = c.pvalues({m: scores[n][m] for m in c.names}, preds[n])
        L = -np.log(np.maximum(P, 1e-300))
        best = np.maximum(best, [metrics(L_cal[:, j], L[:, j])["auroc"] for j in range(len(c.names))])
    w = np.clip(2 * best - 1, 0, None)
    return w / w.sum() if w.sum() > 0 else None


def fusion_rows(cal: dict[str, np.ndarray], pred: np.ndarray, two: dict[str, bool], k: int,
                scores: dict[str, dict[str, np.ndarray]] | None = None, preds: dict[str, np.ndarray] | None = None
                ) -> dict[str, tuple[list[str], Calibrator, Any]]:
    """Clean-data-only re-weightings of Fisher's combination: ``{row: (members, calibrator, rank function)}``.

    Both use only the calibration part's leave-one-out p-values ``L = -log p`` (per detector):

    * *GLS weights*: ``sum_d w_d L_d`` with ``w = C^-1 1`` (clipped at 0, normalised), ``C`` the clean correlation
      of ``L`` — the minimum-variance weighting of correlated statistics: near-duplicate detectors share a weight;
    * *max z*: ``max_d (L_d - mean_d) / sd_d`` (clean mean and sd) — the most surprising detector decides, so a
      strong member is never averaged away (a standardised min-p);
    * *surrogate weights* (with ``--surrogates``): ``sum_d w_d L_d``, ``w`` from each member's AUROC on model-free
      corruptions of clean images (:func:`surrogate_weights`) — a member that separates none of them gets no weight.
    """
    out: dict[str, tuple[list[str], Calibrator, Any]] = {}
    for label, members in FUSION_STUDY:
        c = Calibrator.fit({m: cal[m] for m in members}, pred, [two[m] for m in members], "fisher", FPR, k)
        _, P, _ = c.pvalues(c.scores, pred, leave_one_out=True)
        L = -np.log(np.maximum(P, 1e-300))
        mu, sd = L.mean(0), np.maximum(L.std(0), 1e-12)
        w = np.clip(np.linalg.solve(np.corrcoef(L.T) + 1e-6 * np.eye(len(members)), np.ones(len(members))), 0, None)
        w = w / w.sum() if w.sum() > 0 else np.full(len(members), 1 / len(members))
        out[f"{label}: fisher, clean GLS weights"] = (members, c, lambda L, w=w: L @ w)
        out[f"{label}: max z (clean)"] = (members, c, lambda L, mu=mu, sd=sd: ((L - mu) / sd).max(axis=1))
        ws = surrogate_weights(c, L, scores or {}, preds or {})
        if ws is not None:
            log.info("surrogate weights, %s: %s", label, dict(zip(members, np.round(ws, 3))))
            out[f"{label}: fisher, surrogate weights"] = (members, c, lambda L, w=ws: L @ w)
    return out


def save_scores(path: Path, scores: dict[str, dict[str, np.ndarray]], preds: dict[str, np.ndarray]) -> None:
    """Every set's raw scores per row and its predictions, as ``<set>|<row>`` and ``<set>|pred`` arrays."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {f"{name}|{row}": np.asarray(v) for name, rows in scores.items() for row, v in rows.items()}
    flat.update({f"{name}|pred": np.asarray(p) for name, p in preds.items()})
    np.savez_compressed(path, **flat)
    log.info("scores -> %s", path)


def load_scores(path: Path) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """``(scores, preds)`` as :func:`save_scores` wrote them (no pickle)."""
    scores: dict[str, dict[str, np.ndarray]] = {}
    preds: dict[str, np.ndarray] = {}
    with np.load(path, allow_pickle=False) as f:
        for key in f.files:
            name, row = key.split("|", 1)
            if row == "pred":
                preds[name] = f[key]
            else:
                scores.setdefault(name, {})[row] = f[key]
    return scores, preds


def evaluate(scores: dict[str, dict[str, np.ndarray]], preds: dict[str, np.ndarray], k: int,
             two: dict[str, bool]) -> dict[str, Any]:
    rows = list(two)
    cal = scores["cal"]
    out: dict[str, Any] = {}
    guards = {}
    for gname, members, combine, tails in GUARDS:
        guards[gname] = Calibrator.fit({m: cal[m] for m in members}, preds["cal"], [two[m] for m in members],
                                       combine, FPR, k, tails=tails)
    fusion = fusion_rows(cal, preds["cal"], two, k, scores, preds)

    def ranked(s: dict[str, np.ndarray], p: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        r = {row: rank_scores(cal[row], s[row], two[row]) for row in rows}
        flags = {}
        for gname, members, _, _ in GUARDS:
            c = guards[gname]
            comb, _, _ = c.pvalues({m: s[m] for m in members}, p)
            r[gname] = -np.log(np.maximum(comb, 1e-300))
            flags[gname] = comb <= c.thresholds(p)
        for fname, (members, c, rank) in fusion.items():
            _, P, _ = c.pvalues({m: s[m] for m in members}, p)
            r[fname] = rank(-np.log(np.maximum(P, 1e-300)))
        return r, flags

    neg, neg_flags = ranked(scores["eval"], preds["eval"])
    out["clean eval (negatives)"] = {"n": int(len(preds["eval"])),
                                     "flagged": {g: float(f.mean()) for g, f in neg_flags.items()}}
    for name in scores:
        if name in ("cal", "val", "eval") or name.startswith(SURROGATE):
            continue
        pos, pos_flags = ranked(scores[name], preds[name])
        res: dict[str, Any] = {"n": int(len(preds[name])), "detectors": {}, "flagged": {}}
        for row in neg:
            m = metrics(neg[row], pos[row])
            if row in two and two[row]:
                m["high_tail_auroc"] = metrics(scores["eval"][row], scores[name][row])["auroc"]
            res["detectors"][row] = m
        res["flagged"] = {g: float(f.mean()) for g, f in pos_flags.items()}
        out[name] = res
    return {"sets": out, "guards": guards, "fusion": {f: v[0] for f, v in fusion.items()}}


def _stream(scores: dict[str, dict[str, np.ndarray]], preds: dict[str, np.ndarray], c: Calibrator,
            section: dict[str, Any], k: int, parts: list[tuple[str, slice]]) -> dict[str, Any]:
    """Flag one stream (concatenated parts of the scored sets) and run both alarms, and the old unconditional one."""
    s = {m: np.concatenate([scores[p][m][sl] for p, sl in parts]) for m in c.names}
    pr = np.concatenate([preds[p][sl] for p, sl in parts])
    comb, _, _ = c.pvalues(s, pr)
    fl = comb <= c.thresholds(pr)
    flags, predicted = np.bincount(pr[fl], minlength=k), np.bincount(pr, minlength=k)
    a = stream_alarms(flags, predicted, section)
    old = stream_alarms(flags, predicted, section["alarm_null"]["dirichlet"])
    assert a is not None and old is not None and a.drift is not None
    return {"n": int(len(pr)), "flag_rate": float(fl.mean()), "class_alarm": a.fired, "target": a.target,
            "class_p": a.p_value, "drift": a.drift.fired, "drift_p": a.drift.p_value,
            "old_unconditional_alarm": old.fired, "old_target": old.target}


def alarms(scores: dict[str, dict[str, np.ndarray]], preds: dict[str, np.ndarray], guards: dict[str, Calibrator],
           k: int, triggered: str | None) -> dict[str, Any]:
    """Both stream alarms for two guards on clean, shifted and backdoor streams (the bundle's null built as
    calibrate_bundle builds it: leave-one-out calibration flags plus validation flags)."""
    out: dict[str, Any] = {}
    for gname in ("default guard (mahalanobis)", "five: fisher", "one pass: layers + knn, fisher",
                  "one pass: mahalanobis + knn, fisher", "layers + knn + knn (pool) + odds, fisher",
                  "mahalanobis + knn + gram, fisher", "layers + knn + knn (pool) + odds + gram, fisher",
                  "mahalanobis + knn + gram + first tap, fisher", "mahalanobis + knn + gram + dknn, fisher",
                  "mahalanobis + knn + gram + probe, fisher"):
        if gname not in guards:  # --rows left it out
            continue
        c = guards[gname]
        names = c.names
        loo, _, _ = c.pvalues({m: scores["cal"][m] for m in names}, preds["cal"], leave_one_out=True)
        vcomb, _, _ = c.pvalues({m: scores["val"][m] for m in names}, preds["val"])
        vflags = vcomb <= c.thresholds(preds["val"])
        clean_flags = np.r_[preds["cal"][loo <= c.thresholds(preds["cal"])], preds["val"][vflags]]
        null, method = alarm_null(clean_flags, preds["cal"], k)
        section = {"alarm_null": {"method": method, "dirichlet": null.tolist()},
                   "predicted_class_counts": np.bincount(preds["cal"], minlength=k).tolist(),
                   "validation": {"k": int(vflags.sum()), "n": int(len(vflags))}}

        streams = {"clean (evaluation split)": [("eval", slice(None))]}
        for name in scores:
            if name.startswith("ood:"):
                streams[f"shifted: {name[5:]}"] = [(name, slice(None))]
        if triggered is not None and triggered in scores:
            streams["backdoor: clean + 60 triggered"] = [("eval", slice(None)), (triggered, slice(0, 60))]
            if "ood: digits upscaled" in scores:
                streams["backdoor in a shifted stream: digits + 60 triggered"] = [
                    ("ood: digits upscaled", slice(None)), (triggered, slice(0, 60))]
        out[gname] = {s: _stream(scores, preds, c, section, k, parts) for s, parts in streams.items()}
    return out


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attacks", default="badnets")
    ap.add_argument("--work", default="/tmp/abl-guard-converged")
    ap.add_argument("--n-trig", type=int, default=1000)
    ap.add_argument("--n-adv", type=int, default=1000)
    ap.add_argument("--n-cw", type=int, default=32)
    ap.add_argument("--n-ood", type=int, default=1000)
    ap.add_argument("--adaptive", default="",
                    help="comma-separated weights lambda of the adaptive attacker's guard-score term (e.g. 1,10); "
                         "empty: no adaptive attack")
    ap.add_argument("--n-adaptive", type=int, default=500)
    ap.add_argument("--adversarial-on", default="badnets",
                    help="comma-separated attacks whose models also get the adversarial and out-of-distribution sets")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "detect_converged"))
    ap.add_argument("--arch", default="small-cnn", help="small-cnn (the default), wrn-16-1 or preact-resnet18")
    ap.add_argument("--pad", type=int, default=None, help="zero-pad the images to this size (32 for the ResNets)")
    ap.add_argument("--train-limit", type=int, default=None, help="train on a random subset of this many images")
    ap.add_argument("--epochs", type=int, default=TRAIN["epochs"])
    ap.add_argument("--lr", type=float, default=TRAIN["lr"])
    ap.add_argument("--lr-milestones", default=",".join(map(str, TRAIN["lr_milestones"])))
    ap.add_argument("--augment", default="none", help="training augmentation: none, crop, crop-flip")
    ap.add_argument("--fit-from-train", type=int, default=0,
                    help="fit the detectors on this many clean *training* images (true labels) instead of the 2,000 "
                         "test images of the fit split: the paper's DkNN bank is the training set")
    ap.add_argument("--rows", default="",
                    help="comma-separated detector rows to run (the baselines always run; guards of those rows only)")
    ap.add_argument("--surrogates", action="store_true",
                    help="also score model-free corruptions of the clean validation images and add a fusion row "
                         "weighted by each member's AUROC on them (no attack data)")
    ap.add_argument("--extra-taps", default="",
                    help="comma-separated module names (e.g. WRN's conv1,block1.0,block1.1,...) exported as extra taps "
                         "and read by the rows 'gram (extra taps)' and 'gram (extra taps) (paper powers)' (Sastry & "
                         "Oore's every-layer setting); rows whose taps are unset read them too, so pair it with --rows")
    ap.add_argument("--save-scores", default="",
                    help="also write every set's raw scores and predictions to DIR/<model>-scores.npz (to study "
                         "combinations offline)")
    ap.add_argument("--smoke", action="store_true",
                    help="plumbing check: a 1-epoch model on 3,000 images, tiny sets, results under /tmp")
    args = ap.parse_args()
    extra_taps = [t.strip() for t in args.extra_taps.split(",") if t.strip()]
    if extra_taps:
        ROWS.extend(extra_tap_rows(extra_taps))
    if args.rows:
        keep_rows(args.rows)
    milestones = tuple(int(v) for v in args.lr_milestones.split(",") if v.strip())
    train, train_limit = {"epochs": args.epochs, "lr": args.lr, "lr_milestones": milestones}, args.train_limit
    if args.smoke:
        train, train_limit = {"epochs": 1, "lr": 0.05, "lr_milestones": ()}, 3000
        args.n_trig, args.n_adv, args.n_cw, args.n_ood, args.n_adaptive = 60, 40, 4, 50, 40
        args.work, args.out = "/tmp/abl-guard-converged-smoke", "/tmp/abl-guard-converged-smoke/detect_converged"
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    test = load_dataset("fashion-mnist", "test")
    if args.pad:
        test = pad_to(test, args.pad)
    spec, k = test.spec, test.spec.num_classes
    perm = np.random.default_rng(args.seed).permutation(len(test))
    parts = np.split(perm, np.cumsum([2000, 1000, 1000, 1000]))
    splits = {n: (test.images[i], test.labels[i]) for n, i in zip(("fit", "cal", "val", "eval"), parts)}
    src_x, src_y = test.images[parts[4]], test.labels[parts[4]]
    if args.fit_from_train:
        train_set = load_dataset("fashion-mnist", "train")
        if args.pad:
            train_set = pad_to(train_set, args.pad)
        pick = np.random.default_rng(args.seed + 1).choice(len(train_set), args.fit_from_train, replace=False)
        splits["fit"] = (train_set.images[pick], train_set.labels[pick])
    train_cfg = TrainConfig(epochs=train["epochs"], lr=train["lr"], lr_milestones=train["lr_milestones"],
                            seed=args.seed, device="cpu", augment=args.augment)
    runs = []
    adversarial_on = {a.strip() for a in args.adversarial_on.split(",")}
    for attack_name in [a.strip() for a in args.attacks.split(",") if a.strip()]:
        t0 = time.perf_counter()
        cfg = ExperimentConfig(dataset="fashion-mnist", attack=attack_name, attack_params={"rate": 0.1, "target": 0},
                               defense="none", train=train_cfg, train_limit=train_limit, test_limit=2000,
                               arch=args.arch, pad=args.pad)
        run_dir = Path(args.work) / (f"{attack_name}-none" if args.arch == "small-cnn" else
                                     f"{attack_name}-{args.arch}-none")
        model, rec = train_cached(cfg, run_dir)
        torch.set_num_threads(args.threads)  # training resets torch's thread count
        adapt_rows(model_taps(model))
        attack = make_attack(attack_name, seed=args.seed, rate=0.1, target=0)
        trig, asr = triggered_successes(model, attack, src_x, src_y, k, args.n_trig)
        trig_name = f"triggered ({attack_name})"
        sets: dict[str, np.ndarray] = {trig_name: trig}
        adv_info: list[dict[str, Any]] = []
        if attack_name in adversarial_on:
            adv, adv_info = adversarial_sets(model, src_x, src_y, args)
            sets.update(adv)
            sets.update(ood_sets(src_x, args.n_ood, args.seed))
        if args.surrogates:
            sets.update(surrogate_sets(splits["val"][0], args.seed))
        onnx_path = export_with_taps(model, spec, run_dir / "model.onnx", extra_taps)
        fitted = fit_rows(onnx_path, splits, args.threads)
        adaptive_info: list[dict[str, Any]] = []
        if attack_name == "badnets" and args.adaptive:
            lambdas = [float(v) for v in args.adaptive.split(",") if v.strip()]
            adaptive, adaptive_info = adaptive_sets(model, dict(fitted[1]), splits["fit"][0], src_x[: args.n_adaptive],
                                                    src_y[: args.n_adaptive], fitted[3], lambdas, args.seed,
                                                    fitted[0])
            sets.update(adaptive)
        scores, preds, timing = score_sets(fitted, splits, sets)
        if args.save_scores:
            save_scores(Path(args.save_scores) / f"{run_dir.name}-scores.npz", scores, preds)
        two = two_sided(ROWS)
        ev = evaluate(scores, preds, k, two)
        al = alarms(scores, preds, ev["guards"], k, trig_name)
        runs.append({"model": attack_name, "training": {"metrics": rec["metrics"],
                                                        "train_seconds": rec.get("train_seconds"),
                                                        "reused_cache": rec.get("reused_cache", False)},
                     "asr_on_source_split": asr,
                     "clean_accuracy_eval_split": float(np.mean(preds["eval"] == splits["eval"][1])),
                     "adversarial": adv_info, "adaptive": adaptive_info, "results": ev["sets"],
                     "fusion_study": ev["fusion"], "alarms": al,
                     "timing": timing,
                     "seconds": time.perf_counter() - t0})
    record = {"command": "python bench/detect_converged.py " + " ".join(sys.argv[1:]), "cpu": cpu_name(),
              "threads": args.threads, "torch": torch.__version__,
              "arch": args.arch, "pad": args.pad,
              "train": {**train, "train_size": train_limit or 60000, "augment": args.augment},
              "splits": {"fit": int(len(splits["fit"][0])), "fit_from": "train" if args.fit_from_train else "test",
                         "cal": 1000, "val": 1000, "eval": 1000, "source": int(len(src_x))},
              "detectors": [{"row": r, "detector": d, "params": p, "lens": lens} for r, d, p, lens in ROWS],
              "guards": [{"row": g, "members": m, "combine": c, "tails": t} for g, m, c, t in GUARDS],
              "fpr": FPR, "runs": runs, "wall_seconds": time.perf_counter() - t_start}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2, default=float))
    write_markdown_keeping_notes(out.with_suffix(".md"), render(record))
    print(f"-> {out.with_suffix('.md')} ({record['wall_seconds'] / 60:.1f} min)")


def render(r: dict[str, Any]) -> str:
    rows = [d["row"] for d in r["detectors"]] + [g["row"] for g in r["guards"]]
    arch = {"small-cnn": "small CNN"}.get(r.get("arch", "small-cnn"), r.get("arch", "small-cnn"))
    pad = f" zero-padded to {r['pad']}×{r['pad']}" if r.get("pad") else ""
    n = r["train"]["train_size"]
    size = f"all {n:,}" if n >= 60000 else f"a random {n:,} of the 60,000"
    aug = f" ({r['train']['augment']} augmentation)" if r["train"].get("augment", "none") != "none" else ""
    lines = ["# Detectors and guards on a converged model", "",
             f"`{r['command']}` — {r['cpu']}, {r['threads']} thread(s), torch {r['torch']}; wall "
             f"{r['wall_seconds'] / 60:.1f} min.", "",
             f"Fashion-MNIST{pad}, {arch} trained on {size} training images{aug}, "
             f"{r['train']['epochs']} epochs, SGD lr {r['train']['lr']} (÷10 at epochs "
             f"{', '.join(map(str, r['train']['lr_milestones']))}); test splits fit / calibration / validation / "
             f"evaluation {r['splits']['fit']} / {r['splits']['cal']} / {r['splits']['val']} / {r['splits']['eval']}, "
             f"positives from the other {r['splits']['source']}. Adversarial examples are quantised to uint8 and kept "
             "only when still successful." + (f" The detectors are fitted on {r['splits']['fit']:,} clean *training* "
                                              "images instead of the test fit split."
                                              if r["splits"].get("fit_from") == "train" else ""), "",
             "Cells: **AUROC / TPR % at 1% FPR (ROC)**; for guard rows also **/ % flagged at the guard's own 1% "
             "threshold**. Two-sided detectors are ranked by the guard's two-sided p-value.", ""]
    for run in r["runs"]:
        t = run["training"]["metrics"]
        lines += [f"## {run['model']}", "",
                  f"CA {100 * t['clean_accuracy']:.2f}%, ASR {100 * t.get('attack_success_rate', 0):.2f}% "
                  f"(training {run['training']['train_seconds'] or 0:.0f}s"
                  f"{', cached' if run['training']['reused_cache'] else ''}); clean accuracy on the evaluation split "
                  f"{100 * run['clean_accuracy_eval_split']:.1f}%; ASR on the source split "
                  f"{100 * run['asr_on_source_split']:.1f}%.", ""]
        if run["adversarial"]:
            lines += ["Adversarial sets: " + "; ".join(
                f"{a['set']}: {a['kept_after_uint8']} of {a['n']} successful after uint8 "
                f"({a['success_before_uint8']} before)" for a in run["adversarial"]), ""]
        res = run["results"]
        sets = [s for s, v in res.items()
                if s != "clean eval (negatives)" and v.get("n") and not s.startswith("adaptive")]
        fusion = run.get("fusion_study", {})
        lines.append("| detector / guard | " + " | ".join(f"{s} (n={res[s]['n']})" for s in sets)
                     + " | clean flagged % |")
        lines.append("|---" * (len(sets) + 2) + "|")
        for row in rows + list(fusion):
            cells = []
            for s in sets:
                m = res[s]["detectors"].get(row)
                if not m or np.isnan(m.get("auroc", np.nan)):
                    cells.append("–")
                    continue
                c = f"{m['auroc']:.3f} / {100 * m['tpr@1']:.0f}"
                if row in res[s]["flagged"]:
                    c += f" / {100 * res[s]['flagged'][row]:.0f}"
                cells.append(c)
            clean = res["clean eval (negatives)"]["flagged"].get(row)
            lines.append(f"| {row} | " + " | ".join(cells) + f" | {'–' if clean is None else f'{100 * clean:.1f}'} |")
        lines.append("")
        # does the guard keep up with its best member?
        lines += ["Guard vs its best member (AUROC; the target is guard >= best - 0.005):", ""]
        for row, members in [(g["row"], g["members"]) for g in r["guards"]] + list(fusion.items()):
            if len(members) < 2:
                continue
            worst = min(((res[s]["detectors"][row]["auroc"]
                          - max(res[s]["detectors"][m]["auroc"] for m in members), s) for s in sets),
                        default=(float("nan"), ""))
            lines.append(f"- {row}: worst shortfall {worst[0]:+.3f} ({worst[1]})")
        lines += ["", "Stream alarms (1% FPR guard; class alarm conditional on the stream's prediction mix; the old "
                      "unconditional test alongside):", "",
                  "| guard | stream | n | flagged % | class alarm (target, p) | drift (p) | old class alarm |",
                  "|---|---|---|---|---|---|---|"]
        for g, streams in run["alarms"].items():
            for s, a in streams.items():
                lines.append(f"| {g} | {s} | {a['n']} | {100 * a['flag_rate']:.1f} | "
                             f"{'FIRED ' + str(a['target']) if a['class_alarm'] else 'no'} ({a['class_p']:.2g}) | "
                             f"{'FIRED' if a['drift'] else 'no'} ({a['drift_p']:.2g}) | "
                             f"{'fired ' + str(a['old_target']) if a['old_unconditional_alarm'] else 'no'} |")
        lines.append("")
        if run.get("adaptive"):
            lines += adaptive_table(r, run)
        tm = run["timing"]
        fwd = tm.get("forward_seconds", 0.0)
        lines += ["Score cost on the evaluation split (× one forward pass): " + ", ".join(
            f"{row} {s / max(fwd, 1e-9):.1f}" for row, s in tm["score_seconds"].items()), ""]
    lines += family_table(r)
    return "\n".join(lines)


FAMILIES = {"backdoor": ("triggered",), "FGSM / PGD": ("fgsm", "pgd"), "CW-L2": ("cw",), "far OOD": ("ood:",)}


def family_table(r: dict[str, Any]) -> list[str]:
    """Worst AUROC per attack family over every run (what ``calibrate``'s default is chosen by), and cost."""
    rows = ([d["row"] for d in r["detectors"]] + [g["row"] for g in r["guards"]]
            + [f for f in r["runs"][0].get("fusion_study", {})])
    members = {**{d["row"]: [d["row"]] for d in r["detectors"]}, **{g["row"]: g["members"] for g in r["guards"]},
               **r["runs"][0].get("fusion_study", {})}
    cost = r["runs"][0]["timing"]["score_seconds"]
    fwd = max(r["runs"][0]["timing"].get("forward_seconds", 0.0), 1e-9)
    cw_n = sorted({run["results"][s]["n"] for run in r["runs"] for s in run["results"]
                   if s.startswith(FAMILIES["CW-L2"]) and run["results"][s].get("n")})
    lines = ["## Worst case by attack family (all runs)", "",
             "Lowest AUROC within each family over every model (CW-L2 separately: n = "
             f"{', '.join(map(str, cw_n)) or 'none'}); cost = the members' scoring time on the evaluation split in "
             "units of one forward pass (they share that pass).", "",
             "| detector / guard | " + " | ".join(FAMILIES) + " | worst (without CW) | worst | cost × fwd |",
             "|---" * (len(FAMILIES) + 4) + "|"]
    for row in rows:
        fam = {}
        for f, prefixes in FAMILIES.items():
            vals = [run["results"][s]["detectors"][row]["auroc"] for run in r["runs"] for s in run["results"]
                    if s.startswith(prefixes) and run["results"][s].get("n") and row in run["results"][s]["detectors"]]
            fam[f] = min(vals) if vals else float("nan")
        no_cw = min(v for f, v in fam.items() if f != "CW-L2")
        c = sum(cost.get(m, 0.0) for m in members.get(row, [row])) / fwd
        lines.append(f"| {row} | " + " | ".join(f"{v:.3f}" for v in fam.values())
                     + f" | {no_cw:.3f} | {min(fam.values()):.3f} | {c:.1f} |")
    return lines + [""]


def adaptive_table(r: dict[str, Any], run: dict[str, Any]) -> list[str]:
    """The adaptive attacker next to the non-adaptive PGD rows, for the guards it attacks (and the other rows)."""
    res = run["results"]
    guards = list(dict.fromkeys([*ADAPTIVE_TARGETS.values(), *(g["row"] for g in r["guards"]
                                                               if g["row"] in SHOWN_UNDER_ADAPTIVE)]))
    lines = ["Adaptive attacker (white-box PGD that also minimises the attacked detector's own score, computed in "
             f"torch from the fitted detector's state; clipped logit margin κ = {KAPPA:g}; λ in units of the clean "
             "score's standard deviation; uint8, kept only when still misclassified). Cells: AUROC / TPR % at 1% FPR "
             "/ % flagged at the guard's own threshold; **bold** = the guard whose detector was attacked.", "",
             "| set | n kept | " + " | ".join(guards) + " |", "|---" * (len(guards) + 2) + "|"]
    attacked = {a["set"]: a["guard_row"] for a in run["adaptive"]}
    kept = {a["set"]: f"{a['kept_after_uint8']} of {a['n']}" for a in run["adaptive"]}
    for s in [n for n, _ in ADAPTIVE_NORMS] + [a["set"] for a in run["adaptive"]]:
        if s not in res or not res[s].get("n"):
            continue
        cells = []
        for g in guards:
            m, f = res[s]["detectors"][g], res[s]["flagged"].get(g, float("nan"))
            c = f"{m['auroc']:.3f} / {100 * m['tpr@1']:.0f} / {100 * f:.0f}"
            cells.append(f"**{c}**" if attacked.get(s) == g else c)
        lines.append(f"| {s} | {kept.get(s, res[s]['n'])} | " + " | ".join(cells) + " |")
    return lines + [""]


if __name__ == "__main__":
    main()
