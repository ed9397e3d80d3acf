"""scripts/release_timeline.py: the release picture of docs/release.md, drawn from a walk's own log."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from .conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import release_timeline

CASE = {"seconds": 20.0, "requests": 1000, "failed": 0, "splits": [
    {"split": "blue=100", "seconds": 10.0, "answers": {"blue": 500}},
    {"split": "blue=90 green=10", "seconds": 5.0, "answers": {"blue": 225, "green": 25}},
    {"split": "green=100 +backup blue", "seconds": 5.0, "answers": {"green": 250}},
]}


def test_weights_ignore_the_backup_and_the_new_colour_is_the_one_not_live_at_first() -> None:
    assert release_timeline.weights("green=100 +backup blue") == {"green": 100}
    new, segments = release_timeline.segments(CASE)
    assert new == "green"
    assert [s["weight"] for s in segments] == [0, 10, 100]
    assert [s["start"] for s in segments] == [0.0, 10.0, 15.0]
    assert segments[1]["rates"] == {"blue": 45.0, "green": 5.0}


def test_the_picture_is_svg_with_one_rate_line_per_colour_and_split(tmp_path: Path) -> None:
    report, svg = tmp_path / "walk.json", tmp_path / "walk.svg"
    report.write_text(json.dumps({"walk": CASE}))
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "release_timeline.py"), str(report), str(svg)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    root = ET.parse(svg).getroot()
    texts = [t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert {"blue 50/s", "blue 45/s", "green 5/s", "green 50/s"} <= set(texts)
    assert any("1000 requests in 20.0 s, 0 failed; new colour green" in t for t in texts)


def test_a_log_it_cannot_read_is_refused_with_the_reason(tmp_path: Path) -> None:
    report = tmp_path / "walk.json"
    report.write_text(json.dumps({"walk": {"splits": []}}))
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "release_timeline.py"), str(report),
                           str(tmp_path / "x.svg")], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "cannot draw" in proc.stderr
    assert not (tmp_path / "x.svg").exists()
