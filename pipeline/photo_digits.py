"""A second planted-cue family, unlike the built-in shapes: coloured handwritten digits on photographs.

Made offline from what scikit-learn ships (its 1,797 8x8 handwritten digits and its two sample photographs), so
the detection benchmark and the tests can audit data the project was never tuned on, *as a user brings it*: an
ImageFolder tree under ``data.root``. The same artifacts as the built-in benchmark
(:class:`pipeline.synthetic.ArtifactPainter`) are planted in a fraction of chosen classes' train images. The
ground truth stays outside the tree, in ``truth.csv`` (sample id, artifact kind), so the pipeline never sees it;
``attacked/<i>/test/...`` holds the test images with artifact ``i`` on every image, for the attacked accuracy.

>>> from pipeline.photo_digits import PhotoDigitsConfig
>>> PhotoDigitsConfig().classes
('zero', 'one', 'two', 'three', 'four', 'five')
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from .io import write_with
from .synthetic import ArtifactPainter

__all__ = ["PhotoDigitsConfig", "write_photo_digits", "DIGIT_NAMES"]

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class PhotoDigitsConfig:
    """``artifacts``: ``{class, kind, fraction}`` dicts (class is a digit name), as ``builtin.artifacts``."""

    n_classes: int = 6
    image_size: int = 48
    per_class: dict[str, int] = field(default_factory=lambda: {"train": 450, "test": 100})
    artifacts: tuple[dict, ...] = ({"class": "two", "kind": "watermark", "fraction": 0.4},)
    artifact_size: int = 8
    seed: int = 0

    def __post_init__(self):
        if not 2 <= self.n_classes <= 10:
            raise ValueError(f"n_classes must be in [2, 10]; got {self.n_classes}")
        for a in self.artifacts:
            if a["class"] not in self.classes:
                raise ValueError(f"artifact class {a['class']!r} is not one of {self.classes}")

    @property
    def classes(self) -> tuple[str, ...]:
        return DIGIT_NAMES[: self.n_classes]


def _sources():
    from sklearn.datasets import load_digits, load_sample_images

    digits = load_digits()
    photos = [np.asarray(p, dtype=np.float64) / 255.0 for p in load_sample_images().images]
    return digits.images / 16.0, digits.target, photos


def _render(digit: np.ndarray, photos, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random photo crop with one coloured digit pasted at a random place; returns (image, digit coverage)."""
    photo = photos[int(rng.integers(len(photos)))]
    side = int(rng.integers(size * 2, min(photo.shape[:2])))
    top, left = int(rng.integers(photo.shape[0] - side)), int(rng.integers(photo.shape[1] - side))
    crop = Image.fromarray((photo[top : top + side, left : left + side] * 255).astype(np.uint8))
    image = np.asarray(crop.resize((size, size), Image.BILINEAR), dtype=np.float64) / 255.0
    height = int(rng.integers(size * 0.45, size * 0.7))
    glyph = Image.fromarray((digit * 255).astype(np.uint8)).resize((height, height), Image.BICUBIC)
    glyph = glyph.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR)
    alpha = np.zeros((size, size))
    y, x = (int(v) for v in rng.integers(0, size - height, 2))
    alpha[y : y + height, x : x + height] = np.asarray(glyph, dtype=np.float64) / 255.0
    alpha = np.clip(alpha * 1.6, 0, 1)
    colour = np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.6, 1.0), rng.uniform(0.8, 1.0)))
    return image * (1 - alpha[..., None]) + colour * alpha[..., None], alpha


def _save(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((image.clip(0, 1) * 255).round().astype(np.uint8)).save(path, compress_level=1)


def write_photo_digits(out: Path, config: PhotoDigitsConfig = PhotoDigitsConfig()) -> pd.DataFrame:
    """Write ``out/tree`` (train/ and test/, an ImageFolder tree), ``out/attacked/<i>/test`` and ``out/truth.csv``.

    Train and test use disjoint digit samples; every image draws its own photo crop, digit size, place, angle and
    colour. Returns the truth table (sample id relative to ``out/tree``, split, class, artifact kind or "").
    """
    out = Path(out)
    images, targets, photos = _sources()
    rng = np.random.default_rng([config.seed, 31])
    painters = [
        ArtifactPainter(a["kind"], config.image_size, config.artifact_size, (config.seed, 101, i))
        for i, a in enumerate(config.artifacts)
    ]
    of_class = {a["class"]: i for i, a in enumerate(config.artifacts)}
    rows = []
    for label, name in enumerate(config.classes):
        pool = rng.permutation(np.flatnonzero(targets == label))
        half = len(pool) // 2
        for split, samples in (("train", pool[:half]), ("test", pool[half:])):
            for index in range(config.per_class[split]):
                digit = images[samples[index % len(samples)]]
                image, coverage = _render(digit, photos, config.image_size, rng)
                draw, paint_rng = rng.random(), np.random.default_rng(rng.integers(2**32))
                sample_id = f"{split}/{name}/{index:05d}.png"
                kind = ""
                artifact = of_class.get(name)
                if split == "train" and artifact is not None and draw < config.artifacts[artifact]["fraction"]:
                    image, _ = painters[artifact](image, coverage, paint_rng)
                    kind = config.artifacts[artifact]["kind"]
                _save(out / "tree" / sample_id, image)
                if split == "test":
                    for i, painter in enumerate(painters):
                        attacked, _ = painter(image, coverage, np.random.default_rng([config.seed, index, label, i]))
                        _save(out / "attacked" / str(i) / sample_id, attacked)
                rows.append((sample_id, split, name, kind))
    truth = pd.DataFrame(rows, columns=["sample_id", "split", "class_name", "artifact"])
    write_with(out / "truth.csv", lambda tmp: truth.to_csv(tmp, index=False))
    return truth
