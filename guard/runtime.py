"""The runtime guard: calibrate detectors on clean data into a bundle, then score every input against it.

``calibrate_bundle`` splits clean labelled images into *fit* (detectors learn), *calibration* (each detector's clean
score distribution, the combined p-value threshold) and *validation* (the realised false-positive rate) parts.
``Guard.load(bundle).inspect(images)`` returns one :class:`Verdict` per input.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from detectors import Detector, detector_from_state

from .bundle import MODEL_FILE, BundleWriter, load_arrays, read_manifest
from .calibration import COMBINERS, RateEstimate, combine_pvalues, conformal_pvalues, threshold_for_fpr
from .model import OnnxModel
from .preprocess import to_model_input

log = logging.getLogger(__name__)


@dataclass
class Verdict:
    """The guard's answer for one input.

    ``p_value`` is the combined p-value (small = unlike clean data); ``flagged`` is ``p_value <= p_threshold``.
    ``score = -log10(p_value)`` and ``threshold = -log10(p_threshold)`` give the same decision on a
    higher-is-more-suspicious scale. ``kind`` names what the most significant detector's tail suggests.
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
        return {
            "label": self.label, "class_name": self.class_name, "confidence": round(self.confidence, 6),
            "flagged": self.flagged, "score": round(self.score, 6), "threshold": round(self.threshold, 6),
            "p_value": self.p_value, "kind": self.kind, "detectors": self.detectors,
        }


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def unique_names(detectors: Sequence[Detector]) -> list[str]:
    names, seen = [], {}
    for d in detectors:
        n = d.name
        seen[n] = seen.get(n, 0) + 1
        names.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return names


class _Scorer:
    """Detectors + their clean calibration scores -> per-detector p-values and the combined p-value."""

    def __init__(self, names: list[str], detectors: list[Detector], cal_scores: Mapping[str, np.ndarray],
                 combine: str) -> None:
        self.names, self.detectors, self.combine = names, detectors, combine
        self.cal_scores = {n: np.sort(np.asarray(cal_scores[n], np.float64)) for n in names}

    @property
    def outputs(self) -> list[str]:
        return needed_outputs(self.detectors)

    def raw_scores(self, obs: Mapping[str, np.ndarray], model: OnnxModel) -> dict[str, np.ndarray]:
        return {n: np.asarray(d.score(obs, model), np.float64) for n, d in zip(self.names, self.detectors)}

    def pvalues(self, scores: Mapping[str, np.ndarray], leave_one_out: bool = False
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Returns ``(combined_p (N,), per_detector_p (N, k), tails (N, k))``."""
        ps, tails = [], []
        for n, d in zip(self.names, self.detectors):
            p, t = conformal_pvalues(self.cal_scores[n], scores[n], d.two_sided, leave_one_out)
            ps.append(p)
            tails.append(t)
        P = np.stack(ps, axis=1)
        combined = P[:, 0] if len(self.names) == 1 else combine_pvalues(P, self.combine)
        return combined, P, np.stack(tails, axis=1)


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


def calibrate_bundle(
    model_path: str | os.PathLike,
    images: np.ndarray,
    labels: np.ndarray,
    detectors: Sequence[Detector],
    out_dir: str | os.PathLike,
    *,
    fpr: float = 0.01,
    fractions: tuple[float, float, float] = (0.5, 0.3, 0.2),
    combine: str = "fisher",
    seed: int = 0,
    overwrite: bool = False,
    provenance: Mapping[str, Any] | None = None,
    providers: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Fit ``detectors`` on clean labelled images, calibrate the guard to ``fpr`` and write a bundle.

    ``fractions`` split the images into fit / calibration / validation parts (seeded permutation).
    Returns the manifest (also written to ``out_dir/manifest.json``).
    """
    if not detectors:
        raise ValueError("at least one detector is needed")
    if combine not in COMBINERS:
        raise ValueError(f"combine must be one of {COMBINERS}")
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {fractions}")
    model = OnnxModel(model_path, providers=providers)
    x = to_model_input(images, model.input_shape)
    labels = np.asarray(labels, np.int64)
    n = len(x)
    perm = np.random.default_rng(seed).permutation(n)
    n_fit, n_cal = int(fractions[0] * n), int(fractions[1] * n)
    fit_idx, cal_idx, val_idx = np.split(perm, [n_fit, n_fit + n_cal])
    if min(len(fit_idx), len(cal_idx), len(val_idx)) < 10:
        raise ValueError(f"too few calibration images ({n}) for a fit/calibration/validation split")
    if int(np.floor(fpr * (len(cal_idx) + 1))) < 1:
        raise ValueError(f"{len(cal_idx)} calibration inputs cannot resolve a false-positive rate of {fpr}; "
                         f"need at least {int(np.ceil(1 / fpr))}")

    names = unique_names(detectors)
    outputs = needed_outputs(detectors)
    obs_fit = observe(model, x[fit_idx], outputs)
    for name, det in zip(names, detectors):
        log.info("fitting %s on %d clean inputs", name, len(fit_idx))
        det.fit(obs_fit, labels[fit_idx], model)
    del obs_fit

    obs_cal = observe(model, x[cal_idx], outputs)
    cal_scores = {n: np.asarray(d.score(obs_cal, model), np.float64) for n, d in zip(names, detectors)}
    scorer = _Scorer(names, list(detectors), cal_scores, combine)
    cal_combined, _, _ = scorer.pvalues(cal_scores, leave_one_out=True)
    p_threshold = threshold_for_fpr(cal_combined, fpr)

    obs_val = observe(model, x[val_idx], outputs)
    val_combined, val_p, _ = scorer.pvalues(scorer.raw_scores(obs_val, model))
    val_flags = val_combined <= p_threshold
    validation = RateEstimate.of(val_flags).to_json()
    validation["per_detector_rate_at_threshold"] = {
        n: float(np.mean(val_p[:, i] <= p_threshold)) for i, n in enumerate(names)
    }
    val_pred = obs_val["logits"].argmax(1)
    validation["clean_accuracy"] = float(np.mean(val_pred == labels[val_idx]))

    writer = BundleWriter(out_dir, overwrite=overwrite)
    try:
        model_sha = writer.add_file(model_path, MODEL_FILE)
        det_entries = []
        for name, det in zip(names, detectors):
            fname = f"detectors/{name.replace('#', '_')}.npz"
            digest = writer.add_arrays(fname, det.state_dict())
            det_entries.append({"name": name, "type": det.name, "params": det.get_params(),
                                "two_sided": det.two_sided, "state_file": fname, "sha256": digest})
        writer.add_arrays("calibration.npz", {f"scores__{n.replace('#', '_')}": s for n, s in cal_scores.items()})
        manifest = writer.commit({
            "model": {"file": MODEL_FILE, "sha256": model_sha, "metadata": model.meta},
            "detectors": det_entries,
            "calibration": {
                "file": "calibration.npz", "combine": combine, "fpr_target": fpr, "p_threshold": p_threshold,
                "seed": seed, "split": {"fit": len(fit_idx), "calibration": len(cal_idx),
                                        "validation": len(val_idx)},
                "validation": validation,
            },
            "provenance": dict(provenance or {}),
        })
    except BaseException:
        writer.abort()
        raise
    return manifest


class Guard:
    """A loaded guard bundle: ``inspect`` answers with verdicts, ``predict`` with labels and a flag mask.

    Thread-safe: onnxruntime sessions accept concurrent ``run`` calls and detectors are read-only after loading.
    """

    def __init__(self, model: OnnxModel, scorer: _Scorer, p_threshold: float, manifest: dict[str, Any]) -> None:
        self.model = model
        self._scorer = scorer
        self.p_threshold = float(p_threshold)
        self.manifest = manifest

    @classmethod
    def load(cls, path: str | os.PathLike, providers: Sequence[str] | None = None,
             batch_size: int = 256) -> Guard:
        """Load and verify a bundle (hashes, format version); raises ``BundleError`` when it is not sound."""
        root = Path(path)
        manifest = read_manifest(root, verify=True)
        model = OnnxModel(root / manifest["model"]["file"], providers=providers, batch_size=batch_size)
        cal = manifest["calibration"]
        cal_arrays = load_arrays(root / cal["file"])
        names, dets, cal_scores = [], [], {}
        for entry in manifest["detectors"]:
            state = load_arrays(root / entry["state_file"])
            dets.append(detector_from_state(entry["type"], entry["params"], state))
            names.append(entry["name"])
            cal_scores[entry["name"]] = cal_arrays[f"scores__{entry['name'].replace('#', '_')}"]
        scorer = _Scorer(names, dets, cal_scores, cal["combine"])
        return cls(model, scorer, cal["p_threshold"], manifest)

    @property
    def detector_names(self) -> list[str]:
        return list(self._scorer.names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.model.input_shape

    def inspect(self, x: Any) -> list[Verdict]:
        """Verdicts for a batch (uint8/float arrays in the model's input spec, or PIL images)."""
        xf = to_model_input(x, self.model.input_shape)
        obs = observe(self.model, xf, self._scorer.outputs)
        raw = self._scorer.raw_scores(obs, self.model)
        combined, P, tails = self._scorer.pvalues(raw)
        probs = _softmax(obs["logits"].astype(np.float64))
        labels = probs.argmax(1)
        names = self._scorer.names
        out = []
        for i in range(len(xf)):
            flagged = bool(combined[i] <= self.p_threshold)
            j = int(np.argmin(P[i]))
            kind = self._scorer.detectors[j].tail_kinds.get(str(tails[i, j]), "anomalous") if flagged else None
            dets = {n: {"score": float(raw[n][i]), "p_value": float(P[i, k]), "tail": str(tails[i, k])}
                    for k, n in enumerate(names)}
            out.append(Verdict(int(labels[i]), self.model.class_names[labels[i]], float(probs[i, labels[i]]),
                               flagged, float(combined[i]), self.p_threshold, kind, dets))
        return out

    def predict(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(labels, flagged)`` arrays for a batch."""
        verdicts = self.inspect(x)
        return (np.array([v.label for v in verdicts], np.int64), np.array([v.flagged for v in verdicts], bool))
