"""Verify quantnova.grandmodel.firewall from the network: real TCP connects from each side.

gm-mol-common (groups db, lb) carries the firewall. gm-mol-common-app (group app) and
gm-mol-common-out (no group) probe it from inside their containers; the controller probes it from
the podman bridge's gateway address (the scenario's admin network).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

# podman exec into the real container: one call costs ~0.2 s against ~1.5 s for the ansible backend.
testinfra_hosts = ["podman://gm-mol-common"]

SCENARIO_DIR = Path(__file__).resolve().parent.parent
TARGET = "gm-mol-common"
TABLE = "inet grandmodel"
CONFIRMED = "/etc/nftables.d/grandmodel.nft"
CANDIDATE = "/var/lib/grandmodel-firewall/candidate.nft"
CONFIRM_TIMEOUT = 16  # firewall_confirm_timeout in molecule.yml

# Ports probed on the target: what the scenario's services would use, open or not.
PROBED = [22, 80, 443, 3000, 5432, 6379, 8001, 8432, 9090, 9100, 9187]
# Open ports by source: SSH to the admin network (the controller), the front door (lb) to the client
# network (every container and the gateway), PostgreSQL (db) to the app group. Nothing else.
EXPECTED = {
    "controller": {22, 80, 443},
    "gm-mol-common-app": {80, 443, 5432},
    "gm-mol-common-out": {80, 443},
}

# Connects to every port at once, each with a short timeout: "open" (connected), "refused" (the host
# answered with a reset: reached, nothing listening) or "filtered" (no answer: dropped).
PROBE = r"""
import json, socket, sys
from concurrent.futures import ThreadPoolExecutor
address, ports = sys.argv[1], [int(p) for p in sys.argv[2].split(",")]
def probe(port):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(2.0)
    try:
        sock.connect((address, port))
        return port, "open"
    except ConnectionRefusedError:
        return port, "refused"
    except OSError:
        return port, "filtered"
    finally:
        sock.close()
with ThreadPoolExecutor(len(ports)) as pool:
    print(json.dumps(dict(pool.map(probe, ports))))
"""

# Listens on the probed ports (sshd already has 22) until stopped, accepting and closing.
LISTENER = r"""
import selectors, socket, sys
selector = selectors.DefaultSelector()
for port in sys.argv[1].split(","):
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", int(port)))
    sock.listen(16)
    selector.register(sock, selectors.EVENT_READ)
while True:
    for key, _ in selector.select():
        conn, _ = key.fileobj.accept()
        conn.close()
"""


def address_of(container: str) -> str:
    return subprocess.run(
        ["podman", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", container],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.strip()


def probe_from(source: str, address: str, ports: list[int]) -> dict[int, str]:
    args = ["python3", "-c", PROBE, address, ",".join(map(str, ports))]
    command = [sys.executable, *args[1:]] if source == "controller" else ["podman", "exec", source, *args]
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=30).stdout
    return {int(port): state for port, state in json.loads(out).items()}


def run_firewall_playbook(extra_vars: dict[str, object], *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ansible-playbook", "-i", os.environ["MOLECULE_INVENTORY_FILE"], str(SCENARIO_DIR / "firewall.yml"),
         "-e", json.dumps(extra_vars), *flags],
        capture_output=True, text=True, timeout=300, check=False,
    )


def live_table(host) -> str:
    return host.check_output(f"nft list table {TABLE}")


@pytest.fixture(scope="module")
def listeners(host):
    ports = ",".join(str(p) for p in PROBED if p != 22)
    host.run("systemctl stop gm-fw-probe-listeners.service")
    host.check_output(f"systemd-run --unit gm-fw-probe-listeners --collect python3 -c '{LISTENER}' {ports}")
    for _ in range(50):
        if all(state == "open" for state in probe_from(TARGET, "127.0.0.1", PROBED).values()):
            break
        time.sleep(0.1)
    yield
    host.run("systemctl stop gm-fw-probe-listeners.service")


def test_ruleset_is_loaded_confirmed_and_persisted(host):
    table = live_table(host)
    assert "policy drop;" in table
    assert host.file(CONFIRMED).sha256sum == host.file(CANDIDATE).sha256sum
    assert host.service("grandmodel-firewall.service").is_enabled
    # Confirmed: no revert pending.
    assert host.run("systemctl is-active grandmodel-firewall-rollback.timer").rc != 0
    # Only our table: the ruleset does not flush the tables of others.
    assert host.run("nft -c -f /etc/nftables.d/grandmodel.nft").rc == 0
    assert "flush ruleset" not in host.file(CONFIRMED).content_string
    # pgBackRest's TLS port is open on a database host to the backup_repo group only, which has no host
    # in this scenario: the rule is written, and admits nobody (8432 is probed filtered from everywhere).
    ruleset = host.file(CONFIRMED).content_string
    assert "# pgbackrest_database: tcp 8432 from backup_repo" in ruleset
    assert "dport { 8432 } accept" not in ruleset


def test_each_source_reaches_exactly_the_ports_the_rules_allow(host, listeners):
    address = address_of(TARGET)
    # Loopback is always allowed: every listener answers from the host itself.
    assert set(probe_from(TARGET, "127.0.0.1", PROBED).values()) == {"open"}
    rows, wrong = [], []
    for source, expected in EXPECTED.items():
        found = probe_from(source, address, PROBED)
        opened = {port for port, state in found.items() if state == "open"}
        # A closed port is dropped (no reset that would tell a scanner the host is there).
        assert {state for port, state in found.items() if port not in opened} <= {"filtered"}, found
        rows.append(f"{source:<20} expected {sorted(expected)!s:<22} found {sorted(opened)}")
        if opened != expected:
            wrong.append(source)
    table = "\n".join([f"port table of {TARGET} ({address}), probed {PROBED}:", *rows])
    report = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", SCENARIO_DIR.parent.parent)) / "reports"
    if report.is_dir():
        (report / "molecule-common-ports.txt").write_text(table + "\n")
    print(table)
    assert not wrong, table


def test_check_mode_reports_the_change_and_loads_nothing(host):
    before, candidate = live_table(host), host.file(CANDIDATE).sha256sum
    proc = run_firewall_playbook({"firewall_client_networks": ["198.51.100.0/24"]}, "--check", "--diff")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "ip saddr { 198.51.100.0/24 } tcp dport { 80, 443 } accept" in output, output
    assert "would be loaded on" in output, output
    assert live_table(host) == before
    assert host.file(CANDIDATE).sha256sum == candidate


@pytest.mark.parametrize(("extra_vars", "message"), [
    pytest.param({"firewall_admin_networks": []}, "firewall_admin_networks is empty", id="no-admin-network"),
    pytest.param({"firewall_client_networks": ["10.0.0.0/33", "desk"]}, "are not addresses or CIDRs",
                 id="bad-cidr"),
    pytest.param({"firewall_confirm_timeout": 10}, "must be at least twice", id="window-too-short"),
])
def test_bad_firewall_input_is_rejected_before_anything_changes(host, extra_vars, message):
    before = live_table(host)
    proc = subprocess.run(
        ["ansible-playbook", "-i", os.environ["MOLECULE_INVENTORY_FILE"], str(SCENARIO_DIR / "invalid_input.yml"),
         "-e", json.dumps({"role_under_test": "firewall", **extra_vars})],
        capture_output=True, text=True, timeout=300, check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert message in output, output
    assert live_table(host) == before


def test_a_ruleset_that_cuts_off_the_controller_reverts_by_itself(host):
    """The commit-confirmed promise: a wrong rule (SSH only from a foreign network) is loaded, the
    controller's new connection fails, the run refuses to confirm and the host restores the previous
    ruleset by itself; the boot file never holds the wrong one."""
    address = address_of(TARGET)
    before, confirmed = live_table(host), host.file(CONFIRMED).sha256sum
    assert probe_from("controller", address, [22]) == {22: "open"}

    proc = run_firewall_playbook({"firewall_admin_networks": ["192.0.2.0/24"]})
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "It is NOT confirmed" in output, output
    # The wrong ruleset is live now and really keeps the controller out.
    assert "192.0.2.0/24" in live_table(host)
    assert probe_from("controller", address, [22]) == {22: "filtered"}
    assert host.run("systemctl is-active grandmodel-firewall-rollback.timer").rc == 0

    deadline = time.monotonic() + CONFIRM_TIMEOUT + 15
    while live_table(host) != before and time.monotonic() < deadline:
        time.sleep(1)
    assert live_table(host) == before, "the previous ruleset was not restored in time"
    assert probe_from("controller", address, [22]) == {22: "open"}
    assert host.file(CONFIRMED).sha256sum == confirmed
    assert host.run("systemctl is-active grandmodel-firewall-rollback.timer").rc != 0
