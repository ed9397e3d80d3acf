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
