"""A Sentinel-aware Redis client under a steady write load, logging every acknowledged write.

Copied to a member and run there by the tests with the host's python3 (standard library only: a small
RESP client over TLS). It does what a Sentinel-aware client library does (redis-py's
``redis.sentinel.Sentinel``, Jedis' ``JedisSentinelPool``, Lettuce, go-redis' ``FailoverClient``): ask the
Sentinels in turn for the master's address (``SENTINEL get-master-addr-by-name``), connect, and on any
error (connection refused, timeout, READONLY from an instance that is a replica by now) ask the Sentinels
again. The application's ACL user may not run ROLE or INFO (``-@dangerous``, unchanged): a write answered
with READONLY is how it learns it reached a replica. Each write adds the next id to a set; once the master
acknowledges it, ``WAIT 1 100`` asks how many replicas hold it, and ``<id> <unix time> <replicas>`` is
appended to the log: the client's own record of what Redis promised. Stops after --seconds or as soon as
the stop file exists.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import ssl
import time


class ReplyError(Exception):
    """An error reply from Redis (-ERR, -NOPERM, -READONLY, ...)."""


class Connection:
    def __init__(self, host: str, port: int, context: ssl.SSLContext, user: str, password: str) -> None:
        raw = socket.create_connection((host, port), timeout=1.0)
        self.sock = context.wrap_socket(raw, server_hostname=host)
        self.sock.settimeout(1.0)
        self.buffer = b""
        self.call("AUTH", user, password)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def call(self, *args: object) -> object:
        parts = [str(a).encode() for a in args]
        self.sock.sendall(b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts))
        return self._reply()

    def _fill(self, size: int) -> None:
        while len(self.buffer) < size:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            self.buffer += chunk

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            self._fill(len(self.buffer) + 1)
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def _reply(self) -> object:
        line = self._line()
        kind, rest = line[:1], line[1:].decode()
        if kind == b"+":
            return rest
        if kind == b"-":
            raise ReplyError(rest)
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            self._fill(size + 2)
            data, self.buffer = self.buffer[:size], self.buffer[size + 2:]
            return data.decode()
        if kind == b"*":
            size = int(rest)
            return None if size < 0 else [self._reply() for _ in range(size)]
        raise ConnectionError(f"unexpected reply {line[:40]!r}")


def master_address(sentinels: list[tuple[str, int]], name: str, context: ssl.SSLContext, user: str,
                   password: str) -> tuple[str, int] | None:
    for host, port in sentinels:
        try:
            conn = Connection(host, port, context, user, password)
            try:
                reply = conn.call("SENTINEL", "get-master-addr-by-name", name)
            finally:
                conn.close()
            if isinstance(reply, list) and len(reply) == 2:
                return str(reply[0]), int(str(reply[1]))
        except (OSError, ReplyError, ConnectionError, ValueError):
            continue
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sentinel", action="append", required=True, help="host:port, repeated")
    parser.add_argument("--master-name", default="grandmodel")
    parser.add_argument("--cafile", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--key", default="sentinel_probe")
    parser.add_argument("--log", required=True)
    parser.add_argument("--stop-file", required=True)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--first-id", type=int, default=1)
    args = parser.parse_args()
    password = os.environ["REDIS_PASSWORD"]
    context = ssl.create_default_context(cafile=args.cafile)
    sentinels = [(s.rsplit(":", 1)[0], int(s.rsplit(":", 1)[1])) for s in args.sentinel]
    deadline = time.monotonic() + args.seconds
    next_id = args.first_id
    master: Connection | None = None
    with open(args.log, "a", encoding="utf-8") as log:
        while time.monotonic() < deadline and not os.path.exists(args.stop_file):
            try:
                if master is None:
                    address = master_address(sentinels, args.master_name, context, args.user, password)
                    if address is None:
                        raise ConnectionError("no Sentinel answered")
                    master = Connection(address[0], address[1], context, args.user, password)
                item = next_id
                next_id += 1
                master.call("SADD", args.key, item)
                replicas = master.call("WAIT", 1, 100)
                log.write(f"{item} {time.time():.3f} {replicas}\n")
                log.flush()
                time.sleep(0.02)
            except (OSError, ReplyError, ConnectionError, ValueError):
                if master is not None:
                    master.close()
                master = None
                time.sleep(0.1)


if __name__ == "__main__":
    main()
