"""A client that keeps one open connection to one Redis instance, as a stale pool entry would.

Copied to a member and run there by the tests (standard library only; the RESP client of
redis_writer.py). It connects to --target (host:port, TLS) as --user, logs ``connected`` once AUTH and
PING are answered, then waits for the go file. When it appears it sends ``SADD <key> <member>-queued`` on
the same connection (sent while the instance hangs, it waits in the socket) and waits up to --timeout
seconds for the answer; --after seconds after that answer it sends ``SADD <key> <member>-after``. Each
outcome is one line: ``queued|after reply <integer>`` (the instance acknowledged the write), ``... error
<message>`` (an error reply such as NOREPLICAS or READONLY) or ``... failed <exception>`` (no answer:
timeout or closed connection).
"""

from __future__ import annotations

import argparse
import os
import ssl
import time

from redis_writer import Connection, ReplyError


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True, help="host:port")
    parser.add_argument("--cafile", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--member", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--go-file", required=True)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--after", type=float, default=1.0)
    args = parser.parse_args()
    host, port = args.target.rsplit(":", 1)
    conn = Connection(host, int(port), ssl.create_default_context(cafile=args.cafile), args.user,
                      os.environ["REDIS_PASSWORD"])
    with open(args.log, "a", encoding="utf-8") as log:
        log.write(f"connected {conn.call('PING')}\n")
        log.flush()
        deadline = time.monotonic() + 600
        while not os.path.exists(args.go_file) and time.monotonic() < deadline:
            time.sleep(0.05)
        conn.sock.settimeout(args.timeout)
        for phase in ("queued", "after"):
            try:
                outcome = f"reply {conn.call('SADD', args.key, f'{args.member}-{phase}')}"
            except ReplyError as exc:
                outcome = f"error {exc}"
            except (OSError, ConnectionError) as exc:
                outcome = f"failed {exc!r}"
            log.write(f"{phase} {outcome} {time.time():.3f}\n")
            log.flush()
            if outcome.startswith("failed"):
                break
            time.sleep(args.after)
        conn.close()


if __name__ == "__main__":
    main()
