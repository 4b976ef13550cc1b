"""Attribute stage throughput: end to end (loading, LRP, writing) against lrp_core alone on the same batches,
and 1 vs 2 Dask workers. One run, one JSON document.

    python benchmarks/attribute_stage.py                                   # CPU: small_cnn, 64 px, 600 images
    python benchmarks/attribute_stage.py --device cuda --arch vgg16 --size 224 --per-class 200 --batch 64

Target: the stage reaches >= 0.8 of lrp_core's own images/s (I/O hidden behind compute). Also reported: what the
latent layers' channel relevance (kept by default) costs, in lrp_core and in the stage (``latent_cost``: time
with / time without).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lrp_core  # noqa: E402
from lrp_core import composites  # noqa: E402
from lrp_core.latent import latent_layers  # noqa: E402
from pipeline import stages  # noqa: E402
from pipeline.attribute import run_attribute  # noqa: E402
from pipeline.datasets import load_dataset, load_images  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.training import Normalizer  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default="small_cnn")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--per-class", type=int, default=100, help="train images per class (6 classes)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--block-batches", type=int, default=4)
    parser.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default: auto)")
    parser.add_argument("--dask", nargs="*", type=int, default=[1, 2], help="Dask worker counts to time (CPU)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="attribute-bench-"))
    try:
        params = {
            "data": {"image_size": args.size},
            "builtin": {
                "per_class_train": args.per_class,
                "per_class_val": 1,
                "per_class_test": 1,
                "artifact_size": max(8, args.size // 6),
            },
            "attribute": {
                "batch_size": args.batch,
                "block_batches": args.block_batches,
                "device": args.device,
                "num_workers": args.num_workers,
            },
        }
        stages.prepare(params, work / "prepared", progress=False)
        torch.manual_seed(0)
        torch.save(build_model(args.arch, 6).state_dict(), work / "model.pt")
        n = 6 * args.per_class

        # lrp_core alone: images already decoded and in memory, same batches, same composite
        dataset = load_dataset(work / "prepared")
        rows = dataset.split("train")
        images = torch.from_numpy(load_images(dataset.root, rows.path, args.size))
        labels = torch.tensor(rows.label.to_numpy())
        model = build_model(args.arch, 6, work / "model.pt").to(device).eval()
        normalize, composite = Normalizer([0.5] * 3, [0.25] * 3), composites.EpsilonPlusFlat()

        latent = latent_layers(model)

        def pure(keep: list[str]) -> None:
            for i in range(0, n, args.batch):
                x = normalize(images[i : i + args.batch]).to(device)
                e = lrp_core.explain(model, x, labels[i : i + args.batch].to(device), composite=composite, latent=keep)
                e.relevance.sum(1).half().cpu()
                for channels in (e.latent or {}).values():
                    channels.float().cpu()

        def timed(keep: list[str]) -> float:
            _sync(device)
            start = time.perf_counter()
            pure(keep)
            _sync(device)
            return n / (time.perf_counter() - start)

        pure(latent)  # warm-up
        pure_rate, pure_latent_rate = timed([]), timed(latent)

        def stage(extra: dict, name: str) -> float:
            out = work / name
            shutil.rmtree(out, ignore_errors=True)
            p = params | {"attribute": params["attribute"] | extra}
            started = time.perf_counter()
            run_attribute(p, work / "prepared", work / "model.pt", out, progress=False)
            return n / (time.perf_counter() - started)

        stage({}, "warmup")
        stage_rate = stage({"latent_layers": []}, "stage")  # the maps alone: what lrp_core_only computes
        stage_latent_rate = stage({}, "stage_latent")  # the default: maps and the latent layers' channel relevance
        report = {
            "benchmark": "attribute_stage",
            "device": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"cpu ({torch.get_num_threads()} threads)",
            "arch": args.arch,
            "image_size": args.size,
            "images": n,
            "batch": args.batch,
            "images_per_s": {"lrp_core_only": round(pure_rate, 2), "stage_end_to_end": round(stage_rate, 2)},
            "stage_vs_lrp_core": round(stage_rate / pure_rate, 3),
            "target": {"min_stage_vs_lrp_core": 0.8, "met": stage_rate / pure_rate >= 0.8},
            # what keeping the latent layers' channel relevance costs (attribute.latent_layers: auto, the default)
            "latent_layers": latent,
            "latent_images_per_s": {
                "lrp_core_only": round(pure_latent_rate, 2),
                "stage_end_to_end": round(stage_latent_rate, 2),
            },
            "latent_cost": {
                "lrp_core_only": round(pure_rate / pure_latent_rate, 3),
                "stage_end_to_end": round(stage_rate / stage_latent_rate, 3),
            },
        }
        if device.type == "cpu" and args.dask:
            rates = {str(w): round(stage({"workers": w, "threads": 1}, f"dask{w}"), 2) for w in args.dask}
            report["dask_images_per_s"] = rates
            if "1" in rates and "2" in rates:
                report["dask_2_vs_1_workers"] = round(rates["2"] / rates["1"], 3)
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
