"""Heatmaps as images, with torch and the standard library only (the engine has no plotting dependency).

LRP users read maps in a diverging colour map centred at zero: red for positive relevance, blue for negative,
white for none, each map scaled by its own largest absolute value.
"""

from __future__ import annotations

import os
import struct
import tempfile
import zlib
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["heatmap_rgb", "image_rgb", "write_png", "grid"]


def heatmap_rgb(relevance: Tensor) -> Tensor:
    """``(B, [C,] H, W)`` relevance -> ``(B, H, W, 3)`` uint8: channel sum, symmetric scaling, red-white-blue."""
    r = relevance.detach().float()
    if r.dim() == 4:
        r = r.sum(1)
    scale = r.abs().flatten(1).amax(1).clamp(min=1e-12).view(-1, 1, 1)
    v = (r / scale).clamp(-1, 1)
    pos, neg = v.clamp(min=0), (-v).clamp(min=0)
    red = 1 - neg
    green = 1 - pos - neg
    blue = 1 - pos
    rgb = torch.stack([red, green, blue], -1).clamp(0, 1)
    return (rgb * 255).round().to(torch.uint8)


def image_rgb(x: Tensor) -> Tensor:
    """``(B, C, H, W)`` images (any range) -> ``(B, H, W, 3)`` uint8, min-max scaled per image."""
    x = x.detach().float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    lo = x.flatten(1).amin(1).view(-1, 1, 1, 1)
    hi = x.flatten(1).amax(1).view(-1, 1, 1, 1)
    x = (x - lo) / (hi - lo).clamp(min=1e-12)
    return (x.permute(0, 2, 3, 1) * 255).round().to(torch.uint8)


def grid(rows: list[Tensor], pad: int = 2, scale: int = 1) -> Tensor:
    """Tile rows of ``(N, H, W, 3)`` uint8 images into one ``(H', W', 3)`` image with white padding."""
    n = max(r.shape[0] for r in rows)
    h, w = rows[0].shape[1] * scale, rows[0].shape[2] * scale
    out = torch.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, dtype=torch.uint8)
    for i, row in enumerate(rows):
        if scale > 1:
            row = row.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        for j in range(row.shape[0]):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            out[top : top + h, left : left + w] = row[j]
    return out


def write_png(path: str | os.PathLike, rgb: Tensor) -> Path:
    """Write an ``(H, W, 3)`` uint8 image as PNG, atomically (a reader never sees half a file)."""
    if rgb.dtype != torch.uint8 or rgb.dim() != 3 or rgb.shape[2] != 3:
        raise ValueError(f"write_png expects (H, W, 3) uint8; got {tuple(rgb.shape)} {rgb.dtype}")
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + bytes(row) for row in rgb.contiguous().numpy().reshape(height, -1))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(png)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a written report should be readable like any file
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
