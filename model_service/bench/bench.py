"""``python -m grandmodel_service.bench``: the service against a naive baseline, one run.

Everything is measured here and now, side by side: the server under test is pinned to one
core and the load generator (``loadgen``) to another, and the generator's own ceiling is
measured against a canned-response sink on the server's core. Prints a table, then as its
last line one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch

from grandmodel_service.engine import load_model
from grandmodel_service.export import export_model
from grandmodel_service.loadgen import build_request

MODEL = "strategic"
PREDICT = f"/v1/models/{MODEL}/predict"
TARGETS = {
    "json_batch_samples_per_s": 30_000,
    "binary_batch_samples_per_s": 150_000,
    "single_c16_vs_naive": 2.0,
    "single_c16_vs_trivial_ceiling": 0.70,
    "open_loop_1000_p99_ms": 5.0,
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_http(port: int, path: str, proc: subprocess.Popen[bytes], timeout: float = 90) -> None:
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
    raise RuntimeError(f"server on port {port} did not answer {path} within {timeout}s")


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


@contextlib.contextmanager
def _process(
    args: list[str], env: dict[str, str] | None = None, log: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    sink = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(args, env={**os.environ, **(env or {})}, stdout=sink, stderr=sink)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if log:
            sink.close()  # type: ignore[union-attr]


class Bench:
    def __init__(self, workdir: Path, duration: float, warmup: float) -> None:
        self.workdir = workdir
        self.duration = duration
        self.warmup = warmup
        cpus = sorted(os.sched_getaffinity(0))
        self.server_cpu: int | None = cpus[0] if len(cpus) >= 2 else None
        self.client_cpu: int | None = cpus[1] if len(cpus) >= 2 else None
        self.rows: list[tuple[str, str, dict[str, Any]]] = []
        self._requests: dict[str, Path] = {}
        self.log = workdir / "servers.log"

    # -- requests -----------------------------------------------------------------------
    def request(self, name: str, data: bytes) -> Path:
        path = self.workdir / f"request-{name}.http"
        path.write_bytes(data)
        self._requests[name] = path
        return path

    def build_requests(self, shape: tuple[int, ...]) -> None:
        rng = np.random.default_rng(42)
        one = rng.standard_normal(shape, dtype=np.float32)
        batch = rng.standard_normal((256, *shape), dtype=np.float32)
        big = rng.standard_normal((1024, *shape), dtype=np.float32)
        dumps = orjson.OPT_SERIALIZE_NUMPY
        json_headers = {"content-type": "application/json"}
        self.request("get_health", build_request("GET", "/health"))
        self.request("get_root", build_request("GET", "/"))
        self.request(
            "single_json",
            build_request(
                "POST", PREDICT, orjson.dumps({"inputs": one}, option=dumps), json_headers
            ),
        )
        self.request(
            "batch_json",
            build_request(
                "POST", PREDICT, orjson.dumps({"inputs": batch}, option=dumps), json_headers
            ),
        )
        for name, array in (("batch_binary", batch), ("batch_binary_1024", big)):
            self.request(
                name,
                build_request(
                    "POST",
                    PREDICT,
                    array.tobytes(),
                    {
                        "content-type": "application/octet-stream",
                        "accept": "application/octet-stream",
                        "x-shape": ",".join(map(str, array.shape)),
                    },
                ),
            )

    # -- load ---------------------------------------------------------------------------
    def load(
        self,
        port: int,
        request: str,
        *,
        concurrency: int = 1,
        rate: float = 0,
        samples: int = 1,
        duration: float | None = None,
    ) -> dict[str, Any]:
        spec = {
            "port": port,
            "request_file": str(self._requests[request]),
            "concurrency": concurrency if not rate else max(concurrency, 64),
            "rate": rate,
            "duration": duration or self.duration,
            "warmup": self.warmup,
            "samples_per_request": samples,
        }
        spec_path = self.workdir / "spec.json"
        spec_path.write_bytes(orjson.dumps(spec))
        args = [sys.executable, "-m", "grandmodel_service.loadgen", str(spec_path)]
        if self.client_cpu is not None:
            args += ["--cpu", str(self.client_cpu)]
        done = subprocess.run(args, capture_output=True, timeout=120, check=False)
        lines = done.stdout.decode().strip().splitlines()
        if done.returncode or not lines:
            raise RuntimeError(f"load generator failed: {done.stderr.decode()[-2000:]}")
        result: dict[str, Any] = orjson.loads(lines[-1])
        return result

    def record(self, scenario: str, server: str, result: dict[str, Any]) -> dict[str, Any]:
        self.rows.append((scenario, server, result))
        bad = {k: v for k, v in result.get("statuses", {}).items() if k != "200"}
        note = f" non-200={bad}" if bad else ""
        note += f" errors={result['errors']}" if result.get("errors") else ""
        print(
            f"  measured {scenario:<28} {server:<10} {result.get('rps', 0):>10.0f} req/s{note}",
            file=sys.stderr,
            flush=True,
        )
        return result

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
            for batch in (1, 64, 256):
                x = rng.standard_normal((batch, *model.input_shape), dtype=np.float32)
                for _ in range(20):
                    model.predict(x)
                calls = 0
                started = time.perf_counter()
                while (elapsed := time.perf_counter() - started) < min(self.duration, 1.5):
                    model.predict(x)
                    calls += 1
                figures[f"batch_{batch}"] = {
                    "samples_per_s": round(calls * batch / elapsed, 1),
                    "us_per_call": round(elapsed / calls * 1e6, 2),
                }
            return figures
        finally:
            os.sched_setaffinity(0, saved)

    def server_args(self, module: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", module, *extra]

    def run(self) -> dict[str, Any]:
        artifacts = self.workdir / "artifacts"
        manifest = export_model(MODEL, artifacts)
        export_model("tactical", artifacts)
        spec_shape = load_model(manifest, MODEL, warmup_iterations=0).input_shape
        self.build_requests(spec_shape)
        figures: dict[str, Any] = {
            "machine": {
                "cpus": os.cpu_count(),
                "server_cpu": self.server_cpu,
                "client_cpu": self.client_cpu,
                "python": platform.python_version(),
                "torch": torch.__version__,
                "duration_s": self.duration,
                # Other work on the machine skews every figure; say how busy it was.
                "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
            }
        }
        print("in-process model throughput ...", file=sys.stderr, flush=True)
        figures["inprocess"] = self.inprocess(manifest)
        cpu_args = ["--cpu", str(self.server_cpu)] if self.server_cpu is not None else []

        # Generator ceiling: the same requests against a sink that answers without work.
        print("load generator ceiling (sink server) ...", file=sys.stderr, flush=True)
        port = _free_port()
        ceiling: dict[str, Any] = {}
        with _process(
            self.server_args("grandmodel_service.loadgen", "--sink", str(port), *cpu_args),
            log=self.log,
        ) as proc:
            _wait_port(port, proc)
            for key, request, conc, samples in (
                ("get", "get_health", 16, 1),
                ("single_json", "single_json", 16, 1),
                ("batch_json", "batch_json", 4, 256),
                ("batch_binary", "batch_binary", 4, 256),
            ):
                ceiling[key] = self.record(
                    f"ceiling {key}",
                    "sink",
                    self.load(port, request, concurrency=conc, samples=samples),
                )
        figures["generator_ceiling"] = ceiling

        print("service under test ...", file=sys.stderr, flush=True)
        port = _free_port()
        env = {
            "GRANDMODEL_MODEL_DIR": str(artifacts),
            "GRANDMODEL_PORT": str(port),
            "GRANDMODEL_ENV": "development",
            "GRANDMODEL_LOG_LEVEL": "WARNING",
        }
        if self.server_cpu is not None:
            env["GRANDMODEL_CPU_AFFINITY"] = str(self.server_cpu)
        served: dict[str, Any] = {}
        with _process(self.server_args("grandmodel_service.server"), env, self.log) as proc:
            _wait_http(port, "/ready", proc)
            served["json_batch256_c4"] = self.record(
                "JSON batch 256 c4",
                "service",
                self.load(port, "batch_json", concurrency=4, samples=256),
            )
            served["binary_batch256_c4"] = self.record(
                "binary batch 256 c4",
                "service",
                self.load(port, "batch_binary", concurrency=4, samples=256),
            )
            served["binary_batch1024_c4"] = self.record(
                "binary batch 1024 c4",
                "service",
                self.load(port, "batch_binary_1024", concurrency=4, samples=1024),
            )
            for conc in (1, 4):
                served[f"single_c{conc}"] = self.record(
                    f"single JSON c{conc}",
                    "service",
                    self.load(port, "single_json", concurrency=conc),
                )
            # The ceiling and the figure compared with it are measured back to back, twice,
            # interleaved, best of each: other load on the machine only ever lowers a figure.
            rounds: dict[str, list[dict[str, Any]]] = {"health_c16": [], "single_c16": []}
            for _ in range(2):
                rounds["health_c16"].append(self.load(port, "get_health", concurrency=16))
                rounds["single_c16"].append(self.load(port, "single_json", concurrency=16))
            for key, label in (
                ("health_c16", "trivial GET /health c16"),
                ("single_c16", "single JSON c16"),
            ):
                served[key] = self.record(
                    label, "service", max(rounds[key], key=lambda r: r["rps"])
                )
            served["open_loop_1000"] = self.record(
                "single JSON open 1000/s",
                "service",
                self.load(port, "single_json", rate=1000, duration=max(self.duration, 5)),
            )
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                served["metrics_excerpt"] = _batch_metrics(reply.read().decode())
        figures["served"] = served

        print("bare FastAPI trivial route ...", file=sys.stderr, flush=True)
        port = _free_port()
        with _process(
            self.server_args(
                "grandmodel_service.baseline", "--trivial", "--port", str(port), *cpu_args
            ),
            log=self.log,
        ) as proc:
            _wait_http(port, "/", proc)
            figures["framework_ceiling"] = {
                "fastapi_trivial_c16": self.record(
                    "trivial GET / c16", "bare-app", self.load(port, "get_root", concurrency=16)
                ),
                "service_health_c16": served["health_c16"],
            }

        print("naive baseline ...", file=sys.stderr, flush=True)
        port = _free_port()
        naive: dict[str, Any] = {}
        with _process(
            self.server_args(
                "grandmodel_service.baseline",
                "--manifest",
                str(manifest),
                "--port",
                str(port),
                *cpu_args,
            ),
            log=self.log,
        ) as proc:
            _wait_port(port, proc)
            naive["json_batch256_c4"] = self.record(
                "JSON batch 256 c4",
                "naive",
                self.load(port, "batch_json", concurrency=4, samples=256),
            )
            for conc in (1, 4, 16):
                naive[f"single_c{conc}"] = self.record(
                    f"single JSON c{conc}",
                    "naive",
                    self.load(port, "single_json", concurrency=conc),
                )
            naive["open_loop_1000"] = self.record(
                "single JSON open 1000/s",
                "naive",
                self.load(port, "single_json", rate=1000, duration=max(self.duration, 5)),
            )
        figures["naive"] = naive
        figures["targets"] = _targets(figures)
        return figures


def _batch_metrics(text: str) -> dict[str, float]:
    wanted = {
        f'grandmodel_inference_batch_size_sum{{model="{MODEL}"}}': "batch_samples",
        f'grandmodel_inference_batch_size_count{{model="{MODEL}"}}': "batches",
    }
    found: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in wanted:
            found[wanted[name]] = float(value)
    if found.get("batches"):
        found["mean_batch"] = round(found["batch_samples"] / found["batches"], 2)
    return found


def _targets(f: dict[str, Any]) -> dict[str, Any]:
    served, naive = f["served"], f["naive"]
    trivial = max(
        f["framework_ceiling"]["fastapi_trivial_c16"]["rps"],
        f["framework_ceiling"]["service_health_c16"]["rps"],
    )
    single16 = served["single_c16"]["rps"]
    values = {
        "json_batch_samples_per_s": served["json_batch256_c4"]["samples_per_s"],
        "binary_batch_samples_per_s": max(
            served["binary_batch256_c4"]["samples_per_s"],
            served["binary_batch1024_c4"]["samples_per_s"],
        ),
        "single_c16_vs_naive": round(single16 / max(naive["single_c16"]["rps"], 1e-9), 2),
        "single_c16_vs_trivial_ceiling": round(single16 / max(trivial, 1e-9), 3),
        "open_loop_1000_p99_ms": served["open_loop_1000"]["p99_ms"],
    }
    result = {}
    for key, goal in TARGETS.items():
        value = values[key]
        met = value <= goal if key.endswith("_ms") else value >= goal
        result[key] = {"value": value, "target": goal, "met": bool(met)}
    return result


def _table(f: dict[str, Any]) -> str:
    """A markdown table (readable in a terminal, pastable into the README)."""
    lines = [
        "| scenario | server | req/s | samples/s | p50 ms | p99 ms | note |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for name, figure in f["inprocess"].items():
        lines.append(
            f"| in-process {name} | torch | | {figure['samples_per_s']:,.0f} | | | "
            f"{figure['us_per_call']} us/call |"
        )
    sections = (
        ("generator_ceiling", "sink (generator ceiling)"),
        ("served", "service"),
        ("framework_ceiling", "bare FastAPI"),
        ("naive", "naive baseline"),
    )
    for section, label in sections:
        for name, r in f[section].items():
            if not isinstance(r, dict) or "rps" not in r:
                continue
            if section == "framework_ceiling" and name == "service_health_c16":
                continue
            bad = {k: v for k, v in r["statuses"].items() if k != "200"}
            note = (f"non-200 {bad} " if bad else "") + (
                f"errors {r['errors']}" if r["errors"] else ""
            )
            lines.append(
                f"| {name} | {label} | {r['rps']:,.0f} | {r['samples_per_s']:,.0f} | "
                f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {note} |"
            )
    lines += ["", "| target | measured | goal | verdict |", "|---|---:|---:|---|"]
    for key, t in f["targets"].items():
        lines.append(
            f"| {key} | {t['value']} | {t['target']} | {'met' if t['met'] else 'MISSED'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grandmodel_service.bench", description=__doc__)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds first")
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="grandmodel-bench-") as tmp:
        bench = Bench(Path(tmp), args.duration, args.warmup)
        if bench.server_cpu is None:
            print(
                "fewer than 2 CPUs available: server and generator are NOT pinned apart",
                file=sys.stderr,
            )
        try:
            figures = bench.run()
        except Exception:
            log = bench.log.read_text(errors="replace")[-4000:] if bench.log.exists() else ""
            print(f"benchmark failed; server log tail:\n{log}", file=sys.stderr)
            raise
    figures["machine"]["bench_seconds"] = round(time.monotonic() - started, 1)
    figures["machine"]["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    print(_table(figures))
    print(orjson.dumps(figures).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
