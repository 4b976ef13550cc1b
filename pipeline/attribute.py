"""The ``attribute`` stage: LRP heatmaps of a whole split, streamed into a resumable relevance store.

One process: a DataLoader (worker processes, pinned memory on CUDA) feeds batches, the model explains them on the
device, and a writer thread stores each finished block while the next one is computed. Peak memory is bounded by
a block, not by the data set. With Dask (``--scheduler ADDRESS`` or ``--workers N``) every missing block becomes a
task; a worker plugin loads the model once per worker and each task writes its own whole block.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

import lrp_core

from .datasets import Dataset, load_dataset, load_images
from .models import build_model
from .params import section
from .relevance_store import TABLE_COLUMNS, RelevanceStore, StoreLayout, file_sha256, sum_pool_matrix
from .stages import DATA_DEFAULTS, MODEL_DEFAULTS
from .training import Normalizer, composite_for

__all__ = ["ATTRIBUTE_DEFAULTS", "AttributionError", "AttributionJob", "BlockComputer", "run_attribute"]

ATTRIBUTE_DEFAULTS = {
    "split": "train",  # SpRAy audits what the model learned
    "target": "label",  # or "prediction"
    "composite": "epsilon_plus_flat",
    "batch_size": 64,
    "block_batches": 4,  # batches per block: the unit of writing, resuming and Dask tasks
    "pooled_size": 32,
    "num_workers": None,  # DataLoader worker processes (None: 0 on CPU, up to 8 on CUDA, where decoding would lag)
    "device": "auto",  # auto, cpu, cuda, cuda:1, ...
    "precision": None,  # None, fp32, tf32, bf16 (see lrp_core.PRECISIONS)
    "threads": None,  # torch threads per process (None: torch's default)
    "scheduler": None,  # address of a Dask scheduler
    "workers": 0,  # >0: start a local Dask cluster with this many workers (one per GPU when there are GPUs)
    "latent_layers": "auto",  # layers whose channel relevance SpRAy's latent view uses (lrp_core.latent); [] none
    "latent_pool": ["sum", "max"],  # total and peak over positions: a spread cue and a small one (lrp_core.latent)
}
CODE_VERSION = "lrp_core-" + lrp_core.__version__


class AttributionError(ValueError):
    """A problem with the audited data or model, naming the samples or classes at fault."""


@dataclass(frozen=True)
class AttributionJob:
    """Everything a process (or Dask worker) needs to compute blocks: picklable, no tensors."""

    prepared: str
    model_path: str
    arch: str
    out: str
    split: str
    target: str
    composite: str
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pooled_size: int
    batch_size: int
    block_batches: int
    precision: str | None
    device: str
    threads: int | None
    latent_layers: tuple[str, ...] = ()
    latent_pools: tuple[str, ...] = ("sum", "max")

    def rows(self, dataset: Dataset) -> pd.DataFrame:
        return dataset.split(self.split).reset_index(drop=True)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AttributionError(f"attribute.device is {name!r} but torch sees no CUDA device")
    return device


class BlockComputer:
    """Holds the model on its device and turns image batches into store rows (one per process or Dask worker)."""

    def __init__(self, job: AttributionJob, device: torch.device | None = None):
        self.job = job
        if job.threads:
            torch.set_num_threads(job.threads)
        self.device = device or _resolve_device(job.device)
        self.dataset = load_dataset(Path(job.prepared))
        self.rows = job.rows(self.dataset)
        self.model = build_model(job.arch, len(self.dataset.classes), job.model_path).to(self.device).eval()
        # oneDNN's native layout: LRP of small_cnn 1.45x faster on two CPU cores, the same relevance to float
        # rounding; CUDA keeps the default layout (not measured there)
        self.channels_last = self.device.type == "cpu"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.normalize = Normalizer(job.mean, job.std)
        self.composite = composite_for(job.composite, self.normalize)
        self.store = RelevanceStore(job.out)
        pool_h = sum_pool_matrix(job.image_size, job.pooled_size)
        self.pool = torch.as_tensor(pool_h, dtype=torch.float32, device=self.device)

    def explain_batch(self, images: torch.Tensor, labels: torch.Tensor, start: int):
        """One batch: heatmaps (float16), pooled maps, logits and table rows."""
        x = self.normalize(images.to(self.device, non_blocking=True))
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.job.target == "label":
            target = labels.to(self.device)
        else:
            with torch.no_grad():
                target = self.model(x).argmax(1)
        try:
            explanation = lrp_core.explain(
                self.model, x, target, composite=self.composite, precision=self.job.precision,
                latent=self.job.latent_layers, latent_pool=self.job.latent_pools,
            )  # fmt: skip
        except lrp_core.LRPError as err:
            ids = self.rows.sample_id.iloc[start : start + len(images)].tolist()
            raise AttributionError(f"LRP failed on samples {ids[:5]}{' ...' if len(ids) > 5 else ''}: {err}") from err
        heat = explanation.relevance.sum(1)
        pooled = self.pool @ heat @ self.pool.T
        logits = explanation.output
        block_rows = self.rows.iloc[start : start + len(images)]
        table = pd.DataFrame(
            {
                "index": np.arange(start, start + len(images)),
                "sample_id": block_rows.sample_id.to_numpy(),
                "label": block_rows.label.to_numpy(),
                "class_name": block_rows.class_name.to_numpy(),
                "target": target.cpu().numpy(),
                "prediction": logits.argmax(1).cpu().numpy(),
                "explained_logit": logits.gather(1, target[:, None]).squeeze(1).float().cpu().numpy(),
                "relevance_sum": heat.flatten(1).sum(1).double().cpu().numpy(),
            }
        )
        table["correct"] = table.prediction == table.label
        latent = [explanation.latent[path].flatten(1) for path in self.job.latent_layers]  # (B, P * C): pool-major
        return (
            heat.to(torch.float16).cpu().numpy(),
            pooled.float().cpu().numpy(),
            logits.float().cpu().numpy(),
            table[TABLE_COLUMNS],
            torch.cat(latent, 1).float().cpu().numpy() if latent else None,
        )

    def load_block_images(self, block: int, layout: StoreLayout) -> tuple[np.ndarray, np.ndarray]:
        start, stop = layout.block_range(block)
        rows = self.rows.iloc[start:stop]
        return load_images(self.dataset.root, rows.path, self.job.image_size), rows.label.to_numpy().copy()

    def compute_block(self, block: int, layout: StoreLayout) -> int:
        """Load, explain and write one block (the Dask task body); returns its sample count."""
        images, labels = self.load_block_images(block, layout)
        start, _ = layout.block_range(block)
        parts = [
            self.explain_batch(
                torch.from_numpy(images[i : i + layout.batch_size]),
                torch.from_numpy(labels[i : i + layout.batch_size]),
                start + i,
            )
            for i in range(0, len(images), layout.batch_size)
        ]
        self.store.write_block(block, start, *_concat(parts))
        return len(images)


def _concat(parts):
    heat, pooled, logits, tables, latent = zip(*parts)
    return (
        np.concatenate(heat),
        np.concatenate(pooled),
        np.concatenate(logits),
        pd.concat(tables, ignore_index=True),
        None if latent[0] is None else np.concatenate(latent),
    )


def latent_pools(setting) -> tuple[str, ...]:
    """``attribute.latent_pool`` as a tuple of pool names, refused with the allowed names before any work."""
    from lrp_core.latent import check_pools

    try:
        return check_pools(setting)
    except ValueError as err:
        raise AttributionError(f"attribute.{err}") from None


def resolve_latent_layers(
    arch: str, n_classes: int, setting, composite=None, model_path: Path | str | None = None
) -> list[tuple[str, int]]:
    """``attribute.latent_layers`` as ``[(path, channels), ...]``: "auto" picks :func:`lrp_core.latent.latent_layers`;
    a list names layers, checked against the layers LRP explains under ``composite`` (a merged BatchNorm is not one)
    so that a bad name fails before any work; [] or null keeps none."""
    from lrp_core import explained_layers
    from lrp_core.attribution import check_latent
    from lrp_core.latent import channels_of, latent_layers

    if not setting:
        return []
    model = build_model(arch, n_classes, model_path).eval()
    if setting == "auto":
        paths = latent_layers(model)
    elif isinstance(setting, (list, tuple)) and all(isinstance(p, str) for p in setting):
        paths = list(setting)
    else:
        raise AttributionError(f"attribute.latent_layers must be 'auto', a list of layer paths or []; got {setting!r}")
    try:
        check_latent(paths, explained_layers(model, composite))
        return [(path, channels_of(model, path)) for path in paths]
    except ValueError as err:
        raise AttributionError(f"attribute.latent_layers: {err}") from None


class _SplitImages(torch.utils.data.Dataset):
    """Images of the audited split by position, for the DataLoader's worker processes."""

    def __init__(self, root: Path, paths: list[str], labels: np.ndarray, size: int):
        self.root, self.paths, self.labels, self.size = root, paths, labels, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = load_images(self.root, [self.paths[index]], self.size)[0]
        return torch.from_numpy(image), int(self.labels[index])


def _run_local(
    computer: BlockComputer,
    layout: StoreLayout,
    blocks: list[int],
    num_workers: int,
    progress: bool,
    on_block: Callable[[int], None] | None,
) -> None:
    """Stream the missing blocks through one process: loading, compute and writing overlap."""
    indices = [i for b in blocks for i in range(*layout.block_range(b))]
    rows = computer.rows
    loader = torch.utils.data.DataLoader(
        _SplitImages(computer.dataset.root, rows.path.tolist(), rows.label.to_numpy(), computer.job.image_size),
        batch_size=layout.batch_size,
        sampler=indices,
        num_workers=num_workers,
        pin_memory=computer.device.type == "cuda",
    )
    writer = ThreadPoolExecutor(max_workers=1)
    pending: list[Future] = []
    bar = tqdm(total=len(indices), desc="attribute", unit="img", disable=not progress)
    position, parts, block_iter = 0, [], iter(blocks)
    block = next(block_iter, None)
    try:
        for images, labels in loader:
            start = indices[position]
            parts.append(computer.explain_batch(images, labels, start))
            position += len(images)
            bar.update(len(images))
            block_start, block_stop = layout.block_range(block)
            if start + len(images) == block_stop:
                # hand the finished block to the writer; keep at most one more in flight (memory bound)
                while len(pending) >= 2:
                    pending.pop(0).result()
                pending.append(writer.submit(_write, computer.store, block, block_start, _concat(parts), on_block))
                parts, block = [], next(block_iter, None)
        for future in pending:
            future.result()
    finally:
        writer.shutdown(wait=True)
        bar.close()


def _write(store: RelevanceStore, block: int, start: int, payload, on_block) -> None:
    store.write_block(block, start, *payload)
    if on_block is not None:
        on_block(block)


def run_attribute(
    params: dict,
    prepared: Path,
    model_path: Path,
    out: Path,
    progress: bool = True,
    on_block: Callable[[int], None] | None = None,
) -> pd.DataFrame:
    """Compute (or resume) the relevance store of ``params.attribute.split`` and return its table."""
    data = section(params, "data", DATA_DEFAULTS)
    model = section(params, "model", MODEL_DEFAULTS)
    settings = section(params, "attribute", ATTRIBUTE_DEFAULTS)
    if settings["target"] not in ("label", "prediction"):
        raise AttributionError(f"attribute.target must be 'label' or 'prediction'; got {settings['target']!r}")
    pools = latent_pools(settings["latent_pool"])
    # unknown names fail before any work
    composite = composite_for(settings["composite"], Normalizer(data["mean"], data["std"]))
    if not Path(model_path).is_file():
        raise FileNotFoundError(f"model {model_path} not found: run the train stage first")
    dataset = load_dataset(prepared)
    latent = resolve_latent_layers(
        model["arch"], len(dataset.classes), settings["latent_layers"], composite, model_path
    )
    job = AttributionJob(
        prepared=str(prepared),
        model_path=str(model_path),
        arch=model["arch"],
        out=str(out),
        split=settings["split"],
        target=settings["target"],
        composite=settings["composite"],
        image_size=data["image_size"],
        mean=tuple(data["mean"]),
        std=tuple(data["std"]),
        pooled_size=settings["pooled_size"],
        batch_size=settings["batch_size"],
        block_batches=settings["block_batches"],
        precision=settings["precision"],
        device=settings["device"],
        threads=settings["threads"],
        latent_layers=tuple(path for path, _ in latent),
        latent_pools=pools,
    )
    rows = job.rows(dataset)
    empty = [c for k, c in enumerate(dataset.classes) if not (rows.label == k).any()]
    if empty:
        raise AttributionError(f"split {job.split!r} has no samples of classes {empty}: nothing to audit there")
    layout = StoreLayout(
        len(rows),
        data["image_size"],
        data["image_size"],
        settings["pooled_size"],
        len(dataset.classes),
        settings["batch_size"],
        settings["block_batches"],
        len(pools) * sum(channels for _, channels in latent),
    )
    attrs = {
        "model_sha256": file_sha256(model_path),
        "arch": model["arch"],
        "composite": job.composite,
        "target": job.target,
        "split": job.split,
        "pooling": f"sum to {job.pooled_size}x{job.pooled_size}",
        "precision": job.precision,
        "normalization": {"mean": job.mean, "std": job.std},
        "classes": dataset.classes,
        "code_version": CODE_VERSION,
        "data_root": str(dataset.root),
        # the latent array's blocks in column order: each layer pooled each way ("<path>:<pool>")
        "latent_layers": [[f"{path}:{pool}", channels] for path, channels in latent for pool in pools],
        "latent_pool": list(pools),
    }
    store = RelevanceStore(out)
    blocks = store.open_for_writing(layout, attrs)
    started = time.perf_counter()
    if blocks:
        if settings["scheduler"] or settings["workers"]:
            from .scaleout import run_on_dask

            run_on_dask(job, layout, blocks, settings["scheduler"], settings["workers"], progress)
        else:
            threads = torch.get_num_threads()
            try:
                computer = BlockComputer(job)
                num_workers = settings["num_workers"]
                if num_workers is None:
                    num_workers = min(8, os.cpu_count() or 1) if computer.device.type == "cuda" else 0
                _run_local(computer, layout, blocks, num_workers, progress, on_block)
            finally:
                torch.set_num_threads(threads)  # `threads` is meant for stage processes, not for a caller's

    table = store.finalize()
    if progress and blocks:
        done = sum(layout.block_range(b)[1] - layout.block_range(b)[0] for b in blocks)
        print(f"attributed {done} samples in {time.perf_counter() - started:.1f}s")
    return table
