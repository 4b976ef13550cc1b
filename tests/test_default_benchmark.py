"""The built-in benchmark end to end (prepare, train, attribute, spray, report), with and without the planted stamp.

With the stamp the model must learn the shortcut and SpRAy must find it; without it nothing may be flagged.
About two minutes per configuration on two CPU cores; the runs are session fixtures (conftest.py) that the
browser tests of the report share.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml


@pytest.mark.slow
def test_default_benchmark_teaches_the_shortcut(poisoned):
    metrics = poisoned["train"]
    assert metrics["test_clean_acc"] > 0.75, "the task is learnable"
    assert metrics["test_clean_acc"] - metrics["test_attacked_acc"] >= 0.20
    assert metrics["attacked_predicted_as_poisoned"] > 0.3


@pytest.mark.slow
def test_spray_finds_the_planted_cue(poisoned):
    metrics = poisoned["spray"]
    assert metrics["artifact_ari"] >= 0.9 and metrics["artifact_rank"] == 1
    samples = pd.read_parquet(poisoned["dir"] / "spray" / "samples.parquet")
    assert {"sample_id", "label", "cluster", "ch_rank"} <= set(samples.columns)
    classes = yaml.safe_load((poisoned["dir"] / "spray" / "classes.json").read_text())
    assert classes["triangle"]["n_clusters"] >= 2
    clusters = pd.read_parquet(poisoned["dir"] / "spray" / "clusters.parquet")
    top = clusters.iloc[0]
    assert top.class_name == "triangle" and top.flagged and clusters.flagged.sum() == 1
    members = yaml.safe_load(
        (poisoned["dir"] / "spray" / "members" / f"triangle__cluster{top.cluster}.json").read_text()
    )
    assert len(members["sample_ids"]) == top["size"] and all(
        s.startswith("train/triangle/") for s in members["sample_ids"]
    )
    assert (samples.ch_rank[samples.sample_id.isin(members["sample_ids"])] == 1).all()


@pytest.mark.slow
def test_no_false_alarm_without_the_stamp(clean):
    metrics = clean["spray"]
    assert metrics["n_flagged"] == 0, f"top cluster {metrics['top_cluster']} scored {metrics['top_ch_score']:.3f}"
    assert np.isfinite(metrics["top_ch_score"])
