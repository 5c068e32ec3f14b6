"""systemd's notify protocol (``Type=notify``, ``WatchdogSec=``), spoken by the daemon when it runs under it.

systemd passes ``NOTIFY_SOCKET`` (a Unix datagram socket; ``@`` = the abstract namespace) and, with a
watchdog, ``WATCHDOG_USEC``. The daemon sends ``READY=1`` once every camera published its first
heartbeat (engines loaded, sources open, publisher bound), ``WATCHDOG=1`` with later heartbeats while
every running or paused camera's loop is alive (so one stuck loop gets the daemon restarted) and
``STOPPING=1`` when it drains, with ``STATUS=`` lines for ``systemctl status``; taken from the published statuses.
Outside systemd every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

ALIVE = ("running", "paused")  # states of a serving camera loop (paused: judging stopped on purpose)


class SystemdNotifier:
    """Sends notify messages to ``$NOTIFY_SOCKET``; a no-op when it is not set."""

    def __init__(self, cameras: Sequence[str], environ: dict[str, str] | None = None, *, stale_s: float = 5.0):
        env = os.environ if environ is None else environ
        self.cameras = list(cameras)
        self.stale_s = stale_s
        self._cameras: dict[str, tuple[str, float]] = {}  # camera -> (last state, when)
        self._lock = threading.Lock()
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and mine else None
        self._socket: socket.socket | None = None
        self._ready = False
        if self.address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def notify(self, message: str) -> bool:
        """Send one ``KEY=value`` message; False (logged, never raised) when it cannot be delivered."""
        if self._socket is None:
            return False
        try:
            self._socket.sendto(message.encode(), self.address)
            return True
        except OSError as exc:
            log.warning("systemd notify %r to %s failed: %s", message, self.address.lstrip("\0"), exc)
            return False

    def on_verdict(self, payload: dict[str, Any]) -> None:
        """Verdicts say nothing to systemd (the heartbeats do)."""

    def on_status(self, payload: dict[str, Any]) -> None:
        """READY=1 once every camera sent a ``running`` (or ``paused``) status; then WATCHDOG=1 whenever every
        running or paused camera sent one within ``stale_s`` (one stuck camera loop stops the pings); STATUS=
        always."""
        now = time.monotonic()
        with self._lock:
            self._cameras[payload["camera"]] = (payload["state"], now)
            running = sum(state == "running" for state, _ in self._cameras.values())
            alive = [seen for state, seen in self._cameras.values() if state in ALIVE]
            all_reported = set(self.cameras) <= set(self._cameras)
            fresh = bool(alive) and all(now - seen < self.stale_s for seen in alive)
            frames = payload.get("frames", 0)
            text = (f"STATUS={running} of {len(self.cameras)} cameras running; {payload['camera']}: "
                    f"{payload['state']}, {frames} frames, {payload.get('fps', 0)} fps")
            if not self._ready:
                if all_reported and fresh:
                    self._ready = self.notify(f"READY=1\n{text}")
                return
            self.notify(f"WATCHDOG=1\n{text}" if fresh and self.watchdog_s is not None else text)

    def stopping(self) -> None:
        """The daemon is draining (a stop was asked for, or every camera ended)."""
        self.notify("STOPPING=1")

    def close(self) -> None:
        """Close the socket; idempotent."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
