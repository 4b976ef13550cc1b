"""Seeded 2-D pictures of a class's spectral coordinates: t-SNE and UMAP (for a look; nothing is decided on them).

Both are built for the audit's case, a few hundred to a few thousand points in at most ten dimensions, where their
fixed costs, not their scaling, set the time (measured on two CPU cores, six classes of 500 points:
``benchmarks/embedding_speed.py``, and the run-time table in the README's un-learning section):

- **UMAP**: ``umap.UMAP(...).fit_transform`` builds its fuzzy neighbour graph, on fewer than 4,096 points, from a
  dense distance matrix through numba functions (one compiled in parallel mode) whose first call costs 11-14 s of
  JIT compilation in every process, more than the six layouts take together. The graph is a few lines of numpy
  here (:func:`fuzzy_neighbor_graph`: UMAP's smooth kNN distances and fuzzy union, McInnes et al. 2018, Sec. 3,
  equal to umap's own graph to float rounding, ``tests/test_spray.py``) on exact neighbours; the layout is umap's
  own ``simplicial_set_embedding`` with UMAP's defaults (spectral initialisation, 500 epochs at this size).
- **t-SNE**: scikit-learn's Barnes-Hut t-SNE with 500 iterations (250 of them early exaggeration) instead of its
  default 1,000: half the time, and on the built-in benchmark's six classes the same trustworthiness (0.992-0.996
  at 10 neighbours, either way) and a KL divergence within 0.01; at 3,000 points of five Gaussians 0.9806 vs
  0.9813. openTSNE's default is 750.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp

__all__ = ["TSNE_ITERATIONS", "fuzzy_neighbor_graph", "tsne", "umap", "umap_layout"]

TSNE_ITERATIONS = 500
_SMOOTH_K_TOLERANCE = 1e-5  # umap's constants, so that the graph is umap's
_MIN_K_DIST_SCALE = 1e-3


def _smooth_knn_distances(distances: np.ndarray, n_iter: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Per point ``(sigma, rho)``: rho the distance to its nearest other point, sigma found by bisection so that
    its memberships exp(-(d - rho) / sigma) to its other k - 1 neighbours sum to log2(k) (umap's smooth_knn_dist
    with local_connectivity 1, run for all points at once)."""
    n, k = distances.shape
    target = np.log2(k)
    positive = np.where(distances > 0, distances, np.inf)
    rho = positive.min(1)
    rho[~np.isfinite(rho)] = 0.0
    rho = rho.astype(distances.dtype)
    lo, hi, mid = np.zeros(n), np.full(n, np.inf), np.ones(n)
    active = np.ones(n, dtype=bool)
    shifted = (distances[:, 1:] - rho[:, None]).astype(np.float64)
    for _ in range(n_iter):
        if not active.any():
            break
        rows = np.flatnonzero(active)
        d = shifted[rows]
        psum = np.where(d > 0, np.exp(-(np.maximum(d, 0) / mid[rows, None])), 1.0).sum(1)
        converged = np.abs(psum - target) < _SMOOTH_K_TOLERANCE
        above = psum > target
        go_down, go_up = rows[above & ~converged], rows[~above & ~converged]
        hi[go_down] = mid[go_down]
        mid[go_down] = (lo[go_down] + hi[go_down]) / 2
        lo[go_up] = mid[go_up]
        mid[go_up] = np.where(np.isinf(hi[go_up]), mid[go_up] * 2, (lo[go_up] + hi[go_up]) / 2)
        active[rows[converged]] = False
    sigma = mid.astype(distances.dtype)
    floor = np.where(rho > 0, distances.mean(1), distances.mean()) * _MIN_K_DIST_SCALE
    return np.maximum(sigma, floor.astype(distances.dtype)), rho


def fuzzy_neighbor_graph(indices: np.ndarray, distances: np.ndarray) -> sp.coo_matrix:
    """UMAP's fuzzy simplicial set from a kNN table (``(N, k)``, each point itself first): the directed
    memberships exp(-(d - rho) / sigma), combined by fuzzy union A + A^T - A * A^T."""
    n, k = indices.shape
    distances = np.asarray(distances, dtype=np.float32)
    sigma, rho = _smooth_knn_distances(distances)
    shifted = distances - rho[:, None]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        values = np.exp(-(shifted / sigma[:, None]))
    values = np.where((shifted <= 0) | (sigma[:, None] == 0), 1.0, values)
    values[indices == np.arange(n)[:, None]] = 0.0
    values[indices < 0] = 0.0
    graph = sp.coo_matrix(
        (values.astype(np.float32).ravel(), (np.repeat(np.arange(n), k), np.maximum(indices, 0).ravel())), shape=(n, n)
    )
    graph.eliminate_zeros()
    transpose = graph.transpose()
    graph = graph + transpose - graph.multiply(transpose)
    graph.eliminate_zeros()
    return graph.tocoo()


def umap(points: np.ndarray, n_neighbors: int, random_state: int) -> np.ndarray:
    """UMAP (umap-learn's defaults: min_dist 0.1, spread 1, spectral initialisation) of ``points``, seeded."""
    from sklearn.neighbors import NearestNeighbors

    points = np.ascontiguousarray(points, dtype=np.float32)
    distances, indices = NearestNeighbors(n_neighbors=n_neighbors).fit(points).kneighbors(points)
    return umap_layout(fuzzy_neighbor_graph(indices, distances), points, random_state)


def umap_layout(graph: sp.spmatrix, points: np.ndarray, random_state: int) -> np.ndarray:
    """umap-learn's layout of a fuzzy graph, with the arguments ``UMAP().fit`` passes (so the same graph gives
    ``UMAP(random_state=...)``'s embedding exactly)."""
    from umap.umap_ import find_ab_params, simplicial_set_embedding

    a, b = find_ab_params(1.0, 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a graph with several components gets a note that the layout places them
        embedding, _ = simplicial_set_embedding(
            np.ascontiguousarray(points, dtype=np.float32), graph, 2, 1.0, a, b, 1.0, 5, None, "spectral",
            np.random.RandomState(random_state), "euclidean", {}, False, {}, False,
        )  # fmt: skip
    return np.asarray(embedding, dtype=np.float32)


def tsne(points: np.ndarray, random_state: int) -> np.ndarray:
    """Barnes-Hut t-SNE of ``points`` (PCA initialisation, perplexity 30 or a third of the points), seeded."""
    from sklearn.manifold import TSNE

    n = len(points)
    perplexity = float(np.clip((n - 1) / 3, 2, 30))
    return TSNE(2, perplexity=perplexity, init="pca", random_state=random_state,
                max_iter=TSNE_ITERATIONS).fit_transform(points)  # fmt: skip
