"""The daemon end to end: real video and folder sources, a real SUB socket on loopback."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq
from conftest import SYNTH_CATEGORY, free_tcp_endpoint

from edgeinspect.camera import FrameSource, open_source
from edgeinspect.errors import SourceError
from edgeinspect.imageio import read_image
from edgeinspect.runtime.daemon import run_line, serve
from edgeinspect.runtime.journal import VerdictJournal, journal_files, read_journal
from edgeinspect.runtime.line import line_config
from edgeinspect.runtime.predictor import Predictor
from edgeinspect.runtime.publisher import Heartbeat, VerdictPublisher, decode_message
from edgeinspect.train.data import write_video


@pytest.fixture(scope="module")
def test_video(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    frames = sorted((synth_root / SYNTH_CATEGORY / "test").glob("*/*.png"))
    return write_video(frames, tmp_path_factory.mktemp("video") / "line.avi", fps=25)


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width`` x ``height`` pixels (OpenCV refuses to decode a huge one)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


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
    (folder / "03.png").write_bytes(png_claiming(200_000, 200_000))
    verdicts, statuses = _serve_to_end(patchcore_bundle, folder)
    assert [v["frame_name"] for v in verdicts] == ["00.png", "01.png", "02.png", "03.png", "04.png"]
    assert verdicts[1]["verdict"] == "ERROR" and "01.png" in verdicts[1]["error"]
    assert verdicts[3]["verdict"] == "ERROR" and re.search(r"cannot decode image \(OpenCV refused it: .*03\.png$",
                                                           verdicts[3]["error"])
    assert all(v["verdict"] in ("OK", "NOK") for i, v in enumerate(verdicts) if i not in (1, 3))
    assert statuses[-1]["errors"] == 2


def test_missing_source_fails_with_a_clear_message(patchcore_bundle: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "edgeinspect", "-q", "serve", "--bundle", str(patchcore_bundle),
                           "--camera", str(tmp_path / "nope.avi"), "--publish", free_tcp_endpoint()],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "nope.avi" in proc.stderr


class _PacedSource(FrameSource):
    """A camera stand-in that waits before each frame, like a triggered camera on a stopped line,
    and can fail after its frames like a camera that stays disconnected, or stay silent after them
    until ``until()`` holds (its end reason says when it gave up after 30 s)."""

    def __init__(self, image: np.ndarray, delays: list[float], fail_with: str | None = None,
                 until: Callable[[], bool] | None = None) -> None:
        super().__init__("paced test camera")
        self.image, self.delays, self.fail_with, self.until = image, delays, fail_with, until

    def _items(self):
        for delay in self.delays:
            time.sleep(delay)
            yield self.image, "", None, ()
        if self.fail_with:
            raise SourceError(self.fail_with)
        deadline = time.monotonic() + 30.0
        while self.until is not None and not self.until():
            if time.monotonic() > deadline:
                self.end_reason = "gave up waiting"
                return
            time.sleep(0.01)
        self.end_reason = "paced source done"

    def _release(self) -> None:
        pass


def _good_image(synth_root: Path) -> np.ndarray:
    return read_image(sorted((synth_root / SYNTH_CATEGORY / "test" / "good").glob("*.png"))[0])


def _serve_in_process(predictor: Predictor, source: FrameSource, journal: VerdictJournal | None = None
                      ) -> tuple[list[tuple[str, dict]], Exception | None]:
    endpoint = free_tcp_endpoint()
    error = None
    with VerdictPublisher(endpoint, "L7", "camA", journal=journal) as publisher:
        sub = _subscriber(endpoint)
        assert publisher.wait_for_subscribers(1, timeout_s=10) == 1
        try:
            serve(predictor, source, publisher, heartbeat=Heartbeat(period_s=0.2))
        except SourceError as exc:
            error = exc
    messages = []
    while sub.poll(2000):
        messages.append(decode_message(sub.recv_multipart()))
    sub.close(linger=0)
    return messages, error


def test_heartbeats_keep_coming_while_the_camera_is_silent(patchcore_bundle: Path, synth_root: Path) -> None:
    messages, error = _serve_in_process(Predictor(patchcore_bundle), _PacedSource(_good_image(synth_root), [0.0, 1.5]))
    assert error is None
    topics = [topic.split(".")[0] for topic, _ in messages]
    first, second = [i for i, t in enumerate(topics) if t == "verdict"]
    beats_between = [p for (t, p) in messages[first + 1:second] if t.startswith("status.")]
    assert len(beats_between) >= 4  # 1.5 s of silence, 0.2 s period
    assert all(p["state"] == "running" and p["frames"] == 1 for p in beats_between)
    assert messages[-1][1]["state"] == "stopped" and messages[-1][1]["end_reason"] == "paced source done"


def test_a_failing_camera_is_published_and_raised(patchcore_bundle: Path, synth_root: Path) -> None:
    source = _PacedSource(_good_image(synth_root), [0.0],
                          fail_with="camera 0 disconnected: no frame after 5 reconnect attempts")
    messages, error = _serve_in_process(Predictor(patchcore_bundle), source)
    assert isinstance(error, SourceError)
    verdicts = [p for t, p in messages if t.startswith("verdict.")]
    final = messages[-1][1]
    assert len(verdicts) == 1 and final["state"] == "failed" and "disconnected" in final["error"]
    assert final["frames"] == 1


class _OverflowingEngine:
    """An engine whose outputs overflow (an FP16 engine on parts far from its calibration): NaN everywhere."""

    def __init__(self, engine: object) -> None:
        self.engine = engine

    def run(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(output * np.nan for output in self.engine.run(x))


def test_a_non_finite_engine_output_is_an_error_verdict(patchcore_bundle: Path, synth_root: Path) -> None:
    predictor = Predictor(patchcore_bundle)
    predictor.backend = _OverflowingEngine(predictor.backend)
    messages, error = _serve_in_process(predictor, _PacedSource(_good_image(synth_root), [0.0, 0.0]))
    verdicts = [p for t, p in messages if t.startswith("verdict.")]
    assert error is None and [v["verdict"] for v in verdicts] == ["ERROR", "ERROR"]
    assert all("non-finite anomaly score (NaN or infinity)" in v["error"] for v in verdicts)
    assert messages[-1][1]["state"] == "stopped" and messages[-1][1]["errors"] == 2


def test_file_names_that_are_not_utf8_are_published_and_journalled(patchcore_bundle: Path, synth_root: Path,
                                                                    tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    good = sorted((synth_root / SYNTH_CATEGORY / "test" / "good").glob("*.png"))[0]
    (folder / os.fsdecode(b"a\xe9.png")).write_bytes(good.read_bytes())  # Latin-1 names on a UTF-8 system
    (folder / os.fsdecode(b"b\xff.png")).write_bytes(b"not an image")
    journal = VerdictJournal(tmp_path / "journal")
    with open_source(str(folder)) as source:
        messages, error = _serve_in_process(Predictor(patchcore_bundle), source, journal)
    journal.close()
    verdicts = [p for t, p in messages if t.startswith("verdict.")]
    assert error is None and [v["frame_name"] for v in verdicts] == ["a\\udce9.png", "b\\udcff.png"]  # as predict
    assert verdicts[0]["verdict"] in ("OK", "NOK") and verdicts[1]["verdict"] == "ERROR"
    assert verdicts[1]["error"].endswith("b\\udcff.png") and messages[-1][1]["state"] == "stopped"
    assert list(read_journal(tmp_path / "journal")) == verdicts


def test_heartbeats_fsync_the_last_records_of_a_burst(patchcore_bundle: Path, synth_root: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    predictor = Predictor(patchcore_bundle)
    journal = VerdictJournal(tmp_path / "journal", fsync_interval_s=2.0)  # a burst of three, then silence
    synced: list[int] = []  # the journal file's size at each fsync
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_size), fsync(fd))[1])
    source = _PacedSource(_good_image(synth_root), [0.0, 0.0, 0.0], until=lambda: bool(synced))
    messages, error = _serve_in_process(predictor, source, journal)
    journal.close()
    (path,) = journal_files(tmp_path / "journal")
    assert error is None and messages[-1][1]["end_reason"] == "paced source done"  # synced while silent
    assert synced[0] == path.stat().st_size  # all three records
    assert [r["seq"] for r in read_journal(tmp_path / "journal")] == [0, 1, 2]


def test_an_unexpected_error_fails_its_camera_loudly_and_the_others_go_on(
        patchcore_bundle: Path, synth_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, src in enumerate(sorted((synth_root / SYNTH_CATEGORY / "test" / "good").glob("*.png"))[:3]):
        (folder / f"{i}.png").write_bytes(src.read_bytes())
    endpoint = free_tcp_endpoint()
    config = line_config({"line": "L7", "publish": endpoint, "wait_subscribers": 1, "cameras": [
        {"id": "camA", "source": str(folder), "bundle": str(patchcore_bundle)},
        {"id": "camB", "source": str(folder), "bundle": str(patchcore_bundle)}]})

    def on_verdict(payload: dict) -> None:
        if payload["camera"] == "camB":
            raise RuntimeError("a bug in the verdict hook")

    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.connect(endpoint)
    sub.setsockopt_string(zmq.SUBSCRIBE, "")
    with ThreadPoolExecutor(1) as pool, caplog.at_level(logging.ERROR):  # not the main thread: no signal handlers
        line = pool.submit(run_line, config, on_verdict=on_verdict)
        with pytest.raises(SourceError, match="^camera camB: RuntimeError: a bug in the verdict hook$"):
            line.result(timeout=300)
    final = {}
    while sub.poll(2000):
        topic, payload = decode_message(sub.recv_multipart())
        if topic.startswith("status."):
            final[payload["camera"]] = payload
    sub.close(linger=0)
    assert final["camA"]["state"] == "stopped" and final["camA"]["frames"] == 3
    assert final["camB"]["state"] == "failed" and final["camB"]["error"] == "RuntimeError: a bug in the verdict hook"
    assert any(r.exc_info and "camera camB" in r.getMessage() for r in caplog.records)  # with its traceback


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
