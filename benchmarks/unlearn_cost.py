"""Cost of one fine-tuning step per un-learning method against the plain (``vanilla``) step, same batch, one run.

    .venv/bin/python benchmarks/unlearn_cost.py                       # small_cnn, batch 32, 64 px, CPU
    .venv/bin/python benchmarks/unlearn_cost.py --arch vgg16 --size 224 --batch 16 --device cuda

Each method runs in its own subprocess (peak memory is its own: max RSS growth on CPU, peak allocated on CUDA);
steps are timed after warm-up, median of ``--steps``. The step is the unlearn stage's: forward, the method's
penalty (LRP with create_graph for rrr-lrp, the input gradient for rrr, the feature-map gradient along the CAV for
rr-clarc), backward, optimiser step; ``--anchor 2`` adds the stage's KL anchor (one more forward, every method).
Published reference: input-gradient penalties cost 3.5-5.4x a step on ResNet18/VGG16. Target for rrr-lrp: <= 4x on CPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("vanilla", "rrr", "rrr-lrp", "rr-clarc")


def one_method(args) -> dict:
    import numpy as np
    import torch

    from pipeline.artifact import feature_layer
    from pipeline.models import build_model
    from pipeline.unlearn import UnlearnConfig, data_term, step_function

    torch.manual_seed(0)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.arch, 10).to(device).eval()
    layer = feature_layer(model)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    masks = torch.zeros(args.batch, args.size, args.size, device=device)
    masks[:, -args.size // 5 :, : args.size // 5] = 1

    with torch.no_grad():
        channels = {}

        def count(module, inputs, output) -> None:
            channels["c"] = output.shape[1]

        handle = dict(model.named_modules())[layer].register_forward_hook(count)
        model(x[:1])
        handle.remove()
    cav = np.random.default_rng(0).normal(size=channels["c"])
    artifact = SimpleNamespace(cav=cav / np.linalg.norm(cav), class_index=0)
    loss_of = step_function(model, UnlearnConfig(method=args.method, weight=50.0), artifact, layer)
    original = build_model(args.arch, 10).to(device).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    keep = torch.ones(args.batch, dtype=torch.bool, device=device)

    def step():
        reference = None
        if args.anchor > 0:
            with torch.no_grad():
                reference = original(x)
        logits, penalty = loss_of(x, y, masks)
        loss = data_term(logits, y, reference, keep, args.anchor) + 50.0 * penalty
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    if device.type == "cuda":
        base_cuda = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # before the first step: the graph's growth counts
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    peak = ((torch.cuda.max_memory_allocated() - base_cuda) / 2**20 if device.type == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024)  # fmt: skip
    return {"method": args.method, "step_s": float(np.median(times)), "peak_mb": round(peak, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="small_cnn")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--anchor", type=float, default=0.0, help="include the stage's KL anchor (default: plain CE)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        print(json.dumps(one_method(args)))
        return
    results = {}
    for method in dict.fromkeys(["vanilla", *args.methods]):
        cmd = [sys.executable, __file__, "--method", method, *sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results[method] = json.loads(out)
    base = results["vanilla"]
    report = {
        "arch": args.arch, "batch": args.batch, "size": args.size, "device": args.device,
        "methods": {
            m: {**r, "cost_vs_vanilla": round(r["step_s"] / base["step_s"], 2),
                "memory_vs_vanilla": round(r["peak_mb"] / base["peak_mb"], 2) if base["peak_mb"] > 0 else None}
            for m, r in results.items()
        },
        "target": "rrr-lrp cost_vs_vanilla <= 4 on CPU",
    }  # fmt: skip
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
