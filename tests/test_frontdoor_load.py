"""The load generator's own accounting: the colour sequence and the reload overlap it reports."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from frontdoor_load import Report, Request


def report(*answers: tuple[float, str], failed_at: float | None = None) -> Report:
    rep = Report()
    for started, color in answers:
        rep.add(Request(started, 0.01, 200, color, True))
    if failed_at is not None:
        rep.add(Request(failed_at, 0.01, 0, "", True, "RemoteDisconnected: closed"))
    return rep


def test_a_clean_cutover_is_one_switch():
    rep = report((0.0, "blue"), (0.5, "blue"), (1.0, "green"), (1.5, "green"))
    assert rep.colors() == rep.colors(settle=1.0) == ["blue", "green"]
    assert rep.overlap(1.0) == {"requests": 0, "max_s": 0.0, "settle_s": 1.0}


def test_old_workers_finishing_within_the_settle_window_are_overlap_not_a_switch_back():
    rep = report((0.0, "blue"), (1.0, "green"), (1.2, "blue"), (1.6, "blue"), (2.0, "green"))
    assert rep.colors() == ["blue", "green", "blue", "green"]
    assert rep.colors(settle=1.0) == ["blue", "green"]
    assert rep.overlap(1.0) == {"requests": 2, "max_s": 0.6, "settle_s": 1.0}


def test_the_old_colour_answering_later_is_a_switch_back():
    rep = report((0.0, "blue"), (1.0, "green"), (2.5, "blue"), (3.0, "blue"))
    assert rep.colors(settle=1.0) == ["blue", "green", "blue"]
    summary = rep.summary()
    assert summary["color_sequence_settled"] == ["blue", "green", "blue"]


def test_each_switch_has_its_own_window_and_failures_never_count_as_a_colour():
    rep = report((0.0, "blue"), (1.0, "green"), (1.1, "blue"), (5.0, "blue"), (5.3, "green"),
                 (9.0, "green"), failed_at=9.5)
    assert rep.colors(settle=1.0) == ["blue", "green", "blue", "green"]
    assert rep.overlap(1.0)["requests"] == 2
    assert rep.summary()["failed"] == 1
