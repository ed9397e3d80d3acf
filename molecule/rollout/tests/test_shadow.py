"""The shadow phase (issue 14 item 1) through the scenario's real nginx front door, under load.

A release whose model disagrees with the live one is refused before it serves a single client: the rollout's
shadow phase (`rollout_shadow_seconds`) has the load balancer mirror its live predict requests to the idle new
colour, then quantnova.grandmodel.shadow_compare joins both colours' answers on nginx's request id.

The scenario's releases are exported from different seeds (prepare.yml: 2026.11.0 seed 7, 2026.11.1 seed 8,
2026.11.2 seed 9), so any release other than the live one is a model with other weights. An independent client on
this machine sends steady predictions with varied inputs (scripts/frontdoor_load.py's generator, its body drawn
per request) and logs every answer's status and serving colour (nginx's X-Served-By): 0 failed requests, every
answer from the live colour, the live colour unchanged, no mirror file left on the load balancer, and the
deployment record names the shadow phase with the comparison's figures.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

PROJECT = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(PROJECT / "scripts"))

from frontdoor_load import LoadGenerator  # noqa: E402

# The scenario's hosts, files and helpers, as test_rollout.py defines them.
from test_rollout import APP, UPSTREAM, lb_file, playbook, records  # noqa: E402
from test_rollout import front_version as version  # noqa: E402

MIRROR_FILE = "/etc/nginx/grandmodel/shadow.d/mirror.conf"
RELEASES = ["2026.11.0", "2026.11.1", "2026.11.2"]  # seeds 7, 8, 9 (prepare.yml)
RATE = 60.0
# 5 s of mirrored live requests at 60/s: some 300 pairs to join, three times the 100 the comparison needs.
SHADOW = {"rollout_weight_steps": [10, 100], "rollout_shadow_seconds": 5, "rollout_shadow_min_joined": 100}

testinfra_hosts = [f"ansible://{APP}"]


class VariedLoad(LoadGenerator):
    """The scenario's load generator with a different single-sample input on every request."""

    def __init__(self, **kwargs: Any) -> None:
        rng = np.random.default_rng(14)
        self._bodies = [json.dumps({"inputs": rng.uniform(-1, 1, (48, 13)).round(4).tolist()}).encode()
                        for _ in range(400)]
        super().__init__(**kwargs)

    @property
    def body(self) -> bytes:
        return random.choice(self._bodies)

    @body.setter
    def body(self, _value: bytes) -> None:
        pass  # the parent's fixed body is not used


def test_a_release_whose_model_disagrees_is_refused_in_shadow_before_serving_any_client(host):
    live = version()
    live_color, live_release = live["color"], live["models"]["strategic"]["version"]
    idle_color = "green" if live_color == "blue" else "blue"
    target = next(r for r in RELEASES if r != live_release)
    idle_unit = f"grandmodel-model@{idle_color}"
    idle_was_active = host.run(f"systemctl is-active {idle_unit}").stdout.strip() == "active"
    before = len(records(host))
    gen = VariedLoad(port=28080, rate=RATE, workers=8, seconds=600, max_requests=100_000)
    gen.start()
    time.sleep(2.0)
    started = time.monotonic()
    try:
        proc = playbook("rollout.yml", "-e", f"release_version={target}", "-e", json.dumps(SHADOW))
    finally:
        elapsed = time.monotonic() - started
        time.sleep(2.0)
        report = gen.stop()
        if not idle_was_active:  # leave the idle colour as the scenario's next tests expect it (stopped)
            with host.sudo():
                host.run(f"systemctl stop {idle_unit}")
    answered = {r.color for r in report.requests if r.ok}
    figures = {"release": target, "live": f"{live_color} {live_release}", "seconds": round(elapsed, 1),
               "requests": report.total, "failed": len(report.failed), "answered_by": sorted(answered)}
    print("\nshadow refusal:", json.dumps(figures))
    said = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode != 0, proc.stdout[-4000:]
    assert "shadow comparison refused release " + target in said, proc.stdout[-4000:]
    assert "agreement_min" in said, proc.stdout[-4000:]
    # Not one client request failed or reached the new colour; the live colour still serves alone.
    assert report.failed == [], figures
    assert answered == {live_color}, figures
    assert report.total >= RATE * 10, figures
    assert version()["color"] == live_color
    assert f"active_color: {live_color}" in lb_file(UPSTREAM).read_text()
    assert "weights:" not in lb_file(UPSTREAM).read_text()
    assert not lb_file(MIRROR_FILE).exists()
    # The record names the shadow phase and keeps the comparison's figures.
    new = records(host)[before:]
    assert [r["outcome"] for r in new] == ["aborted_step"], new
    failed_step = new[0]["evidence"]["failed_step"]
    assert failed_step["step"]["index"] == "shadow", failed_step
    assert "shadow comparison refused" in failed_step["message"], failed_step
    (shadow,) = new[0]["evidence"]["steps"]
    stats = shadow["shadow"]["statistics"]
    print("shadow comparison:", json.dumps({k: stats[k] for k in ("joined", "agreement", "probability_diff_max",
                                                                   "latency_ratio_p50", "latency_ratio_p99")}))
    assert shadow["shadow"]["outcome"] == "failed", shadow
    assert stats["joined"] >= 100 and stats["agreement"] < 0.95, stats
    with contextlib.suppress(OSError):
        out = PROJECT / "reports" / "rollout-shadow.json"
        out.write_text(json.dumps({**figures, "statistics": {k: stats[k] for k in stats if k != "disagreements"}},
                                  indent=2) + "\n")
