#!/usr/bin/env python3
"""Sandbox hosts for GrandModel Ops: systemd Debian 12 containers under podman.

Subcommands:
  prepare            install the Debian packages the project uses, configure podman, generate the
                     sandbox SSH key, build the base image, create the network
  doctor             prove this machine can run the suite (systemd host on the project network,
                     published loopback port, names resolved, IP forwarding for dockerd, SSH)
  image [--force]    build the base image (only when missing or its recipe changed)
  create NAME...     create (or recreate stale) named hosts; --publish 127.0.0.1:H:C per host
  up [-i INVENTORY]  create every host of an inventory (default: inventories/sandbox), open SSH to
                     each and write the SSH client configuration Ansible reaches them with
  destroy NAME...    remove named hosts
  down [-i INV]      remove every host of an inventory
  list               show sandbox hosts

Hosts are reached over SSH (key-only, root, pipelining and ControlPersist from ansible.cfg), as
production hosts are; `podman exec` is used only to bootstrap SSH (authorized key) on a new host.

Only the Python standard library is used: this runs before the project virtualenv exists.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMAGE = os.environ.get("GM_SANDBOX_IMAGE", "localhost/grandmodel-debian12:latest")
NETWORK = os.environ.get("GM_SANDBOX_NETWORK", "grandmodel-sandbox")
LABEL = "io.quantnova.grandmodel.sandbox"
MIRROR = os.environ.get("GM_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# Every Debian package the two commands (make demo, make test) use on this machine. iptables:
# netavark (podman's network backend) fails every `podman run --network` without it
# ("netavark: No such file or directory"); a fresh Debian 12 machine does not have it.
APT_PACKAGES = ["podman", "runc", "debootstrap", "uidmap", "netavark", "aardvark-dns", "iptables",
                "python3-venv", "python3-pip", "python3-dev", "gcc", "make", "git", "rsync",
                "curl", "ca-certificates", "openssh-client", "nginx", "util-linux"]
IMAGE_PACKAGES = ["python3", "python3-apt", "systemd", "systemd-sysv", "dbus", "iproute2",
                  "sudo", "ca-certificates", "procps", "curl", "gnupg", "less", "openssh-server"]
SSH_DIR = REPO / ".ansible" / "sandbox"
SSH_KEY = SSH_DIR / "id_ed25519"
# ansible.cfg's fact cache (fact_caching_connection): a recreated host has a new address, so the facts
# cached for its name are forgotten with it (else the next run within the cache timeout reads the old
# address: the firewall's probe of the new ruleset then dialled the previous host's address).
FACT_CACHE = REPO / ".ansible" / "facts"
SSH_CONFIG = SSH_DIR / "ssh_config"
# Each host makes its own SSH host keys at first boot (none are baked into the image).
SSH_UNIT_DROPIN = """\
# Managed by GrandModel Ops scripts/sandbox.py: host keys are made per host at first boot.
[Service]
ExecStartPre=
ExecStartPre=/usr/bin/ssh-keygen -A
ExecStartPre=/usr/sbin/sshd -t
"""
SSHD_DROPIN = """\
# Managed by GrandModel Ops scripts/sandbox.py: keys only, as on production hosts.
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UseDNS no
"""
CONTAINERS_CONF = Path("/etc/containers/containers.conf.d/50-grandmodel.conf")
CONTAINERS_CONF_TEXT = """\
# Managed by GrandModel Ops scripts/sandbox.py.
# crun 1.8 refuses this kernel's hybrid cgroup layout; runc works.
# Podman's default ulimits exceed what an unprivileged-in-VM root may raise.
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]

[engine]
runtime = "runc"
"""


class SandboxError(Exception):
    """A sandbox operation failed; the message says what to fix."""


def log(msg: str) -> None:
    print(f"[sandbox] {msg}", flush=True)


def run(cmd: list[str], *, check: bool = True, capture: bool = False,
        input_bytes: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(cmd, check=False, input=input_bytes,
                          stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.PIPE if capture else None)
    if check and proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip() if capture and proc.stderr else ""
        raise SandboxError(f"command failed ({proc.returncode}): {' '.join(cmd)}"
                           + (f"\n{err}" if err else ""))
    return proc


def run_with_heartbeat(cmd: list[str], what: str, every: float = 30.0) -> None:
    """Run a long, quiet command and say every `every` seconds that it is still working."""
    started = time.monotonic()
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errors)
        while True:
            try:
                proc.wait(timeout=every)
                break
            except subprocess.TimeoutExpired:
                log(f"... still {what} ({time.monotonic() - started:.0f}s)")
        if proc.returncode != 0:
            errors.seek(0)
            tail = errors.read().decode(errors="replace").strip()[-2000:]
            raise SandboxError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")


def require_root() -> None:
    if os.geteuid() != 0:
        raise SandboxError("sandbox hosts need root (rootful podman with systemd containers); "
                           "run this command as root, e.g. with sudo")


# What Debian's own container images do: dpkg does not fsync every file it unpacks (a throw-away
# sandbox or test host loses nothing if the machine crashes mid-install), and the documentation,
# manual pages and translations nobody reads on these hosts are not unpacked or fetched. An apt
# install in a sandbox or Molecule host then takes about a fifth less (PostgreSQL 15: 18 s -> 14 s).
DPKG_SPEEDUP = """# Written by scripts/sandbox.py (sandbox and test hosts only)
force-unsafe-io
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
"""
APT_SPEEDUP = """// Written by scripts/sandbox.py (sandbox and test hosts only)
Acquire::Languages "none";
"""


def require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise SandboxError(f"missing tool(s): {', '.join(missing)}; "
                           f"run 'scripts/sandbox.py prepare' (installs them with apt) first")


def recipe_digest() -> str:
    recipe = json.dumps({"packages": IMAGE_PACKAGES, "mirror": MIRROR, "v": 4,
                         "ssh": [SSH_UNIT_DROPIN, SSHD_DROPIN], "apt": [DPKG_SPEEDUP, APT_SPEEDUP]},
                        sort_keys=True)
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def prepare() -> None:
    require_root()
    missing = [p for p in APT_PACKAGES
               if run(["dpkg-query", "-W", "-f=${Status}", p], check=False, capture=True)
               .stdout.decode() != "install ok installed"]
    if missing:
        log(f"installing Debian packages: {' '.join(missing)}")
        env_prefix = ["env", "DEBIAN_FRONTEND=noninteractive"]
        run([*env_prefix, "apt-get", "update", "-qq"])
        run_with_heartbeat([*env_prefix, "apt-get", "install", "-y", "-qq",
                            "--no-install-recommends", *missing], "installing Debian packages")
    else:
        log("Debian packages present")
    configure_podman()
    ensure_ssh_key()
    build_image(force=False)
    ensure_network()


def ensure_ssh_key() -> None:
    """The key Ansible reaches sandbox hosts with: generated here, git-ignored, never shared."""
    if SSH_KEY.exists() and SSH_KEY.with_suffix(".pub").exists():
        return
    require_tools("ssh-keygen")
    SSH_DIR.mkdir(parents=True, exist_ok=True)
    SSH_DIR.chmod(0o700)
    SSH_KEY.unlink(missing_ok=True)
    SSH_KEY.with_suffix(".pub").unlink(missing_ok=True)
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "grandmodel-sandbox",
         "-f", str(SSH_KEY)], capture=True)
    log(f"generated the sandbox SSH key {SSH_KEY.relative_to(REPO)} (git-ignored)")


def configure_podman() -> None:
    CONTAINERS_CONF.parent.mkdir(parents=True, exist_ok=True)
    current = CONTAINERS_CONF.read_text() if CONTAINERS_CONF.exists() else None
    if current != CONTAINERS_CONF_TEXT:
        CONTAINERS_CONF.write_text(CONTAINERS_CONF_TEXT)
        log(f"wrote {CONTAINERS_CONF} (runtime runc, lowered default ulimits)")
    else:
        log("podman configuration in place")


def image_recipe() -> str | None:
    proc = run(["podman", "image", "inspect", IMAGE, "--format",
                "{{ index .Labels \"io.quantnova.grandmodel.recipe\" }}"], check=False, capture=True)
    return proc.stdout.decode().strip() if proc.returncode == 0 else None


def build_image(force: bool) -> None:
    require_root()
    require_tools("podman", "debootstrap")
    digest = recipe_digest()
    if not force and image_recipe() == digest:
        log(f"base image {IMAGE} is current (recipe {digest})")
        return
    log(f"building base image {IMAGE} with debootstrap (about a minute)")
    started = time.monotonic()
    # Not in /tmp: a tmpfs /tmp is often mounted nodev, and debootstrap must create device nodes
    # ("cannot create .../test-dev-null: Permission denied" inside a container).
    with tempfile.TemporaryDirectory(prefix="gm-rootfs-", dir="/var/tmp") as tmp:
        rootfs = Path(tmp) / "rootfs"
        run_with_heartbeat(["debootstrap", "--variant=minbase",
                            f"--include={','.join(IMAGE_PACKAGES)}", "bookworm", str(rootfs), MIRROR],
                           "building the base image with debootstrap")
        (rootfs / "etc/apt/sources.list").write_text(
            f"deb {MIRROR} bookworm main\ndeb {MIRROR} bookworm-updates main\n")
        # Each container gets its own machine-id at boot; no console gettys in containers.
        (rootfs / "etc/machine-id").write_text("")
        for unit in ("getty.target", "console-getty.service", "systemd-logind.service"):
            link = rootfs / "etc/systemd/system" / unit
            link.unlink(missing_ok=True)
            link.symlink_to("/dev/null")
        for key in (rootfs / "etc/ssh").glob("ssh_host_*"):
            key.unlink()
        dropin = rootfs / "etc/systemd/system/ssh.service.d/10-grandmodel-hostkeys.conf"
        dropin.parent.mkdir(parents=True, exist_ok=True)
        dropin.write_text(SSH_UNIT_DROPIN)
        (rootfs / "etc/ssh/sshd_config.d/10-grandmodel.conf").write_text(SSHD_DROPIN)
        (rootfs / "etc/dpkg/dpkg.cfg.d/10-grandmodel-sandbox").write_text(DPKG_SPEEDUP)
        (rootfs / "etc/apt/apt.conf.d/10-grandmodel-sandbox").write_text(APT_SPEEDUP)
        for cache in (rootfs / "var/cache/apt/archives").glob("*.deb"):
            cache.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imp = subprocess.run(
            ["podman", "import",
             "--change", 'CMD ["/sbin/init"]',
             "--change", "ENV container=podman",
             "--change", f"LABEL io.quantnova.grandmodel.recipe={digest}",
             "-", IMAGE],
            stdin=tar.stdout, capture_output=True, check=False)
        if tar.stdout is not None:
            tar.stdout.close()
        tar.wait()
        if imp.returncode != 0 or tar.returncode != 0:
            raise SandboxError(f"podman import of {rootfs} failed: {imp.stderr.decode().strip()}")
    log(f"built {IMAGE} in {time.monotonic() - started:.0f}s")


def ensure_network() -> None:
    if run(["podman", "network", "exists", NETWORK], check=False).returncode != 0:
        run(["podman", "network", "create", "--label", f"{LABEL}=1", NETWORK], capture=True)
        log(f"created podman network {NETWORK} (containers resolve each other by name)")


def container_state(name: str) -> str | None:
    proc = run(["podman", "container", "inspect", name, "--format", "{{.State.Status}}"],
               check=False, capture=True)
    return proc.stdout.decode().strip() if proc.returncode == 0 else None


def wait_for_systemd(name: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        proc = run(["podman", "exec", name, "systemctl", "is-system-running"],
                   check=False, capture=True)
        state = proc.stdout.decode().strip()
        if state in ("running", "degraded"):
            return
        time.sleep(0.5)
    raise SandboxError(f"host {name}: systemd did not reach 'running' within {timeout:.0f}s "
                       f"(last state: {state or 'unknown'}); see 'podman logs {name}'")


@dataclass
class HostSpec:
    """How one sandbox host is created: what it publishes, its capabilities, its sysctls."""

    name: str
    publish: list[str] = field(default_factory=list)
    caps: list[str] = field(default_factory=list)
    sysctls: dict[str, str] = field(default_factory=dict)

    def podman_args(self) -> list[str]:
        """podman run arguments, with a label naming their digest (a changed host is recreated)."""
        args = ["--hostname", self.name, "--network", NETWORK, "--systemd=always",
                "--label", f"{LABEL}=1"]
        for mapping in self.publish:
            args += ["--publish", mapping]
        for cap in self.caps:
            args += ["--cap-add", cap]
        # Namespaced sysctls can only be set when the namespace is made: /proc/sys is read-only
        # inside, and new namespaces start from kernel defaults here (devconf_inherit_init_net=0).
        for key, value in sorted(self.sysctls.items()):
            args += ["--sysctl", f"{key}={value}"]
        digest = hashlib.sha256(json.dumps([args, IMAGE, recipe_digest()]).encode()).hexdigest()
        return [*args, "--label", f"{LABEL}.spec={digest[:16]}"]


def container_spec(name: str) -> str:
    proc = run(["podman", "container", "inspect", name, "--format",
                f'{{{{ index .Config.Labels "{LABEL}.spec" }}}}'], check=False, capture=True)
    return proc.stdout.decode().strip() if proc.returncode == 0 else ""


def container_ip(name: str) -> str:
    proc = run(["podman", "container", "inspect", name, "--format",
                "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}"], capture=True)
    addresses = proc.stdout.decode().split()
    if not addresses:
        raise SandboxError(f"host {name} has no address on network {NETWORK}; "
                           f"recreate it with 'scripts/sandbox.py destroy {name}' and 'up'")
    return addresses[0]


def forget_facts(name: str) -> None:
    # ansible-core names a cache file after the host, behind a schema prefix in 2.19 ("s1_<host>").
    pattern = re.compile(rf"(s\d+_)?{re.escape(name)}")
    for path in FACT_CACHE.glob(f"*{name}"):
        if pattern.fullmatch(path.name):
            path.unlink(missing_ok=True)


def create(hosts: list[HostSpec]) -> None:
    require_root()
    require_tools("podman")
    if image_recipe() is None:
        raise SandboxError(f"base image {IMAGE} is missing; run 'scripts/sandbox.py prepare'")
    ensure_network()
    for host in hosts:
        spec = host.podman_args()
        want = spec[-1].split("=", 1)[1]
        state = container_state(host.name)
        if state == "running" and container_spec(host.name) == want:
            log(f"host {host.name} already running")
            continue
        if state is not None:
            why = "its definition changed" if state == "running" else f"it is stale ({state})"
            log(f"host {host.name}: {why}; recreating it")
            run(["podman", "rm", "-f", "-t", "5", host.name], capture=True)
        forget_facts(host.name)
        run(["podman", "run", "-d", "--name", host.name, *spec, IMAGE, "/sbin/init"], capture=True)
        wait_for_systemd(host.name)
        log(f"host {host.name} up" + (f" (published {', '.join(host.publish)})"
                                      if host.publish else ""))


def ssh_config_text(addresses: dict[str, str]) -> str:
    lines = ["# Written by scripts/sandbox.py up: how the controller reaches the sandbox hosts.",
             "# Addresses change when a host is recreated; 'up' rewrites this file."]
    for name, address in sorted(addresses.items()):
        lines += [f"Host {name}", f"  HostName {address}", "  User root",
                  f"  IdentityFile {SSH_KEY}", "  IdentitiesOnly yes",
                  "  StrictHostKeyChecking no", "  UserKnownHostsFile /dev/null",
                  "  LogLevel ERROR", "  ConnectTimeout 10", ""]
    return "\n".join(lines)


def open_ssh(names: list[str], timeout: float = 30.0) -> None:
    """Install the sandbox key on each host (through podman, once), start sshd, prove SSH works,
    and write the SSH client configuration that the inventory points Ansible at."""
    ensure_ssh_key()
    require_tools("ssh")
    pub = SSH_KEY.with_suffix(".pub").read_text().strip()
    addresses: dict[str, str] = {}
    for name in names:
        script = ("set -e; install -d -m 0700 /root/.ssh; f=/root/.ssh/authorized_keys; "
                  f"grep -qxF '{pub}' $f 2>/dev/null || echo '{pub}' >> $f; chmod 0600 $f; "
                  "systemctl is-active -q ssh || systemctl enable -q --now ssh")
        proc = run(["podman", "exec", name, "sh", "-c", script], check=False, capture=True)
        if proc.returncode != 0:
            raise SandboxError(f"host {name}: could not open SSH (authorized key, sshd): "
                               f"{proc.stderr.decode(errors='replace').strip()}; "
                               f"see 'podman exec {name} journalctl -u ssh'")
        addresses[name] = container_ip(name)
    SSH_DIR.mkdir(parents=True, exist_ok=True)
    merged = read_ssh_config() | addresses
    SSH_CONFIG.write_text(ssh_config_text(merged))
    for name in names:
        deadline = time.monotonic() + timeout
        while True:
            proc = run(["ssh", "-F", str(SSH_CONFIG), "-o", "BatchMode=yes", name, "true"],
                       check=False, capture=True)
            if proc.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise SandboxError(f"host {name}: SSH to {addresses[name]} failed: "
                                   f"{proc.stderr.decode(errors='replace').strip()}")
            time.sleep(0.5)
    log(f"SSH open to {', '.join(names)} (client configuration {SSH_CONFIG.relative_to(REPO)})")


def read_ssh_config() -> dict[str, str]:
    """Hosts already in the SSH client configuration (other inventories' hosts are kept)."""
    found: dict[str, str] = {}
    if not SSH_CONFIG.exists():
        return found
    current = ""
    for line in SSH_CONFIG.read_text().splitlines():
        words = line.split()
        if len(words) == 2 and words[0] == "Host":
            current = words[1]
        elif len(words) == 2 and words[0] == "HostName" and current:
            found[current] = words[1]
    return {n: a for n, a in found.items() if container_state(n) == "running"}


def destroy(names: list[str]) -> None:
    require_root()
    require_tools("podman")
    for name in names:
        if container_state(name) is None:
            log(f"host {name} absent")
            continue
        run(["podman", "rm", "-f", "-t", "5", name], capture=True)
        forget_facts(name)
        log(f"host {name} removed")


def inventory_hosts(inventory: str) -> list[HostSpec]:
    """The sandbox hosts of an inventory (sandbox_host: true; the container is named after the
    host unless sandbox_container says otherwise): container names,
    published ports, capabilities and namespaced sysctls from their host variables.

    Capabilities are added only where a host needs them (sandbox_capabilities): the Docker
    engine needs SYS_ADMIN, while with it systemd's PrivateUsers= fails (Debian's redis unit).
    """
    tool = REPO / ".venv/bin/ansible-inventory"
    if not tool.exists():
        raise SandboxError(f"{tool} is missing; run 'make setup' to create the project virtualenv")
    proc = run([str(tool), "-i", str(REPO / inventory), "--list"], capture=True)
    data = json.loads(proc.stdout)
    hostvars: dict[str, dict[str, object]] = data.get("_meta", {}).get("hostvars", {})
    hosts: list[HostSpec] = []
    for host, hv in sorted(hostvars.items()):
        if not hv.get("sandbox_host"):
            continue
        spec = HostSpec(str(hv.get("sandbox_container", host)))
        ports = hv.get("sandbox_publish", [])
        if isinstance(ports, list):
            spec.publish = [str(p) for p in ports]
        wanted = hv.get("sandbox_capabilities", [])
        if isinstance(wanted, list):
            spec.caps = [str(c) for c in wanted]
        sysctls = hv.get("sandbox_sysctls", {})
        if isinstance(sysctls, dict):
            spec.sysctls = {str(k): str(v) for k, v in sysctls.items()}
        hosts.append(spec)
    if not hosts:
        raise SandboxError(f"inventory {inventory} has no sandbox hosts (none has sandbox_host: true)")
    return hosts


def list_hosts() -> None:
    run(["podman", "ps", "-a", "--filter", f"label={LABEL}",
         "--format", "table {{.Names}}\t{{.Status}}\t{{.Ports}}"])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def doctor() -> None:
    """Prove what the suite needs, on two throw-away hosts; name the failing step and its fix."""
    require_root()
    require_tools("podman", "ssh", "curl")
    port = free_port()
    probe_a = HostSpec("gm-doctor-a", publish=[f"127.0.0.1:{port}:8080"],
                       caps=["SYS_ADMIN", "NET_ADMIN"], sysctls={"net.ipv4.ip_forward": "1"})
    probe_b = HostSpec("gm-doctor-b")
    names = [probe_a.name, probe_b.name]
    started = time.monotonic()
    checks: list[tuple[str, str]] = []

    def check(what: str, fix: str, ok: bool, detail: str = "") -> None:
        checks.append((what, "ok" if ok else "FAILED"))
        log(f"doctor: {what}: {'ok' if ok else 'FAILED'}" + (f" ({detail})" if detail else ""))
        if not ok:
            raise SandboxError(f"doctor: {what} failed{': ' + detail if detail else ''}. Fix: {fix}")

    try:
        try:
            create([probe_a, probe_b])
            check("systemd hosts on the project network", "run 'scripts/sandbox.py prepare' "
                  "(podman, runc, iptables for netavark, containers.conf)", True)
        except SandboxError as exc:
            check("systemd hosts on the project network", "run 'scripts/sandbox.py prepare' "
                  "(installs iptables, which netavark needs, runc and the podman configuration)",
                  False, str(exc).splitlines()[-1])
        run(["podman", "exec", "-d", probe_a.name, "python3", "-m", "http.server", "8080",
             "--directory", "/etc"], capture=True)
        deadline = time.monotonic() + 15
        out = b""
        while time.monotonic() < deadline:
            proc = run(["curl", "-sf", "-m", "2", f"http://127.0.0.1:{port}/os-release"],
                       check=False, capture=True)
            out = proc.stdout
            if b"bookworm" in out:
                break
            time.sleep(0.3)
        check(f"a published loopback port (127.0.0.1:{port}) reaches the host",
              "check that nothing else holds the port and that podman's port forwarding "
              "(netavark, iptables) works", b"bookworm" in out)
        proc = run(["podman", "exec", probe_b.name, "python3", "-c",
                    "import urllib.request as u; "
                    "print(u.urlopen('http://gm-doctor-a:8080/hostname', timeout=5).read())"],
                   check=False, capture=True)
        check("hosts resolve each other by name on the project network",
              "aardvark-dns must be installed (scripts/sandbox.py prepare)", proc.returncode == 0,
              proc.stderr.decode(errors="replace").strip()[-200:])
        proc = run(["podman", "exec", probe_a.name, "cat", "/proc/sys/net/ipv4/ip_forward"],
                   check=False, capture=True)
        check("IP forwarding on in a Docker host's namespace (dockerd needs it and cannot set it)",
              "set sandbox_sysctls: {net.ipv4.ip_forward: 1} on that host in the inventory",
              proc.stdout.strip() == b"1", f"ip_forward={proc.stdout.decode().strip()}")
        try:
            open_ssh(names)
            check("SSH with the sandbox key (how Ansible reaches the hosts)", "", True)
        except SandboxError as exc:
            check("SSH with the sandbox key (how Ansible reaches the hosts)",
                  "check the image's openssh-server ('scripts/sandbox.py image --force')",
                  False, str(exc))
    finally:
        destroy(names)
        remaining = {n: a for n, a in read_ssh_config().items() if n not in names}
        if SSH_CONFIG.exists():
            SSH_CONFIG.write_text(ssh_config_text(remaining))
    log(f"doctor: all {len(checks)} checks passed in {time.monotonic() - started:.0f}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare")
    sub.add_parser("doctor")
    img = sub.add_parser("image")
    img.add_argument("--force", action="store_true")
    cr = sub.add_parser("create")
    cr.add_argument("names", nargs="+")
    cr.add_argument("--publish", action="append", default=[],
                    help="127.0.0.1:HOSTPORT:PORT, applied to every named host")
    cr.add_argument("--sysctl", action="append", default=[],
                    help="KEY=VALUE namespaced sysctl, applied to every named host")
    de = sub.add_parser("destroy")
    de.add_argument("names", nargs="+")
    for verb in ("up", "down"):
        p = sub.add_parser(verb)
        p.add_argument("-i", "--inventory", default="inventories/sandbox")
    sub.add_parser("list")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "prepare":
            prepare()
        elif args.cmd == "doctor":
            doctor()
        elif args.cmd == "image":
            require_root()
            configure_podman()
            build_image(force=args.force)
        elif args.cmd == "create":
            sysctls = dict(item.split("=", 1) for item in args.sysctl)
            create([HostSpec(n, publish=list(args.publish), sysctls=sysctls) for n in args.names])
        elif args.cmd == "destroy":
            destroy(args.names)
        elif args.cmd == "up":
            hosts = inventory_hosts(args.inventory)
            create(hosts)
            open_ssh([h.name for h in hosts])
        elif args.cmd == "down":
            destroy([h.name for h in inventory_hosts(args.inventory)])
        elif args.cmd == "list":
            list_hosts()
    except SandboxError as exc:
        print(f"[sandbox] ERROR: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
