"""Which code produced an output: the package version and a digest of the package sources.

A digest rather than a git commit: it is the same for the same code whether it runs from a checkout, a copy or a
wheel, so a report (a DVC output) is reproducible bit for bit, and two reports made by different code differ.
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import metadata
from pathlib import Path

__all__ = ["code_version", "source_digest"]

PACKAGES = ("lrp_core", "audits", "pipeline")
SUFFIXES = (".py", ".js", ".css")


@cache
def source_digest() -> str:
    """sha256 over the relative paths and contents of the three packages' source files."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*")):
            if path.suffix in SUFFIXES and path.is_file() and "__pycache__" not in path.parts:
                digest.update(path.relative_to(root).as_posix().encode() + b"\0")
                digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def code_version() -> str:
    try:
        version = metadata.version("spray-audit")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return f"spray-audit {version} (sources sha256 {source_digest()[:16]})"
