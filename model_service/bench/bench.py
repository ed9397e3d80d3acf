"""``python model_service/bench/bench.py``: the service against its baselines, one honest run.

Every server (the service; the naive and the plain FastAPI+orjson baselines; a trivial FastAPI
``GET /``) runs at once with the same settings (pinned to the same core, one torch thread, the
same uvicorn configuration) and sits idle while another is measured. Each scenario is measured
``--repeat`` times on every server that offers it, the servers' order rotating every round,
and the median run is the figure: every compared number is measured the same way. The load
generator (``loadgen.py``) runs on the other core; its own ceiling is measured against a sink.

Then, on the service: the tail at half its measured single-sample capacity (open loop, p99
and p99.9 against the unloaded p50 of the same run), and plain-prediction p99 alone and beside
a Monte-Carlo flood, alternating. Prints the raw runs, a table, the ratios with their targets,
the machine's load before and after, and as its last line one JSON object with everything.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from loadgen import build_request, free_port, run_spec  # noqa: E402

from grandmodel_service.engine import load_model  # noqa: E402
from grandmodel_service.export import export_model  # noqa: E402

MODEL = "strategic"
PREDICT = f"/v1/models/{MODEL}/predict"
NUMPY = orjson.OPT_SERIALIZE_NUMPY
#: ratio name -> (goal, "min" when the ratio must reach the goal, "max" when it must stay under)
TARGETS: dict[str, tuple[float, str]] = {
    "json_batch256_vs_plain": (3.0, "min"),
    "single_c16_vs_trivial_get": (0.7, "min"),
    "single_c16_vs_naive": (2.0, "min"),
    "tail_p99_over_unloaded_p50": (5.0, "max"),
    "mc_flood_p99_over_alone": (2.0, "max"),
}


def _loadavg() -> float:
    return round(os.getloadavg()[0], 2)


@contextlib.contextmanager
def _server(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as sink:
        proc = subprocess.Popen(args, env={**os.environ, **env}, stdout=sink, stderr=sink)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait(port: int, path: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {path}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as reply,
        ):
            if reply.status == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"port {port} did not answer {path} within {timeout}s")


class Bench:
    def __init__(self, work: Path, duration: float, warmup: float, repeat: int) -> None:
        self.work = work
        self.duration = duration
        self.warmup = warmup
        self.repeat = repeat
        cpus = sorted(os.sched_getaffinity(0))
        self.server_cpu = cpus[0] if len(cpus) >= 2 else None
        self.client_cpu = cpus[1] if len(cpus) >= 2 else None
        self.log = work / "servers.log"
        self.requests: dict[str, Path] = {}
        self.raw: list[dict[str, Any]] = []

    def request(self, name: str, data: bytes) -> None:
        path = self.work / f"{name}.http"
        path.write_bytes(data)
        self.requests[name] = path

    def build_requests(self, shape: tuple[int, ...]) -> None:
        rng = np.random.default_rng(42)
        one = rng.standard_normal(shape, dtype=np.float32)
        batch = rng.standard_normal((256, *shape), dtype=np.float32)
        json_headers = {"content-type": "application/json"}
        self.request("get_health", build_request("GET", "/health"))
        self.request("get_root", build_request("GET", "/"))
        self.request(
            "single",
            build_request(
                "POST", PREDICT, orjson.dumps({"inputs": one}, option=NUMPY), json_headers
            ),
        )
        self.request(
            "batch256",
            build_request(
                "POST", PREDICT, orjson.dumps({"inputs": batch}, option=NUMPY), json_headers
            ),
        )
        self.request(
            "binary256",
            build_request(
                "POST",
                PREDICT,
                batch.tobytes(),
                {
                    "content-type": "application/octet-stream",
                    "accept": "application/octet-stream",
                    "x-shape": ",".join(map(str, batch.shape)),
                },
            ),
        )

    def load(self, port: int, request: str, **spec: Any) -> dict[str, Any]:
        full = {
            "port": port,
            "request_file": str(self.requests[request]),
            "duration": self.duration,
            "warmup": self.warmup,
            **spec,
        }
        return run_spec(full, self.client_cpu)

    # -- phases -------------------------------------------------------------------------
    def inprocess(self, manifest: Path) -> dict[str, Any]:
        saved = os.sched_getaffinity(0)
        if self.server_cpu is not None:
            os.sched_setaffinity(0, {self.server_cpu})
        torch.set_num_threads(1)
        torch._C._set_graph_executor_optimize(False)
        try:
            model = load_model(manifest, MODEL)
            rng = np.random.default_rng(0)
            figures: dict[str, Any] = {}
            for batch in (1, 256):
                x = rng.standard_normal((batch, *model.input_shape), dtype=np.float32)
                for _ in range(20):
                    model.predict(x)
                calls, started = 0, time.perf_counter()
                while (elapsed := time.perf_counter() - started) < 1.0:
                    model.predict(x)
                    calls += 1
                figures[f"batch_{batch}"] = {
                    "samples_per_s": round(calls * batch / elapsed, 1),
                    "us_per_call": round(elapsed / calls * 1e6, 2),
                }
            return figures
        finally:
            os.sched_setaffinity(0, saved)

    def interleaved(
        self, scenarios: list[tuple[str, str, dict[str, Any], dict[str, int]]]
    ) -> dict[str, dict[str, Any]]:
        """Each scenario on each of its servers, ``repeat`` rounds, order rotating; medians."""
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for round_index in range(self.repeat):
            for scenario, request, spec, ports in scenarios:
                servers = list(ports)
                shift = round_index % len(servers)
                for server in servers[shift:] + servers[:shift]:
                    result = self.load(ports[server], request, **spec)
                    result.update(scenario=scenario, server=server, round=round_index)
                    self.raw.append(result)
                    runs.setdefault((scenario, server), []).append(result)
                    print(
                        f"  round {round_index} {scenario:<16} {server:<8} "
                        f"{result['rps']:>9.0f} req/s  p50 {result['p50_ms']:.2f}  "
                        f"p99 {result['p99_ms']:.2f} ms  load {_loadavg()}",
                        file=sys.stderr,
                        flush=True,
                    )
        figures: dict[str, dict[str, Any]] = {}
        for (scenario, server), results in runs.items():
            ordered = sorted(results, key=lambda r: r["rps"])
            median = dict(ordered[len(ordered) // 2])
            median["rps_runs"] = [r["rps"] for r in results]
            bad = [r["statuses"] for r in results if set(r["statuses"]) != {"200"}]
            median["non_200"] = bad
            figures.setdefault(scenario, {})[server] = median
        return figures

    def tail(
        self, port: int, single_c1: dict[str, Any], single_c16: dict[str, Any]
    ) -> dict[str, Any]:
        rate = round(single_c16["rps"] / 2)
        result = self.load(
            port, "single", rate=rate, concurrency=64, duration=max(self.duration, 8)
        )
        self.raw.append({**result, "scenario": "tail_open_loop", "server": "service"})
        return {
            "rate": rate,
            "unloaded_p50_ms": single_c1["p50_ms"],
            **{k: result[k] for k in ("rps", "p50_ms", "p99_ms", "p99_9_ms", "max_ms", "statuses")},
        }

    def mc_flood(self, port: int, rate: float) -> dict[str, Any]:
        """Plain open-loop p99 alone and beside 8 MC clients that honour Retry-After."""
        body = orjson.dumps(
            {"inputs": np.random.default_rng(3).standard_normal((64, 48, 13)), "mc_passes": 32},
            option=NUMPY,
        )
        statuses: list[int] = []

        def client(stop: threading.Event) -> None:
            while not stop.is_set():
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                try:
                    conn.request(
                        "POST", PREDICT, body=body, headers={"content-type": "application/json"}
                    )
                    reply = conn.getresponse()
                    reply.read()
                    statuses.append(reply.status)
                    if reply.status == 429:
                        stop.wait(float(reply.getheader("retry-after", "1")))
                finally:
                    conn.close()

        sides: dict[str, list[float]] = {"alone": [], "flood": []}
        for _ in range(self.repeat):
            alone = self.load(port, "single", rate=rate, concurrency=32)
            sides["alone"].append(alone["p99_ms"])
            stop = threading.Event()
            threads = [threading.Thread(target=client, args=(stop,)) for _ in range(8)]
            for thread in threads:
                thread.start()
            time.sleep(0.5)
            try:
                flood = self.load(port, "single", rate=rate, concurrency=32)
            finally:
                stop.set()
                for thread in threads:
                    thread.join(60)
            sides["flood"].append(flood["p99_ms"])
            self.raw += [
                {**alone, "scenario": "mc_flood_alone", "server": "service"},
                {**flood, "scenario": "mc_flood_beside", "server": "service"},
            ]
        return {
            "rate": rate,
            "p99_alone_ms": statistics.median(sides["alone"]),
            "p99_flood_ms": statistics.median(sides["flood"]),
            "p99_runs": sides,
            "mc_served": statuses.count(200),
            "mc_refused_429": statuses.count(429),
        }

    def run(self) -> dict[str, Any]:
        artifacts = self.work / "artifacts"
        manifest = export_model(MODEL, artifacts)
        export_model("tactical", artifacts)
        self.build_requests(load_model(manifest, MODEL, warmup_iterations=0).input_shape)
        figures: dict[str, Any] = {
            "machine": {
                "cpus": os.cpu_count(),
                "server_cpu": self.server_cpu,
                "client_cpu": self.client_cpu,
                "python": platform.python_version(),
                "torch": torch.__version__,
                "duration_s": self.duration,
                "repeat": self.repeat,
                "loadavg_1m_before": _loadavg(),
            }
        }
        print("in-process forward pass ...", file=sys.stderr, flush=True)
        figures["inprocess"] = self.inprocess(manifest)
        cpu = ["--cpu", str(self.server_cpu)] if self.server_cpu is not None else []
        ports = {name: free_port() for name in ("sink", "service", "naive", "plain", "trivial")}
        env = {
            "GRANDMODEL_MODEL_DIR": str(artifacts),
            "GRANDMODEL_PORT": str(ports["service"]),
            "GRANDMODEL_LOG_LEVEL": "WARNING",
        }
        if self.server_cpu is not None:
            env["GRANDMODEL_CPU_AFFINITY"] = str(self.server_cpu)
        py = sys.executable
        baseline = str(HERE / "baseline.py")
        with contextlib.ExitStack() as stack:
            procs: dict[str, subprocess.Popen[bytes]] = {
                "sink": stack.enter_context(
                    _server(
                        [py, str(HERE / "loadgen.py"), "--sink", str(ports["sink"]), *cpu],
                        {},
                        self.log,
                    )
                ),
                "service": stack.enter_context(
                    _server([py, "-m", "grandmodel_service.server"], env, self.log)
                ),
            }
            for kind in ("naive", "plain", "trivial"):
                extra = [] if kind == "trivial" else ["--manifest", str(manifest)]
                procs[kind] = stack.enter_context(
                    _server(
                        [py, baseline, kind, "--port", str(ports[kind]), *extra, *cpu], {}, self.log
                    )
                )
            _wait(ports["service"], "/ready", procs["service"])
            _wait(ports["trivial"], "/", procs["trivial"])
            for kind in ("naive", "plain"):
                _wait(ports[kind], "/openapi.json", procs[kind])
            print("servers up; measuring interleaved ...", file=sys.stderr, flush=True)
            figures["ceiling"] = {
                key: self.load(ports["sink"], request, concurrency=conc)
                for key, request, conc in (("single", "single", 16), ("batch256", "batch256", 4))
            }
            models = {k: ports[k] for k in ("service", "naive", "plain")}
            figures["interleaved"] = self.interleaved(
                [
                    ("single_c1", "single", {"concurrency": 1}, models),
                    ("single_c16", "single", {"concurrency": 16}, models),
                    (
                        "get_c16",
                        "get_root",
                        {"concurrency": 16},
                        {"trivial": ports["trivial"]},
                    ),
                    (
                        "json_batch256_c4",
                        "batch256",
                        {"concurrency": 4, "samples_per_request": 256},
                        models,
                    ),
                    (
                        "binary_batch256_c4",
                        "binary256",
                        {"concurrency": 4, "samples_per_request": 256},
                        {"service": ports["service"]},
                    ),
                ]
            )
            inter = figures["interleaved"]
            print("tail at half capacity ...", file=sys.stderr, flush=True)
            figures["tail"] = self.tail(
                ports["service"], inter["single_c1"]["service"], inter["single_c16"]["service"]
            )
            print("MC flood ...", file=sys.stderr, flush=True)
            figures["mc_flood"] = self.mc_flood(
                ports["service"], round(inter["single_c16"]["service"]["rps"] / 4)
            )
        figures["machine"]["loadavg_1m_after"] = _loadavg()
        figures["ratios"] = _ratios(figures)
        figures["raw"] = self.raw
        return figures


def _ratios(f: dict[str, Any]) -> dict[str, Any]:
    inter = f["interleaved"]

    def rps(scenario: str, server: str) -> float:
        return float(inter[scenario][server]["rps"])

    values: dict[str, Callable[[], float]] = {
        "json_batch256_vs_plain": lambda: (
            rps("json_batch256_c4", "service") / rps("json_batch256_c4", "plain")
        ),
        "json_batch256_vs_naive": lambda: (
            rps("json_batch256_c4", "service") / rps("json_batch256_c4", "naive")
        ),
        "single_c16_vs_trivial_get": lambda: (
            rps("single_c16", "service") / rps("get_c16", "trivial")
        ),
        "single_c16_vs_naive": lambda: rps("single_c16", "service") / rps("single_c16", "naive"),
        "single_c16_vs_plain": lambda: rps("single_c16", "service") / rps("single_c16", "plain"),
        "tail_p99_over_unloaded_p50": lambda: f["tail"]["p99_ms"] / f["tail"]["unloaded_p50_ms"],
        "mc_flood_p99_over_alone": lambda: (
            f["mc_flood"]["p99_flood_ms"] / f["mc_flood"]["p99_alone_ms"]
        ),
    }
    out: dict[str, Any] = {}
    for name, compute in values.items():
        value = round(compute(), 3)
        entry: dict[str, Any] = {"value": value}
        if name in TARGETS:
            goal, kind = TARGETS[name]
            entry.update(goal=goal, met=bool(value >= goal if kind == "min" else value <= goal))
        out[name] = entry
    return out


def _table(f: dict[str, Any]) -> str:
    lines = [
        "| scenario | server | req/s (median) | samples/s | p50 ms | p99 ms | runs req/s |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for name, figure in f["inprocess"].items():
        lines.append(
            f"| in-process {name} | torch | | {figure['samples_per_s']:,.0f} | | | "
            f"{figure['us_per_call']} us/call |"
        )
    for name, r in f["ceiling"].items():
        lines.append(
            f"| {name} | sink (generator ceiling) | {r['rps']:,.0f} | {r['samples_per_s']:,.0f} | "
            f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | |"
        )
    for scenario, servers in f["interleaved"].items():
        for server, r in servers.items():
            note = f" non-200 {r['non_200']}" if r["non_200"] else ""
            lines.append(
                f"| {scenario} | {server} | {r['rps']:,.0f} | {r['samples_per_s']:,.0f} | "
                f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['rps_runs']}{note} |"
            )
    t = f["tail"]
    lines += [
        "",
        f"Tail, open loop at {t['rate']} req/s (half the single c16 capacity): "
        f"p50 {t['p50_ms']} ms, p99 {t['p99_ms']} ms, p99.9 {t['p99_9_ms']} ms, "
        f"max {t['max_ms']} ms; unloaded p50 {t['unloaded_p50_ms']} ms; "
        f"served {t['rps']} req/s, statuses {t['statuses']}.",
    ]
    m = f["mc_flood"]
    lines += [
        f"MC flood, plain open loop at {m['rate']} req/s: p99 alone {m['p99_alone_ms']} ms, beside "
        f"8 MC clients {m['p99_flood_ms']} ms (runs {m['p99_runs']}); MC served "
        f"{m['mc_served']}, refused 429 {m['mc_refused_429']}.",
        "",
        "| ratio | value | goal | verdict |",
        "|---|---:|---:|---|",
    ]
    for key, r in f["ratios"].items():
        goal = r.get("goal", "")
        verdict = "" if "met" not in r else ("met" if r["met"] else "MISSED")
        lines.append(f"| {key} | {r['value']} | {goal} | {verdict} |")
    mach = f["machine"]
    lines.append(
        f"\nLoad average (1 min): {mach['loadavg_1m_before']} before, {mach['loadavg_1m_after']} "
        f"after; {mach['bench_seconds']} s."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.py", description=__doc__)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per measurement")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds first")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds")
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="grandmodel-bench-") as tmp:
        bench = Bench(Path(tmp), args.duration, args.warmup, args.repeat)
        if bench.server_cpu is None:
            print("fewer than 2 CPUs: server and generator NOT pinned apart", file=sys.stderr)
        try:
            figures = bench.run()
        except Exception:
            log = bench.log.read_text(errors="replace")[-4000:] if bench.log.exists() else ""
            print(f"benchmark failed; server log tail:\n{log}", file=sys.stderr)
            raise
    figures["machine"]["bench_seconds"] = round(time.monotonic() - started, 1)
    print(_table(figures))
    print(orjson.dumps(figures).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
