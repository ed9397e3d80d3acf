#!/usr/bin/env python3
"""Build the k8s_workloads service image and run tests/test_k8s_image.py against it (a `make test` step).

The image comes from roles/k8s_workloads/files/Containerfile with build/ as its context: the offline
wheelhouse and release 2026.11.1 (built here if missing, as the rollout scenario builds it). podman
reuses its layers when the wheelhouse and the release are unchanged, so later runs take seconds. The
test then runs the image the way the rendered Deployment runs it; GM_REQUIRE_K8S_IMAGE=1 turns the
file's "image missing" skip into a failure, so this step can never pass by skipping.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from build_ee import drop_replaced, image_id

REPO = Path(__file__).resolve().parent.parent
PY = REPO / ".venv" / "bin" / "python"
RELEASE = "2026.11.1"
IMAGE = f"localhost/grandmodel-service:{RELEASE}"
BASE = "localhost/grandmodel-debian12:latest"
CONTAINERFILE = REPO / "ansible_collections/quantnova/grandmodel/roles/k8s_workloads/files/Containerfile"


def log(text: str) -> None:
    print(f"[k8s-image] {text}", flush=True)


def main() -> int:
    if subprocess.run(["podman", "image", "exists", BASE], check=False).returncode != 0:
        log(f"ERROR: the base image {BASE} is missing: run `make setup` (scripts/sandbox.py prepare builds it)")
        return 1
    if not (REPO / "build" / "releases" / RELEASE).is_dir() or not (REPO / "build" / "wheelhouse").is_dir():
        log(f"building release {RELEASE} and the wheelhouse (scripts/build_release.py)")
        built = subprocess.run([str(PY), "scripts/build_release.py", "--version", RELEASE, "--seed", "8"],
                               cwd=REPO, check=False)
        if built.returncode != 0:
            log("ERROR: scripts/build_release.py failed (output above)")
            return 1
    started = time.monotonic()
    log(f"building {IMAGE} from {BASE} (podman reuses unchanged layers)")
    before = image_id(IMAGE)
    with (REPO / "reports").joinpath("k8s-image-build.log").open("w") as out:
        proc = subprocess.run(["podman", "build", "-f", str(CONTAINERFILE), "--build-arg", f"BASE={BASE}",
                               "--build-arg", f"RELEASE={RELEASE}", "-t", IMAGE, str(REPO / "build")],
                              stdout=out, stderr=subprocess.STDOUT, check=False, timeout=1800)
    if proc.returncode != 0:
        log(f"ERROR: podman build exited {proc.returncode}: see reports/k8s-image-build.log")
        return 1
    log(f"image ready in {time.monotonic() - started:.0f}s")
    if said := drop_replaced(before, IMAGE):
        log(said)
    env = dict(os.environ, GM_REQUIRE_K8S_IMAGE="1")
    return subprocess.run([str(PY), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_k8s_image.py"],
                          cwd=REPO, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
