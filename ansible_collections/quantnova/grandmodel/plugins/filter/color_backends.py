# -*- coding: utf-8 -*-
# Copyright: (c) 2025, GrandModel Ops
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The per-colour backend list of the front door: {colour: ["address:port", ...]} (docs: color_backends.yml)."""

from __future__ import annotations

from collections.abc import Mapping

from ansible.errors import AnsibleFilterError


def _address(host, hostvars):
    """The host's ansible_host when the inventory sets one, else its inventory name."""
    if hostvars is None:
        return str(host)
    try:
        host_vars = hostvars[host]
    except KeyError:
        return str(host)
    address = host_vars.get("ansible_host") if isinstance(host_vars, Mapping) else None
    return str(address) if address not in (None, "") else str(host)


def color_backends(colors, hosts, hostvars=None):
    """One "address:port" per app host for every colour, in the order of `hosts`.

    `colors` maps a colour to a dict with its `port`; `hosts` is the app group's host list; `hostvars`
    (optional) gives each host's ansible_host.
    """
    if not isinstance(colors, Mapping):
        raise AnsibleFilterError("color_backends: the colours must be a mapping such as {blue: {port: 8001}}, got %s"
                                 % type(colors).__name__)
    if isinstance(hosts, (str, bytes)) or not isinstance(hosts, (list, tuple)):
        raise AnsibleFilterError("color_backends: the hosts must be a list of inventory host names, got %s"
                                 % type(hosts).__name__)
    addresses = [_address(host, hostvars) for host in hosts]
    backends = {}
    for color, spec in colors.items():
        port = spec.get("port") if isinstance(spec, Mapping) else None
        if isinstance(port, bool) or not isinstance(port, (int, str)) or not str(port).strip().isdigit() \
                or not 0 < int(port) < 65536:
            raise AnsibleFilterError("color_backends: colour %s needs a port from 1 to 65535 (its entry is %r); set it "
                                     "in the colours map" % (color, spec))
        backends[str(color)] = ["%s:%d" % (address, int(port)) for address in addresses]
    return backends


class FilterModule:
    def filters(self):
        return {"color_backends": color_backends}
