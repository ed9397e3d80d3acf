#!/usr/bin/env python3
"""Draw the release timeline of the rollout scenario's weighted walks as one SVG picture.

Input: reports/rollout-walk.json, written by molecule/rollout/tests/test_weighted_walk.py from its independent
client's own count: for each case, the traffic splits in the order the load balancer served them, how long
each lasted, and how many answers each colour gave (the X-Served-By header). Output: per case, the new
colour's configured weight (dashed, right axis) and each colour's answers per second (left axis) over time.

    .venv/bin/python scripts/release_timeline.py reports/rollout-walk.json docs/release-timeline.svg
"""

from __future__ import annotations

import argparse
import json
import sys
from html import escape
from pathlib import Path
from typing import Any

COLOURS = {"blue": "#1f6fb4", "green": "#2a9d3a"}
WIDTH, PANEL, LEFT, RIGHT, TOP = 920, 200, 70, 60, 34


def weights(split: str) -> dict[str, int]:
    """'blue=90 green=10' -> {'blue': 90, 'green': 10}; '+backup blue' names a backup, which has no weight."""
    return {name: int(value) for name, _, value in (t.partition("=") for t in split.split()) if value.isdigit()}


def segments(case: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """The new colour (absent from the first split) and each split's start, length, weights and rates."""
    splits = case["splits"]
    first = set(weights(splits[0]["split"]))
    named = {c for s in splits for c in weights(s["split"])} | {c for s in splits for c in s["answers"]}
    new = sorted(named - first)[0] if named - first else sorted(first)[0]
    out, start = [], 0.0
    for s in splits:
        seconds = max(float(s["seconds"]), 0.1)
        out.append({"start": start, "seconds": seconds, "split": s["split"],
                    "weight": weights(s["split"]).get(new, 0),
                    "rates": {c: n / seconds for c, n in s["answers"].items()}})
        start += seconds
    return new, out


def panel(name: str, case: dict[str, Any], top: float) -> list[str]:
    new, segs = segments(case)
    total = float(segs[-1]["start"] + segs[-1]["seconds"])
    peak = max((r for s in segs for r in s["rates"].values()), default=1.0) * 1.15
    plot_w, plot_h = WIDTH - LEFT - RIGHT, PANEL - 62

    def x(t: float) -> float:
        return LEFT + plot_w * t / total

    def y_rate(r: float) -> float:
        return top + TOP + plot_h * (1 - r / peak)

    def y_weight(w: float) -> float:
        return top + TOP + plot_h * (1 - w / 100)

    title = (f"{name}: {case['requests']} requests in {case['seconds']:.1f} s, {case['failed']} failed; "
             f"new colour {new}" + ("; the step's gate fired and traffic went back" if case.get("fired") else ""))
    svg = [f'<text x="{LEFT}" y="{top + 18}" font-size="13" font-weight="bold">{escape(title)}</text>',
           f'<rect x="{LEFT}" y="{top + TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>']
    for i, s in enumerate(segs):
        x0, x1 = x(s["start"]), x(s["start"] + s["seconds"])
        below = 14 if x1 - x0 > 120 or i % 2 == 0 else 26  # narrow splits alternate their label's line
        svg.append(f'<line x1="{x0:.1f}" y1="{top + TOP}" x2="{x0:.1f}" y2="{top + TOP + plot_h}" stroke="#ddd"/>')
        svg.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{top + TOP + plot_h + below}" font-size="10" '
                   f'text-anchor="middle">{escape(s["split"])}</text>')
        svg.append(f'<line x1="{x0:.1f}" y1="{y_weight(s["weight"]):.1f}" x2="{x1:.1f}" '
                   f'y2="{y_weight(s["weight"]):.1f}" stroke="#c0392b" stroke-width="2" stroke-dasharray="6 3"/>')
        for colour, rate in s["rates"].items():
            svg.append(f'<line x1="{x0:.1f}" y1="{y_rate(rate):.1f}" x2="{x1:.1f}" y2="{y_rate(rate):.1f}" '
                       f'stroke="{COLOURS.get(colour, "#555")}" stroke-width="3"/>')
            offset = -4 if colour != "green" else 12  # blue above its line, green below: equal rates stay legible
            svg.append(f'<text x="{x1 - 3:.1f}" y="{y_rate(rate) + offset:.1f}" font-size="10" text-anchor="end" '
                       f'fill="{COLOURS.get(colour, "#555")}">{colour} {rate:.0f}/s</text>')
    svg += [f'<text x="{LEFT - 8}" y="{top + TOP + 10}" font-size="10" text-anchor="end">{peak:.0f}/s</text>',
            f'<text x="{LEFT - 8}" y="{top + TOP + plot_h}" font-size="10" text-anchor="end">0</text>',
            f'<text x="{WIDTH - RIGHT + 6}" y="{top + TOP + 10}" font-size="10" fill="#c0392b">100%</text>',
            f'<text x="{WIDTH - RIGHT + 6}" y="{top + TOP + plot_h}" font-size="10" fill="#c0392b">0%</text>',
            f'<text x="{WIDTH - RIGHT}" y="{top + TOP + plot_h + 28}" font-size="10" text-anchor="end">'
            f'splits {total:.1f} s</text>']
    return svg


def render(report: dict[str, Any]) -> str:
    height = PANEL * len(report) + 40
    body = [line for i, (name, case) in enumerate(report.items()) for line in panel(name, case, 10 + i * PANEL)]
    legend = (f'<text x="{LEFT}" y="{height - 10}" font-size="11">answers per second counted by the independent '
              'client: <tspan fill="#1f6fb4">blue</tspan>, <tspan fill="#2a9d3a">green</tspan>; '
              '<tspan fill="#c0392b">dashed: the new colour\'s configured weight</tspan></text>')
    return "\n".join([f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
                      f'font-family="sans-serif">', f'<rect width="{WIDTH}" height="{height}" fill="white"/>',
                      *body, legend, "</svg>", ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="reports/rollout-walk.json of a rollout scenario run")
    parser.add_argument("svg", type=Path, help="where to write the picture")
    args = parser.parse_args(argv)
    try:
        report = json.loads(args.report.read_text())
        svg = render(report)
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        print(f"release_timeline: cannot draw {args.report}: {exc!r}", file=sys.stderr)
        return 2
    args.svg.write_text(svg)
    print(f"release_timeline: {len(report)} cases from {args.report} drawn in {args.svg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
