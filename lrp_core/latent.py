"""Which layers' channel relevance to keep for a latent (concept) view of a model's strategies.

A heatmap says *where* a model looked; the relevance of a layer's channels, pooled over positions, says *what* it
used there, wherever it lay (``LATENT_POOLS``: its total, its peak). Two layers are kept by default: the convolution
two thirds of the way up the convolutional stack and the last one. Why these (measured in ``docs/spray.md``, "The
latent view"): the last convolution holds object-level concepts (a frame on disks, a watermark: ARI 0.99-1.0 where
the pixel views reach 0.66), a layer further down holds texture-level ones (a noise patch on stars: 0.94 there);
the first third of the stack describes colours and textures of the whole image (two background photographs), which
split clean classes into groups that are not strategies (false flags in 3 of 4 audits of the digits-on-photos
family when it was used).
"""

from __future__ import annotations

from torch import nn

__all__ = ["latent_layers", "channels_of", "check_pools", "LATENT_DEPTHS", "LATENT_POOLS"]

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: where in the convolutional stack (0 = first convolution, 1 = last) the default latent layers sit
LATENT_DEPTHS = (2 / 3, 1.0)
#: how a channel's relevance is pooled over positions. ``sum``: its total relevance (conserving: the channels sum
#: to what the layer passes on; CRP's concept relevance). ``max``: its relevance at its most relevant position, how
#: strongly the concept was used *somewhere*. They see different cues (docs/spray.md, "The latent view"): a small
#: patch at a random place beside the object adds a peak to a few texture channels but little to their sums, where
#: the object's relevance dominates (max flags it, sum does not); a thin frame adds a little at every border
#: position, much in sum and little at any one peak (sum flags it, max does not). The pipeline keeps both.
LATENT_POOLS = ("sum", "max")


def check_pools(latent_pool) -> tuple[str, ...]:
    """``latent_pool`` (one name of ``LATENT_POOLS`` or a list of distinct ones) as a tuple; a ValueError naming the
    allowed ones otherwise."""
    pools = (latent_pool,) if isinstance(latent_pool, str) else tuple(latent_pool or ())
    if not pools or any(pool not in LATENT_POOLS for pool in pools) or len(set(pools)) < len(pools):
        raise ValueError(f"latent_pool must be one of {LATENT_POOLS} or a list of distinct ones; got {latent_pool!r}")
    return pools


def latent_layers(model: nn.Module, depths: tuple[float, ...] = LATENT_DEPTHS) -> list[str]:
    """Paths of the default latent layers: the convolutions at ``depths`` of the convolutional stack (in module
    order); for a model without convolutions, its dense layers but the last (the output) at those depths; [] when
    there are none (a single linear layer has no latent view)."""
    layers = [name for name, m in model.named_modules() if isinstance(m, CONVOLUTIONS)]
    if not layers:
        layers = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][:-1]
    if not layers:
        return []
    picked = [layers[round(d * (len(layers) - 1))] for d in depths]
    return list(dict.fromkeys(picked))


def channels_of(model: nn.Module, path: str) -> int:
    """Output channels of the layer at ``path`` (the length of its latent vector)."""
    module = dict(model.named_modules()).get(path)
    if module is None:
        raise ValueError(f"the model has no layer {path!r}")
    for attribute in ("out_channels", "out_features", "num_features"):
        if hasattr(module, attribute):
            return int(getattr(module, attribute))
    raise ValueError(f"layer {path!r} ({type(module).__name__}) has no channel count to keep latent relevance of")
