# -*- coding: utf-8 -*-
# Copyright: (c) 2026, GrandModel Ops
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
name: warm_plugins
type: aggregate
short_description: Load the connection plugins once in the controller's main process, before the workers fork
version_added: 0.2.0
description:
  - Ansible forks a worker process for every host of every task. Each worker loads its connection plugin and, the
    first time a process does, parses the plugin's YAML documentation to learn its settings. The main process
    never loads a connection plugin itself, so every worker parses that documentation again. In a re-run of
    site.yml on the sandbox this parsing took 15% of the controller's CPU, on a controller that the two cores
    share with the hosts.
  - This callback loads the named connection plugins in the main process when the playbook starts. The workers
    inherit what it loaded when they fork, and skip the parsing. Before each task it also moves the main
    process's objects to the garbage collector's permanent generation (C(gc.freeze)), so a worker's collector does
    not touch, and copy, the memory it shares with the main process. It changes no setting, output or result.
  - Enable it in C(callbacks_enabled). A plugin that cannot be loaded is reported once as a warning and skipped.
requirements:
  - Enabled in the configuration (C(callbacks_enabled))
options:
  connections:
    description: The connection plugins to load, by name.
    type: list
    elements: str
    default: [ansible.builtin.ssh, ansible.builtin.local]
    ini:
      - section: callback_warm_plugins
        key: connections
    env:
      - name: GRANDMODEL_WARM_CONNECTIONS
"""

import gc
from typing import Any

from ansible.plugins.callback import CallbackBase
from ansible.plugins.loader import connection_loader


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "quantnova.grandmodel.warm_plugins"
    CALLBACK_NEEDS_ENABLED = True

    def v2_playbook_on_start(self, playbook: Any) -> None:
        for name in self.get_option("connections"):
            try:
                connection_loader.get(name, class_only=True)
            except Exception as exc:  # an optimisation must never stop a run
                self._display.warning(f"warm_plugins: could not load the connection plugin {name}: {exc}")

    def v2_playbook_on_task_start(self, task: Any, is_conditional: bool) -> None:
        # The workers for this task fork next. Objects moved to the permanent generation are not walked by a
        # worker's garbage collector, so it does not write to (and copy) the pages it shares with this process.
        gc.freeze()
