# -*- coding: utf-8 -*-
# Copyright: (c) 2026, GrandModel Ops
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: paths
short_description: Ensure several directories (owner, group, mode) and remove stale paths, in one module run
version_added: 0.2.0
description:
  - A role that needs five directories makes five runs of M(ansible.builtin.file) on every host, each about a
    quarter of a second of the host's CPU even when nothing changes. This module ensures all of them, and removes
    the paths a role no longer uses, in one run.
  - Each directory in O(directories) is created when missing (with its missing parents, which get the same
    owner, group and mode, as M(ansible.builtin.file) does) and its owner, group and mode are set when they
    differ. A path in the way that is not a directory is refused, never replaced.
  - Each path in O(absent) is removed when present (a directory with everything in it).
  - Entries are handled in the order given, directories first; the first failure stops the module and says
    which entry failed and why. What was done before it stays done.
author:
  - GrandModel Ops (@quantnova)
attributes:
  check_mode:
    support: full
    description: Reports what would be created, changed and removed, and touches nothing.
  diff_mode:
    support: full
    description: Shows, per path, the state and each attribute before and after.
  platform:
    support: full
    platforms: posix
    description: A POSIX host; owners and groups are names or numbers it knows.
options:
  directories:
    description: The directories that must exist.
    type: list
    elements: dict
    default: []
    suboptions:
      path:
        description: An absolute path.
        type: path
        required: true
      owner:
        description: The owner (name or number); left as it is when not given.
        type: str
      group:
        description: The group (name or number); left as it is when not given.
        type: str
      mode:
        description: The mode, as an octal string such as V("0750") or a symbolic mode; left as it is when not given.
        type: raw
      keep_existing:
        description:
          - With V(true), the owner, group and mode are set only when the directory is created; an existing one
            keeps its own (for a directory another role owns).
        type: bool
        default: false
  absent:
    description: Paths that must not exist (files, links or whole directories).
    type: list
    elements: path
    default: []
seealso:
  - module: ansible.builtin.file
"""

EXAMPLES = r"""
- name: Ensure the drop-in directories exist and the old script is gone
  quantnova.grandmodel.paths:
    directories:
      - {path: /etc/systemd/system/chrony.service.d, owner: root, group: root, mode: "0755"}
      - {path: /var/lib/grandmodel, owner: grandmodel, group: grandmodel, mode: "0750"}
    absent:
      - /usr/local/sbin/grandmodel-old-evaluator
"""

RETURN = r"""
created:
  description: The directories created (in check mode, that would be).
  returned: always
  type: list
  elements: str
  sample: [/var/lib/grandmodel]
updated:
  description: The existing directories whose owner, group or mode changed (or would).
  returned: always
  type: list
  elements: str
  sample: []
removed:
  description: The paths removed (or that would be).
  returned: always
  type: list
  elements: str
  sample: [/usr/local/sbin/grandmodel-old-evaluator]
"""

import os
import shutil
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.common.text.converters import to_bytes, to_native


def _file_args(module: AnsibleModule, entry: dict[str, Any], path: str) -> dict[str, Any]:
    """The attributes to set on path, as set_fs_attributes_if_different takes them."""
    return module.load_file_common_arguments(
        dict(owner=entry.get("owner"), group=entry.get("group"), mode=entry.get("mode")), path=path)


def _ensure_directory(module: AnsibleModule, entry: dict[str, Any], diffs: list[dict[str, Any]],
                      created: list[str], updated: list[str]) -> None:
    path = entry["path"]
    if not os.path.isabs(path):
        module.fail_json(msg=f"directory {path!r} is not an absolute path: give the full path")
    b_path = to_bytes(path, errors="surrogate_or_strict")
    if os.path.lexists(b_path) and not os.path.isdir(b_path):
        module.fail_json(msg=f"{path} exists and is not a directory: move it away first (nothing was replaced)")
    missing: list[str] = []
    current = path.rstrip("/") or "/"
    while not os.path.isdir(to_bytes(current, errors="surrogate_or_strict")):
        if os.path.lexists(to_bytes(current, errors="surrogate_or_strict")):
            module.fail_json(msg=f"{current}, a parent of {path}, exists and is not a directory: move it away first")
        missing.append(current)
        current = os.path.dirname(current)
    if missing:
        created.append(path)
        diffs.append(dict(before_header=path, after_header=path, before=dict(state="absent"),
                          after=dict(state="directory", **{k: entry[k] for k in ("owner", "group", "mode")
                                                           if entry.get(k) is not None})))
        if module.check_mode:
            return
        for directory in reversed(missing):
            try:
                os.mkdir(to_bytes(directory, errors="surrogate_or_strict"))  # the umask's default, then set
            except OSError as exc:
                module.fail_json(msg=f"could not create {directory} (for {path}): {to_native(exc)}")
            module.set_fs_attributes_if_different(_file_args(module, entry, directory), True, expand=False)
        return
    if entry["keep_existing"]:
        return
    attribute_diff: dict[str, Any] = dict(before={}, after={})
    if module.set_fs_attributes_if_different(_file_args(module, entry, path), False, diff=attribute_diff, expand=False):
        updated.append(path)
        attribute_diff["before_header"] = attribute_diff["after_header"] = path
        diffs.append(attribute_diff)


def _ensure_absent(module: AnsibleModule, path: str, diffs: list[dict[str, Any]], removed: list[str]) -> None:
    if not os.path.isabs(path) or os.path.normpath(path) == "/":
        module.fail_json(msg=f"absent path {path!r} must be an absolute path below /")
    b_path = to_bytes(path, errors="surrogate_or_strict")
    if not os.path.lexists(b_path):
        return
    kind = "directory" if os.path.isdir(b_path) and not os.path.islink(b_path) else "file"
    removed.append(path)
    diffs.append(dict(before_header=path, after_header=path, before=dict(state=kind), after=dict(state="absent")))
    if module.check_mode:
        return
    try:
        if kind == "directory":
            shutil.rmtree(b_path)
        else:
            os.unlink(b_path)
    except OSError as exc:
        module.fail_json(msg=f"could not remove {path}: {to_native(exc)}")


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            directories=dict(type="list", elements="dict", default=[], options=dict(
                path=dict(type="path", required=True),
                owner=dict(type="str"),
                group=dict(type="str"),
                mode=dict(type="raw"),
                keep_existing=dict(type="bool", default=False),
            )),
            absent=dict(type="list", elements="path", default=[]),
        ),
        supports_check_mode=True,
    )
    diffs: list[dict[str, Any]] = []
    created: list[str] = []
    updated: list[str] = []
    removed: list[str] = []
    for entry in module.params["directories"]:
        _ensure_directory(module, entry, diffs, created, updated)
    for path in module.params["absent"]:
        _ensure_absent(module, path, diffs, removed)
    result: dict[str, Any] = dict(changed=bool(created or updated or removed), created=created, updated=updated,
                                  removed=removed)
    if module._diff and diffs:
        result["diff"] = diffs
    module.exit_json(**result)


if __name__ == "__main__":
    main()
