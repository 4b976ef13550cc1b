"""Shared test helpers: small models, the zennit oracle, and BatchNorm statistics that are not trivial."""

from __future__ import annotations

import pytest
import torch
from torch import nn

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
