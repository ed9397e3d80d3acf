"""The release's approval before 100%, its state for Prometheus and its per-step notifications (roles/rollout).

The role's own task files run here with ansible-playbook against this machine (every inventory group is
localhost, files in a temporary directory): state.yml writes the JSON state and the node_exporter textfile for
each state a release can be in, parsed back with prometheus_client's parser; notify.yml sends a step event to a
receiver on the loopback, compared with the shape of the events the role already sent; the preflight, the guard
of a new release and the approval's checks refuse what they must, naming it. molecule/rollout/tests/
test_approval.py proves the flow itself on real hosts under load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from .conftest import COLLECTION, REPO, VENV_BIN

sys.path.insert(0, str(REPO / "scripts"))

from webhook_receiver import WebhookReceiver

ROLE = COLLECTION / "roles" / "rollout"
DEFAULTS = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
SPECS = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())["argument_specs"]
STATES = ["walking", "awaiting_approval", "promoted", "aborted", "rolled_back"]
PLAN = {"id": "20261202T091500Z-2026.11.1", "kind": "rollout", "who": "tester", "from_color": "blue",
        "to_color": "green", "from_version": "2026.11.0", "to_version": "2026.11.1",
        "started": "2026-12-02T09:15:00Z", "started_epoch": 1796202900.0, "noop": False, "freeze_override": ""}
STEPS = [{"index": 1, "of": 4, "weight": 10, "weights": {"blue": 90, "green": 10}, "seconds": 31.2,
          "gate": {"localhost": {"verdict": "passed"}}, "prometheus": {"outcome": "successful"}},
         {"index": 2, "of": 4, "weight": 25, "weights": {"blue": 75, "green": 25}, "seconds": 30.8,
          "gate": {"localhost": {"verdict": "passed"}}, "prometheus": {}}]


def run_play(tmp_path: Path, tasks: list[dict[str, Any]], *extra: str,
             groups: str = "[lb]\nlocalhost\n[app]\nlocalhost\n") -> subprocess.CompletedProcess[str]:
    inventory = tmp_path / "hosts.ini"
    inventory.write_text(f"localhost\n{groups}[all:vars]\nansible_connection=local\n"
                         f"ansible_python_interpreter={sys.executable}\n")
    play = [{"name": "Drive the rollout role's task files", "hosts": "localhost", "gather_facts": False,
             "tasks": tasks}]
    playbook = tmp_path / "play.yml"
    playbook.write_text(yaml.safe_dump(play, sort_keys=False))
    return subprocess.run([str(VENV_BIN / "ansible-playbook"), "-i", str(inventory), str(playbook), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
                          env=dict(os.environ, ANSIBLE_NOCOLOR="1"))


def role_tasks(tasks_from: str, **variables: Any) -> dict[str, Any]:
    return {"name": f"Run {tasks_from}", "ansible.builtin.include_role": {
        "name": "quantnova.grandmodel.rollout", "tasks_from": tasks_from}, "vars": variables}


def controller_facts(**facts: Any) -> dict[str, Any]:
    return {"name": "Set the controller's facts", "ansible.builtin.set_fact": facts,
            "delegate_to": "localhost", "delegate_facts": True}


def files(tmp_path: Path) -> list[str]:
    return ["-e", json.dumps({"rollout_state_file": str(tmp_path / "state" / "state.json"),
                              "rollout_state_metrics_file": str(tmp_path / "grandmodel_rollout.prom"),
                              "rollout_weight_steps": [10, 25, 50, 100]})]


def test_the_approval_and_state_files_are_declared_as_their_defaults() -> None:
    options = SPECS["main"]["options"]
    assert options["rollout_approval"]["choices"] == ["none", "stop"]
    for name in ("rollout_approval", "rollout_state_file", "rollout_state_metrics_file"):
        assert options[name]["default"] == DEFAULTS[name], name
    # The textfile lies next to the traffic switch's, where node_exporter's textfile collector reads.
    assert Path(DEFAULTS["rollout_state_metrics_file"]).parent == Path(DEFAULTS["rollout_traffic_metrics_file"]).parent
    assert DEFAULTS["rollout_state_metrics_file"].endswith(".prom")


def test_each_state_is_written_as_json_and_as_one_hot_gauges(tmp_path: Path) -> None:
    """One run walks the five states; after each, both files are copied aside and read here."""
    snapshots = tmp_path / "snapshots"
    snapshots.mkdir()
    tasks: list[dict[str, Any]] = [controller_facts(rollout_plan=PLAN, rollout_walk_steps=STEPS)]
    tasks.append({"name": "Gated process", "ansible.builtin.set_fact": {"rollout_gated_identity": "MainPID=42"}})
    for name in STATES:
        if name == "awaiting_approval":
            tasks.append(controller_facts(rollout_walk_paused={"weight": 50, "step_index": 3, "steps_total": 4,
                                                               "weights": {"blue": 50, "green": 50}}))
        tasks.append(role_tasks("state.yml", __rollout_state_name=name, __rollout_state_weight=25,
                                __rollout_state_index=2))
        # The host is this machine: the controller's file lookup reads the files the role just wrote (no module
        # run per copy); one copy at the end writes every snapshot aside.
        tasks.append({"name": f"Keep both files of {name}", "ansible.builtin.set_fact": {"snapshots": (
            "{{ snapshots | default({}) | combine({"
            + ", ".join(f"'{name}-{Path(src).name}': lookup('ansible.builtin.file', '{tmp_path / src}', rstrip=false)"
                        for src in ("state/state.json", "grandmodel_rollout.prom"))
            + "}) }}")}})
    tasks.append({"name": "Write the snapshots aside", "ansible.builtin.copy": {
        "content": "{{ snapshots | to_json }}", "dest": str(snapshots / "snapshots.json"), "mode": "0644"}})
    started = time.time()
    proc = run_play(tmp_path, tasks, *files(tmp_path))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    for snapshot, text in json.loads((snapshots / "snapshots.json").read_text()).items():
        (snapshots / snapshot).write_text(text)
    assert len(list(snapshots.iterdir())) == 2 * len(STATES) + 1
    expected = {"walking": (25, 2), "awaiting_approval": (50, 3), "promoted": (100, 4), "aborted": (0, 2),
                "rolled_back": (0, 2)}
    for name in STATES:
        doc = json.loads((snapshots / f"{name}-state.json").read_text())
        weight, index = expected[name]
        assert (doc["state"], doc["weight"], doc["step_index"], doc["steps_total"]) == (name, weight, index, 4), doc
        assert doc["weights"] == {"blue": 100 - weight, "green": weight}
        assert doc["plan"]["to_version"] == "2026.11.1" and doc["id"] == PLAN["id"]
        assert doc["gated_identity"] == {"localhost": "MainPID=42"}
        assert [s["weight"] for s in doc["steps"]] == [10, 25]
        families = {f.name: f for f in text_string_to_metric_families(
            (snapshots / f"{name}-grandmodel_rollout.prom").read_text())}
        assert set(families) == {"grandmodel_rollout_state", "grandmodel_rollout_step_weight_percent",
                                 "grandmodel_rollout_step_index", "grandmodel_rollout_steps",
                                 "grandmodel_rollout_last_change_timestamp_seconds"}
        labels = {"kind": "rollout", "from_color": "blue", "to_color": "green", "from_version": "2026.11.0",
                  "to_version": "2026.11.1"}
        one_hot = {s.labels["state"]: s.value for s in families["grandmodel_rollout_state"].samples}
        assert one_hot == {s: (1.0 if s == name else 0.0) for s in STATES}, one_hot
        for family in families.values():
            assert family.type == "gauge"
            for sample in family.samples:
                assert {k: v for k, v in sample.labels.items() if k != "state"} == labels
        value = {n: f.samples[0].value for n, f in families.items()}
        assert value["grandmodel_rollout_step_weight_percent"] == weight
        assert value["grandmodel_rollout_step_index"] == index
        assert value["grandmodel_rollout_steps"] == 4
        assert started - 5 <= value["grandmodel_rollout_last_change_timestamp_seconds"] <= time.time() + 1
    # A rollback (playbooks/rollback.yml) names the colour it returned to as to_color: it gets 100%.
    rollback = tmp_path / "rollback"
    rollback.mkdir()
    proc = run_play(rollback, [controller_facts(rollout_plan=PLAN | {"kind": "rollback"}),
                               role_tasks("state.yml", __rollout_state_name="rolled_back")], *files(rollback))
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert json.loads((rollback / "state" / "state.json").read_text())["weight"] == 100
    # Where there is no load balancer group (the data scenario records a release on a db host), nothing is kept
    # and nothing fails.
    nowhere = tmp_path / "nowhere"
    nowhere.mkdir()
    proc = run_play(nowhere, [controller_facts(rollout_plan=PLAN),
                              role_tasks("state.yml", __rollout_state_name="promoted")], *files(nowhere), groups="")
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert not (nowhere / "state").exists() and not (nowhere / "grandmodel_rollout.prom").exists()


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as server:
        yield server


def test_a_step_event_has_the_shape_of_the_release_events(tmp_path: Path, receiver: WebhookReceiver) -> None:
    event = "{{ __rollout_plan | combine({'step': __rollout_step_event}) }}"
    tasks = [controller_facts(rollout_plan=PLAN),
             role_tasks("notify.yml", __rollout_event="release_started", __rollout_event_record="{{ __rollout_plan }}"),
             role_tasks("notify.yml", __rollout_event="release_step", __rollout_event_record=event,
                        __rollout_step_event_of=STEPS[0], __rollout_step_event_verdict="passed"),
             role_tasks("notify.yml", __rollout_event="release_step", __rollout_event_record=event,
                        __rollout_step_event_of={"index": 3, "of": 4, "weight": 50,
                                                 "weights": {"blue": 50, "green": 50}},
                        __rollout_step_event_verdict="failed", __rollout_step_event_message="p99 412 ms > 250 ms")]
    proc = run_play(tmp_path, tasks, "-e", json.dumps({"rollout_notify_webhooks": [receiver.url],
                                                        "grandmodel_environment": "unit"}))
    assert proc.returncode == 0, proc.stdout[-4000:]
    started, passed, failed = receiver.bodies
    assert set(passed) == set(started) == {"event", "service", "environment", "host", "at", "record"}
    assert (passed["event"], passed["service"], passed["environment"]) == ("release_step", "grandmodel", "unit")
    assert {k: v for k, v in passed["record"].items() if k != "step"} == started["record"]
    assert passed["record"]["step"] == {"index": 1, "of": 4, "weight": 10, "weights": {"blue": 90, "green": 10},
                                        "verdict": "passed", "seconds": 31.2, "gate": {"localhost": "passed"},
                                        "prometheus": "successful", "shadow": "", "message": ""}
    step = failed["record"]["step"]
    assert (step["index"], step["weight"], step["verdict"], step["message"]) == (3, 50, "failed", "p99 412 ms > 250 ms")


def test_approval_stop_needs_a_step_below_100(tmp_path: Path) -> None:
    proc = run_play(tmp_path, [role_tasks("preflight.yml")], "-e", json.dumps(
        {"release_version": "2026.11.1", "rollout_approval": "stop", "rollout_weight_steps": [100],
         "rollout_colors": {"blue": {"port": 8001}, "green": {"port": 8002}}}))
    said = " ".join(proc.stdout.split())
    assert proc.returncode != 0 and "stop holds the release at its last step below 100" in said, said[-2000:]


def held_state(tmp_path: Path, state: str) -> None:
    path = tmp_path / "state" / "state.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"state": state, "id": PLAN["id"], "plan": PLAN, "weight": 50,
                                "weights": {"blue": 50, "green": 50}, "step_index": 3, "steps_total": 4,
                                "changed": "2026-12-02T09:20:00Z", "changed_epoch": 1796203200.0}))


def test_a_new_release_is_refused_while_one_awaits_approval(tmp_path: Path) -> None:
    held_state(tmp_path, "awaiting_approval")
    proc = run_play(tmp_path, [role_tasks("approval_guard.yml")], *files(tmp_path))
    said = " ".join(proc.stdout.split())
    assert proc.returncode != 0, said[-2000:]
    assert "release 2026.11.1 awaits approval on localhost since 2026-12-02T09:20:00Z" in said, said[-2000:]
    held_state(tmp_path, "promoted")
    proc = run_play(tmp_path, [role_tasks("approval_guard.yml")], *files(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:]


@pytest.mark.parametrize(("state", "upstream", "message"), [
    (None, None, "no release awaits approval on localhost (no release state in"),
    ("promoted", None, "the latest release, 2026.11.1, is promoted since 2026-12-02T09:20:00Z"),
    ("awaiting_approval", "blue", "does not serve the release held for approval"),
], ids=["no-state", "already-promoted", "front-door-moved"])
def test_the_approval_refuses_what_it_cannot_decide(tmp_path: Path, state: str | None, upstream: str | None,
                                                    message: str) -> None:
    if state:
        held_state(tmp_path, state)
    upstream_file = tmp_path / "upstream.conf"
    if upstream:  # one colour only: a rollback moved traffic since the release was held at 50/50
        upstream_file.write_text(f"# active_color: {upstream}\nupstream grandmodel_backend {{\n"
                                 "    server 127.0.0.1:8001;\n}\n")
    proc = run_play(tmp_path, [role_tasks("approve_plan.yml", __rollout_decision="abort")], *files(tmp_path),
                    "-e", f"rollout_upstream_file={upstream_file}")
    said = " ".join(proc.stdout.split())
    assert proc.returncode != 0, said[-2000:]
    assert message in said, said[-3000:]


def held_split(tmp_path: Path) -> list[str]:
    """A release held at 50/50 (state file) that the front door really serves (upstream file): a decision can go on."""
    held_state(tmp_path, "awaiting_approval")
    upstream_file = tmp_path / "upstream.conf"
    upstream_file.write_text("# active_color: blue\n# weights: blue=50 green=50\nupstream grandmodel_backend {\n"
                             "    server 127.0.0.1:8001 weight=50;\n    server 127.0.0.1:8002 weight=50;\n}\n")
    return [*files(tmp_path), "-e", json.dumps({"rollout_upstream_file": str(upstream_file),
                                                "rollout_halt_dir": str(tmp_path / "halt.d"),
                                                "rollout_freeze_file": str(tmp_path / "freeze.json")})]


def decide(tmp_path: Path, decision: str, extra: list[str], name: str) -> subprocess.Popen[str]:
    """approve_plan.yml with `decision`, as its own ansible-playbook process (its own play file in `name`)."""
    work = tmp_path / name
    work.mkdir()
    inventory = work / "hosts.ini"
    inventory.write_text(f"localhost\n[lb]\nlocalhost\n[app]\nlocalhost\n[all:vars]\nansible_connection=local\n"
                         f"ansible_python_interpreter={sys.executable}\n")
    play = [{"name": "Decide", "hosts": "localhost", "gather_facts": False,
             "tasks": [role_tasks("approve_plan.yml", __rollout_decision=decision)]}]
    (work / "play.yml").write_text(yaml.safe_dump(play, sort_keys=False))
    return subprocess.Popen([str(VENV_BIN / "ansible-playbook"), "-i", str(inventory), str(work / "play.yml"),
                             *extra], cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ, ANSIBLE_NOCOLOR="1", USER=f"operator-{decision}"))


def test_two_decisions_at_once_only_one_decides_and_the_other_names_it(tmp_path: Path) -> None:
    # An approve and an abort of the same held release started together: both pass every check, exactly one gets
    # the claim; the other is refused naming the winner's decision, and a third, later, is refused as well.
    extra = held_split(tmp_path)
    runs = {decision: decide(tmp_path, decision, extra, decision) for decision in ("promote", "abort")}
    said = {decision: " ".join(proc.communicate(timeout=300)[0].split()) for decision, proc in runs.items()}
    codes = {decision: proc.returncode for decision, proc in runs.items()}
    assert sorted(codes.values()) == [0, 2], (codes, said)
    winner = next(d for d, rc in codes.items() if rc == 0)
    loser = next(d for d, rc in codes.items() if rc != 0)
    claim = tmp_path / "state" / f"state.json.decision-{PLAN['id']}"
    record = json.loads((claim / "by.json").read_text())
    assert (record["release"], record["decision"], record["who"]) == (PLAN["id"], winner, f"operator-{winner}")
    refused = said[loser]
    assert f"release 2026.11.1 ({PLAN['id']}) is already being decided, or was:" in refused, refused[-3000:]
    assert f"Nothing was done by this run ({loser})" in refused and str(claim) in refused, refused[-3000:]
    # The refusal names who holds it (once its record is written; a loser that read before it says so).
    assert f'"decision": "{winner}"' in refused or "no record yet" in refused, refused[-3000:]
    later = decide(tmp_path, loser, extra, "later")
    out = " ".join(later.communicate(timeout=300)[0].split())
    assert later.returncode != 0 and f'"decision": "{winner}"' in out and f"operator-{winner}" in out, out[-3000:]


def test_a_refused_promotion_leaves_no_claim_and_check_mode_claims_nothing(tmp_path: Path) -> None:
    # A promotion refused by the change freeze decided nothing: the abort after it is not blocked by a claim.
    extra = held_split(tmp_path)
    (tmp_path / "freeze.json").write_text(json.dumps({"reason": "trading session", "set_by": "pre_market"}))
    frozen = decide(tmp_path, "promote", extra, "frozen")
    out = " ".join(frozen.communicate(timeout=300)[0].split())
    assert frozen.returncode != 0 and "a change freeze is set on localhost" in out, out[-3000:]
    assert "already being decided" not in out, out[-3000:]
    assert not list((tmp_path / "state").glob("state.json.decision-*")), out[-3000:]
    check = decide(tmp_path, "abort", [*extra, "--check"], "check")
    out = " ".join(check.communicate(timeout=300)[0].split())
    assert check.returncode == 0, out[-3000:]
    assert not list((tmp_path / "state").glob("state.json.decision-*")), out[-3000:]
    abort = decide(tmp_path, "abort", extra, "abort")
    out = " ".join(abort.communicate(timeout=300)[0].split())
    assert abort.returncode == 0, out[-3000:]
    assert json.loads((tmp_path / "state" / f"state.json.decision-{PLAN['id']}" / "by.json").read_text())[
        "decision"] == "abort"


def test_a_decision_keeps_the_newest_claims_as_records_and_removes_the_older(tmp_path: Path) -> None:
    # 12 claims of earlier releases, a minute apart, and a file that only looks like one: a decision kept with
    # rollout_decision_claims_keep=5 leaves its own claim and the 4 newest earlier ones, and nothing else goes.
    extra = held_split(tmp_path)
    state_dir = tmp_path / "state"
    earlier = []
    for n in range(12):
        claim = state_dir / f"state.json.decision-20261101T0900{n:02d}Z-2026.10.{n}"
        claim.mkdir()
        (claim / "by.json").write_text(json.dumps({"release": claim.name, "decision": "promote"}))
        os.utime(claim, (1793000000 + 60 * n, 1793000000 + 60 * n))
        earlier.append(claim)
    bystander = state_dir / "state.json.decision-notes.txt"
    bystander.write_text("an operator's file, not a claim directory")
    run = decide(tmp_path, "abort", [*extra, "-e", "rollout_decision_claims_keep=5"], "decide")
    out = " ".join(run.communicate(timeout=300)[0].split())
    assert run.returncode == 0, out[-3000:]
    own = state_dir / f"state.json.decision-{PLAN['id']}"
    assert json.loads((own / "by.json").read_text())["decision"] == "abort"
    assert sorted(p.name for p in state_dir.glob("state.json.decision-*") if p.is_dir()) == sorted(
        [own.name, *(c.name for c in earlier[-4:])]), out[-3000:]
    assert bystander.exists()


def test_keeping_no_decision_claim_is_refused_before_the_release(tmp_path: Path) -> None:
    proc = run_play(tmp_path, [role_tasks("preflight.yml")], "-e", json.dumps(
        {"release_version": "2026.11.1", "rollout_decision_claims_keep": 0,
         "rollout_colors": {"blue": {"port": 8001}, "green": {"port": 8002}}}))
    said = " ".join(proc.stdout.split())
    assert proc.returncode != 0 and "rollout_decision_claims_keep (the decisions kept as records) must be 1" \
        in said, said[-2000:]
