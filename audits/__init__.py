"""audits: Spectral Relevance Analysis on plain arrays (numpy/scipy/scikit-learn; never torch).

Heatmaps from any source go in; clusters of explanation strategies, their eigengap analysis and Clever-Hans
scores come out.

``SpRAy`` is imported on first use (PEP 562): a stage that only pools maps (the attribute stage, through the
relevance store) then skips scikit-learn and scipy.stats, 2.8 s of every such command's start on two cores.
"""

from .pooling import normalize_maps, sum_pool, sum_pool_matrix

__all__ = ["SpRAy", "normalize_maps", "sum_pool", "sum_pool_matrix"]


def __getattr__(name: str):
    if name == "SpRAy":
        from .spray import SpRAy

        return SpRAy
    raise AttributeError(f"module 'audits' has no attribute {name!r}")
