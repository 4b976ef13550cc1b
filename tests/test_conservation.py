"""Conservation: with zero biases and vanishing stabilisers, relevance sums to the explained logit per sample;
the per-layer diagnostics account for every bit of relevance in between."""

from __future__ import annotations

import pytest
import torch
from conftest import VGGLike, randomize_batch_norms

import lrp_core
from lrp_core import composites, rules

TINY = 1e-12


def zero_biases(model):
    for module in model.modules():
        if getattr(module, "bias", None) is not None and isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            module.bias.data.zero_()
    return model


CONSERVING = {
    "EpsilonPlus": lambda: composites.EpsilonPlus(epsilon=TINY, stabilizer=TINY),
    "EpsilonPlusFlat": lambda: composites.EpsilonPlusFlat(epsilon=TINY, stabilizer=TINY),
    "EpsilonAlpha2Beta1": lambda: composites.EpsilonAlpha2Beta1(epsilon=TINY, stabilizer=TINY),
    "EpsilonGammaBox": lambda: composites.EpsilonGammaBox(-4.0, 4.0, epsilon=TINY, stabilizer=TINY),
}


def unpadded_net():
    """Alpha-beta passes alpha*R (not R) through a neuron whose negative part is empty; with zero padding a corner
    neuron sees only 12 inputs and that happens at random (2^-12). Without padding it practically never does."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3),
        torch.nn.LeakyReLU(0.1),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 8, 3),
        torch.nn.ReLU(),
        torch.nn.AvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(32, 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 7),
    )


def padded_vgg():
    return VGGLike(batch_norm=False)


CASES = [(name, unpadded_net) for name in sorted(CONSERVING)] + [
    (name, padded_vgg)
    for name in sorted(CONSERVING)
    if name != "EpsilonAlpha2Beta1"  # see unpadded_net
]


@pytest.mark.parametrize(("name", "make_model"), CASES, ids=[f"{n}-{m.__name__}" for n, m in CASES])
def test_relevance_sums_to_the_logit(name, make_model):
    torch.manual_seed(0)
    model = zero_biases(make_model()).double().eval()
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    target = torch.arange(6) % 7
    explanation = lrp_core.explain(model, x, target, composite=CONSERVING[name]())
    logits = explanation.output.gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(explanation.relevance.sum((1, 2, 3)), logits, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(explanation.output_relevance, logits)


def test_biases_absorb_relevance_and_the_record_shows_where():
    torch.manual_seed(0)
    model = randomize_batch_norms(VGGLike(), torch.Generator().manual_seed(0)).double().eval()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    explanation = lrp_core.explain(model, x, torch.tensor([1, 2, 3, 4]), record_layers=True)
    records = explanation.layers
    # top to bottom, every explained layer once, BatchNorms reported as merged into their conv
    assert [r.path for r in records] == [
        "classifier.4",
        "classifier.2",
        "classifier.1",
        "avgpool",
        "features.11",
        "features.10",
        "features.9",
        "features.8",
        "features.6+features.7",
        "features.4",
        "features.3",
        "features.2",
        "features.0+features.1",
    ]
    torch.testing.assert_close(records[0].relevance_out, explanation.output_relevance)
    # in a chain, what leaves one layer enters the next one down
    for upper, lower in zip(records, records[1:]):
        torch.testing.assert_close(upper.relevance_in, lower.relevance_out)
    torch.testing.assert_close(records[-1].relevance_in, explanation.relevance.sum((1, 2, 3)))
    # Pass conserves exactly, Norm up to its stabiliser; layers with biases absorb something
    for record in records:
        if record.rule == "Pass":
            torch.testing.assert_close(record.relevance_in, record.relevance_out, rtol=0, atol=0)
        if record.rule == "Norm":
            torch.testing.assert_close(record.relevance_in, record.relevance_out, rtol=1e-3, atol=1e-9)
    absorbed = [(r.relevance_out - r.relevance_in).abs().max().item() for r in records if r.rule == "Epsilon"]
    assert max(absorbed) > 1e-6
    table = explanation.conservation_table()
    assert "features.0+features.1" in table and "Flat" in table


def test_residual_sum_splits_relevance_instead_of_copying_it():
    import torchvision

    torch.manual_seed(0)
    model = zero_biases(torchvision.models.resnet18(num_classes=5)).double().eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.bias.data.zero_()
            module.running_mean.zero_()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    explanation = lrp_core.explain(
        model, x, torch.tensor([0, 4]), composite=composites.EpsilonPlus(epsilon=TINY, stabilizer=TINY)
    )
    logits = explanation.output.gather(1, torch.tensor([[0], [4]])).squeeze(1)
    # with the skip addition copied (plain gradient), relevance would roughly double at each block
    torch.testing.assert_close(explanation.relevance.sum((1, 2, 3)), logits, rtol=1e-7, atol=1e-9)
    # the canonizer's changes are gone afterwards
    assert not any("lrp_sum" in name for name, _ in model.named_modules())
    assert "forward" not in model.layer1[0].__dict__


def test_output_weights_target_explains_a_weighted_sum_of_logits():
    torch.manual_seed(0)
    model = zero_biases(VGGLike(batch_norm=False)).double().eval()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    weights = torch.randn(3, 7, dtype=torch.float64)
    explanation = lrp_core.explain(
        model, x, weights, composite=composites.EpsilonPlusFlat(epsilon=TINY, stabilizer=TINY)
    )
    torch.testing.assert_close(explanation.relevance.sum((1, 2, 3)), (weights * explanation.output).sum(1))
    # linear in the output weights: the map for w1 + w2 is the sum of the maps
    one = torch.zeros(3, 7, dtype=torch.float64)
    one[:, 2] = 1.0
    by_index = lrp_core.attribute(model, x, torch.full((3,), 2), composite=composites.EpsilonPlusFlat())
    by_weights = lrp_core.attribute(model, x, one, composite=composites.EpsilonPlusFlat())
    torch.testing.assert_close(by_index, by_weights)


def test_flat_rule_spreads_uniformly():
    """A one-layer model under Flat: each output's relevance lands evenly on its receptive field."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)).double()
    composite = lrp_core.composites.Composite(layer_map=[(torch.nn.Linear, rules.Flat(stabilizer=TINY))])
    x = torch.randn(1, 4, dtype=torch.float64)
    relevance = lrp_core.attribute(model, x, torch.tensor([1]), composite=composite)
    logit = model(x)[0, 1]
    torch.testing.assert_close(relevance, (logit / 4).expand(1, 4))
