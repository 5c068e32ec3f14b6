"""systemd's notify protocol (``Type=notify``, ``WatchdogSec=``), spoken by the daemon when it runs under it.

systemd passes ``NOTIFY_SOCKET`` (a Unix datagram socket; ``@`` = the abstract namespace) and, with a
watchdog, ``WATCHDOG_USEC``. The daemon sends ``READY=1`` with its first heartbeat (the engine is
loaded, the source open, the publisher bound), ``WATCHDOG=1`` with every later heartbeat of its
serve loop (so a stuck loop gets restarted) and ``STOPPING=1`` when it drains, each with a
``STATUS=`` line for ``systemctl status``; all taken from the status messages the daemon publishes.
Outside systemd every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

log = logging.getLogger(__name__)


class SystemdNotifier:
    """Sends notify messages to ``$NOTIFY_SOCKET``; a no-op when it is not set."""

    def __init__(self, environ: dict[str, str] | None = None):
        env = os.environ if environ is None else environ
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
        """First ``running`` status: READY=1; later ones: WATCHDOG=1; ``stopped``/``failed``: STOPPING=1."""
        state = payload["state"]
        text = (f"STATUS={state}: {payload.get('frames', 0)} frames, {payload.get('fps', 0)} fps, "
                f"{payload.get('source')}")
        if state != "running":
            self.notify(f"STOPPING=1\n{text}")
        elif not self._ready:
            self._ready = self.notify(f"READY=1\n{text}")
        else:
            self.notify(f"WATCHDOG=1\n{text}" if self.watchdog_s is not None else text)

    def close(self) -> None:
        """Close the socket; idempotent."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
