"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import platform
import subprocess


def cpu_name() -> str:
    """The CPU model (``lscpu``'s "Model name"), for the machine line of committed results."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"
