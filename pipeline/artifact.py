"""From flagged SpRAy strategies to artifact models, with no human labels.

Per flagged strategy (a group of one class's clusters; ``audits.strategies``):

- samples: the strategy's members (the union of its clusters);
- region: where the members' relevance moved: their mean |R| share map minus the rest of the class's (each map
  L1-normalised, positive part), Gaussian-smoothed and thresholded at a share of its maximum;
- per-member masks: with fixed content (below), that content, the same for every member: it is the cue, found in
  the images, and a member's own relevance around it only adds a halo on the object (frame: precision 0.37 with
  it, 1.00 without); without fixed content the cue may move, and a region from the members' mean holds
  only the places it visits often (noise patch: 45% of each patch covered, 81% of the mask on the object), so each
  member's mask is where the *concept* is: LRP of the feature map's projection on the strategy's CAV
  (:class:`ConceptReadout`, the CRP view of a CAV that Reveal to Revise localises artifacts with), positive part at
  or above the same share of its maximum (noise patch: 99% covered; stamp, watermark: 99%, 90%);
- fixed content: pixels where the members' *images* agree with each other far more than the rest of the class's
  do, next to the region: the part of a cue that sits at one place with one look (a frame), every member's whole
  mask, since relevance need not reach all of it (a frame's bottom edge got almost none, and un-learning
  three sides of it left the fourth: attacked gap 10 points, 1 with the whole frame);
- concept direction: a pattern CAV in the last feature map (the input of the global pooling), from spatially
  max-pooled activations: cov(a, t) / var(t) with t = 1 for members and 0 for the rest of the class, which for a
  binary t is the difference of the two class-conditional means (Haufe et al.'s "signal" estimate), unit length.

Every flagged strategy is un-learned at once (``pipeline.unlearn``). Ground truth of the built-in benchmark is never
read here; it only scores the result (``unlearn_stage.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import ndimage, stats
from torch import nn

__all__ = [
    "ArtifactModel",
    "ArtifactError",
    "NothingFlagged",
    "Selection",
    "select_strategies",
    "build_region",
    "mean_share_map",
    "feature_layer",
    "pattern_cav",
    "paste_artifact",
    "fixed_content",
    "ConceptReadout",
    "concept_masks",
]

REGION_DILATION = 3  # px: how far a member's own mask, and fixed content, may reach beyond the region
FIXED_CONTENT_ALPHA = 0.05  # per class, Bonferroni over the pixels: the chance that a pixel is called fixed by luck


class ArtifactError(ValueError):
    """No usable artifact: an empty cluster, a region that covers nothing or everything, no concept direction."""


class NothingFlagged(ArtifactError):
    """The audit flagged no strategy and params name none: there is nothing to un-learn (not a failure)."""


def strategy_name(class_name: str, clusters) -> str:
    """``<class>/<cluster>+<cluster>``: how params (``unlearn.cluster``) and messages name a strategy."""
    return f"{class_name}/{'+'.join(map(str, clusters))}"


@dataclass
class Selection:
    """One strategy to un-learn: a class, some of its clusters and their members."""

    class_index: int
    class_name: str
    clusters: list[int]
    member_ids: list[str]

    @property
    def name(self) -> str:
        return strategy_name(self.class_name, self.clusters)


@dataclass
class ArtifactModel:
    class_index: int
    class_name: str
    clusters: list[int]
    member_ids: list[str]
    region: np.ndarray  # (H, W) bool
    region_map: np.ndarray  # (H, W) float, the smoothed mean |R| share map
    member_masks: np.ndarray  # (M, H, W) bool, aligned with member_ids
    cav: np.ndarray | None = None  # (C,) unit vector in the feature layer
    cav_reference: float | None = None  # mean projection of non-members on the CAV
    held_out: list[str] = field(default_factory=list)  # members kept out of fine-tuning (R_bias is measured there)
    fixed_pixels: int = 0  # pixels of fixed content (``fixed_content``): in the region; each member's whole mask
    rest_share: np.ndarray | None = None  # (H, W) the rest of the class's mean |R| share map (``mean_share_map``)

    @property
    def name(self) -> str:
        return strategy_name(self.class_name, self.clusters)

    @property
    def mask_source(self) -> str:
        """Where the member masks came from: the fixed content itself, or the concept (the cue may move)."""
        return "fixed" if self.fixed_pixels else "concept"

    def summary(self) -> dict:
        return {
            "class_name": self.class_name,
            "class_index": self.class_index,
            "clusters": list(self.clusters),
            "cluster": self.clusters[0],
            "n_members": len(self.member_ids),
            "n_held_out": len(self.held_out),
            "region_pixels": int(self.region.sum()),
            "region_share": float(self.region.mean()),
            "fixed_pixels": self.fixed_pixels,
            "mask_source": self.mask_source,
            "exemplar_ids": self.member_ids[:: max(1, len(self.member_ids) // 6)][:6],
        }


def _members(spray_dir: Path, class_name: str, class_index: int, clusters: list[int]) -> list[str]:
    from .spray_stage import members_stem  # here, so the fine-tuning code needs no zarr/umap (e.g. on a GPU box)

    members = []
    for cluster in clusters:
        stem = members_stem(Path(spray_dir), class_name, class_index, cluster)
        if not stem.with_suffix(".json").is_file():
            raise ArtifactError(f"the members of {class_name}/{cluster} are missing: {stem}.json")
        members += json.loads(stem.with_suffix(".json").read_text())["sample_ids"]
    if not members:
        raise ArtifactError(f"cluster {strategy_name(class_name, clusters)} has no members ({stem}.json)")
    return members


def select_strategies(spray_dir: Path, choice: str | list[str] | None = None) -> list[Selection]:
    """Every flagged strategy of the audit (strongest first), or the clusters that ``choice`` names
    (``"<class name>/<cluster>"``, or a list of them; clusters of one class are un-learned as one strategy)."""
    clusters = pd.read_parquet(Path(spray_dir) / "clusters.parquet")
    if choice:
        chosen: dict[str, list[int]] = {}
        for entry in [choice] if isinstance(choice, str) else list(choice):
            name, _, number = str(entry).rpartition("/")
            if not name or not number.isdigit():
                raise ArtifactError(f"unlearn.cluster entries must look like '<class name>/<cluster>'; got {entry!r}")
            if clusters[(clusters.class_name == name) & (clusters.cluster == int(number))].empty:
                raise ArtifactError(f"unlearn.cluster {entry!r} is not a cluster of {spray_dir}")
            chosen.setdefault(name, []).append(int(number))
        picked = [(name, sorted(set(c))) for name, c in chosen.items()]
    else:
        flagged = clusters[clusters.flagged].sort_values(["ch_rank", "cluster"])
        if flagged.empty:
            top = clusters.sort_values("ch_rank").iloc[0]
            raise NothingFlagged(
                f"no strategy of {spray_dir} is flagged (top: {top.class_name}/{int(top.cluster)}, p = "
                f"{float(top.get('p_value', np.nan)):.2g}); name clusters in params (unlearn.cluster: "
                "'<class>/<cluster>') to un-learn them anyway"
            )
        strategies = flagged.groupby(["class_name", "strategy"], sort=False)
        picked = [(name, sorted(group.cluster.astype(int).tolist())) for (name, _), group in strategies]
    out = []
    for name, chosen_clusters in picked:
        index = int(clusters[clusters.class_name == name].class_index.iloc[0])
        out.append(Selection(index, name, chosen_clusters, _members(spray_dir, name, index, chosen_clusters)))
    return out


def _share_maps(maps: np.ndarray) -> np.ndarray:
    a = np.abs(maps.astype(np.float64))
    total = a.sum((1, 2), keepdims=True)
    return a / np.where(total > 0, total, 1)


def mean_share_map(maps: np.ndarray) -> np.ndarray:
    """(H, W): the mean over ``maps`` of each map's |R| as shares of its total. For the rest of a class, the share
    of relevance a map *without* the cue puts on each pixel: what un-learning may leave inside a mask."""
    return _share_maps(maps).mean(0) if len(maps) else np.zeros(maps.shape[1:])


def build_region(
    member_maps: np.ndarray,
    sigma: float = 1.5,
    threshold: float = 0.2,
    dilation: int = REGION_DILATION,
    rest_maps: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(region, smoothed region map, per-member masks) from the members' full-resolution relevance maps.

    With ``rest_maps`` (the rest of the class) the region map is where relevance *moved*: the members' mean |R|
    share minus the rest's, positive part. A thin cue (a frame) then stands out from the object relevance every map
    has; the members' own mean alone would mark much of the image around it.
    """
    if len(member_maps) == 0:
        raise ArtifactError("the artifact cluster has no relevance maps")
    shares = _share_maps(member_maps)
    mean = shares.mean(0)
    if rest_maps is not None and len(rest_maps):
        mean = np.clip(mean - mean_share_map(rest_maps), 0, None)
    mean = ndimage.gaussian_filter(mean, sigma)
    if not np.isfinite(mean).all() or mean.max() <= 0:
        raise ArtifactError("the members' relevance is all zero: there is no region to un-learn")
    region = mean >= threshold * mean.max()
    if not region.any():
        raise ArtifactError(f"the artifact region covers nothing (threshold {threshold} of the maximum)")
    if region.all():
        raise ArtifactError(f"the artifact region covers the whole image (threshold {threshold}): nothing singles out")
    around = ndimage.binary_dilation(region, iterations=dilation)
    smooth = ndimage.gaussian_filter(shares, (0, sigma, sigma))
    masks = (smooth >= threshold * smooth.max((1, 2), keepdims=True)) & around
    masks[~masks.any((1, 2))] = region  # a member whose own map misses the region falls back to it
    return region, mean, masks


def fixed_content(
    member_images: np.ndarray, rest_images: np.ndarray, near: np.ndarray, alpha: float = FIXED_CONTENT_ALPHA
) -> np.ndarray:
    """(H, W) bool: pixels whose content the members share and the rest of the class does not, touching ``near``.

    Per pixel, the members' variance (over images, channel-averaged) against the rest's is tested in the lower
    tail of F(n_members - 1, n_rest - 1) at ``alpha`` / pixels (Bonferroni; channels counted once, which is
    conservative). A pixel constant in the whole class is not fixed *content* (both variances are floored at
    1e-4, a standard deviation of 1% of the range). Only connected components that touch ``near`` (the dilated
    relevance region) are kept: a cue is where the relevance is, at least in part.
    """
    if len(member_images) < 3 or len(rest_images) < 3:
        return np.zeros(near.shape, dtype=bool)
    scale = 255.0 if member_images.dtype == np.uint8 else 1.0

    def variance(images: np.ndarray) -> np.ndarray:
        return (images.astype(np.float64) / scale).var(0, ddof=1).mean(0) + 1e-4  # (H, W)

    ratio = variance(member_images) / variance(rest_images)
    p_value = stats.f.cdf(ratio, len(member_images) - 1, len(rest_images) - 1)
    fixed = p_value < alpha / p_value.size
    labels, n = ndimage.label(fixed)
    touching = np.unique(labels[fixed & near])
    return np.isin(labels, touching[touching > 0])


def feature_layer(model: nn.Module) -> str:
    """Name of the module whose output is the last feature map: the one before the last global pooling."""
    names = [name for name, _ in model.named_modules()]
    modules = dict(model.named_modules())
    pools = [i for i, n in enumerate(names) if isinstance(modules[n], nn.AdaptiveAvgPool2d)]
    if not pools:
        raise ArtifactError(f"{type(model).__name__} has no AdaptiveAvgPool2d: name unlearn.cav_layer explicitly")
    pool = names[pools[-1]]
    parent, _, _ = pool.rpartition(".")
    siblings = [n for n in names if n.rpartition(".")[0] == parent and n]
    index = siblings.index(pool)
    if index == 0:
        raise ArtifactError(f"nothing precedes {pool!r}: name unlearn.cav_layer explicitly")
    return siblings[index - 1]


def _module(model: nn.Module, layer: str) -> nn.Module:
    """The module named ``layer``, or an error that names it (``unlearn.cav_layer``)."""
    module = dict(model.named_modules()).get(layer)
    if module is None:
        raise ArtifactError(f"unlearn.cav_layer {layer!r} is not a module of the model")
    return module


class _LayerReached(Exception):
    """Raised by the hook that ends :class:`ConceptReadout`'s pass at its layer."""


class ConceptReadout(nn.Module):
    """The model up to ``layer``, then its feature map projected on a concept direction, summed over positions.

    Explaining this (B, 1) output with LRP gives each image's map of where the concept is (the CRP view of a CAV,
    as Reveal to Revise localises artifacts): the relevance of the strategy's own direction, not of the class.
    """

    def __init__(self, model: nn.Module, layer: str, cav: np.ndarray):
        super().__init__()
        self.model, self.layer = model, _module(model, layer)
        self.project = nn.Conv2d(len(cav), 1, 1, bias=False)
        self.project.weight.data = torch.as_tensor(np.asarray(cav), dtype=torch.float32).view(1, -1, 1, 1)
        self.pool, self.flatten = nn.AdaptiveAvgPool2d(1), nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept: list[torch.Tensor] = []

        def stop(module, inputs, output):
            kept.append(output)
            raise _LayerReached

        handle = self.layer.register_forward_hook(stop)
        try:
            self.model(x)
        except _LayerReached:
            pass
        finally:
            handle.remove()
        if not kept or kept[0].dim() != 4:
            raise ArtifactError("the concept layer must give a (B, C, H, W) feature map")
        return self.flatten(self.pool(self.project(kept[0])))


def concept_masks(
    model: nn.Module, layer: str, cav: np.ndarray, x: torch.Tensor, composite, threshold: float,
    batch_size: int = 64,
) -> np.ndarray:  # fmt: skip
    """(N, H, W) bool: per image, where the concept is: LRP of :class:`ConceptReadout` (positive part) at or above
    ``threshold`` of the image's maximum. Follows a cue that moves, where a region from the members' mean cannot."""
    import lrp_core  # here: the rest of this module needs no LRP

    readout = ConceptReadout(model, layer, cav).eval()
    maps = [
        lrp_core.attribute(readout, x[i : i + batch_size], 0, composite=composite).sum(1).clamp_min(0).detach()
        for i in range(0, len(x), batch_size)
    ]
    r = torch.cat(maps).numpy()
    peak = r.max((1, 2), keepdims=True)
    return (r >= threshold * peak) & (peak > 0)


@torch.no_grad()
def layer_activations(
    model: nn.Module, layer: str, x: torch.Tensor, pool: str = "max", batch_size: int = 32
) -> torch.Tensor:
    """Spatially pooled (``max`` or ``mean``) activations ``(N, C)`` of ``layer``."""
    module = _module(model, layer)
    out: list[torch.Tensor] = []

    def keep(module, inputs, output):
        if output.dim() == 4:
            output = output.amax((2, 3)) if pool == "max" else output.mean((2, 3))
        out.append(output.detach())

    handle = module.register_forward_hook(keep)
    try:
        model.eval()
        for start in range(0, len(x), batch_size):
            model(x[start : start + batch_size])
    finally:
        handle.remove()
    return torch.cat(out)


def pattern_cav(activations: np.ndarray, is_member: np.ndarray) -> tuple[np.ndarray, float]:
    """Unit pattern CAV cov(a, t)/var(t) and the non-members' mean projection on it."""
    t = is_member.astype(np.float64)
    if t.min() == t.max():
        raise ArtifactError("a CAV needs members and non-members of the class")
    a = activations.astype(np.float64)
    pattern = ((a - a.mean(0)) * (t - t.mean())[:, None]).mean(0) / t.var()
    norm = np.linalg.norm(pattern)
    if not np.isfinite(norm) or norm == 0:
        raise ArtifactError("members and non-members have the same mean activation: no concept direction")
    cav = pattern / norm
    return cav, float((a[t == 0] @ cav).mean())


def paste_artifact(images: torch.Tensor, sources: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Reveal-to-Revise style: copy each source's artifact pixels (mask) into the target image."""
    m = masks.to(images.dtype).unsqueeze(1)
    return images * (1 - m) + sources * m
