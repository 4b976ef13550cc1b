"""Bad input gets one clear error naming the culprit, and nothing runs before the model is known explainable."""

from __future__ import annotations

import pytest
import torch
from conftest import VGGLike
from torch import nn

import lrp_core
from lrp_core import composites


class Counting(nn.Module):
    calls = 0

    def forward(self, x):
        Counting.calls += 1
        return x


class Scale(nn.Module):
    """A leaf module with a parameter and no rule."""

    def __init__(self):
        super().__init__()
        self.factor = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return x * self.factor


def test_unsupported_layer_fails_before_any_compute_naming_path_and_type():
    Counting.calls = 0
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()),
        nn.Sequential(Counting(), Scale(), nn.GRUCell(4, 4) if False else nn.Upsample(scale_factor=2)),
        nn.Flatten(),
        nn.LazyLinear(2) if False else nn.Linear(4 * 12 * 12, 2),
    )
    with pytest.raises(lrp_core.UnsupportedLayerError) as err:
        lrp_core.attribute(model, torch.randn(1, 3, 8, 8), torch.tensor([0]))
    message = str(err.value)
    assert "'1.0' (Counting)" in message and "'1.1' (Scale)" in message and "'1.2' (Upsample)" in message
    assert Counting.calls == 0, "the model must not run before the error"
    assert [path for path, _, _ in err.value.offenders] == ["1.0", "1.1", "1.2"]


def test_functional_addition_in_forward_is_caught():
    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(3, 4, 3, padding=1)
            self.head = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 2))

        def forward(self, x):
            return self.head(self.a(x) + self.b(x))

    with pytest.raises(lrp_core.UnsupportedLayerError, match=r"'head.0' \(AddBackward"):
        lrp_core.attribute(TwoBranches(), torch.randn(1, 3, 8, 8), torch.tensor([1]))


def test_sum_module_makes_the_same_model_explainable():
    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(3, 4, 3, padding=1)
            self.sum = lrp_core.layers.Sum()
            self.head = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 2))

        def forward(self, x):
            return self.head(self.sum(self.a(x), self.b(x)))

    relevance = lrp_core.attribute(TwoBranches(), torch.randn(1, 3, 8, 8), torch.tensor([1]))
    assert relevance.shape == (1, 3, 8, 8) and torch.isfinite(relevance).all()


def test_batch_norm_in_training_mode():
    model = VGGLike().train()
    with pytest.raises(lrp_core.UnsupportedLayerError, match=r"'features.1' \(BatchNorm2d\): BatchNorm in training"):
        lrp_core.attribute(model, torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))


def test_batch_norm_without_a_linear_before_it():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 2)).eval()
    with pytest.raises(lrp_core.UnsupportedLayerError, match=r"'0' \(BatchNorm2d\): BatchNorm not directly after"):
        lrp_core.attribute(model, torch.randn(1, 3, 8, 8), torch.tensor([0]))


def test_rule_that_needs_weights_on_a_pooling_layer():
    composite = composites.Composite(layer_map=[(nn.AvgPool2d, lrp_core.rules.ZPlus())])
    model = nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    with pytest.raises(lrp_core.UnsupportedLayerError, match="ZPlus needs weights"):
        lrp_core.attribute(model, torch.randn(1, 3, 8, 8), torch.tensor([0]), composite=composite)


def test_unsupported_padding_mode():
    model = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(128, 2))
    with pytest.raises(lrp_core.UnsupportedLayerError, match="padding_mode='reflect'"):
        lrp_core.attribute(model, torch.randn(1, 3, 8, 8), torch.tensor([0]))


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (torch.tensor([0, 9]), r"out of range \[0, 7\) for samples \[1\]"),
        (torch.tensor([0]), r"one class index per sample, shape \(2,\)"),
        (torch.ones(2, 3), r"must have the output's shape \(2, 7\)"),
    ],
)
def test_bad_targets(target, message):
    with pytest.raises(ValueError, match=message):
        lrp_core.attribute(VGGLike().eval(), torch.randn(2, 3, 16, 16), target)


def test_nan_in_input_names_the_sample():
    x = torch.randn(3, 3, 16, 16)
    x[2, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf in samples \[2\]"):
        lrp_core.attribute(VGGLike().eval(), x, torch.tensor([0, 1, 2]))


def test_nan_in_model_output_names_the_sample():
    model = VGGLike().eval()
    model.classifier[4].weight.data[3, 0] = float("nan")
    with pytest.raises(lrp_core.LRPError, match=r"output contains NaN or inf for samples \[0, 1\]"):
        lrp_core.attribute(model, torch.randn(2, 3, 16, 16) + 5, torch.tensor([0, 1]))


def test_output_must_be_logits():
    model = nn.Sequential(nn.Conv2d(3, 2, 3))
    with pytest.raises(lrp_core.LRPError, match=r"logits of shape \(batch, classes\); got \(1, 2, 6, 6\)"):
        lrp_core.attribute(model, torch.randn(1, 3, 8, 8), torch.tensor([0]))


def test_unknown_precision_and_composite_names():
    with pytest.raises(ValueError, match="precision must be one of"):
        lrp_core.attribute(VGGLike().eval(), torch.randn(1, 3, 16, 16), torch.tensor([0]), precision="fp8")
    with pytest.raises(ValueError, match="unknown composite 'eps'; choose one of"):
        composites.get_composite("eps")


def test_alpha_beta_must_conserve():
    with pytest.raises(ValueError, match="alpha - beta must equal 1"):
        lrp_core.rules.AlphaBeta(alpha=2.0, beta=2.0)


def test_model_is_restored_after_an_error():
    model = VGGLike().eval()
    with pytest.raises(ValueError):
        lrp_core.attribute(model, torch.randn(2, 3, 16, 16), torch.tensor([0, 99]))
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    assert model.features[2].inplace


def test_in_place_operation_on_a_layer_output():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 2))

        def forward(self, x):
            return self.head(torch.relu_(self.conv(x)))

    with pytest.raises(lrp_core.LRPError, match="in-place operation in forward"):
        lrp_core.attribute(InPlace(), torch.randn(1, 3, 8, 8), torch.tensor([0]))


def test_output_that_ignores_the_input():
    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Linear(1, 2)

        def forward(self, x):
            return self.bias(torch.ones(x.shape[0], 1))

    with pytest.raises(lrp_core.LRPError, match="does not depend on its input"):
        lrp_core.attribute(Constant(), torch.randn(2, 3), torch.tensor([0, 1]))
