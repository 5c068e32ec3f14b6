"""Frame sources for the runtime: video files, image folders, single images and live cameras."""

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
    "CaptureDeviceSource",
    "Frame",
    "FrameSource",
    "ImageFolderSource",
    "SingleImageSource",
    "VideoFileSource",
    "open_source",
]
