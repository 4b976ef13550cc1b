"""lrp_core: exact, fast and differentiable Layer-wise Relevance Propagation for PyTorch.

CNNs and dense networks, LSTM/GRU layers (``rules.SignalTakeAll``), and k-means, SVC and one-class SVM through
their neuralized form (``lrp_core.neuralize(estimator)``), all with one call: ``attribute(model, x, target)``.

>>> import torch, lrp_core
>>> from lrp_core import composites
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
>>> x = torch.randn(5, 4)
>>> R = lrp_core.attribute(model, x, torch.zeros(5, dtype=torch.long), composite=composites.EpsilonPlus())
>>> R.shape
torch.Size([5, 4])
"""

from . import canonizers, composites, layers, neuralized, rules
from .attribution import PRECISIONS, Explanation, attribute, explain, explained_layers
from .errors import CanonizationError, LRPError, UnsupportedLayerError
from .neuralized import neuralize

__all__ = [
    "attribute",
    "explain",
    "explained_layers",
    "Explanation",
    "PRECISIONS",
    "composites",
    "rules",
    "canonizers",
    "layers",
    "neuralized",
    "neuralize",
    "LRPError",
    "UnsupportedLayerError",
    "CanonizationError",
]
__version__ = "0.1.0"
