"""abl-guard: train with Anti-Backdoor Learning, export to ONNX with taps, guard deployed image classifiers.

Installed, the repository's top-level rooms are the sub-packages of this namespace: ``abl_guard.guard`` (the serving
runtime), ``abl_guard.detectors``, ``abl_guard.export``, ``abl_guard.abl`` (training), ``abl_guard.attacks`` and the
command line ``abl_guard.cli``. This module imports nothing, so importing a room stays as cheap as the room itself.
"""

__version__ = "0.1.0"
