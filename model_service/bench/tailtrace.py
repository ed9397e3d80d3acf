"""Where does the tail come from? Serve under open-loop load and time every stage.

``python model_service/bench/tailtrace.py [--rate R] [--seconds S]`` exports fresh artifacts,
starts the real service (``grandmodel_service.server`` settings: uvloop, httptools, the same
app) in a child process pinned to one core with light instrumentation wrapped around it, drives
it open loop from the other core with ``loadgen``, then prints, for the slowest 1% of requests
seen by the server and for all requests, how long each stage took:

  pre      ASGI start -> batcher submit (headers, body, decode, domain check)
  wait     submit -> forward pass starts (batch gathering, queue, hand-off to the thread)
  forward  the forward pass
  hop      forward done -> the request's coroutine resumes (thread -> loop hand-off)
  post     resume -> ASGI end (encode, send)

plus every garbage collection (generation, pause), and the client-side latency (measured from
each request's scheduled send time) so that time spent outside the ASGI handler shows up as
the difference. Measurement only: nothing here changes what the service does.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _serve(model_dir: str, port: int, cpu: int | None) -> None:  # runs in the child
    import asyncio

    import uvicorn

    from grandmodel_service import app as app_module
    from grandmodel_service import batching, engine, server
    from grandmodel_service.settings import Settings

    if cpu is not None:
        server.pin_process({cpu})
    clock = time.perf_counter
    records: list[tuple[float, ...]] = []
    passes: list[tuple[float, float, int, int]] = []
    gcs: list[tuple[float, float, int]] = []
    gc_started: list[float] = [0.0]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            gc_started[0] = clock()
        else:
            gcs.append((gc_started[0], clock(), int(info["generation"])))

    gc.callbacks.append(on_gc)
    original_predict = engine.LoadedModel.predict

    def traced_predict(self: engine.LoadedModel, inputs: np.ndarray) -> engine.BatchOutput:
        started = clock()
        out = original_predict(self, inputs)
        passes.append((started, clock(), int(inputs.shape[0]), threading.get_ident()))
        return out

    engine.LoadedModel.predict = traced_predict  # type: ignore[method-assign]
    original_submit = batching.MicroBatcher.submit
    current: dict[int, list[float]] = {}

    async def traced_submit(self: batching.MicroBatcher, inputs: np.ndarray) -> Any:
        task = id(asyncio.current_task())
        mark = current.get(task)
        if mark is not None:
            mark.append(clock())
        out = await original_submit(self, inputs)
        if mark is not None:
            mark.append(clock())
        return out

    batching.MicroBatcher.submit = traced_submit  # type: ignore[method-assign]
    settings = Settings(model_dir=Path(model_dir), port=port, models=("strategic",))
    app = app_module.create_app(settings)

    async def traced_app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] == "/trace":
            if scope["type"] == "http" and scope["path"] == "/trace":
                body = json.dumps({"records": records, "passes": passes, "gcs": gcs}).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [(b"content-length", str(len(body)).encode())],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
            await app(scope, receive, send)
            return
        task = id(asyncio.current_task())
        mark = current[task] = [clock()]
        try:
            await app(scope, receive, send)
        finally:
            del current[task]
            mark.append(clock())
            if len(mark) == 4:  # start, submit, resumed, end
                records.append(tuple(mark))

    config = uvicorn.Config(
        traced_app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_level="warning",
        access_log=False,
        server_header=False,
    )
    uvicorn.Server(config).run()


def _schedstat(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) summed over pid's threads."""
    on_cpu = waiting = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "schedstat").read_text().split()
        except OSError:
            continue
        on_cpu += int(fields[0])
        waiting += int(fields[1])
    return on_cpu / 1e9, waiting / 1e9


def _quantiles(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {}
    return {
        q: round(float(np.percentile(values, p)) * 1000, 3)
        for q, p in (("p50", 50), ("p90", 90), ("p99", 99), ("p99.9", 99.9), ("max", 100))
    }


def analyse(trace: dict[str, Any]) -> dict[str, Any]:
    records = np.asarray(trace["records"], dtype=np.float64)
    passes = np.asarray(trace["passes"], dtype=np.float64)
    starts, ends = passes[:, 0], passes[:, 1]
    total = records[:, 3] - records[:, 0]
    pre = records[:, 1] - records[:, 0]
    post = records[:, 3] - records[:, 2]
    # The forward pass that served a request: the first one starting after its submit.
    index = np.searchsorted(starts, records[:, 1])
    index = np.clip(index, 0, len(starts) - 1)
    wait = starts[index] - records[:, 1]
    forward = ends[index] - starts[index]
    hop = records[:, 2] - ends[index]
    stages = {"pre": pre, "wait": wait, "forward": forward, "hop": hop, "post": post}
    slow = total >= np.percentile(total, 99)
    gcs = np.asarray(trace["gcs"], dtype=np.float64).reshape(-1, 3)
    gc_pause = gcs[:, 1] - gcs[:, 0] if gcs.size else np.zeros(0)
    # Did a GC pause overlap a slow request?
    overlaps = 0
    for start, end in records[slow][:, [0, 3]]:
        if gcs.size and np.any((gcs[:, 0] < end) & (gcs[:, 1] > start)):
            overlaps += 1
    return {
        "requests": int(records.shape[0]),
        "forward_passes": int(passes.shape[0]),
        "mean_batch": round(float(passes[:, 2].mean()), 2),
        "server_total_ms": _quantiles(total),
        "stages_all_ms": {k: _quantiles(v) for k, v in stages.items()},
        "slowest_1pct_mean_ms": {
            "total": round(float(total[slow].mean()) * 1000, 3),
            **{k: round(float(v[slow].mean()) * 1000, 3) for k, v in stages.items()},
        },
        "gc": {
            "collections": int(gcs.shape[0]),
            "by_generation": {int(g): int((gcs[:, 2] == g).sum()) for g in np.unique(gcs[:, 2])}
            if gcs.size
            else {},
            "pause_ms": _quantiles(gc_pause),
            "slow_requests_overlapping_a_gc": overlaps,
            "slow_requests": int(slow.sum()),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=0, help="req/s (0: half the capacity)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--serve", nargs=3, metavar=("DIR", "PORT", "CPU"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        cpu = int(args.serve[2])
        _serve(args.serve[0], int(args.serve[1]), None if cpu < 0 else cpu)
        return 0
    import orjson
    from loadgen import build_request, free_port, run_spec

    from grandmodel_service.export import export_model

    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, client_cpu = (cpus[0], cpus[1]) if len(cpus) >= 2 else (-1, None)
    with tempfile.TemporaryDirectory(prefix="grandmodel-tail-") as tmp:
        work = Path(tmp)
        export_model("strategic", work)
        port = free_port()
        body = orjson.dumps(
            {"inputs": np.random.default_rng(1).standard_normal((48, 13), dtype=np.float32)},
            option=orjson.OPT_SERIALIZE_NUMPY,
        )
        request = work / "single.http"
        request.write_bytes(
            build_request(
                "POST", "/v1/models/strategic/predict", body, {"content-type": "application/json"}
            )
        )
        proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(work), str(port), str(server_cpu)],
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2):
                        break
                except OSError:
                    time.sleep(0.2)
            base = {"port": port, "request_file": str(request), "warmup": 0.5}
            load_before = os.getloadavg()[0]
            unloaded = run_spec({**base, "concurrency": 1, "duration": 3}, client_cpu)
            capacity = run_spec({**base, "concurrency": 16, "duration": 3}, client_cpu)
            rate = args.rate or round(capacity["rps"] / 2)
            # Reset the server-side trace: only the open-loop phase is analysed.
            urllib.request.urlopen(f"http://127.0.0.1:{port}/trace", timeout=30).read()
            skip = len(
                json.loads(
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/trace", timeout=30).read()
                )["records"]
            )
            sched_before, wall_before = _schedstat(proc.pid), time.monotonic()
            loaded = run_spec(
                {**base, "rate": rate, "concurrency": 64, "duration": args.seconds}, client_cpu
            )
            sched_after, wall = _schedstat(proc.pid), time.monotonic() - wall_before
            trace = json.loads(
                urllib.request.urlopen(f"http://127.0.0.1:{port}/trace", timeout=30).read()
            )
            trace["records"] = trace["records"][skip:]
            first = trace["records"][0][0]
            trace["passes"] = [p for p in trace["passes"] if p[0] >= first - 0.01]
            trace["gcs"] = [g for g in trace["gcs"] if g[0] >= first]
        finally:
            proc.terminate()
            proc.wait(20)
    report = {
        "loadavg_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "unloaded_c1": {k: unloaded[k] for k in ("rps", "p50_ms", "p99_ms")},
        "capacity_c16_rps": capacity["rps"],
        "open_loop": {
            "rate": rate,
            **{k: loaded[k] for k in ("rps", "p50_ms", "p99_ms", "p99_9_ms", "max_ms")},
        },
        "p99_over_unloaded_p50": round(loaded["p99_ms"] / unloaded["p50_ms"], 1),
        # Of each wall-clock second of the open-loop phase: how long the server's threads ran,
        # and how long they were runnable but waited for the CPU (other processes had it).
        "server_cpu_per_s": round((sched_after[0] - sched_before[0]) / wall, 3),
        "server_runqueue_wait_per_s": round((sched_after[1] - sched_before[1]) / wall, 3),
        "server": analyse(trace),
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
