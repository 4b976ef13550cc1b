"""Models by name: the small CNN of the built-in benchmark and torchvision architectures, with safe checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["ARCHITECTURES", "CheckpointError", "build_model", "load_checkpoint", "small_cnn"]

TORCHVISION = ("vgg11", "vgg11_bn", "vgg16", "vgg16_bn", "resnet18", "resnet50")
ARCHITECTURES = ("small_cnn", *TORCHVISION)


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit the architecture."""


def small_cnn(num_classes: int, width: int = 32) -> nn.Sequential:
    """Four conv blocks (Conv -> BatchNorm -> ReLU, max pooling between) and a linear head.

    Built from layers LRP explains exactly (BatchNorm directly after each conv, so it merges); trains on the
    built-in benchmark (3,000 images of 64 px, 8 epochs) in under three minutes on two CPU cores.
    """
    w = width
    return nn.Sequential(
        nn.Conv2d(3, w, 3, padding=1),
        nn.BatchNorm2d(w),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(w, 2 * w, 3, padding=1),
        nn.BatchNorm2d(2 * w),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * w, 4 * w, 3, padding=1),
        nn.BatchNorm2d(4 * w),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(4 * w, 4 * w, 3, padding=1),
        nn.BatchNorm2d(4 * w),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * w, num_classes),
    )


def build_model(arch: str, num_classes: int, checkpoint: str | Path | None = None) -> nn.Module:
    """A fresh (or checkpointed) model; unknown names list the known ones."""
    if arch == "small_cnn":
        model = small_cnn(num_classes)
    elif arch in TORCHVISION:
        import torchvision

        model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    else:
        raise ValueError(f"unknown model.arch {arch!r}; choose one of {ARCHITECTURES}")
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, arch)
    return model


def load_checkpoint(model: nn.Module, path: str | Path, arch: str = "") -> nn.Module:
    """Load a state dict (or ``{"state_dict": ...}``) with ``weights_only=True``; mismatches name what differs."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, truncated files, non-tensor payloads
        raise CheckpointError(f"checkpoint {path} cannot be loaded safely (weights_only=True): {err}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and hasattr(state[k], "shape") and state[k].shape != v.shape
    )
    if missing or unexpected or wrong_shape:
        parts = [
            f"{label} {items[:5]}{' ...' if len(items) > 5 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong_shape))
            if items
        ]
        raise CheckpointError(
            f"checkpoint {path} does not fit model {arch or type(model).__name__}: " + "; ".join(parts)
        )
    model.load_state_dict(state)
    return model
