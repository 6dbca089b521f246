"""``abl-guard serve``: a guarded model behind HTTP, with dynamic micro-batching, backpressure and metrics.

Stack: Starlette (routing, requests/responses) on uvicorn (ASGI server; uvloop and httptools when installed), from
the optional ``serve`` extra. Both are widely used, actively maintained and small; uvicorn brings the graceful
shutdown a service needs (stop accepting, drain in-flight requests, then run the app's shutdown), and Starlette adds
routing without a validation layer we would not use — request bodies here are images and arrays, not JSON models, so
FastAPI's pydantic machinery would cost per-request time and buy nothing. Multipart bodies are parsed in memory with
python-multipart's streaming parser; metrics are Prometheus text written by hand (:mod:`.metrics`).

A request's life: :mod:`.app` (auth, limits, decoding through ``guard.sources.decode_image`` /
``guard.preprocess.to_model_input``, :mod:`.inputs`) -> :mod:`.batching` (one worker thread owns every Guard call and
gathers concurrent requests into one batch) -> the same JSON records ``abl-guard scan`` writes. Never imports torch.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .config import ServeConfig

if TYPE_CHECKING:
    from .app import Service

__all__ = ["ServeConfig", "Service", "build_service", "missing_dependencies", "serve"]

log = logging.getLogger(__name__)

REQUIRED = ("starlette", "uvicorn", "python_multipart")


def __getattr__(name: str) -> Any:
    if name == "Service":  # the web stack loads only when it is used
        from .app import Service

        return Service
    raise AttributeError(name)


def missing_dependencies() -> list[str]:
    """The ``serve`` extra's modules that are not installed."""
    import importlib.util

    return [m for m in REQUIRED if importlib.util.find_spec(m) is None]


def build_service(bundle: str | os.PathLike, config: ServeConfig) -> Service:
    """Load the bundle (hashes verified) and wrap it in a :class:`Service` (the ASGI app is the service itself)."""
    from ..runtime import Guard
    from .app import Service

    guard = Guard.load(bundle, intra_op_threads=config.threads)
    return Service(guard, config, str(bundle))


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def serve(bundle: str | os.PathLike, config: ServeConfig,
          on_listen: Callable[[str, int], None] | None = None) -> None:
    """Serve ``bundle`` until SIGTERM or SIGINT; then stop accepting, answer every accepted request and return.

    ``on_listen(host, port)`` is called once the socket accepts connections (``port`` is the real one when the
    config asks for port 0). Raises ``OSError`` when the address cannot be bound, :class:`~guard.bundle.BundleError`
    for a bad bundle.
    """
    import uvicorn

    service = build_service(bundle, config)
    sock = _bind(config.host, config.port)
    host, port = sock.getsockname()[:2]

    class _Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started and on_listen is not None:
                on_listen(host, port)

    uv = uvicorn.Config(service, log_level="warning", access_log=False, lifespan="on", proxy_headers=False,
                        limit_concurrency=config.max_connections,
                        timeout_graceful_shutdown=int(max(1, config.drain_timeout_s)), server_header=False)
    server = _Server(uv)
    stopped: list[int] = []

    def after_drain(signum: int, _frame: Any) -> None:
        # uvicorn handles the signal (graceful drain) and re-raises it once done; landing here makes that re-raise a
        # normal return, so the process exits 0 after a clean shutdown instead of dying by the signal
        stopped.append(signum)

    previous = {s: signal.signal(s, after_drain) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        sock.close()
    if stopped:
        log.info("stopped by %s after draining in-flight requests", signal.Signals(stopped[0]).name)
