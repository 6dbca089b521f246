"""The runtime guard: score every input against a calibrated bundle.

``Guard.load(bundle).inspect(images)`` returns one :class:`Verdict` per input; ``predict`` returns labels and a
flag mask without building per-input objects. Bundles are written by :func:`~abl_guard.guard.build.calibrate_bundle`
(re-exported here); the forward pass and raw scoring below (:func:`observe`, :func:`needed_outputs`,
:func:`raw_scores`) are shared with it, so a guard scores exactly as it was calibrated.

Combining detectors: every detector's score becomes a conformal p-value against its clean calibration scores
(two-sided detectors: both tails); the p-values are combined with **Fisher's method by default**
(``-2 sum log p ~ chi2_2k``), which adds up evidence when several detectors lean the same way — a backdoor input
is extreme on several statistics at once (Jin et al.'s framework). ``min-p`` (Bonferroni) is the alternative when
one detector is expected to fire alone. Detectors are correlated, so neither combination is exactly calibrated by
itself; the guard therefore sets its threshold *on the combined p-value* from clean calibration data, so the guard as
a whole flags the target fraction of clean inputs rather than k times it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from abl_guard.detectors import Detector, detector_from_state, instance_names
from abl_guard.detectors._util import softmax

from .bundle import BundleError, BundleLimits, bundle_file, load_arrays, open_bundle
from .calibration import Calibrator
from .model import OnnxModel
from .preprocess import to_model_input
from .threads import BlasThreads

if TYPE_CHECKING:
    from .build import calibrate_bundle as calibrate_bundle  # re-exported (see __getattr__ below)

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

        def cat(f: str) -> np.ndarray:
            return np.concatenate([getattr(p, f) for p in parts])

        return Inspection(cat("labels"), cat("confidence"), cat("p_value"), cat("p_threshold"), cat("pvals"),
                          cat("low_tail"), {n: np.concatenate([p.scores[n] for p in parts]) for n in parts[0].scores})


def _finite(v: float) -> float | None:
    """JSON has no NaN/Infinity: a non-finite raw score is recorded as null (its p-value still says how extreme)."""
    v = float(v)
    return v if np.isfinite(v) else None


def unique_names(detectors: Sequence[Detector]) -> list[str]:
    """Detector names made unique by order of appearance (:func:`instance_names`): the bundle's detector keys."""
    return instance_names([d.name for d in detectors])


def needed_outputs(detectors: Sequence[Detector]) -> list[str]:
    """Model outputs the detectors read (plus logits): the single forward pass asks for these only."""
    need = {"logits"}
    for d in detectors:
        need.update(r for r in d.requires if r != "input")
    return sorted(need)


def observe(model: OnnxModel, x: np.ndarray, outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """One forward pass: the model's ``outputs`` (all when None) plus the canonical input under ``input``."""
    obs = model.run(x, outputs)
    obs["input"] = x
    return obs


def raw_scores(names: Sequence[str], detectors: Sequence[Detector], obs: Mapping[str, np.ndarray],
               model: OnnxModel) -> dict[str, np.ndarray]:
    """Each detector's raw scores for one forward pass's observations, checked to be one float per input."""
    out = {}
    for n, d in zip(names, detectors):
        s = np.asarray(d.score(obs, model), np.float64)
        if s.shape != (len(obs["logits"]),):
            raise RuntimeError(f"detector {n} returned {s.shape} scores for {len(obs['logits'])} inputs")
        out[n] = s
    return out


def file_key(name: str) -> str:
    """A detector's name as it appears in bundle file and array names (``#`` of repeated detectors -> ``_``)."""
    return name.replace("#", "_")


def calibrator_from_manifest(manifest: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Calibrator:
    """The bundle's :class:`Calibrator` from its manifest and ``calibration.npz`` arrays (no model needed)."""
    cal = manifest["calibration"]
    entries = manifest["detectors"]
    scores = {e["name"]: arrays[f"scores__{file_key(e['name'])}"] for e in entries}
    return Calibrator(scores, arrays["pred"], [bool(e["two_sided"]) for e in entries], cal["combine"],
                      len(manifest["class_names"]), cal["p_threshold"], cal.get("mondrian", False),
                      cal.get("class_thresholds"), cal.get("fallback_classes") or (),
                      tails=bool(cal.get("tails", False)))  # bundles from before the tails were calibrated without


class Guard:
    """A loaded guard bundle: ``inspect`` answers with verdicts, ``predict`` with labels and a flag mask.

    Thread-safe: one onnxruntime session serves concurrent ``run`` calls, and neither the detectors nor the
    calibrator are modified after loading — every call works on its own arrays. Large inputs are processed in chunks
    of ``batch_size`` (automatic batching), so memory stays bounded whatever a caller hands in.
    """

    def __init__(self, model: OnnxModel, names: Sequence[str], detectors: Sequence[Detector],
                 calibrator: Calibrator, manifest: dict[str, Any], blas_threads: int | None = 1) -> None:
        self.model = model
        self._blas = BlasThreads(blas_threads)
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
            raw = raw_scores(self.names, self.detectors, obs, self.model)
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


if not TYPE_CHECKING:

    def __getattr__(name: str) -> Any:
        """``calibrate_bundle`` lives in :mod:`.build`, which imports this module: re-exported here on first use."""
        if name == "calibrate_bundle":
            from .build import calibrate_bundle

            return calibrate_bundle
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
