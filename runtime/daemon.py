"""The inspection daemon: frames from a source -> predictor -> a verdict per frame over ZeroMQ."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Protocol

from edgeinspect.camera import END, Frame, FrameSource, ThreadedReader, open_source
from edgeinspect.errors import EdgeInspectError, EngineError, SourceError
from edgeinspect.frames import FrameCheck
from edgeinspect.runtime.control import CameraControl, ControlServer
from edgeinspect.runtime.journal import VerdictJournal
from edgeinspect.runtime.line import LineConfig
from edgeinspect.runtime.metrics import DaemonMetrics, MetricsServer
from edgeinspect.runtime.predictor import NOK, Predictor
from edgeinspect.runtime.publisher import Heartbeat, PublisherSocket, VerdictPublisher
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

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds or until a stop is requested; True if it was."""
        return self._event.wait(max(timeout, 0.0))


def failure_reason(exc: Exception) -> str:
    """Why a camera stopped, on one line (with the exception's type when it is not an expected failure)."""
    return str(exc) if isinstance(exc, EdgeInspectError) else f"{type(exc).__name__}: {exc}"


def verdict_fields(frame: Frame, predictor: Predictor, offset: tuple[int, int] = (0, 0)) -> dict:
    """Run the predictor on one frame and build the verdict body (publisher adds the envelope).

    ``offset``: where the judged region of interest starts in the frame; regions are reported in
    frame pixels.
    """
    body: dict = {"frame_index": frame.index, "frame_name": frame.name, "capture_ts": frame.capture_ts,
                  "bundle_id": predictor.bundle.bundle_id, "engine": predictor.engine}
    error = frame.error
    if frame.image is not None:
        try:
            prediction = predictor.predict(frame.image)
        except EngineError as exc:  # a remote engine that is down: this frame is not judged, the next may be
            error = str(exc)
    if frame.image is None or error:
        return {**body, "verdict": ERROR, "error": error, "score": None, "threshold": 0.5,
                "regions": [], "latency_ms": {}}
    body.update(prediction.to_dict())
    if offset != (0, 0):
        for region in body["regions"]:
            region["box"] = [v + offset[i % 2] for i, v in enumerate(region["box"])]
            if "polygon" in region:
                region["polygon"] = [[x + offset[0], y + offset[1]] for x, y in region["polygon"]]
    if frame.conversions:
        body["conversions"] = list(frame.conversions)
    body["latency_ms"]["total"] = round(1000.0 * (time.time() - frame.capture_ts), 3)
    return body


def serve(predictor: Predictor, source: FrameSource, publisher: VerdictPublisher, *,
          stop: StopFlag | None = None, heartbeat: Heartbeat | None = None,
          on_verdict: Callable[[dict], None] | None = None, observers: Sequence[Observer] = (),
          control: CameraControl | None = None) -> ServeStats:
    """Publish one verdict per frame until the source ends or ``stop`` is set; ``observers`` (metrics,
    systemd) see every published message; ``control`` (the control socket's handle) may swap the
    predictor between two frames or pause judging (heartbeats go on, with state ``paused``).

    The source is read in a background thread, so a heartbeat goes out on the status topic once
    per period even while a camera delivers no frames, and a stop request is honoured within a
    period. A final status carries the source's end reason. A failure (of the source, or any other
    error) is published as a ``failed`` status and re-raised: it is never swallowed. Heartbeats also
    fsync the journal's last records when due (its ``interval`` policy).
    """
    stop = stop if stop is not None else StopFlag()
    heartbeat = heartbeat or Heartbeat()
    stats = ServeStats()
    control = control or CameraControl(publisher.camera, predictor)
    offset = tuple(source.check.roi[:2]) if source.check.roi else (0, 0)

    reader = ThreadedReader(source).start()

    def status(state: str, **extra: object) -> None:
        journal: dict[str, dict] = {}
        if publisher.journal is not None:
            publisher.journal.sync_if_due()  # records of a burst reach the disk while the camera is silent
            journal = {"journal": publisher.journal.status()}
        current = control.predictor
        payload = publisher.publish_status({"bundle_id": current.bundle.bundle_id, "engine": current.engine,
                                            "source": source.description, "state": state, **extra, **stats.snapshot(),
                                            "dropped": publisher.dropped, "dropped_stale": reader.dropped_stale,
                                            "reconnects": source.reconnects, **journal})
        control.last_status = payload
        for observer in observers:
            observer.on_status(payload)

    try:
        while not stop:
            if control.paused.is_set():  # frames wait (recorded) or go stale (live) until resumed
                stop.wait(min(heartbeat.seconds_until_due(), 0.1))
                if heartbeat.due():
                    status("paused")
                continue
            item = reader.get(timeout=min(heartbeat.seconds_until_due(), 0.1))
            if item is END:
                break
            if isinstance(item, Frame):
                payload = publisher.publish_verdict(verdict_fields(item, control.predictor, offset))
                control.last_verdict = payload
                stats.count(payload["verdict"])
                for observer in observers:
                    observer.on_verdict(payload)
                if on_verdict is not None:
                    on_verdict(payload)
            if heartbeat.due():
                status("running")
    except Exception as exc:
        status("failed", error=failure_reason(exc))
        raise
    finally:
        reader.stop()
    reason = "stopped by signal" if stop else source.end_reason
    status("stopped", end_reason=reason)
    log.info("served %d frames (%d OK, %d NOK, %d errors): %s", stats.frames, stats.ok, stats.nok,
             stats.errors, reason)
    return stats


def run_line(config: LineConfig, *, on_verdict: Callable[[dict], None] | None = None) -> dict[str, ServeStats]:
    """Serve every camera of a line until their sources end or SIGINT/SIGTERM; stats per camera id.

    One worker thread per camera (the caller's thread for a single camera), all publishing on one
    socket, each on its own topics with its own ``seq`` and journal. Cameras with the same bundle
    and engine share one engine session; with several sessions each gets an equal share of the CPU
    threads, so workers do not fight. A camera that fails (a live source that cannot be opened or stays
    disconnected after its reconnect attempts, or an unexpected error, logged with its traceback) is
    published as ``failed`` while the others go on; when all have ended, SourceError names it. Frames
    unlike the training images get an ERROR verdict (``frames: convert``: converted and judged).
    """
    cameras = config.cameras
    keys = sorted({(str(Path(c.bundle).resolve()), c.engine) for c in cameras})
    threads = max(1, (os.cpu_count() or 1) // len(keys)) if len(keys) > 1 else None
    predictors = {key: Predictor(key[0], engine=key[1], providers=tuple(config.providers), threads=threads,
                                 remote=config.triton_url) for key in keys}
    stop = StopFlag()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, stop.set)
    notifier = SystemdNotifier([c.id for c in cameras])
    metrics = DaemonMetrics(config.line) if config.metrics_port is not None else None
    results: dict[str, ServeStats] = {}
    failures: dict[str, Exception] = {}
    with ExitStack() as stack:
        stack.callback(notifier.close)
        if metrics is not None:
            stack.callback(MetricsServer(metrics, config.metrics_port, config.metrics_host).close)
        socket = PublisherSocket(config.publish)
        stack.callback(socket.close)
        workers, controls = [], {}
        for camera in cameras:
            journal = None
            if config.journal:
                journal = VerdictJournal(Path(config.journal) / f"{config.line}.{camera.id}",
                                         fsync=config.journal_fsync)
                stack.callback(journal.close)
            predictor = predictors[(str(Path(camera.bundle).resolve()), camera.engine)]
            check = FrameCheck(predictor.check.spec, convert=camera.frames == "convert", roi=camera.roi)
            source = stack.enter_context(open_source(camera.source, loop=camera.loop, max_frames=camera.max_frames,
                                                     check=check, fps=camera.fps,
                                                     reconnect_attempts=camera.reconnect_attempts,
                                                     reconnect_delay_s=camera.reconnect_delay_s))
            observers = [notifier, *([metrics.camera(camera.id)] if metrics is not None else [])]
            controls[camera.id] = CameraControl(camera.id, predictor, camera.engine, check=check)
            workers.append((camera.id, predictor, source, VerdictPublisher(socket, config.line, camera.id,
                                                                           journal=journal), observers))
        if config.control:
            def open_predictor(bundle: str, control: CameraControl) -> Predictor:
                return Predictor(bundle, engine=control.engine, providers=tuple(config.providers), threads=threads,
                                 remote=config.triton_url)

            stack.callback(ControlServer(config.control, controls, open_predictor, token=config.control_token).close)
        if config.wait_subscribers:
            topics = [w[3].verdict_topic for w in workers]
            seen = socket.wait_for_subscribers(topics, config.wait_subscribers, config.wait_timeout_s)
            if seen < config.wait_subscribers:
                log.warning("only %d of %d subscribers connected within %.1f s; starting anyway",
                            seen, config.wait_subscribers, config.wait_timeout_s)

        def work(camera_id: str, predictor: Predictor, source: FrameSource, publisher: VerdictPublisher,
                 observers: list[Observer]) -> None:
            try:
                results[camera_id] = serve(predictor, source, publisher, stop=stop, on_verdict=on_verdict,
                                           observers=observers, control=controls[camera_id])
            except SourceError as exc:
                failures[camera_id] = exc
            except Exception as exc:  # a bug must not end a camera silently: logged, published, in the exit code
                log.exception("camera %s stopped by an unexpected error", camera_id)
                failures[camera_id] = exc

        if len(workers) == 1:
            work(*workers[0])
        else:
            running = [threading.Thread(target=work, args=w, name=f"camera {w[0]}", daemon=True) for w in workers]
            for thread in running:
                thread.start()
            for thread in running:
                while thread.is_alive():  # short joins: the main thread stays free for SIGTERM
                    thread.join(0.2)
        notifier.stopping()
    if failures:
        raise SourceError("; ".join(f"camera {camera_id}: {failure_reason(exc)}"
                                    for camera_id, exc in failures.items()))
    return results
