"""A small Kubernetes API server on loopback for the kubernetes traffic backend's unit tests.

It serves the recorded objects in fixtures/k8s (a Service, four Pods) over real HTTP, so the official
`kubernetes` client does its own URL building, query strings, headers, timeouts and error handling.
It behaves like kube-apiserver where the backend depends on it:

- GET/PATCH of a Service; PATCH honours the Content-Type (merge patch, strategic merge patch; a JSON
  object sent as json-patch+json is rejected with 400 as the real server does), refuses a stale
  metadata.resourceVersion with 409, bumps resourceVersion and records managedFields' manager;
- lists of Pods and EndpointSlices with labelSelector (`k=v`, `k!=v`, `k`) and limit/continue paging;
- an endpoint controller: the live Service's EndpointSlice reflects the selector only after
  `endpoint_lag` list requests (or never, when `endpoints_frozen`), with pod readiness as conditions;
- faults injected per request kind: an HTTP status with a recorded Status body, a hang, or
  "apply then hang" (the change is made, the answer never comes).
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "k8s"
NAMESPACE = "grandmodel"
COLOR_LABEL = "grandmodel.quantnova.io/color"


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def status_body(code: int) -> dict[str, Any]:
    files = {409: "status-409-conflict.json", 403: "status-403-forbidden.json", 404: "status-404-notfound.json",
             500: "status-500-etcd.json"}
    if code in files:
        return dict(fixture(files[code]))
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": f"HTTP {code}",
            "reason": "Unknown", "code": code}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def matches(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.split("=", 1)
            if labels.get(key) != value.lstrip("="):
                return False
        elif term not in labels:
            return False
    return True


def pod_is_ready(pod: dict[str, Any]) -> bool:
    if pod["metadata"].get("deletionTimestamp"):
        return False
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"]["conditions"])


class FakeApiServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.RLock()
        self.services: dict[str, dict[str, Any]] = {}
        self.pods: dict[str, dict[str, Any]] = {}
        self.resource_version = 418300
        self.requests: list[dict[str, Any]] = []
        self.faults: dict[str, deque[Any]] = {}
        self.hang_seconds = 3.0
        self.endpoint_lag = 0
        self.endpoints_frozen = False
        self.page_size_cap: int | None = None
        # What the endpoint controller last published per service: the selector it reflects.
        self._published: dict[str, dict[str, str] | None] = {}
        self._lists_since_change: dict[str, int] = {}
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.load_fixtures()

    # state ------------------------------------------------------------------------------------
    def load_fixtures(self) -> None:
        svc = fixture("service.json")
        self.services = {svc["metadata"]["name"]: svc}
        self.pods = {p["metadata"]["name"]: p for p in fixture("pods.json")["items"]}
        for name, service in self.services.items():
            self._published[name] = dict(service["spec"]["selector"])
            self._lists_since_change[name] = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> FakeApiServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def next_rv(self) -> str:
        self.resource_version += 1
        return str(self.resource_version)

    def selector(self, service: str = "grandmodel") -> dict[str, str]:
        return dict(self.services[service]["spec"]["selector"])

    def live_color(self, service: str = "grandmodel") -> str | None:
        return self.selector(service).get(COLOR_LABEL)

    def set_ready(self, pod_name: str, ready: bool) -> None:
        with self.lock:
            for condition in self.pods[pod_name]["status"]["conditions"]:
                if condition["type"] in ("Ready", "ContainersReady"):
                    condition["status"] = "True" if ready else "False"
                    condition["reason"] = "" if ready else "ContainersNotReady"

    def set_color_ready(self, color: str, ready: bool) -> None:
        for name, pod in self.pods.items():
            if pod["metadata"]["labels"].get(COLOR_LABEL) == color:
                self.set_ready(name, ready)

    def edit_service(self, service: str, patch: dict[str, Any]) -> None:
        """Someone else (kubectl, another pipeline) changes the Service."""
        with self.lock:
            self._apply_patch(service, patch, manager="kubectl-edit")

    def add_color_service(self, color: str) -> None:
        svc = copy.deepcopy(self.services["grandmodel"])
        svc["metadata"]["name"] = f"grandmodel-{color}"
        svc["spec"]["selector"][COLOR_LABEL] = color
        self.services[svc["metadata"]["name"]] = svc
        self._published[svc["metadata"]["name"]] = dict(svc["spec"]["selector"])
        self._lists_since_change[svc["metadata"]["name"]] = 0

    def fault(self, kind: str, *actions: Any) -> None:
        """Queue actions for the next requests of a kind (get-service, patch-service, list-pods, list-slices)."""
        self.faults.setdefault(kind, deque()).extend(actions)

    def count(self, method: str, kind: str | None = None) -> int:
        return sum(1 for r in self.requests if r["method"] == method and (kind is None or r["kind"] == kind))

    # behaviour --------------------------------------------------------------------------------
    def _apply_patch(self, name: str, patch: dict[str, Any], manager: str) -> dict[str, Any]:
        svc = self.services[name]
        patched = merge_patch(svc, patch)
        patched["metadata"]["resourceVersion"] = self.next_rv()
        patched["metadata"].setdefault("managedFields", []).append(
            {"manager": manager, "operation": "Update", "apiVersion": "v1", "fieldsType": "FieldsV1",
             "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        self.services[name] = patched
        if patched["spec"].get("selector") != svc["spec"].get("selector"):
            self._lists_since_change[name] = 0
        return patched

    def endpoint_slices(self, service: str) -> list[dict[str, Any]]:
        if service not in self.services:
            return []
        wanted = self.services[service]["spec"].get("selector")
        if not self.endpoints_frozen and wanted != self._published.get(service):
            if self._lists_since_change[service] >= self.endpoint_lag:
                self._published[service] = dict(wanted or {})
            self._lists_since_change[service] += 1
        published = self._published.get(service) or {}
        published_selector = ",".join(f"{k}={v}" for k, v in published.items())
        endpoints = []
        for pod in self.pods.values():
            if not published or not matches(pod["metadata"]["labels"], published_selector):
                continue
            ready = pod_is_ready(pod)
            endpoints.append({
                "addresses": [pod["status"]["podIP"]],
                "conditions": {"ready": ready, "serving": ready,
                               "terminating": bool(pod["metadata"].get("deletionTimestamp"))},
                "nodeName": pod["spec"]["nodeName"],
                "targetRef": {"kind": "Pod", "name": pod["metadata"]["name"], "namespace": NAMESPACE,
                              "uid": pod["metadata"]["uid"]},
            })
        return [{
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": f"{service}-8kq2d", "namespace": NAMESPACE, "generateName": f"{service}-",
                         "labels": {"kubernetes.io/service-name": service,
                                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
                         "resourceVersion": str(self.resource_version)},
            "endpoints": endpoints,
            "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}],
        }]


class _Handler(BaseHTTPRequestHandler):
    server: FakeApiServer
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
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout): as a real server
            self.close_connection = True

    def _route(self) -> tuple[str, str | None, dict[str, list[str]]]:
        url = urlparse(self.path)
        parts = url.path.strip("/").split("/")
        query = parse_qs(url.query)
        if parts[:4] == ["api", "v1", "namespaces", NAMESPACE] and len(parts) == 6 and parts[4] == "services":
            return "service", parts[5], query
        if parts[:4] == ["api", "v1", "namespaces", NAMESPACE] and parts[4:] == ["pods"]:
            return "pods", None, query
        if parts[:5] == ["apis", "discovery.k8s.io", "v1", "namespaces", NAMESPACE] and parts[5:] == ["endpointslices"]:
            return "slices", None, query
        return "unknown", None, query

    def _handle(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        kind, name, query = self._route()
        kinds = {"service": f"{method.lower()}-service", "pods": "list-pods", "slices": "list-slices"}
        fault_kind = kinds.get(kind, "")
        server = self.server
        with server.lock:
            server.requests.append({"method": method, "path": self.path, "kind": fault_kind,
                                    "content_type": self.headers.get("Content-Type"),
                                    "authorization": self.headers.get("Authorization"),
                                    "body": json.loads(body) if body else None})
            queue = server.faults.get(fault_kind)
            action = queue.popleft() if queue else None
        if action == "hang":
            time.sleep(server.hang_seconds)
            return self._send(504, status_body(504))
        if isinstance(action, int):
            server.requests[-1]["status"] = action
            return self._send(action, status_body(action))
        with server.lock:
            code, payload = self._answer(method, kind, name, query, body)
            server.requests[-1]["status"] = code
        if action == "apply-then-hang":
            time.sleep(server.hang_seconds)
        self._send(code, payload)
        return None

    def _answer(self, method: str, kind: str, name: str | None, query: dict[str, list[str]],
                body: bytes) -> tuple[int, Any]:
        server = self.server
        if kind == "service":
            if name not in server.services:
                return 404, status_body(404)
            if method == "GET":
                return 200, server.services[name]
            content_type = self.headers.get("Content-Type", "")
            patch = json.loads(body)
            if content_type.startswith("application/json-patch+json") and not isinstance(patch, list):
                return 400, dict(status_body(400), reason="BadRequest",
                                 message="json: cannot unmarshal object into Go value of type jsonpatch.Patch")
            patch_types = ("application/merge-patch+json", "application/strategic-merge-patch+json")
            if not content_type.startswith(patch_types):
                return 415, dict(status_body(415), reason="UnsupportedMediaType",
                                 message=f"the body of the request was in an unknown format - {content_type}")
            wanted_rv = (patch.get("metadata") or {}).pop("resourceVersion", None)
            if wanted_rv is not None and wanted_rv != server.services[name]["metadata"]["resourceVersion"]:
                return 409, status_body(409)
            manager = (query.get("fieldManager") or ["unknown"])[0]
            return 200, server._apply_patch(name, patch, manager)
        if kind in ("pods", "slices") and method == "GET":
            selector = (query.get("labelSelector") or [""])[0]
            if kind == "pods":
                items = [p for p in server.pods.values() if matches(p["metadata"]["labels"], selector)]
            else:
                service = selector.split("kubernetes.io/service-name=", 1)[-1].split(",")[0]
                items = server.endpoint_slices(service)
            limit = int((query.get("limit") or ["0"])[0])
            if server.page_size_cap:
                limit = min(limit or server.page_size_cap, server.page_size_cap)
            start = int((query.get("continue") or ["0"])[0])
            page = items[start:start + limit] if limit else items[start:]
            meta: dict[str, Any] = {"resourceVersion": str(server.resource_version)}
            if limit and start + limit < len(items):
                meta["continue"] = str(start + limit)
            list_kind = "PodList" if kind == "pods" else "EndpointSliceList"
            api = "v1" if kind == "pods" else "discovery.k8s.io/v1"
            return 200, {"apiVersion": api, "kind": list_kind, "metadata": meta, "items": copy.deepcopy(page)}
        return 404, dict(status_body(404), message=f"the server could not find the requested resource ({self.path})")

    def do_GET(self) -> None:
        self._handle("GET")

    def do_PATCH(self) -> None:
        self._handle("PATCH")
