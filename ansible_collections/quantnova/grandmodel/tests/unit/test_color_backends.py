"""color_backends filter: the per-colour backend list built once for loadbalancer and rollout."""

from __future__ import annotations

from typing import Any

import pytest
from ansible.errors import AnsibleFilterError

from ansible_collections.quantnova.grandmodel.plugins.filter.color_backends import FilterModule, color_backends

COLORS = {"blue": {"port": 8001}, "green": {"port": 8002}}


@pytest.mark.parametrize(("colors", "hosts", "hostvars", "expected"), [
    # ansible_host wins; a host without one (or an empty one) is addressed by its inventory name
    (COLORS, ["app1", "app2", "app3"], {"app1": {"ansible_host": "10.0.0.5"}, "app2": {}, "app3": {"ansible_host": ""}},
     {"blue": ["10.0.0.5:8001", "app2:8001", "app3:8001"], "green": ["10.0.0.5:8002", "app2:8002", "app3:8002"]}),
    # host order is kept (nginx tries servers in that order), and hostvars may be left out
    (COLORS, ["b", "a"], None, {"blue": ["b:8001", "a:8001"], "green": ["b:8002", "a:8002"]}),
    # a host missing from hostvars (added by add_host later) falls back to its name
    (COLORS, ["new"], {}, {"blue": ["new:8001"], "green": ["new:8002"]}),
    # no app host yet: every colour is present with no address (traffic_switch then names the colour)
    (COLORS, [], {}, {"blue": [], "green": []}),
    # a port given as a string (extra vars) is the same port
    ({"blue": {"port": "8001", "unit": "x"}}, ["h"], {"h": {"ansible_host": "127.0.0.1"}},
     {"blue": ["127.0.0.1:8001"]}),
    ({}, ["h"], {}, {}),
])
def test_every_colour_gets_one_address_per_app_host(colors: dict[str, Any], hosts: list[str],
                                                    hostvars: dict[str, Any] | None,
                                                    expected: dict[str, list[str]]) -> None:
    assert color_backends(colors, hosts, hostvars) == expected
    assert list(color_backends(colors, hosts, hostvars)) == list(colors)  # colours keep their order


@pytest.mark.parametrize(("colors", "hosts", "message"), [
    ({"blue": {}}, ["h"], r"colour blue needs a port from 1 to 65535 \(its entry is \{\}\)"),
    ({"blue": {"port": 0}}, ["h"], "colour blue needs a port"),
    ({"green": {"port": 70000}}, ["h"], "colour green needs a port"),
    ({"green": {"port": "80; include x"}}, ["h"], "colour green needs a port"),
    ({"green": {"port": True}}, ["h"], "colour green needs a port"),
    ({"green": 8002}, ["h"], r"colour green needs a port .*its entry is 8002"),
    (["blue", "green"], ["h"], "the colours must be a mapping"),
    (COLORS, "app1", "the hosts must be a list of inventory host names, got str"),
])
def test_bad_input_names_what_to_fix(colors: Any, hosts: Any, message: str) -> None:
    with pytest.raises(AnsibleFilterError, match=message):
        color_backends(colors, hosts, {})


def test_the_filter_is_registered_under_its_name() -> None:
    assert FilterModule().filters()["color_backends"] is color_backends
