# -*- coding: utf-8 -*-
# Copyright: (c) 2026, GrandModel Ops
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: managed_file
short_description: Write a rendered template or given content, with its owner and mode, in one module run
version_added: 0.2.0
description:
  - Sets a file's content, owner, group and mode in one run of one module on the host. M(ansible.builtin.template)
    and M(ansible.builtin.copy) with O(content) make two module runs when nothing changes (a checksum C(stat),
    then M(ansible.builtin.file) for the attributes) and three when the content changes (C(stat), a file
    transfer, then M(ansible.builtin.copy)). A configuration run that changes nothing is made of such tasks, so
    this halves its cost on the hosts.
  - With O(src), the action renders the template on the controller exactly as M(ansible.builtin.template) does
    with its defaults (the same search path, C(trim_blocks), the C(ansible_managed) and C(template_*)
    variables). With O(content), the text is written as given (a list or a dictionary as JSON, as
    M(ansible.builtin.copy) does).
  - A new content is written to a temporary file next to O(dest) that already has the wanted owner, group and
    mode (a secret is never readable by others, not even for a moment), checked by O(validate), then renamed
    over O(dest) in one step. A rejected content leaves O(dest) as it was.
  - The comparison is of the bytes themselves, so no checksum is computed on either side.
author:
  - GrandModel Ops (@quantnova)
extends_documentation_fragment:
  - ansible.builtin.files
attributes:
  check_mode:
    support: full
    description: Reports what would change (content and attributes) and changes nothing.
  diff_mode:
    support: full
    description: Shows the content before and after, and each attribute that changes.
  platform:
    support: full
    platforms: posix
    description: A POSIX host; the owner and group are names or numbers it knows.
options:
  dest:
    description:
      - The file to write. Its directory must exist; a directory or a symbolic link at O(dest) is refused.
    type: path
    required: true
  src:
    description:
      - A Jinja2 template, found like M(ansible.builtin.template) finds it (the role's C(templates) directory
        first). The action renders it and passes the text on as O(content).
      - Exactly one of O(src) and O(content) is given.
    type: str
  content:
    description:
      - The text the file must hold, exactly.
      - Exactly one of O(src) and O(content) is given.
    type: str
  validate:
    description:
      - A command that checks the new content before it replaces O(dest); C(%s) is the path of the candidate file
        (already with the wanted owner and mode). A non-zero exit fails the task and leaves O(dest) unchanged.
    type: str
  force:
    description:
      - With V(false), an existing O(dest) keeps its content (its owner, group and mode are still set).
    type: bool
    default: true
notes:
  - Options of M(ansible.builtin.template) beyond these (other Jinja2 delimiters, C(newline_sequence), C(backup),
    C(follow)) are not supported; use M(ansible.builtin.template) where they are needed.
seealso:
  - module: ansible.builtin.template
  - module: ansible.builtin.copy
"""

EXAMPLES = r"""
- name: Write the nginx configuration, checked before it is used
  quantnova.grandmodel.managed_file:
    src: nginx.conf.j2
    dest: /etc/nginx/nginx.conf
    owner: root
    group: root
    mode: "0644"
    validate: nginx -t -q -c %s

- name: Write a secret, never readable by others
  quantnova.grandmodel.managed_file:
    content: "{{ service_token }}\n"
    dest: /etc/grandmodel/token
    owner: root
    group: grandmodel
    mode: "0640"
  no_log: true
"""

RETURN = r"""
dest:
  description: The file written or checked.
  returned: always
  type: str
  sample: /etc/nginx/nginx.conf
content_changed:
  description: Whether the content differed (and, outside check mode, was replaced).
  returned: always
  type: bool
  sample: false
size:
  description: The size in bytes of the wanted content.
  returned: always
  type: int
  sample: 2048
"""

import errno
import grp
import os
import pwd
import re
import shlex
import tempfile

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.common.text.converters import to_bytes, to_native

_DIFF_LIMIT = 512 * 1024
_OCTAL_MODE = re.compile(r"^0?[0-7]{3,4}$")


def _numeric_mode(mode: object) -> int | None:
    """The mode as an integer when it is numeric; None for a symbolic mode (applied after the rename)."""
    if mode is None:
        return None
    if isinstance(mode, int):
        return mode
    text = str(mode)
    if _OCTAL_MODE.match(text):
        return int(text, 8)
    return None


def _account_id(module: AnsibleModule, kind: str, name: str | None, fallback: int) -> int:
    """The number of an owner (kind "user") or group (kind "group") given by name or number."""
    if name is None:
        return fallback
    if name.isdigit():
        return int(name)
    try:
        return pwd.getpwnam(name).pw_uid if kind == "user" else grp.getgrnam(name).gr_gid
    except KeyError:
        label = "owner" if kind == "user" else "group"
        module.fail_json(msg=f"{label} {name!r} for {module.params['dest']} does not exist on this host: "
                         f"create the {kind} first")
    raise AssertionError("unreachable")


def _text_for_diff(data: bytes | None) -> str:
    if data is None:
        return ""
    if len(data) > _DIFF_LIMIT:
        return f"[{len(data)} bytes, too long to show]\n"
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return f"[{len(data)} bytes, not UTF-8 text]\n"


def _write_candidate(module: AnsibleModule, dest: str, data: bytes, before_stat: os.stat_result | None) -> str:
    """A temporary file beside dest with the wanted content, owner, group and mode, synced to disk."""
    params = module.params
    mode = _numeric_mode(params["mode"])
    if mode is None:
        mode = before_stat.st_mode & 0o7777 if before_stat else 0o600
    uid = _account_id(module, "user", params["owner"], before_stat.st_uid if before_stat else -1)
    gid = _account_id(module, "group", params["group"], before_stat.st_gid if before_stat else -1)
    directory = os.path.dirname(dest) or "."
    fd, candidate = tempfile.mkstemp(prefix=f".{os.path.basename(dest)}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, mode)
        if uid != -1 or gid != -1:
            os.fchown(fd, uid, gid)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        os.unlink(candidate)
        module.fail_json(msg=f"could not write the new content of {dest} beside it ({candidate}): {to_native(exc)}")
    os.close(fd)
    return candidate


def _validate(module: AnsibleModule, dest: str, candidate: str) -> None:
    command = module.params["validate"]
    if "%s" not in command:
        os.unlink(candidate)
        module.fail_json(msg=f"validate must name the candidate file with %s, got {command!r}; {dest} is unchanged")
    rendered = command.replace("%s", shlex.quote(candidate))
    rc, out, err = module.run_command(rendered)
    if rc != 0:
        os.unlink(candidate)
        module.fail_json(
            msg=f"validate {command!r} rejected the new content of {dest} (exit {rc}); {dest} is unchanged",
            rc=rc, stdout=out, stderr=err,
        )


def _replace(module: AnsibleModule, dest: str, candidate: str) -> None:
    try:
        os.rename(candidate, dest)
    except OSError as exc:
        if exc.errno not in (errno.EBUSY, errno.EXDEV):
            os.unlink(candidate)
            module.fail_json(msg=f"could not rename the new content over {dest}: {to_native(exc)}")
        # A bind-mounted file (for example in a container) cannot be renamed over: atomic_move knows how
        # to fall back when unsafe_writes allows it.
        module.atomic_move(candidate, dest, unsafe_writes=module.params["unsafe_writes"])
        return
    directory = os.open(os.path.dirname(dest) or ".", os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            dest=dict(type="path", required=True),
            src=dict(type="str"),
            content=dict(type="str", no_log=False),
            validate=dict(type="str"),
            force=dict(type="bool", default=True),
        ),
        add_file_common_args=True,
        supports_check_mode=True,
    )
    params = module.params
    dest = params["dest"]
    if params["content"] is None:
        module.fail_json(
            msg=f"no content for {dest}: give content, or src (a template the quantnova.grandmodel.managed_file "
            "action renders); this module cannot render src on the host",
        )
    wanted = to_bytes(params["content"], errors="surrogate_or_strict")
    b_dest = to_bytes(dest, errors="surrogate_or_strict")
    directory = os.path.dirname(b_dest) or b"."
    if not os.path.isdir(directory):
        if module.check_mode:  # an earlier task of the run creates it (in check mode it only said it would)
            module.exit_json(changed=True, dest=dest, content_changed=True, size=len(wanted),
                             msg=f"the directory of {dest} does not exist yet: the file would be created in it")
        module.fail_json(msg=f"the directory of {dest} does not exist: create it before writing the file")
    if os.path.islink(b_dest):
        module.fail_json(msg=f"{dest} is a symbolic link: managed_file writes regular files only; remove the link or "
                         "use ansible.builtin.template with follow")
    if os.path.isdir(b_dest):
        module.fail_json(msg=f"{dest} is a directory: dest must name the file itself")

    before_stat: os.stat_result | None
    before: bytes | None
    try:
        before_stat = os.stat(b_dest)
        with open(b_dest, "rb") as handle:
            before = handle.read()
    except FileNotFoundError:
        before_stat, before = None, None
    except OSError as exc:
        module.fail_json(msg=f"could not read {dest} to compare it: {to_native(exc)}")

    content_changed = before is None or (before != wanted and params["force"])
    diffs: list[dict[str, object]] = []
    if content_changed and module._diff:
        diffs.append(dict(
            before_header=dest, after_header=dest,
            before=_text_for_diff(before), after=_text_for_diff(wanted),
        ))

    if content_changed and not module.check_mode:
        candidate = _write_candidate(module, dest, wanted, before_stat)
        if params["validate"]:
            _validate(module, dest, candidate)
        _replace(module, dest, candidate)

    changed = content_changed
    if before is not None or not module.check_mode:
        attribute_diff: dict[str, dict[str, object]] = dict(before={}, after={})
        file_args = module.load_file_common_arguments(params, path=dest)
        changed = module.set_fs_attributes_if_different(file_args, changed, diff=attribute_diff)
        if attribute_diff["before"] and module._diff:
            attribute_diff["before_header"] = attribute_diff["after_header"] = dest
            diffs.append(attribute_diff)

    result: dict[str, object] = dict(changed=changed, dest=dest, content_changed=content_changed, size=len(wanted))
    if diffs:
        result["diff"] = diffs
    module.exit_json(**result)


if __name__ == "__main__":
    main()
