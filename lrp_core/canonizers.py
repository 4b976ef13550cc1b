"""Canonizers: bring a model into the form LRP rules are defined for, without touching its parameters.

- :class:`MergeBatchNorm` pairs each BatchNorm with the Linear/Conv right before it; the pair is explained as one
  affine layer whose weight and bias are *computed* from the originals (zennit overwrites ``weight.data`` instead,
  which breaks optimizers and parameter gradients).
- :class:`ResNetCanonizer` routes the skip addition of torchvision's ``BasicBlock``/``Bottleneck`` through a
  :class:`~lrp_core.layers.Sum` module, so relevance is split in proportion to the two branches instead of copied.

Changes are temporary: :meth:`CanonicalForm.undo` restores every module as it was.
"""

from __future__ import annotations

import types
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable

from torch import nn

from .layers import Sum

__all__ = [
    "CanonicalForm",
    "Canonizer",
    "MergeBatchNorm",
    "ResNetCanonizer",
    "default_canonizers",
    "canonize",
]

LINEAR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCH_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class CanonicalForm:
    """What the canonizers decided for one model, and how to undo their temporary changes."""

    def __init__(self) -> None:
        #: path of each merged BatchNorm -> path of the Linear/Conv it is merged into
        self.merged_batch_norms: dict[str, str] = {}
        self._undo: list[Callable[[], None]] = []

    def on_undo(self, action: Callable[[], None]) -> None:
        self._undo.append(action)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


class Canonizer(ABC):
    """Finds a pattern in a model and records (or temporarily installs) its canonical form."""

    @abstractmethod
    def apply(self, model: nn.Module, form: CanonicalForm) -> None:
        """Record merges in ``form`` and register undo actions for any module change."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(path, m) for path, m in model.named_modules() if next(m.children(), None) is None]


class MergeBatchNorm(Canonizer):
    """Merges every BatchNorm that directly follows a Linear/Conv in module order (as zennit's
    ``SequentialMergeBatchNorm``). The engine checks at run time that the BatchNorm really consumes that layer's
    output, and raises :class:`~lrp_core.errors.CanonizationError` otherwise."""

    def apply(self, model, form):
        previous: tuple[str, nn.Module] | None = None
        for path, module in _leaves(model):
            if isinstance(module, BATCH_NORM_TYPES) and previous is not None:
                prev_path, prev_module = previous
                if isinstance(prev_module, LINEAR_TYPES) and prev_module.weight.shape[0] == module.num_features:
                    form.merged_batch_norms[path] = prev_path
            previous = (path, module)


def _basic_block_forward(self, x):
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.downsample is not None:
        identity = self.downsample(x)
    return self.relu(self.lrp_sum(identity, out))


def _bottleneck_forward(self, x):
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
        identity = self.downsample(x)
    return self.relu(self.lrp_sum(identity, out))


_RESNET_BLOCKS = {"BasicBlock": _basic_block_forward, "Bottleneck": _bottleneck_forward}


class ResNetCanonizer(Canonizer):
    """torchvision ResNet blocks: the in-place skip addition becomes a :class:`Sum` module (temporarily)."""

    def apply(self, model, form):
        for _, module in list(model.named_modules()):
            cls = type(module)
            forward = _RESNET_BLOCKS.get(cls.__name__)
            if forward is None or not cls.__module__.startswith("torchvision.models"):
                continue
            self._install(module, forward, form)

    @staticmethod
    def _install(module: nn.Module, forward, form: CanonicalForm) -> None:
        had_forward = "forward" in module.__dict__
        old_forward = module.__dict__.get("forward")
        module.add_module("lrp_sum", Sum())
        module.forward = types.MethodType(forward, module)

        def undo() -> None:
            del module._modules["lrp_sum"]
            if had_forward:
                module.forward = old_forward
            else:
                del module.forward

        form.on_undo(undo)


def default_canonizers() -> list[Canonizer]:
    """The canonizers applied when a composite names none: they only act where their pattern is found."""
    return [MergeBatchNorm(), ResNetCanonizer()]


def canonize(model: nn.Module, canonizers: Iterable[Canonizer]) -> CanonicalForm:
    """Apply ``canonizers`` to ``model``; on failure, nothing stays changed."""
    form = CanonicalForm()
    try:
        for canonizer in canonizers:
            canonizer.apply(model, form)
    except BaseException:
        form.undo()
        raise
    return form
