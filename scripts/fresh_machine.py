#!/usr/bin/env python3
"""Prove the two commands' install closure on a machine that has never seen the project.

A privileged container made from the project's own Debian 12 base image plays the fresh machine
(a root shell without systemd as PID 1, as on this kind of machine): it has Python but no podman,
iptables, debootstrap, nginx, virtualenv, SSH key, base image or podman network. Into it go the
repository's tracked files (or those of a git ref) and nothing else the project made; then, inside, as a newcomer would:

  1. apt-get install git make              (the README's only prerequisites)
  2. make setup                            (packages, podman config, key, image, doctor, .venv)
  3. scripts/sandbox.py create HOST        (a systemd host on the project network: nested podman)
  4. scripts/sandbox.py up -i tests/fresh/hosts.yml and an Ansible ping over SSH, when the tree
     has that inventory (the SSH path the sandbox uses)

What the fresh machine does share with this one is what every machine of this kind has: the
torch wheel in /opt/wheels, pip's configuration and the CA bundle (pip's HTTP cache is shared
only to save downloads). Exit status 0 only when every step passed; each step's time is printed.

  scripts/fresh_machine.py                 the working tree's tracked files
  scripts/fresh_machine.py --ref 5d49f50   an older commit (shows what failed before a fix)
  scripts/fresh_machine.py --keep          leave the container for inspection
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMAGE = os.environ.get("GM_SANDBOX_IMAGE", "localhost/grandmodel-debian12:latest")
NAME = "gm-fresh-machine"
WORKDIR = "/root/grandmodel-ops"
# What every machine of this kind carries, independent of the project.
MACHINE_MOUNTS = [("/opt/wheels", "/opt/wheels", "ro")]
MACHINE_FILES = ["/etc/pip.conf", "/etc/xdg/pip/pip.conf", "/etc/xdg/pip/constraints.txt",
                 "/root/.config/pip/pip.conf", "/etc/ssl/certs/ca-certificates.crt"]
MACHINE_ENV = ["PIP_DEFAULT_TIMEOUT", "PIP_FIND_LINKS", "PIP_CERT", "SSL_CERT_FILE",
               "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"]


def log(msg: str) -> None:
    print(f"[fresh] {msg}", flush=True)


def podman(*args: str, check: bool = True, capture: bool = False,
           stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["podman", *args], check=check, input=stdin,
                          stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.PIPE if capture else None)


def tracked_tree(ref: str | None) -> bytes:
    """A tar of the repository as a fresh clone would have it (tracked files only)."""
    if ref:
        return subprocess.run(["git", "archive", "--format=tar", ref], cwd=REPO, check=True,
                              capture_output=True).stdout
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.split(b"\0")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in filter(None, files):
            path = REPO / name.decode()
            if path.exists() or path.is_symlink():
                tar.add(path, arcname=name.decode(), recursive=False)
    return buf.getvalue()


def machine_files() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in MACHINE_FILES:
            if Path(name).is_file():
                tar.add(name, arcname=name.lstrip("/"))
    return buf.getvalue()


def start_machine() -> None:
    """The fresh machine: like this kind of machine, a root shell with no systemd as PID 1, so
    its podman uses the cgroupfs manager (a systemd PID 1 in a container cannot delegate cgroup
    v1 hierarchies to nested containers here: runc fails to mount /sys/fs/cgroup)."""
    podman("rm", "-f", "-v", "-t", "2", NAME, check=False, capture=True)
    args = ["run", "-d", "--name", NAME, "--hostname", NAME, "--privileged", "--cgroupns=host",
            # Nested container storage on a volume, not on this container's overlay root.
            "--volume", "/var/lib/containers"]
    for src, dst, mode in MACHINE_MOUNTS:
        if Path(src).exists():
            args += ["--volume", f"{src}:{dst}:{mode}"]
    cache = Path.home() / ".cache" / "pip"
    if cache.is_dir():
        args += ["--volume", f"{cache}:/root/.cache/pip"]
    podman(*args, IMAGE, "sleep", "infinity", capture=True)


def inside(command: str) -> int:
    env = [f"--env={k}={os.environ[k]}" for k in MACHINE_ENV if k in os.environ]
    return podman("exec", *env, "--workdir", WORKDIR, NAME, "bash", "-c", command,
                  check=False).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", help="git ref to test instead of the working tree")
    parser.add_argument("--keep", action="store_true", help="keep the container afterwards")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("[fresh] ERROR: run as root (rootful podman)", file=sys.stderr)
        return 1
    steps = [
        ("prerequisites (apt-get install git make)",
         "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq git make "
         ">/dev/null"),
        ("make setup", "make setup"),
        ("sandbox.py create gm-fresh-host (systemd host on the project network)",
         "python3 scripts/sandbox.py create gm-fresh-host"),
        ("sandbox.py up + ansible ping over SSH",
         "if [ -f tests/fresh/hosts.yml ]; then python3 scripts/sandbox.py up -i tests/fresh/hosts.yml"
         " && .venv/bin/ansible -i tests/fresh/hosts.yml all -m ansible.builtin.ping"
         " && .venv/bin/ansible -i tests/fresh/hosts.yml all -m ansible.builtin.command"
         " -a 'cat /proc/sys/net/ipv4/ip_forward'; "
         "else echo 'no tests/fresh/hosts.yml in this tree: step not applicable'; fi"),
    ]
    started = time.monotonic()
    results: list[tuple[str, bool, float]] = []
    try:
        log(f"starting the fresh machine {NAME} from {IMAGE}")
        start_machine()
        podman("exec", "-i", NAME, "tar", "-x", "-C", "/", stdin=machine_files())
        podman("exec", NAME, "mkdir", "-p", WORKDIR)
        podman("exec", "-i", NAME, "tar", "-x", "-C", WORKDIR, stdin=tracked_tree(args.ref))
        log(f"copied {'ref ' + args.ref if args.ref else 'the working tree'}'s tracked files "
            f"to {WORKDIR}; nothing else from this machine's project state")
        for what, command in steps:
            log(f"--- {what}")
            t0 = time.monotonic()
            ok = inside(command) == 0
            results.append((what, ok, time.monotonic() - t0))
            log(f"--- {what}: {'ok' if ok else 'FAILED'} in {results[-1][2]:.0f}s")
            if not ok:
                break
    finally:
        if not args.keep:
            podman("rm", "-f", "-v", "-t", "5", NAME, check=False, capture=True)
    print("\n=== fresh machine ===")
    for what, ok, seconds in results:
        print(f"  {'PASS' if ok else 'FAIL'}  {seconds:6.0f}s  {what}")
    failed = len(results) < len(steps) or not all(ok for _, ok, _ in results)
    print(f"fresh machine: {'FAILED' if failed else 'passed'} in {time.monotonic() - started:.0f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
