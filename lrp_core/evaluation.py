"""Is an explanation right? Perturbation and ground-truth scores (torch only, batched, on x's device).

**Region perturbation** (Samek et al. 2017): the input's patches are replaced, in order of their summed relevance
("morf": most relevant first; "lerf": least relevant first; "random": a seeded random order, the baseline), by a
fill ("mean": the image's per-channel mean; "blur": a Gaussian-blurred copy; "noise": Gaussian noise with the
image's per-channel mean and std). The curve is the explained logit after k patches, k = 0..steps.

- ``aopc(curve)`` = mean over k of f(x) - f(x_k): high when removing relevant patches destroys the evidence fast;
- the area between the lerf and morf curves, mean_k f(x_lerf_k) - f(x_morf_k) (Samek's ABPC), rewards both ends.

**Ground truth** (a mask of where the evidence is), with the sign convention of CLEVR-XAI (Arras et al. 2022):
only **positive** relevance counts, because negative relevance is evidence *against* the explained class and
does not say where the class is. ``signed=True`` sums signed values instead, as Quantus does; the two agree when a
map has no negative part.

- relevance mass accuracy: positive relevance inside the mask / all positive relevance;
- relevance rank accuracy: the share of the K most relevant pixels that lie in the mask, K = the mask's size;
- ``mask_share`` is the mass accuracy under another name, for a mask of an artifact (the stamp).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FILLS",
    "ORDERS",
    "region_perturbation",
    "aopc",
    "area_between",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "mask_share",
    "gradient",
    "gradient_x_input",
    "random_map",
]

FILLS = ("mean", "blur", "noise")
ORDERS = ("morf", "lerf", "random")


def _channel_map(relevance: Tensor) -> Tensor:
    return relevance.sum(1) if relevance.dim() == 4 else relevance


def _fill(x: Tensor, how: str, generator: torch.Generator | None) -> Tensor:
    if how == "mean":
        return x.mean((2, 3), keepdim=True).expand_as(x)
    if how == "blur":
        sigma, radius = 4.0, 8
        t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        k = torch.exp(-(t**2) / (2 * sigma**2))
        k = k / k.sum()
        c = x.shape[1]
        padded = F.pad(x, (radius, radius, radius, radius), mode="replicate")
        out = F.conv2d(padded, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    if how == "noise":
        mean, std = x.mean((2, 3), keepdim=True), x.std((2, 3), keepdim=True)
        noise = torch.randn(x.shape, generator=generator, device="cpu", dtype=x.dtype).to(x.device)
        return mean + std * noise
    raise ValueError(f"fill must be one of {FILLS}; got {how!r}")


def _patch_order(relevance: Tensor, patch: int, order: str, generator: torch.Generator | None) -> Tensor:
    """(B, P) patch indices in removal order."""
    scores = F.avg_pool2d(_channel_map(relevance).unsqueeze(1), patch).flatten(1)  # (B, P), sums up to a factor
    if order == "morf":
        return scores.argsort(dim=1, descending=True, stable=True)
    if order == "lerf":
        return scores.argsort(dim=1, descending=False, stable=True)
    if order == "random":
        keys = torch.rand(scores.shape, generator=generator, device="cpu").to(scores.device)
        return keys.argsort(1)
    raise ValueError(f"order must be one of {ORDERS}; got {order!r}")


@torch.no_grad()
def region_perturbation(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    relevance: Tensor,
    *,
    patch: int = 8,
    order: str = "morf",
    fill: str = "mean",
    steps: int | None = None,
    seed: int = 0,
    chunk: int = 512,
) -> Tensor:
    """The explained logit ``(B, steps + 1)`` as patches are removed (column 0: the intact input).

    ``relevance`` has x's shape or ``(B, H, W)``; H and W must be multiples of ``patch``. ``steps`` defaults to
    all patches.
    """
    b, _, h, w = x.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch}")
    if _channel_map(relevance).shape != (b, h, w):
        raise ValueError(f"relevance of shape {tuple(relevance.shape)} does not fit inputs {tuple(x.shape)}")
    target = torch.as_tensor(target, device=x.device).long().view(-1).expand(b)
    generator = torch.Generator().manual_seed(seed)
    filler = _fill(x, fill, generator)
    ranking = _patch_order(relevance, patch, order, generator)  # (B, P)
    n_patches = ranking.shape[1]
    steps = n_patches if steps is None else min(steps, n_patches)
    gw = w // patch
    # position of each patch in the removal order -> removed at step k iff position < k
    position = torch.empty_like(ranking)
    position.scatter_(1, ranking, torch.arange(n_patches, device=x.device).expand(b, -1))
    position = position.view(b, 1, h // patch, gw).float()
    position = F.interpolate(position, scale_factor=patch, mode="nearest")  # (B, 1, H, W)
    model.eval()
    curve = torch.empty(b, steps + 1, device=x.device, dtype=x.dtype)
    jobs = [(i, k) for i in range(b) for k in range(steps + 1)]
    for start in range(0, len(jobs), chunk):
        part = jobs[start : start + chunk]
        idx = torch.tensor([i for i, _ in part], device=x.device)
        ks = torch.tensor([k for _, k in part], device=x.device, dtype=torch.float32).view(-1, 1, 1, 1)
        removed = (position[idx] < ks).to(x.dtype)
        batch = x[idx] * (1 - removed) + filler[idx] * removed
        logits = model(batch)
        curve[idx, ks.view(-1).long()] = logits.gather(1, target[idx].view(-1, 1)).view(-1).to(x.dtype)
    return curve


def aopc(curve: Tensor) -> Tensor:
    """Per sample: mean over k = 0..L of f(x) - f(x_k) (Samek et al. 2017, eq. 12)."""
    return (curve[:, :1] - curve).mean(1)


def area_between(morf: Tensor, lerf: Tensor) -> Tensor:
    """Per sample: mean over k of f(x_lerf_k) - f(x_morf_k); positive when the ranking is informative."""
    return (lerf - morf).mean(1)


def _positive(relevance: Tensor, signed: bool) -> Tensor:
    r = _channel_map(relevance).flatten(1)
    return r if signed else r.clamp(min=0)


def relevance_mass_accuracy(relevance: Tensor, mask: Tensor, *, signed: bool = False) -> Tensor:
    """Per sample: (positive) relevance inside ``mask`` / all (positive) relevance; NaN where there is none."""
    r = _positive(relevance, signed)
    m = mask.flatten(1).to(r.dtype)
    total = r.sum(1)
    return torch.where(total != 0, (r * m).sum(1) / total, torch.full_like(total, math.nan))


def relevance_rank_accuracy(relevance: Tensor, mask: Tensor, *, signed: bool = False) -> Tensor:
    """Per sample: the share of the K highest-relevance pixels inside ``mask``, K = the mask's pixel count."""
    r = _positive(relevance, signed)
    m = mask.flatten(1).bool()
    out = torch.full((r.shape[0],), math.nan, dtype=r.dtype, device=r.device)
    for i in range(r.shape[0]):
        k = int(m[i].sum())
        if k:
            top = r[i].topk(k).indices
            out[i] = m[i, top].float().mean()
    return out


mask_share = relevance_mass_accuracy


def gradient(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """The plain gradient of the target logit (the baseline "sensitivity" map)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        selected = logits.gather(1, torch.as_tensor(target, device=x.device).long().view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(selected, x)
    return grad


def gradient_x_input(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    return gradient(model, x, target) * x.detach()


def random_map(model: nn.Module, x: Tensor, target: Tensor, seed: int = 0) -> Tensor:
    """Uniform noise of x's shape: the floor any explanation must beat."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
