"""LRP through LSTM and GRU layers: equality with a step-by-step reference, conservation, a known answer."""

from __future__ import annotations

import lrp_reference
import numpy as np
import pytest
import torch
from torch import nn

import lrp_core
from lrp_core import composites, rules
from lrp_core.errors import LRPError, UnsupportedLayerError
from lrp_core.sequence_demo import (
    LastStep,
    MarkerTask,
    hit_rate,
    make_marker_sequences,
    marker_lstm,
    token_relevance,
    train_marker_lstm,
)

EPS = 1e-9
KINDS = {"lstm": (nn.LSTM, lrp_reference.lstm_layer), "gru": (nn.GRU, lrp_reference.gru_layer)}


def _composite(eps: float = EPS):
    return composites.EpsilonPlus(epsilon=eps)


def _params(module: nn.Module, layer: int, reverse: bool):
    suffix = f"_l{layer}" + ("_reverse" if reverse else "")
    names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    return [getattr(module, name + suffix).detach().numpy() for name in names]


def _run_layer(kind, params, x, relevance_h, reverse=False):
    _, layer_fn = KINDS[kind]
    return layer_fn(params, x, relevance_h, reverse=reverse, eps=EPS)


class FinalStates(nn.Module):
    """Two-layer bidirectional recurrent layer (time-major), head on both directions' final states ``h_n``."""

    def __init__(self, rnn: nn.Module, classes: int = 3):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(2 * rnn.hidden_size, classes)

    def forward(self, x):
        _, state = self.rnn(x)
        h_n = state[0] if isinstance(state, tuple) else state
        return self.head(torch.cat([h_n[-2], h_n[-1]], dim=1))


def _head_relevance(head: nn.Linear, h: np.ndarray, target: int) -> np.ndarray:
    weight, bias = head.weight.detach().numpy(), head.bias.detach().numpy()
    z = weight @ h + bias
    start = np.zeros_like(z)
    start[target] = z[target]
    return lrp_reference._epsilon_linear(h, weight, z, start, EPS)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_single_layer_equals_step_by_step_reference(kind):
    torch.manual_seed(0)
    module_type, _ = KINDS[kind]
    model = LastStep(module_type(4, 5, batch_first=True), 3).double().eval()
    x = torch.randn(3, 7, 4, dtype=torch.double)
    target = torch.tensor([0, 2, 1])
    relevance = lrp_core.attribute(model, x, target, composite=_composite())
    params = _params(model.rnn, 0, False)
    for b in range(len(x)):
        xb = x[b].numpy()
        _, hs = _run_layer(kind, params, xb, np.zeros((7, 5)))
        relevance_h = np.zeros((7, 5))
        relevance_h[-1] = _head_relevance(model.head, hs[-1], int(target[b]))
        expected, _ = _run_layer(kind, params, xb, relevance_h)
        np.testing.assert_allclose(relevance[b].numpy(), expected, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_two_layer_bidirectional_equals_composed_reference(kind):
    torch.manual_seed(1)
    module_type, _ = KINDS[kind]
    model = FinalStates(module_type(4, 5, num_layers=2, bidirectional=True)).double().eval()
    length = 6
    x = torch.randn(length, 2, 4, dtype=torch.double)  # time-major
    target = torch.tensor([1, 2])
    relevance = lrp_core.attribute(model, x, target, composite=_composite())
    for b in range(2):
        xb = x[:, b].numpy()
        p = {(layer, rev): _params(model.rnn, layer, rev) for layer in (0, 1) for rev in (False, True)}
        zeros = np.zeros((length, 5))
        _, h0f = _run_layer(kind, p[0, False], xb, zeros)
        _, h0b = _run_layer(kind, p[0, True], xb, zeros, reverse=True)
        x1 = np.concatenate([h0f, h0b], axis=1)
        _, h1f = _run_layer(kind, p[1, False], x1, zeros)
        _, h1b = _run_layer(kind, p[1, True], x1, zeros, reverse=True)
        head = _head_relevance(model.head, np.concatenate([h1f[-1], h1b[0]]), int(target[b]))
        r1f, r1b = np.zeros((length, 5)), np.zeros((length, 5))
        r1f[-1], r1b[0] = head[:5], head[5:]
        r_x1 = _run_layer(kind, p[1, False], x1, r1f)[0] + _run_layer(kind, p[1, True], x1, r1b, reverse=True)[0]
        expected = _run_layer(kind, p[0, False], xb, r_x1[:, :5])[0]
        expected = expected + _run_layer(kind, p[0, True], xb, r_x1[:, 5:], reverse=True)[0]
        np.testing.assert_allclose(relevance[:, b].numpy(), expected, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("layout", [{}, {"num_layers": 2, "bidirectional": True}])
def test_relevance_is_conserved_without_biases(kind, layout):
    torch.manual_seed(2)
    module_type, _ = KINDS[kind]
    rnn = module_type(4, 6, batch_first=True, bias=False, **layout)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = rnn
            self.head = nn.Linear(6 * (2 if layout else 1), 3, bias=False)

        def forward(self, x):
            sequence, _ = self.rnn(x)
            return self.head(sequence[:, 0] if layout else sequence[:, -1])

    model = Model().double().eval()
    x = torch.randn(5, 9, 4, dtype=torch.double)
    explanation = lrp_core.explain(model, x, 2, composite=_composite(1e-12), record_layers=True)
    torch.testing.assert_close(explanation.relevance.sum((1, 2)), explanation.output_relevance, rtol=1e-7, atol=1e-10)
    # with biases the layer absorbs their share, which the per-layer record shows
    biased = LastStep(module_type(4, 6, batch_first=True), 3).double().eval()
    explanation = lrp_core.explain(biased, x, 2, composite=_composite(1e-12), record_layers=True)
    record = next(r for r in explanation.layers if r.path == "rnn")
    absorbed = record.relevance_out - record.relevance_in
    torch.testing.assert_close(explanation.relevance.sum((1, 2)), record.relevance_in, rtol=1e-7, atol=1e-10)
    assert absorbed.abs().max() > 1e-6


def test_relevance_lands_on_the_marker_token():
    task = MarkerTask()
    model = train_marker_lstm(task)
    x, y, positions = make_marker_sequences(task, 400, torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert (model(x).argmax(1) == y).double().mean() > 0.97
    relevance = token_relevance(model, x, y)
    assert hit_rate(relevance, positions) > 0.95
    # the marker holds most of the positive evidence, not just the largest single share
    marker = relevance[torch.arange(len(x)), positions]
    assert (marker / relevance.clamp(min=0).sum(1)).median() > 0.8
    # an untrained LSTM does not point at the marker: the test can fail
    torch.manual_seed(3)
    untrained = marker_lstm(task).double().eval()
    assert hit_rate(token_relevance(untrained, x, y), positions) < 0.5


def test_relevance_is_differentiable_through_the_lstm():
    torch.manual_seed(4)
    model = LastStep(nn.LSTM(3, 4, batch_first=True), classes=2).double().eval()
    x = torch.randn(2, 4, 3, dtype=torch.double, requires_grad=True)

    def relevance_of(inputs):
        return lrp_core.attribute(model, inputs, 1, composite=_composite(1e-3), create_graph=True)

    assert torch.autograd.gradcheck(relevance_of, (x,), eps=1e-6, atol=1e-6)
    loss = relevance_of(x)[:, 0].abs().sum()
    loss.backward()
    assert model.rnn.weight_ih_l0.grad is not None and model.rnn.weight_ih_l0.grad.abs().sum() > 0


def test_batch_first_and_time_major_agree():
    torch.manual_seed(5)
    batch_first = LastStep(nn.GRU(4, 5, batch_first=True), 3).double().eval()
    time_major = FinalStates(nn.GRU(4, 5, num_layers=2, bidirectional=True)).double().eval()
    x = torch.randn(3, 6, 4, dtype=torch.double)
    one = lrp_core.attribute(batch_first, x, 0, composite=_composite())
    assert one.shape == x.shape
    two = lrp_core.attribute(time_major, x.transpose(0, 1), 0, composite=_composite())
    assert two.shape == (6, 3, 4)
    # explaining each sample alone gives the same maps: nothing leaks across the batch
    for b in range(3):
        alone = lrp_core.attribute(batch_first, x[b : b + 1], 0, composite=_composite())
        torch.testing.assert_close(alone[0], one[b])


def test_default_composite_keeps_epsilon_on_the_head_after_an_lstm():
    model = LastStep(nn.LSTM(4, 5, batch_first=True), 3)
    assigned = composites.EpsilonPlusFlat().rules(model)
    assert isinstance(assigned["rnn"], rules.SignalTakeAll)
    assert type(assigned["head"]) is rules.Epsilon


def test_unsupported_recurrent_configurations_raise_clearly():
    model = LastStep(nn.LSTM(4, 5, batch_first=True), 3)
    wrong_rule = composites.EpsilonPlus(layer_map=[(nn.LSTM, rules.Epsilon())])
    with pytest.raises(UnsupportedLayerError, match="'rnn' .*needs the SignalTakeAll rule"):
        lrp_core.attribute(model, torch.randn(2, 3, 4), 0, composite=wrong_rule)

    projected = LastStep(nn.LSTM(4, 5, batch_first=True, proj_size=3), 3)
    projected.head = nn.Linear(3, 3)
    with pytest.raises(UnsupportedLayerError, match="proj_size"):
        lrp_core.attribute(projected, torch.randn(2, 3, 4), 0)

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(4, 5, batch_first=True)
            self.head = nn.Linear(5, 2)

        def forward(self, x):
            packed = nn.utils.rnn.pack_padded_sequence(x, [3, 2], batch_first=True)
            _, (h, _) = self.rnn(packed)
            return self.head(h[-1])

    with pytest.raises(LRPError, match="packed sequences"):
        lrp_core.attribute(Packed().eval(), torch.randn(2, 3, 4), 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_cuda_matches_cpu(kind):
    torch.manual_seed(6)
    module_type, _ = KINDS[kind]
    model = FinalStates(module_type(4, 5, num_layers=2, bidirectional=True)).double().eval()
    x = torch.randn(7, 3, 4, dtype=torch.double)
    cpu = lrp_core.attribute(model, x, 1, composite=_composite())
    gpu = lrp_core.attribute(model.cuda(), x.cuda(), 1, composite=_composite())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-9, atol=1e-12)
