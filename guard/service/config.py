"""Settings of ``abl-guard serve`` — the one source of its defaults (the CLI's options mirror them, a test checks).

Kept free of the web stack so the CLI can check for the ``serve`` extra before anything needs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class ServeConfig:
    """Every setting of ``abl-guard serve`` (the CLI options derive from these defaults)."""

    host: str = "127.0.0.1"
    port: int = 8080
    max_batch: int = 64  # inputs per model call
    max_wait_ms: float = 2.0  # how long a batch waits to fill once its first request is picked up
    max_queue: int = 1024  # inputs waiting or running; beyond it requests get 503 + Retry-After
    max_inputs: int = 256  # inputs per request
    max_body_bytes: int = 8 * 1024 * 1024
    max_pixels: int = 4096 * 4096  # per encoded image, checked from its header before decoding
    max_buffered_bytes: int = 256 * 1024 * 1024  # request bodies held in memory at once, all requests together
    max_connections: int = 1024  # uvicorn's limit_concurrency (503 beyond)
    timeout_s: float = 10.0  # per request, from the first body byte to the response
    drain_timeout_s: float = 30.0  # graceful shutdown: how long in-flight requests may still take
    threads: int | None = None  # onnxruntime intra-op threads (None: one per core)
    access_log: str | None = None  # file (rotated at access_log_max_bytes, 3 kept); None: stderr
    access_log_max_bytes: int = 100 * 1024 * 1024
    alarm_window: int = 1000  # recent verdicts the stream alarms (target-class, drift) look at
    alarm_alpha: float = 1e-3
    token: str | None = None  # bearer token; None: no authentication

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_inputs", "max_body_bytes", "max_pixels", "max_buffered_bytes",
                     "max_connections", "alarm_window"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_inputs > self.max_queue:
            raise ValueError(f"max_inputs ({self.max_inputs}) cannot exceed max_queue ({self.max_queue})")
        if self.max_body_bytes > self.max_buffered_bytes:
            raise ValueError("max_body_bytes cannot exceed max_buffered_bytes")
        if self.timeout_s <= 0 or self.max_wait_ms < 0:
            raise ValueError("timeout must be > 0 and max_wait_ms >= 0")

    def public(self) -> dict[str, Any]:
        """The settings a client may see (``GET /v1/model``): no token, no paths."""
        keys = ("max_batch", "max_wait_ms", "max_queue", "max_inputs", "max_body_bytes", "max_pixels", "timeout_s",
                "alarm_window", "alarm_alpha")
        return {k: getattr(self, k) for k in keys} | {"auth": self.token is not None}
