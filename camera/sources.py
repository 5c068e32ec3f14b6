"""Frame sources: video files, image folders, single images and live cameras, all yielding RGB frames.

Every source is an iterable of :class:`Frame` and a context manager. Iteration stops at the natural end
of the source (``end_reason`` says why) or raises :class:`~edgeinspect.errors.SourceError` when the
source fails: a live camera that stays disconnected after its reconnect attempts is never silent.
"""

from __future__ import annotations

import logging
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from edgeinspect.errors import DataError, FrameError, SourceError
from edgeinspect.frames import FrameCheck
from edgeinspect.imageio import IMAGE_SUFFIXES, list_images, read_raw

if TYPE_CHECKING:
    from typing import Self  # only for type checkers: typing.Self is Python 3.11+, the runtime supports 3.10

logger = logging.getLogger(__name__)

MAX_RECONNECT_DELAY_S = 10.0
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # a URL starts with its scheme (a pipeline with an element)
# user:password@ in the authority of any URL in a text (a password may hold ':', '@' or '!' as FFmpeg reads it)
_CREDENTIALS = re.compile(r"(?P<start>[A-Za-z][A-Za-z0-9+.-]*://[^/?#@:\s]*):[^/?#\s]*@")

# (image or None, name, error, conversions) as produced by a source before it is stamped into a Frame.
_Item = tuple[np.ndarray | None, str, str | None, tuple[str, ...]]


@dataclass
class Frame:
    """One frame of a source; ``image`` is None (and ``error`` says why) when it could not be decoded."""

    index: int
    image: np.ndarray | None
    capture_ts: float
    name: str = ""
    error: str | None = None
    conversions: tuple[str, ...] = ()  # what was done to the decoded frame to make it RGB uint8


class FrameSource(ABC):
    """An iterable of :class:`Frame` (iterated once) and a context manager; ``close()`` is idempotent.

    ``live`` sources (cameras, streams) deliver frames whether or not they are read: the daemon judges
    the newest and drops stale ones (:class:`ThreadedReader`); recorded ones (files, folders) lose no frame.
    """

    live: bool = False

    def __init__(self, description: str, *, max_frames: int | None = None, check: FrameCheck | None = None) -> None:
        if max_frames is not None and max_frames < 0:
            raise ValueError(f"max_frames must be >= 0, got {max_frames}")
        # at most this many frames a second (a live source skips the pictures in between, a recorded
        # one is paced); None: as fast as they come
        self.fps: float | None = None
        self.description = description
        self.check = check or FrameCheck(None, min_side=1)  # without a bundle: any image, made RGB
        self.max_frames = max_frames
        self.end_reason: str | None = None
        self.frames_read = 0
        self.reconnects = 0  # successful reopenings of a live source after a failed read
        self._closed = False
        self._iterated = False

    def _checked(self, raw: np.ndarray, name: str) -> _Item:
        """A decoded frame through the frame check: RGB and conversions, or None and the reason."""
        try:
            rgb, notes = self.check(raw)
        except FrameError as exc:
            logger.warning("%s: %s%s", self.description, f"{name}: " if name else "", exc)
            return None, name, str(exc), ()
        return rgb, name, None, tuple(notes)

    @abstractmethod
    def _items(self) -> Iterator[_Item]:
        """Yield (image, name, error) until the source ends (setting ``end_reason``) or fails (raising)."""

    @abstractmethod
    def _release(self) -> None:
        """Free the underlying capture or file handles."""

    def __iter__(self) -> Iterator[Frame]:
        if self._closed:
            raise RuntimeError(f"{self.description} is closed")
        if self._iterated:
            raise RuntimeError(f"{self.description} can be iterated only once; open a new source")
        self._iterated = True
        return self._frames()

    def _frames(self) -> Iterator[Frame]:
        if self.max_frames == 0:
            self.end_reason = "max_frames=0 reached"
            return
        period = 1.0 / self.fps if self.fps else 0.0
        next_due = time.monotonic()
        try:
            for image, name, error, conversions in self._items():
                if period:
                    now = time.monotonic()
                    if now < next_due:
                        if self.live:
                            continue  # the camera runs faster than the cap: skip this picture
                        time.sleep(next_due - now)
                    next_due = max(next_due + period, time.monotonic())
                frame = Frame(self.frames_read, image, time.time(), name, error, conversions)
                self.frames_read += 1
                yield frame
                if self.max_frames is not None and self.frames_read >= self.max_frames:
                    self.end_reason = f"max_frames={self.max_frames} reached"
                    return
        except SourceError as exc:
            self.end_reason = str(exc)
            raise

    def close(self) -> None:
        """Release the source; further calls do nothing."""
        if self._closed:
            return
        self._closed = True
        if self.end_reason is None:
            self.end_reason = "closed"
        self._release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}>"


class VideoFileSource(FrameSource):
    """Frames of a video file (RGB); with ``loop`` it restarts at the end and indices keep increasing."""

    def __init__(self, path: str | Path, *, loop: bool = False, max_frames: int | None = None,
                 check: FrameCheck | None = None) -> None:
        self.path = Path(path)
        super().__init__(f"video file {self.path}", max_frames=max_frames, check=check)
        self.loop = loop
        self._capture = self._open()
        count = self._capture.get(cv2.CAP_PROP_FRAME_COUNT)
        self.expected_frames = int(count) if count > 0 else None
        self._warned_truncated = False

    def _open(self) -> cv2.VideoCapture:
        if not self.path.is_file():
            raise SourceError(f"video file not found: {self.path}")
        capture = cv2.VideoCapture(str(self.path))
        if not capture.isOpened():
            capture.release()
            raise SourceError(f"cannot open video file (corrupt or unsupported format): {self.path}")
        return capture

    def _items(self) -> Iterator[_Item]:
        while True:
            in_pass = 0
            while not self._closed:
                ok, image = self._capture.read()
                if not ok or image is None:
                    break
                in_pass += 1
                yield self._checked(image, "")
            if self._closed:
                return
            if self.expected_frames is not None and in_pass < self.expected_frames:
                reason = (
                    f"{self.description} ended after {in_pass} frames, fewer than the "
                    f"{self.expected_frames} its header announces (truncated or corrupt file?)"
                )
                if not self._warned_truncated:
                    logger.warning(reason)
                    self._warned_truncated = True
            else:
                reason = f"end of {self.description} after {in_pass} frames"
            if not self.loop or in_pass == 0:
                self.end_reason = reason
                return
            self._capture.release()
            self._capture = self._open()

    def _release(self) -> None:
        self._capture.release()


class ImageFolderSource(FrameSource):
    """The images of a folder sorted by name; an unreadable image yields a frame with ``image=None``."""

    def __init__(self, folder: str | Path, *, loop: bool = False, max_frames: int | None = None,
                 check: FrameCheck | None = None) -> None:
        self.folder = Path(folder)
        super().__init__(f"image folder {self.folder}", max_frames=max_frames, check=check)
        self.loop = loop
        if not self.folder.is_dir():
            raise SourceError(f"image folder not found: {self.folder}")
        self.paths = list_images(self.folder)
        if not self.paths:
            raise SourceError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {self.folder}")

    def _items(self) -> Iterator[_Item]:
        while True:
            decoded = 0
            for path in self.paths:
                if self._closed:
                    return
                try:
                    raw = read_raw(path)
                except DataError as exc:
                    logger.warning("%s: %s", self.description, exc)
                    yield None, path.name, str(exc), ()
                    continue
                decoded += 1
                yield self._checked(raw, path.name)
            failed = len(self.paths) - decoded
            if decoded == 0:
                self.end_reason = f"none of the {len(self.paths)} images in {self.folder} could be read"
                return
            if not self.loop:
                unreadable = f" ({failed} unreadable)" if failed else ""
                self.end_reason = f"all {len(self.paths)} images read{unreadable}"
                return

    def _release(self) -> None:
        """Nothing to release: each image is read and closed on its own."""


class SingleImageSource(FrameSource):
    """One image file as one frame (repeated forever with ``loop``)."""

    def __init__(self, path: str | Path, *, loop: bool = False, max_frames: int | None = None,
                 check: FrameCheck | None = None) -> None:
        self.path = Path(path)
        super().__init__(f"image file {self.path}", max_frames=max_frames, check=check)
        self.loop = loop
        try:
            self._item = self._checked(read_raw(self.path), self.path.name)
        except DataError as exc:
            raise SourceError(str(exc)) from exc

    def _items(self) -> Iterator[_Item]:
        image, name, error, conversions = self._item
        while True:
            yield (None if image is None else image.copy()), name, error, conversions
            if not self.loop or self._closed:
                break
        if not self._closed:
            self.end_reason = f"{self.description} read"

    def _release(self) -> None:
        """Nothing to release: the image was read at open."""


class CaptureDeviceSource(FrameSource):
    """A live camera: an OpenCV device index, a stream URL or a GStreamer pipeline (a string with '!' that
    is not a URL).

    A camera that cannot be opened, or a failed read, triggers up to ``reconnect_attempts`` reconnects
    (release and reopen) after a delay starting at ``reconnect_delay_s`` and doubling up to 10 s; when all
    fail, iteration raises :class:`SourceError` (so a camera that is offline when the daemon starts fails
    on its own, after its attempts, while the line's other cameras go on). ``timeout_s`` bounds opening
    and reading a URL stream.
    """

    live = True

    def __init__(
        self,
        device: int | str,
        *,
        max_frames: int | None = None,
        reconnect_attempts: int = 5,
        reconnect_delay_s: float = 1.0,
        timeout_s: float = 10.0,
        check: FrameCheck | None = None,
    ) -> None:
        if reconnect_attempts < 0:
            raise ValueError(f"reconnect_attempts must be >= 0, got {reconnect_attempts}")
        self.device = device
        super().__init__(f"camera {_describe_device(device)}", max_frames=max_frames, check=check)
        self.reconnect_attempts = reconnect_attempts
        self.reconnect_delay_s = reconnect_delay_s
        self.timeout_s = timeout_s
        self._capture: cv2.VideoCapture | None = self._open()
        self._opened = self._capture is not None  # once: a later failure is a disconnection
        if not self._opened:
            logger.warning("cannot open %s%s; %d reconnect attempts follow", self.description, _open_hint(device),
                           reconnect_attempts)

    def _open(self) -> cv2.VideoCapture | None:
        device = self.device
        if isinstance(device, int):
            capture = cv2.VideoCapture(device)
        elif _is_pipeline(device):
            capture = cv2.VideoCapture(device, cv2.CAP_GSTREAMER)
        else:
            timeout_ms = max(1, int(self.timeout_s * 1000))
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms]
            capture = cv2.VideoCapture(device, cv2.CAP_FFMPEG, params)
        if capture.isOpened():
            return capture
        capture.release()
        return None

    def _items(self) -> Iterator[_Item]:
        failures = 0
        while not self._closed:
            ok, image = self._capture.read() if self._capture is not None else (False, None)
            if ok and image is not None:
                failures = 0
                yield self._checked(image, "")
                continue
            if self._closed:
                return
            if failures >= self.reconnect_attempts:
                if not self._opened:
                    raise SourceError(f"cannot open {self.description}{_open_hint(self.device)} "
                                      f"(after {self.reconnect_attempts} reconnect attempts)")
                raise SourceError(
                    f"{self.description} disconnected: no frame after {self.reconnect_attempts} "
                    f"reconnect attempts ({self.frames_read} frames read before)"
                )
            failures += 1
            delay = min(self.reconnect_delay_s * 2 ** (failures - 1), MAX_RECONNECT_DELAY_S)
            logger.warning(
                "%s: %s, reconnecting in %.2f s (attempt %d of %d)", self.description,
                "read failed" if self._capture is not None else "not open", delay, failures, self.reconnect_attempts,
            )
            time.sleep(delay)
            self._release()
            self._capture = self._open()
            if self._capture is None:
                logger.warning("%s: reconnect attempt %d failed to open", self.description, failures)
            else:
                self.reconnects += 1
                self._opened = True
                logger.info("%s: reopened on attempt %d", self.description, failures)

    def _release(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None


def _redact(text: str) -> str:
    """``text`` (a URL, or a pipeline holding URLs) with every URL password replaced by ***, so that
    descriptions, logs, statuses and errors do not leak it."""
    return _CREDENTIALS.sub(r"\g<start>:***@", text)


def _is_pipeline(device: int | str) -> bool:
    """A GStreamer pipeline: a string with '!' (between its elements) that is not a URL (a password's '!')."""
    return isinstance(device, str) and "!" in device and not _URL.match(device)


def _describe_device(device: int | str) -> str:
    if isinstance(device, int):
        return str(device)
    if _is_pipeline(device):
        return f"gstreamer pipeline '{_redact(device)}'"
    return _redact(device)


def _open_hint(device: int | str) -> str:
    if _is_pipeline(device) and not _opencv_has_gstreamer():
        return " (this OpenCV build has no GStreamer support)"
    return ""


def _opencv_has_gstreamer() -> bool:
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return "YES" in line
    return False


def open_source(
    spec: str,
    *,
    loop: bool = False,
    max_frames: int | None = None,
    reconnect_attempts: int = 5,
    reconnect_delay_s: float = 1.0,
    timeout_s: float = 10.0,
    check: FrameCheck | None = None,
    fps: float | None = None,
) -> FrameSource:
    """Open a folder, image file, video file, device index, stream URL or GStreamer pipeline.

    ``loop`` applies to files and folders; the reconnect and timeout options to live cameras;
    ``check`` (the bundle's frame limits) turns each decoded frame into RGB or refuses it; ``fps``
    caps the frame rate (see :class:`FrameSource`).
    """
    if fps is not None and not fps > 0:
        raise SourceError(f"fps must be > 0, got {fps}")
    source = _open(spec, loop, max_frames, reconnect_attempts, reconnect_delay_s, timeout_s, check)
    source.fps = fps
    return source


def _open(spec: str, loop: bool, max_frames: int | None, reconnect_attempts: int, reconnect_delay_s: float,
          timeout_s: float, check: FrameCheck | None) -> FrameSource:
    path = Path(spec)
    if path.is_dir():
        return ImageFolderSource(path, loop=loop, max_frames=max_frames, check=check)
    if path.is_file():
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return SingleImageSource(path, loop=loop, max_frames=max_frames, check=check)
        return VideoFileSource(path, loop=loop, max_frames=max_frames, check=check)
    device: int | str
    if spec.isascii() and spec.isdigit():
        device = int(spec)
    elif "://" in spec or "!" in spec:
        device = spec
    else:
        raise SourceError(f"no such file, folder, device or URL: {spec}")
    if loop:
        raise SourceError(
            f"loop applies to files and folders, not to the live camera {_describe_device(device)}"
        )
    return CaptureDeviceSource(
        device,
        max_frames=max_frames,
        reconnect_attempts=reconnect_attempts,
        reconnect_delay_s=reconnect_delay_s,
        timeout_s=timeout_s,
        check=check,
    )
