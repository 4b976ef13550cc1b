"""Errors the LRP engine raises, each naming the module or tensor at fault."""

from __future__ import annotations


class LRPError(RuntimeError):
    """Base class of lrp_core's errors."""


class UnsupportedLayerError(LRPError, TypeError):
    """A module has no LRP rule; raised before any compute, listing every offender."""

    def __init__(self, offenders: list[tuple[str, str, str]]):
        self.offenders = offenders
        lines = [f"  - '{path or '<root>'}' ({kind}): {why}" for path, kind, why in offenders]
        super().__init__(
            "LRP cannot explain this model; these modules have no rule:\n"
            + "\n".join(lines)
            + "\nMap them to a rule with the composite's layer_map/name_map, or replace them."
        )


class CanonizationError(LRPError):
    """A canonizer's assumption (e.g. BatchNorm directly after its conv) does not hold at run time."""
