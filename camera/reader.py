"""Reading a frame source in a background thread, so the consumer can keep time while it waits."""

from __future__ import annotations

import logging
import queue
import threading

from edgeinspect.camera.sources import Frame, FrameSource

logger = logging.getLogger(__name__)

END = object()  # returned by ThreadedReader.get when the source has ended


class ThreadedReader:
    """Iterates a :class:`FrameSource` in a daemon thread into a bounded queue.

    ``get(timeout)`` returns the next Frame, ``None`` when nothing arrived within ``timeout``, or
    :data:`END` when the source ended; an exception raised by the source (a camera that stayed
    disconnected) is re-raised in the consumer's thread. For a recorded source the queue is bounded,
    so a slow consumer slows the reading down instead of growing memory: no frame of a file or
    folder is skipped. For a live source (``source.live``) the newest frame wins: a frame the consumer
    has not taken yet is replaced by the next one and counted in ``dropped_stale``, so the verdict is
    always about the latest picture, never about a queue of old ones.
    """

    def __init__(self, source: FrameSource, maxsize: int = 4) -> None:
        self.source = source
        self.dropped_stale = 0
        self._queue: queue.Queue[object] = queue.Queue(1 if source.live else maxsize)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"reader: {source.description}", daemon=True)

    def start(self) -> ThreadedReader:
        """Start reading; returns self."""
        self._thread.start()
        return self

    def _put(self, item: object) -> bool:
        while not self._stopping.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for frame in self.source:
                if self.source.live:
                    self._replace(frame)
                elif not self._put(frame):
                    return
                if self._stopping.is_set():
                    return
            self._put(END)
        except Exception as exc:  # handed over to the consumer, which raises it
            self._put(exc)

    def _replace(self, frame: Frame) -> None:
        """Queue ``frame`` in place of a frame still waiting (this thread is the only producer)."""
        try:
            self._queue.get_nowait()
            self.dropped_stale += 1
        except queue.Empty:
            pass
        self._queue.put_nowait(frame)

    def get(self, timeout: float) -> Frame | object | None:
        """Next Frame, END, or None after ``timeout`` seconds; re-raises the source's exception."""
        try:
            item = self._queue.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None
        if isinstance(item, Exception):
            raise item
        return item

    def stop(self, timeout: float = 5.0) -> None:
        """Stop reading and wait for the thread, so the source can be released safely."""
        self._stopping.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("%s is still blocked in a read after %.0f s", self.source.description, timeout)
