#!/usr/bin/env python3
"""An S3-compatible object store for a Molecule scenario: moto's server behind nginx's TLS, on the controller.

pgBackRest's object-store repository (repo2, pgbackrest_s3_*) is proven against it. No real S3 is reachable
here: moto emulates the S3 API (signed requests, multipart uploads, listings) in memory, and nginx terminates
TLS in front of it (moto's own TLS, werkzeug's, closes each connection without a TLS close_notify, which
pgBackRest reports as "TLS error ... unexpected eof while reading"). The containers reach it at
host.containers.internal (podman's name for the host in every container), so the certificate names that host.

  s3_emulator.py start --network gm-mol-data --dir <dir> --port 19443
  s3_emulator.py stop --port 19443

start writes into <dir>: ca.crt (to copy to the hosts), endpoint, port, bucket, key and secret (generated), and
creates the bucket. Both processes stop on their own after --lifetime seconds (default 2 h) if nobody stops them.
Moto's packages live in ~/.cache/grandmodel-ops/s3-emulator, a virtualenv of their own (moto's botocore needs
python-dateutil < 3, the project's kubernetes client >= 3), made once per machine and reused while the pins are
the same.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

# Made once per machine and reused by every clone while the pins are the same (a cache: a missing or different one
# is made again from PyPI).
VENV = Path.home() / ".cache" / "grandmodel-ops" / "s3-emulator"
# The processes' ids, by port: outside the scenario's directory, which molecule destroy removes while they run.
RUN = Path.home() / ".cache" / "grandmodel-ops" / "s3-emulator-run"
PINS = ["moto==5.2.6", "flask==3.1.3", "flask-cors==6.0.5"]
HOST_NAME = "host.containers.internal"
BUCKET = "grandmodel-backups"


def log(message: str) -> None:
    print(f"[s3-emulator] {message}", flush=True)


def run(argv: list[str], **kwargs: object) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    if done.returncode != 0:
        raise SystemExit(f"[s3-emulator] {' '.join(argv[:4])} ... failed ({done.returncode}): "
                         f"{(done.stderr or done.stdout)[-800:]}")
    return str(done.stdout)


def ensure_venv() -> None:
    marker = VENV / "pins.json"
    if marker.exists() and json.loads(marker.read_text()) == PINS:
        return
    log(f"making {VENV} with {', '.join(PINS)}")
    run([sys.executable, "-m", "venv", "--clear", str(VENV)])
    run([str(VENV / "bin/pip"), "install", "-q", "--disable-pip-version-check", *PINS])
    marker.write_text(json.dumps(PINS))


def gateway(network: str) -> str:
    address = run(["podman", "network", "inspect", network, "--format",
                   "{{range .Subnets}}{{.Gateway}} {{end}}"]).split()
    if not address:
        raise SystemExit(f"[s3-emulator] podman network {network} has no gateway address")
    return address[0]


def certificates(where: Path) -> None:
    """A CA of the emulator's own (a real object store's CA is not the project's) and a server certificate."""
    if not (where / "ca.crt").exists():
        run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-days", "7", "-subj", "/CN=GrandModel Ops S3 emulator CA", "-keyout", str(where / "ca.key"),
             "-out", str(where / "ca.crt")])
    if not (where / "server.crt").exists():
        run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-subj", f"/CN={HOST_NAME}", "-keyout", str(where / "server.key"), "-out", str(where / "server.csr")])
        (where / "server.ext").write_text(f"subjectAltName=DNS:{HOST_NAME}\nextendedKeyUsage=serverAuth\n")
        run(["openssl", "x509", "-req", "-in", str(where / "server.csr"), "-CA", str(where / "ca.crt"),
             "-CAkey", str(where / "ca.key"), "-CAcreateserial", "-days", "7", "-extfile", str(where / "server.ext"),
             "-out", str(where / "server.crt")])
    for name in ("ca.key", "server.key"):
        (where / name).chmod(0o600)


def nginx_conf(where: Path, listen: str, backend: int) -> Path:
    (where / "nginx").mkdir(exist_ok=True)
    conf = where / "nginx.conf"
    conf.write_text(f"""# Written by scripts/s3_emulator.py: TLS in front of moto's server.
pid {where}/nginx.pid;
error_log {where}/nginx-error.log;
events {{}}
http {{
  access_log {where}/nginx-access.log;
  client_body_temp_path {where}/nginx/body;
  proxy_temp_path {where}/nginx/proxy;
  fastcgi_temp_path {where}/nginx/fastcgi;
  uwsgi_temp_path {where}/nginx/uwsgi;
  scgi_temp_path {where}/nginx/scgi;
  server {{
    listen {listen} ssl;
    ssl_certificate {where}/server.crt;
    ssl_certificate_key {where}/server.key;
    client_max_body_size 0;
    location / {{
      proxy_pass http://127.0.0.1:{backend};
      proxy_http_version 1.1;
      # Moto reads a Host with a dot as <bucket>.<endpoint> (virtual-hosted addressing): an address keeps the
      # path style pgBackRest uses (repo2-s3-uri-style=path). Moto does not check the request's signature.
      proxy_set_header Host 127.0.0.1:{backend};
      proxy_request_buffering off;
      proxy_buffering off;
    }}
  }}
}}
""")
    return conf


def spawn(where: Path, port: int, name: str, argv: list[str], lifetime: int) -> None:
    with open(where / f"{name}.log", "ab") as out:
        proc = subprocess.Popen(["timeout", str(lifetime), *argv], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    RUN.mkdir(parents=True, exist_ok=True)
    (RUN / f"{port}-{name}.pid").write_text(str(proc.pid))


def stop(port: int) -> None:
    for name in ("tls", "moto"):
        pid_file = RUN / f"{port}-{name}.pid"
        if not pid_file.exists():
            continue
        pid = int(pid_file.read_text())
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                try:
                    os.killpg(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                continue
            break
        pid_file.unlink()
        log(f"stopped {name} (process group {pid})")


def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError as error:
            if time.monotonic() > deadline:
                raise SystemExit(f"[s3-emulator] {url} did not answer in {timeout} s: {error}") from error
            time.sleep(0.2)


def start(args: argparse.Namespace) -> None:
    try:
        serve(args)
    except BaseException:
        stop(args.port)
        raise


def listening(address: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex((address, port)) == 0


def serve(args: argparse.Namespace) -> None:
    where = Path(args.dir).resolve()
    where.mkdir(parents=True, exist_ok=True)
    stop(args.port)
    ensure_venv()
    address = gateway(args.network)
    for where_to, port in ((address, args.port), ("127.0.0.1", args.port + 1)):
        if listening(where_to, port):
            raise SystemExit(f"[s3-emulator] something else listens on {where_to}:{port} (ss -ltnp): stop it or "
                             "choose another --port")
    certificates(where)
    for name, value in (("key", "GM" + secrets.token_hex(8).upper()), ("secret", secrets.token_urlsafe(30))):
        if not (where / name).exists():
            (where / name).write_text(value)
            (where / name).chmod(0o600)
    (where / "endpoint").write_text(HOST_NAME)
    (where / "port").write_text(str(args.port))
    (where / "bucket").write_text(BUCKET)
    backend = args.port + 1
    moto = [str(VENV / "bin/moto_server"), "-H", "127.0.0.1", "-p", str(backend)]
    spawn(where, args.port, "moto", moto, args.lifetime)
    wait_http(f"http://127.0.0.1:{backend}/", 30)
    conf = nginx_conf(where, f"{address}:{args.port}", backend)
    spawn(where, args.port, "tls", ["nginx", "-g", "daemon off;", "-c", str(conf), "-p", str(where)], args.lifetime)
    # The bucket, made with a signed request (moto keeps unsigned ones apart) straight to moto.
    make_bucket = (
        "import boto3, sys; "
        "s3 = boto3.client('s3', endpoint_url=sys.argv[1], aws_access_key_id=sys.argv[2], "
        "aws_secret_access_key=sys.argv[3], region_name='us-east-1'); "
        "s3.create_bucket(Bucket=sys.argv[4])")
    run([str(VENV / "bin/python"), "-c", make_bucket, f"http://127.0.0.1:{backend}",
         (where / "key").read_text(), (where / "secret").read_text(), BUCKET], timeout=60)
    # And the TLS front answers for the containers' name of the host.
    run(["curl", "-s", "-o", "/dev/null", "--retry", "20", "--retry-delay", "1", "--retry-connrefused",
         "--cacert", str(where / "ca.crt"), "--resolve", f"{HOST_NAME}:{args.port}:{address}",
         f"https://{HOST_NAME}:{args.port}/"], timeout=60)
    log(f"S3 at https://{HOST_NAME}:{args.port} ({address}) for the network {args.network}, bucket {BUCKET}; "
        f"files in {where}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--dir", help="where the certificates, keys and logs are kept (start)")
    parser.add_argument("--network", help="the podman network whose containers use it (start)")
    parser.add_argument("--port", type=int, default=19443, help="TLS port on the network's gateway")
    parser.add_argument("--lifetime", type=int, default=7200, help="seconds before both processes stop")
    args = parser.parse_args()
    if args.action == "start":
        if not args.network or not args.dir:
            parser.error("start needs --network and --dir")
        start(args)
    else:
        stop(args.port)


if __name__ == "__main__":
    main()
