"""The serving runtime: bundles, the onnxruntime model, calibration, the Guard API and scanning.

Never imports torch: a deployment needs only guard/ + detectors/ + onnxruntime + numpy.
"""

from .bundle import BundleError
from .preprocess import InputError
from .runtime import Guard, Verdict, calibrate_bundle

__all__ = ["BundleError", "Guard", "InputError", "Verdict", "calibrate_bundle"]
