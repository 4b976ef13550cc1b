"""Relevance-conserving pooling and per-map normalisation of heatmaps (numpy only)."""

from __future__ import annotations

import warnings

import numpy as np

__all__ = ["sum_pool_matrix", "sum_pool", "normalize_maps", "NORMALIZATIONS"]

NORMALIZATIONS = ("abs", "signed", "max")


def sum_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` matrix that spreads each input cell over the output bins it overlaps; columns sum to one,
    so ``A @ R @ B.T`` is a relevance-conserving sum pooling for any sizes (plain block sums when they divide)."""
    if n_in < 1 or n_out < 1:
        raise ValueError(f"pooling sizes must be positive; got {n_in} -> {n_out}")
    matrix = np.zeros((n_out, n_in))
    for i in range(n_in):
        lo, hi = i * n_out / n_in, (i + 1) * n_out / n_in
        for j in range(int(np.floor(lo)), min(int(np.ceil(hi)), n_out)):
            matrix[j, i] = min(hi, j + 1) - max(lo, j)
    return matrix / matrix.sum(0, keepdims=True)


def sum_pool(maps: np.ndarray, size: int | None) -> np.ndarray:
    """``(N, H, W)`` -> ``(N, size, size)`` by sum pooling (``None`` or the same size: unchanged)."""
    n, h, w = maps.shape
    if size is None or (h == size and w == size):
        return maps
    rows, cols = sum_pool_matrix(h, size).astype(maps.dtype), sum_pool_matrix(w, size).astype(maps.dtype)
    return np.einsum("ih,nhw,jw->nij", rows, maps, cols, optimize=True)


def normalize_maps(maps: np.ndarray, how: str = "abs") -> np.ndarray:
    """Per-map normalisation, flattened to ``(N, D)`` float32 features.

    - ``abs`` (default): ``|R| / sum|R|``: where relevance lies, regardless of sign (a distribution per map);
    - ``signed``: ``R / sum|R|``: keeps evidence against the class apart from evidence for it;
    - ``max``: ``R / max|R|``: peak-normalised, as heatmaps are usually displayed.

    All-zero maps stay zero (with a warning): they have no strategy to cluster.
    """
    if how not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}; got {how!r}")
    # one float32 copy, modified in place (at 10^5 maps, float64 temporaries would dominate memory)
    flat = maps.reshape(len(maps), -1).astype(np.float32, copy=True)
    if how == "abs":
        np.abs(flat, out=flat)
        scale = flat.sum(1, dtype=np.float64)
    elif how == "max":
        scale = np.abs(flat).max(1).astype(np.float64)
    else:
        scale = np.abs(flat).sum(1, dtype=np.float64)
    zero = scale == 0
    if zero.any():
        warnings.warn(f"{int(zero.sum())} maps are all zero (e.g. index {int(np.flatnonzero(zero)[0])})", stacklevel=2)
    scale[zero] = 1.0
    flat /= scale[:, None].astype(np.float32)
    return flat
