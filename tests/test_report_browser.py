"""The audit report in a real browser (headless Debian Chromium): it renders from disk with every outside request
blocked, every plot draws, every image decodes, nothing logs an error, the legend hides clusters, hover shows
thumbnails, hostile names stay text, and a page of 100 classes and 50k samples stays usable."""

from __future__ import annotations

import time

import pytest
from browser import open_all_sections, open_page, save_screenshot, undecoded_images, wait_for_plots

from audits.report import render_audit
from audits.report.demo import synthetic_view

HOSTILE = "<img src=x onerror=alert(1)>"
N_PLOTS = "document.querySelectorAll('.js-plotly-plot').length"


def _hover_a_thumbnail(page) -> dict:
    """Move the real mouse onto scatter points that have thumbnails until the tooltip shows pictures."""
    targets = page.evaluate(
        """() => {
            const thumbs = window.sprayReport.data.thumbs, out = [];
            document.querySelectorAll('.embedding.js-plotly-plot').forEach((gd, plot) => {
                gd.data.forEach((trace, t) => trace.customdata.forEach((id, i) => {
                    if (thumbs[id] && out.length < 40) out.push({plot, t, i, id});
                }));
            });
            return out;
        }"""
    )
    for target in targets:
        plot = page.locator(".embedding.js-plotly-plot").nth(target["plot"])
        point = plot.locator(".scatterlayer .trace").nth(target["t"]).locator(".point").nth(target["i"])
        point.scroll_into_view_if_needed()
        box = point.bounding_box()
        if box is None:
            continue
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        try:
            page.wait_for_selector("#hover-thumb:not([hidden]) img", timeout=1000)
        except Exception:
            continue
        return page.evaluate(
            """async () => {
                const tip = document.getElementById('hover-thumb');
                const images = Array.from(tip.querySelectorAll('img'));
                await Promise.all(images.map(i => i.decode().catch(() => null)));
                return {caption: tip.firstChild.textContent, decoded: images.filter(i => i.naturalWidth > 0).length,
                        images: images.length};
            }"""
        )
    raise AssertionError("no scatter point showed its thumbnails on hover")


@pytest.mark.slow
def test_default_report_renders_offline_in_chromium(poisoned):
    report = poisoned["dir"] / "reports" / "audit.html"
    with open_page(report) as (page, log):
        wait_for_plots(page)
        save_screenshot(page, "report-top.png")
        open_all_sections(page)
        placeholders = page.evaluate("document.querySelectorAll('[data-figure]').length")
        # per class: spectrum, cluster sizes and the t-SNE scatter (the fixture computes t-SNE only); the
        # explanation-quality section's pixel-flipping curves
        assert placeholders == 3 * 6 + 1 and page.evaluate(N_PLOTS) == placeholders
        assert page.evaluate("document.querySelectorAll('.js-plotly-plot .main-svg').length") >= placeholders
        n_images = page.evaluate("document.images.length")
        assert n_images > 100 and undecoded_images(page) == []

        hovered = _hover_a_thumbnail(page)
        assert hovered["images"] == 2 and hovered["decoded"] == 2 and hovered["caption"].startswith("train/")

        # a legend click hides that cluster's points (and only those)
        plot = page.locator(".embedding.js-plotly-plot").first
        plot.scroll_into_view_if_needed()
        points = "(gd => gd.querySelectorAll('.scatterlayer .point').length)"
        before = plot.evaluate(points)
        first_size = plot.evaluate("gd => gd.data[0].customdata.length")
        plot.locator(".legend .traces .legendtoggle").first.click()
        page.wait_for_function(
            "() => document.querySelector('.embedding.js-plotly-plot').data[0].visible === 'legendonly'"
        )
        page.wait_for_timeout(300)
        assert plot.evaluate(points) == before - first_size and first_size > 0
        save_screenshot(page, "report-full.png", full_page=True)
        assert log.errors == [] and log.blocked == [] and log.dialogs == []


def test_hostile_names_show_as_text_in_the_browser(tmp_path):
    view = synthetic_view(
        2, 40, names=[HOSTILE, "<script>alert(3)</script>"], id_prefix="<img src=y onerror=alert(2)>", hover=40
    )
    report = tmp_path / "hostile.html"
    report.write_text(render_audit(view))
    with open_page(report) as (page, log):
        open_all_sections(page)
        assert HOSTILE in page.locator("h1").inner_text()
        assert page.get_by_text(HOSTILE, exact=True).count() >= 1
        assert page.evaluate('document.querySelectorAll(\'img[src="x"], img[src="y"]\').length') == 0
        titles = page.evaluate("Array.from(document.querySelectorAll('.gtitle')).map(t => t.textContent)")
        assert any(HOSTILE in t for t in titles), titles[:4]
        hovered = _hover_a_thumbnail(page)
        assert hovered["caption"].startswith("<img src=y onerror=alert(2)>")
        page.wait_for_timeout(200)
        assert log.dialogs == [] and log.errors == [] and log.blocked == []


@pytest.mark.slow
def test_a_large_audit_stays_usable(tmp_path):
    """100 classes of 500 samples (50k): class sections beyond the first 12 stay inert until opened."""
    start = time.perf_counter()
    view = synthetic_view(100, 500, exemplars=2, hover=10, thumb=64)
    html = render_audit(view)
    rendered = time.perf_counter() - start
    report = tmp_path / "large.html"
    report.write_text(html)
    size_mb = len(html.encode()) / 1e6
    assert size_mb < 60, f"{size_mb:.1f} MB"
    with open_page(report) as (page, log):
        wait_for_plots(page)
        loaded = page.evaluate("performance.now()") / 1000  # since navigation started
        assert page.evaluate(N_PLOTS) == 12 * 4
        assert page.evaluate("document.querySelectorAll('template').length") == 100 - 12
        # following the overview link of the last class opens it and draws its plots
        last = page.locator("#classes > div.body > table a").last
        last.click()
        page.wait_for_function(f"{N_PLOTS} === 13 * 4")
        wait_for_plots(page)
        assert undecoded_images(page) == []
        assert log.errors == [] and log.blocked == []
    print(f"\nlarge report: {size_mb:.1f} MB, built in {rendered:.1f} s, opened with its plots drawn in {loaded:.1f} s")
    assert loaded < 30
