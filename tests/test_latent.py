"""Latent (concept) relevance: per-channel relevance of chosen layers, what SpRAy's latent view clusters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import randomize_batch_norms
from sklearn.metrics import adjusted_rand_score

import lrp_core
from audits import SpRAy
from lrp_core import composites
from lrp_core.latent import channels_of, latent_layers
from pipeline.models import small_cnn


@pytest.fixture
def model():
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = small_cnn(5, width=8)
    randomize_batch_norms(net, generator)
    return net.eval()


def test_latent_relevance_is_the_relevance_of_the_upper_network_at_its_input(model):
    """Reference: cut the network after the layer and explain the upper part from the layer's output. The input
    relevance of the upper part, summed per channel over positions, is the latent relevance of the layer."""
    x = torch.randn(6, 3, 32, 32)
    target = torch.tensor([0, 1, 2, 3, 4, 0])
    composite = composites.EpsilonPlus()  # the same rule at every depth, so the cut network gets the same rules
    full = lrp_core.explain(model, x, target, composite=composite, latent=["8"])
    with torch.no_grad():
        hidden = model[:10](x)  # conv 8 with its BatchNorm 9: the unit whose output the latent relevance is at
    upper = lrp_core.explain(model[10:], hidden, target, composite=composite)
    torch.testing.assert_close(full.latent["8"], upper.relevance.sum((2, 3)), rtol=1e-4, atol=1e-6)


def test_max_pooled_latent_relevance_is_each_channels_peak_in_the_upper_networks_input_relevance(model):
    """The same reference with ``latent_pool="max"``: the channel's relevance at its most relevant position, so a
    small cue anywhere in the image is not averaged away by the object's relevance in the same channel."""
    x = torch.randn(6, 3, 32, 32)
    target = torch.tensor([0, 1, 2, 3, 4, 0])
    composite = composites.EpsilonPlus()
    full = lrp_core.explain(model, x, target, composite=composite, latent=["4", "8"], latent_pool="max")
    total = lrp_core.explain(model, x, target, composite=composite, latent=["8"])
    both = lrp_core.explain(model, x, target, composite=composite, latent=["8"], latent_pool=["sum", "max"])
    with torch.no_grad():
        hidden = model[:10](x)
    upper = lrp_core.explain(model[10:], hidden, target, composite=composite)
    torch.testing.assert_close(full.latent["8"], upper.relevance.amax((2, 3)), rtol=1e-4, atol=1e-6)
    assert full.latent["4"].shape == (6, channels_of(model, "4"))
    # both pools from one backward pass: (B, 2, C) in the order asked
    torch.testing.assert_close(both.latent["8"], torch.stack([total.latent["8"], full.latent["8"]], 1))
    # the heatmap does not depend on how the latent channels are pooled
    torch.testing.assert_close(full.relevance, total.relevance)
    with pytest.raises(ValueError, match=r"latent_pool must be one of \('sum', 'max'\) .*; got 'mean'"):
        lrp_core.explain(model, x, target, latent=["8"], latent_pool="mean")


def test_latent_relevance_sums_to_what_the_layer_passes_on(model):
    x = torch.randn(4, 3, 32, 32)
    explanation = lrp_core.explain(model, x, 1, latent=latent_layers(model), record_layers=True)
    passed = {record.path.split("+")[0]: record.relevance_out for record in explanation.layers}
    assert set(explanation.latent) == {"8", "12"}
    for path, channels in explanation.latent.items():
        assert channels.shape == (4, channels_of(model, path))
        torch.testing.assert_close(channels.sum(1).double(), passed[path], rtol=1e-4, atol=1e-6)


def test_default_latent_layers_sit_two_thirds_up_and_at_the_top():
    assert latent_layers(small_cnn(3)) == ["8", "12"]

    def mlp(hidden: int) -> torch.nn.Sequential:
        layers = [m for _ in range(hidden) for m in (torch.nn.Linear(8, 8), torch.nn.ReLU())]
        return torch.nn.Sequential(*layers, torch.nn.Linear(8, 2))

    assert latent_layers(mlp(4)) == ["4", "6"]  # hidden layers 0, 2, 4, 6: two thirds up, and the last
    assert latent_layers(mlp(1)) == ["0"]
    assert latent_layers(torch.nn.Linear(4, 2)) == []


def test_an_unknown_latent_layer_names_the_explained_ones(model):
    with pytest.raises(ValueError, match=r"latent layers \['nope'\].*explained: \['0', "):
        lrp_core.explain(model, torch.randn(2, 3, 32, 32), 0, latent=["nope"])
    with pytest.raises(TypeError, match="not the string"):
        lrp_core.explain(model, torch.randn(2, 3, 32, 32), 0, latent="8")


def test_explained_layers_are_what_explain_accepts_and_leave_the_model_as_it_was(model):
    before = {name: value.clone() for name, value in model.state_dict().items()}
    explained = lrp_core.explained_layers(model)
    assert {"0", "4", "8", "12", "17"} <= set(explained)  # every conv and the head
    assert not {"1", "5", "9", "13"} & set(explained)  # the BatchNorms, merged into the convs before them
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    assert set(lrp_core.explain(model, torch.randn(2, 3, 32, 32), 0, latent=explained).latent) == set(explained)
    with pytest.raises(ValueError, match=r"latent layers \['9'\] are not explained"):
        lrp_core.explain(model, torch.randn(2, 3, 32, 32), 0, latent=["9"])


def _same_maps_different_concepts(seed=0):
    """300 maps of one random family; a third of the samples use two extra channels (a concept the maps do not
    show: their maps are drawn like everyone else's)."""
    rng = np.random.default_rng(seed)
    maps = rng.random((300, 16, 16)).astype(np.float32)
    truth = np.zeros(300, dtype=bool)
    truth[rng.choice(300, 100, replace=False)] = True
    late = rng.random((300, 32)) + 0.1
    late[truth, :2] += 3.0
    early = rng.random((300, 16)) + 0.1
    return maps, [early, late], truth


def test_the_latent_view_separates_what_the_maps_cannot():
    maps, latent, truth = _same_maps_different_concepts()
    pixels = SpRAy(random_state=0, embeddings=(), stability_seeds=0).fit(maps)
    concepts = SpRAy(views=("latent",), random_state=0, embeddings=(), stability_seeds=0).fit(maps, latent=latent)
    best = max(adjusted_rand_score(truth, concepts.labels_ == c) for c in np.unique(concepts.labels_))
    assert concepts.n_clusters_ == 2 and best >= 0.95
    assert max(adjusted_rand_score(truth, pixels.labels_ == c) for c in np.unique(pixels.labels_)) < 0.2


def test_the_latent_view_refuses_missing_or_bad_latent_relevance():
    maps, latent, _ = _same_maps_different_concepts()
    spray = SpRAy(views=("latent",), embeddings=(), stability_seeds=0)
    with pytest.raises(ValueError, match="pass fit"):
        spray.fit(maps)
    with pytest.raises(ValueError, match=r"latent layer 1 must be \(300, channels\)"):
        spray.fit(maps, latent=[latent[0], latent[1][:10]])
    broken = latent[1].copy()
    broken[7, 3] = np.nan
    with pytest.raises(ValueError, match=r"latent layer 1 contains NaN or inf at maps \[7\]"):
        spray.fit(maps, latent=[latent[0], broken])


def test_the_spray_stage_uses_the_latent_view_when_the_store_has_it():
    from pipeline.spray_stage import resolve_views

    assert resolve_views("auto", True) == ("latent",)
    assert resolve_views("auto", False) == ("where", "shape")
    assert resolve_views(["where", "latent"], True) == ("where", "latent")
    with pytest.raises(ValueError, match="holds no latent relevance: set attribute.latent_layers"):
        resolve_views(["latent"], False)
    with pytest.raises(ValueError, match="spray.views must be 'auto' or a list"):
        resolve_views("where", True)
