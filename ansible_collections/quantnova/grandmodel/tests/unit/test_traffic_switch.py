"""traffic_switch: upstream rendering and parsing, then the module against a real nginx on loopback."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from ansible.module_utils.basic import AnsibleModule
from conftest import NginxUnderTest, free_port, run_module

from ansible_collections.quantnova.grandmodel.plugins.module_utils.traffic import (
    FrontDoorVerifier,
    NginxBackend,
    TrafficSwitchError,
    parse_active_color,
    render_upstream,
    switch_traffic,
)
from ansible_collections.quantnova.grandmodel.plugins.modules import traffic_switch

UPSTREAM = "grandmodel_backend"


def test_render_upstream_has_the_colour_header_servers_and_keepalive() -> None:
    text = render_upstream(UPSTREAM, "green", ["127.0.0.1:8002", "10.0.0.5:8002"], 32)
    assert text.splitlines()[1] == "# active_color: green"
    assert "upstream grandmodel_backend {" in text
    assert "    server 127.0.0.1:8002 max_fails=0;" in text
    assert "    server 10.0.0.5:8002 max_fails=0;" in text
    assert "    keepalive 32;" in text
    assert "keepalive" not in render_upstream("u", "blue", ["127.0.0.1:1"], 0)


@pytest.mark.parametrize(("name", "color", "addresses", "problem"), [
    ("grandmodel_backend", "green", [], "lists no address"),
    ("bad name;", "green", ["127.0.0.1:1"], "may hold only"),
    ("grandmodel_backend", "green", ["127.0.0.1:1; include /etc/passwd"], "is not host:port"),
    ("grandmodel_backend", "green", ["  "], "is not host:port"),
])
def test_render_upstream_refuses_what_would_inject_or_break_nginx(
        name: str, color: str, addresses: list[str], problem: str) -> None:
    with pytest.raises(TrafficSwitchError, match=problem):
        render_upstream(name, color, addresses, 32)


@pytest.mark.parametrize(("text", "color"), [
    ("# active_color: blue\nupstream x {}\n", "blue"),
    ("# Managed\n#   active_color:   green  \n", "green"),
    ("upstream x { server a:1; }\n", None),
    ("", None),
    (None, None),
])
def test_parse_active_color(text: str | None, color: str | None) -> None:
    assert parse_active_color(text) == color


def test_read_state_falls_back_to_the_state_file_and_notices_outside_switches(
        tmp_path: Path, ansible_module: AnsibleModule) -> None:
    upstream = tmp_path / "up.conf"
    backend = NginxBackend(str(upstream), module=ansible_module, backends={"blue": ["127.0.0.1:1"]})
    assert backend.read_state().active is None
    backend.state.write("green", "blue")
    state = backend.read_state()
    assert (state.active, state.previous, state.source) == ("green", "blue", "state_file")
    upstream.write_text(render_upstream(UPSTREAM, "blue", ["127.0.0.1:1"], 0))
    state = backend.read_state()  # someone switched back by hand: the header wins, green becomes previous
    assert (state.active, state.previous, state.source) == ("blue", "green", "upstream_file")


def test_check_mode_plan_reports_diff_and_touches_nothing(tmp_path: Path) -> None:
    upstream = tmp_path / "up.conf"
    backend = NginxBackend(str(upstream), backends={"green": ["127.0.0.1:2"]}, nginx_binary="/nonexistent/nginx")
    result = switch_traffic(backend, "green", check_mode=True, want_diff=True)
    assert result["changed"] is True
    assert result["diff"]["before"] == ""
    assert "# active_color: green" in result["diff"]["after"]
    assert list(tmp_path.iterdir()) == []


def test_missing_nginx_binary_fails_and_removes_the_new_file(tmp_path: Path, ansible_module: AnsibleModule) -> None:
    upstream = tmp_path / "up.conf"
    backend = NginxBackend(str(upstream), module=ansible_module, backends={"green": ["127.0.0.1:2"]},
                           nginx_binary="/nonexistent/nginx")
    with pytest.raises(TrafficSwitchError, match=r"cannot run /nonexistent/nginx.*was never replaced"):
        switch_traffic(backend, "green")
    assert not upstream.exists()
    # No candidate or journal is left behind; only the (unlocked) lock file stays.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".up.conf.lock"]


# -- the module against a real nginx --------------------------------------------------------------

def module_args(nginx: NginxUnderTest, color: str, **extra: Any) -> dict[str, Any]:
    args = dict(color=color, upstream_file=str(nginx.upstream_file), backends=nginx.backends(),
                nginx_binary=nginx.binary, nginx_config=str(nginx.conf), nginx_prefix=str(nginx.prefix),
                verify_url=nginx.url, verify_timeout=5.0, verify_consecutive=3, verify_interval=0.05)
    args.update(extra)
    return args


def test_switch_blue_to_green_is_verified_through_nginx(
        nginx: NginxUnderTest, capsys: pytest.CaptureFixture[str]) -> None:
    before = nginx.upstream_file.read_text()
    result = run_module(traffic_switch.main, module_args(nginx, "green"), capsys, diff=True)
    assert not result.get("failed"), result
    assert result["changed"] is True
    assert (result["active_color"], result["previous_color"]) == ("green", "blue")
    assert result["verified"] is True
    evidence = result["verification"]
    assert evidence["answers"][-1] == {**evidence["answers"][-1], "answer": "green"}
    assert evidence["answers"][-1]["count"] >= 3
    assert evidence["seconds_to_cutover"] is not None
    assert result["diff"]["before"] == before
    assert "# active_color: green" in result["diff"]["after"]
    assert nginx.serving() == "green"
    assert parse_active_color(nginx.upstream_file.read_text()) == "green"
    backup = nginx.upstream_file.parent / ".grandmodel_upstream.conf.previous"
    assert backup.read_text() == before
    record = json.loads(Path(result["state_file"]).read_text())
    assert (record["active"], record["previous"]) == ("green", "blue")
    # Only the upstream file matches nginx's include glob; helpers are dot-files.
    assert sorted(p.name for p in nginx.upstream_file.parent.glob("*.conf")) == ["grandmodel_upstream.conf"]

    repeat = run_module(traffic_switch.main, module_args(nginx, "green"), capsys)
    assert repeat["changed"] is False
    assert (repeat["active_color"], repeat["previous_color"]) == ("green", "blue")

    query = run_module(traffic_switch.main, dict(state="query", upstream_file=str(nginx.upstream_file)), capsys)
    assert (query["changed"], query["active_color"], query["previous_color"], query["source"]) == (
        False, "green", "blue", "upstream_file")


def test_check_mode_reports_the_diff_and_changes_nothing(
        nginx: NginxUnderTest, capsys: pytest.CaptureFixture[str]) -> None:
    before = nginx.upstream_file.read_text()
    listing = sorted(os.listdir(nginx.upstream_file.parent))
    result = run_module(traffic_switch.main, module_args(nginx, "green"), capsys, check_mode=True, diff=True)
    assert result["changed"] is True
    assert result["verified"] is False
    assert result["diff"]["before"] == before
    assert f"server 127.0.0.1:{nginx.green.port} max_fails=0;" in result["diff"]["after"]
    assert nginx.upstream_file.read_text() == before
    assert sorted(os.listdir(nginx.upstream_file.parent)) == listing
    assert nginx.serving() == "blue"


@pytest.mark.parametrize(("override", "extra_conf", "expected"), [
    ({"green": ["127.0.0.1:99999"]}, "", "invalid port"),
    ({}, "    upstream grandmodel_backend { server 127.0.0.1:1; }", "duplicate upstream"),
])
def test_config_nginx_refuses_is_rolled_back_and_old_colour_still_serves(
        nginx: NginxUnderTest, capsys: pytest.CaptureFixture[str],
        override: dict[str, list[str]], extra_conf: str, expected: str) -> None:
    before = nginx.upstream_file.read_text()
    if extra_conf:
        nginx.write_conf(extra_conf)  # an upstream of the same name elsewhere: the new file clashes
    args = module_args(nginx, "green", backends=nginx.backends(**override))
    result = run_module(traffic_switch.main, args, capsys)
    assert result["failed"] is True
    assert "nginx configuration test" in result["msg"]
    assert expected in result["msg"]
    assert str(nginx.upstream_file) in result["msg"]
    assert "previous state restored" in result["msg"]
    assert result["restored"] is True
    assert nginx.upstream_file.read_text() == before
    assert nginx.serving() == "blue"


@pytest.mark.parametrize("fault", ["green_down", "green_answers_blue"])
def test_failed_verification_restores_the_old_file_and_reloads(
        nginx: NginxUnderTest, capsys: pytest.CaptureFixture[str], fault: str) -> None:
    before = nginx.upstream_file.read_text()
    if fault == "green_down":
        backends = nginx.backends(green=[f"127.0.0.1:{free_port()}"])
    else:
        nginx.green.color = "blue"
        backends = nginx.backends()
    args = module_args(nginx, "green", backends=backends, verify_timeout=1.0)
    result = run_module(traffic_switch.main, args, capsys)
    assert result["failed"] is True
    assert "did not answer color green 3 times in a row within 1.0s" in result["msg"]
    assert "reloaded nginx" in result["msg"]
    assert result["verification"]["verified"] is False
    assert result["restored"] is True
    assert result["restore_verification"]["verified"] is True
    assert "blue answers again" in result["msg"]
    assert result["active_color"] == "blue"
    assert nginx.upstream_file.read_text() == before
    # The reload after restoring put blue back for every new connection.
    assert [nginx.serving() for _attempt in range(5)] == ["blue"] * 5
    assert not (nginx.upstream_file.parent / ".grandmodel_upstream.conf.state.json").exists()


def test_verifier_waits_for_a_streak_not_a_single_answer() -> None:
    answers = iter(["blue", "green", "blue", "green", "green", "green"])
    verifier = FrontDoorVerifier("http://127.0.0.1:1/version", timeout=5, consecutive=3, sleep=lambda _s: None)
    verifier._answer = lambda: next(answers)  # type: ignore[method-assign]
    evidence = verifier.verify("green")
    assert evidence["verified"] is True
    assert evidence["requests"] == 6
    assert [a["answer"] for a in evidence["answers"]] == ["blue", "green", "blue", "green"]
