"""SpRAy: spectral clustering of relevance maps with eigengap analysis (scikit-learn style estimator).

>>> import numpy as np
>>> from audits import SpRAy
>>> rng = np.random.default_rng(0)
>>> maps = rng.random((300, 8, 8)); maps[:100, :2, :2] += 5   # a third of the maps look at one corner
>>> s = SpRAy(random_state=0, embeddings=()).fit(maps)
>>> s.n_clusters_
2

How each default holds on maps it was not tuned on (sizes 16-224 px, noise, per-map scale, strategies down to 5%,
disconnected strategies, near-duplicate and all-zero maps) is measured by ``benchmarks/spray_planted.py``;
``docs/spray.md`` says why each default is what it is.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from . import embedding
from .features import PIXEL_VIEWS, denoise, duplicate_groups, relevance_features, shape_view
from .graph import WEIGHTINGS, knn_affinity, neighbors, spectral_embedding
from .pooling import normalize_maps, sum_pool
from .refinement import refine_normalized_cut
from .strategies import ClassGraph, GainNull, NullModel, Strategy, find_strategies, null_cuts

__all__ = ["SpRAy", "choose_k"]

GAP_RATIO = 4.5


def _ratios(eigenvalues: np.ndarray, tiny: float = 1e-10) -> np.ndarray:
    """``ratios[k - 1] = lambda_{k+1} / lambda_k`` (1-based): inf where a zero eigenvalue is followed by a nonzero
    one (one more graph component ends there), 1 between two zeros."""
    low, high = eigenvalues[:-1], eigenvalues[1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(low > tiny, high / np.maximum(low, tiny), np.where(high > tiny, np.inf, 1.0))
    return ratios


def choose_k(eigenvalues: np.ndarray, k_max: int, ratio: float = GAP_RATIO) -> tuple[int, np.ndarray]:
    """The number of clusters: the *largest* k in [2, k_max] after which the spectrum jumps by ``ratio``.

    Beyond the clusters' eigenvalues a class's spectrum is a continuum: a graph that samples a d-dimensional
    manifold has eigenvalues growing like j^(2/d) (Weyl's law), so its largest step, from its first non-zero
    eigenvalue to the next, is 2^(2/d): 4 for a 1-D continuum (a watermark sliding along an edge, a path graph's
    lambda_3 / lambda_2), 2 for a 2-D one (objects anywhere in the image). A jump by more than ``ratio`` (4.5) is a
    group of maps better connected to each other than to the rest. The last such jump, not the largest, is taken:
    clusters that are almost (or fully) disconnected have eigenvalues orders of magnitude apart, and the largest
    ratio would stop among them. Separate graph components (zero eigenvalues) each count. No jump: 2.
    """
    ratios = _ratios(eigenvalues)
    top = min(k_max, len(ratios))
    candidates = [k for k in range(2, top + 1) if ratios[k - 1] >= ratio]
    if candidates:
        return max(candidates), ratios
    zeros = int((eigenvalues <= 1e-10).sum())
    return (min(zeros, top) if zeros > top else 2), ratios


def _median_by(values: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    order = np.argsort(groups, kind="stable")
    bounds = np.searchsorted(groups[order], np.arange(n_groups + 1))
    return np.array([np.median(values[order[a:b]]) for a, b in zip(bounds[:-1], bounds[1:])])


class SpRAy:
    """Spectral Relevance Analysis of one class's relevance maps.

    Parameters (defaults chosen to hold across map sizes, noise levels and cue types; see ``docs/spray.md``):
        pooled_size: the *where* view is sum-pooled to this size (None: as given). 8 keeps where a stamp, a frame
            or a region is while sum pooling averages pixel noise away (a 64x64 cell of noise drops to 1/8).
        normalization: "abs" (default; where relevance lies), "signed" or "max" (see ``audits.pooling``).
        views: "where" (the pooled map) and "shape" (its translation-invariant autocorrelation); both by default,
            so cues at a fixed place and cues that move (a patch anywhere) are both strategies. "latent": the
            channel relevance of latent layers, passed to ``fit(maps, latent=...)``: what the model used wherever it
            lay; the spray stage uses it alone when the store holds it (``docs/spray.md``, "The latent view").
        denoise: keep the PCA components above the noise's Marchenko-Pastur edge (``audits.features``).
        n_neighbors: kNN graph degree; None: ``clip(sqrt(N) / 2, 10, 32)``.
        k_max: largest number of clusters the eigengap may choose (and the top of ``labels_by_k_``).
        n_eigenvalues: how many of the smallest Laplacian eigenvalues to compute (None: ``k_max + 8``).
        weighting: edge weights, "local" (local scaling, Zelnik-Manor & Perona; default), "connectivity" or
            "heat" (``audits.graph``).
        gap_ratio: the spectral jump that marks the end of the clusters (:func:`choose_k`).
        refine: move nodes from k-means' clusters at the chosen k to where they lower the graph's normalised cut
            (``audits.refinement``): k-means splits the eigenvector coordinates, the cut is what the graph holds.
            ``labels_by_k_`` at the other k are k-means' own.
        approximate: None: exact neighbours up to 20,000 maps, NN-descent above; or force with True/False.
        stability_seeds: extra seeds for the eigensolver's start vector and k-means; ``stability_`` reports how
            often they agree with the chosen k and the mean ARI of their labels.
        embeddings: which 2-D embeddings to compute for a look: any of "tsne", "umap" (seeded).
        random_state: seed of everything random.

    All-zero maps carry no strategy: they are left out of the graph and form one cluster of their own, numbered
    after the others (in ``labels_`` and every ``labels_by_k_``, and counted in ``n_clusters_``).

    Attributes (after ``fit``): ``maps_`` (the normalised *where* maps, for mean maps), ``features_`` (what the
    graph is built on, non-zero maps only), ``n_components_`` (denoised dimensions), ``eigenvalues_`` (ascending),
    ``gaps_`` (ratios ``lambda_{k+1} / lambda_k``), ``n_clusters_``, ``gap_strength_`` (the ratio at the chosen k),
    ``stability_``, ``labels_``, ``labels_by_k_``, ``embedding_`` (dict), ``n_neighbors_``, ``affinity_`` (on
    distinct maps), ``inverse_`` (each non-zero map's node in it), ``relevance_sum_`` (each map's sum: the
    explained logit, by conservation), ``graph_`` and ``null_cuts_`` (for :meth:`strategies`).
    """

    def __init__(
        self,
        pooled_size: int | None = 8,
        normalization: str = "abs",
        views: tuple[str, ...] = PIXEL_VIEWS,
        denoise: bool = True,
        n_neighbors: int | None = None,
        k_max: int = 8,
        n_eigenvalues: int | None = None,
        weighting: str = "local",
        gap_ratio: float = GAP_RATIO,
        refine: bool = True,
        approximate: bool | None = None,
        stability_seeds: int = 3,
        embeddings: tuple[str, ...] = ("tsne", "umap"),
        random_state: int = 0,
    ):
        self.pooled_size = pooled_size
        self.normalization = normalization
        self.views = views
        self.denoise = denoise
        self.n_neighbors = n_neighbors
        self.k_max = k_max
        self.n_eigenvalues = n_eigenvalues
        self.weighting = weighting
        self.gap_ratio = gap_ratio
        self.refine = refine
        self.approximate = approximate
        self.stability_seeds = stability_seeds
        self.embeddings = embeddings
        self.random_state = random_state

    def _check_latent(self, latent, n: int) -> list[np.ndarray] | None:
        if "latent" not in self.views:
            return None
        if latent is None:
            raise ValueError("views include 'latent': pass fit(maps, latent=[(N, C) array per layer])")
        layers = [latent] if isinstance(latent, np.ndarray) and latent.ndim == 2 else list(latent)
        for i, layer in enumerate(layers):
            layer = np.asarray(layer)
            if layer.ndim != 2 or len(layer) != n:
                raise ValueError(f"latent layer {i} must be ({n}, channels); got shape {layer.shape}")
            bad = np.flatnonzero(~np.isfinite(layer).all(1))
            if len(bad):
                raise ValueError(f"latent layer {i} contains NaN or inf at maps {bad[:10].tolist()}")
        return [np.asarray(layer) for layer in layers]

    def _check(self, maps) -> np.ndarray:
        maps = np.asarray(maps)
        if maps.ndim == 4:
            maps = maps.sum(1)  # channel sum
        if maps.ndim != 3:
            raise ValueError(f"maps must be (N, H, W) or (N, C, H, W); got shape {maps.shape}")
        bad = np.flatnonzero(~np.isfinite(maps.reshape(len(maps), -1)).all(1))
        if len(bad):
            raise ValueError(f"maps contain NaN or inf at indices {bad[:10].tolist()}")
        if len(maps) < 3:
            raise ValueError(f"SpRAy needs at least 3 maps to find 2 clusters; got {len(maps)}")
        unknown = set(self.embeddings) - {"tsne", "umap"}
        if unknown:
            raise ValueError(f"unknown embeddings {sorted(unknown)}; choose from ('tsne', 'umap')")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {self.weighting!r}")
        if not self.gap_ratio > 1:
            raise ValueError(f"gap_ratio must be above 1; got {self.gap_ratio}")
        # float32 maps (half the memory of float64 at 10^5 maps); the graph and spectrum are float64
        return maps.astype(np.float32, copy=False)

    def fit(self, maps, latent=None) -> SpRAy:
        """Cluster ``maps`` ``(N, H, W)``; ``latent``: per layer ``(N, C)`` channel relevance (the latent view)."""
        maps = self._check(maps)
        n = len(maps)
        latent = self._check_latent(latent, n)
        self.relevance_sum_ = maps.reshape(n, -1).sum(1, dtype=np.float64)
        zero = np.abs(maps).reshape(n, -1).max(1) == 0
        live = np.flatnonzero(~zero)
        if len(live) < 3:
            raise ValueError(f"SpRAy needs at least 3 maps that are not all zero; got {len(live)} of {n}")
        if zero.any():
            warnings.warn(f"{int(zero.sum())} maps are all zero: they form a cluster of their own", stacklevel=2)
        where = normalize_maps(sum_pool(maps[live], self.pooled_size), self.normalization)
        side = sum_pool(maps[:1], self.pooled_size).shape[1:]
        self.maps_ = np.zeros((n, *side), dtype=np.float32)
        self.maps_[live] = where.reshape(len(live), *side)
        shape = shape_view(maps[live])
        features = relevance_features(
            maps[live], self.pooled_size, self.normalization, tuple(self.views), shape,
            None if latent is None else [layer[live] for layer in latent],
        )  # fmt: skip
        self.features_, self.n_components_ = denoise(features) if self.denoise else (features, features.shape[1])

        m = len(live)
        k_max = min(self.k_max, m - 1)
        n_eig = self.n_eigenvalues or self.k_max + 8
        if n_eig > m - 1 or k_max < self.k_max:
            warnings.warn(f"only {m} maps: eigenvalues clamped to {min(n_eig, m - 1)}, k_max to {k_max}", stacklevel=2)
        neighbors_wanted = self.n_neighbors or int(np.clip(round(np.sqrt(m) / 2), 10, 32))
        self.n_neighbors_ = min(neighbors_wanted, m - 1)
        approximate = m > 20_000 if self.approximate is None else self.approximate
        self._build_graph(approximate)
        nodes = self.affinity_.shape[0]
        n_eig = max(min(n_eig, nodes - 1), 2)
        k_max = max(2, min(k_max, n_eig - 1, nodes - 1)) if n_eig > 2 else 2
        self.eigenvalues_, vectors, _ = spectral_embedding(self.affinity_, n_eig, self.random_state)
        self._vectors = vectors
        k, self.gaps_ = choose_k(self.eigenvalues_, k_max, self.gap_ratio) if n_eig > 2 else (2, np.ones(1))
        k = int(min(k, nodes))
        self.gap_strength_ = float(self.gaps_[k - 1]) if len(self.gaps_) >= k else 1.0
        # only the chosen k's clusters are tested, so only they are refined on the graph; the other k's stay
        # k-means' own, for a look (refining all of them cost 12 s of a 160-s fit at 100,000 maps)
        node_labels = {
            j: self._cluster(vectors, j, self.random_state, refine=j == k) for j in range(2, min(k_max, nodes) + 1)
        }
        self._live, self._zero = live, np.flatnonzero(zero)
        self.labels_by_k_ = {j: self._with_zeros(labels[self.inverse_], j) for j, labels in node_labels.items()}
        self.n_clusters_ = k + int(zero.any())  # all-zero maps: one more cluster, numbered last
        self.labels_ = self.labels_by_k_[k]
        self.stability_ = self._stability(n_eig, k_max, k)
        relevance = self.relevance_sum_[live]
        relevance = relevance if nodes == m else _median_by(relevance, self.inverse_, nodes)
        if nodes < m:  # a node's shape: the mean of its maps'
            summed = np.zeros((nodes, shape.shape[1]))
            np.add.at(summed, self.inverse_, shape)
            shape = summed / self._counts[:, None]
        extra = {k: int(zero.sum())} if zero.any() else {}
        self.graph_ = ClassGraph(self.affinity_, node_labels[k], self._counts, relevance, extra, shape)
        self.null_cuts_ = null_cuts(self.graph_)
        self.embedding_ = {name: self._place(self._embed(name, k)[self.inverse_]) for name in self.embeddings}
        return self

    def _with_zeros(self, live_labels: np.ndarray, k: int) -> np.ndarray:
        labels = np.full(len(self._live) + len(self._zero), k, dtype=np.int64)
        labels[self._live] = live_labels
        return labels

    def _place(self, coords: np.ndarray) -> np.ndarray:
        """Embedding of every map: all-zero maps share a point just off the others' lower-left corner."""
        out = np.empty((len(self._live) + len(self._zero), 2))
        out[self._live] = coords
        if len(self._zero):
            low, span = coords.min(0), np.ptp(coords, 0)
            out[self._zero] = low - 0.1 * np.where(span > 0, span, 1.0)
        return out

    def _build_graph(self, approximate: bool) -> None:
        """kNN graph on distinct maps: near-duplicates share one node whose self-loop carries their multiplicity."""
        distances, indices = neighbors(self.features_, self.n_neighbors_, approximate, self.random_state)
        groups = duplicate_groups(distances, indices)
        n_groups = int(groups.max()) + 1
        if n_groups == len(groups):
            self.inverse_, self._counts = np.arange(len(groups)), np.ones(len(groups), dtype=np.int64)
            self.affinity_ = knn_affinity(
                self.features_, self.n_neighbors_, approximate, self.random_state, self.weighting,
                precomputed=(distances, indices),
            )  # fmt: skip
            return
        first = np.full(n_groups, len(groups))
        np.minimum.at(first, groups, np.arange(len(groups)))
        order = np.argsort(first)  # nodes in the order of their first map
        rank = np.empty(n_groups, dtype=np.int64)
        rank[order] = np.arange(n_groups)
        self.inverse_ = rank[groups]
        self._counts = np.bincount(self.inverse_, minlength=n_groups)
        if n_groups < 3:
            raise ValueError("all maps are (near-)identical: there is nothing to cluster")
        k = min(self.n_neighbors_, n_groups - 1)
        affinity = knn_affinity(self.features_[first[order]], k, approximate, self.random_state, self.weighting)
        degree = np.asarray(affinity.sum(1)).ravel()
        self.affinity_ = (affinity + sp.diags((self._counts - 1) * degree)).tocsr()

    def _cluster(self, vectors: np.ndarray, k: int, seed: int, refine: bool = True) -> np.ndarray:
        """k-means on the row-normalised first k eigenvectors (node multiplicities as weights), refined on the graph
        when ``refine`` and :attr:`refine` (node moves that lower the normalised cut, ``audits.refinement``);
        labels by size."""
        points = vectors[:, :k]
        points = points / np.maximum(np.linalg.norm(points, axis=1, keepdims=True), 1e-12)
        labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(points, sample_weight=self._counts).labels_
        if refine and self.refine:
            labels = refine_normalized_cut(self.affinity_, labels, k)
        sizes = np.bincount(labels, weights=self._counts, minlength=k)
        order = np.argsort(-sizes, kind="stable")  # 0 = largest, so labels compare across seeds and runs
        return np.argsort(order)[labels]

    def _stability(self, n_eig: int, k_max: int, k: int) -> dict:
        if not self.stability_seeds:
            return {"seeds": 0, "k_agreement": 1.0, "mean_ari": 1.0}
        ks, aris = [], []
        for offset in range(1, self.stability_seeds + 1):
            seed = self.random_state + offset
            values, vectors, _ = spectral_embedding(self.affinity_, n_eig, seed)
            ks.append(choose_k(values, k_max, self.gap_ratio)[0] if n_eig > 2 else 2)
            labels = self._cluster(vectors, k, seed)[self.inverse_]
            aris.append(adjusted_rand_score(self.labels_[self._live], labels))
        return {
            "seeds": self.stability_seeds,
            "k_agreement": float(np.mean(np.array(ks) == k)),
            "mean_ari": float(np.mean(aris)),
        }

    def strategies(
        self,
        false_alarm_rate: float = 0.05,
        null: NullModel | None = None,
        n_tests: int | None = None,
        gains: GainNull | None = None,
    ) -> list[Strategy]:
        """The class's strategies and their Clever-Hans evidence (``audits.strategies``). Alone, a class uses its
        own nulls (isolation and gain, from :attr:`null_cuts_`) and ``n_tests`` = its number of clusters; an audit
        pools them over its classes (``audits.clever_hans.audit_strategies``)."""
        null = null or NullModel.fit(self.null_cuts_)
        gains = gains or GainNull.fit(self.null_cuts_)
        threshold = false_alarm_rate / (n_tests or self.n_clusters_)
        return find_strategies(self.graph_, null, threshold, false_alarm_rate, gains)

    def _embed(self, name: str, k: int) -> np.ndarray:
        # embed the spectral coordinates: few dimensions, and the geometry the clusters were found in
        vectors = self._vectors
        points = vectors[:, : max(k + 2, min(10, vectors.shape[1]))]
        n = len(points)
        if name == "tsne":
            return embedding.tsne(points, self.random_state)
        return embedding.umap(points, min(15, n - 1), self.random_state)
