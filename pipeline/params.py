"""params.yaml: one section per stage, read with defaults so a missing key is never a crash deep inside."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

__all__ = ["load_params", "section"]


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"parameter file {path} not found (run from the project root or pass --params)")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of sections; got {type(data).__name__}")
    return data


def section(params: dict[str, Any], name: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """``params[name]`` over ``defaults``; unknown keys are an error naming them (typos must not pass silently)."""
    given = params.get(name) or {}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"unknown keys in params section {name!r}: {unknown}; known: {sorted(defaults)}")
    return defaults | given
