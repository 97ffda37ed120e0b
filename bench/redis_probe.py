"""Freshness at the flow's output: from an event's ``occurred_at`` to its score document
being published in Redis, for every customer (bench/freshness.py runs it beside the
gRPC measurement, to tell the flow's share of the latency from the serving path's).

    python -m bench.redis_probe REDIS_URL PREFIX OUT SINCE

A child process, so that its reading does not compete for the measuring process's GIL.
It subscribes to every update channel of PREFIX and, until SIGTERM, notes for the first
document carrying a new newest event, occurred at or after SINCE (epoch seconds), the
time from that event's ``occurred_at`` to now; then writes the latencies (seconds) to
OUT as JSON. The events' ``occurred_at`` is stamped just before they are produced, on
this machine. Later documents of the same event (a due instant, a rescore after a
change of the served model) are not the event's latency, and are skipped.
"""

from __future__ import annotations

import signal
import sys
import time
from datetime import datetime
from pathlib import Path

import orjson
import redis

from crmscore.doc_codec import load
from crmscore.layout import RedisLayout


def main(argv: list[str]) -> int:
    url, prefix, out, since = argv[0], argv[1], Path(argv[2]), float(argv[3])
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    pubsub = redis.Redis.from_url(url).pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe(RedisLayout(prefix).updates("*"))
    latencies = []
    newest: dict[str, str] = {}  # customer -> last_event_at of the last document counted
    while not stop:
        message = pubsub.get_message(timeout=0.2)
        if message is None:
            continue
        seen = time.time()
        doc = load(message["data"])
        event_at = doc["last_event_at"]
        if newest.get(doc["customer_id"]) == event_at:
            continue
        newest[doc["customer_id"]] = event_at
        occurred = datetime.fromisoformat(event_at)
        if occurred.timestamp() >= since:
            latencies.append(seen - occurred.timestamp())
    out.write_bytes(orjson.dumps(latencies))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
