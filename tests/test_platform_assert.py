"""The supported-platform assert has one home (roles/_common/tasks/platform.yml) and every role still runs it.

Each role's preflight imports it statically; on a host that is not Debian 12 or later the role stops at it, and
the message names that role, the host and what it runs. A Debian 12 host passes it. One ansible-playbook start:
one play per role and platform, each on its own local host, the failures rescued so that every play runs.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from .conftest import COLLECTION, REPO, VENV_BIN

ROLES = sorted(p.parent.parent.name for p in (COLLECTION / "roles").glob("*/tasks/preflight.yml")
               if "tasks_from: platform" in p.read_text())
EXPECTED_ROLES = {"common", "docker", "exporters", "host_tuning", "kubernetes", "monitoring", "postgresql", "redis"}
PLATFORMS = {
    "rocky": {"os_family": "RedHat", "distribution": "Rocky", "distribution_version": "9.3",
              "distribution_major_version": "9"},
    "bullseye": {"os_family": "Debian", "distribution": "Debian", "distribution_version": "11.9",
                 "distribution_major_version": "11"},
    "bookworm": {"os_family": "Debian", "distribution": "Debian", "distribution_version": "12.8",
                 "distribution_major_version": "12"},
}
ASSERT = "Assert the host runs a supported Debian release"


def test_every_role_with_a_preflight_imports_the_shared_assert() -> None:
    assert set(ROLES) == EXPECTED_ROLES
    for path in (COLLECTION / "roles").glob("*/tasks/*.yml"):
        if "_common" not in path.parts:
            assert "distribution_major_version" not in path.read_text(), f"{path}: a copy of the platform assert"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> str:
    work = tmp_path_factory.mktemp("platform")
    hosts = {f"{role}-{name}": {"ansible_connection": "local", "ansible_python_interpreter": str(VENV_BIN / "python")}
             for role in ROLES for name in PLATFORMS}
    (work / "hosts.yml").write_text(yaml.safe_dump({"all": {"hosts": hosts}}))
    plays = [{"name": f"Preflight of {role} on {name}", "hosts": f"{role}-{name}", "gather_facts": False,
              "vars": {"ansible_facts": facts},
              # A play whose hosts all failed would end the whole run: the rescue keeps the next plays running
              # (the failure is printed before it).
              "tasks": [{"name": "Run the role's preflight", "tags": [f"{role}_preflight"],
                         "block": [{"name": "The platform assert of the role's preflight",
                                    "ansible.builtin.import_role": {"name": f"quantnova.grandmodel.{role}",
                                                                    "tasks_from": "preflight.yml"}}],
                         "rescue": [{"name": "Go on with the next play", "ansible.builtin.meta": "noop"}]}]}
             for role in ROLES for name, facts in PLATFORMS.items()]
    (work / "play.yml").write_text(yaml.safe_dump(plays, sort_keys=False))
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_FORCE_COLOR="0", NO_COLOR="1",
               ANSIBLE_STDOUT_CALLBACK="ansible.builtin.default",
               ANSIBLE_CALLBACK_RESULT_FORMAT="json", ANSIBLE_DISPLAY_FAILED_STDERR="false")
    proc = subprocess.run([str(VENV_BIN / "ansible-playbook"), "-i", str(work / "hosts.yml"), str(work / "play.yml"),
                           "--tags", ",".join(f"{role}_preflight" for role in ROLES), "-v"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    return proc.stdout + proc.stderr


def _outcome(output: str, host: str) -> str:
    """The platform assert's result line for host ('ok' or the failure text)."""
    for chunk in output.split(f"TASK [quantnova.grandmodel._common : {ASSERT}]")[1:]:
        for line in chunk.split("\nTASK [")[0].splitlines():
            if re.match(rf"^(ok|fatal): \[{re.escape(host)}\]", line):
                return "ok" if line.startswith("ok") else line
    return f"<no result for {host}>"


@pytest.mark.parametrize("role", sorted(EXPECTED_ROLES))
@pytest.mark.parametrize("name", ["rocky", "bullseye"])
def test_unsupported_platform_stops_the_role_and_names_it(run: str, role: str, name: str) -> None:
    facts = PLATFORMS[name]
    host = f"{role}-{name}"
    line = _outcome(run, host)
    assert line.startswith("fatal"), f"{host}: the platform assert did not refuse ({line})"
    want = (f"{role} supports Debian 12 (bookworm) or later; {host} runs {facts['distribution']} "
            f"{facts['distribution_version']}.")
    assert want in line, f"{host}: {line}"


@pytest.mark.parametrize("role", sorted(EXPECTED_ROLES))
def test_bookworm_passes_the_platform_assert(run: str, role: str) -> None:
    assert _outcome(run, f"{role}-bookworm") == "ok"


def test_the_shared_file_is_the_only_assert() -> None:
    shared = COLLECTION / "roles" / "_common" / "tasks" / "platform.yml"
    tasks = yaml.safe_load(shared.read_text())
    # The assert comes first; after it only the read of the installed packages that the roles' apt tasks use.
    assert tasks[0]["name"] == ASSERT
    assert [next(k for k in t if "." in k) for t in tasks[1:]] == ["ansible.builtin.command",
                                                                   "ansible.builtin.set_fact"]
    assert Path(shared).is_file()
