"""Publishing verdicts and heartbeats over ZeroMQ (an XPUB socket), and decoding them for subscribers.

Each message is two frames: the topic (``verdict.<line>.<camera>`` or ``status.<line>.<camera>``) and
a compact UTF-8 JSON object carrying an envelope (``schema``, ``line``, ``camera``, ``publish_ts`` and,
for verdicts, a gap-free ``seq``). Sends never block: with ZeroMQ's default a subscriber whose queue is
full (``sndhwm``) misses messages on its own - it sees a gap in ``seq`` - while the others keep receiving.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq

from edgeinspect.errors import EdgeInspectError

if TYPE_CHECKING:
    from typing import Self  # only for type checkers: typing.Self is Python 3.11+, the runtime supports 3.10

    from edgeinspect.runtime.journal import VerdictJournal

logger = logging.getLogger(__name__)

VERDICT_SCHEMA_VERSION = 1

_VERDICT_ENVELOPE = ("schema", "seq", "line", "camera", "publish_ts")
_STATUS_ENVELOPE = ("schema", "kind", "line", "camera", "publish_ts")


class PublishError(EdgeInspectError):
    """The verdict publisher cannot bind its endpoint, or was used after close."""


def to_jsonable(value: Any) -> Any:
    """Convert numpy scalars and arrays (also inside dicts, lists and tuples) to plain Python values, and
    make strings UTF-8-safe: a file name that is not UTF-8 (its bytes decoded as surrogates) gets a
    ``\\udcXX`` escape for each such byte, as ``edgeinspect predict`` prints it."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {str(to_jsonable(k)): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def _dumps(payload: dict) -> bytes:
    try:
        text = json.dumps(payload, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"message is not JSON-serialisable (NaN and infinity are refused): {exc}") from exc
    return text.encode("utf-8")


class PublisherSocket:
    """An XPUB socket bound to ``endpoint``, shared by the cameras of one daemon (a lock serialises its use).

    ``nodrop=True`` (ZMQ_XPUB_NODROP) makes a full subscriber queue refuse the whole message: it then
    reaches no subscriber and is counted in ``dropped``. With the default, ZeroMQ drops it only for the
    subscribers whose queue is full, without telling the publisher (``dropped`` stays 0).
    Without ``context`` the socket owns a context and terminates it on close, which waits up to
    ``linger_ms`` for queued messages to be sent. ``send_timeout_s`` (for a replay, where every message
    counts; implies ``nodrop``): a full subscriber queue makes :meth:`send` wait up to that long for room
    instead of dropping, then raise PublishError.
    """

    def __init__(self, endpoint: str, *, context: zmq.Context | None = None, sndhwm: int = 10000,
                 linger_ms: int = 5000, nodrop: bool = False, send_timeout_s: float | None = None) -> None:
        self.endpoint = endpoint
        self.dropped = 0
        self.prefixes: list[bytes] = []  # every subscription seen since the socket was bound
        self._linger_ms = linger_ms
        self._send_timeout_s = send_timeout_s
        self._lock = threading.Lock()
        self._own_context = context is None
        self._context = zmq.Context() if context is None else context
        self._socket = self._context.socket(zmq.XPUB)
        try:
            self._socket.setsockopt(zmq.SNDHWM, sndhwm)
            self._socket.setsockopt(zmq.LINGER, linger_ms)
            self._socket.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscription, not only the first per topic
            if nodrop or send_timeout_s is not None:
                self._socket.setsockopt(zmq.XPUB_NODROP, 1)
            if send_timeout_s is not None:
                self._socket.setsockopt(zmq.SNDTIMEO, max(1, int(send_timeout_s * 1000)))
            self._socket.bind(endpoint)
        except zmq.ZMQError as exc:
            self._socket.close(linger=0)
            if self._own_context:
                self._context.term()
            raise PublishError(f"cannot bind verdict publisher to {endpoint}: {exc}") from exc
        self._closed = False
        logger.info("publishing on %s", endpoint)

    def matching(self, topics: Sequence[str]) -> int:
        """How many of the subscriptions seen receive at least one of ``topics``."""
        encoded = [t.encode("utf-8") for t in topics]
        return sum(any(t.startswith(prefix) for t in encoded) for prefix in self.prefixes)

    def drain_subscriptions(self) -> None:
        """Read the pending (un)subscription messages and remember the subscribed prefixes."""
        with self._lock:
            self.check_open()
            self._drain()

    def _drain(self) -> None:
        while True:
            try:
                message = self._socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if not message:
                continue
            prefix = message[1:]
            if message[0] == 1:
                self.prefixes.append(prefix)
                logger.info("subscription %r on %s", prefix.decode("utf-8", "replace"), self.endpoint)
            elif message[0] == 0:
                logger.info("unsubscription %r on %s", prefix.decode("utf-8", "replace"), self.endpoint)

    def wait_for_subscribers(self, topics: Sequence[str], n: int = 1, timeout_s: float = 10.0) -> int:
        """Wait until ``n`` subscriptions receiving one of ``topics`` arrived, at most ``timeout_s``.

        Returns how many such subscriptions were seen since the socket was bound.
        """
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self.check_open()
            self._drain()
            while self.matching(topics) < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if self._socket.poll(max(1, math.ceil(remaining * 1000)), zmq.POLLIN):
                    self._drain()
        return self.matching(topics)

    def send(self, topic: str, payload: dict) -> None:
        """Send [topic, JSON] without blocking; a refused message is counted in ``dropped``. With
        ``send_timeout_s`` wait for room instead, and PublishError when none came in time."""
        data = _dumps(payload)
        with self._lock:
            self.check_open()
            try:
                self._socket.send_multipart([topic.encode("utf-8"), data],
                                            flags=0 if self._send_timeout_s is not None else zmq.NOBLOCK)
            except zmq.Again:
                if self._send_timeout_s is not None:
                    raise PublishError(f"{self.endpoint}: a subscriber's queue stayed full for "
                                       f"{self._send_timeout_s:g} s (it stopped reading); {topic} not sent") from None
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    logger.warning("%s: subscriber queue full, %d messages dropped so far", self.endpoint,
                                   self.dropped)

    def check_open(self) -> None:
        """PublishError if the socket was closed."""
        if self._closed:
            raise PublishError(f"verdict publisher on {self.endpoint} is closed")

    def close(self) -> None:
        """Close the socket, letting queued messages flush for up to ``linger_ms``; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._socket.close(linger=self._linger_ms)
            if self._own_context:
                self._context.term()


class VerdictPublisher:
    """Verdicts and status messages of one camera, on its own socket (``endpoint`` a string, with the
    :class:`PublisherSocket` options) or on one shared with the line's other cameras (a PublisherSocket,
    which then stays open when this publisher closes).

    With a ``journal``, each verdict is appended to it before it is sent, and ``seq`` continues from
    the journal's (``first_seq`` otherwise).
    """

    def __init__(self, endpoint: str | PublisherSocket, line: str, camera: str, *, first_seq: int = 0,
                 journal: VerdictJournal | None = None, **socket_options: Any) -> None:
        self._owns_socket = not isinstance(endpoint, PublisherSocket)
        self.socket = PublisherSocket(endpoint, **socket_options) if self._owns_socket else endpoint
        self.endpoint = self.socket.endpoint
        self.line = line
        self.camera = camera
        self.verdict_topic = f"verdict.{line}.{camera}"
        self.status_topic = f"status.{line}.{camera}"
        self.journal = journal
        self._seq = journal.next_seq if journal is not None else first_seq
        logger.info("camera %s: %s and %s on %s", camera, self.verdict_topic, self.status_topic, self.endpoint)

    @property
    def dropped(self) -> int:
        """Messages the socket refused (all cameras on a shared socket)."""
        return self.socket.dropped

    @property
    def subscriptions(self) -> int:
        """Subscriptions seen that receive this camera's verdicts."""
        return self.socket.matching([self.verdict_topic])

    @property
    def next_seq(self) -> int:
        """The ``seq`` the next verdict will carry."""
        return self._seq

    def wait_for_subscribers(self, n: int = 1, timeout_s: float = 10.0) -> int:
        """Wait until ``n`` subscriptions matching the verdict topic arrived, at most ``timeout_s``."""
        return self.socket.wait_for_subscribers([self.verdict_topic], n, timeout_s)

    def publish_verdict(self, fields: dict) -> dict:
        """Publish one verdict with the envelope and the next ``seq``; return the full payload."""
        self.socket.check_open()
        payload = self._envelope(fields, _VERDICT_ENVELOPE, {"seq": self._seq})
        if self.journal is not None:
            self.journal.append(payload)
        self.socket.send(self.verdict_topic, payload)
        self._seq += 1
        return payload

    def republish(self, payload: dict) -> None:
        """Send a journalled verdict again, as it was (its own ``seq``), marked ``"replayed": true``."""
        self.socket.send(self.verdict_topic, {**payload, "replayed": True})

    def publish_status(self, fields: dict) -> dict:
        """Publish a status (heartbeat) message on the status topic; return the full payload."""
        self.socket.drain_subscriptions()
        payload = self._envelope(fields, _STATUS_ENVELOPE, {"kind": "status"})
        self.socket.send(self.status_topic, payload)
        return payload

    def _envelope(self, fields: dict, reserved: tuple[str, ...], extra: dict) -> dict:
        clashes = sorted(set(fields) & set(reserved))
        if clashes:
            raise ValueError(f"fields may not set the envelope keys {clashes}")
        payload = {
            "schema": VERDICT_SCHEMA_VERSION,
            **extra,
            "line": self.line,
            "camera": self.camera,
            "publish_ts": time.time(),
        }
        payload.update(to_jsonable(fields))
        return payload

    def close(self) -> None:
        """Close the socket if this publisher owns it; idempotent."""
        if self._owns_socket:
            self.socket.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def decode_message(frames: Sequence[bytes]) -> tuple[str, dict]:
    """Decode a received [topic, JSON] message into (topic, payload); raise ValueError if malformed."""
    if len(frames) != 2:
        raise ValueError(f"expected a 2-frame message [topic, JSON payload], got {len(frames)} frames")
    try:
        topic = bytes(frames[0]).decode("utf-8")
        payload = json.loads(bytes(frames[1]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"malformed message: {exc}") from exc
    if not isinstance(payload, dict):
        kind = type(payload).__name__
        raise ValueError(f"malformed message on {topic!r}: the payload is a {kind}, not an object")
    schema = payload.get("schema")
    if not isinstance(schema, int) or isinstance(schema, bool) or schema < 1:
        raise ValueError(f"malformed message on {topic!r}: missing or invalid 'schema' ({schema!r})")
    if schema > VERDICT_SCHEMA_VERSION:
        raise ValueError(
            f"message on {topic!r} has schema {schema}, newer than the supported {VERDICT_SCHEMA_VERSION}; "
            "upgrade edgeinspect on the subscriber side"
        )
    return topic, payload


class Heartbeat:
    """Says when a status message is due: at most once per ``period_s``, the first call always."""

    def __init__(self, period_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        if period_s <= 0:
            raise ValueError(f"period_s must be > 0, got {period_s}")
        self.period_s = period_s
        self._clock = clock
        self._last: float | None = None

    def seconds_until_due(self) -> float:
        """How long until :meth:`due` will next return True (0 if it would now)."""
        if self._last is None:
            return 0.0
        return max(0.0, self._last + self.period_s - self._clock())

    def due(self) -> bool:
        """True if a period has passed since the last True (or on the first call)."""
        now = self._clock()
        if self._last is not None and now - self._last < self.period_s:
            return False
        self._last = now
        return True
