# -*- coding: utf-8 -*-
# Copyright: (c) 2025, GrandModel Ops
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Blue-green traffic switching: the backend interface and its nginx implementation.

A backend reads which colour is live, plans a switch (before/after, changed or not), applies it,
proves through the front door that the new colour answers, and restores the previous state when
anything on the way fails. `switch_traffic()` runs that sequence the same way for every backend;
haproxy and Kubernetes (Service selector) backends only have to implement the five methods.

"Anything" means anything: a refused configuration, a failed reload or verification, an HTTP-level
error of a probe, a bug, and SIGTERM/SIGHUP/SIGINT while applying or verifying all lead to the
restore (run with those signals held back), after which the failure is raised again. The nginx
backend also holds an exclusive lock (flock) for the whole switch, so two switches cannot
interleave, tests every candidate with `nginx -t` before the live file is replaced, and keeps a
journal while a switch is in flight, so a switch killed outright (SIGKILL, power loss) is undone by
the next run before it plans anything.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import datetime
import errno
import fnmatch
import glob
import json
import math
import os
import re
import shutil
import signal
import tempfile
import threading
import time

try:
    import fcntl
except ImportError:  # pragma: no cover - every platform the module supports (posix) has it
    fcntl = None

from ansible_collections.quantnova.grandmodel.plugins.module_utils.http_client import HttpClient, HttpProbeError

COLORS = ("blue", "green")
HEADER = "# Managed by quantnova.grandmodel.traffic_switch: edit the colour with that module, not by hand."
_ACTIVE_RE = re.compile(r"^#\s*active_color:\s*(\S+)\s*$", re.MULTILINE)
_BACKUP_RE = re.compile(r"^#\s*backup_color:\s*(\S+)\s*$", re.MULTILINE)
_WEIGHTS_RE = re.compile(r"^#\s*weights:\s*(.*?)\s*$", re.MULTILINE)
_WEIGHT_ITEM_RE = re.compile(r"^([A-Za-z0-9_-]+)=(\d+)$")
# While a colour is kept as backup, a primary that fails once is skipped for this long, so requests
# go straight to the backup instead of each paying a connect or read timeout first.
PRIMARY_FAIL_TIMEOUT = "5s"
INTERRUPT_SIGNALS = ("SIGTERM", "SIGHUP", "SIGINT")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


class TrafficSwitchError(Exception):
    """What was attempted, on what, and why it failed; `result` carries evidence for the caller."""

    def __init__(self, msg, **result):
        super().__init__(msg)
        self.result = result


class TrafficState:
    """The live colour as a backend sees it, and where that knowledge came from."""

    def __init__(self, active=None, previous=None, switched_at=None, source=None, backup=None, weights=None):
        self.active = active
        self.previous = previous
        self.switched_at = switched_at
        self.source = source
        self.backup = backup
        # {colour: percent} while the front door splits traffic (state=weighted), else None.
        self.weights = weights

    def as_dict(self):
        return {"active": self.active, "previous": self.previous, "switched_at": self.switched_at,
                "source": self.source, "backup": self.backup, "weights": self.weights}


class SwitchPlan:
    """What apply() would do: the state before, the colour wanted, the configuration before/after."""

    def __init__(self, state, color, before, after, target, backup=None, weights=None):
        self.state = state
        self.color = color
        self.before = before
        self.after = after
        self.target = target
        self.backup = backup
        self.weights = weights

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

    # Optional steps with safe defaults, so every backend runs through the same switch_traffic().
    def lock(self):
        """A context manager held for the whole switch; its value is evidence (dict) about the wait."""
        return contextlib.nullcontext({})

    def recover(self):
        """Undo a switch that died without restoring (SIGKILL); return what was done, or None."""
        return None

    def finish(self, plan):  # noqa: B027 - optional hook, a no-op unless a backend keeps bookkeeping
        """Called after a verified switch (or after a restore): clear any in-flight bookkeeping."""


class SwitchInterrupted(BaseException):
    """A signal arrived while a switch was being applied or verified (raised from the signal handler)."""

    def __init__(self, signame):
        super().__init__("interrupted by %s" % signame)
        self.signame = signame


class InterruptGuard:
    """Turns SIGTERM/SIGHUP/SIGINT into SwitchInterrupted while armed; holds them back while restoring.

    Signal handlers can only be set from the main thread; elsewhere (a caller's worker thread) the
    guard does nothing and the caller's own interrupt handling applies.
    """

    def __init__(self, signames=INTERRUPT_SIGNALS):
        self.signals = [getattr(signal, name) for name in signames if hasattr(signal, name)]
        self.previous = {}
        self.armed = False
        self.received = []
        self.active = threading.current_thread() is threading.main_thread()

    def _handler(self, signum, _frame):
        name = signal.Signals(signum).name
        self.received.append(name)
        if self.armed:
            self.armed = False
            raise SwitchInterrupted(name)

    def __enter__(self):
        if self.active:
            for signum in self.signals:
                self.previous[signum] = signal.signal(signum, self._handler)
            self.armed = True
        return self

    def disarm(self):
        self.armed = False

    @contextlib.contextmanager
    def held_back(self):
        """Signals that arrive meanwhile wait until the block is done (then only get recorded)."""
        self.armed = False
        if not self.active or not hasattr(signal, "pthread_sigmask"):
            yield
            return
        signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)

    def __exit__(self, *exc):
        self.armed = False
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        return False


# -- numeric inputs ------------------------------------------------------------------------------

def check_number(name, value, minimum=None, above=None, integer=False, maximum=None):
    """Return `value` as a number after checking it is finite and in range; TrafficSwitchError otherwise."""
    try:
        number = int(value) if integer else float(value)
        if integer and float(value) != number:
            raise ValueError("not a whole number")
    except (TypeError, ValueError) as exc:
        raise TrafficSwitchError("%s must be a %s (got %r)" % (name, "whole number" if integer else "number", value)) \
            from exc
    if not math.isfinite(number):
        raise TrafficSwitchError("%s must be a finite number (got %r)" % (name, value))
    if minimum is not None and number < minimum:
        raise TrafficSwitchError("%s must be %s or more (got %r)" % (name, minimum, value))
    if above is not None and number <= above:
        raise TrafficSwitchError("%s must be more than %s (got %r)" % (name, above, value))
    if maximum is not None and number > maximum:
        raise TrafficSwitchError("%s must be %s or less (got %r)" % (name, maximum, value))
    return number


# -- upstream file ------------------------------------------------------------------------------

def _server_lines(upstream_name, color, addresses, suffix):
    lines = []
    for raw in addresses:
        address = str(raw).strip()
        if not address or any(c in address for c in ";{}#\n\"' \t"):
            raise TrafficSwitchError("cannot render upstream %s: backend address %r for colour %s is not host:port"
                                     % (upstream_name, address, color))
        lines.append("    server %s %s;" % (address, suffix))
    return lines


def render_upstream(upstream_name, color, addresses, keepalive, backup_color=None, backup_addresses=()):
    """The upstream block for `color`, with `backup_color`'s servers as nginx `backup` when given.

    Alone, the live colour's servers are never marked failed (max_fails=0: with nowhere else to go,
    nginx should keep trying them). With a backup, a live server that fails once is skipped for
    PRIMARY_FAIL_TIMEOUT so requests go straight to the warm colour instead of each waiting for the
    failure first; the site's proxy_next_upstream retries the failed request there.
    """
    if not _NAME_RE.match(upstream_name):
        raise TrafficSwitchError("cannot render upstream %r: the name may hold only letters, digits, '_', '.', '-'"
                                 % upstream_name)
    if not addresses:
        raise TrafficSwitchError("cannot render upstream %s for colour %s: backends.%s lists no address"
                                 % (upstream_name, color, color))
    lines = [HEADER, "# active_color: %s" % color]
    if backup_color:
        if backup_color == color:
            raise TrafficSwitchError("cannot render upstream %s: colour %s cannot be its own backup"
                                     % (upstream_name, color))
        if not backup_addresses:
            raise TrafficSwitchError("cannot render upstream %s with backup colour %s: backends.%s lists no address"
                                     % (upstream_name, backup_color, backup_color))
        lines.append("# backup_color: %s" % backup_color)
    lines.append("upstream %s {" % upstream_name)
    if backup_color:
        lines += _server_lines(upstream_name, color, addresses,
                               "max_fails=1 fail_timeout=%s" % PRIMARY_FAIL_TIMEOUT)
        lines += _server_lines(upstream_name, backup_color, backup_addresses, "backup")
    else:
        lines += _server_lines(upstream_name, color, addresses, "max_fails=0")
    if keepalive:
        lines.append("    keepalive %d;" % keepalive)
    lines.append("}")
    return "\n".join(lines) + "\n"


def format_weights(weights):
    """`blue=90 green=10`: the weights as the upstream file's header records them (colour order)."""
    return " ".join("%s=%d" % (color, weights[color]) for color in COLORS if color in weights)


def check_weights(weights, backends=None):
    """{colour: percent} for every colour, after checking `weights`; TrafficSwitchError saying what to fix.

    Whole numbers from 0 to 100 (a colour left out has 0), only known colours, adding up to 100; with
    `backends`, every colour given more than 0 must have an address there. Weighted traffic is never an
    empty upstream: the sum rule leaves at least one colour above 0.
    """
    if not isinstance(weights, dict) or not weights:
        raise TrafficSwitchError("weights must map colours to percentages, for example {blue: 90, green: 10} (got %r)"
                                 % (weights,))
    unknown = sorted(str(color) for color in weights if color not in COLORS)
    if unknown:
        raise TrafficSwitchError("weights names the unknown colour %s; the colours are %s"
                                 % (", ".join(unknown), ", ".join(COLORS)))
    checked = {}
    for color in COLORS:
        value = weights.get(color, 0)
        if isinstance(value, bool):
            raise TrafficSwitchError("weights.%s must be a whole number from 0 to 100 (got %r)" % (color, value))
        checked[color] = check_number("weights.%s" % color, value, minimum=0, maximum=100, integer=True)
    total = sum(checked.values())
    if total != 100:
        raise TrafficSwitchError("weights must add up to 100 (got %s = %d)" % (
            " + ".join("%s %d" % (color, checked[color]) for color in COLORS), total))
    if backends is not None:
        for color in COLORS:
            if checked[color] and not (backends or {}).get(color):
                raise TrafficSwitchError("weights gives %s %d%% but backends has no address for colour %s (known: %s)"
                                         % (color, checked[color], color, ", ".join(sorted(backends or {})) or "none"))
    return checked


def weighted_active_color(weights, current=None):
    """The colour a weighted upstream records as active: the largest weight; a tie keeps `current`.

    A tie (50/50) keeps the colour that was live, so a release walking up still reads its old colour
    as the live one at the half-way step, and the same weights render the same file on a second run.
    """
    top = max(weights.values())
    tied = [color for color in COLORS if weights.get(color) == top]
    return current if current in tied else tied[0]


def _lcm(numbers):
    result = 1
    for number in numbers:
        result = result * number // math.gcd(result, number)
    return result


def render_weighted_upstream(upstream_name, weights, backends, keepalive, active=None):
    """The upstream block splitting traffic between colours by `weights` (percent per colour).

    nginx weighs servers, not colours: each server of a colour gets an equal part of its colour's
    weight, scaled by the least common multiple of the server counts so the parts stay whole numbers
    (blue 90 on two servers and green 10 on one: weight=90 twice and weight=20 once, 180:20 = 90:10).
    A colour at 0 gets no server line. With two colours taking traffic, a server that fails once is
    skipped for PRIMARY_FAIL_TIMEOUT and the site's proxy_next_upstream retries the request on the
    other colour; a colour alone at 100 is never marked failed (max_fails=0), as render_upstream does.
    """
    if not _NAME_RE.match(upstream_name):
        raise TrafficSwitchError("cannot render upstream %r: the name may hold only letters, digits, '_', '.', '-'"
                                 % upstream_name)
    weights = check_weights(weights, backends)
    active = weighted_active_color(weights, active)
    serving = [color for color in COLORS if weights[color]]
    scale = _lcm(len(backends[color]) for color in serving)
    lines = [HEADER, "# active_color: %s" % active, "# weights: %s" % format_weights(weights),
             "upstream %s {" % upstream_name]
    fails = "max_fails=1 fail_timeout=%s" % PRIMARY_FAIL_TIMEOUT if len(serving) > 1 else "max_fails=0"
    for color in serving:
        addresses = backends[color]
        per_server = weights[color] * scale // len(addresses)
        lines += _server_lines(upstream_name, color, addresses, "weight=%d %s" % (per_server, fails))
    if keepalive:
        lines.append("    keepalive %d;" % keepalive)
    lines.append("}")
    return "\n".join(lines) + "\n"


def parse_weights(text):
    """The weights a weighted upstream file records ({colour: percent}), or None for a one-colour file."""
    match = _WEIGHTS_RE.search(text or "")
    if not match:
        return None
    weights = {}
    for item in match.group(1).split():
        found = _WEIGHT_ITEM_RE.match(item)
        if found:
            weights[found.group(1)] = int(found.group(2))
    return weights or None


def parse_active_color(text):
    match = _ACTIVE_RE.search(text or "")
    return match.group(1) if match else None


def parse_backup_color(text):
    match = _BACKUP_RE.search(text or "")
    return match.group(1) if match else None


def _read_text(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TrafficSwitchError("cannot read %s: %s" % (path, exc.strerror or exc)) from exc


def _write_temp(directory, base, text, mode, suffix=".tmp"):
    """Write `text` to a fsynced hidden temporary file in `directory`; return its path."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".%s." % base, suffix=suffix, dir=directory)
    except OSError as exc:
        raise TrafficSwitchError("cannot create a temporary file in %s: %s" % (directory, exc.strerror or exc)) from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise TrafficSwitchError("cannot write %s: %s" % (tmp, exc.strerror or exc)) from exc
    return tmp


def _file_mode(path, default=0o644):
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        return default


def atomic_write(module, path, text, mode=None):
    """Write `text` to a hidden temporary file beside `path`, fsync it, then atomic_move it into place.

    The temporary name starts with a dot and ends in .tmp, so an nginx `include dir/*.conf` (or `dir/*`)
    glob never picks up a half-written file. `mode` None keeps the mode of the file replaced (0644 for
    a new one); a mode given is the mode the file ends with either way.
    """
    directory, base = os.path.split(os.path.abspath(path))
    tmp = _write_temp(directory, base, text, _file_mode(path) if mode is None else mode)
    replace_file(module, tmp, path)
    if mode is not None and _file_mode(path) != mode:
        _chmod(path, mode)


def replace_file(module, source, path):
    """Atomically move `source` (in the same directory) onto `path` and make the rename durable.

    `module.atomic_move` keeps the owner, group, mode and SELinux context of the file it replaces.
    A new file keeps the mode `source` was given (atomic_move would apply the umask instead).
    """
    if module is None:
        _unlink_quietly(source)
        raise TrafficSwitchError("cannot write %s: no AnsibleModule was given to write it with" % path)
    new_mode = None if os.path.lexists(path) else _file_mode(source)
    try:
        module.atomic_move(source, path)
    except Exception as exc:  # atomic_move raises a bare Exception chained to the OSError
        _unlink_quietly(source)
        cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
        reason = getattr(cause, "strerror", None) or cause
        raise TrafficSwitchError("cannot write %s: %s" % (path, reason)) from exc
    if new_mode is not None and _file_mode(path) != new_mode:
        _chmod(path, new_mode)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _chmod(path, mode):
    try:
        os.chmod(path, mode)
    except OSError as exc:
        raise TrafficSwitchError("cannot set the mode of %s to %04o: %s" % (path, mode, exc.strerror or exc)) from exc


def _unlink_quietly(path):
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


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
    """A small JSON record {active, previous, backup, switched_at} kept beside the upstream file."""

    def __init__(self, path, module=None):
        self.path = path
        self.module = module

    def read(self):
        text = _read_text(self.path)
        if text is None:
            return {}
        try:
            data = json.loads(text)
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def write(self, active, previous, backup=None, weights=None):
        record = {"active": active, "previous": previous, "backup": backup, "switched_at": _now()}
        if weights is not None:
            record["weights"] = weights
        atomic_write(self.module, self.path, json.dumps(record, indent=2, sort_keys=True) + "\n", mode=0o644)
        return record


def render_metrics(active, backup, colors, upstream_name, weights=None):
    """node_exporter textfile-collector lines: which colour takes traffic, which one is the warm backup,
    and the percentage of requests each colour is given (`weights` when split, else 100 for `active`)."""
    lines = [
        "# HELP grandmodel_traffic_active_color 1 for the colour the front door sends traffic to "
        "(quantnova.grandmodel.traffic_switch).",
        "# TYPE grandmodel_traffic_active_color gauge",
    ]
    for color in colors:
        lines.append('grandmodel_traffic_active_color{color="%s",upstream="%s"} %d'
                     % (color, upstream_name, 1 if color == active else 0))
    lines += [
        "# HELP grandmodel_traffic_backup_color 1 for the colour kept as nginx backup (the warm window).",
        "# TYPE grandmodel_traffic_backup_color gauge",
    ]
    for color in colors:
        lines.append('grandmodel_traffic_backup_color{color="%s",upstream="%s"} %d'
                     % (color, upstream_name, 1 if color == backup else 0))
    lines += [
        "# HELP grandmodel_traffic_weight_percent Percent of the front door's requests given to the colour "
        "(weighted steps; the live colour alone: 100, a backup: 0).",
        "# TYPE grandmodel_traffic_weight_percent gauge",
    ]
    for color in colors:
        share = (weights or {}).get(color, 0) if weights else (100 if color == active else 0)
        lines.append('grandmodel_traffic_weight_percent{color="%s",upstream="%s"} %d' % (color, upstream_name, share))
    return "\n".join(lines) + "\n"


# -- front door verification ---------------------------------------------------------------------

class FrontDoorVerifier:
    """GET a URL until its JSON `color` field equals the wanted colour `consecutive` times in a row.

    nginx's old workers keep serving for a moment after a graceful reload, so a single answer proves
    nothing; a streak does. Evidence: every distinct answer seen, in order, with counts and times.
    """

    def __init__(self, url, *, timeout=10.0, consecutive=3, validate_certs=True, interval=0.1,
                 request_timeout=2.0, sleep=time.sleep, clock=time.monotonic, weight_sample=200,
                 weight_tolerance=10.0):
        self.url = url
        self.timeout = check_number("verify_timeout", timeout, above=0)
        self.consecutive = check_number("verify_consecutive", consecutive, minimum=1, integer=True)
        self.interval = check_number("verify_interval", interval, minimum=0)
        self.weight_sample = check_number("verify_weight_sample", weight_sample, minimum=10, maximum=10000,
                                          integer=True)
        self.weight_tolerance = check_number("verify_weight_tolerance", weight_tolerance, minimum=0, maximum=100)
        request_timeout = check_number("verify request timeout", request_timeout, above=0)
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

    def weight_window(self, weights):
        """Answers judged at once: verify_weight_sample, and enough that the smallest weight expects 3."""
        smallest = min(weight for weight in weights.values() if weight > 0)
        return max(self.weight_sample, -(-300 // smallest))

    def _split_problems(self, counts, weights, window):
        problems = []
        strangers = {answer: n for answer, n in counts.items() if not weights.get(answer)}
        if strangers:
            problems.append("answers from outside the split: %s" % ", ".join(
                "%s x%d" % (answer, n) for answer, n in sorted(strangers.items())))
        for color in COLORS:
            weight = weights.get(color, 0)
            if not weight:
                continue
            share = 100.0 * counts.get(color, 0) / window
            if not counts.get(color):
                problems.append("%s (weight %d) never answered" % (color, weight))
            elif abs(share - weight) > self.weight_tolerance:
                problems.append("%s answered %.1f%% for weight %d (tolerance %g points)"
                                % (color, share, weight, self.weight_tolerance))
        return problems

    def verify_weights(self, weights):
        """GET the URL until the last `window` answers split by `weights`; evidence or TrafficSwitchError.

        The window passes when it holds only colours with a weight above 0 (no colour at 0, no error),
        each of them at least once, and each colour's share within weight_tolerance percentage points of
        its weight. The window slides one answer at a time, so the answers of old nginx workers still
        draining after the reload only delay the verdict. Requests go back to back (no interval).
        """
        window = self.weight_window(weights)
        started = self.clock()
        recent = collections.deque(maxlen=window)
        seen = {}  # answer -> [count, first_seen_s]
        requests = 0
        while True:
            answer = self._answer()
            requests += 1
            elapsed = self.clock() - started
            recent.append(answer)
            seen.setdefault(answer, [0, round(elapsed, 3)])[0] += 1
            full = len(recent) == window
            counts = collections.Counter(recent)
            problems = self._split_problems(counts, weights, window) if full else []
            done = full and not problems
            if done or elapsed >= self.timeout:
                evidence = {
                    "url": self.url, "expected_weights": dict(weights), "requests": requests,
                    "answers": [{"answer": a, "count": n, "first_seen_s": t} for a, (n, t) in seen.items()],
                    "window": window, "window_counts": dict(sorted(counts.items())),
                    "window_shares": {a: round(100.0 * n / len(recent), 1) for a, n in sorted(counts.items())},
                    "tolerance_points": self.weight_tolerance, "elapsed_s": round(elapsed, 3), "verified": done,
                }
                if done:
                    return evidence
                if not full:
                    problems = ["only %d answers in %.1fs, %d needed" % (len(recent), self.timeout, window)]
                raise TrafficSwitchError("%s did not split traffic as %s within %.1fs over the last %d answers: %s"
                                         % (self.url, format_weights(weights), self.timeout, window,
                                            "; ".join(problems)), verification=evidence)


# -- nginx configuration test of a candidate ------------------------------------------------------

_INCLUDE_RE = re.compile(r"(^|[\s;{}])include\s+(\"[^\"]*\"|'[^']*'|[^\s;]+)\s*;")


def _strip_comment(line):
    """The part of an nginx configuration line before an unquoted '#'."""
    quote = None
    for index, char in enumerate(line):
        if quote:
            if char == quote:
                quote = None
        elif char in "\"'":
            quote = char
        elif char == "#":
            return line[:index]
    return line


def candidate_main_config(config_text, config_dir, upstream_file, candidate_file):
    """The main configuration with the include of `upstream_file` pointed at `candidate_file`, or None.

    Handles a direct include by path (absolute or relative to the configuration's directory) and a
    glob matching the upstream file (expanded into explicit includes, in glob order). Returns None
    when the main configuration does not include the upstream file itself (nested or not at all).
    """
    found = [False]
    upstream_file = os.path.abspath(upstream_file)

    def rewrite(match):
        raw = match.group(2)
        arg = raw[1:-1] if raw[:1] in "\"'" else raw
        path = os.path.normpath(arg if os.path.isabs(arg) else os.path.join(config_dir, arg))
        if path == upstream_file:
            found[0] = True
            return "%sinclude %s;" % (match.group(1), candidate_file)
        if glob.has_magic(path) and os.path.dirname(path) == os.path.dirname(upstream_file) \
                and fnmatch.fnmatchcase(os.path.basename(upstream_file), os.path.basename(path)) \
                and not os.path.basename(upstream_file).startswith("."):
            found[0] = True
            others = [p for p in sorted(glob.glob(path)) if os.path.abspath(p) != upstream_file]
            paths = sorted([*others, upstream_file])
            return match.group(1) + " ".join(
                "include %s;" % (candidate_file if p == upstream_file else p) for p in paths)
        return match.group(0)

    lines = []
    for line in config_text.splitlines(True):
        code = _strip_comment(line)
        lines.append(_INCLUDE_RE.sub(rewrite, code) + line[len(code):])
    return "".join(lines) if found[0] else None


UPSTREAM_ONLY_CONFIG = """\
# quantnova.grandmodel.traffic_switch: syntax test of a candidate upstream file on its own
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
events {{ worker_connections 16; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {candidate};
}}
"""


# -- nginx ---------------------------------------------------------------------------------------

class NginxBackend(TrafficBackend):
    """Upstream file swapped atomically after `nginx -t` accepted it, applied by a graceful reload."""

    name = "nginx"

    def __init__(self, upstream_file, *, module=None, upstream_name="grandmodel_backend", backends=None, keepalive=32,
                 nginx_binary="nginx", nginx_config="/etc/nginx/nginx.conf", nginx_prefix=None,
                 reload_command=None, state_file=None, verifier=None, command_timeout=60, lock_timeout=30.0,
                 metrics_file=None, precheck_path=None, precheck_timeout=2.0):
        # The AnsibleModule whose run_command and atomic_move do the work (None: read and plan only).
        self.module = module
        self.upstream_file = os.path.abspath(upstream_file)
        self.upstream_name = upstream_name
        self.backends = backends or {}
        self.keepalive = check_number("keepalive", keepalive, minimum=0, maximum=65535, integer=True)
        self.nginx_binary = nginx_binary
        self.nginx_config = os.path.abspath(nginx_config)
        self.nginx_prefix = nginx_prefix
        self.reload_command = list(reload_command) if reload_command else None
        directory, base = os.path.split(self.upstream_file)
        self.directory, self.base = directory, base
        self.backup_file = os.path.join(directory, ".%s.previous" % base)
        self.journal_file = os.path.join(directory, ".%s.pending" % base)
        self.lock_file = os.path.join(directory, ".%s.lock" % base)
        self.state = StateFile(state_file or os.path.join(directory, ".%s.state.json" % base), module)
        self.metrics_file = metrics_file
        self.verifier = verifier
        self.command_timeout = check_number("command_timeout", command_timeout, above=0)
        self.lock_timeout = check_number("lock_timeout", lock_timeout, minimum=0)
        self.precheck_path = precheck_path or None
        if self.precheck_path and not self.precheck_path.startswith("/"):
            raise TrafficSwitchError("precheck_path must be an absolute path such as /ready (got %r)" % precheck_path)
        self.precheck_timeout = check_number("precheck_timeout", precheck_timeout, above=0)
        self.precheck_evidence = {}
        self.reloaded = False
        self.wrote = False
        self.candidate = None
        self.test_evidence = {}

    # commands
    def _nginx(self, *args, config=None):
        cmd = [self.nginx_binary]
        if self.nginx_prefix:
            cmd += ["-p", self.nginx_prefix]
        return [*cmd, "-c", config or self.nginx_config, *args]

    def test_command(self, config=None):
        return self._nginx("-t", config=config)

    def reload_cmd(self):
        return self.reload_command or self._nginx("-s", "reload")

    def _run(self, cmd, what):
        """`module.run_command` with a deadline: a command still running after command_timeout is killed.

        run_command has no timeout of its own; a timer started once the process exists kills it, and the
        process is killed as well when run_command is interrupted (a signal turned into SwitchInterrupted).
        """
        if self.module is None:
            raise TrafficSwitchError("%s failed: cannot run %s: no AnsibleModule was given to run it with"
                                     % (what, cmd[0]))
        started, expired = [], threading.Event()

        def watch(process):
            def expire():
                expired.set()
                with contextlib.suppress(OSError):
                    process.kill()
            timer = threading.Timer(self.command_timeout, expire)
            timer.daemon = True
            started.append((process, timer))
            timer.start()

        try:
            rc, stdout, stderr = self.module.run_command(
                cmd, handle_exceptions=False, expand_user_and_vars=False, errors="replace",
                before_communicate_callback=watch)
        except OSError as exc:
            raise TrafficSwitchError("%s failed: cannot run %s: %s" % (what, cmd[0], exc.strerror or exc)) from exc
        except BaseException:
            for process, _timer in started:
                with contextlib.suppress(OSError):
                    process.kill()
                    process.wait()
            raise
        finally:
            for _process, timer in started:
                timer.cancel()
        if expired.is_set():
            raise TrafficSwitchError("%s failed: %s did not finish within %ss"
                                     % (what, " ".join(cmd), self.command_timeout))
        if rc != 0:
            output = (stderr.strip() or stdout.strip() or "no output")
            raise TrafficSwitchError("%s failed: `%s` exited %d: %s" % (what, " ".join(cmd), rc, output),
                                     command=cmd, rc=rc, stderr=stderr, stdout=stdout)
        return rc, stdout, stderr

    # locking and crash recovery
    @contextlib.contextmanager
    def lock(self):
        """Hold an exclusive flock on .<upstream>.lock for the whole switch; wait up to lock_timeout."""
        if fcntl is None:  # pragma: no cover
            raise TrafficSwitchError("cannot lock %s: fcntl is not available on this platform" % self.lock_file)
        try:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise TrafficSwitchError("cannot open the switch lock %s: %s" % (self.lock_file, exc.strerror or exc)) \
                from exc
        started = time.monotonic()
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        raise TrafficSwitchError("cannot lock %s: %s" % (self.lock_file, exc.strerror or exc)) \
                            from exc
                if time.monotonic() - started >= self.lock_timeout:
                    holder = _read_text(self.lock_file) or "unknown"
                    raise TrafficSwitchError(
                        "cannot switch %s: another traffic switch holds the lock %s (%s); waited %.1fs "
                        "(lock_timeout)" % (self.upstream_file, self.lock_file, holder.strip() or "unknown",
                                            self.lock_timeout), lock_holder=holder.strip())
                time.sleep(0.05)
            waited = time.monotonic() - started
            os.ftruncate(fd, 0)
            os.pwrite(fd, ("pid %d since %s" % (os.getpid(), _now())).encode(), 0)
            yield {"lock_file": self.lock_file, "lock_waited_s": round(waited, 3)}
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def _journal(self):
        text = _read_text(self.journal_file)
        if text is None:
            return None
        try:
            data = json.loads(text)
        except ValueError:
            data = {}
        return data if isinstance(data, dict) else {}

    def recover(self):
        """A journal left behind means a switch died mid-way (we hold the lock: it is not running).

        Put back the file it replaced (kept as the backup file), reload nginx, and say what was done.
        """
        journal = self._journal()
        if journal is None:
            return None
        weights = journal.get("weights")
        target = "weights %s" % format_weights(weights) if isinstance(weights, dict) else journal.get("color")
        done = []
        if journal.get("replaced"):
            if journal.get("before_existed"):
                previous = _read_text(self.backup_file)
                if previous is None:
                    raise TrafficSwitchError(
                        "a switch to %s (pid %s, %s) died before finishing and its backup %s is gone: check %s by "
                        "hand, then remove %s" % (target, journal.get("pid"), journal.get("started"),
                                                  self.backup_file, self.upstream_file, self.journal_file))
                atomic_write(self.module, self.upstream_file, previous)
                done.append("restored %s from %s" % (self.upstream_file, self.backup_file))
            else:
                _unlink_quietly(self.upstream_file)
                done.append("removed %s (there was none before)" % self.upstream_file)
            self._run(self.reload_cmd(), "nginx reload after undoing an interrupted switch")
            done.append("reloaded nginx")
        for leftover in (journal.get("candidate"),):
            if leftover:
                _unlink_quietly(leftover)
        _unlink_quietly(self.journal_file)
        return "a switch to %s (pid %s, started %s) had died without finishing: %s" % (
            target, journal.get("pid"), journal.get("started"), "; ".join(done) or "nothing was live yet")

    def _write_journal(self, plan, replaced):
        record = {"pid": os.getpid(), "color": plan.color, "backup": plan.backup, "weights": plan.weights,
                  "started": _now(),
                  "before_existed": plan.before is not None, "replaced": replaced, "candidate": self.candidate}
        atomic_write(self.module, self.journal_file, json.dumps(record, sort_keys=True) + "\n", mode=0o600)

    def finish(self, plan):
        _unlink_quietly(self.journal_file)
        if self.candidate:
            _unlink_quietly(self.candidate)

    # interface
    def read_state(self):
        record = self.state.read()
        text = _read_text(self.upstream_file)
        from_file = parse_active_color(text)
        active = from_file or record.get("active")
        source = "upstream_file" if from_file else ("state_file" if record.get("active") else None)
        previous = record.get("previous")
        if record.get("active") and from_file and record.get("active") != from_file:
            # The file was switched by something else since our record: the record's active is the previous.
            previous = record.get("active")
        backup = parse_backup_color(text) if text is not None else record.get("backup")
        weights = parse_weights(text) if text is not None else record.get("weights")
        return TrafficState(active=active, previous=previous, switched_at=record.get("switched_at"),
                            source=source, backup=backup, weights=weights)

    def plan_weighted(self, weights):
        """The plan for splitting traffic by `weights`; the recorded active colour follows the largest weight."""
        weights = check_weights(weights, self.backends)
        state = self.read_state()
        after = render_weighted_upstream(self.upstream_name, weights, self.backends, self.keepalive, state.active)
        return SwitchPlan(state, parse_active_color(after), _read_text(self.upstream_file), after, self.upstream_file,
                          weights=weights)

    def plan(self, color, backup=None, weights=None):
        if weights is not None:
            return self.plan_weighted(weights)
        addresses = self.backends.get(color)
        if not addresses:
            raise TrafficSwitchError("cannot switch %s to %s: backends has no address for colour %s (known: %s)"
                                     % (self.upstream_file, color, color, ", ".join(sorted(self.backends)) or "none"))
        backup_addresses = ()
        if backup:
            backup_addresses = self.backends.get(backup) or ()
            if backup == color:
                raise TrafficSwitchError("cannot switch %s to %s with %s as backup: a colour cannot back up itself"
                                         % (self.upstream_file, color, backup))
            if not backup_addresses:
                raise TrafficSwitchError("cannot keep %s as backup in %s: backends has no address for colour %s"
                                         % (backup, self.upstream_file, backup))
        after = render_upstream(self.upstream_name, color, addresses, self.keepalive, backup, backup_addresses)
        return SwitchPlan(self.read_state(), color, _read_text(self.upstream_file), after, self.upstream_file,
                          backup=backup)

    def test_candidate(self, candidate):
        """`nginx -t` of the configuration as it would be with `candidate` in place of the live upstream file."""
        config_dir = os.path.dirname(self.nginx_config)
        main = _read_text(self.nginx_config)
        text = candidate_main_config(main, config_dir, self.upstream_file, candidate) if main is not None else None
        if text is not None:
            # Beside the real one, so relative includes (mime.types, ...) resolve the same way.
            config = _write_temp(config_dir, os.path.basename(self.nginx_config), text, 0o600, suffix=".candidate")
            scope = "main_config"
            cleanup = [config]
        else:
            tmp = tempfile.mkdtemp(prefix="grandmodel-nginx-test-")
            config = os.path.join(tmp, "nginx.conf")
            with open(config, "w", encoding="utf-8") as handle:
                handle.write(UPSTREAM_ONLY_CONFIG.format(tmp=tmp, candidate=candidate))
            scope = "upstream_only"
            cleanup = [tmp]
        try:
            self._run(self.test_command(config), "nginx configuration test (%s) with the candidate for %s"
                      % (self.nginx_config, self.upstream_file))
        finally:
            for path in cleanup:
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    _unlink_quietly(path)
        note = ("the main configuration %s with the candidate in place of %s" % (self.nginx_config, self.upstream_file)
                if scope == "main_config" else
                "the candidate on its own: %s does not include %s directly" % (self.nginx_config, self.upstream_file))
        self.test_evidence = {"tested": scope, "note": note}
        return self.test_evidence

    def check_ready(self, plan):
        """Every server of the new colour answers 200 on precheck_path, or nothing is touched.

        Switching to a colour that is down would send clients to it until the verification gives up
        (without a backup, each of those requests fails); asking each server first avoids that.
        A weighted plan asks every server of every colour it gives a weight above 0.
        """
        if not self.precheck_path:
            return {}
        colors = [color for color in COLORS if plan.weights.get(color)] if plan.weights else [plan.color]
        client = HttpClient(timeout=self.precheck_timeout)
        answers, problems, not_ready = {}, [], []
        for color in colors:
            for address in self.backends.get(color) or ():
                url = "http://%s%s" % (str(address).strip(), self.precheck_path)
                try:
                    response = client.get(url)
                    answers[address] = response.status
                    if response.status != 200:
                        problems.append("%s answered %d" % (url, response.status))
                except HttpProbeError as exc:
                    answers[address] = str(exc)
                    problems.append(str(exc))
                if problems and color not in not_ready:
                    not_ready.append(color)
        self.precheck_evidence = {"path": self.precheck_path, "answers": answers, "ready": not problems}
        if problems:
            wanted = "weights %s" % format_weights(plan.weights) if plan.weights else plan.color
            raise TrafficSwitchError("refusing to switch %s to %s: not every server of %s is ready (%s); the live "
                                     "upstream was not touched" % (self.upstream_file, wanted, " and ".join(not_ready),
                                                                   "; ".join(problems)),
                                     precheck=self.precheck_evidence)
        return self.precheck_evidence

    def apply(self, plan):
        self.reloaded = self.wrote = False
        self.check_ready(plan)
        self.candidate = _write_temp(self.directory, self.base, plan.after, _file_mode(self.upstream_file),
                                     suffix=".candidate")
        if plan.before is not None:
            atomic_write(self.module, self.backup_file, plan.before)
        self._write_journal(plan, replaced=False)
        self.test_candidate(self.candidate)
        # Tested: from here the live file changes, so the journal says so first (a SIGKILL after this
        # point is undone by the next run's recover()).
        self._write_journal(plan, replaced=True)
        self.wrote = True
        replace_file(self.module, self.candidate, self.upstream_file)
        self.candidate = None
        self.reloaded = True  # a failed reload may have half-happened: reload again after restoring
        self._run(self.reload_cmd(), "nginx reload")

    def verify(self, color, weights=None):
        if self.verifier is None:
            return {"verified": False, "skipped": "no verify_url"}
        if weights is not None:
            return self.verifier.verify_weights(weights)
        return self.verifier.verify(color)

    def restore(self, plan):
        done = []
        if self.candidate:
            _unlink_quietly(self.candidate)
            self.candidate = None
        if self.wrote:
            if plan.before is None:
                _unlink_quietly(self.upstream_file)
                done.append("removed %s (there was none before)" % self.upstream_file)
            else:
                atomic_write(self.module, self.upstream_file, plan.before)
                done.append("restored %s from %s" % (self.upstream_file, self.backup_file))
        else:
            done.append("the live %s was never replaced" % self.upstream_file)
        if self.reloaded:
            self._run(self.reload_cmd(), "nginx reload after restoring %s" % self.upstream_file)
            done.append("reloaded nginx")
        self.finish(plan)
        return "; ".join(done)

    def record_switch(self, color, previous):
        text = _read_text(self.upstream_file)
        return self.state.write(color, previous, parse_backup_color(text), weights=parse_weights(text))

    def export_state(self):
        """Write the live and backup colour for node_exporter's textfile collector; True when it changed."""
        if not self.metrics_file:
            return False
        state = self.read_state()
        colors = sorted(set(COLORS) | set(self.backends))
        text = render_metrics(state.active, state.backup, colors, self.upstream_name, state.weights)
        if _read_text(self.metrics_file) == text:
            return False
        directory = os.path.dirname(os.path.abspath(self.metrics_file))
        if not os.path.isdir(directory):
            raise TrafficSwitchError("cannot export the live colour to %s: the directory %s does not exist (the "
                                     "node exporter's textfile directory)" % (self.metrics_file, directory))
        atomic_write(self.module, self.metrics_file, text, mode=0o644)
        return True


def switch_traffic(backend, color, check_mode=False, want_diff=False, backup_color=None, weights=None):
    """Lock, plan, apply, verify; on ANY failure or interrupt restore, then raise.

    With `weights` ({colour: percent}, backends that split traffic only) the front door is split
    between the colours instead, `color` is ignored and the plan names the colour recorded as active.

    A TrafficSwitchError or an interrupting signal is raised as TrafficSwitchError carrying the evidence;
    anything else (a bug, KeyboardInterrupt) is re-raised as it was, after the restore.
    """
    lock = contextlib.nullcontext({}) if check_mode else backend.lock()
    with lock as lock_evidence:
        recovered = None if check_mode else backend.recover()
        if weights is not None:
            plan = backend.plan(color, weights=weights)
            color = plan.color
            wanted = "weights %s" % format_weights(plan.weights)
        else:
            plan = backend.plan(color, backup=backup_color) if backup_color else backend.plan(color)
            wanted = color
        state = plan.state
        result = {
            "changed": plan.changed,
            "active_color": color,
            "backup_color": plan.backup,
            "previous_color": state.active if (state.active and state.active != color) else state.previous,
            "verified": False,
            "verification": {},
            "backend": backend.name,
        }
        if weights is not None:
            result["weights"] = plan.weights
        if lock_evidence:
            result["lock"] = lock_evidence
        if recovered:
            result["recovered"] = recovered
            result["changed"] = True
        if want_diff:
            result["diff"] = plan.diff()
        if recovered and not plan.changed:
            # The recovery reloaded nginx: prove the colour it put back answers, as after any switch.
            result["verification"] = _verify_quietly(backend, color, plan.weights)
            result["verified"] = bool(result["verification"].get("verified"))
            return result
        if not plan.changed or check_mode:
            result["verification"] = {"skipped": "no change" if not plan.changed else "check mode"}
            return result
        started = time.monotonic()
        phase = "applying"
        with InterruptGuard() as guard:
            try:
                backend.apply(plan)
                phase = "verifying"
                evidence = _verify(backend, color, plan.weights)
                guard.disarm()
            except BaseException as exc:  # restore on anything, then raise again
                with guard.held_back():
                    restored, undo, restore_evidence = _restore_and_check(backend, plan, state)
                note = "previous state restored (%s)" % undo if restored else undo
                was = "weights %s" % format_weights(state.weights) if state.weights else state.active
                if restore_evidence.get("verified"):
                    note += "; %s answers again" % was
                elif restored and restore_evidence and not restore_evidence.get("skipped"):
                    note += "; WARNING: %s was not seen answering again (%s)" % (was, restore_evidence.get("error"))
                details = dict(active_color=state.active, previous_color=state.previous, restored=restored,
                               restore_verification=restore_evidence, phase=phase, **dict(lock_evidence or {}))
                if weights is not None or state.weights is not None:
                    details["weights"] = state.weights
                if isinstance(exc, TrafficSwitchError):
                    extra = {k: v for k, v in exc.result.items() if k != "verification"}
                    message = "switching %s traffic to %s on %s failed: %s; %s" % (
                        backend.name, wanted, plan.target, exc, note)
                    raise TrafficSwitchError(message, verification=exc.result.get("verification", {}),
                                             **dict(details, **extra)) from exc
                if isinstance(exc, SwitchInterrupted):
                    message = "switching %s traffic to %s on %s was %s while %s; %s" % (
                        backend.name, wanted, plan.target, exc, phase, note)
                    raise TrafficSwitchError(message, interrupted=exc.signame, **details) from exc
                if hasattr(exc, "add_note"):
                    exc.add_note("traffic_switch: %s while %s; %s" % (type(exc).__name__, phase, note))
                raise
        record = backend.record_switch(color, result["previous_color"])
        backend.finish(plan)
        result["verified"] = bool(evidence.get("verified"))
        result["verification"] = evidence
        result["switched_at"] = record.get("switched_at")
        result["seconds"] = round(time.monotonic() - started, 3)
        if getattr(backend, "test_evidence", None):
            result["config_test"] = backend.test_evidence
        if getattr(backend, "precheck_evidence", None):
            result["precheck"] = backend.precheck_evidence
        return result


def _restore_and_check(backend, plan, state):
    try:
        undo = backend.restore(plan)
        restored = True
    except TrafficSwitchError as exc:
        return False, "restoring the previous state failed too: %s" % exc, {}
    restore_evidence = {}
    if state.active and plan.before is not None and getattr(backend, "reloaded", True):
        restore_evidence = _verify_quietly(backend, state.active, state.weights)
    return restored, undo, restore_evidence


def _verify(backend, color, weights=None):
    """The streak check of one colour, or with weights the split check (backends without weights never see it)."""
    return backend.verify(color, weights=weights) if weights is not None else backend.verify(color)


def _verify_quietly(backend, color, weights=None):
    try:
        return _verify(backend, color, weights)
    except TrafficSwitchError as exc:
        return dict(exc.result.get("verification") or {}, verified=False, error=str(exc))
