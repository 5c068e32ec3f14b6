"""The daemon end to end: real video and folder sources, a real SUB socket on loopback."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq
from conftest import SYNTH_CATEGORY, free_tcp_endpoint

from edgeinspect.camera import FrameSource
from edgeinspect.errors import SourceError
from edgeinspect.imageio import read_image
from edgeinspect.runtime.daemon import serve
from edgeinspect.runtime.predictor import Predictor
from edgeinspect.runtime.publisher import Heartbeat, VerdictPublisher, decode_message
from edgeinspect.train.data import write_video


@pytest.fixture(scope="module")
def test_video(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    frames = sorted((synth_root / SYNTH_CATEGORY / "test").glob("*/*.png"))
    return write_video(frames, tmp_path_factory.mktemp("video") / "line.avi", fps=25)


def _subscriber(endpoint: str) -> zmq.Socket:
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.connect(endpoint)
    sub.setsockopt_string(zmq.SUBSCRIBE, "verdict.L7.camA")
    sub.setsockopt_string(zmq.SUBSCRIBE, "status.L7.camA")
    return sub


def _collect(sub: zmq.Socket, deadline_s: float = 120.0) -> tuple[list[dict], list[dict]]:
    """Verdicts and status messages until the daemon's final status."""
    verdicts, statuses = [], []
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if not sub.poll(5000):
            continue
        topic, payload = decode_message(sub.recv_multipart())
        if topic.startswith("verdict."):
            verdicts.append(payload)
        else:
            statuses.append(payload)
            if payload["state"] in ("stopped", "failed"):
                break
    return verdicts, statuses


def _serve(bundle: Path, camera: Path, endpoint: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgeinspect", "-q", "serve", "--bundle", str(bundle),
                             "--camera", str(camera), "--publish", endpoint, "--line", "L7", "--camera-id", "camA",
                             "--wait-subscribers", "1", *extra], stderr=subprocess.PIPE, text=True)


def _serve_to_end(bundle: Path, camera: Path, *extra: str) -> tuple[list[dict], list[dict]]:
    """Serve a finite source to a fresh subscriber; the daemon must exit 0."""
    endpoint = free_tcp_endpoint()
    sub = _subscriber(endpoint)
    proc = _serve(bundle, camera, endpoint, *extra)
    try:
        return _collect(sub)
    finally:
        sub.close(linger=0)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()


def test_every_frame_of_a_video_gets_a_verdict(patchcore_bundle: Path, test_video: Path) -> None:
    verdicts, statuses = _serve_to_end(patchcore_bundle, test_video)
    n_frames = int(cv2.VideoCapture(str(test_video)).get(cv2.CAP_PROP_FRAME_COUNT))
    assert [v["seq"] for v in verdicts] == list(range(n_frames))
    assert [v["frame_index"] for v in verdicts] == list(range(n_frames))
    manifest = json.loads((patchcore_bundle / "manifest.json").read_text())
    for v in verdicts:
        assert v["schema"] == 1 and v["line"] == "L7" and v["camera"] == "camA"
        assert v["bundle_id"] == manifest["bundle_id"] and v["verdict"] in ("OK", "NOK")
        assert v["engine"] == "onnx:fp32"  # --engine auto: the only engine of this bundle
        assert v["capture_ts"] <= v["publish_ts"] and v["threshold"] == 0.5
        assert {"preprocess", "inference", "postprocess", "total"} <= set(v["latency_ms"])
    # the lossless video gives the same verdicts as the PNG files it was made from
    assert sum(v["verdict"] == "NOK" for v in verdicts) >= 0.5 * n_frames
    final = statuses[-1]
    assert final["state"] == "stopped" and final["frames"] == n_frames
    assert "end of video" in final["end_reason"]
    heartbeat = statuses[0]  # the first heartbeat goes out at once
    assert heartbeat["state"] == "running" and heartbeat["kind"] == "status" and heartbeat["fps"] >= 0
    assert final["ok"] + final["nok"] == n_frames and final["errors"] == 0


def test_sigterm_stops_cleanly_after_publishing_every_processed_frame(patchcore_bundle: Path,
                                                                      test_video: Path) -> None:
    endpoint = free_tcp_endpoint()
    sub = _subscriber(endpoint)
    proc = _serve(patchcore_bundle, test_video, endpoint, "--loop")
    try:
        before = []
        while len(before) < 10:  # let it run a little, then stop it like systemd would
            assert sub.poll(60_000), "no verdict within 60 s"
            topic, payload = decode_message(sub.recv_multipart())
            if topic.startswith("verdict."):
                before.append(payload)
        proc.send_signal(signal.SIGTERM)
        after, statuses = _collect(sub)
    finally:
        sub.close(linger=0)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    final = statuses[-1]
    assert final["state"] == "stopped" and final["end_reason"] == "stopped by signal"
    verdicts = before + after
    assert [v["seq"] for v in verdicts] == list(range(final["frames"]))  # nothing processed went unpublished


def test_corrupt_image_in_a_folder_is_reported_and_the_rest_served(patchcore_bundle: Path, synth_root: Path,
                                                                   tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, src in enumerate(sorted((synth_root / SYNTH_CATEGORY / "test" / "good").glob("*.png"))[:3]):
        (folder / f"{2 * i:02d}.png").write_bytes(src.read_bytes())
    (folder / "01.png").write_bytes(np.random.default_rng(0).bytes(300))
    verdicts, statuses = _serve_to_end(patchcore_bundle, folder)
    assert [v["frame_name"] for v in verdicts] == ["00.png", "01.png", "02.png", "04.png"]
    assert verdicts[1]["verdict"] == "ERROR" and "01.png" in verdicts[1]["error"]
    assert all(v["verdict"] in ("OK", "NOK") for i, v in enumerate(verdicts) if i != 1)
    assert statuses[-1]["errors"] == 1


def test_missing_source_fails_with_a_clear_message(patchcore_bundle: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "edgeinspect", "-q", "serve", "--bundle", str(patchcore_bundle),
                           "--camera", str(tmp_path / "nope.avi"), "--publish", free_tcp_endpoint()],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "nope.avi" in proc.stderr


class _PacedSource(FrameSource):
    """A camera stand-in that waits before each frame, like a triggered camera on a stopped line,
    and can fail after its frames like a camera that stays disconnected."""

    def __init__(self, image: np.ndarray, delays: list[float], fail_with: str | None = None) -> None:
        super().__init__("paced test camera")
        self.image, self.delays, self.fail_with = image, delays, fail_with

    def _items(self):
        for delay in self.delays:
            time.sleep(delay)
            yield self.image, "", None, ()
        if self.fail_with:
            raise SourceError(self.fail_with)
        self.end_reason = "paced source done"

    def _release(self) -> None:
        pass


def _serve_in_process(bundle: Path, synth_root: Path, delays: list[float],
                      fail_with: str | None = None) -> tuple[list[tuple[str, dict]], Exception | None]:
    image = read_image(sorted((synth_root / SYNTH_CATEGORY / "test" / "good").glob("*.png"))[0])
    endpoint = free_tcp_endpoint()
    error = None
    with VerdictPublisher(endpoint, "L7", "camA") as publisher:
        sub = _subscriber(endpoint)
        assert publisher.wait_for_subscribers(1, timeout_s=10) == 1
        try:
            serve(Predictor(bundle), _PacedSource(image, delays, fail_with), publisher,
                  heartbeat=Heartbeat(period_s=0.2))
        except SourceError as exc:
            error = exc
    messages = []
    while sub.poll(2000):
        messages.append(decode_message(sub.recv_multipart()))
    sub.close(linger=0)
    return messages, error


def test_heartbeats_keep_coming_while_the_camera_is_silent(patchcore_bundle: Path, synth_root: Path) -> None:
    messages, error = _serve_in_process(patchcore_bundle, synth_root, delays=[0.0, 1.5])
    assert error is None
    topics = [topic.split(".")[0] for topic, _ in messages]
    first, second = [i for i, t in enumerate(topics) if t == "verdict"]
    beats_between = [p for (t, p) in messages[first + 1:second] if t.startswith("status.")]
    assert len(beats_between) >= 4  # 1.5 s of silence, 0.2 s period
    assert all(p["state"] == "running" and p["frames"] == 1 for p in beats_between)
    assert messages[-1][1]["state"] == "stopped" and messages[-1][1]["end_reason"] == "paced source done"


def test_a_failing_camera_is_published_and_raised(patchcore_bundle: Path, synth_root: Path) -> None:
    messages, error = _serve_in_process(patchcore_bundle, synth_root, delays=[0.0],
                                        fail_with="camera 0 disconnected: no frame after 5 reconnect attempts")
    assert isinstance(error, SourceError)
    verdicts = [p for t, p in messages if t.startswith("verdict.")]
    final = messages[-1][1]
    assert len(verdicts) == 1 and final["state"] == "failed" and "disconnected" in final["error"]
    assert final["frames"] == 1


def test_json_logs_for_log_collectors(patchcore_bundle: Path, synth_root: Path, tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    src = sorted((synth_root / SYNTH_CATEGORY / "test" / "good").glob("*.png"))[0]
    (folder / "0.png").write_bytes(src.read_bytes())
    proc = subprocess.run([sys.executable, "-m", "edgeinspect", "--log-format", "json", "serve", "--bundle",
                           str(patchcore_bundle), "--camera", str(folder), "--publish", free_tcp_endpoint()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert records and all({"ts", "level", "logger", "message"} <= set(r) for r in records)
    assert any(r["logger"] == "edgeinspect.runtime.backends" and "selected by --engine" in r["message"]
               for r in records)
    assert proc.stderr.splitlines()[-1].startswith("cam0: served 1 frames")  # the summary stays a plain line
