"""``/docs`` without any external asset.

FastAPI's Swagger UI page loads its JavaScript and CSS from a CDN, so on an air-gapped trading
network it is a blank page. This one is a single self-contained HTML document: an inline
script fetches ``/openapi.json`` from the same origin and lists every operation with its
parameters, request media types and responses. A Content-Security-Policy header forbids the
browser from loading anything from elsewhere, so an accidental external reference fails loudly
in tests instead of silently in production.
"""

from __future__ import annotations

DOCS_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'"
)

DOCS_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>__TITLE__ - API</title>
<style>
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:60em;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.1em;margin:1.6em 0 .3em;border-bottom:1px solid #ddd}
.op{margin:.8em 0;padding:.5em .8em;border:1px solid #ddd;border-radius:4px}
.m{display:inline-block;min-width:4em;font-weight:bold}.get{color:#1565c0}.post{color:#2e7d32}
code,pre{font:12px ui-monospace,monospace;background:#f6f6f6}pre{padding:.5em;overflow:auto}
details summary{cursor:pointer}
</style></head>
<body><h1>__TITLE__</h1>
<p>Machine-readable description: <a href="/openapi.json">/openapi.json</a>.
This page is self-contained (no external scripts, fonts or styles).</p>
<div id="api">Loading /openapi.json ...</div>
<script>
"use strict";
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}
fetch("/openapi.json").then(r => r.json()).then(doc => {
  const root = document.getElementById("api");
  root.textContent = "";
  root.appendChild(el("p", (doc.info && doc.info.description) || ""));
  const byTag = {};
  for (const [path, ops] of Object.entries(doc.paths || {})) {
    for (const [method, op] of Object.entries(ops)) {
      const tag = (op.tags && op.tags[0]) || "other";
      (byTag[tag] = byTag[tag] || []).push([path, method, op]);
    }
  }
  for (const [tag, ops] of Object.entries(byTag)) {
    root.appendChild(el("h2", tag));
    for (const [path, method, op] of ops) {
      const box = el("div", undefined, "op");
      const head = el("div");
      head.appendChild(el("span", method.toUpperCase(), "m " + method));
      head.appendChild(el("code", path));
      head.appendChild(el("span", "  " + (op.summary || "")));
      box.appendChild(head);
      const params = (op.parameters || []).map(
        p => p.name + " (" + p.in + (p.required ? ", required" : "") + ")");
      if (params.length) box.appendChild(el("div", "Parameters: " + params.join(", ")));
      if (op.requestBody) {
        box.appendChild(el("div", "Body: " + Object.keys(op.requestBody.content || {}).join(", ")));
      }
      box.appendChild(el("div", "Responses: " + Object.keys(op.responses || {}).join(", ")));
      const more = el("details");
      more.appendChild(el("summary", "operation as JSON"));
      more.appendChild(el("pre", JSON.stringify(op, null, 1)));
      box.appendChild(more);
      root.appendChild(box);
    }
  }
  const schemas = (doc.components && doc.components.schemas) || {};
  if (Object.keys(schemas).length) {
    root.appendChild(el("h2", "schemas"));
    for (const [name, schema] of Object.entries(schemas)) {
      const more = el("details");
      more.appendChild(el("summary", name));
      more.appendChild(el("pre", JSON.stringify(schema, null, 1)));
      root.appendChild(more);
    }
  }
}).catch(err => {
  document.getElementById("api").textContent = "Could not load /openapi.json: " + err;
});
</script>
</body></html>
"""


def docs_html(title: str) -> bytes:
    escaped = title.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return DOCS_HTML.replace("__TITLE__", escaped).encode()
