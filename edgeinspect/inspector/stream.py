"""A serving daemon's live verdicts for the dashboard: a ZeroMQ subscriber in a background thread that keeps the
recent verdicts (and the last NOK ones) for ``GET /api/daemon`` and the server-sent events of ``GET /api/stream``."""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

import zmq

from edgeinspect.errors import EdgeInspectError
from edgeinspect.runtime.publisher import decode_message

log = logging.getLogger(__name__)
RECENT, LAST_NOK = 200, 12


class DaemonStream:
    """Subscribes to ``verdict.`` and ``status.`` of a daemon's publish endpoint (``serve --publish``)."""

    def __init__(self, endpoint: str):
        """Connect to ``endpoint`` (EdgeInspectError naming it when it is not a ZeroMQ endpoint) and start."""
        self.endpoint = endpoint
        self._sock = zmq.Context.instance().socket(zmq.SUB)
        try:
            self._sock.connect(endpoint)
        except zmq.ZMQError as exc:
            self._sock.close(linger=0)
            raise EdgeInspectError(f"--daemon {endpoint}: cannot connect ({exc.strerror}); give a daemon's publish "
                                   f"endpoint, e.g. tcp://HOST:PORT (serve --publish)") from None
        for topic in ("verdict.", "status."):
            self._sock.setsockopt_string(zmq.SUBSCRIBE, topic)
        self.received = 0                                    # messages so far; the index of the next one
        self.recent: deque[tuple[int, str, dict]] = deque(maxlen=RECENT)  # (index, topic, payload)
        self.last_nok: deque[dict] = deque(maxlen=LAST_NOK)
        self.last_status: dict | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="inspector-daemon-stream", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sock = self._sock  # used by this thread only from now on
        try:
            while not self._stop.is_set():
                if not sock.poll(200):
                    continue
                try:
                    topic, payload = decode_message(sock.recv_multipart())
                except Exception as exc:  # noqa: BLE001  (a malformed message is skipped, the stream goes on)
                    log.warning("daemon message skipped: %s", exc)
                    continue
                with self._lock:
                    self.recent.append((self.received, topic, payload))
                    self.received += 1
                    if topic.startswith("status."):
                        self.last_status = payload
                    elif payload.get("verdict") == "NOK":
                        self.last_nok.append(payload)
        finally:
            sock.close(linger=0)

    def since(self, index: int) -> list[tuple[int, str, dict]]:
        """Messages received from ``index`` on (those still kept)."""
        with self._lock:
            return [m for m in self.recent if m[0] >= index]

    def summary(self) -> dict[str, Any]:
        """Endpoint, counts, the last status, the last NOK verdicts (newest first)."""
        with self._lock:
            return {"endpoint": self.endpoint, "received": self.received, "status": self.last_status,
                    "last_nok": list(self.last_nok)[::-1]}

    def close(self) -> None:
        """Stop the subscriber thread."""
        self._stop.set()
        self._thread.join(timeout=5)
