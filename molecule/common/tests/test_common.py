"""Verify quantnova.grandmodel.common on the converged host (real state, not Ansible's word)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

# podman exec into the real container: one call costs ~0.2 s against ~1.5 s for the ansible backend.
testinfra_hosts = ["podman://gm-mol-common"]

SCENARIO_DIR = Path(__file__).resolve().parent.parent
PROJECT_DIR = SCENARIO_DIR.parent.parent
SANDBOX_KEY = PROJECT_DIR / ".ansible" / "sandbox" / "id_ed25519"
NOLOGIN_SHELLS = {"/usr/sbin/nologin", "/sbin/nologin", "/bin/false", "/usr/bin/false"}
# Accounts that may keep a login shell, and why.
LOGIN_ALLOWED = {
    "root": "Ansible logs in as root with keys (password locked, PermitRootLogin prohibit-password)",
    "sync": "Debian's sync account: its shell /bin/sync runs sync(1) and exits; its password is locked",
    "deskadmin": "the scenario's key-only admin from common_admin_users (password locked)",
}


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


def address_of(container: str) -> str:
    return subprocess.run(
        ["podman", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", container],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.strip()


def ssh(user: str, *options: str) -> subprocess.CompletedProcess[str]:
    """A real SSH login over the network (podman bridge), not through the scenario's ProxyCommand."""
    return subprocess.run(
        ["ssh", "-i", str(SANDBOX_KEY), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
         "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=5",
         "-o", "ControlMaster=no", "-o", "ControlPath=none", *options,
         f"{user}@{address_of('gm-mol-common')}", "sudo -n true && echo in-as-$(id -un)"],
        capture_output=True, text=True, timeout=30, check=False,
    )


def test_sshd_uses_the_hardened_settings(host):
    # A cloud-init style drop-in (planted by converge.yml) turns passwords on; ours sorts first and wins.
    assert host.file("/etc/ssh/sshd_config.d/50-cloud-init.conf").contains("^PasswordAuthentication yes$")
    effective = host.check_output("sshd -T -C user=root,host=localhost,addr=127.0.0.1").splitlines()
    assert "passwordauthentication no" in effective
    assert "kbdinteractiveauthentication no" in effective
    assert "permitrootlogin without-password" in effective  # sshd -T's name for prohibit-password
    dropin = host.file("/etc/ssh/sshd_config.d/00-grandmodel-hardening.conf")
    assert dropin.user == "root" and dropin.mode == 0o644
    assert host.service("ssh").is_running


def test_admin_logs_in_with_its_key_and_nobody_with_a_password(host):
    admin = ssh("deskadmin")
    assert admin.returncode == 0 and "in-as-deskadmin" in admin.stdout, admin.stderr
    user = host.user("deskadmin")
    assert user.shell == "/bin/bash" and "grandmodel-admin" in user.groups
    assert host.check_output("passwd -S deskadmin").split()[1] == "L"
    # The server offers public key authentication only: a password is never even asked for.
    for login in ("root", "deskadmin"):
        refused = ssh(login, "-o", "PubkeyAuthentication=no",
                      "-o", "PreferredAuthentications=password,keyboard-interactive")
        assert refused.returncode == 255, refused.stdout
        assert "Permission denied (publickey)" in refused.stderr, refused.stderr


def test_every_other_account_cannot_log_in(host):
    """No account but the allowed ones has a login shell, and every password on the host is locked."""
    shadow = {line.split(":")[0]: line.split(":")[1] for line in host.check_output("cat /etc/shadow").splitlines()}
    accounts = [line.split(":") for line in host.check_output("getent passwd").splitlines()]
    assert "grandmodel" in {fields[0] for fields in accounts}
    for name, *_rest, shell in accounts:
        if name not in LOGIN_ALLOWED:
            assert shell in NOLOGIN_SHELLS, f"{name} has the login shell {shell}"
        assert shadow[name][:1] in ("!", "*"), f"{name} has a usable password"


BAD_INPUTS = [
    pytest.param({"common_timezone": "Mars/Olympus_Mons"}, "is not a time zone known", id="unknown-timezone"),
    pytest.param({"common_chrony_sources": []}, "common_chrony_sources is empty", id="no-time-source"),
    pytest.param({"common_chrony_clock_control": "sometimes"}, "common_chrony_clock_control", id="bad-choice"),
    pytest.param({"common_service_uid": "lots"}, "common_service_uid", id="uid-not-int"),
    pytest.param({"common_service_user": "root"}, "must be lowercase POSIX names and not root", id="root-account"),
    pytest.param({"common_journald_max_retention": "forever"}, "journald settings are malformed", id="bad-retention"),
    pytest.param({"common_sshd_permit_root_login": "yes"}, "common_sshd_permit_root_login", id="root-password-login"),
    pytest.param({"common_admin_users": [{"name": "eve", "keys": ["hunter2"]}]}, "passwords are not accepted",
                 id="admin-without-key"),
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
