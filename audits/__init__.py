"""audits: Spectral Relevance Analysis on plain arrays (numpy/scipy/scikit-learn; never torch).

Heatmaps from any source go in; clusters of explanation strategies, their eigengap analysis and Clever-Hans
scores come out.
"""

from .pooling import normalize_maps, sum_pool, sum_pool_matrix
from .spray import SpRAy

__all__ = ["SpRAy", "normalize_maps", "sum_pool", "sum_pool_matrix"]
