"""host_tuning_info: the evaluator on real /proc- and /sys-like trees, then the module on this machine.

The evaluator reads files under a root directory and asks systemd through commands. Here the root is a
temporary tree laid out like /proc and /sys, and the commands are small executables in the tree's own bin
directory (the machine's systemctl is never asked). A read-only /proc/sys is a real read-only bind mount in a
private mount namespace, and the apply path runs in a private network namespace, so nothing here changes
this machine's kernel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, run_module

from ansible_collections.quantnova.grandmodel.plugins.module_utils.tuning import (
    Host,
    TuningError,
    build_profile,
    check_drift,
    evaluate,
    floor_target,
    satisfied,
)
from ansible_collections.quantnova.grandmodel.plugins.modules import host_tuning_info

SYSCTL_FILE = "/etc/sysctl.d/90-grandmodel-tuning.conf"
REPORT = "/var/lib/grandmodel/host_tuning_report.json"
ANSIBLE_BIN = REPO / ".venv" / "bin"
TARGET_PYTHON = shutil.which("python3", path="/usr/bin") or sys.executable

SYSTEMCTL = """#!/bin/sh
# Answers like systemd from the files in $STATE; logs every call.
echo "systemctl $*" >> "{state}/calls"
case "$1" in
  show) cat "{state}/$4" 2>/dev/null; exit 0 ;;
  is-active) if [ -f "{state}/active-$2" ]; then cat "{state}/active-$2"; exit 0; fi; echo inactive; exit 3 ;;
esac
exit 1
"""
DETECT_VIRT = """#!/bin/sh
echo "systemd-detect-virt $*" >> "{state}/calls"
exit "$(cat "{state}/virt-rc" 2>/dev/null || echo 1)"
"""
PID1_LIMITS = """Limit                     Soft Limit           Hard Limit           Units
Max cpu time              unlimited            unlimited            seconds
Max open files            {nofile_soft:<20} {nofile:<20} files
Max locked memory         {memlock:<20} {memlock:<20} bytes
"""


class Tree:
    """A temporary host: /proc, /sys and /etc under `root`, systemd answers in `state`, commands in `bin`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = root / "_bin"
        self.state = root / "_state"
        self.bin.mkdir(parents=True)
        self.state.mkdir()
        for name, script in (("systemctl", SYSTEMCTL), ("systemd-detect-virt", DETECT_VIRT)):
            path = self.bin / name
            path.write_text(script.format(state=self.state))
            path.chmod(0o755)
        self.pid1_limits()

    def write(self, path: str, text: str) -> Path:
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        return target

    def sysctl(self, key: str, value: str) -> Path:
        return self.write("/proc/sys/" + key.replace(".", "/"), value + "\n")

    def systemd(self, **props: str) -> None:
        for prop, value in props.items():
            (self.state / prop).write_text(value + "\n")

    def active(self, unit: str, state: str) -> None:
        (self.state / f"active-{unit}").write_text(state + "\n")

    def pid1_limits(self, nofile: str = "unlimited", memlock: str = "unlimited") -> None:
        self.write("/proc/1/limits", PID1_LIMITS.format(nofile_soft=nofile, nofile=nofile, memlock=memlock))

    def calls(self) -> list[str]:
        path = self.state / "calls"
        return path.read_text().splitlines() if path.exists() else []

    def which(self, name: str) -> str | None:
        path = self.bin / name
        return str(path) if os.access(path, os.X_OK) else None

    @staticmethod
    def run(argv: list[str]) -> tuple[int, str, str]:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        return proc.returncode, proc.stdout, proc.stderr

    def host(self) -> Host:
        return Host(str(self.root), run_command=self.run, get_bin_path=self.which)


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return Tree(tmp_path / "host")


def profile(**kwargs: Any) -> dict[str, Any]:
    """A profile with nothing in it but what the test names (irqbalance left out, C-states left out)."""
    return build_profile(**kwargs)


def only(report: dict[str, Any], name: str) -> dict[str, Any]:
    found = [item for item in report["settings"] if item["name"] == name]
    assert len(found) == 1, report
    return found[0]


# -- comparisons ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("desired", "actual", "target"), [
    ("4096", "8192", "8192"),  # never lowered
    ("4096", "1024", "4096"),  # raised
    ("4096 87380 16777216", "4096 131072 1000", "4096 131072 16777216"),  # per component
    ("4096 87380 16777216", "1 2", "4096 87380 16777216"),  # not comparable: the floor as given
    ("4096", "cubic", "4096"),
])
def test_floor_target_raises_never_lowers(desired: str, actual: str, target: str) -> None:
    assert floor_target(desired, actual) == target


@pytest.mark.parametrize(("target", "actual", "mode", "ok"), [
    ("4096", "8192", "floor", True),
    ("4096", "4095", "floor", False),
    ("4096 87380 16777216", "4096 87380 16777215", "floor", False),
    ("2", "0", "ceiling", True),
    ("2", "10", "ceiling", False),
    ("10", "10", "exact", True),
    ("4096 87380 16777216", "4096 87380 16777216", "exact", True),
    ("10", "010", "exact", False),  # exact compares the text the kernel shows
    ("never", "never", "exact", True),
    ("10", None, "exact", False),
])
def test_satisfied(target: str, actual: str | None, mode: str, ok: bool) -> None:
    assert satisfied(target, actual, mode) is ok


# -- sysctls: one decision per row ------------------------------------------------------------------

SYSCTL_TABLE = [
    # key, mode, desired, live (None: absent), container, status, target, reason fragment
    ("vm.swappiness", "exact", "10", "10", False, "applied", "10", ""),
    ("vm.swappiness", "exact", "10", "60", False, "change", "10", ""),
    ("vm.swappiness", "exact", "10", "60", True, "skipped", "10", "host-global kernel setting"),
    ("net.ipv4.tcp_fastopen", "exact", "3", "1", True, "change", "3", ""),  # per-netns: a container may write it
    ("net.core.rmem_max", "floor", "16777216", "212992", True, "skipped", "16777216", "host-global"),
    ("net.core.somaxconn", "floor", "4096", "8192", True, "applied", "8192", ""),
    ("net.core.somaxconn", "floor", "4096", "1024", False, "change", "4096", ""),
    ("net.ipv4.tcp_rmem", "floor", "4096 87380 16777216", "4096\t131072\t6291456", False, "change",
     "4096 131072 16777216", ""),
    ("net.ipv4.tcp_rmem", "floor", "4096 87380 16777216", "4096 131072 33554432", True, "applied",
     "4096 131072 33554432", ""),
    ("net.core.busy_poll", "exact", "50", None, True, "skipped", "50", "not in this container's network namespace"),
    ("net.core.busy_poll", "exact", "50", None, False, "skipped", "50", "not supported by this kernel"),
    ("kernel.sched_min_granularity_ns", "exact", "10000000", None, True, "skipped", "10000000",
     "not supported by this kernel (no /proc/sys/kernel/sched_min_granularity_ns)"),
]


@pytest.mark.parametrize(("key", "mode", "desired", "live", "container", "status", "target", "reason"),
                         SYSCTL_TABLE)
def test_sysctl_decisions(tree: Tree, key: str, mode: str, desired: str, live: str | None, container: bool,
                          status: str, target: str, reason: str) -> None:
    if live is not None:
        tree.sysctl(key, live)
    table = {"sysctls_min": {key: desired}} if mode == "floor" else {"sysctls": {key: desired}}
    report = evaluate(tree.host(), profile(container=container, **table))
    item = only(report, key)
    assert (item["status"], item["target"], item["mode"], item["kind"]) == (status, target, mode, "sysctl")
    assert item["actual"] == (" ".join(live.split()) if live is not None else "absent")
    assert reason in item["reason"] and bool(item["reason"]) == bool(reason)
    if status == "skipped" and (live is not None or (container and key.startswith("net."))):
        assert item["reason"].endswith(f"persisted in {SYSCTL_FILE} for the next boot"), item


def test_after_apply_a_value_the_kernel_kept_is_skipped_with_it(tree: Tree) -> None:
    tree.sysctl("vm.swappiness", "60")
    tree.sysctl("vm.dirty_ratio", "10")
    report = evaluate(tree.host(), profile(sysctls={"vm.swappiness": 10, "vm.dirty_ratio": 10}), final=True)
    item = only(report, "vm.swappiness")
    assert (item["status"], item["reason"]) == ("skipped", "written, but the kernel kept 60")
    assert report["counts"] == {"applied": 1, "change": 0, "pending_reboot": 0, "skipped": 1}
    assert evaluate(tree.host(), profile(sysctls={"vm.swappiness": 10}))["counts"]["change"] == 1


def test_read_only_proc_sys_is_skipped_not_faked(tree: Tree) -> None:
    """A real read-only bind mount over the tree's /proc/sys, in a private mount namespace."""
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare (util-linux) for a private read-only bind mount")
    tree.sysctl("net.core.somaxconn", "8192")
    tree.sysctl("net.ipv4.tcp_fastopen", "1")
    tree.sysctl("vm.swappiness", "60")
    code = (
        "import json, sys\n"
        "from ansible_collections.quantnova.grandmodel.plugins.module_utils.tuning import Host, build_profile, "
        "evaluate\n"
        "p = build_profile(sysctls={'net.core.somaxconn': 4096, 'net.ipv4.tcp_fastopen': 3, 'vm.swappiness': 10},"
        " container=True)\n"
        "print(json.dumps(evaluate(Host(sys.argv[1]), p, final=True)))\n")
    proc_sys = tree.root / "proc" / "sys"
    proc = subprocess.run(
        [unshare, "--mount", "--propagation", "private", "sh", "-c",
         'mount --bind -o ro "$1" "$1" && exec "$2" -c "$3" "$4"', "sh", str(proc_sys), sys.executable, code,
         str(tree.root)],
        env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0 and "mount" in proc.stderr:
        pytest.skip(f"no private read-only bind mount here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    exact = only(report, "net.core.somaxconn")  # the same key set exactly, not as a floor: 8192 is not 4096
    assert (exact["status"], exact["actual"]) == ("skipped", "8192")
    assert exact["reason"].startswith("/proc/sys is read-only here (container runtime); persisted in")
    assert "read-only" in only(report, "net.ipv4.tcp_fastopen")["reason"]
    assert "host-global" in only(report, "vm.swappiness")["reason"]  # that reason comes first
    assert report["counts"]["change"] == 0
    assert (tree.root / "proc/sys/net/core/somaxconn").read_text() == "8192\n"


# -- sysfs: governor, C-states, transparent hugepages -------------------------------------------------

def test_governor_on_every_cpu(tree: Tree) -> None:
    for cpu in (0, 1):
        tree.write(f"/sys/devices/system/cpu/cpu{cpu}/cpufreq/scaling_governor", "performance\n")
    host = tree.host()
    assert only(evaluate(host, profile(cpu_governor="performance")), "cpu governor")["status"] == "applied"
    tree.write("/sys/devices/system/cpu/cpu1/cpufreq/scaling_governor", "powersave\n")
    item = only(evaluate(host, profile(cpu_governor="performance")), "cpu governor")
    assert (item["status"], item["actual"]) == ("change", "performance,powersave")
    item = only(evaluate(host, profile(cpu_governor="performance", container=True)), "cpu governor")
    assert item["status"] == "skipped" and "grandmodel-host-tuning.service applies it" in item["reason"]
    assert not [i for i in evaluate(host, profile())["settings"] if i["name"] == "cpu governor"]  # "" leaves it


def test_no_cpufreq_is_reported_not_failed(tree: Tree) -> None:
    tree.write("/sys/devices/system/cpu/cpu0/topology/core_id", "0\n")
    item = only(evaluate(tree.host(), profile(cpu_governor="performance")), "cpu governor")
    assert (item["status"], item["actual"]) == ("skipped", "absent")
    assert item["reason"] == "no cpufreq on this host (absent): a VM or a CPU without a frequency driver"
    # A governor file that cannot be read (here: a directory) is "unreadable", not "absent".
    (tree.root / "sys/devices/system/cpu/cpu0/cpufreq/scaling_governor").mkdir(parents=True)
    item = only(evaluate(tree.host(), profile(cpu_governor="performance")), "cpu governor")
    assert "(unreadable)" in item["reason"]


@pytest.mark.parametrize(("states", "limit", "status", "actual"), [
    # (latency, disable) per state
    ([(0, "0"), (2, "0"), (10, "1"), (133, "1")], 2, "applied", "2"),
    ([(0, "0"), (2, "0"), (10, "0")], 2, "change", "10"),
    ([(0, "1"), (2, "1")], 2, "skipped", "absent"),  # nothing enabled: nothing to read
    ([], 2, "skipped", "absent"),
])
def test_cstate_exit_latency_is_a_ceiling(tree: Tree, states: list[tuple[int, str]], limit: int, status: str,
                                          actual: str) -> None:
    tree.write("/sys/devices/system/cpu/cpu0/online", "1\n")
    for cpu in (0, 1):
        for index, (latency, disable) in enumerate(states):
            base = f"/sys/devices/system/cpu/cpu{cpu}/cpuidle/state{index}"
            tree.write(base + "/latency", f"{latency}\n")
            tree.write(base + "/disable", f"{disable}\n")
    item = only(evaluate(tree.host(), profile(cstate_latency_us=limit)), "c-state exit latency limit (us)")
    assert (item["status"], item["actual"], item["desired"]) == (status, actual, str(limit))
    if actual == "absent":
        assert item["reason"] == "no cpuidle states are exposed on this host"
    assert not [i for i in evaluate(tree.host(), profile(cstate_latency_us=-1))["settings"]
                if i["name"].startswith("c-state")]


def test_transparent_hugepages(tree: Tree) -> None:
    host = tree.host()
    item = only(evaluate(host, profile(thp_enabled="never")), "transparent hugepages")
    assert item["reason"] == "no transparent hugepage support (/sys/kernel/mm/transparent_hugepage absent)"
    tree.write("/sys/kernel/mm/transparent_hugepage/enabled", "always [madvise] never\n")
    tree.write("/sys/kernel/mm/transparent_hugepage/defrag", "always defer defer+madvise madvise [never]\n")
    report = evaluate(host, profile(thp_enabled="never", thp_defrag="never"))
    assert (only(report, "transparent hugepages")["status"], only(report, "transparent hugepages")["actual"]) == \
        ("change", "madvise")
    assert only(report, "transparent hugepage defrag")["status"] == "applied"
    assert only(evaluate(host, profile(thp_enabled="never", container=True)),
                "transparent hugepages")["status"] == "skipped"


# -- limits, kernel command line, irqbalance, container detection -------------------------------------

@pytest.mark.parametrize(("systemd", "pid1", "container", "status", "actual", "reason"), [
    ({"DefaultLimitNOFILE": "1048576"}, "unlimited", False, "applied", "1048576", ""),
    ({"DefaultLimitNOFILE": "2097152"}, "unlimited", False, "applied", "2097152", ""),
    ({"DefaultLimitNOFILE": "1048576"}, "32768", True, "skipped", "32768",
     "capped by the container runtime (hard limit 32768 of PID 1)"),
    ({"DefaultLimitNOFILE": "524288"}, "unlimited", False, "pending_reboot", "524288", "daemon-reexec or reboot"),
    ({}, "unlimited", False, "pending_reboot", "absent", "daemon-reexec or reboot"),  # systemd has no answer
    ({"DefaultLimitNOFILE": "1048576"}, "32768", False, "pending_reboot", "32768", "daemon-reexec"),
])
def test_nofile_limit(tree: Tree, systemd: dict[str, str], pid1: str, container: bool, status: str, actual: str,
                      reason: str) -> None:
    tree.systemd(**systemd)
    tree.pid1_limits(nofile=pid1)
    item = only(evaluate(tree.host(), profile(limits={"nofile": 1048576}, container=container)), "limit nofile")
    assert (item["status"], item["actual"], item["desired"]) == (status, actual, "1048576")
    assert reason in item["reason"]
    assert "systemctl show --value -p DefaultLimitNOFILE" in tree.calls()


def test_memlock_infinity_satisfies_unlimited(tree: Tree) -> None:
    tree.systemd(DefaultLimitMEMLOCK="infinity")
    item = only(evaluate(tree.host(), profile(limits={"memlock": "unlimited"})), "limit memlock")
    assert (item["status"], item["actual"]) == ("applied", "infinity")
    tree.systemd(DefaultLimitMEMLOCK="8388608")
    assert only(evaluate(tree.host(), profile(limits={"memlock": "unlimited"})),
                "limit memlock")["status"] == "pending_reboot"


@pytest.mark.parametrize(("cmdline", "grub", "container", "status", "actual", "reason"), [
    ("BOOT_IMAGE=/vmlinuz root=/dev/sda1 isolcpus=2-7 nohz_full=2-7", False, False, "applied",
     "isolcpus=2-7 nohz_full=2-7", ""),
    ("BOOT_IMAGE=/vmlinuz isolcpus=2-7", True, False, "pending_reboot", "missing nohz_full=2-7", "next reboot"),
    ("BOOT_IMAGE=/vmlinuz", False, False, "skipped", "not present", "no GRUB on this host"),
    ("BOOT_IMAGE=/vmlinuz", True, True, "skipped", "not present", "a container boots no kernel"),
])
def test_kernel_command_line(tree: Tree, cmdline: str, grub: bool, container: bool, status: str, actual: str,
                             reason: str) -> None:
    tree.write("/proc/cmdline", cmdline + "\n")
    if grub:
        tree.write("/usr/sbin/update-grub", "#!/bin/sh\n")
    report = evaluate(tree.host(), profile(kernel_cmdline=["isolcpus=2-7", "nohz_full=2-7"], container=container))
    item = only(report, "kernel cmdline")
    assert (item["status"], item["actual"]) == (status, actual)
    assert reason in item["reason"]


@pytest.mark.parametrize(("policy", "live", "container", "status"), [
    ("enabled", "active", False, "applied"),
    ("enabled", None, False, "change"),
    ("enabled", None, True, "skipped"),
    ("disabled", None, False, "applied"),
    ("disabled", "active", False, "change"),
])
def test_irqbalance(tree: Tree, policy: str, live: str | None, container: bool, status: str) -> None:
    if live:
        tree.active("irqbalance", live)
    item = only(evaluate(tree.host(), profile(irqbalance=policy, container=container)), "irqbalance")
    assert item["status"] == status
    assert item["actual"] == (live or "inactive")
    if status == "skipped":
        assert "ConditionVirtualization=!container" in item["reason"]
    report = evaluate(tree.host(), profile(irqbalance="unmanaged"))
    assert not [i for i in report["settings"] if i["name"] == "irqbalance"]


def test_without_systemd_commands_the_answers_are_unknown(tree: Tree) -> None:
    for name in ("systemctl", "systemd-detect-virt"):
        (tree.bin / name).unlink()
    report = evaluate(tree.host(), profile(irqbalance="enabled", limits={"nofile": 1048576}))
    assert report["container"] is False
    assert only(report, "irqbalance")["actual"] == "unknown"
    assert only(report, "limit nofile")["status"] == "pending_reboot"


@pytest.mark.parametrize(("marker", "virt_rc", "hint", "container"), [
    (None, 1, False, False),
    ("/.dockerenv", 1, False, True),
    ("/run/.containerenv", 1, False, True),
    (None, 0, False, True),  # systemd-detect-virt --container answers yes
    (None, 1, True, True),  # the facts said container
])
def test_container_detection(tree: Tree, marker: str | None, virt_rc: int, hint: bool, container: bool) -> None:
    if marker:
        tree.write(marker, "")
    (tree.state / "virt-rc").write_text(f"{virt_rc}\n")
    assert evaluate(tree.host(), profile(container=hint))["container"] is container
    if not marker and not hint:
        assert "systemd-detect-virt --container --quiet" in tree.calls()


# -- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "message"), [
    ({"sysctls": {"not a key": 1}}, "cannot evaluate sysctl 'not a key': a sysctl is named like"),
    ({"sysctls": {"net/../../etc/shadow": 1}}, "a sysctl is named like net.core.somaxconn"),
    ({"sysctls": {"vm.swappiness": "10; reboot"}}, "the value must be numbers or words"),
    ({"sysctls": {"vm.swappiness": None}}, "cannot evaluate sysctl vm.swappiness=None"),
    ({"sysctls_min": {"vm.swappiness": "low"}}, "floor sysctl vm.swappiness='low': a floor is raised, never"),
    ({"sysctls": {"net.core.somaxconn": 1}, "sysctls_min": {"net.core.somaxconn": 4096}},
     "it is both set exactly and a floor"),
    ({"limits": {"nproc": 10}}, "limits nproc: only nofile and memlock are known"),
    ({"limits": {"nofile": "lots"}}, "the nofile limit 'lots': it must be a positive number or unlimited"),
    ({"irqbalance": "sometimes"}, "irqbalance policy 'sometimes'"),
    ({"cstate_latency_us": "deep"}, "C-state latency limit 'deep'"),
])
def test_bad_input_names_what_and_why(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(TuningError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_profile(**kwargs)


def test_yaml_booleans_are_sysctl_numbers(tree: Tree) -> None:
    tree.sysctl("kernel.numa_balancing", "0")
    item = only(evaluate(tree.host(), profile(sysctls={"kernel.numa_balancing": False})), "kernel.numa_balancing")
    assert (item["desired"], item["status"]) == ("0", "applied")


# -- drift ------------------------------------------------------------------------------------------

def tuned_tree(tree: Tree) -> dict[str, Any]:
    """A host the role tuned: live values applied, the sysctl.d file and the report written."""
    tree.sysctl("net.core.somaxconn", "8192")
    tree.sysctl("net.ipv4.tcp_rmem", "4096 131072 33554432")
    tree.sysctl("vm.swappiness", "60")  # host-global in a container: skipped, never drift
    tree.write("/sys/kernel/mm/transparent_hugepage/enabled", "always madvise [never]\n")
    wanted = profile(sysctls={"vm.swappiness": 5, "net.core.busy_poll": 50},
                     sysctls_min={"net.core.somaxconn": 4096, "net.ipv4.tcp_rmem": "4096 87380 16777216"},
                     thp_enabled="never", container=True)
    report = evaluate(tree.host(), wanted, final=True)
    lines = [("-" if item["actual"] == "absent" else "") + f"{item['name']} = {item['target']}"
             for item in report["settings"] if item["kind"] == "sysctl"]
    tree.write(SYSCTL_FILE, "# Ansible managed\n" + "\n".join(lines) + "\n")
    tree.write(REPORT, json.dumps(report, indent=2, sort_keys=True))
    return wanted


def test_drift_none_on_a_tuned_host(tree: Tree) -> None:
    wanted = tuned_tree(tree)
    result = check_drift(tree.host(), wanted, REPORT)
    assert result["drift"] == []
    assert only(result["report"], "net.core.busy_poll")["status"] == "skipped"  # "-" line still matches


def test_drift_lists_each_difference(tree: Tree) -> None:
    wanted = tuned_tree(tree)
    tree.sysctl("net.core.somaxconn", "1024")  # below the floor now
    tree.write("/sys/kernel/mm/transparent_hugepage/enabled", "[always] madvise never\n")
    conf = tree.root / SYSCTL_FILE.lstrip("/")
    conf.write_text(conf.read_text().replace("vm.swappiness = 5", "vm.swappiness = 60")
                    .replace("net.ipv4.tcp_rmem = 4096 131072 33554432\n", ""))
    tree.sysctl("vm.swappiness", "1")  # host-global and skipped before: not drift
    result = check_drift(tree.host(), wanted, REPORT)
    assert result["drift"] == [
        "net.core.somaxconn: live 1024, want at least 4096",
        "transparent hugepages: live always, want never",
        f"net.ipv4.tcp_rmem: {SYSCTL_FILE} has nothing, want at least 4096 87380 16777216",
        f"vm.swappiness: {SYSCTL_FILE} has 60, want 5",
    ]


def test_drift_notices_a_profile_that_grew(tree: Tree) -> None:
    wanted = tuned_tree(tree)
    tree.sysctl("vm.dirty_ratio", "20")
    grown = dict(wanted, sysctls=dict(wanted["sysctls"], **{"vm.dirty_ratio": {"value": "10", "mode": "exact"}}))
    assert check_drift(tree.host(), grown, REPORT)["drift"] == [
        "vm.dirty_ratio: not in the stored report (profile changed since the last run)",
        f"vm.dirty_ratio: {SYSCTL_FILE} has nothing, want 10",
    ]


@pytest.mark.parametrize(("content", "why"), [
    (None, "No such file or directory"),
    ("{not json", "Expecting property name"),
    ('{"counts": {}}', "'settings'"),
])
def test_drift_without_a_usable_report(tree: Tree, content: str | None, why: str) -> None:
    wanted = tuned_tree(tree)
    report = tree.root / REPORT.lstrip("/")
    if content is None:
        report.unlink()
    else:
        report.write_text(content)
    (line,) = check_drift(tree.host(), wanted, REPORT)["drift"]
    assert line.startswith(f"no usable tuning report at {REPORT} (")
    assert why in line and line.endswith("): run the host_tuning role first")


# -- the module ----------------------------------------------------------------------------------

def live(key: str) -> str:
    return " ".join(Path("/proc/sys/" + key.replace(".", "/")).read_text().split())


MODULE_ARGS = {"sysctls": {"vm.swappiness": 10, "net.ipv4.tcp_fastopen": 3},
               "sysctls_min": {"net.core.somaxconn": 4096, "net.ipv4.tcp_rmem": "4096 87380 16777216"},
               "cpu_governor": "performance", "thp_enabled": "never",
               "limits": {"nofile": 1048576, "memlock": "unlimited"}}


def test_module_reads_this_machine_the_same_in_check_mode(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_module(host_tuning_info.main, MODULE_ARGS, capsys)
    checked = run_module(host_tuning_info.main, MODULE_ARGS, capsys, check_mode=True)
    assert result["changed"] is False and checked["changed"] is False
    assert "drift" not in result
    assert [(i["name"], i["status"]) for i in result["settings"]] == \
        [(i["name"], i["status"]) for i in checked["settings"]]
    for item in result["settings"]:
        if item["kind"] == "sysctl":
            assert item["actual"] == live(item["name"]), item
    assert sum(result["counts"].values()) == len(result["settings"]) == 8


def test_module_fails_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_module(host_tuning_info.main, {"sysctls_min": {"vm.swappiness": "low"}}, capsys)
    assert result["failed"] is True
    assert result["msg"].startswith("cannot evaluate the floor sysctl vm.swappiness='low'")


def ansible(*args: str, netns: bool = False) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_LOAD_CALLBACK_PLUGINS="1",
               ANSIBLE_STDOUT_CALLBACK="ansible.posix.json", ANSIBLE_CALLBACKS_ENABLED="ansible.posix.json",
               NO_COLOR="1")
    argv = [*args, "-i", "localhost,", "-c", "local", "-e", f"ansible_python_interpreter={TARGET_PYTHON}"]
    if netns:
        argv = ["unshare", "--net", *argv]
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)


def host_result(proc: subprocess.CompletedProcess[str], task: int = 0) -> dict[str, Any]:
    try:
        output = json.loads(proc.stdout)
    except ValueError:
        pytest.fail(f"ansible printed no JSON (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    result: dict[str, Any] = output["plays"][0]["tasks"][task]["hosts"]["localhost"]
    return result


@pytest.mark.skipif(not (ANSIBLE_BIN / "ansible").exists(), reason="the project virtualenv .venv has no ansible")
def test_module_runs_through_ansible_on_localhost(tmp_path: Path) -> None:
    """`ansible -m quantnova.grandmodel.host_tuning_info` with the system Python: evaluation, check mode, drift."""
    module = ["-m", "quantnova.grandmodel.host_tuning_info"]
    proc = ansible(str(ANSIBLE_BIN / "ansible"), "localhost", *module, "-a", json.dumps(MODULE_ARGS), "--check")
    result = host_result(proc)
    assert proc.returncode == 0, result
    assert result["changed"] is False
    settings = {i["name"]: i for i in result["settings"]}
    assert settings["net.core.somaxconn"]["actual"] == live("net.core.somaxconn")
    assert settings["net.ipv4.tcp_rmem"]["actual"] == live("net.ipv4.tcp_rmem")
    stored = tmp_path / "report.json"
    stored.write_text(json.dumps({"settings": result["settings"]}))
    conf = tmp_path / "90-grandmodel-tuning.conf"
    conf.write_text("vm.swappiness = 10\n")
    args = dict(MODULE_ARGS, stored_report=str(stored), sysctl_file=str(conf))
    proc = ansible(str(ANSIBLE_BIN / "ansible"), "localhost", *module, "-a", json.dumps(args))
    result = host_result(proc)
    assert proc.returncode == 0, result
    # Everything the file lacks is drift; the live host is as the report stored it a moment ago.
    assert result["drift"] == [f"net.core.somaxconn: {conf} has nothing, want at least 4096",
                               f"net.ipv4.tcp_fastopen: {conf} has nothing, want 3",
                               f"net.ipv4.tcp_rmem: {conf} has nothing, want at least 4096 87380 16777216"]
    proc = ansible(str(ANSIBLE_BIN / "ansible"), "localhost", *module, "-a", json.dumps({"irqbalance": "often"}))
    result = host_result(proc)
    assert proc.returncode != 0 and "value of irqbalance must be one of" in result["msg"]


APPLY_PLAYBOOK = """
- name: Evaluate, apply the sysctls with the role's own task, evaluate again (private network namespace)
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Evaluate
      quantnova.grandmodel.host_tuning_info:
        sysctls: {{net.ipv4.tcp_fastopen: 3}}
        sysctls_min: {{net.core.somaxconn: 8192, net.ipv4.tcp_rmem: "4096 87380 67108864"}}
        sysctl_file: {conf}
        container: true
      register: __host_tuning_evaluation
    - name: Apply with the role's sysctl step
      ansible.builtin.include_role:
        name: quantnova.grandmodel.host_tuning
        tasks_from: sysctl.yml
      vars:
        __host_tuning_sysctl_file: {conf}
    - name: Evaluate after applying
      quantnova.grandmodel.host_tuning_info:
        sysctls: {{net.ipv4.tcp_fastopen: 3}}
        sysctls_min: {{net.core.somaxconn: 8192, net.ipv4.tcp_rmem: "4096 87380 67108864"}}
        sysctl_file: {conf}
        container: true
        after_apply: true
"""


@pytest.mark.skipif(not (ANSIBLE_BIN / "ansible-playbook").exists(), reason="the project virtualenv has no ansible")
def test_role_applies_change_entries_through_ansible_posix_sysctl(tmp_path: Path) -> None:
    """In a new network namespace (defaults: somaxconn 4096, tcp_fastopen 1), so this machine keeps its values."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare for a private network namespace")
    mine = {key: live(key) for key in ("net.core.somaxconn", "net.ipv4.tcp_fastopen", "net.ipv4.tcp_rmem")}
    conf = tmp_path / "90-grandmodel-tuning.conf"
    persisted = "# Ansible managed\nnet.core.somaxconn = 8192\nnet.ipv4.tcp_fastopen = 3\n" \
                "net.ipv4.tcp_rmem = 4096 131072 67108864\n"
    conf.write_text(persisted)
    book = tmp_path / "apply.yml"
    book.write_text(APPLY_PLAYBOOK.format(conf=conf))
    proc = ansible(str(ANSIBLE_BIN / "ansible-playbook"), str(book), netns=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    before = host_result(proc, 0)
    plan = {i["name"]: (i["status"], i["target"]) for i in before["settings"]}
    assert plan == {"net.core.somaxconn": ("change", "8192"), "net.ipv4.tcp_fastopen": ("change", "3"),
                    "net.ipv4.tcp_rmem": ("change", "4096 131072 67108864")}  # the floor kept the live 131072
    # The role's task, found by name: the include_role may bring argument validations of the role's
    # dependencies (quantnova.grandmodel._common) before it.
    tasks = json.loads(proc.stdout)["plays"][0]["tasks"]
    (applied,) = [t for t in tasks if t["task"]["name"].endswith("carry their target values")]
    items = applied["hosts"]["localhost"]["results"]
    assert sorted((r["item"]["name"], r["changed"]) for r in items) == \
        [("net.core.somaxconn", True), ("net.ipv4.tcp_fastopen", True), ("net.ipv4.tcp_rmem", True)]
    after = host_result(proc, [t["task"]["name"] for t in tasks].index("Evaluate after applying"))
    assert {i["name"]: i["status"] for i in after["settings"]} == dict.fromkeys(plan, "applied")
    assert conf.read_text() == persisted  # ansible.posix.sysctl found the lines in place and left the file alone
    assert {key: live(key) for key in mine} == mine  # this machine's namespace never saw the writes
