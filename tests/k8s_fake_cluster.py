"""A small in-memory Kubernetes API on loopback, enough for kubernetes.core.k8s and k8s_info to run for real.

No API server binary can be had on these machines. This one serves what kubernetes.core's dynamic client
asks for: /version, API discovery (/api, /apis, each group version's resource list), GET and LIST of
objects (labelSelector), and server-side apply (PATCH application/apply-patch+yaml, honouring
dryRun=All and fieldManager, refusing a changed field owned by another manager with 409 unless force),
plus JSON merge patch (with the resourceVersion precondition). As in server-side apply, a field a manager
applied before and leaves out of its next apply is released, and removed when nobody else owns it
(how a scale-down's `spec.replicas` is handed back). Controllers are settled at once:
a Deployment reports every replica ready and has that many ready Pods, and every Service with a
selector has an EndpointSlice listing the Pods it selects, so the traffic switch's kubernetes
backend can run against the objects the role created. The service proxy
(/api/v1/namespaces/<ns>/services/<name>[:port]/proxy/<path>) forwards to a pod of the Service: to the
URL registered in `upstreams` for the Deployment that owns it (a stand-in for the pod's container),
requiring `Bearer <proxy_token>` when that is set; no ready pod answers 503 as kube-apiserver does.

It is not kube-apiserver: no admission, defaulting, validation or RBAC (kubernetes-validate covers the
schemas; the rest is listed as unverified in docs/kubernetes.md).
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
import urllib.error
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import yaml

# group version -> [(resource, kind, namespaced, verbs)]
RESOURCES: dict[str, list[tuple[str, str, bool]]] = {
    "v1": [("namespaces", "Namespace", False), ("services", "Service", True), ("pods", "Pod", True),
           ("serviceaccounts", "ServiceAccount", True), ("resourcequotas", "ResourceQuota", True),
           ("limitranges", "LimitRange", True), ("secrets", "Secret", True)],
    "apps/v1": [("deployments", "Deployment", True)],
    "rbac.authorization.k8s.io/v1": [("roles", "Role", True), ("rolebindings", "RoleBinding", True)],
    "networking.k8s.io/v1": [("networkpolicies", "NetworkPolicy", True), ("ingresses", "Ingress", True)],
    "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget", True)],
    "autoscaling/v2": [("horizontalpodautoscalers", "HorizontalPodAutoscaler", True)],
    "discovery.k8s.io/v1": [("endpointslices", "EndpointSlice", True)],
}
PROXY_PATH = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/services/(?P<name>[^/]+)/proxy(?:/|$)")
VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


def merge(base: Any, applied: Any) -> Any:
    if isinstance(base, dict) and isinstance(applied, dict):
        out = dict(base)
        for key, value in applied.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = merge(base.get(key), value)
        return out
    return copy.deepcopy(applied)


def leaves(obj: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Field paths of an applied configuration (lists count as one field, as SSA's atomic lists do)."""
    if isinstance(obj, dict):
        found: dict[tuple[str, ...], Any] = {}
        for key, value in obj.items():
            found.update(leaves(value, (*prefix, key)))
        return found
    return {prefix: obj}


def get_path(obj: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


KEPT = {("apiVersion",), ("kind",), ("metadata", "name"), ("metadata", "namespace")}


def remove_path(obj: Any, path: tuple[str, ...]) -> Any:
    """A copy of obj without the field at path (emptied parents are dropped too)."""
    if not path or not isinstance(obj, dict) or path[0] not in obj:
        return obj
    out = dict(obj)
    if len(path) == 1:
        del out[path[0]]
        return out
    inner = remove_path(out[path[0]], path[1:])
    if inner:
        out[path[0]] = inner
    else:
        del out[path[0]]
    return out


def matches(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        key, equals, value = term.partition("=")
        if (equals and labels.get(key) != value) or (not equals and key not in labels):
            return False
    return True


class FakeCluster(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.RLock()
        self.objects: dict[tuple[str, str, str, str], dict[str, Any]] = {}  # (gv, resource, ns, name)
        # Which manager last set each field path of an object (a simplified managedFields).
        self.owners: dict[tuple[str, str, str, str], dict[tuple[str, ...], str]] = {}
        self.requests: list[dict[str, Any]] = []
        self.rv = 1000
        # Service proxy: Deployment name -> base URL standing in for its pods; bearer token required if set.
        self.upstreams: dict[str, str] = {}
        self.proxy_token: str | None = None
        self._next_pod = 0
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> FakeCluster:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def kubeconfig(self, token: str) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Config", "current-context": "fake",
                "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                "users": [{"name": "admin", "user": {"token": token}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "admin"}}]}

    def get(self, gv: str, resource: str, ns: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((gv, resource, ns, name))

    def seed(self, obj: dict[str, Any], manager: str) -> dict[str, Any]:
        """Store an object as if `manager` had applied it (a cluster state to start a test from)."""
        gv = obj["apiVersion"]
        resource = next(r for r, k, _ in RESOURCES[gv] if k == obj["kind"])
        key = (gv, resource, obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
        with self.lock:
            self.requests.append({"method": "SEED", "path": "/".join(key)})
            self.owners[key] = {path: manager for path in leaves(obj)}
            return self.store(key, copy.deepcopy(obj))

    def pods_of_deployments(self, ns: str) -> list[tuple[str, dict[str, Any]]]:
        """(Deployment name, Pod) of every pod the settled Deployments of `ns` run."""
        pods: list[tuple[str, dict[str, Any]]] = []
        for (gv, res, namespace, name), obj in sorted(self.objects.items()):
            if (gv, res) != ("apps/v1", "deployments") or namespace != ns:
                continue
            template = obj["spec"]["template"]
            for index in range(obj["spec"].get("replicas", 1)):
                pod_name = f"{name}-7d9f8c6b5-{index}"
                pods.append((name, {"apiVersion": "v1", "kind": "Pod",
                                    "metadata": {"name": pod_name, "namespace": ns, "uid": f"uid-{pod_name}",
                                                 "labels": template["metadata"]["labels"]},
                                    "spec": {"nodeName": f"k8s-worker-{index + 1}"},
                                    "status": {"phase": "Running", "podIP": f"10.244.{index + 1}.{len(pods) + 10}",
                                               "conditions": [{"type": "Ready", "status": "True"}]}}))
        return pods

    def derived(self, resource: str, ns: str) -> list[dict[str, Any]]:
        """Pods of the Deployments and EndpointSlices of the Services, as settled controllers keep them."""
        pods = [pod for _owner, pod in self.pods_of_deployments(ns)]
        if resource == "pods":
            return pods
        slices = []
        for (gv, res, namespace, name), obj in sorted(self.objects.items()):
            selector = obj.get("spec", {}).get("selector")
            if (gv, res) != ("v1", "services") or namespace != ns or not selector:
                continue
            wanted = ",".join(f"{k}={v}" for k, v in selector.items())
            slices.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
                           "metadata": {"name": f"{name}-x7k2p", "namespace": ns,
                                        "labels": {"kubernetes.io/service-name": name}},
                           "endpoints": [{"addresses": [p["status"]["podIP"]],
                                          "conditions": {"ready": True, "serving": True, "terminating": False},
                                          "targetRef": {"kind": "Pod", "name": p["metadata"]["name"],
                                                        "namespace": ns}}
                                         for p in pods if matches(p["metadata"]["labels"], wanted)],
                           "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}]})
        return slices

    def writes(self) -> list[dict[str, Any]]:
        """Requests that could change an object (service proxy requests go to the pods, not the store)."""
        return [r for r in self.requests if r["method"] in ("PATCH", "POST", "PUT", "DELETE") and not r.get("proxy")]

    def proxy_target(self, ns: str, service: str, auth: str | None) -> tuple[int, Any]:
        """-> (0, upstream base URL) of one ready pod behind the Service, or (status, Status body)."""
        if self.proxy_token is not None and auth != f"Bearer {self.proxy_token}":
            return 401, status(401, "Unauthorized", "Unauthorized")
        svc = self.objects.get(("v1", "services", ns, service))
        if svc is None:
            return 404, status(404, "NotFound", f'services "{service}" not found')
        selector = svc.get("spec", {}).get("selector") or {}
        wanted = ",".join(f"{k}={v}" for k, v in selector.items())
        owners = [owner for owner, pod in self.pods_of_deployments(ns)
                  if selector and matches(pod["metadata"]["labels"], wanted)]
        if not owners:
            return 503, status(503, "ServiceUnavailable", f'no endpoints available for service "{service}"')
        self._next_pod += 1
        owner = owners[self._next_pod % len(owners)]
        if owner not in self.upstreams:
            return 503, status(503, "ServiceUnavailable", f"error trying to reach service: dial tcp pod of {owner}: "
                                                         "connect: connection refused")
        return 0, self.upstreams[owner]

    def store(self, key: tuple[str, str, str, str], obj: dict[str, Any]) -> dict[str, Any]:
        self.rv += 1
        self.requests[-1]["stored"] = True
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        meta["resourceVersion"] = str(self.rv)
        if key[0] == "apps/v1" and key[1] == "deployments":
            replicas = obj.get("spec", {}).get("replicas", 1)
            meta["generation"] = meta.get("generation", 0) + 1
            obj["status"] = {"observedGeneration": meta["generation"], "replicas": replicas,
                             "readyReplicas": replicas, "updatedReplicas": replicas,
                             "availableReplicas": replicas,
                             "conditions": [
                                 {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                                 {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}]}
        self.objects[key] = obj
        return obj


class _Handler(BaseHTTPRequestHandler):
    server: FakeCluster
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, code: int, payload: Any) -> None:
        raw = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        try:
            self.wfile.write(raw)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _parse(self) -> tuple[str | None, str | None, str, str | None, str | None]:
        """-> (group version, resource, namespace, name, subresource) of an object path."""
        parts = urlparse(self.path).path.strip("/").split("/")
        if parts[0] == "api":
            gv, rest = parts[1], parts[2:]
        elif parts[0] == "apis" and len(parts) >= 3:
            gv, rest = "/".join(parts[1:3]), parts[3:]
        else:
            return None, None, "", None, None
        ns = ""
        if len(rest) >= 2 and rest[0] == "namespaces" and (len(rest) > 2 or gv != "v1"):
            ns, rest = rest[1], rest[2:]
        elif rest[:1] == ["namespaces"] and gv == "v1":
            pass
        resource = rest[0] if rest else None
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        return gv, resource, ns, name, sub

    def _discovery(self, path: str) -> Any:
        if path == "/version":
            return {"major": "1", "minor": "30", "gitVersion": "v1.30.4", "platform": "linux/amd64"}
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        if path == "/apis":
            groups = []
            for gv in RESOURCES:
                if "/" in gv:
                    group, version = gv.split("/")
                    entry = {"groupVersion": gv, "version": version}
                    groups.append({"name": group, "versions": [entry], "preferredVersion": entry})
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}
        gv = path.removeprefix("/api/").removeprefix("/apis/")
        if gv in RESOURCES and path in (f"/api/{gv}", f"/apis/{gv}"):
            resources = []
            for resource, kind, namespaced in RESOURCES[gv]:
                resources.append({"name": resource, "singularName": kind.lower(), "namespaced": namespaced,
                                  "kind": kind, "verbs": VERBS})
                if kind == "Deployment":
                    resources.append({"name": f"{resource}/status", "singularName": "", "namespaced": True,
                                      "kind": kind, "verbs": ["get", "patch", "update"]})
            return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}
        return None

    def _proxy(self, method: str, raw: bytes, ns: str, name: str) -> None:
        """The API server's service proxy: forward to one pod of the Service, answer what it answered."""
        server = self.server
        url = urlparse(self.path)
        service = name.split(":", maxsplit=1)[0]
        rest = url.path.split(f"/services/{name}/proxy", 1)[1] or "/"
        with server.lock:
            server.requests.append({"method": method, "path": self.path, "proxy": True,
                                    "authorization": self.headers.get("Authorization")})
            code, target = server.proxy_target(ns, service, self.headers.get("Authorization"))
        if code:
            return self._send(code, target)
        forward = urllib.request.Request(target.rstrip("/") + rest + (f"?{url.query}" if url.query else ""),
                                         data=raw if method in ("POST", "PUT", "PATCH") else None, method=method,
                                         headers={"Content-Type": self.headers.get("Content-Type") or "text/plain"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(forward, timeout=10) as answer:
                code, body, kind = answer.status, answer.read(), answer.headers.get("Content-Type")
        except urllib.error.HTTPError as exc:
            code, body, kind = exc.code, exc.read(), exc.headers.get("Content-Type")
        except OSError as exc:
            return self._send(503, status(503, "ServiceUnavailable", f"error trying to reach service: {exc}"))
        self.send_response(code)
        self.send_header("Content-Type", kind or "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        return None

    def _handle(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        url = urlparse(self.path)
        query = parse_qs(url.query)
        server = self.server
        proxied = PROXY_PATH.match(url.path)
        if proxied:
            return self._proxy(method, raw, proxied["ns"], proxied["name"])
        with server.lock:
            record = {"method": method, "path": self.path, "content_type": self.headers.get("Content-Type"),
                      "dry_run": query.get("dryRun", [None])[0], "authorization": self.headers.get("Authorization")}
            server.requests.append(record)
            if method == "GET":
                found = self._discovery(url.path)
                if found is not None:
                    return self._send(200, found)
            gv, resource, ns, name, _sub = self._parse()
            kinds = {r: k for r, k, _ in RESOURCES.get(gv or "", [])}
            if resource not in kinds:
                return self._send(404, status(404, "NotFound", f"the server could not find the requested resource "
                                                               f"({self.path})"))
            key = (gv or "", resource, ns, name or "")
            if method == "GET" and name is None:
                selector = query.get("labelSelector", [""])[0]
                if resource in ("pods", "endpointslices"):
                    candidates = server.derived(resource, ns)
                else:
                    candidates = [o for (g, r, n, _), o in sorted(server.objects.items())
                                  if g == gv and r == resource and (not ns or n == ns)]
                items = [o for o in candidates if matches(o["metadata"].get("labels") or {}, selector)]
                return self._send(200, {"kind": kinds[resource] + "List", "apiVersion": gv,
                                        "metadata": {"resourceVersion": str(server.rv)}, "items": items})
            if method == "GET":
                obj = server.objects.get(key)
                if obj is None:
                    return self._send(404, status(404, "NotFound", f'{resource} "{name}" not found'))
                return self._send(200, obj)
            if method == "PATCH":
                return self._patch(key, kinds[resource], raw, query)
            if method == "POST":
                body = json.loads(raw)
                key = (gv or "", resource, ns, body["metadata"]["name"])
                if key in server.objects:
                    return self._send(409, status(409, "AlreadyExists", f'{resource} "{key[3]}" already exists'))
                if query.get("dryRun"):
                    return self._send(201, body)
                return self._send(201, server.store(key, body))
            return self._send(405, status(405, "MethodNotAllowed", method))

    def _patch(self, key: tuple[str, str, str, str], kind: str, raw: bytes, query: dict[str, list[str]]) -> None:
        server = self.server
        content_type = self.headers.get("Content-Type", "")
        manager = query.get("fieldManager", ["unknown"])[0]
        dry_run = bool(query.get("dryRun"))
        current = server.objects.get(key)
        if content_type.startswith("application/apply-patch"):
            applied = yaml.safe_load(raw)
            if applied.get("kind") != kind:
                return self._send(400, status(400, "BadRequest", f"apply of kind {applied.get('kind')} to {kind}"))
            owners = dict(server.owners.get(key, {}))
            force = query.get("force", ["false"])[0] == "true"
            conflicts = [".".join(p) for p, v in leaves(applied).items()
                         if p[:1] != ("metadata",) or p[:2] in (("metadata", "labels"), ("metadata", "annotations"))
                         if current is not None and owners.get(p, manager) != manager and get_path(current, p) != v]
            if conflicts and not force:
                return self._send(409, status(409, "Conflict", f"Apply failed with {len(conflicts)} conflict(s): "
                                                               + "; ".join(conflicts)))
            result = merge(current or {}, applied)
            applied_paths = leaves(applied)
            for path, owner in list(owners.items()):
                # Applied before by this manager, left out now: released, and removed as nobody else owns it.
                if owner == manager and path not in applied_paths and path not in KEPT:
                    del owners[path]
                    result = remove_path(result, path)
            for path in applied_paths:
                owners[path] = manager
            if dry_run:
                return self._send(200 if current else 201, merge(result, {"metadata": {
                    "resourceVersion": (current or {}).get("metadata", {}).get("resourceVersion", "0")}}))
            if current is not None and result == current:
                return self._send(200, current)  # no change: same resourceVersion
            server.owners[key] = owners
            return self._send(200 if current else 201, server.store(key, result))
        if current is None:
            return self._send(404, status(404, "NotFound", f'{key[1]} "{key[3]}" not found'))
        if content_type.startswith(("application/merge-patch+json", "application/strategic-merge-patch+json")):
            patch = json.loads(raw)
            wanted_rv = (patch.get("metadata") or {}).pop("resourceVersion", None)
            if wanted_rv is not None and wanted_rv != current["metadata"]["resourceVersion"]:
                return self._send(409, status(409, "Conflict", "the object has been modified; please apply your "
                                                               "changes to the latest version and try again"))
            result = merge(current, patch)
            owners = server.owners.setdefault(key, {})
            for path in leaves(patch):
                owners[path] = manager
            if dry_run:
                return self._send(200, result)
            return self._send(200, server.store(key, result))
        return self._send(415, status(415, "UnsupportedMediaType", content_type))

    def do_GET(self) -> None:
        self._handle("GET")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")
