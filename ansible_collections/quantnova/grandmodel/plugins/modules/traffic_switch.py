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
  - With O(backend=nginx) the colour lives in an upstream file included by nginx. A switch takes an exclusive
    lock (C(flock) on C(.<name>.lock) beside the file, waiting up to O(lock_timeout)), writes the new file as a
    hidden candidate in the same directory (so an C(include dir/*.conf) glob never sees it), keeps a copy of the
    current file as C(.<name>.previous), runs C(nginx -t) on the configuration as it would be with the candidate
    in place, and only then moves the candidate over the live file with an atomic rename, reloads nginx gracefully
    and proves through O(verify_url) that the new colour answers O(verify_consecutive) times in a row.
  - C(nginx -t) tests the candidate inside the main configuration O(nginx_config) when that file includes the
    upstream file directly (by path, or by a glob such as C(conf.d/*.conf)); otherwise it tests the candidate on
    its own, and RV(config_test) says which.
  - On any failure (configuration refused, reload failed, verification failed, an HTTP-level error, an unexpected
    error) and on SIGTERM, SIGHUP or SIGINT while applying or verifying, the previous file is put back (and nginx
    reloaded again if a reload had happened) with those signals held back, and the module fails with what was
    attempted, on what and why, including the output of C(nginx -t).
  - A journal (C(.<name>.pending)) exists while a switch is in flight. If a switch is killed outright (SIGKILL),
    the next run of the module finds it under the lock, restores the file the dead switch replaced, reloads nginx
    and reports it in RV(recovered) before doing anything else.
  - With O(backup_color), the upstream keeps that colour's servers as nginx C(backup); with the site's
    C(proxy_next_upstream), requests that fail on the live colour (refused, timed out, 502/503) are retried on the
    warm colour at once. A live server that fails once is then skipped for 5 s. Switching without O(backup_color)
    removes the backup servers in the same atomic switch.
  - Requesting the colour that is already active with an identical upstream file changes nothing.
  - With O(state=weighted) (O(backend=nginx) only) the front door splits the requests between the colours by
    O(weights), for example 90 for blue and 10 for green in the first step of a release. Each server of a colour gets
    an equal part of its colour's weight as nginx C(weight=) (scaled so the parts stay whole numbers); a colour
    at 0 gets no server line, and the weights must add up to 100, so the upstream is never empty. The switch is
    the same as for O(state=active) (lock, one atomic file, C(nginx -t) of the candidate inside the real
    configuration, graceful reload, verification, restore on any failure or signal, recovery of a killed run).
    The file records the weights in a comment line at its top, so the same weights again change nothing.
  - A weighted switch is verified through O(verify_url) over a sliding window of the last
    O(verify_weight_sample) answers (at least enough that the smallest weight expects 3 answers). It passes when
    the window holds only colours with a weight above 0 (no colour at 0, no error), each of them at least once,
    and each colour's share is within O(verify_weight_tolerance) percentage points of its weight. The requests
    are made back to back; answers of old nginx workers still draining after the reload only delay the verdict.
    Other clients' requests interleave with the window, so the share check is a coarse guard (the default 10
    points over 200 answers is about 3 standard deviations at 50/50); the per-colour analysis of each step is
    the fine one.
  - O(state=active) after a weighted state writes the one-colour file exactly as before (byte for byte).
  - After a verified switch a small JSON record C({active, previous, backup, switched_at}) is written to
    O(state_file), and with O(metrics_file) the live and backup colour are exported for node_exporter's textfile
    collector (also after a restore, and when the file is missing or stale even if the upstream needs no change).
  - With O(backend=kubernetes) the colour is the label O(color_label) in the selector of the live Service
    O(namespace)/O(service). A switch first requires at least O(min_ready) ready pods of the new colour behind that
    colour's own Service (O(color_service)), then patches the selector and a record (annotations
    C(grandmodel.quantnova.io/active-color), C(previous-color), C(switched-at)) in one JSON merge patch guarded by
    the Service's resourceVersion (a concurrent change is refused, never overwritten), then watches the live
    Service's EndpointSlices until they list only the new colour's pods, at least O(min_ready) ready, for
    O(verify_consecutive) polls (and O(verify_url) if given). On failure the selector and record are patched back.
    An in-flight annotation set with the selector lets the next run undo a switch whose run was killed.
  - The kubernetes backend needs the C(kubernetes) Python library where the module runs (usually the controller,
    C(delegate_to) the controller), and a kubeconfig, O(host) with O(api_key), or an in-cluster service account.
    O(backup_color) does not apply to it (the old colour stays warm as its own Deployment).
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
    choices: [nginx, kubernetes]
    default: nginx
  state:
    description:
      - V(active) makes O(color) the live colour.
      - V(previous) makes the colour that was live before the last recorded switch (RV(previous_color)) live again,
        the emergency switch-back that needs no other input than O(backends).
      - V(query) only reads the live colour (and the weights of a weighted file) and changes nothing.
      - V(weighted) splits the requests between the colours by O(weights) (O(backend=nginx) only).
    type: str
    choices: [active, previous, query, weighted]
    default: active
  color:
    description:
      - The colour to make live. Required with O(state=active).
      - Not with O(state=weighted) (the colours and their shares are in O(weights)).
    type: str
    choices: [blue, green]
  weights:
    description:
      - With O(state=weighted), the percentage of requests each colour gets, for example C(blue) 75 and C(green) 25.
      - Whole numbers from 0 to 100 adding up to 100; only the colours V(blue) and V(green); a colour left out
        gets 0. A colour above 0 needs addresses in O(backends); a colour at 0 gets no server line.
      - The upstream file records as its active colour (RV(active_color)) the colour with the largest weight; at
        a tie (50/50) the colour that was live stays the active one.
      - Every check is made before anything is touched; a refused value names the colour and what to fix.
      - Only with O(state=weighted).
    type: dict
  backup_color:
    description:
      - A colour to keep in the upstream as nginx C(backup) behind O(color), for example the old colour during the
        warm window after a release. Must differ from the live colour and have addresses in O(backends).
      - Not with O(state=weighted); every colour above 0 is a primary there, and the site's
        C(proxy_next_upstream) retries a failed request on the other colour.
      - Omitted, the upstream holds only the live colour (a backup left by an earlier switch is removed).
    type: str
    choices: [blue, green]
  upstream_file:
    description:
      - The nginx upstream file that holds the live colour, for example C(/etc/nginx/conf.d/grandmodel_upstream.conf).
      - "Its first lines carry C(# active_color: <colour>), which is how the live colour is read back."
      - Required with O(backend=nginx).
    type: path
  upstream_name:
    description: Name of the nginx C(upstream) block, referenced by C(proxy_pass http://<name>) in the site.
    type: str
    default: grandmodel_backend
  backends:
    description:
      - Addresses (C(host:port)) of each colour's service processes, keyed by colour.
      - Required with O(backend=nginx) and O(state=active); the entry for O(color) must list at least one address.
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
    description: Seconds to wait for the new colour to answer O(verify_consecutive) times in a row; above 0.
    type: float
    default: 10.0
  verify_consecutive:
    description: Consecutive answers from the new colour needed (1 or more); old nginx workers may answer for a moment.
    type: int
    default: 3
  verify_interval:
    description: Seconds between verification requests; 0 or more.
    type: float
    default: 0.1
  verify_weight_sample:
    description:
      - With O(state=weighted), how many of the most recent answers through O(verify_url) are judged together
        (10 to 10000). Raised automatically so the smallest weight above 0 expects 3 answers (1% needs 300).
    type: int
    default: 200
  verify_weight_tolerance:
    description:
      - With O(state=weighted), how far (in percentage points, 0 to 100) a colour's share of the judged answers
        may be from its weight.
    type: float
    default: 10.0
  precheck_path:
    description:
      - Path (for example V(/ready)) every server of the new colour must answer with 200, asked directly on its
        address in O(backends) before anything is touched. A server that does not fails the module with the
        live upstream untouched, so clients are never sent to a colour that is down.
      - With O(state=weighted), every server of every colour with a weight above 0 is asked.
      - Empty (the default) skips the check.
    type: str
    default: ""
  precheck_timeout:
    description: Seconds each O(precheck_path) request may take (above 0).
    type: float
    default: 2.0
  namespace:
    description: With O(backend=kubernetes), the namespace of the live Service.
    type: str
    default: grandmodel
  service:
    description: With O(backend=kubernetes), the live Service whose selector names the colour.
    type: str
    default: grandmodel
  color_label:
    description: With O(backend=kubernetes), the selector label that names the colour.
    type: str
    default: grandmodel.quantnova.io/color
  color_service:
    description:
      - With O(backend=kubernetes), the name pattern of each colour's own Service (C({service}), C({color})); its
        ready endpoints are checked before the switch. Empty checks the new colour's pods instead.
    type: str
    default: "{service}-{color}"
  min_ready:
    description: With O(backend=kubernetes), ready pods of the new colour required before and after the switch.
    type: int
    default: 1
  kubeconfig:
    description: With O(backend=kubernetes), the kubeconfig file; default C($KUBECONFIG) or C(~/.kube/config).
    type: path
  context:
    description: With O(backend=kubernetes), the kubeconfig context.
    type: str
  host:
    description: With O(backend=kubernetes), the API server URL, used instead of a kubeconfig (with O(api_key)).
    type: str
  api_key:
    description: With O(backend=kubernetes), the bearer token for O(host).
    type: str
  ca_cert:
    description: With O(backend=kubernetes), the CA certificate of the API server.
    type: path
  validate_certs:
    description: With O(backend=kubernetes), verify the API server's certificate (default from the kubeconfig).
    type: bool
  request_timeout:
    description: With O(backend=kubernetes), seconds each API request may take (the client retries a GET 3 times).
    type: float
    default: 10.0
  lock_timeout:
    description:
      - Seconds to wait for another switch of the same upstream file to finish (0 or more); then the module fails
        naming the holder of the lock. Two switches never interleave.
    type: float
    default: 30.0
  command_timeout:
    description: Seconds C(nginx -t) and the reload command may take (above 0).
    type: float
    default: 60.0
  metrics_file:
    description:
      - File to write the live and backup colour to in Prometheus text format, for node_exporter's textfile
        collector, for example C(/var/lib/prometheus/node-exporter/grandmodel_traffic.prom). Its directory must
        exist. Gauges C(grandmodel_traffic_active_color{color,upstream}) and
        C(grandmodel_traffic_backup_color{color,upstream}), 1 or 0 for each colour, and
        C(grandmodel_traffic_weight_percent{color,upstream}), the share of requests each colour is given (the
        weights of O(state=weighted); otherwise 100 for the live colour, 0 for the others and a backup).
      - Empty (the default) exports nothing.
    type: path
  state_file:
    description:
      - JSON record of the live and the previous colour, written after each verified switch.
      - Defaults to C(.<upstream file name>.state.json) beside O(upstream_file) (hidden, so include globs skip it).
    type: path
notes:
  - The C(include) that pulls O(upstream_file) into nginx should use a glob such as C(conf.d/*.conf) or C(dir/*);
    the temporary, candidate, backup, journal, lock and state files are dot-files, which such globs never match.
  - Numeric options are checked before anything is touched; a negative, zero (where it must be above 0),
    infinite or NaN value fails with the option's name.
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

- name: Send 10% of the predictions to green, 90% to blue (the first weighted step of a release)
  quantnova.grandmodel.traffic_switch:
    state: weighted
    weights:
      blue: 90
      green: 10
    upstream_file: /etc/nginx/conf.d/grandmodel_upstream.conf
    backends:
      blue: ["127.0.0.1:8001"]
      green: ["127.0.0.1:8002"]
    reload_command: [systemctl, reload, nginx]
    verify_url: https://127.0.0.1/version
    verify_validate_certs: false
    precheck_path: /ready
  register: __rollout_step

- name: Read which colour is live
  quantnova.grandmodel.traffic_switch:
    state: query
    upstream_file: /etc/nginx/conf.d/grandmodel_upstream.conf
  register: __rollout_live
"""

RETURN = r"""
active_color:
  description:
    - The live colour after the run (with O(state=query), the colour read; V(null) if none is known).
    - With O(state=weighted), and when a weighted file is read, the colour with the largest weight (at a tie, the
      colour that was live before).
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
weights:
  description:
    - The percentage of requests per colour after the run, every colour named (O(state=weighted)), or as read from
      the upstream file (O(state=query); V(null) when the file sends everything to one colour).
    - On a failed weighted switch, the weights that were restored (V(null) when the restored file had one colour).
  returned: with O(state=weighted), and with O(state=query) for backend nginx
  type: dict
  sample: {blue: 90, green: 10}
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
      description:
        - Distinct successive answers (colour, HTTP status or error), how many times each, first seen when.
        - With O(state=weighted), each distinct answer once, with its count over all requests.
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
    expected_weights:
      description: With O(state=weighted), the split waited for.
      type: dict
    window:
      description: With O(state=weighted), how many of the last answers were judged together.
      type: int
    window_counts:
      description: With O(state=weighted), the answers in the judged window, per colour (or error).
      type: dict
    window_shares:
      description: With O(state=weighted), the same in percent.
      type: dict
    tolerance_points:
      description: With O(state=weighted), the allowed distance of a share from its weight.
      type: float
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
backup_color:
  description: The colour kept as nginx backup after the run (V(null) when none).
  returned: with O(state=active) or O(state=previous), and with O(state=query)
  type: str
  sample: blue
config_test:
  description:
    - What C(nginx -t) tested before the live file was replaced (C(tested) is V(main_config) or V(upstream_only)).
  returned: when a switch was made
  type: dict
  sample: {tested: main_config, note: the main configuration /etc/nginx/nginx.conf with the candidate in place}
precheck:
  description: What each server of the new colour answered on O(precheck_path) (C(path), C(answers), C(ready)).
  returned: when O(precheck_path) is set and a switch was attempted
  type: dict
  sample: {path: /ready, answers: {"10.0.0.5:8002": 200}, ready: true}
lock:
  description: The lock file and how long the switch waited for it (C(lock_file), C(lock_waited_s)).
  returned: with O(state=active) or O(state=previous), outside check mode
  type: dict
  sample: {lock_file: /etc/nginx/grandmodel/.upstream.conf.lock, lock_waited_s: 0.0}
recovered:
  description: What was undone of an earlier switch that had died without finishing (its journal was found).
  returned: when such a switch was found
  type: str
  sample: "a switch to green (pid 4242, started 2026-06-02T07:55:01Z) had died without finishing: restored ..."
metrics_changed:
  description: Whether O(metrics_file) was (re)written.
  returned: with O(metrics_file)
  type: bool
  sample: true
interrupted:
  description: The signal that interrupted the switch (the previous state was restored before the module failed).
  returned: on failure by a signal
  type: str
  sample: SIGTERM
phase:
  description: What the switch was doing when it failed, V(applying) or V(verifying).
  returned: on failure
  type: str
  sample: verifying
restore_verification:
  description:
    - On failure after a restore, evidence that the previous colour answers through O(verify_url) again,
      in the form of RV(verification).
  returned: on failure, when a previous colour and O(verify_url) exist
  type: dict
  sample: {verified: true, expected_color: blue, requests: 3}
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib
from ansible_collections.quantnova.grandmodel.plugins.module_utils.traffic import (
    COLORS,
    FrontDoorVerifier,
    NginxBackend,
    TrafficSwitchError,
    check_weights,
    switch_traffic,
)
from ansible_collections.quantnova.grandmodel.plugins.module_utils.traffic_k8s import (
    HAS_KUBERNETES,
    KUBERNETES_IMPORT_ERROR,
    build_kubernetes_backend,
    kubernetes_argument_spec,
)


def argument_spec():
    return dict(
        backend=dict(type="str", choices=["nginx", "kubernetes"], default="nginx"),
        state=dict(type="str", choices=["active", "previous", "query", "weighted"], default="active"),
        color=dict(type="str", choices=list(COLORS)),
        weights=dict(type="dict"),
        backup_color=dict(type="str", choices=list(COLORS)),
        upstream_file=dict(type="path"),
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
        verify_weight_sample=dict(type="int", default=200),
        verify_weight_tolerance=dict(type="float", default=10.0),
        precheck_path=dict(type="str", default=""),
        precheck_timeout=dict(type="float", default=2.0),
        lock_timeout=dict(type="float", default=30.0),
        command_timeout=dict(type="float", default=60.0),
        metrics_file=dict(type="path"),
        state_file=dict(type="path"),
        **kubernetes_argument_spec()
    )


def build_backend(module):
    params = module.params
    verifier = None
    if params["verify_url"]:
        verifier = FrontDoorVerifier(params["verify_url"], timeout=params["verify_timeout"],
                                     consecutive=params["verify_consecutive"],
                                     validate_certs=params["verify_validate_certs"],
                                     interval=params["verify_interval"],
                                     weight_sample=params["verify_weight_sample"],
                                     weight_tolerance=params["verify_weight_tolerance"])
    if params["backend"] == "kubernetes":
        return build_kubernetes_backend(params, verifier=verifier)
    return NginxBackend(
        upstream_file=params["upstream_file"], module=module, upstream_name=params["upstream_name"],
        backends=params["backends"] or {}, keepalive=params["keepalive"],
        nginx_binary=params["nginx_binary"], nginx_config=params["nginx_config"],
        nginx_prefix=params["nginx_prefix"], reload_command=params["reload_command"],
        state_file=params["state_file"], verifier=verifier, lock_timeout=params["lock_timeout"],
        command_timeout=params["command_timeout"], metrics_file=params["metrics_file"],
        precheck_path=params["precheck_path"], precheck_timeout=params["precheck_timeout"],
    )


def main():
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True,
                           required_if=[("state", "active", ("color",)), ("backend", "nginx", ("upstream_file",))])
    params = module.params
    kubernetes = params["backend"] == "kubernetes"
    _refuse_mixed_weight_options(module, params, kubernetes)
    if kubernetes and not HAS_KUBERNETES:
        module.fail_json(msg=missing_required_lib("kubernetes"), exception=KUBERNETES_IMPORT_ERROR)
    if not kubernetes and params["state"] != "query" and not params["backends"]:
        module.fail_json(msg="backend nginx needs backends (the addresses of each colour) with state=%s"
                             % params["state"])
    if kubernetes and params["metrics_file"]:
        module.fail_json(msg="metrics_file is for the nginx backend; with backend kubernetes the live colour is the "
                             "Service selector (kube-state-metrics exports it)")
    paths = dict(service="%s/%s" % (params["namespace"], params["service"])) if kubernetes else dict(
        upstream_file=params["upstream_file"])
    try:
        backend = build_backend(module)
        if not kubernetes:
            paths = dict(upstream_file=backend.upstream_file, state_file=backend.state.path)
        if params["state"] == "query":
            state = backend.read_state()
            extra = {} if kubernetes else dict(weights=state.weights)
            module.exit_json(changed=False, active_color=state.active, previous_color=state.previous,
                             backup_color=state.backup, switched_at=state.switched_at, source=state.source,
                             **dict(extra, **paths))
        if params["state"] == "weighted":
            # Checked before the lock is taken: bad weights leave the directory exactly as it was.
            weights = check_weights(params["weights"], params["backends"])
            result = switch_traffic(backend, None, check_mode=module.check_mode, want_diff=module._diff,
                                    weights=weights)
            _finish(module, backend, params, result, paths)
        color = params["color"]
        if params["state"] == "previous":
            state = backend.read_state()
            color = state.previous
            if color not in COLORS:
                raise TrafficSwitchError("cannot switch %s back: no previous colour is recorded in %s (live: %s); name "
                                         "the colour with state=active" % (
                                             getattr(backend, "target", None) or backend.upstream_file,
                                             "its annotations" if kubernetes else backend.state.path, state.active))
        if params["backup_color"] and params["backup_color"] == color:
            raise TrafficSwitchError("cannot switch %s to %s with backup_color %s: a colour cannot back up itself"
                                     % (getattr(backend, "target", None) or backend.upstream_file, color,
                                        params["backup_color"]))
        result = switch_traffic(backend, color, check_mode=module.check_mode, want_diff=module._diff,
                                backup_color=params["backup_color"])
    except TrafficSwitchError as exc:
        failure = dict(exc.result, **paths)
        if params["metrics_file"] and not module.check_mode and "backend" in locals():
            failure["metrics_changed"] = _export_quietly(backend, failure)
        module.fail_json(msg=str(exc), **failure)
    _finish(module, backend, params, result, paths)


def _refuse_mixed_weight_options(module, params, kubernetes):
    """state=weighted takes weights and nothing that names one colour; weights belong to state=weighted only."""
    state = params["state"]
    if state != "weighted":
        if params["weights"] is not None:
            module.fail_json(msg="weights is for state=weighted (got state=%s); state=active sends all traffic to "
                                 "color" % state)
        return
    if kubernetes:
        module.fail_json(msg="state=weighted is for backend nginx: a Kubernetes Service selector cannot split "
                             "traffic by weight")
    if not params["weights"]:
        module.fail_json(msg="state=weighted needs weights, the percentage of traffic per colour, for example "
                             "{blue: 90, green: 10}")
    for option in ("color", "backup_color"):
        if params[option] is not None:
            module.fail_json(msg="%s is for state=active; with state=weighted every colour with a weight above 0 "
                                 "takes its share and a failed request is retried on the other (proxy_next_upstream)"
                                 "; leave %s out" % (option, option))


def _finish(module, backend, params, result, paths):
    """Export the metrics (when asked) and exit with the result of a switch."""
    if params["metrics_file"] and not module.check_mode:
        try:
            result["metrics_changed"] = backend.export_state()
        except TrafficSwitchError as exc:
            module.fail_json(msg="traffic is on %s, but %s" % (result["active_color"], exc), **dict(result, **paths))
        result["changed"] = result["changed"] or result["metrics_changed"]
    module.exit_json(**dict(result, **paths))


def _export_quietly(backend, failure):
    """After a failed (restored) switch the metrics still say what is live; a failure to write them is noted."""
    try:
        return backend.export_state()
    except TrafficSwitchError as exc:
        failure["metrics_error"] = str(exc)
        return False


if __name__ == "__main__":
    main()
