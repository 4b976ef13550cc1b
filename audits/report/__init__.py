"""Standalone HTML audit pages (no torch): composable blocks in :mod:`.html`, plots in :mod:`.figures`,
pictures in :mod:`.images`, and the SpRAy audit page in :mod:`.audit`."""

from .audit import AuditView, ClassView, ClusterView, Thumb, render_audit
from .html import Markup, Page, esc

__all__ = ["AuditView", "ClassView", "ClusterView", "Thumb", "render_audit", "Page", "Markup", "esc"]
