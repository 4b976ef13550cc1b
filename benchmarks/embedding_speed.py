"""The spray stage's 2-D pictures: audits.embedding against plain scikit-learn t-SNE and umap-learn, in one run.

    python benchmarks/embedding_speed.py                  # 6 classes of 500 points in 8 dimensions
    python benchmarks/embedding_speed.py --classes 2 --points 3000

Each side runs in a fresh subprocess, as a stage does: UMAP's numba compilation is paid once per process, and
that is most of what audits.embedding saves. Both embed the same seeded classes (Gaussian clusters of different
spreads, like spectral coordinates); quality is the trustworthiness at 10 neighbours (1 = every embedded
neighbourhood is a true one). Baseline: ``TSNE()`` (1,000 iterations) and ``umap.UMAP(random_state=...)``.
Targets: >= 1.5x faster in all, trustworthiness within 0.005 of the baseline's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def classes(n_classes: int, n_points: int, dims: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n_classes):
        centers = rng.normal(size=(3, dims)) * 3
        sizes = (np.array([0.6, 0.3, 0.1]) * n_points).astype(int)
        sizes[0] += n_points - sizes.sum()
        parts = [rng.normal(size=(s, dims)) * (0.5 + j * 0.4) + centers[j] for j, s in enumerate(sizes)]
        out.append(np.concatenate(parts).astype(np.float32))
    return out


def run_side(side: str, n_classes: int, n_points: int, dims: int) -> dict:
    import warnings

    from sklearn.manifold import trustworthiness

    warnings.simplefilter("ignore")
    data = classes(n_classes, n_points, dims)
    started = time.perf_counter()
    if side == "ours":
        from audits import embedding

        pictures = [(embedding.tsne(x, 0), embedding.umap(x, 15, 0)) for x in data]
    else:
        import umap
        from sklearn.manifold import TSNE

        pictures = [(TSNE(2, perplexity=30, init="pca", random_state=0).fit_transform(x),
                     umap.UMAP(n_neighbors=15, random_state=0, n_jobs=1).fit_transform(x)) for x in data]  # fmt: skip
    seconds = time.perf_counter() - started
    trust = {
        name: float(np.mean([trustworthiness(x, p[i], n_neighbors=10) for x, p in zip(data, pictures)]))
        for i, name in enumerate(("tsne", "umap"))
    }
    return {"seconds": seconds, "trustworthiness": trust}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--points", type=int, default=500)
    parser.add_argument("--dims", type=int, default=8)
    parser.add_argument("--side", choices=("ours", "baseline"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args.classes, args.points, args.dims)))
        return
    results = {}
    for side in ("baseline", "ours"):
        command = [sys.executable, __file__, "--side", side, "--classes", str(args.classes),
                   "--points", str(args.points), "--dims", str(args.dims)]  # fmt: skip
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[side] = json.loads(out.strip().splitlines()[-1])
    ours, base = results["ours"], results["baseline"]
    speedup = base["seconds"] / ours["seconds"]
    worst = max(base["trustworthiness"][k] - ours["trustworthiness"][k] for k in ("tsne", "umap"))
    print(json.dumps({
        "classes": args.classes, "points": args.points, "dims": args.dims,
        "seconds": {"ours": round(ours["seconds"], 1), "baseline": round(base["seconds"], 1)},
        "speedup": round(speedup, 2),
        "trustworthiness": {"ours": ours["trustworthiness"], "baseline": base["trustworthiness"]},
        "trustworthiness_loss": round(worst, 4),
        "pass": bool(speedup >= 1.5 and worst <= 0.005),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
