"""Detectors: pure numpy / scikit-learn scores on model observations (higher = more suspicious)."""

from .base import (
    REGISTRY,
    Detector,
    ModelFn,
    NotFittedError,
    Observations,
    detector_from_state,
    make_detector,
    register,
)
from .feature import Mahalanobis

__all__ = [
    "REGISTRY", "Detector", "Mahalanobis", "ModelFn", "NotFittedError", "Observations", "detector_from_state",
    "make_detector", "register",
]
