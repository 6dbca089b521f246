"""Progress bars that switch themselves off when stderr is not a terminal or the user asked for quiet."""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.auto import tqdm

_QUIET = os.environ.get("ABL_GUARD_QUIET", "") not in ("", "0")


def set_quiet(quiet: bool) -> None:
    global _QUIET
    _QUIET = bool(quiet)


def progress_bar(total: int | None = None, desc: str = "", quiet: bool = False, **kw: Any) -> tqdm:
    disable = quiet or _QUIET or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, disable=disable, leave=False, dynamic_ncols=True, **kw)
