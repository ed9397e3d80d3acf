# -*- coding: utf-8 -*-
# Copyright: (c) 2026, GrandModel Ops
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Small line plots as PNG with the standard library only (zlib + struct): no plotting library on the controller.

A plot is a stack of panels sharing one x axis (time); each panel draws its series as 2-pixel lines scaled to the
panel's own y range (0 to the largest value). Colours come from a series' label (blue, green, ...) so a colour of
the service is drawn in that colour; the report beside the picture gives the numbers, the picture gives the shape.
"""

from __future__ import annotations

import struct
import zlib
from typing import Tuple

# typing's aliases, not tuple[...]: module_utils are imported by every Python a target host may have.
Rgb = Tuple[int, int, int]
Point = Tuple[float, float]

BACKGROUND: Rgb = (255, 255, 255)
FRAME: Rgb = (96, 96, 96)
GRID: Rgb = (225, 225, 225)
NAMED: dict[str, Rgb] = {
    "blue": (31, 94, 204), "green": (24, 150, 60), "red": (200, 40, 40), "orange": (230, 130, 20),
    "purple": (130, 60, 170), "black": (0, 0, 0),
}
PALETTE: tuple[Rgb, ...] = ((200, 40, 40), (230, 130, 20), (130, 60, 170), (0, 150, 150), (120, 120, 120))
MARGIN = 6


class PlotError(ValueError):
    """The plot cannot be drawn as asked (size, data)."""


def colour_of(label: str, index: int = 0) -> Rgb:
    """The colour a series is drawn in: its own name when it names one, else a palette colour by position."""
    return NAMED.get(label.lower(), PALETTE[index % len(PALETTE)])


class Canvas:
    def __init__(self, width: int, height: int) -> None:
        if not (16 <= width <= 4096 and 16 <= height <= 4096):
            raise PlotError("a plot must be 16 to 4096 pixels wide and high, not %dx%d" % (width, height))
        self.width = width
        self.height = height
        self.pixels = bytearray(BACKGROUND * (width * height))

    def set(self, x: int, y: int, rgb: Rgb) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            at = 3 * (y * self.width + x)
            self.pixels[at:at + 3] = bytes(rgb)

    def hline(self, x0: int, x1: int, y: int, rgb: Rgb) -> None:
        for x in range(min(x0, x1), max(x0, x1) + 1):
            self.set(x, y, rgb)

    def vline(self, x: int, y0: int, y1: int, rgb: Rgb) -> None:
        for y in range(min(y0, y1), max(y0, y1) + 1):
            self.set(x, y, rgb)

    def line(self, x0: int, y0: int, x1: int, y1: int, rgb: Rgb) -> None:
        """Bresenham, two pixels thick (the pixel below each one)."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            self.set(x0, y0, rgb)
            self.set(x0, y0 + 1, rgb)
            if x0 == x1 and y0 == y1:
                return
            doubled = 2 * err
            if doubled >= dy:
                err += dy
                x0 += sx
            if doubled <= dx:
                err += dx
                y0 += sy

    def png(self) -> bytes:
        return encode_png(self.width, self.height, self.pixels)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(width: int, height: int, rgb: bytes | bytearray) -> bytes:
    """An 8-bit RGB PNG of `rgb` (rows top to bottom, 3 bytes a pixel), every row with filter type 0."""
    stride = 3 * width
    if len(rgb) != stride * height:
        raise PlotError("%d bytes of pixels do not make a %dx%d RGB image" % (len(rgb), width, height))
    raw = b"".join(b"\x00" + bytes(rgb[row * stride:(row + 1) * stride]) for row in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(
        b"IEND", b"")


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's header; PlotError when `data` is not a PNG."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise PlotError("not a PNG file")
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def _finite(points: list[Point]) -> list[Point]:
    return [(float(x), float(y)) for x, y in points if float(y) == float(y) and abs(float(y)) != float("inf")]


def render(panels: list[dict[str, list[Point]]], width: int, height: int) -> bytes:
    """Stack `panels` (each a mapping label -> [(x, y), ...]) into one PNG of `width` x `height`.

    All panels share the x range of every point; each scales y from 0 to its own largest value. A panel without
    points is drawn empty (its frame only), so a day without traffic still gives a picture of the stated size.
    """
    if not panels:
        raise PlotError("a plot needs at least one panel")
    canvas = Canvas(width, height)
    cleaned = [{label: sorted(_finite(points)) for label, points in panel.items()} for panel in panels]
    xs = [x for panel in cleaned for points in panel.values() for x, _y in points]
    x_min, x_max = (min(xs), max(xs)) if xs else (0.0, 1.0)
    x_span = (x_max - x_min) or 1.0
    band = height // len(panels)
    if band < 2 * MARGIN + 4:
        raise PlotError("%d panels do not fit in %d pixels of height" % (len(panels), height))
    for index, panel in enumerate(cleaned):
        top, bottom = index * band + MARGIN, (index + 1) * band - MARGIN
        left, right = MARGIN, width - 1 - MARGIN
        for quarter in (1, 2, 3):
            canvas.hline(left, right, top + (bottom - top) * quarter // 4, GRID)
        canvas.hline(left, right, top, FRAME)
        canvas.hline(left, right, bottom, FRAME)
        canvas.vline(left, top, bottom, FRAME)
        canvas.vline(right, top, bottom, FRAME)
        ys = [y for points in panel.values() for _x, y in points]
        y_max = max([y for y in ys if y > 0] or [1.0]) * 1.1
        for number, (label, points) in enumerate(sorted(panel.items())):
            rgb = colour_of(label, number)
            placed = [(left + round((x - x_min) / x_span * (right - left)),
                       bottom - round(max(0.0, min(y, y_max)) / y_max * (bottom - top))) for x, y in points]
            for at in range(1, len(placed)):
                canvas.line(*placed[at - 1], *placed[at], rgb)
            if len(placed) == 1:
                canvas.line(placed[0][0], placed[0][1], placed[0][0], placed[0][1], rgb)
    return canvas.png()
