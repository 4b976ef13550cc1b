"""LRP rules: how one layer redistributes the relevance of its output onto its inputs.

Every rule is a pure function of the layer's input ``x``, its actual output ``z``, the upper relevance ``R`` and the
layer's parameters, written in differentiable torch. Names, defaults and stabilisers follow zennit, so that a user
can switch libraries and get the same map:

- the *epsilon* of :class:`Epsilon` is added with the sign of the denominator (``+eps`` for ``z >= 0``);
- every other rule stabilises its denominator the same way with ``stabilizer`` (default ``1e-6``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from .layers import Layer
from .neuralized import Distance, DistanceContrast, KernelContrast, Pool, squared_distances
from .recurrent import recurrent_relevance

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
    "SignalTakeAll",
    "Midpoint",
    "ExpectedContrast",
    "DistanceShare",
    "PoolShare",
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


class SignalTakeAll(Rule):
    """LSTM and GRU layers (Arras et al. 2017): epsilon for the linear parts, signal-take-all for the gates.

    Products of a gate and a signal give all relevance to the signal; sums (the cell update, the GRU interpolation,
    the pre-activations) split it in proportion to their terms, stabilised by ``epsilon`` as in :class:`Epsilon`.
    Biases and the initial state absorb their share. See :mod:`lrp_core.recurrent`.
    """

    needs_parameters = True

    def __init__(self, epsilon: float = 1e-6):
        self.epsilon = float(epsilon)

    def relevance(self, layer, inputs, output, relevance):
        raise TypeError("SignalTakeAll applies to nn.LSTM and nn.GRU only (the engine calls recurrent())")

    def recurrent(self, module, x: Tensor, initial, relevances: tuple[Tensor, ...]) -> Tensor:
        """Relevance of the sequence input ``x`` given relevance of the outputs ``(output, h_n[, c_n])``."""
        return recurrent_relevance(module, x, initial, relevances[0], relevances[1:], self.epsilon)


def _weighted_squared_distances(x: Tensor, centers: Tensor, weights: Tensor) -> Tensor:
    """``sum_k weights[b, k] * (x[b] - centers[k])**2`` per feature, ``(B, D)``, without a (B, K, D) tensor."""
    return x * x * weights.sum(1, keepdim=True) - 2 * x * (weights @ centers) + weights @ (centers * centers)


#: default ``tolerance`` of the neuralized rules per dtype: about the rounding error of a squared distance
#: computed by expansion, relative to the squared scale of the problem
_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


def _tolerance(x: Tensor, centers: tuple[Tensor, ...], relative: float | None) -> Tensor:
    """Per sample ``(B, 1)``: below this a squared distance (or a unit's value) counts as zero. Distances come from
    expanded products whose rounding error grows with ``||x||^2 + max ||c||^2``."""
    relative = _TOLERANCE.get(x.dtype, 1e-2) if relative is None else relative
    # the largest centre norm stays a tensor: no device-to-host sync per layer call
    largest = torch.stack([(c * c).sum(1).max() for c in centers if len(c)]).max()
    scale = (x * x).sum(1, keepdim=True) + largest
    return relative * scale + torch.finfo(x.dtype).tiny


def _distance_shares(x: Tensor, centers: Tensor, relevance: Tensor, distances: Tensor, tolerance: Tensor) -> Tensor:
    """Relevance of units ``||x - c_k||^2 (+ const)`` to the features in proportion to ``(x_d - c_kd)^2``; where
    ``x`` sits on the centre (distance below ``tolerance``) the unit's relevance is split evenly. Conserved."""
    flat = distances <= tolerance
    weights = torch.where(flat, 0.0, relevance / torch.where(flat, 1.0, distances))
    even = torch.where(flat, relevance, 0.0).sum(1, keepdim=True) / x.shape[1]
    return _weighted_squared_distances(x, centers, weights) + even


class _NeuralizedRule(Rule):
    """A rule for one layer type of :mod:`lrp_core.neuralized`; reads the module through ``layer.module``.

    ``tolerance``: values below it, relative to ``||x||^2 + max ||c||^2``, count as zero and their relevance is
    split evenly over the features instead of divided by them (default: 1e-9 in float64, 1e-4 in float32).
    """

    module_types: tuple[type, ...] = ()

    def __init__(self, tolerance: float | None = None):
        self.tolerance = None if tolerance is None else float(tolerance)


class Midpoint(_NeuralizedRule):
    """NEON's midpoint rule for :class:`~lrp_core.neuralized.DistanceContrast` units.

    A unit ``h = ||x - v||^2 - ||x - u||^2`` is linear with weight ``w = 2 (u - v)`` and zero at the midpoint
    ``m = (u + v) / 2``; its relevance goes to feature ``d`` by ``w_d (x_d - m_d) / h``, shares that sum to one.
    Computed by matrix products, never a (batch, units, features) tensor. A unit at (numerically) zero splits its
    relevance evenly.
    """

    module_types = (DistanceContrast,)

    def relevance(self, layer, inputs, output, relevance):
        m = layer.module
        (x,) = inputs
        tol = _tolerance(x, (m.own, m.rival), self.tolerance)[:, :, None]
        h, r = output, relevance
        if m.pair_mask is not None:
            h = h.masked_fill(~m.pair_mask, 1.0)
            r = r.masked_fill(~m.pair_mask, 0.0)
        flat = h.abs() <= tol
        a = torch.where(flat, 0.0, r / torch.where(flat, 1.0, h))
        # w_d (x_d - m_d) = (x_d - v_d)^2 - (x_d - u_d)^2, summed over the pairs with weights a
        out = _weighted_squared_distances(x, m.rival, a.sum(1)) - _weighted_squared_distances(x, m.own, a.sum(2))
        return (out + torch.where(flat, r, 0.0).sum((1, 2))[:, None] / x.shape[1],)


class ExpectedContrast(_NeuralizedRule):
    """The rule of :class:`~lrp_core.neuralized.KernelContrast` (the neuralized SVC), end to end.

    Through the two soft pools relevance flows in proportion to the pooled values (their log-weights and entropy
    act as biases), and through each pair unit by the midpoint rule. Together this gives feature ``d``
    ``E_neg[(x_d - v_d)^2] - E_pos[(x_d - u_d)^2]``, the contrast of the squared distances expected under the two
    kernel posteriors, and their sum is ``E[h]``. The pools' bias share ``g - E[h]`` is then spread over the
    features in proportion to ``|contrast_d|``, so the map sums to ``g`` exactly and keeps the contrast's signs
    wherever the support-vector weights do not dominate.
    """

    module_types = (KernelContrast,)

    def relevance(self, layer, inputs, output, relevance):
        m = layer.module
        (x,) = inputs
        pos, neg = m.units(x)
        p_pos = torch.softmax(-m.gamma * pos, dim=1)[:, : m.positive.shape[0]]
        p_neg = torch.softmax(-m.gamma * neg, dim=1)[:, : m.negative.shape[0]]
        # the pseudo entries (an intercept) have no distance term: they contribute nothing to the expectations
        contrast = _weighted_squared_distances(x, m.negative, p_neg) - _weighted_squared_distances(x, m.positive, p_pos)
        magnitude = contrast.abs()
        total = magnitude.sum(1, keepdim=True)
        tol = _tolerance(x, (m.positive, m.negative), self.tolerance)
        spread = torch.where(total > tol, magnitude / torch.where(total > tol, total, 1.0), 1.0 / x.shape[1])
        decomposed = contrast + (output - contrast.sum(1, keepdim=True)) * spread  # sums to g = output
        scale = relevance / torch.where(output >= 0, output + torch.finfo(x.dtype).tiny, output)
        return (decomposed * scale,)


class DistanceShare(_NeuralizedRule):
    """OC-DTD's rule for :class:`~lrp_core.neuralized.Distance` units: the relevance of ``||x - u||^2 + c`` goes
    to the features in proportion to ``(x_d - u_d)^2``, the feature's share of the distance (conserved)."""

    module_types = (Distance,)

    def relevance(self, layer, inputs, output, relevance):
        m = layer.module
        (x,) = inputs
        tol = _tolerance(x, (m.centers,), self.tolerance)
        return (_distance_shares(x, m.centers, relevance, squared_distances(x, m.centers), tol),)


class PoolShare(_NeuralizedRule):
    """Relevance of a min/max :class:`~lrp_core.neuralized.Pool` shared among the pooled units by a soft-min/max
    with stiffness ``beta`` (default: the module's ``explain_temperature``, else its own temperature; ``inf``:
    winner takes all). Conserved."""

    module_types = (Pool,)

    def __init__(self, beta: float | None = None):
        self.beta = None if beta is None else float(beta)

    def relevance(self, layer, inputs, output, relevance):
        m = layer.module
        (z,) = inputs
        beta = self.beta if self.beta is not None else m.explain_temperature
        beta = m.temperature if beta is None else beta
        sign = -1.0 if m.mode == "min" else 1.0
        if math.isinf(beta):
            index = z.argmin(m.dim, keepdim=True) if sign < 0 else z.argmax(m.dim, keepdim=True)
            weights = torch.zeros_like(z).scatter_(m.dim, index, 1.0)
        else:
            weights = torch.softmax(sign * beta * z, dim=m.dim)
        upper = relevance if m.keepdim else relevance.unsqueeze(m.dim)
        return (weights * upper,)
