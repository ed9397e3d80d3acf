"""The emergency stop on a host with the application database, under a steady write load.

Its promise (issue 15): every database keeps running and no row is lost. The front door's half (503 trading_halted
within 5 s under load) is proved in molecule/rollout; this scenario has the real PostgreSQL. A writer on the db host
inserts one row at a time into a probe table of the application database and logs the id of every acknowledged
insert (psql printed it after the commit) and every error. emergency_stop runs while it writes, with an operator hook
(a command on the controller) that writes rows of its own, as the trading system's flattening of positions would:
the run must pass with the probe table reported as written during the halt, the writer must see no error, and every
acknowledged row must be there afterwards. Then a hook that deletes rows of a second table, between the runbook's two
counts: the run must fail naming that table with its counts before and after.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
EPHEMERAL = Path(os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", "/nonexistent"))
DB_HOST = "gm-mol-data-db"
PROBE = "public.gm_halt_probe"
VICTIM = "public.gm_halt_victim"
ACKS = "/run/gm-halt-writer.acks"
ERRORS = "/run/gm-halt-writer.errors"
# One insert per psql call, autocommit: a printed id is a committed row. Runs until its unit is stopped.
WRITER = (f"while :; do psql -X -q -A -t -v ON_ERROR_STOP=1 -d grandmodel"
          f" -c \"INSERT INTO {PROBE} (note) VALUES ('writer') RETURNING id\" >> {ACKS} 2>> {ERRORS}"
          f" || echo failed-at-$(date +%s.%N) >> {ERRORS}; sleep 0.05; done")


def on_db(*argv: str, check: bool = True) -> str:
    return subprocess.run(["podman", "exec", DB_HOST, *argv], capture_output=True, text=True, check=check,
                          timeout=120).stdout


def sql(statement: str) -> str:
    return on_db("runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                 "-d", "grandmodel", "-c", statement).strip()


def hook(statement: str) -> list[str]:
    """The operator's hook command (argv, run on the controller by the runbook) running one statement on the db."""
    return ["podman", "exec", DB_HOST, "runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-v",
            "ON_ERROR_STOP=1", "-d", "grandmodel", "-c", statement]


def emergency_stop(reports: Path, hook_argv: list[str]) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    extra = {"runbook_reports_dir": str(reports), "emergency_stop_reason": "test: rows under load",
             "emergency_stop_hook_command": hook_argv}
    proc = subprocess.run(
        [str(REPO / ".venv/bin/ansible-playbook"), "-i", os.environ["MOLECULE_INVENTORY_FILE"],
         str(REPO / "playbooks" / "runbooks" / "emergency_stop.yml"), "-e", json.dumps(extra)],
        capture_output=True, text=True, timeout=600, check=False, cwd=REPO,
    )
    found = sorted(reports.glob("emergency_stop-*/report.json"))
    assert len(found) == 1, f"expected one report in {reports}: {found}; {' '.join(proc.stdout.split())[-3000:]}"
    return proc, json.loads(found[0].read_text())


def test_emergency_stop_keeps_the_database_writing_and_loses_no_row_and_names_rows_lost() -> None:
    sql(f"DROP TABLE IF EXISTS {PROBE}, {VICTIM};"
        f" CREATE TABLE {PROBE} (id bigserial PRIMARY KEY, note text NOT NULL);"
        f" CREATE TABLE {VICTIM} (id int PRIMARY KEY); INSERT INTO {VICTIM} SELECT generate_series(1, 20)")
    on_db("sh", "-c", f"rm -f {ACKS} {ERRORS}; touch {ACKS} {ERRORS}; chown postgres {ACKS} {ERRORS}")
    on_db("systemd-run", "--unit", "gm-halt-writer", "--collect", "--uid", "postgres", "sh", "-c", WRITER)
    try:
        time.sleep(2)
        assert on_db("systemctl", "is-active", "gm-halt-writer", check=False).strip() == "active"
        # The hook writes 5 rows of its own, as a flattening of positions would.
        proc, report = emergency_stop(EPHEMERAL / "halt-writes",
                                      hook(f"INSERT INTO {PROBE} (note) SELECT 'hook' FROM generate_series(1, 5)"))
        writes = report["databases"][DB_HOST]
        # The row-loss case: the hook deletes 3 rows of a table between the runbook's two counts.
        lost_proc, lost_report = emergency_stop(EPHEMERAL / "halt-loses", hook(f"DELETE FROM {VICTIM} WHERE id <= 3"))
        time.sleep(1)
    finally:
        on_db("systemctl", "stop", "gm-halt-writer", check=False)
    acks = [int(line) for line in on_db("cat", ACKS).split()]
    errors = on_db("cat", ERRORS).strip()
    stored = set(map(int, sql(f"SELECT id FROM {PROBE} WHERE note = 'writer'").split()))
    figures = {"acknowledged_inserts": len(acks), "stored": len(stored),
               "acknowledged_missing": len(set(acks) - stored),
               "write_errors": errors, "tables": writes["tables"], "rows_before": writes["rows_before"],
               "rows_after": writes["rows_after"], "written": writes["written"],
               "lost_case": lost_report["databases"][DB_HOST]["lost"], "lost_case_rc": lost_proc.returncode}
    (REPO / "reports").mkdir(exist_ok=True)
    (REPO / "reports" / "emergency-stop-data.json").write_text(json.dumps(figures, indent=1))
    print(f"\nemergency stop under writes: {json.dumps(figures)}")
    try:
        # The runbook passed, counted every table of the application database and lost nothing.
        assert proc.returncode == 0, report["problems"] or proc.stdout[-3000:]
        assert report["problems"] == [] and writes["lost"] == [], report["problems"]
        assert writes["tables"] >= 2 and PROBE in writes["before"] and VICTIM in writes["before"], writes
        # The writer kept writing through the stop: the probe grew by its rows and the hook's 5, and is reported
        # as written during the halt, not as a problem.
        grown = [w for w in writes["written"] if w["table"] == PROBE]
        assert grown and grown[0]["after"] >= grown[0]["before"] + 5, writes
        assert writes["after"][VICTIM] == writes["before"][VICTIM] == 20, writes
        # PostgreSQL never refused a write, and every acknowledged insert is stored (the independent count).
        assert errors == "", errors
        assert len(acks) >= 20 and set(acks) <= stored, (len(acks), len(set(acks) - stored))
        assert sql(f"SELECT count(*) FROM {PROBE} WHERE note = 'hook'") == "5"
        # The deleted rows are named: the table, its count before and after, and the run fails.
        assert lost_proc.returncode != 0
        lost = lost_report["databases"][DB_HOST]["lost"]
        assert lost == [{"table": VICTIM, "before": 20, "after": 17}], lost_report["databases"][DB_HOST]
        assert [p for p in lost_report["problems"] if p.startswith(f"rows lost on {DB_HOST} during the stop")
                and VICTIM in p], lost_report["problems"]
        text = next((EPHEMERAL / "halt-loses").glob("emergency_stop-*/report.md")).read_text()
        assert f"| {DB_HOST} |" in text and f"| {VICTIM} | " in text, text
    finally:
        sql(f"DROP TABLE IF EXISTS {PROBE}, {VICTIM}")
        on_db("rm", "-f", ACKS, ERRORS)
