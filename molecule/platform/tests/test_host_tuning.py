"""Verify quantnova.grandmodel.host_tuning and the drift check on the platform scenario's container host.

The platform tier (playbooks/platform.yml) applies host_tuning before docker and kubernetes on the same host, so
these checks also prove the three roles leave each other's settings alone.

The container shares this machine's kernel, so the role must leave every host-global setting
alone and say so; the report is checked against the live kernel read independently here.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

# podman exec is several times faster than an Ansible round trip per check.
testinfra_hosts = ["ansible://gm-mol-platform"]

SCENARIO_DIR = Path(__file__).resolve().parent.parent
REPO = SCENARIO_DIR.parent.parent
HOST = "gm-mol-platform"
REPORT = "/var/lib/grandmodel/host_tuning_report.json"
SYSCTL_FILE = "/etc/sysctl.d/90-grandmodel-tuning.conf"
LEGACY_TOOL = "/usr/local/libexec/grandmodel/host-tuning-report"  # the evaluator before host_tuning_info
STATUSES = {"applied", "skipped", "pending_reboot"}


_REPORT: dict = {}


def report(host) -> dict:
    if not _REPORT:
        _REPORT.update(json.loads(host.check_output(f"cat {REPORT}")))
    return _REPORT


def live_sysctls(host, keys: list[str]) -> dict[str, str | None]:
    """Read the container's /proc/sys in one round trip ("absent" where a key does not exist)."""
    script = "; ".join(f"cat /proc/sys/{k.replace('.', '/')} 2>/dev/null || echo absent" for k in keys)
    values = host.check_output(f"bash -c '{script}'").splitlines()
    return {k: " ".join(v.split()) for k, v in zip(keys, values, strict=True)}


def playbook(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ansible-playbook", "-i", os.environ["MOLECULE_INVENTORY_FILE"], str(path), *extra],
                          capture_output=True, text=True, timeout=300, check=False)


def test_report_file_covers_every_setting(host):
    assert host.file(REPORT).mode == 0o644
    data = report(host)
    assert data["container"] is True
    names = {e["name"] for e in data["settings"]}
    for key in ("net.core.somaxconn", "vm.swappiness", "vm.nr_hugepages", "fs.file-max", "net.core.busy_poll",
                "kernel.numa_balancing", "cpu governor", "transparent hugepages", "limit nofile",
                "limit memlock", "kernel cmdline", "irqbalance"):
        assert key in names, key
    assert {e["status"] for e in data["settings"]} <= STATUSES
    assert sum(data["counts"].values()) == len(data["settings"])
    assert data["counts"]["change"] == 0
    assert all(e["reason"] for e in data["settings"] if e["status"] == "skipped")


def test_report_matches_the_live_kernel(host):
    sysctls = [e for e in report(host)["settings"] if e["kind"] == "sysctl"]
    lives = live_sysctls(host, [e["name"] for e in sysctls])
    for item in sysctls:
        live = lives[item["name"]]
        assert item["actual"] == live, item
        if item["status"] == "applied":
            want, have = item["target"].split(), live.split()
            if item["mode"] == "floor":
                assert all(int(h) >= int(w) for w, h in zip(want, have, strict=True)), item
            else:
                assert have == want, item
        else:
            assert item["status"] == "skipped" and live != item["target"], item


def test_per_namespace_sysctls_are_reported_in_effect(host):
    settings = {e["name"]: e for e in report(host)["settings"]}
    # podman preset somaxconn 8192 and tcp_fastopen 3 in the container's network namespace.
    assert settings["net.core.somaxconn"]["status"] == "applied"
    assert settings["net.core.somaxconn"]["target"] == "8192"  # floor: never lowered to 4096
    assert settings["net.ipv4.tcp_fastopen"]["status"] == "applied"
    assert "read-only" in settings["net.ipv4.tcp_wmem"]["reason"]


def test_host_global_settings_are_skipped_with_the_reason(host):
    settings = {e["name"]: e for e in report(host)["settings"]}
    for key in ("vm.swappiness", "vm.nr_hugepages", "net.core.rmem_max"):
        assert settings[key]["status"] == "skipped"
        assert "host-global" in settings[key]["reason"], settings[key]
    assert "no cpufreq" in settings["cpu governor"]["reason"] or "host-global" in settings["cpu governor"]["reason"]
    assert settings["transparent hugepages"]["status"] == "skipped"
    assert "capped by the container runtime" in settings["limit nofile"]["reason"]
    assert "a container boots no kernel" in settings["kernel cmdline"]["reason"]
    assert "ConditionVirtualization" in settings["irqbalance"]["reason"]


def test_this_machine_kernel_was_not_touched(host):
    # Every host-global value the role read (through the shared kernel) is still this machine's value:
    # the scenario's swappiness 5, 16 hugepages and THP never never reached the kernel.
    settings = {e["name"]: e for e in report(host)["settings"]}
    for key in ("vm.swappiness", "vm.nr_hugepages", "vm.dirty_ratio", "net.core.rmem_max"):
        mine = " ".join(Path("/proc/sys/" + key.replace(".", "/")).read_text().split())
        assert mine == settings[key]["actual"], settings[key]
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    assert f"[{settings['transparent hugepages']['actual']}]" in thp


def test_sysctl_profile_persisted(host):
    conf = host.file(SYSCTL_FILE)
    assert conf.user == "root" and conf.mode == 0o644
    assert conf.contains("^vm.swappiness = 5$")
    assert conf.contains("^vm.nr_hugepages = 16$")
    assert conf.contains("^net.core.somaxconn = 8192$")
    assert conf.contains("^net.ipv4.tcp_rmem = 4096 131072 33554432$")  # floor kept the larger live value
    assert conf.contains("^-net.core.busy_poll = 50$")  # absent here: ignored, not fatal, at boot


def test_limits_persisted(host):
    limits = host.file("/etc/security/limits.d/90-grandmodel.conf").content_string.split("\n")
    assert ["*", "hard", "nofile", "1048576"] in [line.split() for line in limits]
    dropin = host.file("/etc/systemd/system.conf.d/90-grandmodel-limits.conf")
    assert dropin.contains("^DefaultLimitNOFILE=1048576$")
    assert dropin.contains("^DefaultLimitMEMLOCK=infinity$")
    # systemd was re-executed and reads the new default (the container caps what it can grant).
    assert host.check_output("systemctl show --value -p DefaultLimitNOFILE") == "1048576"


def test_boot_unit_enabled_and_container_safe(host):
    unit = host.file("/etc/systemd/system/grandmodel-host-tuning.service")
    assert unit.contains("^ConditionVirtualization=!container$")
    assert host.service("grandmodel-host-tuning").is_enabled
    script = host.file("/usr/local/sbin/grandmodel-host-tuning")
    assert script.mode == 0o755 and script.contains("scaling_governor") and script.contains("echo \"$2\"")
    # Run by hand in the container, the script refuses to touch the shared kernel.
    assert "host-global" in host.check_output("bash /usr/local/sbin/grandmodel-host-tuning")


def test_isolated_cores_on_the_kernel_command_line_without_reboot(host):
    grub = host.file("/etc/default/grub.d/90-grandmodel-tuning.cfg")
    assert grub.contains("isolcpus=1 nohz_full=1 rcu_nocbs=1")
    assert host.file("/etc/default/irqbalance").contains("^IRQBALANCE_BANNED_CPULIST=1$")
    assert host.service("irqbalance").is_enabled
    assert not host.file("/var/run/reboot-required").exists  # a container never asks for a reboot


def test_exact_value_on_a_read_only_key_is_skipped_not_faked(host):
    # The module itself, run on the container through Ansible (no script is left on the host any more).
    assert not host.file(LEGACY_TOOL).exists
    args = {"sysctls": {"net.core.somaxconn": 4096}, "sysctl_file": SYSCTL_FILE, "after_apply": True}
    env = dict(os.environ, ANSIBLE_STDOUT_CALLBACK="ansible.posix.json", ANSIBLE_LOAD_CALLBACK_PLUGINS="1",
               ANSIBLE_CALLBACKS_ENABLED="ansible.posix.json")  # no profile_tasks lines around the JSON
    proc = subprocess.run(["ansible", HOST, "-i", os.environ["MOLECULE_INVENTORY_FILE"], "--check",
                           "-m", "quantnova.grandmodel.host_tuning_info", "-a", json.dumps(args)],
                          capture_output=True, text=True, timeout=300, check=False, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)["plays"][0]["tasks"][0]["hosts"][HOST]
    (item,) = result["settings"]
    assert result["container"] is True and result["changed"] is False
    assert item["status"] == "skipped" and item["actual"] == "8192"
    assert "/proc/sys is read-only" in item["reason"]


def test_service_tag_alone_runs_its_tasks_and_changes_nothing():
    # The tag reaches the statically imported tasks (and the evaluation they need) and nothing else.
    proc = playbook(SCENARIO_DIR / "converge.yml", "--tags", "host_tuning_service")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    ran = {line.split(" : ", 1)[1].split("]")[0] for line in output.splitlines()
           if line.startswith("TASK [quantnova.grandmodel.host_tuning : ")}
    assert {"Evaluate the live host against the tuning profile", "Ensure the tuning report on the host is current",
            "Show the tuning summary"} <= ran, ran
    assert not ran & {"Ensure irqbalance is installed", "Ensure the sysctl profile is persisted for every boot",
                      "Assert the host runs a supported Debian release"}, ran
    assert "changed=0" in output and "failed=0" in output, output


def container_netns(key: str, value: str | None = None) -> str:
    """Read or set a per-network-namespace sysctl inside the test container's own namespace."""
    pid = subprocess.run(["podman", "inspect", "-f", "{{.State.Pid}}", HOST], capture_output=True, text=True,
                         check=True).stdout.strip()
    cmd = ["nsenter", "-t", pid, "-n", "sysctl", "-n", key] if value is None else \
        ["nsenter", "-t", pid, "-n", "sysctl", "-w", f"{key}={value}"]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()


def test_drift_check_passes_then_lists_each_difference(host):
    drift_check = REPO / "playbooks" / "drift_check.yml"
    clean = playbook(drift_check)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "matches its tuning profile" in clean.stdout
    machine_somaxconn = Path("/proc/sys/net/core/somaxconn").read_text().strip()
    container_netns("net.core.somaxconn", "1024")  # the container's namespace only (net.core.somaxconn is per-netns)
    host.run(f"sed -i 's/^vm.swappiness = 5$/vm.swappiness = 60/' {SYSCTL_FILE}")
    try:
        drifted = playbook(drift_check)
        output = drifted.stdout + drifted.stderr
        assert drifted.returncode != 0, output
        assert "host tuning drift on gm-mol-platform (2)" in output
        assert "net.core.somaxconn: live 1024, want at least 4096" in output
        assert f"vm.swappiness: {SYSCTL_FILE} has 60, want 5" in output
    finally:
        container_netns("net.core.somaxconn", "8192")
        host.run(f"sed -i 's/^vm.swappiness = 60$/vm.swappiness = 5/' {SYSCTL_FILE}")
    assert Path("/proc/sys/net/core/somaxconn").read_text().strip() == machine_somaxconn
    assert container_netns("net.core.somaxconn") == "8192"


BAD_INPUTS = [
    pytest.param({"host_tuning_thp_enabled": "always"}, "host_tuning_thp_enabled", id="thp-always"),
    pytest.param({"host_tuning_sysctls_min": {"vm.swappiness": "low"}}, "host_tuning_sysctls_min only raises",
                 id="floor-not-numeric"),
    pytest.param({"host_tuning_sysctls_extra": {"not a key": 1}}, "must be named like net.core.somaxconn",
                 id="bad-sysctl-name"),
    pytest.param({"host_tuning_isolated_cores": "2-64"}, "names a CPU that", id="missing-cores"),
]


@pytest.mark.parametrize(("extra_vars", "message"), BAD_INPUTS)
def test_bad_input_is_rejected_with_a_clear_message(extra_vars, message):
    # The platform scenario's bad-input playbook applies one role: this one.
    proc = playbook(SCENARIO_DIR / "invalid_input.yml", "-e",
                    json.dumps({"role_under_test": "host_tuning", **extra_vars}))
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert message in output, output
