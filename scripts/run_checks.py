#!/usr/bin/env python3
"""Run every GrandModel Ops check in order and end with a readable summary.

Lint (yamllint, ansible-lint production profile, ruff, mypy), `ansible-test sanity` in place,
pytest for the repository, the collection's unit tests and the inference service, the
fresh-machine install test (scripts/fresh_machine.py), then each Molecule scenario on local podman
hosts. Each step's full output goes to reports/<step>.log; a
failed step's tail is printed right away. The last line reads "checks: N passed, N failed".

Steps run in two lanes at once (--jobs 2, the default): lint, sanity and pytest in one lane; the
fresh-machine install (beside those only), the execution environment's build and the rollout scenario (the
longest, mostly waiting on gates and load, which runs a release inside that image) in the other. The other
Molecule scenarios then go, longest first, to whichever lane is free first; the Kubernetes image runs last,
after the rollout scenario.
--jobs 3 moves the fresh-machine install and the data and ha scenarios to a third lane (faster, but
the load reaches 5 to 7 on two cores and timing-sensitive tests have failed there: the firewall's
commit-confirmed revert once missed its 15 s margin); --jobs 1 runs every step in order, alone (for
timings). Scenarios never share hosts, networks or ports.

  scripts/run_checks.py                 all steps
  scripts/run_checks.py --list          names of the steps
  scripts/run_checks.py --only ruff --only molecule:common
  scripts/run_checks.py --skip molecule
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
COLLECTION = REPO / "ansible_collections" / "quantnova" / "grandmodel"
REPORTS = REPO / "reports"
PYTHON_PATHS = ["scripts", "tests", "molecule", "ansible_collections/quantnova/grandmodel/plugins",
                "ansible_collections/quantnova/grandmodel/tests"]


@dataclass
class Step:
    name: str
    cmd: list[str]
    cwd: Path = REPO
    env: dict[str, str] = field(default_factory=dict)
    timeout: int = 1800
    lane: int = 0


@dataclass
class Result:
    step: Step
    ok: bool
    seconds: float
    detail: str
    reasons: list[str] = field(default_factory=list)


# The lane of each long step with --jobs 3 (others run in lane 0), and where lane 2's steps go with --jobs 2.
# Measured in CI's rehearsal at load 1.6 with two lanes: rollout 23 min, data 16 min, fresh-machine 6 min.
LANE_OF = {"execution-environment": 1, "molecule:rollout": 1, "k8s-image": 1,
           "fresh-machine": 2, "molecule:data": 2, "molecule:ha": 2}
# With --jobs 2 the fresh-machine install leads lane 1 (before the execution environment): it then runs beside
# lint, sanity and pytest only, never beside a Molecule scenario (its privileged nested podman shares the
# kernel with them), and the lanes end within minutes of each other (rehearsal of 2026-12-02: lane 0 had
# 3,600 s of steps against 2,850 s with it there).
# Rehearsal of 2026-12-02 15:05 (fresh clone, two lanes): lane 1 (fresh-machine 8 min, execution environment 1,
# data 21, rollout about 50, k8s-image 2) ran some 20 minutes longer than lane 0 (lint to pytest 20, common 6.5,
# ha 15, host_tuning 3, monitoring 15, platform 4), and the run would have ended near CI's 90 minutes. The longest
# scenario now starts first in lane 1 (right after the execution environment it needs), with the short common and
# host_tuning scenarios after it, and data moves to lane 0: about 71 against 75 minutes.
# CI of 2026-12-04 (two lanes, load 1.2): lane 0 had 2,464 s of steps, lane 1 2,270 s; platform (108 s) moves to
# lane 1 as the ha scenario grows by about 75 s (a rogue Sentinel, a hung Redis master).
# 2026-12-04: the host_tuning scenario's checks moved into the platform scenario (the platform tier converges the
# same role on its host), one create, converge, idempotence and destroy fewer.
# 2026-12-04 06:45: the scenarios after the lanes' heads (lane 0: lint to pytest; lane 1: the fresh-machine install,
# the execution environment, the rollout scenario) are taken from one shared queue, longest first, by whichever
# lane is free first: the fixed split above missed by 150 to 300 s either way as steps grew, and the lanes' ends
# now follow the machine of the day. Pool steps start only once the fresh-machine install is over (its nested
# podman never runs beside a Molecule scenario). The Kubernetes image stays last in lane 1, after the rollout
# scenario that builds the release it uses.
TWO_LANES = {"fresh-machine": 1}  # the rollout scenario is lane 1 by LANE_OF, every other step lane 0
POOL = ["molecule:ha", "molecule:data", "molecule:monitoring", "molecule:common", "molecule:platform"]
PRINT_LOCK = threading.Lock()


def say(text: str) -> None:
    with PRINT_LOCK:
        print(text, flush=True)


def molecule_scenarios() -> list[str]:
    return sorted(p.parent.name for p in (REPO / "molecule").glob("*/molecule.yml"))


def build_steps() -> list[Step]:
    py = str(VENV_BIN / "python")
    steps = [
        Step("collections", [py, "scripts/check_collections.py"]),
        Step("yamllint", [str(VENV_BIN / "yamllint"), "--strict", "."]),
        Step("ansible-lint", [str(VENV_BIN / "ansible-lint"), "--profile", "production",
                              "--offline", "--nocolor"]),
        Step("ruff", [str(VENV_BIN / "ruff"), "check", *PYTHON_PATHS, "model_service"]),
        Step("mypy", [str(VENV_BIN / "mypy"), "scripts"]),
        Step("ansible-test-sanity",
             [str(VENV_BIN / "ansible-test"), "sanity", "--venv", "--python", "3.11",
              "--color", "no"], cwd=COLLECTION, timeout=2400),
        # Galaxy's own importer on the built tarball (READMEs, galaxy.yml, docs, layout).
        Step("galaxy-importer", [py, "scripts/galaxy_import_check.py"], timeout=900),
        Step("pytest-repo", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests",
                             "ansible_collections/quantnova/grandmodel/tests/unit",
                             "--ignore", "tests/test_k8s_image.py"]),
    ]
    if (REPO / "model_service" / "tests").is_dir():
        steps.append(Step("pytest-service", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                             "tests"], cwd=REPO / "model_service"))
    # The install closure on a machine that has never seen the project (nested podman).
    steps.append(Step("fresh-machine", [py, "scripts/fresh_machine.py"], timeout=1500, lane=2))
    # The execution environment AWX runs jobs in; the rollout scenario runs a release inside it, so it
    # is built first in that scenario's lane.
    steps.append(Step("execution-environment", [py, "scripts/build_ee.py"], timeout=1800, lane=1))
    # The rollout scenario first: the longest step starts as early as its lane allows.
    for scenario in sorted(molecule_scenarios(), key=lambda name: (name != "rollout", name)):
        steps.append(Step(f"molecule:{scenario}",
                          [str(VENV_BIN / "molecule"), "test", "-s", scenario],
                          # The rollout scenario: 2,400 s and more at load 8-13 in a rehearsal, 3,048 s in CI.
                          timeout=4500 if scenario == "rollout" else 2400,
                          lane=LANE_OF.get(f"molecule:{scenario}", 0)))
    # The Kubernetes service image run as its Deployment says; release 2026.11.1 comes from the rollout
    # scenario's prepare in the same lane (or is built by the step).
    steps.append(Step("k8s-image", [py, "scripts/k8s_image_check.py"], timeout=1800, lane=1))
    return steps


def selected(step: Step, only: list[str], skip: list[str]) -> bool:
    def matches(pattern: str) -> bool:
        return step.name == pattern or step.name.startswith(pattern + ":")

    if only and not any(matches(p) for p in only):
        return False
    return not any(matches(p) for p in skip)


def tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def summarize_output(log: Path) -> str:
    """One short phrase from the step's own output (pytest's closing line, lint counts)."""
    for line in reversed(log.read_text(errors="replace").splitlines()[-60:]):
        stripped = line.strip("= ").strip()
        if any(word in stripped for word in (" passed", " failed", "error", "Found ", "Passed",
                                              "Success", "All checks passed", "violation")):
            return stripped[:70]
    return ""


def failure_reasons(log: Path, limit: int = 8) -> list[str]:
    """Why a step failed, from its own output: pytest's FAILED/ERROR lines, Ansible's fatal tasks, and the
    one-line DIAGNOSIS a test prints before it fails on something seen only in full runs.

    A Molecule log ends with the destroy stage, so its tail says nothing about the failure; these
    lines are repeated in the closing summary, which is what a CI report shows.
    """
    found: list[str] = []
    task = ""
    for raw in log.read_text(errors="replace").splitlines():
        line = raw.strip()
        if line.startswith("TASK ["):
            task = line.split("]")[0].removeprefix("TASK [")
        elif line.startswith(("FAILED ", "ERROR ")) and "RETRYING" not in line and ("::" in line or " - " in line):
            found.append(line[:240])
        elif line.startswith("fatal: [") and "...ignoring" not in line:
            found.append(f"{task}: {line}"[:240])
        elif line.startswith("CRITICAL "):
            found.append(line[:240])
        elif line.startswith("DIAGNOSIS "):  # a test's one-line evidence of a failure that is hard to reproduce
            found.append(line[:1200])
    unique = list(dict.fromkeys(found))
    return unique[:limit] + ([f"... and {len(unique) - limit} more in {log.name}"] if len(unique) > limit else [])


def run_step(step: Step, index: int, total: int) -> Result:
    REPORTS.mkdir(exist_ok=True)
    log = REPORTS / (step.name.replace(":", "-") + ".log")
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update({"NO_COLOR": "1", "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0",
                "PY_COLORS": "0", "MOLECULE_NO_LOG": "false"})
    env.update(step.env)
    label = f"[{index:>2}/{total}] {step.name}"
    say(f"{label} ...")
    started = time.monotonic()
    with log.open("w") as out:
        out.write(f"$ (cd {step.cwd}) {' '.join(step.cmd)}\n")
        out.flush()
        try:
            proc = subprocess.run(step.cmd, cwd=step.cwd, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=step.timeout, check=False)
            ok = proc.returncode == 0
            detail = "" if ok else f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            ok, detail = False, f"timed out after {step.timeout}s"
        except FileNotFoundError as exc:
            ok, detail = False, f"cannot run: {exc}"
    seconds = time.monotonic() - started
    detail = summarize_output(log) + (f" ({detail})" if detail else "")
    say(f"{label} {'PASS' if ok else 'FAIL'} in {seconds:.1f}s  {detail}".rstrip())
    reasons = [] if ok else failure_reasons(log)
    if not ok:
        say(f"----- last lines of {log.relative_to(REPO)} -----\n{tail(log)}\n-----")
        say("\n".join(f"  why: {reason}" for reason in reasons))
    return Result(step, ok, seconds, detail, reasons)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", default=[], help="run only these steps")
    parser.add_argument("--skip", action="append", default=[], help="skip these steps")
    parser.add_argument("--list", action="store_true", help="list the steps and exit")
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failure")
    parser.add_argument("--jobs", type=int, choices=(1, 2, 3), default=2,
                        help="2: two lanes at once (default); 3: three lanes (faster, heavier load); "
                             "1: every step alone, in order")
    args = parser.parse_args(argv)

    steps = [s for s in build_steps() if selected(s, args.only, args.skip)]
    if args.list:
        print("\n".join(s.name for s in steps))
        return 0
    if not steps:
        print("no step matches the selection", file=sys.stderr)
        return 2
    started = time.monotonic()
    numbered = list(enumerate(steps, 1))
    tail: list[tuple[int, Step]] = []  # lane 1's steps after the shared queue (--jobs 2)
    if args.jobs == 1:
        lanes = [numbered]
    else:
        lane_of = {i: (s.lane if args.jobs == 3 else TWO_LANES.get(s.name, s.lane if s.lane < 2 else 0))
                   for i, s in numbered}
        pooled = [] if args.jobs == 3 else sorted(
            ((i, s) for i, s in numbered if s.name in POOL), key=lambda item: POOL.index(item[1].name))
        in_pool = {i for i, _ in pooled}
        lanes = [[(i, s) for i, s in numbered if lane_of[i] == lane and i not in in_pool]
                 for lane in range(args.jobs)]
        # Lane 1's steps after the rollout scenario (the Kubernetes image) run after the pool's share of that lane.
        if pooled and len(lanes) > 1:
            cut = next((n + 1 for n, (_, s) in enumerate(lanes[1]) if s.name == "molecule:rollout"), len(lanes[1]))
            tail = lanes[1][cut:]
            lanes[1] = lanes[1][:cut]
    done: dict[int, Result] = {}
    failed_once = threading.Event()
    pool = list(pooled) if args.jobs == 2 else []
    pool_lock = threading.Lock()
    install_over = threading.Event()
    if not any(s.name == "fresh-machine" for _, s in numbered) or args.jobs != 2:
        install_over.set()
    # The tail (the Kubernetes image, which needs the release the rollout scenario builds) is run by whichever lane
    # finds the shared queue empty first, once the rollout scenario is over: lane 0 often ends the queue a minute
    # before lane 1 (2026-12-05: about 50 s of wall time).
    rollout_over = threading.Event()
    if not any(s.name == "molecule:rollout" for _, s in numbered):
        rollout_over.set()
    tail_claim = threading.Lock()

    def run_one(i: int, step: Step) -> None:
        done[i] = run_step(step, i, len(steps))
        if step.name == "fresh-machine":
            install_over.set()
        if step.name == "molecule:rollout":
            rollout_over.set()
        if not done[i].ok:
            failed_once.set()

    def run_lane(lane: list[tuple[int, Step]], after: list[tuple[int, Step]]) -> None:
        for i, step in lane:
            if args.fail_fast and failed_once.is_set():
                return
            run_one(i, step)
        while pool and not install_over.wait(5):
            if args.fail_fast and failed_once.is_set():
                return
        while True:
            with pool_lock:
                if not pool:
                    break
                i, step = pool.pop(0)
            if args.fail_fast and failed_once.is_set():
                return
            run_one(i, step)
        if not after or not tail_claim.acquire(blocking=False):
            return
        while not rollout_over.wait(5):
            if args.fail_fast and failed_once.is_set():
                return
        for i, step in after:
            if args.fail_fast and failed_once.is_set():
                return
            run_one(i, step)

    threads = [threading.Thread(target=run_lane, args=(lane, tail))
               for n, lane in enumerate(lanes) if lane or pool or (n == 1 and tail)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results = [done[i] for i in sorted(done)]
    total = time.monotonic() - started
    passed = sum(r.ok for r in results)
    failed = len(results) - passed
    width = max(len(r.step.name) for r in results)
    print("\n=== GrandModel Ops checks ===")
    for r in results:
        print(f"  {r.step.name:<{width}}  {'PASS' if r.ok else 'FAIL'}  {r.seconds:7.1f}s  {r.detail}")
    busy = sum(r.seconds for r in results)
    print(f"  {'total':<{width}}        {total:7.1f}s  wall, {busy:.1f}s of steps in {len(threads)} lane(s),"
          f" load {os.getloadavg()[0]:.1f} (logs in reports/)")
    for r in results:
        if not r.ok:
            print(f"why {r.step.name} failed (reports/{r.step.name.replace(':', '-')}.log):")
            print("\n".join(f"  {reason}" for reason in r.reasons or ["no FAILED, fatal or CRITICAL line"]))
    print(f"checks: {passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
