"""The report's plots (plotly figure objects; :class:`~audits.report.html.Page` embeds them as data).

Text that comes from data (class names) reaches plotly escaped: plotly renders a small HTML subset in titles and
legends, so a raw ``<img ...>`` there would be markup, not text.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .html import esc

__all__ = ["CLUSTER_COLORS", "cluster_color", "spectrum_figure", "embedding_figure", "bar_figure", "curves_figure"]

# Okabe-Ito first (colour-blind safe), then Tableau 10
CLUSTER_COLORS = (
    "#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000",
    "#4E79A7", "#F28E2B", "#59A14F", "#B07AA1", "#9C755F", "#BAB0AC", "#76B7B2", "#EDC948",
)  # fmt: skip
FLAG_COLOR = "#C00000"


def cluster_color(cluster: int) -> str:
    return CLUSTER_COLORS[int(cluster) % len(CLUSTER_COLORS)]


def _layout(title: str, height: int, **extra) -> dict:
    return {
        "title": {"text": title, "font": {"size": 14}, "x": 0.02},
        "height": height,
        "margin": {"l": 50, "r": 20, "t": 40, "b": 40},
        "template": "plotly_white",
        **extra,
    }


def spectrum_figure(eigenvalues: Sequence[float], n_clusters: int, *, title: str = "Laplacian spectrum", height=300):
    """Smallest eigenvalues of the normalised Laplacian, the chosen gap (between λ_k and λ_k+1) marked."""
    import plotly.graph_objects as go

    values = np.asarray(eigenvalues, dtype=float)
    index = np.arange(1, len(values) + 1)
    fig = go.Figure(
        go.Scatter(
            x=index,
            y=values,
            mode="lines+markers",
            name="eigenvalue",
            marker={"color": ["#C00000" if i <= n_clusters else "#555555" for i in index], "size": 8},
            line={"color": "#999999"},
            hovertemplate="λ<sub>%{x}</sub> = %{y:.4f}<extra></extra>",
        )
    )
    if 1 <= n_clusters < len(values):
        lo, hi = values[n_clusters - 1], values[n_clusters]
        fig.add_shape(
            type="rect", x0=n_clusters, x1=n_clusters + 1, y0=lo, y1=hi,
            fillcolor="rgba(192,0,0,0.12)", line={"color": "#C00000", "dash": "dot"},
        )  # fmt: skip
        fig.add_annotation(
            x=n_clusters + 0.5, y=hi, text=f"eigengap → k = {n_clusters}", showarrow=True, arrowhead=2, ay=-30,
            font={"color": "#C00000"},
        )  # fmt: skip
    fig.update_layout(
        _layout(esc(title), height, showlegend=False),
        xaxis={"title": "index", "dtick": 1},
        yaxis={"title": "eigenvalue", "rangemode": "tozero"},
    )
    return fig


def embedding_figure(
    x: np.ndarray,
    y: np.ndarray,
    clusters: np.ndarray,
    sample_ids: Sequence[str],
    *,
    title: str,
    names: dict[int, str] | None = None,
    flagged: Sequence[int] = (),
    height: int = 380,
):
    """2-D embedding, one trace per cluster (a legend click hides a cluster); ``customdata`` carries the sample id
    so the page's script can show its thumbnails on hover."""
    import plotly.graph_objects as go

    clusters = np.asarray(clusters)
    ids = np.asarray(sample_ids, dtype=object)
    fig = go.Figure()
    for c in sorted(set(clusters.tolist())):
        members = np.flatnonzero(clusters == c)
        name = (names or {}).get(c, f"cluster {c}")
        fig.add_trace(
            go.Scatter(
                x=np.asarray(x)[members],
                y=np.asarray(y)[members],
                mode="markers",
                name=esc(name),
                customdata=ids[members].tolist(),
                marker={
                    "color": cluster_color(c),
                    "size": 6,
                    "opacity": 0.8,
                    "line": {"width": 1.5 if c in flagged else 0, "color": FLAG_COLOR},
                },
                hovertemplate="%{customdata}<extra>" + esc(name) + "</extra>",
            )
        )
    fig.update_layout(
        _layout(esc(title), height, legend={"itemclick": "toggle", "itemdoubleclick": "toggleothers"}),
        xaxis={"showticklabels": False, "zeroline": False},
        yaxis={"showticklabels": False, "zeroline": False},
        hovermode="closest",
    )
    return fig


def bar_figure(labels: Sequence[str], values: Sequence[float], *, title: str, colors=None, height: int = 240):
    import plotly.graph_objects as go

    fig = go.Figure(go.Bar(x=[esc(v) for v in labels], y=list(values), marker={"color": colors}))
    fig.update_layout(_layout(esc(title), height, showlegend=False))
    return fig


def curves_figure(curves: dict[str, dict[str, list[float]]], *, title: str, x_title: str, y_title: str, height=360):
    """Pixel-flipping curves: one colour per method, solid for most-relevant-first, dashed for least-relevant-first."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for i, (method, orders) in enumerate(curves.items()):
        color = "#888888" if method.startswith("random") else CLUSTER_COLORS[i % len(CLUSTER_COLORS)]
        for order, values in orders.items():
            fig.add_trace(
                go.Scatter(
                    x=list(range(len(values))),
                    y=list(values),
                    mode="lines",
                    name=esc(f"{method} ({order})"),
                    legendgroup=esc(method),
                    line={"color": color, "dash": "dash" if order == "lerf" else "solid"},
                )
            )
    fig.update_layout(_layout(esc(title), height), xaxis={"title": x_title}, yaxis={"title": y_title})
    return fig
