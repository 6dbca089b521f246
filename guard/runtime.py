"""The runtime guard: calibrate detectors on clean data into a bundle, then score every input against it.

``calibrate_bundle`` splits clean labelled images into *fit* (detectors learn), *calibration* (each detector's clean
score distribution, the combined p-value threshold) and *validation* (the realised false-positive rate) parts.
``Guard.load(bundle).inspect(images)`` returns one :class:`Verdict` per input; ``predict`` returns labels and a
flag mask without building per-input objects.

Combining detectors: every detector's score becomes a conformal p-value against its clean calibration scores
(two-sided detectors: both tails); the p-values are combined with **Fisher's method by default**
(``-2 sum log p ~ chi2_2k``), which adds up evidence when several detectors lean the same way — a backdoor input
is extreme on several statistics at once (Jin et al.'s framework). ``min-p`` (Bonferroni) is the alternative when
one detector is expected to fire alone. Detectors are correlated, so neither combination is exactly calibrated by
itself; the guard therefore sets its threshold *on the combined p-value* from clean calibration data, so the guard as
a whole flags the target fraction of clean inputs rather than k times it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from abl_guard.detectors import Detector, detector_from_state
from abl_guard.detectors._util import softmax

from .bundle import (
    MODEL_FILE,
    BundleError,
    BundleLimits,
    BundleWriter,
    bundle_file,
    is_archive,
    load_arrays,
    open_bundle,
    pack_bundle,
)
from .calibration import COMBINERS, Calibrator, RateEstimate, alarm_null, min_calibration_size
from .model import OnnxModel
from .preprocess import to_model_input

log = logging.getLogger(__name__)

DEFAULT_COMBINE = "fisher"


@dataclass
class Verdict:
    """The guard's answer for one input.

    ``p_value`` is the combined p-value (small = unlike clean data); ``flagged`` is ``p_value <= p_threshold``
    (the threshold of the input's predicted class under Mondrian calibration). ``score = -log10(p_value)`` and
    ``threshold = -log10(p_threshold)`` give the same decision on a higher-is-more-suspicious scale. ``kind`` names
    what the most significant detector's tail suggests (only for flagged inputs).
    """

    label: int
    class_name: str
    confidence: float
    flagged: bool
    p_value: float
    p_threshold: float
    kind: str | None
    detectors: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def score(self) -> float:
        return float(-np.log10(max(self.p_value, 1e-300)))

    @property
    def threshold(self) -> float:
        return float(-np.log10(self.p_threshold)) if self.p_threshold > 0 else float("inf")

    def to_json(self) -> dict[str, Any]:
        thr = self.threshold
        return {
            "label": self.label, "class_name": self.class_name, "confidence": round(self.confidence, 6),
            "flagged": self.flagged, "score": round(self.score, 6),
            "threshold": round(thr, 6) if np.isfinite(thr) else None,
            "p_value": self.p_value, "kind": self.kind, "detectors": self.detectors,
        }


@dataclass
class Inspection:
    """A batch's verdicts as arrays (what :meth:`Guard.inspect` turns into :class:`Verdict` objects)."""

    labels: np.ndarray  # (N,) int64
    confidence: np.ndarray  # (N,) softmax probability of the label
    p_value: np.ndarray  # (N,) combined p-value
    p_threshold: np.ndarray  # (N,) threshold that applied
    pvals: np.ndarray  # (N, k) per-detector p-values
    low_tail: np.ndarray  # (N, k) bool: the low tail fired (two-sided detectors)
    scores: dict[str, np.ndarray]  # raw per-detector scores

    @property
    def flagged(self) -> np.ndarray:
        return self.p_value <= self.p_threshold

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def concat(parts: Sequence[Inspection]) -> Inspection:
        if len(parts) == 1:
            return parts[0]
        return Inspection(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                            ("labels", "confidence", "p_value", "p_threshold", "pvals", "low_tail")),
                          {n: np.concatenate([p.scores[n] for p in parts]) for n in parts[0].scores})


def _finite(v: float) -> float | None:
    """JSON has no NaN/Infinity: a non-finite raw score is recorded as null (its p-value still says how extreme)."""
    v = float(v)
    return v if np.isfinite(v) else None


def unique_names(detectors: Sequence[Detector]) -> list[str]:
    names, seen = [], {}
    for d in detectors:
        n = d.name
        seen[n] = seen.get(n, 0) + 1
        names.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return names


def needed_outputs(detectors: Sequence[Detector]) -> list[str]:
    """Model outputs the detectors read (plus logits): the single forward pass asks for these only."""
    need = {"logits"}
    for d in detectors:
        need.update(r for r in d.requires if r != "input")
    return sorted(need)


def observe(model: OnnxModel, x: np.ndarray, outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    obs = model.run(x, outputs)
    obs["input"] = x
    return obs


def _raw_scores(names: Sequence[str], detectors: Sequence[Detector], obs: Mapping[str, np.ndarray],
                model: OnnxModel) -> dict[str, np.ndarray]:
    out = {}
    for n, d in zip(names, detectors):
        s = np.asarray(d.score(obs, model), np.float64)
        if s.shape != (len(obs["logits"]),):
            raise RuntimeError(f"detector {n} returned {s.shape} scores for {len(obs['logits'])} inputs")
        out[n] = s
    return out


def _file_key(name: str) -> str:
    return name.replace("#", "_")


file_key = _file_key  # public: guard/report.py names the calibration arrays with it


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
) -> dict[str, Any]:
    """Fit ``detectors`` on clean labelled images, calibrate the guard to ``fpr`` and write a bundle.

    ``fractions`` split the images into fit / calibration / validation parts (seeded permutation; three fractions
    summing to 1, or three counts). ``mondrian`` calibrates per predicted class. ``out_dir`` ending in ``.zip``
    writes a single-file archive instead of a directory. Returns the manifest.
    """
    if not detectors:
        raise ValueError("at least one detector is needed")
    if combine not in COMBINERS:
        raise ValueError(f"combine must be one of {COMBINERS}")
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    model = OnnxModel(model_path, providers=providers)
    x = to_model_input(images, model.input_shape)
    labels = np.asarray(labels, np.int64)
    if labels.shape != (len(x),):
        raise ValueError(f"{len(labels)} labels for {len(x)} images")
    fit_idx, cal_idx, val_idx = _split(len(x), fractions, seed)
    if min(len(fit_idx), len(cal_idx), len(val_idx)) < 10:
        raise ValueError(f"too few calibration images ({len(x)}) for a fit/calibration/validation split")
    if len(cal_idx) < min_calibration_size(fpr):
        raise ValueError(f"{len(cal_idx)} calibration inputs cannot resolve a false-positive rate of {fpr}; "
                         f"need at least {min_calibration_size(fpr)} in the calibration part")

    names = unique_names(detectors)
    outputs = needed_outputs(detectors)
    obs_fit = observe(model, x[fit_idx], outputs)
    for name, det in zip(names, detectors):
        log.info("fitting %s on %d clean inputs", name, len(fit_idx))
        det.fit(obs_fit, labels[fit_idx], model)
    del obs_fit

    obs_cal = observe(model, x[cal_idx], outputs)
    cal_scores = _raw_scores(names, detectors, obs_cal, model)
    cal_pred = obs_cal["logits"].argmax(1)
    del obs_cal
    k = model.num_classes
    cal = Calibrator.fit(cal_scores, cal_pred, [d.two_sided for d in detectors], combine, fpr, k, mondrian)
    if mondrian and cal.fallback_classes:
        log.warning("Mondrian calibration: classes %s have fewer than %d calibration inputs and use the pooled "
                    "threshold", cal.fallback_classes, min_calibration_size(fpr))
    cal_loo, _, _ = cal.pvalues(cal_scores, cal_pred, leave_one_out=True)

    obs_val = observe(model, x[val_idx], outputs)
    val_scores = _raw_scores(names, detectors, obs_val, model)
    val_pred = obs_val["logits"].argmax(1)
    val_combined, val_p, _ = cal.pvalues(val_scores, val_pred)
    val_thr = cal.thresholds(val_pred)
    val_flags = val_combined <= val_thr
    validation: dict[str, Any] = RateEstimate.of(val_flags).to_json()
    validation["per_detector_rate_at_threshold"] = {
        n: float(np.mean(val_p[:, i] <= val_thr)) for i, n in enumerate(names)
    }
    validation["clean_accuracy"] = float(np.mean(val_pred == labels[val_idx]))
    clean_flag_pred = np.r_[cal_pred[cal_loo <= cal.thresholds(cal_pred)], val_pred[val_flags]]
    null_alpha, null_method = alarm_null(clean_flag_pred, cal_pred, k)
    validation["per_class"] = {
        model.class_names[c]: RateEstimate.of(val_flags[val_pred == c]).to_json()
        for c in range(k) if np.any(val_pred == c)
    }

    archive = is_archive(out_dir)
    if archive and Path(out_dir).exists() and not overwrite:
        raise BundleError(f"{out_dir} exists; pass overwrite=True (--force) to replace it")
    staging = None
    if archive:  # build the directory privately, then pack it
        Path(out_dir).parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".bundle-", dir=Path(out_dir).parent))
    bundle_dir = staging / "bundle" if staging else Path(out_dir)
    writer = BundleWriter(bundle_dir, overwrite=overwrite)
    try:
        model_sha = writer.add_file(model_path, MODEL_FILE)
        det_entries = []
        for name, det in zip(names, detectors):
            fname = f"detectors/{_file_key(name)}.npz"
            digest = writer.add_arrays(fname, det.state_dict())
            det_entries.append({"name": name, "type": det.name, "params": det.get_params(),
                                "two_sided": bool(det.two_sided), "tail_kinds": dict(det.tail_kinds),
                                "requires": list(det.requires), "state_file": fname, "sha256": digest})
        cal_file = "calibration.npz"
        cal_sha = writer.add_arrays(cal_file, {"pred": cal_pred.astype(np.int64),
                                               **{f"scores__{_file_key(n)}": s for n, s in cal_scores.items()}})
        meta = model.meta
        manifest = writer.commit({
            "input": {"name": model.input_name, "shape": list(model.input_shape), "layout": "NCHW",
                      "dtype": "float32", "range": [0.0, 1.0],
                      "accepts": "uint8 NHWC (or NHW grayscale), float NCHW/NHWC in [0, 1], PIL images",
                      "normalization": meta.get("normalization")},
            "class_names": list(model.class_names),
            "taps": list(model.tap_names),
            "outputs_used": outputs,
            "model": {"file": MODEL_FILE, "sha256": model_sha, "metadata": meta},
            "detectors": det_entries,
            "calibration": {
                "file": cal_file, "sha256": cal_sha, **cal.to_json(), "fpr_target": fpr, "seed": seed,
                "fractions": [float(f) for f in fractions],
                "split": {"fit": len(fit_idx), "calibration": len(cal_idx), "validation": len(val_idx)},
                "predicted_class_counts": np.bincount(cal_pred, minlength=k).tolist(),
                "alarm_null": {"method": null_method, "dirichlet": [float(a) for a in null_alpha],
                               "probs": [float(a / null_alpha.sum()) for a in null_alpha]},
                "validation": validation,
            },
            "provenance": {
                "model": {key: meta.get(key) for key in ("arch", "dataset", "source_checkpoint_sha256", "training",
                                                          "torch_version", "opset") if key in meta}
                | {"onnx_sha256": model_sha},
                **dict(provenance or {}),
            },
        })
        if archive:
            pack_bundle(bundle_dir, out_dir, overwrite=True)
    except BaseException:
        writer.abort()
        raise
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
    return manifest


def calibrator_from_manifest(manifest: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Calibrator:
    """The bundle's :class:`Calibrator` from its manifest and ``calibration.npz`` arrays (no model needed)."""
    cal = manifest["calibration"]
    entries = manifest["detectors"]
    scores = {e["name"]: arrays[f"scores__{_file_key(e['name'])}"] for e in entries}
    return Calibrator(scores, arrays["pred"], [bool(e["two_sided"]) for e in entries], cal["combine"],
                      len(manifest["class_names"]), cal["p_threshold"], cal.get("mondrian", False),
                      cal.get("class_thresholds"), cal.get("fallback_classes") or ())


class _BlasThreads:
    """Caps BLAS threads while detectors score. Detector arithmetic is small (a batch times a few hundred features),
    where OpenBLAS's threads only contend with onnxruntime's for the same cores: on 2 shared cores one Mahalanobis
    batch of 64 took 18 ms with 2 BLAS threads and 0.7 ms with 1 (and 1 thread wins from batch 4 on even without
    onnxruntime running). Uses threadpoolctl (a scikit-learn dependency); a no-op without it. BLAS has only a
    process-wide setting, so concurrent callers share one cap: the first to enter sets it, the last to leave
    restores the previous setting (no flip-flopping under a running call)."""

    MIN_BATCH = 4  # below this OpenBLAS stays single-threaded anyway; skip the (microsecond) bookkeeping
    _lock = threading.Lock()
    _holders = 0
    _saved: list[int] = []
    _libs: list[Any] | None = None

    def __init__(self, threads: int | None) -> None:
        self.threads = threads

    @contextlib.contextmanager
    def __call__(self, batch: int) -> Iterator[None]:
        if self.threads is None or batch < self.MIN_BATCH:
            yield
            return
        cls = type(self)
        with cls._lock:
            if cls._libs is None:  # finding the BLAS libraries takes ~0.3 ms: once per process
                try:
                    from threadpoolctl import ThreadpoolController

                    cls._libs = list(ThreadpoolController().select(user_api="blas").lib_controllers)
                except ImportError:
                    cls._libs = []
            if cls._holders == 0:
                cls._saved = [lib.get_num_threads() for lib in cls._libs]
                for lib in cls._libs:
                    lib.set_num_threads(self.threads)
            cls._holders += 1
        try:
            yield
        finally:
            with cls._lock:
                cls._holders -= 1
                if cls._holders == 0:
                    for lib, n in zip(cls._libs, cls._saved):
                        lib.set_num_threads(n)


class Guard:
    """A loaded guard bundle: ``inspect`` answers with verdicts, ``predict`` with labels and a flag mask.

    Thread-safe: one onnxruntime session serves concurrent ``run`` calls, and neither the detectors nor the
    calibrator are modified after loading — every call works on its own arrays. Large inputs are processed in chunks
    of ``batch_size`` (automatic batching), so memory stays bounded whatever a caller hands in.
    """

    def __init__(self, model: OnnxModel, names: Sequence[str], detectors: Sequence[Detector],
                 calibrator: Calibrator, manifest: dict[str, Any], blas_threads: int | None = 1) -> None:
        self.model = model
        self._blas = _BlasThreads(blas_threads)
        self.names = list(names)
        self.detectors = list(detectors)
        self.calibrator = calibrator
        self.manifest = manifest
        self.batch_size = model.batch_size
        self._outputs = needed_outputs(self.detectors)
        self._kinds = [(d.tail_kinds.get("high", "anomalous"), d.tail_kinds.get("low", "anomalous"))
                       for d in self.detectors]

    @classmethod
    def load(cls, path: str | os.PathLike, providers: Sequence[str] | None = None,
             batch_size: int = 256, intra_op_threads: int | None = None, blas_threads: int | None = 1,
             allow_spinning: bool | None = False, limits: BundleLimits | None = None) -> Guard:
        """Load a bundle directory or ``.zip`` archive, verifying every hash and the format version.

        ``providers`` are onnxruntime execution providers (default: CUDA when available, else CPU);
        ``intra_op_threads`` sets its thread pool (default: onnxruntime's, one per core). ``allow_spinning`` is off by
        default: the guard alternates onnxruntime with numpy work, and onnxruntime's busy-waiting idle workers would
        compete with it for the cores (``None``: onnxruntime's default). ``blas_threads`` caps BLAS threads while
        detectors score (``None``: leave BLAS alone). ``batch_size`` bounds how many inputs are converted and scored
        at once. ``limits`` caps what opening the bundle may cost (:class:`~guard.bundle.BundleLimits`). Raises
        :class:`~guard.bundle.BundleError` when the bundle is not sound.
        """
        with open_bundle(path, limits) as (root, manifest):
            try:  # every file opened is a hashed member of the bundle (bundle_file)
                model_file = bundle_file(root, manifest, manifest["model"]["file"])
                try:
                    model = OnnxModel(model_file, providers=providers, batch_size=batch_size,
                                      intra_op_threads=intra_op_threads, allow_spinning=allow_spinning)
                except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types; not an ONNX model
                    raise BundleError(f"{path}: {manifest['model']['file']} is not a usable abl-guard ONNX model: "
                                      f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
                cal = manifest["calibration"]
                arrays = load_arrays(bundle_file(root, manifest, cal["file"]), limits)
                names, dets = [], []
                for entry in manifest["detectors"]:
                    dets.append(detector_from_state(entry["type"], entry["params"],
                                                    load_arrays(bundle_file(root, manifest, entry["state_file"]),
                                                                limits)))
                    names.append(entry["name"])
                calibrator = calibrator_from_manifest(manifest, arrays)
            except BundleError:
                raise
            except (KeyError, ValueError, TypeError, AttributeError, IndexError, RecursionError) as e:
                raise BundleError(f"{path}: bundle content does not match this abl-guard: {e!r}"[:500]) from e
        return cls(model, names, dets, calibrator, manifest, blas_threads)

    # ------------------------------------------------------------------ properties

    @property
    def detector_names(self) -> list[str]:
        return list(self.names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.model.input_shape

    @property
    def class_names(self) -> list[str]:
        return list(self.model.class_names)

    @property
    def p_threshold(self) -> float:
        """The pooled threshold (Mondrian bundles also have one per class: ``calibrator.class_thresholds``)."""
        return self.calibrator.p_threshold

    # ------------------------------------------------------------------ scoring

    def _chunks(self, x: Any) -> list[Any]:
        """Split a large batch before conversion so float copies never exceed ``batch_size`` inputs."""
        c, h, w = self.model.input_shape
        b = self.batch_size
        if isinstance(x, np.ndarray):
            batched = x.ndim == 4 or (x.ndim == 3 and c == 1 and x.shape[1:] == (h, w))
            if batched and len(x) > b:
                return [x[s : s + b] for s in range(0, len(x), b)]
        elif isinstance(x, (list, tuple)) and len(x) > b:
            return [x[s : s + b] for s in range(0, len(x), b)]
        return [x]

    def _inspect_float(self, xf: np.ndarray) -> Inspection:
        return self.inspect_observations(observe(self.model, xf, self._outputs))

    def inspect_observations(self, obs: Mapping[str, np.ndarray]) -> Inspection:
        """Verdicts from one forward pass's arrays (``logits``, the taps, and the canonical ``input`` when a
        detector reads it) — for callers that ran the model themselves (:class:`~guard.session.GuardedSession`)."""
        with self._blas(len(obs["logits"])):
            raw = _raw_scores(self.names, self.detectors, obs, self.model)
        probs = softmax(obs["logits"].astype(np.float64))
        labels = probs.argmax(1)
        combined, P, low = self.calibrator.pvalues(raw, labels)
        return Inspection(labels.astype(np.int64), probs[np.arange(len(labels)), labels], combined,
                          self.calibrator.thresholds(labels), P, low, raw)

    def inspect_arrays(self, x: Any) -> Inspection:
        """Verdicts for a batch as arrays (see :class:`Inspection`); validates the input like :meth:`inspect`."""
        parts = [self._inspect_float(to_model_input(chunk, self.model.input_shape)) for chunk in self._chunks(x)]
        return Inspection.concat(parts)

    def verdicts(self, ins: Inspection) -> list[Verdict]:
        """Turn an :class:`Inspection` into one :class:`Verdict` per input."""
        flagged = ins.flagged
        out = []
        for i in range(len(ins)):
            j = int(np.argmin(ins.pvals[i]))
            kind = self._kinds[j][int(ins.low_tail[i, j])] if flagged[i] else None
            dets = {n: {"score": _finite(ins.scores[n][i]), "p_value": float(ins.pvals[i, k]),
                        "tail": "low" if ins.low_tail[i, k] else "high"} for k, n in enumerate(self.names)}
            lab = int(ins.labels[i])
            out.append(Verdict(lab, self.model.class_names[lab], float(ins.confidence[i]), bool(flagged[i]),
                               float(ins.p_value[i]), float(ins.p_threshold[i]), kind, dets))
        return out

    def inspect(self, x: Any) -> list[Verdict]:
        """One :class:`Verdict` per input of a batch.

        ``x``: uint8 images ``(N, H, W, C)`` / ``(N, H, W)`` / one ``(H, W[, C])``, float images in [0, 1] as NCHW
        or NHWC, or PIL images (converted and resized). Raises :class:`~guard.preprocess.InputError` (a
        ``ValueError``) on a wrong shape, dtype, NaN/inf or value range.
        """
        return self.verdicts(self.inspect_arrays(x))

    def predict(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(labels, flagged)`` arrays for a batch — the fast path for serving."""
        ins = self.inspect_arrays(x)
        return ins.labels, ins.flagged
