"""Heatmaps and inputs as small inline PNGs (numpy and the standard library only).

LRP users read relevance in a diverging colour map centred at zero: red for evidence for the explained class,
blue for evidence against it, white for none; each map is scaled by its own largest absolute value so that the
sign, never the colour of zero, depends on the data.
"""

from __future__ import annotations

import base64
import struct
import zlib

import numpy as np

from ..pooling import sum_pool_matrix

__all__ = [
    "relevance_rgb",
    "image_rgb",
    "overlay_rgb",
    "downsize",
    "png_bytes",
    "indexed_png_bytes",
    "relevance_png",
    "png_data_uri",
    "relevance_data_uri",
]


def relevance_rgb(relevance: np.ndarray) -> np.ndarray:
    """``(H, W)`` signed relevance -> ``(H, W, 3)`` uint8 in blue-white-red, symmetric around zero."""
    r = np.asarray(relevance, dtype=np.float64)
    if r.ndim != 2:
        raise ValueError(f"relevance_rgb expects one (H, W) map; got shape {r.shape}")
    r = np.nan_to_num(r, nan=0.0, posinf=0.0, neginf=0.0)
    scale = np.abs(r).max()
    v = np.clip(r / scale, -1.0, 1.0) if scale > 0 else np.zeros_like(r)
    pos, neg = np.clip(v, 0, None), np.clip(-v, 0, None)
    rgb = np.stack([1 - neg, 1 - pos - neg, 1 - pos], -1)
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def image_rgb(image: np.ndarray) -> np.ndarray:
    """An image as ``(H, W, 3)`` uint8, from ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` with C in {1, 3}.

    uint8 input is kept as it is; float input is min-max scaled (a normalised tensor displays as well as a raw one).
    """
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3):
        raise ValueError(f"image_rgb expects (H, W), (H, W, C) or (C, H, W) with C in 1, 3; got shape {a.shape}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, -1)
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        lo, hi = np.nanmin(a), np.nanmax(a)
        a = np.nan_to_num((a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)) * 255
        a = a.round().astype(np.uint8)
    return np.ascontiguousarray(a)


def overlay_rgb(image: np.ndarray, relevance: np.ndarray, strength: float = 0.85) -> np.ndarray:
    """The heatmap laid over a lightened grey copy of the image: where relevance is, and what is there."""
    base = image_rgb(image).astype(np.float64).mean(-1, keepdims=True) / 255
    base = 0.35 + 0.65 * base
    heat = relevance_rgb(relevance).astype(np.float64) / 255
    r = np.asarray(relevance, dtype=np.float64)
    scale = np.abs(r).max()
    alpha = (np.abs(r) / scale if scale > 0 else np.zeros_like(r))[..., None] ** 0.6 * strength
    if alpha.shape[:2] != base.shape[:2]:
        raise ValueError(f"overlay_rgb: image {base.shape[:2]} and relevance {alpha.shape[:2]} differ in size")
    out = (1 - alpha) * base + alpha * heat
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def downsize(array: np.ndarray, max_side: int, *, conserve: bool = False) -> np.ndarray:
    """Shrink ``(H, W[, C])`` so that its longer side is at most ``max_side`` (never enlarges).

    ``conserve=True`` sums (relevance stays relevance: a thumbnail's total equals the map's); otherwise averages
    (pixel values stay pixel values).
    """
    a = np.asarray(array)
    h, w = a.shape[:2]
    if max(h, w) <= max_side:
        return a
    ratio = max_side / max(h, w)
    out_h, out_w = max(1, round(h * ratio)), max(1, round(w * ratio))
    rows, cols = sum_pool_matrix(h, out_h), sum_pool_matrix(w, out_w)
    if not conserve:
        rows = rows / rows.sum(1, keepdims=True)
        cols = cols / cols.sum(1, keepdims=True)
    small = np.einsum("ih,hw...,jw->ij...", rows, a.astype(np.float64), cols)
    if a.dtype == np.uint8:
        return np.clip(small.round(), 0, 255).astype(np.uint8)
    return small


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def _filtered_rows(pixels: np.ndarray) -> bytes:
    """PNG scanlines, each with the filter (none/sub/up/average/paeth) that libpng's heuristic picks: the smallest
    sum of absolute signed bytes. Thumbnails of natural images shrink by about a third compared with no filter."""
    x = pixels.reshape(pixels.shape[0], -1, pixels.shape[2]).astype(np.int16)  # (H, W, bytes per pixel)
    left = np.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :-1]
    up = np.pad(x, ((1, 0), (0, 0), (0, 0)))[:-1]
    up_left = np.pad(up, ((0, 0), (1, 0), (0, 0)))[:, :-1]
    candidates = np.stack([x, x - left, x - up, x - (left + up) // 2, x - _paeth(left, up, up_left)]) % 256
    lines = candidates.reshape(5, x.shape[0], -1).astype(np.uint8)
    cost = np.minimum(lines, 256 - lines.astype(np.int16)).sum(-1)  # |signed byte|
    best = cost.argmin(0)
    rows = lines[best, np.arange(x.shape[0])]
    return np.concatenate([best[:, None].astype(np.uint8), rows], 1).tobytes()


def _png(header: bytes, chunks: list[tuple[bytes, bytes]]) -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    body = b"".join(chunk(t, d) for t, d in [(b"IHDR", header), *chunks, (b"IEND", b"")])
    return b"\x89PNG\r\n\x1a\n" + body


def png_bytes(rgb: np.ndarray, level: int = 9) -> bytes:
    """Encode ``(H, W, 3)`` uint8 as PNG (no imaging library needed for a report)."""
    a = np.asarray(rgb)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"png_bytes expects (H, W, 3) uint8; got shape {a.shape}, dtype {a.dtype}")
    header = struct.pack(">IIBBBBB", a.shape[1], a.shape[0], 8, 2, 0, 0, 0)
    return _png(header, [(b"IDAT", zlib.compress(_filtered_rows(a), level))])


def indexed_png_bytes(indices: np.ndarray, palette: np.ndarray, level: int = 9) -> bytes:
    """Encode ``(H, W)`` uint8 palette indices with a ``(P, 3)`` uint8 palette (P <= 256): a heatmap is a scalar
    field, so one byte per pixel carries it, a third of RGB."""
    idx, pal = np.asarray(indices), np.asarray(palette)
    if idx.dtype != np.uint8 or idx.ndim != 2 or pal.dtype != np.uint8 or pal.ndim != 2 or pal.shape[1] != 3:
        raise ValueError(f"indexed_png_bytes expects (H, W) uint8 and (P, 3) uint8; got {idx.shape}, {pal.shape}")
    if int(idx.max(initial=0)) >= len(pal) or len(pal) > 256:
        raise ValueError(f"palette of {len(pal)} colours does not cover index {int(idx.max(initial=0))}")
    header = struct.pack(">IIBBBBB", idx.shape[1], idx.shape[0], 8, 3, 0, 0, 0)
    data = zlib.compress(_filtered_rows(idx[..., None]), level)
    return _png(header, [(b"PLTE", pal.tobytes()), (b"IDAT", data)])


def relevance_png(relevance: np.ndarray) -> bytes:
    """A relevance map as an indexed PNG in the same colours as :func:`relevance_rgb` (255 levels, 127 = zero)."""
    r = np.nan_to_num(np.asarray(relevance, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if r.ndim != 2:
        raise ValueError(f"relevance_png expects one (H, W) map; got shape {r.shape}")
    scale = np.abs(r).max()
    v = np.clip(r / scale, -1, 1) if scale > 0 else np.zeros_like(r)
    indices = (np.round(v * 127) + 127).astype(np.uint8)
    return indexed_png_bytes(indices, _PALETTE)


_PALETTE = relevance_rgb(np.linspace(-1, 1, 255)[None, :])[0]


def _uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def png_data_uri(rgb: np.ndarray) -> str:
    """A ``data:image/png;base64,...`` URI: the image travels inside the HTML file."""
    return _uri(png_bytes(rgb))


def relevance_data_uri(relevance: np.ndarray) -> str:
    """A relevance map as a (palette) PNG data URI."""
    return _uri(relevance_png(relevance))
