"""The ``spray`` stage: SpRAy per class on a relevance store, strategies and Clever-Hans flags, files for people and
unlearning.

Writes to ``spray/<model>/``:

- ``samples.parquet``: sample_id, label, class_name, group, cluster (chosen k), strategy, cluster_k2..cluster_kK,
  ch_rank (rank of the sample's strategy, 1 = first), tsne_x/y, umap_x/y;
- ``classes.json``: per class the eigenvalues, gap ratios, chosen k, gap strength, stability, kNN degree, denoised
  dimensions, number of strategies;
- ``clusters.parquet`` / ``clusters.csv``: all clusters ranked by their strategy's evidence (``audits.clever_hans``;
  ``flagged`` is true for every cluster of a flagged strategy);
- ``strategies.json`` / ``strategies.csv``: every class's strategies (groups of clusters) with their evidence
  (isolation kappa, p-value, relevance gain, flagged, rank), the null and the p-value threshold;
- ``cluster_means.npz``: mean map of every cluster (key ``<class index>/<cluster>``) and its medoid's map
  (``medoid/<class index>/<cluster>``), both normalised as clustered;
- ``members/<class>__cluster<j>.json`` and ``.csv``: the sample ids of every cluster;

and metrics JSON (for the built-in data also ``artifact_ari`` and ``artifact_rank`` of the first planted artifact,
and per artifact under ``artifacts``, scored with ground truth that the method never sees).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import adjusted_rand_score
from tqdm.auto import tqdm

from audits import SpRAy
from audits.clever_hans import FALSE_ALARM_RATE, audit_strategies, cluster_statistics, rank_clusters
from audits.features import PIXEL_VIEWS
from audits.strategies import side_level

from .datasets import load_dataset
from .io import write_json, write_with
from .params import section
from .relevance_store import RelevanceStore

__all__ = ["SPRAY_DEFAULTS", "run_spray", "members_stem"]

SPRAY_DEFAULTS = {
    "group_by": "label",  # or "prediction"
    "pooled_size": 8,  # the "where" view (the store's pooled maps are pooled further)
    "normalization": "abs",
    "views": "auto",  # latent when the store holds latent relevance, else where + shape
    "n_neighbors": None,
    "k_max": 8,
    "weighting": "local",
    "gap_ratio": 4.5,
    "stability_seeds": 3,
    "embeddings": ["tsne", "umap"],
    "random_state": 0,
    "false_alarm_rate": FALSE_ALARM_RATE,
    "n_exemplars": 6,
}


def members_stem(out: Path, class_name: str, class_index: int, cluster: int) -> Path:
    """``<out>/members/<class>__cluster<j>`` (add ``.json`` or ``.csv``). A class name that is not a safe file name
    is reduced to one and gets its class index appended, so two such names never share a file."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", class_name)[:80].lstrip(".")
    if safe != class_name:
        safe = f"{safe or 'class'}-{int(class_index)}"
    return Path(out) / "members" / f"{safe}__cluster{int(cluster)}"


def resolve_views(setting, has_latent: bool) -> tuple[str, ...]:
    """``spray.views``: "auto" is the latent view alone when the store holds latent relevance (it flags the cues the
    pixel views flag and those they miss, ``docs/spray.md``), else where + shape; a list is taken as given."""
    if setting == "auto":
        return ("latent",) if has_latent else PIXEL_VIEWS
    views = tuple(setting) if isinstance(setting, (list, tuple)) else ()
    if not views:
        raise ValueError(f"spray.views must be 'auto' or a list of where, shape, latent; got {setting!r}")
    if "latent" in views and not has_latent:
        raise ValueError(
            "spray.views asks for 'latent' but the relevance store holds no latent relevance: set "
            "attribute.latent_layers (default auto) and run the attribute stage again"
        )
    return views


def _fit_class(settings: dict, maps: np.ndarray, views: tuple[str, ...], latent) -> SpRAy:
    return SpRAy(
        pooled_size=settings["pooled_size"],
        normalization=settings["normalization"],
        views=views,
        n_neighbors=settings["n_neighbors"],
        k_max=settings["k_max"],
        weighting=settings["weighting"],
        gap_ratio=settings["gap_ratio"],
        stability_seeds=settings["stability_seeds"],
        embeddings=tuple(e for e in settings["embeddings"] if len(maps) >= 10),
        random_state=settings["random_state"],
    ).fit(maps, latent=latent)


def run_spray(
    params: dict, store_dir: Path, prepared: Path, out: Path, metrics_out: Path, progress: bool = True
) -> dict:
    settings = section(params, "spray", SPRAY_DEFAULTS)
    if settings["group_by"] not in ("label", "prediction"):
        raise ValueError(f"spray.group_by must be 'label' or 'prediction'; got {settings['group_by']!r}")
    store = RelevanceStore(store_dir)
    group = store.open()
    table = store.table()
    classes = list(group.attrs["classes"])
    pooled = group["pooled"][:]
    latent = store.latent()
    views = resolve_views(settings["views"], latent is not None)
    dataset = load_dataset(prepared)
    out = Path(out)
    (out / "members").mkdir(parents=True, exist_ok=True)
    table["group"] = table[settings["group_by"]]
    samples, class_info, cluster_rows, means, graphs, null_samples = [], {}, [], {}, {}, []
    for k_index, name in enumerate(tqdm(classes, desc="spray", disable=not progress)):
        idx = np.flatnonzero(table.group.to_numpy() == k_index)
        if len(idx) < 3:
            class_info[name] = {"n_samples": int(len(idx)), "skipped": "fewer than 3 samples"}
            continue
        class_latent = [layer[idx] for _, layer in latent] if "latent" in views else None
        spray = _fit_class(settings, pooled[idx], views, class_latent)
        graphs[k_index] = (name, spray.graph_)
        null_samples.extend(spray.null_cuts_)
        side = spray.maps_.shape[1:]
        stats, class_means = cluster_statistics(
            spray.maps_.reshape(len(idx), -1), spray.labels_, side, table.correct.to_numpy()[idx],
            settings["n_exemplars"],
        )  # fmt: skip
        stats.insert(0, "class_name", name)
        stats.insert(1, "class_index", k_index)
        stats["k"] = spray.n_clusters_
        for j, medoid in zip(stats.cluster, stats.medoid):
            means[f"medoid/{k_index}/{j}"] = spray.maps_[medoid].astype(np.float32)
        stats["exemplars"] = [table.sample_id.iloc[idx[e]].tolist() for e in stats.exemplars]
        stats["medoid"] = [table.sample_id.iloc[idx[m]] for m in stats.medoid]
        cluster_rows.append(stats)
        for j, mean in enumerate(class_means):
            means[f"{k_index}/{j}"] = mean.astype(np.float32)
        class_info[name] = {
            "n_samples": int(len(idx)),
            "eigenvalues": spray.eigenvalues_.tolist(),
            "gaps": [float(g) if np.isfinite(g) else None for g in spray.gaps_],
            "n_clusters": spray.n_clusters_,
            "gap_strength": float(spray.gap_strength_) if np.isfinite(spray.gap_strength_) else None,
            "stability": spray.stability_,
            "n_neighbors": spray.n_neighbors_,
            "n_components": spray.n_components_,
            "views": list(views),
        }
        rows = pd.DataFrame(
            {
                "index": idx,
                "sample_id": table.sample_id.to_numpy()[idx],
                "label": table.label.to_numpy()[idx],
                "class_name": table.class_name.to_numpy()[idx],
                "group": k_index,
                "cluster": spray.labels_,
            }
        )
        for k, labels in spray.labels_by_k_.items():
            rows[f"cluster_k{k}"] = labels
        for embedding, coords in spray.embedding_.items():
            rows[f"{embedding}_x"], rows[f"{embedding}_y"] = coords[:, 0], coords[:, 1]
        samples.append(rows)
    if not cluster_rows:
        raise ValueError("no class has 3 or more samples: nothing to cluster")
    strategies, null, gains, threshold = audit_strategies(graphs, null_samples, settings["false_alarm_rate"])
    for name, info in class_info.items():
        if "n_clusters" in info:
            info["n_strategies"] = int((strategies.class_name == name).sum())
    ranked = rank_clusters(pd.concat(cluster_rows, ignore_index=True), strategies)
    samples = pd.concat(samples, ignore_index=True)
    of_cluster = {(r.class_index, r.cluster): r for r in ranked.itertuples()}
    samples["strategy"] = [of_cluster[(g, c)].strategy for g, c in zip(samples.group, samples.cluster)]
    samples["ch_rank"] = [of_cluster[(g, c)].ch_rank for g, c in zip(samples.group, samples.cluster)]
    samples = samples.sort_values("index").reset_index(drop=True)

    for r in ranked.itertuples():
        members = samples.sample_id[(samples.group == r.class_index) & (samples.cluster == r.cluster)].tolist()
        stem = members_stem(out, r.class_name, r.class_index, r.cluster)
        write_json(
            stem.with_suffix(".json"),
            {"class_name": r.class_name, "cluster": int(r.cluster), "strategy": int(r.strategy),
             "ch_rank": int(r.ch_rank), "sample_ids": members},
        )  # fmt: skip
        write_with(
            stem.with_suffix(".csv"), lambda tmp, m=members: pd.DataFrame({"sample_id": m}).to_csv(tmp, index=False)
        )
    evidence = {
        "false_alarm_rate": settings["false_alarm_rate"],
        "p_threshold": threshold,
        "null": {"location": null.location, "slope": null.slope, "scale": null.scale, "n_cuts": null.n},
        "gain_null": {"scale": gains.scale, "margin": gains.margin, "n_cuts": gains.n},
        "side_threshold": side_level(strategies.p_value, threshold, settings["false_alarm_rate"]),
    }
    write_with(out / "samples.parquet", lambda tmp: samples.to_parquet(tmp, index=False))
    write_with(out / "clusters.parquet", lambda tmp: ranked.to_parquet(tmp, index=False))
    write_with(out / "clusters.csv", lambda tmp: ranked.drop(columns=["exemplars"]).to_csv(tmp, index=False))
    write_json(out / "strategies.json", {**evidence, "strategies": _jsonable(strategies)})
    write_with(out / "strategies.csv", lambda tmp: strategies.assign(
        clusters=[";".join(map(str, c)) for c in strategies.clusters]).to_csv(tmp, index=False))  # fmt: skip
    write_with(out / "cluster_means.npz", lambda tmp: _save_npz(tmp, means))
    write_json(out / "classes.json", class_info)

    top = strategies.iloc[0]
    metrics = {
        "n_samples": int(len(samples)),
        "n_clusters": int(len(ranked)),
        "n_strategies": int(len(strategies)),
        "n_flagged": int(ranked.flagged.sum()),
        "n_flagged_strategies": int(strategies.flagged.sum()),
        "top_ch_score": float(top.ch_score),
        "top_cluster": f"{ranked.class_name.iloc[0]}/{int(ranked.cluster.iloc[0])}",
        "top_strategy": f"{top.class_name}/s{int(top.strategy)}",
        "p_threshold": threshold,
    }
    metrics.update(_score_with_ground_truth(dataset, samples, strategies))
    write_json(metrics_out, metrics)
    return metrics


def _jsonable(strategies: pd.DataFrame) -> list[dict]:
    out = []
    for r in strategies.to_dict("records"):
        out.append({k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items()}
                   | {"clusters": [int(c) for c in r["clusters"]], "flagged": bool(r["flagged"])})  # fmt: skip
    return out


def _save_npz(path: Path, arrays: dict) -> None:
    with open(path, "wb") as fh:
        np.savez_compressed(fh, **arrays)


def _score_with_ground_truth(dataset, samples: pd.DataFrame, strategies: pd.DataFrame) -> dict:
    """Built-in data only: how well the audit found each planted artifact (the method never sees the flags).

    Per artifact: ``ari`` of its class's top-ranked strategy with the artifact flag, ``best_ari`` over the class's
    strategies, ``rank`` (strategy rank of the best-matching one) and whether that one is flagged. The first
    artifact's figures are also ``artifact_ari``, ``artifact_best_ari`` and ``artifact_rank``.
    """
    if dataset.source != "builtin" or not dataset.artifacts:
        return {}
    kinds = dataset.manifest.set_index("sample_id").artifact_kind
    out = {}
    for artifact in dataset.artifacts:
        cue = dataset.classes.index(artifact["class"])
        rows = samples[samples.group == cue]
        truth = (kinds.loc[rows.sample_id] == artifact["kind"]).to_numpy()
        key = f"{artifact['class']}/{artifact['kind']}"
        if not truth.any():
            out[key] = {"ari": 0.0, "best_ari": 0.0, "rank": None, "flagged": False}
            continue
        own = strategies[strategies.class_index == cue]
        ari_of = {int(r.strategy): adjusted_rand_score(truth, rows.strategy.to_numpy() == r.strategy)
                  for r in own.itertuples()}  # fmt: skip
        best = max(ari_of, key=ari_of.get)
        best_row = own[own.strategy == best].iloc[0]
        out[key] = {"ari": float(ari_of[int(own.strategy.iloc[0])]), "best_ari": float(ari_of[best]),
                    "rank": int(best_row.strategy_rank), "flagged": bool(best_row.flagged)}  # fmt: skip
    first = out[f"{dataset.artifacts[0]['class']}/{dataset.artifacts[0]['kind']}"]
    return {"artifact_ari": first["ari"], "artifact_best_ari": first["best_ari"], "artifact_rank": first["rank"],
            "artifacts": out}  # fmt: skip
