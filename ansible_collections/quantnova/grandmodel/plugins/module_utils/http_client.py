# -*- coding: utf-8 -*-
# Copyright: (c) 2025, GrandModel Ops
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A small HTTP client for probes: one request, its status, body and wall time.

Requests are made with Ansible's own `ansible.module_utils.urls` (the `Request` class behind
`open_url`, shipped with every module: no extra library on the target host). Probes go straight to the service
(never through an environment proxy) and an HTTP error status is an answer, not an exception:
only a request that could not be made or whose answer could not be read (refused, timed out, TLS
failure, a connection closed mid-answer, a malformed status line) raises, and always as
HttpProbeError, so a caller handles one exception type for every way a probe can go wrong.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import time
import urllib.error
import urllib.parse

from ansible.module_utils.urls import ConnectionError as UrlsConnectionError
from ansible.module_utils.urls import Request, make_context

HTTP_SPEC_DEFAULTS = {"timeout": 5.0, "validate_certs": True}


def http_argument_spec():
    """The HTTP options shared by the collection's probing modules (doc fragment quantnova.grandmodel.http_client)."""
    return dict(
        timeout=dict(type="float", default=HTTP_SPEC_DEFAULTS["timeout"]),
        validate_certs=dict(type="bool", default=HTTP_SPEC_DEFAULTS["validate_certs"]),
        headers=dict(type="dict", default={}, no_log=True),
    )


class HttpProbeError(Exception):
    """The request could not be made or no answer came back in time."""


class HttpResponse:
    __slots__ = ("body", "elapsed", "headers", "method", "status", "url")

    def __init__(self, *, method, url, status, body, headers, elapsed):
        self.method = method
        self.url = url
        self.status = status
        self.body = body
        self.headers = headers
        self.elapsed = elapsed

    @property
    def ok(self):
        return 200 <= self.status < 300

    def text(self):
        return self.body.decode("utf-8", errors="replace")

    def json(self):
        """The body as JSON; ValueError says what was wrong with it."""
        try:
            return json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            snippet = self.text()[:120]
            raise ValueError("%s %s answered %d with a body that is not JSON (%s): %r"
                             % (self.method, self.url, self.status, exc, snippet)) from exc


class HttpClient:
    """Keeps the per-module settings (timeout, TLS verification, extra headers) in one place.

    Like the urllib opener it replaces, every request opens its own connection (nothing to keep alive).
    """

    def __init__(self, *, timeout=5.0, validate_certs=True, headers=None):
        self.timeout = float(timeout)
        self.validate_certs = bool(validate_certs)
        self.headers = dict(headers or {})
        self._tls_context = None
        self._redirect_context = None

    def _context(self, url):
        """The TLS context for a request, built once per client.

        open_url() has no `context` argument and builds one for every request, even a plain http one,
        reading every CA certificate of the host (about 50 ms here); the health gate sends many small
        requests and the traffic switch one every tenth of a second. So each request is open_url's own
        `Request().open()` given a context: a fresh Request per request, as open_url makes (no cookie
        outlives its probe).
        """
        if urllib.parse.urlsplit(url).scheme.lower() == "https":
            if self._tls_context is None:
                self._tls_context = make_context(validate_certs=self.validate_certs)
            return self._tls_context
        if self._redirect_context is None:
            # Used only if a plain http probe is redirected to https: the system CA directory, looked up
            # lazily by OpenSSL (well under a millisecond to set up), or no verification when asked.
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            if self.validate_certs:
                capath = ssl.get_default_verify_paths().capath
                if capath and os.path.isdir(capath):
                    context.load_verify_locations(capath=capath)
            else:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._redirect_context = context
        return self._redirect_context

    def request(self, method, url, *, body=None, json_body=None, headers=None, timeout=None):
        # X-GrandModel-Probe: the inference service counts these requests apart from client traffic, so a
        # gate's own probes do not shift the throughput, errors, latency and prediction mix it compares.
        all_headers = {"User-Agent": "quantnova.grandmodel", "Accept": "application/json",
                       "X-GrandModel-Probe": "quantnova.grandmodel"}
        all_headers.update(self.headers)
        if json_body is not None:
            body = json.dumps(json_body).encode("utf-8")
            all_headers["Content-Type"] = "application/json"
        all_headers.update(headers or {})
        started = time.monotonic()
        try:
            try:
                # No environment proxy, no ~/.netrc credentials, the body as sent: a probe sees the service.
                with Request(context=self._context(url)).open(
                        method, url, data=body, headers=all_headers, use_proxy=False, timeout=timeout or self.timeout,
                        validate_certs=self.validate_certs, use_netrc=False, decompress=False) as resp:
                    payload = resp.read()
                    status, resp_headers = resp.status, dict(resp.headers.items())
            except urllib.error.HTTPError as exc:
                payload = exc.read() if exc.fp is not None else b""
                status, resp_headers = exc.code, dict(exc.headers.items()) if exc.headers else {}
        except urllib.error.URLError as exc:
            raise HttpProbeError("%s %s failed: %s" % (method, url, _reason(exc.reason))) from exc
        except (socket.timeout, TimeoutError) as exc:
            raise HttpProbeError("%s %s timed out after %.1fs" % (method, url, timeout or self.timeout)) from exc
        except http.client.HTTPException as exc:
            # IncompleteRead (closed mid-body), BadStatusLine/RemoteDisconnected (no or garbage status
            # line), LineTooLong, ...: the service did not give a usable answer.
            raise HttpProbeError("%s %s failed: the answer could not be read (%s: %s)"
                                 % (method, url, type(exc).__name__, exc or "no detail")) from exc
        except UrlsConnectionError as exc:
            # open_url's own errors (a TLS certificate it refused, a proxy, ...).
            raise HttpProbeError("%s %s failed: %s" % (method, url, exc)) from exc
        except (OSError, ValueError) as exc:
            # ValueError: malformed URL; OSError: connection reset, TLS errors while reading, ...
            raise HttpProbeError("%s %s failed: %s" % (method, url, _reason(exc))) from exc
        return HttpResponse(method=method, url=url, status=status, body=payload, headers=resp_headers,
                            elapsed=time.monotonic() - started)

    def get(self, url, **kwargs):
        return self.request("GET", url, **kwargs)

    def post_json(self, url, payload, **kwargs):
        return self.request("POST", url, json_body=payload, **kwargs)


def _reason(reason):
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror.lower()
    return str(reason) or reason.__class__.__name__


def join_url(base, path):
    return base.rstrip("/") + "/" + path.lstrip("/")
