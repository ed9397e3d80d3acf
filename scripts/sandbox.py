#!/usr/bin/env python3
"""Sandbox hosts for GrandModel Ops: systemd Debian 12 containers under podman.

Subcommands:
  prepare            install podman/runc/debootstrap, configure podman, build the base image
  image [--force]    build the base image (only when missing or its recipe changed)
  create NAME...     create (or recreate stale) named hosts; --publish 127.0.0.1:H:C per host
  up [-i INVENTORY]  create every host of an inventory (default: inventories/sandbox)
  destroy NAME...    remove named hosts
  down [-i INV]      remove every host of an inventory
  list               show sandbox hosts

Only the Python standard library is used: this runs before the project virtualenv exists.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMAGE = os.environ.get("GM_SANDBOX_IMAGE", "localhost/grandmodel-debian12:latest")
NETWORK = os.environ.get("GM_SANDBOX_NETWORK", "grandmodel-sandbox")
LABEL = "io.quantnova.grandmodel.sandbox"
MIRROR = os.environ.get("GM_DEBIAN_MIRROR", "http://deb.debian.org/debian")
APT_PACKAGES = ["podman", "runc", "debootstrap", "uidmap", "netavark", "aardvark-dns",
                "python3-venv", "python3-pip", "make", "git", "rsync",
                "nginx"]
IMAGE_PACKAGES = ["python3", "python3-apt", "systemd", "systemd-sysv", "dbus", "iproute2",
                  "sudo", "ca-certificates", "procps", "curl", "gnupg", "less"]
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


def require_root() -> None:
    if os.geteuid() != 0:
        raise SandboxError("sandbox hosts need root (rootful podman with systemd containers); "
                           "run this command as root, e.g. with sudo")


def require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise SandboxError(f"missing tool(s): {', '.join(missing)}; "
                           f"run 'scripts/sandbox.py prepare' (installs them with apt) first")


def recipe_digest() -> str:
    recipe = json.dumps({"packages": IMAGE_PACKAGES, "mirror": MIRROR, "v": 2}, sort_keys=True)
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
        run([*env_prefix, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing])
    else:
        log("Debian packages present")
    configure_podman()
    build_image(force=False)
    ensure_network()


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
    with tempfile.TemporaryDirectory(prefix="gm-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        run(["debootstrap", "--variant=minbase", f"--include={','.join(IMAGE_PACKAGES)}",
             "bookworm", str(rootfs), MIRROR], capture=True)
        (rootfs / "etc/apt/sources.list").write_text(
            f"deb {MIRROR} bookworm main\ndeb {MIRROR} bookworm-updates main\n")
        # Each container gets its own machine-id at boot; no console gettys in containers.
        (rootfs / "etc/machine-id").write_text("")
        for unit in ("getty.target", "console-getty.service", "systemd-logind.service"):
            link = rootfs / "etc/systemd/system" / unit
            link.unlink(missing_ok=True)
            link.symlink_to("/dev/null")
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


def host_spec(name: str, publish: list[str], caps: list[str]) -> list[str]:
    """podman run arguments of a sandbox host, with a label naming their digest."""
    args = ["--hostname", name, "--network", NETWORK, "--systemd=always", "--label", f"{LABEL}=1"]
    for mapping in publish:
        args += ["--publish", mapping]
    for cap in caps:
        args += ["--cap-add", cap]
    digest = hashlib.sha256(json.dumps([args, IMAGE, recipe_digest()]).encode()).hexdigest()[:16]
    return [*args, "--label", f"{LABEL}.spec={digest}"]


def container_spec(name: str) -> str:
    proc = run(["podman", "container", "inspect", name, "--format",
                f'{{{{ index .Config.Labels "{LABEL}.spec" }}}}'], check=False, capture=True)
    return proc.stdout.decode().strip() if proc.returncode == 0 else ""


def create(names: list[str], publish: dict[str, list[str]],
           caps: dict[str, list[str]] | None = None) -> None:
    require_root()
    require_tools("podman")
    if image_recipe() is None:
        raise SandboxError(f"base image {IMAGE} is missing; run 'scripts/sandbox.py prepare'")
    ensure_network()
    for name in names:
        spec = host_spec(name, publish.get(name, []), (caps or {}).get(name, []))
        want = spec[-1].split("=", 1)[1]
        state = container_state(name)
        if state == "running" and container_spec(name) == want:
            log(f"host {name} already running")
            continue
        if state is not None:
            why = "its definition changed" if state == "running" else f"it is stale ({state})"
            log(f"host {name}: {why}; recreating it")
            run(["podman", "rm", "-f", "-t", "5", name], capture=True)
        run(["podman", "run", "-d", "--name", name, *spec, IMAGE, "/sbin/init"], capture=True)
        wait_for_systemd(name)
        log(f"host {name} up" + (f" (published {', '.join(publish[name])})"
                                 if publish.get(name) else ""))


def destroy(names: list[str]) -> None:
    require_root()
    require_tools("podman")
    for name in names:
        if container_state(name) is None:
            log(f"host {name} absent")
            continue
        run(["podman", "rm", "-f", "-t", "5", name], capture=True)
        log(f"host {name} removed")


def inventory_hosts(inventory: str) -> tuple[list[str], dict[str, list[str]], dict[str, list[str]]]:
    """Hosts reached with the podman connection: container names, published ports, capabilities.

    Capabilities are added only where a host needs them (sandbox_capabilities): the Docker
    engine needs SYS_ADMIN, while with it systemd's PrivateUsers= fails (Debian's redis unit).
    """
    tool = REPO / ".venv/bin/ansible-inventory"
    if not tool.exists():
        raise SandboxError(f"{tool} is missing; run 'make setup' to create the project virtualenv")
    proc = run([str(tool), "-i", str(REPO / inventory), "--list"], capture=True)
    data = json.loads(proc.stdout)
    hostvars: dict[str, dict[str, object]] = data.get("_meta", {}).get("hostvars", {})
    names: list[str] = []
    publish: dict[str, list[str]] = {}
    caps: dict[str, list[str]] = {}
    for host, hv in sorted(hostvars.items()):
        if hv.get("ansible_connection") != "containers.podman.podman":
            continue
        cname = str(hv.get("ansible_host", host))
        names.append(cname)
        ports = hv.get("sandbox_publish", [])
        if isinstance(ports, list):
            publish[cname] = [str(p) for p in ports]
        wanted = hv.get("sandbox_capabilities", [])
        if isinstance(wanted, list):
            caps[cname] = [str(c) for c in wanted]
    if not names:
        raise SandboxError(f"inventory {inventory} has no hosts with the podman connection")
    return names, publish, caps


def list_hosts() -> None:
    run(["podman", "ps", "-a", "--filter", f"label={LABEL}",
         "--format", "table {{.Names}}\t{{.Status}}\t{{.Ports}}"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare")
    img = sub.add_parser("image")
    img.add_argument("--force", action="store_true")
    cr = sub.add_parser("create")
    cr.add_argument("names", nargs="+")
    cr.add_argument("--publish", action="append", default=[],
                    help="127.0.0.1:HOSTPORT:PORT, applied to every named host")
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
        elif args.cmd == "image":
            require_root()
            configure_podman()
            build_image(force=args.force)
        elif args.cmd == "create":
            create(args.names, {n: args.publish for n in args.names})
        elif args.cmd == "destroy":
            destroy(args.names)
        elif args.cmd == "up":
            names, publish, caps = inventory_hosts(args.inventory)
            create(names, publish, caps)
        elif args.cmd == "down":
            names, _, _ = inventory_hosts(args.inventory)
            destroy(names)
        elif args.cmd == "list":
            list_hosts()
    except SandboxError as exc:
        print(f"[sandbox] ERROR: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
