"""K-means and kernel machines rewritten as small neural networks ("neuralization"), explained by the usual call.

Each model becomes a distance or contrast layer followed by min/max pooling, with the same outputs as the original
(up to an exact, monotone reparametrisation for the SVMs); ``lrp_core.attribute`` then explains it with the rules
of :mod:`lrp_core.rules` (``Midpoint``, ``DistanceShare``, ``PoolShare``,
``ExpectedContrast``), which every composite maps:

- :class:`NeuralizedKMeans` (NEON, Kauffmann et al. 2022): the logit of cluster ``c`` is
  ``f_c(x) = min_{k != c} ||x - mu_k||^2 - ||x - mu_c||^2``, positive exactly for the points k-means assigns to
  ``c``. Each difference is linear in ``x``; relevance of ``f_c`` goes to the competitors by a soft-min with
  stiffness ``beta``, then to the inputs by the midpoint rule. The input relevance sums to ``f_c``.
- :class:`NeuralizedOneClassSVM` (OC-DTD, Kauffmann et al. 2020): the outlier score
  ``o(x) = -log(sum_j a_j exp(-gamma ||x - u_j||^2)) / gamma`` (``a`` the dual coefficients scaled to sum to one)
  is a soft-min over support-vector distances. ``decision_function(x) = sum(alpha) exp(-gamma o(x)) - rho``, so
  ``o(x) > threshold`` exactly for the points the SVM calls outliers. Relevance sums to ``o(x)``.
- :class:`NeuralizedSVC` (binary, RBF): ``g(x) = log((S+(x) + b+) / (S-(x) + b-)) / gamma``, ``S+``/``S-`` the
  kernel sums over the support vectors of either sign and ``b+``/``b-`` the intercept's positive/negative part.
  ``sign(g) = sign(decision_function)`` exactly. ``g`` is a soft-min over negative support vectors of a soft-max
  over positive ones of the linear units ``||x - v||^2 - ||x - u||^2`` (as the neuralized SVM of Bley et al.
  2025). Relevance per feature is the contrast of posterior-expected squared distances; it sums to ``g(x)``.

No scikit-learn import: :func:`neuralize` reads the fitted attributes (``cluster_centers_``, ``support_vectors_``,
``dual_coef_``, ``intercept_``, ``_gamma``) of an estimator, and every class also takes plain arrays.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import Tensor, nn

__all__ = [
    "Distance",
    "DistanceContrast",
    "KernelContrast",
    "Pool",
    "NeuralizedKMeans",
    "NeuralizedSVC",
    "NeuralizedOneClassSVM",
    "neuralize",
    "squared_distances",
    "NEURALIZED_LAYERS",
]


def _tensor(values, dtype=torch.float64) -> Tensor:
    if hasattr(values, "toarray"):  # a scipy sparse matrix
        values = values.toarray()
    if isinstance(values, Tensor):
        return values.detach().to(dtype)
    return torch.as_tensor(values, dtype=dtype)  # lists and numpy arrays straight to float64, never via float32


def squared_distances(x: Tensor, centers: Tensor) -> Tensor:
    """``||x_b - c_k||^2`` for a batch ``(B, D)`` and centres ``(K, D)``: ``(B, K)``, one matmul."""
    sq = (x * x).sum(-1, keepdim=True) - 2 * x @ centers.T + (centers * centers).sum(-1)
    return sq.clamp(min=0)


def _check_input(x: Tensor, reference: Tensor, name: str) -> None:
    features = reference.shape[1]
    if x.dim() != 2 or x.shape[1] != features:
        raise ValueError(f"{name} expects inputs of shape (batch, {features}); got {tuple(x.shape)}")
    if x.dtype != reference.dtype:
        kind = str(reference.dtype).removeprefix("torch.")
        raise ValueError(
            f"{name} holds {kind} centres but the input is {x.dtype}: use x.to(torch.{kind}) or convert the model"
        )


class Distance(nn.Module):
    """``h_k = ||x - centers_k||^2 + offset_k``: one unit per centre."""

    def __init__(self, centers, offset=None):
        super().__init__()
        centers = _tensor(centers)
        self.register_buffer("centers", centers)
        offset = torch.zeros(len(centers), dtype=centers.dtype) if offset is None else _tensor(offset)
        self.register_buffer("offset", offset)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.centers, type(self).__name__)
        return squared_distances(x, self.centers) + self.offset


class DistanceContrast(nn.Module):
    """``h[b, p, q] = ||x - rival_q||^2 - ||x - own_p||^2``: linear in ``x`` (the squares cancel), with weight
    ``2 (own_p - rival_q)`` and zero at the midpoint of the two centres.

    Pairs where ``pair_mask`` is False are excluded: their output is ``+inf``, so min-pooling ignores them
    (k-means: a cluster is not its own competitor).
    """

    def __init__(self, own, rival, pair_mask=None):
        super().__init__()
        own, rival = _tensor(own), _tensor(rival)
        if own.shape[1] != rival.shape[1]:
            raise ValueError(f"own and rival centres differ in dimension: {own.shape[1]} and {rival.shape[1]}")
        self.register_buffer("own", own)
        self.register_buffer("rival", rival)
        mask = None if pair_mask is None else torch.as_tensor(pair_mask, dtype=torch.bool)
        self.register_buffer("pair_mask", mask)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.own, type(self).__name__)
        h = squared_distances(x, self.rival)[:, None, :] - squared_distances(x, self.own)[:, :, None]
        if self.pair_mask is not None:
            h = h.masked_fill(~self.pair_mask, math.inf)
        return h


class KernelContrast(nn.Module):
    """``g(x) = o_neg(x) - o_pos(x)``, ``o = smin_gamma(||x - u_j||^2 - log(a_j) / gamma)`` over the support
    vectors of one sign: the log-ratio ``log(S+ / S-) / gamma`` of the two kernel sums. An intercept ``b`` joins
    the side of its sign as a pseudo support vector with kernel value 1 (no distance term).

    In network terms: pair units ``||x - v_q||^2 - ||x - u_p||^2`` (one per positive/negative pair), a weighted
    soft-max over ``p`` and a weighted soft-min over ``q``; one module, because its rule
    (:class:`~lrp_core.rules.ExpectedContrast`) needs only the two posteriors, never the pair grid.
    """

    def __init__(self, positive, positive_coef, negative, negative_coef, intercept: float, gamma: float):
        super().__init__()
        positive, negative = _tensor(positive), _tensor(negative)
        pos_coef, neg_coef = _tensor(positive_coef).reshape(-1), _tensor(negative_coef).reshape(-1)
        if (pos_coef <= 0).any() or (neg_coef <= 0).any():
            raise ValueError("kernel weights must be positive (pass |dual_coef| of each side)")
        if not gamma > 0:
            raise ValueError(f"gamma must be positive; got {gamma}")
        self.gamma, self.intercept = float(gamma), float(intercept)
        self.register_buffer("positive", positive)
        self.register_buffer("negative", negative)
        bias = [-math.log(abs(self.intercept)) / self.gamma] if self.intercept else []
        pos_extra = bias if self.intercept > 0 else []
        neg_extra = bias if self.intercept < 0 else []
        # log-weights of each side's soft-min; a trailing pseudo entry holds the intercept
        self.register_buffer("positive_offset", torch.cat([-torch.log(pos_coef) / self.gamma, _tensor(pos_extra)]))
        self.register_buffer("negative_offset", torch.cat([-torch.log(neg_coef) / self.gamma, _tensor(neg_extra)]))

    def units(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The soft-min arguments of either side, ``(B, P[+1])`` and ``(B, Q[+1])``."""

        def side(vectors, offset):
            d = squared_distances(x, vectors)
            pseudo = offset.shape[0] - vectors.shape[0]
            if pseudo:
                d = torch.cat([d, d.new_zeros(d.shape[0], pseudo)], dim=1)
            return d + offset

        return side(self.positive, self.positive_offset), side(self.negative, self.negative_offset)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.positive, type(self).__name__)
        pos, neg = self.units(x)
        t = self.gamma
        return (torch.logsumexp(-t * pos, dim=1, keepdim=True) - torch.logsumexp(-t * neg, dim=1, keepdim=True)) / t


class Pool(nn.Module):
    """Min or max over ``dim``: hard (``temperature=inf``) or soft, ``smin_t(z) = -log(sum exp(-t z)) / t``.

    ``explain_temperature`` is the stiffness of the soft-min/max that shares relevance among the pooled units
    (NEON's ``beta``); ``None`` uses ``temperature``.
    """

    def __init__(self, dim: int, mode: str, temperature: float = math.inf, explain_temperature: float | None = None,
                 keepdim: bool = False):  # fmt: skip
        super().__init__()
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max'; got {mode!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive; got {temperature}")
        self.dim, self.mode, self.keepdim = dim, mode, keepdim
        self.temperature = float(temperature)
        self.explain_temperature = None if explain_temperature is None else float(explain_temperature)

    def forward(self, z: Tensor) -> Tensor:
        sign = -1.0 if self.mode == "min" else 1.0
        if math.isinf(self.temperature):
            return z.amin(self.dim, keepdim=self.keepdim) if sign < 0 else z.amax(self.dim, keepdim=self.keepdim)
        t = self.temperature
        return sign * torch.logsumexp(sign * t * z, dim=self.dim, keepdim=self.keepdim) / t

    def extra_repr(self) -> str:
        return f"dim={self.dim}, mode={self.mode!r}, temperature={self.temperature}"


#: the layer types of neuralized models (each has a rule in every composite)
NEURALIZED_LAYERS = (Distance, DistanceContrast, KernelContrast, Pool)


class NeuralizedKMeans(nn.Sequential):
    """k-means as ``contrast -> min-pool``: output ``(B, K)`` cluster logits ``f_c`` (argmax = assigned cluster).

    ``beta`` (NEON's stiffness of the soft-min over competitors in the relevance pass); default: the inverse mean
    over clusters of the squared distance to the nearest other centroid, the scale of the logits at the centroids.
    """

    def __init__(self, centers, beta: float | None = None):
        centers = _tensor(centers)
        k = len(centers)
        if k < 2:
            raise ValueError("k-means with a single cluster has no decision to explain")
        if beta is None:
            gaps = squared_distances(centers, centers) + torch.diag(torch.full((k,), math.inf, dtype=centers.dtype))
            beta = 1.0 / gaps.amin(1).mean().item()
        super().__init__(
            OrderedDict(
                contrast=DistanceContrast(centers, centers, pair_mask=~torch.eye(k, dtype=torch.bool)),
                pool=Pool(dim=2, mode="min", explain_temperature=beta),
            )
        )

    @classmethod
    def from_sklearn(cls, estimator, beta: float | None = None) -> NeuralizedKMeans:
        return cls(_fitted(estimator, "cluster_centers_"), beta=beta)


class NeuralizedOneClassSVM(nn.Sequential):
    """A one-class SVM with RBF kernel as ``distance -> soft-min``: output ``(B, 1)``, the outlier score ``o(x)``.

    ``threshold`` is the score where the SVM's decision function is zero (``o > threshold``: outlier).
    """

    def __init__(self, support_vectors, dual_coef, gamma: float, rho: float):
        coef = _tensor(dual_coef).reshape(-1)
        if (coef <= 0).any():
            raise ValueError("one-class SVM dual coefficients must be positive")
        super().__init__(
            OrderedDict(
                distance=Distance(support_vectors, -torch.log(coef / coef.sum()) / gamma),
                pool=Pool(dim=1, mode="min", temperature=gamma, keepdim=True),
            )
        )
        self.total, self.gamma, self.rho = float(coef.sum()), float(gamma), float(rho)
        self.threshold = -math.log(self.rho / self.total) / self.gamma if self.rho > 0 else math.inf

    def decision_function(self, score: Tensor) -> Tensor:
        """The SVM's ``decision_function`` from the outlier score: ``sum(alpha) exp(-gamma o) - rho``."""
        return self.total * torch.exp(-self.gamma * score) - self.rho

    @classmethod
    def from_sklearn(cls, estimator) -> NeuralizedOneClassSVM:
        _check_rbf(estimator)
        rho = -float(_fitted(estimator, "intercept_").reshape(-1)[0])
        return cls(_fitted(estimator, "support_vectors_"), estimator.dual_coef_, estimator._gamma, rho)


class NeuralizedSVC(nn.Sequential):
    """A binary SVC with RBF kernel as one :class:`KernelContrast` layer: output ``(B, 1)``, the log-ratio ``g(x)``,
    positive for the second class (as scikit-learn's ``decision_function``).

    ``dual_coef`` holds ``y_i alpha_i`` per support vector (positive: votes for the positive class).
    """

    def __init__(self, support_vectors, dual_coef, intercept: float, gamma: float):
        vectors = _tensor(support_vectors)
        coef = _tensor(dual_coef).reshape(-1)
        pos, neg = coef > 0, coef < 0
        if not pos.any() or not neg.any():
            raise ValueError("an SVC needs support vectors with positive and negative dual coefficients")
        kernel = KernelContrast(vectors[pos], coef[pos], vectors[neg], -coef[neg], intercept, gamma)
        super().__init__(OrderedDict(kernel=kernel))
        self.gamma, self.intercept = kernel.gamma, kernel.intercept

    @classmethod
    def from_sklearn(cls, estimator) -> NeuralizedSVC:
        _check_rbf(estimator)
        classes = _fitted(estimator, "classes_")
        if len(classes) != 2:
            raise ValueError(
                f"NeuralizedSVC explains binary SVCs; this one has {len(classes)} classes (one-vs-one). Fit one "
                "binary SVC per class (one-vs-rest) and explain each"
            )
        intercept = float(_fitted(estimator, "intercept_").reshape(-1)[0])
        return cls(estimator.support_vectors_, estimator.dual_coef_, intercept, estimator._gamma)


def _fitted(estimator, attribute: str):
    if not hasattr(estimator, attribute):
        raise ValueError(f"{type(estimator).__name__} has no {attribute}: fit it first")
    value = getattr(estimator, attribute)
    return value.toarray() if hasattr(value, "toarray") else value


def _check_rbf(estimator) -> None:
    kernel = getattr(estimator, "kernel", None)
    if kernel != "rbf":
        raise ValueError(f"only the RBF kernel can be neuralized; {type(estimator).__name__} has kernel={kernel!r}")
    _fitted(estimator, "support_vectors_")


def neuralize(estimator, **options) -> nn.Module:
    """The neural network equivalent of a fitted scikit-learn ``KMeans``/``MiniBatchKMeans``, ``SVC`` (binary, RBF)
    or ``OneClassSVM`` (RBF), in float64; explain it with ``lrp_core.attribute``."""
    name = type(estimator).__name__
    if name in ("KMeans", "MiniBatchKMeans", "BisectingKMeans"):
        return NeuralizedKMeans.from_sklearn(estimator, **options)
    if name == "SVC":
        return NeuralizedSVC.from_sklearn(estimator, **options)
    if name == "OneClassSVM":
        return NeuralizedOneClassSVM.from_sklearn(estimator, **options)
    raise TypeError(f"cannot neuralize a {name}; supported: KMeans, MiniBatchKMeans, SVC (RBF), OneClassSVM (RBF)")
