"""The project as a user meets it: import boundaries, the demos, the README's examples."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imported_modules(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_audits_does_not_import_torch():
    assert "torch" not in _imported_modules("import audits")
    modules = _imported_modules("import audits.report, audits.report.demo; audits.report.demo.synthetic_view(1, 12)")
    assert not {"torch", "pipeline", "lrp_core"} & modules


def test_stages_that_compute_no_relevance_start_without_torch():
    """builtin, prepare, spray, report and compare import neither torch nor umap: seconds saved per stage run."""
    modules = _imported_modules(
        "import pipeline.cli, pipeline.stages, pipeline.spray_stage, pipeline.report_stage, pipeline.compare_stage"
    )
    assert not {"torch", "umap"} & modules


def test_the_errors_of_the_command_line_are_value_errors():
    """entry_point catches them as ValueError (one line, no traceback) without importing their modules."""
    from pipeline.artifact import ArtifactError
    from pipeline.attribute import AttributionError
    from pipeline.datasets import DataError
    from pipeline.models import CheckpointError

    assert all(issubclass(e, ValueError) for e in (ArtifactError, AttributionError, DataError, CheckpointError))


def test_lrp_core_imports_nothing_of_the_project_but_itself():
    modules = _imported_modules("import lrp_core, lrp_core.demo, lrp_core.sequence_demo, lrp_core.neuralized")
    assert not {"audits", "pipeline", "torchvision", "zennit", "sklearn"} & modules


def _readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {title}")
    return text[start : text.index("\n## ", start + 1)]


def test_readme_examples_beyond_cnns_run(capsys):
    """The section's python examples run as written, and print what the README says they print."""
    section = _readme_section("LRP beyond CNNs")
    blocks = [block.split("```", 1)[0] for block in section.split("```python\n")[1:]]
    assert len(blocks) == 2
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    printed = capsys.readouterr().out.split("\n")
    assert printed[0] == "1.0"
    for line, documented in zip(printed[1:4], ([0.14, 0.09, 24.2, 0.17, 0.20], [0.33, 0.21, 6.73, 0.33, 0.36],
                                               [4.07, 2.53, 17.6, 3.06, 2.62])):  # fmt: skip
        values = [float(v) for v in line[line.index("[") + 1 : line.index("]")].split(",")]
        assert values == pytest.approx(documented, rel=0.02, abs=0.01), line


def test_sequence_demo_finds_the_markers():
    result = subprocess.run(
        [sys.executable, "-m", "lrp_core.sequence_demo", "--test", "200", "--show", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "test accuracy 1.000" in result.stdout
    assert "most relevant token is the marker in 100.0% of 200 sequences" in result.stdout
    assert result.stdout.count("marker at") == 2


def test_no_module_of_lrp_core_or_audits_mentions_pipeline():
    for package in ("lrp_core", "audits"):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            assert "import pipeline" not in text and "from pipeline" not in text, path


def test_demo_writes_a_png_grid(tmp_path):
    out = tmp_path / "demo.png"
    result = subprocess.run(
        [sys.executable, "-m", "lrp_core.demo", "--out", str(out), "--steps", "40", "--images", "4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask, "written with the permissions of any new file"
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    assert "per-layer relevance" in result.stdout and "Flat" in result.stdout
    # 4 images of 32 px at scale 3, 4 rows (inputs + 3 composites), 2 px padding
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (4 * 98 + 2, 4 * 98 + 2)
