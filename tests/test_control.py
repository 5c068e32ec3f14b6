"""The control socket of a real serving daemon: edgeinspect ctl over real ZeroMQ on loopback."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
from conftest import SYNTH_CATEGORY, free_tcp_endpoint

from edgeinspect.runtime.control import ControlError, ControlServer, is_local
from edgeinspect.runtime.publisher import decode_message


def _ctl(endpoint: str, *args: str) -> tuple[int, dict]:
    result = subprocess.run([sys.executable, "-m", "edgeinspect", "ctl", "--connect", endpoint, *args],
                            capture_output=True, text=True, timeout=120)
    return result.returncode, json.loads(result.stdout)


class Line:
    """A subscriber to everything the daemon publishes."""

    def __init__(self, endpoint: str):
        self.sub = zmq.Context.instance().socket(zmq.SUB)
        self.sub.connect(endpoint)
        self.sub.setsockopt_string(zmq.SUBSCRIBE, "")

    def verdicts(self, n: int, since: float = 0.0) -> list[dict]:
        """The next ``n`` verdicts published after ``since`` (older queued ones are skipped)."""
        got = []
        while len(got) < n:
            assert self.sub.poll(120_000), "no verdict within 120 s"
            topic, payload = decode_message(self.sub.recv_multipart())
            if topic.startswith("verdict.") and payload["publish_ts"] >= since:
                got.append(payload)
        return got

    def for_seconds(self, seconds: float) -> tuple[list[dict], list[dict]]:
        verdicts, statuses = [], []
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if self.sub.poll(int(left * 1000) + 1):
                topic, payload = decode_message(self.sub.recv_multipart())
                (verdicts if topic.startswith("verdict.") else statuses).append(payload)
        return verdicts, statuses


def test_control_a_serving_daemon(patchcore_bundle: Path, padim_engine_bundle: Path, synth_root: Path,
                                  tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, src in enumerate(sorted((synth_root / SYNTH_CATEGORY / "test").glob("*/*.png"))[:4]):
        (folder / f"{i}.png").write_bytes(src.read_bytes())
    publish, control = free_tcp_endpoint(), free_tcp_endpoint()
    line = Line(publish)
    proc = subprocess.Popen([sys.executable, "-m", "edgeinspect", "-q", "serve", "--bundle", str(patchcore_bundle),
                             "--camera", str(folder), "--loop", "--publish", publish, "--camera-id", "cam1",
                             "--wait-subscribers", "1", "--control", control], stderr=subprocess.PIPE, text=True)
    try:
        first = line.verdicts(3)
        old_id = first[0]["bundle_id"]
        code, reply = _ctl(control, "status")
        assert code == 0 and reply["cameras"]["cam1"]["bundle_id"] == old_id
        assert reply["cameras"]["cam1"]["paused"] is False
        code, reply = _ctl(control, "snapshot", "--camera", "cam1")
        assert code == 0 and reply["verdicts"]["cam1"]["seq"] >= 2

        code, reply = _ctl(control, "set-threshold", "1e9")
        assert code == 0 and reply["threshold"] == 1e9
        after = line.verdicts(3, since=time.time())[-2:]  # past the frame being judged during the swap
        assert all(v["raw_threshold"] == 1e9 and v["verdict"] == "OK" for v in after)

        assert _ctl(control, "pause")[0] == 0
        line.for_seconds(0.5)  # queued messages and a frame in flight may still arrive
        verdicts, statuses = line.for_seconds(1.5)
        assert not verdicts and any(s["state"] == "paused" for s in statuses)
        assert _ctl(control, "resume")[0] == 0
        assert line.verdicts(1, since=time.time())

        tampered = tmp_path / "tampered"
        shutil.copytree(patchcore_bundle, tampered)
        engine = next((tampered / "engines").glob("*.onnx"))
        engine.write_bytes(engine.read_bytes()[:-100])
        code, reply = _ctl(control, "reload", str(tampered))
        assert code == 1 and not reply["ok"] and "sha256" in reply["error"]
        assert line.verdicts(2, since=time.time())[-1]["bundle_id"] == old_id  # the old model keeps running
        assert _ctl(control, "reload", str(tmp_path / "nope"))[0] == 1

        code, reply = _ctl(control, "reload", str(padim_engine_bundle))
        assert code == 0 and reply["bundle_id"] != old_id
        assert line.verdicts(3, since=time.time())[-1]["bundle_id"] == reply["bundle_id"]

        req = zmq.Context.instance().socket(zmq.REQ)
        req.connect(control)
        for raw, expected in ((b"{not json", "malformed"), (b'{"cmd": "explode"}', "unknown command"),
                              (b'{"cmd": "pause", "camera": "cam7"}', "no camera"), (b"[]", "JSON object")):
            req.send(raw)
            assert req.poll(30_000)
            answer = json.loads(req.recv())
            assert answer["ok"] is False and expected in answer["error"]
        req.close(linger=0)
        assert line.verdicts(2, since=time.time())  # still serving
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        line.sub.close(linger=0)
        proc.kill()


def test_a_reload_brings_the_frame_limits_of_the_new_bundle(patchcore_bundle: Path, synth_root: Path,
                                                            tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, src in enumerate(sorted((synth_root / SYNTH_CATEGORY / "test").glob("*/*.png"))[:4]):
        (folder / f"{i}.png").write_bytes(src.read_bytes())  # 256 x 256 pixels, like the training images
    big = tmp_path / "big"
    shutil.copytree(patchcore_bundle, big)
    manifest = json.loads((big / "manifest.json").read_text())
    manifest["input_images"].update(height=[1024, 1024], width=[1024, 1024])  # a model of 1024 x 1024 images
    (big / "manifest.json").write_text(json.dumps(manifest))
    publish, control = free_tcp_endpoint(), free_tcp_endpoint()
    line = Line(publish)
    proc = subprocess.Popen([sys.executable, "-m", "edgeinspect", "-q", "serve", "--bundle", str(patchcore_bundle),
                             "--camera", str(folder), "--loop", "--publish", publish, "--wait-subscribers", "1",
                             "--control", control], stderr=subprocess.PIPE, text=True)
    try:
        assert all(v["verdict"] in ("OK", "NOK") for v in line.verdicts(2))
        assert _ctl(control, "reload", str(big))[0] == 0
        for v in line.verdicts(8, since=time.time())[-2:]:  # past the frames checked before the swap
            assert v["verdict"] == "ERROR" and "frame is 256x256 pixels: height 256 is outside 512-4096" in v["error"]
        assert _ctl(control, "reload", str(patchcore_bundle))[0] == 0
        assert all(v["verdict"] in ("OK", "NOK") for v in line.verdicts(8, since=time.time())[-2:])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        line.sub.close(linger=0)
        proc.kill()


def test_a_multipart_request_gets_an_error_reply_and_the_socket_serves_on() -> None:
    endpoint = free_tcp_endpoint()
    server = ControlServer(endpoint, {}, lambda bundle, camera: None)
    req = zmq.Context.instance().socket(zmq.REQ)
    req.connect(endpoint)
    replies = []
    try:
        for parts in ([b'{"cmd": "status"}', b"more"], [b'{"cmd": "status"}']):
            req.send_multipart(parts)
            assert req.poll(30_000), "no reply"
            replies.append(json.loads(req.recv()))
    finally:
        req.close(linger=0)
        server.close()
    assert replies == [{"ok": False, "error": "malformed request: 2 message parts; send one JSON object"},
                       {"ok": True, "cameras": {}}]


def test_a_control_socket_off_localhost_needs_a_token() -> None:
    assert is_local("tcp://127.0.0.1:5556") and is_local("ipc:///run/edgeinspect.sock")
    assert not is_local("tcp://0.0.0.0:5556") and not is_local("tcp://*:5556")
    with pytest.raises(ControlError, match="control_token"):
        ControlServer("tcp://0.0.0.0:5556", {}, lambda bundle, camera: None)
    server = ControlServer("inproc://ctl-token-test", {}, lambda bundle, camera: None, token="s3cret")
    try:
        assert server.handle(b'{"cmd": "status"}') == {"ok": False, "error": "wrong or missing token"}
        assert server.handle(b'{"cmd": "status", "token": "s3cret"}') == {"ok": True, "cameras": {}}
    finally:
        server.close()
