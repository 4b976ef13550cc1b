"""The ``unlearn`` stage: artifact model from the audit, fine-tune (method in params), score every method.

Writes ``models/model_cleaned.pt`` (a plain state dict of the same architecture, so ``attribute@cleaned`` and
``spray@cleaned`` re-audit it through the same stages) and ``metrics/unlearn.json``: the artifact model, before and
after figures of the chosen method, and the same figures for every method of ``unlearn.compare_methods`` fine-tuned
from the same model on the same batches.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .artifact import (
    ArtifactError,
    ArtifactModel,
    NothingFlagged,
    build_region,
    feature_layer,
    layer_activations,
    pattern_cav,
    select_cluster,
)
from .datasets import Dataset, load_dataset, load_images, load_masks
from .io import write_bytes, write_json
from .models import build_model
from .params import section
from .relevance_store import RelevanceStore
from .stages import DATA_DEFAULTS, MODEL_DEFAULTS
from .training import Normalizer, accuracy, composite_for, predict
from .unlearn import METHODS, UnlearnConfig, fine_tune, fold_projection, relevance_share

__all__ = ["UNLEARN_DEFAULTS", "run_unlearn"]

UNLEARN_DEFAULTS = {
    "method": "rrr-lrp",
    "compare_methods": list(METHODS),  # also fine-tuned and scored, for the comparison table ([] to skip)
    "cluster": None,  # null: the top-ranked flagged cluster; or "<class name>/<cluster>"
    "epochs": 1,
    "batch_size": 32,
    "lr": 0.0001,
    "momentum": 0.9,
    "optimizer": "adam",
    "lambda": {"rrr-lrp": 50.0, "rrr": 50.0, "rr-clarc": 50.0},
    "paste_fraction": 0.25,
    "anchor": 2.0,
    "region_sigma": 1.5,
    "region_threshold": 0.2,
    "cav_layer": None,  # null: the last feature map (the module before the global pooling)
    "composite": None,  # null: attribute.composite
    "seed": 0,
}


def _artifact(settings, model, spray_dir, store_dir, normalize, train_rows, train_x) -> tuple[ArtifactModel, str]:
    """The artifact model of the selected cluster: members, region and masks from the store, CAV from the model."""
    class_index, class_name, cluster, members = select_cluster(spray_dir, settings["cluster"])
    store = RelevanceStore(store_dir)
    heatmap = store.open()["heatmap"]
    table = store.table()
    index_of = dict(zip(table.sample_id, table["index"]))
    missing = [m for m in members if m not in index_of]
    if missing:
        raise ValueError(f"member {missing[0]!r} of the flagged cluster is not in the relevance store {store_dir}")
    rows = np.sort(np.array([index_of[m] for m in members]))
    maps = np.asarray(heatmap.oindex[rows], dtype=np.float32)
    order = {index: i for i, index in enumerate(rows)}
    maps = maps[[order[index_of[m]] for m in members]]
    region, region_map, member_masks = build_region(maps, settings["region_sigma"], settings["region_threshold"])
    artifact = ArtifactModel(class_index, class_name, cluster, members, region, region_map, member_masks)
    layer = settings["cav_layer"] or feature_layer(model)
    of_class = np.flatnonzero(train_rows.label.to_numpy() == class_index)
    is_member = train_rows.sample_id.iloc[of_class].isin(set(members)).to_numpy()
    if not is_member.any():
        raise ArtifactError(
            f"no member of {class_name}/{cluster} is a training sample: un-learning fine-tunes on the split that "
            "was audited, so attribute.split must be train"
        )
    x = normalize(torch.from_numpy(train_x[of_class]))
    artifact.cav, _ = pattern_cav(layer_activations(model, layer, x, pool="max").numpy(), is_member)
    mean_act = layer_activations(model, layer, x, pool="mean").numpy()
    artifact.cav_reference = float((mean_act[~is_member] @ artifact.cav).mean())
    return artifact, layer


def _builtin_r_bias_data(dataset: Dataset, class_index: int | None, size: int):
    """Stamped test images of the class with their ground-truth stamp masks (built-in data; scoring only)."""
    if dataset.source != "builtin" or class_index is None:
        return None
    rows = dataset.split("test_attacked")
    rows = rows[rows.label == class_index]
    return (
        load_images(dataset.root, rows.path, size),
        rows.label.to_numpy(),
        load_masks(dataset.root, rows.artifact_mask, size),
    )


def _score_artifact(dataset: Dataset, artifact: ArtifactModel, size: int) -> dict:
    """Built-in data only: how well members and region match the planted stamp (never used by the method)."""
    truth = dataset.manifest.set_index("sample_id").artifact
    train = dataset.split("train")
    of_class = train[train.label == artifact.class_index]
    stamped = set(of_class.sample_id[truth.loc[of_class.sample_id].to_numpy()])
    members = set(artifact.member_ids)
    stamps = dataset.manifest[dataset.manifest.artifact & (dataset.manifest.split == "train")].artifact_mask
    region_truth = load_masks(dataset.root, stamps.head(200), size).any(0)
    return {
        "member_precision": len(members & stamped) / len(members),
        "member_recall": len(members & stamped) / max(len(stamped), 1),
        "region_covers_stamp": float((artifact.region & region_truth).sum() / max(region_truth.sum(), 1)),
    }


def _save(model, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    write_bytes(path, buffer.getvalue())


def _evaluate(model, splits, r_bias_data, composite, normalize) -> dict:
    out = {f"{name}_acc": accuracy(predict(model, x, normalize), y) for name, (x, y) in splits.items()}
    if r_bias_data is None:
        out["r_bias"] = None
        return out
    x, y, m = r_bias_data
    out["r_bias"] = relevance_share(model, normalize(torch.from_numpy(x)), torch.tensor(y), torch.tensor(m), composite)
    return out


def run_unlearn(
    params: dict, prepared: Path, model_path: Path, store_dir: Path, spray_dir: Path, model_out: Path,
    metrics_out: Path, progress: bool = True,
) -> dict:  # fmt: skip
    settings = section(params, "unlearn", UNLEARN_DEFAULTS)
    data = section(params, "data", DATA_DEFAULTS)
    model_params = section(params, "model", MODEL_DEFAULTS)
    composite_name = settings["composite"] or params.get("attribute", {}).get("composite", "epsilon_plus_flat")
    unknown = [m for m in [settings["method"], *settings["compare_methods"]] if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown unlearn method {unknown[0]!r}; choose from {METHODS}")
    torch.manual_seed(settings["seed"])
    dataset = load_dataset(prepared)
    size = data["image_size"]
    normalize = Normalizer(data["mean"], data["std"])
    composite = composite_for(composite_name, normalize)
    model = build_model(model_params["arch"], len(dataset.classes), model_path).eval()

    train_rows = dataset.split("train").reset_index(drop=True)
    train_x = load_images(dataset.root, train_rows.path, size, progress=progress)
    test_splits = ["test_clean", "test_as_trained", "test_attacked"] if dataset.source == "builtin" else ["test"]
    splits = {}
    for name in test_splits:
        rows = dataset.split(name)
        splits[name] = (load_images(dataset.root, rows.path, size), rows.label.to_numpy())
    try:
        artifact, layer = _artifact(settings, model, spray_dir, store_dir, normalize, train_rows, train_x)
    except NothingFlagged as err:
        # a clean audit: the "cleaned" model is the model, so the re-audit and the comparison still run
        poisoned = dataset.classes.index(dataset.poisoned_class) if dataset.poisoned_class else None
        before = _evaluate(model, splits, _builtin_r_bias_data(dataset, poisoned, size), composite, normalize)
        _save(model, model_out)
        metrics = {"method": settings["method"], "skipped": str(err), "artifact": None, "before": before,
                   "after": before, "methods": {}}  # fmt: skip
        write_json(metrics_out, metrics)
        return metrics

    # penalty masks: members their own; pasted images their source's (in the loop); the rest none, so an object
    # that happens to lie where the artifact sits elsewhere keeps its relevance
    masks = np.zeros((len(train_rows), size, size), dtype=bool)
    member_pos = {s: i for i, s in enumerate(artifact.member_ids)}
    member_index = np.array([i for i, s in enumerate(train_rows.sample_id) if s in member_pos], dtype=np.int64)
    for i in member_index:
        masks[i] = artifact.member_masks[member_pos[train_rows.sample_id.iloc[i]]]

    if dataset.source == "builtin":
        r_bias_data = _builtin_r_bias_data(dataset, artifact.class_index, size)
    else:
        r_bias_data = (train_x[member_index], train_rows.label.to_numpy()[member_index], masks[member_index])

    before = _evaluate(model, splits, r_bias_data, composite, normalize)
    images = normalize(torch.from_numpy(train_x))
    labels = torch.tensor(train_rows.label.to_numpy())
    masks_t = torch.from_numpy(masks)
    methods = list(dict.fromkeys([*settings["compare_methods"], settings["method"]]))
    results, chosen = {}, None
    for method in tqdm(methods, desc="methods", disable=not progress):
        started = time.perf_counter()
        if method == "p-clarc":
            cleaned = fold_projection(model, layer, artifact.cav, artifact.cav_reference)
            info = {"history": [], "diverged": False}
        else:
            config = UnlearnConfig(
                method=method,
                epochs=settings["epochs"],
                batch_size=settings["batch_size"],
                lr=settings["lr"],
                momentum=settings["momentum"],
                optimizer=settings["optimizer"],
                weight=float(settings["lambda"].get(method, 0.0))
                if isinstance(settings["lambda"], dict)
                else float(settings["lambda"]),
                paste_fraction=settings["paste_fraction"],
                anchor=settings["anchor"],
                composite=composite,
                seed=settings["seed"],
            )
            cleaned, info = fine_tune(model, images, labels, masks_t, artifact, member_index, config, layer, progress)
        results[method] = {
            **_evaluate(cleaned, splits, r_bias_data, composite, normalize),
            "seconds": time.perf_counter() - started,
            "diverged": info["diverged"],
            "history": info["history"],
        }
        if method == settings["method"]:
            chosen = cleaned
    _save(chosen, model_out)
    metrics = {
        "method": settings["method"],
        "artifact": {**artifact.summary(), "cav_layer": layer},
        "before": before,
        "after": {k: v for k, v in results[settings["method"]].items() if k != "history"},
        "methods": results,
    }
    if dataset.source == "builtin":
        metrics["artifact"].update(_score_artifact(dataset, artifact, size))
    write_json(metrics_out, metrics)
    return metrics
