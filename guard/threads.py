"""Process-wide BLAS thread control while the guard's detectors score.

Detector arithmetic is small (a batch times a few hundred features), where OpenBLAS's own threads only contend with
onnxruntime's for the same cores; the guard therefore runs its numpy work single-threaded by default
(``Guard.load(blas_threads=1)``, the setting ``bench/results/serve.md`` measures the guard with). BLAS has only a
process-wide setting, so this lives in one place with one lock rather than in each caller.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any, ClassVar


class BlasThreads:
    """Caps BLAS threads while detectors score, via threadpoolctl (a scikit-learn dependency; a no-op without it).

    Concurrent callers share one cap: the first to enter sets it, the last to leave restores the previous setting (no
    flip-flopping under a running call). ``threads=None`` leaves BLAS alone.
    """

    MIN_BATCH = 4  # below this OpenBLAS stays single-threaded anyway; skip the (microsecond) bookkeeping
    _lock: ClassVar[threading.Lock] = threading.Lock()
    _holders: ClassVar[int] = 0
    _saved: ClassVar[list[int]] = []
    _libs: ClassVar[list[Any] | None] = None

    def __init__(self, threads: int | None) -> None:
        self.threads = threads

    @classmethod
    def _blas_libs(cls) -> list[Any]:
        """The process's BLAS libraries, found once (finding them takes a fraction of a millisecond); call locked."""
        if cls._libs is None:
            try:
                from threadpoolctl import ThreadpoolController

                cls._libs = list(ThreadpoolController().select(user_api="blas").lib_controllers)
            except ImportError:
                cls._libs = []
        return cls._libs

    @contextlib.contextmanager
    def __call__(self, batch: int) -> Iterator[None]:
        if self.threads is None or batch < self.MIN_BATCH:
            yield
            return
        cls = type(self)
        with cls._lock:
            libs = cls._blas_libs()
            if cls._holders == 0:
                cls._saved = [lib.get_num_threads() for lib in libs]
                for lib in libs:
                    lib.set_num_threads(self.threads)
            cls._holders += 1
        try:
            yield
        finally:
            with cls._lock:
                cls._holders -= 1
                if cls._holders == 0:
                    for lib, n in zip(libs, cls._saved):
                        lib.set_num_threads(n)
