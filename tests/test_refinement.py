"""Refinement of spectral clusters on the graph: exact move gains, a lower cut, a local optimum, planted groups."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score

from audits import SpRAy
from audits.graph import knn_affinity
from audits.refinement import _Partition, normalized_cut, refine_normalized_cut


def random_graph(n=60, seed=0, loops=True) -> sp.csr_matrix:
    """A symmetric kNN graph of random points, some nodes with self-loops (near-duplicate maps' multiplicity)."""
    rng = np.random.default_rng(seed)
    affinity = knn_affinity(rng.normal(size=(n, 3)), 6, False, seed, "local")
    if loops:
        degree = np.asarray(affinity.sum(1)).ravel()
        multiplicity = rng.integers(1, 4, n) * (rng.random(n) < 0.3)
        affinity = affinity + sp.diags(multiplicity * degree)
    return sp.csr_matrix(affinity)


def dense_ncut(affinity: np.ndarray, labels: np.ndarray) -> float:
    total = 0.0
    for c in np.unique(labels):
        inside = labels == c
        total += affinity[inside][:, ~inside].sum() / affinity[inside].sum()
    return total


def test_normalized_cut_is_the_sum_of_each_clusters_cut_over_its_volume():
    affinity = random_graph()
    labels = np.random.default_rng(1).integers(0, 3, affinity.shape[0])
    assert normalized_cut(affinity, labels) == pytest.approx(dense_ncut(affinity.toarray(), labels), rel=1e-12)


def test_move_gains_equal_the_change_of_the_cut_computed_from_scratch():
    affinity = random_graph(n=40, seed=2)
    labels = np.random.default_rng(3).integers(0, 3, 40)
    partition = _Partition(affinity, labels, 3)
    gains = partition.gains(np.arange(40))
    before = dense_ncut(affinity.toarray(), labels)
    for node in range(40):
        for target in range(3):
            if target == labels[node]:
                assert gains[node, target] == -np.inf
                continue
            moved = labels.copy()
            moved[node] = target
            assert gains[node, target] == pytest.approx(before - dense_ncut(affinity.toarray(), moved), abs=1e-12)
    for node in range(40):  # the one-node path the refinement loop takes agrees
        target, gain = partition.best_move(node)
        assert target == int(np.argmax(gains[node])) and gain == pytest.approx(gains[node].max(), abs=1e-12)
    # moves keep the bookkeeping exact
    partition.move(5, (labels[5] + 1) % 3)
    moved = labels.copy()
    moved[5] = (labels[5] + 1) % 3
    fresh = _Partition(affinity, moved, 3)
    for name in ("to", "volume", "within", "size"):
        np.testing.assert_allclose(getattr(partition, name), getattr(fresh, name), atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_refinement_lowers_the_cut_to_a_local_optimum_and_keeps_every_cluster(seed):
    affinity = random_graph(n=80, seed=seed)
    labels = np.random.default_rng(seed).integers(0, 4, 80)
    refined = refine_normalized_cut(affinity, labels)
    assert normalized_cut(affinity, refined) < normalized_cut(affinity, labels)
    assert set(np.unique(refined)) == {0, 1, 2, 3}
    dense, best = affinity.toarray(), dense_ncut(affinity.toarray(), refined)
    for node in range(80):  # no single move lowers the cut any more
        for target in range(4):
            moved = refined.copy()
            moved[node] = target
            if np.bincount(moved, minlength=4).min() > 0:
                assert dense_ncut(dense, moved) >= best - 1e-12


def test_refinement_puts_misplaced_border_nodes_back_with_their_group():
    rng = np.random.default_rng(0)
    n = 150
    truth = np.repeat([0, 1, 2], n // 3)
    within = rng.random((n, n)) < 0.25
    between = rng.random((n, n)) < 0.02
    dense = np.where(truth[:, None] == truth[None, :], within, between).astype(float)
    dense = np.triu(dense, 1)
    affinity = sp.csr_matrix(dense + dense.T)
    labels = truth.copy()
    wrong = rng.choice(n, 20, replace=False)
    labels[wrong] = (labels[wrong] + rng.integers(1, 3, 20)) % 3
    assert adjusted_rand_score(truth, labels) < 0.75
    assert adjusted_rand_score(truth, refine_normalized_cut(affinity, labels)) == 1.0


def test_refinement_rejects_labels_of_another_graph():
    with pytest.raises(ValueError, match="10 labels for a graph of 60 nodes"):
        refine_normalized_cut(random_graph(), np.zeros(10, dtype=int))


def test_spray_clusters_cut_the_graph_less_than_k_means_alone():
    rng = np.random.default_rng(0)
    maps = rng.random((400, 8, 8))
    maps[:120, :3, :3] += 1.5 * rng.random((120, 1, 1))  # a cue of varying strength: a blurred border
    plain = SpRAy(random_state=0, embeddings=(), refine=False, stability_seeds=0).fit(maps)
    refined = SpRAy(random_state=0, embeddings=(), stability_seeds=0).fit(maps)
    assert refined.n_clusters_ == plain.n_clusters_ == 2

    def node_labels(spray, labels):
        out = np.zeros(spray.affinity_.shape[0], dtype=int)
        out[spray.inverse_] = labels[spray._live]
        return out

    chosen = {s: node_labels(s, s.labels_) for s in (plain, refined)}
    assert normalized_cut(refined.affinity_, chosen[refined]) < normalized_cut(plain.affinity_, chosen[plain])
    assert np.array_equal(refined.labels_, refined.labels_by_k_[2])
    # the other k's labels are k-means' own, for a look (only the chosen k's clusters are tested)
    assert np.array_equal(refined.labels_by_k_[3], plain.labels_by_k_[3])
