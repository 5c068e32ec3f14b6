"""The daemon's control socket: a ZeroMQ REP socket taking one JSON request at a time.

Requests are ``{"cmd": ..., "camera": optional id (default: every camera), "token": ...}``; replies are
``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``. Commands (one table, :data:`COMMANDS`):

- ``status``: per camera: its last status message (frames, fps, engine, bundle), paused, threshold.
- ``snapshot``: the last verdict of each camera (for subscribers that join late).
- ``reload`` with ``bundle``: open the bundle, verify every file, load the engine and judge a blank
  frame with it; only then swap it in, atomically between two frames. On any failure the old model
  keeps running and the reply says why.
- ``set-threshold`` with ``threshold`` (model units, as the verdicts' ``raw_threshold``): the
  decision threshold from the next frame on; the normalised score is recentred so 0.5 stays the boundary.
- ``pause`` / ``resume``: stop / restart judging (heartbeats go on, with state ``paused``).

The socket binds localhost by default; bound to any other address it requires a ``token`` in every
request (the line config's ``control_token``). A malformed request gets an error reply and changes nothing.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq

from edgeinspect.errors import EdgeInspectError
from edgeinspect.frames import FrameCheck
from edgeinspect.runtime.predictor import Predictor

log = logging.getLogger(__name__)


class ControlError(EdgeInspectError):
    """A control request that cannot be carried out (its reply says why)."""


def is_local(endpoint: str) -> bool:
    """True for endpoints only this machine can reach (loopback TCP, ipc://, inproc://)."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    host = endpoint.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


class CameraControl:
    """What the control socket changes in one camera while it serves: the predictor (replaced whole,
    atomically, on reload or set-threshold), pause; and the last verdict and status it published."""

    def __init__(self, camera_id: str, predictor: Predictor, engine: str = "auto", *,
                 check: FrameCheck | None = None):
        """``engine``: the selector the camera's engines are opened with (a reload uses it too); ``check``:
        the frame check of the camera's source, whose frame limits follow the predictor's bundle."""
        self.camera_id = camera_id
        self.check = check
        self.predictor = predictor
        self.engine = engine
        self.paused = threading.Event()
        self.last_verdict: dict | None = None
        self.last_status: dict | None = None

    @property
    def predictor(self) -> Predictor:
        """The predictor judging the camera's frames."""
        return self._predictor

    @predictor.setter
    def predictor(self, predictor: Predictor) -> None:
        if self.check is not None:  # frames are checked against the limits of the bundle that judges them
            self.check.spec = predictor.check.spec
        self._predictor = predictor


class ControlServer:
    """Serves control requests for ``cameras`` in a thread until :meth:`close`.

    ``open_predictor(bundle, control)`` opens a bundle for a camera the way the daemon opened its
    first one (engine selector, providers, threads).
    """

    def __init__(self, endpoint: str, cameras: dict[str, CameraControl],
                 open_predictor: Callable[[str, CameraControl], Predictor], *, token: str | None = None):
        if not is_local(endpoint) and not token:
            raise ControlError(f"control endpoint {endpoint} is reachable from other machines: set control_token "
                               f"in the line config (every request must then carry it), or bind 127.0.0.1")
        self.endpoint = endpoint
        self.cameras = cameras
        self.open_predictor = open_predictor
        self.token = token
        self._context = zmq.Context.instance()
        self._socket = self._context.socket(zmq.REP)
        self._socket.setsockopt(zmq.LINGER, 0)
        try:
            self._socket.bind(endpoint)
        except zmq.ZMQError as exc:
            self._socket.close()
            raise ControlError(f"cannot bind the control socket to {endpoint}: {exc}") from exc
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="control socket", daemon=True)
        self._thread.start()
        log.info("control socket on %s (%s)", endpoint, "token required" if token else "no token")

    def _run(self) -> None:
        while not self._stopping.is_set():
            if not self._socket.poll(100):
                continue
            parts = self._socket.recv_multipart()  # all of it: the REP socket then owes exactly one reply
            try:
                reply = self.handle(parts[0]) if len(parts) == 1 else {
                    "ok": False, "error": f"malformed request: {len(parts)} message parts; send one JSON object"}
                data = json.dumps(reply, allow_nan=False).encode()
            except Exception as exc:  # every request gets a reply, and the thread lives on
                log.exception("control reply failed")
                data = json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}).encode()
            self._socket.send(data)

    def handle(self, raw: bytes) -> dict[str, Any]:
        """The reply to one raw request; never raises."""
        try:
            request = json.loads(raw)
            if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                raise ControlError('a request is a JSON object with a "cmd" string')
            if self.token and not hmac.compare_digest(str(request.get("token", "")), self.token):
                raise ControlError("wrong or missing token")
            command = COMMANDS.get(request["cmd"])
            if command is None:
                raise ControlError(f"unknown command {request['cmd']!r}; use one of {sorted(COMMANDS)}")
            return {"ok": True, **command(self, request, self._selected(request))}
        except (ValueError, UnicodeDecodeError) as exc:
            return {"ok": False, "error": f"malformed request: {exc}"}
        except EdgeInspectError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a control request must never take the daemon down
            log.exception("control request failed")
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    def _selected(self, request: dict[str, Any]) -> list[CameraControl]:
        camera = request.get("camera")
        if camera is None:
            return list(self.cameras.values())
        if camera not in self.cameras:
            raise ControlError(f"no camera {camera!r}; cameras: {sorted(self.cameras)}")
        return [self.cameras[camera]]

    def close(self) -> None:
        """Stop serving and close the socket."""
        self._stopping.set()
        self._thread.join(5.0)
        self._socket.close()


def _status(server: ControlServer, request: dict, cameras: list[CameraControl]) -> dict[str, Any]:
    return {"cameras": {c.camera_id: {"paused": c.paused.is_set(), "bundle_id": c.predictor.bundle.bundle_id,
                                      "engine": c.predictor.engine, "threshold": c.predictor.threshold,
                                      "last_status": c.last_status} for c in cameras}}


def _snapshot(server: ControlServer, request: dict, cameras: list[CameraControl]) -> dict[str, Any]:
    return {"verdicts": {c.camera_id: c.last_verdict for c in cameras}}


def _reload(server: ControlServer, request: dict, cameras: list[CameraControl]) -> dict[str, Any]:
    bundle = request.get("bundle")
    if not isinstance(bundle, str) or not bundle:
        raise ControlError('reload needs "bundle": the path of the new bundle')
    opened: dict[str, Predictor] = {}
    for camera in cameras:  # open and try every engine before swapping any camera
        key = camera.engine
        if key not in opened:
            predictor = server.open_predictor(bundle, camera)
            size = predictor.preprocess.input_size
            predictor.predict(np.zeros((*size, 3), np.uint8))  # the engine really runs
            opened[key] = predictor
    for camera in cameras:
        camera.predictor = opened[camera.engine]
    new = next(iter(opened.values()))
    log.info("reloaded %s (%s) on cameras %s", bundle, new.bundle.bundle_id, [c.camera_id for c in cameras])
    return {"bundle_id": new.bundle.bundle_id, "engine": new.engine, "cameras": [c.camera_id for c in cameras]}


def _set_threshold(server: ControlServer, request: dict, cameras: list[CameraControl]) -> dict[str, Any]:
    value = request.get("threshold")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise ControlError('set-threshold needs a finite number "threshold" (model units, like raw_threshold)')
    for camera in cameras:
        camera.predictor = camera.predictor.with_threshold(float(value))
    return {"threshold": float(value), "cameras": [c.camera_id for c in cameras]}


def _pause(server: ControlServer, request: dict, cameras: list[CameraControl]) -> dict[str, Any]:
    for camera in cameras:
        camera.paused.set()
    return {"paused": [c.camera_id for c in cameras]}


def _resume(server: ControlServer, request: dict, cameras: list[CameraControl]) -> dict[str, Any]:
    for camera in cameras:
        camera.paused.clear()
    return {"resumed": [c.camera_id for c in cameras]}


COMMANDS: dict[str, Callable[[ControlServer, dict, list[CameraControl]], dict[str, Any]]] = {
    "status": _status, "snapshot": _snapshot, "reload": _reload, "set-threshold": _set_threshold,
    "pause": _pause, "resume": _resume,
}
