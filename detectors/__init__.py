"""Detectors: pure numpy / scikit-learn scores on model observations (higher = more suspicious).

Importing this package registers every detector with :func:`make_detector` (and so with ``abl-guard calibrate``):

| lens | detectors |
|---|---|
| sensitivity | ``mutation`` (model mutation), ``squeeze`` (feature squeezing) — two-sided; ``odds`` (noise log-odds) |
| activation space | ``nic`` (value + provenance invariants), ``gram`` (Gram-matrix deviations) |
| feature space | ``mahalanobis``, ``mahalanobis-layers``, ``knn``, ``dknn`` (deep k-NN), ``probe`` (early-layer LDA) |
| input | ``typicality`` (a patch-density typicality test of the pixels) — two-sided |
| baselines | ``msp``, ``energy``, ``strip`` (two-sided) |
"""

from .activation import NIC, GramDeviation
from .base import (
    REGISTRY,
    Detector,
    ModelFn,
    NotFittedError,
    Observations,
    detector_from_state,
    instance_names,
    make_detector,
    register,
)
from .baselines import Energy, MaxSoftmax, Strip
from .feature import DeepKNN, KNNDistance, LayerMahalanobis, LayerProbe, Mahalanobis
from .sensitivity import InputSqueezing, ModelMutation, NoiseLogOdds
from .spec import make_detectors, parse_detector_specs
from .typicality import PatchTypicality

__all__ = [
    "NIC", "REGISTRY", "DeepKNN", "Detector", "Energy", "GramDeviation", "InputSqueezing", "KNNDistance",
    "LayerMahalanobis", "LayerProbe", "Mahalanobis", "MaxSoftmax", "ModelFn", "ModelMutation", "NoiseLogOdds",
    "NotFittedError", "Observations", "PatchTypicality", "Strip", "detector_from_state", "instance_names",
    "make_detector", "make_detectors", "parse_detector_specs", "register",
]
