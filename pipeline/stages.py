"""The stages behind ``dvc repro`` (and the CLI): generate the built-in data, prepare the data, train the model."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from .datasets import (
    Dataset,
    index_imagefolder,
    is_builtin_tree,
    link_builtin,
    load_dataset,
    load_images,
    write_builtin,
)
from .io import write_bytes, write_json, write_with
from .params import section
from .synthetic import Artifact, BenchmarkConfig

__all__ = [
    "DATA_DEFAULTS",
    "BUILTIN_DEFAULTS",
    "MODEL_DEFAULTS",
    "TRAIN_DEFAULTS",
    "benchmark_config",
    "generate_builtin",
    "prepare",
    "train",
]

DATA_DEFAULTS = {
    "root": None,  # None: generate the built-in data right where prepare writes (params.yaml names data/builtin)
    "image_size": 64,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.25, 0.25, 0.25],
    "val_fraction": 0.1,
    "seed": 0,
}
BUILTIN_DEFAULTS = {
    "per_class_train": 500,
    "per_class_val": 100,
    "per_class_test": 150,
    "artifacts": [{"class": "triangle", "kind": "stamp", "fraction": 0.3}],
    "artifact_size": 10,
}
MODEL_DEFAULTS = {"arch": "small_cnn", "checkpoint": None}
TRAIN_DEFAULTS = {"epochs": 8, "batch_size": 64, "lr": 0.002, "weight_decay": 0.0001, "seed": 0}


def benchmark_config(params: dict) -> BenchmarkConfig:
    """The built-in benchmark that ``params`` describe (``builtin`` section, ``data.seed``/``data.image_size``)."""
    data = section(params, "data", DATA_DEFAULTS)
    builtin = section(params, "builtin", BUILTIN_DEFAULTS)
    return BenchmarkConfig(
        seed=data["seed"],
        image_size=data["image_size"],
        per_class={
            "train": builtin["per_class_train"],
            "val": builtin["per_class_val"],
            "test": builtin["per_class_test"],
        },  # fmt: skip
        artifacts=_artifacts(builtin["artifacts"]),
        artifact_size=builtin["artifact_size"],
    )


def generate_builtin(params: dict, out: Path, progress: bool = True) -> Dataset | None:
    """Write the built-in benchmark to ``out`` when ``data.root`` points there; otherwise only a note (the DVC
    stage then costs nothing for a user's own data)."""
    out = Path(out)
    root = section(params, "data", DATA_DEFAULTS)["root"]
    if root is not None and Path(root).resolve() != out.resolve():
        out.mkdir(parents=True, exist_ok=True)
        write_with(out / "NOT_USED.txt", lambda tmp: tmp.write_text(f"data.root is {root}: nothing generated\n"))
        return None
    return write_builtin(out, benchmark_config(params), progress=progress)


def prepare(params: dict, out: Path, progress: bool = True) -> Dataset:
    """Index ``data.root``: a built-in benchmark written by :func:`generate_builtin`, or the user's ImageFolder tree
    (fingerprinted). ``data.root: null`` generates the built-in benchmark right into ``out`` (use without DVC)."""
    data = section(params, "data", DATA_DEFAULTS)
    if data["root"] is None:
        return write_builtin(Path(out), benchmark_config(params), progress=progress)
    root = Path(data["root"])
    if is_builtin_tree(root):
        return link_builtin(root, Path(out))
    return index_imagefolder(root, Path(out), data["val_fraction"], data["seed"], progress=progress)


def _artifacts(specs) -> tuple[Artifact, ...]:
    """``builtin.artifacts``: a list of ``{class, kind, fraction}``, checked before anything is generated."""
    if not isinstance(specs, list) or not specs:
        raise ValueError("builtin.artifacts must be a non-empty list of {class, kind, fraction}")
    artifacts = []
    for spec in specs:
        unknown = sorted(set(spec) - {"class", "kind", "fraction"}) if isinstance(spec, dict) else None
        if unknown is None or unknown or "class" not in spec:
            raise ValueError(f"each of builtin.artifacts is {{class, kind, fraction}}; got {spec!r}")
        artifacts.append(Artifact(spec["class"], spec.get("kind", "stamp"), float(spec.get("fraction", 0.3))))
    return tuple(artifacts)


def _split_arrays(dataset: Dataset, split: str, size: int, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    rows = dataset.split(split)
    return load_images(dataset.root, rows["path"], size, progress=progress), rows["label"].to_numpy()


def train(
    params: dict,
    prepared: Path,
    model_out: Path,
    metrics_out: Path,
    curve_out: Path,
    progress: bool = True,
) -> dict:
    """Train on train, select on val, evaluate on the test splits; write the state dict, metrics and curve."""
    import torch  # here, not at the top: builtin and prepare run without torch (seconds per stage)

    from .models import build_model
    from .training import Normalizer, TrainConfig, accuracy, predict, train_model

    data = section(params, "data", DATA_DEFAULTS)
    model_params = section(params, "model", MODEL_DEFAULTS)
    config = TrainConfig(**section(params, "train", TRAIN_DEFAULTS))
    dataset = load_dataset(prepared)
    size = data["image_size"]
    normalize = Normalizer(data["mean"], data["std"])
    torch.manual_seed(config.seed)
    model = build_model(model_params["arch"], len(dataset.classes), model_params["checkpoint"])
    model, history = train_model(
        model,
        _split_arrays(dataset, "train", size, progress),
        _split_arrays(dataset, "val", size, progress),
        normalize,
        config,
        progress=progress,
    )
    metrics = {"val_acc": max(h["val_acc"] for h in history), "best_epoch": _best_epoch(history)}
    test_splits = [s for s in dataset.splits if s.startswith("test")]
    predictions = {}
    for split in test_splits:
        images, labels = _split_arrays(dataset, split, size, progress)
        predictions[split] = (predict(model, images, normalize), labels)
        metrics[f"{split}_acc"] = accuracy(*predictions[split])
    metrics["per_class_acc"] = {
        split: {name: accuracy(pred[labels == k], labels[labels == k]) for k, name in enumerate(dataset.classes)}
        for split, (pred, labels) in predictions.items()
    }
    if dataset.artifacts:
        metrics["artifacts"] = {}
        for artifact in dataset.artifacts:
            cue = dataset.classes.index(artifact["class"])
            pred, labels = predictions[artifact["attacked_split"]]
            others = labels != cue
            metrics["artifacts"][f"{artifact['class']}/{artifact['kind']}"] = {
                "attacked_acc": accuracy(pred, labels),
                "attacked_predicted_as_class": float((pred[others] == cue).mean()),
                "shortcut_gap": metrics["test_clean_acc"] - accuracy(pred, labels),
            }
        first = metrics["artifacts"][f"{dataset.artifacts[0]['class']}/{dataset.artifacts[0]['kind']}"]
        metrics["poisoned_class"] = dataset.poisoned_class
        metrics["attacked_predicted_as_poisoned"] = first["attacked_predicted_as_class"]
        metrics["shortcut_gap"] = first["shortcut_gap"]

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    write_bytes(model_out, buffer.getvalue())
    write_json(metrics_out, metrics)
    write_with(curve_out, lambda tmp: _write_curve(tmp, history))
    return metrics


def _best_epoch(history: list[dict]) -> int:
    return max(history, key=lambda h: (h["val_acc"], -h["epoch"]))["epoch"]


def _write_curve(path: Path, history: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
