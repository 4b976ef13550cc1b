#!/usr/bin/env python3
"""Set up and run spray-audit on a machine that has only Python 3.

    python3 tasks.py audit   # create .venv, install the project, `dvc repro` the audit on the built-in default
    python3 tasks.py test    # create .venv, install the project with its test extra, run ruff and pytest (CI:
                             # every test but the `slow` acceptance runs, about 18 minutes on 2 cores)
    python3 tasks.py acceptance  # the same with the `slow` tests too (about 33 minutes on 2 cores)

The virtual environment is reused while pyproject.toml and constraints.txt are unchanged.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("SPRAY_VENV", ROOT / ".venv"))
PYTHON = VENV / "bin" / "python"


def _run(*args: str | os.PathLike) -> None:
    print("+", " ".join(map(str, args)), flush=True)
    subprocess.run([str(a) for a in args], cwd=ROOT, check=True)


def ensure_environment(extra: str | None) -> None:
    """Create the venv and install the project (with ``extra``) unless an identical install is recorded."""
    digest = hashlib.sha256()
    for name in ("pyproject.toml", "constraints.txt"):
        digest.update((ROOT / name).read_bytes())
    stamp = VENV / f".installed-{extra or 'base'}"
    if stamp.exists() and stamp.read_text() == digest.hexdigest() and PYTHON.exists():
        return
    if not PYTHON.exists():
        venv.create(VENV, with_pip=True)
    target = f".[{extra}]" if extra else "."
    _run(PYTHON, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    _run(PYTHON, "-m", "pip", "install", "--quiet", "-c", "constraints.txt", "-e", target)
    stamp.write_text(digest.hexdigest())


def audit() -> None:
    ensure_environment(None)
    # the stages call the `spray-audit` console script of the venv; DVC must not phone home
    os.environ["PATH"] = f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    os.environ["DVC_NO_ANALYTICS"] = "1"
    _run(VENV / "bin" / "dvc", "repro")
    _run(VENV / "bin" / "dvc", "metrics", "show")


def test(markers: str = "not slow") -> None:
    ensure_environment("test")
    if not any(shutil.which(b) for b in ("chromium", "chromium-browser")):
        print("note: no Chromium; the report's browser tests will skip (apt-get install chromium)", flush=True)
    _run(PYTHON, "-m", "ruff", "check", ".")
    _run(PYTHON, "-m", "pytest", "-q", "--durations=10", "tests", *(["-m", markers] if markers else []))


def acceptance() -> None:
    test(markers="")


def main() -> None:
    commands = {"audit": audit, "test": test, "acceptance": acceptance}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: python3 {Path(__file__).name} {{{'|'.join(commands)}}}")
    try:
        commands[sys.argv[1]]()
    except subprocess.CalledProcessError as err:
        sys.exit(err.returncode)


if __name__ == "__main__":
    main()
