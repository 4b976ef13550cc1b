"""create_graph=True: exact first and second derivatives of relevance w.r.t. the input and every parameter,
and the model's own parameters stay the ones an optimizer trains."""

from __future__ import annotations

import pytest
import torch
from conftest import VGGLike, randomize_batch_norms
from torch import nn

import lrp_core
from lrp_core import composites

COMPOSITES = {
    "EpsilonPlusFlat": composites.EpsilonPlusFlat,
    "EpsilonPlus": composites.EpsilonPlus,
    "EpsilonAlpha2Beta1": composites.EpsilonAlpha2Beta1,
    "EpsilonGammaBox": lambda: composites.EpsilonGammaBox(-3.0, 3.0),
}


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(3, 3, 3, padding=1),
        nn.LeakyReLU(0.1),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(3, 2),
    )
    return randomize_batch_norms(net, torch.Generator().manual_seed(1)).double().eval()


class RelevanceOf(nn.Module):
    """``x -> R(x; params)`` as a module, so torch.func.functional_call can substitute every parameter."""

    def __init__(self, model, composite, target):
        super().__init__()
        self.model, self.composite, self.target = model, composite, target

    def forward(self, x):
        return lrp_core.attribute(self.model, x, self.target, composite=self.composite, create_graph=True)


@pytest.mark.parametrize("name", sorted(COMPOSITES))
def test_gradcheck_and_gradgradcheck_for_input_and_parameters(name):
    model = tiny_net()
    names = [n for n, _ in model.named_parameters()]
    assert any("1." in n for n in names), "the BatchNorm's weight and bias are among the checked parameters"
    params = tuple(p.detach().clone().requires_grad_() for p in model.parameters())
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    explainer = RelevanceOf(model, COMPOSITES[name](), torch.tensor([0, 1]))

    def relevance(x, *ps):
        return torch.func.functional_call(explainer, {f"model.{n}": p for n, p in zip(names, ps)}, (x,))

    assert torch.autograd.gradcheck(relevance, (x, *params))
    assert torch.autograd.gradgradcheck(relevance, (x, *params))


def test_gradcheck_detects_a_wrong_derivative():
    """The check above can fail: detaching the weights inside the rule breaks it."""
    model = tiny_net()
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in model.parameters())
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    explainer = RelevanceOf(model, composites.EpsilonPlus(), torch.tensor([0, 1]))

    def relevance_with_detached_output(x, *ps):
        r = torch.func.functional_call(explainer, {f"model.{n}": p for n, p in zip(names, ps)}, (x,))
        return r.detach() + 0 * sum(p.sum() for p in ps) + 0 * x.sum()

    with pytest.raises(RuntimeError, match="Jacobian mismatch"):
        torch.autograd.gradcheck(relevance_with_detached_output, (x, *params))


def test_every_parameter_gets_a_gradient_and_the_optimizer_trains_the_model():
    torch.manual_seed(0)
    model = randomize_batch_norms(VGGLike(), torch.Generator().manual_seed(0)).eval()
    before = {n: p for n, p in model.named_parameters()}
    values = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 3, 16, 16)
    explanation = lrp_core.explain(model, x, torch.tensor([0, 1, 2, 3]), create_graph=True)
    # a loss on the explanation and on the logits of the same pass
    loss = explanation.relevance[:, :, :4, :4].abs().sum() + nn.functional.cross_entropy(
        explanation.output, torch.tensor([0, 1, 2, 3])
    )
    loss.backward()
    after = dict(model.named_parameters())
    assert all(after[n] is before[n] for n in before), "parameters must never be replaced"
    missing = [n for n, p in after.items() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no gradient for {missing}"
    optimizer.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), values[n])]
    assert len(changed) == len(values)


def test_relevance_gradient_matches_finite_differences_for_a_bigger_model():
    """Directional derivative of a loss on R w.r.t. all parameters at once, against a central difference."""
    torch.manual_seed(0)
    model = randomize_batch_norms(VGGLike(), torch.Generator().manual_seed(0)).double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    target = torch.tensor([3, 5])
    mask = torch.zeros_like(x)
    mask[..., :6, :6] = 1

    def loss() -> torch.Tensor:
        relevance = lrp_core.attribute(model, x, target, create_graph=True)
        return ((relevance * mask) ** 2).sum()

    value = loss()
    grads = torch.autograd.grad(value, list(model.parameters()))
    directions = [torch.randn_like(p) for p in model.parameters()]
    analytic = sum((g * d).sum() for g, d in zip(grads, directions)).item()
    h = 1e-6
    with torch.no_grad():
        for p, d in zip(model.parameters(), directions):
            p.add_(h * d)
    plus = loss().item()
    with torch.no_grad():
        for p, d in zip(model.parameters(), directions):
            p.sub_(2 * h * d)
    minus = loss().item()
    numeric = (plus - minus) / (2 * h)
    assert analytic == pytest.approx(numeric, rel=1e-5)


def test_model_is_left_as_it_was():
    import torchvision

    model = torchvision.models.resnet18(num_classes=3).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    hooks = (len(model._forward_hooks), sum(len(m._forward_hooks) for m in model.modules()))
    lrp_core.attribute(model, torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(m.inplace for m in relus)
    assert (len(model._forward_hooks), sum(len(m._forward_hooks) for m in model.modules())) == hooks
    assert not any("lrp_sum" in n for n, _ in model.named_modules())


def _directional_derivatives(model, relevance_fn, seed=0):
    """(autograd, central difference) of ``sum(R**2)`` along one random direction in parameter space."""
    generator = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    directions = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]
    grads = torch.autograd.grad((relevance_fn() ** 2).sum(), params)
    analytic = sum((g * d).sum() for g, d in zip(grads, directions)).item()
    values = []
    for step in (1e-6, -2e-6, 1e-6):
        with torch.no_grad():
            for p, d in zip(params, directions):
                p.add_(step * d)
        values.append((relevance_fn() ** 2).sum().item())
    return analytic, (values[0] - values[1]) / 2e-6


def test_parameter_gradients_are_right_where_zennits_are_wrong():
    import zennit.attribution
    import zennit.composites

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 2)).double()
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    target = torch.tensor([0, 1])

    def ours():
        return lrp_core.attribute(model, x, target, composite=composites.EpsilonPlus(), create_graph=True)

    def theirs():
        composite = zennit.composites.EpsilonPlus()
        with zennit.attribution.Gradient(model=model, composite=composite, create_graph=True) as attributor:
            return attributor(x, lambda out: nn.functional.one_hot(target, 2).to(out) * out)[1]

    torch.testing.assert_close(ours(), theirs())  # same maps ...
    analytic, numeric = _directional_derivatives(model, ours)
    assert analytic == pytest.approx(numeric, rel=1e-6)
    analytic, numeric = _directional_derivatives(model, theirs)
    assert analytic != pytest.approx(numeric, rel=0.1)  # ... but zennit's weight gradients are wrong
