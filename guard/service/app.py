"""The HTTP service: a Starlette app around one :class:`~guard.runtime.Guard`, served by uvicorn.

Request path: the service's ASGI entry (request id, bearer token, metrics, JSON access log) -> route -> body read
under ``max_body_bytes`` and a global budget of buffered body bytes -> :func:`.inputs.parse_inputs` (inline for
small bodies, on a small decode pool for large ones) -> :class:`.batching.Batcher` -> JSON. The whole request runs
under ``timeout_s`` (504). Errors are one-line JSON objects ``{"error": reason, "detail": message, "request_id":
...}``; the reasons are the labels of ``abl_guard_errors_total``. The two scoring routes are dispatched by the entry
point itself, skipping Starlette's router and exception middleware: per-request Python work on the event loop is
what bounds throughput at high concurrency, and their handlers answer every error themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import re
import sys
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from ..bundle import package_version
from ..calibration import ClassAlarm, DriftAlarm, stream_alarms
from ..runtime import Guard
from .batching import INSPECT, PREDICT, Batcher, OverloadedError
from .config import ServeConfig
from .inputs import Limits, RequestError, parse_inputs
from .metrics import BATCH_BUCKETS, LATENCY_BUCKETS, Counter, Gauge, Histogram, Registry
from .openapi import openapi_schema

log = logging.getLogger(__name__)

INLINE_DECODE_BYTES = 64 * 1024  # bodies up to this are decoded on the event loop (tens of microseconds)
OPEN_PATHS = ("/healthz", "/readyz", "/openapi.json")
ENDPOINTS = ("/v1/inspect", "/v1/predict", "/v1/model", "/healthz", "/readyz", "/metrics", "/openapi.json")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def _error(status: int, reason: str, detail: str, request: Request | None = None,
           headers: Mapping[str, str] | None = None) -> JSONResponse:
    rid = None
    if request is not None:
        request.state.reason = reason
        rid = request.state.request_id
    return JSONResponse({"error": reason, "detail": detail, "request_id": rid}, status_code=status, headers=headers)


class AccessLog:
    """JSON lines to a file (rotated at ``max_bytes``, ``backups`` kept) or stderr, buffered in memory: written when
    512 lines are waiting, on :meth:`flush` (the service calls it twice a second) and at shutdown, so a request costs
    no write system call of its own. Event-loop thread only."""

    def __init__(self, path: str | None, max_bytes: int, backups: int = 3) -> None:
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        self._lines: list[str] = []
        self._f: Any = open(path, "a", encoding="utf-8") if path else sys.stderr  # noqa: SIM115 - closed in close()

    def write(self, entry: dict[str, Any]) -> None:
        self._lines.append(json.dumps(entry))
        if len(self._lines) >= 512:
            self.flush()

    def flush(self) -> None:
        if not self._lines:
            return
        text = "\n".join(self._lines) + "\n"
        self._lines.clear()
        try:
            if self.path and self._f.tell() + len(text) > self.max_bytes:
                self._rotate()
            self._f.write(text)
            self._f.flush()
        except (OSError, ValueError) as e:  # a full disk must not take the service down
            log.warning("access log: %s", e)

    def _rotate(self) -> None:
        assert self.path is not None
        self._f.close()
        for i in range(self.backups, 0, -1):
            src = f"{self.path}.{i - 1}" if i > 1 else self.path
            if os.path.exists(src):
                os.replace(src, f"{self.path}.{i}")
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def close(self) -> None:
        self.flush()
        if self.path:
            self._f.close()


class _Window:
    """The last ``size`` verdicts' (predicted class, flagged) for the stream alarms, with running counts of the
    flagged verdicts and of all verdicts by predicted class (the conditional class alarm needs the window's mix)."""

    def __init__(self, size: int, num_classes: int) -> None:
        self.items: deque[tuple[int, bool]] = deque()
        self.size = size
        self.flagged = np.zeros(num_classes, np.int64)
        self.predicted = np.zeros(num_classes, np.int64)

    def add(self, labels: list[int], flagged: list[bool]) -> None:
        for lab, f in zip(labels, flagged):
            if len(self.items) == self.size:
                old, was = self.items.popleft()
                self.predicted[old] -= 1
                if was:
                    self.flagged[old] -= 1
            self.items.append((lab, f))
            self.predicted[lab] += 1
            if f:
                self.flagged[lab] += 1


class Service:
    """One guard behind HTTP. ``app`` is the ASGI application (middleware included)."""

    def __init__(self, guard: Guard, config: ServeConfig, bundle: str = "") -> None:
        self.guard, self.config, self.bundle = guard, config, str(bundle)
        self.limits = Limits(max_inputs=config.max_inputs, max_pixels=config.max_pixels)
        self.batcher: Batcher | None = None
        self.ready = False
        self.inflight = 0
        self._buffered = 0
        self._boot, self._seq = uuid.uuid4().hex[:12], 0
        self._decode_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="abl-guard-decode")
        self._token = config.token.encode() if config.token else None
        self.access = AccessLog(config.access_log, config.access_log_max_bytes)
        cal = guard.manifest.get("calibration", {})
        self._calibration = cal if isinstance(cal, dict) else {}
        null = (self._calibration.get("alarm_null") or {}).get("dirichlet")
        self._alarm_null = list(null) if null else None
        self.window = _Window(config.alarm_window, len(guard.class_names))
        self._model_info = self._describe()
        self._setup_metrics()
        if self._alarm_null is not None:
            self.alarm()  # loads scipy.stats now rather than on the first scrape
        routes = [
            Route("/v1/inspect", self.inspect, methods=["POST"]),
            Route("/v1/predict", self.predict, methods=["POST"]),
            Route("/v1/model", self.model, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/openapi.json", self.openapi, methods=["GET"]),
        ]
        self._scoring = {"/v1/inspect": self.inspect, "/v1/predict": self.predict}
        self.router = Starlette(routes=routes, lifespan=self._lifespan,
                                exception_handlers={HTTPException: self._http_error})

    # ------------------------------------------------------------------ metrics

    def _setup_metrics(self) -> None:
        r = self.registry = Registry()
        self.m_requests = Counter("abl_guard_requests_total", "HTTP requests by endpoint and status code.",
                                  ("endpoint", "code"))
        self.m_latency = Histogram("abl_guard_request_duration_seconds", "Request latency by endpoint.",
                                   LATENCY_BUCKETS, ("endpoint",))
        self.m_inputs = Counter("abl_guard_inputs_total", "Inputs scored, by endpoint.", ("endpoint",))
        self.m_flagged = Counter("abl_guard_flagged_total", "Inputs flagged, by predicted class.", ("class_name",))
        self.m_errors = Counter("abl_guard_errors_total", "Refused or failed requests, by reason.", ("reason",))
        self.m_batch = Histogram("abl_guard_batch_size", "Inputs per model + detector call.", BATCH_BUCKETS)
        self.m_batch_time = Histogram("abl_guard_batch_duration_seconds", "Time of one model + detector call.",
                                      LATENCY_BUCKETS)
        for m in (self.m_requests, self.m_latency, self.m_inputs, self.m_flagged, self.m_errors, self.m_batch,
                  self.m_batch_time):
            r.add(m)  # registration order is the order of /metrics
        r.add(Gauge("abl_guard_queue_depth", "Inputs accepted and not yet answered (queued or running).",
                    lambda: self.batcher.depth if self.batcher else 0))
        r.add(Gauge("abl_guard_queue_capacity", "Most inputs the queue holds before answering 503.",
                    lambda: self.config.max_queue))
        r.add(Gauge("abl_guard_inflight_requests", "Scoring requests being handled.", lambda: self.inflight))
        r.add(Gauge("abl_guard_ready", "1 when the service accepts scoring requests.", lambda: float(self.ready)))
        r.add(Gauge("abl_guard_alarm_window_verdicts", "Verdicts in the alarm's sliding window.",
                    lambda: len(self.window.items)))
        r.add(Gauge("abl_guard_alarm_window_flagged", "Flagged verdicts in the sliding window, by predicted class.",
                    lambda: {(n,): float(k) for n, k in zip(self.guard.class_names, self.window.flagged.tolist())},
                    ("class_name",)))
        r.add(Gauge("abl_guard_alarm_window_predicted", "Verdicts in the sliding window, by predicted class.",
                    lambda: {(n,): float(k) for n, k in zip(self.guard.class_names, self.window.predicted.tolist())},
                    ("class_name",)))
        if self._alarm_null is not None:
            r.add(Gauge("abl_guard_alarm_fired", "1 when the flagged verdicts of the window concentrate on one "
                        "class beyond what the window's own prediction mix explains (target-class alarm, "
                        "Bonferroni-adjusted beta-binomial test).",
                        lambda: float(self.alarm().fired)))
            r.add(Gauge("abl_guard_alarm_p_value", "Smallest adjusted p-value of the target-class alarm.",
                        lambda: self.alarm().p_value))
            r.add(Gauge("abl_guard_alarm_target_class", "Index of the suspected target class (-1: no alarm).",
                        self._alarm_target))
            r.add(Gauge("abl_guard_drift_alarm_fired", "1 when the window as a whole departs from the clean "
                        "calibration data (flag rate or prediction mix; drift, not a backdoor).",
                        lambda: float(self._drift().fired)))
            r.add(Gauge("abl_guard_drift_alarm_p_value", "Smallest Bonferroni-adjusted p-value of the drift alarm.",
                        lambda: self._drift().p_value))

    def alarm(self) -> ClassAlarm:
        """The stream alarms over the sliding window, as ``scan`` runs them (:func:`stream_alarms`): the target-class
        alarm conditional on the window's predicted-class mix, with the drift alarm in ``.drift``. Recomputed only
        when the window's counts change."""
        if self._alarm_null is None:
            raise RuntimeError("the bundle records no alarm null (calibrated by an older abl-guard); re-calibrate it")
        flagged, predicted = self.window.flagged.tolist(), self.window.predicted.tolist()
        key = (tuple(predicted), tuple(flagged))
        if getattr(self, "_alarm_key", None) != key:
            alarm = stream_alarms(flagged, predicted, self._calibration, self.guard.class_names,
                                  alpha=self.config.alarm_alpha)
            if alarm is None:  # not reached: the null was found above
                raise RuntimeError("the bundle records no alarm null; re-calibrate it")
            self._alarm_cache = alarm
            self._alarm_key = key
        return self._alarm_cache

    def _drift(self) -> DriftAlarm:
        drift = self.alarm().drift
        return drift if drift is not None else DriftAlarm(False, 1.0, self.config.alarm_alpha, [])

    def _alarm_target(self) -> float:
        target = self.alarm().target
        return float(-1 if target is None else target)

    def _on_batch(self, n: int, seconds: float) -> None:
        self.m_batch.observe(n)
        self.m_batch_time.observe(seconds)

    # ------------------------------------------------------------------ ASGI entry: request id, auth, logging

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.router(scope, receive, send)
            return
        t0 = time.perf_counter()
        headers = {k: v for k, v in scope.get("headers", ()) if k in (b"x-request-id", b"authorization")}
        rid = headers.get(b"x-request-id", b"").decode("latin-1")
        if not _REQUEST_ID.match(rid):
            self._seq += 1  # unique per process; no os.urandom call (a GIL release) per request as uuid4 would make
            rid = f"{self._boot}-{self._seq:x}"
        state = scope.setdefault("state", {})
        state.update(request_id=rid, inputs=0, flagged=0, reason=None)
        status = 500
        rid_header = (b"x-request-id", rid.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), rid_header]
            await send(message)

        path = scope.get("path", "")
        try:
            if self._token is not None and path not in OPEN_PATHS and not self._authorized(headers):
                state["reason"] = "unauthorized"
                resp = JSONResponse({"error": "unauthorized", "detail": "missing or wrong bearer token",
                                     "request_id": rid}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await resp(scope, receive, send_with_id)
            elif path in self._scoring and scope.get("method") == "POST":
                # the scoring routes skip Starlette's router and exception middleware (see the module docstring)
                response = await self._scoring[path](Request(scope, receive))
                await response(scope, receive, send_with_id)
            else:
                await self.router(scope, receive, send_with_id)
        finally:
            dt = time.perf_counter() - t0
            endpoint = path if path in ENDPOINTS else "other"
            self.m_requests.inc(1, endpoint, str(status))
            self.m_latency.observe(dt, endpoint)
            if state["reason"]:
                self.m_errors.inc(1, state["reason"])
            entry = {"ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "request_id": rid,
                     "method": scope.get("method"), "path": path, "status": status, "inputs": state["inputs"],
                     "flagged": state["flagged"], "latency_ms": round(dt * 1e3, 3)}
            if scope.get("client"):
                entry["client"] = scope["client"][0]
            if state["reason"]:
                entry["reason"] = state["reason"]
            self.access.write(entry)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        # compare_digest: the time taken does not tell how much of the token matched
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._token or b"")

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        return _error(exc.status_code, reason, str(exc.detail), request, exc.headers)

    # ------------------------------------------------------------------ lifecycle

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Any) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        self.batcher = Batcher(self.guard, loop, self.config.max_batch, self.config.max_wait_ms / 1e3,
                               self.config.max_queue, self._on_batch)
        self.batcher.start()
        self.ready = True
        flusher = asyncio.ensure_future(self._flush_access_log())
        try:
            yield
        finally:
            # uvicorn calls this after the in-flight requests are answered (graceful drain)
            self.ready = False
            flusher.cancel()
            await loop.run_in_executor(None, self.batcher.close, self.config.drain_timeout_s)
            self._decode_pool.shutdown(wait=False)
            self.access.close()

    async def _flush_access_log(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            self.access.flush()

    # ------------------------------------------------------------------ scoring endpoints

    async def inspect(self, request: Request) -> Response:
        return await self._score(request, INSPECT)

    async def predict(self, request: Request) -> Response:
        return await self._score(request, PREDICT)

    async def _score(self, request: Request, want: str) -> Response:
        if not self.ready or self.batcher is None:
            return _error(503, "not_ready", "the service is not accepting requests", request, {"Retry-After": "1"})
        self.inflight += 1
        self.batcher.arriving += 1
        held = [0, 1]  # body bytes held against max_buffered_bytes; 1 while counted as arriving
        try:
            return await self._with_timeout(self._score_inner(request, want, held))
        except RequestError as e:
            return _error(e.status, e.reason, e.message, request, e.headers)
        except TimeoutError:
            return _error(504, "timeout", f"no answer within {self.config.timeout_s:g} s", request)
        except ClientDisconnect:
            return _error(400, "client_disconnected", "the client went away while sending the body", request)
        except Exception as e:  # noqa: BLE001 - one-line answer, details in the server log
            log.exception("request %s failed", request.state.request_id)
            return _error(500, "internal", f"{type(e).__name__}: the guard could not score the inputs", request)
        finally:
            self._buffered -= held[0]
            self.batcher.arriving -= held[1]
            self.inflight -= 1

    async def _with_timeout(self, coro: Any) -> Any:
        if hasattr(asyncio, "timeout"):  # Python >= 3.11: no extra task per request
            async with asyncio.timeout(self.config.timeout_s):
                return await coro
        try:
            return await asyncio.wait_for(coro, self.config.timeout_s)
        except asyncio.TimeoutError as e:
            raise TimeoutError from e

    async def _read_body(self, request: Request, held: list[int]) -> bytes:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                raise RequestError(400, "bad_request", "invalid Content-Length") from None
            if n > limit:
                raise RequestError(413, "body_too_large", f"body of {n} bytes exceeds the limit of {limit} "
                                                          "(--max-body-bytes)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, "body_too_large", f"body exceeds the limit of {limit} bytes "
                                                          "(--max-body-bytes)")
            if self._buffered + len(chunk) > self.config.max_buffered_bytes:
                raise RequestError(503, "overloaded", "too many request bytes buffered; retry shortly",
                                   {"Retry-After": "1"})
            self._buffered += len(chunk)
            held[0] += len(chunk)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _score_inner(self, request: Request, want: str, held: list[int]) -> Response:
        body = await self._read_body(request, held)
        ctype, iid = request.headers.get("content-type"), request.headers.get("x-input-id")
        shape = self.guard.input_shape
        if len(body) <= INLINE_DECODE_BYTES:
            inputs = parse_inputs(body, ctype, shape, self.limits, iid)
        else:
            loop = asyncio.get_running_loop()
            inputs = await loop.run_in_executor(self._decode_pool, parse_inputs, body, ctype, shape, self.limits, iid)
        del body
        request.state.inputs = len(inputs)
        assert self.batcher is not None
        self.batcher.arriving -= 1
        held[1] = 0
        try:
            job, fut = self.batcher.submit(inputs.x, want)
        except OverloadedError as e:
            raise RequestError(503, "overloaded", str(e), {"Retry-After": "1"}) from None
        try:
            res = await fut
        except asyncio.CancelledError:
            job.cancelled = True  # timed out: the worker skips it if it has not run yet
            raise
        labels, flagged = res.labels.tolist(), res.flagged.tolist()
        self.window.add(labels, flagged)
        self.m_inputs.inc(len(labels), "/v1/inspect" if want == INSPECT else "/v1/predict")
        names = self.guard.class_names
        n_flagged = 0
        for lab, f in zip(labels, flagged):
            if f:
                n_flagged += 1
                self.m_flagged.inc(1, names[lab])
        request.state.flagged = n_flagged
        rid = request.state.request_id
        if want == PREDICT:
            preds = [{"id": i, "label": lab, "class_name": names[lab], "flagged": f}
                     for i, lab, f in zip(inputs.ids, labels, flagged)]
            return JSONResponse({"request_id": rid, "predictions": preds})
        records = []
        for i, rec, resized in zip(inputs.ids, res.records or [], inputs.resized):
            out = {"id": i, **rec}
            if resized:
                out["resized"] = True
            records.append(out)
        return JSONResponse({"request_id": rid, "verdicts": records})

    # ------------------------------------------------------------------ other endpoints

    def _describe(self) -> dict[str, Any]:
        m = self.guard.manifest
        cal = m.get("calibration", {})
        val = cal.get("validation", {})
        model = m.get("model", {})
        meta = model.get("metadata", {})
        p_thr = float(cal.get("p_threshold", self.guard.p_threshold))
        return {
            "abl_guard_version": package_version(),
            "model": {"sha256": model.get("sha256"), "arch": meta.get("arch"), "dataset": meta.get("dataset"),
                      "input": m.get("input"), "class_names": self.guard.class_names},
            "detectors": [{k: d.get(k) for k in ("name", "type", "params", "two_sided", "tail_kinds", "requires")}
                          for d in m.get("detectors", [])],
            "calibration": {
                "combine": cal.get("combine"), "mondrian": cal.get("mondrian", False),
                "fpr_target": cal.get("fpr_target"), "p_threshold": p_thr,
                "threshold": -math.log10(p_thr) if p_thr > 0 else None,
                "class_thresholds": cal.get("class_thresholds"),
                "validation_fpr": val.get("rate"), "validation_fpr_ci95": val.get("ci95"),
                "validation_n": val.get("n"), "clean_accuracy": val.get("clean_accuracy"),
                "split": cal.get("split"),
            },
            "bundle": {"manifest_sha256": m.get("manifest_sha256"), "format_version": m.get("format_version"),
                       "created": m.get("created")},
            "service": self.config.public(),
        }

    async def model(self, request: Request) -> Response:
        return JSONResponse(self._model_info)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        ok = self.ready and self.batcher is not None and self.batcher.alive
        if not ok:
            request.state.reason = "not_ready"
        return JSONResponse({"ready": ok, "queue_depth": self.batcher.depth if self.batcher else 0},
                            status_code=200 if ok else 503)

    async def metrics(self, request: Request) -> Response:
        return Response(self.registry.render(), media_type=Registry.CONTENT_TYPE)

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_schema(self.guard, self.config))
