"""Planted-strategy relevance maps: one class's heatmaps with known strategies, to test SpRAy where the answer is known.

Each map mixes what a real heatmap has: relevance on the *object* (a blob at a random place, every map) and, for
the maps of a cue strategy, relevance on the *cue* (``weight`` of the map's relevance). Cues:

- ``none``: the object alone (the class's ordinary strategy);
- ``corner``: a small square at a fixed corner, jittered by a pixel or two (a stamp or source tag);
- ``edge``: a short bar at a random place along the top edge (a watermark);
- ``frame``: the border (a frame);
- ``region``: a broad blob at a fixed place (a benign strategy: the object is usually there);
- ``spot``: a small square at a random place (a patch that moves: no fixed place to see);
- ``ring``: a ring at a fixed place (a distinct, non-artifact shape).

Then signed Gaussian noise (``noise`` x the map's peak), a per-map scale (log-uniform in ``scale``), near-duplicates
(copies of a few maps with tiny noise) and all-zero maps, so every way real heatmaps go wrong is a knob. Sizes are
relative to the map, so one spec renders at any ``size``.

>>> from audits.planted import PlantedSpec, make_planted_maps
>>> maps, truth = make_planted_maps(PlantedSpec(n=200, size=32), seed=0)
>>> maps.shape, sorted(set(truth.tolist()))
((200, 32, 32), [0, 1, 2])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["CUES", "PlantedSpec", "make_planted_maps", "ZERO_LABEL"]

CUES = ("none", "corner", "edge", "frame", "region", "spot", "ring")
ZERO_LABEL = -1  # truth label of an all-zero map


@dataclass(frozen=True)
class PlantedSpec:
    """One class of planted maps. ``cues[i]`` is strategy ``i``'s cue and ``shares[i]`` its share of the maps."""

    n: int = 400
    size: int = 48
    shares: tuple[float, ...] = (0.6, 0.25, 0.15)
    cues: tuple[str, ...] = ("none", "corner", "edge")
    weight: tuple[float, float] = (0.5, 0.7)  # cue share of a cue map's relevance (uniform in this range)
    noise: float = 0.2  # std of signed Gaussian noise, relative to the map's peak
    scale: tuple[float, float] = (0.5, 2.0)  # per-map scale, log-uniform
    duplicates: float = 0.0  # share of maps replaced by near-copies of a few others
    zeros: float = 0.0  # share of maps that are all zero

    def __post_init__(self):
        if len(self.shares) != len(self.cues):
            raise ValueError(f"one share per cue; got {len(self.shares)} shares for {len(self.cues)} cues")
        unknown = sorted(set(self.cues) - set(CUES))
        if unknown:
            raise ValueError(f"unknown cues {unknown}; choose from {CUES}")
        if abs(sum(self.shares) - 1) > 1e-6:
            raise ValueError(f"shares must sum to 1; got {sum(self.shares)}")


def _square(yy, xx, cy, cx, half):
    return ((np.abs(yy - cy) <= half) & (np.abs(xx - cx) <= half)).astype(np.float64)


def _cue(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] + 0.5
    s = size
    if name == "corner":
        jitter = rng.integers(-1, 2, 2) * max(1, s // 32)
        return _square(yy, xx, 0.85 * s + jitter[0], 0.15 * s + jitter[1], 0.06 * s)
    if name == "edge":
        cx = rng.uniform(0.15, 0.85) * s
        return ((yy < 0.1 * s) & (np.abs(xx - cx) < 0.12 * s)).astype(np.float64)
    if name == "frame":
        width = max(1.0, 0.04 * s)
        return ((yy < width) | (yy > s - width) | (xx < width) | (xx > s - width)).astype(np.float64)
    if name == "region":
        return np.exp(-((yy - 0.3 * s) ** 2 + (xx - 0.7 * s) ** 2) / (2 * (0.12 * s) ** 2))
    if name == "spot":
        cy, cx = rng.uniform(0.1, 0.9, 2) * s
        return _square(yy, xx, cy, cx, 0.06 * s)
    if name == "ring":
        radius = np.hypot(yy - 0.5 * s, xx - 0.5 * s)
        return np.exp(-((radius - 0.3 * s) ** 2) / (2 * (0.04 * s) ** 2))
    raise ValueError(name)


def _object(size: int, rng: np.random.Generator) -> np.ndarray:
    """A blob at a random place with a random extent: the relevance an object draws."""
    yy, xx = np.mgrid[:size, :size] + 0.5
    cy, cx = rng.uniform(0.25, 0.75, 2) * size
    radius = rng.uniform(0.08, 0.16) * size
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))


def make_planted_maps(spec: PlantedSpec, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(maps (n, size, size) float32, truth (n,) int)``; truth is the strategy index, ``ZERO_LABEL`` for zero maps."""
    rng = np.random.default_rng(seed)
    counts = np.floor(np.asarray(spec.shares) * spec.n).astype(int)
    counts[0] += spec.n - counts.sum()
    truth = np.repeat(np.arange(len(counts)), counts)
    maps = np.empty((spec.n, spec.size, spec.size), dtype=np.float32)
    low, high = np.log(spec.scale)
    for i, strategy in enumerate(truth):
        body = _object(spec.size, rng)
        body /= body.sum()
        cue = spec.cues[strategy]
        if cue != "none":
            mark = _cue(cue, spec.size, rng)
            w = rng.uniform(*spec.weight)
            body = (1 - w) * body + w * mark / mark.sum()
        body = body / body.max()
        body = body + spec.noise * rng.normal(size=body.shape)
        maps[i] = body * np.exp(rng.uniform(low, high))
    n_dup = int(round(spec.duplicates * spec.n))
    if n_dup:
        targets = rng.choice(spec.n, n_dup, replace=False)
        sources = rng.choice(np.setdiff1d(np.arange(spec.n), targets), max(1, n_dup // 20), replace=False)
        picks = sources[rng.integers(0, len(sources), n_dup)]
        peak = np.abs(maps[picks]).max((1, 2), keepdims=True)
        maps[targets] = maps[picks] + 0.01 * peak * rng.normal(size=(n_dup, spec.size, spec.size))
        truth[targets] = truth[picks]
    n_zero = int(round(spec.zeros * spec.n))
    if n_zero:
        zero = rng.choice(spec.n, n_zero, replace=False)
        maps[zero] = 0.0
        truth[zero] = ZERO_LABEL
    order = rng.permutation(spec.n)
    return maps[order], truth[order]
