"""SpRAy at scale: audits.SpRAy against CoRelAy's spectral pipeline on the same planted maps, in one run.

    python benchmarks/spray_scale.py                       # N = 2k, 10k, 20k against CoRelAy, then 100k alone
    python benchmarks/spray_scale.py --sizes 2000 --large 0

Each fit runs in a fresh subprocess, so peak memory (max RSS growth during the fit) is its own. The maps are
32x32 with three planted strategies (70/20/10%) and noise; ARI is against the planted labels. SpRAy runs with its
defaults (eigengap k, stability over 3 extra seeds, no 2-D embeddings: those are for looking, not clustering).
CoRelAy runs its ``SpectralClustering`` pipeline with its defaults (dense pairwise distances, 10-NN, 32 eigenvalues,
2-means). Targets: >= 5x faster, <= 1/5 memory, ARI >= 0.95; 100k maps of one class in < 2 min and < 4 GB.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def planted_maps(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three strategies (a blob, a bar, a ring at different places), 70/20/10%, with multiplicative noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    bases = [
        np.exp(-((yy - 10) ** 2 + (xx - 10) ** 2) / 30.0),
        ((yy > 22) & (yy < 27)).astype(float),
        np.exp(-((np.hypot(yy - 16, xx - 22) - 6) ** 2) / 4.0),
    ]
    counts = (np.array([0.7, 0.2, 0.1]) * n).astype(int)
    counts[0] += n - counts.sum()
    truth = np.repeat(np.arange(3), counts)
    maps = np.empty((n, size, size), dtype=np.float32)
    start = 0
    for base, count in zip(bases, counts):
        maps[start : start + count] = base * (0.5 + rng.random((count, size, size))) + 0.3 * rng.random(
            (count, size, size)
        )
        start += count
    order = rng.permutation(n)
    return maps[order], truth[order]


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one(method: str, n: int) -> dict:
    """Fit once in this process; report seconds, peak RSS growth and ARI."""
    from sklearn.metrics import adjusted_rand_score

    maps, truth = planted_maps(n)
    if method == "spray":
        from audits import SpRAy

        before = _rss_mb()
        start = time.perf_counter()
        spray = SpRAy(random_state=0, embeddings=()).fit(maps)
        seconds, labels, k = time.perf_counter() - start, spray.labels_, spray.n_clusters_
    else:
        from corelay.pipeline.spectral import SpectralClustering

        features = maps.reshape(n, -1).astype(np.float64)
        before = _rss_mb()
        start = time.perf_counter()
        (_eigenvalues, _eigenvectors), labels = SpectralClustering()(features)
        seconds, k = time.perf_counter() - start, int(len(np.unique(labels)))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "method": method,
        "n": n,
        "seconds": round(seconds, 2),
        "peak_rss_growth_mb": round(peak - before, 1),
        "ari": round(float(adjusted_rand_score(truth, labels)), 4),
        "k": k,
    }


def _subprocess(method: str, n: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--one", method, str(n)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="*", type=int, default=[2000, 10000, 20000])
    parser.add_argument("--large", type=int, default=100_000, help="N for the SpRAy-only scale run (0: skip)")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]))))
        return 0
    try:
        import corelay  # noqa: F401

        have_corelay = True
    except ImportError:
        have_corelay = False
    rows = []
    for n in args.sizes:
        ours = _subprocess("spray", n)
        row = {"n": n, "spray": ours}
        if have_corelay:
            theirs = _subprocess("corelay", n)
            row["corelay"] = theirs
            row["speedup"] = round(theirs["seconds"] / ours["seconds"], 2)
            row["memory_ratio"] = round(ours["peak_rss_growth_mb"] / max(theirs["peak_rss_growth_mb"], 1e-9), 4)
            row["targets_met"] = row["speedup"] >= 5 and row["memory_ratio"] <= 0.2 and ours["ari"] >= 0.95
        rows.append(row)
    report = {"benchmark": "spray_scale", "maps": "32x32, 3 planted strategies 70/20/10%", "results": rows}
    if not have_corelay:
        report["corelay"] = "not installed (pip install corelay) -- comparison skipped"
    if args.large:
        large = _subprocess("spray", args.large)
        large["targets_met"] = large["seconds"] < 120 and large["peak_rss_growth_mb"] < 4096
        report["large"] = large
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
