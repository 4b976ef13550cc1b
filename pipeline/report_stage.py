"""The ``report`` stage: the SpRAy results of one model as a standalone HTML audit page.

Reads the spray outputs (``samples.parquet``, ``clusters.parquet``, ``classes.json``), the relevance store (full
resolution maps, for thumbnails and cluster mean maps) and the prepared data (the input images), and fills an
:class:`audits.report.AuditView`. Work is bounded whatever N is: cluster mean maps are accumulated in one streaming
pass over the store at thumbnail resolution, and only the exemplars, a sample of hover thumbnails per class and at
most ``max_points`` scatter points per class are loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from audits.pooling import sum_pool_matrix
from audits.report import AuditView, ClassView, ClusterView, Thumb, render_audit
from audits.report.images import downsize

from .datasets import Dataset, load_dataset, load_images
from .io import write_bytes
from .params import section
from .provenance import code_version
from .relevance_store import RelevanceStore
from .spray_stage import members_stem

__all__ = ["REPORT_DEFAULTS", "run_report", "build_audit_view", "picture_quotas"]

REPORT_DEFAULTS = {
    "exemplars": 4,  # per cluster, each as input / heatmap / overlay
    "thumb_size": 64,  # longest side of every picture in the page, in pixels
    "hover_thumbnails": 32,  # per class: points of the scatter plots that show their pictures on hover
    "max_points": 5000,  # per class: scatter points drawn (a stated random sample beyond that)
    "open_classes": 12,  # class sections open on load; the others render when opened
    "n_candidates": 5,  # Clever-Hans candidates listed even when fewer are flagged
    "page_thumbnails": 2000,  # samples pictured in the whole page; beyond it the per-class numbers shrink
    "random_state": 0,
}
SPRAY_FILES = ("samples.parquet", "clusters.parquet", "classes.json", "strategies.json")


def _read_spray(spray_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict, dict]:
    for name in SPRAY_FILES:
        if not (spray_dir / name).is_file():
            raise FileNotFoundError(f"spray results incomplete: {spray_dir / name} is missing (run the spray stage)")
    samples = pd.read_parquet(spray_dir / "samples.parquet")
    clusters = pd.read_parquet(spray_dir / "clusters.parquet")
    classes = json.loads((spray_dir / "classes.json").read_text())
    strategies = json.loads((spray_dir / "strategies.json").read_text())
    return samples, clusters, classes, strategies


def _evidence(strategies: dict) -> tuple[dict, str]:
    """Per (class index, strategy): the numbers the page shows; and the flag rule in words."""
    evidence = {}
    for s in strategies["strategies"]:
        evidence[(s["class_index"], s["strategy"])] = {
            "conductance": float("nan") if s["conductance"] is None else s["conductance"],
            "null_conductance": s["null_conductance"],
            "p_value": s["p_value"],
            "relevance_gain": float("nan") if s["relevance_gain"] is None else s["relevance_gain"],
            # one side of a cut through one strategy is typically this many times as sure as the other
            "null_gain": strategies.get("gain_null", {}).get("margin", float("nan")),
        }
    side = strategies.get("side_threshold")
    rule = (f"p < {strategies['p_threshold']:.2g}: false-alarm rate {strategies['false_alarm_rate']:g} over the "
            f"audit's clusters, and the model more sure of the members than of the rest by more than the parts of "
            f"one strategy are of each other"
            + (f" (p < {side:.2g} over the isolated strategies)" if side else ""))  # fmt: skip
    return evidence, rule


def _stream_cluster_means(heatmap, samples: pd.DataFrame, side: tuple[int, int], progress: bool) -> dict:
    """Mean of each cluster's maps (each divided by its sum of |R|, signs kept) at thumbnail size, in one pass."""
    n, h, w = heatmap.shape
    slot = np.full(n, -1, dtype=np.int64)
    keys = sorted(set(zip(samples.group.tolist(), samples.cluster.tolist())))
    slot_of = {k: i for i, k in enumerate(keys)}
    slot[samples["index"].to_numpy()] = [slot_of[k] for k in zip(samples.group.tolist(), samples.cluster.tolist())]
    rows, cols = sum_pool_matrix(h, side[0]), sum_pool_matrix(w, side[1])
    sums = np.zeros((len(keys), *side))
    counts = np.bincount(slot[slot >= 0], minlength=len(keys))
    step = heatmap.chunks[0] * max(1, 4096 // heatmap.chunks[0])
    for start in tqdm(range(0, n, step), desc="cluster means", disable=not progress):
        block = np.asarray(heatmap[start : start + step], dtype=np.float64)
        ids = slot[start : start + len(block)]
        keep = ids >= 0
        block = block[keep]
        total = np.abs(block).sum((1, 2), keepdims=True)
        block = block / np.where(total > 0, total, 1)
        np.add.at(sums, ids[keep], np.einsum("ih,nhw,jw->nij", rows, block, cols, optimize=True))
    return {k: sums[i] / max(counts[i], 1) for k, i in slot_of.items()}


def picture_quotas(n_classes: int, n_clusters: int, settings: dict) -> tuple[int, int]:
    """(hover thumbnails per class, exemplars per cluster) within the page's picture budget: half for each kind,
    never below one exemplar per cluster. A page with 100 classes stays a few tens of MB."""
    budget = int(settings["page_thumbnails"])
    hover = min(int(settings["hover_thumbnails"]), budget // max(2 * n_classes, 1))
    exemplars = min(int(settings["exemplars"]), max(1, budget // max(2 * n_clusters, 1)))
    return hover, exemplars


def _pick_hover(rows: pd.DataFrame, n: int, rng: np.random.Generator) -> list[str]:
    """Up to ``n`` sample ids, spread over the clusters (round robin over shuffled members)."""
    pools = [list(rng.permutation(g.sample_id.to_numpy())) for _, g in rows.groupby("cluster", sort=True)]
    picked: list[str] = []
    while len(picked) < n and any(pools):
        for pool in pools:
            if pool and len(picked) < n:
                picked.append(pool.pop())
    return picked


def _stability_text(stability) -> str:
    if not isinstance(stability, dict):
        return "–"
    parts = [f"{k.replace('_', ' ')} {v:.2f}" for k, v in stability.items() if k != "seeds" and isinstance(v, float)]
    return ", ".join(parts) + (f" ({stability['seeds']} seeds)" if "seeds" in stability else "")


def _href(target: Path, page: Path) -> str:
    return quote(os.path.relpath(target, page.parent).replace(os.sep, "/"))


def build_audit_view(
    params: dict,
    spray_dir: Path,
    store_dir: Path,
    prepared: Path,
    out: Path,
    progress: bool = False,
    evaluation: tuple[Path, Path] | None = None,
) -> tuple[AuditView, dict]:
    """The page's data; ``evaluation`` = (metrics/evaluate.json, evaluation/curves.json) adds the quality section."""
    settings = section(params, "report", REPORT_DEFAULTS)
    spray_dir, out = Path(spray_dir), Path(out)
    samples, clusters, class_info, strategies = _read_spray(spray_dir)
    evidence, flag_rule = _evidence(strategies)
    store = RelevanceStore(store_dir)
    group = store.open()
    attrs = dict(group.attrs)
    heatmap = group["heatmap"]
    if heatmap.shape[0] <= samples["index"].max():
        raise ValueError(
            f"{spray_dir} does not belong to {store_dir}: sample indices beyond the store's {heatmap.shape[0]}"
        )
    dataset: Dataset = load_dataset(prepared)
    classes = list(attrs["classes"])
    size = int(heatmap.shape[1])
    thumb = int(settings["thumb_size"])
    side = downsize(np.zeros(heatmap.shape[1:]), thumb).shape
    rng = np.random.default_rng(settings["random_state"])

    means = _stream_cluster_means(heatmap, samples, side, progress)
    index_of = dict(zip(samples.sample_id, samples["index"]))
    n_hover, n_exemplars = picture_quotas(len(classes), len(clusters), settings)
    chosen: dict[str, dict] = {}
    for k_index, name in enumerate(classes):
        rows = samples[samples.group == k_index]
        ranked = clusters[clusters.class_index == k_index]
        exemplars = {int(r.cluster): list(r.exemplars)[:n_exemplars] for r in ranked.itertuples()}
        hover = _pick_hover(rows, n_hover, rng) if len(rows) else []
        points = rows
        if len(rows) > settings["max_points"]:
            keep = rng.choice(len(rows), int(settings["max_points"]), replace=False)
            keep = np.union1d(keep, np.flatnonzero(rows.sample_id.isin(hover).to_numpy()))
            points = rows.iloc[np.sort(keep)]
        chosen[name] = {"exemplars": exemplars, "hover": hover, "points": points}
    needed = sorted(
        {s for c in chosen.values() for s in (*c["hover"], *(i for e in c["exemplars"].values() for i in e))}
    )
    pictures = _load_pictures(dataset, heatmap, needed, index_of, size, thumb, progress)

    class_views = []
    for k_index, name in enumerate(classes):
        info = class_info.get(name, {})
        rows = samples[samples.group == k_index]
        if "skipped" in info or not len(rows):
            class_views.append(
                ClassView(name, int(info.get("n_samples", len(rows))), skipped=info.get("skipped", "no samples"))
            )
            continue
        cluster_views = []
        for r in clusters[clusters.class_index == k_index].sort_values("cluster").itertuples():
            stem = members_stem(spray_dir, name, k_index, r.cluster)
            cluster_views.append(
                ClusterView(
                    cluster=int(r.cluster),
                    size=int(r.size),
                    ch_score=float(r.ch_score),
                    ch_rank=int(r.ch_rank),
                    flagged=bool(r.flagged),
                    mean_relevance=means[(k_index, int(r.cluster))],
                    exemplars=[pictures[s] for s in chosen[name]["exemplars"][int(r.cluster)]],
                    stats={
                        "distance_from_rest": float(r.distance_from_rest),
                        "moved_concentration": float(r.moved_concentration),
                        "misclassified_share": float(r.misclassified_share),
                    },
                    members={
                        ext: _href(stem.with_suffix(f".{ext}"), out)
                        for ext in ("json", "csv")
                        if stem.with_suffix(f".{ext}").is_file()
                    },
                    strategy=int(r.strategy),
                    evidence=evidence.get((k_index, int(r.strategy)), {}),
                )
            )
        embedding_columns = [c for c in rows.columns if c.endswith(("_x", "_y"))]
        class_views.append(
            ClassView(
                name=name,
                n_samples=int(len(rows)),
                clusters=cluster_views,
                eigenvalues=np.asarray(info["eigenvalues"]),
                n_clusters=int(info["n_clusters"]),
                details={
                    "gap strength": info.get("gap_strength"),
                    "stability over seeds": _stability_text(info.get("stability")),
                    "kNN degree": info.get("n_neighbors"),
                    "strategies": info.get("n_strategies"),
                },
                points=chosen[name]["points"][["sample_id", "cluster", *embedding_columns]]
                if embedding_columns
                else None,
                hover=[pictures[s] for s in chosen[name]["hover"]],
            )
        )

    facts = {
        "model": f"{attrs.get('arch', '?')} (sha256 {str(attrs.get('model_sha256', ''))[:12]})",
        "data": "built-in Clever-Hans benchmark" if dataset.source == "builtin" else str(dataset.root),
        "split audited": attrs.get("split", "?"),
        "explained": f"the {attrs.get('target', 'label')} logit",
        "composite": attrs.get("composite", "?"),
        "clustered by": params.get("spray", {}).get("group_by", "label"),
        "classes": f"{len(classes):,}",
        "samples": f"{len(samples):,}",
    }
    provenance = {
        "code version": code_version(),
        "relevance store": {k: attrs.get(k) for k in ("fingerprint", "code_version", "pooling", "precision", "layout")},
        "parameters": {k: params.get(k) for k in ("data", "model", "attribute", "spray", "report") if k in params},
        "inputs": {"spray results": str(spray_dir), "relevance store": str(store_dir), "data": str(prepared)},
    }
    view = AuditView(
        title=f"SpRAy audit: {attrs.get('arch', 'model')} on {facts['data']}",
        facts=facts,
        classes=class_views,
        flag_rule=flag_rule,
        provenance=provenance,
        n_candidates=int(settings["n_candidates"]),
        evaluation=_read_evaluation(evaluation),
    )
    return view, settings


def _read_evaluation(paths: tuple[Path, Path] | None) -> dict | None:
    if paths is None:
        return None
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} is missing (run the evaluate stage)")
    metrics, curves = (json.loads(Path(p).read_text()) for p in paths)
    return {"metrics": metrics, "curves": curves}


def _load_pictures(
    dataset: Dataset, heatmap, sample_ids: list[str], index_of: dict, size: int, thumb: int, progress: bool
) -> dict[str, Thumb]:
    if not sample_ids:
        return {}
    manifest = dataset.manifest.set_index("sample_id")
    missing = [s for s in sample_ids if s not in manifest.index]
    if missing:
        raise ValueError(f"sample {missing[0]!r} of the spray results is not in the prepared data set {dataset.root}")
    indices = np.array([index_of[s] for s in sample_ids])
    order = np.argsort(indices)
    maps = np.empty((len(indices), *heatmap.shape[1:]), dtype=np.float32)
    maps[order] = heatmap.oindex[indices[order]]
    images = load_images(dataset.root, manifest.path.loc[sample_ids], size, progress=progress)
    return {
        s: Thumb(
            s, downsize(images[i].transpose(1, 2, 0), thumb), downsize(maps[i].astype(np.float64), thumb, conserve=True)
        )
        for i, s in enumerate(sample_ids)
    }


def run_report(
    params: dict,
    spray_dir: Path,
    store_dir: Path,
    prepared: Path,
    out: Path,
    progress: bool = True,
    evaluation: tuple[Path, Path] | None = None,
) -> dict:
    """Write the audit page to ``out`` atomically; returns figures about it."""
    view, settings = build_audit_view(params, spray_dir, store_dir, prepared, out, progress, evaluation)
    page = render_audit(view, open_classes=int(settings["open_classes"]))
    write_bytes(out, page.encode("utf-8"))
    return {
        "path": str(out),
        "bytes": len(page.encode("utf-8")),
        "classes": len(view.classes),
        "flagged": sum(c.flagged for cv in view.classes for c in cv.clusters),
    }
