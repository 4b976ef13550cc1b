"""Local refinement of spectral clusters on their graph: node moves that lower the normalised cut.

Spectral clustering solves a relaxation of the normalised cut ``Ncut = sum_c cut(S_c, rest) / vol(S_c)`` and rounds
it with k-means in the eigenvector space; k-means places the boundary where the points' *coordinates* split, not
where the *graph* crosses fewest edges, so nodes on a strategy's border can land on the wrong side (Dhillon, Guan
& Kulis 2004 showed that refining spectral labels on the graph itself lowers the cut further; METIS and Graclus
refine so). The strategies are then tested by the conductance of the cut around them (``audits.strategies``), the
same quantity, so the refinement also makes the tested cut the one the graph holds.

The moves are Louvain-style local moving: every round computes each node's best move (to the cluster that lowers
Ncut most, exactly, with the clusters' volumes and internal weights updated as nodes move), and nodes whose best
move lowers Ncut are moved one at a time in order of that gain, each re-evaluated first. Every move lowers Ncut,
so the result never cuts worse than the k-means labels it starts from, and it stops at a local optimum (no single
move lowers Ncut) or after ``max_rounds`` rounds.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["normalized_cut", "refine_normalized_cut"]

MAX_ROUNDS = 50  # a round moves every node whose move lowers the cut; a guard, not a budget (k-means is close)
_TOLERANCE = 1e-12


def normalized_cut(affinity: sp.spmatrix, labels: np.ndarray) -> float:
    """``sum_c cut(S_c, rest) / vol(S_c)`` of the partition ``labels`` (self-loops count in the volume only)."""
    affinity = sp.csr_matrix(affinity)
    labels = np.asarray(labels)
    k = int(labels.max()) + 1
    degree = np.asarray(affinity.sum(1)).ravel()
    onehot = sp.csr_matrix((np.ones(len(labels)), (np.arange(len(labels)), labels)), shape=(len(labels), k))
    within = np.asarray((onehot.T @ affinity @ onehot).diagonal()).ravel()
    volume = np.bincount(labels, weights=degree, minlength=k)
    present = volume > 0
    return float(np.sum((volume[present] - within[present]) / volume[present]))


class _Partition:
    """Labels with what a move's exact Ncut change needs: each node's weight to each cluster (``to``, self-loops
    excluded), and each cluster's volume and internal weight (``within``, self-loops included)."""

    def __init__(self, affinity: sp.csr_matrix, labels: np.ndarray, k: int):
        affinity = affinity.copy()
        affinity.sum_duplicates()
        n = affinity.shape[0]
        self.affinity, self.labels = affinity, labels.copy()
        self.loop = affinity.diagonal()
        self.degree = np.asarray(affinity.sum(1)).ravel()
        onehot = sp.csr_matrix((np.ones(n), (np.arange(n), labels)), shape=(n, k))
        self.to = np.asarray((affinity @ onehot).todense())
        self.to[np.arange(n), labels] -= self.loop
        self.volume = np.bincount(labels, weights=self.degree, minlength=k)
        self.within = np.bincount(labels, weights=self.to[np.arange(n), labels] + self.loop, minlength=k)
        self.size = np.bincount(labels, minlength=k)

    def gains(self, nodes: np.ndarray) -> np.ndarray:
        """``(len(nodes), k)``: how much Ncut falls when each node moves to each cluster (-inf: its own, or a move
        that would empty its cluster)."""
        own = self.labels[nodes]
        loop, degree = self.loop[nodes], self.degree[nodes]
        to = self.to[nodes]
        staying = self.within[own] / self.volume[own]
        left_volume = self.volume[own] - degree
        with np.errstate(divide="ignore", invalid="ignore"):
            leaving = np.where(left_volume > 0, (self.within[own] - 2 * to[np.arange(len(nodes)), own] - loop)
                               / np.where(left_volume > 0, left_volume, 1.0), 0.0)  # fmt: skip
            target_before = np.where(self.volume > 0, self.within / np.where(self.volume > 0, self.volume, 1.0), 0.0)
            target_after = (self.within[None, :] + 2 * to + loop[:, None]) / (self.volume[None, :] + degree[:, None])
        # Ncut = k - sum_c within_c / volume_c: a move raises the sum by (leaving + target_after) - (staying + before)
        gain = (leaving[:, None] + target_after) - (staying[:, None] + target_before[None, :])
        gain[np.arange(len(nodes)), own] = -np.inf
        gain[self.size[own] <= 1] = -np.inf
        return gain

    def best_move(self, node: int) -> tuple[int, float]:
        """The cluster whose move lowers Ncut most for ``node``, and by how much (re-evaluated just before a move)."""
        row = self.gains(np.array([node]))[0]
        target = int(np.argmax(row))
        return target, float(row[target])

    def move(self, node: int, target: int) -> None:
        source = self.labels[node]
        self.within[source] -= 2 * self.to[node, source] + self.loop[node]
        self.within[target] += 2 * self.to[node, target] + self.loop[node]
        self.volume[source] -= self.degree[node]
        self.volume[target] += self.degree[node]
        self.size[source] -= 1
        self.size[target] += 1
        start, end = self.affinity.indptr[node], self.affinity.indptr[node + 1]
        neighbours, weights = self.affinity.indices[start:end], self.affinity.data[start:end]
        keep = neighbours != node  # a CSR row holds each neighbour once: plain fancy indexing adds exactly
        self.to[neighbours[keep], source] -= weights[keep]
        self.to[neighbours[keep], target] += weights[keep]
        self.labels[node] = target


def refine_normalized_cut(
    affinity: sp.spmatrix, labels: np.ndarray, n_clusters: int | None = None, max_rounds: int = MAX_ROUNDS
) -> np.ndarray:
    """Labels after local moves that each lower the normalised cut of ``labels`` on ``affinity`` (symmetric,
    non-negative; self-loops allowed: they weigh a node, as a node of near-duplicate maps). No cluster is emptied,
    so the number of clusters stays ``n_clusters`` (default ``labels.max() + 1``)."""
    affinity = sp.csr_matrix(affinity, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if affinity.shape[0] != len(labels):
        raise ValueError(f"{len(labels)} labels for a graph of {affinity.shape[0]} nodes")
    k = int(n_clusters or labels.max() + 1)
    if k < 2 or len(labels) < 3:
        return labels.copy()
    partition = _Partition(affinity, labels, k)
    everyone = np.arange(len(labels))
    for _ in range(max_rounds):
        gain = partition.gains(everyone)
        best = gain.max(1)
        candidates = np.flatnonzero(best > _TOLERANCE)
        if len(candidates) == 0:
            break
        for node in candidates[np.argsort(-best[candidates], kind="stable")]:
            target, lowered = partition.best_move(int(node))
            if lowered > _TOLERANCE:
                partition.move(int(node), target)
    return partition.labels
