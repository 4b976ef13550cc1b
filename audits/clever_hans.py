"""Clever-Hans ranking of a whole audit: per-cluster statistics, strategies with evidence, one ranking of all classes.

The evidence is data-adaptive and states a false-alarm rate (``audits.strategies``): a strategy is flagged when
it is isolated from the rest of its class far beyond what cuts through one strategy of this audit's classes are
(p < ``false_alarm_rate`` / number of clusters) *and* the model is more sure of its members than of the rest of
the class (a shortcut adds evidence; p < ``false_alarm_rate`` / number of isolated strategies). No constant is
tuned to a particular artifact: the null of the isolation test is learnt from the audited model's own maps, so
an audit of a model without shortcuts flags anything with probability at most ``false_alarm_rate`` (under the
null's normal model; when a class holds genuinely distinct modes, the corrected side test keeps that bound).

Descriptive per-cluster numbers stay for people (how much relevance moved compared with the rest of the class,
and how concentrated what moved is); they no longer decide the flag.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .strategies import FALSE_ALARM_RATE, ClassGraph, GainNull, NullModel, find_strategies, flag_strategies

__all__ = ["FALSE_ALARM_RATE", "cluster_statistics", "audit_strategies", "rank_clusters", "STRATEGY_COLUMNS"]

TOP_SHARE = 0.05
STRATEGY_COLUMNS = [
    "class_index", "class_name", "strategy", "clusters", "size", "conductance", "null_conductance", "p_value",
    "relevance_gain", "direction_p", "flagged", "ch_score", "strategy_rank",
]  # fmt: skip


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
    """One row per cluster (descriptive), and the cluster mean maps ``(k, H, W)``.

    ``features`` are the normalised maps (``SpRAy.maps_`` flattened; rows sum to one for "abs"); exemplar and
    medoid positions index into them.
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
        to_mean = np.abs(features[members] - mean).sum(1)
        medoid = members[_medoid(features[members]) if len(members) <= 500 else int(np.argmin(to_mean))]
        rows.append(
            {
                "cluster": cluster,
                "size": len(members),
                "share": len(members) / n,
                "spatial_concentration": _top_share(np.abs(mean)),
                "distance_from_rest": 0.5 * float(np.abs(mean - rest_mean).sum()),
                "moved_concentration": _top_share(np.clip(mean - rest_mean, 0, None)),
                "misclassified_share": float(1 - correct[members].mean()) if correct is not None else np.nan,
                "medoid": int(medoid),
                "exemplars": members[np.argsort(to_mean)[:n_exemplars]].tolist(),
            }
        )
        means.append(mean.reshape(map_shape))
    return pd.DataFrame(rows), np.stack(means)


def audit_strategies(
    graphs: dict[int, tuple[str, ClassGraph]],
    null_samples: list[tuple[float, float, float]],
    false_alarm_rate: float = FALSE_ALARM_RATE,
) -> tuple[pd.DataFrame, NullModel, GainNull, float]:
    """Strategies of every class (``graphs``: class index -> (name, graph)) against nulls pooled over the audit
    (``null_samples``: every class's ``SpRAy.null_cuts_``).

    Returns the strategies table (``STRATEGY_COLUMNS``; ``clusters`` as lists), the isolation null, the gain null
    and the isolation p-value threshold (``false_alarm_rate`` / number of clusters in the audit).
    """
    if not 0 < false_alarm_rate < 1:
        raise ValueError(f"false_alarm_rate must be in (0, 1); got {false_alarm_rate}")
    null, gains = NullModel.fit(null_samples), GainNull.fit(null_samples)
    n_tests = sum(len(np.unique(g.labels)) for _, g in graphs.values())
    threshold = false_alarm_rate / max(n_tests, 1)
    found = [(class_index, name, graph, find_strategies(graph, null, threshold, false_alarm_rate, gains))
             for class_index, (name, graph) in graphs.items()]  # fmt: skip
    # the side test is corrected over the audit's isolated strategies, as the isolation test over its clusters
    flag_strategies([s for *_, strategies in found for s in strategies], threshold, false_alarm_rate)
    rows = []
    for class_index, name, graph, strategies in found:
        typical = null.expected(graph.counts.sum())
        for j, s in enumerate(strategies):
            rows.append({
                "class_index": class_index, "class_name": name, "strategy": j, "clusters": s.clusters, "size": s.size,
                "conductance": s.conductance, "null_conductance": typical, "p_value": s.p_value,
                "relevance_gain": s.relevance_gain, "direction_p": s.direction_p, "flagged": s.flagged,
                "ch_score": s.score,
            })  # fmt: skip
    table = pd.DataFrame(rows, columns=STRATEGY_COLUMNS[:-1])
    isolation = table.conductance.fillna(np.inf).to_numpy()  # lower: more apart from the rest of the class
    order = np.lexsort((table.strategy.to_numpy(), table.class_name.to_numpy(), isolation, -table.ch_score.to_numpy()))
    table = table.iloc[order].reset_index(drop=True)
    table["strategy_rank"] = np.arange(1, len(table) + 1)
    return table, null, gains, threshold


def rank_clusters(clusters: pd.DataFrame, strategies: pd.DataFrame) -> pd.DataFrame:
    """All clusters of all classes, strongest strategy first: ``strategy``, ``ch_score``, ``flagged`` and ``ch_rank``
    (the rank of the cluster's strategy: the clusters of one strategy share it, 1 = first) join each cluster."""
    of = {}
    for r in strategies.itertuples():
        for c in r.clusters:
            of[(r.class_index, c)] = r
    joined = clusters.copy()
    keys = list(zip(joined.class_index, joined.cluster))
    joined["strategy"] = [of[k].strategy for k in keys]
    joined["ch_score"] = [of[k].ch_score for k in keys]
    joined["flagged"] = [bool(of[k].flagged) for k in keys]
    joined["ch_rank"] = [int(of[k].strategy_rank) for k in keys]
    joined["p_value"] = [of[k].p_value for k in keys]
    return joined.sort_values(["ch_rank", "size"], ascending=[True, False], kind="stable").reset_index(drop=True)
