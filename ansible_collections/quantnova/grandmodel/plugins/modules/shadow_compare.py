# -*- coding: utf-8 -*-
# Copyright: (c) 2025, GrandModel Ops
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: shadow_compare
short_description: Compare a release's idle colour with the live colour on the same mirrored requests
version_added: 0.1.0
description:
  - Read-only release analysis for the shadow phase of a blue-green release. While the new colour is idle the
    front door (role C(quantnova.grandmodel.loadbalancer), C(loadbalancer_shadow_color)) mirrors live predict
    requests to it with the same C(X-Request-ID); the client only ever sees the live colour's answer.
  - Each colour's service remembers the answers to requests that carried an C(X-Request-ID) in a bounded ring
    (C(GRANDMODEL_SHADOW_RING_SIZE)), read here through C(GET /admin/shadow) with the admin token, on every URL
    of O(baseline) and O(candidate) (one per app host).
  - The two colours' records are joined on the request id. Measured on the joined requests, per sample of each
    request - the action agreement rate (share of samples where both colours chose the same action), the largest
    absolute probability difference of any action, the candidate / baseline latency ratio of the median and of
    the 99th percentile (the services' own time to answer, both answering the same request at the same time),
    and the error ratio of each colour (non-200 answers / joined requests).
  - The outcome is V(successful), V(failed) (a tolerance was exceeded; the message names every such check) or
    V(inconclusive) (a ring could not be read, for example a hung or stopped colour, or fewer than O(min_joined)
    requests were answered by both). Every figure is returned as evidence.
  - The module fails when the outcome is one of O(fail_on) (by default V(failed) and V(inconclusive)), and on bad
    input, with a message that says what was attempted, on what, and why.
author:
  - GrandModel Ops (@quantnova)
attributes:
  check_mode:
    support: full
    description: The module only reads; it runs the same way in check mode.
  diff_mode:
    support: none
    description: Nothing is changed, so there is nothing to diff.
  platform:
    support: full
    platforms: posix
    description: Any host with Python 3 that can reach each colour's service (the URLs of O(baseline) and O(candidate)).
options:
  baseline:
    description: The live colour, whose answers the clients get.
    type: dict
    required: true
    suboptions:
      color:
        description: The colour's name; each ring must answer as this colour.
        type: str
        required: true
      urls:
        description: Base URL of the colour's service on each app host, for example C(http://app-1:8001).
        type: list
        elements: str
        required: true
  candidate:
    description: The idle colour that received the mirrored requests (the release).
    type: dict
    required: true
    suboptions:
      color:
        description: The colour's name; each ring must answer as this colour.
        type: str
        required: true
      urls:
        description: Base URL of the colour's service on each app host.
        type: list
        elements: str
        required: true
  admin_token:
    description: Bearer token of the services' C(/admin/*) endpoints (C(GRANDMODEL_ADMIN_TOKEN)).
    type: str
    required: true
  model:
    description: Compare only this model's requests (for example V(strategic)); all models when unset.
    type: str
  since:
    description:
      - Unix time; records the services made before it are ignored (the start of the shadow window).
      - The services' clocks are used, so allow for skew between the hosts.
    type: float
  limit:
    description: Newest records read from each ring.
    type: int
    default: 10000
  min_joined:
    description: Requests both colours must have answered; fewer makes the comparison inconclusive.
    type: int
    default: 50
  tolerances:
    description: At least one. Each bounds a figure of the candidate against the baseline on the joined requests.
    type: dict
    required: true
    suboptions:
      agreement_min:
        description: Lowest share of samples (0 to 1) where both colours chose the same action, for example V(0.99).
        type: float
      probability_diff_max:
        description: Largest absolute difference of any action's probability on any sample, for example V(0.05).
        type: float
      latency_ratio_p50_max:
        description: Highest candidate / baseline median latency, for example V(1.5).
        type: float
      latency_ratio_p99_max:
        description: Highest candidate / baseline 99th percentile latency, for example V(2.0).
        type: float
      error_ratio_delta_max:
        description: Highest candidate error ratio minus the baseline's, for example V(0) (no more errors).
        type: float
  timeout:
    description: Seconds to wait for each ring; a hung colour makes the comparison inconclusive after it.
    type: float
    default: 10.0
  validate_certs:
    description: Verify the TLS certificate of C(https://) URLs.
    type: bool
    default: true
  fail_on:
    description:
      - Outcomes that make the module fail (the result and evidence are returned either way).
      - V([failed]) leaves inconclusive to the caller, V([]) never fails on the outcome.
    type: list
    elements: str
    choices: [failed, inconclusive]
    default: [failed, inconclusive]
notes:
  - Requests answered by only one colour are counted (C(baseline_records), C(candidate_records) in RV(statistics))
    but not compared; the mirror is best effort, nginx drops a mirror that
    times out.
  - A request one colour answered with an error is not compared for agreement or latency; it counts in that
    colour's error ratio.
seealso:
  - module: quantnova.grandmodel.prometheus_analysis
  - module: quantnova.grandmodel.health_gate
  - name: nginx mirror module
    description: How the front door copies each request to the shadow colour.
    link: https://nginx.org/en/docs/http/ngx_http_mirror_module.html
"""

EXAMPLES = r"""
- name: Ensure the new colour agrees with the live one on the mirrored requests
  quantnova.grandmodel.shadow_compare:
    baseline:
      color: blue
      urls: [http://app-1.prod.internal:8001, http://app-2.prod.internal:8001]
    candidate:
      color: green
      urls: [http://app-1.prod.internal:8002, http://app-2.prod.internal:8002]
    admin_token: "{{ model_service_admin_token }}"
    since: "{{ __shadow_started }}"
    min_joined: 200
    tolerances:
      agreement_min: 0.99
      probability_diff_max: 0.05
      latency_ratio_p50_max: 1.5
      latency_ratio_p99_max: 2.0
      error_ratio_delta_max: 0.0
  register: __shadow
"""

RETURN = r"""
outcome:
  description: V(successful), V(failed) or V(inconclusive).
  returned: always
  type: str
  sample: failed
reason:
  description:
    - V(within_tolerances), V(tolerance) (failed), V(too_few_joined), V(not_measured), V(ring_unreachable),
      V(ring_refused) or V(ring_error).
  returned: always
  type: str
  sample: tolerance
message:
  description: One sentence per check that decided the outcome, with the value and the tolerance.
  returned: always
  type: str
  sample: "comparison failed on 400 joined requests: agreement_min: agreement 0.62 (must be >= 0.99)"
failed_checks:
  description: Names of the tolerances exceeded.
  returned: always
  type: list
  elements: str
  sample: [agreement_min]
checks:
  description: Per configured tolerance, C(status) (V(passed), V(failed), V(inconclusive)), C(value), C(threshold)
    and C(message).
  returned: always
  type: dict
statistics:
  description:
    - C(baseline_records), C(candidate_records), C(joined), C(both_successful), C(samples_compared), C(agreement),
      C(probability_diff_max), C(baseline_latency_ms) and C(candidate_latency_ms) (C(p50), C(p99)),
      C(latency_ratio_p50), C(latency_ratio_p99), C(baseline_error_ratio), C(candidate_error_ratio),
      C(error_ratio_delta), C(baseline_errors), C(candidate_errors) and up to ten C(disagreements).
    - Empty when a ring could not be read.
  returned: always
  type: dict
rings:
  description: Every ring read (C(color), C(url), C(size), C(recorded), C(capacity), C(service_version)) or the
    C(error) of the one that could not be.
  returned: always
  type: list
  elements: dict
baseline:
  description: The baseline colour.
  returned: always
  type: str
candidate:
  description: The candidate colour.
  returned: always
  type: str
tolerances:
  description: The tolerances that were set.
  returned: always
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.quantnova.grandmodel.plugins.module_utils.http_client import HttpClient
from ansible_collections.quantnova.grandmodel.plugins.module_utils.shadow_compare import (
    TOLERANCES,
    ShadowCompareError,
    Tolerances,
    run_comparison,
)


def argument_spec():
    colour = dict(color=dict(type="str", required=True), urls=dict(type="list", elements="str", required=True))
    return dict(
        baseline=dict(type="dict", required=True, options=colour),
        candidate=dict(type="dict", required=True, options=colour),
        admin_token=dict(type="str", required=True, no_log=True),
        model=dict(type="str"),
        since=dict(type="float"),
        limit=dict(type="int", default=10000),
        min_joined=dict(type="int", default=50),
        tolerances=dict(type="dict", required=True, options={name: dict(type="float") for name in TOLERANCES}),
        timeout=dict(type="float", default=10.0),
        validate_certs=dict(type="bool", default=True),
        fail_on=dict(type="list", elements="str", choices=["failed", "inconclusive"],
                     default=["failed", "inconclusive"]),
    )


def main():
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True)
    params = module.params
    baseline, candidate = params["baseline"], params["candidate"]
    client = HttpClient(timeout=params["timeout"], validate_certs=params["validate_certs"])
    tolerances = Tolerances(**{name: params["tolerances"].get(name) for name in TOLERANCES})
    try:
        result = run_comparison(client, params["admin_token"], baseline, candidate, tolerances,
                                min_joined=params["min_joined"], limit=params["limit"], model=params["model"],
                                since=params["since"])
    except ShadowCompareError as exc:
        module.fail_json(msg="Cannot compare the shadow colour %s with the live colour %s: %s"
                         % (candidate["color"], baseline["color"], exc))
    if result["outcome"] in params["fail_on"]:
        module.fail_json(msg="Shadow comparison of %s (%s) against the live colour %s (%s): %s"
                         % (candidate["color"], ", ".join(candidate["urls"]), baseline["color"],
                            ", ".join(baseline["urls"]), result["message"]), **result)
    module.exit_json(changed=False, **result)


if __name__ == "__main__":
    main()
