"""SpRAy on planted strategies it was not tuned on, against a plain sparse spectral baseline, in one run.

    python benchmarks/spray_planted.py                 # the whole family, 3 seeds (about 10 minutes on 2 cores)
    python benchmarks/spray_planted.py --seeds 1 --groups size noise

The family (``audits.planted``) sweeps one factor at a time around a base condition (48 px maps, 400 per class,
three strategies 60/25/15%: the object anywhere, plus a corner stamp, plus an edge watermark; noise 0.2 of the
peak; per-map scale 0.5-2x): map size 16-224 px, noise 0-0.5, per-map scale, shares down to 5%, cue types (frame,
edge, a broad region, a ring, a spot that moves), disconnected strategies, near-duplicate and all-zero maps, N,
and weak cues.

- **ours**: ``audits.SpRAy`` with its defaults. ``k`` is the number of strategies it reports (clusters whose split
  is not significant against the class's own null are merged; ``audits.strategies``), ``n_clusters`` the eigengap's
  k; ``ari`` is that of its clusters (``labels_``), ``ari_strategies`` that of the merged strategies.
- **baseline**: the textbook pipeline: maps sum-pooled to 16x16 and L1-normalised, a 10-NN 0/1 graph, the
  normalised Laplacian, k = the largest absolute eigengap in [2, 8], k-means on the row-normalised eigenvectors.

A condition is *separable* when k-means on the true number of strategies separates them (ARI >= 0.9, with ours or
the baseline's embedding). Targets: k right in >= 90% of the separable conditions; mean ARI >= the baseline's in
every group and never more than 0.05 below it in any one condition. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from audits import SpRAy  # noqa: E402
from audits.graph import knn_affinity, spectral_embedding  # noqa: E402
from audits.planted import PlantedSpec, make_planted_maps  # noqa: E402
from audits.pooling import normalize_maps, sum_pool  # noqa: E402

P = PlantedSpec
FAMILY = {
    "size": {f"size{s}": P(size=s) for s in (16, 32, 64, 128, 224)},
    "noise": {f"noise{v}": P(noise=v) for v in (0.0, 0.1, 0.3, 0.5)},
    "scale": {"scale1": P(scale=(1, 1)), "scale0.2-5": P(scale=(0.2, 5))},
    "shares": {
        "50-50": P(shares=(0.5, 0.5), cues=("none", "corner")),
        "70-20-10": P(shares=(0.7, 0.2, 0.1)),
        "55-25-12-8": P(shares=(0.55, 0.25, 0.12, 0.08), cues=("none", "corner", "edge", "frame")),
        "85-10-5": P(n=600, shares=(0.85, 0.1, 0.05)),
        "90-5-5": P(n=600, shares=(0.9, 0.05, 0.05)),
    },
    "cues": {
        "frame": P(shares=(0.7, 0.3), cues=("none", "frame")),
        "edge": P(shares=(0.7, 0.3), cues=("none", "edge")),
        "region-ring": P(shares=(0.5, 0.3, 0.2), cues=("none", "region", "ring")),
        "no-object-only": P(shares=(0.4, 0.35, 0.25), cues=("corner", "edge", "frame")),
        "spot": P(shares=(0.7, 0.3), cues=("none", "spot")),
        "spot-corner": P(shares=(0.6, 0.25, 0.15), cues=("none", "spot", "corner")),
    },
    "components": {
        "strong3": P(shares=(0.6, 0.25, 0.15), weight=(0.85, 0.95), noise=0.05),
        "strong4": P(
            shares=(0.55, 0.25, 0.12, 0.08), cues=("none", "region", "corner", "frame"), weight=(0.85, 0.95), noise=0.05
        ),  # fmt: skip
    },
    "duplicates": {f"dup{v}": P(duplicates=v) for v in (0.1, 0.3)},
    "zeros": {f"zeros{v}": P(zeros=v) for v in (0.02, 0.05)},
    "n": {f"n{v}": P(n=v) for v in (100, 1000, 3000)},
    "weak": {f"weak{v}": P(shares=(0.7, 0.2, 0.1), weight=(0.2, 0.35), noise=v) for v in (0.1, 0.2, 0.3)},
}


def baseline(maps: np.ndarray, k_true: int, k_max: int = 8) -> dict:
    """The textbook sparse spectral clustering (see the module docstring)."""
    features = normalize_maps(sum_pool(maps, min(16, maps.shape[1])), "abs").astype(np.float64)
    affinity = knn_affinity(features, min(10, len(maps) - 1), weighting="connectivity")
    eigenvalues, vectors, _ = spectral_embedding(affinity, k_max + 8, 0)
    gaps = np.diff(eigenvalues)
    candidates = np.arange(2, k_max + 1)
    k = int(candidates[np.argmax(gaps[candidates - 1])])

    def labels(k):
        points = vectors[:, :k] / np.maximum(np.linalg.norm(vectors[:, :k], axis=1, keepdims=True), 1e-12)
        return KMeans(k, n_init=10, random_state=0).fit_predict(points)

    return {"k": k, "labels": labels(k), "oracle": labels(k_true)}


def ours(maps: np.ndarray, k_true: int, **options) -> dict:
    spray = SpRAy(random_state=0, embeddings=(), stability_seeds=0, **options).fit(maps)
    strategies = spray.strategies()
    strategy_of = {c: i for i, s in enumerate(strategies) for c in s.clusters}
    labels = np.array([strategy_of[c] for c in spray.labels_])
    oracle = spray.labels_by_k_.get(k_true, spray.labels_)
    return {"k": len(strategies), "n_clusters": spray.n_clusters_, "labels": labels, "cluster_labels": spray.labels_,
            "oracle": oracle}  # fmt: skip


def run(groups: list[str], seeds: int, **options) -> dict:
    conditions = []
    for group in groups:
        for name, spec in FAMILY[group].items():
            rows = []
            for seed in range(seeds):
                maps, truth = make_planted_maps(spec, seed)
                k_true = len(np.unique(truth))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    started = time.perf_counter()
                    a = ours(maps, k_true, **options)
                    seconds = time.perf_counter() - started
                    b = baseline(maps, k_true)
                oracle = max(adjusted_rand_score(truth, a["oracle"]), adjusted_rand_score(truth, b["oracle"]))
                rows.append({
                    "k_true": k_true, "k": a["k"], "n_clusters": a["n_clusters"], "k_baseline": b["k"],
                    "ari": adjusted_rand_score(truth, a["cluster_labels"]),
                    "ari_strategies": adjusted_rand_score(truth, a["labels"]),
                    "ari_baseline": adjusted_rand_score(truth, b["labels"]),
                    "separable": oracle >= 0.9, "seconds": seconds,
                })  # fmt: skip
            conditions.append({
                "group": group, "condition": name,
                "k_true": rows[0]["k_true"], "k": [r["k"] for r in rows], "n_clusters": [r["n_clusters"] for r in rows],
                "k_baseline": [r["k_baseline"] for r in rows],
                "k_right": float(np.mean([r["k"] == r["k_true"] for r in rows if r["separable"]] or [np.nan])),
                "separable": int(sum(r["separable"] for r in rows)),
                "ari": float(np.mean([r["ari"] for r in rows])),
                "ari_strategies": float(np.mean([r["ari_strategies"] for r in rows])),
                "ari_baseline": float(np.mean([r["ari_baseline"] for r in rows])),
                "seconds": float(np.mean([r["seconds"] for r in rows])),
            })  # fmt: skip
            print(json.dumps(conditions[-1]), file=sys.stderr, flush=True)
    separable = [(c["k_right"], c["separable"]) for c in conditions if c["separable"]]
    k_right = sum(r * n for r, n in separable) / max(sum(n for _, n in separable), 1)
    by_group = {}
    for group in groups:
        rows = [c for c in conditions if c["group"] == group]
        by_group[group] = {
            "ari": float(np.mean([c["ari"] for c in rows])),
            "ari_baseline": float(np.mean([c["ari_baseline"] for c in rows])),
        }
    worst = min(conditions, key=lambda c: c["ari"] - c["ari_baseline"])
    summary = {
        "k_right_separable": k_right,
        "mean_ari": float(np.mean([c["ari"] for c in conditions])),
        "mean_ari_baseline": float(np.mean([c["ari_baseline"] for c in conditions])),
        "ari_ratio": float(np.mean([c["ari"] for c in conditions]) / np.mean([c["ari_baseline"] for c in conditions])),
        "groups": by_group,
        "worst_condition": {k: worst[k] for k in ("condition", "ari", "ari_baseline")},
        "targets": {
            "k_right_separable >= 0.9": k_right >= 0.9,
            "group mean ARI >= baseline": all(g["ari"] >= g["ari_baseline"] - 1e-9 for g in by_group.values()),
            "no condition more than 0.05 below": worst["ari"] >= worst["ari_baseline"] - 0.05,
        },
    }  # fmt: skip
    return {"summary": summary, "conditions": conditions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--groups", nargs="*", default=list(FAMILY), choices=list(FAMILY))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--gap-ratio", type=float, default=None, help="SpRAy's gap_ratio (default: its own).")
    parser.add_argument("--out", type=Path, default=None, help="Also write the JSON here.")
    args = parser.parse_args()
    options = {} if args.gap_ratio is None else {"gap_ratio": args.gap_ratio}
    result = run(args.groups, args.seeds, **options)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
