#!/usr/bin/env python3
"""Build the execution environment (ee/execution-environment.yml) with podman and check what is inside.

  scripts/build_ee.py            build localhost/grandmodel-ee:<collection version> (layers cached)
  scripts/build_ee.py --check    only check an image that is already built

The context is prepared here: the collection tarball from `ansible-galaxy collection build` goes to
build/ee/collections/, then ansible-builder (from .venv-galaxy, which scripts/setup.sh installs)
writes the Containerfile and podman builds it from localhost/grandmodel-debian12. The checks run in
the image as AWX would run a job: ansible-runner, ansible-core, the collection with its modules'
documentation, the community collections the project uses and the Python libraries they import.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
COLLECTION = REPO / "ansible_collections" / "quantnova" / "grandmodel"
BUILD = REPO / "build" / "ee"
DEFINITION = REPO / "ee" / "execution-environment.yml"
BUILDER = REPO / ".venv-galaxy" / "bin" / "ansible-builder"
BASE_IMAGE = "localhost/grandmodel-debian12:latest"
# What ansible-builder's own stages install besides ee/requirements.txt (pinned like the rest).
BUILD_TOOLS = ["ansible-core==2.19.14", "ansible-runner==2.4.2", "bindep==2.14.0", "PyYAML==6.0.4",
               "packaging==26.4", "dumb-init==1.2.5", "pip", "setuptools", "wheel"]


def image_name() -> str:
    version = yaml.safe_load((COLLECTION / "galaxy.yml").read_text())["version"]
    return f"localhost/grandmodel-ee:{version}"


def log(text: str) -> None:
    print(f"[ee] {text}", flush=True)


def run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, text=True, capture_output=True, check=False, timeout=timeout)


def build(image: str) -> bool:
    if run(["podman", "image", "exists", BASE_IMAGE]).returncode != 0:
        log(f"ERROR: the base image {BASE_IMAGE} is missing: run `make setup` (scripts/sandbox.py prepare builds it)")
        return False
    collections = BUILD / "collections"
    shutil.rmtree(collections, ignore_errors=True)
    collections.mkdir(parents=True)
    built = run([str(REPO / ".venv" / "bin" / "ansible-galaxy"), "collection", "build", "--output-path",
                 str(collections), str(COLLECTION)])
    if built.returncode != 0:
        log(f"ERROR: ansible-galaxy collection build failed:\n{built.stdout}{built.stderr}")
        return False
    log(f"collection: {', '.join(p.name for p in collections.glob('*.tar.gz'))}")
    wheels = BUILD / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    fetched = run([str(REPO / ".venv" / "bin" / "pip"), "download", "-q", "--disable-pip-version-check",
                   "--only-binary", ":all:", "-d", str(wheels), "-r", str(REPO / "ee" / "requirements.txt"),
                   *BUILD_TOOLS], timeout=1200)
    if fetched.returncode != 0:
        log(f"ERROR: pip download of the image's wheels failed:\n{fetched.stdout}{fetched.stderr[-3000:]}")
        return False
    log(f"wheels: {len(list(wheels.glob('*.whl')))} in build/ee/wheels ({time.monotonic() - started:.0f}s)")
    started = time.monotonic()
    log(f"building {image} from {BASE_IMAGE} (ansible-builder + podman, offline; later builds reuse "
        "podman's layers)")
    with (BUILD / "build.log").open("w") as out:
        before = image_id(image)
        proc = subprocess.run([str(BUILDER), "build", "-f", str(DEFINITION), "-c", str(BUILD / "context"),
                               "-t", image, "--container-runtime", "podman", "-v", "2"],
                              stdout=out, stderr=subprocess.STDOUT, cwd=REPO, check=False, timeout=1800)
    took = time.monotonic() - started
    if proc.returncode != 0:
        lines = (BUILD / "build.log").read_text(errors="replace").splitlines()
        log(f"ERROR: the build failed after {took:.0f}s; the end of build/ee/build.log:\n" + "\n".join(lines[-40:]))
        return False
    size = run(["podman", "image", "inspect", "--format", "{{.Size}}", image]).stdout.strip()
    log(f"built {image} in {took:.0f}s ({int(size or 0) // 2**20} MiB)")
    if said := drop_replaced(before, image):
        log(said)
    return True


def image_id(image: str) -> str:
    proc = run(["podman", "image", "inspect", "--format", "{{.Id}}", image])
    return proc.stdout.strip() if proc.returncode == 0 else ""


def drop_replaced(before: str, image: str) -> str:
    """The image a build's tag moved away from (a GB or more each run) is removed, unless a container still uses
    it; what happened, or "" when the tag did not move (scripts/k8s_image_check.py uses it too)."""
    if not before or before == image_id(image):
        return ""
    gone = run(["podman", "rmi", before]).returncode == 0
    return f"the previous {image} ({before[:12]}) {'removed' if gone else 'kept: still in use'}"


CHECKS = [
    ("ansible-runner starts jobs (AWX's entry point)", ["ansible-runner", "--version"], "2.4"),
    ("ansible-core is the pinned one", ["ansible", "--version"], "core 2.19.14"),
    ("the collection is installed", ["ansible-galaxy", "collection", "list", "quantnova.grandmodel"],
     "quantnova.grandmodel"),
    ("its modules' documentation loads", ["ansible-doc", "-t", "module", "quantnova.grandmodel.traffic_switch"],
     "upstream_file"),
    ("the community collections it uses are there",
     ["ansible-galaxy", "collection", "list", "community.postgresql"], "community.postgresql"),
    ("the kubernetes client for kubernetes.core imports", ["python3", "-c", "import kubernetes; print('ok')"],
     "ok"),
    ("it runs as an unprivileged user like AWX's jobs", ["id", "-u"], "1000"),
]


def check(image: str) -> bool:
    ok = True
    for label, command, expected in CHECKS:
        proc = run(["podman", "run", "--rm", image, *command], timeout=120)
        passed = proc.returncode == 0 and expected in proc.stdout
        ok &= passed
        detail = "" if passed else f": exit {proc.returncode}, {(proc.stdout + proc.stderr).strip()[-300:]}"
        log(f"{'ok  ' if passed else 'FAIL'} {label}{detail}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check an image already built")
    args = parser.parse_args()
    image = image_name()
    if not args.check and not build(image):
        return 1
    return 0 if check(image) else 1


if __name__ == "__main__":
    sys.exit(main())
