"""What a rule needs to know of a layer: its linear map with substitute parameters, and that map's transpose.

Rules are written once against this small interface, so Linear, Conv1d/2d/3d, BatchNorm-merged convolutions,
pooling and the residual sum share one implementation of every rule. Everything here is plain differentiable torch,
so relevance computed with ``create_graph=True`` carries exact gradients to inputs and parameters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Sum",
    "Layer",
    "DenseLayer",
    "ConvLayer",
    "LinearOperatorLayer",
    "SumLayer",
    "ElementwiseLayer",
    "RecurrentLayer",
    "ModuleLayer",
    "fuse_batch_norm",
]


class Sum(nn.Module):
    """Adds its inputs. A module (not ``a + b``) so that a rule can split relevance between the summands.

    The ResNet canonizer inserts it for the skip addition; use it in your own models wherever two branches merge.
    """

    def forward(self, *inputs: Tensor) -> Tensor:
        out = inputs[0]
        for other in inputs[1:]:
            out = out + other
        return out


class Layer(ABC):
    """A layer as a rule sees it: one or more tensors go in, one comes out."""

    has_parameters: bool = False

    def parameters(self) -> tuple[Tensor, Tensor | None]:
        raise TypeError(f"{type(self).__name__} has no weight: rules that modify weights cannot apply to it")

    def apply(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        raise TypeError(f"{type(self).__name__} has no weight: rules that modify weights cannot apply to it")

    @abstractmethod
    def transpose(self, s: Tensor, weight: Tensor | None, input_shapes: tuple[torch.Size, ...]) -> tuple[Tensor, ...]:
        """The transposed linear map applied to ``s``: one tensor per input, shaped like that input."""

    def transpose_of_ones(self, s: Tensor, input_shape: torch.Size) -> Tensor:
        """``transpose`` with every weight set to one (the Flat rule); layers override it with a cheaper form."""
        weight, _ = self.parameters()
        return self.transpose(s, torch.ones_like(weight), (input_shape,))[0]


class DenseLayer(Layer):
    """``nn.Linear`` (optionally with a BatchNorm1d merged in)."""

    has_parameters = True

    def __init__(self, parameters):
        self._parameters = parameters

    def parameters(self) -> tuple[Tensor, Tensor | None]:
        return self._parameters()

    def apply(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    def transpose(self, s, weight, input_shapes):
        return (s @ weight,)

    def transpose_of_ones(self, s, input_shape):
        return s.sum(-1, keepdim=True).expand(input_shape)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def conv_padding(conv: nn.modules.conv._ConvNd) -> tuple[int, ...]:
    """Numeric, symmetric padding of a convolution; raises ValueError where there is none (e.g. even 'same')."""
    if conv.padding_mode != "zeros":
        raise ValueError(f"padding_mode={conv.padding_mode!r} is not supported (only 'zeros')")
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0,) * len(conv.kernel_size)
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in total):
            raise ValueError("padding='same' with an even kernel pads asymmetrically; use numeric padding")
        return tuple(t // 2 for t in total)
    return tuple(conv.padding)


class ConvLayer(Layer):
    """``nn.Conv1d/2d/3d`` (optionally with a BatchNorm merged in), zero padding."""

    has_parameters = True

    def __init__(self, conv: nn.modules.conv._ConvNd, parameters):
        self.dims = len(conv.kernel_size)
        self.stride = tuple(conv.stride)
        self.padding = conv_padding(conv)
        self.dilation = tuple(conv.dilation)
        self.groups = conv.groups
        self.kernel_size = tuple(conv.kernel_size)
        self._parameters = parameters

    def parameters(self) -> tuple[Tensor, Tensor | None]:
        return self._parameters()

    def apply(self, x, weight, bias):
        return _CONV[self.dims](x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _output_padding(self, s: Tensor, input_shape: torch.Size) -> tuple[int, ...]:
        # conv_transpose cannot know the input size of a strided conv; the remainder goes into output_padding
        out_sizes = s.shape[2:]
        return tuple(
            size - ((out - 1) * stride - 2 * pad + dil * (k - 1) + 1)
            for size, out, stride, pad, dil, k in zip(
                input_shape[2:], out_sizes, self.stride, self.padding, self.dilation, self.kernel_size
            )
        )

    def transpose(self, s, weight, input_shapes):
        (shape,) = input_shapes
        # conv_transpose is the input-gradient of conv, and (unlike aten's convolution_backward on CPU) fast for
        # the few channels of a first layer
        out = _CONV_T[self.dims](
            s, weight, None, self.stride, self.padding, self._output_padding(s, shape), self.groups, self.dilation
        )
        return (out,)

    def transpose_of_ones(self, s, input_shape):
        if self.groups != 1:
            return super().transpose_of_ones(s, input_shape)
        # all-ones weights: every input channel receives the same box-filtered sum over output channels
        summed = s.sum(1, keepdim=True)
        ones = s.new_ones((1, 1) + self.kernel_size)
        out = _CONV_T[self.dims](
            summed,
            ones,
            None,
            self.stride,
            self.padding,
            self._output_padding(s, input_shape),
            1,
            self.dilation,
        )
        return out.expand(input_shape)


class LinearOperatorLayer(Layer):
    """A parameter-free linear module (average pooling): its transpose is its input-gradient."""

    def __init__(self, module: nn.Module):
        self.module = module

    def transpose(self, s, weight, input_shapes):
        (shape,) = input_shapes
        # the map is linear, so its vector-Jacobian product does not depend on the point: use a zero leaf
        with torch.enable_grad():
            probe = s.new_zeros(shape, requires_grad=True)
            # .forward, not __call__: the module carries the engine's hooks
            (out,) = torch.autograd.grad(self.module.forward(probe), probe, s, create_graph=torch.is_grad_enabled())
        return (out,)


class SumLayer(Layer):
    """The :class:`Sum` module: the transpose of a sum copies ``s`` to every summand."""

    def transpose(self, s, weight, input_shapes):
        return tuple(s.expand(shape) if shape != s.shape else s for shape in input_shapes)


class ElementwiseLayer(Layer):
    """An element-wise activation; only pass-through rules apply."""

    def transpose(self, s, weight, input_shapes):
        raise TypeError("an element-wise activation has no linear map; use the Pass rule")


class RecurrentLayer(Layer):
    """An ``nn.LSTM``/``nn.GRU``: its rule reads the module itself (see :mod:`lrp_core.recurrent`)."""

    has_parameters = True

    def __init__(self, module: nn.Module):
        self.module = module

    def transpose(self, s, weight, input_shapes):
        raise TypeError("a recurrent layer has no single linear map; use the SignalTakeAll rule")


class ModuleLayer(Layer):
    """A layer whose rule reads the module's own tensors (the distance and pooling layers of neuralized models)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def transpose(self, s, weight, input_shapes):
        raise TypeError(f"{type(self.module).__name__} has no linear map; use its own rule")


def fuse_batch_norm(weight: Tensor, bias: Tensor | None, bn: nn.modules.batchnorm._BatchNorm):
    """Weight and bias of ``bn(linear(x))`` as one affine layer, computed (differentiably) from the originals.

    The model's parameters are never replaced: the fused tensors are functions of them, so gradients of relevance
    reach the conv's weight and the BatchNorm's weight and bias.
    """
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight * scale
    shift = -bn.running_mean * scale
    if bias is not None:
        shift = shift + bias * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return weight * scale.reshape((-1,) + (1,) * (weight.dim() - 1)), shift
