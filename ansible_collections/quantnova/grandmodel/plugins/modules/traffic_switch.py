# -*- coding: utf-8 -*-
# Copyright: (c) 2025, GrandModel Ops
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: traffic_switch
short_description: Read or atomically switch the live colour of a blue-green service
version_added: 0.1.0
description:
  - Reads which colour (V(blue) or V(green)) the front door sends traffic to, or switches it.
  - With O(backend=nginx) the colour lives in an upstream file included by nginx. A switch writes the new file
    to a hidden temporary file in the same directory (so an C(include dir/*.conf) glob never sees it), keeps a copy
    of the current file as C(.<name>.previous), moves the new file into place with an atomic rename, runs
    C(nginx -t), reloads nginx gracefully and then proves through O(verify_url) that the new colour answers
    O(verify_consecutive) times in a row.
  - If the configuration test, the reload or the verification fails, the previous file is put back (and nginx
    reloaded again if a reload had happened) and the module fails with what was attempted, on what and why,
    including the output of C(nginx -t).
  - Requesting the colour that is already active with an identical upstream file changes nothing.
  - After a verified switch a small JSON record C({active, previous, switched_at}) is written to O(state_file).
  - Haproxy and Kubernetes backends are planned; the choice exists so playbooks name the backend today.
author:
  - GrandModel Ops (@quantnova)
attributes:
  check_mode:
    support: full
    description: Computes the switch and reports the diff; writes nothing and reloads nothing.
  diff_mode:
    support: full
    description: Returns the upstream file before and after.
  platform:
    support: full
    platforms: posix
    description: The host running nginx (the module writes its upstream file and runs C(nginx -t)).
options:
  backend:
    description: How the front door is steered.
    type: str
    choices: [nginx]
    default: nginx
  state:
    description:
      - V(active) makes O(color) the live colour.
      - V(query) only reads the live colour and changes nothing.
    type: str
    choices: [active, query]
    default: active
  color:
    description: The colour to make live. Required with O(state=active).
    type: str
    choices: [blue, green]
  upstream_file:
    description:
      - The nginx upstream file that holds the live colour, for example C(/etc/nginx/conf.d/grandmodel_upstream.conf).
      - "Its first lines carry C(# active_color: <colour>), which is how the live colour is read back."
    type: path
    required: true
  upstream_name:
    description: Name of the nginx C(upstream) block, referenced by C(proxy_pass http://<name>) in the site.
    type: str
    default: grandmodel_backend
  backends:
    description:
      - Addresses (C(host:port)) of each colour's service processes, keyed by colour.
      - Required with O(state=active); the entry for O(color) must list at least one address.
    type: dict
  keepalive:
    description: Idle keepalive connections nginx keeps to the upstream; V(0) leaves the directive out.
    type: int
    default: 32
  nginx_binary:
    description: The nginx executable used for C(nginx -t) and the default reload.
    type: path
    default: nginx
  nginx_config:
    description: The main nginx configuration file that includes O(upstream_file), passed as C(-c).
    type: path
    default: /etc/nginx/nginx.conf
  nginx_prefix:
    description: nginx prefix path passed as C(-p), for an nginx not running from its compiled-in prefix.
    type: path
  reload_command:
    description:
      - Command (argument list) that reloads nginx gracefully, for example V([systemctl, reload, nginx]).
      - Defaults to C(<nginx_binary> [-p <nginx_prefix>] -c <nginx_config> -s reload).
    type: list
    elements: str
  verify_url:
    description:
      - URL through the front door that answers JSON with a C(color) field, for example C(https://127.0.0.1/version).
      - Empty skips the verification (RV(verified) is then V(false)).
    type: str
    default: ""
  verify_validate_certs:
    description: Verify the TLS certificate of O(verify_url).
    type: bool
    default: true
  verify_timeout:
    description: Seconds to wait for the new colour to answer O(verify_consecutive) times in a row.
    type: float
    default: 10.0
  verify_consecutive:
    description: Consecutive answers from the new colour needed; old nginx workers may answer for a moment.
    type: int
    default: 3
  verify_interval:
    description: Seconds between verification requests.
    type: float
    default: 0.1
  state_file:
    description:
      - JSON record of the live and the previous colour, written after each verified switch.
      - Defaults to C(.<upstream file name>.state.json) beside O(upstream_file) (hidden, so include globs skip it).
    type: path
notes:
  - The C(include) that pulls O(upstream_file) into nginx should use a glob such as C(conf.d/*.conf) or C(dir/*);
    the temporary, backup and state files are dot-files, which such globs never match.
seealso:
  - module: quantnova.grandmodel.health_gate
"""

EXAMPLES = r"""
- name: Ensure green serves the trading desk's predictions
  quantnova.grandmodel.traffic_switch:
    color: green
    upstream_file: /etc/nginx/conf.d/grandmodel_upstream.conf
    backends:
      blue: ["127.0.0.1:8001"]
      green: ["127.0.0.1:8002"]
    reload_command: [systemctl, reload, nginx]
    verify_url: https://127.0.0.1/version
    verify_validate_certs: false
  register: __rollout_switch

- name: Read which colour is live
  quantnova.grandmodel.traffic_switch:
    state: query
    upstream_file: /etc/nginx/conf.d/grandmodel_upstream.conf
  register: __rollout_live
"""

RETURN = r"""
active_color:
  description: The live colour after the run (with O(state=query), the colour read; V(null) if none is known).
  returned: always
  type: str
  sample: green
previous_color:
  description:
    - The colour that was live before the most recent switch, the one a rollback returns to.
    - After a switch this is the colour that was live when the module started.
  returned: always
  type: str
  sample: blue
upstream_file:
  description: The upstream file read or written.
  returned: always
  type: str
  sample: /etc/nginx/conf.d/grandmodel_upstream.conf
state_file:
  description: The JSON record of the live and previous colour.
  returned: always
  type: str
  sample: /etc/nginx/conf.d/.grandmodel_upstream.conf.state.json
switched_at:
  description: UTC time of the most recent recorded switch.
  returned: when known
  type: str
  sample: "2025-06-02T07:55:01Z"
source:
  description: Where the live colour was read from (V(upstream_file) header or V(state_file)).
  returned: with O(state=query)
  type: str
  sample: upstream_file
verified:
  description: Whether the new colour was seen answering through O(verify_url) after this switch.
  returned: with O(state=active)
  type: bool
  sample: true
verification:
  description: Evidence of the cut-over, or why it was skipped.
  returned: with O(state=active)
  type: dict
  contains:
    url:
      description: The URL polled.
      type: str
    expected_color:
      description: The colour waited for.
      type: str
    answers:
      description: Distinct successive answers (colour, HTTP status or error), how many times each, first seen when.
      type: list
      elements: dict
    requests:
      description: Requests made.
      type: int
    seconds_to_cutover:
      description: Seconds from the reload until the first answer of the final streak of the new colour.
      type: float
    elapsed_s:
      description: Seconds the verification took.
      type: float
    verified:
      description: Whether the streak was reached.
      type: bool
    skipped:
      description: Why no verification ran (no change, check mode, no O(verify_url)).
      type: str
  sample:
    url: http://127.0.0.1:8443/version
    expected_color: green
    requests: 4
    answers: [{answer: blue, count: 1, first_seen_s: 0.002}, {answer: green, count: 3, first_seen_s: 0.104}]
    consecutive_required: 3
    seconds_to_cutover: 0.104
    elapsed_s: 0.31
    verified: true
seconds:
  description: Seconds from writing the file to the end of the verification.
  returned: when a switch was made
  type: float
  sample: 0.42
restored:
  description: On failure, whether the previous upstream file was put back (and nginx reloaded if it had been).
  returned: on failure
  type: bool
  sample: true
restore_verification:
  description:
    - On failure after a restore, evidence that the previous colour answers through O(verify_url) again,
      in the form of RV(verification).
  returned: on failure, when a previous colour and O(verify_url) exist
  type: dict
  sample: {verified: true, expected_color: blue, requests: 3}
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.quantnova.grandmodel.plugins.module_utils.traffic import (
    COLORS,
    FrontDoorVerifier,
    NginxBackend,
    TrafficSwitchError,
    switch_traffic,
)


def argument_spec():
    return dict(
        backend=dict(type="str", choices=["nginx"], default="nginx"),
        state=dict(type="str", choices=["active", "query"], default="active"),
        color=dict(type="str", choices=list(COLORS)),
        upstream_file=dict(type="path", required=True),
        upstream_name=dict(type="str", default="grandmodel_backend"),
        backends=dict(type="dict"),
        keepalive=dict(type="int", default=32),
        nginx_binary=dict(type="path", default="nginx"),
        nginx_config=dict(type="path", default="/etc/nginx/nginx.conf"),
        nginx_prefix=dict(type="path"),
        reload_command=dict(type="list", elements="str"),
        verify_url=dict(type="str", default=""),
        verify_validate_certs=dict(type="bool", default=True),
        verify_timeout=dict(type="float", default=10.0),
        verify_consecutive=dict(type="int", default=3),
        verify_interval=dict(type="float", default=0.1),
        state_file=dict(type="path"),
    )


def build_backend(params):
    verifier = None
    if params["verify_url"]:
        verifier = FrontDoorVerifier(params["verify_url"], timeout=params["verify_timeout"],
                                     consecutive=params["verify_consecutive"],
                                     validate_certs=params["verify_validate_certs"],
                                     interval=params["verify_interval"])
    return NginxBackend(
        upstream_file=params["upstream_file"], upstream_name=params["upstream_name"],
        backends=params["backends"] or {}, keepalive=params["keepalive"],
        nginx_binary=params["nginx_binary"], nginx_config=params["nginx_config"],
        nginx_prefix=params["nginx_prefix"], reload_command=params["reload_command"],
        state_file=params["state_file"], verifier=verifier,
    )


def main():
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True,
                           required_if=[("state", "active", ("color", "backends"))])
    params = module.params
    backend = build_backend(params)
    paths = dict(upstream_file=backend.upstream_file, state_file=backend.state.path)
    try:
        if params["state"] == "query":
            state = backend.read_state()
            module.exit_json(changed=False, active_color=state.active, previous_color=state.previous,
                             switched_at=state.switched_at, source=state.source, **paths)
        result = switch_traffic(backend, params["color"], check_mode=module.check_mode, want_diff=module._diff)
    except TrafficSwitchError as exc:
        module.fail_json(msg=str(exc), **dict(exc.result, **paths))
    module.exit_json(**dict(result, **paths))


if __name__ == "__main__":
    main()
