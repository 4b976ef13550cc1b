"""SpRAy: spectral clustering of relevance maps with eigengap analysis (scikit-learn style estimator).

>>> import numpy as np
>>> from audits import SpRAy
>>> rng = np.random.default_rng(0)
>>> maps = rng.random((300, 8, 8)); maps[:100, :2, :2] += 5   # a third of the maps look at one corner
>>> s = SpRAy(random_state=0, embeddings=()).fit(maps)
>>> s.n_clusters_
2
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.linalg import eigh
from scipy.sparse.linalg import eigsh
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from sklearn.neighbors import NearestNeighbors

from .pooling import normalize_maps, sum_pool

__all__ = ["SpRAy", "knn_affinity", "spectral_embedding"]


def knn_affinity(features: np.ndarray, n_neighbors: int, approximate: bool, random_state: int, heat_kernel: bool):
    """Sparse symmetric kNN graph (never N x N dense): exact neighbours, or NN-descent for large N."""
    n = len(features)
    if approximate:
        from pynndescent import NNDescent

        index = NNDescent(features, n_neighbors=n_neighbors + 1, random_state=random_state, n_jobs=1)
        neighbors, distances = index.neighbor_graph
    else:
        from sklearn import config_context

        model = NearestNeighbors(n_neighbors=n_neighbors + 1, algorithm="brute").fit(features)
        with config_context(working_memory=128):  # MB per distance chunk: memory stays O(N k), not O(N^2)
            distances, neighbors = model.kneighbors(features)
    # drop each point itself (usually first; robust to duplicates by masking self-references)
    rows = np.repeat(np.arange(n), neighbors.shape[1])
    cols, dist = neighbors.ravel(), distances.ravel()
    keep = rows != cols
    rows, cols, dist = rows[keep], cols[keep], dist[keep]
    if heat_kernel:
        sigma = np.median(dist[dist > 0]) if (dist > 0).any() else 1.0
        weights = np.exp(-((dist / sigma) ** 2))
    else:
        weights = np.ones_like(dist)
    graph = sp.csr_matrix((weights, (rows, cols)), shape=(n, n))
    return graph.maximum(graph.T).tocsr()


def spectral_embedding(affinity: sp.csr_matrix, n_eigenvalues: int, random_state: int):
    """Smallest eigenvalues (ascending) and eigenvectors of the normalised Laplacian ``I - D^-1/2 A D^-1/2``.

    Computed as the *largest* eigenpairs of ``D^-1/2 A D^-1/2`` (the same vectors; Lanczos converges there fast),
    which is the right end of the Laplacian's spectrum; dense ``eigh`` for tiny graphs.
    """
    n = affinity.shape[0]
    degree = np.asarray(affinity.sum(1)).ravel()
    inv_sqrt = 1.0 / np.sqrt(np.maximum(degree, 1e-12))
    normalized = sp.diags(inv_sqrt) @ affinity @ sp.diags(inv_sqrt)
    k = min(n_eigenvalues, n - 1)
    if n <= max(4 * k, 64):
        values, vectors = eigh(normalized.toarray())
        values, vectors = values[::-1][:k], vectors[:, ::-1][:, :k]
    else:
        v0 = np.random.default_rng(random_state).uniform(-1, 1, n)
        values, vectors = eigsh(normalized, k=k, which="LA", v0=v0, tol=1e-10, maxiter=max(1000, 20 * n))
        order = np.argsort(values)[::-1]
        values, vectors = values[order], vectors[:, order]
    return np.clip(1.0 - values, 0.0, 2.0), vectors


def _row_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


@dataclass
class _Eigengap:
    k: int
    gaps: np.ndarray
    strength: float


def _eigengap(eigenvalues: np.ndarray, k_max: int, relative: bool = True) -> _Eigengap:
    """k = argmax over k in [2, k_max] of the gap after k eigenvalues (0-based ``lambda_k - lambda_{k-1}``).

    ``relative`` (default) divides each gap by ``lambda_k``: scale-free, and a graph with c connected components
    (c zero eigenvalues, the strongest structure there is) gets the maximal relative gap 1 at k = c.
    """
    gaps = np.diff(eigenvalues)  # gaps[i] = lambda_{i+1} - lambda_i: the gap after i+1 eigenvalues
    if relative:
        upper = eigenvalues[1:]
        gaps = np.where(upper > 1e-9, gaps / np.maximum(upper, 1e-12), 0.0)
    candidates = np.arange(2, min(k_max, len(eigenvalues) - 1) + 1)
    k = int(candidates[np.argmax(gaps[candidates - 1])])
    others = np.delete(gaps[: candidates[-1]], k - 1)
    strength = float(gaps[k - 1] / max(np.median(others), 1e-12)) if len(others) else float("inf")
    return _Eigengap(k, gaps, strength)


class SpRAy:
    """Spectral Relevance Analysis of one class's relevance maps.

    Parameters (defaults chosen for 10^2-10^5 maps of one class):
        pooled_size: maps are sum-pooled to this size first (None: as given). 16-32 keeps the spatial layout that
            tells strategies apart while washing out pixel noise.
        normalization: "abs" (default; where relevance lies), "signed" or "max" (see ``audits.pooling``).
        n_neighbors: kNN graph degree; None: ``clip(sqrt(N) / 2, 10, 32)``, enough to connect a strategy's maps,
            few enough that small strategies (5-10% of a class) keep their own neighbourhoods.
        k_max: largest number of clusters the eigengap may choose (and the top of ``labels_by_k_``).
        n_eigenvalues: how many of the smallest Laplacian eigenvalues to compute (None: ``k_max + 8``).
        heat_kernel: weight edges by ``exp(-(d / median d)^2)`` instead of 1.
        relative_gap: choose k by the relative gap ``(lambda_k - lambda_{k-1}) / lambda_k`` (default) or the
            absolute one; relative gaps do not depend on the spectrum's scale, which varies with N and the graph.
        approximate: None: exact neighbours up to 20,000 maps, NN-descent above; or force with True/False.
        stability_seeds: extra seeds for the eigensolver's start vector and k-means; ``stability_`` reports how
            often they agree with the chosen k and the mean ARI of their labels.
        embeddings: which 2-D embeddings to compute for a look: any of "tsne", "umap" (seeded).
        random_state: seed of everything random.

    Attributes (after ``fit``): ``features_``, ``eigenvalues_`` (ascending), ``eigenvectors_``, ``gaps_``,
    ``n_clusters_``, ``gap_strength_``, ``stability_``, ``labels_``, ``labels_by_k_``, ``embedding_`` (dict),
    ``n_neighbors_``, ``affinity_``.
    """

    def __init__(
        self,
        pooled_size: int | None = None,
        normalization: str = "abs",
        n_neighbors: int | None = None,
        k_max: int = 8,
        n_eigenvalues: int | None = None,
        heat_kernel: bool = False,
        relative_gap: bool = True,
        approximate: bool | None = None,
        stability_seeds: int = 3,
        embeddings: tuple[str, ...] = ("tsne", "umap"),
        random_state: int = 0,
    ):
        self.pooled_size = pooled_size
        self.normalization = normalization
        self.n_neighbors = n_neighbors
        self.k_max = k_max
        self.n_eigenvalues = n_eigenvalues
        self.heat_kernel = heat_kernel
        self.relative_gap = relative_gap
        self.approximate = approximate
        self.stability_seeds = stability_seeds
        self.embeddings = embeddings
        self.random_state = random_state

    def fit(self, maps) -> SpRAy:
        maps = np.asarray(maps)
        if maps.ndim == 4:
            maps = maps.sum(1)  # channel sum
        if maps.ndim != 3:
            raise ValueError(f"maps must be (N, H, W) or (N, C, H, W); got shape {maps.shape}")
        bad = np.flatnonzero(~np.isfinite(maps.reshape(len(maps), -1)).all(1))
        if len(bad):
            raise ValueError(f"maps contain NaN or inf at indices {bad[:10].tolist()}")
        n = len(maps)
        if n < 3:
            raise ValueError(f"SpRAy needs at least 3 maps to find 2 clusters; got {n}")
        unknown = set(self.embeddings) - {"tsne", "umap"}
        if unknown:
            raise ValueError(f"unknown embeddings {sorted(unknown)}; choose from ('tsne', 'umap')")
        # float32 features (half the memory of float64 at 10^5 maps); the graph and spectrum are float64
        pooled = sum_pool(maps.astype(np.float32, copy=False), self.pooled_size)
        self.features_ = normalize_maps(pooled, self.normalization)
        k_max = min(self.k_max, n - 1)
        n_eig = self.n_eigenvalues or self.k_max + 8
        if n_eig > n - 1 or k_max < self.k_max:
            warnings.warn(f"only {n} maps: eigenvalues clamped to {min(n_eig, n - 1)}, k_max to {k_max}", stacklevel=2)
        n_eig = max(min(n_eig, n - 1), 2)
        k_max = max(2, min(k_max, n_eig - 1)) if n_eig > 2 else 2
        neighbors = self.n_neighbors or int(np.clip(round(np.sqrt(n) / 2), 10, 32))
        self.n_neighbors_ = min(neighbors, n - 1)
        approximate = n > 20_000 if self.approximate is None else self.approximate
        self.affinity_ = knn_affinity(
            self.features_, self.n_neighbors_, approximate, self.random_state, self.heat_kernel
        )
        self.eigenvalues_, self.eigenvectors_ = spectral_embedding(self.affinity_, n_eig, self.random_state)
        gap = (
            _eigengap(self.eigenvalues_, k_max, self.relative_gap)
            if n_eig > 2
            else _Eigengap(2, np.diff(self.eigenvalues_), 0.0)
        )
        self.gaps_, self.n_clusters_, self.gap_strength_ = gap.gaps, gap.k, gap.strength
        self.labels_by_k_ = {k: self._cluster(self.eigenvectors_, k, self.random_state) for k in range(2, k_max + 1)}
        self.labels_ = self.labels_by_k_[self.n_clusters_]
        self.stability_ = self._stability(n_eig, k_max)
        self.embedding_ = {name: self._embed(name) for name in self.embeddings}
        return self

    @staticmethod
    def _cluster(vectors: np.ndarray, k: int, seed: int) -> np.ndarray:
        points = _row_normalize(vectors[:, :k])
        labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(points)
        # name clusters by size (0 = largest) so labels are comparable across seeds and runs
        order = np.argsort(-np.bincount(labels, minlength=k), kind="stable")
        return np.argsort(order)[labels]

    def _stability(self, n_eig: int, k_max: int) -> dict:
        if not self.stability_seeds:
            return {"seeds": 0, "k_agreement": 1.0, "mean_ari": 1.0}
        ks, aris = [], []
        for offset in range(1, self.stability_seeds + 1):
            seed = self.random_state + offset
            values, vectors = spectral_embedding(self.affinity_, n_eig, seed)
            k = _eigengap(values, k_max, self.relative_gap).k if n_eig > 2 else 2
            ks.append(k)
            aris.append(adjusted_rand_score(self.labels_, self._cluster(vectors, self.n_clusters_, seed)))
        return {
            "seeds": self.stability_seeds,
            "k_agreement": float(np.mean(np.array(ks) == self.n_clusters_)),
            "mean_ari": float(np.mean(aris)),
        }

    def _embed(self, name: str) -> np.ndarray:
        # embed the spectral coordinates: few dimensions, and the geometry the clusters were found in
        points = self.eigenvectors_[:, : max(self.n_clusters_ + 2, min(10, self.eigenvectors_.shape[1]))]
        n = len(points)
        if name == "tsne":
            from sklearn.manifold import TSNE

            perplexity = float(np.clip((n - 1) / 3, 2, 30))
            return TSNE(2, perplexity=perplexity, init="pca", random_state=self.random_state).fit_transform(points)
        import umap

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # umap warns that a seed disables parallelism: that is the point
            reducer = umap.UMAP(n_neighbors=min(15, n - 1), random_state=self.random_state, n_jobs=1)
            return reducer.fit_transform(points)
