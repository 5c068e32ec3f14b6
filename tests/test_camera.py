"""Frame sources against real files written with OpenCV (no mocks of cv2)."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgeinspect.camera import (
    END,
    CaptureDeviceSource,
    Frame,
    FrameSource,
    ImageFolderSource,
    SingleImageSource,
    ThreadedReader,
    VideoFileSource,
    open_source,
)
from edgeinspect.errors import SourceError

N_FRAMES = 12
WIDTH, HEIGHT = 64, 48


def expected_rgb(i: int) -> tuple[int, int, int]:
    """The RGB colour of frame i of the test video: frame 0 is pure red, then red fades into blue."""
    return 255 - 20 * i, 0 if i == 0 else 100, 20 * i


@pytest.fixture
def video(tmp_path: Path) -> Path:
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (WIDTH, HEIGHT))
    assert writer.isOpened()
    for i in range(N_FRAMES):
        r, g, b = expected_rgb(i)
        writer.write(np.full((HEIGHT, WIDTH, 3), (b, g, r), np.uint8))  # OpenCV writes BGR
    writer.release()
    return path


def assert_colour(frame: Frame, i: int) -> None:
    assert frame.image is not None and frame.error is None
    assert frame.image.shape == (HEIGHT, WIDTH, 3) and frame.image.dtype == np.uint8
    mean = frame.image.reshape(-1, 3).mean(axis=0)
    assert np.abs(mean - expected_rgb(i)).max() < 6, (i, mean)


def test_video_file_frames_in_order_and_rgb(video: Path) -> None:
    t0 = time.time()
    with open_source(str(video)) as source:
        assert isinstance(source, VideoFileSource)
        assert source.description == f"video file {video}"
        frames = list(source)
    assert [f.index for f in frames] == list(range(N_FRAMES))
    for i, frame in enumerate(frames):
        assert_colour(frame, i)
        assert frame.name == ""
        assert t0 <= frame.capture_ts <= time.time()
    first = frames[0].image
    assert first[..., 0].min() > 240 and first[..., 2].max() < 15  # written as BGR red, read back as RGB red
    assert source.frames_read == N_FRAMES
    assert source.end_reason == f"end of video file {video} after {N_FRAMES} frames"


def test_video_file_loop_and_max_frames(video: Path) -> None:
    with open_source(str(video), loop=True, max_frames=30) as source:
        frames = list(source)
    assert [f.index for f in frames] == list(range(30))
    for frame in frames:
        assert_colour(frame, frame.index % N_FRAMES)
    assert source.end_reason == "max_frames=30 reached"

    with VideoFileSource(video, max_frames=5) as source:
        assert len(list(source)) == 5
        with pytest.raises(RuntimeError, match="only once"):
            iter(source)


def truncate(video: Path, fraction: float) -> Path:
    data = video.read_bytes()
    cut = video.with_name(f"cut_{fraction}.avi")
    cut.write_bytes(data[: int(len(data) * fraction)])
    return cut


def test_video_cut_in_half(video: Path, caplog: pytest.LogCaptureFixture) -> None:
    cut = truncate(video, 0.5)
    try:
        source = open_source(str(cut))
    except SourceError as exc:  # this OpenCV cannot open an AVI cut in half at all
        assert str(cut) in str(exc)
        return
    with caplog.at_level(logging.WARNING), source:
        frames = list(source)
    assert len(frames) < N_FRAMES
    assert f"fewer than the {N_FRAMES}" in source.end_reason
    assert "truncated" in caplog.text


def test_truncated_video_says_so(video: Path, caplog: pytest.LogCaptureFixture) -> None:
    cut = truncate(video, 0.9)  # the header (announcing 12 frames) survives, the last frames do not
    with caplog.at_level(logging.WARNING), open_source(str(cut)) as source:
        frames = list(source)
    assert 0 < len(frames) < N_FRAMES
    for i, frame in enumerate(frames):
        assert_colour(frame, i)
    assert source.end_reason == (
        f"video file {cut} ended after {len(frames)} frames, fewer than the {N_FRAMES} "
        "its header announces (truncated or corrupt file?)"
    )
    assert source.end_reason in caplog.text


def write_png(path: Path, rgb: tuple[int, int, int]) -> None:
    assert cv2.imwrite(str(path), np.full((8, 10, 3), rgb[::-1], np.uint8))


def test_image_folder_keeps_going_past_a_corrupt_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_png(tmp_path / "a.png", (255, 0, 0))
    (tmp_path / "b.png").write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    write_png(tmp_path / "c.png", (0, 0, 255))
    (tmp_path / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING), open_source(str(tmp_path)) as source:
        assert isinstance(source, ImageFolderSource)
        frames = list(source)
    assert [(f.index, f.name) for f in frames] == [(0, "a.png"), (1, "b.png"), (2, "c.png")]
    assert frames[0].image[0, 0].tolist() == [255, 0, 0] and frames[0].error is None
    assert frames[1].image is None and str(tmp_path / "b.png") in frames[1].error
    assert frames[2].image[0, 0].tolist() == [0, 0, 255] and frames[2].error is None
    assert source.end_reason == "all 3 images read (1 unreadable)"
    assert "b.png" in caplog.text


def test_image_folder_loop(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", (10, 20, 30))
    write_png(tmp_path / "b.png", (40, 50, 60))
    with ImageFolderSource(tmp_path, loop=True, max_frames=5) as source:
        names = [(f.index, f.name) for f in source]
    assert names == [(0, "a.png"), (1, "b.png"), (2, "a.png"), (3, "b.png"), (4, "a.png")]


def test_image_folder_all_corrupt_in_loop_stops(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"garbage")
    with ImageFolderSource(tmp_path, loop=True, max_frames=100) as source:
        frames = list(source)
    assert len(frames) == 1 and frames[0].image is None
    assert source.end_reason == f"none of the 1 images in {tmp_path} could be read"


def test_empty_folder_and_missing_path(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(SourceError, match="no images"):
        open_source(str(tmp_path))
    missing = tmp_path / "nope" / "clip.avi"
    with pytest.raises(SourceError, match="no such file, folder, device or URL") as info:
        open_source(str(missing))
    assert str(missing) in str(info.value)


def test_single_image(tmp_path: Path) -> None:
    path = tmp_path / "part.png"
    write_png(path, (1, 2, 3))
    with open_source(str(path)) as source:
        assert isinstance(source, SingleImageSource)
        frames = list(source)
    assert len(frames) == 1 and frames[0].name == "part.png"
    assert frames[0].image[0, 0].tolist() == [1, 2, 3]
    assert source.end_reason == f"image file {path} read"

    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(SourceError) as info:
        open_source(str(corrupt))
    assert str(corrupt) in str(info.value)


def test_a_missing_device_fails_after_its_reconnect_attempts(caplog: pytest.LogCaptureFixture) -> None:
    source = open_source("97", reconnect_attempts=2, reconnect_delay_s=0.01)  # offline at startup: it may come up
    with caplog.at_level(logging.WARNING), source, pytest.raises(SourceError) as info:
        list(source)
    assert str(info.value) == "cannot open camera 97 (after 2 reconnect attempts)" == source.end_reason
    assert "reconnect attempt 2 failed to open" in caplog.text


def test_unreachable_url_pipeline_and_loop_on_camera(caplog: pytest.LogCaptureFixture) -> None:
    url = "rtsp://user:se!cr@t@127.0.0.1:9/stream"  # '!' and '@' in the password: still a URL, never shown
    pipeline = "rtspsrc location=rtsp://admin:s3cret@127.0.0.1:9/stream ! decodebin ! appsink"
    errors = []
    with caplog.at_level(logging.WARNING):
        for spec in (url, pipeline):
            with open_source(spec, reconnect_attempts=0, timeout_s=2.0) as source, pytest.raises(SourceError) as info:
                list(source)
            errors.append(str(info.value))
    assert errors[0] == "cannot open camera rtsp://user:***@127.0.0.1:9/stream (after 0 reconnect attempts)"
    assert errors[1].startswith("cannot open camera gstreamer pipeline "
                                "'rtspsrc location=rtsp://admin:***@127.0.0.1:9/stream ! decodebin ! appsink'")
    assert "se!cr" not in caplog.text and "s3cret" not in caplog.text
    with pytest.raises(SourceError, match="live camera 0"):
        open_source("0", loop=True)


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Keep the test output clean."""


@pytest.fixture
def http_server(video: Path) -> Iterator[ThreadingHTTPServer]:
    """Serves the test video over HTTP on loopback, standing in for a network camera."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(video.parent)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_stream_reconnects_then_reports_disconnection(
    http_server: ThreadingHTTPServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"http://127.0.0.1:{http_server.server_address[1]}/clip.avi"
    source = CaptureDeviceSource(url, reconnect_attempts=2, reconnect_delay_s=0.01, timeout_s=3.0)
    indices = []
    with caplog.at_level(logging.INFO), source, pytest.raises(SourceError, match="disconnected") as info:
        for frame in source:
            assert_colour(frame, frame.index % N_FRAMES)
            indices.append(frame.index)
            if frame.index == N_FRAMES + 2:  # the stream ended once and was reopened: now it goes away
                http_server.shutdown()
                http_server.server_close()
            assert frame.index < 3 * N_FRAMES, "the stream should have failed by now"
    assert indices == list(range(len(indices))) and len(indices) >= N_FRAMES + 3
    assert str(info.value).startswith(f"camera {url} disconnected: no frame after 2 reconnect attempts")
    assert source.end_reason == str(info.value)
    assert "reopened on attempt 1" in caplog.text and source.reconnects == 1
    assert "reconnect attempt 2 failed to open" in caplog.text


def test_a_stream_url_with_an_exclamation_mark_in_its_password(http_server: ThreadingHTTPServer) -> None:
    port = http_server.server_address[1]
    with CaptureDeviceSource(f"http://cam:pa!ss@127.0.0.1:{port}/clip.avi", max_frames=3, reconnect_attempts=0,
                             timeout_s=3.0) as source:  # FFmpeg reads it: not taken for a GStreamer pipeline
        assert source.description == f"camera http://cam:***@127.0.0.1:{port}/clip.avi"
        for frame in source:
            assert_colour(frame, frame.index)
    assert source.frames_read == 3


def test_a_camera_offline_at_startup_is_served_once_it_comes_up(http_server: ThreadingHTTPServer, video: Path) -> None:
    url = f"http://127.0.0.1:{http_server.server_address[1]}/later/clip.avi"
    source = CaptureDeviceSource(url, max_frames=3, reconnect_attempts=3, reconnect_delay_s=0.01, timeout_s=3.0)
    (video.parent / "later").mkdir()  # the camera comes up after the daemon started
    shutil.copy(video, video.parent / "later" / "clip.avi")
    with source:
        for frame in source:
            assert_colour(frame, frame.index)
    assert source.frames_read == 3 and source.reconnects == 1


class PacedLiveSource(FrameSource):
    """A live source that produces numbered frames every ``period_s`` whether or not anyone reads them."""

    live = True

    def __init__(self, n: int, period_s: float) -> None:
        super().__init__("paced test camera")
        self.n, self.period_s = n, period_s

    def _items(self) -> Iterator[tuple]:
        for i in range(self.n):
            time.sleep(self.period_s)
            yield np.full((8, 8, 3), i % 256, np.uint8), f"{i}", None, ()
        self.end_reason = "end of test camera"

    def _release(self) -> None:
        pass


@pytest.mark.parametrize("live", [True, False])
def test_a_slow_consumer_gets_the_newest_live_frame_and_every_recorded_one(live: bool) -> None:
    source = PacedLiveSource(60, 0.002)
    source.live = live  # the same frames, once as a camera and once as a recording
    reader = ThreadedReader(source).start()
    received = []
    try:
        while (item := reader.get(timeout=10.0)) is not END:
            assert isinstance(item, Frame)
            received.append(item.index)
            time.sleep(0.02)  # a slow engine: ten frames arrive while it judges one
    finally:
        reader.stop()
    assert received == sorted(set(received)) and received[-1] == 59  # in order, and the newest at the end
    assert len(received) + reader.dropped_stale == 60  # every frame either judged or counted as stale
    if live:
        assert reader.dropped_stale >= 30 and len(received) <= 30
    else:
        assert received == list(range(60)) and reader.dropped_stale == 0
