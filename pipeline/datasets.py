"""Data sets as a manifest: one parquet row per image, for the built-in benchmark and for any ImageFolder tree.

Both go through the same code after ``prepare``: a directory holding ``manifest.parquet`` (columns
``MANIFEST_COLUMNS``) and ``dataset.json`` (root, classes, source, and for the built-in data the poisoned class).
Sample ids are image paths relative to the data root, so they mean the same thing to every later stage.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from .io import write_json, write_with
from .synthetic import CLASSES, BenchmarkConfig, attacked_split, render_split

__all__ = [
    "MANIFEST_COLUMNS",
    "IMAGE_SUFFIXES",
    "DataError",
    "Dataset",
    "write_builtin",
    "index_imagefolder",
    "is_builtin_tree",
    "link_builtin",
    "load_dataset",
    "load_images",
    "load_masks",
]

MANIFEST_COLUMNS = [
    "sample_id", "path", "split", "label", "class_name", "artifact", "artifact_kind", "artifact_mask", "object_mask"
]  # fmt: skip
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class DataError(ValueError):
    """A data problem, naming the file or folder at fault."""


@dataclass
class Dataset:
    """A prepared data set: where its images are, which classes, and its manifest."""

    root: Path
    classes: list[str]
    source: str  # "builtin" or "imagefolder"
    manifest: pd.DataFrame
    poisoned_class: str | None = None  # the first planted artifact's class (built-in data)
    artifacts: list[dict] = field(default_factory=list)  # built-in data: class, kind, fraction, attacked_split

    def split(self, name: str) -> pd.DataFrame:
        rows = self.manifest[self.manifest["split"] == name]
        if rows.empty:
            raise DataError(f"the data set has no samples in split {name!r} (splits: {self.splits})")
        return rows

    @property
    def splits(self) -> list[str]:
        return list(dict.fromkeys(self.manifest["split"]))


def _save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, optimize=False, compress_level=1)


def _write_split(out: Path, config: BenchmarkConfig, split: str) -> list[tuple]:
    """Render and save one split; its manifest rows (a split is deterministic on its own, so splits run apart)."""
    rows = []
    for index, sample in enumerate(render_split(split, config)):
        name = CLASSES[sample.label]
        sample_id = f"{split}/{name}/{index:05d}.png"
        stamp_path = f"masks/{split}/{name}/{index:05d}_stamp.png"
        object_path = f"masks/{split}/{name}/{index:05d}_object.png"
        _save_png(out / sample_id, sample.image)
        _save_png(out / stamp_path, sample.artifact_mask.astype(np.uint8) * 255)
        _save_png(out / object_path, sample.object_mask.astype(np.uint8) * 255)
        rows.append((sample_id, sample_id, split, sample.label, name, sample.stamped, sample.artifact, stamp_path,
                     object_path))  # fmt: skip
    return rows


def write_builtin(out: Path, config: BenchmarkConfig, progress: bool = True, workers: int | None = None) -> Dataset:
    """Generate the built-in benchmark under ``out`` (ImageFolder tree per split, masks, manifest).

    Splits render in ``workers`` processes (default: one per CPU core, at most one per split; 41 -> 34 s on two
    vCPUs, more on more cores). They are spawned, not forked: a caller with torch's thread pools running cannot
    deadlock them."""
    workers = min(len(config.splits), workers or os.cpu_count() or 1)
    bar = tqdm(total=len(config.splits), desc="generating built-in data", disable=not progress)
    parts = {}
    if workers <= 1:
        for split in config.splits:
            parts[split] = _write_split(out, config, split)
            bar.update()
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_write_split, out, config, split): split for split in config.splits}
            for future in as_completed(futures):
                parts[futures[future]] = future.result()
                bar.update()
    bar.close()
    rows = [row for split in config.splits for row in parts[split]]
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    artifacts = [
        {"class": a.class_name, "kind": a.kind, "fraction": a.fraction, "attacked_split": attacked_split(config, i)}
        for i, a in enumerate(config.artifacts)
    ]
    poisoned = artifacts[0]["class"] if artifacts else None
    dataset = Dataset(out, list(CLASSES), "builtin", manifest, poisoned, artifacts)
    benchmark = vars(config) | {"per_class": dict(config.per_class), "artifacts": artifacts}
    _write_description(out, dataset, {"benchmark": benchmark})
    return dataset


def _image_files(folder: Path) -> Iterable[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _check_image(path: Path) -> bytes:
    """The file's bytes once it decodes as an image (read once: decoded and fingerprinted from memory)."""
    try:
        content = path.read_bytes()
        with Image.open(io.BytesIO(content)) as image:
            image.load()
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise DataError(f"cannot read image {path}: {err}") from None
    return content


def index_imagefolder(
    root: Path, out: Path, val_fraction: float = 0.1, seed: int = 0, progress: bool = True
) -> Dataset:
    """Index a user's ``root/{train,test}/<class>/*`` tree (``val/`` optional: else carved from train)."""
    root = Path(root)
    if not root.is_dir():
        hint = " (the built-in data is written there by `spray-audit builtin`, dvc's first stage)"
        raise DataError(f"data.root {root} is not a directory{hint if root.name == 'builtin' else ''}")
    missing = [s for s in ("train", "test") if not (root / s).is_dir()]
    if missing:
        raise DataError(f"data.root {root} needs train/ and test/ folders of class folders; missing {missing}")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{root / 'train'} has no class folders")
    rows = []
    splits = ["train", "test"] + (["val"] if (root / "val").is_dir() else [])
    files = [
        (split, label, path)
        for split in splits
        for label, name in enumerate(classes)
        for path in _image_files(root / split / name)
    ]
    for split in splits:
        extra = sorted(p.name for p in (root / split).iterdir() if p.is_dir() and p.name not in classes)
        if extra:
            raise DataError(f"{root / split} has class folders not in train/: {extra}")
    fingerprint = hashlib.sha256()
    for split, label, path in tqdm(files, desc="checking images", disable=not progress):
        rel = path.relative_to(root).as_posix()
        fingerprint.update(rel.encode() + b"\0" + hashlib.sha256(_check_image(path)).digest())
        rows.append((rel, rel, split, label, classes[label], False, None, None, None))
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    empty = [
        f"{s}/{c}"
        for s in ("train", "test")
        for c in classes
        if manifest[(manifest.split == s) & (manifest.class_name == c)].empty
    ]
    if empty:
        raise DataError(f"no images for class folders {empty} under {root}")
    if "val" not in splits:
        manifest = _carve_validation(manifest, val_fraction, seed)
    dataset = Dataset(root.resolve(), classes, "imagefolder", manifest)
    extra = {"val_fraction": val_fraction, "seed": seed, "fingerprint": fingerprint.hexdigest()}
    _write_description(out, dataset, extra)
    return dataset


def is_builtin_tree(root: Path) -> bool:
    """Whether ``root`` holds a generated built-in benchmark (its own manifest says so)."""
    description = Path(root) / "dataset.json"
    return description.is_file() and json.loads(description.read_text()).get("source") == "builtin"


def link_builtin(root: Path, out: Path) -> Dataset:
    """Prepare a generated built-in benchmark: its manifest, with the root recorded relative to ``out``."""
    dataset = load_dataset(root)
    extra = {k: v for k, v in json.loads((Path(root) / "dataset.json").read_text()).items() if k == "benchmark"}
    relative = os.path.relpath(Path(root).resolve(), Path(out).resolve())
    _write_description(out, dataset, extra, root_text=Path(relative).as_posix())
    return load_dataset(out)


def _carve_validation(manifest: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """Move a seeded, per-class ``fraction`` of train to val (at least one sample per class when possible)."""
    rng = np.random.default_rng(seed)
    manifest = manifest.copy()
    for label in sorted(manifest.label.unique()):
        index = manifest.index[(manifest.split == "train") & (manifest.label == label)].to_numpy()
        n_val = min(max(1, round(fraction * len(index))), len(index) - 1) if fraction > 0 else 0
        manifest.loc[rng.permutation(index)[:n_val], "split"] = "val"
    return manifest


def _write_description(out: Path, dataset: Dataset, extra: dict, root_text: str | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_with(out / "manifest.parquet", lambda tmp: dataset.manifest.to_parquet(tmp, index=False))
    # built-in images live beside (or near) the manifest: a relative root means the same on every checkout
    if root_text is not None:
        root = root_text
    else:
        root = "." if dataset.source == "builtin" else str(Path(dataset.root).resolve())
    description = {
        "root": root,
        "classes": dataset.classes,
        "source": dataset.source,
        "poisoned_class": dataset.poisoned_class,
        "artifacts": dataset.artifacts,
        "counts": {s: int((dataset.manifest.split == s).sum()) for s in dataset.splits},
    } | extra
    write_json(out / "dataset.json", description)


def load_dataset(prepared: Path) -> Dataset:
    """The data set that ``prepare`` wrote to ``prepared``."""
    prepared = Path(prepared)
    description_path, manifest_path = prepared / "dataset.json", prepared / "manifest.parquet"
    for path in (description_path, manifest_path):
        if not path.is_file():
            raise DataError(f"{path} is missing: run the prepare stage first (spray-audit prepare)")
    description = json.loads(description_path.read_text())
    manifest = pd.read_parquet(manifest_path)
    return Dataset(
        prepared / description["root"],  # relative roots are relative to the prepared folder
        description["classes"],
        description["source"],
        manifest,
        description.get("poisoned_class"),
        description.get("artifacts", []),
    )


def load_images(root: Path, paths: Iterable[str], size: int, progress: bool = False, mode: str = "RGB") -> np.ndarray:
    """Images as one ``(N, C, size, size)`` uint8 array; a file that cannot be read raises :class:`DataError`."""
    paths = list(paths)
    channels = 3 if mode == "RGB" else 1
    out = np.empty((len(paths), channels, size, size), dtype=np.uint8)
    for i, rel in enumerate(tqdm(paths, desc="loading images", disable=not progress)):
        path = Path(root) / rel
        try:
            with Image.open(path) as image:
                image = image.convert(mode)
                if image.size != (size, size):
                    image = image.resize((size, size), Image.BILINEAR)
                array = np.asarray(image, dtype=np.uint8)
        except (OSError, UnidentifiedImageError, SyntaxError) as err:
            raise DataError(f"cannot read image {path}: {err}") from None
        out[i] = array.reshape(size, size, channels).transpose(2, 0, 1)
    return out


def load_masks(root: Path, paths: Iterable[str], size: int) -> np.ndarray:
    """Ground-truth masks (object, stamp) of the built-in benchmark as ``(N, size, size)`` bool."""
    return load_images(root, paths, size, mode="L")[:, 0] > 127
