"""From SpRAy clusters to *strategies*, and the evidence that a strategy is a Clever Hans, with a false-alarm rate.

A class's k clusters are not yet its strategies: k-means also cuts a continuum (objects anywhere in the image)
into pieces, and one cue can fall into several clusters (a watermark at different places along an edge). What
separates a strategy from a piece of a continuum is how it sits in the class's kNN graph, measured by the
conductance of the cut around it,

    phi(S) = cut(S, rest) / min(vol(S), vol(rest)),

the share of the smaller side's edge weight that crosses. A cut through a continuum crosses many edges; a group
of maps apart from the rest is crossed by few (phi = 0 for a separate graph component).

**The null comes from the audited model's own graphs.** Each cluster is cut in two by its own Fiedler vector
(the best cut spectral clustering can find inside it), and so is each half; phi of these cuts are samples of "a
cut through one strategy": every strategy, a cue's too, is a continuum inside. The log conductances of these cuts,
pooled over the classes of the audit, give a robust normal null (Theil-Sen in log n, MAD: a cut through a bigger
continuum crosses a smaller share of its edges, so the null is read at the size of the cut tested). A cut is
significant when its
lower-tail p-value is below ``false_alarm_rate / m`` (Bonferroni over the m clusters of the audit): an audit of a
model without shortcuts flags anything with probability at most ``false_alarm_rate`` under that null.

1. **Merge**: adjacent clusters whose split is not significant are merged, least separated first, so a class
   without distinct strategies ends as one strategy (nothing to flag), and one with a cue as cue + rest.
2. **Which side is the shortcut**: LRP conserves relevance, so a map's sum is the explained logit, and a shortcut
   adds evidence: the Clever-Hans side is the one the model is *more* sure of, by more than the parts of one
   strategy are surer than each other: one-sided Mann-Whitney of the members' explained logits, divided by that
   margin (:class:`GainNull`, learnt from the null's own Fiedler cuts), against the rest of the class's, at
   ``false_alarm_rate`` over the number of isolated strategies (see 4). Without the margin Mann-Whitney finds any
   difference at a few hundred maps: on digits drawn on two photographs, each class's two backgrounds are
   distinct modes whose confidence differs by 3-18%, p down to 1.5e-4, no shortcut; there the parts of one
   strategy differ by a factor 1.39-1.45, the photo cues by 1.63-1.96.
3. **Group**: confident-side strategies of one class that are each other's main neighbour in the graph (more of
   each one's boundary runs to the other than to the rest of the class) and have the same shape wherever they lie
   (the translation-invariant view of ``audits.features``) are one cue seen at different places (a watermark left
   and right), so they become one strategy.
4. **Flag** a strategy when its cut from the rest of the class is significant and it is the confident side; its
   ranking score is ``-log10 p``. The side test is Bonferroni-corrected over the *isolated* strategies (the
   candidates, :func:`flag_strategies`): a class can hold genuinely distinct modes that are no shortcut (digits
   on two kinds of photograph), which pass the isolation test by their structure, not by chance; then the side
   test alone guards the false-alarm rate, and with m candidates at ``false_alarm_rate`` each it would flag one
   of them by chance with probability up to m times that rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy import stats

from .graph import fiedler

__all__ = [
    "NullModel", "GainNull", "ClassGraph", "Strategy", "null_cuts", "find_strategies", "flag_strategies", "side_level",
    "FALSE_ALARM_RATE",
]  # fmt: skip

FALSE_ALARM_RATE = 0.05
MIN_SIDE = 5  # maps: no smaller piece of a cluster is cut for the null (nor one below the mean kNN degree)
MIN_SCALE = 0.1  # floor of the null's spread (log units): a handful of nearly equal cuts must not make it razor thin
MIN_GAIN_SCALE = 0.05  # floor of the gain null's spread (log units, 5%): the same, for the confidence of the sides
MAX_SCORE = 300.0  # -log10 p of a cut that crosses no edge at all
NULL_DEPTH = 2  # Fiedler cuts through each cluster and through each of its halves


@dataclass(frozen=True)
class NullModel:
    """Normal null of log conductance for cuts through one strategy, for a continuum of n maps:
    ``log phi ~ N(location + slope * log n, scale)``. A cut through a bigger continuum crosses a smaller share of
    its edges (boundary over volume), so the slope is learnt from the null's own cuts at two sizes (clusters and
    their halves) by Theil-Sen, robustly, and the spread from the residuals' MAD."""

    location: float
    scale: float
    n: int
    slope: float = 0.0

    @classmethod
    def fit(cls, cuts) -> NullModel:
        """``cuts``: ``(log n, log phi, ...)`` tuples (:func:`null_cuts`); the first two are read."""
        pairs = np.asarray([c[:2] for c in cuts if np.all(np.isfinite(c[:2]))], dtype=np.float64).reshape(-1, 2)
        if len(pairs) < 3:
            # too few cuts to learn from: a cut crossing 10% of the edges, at unit spread (wide, so conservative)
            return cls(float(np.log(0.1)), 1.0, len(pairs))
        size, phi = pairs[:, 0], pairs[:, 1]
        slope = float(np.clip(stats.theilslopes(phi, size).slope, -1.0, 0.0)) if np.ptp(size) > 0 else 0.0
        residual = phi - slope * size
        location = float(np.median(residual))
        scale = float(1.4826 * np.median(np.abs(residual - location)))
        return cls(location, max(scale, MIN_SCALE), len(pairs), slope)

    def expected(self, size: float) -> float:
        """The typical conductance of a cut through a continuum of ``size`` maps."""
        return float(np.exp(self.location + self.slope * np.log(max(size, 1.0))))

    def p_value(self, conductance: float, size: float) -> float:
        """P(a cut through one strategy of ``size`` maps crosses at most this share of edges)."""
        if conductance <= 0:
            return 0.0
        if not np.isfinite(conductance):
            return 1.0
        z = (np.log(conductance) - self.location - self.slope * np.log(max(size, 1.0))) / self.scale
        return float(stats.norm.cdf(z))


@dataclass(frozen=True)
class GainNull:
    """How much surer the model is of one side of a cut through one strategy than of the other: ``scale``, the
    spread of the null cuts' signed log gains (a Fiedler cut has no preferred side, so they centre on 0), as the
    normal's sigma from their mean absolute value (``sqrt(pi / 2) mean |g|``). The side test asks for a shortcut
    beyond it: members surer than the rest by more than ``exp(scale)``.

    Why the mean and not the median of ``|g|`` (the MAD): an audit has few cuts (36 for 6 classes of 2 clusters),
    and the MAD reads the middle of them only (37% efficiency at the normal, against 88%): on the digits-on-photos
    noise-patch audit its 90% bootstrap interval spanned a margin of 1.19-1.56 (the mean's 1.29-1.50), so moving 6
    of 405 maps between clusters (``audits.refinement``) moved the margin from 1.37 to 1.48 and the patch's side
    p-value from 5e-4 to 0.018. The margin needs no robustness against large gains: a cut between two modes the
    model is unequally sure of is what it should include (it can only widen the margin: fewer flags)."""

    scale: float
    n: int

    @classmethod
    def fit(cls, cuts) -> GainNull:
        """``cuts``: ``(log n, log phi, log gain)`` tuples (:func:`null_cuts`); the last is read."""
        gains = np.asarray([c[2] for c in cuts if len(c) > 2 and np.isfinite(c[2])], dtype=np.float64)
        if len(gains) < 3:
            return cls(1.0, len(gains))  # too few cuts: unit spread in log units (wide, so conservative)
        return cls(max(float(np.sqrt(np.pi / 2) * np.mean(np.abs(gains))), MIN_GAIN_SCALE), len(gains))

    @property
    def margin(self) -> float:
        """The factor a shortcut's side must be surer by: what one strategy's parts typically differ by."""
        return float(np.exp(self.scale))


@dataclass
class ClassGraph:
    """One class's kNN graph (on distinct maps), cluster labels of its nodes, node multiplicities and map sums."""

    affinity: sp.csr_matrix
    labels: np.ndarray  # (n_nodes,) cluster of each node
    counts: np.ndarray  # (n_nodes,) maps per node (near-duplicates share a node)
    relevance: np.ndarray  # (n_nodes,) median relevance sum of the node's maps (the explained logit)
    outside: dict[int, int] = field(default_factory=dict)  # clusters kept out of the graph (all-zero maps): sizes
    shape: np.ndarray | None = None  # (n_nodes, d) the maps' translation-invariant shape view (audits.features)

    def __post_init__(self):
        self.affinity = sp.csr_matrix(self.affinity)
        self._degree = np.asarray(self.affinity.sum(1)).ravel()

    def mask(self, clusters) -> np.ndarray:
        return np.isin(self.labels, list(clusters))

    def cut(self, a: np.ndarray, b: np.ndarray) -> float:
        return float(self.affinity[a][:, b].sum())

    def mean_shape(self, mask: np.ndarray) -> np.ndarray:
        return np.average(self.shape[mask], axis=0, weights=self.counts[mask])

    def conductance(self, a: np.ndarray, b: np.ndarray) -> float:
        """phi of the cut between node sets ``a`` and ``b`` inside their union."""
        volume = min(self.cut(a, a | b), self.cut(b, a | b))
        return self.cut(a, b) / volume if volume > 0 else np.nan


def _fiedler_cuts(
    affinity: sp.csr_matrix, counts: np.ndarray, nodes: np.ndarray, depth: int, min_side: int
) -> list[tuple[float, float, np.ndarray, np.ndarray]]:
    """(log n, log phi, one side's nodes, the other's) of the Fiedler cut of this graph (``nodes``: its nodes'
    indices in the class graph) and, down to ``depth`` levels, of each of its sides."""
    if counts.sum() < 2 * min_side or affinity.shape[0] < 3:
        return []
    vector = fiedler(affinity, vector=True)
    side = vector > np.median(vector)
    if min(counts[side].sum(), counts[~side].sum()) < min_side:
        return []
    phi = ClassGraph(affinity, side.astype(int), counts, np.zeros(len(counts))).conductance(side, ~side)
    out = [(float(np.log(counts.sum())), float(np.log(phi)), nodes[side], nodes[~side])] if phi > 0 else []
    if depth > 1:
        for half in (side, ~side):
            out += _fiedler_cuts(affinity[half][:, half], counts[half], nodes[half], depth - 1, min_side)
    return out


def null_cuts(graph: ClassGraph, depth: int = NULL_DEPTH) -> list[tuple[float, float, float]]:
    """(log n, log phi, log gain) of Fiedler cuts through each cluster and through their halves (``depth`` levels):
    cuts through one strategy, at two sizes, for both nulls (:class:`NullModel`, :class:`GainNull`). A cluster that
    still holds two groups gives one cut between them but two within them, so the null stays a null of cuts
    through continua. The gain is one side's median relevance sum over the other side's (nan when a median is not
    positive): within one cluster, so that a cue in the class does not widen the null (a side against the rest of
    the class would carry the cue's own gain into it)."""
    # a piece with fewer maps than a map has neighbours is mostly boundary: its cut says nothing about a continuum
    min_side = max(MIN_SIDE, int(round(graph.affinity.nnz / max(graph.affinity.shape[0], 1))))
    out = []
    for cluster in np.unique(graph.labels):
        nodes = np.flatnonzero(graph.labels == cluster)
        for size, phi, side, other in _fiedler_cuts(graph.affinity[nodes][:, nodes], graph.counts[nodes], nodes,
                                                    depth, min_side):  # fmt: skip
            one, two = (np.median(np.repeat(graph.relevance[n], graph.counts[n])) for n in (side, other))
            out.append((size, phi, float(np.log(one / two)) if one > 0 and two > 0 else np.nan))
    return out


@dataclass
class Strategy:
    """A group of a class's clusters, and its evidence against the rest of the class."""

    clusters: list[int]
    size: int  # maps
    conductance: float = np.nan  # of the cut from the rest of the class (nan: the whole class)
    p_value: float = 1.0
    relevance_gain: float = np.nan  # median relevance sum of members / of the rest
    direction_p: float = 1.0  # Mann-Whitney: members' relevance sums, over the gain null's margin, above the rest's
    direction_threshold: float = FALSE_ALARM_RATE  # the side test's level (flag_strategies corrects it)
    flagged: bool = False

    @property
    def score(self) -> float:
        """Ranking evidence: -log10 of the isolation p-value when the strategy is the confident side, else 0."""
        if self.direction_p >= self.direction_threshold:
            return 0.0
        return float(min(-np.log10(max(self.p_value, 10**-MAX_SCORE)), MAX_SCORE))


def _direction(graph: ClassGraph, members: np.ndarray, margin: float = 1.0) -> tuple[float, float]:
    """(median relevance sum of members / of the rest, one-sided Mann-Whitney p of members above the rest by more
    than the factor ``margin``: the members' positive sums are divided by it before the test, a monotone map, so
    the null is "surer by at most ``margin``")."""
    inside = np.repeat(graph.relevance[members], graph.counts[members])
    outside = np.repeat(graph.relevance[~members], graph.counts[~members])
    if len(inside) == 0 or len(outside) == 0:
        return np.nan, 1.0
    rest = np.median(outside)
    gain = float(np.median(inside) / rest) if rest > 0 else np.nan
    shifted = np.where(inside > 0, inside / margin, inside)
    return gain, float(stats.mannwhitneyu(shifted, outside, alternative="greater").pvalue)


def _evaluate(
    graph: ClassGraph, group: frozenset[int], null: NullModel, gains: GainNull | None, threshold: float, rate: float
) -> Strategy:
    members = graph.mask(group)
    strategy = Strategy(sorted(group), int(graph.counts[members].sum()))
    if members.all():
        return strategy
    strategy.conductance = graph.conductance(members, ~members)
    strategy.p_value = null.p_value(strategy.conductance, graph.counts.sum())
    strategy.relevance_gain, strategy.direction_p = _direction(graph, members, gains.margin if gains else 1.0)
    return strategy


def side_level(p_values, threshold: float, rate: float) -> float:
    """The side tests' level: ``rate`` over the number of isolated strategies (isolation p below ``threshold``)."""
    return rate / max(int(np.sum(np.asarray(p_values) < threshold)), 1)


def flag_strategies(strategies: list[Strategy], threshold: float, rate: float) -> None:
    """Flag, in place, the strategies whose cut is significant (p < ``threshold``) and that are the confident side,
    the side test at ``rate`` / the number of such isolated candidates (step 4 of the module docstring)."""
    level = side_level([s.p_value for s in strategies], threshold, rate)
    for s in strategies:
        s.direction_threshold = level
        s.flagged = s.p_value < threshold and s.direction_p < level


def _merge_continua(graph: ClassGraph, null: NullModel, threshold: float) -> list[frozenset[int]]:
    groups = [frozenset({int(c)}) for c in np.unique(graph.labels)]
    while len(groups) > 1:
        candidates = []
        for i in range(len(groups)):
            for j in range(i + 1, len(groups)):
                a, b = graph.mask(groups[i]), graph.mask(groups[j])
                phi = graph.conductance(a, b)
                if phi > 0:
                    candidates.append((null.p_value(phi, graph.counts[a | b].sum()), i, j))
        if not candidates:
            break
        p, i, j = max(candidates)
        if p < threshold:
            break
        groups = [g for k, g in enumerate(groups) if k not in (i, j)] + [groups[i] | groups[j]]
    return groups


def _same_cue(graph: ClassGraph, a: frozenset[int], b: frozenset[int]) -> bool:
    """One cue seen at different places: ``a`` and ``b`` are each other's main neighbour in the graph (more of
    each one's boundary runs to the other than to the rest of the class) and have the same shape regardless of
    place (their mean shape views are closer to each other than either is to the rest's)."""
    ma, mb = graph.mask(a), graph.mask(b)
    rest = ~(ma | mb)
    between = graph.cut(ma, mb)
    if between == 0 or between < graph.cut(ma, rest) or between < graph.cut(mb, rest):
        return False
    if graph.shape is None or not rest.any():
        return graph.shape is None
    sa, sb, sr = graph.mean_shape(ma), graph.mean_shape(mb), graph.mean_shape(rest)
    return np.linalg.norm(sa - sb) < min(np.linalg.norm(sa - sr), np.linalg.norm(sb - sr))


def _group_cues(graph: ClassGraph, groups: list[frozenset[int]], rate: float) -> list[frozenset[int]]:
    """Merge confident-side strategies that are one cue at several places (:func:`_same_cue`), until none are."""

    def confident(group):
        return _direction(graph, graph.mask(group))[1] < rate

    merged = True
    while merged and len(groups) > 2:
        merged = False
        for i, a in enumerate(groups):
            for b in groups[i + 1 :]:
                if confident(a) and confident(b) and _same_cue(graph, a, b):
                    groups = [g for g in groups if g not in (a, b)] + [a | b]
                    merged = True
                    break
            if merged:
                break
    return groups


def find_strategies(
    graph: ClassGraph, null: NullModel, threshold: float, false_alarm_rate: float, gains: GainNull | None = None
) -> list[Strategy]:
    """The class's strategies with their evidence (steps 1-4 of the module docstring), in cluster order.
    ``gains``: the margin of the sides' confidence (:class:`GainNull`); None: no margin."""
    groups = _group_cues(graph, _merge_continua(graph, null, threshold), false_alarm_rate)
    strategies = [_evaluate(graph, g, null, gains, threshold, false_alarm_rate) for g in groups]
    strategies += [Strategy([cluster], size) for cluster, size in graph.outside.items()]  # no evidence: never flagged
    flag_strategies(strategies, threshold, false_alarm_rate)
    return sorted(strategies, key=lambda s: s.clusters[0])
