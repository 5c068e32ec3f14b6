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
    """Convert numpy scalars and arrays (also inside dicts, lists and tuples) to plain Python values."""
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(to_jsonable(k)): to_jsonable(v) for k, v in value.items()}
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


class VerdictPublisher:
    """An XPUB socket bound to ``endpoint`` publishing verdicts and status messages of one camera.

    ``nodrop=True`` (ZMQ_XPUB_NODROP) makes a full subscriber queue refuse the whole message: it then
    reaches no subscriber and is counted in ``dropped``. With the default, ZeroMQ drops it only for the
    subscribers whose queue is full, without telling the publisher (``dropped`` stays 0).
    Without ``context`` the publisher owns a context and terminates it on close, which waits up to
    ``linger_ms`` for queued messages to be sent. With a ``journal``, each verdict is appended to it
    before it is sent, and ``seq`` continues from the journal's (``first_seq`` otherwise).
    """

    def __init__(
        self,
        endpoint: str,
        line: str,
        camera: str,
        *,
        context: zmq.Context | None = None,
        sndhwm: int = 10000,
        linger_ms: int = 5000,
        nodrop: bool = False,
        first_seq: int = 0,
        journal: VerdictJournal | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.line = line
        self.camera = camera
        self.verdict_topic = f"verdict.{line}.{camera}"
        self.status_topic = f"status.{line}.{camera}"
        self.dropped = 0
        self.subscriptions = 0
        self.journal = journal
        self._seq = journal.next_seq if journal is not None else first_seq
        self._linger_ms = linger_ms
        self._own_context = context is None
        self._context = zmq.Context() if context is None else context
        self._socket = self._context.socket(zmq.XPUB)
        try:
            self._socket.setsockopt(zmq.SNDHWM, sndhwm)
            self._socket.setsockopt(zmq.LINGER, linger_ms)
            self._socket.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscription, not only the first per topic
            if nodrop:
                self._socket.setsockopt(zmq.XPUB_NODROP, 1)
            self._socket.bind(endpoint)
        except zmq.ZMQError as exc:
            self._socket.close(linger=0)
            if self._own_context:
                self._context.term()
            raise PublishError(f"cannot bind verdict publisher to {endpoint}: {exc}") from exc
        self._closed = False
        logger.info("publishing %s and %s on %s", self.verdict_topic, self.status_topic, endpoint)

    @property
    def next_seq(self) -> int:
        """The ``seq`` the next verdict will carry (= the number of verdicts published so far)."""
        return self._seq

    def _drain_subscriptions(self) -> None:
        """Read the pending subscription messages and count those that match the verdict topic."""
        topic = self.verdict_topic.encode("utf-8")
        while True:
            try:
                message = self._socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if not message:
                continue
            prefix = message[1:]
            if message[0] == 1:
                matches = topic.startswith(prefix)
                if matches:
                    self.subscriptions += 1
                logger.info(
                    "subscription %r on %s%s", prefix.decode("utf-8", "replace"), self.endpoint,
                    " (receives verdicts)" if matches else "",
                )
            elif message[0] == 0:
                logger.info("unsubscription %r on %s", prefix.decode("utf-8", "replace"), self.endpoint)

    def wait_for_subscribers(self, n: int = 1, timeout_s: float = 10.0) -> int:
        """Wait until ``n`` subscriptions matching the verdict topic arrived, at most ``timeout_s``.

        Returns how many matching subscriptions were seen since the publisher was created.
        """
        self._check_open()
        deadline = time.monotonic() + timeout_s
        self._drain_subscriptions()
        while self.subscriptions < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if self._socket.poll(max(1, math.ceil(remaining * 1000)), zmq.POLLIN):
                self._drain_subscriptions()
        return self.subscriptions

    def publish_verdict(self, fields: dict) -> dict:
        """Publish one verdict with the envelope and the next ``seq``; return the full payload."""
        self._check_open()
        payload = self._envelope(fields, _VERDICT_ENVELOPE, {"seq": self._seq})
        if self.journal is not None:
            self.journal.append(payload)
        self._send(self.verdict_topic, payload)
        self._seq += 1
        return payload

    def republish(self, payload: dict) -> None:
        """Send a journalled verdict again, as it was (its own ``seq``), marked ``"replayed": true``."""
        self._check_open()
        self._send(self.verdict_topic, {**payload, "replayed": True})

    def publish_status(self, fields: dict) -> dict:
        """Publish a status (heartbeat) message on the status topic; return the full payload."""
        self._check_open()
        self._drain_subscriptions()
        payload = self._envelope(fields, _STATUS_ENVELOPE, {"kind": "status"})
        self._send(self.status_topic, payload)
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

    def _send(self, topic: str, payload: dict) -> None:
        data = _dumps(payload)
        try:
            self._socket.send_multipart([topic.encode("utf-8"), data], flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                logger.warning(
                    "%s: subscriber queue full, %d messages dropped so far", self.endpoint, self.dropped
                )

    def _check_open(self) -> None:
        if self._closed:
            raise PublishError(f"verdict publisher on {self.endpoint} is closed")

    def close(self) -> None:
        """Close the socket, letting queued messages flush for up to ``linger_ms``; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._socket.close(linger=self._linger_ms)
        if self._own_context:
            self._context.term()

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
