"""traffic_switch with backend=kubernetes run as a module: check mode, diff, switch, query, switch back, refusals.

Runs once plugins/modules/traffic_switch.py offers backend=kubernetes (the wiring in docs/kubernetes.md);
until then it is skipped, saying so.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from conftest import run_module
from k8s_api_fake import COLOR_LABEL, FakeApiServer

from ansible_collections.quantnova.grandmodel.plugins.modules import traffic_switch

if "kubernetes" not in traffic_switch.argument_spec()["backend"]["choices"]:
    pytest.skip("traffic_switch has no backend=kubernetes yet: apply the wiring in docs/kubernetes.md",
                allow_module_level=True)
TOKEN = "t0ken-for-the-unit-tests"


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    server = FakeApiServer()
    server.add_color_service("blue")
    server.add_color_service("green")
    server.start()
    yield server
    server.stop()


def args(api: FakeApiServer, **extra: Any) -> dict[str, Any]:
    return dict(backend="kubernetes", host=api.url, api_key=TOKEN, namespace="grandmodel", service="grandmodel",
                verify_timeout=3, verify_interval=0.05, request_timeout=2, **extra)


def test_check_mode_with_diff_patches_nothing(api: FakeApiServer, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_module(traffic_switch.main, args(api, color="green"), capsys, check_mode=True, diff=True)
    assert result["changed"] is True and "failed" not in result
    assert result["diff"]["after"].endswith(f"{COLOR_LABEL}: green\n")
    assert result["service"] == "grandmodel/grandmodel"
    assert api.count("PATCH") == 0 and api.live_color() == "blue"


def test_switch_query_and_switch_back(api: FakeApiServer, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_module(traffic_switch.main, args(api, color="green"), capsys)
    assert (result["changed"], result["verified"], result["active_color"]) == (True, True, "green")
    query = run_module(traffic_switch.main, args(api, state="query"), capsys)
    assert (query["active_color"], query["previous_color"], query["source"]) == ("green", "blue", "service_selector")
    back = run_module(traffic_switch.main, args(api, state="previous"), capsys)
    assert back["active_color"] == "blue" and api.live_color() == "blue"
    again = run_module(traffic_switch.main, args(api, color="blue"), capsys)
    assert again["changed"] is False


def test_refusal_is_a_clean_failure(api: FakeApiServer, capsys: pytest.CaptureFixture[str]) -> None:
    api.set_color_ready("green", False)
    result = run_module(traffic_switch.main, args(api, color="green"), capsys)
    assert result["failed"] is True and "refusing to switch" in result["msg"]
    assert result["precheck"]["ready"] == 0 and api.live_color() == "blue"
    assert TOKEN not in str(result)


def test_kubernetes_options_do_not_need_nginx_ones(api: FakeApiServer, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_module(traffic_switch.main, args(api, color="green", metrics_file="/tmp/x.prom"), capsys)
    assert result["failed"] is True and "metrics_file is for the nginx backend" in result["msg"]
    nginx = run_module(traffic_switch.main, {"color": "green", "backends": {"green": ["127.0.0.1:1"]}}, capsys)
    assert nginx["failed"] is True and "upstream_file" in nginx["msg"]
