"""The serving runtime: bundles, the onnxruntime model, calibration, the Guard API, scanning and reports.

Never imports torch: a deployment needs only guard/ + detectors/ + onnxruntime + numpy (+ scipy, Pillow; matplotlib
for reports only).
"""

from .bundle import BundleError, pack_bundle
from .preprocess import InputError
from .runtime import Guard, Inspection, Verdict, calibrate_bundle

__all__ = ["BundleError", "Guard", "InputError", "Inspection", "Verdict", "calibrate_bundle", "pack_bundle"]
