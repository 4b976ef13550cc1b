"""The engine: turns a model plus a composite into hooked *units* whose backward pass is LRP.

How it stays exact and differentiable. Each explained layer's output passes through :class:`_Relevance`, an
autograd function that is the identity in the forward pass and has two backward modes:

- *LRP mode* (only inside :func:`~lrp_core.attribute`): its backward applies the layer's rule to the saved input and
  output and returns relevance for the layer's input, bypassing the layer's own gradient. Relevance between layers
  flows through autograd, so reshapes, max pooling and concatenation in ``forward`` need no special code.
- *gradient mode* (always afterwards): its backward is the identity, so the recorded forward graph is the true one.

With ``create_graph=True`` the rule computations are recorded with ordinary differentiable torch ops on tensors
whose history is the true forward graph, so any function of the relevance has exact gradients with respect to the
input and every parameter. The model's Parameter objects are read, never replaced.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .canonizers import BATCH_NORM_TYPES, CanonicalForm
from .composites import ACTIVATIONS, Composite
from .errors import CanonizationError, LRPError, UnsupportedLayerError
from .layers import (
    ConvLayer,
    DenseLayer,
    ElementwiseLayer,
    Layer,
    LinearOperatorLayer,
    ModuleLayer,
    RecurrentLayer,
    Sum,
    SumLayer,
    conv_padding,
    fuse_batch_norm,
)
from .neuralized import NEURALIZED_LAYERS
from .recurrent import RECURRENT_TYPES, check_recurrent
from .rules import Pass, Rule, SignalTakeAll

__all__ = ["LayerRecord", "Session", "Unit", "build_units", "attach"]

#: modules whose plain gradient already is the LRP rule (winner-takes-all, reshapes, identities)
PASS_THROUGH = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Flatten,
    nn.Unflatten,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Identity,
)


@dataclass
class LayerRecord:
    """Relevance entering (``relevance_out``, at the layer output) and leaving (``relevance_in``, summed over the
    layer's inputs) one call of one layer, per sample. Their difference is what the layer absorbed or created."""

    path: str
    rule: str
    relevance_out: Tensor
    relevance_in: Tensor


class Session:
    """State shared by the units during one attribution call."""

    def __init__(
        self,
        record_layers: bool = False,
        autocast_dtype: torch.dtype | None = None,
        latent: tuple[str, ...] = (),
        latent_pools: tuple[str, ...] = ("sum",),
    ):
        self.lrp_active = False
        self.records: list[LayerRecord] | None = [] if record_layers else None
        self.autocast_dtype = autocast_dtype
        #: unit path -> (B, P, C) relevance of each output channel, pooled over the other axes in each of the P
        #: ways ``latent_pools`` names (``latent``)
        self.latent_paths = frozenset(latent)
        self.latent_pools = latent_pools
        self.latent: dict[str, Tensor] = {}

    def keep_latent(self, unit: Unit, relevance: Tensor) -> None:
        """Relevance arriving at ``unit``'s output, per channel (axis 1), pooled over positions (see
        :data:`lrp_core.latent.LATENT_POOLS`). A module called more than once (a shared block) combines its calls
        the same way (sums add up, peaks take the larger)."""
        if unit.path not in self.latent_paths:
            return
        channels = relevance.detach().float()
        positions = channels.flatten(2) if channels.dim() > 2 else channels[..., None]
        pooled = torch.stack([positions.sum(2) if p == "sum" else positions.amax(2) for p in self.latent_pools], 1)
        previous = self.latent.get(unit.path)
        if previous is not None:
            sums = torch.tensor([p == "sum" for p in self.latent_pools], device=pooled.device)[None, :, None]
            pooled = torch.where(sums, previous + pooled, torch.maximum(previous, pooled))
        self.latent[unit.path] = pooled


@dataclass(eq=False)
class Unit:
    """One explained layer: a module (plus a merged BatchNorm) with its rule."""

    path: str
    module: nn.Module
    rule: Rule
    layer: Layer
    batch_norm: nn.Module | None = None
    batch_norm_path: str | None = None
    pending: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    def relevance(self, inputs: tuple[Tensor, ...], output: Tensor, relevance: Tensor) -> tuple[Tensor, ...]:
        return self.rule.relevance(self.layer, inputs, output, relevance)


class _Relevance(torch.autograd.Function):
    """Identity forward; LRP or identity backward depending on the session's mode (see module docstring)."""

    @staticmethod
    def forward(ctx, session: Session, unit: Unit, *tensors: Tensor) -> Tensor:
        ctx.session = session
        ctx.unit = unit
        ctx.n_inputs = len(tensors) - 1
        if unit.rule.needs_tensors:
            ctx.save_for_backward(*tensors)
        # returned as-is, autograd hands out an alias that in-place code cannot modify (it raises instead):
        # the saved output stays intact without a copy
        return tensors[-1]

    @staticmethod
    def backward(ctx, relevance: Tensor):
        session: Session = ctx.session
        if not session.lrp_active:
            return (None, None, *(None for _ in range(ctx.n_inputs)), relevance)
        unit: Unit = ctx.unit
        session.keep_latent(unit, relevance)
        if not unit.rule.needs_tensors:
            # pass-through: nothing was saved (an activation's input and output need not stay alive for it)
            results = unit.relevance((), relevance, relevance)
            _record(session, unit, relevance, results)
            return (None, None, *results, None)
        *inputs, output = ctx.saved_tensors
        if session.autocast_dtype is not None:
            with torch.autocast(output.device.type, dtype=session.autocast_dtype):
                results = unit.relevance(tuple(inputs), output, relevance)
        else:
            results = unit.relevance(tuple(inputs), output, relevance)
        results = tuple(r.to(x.dtype) for r, x in zip(results, inputs))
        _record(session, unit, relevance, results)
        return (None, None, *results, None)


class _RecurrentRelevance(torch.autograd.Function):
    """:class:`_Relevance` for ``nn.LSTM``/``nn.GRU``: identity on ``(output, h_n[, c_n])``; in LRP mode the
    backward turns the relevance of all of them into relevance of the sequence input."""

    @staticmethod
    def forward(ctx, session: Session, unit: Unit, initial, x: Tensor, *outputs: Tensor):
        ctx.session = session
        ctx.unit = unit
        ctx.initial = initial
        ctx.n_outputs = len(outputs)
        ctx.save_for_backward(x)
        return outputs

    @staticmethod
    def backward(ctx, *relevances: Tensor):
        session: Session = ctx.session
        if not session.lrp_active:
            return (None, None, None, None, *relevances)
        unit: Unit = ctx.unit
        (x,) = ctx.saved_tensors
        result = unit.rule.recurrent(unit.module, x, ctx.initial, relevances).to(x.dtype)
        if session.records is not None:
            # per-sample sums need the batch first: h_n, c_n are (layers * directions, B, H)
            time_major = not unit.module.batch_first
            outs = (relevances[0].transpose(0, 1) if time_major else relevances[0],)
            outs += tuple(r.transpose(0, 1) for r in relevances[1:])
            _record(session, unit, outs, (result.transpose(0, 1) if time_major else result,))
        return (None, None, None, result, *(None for _ in range(ctx.n_outputs)))


def _record(session: Session, unit: Unit, relevance, results: tuple[Tensor, ...]) -> None:
    if session.records is None:
        return
    outs = relevance if isinstance(relevance, tuple) else (relevance,)
    session.records.append(
        LayerRecord(
            path=unit.path if unit.batch_norm_path is None else f"{unit.path}+{unit.batch_norm_path}",
            rule=type(unit.rule).__name__,
            relevance_out=sum(_per_sample_sum(r) for r in outs),
            relevance_in=sum(_per_sample_sum(r) for r in results),
        )
    )


def _per_sample_sum(t: Tensor) -> Tensor:
    return t.detach().reshape(t.shape[0], -1).sum(1).double()


def _parameters_of(module: nn.Module, batch_norm: nn.Module | None) -> Callable[[], tuple[Tensor, Tensor | None]]:
    if batch_norm is None:
        return lambda: (module.weight, module.bias)
    return lambda: fuse_batch_norm(module.weight, module.bias, batch_norm)


def _layer_for(path: str, module: nn.Module, rule: Rule, batch_norm: nn.Module | None) -> Layer:
    """The rule's view of ``module``; raises ValueError (collected into one error) where the pair cannot work."""
    if isinstance(rule, Pass):
        return ElementwiseLayer()
    module_types = getattr(rule, "module_types", None)
    if module_types:
        if not isinstance(module, module_types):
            names = ", ".join(t.__name__ for t in module_types)
            raise ValueError(f"rule {type(rule).__name__} applies to {names}, not a {type(module).__name__}")
        return ModuleLayer(module)
    if isinstance(module, NEURALIZED_LAYERS):
        raise ValueError(
            f"a {type(module).__name__} needs its rule from lrp_core.rules "
            "(Midpoint, ExpectedContrast, DistanceShare, PoolShare)"
        )
    if isinstance(rule, SignalTakeAll):
        check_recurrent(module)
        return RecurrentLayer(module)
    if isinstance(module, RECURRENT_TYPES):
        raise ValueError(f"a {type(module).__name__} needs the SignalTakeAll rule, not {type(rule).__name__}")
    if isinstance(module, nn.Linear):
        layer: Layer = DenseLayer(_parameters_of(module, batch_norm))
    elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        conv_padding(module)  # raises for unsupported padding
        layer = ConvLayer(module, _parameters_of(module, batch_norm))
    elif isinstance(module, Sum):
        layer = SumLayer()
    elif isinstance(module, nn.modules.pooling._AvgPoolNd | nn.modules.pooling._AdaptiveAvgPoolNd):
        layer = LinearOperatorLayer(module)
    else:
        raise ValueError(f"rule {type(rule).__name__} cannot be applied to a {type(module).__name__}")
    if rule.needs_parameters and not layer.has_parameters:
        raise ValueError(f"rule {type(rule).__name__} needs weights, which a {type(module).__name__} lacks")
    return layer


def build_units(model: nn.Module, composite: Composite, form: CanonicalForm) -> list[Unit]:
    """Resolve every module to a unit, a pass-through or an error; all problems are reported together."""
    rules = composite.rules(model)
    modules = dict(model.named_modules())
    merged_into = {linear: bn for bn, linear in form.merged_batch_norms.items()}
    problems: list[tuple[str, str, str]] = []
    units: list[Unit] = []
    for path, module in modules.items():
        kind = type(module).__name__
        has_children = next(module.children(), None) is not None
        if path in form.merged_batch_norms:
            if module.training:
                problems.append((path, kind, "BatchNorm in training mode (LRP merges running statistics): eval()"))
            continue
        rule = rules.get(path)
        if rule is None:
            if has_children:
                if next(module.parameters(recurse=False), None) is not None:
                    problems.append((path, kind, "uses its own parameters in forward(); no rule covers it"))
                continue
            if isinstance(module, PASS_THROUGH):
                continue
            why = "BatchNorm not directly after a Linear/Conv" if isinstance(module, BATCH_NORM_TYPES) else "no rule"
            problems.append((path, kind, why))
            continue
        bn_path = merged_into.get(path)
        batch_norm = modules[bn_path] if bn_path is not None else None
        try:
            layer = _layer_for(path, module, rule, batch_norm)
        except ValueError as err:
            problems.append((path, kind, str(err)))
            continue
        units.append(Unit(path, module, rule, layer, batch_norm, bn_path))
    if problems:
        raise UnsupportedLayerError(problems)
    return units


def _wrap_recurrent(session: Session, unit: Unit, inputs: tuple, output):
    x = inputs[0]
    if not isinstance(x, Tensor):
        raise LRPError(
            f"'{unit.path}' received a {type(x).__name__}; LRP explains padded (B, T, features) tensors, not packed "
            "sequences"
        )
    if x.dim() != 3:
        raise LRPError(f"'{unit.path}' received an unbatched {x.dim()}-d sequence; pass a batch")
    sequence, state = output
    states = state if isinstance(state, tuple) else (state,)
    initial = inputs[1] if len(inputs) > 1 else None
    if isinstance(initial, Tensor):
        initial = (initial,)
    sequence, *states = _RecurrentRelevance.apply(session, unit, initial, x, sequence, *states)
    return sequence, (tuple(states) if isinstance(state, tuple) else states[0])


def _wrap(session: Session, unit: Unit, inputs: tuple, output: Tensor) -> Tensor:
    tensors = list(inputs) if isinstance(unit.layer, SumLayer) else list(inputs[:1])
    if not all(isinstance(t, Tensor) for t in tensors) or not isinstance(output, Tensor):
        raise CanonizationError(f"module '{unit.path}' takes or returns something other than tensors")
    return _Relevance.apply(session, unit, *tensors, output)


def attach(session: Session, units: list[Unit]) -> list[Callable[[], None]]:
    """Register the forward hooks of all units; returns undo actions (hook removal, restored flags)."""
    undo: list[Callable[[], None]] = []
    for unit in units:
        module = unit.module
        if isinstance(unit.rule, Pass) and isinstance(module, ACTIVATIONS) and getattr(module, "inplace", False):
            # an in-place activation would overwrite the input the unit saved; run it out of place meanwhile
            module.inplace = False
            undo.append(lambda m=module: setattr(m, "inplace", True))
        if isinstance(unit.layer, RecurrentLayer):

            def recurrent_hook(module, inputs, output, unit=unit):
                return _wrap_recurrent(session, unit, inputs, output)

            undo.append(module.register_forward_hook(recurrent_hook).remove)
            continue
        if unit.batch_norm is None:

            def hook(module, inputs, output, unit=unit):
                return _wrap(session, unit, inputs, output)

            undo.append(module.register_forward_hook(hook).remove)
            continue

        def linear_hook(module, inputs, output, unit=unit):
            unit.pending.append((inputs[0], output))

        def batch_norm_hook(module, inputs, output, unit=unit):
            if not unit.pending or unit.pending[-1][1] is not inputs[0]:
                raise CanonizationError(
                    f"BatchNorm '{unit.batch_norm_path}' does not consume the output of '{unit.path}' at run time, "
                    "so it cannot be merged; pass a composite with canonizers that match this model"
                )
            x, _ = unit.pending.pop()
            return _Relevance.apply(session, unit, x, output)

        undo.append(module.register_forward_hook(linear_hook).remove)
        undo.append(unit.batch_norm.register_forward_hook(batch_norm_hook).remove)
        undo.append(unit.pending.clear)
    return undo


def check_all_merged(units: list[Unit]) -> None:
    """After the forward pass: every merged Linear/Conv must have been followed by its BatchNorm."""
    for unit in units:
        if unit.pending:
            raise CanonizationError(
                f"'{unit.path}' ran but its merged BatchNorm '{unit.batch_norm_path}' did not consume its output"
            )
