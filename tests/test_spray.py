"""SpRAy on plain arrays: planted strategies recovered, the right end of the spectrum, guards, Clever-Hans score."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score

from audits import SpRAy
from audits.clever_hans import cluster_statistics, rank_clusters


def planted(n=1000, shares=(0.7, 0.2, 0.1), size=16, noise=0.6, seed=0):
    """Three strategies of different shapes (a blob, a bar, a ring) at different places, with noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    blob = np.exp(-((yy - 5) ** 2 + (xx - 5) ** 2) / 8.0)
    bar = ((yy > 10) & (yy < 13)).astype(float)
    ring = np.exp(-((np.hypot(yy - 8, xx - 11) - 3.5) ** 2) / 1.5)
    counts = (np.array(shares) * n).astype(int)
    counts[0] += n - counts.sum()
    maps = [base + noise * rng.random((c, size, size)) for base, c in zip((blob, bar, ring), counts)]
    truth = np.repeat(np.arange(3), counts)
    order = rng.permutation(n)
    return np.concatenate(maps)[order], truth[order]


@pytest.mark.parametrize("n", [300, 2000])
def test_planted_strategies_are_recovered_with_the_right_k(n):
    maps, truth = planted(n)
    spray = SpRAy(random_state=0, embeddings=()).fit(maps)
    assert spray.n_clusters_ == 3
    assert adjusted_rand_score(truth, spray.labels_) >= 0.95
    assert np.bincount(spray.labels_).tolist() == sorted(np.bincount(truth).tolist(), reverse=True)
    assert spray.stability_["k_agreement"] == 1.0 and spray.stability_["mean_ari"] >= 0.95
    assert set(spray.labels_by_k_) == set(range(2, 9))


def test_approximate_neighbours_for_large_n_give_the_same_answer():
    maps, truth = planted(3000, seed=1)
    spray = SpRAy(random_state=0, embeddings=(), approximate=True, stability_seeds=0).fit(maps)
    assert spray.n_clusters_ == 3 and adjusted_rand_score(truth, spray.labels_) >= 0.95


def test_same_seed_same_result_and_channels_are_summed():
    maps, _ = planted(400, seed=2)
    a = SpRAy(random_state=3, embeddings=("tsne",)).fit(maps)
    b = SpRAy(random_state=3, embeddings=("tsne",)).fit(np.stack([maps / 2, maps / 2], 1))  # (N, C, H, W)
    assert np.array_equal(a.labels_, b.labels_)
    np.testing.assert_allclose(a.eigenvalues_, b.eigenvalues_, atol=1e-8)
    np.testing.assert_allclose(a.embedding_["tsne"], b.embedding_["tsne"], rtol=1e-4, atol=1e-4)


def test_eigenvalues_are_the_smallest_of_the_normalised_laplacian():
    maps, _ = planted(300, seed=4)
    spray = SpRAy(random_state=0, embeddings=(), n_eigenvalues=6).fit(maps)
    a = spray.affinity_.toarray()
    assert (a == a.T).all() and sp.issparse(spray.affinity_)
    d = a.sum(1)
    laplacian = np.eye(len(a)) - a / np.sqrt(d[:, None] * d[None])
    expected = np.linalg.eigvalsh(laplacian)[:6]
    np.testing.assert_allclose(spray.eigenvalues_, expected, atol=1e-7)
    assert (np.diff(spray.eigenvalues_) >= -1e-12).all()


def test_embeddings_have_one_point_per_map():
    maps, _ = planted(200, seed=5)
    spray = SpRAy(random_state=0).fit(maps)
    assert spray.embedding_["tsne"].shape == spray.embedding_["umap"].shape == (200, 2)


def test_small_classes_are_clamped_with_a_warning():
    maps, _ = planted(6, seed=6)
    with pytest.warns(UserWarning, match="only 6 maps: eigenvalues clamped"):
        spray = SpRAy(random_state=0, embeddings=()).fit(maps)
    assert len(spray.labels_) == 6 and 2 <= spray.n_clusters_ <= 5


@pytest.mark.parametrize(
    ("maps", "error"),
    [
        (np.ones((2, 4, 4)), "at least 3 maps"),
        (np.ones((5, 4)), r"\(N, H, W\) or \(N, C, H, W\)"),
        (np.where(np.arange(5 * 16).reshape(5, 4, 4) == 35, np.nan, 1.0), r"NaN or inf at indices \[2\]"),
    ],
)
def test_bad_maps_get_one_clear_error(maps, error):
    with pytest.raises(ValueError, match=error):
        SpRAy(embeddings=()).fit(maps)


def test_constant_maps_warn_and_do_not_crash():
    maps, _ = planted(60, seed=7)
    maps[:5] = 0.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spray = SpRAy(random_state=0, embeddings=()).fit(maps)
    assert any("all zero" in str(w.message) for w in caught)
    assert len(spray.labels_) == 60


def test_clever_hans_score_prefers_a_fixed_small_region_over_a_moved_object():
    rng = np.random.default_rng(0)
    size, n = 16, 300
    maps = np.zeros((n, size, size))
    for i in range(n):  # objects anywhere, a broad blob
        y, x = rng.integers(3, 13, 2)
        maps[i, y - 3 : y + 3, x - 3 : x + 3] = 1.0
    maps[:60, 14:16, 0:2] += 8.0  # 20%: heavy relevance on a fixed 2x2 corner patch (a stamp)
    labels = np.zeros(n, dtype=int)
    labels[:60] = 1
    labels[60:] = np.where(np.arange(240) % 2 == 0, 0, 2)  # two arbitrary halves of the clean maps
    features = maps.reshape(n, -1) / maps.reshape(n, -1).sum(1, keepdims=True)
    stats, means = cluster_statistics(features, labels, (size, size))
    assert means.shape == (3, size, size)
    scores = dict(zip(stats.cluster, stats.ch_score))
    assert scores[1] > 0.25 > max(scores[0], scores[2])
    stats["class_name"], stats["class_index"] = "c", 0
    ranked = rank_clusters(stats)
    assert ranked.cluster.iloc[0] == 1 and ranked.ch_rank.tolist() == [1, 2, 3]
    assert ranked.flagged.tolist() == [True, False, False]
