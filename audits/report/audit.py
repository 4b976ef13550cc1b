"""The SpRAy audit page: what an auditor reads first (ranked Clever-Hans candidates), then every class.

The page is built from plain data (:class:`AuditView`: arrays, numbers, strings), so it serves SpRAy results from
any source; ``pipeline.report_stage`` fills it from the stage outputs. Large audits stay usable: class sections are
lazy (nothing inside is decoded or drawn until opened), scatter plots and hover thumbnails are samples whose size
is stated next to them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .figures import bar_figure, cluster_color, curves_figure, embedding_figure, spectrum_figure
from .html import Markup, Page, esc, figure_cell, img, join, link, section, table, tag
from .images import downsize, image_rgb, overlay_rgb, png_data_uri, relevance_data_uri

__all__ = ["Thumb", "ClusterView", "ClassView", "AuditView", "render_audit", "cluster_gallery", "thumb_cells"]

DISPLAY = 96  # CSS pixels of a gallery image


@dataclass
class Thumb:
    """One sample's pictures: its input and its signed relevance map, at thumbnail size."""

    sample_id: str
    image: np.ndarray  # (H, W, 3) uint8, or anything image_rgb accepts
    relevance: np.ndarray  # (H, W) signed


@dataclass
class ClusterView:
    cluster: int
    size: int
    ch_score: float
    ch_rank: int
    flagged: bool
    mean_relevance: np.ndarray  # (H, W) mean of the members' maps, each divided by its sum of |R|
    exemplars: list[Thumb] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)
    members: dict[str, str] = field(default_factory=dict)  # "json"/"csv" -> href of the sample-id list
    strategy: int = 0  # clusters of one class with the same strategy share its evidence, score and rank
    evidence: dict[str, float] = field(
        default_factory=dict
    )  # conductance, null_conductance, p_value, relevance_gain, null_gain


@dataclass
class ClassView:
    name: str
    n_samples: int
    clusters: list[ClusterView] = field(default_factory=list)
    eigenvalues: np.ndarray | None = None
    n_clusters: int = 0
    details: dict[str, Any] = field(default_factory=dict)  # gap strength, stability, kNN degree, ...
    points: pd.DataFrame | None = None  # sample_id, cluster, <embedding>_x, <embedding>_y (a sample, maybe)
    hover: list[Thumb] = field(default_factory=list)
    skipped: str | None = None

    @property
    def top_score(self) -> float:
        return max((c.ch_score for c in self.clusters), default=float("-inf"))


@dataclass
class AuditView:
    title: str
    facts: dict[str, Any]  # shown first: model, data, composite, ...
    classes: list[ClassView]
    flag_rule: str = "p below the false-alarm rate"  # how a strategy is flagged, in words, for the page
    provenance: dict[str, Any] = field(default_factory=dict)  # parameters, code version, inputs
    n_candidates: int = 5
    next_steps: Sequence[Any] | None = None
    evaluation: dict[str, Any] | None = None  # {"metrics": evaluate.json, "curves": curves.json} (optional)


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float | np.floating):
        return "–" if not np.isfinite(value) else f"{value:.{digits}f}"
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    return str(value)


def _anchor(index: int) -> str:
    return f"class-{index}"


def thumb_cells(thumb: Thumb, *, width: int = DISPLAY, overlay_only: bool = False) -> list[Markup]:
    """Input / heatmap / overlay of one sample as captioned cells."""
    label = thumb.sample_id
    overlay = figure_cell(img(overlay_rgb(thumb.image, thumb.relevance), f"overlay {label}", width=width), label)
    if overlay_only:
        return [overlay]
    return [
        figure_cell(img(image_rgb(thumb.image), f"input {label}", width=width), "input"),
        figure_cell(img(relevance_data_uri(thumb.relevance), f"heatmap {label}", width=width), "relevance"),
        overlay,
    ]


def mean_map_cell(cluster: ClusterView, class_name: str, *, width: int = DISPLAY) -> Markup:
    alt = f"mean relevance of {class_name} cluster {cluster.cluster}"
    return img(relevance_data_uri(cluster.mean_relevance), alt, width=width, cls="map")


def members_links(cluster: ClusterView) -> Markup:
    return join((link(href, fmt) for fmt, href in cluster.members.items()), " · ")


def cluster_gallery(cluster: ClusterView, class_name: str) -> Markup:
    """A cluster's mean map, then each exemplar as input / heatmap / overlay."""
    flag = tag("span", "Clever-Hans candidate", class_="flag") if cluster.flagged else ""
    heading = tag(
        "h4",
        tag("span", "", class_="swatch", style=f"background:{cluster_color(cluster.cluster)}"),
        f"cluster {cluster.cluster}: {cluster.size:,} samples, strategy {cluster.strategy}, score "
        f"{cluster.ch_score:.1f} (rank {cluster.ch_rank}) ",
        flag,
    )
    rows = [tag("div", *thumb_cells(t), class_="strip") for t in cluster.exemplars]
    mean = figure_cell(mean_map_cell(cluster, class_name, width=2 * DISPLAY), "mean relevance")
    links = tag("p", "sample ids: ", members_links(cluster)) if cluster.members else ""
    return tag("div", heading, tag("div", mean, tag("div", *rows, class_="strips"), class_="gallery"), links)


def _candidates(view: AuditView) -> list[tuple[ClassView, int, ClusterView]]:
    rows = [(cv, i, c) for i, cv in enumerate(view.classes) for c in cv.clusters]
    rows.sort(key=lambda r: r[2].ch_rank)
    n_flagged = sum(c.flagged for _, _, c in rows)
    return rows[: max(n_flagged, view.n_candidates)]


def evidence_text(c: ClusterView) -> str:
    """The strategy's evidence in words: how few graph edges its cut crosses, against the null, and the logit gain."""
    e = c.evidence
    if not e or not np.isfinite(e.get("conductance", np.nan)):
        return "one strategy with the rest of its class"
    parts = [f"cut crosses {e['conductance']:.2%} of edges"]
    if np.isfinite(e.get("null_conductance", np.nan)):
        parts[-1] += f" (cuts through one strategy: {e['null_conductance']:.1%})"
    parts.append(f"p = {e['p_value']:.2g}")
    if np.isfinite(e.get("relevance_gain", np.nan)):
        parts.append(f"explained logit ×{e['relevance_gain']:.2f} the rest's")
        if np.isfinite(e.get("null_gain", np.nan)):
            parts[-1] += f" (parts of one strategy: ×{e['null_gain']:.2f})"
    return "; ".join(parts)


def candidates_table(view: AuditView) -> Markup:
    rows = []
    for cv, index, c in _candidates(view):
        exemplars = join(thumb_cells(t, width=64, overlay_only=True)[0] for t in c.exemplars[:4])
        rows.append(
            [
                _fmt(c.ch_rank),
                link(f"#{_anchor(index)}", cv.name),
                f"{c.cluster} (strategy {c.strategy})",
                f"{c.size:,} ({c.size / max(cv.n_samples, 1):.0%})",
                tag("b", f"{c.ch_score:.1f}") if c.flagged else f"{c.ch_score:.1f}",
                tag("span", "flagged", class_="flag") if c.flagged else "no",
                evidence_text(c),
                mean_map_cell(c, cv.name, width=64),
                tag("div", exemplars, class_="strip"),
                members_links(c),
            ]
        )
    header = ["rank", "class", "cluster", "size", "score", "flag", "evidence", "mean map", "exemplars (overlay)",
              "sample ids"]  # fmt: skip
    return table(header, rows, cls="candidates")


def _next_steps(view: AuditView) -> list[Any]:
    if view.next_steps is not None:
        return list(view.next_steps)
    flagged = [(cv, c) for cv, _, c in _candidates(view) if c.flagged]
    if not flagged:
        return [
            f"No strategy is flagged ({view.flag_rule}). Look at the top-ranked clusters anyway: a cue that "
            "changes what the model sees everywhere (a colour cast, a background) need not move where relevance lies.",
            "Check the classes whose spectra show a strong gap: several strategies in one class deserve a look.",
        ]
    top_class, top = flagged[0]
    return [
        Markup(
            f"Open the gallery of <b>{esc(top_class.name)}</b> cluster {top.cluster} and confirm what its relevance "
            "piles on (the mean map shows where, the exemplars show what)."
        ),
        "If it is an artifact, un-learn it: the cluster's sample-id list and mean relevance map are the inputs of "
        "the unlearning stage (no labels needed).",
        "Then re-audit the fine-tuned model: the cluster should vanish and attacked accuracy recover.",
    ]


def class_section(page: Page, cv: ClassView, index: int, *, open: bool) -> Markup:
    flagged = [c.cluster for c in cv.clusters if c.flagged]
    title = join(
        [
            f"{cv.name} — {cv.n_samples:,} samples, k = {cv.n_clusters}",
            tag("span", f"{len(flagged)} flagged", class_="flag") if flagged else "",
        ],
        " ",
    )
    if cv.skipped:
        return section(title, tag("p", f"not clustered: {cv.skipped}"), anchor=_anchor(index), open=False, level=3)
    plots = []
    if cv.eigenvalues is not None:
        plots.append(page.figure(spectrum_figure(cv.eigenvalues, cv.n_clusters, title=f"{cv.name}: spectrum")))
    plots.append(
        page.figure(
            bar_figure(
                [f"cluster {c.cluster}" for c in cv.clusters],
                [c.size for c in cv.clusters],
                title=f"{cv.name}: cluster sizes",
                colors=[cluster_color(c.cluster) for c in cv.clusters],
            )
        )
    )
    details = join(
        (tag("span", f"{k}: {_fmt(v)}", class_="fact") for k, v in cv.details.items()),
        " ",
    )
    blocks: list[Any] = [tag("div", *plots, class_="plots"), tag("p", details)]
    if cv.points is not None and len(cv.points):
        names = {c.cluster: f"cluster {c.cluster} (n={c.size:,})" for c in cv.clusters}
        embeddings = [c[:-2] for c in cv.points.columns if c.endswith("_x") and c[:-2] + "_y" in cv.points]
        scatter = [
            page.figure(
                embedding_figure(
                    cv.points[f"{e}_x"].to_numpy(),
                    cv.points[f"{e}_y"].to_numpy(),
                    cv.points.cluster.to_numpy(),
                    cv.points.sample_id.astype(str).tolist(),
                    title=f"{cv.name}: {_EMBEDDING_NAMES.get(e, e)}",
                    names=names,
                    flagged=flagged,
                ),
                cls="plot embedding",
            )
            for e in embeddings
        ]
        shown = f"showing {len(cv.points):,} of {cv.n_samples:,} samples" if len(cv.points) < cv.n_samples else ""
        note = (
            f"hover a point for its input and heatmap ({len(cv.hover):,} thumbnails); click a legend entry to hide it"
        )
        blocks += [tag("div", *scatter, class_="plots"), tag("p", join([shown, note], "; ") if shown else note)]
    rows = [
        [
            tag("span", "", class_="swatch", style=f"background:{cluster_color(c.cluster)}"),
            str(c.cluster),
            f"{c.size:,}",
            f"{c.size / max(cv.n_samples, 1):.1%}",
            f"{c.strategy}",
            f"{c.ch_score:.1f}",
            str(c.ch_rank),
            *(_fmt(c.stats.get(k, float("nan"))) for k in _STAT_COLUMNS),
            members_links(c),
        ]
        for c in cv.clusters
    ]
    header = ["", "cluster", "size", "share", "strategy", "score", "rank", *_STAT_COLUMNS.values(), "sample ids"]
    blocks.append(table(header, rows))
    ordered = sorted(cv.clusters, key=lambda c: c.ch_rank)
    blocks += [cluster_gallery(c, cv.name) for c in ordered]
    return section(title, join(blocks), anchor=_anchor(index), open=open, lazy=True, level=3)


_EMBEDDING_NAMES = {"tsne": "t-SNE", "umap": "UMAP"}
_STAT_COLUMNS = {
    "distance_from_rest": "distance from rest",
    "moved_concentration": "moved concentration",
    "misclassified_share": "misclassified",
}


def _hover_data(classes: Sequence[ClassView], max_side: int = 64) -> dict[str, list[str]]:
    thumbs: dict[str, list[str]] = {}
    for cv in classes:
        for t in cv.hover:
            image = downsize(image_rgb(t.image), max_side)
            heat = downsize(np.asarray(t.relevance, dtype=np.float64), max_side, conserve=True)
            thumbs[str(t.sample_id)] = [png_data_uri(image), relevance_data_uri(heat)]
    return thumbs


_QUALITY_COLUMNS = {
    "aopc_morf": "AOPC (MoRF) ↑",
    "aopc_lerf": "AOPC (LeRF) ↓",
    "area_between": "LeRF − MoRF area ↑",
    "mass_accuracy": "mass accuracy (object) ↑",
    "rank_accuracy": "rank accuracy (object) ↑",
    "stamp_share": "share on stamp",
}


def evaluation_section(page: Page, evaluation: dict[str, Any]) -> Markup:
    """Pixel-flipping curves and the scores of every compared method (the ``evaluate`` stage's outputs)."""
    metrics, curves = evaluation.get("metrics", {}), evaluation.get("curves", {})
    blocks: list[Any] = []
    if curves.get("curves"):
        blocks.append(
            page.figure(
                curves_figure(
                    curves["curves"],
                    title=f"Region perturbation ({curves.get('patch')} px patches, fill: {curves.get('fill')}, "
                    f"{curves.get('n_images')} images)",
                    x_title="patches removed",
                    y_title="explained logit (mean)",
                )
            )
        )
    methods = metrics.get("methods", {})
    columns = [c for c in _QUALITY_COLUMNS if any(c in m for m in methods.values())]
    rows = [[name, *(_fmt(scores.get(c, float("nan"))) for c in columns)] for name, scores in methods.items()]
    blocks.append(table(["method", *(_QUALITY_COLUMNS[c] for c in columns)], rows))
    blocks.append(
        tag(
            "p",
            f"Random patch order: AOPC {_fmt(metrics.get('random_order_aopc', float('nan')))}. Ground-truth scores "
            f"count {metrics.get('sign_convention', 'positive relevance only')}: negative relevance is evidence "
            "against the class, not a location of it.",
            class_="help",
        )
    )
    return section("Explanation quality", join(blocks), anchor="quality", open=False, lazy=True)


def render_audit(view: AuditView, *, open_classes: int = 12) -> str:
    """The whole page as one string (write it with an atomic writer)."""
    page = Page(view.title)
    n_flagged = len({(cv.name, c.strategy) for cv in view.classes for c in cv.clusters if c.flagged})
    facts = dict(view.facts)
    facts.setdefault("classes", f"{len(view.classes):,}")
    facts.setdefault("samples", f"{sum(cv.n_samples for cv in view.classes):,}")
    facts["flagged strategies"] = f"{n_flagged} ({view.flag_rule})"
    page.add(
        tag(
            "header",
            tag("h1", view.title),
            tag("dl", *(tag("div", tag("dt", k), tag("dd", v)) for k, v in facts.items())),
        )
    )
    verdict = (
        tag("p", f"{n_flagged} strateg{'y looks' if n_flagged == 1 else 'ies look'} like Clever-Hans behaviour.",
            class_="verdict flagged")
        if n_flagged
        else tag("p", "No strategy is flagged.", class_="verdict")
    )  # fmt: skip
    page.add(
        section(
            "Clever-Hans candidates",
            join(
                [
                    verdict,
                    tag(
                        "p",
                        "Clusters of all classes, grouped into strategies and ranked by the evidence that the "
                        "strategy is a shortcut: its cut from the rest of the class crosses far fewer kNN-graph "
                        "edges than cuts through one strategy of this model do (the null, learnt from the audit's "
                        "own clusters), and the model is more sure of its members than of the rest of the class. "
                        "Score = -log10 p of the cut (0 for strategies the model is not more sure of).",
                        class_="help",
                    ),
                    candidates_table(view),
                    tag("h3", "What to do next"),
                    tag("ol", *(tag("li", s) for s in _next_steps(view))),
                ]
            ),
            anchor="candidates",
        )
    )
    if view.evaluation:
        page.add(evaluation_section(page, view.evaluation))
    order = sorted(range(len(view.classes)), key=lambda i: -view.classes[i].top_score)
    overview = table(
        ["class", "samples", "k", "top score", "flagged clusters"],
        [
            [
                link(f"#{_anchor(i)}", view.classes[i].name),
                f"{view.classes[i].n_samples:,}",
                str(view.classes[i].n_clusters) if not view.classes[i].skipped else "–",
                _fmt(view.classes[i].top_score) if view.classes[i].clusters else "–",
                str(sum(c.flagged for c in view.classes[i].clusters)),
            ]
            for i in order
        ],
    )
    sections = [class_section(page, view.classes[i], i, open=rank < open_classes) for rank, i in enumerate(order)]
    page.add(section("Classes", join([overview, *sections]), anchor="classes"))
    page.add(
        section(
            "Provenance",
            join(
                tag("div", tag("h4", k), tag("pre", v if isinstance(v, str) else json.dumps(v, indent=2, default=str)))
                for k, v in view.provenance.items()
            ),
            anchor="provenance",
            open=False,
        )
    )
    page.data["thumbs"] = _hover_data(view.classes)
    return page.render()
