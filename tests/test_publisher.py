"""The verdict publisher against real ZeroMQ sockets on loopback (no mocks of zmq)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import zmq

from edgeinspect.runtime.publisher import (
    VERDICT_SCHEMA_VERSION,
    Heartbeat,
    PublishError,
    VerdictPublisher,
    decode_message,
    to_jsonable,
)

RECV_TIMEOUT_MS = 2000


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


def subscriber(context: zmq.Context, endpoint: str, prefix: str) -> zmq.Socket:
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVTIMEO, RECV_TIMEOUT_MS)
    sub.setsockopt_string(zmq.SUBSCRIBE, prefix)
    sub.connect(endpoint)
    return sub


def test_all_verdicts_arrive_in_order(context: zmq.Context, endpoint: str) -> None:
    with VerdictPublisher(endpoint, "L1", "cam0", context=context) as pub:
        assert pub.verdict_topic == "verdict.L1.cam0" and pub.status_topic == "status.L1.cam0"
        sub = subscriber(context, endpoint, "verdict.L1")  # connects before any verdict: no slow joiner
        assert pub.wait_for_subscribers(1, timeout_s=5.0) == 1
        sent = [
            pub.publish_verdict({"frame": i, "ok": bool(i % 3), "score": np.float32(i / 10)})
            for i in range(200)
        ]
        received = [decode_message(sub.recv_multipart()) for _ in range(200)]
    assert [payload["seq"] for _, payload in received] == list(range(200))
    assert {topic for topic, _ in received} == {"verdict.L1.cam0"}
    assert [payload for _, payload in received] == sent
    first = received[0][1]
    assert set(first) == {"schema", "seq", "line", "camera", "publish_ts", "frame", "ok", "score"}
    assert first["schema"] == VERDICT_SCHEMA_VERSION and first["line"] == "L1" and first["camera"] == "cam0"
    assert received[7][1]["ok"] is True and received[7][1]["score"] == pytest.approx(0.7)
    assert abs(first["publish_ts"] - time.time()) < 60
    assert pub.dropped == 0 and pub.next_seq == 200


def test_status_goes_to_its_own_topic(context: zmq.Context, endpoint: str) -> None:
    with VerdictPublisher(endpoint, "L1", "cam0", context=context) as pub:
        verdicts = subscriber(context, endpoint, "verdict.")
        everything = subscriber(context, endpoint, "")
        assert pub.wait_for_subscribers(2, timeout_s=5.0) == 2
        status = pub.publish_status({"state": "running", "fps": np.float64(29.5)})
        verdict = pub.publish_verdict({"ok": True})
        assert status["kind"] == "status" and "seq" not in status and verdict["seq"] == 0

        topic, payload = decode_message(everything.recv_multipart())
        assert topic == "status.L1.cam0" and payload == status
        assert decode_message(everything.recv_multipart()) == ("verdict.L1.cam0", verdict)
        # The verdict-only subscriber's first message is the verdict: the status never reached it.
        assert decode_message(verdicts.recv_multipart()) == ("verdict.L1.cam0", verdict)
        assert verdicts.poll(100) == 0


def test_subscription_to_another_line_does_not_count(context: zmq.Context, endpoint: str) -> None:
    with VerdictPublisher(endpoint, "L1", "cam0", context=context) as pub:
        others = [subscriber(context, endpoint, "verdict.L2"), subscriber(context, endpoint, "status.")]
        t0 = time.monotonic()
        assert pub.wait_for_subscribers(1, timeout_s=0.5) == 0
        assert 0.4 < time.monotonic() - t0 < 3
        mine = subscriber(context, endpoint, "verdict.L1.cam0")
        assert pub.wait_for_subscribers(1, timeout_s=5.0) == 1
        pub.publish_verdict({"ok": True})
        assert decode_message(mine.recv_multipart())[0] == "verdict.L1.cam0"
        assert [sub.poll(100) for sub in others] == [0, 0]


def test_bind_twice_names_the_endpoint(context: zmq.Context, endpoint: str) -> None:
    with VerdictPublisher(endpoint, "L1", "cam0", context=context):
        with pytest.raises(PublishError, match=f"cannot bind verdict publisher to {endpoint}"):
            VerdictPublisher(endpoint, "L1", "cam1", context=context)


def test_owned_context_and_close(endpoint: str) -> None:
    pub = VerdictPublisher(endpoint, "L1", "cam0", linger_ms=0)
    pub.publish_verdict({"ok": True})
    pub.close()
    pub.close()
    with pytest.raises(PublishError, match="closed"):
        pub.publish_verdict({"ok": True})
    with VerdictPublisher(endpoint, "L1", "cam0", linger_ms=0):  # the endpoint was released
        pass


def test_no_subscriber_never_blocks(context: zmq.Context, endpoint: str) -> None:
    with VerdictPublisher(endpoint, "L1", "cam0", context=context, sndhwm=1, linger_ms=0) as pub:
        t0 = time.monotonic()
        for i in range(2000):
            pub.publish_verdict({"frame": i})
        assert time.monotonic() - t0 < 5
        assert pub.next_seq == 2000 and pub.dropped == 0  # nobody subscribed: nothing queued, nothing to drop


def test_stuck_subscriber_with_nodrop_counts_drops(context: zmq.Context, endpoint: str) -> None:
    with VerdictPublisher(endpoint, "L1", "cam0", context=context, sndhwm=1, linger_ms=0, nodrop=True) as pub:
        stuck = subscriber(context, endpoint, "")
        stuck.setsockopt(zmq.RCVHWM, 1)
        assert pub.wait_for_subscribers(1, timeout_s=5.0) == 1
        padding = "x" * 100_000
        t0 = time.monotonic()
        for i in range(500):  # 50 MB: more than the HWMs and the loopback socket buffers hold
            pub.publish_verdict({"frame": i, "padding": padding})
        assert time.monotonic() - t0 < 10
        assert pub.next_seq == 500 and 0 < pub.dropped < 500


def test_a_replay_publisher_waits_for_a_slow_subscriber_and_refuses_a_stuck_one(context: zmq.Context,
                                                                               endpoint: str) -> None:
    """``send_timeout_s`` (journal replay): where the live publisher drops, it waits for room, so a subscriber that
    reads slowly gets every message; one that stopped reading ends the replay with PublishError, not a silent gap."""
    padding = "x" * 100_000
    with VerdictPublisher(endpoint, "L1", "cam0", context=context, sndhwm=1, linger_ms=0, send_timeout_s=5.0) as pub:
        sub = subscriber(context, endpoint, "")
        sub.setsockopt(zmq.RCVHWM, 1)
        assert pub.wait_for_subscribers(1, timeout_s=5.0) == 1
        received: list[int] = []
        reader = threading.Thread(target=lambda: received.extend(
            decode_message(sub.recv_multipart())[1]["frame"] for _ in range(300)))
        reader.start()
        for i in range(300):  # 30 MB: far more than the HWMs and socket buffers hold
            pub.publish_verdict({"frame": i, "padding": padding})
        reader.join(timeout=60)
        assert received == list(range(300)) and pub.dropped == 0
        with pytest.raises(PublishError, match="stopped reading"):  # nobody reads any more
            for i in range(300):
                pub.publish_verdict({"frame": i, "padding": padding})


def test_envelope_keys_and_nan_are_refused(context: zmq.Context, endpoint: str) -> None:
    with VerdictPublisher(endpoint, "L1", "cam0", context=context, linger_ms=0) as pub:
        with pytest.raises(ValueError, match="envelope keys \\['seq'\\]"):
            pub.publish_verdict({"seq": 5})
        with pytest.raises(ValueError, match="NaN"):
            pub.publish_verdict({"score": np.float32("nan")})
        assert pub.publish_verdict({"ok": True})["seq"] == 0  # failed publishes leave no gap


def test_to_jsonable() -> None:
    value = {"a": np.int64(3), "b": np.array([[1.5, 2.0]], np.float32), "c": (np.bool_(True), "x"), 4: None}
    converted = to_jsonable(value)
    assert converted == {"a": 3, "b": [[1.5, 2.0]], "c": [True, "x"], "4": None}
    assert json.loads(json.dumps(converted)) == converted
    assert type(converted["a"]) is int and type(converted["c"][0]) is bool
    not_utf8 = os.fsdecode(b"part-\xe9.png")  # a file name in Latin-1 on a UTF-8 system
    assert to_jsonable({not_utf8: [not_utf8]}) == {"part-\\udce9.png": ["part-\\udce9.png"]}  # as predict shows it


def test_decode_message_errors() -> None:
    good = [b"verdict.L1.cam0", b'{"schema":1,"seq":0}']
    assert decode_message(good) == ("verdict.L1.cam0", {"schema": 1, "seq": 0})
    with pytest.raises(ValueError, match="2-frame"):
        decode_message([b"verdict.L1.cam0"])
    with pytest.raises(ValueError, match="malformed"):
        decode_message([b"verdict.L1.cam0", b"{not json"])
    with pytest.raises(ValueError, match="malformed"):
        decode_message([b"verdict.L1.cam0", b"\xff\xfe"])
    with pytest.raises(ValueError, match="not an object"):
        decode_message([b"verdict.L1.cam0", b"[1, 2]"])
    with pytest.raises(ValueError, match="'schema'"):
        decode_message([b"verdict.L1.cam0", b'{"seq": 0}'])
    with pytest.raises(ValueError, match="schema 2, newer than the supported 1"):
        decode_message([b"verdict.L1.cam0", b'{"schema": 2}'])


def test_heartbeat_with_fake_clock() -> None:
    now = [100.0]
    beat = Heartbeat(period_s=1.0, clock=lambda: now[0])
    assert beat.due() is True
    assert beat.due() is False
    now[0] = 100.9
    assert beat.due() is False
    now[0] = 101.0
    assert beat.due() is True
    now[0] = 105.5  # after a stall: one beat, not a burst of the missed ones
    assert beat.due() is True
    assert beat.due() is False
    with pytest.raises(ValueError):
        Heartbeat(period_s=0)
