"""The inspection daemon: frames from a source -> predictor -> a verdict per frame over ZeroMQ."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Protocol

from edgeinspect.camera import END, Frame, FrameSource, ThreadedReader, open_source
from edgeinspect.errors import SourceError
from edgeinspect.runtime.journal import VerdictJournal
from edgeinspect.runtime.metrics import DaemonMetrics, MetricsServer
from edgeinspect.runtime.predictor import NOK, Predictor
from edgeinspect.runtime.publisher import Heartbeat, VerdictPublisher
from edgeinspect.runtime.systemd import SystemdNotifier

log = logging.getLogger(__name__)
ERROR = "ERROR"


class Observer(Protocol):
    """Something that follows the published messages (metrics, systemd's notify socket)."""

    def on_verdict(self, payload: dict) -> None: ...

    def on_status(self, payload: dict) -> None: ...


@dataclass
class ServeStats:
    """Counters of one serve run (also the body of every heartbeat)."""

    frames: int = 0
    ok: int = 0
    nok: int = 0
    errors: int = 0
    started: float = field(default_factory=time.monotonic)
    _window_frames: int = 0
    _window_start: float = field(default_factory=time.monotonic)

    def count(self, verdict: str) -> None:
        """Record one published verdict."""
        self.frames += 1
        self._window_frames += 1
        if verdict == NOK:
            self.nok += 1
        elif verdict == ERROR:
            self.errors += 1
        else:
            self.ok += 1

    def snapshot(self) -> dict:
        """Counters plus the frame rate since the previous snapshot."""
        now = time.monotonic()
        fps = self._window_frames / max(now - self._window_start, 1e-9)
        self._window_frames, self._window_start = 0, now
        return {"frames": self.frames, "ok": self.ok, "nok": self.nok, "errors": self.errors,
                "fps": round(fps, 2), "uptime_s": round(now - self.started, 3)}


class StopFlag:
    """Set by SIGINT/SIGTERM (or by a caller) to end the loop after the current frame."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        """Request a stop; usable directly as a signal handler."""
        if signum is not None:
            log.info("received %s, stopping after the current frame", signal.Signals(signum).name)
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()


def verdict_fields(frame: Frame, predictor: Predictor) -> dict:
    """Run the predictor on one frame and build the verdict body (publisher adds the envelope)."""
    body: dict = {"frame_index": frame.index, "frame_name": frame.name, "capture_ts": frame.capture_ts,
                  "bundle_id": predictor.bundle.bundle_id, "engine": predictor.engine}
    if frame.image is None:
        return {**body, "verdict": ERROR, "error": frame.error, "score": None, "threshold": 0.5,
                "regions": [], "latency_ms": {}}
    prediction = predictor.predict(frame.image)
    body.update(prediction.to_dict())
    if frame.conversions:
        body["conversions"] = list(frame.conversions)
    body["latency_ms"]["total"] = round(1000.0 * (time.time() - frame.capture_ts), 3)
    return body


def serve(predictor: Predictor, source: FrameSource, publisher: VerdictPublisher, *,
          stop: StopFlag | None = None, heartbeat: Heartbeat | None = None,
          on_verdict: Callable[[dict], None] | None = None, observers: Sequence[Observer] = ()) -> ServeStats:
    """Publish one verdict per frame until the source ends or ``stop`` is set; ``observers`` (metrics,
    systemd) see every published message.

    The source is read in a background thread, so a heartbeat goes out on the status topic once
    per period even while a camera delivers no frames, and a stop request is honoured within a
    period. A final status carries the source's end reason. A source failure is published as a
    ``failed`` status and re-raised: it is never swallowed.
    """
    stop = stop if stop is not None else StopFlag()
    heartbeat = heartbeat or Heartbeat()
    stats = ServeStats()
    common = {"bundle_id": predictor.bundle.bundle_id, "engine": predictor.engine, "source": source.description}

    reader = ThreadedReader(source).start()

    def status(state: str, **extra: object) -> None:
        journal = {"journal": publisher.journal.status()} if publisher.journal is not None else {}
        payload = publisher.publish_status({**common, "state": state, **extra, **stats.snapshot(),
                                            "dropped": publisher.dropped, "dropped_stale": reader.dropped_stale,
                                            "reconnects": source.reconnects, **journal})
        for observer in observers:
            observer.on_status(payload)

    try:
        while not stop:
            item = reader.get(timeout=heartbeat.seconds_until_due())
            if item is END:
                break
            if isinstance(item, Frame):
                payload = publisher.publish_verdict(verdict_fields(item, predictor))
                stats.count(payload["verdict"])
                for observer in observers:
                    observer.on_verdict(payload)
                if on_verdict is not None:
                    on_verdict(payload)
            if heartbeat.due():
                status("running")
    except SourceError as exc:
        status("failed", error=str(exc))
        raise
    finally:
        reader.stop()
    reason = "stopped by signal" if stop else source.end_reason
    status("stopped", end_reason=reason)
    log.info("served %d frames (%d OK, %d NOK, %d errors): %s", stats.frames, stats.ok, stats.nok,
             stats.errors, reason)
    return stats


def run_daemon(bundle: str, camera: str, endpoint: str, *, line: str = "line1", camera_id: str = "cam0",
               engine: str = "auto", providers: tuple[str, ...] = ("cpu",), wait_subscribers: int = 0,
               wait_timeout_s: float = 10.0, loop: bool = False, max_frames: int | None = None,
               on_verdict: Callable[[dict], None] | None = None, convert_frames: bool = False,
               journal_dir: str | Path | None = None, journal_fsync: str = "interval",
               metrics_port: int | None = None, metrics_host: str = "127.0.0.1") -> ServeStats:
    """Open bundle, source and publisher; serve until the source ends or SIGINT/SIGTERM.

    Frames unlike the training images get an ERROR verdict (``convert_frames``: converted and judged).
    With ``journal_dir``, every verdict is journalled in ``<journal_dir>/<line>.<camera_id>/`` before it
    is published, and ``seq`` continues from the journal (see :mod:`edgeinspect.runtime.journal`).
    With ``metrics_port``, Prometheus metrics and ``/healthz`` are served there (0: any free port).
    """
    predictor = Predictor(bundle, engine=engine, providers=providers, convert_frames=convert_frames)
    journal = VerdictJournal(Path(journal_dir) / f"{line}.{camera_id}", fsync=journal_fsync) if journal_dir else None
    stop = StopFlag()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, stop.set)
    with VerdictPublisher(endpoint, line, camera_id, journal=journal) as publisher:
        if wait_subscribers:
            seen = publisher.wait_for_subscribers(wait_subscribers, wait_timeout_s)
            if seen < wait_subscribers:
                log.warning("only %d of %d subscribers connected within %.1f s; starting anyway",
                            seen, wait_subscribers, wait_timeout_s)
        with open_source(camera, loop=loop, max_frames=max_frames, check=predictor.check) as source:
            observers: list[Observer] = [SystemdNotifier()]
            server = None
            if metrics_port is not None:
                observers.append(DaemonMetrics(line, camera_id))
                server = MetricsServer(observers[-1], metrics_port, metrics_host)
            try:
                return serve(predictor, source, publisher, stop=stop, on_verdict=on_verdict, observers=observers)
            finally:
                observers[0].close()
                if server is not None:
                    server.close()
                if journal is not None:
                    journal.close()
