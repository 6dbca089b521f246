"""Building a guard bundle: fit detectors on clean data, calibrate the combined p-value, validate, write.

:func:`calibrate_bundle` splits clean labelled images (seeded) into *fit* (detectors learn), *calibration* (each
detector's clean score distribution, the combined p-value threshold) and *validation* (the realised false-positive
rate, reported with a Clopper-Pearson interval) parts, then writes a bundle that :meth:`Guard.load
<abl_guard.guard.runtime.Guard.load>` serves. Thresholds are set on the combined p-value from clean calibration
data (conformal p-values, Vovk et al.; Fisher or min-p combination, see :mod:`abl_guard.guard.runtime`), so the
guard as a whole flags the target fraction of clean inputs. :func:`read_clean_data` reads calibration inputs
through the scan's own sources (``abl-guard calibrate --data``).

Calibration-time code only: serving (:mod:`.runtime`) never imports this module.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from abl_guard.detectors import Detector

from .bundle import MODEL_FILE, BundleError, BundleWriter, is_archive, pack_bundle
from .calibration import COMBINERS, Calibrator, RateEstimate, alarm_null, min_calibration_size
from .model import OnnxModel
from .preprocess import to_model_input
from .runtime import DEFAULT_COMBINE, file_key, needed_outputs, observe, raw_scores, unique_names

log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.npz"


# ------------------------------------------------------------------------------------------------ clean inputs


class EmptyDataError(ValueError):
    """No readable clean input in what was given (one-line message)."""


@dataclass
class CleanData:
    """Clean labelled images for calibration and what the manifest records about where they came from."""

    images: np.ndarray
    labels: np.ndarray
    predicted: int  # how many labels are the model's predictions rather than given
    provenance: dict[str, Any]


def read_clean_data(model_path: str | os.PathLike, sources: Sequence[str], *, start: int = 0,
                    count: int | None = None, labels: str = "auto",
                    meta: Mapping[str, Any] | None = None) -> CleanData:
    """Read clean inputs from ``sources`` exactly as ``scan`` reads them, at the model's input size.

    Labels follow ``labels`` (see :func:`~abl_guard.guard.labelled.read_calibration_data`); inputs without one take
    the model's predicted label. ``meta`` is the model's metadata when the caller has read it already. Raises
    :class:`EmptyDataError` when nothing readable is found.
    """
    from .labelled import fill_predicted, read_calibration_data
    from .model import read_metadata

    meta = read_metadata(model_path) if meta is None else meta
    data = read_calibration_data(sources, meta["input_shape"], meta["class_names"], start=start, count=count,
                                 labels=labels)
    if len(data.labels) == 0:
        raise EmptyDataError(f"no readable images in {', '.join(map(str, sources))} (from input {start})")
    fill_predicted(data, model_path)
    provenance = {"sources": [str(s) for s in sources], "start": start, "count": count, "labels": labels,
                  **data.provenance()}
    return CleanData(data.images, data.labels, data.predicted, provenance)


# ------------------------------------------------------------------------------------------------ the steps


def _split(n: int, fractions: Sequence[float], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded fit / calibration / validation split; ``fractions`` are three positive fractions or three counts."""
    f = [float(v) for v in fractions]
    if len(f) != 3 or min(f) <= 0:
        raise ValueError(f"fractions must be three positive numbers, got {fractions}")
    if all(v.is_integer() and v >= 1 for v in f) and sum(f) > 3:  # counts
        if sum(f) > n:
            raise ValueError(f"split sizes {[int(v) for v in f]} exceed the {n} images given")
        sizes = [int(v) for v in f]
    else:
        if abs(sum(f) - 1) > 1e-6:
            raise ValueError(f"fractions must sum to 1, got {fractions}")
        sizes = [int(f[0] * n), int(f[1] * n), n - int(f[0] * n) - int(f[1] * n)]
    perm = np.random.default_rng(seed).permutation(n)
    a, b = sizes[0], sizes[0] + sizes[1]
    return perm[:a], perm[a:b], perm[b : b + sizes[2]]


def _split_held_out(n: int, fractions: Sequence[float], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """With a separate fit reference: calibration / validation parts of the ``n`` held-out images from the last two
    of ``fractions`` (counts taken as they are; fractions rescaled to sum to 1)."""
    f = [float(v) for v in fractions]
    if len(f) != 3 or min(f) <= 0:
        raise ValueError(f"fractions must be three positive numbers, got {fractions}")
    if all(v.is_integer() and v >= 1 for v in f) and sum(f) > 3:  # counts
        n_cal, n_val = int(f[1]), int(f[2])
        if n_cal + n_val > n:
            raise ValueError(f"calibration / validation sizes {n_cal} + {n_val} exceed the {n} images given")
    else:
        n_cal = int(round(f[1] / (f[1] + f[2]) * n))
        n_val = n - n_cal
    perm = np.random.default_rng(seed).permutation(n)
    return perm[:n_cal], perm[n_cal : n_cal + n_val]


def _overlap(fit_x: np.ndarray, held_out: np.ndarray) -> int:
    """How many held-out images are byte-identical to a fit image (a fit bank holding calibration inputs would set
    the threshold on distances to themselves)."""
    seen = {row.tobytes() for row in np.ascontiguousarray(fit_x).reshape(len(fit_x), -1)}
    return sum(row.tobytes() in seen for row in np.ascontiguousarray(held_out).reshape(len(held_out), -1))


def _check_options(detectors: Sequence[Detector], combine: str, fpr: float) -> None:
    if not detectors:
        raise ValueError("at least one detector is needed")
    if combine not in COMBINERS:
        raise ValueError(f"combine must be one of {COMBINERS}")
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")


def _check_split(n: int, parts: Sequence[np.ndarray], fpr: float) -> None:
    """Every part needs a few inputs, and the calibration part enough to resolve ``fpr``."""
    if min(len(p) for p in parts) < 10:
        raise ValueError(f"too few calibration images ({n}) for a fit/calibration/validation split")
    n_cal, need = len(parts[1]), min_calibration_size(fpr)
    if n_cal < need:
        share = n_cal / max(1, n)  # the calibration part's share of the images the split was given
        more = f"give at least {math.ceil(need / share)} clean images, " if share > 0 else ""
        lowest = math.ceil(1e4 / (n_cal + 1)) / 1e4  # 1 / (n_cal + 1) rounded *up*, so the suggestion resolves
        raise ValueError(f"{n_cal} calibration inputs cannot resolve a false-positive rate of {fpr}; "
                         f"need at least {need} in the calibration part: {more}raise --fpr to at least "
                         f"{lowest:g}, or give the calibration part more of them with --fractions")


#: bytes the fit pass may hold in taps, logits and images at once (``calibrate --fit-memory``)
FIT_MEMORY = 4 << 30


def _fit_subset(model: OnnxModel, x: np.ndarray, labels: np.ndarray, memory: int) -> tuple[np.ndarray, np.ndarray]:
    """``x, labels`` when one forward pass over all of them (every output, plus the images) stays within ``memory``
    bytes, else a seeded random subset of the most images that does, in their original order, with a warning."""
    if len(x) <= 1:
        return x, labels
    per = x[0].nbytes + sum(a.nbytes for a in model.run(x[:1], None).values())
    most = max(1, int(memory // max(per, 1)))
    if len(x) <= most:
        return x, labels
    log.warning("the fit pass holds %.1f MiB per image: fitting on a random %d of the %d fit images to stay within "
                "%.1f GiB (raise it with --fit-memory)", per / 2**20, most, len(x), memory / 2**30)
    keep = np.sort(np.random.default_rng(0).choice(len(x), most, replace=False))
    return x[keep], labels[keep]


@dataclass
class _Stage:
    """What every step shares: the model, the detectors under their unique names, the outputs they read."""

    model: OnnxModel
    names: list[str]
    detectors: Sequence[Detector]
    outputs: list[str]

    def fit(self, x: np.ndarray, labels: np.ndarray, memory: int = FIT_MEMORY) -> int:
        """Fit every detector on one forward pass over the fit part; returns how many images it used. The pass yields
        every tap, since a detector built with ``taps=None`` picks its taps only in ``fit`` (and would otherwise run
        the model again for them); afterwards the stage reads just the taps the fitted detectors resolved. All of
        them are held at once, so when ``len(x)`` images' taps would take more than ``memory`` bytes the fit uses a
        seeded random subset that fits (a 224-pixel ResNet's taps take megabytes per image)."""
        x, labels = _fit_subset(self.model, x, labels, memory)
        obs = observe(self.model, x, None)
        for name, det in zip(self.names, self.detectors):
            log.info("fitting %s on %d clean inputs", name, len(x))
            det.fit(obs, labels, self.model)
        self._drop_redundant()
        self.outputs = needed_outputs(self.detectors)
        return len(x)

    def _drop_redundant(self) -> None:
        """A detector whose taps resolved to the same configuration as an earlier one's (the default's
        ``mahalanobis:tap=@0`` on a model whose only tap is ``penultimate``) would count the same evidence twice in
        the combination, and one that says it is uninformative on this model (:meth:`Detector.uninformative`:
        ``probe`` at the feature tap) would only dilute it: either is dropped from a set of several, with a
        warning, and the names are renumbered."""
        seen: dict[str, str] = {}
        kept: list[Detector] = []
        why = {name: det.uninformative() for name, det in zip(self.names, self.detectors)}
        if all(w is not None for w in why.values()):  # nothing informative left to keep: keep them all
            why = dict.fromkeys(why)
        for name, det in zip(self.names, self.detectors):
            if why[name] is not None:
                log.warning("%s %s on this model: dropped", name, why[name])
                continue
            params = {k: v for k, v in det.get_params().items() if k not in ("tap", "taps", "chunk_size")}
            key = json.dumps([det.name, params, list(det.requires)], sort_keys=True, default=str)
            if key in seen:
                log.warning("%s reads %s exactly as %s does on this model: dropped", name,
                            ", ".join(det.requires), seen[key])
                continue
            seen[key] = name
            kept.append(det)
        if len(kept) < len(self.detectors):
            self.detectors, self.names = kept, unique_names(kept)

    def score(self, x: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Raw per-detector scores and the predicted labels of one part (its observations are freed on return)."""
        obs = observe(self.model, x, self.outputs)
        return raw_scores(self.names, self.detectors, obs, self.model), obs["logits"].argmax(1)


def _fit_calibrator(stage: _Stage, cal_scores: Mapping[str, np.ndarray], cal_pred: np.ndarray, combine: str,
                    fpr: float, mondrian: bool) -> Calibrator:
    cal = Calibrator.fit(cal_scores, cal_pred, [d.two_sided for d in stage.detectors], combine, fpr,
                         stage.model.num_classes, mondrian)
    if mondrian and cal.fallback_classes:
        log.warning("Mondrian calibration: classes %s have fewer than %d calibration inputs and use the pooled "
                    "threshold", cal.fallback_classes, min_calibration_size(fpr))
    return cal


def _validate(stage: _Stage, cal: Calibrator, x_val: np.ndarray, y_val: np.ndarray,
              cal_scores: Mapping[str, np.ndarray], cal_pred: np.ndarray) -> tuple[dict[str, Any], dict[str, Any]]:
    """The held-out validation record (realised FPR overall, per detector and per class; clean accuracy) and the
    target-class alarm's null, from the leave-one-out calibration flags plus the validation flags."""
    k = stage.model.num_classes
    val_scores, val_pred = stage.score(x_val)
    val_combined, val_p, _ = cal.pvalues(val_scores, val_pred)
    val_thr = cal.thresholds(val_pred)
    val_flags = val_combined <= val_thr
    validation: dict[str, Any] = RateEstimate.of(val_flags).to_json()
    validation["per_detector_rate_at_threshold"] = {
        n: float(np.mean(val_p[:, i] <= val_thr)) for i, n in enumerate(stage.names)
    }
    validation["clean_accuracy"] = float(np.mean(val_pred == y_val))
    validation["per_class"] = {
        stage.model.class_names[c]: RateEstimate.of(val_flags[val_pred == c]).to_json()
        for c in range(k) if np.any(val_pred == c)
    }
    cal_loo, _, _ = cal.pvalues(cal_scores, cal_pred, leave_one_out=True)
    clean_flag_pred = np.r_[cal_pred[cal_loo <= cal.thresholds(cal_pred)], val_pred[val_flags]]
    null_alpha, null_method = alarm_null(clean_flag_pred, cal_pred, k)
    alarm = {"method": null_method, "dirichlet": [float(a) for a in null_alpha],
             "probs": [float(a / null_alpha.sum()) for a in null_alpha]}
    return validation, alarm


# ------------------------------------------------------------------------------------------------ writing


@contextmanager
def _staged_writer(out_dir: str | os.PathLike, overwrite: bool) -> Iterator[BundleWriter]:
    """A :class:`BundleWriter` for ``out_dir``; an ``.zip`` name is built in a private directory beside it and packed
    once the body (which commits the manifest) succeeds. Aborts the writer on any failure."""
    archive = is_archive(out_dir)
    if archive and Path(out_dir).exists() and not overwrite:
        raise BundleError(f"{out_dir} exists; pass overwrite=True (--force) to replace it")
    staging = None
    if archive:
        Path(out_dir).parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".bundle-", dir=Path(out_dir).parent))
    bundle_dir = staging / "bundle" if staging else Path(out_dir)
    writer = BundleWriter(bundle_dir, overwrite=overwrite)
    try:
        yield writer
        if archive:
            pack_bundle(bundle_dir, out_dir, overwrite=True)
    except BaseException:
        writer.abort()
        raise
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)


def _detector_entries(writer: BundleWriter, names: Sequence[str],
                      detectors: Sequence[Detector]) -> list[dict[str, Any]]:
    """Write each detector's arrays; the manifest entries that describe (and hash) them."""
    entries = []
    for name, det in zip(names, detectors):
        fname = f"detectors/{file_key(name)}.npz"
        digest = writer.add_arrays(fname, det.state_dict())
        entries.append({"name": name, "type": det.name, "params": det.get_params(),
                        "two_sided": bool(det.two_sided), "tail_kinds": dict(det.tail_kinds),
                        "requires": list(det.requires), "state_file": fname, "sha256": digest})
    return entries


def _write_bundle(writer: BundleWriter, model_path: str | os.PathLike, stage: _Stage,
                  cal_scores: Mapping[str, np.ndarray], cal_pred: np.ndarray, calibration: Mapping[str, Any],
                  provenance: Mapping[str, Any] | None) -> dict[str, Any]:
    """Write the model, the detectors and the calibration arrays, then commit the manifest that hashes them."""
    model = stage.model
    model_sha = writer.add_file(model_path, MODEL_FILE)
    det_entries = _detector_entries(writer, stage.names, stage.detectors)
    cal_sha = writer.add_arrays(CALIBRATION_FILE, {"pred": cal_pred.astype(np.int64),
                                                   **{f"scores__{file_key(n)}": s for n, s in cal_scores.items()}})
    meta = model.meta
    return writer.commit({
        "input": {"name": model.input_name, "shape": list(model.input_shape), "layout": "NCHW",
                  "dtype": "float32", "range": [0.0, 1.0],
                  "accepts": "uint8 NHWC (or NHW grayscale), float NCHW/NHWC in [0, 1], PIL images",
                  "normalization": meta.get("normalization")},
        "class_names": list(model.class_names),
        "taps": list(model.tap_names),
        "outputs_used": stage.outputs,
        "model": {"file": MODEL_FILE, "sha256": model_sha, "metadata": meta},
        "detectors": det_entries,
        "calibration": {"file": CALIBRATION_FILE, "sha256": cal_sha, **calibration},
        "provenance": {
            "model": {key: meta.get(key) for key in ("arch", "dataset", "source_checkpoint_sha256", "training",
                                                      "torch_version", "opset") if key in meta}
            | {"onnx_sha256": model_sha},
            **dict(provenance or {}),
        },
    })


# ------------------------------------------------------------------------------------------------ the job


def calibrate_bundle(
    model_path: str | os.PathLike,
    images: np.ndarray,
    labels: np.ndarray,
    detectors: Sequence[Detector],
    out_dir: str | os.PathLike,
    *,
    fpr: float = 0.01,
    fractions: Sequence[float] = (0.5, 0.3, 0.2),
    combine: str = DEFAULT_COMBINE,
    mondrian: bool = False,
    seed: int = 0,
    overwrite: bool = False,
    provenance: Mapping[str, Any] | None = None,
    providers: Sequence[str] | None = None,
    fit_images: np.ndarray | None = None,
    fit_labels: np.ndarray | None = None,
    fit_memory: int = FIT_MEMORY,
) -> dict[str, Any]:
    """Fit ``detectors`` on clean labelled images, calibrate the guard to ``fpr`` and write a bundle.

    ``fractions`` split the images into fit / calibration / validation parts (seeded permutation; three fractions
    summing to 1, or three counts). With ``fit_images`` / ``fit_labels`` (e.g. the training set: a larger reference
    than the held-out data, as the k-NN and Mahalanobis papers use) the detectors learn from those instead and
    ``images`` are split into calibration / validation parts by the last two fractions; held-out images identical to
    a fit image are refused beyond 1% (they would bias the threshold). The fit pass holds every tap of every fit
    image at once: beyond ``fit_memory`` bytes it uses a random subset (logged; the manifest's split records both
    counts). ``mondrian`` calibrates per predicted class.
    ``out_dir`` ending in ``.zip`` writes a single-file archive instead of a directory. Returns the manifest.
    """
    _check_options(detectors, combine, fpr)
    model = OnnxModel(model_path, providers=providers)
    x = to_model_input(images, model.input_shape)
    labels = np.asarray(labels, np.int64)
    if labels.shape != (len(x),):
        raise ValueError(f"{len(labels)} labels for {len(x)} images")
    if fit_images is None:
        fit_idx, cal_idx, val_idx = _split(len(x), fractions, seed)
        _check_split(len(x), (fit_idx, cal_idx, val_idx), fpr)
        fit_x, fit_y = x[fit_idx], labels[fit_idx]
    else:
        fit_x = to_model_input(fit_images, model.input_shape)
        fit_y = np.asarray(fit_labels, np.int64)
        if fit_y.shape != (len(fit_x),):
            raise ValueError(f"{len(fit_y)} fit labels for {len(fit_x)} fit images")
        cal_idx, val_idx = _split_held_out(len(x), fractions, seed)
        _check_split(len(x), (fit_x, cal_idx, val_idx), fpr)
        shared = _overlap(fit_x, x[np.r_[cal_idx, val_idx]])
        if shared > 0.01 * (len(cal_idx) + len(val_idx)):
            raise ValueError(f"{shared} of the {len(cal_idx) + len(val_idx)} calibration / validation images are also "
                             "in the fit data: calibrate on held-out images")
        if shared:
            log.warning("%d calibration / validation images are also in the fit data", shared)

    stage = _Stage(model, unique_names(detectors), detectors, needed_outputs(detectors))
    n_fit = stage.fit(fit_x, fit_y, fit_memory)
    cal_scores, cal_pred = stage.score(x[cal_idx])
    cal = _fit_calibrator(stage, cal_scores, cal_pred, combine, fpr, mondrian)
    validation, alarm = _validate(stage, cal, x[val_idx], labels[val_idx], cal_scores, cal_pred)
    calibration = {
        **cal.to_json(), "fpr_target": fpr, "seed": seed, "fractions": [float(f) for f in fractions],
        "split": {"fit": n_fit, "calibration": len(cal_idx), "validation": len(val_idx),
                  **({} if fit_images is None else {"fit_from": "fit_images"}),
                  **({} if n_fit == len(fit_x) else {"fit_offered": len(fit_x)})},
        "predicted_class_counts": np.bincount(cal_pred, minlength=model.num_classes).tolist(),
        "alarm_null": alarm, "validation": validation,
    }
    with _staged_writer(out_dir, overwrite) as writer:
        manifest = _write_bundle(writer, model_path, stage, cal_scores, cal_pred, calibration, provenance)
    return manifest
