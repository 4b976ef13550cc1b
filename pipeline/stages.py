"""The stages behind ``dvc repro`` (and the CLI): prepare the data, train the model."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch

from .datasets import Dataset, index_imagefolder, load_dataset, load_images, write_builtin
from .io import write_bytes, write_json, write_with
from .models import build_model
from .params import section
from .synthetic import BenchmarkConfig
from .training import Normalizer, TrainConfig, accuracy, predict, train_model

__all__ = ["DATA_DEFAULTS", "BUILTIN_DEFAULTS", "MODEL_DEFAULTS", "TRAIN_DEFAULTS", "prepare", "train"]

DATA_DEFAULTS = {
    "root": None,
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
    "poisoned_class": "triangle",
    "stamp_fraction": 0.3,
    "stamp_size": 10,
}
MODEL_DEFAULTS = {"arch": "small_cnn", "checkpoint": None}
TRAIN_DEFAULTS = {"epochs": 8, "batch_size": 64, "lr": 0.002, "weight_decay": 0.0001, "seed": 0}


def prepare(params: dict, out: Path, progress: bool = True) -> Dataset:
    """Generate the built-in benchmark (``data.root: null``) or index the user's ImageFolder tree."""
    data = section(params, "data", DATA_DEFAULTS)
    if data["root"] is None:
        builtin = section(params, "builtin", BUILTIN_DEFAULTS)
        config = BenchmarkConfig(
            seed=data["seed"],
            image_size=data["image_size"],
            per_class={
                "train": builtin["per_class_train"],
                "val": builtin["per_class_val"],
                "test": builtin["per_class_test"],
            },
            poisoned_class=builtin["poisoned_class"],
            stamp_fraction=builtin["stamp_fraction"],
            stamp_size=builtin["stamp_size"],
        )
        return write_builtin(Path(out), config, progress=progress)
    return index_imagefolder(Path(data["root"]), Path(out), data["val_fraction"], data["seed"], progress=progress)


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
    test_splits = ["test_clean", "test_as_trained", "test_attacked"] if dataset.source == "builtin" else ["test"]
    predictions = {}
    for split in test_splits:
        images, labels = _split_arrays(dataset, split, size, progress)
        predictions[split] = (predict(model, images, normalize), labels)
        metrics[f"{split}_acc"] = accuracy(*predictions[split])
    metrics["per_class_acc"] = {
        split: {name: accuracy(pred[labels == k], labels[labels == k]) for k, name in enumerate(dataset.classes)}
        for split, (pred, labels) in predictions.items()
    }
    if dataset.source == "builtin":
        poisoned = dataset.classes.index(dataset.poisoned_class)
        pred, labels = predictions["test_attacked"]
        others = labels != poisoned
        metrics["poisoned_class"] = dataset.poisoned_class
        metrics["attacked_predicted_as_poisoned"] = float((pred[others] == poisoned).mean())
        metrics["shortcut_gap"] = metrics["test_clean_acc"] - metrics["test_attacked_acc"]

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
