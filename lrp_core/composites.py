"""Composites: which rule explains which layer. Names and per-layer choices are zennit's, so maps agree.

A composite maps a module to a rule by (in this order) its path in ``name_map``, the ``first_map`` for the first
matching module in ``named_modules()`` order, then the ``layer_map`` by type (first match wins). Modules matched by
none of these must be pass-through layers (max pooling, flatten, dropout, identity) or the engine raises
:class:`~lrp_core.errors.UnsupportedLayerError` before any compute.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from .canonizers import Canonizer, default_canonizers
from .layers import Sum
from .neuralized import Distance, DistanceContrast, KernelContrast, Pool
from .recurrent import RECURRENT_TYPES
from .rules import (
    AlphaBeta,
    DistanceShare,
    Epsilon,
    ExpectedContrast,
    Flat,
    Gamma,
    Midpoint,
    Norm,
    Pass,
    PoolShare,
    Rule,
    SignalTakeAll,
    ZBox,
    ZPlus,
)

__all__ = [
    "Composite",
    "EpsilonPlus",
    "EpsilonPlusFlat",
    "EpsilonGammaBox",
    "EpsilonAlpha2Beta1",
    "COMPOSITES",
    "get_composite",
    "CONVOLUTIONS",
    "LINEAR_LAYERS",
    "AVG_POOLS",
    "ACTIVATIONS",
]

LayerMap = Sequence[tuple[type | tuple[type, ...], Rule]]

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LINEAR_LAYERS = CONVOLUTIONS + (nn.Linear,)
AVG_POOLS = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)
ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Softplus,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.LogSigmoid,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Threshold,
)


class Composite:
    """Assigns rules to modules; also names the canonizers to apply first (``None``: the default ones)."""

    def __init__(
        self,
        layer_map: LayerMap = (),
        first_map: LayerMap = (),
        name_map: Mapping[str, Rule] | None = None,
        canonizers: Sequence[Canonizer] | None = None,
    ):
        self.layer_map = list(layer_map)
        self.first_map = list(first_map)
        self.name_map = dict(name_map or {})
        self.canonizers = default_canonizers() if canonizers is None else list(canonizers)

    def rules(self, model: nn.Module) -> dict[str, Rule]:
        """The rule of every module that has one, by path, in ``named_modules()`` order."""
        assigned: dict[str, Rule] = {}
        first_pending = bool(self.first_map)
        for path, module in model.named_modules():
            if path in self.name_map:
                assigned[path] = self.name_map[path]
                continue
            if first_pending:
                rule = _match(self.first_map, module)
                if rule is not None:
                    assigned[path] = rule
                    first_pending = False
                    continue
            rule = _match(self.layer_map, module)
            if rule is not None:
                assigned[path] = rule
        return assigned

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _match(layer_map: LayerMap, module: nn.Module) -> Rule | None:
    return next((rule for types, rule in layer_map if isinstance(module, types)), None)


def _base_map(stabilizer: float, epsilon: float) -> list[tuple[tuple[type, ...], Rule]]:
    return [
        (ACTIVATIONS, Pass()),
        ((Sum,), Norm(stabilizer)),
        (AVG_POOLS, Norm(stabilizer)),
        (RECURRENT_TYPES, SignalTakeAll(epsilon)),
        ((DistanceContrast,), Midpoint()),
        ((Distance,), DistanceShare()),
        ((KernelContrast,), ExpectedContrast()),
        ((Pool,), PoolShare()),
    ]


class EpsilonPlus(Composite):
    """z+ for convolutions, epsilon for dense layers."""

    def __init__(self, epsilon=1e-6, stabilizer=1e-6, layer_map: LayerMap = (), name_map=None, canonizers=None):
        super().__init__(
            layer_map=[
                *layer_map,
                *_base_map(stabilizer, epsilon),
                (CONVOLUTIONS, ZPlus(stabilizer)),
                (nn.Linear, Epsilon(epsilon)),
            ],
            name_map=name_map,
            canonizers=canonizers,
        )


class EpsilonPlusFlat(Composite):
    """As :class:`EpsilonPlus`, with the flat rule for the first linear layer: the project's default, robust for
    inputs of any sign and scale."""

    def __init__(
        self,
        epsilon=1e-6,
        stabilizer=1e-6,
        layer_map: LayerMap = (),
        first_map: LayerMap = (),
        name_map=None,
        canonizers=None,
    ):
        super().__init__(
            layer_map=[
                *layer_map,
                *_base_map(stabilizer, epsilon),
                (CONVOLUTIONS, ZPlus(stabilizer)),
                (nn.Linear, Epsilon(epsilon)),
            ],
            # a recurrent layer first in the model takes the "first layer" slot, so that a classifier head after it
            # keeps epsilon instead of getting the flat rule
            first_map=[*first_map, (LINEAR_LAYERS, Flat(stabilizer)), (RECURRENT_TYPES, SignalTakeAll(epsilon))],
            name_map=name_map,
            canonizers=canonizers,
        )


class EpsilonGammaBox(Composite):
    """z^B for the first convolution (inputs in ``[low, high]``), gamma for the other convolutions, epsilon for
    dense layers: the recommended composite for image classifiers (Montavon et al. 2019)."""

    def __init__(
        self,
        low,
        high,
        epsilon=1e-6,
        gamma=0.25,
        stabilizer=1e-6,
        layer_map: LayerMap = (),
        first_map: LayerMap = (),
        name_map=None,
        canonizers=None,
    ):
        super().__init__(
            layer_map=[
                *layer_map,
                *_base_map(stabilizer, epsilon),
                (CONVOLUTIONS, Gamma(gamma, stabilizer)),
                (nn.Linear, Epsilon(epsilon)),
            ],
            first_map=[*first_map, (CONVOLUTIONS, ZBox(low, high, stabilizer))],
            name_map=name_map,
            canonizers=canonizers,
        )


class EpsilonAlpha2Beta1(Composite):
    """alpha=2, beta=1 for convolutions, epsilon for dense layers."""

    def __init__(self, epsilon=1e-6, stabilizer=1e-6, layer_map: LayerMap = (), name_map=None, canonizers=None):
        super().__init__(
            layer_map=[
                *layer_map,
                *_base_map(stabilizer, epsilon),
                (CONVOLUTIONS, AlphaBeta(2.0, 1.0, stabilizer)),
                (nn.Linear, Epsilon(epsilon)),
            ],
            name_map=name_map,
            canonizers=canonizers,
        )


#: composites by the names used in params files and the CLI
COMPOSITES: dict[str, type[Composite]] = {
    "epsilon_plus": EpsilonPlus,
    "epsilon_plus_flat": EpsilonPlusFlat,
    "epsilon_gamma_box": EpsilonGammaBox,
    "epsilon_alpha2_beta1": EpsilonAlpha2Beta1,
}


def get_composite(name: str, **kwargs) -> Composite:
    """A composite by name (``epsilon_plus_flat``, ...); unknown names list the known ones."""
    try:
        cls = COMPOSITES[name]
    except KeyError:
        raise ValueError(f"unknown composite {name!r}; choose one of {sorted(COMPOSITES)}") from None
    return cls(**kwargs)
