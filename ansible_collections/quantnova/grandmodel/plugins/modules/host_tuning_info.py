# -*- coding: utf-8 -*-
# Copyright: (c) 2025, GrandModel Ops
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: host_tuning_info
short_description: Compare a low-latency tuning profile with the running host, read-only
version_added: 0.1.0
description:
  - Reads the live kernel and systemd state of the host and reports, for every setting of a tuning profile, the
    desired value, the target, the live value and a status, so a role can apply what the host supports and report
    the rest.
  - Statuses are V(applied) (the live value satisfies the target), V(change) (it differs and this host can be
    changed), V(pending_reboot) (configured for the next boot) and V(skipped) (not applicable here; C(reason) says
    why, for example a host-global kernel setting inside a container, a read-only C(/proc/sys), a key this kernel
    lacks or a VM without cpufreq).
  - Sysctls in O(sysctls) must equal their value. Sysctls in O(sysctls_min) are floors (the kubespray
    C(additional_sysctl_min) semantics) whose target is the component-wise maximum of the floor and the live value,
    so applying the target never lowers a value.
  - With O(stored_report) it is a drift check as well. RV(drift) lists every setting the stored report had as
    applied whose live value no longer satisfies its target, every setting missing from the stored report, and
    every sysctl whose value in O(sysctl_file) differs from the profile.
  - The module never changes anything.
author:
  - GrandModel Ops (@quantnova)
attributes:
  check_mode:
    support: full
    description: The module only reads; it runs the same in check mode.
  diff_mode:
    support: none
    description: Nothing changes, so there is nothing to compare.
  platform:
    support: full
    platforms: posix
    description: A Linux host; the limits and irqbalance entries ask systemd (C(systemctl)) where it runs.
options:
  sysctls:
    description:
      - Sysctls that must equal a value, as name and value (for example C(vm.swappiness=10)).
      - Values of several numbers or words are separated by spaces, as C(/proc/sys) shows them.
    type: dict
    default: {}
  sysctls_min:
    description:
      - Floor sysctls, as name and a number (or numbers separated by spaces), raised when below, never lowered.
      - Multi-value keys such as C(net.ipv4.tcp_rmem) compare component by component.
      - A key may not be in both O(sysctls) and O(sysctls_min).
    type: dict
    default: {}
  sysctl_file:
    description:
      - The sysctl.d file that persists the profile for the next boot.
      - Named in the reasons of skipped sysctls, and compared with the profile when O(stored_report) is set.
    type: path
    default: /etc/sysctl.d/90-grandmodel-tuning.conf
  netns_prefixes:
    description:
      - Sysctl name prefixes the kernel keeps per network namespace, the only sysctls a container may write.
    type: list
    elements: str
    default: [net.ipv4., net.ipv6., net.core.somaxconn, net.netfilter., net.unix.]
  cpu_governor:
    description: The CPU frequency governor wanted on every CPU (empty leaves it out of the report).
    type: str
    default: ""
  cstate_latency_us:
    description:
      - The longest exit latency, in microseconds, of a C-state that may stay enabled (V(-1) leaves C-states out).
    type: int
    default: -1
  thp_enabled:
    description: The transparent hugepage mode wanted, for example V(never) (empty leaves it out).
    type: str
    default: ""
  thp_defrag:
    description: The transparent hugepage defrag policy wanted (empty leaves it out).
    type: str
    default: ""
  limits:
    description:
      - Default limits of systemd's services, as C(nofile) and C(memlock) with a number or V(unlimited).
      - Inside a container the hard limit of PID 1 caps what systemd can grant.
    type: dict
    default: {}
  kernel_cmdline:
    description: Arguments the kernel command line must carry (they take effect at the next boot).
    type: list
    elements: str
    default: []
  irqbalance:
    description: Whether irqbalance should run (V(enabled)), be stopped (V(disabled)) or be left out (V(unmanaged)).
    type: str
    choices: [enabled, disabled, unmanaged]
    default: unmanaged
  container:
    description:
      - Treat the host as a container, whose kernel belongs to its host, even if no container marker is found.
      - With V(false) the module looks for C(/run/.containerenv), C(/.dockerenv) and asks C(systemd-detect-virt).
    type: bool
    default: false
  after_apply:
    description:
      - Set when the settings to V(change) have just been written. A setting still to change then means the kernel
        kept its value; it is reported as V(skipped) with the value kept, never as applied.
    type: bool
    default: false
  stored_report:
    description:
      - The JSON report of an earlier run (the RV(settings) of this module, saved by the role).
      - When set, the module also compares the host with that report and with O(sysctl_file) and returns RV(drift).
    type: path
notes:
  - Read-only by design; the P(quantnova.grandmodel.host_tuning#role) role applies the V(change) entries
    (sysctls through M(ansible.posix.sysctl), the rest through its boot unit) and persists the profile.
seealso:
  - module: ansible.posix.sysctl
"""

EXAMPLES = r"""
- name: Evaluate the live host against the tuning profile
  quantnova.grandmodel.host_tuning_info:
    sysctls:
      vm.swappiness: 10
      net.ipv4.tcp_fastopen: 3
    sysctls_min:
      net.core.somaxconn: 4096
      net.ipv4.tcp_rmem: 4096 87380 16777216
    cpu_governor: performance
    cstate_latency_us: 2
    thp_enabled: never
    thp_defrag: never
    limits:
      nofile: 1048576
      memlock: unlimited
    irqbalance: enabled
  register: __host_tuning_evaluation

- name: Fail listing every difference from the last tuning run
  quantnova.grandmodel.host_tuning_info:
    sysctls:
      vm.swappiness: 10
    stored_report: /var/lib/grandmodel/host_tuning_report.json
  register: __host_tuning_check
  failed_when: __host_tuning_check.drift | length > 0
"""

RETURN = r"""
container:
  description: Whether the host was treated as a container (host-global kernel settings are then never changed).
  returned: always
  type: bool
  sample: true
counts:
  description: How many settings have each status.
  returned: always
  type: dict
  sample: {applied: 5, change: 0, pending_reboot: 0, skipped: 17}
settings:
  description: One entry per setting of the profile, sysctls first (sorted by name).
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: The sysctl name, or C(cpu governor), C(transparent hugepages), C(limit nofile), C(kernel cmdline)...
      type: str
    kind:
      description: V(sysctl), V(sysfs), V(limit), V(boot) or V(service).
      type: str
    desired:
      description: The value the profile asks for.
      type: str
    target:
      description: The value to apply; for a floor, the higher of the floor and the live value per component.
      type: str
    mode:
      description: V(exact) or V(floor) for sysctls; V(exact) otherwise.
      type: str
    actual:
      description: The live value, or V(absent) where the host has no such setting.
      type: str
    status:
      description: V(applied), V(change), V(pending_reboot) or V(skipped).
      type: str
    reason:
      description: Why a setting is skipped or pending; empty otherwise.
      type: str
  sample:
    - {name: net.core.somaxconn, kind: sysctl, desired: "4096", target: "8192", mode: floor, actual: "8192",
       status: applied, reason: ""}
    - {name: vm.swappiness, kind: sysctl, desired: "10", target: "10", mode: exact, actual: "60", status: skipped,
       reason: "host-global kernel setting: a container shares its host's kernel; persisted in
       /etc/sysctl.d/90-grandmodel-tuning.conf for the next boot"}
drift:
  description: Every difference from O(stored_report) and O(sysctl_file), one sentence each; empty when none.
  returned: when O(stored_report) is set
  type: list
  elements: str
  sample: ["net.core.somaxconn: live 1024, want at least 4096",
           "vm.swappiness: /etc/sysctl.d/90-grandmodel-tuning.conf has 60, want 5"]
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.quantnova.grandmodel.plugins.module_utils.tuning import (
    IRQBALANCE_POLICIES,
    NETNS_PREFIXES,
    Host,
    TuningError,
    build_profile,
    check_drift,
    evaluate,
)


def argument_spec():
    return dict(
        sysctls=dict(type="dict", default={}),
        sysctls_min=dict(type="dict", default={}),
        sysctl_file=dict(type="path", default="/etc/sysctl.d/90-grandmodel-tuning.conf"),
        netns_prefixes=dict(type="list", elements="str", default=list(NETNS_PREFIXES)),
        cpu_governor=dict(type="str", default=""),
        cstate_latency_us=dict(type="int", default=-1),
        thp_enabled=dict(type="str", default=""),
        thp_defrag=dict(type="str", default=""),
        limits=dict(type="dict", default={}),
        kernel_cmdline=dict(type="list", elements="str", default=[]),
        irqbalance=dict(type="str", choices=list(IRQBALANCE_POLICIES), default="unmanaged"),
        container=dict(type="bool", default=False),
        after_apply=dict(type="bool", default=False),
        stored_report=dict(type="path"),
    )


def main():
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True)
    params = module.params
    host = Host("/", run_command=lambda argv: module.run_command(argv, check_rc=False),
                get_bin_path=module.get_bin_path)
    try:
        profile = build_profile(
            sysctls=params["sysctls"], sysctls_min=params["sysctls_min"], sysctl_file=params["sysctl_file"],
            netns_prefixes=params["netns_prefixes"], cpu_governor=params["cpu_governor"],
            cstate_latency_us=params["cstate_latency_us"], thp_enabled=params["thp_enabled"],
            thp_defrag=params["thp_defrag"], limits=params["limits"], kernel_cmdline=params["kernel_cmdline"],
            irqbalance=params["irqbalance"], container=params["container"])
    except TuningError as exc:
        module.fail_json(msg=str(exc))
    if params["stored_report"]:
        result = check_drift(host, profile, params["stored_report"])
        module.exit_json(changed=False, drift=result["drift"], **result["report"])
    module.exit_json(changed=False, **evaluate(host, profile, final=params["after_apply"]))


if __name__ == "__main__":
    main()
