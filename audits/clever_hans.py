"""Per-cluster statistics and the Clever-Hans score that ranks clusters of all classes (no ground truth needed).

The score rewards what a watermark, a source tag or a frame does to a class's explanations: a group of samples
whose relevance is *moved*, compared with the rest of the class, onto a *few pixels at a fixed place*.

    ch_score = distance_from_rest * moved_concentration

- ``distance_from_rest``: total-variation distance between the cluster's mean map and the mean map of the rest
  of its class (maps are L1-normalised, so this is the share of relevance that sits elsewhere), in [0, 1];
- ``moved_concentration``: the share of the positive part of ``mean - rest_mean`` that falls into its top 5% of
  pixels, in (0, 1]. Clusters that merely differ by where the object is (strategies of a clean model) move
  relevance to broad regions and score low; a stamp moves it to the same few pixels in every member.

On the built-in benchmark the stamped cluster scores 0.40 and no other cluster exceeds 0.15, and a model trained
without the stamp has no cluster above ``FLAG_THRESHOLD`` (see the tests).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["FLAG_THRESHOLD", "cluster_statistics", "rank_clusters"]

FLAG_THRESHOLD = 0.25
TOP_SHARE = 0.05


def _top_share(values: np.ndarray, share: float = TOP_SHARE) -> float:
    """Share of the (non-negative) mass of ``values`` in its top ``share`` of entries."""
    total = values.sum()
    if total <= 0:
        return 0.0
    top = max(1, int(round(share * len(values))))
    return float(np.sort(values)[::-1][:top].sum() / total)


def _medoid(points: np.ndarray) -> int:
    from scipy.spatial.distance import cdist

    return int(np.argmin(cdist(points, points, "cityblock").sum(1)))


def cluster_statistics(
    features: np.ndarray,
    labels: np.ndarray,
    map_shape: tuple[int, int],
    correct: np.ndarray | None = None,
    n_exemplars: int = 6,
) -> tuple[pd.DataFrame, np.ndarray]:
    """One row per cluster, and the cluster mean maps ``(k, H, W)``.

    ``features`` are the L1-normalised maps SpRAy clustered (rows sum to one for the "abs" normalisation);
    exemplar and medoid positions index into them.
    """
    rows, means = [], []
    n = len(labels)
    for cluster in range(int(labels.max()) + 1):
        members = np.flatnonzero(labels == cluster)
        if len(members) == 0:
            continue
        rest = np.flatnonzero(labels != cluster)
        mean = features[members].mean(0)
        rest_mean = features[rest].mean(0) if len(rest) else np.zeros_like(mean)
        distance = 0.5 * float(np.abs(mean - rest_mean).sum())
        moved = np.clip(mean - rest_mean, 0, None)
        to_mean = np.abs(features[members] - mean).sum(1)
        medoid = members[_medoid(features[members]) if len(members) <= 500 else int(np.argmin(to_mean))]
        concentration = _top_share(np.abs(mean))
        moved_concentration = _top_share(moved)
        rows.append(
            {
                "cluster": cluster,
                "size": len(members),
                "share": len(members) / n,
                "spatial_concentration": concentration,
                "distance_from_rest": distance,
                "moved_concentration": moved_concentration,
                "ch_score": distance * moved_concentration,
                "misclassified_share": float(1 - correct[members].mean()) if correct is not None else np.nan,
                "medoid": int(medoid),
                "exemplars": members[np.argsort(to_mean)[:n_exemplars]].tolist(),
            }
        )
        means.append(mean.reshape(map_shape))
    return pd.DataFrame(rows), np.stack(means)


def rank_clusters(per_class: pd.DataFrame, threshold: float = FLAG_THRESHOLD) -> pd.DataFrame:
    """All clusters of all classes, highest Clever-Hans score first, with ``ch_rank`` (1 = first) and ``flagged``."""
    ranked = per_class.sort_values(["ch_score", "class_name", "cluster"], ascending=[False, True, True])
    ranked = ranked.reset_index(drop=True)
    ranked["ch_rank"] = np.arange(1, len(ranked) + 1)
    ranked["flagged"] = ranked.ch_score > threshold
    return ranked
