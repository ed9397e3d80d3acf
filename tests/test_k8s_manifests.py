"""The k8s_workloads role's objects, rendered by Ansible itself, validated offline for several Kubernetes versions.

tests/k8s/render.yml runs the role (apply off) three ways and with twelve bad inputs in one ansible-playbook
process. Every object it would apply is validated against the OpenAPI schemas that kubernetes-validate carries
(strict: unknown fields fail), then checked for what the schemas cannot see: selectors that really pick the
pods, probes on the service's routes, Pod Security "restricted", least-privilege RBAC, no open egress, and that
the live Service is what the traffic switch's kubernetes backend expects.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import REPO, VENV_BIN

kubernetes_validate = pytest.importorskip("kubernetes_validate")

# The oldest release still in use on desks we know (1.29), the version the kubernetes role pins (1.30),
# a middle one and the newest this kubernetes-validate carries.
VERSIONS = ["1.29.0", "1.30.0", "1.33.0", "1.37.0"]
TOKEN = "unit-test-admin-token-7f3k2"
NS = "grandmodel"
COLOR_LABEL = "grandmodel.quantnova.io/color"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("k8s")
    started = time.monotonic()
    proc = subprocess.run([str(VENV_BIN / "ansible-playbook"), "tests/k8s/render.yml", "-e", f"render_root={root}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
                          env=dict(os.environ, GM_TEST_ADMIN_TOKEN=TOKEN, ANSIBLE_NOCOLOR="1"))
    print(f"rendering with ansible-playbook took {time.monotonic() - started:.1f}s")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return root


def objects(rendered: Path, run: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((rendered / run / "manifests.yaml").read_text()) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


ALL_RUNS = ["bootstrap", "options", "release"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("run", ALL_RUNS)
def test_every_object_validates_strictly_against_the_schemas(rendered: Path, run: str, version: str) -> None:
    docs = objects(rendered, run)
    if run == "bootstrap":
        docs.append(yaml.safe_load((rendered / run / "secret.yaml").read_text()))
    failures = []
    for doc in docs:
        try:
            validated = kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            failures.append(f"{doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, exc.path))}: {exc.message}")
            continue
        # A missing schema raises; a fallback to an older schema would show here.
        assert validated == version.rsplit(".", 1)[0]
    assert not failures, "\n".join(failures)


def test_the_validator_rejects_what_the_api_server_would(rendered: Path) -> None:
    """The schemas bite: a typo, a wrong type and a removed API version each fail."""
    deployment = one(objects(rendered, "bootstrap"), "Deployment", "grandmodel-blue")
    typo = json.loads(json.dumps(deployment))
    typo["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/ready"
    wrong_type = json.loads(json.dumps(deployment))
    wrong_type["spec"]["replicas"] = "two"
    for bad in (typo, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, "1.30.0", strict=True)
    old_pdb = dict(one(objects(rendered, "bootstrap"), "PodDisruptionBudget", "grandmodel-blue"),
                   apiVersion="policy/v1beta1")
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(old_pdb, "1.30.0", strict=True)


def test_bootstrap_renders_everything_shared_and_the_first_colour_only(rendered: Path) -> None:
    docs = objects(rendered, "bootstrap")
    kinds = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert kinds[0] == ("Namespace", NS)  # applied first
    assert ("Deployment", "grandmodel-blue") in kinds and ("Deployment", "grandmodel-green") not in kinds
    assert {k for k, _ in kinds} >= {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ResourceQuota",
                                      "LimitRange", "NetworkPolicy", "Service", "Deployment", "PodDisruptionBudget"}
    assert not by_kind(docs, "Ingress") and not by_kind(docs, "HorizontalPodAutoscaler")
    assert all(d["metadata"].get("namespace") == NS for d in docs if d["kind"] != "Namespace")
    assert one(docs, "Service", "grandmodel")["spec"]["selector"][COLOR_LABEL] == "blue"


def test_a_release_run_renders_only_the_idle_colours_objects(rendered: Path) -> None:
    docs = objects(rendered, "release")
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs) == [
        ("Deployment", "grandmodel-green"), ("PodDisruptionBudget", "grandmodel-green"),
        ("Service", "grandmodel-green")]
    deployment = one(docs, "Deployment", "grandmodel-green")
    assert deployment["spec"]["template"]["metadata"]["labels"]["grandmodel.quantnova.io/release"] == "2026.11.3"
    assert not (rendered / "release" / "secret.yaml").exists()


@pytest.mark.parametrize("run", ALL_RUNS)
def test_selectors_pick_exactly_the_pods_they_are_meant_to(rendered: Path, run: str) -> None:
    docs = objects(rendered, run)
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in by_kind(docs, "Deployment")}
    for deployment in by_kind(docs, "Deployment"):
        name, labels = deployment["metadata"]["name"], pods[deployment["metadata"]["name"]]
        color = name.rsplit("-", 1)[1]
        assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
        assert labels[COLOR_LABEL] == color
        assert selects(one(docs, "PodDisruptionBudget", name)["spec"]["selector"]["matchLabels"], labels)
        own = one(docs, "Service", name)["spec"]["selector"]
        assert selects(own, labels) and own[COLOR_LABEL] == color  # the health gate's way to one colour
        affinity = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        terms = affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or [
            t["podAffinityTerm"] for t in affinity["preferredDuringSchedulingIgnoredDuringExecution"]]
        assert all(selects(t["labelSelector"]["matchLabels"], labels) for t in terms)
        other = dict(labels, **{COLOR_LABEL: "blue" if color == "green" else "green"})
        assert not selects(own, other)
    live = [d for d in by_kind(docs, "Service") if d["metadata"]["name"] == "grandmodel"]
    for service in live:
        matching = [n for n, labels in pods.items() if selects(service["spec"]["selector"], labels)]
        assert len(matching) == 1, "the live Service selects exactly one colour"
    for policy in by_kind(docs, "NetworkPolicy"):
        selector = policy["spec"]["podSelector"].get("matchLabels", {})
        assert all(selects(selector, labels) for labels in pods.values())


def test_the_live_service_is_what_the_traffic_switch_backend_patches(rendered: Path) -> None:
    from ansible_collections.quantnova.grandmodel.plugins.module_utils import traffic_k8s

    docs = objects(rendered, "bootstrap")
    live = one(docs, "Service", "grandmodel")
    assert traffic_k8s.DEFAULT_COLOR_LABEL in live["spec"]["selector"]
    green_pods = one(objects(rendered, "release"), "Deployment", "grandmodel-green")["spec"]["template"]
    after = dict(live["spec"]["selector"], **{traffic_k8s.DEFAULT_COLOR_LABEL: "green"})
    assert selects(after, green_pods["metadata"]["labels"])  # the patched selector picks green's pods
    assert "{service}-{color}".format(service="grandmodel", color="green") == green_pods["metadata"]["labels"][
        "app.kubernetes.io/instance"]  # the backend's default colour Service name
    role = one(docs, "Role", "grandmodel-release")
    patch_rules = [r for r in role["rules"] if "patch" in r["verbs"] and "services" in r["resources"]]
    assert any(r.get("resourceNames") == ["grandmodel"] for r in patch_rules)


@pytest.mark.parametrize("run", ["bootstrap", "options"])
def test_pods_meet_pod_security_restricted_and_probe_the_service_routes(rendered: Path, run: str) -> None:
    docs = objects(rendered, run)
    namespace = by_kind(docs, "Namespace")[0]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for deployment in by_kind(docs, "Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec["automountServiceAccountToken"] is False
        for container in spec["containers"] + spec.get("initContainers", []):
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            assert sc["readOnlyRootFilesystem"] is True
            image = container["image"]
            assert "@sha256:" in image or (":" in image.rsplit("/", 1)[1] and not image.endswith(":latest"))
            assert container["resources"]["requests"] and container["resources"]["limits"]
        (service,) = spec["containers"]
        ports = {p["name"]: p["containerPort"] for p in service["ports"]}
        assert service["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
        assert service["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
        assert service["startupProbe"]["httpGet"]["path"] == "/health"
        env = {e["name"]: e for e in service["env"]}
        assert env["GRANDMODEL_PORT"]["value"] == str(ports["http"])
        assert env["GRANDMODEL_COLOR"]["value"] == deployment["metadata"]["name"].rsplit("-", 1)[1]
        assert json.loads(env["GRANDMODEL_MODELS"]["value"]) == ["strategic", "tactical"]
        assert "valueFrom" in env["GRANDMODEL_ADMIN_TOKEN"]  # from the Secret, never inline
        grace = spec["terminationGracePeriodSeconds"]
        assert grace > int(env["GRANDMODEL_GRACEFUL_TIMEOUT_S"]["value"])


def test_every_option_lands_where_it_should(rendered: Path) -> None:
    docs = objects(rendered, "options")
    deployment = one(docs, "Deployment", "grandmodel-green")
    spec = deployment["spec"]
    assert "replicas" not in spec, "the HPA owns the replica count"
    hpa = one(docs, "HorizontalPodAutoscaler", "grandmodel-green")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "grandmodel-green"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    pod = spec["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "desk-registry"}]
    (init,) = pod["initContainers"]
    assert init["image"].endswith(":2026.11.2") and init["command"][-1] == "/opt/grandmodel/models"
    assert "lifecycle" not in pod["containers"][0]  # prestop_delay 0
    preferred = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert preferred[0]["podAffinityTerm"]["topologyKey"] == "topology.kubernetes.io/zone"
    ingress = one(docs, "Ingress", "grandmodel")
    backends = {r["host"]: r["http"]["paths"][0]["backend"]["service"]["name"] for r in ingress["spec"]["rules"]}
    assert backends == {"grandmodel.desk.example": "grandmodel", "blue.grandmodel.desk.example": "grandmodel-blue",
                        "green.grandmodel.desk.example": "grandmodel-green"}
    assert set(ingress["spec"]["tls"][0]["hosts"]) == set(backends)
    egress = one(docs, "NetworkPolicy", "grandmodel-egress")["spec"]["egress"]
    assert [sorted(p["port"] for p in rule["ports"]) for rule in egress] == [[53, 53], [6380, 26379], [5432]]
    assert egress[2]["to"] == [{"ipBlock": {"cidr": "10.20.2.5/32"}}, {"ipBlock": {"cidr": "fd00:20:2::5/128"}}]
    ingress_rules = one(docs, "NetworkPolicy", "grandmodel-ingress")["spec"]["ingress"]
    assert ingress_rules[-1]["from"] == [{"ipBlock": {"cidr": "10.20.0.10/32"}}, {"ipBlock": {"cidr": "10.20.0.11/32"}}]
    binding = one(docs, "RoleBinding", "grandmodel-release")
    assert {"kind": "Group", "name": "desk-release-engineers", "apiGroup": "rbac.authorization.k8s.io"} in \
        binding["subjects"]


def test_network_policies_deny_by_default_and_never_open_egress(rendered: Path) -> None:
    for run in ("bootstrap", "options"):
        docs = objects(rendered, run)
        deny = one(docs, "NetworkPolicy", "default-deny")["spec"]
        assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
        for policy in by_kind(docs, "NetworkPolicy"):
            for rule in policy["spec"].get("egress", []):
                assert rule.get("to"), f"{policy['metadata']['name']}: an egress rule without `to` opens every host"
                assert rule.get("ports"), f"{policy['metadata']['name']}: an egress rule without ports opens every port"
            for rule in policy["spec"].get("ingress", []):
                assert rule.get("from") and rule["ports"] == [{"protocol": "TCP", "port": "http"}]


def test_the_release_role_is_least_privilege(rendered: Path) -> None:
    role = one(objects(rendered, "bootstrap"), "Role", "grandmodel-release")
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        assert "secrets" not in rule["resources"]
        assert not {"delete", "deletecollection", "escalate", "bind", "impersonate"} & set(rule["verbs"])
        if {"patch", "update"} & set(rule["verbs"]):
            assert rule.get("resourceNames"), f"unbounded write: {rule}"
    account = one(objects(rendered, "bootstrap"), "ServiceAccount", "grandmodel")
    assert account["automountServiceAccountToken"] is False


def test_the_admin_token_never_reaches_a_rendered_file(rendered: Path) -> None:
    secret = yaml.safe_load((rendered / "bootstrap" / "secret.yaml").read_text())
    assert secret["stringData"] == {"admin-token": "REDACTED"}
    for path in rendered.rglob("*"):
        if path.is_file():
            assert TOKEN not in path.read_text(), f"{path} holds the admin token"


@pytest.mark.parametrize(("case", "expected"), [
    ("latest_image", "must be pinned as registry/name@sha256"),
    ("untagged_image", "grandmodel-service' (and model image '') must be pinned"),
    ("bad_release", "release '2026.11.1 hotfix' a label value"),
    ("bad_color", "deploy colour 'purple' among them"),
    ("long_name", "at most 40 characters"),
    ("pdb_blocks_drains", "minAvailable (1) must be below the smallest count"),
    ("hpa_min_above_max", "with 5 to 3 pods per colour"),
    ("quota_too_small", "pods >= 6, is 4"),
    ("not_a_cidr", "['10.20.0.10'] in k8s_workloads_probe_cidrs"),
    ("weak_token", "k8s_workloads_admin_token is a known default or shorter than 16 characters"),
    ("replicas_not_int", "k8s_workloads_replicas' is of type str and we were unable to convert to int"),
    ("bad_anti_affinity", "k8s_workloads_anti_affinity must be one of: required, preferred, got: sometimes"),
])
def test_bad_input_is_refused_with_a_message_that_says_what_to_fix(rendered: Path, case: str, expected: str) -> None:
    refusals = json.loads((rendered / "invalid.json").read_text())
    assert set(refusals) == {"latest_image", "untagged_image", "bad_release", "bad_color", "long_name",
                             "pdb_blocks_drains", "hpa_min_above_max", "quota_too_small", "not_a_cidr", "weak_token",
                             "replicas_not_int", "bad_anti_affinity"}
    assert refusals[case] != "ACCEPTED"
    assert expected in refusals[case]
    assert "changeme" not in refusals[case]
