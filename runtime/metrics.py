"""Prometheus metrics and a health check of the daemon, on a small HTTP server (``/metrics``, ``/healthz``).

The metrics are derived from the messages the daemon publishes (every verdict and every status), so
what a plant's monitoring scrapes is what subscribers were told. Names start with ``edgeinspect_``;
every series carries ``line`` and ``camera`` labels. The server binds localhost unless told otherwise.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from edgeinspect.errors import EdgeInspectError
from edgeinspect.runtime.systemd import ALIVE

log = logging.getLogger(__name__)

# stage latencies of one frame, seconds: a few ms (engine on a GPU) to a second (a stalled camera)
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
# counters of the status message, published as running totals: the metrics add the increase
_STATUS_COUNTERS = {"dropped": "publish_dropped", "dropped_stale": "dropped_stale", "reconnects": "reconnects"}


class DaemonMetrics:
    """The metrics of one daemon (all its cameras, one registry) and its health.

    Each camera's serve loop reports through its :meth:`camera` observer. Healthy means: every
    camera's last status said ``running`` or ``paused`` (or ``stopped``: a recorded source that ended)
    and each running or paused one sent a status or verdict less than ``stale_s`` ago (heartbeats go out
    every second, also while a camera is silent or paused, so a silent loop is stuck).
    """

    def __init__(self, line: str, *, stale_s: float = 5.0):
        self.registry = CollectorRegistry()
        self.line = line
        self.stale_s = stale_s
        names = ["line", "camera"]
        self.frames = Counter("edgeinspect_frames", "Frames judged (one verdict each)", names, registry=self.registry)
        self.verdicts = Counter("edgeinspect_verdicts", "Verdicts by kind (OK, NOK, ERROR)", [*names, "verdict"],
                                registry=self.registry)
        self.latency = Histogram("edgeinspect_stage_latency_seconds", "Per-frame latency of each stage "
                                 "(preprocess, inference, postprocess, total = capture to publish)",
                                 [*names, "stage"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.counters = {key: Counter(f"edgeinspect_{name}", f"Running total of the status field {key!r}", names,
                                      registry=self.registry) for key, name in _STATUS_COUNTERS.items()}
        self.engine = Gauge("edgeinspect_engine_info", "The engine in use (value 1)",
                            [*names, "engine", "bundle_id"], registry=self.registry)
        self.journal_failed = Gauge("edgeinspect_journal_failed", "1 when the verdict journal stopped writing",
                                    names, registry=self.registry)
        self.up = Gauge("edgeinspect_up", "1 while the camera's serve loop is running (also paused)", names,
                        registry=self.registry)
        self.last_verdict = Gauge("edgeinspect_last_verdict_timestamp_seconds", "Unix time of the last verdict",
                                  names, registry=self.registry)
        self.cameras: dict[str, CameraMetrics] = {}

    def camera(self, camera: str) -> CameraMetrics:
        """The observer of one camera's published messages (created on first use)."""
        if camera not in self.cameras:
            self.cameras[camera] = CameraMetrics(self, camera)
        return self.cameras[camera]

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, details per camera) for ``/healthz``."""
        details = {name: camera.health() for name, camera in self.cameras.items()}
        healthy = bool(details) and all(ok for ok, _ in details.values())
        return healthy, {"status": "ok" if healthy else "unhealthy", "line": self.line,
                         "cameras": {name: d for name, (_, d) in details.items()}}

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)


class CameraMetrics:
    """One camera's share of :class:`DaemonMetrics`: follows its published verdicts and statuses."""

    def __init__(self, metrics: DaemonMetrics, camera: str):
        self.metrics = metrics
        self.labels = {"line": metrics.line, "camera": camera}
        for family in (metrics.frames, *metrics.counters.values(), metrics.journal_failed, metrics.up):
            family.labels(**self.labels)  # exported as 0 from the start, not missing until the first event
        self._totals = dict.fromkeys(_STATUS_COUNTERS, 0)
        self._state = "starting"
        self._seen = time.monotonic()
        self._engine: tuple[str, str] | None = None
        self._lock = threading.Lock()

    def on_verdict(self, payload: dict[str, Any]) -> None:
        """Count one published verdict and its stage latencies."""
        m = self.metrics
        with self._lock:
            self._seen = time.monotonic()
        m.frames.labels(**self.labels).inc()
        m.verdicts.labels(**self.labels, verdict=payload["verdict"]).inc()
        for stage, ms in (payload.get("latency_ms") or {}).items():
            m.latency.labels(**self.labels, stage=stage).observe(ms / 1000.0)
        m.last_verdict.labels(**self.labels).set(payload.get("publish_ts") or time.time())

    def on_status(self, payload: dict[str, Any]) -> None:
        """Take the running totals, engine, journal and state of one published status message."""
        m = self.metrics
        for key, counter in m.counters.items():
            total = int(payload.get(key) or 0)
            if total > self._totals[key]:
                counter.labels(**self.labels).inc(total - self._totals[key])
                self._totals[key] = total
        engine = (str(payload.get("engine")), str(payload.get("bundle_id")))
        if engine != self._engine:
            if self._engine is not None:
                m.engine.remove(*self.labels.values(), *self._engine)
            m.engine.labels(**self.labels, engine=engine[0], bundle_id=engine[1]).set(1)
            self._engine = engine
        journal = payload.get("journal") or {}
        m.journal_failed.labels(**self.labels).set(1 if journal.get("state") == "failed" else 0)
        m.up.labels(**self.labels).set(1 if payload["state"] in ALIVE else 0)
        with self._lock:
            self._state, self._seen = payload["state"], time.monotonic()

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, details) of this camera."""
        with self._lock:
            age = time.monotonic() - self._seen
            state = self._state
        healthy = state == "stopped" or state in ALIVE and age < self.metrics.stale_s
        return healthy, {"state": state, "seconds_since_activity": round(age, 3)}


class MetricsServer:
    """``GET /metrics`` and ``GET /healthz`` (200 or 503, JSON) for a :class:`DaemonMetrics`, in a thread."""

    def __init__(self, metrics: DaemonMetrics, port: int, host: str = "127.0.0.1"):
        handler = type("Handler", (_Handler,), {"metrics": metrics})
        try:
            self.server = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise EdgeInspectError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}; choose another "
                                   f"--metrics-port") from exc
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="metrics http", daemon=True)
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics, health on /healthz", host, self.port)

    def close(self) -> None:
        """Stop serving and free the port."""
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5.0)


class _Handler(BaseHTTPRequestHandler):
    metrics: DaemonMetrics

    def do_GET(self) -> None:  # noqa: N802 (the http.server name)
        if self.path == "/metrics":
            self._reply(200, CONTENT_TYPE_LATEST, self.metrics.exposition())
        elif self.path == "/healthz":
            healthy, details = self.metrics.health()
            self._reply(200 if healthy else 503, "application/json", json.dumps(details).encode())
        else:
            self._reply(404, "text/plain; charset=utf-8", b"not found: use /metrics or /healthz\n")

    def _reply(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the http.server signature)
        log.debug("metrics http: " + format, *args)
