"""The test runner says why a step failed in its closing summary (the part a CI report shows)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run_checks():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("run_checks", REPO / "scripts" / "run_checks.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_checks"] = module
    spec.loader.exec_module(module)
    return module


MOLECULE_LOG = """\
INFO     [data > verify] Executing
molecule/data/tests/test_data.py::test_a PASSED
=========================== short test summary info ============================
FAILED molecule/data/tests/test_records.py::test_fallback - AssertionError: 0 rows
ERROR molecule/data/tests/test_data.py::test_b - TimeoutError
==================== 1 failed, 1 error, 40 passed in 300.0s ====================
TASK [quantnova.grandmodel.rollout : Verify the idle colour] *******************
fatal: [gm-mol-rollout-app]: FAILED! => {"msg": "gate failed"}
fatal: [gm-mol-rollout-app]: FAILED! => {"msg": "expected"}
...ignoring
CRITICAL Ansible return code was 2, command was: ansible-playbook
DIAGNOSIS revert not seen: timer=inactive service=failed journal='nft: Error: syntax error'
PLAY RECAP *********************************************************************
localhost                  : ok=4    changed=3    unreachable=0    failed=0
"""


def test_reasons_name_failed_tests_fatal_tasks_and_molecule(run_checks, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "molecule-data.log"
    log.write_text(MOLECULE_LOG)
    reasons = run_checks.failure_reasons(log)
    assert reasons[0].startswith("FAILED molecule/data/tests/test_records.py::test_fallback")
    assert reasons[1].startswith("ERROR molecule/data/tests/test_data.py::test_b")
    assert reasons[2].startswith("quantnova.grandmodel.rollout : Verify the idle colour: fatal: [gm-mol-rollout-app]")
    assert any(r.startswith("CRITICAL Ansible return code was 2") for r in reasons)
    assert "DIAGNOSIS revert not seen: timer=inactive service=failed journal='nft: Error: syntax error'" in reasons


def test_reasons_are_capped_and_deduplicated(run_checks, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "x.log"
    log.write_text("".join(f"FAILED t.py::test_{i} - boom\n" for i in range(20)) + "FAILED t.py::test_0 - boom\n")
    reasons = run_checks.failure_reasons(log, limit=5)
    assert len(reasons) == 6
    assert reasons[-1] == "... and 15 more in x.log"


def test_a_passing_log_has_no_reason(run_checks, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "ok.log"
    log.write_text("==== 3 passed in 1.0s ====\nPLAY RECAP\nlocalhost : ok=4 failed=0\n")
    assert run_checks.failure_reasons(log) == []


# Seconds each step took in the rehearsal of 2026-12-04 03:15 (two lanes, load 1.9), scaled down 1000 times below.
REHEARSED = {"ansible-lint": 148, "pytest-repo": 485, "fresh-machine": 273, "execution-environment": 20,
             "molecule:rollout": 1730, "molecule:ha": 909, "molecule:data": 773, "molecule:monitoring": 413,
             "molecule:common": 311, "molecule:platform": 127, "k8s-image": 92}


def test_the_two_lanes_share_the_scenarios_and_keep_their_order(run_checks, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Every step runs once; no scenario of the shared queue starts before the fresh-machine install is over; the
    # Kubernetes image starts after the rollout scenario; both lanes take from the queue, so neither ends more than
    # one step's length after the other.
    import threading
    import time

    spans: dict[str, tuple[str, float, float]] = {}

    def fake_run_step(step, index, total):  # type: ignore[no-untyped-def]
        begun = time.monotonic()
        time.sleep(REHEARSED.get(step.name, 20) / 1000)
        spans[step.name] = (threading.current_thread().name, begun, time.monotonic())
        return run_checks.Result(step, True, 0.0, "")

    monkeypatch.setattr(run_checks, "run_step", fake_run_step)
    assert run_checks.main([]) == 0
    names = [s.name for s in run_checks.build_steps()]
    assert sorted(spans) == sorted(names)
    install_end = spans["fresh-machine"][2]
    for name in run_checks.POOL:
        assert spans[name][1] >= install_end, (name, spans[name], install_end)
    assert spans["k8s-image"][1] >= spans["molecule:rollout"][2]
    assert {spans[name][0] for name in run_checks.POOL} == {spans["pytest-repo"][0], spans["molecule:rollout"][0]}
    ends = {}
    for lane, _, end in spans.values():
        ends[lane] = max(ends.get(lane, 0.0), end)
    assert abs(ends[spans["pytest-repo"][0]] - ends[spans["molecule:rollout"][0]]) < max(REHEARSED.values()) / 1000
