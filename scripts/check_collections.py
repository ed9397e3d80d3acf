#!/usr/bin/env python3
"""Fail when a collection named in requirements.yml is missing or older than required.

Galaxy is unreachable here and on trading networks: the collections must come from the pinned
`ansible` package (or the git-ignored .ansible/collections). This proves they do.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml
from ansible.module_utils.compat.version import LooseVersion

REPO = Path(__file__).resolve().parent.parent


def satisfies(installed: str, spec: str) -> bool:
    for clause in (c.strip() for c in spec.split(",") if c.strip() and c.strip() != "*"):
        for op in (">=", "<=", "==", "!=", ">", "<"):
            if clause.startswith(op):
                want = LooseVersion(clause[len(op):].strip())
                have = LooseVersion(installed)
                ok = {">=": have >= want, "<=": have <= want, "==": have == want,
                      "!=": have != want, ">": have > want, "<": have < want}[op]
                if not ok:
                    return False
                break
        else:
            if LooseVersion(installed) != LooseVersion(clause):
                return False
    return True


def installed_collections() -> dict[str, str]:
    proc = subprocess.run(
        [str(REPO / ".venv/bin/ansible-galaxy"), "collection", "list", "--format", "json"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )
    found: dict[str, str] = {}
    # Earlier paths win, as they do for Ansible itself; list order follows collections_path.
    for collections in json.loads(proc.stdout).values():
        for name, info in collections.items():
            found.setdefault(name, str(info.get("version", "*")))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requirements", type=Path, default=REPO / "requirements.yml")
    args = parser.parse_args(argv)
    wanted = yaml.safe_load(args.requirements.read_text())["collections"]
    have = installed_collections()
    problems = []
    for entry in wanted:
        name, spec = entry["name"], str(entry.get("version", "*"))
        if name not in have:
            problems.append(f"{name} ({spec}) is not installed")
        elif not satisfies(have[name], spec):
            problems.append(f"{name} {have[name]} does not satisfy {spec}")
    if problems:
        for p in problems:
            print(f"[collections] MISSING: {p}", file=sys.stderr)
        print("[collections] install the pinned `ansible` package (make setup) or place the "
              "collection under .ansible/collections", file=sys.stderr)
        return 1
    print(f"[collections] all {len(wanted)} collections of requirements.yml are installed: "
          + ", ".join(f"{e['name']} {have[e['name']]}" for e in wanted))
    return 0


if __name__ == "__main__":
    sys.exit(main())
