"""The blue-green release flow under load and under faults, through the real nginx front door.

converge left release 2026.11.0 live on blue. The tests run in order, each driving
playbooks/rollout.yml, rollback.yml, switch_back.yml or the traffic_switch module against the
scenario's hosts while a bounded load generator (scripts/frontdoor_load.py) sends predictions to the
front door published on 127.0.0.1:28080 and logs every request's status and serving colour: an
independent count of every response, never the playbook's word.

The fault matrix promotes the idle colour green (release 2026.11.1, deployed once by the full flow)
over blue with `rollout_deploy=false`, and hits green at a measured moment: a watcher on this
machine counts the gates' /health probes on green's own /metrics (one per measurement) and acts the
instant the wanted measurement starts, on green's processes found by their systemd cgroup (kill -9,
SIGSTOP, a restart, a drain), or when the switch's journal appears on the load balancer.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

PROJECT = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(PROJECT / "scripts"))

from frontdoor_load import LoadGenerator, Report  # noqa: E402

FRONT = "http://127.0.0.1:28080"
APP = "gm-mol-rollout-app"
LB = "gm-mol-rollout-lb"
OPS = "gm-mol-rollout-ops"  # the environment's PostgreSQL and Prometheus
UPSTREAM = "/etc/nginx/grandmodel/upstream.conf"
JOURNAL = "/etc/nginx/grandmodel/.upstream.conf.pending"
LOCK = "/etc/nginx/grandmodel/.upstream.conf.lock"
METRICS_FILE = "/var/lib/prometheus/node-exporter/grandmodel_traffic.prom"
RATE = 40.0
PRE_COUNT, POST_COUNT = 5, 6  # the scenario's gate counts (molecule.yml)
RESULTS: dict[str, dict[str, Any]] = {}

testinfra_hosts = [f"ansible://{APP}"]


# -- helpers ------------------------------------------------------------------------------------

def front_version() -> dict[str, Any]:
    with urllib.request.urlopen(f"{FRONT}/version", timeout=5) as resp:
        return dict(json.load(resp))


def front_color() -> str:
    return str(front_version()["color"])


def playbook_argv(name: str, *extra: str, directory: Path = PROJECT / "playbooks") -> list[str]:
    """The command line of a playbook run against the scenario's inventory."""
    return [str(PROJECT / ".venv/bin/ansible-playbook"), "-i", os.environ["MOLECULE_INVENTORY_FILE"],
            str(directory / name), *extra]


def playbook(name: str, *extra: str, directory: Path = PROJECT / "playbooks") -> subprocess.CompletedProcess[str]:
    cmd = playbook_argv(name, *extra, directory=directory)
    return subprocess.run(cmd, cwd=PROJECT, capture_output=True, text=True, timeout=900, check=False)


def module(host: str, name: str, args: dict[str, Any]) -> subprocess.Popen[str]:
    """Start one module run on a host with ansible (JSON output), as an operator or AWX would."""
    env = dict(os.environ, ANSIBLE_LOAD_CALLBACK_PLUGINS="1", ANSIBLE_STDOUT_CALLBACK="ansible.posix.json",
               ANSIBLE_CALLBACKS_ENABLED="ansible.posix.json,quantnova.grandmodel.warm_plugins", NO_COLOR="1")
    return subprocess.Popen([str(PROJECT / ".venv/bin/ansible"), host, "-i", os.environ["MOLECULE_INVENTORY_FILE"],
                             "-m", f"quantnova.grandmodel.{name}", "-a", json.dumps(args)],
                            cwd=PROJECT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def module_result(proc: subprocess.Popen[str], host: str) -> tuple[int, dict[str, Any]]:
    out, err = proc.communicate(timeout=300)
    try:
        result: dict[str, Any] = json.loads(out)["plays"][0]["tasks"][0]["hosts"][host]
    except (ValueError, KeyError, IndexError):
        pytest.fail(f"ansible printed no module result (rc {proc.returncode}):\n{out[-2000:]}\n{err[-2000:]}")
    return proc.returncode, result


def under_load(action: Callable[[], Any], seconds_after: float = 2.0) -> tuple[Any, Report, float]:
    """Run action() while the front door takes a steady load; return its result, the load and its time."""
    gen = LoadGenerator(port=28080, rate=RATE, workers=8, seconds=900, max_requests=200_000)
    gen.start()
    time.sleep(1.0)  # 40 answers from the live colour before the action starts
    started = time.monotonic()
    try:
        result = action()
    finally:
        elapsed = time.monotonic() - started
        time.sleep(seconds_after)
        report = gen.stop()
    return result, report, elapsed


def records(host: Any) -> list[dict[str, Any]]:
    text = host.check_output("cat /var/lib/grandmodel/deployments.jsonl 2>/dev/null || true")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def recap_changes(output: str) -> int:
    total = 0
    for line in output.splitlines():
        if " : ok=" in line and "changed=" in line:
            total += int(line.split("changed=")[1].split()[0])
    return total


# What podman says of a container (its init's PID, its address, its id), asked once per container: the watchers
# below poll every 20-50 ms, and a `podman inspect` each time cost a process start (some 0.1 s of CPU, over 1 s at
# load 13) per poll, a core taken from the release under test and a watcher that saw its moment late.
_INSPECTED: dict[tuple[str, str], str] = {}


def inspect(name: str, fmt: str) -> str:
    key = (name, fmt)
    if key not in _INSPECTED:
        _INSPECTED[key] = subprocess.run(["podman", "inspect", "-f", fmt, name], capture_output=True, text=True,
                                         check=True).stdout.strip()
    return _INSPECTED[key]


def container_pid(name: str) -> int:
    """The container's init PID on this machine, asked again only if that process is gone (a restarted container)."""
    pid = int(inspect(name, "{{.State.Pid}}"))
    if not Path(f"/proc/{pid}").exists():
        _INSPECTED.pop((name, "{{.State.Pid}}"), None)
        pid = int(inspect(name, "{{.State.Pid}}"))
    return pid


def container_ip(name: str) -> str:
    return inspect(name, "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}")


def lb_file(path: str) -> Path:
    """A file of the load balancer container, read from this machine (no exec on the way)."""
    return Path(f"/proc/{container_pid(LB)}/root{path}")


def colour_pids(color: str) -> list[int]:
    """Host PIDs of the processes of grandmodel-model@<color> in the app container (by their cgroup)."""
    scope = inspect(APP, "{{.Id}}")
    unit = f"grandmodel-model@{color}.service"
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cgroup = (entry / "cgroup").read_text()
        except OSError:
            continue
        if scope in cgroup and unit in cgroup:
            pids.append(int(entry.name))
    return pids


def signal_colour(color: str, signum: int) -> list[int]:
    pids = colour_pids(color)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
    return pids


def health_probes(color_port: int) -> float | None:
    """/health requests of the gates green's current process has answered (one per gate measurement).

    The gates mark their requests (X-GrandModel-Probe): the service counts them in its probe series.
    """
    try:
        with urllib.request.urlopen(f"http://{container_ip(APP)}:{color_port}/metrics", timeout=1) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    pattern = re.compile(r'^grandmodel_probe_requests_total\{[^}]*route="/health"[^}]*\}\s+(\S+)', re.MULTILINE)
    return sum(float(v) for v in pattern.findall(text))


def app(*cmd: str, check: bool = True) -> str:
    return subprocess.run(["podman", "exec", APP, *cmd], capture_output=True, text=True, check=check,
                          timeout=120).stdout


def green_url(path: str) -> str:
    return f"http://{container_ip(APP)}:8002{path}"


def wait_green_ready(timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(green_url("/ready"), timeout=2) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.3)
    return False


def admin(path: str) -> None:
    token = (Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "admin_token").read_text().strip()
    req = urllib.request.Request(green_url(path), method="POST", headers={"Authorization": f"Bearer {token}"})
    urllib.request.urlopen(req, timeout=5).read()


def start_green_soon() -> None:
    """Once a case's release is over: continue green and have systemd start it if the release stopped it, without
    waiting. Its start then overlaps the case's own checks; the next case's green_ready() finds it (nearly) ready.
    Traffic is on blue alone by then (every case ends there), so no client can reach green."""
    signal_colour("green", signal.SIGCONT)
    subprocess.Popen(["podman", "exec", APP, "systemctl", "start", "--no-block", "grandmodel-model@green"],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def green_ready(timeout: float = 180) -> None:
    """Bring green back for the next case: continue it, undo a drain, and wait until /ready answers 200.

    A colour killed by the last case is being restarted by systemd (Restart=on-failure) and is only
    waited for; green is (re)started by hand when the release stopped it, or when it is not ready
    within 45 s (the gate-probe
    trigger counts from the probes seen when a case starts, so a fresh process is not needed).
    """
    signal_colour("green", signal.SIGCONT)
    state = app("systemctl", "is-active", "grandmodel-model@green", check=False).strip()
    if state in ("active", "activating"):  # running, or being restarted by systemd after a kill
        with contextlib.suppress(OSError):
            admin("/admin/resume")
        if wait_green_ready(45):
            return
    app("systemctl", "restart", "grandmodel-model@green")
    if not wait_green_ready(timeout):
        raise AssertionError("green did not become ready again")


class Saboteur(threading.Thread):
    """Waits for a moment of the release (a gate measurement, the switch's journal) and acts at once.

    With `still`, asks right after acting whether the moment still held (the switch still in flight): a case can
    then say it missed its moment instead of failing on an outcome that belongs to a later one.
    """

    def __init__(self, trigger: Callable[[], bool], act: Callable[[], Any], timeout: float = 600,
                 still: Callable[[], bool] | None = None, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.trigger, self.act, self.timeout, self.still, self.interval = trigger, act, timeout, still, interval
        self.started_at = time.monotonic()
        self.seen_at: float | None = None
        self.fired_at: float | None = None
        self.held_after: bool | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        self.started_at = time.monotonic()
        deadline = self.started_at + self.timeout
        while not self.stop.is_set() and time.monotonic() < deadline:
            if self.trigger():
                self.seen_at = time.monotonic()
                self.act()
                self.fired_at = time.monotonic()
                if self.still is not None:
                    self.held_after = self.still()
                return
            time.sleep(self.interval)

    def timing(self) -> dict[str, Any]:
        def since_start(moment: float | None) -> float | None:
            return None if moment is None else round(moment - self.started_at, 3)
        return {"moment_seen_s": since_start(self.seen_at), "acted_s": since_start(self.fired_at),
                "moment_held_after_act": self.held_after}


def at_measurement(n: int) -> Callable[[], bool]:
    """True once green answered the /health probe of gate measurement n (pre-gate 1..5, post-gate 6..11).

    Counted from the probes green's process had answered at the first call (the case's start, before
    the playbook can probe); a process restarted meanwhile starts again from zero.
    """
    baseline: list[float] = []

    def trigger() -> bool:
        seen = health_probes(8002)
        if seen is None:
            return False
        if not baseline:
            baseline.append(seen)
        if seen < baseline[0]:  # a new process: its own count is the count of this case
            baseline[0] = 0.0
        return seen - baseline[0] >= n
    return trigger


def when_switch_in_flight() -> bool:
    """The traffic switch's journal exists on the load balancer: written once the new colour passed the switch's
    readiness pre-check, before nginx -t, the file's replacement and the reload, and removed only after the
    verification through the front door passed (or after the restore). A stat through /proc, no exec."""
    return lb_file(JOURNAL).exists()


def when_switching_to_green() -> bool:
    """The switch in flight is the release's switch to green (not a clean-up of a backup line to blue)."""
    try:
        return bool(json.loads(lb_file(JOURNAL).read_text()).get("color") == "green")
    except (OSError, ValueError):  # no journal (or, never seen, a torn read: the module renames it into place)
        return False


def kill_green() -> None:
    signal_colour("green", signal.SIGKILL)


def stop_green() -> None:
    signal_colour("green", signal.SIGSTOP)


def restart_green() -> None:
    subprocess.Popen(["podman", "exec", APP, "systemctl", "restart", "--no-block", "grandmodel-model@green"])


def drain_green() -> None:
    admin("/admin/drain?wait=false")


def assert_no_failed_request(summary: dict[str, Any]) -> None:
    """Zero failed requests, or at most one that nginx could not retry, for a reason stated here.

    nginx retries a request on the warm backup only while nothing of the answer has reached the
    client. Two moments escape that, and the scenario has seen each about once in a run of the
    matrix: a colour killed or stopped between writing a response's header and its body (the service
    writes them in two sends; nginx has already forwarded the header, the client gets an
    IncompleteRead), and a client reusing an idle keep-alive connection at the instant an nginx reload
    closes it (a reset before any answer). Neither is a 5xx; every other request must succeed.
    """
    statuses = {status: n for status, n in summary["by_status"].items() if status != "200"}
    assert all(status.startswith("error:") for status in statuses), summary
    assert summary["failed"] <= 1, summary


def summarise(case: str, report: Report, elapsed: float, **extra: Any) -> dict[str, Any]:
    summary = report.summary()
    RESULTS[case] = {"seconds": round(elapsed, 1), **extra, **summary}
    return summary


# -- the release flow -------------------------------------------------------------------------------

def test_initial_release_is_live_on_blue(host):
    assert front_color() == "blue"
    assert host.service("grandmodel-model@blue").is_running
    unit = host.file("/etc/systemd/system/grandmodel-model@.service")
    assert unit.contains("^NoNewPrivileges=yes") and unit.contains("^CapabilityBoundingSet=$")
    assert unit.contains("^ProtectSystem=strict")
    env = host.file("/etc/grandmodel/blue.env")
    assert env.user == "grandmodel" and env.mode == 0o400
    # The service runs unprivileged, with no capabilities at all.
    pid = host.check_output("systemctl show -p MainPID --value grandmodel-model@blue")
    status = host.check_output(f"cat /proc/{pid}/status")
    assert "CapEff:\t0000000000000000" in status
    assert host.check_output(f"stat -c %U /proc/{pid}") == "grandmodel"
    # The switch exported the live colour for node_exporter's textfile collector.
    assert 'grandmodel_traffic_active_color{color="blue",upstream="grandmodel_backend"} 1' in \
        lb_file(METRICS_FILE).read_text()


def test_good_release_switches_to_green_with_the_old_colour_as_backup(host):
    proc, report, elapsed = under_load(lambda: playbook("rollout.yml", "-e", "release_version=2026.11.1"))
    summary = summarise("a_good_release", report, elapsed, ended=front_color(),
                        outcome=records(host)[-1]["outcome"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert front_color() == "green"
    assert summary["color_sequence_settled"] == ["blue", "green"], summary
    assert summary["failed"] == 0, summary
    last = records(host)[-1]
    assert last["outcome"] == "success" and last["to_version"] == "2026.11.1" and last["from_color"] == "blue"
    assert last["evidence"]["post_promotion"]["verdict"] == "passed"
    assert last["evidence"]["post_promotion"]["last_measurement"] == "successful"
    assert last["evidence"]["post_promotion"]["error_rate"]["requests"] >= 20
    assert all("passed" in message for message in last["evidence"]["final_check"]), last["evidence"]
    # The old colour stays warm as nginx backup, with its retirement scheduled.
    upstream = lb_file(UPSTREAM).read_text()
    assert "# backup_color: blue" in upstream and "8001 backup;" in upstream
    assert host.service("grandmodel-model@blue").is_running
    assert host.run("systemctl is-active grandmodel-retire-blue.timer").stdout.strip() == "active"
    metrics = lb_file(METRICS_FILE).read_text()
    assert 'grandmodel_traffic_active_color{color="green",upstream="grandmodel_backend"} 1' in metrics
    assert 'grandmodel_traffic_backup_color{color="blue",upstream="grandmodel_backend"} 1' in metrics


def test_rerunning_the_live_release_changes_nothing(host):
    before = len(records(host))
    proc = playbook("rollout.yml", "-e", "release_version=2026.11.1")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "already live on green" in proc.stdout
    assert recap_changes(proc.stdout) == 0
    assert len(records(host)) == before
    assert front_color() == "green"


def test_rollback_returns_to_the_warm_colour_first_then_records(host):
    proc, report, elapsed = under_load(lambda: playbook("rollback.yml"))
    summary = summarise("d_rollback", report, elapsed, ended=front_color(), outcome=records(host)[-1]["outcome"])
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert front_color() == "blue"
    assert summary["color_sequence_settled"] == ["green", "blue"], summary
    assert summary["failed"] == 0, summary
    last = records(host)[-1]
    assert (last["outcome"], last["from_color"], last["to_color"]) == ("rolled_back", "green", "blue")
    assert (last["from_version"], last["to_version"]) == ("2026.11.1", "2026.11.0")
    assert host.run("systemctl is-active grandmodel-retire-blue.timer").stdout.strip() != "active"
    assert "backup" not in lb_file(UPSTREAM).read_text().split("upstream", 1)[1]


def test_emergency_switch_back_takes_seconds_with_zero_failed_requests(host):
    """switch_back.yml four times (blue -> green -> blue -> green -> blue): wall time of each run."""
    timings = []

    def toggles() -> list[tuple[int, float, str]]:
        runs = []
        for _ in range(4):
            started = time.monotonic()
            proc = playbook("switch_back.yml")
            runs.append((proc.returncode, round(time.monotonic() - started, 2), proc.stdout[-1500:]))
            timings.append(runs[-1][1])
        return runs

    runs, report, elapsed = under_load(toggles)
    summary = summarise("switch_back_x4", report, elapsed, ended=front_color(), wall_seconds=timings)
    assert [rc for rc, _s, _out in runs] == [0, 0, 0, 0], runs
    assert front_color() == "blue"
    assert summary["color_sequence_settled"] == ["blue", "green", "blue", "green", "blue"], summary
    assert summary["failed"] == 0, summary
    print(f"\nswitch_back.yml wall times: {timings} (load {os.getloadavg()[0]:.1f})")


def ee_playbook(name: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """ansible-playbook inside the execution environment (scripts/build_ee.py), as AWX runs a job.

    The image's own ansible-core, collections (quantnova.grandmodel included, installed from its
    tarball) and Python; the project checkout mounted read-only as AWX mounts a project; the hosts
    reached over SSH on the scenario's network by name, as unprivileged uid 1000 with a copy of the key.
    """
    image = f"localhost/grandmodel-ee:{EE_VERSION}"
    if subprocess.run(["podman", "image", "exists", image], check=False).returncode != 0:
        pytest.fail(f"the execution environment {image} is not built: run scripts/build_ee.py (a step of make test)")
    for name_ in (APP, LB, OPS):  # an SSH server listening on the network, as on a real host
        subprocess.run(["podman", "exec", name_, "sh", "-c", "mkdir -p /run/sshd && (pgrep -x sshd >/dev/null"
                        " || /usr/sbin/sshd -o ListenAddress=0.0.0.0)"], check=True, timeout=30)
    # What the job needs from this run, where uid 1000 can read it (molecule keeps its files under /root):
    # the inventory, the generated admin token its lookup reads, and the SSH key.
    ephemeral = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"])
    job = Path("/tmp/gm-mol-rollout-ee")
    job.mkdir(mode=0o700, exist_ok=True)
    inventory, key = job / "inventory.yml", job / "id_ed25519"
    inventory.write_bytes(Path(os.environ["MOLECULE_INVENTORY_FILE"]).read_bytes())
    (job / "admin_token").write_bytes((ephemeral / "admin_token").read_bytes())
    key.write_bytes((PROJECT / ".ansible/sandbox/id_ed25519").read_bytes())
    for path in (job, inventory, job / "admin_token", key):
        os.chown(path, 1000, 0)
    key.chmod(0o600)
    cmd = ["podman", "run", "--rm", "--network", "gm-mol-rollout", "--user", "1000:0",
           "-v", f"{PROJECT}:{PROJECT}:ro", "-v", f"{job}:{job}",
           "-e", f"MOLECULE_EPHEMERAL_DIRECTORY={job}", "-e", "ANSIBLE_NOCOLOR=1", "-e", "HOME=/runner",
           "-e", "ANSIBLE_LOCAL_TEMP=/tmp/ansible-local", "-e", "ANSIBLE_CACHE_PLUGIN_CONNECTION=/tmp/facts",
           # The image's collections (quantnova.grandmodel from its tarball), not the checkout's copy.
           "-e", "ANSIBLE_COLLECTIONS_PATH=/usr/share/ansible/collections",
           # A worktree may link build/ (the release bundles) elsewhere: mount where it points too.
           *(["-v", f"{(PROJECT / 'build').resolve()}:{(PROJECT / 'build').resolve()}:ro"]
             if (PROJECT / "build").is_symlink() else []),
           "-w", str(PROJECT), image,
           "ansible-playbook", "-i", str(inventory), f"playbooks/{name}",
           "-e", f"ansible_ssh_private_key_file={key}",
           "-e", "ansible_ssh_common_args='-o IdentitiesOnly=yes -o StrictHostKeyChecking=no"
           " -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o ControlMaster=auto -o ControlPersist=60s"
           " -o ControlPath=/tmp/ssh-%C'",
           *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)


# The scenario's gate settings (molecule.yml), given to the job as the weight steps are: its defaults would judge
# latency by production's 250 ms on two shared cores.
SCENARIO_GATES = {key: value for key, value in yaml.safe_load(
    (Path(__file__).resolve().parents[1] / "molecule.yml").read_text())["provisioner"]["inventory"]["group_vars"]["all"]
    .items() if key in ("rollout_pre_gate", "rollout_post_gate")}

EE_VERSION = re.search(r"^version:\s*(\S+)", (PROJECT / "ansible_collections/quantnova/grandmodel/galaxy.yml")
                       .read_text(), re.M).group(1)  # type: ignore[union-attr]


def test_a_release_a_switch_back_and_a_runbook_run_inside_the_execution_environment(host):
    """What AWX does with job templates: rollout.yml, switch_back.yml and the daily health runbook, inside the
    built image."""
    before = len(records(host))

    def jobs() -> list[subprocess.CompletedProcess[str]]:
        # The job gets the scenario's hosts file only (no group_vars), so the release is told to go all at once
        # as the scenario's other releases do; the weighted walk has its own tests (test_weighted_walk.py).
        release = ee_playbook("rollout.yml", "-e", "release_version=2026.11.1", "-e", "rollout_deploy=false",
                              "-e", json.dumps({"rollout_weight_steps": [100], **SCENARIO_GATES}))
        if release.returncode != 0:
            return [release]
        return [release, ee_playbook("switch_back.yml")]

    runs, report, elapsed = under_load(jobs)
    summary = summarise("execution_environment", report, elapsed, ended=front_color())
    for proc in runs:
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert len(runs) == 2
    new = records(host)[before:]
    assert [r["outcome"] for r in new][:1] == ["success"], new
    assert front_color() == "blue"
    assert summary["color_sequence_settled"] == ["blue", "green", "blue"], summary
    assert summary["failed"] == 0, summary
    # A runbook as its AWX template runs it: the collection's playbook through the project's wrapper, its report
    # written where the job may write (the project is mounted read-only, as AWX mounts it).
    reports = Path("/tmp/gm-mol-rollout-ee/reports")
    shutil.rmtree(reports, ignore_errors=True)  # an earlier run's reports
    # The ops host's Prometheus login: a host variable of the scenario, which the job's hosts file does not carry
    # (AWX would take it from the inventory's vault); given in a file of the job, never on the command line.
    login = Path("/tmp/gm-mol-rollout-ee/monitoring_login.json")
    password = (Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "secrets/monitoring_web_password").read_text()
    login.write_text(json.dumps({"monitoring_web_password": password.split()[0]}))
    login.chmod(0o600)
    os.chown(login, 1000, 0)
    health = ee_playbook("runbooks/daily_health.yml", "-e", json.dumps({"runbook_reports_dir": str(reports)}),
                         "-e", f"@{login}")
    assert health.returncode == 0, (health.stdout + health.stderr)[-3000:]
    (report,) = [json.loads(p.read_text()) for p in reports.glob("daily_health-*/report.json")]
    assert report["healthy"] is True and report["problems"] == [], report["problems"]
    assert report["front_doors"][LB]["live_color"] == "blue", report["front_doors"]


# -- the fault matrix: promote green (2026.11.1, already deployed) over blue -------------------------

PRE = {"start": 1, "middle": (PRE_COUNT + 1) // 2, "end": PRE_COUNT}
POST = {"start": PRE_COUNT + 1, "middle": PRE_COUNT + (POST_COUNT + 1) // 2, "end": PRE_COUNT + POST_COUNT}

# case: (trigger, action, expected outcome in the record, extra playbook arguments)
# A killed colour is restarted by systemd (Restart=on-failure) and is ready again some 10 s later; the
# switch's verification waits 5 s in that case so the restarted colour cannot win the race.
MATRIX: dict[str, tuple[Callable[[], bool], Callable[[], Any], str | tuple[str, ...], tuple[str, ...]]] = {
    "pre_gate_kill9_start": (at_measurement(PRE["start"]), kill_green, "aborted_pre_promotion", ()),
    "pre_gate_kill9_middle": (at_measurement(PRE["middle"]), kill_green, "aborted_pre_promotion", ()),
    # The last moment of the gate: the kill may land just before the last measurement ends (the gate
    # fails) or just after it passed, where the release sees green's process changed (systemd's MainPID
    # and InvocationID, read before the gate, after it and on each load balancer right before the
    # switch) or the switch's readiness pre-check finds the colour dead. A process systemd restarted
    # meanwhile is never promoted on the evidence of the killed one (once, under CI's load, it was).
    "pre_gate_kill9_end": (at_measurement(PRE["end"]), kill_green, ("aborted_pre_promotion", "aborted_switch"), ()),
    # The same with a restart that brings a ready process back within seconds: refused, never promoted.
    "pre_gate_restarted_end": (at_measurement(PRE["end"]), restart_green,
                               ("aborted_pre_promotion", "aborted_switch"), ()),
    # Killed the instant the switch's journal appears (polled every 5 ms): the switch is then testing, replacing,
    # reloading or verifying, never done. MOMENTS says whether it was still in flight right after the kill.
    "kill9_while_switching": (when_switching_to_green, kill_green, "aborted_switch",
                              ("-e", "rollout_switch_verify_timeout=5")),
    "post_gate_kill9_start": (at_measurement(POST["start"]), kill_green, "rolled_back_post_promotion", ()),
    "post_gate_kill9_middle": (at_measurement(POST["middle"]), kill_green, "rolled_back_post_promotion", ()),
    "post_gate_kill9_end": (at_measurement(POST["end"]), kill_green, "rolled_back_post_promotion", ()),
    "post_gate_hung_sigstop": (at_measurement(POST["middle"]), stop_green, "rolled_back_post_promotion", ()),
    "post_gate_service_restarted": (at_measurement(POST["middle"]), restart_green, "rolled_back_post_promotion",
                                    ()),
    "post_gate_drained": (at_measurement(POST["start"]), drain_green, "rolled_back_post_promotion", ()),
}


# Cases whose moment is short: (what must still hold right after the act, what that moment is, poll interval).
MOMENTS: dict[str, tuple[Callable[[], bool], str, float]] = {
    "kill9_while_switching": (when_switch_in_flight, "the switch to green still in flight (its journal on the "
                              "load balancer)", 0.005),
}


@pytest.mark.parametrize("case", list(MATRIX))
def test_fault_matrix(host, case):
    trigger, act, outcome, extra = MATRIX[case]
    still, moment, interval = MOMENTS.get(case, (None, "", 0.02))
    green_ready()
    assert front_color() == "blue"
    saboteur = Saboteur(trigger, act, still=still, interval=interval)
    before = len(records(host))

    def release() -> subprocess.CompletedProcess[str]:
        saboteur.start()
        try:
            return playbook("rollout.yml", "-e", "release_version=2026.11.1", "-e", "rollout_deploy=false", *extra)
        finally:
            saboteur.stop.set()
            start_green_soon()

    proc, report, elapsed = under_load(release)
    ended = front_color()
    new = records(host)[before:]
    summary = summarise(case, report, elapsed, ended=ended, outcome=[r["outcome"] for r in new],
                        fired=saboteur.fired_at is not None, **saboteur.timing())
    assert saboteur.fired_at is not None, f"the fault never fired: {proc.stdout[-3000:]}"
    if still is not None and not saboteur.held_after:
        pytest.fail(f"{case}: the fault missed its moment ({moment}): it was gone right after the act, so the "
                    f"release went on to a later phase (records: {[r['outcome'] for r in new]}); timing "
                    f"{saboteur.timing()}. A missed moment, not a wrong outcome of the release.")
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert ended == "blue"
    allowed = (outcome,) if isinstance(outcome, str) else outcome
    assert len(new) == 1 and new[0]["outcome"] in allowed, (new, proc.stdout[-3000:])
    assert_no_failed_request(summary)
    assert summary["color_sequence_settled"][-1] == "blue", summary
    # The live colour's metric says blue again; no switch was left in flight.
    assert 'grandmodel_traffic_active_color{color="blue",upstream="grandmodel_backend"} 1' in \
        lb_file(METRICS_FILE).read_text()
    assert not lb_file(JOURNAL).exists()


def test_fault_matrix_hung_colour_is_continued_and_green_recovers(host):
    green_ready()
    assert host.service("grandmodel-model@green").is_running


# -- faults of the switch itself ----------------------------------------------------------------------

def switch_args(color: str, **extra: Any) -> dict[str, Any]:
    args = {"state": "active", "color": color, "upstream_file": UPSTREAM,
            "backends": {"blue": [f"{APP}:8001"], "green": [f"{APP}:8002"]},
            "reload_command": ["systemctl", "reload", "nginx"], "verify_url": "http://127.0.0.1/version",
            "metrics_file": METRICS_FILE}
    args.update(extra)
    return args


def test_a_configuration_nginx_refuses_never_reaches_the_live_file(host):
    before = lb_file(UPSTREAM).read_bytes()
    inode = lb_file(UPSTREAM).stat().st_ino

    def bad_switch() -> tuple[int, dict[str, Any]]:
        args = switch_args("green", backends={"blue": [f"{APP}:8001"], "green": [f"{APP}:99999"]})
        return module_result(module(LB, "traffic_switch", args), LB)

    (rc, result), report, elapsed = under_load(bad_switch)
    summary = summarise("e_config_refused", report, elapsed, ended=front_color(), outcome="module failed")
    assert rc != 0
    assert "nginx configuration test" in result["msg"] and "99999" in result["msg"], result["msg"]
    assert "was never replaced" in result["msg"]
    assert lb_file(UPSTREAM).read_bytes() == before and lb_file(UPSTREAM).stat().st_ino == inode
    assert summary["failed"] == 0 and summary["color_sequence_settled"] == ["blue"], summary
    assert front_color() == "blue"


def test_a_switch_interrupted_while_verifying_restores(host):
    before = lb_file(UPSTREAM).read_bytes()

    times: dict[str, float] = {}

    def interrupted() -> tuple[int, dict[str, Any], str]:
        # A verify URL that only ever answers blue (blue's own port) keeps the switch verifying green
        # until it is interrupted, while the front door really serves green; the restore's own
        # verification of blue through the same URL then passes at once.
        started = time.monotonic()
        proc = module(LB, "traffic_switch", switch_args("green", verify_url=f"http://{APP}:8001/version",
                                                        verify_timeout=120))
        deadline = time.monotonic() + 120
        while not lb_file(JOURNAL).exists() or front_color() != "green":
            assert time.monotonic() < deadline and proc.poll() is None, "the switch never went live"
            time.sleep(0.1)
        times["live_after_s"] = round(time.monotonic() - started, 2)
        holder = lb_file(LOCK).read_text()  # "pid N since ...": the module's pid in the container
        pid = holder.split()[1]
        killed = time.monotonic()
        subprocess.run(["podman", "exec", LB, "kill", "-TERM", pid], check=True)
        rc, result = module_result(proc, LB)
        times["result_after_sigterm_s"] = round(time.monotonic() - killed, 2)
        return rc, result, holder

    (rc, result, _holder), report, elapsed = under_load(interrupted)
    summary = summarise("switch_interrupted_sigterm", report, elapsed, ended=front_color(),
                        outcome=result.get("interrupted"), **times)
    # An operator's cancel (AWX sends SIGTERM) restores at once, not when the verification would time out.
    assert times["result_after_sigterm_s"] < 20, (times, result.get("msg"))
    assert rc != 0 and result["interrupted"] == "SIGTERM" and result["phase"] == "verifying", result
    assert result["restored"] is True and "previous state restored" in result["msg"]
    assert result["restore_verification"]["verified"] is True, result["restore_verification"]
    assert lb_file(UPSTREAM).read_bytes() == before
    assert not lb_file(JOURNAL).exists()
    assert front_color() == "blue"
    assert summary["failed"] == 0 and summary["color_sequence_settled"][-1] == "blue", summary
    assert "green" in summary["color_sequence_settled"], summary  # traffic really was on green when interrupted


def test_two_switches_at_once_never_interleave(host):
    def concurrent() -> tuple[tuple[int, dict[str, Any]], tuple[int, dict[str, Any]]]:
        # The first holds the lock through a verification of 150 answers (8 s or more) while the second starts.
        first = module(LB, "traffic_switch", switch_args("green", verify_consecutive=150, verify_interval=0.05,
                                                         verify_timeout=60))
        deadline = time.monotonic() + 120
        while not lb_file(JOURNAL).exists():
            assert time.monotonic() < deadline and first.poll() is None, "the first switch never started"
            time.sleep(0.02)
        second = module(LB, "traffic_switch", switch_args("blue"))
        return module_result(first, LB), module_result(second, LB)

    ((rc1, one), (rc2, two)), report, elapsed = under_load(concurrent)
    summary = summarise("two_switches_at_once", report, elapsed, ended=front_color(),
                        outcome=[one.get("active_color"), two.get("active_color")],
                        second_waited_s=two.get("lock", {}).get("lock_waited_s"))
    assert (rc1, rc2) == (0, 0), (one.get("msg"), two.get("msg"))
    assert two["lock"]["lock_waited_s"] > 0.2, two["lock"]
    assert (one["active_color"], two["active_color"], two["previous_color"]) == ("green", "blue", "green")
    assert "# active_color: blue" in lb_file(UPSTREAM).read_text() and front_color() == "blue"
    state = json.loads(lb_file("/etc/nginx/grandmodel/.upstream.conf.state.json").read_text())
    assert (state["active"], state["previous"]) == ("blue", "green")
    assert summary["failed"] == 0 and summary["color_sequence_settled"] == ["blue", "green", "blue"], summary


def test_switch_back_to_a_stopped_colour_is_refused_and_restored(host):
    app("systemctl", "stop", "grandmodel-model@green")
    proc, report, elapsed = under_load(lambda: playbook("switch_back.yml"))
    summary = summarise("switch_back_to_stopped_colour", report, elapsed, ended=front_color(),
                        outcome="playbook failed" if proc.returncode else "switched")
    assert proc.returncode != 0
    # A failed task's message goes to stderr or stdout depending on the callback's settings.
    output = " ".join((proc.stdout + proc.stderr).split())
    assert "refusing to switch" in output and "not every server of green is ready" in output, output[-2000:]
    assert "which starts it first" in output
    assert front_color() == "blue"
    # Refused before the upstream was touched: no client was ever sent to the stopped colour.
    assert summary["failed"] == 0 and summary["color_sequence_settled"] == ["blue"], summary


def test_release_with_wrong_golden_answers_is_stopped_before_the_switch(host):
    proc, report, elapsed = under_load(lambda: playbook("rollout.yml", "-e", "release_version=2026.11.9-badgolden"))
    summary = summarise("b_bad_golden", report, elapsed, ended=front_color(), outcome=records(host)[-1]["outcome"])
    assert proc.returncode != 0
    assert "refused by the pre-promotion gate" in proc.stdout + proc.stderr
    assert summary["color_sequence_settled"] == ["blue"], summary
    assert summary["failed"] == 0, summary
    assert front_color() == "blue"
    last = records(host)[-1]
    assert last["outcome"] == "aborted_pre_promotion" and last["to_version"] == "2026.11.9-badgolden"
    assert not host.service("grandmodel-model@green").is_running


@pytest.fixture(scope="module", autouse=True)
def report_results():
    yield
    out = PROJECT / "reports" / "rollout-scenario.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(RESULTS, indent=2) + "\n")
    print("\nrollout scenario (case: ended on, record, failed/total, seconds):")
    for case, figures in RESULTS.items():
        print(f"  {case}: {figures.get('ended')}, {figures.get('outcome')}, "
              f"{figures.get('failed')}/{figures.get('requests')}, {figures.get('seconds')} s")
