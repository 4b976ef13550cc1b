"""Models by name, safe checkpoints, deterministic training, the CLI, and the planted shortcut on the default."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import lrp_core
from pipeline.models import ARCHITECTURES, CheckpointError, build_model, load_checkpoint
from pipeline.training import Normalizer, TrainConfig, inference_copy, train_model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_builds_and_is_explainable(arch):
    model = build_model(arch, num_classes=6).eval()
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 6)
    relevance = lrp_core.attribute(model, x, torch.tensor([0, 5]))
    assert relevance.shape == x.shape and torch.isfinite(relevance).all()


def test_checkpoint_round_trip(tmp_path):
    model = build_model("small_cnn", 6)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    loaded = build_model("small_cnn", 6, tmp_path / "model.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "wrapped.pt")
    build_model("small_cnn", 6, tmp_path / "wrapped.pt")


def test_mismatched_checkpoint_names_what_differs(tmp_path):
    torch.save(build_model("small_cnn", 6).state_dict(), tmp_path / "six.pt")
    with pytest.raises(CheckpointError, match=r"does not fit model small_cnn: shape mismatch \['17.bias: \(6,\)"):
        build_model("small_cnn", 4, tmp_path / "six.pt")
    with pytest.raises(CheckpointError, match=r"does not fit model resnet18: missing \[.*unexpected"):
        build_model("resnet18", 6, tmp_path / "six.pt")


def test_unsafe_or_missing_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(build_model("small_cnn", 6), tmp_path / "nope.pt")
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(subprocess.Popen))
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_checkpoint(build_model("small_cnn", 6), tmp_path / "evil.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        load_checkpoint(build_model("small_cnn", 6), tmp_path / "list.pt")


def test_unknown_architecture():
    with pytest.raises(ValueError, match="unknown model.arch 'alexnet'; choose one of"):
        build_model("alexnet", 3)


def test_training_is_deterministic():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (64, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 3, 64)
    histories = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model("small_cnn", 3)
        _, history = train_model(
            model,
            (images, labels),
            (images[:16], labels[:16]),
            Normalizer([0.5] * 3, [0.25] * 3),
            TrainConfig(epochs=2, batch_size=16),
            progress=False,
        )
        histories.append(history)
    assert histories[0] == histories[1]


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18"])
def test_the_inference_copy_folds_batch_norm_and_gives_the_same_outputs(arch):
    torch.manual_seed(0)
    model = build_model(arch, 6)
    for module in model.modules():  # BatchNorm statistics that are not the identity, so the fold matters
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    fast = inference_copy(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the model itself is untouched
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_model_torch_fx_cannot_trace_is_used_as_it_is():
    class Branching(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.linear(x) if x.sum() > 0 else -self.linear(x)  # data-dependent: not traceable

    model = Branching().train()
    assert inference_copy(model) is model and not model.training


def test_normalizer_follows_the_images_device():
    # the attribute stage moves uint8 batches to the GPU before normalising: the constants must follow them
    # ("meta" stands in for "cuda" on a machine without one: mixing devices fails the same way)
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8, device="meta")
    out = Normalizer([0.5] * 3, [0.25] * 3)(images)
    assert out.device.type == "meta" and out.shape == (2, 3, 4, 4) and out.dtype == torch.float32


def test_cli_help_and_one_line_errors(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--metrics-out" in out.stdout and "--params" in out.stdout
    (tmp_path / "params.yaml").write_text("data:\n  root: /does/not/exist\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "prepare",
            "--params",
            str(tmp_path / "params.yaml"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: data.root /does/not/exist is not a directory"
    (tmp_path / "params.yaml").write_text("train:\n  epoch: 3\n")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", "--params", str(tmp_path / "params.yaml")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2 and "unknown keys in params section 'train': ['epoch']" in result.stderr
