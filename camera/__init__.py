"""Frame sources for the runtime: video files, image folders, single images and live cameras."""

from edgeinspect.camera.reader import END, ThreadedReader
from edgeinspect.camera.sources import (
    CaptureDeviceSource,
    Frame,
    FrameSource,
    ImageFolderSource,
    SingleImageSource,
    VideoFileSource,
    open_source,
)

__all__ = [
    "END",
    "CaptureDeviceSource",
    "Frame",
    "FrameSource",
    "ImageFolderSource",
    "SingleImageSource",
    "ThreadedReader",
    "VideoFileSource",
    "open_source",
]
