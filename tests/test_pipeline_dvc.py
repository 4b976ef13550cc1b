"""End to end: the project copied to a temp dir, `dvc repro` twice on a tiny configuration, then an experiment."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "data": {"image_size": 48, "seed": 0},
    "builtin": {"per_class_train": 10, "per_class_val": 4, "per_class_test": 4, "stamp_size": 8},
    "train": {"epochs": 1, "batch_size": 16},
    # flag the top cluster whatever it scores, so the unlearning loop runs for real on tiny data
    "spray": {"flag_threshold": 0.0},
    "unlearn": {"compare_methods": ["vanilla", "rrr-lrp", "p-clarc"]},
}


def _run(args, cwd, env):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    work = tmp_path_factory.mktemp("project")
    for name in ("lrp_core", "audits", "pipeline", ".dvc", "dvc.yaml", ".dvcignore", ".gitignore"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, work / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
        else:
            shutil.copy2(source, work / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
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


def test_repro_runs_prepare_and_train_then_skips(project):
    work, env, _ = project
    dvc = [sys.executable, "-m", "dvc"]
    first = _run([*dvc, "repro"], work, env)
    assert "Running stage 'prepare'" in first and "Running stage 'train'" in first
    metrics = json.loads(_run([*dvc, "metrics", "show", "--json"], work, env))
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
    report = (work / "reports" / "audit.html").read_text()
    assert report.startswith("<!DOCTYPE html>") and "Clever-Hans candidates" in report
    manifest = work / "data" / "prepared" / "manifest.parquet"
    assert manifest.is_file()
    second = _run([*dvc, "repro"], work, env)
    assert "Running stage" not in second and "up to date" in second


def test_changing_a_training_parameter_reruns_only_training(project):
    work, env, git = project
    dvc = [sys.executable, "-m", "dvc"]
    _run([*dvc, "repro"], work, env)
    _run([*git, "add", "-A"], work, env)
    _run([*git, "commit", "-qm", "lock", "--allow-empty"], work, env)
    out = _run([*dvc, "exp", "run", "-S", "train.epochs=2"], work, env)
    assert "Running stage 'train'" in out and "Running stage 'prepare'" not in out
    curve = (work / "metrics" / "train_curve.csv").read_text().strip().splitlines()
    assert len(curve) == 3  # header + 2 epochs
