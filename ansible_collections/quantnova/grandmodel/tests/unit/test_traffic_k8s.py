"""The kubernetes traffic backend, through the real `kubernetes` client, against a loopback API server.

The API server (k8s_api_fake.py) serves recorded Service/Pod objects and builds EndpointSlices the way
the endpoint controller does; faults come at the start (refused, forbidden, missing), the middle
(controller lag, pods turning unready, a concurrent edit) and the last moment (the patch is applied
but its answer never arrives; the API dies before the restore).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ColorServer, free_port
from k8s_api_fake import COLOR_LABEL, FakeApiServer, fixture

from ansible_collections.quantnova.grandmodel.plugins.module_utils.traffic import (
    FrontDoorVerifier,
    TrafficSwitchError,
    switch_traffic,
)
from ansible_collections.quantnova.grandmodel.plugins.module_utils.traffic_k8s import (
    ANNOTATION_ACTIVE,
    ANNOTATION_IN_FLIGHT,
    ANNOTATION_PREVIOUS,
    ANNOTATION_SWITCHED_AT,
    KubernetesApi,
    KubernetesBackend,
    build_api_client,
    describe_view,
    endpoint_view,
    pod_ready,
)

TOKEN = "t0ken-for-the-unit-tests"


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    server = FakeApiServer()
    server.add_color_service("blue")
    server.add_color_service("green")
    server.start()
    yield server
    server.stop()


def backend(server: FakeApiServer, request_timeout: float = 1.0, **kwargs: Any) -> KubernetesBackend:
    client, _source = build_api_client(host=server.url, api_key=TOKEN)
    options: dict[str, Any] = {"verify_timeout": 2.0, "verify_interval": 0.02, "verify_consecutive": 3}
    options.update(kwargs)
    return KubernetesBackend(KubernetesApi(client, request_timeout=request_timeout), "grandmodel", "grandmodel",
                             **options)


def patches(server: FakeApiServer) -> list[dict[str, Any]]:
    return [r for r in server.requests if r["method"] == "PATCH"]


def selector_patches(server: FakeApiServer, accepted: bool = False) -> list[str]:
    """The colours PATCH requests set on the live Service's selector, in order (only accepted ones if asked)."""
    return [p["body"]["spec"]["selector"][COLOR_LABEL] for p in patches(server)
            if "spec" in p["body"] and (not accepted or p.get("status") == 200)]


# -- reading recorded objects --------------------------------------------------------------------

def test_recorded_endpoint_slices_count_pods_once_and_honour_the_conditions() -> None:
    slices = fixture("endpointslices-dual-stack.json")["items"]
    colors = {"grandmodel-blue-7d9f8c6b5-x2k4p": "blue", "grandmodel-blue-7d9f8c6b5-q8m3n": "blue",
              "grandmodel-blue-7d9f8c6b5-f5j6l": "blue"}
    view = endpoint_view(slices, colors)
    # x2k4p ready (listed in both families: once); f5j6l ready unset -> ready; q8m3n terminating -> not ready;
    # 10.20.9.9 has no pod behind it -> other.
    assert view["blue"]["ready"] == {"grandmodel-blue-7d9f8c6b5-x2k4p", "grandmodel-blue-7d9f8c6b5-f5j6l"}
    assert view["blue"]["not_ready"] == {"grandmodel-blue-7d9f8c6b5-q8m3n"}
    assert view["other"]["ready"] == {"10.20.9.9"}
    assert describe_view(view) == "blue: 2 ready, 1 not ready; other: 1 ready"
    assert describe_view({}) == "no endpoints"


@pytest.mark.parametrize(("edit", "expected"), [
    ({}, (True, "")),
    ({"Ready": "False"}, (False, "ContainersNotReady")),
    ({"deletionTimestamp": "2026-11-02T08:00:00Z"}, (False, "terminating")),
    ({"no_conditions": True}, (False, "Pending")),
])
def test_pod_ready_reads_the_ready_condition(edit: dict[str, Any], expected: tuple[bool, str]) -> None:
    pod = fixture("pods.json")["items"][0]
    for condition in pod["status"]["conditions"]:
        if condition["type"] == "Ready" and "Ready" in edit:
            condition.update(status=edit["Ready"], reason="ContainersNotReady")
    if "deletionTimestamp" in edit:
        pod["metadata"]["deletionTimestamp"] = edit["deletionTimestamp"]
    if "no_conditions" in edit:
        pod["status"] = {"phase": "Pending"}
    assert pod_ready(pod) == expected


def test_read_state_reads_the_selector_and_notices_switches_made_by_hand(api: FakeApiServer) -> None:
    state = backend(api).read_state()
    assert (state.active, state.previous, state.source) == ("blue", None, "service_selector")
    api.edit_service("grandmodel", {"metadata": {"annotations": {ANNOTATION_ACTIVE: "green",
                                                                 ANNOTATION_PREVIOUS: "blue"}}})
    state = backend(api).read_state()  # the record says green, the selector says blue: blue was set by hand
    assert (state.active, state.previous) == ("blue", "green")
    assert api.requests[0]["authorization"] == f"Bearer {TOKEN}"


# -- switching ----------------------------------------------------------------------------------

def test_switch_patches_selector_and_record_in_one_guarded_merge_patch_then_sees_the_cutover(
        api: FakeApiServer) -> None:
    rv_before = api.services["grandmodel"]["metadata"]["resourceVersion"]
    api.endpoint_lag = 3  # the endpoint controller publishes the new selector after 3 lists
    result = switch_traffic(backend(api), "green", want_diff=True)
    assert api.live_color() == "green"
    patch, clear = patches(api)  # the switch, then (verified) the in-flight marker cleared
    assert clear["body"] == {"metadata": {"annotations": {ANNOTATION_IN_FLIGHT: None}}}
    assert patch["content_type"] == "application/merge-patch+json"
    assert patch["body"]["metadata"]["resourceVersion"] == rv_before
    assert patch["body"]["spec"] == {"selector": {COLOR_LABEL: "green"}}
    assert "fieldManager=quantnova.grandmodel.traffic_switch" in patch["path"]
    annotations = api.services["grandmodel"]["metadata"]["annotations"]
    assert annotations[ANNOTATION_ACTIVE] == "green" and annotations[ANNOTATION_PREVIOUS] == "blue"
    assert annotations["grandmodel.quantnova.io/role"] == "live"  # other annotations untouched
    assert ANNOTATION_IN_FLIGHT not in annotations
    assert result["changed"] is True and result["verified"] is True
    assert (result["active_color"], result["previous_color"]) == ("green", "blue")
    assert result["switched_at"] == annotations[ANNOTATION_SWITCHED_AT]
    verification = result["verification"]
    assert [a["answer"] for a in verification["answers"]] == ["blue: 2 ready", "green: 2 ready"]
    assert verification["answers"][0]["count"] == 3 and verification["seconds_to_cutover"] > 0
    assert verification["before"]["ready"] == 2
    assert verification["before"]["color_service"] == "grandmodel/grandmodel-green"
    assert result["diff"]["before"].endswith(f"{COLOR_LABEL}: blue\n")
    assert result["diff"]["after"].endswith(f"{COLOR_LABEL}: green\n")
    assert "app.kubernetes.io/name: grandmodel" in result["diff"]["after"]

    again = switch_traffic(backend(api), "green")  # idempotent: nothing patched the second time
    assert again["changed"] is False and len(patches(api)) == 2
    state = backend(api).read_state()
    assert (state.active, state.previous) == ("green", "blue")


def test_check_mode_reads_plans_and_diffs_but_never_patches(api: FakeApiServer) -> None:
    result = switch_traffic(backend(api), "green", check_mode=True, want_diff=True)
    assert result["changed"] is True and result["verification"] == {"skipped": "check mode"}
    assert "green" in result["diff"]["after"] and "green" not in result["diff"]["before"]
    assert patches(api) == [] and api.live_color() == "blue"


@pytest.mark.parametrize(("ready", "min_ready", "color_service", "problem"), [
    ([], 1, "{service}-{color}", "0 of the 2 pods selected by .* are ready behind service grandmodel/grandmodel-green"),
    (["grandmodel-green-5c6d7e8f9-h7t2v"], 2, "{service}-{color}", "1 of the 2 pods .* 2 needed"),
    ([], 1, "", r"0 of the 2 pods .* are ready, 1 needed \(not ready: grandmodel-green-5c6d7e8f9-h7t2v "
                r"\(ContainersNotReady\)"),
])
def test_switch_is_refused_before_any_patch_when_the_new_colour_is_not_ready(
        api: FakeApiServer, ready: list[str], min_ready: int, color_service: str, problem: str) -> None:
    api.set_color_ready("green", False)
    for name in ready:
        api.set_ready(name, True)
    with pytest.raises(TrafficSwitchError, match=problem) as caught:
        switch_traffic(backend(api, min_ready=min_ready, color_service=color_service), "green")
    assert "the live service was not touched" in str(caught.value)
    assert patches(api) == [] and api.live_color() == "blue"
    assert caught.value.result["restored"] is True  # nothing to undo counts as restored
    assert caught.value.result["restore_verification"]["skipped"] == "the service was not patched by this run"


def test_no_pod_of_the_new_colour_at_all_is_named(api: FakeApiServer) -> None:
    for name in [n for n in api.pods if "green" in n]:
        del api.pods[name]
    with pytest.raises(TrafficSwitchError, match="no pod of that colour exists"):
        switch_traffic(backend(api, color_service=""), "green")


def test_endpoints_never_cutting_over_restores_the_selector_and_blue_serves_again(api: FakeApiServer) -> None:
    api.endpoints_frozen = True  # the endpoint controller is stuck: the live slice keeps listing blue
    with pytest.raises(TrafficSwitchError, match="did not show only green pods") as caught:
        switch_traffic(backend(api, verify_timeout=0.3), "green")
    result = caught.value.result
    assert api.live_color() == "blue" and result["restored"] is True
    assert ANNOTATION_ACTIVE not in api.services["grandmodel"]["metadata"]["annotations"]
    assert selector_patches(api) == ["green", "blue"]
    assert ANNOTATION_IN_FLIGHT not in api.services["grandmodel"]["metadata"]["annotations"]
    assert result["verification"]["answers"][-1]["answer"] == "blue: 2 ready"
    assert result["restore_verification"]["verified"] is True
    assert "blue answers again" in str(caught.value)


def test_new_pods_dying_right_after_the_switch_roll_back(api: FakeApiServer) -> None:
    be = backend(api, verify_timeout=0.5)
    original = be.api.patch_service

    def patch_then_kill_green(*args: Any, **kwargs: Any) -> Any:
        answer = original(*args, **kwargs)
        if args[2].get("spec", {}).get("selector", {}).get(COLOR_LABEL) == "green":
            api.set_color_ready("green", False)  # the new colour crashes as traffic arrives
        return answer

    be.api.patch_service = patch_then_kill_green  # type: ignore[method-assign]
    with pytest.raises(TrafficSwitchError) as caught:
        switch_traffic(be, "green")
    assert api.live_color() == "blue"
    answers = [a["answer"] for a in caught.value.result["verification"]["answers"]]
    assert "green: 0 ready, 2 not ready" in answers


def test_patch_applied_but_answer_lost_is_undone(api: FakeApiServer) -> None:
    api.hang_seconds = 1.5
    api.fault("patch-service", "apply-then-hang")  # the server switches, the reply never arrives
    with pytest.raises(TrafficSwitchError, match="no answer from the Kubernetes API") as caught:
        switch_traffic(backend(api, request_timeout=0.5), "green")
    assert caught.value.result["restored"] is True
    assert api.live_color() == "blue"
    assert selector_patches(api) == ["green", "blue"]


def test_a_concurrent_change_is_refused_not_overwritten(api: FakeApiServer) -> None:
    first, second = backend(api), backend(api)
    plan_first, plan_second = first.plan("green"), second.plan("green")
    first.apply(plan_first)
    with pytest.raises(TrafficSwitchError, match="changed since it was read"):
        second.apply(plan_second)
    assert second.restore(plan_second).startswith("nothing to undo")  # a refused patch is not undone
    assert api.live_color() == "green"


def test_two_switches_racing_leave_one_patch_and_no_clobbering(api: FakeApiServer) -> None:
    api.endpoint_lag = 1
    outcomes: list[Any] = [None, None]

    def run(index: int) -> None:
        try:
            outcomes[index] = switch_traffic(backend(api, verify_timeout=3), "green")
        except TrafficSwitchError as exc:
            outcomes[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert api.live_color() == "green"
    won = [o for o in outcomes if isinstance(o, dict) and o["changed"]]
    assert len(won) == 1 and won[0]["verified"] is True
    for other in outcomes:
        if isinstance(other, TrafficSwitchError):  # planned before the winner patched: refused, nothing undone
            assert "changed since it was read" in str(other)
        elif other is not won[0]:
            assert other["changed"] is False  # planned after the winner: nothing to do
    assert set(selector_patches(api)) == {"green"}  # nothing restored
    assert selector_patches(api, accepted=True) == ["green"]


@pytest.mark.parametrize(("kind", "status", "problem"), [
    ("get-service", 404, "does not exist: create it with the quantnova.grandmodel.k8s_workloads role"),
    ("get-service", 403, "HTTP 403 .* cannot patch resource \"services\""),
    ("get-service", 500, "etcdserver: request timed out"),
    ("patch-service", 403, "patching service grandmodel/grandmodel failed: HTTP 403"),
    ("list-pods", 500, "listing pods .* failed: HTTP 500"),
])
def test_api_errors_name_what_was_attempted_and_the_servers_words(
        api: FakeApiServer, kind: str, status: int, problem: str) -> None:
    api.fault(kind, status)
    with pytest.raises(TrafficSwitchError, match=problem):
        switch_traffic(backend(api), "green")
    assert api.live_color() == "blue"


def test_a_hung_api_server_is_bounded_by_the_request_timeout(api: FakeApiServer) -> None:
    api.hang_seconds = 2
    api.fault("get-service", *["hang"] * 5)  # the client retries a GET that timed out 3 times: all hang
    started = time.monotonic()
    with pytest.raises(TrafficSwitchError, match="reading service grandmodel/grandmodel failed: no answer"):
        backend(api, request_timeout=0.3).read_state()
    assert time.monotonic() - started < 4 * 0.3 + 1.0
    assert api.count("GET", "get-service") == 4


def test_an_unreachable_api_server_fails_fast_without_restore_attempts() -> None:
    client, _source = build_api_client(host=f"http://127.0.0.1:{free_port()}", api_key=TOKEN)
    be = KubernetesBackend(KubernetesApi(client, request_timeout=1.0), "grandmodel", "grandmodel")
    with pytest.raises(TrafficSwitchError, match=r"no answer from the Kubernetes API at http://127\.0\.0\.1"):
        switch_traffic(be, "green")


def test_the_api_dying_after_the_patch_reports_the_failed_restore(api: FakeApiServer) -> None:
    api.endpoints_frozen = True
    api.fault("patch-service", None, 500, 500, 500)  # the switch goes through; every restore attempt fails
    with pytest.raises(TrafficSwitchError, match="restoring the previous state failed too") as caught:
        switch_traffic(backend(api, verify_timeout=0.2), "green")
    assert caught.value.result["restored"] is False
    assert api.live_color() == "green"  # stated, not hidden: the operator must act
    assert len(patches(api)) == 4


def test_a_transient_restore_failure_is_retried(api: FakeApiServer) -> None:
    api.endpoints_frozen = True
    api.fault("patch-service", None, 500)
    with pytest.raises(TrafficSwitchError, match=r"previous state restored \(patched the selector"):
        switch_traffic(backend(api, verify_timeout=0.2), "green")
    assert api.live_color() == "blue"
    assert selector_patches(api) == ["green", "blue", "blue"]


def test_a_service_without_selector_is_refused(api: FakeApiServer) -> None:
    api.services["grandmodel"]["spec"].pop("selector")
    with pytest.raises(TrafficSwitchError, match="has no pod selector"):
        backend(api).plan("green")


def test_unknown_colour_is_refused(api: FakeApiServer) -> None:
    with pytest.raises(TrafficSwitchError, match="must be one of blue, green"):
        backend(api).plan("purple")


def test_paged_lists_are_followed(api: FakeApiServer) -> None:
    api.page_size_cap = 1
    result = switch_traffic(backend(api, color_service=""), "green")
    assert result["verification"]["before"]["ready"] == 2
    assert any("continue=" in r["path"] for r in api.requests)


def test_front_door_verification_runs_after_the_endpoints(api: FakeApiServer) -> None:
    green = ColorServer("green").start()
    try:
        verifier = FrontDoorVerifier(f"{green.url}/version", timeout=2, consecutive=2, interval=0.01)
        result = switch_traffic(backend(api, verifier=verifier), "green")
    finally:
        green.stop()
    assert result["verification"]["front_door"]["verified"] is True
    assert result["verification"]["verified"] is True


def test_kubeconfig_with_context_reaches_the_cluster(api: FakeApiServer, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "other",
        "clusters": [{"name": "desk", "cluster": {"server": api.url}},
                     {"name": "nowhere", "cluster": {"server": f"http://127.0.0.1:{free_port()}"}}],
        "users": [{"name": "release", "user": {"token": TOKEN}}],
        "contexts": [{"name": "desk", "context": {"cluster": "desk", "user": "release", "namespace": "grandmodel"}},
                     {"name": "other", "context": {"cluster": "nowhere", "user": "release"}}],
    }))
    client, source = build_api_client(kubeconfig=str(kubeconfig), context="desk")
    state = KubernetesBackend(KubernetesApi(client, request_timeout=1), "grandmodel", "grandmodel").read_state()
    assert state.active == "blue" and "context desk" in source
    assert api.requests[-1]["authorization"] == f"Bearer {TOKEN}"


@pytest.mark.parametrize(("kwargs", "problem"), [
    ({"kubeconfig": "/nonexistent/kubeconfig"}, "cannot build a Kubernetes API client from /nonexistent/kubeconfig"),
    ({"kubeconfig": "KUBECONFIG", "context": "absent"}, "absent"),
])
def test_bad_client_configuration_is_named(tmp_path: Path, kwargs: dict[str, str], problem: str) -> None:
    if kwargs.get("kubeconfig") == "KUBECONFIG":
        path = tmp_path / "config"
        path.write_text(json.dumps({"apiVersion": "v1", "kind": "Config", "clusters": [], "users": [],
                                    "contexts": [], "current-context": ""}))
        kwargs = dict(kwargs, kubeconfig=str(path))
    with pytest.raises(TrafficSwitchError, match=problem):
        build_api_client(**kwargs)


# -- a run that dies mid-switch -------------------------------------------------------------------

def expire_marker(api: FakeApiServer) -> None:
    annotations = api.services["grandmodel"]["metadata"]["annotations"]
    marker = json.loads(annotations[ANNOTATION_IN_FLIGHT])
    marker["deadline"] = "2000-01-01T00:00:00Z"
    annotations[ANNOTATION_IN_FLIGHT] = json.dumps(marker)


def test_a_switch_killed_after_the_patch_blocks_others_then_is_undone_by_the_next_run(api: FakeApiServer) -> None:
    dead = backend(api)
    dead.apply(dead.plan("green"))  # patched, then the run is SIGKILLed: no verify, no restore
    assert api.live_color() == "green"
    with pytest.raises(TrafficSwitchError, match=r"another switch of service \S+ to green is in flight"):
        backend(api).recover()  # still within its deadline: it might be running elsewhere
    expire_marker(api)
    note = backend(api).recover()
    assert note is not None and "undid an interrupted switch" in note and note.endswith("back on blue")
    annotations = api.services["grandmodel"]["metadata"]["annotations"]
    assert api.live_color() == "blue" and ANNOTATION_IN_FLIGHT not in annotations
    assert ANNOTATION_ACTIVE not in annotations  # the record is as it was before the dead switch
    assert backend(api).recover() is None
    assert switch_traffic(backend(api), "green")["verified"] is True


def test_a_stale_marker_after_a_manual_switch_is_cleared_without_touching_traffic(api: FakeApiServer) -> None:
    dead = backend(api)
    dead.apply(dead.plan("green"))
    expire_marker(api)
    api.edit_service("grandmodel", {"spec": {"selector": {COLOR_LABEL: "blue"}}})  # an operator fixed it by hand
    note = backend(api).recover()
    assert note is not None and note.startswith("cleared a stale in-flight marker")
    assert api.live_color() == "blue"


def test_a_verified_switch_whose_marker_cannot_be_cleared_says_so(api: FakeApiServer) -> None:
    api.fault("patch-service", None, 403)  # the switch is accepted; clearing the marker is forbidden
    result = switch_traffic(backend(api), "green")
    assert result["verified"] is True and api.live_color() == "green"
    assert "the next run of the switch will undo this switch" in result["verification"]["marker_error"]
    assert ANNOTATION_IN_FLIGHT in api.services["grandmodel"]["metadata"]["annotations"]


def test_a_backup_colour_is_not_applied_by_a_selector(api: FakeApiServer) -> None:
    plan = backend(api).plan("green", backup="blue")
    assert plan.backup is None and plan.changed


def test_the_module_wiring_builds_a_working_backend(api: FakeApiServer) -> None:
    from ansible_collections.quantnova.grandmodel.plugins.module_utils.traffic_k8s import (
        build_kubernetes_backend,
        kubernetes_argument_spec,
    )

    spec = kubernetes_argument_spec()
    assert spec["api_key"]["no_log"] is True
    params = {k: v.get("default") for k, v in spec.items()}
    params.update(host=api.url, api_key=TOKEN, verify_timeout=2.0, verify_consecutive=2, verify_interval=0.05)
    result = switch_traffic(build_kubernetes_backend(params), "green", want_diff=True)
    assert result["verified"] is True and result["backend"] == "kubernetes"
    with pytest.raises(TrafficSwitchError, match="needs namespace"):
        build_kubernetes_backend(dict(params, namespace=""))


def test_an_interrupt_during_the_patch_request_counts_as_patched_and_is_undone(api: FakeApiServer) -> None:
    be = backend(api)
    original = be.api.patch_service

    def patch_then_interrupt(*args: Any, **kwargs: Any) -> Any:
        original(*args, **kwargs)
        raise KeyboardInterrupt  # SIGINT (or the switch's SIGTERM guard) after the server applied it

    be.api.patch_service = patch_then_interrupt  # type: ignore[method-assign]
    plan = be.plan("green")
    with pytest.raises(KeyboardInterrupt):
        be.apply(plan)
    assert api.live_color() == "green" and be.patched is True
    be.api.patch_service = original  # type: ignore[method-assign]
    assert be.restore(plan).startswith("patched the selector of service grandmodel/grandmodel back to")
    assert api.live_color() == "blue"
    assert ANNOTATION_IN_FLIGHT not in api.services["grandmodel"]["metadata"]["annotations"]
