#!/usr/bin/env python3
"""Write each role's README.md from its meta/argument_specs.yml, or check that they are current.

Galaxy's importer refuses a collection whose roles carry no README. The role's inputs already live,
validated, in meta/argument_specs.yml; the README's reference part is generated from them so that the
two never differ: edit the specs, then run `make readmes` (tests/test_role_readmes.py fails while a
README is stale). Text a person wrote outside the generated part (between BEGIN and END below) is kept;
a README without that part gets it appended.

    scripts/role_readmes.py            # write every roles/*/README.md
    scripts/role_readmes.py --check    # exit 1 and name the stale ones
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
ROLES = REPO / "ansible_collections" / "quantnova" / "grandmodel" / "roles"
FQCN = "quantnova.grandmodel"
BEGIN = ("<!-- BEGIN generated from meta/argument_specs.yml by scripts/role_readmes.py:"
         " edit the specs, then run `make readmes` -->")
END = "<!-- END generated -->"


def cell(text: Any) -> str:
    """One Markdown table cell: no line breaks, pipes escaped."""
    if isinstance(text, list):
        text = " ".join(str(line) for line in text)
    return " ".join(str(text).split()).replace("|", "\\|")


def default_of(spec: dict[str, Any]) -> str:
    if "default" not in spec:
        return ""
    value = spec["default"]
    if value is None:
        return "`null`"
    rendered = json.dumps(value) if not isinstance(value, str) else value
    if len(rendered) > 60:
        rendered = rendered[:57] + "..."
    return "`" + str(rendered).replace("|", "\\|").replace("`", "'") + "`"


def type_of(spec: dict[str, Any]) -> str:
    kind = str(spec.get("type", "str"))
    if kind == "list" and "elements" in spec:
        kind = f"list of {spec['elements']}"
    if "choices" in spec:
        kind += " (" + ", ".join(str(choice) for choice in spec["choices"]) + ")"
    return kind


def options_table(options: dict[str, Any]) -> list[str]:
    if not options:
        return ["No inputs.", ""]
    lines = ["| variable | type | default | description |", "| --- | --- | --- | --- |"]
    for name in sorted(options):
        spec = options[name] or {}
        required = " **required**" if spec.get("required") else ""
        lines.append(f"| `{name}`{required} | {cell(type_of(spec))} | {default_of(spec)} | "
                     f"{cell(spec.get('description', ''))} |")
    return [*lines, ""]


def render(role: str, specs: dict[str, Any], title: bool) -> str:
    main = specs.get("main", {})
    lines = [BEGIN, ""]
    if title:
        lines += [f"# {FQCN}.{role}", ""]
    lines += [cell(main.get("short_description", "")), ""]
    for paragraph in main.get("description", []) or []:
        lines += [cell(paragraph), ""]
    lines += ["## Use", "", "```yaml", f"- name: Apply {role}", "  hosts: all", "  roles:",
              f"    - role: {FQCN}.{role}", "```", ""]
    others = [name for name in specs if name != "main"]
    if others:
        lines += ["Other entry points (`ansible.builtin.include_role` with `tasks_from: <name>.yml`):", ""]
        lines += [f"- `{name}`: {cell(specs[name].get('short_description', ''))}" for name in others]
        lines.append("")
    for name in ["main", *others]:
        heading = "Inputs" if name == "main" else f"Inputs of `{name}`"
        lines += [f"## {heading}", "", *options_table(specs[name].get("options", {}) or {})]
    lines += ["Every input is validated before the role runs (`meta/argument_specs.yml`). The project's README"
              " and `docs/` explain how the roles fit together.", "", END]
    return "\n".join(lines) + "\n"


def merge(current: str | None, role: str, specs: dict[str, Any]) -> str:
    """The README with its generated part replaced (or appended after what a person wrote)."""
    if not current:
        return f"# {FQCN}.{role}\n\n" + render(role, specs, title=False)
    if BEGIN in current and END in current:
        head, rest = current.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        titled = not head.strip()
        return head + render(role, specs, title=titled) + (("\n" + tail) if tail else "")
    return current.rstrip("\n") + "\n\n" + render(role, specs, title=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a README is stale")
    args = parser.parse_args()
    stale = []
    for role_dir in sorted(path for path in ROLES.iterdir() if path.is_dir()):
        spec_file = role_dir / "meta" / "argument_specs.yml"
        if not spec_file.exists():
            stale.append(f"{role_dir.name}: no meta/argument_specs.yml to generate a README from")
            continue
        specs = (yaml.safe_load(spec_file.read_text()) or {}).get("argument_specs", {})
        readme = role_dir / "README.md"
        current = readme.read_text() if readme.exists() else None
        wanted = merge(current, role_dir.name, specs)
        if current == wanted:
            continue
        if args.check:
            stale.append(f"{role_dir.name}: README.md differs from meta/argument_specs.yml")
        else:
            readme.write_text(wanted)
            print(f"wrote {readme.relative_to(REPO)}")
    for line in stale:
        print(line, file=sys.stderr)
    if stale:
        print("run `make readmes` to regenerate them", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
