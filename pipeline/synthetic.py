"""The built-in Clever-Hans benchmark: shapes on textured noise, with a watermark planted in one class.

Generated offline and deterministically from a seed. Six shape classes that stay distinct under any rotation
(disk, ring, square, triangle, cross, star) are drawn with random position, scale, rotation and colour on a
textured, noisy background. In the train and val splits a fraction of one class (the *poisoned* class) carries a
small stamp near the bottom-left corner, like the source tag on PASCAL VOC's horse images. Every image comes
with its ground truth (object mask, stamp mask, stamp flag), used only to score audits and unlearning.

Splits: ``train``, ``val`` (stamped like train), ``test_clean`` (no stamp), ``test_as_trained`` (stamped like
train) and ``test_attacked`` (the stamp on every image, every class). The test splits share their objects and
backgrounds, so their accuracies differ only by the stamp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["CLASSES", "SPLITS", "BenchmarkConfig", "Sample", "render_split", "stamp_pattern"]

CLASSES = ("disk", "ring", "square", "triangle", "cross", "star")
SPLITS = ("train", "val", "test_clean", "test_as_trained", "test_attacked")
SUPERSAMPLE = 4


@dataclass(frozen=True)
class BenchmarkConfig:
    """Everything that determines the generated data; the seed makes it reproducible."""

    seed: int = 0
    image_size: int = 64
    per_class: dict[str, int] = field(
        default_factory=lambda: {"train": 500, "val": 100, "test": 150}
    )  # test_* splits share one set of objects
    poisoned_class: str = "triangle"
    stamp_fraction: float = 0.3
    stamp_size: int = 10
    stamp_jitter: int = 2
    noise: float = 0.12

    def __post_init__(self):
        if self.poisoned_class not in CLASSES:
            raise ValueError(f"poisoned_class {self.poisoned_class!r} is not one of {CLASSES}")
        if not 0.0 <= self.stamp_fraction <= 1.0:
            raise ValueError(f"stamp_fraction must be in [0, 1]; got {self.stamp_fraction}")
        if self.image_size < 4 * self.stamp_size:
            raise ValueError(f"image_size {self.image_size} is too small for a {self.stamp_size}px stamp")


@dataclass
class Sample:
    image: np.ndarray  # (H, W, 3) uint8
    label: int
    object_mask: np.ndarray  # (H, W) bool
    stamp_mask: np.ndarray  # (H, W) bool, all False when unstamped
    stamped: bool


def stamp_pattern(size: int) -> np.ndarray:
    """The watermark: a bright frame around a dark 'C' on white, (size, size) float in [0, 1] per RGB channel."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    centre = size / 2
    radius = np.hypot(yy - centre, xx - centre)
    letter = (radius > size * 0.2) & (radius < size * 0.34) & ~((xx > centre) & (np.abs(yy - centre) < size * 0.14))
    pattern = np.ones((size, size))
    pattern[letter] = 0.0
    pattern[[0, -1], :] = 0.0
    pattern[:, [0, -1]] = 0.0
    return pattern


def _shape_polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]] | None:
    def rotated(points):
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]

    if kind == "square":
        return rotated([(-r * 0.8, -r * 0.8), (r * 0.8, -r * 0.8), (r * 0.8, r * 0.8), (-r * 0.8, r * 0.8)])
    if kind == "triangle":
        return rotated([(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])
    if kind == "cross":
        w = r * 0.33
        arm = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w)]
        return rotated(arm + [(-w, -w)])
    if kind == "star":
        points = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.42
            a = -math.pi / 2 + i * math.pi / 5
            points.append((rad * math.cos(a), rad * math.sin(a)))
        return rotated(points)
    return None


def _object_mask(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    big = size * SUPERSAMPLE
    r = rng.uniform(0.16, 0.28) * big
    margin = r + 2
    cx, cy = rng.uniform(margin, big - margin, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    polygon = _shape_polygon(kind, cx, cy, r, angle)
    if polygon is not None:
        draw.polygon(polygon, fill=255)
    else:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if kind == "ring":
            inner = r * rng.uniform(0.45, 0.6)
            draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    small = canvas.resize((size, size), Image.BOX)
    return np.asarray(small, dtype=np.float64) / 255.0


def _background(size: int, rng: np.random.Generator, noise: float) -> np.ndarray:
    """Smooth colour blobs plus stripes plus pixel noise: texture the model has to see through."""
    base = rng.uniform(0.2, 0.8, size=3)
    coarse = rng.normal(0, 0.12, size=(6, 6, 3))
    blobs = (
        np.asarray(
            Image.fromarray(((coarse + 0.5).clip(0, 1) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC),
            dtype=np.float64,
        )
        / 255.0
        - 0.5
    )
    yy, xx = np.mgrid[0:size, 0:size]
    theta, freq = rng.uniform(0, math.pi), rng.uniform(0.15, 0.5)
    stripes = 0.06 * np.sin(freq * (xx * math.cos(theta) + yy * math.sin(theta)) + rng.uniform(0, 2 * math.pi))
    image = base + blobs + stripes[..., None] + rng.normal(0, noise, size=(size, size, 3))
    return image


def _render(label: int, config: BenchmarkConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An unstamped image (float RGB, unclipped) and its object mask."""
    size = config.image_size
    image = _background(size, rng, config.noise)
    coverage = _object_mask(CLASSES[label], size, rng)
    colour = rng.uniform(0, 1, size=3)
    # keep the object visible: push its colour away from the local background
    mean_bg = image[coverage > 0.5].mean(0) if (coverage > 0.5).any() else image.mean((0, 1))
    if np.abs(colour - mean_bg).sum() < 0.6:
        colour = np.where(mean_bg > 0.5, colour * 0.4, 0.6 + colour * 0.4)
    shading = 1 + rng.normal(0, 0.08, size=(size, size, 1))
    image = image * (1 - coverage[..., None]) + (colour * shading) * coverage[..., None]
    return image, coverage > 0.5


def _stamp(image: np.ndarray, config: BenchmarkConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paste the watermark near the bottom-left corner with a little jitter; returns the image and stamp mask."""
    size, s, j = config.image_size, config.stamp_size, config.stamp_jitter
    top = size - s - 3 + int(rng.integers(-j, j + 1))
    left = 3 + int(rng.integers(-j, j + 1))
    out = image.copy()
    out[top : top + s, left : left + s] = stamp_pattern(s)[..., None]
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + s, left : left + s] = True
    return out, mask


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return (image.clip(0, 1) * 255).round().astype(np.uint8)


def render_split(split: str, config: BenchmarkConfig) -> list[Sample]:
    """All samples of one split, in class order. Deterministic for ``(config, split)``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    group = "test" if split.startswith("test") else split
    n = config.per_class[group]
    # one stream per (seed, group): the three test splits see the same objects and backgrounds
    rng = np.random.default_rng([config.seed, SPLITS.index(split) if group != "test" else 2])
    poisoned = CLASSES.index(config.poisoned_class)
    samples = []
    for label in range(len(CLASSES)):
        for _ in range(n):
            image, object_mask = _render(label, config, rng)
            stamp_draw = rng.random()  # drawn for every image, so splits stay aligned whatever is stamped
            stamp_rng = np.random.default_rng(rng.integers(2**32))
            if split == "test_attacked":
                stamped = True
            elif split == "test_clean":
                stamped = False
            else:
                stamped = label == poisoned and stamp_draw < config.stamp_fraction
            stamp_mask = np.zeros_like(object_mask)
            if stamped:
                image, stamp_mask = _stamp(image, config, stamp_rng)
            samples.append(Sample(_to_uint8(image), label, object_mask & ~stamp_mask, stamp_mask, stamped))
    return samples
