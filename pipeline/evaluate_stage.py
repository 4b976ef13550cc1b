"""The ``evaluate`` stage: how good are the explanations the audit rests on, compared with simpler ones?

On the same model and images, every method of ``evaluate.methods`` (lrp_core's composites, the plain gradient,
gradient x input, a random map) is scored by region perturbation (MoRF and LeRF curves of the explained logit,
AOPC, the area between them; a random order as the baseline) and, on the built-in benchmark, by ground truth:
relevance mass and rank accuracy inside the object mask, and the share of relevance on the stamp for stamped
images. Only positive relevance counts (CLEVR-XAI's convention; see ``lrp_core.evaluation``).

Writes ``metrics/evaluate.json`` (numbers, for ``dvc metrics``) and ``evaluation/curves.json`` (mean curves, for
the audit report's plot).
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import lrp_core
from lrp_core import evaluation as ev

from .datasets import load_dataset, load_images, load_masks
from .io import write_json
from .models import build_model
from .params import section
from .stages import DATA_DEFAULTS, MODEL_DEFAULTS
from .training import Normalizer, composite_for, inference_copy

__all__ = ["EVALUATE_DEFAULTS", "BASELINES", "run_evaluate"]

BASELINES = ("gradient", "gradient_x_input", "random")
EVALUATE_DEFAULTS = {
    "methods": ["epsilon_plus_flat", "epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1", *BASELINES],
    "n_images": 60,  # per split, spread over the classes
    "patch": 8,
    "steps": 16,  # patches removed (null: all); 16 of 8x8 on 64 px = the most relevant quarter
    "fill": "mean",  # mean, blur or noise
    "batch_size": 64,
    "seed": 0,
}


def _sample(rows, n: int, seed: int):
    """``n`` rows spread evenly over the classes (a fixed, seeded choice)."""
    per_class = max(1, n // rows.label.nunique())
    rng = np.random.default_rng(seed)
    labels = rows.label.to_numpy()
    keep = [
        rng.choice(np.flatnonzero(labels == k), min(per_class, int((labels == k).sum())), replace=False)
        for k in np.unique(labels)
    ]
    return rows.iloc[np.sort(np.concatenate(keep))]


def _explain(method: str, model, x: torch.Tensor, y: torch.Tensor, normalize: Normalizer, seed: int):
    if method == "gradient":
        return ev.gradient(model, x, y)
    if method == "gradient_x_input":
        return ev.gradient_x_input(model, x, y)
    if method == "random":
        return ev.random_map(model, x, y, seed=seed)
    return lrp_core.attribute(model, x, y, composite=composite_for(method, normalize))


def run_evaluate(
    params: dict, prepared: Path, model_path: Path, metrics_out: Path, curves_out: Path, progress: bool = True
) -> dict:
    settings = section(params, "evaluate", EVALUATE_DEFAULTS)
    data = section(params, "data", DATA_DEFAULTS)
    model_params = section(params, "model", MODEL_DEFAULTS)
    if settings["fill"] not in ev.FILLS:
        raise ValueError(f"evaluate.fill must be one of {ev.FILLS}; got {settings['fill']!r}")
    size, patch = data["image_size"], settings["patch"]
    if size % patch:
        raise ValueError(f"evaluate.patch {patch} must divide data.image_size {size}")
    dataset = load_dataset(prepared)
    normalize = Normalizer(data["mean"], data["std"])
    model = build_model(model_params["arch"], len(dataset.classes), model_path).eval()
    for method in settings["methods"]:
        if method not in BASELINES:
            composite_for(method, normalize)  # unknown names fail before any work
    builtin = dataset.source == "builtin"
    rows = _sample(dataset.split("test_clean" if builtin else "test"), settings["n_images"], settings["seed"])
    x = normalize(torch.from_numpy(load_images(dataset.root, rows.path, size)))
    y = torch.tensor(rows.label.to_numpy())
    objects = torch.from_numpy(load_masks(dataset.root, rows.object_mask, size)) if builtin else None
    stamped = None
    if builtin:
        attacked = dataset.split("test_attacked").set_index("sample_id")
        ids = ["test_attacked" + s[len("test_clean") :] for s in rows.sample_id]  # the same images, stamped
        attacked = attacked.loc[[i for i in ids if i in attacked.index]]
        stamped = (
            normalize(torch.from_numpy(load_images(dataset.root, attacked.path, size))),
            torch.tensor(attacked.label.to_numpy()),
            torch.from_numpy(load_masks(dataset.root, attacked.artifact_mask, size)),
        )

    def batched(fn, *tensors):
        return torch.cat([fn(*(t[i : i + settings["batch_size"]] for t in tensors))
                          for i in range(0, len(tensors[0]), settings["batch_size"])])  # fmt: skip

    # perturbed images in batches of batch_size as well: 2x faster on two CPU cores than region_perturbation's
    # default of 512 (whose activations spill out of the cache), bitwise the same curves
    kwargs = {"patch": patch, "fill": settings["fill"], "steps": settings["steps"], "seed": settings["seed"],
              "chunk": settings["batch_size"]}  # fmt: skip
    forward = inference_copy(model)  # the curves' ~15,000 forward passes: BatchNorm folded, 2x faster on a CPU
    results, curves = {}, {}
    first = None
    for method in tqdm(settings["methods"], desc="evaluate", disable=not progress):
        started = time.perf_counter()
        explain = partial(_explain, method, model, normalize=normalize, seed=settings["seed"])
        relevance = batched(explain, x, y)
        first = relevance if first is None else first
        morf = ev.region_perturbation(forward, x, y, relevance, order="morf", **kwargs)
        lerf = ev.region_perturbation(forward, x, y, relevance, order="lerf", **kwargs)
        scores = {
            "aopc_morf": float(ev.aopc(morf).mean()),
            "aopc_lerf": float(ev.aopc(lerf).mean()),
            "area_between": float(ev.area_between(morf, lerf).mean()),
        }
        if builtin:
            scores["mass_accuracy"] = float(ev.relevance_mass_accuracy(relevance, objects).nanmean())
            scores["rank_accuracy"] = float(ev.relevance_rank_accuracy(relevance, objects).nanmean())
            sx, sy, smask = stamped
            stamp_relevance = batched(explain, sx, sy)
            scores["stamp_share"] = float(ev.mask_share(stamp_relevance, smask).nanmean())
        scores["seconds"] = time.perf_counter() - started
        results[method] = scores
        curves[method] = {"morf": morf.mean(0).tolist(), "lerf": lerf.mean(0).tolist()}
    random_order = ev.region_perturbation(forward, x, y, first, order="random", **kwargs)
    curves["random order"] = {"morf": random_order.mean(0).tolist()}
    metrics = {
        "methods": results,
        "random_order_aopc": float(ev.aopc(random_order).mean()),
        "n_images": len(rows),
        "sign_convention": "positive relevance only (CLEVR-XAI)",
        "fill": settings["fill"],
        "patch": patch,
    }
    write_json(metrics_out, metrics)
    write_json(curves_out, {"patch": patch, "fill": settings["fill"], "n_images": len(rows), "curves": curves})
    return metrics
