"""The firewall role's ruleset rendered for an inventory with every group (no host is touched).

molecule/common proves the rules on a live host, but its target holds db and lb only and no host of
backup_repo or monitoring exists there. Here the role's own defaults, vars and template render
grandmodel.nft for each host of a fake inventory (ansible-playbook on this machine, connection local),
and each service's accept line is read back: who may reach which port, in both directions.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from .ansible_batch import run_json
from .conftest import COLLECTION, VENV_BIN

ROLE = COLLECTION / "roles" / "firewall"
ADDRESSES = {"db1": "10.0.1.10", "repo1": "10.0.2.10", "mon1": "10.0.3.10", "mon2": "10.0.3.11",
             "app1": "10.0.4.10", "lb1": "10.0.5.10", "cache1": "10.0.6.10",
             "cp1": "10.0.7.10", "cp2": "10.0.7.11", "worker1": "10.0.8.10",
             "ha1": "10.0.9.10", "ha2": "10.0.9.11", "ha3": "10.0.9.12"}
# playbooks/runbooks/vars/runbooks.yml (__runbook_expected_ports: the ports each group's hosts listen on,
# read by the security check). The runbooks are moving into the collection: take it wherever it is.
RUNBOOK_VARS = next(path for path in (COLLECTION / "playbooks" / "runbooks" / "vars" / "runbooks.yml",
                                      COLLECTION.parents[2] / "playbooks" / "runbooks" / "vars" / "runbooks.yml")
                    if path.is_file())
INVENTORY = f"""
all:
  vars:
    ansible_connection: local
    ansible_python_interpreter: "{{{{ ansible_playbook_python }}}}"
  children:
    db: {{hosts: {{db1: {{firewall_host_addresses: [{ADDRESSES["db1"]}]}}}}}}
    backup_repo: {{hosts: {{repo1: {{firewall_host_addresses: [{ADDRESSES["repo1"]}]}}}}}}
    monitoring:
      hosts:
        mon1: {{firewall_host_addresses: [{ADDRESSES["mon1"]}]}}
        mon2: {{firewall_host_addresses: [{ADDRESSES["mon2"]}]}}
    app: {{hosts: {{app1: {{firewall_host_addresses: [{ADDRESSES["app1"]}]}}}}}}
    lb: {{hosts: {{lb1: {{firewall_host_addresses: [{ADDRESSES["lb1"]}]}}}}}}
    cache: {{hosts: {{cache1: {{firewall_host_addresses: [{ADDRESSES["cache1"]}]}}}}}}
    k8s_control_plane:
      hosts:
        cp1: {{firewall_host_addresses: [{ADDRESSES["cp1"]}]}}
        cp2: {{firewall_host_addresses: [{ADDRESSES["cp2"]}]}}
    k8s_workers: {{hosts: {{worker1: {{firewall_host_addresses: [{ADDRESSES["worker1"]}]}}}}}}
    db_ha:
      hosts:
        ha1: {{firewall_host_addresses: [{ADDRESSES["ha1"]}]}}
        ha2: {{firewall_host_addresses: [{ADDRESSES["ha2"]}]}}
        ha3: {{firewall_host_addresses: [{ADDRESSES["ha3"]}]}}
    cache_ha: {{children: {{db_ha: {{}}}}}}
"""
PLAY = f"""
- name: Render the firewall ruleset of every host
  hosts: all
  gather_facts: false
  vars_files:
    - {ROLE}/../_common/defaults/main.yml
    - {ROLE}/defaults/main.yml
    - {ROLE}/vars/main.yml
  vars:
    ansible_managed: rendered by tests/test_firewall_rules.py
  tasks:
    - name: Check the inputs as the role does first (the default services, ranges included, must pass)
      ansible.builtin.import_tasks: {ROLE}/tasks/preflight.yml

    - name: Write the ruleset the role would load on this host
      ansible.builtin.copy:
        content: "{{{{ lookup('ansible.builtin.template', '{ROLE}/templates/grandmodel.nft.j2') }}}}"
        dest: "{{{{ out_dir }}}}/{{{{ inventory_hostname }}}}.nft"
        mode: "0644"

- name: Render the security check's expected-ports map (the ports each group's hosts listen on)
  hosts: localhost
  gather_facts: false
  vars_files:
    - {ROLE}/../_common/defaults/main.yml
    - {RUNBOOK_VARS}
  tasks:
    - name: Write the map as JSON
      ansible.builtin.copy:
        content: "{{{{ __runbook_expected_ports | to_json }}}}"
        dest: "{{{{ out_dir }}}}/expected_ports.json"
        mode: "0644"
"""


# The same plays, the rendered texts kept as facts and read from the JSON callback: a copy task is a module
# run per host (seconds each), a fact is not. The refusal test below keeps the copy (nothing written).
PLAY_FACTS = (PLAY.replace("""    - name: Write the ruleset the role would load on this host
      ansible.builtin.copy:
        content: "{{ lookup('ansible.builtin.template', '""" + f"{ROLE}" + """/templates/grandmodel.nft.j2') }}"
        dest: "{{ out_dir }}/{{ inventory_hostname }}.nft"
        mode: "0644"
""", """    - name: Keep the ruleset the role would load on this host
      ansible.builtin.set_fact:
        rendered_ruleset: "{{ lookup('ansible.builtin.template', '""" + f"{ROLE}" + """/templates/grandmodel.nft.j2')
          }}"
""").replace("""    - name: Write the map as JSON
      ansible.builtin.copy:
        content: "{{ __runbook_expected_ports | to_json }}"
        dest: "{{ out_dir }}/expected_ports.json"
        mode: "0644"
""", """    - name: Keep the map as JSON
      ansible.builtin.set_fact:
        rendered_expected_ports: "{{ __runbook_expected_ports | to_json }}"
"""))
assert PLAY_FACTS.count("set_fact") == 2


@pytest.fixture(scope="module")
def rulesets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    work = tmp_path_factory.mktemp("firewall")
    (work / "hosts.yml").write_text(INVENTORY)
    (work / "render.yml").write_text(PLAY_FACTS)
    result = run_json(
        ["-i", str(work / "hosts.yml"), str(work / "render.yml"), "-e", f"out_dir={work}",
         # extra vars: the role's defaults are loaded as play vars_files, which beat the inventory
         "-e", '{"firewall_admin_networks": ["192.0.2.0/24"], "firewall_client_networks": ["198.51.100.0/24"],'
               ' "firewall_probe_address": "127.0.0.1"}'])
    assert result.proc.returncode == 0, result.proc.stdout[-5000:] + result.proc.stderr
    rendered = {host: result.facts(host)["rendered_ruleset"] for host in ADDRESSES}
    assert all(isinstance(text, str) and text for text in rendered.values()), rendered
    expected_ports = result.facts("localhost")["rendered_expected_ports"]
    assert isinstance(expected_ports, str), expected_ports
    return rendered | {"expected_ports": expected_ports}


def covers(ports: str, port: int) -> bool:
    """Whether an nft set text such as "80, 443" or "30000-32767" holds `port`."""
    for item in (p.strip() for p in ports.split(",")):
        first, _, last = item.partition("-")
        if int(first) <= port <= int(last or first):
            return True
    return False


def chain(ruleset: str, name: str) -> str:
    """The text of one chain of the table ('' when the ruleset has no such chain)."""
    match = re.search(rf"\tchain {name} {{\n(.*?)\n\t}}", ruleset, re.S)
    return match.group(1) if match else ""


def sources(ruleset: str, port: int, proto: str = "tcp", chain_name: str = "input") -> set[str]:
    """The IPv4 sources of every accept line of a chain (input by default) that opens `port`."""
    found: set[str] = set()
    text = chain(ruleset, chain_name)
    for saddr, ports in re.findall(rf"ip saddr {{ ([^}}]+) }} {proto} dport {{ ([^}}]+) }} accept", text):
        if covers(ports, port):
            found |= {s.strip() for s in saddr.split(",")}
    return found


def test_pgbackrest_tls_port_is_open_between_database_and_repository_only(rulesets):
    # The database host reaches the repository (repo1-host) and the repository reaches the database
    # host (pg1-host): each side admits the other, nobody else, and no other host listens for it.
    # The Patroni members (db_ha) are database hosts of the same repository (data_ha.yml), never each other's.
    assert sources(rulesets["repo1"], 8432) == {ADDRESSES[h] for h in ("db1", "ha1", "ha2", "ha3")}
    for host in ("db1", "ha1", "ha2", "ha3"):
        assert sources(rulesets[host], 8432) == {ADDRESSES["repo1"]}, host
        assert "# pgbackrest_database: tcp 8432 from backup_repo" in rulesets[host]
    for host in ("mon1", "app1", "lb1", "cache1"):
        assert sources(rulesets[host], 8432) == set(), host
    assert "# pgbackrest_repository: tcp 8432 from db, db_ha" in rulesets["repo1"]


def test_patroni_members_reach_each_other_and_clients_reach_only_the_endpoint(rulesets):
    # etcd (client, peers), PostgreSQL (replication, HAProxy to the leader) and Patroni's REST API between the
    # db_ha members only; the application and monitoring reach HAProxy's read-write and read-only ports.
    members = {ADDRESSES["ha1"], ADDRESSES["ha2"], ADDRESSES["ha3"]}
    clients = {ADDRESSES["app1"], ADDRESSES["mon1"], ADDRESSES["mon2"]}
    for host in ("ha1", "ha2", "ha3"):
        for port in (2379, 2380, 5432, 8008):
            assert sources(rulesets[host], port) == members, (host, port)
        for port in (5000, 5001):
            assert sources(rulesets[host], port) == clients, (host, port)
        assert "# etcd: tcp 2379, 2380 from db_ha" in rulesets[host]
    for host in ("db1", "repo1", "app1", "lb1", "cache1", "mon1"):
        for port in (2379, 2380, 8008, 5000, 5001):
            assert not sources(rulesets[host], port), (host, port)


def test_monitoring_hosts_reach_each_others_prometheus_alertmanager_and_gossip(rulesets):
    monitoring = {ADDRESSES["mon1"], ADDRESSES["mon2"]}
    for host in ("mon1", "mon2"):
        assert sources(rulesets[host], 9090) == monitoring | {"192.0.2.0/24"}
        assert sources(rulesets[host], 9093) == monitoring | {"192.0.2.0/24"}
        assert sources(rulesets[host], 3000) == {"192.0.2.0/24"}  # Grafana: admins only
        assert sources(rulesets[host], 9094) == monitoring
        assert sources(rulesets[host], 9094, "udp") == monitoring
    for host in ("db1", "repo1", "app1", "lb1", "cache1"):
        assert not sources(rulesets[host], 9090) and not sources(rulesets[host], 9094), host


def test_the_rest_of_the_table_is_unchanged(rulesets):
    assert sources(rulesets["db1"], 5432) == {ADDRESSES["app1"], ADDRESSES["mon1"], ADDRESSES["mon2"]}
    assert sources(rulesets["cache1"], 6380) == {ADDRESSES["app1"]}
    assert sources(rulesets["lb1"], 443) == {"198.51.100.0/24"}
    assert sources(rulesets["app1"], 8001) == {ADDRESSES["lb1"], ADDRESSES["mon1"], ADDRESSES["mon2"]}
    assert sources(rulesets["repo1"], 9100) == {ADDRESSES["mon1"], ADDRESSES["mon2"]}
    assert sources(rulesets["repo1"], 22) == set()  # ssh has its own line
    assert "ip saddr { 192.0.2.0/24 } tcp dport 22 accept" in rulesets["repo1"]


def test_every_scrape_target_of_prometheus_is_open_to_the_monitoring_hosts(rulesets):
    """Read from the monitoring role, not the firewall's: each job's group and port (exporters, the service
    colours' /metrics) must admit every monitoring host, or the firewall would silence a target (found:
    the colours were open to the load balancers only, so the grandmodel job would have been down)."""
    import yaml

    monitoring = yaml.safe_load((COLLECTION / "roles" / "monitoring" / "defaults" / "main.yml").read_text())
    common = yaml.safe_load((COLLECTION / "roles" / "_common" / "defaults" / "main.yml").read_text())
    hosts_of = {"all": list(ADDRESSES), "db": ["db1"], "cache": ["cache1"], "lb": ["lb1"], "app": ["app1"],
                "db_ha": ["ha1", "ha2", "ha3"], "cache_ha": ["ha1", "ha2", "ha3"]}
    targets = [(group, monitoring["monitoring_exporter_ports"][job])
               for job, group in monitoring["monitoring_scrape_groups"].items() if job != "grandmodel"]
    targets += [(monitoring["monitoring_scrape_groups"]["grandmodel"], colour["port"])
                for colour in common["grandmodel_colors"].values()]
    # node, postgres, postgres_ha, patroni, redis, redis_ha, nginx and the two colours.
    assert len(targets) == 9, targets
    for group, port in targets:
        for host in hosts_of[group]:
            assert {ADDRESSES["mon1"], ADDRESSES["mon2"]} <= sources(rulesets[host], port), (group, host, port)


def test_every_listening_port_of_the_roles_has_a_rule():
    # Ports the roles' defaults listen on over the network; each must appear in firewall_services
    # (the SSH port has its own input). Local-only ports (the restore check's 5499) are left out.
    import yaml

    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    table = {int(p) for s in defaults["firewall_services"] if isinstance(s["ports"], list) for p in s["ports"]
             if "-" not in str(p)}
    roles = COLLECTION / "roles"
    listened = {
        "pgbackrest_tls_port": ("pgbackrest", 8432), "redis_tls_port": ("redis", 6380),
        "postgresql_port": ("postgresql", 5432), "monitoring_prometheus_port": ("monitoring", 9090),
        "monitoring_alertmanager_port": ("monitoring", 9093), "grafana_port": ("grafana", 3000),
        "exporters_node_port": ("exporters", 9100), "exporters_postgres_port": ("exporters", 9187),
        "exporters_redis_port": ("exporters", 9121), "exporters_nginx_port": ("exporters", 9113),
        "loadbalancer_http_port": ("loadbalancer", 80), "loadbalancer_https_port": ("loadbalancer", 443),
        "etcd_client_port": ("etcd", 2379), "etcd_peer_port": ("etcd", 2380),
        "patroni_restapi_port": ("patroni", 8008), "patroni_metrics_port": ("patroni", 9547),
        "pg_endpoint_rw_port": ("pg_endpoint", 5000),
        "pg_endpoint_ro_port": ("pg_endpoint", 5001),
    }
    for name, (role, port) in listened.items():
        role_defaults = yaml.safe_load((roles / role / "defaults" / "main.yml").read_text())
        assert role_defaults[name] == port, (role, name, role_defaults.get(name))
        assert port in table, f"{role}'s {name} ({port}) has no entry in firewall_services"
    assert Path(ROLE / "templates" / "grandmodel.nft.j2").is_file()


def test_kubernetes_ports_are_open_only_to_the_groups_that_use_them(rulesets):
    control_plane = {ADDRESSES["cp1"], ADDRESSES["cp2"]}
    nodes = control_plane | {ADDRESSES["worker1"]}
    admins, lb = "192.0.2.0/24", ADDRESSES["lb1"]
    for host in ("cp1", "cp2"):
        # API server: the nodes (kubelets, kube-proxy, the join) and the admins (kubectl, the controller).
        assert sources(rulesets[host], 6443) == nodes | {admins}
        # Stacked etcd: the API servers and the etcd peers, i.e. the control plane only.
        assert sources(rulesets[host], 2379) == control_plane
        assert sources(rulesets[host], 2380) == control_plane
    for host in ("cp1", "cp2", "worker1"):
        assert sources(rulesets[host], 10250) == control_plane  # kubelet: the API servers only
        assert sources(rulesets[host], 10256) == {lb}  # kube-proxy health: the load balancers' checks
        assert sources(rulesets[host], 8472, "udp") == nodes  # flannel VXLAN between the nodes
        # Controller-manager and scheduler bind to 127.0.0.1 (kubeadm's default): no rule on any host.
        assert sources(rulesets[host], 10257) == set() and sources(rulesets[host], 10259) == set()
    assert sources(rulesets["worker1"], 6443) == set() and sources(rulesets["worker1"], 2379) == set()
    for host in ("db1", "repo1", "mon1", "app1", "lb1", "cache1"):
        for port in (6443, 2379, 2380, 10250, 10256, 10257, 10259, 30000, 32767):
            assert sources(rulesets[host], port) == set(), (host, port)
        assert "chain prerouting" not in rulesets[host], host  # no NodePort guard where there are no nodes


def test_nodeports_are_open_to_the_load_balancers_only_before_and_after_the_nat(rulesets):
    lb = {ADDRESSES["lb1"]}
    for host in ("cp1", "worker1"):
        ruleset = rulesets[host]
        assert "ip saddr { 10.0.5.10 } tcp dport { 30000-32767 } accept" in chain(ruleset, "input")
        for port in (30000, 31000, 32767):
            assert sources(ruleset, port) == lb, (host, port)
            assert sources(ruleset, port, chain_name="prerouting") == lb, (host, port)
        for port in (29999, 32768):
            assert sources(ruleset, port) == set() and sources(ruleset, port, chain_name="prerouting") == set()
        prerouting = chain(ruleset, "prerouting")
        # Before kube-proxy's DNAT (priority dstnat = -100): a NodePort packet is judged while it is still
        # addressed to the node; anybody else's new connection to the range is dropped there.
        assert "type filter hook prerouting priority mangle; policy accept;" in prerouting
        assert prerouting.index("ct state established,related accept") < prerouting.index("accept\n\t\tfib")
        assert prerouting.rstrip().endswith("fib daddr type local tcp dport { 30000-32767 } drop")
        # The prerouting chain holds the NodePorts only: every other port is left to the input chain.
        assert "10250" not in prerouting and "6443" not in prerouting


def test_every_port_of_the_security_check_map_has_a_rule_on_its_group(rulesets):
    # playbooks/runbooks/vars/runbooks.yml __runbook_expected_ports: the ports each group's hosts listen
    # on. Each must be open on that group's hosts to somebody, except the Kubernetes ports bound to
    # 127.0.0.1 (10257 controller-manager, 10259 scheduler), which loopback reaches without a rule.
    groups = json.loads(rulesets["expected_ports"])  # the map as Ansible renders it with its defaults
    assert {"all", "db", "lb", "cache", "monitoring", "k8s_control_plane", "k8s_workers"} <= set(groups), groups
    assert groups["k8s_workers"] == [10250, 10256, "30000-32767"], groups
    host_of = {"db": "db1", "cache": "cache1", "backup_repo": "repo1", "lb": "lb1", "app": "app1",
               "monitoring": "mon1", "k8s_control_plane": "cp1", "k8s_workers": "worker1", "all": "repo1"}
    loopback_only = {10257, 10259}
    missing = []
    for group, ports in groups.items():
        if group not in host_of:
            # timeseries has no host in this inventory; its only port (5432) shares the db rule's entry.
            assert group == "timeseries", f"group {group} of the map has no host in the test inventory"
            continue
        for item in ports:
            first, _, last = str(item).partition("-")
            for port in {int(first), int(last or first)} - loopback_only:
                if port == 22:
                    continue  # ssh has its own line (tested above)
                if not sources(rulesets[host_of[group]], port):
                    missing.append(f"{group}:{port}")
    assert not missing, f"ports the security check expects but no rule opens: {missing}"


@pytest.mark.parametrize(("ports", "wrong"), [
    pytest.param(["32767-30000"], "32767-30000", id="reversed-range"),
    pytest.param([80, "30000-70000", 0], "30000-70000, 0", id="out-of-bounds"),
    pytest.param(["30000-", "http"], "30000-, http", id="not-a-port"),
])
def test_a_bad_port_or_range_is_refused_and_named(tmp_path: Path, ports: list[object], wrong: str):
    (tmp_path / "hosts.yml").write_text(INVENTORY)
    (tmp_path / "render.yml").write_text(PLAY.split("\n- name: Render the security check", 1)[0])
    services = [{"name": "bad_ports", "ports": ports, "on_groups": ["k8s_workers"], "from_groups": ["lb"]}]
    result = subprocess.run(
        [str(VENV_BIN / "ansible-playbook"), "-i", str(tmp_path / "hosts.yml"), str(tmp_path / "render.yml"),
         "--limit", "worker1", "-e", f"out_dir={tmp_path}",
         "-e", json.dumps({"firewall_admin_networks": ["192.0.2.0/24"], "firewall_probe_address": "127.0.0.1",
                           "firewall_services": services})],
        capture_output=True, text=True, timeout=300, check=False,
        env=dict(os.environ, ANSIBLE_NOCOLOR="1"),
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "firewall_services entry 'bad_ports' is invalid" in output, output
    assert f"wrong: {wrong})" in " ".join(output.split()), output
    assert not (tmp_path / "worker1.nft").exists()  # nothing rendered after the refusal


def test_the_kubernetes_role_keeps_the_bind_addresses_the_rules_assume():
    # No rule for 10257/10259 and the NodePort range at kube-proxy's default are right only while the
    # kubernetes role leaves kubeadm's defaults alone: controller-manager and scheduler on 127.0.0.1,
    # kube-proxy's NodePorts in 30000-32767. A change there must come with a firewall change.
    kubeadm = (COLLECTION / "roles" / "kubernetes" / "vars" / "main.yml").read_text()
    template = (COLLECTION / "roles" / "kubernetes" / "templates" / "kubeadm-config.yaml.j2").read_text()
    for text in (kubeadm, template):
        for setting in ("bind-address", "controllerManager", "scheduler", "service-node-port-range",
                        "KubeProxyConfiguration", "nodePortAddresses", "healthzBindAddress"):
            assert setting not in text, f"the kubernetes role now sets {setting}: review firewall_services"
