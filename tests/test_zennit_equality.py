"""lrp_core equals zennit 0.5.1 (float64, rtol 1e-5) for each composite, on a VGG-like net, vgg11_bn and resnet18."""

from __future__ import annotations

import pytest
import torch
import torchvision
import zennit_oracle
from conftest import VGGLike, randomize_batch_norms

import lrp_core
from lrp_core import composites

COMPOSITES = ["EpsilonPlus", "EpsilonPlusFlat", "EpsilonGammaBox", "EpsilonAlpha2Beta1"]


def ours(name: str, low=-3.0, high=3.0):
    if name == "EpsilonGammaBox":
        return composites.EpsilonGammaBox(low=low, high=high)
    return getattr(composites, name)()


def assert_equal_to_zennit(model, x, target, name, resnet=False):
    expected = zennit_oracle.attribute(model, x, target, zennit_oracle.composite(name, resnet))
    actual = lrp_core.attribute(model, x, target, composite=ours(name))
    assert actual.shape == x.shape and actual.dtype == x.dtype
    # relevance of a few pixels is ~0 and carries only rounding noise: atol relative to the map's scale
    atol = 1e-9 * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("name", COMPOSITES)
@pytest.mark.parametrize(("seed", "batch", "size"), [(0, 1, 16), (1, 3, 17), (2, 5, 16)])
def test_vgg_like(name, seed, batch, size):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = randomize_batch_norms(VGGLike(), generator).double().eval()
    x = torch.randn(batch, 3, size, size, generator=generator, dtype=torch.float64)
    target = torch.randint(0, 7, (batch,), generator=generator)
    assert_equal_to_zennit(model, x, target, name)


@pytest.mark.parametrize("name", COMPOSITES)
@pytest.mark.parametrize(("seed", "batch"), [(0, 2), (1, 3)])
def test_vgg11_bn(name, seed, batch):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = randomize_batch_norms(torchvision.models.vgg11_bn(num_classes=10), generator).double().eval()
    x = torch.randn(batch, 3, 32, 32, generator=generator, dtype=torch.float64)
    target = torch.randint(0, 10, (batch,), generator=generator)
    assert_equal_to_zennit(model, x, target, name)


@pytest.mark.parametrize("name", COMPOSITES)
@pytest.mark.parametrize(("seed", "batch", "size"), [(0, 2, 32), (1, 4, 40)])
def test_resnet18(name, seed, batch, size):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = randomize_batch_norms(torchvision.models.resnet18(num_classes=10), generator).double().eval()
    x = torch.randn(batch, 3, size, size, generator=generator, dtype=torch.float64)
    target = torch.randint(0, 10, (batch,), generator=generator)
    assert_equal_to_zennit(model, x, target, name, resnet=True)


def test_resnet50_bottleneck():
    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = randomize_batch_norms(torchvision.models.resnet50(num_classes=10), generator).double().eval()
    x = torch.randn(2, 3, 32, 32, generator=generator, dtype=torch.float64)
    assert_equal_to_zennit(model, x, torch.tensor([1, 8]), "EpsilonPlusFlat", resnet=True)


def test_conv1d_net():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv1d(2, 6, 5, padding=2),
        torch.nn.BatchNorm1d(6),
        torch.nn.ReLU(),
        torch.nn.MaxPool1d(2),
        torch.nn.Conv1d(6, 6, 3, stride=2),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool1d(3),
        torch.nn.Flatten(),
        torch.nn.Linear(18, 4),
    )
    model = randomize_batch_norms(model, torch.Generator().manual_seed(0)).double().eval()
    x = torch.randn(3, 2, 31, dtype=torch.float64)
    for name in COMPOSITES:
        assert_equal_to_zennit(model, x, torch.tensor([0, 3, 2]), name)


@pytest.mark.parametrize(
    ("ours_rule", "their_rule"),
    [
        ("WSquare", "WSquare"),
        ("Flat", "Flat"),
        ("ZPlus", "ZPlus"),
        ("Gamma", "Gamma"),
        ("AlphaBeta", "AlphaBeta"),
        ("Epsilon", "Epsilon"),
        ("ZBox", "ZBox"),
    ],
)
def test_each_rule_on_signed_inputs(ours_rule, their_rule):
    """Every rule on the first layer, where inputs have both signs (the x- terms are live)."""
    import zennit.composites as zc
    import zennit.rules as zr

    def make(module, name):
        kwargs = {"low": -2.0, "high": 2.0} if name == "ZBox" else {}
        return getattr(module, name)(**kwargs)

    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 5, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(5 * 36, 3)
    ).double()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 0])
    mine = composites.Composite(
        layer_map=[(torch.nn.ReLU, lrp_core.rules.Pass()), (torch.nn.Linear, lrp_core.rules.Epsilon())],
        name_map={"0": make(lrp_core.rules, ours_rule)},
    )
    theirs = zc.NameMapComposite([(("0",), make(zr, their_rule)), (("1",), zr.Pass()), (("3",), zr.Epsilon())])
    expected = zennit_oracle.attribute(model, x, target, theirs)
    actual = lrp_core.attribute(model, x, target, composite=mine)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-9 * expected.abs().max().item())


def test_mlp_with_batch_norm_1d():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(12, 16),
        torch.nn.BatchNorm1d(16),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(16, 5),
    )
    model = randomize_batch_norms(model, torch.Generator().manual_seed(0)).double().eval()
    x = torch.randn(4, 3, 4, dtype=torch.float64)
    for name in ("EpsilonPlus", "EpsilonPlusFlat"):
        assert_equal_to_zennit(model, x, torch.tensor([0, 1, 2, 4]), name)


@pytest.mark.parametrize("architecture", ["vgg11", "vgg16", "vgg16_bn"])
def test_other_torchvision_vggs_work_out_of_the_box(architecture):
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = getattr(torchvision.models, architecture)(num_classes=4)
    model = randomize_batch_norms(model, generator).double().eval()
    x = torch.randn(1, 3, 32, 32, generator=generator, dtype=torch.float64)
    assert_equal_to_zennit(model, x, torch.tensor([2]), "EpsilonPlusFlat")
