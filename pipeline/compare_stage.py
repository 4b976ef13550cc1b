"""The ``compare`` stage: before/after of un-learning, as contract metrics and ``reports/compare.html``.

Metrics (``metrics/compare.json``): ``before`` and ``after``, each with ``test_clean_acc``, ``test_attacked_acc``,
``r_bias`` and ``artifact_ari`` (the ARI of the best-matching cluster of the artifact class with the stamp flag, from
the original and the re-audit; built-in data only), for the method in params; and ``methods``, the same figures for
every method fine-tuned by the unlearn stage. The page reuses the audit report's building blocks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from audits.report.figures import spectrum_figure
from audits.report.html import Page, figure_cell, img, join, section, table, tag
from audits.report.images import image_rgb, overlay_rgb, relevance_data_uri

from .datasets import load_dataset, load_images
from .io import write_bytes, write_json
from .provenance import code_version
from .relevance_store import RelevanceStore

__all__ = ["run_compare"]

KEYS = ("test_clean_acc", "test_as_trained_acc", "test_attacked_acc", "r_bias")
LABELS = {
    "test_clean_acc": "test clean accuracy",
    "test_as_trained_acc": "test as-trained accuracy",
    "test_attacked_acc": "test attacked accuracy (stamp on every image)",
    "r_bias": "R_bias: share of |R| on the stamp",
    "artifact_ari": "ARI of the best-matching cluster with the stamp",
}


def _read(path: Path) -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} is missing (run the stage that writes it)")
    return json.loads(Path(path).read_text())


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def run_compare(
    unlearn_metrics: Path,
    spray: dict[str, Path],
    spray_metrics: dict[str, Path],
    stores: dict[str, Path],
    prepared: Path,
    metrics_out: Path,
    report_out: Path,
    exemplars: int = 6,
) -> dict:
    """``spray``, ``spray_metrics`` and ``stores`` map ``"before"``/``"after"`` to the two audits' outputs."""
    unlearn = _read(unlearn_metrics)
    spray = {k: Path(v) for k, v in spray.items()}
    spray_metrics = {k: _read(v) for k, v in spray_metrics.items()}
    metrics = {"method": unlearn["method"], "artifact": unlearn["artifact"]}
    for when in ("before", "after"):
        figures = {k: unlearn[when].get(k) for k in KEYS}
        figures["artifact_ari"] = spray_metrics[when].get("artifact_best_ari")
        metrics[when] = figures
    metrics["methods"] = {
        m: {k: v for k, v in r.items() if k in (*KEYS, "seconds", "diverged")} for m, r in unlearn["methods"].items()
    }
    write_json(metrics_out, metrics)
    page = _page(metrics, unlearn, spray, stores["before"], stores["after"], prepared, exemplars)
    write_bytes(report_out, page.encode("utf-8"))
    return metrics


def _summary_table(metrics) -> object:
    rows = []
    for key in (*KEYS, "artifact_ari"):
        b, a = metrics["before"].get(key), metrics["after"].get(key)
        change = f"{a - b:+.3f}" if isinstance(a, float) and isinstance(b, float) else "–"
        rows.append([LABELS[key], _fmt(b), _fmt(a), change])
    return table(["", "before", "after", "change"], rows)


def _page(metrics, unlearn, spray, store_before, store_after, prepared, n_exemplars) -> str:
    artifact = metrics["artifact"]
    if artifact is None:
        page = Page("Un-learning: nothing to un-learn")
        page.add(tag("header", tag("h1", page.title), tag("p", unlearn.get("skipped", ""))))
        page.add(section("Before and after (the same model)", _summary_table(metrics), anchor="summary"))
        return page.render()
    page = Page(f"Un-learning {artifact['class_name']} cluster {artifact['cluster']}: before and after")
    page.add(
        tag(
            "header",
            tag("h1", page.title),
            tag(
                "p",
                f"method {metrics['method']}; artifact model from {artifact['n_members']} cluster members, region of "
                f"{artifact['region_pixels']} px; concept direction in layer {artifact['cav_layer']}",
            ),
        )
    )
    page.add(section("Before and after", _summary_table(metrics), anchor="summary"))
    method_rows = [
        [m, *(_fmt(r.get(k)) for k in KEYS), f"{r['seconds']:.1f} s", "yes" if r["diverged"] else "no"]
        for m, r in metrics["methods"].items()
    ]
    page.add(
        section(
            "All methods, same model, same batches",
            join(
                [
                    table(["method", "clean", "as trained", "attacked", "R_bias", "time", "diverged"], method_rows),
                    tag(
                        "p",
                        "Accuracies on the test splits; R_bias on stamped test images of the artifact class.",
                        class_="help",
                    ),
                ]
            ),
            anchor="methods",
        )
    )
    classes = {when: json.loads((spray[when] / "classes.json").read_text()) for when in spray}
    name = artifact["class_name"]
    spectra = [
        page.figure(spectrum_figure(classes[w][name]["eigenvalues"], classes[w][name]["n_clusters"],
                                    title=f"{name} {w}: spectrum"))
        for w in ("before", "after")
        if "eigenvalues" in classes[w].get(name, {})
    ]  # fmt: skip
    page.add(section(f"Re-audit of {name}", tag("div", *spectra, class_="plots"), anchor="spectra"))
    page.add(section("Explanations of the artifact samples", _gallery(unlearn, store_before, store_after, prepared,
                                                                       n_exemplars), anchor="gallery"))  # fmt: skip
    page.add(section("Provenance", tag("pre", json.dumps({"code version": code_version(), "artifact": artifact},
                                                        indent=2)), open=False))  # fmt: skip
    return page.render()


def _gallery(unlearn, store_before, store_after, prepared, n) -> object:
    dataset = load_dataset(prepared)
    before, after = RelevanceStore(store_before), RelevanceStore(store_after)
    table_b = before.table()
    ids = _artifact_members(unlearn, table_b, n)
    index = table_b.set_index("sample_id")["index"]
    rows = np.sort(index.loc[ids].to_numpy())
    maps_b = np.asarray(before.open()["heatmap"].oindex[rows], dtype=np.float64)
    maps_a = np.asarray(after.open()["heatmap"].oindex[rows], dtype=np.float64)
    ordered = table_b.set_index("index").loc[rows].sample_id.tolist()
    paths = dataset.manifest.set_index("sample_id").path.loc[ordered]
    images = load_images(dataset.root, paths, maps_b.shape[1])
    cells = []
    for i, sid in enumerate(ordered):
        image = image_rgb(images[i].transpose(1, 2, 0))
        cells.append(
            tag(
                "div",
                figure_cell(img(image, f"input {sid}", width=96), sid),
                figure_cell(img(relevance_data_uri(maps_b[i]), f"before {sid}", width=96), "before"),
                figure_cell(img(relevance_data_uri(maps_a[i]), f"after {sid}", width=96), "after"),
                figure_cell(img(overlay_rgb(image, maps_a[i]), f"overlay after {sid}", width=96), "overlay after"),
                class_="strip",
            )
        )
    return join([tag("p", "Members of the flagged cluster: relevance of the original and the cleaned model "
                          "(red-white-blue, centred at zero).", class_="help"), *cells])  # fmt: skip


def _artifact_members(unlearn: dict, table, n: int) -> list[str]:
    known = set(table.sample_id)
    ids = [i for i in unlearn["artifact"].get("exemplar_ids", []) if i in known][:n]
    if not ids:
        raise ValueError("the unlearn metrics name no artifact member that the relevance stores hold")
    return ids
