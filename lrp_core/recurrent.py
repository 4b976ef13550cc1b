"""LRP through ``nn.LSTM`` and ``nn.GRU`` (Arras et al. 2017), batched over samples, differentiable.

The rule (:class:`~lrp_core.rules.SignalTakeAll`) treats every product of a gate and a signal as a wire that carries
all of the relevance to the signal, and every sum as a linear layer under the epsilon rule:

- LSTM, ``c_t = f*c_{t-1} + i*g``: relevance of ``c_t`` splits between ``f*c_{t-1}`` and ``i*g`` in proportion to
  their values; ``h_t = o*tanh(c_t)`` gives all of its relevance to ``c_t``; ``i*g`` all of its relevance to ``g``;
  ``g = tanh(W_ig x + W_hg h + b)`` passes it to the pre-activation, split over ``x`` and ``h_{t-1}`` by epsilon.
- GRU, ``h_t = (1-z)*n + z*h_{t-1}``: split in proportion; ``n = tanh(W_in x + b_in + r*(W_hn h + b_hn))`` is
  linear in ``x`` and ``r*(W_hn h)``, split by epsilon (the reset gate ``r`` only scales the signal).

Gates get nothing. Biases and the initial state absorb their share, so with zero biases and zero initial state the
input relevance sums to what entered the layer (up to the stabilisers).

The module's fast (cuDNN) kernel still computes the forward pass; the rule recomputes the gates in plain torch for
the relevance pass: one batched matmul per time step, and the input-side products for all steps in one matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["RECURRENT_TYPES", "check_recurrent", "recurrent_relevance"]

RECURRENT_TYPES = (nn.LSTM, nn.GRU)


def _stabilize(z: Tensor, epsilon: float) -> Tensor:
    return torch.where(z >= 0, z + epsilon, z - epsilon)


def check_recurrent(module: nn.Module) -> None:
    """Raise ValueError for configurations the rule cannot explain exactly."""
    if not isinstance(module, RECURRENT_TYPES):
        raise ValueError(f"SignalTakeAll explains nn.LSTM and nn.GRU, not a {type(module).__name__}")
    if getattr(module, "proj_size", 0):
        raise ValueError("LSTM with proj_size > 0 is not supported")
    if module.training and module.dropout > 0 and module.num_layers > 1:
        raise ValueError("dropout between recurrent layers is active in training mode: call eval()")


@dataclass
class _Direction:
    """One layer, one direction: its parameters and the quantities the backward pass needs, in processing order."""

    w_ih: Tensor
    w_hh: Tensor
    reverse: bool
    h_prev: list[Tensor]
    cache: list[tuple[Tensor, ...]]


def _parameters(module: nn.Module, layer: int, reverse: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    suffix = f"_l{layer}" + ("_reverse" if reverse else "")
    w_ih, w_hh = getattr(module, "weight_ih" + suffix), getattr(module, "weight_hh" + suffix)
    b_ih = getattr(module, "bias_ih" + suffix) if module.bias else None
    b_hh = getattr(module, "bias_hh" + suffix) if module.bias else None
    return w_ih, w_hh, b_ih, b_hh


def _steps(length: int, reverse: bool) -> range:
    return range(length - 1, -1, -1) if reverse else range(length)


def _lstm_forward(x, params, h, c, reverse) -> tuple[_Direction, Tensor]:
    w_ih, w_hh, b_ih, b_hh = params
    hidden = w_hh.shape[1]
    pre_x = x @ w_ih.T  # (T, B, 4H) for all steps at once
    if b_ih is not None:
        pre_x = pre_x + (b_ih + b_hh)
    outputs: list[Tensor | None] = [None] * x.shape[0]
    direction = _Direction(w_ih, w_hh, reverse, [], [])
    for t in _steps(x.shape[0], reverse):
        gates = pre_x[t] + h @ w_hh.T
        i, f, g, o = gates.split(hidden, dim=-1)
        i, f, g_act, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c_new = f * c + i * g_act
        direction.h_prev.append(h)
        direction.cache.append((c, c_new, f, i * g_act, g))
        h, c = o * torch.tanh(c_new), c_new
        outputs[t] = h
    return direction, torch.stack(outputs)


def _gru_forward(x, params, h, reverse) -> tuple[_Direction, Tensor]:
    w_ih, w_hh, b_ih, b_hh = params
    hidden = w_hh.shape[1]
    pre_x = x @ w_ih.T
    if b_ih is not None:
        pre_x = pre_x + b_ih
    outputs: list[Tensor | None] = [None] * x.shape[0]
    direction = _Direction(w_ih, w_hh, reverse, [], [])
    for t in _steps(x.shape[0], reverse):
        pre_h = h @ w_hh.T
        if b_hh is not None:
            pre_h = pre_h + b_hh
        xr, xz, xn = pre_x[t].split(hidden, dim=-1)
        hr, hz, hn = pre_h.split(hidden, dim=-1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        a = xn + r * hn
        n = torch.tanh(a)
        h_new = (1 - z) * n + z * h
        direction.h_prev.append(h)
        direction.cache.append((h_new, (1 - z) * n, z * h, r, a))
        h = h_new
        outputs[t] = h
    return direction, torch.stack(outputs)


def _lstm_backward(d: _Direction, x, relevance_h, relevance_c_last, epsilon) -> Tensor:
    """Relevance of the layer input ``x`` (T, B, I) given relevance of every hidden state (T, B, H)."""
    hidden = d.w_hh.shape[1]
    w_hg, w_ig = d.w_hh[2 * hidden : 3 * hidden], d.w_ih[2 * hidden : 3 * hidden]
    length = x.shape[0]
    scaled: list[Tensor | None] = [None] * length
    from_next = torch.zeros_like(relevance_h[0])
    carry_c = relevance_c_last
    for k, t in reversed(list(enumerate(_steps(length, d.reverse)))):
        c_prev, c_new, f, ig, g_pre = d.cache[k]
        r_c = carry_c + relevance_h[t] + from_next
        share = r_c / _stabilize(c_new, epsilon)
        carry_c = f * c_prev * share
        s = ig * share / _stabilize(g_pre, epsilon)
        scaled[t] = s
        from_next = d.h_prev[k] * (s @ w_hg)
    return x * (torch.stack(scaled) @ w_ig)


def _gru_backward(d: _Direction, x, relevance_h, epsilon) -> Tensor:
    hidden = d.w_hh.shape[1]
    w_hn, w_in = d.w_hh[2 * hidden :], d.w_ih[2 * hidden :]
    length = x.shape[0]
    scaled: list[Tensor | None] = [None] * length
    from_next = torch.zeros_like(relevance_h[0])
    for k, t in reversed(list(enumerate(_steps(length, d.reverse)))):
        h_new, candidate, kept, r, a = d.cache[k]
        r_h = relevance_h[t] + from_next
        share = r_h / _stabilize(h_new, epsilon)
        s = candidate * share / _stabilize(a, epsilon)
        scaled[t] = s
        from_next = kept * share + d.h_prev[k] * ((r * s) @ w_hn)
    return x * (torch.stack(scaled) @ w_in)


def recurrent_relevance(
    module: nn.Module,
    x: Tensor,
    initial: tuple[Tensor, ...] | None,
    relevance_out: Tensor,
    relevance_states: tuple[Tensor, ...],
    epsilon: float,
) -> Tensor:
    """Relevance of ``x`` given relevance of the module's outputs: the sequence output and ``h_n`` (and ``c_n``).

    ``x`` and ``relevance_out`` are laid out as the module's input and output (``batch_first`` or not); the initial
    state ``initial`` (``None``: zeros) is treated as a constant and absorbs what reaches it.
    """
    lstm = isinstance(module, nn.LSTM)
    layers, hidden = module.num_layers, module.hidden_size
    directions = 2 if module.bidirectional else 1
    if module.batch_first:
        x, relevance_out = x.transpose(0, 1), relevance_out.transpose(0, 1)
    batch = x.shape[1]
    zeros = x.new_zeros(layers * directions, batch, hidden)
    h0 = zeros if initial is None else initial[0]
    c0 = zeros if (initial is None or not lstm) else initial[1]
    inputs: list[Tensor] = []
    forwards: list[list[_Direction]] = []
    layer_input = x
    for layer in range(layers):
        inputs.append(layer_input)
        outs, dirs = [], []
        for direction in range(directions):
            k = layer * directions + direction
            params = _parameters(module, layer, bool(direction))
            if lstm:
                d, out = _lstm_forward(layer_input, params, h0[k], c0[k], bool(direction))
            else:
                d, out = _gru_forward(layer_input, params, h0[k], bool(direction))
            dirs.append(d)
            outs.append(out)
        forwards.append(dirs)
        layer_input = torch.cat(outs, dim=-1) if directions > 1 else outs[0]
    relevance_seq = relevance_out
    relevance_hn = relevance_states[0]
    relevance_cn = relevance_states[1] if lstm else None
    for layer in reversed(range(layers)):
        relevance_in = None
        for direction, d in enumerate(forwards[layer]):
            k = layer * directions + direction
            r_h = relevance_seq[..., direction * hidden : (direction + 1) * hidden]
            last = 0 if d.reverse else r_h.shape[0] - 1
            # h_n of this layer and direction is the hidden state at the last processed step
            r_h = torch.cat([r_h[:last], (r_h[last] + relevance_hn[k]).unsqueeze(0), r_h[last + 1 :]])
            if lstm:
                r_x = _lstm_backward(d, inputs[layer], r_h, relevance_cn[k], epsilon)
            else:
                r_x = _gru_backward(d, inputs[layer], r_h, epsilon)
            relevance_in = r_x if relevance_in is None else relevance_in + r_x
        relevance_seq = relevance_in
    return relevance_seq.transpose(0, 1) if module.batch_first else relevance_seq
