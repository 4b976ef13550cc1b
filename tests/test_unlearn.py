"""Un-learning: the artifact model, the methods' mechanics, and the targets on the built-in benchmark."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from browser import open_page, undecoded_images, wait_for_plots

from pipeline.artifact import (
    ArtifactError,
    NothingFlagged,
    build_region,
    feature_layer,
    pattern_cav,
    select_strategies,
)
from pipeline.models import small_cnn
from pipeline.unlearn import UnlearnConfig, fine_tune, fold_projection, step_function


def _blob_maps(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    maps = rng.normal(0, 0.02, (n, size, size))
    for i in range(n):
        dy, dx = rng.integers(-1, 2, 2)
        maps[i, 24 + dy : 28 + dy, 2 + dx : 6 + dx] += 1.0
    return maps


def test_region_and_member_masks_find_a_planted_cue():
    maps = _blob_maps(30)
    region, mean, masks = build_region(maps, sigma=1.0, threshold=0.2)
    assert region[25:27, 3:5].all() and region.sum() < 80 and not region[:16].any()
    assert masks.shape == maps.shape and all(m[22:30, 0:8].sum() >= 0.8 * m.sum() for m in masks)


def test_no_members_or_no_relevance_is_one_clear_error():
    with pytest.raises(ArtifactError, match="no relevance maps"):
        build_region(np.zeros((0, 8, 8)))
    with pytest.raises(ArtifactError, match="all zero"):
        build_region(np.zeros((4, 8, 8)))
    with pytest.raises(ArtifactError, match="covers nothing"):
        build_region(_blob_maps(4), threshold=1.5)
    with pytest.raises(ArtifactError, match="whole image"):
        build_region(np.ones((4, 8, 8)), sigma=0.0)


def test_pattern_cav_recovers_the_planted_direction():
    rng = np.random.default_rng(0)
    direction = rng.normal(size=16)
    direction /= np.linalg.norm(direction)
    t = rng.random(400) < 0.3
    acts = rng.normal(size=(400, 16)) + 3.0 * t[:, None] * direction
    cav, reference = pattern_cav(acts, t)
    assert cav @ direction > 0.95 and np.isclose(np.linalg.norm(cav), 1)
    assert abs(reference - (acts[~t] @ cav).mean()) < 1e-9
    with pytest.raises(ArtifactError, match="members and non-members"):
        pattern_cav(acts, np.ones(400, bool))


def test_p_clarc_folds_exactly_into_the_classifier():
    torch.manual_seed(0)
    model = small_cnn(5).eval()
    layer = feature_layer(model)
    assert isinstance(dict(model.named_modules())[layer], torch.nn.ReLU)
    v = torch.randn(128, dtype=torch.float64)
    v /= v.norm()
    reference = 0.7
    model = model.double()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)

    def project(module, inputs, out):
        along = torch.einsum("bchw,c->bhw", out, v)
        return out - v.view(1, -1, 1, 1) * (along - reference).unsqueeze(1)

    handle = dict(model.named_modules())[layer].register_forward_hook(project)
    with torch.no_grad():
        expected = model(x)
    handle.remove()
    folded = fold_projection(model, layer, v.numpy(), reference)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), expected, rtol=1e-10, atol=1e-10)
        assert not torch.allclose(model(x), expected)


def test_a_diverging_fine_tune_stops_with_the_last_good_weights():
    torch.manual_seed(0)
    model = small_cnn(3).eval()
    images = torch.randn(64, 3, 32, 32)
    labels = torch.randint(0, 3, (64,))
    masks = torch.zeros(64, 32, 32, dtype=torch.bool)
    config = UnlearnConfig(method="vanilla", optimizer="sgd", lr=1e30, epochs=3, batch_size=16, paste_fraction=0.0)
    cleaned, info = fine_tune(model, images, labels, masks, np.array([], dtype=np.int64), config, progress=False)
    assert info["diverged"]
    for name, value in cleaned.state_dict().items():
        assert torch.isfinite(value.float()).all(), name
        torch.testing.assert_close(value, model.state_dict()[name])


@pytest.mark.parametrize(
    ("scores", "epochs_run", "kept"),
    [
        # (plain accuracy, the validation images predicted right with the paste) for the original, then per epoch;
        # an epoch goes on while (gained - lost - 1) >= sqrt(gained + lost) against the call before
        ([(0.8, range(200)), (0.8, range(300)), (0.8, range(350)), (0.8, range(375)), (0.8, range(385))], 4, 4),
        ([(0.8, range(200)), (0.8, range(350)), (0.8, range(352)), (0.8, range(375)), (0.8, range(385))], 2, 2),
        # the same net gain (+5) is real with little churn (10 right, 5 wrong) and chance with much (20 vs 15)
        ([(0.8, range(200)), (0.8, range(350)), (0.8, range(5, 360)), (0.8, range(361)), (0.8, range(361))], 4, 3),
        ([(0.8, range(200)), (0.8, range(350)), (0.8, range(15, 370)), (0.8, range(375)), (0.8, range(385))], 2, 2),
        ([(0.8, range(200)), (0.8, range(395)), (0.8, range(375)), (0.8, range(375)), (0.8, range(385))], 1, 1),
        ([(0.8, range(200)), (0.8, range(350)), (0.7, range(350)), (0.8, range(375)), (0.8, range(385))], 2, 1),
    ],
)
def test_fine_tuning_stops_when_the_pasted_validation_accuracy_stops_rising(monkeypatch, scores, epochs_run, kept):
    """``epochs`` is a maximum: training stops once the artifacts no longer sway validation accuracy (stop_gap, the
    fifth case: 0.79 against 0.8) or an epoch's gain in pasted accuracy is under one standard error of the paired
    difference (McNemar, continuity-corrected); the epoch with the best plain + pasted sum is returned (the last
    case: the second epoch lost plain accuracy)."""
    from pipeline import unlearn

    torch.manual_seed(0)
    n = 500
    model = small_cnn(3).eval()
    images, labels = torch.randn(64, 3, 32, 32), torch.randint(0, 3, (64,))
    masks = torch.zeros(64, 32, 32, dtype=torch.bool)
    validation = (torch.randn(n, 3, 32, 32), torch.randint(0, 3, (n,)))
    seen = iter(scores)
    states = []

    def scripted(self, scored):
        states.append({k: v.clone() for k, v in scored.state_dict().items()})
        plain, pasted = next(seen)
        right = torch.zeros(n, dtype=torch.bool)
        right[list(pasted)] = True
        return torch.arange(n) < round(plain * n), right

    monkeypatch.setattr(unlearn._PastedValidation, "_right", scripted)
    config = UnlearnConfig(method="vanilla", epochs=4, batch_size=16, paste_fraction=0.0, stop_gap=0.02)
    cleaned, info = fine_tune(model, images, labels, masks, np.array([], dtype=np.int64), config, progress=False,
                              validation=validation)  # fmt: skip
    assert len(info["history"]) == epochs_run
    for name, value in cleaned.state_dict().items():
        torch.testing.assert_close(value, states[kept][name])


def test_members_of_several_strategies_are_pasted_into_other_classes_and_the_batches_keep_their_labels(monkeypatch):
    """Two flagged strategies (classes 0 and 1): every pasted image gets a member's artifact from another class than
    its own label, and the pastes go into the batch's own images, so every epoch sees each label exactly as often
    as the training data holds it (pasting into images drawn from other classes starved the artifact's class)."""
    from pipeline import unlearn

    torch.manual_seed(0)
    labels = torch.tensor([0] * 20 + [1] * 20 + [2] * 20)
    images = (10.0 * (labels + 1)).view(-1, 1, 1, 1).repeat(1, 3, 16, 16)  # an image's class, readable anywhere
    masks = torch.zeros(60, 16, 16, dtype=torch.bool)
    members = np.array([0, 1, 2, 20, 21])
    for i in members:
        images[i, :, :4, :4] = 1.0 + labels[i]  # the artifact shows its source's class
        masks[i, :4, :4] = True
    batches, batch_labels = [], []
    model = small_cnn(3).eval()
    original_forward, original_data_term = model.forward, unlearn.data_term

    def record(x):
        batches.append(x.detach().clone())
        return original_forward(x)

    def record_labels(logits, y, *args):
        batch_labels.append(y.clone())
        return original_data_term(logits, y, *args)

    monkeypatch.setattr(model, "forward", record)
    monkeypatch.setattr(unlearn, "data_term", record_labels)
    config = UnlearnConfig(method="vanilla", epochs=1, batch_size=12, paste_fraction=0.5, anchor=0.0)
    fine_tune(model, images, labels, masks, members, config, progress=False)
    assert torch.equal(torch.cat(batch_labels).sort().values, labels.sort().values)
    n_pasted = 0
    for x, y in zip(batches, batch_labels):
        assert torch.equal(x[:, 0, -1, -1], 10.0 * (y + 1))  # the pasted images keep their own label
        artifact = x[:, 0, 0, 0]
        carries = artifact < 10
        source = artifact[carries].long() - 1
        assert set(source.tolist()) <= {0, 1}
        pasted = source != y[carries]
        n_pasted += int(pasted.sum())
    assert n_pasted == 5 * 6  # 5 batches x 6 slots; every class has members of another class to take from


@pytest.mark.parametrize("method", ["rrr-lrp", "rrr"])
def test_the_penalty_computed_on_the_masked_samples_only_equals_the_whole_batch_one(method):
    """The double-backward share runs only on samples that carry a mask; logits, penalty and every parameter's
    gradient must equal the whole-batch computation (eval mode: samples do not interact)."""
    import lrp_core
    from lrp_core.composites import get_composite
    from pipeline.unlearn import _share

    torch.manual_seed(0)
    model = small_cnn(3).double().eval()
    x, y = torch.randn(6, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    masks = torch.zeros(6, 32, 32, dtype=torch.bool)
    masks[[1, 4], 4:12, 4:12] = True
    masks[2, 20:, :] = True
    logits, penalty = step_function(model, UnlearnConfig(method=method), [], None)(x, y, masks.double())
    if method == "rrr-lrp":
        explanation = lrp_core.explain(model, x, y, composite=get_composite("epsilon_plus_flat"), create_graph=True)
        whole_logits, mass = explanation.output, explanation.relevance.sum(1).abs()
    else:
        xg = x.clone().requires_grad_(True)
        whole_logits = model(xg)
        (grad,) = torch.autograd.grad(torch.log_softmax(whole_logits, 1).sum(), xg, create_graph=True)
        mass = grad.pow(2).sum(1)
    whole_penalty = _share(mass, masks.double()).pow(2).mean()
    torch.testing.assert_close(logits, whole_logits)
    torch.testing.assert_close(penalty, whole_penalty)
    assert penalty > 0
    params = [p for p in model.parameters()]
    ours = torch.autograd.grad(logits.sum() + 10 * penalty, params)
    whole = torch.autograd.grad(whole_logits.sum() + 10 * whole_penalty, params)
    for a, b in zip(ours, whole):
        torch.testing.assert_close(a, b)


def test_rrr_lrp_penalises_only_the_share_above_the_allowance():
    """The allowance (what a map without the cue puts on each pixel) is subtracted from each sample's share inside
    its mask, and nothing below it is penalised: a zero allowance is the plain penalty, one at the median share
    charges only the samples above it for their excess, and one that covers every share charges nothing."""
    from pipeline.unlearn import _share

    torch.manual_seed(0)
    model = small_cnn(3).double().eval()
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    masks = torch.zeros(4, 32, 32, dtype=torch.float64)
    masks[:, :4, :] = 1.0  # a band along the top: 1/8 of the image
    config = UnlearnConfig(method="rrr-lrp")
    _, plain = step_function(model, config, [], None)(x, y, masks)
    _, zero = step_function(model, config, [], None, torch.zeros(32, 32))(x, y, masks)
    torch.testing.assert_close(zero, plain)

    import lrp_core
    from lrp_core.composites import get_composite

    relevance = lrp_core.explain(model, x, y, composite=get_composite("epsilon_plus_flat")).relevance
    share = _share(relevance.sum(1).abs(), masks)
    allowed = float(share.median())  # half the samples lie below it
    allowance = torch.zeros(32, 32, dtype=torch.float64)
    allowance[:4, :] = allowed / masks[0].sum()
    _, penalty = step_function(model, config, [], None, allowance)(x, y, masks)
    torch.testing.assert_close(penalty, (share - allowed).clamp_min(0).pow(2).mean())
    assert 0 < penalty < plain
    _, freed = step_function(model, config, [], None, allowance * 1e3)(x, y, masks)
    assert freed == 0


def _red_patch_model() -> torch.nn.Module:
    """Channel 0 answers red (red minus green and blue), channel 1 brightness: a cue detector and an object one."""
    conv = torch.nn.Conv2d(3, 2, 3, padding=1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, :, 1, 1] = torch.tensor([1.0, -1.0, -1.0])
        conv.weight[1, :, 1, 1] = 1.0 / 3
        conv.bias.copy_(torch.tensor([-0.2, -0.6]))
    return torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(2, 2)).eval()  # fmt: skip


def test_concept_masks_follow_a_cue_that_moves_and_leave_the_object():
    """A red patch at a random place beside a white object: the member masks from the concept direction's LRP cover
    the patch wherever it is and none of the object, where masks from the members' mean relevance region cannot
    (the region of a moving cue holds only the places it visits often)."""
    from pipeline.artifact import ConceptReadout, concept_masks

    rng = np.random.default_rng(0)
    n, size = 24, 32
    x = torch.full((n, 3, size, size), 0.4)
    patches = np.zeros((n, size, size), dtype=bool)
    objects = np.zeros((n, size, size), dtype=bool)
    for i in range(n):
        oy, ox = rng.integers(4, 14, 2)
        objects[i, oy : oy + 10, ox : ox + 10] = True
        while True:
            py, px = rng.integers(0, size - 5, 2)
            if not objects[i, max(py - 1, 0) : py + 6, max(px - 1, 0) : px + 6].any():
                break
        patches[i, py : py + 5, px : px + 5] = True
    x[torch.from_numpy(objects).unsqueeze(1).expand_as(x)] = 1.0
    x[:, 0][torch.from_numpy(patches)] = 1.0
    x[:, 1:][torch.from_numpy(patches).unsqueeze(1).expand(-1, 2, -1, -1)] = 0.0
    model = _red_patch_model()
    cav = np.array([1.0, 0.0])
    readout = ConceptReadout(model, "1", cav)
    with torch.no_grad():
        features = torch.relu(model[0](x))
    assert torch.allclose(readout(x).flatten(), features[:, 0].mean((1, 2)), atol=1e-6)
    masks = concept_masks(model, "1", cav, x, composite=None, threshold=0.2)
    both = (masks & patches).sum((1, 2))
    assert (both / patches.sum((1, 2))).min() >= 0.9  # recall: the whole patch, wherever it went
    assert (masks & objects).sum() == 0  # nothing of the object
    assert (both / masks.sum((1, 2))).mean() >= 0.5  # precision: the patch and a one-pixel halo at most
    with pytest.raises(ArtifactError, match="not a module"):
        ConceptReadout(model, "7", cav)


def test_fixed_content_completes_a_frame_that_relevance_reached_only_in_part():
    """A frame of one colour on the members, random texture elsewhere: the whole frame comes back from a relevance
    region on its top edge; a fixed tag far from the region, and a pixel constant in the whole class, do not."""
    from pipeline.artifact import fixed_content

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (80, 3, 32, 32)).astype(np.uint8)
    images[:, :, 16, 16] = 7  # the same in every image of the class: not the members' own content
    frame = np.zeros((32, 32), dtype=bool)
    frame[:2], frame[-2:], frame[:, :2], frame[:, -2:] = True, True, True, True
    members, rest = images[:25].copy(), images[25:]
    members[:, :, frame] = np.array([200, 30, 120], dtype=np.uint8)[:, None]
    members[:, :, 20:24, 8:12] = 90  # a second shared patch, nowhere near the relevance
    near = np.zeros((32, 32), dtype=bool)
    near[:4, 8:24] = True
    found = fixed_content(members, rest, near)
    assert np.array_equal(found, frame)
    assert not fixed_content(images[:25], rest, near).any()  # nothing shared: nothing fixed
    assert not fixed_content(members[:2], rest, near).any()  # too few members to tell


def test_rr_clarc_penalises_every_strategy_direction_and_p_clarc_folds_them_in_turn():
    torch.manual_seed(0)
    model = small_cnn(3).eval()
    layer = feature_layer(model)
    v = [torch.randn(128, dtype=torch.float64) for _ in range(2)]
    v = [d / d.norm() for d in v]
    config = UnlearnConfig(method="rr-clarc", composite="epsilon_plus")
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    one = step_function(model, config, [v[0].numpy()], layer)(x, y, None)[1]
    both = step_function(model, config, [d.numpy() for d in v], layer)(x, y, None)[1]
    assert both > one > 0
    model, x = model.double(), x.double()

    def project(direction, reference):
        def hook(module, inputs, out):
            along = torch.einsum("bchw,c->bhw", out, direction)
            return out - direction.view(1, -1, 1, 1) * (along - reference).unsqueeze(1)

        return hook

    # folding P_0 then P_1 into the classifier gives W P_0 P_1: the features meet P_1 first
    pairs = list(zip(v, (0.3, -0.2)))[::-1]
    handles = [dict(model.named_modules())[layer].register_forward_hook(project(d, r)) for d, r in pairs]
    with torch.no_grad():
        expected = model(x)
    for handle in handles:
        handle.remove()
    folded = model
    for d, r in zip(v, (0.3, -0.2)):
        folded = fold_projection(folded, layer, d.numpy(), r)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), expected, rtol=1e-10, atol=1e-10)


def _clusters(tmp_path, flagged: bool):
    frame = pd.DataFrame(
        {"class_name": ["a", "a", "a", "b"], "class_index": [0, 0, 0, 1], "cluster": [0, 1, 2, 0],
         "strategy": [1, 1, 0, 0], "ch_score": [9.0, 9.0, 0.0, 0.0], "ch_rank": [1, 1, 2, 3], "p_value": [1e-9] * 4,
         "flagged": [flagged, flagged, False, False]}
    )  # fmt: skip
    frame.to_parquet(tmp_path / "clusters.parquet")
    (tmp_path / "members").mkdir()
    for name, j, ids in (("a", 0, ["x1", "x2"]), ("a", 1, ["x3"]), ("a", 2, []), ("b", 0, ["y1"])):
        (tmp_path / "members" / f"{name}__cluster{j}.json").write_text(json.dumps({"sample_ids": ids}))


def test_strategy_selection_names_what_is_wrong(tmp_path):
    _clusters(tmp_path, flagged=False)
    with pytest.raises(NothingFlagged, match="no strategy .* is flagged"):
        select_strategies(tmp_path)
    picked = select_strategies(tmp_path, "a/0")
    assert [(s.class_index, s.class_name, s.clusters, s.member_ids) for s in picked] == [(0, "a", [0], ["x1", "x2"])]
    picked = select_strategies(tmp_path, ["a/1", "b/0", "a/0"])
    assert [(s.class_name, s.clusters, s.member_ids) for s in picked] == [("a", [0, 1], ["x1", "x2", "x3"]),
                                                                        ("b", [0], ["y1"])]  # fmt: skip
    with pytest.raises(ArtifactError, match="has no members"):
        select_strategies(tmp_path, "a/2")
    with pytest.raises(ArtifactError, match="must look like"):
        select_strategies(tmp_path, "a")
    with pytest.raises(ArtifactError, match="is not a cluster"):
        select_strategies(tmp_path, "c/0")


def test_every_flagged_strategy_is_selected_with_all_its_clusters(tmp_path):
    _clusters(tmp_path, flagged=True)
    picked = select_strategies(tmp_path)
    assert [(s.class_name, s.clusters, s.member_ids) for s in picked] == [("a", [0, 1], ["x1", "x2", "x3"])]


@pytest.mark.slow
def test_rrr_lrp_unlearns_the_default_benchmarks_stamp(poisoned, tmp_path):
    """The issue's targets for rrr-lrp, then the re-audit, then the compare page in the browser."""
    from pipeline.attribute import run_attribute
    from pipeline.compare_stage import run_compare
    from pipeline.spray_stage import run_spray
    from pipeline.unlearn_stage import run_unlearn

    root, params = poisoned["dir"], poisoned["params"]
    params = params | {"unlearn": {**params["unlearn"], "compare_methods": ["p-clarc"]}}
    metrics = run_unlearn(
        params, root / "prepared", root / "model.pt", root / "store", root / "spray", tmp_path / "cleaned.pt",
        tmp_path / "unlearn.json", progress=False,
    )  # fmt: skip
    artifact = metrics["artifact"]
    assert artifact["class_name"] == "triangle" and artifact["member_precision"] > 0.95
    assert artifact["region_covers_artifact"] > 0.8 and artifact["region_share"] < 0.15
    before, after = metrics["before"], metrics["after"]
    assert after["test_attacked_acc"] >= after["test_clean_acc"] - 0.03
    assert after["r_bias"] <= 0.3 * before["r_bias"]
    assert after["test_clean_acc"] >= before["test_clean_acc"] - 0.02
    assert before["test_attacked_acc"] < before["test_clean_acc"] - 0.2  # there was something to un-learn
    assert set(metrics["methods"]) == {"rrr-lrp", "p-clarc"}

    run_attribute(params, root / "prepared", tmp_path / "cleaned.pt", tmp_path / "store", progress=False)
    audit = run_spray(params, tmp_path / "store", root / "prepared", tmp_path / "spray", tmp_path / "s.json",
                      progress=False)  # fmt: skip
    assert audit["artifact_best_ari"] <= 0.2 and audit["n_flagged"] == 0

    compare = run_compare(
        tmp_path / "unlearn.json",
        {"before": root / "spray", "after": tmp_path / "spray"},
        {"before": root / "spray.json", "after": tmp_path / "s.json"},
        {"before": root / "store", "after": tmp_path / "store"},
        root / "prepared",
        tmp_path / "compare.json",
        tmp_path / "compare.html",
    )
    for when in ("before", "after"):
        assert {"test_clean_acc", "test_attacked_acc", "r_bias", "artifact_ari"} <= set(compare[when])
    assert compare["before"]["artifact_ari"] >= 0.9 and compare["after"]["artifact_ari"] <= 0.2
    with open_page(tmp_path / "compare.html") as (page, log):
        wait_for_plots(page)
        assert page.evaluate("document.querySelectorAll('.js-plotly-plot').length") == 2
        assert page.evaluate("document.images.length") >= 4 * 6 and undecoded_images(page) == []
        assert log.errors == [] and log.blocked == [] and log.dialogs == []
