"""The dead-letter topic: every refused event, with why and where it came from.

A dead letter is JSON: ``reason`` (code, message, field), ``source`` (topic,
partition, offset: unique, so consumers can drop the at-least-once repeats a
crash causes) and ``payload`` (the original bytes, as text when they are UTF-8,
else base64). A letter must fit a Kafka message (1,000,000 bytes by default), or
the flow would fail on it at every restart: for a bigger one ``payload`` keeps only
the first 64 KiB, ``payload_truncated`` is true and ``payload_bytes`` and
``payload_sha256`` describe the whole original.

>>> from models.transaction import Rejection
>>> letter = dead_letter(Rejection("not_json", "garbage"), "crm.transactions", 0, 7, b"\\xff")
>>> orjson.loads(letter)["payload"], orjson.loads(letter)["payload_encoding"]
('/w==', 'base64')
>>> big = orjson.loads(dead_letter(Rejection("too_large", "big"), "t", 0, 8, b"x" * 2_000_000))
>>> big["payload_truncated"], len(big["payload"]), big["payload_bytes"]
(True, 65536, 2000000)
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import orjson

from models.transaction import Rejection

MAX_LETTER_BYTES = 900_000  # under the producer's 1,000,000, with room for the key
KEPT_PAYLOAD_BYTES = 64 * 1024  # even JSON-escaped 6x or base64'd, far under the limit


def dead_letter(
    rejection: Rejection, topic: str, partition: int, offset: int, payload: bytes | None
) -> bytes:
    source = {"topic": topic, "partition": partition, "offset": offset}
    letter = orjson.dumps(_letter(rejection, source, payload))
    if len(letter) <= MAX_LETTER_BYTES or payload is None:
        return letter
    return orjson.dumps({
        **_letter(rejection, source, payload[:KEPT_PAYLOAD_BYTES]),
        "payload_truncated": True,
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    })


def _letter(rejection: Rejection, source: dict[str, Any], payload: bytes | None
            ) -> dict[str, Any]:
    if payload is None:
        text, encoding = None, None
    else:
        try:
            text, encoding = payload.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            text, encoding = base64.b64encode(payload).decode("ascii"), "base64"
    return {
        "reason": rejection.as_dict(),
        "source": source,
        "payload": text,
        "payload_encoding": encoding,
        "payload_truncated": False,
    }
