"""The ``spray`` stage: SpRAy per class on a relevance store, Clever-Hans ranking, files for people and unlearning.

Writes to ``spray/<model>/``:

- ``samples.parquet``: sample_id, label, class_name, group, cluster (chosen k), cluster_k2..cluster_kK,
  ch_rank (rank of the sample's cluster, 1 = first), tsne_x/y, umap_x/y;
- ``classes.json``: per class the eigenvalues, gaps, chosen k, gap strength, stability, kNN degree;
- ``clusters.parquet`` / ``clusters.csv``: all clusters ranked by Clever-Hans score (``audits.clever_hans``);
- ``cluster_means.npz``: mean map of every cluster (key ``<class index>/<cluster>``) and its medoid's map
  (``medoid/<class index>/<cluster>``), both normalised as clustered;
- ``members/<class>__cluster<j>.json`` and ``.csv``: the sample ids of every cluster;

and metrics JSON (for the built-in data also ``artifact_ari`` and ``artifact_rank``, scored with ground truth that
the method never sees).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import adjusted_rand_score
from tqdm.auto import tqdm

from audits import SpRAy
from audits.clever_hans import FLAG_THRESHOLD, cluster_statistics, rank_clusters

from .datasets import load_dataset
from .io import write_json, write_with
from .params import section
from .relevance_store import RelevanceStore

__all__ = ["SPRAY_DEFAULTS", "run_spray", "members_stem"]

SPRAY_DEFAULTS = {
    "group_by": "label",  # or "prediction"
    "pooled_size": None,  # None: the store's pooled maps as they are
    "normalization": "abs",
    "n_neighbors": None,
    "k_max": 8,
    "heat_kernel": False,
    "relative_gap": True,
    "stability_seeds": 3,
    "embeddings": ["tsne", "umap"],
    "random_state": 0,
    "flag_threshold": FLAG_THRESHOLD,
    "n_exemplars": 6,
}


def members_stem(out: Path, class_name: str, class_index: int, cluster: int) -> Path:
    """``<out>/members/<class>__cluster<j>`` (add ``.json`` or ``.csv``). A class name that is not a safe file name
    is reduced to one and gets its class index appended, so two such names never share a file."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", class_name)[:80].lstrip(".")
    if safe != class_name:
        safe = f"{safe or 'class'}-{int(class_index)}"
    return Path(out) / "members" / f"{safe}__cluster{int(cluster)}"


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
    dataset = load_dataset(prepared)
    out = Path(out)
    (out / "members").mkdir(parents=True, exist_ok=True)
    table["group"] = table[settings["group_by"]]
    samples, class_info, cluster_rows, means = [], {}, [], {}
    k_max = settings["k_max"]
    for k_index, name in enumerate(tqdm(classes, desc="spray", disable=not progress)):
        idx = np.flatnonzero(table.group.to_numpy() == k_index)
        if len(idx) < 3:
            class_info[name] = {"n_samples": int(len(idx)), "skipped": "fewer than 3 samples"}
            continue
        spray = SpRAy(
            pooled_size=settings["pooled_size"],
            normalization=settings["normalization"],
            n_neighbors=settings["n_neighbors"],
            k_max=k_max,
            heat_kernel=settings["heat_kernel"],
            relative_gap=settings["relative_gap"],
            stability_seeds=settings["stability_seeds"],
            embeddings=tuple(e for e in settings["embeddings"] if len(idx) >= 10),
            random_state=settings["random_state"],
        ).fit(pooled[idx])
        side = int(round(np.sqrt(spray.features_.shape[1])))
        stats, class_means = cluster_statistics(
            spray.features_, spray.labels_, (side, side), table.correct.to_numpy()[idx], settings["n_exemplars"]
        )
        stats.insert(0, "class_name", name)
        stats.insert(1, "class_index", k_index)
        stats["k"] = spray.n_clusters_
        for j, medoid in zip(stats.cluster, stats.medoid):
            means[f"medoid/{k_index}/{j}"] = spray.features_[medoid].reshape(side, side).astype(np.float32)
        stats["exemplars"] = [table.sample_id.iloc[idx[e]].tolist() for e in stats.exemplars]
        stats["medoid"] = [table.sample_id.iloc[idx[m]] for m in stats.medoid]
        cluster_rows.append(stats)
        for j, mean in enumerate(class_means):
            means[f"{k_index}/{j}"] = mean.astype(np.float32)
        class_info[name] = {
            "n_samples": int(len(idx)),
            "eigenvalues": spray.eigenvalues_.tolist(),
            "gaps": spray.gaps_.tolist(),
            "n_clusters": spray.n_clusters_,
            "gap_strength": spray.gap_strength_,
            "stability": spray.stability_,
            "n_neighbors": spray.n_neighbors_,
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
    ranked = rank_clusters(pd.concat(cluster_rows, ignore_index=True), settings["flag_threshold"])
    samples = pd.concat(samples, ignore_index=True)
    rank_of = {(r.class_index, r.cluster): r.ch_rank for r in ranked.itertuples()}
    samples["ch_rank"] = [rank_of[(g, c)] for g, c in zip(samples.group, samples.cluster)]
    samples = samples.sort_values("index").reset_index(drop=True)

    for r in ranked.itertuples():
        members = samples.sample_id[(samples.group == r.class_index) & (samples.cluster == r.cluster)].tolist()
        stem = members_stem(out, r.class_name, r.class_index, r.cluster)
        write_json(
            stem.with_suffix(".json"),
            {"class_name": r.class_name, "cluster": int(r.cluster), "ch_rank": int(r.ch_rank), "sample_ids": members},
        )
        write_with(
            stem.with_suffix(".csv"), lambda tmp, m=members: pd.DataFrame({"sample_id": m}).to_csv(tmp, index=False)
        )
    write_with(out / "samples.parquet", lambda tmp: samples.to_parquet(tmp, index=False))
    write_with(out / "clusters.parquet", lambda tmp: ranked.to_parquet(tmp, index=False))
    write_with(out / "clusters.csv", lambda tmp: ranked.drop(columns=["exemplars"]).to_csv(tmp, index=False))
    write_with(out / "cluster_means.npz", lambda tmp: _save_npz(tmp, means))
    write_json(out / "classes.json", class_info)

    metrics = {
        "n_samples": int(len(samples)),
        "n_clusters": int(len(ranked)),
        "n_flagged": int(ranked.flagged.sum()),
        "top_ch_score": float(ranked.ch_score.iloc[0]),
        "top_cluster": f"{ranked.class_name.iloc[0]}/{int(ranked.cluster.iloc[0])}",
    }
    metrics.update(_score_with_ground_truth(dataset, samples, ranked))
    write_json(metrics_out, metrics)
    return metrics


def _save_npz(path: Path, arrays: dict) -> None:
    with open(path, "wb") as fh:
        np.savez_compressed(fh, **arrays)


def _score_with_ground_truth(dataset, samples: pd.DataFrame, ranked: pd.DataFrame) -> dict:
    """Built-in data only: how well the ranking found the planted stamp (the method never sees the flag)."""
    if dataset.source != "builtin" or dataset.poisoned_class is None:
        return {}
    flags = dataset.manifest.set_index("sample_id").artifact
    poisoned = dataset.classes.index(dataset.poisoned_class)
    rows = samples[samples.group == poisoned]
    truth = flags.loc[rows.sample_id].to_numpy()
    if not truth.any():
        return {"artifact_ari": 0.0, "artifact_rank": None}
    class_ranked = ranked[ranked.class_index == poisoned]
    top = int(class_ranked.cluster.iloc[0])
    ari_of = {int(c): adjusted_rand_score(truth, rows.cluster.to_numpy() == c) for c in class_ranked.cluster}
    best = max(ari_of, key=ari_of.get)
    rank = int(class_ranked.ch_rank[class_ranked.cluster == best].iloc[0])
    return {"artifact_ari": float(ari_of[top]), "artifact_rank": rank, "artifact_best_ari": float(ari_of[best])}
