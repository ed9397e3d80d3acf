#!/usr/bin/env python3
"""Build what a release ships to hosts: the offline wheelhouse and the model artifacts.

  build/wheelhouse/              grandmodel-service wheel + every dependency (torch CPU included),
                                 so app hosts install with no network (pip --no-index)
  build/wheelhouse.tar           the same wheels in one reproducible archive: the model_service
                                 role ships it in one transfer per host instead of file by file
  build/releases/<version>/      <model>.pt + <model>.manifest.json per model (sha256, golden samples)

Both are skipped when already built for the same inputs. Options:
  --version V        model release version (required for artifacts)
  --seed N           init seed for the exported weights (default 7)
  --corrupt-golden   write a manifest whose golden answers are wrong (to prove the gates refuse it)
  --hidden W / --depth D
                     a bigger model (trunk width W, D extra trunk layers): the same inputs and
                     outputs, slower (the release analysis's "slower than the live colour" case)
  --wheelhouse-only / --artifacts-only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "build"
WHEELHOUSE = BUILD / "wheelhouse"
ARCHIVE = BUILD / "wheelhouse.tar"
VENV_BIN = REPO / ".venv" / "bin"


def log(msg: str) -> None:
    print(f"[release] {msg}", flush=True)


def service_digest() -> str:
    h = hashlib.sha256()
    for path in sorted((REPO / "model_service").rglob("*")):
        rel = path.relative_to(REPO / "model_service").as_posix()
        if path.is_file() and not rel.startswith(("tests/", "bench/", "build/")) \
                and ".egg-info" not in rel and "__pycache__" not in rel \
                and path.suffix in (".py", ".toml", ".typed", ".md"):
            h.update(path.relative_to(REPO).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def build_wheelhouse() -> Path:
    digest = service_digest()
    stamp = WHEELHOUSE / ".digest"
    if stamp.exists() and stamp.read_text().strip() == digest:
        log(f"wheelhouse current ({digest}): {WHEELHOUSE}")
        if not ARCHIVE.exists():
            pack_wheelhouse()
        return WHEELHOUSE
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    for old in WHEELHOUSE.glob("grandmodel_service-*.whl"):
        old.unlink()
    log("building the offline wheelhouse (service + dependencies, torch CPU)")
    # setuptools reuses model_service/build/: files moved or deleted since would ship again.
    shutil.rmtree(REPO / "model_service" / "build", ignore_errors=True)
    started = time.monotonic()
    proc = subprocess.Popen([str(VENV_BIN / "pip"), "wheel", "--quiet", "--disable-pip-version-check",
                             "--wheel-dir", str(WHEELHOUSE), str(REPO / "model_service")])
    while True:
        try:
            proc.wait(timeout=30)
            break
        except subprocess.TimeoutExpired:
            log(f"... still building wheels ({time.monotonic() - started:.0f}s)")
    if proc.returncode != 0:
        raise SystemExit(f"[release] pip wheel failed with exit {proc.returncode}")
    stamp.write_text(digest + "\n")
    wheels = sorted(p.name for p in WHEELHOUSE.glob("*.whl"))
    pack_wheelhouse()
    log(f"wheelhouse ready: {len(wheels)} wheels")
    return WHEELHOUSE


def pack_wheelhouse() -> Path:
    """One archive of the wheels, byte-identical for the same wheels (sorted, fixed metadata),
    so the copy to a host is one transfer and is skipped when the host already has it."""
    partial = ARCHIVE.with_suffix(".tar.partial")
    with tarfile.open(partial, "w", format=tarfile.GNU_FORMAT) as tar:
        for wheel in sorted(WHEELHOUSE.glob("*.whl")):
            info = tar.gettarinfo(str(wheel), arcname=wheel.name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "root", "root"
            info.mode = 0o644
            with wheel.open("rb") as fh:
                tar.addfile(info, fh)
    partial.replace(ARCHIVE)
    log(f"packed {ARCHIVE.relative_to(REPO)} ({ARCHIVE.stat().st_size // 2**20} MiB)")
    return ARCHIVE


def build_artifacts(version: str, seed: int, corrupt_golden: bool, hidden: int | None = None,
                    depth: int = 0) -> Path:
    out = BUILD / "releases" / version
    # What the artifacts were built from, beside the release (its directory ships to the hosts as it is): a
    # release asked for with other parameters (a deeper model, another seed) is built again, never reused.
    stamp = BUILD / "release-params" / f"{version}.json"
    wanted = {"seed": seed, "hidden": hidden, "depth": depth, "corrupt_golden": corrupt_golden}
    manifests = sorted(out.glob("*.manifest.json"))
    if len(manifests) >= 2 and stamp.exists() and json.loads(stamp.read_text()) == wanted:
        log(f"artifacts for {version} exist: {out}")
        return out
    # Written beside the release and renamed over it when complete: a reader never sees half a release.
    partial = out.with_name(f".{version}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    sizes = (["--hidden", str(hidden)] if hidden else []) + (["--depth", str(depth)] if depth else [])
    subprocess.run([str(VENV_BIN / "grandmodel-export"), "--out", str(partial), "--version", version,
                    "--seed", str(seed), *sizes], check=True, stdout=subprocess.DEVNULL)
    if corrupt_golden:
        # The artifact is intact (sha256 matches) but its recorded answers are wrong: the
        # service must refuse to become ready and the pre-promotion gate must stop the release.
        path = partial / "strategic.manifest.json"
        data = json.loads(path.read_text())
        for sample in data["golden"]["samples"]:
            sample["probabilities"] = list(reversed(sample["probabilities"]))
            sample["value"] = sample["value"] + 0.5
        path.write_text(json.dumps(data, indent=2) + "\n")
    stamp.unlink(missing_ok=True)
    if out.exists():
        log(f"artifacts for {version} are built again (asked for {wanted})")
        old = out.with_name(f".{version}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.replace(old)
        partial.replace(out)
        shutil.rmtree(old)
    else:
        partial.replace(out)
    if corrupt_golden:
        log(f"artifacts for {version} written with WRONG golden answers (test release)")
    else:
        log(f"artifacts for {version} written: {out}")
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(wanted) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--corrupt-golden", action="store_true")
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--depth", type=int, default=0)
    parser.add_argument("--wheelhouse-only", action="store_true")
    parser.add_argument("--artifacts-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.artifacts_only:
        build_wheelhouse()
    if not args.wheelhouse_only:
        if not args.version:
            parser.error("--version is required to build artifacts")
        build_artifacts(args.version, args.seed, args.corrupt_golden, args.hidden, args.depth)
    return 0


if __name__ == "__main__":
    sys.exit(main())
