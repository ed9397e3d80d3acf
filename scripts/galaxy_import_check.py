#!/usr/bin/env python3
"""Build the collection as Galaxy would receive it and run Galaxy's own importer on the tarball.

galaxy-importer is the code Galaxy and Automation Hub run on every upload: it refuses a collection
without a README (the collection's and every role's), checks galaxy.yml, the changelog, the plugins'
documentation through ansible-doc and the tarball's layout. ansible-test sanity and ansible-lint are
their own steps of `make test`, so the importer runs here with those two turned off; everything else
it checks is on. Prints the importer's findings and exits non-zero when it refuses the collection.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COLLECTION = REPO / "ansible_collections" / "quantnova" / "grandmodel"
VENV_BIN = REPO / ".venv" / "bin"
GALAXY_BIN = REPO / ".venv-galaxy" / "bin"  # scripts/setup.sh installs requirements-galaxy.txt there
CONFIG = """[galaxy-importer]
RUN_ANSIBLE_TEST = False
RUN_ANSIBLE_LINT = False
RUN_FLAKE8 = True
CHECK_REQUIRED_TAGS = False
LOG_LEVEL_MAIN = INFO
"""


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="gm-galaxy-") as tmp:
        work = Path(tmp)
        build = subprocess.run([str(VENV_BIN / "ansible-galaxy"), "collection", "build", "--output-path",
                                str(work), str(COLLECTION)], capture_output=True, text=True, check=False)
        if build.returncode != 0:
            print(f"ansible-galaxy collection build failed:\n{build.stdout}{build.stderr}")
            return 1
        tarball = next(work.glob("*.tar.gz"))
        config = work / "galaxy-importer.cfg"
        config.write_text(CONFIG)
        env = dict(os.environ, GALAXY_IMPORTER_CONFIG=str(config),
                   PATH=f"{GALAXY_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        proc = subprocess.run([str(GALAXY_BIN / "python"), "-m", "galaxy_importer.main", "--print-result",
                               str(tarball)],
                              capture_output=True, text=True, env=env, check=False, timeout=900,
                              cwd=work)  # the importer leaves importer_result.json in its working directory
        output = proc.stdout + proc.stderr
        lines = [line for line in output.splitlines() if "Location 'file:" not in line]
        errors = [line for line in lines if line.startswith("ERROR")]
        # flake8's W503 (a line break before a binary operator) contradicts PEP 8's advice and ruff's
        # formatting; Galaxy shows such findings as warnings and imports the collection.
        warnings = [line for line in lines if line.startswith("WARNING")]
        print(f"galaxy-importer on {tarball.name} ({tarball.stat().st_size // 1024} KiB): "
              f"exit {proc.returncode}, {len(errors)} errors, {len(warnings)} warnings")
        for line in errors + warnings:
            print(f"  {line}")
        start = proc.stdout.find("\n{")
        if start >= 0:
            data = json.JSONDecoder().raw_decode(proc.stdout[start + 1:])[0]
            contents = data.get("contents", [])
            kinds: dict[str, int] = {}
            for item in contents:
                kinds[item.get("content_type", "?")] = kinds.get(item.get("content_type", "?"), 0) + 1
            print("imported: " + ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())))
            print(f"docs: {len(data.get('docs_blob', {}).get('contents', []))} content entries documented")
        if proc.returncode != 0 or errors:
            print(output[-3000:])
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
