"""The serving runtime: bundles, the onnxruntime model, calibration, the Guard API, scanning and reports.

Never imports torch: a deployment needs only guard/ + detectors/ + onnxruntime + numpy (+ scipy, Pillow; matplotlib
for reports only). Names are imported on first use, so ``import abl_guard.guard`` (and ``abl-guard --help``) stay
fast; ``from abl_guard.guard import Guard`` loads what ``Guard`` needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> the sub-module that defines it
_LAZY = {
    "BundleError": "bundle", "pack_bundle": "bundle", "InputError": "preprocess", "InputContract": "preprocess",
    "Guard": "runtime", "Inspection": "runtime", "Verdict": "runtime", "calibrate_bundle": "build",
    "GuardedSession": "session",
}

__all__ = ["BundleError", "Guard", "GuardedSession", "InputContract", "InputError", "Inspection", "Verdict",
           "calibrate_bundle", "pack_bundle"]

if TYPE_CHECKING:
    from .build import calibrate_bundle
    from .bundle import BundleError, pack_bundle
    from .preprocess import InputContract, InputError
    from .runtime import Guard, Inspection, Verdict
    from .session import GuardedSession


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
