# -*- coding: utf-8 -*-
# Copyright: (c) 2026, GrandModel Ops
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: pki_certificate_info
short_description: Tell, in one run on the host, whether its CA file, key and certificate are all current
version_added: 0.2.0
description:
  - The pki role's full path for a certificate makes six module runs on the host even when nothing changes
    (the directory, the CA file, the key, reading the certificate, the request, the certificate file). This
    module reads everything once and says whether all of it is already what that path would leave; the role
    skips the full path only then, and runs it whenever anything differs or cannot be read.
  - It changes nothing. It answers V(current=true) only when every check passes; any doubt (a file missing or
    unreadable, an unsupported key or signature type, the C(cryptography) library missing) is V(current=false)
    with the reasons, never a failure.
  - The checks are those of the full path. The directory is a directory with its owner, group and mode. The CA
    file holds exactly O(ca_content), root-owned, mode 0644. The key is an unencrypted EC P-256 key, mode 0600
    with O(owner) and O(group). The certificate file holds one certificate with O(owner), O(group) and mode
    0644, issued to O(common_name) alone, with exactly the names of O(subject_alt_names), signed by the CA of
    O(ca_content) (the signature is verified), for the key's public key, not a CA, for digital signature and
    key agreement, for server and client authentication, and valid for more than O(renew_days) days.
author:
  - GrandModel Ops (@quantnova)
attributes:
  check_mode:
    support: full
    description: Reads only; the same answer in check mode.
  diff_mode:
    support: none
    description: Changes nothing, so there is nothing to show.
  platform:
    support: full
    platforms: posix
    description: A POSIX host with python3-cryptography; without it the answer is V(current=false).
requirements:
  - cryptography (python3-cryptography) on the host
options:
  directory:
    description: The certificate directory (owner root, group root, mode 0755).
    type: path
    required: true
  ca_file:
    description: The CA certificate file on the host.
    type: path
    required: true
  ca_content:
    description: The CA certificate (PEM) the CA file must hold, byte for byte.
    type: str
    required: true
  key_file:
    description: The private key file.
    type: path
    required: true
  cert_file:
    description: The certificate file.
    type: path
    required: true
  owner:
    description: Owner of the key and the certificate (name or number).
    type: str
    required: true
  group:
    description: Group of the key and the certificate (name or number).
    type: str
    required: true
  common_name:
    description: The only attribute of the certificate's subject.
    type: str
    required: true
  subject_alt_names:
    description: The certificate's names, each C(DNS:<name>) or C(IP:<address>); compared as a set.
    type: list
    elements: str
    required: true
  renew_days:
    description: The certificate must stay valid for more than this many days.
    type: int
    required: true
"""

EXAMPLES = r"""
- name: Check whether the host's certificate is current
  quantnova.grandmodel.pki_certificate_info:
    directory: /etc/grandmodel/pki
    ca_file: /etc/grandmodel/pki/ca.crt
    ca_content: "{{ lookup('ansible.builtin.file', 'secrets/pki/ca.crt') ~ '\n' }}"
    key_file: /etc/grandmodel/pki/nginx.key
    cert_file: /etc/grandmodel/pki/nginx.crt
    owner: root
    group: root
    common_name: "{{ inventory_hostname }}"
    subject_alt_names: ["DNS:lb1", "IP:127.0.0.1"]
    renew_days: 30
  register: certificate_state
"""

RETURN = r"""
current:
  description: Whether the directory, the CA file, the key and the certificate are all current.
  returned: always
  type: bool
  sample: true
reasons:
  description: What is not current (empty when RV(current) is true).
  returned: always
  type: list
  elements: str
  sample: ["/etc/grandmodel/pki/nginx.crt: its names differ: missing IP:10.0.0.5"]
"""

import datetime
import grp
import ipaddress
import os
import pwd
import stat
from typing import Any

from ansible.module_utils.basic import AnsibleModule

try:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    HAS_CRYPTOGRAPHY = True
except ImportError:
    HAS_CRYPTOGRAPHY = False


def _account_id(name: str, lookup: Any) -> int | None:
    """The number of a user or group given by name or number; None when the host does not know it."""
    if name.isdigit():
        return int(name)
    try:
        return int(lookup(name)[2])
    except KeyError:
        return None


def _attributes(path: str, kind: str, uid: int | None, gid: int | None, mode: int) -> list[str]:
    """What differs in a path's type, owner, group and mode."""
    try:
        info = os.lstat(path)
    except OSError as err:
        return [f"{path}: cannot be read ({err.strerror})"]
    reasons = []
    is_kind = stat.S_ISDIR(info.st_mode) if kind == "directory" else stat.S_ISREG(info.st_mode)
    if not is_kind:
        reasons.append(f"{path}: not a {kind}")
    if uid is None or info.st_uid != uid:
        reasons.append(f"{path}: owner {info.st_uid} is not the expected one")
    if gid is None or info.st_gid != gid:
        reasons.append(f"{path}: group {info.st_gid} is not the expected one")
    if stat.S_IMODE(info.st_mode) != mode:
        reasons.append(f"{path}: mode {stat.S_IMODE(info.st_mode):04o} is not {mode:04o}")
    return reasons


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        return None


def _normal_name(name: str) -> str:
    """A subject alternative name as C(DNS:<lower-case name>) or C(IP:<canonical address>)."""
    kind, _sep, value = name.partition(":")
    if kind == "IP":
        try:
            return f"IP:{ipaddress.ip_address(value)}"
        except ValueError:
            return name
    return f"{kind}:{value.lower()}" if kind == "DNS" else name


def _certificate_names(cert: Any) -> set[str] | None:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    names = set()
    for entry in sans:
        if isinstance(entry, x509.DNSName):
            names.add(f"DNS:{entry.value.lower()}")
        elif isinstance(entry, x509.IPAddress):
            names.add(f"IP:{entry.value}")
        else:
            return None
    return names


def _signed_by(cert: Any, ca: Any) -> bool:
    """Whether the CA's key made the certificate's signature (EC, RSA PKCS#1 v1.5, Ed25519, Ed448)."""
    key = ca.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm)
        elif isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            key.verify(cert.signature, cert.tbs_certificate_bytes)
        else:
            return False
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _not_after(cert: Any) -> datetime.datetime:
    value = getattr(cert, "not_valid_after_utc", None)
    return value if value is not None else cert.not_valid_after.replace(tzinfo=datetime.timezone.utc)


def _not_before(cert: Any) -> datetime.datetime:
    value = getattr(cert, "not_valid_before_utc", None)
    return value if value is not None else cert.not_valid_before.replace(tzinfo=datetime.timezone.utc)


def _usage(cert: Any) -> list[str]:
    """What differs from the usages the pki role asks for."""
    reasons = []
    extensions = cert.extensions
    try:
        constraints = extensions.get_extension_for_class(x509.BasicConstraints).value
        if constraints.ca:
            reasons.append("it is a CA certificate")
    except x509.ExtensionNotFound:
        reasons.append("it has no basic constraints")
    try:
        usage = extensions.get_extension_for_class(x509.KeyUsage).value
        wanted = usage.digital_signature and usage.key_agreement
        others = (usage.content_commitment or usage.key_encipherment or usage.data_encipherment
                  or usage.key_cert_sign or usage.crl_sign)
        if not wanted or others:
            reasons.append("its key usage is not digital signature and key agreement")
    except x509.ExtensionNotFound:
        reasons.append("it has no key usage")
    try:
        extended = set(extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        if extended != {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}:
            reasons.append("its extended key usage is not server and client authentication")
    except x509.ExtensionNotFound:
        reasons.append("it has no extended key usage")
    return reasons


def _key_identifiers(cert: Any, ca: Any) -> list[str]:
    """The authority key identifier names the CA's subject key identifier, and the certificate has its own."""
    reasons = []
    try:
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        reasons.append("it has no subject key identifier")
    try:
        ca_id = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return reasons
    try:
        authority = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        if authority.key_identifier != ca_id:
            reasons.append("its authority key identifier is not the CA's")
    except x509.ExtensionNotFound:
        reasons.append("it has no authority key identifier")
    return reasons


def _certificate(params: dict[str, Any], ca: Any, public_key: bytes | None) -> list[str]:
    path = params["cert_file"]
    data = _read(path)
    if data is None:
        return [f"{path}: cannot be read"]
    if data.count(b"-----BEGIN CERTIFICATE-----") != 1:
        return [f"{path}: does not hold exactly one certificate"]
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError:
        return [f"{path}: not a PEM certificate"]
    reasons = []
    subject = [(attr.oid, attr.value) for attr in cert.subject]
    if subject != [(NameOID.COMMON_NAME, params["common_name"])]:
        reasons.append(f"its subject is not CN={params['common_name']}")
    if cert.issuer != ca.subject or not _signed_by(cert, ca):
        reasons.append("it is not signed by this CA")
    reasons.extend(_key_identifiers(cert, ca))
    names = _certificate_names(cert)
    wanted = {_normal_name(name) for name in params["subject_alt_names"]}
    if names != wanted:
        detail = "other kinds of names" if names is None else (
            f"missing {sorted(wanted - names)}, extra {sorted(names - wanted)}")
        reasons.append(f"its names differ: {detail}")
    if public_key is None or cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != public_key:
        reasons.append("it is not for the host's key")
    reasons.extend(_usage(cert))
    now = datetime.datetime.now(datetime.timezone.utc)
    if _not_before(cert) > now:
        reasons.append("it is not valid yet")
    if _not_after(cert) - now <= datetime.timedelta(days=params["renew_days"]):
        reasons.append(f"it ends within {params['renew_days']} days")
    return [f"{path}: {reason}" for reason in reasons]


def _key(path: str) -> tuple[bytes | None, list[str]]:
    """The key's public key (DER) and what differs from an unencrypted EC P-256 key."""
    data = _read(path)
    if data is None:
        return None, [f"{path}: cannot be read"]
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        return None, [f"{path}: not an unencrypted PEM private key"]
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        return None, [f"{path}: not an EC P-256 key"]
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return public, []


def check(params: dict[str, Any]) -> list[str]:
    """Every reason the files are not what the pki role's full path would leave; empty when they are."""
    if not HAS_CRYPTOGRAPHY:
        return ["the cryptography library is not installed on the host"]
    uid = _account_id(params["owner"], pwd.getpwnam)
    gid = _account_id(params["group"], grp.getgrnam)
    reasons = _attributes(params["directory"], "directory", 0, 0, 0o755)
    ca_bytes = params["ca_content"].encode()
    if _read(params["ca_file"]) != ca_bytes:
        reasons.append(f"{params['ca_file']}: does not hold this CA certificate")
    reasons.extend(_attributes(params["ca_file"], "file", 0, 0, 0o644))
    try:
        ca = x509.load_pem_x509_certificate(ca_bytes)
    except ValueError:
        return [*reasons, "ca_content is not a PEM certificate"]
    public_key, key_reasons = _key(params["key_file"])
    reasons.extend(key_reasons)
    reasons.extend(_attributes(params["key_file"], "file", uid, gid, 0o600))
    reasons.extend(_certificate(params, ca, public_key))
    reasons.extend(_attributes(params["cert_file"], "file", uid, gid, 0o644))
    return reasons


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "directory": {"type": "path", "required": True},
            "ca_file": {"type": "path", "required": True},
            "ca_content": {"type": "str", "required": True},
            "key_file": {"type": "path", "required": True},
            "cert_file": {"type": "path", "required": True},
            "owner": {"type": "str", "required": True},
            "group": {"type": "str", "required": True},
            "common_name": {"type": "str", "required": True},
            "subject_alt_names": {"type": "list", "elements": "str", "required": True},
            "renew_days": {"type": "int", "required": True},
        },
        supports_check_mode=True,
    )
    reasons = check(module.params)
    module.exit_json(changed=False, current=not reasons, reasons=reasons)


if __name__ == "__main__":
    main()
