"""Region perturbation speed: perturbed inputs scored per second against plain forward passes of the same count.

    .venv/bin/python benchmarks/evaluation_speed.py                                  # small_cnn, 64 px, CPU
    python3 benchmarks/evaluation_speed.py --arch vgg16 --size 224 --patch 16 --device cuda

The ratio (perturbation time / forward time for the same number of images) is the overhead of building the
perturbed batches; 1.0 would be free. On CUDA it also checks that the curves equal the CPU's on a small batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lrp_core import evaluation as ev  # noqa: E402
from pipeline.models import build_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="small_cnn")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_model(args.arch, 10).to(device).eval()
    x = torch.randn(args.images, 3, args.size, args.size, device=device)
    y = torch.randint(0, 10, (args.images,), device=device)
    relevance = torch.randn_like(x)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    kwargs = {"patch": args.patch, "steps": args.steps, "chunk": args.chunk}
    ev.region_perturbation(model, x[:2], y[:2], relevance[:2], **kwargs)  # warm-up
    sync()
    start = time.perf_counter()
    curve = ev.region_perturbation(model, x, y, relevance, **kwargs)
    sync()
    perturb_s = time.perf_counter() - start
    n = args.images * (args.steps + 1)
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, n, args.chunk):
            model(x[torch.arange(i, min(i + args.chunk, n), device=device) % args.images])
    sync()
    forward_s = time.perf_counter() - start
    out = {
        "arch": args.arch, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "perturbed_images_per_s": round(n / perturb_s, 1), "forward_images_per_s": round(n / forward_s, 1),
        "overhead_vs_forward": round(perturb_s / forward_s, 3),
    }  # fmt: skip
    if device.type == "cuda":
        cpu = ev.region_perturbation(model.cpu().double(), x[:4].cpu().double(), y[:4].cpu(),
                                     relevance[:4].cpu().double(), **kwargs)  # fmt: skip
        gpu = ev.region_perturbation(model.to(device), x[:4].double(), y[:4], relevance[:4].double(), **kwargs)
        out["max_abs_difference_cuda_vs_cpu_float64"] = float((gpu.cpu() - cpu).abs().max())
    out["finite"] = bool(torch.isfinite(curve).all())
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
