"""Verify quantnova.grandmodel.common on the converged host (real state, not Ansible's word)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

testinfra_hosts = ["ansible://all"]

SCENARIO_DIR = Path(__file__).resolve().parent.parent


def test_base_packages_installed(host):
    for name in ("chrony", "curl", "jq", "tzdata", "python3-apt"):
        assert host.package(name).is_installed, name


def test_timezone_is_utc(host):
    assert host.file("/etc/localtime").linked_to.endswith("/UTC")
    assert host.check_output("date +%Z") == "UTC"


def test_chronyd_running_and_enabled(host):
    svc = host.service("chrony")
    assert svc.is_running
    assert svc.is_enabled
    # chronyd answers its control socket and lists the configured sources.
    sources = host.check_output("chronyc -n sources")
    assert "127.0.0.1" in sources


def test_chrony_config_from_inventory(host):
    conf = host.file("/etc/chrony/chrony.conf")
    assert conf.user == "root" and conf.mode == 0o644
    assert conf.contains("^server 127.0.0.1 iburst$")
    assert conf.contains("^pool 0.debian.pool.ntp.org iburst maxsources 1$")
    assert conf.contains("^makestep 1.0 3$")
    assert not conf.contains("^pool 1.debian.pool.ntp.org")


def test_chronyd_never_sets_the_container_clock(host):
    # Inside a container chronyd must run with -x so it cannot move the host's clock.
    cmdline = host.check_output("cat /proc/$(pidof chronyd | cut -d' ' -f1)/cmdline | tr '\\0' ' '")
    assert " -x" in cmdline


def test_service_account(host):
    user = host.user("grandmodel")
    assert user.exists
    assert user.uid == 2001
    assert user.group == "grandmodel"
    assert user.shell == "/usr/sbin/nologin"
    assert user.home == "/opt/grandmodel"
    # The password is locked: no login by password either.
    assert host.check_output("passwd -S grandmodel").split()[1] == "L"
    home = host.file("/opt/grandmodel")
    assert home.is_directory and home.user == "grandmodel" and home.mode == 0o750


def test_journald_retention(host):
    dropin = host.file("/etc/systemd/journald.conf.d/50-grandmodel.conf")
    assert dropin.contains("^MaxRetentionSec=14day$")
    assert dropin.contains("^SystemMaxUse=1G$")
    assert dropin.contains("^Storage=persistent$")
    assert host.file("/var/log/journal").is_directory
    assert host.service("systemd-journald").is_running


BAD_INPUTS = [
    pytest.param({"common_timezone": "Mars/Olympus_Mons"}, "is not a time zone known", id="unknown-timezone"),
    pytest.param({"common_chrony_sources": []}, "common_chrony_sources is empty", id="no-time-source"),
    pytest.param({"common_chrony_clock_control": "sometimes"}, "common_chrony_clock_control", id="bad-choice"),
    pytest.param({"common_service_uid": "lots"}, "common_service_uid", id="uid-not-int"),
    pytest.param({"common_service_user": "root"}, "must be lowercase POSIX names and not root", id="root-account"),
    pytest.param({"common_journald_max_retention": "forever"}, "journald settings are malformed", id="bad-retention"),
]


@pytest.mark.parametrize(("extra_vars", "message"), BAD_INPUTS)
def test_bad_input_is_rejected_with_a_clear_message(extra_vars, message):
    import json

    inventory = os.environ["MOLECULE_INVENTORY_FILE"]
    proc = subprocess.run(
        [
            "ansible-playbook", "-i", inventory, str(SCENARIO_DIR / "invalid_input.yml"),
            "-e", json.dumps(extra_vars),
        ],
        capture_output=True, text=True, timeout=300, check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert message in output, output
