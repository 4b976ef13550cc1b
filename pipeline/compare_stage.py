"""The ``compare`` stage: before/after of un-learning, as contract metrics and ``reports/compare.html``.

Metrics (``metrics/compare.json``): ``before`` and ``after`` for the method in params, and ``methods``, the same
figures for every method fine-tuned by the unlearn stage. Only figures that exist are written: on the built-in data
``test_clean_acc``, ``test_as_trained_acc``, ``test_attacked_acc`` (and one per further artifact), ``r_bias`` (on the
artifact classes' attacked test images, true masks) and ``artifact_ari`` (the best-matching strategy of the
artifact class against the planted flag, from the original and the re-audit); on a user's data ``test_acc`` and
``r_bias`` (on held-out members of the flagged strategies, never fine-tuned on). The page reuses the audit report's
building blocks; with nothing flagged it says so, and before = after.
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

LABELS = {
    "test_acc": "test accuracy",
    "test_clean_acc": "test clean accuracy",
    "test_as_trained_acc": "test as-trained accuracy",
    "test_attacked_acc": "test attacked accuracy (the artifact on every image)",
    "r_bias": "R_bias: share of |R| on the artifact",
    "artifact_ari": "ARI of the best-matching strategy with the planted artifact",
}


def _keys(figures: dict) -> list[str]:
    """The accuracy keys present (test splits in order), then R_bias."""
    accuracies = [k for k in figures if k.startswith("test") and k.endswith("_acc") and figures[k] is not None]
    return accuracies + (["r_bias"] if figures.get("r_bias") is not None else [])


def _label(key: str) -> str:
    if key in LABELS:
        return LABELS[key]
    return f"test attacked accuracy ({key[len('test_attacked_') : -len('_acc')]} artifact on every image)"


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
    metrics = {"method": unlearn["method"], "artifact": unlearn["artifact"],
               "artifacts": unlearn.get("artifacts", []), "r_bias_on": unlearn.get("r_bias_on")}  # fmt: skip
    keys = _keys(unlearn["before"])
    for when in ("before", "after"):
        figures = {k: unlearn[when][k] for k in keys}
        if spray_metrics[when].get("artifact_best_ari") is not None:
            figures["artifact_ari"] = spray_metrics[when]["artifact_best_ari"]
        metrics[when] = figures
    metrics["methods"] = {
        m: {k: v for k, v in r.items() if k in (*keys, "seconds", "diverged")} for m, r in unlearn["methods"].items()
    }
    write_json(metrics_out, metrics)
    page = _page(metrics, unlearn, spray, stores["before"], stores["after"], prepared, exemplars)
    write_bytes(report_out, page.encode("utf-8"))
    return metrics


def _summary_table(metrics) -> object:
    rows = []
    for key in metrics["before"]:
        b, a = metrics["before"].get(key), metrics["after"].get(key)
        change = f"{a - b:+.3f}" if isinstance(a, float) and isinstance(b, float) else "–"
        rows.append([_label(key), _fmt(b), _fmt(a), change])
    return table(["", "before", "after", "change"], rows)


def _page(metrics, unlearn, spray, store_before, store_after, prepared, n_exemplars) -> str:
    artifacts = metrics["artifacts"] or ([metrics["artifact"]] if metrics["artifact"] else [])
    if not artifacts:
        page = Page("Un-learning: nothing to un-learn")
        page.add(
            tag(
                "header",
                tag("h1", page.title),
                tag("p", unlearn.get("skipped", "")),
                tag("p", "The audit flagged no strategy, so the model was left as it is: before = after."),
            )
        )
        page.add(section("Before and after (the same model)", _summary_table(metrics), anchor="summary"))
        return page.render()
    names = ", ".join(f"{a['class_name']} (clusters {', '.join(map(str, a.get('clusters', [a['cluster']])))})"
                      for a in artifacts)  # fmt: skip
    page = Page(f"Un-learning {names}: before and after")
    described = "; ".join(
        f"{a['class_name']}: {a['n_members']} members ({a.get('n_held_out', 0)} held out), region of "
        f"{a['region_pixels']} px"
        for a in artifacts
    )
    page.add(tag("header", tag("h1", page.title),
                 tag("p", f"method {metrics['method']}; concept direction in layer {artifacts[0]['cav_layer']}; "
                          f"{described}")))  # fmt: skip
    page.add(section("Before and after", _summary_table(metrics), anchor="summary"))
    keys = [k for k in metrics["before"] if k != "artifact_ari"]
    method_rows = [
        [m, *(_fmt(r.get(k)) for k in keys), f"{r['seconds']:.1f} s", "yes" if r["diverged"] else "no"]
        for m, r in metrics["methods"].items()
    ]
    heading = ["method", *(_label(k).split(" (")[0].replace("test ", "") for k in keys), "time", "diverged"]
    page.add(
        section(
            "All methods, same model, same batches",
            join(
                [
                    table(heading, method_rows),
                    tag(
                        "p",
                        f"Accuracies on the test splits; R_bias on {metrics.get('r_bias_on') or 'artifacts'}.",
                        class_="help",
                    ),  # fmt: skip
                ]
            ),
            anchor="methods",
        )
    )
    classes = {when: json.loads((spray[when] / "classes.json").read_text()) for when in spray}
    spectra = []
    for a in artifacts:
        for w in ("before", "after"):
            info = classes[w].get(a["class_name"], {})
            if "eigenvalues" in info:
                title = f"{a['class_name']} {w}: spectrum"
                spectra.append(page.figure(spectrum_figure(info["eigenvalues"], info["n_clusters"], title=title)))
    page.add(section("Re-audit", tag("div", *spectra, class_="plots"), anchor="spectra"))
    page.add(section("Explanations of the artifact samples", _gallery(unlearn, store_before, store_after, prepared,
                                                                       n_exemplars), anchor="gallery"))  # fmt: skip
    page.add(section("Provenance", tag("pre", json.dumps({"code version": code_version(), "artifacts": artifacts},
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
    return join([tag("p", "Members of the flagged strategies: relevance of the original and the cleaned model "
                          "(red-white-blue, centred at zero).", class_="help"), *cells])  # fmt: skip


def _artifact_members(unlearn: dict, table, n: int) -> list[str]:
    known = set(table.sample_id)
    artifacts = unlearn.get("artifacts") or [unlearn["artifact"]]
    per = max(1, n // len(artifacts))
    ids = [i for a in artifacts for i in [e for e in a.get("exemplar_ids", []) if e in known][:per]]
    if not ids:
        raise ValueError("the unlearn metrics name no artifact member that the relevance stores hold")
    return ids
