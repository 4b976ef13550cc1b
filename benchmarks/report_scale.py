"""How the audit page copes with size: 100 classes and 50k samples by default.

Builds a synthetic audit (``audits.report.demo``), renders it twice, once as shipped (class sections beyond
``open_classes`` stay inert templates until opened) and once eager (every section open, every plot drawn on load,
the baseline), and opens both in headless Chromium with all outside requests blocked. Prints JSON with sizes,
build times, time until the plots are drawn, the JS heap, and the eager/lazy ratios.

    .venv/bin/python benchmarks/report_scale.py [--classes 100] [--per-class 500]

Needs the test extra (playwright) and Debian's chromium (``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from audits.report import render_audit
from audits.report.demo import synthetic_view

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         "--disable-component-update", "--disable-sync", "--disable-quic", "--enable-precise-memory-info"]  # fmt: skip


def measure_in_browser(path: Path, chromium: str) -> dict:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        own = path.resolve().as_uri()
        blocked: list[str] = []
        page.route("**/*", lambda r: r.continue_() if r.request.url == own else (blocked.append(1), r.abort()))
        page.goto(own, wait_until="load")
        page.wait_for_function(
            "document.querySelectorAll('[data-rendered]').length === "
            "document.querySelectorAll('[data-rendered=done]').length",
            timeout=600_000,
        )
        result = page.evaluate(
            """() => ({
                ready_s: performance.now() / 1000,
                plots: document.querySelectorAll('.js-plotly-plot').length,
                dom_nodes: document.getElementsByTagName('*').length,
                js_heap_mb: performance.memory ? performance.memory.usedJSHeapSize / 1e6 : null,
            })"""
        )
        start = time.perf_counter()
        page.mouse.wheel(0, 20000)  # scroll a long way: a janky page shows up here
        page.wait_for_timeout(50)
        result["scroll_s"] = time.perf_counter() - start
        result["blocked_requests"] = len(blocked)
        browser.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--per-class", type=int, default=500)
    parser.add_argument("--open-classes", type=int, default=12)
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    view = synthetic_view(args.classes, args.per_class, exemplars=2, hover=10, thumb=64)
    out: dict = {"classes": args.classes, "samples": args.classes * args.per_class}
    with tempfile.TemporaryDirectory() as tmp:
        for name, open_classes in (("lazy", args.open_classes), ("eager_baseline", args.classes)):
            start = time.perf_counter()
            html = render_audit(view, open_classes=open_classes)
            built = time.perf_counter() - start
            path = Path(tmp) / f"{name}.html"
            path.write_text(html, encoding="utf-8")
            out[name] = {"build_s": round(built, 2), "size_mb": round(len(html.encode()) / 1e6, 1)}
            if chromium:
                out[name].update({k: round(v, 3) if isinstance(v, float) else v
                                  for k, v in measure_in_browser(path, chromium).items()})  # fmt: skip
    if chromium:
        lazy, eager = out["lazy"], out["eager_baseline"]
        out["ready_speedup_vs_eager"] = round(eager["ready_s"] / lazy["ready_s"], 2)
        if lazy["js_heap_mb"] and eager["js_heap_mb"]:
            out["heap_ratio_lazy_over_eager"] = round(lazy["js_heap_mb"] / eager["js_heap_mb"], 3)
    else:
        out["browser"] = "chromium not found: sizes and build times only"
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
