"""``grandmodel-service``: run the inference service under uvicorn."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path

import uvicorn
from pydantic import ValidationError

from grandmodel_service.app import create_app
from grandmodel_service.logs import configure_logging
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
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop=loop,
        http="httptools",
        lifespan="on",
        log_config=None,
        access_log=settings.access_log,
        timeout_graceful_shutdown=settings.graceful_timeout_s,
        timeout_keep_alive=settings.keepalive_timeout_s,
        backlog=settings.backlog,
        server_header=False,
    )
    log.info(
        "starting",
        extra={
            "host": settings.host,
            "port": settings.port,
            "color": settings.color,
            "env": settings.env.value,
        },
    )
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
