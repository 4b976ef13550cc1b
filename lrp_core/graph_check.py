"""Find operations in ``forward`` that LRP would silently get wrong.

Between explained layers relevance flows by autograd. That is right for reshapes, indexing, concatenation, max
pooling and ReLU masks, whose gradient routes relevance without changing its total, and wrong for additions,
products or scalings written as plain tensor code (zennit then quietly uses the gradient). This walk over the
recorded graph, from the output back to the input, raises :class:`~lrp_core.errors.UnsupportedLayerError` naming
the first such operation and the layer it feeds, after the forward pass and before any relevance is computed.
"""

from __future__ import annotations

import re

from torch import Tensor

from .errors import UnsupportedLayerError

__all__ = ["check_graph"]

# autograd node names (digits stripped) whose vector-Jacobian product conserves and routes relevance
_ROUTING_NODES = {
    "AliasBackward",
    "AsStridedBackward",
    "CatBackward",
    "CloneBackward",
    "ExpandBackward",
    "FlattenBackward",
    "IndexBackward",
    "IndexSelectBackward",
    "NarrowBackward",
    "PermuteBackward",
    "ReluBackward",
    "ReshapeAliasBackward",
    "SelectBackward",
    "SliceBackward",
    "SplitBackward",
    "SplitWithSizesBackward",
    "SqueezeBackward",
    "StackBackward",
    "TBackward",
    "ThresholdBackward",
    "ToCopyBackward",
    "TransposeBackward",
    "UnbindBackward",
    "UnsafeSplitBackward",
    "UnsafeViewBackward",
    "UnsqueezeBackward",
    "ViewBackward",
    "MaxPool1DWithIndicesBackward",
    "MaxPool2DWithIndicesBackward",
    "MaxPool3DWithIndicesBackward",
    "MaxPool2DBackward",
    "AdaptiveMaxPool1DBackward",
    "AdaptiveMaxPool2DBackward",
    "AdaptiveMaxPool3DBackward",
    "NativeDropoutBackward",
    "FeatureDropoutBackward",
}
_UNIT_NODE = "_RelevanceBackward"
_RECURRENT_NODE = "_RecurrentRelevanceBackward"


def _kind(node) -> str:
    return re.sub(r"\d+$", "", node.name().rsplit("::", 1)[-1])


def check_graph(output: Tensor, model_input: Tensor) -> None:
    """Walk from ``output`` to ``model_input``; every node between explained layers must route relevance."""
    stop = model_input.grad_fn
    seen: set[int] = set()
    # (node, path of the explained layer whose input it computes; "" for the model output)
    stack: list[tuple[object, str]] = [(output.grad_fn, "<model output>")]
    while stack:
        node, consumer = stack.pop()
        if node is None or id(node) in seen or node is stop:
            continue
        seen.add(id(node))
        kind = _kind(node)
        if kind == "AccumulateGrad":
            continue  # a leaf: the model input, or a learned tensor mixed into the data stream
        if kind == _UNIT_NODE:
            consumer = node.unit.path
            # follow the layer's inputs only: the last edge is the layer's output, whose history is the layer's
            # own internals
            edges = node.next_functions[:-1]
        elif kind == _RECURRENT_NODE:
            consumer = node.unit.path
            edges = node.next_functions[:1]  # the sequence input; the outputs' histories are the layer's internals
        elif kind in _ROUTING_NODES:
            edges = node.next_functions
        else:
            why = (
                "this tensor operation in forward() feeds the layer; its gradient does not conserve relevance. "
                "Compute it with a module that has a rule (e.g. lrp_core.layers.Sum for additions)"
            )
            raise UnsupportedLayerError([(consumer, kind, why)])
        stack.extend((next_node, consumer) for next_node, _ in edges)
