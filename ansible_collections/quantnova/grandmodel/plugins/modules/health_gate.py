# -*- coding: utf-8 -*-
# Copyright: (c) 2025, GrandModel Ops
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: health_gate
short_description: Decide from repeated measurements whether a GrandModel inference service may take traffic
version_added: 0.1.0
description:
  - Read-only analysis in the manner of an Argo Rollouts AnalysisRun, for any host that can reach the service.
  - After O(initial_delay) seconds, takes up to O(count) measurements O(interval) seconds apart. Each measurement runs
    the selected O(checks) against O(url).
  - A check fails when the service answers wrongly and errors when no answer could be had (refused, timed out).
    A measurement is C(failed) if any check failed, else C(error) if any check errored, else C(successful).
  - The gate fails as soon as more than O(failure_limit) measurements failed or more than O(consecutive_error_limit)
    consecutive measurements errored. Otherwise it takes all O(count) measurements and passes only when the
    B(last) one is successful; failures and errors tolerated earlier in the window are forgiven only if the
    service answers correctly afterwards. A gate never passes early, and never without a successful measurement.
  - A measurement that gets no answer in time is an error, not a pass; all requests of one measurement share
    O(measurement_timeout) seconds, so a service that accepts connections but never answers (hung, stopped)
    costs at most that long per measurement, and the whole gate at most
    O(initial_delay) + O(count) * (O(interval) + O(measurement_timeout)) seconds.
  - On failure the module fails with a message naming the check, the value and the threshold, and returns the same
    evidence (RV(measurements), RV(summary)) as on success.
author:
  - GrandModel Ops (@quantnova)
extends_documentation_fragment:
  - quantnova.grandmodel.http_client
  - quantnova.grandmodel.read_only
options:
  url:
    description: Base URL of the service to probe, for example C(http://127.0.0.1:8002).
    type: str
    required: true
  interval:
    description: Seconds between measurements.
    type: float
    default: 5.0
  count:
    description: Measurements to take when no early verdict is reached.
    type: int
    default: 5
  initial_delay:
    description: Seconds to wait before the first measurement.
    type: float
    default: 0.0
  failure_limit:
    description: Failed measurements tolerated; one more fails the gate.
    type: int
    default: 0
  consecutive_error_limit:
    description: Consecutive measurements that could not be made tolerated; one more fails the gate.
    type: int
    default: 4
  checks:
    description:
      - Checks to run in each measurement. Defaults to every check that is configured.
      - V(health) (GET C(/health) answers 200) and V(ready) (GET C(/ready) answers 200) are always configured.
      - V(version) compares GET C(/version) with O(expected_version), O(expected_color), O(expected_models) and the
        version and sha256 of each of O(manifests).
      - V(golden) posts each golden sample of O(manifests) to C(/v1/models/<name>/predict) and compares the
        probabilities and value within the manifest's C(atol) and the action exactly.
      - V(latency) compares the O(latency_quantile) of the gate's own predict (golden) requests in the measurement,
        or of its C(/health) requests without golden samples, with O(latency_threshold_ms).
      - V(error_rate) scrapes C(/metrics) in every measurement and compares the share of 5xx answers among the
        B(live) requests counted in C(grandmodel_http_requests_total) since the gate's first scrape with
        O(error_rate_threshold). See the notes for how the window is summed and what counts as live.
    type: list
    elements: str
    choices: [health, ready, version, golden, latency, error_rate]
  expected_version:
    description: The C(service_version) C(/version) must report.
    type: str
  expected_color:
    description: The C(color) C(/version) must report.
    type: str
  expected_models:
    description:
      - "Models C(/version) must report as loaded, as C({name: {version: ..., sha256: ...}})."
      - Models of O(manifests) are added with the manifest's version and sha256 unless named here.
    type: dict
  manifests:
    description:
      - Paths on the target host of model manifest JSON files (name, version, sha256, golden samples with C(atol)).
    type: list
    elements: path
    default: []
  latency_quantile:
    description: Quantile (nearest rank) of the probe latencies compared with O(latency_threshold_ms).
    type: float
    default: 0.99
  latency_threshold_ms:
    description: Highest acceptable latency quantile in milliseconds; configures the V(latency) check.
    type: float
  error_rate_threshold:
    description: Highest acceptable fraction of 5xx answers, for example V(0.01); configures the V(error_rate) check.
    type: float
  error_rate_routes:
    description:
      - Regular expression (Python C(re.search)) a C(route) label must match to count as live traffic.
      - The default counts the predict API and its alias, the routes clients use.
    type: str
    default: ^/v1/models/[^/]+/predict$|^/api/[^/]+/process$
  error_rate_exclude_routes:
    description:
      - Values of the C(route) label never counted, whatever O(error_rate_routes) says; the default names the
        gate's own probe routes.
    type: list
    elements: str
    default: [/metrics, /health, /ready, /version]
  error_rate_min_requests:
    description:
      - Live requests (without the gate's own) the window needs before its error rate means anything.
      - Below it the error rate is B(inconclusive) and O(error_rate_inconclusive) decides; meanwhile the rate is
        computed as if the missing requests had all succeeded, so a burst of 5xx still fails at once.
    type: int
    default: 20
  error_rate_inconclusive:
    description:
      - What a window with fewer than O(error_rate_min_requests) live requests means at the end of the gate.
      - V(fail) (the default) fails the gate; V(pass) passes it and says so in RV(summary.message).
    type: str
    choices: [fail, pass]
    default: fail
  measurement_timeout:
    description:
      - Seconds all requests of one measurement may take together; a request gets at most what is left (and at
        most O(timeout)), and checks that find nothing left count as errors.
      - Defaults to twice O(timeout).
    type: float
notes:
  - "The error rate is summed scrape by scrape: for every pair of successive scrapes the increase of each series of
    C(grandmodel_http_requests_total) is added up. A service restart is detected from
    C(process_start_time_seconds) (or from any counter going down), and then every series of that scrape counts
    from zero, so one series passing its old value cannot hide another's reset."
  - Only live routes count (O(error_rate_routes) without O(error_rate_exclude_routes)); the gate's probes of
    C(/health), C(/ready), C(/version) and C(/metrics) never dilute the rate, and its own golden predict requests,
    which the service counts like client requests, are subtracted using the gate's tally of what it sent and what
    came back between two scrapes.
  - With no or too little live traffic the error rate is not 0 but inconclusive (see O(error_rate_min_requests)).
seealso:
  - module: quantnova.grandmodel.traffic_switch
  - name: Argo Rollouts analysis
    description: The measurement, failure limit and consecutive error limit model this gate follows.
    link: https://argo-rollouts.readthedocs.io/en/stable/features/analysis/
"""

EXAMPLES = r"""
- name: Ensure the idle colour serves the new models correctly before it takes traffic
  quantnova.grandmodel.health_gate:
    url: http://127.0.0.1:8002
    interval: 2
    count: 5
    failure_limit: 0
    expected_version: "1.4.0"
    expected_color: green
    manifests:
      - /opt/grandmodel/models/strategic/manifest.json
      - /opt/grandmodel/models/tactical/manifest.json
    latency_threshold_ms: 10
  register: __rollout_pre_gate

- name: Ensure live traffic on the new colour stays healthy after the switch
  quantnova.grandmodel.health_gate:
    url: http://127.0.0.1:8002
    initial_delay: 5
    interval: 10
    count: 6
    failure_limit: 1
    checks: [health, ready, error_rate]
    error_rate_threshold: 0.01
    error_rate_min_requests: 50
    error_rate_inconclusive: fail
"""

RETURN = r"""
passed:
  description: Whether the gate passed (also returned, V(false), when the module fails because the gate failed).
  returned: always
  type: bool
  sample: true
measurements:
  description: One entry per measurement taken.
  returned: always
  type: list
  elements: dict
  contains:
    index:
      description: Number of the measurement, from 1.
      type: int
    timestamp:
      description: UTC time the measurement ended.
      type: str
    phase:
      description: V(successful), V(failed) or V(error).
      type: str
    checks:
      description: Per check, C(ok), C(value), C(threshold) (when passed), C(message) and C(error) (when not passed).
      type: dict
  sample:
    - index: 1
      timestamp: "2025-06-02T07:55:01.123456Z"
      phase: successful
      checks:
        health: {ok: true, value: 200, threshold: 200, message: alive}
        latency: {ok: true, value: 3.2, threshold: 10, message: p99 3.2 ms}
summary:
  description: The verdict and the counts it rests on.
  returned: always
  type: dict
  contains:
    verdict:
      description: V(passed) or V(failed).
      type: str
    reason:
      description:
        - V(completed) (passed), V(failure_limit), V(consecutive_error_limit), V(no_successful_measurement),
          V(last_measurement_error), V(last_measurement_failed) or V(error_rate_inconclusive).
      type: str
    message:
      description: One sentence naming the check, the value and the threshold.
      type: str
    measurements:
      description: Measurements taken.
      type: int
    stopped_early:
      description: Whether the verdict (always a failure) came before O(count) measurements.
      type: bool
    last_measurement:
      description: Outcome of the last measurement (V(successful), V(failed) or V(error)); a pass needs V(successful).
      type: str
    measurement_timeout:
      description: Seconds each measurement's requests could take together.
      type: float
    successful:
      description: Successful measurements.
      type: int
    failed:
      description: Failed measurements.
      type: int
    errors:
      description: Measurements that could not be made.
      type: int
    consecutive_errors_max:
      description: Longest run of errored measurements.
      type: int
    error_rate:
      description:
        - With the V(error_rate) check, over the whole window, C(error_rate), C(errors) (5xx) and C(requests)
          (live requests without the gate's own), C(gate_requests_excluded), C(restarts_detected), C(scrapes),
          C(min_requests) and C(inconclusive).
      type: dict
    latency_ms:
      description: Latency quantile over all of the gate's probes (with the V(latency) check).
      type: dict
    duration_s:
      description: Seconds the gate took.
      type: float
  sample:
    verdict: passed
    reason: completed
    message: "health gate passed: 5 of 5 measurements successful, the last one included (0 failed, failure_limit 0)"
    measurements: 5
    successful: 5
    failed: 0
    errors: 0
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.quantnova.grandmodel.plugins.module_utils.health import (
    CHECKS,
    LIVE_ROUTES,
    PROBE_ROUTES,
    GateConfig,
    HealthGate,
    HealthGateError,
    load_manifest,
)
from ansible_collections.quantnova.grandmodel.plugins.module_utils.http_client import HttpClient, http_argument_spec


def argument_spec():
    spec = http_argument_spec()
    spec.update(
        url=dict(type="str", required=True),
        interval=dict(type="float", default=5.0),
        count=dict(type="int", default=5),
        initial_delay=dict(type="float", default=0.0),
        failure_limit=dict(type="int", default=0),
        consecutive_error_limit=dict(type="int", default=4),
        checks=dict(type="list", elements="str", choices=list(CHECKS)),
        expected_version=dict(type="str"),
        expected_color=dict(type="str"),
        expected_models=dict(type="dict"),
        manifests=dict(type="list", elements="path", default=[]),
        latency_quantile=dict(type="float", default=0.99),
        latency_threshold_ms=dict(type="float"),
        error_rate_threshold=dict(type="float"),
        error_rate_routes=dict(type="str", default=LIVE_ROUTES),
        error_rate_exclude_routes=dict(type="list", elements="str", default=list(PROBE_ROUTES)),
        error_rate_min_requests=dict(type="int", default=20),
        error_rate_inconclusive=dict(type="str", choices=["fail", "pass"], default="fail"),
        measurement_timeout=dict(type="float"),
    )
    return spec


def run_gate(params):
    config = GateConfig(
        params["url"], interval=params["interval"], count=params["count"], initial_delay=params["initial_delay"],
        failure_limit=params["failure_limit"], consecutive_error_limit=params["consecutive_error_limit"],
        checks=params["checks"], expected_version=params["expected_version"],
        expected_color=params["expected_color"], expected_models=params["expected_models"],
        manifests=[load_manifest(path) for path in params["manifests"]],
        latency_quantile=params["latency_quantile"], latency_threshold_ms=params["latency_threshold_ms"],
        error_rate_threshold=params["error_rate_threshold"],
        error_rate_routes=params["error_rate_routes"],
        error_rate_exclude_routes=params["error_rate_exclude_routes"],
        error_rate_min_requests=params["error_rate_min_requests"],
        error_rate_inconclusive=params["error_rate_inconclusive"],
        measurement_timeout=params["measurement_timeout"], timeout=params["timeout"],
    )
    client = HttpClient(timeout=params["timeout"], validate_certs=params["validate_certs"],
                        headers=params["headers"])
    return HealthGate(config, client).run()


def main():
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True)
    try:
        result = run_gate(module.params)
    except HealthGateError as exc:
        module.fail_json(msg=str(exc), **dict({"passed": False}, **exc.result))
    module.exit_json(changed=False, **result)


if __name__ == "__main__":
    main()
