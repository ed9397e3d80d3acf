# -*- coding: utf-8 -*-
# Copyright: (c) 2026, GrandModel Ops
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: png_line_plot
short_description: Write a small PNG line plot of time series (panels stacked, one x axis)
version_added: 0.1.0
description:
  - Draws O(panels) stacked from top to bottom into one PNG of O(width) x O(height) pixels and writes it to O(path)
    when its bytes differ from the file there. Used by the daily report runbook for the day's latency and
    throughput per colour.
  - Each panel draws its series as lines over the x range of all points of every panel, with y from 0 to the panel's
    largest value. A series named after a colour (V(blue), V(green), V(red), ...) is drawn in that colour.
  - Needs nothing but Python's standard library (zlib, struct).
author:
  - GrandModel Ops (@quantnova)
attributes:
  check_mode:
    support: full
    description: In check mode the picture is drawn and compared with the file, and nothing is written.
  diff_mode:
    support: none
    description: A picture has no useful text diff; RV(sha256) says what would be written.
  platform:
    support: full
    platforms: posix
    description: Any host with Python 3.
options:
  path:
    description: The PNG file to write; its folder must exist.
    type: path
    required: true
  panels:
    description:
      - The panels from top to bottom. Each is a mapping with C(title) (shown in the result, not drawn) and
        C(series), a mapping of a label to a list of C([x, y]) points (x usually a Unix time).
      - Points whose y is not a finite number (a C(NaN) from Prometheus) are left out.
    type: list
    elements: dict
    required: true
  width:
    description: Width in pixels (16 to 4096).
    type: int
    default: 640
  height:
    description: Height in pixels (16 to 4096).
    type: int
    default: 320
  mode:
    description: Permissions of the written file.
    type: raw
    default: "0644"
"""

EXAMPLES = r"""
- name: Plot the day's p95 latency and request rate per colour
  quantnova.grandmodel.png_line_plot:
    path: /srv/reports/daily_report/plot.png
    width: 640
    height: 320
    panels:
      - title: p95 latency (s)
        series:
          blue: [[1764633600, 0.012], [1764633900, 0.014]]
          green: [[1764633600, 0.011], [1764633900, 0.013]]
      - title: requests per second
        series:
          blue: [[1764633600, 30.0], [1764633900, 31.5]]
  delegate_to: localhost
"""

RETURN = r"""
path:
  description: The file written (or that would be written in check mode).
  returned: always
  type: str
width:
  description: Width of the picture in pixels.
  returned: always
  type: int
height:
  description: Height of the picture in pixels.
  returned: always
  type: int
size:
  description: Bytes of the PNG.
  returned: always
  type: int
sha256:
  description: SHA-256 of the PNG's bytes.
  returned: always
  type: str
panels:
  description: Per panel its title and the number of points drawn per series.
  returned: always
  type: list
  elements: dict
  sample: [{"title": "p95 latency (s)", "points": {"blue": 288, "green": 288}}]
"""

import hashlib
import os
import tempfile

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.quantnova.grandmodel.plugins.module_utils.png_plot import PlotError, render


def _points(title, label, points):
    """[[x, y], ...] as floats; a point that is not a pair of numbers is bad input naming its panel and series."""
    out = []
    for point in points or []:
        try:
            x, y = point
            out.append((float(x), float(y)))
        except (TypeError, ValueError) as exc:
            raise PlotError("panel %r, series %r: %r is not an [x, y] pair of numbers" % (title, label, point)) from exc
    return out


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            panels=dict(type="list", elements="dict", required=True),
            width=dict(type="int", default=640),
            height=dict(type="int", default=320),
            mode=dict(type="raw", default="0644"),
        ),
        supports_check_mode=True,
    )
    path, width, height = module.params["path"], module.params["width"], module.params["height"]
    try:
        panels, summary = [], []
        for number, panel in enumerate(module.params["panels"]):
            title = str(panel.get("title", "panel %d" % (number + 1)))
            series = panel.get("series") or {}
            if not isinstance(series, dict):
                raise PlotError("panel %r: series must be a mapping of a label to [[x, y], ...]" % title)
            drawn = {str(label): _points(title, label, points) for label, points in series.items()}
            panels.append(drawn)
            summary.append({"title": title, "points": {label: len(p) for label, p in drawn.items()}})
        data = render(panels, width, height)
    except PlotError as exc:
        module.fail_json(msg="Drawing the plot for %s failed: %s" % (path, exc))
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        module.fail_json(msg="Writing the plot %s failed: the folder %s does not exist" % (path, folder))
    current = None
    if os.path.exists(path):
        with open(path, "rb") as existing:
            current = existing.read()
    changed = current != data
    if changed and not module.check_mode:
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=".png_line_plot.")
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        module.atomic_move(temporary, path)
    if not module.check_mode:
        changed = module.set_mode_if_different(path, module.params["mode"], changed)
    module.exit_json(changed=changed, path=path, width=width, height=height, size=len(data),
                     sha256=hashlib.sha256(data).hexdigest(), panels=summary)


if __name__ == "__main__":
    main()
