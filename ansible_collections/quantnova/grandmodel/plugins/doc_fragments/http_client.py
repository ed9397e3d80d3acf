# -*- coding: utf-8 -*-
# Copyright: (c) 2025, GrandModel Ops
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    # The HTTP options of modules that probe a service (built by module_utils.http_client.http_argument_spec;
    # the requests go through ansible.module_utils.urls, the code behind open_url). Not the url fragment
    # (ansible.builtin.url): it documents url, force, use_proxy, url_username/url_password, client_cert and
    # more that these modules do not take (probes never use a proxy or basic auth), and lacks timeout and
    # headers; extending it would document options the modules refuse.
    DOCUMENTATION = r"""
options:
  timeout:
    description:
      - Seconds to wait for each HTTP request to connect and answer.
      - A request that gets no answer within this time counts as an error (the probe could not be made),
        not as a failed check.
    type: float
    default: 5.0
  validate_certs:
    description:
      - Verify the TLS certificate of C(https://) URLs.
      - Set to V(false) only for self-signed certificates on loopback.
    type: bool
    default: true
  headers:
    description:
      - Extra HTTP headers sent with every request, for example an C(Authorization) token.
      - Requests never go through an environment proxy; probes talk to the service directly.
    type: dict
    default: {}
"""
