"""Frame sanity: is a camera frame like the images the model was trained on?

Training records the training images' size, channels and bit depth in the manifest
(``input_images``). The runtime checks each decoded frame against them before judging it: a frame
that differs beyond the limits below gets an ``ERROR`` verdict with the reason, never a part verdict.
Safe conversions (an opaque alpha channel dropped, grayscale to three channels for a model trained
on grayscale-looking parts) are done and recorded. ``convert=True`` (``--frames convert``) converts
and judges the rest too (bit depth, colour, size), recording each conversion; frames that are empty,
smaller than ``MIN_SIDE`` pixels or of an unknown layout are refused always.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import cv2
import numpy as np

from edgeinspect.errors import FrameError

MIN_SIDE = 16         # frames with a side below this many pixels are refused, also with convert
MIN_SCALE = 0.5       # each side at least this times the smallest training image's side ...
MAX_SCALE = 4.0       # ... and at most this times the largest one's
MAX_ASPECT = 1.25     # width/height within this factor of the training images' range
_DEPTHS = {np.dtype(np.uint8): 8, np.dtype(np.uint16): 16, np.dtype(np.float32): 32, np.dtype(np.float64): 64}


def to_uint8(image: np.ndarray) -> np.ndarray:
    """An 8-bit version of a decoded image (deeper images scaled by their maximum, as training reads them)."""
    if image.dtype == np.uint8:
        return image
    finite = np.nan_to_num(image.astype(np.float64, copy=False), nan=0.0, posinf=0.0, neginf=0.0)
    return cv2.convertScaleAbs(finite, alpha=255.0 / max(float(finite.max()), 1.0))


def _layout(image: object) -> tuple[int, int, int, int]:
    """(height, width, channels, bit depth) of a decoded image; FrameError if it is not an image."""
    if not isinstance(image, np.ndarray) or image.ndim not in (2, 3) or image.size == 0:
        shape = getattr(image, "shape", None)
        raise FrameError(f"empty or malformed frame (shape {shape}); check the camera and its cable")
    channels = 1 if image.ndim == 2 else image.shape[2]
    if channels not in (1, 3, 4):
        raise FrameError(f"frame has {channels} channels; expected 1 (gray), 3 (BGR) or 4 (BGRA)")
    if image.dtype not in _DEPTHS:
        raise FrameError(f"frame has pixel type {image.dtype}; expected 8- or 16-bit integers or floats")
    return image.shape[0], image.shape[1], channels, _DEPTHS[image.dtype]


def _gray_looking(image: np.ndarray) -> bool:
    if image.ndim == 2 or image.shape[2] == 1:
        return True
    return bool(np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2]))


@dataclass(frozen=True)
class FrameSpec:
    """What the training images were: side ranges, channels, bit depth, whether they looked gray."""

    height: tuple[int, int]
    width: tuple[int, int]
    channels: int
    bit_depth: int
    grayscale: bool

    @classmethod
    def of(cls, images: Iterable[np.ndarray]) -> FrameSpec:
        """The spec of decoded (unconverted) training images."""
        layouts, gray = [], True
        for image in images:
            layouts.append(_layout(image))
            gray = gray and _gray_looking(image[..., :3] if image.ndim == 3 else image)
        if not layouts:
            raise FrameError("no images to describe")
        hs, ws, cs, ds = zip(*layouts, strict=True)
        return cls((min(hs), max(hs)), (min(ws), max(ws)), max(cs), max(ds), gray)

    def to_dict(self) -> dict:
        """JSON-ready form for the manifest."""
        return {"height": list(self.height), "width": list(self.width), "channels": self.channels,
                "bit_depth": self.bit_depth, "grayscale": self.grayscale}

    @classmethod
    def from_dict(cls, d: dict) -> FrameSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(tuple(d["height"]), tuple(d["width"]), int(d["channels"]), int(d["bit_depth"]),
                   bool(d["grayscale"]))

    def describe(self) -> str:
        """``256x256 8-bit colour`` for messages."""
        (w0, w1), (h0, h1) = self.width, self.height
        size = f"{w0}x{h0}" if (w0, h0) == (w1, h1) else f"{w0}-{w1}x{h0}-{h1}"
        return f"{size} {self.bit_depth}-bit {'grayscale' if self.grayscale else 'colour'}"


class FrameCheck:
    """Checks and converts a decoded frame (OpenCV layout: gray, BGR or BGRA, any depth) to RGB uint8."""

    def __init__(self, spec: FrameSpec | None, *, convert: bool = False, min_side: int = MIN_SIDE,
                 roi: tuple[int, int, int, int] | None = None):
        """``roi``: (x0, y0, x1, y1) frame pixels judged instead of the whole frame (x1/y1 exclusive).
        ``spec`` may be replaced while frames are checked (the daemon's model reload): each frame is checked
        against one spec."""
        self.spec = spec
        self.convert = convert
        self.min_side = min_side
        self.roi = roi

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """(RGB uint8 image, conversions done); FrameError with the reason if the frame is refused."""
        if self.roi is not None:
            x0, y0, x1, y1 = self.roi
            if image.ndim < 2 or image.shape[0] < y1 or image.shape[1] < x1:
                raise FrameError(f"frame is {image.shape[1] if image.ndim > 1 else 0}x{image.shape[0]} pixels, "
                                 f"too small for the region of interest {list(self.roi)} (x0, y0, x1, y1)")
            image = image[y0:y1, x0:x1]
        h, w, channels, depth = _layout(image)
        if min(h, w) < self.min_side:
            raise FrameError(f"frame is {w}x{h} pixels, below the minimum of {self.min_side} per side "
                             f"(a camera fault or a thumbnail)")
        spec, notes = self.spec, []
        trained = f"the model was trained on {spec.describe()} images" if spec else ""
        hint = "; pass --frames convert to convert and judge it anyway"
        if spec and depth != spec.bit_depth:
            self._refuse_unless_converting(f"frame is {depth}-bit; {trained}{hint}")
            notes.append(f"{depth}-bit -> 8-bit")
        image = to_uint8(image)
        if channels == 4:
            opaque = bool((image[..., 3] == 255).all())
            if not opaque:
                self._refuse_unless_converting(f"frame has transparent pixels (alpha channel); "
                                               f"{trained or 'expected opaque images'}{hint}")
            notes.append("BGRA -> BGR (opaque alpha dropped)" if opaque else "BGRA -> BGR (transparency dropped)")
            image = np.ascontiguousarray(image[..., :3])
        if channels == 1 or image.ndim == 2:
            if spec and not spec.grayscale:
                self._refuse_unless_converting(f"frame is grayscale; {trained}{hint}")
            notes.append("gray -> 3 channels")
            rgb = cv2.cvtColor(image.reshape(h, w), cv2.COLOR_GRAY2RGB)
        else:
            if spec and spec.grayscale and not _gray_looking(image):
                self._refuse_unless_converting(f"frame is in colour; {trained}{hint}")
                notes.append("colour -> gray")
                image = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
            rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        if spec:
            problem = self._size_problem(spec, h, w)
            if problem:
                self._refuse_unless_converting(f"frame is {w}x{h} pixels: {problem}; {trained}{hint}")
                notes.append(f"{w}x{h} judged outside the size limits")
        return rgb, notes

    def _refuse_unless_converting(self, reason: str) -> None:
        if not self.convert:
            raise FrameError(reason)

    @staticmethod
    def _size_problem(spec: FrameSpec, h: int, w: int) -> str:
        for name, side, (lo, hi) in (("height", h, spec.height), ("width", w, spec.width)):
            if not MIN_SCALE * lo <= side <= MAX_SCALE * hi:
                return f"{name} {side} is outside {MIN_SCALE * lo:g}-{MAX_SCALE * hi:g}"
        aspect = w / h
        lo, hi = spec.width[0] / spec.height[1], spec.width[1] / spec.height[0]
        if not lo / MAX_ASPECT <= aspect <= hi * MAX_ASPECT:
            return f"aspect ratio {aspect:.2f} is outside {lo / MAX_ASPECT:.2f}-{hi * MAX_ASPECT:.2f}"
        return ""
