"""Un-learning the flagged Clever-Hans strategies: five methods, one fine-tuning loop, scored on the same data.

- ``rrr-lrp`` (default): cross-entropy + lambda * mean(excess^2), excess = max(0, sum|R * M| / sum|R| - sum(A * M)),
  with R the model's own LRP relevance (lrp_core, ``create_graph=True``) for the true class, M the artifact mask and
  A the share a map without the cue puts on each pixel (the allowance; zero when not given);
- ``rrr``: the same with Ross et al.'s input gradient of sum(log softmax) in place of R (squared gradient mass);
- ``rr-clarc``: the squared cosine between the feature-map gradient of random-signed logits (spatially summed)
  and each strategy's CAV, summed over the strategies;
- ``p-clarc``: no training: the feature map is projected off each CAV onto the non-members' mean, folded exactly
  into the classifier one strategy after the other (the pooling between them is linear and per channel; the last
  folded projection meets the features first), so the cleaned model is an ordinary state dict;
- ``vanilla``: the same fine-tuning without a penalty (the control).

Penalties are scale-free shares, so one lambda range serves every model. The loop keeps BatchNorm statistics
frozen (eval mode; lrp_core requires it and it keeps the fine-tune from drifting), pastes the artifact into a share
of each batch's images, each from a member of another class (Reveal to Revise; the batch keeps its labels, so the
class balance is the one the model was trained on), and on a non-finite loss stops with the last
good weights. Every flagged strategy is un-learned at once: its members carry their own masks, and any member can
be the paste source.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import lrp_core
from lrp_core.composites import get_composite

from .artifact import ArtifactError, paste_artifact
from .training import predict_normalized

__all__ = ["METHODS", "UnlearnConfig", "fine_tune", "fold_projection", "relevance_share", "step_function"]

METHODS = ("vanilla", "rrr", "rrr-lrp", "rr-clarc", "p-clarc")


@dataclass(frozen=True)
class UnlearnConfig:
    method: str = "rrr-lrp"
    epochs: int = 2
    batch_size: int = 32
    lr: float = 1e-3
    momentum: float = 0.9
    optimizer: str = "adam"  # adam (AdamW, the optimiser the model was trained with) or sgd (with momentum)
    weight: float = 1.0  # lambda
    anchor: float = 1.0  # KL to the original model's outputs on samples without an artifact
    paste_fraction: float = 0.5
    composite: object = "epsilon_plus_flat"  # a name, or a Composite (epsilon_gamma_box needs its bounds)
    seed: int = 0
    stop_gap: float = 0.02  # stop once validation accuracy with the artifacts pasted is this close to without

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown unlearn method {self.method!r}; choose one of {METHODS}")
        if self.epochs < 1 or self.batch_size < 2 or self.lr <= 0 or self.weight < 0:
            raise ValueError(f"unlearn needs epochs >= 1, batch_size >= 2, lr > 0, lambda >= 0; got {self}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"unlearn.optimizer must be 'adam' or 'sgd'; got {self.optimizer!r}")
        if not 0 <= self.paste_fraction < 1:
            raise ValueError(f"unlearn.paste_fraction must be in [0, 1); got {self.paste_fraction}")


def _share(mass: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per sample: the share of non-negative ``mass`` (B, H, W) inside ``masks``."""
    return (mass * masks).sum((1, 2)) / (mass.sum((1, 2)) + 1e-9)


class _FeatureTap:
    """Keeps the output of one module (with its graph) during a forward."""

    def __init__(self, model: nn.Module, layer: str):
        self.value: torch.Tensor | None = None
        self.handle = dict(model.named_modules())[layer].register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        self.value = output

    def remove(self) -> None:
        self.handle.remove()


def _penalise_masked(model: nn.Module, x, y, masks, share_of) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, mean(share^2))`` (for rrr-lrp the share above its allowance, ``step_function``) with the (costly,
    double-backward) share computed only for the samples that carry
    a mask; the rest get a plain forward. In eval mode samples do not interact and a mask-free sample's share is 0,
    so this is the whole-batch value, at a fraction of the cost (on the default benchmark under half of a batch
    carries a mask: the members and the pasted images)."""
    has = masks.flatten(1).any(1)
    if not bool(has.any()):
        return model(x), torch.zeros((), device=x.device)
    if bool(has.all()):
        logits, share = share_of(x, y, masks)
        return logits, share.pow(2).mean()
    inside, outside = has.nonzero().squeeze(1), (~has).nonzero().squeeze(1)
    logits_inside, share = share_of(x[inside], y[inside], masks[inside])
    logits = torch.cat([logits_inside, model(x[outside])])[torch.argsort(torch.cat([inside, outside]))]
    return logits, share.pow(2).sum() / len(x)


def step_function(
    model: nn.Module,
    config: UnlearnConfig,
    cavs: list[np.ndarray],
    layer: str | None,
    allowance: torch.Tensor | None = None,
):
    """``(x, y, masks) -> (logits, penalty)`` for the method: the one place where the methods differ.

    ``allowance`` (H, W), rrr-lrp only: the relevance share a map without the cue puts on each pixel (the rest of
    the class's mean |R| share map); a sample's share inside its mask is penalised only above what that map puts
    there. Without it the penalty asks for *no* relevance in the mask, more than the cue ever added: around a
    2-px frame, a resnet18 without the cue still puts 9% of |R| (its 7x7 first convolution and the flat rule
    spread relevance from the image's edge onto it), and driving that to zero cost 5 points of clean accuracy."""
    composite = config.composite if not isinstance(config.composite, str) else get_composite(config.composite)
    method = config.method

    def vanilla(x, y, masks):
        return model(x), torch.zeros(())

    def lrp_share(x, y, masks):
        explanation = lrp_core.explain(model, x, y, composite=composite, create_graph=True)
        share = _share(explanation.relevance.sum(1).abs(), masks)
        if allowance is not None:
            share = (share - (allowance.to(masks) * masks).sum((1, 2))).clamp_min(0)
        return explanation.output, share

    def gradient_share(x, y, masks):
        x = x.detach().requires_grad_(True)
        logits = model(x)
        (grad,) = torch.autograd.grad(F.log_softmax(logits, 1).sum(), x, create_graph=True)
        return logits, _share(grad.pow(2).sum(1), masks)

    def rrr_lrp(x, y, masks):
        return _penalise_masked(model, x, y, masks, lrp_share)

    def rrr(x, y, masks):
        return _penalise_masked(model, x, y, masks, gradient_share)

    if method == "rr-clarc":
        if not cavs or layer is None:
            raise ArtifactError("rr-clarc needs a CAV")
        directions = torch.as_tensor(np.stack(cavs), dtype=torch.float32)  # (S, C)
        generator = torch.Generator().manual_seed(config.seed)

    def rr_clarc(x, y, masks):
        tap = _FeatureTap(model, layer)
        try:
            logits = model(x)
        finally:
            tap.remove()
        signs = (torch.randint(0, 2, logits.shape, generator=generator).float() * 2 - 1).to(logits)
        (grad,) = torch.autograd.grad((signs * logits).sum(), tap.value, create_graph=True)
        g = grad.sum((2, 3)) if grad.dim() == 4 else grad
        return logits, ((g @ directions.to(g).T) ** 2 / (g.pow(2).sum(1, keepdim=True) + 1e-12)).sum(1).mean()

    return {"vanilla": vanilla, "rrr": rrr, "rrr-lrp": rrr_lrp, "rr-clarc": rr_clarc}[method]


def data_term(logits: torch.Tensor, y: torch.Tensor, reference: torch.Tensor | None, keep: torch.Tensor, anchor: float):
    """Cross-entropy, plus ``anchor`` x KL(original || fine-tuned) on the samples without an artifact (``keep``):
    the model may change where the artifact is, and should behave as before elsewhere."""
    ce = F.cross_entropy(logits, y)
    if anchor <= 0 or not keep.any():
        return ce
    kl = F.kl_div(F.log_softmax(logits[keep], 1), F.log_softmax(reference[keep], 1), log_target=True,
                  reduction="batchmean")  # fmt: skip
    return ce + anchor * kl


def _freeze_batch_norm(model: nn.Module) -> None:
    """Eval mode everywhere (BatchNorm statistics frozen; lrp_core refuses BatchNorm in training mode)."""
    model.eval()


def fine_tune(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    masks: torch.Tensor,
    member_index: np.ndarray,
    config: UnlearnConfig,
    cavs: list[np.ndarray] = (),
    layer: str | None = None,
    progress: bool = True,
    validation: tuple[torch.Tensor, torch.Tensor] | None = None,
    allowance: torch.Tensor | None = None,
) -> tuple[nn.Module, dict]:
    """Fine-tune a copy of ``model`` on normalised ``images`` with the method's penalty.

    ``masks`` (N, H, W) is each training sample's artifact mask (members of a flagged strategy: their own; the
    rest: none); ``member_index`` indexes the members in ``images`` (the paste sources: each is pasted into images
    of other classes than its own); ``cavs`` are the strategies' concept directions in ``layer`` (rr-clarc).

    ``validation`` (normalised images, labels) turns ``config.epochs`` into a maximum: after each epoch the model
    is scored on them as they are and with members' artifacts pasted into every image of another class (the same
    pastes every epoch). The epoch with the best sum of both accuracies is kept, and training stops once the
    pasted accuracy is within ``config.stop_gap`` of the plain one (the artifact no longer sways the decision,
    which no ground truth is needed to see), or once an epoch raised the pasted accuracy by less than one
    standard error of the paired difference (:meth:`_PastedValidation.gain_is_real`: no gain the validation split
    can tell from chance; the pasted masks carry some of the source image around the cue, so the pasted accuracy
    levels off a few points below the plain one and the first rule alone never fires). A cue the model leans on
    harder takes more epochs; one it barely uses stops after the first.

    ``allowance`` (H, W): the share of relevance that rrr-lrp leaves unpenalised per pixel (:func:`step_function`).
    """
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(True)
    if config.method == "p-clarc":
        raise ValueError("p-clarc does not train: use fold_projection")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    original = copy.deepcopy(model).eval()  # the anchor: unfused, so that fine-tuning sees its exact outputs
    loss_of = step_function(model, config, list(cavs), layer, allowance)
    n = len(images)
    steps = max(1, n // config.batch_size)
    if config.optimizer == "adam":
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    # cosine decay to zero: the last steps settle instead of leaving the model wherever the last batch threw it
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps)
    _freeze_batch_norm(model)
    sources = torch.as_tensor(np.asarray(member_index, dtype=np.int64))
    # paste sources per target class: members of any other class
    sources_for = {int(c): sources[labels[sources] != c] for c in labels.unique()}
    last_good = copy.deepcopy(model.state_dict())
    check = _PastedValidation(validation, images, labels, masks, sources, config.seed) if validation else None
    start = check(model) if check is not None else None  # the original's accuracies: epoch 1's baseline
    best = (-np.inf, last_good)
    history, diverged, started = [], False, time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        order = torch.randperm(n, generator=generator)
        totals = {"loss": 0.0, "ce": 0.0, "penalty": 0.0}
        bar = tqdm(range(steps), desc=f"{config.method} {epoch}/{config.epochs}", disable=not progress)
        for step in bar:
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            x, y, m = images[index].clone(), labels[index], masks[index].bool()
            n_paste = int(round(config.paste_fraction * len(index))) if len(sources) else 0
            # the batch's own images (and labels) receive the pastes, so the fine-tune sees the class balance the
            # model was trained on; drawing paste targets from the other classes instead starves the artifact's
            # class and shifts the prior away from it (noise_patch: triangle clean accuracy 0.72 -> 0.57)
            slots, picks = [], []
            for slot in range(n_paste):
                pool = sources_for[int(y[slot])]
                if len(pool):
                    slots.append(slot)
                    picks.append(pool[torch.randint(len(pool), (1,), generator=generator)[0]])
            if slots:
                slots_t, picks_t = torch.tensor(slots), torch.stack(picks)
                x[slots_t] = paste_artifact(x[slots_t], images[picks_t], masks[picks_t])
                m[slots_t] = m[slots_t] | masks[picks_t].bool()
            keep = ~m.flatten(1).any(1)  # no artifact (neither a member nor pasted): behave as before
            reference = None
            if config.anchor > 0 and keep.any():
                with torch.no_grad():  # the anchor reads the original's outputs on the kept samples only
                    kept = original(x[keep])
                reference = kept.new_zeros((len(x), kept.shape[1]))
                reference[keep] = kept
            logits, penalty = loss_of(x, y, m.float())
            ce = data_term(logits, y, reference, keep, config.anchor)
            loss = ce + config.weight * penalty
            if not torch.isfinite(loss):
                diverged = True
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            for key, value in (("loss", loss), ("ce", ce), ("penalty", penalty)):
                totals[key] += float(value.detach()) / steps
            bar.set_postfix(ce=f"{float(ce.detach()):.3f}", penalty=f"{float(penalty.detach()):.3f}")
        if diverged or not all(math.isfinite(float(p.detach().abs().sum())) for p in model.parameters()):
            diverged = True
            model.load_state_dict(last_good)
            break
        last_good = copy.deepcopy(model.state_dict())
        history.append({"epoch": epoch, **totals})
        if check is not None:
            plain, pasted = check(model)
            history[-1].update(val_acc=plain, val_pasted_acc=pasted, val_pasted_gained=check.gained,
                               val_pasted_lost=check.lost)  # fmt: skip
            if plain + pasted > best[0]:
                best = (plain + pasted, last_good)
            if pasted >= plain - config.stop_gap or not check.gain_is_real():
                break
    if check is not None and not diverged:
        model.load_state_dict(best[1])
    model.eval()
    info = {"history": history, "diverged": diverged, "seconds": time.perf_counter() - started}
    if start is not None:
        info["validation_before"] = {"val_acc": start[0], "val_pasted_acc": start[1]}
    return model, info


class _PastedValidation:
    """Validation accuracy as it is and with members' artifacts pasted into every image of another class; each call
    also counts the pasted images it turned right (``gained``) and wrong (``lost``) since the call before."""

    def __init__(self, validation, images, labels, masks, sources, seed: int):
        self.x, self.y = validation
        generator = torch.Generator().manual_seed(seed + 1)
        self.x_pasted = self.x.clone()
        if len(sources):
            picks = sources[torch.randint(len(sources), (len(self.x),), generator=generator)]
            other = labels[picks] != self.y
            self.x_pasted[other] = paste_artifact(self.x[other], images[picks[other]], masks[picks[other]])
        self.gained, self.lost, self._pasted_right = 0, 0, None

    def gain_is_real(self) -> bool:
        """Did the last epoch raise the pasted accuracy by at least one standard error of a *paired* difference?

        Both accuracies are measured on the same images, so the noise in their difference comes from the images
        that changed side: McNemar's statistic with continuity correction, (gained - lost - 1) / sqrt(gained +
        lost) >= 1. The standard error of one accuracy, sqrt(p (1 - p) / n), ignores the pairing and is 1.7x
        larger on photo/watermark's second epoch (0.029 vs 0.018 at 270 images): it stopped an epoch that still
        turned 15 images right and 8 wrong."""
        return self.gained - self.lost - 1 >= math.sqrt(self.gained + self.lost)

    def _right(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image: predicted right as it is, and with the paste."""
        return tuple(predict_normalized(model, x).eq(self.y) for x in (self.x, self.x_pasted))

    def __call__(self, model: nn.Module) -> tuple[float, float]:
        plain_right, pasted_right = self._right(model)
        if self._pasted_right is not None:
            self.gained = int((pasted_right & ~self._pasted_right).sum())
            self.lost = int((~pasted_right & self._pasted_right).sum())
        self._pasted_right = pasted_right
        return float(plain_right.float().mean()), float(pasted_right.float().mean())


@torch.no_grad()
def fold_projection(model: nn.Module, layer: str, cav: np.ndarray, reference: float) -> nn.Module:
    """P-ClArC folded into the first Linear after ``layer``: every location's feature vector a becomes
    a - v (v.a - reference). Exact when only a per-channel linear pooling (and a flatten) lies between them."""
    model = copy.deepcopy(model)
    names = [n for n, _ in model.named_modules()]
    modules = dict(model.named_modules())
    after = names[names.index(layer) + 1 :]
    linear_name = next((n for n in after if isinstance(modules[n], nn.Linear)), None)
    between = [modules[n] for n in after[: after.index(linear_name)]] if linear_name else []
    allowed = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.Flatten, nn.Identity, nn.Dropout)
    if linear_name is None or not all(isinstance(m, allowed) for m in between if not list(m.children())):
        raise ArtifactError(f"p-clarc folds into a Linear reached from {layer!r} by pooling only; not so here")
    linear = modules[linear_name]
    v = torch.as_tensor(cav, dtype=linear.weight.dtype)
    channels = len(v)
    if linear.in_features % channels:
        raise ArtifactError(f"{linear_name} has {linear.in_features} inputs, not a multiple of {channels} channels")
    w = linear.weight.view(linear.out_features, channels, -1)  # (K, C, locations), channel-major flatten
    along = torch.einsum("kcl,c->kl", w, v)  # (K, L)
    linear.weight.copy_((w - along.unsqueeze(1) * v.view(1, -1, 1)).view_as(linear.weight))
    if linear.bias is None:
        raise ArtifactError(f"p-clarc needs a bias in {linear_name}")
    linear.bias.add_(along.sum(1) * reference)
    return model


def relevance_share(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, composite: str,
    batch_size: int = 128,
) -> float:  # fmt: skip
    """R_bias = sum|R * M| / sum|R| over the given samples (LRP for the true class)."""
    inside, total = 0.0, 0.0
    model.eval()
    for start in range(0, len(images), batch_size):
        sl = slice(start, start + batch_size)
        rule = composite if not isinstance(composite, str) else get_composite(composite)
        r = lrp_core.attribute(model, images[sl], labels[sl], composite=rule).sum(1).abs()
        inside += float((r * masks[sl].float()).sum())
        total += float(r.sum())
    return inside / total if total > 0 else float("nan")
