# -*- coding: utf-8 -*-
# Copyright: (c) 2025, GrandModel Ops
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The host tuning evaluator: compare a tuning profile with the running kernel, read-only.

`evaluate()` returns one entry per setting with the desired value, the target (the desired value,
or under floor semantics the live value where that is higher), the live value and a status:

  applied         the live value satisfies the target
  change          the live value differs and this host can be changed (the role applies it)
  pending_reboot  configured for the next boot (kernel command line, systemd default limits)
  skipped         not applicable here; "reason" says why

`check_drift()` also compares with the report stored by the last run and with the persisted
sysctl.d file, and lists every difference.

Everything is read through a `Host`: a root directory (``/`` on a real host, a temporary tree in
tests) and a command runner (``AnsibleModule.run_command`` in the module). Nothing is written.
"""

from __future__ import annotations

import glob
import json
import operator
import os
import re

SYS_CPU = "/sys/devices/system/cpu"
THP = "/sys/kernel/mm/transparent_hugepage"
PID1_LIMITS = "/proc/1/limits"
UPDATE_GRUB = "/usr/sbin/update-grub"
STATUSES = ("applied", "change", "pending_reboot", "skipped")
MODES = ("exact", "floor")
IRQBALANCE_POLICIES = ("enabled", "disabled", "unmanaged")
# Sysctls the kernel keeps per network namespace: the only ones a container may ever write.
NETNS_PREFIXES = ("net.ipv4.", "net.ipv6.", "net.core.somaxconn", "net.netfilter.", "net.unix.")
LIMITS = (("nofile", "DefaultLimitNOFILE", "Max open files"),
          ("memlock", "DefaultLimitMEMLOCK", "Max locked memory"))
UNLIMITED = ("infinity", "unlimited")

_SYSCTL_NAME_RE = re.compile(r"^[a-z0-9_-]+(\.[A-Za-z0-9_-]+)+$")
_SYSCTL_VALUE_RE = re.compile(r"^[A-Za-z0-9_. -]+$")
_NUMBER_RE = re.compile(r"^-?[0-9]+$")


class TuningError(Exception):
    """What was attempted, on what, and why it failed."""


class Host:
    """Where the evaluator looks: files under `root` and commands through `run_command`.

    `run_command(argv)` returns ``(rc, stdout, stderr)``; `get_bin_path(name)` returns the path of an
    executable or None. Without them no command is available, as on a host without systemd.
    """

    def __init__(self, root="/", run_command=None, get_bin_path=None):
        self.prefix = "" if os.path.abspath(root) == "/" else os.path.abspath(root)
        self._run_command = run_command
        self._get_bin_path = get_bin_path

    def path(self, absolute):
        return self.prefix + absolute

    def read(self, absolute):
        """The file's content with whitespace runs folded to one space, or None if it cannot be read."""
        try:
            with open(self.path(absolute), encoding="ascii", errors="replace") as handle:
                return " ".join(handle.read().split())
        except OSError:
            return None

    def read_lines(self, absolute):
        try:
            with open(self.path(absolute), encoding="utf-8", errors="replace") as handle:
                return handle.read().splitlines()
        except OSError:
            return None

    def exists(self, absolute):
        return os.path.exists(self.path(absolute))

    def writable(self, absolute):
        return os.access(self.path(absolute), os.W_OK)

    def glob(self, pattern):
        return sorted(found[len(self.prefix):] for found in glob.glob(self.path(pattern)))

    def run(self, name, *args):
        """(rc, stdout) of a command, or None when the command does not exist here."""
        if self._run_command is None or self._get_bin_path is None:
            return None
        binary = self._get_bin_path(name)
        if not binary:
            return None
        rc, out, _err = self._run_command([binary, *args])
        return rc, out or ""


# -- the profile ----------------------------------------------------------------------------------

def _plain(value):
    return " ".join(str(value).split())


def numbers(value):
    """The integers of a (multi-value) setting, or None if it is not all integers."""
    parts = str(value).split()
    if parts and all(_NUMBER_RE.match(part) for part in parts):
        return [int(part) for part in parts]
    return None


def _limit_text(name, value):
    text = _plain(value).lower() if value is not None else ""
    if text == "" or text in UNLIMITED or (text.isdigit() and int(text) > 0):
        return text
    raise TuningError("cannot evaluate the %s limit %r: it must be a positive number or unlimited" % (name, value))


def build_profile(sysctls=None, sysctls_min=None, sysctl_file="/etc/sysctl.d/90-grandmodel-tuning.conf",
                  netns_prefixes=NETNS_PREFIXES, cpu_governor="", cstate_latency_us=-1, thp_enabled="",
                  thp_defrag="", limits=None, kernel_cmdline=(), irqbalance="unmanaged", container=False):
    """Check the inputs and return the profile the evaluator reads; TuningError names what is wrong."""
    sysctls, sysctls_min, limits = sysctls or {}, sysctls_min or {}, limits or {}
    specs = {}
    for mode, table in (("exact", sysctls), ("floor", sysctls_min)):
        for key, given in table.items():
            value = int(given) if isinstance(given, bool) else given  # YAML true/false: sysctls say 1 and 0
            if not _SYSCTL_NAME_RE.match(str(key)):
                raise TuningError("cannot evaluate sysctl %r: a sysctl is named like net.core.somaxconn" % (key,))
            if value is None or not _SYSCTL_VALUE_RE.match(str(value)):
                raise TuningError("cannot evaluate sysctl %s=%r: the value must be numbers or words separated by "
                                  "spaces" % (key, value))
            if mode == "floor" and numbers(value) is None:
                raise TuningError("cannot evaluate the floor sysctl %s=%r: a floor is raised, never lowered, so it "
                                  "needs a number (or numbers separated by spaces)" % (key, value))
            if key in specs:
                raise TuningError("cannot evaluate sysctl %s: it is both set exactly and a floor; give it in one "
                                  "of sysctls or sysctls_min" % key)
            specs[key] = {"value": _plain(value), "mode": mode}
    unknown = sorted(set(limits) - {name for name, _prop, _label in LIMITS})
    if unknown:
        raise TuningError("cannot evaluate limits %s: only nofile and memlock are known" % ", ".join(unknown))
    if irqbalance not in IRQBALANCE_POLICIES:
        raise TuningError("cannot evaluate irqbalance policy %r: use one of %s"
                          % (irqbalance, ", ".join(IRQBALANCE_POLICIES)))
    try:
        cstate = int(cstate_latency_us)
    except (TypeError, ValueError):
        raise TuningError("cannot evaluate the C-state latency limit %r: it must be a whole number of "
                          "microseconds (-1 leaves C-states alone)" % (cstate_latency_us,)) from None
    return {
        "sysctls": specs,
        "sysctl_file": sysctl_file,
        "netns_prefixes": list(netns_prefixes),
        "cpu_governor": cpu_governor or "",
        "cstate_latency_us": cstate,
        "thp_enabled": thp_enabled or "",
        "thp_defrag": thp_defrag or "",
        "limits": {name: _limit_text(name, value) for name, value in limits.items()},
        "kernel_cmdline": [str(arg) for arg in kernel_cmdline],
        "irqbalance": irqbalance,
        "container": bool(container),
    }


# -- comparisons ----------------------------------------------------------------------------------

def floor_target(desired, actual):
    """Raise, never lower: the component-wise maximum of the live and the desired value."""
    want, have = numbers(desired), numbers(actual)
    if want is None or have is None or len(want) != len(have):
        return desired
    return " ".join(str(value) for value in map(max, want, have))


def satisfied(target, actual, mode):
    """Whether a live value meets the target: at least it (floor), at most it (ceiling), or equal."""
    if actual is None:
        return False
    want, have = numbers(target), numbers(actual)
    comparable = want is not None and have is not None and len(want) == len(have)
    if mode == "floor" and comparable:
        return all(map(operator.ge, have, want))
    if mode == "ceiling" and comparable:
        return all(map(operator.le, have, want))
    return _plain(target) == actual


def entry(name, kind, desired, target, actual, status, reason="", mode="exact"):
    return {"name": name, "kind": kind, "desired": str(desired), "target": str(target), "mode": mode,
            "actual": "absent" if actual is None else str(actual), "status": status, "reason": reason}


# -- what the host says ---------------------------------------------------------------------------

def in_container(host, hint):
    if hint or host.exists("/run/.containerenv") or host.exists("/.dockerenv"):
        return True
    answer = host.run("systemd-detect-virt", "--container", "--quiet")
    return answer is not None and answer[0] == 0


def bracketed(host, path):
    match = re.search(r"\[([^\]]+)\]", host.read(path) or "")
    return match.group(1) if match else None


def governor(host):
    found = sorted({host.read(path) for path in host.glob(SYS_CPU + "/cpu[0-9]*/cpufreq/scaling_governor")}
                   - {None})
    return ",".join(found) if found else None


def deepest_enabled_cstate_latency(host):
    latencies = []
    for state in host.glob(SYS_CPU + "/cpu[0-9]*/cpuidle/state[0-9]*"):
        if host.read(state + "/disable") == "0":
            latency = host.read(state + "/latency")
            if latency is not None and _NUMBER_RE.match(latency):
                latencies.append(int(latency))
    return str(max(latencies)) if latencies else None


def systemd_value(host, prop):
    answer = host.run("systemctl", "show", "--value", "-p", prop)
    return (answer[1].strip() or None) if answer else None


def hard_limit_of_pid1(host, label):
    for line in host.read_lines(PID1_LIMITS) or []:
        if line.startswith(label):
            fields = line[len(label):].split()
            return fields[1] if len(fields) > 1 else None
    return None


def limit_value(text):
    if text in UNLIMITED:
        return float("inf")
    return int(text) if text.isdigit() else None


def _at_least(have, want):
    have, want = limit_value(have), limit_value(want)
    return have is not None and want is not None and have >= want


def _below(have, want):
    have, want = limit_value(have), limit_value(want)
    return have is not None and want is not None and have < want


# -- the entries ----------------------------------------------------------------------------------

def sysctl_entries(host, profile, container):
    persisted = "persisted in %s for the next boot" % profile["sysctl_file"]
    for key, spec in sorted(profile["sysctls"].items()):
        desired, mode = _plain(spec["value"]), spec["mode"]
        path = "/proc/sys/" + key.replace(".", "/")
        actual = host.read(path)
        if actual is None:
            reason = "not supported by this kernel (no %s)" % path
            if container and key.startswith("net."):
                reason = ("not in this container's network namespace: the kernel keeps it only "
                          "in the host's initial namespace; " + persisted)
            yield entry(key, "sysctl", desired, desired, None, "skipped", reason, mode)
            continue
        target = floor_target(desired, actual) if mode == "floor" else desired
        namespaced = any(key.startswith(prefix) for prefix in profile["netns_prefixes"])
        if satisfied(target, actual, mode):
            yield entry(key, "sysctl", desired, target, actual, "applied", "", mode)
        elif container and not namespaced:
            yield entry(key, "sysctl", desired, target, actual, "skipped",
                        "host-global kernel setting: a container shares its host's kernel; " + persisted, mode)
        elif not host.writable(path):
            yield entry(key, "sysctl", desired, target, actual, "skipped",
                        "/proc/sys is read-only here (container runtime); " + persisted, mode)
        else:
            yield entry(key, "sysctl", desired, target, actual, "change", "", mode)


def sysfs_entry(name, desired, actual, container, missing_reason, mode="exact"):
    if not desired and desired != 0:
        return None
    if actual is None:
        return entry(name, "sysfs", desired, desired, None, "skipped", missing_reason)
    if satisfied(desired, actual, mode):
        return entry(name, "sysfs", desired, desired, actual, "applied")
    if container:
        return entry(name, "sysfs", desired, desired, actual, "skipped",
                     "host-global setting: a container shares its host's kernel; the boot unit "
                     "grandmodel-host-tuning.service applies it on a real host")
    return entry(name, "sysfs", desired, desired, actual, "change")


def limit_entries(host, profile, container):
    for name, prop, label in LIMITS:
        desired = profile["limits"].get(name, "")
        if not desired:
            continue
        actual = systemd_value(host, prop)
        cap = hard_limit_of_pid1(host, label)
        effective = actual
        if actual and cap and _below(cap, actual):
            effective = cap
        if effective and _at_least(effective, desired):
            yield entry("limit " + name, "limit", desired, desired, effective, "applied")
        elif container and cap and _below(cap, desired):
            yield entry("limit " + name, "limit", desired, desired, effective, "skipped",
                        "capped by the container runtime (hard limit %s of PID 1); limits.d and "
                        "system.conf.d are written for a real host" % cap)
        else:
            yield entry("limit " + name, "limit", desired, desired, effective, "pending_reboot",
                        "systemd applies new default limits after daemon-reexec or reboot")


def cmdline_entry(host, profile, container):
    wanted = profile["kernel_cmdline"]
    if not wanted:
        return None
    live = (host.read("/proc/cmdline") or "").split()
    missing = [arg for arg in wanted if arg not in live]
    desired = " ".join(wanted)
    if not missing:
        return entry("kernel cmdline", "boot", desired, desired, desired, "applied")
    if container:
        return entry("kernel cmdline", "boot", desired, desired, "not present", "skipped",
                     "a container boots no kernel; the GRUB drop-in is written for a real host")
    if not host.exists(UPDATE_GRUB):
        return entry("kernel cmdline", "boot", desired, desired, "not present", "skipped",
                     "no GRUB on this host (update-grub absent); drop-in written, add the "
                     "arguments to the boot loader in use")
    return entry("kernel cmdline", "boot", desired, desired, "missing " + " ".join(missing),
                 "pending_reboot", "in the GRUB configuration; takes effect at the next reboot")


def irqbalance_entry(host, profile, container):
    policy = profile["irqbalance"]
    if policy == "unmanaged":
        return None
    desired = "active" if policy == "enabled" else "inactive"
    answer = host.run("systemctl", "is-active", "irqbalance")
    actual = (answer[1].strip() if answer else "") or "unknown"
    if actual == desired:
        return entry("irqbalance", "service", desired, desired, actual, "applied")
    if container:
        return entry("irqbalance", "service", desired, desired, actual, "skipped",
                     "irqbalance does not run in containers (its unit has ConditionVirtualization=!container)")
    return entry("irqbalance", "service", desired, desired, actual, "change")


def evaluate(host, profile, final=False):
    """The report of every setting in the profile against the live host (see the module docstring).

    With `final` (after the role applied what it could), a setting still to `change` means the kernel
    kept its value: it is reported as skipped with the value kept, never as applied.
    """
    container = in_container(host, profile["container"])
    entries = list(sysctl_entries(host, profile, container))
    cpufreq = host.glob(SYS_CPU + "/cpu[0-9]*/cpufreq/scaling_governor")
    entries.append(sysfs_entry("cpu governor", profile["cpu_governor"], governor(host), container,
                               "no cpufreq on this host (%s): a VM or a CPU without a frequency "
                               "driver" % ("absent" if not cpufreq else "unreadable")))
    if profile["cstate_latency_us"] >= 0:
        entries.append(sysfs_entry("c-state exit latency limit (us)", profile["cstate_latency_us"],
                                   deepest_enabled_cstate_latency(host), container,
                                   "no cpuidle states are exposed on this host", mode="ceiling"))
    entries.append(sysfs_entry("transparent hugepages", profile["thp_enabled"], bracketed(host, THP + "/enabled"),
                               container, "no transparent hugepage support (%s absent)" % THP))
    entries.append(sysfs_entry("transparent hugepage defrag", profile["thp_defrag"],
                               bracketed(host, THP + "/defrag"), container,
                               "no transparent hugepage support (%s absent)" % THP))
    entries.extend(limit_entries(host, profile, container))
    entries.append(cmdline_entry(host, profile, container))
    entries.append(irqbalance_entry(host, profile, container))
    entries = [item for item in entries if item]
    if final:
        for item in entries:
            if item["status"] == "change":
                item["status"] = "skipped"
                item["reason"] = "written, but the kernel kept %s" % item["actual"]
    counts = {status: sum(item["status"] == status for item in entries) for status in STATUSES}
    return {"container": container, "counts": counts, "settings": entries}


# -- drift ----------------------------------------------------------------------------------------

def persisted_sysctls(host, path):
    """name -> value of a sysctl.d file (a leading "-", systemd's ignore-if-absent mark, is dropped)."""
    values = {}
    for raw in host.read_lines(path) or []:
        line = raw.split("#", 1)[0].strip()
        if "=" in line:
            key, value = line.split("=", 1)
            values[key.strip().lstrip("-")] = _plain(value)
    return values


def _stored_settings(host, report_path):
    try:
        with open(host.path(report_path), encoding="utf-8") as handle:
            return {item["name"]: item for item in json.load(handle)["settings"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TuningError("no usable tuning report at %s (%s): run the host_tuning role first"
                          % (report_path, exc)) from None


def check_drift(host, profile, report_path):
    """Evaluate the host and list every difference from the stored report and the persisted file."""
    current = evaluate(host, profile)
    try:
        stored = _stored_settings(host, report_path)
    except TuningError as exc:
        return {"drift": [str(exc)], "report": current}
    drift = []
    for item in current["settings"]:
        before = stored.get(item["name"])
        if before and before.get("status") == "applied" and item["status"] != "applied":
            drift.append("%s: live %s, want %s%s" % (item["name"], item["actual"],
                                                     "at least " if item["mode"] == "floor" else "", item["target"]))
        elif before is None:
            drift.append("%s: not in the stored report (profile changed since the last run)" % item["name"])
    persisted = persisted_sysctls(host, profile["sysctl_file"])
    for key, spec in sorted(profile["sysctls"].items()):
        value, desired = persisted.get(key), _plain(spec["value"])
        if value is None or not satisfied(desired, value, spec["mode"]):
            drift.append("%s: %s has %s, want %s%s" % (
                key, profile["sysctl_file"], value if value is not None else "nothing",
                "at least " if spec["mode"] == "floor" else "", desired))
    return {"drift": drift, "report": current}
