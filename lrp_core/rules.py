"""LRP rules: how one layer redistributes the relevance of its output onto its inputs.

Every rule is a pure function of the layer's input ``x``, its actual output ``z``, the upper relevance ``R`` and the
layer's parameters, written in differentiable torch. Names, defaults and stabilisers follow zennit, so that a user
can switch libraries and get the same map:

- the *epsilon* of :class:`Epsilon` is added with the sign of the denominator (``+eps`` for ``z >= 0``);
- every other rule stabilises its denominator the same way with ``stabilizer`` (default ``1e-6``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from .layers import Layer

__all__ = [
    "Rule",
    "Epsilon",
    "ZPlus",
    "AlphaBeta",
    "Gamma",
    "Flat",
    "WSquare",
    "ZBox",
    "Pass",
    "Norm",
    "stabilize",
]


def stabilize(z: Tensor, epsilon: float) -> Tensor:
    """``z`` moved away from zero by ``epsilon``, in the direction of its sign (zero counts as positive)."""
    return torch.where(z >= 0, z + epsilon, z - epsilon)


def stabilize_non_negative(z: Tensor, epsilon: float) -> Tensor:
    """:func:`stabilize` for denominators that cannot be negative (z+ sums, flat and w^2 counts): one add."""
    return z + epsilon


def _pos(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clamp(min=0)


def _neg(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clamp(max=0)


def _has_negative(x: Tensor) -> bool:
    # inputs after a ReLU are non-negative; their negative parts are exactly zero and can be skipped
    return bool(x.amin() < 0)


class Rule(ABC):
    """Maps upper relevance to the inputs of one layer."""

    #: whether the rule needs the layer's weight and bias
    needs_parameters: bool = False
    #: whether the rule reads the layer's input and output (if not, the engine does not keep them alive)
    needs_tensors: bool = True

    @abstractmethod
    def relevance(
        self, layer: Layer, inputs: tuple[Tensor, ...], output: Tensor, relevance: Tensor
    ) -> tuple[Tensor, ...]:
        """Relevance of each input, given the layer, its inputs, its output and the relevance of the output."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Epsilon(Rule):
    """LRP-epsilon: ``R_i = x_i * sum_j w_ji R_j / (z_j + eps*sign(z_j))``; ``epsilon=0`` gives LRP-0.

    Uses the layer's actual output (bias included) as denominator, so it costs one transposed map, like a gradient.
    Also applies to parameter-free linear layers (pooling, sums), where it is zennit's ``Norm``.
    """

    def __init__(self, epsilon: float = 1e-6):
        self.epsilon = float(epsilon)

    def relevance(self, layer, inputs, output, relevance):
        weight = layer.parameters()[0] if layer.has_parameters else None
        s = relevance / stabilize(output, self.epsilon)
        grads = layer.transpose(s, weight, tuple(x.shape for x in inputs))
        return tuple(x * g for x, g in zip(inputs, grads))


class Norm(Epsilon):
    """Relevance in proportion to each input's contribution, for parameter-free linear layers (pooling, sums)."""

    def __init__(self, stabilizer: float = 1e-6):
        super().__init__(epsilon=stabilizer)


class Pass(Rule):
    """Relevance passes through unchanged: for element-wise activations, which only gate the signal."""

    needs_tensors = False

    def relevance(self, layer, inputs, output, relevance):
        return (relevance,)


class _TwoSignRule(Rule):
    """Shared machinery of rules that treat positive and negative inputs and weights separately."""

    needs_parameters = True

    def __init__(self, stabilizer: float = 1e-6):
        self.stabilizer = float(stabilizer)

    @staticmethod
    def _forward(layer, xp, xn, w_for_pos, w_for_neg, bias):
        """``layer(x+; w_for_pos, bias) + layer(x-; w_for_neg)``; the second term vanishes for ``x >= 0``."""
        z = layer.apply(xp, w_for_pos, bias)
        if xn is not None:
            z = z + layer.apply(xn, w_for_neg, None)
        return z

    @staticmethod
    def _backward(layer, xp, xn, s, w_for_pos, w_for_neg):
        """``x+ * W_pos^T s + x- * W_neg^T s``."""
        shape = (xp.shape,)
        r = xp * layer.transpose(s, w_for_pos, shape)[0]
        if xn is not None:
            r = r + xn * layer.transpose(s, w_for_neg, shape)[0]
        return r

    @staticmethod
    def _split(x: Tensor) -> tuple[Tensor, Tensor | None]:
        if _has_negative(x):
            return x.clamp(min=0), x.clamp(max=0)
        return x, None


class ZPlus(_TwoSignRule):
    """LRP-z+: only positive contributions ``x+ w+`` and ``x- w-`` (with the positive bias) are counted.

    Equals AlphaBeta(alpha=1, beta=0); the deep-Taylor rule for ReLU inputs.
    """

    def relevance(self, layer, inputs, output, relevance):
        (x,) = inputs
        weight, bias = layer.parameters()
        xp, xn = self._split(x)
        wp = weight.clamp(min=0)
        wn = None if xn is None else weight.clamp(max=0)
        # x+ w+ + x- w- + b+ is never negative
        z = self._forward(layer, xp, xn, wp, wn, _pos(bias))
        s = relevance / stabilize_non_negative(z, self.stabilizer)
        return (self._backward(layer, xp, xn, s, wp, wn),)


class AlphaBeta(_TwoSignRule):
    """LRP-alpha-beta: positive contributions weighted by ``alpha``, negative ones by ``beta``.

    ``alpha - beta = 1`` keeps relevance conserved wherever a neuron has both positive and negative contributions.
    """

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6):
        if alpha < 0 or beta < 0:
            raise ValueError("AlphaBeta: alpha and beta must be non-negative")
        if alpha - beta != 1.0:
            raise ValueError(f"AlphaBeta: alpha - beta must equal 1 to conserve relevance, got {alpha} - {beta}")
        super().__init__(stabilizer)
        self.alpha = float(alpha)
        self.beta = float(beta)

    def relevance(self, layer, inputs, output, relevance):
        (x,) = inputs
        weight, bias = layer.parameters()
        xp, xn = self._split(x)
        wp, wn = weight.clamp(min=0), weight.clamp(max=0)
        z_pos = self._forward(layer, xp, xn, wp, wn, _pos(bias))
        # x+ w+ + x- w- + b+ is never negative
        r = self.alpha * self._backward(
            layer, xp, xn, relevance / stabilize_non_negative(z_pos, self.stabilizer), wp, wn
        )
        if self.beta:
            z_neg = self._forward(layer, xp, xn, wn, wp, _neg(bias))
            r = r - self.beta * self._backward(layer, xp, xn, relevance / stabilize(z_neg, self.stabilizer), wn, wp)
        return (r,)


class Gamma(_TwoSignRule):
    """Generalised LRP-gamma: favours positive contributions by adding ``gamma`` times the positive weights.

    Where the output is positive, relevance follows ``(w + gamma w+)`` on positive inputs and ``(w + gamma w-)`` on
    negative ones; where it is negative, the roles swap (zennit's generalised form, valid for signed inputs).
    """

    def __init__(self, gamma: float = 0.25, stabilizer: float = 1e-6):
        super().__init__(stabilizer)
        self.gamma = float(gamma)

    def relevance(self, layer, inputs, output, relevance):
        (x,) = inputs
        weight, bias = layer.parameters()
        g = self.gamma
        xp, xn = self._split(x)
        w_up = weight + g * weight.clamp(min=0)
        w_down = weight + g * weight.clamp(max=0)
        b_up = None if bias is None else bias + g * bias.clamp(min=0)
        b_down = None if bias is None else bias + g * bias.clamp(max=0)
        z_pos = self._forward(layer, xp, xn, w_up, w_down, b_up)
        z_neg = self._forward(layer, xp, xn, w_down, w_up, b_down)
        s_pos = (output > 0).to(relevance.dtype) * relevance / stabilize(z_pos, self.stabilizer)
        s_neg = (output < 0).to(relevance.dtype) * relevance / stabilize(z_neg, self.stabilizer)
        r = self._backward(layer, xp, xn, s_pos, w_up, w_down) + self._backward(layer, xp, xn, s_neg, w_down, w_up)
        return (r,)


def _batch_one(x: Tensor) -> Tensor:
    """A single all-ones sample shaped like one row of ``x``: the Flat and WSquare denominators are batch-free."""
    return x.new_ones((1,) + tuple(x.shape[1:]))


class Flat(Rule):
    """LRP-flat: relevance spread uniformly over each output's receptive field (all weights and inputs set to 1)."""

    needs_parameters = True

    def __init__(self, stabilizer: float = 1e-6):
        self.stabilizer = float(stabilizer)

    def relevance(self, layer, inputs, output, relevance):
        (x,) = inputs
        weight, _ = layer.parameters()
        z = layer.apply(_batch_one(x), torch.ones_like(weight), None)
        s = relevance / stabilize_non_negative(z, self.stabilizer)
        return (layer.transpose_of_ones(s, x.shape),)


class WSquare(Rule):
    """LRP-w^2: relevance in proportion to squared weights, independent of the input (for unbounded inputs).

    As in zennit the bias is squared too and stays in the denominator.
    """

    needs_parameters = True

    def __init__(self, stabilizer: float = 1e-6):
        self.stabilizer = float(stabilizer)

    def relevance(self, layer, inputs, output, relevance):
        (x,) = inputs
        weight, bias = layer.parameters()
        w2 = weight * weight
        z = layer.apply(_batch_one(x), w2, None if bias is None else bias * bias)
        s = relevance / stabilize_non_negative(z, self.stabilizer)
        return (layer.transpose(s, w2, (x.shape,))[0],)


def _bound(value, x: Tensor) -> Tensor:
    """A ZBox bound as a tensor broadcastable to ``x``, keeping a batch of one where the bound is batch-free."""
    bound = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    if bound.dim() == 0:
        return bound.expand((1,) + tuple(x.shape[1:]))
    if bound.dim() < x.dim():
        bound = bound.reshape(tuple(bound.shape) + (1,) * (x.dim() - bound.dim()))
    if bound.shape[0] > x.shape[0]:
        bound = bound[: x.shape[0]]
    return bound.expand((bound.shape[0],) + tuple(x.shape[1:]))


class ZBox(Rule):
    """LRP-z^B for inputs bounded by ``low`` and ``high`` (scalars, per-channel ``(1, C, 1, 1)`` or per-pixel).

    ``R_i = (x_i w_ij - l_i w+_ij - h_i w-_ij) / sum_i(...) * R_j``: the deep-Taylor rule for pixel space.
    """

    needs_parameters = True

    def __init__(self, low, high, stabilizer: float = 1e-6):
        self.low = low
        self.high = high
        self.stabilizer = float(stabilizer)

    def relevance(self, layer, inputs, output, relevance):
        (x,) = inputs
        weight, bias = layer.parameters()
        low, high = _bound(self.low, x), _bound(self.high, x)
        wp, wn = weight.clamp(min=0), weight.clamp(max=0)
        # the layer's own output is the x-term; the biases of the three terms cancel (b - b+ - b-)
        z = output - layer.apply(low, wp, _pos(bias)) - layer.apply(high, wn, _neg(bias))
        s = relevance / stabilize(z, self.stabilizer)
        shape = (x.shape,)
        r = x * layer.transpose(s, weight, shape)[0]
        r = r - low * layer.transpose(s, wp, shape)[0] - high * layer.transpose(s, wn, shape)[0]
        return (r,)
