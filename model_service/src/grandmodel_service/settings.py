"""Service settings, read from ``GRANDMODEL_*`` environment variables or an env file."""

from __future__ import annotations

import ipaddress
from enum import StrEnum
from pathlib import Path
from typing import Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from grandmodel_service import __version__

#: Tokens that ship in examples and tutorials; never acceptable outside development.
KNOWN_DEFAULT_TOKENS = frozenset(
    {
        "",
        "admin",
        "changeme",
        "change-me",
        "default",
        "password",
        "secret",
        "token",
        "test",
        "grandmodel",
        "please-change-me",
        "dev-token",
    }
)
MIN_TOKEN_LENGTH = 16


class Environment(StrEnum):
    DEVELOPMENT = "development"
    STAGING = "staging"
    PRODUCTION = "production"


class Settings(BaseSettings):
    """Every knob of the service. Field ``foo`` is read from ``GRANDMODEL_FOO``."""

    model_config = SettingsConfigDict(
        env_prefix="GRANDMODEL_", env_file_encoding="utf-8", extra="ignore", frozen=True
    )

    env: Environment = Field(Environment.DEVELOPMENT, description="development|staging|production")
    color: str = Field("blue", pattern=r"^[a-z][a-z0-9-]{0,31}$", description="Deployment colour")
    host: str = Field(
        "127.0.0.1",
        description="Listen address(es), comma-separated IPs: the address the load balancer "
        "reaches (loopback when it runs on the same host), plus 127.0.0.1 for local probes",
    )
    port: int = Field(8000, ge=0, le=65535, description="Listen port (0 picks a free one)")
    service_version: str = Field(__version__, min_length=1, description="Reported version")
    admin_token: SecretStr | None = Field(None, description="Bearer token for /admin/*")

    model_dir: Path = Field(Path("artifacts"), description="Folder with <name>.manifest.json")
    models: tuple[str, ...] = Field(("strategic", "tactical"), description="Models to serve")
    strategic_manifest: Path | None = Field(None, description="Overrides model_dir for strategic")
    tactical_manifest: Path | None = Field(None, description="Overrides model_dir for tactical")
    golden_atol: float | None = Field(None, gt=0, description="Overrides the manifest tolerance")
    warmup_iterations: int = Field(3, ge=0, le=1000)

    batch_max_size: int = Field(256, ge=1, le=65536, description="Samples per forward pass")
    batch_max_wait_ms: float = Field(
        2.0, ge=0, le=1000, description="Longest wait for concurrent requests to join a batch"
    )
    batch_arrival_gap_ms: float = Field(
        0.3, ge=0, le=100, description="Stop waiting when no request joined for this long"
    )
    max_request_samples: int = Field(1024, ge=1, description="Largest batch in one request")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Largest request body")
    shadow_ring_size: int = Field(
        10_000,
        ge=0,
        le=1_000_000,
        description="Answers to X-Request-ID requests kept for shadow comparison (0: none)",
    )
    max_mc_passes: int = Field(32, ge=1, le=1024, description="Largest MC-dropout pass count")
    mc_max_samples: int = Field(
        64, ge=1, description="Largest batch in one Monte-Carlo request (samples x passes run)"
    )
    mc_concurrency: int = Field(1, ge=1, le=16, description="MC requests running at once")
    mc_queue_limit: int = Field(4, ge=0, le=1024, description="MC requests waiting; then 429")
    mc_retry_after_s: int = Field(1, ge=1, le=3600, description="Retry-After of a 429")
    mc_nice: int = Field(10, ge=0, le=19, description="CPU nice value of the MC worker")
    mc_sched_idle: bool = Field(
        True, description="MC worker under SCHED_IDLE: it runs only when the core is otherwise idle"
    )
    mc_process: bool = Field(
        True, description="Run MC in worker process(es) (no GIL shared with the event loop)"
    )
    inline_inference: bool = Field(
        False, description="Run plain forward passes on the event loop thread (no thread hop)"
    )

    torch_threads: int = Field(1, ge=1, le=256, description="torch intra-op threads")
    torch_interop_threads: int = Field(1, ge=1, le=256, description="torch inter-op threads")
    inference_workers: int = Field(1, ge=1, le=64, description="Threads running forward passes")
    cpu_affinity: str | None = Field(None, description="CPU list to pin the process to, e.g. 0-1")

    log_level: str = Field("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)$")
    access_log: bool = Field(False, description="uvicorn access log (costs throughput)")
    graceful_timeout_s: int = Field(30, ge=1, description="In-flight grace on SIGTERM")
    drain_timeout_s: float = Field(30.0, gt=0, description="Longest wait of POST /admin/drain")
    keepalive_timeout_s: int = Field(75, ge=1, description="HTTP keep-alive idle timeout")
    header_timeout_s: float = Field(
        5.0, gt=0, le=300, description="A request's line and headers must arrive within this"
    )
    body_timeout_s: float = Field(
        10.0, gt=0, le=600, description="A request's body must arrive within this"
    )
    limit_concurrency: int = Field(
        512, ge=1, description="Connections or requests at once; beyond, 503 at once"
    )
    backlog: int = Field(2048, ge=16)
    docs_enabled: bool = Field(True, description="Serve /docs (self-contained, no CDN)")

    @field_validator("host")
    @classmethod
    def _valid_addresses(cls, value: str) -> str:
        addresses = [part.strip() for part in value.split(",") if part.strip()]
        if not addresses:
            raise ValueError("at least one listen address is required")
        for address in addresses:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ValueError(
                    f"listen address {address!r} is not an IP address (a host name could "
                    "resolve to anything; give the address the load balancer reaches)"
                ) from None
        if len(set(addresses)) != len(addresses):
            raise ValueError(f"listen addresses repeat: {value!r}")
        return ",".join(addresses)

    def hosts(self) -> list[str]:
        return self.host.split(",")

    @model_validator(mode="after")
    def _refuse_weak_admin_token(self) -> Self:
        if self.env is Environment.DEVELOPMENT:
            return self
        token = self.admin_token.get_secret_value() if self.admin_token else None
        if token is None:
            raise ValueError(f"GRANDMODEL_ADMIN_TOKEN is required when env={self.env.value}")
        if token.strip().lower() in KNOWN_DEFAULT_TOKENS or len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(
                f"GRANDMODEL_ADMIN_TOKEN is a known default or shorter than {MIN_TOKEN_LENGTH} "
                f"characters; refusing to start with env={self.env.value}"
            )
        return self

    def manifest_path(self, model: str) -> Path:
        override = {"strategic": self.strategic_manifest, "tactical": self.tactical_manifest}.get(
            model
        )
        return override if override is not None else self.model_dir / f"{model}.manifest.json"

    def cpu_set(self) -> set[int] | None:
        return parse_cpu_list(self.cpu_affinity) if self.cpu_affinity else None


def parse_cpu_list(text: str) -> set[int]:
    """Parse ``"0,2-3"`` into ``{0, 2, 3}``."""
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    if not cpus:
        raise ValueError(f"empty CPU list: {text!r}")
    return cpus
