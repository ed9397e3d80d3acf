"""``grandmodel-service``: run the inference service under uvicorn."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import sys
from pathlib import Path

import uvicorn
from pydantic import ValidationError

from grandmodel_service.app import create_app
from grandmodel_service.connections import guarded_protocol
from grandmodel_service.logs import configure_logging
from grandmodel_service.metrics import CONNECTION_CLOSE_REASONS
from grandmodel_service.settings import Settings

log = logging.getLogger("grandmodel_service")


def load_settings(env_file: Path | None) -> Settings:
    env_file = env_file or (Path(p) if (p := os.environ.get("GRANDMODEL_ENV_FILE")) else None)
    if env_file is not None:
        return Settings(_env_file=env_file)
    return Settings()


def pin_process(cpus: set[int]) -> None:
    """Pin every thread of this process (torch starts some at import) to ``cpus``."""
    try:
        thread_ids = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        thread_ids = [0]
    for tid in thread_ids:
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(tid, cpus)


def bind_sockets(hosts: list[str], port: int, backlog: int) -> list[socket.socket]:
    """One listening socket per address, all on ``port`` (0: the first one's free port)."""
    sockets: list[socket.socket] = []
    try:
        for host in hosts:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]
            sock.listen(backlog)
            sock.set_inheritable(True)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="grandmodel-service", description=__doc__)
    parser.add_argument("--env-file", type=Path, help="env file with GRANDMODEL_* settings")
    args = parser.parse_args(argv)
    configure_logging(os.environ.get("GRANDMODEL_LOG_LEVEL", "INFO").upper())
    try:
        settings = load_settings(args.env_file)
    except ValidationError as exc:
        errors = [f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()]
        log.critical("refusing to start: invalid settings", extra={"errors": errors})
        return 2
    configure_logging(settings.log_level)
    cpus = settings.cpu_set()
    if cpus is not None:
        pin_process(cpus)
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        loop = "asyncio"
    app = create_app(settings)
    closed = app.state.runtime.metrics.connections_closed
    children = {reason: closed.labels(reason) for reason in CONNECTION_CLOSE_REASONS}
    config = uvicorn.Config(
        app,
        host=settings.hosts()[0],
        port=settings.port,
        loop=loop,
        http=guarded_protocol(
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            on_close=lambda reason: children[reason].inc(),
        ),
        limit_concurrency=settings.limit_concurrency,
        lifespan="on",
        log_config=None,
        access_log=settings.access_log,
        timeout_graceful_shutdown=settings.graceful_timeout_s,
        timeout_keep_alive=settings.keepalive_timeout_s,
        backlog=settings.backlog,
        server_header=False,
    )
    try:
        sockets = bind_sockets(settings.hosts(), settings.port, settings.backlog)
    except OSError as exc:
        log.critical(
            "refusing to start: cannot listen",
            extra={"addresses": settings.hosts(), "port": settings.port, "error": str(exc)},
        )
        return 2
    log.info(
        "starting",
        extra={
            "addresses": settings.hosts(),
            "port": sockets[0].getsockname()[1],
            "color": settings.color,
            "env": settings.env.value,
            "limit_concurrency": settings.limit_concurrency,
            "header_timeout_s": settings.header_timeout_s,
            "body_timeout_s": settings.body_timeout_s,
            "keepalive_timeout_s": settings.keepalive_timeout_s,
        },
    )
    uvicorn.Server(config).run(sockets=sockets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
