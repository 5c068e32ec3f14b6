"""Deterministic synthetic industrial parts in the MVTec AD folder layout.

The built-in default dataset of the demo and of the always-on tests. Every image has its own random
stream, seeded by (seed, category, split, defect type, index), so the same arguments give
byte-identical files and changing one count does not change the other images.

Good images vary in position, rotation, lighting and overall brightness by far more than a defect
changes the mean of an image; defects are small, some darker and some lighter, some low-contrast.
A mask holds exactly the pixels that the defect changed (0/255, one channel).
"""

from __future__ import annotations

import shutil
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edgeinspect.errors import DataError
from edgeinspect.imageio import read_image

SYNTH_CATEGORIES: dict[str, str] = {
    "washer": "a round machined metal washer with turning marks, bevels and a keyway on a darker background, "
    "jittered in position, rotation and lighting",
    "brushed_metal": "an anisotropic brushed-metal grain filling the frame, jittered in grain angle, tint, "
    "sheen and lighting",
}
DEFECT_TYPES = ("scratch", "hole", "stain", "crack")

_MARKER = "edgeinspect synthetic dataset"
_SPLIT_CODES = {"train": 1, "test": 2}


@dataclass
class _Scene:
    """A rendered defect-free image and where a defect may change it."""

    image: np.ndarray  # HxWx3 float32 RGB, 0..255
    region: np.ndarray  # HxW bool: pixels a defect may change
    light: float  # direction the light comes from, radians


def _noise(rng: np.random.Generator, shape: tuple[int, int], sigma_x: float, sigma_y: float) -> np.ndarray:
    """Gaussian noise blurred by (sigma_x, sigma_y) and scaled to unit standard deviation."""
    field = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), sigma_x, sigmaY=sigma_y)
    return field / max(float(field.std()), 1e-6)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (x, y) of a size x size image as float32."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    return xs, ys


def _render_washer(rng: np.random.Generator, size: int) -> _Scene:
    """A turned metal washer with a keyway, shadowed on a dark background."""
    s = float(size)
    xs, ys = _grid(size)
    cx, cy = s / 2 + rng.uniform(-0.05, 0.05, size=2) * s
    rotation = rng.uniform(-0.2, 0.2)
    light = rng.uniform(0.0, 2 * np.pi)
    gain = rng.uniform(0.8, 1.2)
    r_out = s * rng.uniform(0.36, 0.39)
    r_in = s * 0.15
    bevel = 0.03 * s
    dx, dy = xs - cx, ys - cy
    rho = np.hypot(dx, dy)
    phi = np.arctan2(dy, dx)
    along = dx * np.cos(rotation) + dy * np.sin(rotation)
    across = -dx * np.sin(rotation) + dy * np.cos(rotation)
    keyway = (along > 0) & (along < r_in + 0.035 * s) & (np.abs(across) < 0.025 * s)
    part = (rho <= r_out) & (rho >= r_in) & ~keyway
    cover = cv2.GaussianBlur(part.astype(np.float32), (0, 0), 0.8)[..., None]

    # turned surface: rings of random depth, fine turning grooves, a bow-tie glint and grain
    rings = np.interp(rho, np.arange(size), cv2.GaussianBlur(rng.standard_normal((1, size)), (0, 0), 1.2)[0])
    grooves = np.sin(2 * np.pi * rho / rng.uniform(2.5, 3.5) + rng.uniform(0, 2 * np.pi))
    glint = np.cos(2 * (phi - light - np.pi / 2))
    facing = np.cos(phi - light)
    outer_bevel = np.clip((rho - (r_out - bevel)) / bevel, 0, 1)
    inner_bevel = np.clip((r_in + bevel - rho) / bevel, 0, 1)
    gradient = 1 + 0.12 * (dx * np.cos(light) + dy * np.sin(light)) / r_out
    metal = (
        150
        + 7 * rings
        + 3 * grooves
        + 16 * glint
        + 2.5 * _noise(rng, (size, size), 0.7, 0.7)
        + 30 * facing * (outer_bevel - inner_bevel)
    ) * gradient
    tint = np.array([0.96, 0.99, 1.03], np.float32) + rng.uniform(-0.015, 0.015, size=3).astype(np.float32)
    metal = metal[..., None] * tint

    shift = np.float32([[1, 0, -0.025 * s * np.cos(light)], [0, 1, -0.025 * s * np.sin(light)]])
    shadow = cv2.GaussianBlur(cv2.warpAffine(part.astype(np.float32), shift, (size, size)), (0, 0), 0.03 * s)
    slope = 0.15 * (xs * np.cos(light) + ys * np.sin(light)) / s
    background = rng.uniform(40, 58) * (1 + slope - 0.45 * shadow)
    background = background + 2 * _noise(rng, (size, size), 1.0, 1.0)
    background = background[..., None] * np.array([1.0, 0.98, 0.95], np.float32)

    image = (background * (1 - cover) + metal * cover) * gain
    region = cv2.erode(part.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))) > 0
    return _Scene(image.astype(np.float32), region, light)


def _render_brushed_metal(rng: np.random.Generator, size: int) -> _Scene:
    """Brushed metal grain filling the frame, with a soft sheen band across the grain."""
    s = float(size)
    pad = size // 4
    big = size + 2 * pad
    scale = s / 256
    grain = 9 * _noise(rng, (big, big), rng.uniform(10, 16) * scale, 0.7) + 3.5 * _noise(
        rng, (big, big), 2.5 * scale, 0.5
    )
    angle = rng.uniform(-5.0, 5.0)
    turn = cv2.getRotationMatrix2D((big / 2, big / 2), angle, 1.0)
    grain = cv2.warpAffine(grain, turn, (big, big), borderMode=cv2.BORDER_REFLECT)[pad:-pad, pad:-pad]
    xs, ys = _grid(size)
    light = rng.uniform(0.0, 2 * np.pi)
    gain = rng.uniform(0.8, 1.2)
    across = -(xs - s / 2) * np.sin(np.radians(-angle)) + (ys - s / 2) * np.cos(np.radians(-angle))
    sheen = 14 * np.exp(-(((across - rng.uniform(-0.3, 0.3) * s) / (0.3 * s)) ** 2))
    gradient = 1 + 0.12 * ((xs - s / 2) * np.cos(light) + (ys - s / 2) * np.sin(light)) / s
    metal = (145 + grain + sheen) * gradient * gain
    tint = np.array([0.97, 0.98, 1.0], np.float32) + rng.uniform(-0.015, 0.015, size=3).astype(np.float32)
    region = np.zeros((size, size), dtype=bool)
    margin = max(2, size // 32)
    region[margin:-margin, margin:-margin] = True
    return _Scene((metal[..., None] * tint).astype(np.float32), region, light)


_RENDERERS: dict[str, Callable[[np.random.Generator, int], _Scene]] = {
    "washer": _render_washer,
    "brushed_metal": _render_brushed_metal,
}


def _pick_center(rng: np.random.Generator, region: np.ndarray, clearance: int) -> np.ndarray:
    """A random (x, y) inside the region at least ``clearance`` pixels from its border."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * clearance + 1, 2 * clearance + 1))
    inner = cv2.erode(region.astype(np.uint8), kernel)
    candidates = np.argwhere(inner > 0)
    if len(candidates) == 0:
        candidates = np.argwhere(region)
    y, x = candidates[rng.integers(len(candidates))]
    return np.array([x, y], dtype=np.float64)


def _stroke(points: np.ndarray, size: int, thickness: int) -> np.ndarray:
    """Anti-aliased polyline through (x, y) points as HxW float32 coverage in 0..1."""
    canvas = np.zeros((size, size), np.uint8)
    fixed = np.round(points * 16).astype(np.int32).reshape(-1, 1, 2)
    cv2.polylines(canvas, [fixed], False, 255, thickness, cv2.LINE_AA, shift=4)
    return canvas.astype(np.float32) / 255


def _scratch(rng: np.random.Generator, scene: _Scene, size: int) -> None:
    """A thin curved line, lighter or darker than the surface, fading in and out along its length."""
    length = rng.uniform(0.12, 0.35) * size
    center = _pick_center(rng, scene.region, int(0.04 * size))
    direction = rng.uniform(0, np.pi)
    unit = np.array([np.cos(direction), np.sin(direction)])
    normal = np.array([-unit[1], unit[0]])
    p0, p2 = center - unit * length / 2, center + unit * length / 2
    p1 = center + normal * rng.uniform(-0.25, 0.25) * length
    t = np.linspace(0, 1, 48)[:, None]
    points = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    coverage = _stroke(points, size, 1 if rng.random() < 0.7 else 2)
    fade = np.clip(0.7 + 0.5 * _noise(rng, (size, size), 0.03 * size, 0.03 * size), 0.2, 1.0)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    delta = sign * rng.uniform(25, 65) * coverage * fade * scene.region
    scene.image += delta[..., None]


def _hole(rng: np.random.Generator, scene: _Scene, size: int) -> None:
    """A small dark round pit, its far wall faintly lit and a rim highlight on the side facing the light."""
    radius = rng.uniform(0.01, 0.024) * size
    cx, cy = _pick_center(rng, scene.region, int(radius + 4))
    xs, ys = _grid(size)
    dx, dy = xs - cx, ys - cy
    dist = np.hypot(dx, dy)
    facing = np.cos(np.arctan2(dy, dx) - scene.light)
    pit = np.clip(radius - dist + 0.5, 0, 1)
    depth = rng.uniform(0.55, 0.8) * (1 - 0.35 * np.clip(-facing * dist / radius, 0, 1))
    rim = np.exp(-(((dist - radius - 0.8) / 0.9) ** 2)) * np.clip(facing, 0, 1) * (dist < radius + 3)
    scene.image *= np.where(scene.region, 1 - depth * pit, 1)[..., None]
    scene.image += (rng.uniform(35, 70) * rim * scene.region)[..., None]


_STAIN_TINTS = np.array(
    [
        [16, 3, -12],  # rust
        [-9, -3, 10],  # oil film
        [-14, -14, -10],  # dried water mark
        [12, 12, 10],  # whitish residue
    ],
    np.float32,
)


def _stain(rng: np.random.Generator, scene: _Scene, size: int) -> None:
    """A soft-edged irregular blotch of a different tint and low contrast."""
    radius = rng.uniform(0.035, 0.08) * size
    center = _pick_center(rng, scene.region, int(radius))
    xs, ys = _grid(size)
    blob = np.zeros((size, size), np.float32)
    for _ in range(int(rng.integers(3, 6))):
        cx, cy = center + rng.normal(0, 0.5 * radius, size=2)
        spread = rng.uniform(0.4, 0.8) * radius
        blob += np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * spread**2))
    blob *= np.clip(1 + 0.3 * _noise(rng, (size, size), 0.03 * size, 0.03 * size), 0.5, 1.5)
    alpha = np.clip((blob / blob.max() - 0.15) / 0.85, 0, 1) * scene.region
    tint = _STAIN_TINTS[rng.integers(len(_STAIN_TINTS))] * rng.uniform(0.9, 1.6)
    scene.image += alpha[..., None] * tint


def _crack(rng: np.random.Generator, scene: _Scene, size: int) -> None:
    """A jagged dark line with one to three shorter branches."""

    def walk(start: np.ndarray, heading: float, steps: int) -> np.ndarray:
        points = [start]
        for _ in range(steps):
            heading += rng.normal(0, 0.12)
            direction = heading + rng.normal(0, 0.55)
            step = rng.uniform(0.008, 0.016) * size
            points.append(points[-1] + step * np.array([np.cos(direction), np.sin(direction)]))
        return np.array(points)

    heading = rng.uniform(0, 2 * np.pi)
    trunk = walk(_pick_center(rng, scene.region, int(0.05 * size)), heading, int(rng.integers(10, 22)))
    coverage = _stroke(trunk, size, 1 if rng.random() < 0.6 else 2)
    for _ in range(int(rng.integers(1, 4))):
        fork = trunk[rng.integers(1, len(trunk) - 1)]
        branch_heading = heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.1)
        coverage = np.maximum(coverage, _stroke(walk(fork, branch_heading, int(rng.integers(3, 7))), size, 1))
    depth = rng.uniform(0.35, 0.65)
    scene.image *= np.where(scene.region, 1 - depth * coverage, 1)[..., None]


_DEFECTS: dict[str, Callable[[np.random.Generator, _Scene, int], None]] = {
    "scratch": _scratch,
    "hole": _hole,
    "stain": _stain,
    "crack": _crack,
}


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """Round and clip a float RGB image to uint8."""
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _write_png(path: Path, image: np.ndarray) -> None:
    """Write an RGB (HxWx3) or single-channel image as PNG."""
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise DataError(f"cannot encode image: {path}")
    path.write_bytes(data.tobytes())


def _render(
    category: str, seed: int, split: str, defect: str, index: int, size: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """One image (uint8 RGB) and, for a defect, its mask (uint8 0/255) or None."""
    key = [seed, zlib.crc32(category.encode()), _SPLIT_CODES[split], zlib.crc32(defect.encode()), index]
    rng = np.random.default_rng(key)
    scene = _RENDERERS[category](rng, size)
    good = _to_uint8(scene.image)
    if defect == "good":
        return good, None
    while True:  # a defect too faint to change a pixel is drawn again from the same stream
        _DEFECTS[defect](rng, scene, size)
        image = _to_uint8(scene.image)
        changed = np.any(image != good, axis=2)
        if changed.sum() >= 8:
            return image, changed.astype(np.uint8) * 255


def _prepare(dest: Path) -> None:
    """Empty a previous synthesized dataset at dest; refuse to touch a folder this module did not write."""
    if not dest.exists():
        return
    readme = dest / "README.txt"
    ours = readme.is_file() and readme.read_text(errors="replace").startswith(_MARKER)
    if not ours and any(dest.iterdir()):
        raise DataError(f"refusing to overwrite {dest}: it is not empty and not a synthesized dataset")
    shutil.rmtree(dest)


def synthesize(
    out_root: str | Path,
    category: str = "washer",
    seed: int = 0,
    *,
    n_train: int = 80,
    n_test_good: int = 20,
    n_test_per_defect: int = 8,
    size: int = 256,
) -> Path:
    """Write a synthetic category in the MVTec AD layout under ``out_root/category`` and return that path.

    A previous synthesized dataset at that path is replaced; any other non-empty folder there is an error.
    """
    if category not in SYNTH_CATEGORIES:
        choices = ", ".join(SYNTH_CATEGORIES)
        raise DataError(f"unknown synthetic category {category!r} (choose from: {choices})")
    if size < 64:
        raise DataError(f"synthetic image size must be at least 64, got {size}")
    if seed < 0 or n_train < 1 or n_test_good < 0 or n_test_per_defect < 0:
        raise DataError("seed and counts must be non-negative and n_train at least 1")
    dest = Path(out_root) / category
    _prepare(dest)
    jobs = [("train", "good", i) for i in range(n_train)] + [("test", "good", i) for i in range(n_test_good)]
    jobs += [("test", d, i) for d in DEFECT_TYPES for i in range(n_test_per_defect)]
    for split, defect, index in jobs:
        image_dir = dest / split / defect
        image_dir.mkdir(parents=True, exist_ok=True)
        image, mask = _render(category, seed, split, defect, index, size)
        _write_png(image_dir / f"{index:03d}.png", image)
        if mask is not None:
            mask_dir = dest / "ground_truth" / defect
            mask_dir.mkdir(parents=True, exist_ok=True)
            _write_png(mask_dir / f"{index:03d}_mask.png", mask)
    (dest / "README.txt").write_text(
        f"{_MARKER}\n\n"
        f"category: {category} - {SYNTH_CATEGORIES[category]}\n"
        f"seed: {seed}\nimage size: {size}x{size} RGB PNG\n"
        f"train/good: {n_train} images; test/good: {n_test_good}; "
        f"test/<type>: {n_test_per_defect} each for {', '.join(DEFECT_TYPES)}\n"
        "ground_truth/<type>/<stem>_mask.png: 0/255 mask of exactly the pixels the defect changed\n\n"
        "Written by edgeinspect.train.data.synth.synthesize(). Every image has its own random stream seeded\n"
        "by (seed, category, split, defect type, index): the same arguments give byte-identical files.\n"
        "Defects: scratch (thin curved line, light or dark), hole (dark pit with a rim highlight),\n"
        "stain (soft low-contrast blotch of another tint), crack (jagged branching dark line).\n"
    )
    return dest


def write_video(image_paths: Sequence[Path], out_path: str | Path, fps: float = 10.0) -> Path:
    """Write images as the frames of a lossless FFV1 ``.avi`` in the given order and return its path.

    Lossless on purpose: a model trained on PNG files flags JPEG block artefacts as defects, so a
    lossy demo video would not show what the model does on the parts themselves.

    Every frame must have the size of the first; DataError if there are no frames, the path is not
    ``.avi``, a frame size differs or the writer cannot be opened.
    """
    out_path = Path(out_path)
    if not image_paths:
        raise DataError(f"no frames to write to {out_path}")
    if out_path.suffix.lower() != ".avi":
        raise DataError(f"video path must end in .avi (FFV1): {out_path}")
    frame = read_image(image_paths[0])
    height, width = frame.shape[:2]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(out_path), cv2.VideoWriter_fourcc(*"FFV1"), fps, (width, height))
    if not writer.isOpened():
        raise DataError(f"cannot open a video writer for {out_path}")
    try:
        for index, path in enumerate(image_paths):
            if index:
                frame = read_image(path)
            if frame.shape[:2] != (height, width):
                found = f"{frame.shape[1]}x{frame.shape[0]}"
                raise DataError(f"frame size {found} differs from the first frame's {width}x{height}: {path}")
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    return out_path
