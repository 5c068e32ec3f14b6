"""Frame sanity: frames unlike the training images are refused with the reason, safe ones converted."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgeinspect.errors import DataError, FrameError
from edgeinspect.frames import MAX_SCALE, MIN_SCALE, MIN_SIDE, FrameCheck, FrameSpec
from edgeinspect.imageio import read_raw

COLOUR = FrameSpec((256, 256), (256, 256), 3, 8, grayscale=False)
GRAY = FrameSpec((256, 256), (256, 256), 1, 8, grayscale=True)


def _bgr(h: int = 256, w: int = 256, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_spec_of_training_images_and_round_trip() -> None:
    gray_as_bgr = np.repeat(_bgr()[..., :1], 3, axis=2)
    spec = FrameSpec.of([gray_as_bgr, cv2.resize(gray_as_bgr, (300, 200))])
    assert spec.height == (200, 256) and spec.width == (256, 300) and spec.channels == 3
    assert spec.bit_depth == 8 and spec.grayscale
    assert FrameSpec.from_dict(spec.to_dict()) == spec
    assert not FrameSpec.of([_bgr()]).grayscale


def test_a_matching_frame_becomes_rgb_without_conversions() -> None:
    frame = _bgr()
    rgb, notes = FrameCheck(COLOUR)(frame)
    assert notes == [] and rgb.dtype == np.uint8
    assert np.array_equal(rgb, frame[..., ::-1])


@pytest.mark.parametrize(("frame", "reason"), [
    (np.zeros((1, 1, 3), np.uint8), "frame is 1x1 pixels, below the minimum of 16"),
    (np.zeros((0, 0, 3), np.uint8), "empty or malformed frame"),
    (np.zeros((256, 256, 2), np.uint8), "2 channels"),
    (np.zeros((256, 256, 3), np.int32), "pixel type int32"),
    (np.full((256, 256, 3), 40000, np.uint16), "frame is 16-bit; the model was trained on 256x256 8-bit colour"),
    (np.dstack([_bgr(), np.zeros((256, 256), np.uint8)]), "transparent pixels"),
    (_bgr()[..., 0], "frame is grayscale; the model was trained on 256x256 8-bit colour"),
    (_bgr(64, 64), "frame is 64x64 pixels: height 64 is outside 128-1024"),
    (_bgr(256, 600), "aspect ratio 2.34 is outside"),
])
def test_frames_unlike_the_training_images_are_refused(frame: np.ndarray, reason: str) -> None:
    with pytest.raises(FrameError, match=reason.replace("(", r"\(")):
        FrameCheck(COLOUR)(frame)


def test_safe_conversions_are_done_and_recorded() -> None:
    opaque = np.dstack([_bgr(), np.full((256, 256), 255, np.uint8)])
    rgb, notes = FrameCheck(COLOUR)(opaque)
    assert notes == ["BGRA -> BGR (opaque alpha dropped)"] and np.array_equal(rgb, opaque[..., 2::-1])
    gray = _bgr()[..., 0]
    rgb, notes = FrameCheck(GRAY)(gray)
    assert notes == ["gray -> 3 channels"] and rgb.shape == (256, 256, 3)
    assert np.array_equal(rgb[..., 0], gray) and np.array_equal(rgb[..., 2], gray)
    with pytest.raises(FrameError, match="frame is in colour"):
        FrameCheck(GRAY)(_bgr())


def test_convert_judges_what_strict_refuses_and_says_so() -> None:
    check = FrameCheck(COLOUR, convert=True)
    deep = (np.arange(256 * 256 * 3, dtype=np.uint32).reshape(256, 256, 3) % 65536).astype(np.uint16)
    rgb, notes = check(deep)
    assert rgb.dtype == np.uint8 and notes == ["16-bit -> 8-bit"]
    _, notes = check(_bgr(64, 64))
    assert notes == ["64x64 judged outside the size limits"]
    _, notes = check(_bgr()[..., 0])
    assert notes == ["gray -> 3 channels"]
    with pytest.raises(FrameError, match="below the minimum"):  # a camera fault stays an error
        check(np.zeros((1, 1, 3), np.uint8))


def test_limits_are_the_documented_ones() -> None:
    check = FrameCheck(COLOUR)
    low, high = int(MIN_SCALE * 256), int(MAX_SCALE * 256)
    assert check(_bgr(low, low))[1] == [] and check(_bgr(high, high))[1] == []
    with pytest.raises(FrameError):
        check(_bgr(low - 1, low - 1))
    assert MIN_SIDE == 16


def test_files_on_disk_16_bit_and_4_channel(tmp_path: Path) -> None:
    deep = tmp_path / "deep.png"
    cv2.imwrite(str(deep), np.full((256, 256), 1000, np.uint16))
    rgba = tmp_path / "rgba.png"
    cv2.imwrite(str(rgba), np.dstack([_bgr(), np.full((256, 256), 128, np.uint8)]))
    assert read_raw(deep).dtype == np.uint16 and read_raw(rgba).shape[2] == 4
    with pytest.raises(FrameError, match="16-bit"):
        FrameCheck(COLOUR)(read_raw(deep))
    with pytest.raises(FrameError, match="transparent"):
        FrameCheck(COLOUR)(read_raw(rgba))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048), png_prefix=st.booleans())
def test_any_bytes_decode_to_a_frame_or_a_clean_error(tmp_path: Path, data: bytes, png_prefix: bool) -> None:
    path = tmp_path / "frame.png"
    path.write_bytes((b"\x89PNG\r\n\x1a\n" if png_prefix else b"") + data)
    try:
        rgb, _ = FrameCheck(COLOUR, convert=True)(read_raw(path))
    except DataError as exc:  # FrameError is a DataError
        assert str(exc)
    else:
        assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8


@settings(max_examples=200, deadline=None)
@given(frame=hnp.arrays(st.sampled_from([np.uint8, np.uint16, np.float32, np.int8, np.bool_]),
                        hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=40)),
       convert=st.booleans(), gray=st.booleans())
def test_any_array_is_a_frame_or_a_clean_error(frame: np.ndarray, convert: bool, gray: bool) -> None:
    spec = FrameSpec((20, 40), (20, 40), 3, 8, grayscale=gray)
    try:
        rgb, notes = FrameCheck(spec, convert=convert, min_side=1)(frame)
    except FrameError as exc:
        assert str(exc)
    else:
        assert rgb.shape == (*frame.shape[:2], 3) and rgb.dtype == np.uint8
        assert all(isinstance(n, str) for n in notes)
