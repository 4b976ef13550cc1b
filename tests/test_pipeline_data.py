"""The built-in benchmark (deterministic, exact ground truth) and user ImageFolder trees (clear errors)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.datasets import DataError, index_imagefolder, load_dataset, load_images, write_builtin
from pipeline.synthetic import (
    ARTIFACT_KINDS,
    CLASSES,
    PIXEL_KINDS,
    Artifact,
    ArtifactPainter,
    BenchmarkConfig,
    render_split,
    stamp_pattern,
)

PER_CLASS = {"train": 20, "val": 4, "test": 6}
TINY = BenchmarkConfig(per_class=PER_CLASS, artifacts=(Artifact("triangle", "stamp", 0.5),))


def test_generation_is_deterministic_for_a_seed():
    a, b = render_split("train", TINY), render_split("train", TINY)
    assert all(np.array_equal(x.image, y.image) and x.stamped == y.stamped for x, y in zip(a, b))
    other = render_split("train", BenchmarkConfig(seed=1, per_class=PER_CLASS, artifacts=TINY.artifacts))
    assert not np.array_equal(a[0].image, other[0].image)


def test_only_the_poisoned_class_is_stamped_in_train():
    samples = render_split("train", TINY)
    poisoned = CLASSES.index("triangle")
    assert not any(s.stamped for s in samples if s.label != poisoned)
    assert 0 < sum(s.stamped for s in samples if s.label == poisoned) < TINY.per_class["train"]
    assert not any(s.stamped for s in render_split("test_clean", TINY))
    assert all(s.stamped for s in render_split("test_attacked", TINY))


def test_stamp_mask_covers_exactly_the_stamp():
    """The test splits share objects and backgrounds: attacked minus clean differs only under the stamp mask,
    and there the image is the stamp pattern."""
    clean, attacked = render_split("test_clean", TINY), render_split("test_attacked", TINY)
    pattern = (stamp_pattern(TINY.artifact_size) * 255).round().astype(np.uint8)
    size = TINY.image_size
    for c, a in zip(clean, attacked):
        assert c.label == a.label and not c.artifact_mask.any()
        changed = (c.image != a.image).any(-1)
        assert not (changed & ~a.artifact_mask).any(), "pixels changed outside the stamp mask"
        rows, cols = np.nonzero(a.artifact_mask)
        assert a.artifact_mask.sum() == TINY.artifact_size**2
        patch = a.image[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert (patch == pattern[..., None]).all()
        assert rows.max() >= size - 8 and cols.min() <= 8, "near the bottom-left corner"
        assert 0.01 < a.artifact_mask.mean() < 0.05, "a few percent of the image"
        assert a.object_mask.any() and not (a.object_mask & a.artifact_mask).any()


@pytest.mark.parametrize("kind", ARTIFACT_KINDS)
def test_every_artifact_kind_changes_exactly_its_mask(kind):
    """attacked minus clean differs only under the artifact mask, the mask has the kind's footprint, and a
    pixel-visible artifact keeps off the object mask."""
    config = BenchmarkConfig(per_class={"train": 4, "val": 1, "test": 6}, artifacts=(Artifact("star", kind, 1.0),))
    clean, attacked = render_split("test_clean", config), render_split("test_attacked", config)
    shares = []
    for c, a in zip(clean, attacked):
        changed = (c.image != a.image).any(-1)
        assert changed.any() and not (changed & ~a.artifact_mask).any(), kind
        assert a.stamped and a.artifact == kind and not c.stamped
        shares.append(a.artifact_mask.mean())
        if kind in PIXEL_KINDS:
            assert not (a.object_mask & a.artifact_mask).any()
        else:
            assert a.object_mask.any()
    footprint = {"stamp": (0.01, 0.05), "watermark": (0.005, 0.08), "frame": (0.1, 0.14), "noise_patch": (0.01, 0.05),
                 "tint": (1.0, 1.0), "background": (0.5, 0.95)}[kind]  # fmt: skip
    assert footprint[0] <= np.mean(shares) <= footprint[1], (kind, np.mean(shares))
    if kind in ("watermark", "noise_patch"):  # placed at random: the masks differ between images
        assert len({a.artifact_mask.tobytes() for a in attacked}) > 1


def test_the_noise_patch_sits_beside_the_object_and_still_lands_when_there_is_no_room():
    """On the object the patch would measure occlusion, not the shortcut; with no free place it covers the least."""
    size, side = 64, 10
    painter = ArtifactPainter("noise_patch", size, side, key=(0,))
    yy, xx = np.mgrid[0:size, 0:size]
    coverage = ((yy - 30) ** 2 + (xx - 34) ** 2 <= 18**2).astype(float)  # a large disk, room only in the corners
    image = np.zeros((size, size, 3))
    places = set()
    for seed in range(40):
        _, mask = painter(image, coverage, np.random.default_rng(seed))
        assert mask.sum() == side * side and not (mask & (coverage > 0)).any()
        places.add(mask.tobytes())
    assert len(places) > 10  # still a random place
    full = np.ones((size, size))
    full[50:62, 2:14] = 0  # one free spot
    _, mask = painter(image, full, np.random.default_rng(0))
    assert mask.sum() == side * side  # no free draw need exist: the least-covering one of them is taken


def test_two_artifacts_on_two_classes_each_get_an_attacked_split():
    config = BenchmarkConfig(per_class=PER_CLASS, artifacts=(Artifact("triangle", "stamp", 0.5),
                                                             Artifact("disk", "frame", 0.5)))  # fmt: skip
    assert config.splits[-1] == "test_attacked_disk"
    train = render_split("train", config)
    kinds = {(CLASSES[s.label], s.artifact) for s in train if s.stamped}
    assert kinds == {("triangle", "stamp"), ("disk", "frame")}
    assert all(s.artifact == "frame" for s in render_split("test_attacked_disk", config))
    with pytest.raises(ValueError, match="one artifact per class"):
        BenchmarkConfig(artifacts=(Artifact("disk", "stamp"), Artifact("disk", "frame")))
    with pytest.raises(ValueError, match="kind 'sticker' is not one of"):
        Artifact("disk", "sticker")


def test_builtin_manifest_and_files(tmp_path):
    dataset = write_builtin(tmp_path, TINY, progress=False)
    manifest = dataset.manifest
    assert list(manifest.split.unique()) == ["train", "val", "test_clean", "test_as_trained", "test_attacked"]
    assert len(manifest) == 6 * (20 + 4 + 3 * 6)
    row = manifest[manifest.artifact].iloc[0]
    stamp = np.asarray(Image.open(tmp_path / row.artifact_mask)) > 0
    assert stamp.sum() == TINY.artifact_size**2
    assert (tmp_path / row.sample_id).is_file() and row.sample_id.startswith(f"{row.split}/{row.class_name}/")
    again = load_dataset(tmp_path)
    assert (
        again.classes == list(CLASSES) and again.poisoned_class == "triangle" and len(again.manifest) == len(manifest)
    )
    planted = {"class": "triangle", "kind": "stamp", "fraction": 0.5, "attacked_split": "test_attacked"}
    assert again.artifacts == [planted]
    assert set(manifest.artifact_kind.dropna()) == {"stamp"}
    images = load_images(again.root, manifest.path[:3], 64)
    assert images.shape == (3, 3, 64, 64) and images.dtype == np.uint8


def test_builtin_data_is_the_same_whether_its_splits_render_in_one_process_or_several(tmp_path):
    one = write_builtin(tmp_path / "one", TINY, progress=False, workers=1)
    two = write_builtin(tmp_path / "two", TINY, progress=False, workers=2)
    pd.testing.assert_frame_equal(one.manifest, two.manifest)
    for relative in [*one.manifest.path, *one.manifest.artifact_mask.dropna(), *one.manifest.object_mask]:
        assert (tmp_path / "one" / relative).read_bytes() == (tmp_path / "two" / relative).read_bytes(), relative


def _tree(root, counts):
    rng = np.random.default_rng(0)
    for split, per_class in counts.items():
        for name, n in per_class.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_imagefolder_tree_is_indexed_with_a_seeded_validation_split(tmp_path):
    _tree(tmp_path / "data", {"train": {"cat": 10, "dog": 10}, "test": {"cat": 2, "dog": 3}})
    dataset = index_imagefolder(tmp_path / "data", tmp_path / "prepared", val_fraction=0.2, seed=0, progress=False)
    counts = dataset.manifest.split.value_counts().to_dict()
    assert counts == {"train": 16, "val": 4, "test": 5}
    assert dataset.classes == ["cat", "dog"] and dataset.manifest.sample_id.iloc[0] == "train/cat/0.png"
    again = index_imagefolder(tmp_path / "data", tmp_path / "prepared2", val_fraction=0.2, seed=0, progress=False)
    assert again.manifest.equals(dataset.manifest)
    images = load_images(dataset.root, dataset.manifest.path[:2], 16)
    assert images.shape == (2, 3, 16, 16)


def test_truncated_image_fails_naming_the_file(tmp_path):
    _tree(tmp_path / "data", {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}})
    broken = tmp_path / "data" / "train" / "b" / "1.png"
    broken.write_bytes(broken.read_bytes()[:60])
    with pytest.raises(DataError, match=r"cannot read image .*train/b/1\.png"):
        index_imagefolder(tmp_path / "data", tmp_path / "prepared", progress=False)


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({"train": {"a": 1}}, r"needs train/ and test/ .*missing \['test'\]"),
        ({"train": {"a": 1}, "test": {"a": 1, "z": 1}}, r"class folders not in train/: \['z'\]"),
        ({"train": {"a": 1, "b": 0}, "test": {"a": 1, "b": 1}}, r"no images for class folders \['train/b'\]"),
    ],
)
def test_bad_trees(tmp_path, layout, message):
    _tree(tmp_path / "data", layout)
    with pytest.raises(DataError, match=message):
        index_imagefolder(tmp_path / "data", tmp_path / "prepared", progress=False)


def test_missing_prepared_data_says_what_to_run(tmp_path):
    with pytest.raises(DataError, match="run the prepare stage first"):
        load_dataset(tmp_path)


def test_user_imagefolder_goes_through_prepare_and_train(tmp_path):
    from pipeline import stages

    _tree(tmp_path / "mydata", {"train": {"cat": 12, "dog": 12}, "test": {"cat": 3, "dog": 3}})
    params = {
        "data": {"root": str(tmp_path / "mydata"), "image_size": 32},
        "train": {"epochs": 1, "batch_size": 8},
    }
    dataset = stages.prepare(params, tmp_path / "prepared", progress=False)
    assert dataset.source == "imagefolder"
    metrics = stages.train(
        params, tmp_path / "prepared", tmp_path / "m.pt", tmp_path / "m.json", tmp_path / "c.csv", progress=False
    )
    assert 0 <= metrics["test_acc"] <= 1 and set(metrics["per_class_acc"]["test"]) == {"cat", "dog"}
    assert "test_attacked_acc" not in metrics  # the stamp splits exist only for the built-in data


def test_prepare_fingerprints_the_tree_and_links_the_builtin_data(tmp_path):
    """The fingerprint changes with any image's content; a generated built-in tree is prepared in place."""
    from pipeline import stages

    _tree(tmp_path / "data", {"train": {"a": 3, "b": 3}, "test": {"a": 1, "b": 1}})
    params = {"data": {"root": str(tmp_path / "data")}}
    first = json.loads((stages.prepare(params, tmp_path / "p1", progress=False), tmp_path / "p1")[1].joinpath(
        "dataset.json").read_text())["fingerprint"]  # fmt: skip
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(tmp_path / "data" / "train" / "a" / "0.png")
    stages.prepare(params, tmp_path / "p2", progress=False)
    assert json.loads((tmp_path / "p2" / "dataset.json").read_text())["fingerprint"] != first

    builtin = {"data": {"root": str(tmp_path / "builtin")},
               "builtin": {"per_class_train": 2, "per_class_val": 1, "per_class_test": 1}}  # fmt: skip
    assert stages.generate_builtin(builtin, tmp_path / "elsewhere", progress=False) is None
    stages.generate_builtin(builtin, tmp_path / "builtin", progress=False)
    dataset = stages.prepare(builtin, tmp_path / "prepared", progress=False)
    assert dataset.source == "builtin" and dataset.root.resolve() == (tmp_path / "builtin").resolve()
    assert json.loads((tmp_path / "prepared" / "dataset.json").read_text())["root"] == "../builtin"
    assert load_images(dataset.root, dataset.manifest.path[:1], 64).shape == (1, 3, 64, 64)
