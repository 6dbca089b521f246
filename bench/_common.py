"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

NOTES_MARK = "<!-- notes: kept when the script rewrites this file -->"


def cpu_name() -> str:
    """The CPU model (``lscpu``'s "Model name"), for the machine line of committed results."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def write_markdown_keeping_notes(path: str | Path, text: str) -> None:
    """Write a results page; hand-written analysis below :data:`NOTES_MARK` in the old page survives a re-run."""
    md = Path(path)
    notes = ""
    if md.exists() and NOTES_MARK in md.read_text():
        notes = md.read_text().split(NOTES_MARK, 1)[1]
    md.write_text(text.rstrip("\n") + "\n" + ("\n" + NOTES_MARK + notes if notes else ""))


def write_results(out: str | Path, record: dict, markdown: str, keep_notes: bool = False) -> Path:
    """Write ``out``.json (the record) and ``out``.md (its rendering), creating the folder; returns the .md path.
    ``keep_notes``: hand-written notes below :data:`NOTES_MARK` in the old page survive."""
    base = Path(out)
    base.parent.mkdir(parents=True, exist_ok=True)
    base.with_suffix(".json").write_text(json.dumps(record, indent=2))
    if keep_notes:
        write_markdown_keeping_notes(base.with_suffix(".md"), markdown)
    else:
        base.with_suffix(".md").write_text(markdown)
    print(f"-> {base.with_suffix('.md')}")
    return base.with_suffix(".md")
