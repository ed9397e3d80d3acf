#!/usr/bin/env python3
"""Release benchmark: blue-green rollouts and rollbacks on the sandbox hosts, under load.

Each repetition releases the other model version with playbooks/rollout.yml, then returns with the
emergency path playbooks/switch_back.yml (or --rollback-playbook rollback.yml), while
scripts/frontdoor_load.py sends predictions through the front door (keep-alive clients and
new-connection clients, every request's status and colour logged). Then --toggles more runs of
switch_back.yml flip traffic between the two warm colours, for the rollback timing alone.
Measured per run: playbook wall time, cut-over time (the switch's reload to the first answer of the
new colour through the front door, from the traffic switch's own evidence), time to the first
response from the new colour seen by the clients, failed requests by client kind and the largest
latency. Prints a table, medians, and as its last line one JSON object with every figure.

Needs the sandbox deployed (make demo). Traffic goes only to the front door on 127.0.0.1.
  scripts/bench_rollout.py --reps 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from frontdoor_load import LoadGenerator

REPO = Path(__file__).resolve().parent.parent
TARGETS = {"rollout_seconds": 60.0, "rollback_seconds": 5.0}
ROLLBACKS = ("switch_back.yml", "rollback.yml")


def front_version(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/version", timeout=5) as resp:
        return dict(json.load(resp))


def run_playbook(inventory: str, name: str, *extra: str) -> tuple[int, float, str]:
    started = time.monotonic()
    proc = subprocess.run([str(REPO / ".venv/bin/ansible-playbook"), "-i", inventory,
                           str(REPO / "playbooks" / name), *extra],
                          cwd=REPO, capture_output=True, text=True, check=False, timeout=900)
    return proc.returncode, time.monotonic() - started, proc.stdout + proc.stderr


def last_record(app_host: str) -> dict[str, Any]:
    out = subprocess.run(["podman", "exec", app_host, "tail", "-n", "1",
                          "/var/lib/grandmodel/deployments.jsonl"],
                         capture_output=True, text=True, check=True).stdout
    return dict(json.loads(out))


def cutover_seconds(record: dict[str, Any]) -> float | None:
    evidence = record.get("evidence", {})
    switch = evidence.get("switch", []) if isinstance(evidence, dict) else []
    values: list[float] = [float(s["seconds_to_cutover"]) for s in switch
                           if isinstance(s, dict) and isinstance(s.get("seconds_to_cutover"), (int, float))]
    return max(values) if values else None


def measured(inventory: str, playbook: str, extra: list[str], port: int, rate: float,
             app_host: str, expect_color: str) -> dict[str, Any]:
    gen = LoadGenerator(port=port, rate=rate, workers=8, seconds=900, max_requests=500_000)
    gen.start()
    time.sleep(1.5)
    issued = time.monotonic()
    rc, seconds, output = run_playbook(inventory, playbook, *extra)
    time.sleep(1.5)
    report = gen.stop()
    summary = report.summary()
    first_new = report.first_seen(expect_color)
    # switch_back.yml moves traffic only and writes no deployment record.
    record = last_record(app_host) if playbook != "switch_back.yml" else {"outcome": "switched" if rc == 0
                                                                          else "failed", "to_color": expect_color}
    return {
        "playbook": playbook,
        "rc": rc,
        "seconds": round(seconds, 2),
        "outcome": record.get("outcome"),
        "to_color": record.get("to_color"),
        "cutover_seconds": cutover_seconds(record),
        "first_new_color_response_after_start_s": round(first_new - issued, 2) if first_new else None,
        "requests": summary["requests"],
        "failed": summary["failed"],
        "failed_keepalive": summary["failed_keepalive"],
        "failed_new_connection": summary["failed_new_connection"],
        "latency_ms_max": summary["latency_ms_max"],
        "latency_ms_p99": summary["latency_ms_p99"],
        "error": "" if rc == 0 else output[-800:],
    }


def median(values: list[Any]) -> float | None:
    clean = [v for v in values if isinstance(v, (int, float))]
    return round(statistics.median(clean), 2) if clean else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inventory", default="inventories/sandbox")
    parser.add_argument("--app-host", default="gm-sbx-app1")
    parser.add_argument("--port", type=int, default=18080, help="front door on 127.0.0.1")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--rate", type=float, default=40.0, help="requests/s during each run")
    parser.add_argument("--releases", nargs=2, default=["2026.11.0", "2026.11.1"])
    parser.add_argument("--rollback-playbook", default="switch_back.yml", choices=ROLLBACKS,
                        help="how each repetition returns to the old colour")
    parser.add_argument("--weight-steps", type=int, nargs="+", default=[100],
                        help="rollout_weight_steps of each release (default 100: all at once, as the targets assume)")
    parser.add_argument("--toggles", type=int, default=10,
                        help="extra switch_back.yml runs between the two warm colours after the repetitions")
    args = parser.parse_args(argv)

    for seed, version in enumerate(args.releases, start=7):
        subprocess.run([sys.executable, str(REPO / "scripts/build_release.py"), "--version", version,
                        "--seed", str(seed)], check=True, stdout=subprocess.DEVNULL)
    try:
        live = front_version(args.port)
    except OSError as exc:
        print(f"the front door on 127.0.0.1:{args.port} does not answer ({exc}); run 'make demo' first",
              file=sys.stderr)
        return 2

    load_before = round(os.getloadavg()[0], 2)
    runs: list[dict[str, Any]] = []
    print(f"{'rep':>3} {'playbook':<12} {'rc':>2} {'wall s':>7} {'cutover s':>9} {'first new s':>11} "
          f"{'requests':>8} {'failed':>6} {'ka/new':>7} {'max ms':>7}")
    for rep in range(1, args.reps + 1):
        live_models = live["models"]
        live_version = next(iter(live_models.values()))["version"] if isinstance(live_models, dict) else ""
        target = args.releases[1] if live_version == args.releases[0] else args.releases[0]
        live_color = str(live["color"])
        new_color = "green" if live_color == "blue" else "blue"
        for playbook, extra, expect in (
            ("rollout.yml", ["-e", f"release_version={target}",
                             "-e", json.dumps({"rollout_weight_steps": args.weight_steps})], new_color),
            (args.rollback_playbook, [], live_color),
        ):
            run = measured(args.inventory, playbook, extra, args.port, args.rate, args.app_host, expect)
            run["rep"] = rep
            runs.append(run)
            print(f"{rep:>3} {playbook:<12} {run['rc']:>2} {run['seconds']:>7} {run['cutover_seconds']!s:>9} "
                  f"{run['first_new_color_response_after_start_s']!s:>11} {run['requests']:>8} {run['failed']:>6} "
                  f"{run['failed_keepalive']!s:>3}/{run['failed_new_connection']!s:<3} {run['latency_ms_max']!s:>7}",
                  flush=True)
            if run["rc"] != 0:
                print(run["error"], file=sys.stderr)
        live = front_version(args.port)

    # The emergency path alone: both colours warm, traffic flipped back and forth.
    for toggle in range(1, args.toggles + 1):
        expect = "green" if str(front_version(args.port)["color"]) == "blue" else "blue"
        run = measured(args.inventory, "switch_back.yml", [], args.port, args.rate, args.app_host, expect)
        run["rep"] = f"t{toggle}"
        run["outcome"] = "switched" if run["rc"] == 0 else "failed"  # switch_back.yml writes no record
        runs.append(run)
        print(f"{run['rep']:>3} {'switch_back':<12} {run['rc']:>2} {run['seconds']:>7} {'-':>9} "
              f"{run['first_new_color_response_after_start_s']!s:>11} {run['requests']:>8} {run['failed']:>6} "
              f"{run['failed_keepalive']!s:>3}/{run['failed_new_connection']!s:<3} {run['latency_ms_max']!s:>7}",
              flush=True)

    rollouts = [r for r in runs if r["playbook"] == "rollout.yml"]
    rollbacks = [r for r in runs if r["playbook"] in ROLLBACKS]
    result = {
        "reps": args.reps,
        "toggles": args.toggles,
        "rollback_playbooks": sorted({r["playbook"] for r in rollbacks}),
        "rollbacks_measured": len(rollbacks),
        "rollback_seconds_all": [r["seconds"] for r in rollbacks],
        "load_1m_before": load_before,
        "load_1m_after": round(os.getloadavg()[0], 2),
        "rate_rps": args.rate,
        "rollout_seconds_median": median([r["seconds"] for r in rollouts]),
        "rollout_seconds_max": max((r["seconds"] for r in rollouts), default=None),
        "rollout_cutover_seconds_median": median([r["cutover_seconds"] for r in rollouts]),
        "rollback_seconds_median": median([r["seconds"] for r in rollbacks]),
        "rollback_seconds_max": max((r["seconds"] for r in rollbacks), default=None),
        "rollback_first_old_color_response_s_median":
            median([r["first_new_color_response_after_start_s"] for r in rollbacks]),
        "rollback_cutover_seconds_median": median([r["cutover_seconds"] for r in rollbacks]),
        "failed_requests_rollouts": sum(int(r["failed"]) for r in rollouts),
        "failed_requests_rollbacks": sum(int(r["failed"]) for r in rollbacks),
        "failed_keepalive": sum(int(r["failed_keepalive"]) for r in runs),
        "failed_new_connection": sum(int(r["failed_new_connection"]) for r in runs),
        "requests": sum(int(r["requests"]) for r in runs),
        "max_latency_ms_during_switch": max((r["latency_ms_max"] or 0) for r in runs),
        "all_rc_zero": all(r["rc"] == 0 for r in runs),
        "targets": TARGETS,
    }
    print("\nmedians: rollout {rollout_seconds_median}s (target <= 60), rollback {rollback_seconds_median}s "
          "(target <= 5, max {rollback_seconds_max}s over {rollbacks_measured} runs of {rollback_playbooks}), "
          "failed requests {failed_requests_rollouts}+{failed_requests_rollbacks} over {requests}; "
          "load {load_1m_before} -> {load_1m_after}".format(**result))
    print(json.dumps(result))
    return 0 if result["all_rc_zero"] else 1


if __name__ == "__main__":
    sys.exit(main())
