# -*- coding: utf-8 -*-
# Copyright: (c) 2026, GrandModel Ops
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The controller side of quantnova.grandmodel.managed_file: render the template, then one module run."""

from __future__ import annotations

import json
import os
from typing import Any

from ansible.errors import AnsibleActionFail, AnsibleError
from ansible.module_utils.common.text.converters import to_text
from ansible.plugins.action import ActionBase
from ansible.template import generate_ansible_template_vars, trust_as_template

_MODULE = "quantnova.grandmodel.managed_file"
# The options of ansible.builtin.template that change how it renders; managed_file renders with their defaults
# only, so a task that sets one is refused rather than rendered differently.
_RENDER_OPTIONS = (
    "newline_sequence", "block_start_string", "block_end_string", "variable_start_string",
    "variable_end_string", "comment_start_string", "comment_end_string", "trim_blocks", "lstrip_blocks",
    "output_encoding", "follow", "backup",
)


class ActionModule(ActionBase):
    TRANSFERS_FILES = False

    def _render(self, src: str, dest: str, task_vars: dict[str, Any]) -> str:
        """The template rendered as ansible.builtin.template renders it with its default options."""
        try:
            source = self._find_needle("templates", src)
        except AnsibleError as exc:
            raise AnsibleActionFail(f"template {src!r} for {dest} not found: {to_text(exc)}") from exc
        template_data = trust_as_template(self._loader.get_text_file_contents(source))
        searchpath = list(task_vars.get("ansible_search_path", []))
        searchpath.extend([self._loader.get_basedir(), os.path.dirname(source)])
        searchpath = [entry for path in searchpath for entry in (os.path.join(path, "templates"), path)]
        template_vars = dict(task_vars)
        generated = generate_ansible_template_vars(path=src, fullpath=source, dest_path=dest)
        if "ansible_managed" in template_vars:
            generated.pop("ansible_managed", None)
        template_vars.update(generated)
        templar = self._templar.copy_with_new_env(searchpath=searchpath, available_variables=template_vars)
        rendered = templar.template(
            template_data, escape_backslashes=False,
            overrides=dict(trim_blocks=True, lstrip_blocks=False, newline_sequence="\n"),
        )
        return "" if rendered is None else str(rendered)

    def run(self, tmp: Any = None, task_vars: dict[str, Any] | None = None) -> dict[str, Any]:
        task_vars = task_vars or {}
        result = super().run(tmp, task_vars)
        del tmp
        args = dict(self._task.args)
        dest = args.get("dest")
        src = args.pop("src", None)
        refused = sorted(set(args) & set(_RENDER_OPTIONS))
        try:
            if not dest:
                raise AnsibleActionFail("managed_file needs dest, the file to write")
            if refused:
                raise AnsibleActionFail(
                    f"managed_file for {dest} does not support {', '.join(refused)}: use ansible.builtin.template")
            if (src is None) == (args.get("content") is None):
                raise AnsibleActionFail(
                    f"managed_file for {dest} needs exactly one of src (a template) and content (the text)")
            if src is not None:
                args["content"] = self._render(str(src), str(dest), task_vars)
            elif isinstance(args["content"], (dict, list)):
                args["content"] = json.dumps(args["content"])
            result.update(self._execute_module(module_name=_MODULE, module_args=args, task_vars=task_vars))
        finally:
            self._remove_tmp_path(self._connection._shell.tmpdir)
        return result
