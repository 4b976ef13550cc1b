"""The ``unlearn`` stage: artifact models of every flagged strategy, fine-tune (method in params), score every method.

Writes ``models/model_cleaned.pt`` (a plain state dict of the same architecture, so ``attribute@cleaned`` and
``spray@cleaned`` re-audit it through the same stages) and ``metrics/unlearn.json``: the artifact models, before and
after figures of the chosen method, and the same figures for every method of ``unlearn.compare_methods`` fine-tuned
from the same model on the same batches.

R_bias (the share of |R| on the artifact) is measured where fine-tuning never looked: on the built-in data, on the
artifact classes' attacked test images with their true artifact masks; on a user's data, on ``holdout_fraction``
of each strategy's members, kept out of fine-tuning, with their own automatic masks.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from tqdm.auto import tqdm

from .artifact import (
    REGION_DILATION,
    ArtifactError,
    ArtifactModel,
    NothingFlagged,
    Selection,
    build_region,
    concept_masks,
    feature_layer,
    fixed_content,
    layer_activations,
    mean_share_map,
    pattern_cav,
    select_strategies,
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

REST_SAMPLE = 500  # maps of the rest of the class that set the baseline of the artifact region
UNLEARN_DEFAULTS = {
    "method": "rrr-lrp",
    "compare_methods": ["p-clarc"],  # also scored: the training-free fix ([] to skip; all five: README)
    "cluster": None,  # null: every flagged strategy; or "<class name>/<cluster>", or a list of them
    "epochs": 3,  # the most; each method stops early on validation (stop_gap)
    "batch_size": 32,
    "lr": 0.0001,
    "momentum": 0.9,
    "optimizer": "adam",
    "lambda": {"rrr-lrp": 50.0, "rrr": 50.0, "rr-clarc": 50.0},
    "paste_fraction": 0.5,
    "anchor": 2.0,
    "region_sigma": 1.5,
    "region_threshold": 0.2,
    "cav_layer": None,  # null: the last feature map (the module before the global pooling)
    "composite": None,  # null: attribute.composite
    "holdout_fraction": 0.2,  # user data: members kept out of fine-tuning, where R_bias is measured
    "stop_gap": 0.02,  # stop once val accuracy with the artifacts pasted is this close to without (epochs: the most)
    "seed": 0,
}


def _member_maps(store: RelevanceStore, members: list[str]) -> np.ndarray:
    """Full-resolution maps of ``members``, in their order (one sorted read from the store)."""
    table = store.table()
    index_of = dict(zip(table.sample_id, table["index"]))
    missing = [m for m in members if m not in index_of]
    if missing:
        raise ValueError(f"member {missing[0]!r} of a flagged strategy is not in the relevance store {store.root}")
    rows = np.array([index_of[m] for m in members])
    order = np.argsort(rows)
    maps = np.empty((len(rows), *store.open()["heatmap"].shape[1:]), dtype=np.float32)
    maps[order] = store.open()["heatmap"].oindex[rows[order]]
    return maps


def _artifact(
    selection: Selection, settings, model, layer, store, normalize, composite, train_rows, train_x, holdout: bool
) -> ArtifactModel:
    """One strategy's artifact model: members, region and masks from the store, CAV from the model."""
    members = selection.member_ids
    table = store.table()
    rest = table.sample_id[(table.label == selection.class_index) & ~table.sample_id.isin(set(members))]
    rest = rest.sample(min(len(rest), REST_SAMPLE), random_state=settings["seed"]).tolist() if len(rest) else []
    rest_maps = _member_maps(store, rest) if rest else None
    region, region_map, member_masks = build_region(
        _member_maps(store, members), settings["region_sigma"], settings["region_threshold"], rest_maps=rest_maps,
    )  # fmt: skip
    of_class = np.flatnonzero(train_rows.label.to_numpy() == selection.class_index)
    is_member = train_rows.sample_id.iloc[of_class].isin(set(members)).to_numpy()
    if not is_member.any():
        raise ArtifactError(
            f"no member of {selection.name} is a training sample: un-learning fine-tunes on the split that was "
            "audited, so attribute.split must be train"
        )
    near = ndimage.binary_dilation(region, iterations=REGION_DILATION)
    fixed = fixed_content(train_x[of_class[is_member]], train_x[of_class[~is_member][:REST_SAMPLE]], near)
    region = region | fixed
    x = normalize(torch.from_numpy(train_x[of_class]))
    cav, _ = pattern_cav(layer_activations(model, layer, x, pool="max").numpy(), is_member)
    if fixed.any():
        # content the members share at one place (a frame) is the cue itself; each member's own relevance around
        # it adds a halo on the object (small_cnn frame: mask precision 0.37 with it, 1.00 without)
        member_masks = np.broadcast_to(fixed, member_masks.shape).copy()
    else:
        # no content shared at one place: the cue may move, and the mean's region misses where it went (noise patch:
        # 45% of it covered, 81% of the mask elsewhere); each member's mask is where the concept is instead
        position = {s: i for i, s in enumerate(train_rows.sample_id.iloc[of_class[is_member]])}
        found = [i for i, m in enumerate(members) if m in position]
        inside = x[np.flatnonzero(is_member)[[position[members[i]] for i in found]]]
        member_masks[found] = concept_masks(model, layer, cav, inside, composite, settings["region_threshold"])
    artifact = ArtifactModel(selection.class_index, selection.class_name, selection.clusters, members, region,
                             region_map, member_masks, fixed_pixels=int(fixed.sum()),
                             rest_share=mean_share_map(rest_maps) if rest_maps is not None else None)  # fmt: skip
    if holdout and settings["holdout_fraction"] > 0:
        rng = np.random.default_rng([settings["seed"], selection.class_index])
        n_out = int(round(settings["holdout_fraction"] * len(members)))
        artifact.held_out = sorted(rng.choice(members, size=min(n_out, len(members) - 1), replace=False).tolist())
    artifact.cav = cav
    mean_act = layer_activations(model, layer, x, pool="mean").numpy()
    artifact.cav_reference = float((mean_act[~is_member] @ artifact.cav).mean())
    return artifact


def _builtin_r_bias_data(dataset: Dataset, class_indices: list[int], size: int):
    """Attacked test images of the artifact classes with their true artifact masks (built-in data; scoring only)."""
    if dataset.source != "builtin" or not class_indices:
        return None
    splits = {dataset.classes.index(a["class"]): a["attacked_split"] for a in dataset.artifacts}
    parts = []
    for class_index in class_indices:
        rows = dataset.split(splits.get(class_index, "test_attacked"))
        rows = rows[rows.label == class_index]
        parts.append((load_images(dataset.root, rows.path, size), rows.label.to_numpy(),
                      load_masks(dataset.root, rows.artifact_mask, size)))  # fmt: skip
    return tuple(np.concatenate(p) for p in zip(*parts))


def _score_artifact(dataset: Dataset, artifact: ArtifactModel, size: int) -> dict:
    """Built-in data only: how well members and region match the planted artifact (never used by the method)."""
    kinds = dataset.manifest.set_index("sample_id").artifact_kind
    planted = {dataset.classes.index(a["class"]): a["kind"] for a in dataset.artifacts}
    kind = planted.get(artifact.class_index)
    train = dataset.split("train")
    of_class = train[train.label == artifact.class_index]
    carrying = set(of_class.sample_id[(kinds.loc[of_class.sample_id] == kind).to_numpy()]) if kind else set()
    members = set(artifact.member_ids)
    masks = dataset.manifest[(dataset.manifest.artifact_kind == kind) & (dataset.manifest.split == "train")]
    region_truth = load_masks(dataset.root, masks.artifact_mask.head(200), size).any(0) if kind else None
    paths = dataset.manifest.set_index("sample_id").artifact_mask.reindex(artifact.member_ids)
    planted_masks = paths.notna().to_numpy() & (kinds.reindex(artifact.member_ids) == kind).to_numpy()
    mask_fit = {}
    if planted_masks.any():
        truth = load_masks(dataset.root, paths[planted_masks], size)
        ours = artifact.member_masks[planted_masks]
        both = (ours & truth).sum((1, 2))
        mask_fit = {"mask_precision": float((both / np.maximum(ours.sum((1, 2)), 1)).mean()),
                    "mask_recall": float((both / np.maximum(truth.sum((1, 2)), 1)).mean())}  # fmt: skip
    return {
        **mask_fit,
        "planted": kind,
        "member_precision": len(members & carrying) / len(members),
        "member_recall": len(members & carrying) / max(len(carrying), 1),
        "region_covers_artifact": float((artifact.region & region_truth).sum() / max(region_truth.sum(), 1))
        if region_truth is not None else None,
    }  # fmt: skip


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
    if not 0 <= settings["holdout_fraction"] < 1:
        raise ValueError(f"unlearn.holdout_fraction must be in [0, 1); got {settings['holdout_fraction']}")
    torch.manual_seed(settings["seed"])
    dataset = load_dataset(prepared)
    size = data["image_size"]
    normalize = Normalizer(data["mean"], data["std"])
    composite = composite_for(composite_name, normalize)
    model = build_model(model_params["arch"], len(dataset.classes), model_path).eval()
    builtin = dataset.source == "builtin"

    try:
        selections = select_strategies(spray_dir, settings["cluster"])
    except NothingFlagged as err:
        # a clean audit: the "cleaned" model is the model, so the re-audit and the comparison still run
        splits = _test_splits(dataset, size)
        cues = [dataset.classes.index(a["class"]) for a in dataset.artifacts]
        before = _evaluate(model, splits, _builtin_r_bias_data(dataset, cues, size), composite, normalize)
        _save(model, model_out)
        metrics = {"method": settings["method"], "skipped": str(err), "artifact": None, "artifacts": [],
                   "before": before, "after": before, "methods": {}}  # fmt: skip
        write_json(metrics_out, metrics)
        return metrics

    train_rows = dataset.split("train").reset_index(drop=True)
    train_x = load_images(dataset.root, train_rows.path, size, progress=progress)
    splits = _test_splits(dataset, size)
    layer = settings["cav_layer"] or feature_layer(model)
    store = RelevanceStore(store_dir)
    artifacts = [
        _artifact(s, settings, model, layer, store, normalize, composite, train_rows, train_x, holdout=not builtin)
        for s in selections
    ]

    # penalty masks: members their own; pasted images their source's (in the loop); the rest none, so an object
    # that happens to lie where the artifact sits elsewhere keeps its relevance. Held-out members leave the data.
    masks = np.zeros((len(train_rows), size, size), dtype=bool)
    position = {s: i for i, s in enumerate(train_rows.sample_id)}
    held_out = {s for a in artifacts for s in a.held_out}
    for artifact in artifacts:
        for member, mask in zip(artifact.member_ids, artifact.member_masks):
            if member in position and member not in held_out:
                masks[position[member]] = mask
    keep = ~train_rows.sample_id.isin(held_out).to_numpy()
    member_index = np.flatnonzero(masks[keep].any((1, 2)))

    if builtin:
        r_bias_data = _builtin_r_bias_data(dataset, [a.class_index for a in artifacts], size)
    else:
        rows, held_masks = [], []
        for artifact in artifacts:
            mask_of = dict(zip(artifact.member_ids, artifact.member_masks))
            rows += [position[s] for s in artifact.held_out]
            held_masks += [mask_of[s] for s in artifact.held_out]
        r_bias_data = (train_x[rows], train_rows.label.to_numpy()[rows], np.stack(held_masks)) if rows else None

    before = _evaluate(model, splits, r_bias_data, composite, normalize)
    images = normalize(torch.from_numpy(train_x[keep]))
    labels = torch.tensor(train_rows.label.to_numpy()[keep])
    validation = None
    if "val" in dataset.splits:
        val = dataset.split("val")
        validation = (normalize(torch.from_numpy(load_images(dataset.root, val.path, size))),
                      torch.tensor(val.label.to_numpy()))  # fmt: skip
    masks_t = torch.from_numpy(masks[keep])
    cavs = [a.cav for a in artifacts]
    # what a map without the cue puts inside a mask is not the cue's: rrr-lrp penalises only the share above it
    rest_shares = [a.rest_share for a in artifacts if a.rest_share is not None]
    allowance = torch.from_numpy(np.mean(rest_shares, 0)).float() if rest_shares else None
    methods = list(dict.fromkeys([*settings["compare_methods"], settings["method"]]))
    results, chosen = {}, None
    for method in tqdm(methods, desc="methods", disable=not progress):
        started = time.perf_counter()
        if method == "p-clarc":
            cleaned = model
            for artifact in artifacts:
                cleaned = fold_projection(cleaned, layer, artifact.cav, artifact.cav_reference)
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
                stop_gap=settings["stop_gap"],
            )
            cleaned, info = fine_tune(model, images, labels, masks_t, member_index, config, cavs, layer, progress,
                                      validation, allowance)  # fmt: skip
        results[method] = {
            **_evaluate(cleaned, splits, r_bias_data, composite, normalize),
            "seconds": time.perf_counter() - started,
            "diverged": info["diverged"],
            "history": info["history"],
            **({"validation_before": info["validation_before"]} if "validation_before" in info else {}),
        }
        if method == settings["method"]:
            chosen = cleaned
    _save(chosen, model_out)
    summaries = [{**a.summary(), "cav_layer": layer} for a in artifacts]
    if builtin:
        for summary, artifact in zip(summaries, artifacts):
            summary.update(_score_artifact(dataset, artifact, size))
    metrics = {
        "method": settings["method"],
        "artifact": summaries[0],
        "artifacts": summaries,
        "r_bias_on": "attacked test images, true masks" if builtin else "held-out members, automatic masks",
        "before": before,
        "after": {k: v for k, v in results[settings["method"]].items() if k not in ("history", "validation_before")},
        "methods": results,
    }
    write_json(metrics_out, metrics)
    return metrics


def _test_splits(dataset: Dataset, size: int) -> dict:
    """Every test split of the data set (built-in: clean, as trained, attacked per artifact; user data: test)."""
    out = {}
    for name in dataset.splits:
        if name.startswith("test"):
            rows = dataset.split(name)
            out[name] = (load_images(dataset.root, rows.path, size), rows.label.to_numpy())
    return out
