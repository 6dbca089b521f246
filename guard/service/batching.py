"""Dynamic micro-batching: concurrent requests share one model + detector call.

Requests put their (already validated) inputs on a bounded queue; one worker thread owns every call into the
:class:`~guard.runtime.Guard`. When it picks up a request it keeps gathering until ``max_batch`` inputs are waiting or
``max_wait`` has passed since the first, runs the concatenated batch once, and hands each request its slice back on
the event loop (one ``call_soon_threadsafe`` per batch). It waits only while more requests are on their way (being
read or decoded), so a lone request is never delayed by the window. The queue is bounded in *inputs*: a request that
would overflow it is refused at once (:class:`OverloadedError`, the service's 503), so memory never grows with the
load.

The design follows the dynamic batchers of inference servers (NVIDIA Triton's ``max_queue_delay_microseconds``,
TorchServe's ``maxBatchDelay``); one deviation: a request is never split across batches, so a request larger than
``max_batch`` runs as a batch of its own (the Guard chunks it by its ``batch_size``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..runtime import Guard, Inspection

log = logging.getLogger(__name__)

INSPECT, PREDICT = "inspect", "predict"


class OverloadedError(RuntimeError):
    """The queue cannot take the request now (or the service is shutting down)."""


@dataclass
class JobResult:
    """What a request gets back: verdict records (``inspect``) or nothing beyond labels and flags (``predict``)."""

    labels: np.ndarray
    flagged: np.ndarray
    records: list[dict[str, Any]] | None = None


@dataclass
class _Job:
    x: np.ndarray  # float32 (n, C, H, W), validated
    want: str
    future: asyncio.Future
    cancelled: bool = False  # set on the event loop when the request timed out; the worker then skips it
    queued_at: float = field(default_factory=time.perf_counter)

    @property
    def n(self) -> int:
        return len(self.x)


def _take(ins: Inspection, a: int, b: int) -> Inspection:
    return Inspection(ins.labels[a:b], ins.confidence[a:b], ins.p_value[a:b], ins.p_threshold[a:b], ins.pvals[a:b],
                      ins.low_tail[a:b], {k: v[a:b] for k, v in ins.scores.items()})


class Batcher:
    """The queue and its worker thread. ``submit`` (event loop thread only) returns a future of a :class:`JobResult`.

    ``on_batch(inputs, seconds)`` is called from the worker after every model call (metrics).
    """

    def __init__(self, guard: Guard, loop: asyncio.AbstractEventLoop, max_batch: int = 64,
                 max_wait_s: float = 0.002, max_queue: int = 1024,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait >= 0")
        self.guard, self.loop = guard, loop
        self.max_batch, self.max_wait_s, self.max_queue = int(max_batch), float(max_wait_s), int(max_queue)
        self.on_batch = on_batch
        self._queue: deque[_Job] = deque()
        self._staged: list[_Job] = []  # submitted during the current event-loop iteration
        self._cond = threading.Condition()
        self._depth = 0  # inputs accepted and not yet answered (queued or in the running batch)
        self._closing = False
        # requests being read or decoded on the event loop (only the loop writes it): a batch waits for these only,
        # so a lone request runs at once while a burst fills the batch
        self.arriving = 0
        self._thread = threading.Thread(target=self._run, name="abl-guard-batcher", daemon=True)

    # ------------------------------------------------------------------ event-loop side

    def start(self) -> None:
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closing

    def submit(self, x: np.ndarray, want: str = INSPECT) -> tuple[_Job, asyncio.Future]:
        """Queue a validated batch; raises :class:`OverloadedError` when the queue cannot hold it.

        Jobs are staged on the event loop and handed to the worker together at the end of the loop iteration, so the
        requests that arrived in one burst reach the worker as one group instead of the worker waking on the first
        and starting a batch of one.
        """
        fut = self.loop.create_future()
        job = _Job(x, want, fut)
        if self._closing:
            raise OverloadedError("the service is shutting down")
        if self._depth + job.n > self.max_queue:
            raise OverloadedError(f"queue full ({self._depth} of {self.max_queue} inputs waiting)")
        with self._cond:
            self._depth += job.n
        self._staged.append(job)
        if len(self._staged) == 1:
            self.loop.call_soon(self._hand_over)
        return job, fut

    def _hand_over(self) -> None:
        with self._cond:
            self._queue.extend(self._staged)
            self._cond.notify()
        self._staged.clear()

    def close(self, timeout: float | None = None) -> None:
        """Answer whatever is still queued, then stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ worker side

    def _gather(self) -> list[_Job] | None:
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait()
            if not self._queue:
                return None  # closing and drained
            jobs = [self._queue.popleft()]
            n = jobs[0].n
            deadline = time.perf_counter() + self.max_wait_s
            while n < self.max_batch:
                if self._queue:
                    if n + self._queue[0].n > self.max_batch:
                        break
                    jobs.append(self._queue.popleft())
                    n += jobs[-1].n
                    continue
                left = deadline - time.perf_counter()
                if left <= 0 or self._closing or self.arriving <= 0:
                    break
                self._cond.wait(left)
            return jobs

    def _run(self) -> None:
        while True:
            jobs = self._gather()
            if jobs is None:
                return
            try:
                self._process(jobs)
            except BaseException as e:  # noqa: BLE001 - the worker must survive anything a batch throws
                log.exception("batch worker error")
                self._deliver([(j, e) for j in jobs])
            finally:
                with self._cond:
                    self._depth -= sum(j.n for j in jobs)

    def _results(self, jobs: list[_Job], ins: Inspection) -> list[tuple[_Job, Any]]:
        out: list[tuple[_Job, Any]] = []
        a = 0
        for j in jobs:
            part = _take(ins, a, a + j.n)
            a += j.n
            records = [v.to_json() for v in self.guard.verdicts(part)] if j.want == INSPECT else None
            out.append((j, JobResult(part.labels, part.flagged, records)))
        return out

    def _process(self, jobs: list[_Job]) -> None:
        live = [j for j in jobs if not j.cancelled]
        if not live:
            return
        t0 = time.perf_counter()
        x = live[0].x if len(live) == 1 else np.concatenate([j.x for j in live])
        try:
            results = self._results(live, self.guard.inspect_arrays(x))
        except Exception as e:  # noqa: BLE001 - isolate the request that broke the batch
            if len(live) == 1:
                results = [(live[0], e)]
            else:
                log.warning("batch of %d requests failed (%s); retrying them one by one", len(live), e)
                results = []
                for j in live:
                    try:
                        results += self._results([j], self.guard.inspect_arrays(j.x))
                    except Exception as e1:  # noqa: BLE001
                        results.append((j, e1))
        if self.on_batch is not None:
            self.on_batch(len(x), time.perf_counter() - t0)
        self._deliver(results)

    def _deliver(self, results: list[tuple[_Job, Any]]) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            self.loop.call_soon_threadsafe(_settle, results)


def _settle(results: list[tuple[_Job, Any]]) -> None:
    for job, res in results:
        if job.future.done():  # timed out meanwhile
            continue
        if isinstance(res, BaseException):
            job.future.set_exception(res)
        else:
            job.future.set_result(res)
