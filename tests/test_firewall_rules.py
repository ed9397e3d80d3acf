"""The firewall role's ruleset rendered for an inventory with every group (no host is touched).

molecule/common proves the rules on a live host, but its target holds db and lb only and no host of
backup_repo or monitoring exists there. Here the role's own defaults, vars and template render
grandmodel.nft for each host of a fake inventory (ansible-playbook on this machine, connection local),
and each service's accept line is read back: who may reach which port, in both directions.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from .conftest import COLLECTION, VENV_BIN

ROLE = COLLECTION / "roles" / "firewall"
ADDRESSES = {"db1": "10.0.1.10", "repo1": "10.0.2.10", "mon1": "10.0.3.10", "mon2": "10.0.3.11",
             "app1": "10.0.4.10", "lb1": "10.0.5.10", "cache1": "10.0.6.10"}
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
"""
PLAY = f"""
- name: Render the firewall ruleset of every host
  hosts: all
  gather_facts: false
  vars_files:
    - {ROLE}/defaults/main.yml
    - {ROLE}/vars/main.yml
  vars:
    ansible_managed: rendered by tests/test_firewall_rules.py
  tasks:
    - name: Write the ruleset the role would load on this host
      ansible.builtin.copy:
        content: "{{{{ lookup('ansible.builtin.template', '{ROLE}/templates/grandmodel.nft.j2') }}}}"
        dest: "{{{{ out_dir }}}}/{{{{ inventory_hostname }}}}.nft"
        mode: "0644"
"""


@pytest.fixture(scope="module")
def rulesets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    work = tmp_path_factory.mktemp("firewall")
    (work / "hosts.yml").write_text(INVENTORY)
    (work / "render.yml").write_text(PLAY)
    result = subprocess.run(
        [str(VENV_BIN / "ansible-playbook"), "-i", str(work / "hosts.yml"), str(work / "render.yml"),
         "-e", f"out_dir={work}",
         # extra vars: the role's defaults are loaded as play vars_files, which beat the inventory
         "-e", '{"firewall_admin_networks": ["192.0.2.0/24"], "firewall_client_networks": ["198.51.100.0/24"]}'],
        capture_output=True, text=True, timeout=300, check=False,
        env=dict(os.environ, ANSIBLE_NOCOLOR="1"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return {host: (work / f"{host}.nft").read_text() for host in ADDRESSES}


def sources(ruleset: str, port: int, proto: str = "tcp") -> set[str]:
    """The IPv4 sources of every accept line that opens `port`."""
    found: set[str] = set()
    for saddr, ports in re.findall(rf"ip saddr {{ ([^}}]+) }} {proto} dport {{ ([^}}]+) }} accept", ruleset):
        if str(port) in [p.strip() for p in ports.split(",")]:
            found |= {s.strip() for s in saddr.split(",")}
    return found


def test_pgbackrest_tls_port_is_open_between_database_and_repository_only(rulesets):
    # The database host reaches the repository (repo1-host) and the repository reaches the database
    # host (pg1-host): each side admits the other, nobody else, and no other host listens for it.
    assert sources(rulesets["repo1"], 8432) == {ADDRESSES["db1"]}
    assert sources(rulesets["db1"], 8432) == {ADDRESSES["repo1"]}
    for host in ("mon1", "app1", "lb1", "cache1"):
        assert sources(rulesets[host], 8432) == set(), host
    assert "# pgbackrest_repository: tcp 8432 from db" in rulesets["repo1"]
    assert "# pgbackrest_database: tcp 8432 from backup_repo" in rulesets["db1"]


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
    assert sources(rulesets["app1"], 8001) == {ADDRESSES["lb1"]}
    assert sources(rulesets["repo1"], 9100) == {ADDRESSES["mon1"], ADDRESSES["mon2"]}
    assert sources(rulesets["repo1"], 22) == set()  # ssh has its own line
    assert "ip saddr { 192.0.2.0/24 } tcp dport 22 accept" in rulesets["repo1"]


def test_every_listening_port_of_the_roles_has_a_rule():
    # Ports the roles' defaults listen on over the network; each must appear in firewall_services
    # (the SSH port has its own input). Local-only ports (the restore check's 5499) are left out.
    import yaml

    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    table = {int(p) for s in defaults["firewall_services"] if isinstance(s["ports"], list) for p in s["ports"]}
    roles = COLLECTION / "roles"
    listened = {
        "pgbackrest_tls_port": ("pgbackrest", 8432), "redis_tls_port": ("redis", 6380),
        "postgresql_port": ("postgresql", 5432), "monitoring_prometheus_port": ("monitoring", 9090),
        "monitoring_alertmanager_port": ("monitoring", 9093), "grafana_port": ("grafana", 3000),
        "exporters_node_port": ("exporters", 9100), "exporters_postgres_port": ("exporters", 9187),
        "exporters_redis_port": ("exporters", 9121), "exporters_nginx_port": ("exporters", 9113),
        "loadbalancer_http_port": ("loadbalancer", 80), "loadbalancer_https_port": ("loadbalancer", 443),
    }
    for name, (role, port) in listened.items():
        role_defaults = yaml.safe_load((roles / role / "defaults" / "main.yml").read_text())
        assert role_defaults[name] == port, (role, name, role_defaults.get(name))
        assert port in table, f"{role}'s {name} ({port}) has no entry in firewall_services"
    assert Path(ROLE / "templates" / "grandmodel.nft.j2").is_file()
