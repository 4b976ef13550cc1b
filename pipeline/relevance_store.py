"""The relevance store: heatmaps in zarr (v3), one parquet row per sample, written block by block.

Layout of ``<out>/``::

    relevance.zarr/      heatmap (N, H, W) float16   channel-summed full-resolution maps
                         pooled  (N, p, p) float32   relevance-conserving sum pooling (for clustering)
                         logits  (N, C)   float32    model outputs (for exports)
                         latent  (N, D)   float32    per-channel relevance of the latent layers, joined (only when
                                                     ``attribute.latent_layers`` names any; attrs ``latent_layers``:
                                                     [["<path>:<pool>", channels], ...], the blocks in column order,
                                                     each layer pooled over positions each way ``latent_pool`` lists)
                         attrs: fingerprint, model hash, composite, target, pooling, code version, ...
    parts/block-000007.parquet   the rows of block 7; written (atomically) only after its arrays
    samples.parquet      all rows, in sample order, once every block is done

A *block* is one shard of every array (``block_batches`` batches of samples): the unit a worker computes and
writes whole, and the unit of resumption. Its parts file is the commit record: a block without one is recomputed
and its shard rewritten, so a half-written shard is never read. Workers on other machines write their own blocks.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import zarr

from audits.pooling import sum_pool_matrix

from .io import write_with

__all__ = ["StoreLayout", "RelevanceStore", "file_sha256", "sum_pool_matrix", "TABLE_COLUMNS"]

ARRAYS = ("heatmap", "pooled", "logits")
TABLE_COLUMNS = [
    "index",
    "sample_id",
    "label",
    "class_name",
    "target",
    "prediction",
    "correct",
    "explained_logit",
    "relevance_sum",
]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class StoreLayout:
    """Shapes and chunking of a store; with the run's settings it forms the fingerprint that allows resuming."""

    n_samples: int
    height: int
    width: int
    pooled_size: int
    n_classes: int
    batch_size: int
    block_batches: int
    latent_size: int = 0  # columns of the latent array (0: none)

    @property
    def block_size(self) -> int:
        return self.batch_size * self.block_batches

    @property
    def n_blocks(self) -> int:
        return -(-self.n_samples // self.block_size)

    def block_range(self, block: int) -> tuple[int, int]:
        start = block * self.block_size
        return start, min(start + self.block_size, self.n_samples)


class RelevanceStore:
    """Create, resume, write and read one store directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.zarr_path = self.root / "relevance.zarr"
        self.parts = self.root / "parts"
        self.table_path = self.root / "samples.parquet"

    # -- creation and resumption -------------------------------------------------------------------------------
    def open_for_writing(self, layout: StoreLayout, attrs: dict) -> list[int]:
        """Open (resuming when the fingerprint matches, else starting afresh); returns the blocks still to do."""
        fingerprint = _fingerprint(layout, attrs)
        if self.zarr_path.exists():
            try:
                existing = zarr.open_group(self.zarr_path, mode="r").attrs.get("fingerprint")
            except Exception:  # an unreadable leftover is not worth keeping
                existing = None
            if existing != fingerprint:
                shutil.rmtree(self.root)
        if not self.zarr_path.exists():
            self._create(layout, attrs | {"fingerprint": fingerprint, "complete": False})
        self.parts.mkdir(parents=True, exist_ok=True)
        return [b for b in range(layout.n_blocks) if not self._part_path(b).exists()]

    def _create(self, layout: StoreLayout, attrs: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(self.zarr_path, mode="w")
        block, batch = layout.block_size, layout.batch_size
        h, w, p = layout.height, layout.width, layout.pooled_size
        # name: (shape after the sample axis, dtype, sharded by block with one chunk per batch?)
        specs = {
            "heatmap": ((h, w), "float16", True),
            "pooled": ((p, p), "float32", True),
            "logits": ((layout.n_classes,), "float32", False),
        }
        if layout.latent_size:
            specs["latent"] = ((layout.latent_size,), "float32", False)
        for name, (tail, dtype, sharded) in specs.items():
            group.create_array(
                name,
                shape=(layout.n_samples, *tail),
                chunks=((batch if sharded else block), *tail),
                shards=(block, *tail) if sharded else None,
                dtype=dtype,
                fill_value=0,
            )
        group.attrs.update(attrs | {"layout": vars(layout)})

    def _part_path(self, block: int) -> Path:
        return self.parts / f"block-{block:06d}.parquet"

    # -- writing -----------------------------------------------------------------------------------------------
    def write_block(self, block: int, start: int, heatmap, pooled, logits, rows: pd.DataFrame, latent=None) -> None:
        """Write one whole block (one shard per array), then commit it with its parts file."""
        group = zarr.open_group(self.zarr_path, mode="r+")
        stop = start + len(rows)
        for name in ARRAYS + (("latent",) if "latent" in group else ()):
            # a crashed writer may have left part of this block's shard; zarr would read it back and merge, so the
            # uncommitted leftovers go first (shard/chunk ``block`` along the sample axis, local store layout)
            shutil.rmtree(self.zarr_path / name / "c" / str(block), ignore_errors=True)
        group["heatmap"][start:stop] = heatmap
        group["pooled"][start:stop] = pooled
        group["logits"][start:stop] = logits
        if "latent" in group:
            group["latent"][start:stop] = latent
        write_with(self._part_path(block), lambda tmp: rows.to_parquet(tmp, index=False))

    def finalize(self) -> pd.DataFrame:
        """Gather the parts into ``samples.parquet`` and mark the store complete."""
        group = zarr.open_group(self.zarr_path, mode="r+")
        layout = StoreLayout(**group.attrs["layout"])
        missing = [b for b in range(layout.n_blocks) if not self._part_path(b).exists()]
        if missing:
            raise RuntimeError(f"store {self.root} is missing blocks {missing[:10]}; run the stage again to resume")
        table = pd.concat([pd.read_parquet(self._part_path(b)) for b in range(layout.n_blocks)], ignore_index=True)
        write_with(self.table_path, lambda tmp: table.to_parquet(tmp, index=False))
        group.attrs["complete"] = True
        return table

    # -- reading -----------------------------------------------------------------------------------------------
    def open(self) -> zarr.Group:
        """The finished store for reading; an incomplete one is refused."""
        if not self.zarr_path.exists():
            raise FileNotFoundError(f"no relevance store at {self.zarr_path}: run the attribute stage first")
        group = zarr.open_group(self.zarr_path, mode="r")
        if not group.attrs.get("complete"):
            raise RuntimeError(f"relevance store {self.root} is incomplete: run the attribute stage again to resume")
        return group

    def table(self) -> pd.DataFrame:
        self.open()
        return pd.read_parquet(self.table_path)

    def latent(self, indices=None) -> list[tuple[str, object]] | None:
        """The latent relevance of the samples at ``indices`` (all: None), split per block (a layer pooled one way)
        as ``[("<path>:<pool>", (n, C) float32 array), ...]``; None when the store holds none."""
        group = self.open()
        if "latent" not in group:
            return None
        array = group["latent"][:] if indices is None else group["latent"].oindex[indices]
        out, start = [], 0
        for path, channels in group.attrs["latent_layers"]:
            out.append((path, array[:, start : start + channels]))
            start += channels
        return out


def _fingerprint(layout: StoreLayout, attrs: dict) -> str:
    payload = json.dumps({"layout": vars(layout), "attrs": attrs}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()
