"""Export a relevance store in the HDF5 layout that CoRelAy writes and ViRelAy reads.

Files (``<name>`` is the ``--name`` option):

- ``<name>.input.h5``: ``data`` (N, C, H, W) float32 images in [0, 1], ``label`` (N,) uint8 class indices;
- ``<name>-<composite>.attribution.h5``: ``index`` (N,) uint32 into the input file, ``attribution``
  (N, 1, H, W) float32 channel-summed relevance, ``label`` (N, classes) float32 output relevance
  (one-hot of the explained class times its logit), ``prediction`` (N, classes) float32 logits;
- ``label-map.json``: ``[{"index": i, "word_net_id": name, "name": name}, ...]``.

SpRAy's analysis file follows with the spray stage.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from .datasets import load_dataset, load_images
from .io import write_json, write_with
from .relevance_store import RelevanceStore

__all__ = ["export_virelay"]


def export_virelay(store_dir: Path, prepared: Path, out: Path, name: str = "spray-audit") -> list[Path]:
    store = RelevanceStore(store_dir)
    group = store.open()
    table = store.table()
    dataset = load_dataset(prepared)
    classes = group.attrs["classes"]
    if classes != dataset.classes:
        raise ValueError(f"store {store_dir} was computed on classes {classes}, the data set has {dataset.classes}")
    rows = dataset.manifest.set_index("sample_id").loc[table.sample_id]
    size = group["heatmap"].shape[1]
    images = load_images(dataset.root, rows.path, size).astype(np.float32) / 255.0
    logits = group["logits"][:]
    start = np.zeros_like(logits)
    start[np.arange(len(table)), table.target.to_numpy()] = logits[np.arange(len(table)), table.target.to_numpy()]
    out = Path(out)
    input_path = out / f"{name}.input.h5"
    attribution_path = out / f"{name}-{group.attrs['composite']}.attribution.h5"

    def write_input(tmp: Path) -> None:
        with h5py.File(tmp, "w") as fh:
            fh["data"] = images
            fh["label"] = table.label.to_numpy().astype(np.uint8)

    def write_attribution(tmp: Path) -> None:
        with h5py.File(tmp, "w") as fh:
            fh["index"] = np.arange(len(table), dtype=np.uint32)
            fh["attribution"] = group["heatmap"][:].astype(np.float32)[:, None]
            fh["label"] = start.astype(np.float32)
            fh["prediction"] = logits.astype(np.float32)
            fh.attrs["composite"] = group.attrs["composite"]
            fh.attrs["model_sha256"] = group.attrs["model_sha256"]

    write_with(input_path, write_input)
    write_with(attribution_path, write_attribution)
    label_map = [{"index": i, "word_net_id": c, "name": c} for i, c in enumerate(classes)]
    label_map_path = write_json(out / "label-map.json", label_map)
    return [input_path, attribution_path, label_map_path]
