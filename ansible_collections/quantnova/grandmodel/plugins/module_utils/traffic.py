# -*- coding: utf-8 -*-
# Copyright: (c) 2025, GrandModel Ops
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Blue-green traffic switching: the backend interface and its nginx implementation.

A backend reads which colour is live, plans a switch (before/after, changed or not), applies it,
proves through the front door that the new colour answers, and restores the previous state when
anything on the way fails. `switch_traffic()` runs that sequence the same way for every backend;
haproxy and Kubernetes (Service selector) backends only have to implement the five methods.
"""

from __future__ import annotations

import abc
import contextlib
import datetime
import json
import os
import re
import subprocess
import tempfile
import time

from ansible_collections.quantnova.grandmodel.plugins.module_utils.http_client import HttpClient, HttpProbeError

COLORS = ("blue", "green")
HEADER = "# Managed by quantnova.grandmodel.traffic_switch: edit the colour with that module, not by hand."
_ACTIVE_RE = re.compile(r"^#\s*active_color:\s*(\S+)\s*$", re.MULTILINE)
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


class TrafficSwitchError(Exception):
    """What was attempted, on what, and why it failed; `result` carries evidence for the caller."""

    def __init__(self, msg, **result):
        super().__init__(msg)
        self.result = result


class TrafficState:
    """The live colour as a backend sees it, and where that knowledge came from."""

    def __init__(self, active=None, previous=None, switched_at=None, source=None):
        self.active = active
        self.previous = previous
        self.switched_at = switched_at
        self.source = source

    def as_dict(self):
        return {"active": self.active, "previous": self.previous, "switched_at": self.switched_at,
                "source": self.source}


class SwitchPlan:
    """What apply() would do: the state before, the colour wanted, the configuration before/after."""

    def __init__(self, state, color, before, after, target):
        self.state = state
        self.color = color
        self.before = before
        self.after = after
        self.target = target

    @property
    def changed(self):
        return self.before != self.after

    def diff(self):
        return {"before": self.before or "", "after": self.after, "before_header": self.target,
                "after_header": self.target}


class TrafficBackend(abc.ABC):
    """One way of steering the front door to a colour (nginx upstream file, haproxy, Kubernetes)."""

    name = "abstract"

    @abc.abstractmethod
    def read_state(self):
        """Return a TrafficState; never mutates."""

    @abc.abstractmethod
    def plan(self, color):
        """Return a SwitchPlan for making `color` active; never mutates."""

    @abc.abstractmethod
    def apply(self, plan):
        """Make the plan live; raise TrafficSwitchError (after undoing partial work) on failure."""

    @abc.abstractmethod
    def verify(self, color):
        """Prove `color` answers through the front door; return evidence, raise TrafficSwitchError."""

    @abc.abstractmethod
    def restore(self, plan):
        """Put back what was live before apply(plan); return a short description of what was done."""

    def record_switch(self, color, previous):
        """Persist {active, previous, switched_at} after a verified switch; return the record."""
        return {}


# -- upstream file ------------------------------------------------------------------------------

def render_upstream(upstream_name, color, addresses, keepalive):
    if not _NAME_RE.match(upstream_name):
        raise TrafficSwitchError("cannot render upstream %r: the name may hold only letters, digits, '_', '.', '-'"
                                 % upstream_name)
    if not addresses:
        raise TrafficSwitchError("cannot render upstream %s for colour %s: backends.%s lists no address"
                                 % (upstream_name, color, color))
    lines = [HEADER, "# active_color: %s" % color, "upstream %s {" % upstream_name]
    for raw in addresses:
        address = str(raw).strip()
        if not address or any(c in address for c in ";{}#\n\"'"):
            raise TrafficSwitchError("cannot render upstream %s: backend address %r for colour %s is not host:port"
                                     % (upstream_name, address, color))
        lines.append("    server %s max_fails=0;" % address)
    if keepalive:
        lines.append("    keepalive %d;" % keepalive)
    lines.append("}")
    return "\n".join(lines) + "\n"


def parse_active_color(text):
    match = _ACTIVE_RE.search(text or "")
    return match.group(1) if match else None


def _read_text(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TrafficSwitchError("cannot read %s: %s" % (path, exc.strerror or exc)) from exc


def atomic_write(path, text, mode=None):
    """Write `text` to a hidden temporary file beside `path`, fsync it, then os.replace it into place.

    The temporary name starts with a dot and ends in .tmp, so an nginx `include dir/*.conf` (or `dir/*`)
    glob never picks up a half-written file.
    """
    directory, base = os.path.split(os.path.abspath(path))
    if mode is None:
        try:
            mode = os.stat(path).st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o644
    try:
        fd, tmp = tempfile.mkstemp(prefix=".%s." % base, suffix=".tmp", dir=directory)
    except OSError as exc:
        raise TrafficSwitchError("cannot create a temporary file in %s: %s" % (directory, exc.strerror or exc)) from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        _fsync_dir(directory)
    except OSError as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise TrafficSwitchError("cannot write %s: %s" % (path, exc.strerror or exc)) from exc


def _fsync_dir(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class StateFile:
    """A small JSON record {active, previous, switched_at} kept beside the upstream file."""

    def __init__(self, path):
        self.path = path

    def read(self):
        text = _read_text(self.path)
        if text is None:
            return {}
        try:
            data = json.loads(text)
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def write(self, active, previous):
        record = {"active": active, "previous": previous, "switched_at": _now()}
        atomic_write(self.path, json.dumps(record, indent=2, sort_keys=True) + "\n", mode=0o644)
        return record


# -- front door verification ---------------------------------------------------------------------

class FrontDoorVerifier:
    """GET a URL until its JSON `color` field equals the wanted colour `consecutive` times in a row.

    nginx's old workers keep serving for a moment after a graceful reload, so a single answer proves
    nothing; a streak does. Evidence: every distinct answer seen, in order, with counts and times.
    """

    def __init__(self, url, *, timeout=10.0, consecutive=3, validate_certs=True, interval=0.1,
                 request_timeout=2.0, sleep=time.sleep, clock=time.monotonic):
        self.url = url
        self.timeout = float(timeout)
        self.consecutive = max(1, int(consecutive))
        self.interval = float(interval)
        self.client = HttpClient(timeout=request_timeout, validate_certs=validate_certs)
        self.sleep = sleep
        self.clock = clock

    def _answer(self):
        try:
            response = self.client.get(self.url, timeout=min(self.client.timeout, max(self.timeout, 0.1)))
        except HttpProbeError as exc:
            return "error: %s" % exc
        if response.status != 200:
            return "HTTP %d" % response.status
        try:
            body = response.json()
        except ValueError:
            return "HTTP 200 without JSON"
        color = body.get("color") if isinstance(body, dict) else None
        return str(color) if color is not None else "HTTP 200 without a color field"

    def verify(self, color):
        started = self.clock()
        answers = []  # [answer, count, first_seen_s]
        streak = 0
        first_of_streak = None
        requests = 0
        while True:
            answer = self._answer()
            requests += 1
            elapsed = self.clock() - started
            if answers and answers[-1][0] == answer:
                answers[-1][1] += 1
            else:
                answers.append([answer, 1, round(elapsed, 3)])
            if answer == color:
                streak += 1
                if first_of_streak is None:
                    first_of_streak = elapsed
            else:
                streak, first_of_streak = 0, None
            evidence = {
                "url": self.url, "expected_color": color, "requests": requests,
                "answers": [{"answer": a, "count": n, "first_seen_s": t} for a, n, t in answers],
                "consecutive_required": self.consecutive, "elapsed_s": round(elapsed, 3),
                "seconds_to_cutover": round(first_of_streak, 3) if first_of_streak is not None else None,
            }
            if streak >= self.consecutive:
                evidence["verified"] = True
                return evidence
            if elapsed >= self.timeout:
                evidence["verified"] = False
                seen = ", ".join("%s x%d" % (a, n) for a, n, _t in answers[-5:])
                raise TrafficSwitchError(
                    "%s did not answer color %s %d times in a row within %.1fs (answers, last first: %s)"
                    % (self.url, color, self.consecutive, self.timeout, seen), verification=evidence)
            self.sleep(self.interval)


# -- nginx ---------------------------------------------------------------------------------------

class NginxBackend(TrafficBackend):
    """Upstream file swapped atomically, validated by `nginx -t`, applied by a graceful reload."""

    name = "nginx"

    def __init__(self, upstream_file, *, upstream_name="grandmodel_backend", backends=None, keepalive=32,
                 nginx_binary="nginx", nginx_config="/etc/nginx/nginx.conf", nginx_prefix=None,
                 reload_command=None, state_file=None, verifier=None, command_timeout=60):
        self.upstream_file = os.path.abspath(upstream_file)
        self.upstream_name = upstream_name
        self.backends = backends or {}
        self.keepalive = keepalive
        self.nginx_binary = nginx_binary
        self.nginx_config = nginx_config
        self.nginx_prefix = nginx_prefix
        self.reload_command = list(reload_command) if reload_command else None
        directory, base = os.path.split(self.upstream_file)
        self.backup_file = os.path.join(directory, ".%s.previous" % base)
        self.state = StateFile(state_file or os.path.join(directory, ".%s.state.json" % base))
        self.verifier = verifier
        self.command_timeout = command_timeout
        self.reloaded = False
        self.wrote = False

    # commands
    def _nginx(self, *args):
        cmd = [self.nginx_binary]
        if self.nginx_prefix:
            cmd += ["-p", self.nginx_prefix]
        return [*cmd, "-c", self.nginx_config, *args]

    def test_command(self):
        return self._nginx("-t")

    def reload_cmd(self):
        return self.reload_command or self._nginx("-s", "reload")

    def _run(self, cmd, what):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.command_timeout, check=False)
        except FileNotFoundError as exc:
            raise TrafficSwitchError("%s failed: cannot run %s: %s" % (what, cmd[0], exc.strerror or exc)) from exc
        except subprocess.TimeoutExpired as exc:
            raise TrafficSwitchError("%s failed: %s did not finish within %ss"
                                     % (what, " ".join(cmd), self.command_timeout)) from exc
        if proc.returncode != 0:
            output = (proc.stderr.strip() or proc.stdout.strip() or "no output")
            raise TrafficSwitchError("%s failed: `%s` exited %d: %s" % (what, " ".join(cmd), proc.returncode, output),
                                     command=cmd, rc=proc.returncode, stderr=proc.stderr, stdout=proc.stdout)
        return proc

    # interface
    def read_state(self):
        record = self.state.read()
        from_file = parse_active_color(_read_text(self.upstream_file))
        active = from_file or record.get("active")
        source = "upstream_file" if from_file else ("state_file" if record.get("active") else None)
        previous = record.get("previous")
        if record.get("active") and from_file and record.get("active") != from_file:
            # The file was switched by something else since our record: the record's active is the previous.
            previous = record.get("active")
        return TrafficState(active=active, previous=previous, switched_at=record.get("switched_at"),
                            source=source)

    def plan(self, color):
        addresses = self.backends.get(color)
        if not addresses:
            raise TrafficSwitchError("cannot switch %s to %s: backends has no address for colour %s (known: %s)"
                                     % (self.upstream_file, color, color, ", ".join(sorted(self.backends)) or "none"))
        after = render_upstream(self.upstream_name, color, addresses, self.keepalive)
        return SwitchPlan(self.read_state(), color, _read_text(self.upstream_file), after, self.upstream_file)

    def apply(self, plan):
        self.reloaded = self.wrote = False
        if plan.before is not None:
            atomic_write(self.backup_file, plan.before)
        atomic_write(self.upstream_file, plan.after)
        self.wrote = True
        self._run(self.test_command(),
                  "nginx configuration test (%s) with %s" % (self.nginx_config, self.upstream_file))
        self.reloaded = True  # a failed reload may have half-happened: reload again after restoring
        self._run(self.reload_cmd(), "nginx reload")

    def verify(self, color):
        if self.verifier is None:
            return {"verified": False, "skipped": "no verify_url"}
        return self.verifier.verify(color)

    def restore(self, plan):
        done = []
        if self.wrote:
            if plan.before is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.upstream_file)
                done.append("removed %s (there was none before)" % self.upstream_file)
            else:
                atomic_write(self.upstream_file, plan.before)
                done.append("restored %s from %s" % (self.upstream_file, self.backup_file))
        if self.reloaded:
            self._run(self.reload_cmd(), "nginx reload after restoring %s" % self.upstream_file)
            done.append("reloaded nginx")
        return "; ".join(done) or "nothing to undo"

    def record_switch(self, color, previous):
        return self.state.write(color, previous)


def switch_traffic(backend, color, check_mode=False, want_diff=False):
    """Plan, apply, verify; on any failure restore and raise TrafficSwitchError with the evidence."""
    plan = backend.plan(color)
    state = plan.state
    result = {
        "changed": plan.changed,
        "active_color": color,
        "previous_color": state.active if (plan.changed and state.active != color) else state.previous,
        "verified": False,
        "verification": {},
        "backend": backend.name,
    }
    if want_diff:
        result["diff"] = plan.diff()
    if not plan.changed or check_mode:
        if not plan.changed:
            result["verification"] = {"skipped": "no change"}
        else:
            result["verification"] = {"skipped": "check mode"}
        return result
    started = time.monotonic()
    try:
        backend.apply(plan)
        evidence = backend.verify(color)
    except TrafficSwitchError as exc:
        restored, undo = _restore(backend, plan)
        note = "previous state restored (%s)" % undo if restored else undo
        restore_evidence = {}
        if restored and state.active and plan.before is not None:
            restore_evidence = _verify_quietly(backend, state.active)
            if restore_evidence.get("verified"):
                note += "; %s answers again" % state.active
            elif not restore_evidence.get("skipped"):
                note += "; WARNING: %s was not seen answering again (%s)" % (
                    state.active, restore_evidence.get("error"))
        extra = {k: v for k, v in exc.result.items() if k != "verification"}
        raise TrafficSwitchError(
            "switching %s traffic to %s on %s failed: %s; %s" % (backend.name, color, plan.target, exc, note),
            active_color=state.active, previous_color=state.previous, restored=restored,
            verification=exc.result.get("verification", {}), restore_verification=restore_evidence,
            **extra) from exc
    record = backend.record_switch(color, result["previous_color"])
    result["verified"] = bool(evidence.get("verified"))
    result["verification"] = evidence
    result["switched_at"] = record.get("switched_at")
    result["seconds"] = round(time.monotonic() - started, 3)
    return result


def _restore(backend, plan):
    try:
        return True, backend.restore(plan)
    except TrafficSwitchError as exc:
        return False, "restoring the previous state failed too: %s" % exc


def _verify_quietly(backend, color):
    try:
        return backend.verify(color)
    except TrafficSwitchError as exc:
        return dict(exc.result.get("verification") or {}, verified=False, error=str(exc))
