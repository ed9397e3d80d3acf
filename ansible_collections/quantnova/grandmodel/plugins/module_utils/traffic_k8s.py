# -*- coding: utf-8 -*-
# Copyright: (c) 2025, GrandModel Ops
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Blue-green traffic switching on Kubernetes: the live Service's selector names the colour.

The live Service (for example C(grandmodel)) selects the service's pods by their common labels plus
one colour label (C(grandmodel.quantnova.io/color: blue)). A switch is one merge patch of that label
and of three record annotations, guarded by the Service's resourceVersion so a concurrent change is
refused instead of overwritten:

1. before: the pods the new selector will pick (read through the colour's own Service endpoints, or
   the pods themselves) must include at least C(min_ready) ready pods, or nothing is patched;
2. patch: selector and record annotations in one request;
3. after: the live Service's EndpointSlices must list only pods of the new colour, at least
   C(min_ready) of them ready, C(consecutive) polls in a row (optionally also through a front-door URL);
4. on any failure the selector and annotations are patched back and the old colour's endpoints
   are watched again.

The backend talks to the API through the official C(kubernetes) client with raw JSON
(C(_preload_content=False)), so it depends on no generated model class and works with old and new
client releases alike. Every call is bounded by C(request_timeout).
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import time

from ansible_collections.quantnova.grandmodel.plugins.module_utils.traffic import (
    COLORS,
    SwitchPlan,
    TrafficBackend,
    TrafficState,
    TrafficSwitchError,
)


def _kubernetes_installed():
    try:
        return importlib.util.find_spec("kubernetes") is not None
    except (ImportError, ValueError):
        return False


# The library is imported only when the kubernetes backend is used: importing it costs about a second,
# which every nginx switch would otherwise pay.
HAS_KUBERNETES = _kubernetes_installed()
KUBERNETES_IMPORT_ERROR = None if HAS_KUBERNETES else "the Python library `kubernetes` is not installed"
_LIB = {}


def _lib():
    """The kubernetes client pieces the backend uses, imported on first use."""
    if not _LIB:
        try:
            from kubernetes import client, config  # pylint: disable=import-outside-toplevel
            from kubernetes.client.exceptions import ApiException  # pylint: disable=import-outside-toplevel
            from urllib3.exceptions import (  # pylint: disable=import-outside-toplevel
                ConnectTimeoutError,
                NewConnectionError,
            )
        except ImportError as exc:
            raise TrafficSwitchError("the kubernetes backend needs the `kubernetes` Python library on the host "
                                     "running the module (pip install kubernetes): %s" % exc) from exc
        _LIB.update(client=client, config=config, ApiException=ApiException,
                    never_sent=(NewConnectionError, ConnectTimeoutError))
    return _LIB


DEFAULT_COLOR_LABEL = "grandmodel.quantnova.io/color"
ANNOTATION_PREFIX = "grandmodel.quantnova.io/"
ANNOTATION_ACTIVE = ANNOTATION_PREFIX + "active-color"
ANNOTATION_PREVIOUS = ANNOTATION_PREFIX + "previous-color"
ANNOTATION_SWITCHED_AT = ANNOTATION_PREFIX + "switched-at"
# Set with the selector, cleared once the switch is verified (or undone): a switch that died in between
# (SIGKILL, a lost controller) leaves it behind, and the next run undoes that switch (recover()).
ANNOTATION_IN_FLIGHT = ANNOTATION_PREFIX + "switch-in-flight"
RECORD_ANNOTATIONS = (ANNOTATION_ACTIVE, ANNOTATION_PREVIOUS, ANNOTATION_SWITCHED_AT)
# Seconds beyond verify_timeout after which an in-flight marker counts as left by a dead run.
IN_FLIGHT_GRACE = 60
FIELD_MANAGER = "quantnova.grandmodel.traffic_switch"
MERGE_PATCH = "application/merge-patch+json"
_MAX_PAGES = 50


def _now(offset=0.0):
    moment = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=offset)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def selector_string(selector):
    """{'a': '1', 'b': '2'} -> 'a=1,b=2' (sorted, the form labelSelector= takes)."""
    return ",".join("%s=%s" % (key, selector[key]) for key in sorted(selector))


def render_selector(namespace, name, selector):
    """The text shown in a diff: the Service's selector, one label per line."""
    lines = ["# spec.selector of service %s/%s" % (namespace, name)]
    lines += ["%s: %s" % (key, selector[key]) for key in sorted(selector)]
    return "\n".join(lines) + "\n"


def _status_message(exc):
    """The API server's own words from an ApiException (its Status body), else the HTTP reason."""
    body = getattr(exc, "body", None)
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if body:
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if isinstance(data, dict) and data.get("message"):
            return str(data["message"])
        return str(body).strip()[:300]
    return str(getattr(exc, "reason", "") or exc)


# -- the API client ------------------------------------------------------------------------------

def build_api_client(kubeconfig=None, context=None, host=None, api_key=None, validate_certs=None,
                     ca_cert=None):
    """An ApiClient from explicit host/token, a kubeconfig (file, context) or the in-cluster account.

    Order: O(host) given -> that host (with O(api_key) as bearer token); else the kubeconfig
    (O(kubeconfig), or $KUBECONFIG / ~/.kube/config); else the pod's service account.
    """
    lib = _lib()
    k8s_client, k8s_config = lib["client"], lib["config"]
    try:
        if host:
            configuration = k8s_client.Configuration()
            configuration.host = host
            if api_key:
                configuration.api_key = {"authorization": api_key}
                configuration.api_key_prefix = {"authorization": "Bearer"}
            source = "host %s" % host
        else:
            configuration = k8s_client.Configuration()
            try:
                k8s_config.load_kube_config(config_file=kubeconfig, context=context,
                                            client_configuration=configuration, persist_config=False)
                source = "kubeconfig %s%s" % (kubeconfig or "(default)", " context %s" % context if context else "")
            except (k8s_config.ConfigException, OSError, TypeError):
                if kubeconfig or context:
                    raise
                k8s_config.load_incluster_config(client_configuration=configuration)
                source = "in-cluster service account"
        if validate_certs is not None:
            configuration.verify_ssl = bool(validate_certs)
        if ca_cert:
            configuration.ssl_ca_cert = ca_cert
        return k8s_client.ApiClient(configuration), source
    except TrafficSwitchError:
        raise
    except Exception as exc:  # ConfigException, YAML errors, missing files: all mean "no usable client"
        where = host or kubeconfig or "the default kubeconfig or the in-cluster service account"
        raise TrafficSwitchError("cannot build a Kubernetes API client from %s: %s" % (where, exc)) from exc


class KubernetesApi:
    """The four calls the backend makes, raw JSON in and out, each bounded by `request_timeout` seconds."""

    def __init__(self, api_client, request_timeout=10.0, source=None):
        self.lib = _lib()
        k8s_client = self.lib["client"]
        self.api_client = api_client
        self.request_timeout = float(request_timeout)
        self.core = k8s_client.CoreV1Api(api_client)
        self.discovery = k8s_client.DiscoveryV1Api(api_client)
        self.host = getattr(getattr(api_client, "configuration", None), "host", None)
        self.source = source or self.host

    def _call(self, what, func, *args, **kwargs):
        kwargs.update(_preload_content=False, _request_timeout=self.request_timeout)
        try:
            response = func(*args, **kwargs)
            data = response.data
        except self.lib["ApiException"] as exc:
            raise KubernetesApiError("%s failed: HTTP %s %s: %s" % (what, exc.status, exc.reason or "",
                                                                    _status_message(exc)),
                                     status=exc.status) from exc
        except Exception as exc:  # urllib3 timeouts, refused connections, TLS errors
            # A request that never connected cannot have changed anything; any other failure might have.
            reason = getattr(exc, "reason", exc)
            never_sent = isinstance(reason, self.lib["never_sent"])
            raise KubernetesApiError("%s failed: no answer from the Kubernetes API at %s within %.0fs: %s"
                                     % (what, self.host, self.request_timeout, exc), status=None,
                                     uncertain=not never_sent) from exc
        try:
            return json.loads(data)
        except (TypeError, ValueError) as exc:
            raise KubernetesApiError("%s failed: the API server at %s did not answer JSON" % (what, self.host),
                                     status=None) from exc

    def get_service(self, namespace, name):
        return self._call("reading service %s/%s" % (namespace, name),
                          self.core.read_namespaced_service, name, namespace)

    def patch_service(self, namespace, name, patch, field_manager=FIELD_MANAGER):
        return self._call("patching service %s/%s" % (namespace, name),
                          self.core.patch_namespaced_service, name, namespace, patch,
                          field_manager=field_manager, _content_type=MERGE_PATCH)

    def _list(self, what, func, namespace, label_selector):
        items, token = [], None
        for _page in range(_MAX_PAGES):
            kwargs = {"label_selector": label_selector, "limit": 500}
            if token:
                kwargs["_continue"] = token
            data = self._call(what, func, namespace, **kwargs)
            items.extend(data.get("items") or [])
            token = (data.get("metadata") or {}).get("continue")
            if not token:
                return items
        raise KubernetesApiError("%s failed: more than %d pages" % (what, _MAX_PAGES), status=None)

    def list_pods(self, namespace, label_selector):
        return self._list("listing pods %s in namespace %s" % (label_selector, namespace),
                          self.core.list_namespaced_pod, namespace, label_selector)

    def list_endpoint_slices(self, namespace, service):
        return self._list("listing the EndpointSlices of service %s/%s" % (namespace, service),
                          self.discovery.list_namespaced_endpoint_slice, namespace,
                          "kubernetes.io/service-name=%s" % service)


class KubernetesApiError(TrafficSwitchError):
    """An API call failed. `status` is the HTTP status, None when no answer came (then `uncertain`)."""

    def __init__(self, msg, status=None, uncertain=False):
        super().__init__(msg, api_status=status)
        self.status = status
        self.uncertain = uncertain


# -- reading pods and endpoints -------------------------------------------------------------------

def pod_ready(pod):
    """(ready, why-not) from a Pod's status: the Ready condition, and not being deleted."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    if meta.get("deletionTimestamp"):
        return False, "terminating"
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Ready":
            if condition.get("status") == "True":
                return True, ""
            return False, condition.get("reason") or status.get("phase") or "not ready"
    return False, status.get("phase") or "no Ready condition"


def endpoint_view(slices, pod_colors):
    """Per colour, the pods behind a Service's EndpointSlices: {colour: {"ready": set, "not_ready": set}}.

    A pod appears once per address family (dual stack) and is counted once. A nil `ready` condition
    counts as ready, as the EndpointSlice API tells consumers to. Endpoints not backed by a known pod
    are grouped under "other".
    """
    view = {}
    for item in slices:
        for endpoint in item.get("endpoints") or []:
            ref = endpoint.get("targetRef") or {}
            name = ref.get("name") if ref.get("kind", "Pod") == "Pod" else None
            color = pod_colors.get(name, "other") if name else "other"
            key = name or ",".join(endpoint.get("addresses") or []) or "?"
            conditions = endpoint.get("conditions") or {}
            ready = conditions.get("ready") is not False and not conditions.get("terminating")
            entry = view.setdefault(color, {"ready": set(), "not_ready": set()})
            entry["ready" if ready else "not_ready"].add(key)
    for entry in view.values():
        entry["not_ready"] -= entry["ready"]
    return view


def describe_view(view):
    if not view:
        return "no endpoints"
    parts = []
    for color in sorted(view):
        entry = view[color]
        text = "%s: %d ready" % (color, len(entry["ready"]))
        if entry["not_ready"]:
            text += ", %d not ready" % len(entry["not_ready"])
        parts.append(text)
    return "; ".join(parts)


# -- the backend ----------------------------------------------------------------------------------

class ServicePlan(SwitchPlan):
    """A SwitchPlan with what the Service patch and its undo need."""

    def __init__(self, state, color, before, after, target, *, selector_before, selector_after,
                 resource_version, annotations_before):
        super().__init__(state, color, before, after, target)
        self.selector_before = selector_before
        self.selector_after = selector_after
        self.resource_version = resource_version
        self.annotations_before = annotations_before


class KubernetesBackend(TrafficBackend):
    """The live Service's selector names the colour; switching patches it (see the module docstring)."""

    name = "kubernetes"

    def __init__(self, api, namespace, service, *, color_label=DEFAULT_COLOR_LABEL, color_service="{service}-{color}",
                 min_ready=1, verify_timeout=60.0, verify_consecutive=3, verify_interval=1.0, verifier=None,
                 field_manager=FIELD_MANAGER, restore_attempts=3, sleep=time.sleep, clock=time.monotonic):
        self.api = api
        self.namespace = namespace
        self.service = service
        self.color_label = color_label
        self.color_service = color_service or ""
        self.min_ready = max(1, int(min_ready))
        self.verify_timeout = float(verify_timeout)
        self.consecutive = max(1, int(verify_consecutive))
        self.interval = float(verify_interval)
        self.verifier = verifier
        self.field_manager = field_manager
        self.restore_attempts = max(1, int(restore_attempts))
        self.sleep = sleep
        self.clock = clock
        self.patched = False
        self.restored = False
        self.record = {}
        self.precheck = {}
        self.backup_ignored = None
        self._plan = None

    @property
    def target(self):
        return "service %s/%s" % (self.namespace, self.service)

    # reading ---------------------------------------------------------------------------------
    def _service(self):
        try:
            svc = self.api.get_service(self.namespace, self.service)
        except KubernetesApiError as exc:
            if exc.status == 404:
                raise KubernetesApiError(
                    "%s does not exist: create it with the quantnova.grandmodel.k8s_workloads role (it selects the "
                    "live colour through the label %s)" % (self.target, self.color_label), status=404) from exc
            raise
        spec = svc.get("spec") or {}
        if spec.get("type") == "ExternalName" or not spec.get("selector"):
            raise TrafficSwitchError(
                "%s has no pod selector (type %s): the kubernetes backend switches colours by the selector label %s"
                % (self.target, spec.get("type") or "ClusterIP", self.color_label))
        return svc

    def _state(self, svc):
        selector = (svc.get("spec") or {}).get("selector") or {}
        annotations = (svc.get("metadata") or {}).get("annotations") or {}
        active = selector.get(self.color_label)
        recorded = annotations.get(ANNOTATION_ACTIVE)
        previous = annotations.get(ANNOTATION_PREVIOUS)
        if recorded and active and recorded != active:
            # Someone changed the selector without this module: the recorded colour is the one before it.
            previous = recorded
        return TrafficState(active=active, previous=previous, switched_at=annotations.get(ANNOTATION_SWITCHED_AT),
                            source="service_selector" if active else None)

    def read_state(self):
        return self._state(self._service())

    def plan(self, color, backup=None):
        """`backup` (nginx keeps the old colour as a backup server) has no Service equivalent: the old colour
        stays warm as its own Deployment and a rollback switches the selector back, so it is not applied."""
        self.backup_ignored = backup
        if color not in COLORS:
            raise TrafficSwitchError("cannot switch %s to %r: the colour must be one of %s"
                                     % (self.target, color, ", ".join(COLORS)))
        svc = self._service()
        meta = svc.get("metadata") or {}
        selector = dict(svc["spec"]["selector"])
        after = dict(selector)
        after[self.color_label] = color
        annotations = meta.get("annotations") or {}
        return ServicePlan(
            self._state(svc), color, render_selector(self.namespace, self.service, selector),
            render_selector(self.namespace, self.service, after), self.target,
            selector_before=selector, selector_after=after, resource_version=meta.get("resourceVersion"),
            annotations_before={key: annotations.get(key) for key in RECORD_ANNOTATIONS})

    def _base_selector(self, selector):
        """The selector of every colour's pods: the Service's labels without the colour, plus `colour exists`."""
        base = {k: v for k, v in selector.items() if k != self.color_label}
        return ",".join(filter(None, [selector_string(base), self.color_label]))

    def _pod_colors(self, selector):
        pods = self.api.list_pods(self.namespace, self._base_selector(selector))
        return {(p.get("metadata") or {}).get("name"): ((p.get("metadata") or {}).get("labels") or {}).get(
            self.color_label) for p in pods}

    # before ----------------------------------------------------------------------------------
    def check_ready(self, plan):
        """The pods the new selector will pick: at least min_ready of them must be ready. Returns evidence."""
        color = plan.color
        wanted = selector_string(plan.selector_after)
        pods = self.api.list_pods(self.namespace, wanted)
        ready, not_ready = [], []
        for pod in pods:
            ok, why = pod_ready(pod)
            name = (pod.get("metadata") or {}).get("name")
            (ready if ok else not_ready).append(name if ok else "%s (%s)" % (name, why))
        evidence = {"selector": wanted, "pods": len(pods), "ready_pods": sorted(ready),
                    "not_ready_pods": sorted(not_ready), "min_ready": self.min_ready}
        if self.color_service:
            svc_name = self.color_service.format(service=self.service, color=color)
            slices = self.api.list_endpoint_slices(self.namespace, svc_name)
            view = endpoint_view(slices, {name: color for name in ready})
            ready_behind = sorted((view.get(color) or {}).get("ready") or [])
            evidence["color_service"] = "%s/%s" % (self.namespace, svc_name)
            evidence["color_service_endpoints"] = describe_view(view)
            evidence["color_service_ready"] = ready_behind
            ready = ready_behind  # ready pods that the colour's own Service really reaches
        evidence["ready"] = len(ready)
        if len(ready) < self.min_ready:
            where = (" behind service %s" % evidence["color_service"]) if self.color_service else ""
            raise TrafficSwitchError(
                "refusing to switch %s to %s: %d of the %d pods selected by %s are ready%s, %d needed (not ready: "
                "%s); the live service was not touched"
                % (self.target, color, len(ready), len(pods), wanted, where, self.min_ready,
                   ", ".join(not_ready[:5]) or "none; no pod of that colour exists"), precheck=evidence)
        return evidence

    # switching -------------------------------------------------------------------------------
    def apply(self, plan):
        self.patched = self.restored = False
        self._plan = plan
        self.precheck = self.check_ready(plan)
        state = plan.state
        previous = state.active if state.active and state.active != plan.color else state.previous
        self.record = {"active": plan.color, "previous": previous, "switched_at": _now()}
        marker = {"from": plan.selector_before.get(self.color_label), "to": plan.color,
                  "started": self.record["switched_at"],
                  "deadline": _now(self.verify_timeout + IN_FLIGHT_GRACE + 2 * self.api.request_timeout),
                  "annotations_before": plan.annotations_before}
        patch = {
            "metadata": {
                "annotations": {ANNOTATION_ACTIVE: plan.color, ANNOTATION_PREVIOUS: previous,
                                ANNOTATION_SWITCHED_AT: self.record["switched_at"],
                                ANNOTATION_IN_FLIGHT: json.dumps(marker, sort_keys=True)},
            },
            "spec": {"selector": {self.color_label: plan.color}},
        }
        if plan.resource_version:
            patch["metadata"]["resourceVersion"] = plan.resource_version
        # Until the server has answered, the patch may have been applied (a lost answer, a signal or an
        # interrupt in the middle of the request): count it as made, so restore() undoes it (idempotent).
        self.patched = True
        try:
            self.api.patch_service(self.namespace, self.service, patch, field_manager=self.field_manager)
        except KubernetesApiError as exc:
            self.patched = exc.uncertain  # a refusal by the server changed nothing
            if exc.status == 409:
                raise KubernetesApiError(
                    "%s changed since it was read (resourceVersion %s): another switch or an edit happened meanwhile; "
                    "nothing was patched, read the live colour again and retry" % (self.target, plan.resource_version),
                    status=409) from exc
            raise
        self.patched = True

    def verify(self, color):
        if self._plan is not None and not self.patched and color != self._plan.color and not self.restored:
            # apply() refused before changing anything: the live service is as it was, nothing to watch.
            return {"verified": False, "skipped": "the service was not patched by this run"}
        selector = dict((self._plan.selector_after if self._plan else {}) or {})
        if not selector:
            selector = dict(self._service()["spec"]["selector"])
        selector[self.color_label] = color
        evidence = self._watch_endpoints(color, selector)
        if self.precheck and self.precheck.get("selector") == selector_string(selector):
            evidence["before"] = self.precheck
        if self.verifier is not None:
            evidence["front_door"] = self.verifier.verify(color)
        if self.patched and self._plan is not None and color == self._plan.color:
            # Verified: the switch is complete, so its in-flight marker goes. If that fails, traffic is on the
            # verified colour but the next run will switch back to the previous (warm) colour: say so.
            try:
                self._patch_with_retries({"metadata": {"annotations": {ANNOTATION_IN_FLIGHT: None}}},
                                         "clearing the in-flight marker of %s" % self.target)
                self.patched = False
            except TrafficSwitchError as exc:
                evidence["marker_error"] = "%s; the next run of the switch will undo this switch" % exc
        return evidence

    def _watch_endpoints(self, color, selector):
        """Poll the live Service's EndpointSlices until only `color`'s pods are behind it, `consecutive` times."""
        started = self.clock()
        answers = []
        streak, first_of_streak, polls = 0, None, 0
        while True:
            try:
                view = endpoint_view(self.api.list_endpoint_slices(self.namespace, self.service),
                                     self._pod_colors(selector))
                answer = describe_view(view)
                others = [c for c in view if c != color]
                good = not others and len((view.get(color) or {}).get("ready") or ()) >= self.min_ready
            except KubernetesApiError as exc:
                answer, good = "error: %s" % exc, False
            polls += 1
            elapsed = self.clock() - started
            if answers and answers[-1][0] == answer:
                answers[-1][1] += 1
            else:
                answers.append([answer, 1, round(elapsed, 3)])
            if good:
                streak += 1
                first_of_streak = elapsed if first_of_streak is None else first_of_streak
            else:
                streak, first_of_streak = 0, None
            evidence = {
                "service": "%s/%s" % (self.namespace, self.service), "expected_color": color, "polls": polls,
                "answers": [{"answer": a, "count": n, "first_seen_s": t} for a, n, t in answers],
                "consecutive_required": self.consecutive, "min_ready": self.min_ready,
                "elapsed_s": round(elapsed, 3),
                "seconds_to_cutover": round(first_of_streak, 3) if first_of_streak is not None else None,
            }
            if streak >= self.consecutive:
                evidence["verified"] = True
                return evidence
            if elapsed >= self.verify_timeout:
                evidence["verified"] = False
                seen = ", ".join("%s x%d" % (a, n) for a, n, _t in answers[-4:])
                raise TrafficSwitchError(
                    "the endpoints of %s did not show only %s pods (at least %d ready) %d polls in a row within %.1fs "
                    "(last observations: %s)" % (self.target, color, self.min_ready, self.consecutive,
                                                 self.verify_timeout, seen), verification=evidence)
            self.sleep(self.interval)

    def restore(self, plan):
        if not self.patched:
            return "nothing to undo (the service was not patched)"
        before = plan.selector_before.get(self.color_label)
        self._put_back(before, plan.annotations_before, "patching the selector of %s back to %s=%s"
                       % (self.target, self.color_label, before))
        self.patched, self.restored = False, True
        return "patched the selector of %s back to %s=%s" % (self.target, self.color_label, before)

    def _put_back(self, color, annotations, what):
        patch = {"metadata": {"annotations": dict(annotations or {}, **{ANNOTATION_IN_FLIGHT: None})},
                 "spec": {"selector": {self.color_label: color}}}
        self._patch_with_retries(patch, what)

    def _patch_with_retries(self, patch, what):
        error = None
        for _attempt in range(self.restore_attempts):
            try:
                return self.api.patch_service(self.namespace, self.service, patch, field_manager=self.field_manager)
            except KubernetesApiError as exc:
                error = exc
                if not exc.uncertain and exc.status not in (409, 429, 500, 502, 503, 504):
                    break
                self.sleep(min(1.0, self.interval))
        raise TrafficSwitchError("%s failed after %d attempt(s): %s" % (what, self.restore_attempts, error))

    def record_switch(self, color, previous):
        # The record went out with the selector (apply) and verify() cleared the in-flight marker.
        return dict(self.record)

    def recover(self):
        """Undo a switch whose run died between patching and verifying (its in-flight marker is left).

        A marker younger than its deadline belongs to a switch still running elsewhere: refuse, as a lock would.
        """
        svc = self._service()
        annotations = (svc.get("metadata") or {}).get("annotations") or {}
        raw = annotations.get(ANNOTATION_IN_FLIGHT)
        if not raw:
            return None
        try:
            marker = json.loads(raw)
            deadline = datetime.datetime.strptime(marker["deadline"], "%Y-%m-%dT%H:%M:%SZ").replace(
                tzinfo=datetime.timezone.utc)
        except (ValueError, KeyError, TypeError):
            marker, deadline = {}, None
        now = datetime.datetime.now(datetime.timezone.utc)
        if deadline is not None and now < deadline:
            raise TrafficSwitchError(
                "another switch of %s to %s is in flight (started %s); wait until %s for it to finish or to be "
                "undone" % (self.target, marker.get("to"), marker.get("started"), marker.get("deadline")))
        live = ((svc.get("spec") or {}).get("selector") or {}).get(self.color_label)
        if not marker or live != marker.get("to") or not marker.get("from"):
            self._patch_with_retries({"metadata": {"annotations": {ANNOTATION_IN_FLIGHT: None}}},
                                     "clearing a stale in-flight marker of %s" % self.target)
            return "cleared a stale in-flight marker of %s (live colour %s left as it is)" % (self.target, live)
        self._put_back(marker["from"], marker.get("annotations_before"),
                       "undoing the interrupted switch of %s to %s" % (self.target, marker["to"]))
        return "undid an interrupted switch of %s to %s (started %s): the selector is back on %s" % (
            self.target, marker["to"], marker.get("started"), marker["from"])


# -- module wiring ----------------------------------------------------------------------------------

def kubernetes_argument_spec():
    """The traffic_switch options of backend=kubernetes (names as kubernetes.core's connection options)."""
    return dict(
        namespace=dict(type="str", default="grandmodel"),
        service=dict(type="str", default="grandmodel"),
        color_label=dict(type="str", default=DEFAULT_COLOR_LABEL),
        color_service=dict(type="str", default="{service}-{color}"),
        min_ready=dict(type="int", default=1),
        kubeconfig=dict(type="path"),
        context=dict(type="str"),
        host=dict(type="str"),
        api_key=dict(type="str", no_log=True),
        ca_cert=dict(type="path"),
        validate_certs=dict(type="bool"),
        request_timeout=dict(type="float", default=10.0),
    )


def build_kubernetes_backend(params, verifier=None):
    """A KubernetesBackend from traffic_switch's parameters (verify_* are shared with the nginx backend)."""
    for key in ("namespace", "service"):
        if not params.get(key):
            raise TrafficSwitchError("backend kubernetes needs %s (the live Service's %s)" % (key, key))
    client, source = build_api_client(kubeconfig=params.get("kubeconfig"), context=params.get("context"),
                                      host=params.get("host"), api_key=params.get("api_key"),
                                      validate_certs=params.get("validate_certs"), ca_cert=params.get("ca_cert"))
    api = KubernetesApi(client, request_timeout=params.get("request_timeout") or 10.0, source=source)
    return KubernetesBackend(
        api, params["namespace"], params["service"], color_label=params.get("color_label") or DEFAULT_COLOR_LABEL,
        color_service=params.get("color_service", "{service}-{color}"), min_ready=params.get("min_ready") or 1,
        verify_timeout=params.get("verify_timeout") or 60.0, verify_consecutive=params.get("verify_consecutive") or 3,
        verify_interval=max(0.2, float(params.get("verify_interval") or 1.0)), verifier=verifier)
