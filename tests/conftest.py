"""Shared test helpers: small models, the zennit oracle, and BatchNorm statistics that are not trivial."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

ROOT = Path(__file__).resolve().parents[1]

torch.set_num_threads(2)


def randomize_batch_norms(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Fresh BatchNorms are identities; random statistics make merging them a real test."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=generator) - 0.5)
    return model


class VGGLike(nn.Module):
    """A small VGG-style net exercising every layer type the engine supports in one forward."""

    def __init__(self, classes: int = 7, batch_norm: bool = True):
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if batch_norm else (lambda c: nn.Identity())
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            norm(8),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, 3, padding=1, stride=2),
            nn.LeakyReLU(0.1),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 12, 3, padding=1),
            norm(12),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(12, 16, 3, padding=1),
            nn.ReLU(),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, 32),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(32, classes),
        )

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


def run_default_benchmark(tmp: Path, stamp_fraction: float, overrides: dict | None = None) -> dict:
    """The default pipeline (tSNE only, to save time) into ``tmp``: prepare, train, attribute, spray, report.
    ``overrides`` ({section: {key: value}}) shrink it for tests that need a pipeline's outputs, not its results."""
    from pipeline import stages
    from pipeline.attribute import run_attribute
    from pipeline.evaluate_stage import run_evaluate
    from pipeline.report_stage import run_report
    from pipeline.spray_stage import run_spray

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["root"] = None  # generate the built-in data into tmp
    params["builtin"]["artifacts"] = [{"class": "triangle", "kind": "stamp", "fraction": stamp_fraction}]
    params["spray"]["embeddings"] = ["tsne"]
    for section, values in (overrides or {}).items():
        params[section].update(values)
    stages.prepare(params, tmp / "prepared", progress=False)
    train = stages.train(params, tmp / "prepared", tmp / "model.pt", tmp / "train.json", tmp / "c.csv", progress=False)
    run_attribute(params, tmp / "prepared", tmp / "model.pt", tmp / "store", progress=False)
    spray = run_spray(params, tmp / "store", tmp / "prepared", tmp / "spray", tmp / "spray.json", progress=False)
    params["evaluate"] = {**params["evaluate"], "methods": ["epsilon_plus_flat", "gradient", "random"]}
    evaluation = (tmp / "evaluate.json", tmp / "curves.json")
    quality = run_evaluate(params, tmp / "prepared", tmp / "model.pt", *evaluation, progress=False)
    report = run_report(
        params, tmp / "spray", tmp / "store", tmp / "prepared", tmp / "reports" / "audit.html", False, evaluation
    )
    return {"train": train, "spray": spray, "report": report, "evaluate": quality, "dir": tmp, "params": params}


@pytest.fixture(scope="session")
def poisoned(tmp_path_factory):
    """The default benchmark with its planted stamp (about two minutes)."""
    return run_default_benchmark(tmp_path_factory.mktemp("poisoned"), 0.3)


@pytest.fixture(scope="session")
def small_benchmark(tmp_path_factory):
    """The default pipeline on 60 training images per class and 2 epochs (seconds): real outputs of every stage."""
    small = {"builtin": {"per_class_train": 60, "per_class_val": 10, "per_class_test": 10}, "train": {"epochs": 2}}
    return run_default_benchmark(tmp_path_factory.mktemp("small"), 0.3, small)


@pytest.fixture(scope="session")
def clean(tmp_path_factory):
    """The default benchmark without the stamp."""
    return run_default_benchmark(tmp_path_factory.mktemp("clean"), 0.0)
