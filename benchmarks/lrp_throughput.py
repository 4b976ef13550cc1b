"""LRP throughput: lrp_core vs zennit vs a plain gradient x input pass, same model, batch and device, one run.

    python benchmarks/lrp_throughput.py                                  # CPU: vgg11, batch 4, 224 px
    python benchmarks/lrp_throughput.py --device cuda --models vgg16 resnet50 --batch 64

Prints one JSON document: images/s of each method, the cost of each LRP implementation relative to the gradient
pass (time ratio, lower is better), lrp_core's speed-up over zennit, and for the reduced-precision modes of
lrp_core their speed and their error against lrp_core's own fp32 map. All fp32 timings run with TF32 disabled
(set once, for every method alike); models have random weights (throughput does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lrp_core  # noqa: E402
from lrp_core import composites  # noqa: E402

TARGETS = {
    # cost of lrp_core relative to the gradient x input pass (time ratio), on CPU
    "cpu_max_cost_vs_gradient": 1.5,
    # images/s of lrp_core (fp32) on one H100/H200 at batch 64, 224 px
    "cuda_min_images_per_s": {"vgg16": 1500, "resnet50": 2000},
}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_interleaved(methods: dict, device: torch.device, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each method, timed round-robin (one call of each per round), so that a slow spell of
    a shared machine hits every method alike and per-round ratios stay comparable."""
    for _ in range(warmup):
        for fn in methods.values():
            fn()
    _synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def _median_ratio(numerator: list[float], denominator: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def _zennit_attribution(model, composite_name: str, resnet: bool):
    try:
        import zennit.attribution
        import zennit.composites
        import zennit.torchvision
    except ImportError:
        return None
    canonizers = [zennit.torchvision.ResNetCanonizer()] if resnet else [zennit.torchvision.VGGCanonizer()]
    composite = getattr(zennit.composites, composite_name)(canonizers=canonizers)

    def run(x, start):
        with zennit.attribution.Gradient(model=model, composite=composite) as attributor:
            return attributor(x, start)[1]

    return run


def benchmark_model(name: str, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().to(device).eval()
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    target = torch.randint(0, 1000, (args.batch,), device=device)
    one_hot = torch.nn.functional.one_hot(target, 1000).float()
    composite = composites.get_composite(args.composite)

    def gradient_x_input():
        leaf = x.detach().requires_grad_(True)
        output = model(leaf)
        (grad,) = torch.autograd.grad(output, leaf, one_hot * output.detach())
        return grad * leaf.detach()

    def ours(precision=None):
        return lambda: lrp_core.attribute(model, x, target, composite=composite, precision=precision)

    methods = {"gradient_x_input": gradient_x_input, "lrp_core": ours()}
    zennit_run = _zennit_attribution(model, _ZENNIT_NAMES[args.composite], resnet=name.startswith("resnet"))
    if zennit_run is not None:
        methods["zennit"] = lambda: zennit_run(x, lambda out: one_hot * out)
    modes = [p for p in args.precisions if p != "tf32" or device.type == "cuda"]
    methods.update({f"lrp_core_{p}": ours(p) for p in modes})
    times = _time_interleaved(methods, device, args.repeats, args.warmup)
    seconds = {k: statistics.median(v) for k, v in times.items()}
    plain = [k for k in ("gradient_x_input", "lrp_core", "zennit") if k in seconds]
    result = {
        "model": name,
        "images_per_s": {k: round(args.batch / seconds[k], 2) for k in plain},
        # median over rounds of the per-round time ratio
        "cost_vs_gradient": {
            k: round(_median_ratio(times[k], times["gradient_x_input"]), 3) for k in plain if k != "gradient_x_input"
        },
    }
    if "zennit" in seconds:
        result["lrp_core_speedup_vs_zennit"] = round(_median_ratio(times["zennit"], times["lrp_core"]), 3)

    reference = lrp_core.attribute(model, x, target, composite=composite, precision="fp32").double()
    precision_modes = {}
    for precision in modes:
        fast = lrp_core.attribute(model, x, target, composite=composite, precision=precision).double()
        error = ((fast - reference).flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1)).max().item()
        cosine = torch.nn.functional.cosine_similarity(fast.flatten(1), reference.flatten(1)).min().item()
        precision_modes[precision] = {
            "images_per_s": round(args.batch / seconds[f"lrp_core_{precision}"], 2),
            "speedup_vs_fp32": round(_median_ratio(times["lrp_core"], times[f"lrp_core_{precision}"]), 3),
            "max_relative_l2_error_vs_fp32": round(error, 5),
            "min_cosine_vs_fp32": round(cosine, 5),
        }
    if precision_modes:
        result["lrp_core_precision_modes"] = precision_modes
    if device.type == "cpu":
        limit = TARGETS["cpu_max_cost_vs_gradient"]
        result["target"] = {"max_cost_vs_gradient": limit, "met": result["cost_vs_gradient"]["lrp_core"] <= limit}
    elif name in TARGETS["cuda_min_images_per_s"]:
        limit = TARGETS["cuda_min_images_per_s"][name]
        result["target"] = {"min_images_per_s": limit, "met": args.batch / seconds["lrp_core"] >= limit}
    return result


_ZENNIT_NAMES = {
    "epsilon_plus": "EpsilonPlus",
    "epsilon_plus_flat": "EpsilonPlusFlat",
    "epsilon_alpha2_beta1": "EpsilonAlpha2Beta1",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="torchvision names (default: vgg11 on CPU, vgg16 and resnet50 on CUDA)",
    )
    parser.add_argument("--batch", type=int, default=None, help="default: 4 on CPU, 64 on CUDA")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--composite", default="epsilon_plus_flat", choices=sorted(_ZENNIT_NAMES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precisions", nargs="*", default=["bf16", "tf32"], help="reduced-precision modes to time")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    args.models = args.models or (["vgg11"] if device.type == "cpu" else ["vgg16", "resnet50"])
    args.batch = args.batch or (4 if device.type == "cpu" else 64)
    # strict fp32 for every method alike; the tf32 mode of lrp_core turns it on for itself only
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    report = {
        "benchmark": "lrp_throughput",
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "batch": args.batch,
        "size": args.size,
        "composite": args.composite,
        "results": [benchmark_model(name, args, device) for name in args.models],
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
