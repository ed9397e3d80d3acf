"""A steady write load through the endpoint's read-write port, logging every acknowledged commit.

Copied to a member and run there by the tests (python3 + psycopg2 of the host). Each transaction inserts
the next id; only after COMMIT returns is `<id> <unix time>` appended to the log, so the log is the
client's own record of what the database promised to keep. A failed statement or connection is retried on
a new connection with the next id (an unacknowledged id may or may not exist: it is never counted).
Stops after --seconds or as soon as the stop file exists.
"""

from __future__ import annotations

import argparse
import os
import time

import psycopg2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--log", required=True)
    parser.add_argument("--stop-file", required=True)
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--first-id", type=int, default=1)
    args = parser.parse_args()
    deadline = time.monotonic() + args.seconds
    next_id = args.first_id
    conn = None
    with open(args.log, "a", encoding="utf-8") as log:
        while time.monotonic() < deadline and not os.path.exists(args.stop_file):
            try:
                if conn is None:
                    conn = psycopg2.connect(host="127.0.0.1", port=args.port, user="postgres",
                                            dbname="postgres", connect_timeout=1,
                                            password=os.environ["PGPASSWORD"])
                row_id = next_id
                next_id += 1
                with conn.cursor() as cur:
                    cur.execute("INSERT INTO ha_probe (id) VALUES (%s)", (row_id,))
                conn.commit()
                log.write(f"{row_id} {time.time():.3f}\n")
                log.flush()
                time.sleep(0.02)
            except psycopg2.Error:
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.1)


if __name__ == "__main__":
    main()
