"""The kNN graph of relevance maps and the smallest eigenpairs of its normalised Laplacian (numpy/scipy only).

Two things here are easy to get wrong and matter for SpRAy:

- **Disconnected graphs.** Strategies that share nothing form separate components of the kNN graph, one zero
  eigenvalue each. A Krylov solver (ARPACK's Lanczos) started from one vector cannot resolve a repeated eigenvalue:
  on the whole graph it reports fewer zeros than there are components, and the eigengap then counts wrong. So the
  spectrum is computed per component (a block-diagonal Laplacian's spectrum is the union of its blocks') and merged.
- **Edge weights.** Plain 0/1 kNN edges tie a small strategy to the large one next to it as strongly as to itself.
  Local scaling (Zelnik-Manor & Perona 2004) weights an edge by ``exp(-d_ij^2 / (s_i s_j))`` with ``s_i`` the
  distance of point ``i`` to its ``scale_neighbor``-th neighbour: dense and sparse strategies each get their own
  scale, and edges that jump between strategies fade.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.linalg import eigh
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import eigsh
from sklearn.neighbors import NearestNeighbors

__all__ = ["WEIGHTINGS", "knn_affinity", "spectral_embedding", "neighbors", "fiedler"]

WEIGHTINGS = ("local", "connectivity", "heat")
SCALE_NEIGHBOR = 7  # Zelnik-Manor & Perona's choice; any small neighbour index works (their Fig. 2)


def neighbors(features: np.ndarray, n_neighbors: int, approximate: bool, random_state: int):
    """``(distances, indices)`` of each point's ``n_neighbors`` nearest others (itself excluded)."""
    n = len(features)
    if approximate:
        from pynndescent import NNDescent

        index = NNDescent(features, n_neighbors=n_neighbors + 1, random_state=random_state, n_jobs=1)
        indices, distances = index.neighbor_graph
    else:
        from sklearn import config_context

        model = NearestNeighbors(n_neighbors=n_neighbors + 1, algorithm="brute").fit(features)
        with config_context(working_memory=128):  # MB per distance chunk: memory stays O(N k), not O(N^2)
            distances, indices = model.kneighbors(features)
    # drop each point itself: usually first, but duplicates can come first instead, so mask by identity
    own = indices == np.arange(n)[:, None]
    drop = np.where(own.any(1), own.argmax(1), n_neighbors)
    keep = np.ones_like(own)
    keep[np.arange(n), drop] = False
    return distances[keep].reshape(n, n_neighbors), indices[keep].reshape(n, n_neighbors)


def knn_affinity(
    features: np.ndarray,
    n_neighbors: int,
    approximate: bool = False,
    random_state: int = 0,
    weighting: str = "local",
    precomputed: tuple[np.ndarray, np.ndarray] | None = None,
) -> sp.csr_matrix:
    """Sparse symmetric kNN affinity (never N x N dense); ``weighting`` is one of :data:`WEIGHTINGS`;
    ``precomputed``: the ``(distances, indices)`` of :func:`neighbors`, if already at hand."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {weighting!r}")
    n = len(features)
    distances, indices = precomputed or neighbors(features, n_neighbors, approximate, random_state)
    rows = np.repeat(np.arange(n), n_neighbors)
    cols, dist = indices.ravel(), distances.ravel().astype(np.float64)
    if weighting == "local":
        scale = distances[:, min(SCALE_NEIGHBOR, n_neighbors) - 1].astype(np.float64)
        floor = np.median(scale[scale > 0]) * 1e-6 if (scale > 0).any() else 1.0
        scale = np.maximum(scale, floor)
        weights = np.exp(-(dist**2) / (scale[rows] * scale[cols]))
    elif weighting == "heat":
        sigma = np.median(dist[dist > 0]) if (dist > 0).any() else 1.0
        weights = np.exp(-((dist / sigma) ** 2))
    else:
        weights = np.ones_like(dist)
    graph = sp.csr_matrix((weights, (rows, cols)), shape=(n, n))
    return graph.maximum(graph.T).tocsr()


def _component_spectrum(normalized: sp.csr_matrix, k: int, random_state: int) -> tuple[np.ndarray, np.ndarray]:
    """Largest ``k`` eigenpairs of a connected block of ``D^-1/2 A D^-1/2`` (descending)."""
    n = normalized.shape[0]
    k = min(k, n)
    if n <= max(4 * k, 64):
        values, vectors = eigh(normalized.toarray())
        return values[::-1][:k], vectors[:, ::-1][:, :k]
    v0 = np.random.default_rng(random_state).uniform(-1, 1, n)
    values, vectors = eigsh(normalized, k=k, which="LA", v0=v0, tol=1e-10, maxiter=max(1000, 20 * n))
    order = np.argsort(values)[::-1]
    return values[order], vectors[:, order]


def spectral_embedding(
    affinity: sp.csr_matrix, n_eigenvalues: int, random_state: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Smallest eigenvalues (ascending) and eigenvectors of ``I - D^-1/2 A D^-1/2``, and each node's component.

    Computed per connected component as the *largest* eigenpairs of ``D^-1/2 A D^-1/2`` (the same vectors; Lanczos
    converges there fast, and it is the right end of the Laplacian's spectrum); dense ``eigh`` for small blocks.
    """
    n = affinity.shape[0]
    n_eig = min(n_eigenvalues, n - 1)
    n_components, component = connected_components(affinity, directed=False)
    degree = np.asarray(affinity.sum(1)).ravel()
    inv_sqrt = 1.0 / np.sqrt(np.maximum(degree, 1e-300))
    normalized = (sp.diags(inv_sqrt) @ affinity @ sp.diags(inv_sqrt)).tocsr()
    values, columns = [], []
    for c in range(n_components):
        members = np.flatnonzero(component == c)
        block_values, block_vectors = _component_spectrum(normalized[members][:, members], n_eig, random_state + c)
        values.append(block_values)
        for j in range(len(block_values)):
            columns.append((members, block_vectors[:, j]))
    values = np.concatenate(values)
    order = np.argsort(-values, kind="stable")[:n_eig]
    vectors = np.zeros((n, len(order)))
    for out, index in enumerate(order):
        members, column = columns[index]
        vectors[members, out] = column
    return np.clip(1.0 - values[order], 0.0, 2.0), vectors, component


def fiedler(affinity: sp.csr_matrix, vector: bool = False, random_state: int = 0):
    """lambda_2 of the normalised Laplacian of ``affinity`` (0 for a disconnected graph), or its eigenvector."""
    n = affinity.shape[0]
    if n < 3:
        return None if vector else np.nan
    values, vectors, _ = spectral_embedding(affinity.tocsr(), 2, random_state)
    return vectors[:, 1] if vector else float(values[1])
