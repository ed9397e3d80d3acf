"""Verify the monitoring tier on the converged hosts: real answers from Prometheus, Alertmanager,
the exporters and promtool, never Ansible's word."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import testinfra
import yaml

testinfra_hosts = ["ansible://gm-mol-monitoring"]

SCENARIO_DIR = Path(__file__).resolve().parent.parent
REPO = SCENARIO_DIR.parent.parent
ROLES = REPO / "ansible_collections" / "quantnova" / "grandmodel" / "roles"
MONITORED = "gm-mol-monitoring-2"


@pytest.fixture(scope="module")
def monitored():
    return testinfra.get_host(f"ansible://{MONITORED}",
                              ansible_inventory=os.environ["MOLECULE_INVENTORY_FILE"])


# Web login of Prometheus and Alertmanager: the user, and the file on the monitoring host holding the
# password the role wrote for Prometheus' own scrapes. Tests log in with that file, so no password
# appears in a command line or in this run's output.
WEB_USER = "grandmodel"
OWN_LOGIN = f"{WEB_USER}:/etc/prometheus/web-login"
NO_LOGIN = "none"
WRONG_LOGIN = f"{WEB_USER}:not-the-password-0123456789"
FETCHER = "/usr/local/bin/gm-test-fetch"
# The run's CA certificate (from the controller), the only CA the fetcher trusts for https.
TEST_CA = "/usr/local/share/gm-test-ca.crt"
# GETs each (url, login) and prints [status, body] per request as JSON; a login is "none",
# "user:/path/of/a/password/file" or "user:literal" (the wrong password). https trusts TEST_CA only;
# "untrusted+https://" trusts the system's CAs only (a client that does not know the internal CA).
# A connection that fails (TLS verification included) gives [0, the reason].
FETCH = r"""#!/usr/bin/python3
import base64, json, ssl, sys, urllib.error, urllib.request
trusting = ssl.create_default_context(cafile="/usr/local/share/gm-test-ca.crt")
untrusting = ssl.create_default_context()
answers = []
for url, login in json.loads(sys.argv[1]):
    context = untrusting if url.startswith("untrusted+") else trusting
    url = url.removeprefix("untrusted+")
    request = urllib.request.Request(url)
    if login != "none":
        user, secret = login.split(":", 1)
        if secret.startswith("/"):
            secret = open(secret).read()
        token = base64.b64encode(f"{user}:{secret}".encode()).decode()
        request.add_header("Authorization", "Basic " + token)
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as answer:
            answers.append([answer.status, answer.read().decode()])
    except urllib.error.HTTPError as error:
        answers.append([error.code, error.read().decode()])
    except urllib.error.URLError as error:
        answers.append([0, str(error.reason)])
print(json.dumps(answers))
"""


def controller_secret(name: str) -> str:
    """A password the scenario generated on the controller (molecule.yml's password lookups)."""
    return (Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / name).read_text().split()[0]


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def controller_ca() -> str:
    """The run's CA certificate, generated on the controller by quantnova.grandmodel.pki."""
    return (Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "pki" / "ca.crt").read_text()


def install_fetcher(*hosts) -> None:
    encoded = base64.b64encode(FETCH.encode()).decode()
    ca = base64.b64encode(controller_ca().encode()).decode()
    for h in hosts:
        h.check_output(f"echo {encoded} | base64 -d > {FETCHER} && chmod 0755 {FETCHER}"
                       f" && echo {ca} | base64 -d > {TEST_CA}")


def fetch_all(host, requests: list[tuple[str, str]]) -> list[tuple[int, str]]:
    """GET every (url, login) from inside `host` in one round trip."""
    out = host.check_output(f"{FETCHER} %s", json.dumps(requests))
    return [(status, body) for status, body in json.loads(out)]


@pytest.fixture(scope="module", autouse=True)
def fetcher(monitored):
    # Not the `host` fixture: an autouse fixture using it would parametrize every test by host.
    install_fetcher(testinfra.get_host("ansible://gm-mol-monitoring",
                                       ansible_inventory=os.environ["MOLECULE_INVENTORY_FILE"]), monitored)


def api(host, url: str) -> dict:
    """GET a JSON API from inside the monitoring host (its services listen there), logged in."""
    [(status, body)] = fetch_all(host, [(url, OWN_LOGIN)])
    assert status == 200, (url, status, body)
    return json.loads(body)


def query(host, promql: str) -> list[dict]:
    import urllib.parse

    data = api(host, "https://127.0.0.1:9090/api/v1/query?query=" + urllib.parse.quote(promql))
    assert data["status"] == "success", data
    return data["data"]["result"]


def wait_for(predicate, timeout: float, what: str, interval: float = 2.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def alerts(host, name: str, **labels: str) -> list[dict]:
    found = api(host, "https://127.0.0.1:9090/api/v1/alerts")["data"]["alerts"]
    return [a for a in found if a["labels"].get("alertname") == name
            and all(a["labels"].get(k) == v for k, v in labels.items())]


def test_services_running_with_configured_flags(host, monitored):
    for name in ("prometheus", "prometheus-alertmanager", "prometheus-node-exporter"):
        assert host.service(name).is_running and host.service(name).is_enabled, name
    for name in ("prometheus-node-exporter", "prometheus-postgres-exporter", "prometheus-redis-exporter"):
        assert monitored.service(name).is_running and monitored.service(name).is_enabled, name
    flags = api(host, "https://127.0.0.1:9090/api/v1/status/flags")["data"]
    assert flags["storage.tsdb.retention.time"] == "1d"
    assert flags["storage.tsdb.retention.size"] == "512MiB"  # Prometheus reads MB as 2^20 bytes


def test_prometheus_and_alertmanager_never_ran_with_the_packages_example_configuration(host):
    """Debian starts both services on installation with their example configurations: no TLS, no login,
    Prometheus scraping localhost:9100 as a "node" target. Restarted seconds later with the role's
    configuration, Prometheus kept that target's up=0 sample (a restart writes no staleness marker), and
    TargetDown fired on a fresh host: the CI run of ae40bc0 failed on it (pre-market counted the alert).
    These hosts were created for this run: every start of either service in their journals served TLS,
    and Prometheus never stored a sample of a target the role did not configure."""
    log = host.check_output("journalctl -u prometheus -u prometheus-alertmanager --no-pager -o cat")
    assert "TLS is disabled" not in log, log
    assert log.count("TLS is enabled") >= 2, log
    configured = {(t["labels"]["job"], t["labels"]["instance"])
                  for t in api(host, "https://127.0.0.1:9090/api/v1/targets")["data"]["activeTargets"]}
    stored = {(s["metric"]["job"], s["metric"]["instance"])
              for s in query(host, "count by (job, instance) (count_over_time(up[1d]))")}
    assert stored and stored <= configured, (stored, configured)


PROMETHEUS_PATHS = ["/api/v1/query?query=up", "/api/v1/status/config", "/metrics", "/graph", "/-/healthy", "/-/ready"]
ALERTMANAGER_PATHS = ["/api/v2/status", "/api/v2/silences", "/metrics", "/-/healthy", "/-/ready"]


def endpoints(address: str) -> list[str]:
    return ([f"https://{address}:9090{p}" for p in PROMETHEUS_PATHS]
            + [f"https://{address}:9093{p}" for p in ALERTMANAGER_PATHS])


def test_web_endpoints_answer_only_the_right_login(host, monitored):
    # From the monitored host, over the network: no login and a wrong password are refused on every
    # endpoint, /-/healthy and /-/ready included (a health probe needs the login too).
    urls = endpoints("gm-mol-monitoring")
    asked = [(u, login) for login in (NO_LOGIN, WRONG_LOGIN) for u in urls]
    refused = fetch_all(monitored, asked)
    statuses = {f"{login.split(':')[-1]} {u}": status for (u, login), (status, _) in zip(asked, refused, strict=True)}
    assert set(statuses.values()) == {401}, statuses
    assert all("Unauthorized" in body for _, body in refused), refused[0]
    # On the monitoring host, to its network address and to loopback, the role's login is served.
    asked = [(u, OWN_LOGIN) for u in urls + endpoints("127.0.0.1")]
    served = {u: status for (u, _), (status, _) in zip(asked, fetch_all(host, asked), strict=True)}
    assert set(served.values()) == {200}, served
    # A wrong user with the right password is refused as well.
    [(status, _)] = fetch_all(host, [("https://127.0.0.1:9090/api/v1/query?query=up",
                                      "intruder:/etc/prometheus/web-login")])
    assert status == 401


PLAIN_HTTP_ANSWER = "Client sent an HTTP request to an HTTPS server."


def test_tls_only_with_a_certificate_of_the_internal_ca(host, monitored):
    # Over the network from the monitored host: plain http is answered with Go's fixed 400 and nothing
    # else (no data, not even the login prompt), with or without a login; a client that does not
    # trust the internal CA fails verification before any request is sent; one that does gets in.
    plain = [f"http://gm-mol-monitoring:{port}{path}" for port, path in ((9090, "/api/v1/query?query=up"),
                                                                         (9090, "/metrics"),
                                                                         (9093, "/api/v2/status"))]
    # (The wrong password: the real one is never sent in plaintext.)
    asked = ([(u, login) for u in plain for login in (NO_LOGIN, WRONG_LOGIN)]
             + [(f"untrusted+https://gm-mol-monitoring:{port}/-/ready", NO_LOGIN) for port in (9090, 9093)])
    answers = fetch_all(monitored, asked)
    for (url, _), (status, body) in zip(asked, answers, strict=True):
        if url.startswith("http://"):
            assert (status, body.strip()) == (400, PLAIN_HTTP_ANSWER), (url, status, body[:200])
        else:
            assert status == 0 and "CERTIFICATE_VERIFY_FAILED" in body, (url, status, body[:200])
    # One round trip for the files: the key's owner and mode, whether another user can read it, the
    # installed CA, the web configuration and the Prometheus configuration.
    key = "/etc/grandmodel/pki/monitoring.key"
    out = host.check_output(
        f"stat -c '%U %G %a' {key}; runuser -u nobody -- cat {key} >/dev/null 2>&1 && echo readable || echo denied;"
        " for f in /etc/grandmodel/pki/ca.crt /etc/prometheus/web-config.yml /etc/prometheus/prometheus.yml;"
        " do base64 -w0 $f; echo; done").splitlines()
    ca, web, config = (base64.b64decode(line).decode() for line in out[2:5])
    # The key is readable by the service user only; the CA is the run's.
    assert out[:2] == ["prometheus prometheus 600", "denied"], out[:2]
    assert ca.strip() == controller_ca().strip()
    assert yaml.safe_load(web)["tls_server_config"] == {
        "cert_file": "/etc/grandmodel/pki/monitoring.crt", "key_file": key, "min_version": "TLS12"}
    # The Prometheus configuration: its own jobs and the Alertmanager link verify against the CA.
    parsed = yaml.safe_load(config)
    links = [j for j in parsed["scrape_configs"] if j["job_name"] in ("prometheus", "alertmanager")]
    links += parsed["alerting"]["alertmanagers"]
    assert len(links) == 3 and all(
        (link["scheme"], link["tls_config"]) == ("https", {"ca_file": "/etc/grandmodel/pki/ca.crt"})
        for link in links), links


# On the monitoring host, as root, in one round trip: the subject each service presents on a new handshake,
# then the same after the issued certificate is replaced by one made here (same key, self-signed, CN
# gm-test-swap), then after the issued one is put back (always, even on an error), and the services'
# process ids before and after. Prints JSON.
SWAP = r"""
import datetime, json, ssl, subprocess
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
CRT, KEY = "/etc/grandmodel/pki/monitoring.crt", "/etc/grandmodel/pki/monitoring.key"
def served():
    names = []
    for port in (9090, 9093):
        cert = x509.load_pem_x509_certificate(ssl.get_server_certificate(("127.0.0.1", port)).encode())
        names.append(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
    return names
def pids():
    return subprocess.check_output(["systemctl", "show", "-p", "MainPID", "--value", "prometheus",
                                    "prometheus-alertmanager"], text=True).split()
report = {"pids_before": pids(), "before": served()}
key = serialization.load_pem_private_key(open(KEY, "rb").read(), None)
name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gm-test-swap")])
now = datetime.datetime.now(datetime.timezone.utc)
swap = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(hours=1)).sign(key, hashes.SHA256()))
issued = open(CRT, "rb").read()
try:
    with open(CRT, "wb") as out:  # the same file (owner and mode kept), new content
        out.write(swap.public_bytes(serialization.Encoding.PEM))
    report["swapped"] = served()
finally:
    with open(CRT, "wb") as out:
        out.write(issued)
report["restored"] = served()
report["pids_after"] = pids()
print(json.dumps(report))
"""


def test_a_renewed_certificate_is_served_without_a_restart(host):
    # The exporter toolkit loads the certificate again on every handshake: the role does not restart
    # Prometheus or Alertmanager when the pki role renews it. Proven by replacing the file under them.
    encoded = base64.b64encode(SWAP.encode()).decode()
    report = json.loads(host.check_output(f"echo {encoded} | base64 -d > /tmp/gm-test-swap.py"
                                          " && python3 /tmp/gm-test-swap.py"))
    assert report["before"] == report["restored"] == ["gm-mol-monitoring"] * 2, report
    assert report["swapped"] == ["gm-test-swap"] * 2, report
    assert report["pids_before"] == report["pids_after"] and "0" not in report["pids_before"], report


def test_only_bcrypt_hashes_of_the_generated_password_are_stored(host):
    files = "/etc/prometheus/web-login /etc/prometheus/web-config.yml"
    assert host.check_output(f"stat -c '%U %G %a' {files}").splitlines() == ["root prometheus 640"] * 2
    # The password Prometheus logs in with is the one the scenario generated (compared by digest).
    on_host = host.check_output("sha256sum < /etc/prometheus/web-login").split()[0]
    assert on_host == digest(controller_secret("monitoring_web_password"))
    users = yaml.safe_load(host.check_output("cat /etc/prometheus/web-config.yml"))["basic_auth_users"]
    assert list(users) == [WEB_USER] and users[WEB_USER].startswith("$2b$12$"), users
    # Both services run with it, and no other file of theirs holds the password in plaintext.
    args = host.check_output("for unit in prometheus prometheus-alertmanager; do"
                             " tr '\\0' ' ' < /proc/$(systemctl show -p MainPID --value $unit)/cmdline; echo; done")
    assert args.count("--web.config.file=/etc/prometheus/web-config.yml") == 2, args
    holders = host.run("grep -rlF -f /etc/prometheus/web-login /etc/prometheus /etc/default /var/lib/prometheus"
                       " --exclude-dir=metrics2")
    assert holders.stdout.split() == ["/etc/prometheus/web-login"], holders.stdout


def test_every_scrape_target_is_up(host):
    expected = {
        ("prometheus", "gm-mol-monitoring:9090"), ("alertmanager", "gm-mol-monitoring:9093"),
        ("node", "gm-mol-monitoring:9100"), ("node", f"{MONITORED}:9100"),
        ("postgres", f"{MONITORED}:9187"), ("redis", f"{MONITORED}:9121"),
        ("grandmodel", f"{MONITORED}:8001"), ("grandmodel", f"{MONITORED}:8002"),
    }

    def targets():
        active = api(host, "https://127.0.0.1:9090/api/v1/targets")["data"]["activeTargets"]
        seen = {(t["labels"]["job"], t["labels"]["instance"]): t for t in active}
        if set(seen) == expected and all(t["health"] == "up" for t in seen.values()):
            return seen
        return None

    seen = wait_for(targets, 90, "every scrape target up")
    # Prometheus scrapes itself and Alertmanager over https, verifying their certificate against the CA.
    own = {t["labels"]["job"]: t["scrapeUrl"] for t in seen.values()
           if t["labels"]["job"] in ("prometheus", "alertmanager")}
    assert own == {"prometheus": "https://gm-mol-monitoring:9090/metrics",
                   "alertmanager": "https://gm-mol-monitoring:9093/metrics"}, own
    colours = {t["labels"]["instance"]: t["labels"].get("color") for t in seen.values()
               if t["labels"]["job"] == "grandmodel"}
    assert colours == {f"{MONITORED}:8001": "blue", f"{MONITORED}:8002": "green"}
    assert all(t["labels"]["env"] == "molecule" for t in seen.values())


def test_exporters_reach_postgresql_and_redis_with_their_credentials(host, monitored):
    # pg_up/redis_up are 1 only when the exporter logged in with the password the role wrote.
    assert wait_for(lambda: [r for r in query(host, "pg_up == 1")], 30, "pg_up == 1")
    assert wait_for(lambda: [r for r in query(host, "redis_up == 1")], 30, "redis_up == 1")
    for path in ("/etc/default/prometheus-postgres-exporter", "/etc/default/prometheus-redis-exporter"):
        f = monitored.file(path)
        assert (f.user, f.group, f.mode) == ("root", "prometheus", 0o640), path


def test_rule_unit_tests_pass_with_promtool(host):
    # The authored rules and their unit tests, run by Debian's promtool inside the container.
    host.check_output("rm -rf /tmp/rules-unit && mkdir -p /tmp/rules-unit/rules /tmp/rules-unit/rules_tests")
    files = ROLES / "monitoring" / "files"
    for sub in ("rules", "rules_tests"):
        for path in sorted((files / sub).glob("*.yml")):
            host.ansible("ansible.builtin.copy", f"src={path} dest=/tmp/rules-unit/{sub}/{path.name}",
                         check=False, become=True)
    result = host.run("cd /tmp/rules-unit/rules_tests && promtool test rules *.yml")
    assert result.rc == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_deployed_rules_and_config_are_valid_and_loaded(host):
    assert host.run("promtool check config /etc/prometheus/prometheus.yml").rc == 0
    assert host.run("amtool check-config /etc/prometheus/alertmanager.yml").rc == 0
    groups = api(host, "https://127.0.0.1:9090/api/v1/rules")["data"]["groups"]
    names = {r["name"] for g in groups for r in g["rules"]}
    for alert in ("TargetDown", "GrandModelLiveColorDown", "GrandModelHighLatency", "GrandModelHighErrorRate",
                  "GrandModelNotReady", "GrandModelReleaseAwaitingApproval",
                  "GrandModelVersionMismatch", "HostMemoryPressure", "HostCpuPressure", "HostDiskFillingUp",
                  "HostClockSkew", "PostgresDown", "RedisDown", "GrandModelRiskLimitBreach",
                  "GrandModelDrawdownHigh", "grandmodel:request_duration_seconds:p95_5m",
                  "grandmodel:http_errors:ratio_rate5m"):
        assert alert in names, alert
    # The scenario's `for:` override reached every alert; the source files keep the runbook values.
    assert {r["duration"] for g in groups for r in g["rules"] if r["type"] == "alerting"} == {4}
    assert all(g["interval"] == 2 for g in groups)
    # Rules are evaluated (in-process, no login needed) without errors, and recently.
    assert {r["health"] for g in groups for r in g["rules"]} == {"ok"}, groups
    assert all(g["lastEvaluation"][:4] == time.strftime("%Y", time.gmtime()) for g in groups), groups
    # Prometheus logs in to Alertmanager: it is an active target of the alerting link.
    active = api(host, "https://127.0.0.1:9090/api/v1/alertmanagers")["data"]["activeAlertmanagers"]
    assert [a["url"] for a in active] == ["https://gm-mol-monitoring:9093/api/v2/alerts"], active
    status = api(host, "https://127.0.0.1:9093/api/v2/status")
    am = yaml.safe_load(status["config"]["original"])
    route = am["route"]["routes"][0]
    assert (route["receiver"], route["matchers"]) == ("sink", ['severity=~"critical|warning"'])
    assert am["receivers"][1]["webhook_configs"][0]["url"] == "http://127.0.0.1:9099/alerts"


def test_stopping_an_exporter_fires_target_down_and_notifies(host, monitored):
    instance = f"{MONITORED}:9100"
    monitored.check_output("systemctl stop prometheus-node-exporter")
    try:
        wait_for(lambda: alerts(host, "TargetDown", instance=instance), 60, "TargetDown pending")
        wait_for(lambda: [a for a in alerts(host, "TargetDown", instance=instance) if a["state"] == "firing"],
                 60, "TargetDown firing")
        # Alertmanager holds it and delivered it through the sink route's webhook.
        held = api(host, "https://127.0.0.1:9093/api/v2/alerts?filter=alertname%3D%22TargetDown%22")
        assert any(a["labels"]["instance"] == instance for a in held), held

        def delivered():
            out = host.run("cat /var/tmp/alert-sink.jsonl").stdout
            return [n for n in map(json.loads, out.splitlines())
                    if any(a["labels"].get("alertname") == "TargetDown"
                           and a["labels"].get("instance") == instance for a in n["alerts"])]

        notes = wait_for(delivered, 30, "webhook notification for TargetDown")
        assert notes[0]["receiver"] == "sink" and notes[0]["status"] == "firing"
    finally:
        monitored.run("systemctl start prometheus-node-exporter")
    wait_for(lambda: not alerts(host, "TargetDown", instance=instance), 60, "TargetDown resolved")


def test_a_colour_reporting_not_ready_fires_model_not_ready(host, monitored):
    metrics = "/srv/stub-8002/metrics"
    monitored.check_output(f"sed -i 's/^grandmodel_ready 1$/grandmodel_ready 0/' {metrics}")
    try:
        found = wait_for(lambda: alerts(host, "GrandModelNotReady", color="green"), 60, "GrandModelNotReady")
        assert found[0]["state"] in ("pending", "firing")
        assert found[0]["labels"]["instance"] == f"{MONITORED}:8002"
        assert not alerts(host, "GrandModelNotReady", color="blue")
    finally:
        monitored.run(f"sed -i 's/^grandmodel_ready 0$/grandmodel_ready 1/' {metrics}")


TRAFFIC_METRICS = "/var/lib/prometheus/node-exporter/grandmodel_traffic.prom"


def switch_live_colour(monitored, color: str) -> dict:
    """Make `color` live with the real traffic switch on the monitored host (its textfile export included).

    The host has no front door to verify through (verify_url empty) and nginx is not serving it
    (reload_command true); the switch still tests the upstream with nginx -t and writes the metric.
    """
    result = monitored.ansible("quantnova.grandmodel.traffic_switch", json.dumps({
        "color": color, "upstream_file": "/etc/nginx/grandmodel-test/upstream.conf",
        "backends": {"blue": ["127.0.0.1:8001"], "green": ["127.0.0.1:8002"]},
        "reload_command": ["true"], "metrics_file": TRAFFIC_METRICS,
    }), check=False, become=True)
    assert not result.get("failed"), result
    return result


def live_colour_alerts(host, color: str) -> list[dict]:
    port = 8001 if color == "blue" else 8002
    return alerts(host, "GrandModelLiveColorDown", color=color, instance=f"{MONITORED}:{port}")


def test_the_live_colour_not_answering_fires_whatever_the_warm_colour_does(host, monitored):
    monitored.check_output("mkdir -p /etc/nginx/grandmodel-test")
    switch_live_colour(monitored, "blue")
    # Prometheus reads the live colour from the node exporter's textfile collector.
    wait_for(lambda: query(host, 'grandmodel_traffic_active_color{color="blue"} == 1'), 60,
             "the live colour metric from the textfile collector")
    try:
        # The warm colour (green) stops: no live-colour alert, however long it stays down.
        monitored.check_output("systemctl stop grandmodel-stub@8002")
        wait_for(lambda: [r for r in query(host, 'up{job="grandmodel", color="green"} == 0')], 30, "green down")
        time.sleep(12)  # several evaluations, well over the scenario's `for:` of 4s
        assert not live_colour_alerts(host, "green") and not live_colour_alerts(host, "blue")
        monitored.check_output("systemctl start grandmodel-stub@8002")
        # The live colour (blue) stops while green answers: the alert fires, and GrandModelServiceDown does not.
        started = time.monotonic()
        monitored.check_output("systemctl stop grandmodel-stub@8001")
        firing = wait_for(lambda: [a for a in live_colour_alerts(host, "blue") if a["state"] == "firing"], 60,
                          "GrandModelLiveColorDown firing for blue")
        seconds = time.monotonic() - started
        assert firing[0]["labels"]["severity"] == "critical"
        assert not alerts(host, "GrandModelServiceDown")
        print(f"\nGrandModelLiveColorDown fired {seconds:.1f}s after the live colour stopped "
              "(scrape and evaluation every 2s, for: 4s in this scenario)")
        # Traffic moves to green: blue being down is no longer an alert.
        switch_live_colour(monitored, "green")
        wait_for(lambda: not live_colour_alerts(host, "blue"), 60, "the alert for blue to resolve after the switch")
    finally:
        monitored.run("systemctl start grandmodel-stub@8001 grandmodel-stub@8002")
        switch_live_colour(monitored, "blue")


def test_grafana_ini_binds_the_management_address_with_the_admin_password_and_no_anonymous_access(host):
    import configparser

    ini_file = host.file("/etc/grafana/grafana.ini")
    assert (ini_file.user, ini_file.group, ini_file.mode) == ("root", "root", 0o640)
    ini = configparser.ConfigParser(interpolation=None)
    ini.read_string(ini_file.content_string)
    address = host.check_output("ip -4 route get 1.1.1.1 | grep -o 'src [0-9.]*' | cut -d' ' -f2")
    assert ini["server"]["http_addr"] == address and ini["server"]["http_port"] == "3000"
    assert ini["auth.anonymous"]["enabled"] == "false"
    assert ini["users"]["allow_sign_up"] == "false"
    assert ini["security"]["admin_user"] == "admin"
    admin = ini["security"]["admin_password"]
    assert admin.startswith('"""') and admin.endswith('"""')
    assert digest(admin.strip('"')) == digest(controller_secret("grafana_admin_password"))


def test_grafana_provisioning_is_valid_and_every_panel_query_parses(host):
    assert not host.package("grafana").is_installed  # grafana_install is off here: files only
    source_file = host.file("/etc/grafana/provisioning/datasources/grandmodel.yml")
    assert (source_file.user, source_file.group, source_file.mode) == ("root", "root", 0o640)
    datasource = yaml.safe_load(source_file.content_string)
    source = datasource["datasources"][0]
    assert source["url"] == "https://127.0.0.1:9090"
    # It verifies Prometheus' certificate against the internal CA (PEM inline: Grafana takes no path).
    assert (source["jsonData"]["tlsAuthWithCACert"], source["jsonData"]["tlsSkipVerify"]) == (True, False)
    assert source["secureJsonData"]["tlsCACert"].strip() == controller_ca().strip()
    # The datasource logs in to Prometheus with the web login (compared by digest, never printed).
    assert (source["basicAuth"], source["basicAuthUser"]) == (True, WEB_USER)
    assert digest(source["secureJsonData"]["basicAuthPassword"]) == digest(controller_secret("monitoring_web_password"))
    provider = yaml.safe_load(host.file("/etc/grafana/provisioning/dashboards/grandmodel.yml").content_string)
    folder = provider["providers"][0]["options"]["path"]
    assert folder == "/var/lib/grafana/dashboards/grandmodel"
    exprs = []
    uids = set()
    for name in ("grandmodel-service", "grandmodel-hosts", "grandmodel-postgresql", "grandmodel-redis"):
        board = json.loads(host.file(f"{folder}/{name}.json").content_string)
        uids.add(board["uid"])
        assert board["panels"], name
        for panel in board["panels"]:
            assert panel["datasource"]["uid"] == datasource["datasources"][0]["uid"]
            exprs += [t["expr"] for t in panel["targets"]]
    assert uids == {"grandmodel-service", "grandmodel-hosts", "grandmodel-postgresql", "grandmodel-redis"}
    # promtool cannot check a bare expression: check them as recording rules instead.
    rules = {"groups": [{"name": "panels", "rules": [{"record": f"panel:expr:{i}", "expr": e}
                                                     for i, e in enumerate(exprs)]}]}
    encoded = base64.b64encode(yaml.safe_dump(rules).encode()).decode()
    host.check_output(f"echo {encoded} | base64 -d > /tmp/panel-exprs.yml")
    result = host.run("promtool check rules /tmp/panel-exprs.yml")
    assert result.rc == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


BAD_INPUTS = [
    pytest.param("monitoring", None, {"monitoring_prometheus_retention_time": "forever"},
                 "monitoring durations are malformed", id="bad-retention"),
    pytest.param("monitoring", None, {"monitoring_prometheus_port": "lots"},
                 "monitoring_prometheus_port", id="port-not-int"),
    pytest.param("monitoring", None, {"monitoring_alertmanager_default_receiver": "nobody"},
                 "Alertmanager receivers are inconsistent", id="unknown-receiver"),
    pytest.param("monitoring", None,
                 {"monitoring_alertmanager_receivers": [{"name": "default", "email_to": ["a@b.c"]}],
                  "monitoring_alertmanager_routes": []},
                 "send email, so monitoring_alertmanager_smtp_smarthost", id="email-without-smtp"),
    pytest.param("monitoring", None, {"monitoring_service_ports": {}},
                 "monitoring_service_ports\nneeds at least one colour", id="no-colour"),
    pytest.param("exporters", "postgres", {},
                 "missing required arguments: exporters_postgres_password", id="postgres-no-password"),
    pytest.param("exporters", "redis", {"exporters_redis_password": ""},
                 "the Redis exporter needs exporters_redis_password", id="redis-empty-password"),
    pytest.param("grafana", None, {"grafana_prometheus_url": "prometheus"},
                 "grafana_prometheus_url must be an http(s) URL", id="grafana-bad-url"),
    pytest.param("monitoring", None, {"monitoring_tls_cert_file": "/etc/ssl/certs/monitoring.pem"},
                 "are absolute paths on the host given all three together", id="tls-cert-without-key"),
    pytest.param("monitoring", None, {"monitoring_web_password": ""},
                 "web login is not usable: monitoring_web_password is empty or shorter than 16 characters",
                 id="web-password-unset"),
    # Both problems in one run: the message lists every one of them.
    pytest.param("grafana", None, {"grafana_admin_password": "", "grafana_http_addr": "0.0.0.0"},
                 # (up to the quoted address: YAML output doubles single quotes)
                 "grafana_admin_password is empty or shorter than 12 characters; grafana_http_addr",
                 id="grafana-no-admin-password-all-interfaces"),
]

# Files a refused run must leave as they were (and the login must still work after it).
GUARDED = ["/etc/prometheus/web-config.yml", "/etc/prometheus/web-login", "/etc/default/prometheus",
           "/etc/grandmodel/pki/monitoring.crt", "/etc/grandmodel/pki/monitoring.key",
           "/etc/grafana/grafana.ini", "/etc/grafana/provisioning/datasources/grandmodel.yml"]


@pytest.fixture(scope="module")
def bad_input_runs():
    """Start every bad-input run and a check-mode run of the converge at once (each mostly waits on
    the containers), then collect the outputs. Runs after the alert tests have restored the hosts."""
    # Not the `host` fixture: that would parametrize every test using this one by host.
    monitoring = testinfra.get_host("ansible://gm-mol-monitoring",
                                    ansible_inventory=os.environ["MOLECULE_INVENTORY_FILE"])
    before = monitoring.check_output("sha256sum " + " ".join(GUARDED))
    procs = {"check-mode": subprocess.Popen(
        ["ansible-playbook", "-i", os.environ["MOLECULE_INVENTORY_FILE"], str(SCENARIO_DIR / "converge.yml"),
         "--check", "--diff"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )}
    for param in BAD_INPUTS:
        role, entry, extra_vars, _ = param.values
        extra = {"role_under_test": role, **extra_vars}
        if entry:
            extra["entry_point"] = entry
        procs[param.id] = subprocess.Popen(
            ["ansible-playbook", "-i", os.environ["MOLECULE_INVENTORY_FILE"],
             str(SCENARIO_DIR / "invalid_input.yml"), "-e", json.dumps(extra)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
    results = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        results[name] = (proc.returncode, " ".join(out.split()))
    results["guarded-before"] = (0, before)
    return results


@pytest.mark.parametrize(("role", "entry", "extra_vars", "message"), BAD_INPUTS)
def test_bad_input_is_rejected_with_a_clear_message(request, bad_input_runs, role, entry, extra_vars, message):
    returncode, output = bad_input_runs[request.node.callspec.id]
    assert returncode != 0, output
    assert " ".join(message.split()) in output, output


def test_check_mode_reports_no_change_on_the_converged_hosts(bad_input_runs):
    import re

    returncode, output = bad_input_runs["check-mode"]
    assert returncode == 0, output
    recap = re.findall(r"(gm-mol-monitoring(?:-2)?) : ok=\d+ changed=(\d+) unreachable=0 failed=0", output)
    assert sorted(recap) == [("gm-mol-monitoring", "0"), ("gm-mol-monitoring-2", "0")], output


def test_refused_inputs_changed_nothing_and_the_login_still_works(host, bad_input_runs):
    _, before = bad_input_runs["guarded-before"]
    assert host.check_output("sha256sum " + " ".join(GUARDED)) == before
    answers = fetch_all(host, [("https://127.0.0.1:9090/-/ready", OWN_LOGIN),
                               ("https://127.0.0.1:9093/-/ready", OWN_LOGIN),
                               ("https://127.0.0.1:9090/-/ready", NO_LOGIN)])
    assert [status for status, _ in answers] == [200, 200, 401]
