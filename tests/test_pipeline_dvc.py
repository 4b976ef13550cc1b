"""End to end: the project copied to a temp dir and `dvc repro` run there, as a user would.

- the built-in data on a tiny configuration: repro twice (the second does nothing), then an experiment;
- a user's ImageFolder tree (the built-in shapes written as train/ and test/ class folders, with no ground truth
  in them) with a frame planted on half of one class, and the same tree without it: the first audit flags the
  frame and un-learns it, the second flags nothing and still completes (before = after); changing one image
  re-runs the pipeline from prepare. (``benchmarks/detection.py`` runs the same path on digits on photographs.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from pipeline.synthetic import CLASSES, Artifact, BenchmarkConfig, render_split

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "data": {"image_size": 48, "seed": 0},
    "builtin": {"per_class_train": 10, "per_class_val": 4, "per_class_test": 4, "artifact_size": 8},
    "train": {"epochs": 1, "batch_size": 16},
    # name a cluster to un-learn whatever the audit finds, so the unlearning loop runs for real on tiny data
    "unlearn": {"compare_methods": ["vanilla", "rrr-lrp", "p-clarc"], "cluster": ["triangle/0"]},
    # UMAP's first call compiles for ~20 s per process; the estimator tests cover it
    "spray": {"embeddings": ["tsne"]},
    "evaluate": {"methods": ["epsilon_plus_flat", "random"], "n_images": 12},
}
USER = {
    "data": {"image_size": 48, "seed": 0},
    "train": {"epochs": 10, "batch_size": 32},  # 6 left the model at ~43% (two classes at 0%): see below
    "spray": {"embeddings": ["tsne"]},
    "unlearn": {"compare_methods": []},
    "evaluate": {"methods": ["epsilon_plus_flat", "random"], "n_images": 12},
}


def _run(args, cwd, env):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def make_project(work: Path, overrides: dict) -> tuple[Path, dict, list[str]]:
    """A git repository with the project's code, DVC files and params.yaml updated by ``overrides``."""
    for name in ("lrp_core", "audits", "pipeline", ".dvc", "dvc.yaml", ".dvcignore", ".gitignore"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, work / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
        else:
            shutil.copy2(source, work / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in overrides.items():
        params[section].update(values)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.org"]
    _run(["git", "init", "-q"], work, env)
    _run([*git, "add", "-A"], work, env)
    _run([*git, "commit", "-qm", "tiny project"], work, env)
    return work, env, git


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("project"), TINY)


DVC = [sys.executable, "-m", "dvc"]


def test_repro_runs_prepare_and_train_then_skips(project):
    work, env, _ = project
    first = _run([*DVC, "repro"], work, env)
    assert "Running stage 'builtin'" in first and "Running stage 'prepare'" in first
    assert "Running stage 'train'" in first
    metrics = json.loads(_run([*DVC, "metrics", "show", "--json"], work, env))
    values = metrics[""]["data"]["metrics/train.json"]["data"]
    for key in ("test_clean_acc", "test_as_trained_acc", "test_attacked_acc"):
        assert 0.0 <= values[key] <= 1.0, key
    assert (work / "models" / "model.pt").is_file()
    assert "Running stage 'report'" in first
    for stage in ("unlearn", "attribute@cleaned", "spray@cleaned", "compare"):
        assert f"Running stage '{stage}'" in first, stage
    compare = metrics[""]["data"]["metrics/compare.json"]["data"]
    for when in ("before", "after"):
        assert {"test_clean_acc", "test_attacked_acc", "r_bias", "artifact_ari"} <= set(compare[when]), when
    assert compare["method"] == "rrr-lrp" and set(compare["methods"]) == {"vanilla", "rrr-lrp", "p-clarc"}
    assert (work / "reports" / "compare.html").read_text().startswith("<!DOCTYPE html>")
    # the report's scatter plots need the audit's embeddings; the re-audit needs clusters and flags only
    assert {"tsne_x", "tsne_y"} <= set(pd.read_parquet(work / "spray" / "original" / "samples.parquet").columns)
    assert not any(c.endswith("_x") for c in pd.read_parquet(work / "spray" / "cleaned" / "samples.parquet").columns)
    report = (work / "reports" / "audit.html").read_text()
    assert report.startswith("<!DOCTYPE html>") and "Clever-Hans candidates" in report
    assert (work / "data" / "prepared" / "manifest.parquet").is_file()
    second = _run([*DVC, "repro"], work, env)
    assert "Running stage" not in second and "up to date" in second


def test_changing_a_training_parameter_reruns_only_training(project):
    work, env, git = project
    _run([*DVC, "repro"], work, env)
    _run([*git, "add", "-A"], work, env)
    _run([*git, "commit", "-qm", "lock", "--allow-empty"], work, env)
    out = _run([*DVC, "exp", "run", "-S", "train.epochs=2", "train"], work, env)
    assert "Running stage 'train'" in out and "Running stage 'prepare'" not in out
    curve = (work / "metrics" / "train_curve.csv").read_text().strip().splitlines()
    assert len(curve) == 3  # header + 2 epochs


def write_user_tree(out: Path, fraction: float) -> pd.DataFrame:
    """The built-in shapes as a user brings them: ``train/<class>/*.png`` and ``test/<class>/*.png``, a frame on
    ``fraction`` of the triangles in train; returns the ground truth (kept outside the tree)."""
    config = BenchmarkConfig(image_size=48, per_class={"train": 150, "val": 1, "test": 30}, artifact_size=8,
                             artifacts=(Artifact("triangle", "frame", fraction),))  # fmt: skip
    rows = []
    for split, source in (("train", "train"), ("test", "test_clean")):
        for i, sample in enumerate(render_split(source, config)):
            sample_id = f"{split}/{CLASSES[sample.label]}/{i:04d}.png"
            (out / sample_id).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(sample.image).save(out / sample_id)
            rows.append((sample_id, sample.artifact or ""))
    return pd.DataFrame(rows, columns=["sample_id", "artifact"])


def _user_project(tmp_path_factory, name: str, fraction: float):
    data = tmp_path_factory.mktemp(f"{name}-data")
    truth = write_user_tree(data / "tree", fraction)
    overrides = {**USER, "data": {**USER["data"], "root": str(data / "tree")}}
    work, env, git = make_project(tmp_path_factory.mktemp(name), overrides)
    return work, env, data, truth


def test_user_data_with_a_frame_is_flagged_unlearned_and_rerun_when_an_image_changes(tmp_path_factory):
    # a model near chance splits its classes into "recognised" and "not recognised" maps with different logits,
    # which the latent view can read as a strategy (docs/spray.md, Limits): after 6 epochs (test accuracy 0.43) one
    # CI run flagged a star strategy next to the frame; 10 epochs (0.51, still improving) is the cheapest fix
    work, env, data, truth = _user_project(tmp_path_factory, "framed", 0.5)
    out = _run([*DVC, "repro"], work, env)
    assert "nan" not in out.lower().split("unlearn rrr-lrp")[-1].split("\n")[0]
    strategies = json.loads((work / "spray" / "original" / "strategies.json").read_text())["strategies"]
    flagged = [s for s in strategies if s["flagged"]]
    assert [s["class_name"] for s in flagged] == ["triangle"], strategies
    samples = pd.read_parquet(work / "spray" / "original" / "samples.parquet")
    rows = samples[samples.class_name == "triangle"]
    framed = set(truth.sample_id[truth.artifact == "frame"])
    members = set(rows.sample_id[rows.strategy == flagged[0]["strategy"]])
    assert len(members & framed) >= 0.9 * len(members)
    assert len(members & framed) >= 0.9 * len(framed & set(rows.sample_id))
    compare = json.loads((work / "metrics" / "compare.json").read_text())
    for when in ("before", "after"):
        assert set(compare[when]) == {"test_acc", "r_bias"}, compare[when]
    assert compare["after"]["r_bias"] < compare["before"]["r_bias"]
    assert compare["r_bias_on"].startswith("held-out members")
    unlearn = json.loads((work / "metrics" / "unlearn.json").read_text())
    assert unlearn["artifacts"][0]["n_held_out"] >= 1
    # the frame sits at one place with one look: its pixels, found in the images, are every member's mask
    assert unlearn["artifacts"][0]["mask_source"] == "fixed" and unlearn["artifacts"][0]["fixed_pixels"] > 0

    image = data / "tree" / "train" / "disk" / "0000.png"
    Image.fromarray(255 - np.asarray(Image.open(image))).save(image)
    status = _run([*DVC, "status"], work, env)
    assert "prepare" in status and "modified" in status
    again = _run([*DVC, "repro", "train"], work, env)  # up to train: the rest follows from the same DAG
    assert "Running stage 'prepare'" in again and "Running stage 'train'" in again


@pytest.mark.slow
def test_user_data_without_a_cue_flags_nothing_and_completes(tmp_path_factory):
    work, env, _, _ = _user_project(tmp_path_factory, "clean", 0.0)
    out = _run([*DVC, "repro"], work, env)
    assert "unlearn: nothing to un-learn" in out and "None" not in out and " nan" not in out
    assert json.loads((work / "metrics" / "spray_original.json").read_text())["n_flagged"] == 0
    compare = json.loads((work / "metrics" / "compare.json").read_text())
    assert set(compare["before"]) == {"test_acc"} and compare["before"] == compare["after"]
    page = (work / "reports" / "compare.html").read_text()
    assert "nothing to un-learn" in page.lower() and "before = after" in page
    assert "No strategy is flagged" in (work / "reports" / "audit.html").read_text()
