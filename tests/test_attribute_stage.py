"""The attribute stage: store contents equal lrp_core, resumption after a crash, Dask workers, bad inputs, export."""

from __future__ import annotations

import json
import re

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import zarr

import lrp_core
from lrp_core import composites
from pipeline import stages
from pipeline.attribute import AttributionError, run_attribute
from pipeline.datasets import load_dataset, load_images
from pipeline.export import export_virelay
from pipeline.models import build_model
from pipeline.relevance_store import RelevanceStore, file_sha256, sum_pool_matrix

PARAMS = {
    "data": {"image_size": 48},
    "builtin": {"per_class_train": 7, "per_class_val": 2, "per_class_test": 2, "artifact_size": 8},
    "attribute": {"batch_size": 4, "block_batches": 2, "pooled_size": 20, "threads": 1},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("attribute")
    stages.prepare(PARAMS, root / "prepared", progress=False)
    torch.manual_seed(0)
    model = build_model("small_cnn", 6)
    for module in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 2.0)
            module.running_mean.uniform_(-0.2, 0.2)
    torch.save(model.state_dict(), root / "model.pt")
    reference = root / "reference"
    table = run_attribute(PARAMS, root / "prepared", root / "model.pt", reference, progress=False)
    return root, reference, table


def _arrays(store_dir):
    group = RelevanceStore(store_dir).open()
    return {name: group[name][:] for name in ("heatmap", "pooled", "logits")}


def test_store_equals_a_direct_lrp_core_call(setup):
    root, reference, table = setup
    dataset = load_dataset(root / "prepared")
    rows = dataset.split("train").reset_index(drop=True)
    assert len(table) == len(rows) == 42 and table.sample_id.tolist() == rows.sample_id.tolist()
    model = build_model("small_cnn", 6, root / "model.pt").eval()
    images = torch.from_numpy(load_images(dataset.root, rows.path, 48)).float() / 255
    x = (images - 0.5) / 0.25
    direct = lrp_core.explain(
        model, x, torch.tensor(rows.label.to_numpy()), composite=composites.EpsilonPlusFlat(), latent=["8", "12"],
        latent_pool=("sum", "max"),  # attribute.latent_pool's default
    )  # fmt: skip
    heat = direct.relevance.sum(1)
    arrays = _arrays(reference)
    torch.testing.assert_close(torch.from_numpy(arrays["heatmap"]), heat.half(), rtol=2e-3, atol=1e-4)
    pool = torch.as_tensor(sum_pool_matrix(48, 20), dtype=torch.float32)
    torch.testing.assert_close(torch.from_numpy(arrays["pooled"]), pool @ heat @ pool.T, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(arrays["logits"]), direct.output, rtol=1e-5, atol=1e-5)
    # the stage computes in channels-last layout on CPU: float sums in another order, so the tolerance of a sum
    # that cancels is relative to the sum of magnitudes
    scale = float(heat.abs().flatten(1).sum(1).max())
    np.testing.assert_allclose(
        table.relevance_sum, heat.flatten(1).sum(1).double().numpy(), rtol=1e-5, atol=1e-6 * scale
    )
    np.testing.assert_allclose(arrays["pooled"].sum((1, 2)), table.relevance_sum, rtol=1e-4)
    assert (table.correct == (table.prediction == table.label)).all()
    latent = RelevanceStore(reference).latent()  # attribute.latent_layers "auto": two thirds up and the last conv
    blocks = [("8:sum", (42, 128)), ("8:max", (42, 128)), ("12:sum", (42, 128)), ("12:max", (42, 128))]
    assert [(name, layer.shape) for name, layer in latent] == blocks
    for name, layer in latent:
        path, pool = name.split(":")
        expected = direct.latent[path][:, ("sum", "max").index(pool)]
        torch.testing.assert_close(torch.from_numpy(layer), expected, rtol=1e-4, atol=1e-5)
    attrs = zarr.open_group(reference / "relevance.zarr", mode="r").attrs
    assert attrs["model_sha256"] == file_sha256(root / "model.pt") and attrs["composite"] == "epsilon_plus_flat"
    assert attrs["complete"] and attrs["target"] == "label" and attrs["code_version"].startswith("lrp_core-")
    assert attrs["latent_pool"] == ["sum", "max"]


def test_pooling_conserves_relevance_for_any_sizes():
    for n_in, n_out in [(48, 20), (64, 32), (7, 3), (5, 5)]:
        matrix = sum_pool_matrix(n_in, n_out)
        np.testing.assert_allclose(matrix.sum(0), 1.0)
        r = np.random.default_rng(0).normal(size=(n_in, n_in))
        assert np.isclose((matrix @ r @ matrix.T).sum(), r.sum())


class Crash(RuntimeError):
    pass


def test_resume_after_a_crash_gives_the_same_store(setup):
    root, reference, _ = setup
    out = root / "crashed"

    def crash_after_two(block):
        if block == 1:
            raise Crash("simulated kill")

    with pytest.raises(Crash):
        run_attribute(PARAMS, root / "prepared", root / "model.pt", out, progress=False, on_block=crash_after_two)
    committed = sorted(int(p.stem.split("-")[1]) for p in (out / "parts").iterdir())
    assert committed and committed == list(range(len(committed))) and len(committed) < 6
    with pytest.raises(RuntimeError, match="incomplete"):
        RelevanceStore(out).open()
    # a half-written shard of an uncommitted block (as SIGKILL during the write would leave) is never trusted
    shard = out / "relevance.zarr" / "heatmap" / "c" / str(len(committed)) / "0" / "0"
    shard.parent.mkdir(parents=True, exist_ok=True)
    shard.write_bytes(b"half a shard")
    run_attribute(PARAMS, root / "prepared", root / "model.pt", out, progress=False)
    expected, actual = _arrays(reference), _arrays(out)
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
    pd.testing.assert_frame_equal(RelevanceStore(out).table(), RelevanceStore(reference).table())


def test_a_changed_setting_starts_afresh(setup):
    root, reference, _ = setup
    out = root / "changed"
    run_attribute(PARAMS, root / "prepared", root / "model.pt", out, progress=False)
    params = PARAMS | {"attribute": PARAMS["attribute"] | {"target": "prediction"}}
    table = run_attribute(params, root / "prepared", root / "model.pt", out, progress=False)
    assert (table.target == table.prediction).all()
    assert zarr.open_group(out / "relevance.zarr", mode="r").attrs["target"] == "prediction"


def test_two_dask_workers_give_the_same_store(setup):
    root, reference, _ = setup
    params = PARAMS | {"attribute": PARAMS["attribute"] | {"workers": 2}}
    run_attribute(params, root / "prepared", root / "model.pt", root / "dask", progress=False)
    expected, actual = _arrays(reference), _arrays(root / "dask")
    for name in expected:
        np.testing.assert_allclose(
            actual[name].astype(np.float64), expected[name].astype(np.float64), rtol=1e-3, atol=1e-5, err_msg=name
        )
    pd.testing.assert_frame_equal(
        RelevanceStore(root / "dask").table().drop(columns=["explained_logit", "relevance_sum"]),
        RelevanceStore(reference).table().drop(columns=["explained_logit", "relevance_sum"]),
    )


def test_a_split_without_some_class_is_refused(setup, tmp_path):
    root, _, _ = setup
    prepared = tmp_path / "prepared"
    dataset = load_dataset(root / "prepared")
    manifest = dataset.manifest[~((dataset.manifest.split == "train") & (dataset.manifest.class_name == "ring"))]
    prepared.mkdir()
    manifest.to_parquet(prepared / "manifest.parquet", index=False)
    description = json.loads((root / "prepared" / "dataset.json").read_text())
    description["root"] = str(dataset.root)
    (prepared / "dataset.json").write_text(json.dumps(description))
    with pytest.raises(AttributionError, match=r"split 'train' has no samples of classes \['ring'\]"):
        run_attribute(PARAMS, prepared, root / "model.pt", tmp_path / "out", progress=False)


def test_nan_in_the_model_output_names_the_samples(setup, tmp_path):
    root, _, _ = setup
    state = torch.load(root / "model.pt", weights_only=True)
    state["17.bias"][2] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(AttributionError, match=r"LRP failed on samples \['train/disk/00000.png'.*NaN or inf"):
        run_attribute(PARAMS, root / "prepared", tmp_path / "nan.pt", tmp_path / "out", progress=False)


def test_missing_model_says_what_to_run(setup, tmp_path):
    root, _, _ = setup
    with pytest.raises(FileNotFoundError, match="run the train stage first"):
        run_attribute(PARAMS, root / "prepared", tmp_path / "none.pt", tmp_path / "out", progress=False)


def test_virelay_export_has_the_documented_layout(setup, tmp_path):
    root, reference, table = setup
    files = export_virelay(reference, root / "prepared", tmp_path, name="tiny")
    assert [f.name for f in files] == ["tiny.input.h5", "tiny-epsilon_plus_flat.attribution.h5", "label-map.json"]
    with h5py.File(files[0]) as fh:
        assert fh["data"].shape == (42, 3, 48, 48) and fh["data"].dtype == np.float32
        assert fh["data"][:].max() <= 1.0 and (fh["label"][:] == table.label.to_numpy()).all()
    with h5py.File(files[1]) as fh:
        assert fh["attribution"].shape == (42, 1, 48, 48) and fh["index"].dtype == np.uint32
        assert fh["label"].shape == fh["prediction"].shape == (42, 6)
        np.testing.assert_allclose(fh["label"][:].sum(1), table.explained_logit, rtol=1e-5)
    label_map = json.loads(files[2].read_text())
    assert label_map[3] == {"index": 3, "word_net_id": "triangle", "name": "triangle"}


def test_sigkill_mid_run_then_resume(tmp_path):
    """A real `kill -9` of the stage process; the rerun resumes and ends with the store of an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    params = PARAMS | {
        "builtin": PARAMS["builtin"] | {"per_class_train": 40},
        "attribute": PARAMS["attribute"] | {"batch_size": 2, "block_batches": 1},
    }
    stages.prepare(params, tmp_path / "prepared", progress=False)
    torch.manual_seed(1)
    torch.save(build_model("small_cnn", 6).state_dict(), tmp_path / "model.pt")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "attribute",
        "--params",
        str(tmp_path / "params.yaml"),
        "--data",
        str(tmp_path / "prepared"),
        "--model",
        str(tmp_path / "model.pt"),
        "--out",
        str(tmp_path / "killed"),
        "--no-progress",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    parts = tmp_path / "killed" / "parts"
    deadline = time.time() + 120
    while time.time() < deadline and (not parts.exists() or len(list(parts.iterdir())) < 5):
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = len(list(parts.iterdir()))
    assert 5 <= done < 120, f"the kill must land mid-run ({done} of 120 blocks were done)"
    subprocess.run(command, check=True, capture_output=True)
    run_attribute(params, tmp_path / "prepared", tmp_path / "model.pt", tmp_path / "clean", progress=False)
    expected, actual = _arrays(tmp_path / "clean"), _arrays(tmp_path / "killed")
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
    pd.testing.assert_frame_equal(
        RelevanceStore(tmp_path / "killed").table(), RelevanceStore(tmp_path / "clean").table()
    )


def test_a_dying_dask_worker_has_its_task_rerun(setup, tmp_path, monkeypatch):
    from pipeline.scaleout import CHAOS_BLOCK, CHAOS_MARKER

    root, reference, _ = setup
    marker = tmp_path / "killed-once"
    monkeypatch.setenv(CHAOS_BLOCK, "2")
    monkeypatch.setenv(CHAOS_MARKER, str(marker))
    params = PARAMS | {"attribute": PARAMS["attribute"] | {"workers": 2}}
    table = run_attribute(params, root / "prepared", root / "model.pt", tmp_path / "out", progress=False)
    assert marker.exists(), "a worker really died while computing block 2"
    assert len(table) == 42
    np.testing.assert_allclose(_arrays(tmp_path / "out")["pooled"], _arrays(reference)["pooled"], rtol=1e-3, atol=1e-5)


def test_an_unknown_latent_pool_is_refused_before_any_work(setup, tmp_path):
    root, _, _ = setup
    for bad in ("mean", [], ["max", "max"]):
        params = {**PARAMS, "attribute": {**PARAMS["attribute"], "latent_pool": bad}}
        with pytest.raises(
            AttributionError, match=rf"latent_pool must be one of .* distinct ones; got {re.escape(repr(bad))}"
        ):
            run_attribute(params, root / "prepared", root / "model.pt", tmp_path / "store", progress=False)
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("layer", ["nope", "9"])  # "9": small_cnn's BatchNorm after conv "8", merged into it
def test_a_latent_layer_lrp_does_not_explain_is_refused_before_any_work(setup, tmp_path, layer):
    root, _, _ = setup
    params = {**PARAMS, "attribute": {**PARAMS["attribute"], "latent_layers": [layer]}}
    with pytest.raises(AttributionError, match=rf"latent_layers: latent layers \['{layer}'\] are not explained .*'8'"):
        run_attribute(params, root / "prepared", root / "model.pt", tmp_path / "store", progress=False)
    assert not (tmp_path / "store").exists()
