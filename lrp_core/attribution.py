"""The attribution call: ``attribute`` (the relevance map) and ``explain`` (map, logits and per-layer sums)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .canonizers import canonize
from .composites import Composite, EpsilonPlusFlat
from .engine import LayerRecord, Session, attach, build_units, check_all_merged
from .errors import LRPError
from .graph_check import check_graph
from .latent import check_pools

__all__ = ["attribute", "explain", "Explanation", "PRECISIONS"]

#: ``precision`` values: None keeps torch's global settings; "fp32" disables TF32; "tf32" enables it (CUDA);
#: "bf16" runs forward and relevance pass under bfloat16 autocast (divisions stay in float32)
PRECISIONS = (None, "fp32", "tf32", "bf16")


@dataclass
class Explanation:
    """Everything one attribution call produced."""

    #: input relevance, shaped like the input
    relevance: Tensor
    #: model output (logits); keeps its graph when ``create_graph=True``, so a loss can use both
    output: Tensor
    #: relevance the explanation started from at the output, per sample (``sum_c w_c * f_c(x)``)
    output_relevance: Tensor
    #: per layer call, top to bottom, when ``record_layers=True``
    layers: list[LayerRecord] | None = None
    #: layer path -> ``(B, C)`` relevance of each output channel pooled over positions (``latent=`` layers; ``(B,
    #: P, C)`` for a list of P ``latent_pool`` names): the concept relevance at that layer; summed (``"sum"``), it
    #: sums to what the layer passes on
    latent: dict[str, Tensor] | None = None

    def conservation_table(self) -> str:
        """A readable table of relevance entering and leaving each layer (mean over the batch)."""
        if self.layers is None:
            raise ValueError("call explain(..., record_layers=True) to record per-layer relevance")
        lines = [f"{'layer':<40} {'rule':<10} {'R out':>12} {'R in':>12} {'absorbed':>12}"]
        for rec in self.layers:
            out, inp = rec.relevance_out.mean().item(), rec.relevance_in.mean().item()
            lines.append(f"{rec.path:<40} {rec.rule:<10} {out:>12.5g} {inp:>12.5g} {out - inp:>12.5g}")
        total = self.relevance.detach().reshape(self.relevance.shape[0], -1).sum(1).double().mean().item()
        lines.append(f"{'input':<40} {'':<10} {'':>12} {total:>12.5g}")
        return "\n".join(lines)


def _output_weights(target, output: Tensor) -> Tensor:
    """``target`` as (B, C) weights on the output: class indices become one-hot rows."""
    batch, classes = output.shape
    if isinstance(target, int):
        target = torch.full((batch,), target, dtype=torch.long)
    target = torch.as_tensor(target, device=output.device)
    if not target.is_floating_point():
        if target.shape != (batch,):
            raise ValueError(
                f"target must hold one class index per sample, shape ({batch},); got {tuple(target.shape)}"
            )
        bad = ((target < 0) | (target >= classes)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"target class index out of range [0, {classes}) for samples {bad[:10]}: {target[bad[:10]].tolist()}"
            )
        return F.one_hot(target.long(), classes).to(output.dtype)
    if target.shape != (batch, classes):
        raise ValueError(f"target weights must have the output's shape {(batch, classes)}; got {tuple(target.shape)}")
    return target.to(output.dtype)


def _non_finite_samples(t: Tensor) -> list[int]:
    return (~torch.isfinite(t.detach().reshape(t.shape[0], -1))).any(1).nonzero().flatten().tolist()


@contextlib.contextmanager
def _precision(precision: str | None, device_type: str):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")
    if precision in (None, "bf16"):
        if precision == "bf16":
            with torch.autocast(device_type, dtype=torch.bfloat16):
                yield torch.bfloat16
        else:
            yield None
        return
    tf32 = precision == "tf32"
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield None
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _forward(model: nn.Module, x: Tensor) -> Tensor:
    try:
        return model(x)
    except RuntimeError as err:
        if "of _Relevance is a view and is being modified inplace" not in str(err):
            raise
        raise LRPError(
            "an in-place operation in forward() (e.g. torch.relu_, x += y, F.relu(..., inplace=True)) modifies the "
            "output of an explained layer; LRP needs that output intact: make the operation out-of-place"
        ) from err


def explain(
    model: nn.Module,
    x: Tensor,
    target,
    composite: Composite | None = None,
    create_graph: bool = False,
    *,
    record_layers: bool = False,
    latent: tuple[str, ...] | list[str] = (),
    latent_pool: str | tuple[str, ...] | list[str] = "sum",
    precision: str | None = None,
    check_operations: bool = True,
) -> Explanation:
    """Explain ``model`` at ``x`` for ``target`` with LRP.

    Args:
        model: any torch module built from supported layers (``UnsupportedLayerError`` lists the others).
        x: input batch ``(B, ...)``.
        target: class indices ``(B,)`` (or one int for all), or ``(B, C)`` weights on the outputs. The output
            relevance is ``weights * logits``, so the map sums to the explained logit up to what biases and
            stabilisers absorb.
        composite: rules per layer; default :class:`~lrp_core.composites.EpsilonPlusFlat`.
        create_graph: record the relevance computation so that a loss on it trains the model (exact gradients
            to ``x`` and every parameter).
        record_layers: record per-layer relevance sums (see :meth:`Explanation.conservation_table`).
        latent: paths of explained layers (``model.named_modules()`` names) whose per-channel relevance to keep in
            :attr:`Explanation.latent` (see :func:`lrp_core.latent.latent_layers` for a default choice).
        latent_pool: how ``latent`` channels are pooled over positions: ``"sum"`` (conserving) or ``"max"`` (the
            channel's peak; see :data:`lrp_core.latent.LATENT_POOLS`), giving ``(B, C)`` per layer; a list of them
            gives ``(B, P, C)``, the P pools in the order given, from the same backward pass.
        precision: ``None``, ``"fp32"``, ``"tf32"`` or ``"bf16"`` (see ``PRECISIONS``).
        check_operations: verify that tensor operations between layers route relevance correctly.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor; got {type(x).__name__} {getattr(x, 'dtype', '')}")
    bad = _non_finite_samples(x)
    if bad:
        raise ValueError(f"input contains NaN or inf in samples {bad[:10]}")
    composite = EpsilonPlusFlat() if composite is None else composite
    form = canonize(model, composite.canonizers)
    undo = []
    try:
        units = build_units(model, composite, form)
        check_latent(latent, [unit.path for unit in units])
        pools = check_pools(latent_pool)
        with _precision(precision, x.device.type) as autocast_dtype:
            session = Session(
                record_layers=record_layers, autocast_dtype=autocast_dtype, latent=tuple(latent), latent_pools=pools
            )
            undo = attach(session, units)
            leaf = x if (create_graph and x.requires_grad) else x.detach().requires_grad_(True)
            with torch.enable_grad():
                output = _forward(model, leaf)
                check_all_merged(units)
                if not isinstance(output, Tensor) or output.dim() != 2:
                    shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
                    raise LRPError(f"the model must return logits of shape (batch, classes); got {shape}")
                bad = _non_finite_samples(output)
                if bad:
                    raise LRPError(f"the model's output contains NaN or inf for samples {bad[:10]}")
                if check_operations:
                    check_graph(output, leaf)
                logits = output.float() if autocast_dtype is not None else output
                start = _output_weights(target, logits) * (logits if create_graph else logits.detach())
                session.lrp_active = True
                try:
                    (relevance,) = torch.autograd.grad(
                        output, leaf, grad_outputs=start.to(output.dtype), create_graph=create_graph, allow_unused=True
                    )
                finally:
                    session.lrp_active = False
                if relevance is None:
                    raise LRPError("the model's output does not depend on its input: there is nothing to explain")
    finally:
        for action in reversed(undo):
            action()
        form.undo()
    return Explanation(
        relevance=relevance.to(x.dtype),
        output=output if create_graph else output.detach(),
        output_relevance=start.detach().sum(1),
        layers=session.records,
        latent={
            path: session.latent[path][:, 0] if isinstance(latent_pool, str) else session.latent[path]
            for path in latent
            if path in session.latent
        }
        if latent
        else None,
    )


def explained_layers(model: nn.Module, composite: Composite | None = None) -> list[str]:
    """Paths of the layers LRP explains under ``composite`` (what ``explain(..., latent=...)`` may name): a
    BatchNorm merged into the layer before it, a pass-through or a container is not one. Read without running the
    model, so a pipeline can refuse a bad ``latent`` list before any work."""
    composite = EpsilonPlusFlat() if composite is None else composite
    form = canonize(model, composite.canonizers)
    try:
        return [unit.path for unit in build_units(model, composite, form)]
    finally:
        form.undo()


def check_latent(latent, explained: list[str]) -> None:
    """Refuse latent layer paths that are not among ``explained`` (:func:`explained_layers`), listing those."""
    if isinstance(latent, str):
        raise TypeError(f"latent must be a list of layer paths, not the string {latent!r}")
    known = set(explained)
    unknown = [path for path in latent if path not in known]
    if unknown:
        raise ValueError(f"latent layers {unknown} are not explained layers of the model; explained: {sorted(known)}")


def attribute(
    model: nn.Module,
    x: Tensor,
    target,
    composite: Composite | None = None,
    create_graph: bool = False,
    **options,
) -> Tensor:
    """LRP relevance of ``x`` for ``target``, shaped like ``x``. Options as for :func:`explain`."""
    return explain(model, x, target, composite=composite, create_graph=create_graph, **options).relevance
