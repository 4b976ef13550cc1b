"""SpRAy on plain arrays: planted strategies recovered, the right end of the spectrum, guards, Clever-Hans score."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats
from sklearn.metrics import adjusted_rand_score

from audits import SpRAy
from audits.clever_hans import audit_strategies, cluster_statistics, rank_clusters
from audits.features import denoise, shape_view
from audits.planted import PlantedSpec, make_planted_maps
from audits.spray import choose_k


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


@pytest.mark.slow
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


def test_umap_embedding_is_umaps_own_graph_and_layout():
    # audits.embedding builds UMAP's fuzzy graph in numpy (no numba compilation) and lays it out with umap's own
    # function: the graph must be umap-learn's, and the same graph must give umap-learn's embedding exactly
    import umap as umap_learn
    from sklearn.neighbors import NearestNeighbors
    from umap.umap_ import fuzzy_simplicial_set

    from audits import embedding

    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(size=(150, 6)), rng.normal(size=(60, 6)) + 4, rng.normal(size=(12, 6)) - 5])
    points = points.astype(np.float32)
    distances, indices = NearestNeighbors(n_neighbors=15).fit(points).kneighbors(points)
    distances = distances.astype(np.float32)  # as umap's own path computes them (and our graph uses them)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the same neighbours handed in (umap's own small-data path would compute them from a dense matrix)
        reference = umap_learn.UMAP(n_neighbors=15, random_state=0, n_jobs=1, precomputed_knn=(indices, distances),
                                    force_approximation_algorithm=True).fit(points)  # fmt: skip
    ours = embedding.fuzzy_neighbor_graph(indices, distances).tocsr()
    theirs, _, _ = fuzzy_simplicial_set(points, 15, np.random.RandomState(0), "euclidean", knn_indices=indices,
                                        knn_dists=distances)  # fmt: skip
    theirs = theirs.tocsr()
    assert ours.nnz == theirs.nnz
    assert abs(ours - theirs).max() < 1e-6  # float rounding
    assert ours.max() <= 1 and abs(ours - ours.T).max() == 0  # a fuzzy union: symmetric memberships in [0, 1]

    layout = embedding.umap_layout(reference.graph_, points, random_state=0)
    np.testing.assert_array_equal(layout, reference.embedding_)
    assert embedding.umap(points, 15, random_state=0).shape == (len(points), 2)


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


def test_all_zero_maps_form_one_cluster_of_their_own():
    maps, truth = planted(300, seed=7)
    maps[:12] = 0.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spray = SpRAy(random_state=0, embeddings=("tsne",), stability_seeds=1).fit(maps)
    assert any("all zero" in str(w.message) for w in caught)
    assert spray.n_clusters_ == 4 and (spray.labels_[:12] == 3).all() and (spray.labels_[12:] < 3).all()
    assert adjusted_rand_score(truth[12:], spray.labels_[12:]) >= 0.95
    assert np.isfinite(spray.embedding_["tsne"]).all()
    assert [s.clusters for s in spray.strategies()][-1] == [3] and not spray.strategies()[-1].flagged
    with pytest.raises(ValueError, match="at least 3 maps that are not all zero"):
        SpRAy(embeddings=()).fit(np.zeros((10, 8, 8)))


def test_k_is_the_last_jump_of_the_spectrum():
    """Clusters whose eigenvalues lie orders of magnitude apart must not stop k early (the largest ratio would)."""
    k, ratios = choose_k(np.array([0, 0, 1e-5, 1e-3, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1]), k_max=8, ratio=5)
    assert k == 4 and ratios[1] == np.inf and ratios[0] == 1.0
    assert choose_k(np.array([0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08]), 6, 5)[0] == 2  # a continuum
    assert choose_k(np.zeros(12), 8, 5)[0] == 8  # more components than k_max: as many as allowed


def test_shape_view_ignores_where_a_patch_lies_and_denoising_keeps_the_signal():
    maps = np.zeros((2, 32, 32))
    maps[0, 2:6, 3:7] = 1.0
    maps[1, 20:24, 25:29] = 1.0
    a, b = shape_view(maps)
    np.testing.assert_allclose(a, b, atol=1e-12)
    rng = np.random.default_rng(0)
    signal = np.zeros((400, 60))
    signal[:200, 0] = 6.0
    scores, kept = denoise(signal + rng.normal(size=signal.shape))
    assert kept == 10  # the minimum: one direction stands above the noise
    assert adjusted_rand_score(np.arange(400) < 200, scores[:, 0] > np.median(scores[:, 0])) > 0.95


@pytest.mark.parametrize(
    ("spec", "k"),
    [
        (PlantedSpec(size=224), 3),  # big maps, noise 0.2 of the peak, per-map scale 0.5-2x
        (PlantedSpec(n=600, shares=(0.9, 0.05, 0.05)), 3),  # strategies of 5%
        (PlantedSpec(shares=(0.7, 0.3), cues=("none", "spot")), 2),  # a cue at a different place in every map
        (PlantedSpec(shares=(0.55, 0.25, 0.12, 0.08), cues=("none", "corner", "edge", "frame")), 4),
        (PlantedSpec(duplicates=0.3), 3),  # near-duplicates would form cliques
    ],
    ids=["224px", "5%", "moving spot", "four", "duplicates"],
)
def test_planted_family_subset_k_and_clusters(spec, k):
    """A subset of benchmarks/spray_planted.py: the number of strategies and the clusters come out right."""
    maps, truth = make_planted_maps(spec, seed=0)
    spray = SpRAy(random_state=0, embeddings=(), stability_seeds=0).fit(maps)
    assert adjusted_rand_score(truth, spray.labels_) >= 0.95
    assert len(spray.strategies()) == k


def test_strategies_merge_a_continuum_and_flag_only_the_confident_isolated_side():
    """A clean class (objects anywhere) ends as one strategy; a class where a third of the maps also pile relevance
    on a corner, and carry more of it (a shortcut adds evidence), is cue + rest with only the cue flagged; the
    evidence is a p-value against the audit's own cuts."""
    rng = np.random.default_rng(0)
    clean, _ = make_planted_maps(PlantedSpec(n=300, shares=(1.0,), cues=("none",), scale=(1, 1)), seed=1)
    poisoned, truth = make_planted_maps(PlantedSpec(n=300, shares=(0.7, 0.3), cues=("none", "corner"),
                                                    scale=(1, 1)), seed=2)  # fmt: skip
    logits = np.where(truth == 1, 3.0, 1.0) * rng.uniform(0.9, 1.1, 300)  # what each map sums to (conservation)
    poisoned = poisoned / poisoned.sum((1, 2), keepdims=True) * logits[:, None, None]
    clean = clean / clean.sum((1, 2), keepdims=True)
    fits = {0: ("clean", SpRAy(random_state=0, embeddings=()).fit(clean)),
            1: ("poisoned", SpRAy(random_state=0, embeddings=()).fit(poisoned))}  # fmt: skip
    null = [v for _, s in fits.values() for v in s.null_cuts_]
    table, model, _, threshold = audit_strategies({i: (n, s.graph_) for i, (n, s) in fits.items()}, null, 0.05)
    assert (table.class_name == "clean").sum() == 1 and not table[table.class_name == "clean"].flagged.any()
    poisoned_rows = table[table.class_name == "poisoned"]
    assert len(poisoned_rows) == 2 and poisoned_rows.flagged.sum() == 1
    top = table.iloc[0]
    assert top.flagged and top.strategy_rank == 1 and top.p_value < threshold and top.relevance_gain > 2
    labels = fits[1][1].labels_
    assert adjusted_rand_score(truth == 1, np.isin(labels, top.clusters)) >= 0.95
    assert threshold == pytest.approx(0.05 / sum(len(np.unique(s.graph_.labels)) for _, s in fits.values()))

    stats = pd.concat([cluster_statistics(s.maps_.reshape(300, -1), s.labels_, s.maps_.shape[1:])[0].assign(
        class_name=n, class_index=i) for i, (n, s) in fits.items()])  # fmt: skip
    ranked = rank_clusters(stats, table)
    assert ranked.flagged.iloc[0] and ranked.ch_rank.iloc[0] == 1 and ranked.class_name.iloc[0] == "poisoned"
    assert set(ranked.columns) >= {"class_index", "class_name", "cluster", "size", "ch_score", "ch_rank", "flagged"}


def test_genuine_modes_a_little_apart_in_confidence_are_not_flagged_but_a_cue_still_is():
    """Classes with two real modes (isolated, so every half is a candidate) whose confidence differs by 4%, as the
    digits on two kinds of photograph do: the side test, corrected over the audit's isolated strategies, flags none
    of them, though some pass it at the uncorrected level; a cue (x3 evidence) in the same audit is still flagged."""
    fits = {}
    for c in range(4):
        maps, truth = make_planted_maps(PlantedSpec(n=160, shares=(0.5, 0.5), cues=("none", "corner"),
                                                    scale=(1, 1)), seed=10 + c)  # fmt: skip
        gain = 3.0 if c == 3 else 1.04
        logits = np.where(truth == 1, gain, 1.0) * np.random.default_rng(c).uniform(0.8, 1.2, len(truth))
        maps = maps / maps.sum((1, 2), keepdims=True) * logits[:, None, None]
        fits[c] = (f"class {c}", SpRAy(random_state=0, embeddings=()).fit(maps))
    null = [v for _, s in fits.values() for v in s.null_cuts_]
    table, _, _, threshold = audit_strategies({i: (n, s.graph_) for i, (n, s) in fits.items()}, null, 0.05)
    isolated = table[table.p_value < threshold]
    assert len(isolated) == 8  # every class is two modes apart
    modes = table[table.class_name != "class 3"]

    def mann_whitney(row) -> float:
        spray = fits[row.class_index][1]
        inside = np.isin(spray.labels_, row.clusters)
        sums = spray.relevance_sum_
        return stats.mannwhitneyu(sums[inside], sums[~inside], alternative="greater").pvalue

    assert min(mann_whitney(r) for r in modes.itertuples()) < 0.05  # the uncorrected side test would flag a mode
    assert not modes.flagged.any() and (modes.ch_score == 0).all()
    assert table.flagged.sum() == 1 and table.iloc[0].class_name == "class 3" and table.iloc[0].relevance_gain > 2


def _blobs(rows: np.ndarray, xs: np.ndarray, size: int = 16) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return np.stack([np.exp(-((yy - r) ** 2 + (xx - x) ** 2) / 3.0) for r, x in zip(rows, xs)])


def test_a_mode_only_as_much_surer_as_the_parts_of_one_strategy_are_is_not_flagged():
    """Each class: an object high or low (two isolated modes) at any place along a row, the model surer the further
    right (0.6-1.4), as confidence varies inside a real strategy. The low mode 15% surer is significant for
    Mann-Whitney alone at 200 maps, but not beyond the gain null (the cuts through one mode differ by more); a cue
    with x3 evidence in the same audit is flagged."""
    from audits.strategies import GainNull, NullModel, find_strategies

    fits = {}
    for c in range(3):
        rng = np.random.default_rng(c)
        low, x = rng.random(200) < 0.5, rng.uniform(3, 12, 200)
        maps = _blobs(np.where(low, 11, 4), x) + 0.05 * rng.random((200, 16, 16))
        logits = (0.6 + 0.8 * (x - 3) / 9) * np.where(low, 3.0 if c == 2 else 1.15, 1.0)
        maps = maps / maps.sum((1, 2), keepdims=True) * logits[:, None, None]
        fits[c] = (f"class {c}", SpRAy(random_state=0, embeddings=()).fit(maps))
    cuts = [v for _, s in fits.values() for v in s.null_cuts_]
    table, null, gains, threshold = audit_strategies({i: (n, s.graph_) for i, (n, s) in fits.items()}, cuts, 0.05)
    assert isinstance(gains, GainNull) and gains.scale > 0.2  # the parts of one mode differ by > 20%
    modes = table[table.class_name != "class 2"]
    assert (modes.p_value < threshold).all() and not modes.flagged.any()
    assert table.flagged.sum() == 1 and table.iloc[0].class_name == "class 2" and table.iloc[0].relevance_gain > 2
    mann_whitney_alone = [s for c in (0, 1) for s in find_strategies(fits[c][1].graph_, NullModel.fit(cuts),
                                                                     threshold, 0.05)]  # fmt: skip
    assert any(s.flagged for s in mann_whitney_alone)


def test_gain_margin_is_the_spread_of_the_null_cuts_with_a_floor_and_a_wide_default():
    from audits.strategies import MIN_GAIN_SCALE, GainNull

    cuts = [(5.0, -2.0, g) for g in (-0.4, -0.2, 0.0, 0.2, 0.4, np.nan)]
    assert GainNull.fit(cuts).scale == pytest.approx(np.sqrt(np.pi / 2) * 0.24) and GainNull.fit(cuts).n == 5
    assert GainNull.fit([(5.0, -2.0, 0.001)] * 5).scale == MIN_GAIN_SCALE  # nearly equal cuts: the floor
    assert GainNull.fit(cuts[:2]).margin == pytest.approx(np.e)  # too few cuts: wide, so conservative


def test_gain_margin_from_an_audits_few_cuts_is_sigma_and_steadier_than_the_mad():
    """36 cuts (6 classes of 2 clusters): the estimate is the normal's sigma, and varies from audit to audit
    less than the MAD's would (which moved a real audit's margin from 1.37 to 1.48 when 6 maps changed cluster)."""
    from audits.strategies import GainNull

    rng = np.random.default_rng(0)
    samples = rng.normal(0.0, 0.3, size=(2000, 36))
    ours = np.array([GainNull.fit([(5.0, -2.0, g) for g in row]).scale for row in samples])
    mad = 1.4826 * np.median(np.abs(samples), axis=1)
    assert ours.mean() == pytest.approx(0.3, rel=0.02)
    assert ours.std() < 0.7 * mad.std()


def test_one_cue_split_by_place_is_grouped_into_one_flagged_strategy():
    """A watermark-like band at a random place along the top edge: a finer eigengap cuts it into two clusters by
    place; they are each other's main neighbour, have the same shape and are both the confident side, so they
    form one strategy, and that one is flagged."""
    for seed in range(2):
        maps, truth = make_planted_maps(PlantedSpec(shares=(0.7, 0.3), cues=("none", "edge"), scale=(1, 1)), seed)
        logits = np.where(truth == 1, 3.0, 1.0) * np.random.default_rng(seed).uniform(0.9, 1.1, len(truth))
        maps = maps / maps.sum((1, 2), keepdims=True) * logits[:, None, None]
        spray = SpRAy(random_state=0, embeddings=(), gap_ratio=3.0).fit(maps)
        assert spray.n_clusters_ == 3
        strategies = spray.strategies()
        assert [s.clusters for s in strategies] == [[0], [1, 2]] and [s.flagged for s in strategies] == [False, True]
        assert adjusted_rand_score(truth == 1, np.isin(spray.labels_, [1, 2])) >= 0.95
