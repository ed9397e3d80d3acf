from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

#: Benchmark tooling (load generator, baselines) lives beside the package, not in its wheel.
BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH_DIR))

from grandmodel_service.app import create_app  # noqa: E402
from grandmodel_service.export import export_model  # noqa: E402
from grandmodel_service.settings import Settings  # noqa: E402

ADMIN_TOKEN = "test-admin-token-0123456789abcdef"


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both models exported once per session from the default seed."""
    out = tmp_path_factory.mktemp("artifacts")
    for name in ("strategic", "tactical"):
        export_model(name, out, version="1.2.3")
    return out


@pytest.fixture
def artifact_copy(artifacts: Path, tmp_path: Path) -> Path:
    """A private copy that a test may tamper with."""
    target = tmp_path / "artifacts"
    shutil.copytree(artifacts, target)
    return target


@pytest.fixture
def make_settings(artifacts: Path) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "model_dir": artifacts,
            "env": "development",
            "admin_token": ADMIN_TOKEN,
            "warmup_iterations": 1,
            "color": "green",
            "service_version": "9.9.9",
            # In-process apps run MC on a thread: a worker process per app start costs
            # seconds. The real-uvicorn tests (test_fairness, test_process) use the process.
            "mc_process": False,
        }
        values.update(overrides)
        return Settings(**values)

    return build


@pytest.fixture
def client(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings())) as test_client:
        yield test_client


def matrix(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
