"""The pki role's fast path: one module run when the host's certificate is current, the full path otherwise.

quantnova.grandmodel.pki_certificate_info reads the directory, the CA file, the key and the certificate in one
run; the role skips its six-run full path only when all of them are what that path would leave. A fast path
that says "current" too easily would keep a certificate that the full path replaces: here every host of one
inventory is a case (connection local, its own directory), the role runs for real, and each case breaks one
thing the full path would repair (the names asked for, a certificate signed by another key under the CA's
name, the key's mode, the remaining validity, the CA file's bytes). Each must be seen as not current (with
its reason; a missing key, certificate or directory too), reported as a change in check mode without a byte
touched, repaired by the run, and then be current again, while an untouched host stays on the fast path throughout.
"""

from __future__ import annotations

import datetime
import shutil
import stat
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .ansible_batch import Batch, run_batch

CASES = ("untouched", "names", "forged", "key_mode", "expiring", "ca_file", "no_key", "no_cert", "no_directory")


def play(ca_dir: Path) -> list[dict[str, Any]]:
    return [{
        "name": "pki certificate cases", "hosts": "all", "gather_facts": False,
        "vars": {"pki_ca_dir": str(ca_dir),
                 # python3-cryptography is there (the controller's own); skip the role's apt step
                 "__common_installed_packages": ["python3-cryptography"]},
        "tasks": [{"name": "certificate", "ansible.builtin.include_role": {
            "name": "quantnova.grandmodel.pki", "tasks_from": "certificate"}}],
    }]


def hosts(work: Path, changed: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    base = {name: {"pki_dir": str(work / name), "pki_cert_name": "web", "ansible_host": "127.0.0.1",
                   "pki_cert_extra_sans": ["web.example.net"], "pki_cert_valid_days": 365,
                   "pki_cert_renew_days": 30} for name in CASES}
    base["expiring"].update(pki_cert_valid_days=40)
    for name, variables in (changed or {}).items():
        base[name].update(variables)
    return base


def state(batch: Batch, host: str) -> dict[str, Any]:
    found = [r for r in batch[host].results if "current" in r]
    assert len(found) == 1, batch[host]
    return found[0]


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), stat.S_IMODE(p.stat().st_mode)) for p in sorted(directory.iterdir())}


def forge(directory: Path) -> None:
    """The same certificate (names, key, usages, validity, the CA's name as issuer and its key identifier)
    signed by another key: only the signature tells it from the real one."""
    real = x509.load_pem_x509_certificate((directory / "web.crt").read_bytes())
    builder = (x509.CertificateBuilder().subject_name(real.subject).issuer_name(real.issuer)
               .public_key(real.public_key()).serial_number(real.serial_number)
               .not_valid_before(real.not_valid_before_utc).not_valid_after(real.not_valid_after_utc))
    for extension in real.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    other = ec.generate_private_key(ec.SECP384R1())
    (directory / "web.crt").write_bytes(builder.sign(other, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


def test_fast_path_only_when_current_and_every_difference_is_repaired(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    first = run_batch(tmp_path, play(ca_dir), hosts(tmp_path))
    for name in CASES:
        assert not first[name].failed and first[name].stats["changed"] > 0, first[name]
        assert not state(first, name)["current"]  # nothing there yet

    second = run_batch(tmp_path, play(ca_dir), hosts(tmp_path))
    for name in CASES:
        assert not second[name].failed and second[name].stats["changed"] == 0, second[name]
        assert state(second, name) == {**state(second, name), "current": True, "reasons": []}
        # the full path (its first step is the apt task) did not run
        assert not any("Ensure the certificate directory" in str(r) for r in second[name].results)

    forge(tmp_path / "forged")
    (tmp_path / "key_mode" / "web.key").chmod(0o644)
    with (tmp_path / "ca_file" / "ca.crt").open("a") as handle:
        handle.write("\n")
    (tmp_path / "no_key" / "web.key").unlink()
    (tmp_path / "no_cert" / "web.crt").unlink()
    shutil.rmtree(tmp_path / "no_directory")
    later = hosts(tmp_path, {"names": {"pki_cert_extra_sans": ["web.example.net", "10.9.8.7"]},
                             "expiring": {"pki_cert_valid_days": 365, "pki_cert_renew_days": 45}})
    expected = {"names": "its names differ: missing ['IP:10.9.8.7']", "forged": "it is not signed by this CA",
                "key_mode": "mode 0644 is not 0600", "expiring": "it ends within 45 days",
                "ca_file": "does not hold this CA certificate",
                # whatever cannot be read is not current, never a failure (check mode included)
                "no_key": "web.key: cannot be read", "no_cert": "web.crt: cannot be read",
                "no_directory": "no_directory: cannot be read"}
    before = {name: snapshot(tmp_path / name) for name in CASES if name != "no_directory"}

    checked = run_batch(tmp_path, play(ca_dir), later, "--check")
    assert checked["untouched"].stats["changed"] == 0 and state(checked, "untouched")["current"]
    for name, reason in expected.items():
        assert not checked[name].failed and checked[name].stats["changed"] > 0, checked[name]
        assert any(reason in text for text in state(checked, name)["reasons"]), state(checked, name)
    assert {name: snapshot(tmp_path / name) for name in before} == before  # check mode touched nothing
    assert not (tmp_path / "no_directory").exists()

    repaired = run_batch(tmp_path, play(ca_dir), later)
    for name in expected:
        assert not repaired[name].failed and repaired[name].stats["changed"] > 0, repaired[name]
    ca = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    forged = x509.load_pem_x509_certificate((tmp_path / "forged" / "web.crt").read_bytes())
    ca.public_key().verify(forged.signature, forged.tbs_certificate_bytes,  # type: ignore[call-arg,union-attr]
                           ec.ECDSA(forged.signature_hash_algorithm))  # type: ignore[arg-type]
    names = x509.load_pem_x509_certificate((tmp_path / "names" / "web.crt").read_bytes())
    assert "10.9.8.7" in str(names.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    expiring = x509.load_pem_x509_certificate((tmp_path / "expiring" / "web.crt").read_bytes())
    assert expiring.not_valid_after_utc - datetime.datetime.now(datetime.UTC) > datetime.timedelta(days=300)
    assert stat.S_IMODE((tmp_path / "key_mode" / "web.key").stat().st_mode) == 0o600
    assert (tmp_path / "ca_file" / "ca.crt").read_bytes() == (ca_dir / "ca.crt").read_bytes()

    again = run_batch(tmp_path, play(ca_dir), later)
    for name in CASES:
        assert again[name].stats["changed"] == 0 and state(again, name)["current"], again[name]

