"""Explanation quality scores on models whose answers are known by construction, and against Quantus."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lrp_core
from lrp_core import composites
from lrp_core.evaluation import (
    aopc,
    area_between,
    gradient_x_input,
    random_map,
    region_perturbation,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
)


def _linear(weight: torch.Tensor) -> nn.Module:
    """f(x) = <w, x> for class 0 (class 1 is its negative): every explanation's answer is known."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(weight.numel(), 2, bias=False)).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([weight.flatten(), -weight.flatten()]))
    return model.eval()


def test_region_perturbation_of_a_linear_model_follows_the_sorted_contributions():
    torch.manual_seed(0)
    w = torch.randn(1, 16, 16, dtype=torch.float64)
    x = torch.randn(3, 1, 16, 16, dtype=torch.float64)
    x = x - x.mean((2, 3), keepdim=True)  # the "mean" fill is then zero: removing a patch removes its contribution
    model = _linear(w)
    target = torch.zeros(3, dtype=torch.long)
    relevance = lrp_core.attribute(model, x, target, composite=composites.EpsilonPlus(epsilon=1e-12))
    torch.testing.assert_close(relevance, w * x)  # LRP of a bias-free linear model is w * x
    patches = (w * x).view(3, 4, 4, 4, 4).sum((2, 4))  # (B, 4, 4) patch contributions, patch 4
    for order, descending in (("morf", True), ("lerf", False)):
        curve = region_perturbation(model, x, target, relevance, patch=4, order=order)
        removed = patches.flatten(1).sort(1, descending=descending).values.cumsum(1)
        logit = model(x)[:, 0]
        expected = torch.cat([logit[:, None], logit[:, None] - removed], 1)
        torch.testing.assert_close(curve, expected)
    assert curve[:, -1].abs().max() < 1e-12  # everything removed: the logit of the all-mean image
    morf = region_perturbation(model, x, target, relevance, patch=4, order="morf")
    lerf = region_perturbation(model, x, target, relevance, patch=4, order="lerf")
    rand = region_perturbation(model, x, target, relevance, patch=4, order="random")
    assert (aopc(morf) > aopc(rand)).all() and (aopc(rand) > aopc(lerf)).all()
    assert (area_between(morf, lerf) > 0).all()


def test_a_model_that_looks_at_one_region_gets_full_marks():
    torch.manual_seed(1)
    region = torch.zeros(1, 16, 16, dtype=torch.bool)
    region[:, 3:9, 5:11] = True
    w = torch.rand(1, 16, 16, dtype=torch.float64) * region
    model = _linear(w)
    x = torch.rand(8, 1, 16, 16, dtype=torch.float64) + 0.1  # positive inputs: all in-region evidence is positive
    target = torch.zeros(8, dtype=torch.long)
    relevance = lrp_core.attribute(model, x, target, composite=composites.EpsilonPlus())
    mask = region.expand(8, -1, -1)
    assert torch.allclose(relevance_mass_accuracy(relevance, mask), torch.ones(8, dtype=torch.float64))
    assert torch.allclose(relevance_rank_accuracy(relevance, mask), torch.ones(8, dtype=torch.float64))
    noise = random_map(model, x, target)
    share = region.double().mean()
    assert abs(relevance_mass_accuracy(noise, mask).mean() - share) < 0.05
    # negative relevance is not evidence for the class: by default it does not count, signed=True (Quantus) sums it
    signed_map = relevance.clone()
    signed_map[:, :, 0, 0] = -5.0  # strong negative evidence outside the region
    assert torch.allclose(relevance_mass_accuracy(signed_map, mask), torch.ones(8, dtype=torch.float64))
    assert (relevance_mass_accuracy(signed_map, mask, signed=True) > 1).all()


def test_bad_arguments_are_named():
    model = _linear(torch.ones(1, 10, 10, dtype=torch.float64))
    x = torch.zeros(1, 1, 10, 10, dtype=torch.float64)
    with pytest.raises(ValueError, match="multiple of the patch size 4"):
        region_perturbation(model, x, torch.zeros(1), x, patch=4)
    with pytest.raises(ValueError, match="fill must be one of"):
        region_perturbation(model, x, torch.zeros(1), x, patch=5, fill="zero")
    with pytest.raises(ValueError, match="order must be one of"):
        region_perturbation(model, x, torch.zeros(1), x, patch=5, order="best")


@pytest.mark.parametrize("fill", ["mean", "blur", "noise"])
def test_fills_keep_shape_and_change_only_removed_patches(fill):
    model = _linear(torch.ones(3, 8, 8, dtype=torch.float64))
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    r = gradient_x_input(model, x, torch.zeros(2, dtype=torch.long))
    curve = region_perturbation(model, x, torch.zeros(2), r, patch=4, fill=fill)
    assert curve.shape == (2, 5) and torch.isfinite(curve).all()
    torch.testing.assert_close(curve[:, 0], model(x)[:, 0])


def test_localisation_scores_equal_quantus():
    quantus = pytest.importorskip("quantus")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3, 16, 16)).astype(np.float32)
    a = rng.random((6, 1, 16, 16)).astype(np.float32)
    s = np.zeros((6, 1, 16, 16), np.float32)
    s[:, :, 4:10, 2:8] = 1
    model = nn.Sequential(nn.Flatten(), nn.Linear(768, 2))
    kwargs = {"model": model, "x_batch": x, "y_batch": np.zeros(6, int), "a_batch": a, "s_batch": s, "device": "cpu"}
    mass = quantus.RelevanceMassAccuracy(normalise=False, disable_warnings=True)(**kwargs)
    rank = quantus.RelevanceRankAccuracy(normalise=False, disable_warnings=True)(**kwargs)
    ours_mass = relevance_mass_accuracy(torch.tensor(a), torch.tensor(s[:, 0]), signed=True).numpy()
    ours_rank = relevance_rank_accuracy(torch.tensor(a), torch.tensor(s[:, 0]), signed=True).numpy()
    np.testing.assert_allclose(ours_mass, mass, rtol=1e-5)
    np.testing.assert_allclose(ours_rank, rank, rtol=1e-5)


@pytest.mark.slow
def test_lrp_beats_a_random_map_on_the_trained_default_model(poisoned):
    """The ``evaluate`` stage on the default model (the session fixture runs it with three methods)."""
    import json

    metrics = poisoned["evaluate"]
    lrp, random, grad = (metrics["methods"][m] for m in ("epsilon_plus_flat", "random", "gradient"))
    assert lrp["aopc_morf"] > random["aopc_morf"] and lrp["aopc_morf"] > metrics["random_order_aopc"]
    assert lrp["area_between"] > max(grad["area_between"], random["area_between"], 0)
    assert lrp["mass_accuracy"] > 1.5 * random["mass_accuracy"]  # relevance lies on the object, not everywhere
    assert lrp["stamp_share"] > 2 * random["stamp_share"]  # the shortcut shows: stamped images put relevance on it
    curves = json.loads((poisoned["dir"] / "curves.json").read_text())["curves"]
    assert set(curves) == {"epsilon_plus_flat", "gradient", "random", "random order"}
    steps = poisoned["params"]["evaluate"]["steps"]
    assert all(len(c["morf"]) == steps + 1 for c in curves.values())
