"""A synthetic audit page: any number of classes and samples, with chosen names (the tests use hostile ones).

    python -m audits.report.demo demo.html --classes 6 --per-class 300

It exercises every part of the page without a model, which makes it the fixture of the report's browser tests and
of ``benchmarks/report_scale.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from .audit import AuditView, ClassView, ClusterView, Thumb, render_audit

__all__ = ["synthetic_view", "main"]


def _thumb(rng: np.random.Generator, sample_id: str, size: int) -> Thumb:
    yy, xx = np.mgrid[:size, :size] / size
    cx, cy = rng.random(2)
    blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) * 20)
    image = (np.stack([blob, 1 - blob, 0.5 * np.ones_like(blob)], -1) * 255).astype(np.uint8)
    relevance = blob - 0.3 * np.exp(-((xx - cy) ** 2 + (yy - cx) ** 2) * 30)
    return Thumb(sample_id, image, relevance)


def synthetic_view(
    n_classes: int = 3,
    per_class: int = 60,
    *,
    names: list[str] | None = None,
    id_prefix: str = "img",
    exemplars: int = 2,
    hover: int = 6,
    max_points: int | None = None,
    thumb: int = 32,
    seed: int = 0,
) -> AuditView:
    rng = np.random.default_rng(seed)
    names = names or [f"class {i}" for i in range(n_classes)]
    classes = []
    for c, name in enumerate(names):
        k = 2 + c % 3
        labels = rng.integers(0, k, per_class)
        labels[:k] = np.arange(k)
        ids = [f"{id_prefix}/{c}/{i:05d}.png" for i in range(per_class)]
        centers = rng.normal(size=(k, 2)) * 5
        xy = centers[labels] + rng.normal(size=(per_class, 2))
        points = pd.DataFrame({"sample_id": ids, "cluster": labels, "tsne_x": xy[:, 0], "tsne_y": xy[:, 1]})
        points["umap_x"], points["umap_y"] = -xy[:, 1], xy[:, 0]
        if max_points is not None and per_class > max_points:
            points = points.iloc[np.sort(rng.choice(per_class, max_points, replace=False))]
        clusters = [
            ClusterView(
                cluster=j,
                size=int((labels == j).sum()),
                ch_score=float(rng.random() * 0.3 if (c, j) != (0, 1) else 12.0),
                ch_rank=0,
                flagged=(c, j) == (0, 1),
                mean_relevance=_thumb(rng, "mean", thumb).relevance,
                exemplars=[_thumb(rng, ids[i], thumb) for i in np.flatnonzero(labels == j)[:exemplars]],
                stats={"distance_from_rest": 0.3, "moved_concentration": 0.5, "misclassified_share": 0.0},
                members={"json": f"../spray/members/c{c}__cluster{j}.json"},
                strategy=j,
                evidence={
                    "conductance": 0.001 if (c, j) == (0, 1) else 0.09,
                    "null_conductance": 0.09,
                    "p_value": 1e-12 if (c, j) == (0, 1) else 0.5,
                    "relevance_gain": 2.5,
                },  # fmt: skip
            )
            for j in range(k)
        ]
        eigenvalues = np.sort(np.concatenate([rng.random(k) * 0.01, 0.2 + rng.random(8)]))
        classes.append(
            ClassView(
                name=name,
                n_samples=per_class,
                clusters=clusters,
                eigenvalues=eigenvalues,
                n_clusters=k,
                details={"gap strength": 3.0},
                points=points,
                hover=[_thumb(rng, s, thumb) for s in points.sample_id.iloc[:hover]],
            )
        )
    ranked = sorted((cl for cv in classes for cl in cv.clusters), key=lambda cl: -cl.ch_score)
    for rank, cl in enumerate(ranked, 1):
        cl.ch_rank = rank
    return AuditView(
        title=f"synthetic audit of {names[0]}",
        facts={"model": "synthetic", "data": names[0]},
        classes=classes,
        flag_rule="demo: one planted strategy",
        provenance={"parameters": {"class names": names[:3]}},
    )


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--per-class", type=int, default=300)
    args = parser.parse_args(argv)
    args.out.write_text(render_audit(synthetic_view(args.classes, args.per_class, thumb=64)), encoding="utf-8")
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
