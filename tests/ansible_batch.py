"""Many cases in ONE ansible-playbook start: each case is a host of its own, its outcome read per host.

Every ansible-playbook start costs seconds (the controller imports, parses the collection's roles, and then
runs each task's module per host). A test that runs the same task file once per case pays that start per
case; here the cases are hosts of one inventory (connection local, each with its own variables: its own files
in its own folder), one run takes them all, and each test reads its own host's outcome from the JSON
callback. A failing host does not stop the others (the linear strategy carries on with the hosts that are
left), so a refused case and a passing case are proven side by side exactly as in separate runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .conftest import REPO, VENV_BIN


@dataclass
class HostOutcome:
    """What one host (one case) did in the run."""

    name: str
    stats: dict[str, int]
    results: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.stats.get("failures", 0) > 0 or self.stats.get("unreachable", 0) > 0

    @property
    def said(self) -> str:
        """Every message the host's tasks gave, whitespace folded (as the tests read ansible's output)."""
        return " ".join(" ".join(str(r.get("msg", "")) for r in self.results).split())

    def __repr__(self) -> str:  # what an assertion shows when a case fails
        return f"{self.name}: {self.stats}: {self.said[-3000:]}"


@dataclass
class Batch:
    proc: subprocess.CompletedProcess[str]
    hosts: dict[str, HostOutcome]

    def facts(self, host: str) -> dict[str, Any]:
        """The facts the host's tasks set (set_fact), later ones over earlier ones."""
        found: dict[str, Any] = {}
        for result in self[host].results:
            found.update(result.get("ansible_facts", {}))
        return found

    def __getitem__(self, host: str) -> HostOutcome:
        assert host in self.hosts, f"{host} did not run: {self.proc.stdout[-2000:]}{self.proc.stderr[-2000:]}"
        return self.hosts[host]


def local_inventory(hosts: Mapping[str, Mapping[str, Any]], groups: Mapping[str, list[str]] | None = None,
                    ) -> dict[str, Any]:
    """An inventory of hosts that all are this machine (connection local), each with its own variables."""
    common = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    inventory: dict[str, Any] = {"all": {"hosts": {name: {**common, **dict(variables)}
                                                   for name, variables in hosts.items()}}}
    if groups:
        inventory["all"]["children"] = {group: {"hosts": {name: {} for name in members}}
                                        for group, members in groups.items()}
    return inventory


JSON_ENV = {"ANSIBLE_NOCOLOR": "1", "ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json",
            # profile_tasks (ansible.cfg) would print its timings into the JSON
            "ANSIBLE_CALLBACKS_ENABLED": "ansible.posix.json,quantnova.grandmodel.warm_plugins"}


def run_json(args: list[str], env: Mapping[str, str] | None = None, timeout: int = 300) -> Batch:
    """ansible-playbook `args` with the JSON callback; each host's outcome by name."""
    proc = subprocess.run([str(VENV_BIN / "ansible-playbook"), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False, env=dict(os.environ, **(env or {}), **JSON_ENV))
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError as error:
        raise AssertionError(f"no JSON report (rc {proc.returncode}): {proc.stdout[-3000:]}{proc.stderr[-3000:]}") \
            from error
    outcomes = {name: HostOutcome(name, stats) for name, stats in report["stats"].items()}
    for play_report in report["plays"]:
        for task in play_report["tasks"]:
            for name, result in task["hosts"].items():
                outcomes[name].results.append(result)
                # A loop's items each carry their own message.
                outcomes[name].results.extend(r for r in result.get("results", []) if isinstance(r, dict))
    return Batch(proc, outcomes)


def run_batch(work: Path, play: str | list[dict[str, Any]], hosts: Mapping[str, Mapping[str, Any]], *extra: str,
              env: Mapping[str, str] | None = None, groups: Mapping[str, list[str]] | None = None,
              timeout: int = 300) -> Batch:
    """Run `play` (YAML text or a list of plays) once over `hosts`; each host's outcome by name."""
    work.mkdir(parents=True, exist_ok=True)
    inventory = work / "batch-hosts.yml"
    inventory.write_text(yaml.safe_dump(local_inventory(hosts, groups), sort_keys=False))
    playbook = work / "batch-play.yml"
    playbook.write_text(play if isinstance(play, str) else yaml.safe_dump(play, sort_keys=False))
    return run_json(["-i", str(inventory), str(playbook), *extra], env=env, timeout=timeout)
