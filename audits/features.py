"""What SpRAy compares: two views of every relevance map, denoised, and groups of (near-)identical maps.

- **where** the relevance lies: the map sum-pooled to ``pooled_size`` and normalised (``audits.pooling``);
- **latent**: what the model used, wherever it lay: the relevance of the channels of a few layers, pooled over
  positions (``attribute.latent_layers``, ``attribute.latent_pool``), each layer as shares of its |R| (signed);
  given, not computed from maps;
- **what shape** it has wherever it lies: the autocorrelation of the map's |R| (Wiener-Khinchin: the inverse
  Fourier transform of its power spectrum), pooled to ``SHAPE_SIZE`` and cut to offsets of at most ``SHAPE_RADIUS``
  cells. It does not change when the map moves, so a cue at a different place in every image (a patch, a sticker)
  still gathers its maps, while the *where* view keeps cues at a fixed place (a stamp, a frame) apart.

Each view is scaled to unit total variance before they are joined, so neither drowns the other whatever its
dimension. Then PCA keeps the components above the Marchenko-Pastur edge of the noise (Gavish & Donoho's idea: the
noise level is read off the median eigenvalue), so pixel noise, which spreads over all components, no longer
decides who is whose neighbour; at least ``MIN_COMPONENTS`` are kept.
"""

from __future__ import annotations

import numpy as np
from scipy import integrate, optimize

from .pooling import normalize_maps, sum_pool

__all__ = ["VIEWS", "PIXEL_VIEWS", "relevance_features", "shape_view", "latent_view", "denoise", "duplicate_groups"]

VIEWS = ("where", "shape", "latent")
PIXEL_VIEWS = ("where", "shape")  # what the maps alone give (no latent relevance stored): the default
SHAPE_SIZE = 16  # the shape view's resolution: enough for a patch of a few percent of the image to keep its form
SHAPE_RADIUS = 4  # offsets (cells) kept: a quarter of the map, where the shape of one blob shows
MIN_COMPONENTS = 10


SHAPE_CHUNK = 4096  # maps per FFT batch (memory: ~120 MB of spectra per chunk at the default size)


def shape_view(maps: np.ndarray, size: int = SHAPE_SIZE, radius: int = SHAPE_RADIUS) -> np.ndarray:
    """Translation-invariant shape of each map: the autocorrelation of its |R| share map, ``(N, (2r + 1)^2)``.

    Computed in chunks of ``SHAPE_CHUNK`` maps: the zero-padded spectra of all maps at once would hold ~30 KB per
    map (3 GB at 100k maps) for an output of (2r + 1)^2 numbers each."""
    pooled = np.abs(sum_pool(maps, min(size, maps.shape[1], maps.shape[2])))
    h, w = pooled.shape[1:]
    ry, rx = min(radius, h - 1), min(radius, w - 1)
    out = np.empty((len(maps), (2 * ry + 1) * (2 * rx + 1)), dtype=np.float64)
    for start in range(0, len(maps), SHAPE_CHUNK):
        chunk = pooled[start : start + SHAPE_CHUNK].astype(np.float64)
        total = chunk.sum((1, 2), keepdims=True)
        chunk /= np.where(total > 0, total, 1.0)
        spectrum = np.fft.rfft2(chunk, s=(2 * h, 2 * w))  # zero padded: a linear, not circular, correlation
        correlation = np.fft.fftshift(np.fft.irfft2(np.abs(spectrum) ** 2, s=(2 * h, 2 * w)), axes=(1, 2))
        window = correlation[:, h - ry : h + ry + 1, w - rx : w + rx + 1]
        out[start : start + len(chunk)] = window.reshape(len(chunk), -1)
    return out


def _unit_variance(features: np.ndarray) -> np.ndarray:
    centred = features - features.mean(0)
    total = np.sqrt((centred**2).sum() / max(len(features), 1))
    return features / total if total > 0 else features


def latent_view(latent: list[np.ndarray]) -> np.ndarray:
    """``(N, sum C)``: each layer's channel relevance as shares of its total |R| (signed: evidence against the class
    stays apart from evidence for it), each layer at unit total variance, joined."""
    parts = []
    for layer in latent:
        layer = np.asarray(layer, dtype=np.float64)
        total = np.abs(layer).sum(1, keepdims=True)
        parts.append(_unit_variance(layer / np.where(total > 0, total, 1.0)))
    return np.hstack(parts)


def relevance_features(
    maps: np.ndarray,
    pooled_size: int | None,
    normalization: str = "abs",
    views: tuple[str, ...] = PIXEL_VIEWS,
    shape: np.ndarray | None = None,
    latent: list[np.ndarray] | None = None,
) -> np.ndarray:
    """``(N, D)`` float64 features of ``(N, H, W)`` maps: the chosen views, each at unit total variance, joined
    (``shape``: the shape view if already computed; ``latent``: per layer ``(N, C)`` channel relevance, needed for
    the latent view)."""
    unknown = sorted(set(views) - set(VIEWS))
    if unknown or not views:
        raise ValueError(f"views must be a non-empty subset of {VIEWS}; got {views}")
    if "latent" in views and not latent:
        raise ValueError("the latent view needs latent relevance (explain(..., latent=...) per layer); none given")
    parts = []
    if "where" in views:
        parts.append(normalize_maps(sum_pool(maps, pooled_size), normalization).astype(np.float64))
    if "shape" in views:
        parts.append(shape_view(maps) if shape is None else shape)
    if "latent" in views:
        parts.append(latent_view(latent))
    if len(parts) == 1:
        return parts[0]
    return np.hstack([_unit_variance(p) for p in parts])


def _marchenko_pastur_median(ratio: float) -> float:
    """Median of the Marchenko-Pastur law with aspect ratio ``ratio`` <= 1 (unit noise variance)."""
    low, high = (1 - np.sqrt(ratio)) ** 2, (1 + np.sqrt(ratio)) ** 2

    def density(x):
        return np.sqrt(max((high - x) * (x - low), 0.0)) / (2 * np.pi * ratio * x)

    return optimize.brentq(lambda m: integrate.quad(density, low, m, limit=200)[0] - 0.5, low, high)


def denoise(features: np.ndarray, min_components: int = MIN_COMPONENTS) -> tuple[np.ndarray, int]:
    """PCA scores of the components above the noise's Marchenko-Pastur edge, and how many were kept."""
    centred = features - features.mean(0)
    n, d = centred.shape
    if min(n, d) <= min_components:
        return centred, d
    # eigendecomposition of the smaller Gram side (D x D covariance, or N x N when fewer maps than dimensions)
    if n >= d:
        eigenvalues, vectors = np.linalg.eigh(centred.T @ centred / n)
        eigenvalues, vectors = eigenvalues[::-1], vectors[:, ::-1]
    else:
        eigenvalues, left = np.linalg.eigh(centred @ centred.T / n)
        eigenvalues, left = eigenvalues[::-1], left[:, ::-1]
    eigenvalues = np.maximum(eigenvalues, 0.0)
    ratio = min(n, d) / max(n, d)
    positive = eigenvalues[eigenvalues > eigenvalues.max() * 1e-12]
    sigma2 = np.median(positive) / _marchenko_pastur_median(ratio) if len(positive) else 0.0
    edge = sigma2 * (1 + np.sqrt(ratio)) ** 2
    keep = int(np.clip((eigenvalues > edge).sum(), min_components, len(eigenvalues)))
    if n >= d:
        return centred @ vectors[:, :keep], keep
    return left[:, :keep] * np.sqrt(eigenvalues[:keep] * n), keep


def duplicate_groups(distances: np.ndarray, indices: np.ndarray, tolerance: float = 0.1) -> np.ndarray:
    """Group ids of maps closer than ``tolerance`` x the median distance to the nearest *other* map.

    ``distances``/``indices`` are each map's nearest neighbours (ascending). Exact and near copies (the same image
    twice, all-zero maps) would otherwise form kNN cliques that look like strategies of their own.
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(distances)
    nonzero = distances[distances > 0]
    scale = np.median(nonzero) if len(nonzero) else 0.0
    close = distances <= tolerance * scale
    rows = np.repeat(np.arange(n), distances.shape[1])[close.ravel()]
    cols = indices.ravel()[close.ravel()]
    graph = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    return connected_components(graph, directed=False)[1]
