"""Reading images from disk as RGB uint8 arrays, with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from edgeinspect.errors import DataError
from edgeinspect.frames import to_uint8

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def to_rgb(image: np.ndarray) -> np.ndarray:
    """Return a HxWx3 uint8 RGB view of a grayscale, BGR or BGRA OpenCV image."""
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _decode(path: str | Path, flags: int, what: str) -> np.ndarray:
    """Decode an image file with OpenCV; DataError naming the path if it is missing or undecodable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    try:
        data = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        image = cv2.imdecode(data, flags) if data.size else None
    except cv2.error as exc:  # e.g. a header claiming more pixels than OpenCV decodes
        raise DataError(f"cannot decode {what} (OpenCV refused it: {exc.err}): {path}") from None
    if image is None:
        raise DataError(f"cannot decode {what} (corrupt or not an image): {path}")
    return image


def read_raw(path: str | Path) -> np.ndarray:
    """Decode an image file as it is stored (gray, BGR or BGRA, 8/16-bit); DataError naming the path."""
    return _decode(path, cv2.IMREAD_UNCHANGED, "image")


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as HxWx3 uint8 RGB; raise DataError naming the path if it cannot."""
    return to_rgb(to_uint8(read_raw(path)))


def read_mask(path: str | Path) -> np.ndarray:
    """Read a defect mask as a HxW bool array (any non-zero pixel is defect)."""
    return _decode(path, cv2.IMREAD_GRAYSCALE, "mask") > 0


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside a folder, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
