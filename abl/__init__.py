"""The training room: models with named taps, labelled datasets, the training loop and Anti-Backdoor Learning.

What it offers (one module per job):

* ``data`` — labelled uint8 image sets (Fashion-MNIST, digits, CIFAR-10, GTSRB, image folders, ``.npz``); torch-free,
  so the serving commands read calibration data through it without importing torch;
* ``models`` — image classifiers with named taps for the detectors; ``checkpoint`` — weights-only
  checkpoints with their dataset spec;
* ``train`` — device selection, on-device array batches, augmentation, plain SGD training (``train_plain``);
* Anti-Backdoor Learning (Li et al., NeurIPS 2021): ``abl`` (the driver, :func:`run_abl`, and every public name of
  the stages below), ``config`` (:class:`ABLConfig`), ``losses`` (LGA, the ascent term), ``isolation``,
  ``unlearning`` (with the clean-accuracy guard), ``state`` (resume), ``report`` (reports, warnings, artifacts) and
  ``abl_plots``; its design and deviations are in ``docs/abl.md``;
* ``experiment`` — one training run (data, attack, defence, evaluation) into a run directory.

The ABL names are importable from the package too (``from abl_guard.abl import run_abl``); they load lazily, so
importing ``abl_guard.abl.data`` never pulls in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

#: names re-exported from :mod:`abl_guard.abl.abl` on first use
_ABL_NAMES = ("ABLConfig", "ABLResult", "failure_warnings", "isolation_report", "run_abl", "summary_lines")


def __getattr__(name: str) -> Any:
    if name in _ABL_NAMES:
        return getattr(importlib.import_module(".abl", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_ABL_NAMES)
