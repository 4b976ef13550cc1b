"""The audit report without a browser: pictures, escaping, self-containment, and the stage on real outputs."""

from __future__ import annotations

import io
import json
import re
import shutil
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from audits.report import Page, render_audit
from audits.report.demo import synthetic_view
from audits.report.html import esc, json_for_script, table
from audits.report.images import downsize, png_bytes, relevance_png, relevance_rgb
from pipeline.report_stage import REPORT_DEFAULTS, build_audit_view, picture_quotas, run_report

HOSTILE = "<img src=x onerror=alert(1)>"


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_png_round_trips_through_an_independent_decoder():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    smooth = np.cumsum(np.cumsum(rng.random((40, 40, 3)), 0), 1)
    smooth = (smooth / smooth.max() * 255).astype(np.uint8)
    for image in (noise, smooth, np.zeros((1, 1, 3), np.uint8)):
        assert np.array_equal(_decode(png_bytes(image)), image)


def test_relevance_colours_are_centred_at_zero():
    r = np.array([[1.0, -1.0, 0.0, 0.5]])
    rgb = relevance_rgb(r)
    assert tuple(rgb[0, 0]) == (255, 0, 0) and tuple(rgb[0, 1]) == (0, 0, 255) and tuple(rgb[0, 2]) == (255,) * 3
    assert rgb[0, 3, 0] == 255 and 100 < rgb[0, 3, 1] < 160  # half-strength positive: light red
    palette = _decode(relevance_png(np.random.default_rng(1).normal(size=(9, 11))))
    assert np.abs(palette.astype(int) - relevance_rgb(np.random.default_rng(1).normal(size=(9, 11)))).max() <= 2
    assert np.array_equal(_decode(relevance_png(np.zeros((3, 3)))), np.full((3, 3, 3), 255))


def test_downsize_conserves_relevance_and_averages_pixels():
    r = np.random.default_rng(0).normal(size=(224, 224))
    small = downsize(r, 64, conserve=True)
    assert small.shape == (64, 64) and np.isclose(small.sum(), r.sum())
    image = np.full((100, 50, 3), 200, np.uint8)
    assert downsize(image, 40).shape == (40, 20, 3) and (downsize(image, 40) == 200).all()
    assert downsize(image, 500) is image


def test_text_is_escaped_everywhere_and_markup_is_not_doubled():
    assert esc(HOSTILE) == "&lt;img src=x onerror=alert(1)&gt;"
    assert esc(esc(HOSTILE)) == esc(HOSTILE)
    cell = table([HOSTILE], [[HOSTILE, esc("<b>")]])
    assert HOSTILE not in cell and cell.count("&lt;img") == 2
    script = json_for_script({"x": "</script><script>alert(1)</script>", "y": "<!--"})
    assert "</" not in script and "<!--" not in script
    assert json.loads(script.replace("<\\/", "</").replace("<\\!--", "<!--"))["x"].startswith("</script>")


def test_page_embeds_plotly_once_and_loads_nothing(tmp_path):
    from plotly.offline import get_plotlyjs

    view = synthetic_view(3, 40, names=[HOSTILE, "b", "c"], id_prefix='x"><script>alert(2)</script>')
    html = render_audit(view)
    assert html.count(get_plotlyjs()[:500]) == 1
    assert not re.search(r"<(script|img|link|iframe)[^>]+(src|href)=\"(https?:)?//", html)
    assert "<link" not in html and 'src="http' not in html
    assert "Content-Security-Policy" in html
    # one placeholder per plot: spectrum, cluster sizes, t-SNE, UMAP for each class
    assert html.count("data-figure=") == 4 * 3
    assert HOSTILE not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    # outside the JSON block sample ids are escaped; inside it only "</" (escaped) or "<!--" could end the block
    outside = re.sub(r'<script type="application/json" id="report-data">.*?</script>', "", html, flags=re.S)
    assert "<script>alert(2)" not in outside and "&lt;script&gt;alert(2)" in outside


def test_page_building_blocks_compose():
    page = Page("two figures")
    from audits.report.figures import spectrum_figure

    a = page.figure(spectrum_figure([0, 0.001, 0.3, 0.4], 2))
    b = page.figure(spectrum_figure([0, 0.2, 0.3], 1))
    page.add(a, b, "<not markup>")
    html = page.render()
    assert page.n_figures == 2 and 'data-figure="fig1"' in html and "&lt;not markup&gt;" in html
    data = json.loads(re.search(r'id="report-data">(.*?)</script>', html, re.S).group(1).replace("<\\/", "</"))
    assert set(data["figures"]) == {"fig0", "fig1"}


def test_picture_budget_shrinks_with_the_number_of_classes():
    assert picture_quotas(6, 19, REPORT_DEFAULTS) == (32, 4)
    hover, exemplars = picture_quotas(100, 500, REPORT_DEFAULTS)
    assert hover == 10 and exemplars == 2
    assert 100 * hover + 500 * exemplars <= REPORT_DEFAULTS["page_thumbnails"]
    assert picture_quotas(5000, 40000, REPORT_DEFAULTS) == (0, 1)


@pytest.mark.slow
def test_report_stage_on_the_default_benchmark(poisoned, tmp_path):
    root, params = poisoned["dir"], poisoned["params"]
    report = root / "reports" / "audit.html"
    assert report.is_file() and poisoned["report"]["flagged"] == 1
    html = report.read_text()
    # every link to a per-cluster sample-id file resolves from the page's folder
    body = html.split("</head>", 1)[1].split('id="report-data"', 1)[0]
    links = re.findall(r'href="([^"#][^"]*)"', body)
    assert links and all((report.parent / unquote(h)).is_file() for h in links), links[:3]
    assert "triangle" in html and "Clever-Hans candidate" in html
    # the flagged strategy's evidence is on the page, in words, with the rule that flagged it
    assert "cut crosses" in html and "false-alarm rate 0.05" in html and "the rest&#x27;s" in html

    small = params | {"report": {**REPORT_DEFAULTS, "max_points": 100, "hover_thumbnails": 5}}
    view, _ = build_audit_view(small, root / "spray", root / "store", root / "prepared", tmp_path / "a.html")
    triangle = next(cv for cv in view.classes if cv.name == "triangle")
    assert len(triangle.points) >= 100 and len(triangle.hover) == 5
    assert {t.sample_id for t in triangle.hover} <= set(triangle.points.sample_id)
    flagged = [c for c in triangle.clusters if c.flagged]
    assert len(flagged) == 1 and flagged[0].mean_relevance.shape == (64, 64)
    # the flagged cluster's mean map piles its relevance on the planted stamp (10x10, bottom-left corner)
    mean = np.clip(flagged[0].mean_relevance, 0, None)
    assert mean[-20:, :20].sum() / mean.sum() > 0.5
    others = [c for c in triangle.clusters if not c.flagged]
    assert all(
        np.clip(c.mean_relevance, 0, None)[-20:, :20].sum() / np.clip(c.mean_relevance, 0, None).sum() < 0.3
        for c in others
    )
    html = render_audit(view)
    assert "showing" in html and "of 500 samples" in html


def test_report_stage_names_what_is_missing(small_benchmark, tmp_path):
    root, params = small_benchmark["dir"], small_benchmark["params"]
    spray = tmp_path / "spray"
    shutil.copytree(root / "spray", spray)
    (spray / "classes.json").unlink()
    with pytest.raises(FileNotFoundError, match="classes.json is missing"):
        run_report(params, spray, root / "store", root / "prepared", tmp_path / "a.html")
    assert not (tmp_path / "a.html").exists()
