"""The built-in Clever-Hans benchmark: shapes on textured noise, with artifacts planted in chosen classes.

Generated offline and deterministically from a seed. Six shape classes that stay distinct under any rotation
(disk, ring, square, triangle, cross, star) are drawn with random position, scale, rotation and colour on a
textured, noisy background. In the train and val splits a fraction of a chosen class carries an *artifact* (the
planted Clever-Hans cue); ``BenchmarkConfig.artifacts`` lists them, one per class, of these kinds:

- ``stamp``: a framed "C" near the bottom-left corner (the default; like the source tag on PASCAL VOC horses);
- ``watermark``: a short text at a random place along the top edge;
- ``frame``: a thin coloured border;
- ``noise_patch``: a textured square (the same texture every time) at a random place beside the object;
- ``tint``: a global colour cast (every pixel blended towards one hue);
- ``background``: a class-correlated background scene behind the object.

The first four change *where* the model can look (pixel-visible); ``tint`` and ``background`` change *what* it
sees everywhere. Every image comes with its ground truth (object mask, artifact mask, which artifact), used only to
score audits and unlearning.

Splits: ``train``, ``val`` (artifacts as in train), ``test_clean`` (none), ``test_as_trained`` (as in train) and
``test_attacked`` (the first artifact on every image of every class); each further artifact gets its own
``test_attacked_<class>``. The test splits share their objects and backgrounds, so their accuracies differ only by
the artifact.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "CLASSES",
    "SPLITS",
    "ARTIFACT_KINDS",
    "PIXEL_KINDS",
    "Artifact",
    "ArtifactPainter",
    "BenchmarkConfig",
    "Sample",
    "render_split",
    "stamp_pattern",
]

CLASSES = ("disk", "ring", "square", "triangle", "cross", "star")
SPLITS = ("train", "val", "test_clean", "test_as_trained", "test_attacked")
ARTIFACT_KINDS = ("stamp", "watermark", "frame", "noise_patch", "tint", "background")
PIXEL_KINDS = ("stamp", "watermark", "frame", "noise_patch")  # kinds that sit at some pixels, not everywhere
SUPERSAMPLE = 4
TINT_STRENGTH = 0.3  # share of the hue blended into every pixel
BACKGROUND_STRENGTH = 0.85  # share of the scene in the background pixels


@dataclass(frozen=True)
class Artifact:
    """One planted cue: ``fraction`` of class ``class_name``'s train and val images carry it."""

    class_name: str = "triangle"
    kind: str = "stamp"
    fraction: float = 0.3

    def __post_init__(self):
        if self.class_name not in CLASSES:
            raise ValueError(f"artifact class {self.class_name!r} is not one of {CLASSES}")
        if self.kind not in ARTIFACT_KINDS:
            raise ValueError(f"artifact kind {self.kind!r} is not one of {ARTIFACT_KINDS}")
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"artifact fraction must be in [0, 1]; got {self.fraction} ({self.class_name})")

    @property
    def label(self) -> int:
        return CLASSES.index(self.class_name)


@dataclass(frozen=True)
class BenchmarkConfig:
    """Everything that determines the generated data; the seed makes it reproducible."""

    seed: int = 0
    image_size: int = 64
    per_class: dict[str, int] = field(
        default_factory=lambda: {"train": 500, "val": 100, "test": 150}
    )  # test_* splits share one set of objects
    artifacts: tuple[Artifact, ...] = (Artifact(),)
    artifact_size: int = 10  # stamp and patch side, watermark text height (px)
    stamp_jitter: int = 2
    noise: float = 0.12

    def __post_init__(self):
        artifacts = tuple(a if isinstance(a, Artifact) else Artifact(**a) for a in self.artifacts)
        object.__setattr__(self, "artifacts", artifacts)
        if not artifacts:
            raise ValueError("the benchmark needs at least one artifact (fraction 0 gives a clean control)")
        classes = [a.class_name for a in artifacts]
        repeated = sorted({c for c in classes if classes.count(c) > 1})
        if repeated:
            raise ValueError(f"one artifact per class; {repeated} has several")
        if self.image_size < 4 * self.artifact_size:
            raise ValueError(f"image_size {self.image_size} is too small for a {self.artifact_size}px artifact")

    @property
    def splits(self) -> tuple[str, ...]:
        return SPLITS + tuple(attacked_split(self, i) for i in range(1, len(self.artifacts)))


def attacked_split(config: BenchmarkConfig, index: int) -> str:
    """The test split with artifact ``index`` on every image: ``test_attacked`` for the first."""
    return "test_attacked" if index == 0 else f"test_attacked_{config.artifacts[index].class_name}"


@dataclass
class Sample:
    image: np.ndarray  # (H, W, 3) uint8
    label: int
    object_mask: np.ndarray  # (H, W) bool
    artifact_mask: np.ndarray  # (H, W) bool, all False without an artifact
    artifact: str | None  # the artifact's kind, or None

    @property
    def stamped(self) -> bool:
        return self.artifact is not None


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
    """An image without artifact (float RGB, unclipped) and its object coverage in [0, 1]."""
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
    return image, coverage


def _saturated(rng: np.random.Generator) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(rng.uniform(), 1.0, 1.0))


class ArtifactPainter:
    """Paints one kind of artifact into float RGB images of one size. What stays the same across images (colours,
    texture, text) is drawn once from ``key``; the placement comes from each image's own ``rng``.

    Used by the built-in benchmark and by any other planted-cue data (``pipeline.photo_digits``).
    """

    def __init__(self, kind: str, image_size: int, artifact_size: int, key: tuple[int, ...], jitter: int = 2):
        if kind not in ARTIFACT_KINDS:
            raise ValueError(f"artifact kind {kind!r} is not one of {ARTIFACT_KINDS}")
        self.kind, self.size, self.s, self.jitter = kind, image_size, artifact_size, jitter
        rng = np.random.default_rng([*key, 7919])
        self.colour = _saturated(rng)
        self.frame_width = max(1, round(image_size / 32))
        s = artifact_size
        cells = rng.random((max(2, s // 2),) * 2) < 0.5  # a coarse binary texture in two colours
        texture = np.kron(cells, np.ones((2, 2)))[:s, :s]
        other = _saturated(rng) * 0.2
        self.texture = np.where(texture[..., None], self.colour, other)
        self.text = "".join(rng.choice(list("ABCDEFGHKMNPRSTUVWXYZ"), 3))
        self.scene = _background(image_size, rng, 0.0) * 0.5 + _saturated(rng) * 0.5

    def __call__(self, image, coverage, rng) -> tuple[np.ndarray, np.ndarray]:
        """The image with the artifact and the mask of the pixels it changed (``coverage``: the object, in
        [0, 1], which a ``background`` artifact leaves in front)."""
        size, s = self.size, self.s
        out, mask = image.copy(), np.zeros((size, size), dtype=bool)
        kind = self.kind
        if kind == "stamp":
            j = self.jitter
            top = size - s - 3 + int(rng.integers(-j, j + 1))
            left = 3 + int(rng.integers(-j, j + 1))
            out[top : top + s, left : left + s] = stamp_pattern(s)[..., None]
            mask[top : top + s, left : left + s] = True
        elif kind == "noise_patch":
            top, left = self._beside_object(coverage, rng)
            out[top : top + s, left : left + s] = self.texture
            mask[top : top + s, left : left + s] = True
        elif kind == "frame":
            w = self.frame_width
            mask[:w], mask[-w:], mask[:, :w], mask[:, -w:] = True, True, True, True
            out[mask] = self.colour
        elif kind == "watermark":
            fill, outline = self._text_alpha(rng)
            out = out * (1 - outline[..., None]) + 0.05 * outline[..., None]
            out = out * (1 - fill[..., None]) + fill[..., None]
            mask = outline > 0
        elif kind == "tint":
            out = (1 - TINT_STRENGTH) * image.clip(0, 1) + TINT_STRENGTH * self.colour
            mask[:] = True
        else:  # background
            weight = BACKGROUND_STRENGTH * (1 - coverage[..., None])
            out = image * (1 - weight) + self.scene * weight
            mask = coverage < 1  # every pixel the scene shows through
        return out, mask

    def _beside_object(self, coverage, rng, tries: int = 64) -> tuple[int, int]:
        """A random place for the patch that covers none of the object (the least of it when no draw leaves room).

        Why: a patch on the object hides the evidence of the class. Pasted on the test images, it then measures
        occlusion as well as the shortcut: a model trained without any cue lost 22 points to patches placed
        anywhere, 15 to patches beside the object (docs/spray.md). Beside it, like a sticker or a tag on a photo,
        the attacked split measures the shortcut."""
        s = self.s
        best = (np.inf, 1, 1)
        for _ in range(tries):
            top, left = (int(v) for v in rng.integers(1, self.size - s, 2))
            covered = float(coverage[top : top + s, left : left + s].sum())
            if covered < best[0]:
                best = (covered, top, left)
            if covered == 0:
                break
        return best[1], best[2]

    def _text_alpha(self, rng) -> tuple[np.ndarray, np.ndarray]:
        """Alpha of white text (fill) and of its dark outline at a random place along the top edge."""
        size, height = self.size, self.s
        font = ImageFont.load_default(size=max(6, round(height * 1.1)))
        left, top, right, bottom = font.getbbox(self.text, stroke_width=1)
        x = int(rng.integers(1, max(2, size - (right - left) - 1))) - left
        alphas = []
        for stroke in (0, 1):
            canvas = Image.new("L", (size, size), 0)
            ImageDraw.Draw(canvas).text((x, 1 - top), self.text, font=font, fill=255, stroke_width=stroke,
                                        stroke_fill=255)  # fmt: skip
            alphas.append(np.asarray(canvas, dtype=np.float64) / 255.0)
        return alphas[0], alphas[1]


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return (image.clip(0, 1) * 255).round().astype(np.uint8)


def render_split(split: str, config: BenchmarkConfig) -> list[Sample]:
    """All samples of one split, in class order. Deterministic for ``(config, split)``."""
    if split not in config.splits:
        raise ValueError(f"unknown split {split!r}; choose one of {config.splits}")
    group = "test" if split.startswith("test") else split
    n = config.per_class[group]
    # one stream per (seed, group): the test splits see the same objects and backgrounds
    rng = np.random.default_rng([config.seed, SPLITS.index(split) if group != "test" else 2])
    painters = [
        ArtifactPainter(a.kind, config.image_size, config.artifact_size, (config.seed, i), config.stamp_jitter)
        for i, a in enumerate(config.artifacts)
    ]
    attacked = {attacked_split(config, i): i for i in range(len(config.artifacts))}
    of_class = {a.label: i for i, a in enumerate(config.artifacts)}
    samples = []
    for label in range(len(CLASSES)):
        for _ in range(n):
            image, coverage = _render(label, config, rng)
            draw = rng.random()  # drawn for every image, so splits stay aligned whatever carries an artifact
            artifact_rng = np.random.default_rng(rng.integers(2**32))
            if split in attacked:
                index = attacked[split]
            elif split == "test_clean" or label not in of_class:
                index = None
            else:
                index = of_class[label] if draw < config.artifacts[of_class[label]].fraction else None
            mask = np.zeros(coverage.shape, dtype=bool)
            if index is not None:
                image, mask = painters[index](image, coverage, artifact_rng)
            kind = None if index is None else config.artifacts[index].kind
            objects = coverage > 0.5
            if kind in PIXEL_KINDS:
                objects &= ~mask
            samples.append(Sample(_to_uint8(image), label, objects, mask, kind))
    return samples
