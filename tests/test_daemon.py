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

from edgeinspect.runtime.publisher import decode_message
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


def _serve_to_end(bundle: Path, camera: Path) -> tuple[list[dict], list[dict]]:
    """Serve a finite source to a fresh subscriber; the daemon must exit 0."""
    endpoint = free_tcp_endpoint()
    sub = _subscriber(endpoint)
    proc = _serve(bundle, camera, endpoint)
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
        assert v["capture_ts"] <= v["publish_ts"] and v["threshold"] == 0.5
        assert {"preprocess", "inference", "postprocess", "total"} <= set(v["latency_ms"])
    # the lossless video gives the same verdicts as the PNG files it was made from
    assert sum(v["verdict"] == "NOK" for v in verdicts) >= 0.5 * n_frames
    final = statuses[-1]
    assert final["state"] == "stopped" and final["frames"] == n_frames
    assert "end of video" in final["end_reason"]
    heartbeat = statuses[0]  # the first heartbeat goes out after the first frame
    assert heartbeat["state"] == "running" and heartbeat["kind"] == "status" and heartbeat["fps"] >= 0
    assert final["ok"] + final["nok"] == n_frames and final["errors"] == 0


def test_sigterm_stops_cleanly_after_publishing_every_processed_frame(patchcore_bundle: Path,
                                                                      test_video: Path) -> None:
    endpoint = free_tcp_endpoint()
    sub = _subscriber(endpoint)
    proc = _serve(patchcore_bundle, test_video, endpoint, "--loop")
    try:
        seen = 0
        while seen < 10:  # let it run a little, then stop it like systemd would
            assert sub.poll(60_000), "no verdict within 60 s"
            topic, _ = decode_message(sub.recv_multipart())
            seen += topic.startswith("verdict.")
        proc.send_signal(signal.SIGTERM)
        verdicts, statuses = _collect(sub)
    finally:
        sub.close(linger=0)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    final = statuses[-1]
    assert final["state"] == "stopped" and final["end_reason"] == "stopped by signal"
    assert verdicts[-1]["seq"] == final["frames"] - 1  # nothing processed went unpublished


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
