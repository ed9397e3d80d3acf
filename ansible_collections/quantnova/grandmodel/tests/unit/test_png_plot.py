"""module_utils.png_plot and the png_line_plot module: valid PNGs of the asked size, lines where the data says."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from test_modules_cli import ansible_module

from ansible_collections.quantnova.grandmodel.plugins.module_utils.png_plot import (
    BACKGROUND,
    NAMED,
    PlotError,
    colour_of,
    encode_png,
    png_size,
    render,
)


def decode(data: bytes) -> tuple[int, int, list[bytes]]:
    """An independent reader: every chunk's CRC checked, IDAT inflated, rows of filter 0 returned."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, chunks = 8, []
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        kind, body = data[at + 4:at + 8], data[at + 8:at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length:at + 12 + length])
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == crc, kind
        chunks.append((kind, body))
        at += 12 + length
    assert [kind for kind, _body in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    width, height, depth, colour_type, _compression, _filter, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour_type, interlace) == (8, 2, 0)
    raw = zlib.decompress(chunks[1][1])
    stride = 1 + 3 * width
    assert len(raw) == stride * height
    rows = [raw[r * stride:(r + 1) * stride] for r in range(height)]
    assert all(row[0] == 0 for row in rows)
    return width, height, [row[1:] for row in rows]


def pixels_of(rows: list[bytes], rgb: tuple[int, int, int]) -> list[tuple[int, int]]:
    return [(x, y) for y, row in enumerate(rows) for x in range(len(row) // 3) if tuple(row[3 * x:3 * x + 3]) == rgb]


@pytest.mark.parametrize(("width", "height"), [(16, 16), (640, 320), (33, 100)])
def test_encoded_png_is_valid_and_of_the_size(width: int, height: int) -> None:
    data = encode_png(width, height, bytes(BACKGROUND) * (width * height))
    assert png_size(data) == (width, height)
    w, h, rows = decode(data)
    assert (w, h) == (width, height) and all(set(row) == {255} for row in rows)


def test_a_rising_line_is_drawn_in_its_colour_rising() -> None:
    data = render([{"blue": [(0, 0.0), (10, 1.0)]}], 200, 100)
    rows = decode(data)[2]
    blue = pixels_of(rows, NAMED["blue"])
    assert blue, "no blue pixel"
    left = [y for x, y in blue if x < 20]
    right = [y for x, y in blue if x > 180]
    assert left and right and min(left) > max(right), "the line must rise from left to right (y grows downwards)"


def test_panels_stack_and_each_series_keeps_its_colour() -> None:
    data = render([{"blue": [(0, 1.0), (5, 2.0)], "green": [(0, 2.0), (5, 1.0)]}, {"green": [(0, 3.0), (5, 3.0)]}],
                  120, 120)
    rows = decode(data)[2]
    green = pixels_of(rows, NAMED["green"])
    assert any(y < 60 for _x, y in green) and any(y >= 60 for _x, y in green)
    assert all(y < 60 for _x, y in pixels_of(rows, NAMED["blue"]))


@pytest.mark.parametrize(("label", "index", "expected"), [
    ("blue", 0, NAMED["blue"]), ("GREEN", 3, NAMED["green"]), ("canary", 0, (200, 40, 40)),
    ("canary", 1, (230, 130, 20)),
])
def test_colour_of(label: str, index: int, expected: tuple[int, int, int]) -> None:
    assert colour_of(label, index) == expected


def test_empty_and_not_finite_data_still_give_a_picture() -> None:
    data = render([{"blue": []}, {"green": [(0, float("nan")), (1, float("inf"))]}], 64, 64)
    assert png_size(data) == (64, 64)


@pytest.mark.parametrize(("panels", "width", "height", "message"), [
    ([], 64, 64, "at least one panel"),
    ([{}], 8, 64, "16 to 4096 pixels"),
    ([{}] * 10, 64, 40, "do not fit"),
])
def test_bad_plots_are_refused_with_the_reason(panels: list, width: int, height: int, message: str) -> None:
    with pytest.raises(PlotError, match=message):
        render(panels, width, height)


def test_png_size_refuses_what_is_not_a_png() -> None:
    with pytest.raises(PlotError, match="not a PNG"):
        png_size(b"GIF89a" + bytes(30))


PANELS = [{"title": "p95 (s)", "series": {"blue": [[0, 0.01], [60, 0.02]], "green": [[0, 0.02], [60, 0.01]]}},
          {"title": "req/s", "series": {"blue": [[0, 30], [60, 31]]}}]


def test_module_writes_once_and_check_mode_writes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "plot.png"
    args = {"path": str(target), "panels": PANELS, "width": 200, "height": 120}
    rc, result = ansible_module("png_line_plot", args, "--check")
    assert (rc, result["changed"], target.exists()) == (0, True, False), result
    rc, result = ansible_module("png_line_plot", args)
    assert (rc, result["changed"]) == (0, True), result
    assert png_size(target.read_bytes()) == (200, 120) and result["size"] == target.stat().st_size
    assert result["panels"] == [{"title": "p95 (s)", "points": {"blue": 2, "green": 2}},
                                {"title": "req/s", "points": {"blue": 1 + 1}}]
    rc, again = ansible_module("png_line_plot", args)
    assert (rc, again["changed"], again["sha256"]) == (0, False, result["sha256"])


@pytest.mark.parametrize(("args", "message"), [
    ({"panels": [{"series": {"blue": [[0, "x"]]}}]}, "series 'blue': [0, 'x'] is not an [x, y] pair of numbers"),
    ({"panels": [{"title": "t", "series": [1, 2]}]}, "panel 't': series must be a mapping"),
    ({"panels": PANELS, "width": 4}, "16 to 4096 pixels"),
])
def test_module_refuses_bad_input_naming_it(tmp_path: Path, args: dict, message: str) -> None:
    rc, result = ansible_module("png_line_plot", dict({"path": str(tmp_path / "p.png")}, **args))
    assert rc != 0 and message in result["msg"], result
    assert not (tmp_path / "p.png").exists()


def test_module_refuses_a_missing_folder(tmp_path: Path) -> None:
    rc, result = ansible_module("png_line_plot", {"path": str(tmp_path / "no" / "p.png"), "panels": PANELS})
    assert rc != 0 and "the folder" in result["msg"] and "does not exist" in result["msg"], result
