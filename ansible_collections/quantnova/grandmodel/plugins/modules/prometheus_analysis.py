# -*- coding: utf-8 -*-
# Copyright: (c) 2025, GrandModel Ops
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: prometheus_analysis
short_description: Compare a release's new colour with the old colour from Prometheus, over the same window
version_added: 0.1.0
description:
  - Read-only release analysis in the manner of an Argo Rollouts or Flagger metric analysis, for blue-green
    colours scraped by the environment's Prometheus (the C(grandmodel) job, the colour as the C(color) target label).
  - Runs instant PromQL queries against O(url), all evaluated at one timestamp (O(at), default now) over O(window),
    each grouped by colour, so the O(candidate) and the O(baseline) are measured over the very same window.
  - "Measures per colour: the request rate on the analysed O(routes), the error ratio (5xx / all on those routes),
    the O(latency_quantile) of C(grandmodel_http_request_duration_seconds) (C(histogram_quantile), so exact to the
    bucket), the throughput per unit of traffic weight (request rate / the weight the caller passes), and the
    prediction mix (each action's share of C(grandmodel_predictions_total) per model) when the service exports it."
  - The outcome is V(successful), V(failed) (a threshold was crossed; the message names every such check) or
    V(inconclusive) (too few requests, no data, or Prometheus could not be asked). Every measurement, every query
    and its answer are returned as evidence.
  - The module fails when the outcome is one of O(fail_on) (by default V(failed) and V(inconclusive)), and on bad
    input, with a message that says what was attempted, on what, and why.
author:
  - GrandModel Ops (@quantnova)
extends_documentation_fragment:
  - quantnova.grandmodel.read_only
options:
  url:
    description: Base URL of Prometheus, for example C(https://prometheus.example:9090).
    type: str
    required: true
  username:
    description: User of Prometheus' basic auth (its web configuration); none when unset.
    type: str
  password:
    description: Password of O(username).
    type: str
  ca_path:
    description: PEM file of the CA that signed Prometheus' certificate (the environment's internal CA).
    type: path
  validate_certs:
    description: Whether to verify Prometheus' certificate. Leave it on; give O(ca_path) instead.
    type: bool
    default: true
  timeout:
    description: Seconds each query may take.
    type: float
    default: 10.0
  candidate:
    description: The new colour and its traffic weight (any unit, the same as the baseline's).
    type: dict
    required: true
    suboptions:
      color:
        description: Value of the colour label.
        type: str
        required: true
      weight:
        description: Share of traffic the colour gets; needed for O(thresholds.throughput_ratio_min).
        type: float
  baseline:
    description: The colour that serves the release being replaced; needed for the relative thresholds.
    type: dict
    suboptions:
      color:
        description: Value of the colour label.
        type: str
        required: true
      weight:
        description: Share of traffic the colour gets; needed for O(thresholds.throughput_ratio_min).
        type: float
  window:
    description: The range of every query, a Prometheus duration (V(30s), V(5m), V(1h30m)).
    type: str
    default: 5m
  at:
    description: Unix time the queries are evaluated at (the window ends there); now when unset.
    type: float
  job:
    description: The scrape job of the service's colours.
    type: str
    default: grandmodel
  color_label:
    description: The target label carrying the colour.
    type: str
    default: color
  routes:
    description: PromQL regular expression (anchored) of the C(route) label of the requests analysed.
    type: str
    default: /v1/models/[^/]+/predict|/api/[^/]+/process
  latency_quantile:
    description: The latency quantile measured, between 0 and 1.
    type: float
    default: 0.99
  min_requests:
    description: Requests each compared colour must have served in the window; fewer makes the analysis inconclusive.
    type: int
    default: 20
  thresholds:
    description:
      - At least one. Absolute thresholds apply to the candidate; relative ones compare it with the baseline.
    type: dict
    required: true
    suboptions:
      error_ratio_max:
        description: Highest error ratio (5xx / all) of the candidate, for example V(0.01).
        type: float
      error_ratio_delta_max:
        description: Highest error ratio of the candidate minus the baseline's, for example V(0.05) (+5 points).
        type: float
      latency_max_ms:
        description: Highest latency quantile of the candidate in milliseconds.
        type: float
      latency_ratio_max:
        description: Highest candidate / baseline latency quantile, for example V(1.5) (+50%).
        type: float
      throughput_ratio_min:
        description:
          - Lowest candidate / baseline throughput per unit of weight, for example V(0.75) (-25%).
          - Needs both colours' C(weight).
        type: float
      prediction_mix_delta_max:
        description: Highest difference of any action's share of predictions (per model) between the colours.
        type: float
  fail_on:
    description:
      - Outcomes that make the module fail (the result and evidence are returned either way).
      - Give V([failed]) to treat inconclusive as the caller's decision, V([]) to never fail on the outcome.
    type: list
    elements: str
    choices: [failed, inconclusive]
    default: [failed, inconclusive]
notes:
  - "Prometheus unreachable or stopped, a refused login (HTTP 401/403), an untrusted certificate or a query error make
    the outcome V(inconclusive) with RV(reason) V(prometheus_unreachable), V(prometheus_refused) or
    V(prometheus_error): the analysis could not be made, which says nothing about the release. With the default
    O(fail_on) the module then fails with that reason; it never fails with a traceback."
  - A colour with no series in the window has no data; one with fewer than O(min_requests) requests is too little
    traffic. Both are V(inconclusive), whatever the checks say.
  - No 5xx series in the window counts as an error ratio of 0 when the colour had requests.
seealso:
  - module: quantnova.grandmodel.health_gate
  - name: Flagger metrics analysis
    description: The request success rate and duration checks this analysis follows, made relative to the old colour.
    link: https://docs.flagger.app/usage/metrics
"""

EXAMPLES = r"""
- name: Ensure the new colour is no worse than the old one over the last two minutes
  quantnova.grandmodel.prometheus_analysis:
    url: https://monitoring-1.prod.internal:9090
    ca_path: /etc/grandmodel/pki/ca.crt
    username: grandmodel
    password: "{{ monitoring_web_password }}"
    candidate: {color: green, weight: 25}
    baseline: {color: blue, weight: 75}
    window: 2m
    latency_quantile: 0.99
    min_requests: 100
    thresholds:
      latency_ratio_max: 1.5
      throughput_ratio_min: 0.75
      error_ratio_delta_max: 0.05
      error_ratio_max: 0.02
    fail_on: [failed]
  register: __rollout_analysis

- name: Show what the analysis measured
  ansible.builtin.debug:
    msg: "{{ __rollout_analysis.outcome }}: {{ __rollout_analysis.message }}"
"""

RETURN = r"""
outcome:
  description: V(successful), V(failed) or V(inconclusive).
  returned: always
  type: str
  sample: failed
reason:
  description:
    - V(within_thresholds), V(threshold) (failed), V(too_few_requests), V(no_data), V(prometheus_unreachable),
      V(prometheus_refused) or V(prometheus_error).
  returned: always
  type: str
  sample: threshold
message:
  description: One sentence per check that decided the outcome, with the values and the threshold.
  returned: always
  type: str
  sample: "analysis failed: latency_ratio_max: latency p99 green 37.5 ms vs blue 17.5 ms, ratio 2.143 (must be <= 1.5)"
failed_checks:
  description: Names of the checks beyond their threshold.
  returned: always
  type: list
  elements: str
  sample: [latency_ratio_max]
checks:
  description: Per configured threshold, C(status) (V(passed), V(failed), V(inconclusive)), C(value), C(threshold)
    and C(message).
  returned: always
  type: dict
measurements:
  description:
    - Per colour, C(request_rate) (req/s), C(requests) in the window, C(error_rate) (5xx/s), C(error_ratio),
      C(latency_ms), C(weight), C(throughput_per_weight), C(window_s) and C(prediction_mix) (model, action, share).
    - Empty when Prometheus could not be asked.
  returned: always
  type: dict
queries:
  description: Every query sent, in order, with C(name), C(promql) and its C(result) vector or the C(error).
  returned: always
  type: list
  elements: dict
evaluated_at:
  description: Unix time the queries were evaluated at.
  returned: always
  type: float
window:
  description: The window of every query.
  returned: always
  type: str
candidate:
  description: The candidate colour.
  returned: always
  type: str
baseline:
  description: The baseline colour (null without one).
  returned: always
  type: str
thresholds:
  description: The thresholds that were set.
  returned: always
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.quantnova.grandmodel.plugins.module_utils.prometheus_analysis import (
    LIVE_ROUTES,
    THRESHOLDS,
    AnalysisConfig,
    AnalysisError,
    Colour,
    Prometheus,
    Thresholds,
    run_analysis,
)


def argument_spec():
    colour = dict(color=dict(type="str", required=True), weight=dict(type="float"))
    return dict(
        url=dict(type="str", required=True),
        username=dict(type="str"),
        password=dict(type="str", no_log=True),
        ca_path=dict(type="path"),
        validate_certs=dict(type="bool", default=True),
        timeout=dict(type="float", default=10.0),
        candidate=dict(type="dict", required=True, options=colour),
        baseline=dict(type="dict", options=colour),
        window=dict(type="str", default="5m"),
        at=dict(type="float"),
        job=dict(type="str", default="grandmodel"),
        color_label=dict(type="str", default="color"),
        routes=dict(type="str", default=LIVE_ROUTES),
        latency_quantile=dict(type="float", default=0.99),
        min_requests=dict(type="int", default=20),
        thresholds=dict(type="dict", required=True, options={name: dict(type="float") for name in THRESHOLDS}),
        fail_on=dict(type="list", elements="str", choices=["failed", "inconclusive"],
                     default=["failed", "inconclusive"]),
    )


def config_from(params):
    def colour(spec):
        return None if spec is None else Colour(spec["color"], spec.get("weight"))

    return AnalysisConfig(
        url=params["url"], candidate=colour(params["candidate"]), baseline=colour(params["baseline"]),
        thresholds=Thresholds(**{name: params["thresholds"].get(name) for name in THRESHOLDS}),
        window=params["window"], at=params["at"], job=params["job"], color_label=params["color_label"],
        routes=params["routes"], latency_quantile=params["latency_quantile"], min_requests=params["min_requests"])


def main():
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True,
                           required_by={"password": "username"})
    params = module.params
    config = config_from(params)
    prometheus = Prometheus(params["url"], username=params["username"], password=params["password"],
                            ca_path=params["ca_path"], validate_certs=params["validate_certs"],
                            timeout=params["timeout"])
    try:
        result = run_analysis(config, prometheus)
    except AnalysisError as exc:
        module.fail_json(msg="Cannot analyse %s against %s with Prometheus at %s: %s"
                         % (config.candidate.color, config.baseline.color if config.baseline else "no baseline",
                            params["url"], exc))
    if result["outcome"] in params["fail_on"]:
        module.fail_json(msg="Release analysis of %s against %s from Prometheus at %s over %s: %s"
                         % (result["candidate"], result["baseline"] or "no baseline", params["url"],
                            result["window"], result["message"]), **result)
    module.exit_json(changed=False, **result)


if __name__ == "__main__":
    main()
