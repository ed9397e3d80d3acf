"""Admin auth, drain/resume, refusal of weak tokens, and not-ready states."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import httpx2
import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from grandmodel_service.app import create_app
from grandmodel_service.engine import BatchOutput
from grandmodel_service.settings import Settings

from .conftest import ADMIN_TOKEN, matrix

URL = "/v1/models/strategic/predict"
AUTH = {"authorization": f"Bearer {ADMIN_TOKEN}"}
BODY = orjson.dumps({"inputs": matrix((48, 13))}, option=orjson.OPT_SERIALIZE_NUMPY)
JSON = {"content-type": "application/json"}


@pytest.mark.parametrize("path", ["/admin/drain", "/admin/resume", "/admin/undrain"])
@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"authorization": "Bearer wrong"}, 401), ({"authorization": ADMIN_TOKEN}, 401)],
)
def test_admin_requires_the_token(
    client: TestClient, path: str, headers: dict[str, str], status: int
) -> None:
    reply = client.post(path, headers=headers)
    assert reply.status_code == status
    assert reply.json()["error"] == "unauthorized"
    assert client.get("/admin/status", headers=headers).status_code == status


def test_admin_is_disabled_without_a_token(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings(admin_token=None))) as client:
        reply = client.post("/admin/drain", headers=AUTH)
        assert reply.status_code == 403
        assert reply.json()["error"] == "admin_disabled"


def test_drain_and_resume(client: TestClient) -> None:
    assert client.post(URL, content=BODY, headers=JSON).status_code == 200
    drained = client.post("/admin/drain", headers=AUTH)
    assert drained.json() == {"draining": True, "in_flight": 0, "drained": True}
    ready = client.get("/ready")
    assert ready.status_code == 503
    assert ready.json()["reasons"] == {"service": "draining"}
    refused = client.post(URL, content=BODY, headers=JSON)
    assert refused.status_code == 503
    assert refused.json()["error"] == "draining"
    assert client.get("/health").status_code == 200
    assert "grandmodel_draining 1.0" in client.get("/metrics").text
    resumed = client.post("/admin/undrain", headers=AUTH)
    assert resumed.json()["draining"] is False
    assert client.get("/ready").status_code == 200
    assert client.post(URL, content=BODY, headers=JSON).status_code == 200
    assert client.get("/admin/status", headers=AUTH).json()["draining"] is False


def test_drain_waits_for_in_flight_predictions(make_settings: Callable[..., Settings]) -> None:
    """Requests accepted before the drain all finish with 200; the drain reports zero left."""
    # Forward passes on a thread so that a slow one leaves the loop free to accept more.
    app = create_app(make_settings(inline_inference=False))

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            model = app.state.runtime.slots["strategic"].model
            batcher = app.state.runtime.slots["strategic"].batcher

            def slow(inputs: np.ndarray) -> BatchOutput:
                time.sleep(0.3)
                return model.predict(inputs)

            batcher._run_batch = slow
            transport = httpx2.ASGITransport(app=app)
            async with httpx2.AsyncClient(transport=transport, base_url="http://t") as client:
                predictions = [
                    asyncio.create_task(client.post(URL, content=BODY, headers=JSON))
                    for _ in range(6)
                ]
                while app.state.runtime.in_flight < 6:  # noqa: ASYNC110 - polling a counter
                    await asyncio.sleep(0.01)
                drain = await client.post("/admin/drain", headers=AUTH)
                assert drain.json() == {"draining": True, "in_flight": 0, "drained": True}
                assert [r.status_code for r in await asyncio.gather(*predictions)] == [200] * 6
                late = await client.post(URL, content=BODY, headers=JSON)
                assert late.status_code == 503

    asyncio.run(scenario())


@pytest.mark.parametrize("env", ["staging", "production"])
@pytest.mark.parametrize("token", [None, "changeme", "admin", "short-token", "  SECRET  "])
def test_refuses_to_start_outside_development_with_a_weak_token(
    env: str, token: str | None
) -> None:
    with pytest.raises(ValidationError, match="GRANDMODEL_ADMIN_TOKEN"):
        Settings(env=env, admin_token=token)


def test_strong_token_is_accepted_in_production() -> None:
    settings = Settings(env="production", admin_token=ADMIN_TOKEN)
    assert settings.admin_token is not None
    assert ADMIN_TOKEN not in repr(settings)


def test_server_entry_point_refuses_weak_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from grandmodel_service.server import main

    monkeypatch.setenv("GRANDMODEL_ENV", "production")
    monkeypatch.setenv("GRANDMODEL_ADMIN_TOKEN", "changeme")
    assert main([]) == 2
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["level"] == "CRITICAL"
    assert "refusing to start" in line["msg"]


def test_settings_from_environment_and_env_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from grandmodel_service.server import load_settings

    env_file = tmp_path / "service.env"
    env_file.write_text(
        "GRANDMODEL_COLOR=green\nGRANDMODEL_PORT=9100\n"
        "GRANDMODEL_BATCH_MAX_SIZE=64\nGRANDMODEL_CPU_AFFINITY=0-1\n"
    )
    monkeypatch.setenv("GRANDMODEL_PORT", "9200")  # the environment wins over the file
    settings = load_settings(env_file)
    assert (settings.color, settings.port, settings.batch_max_size) == ("green", 9200, 64)
    assert settings.cpu_set() == {0, 1}
    assert settings.manifest_path("tactical") == Path("artifacts/tactical.manifest.json")
    monkeypatch.setenv("GRANDMODEL_STRATEGIC_MANIFEST", "/srv/s.json")
    assert load_settings(None).manifest_path("strategic") == Path("/srv/s.json")


def _tamper(artifact_dir: Path) -> None:
    artifact = next(artifact_dir.glob("strategic-*.pt"))
    data = bytearray(artifact.read_bytes())
    data[100] ^= 0x01
    artifact.write_bytes(bytes(data))


def _break_golden(artifact_dir: Path) -> None:
    path = artifact_dir / "strategic.manifest.json"
    data = json.loads(path.read_text())
    data["golden"]["samples"][0]["value"] += 0.5
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("spoil", "reason"), [(_tamper, "sha256 mismatch"), (_break_golden, "does not reproduce")]
)
def test_refused_artifact_keeps_the_service_not_ready(
    make_settings: Callable[..., Settings],
    artifact_copy: Path,
    caplog: pytest.LogCaptureFixture,
    spoil: Callable[[Path], None],
    reason: str,
) -> None:
    spoil(artifact_copy)
    with (
        caplog.at_level(logging.ERROR),
        TestClient(create_app(make_settings(model_dir=artifact_copy))) as client,
    ):
        ready = client.get("/ready")
        assert ready.status_code == 503
        assert reason in ready.json()["reasons"]["strategic"]
        assert "tactical" not in ready.json()["reasons"]
        refused = client.post(URL, content=BODY, headers=JSON)
        assert refused.status_code == 503
        assert refused.json()["error"] == "model_not_ready"
        tactical = orjson.dumps({"inputs": matrix((60, 7))}, option=orjson.OPT_SERIALIZE_NUMPY)
        assert (
            client.post("/v1/models/tactical/predict", content=tactical, headers=JSON).status_code
            == 200
        )
        assert client.get("/version").json()["models"]["strategic"]["ready"] is False
        assert "grandmodel_ready 0.0" in client.get("/metrics").text
    refusals = [r for r in caplog.records if r.getMessage().startswith("model refused")]
    assert refusals
    assert reason in refusals[0].reason


def test_missing_model_dir_is_not_ready(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    with TestClient(create_app(make_settings(model_dir=tmp_path))) as client:
        reasons = client.get("/ready").json()["reasons"]
        assert set(reasons) == {"strategic", "tactical"}
        assert "cannot read manifest" in reasons["strategic"]
