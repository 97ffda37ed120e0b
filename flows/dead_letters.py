"""The dead-letter topic: every refused event, with why and where it came from.

A dead letter is JSON: ``reason`` (code, message, field), ``source`` (topic,
partition, offset: unique, so consumers can drop the at-least-once repeats a
crash causes) and ``payload`` (the original bytes, as text when they are UTF-8,
else base64).

>>> from models.transaction import Rejection
>>> letter = dead_letter(Rejection("not_json", "garbage"), "crm.transactions", 0, 7, b"\\xff")
>>> orjson.loads(letter)["payload"], orjson.loads(letter)["payload_encoding"]
('/w==', 'base64')
"""

from __future__ import annotations

import base64

import orjson

from models.transaction import Rejection


def dead_letter(
    rejection: Rejection, topic: str, partition: int, offset: int, payload: bytes | None
) -> bytes:
    if payload is None:
        text, encoding = None, None
    else:
        try:
            text, encoding = payload.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            text, encoding = base64.b64encode(payload).decode("ascii"), "base64"
    return orjson.dumps(
        {
            "reason": rejection.as_dict(),
            "source": {"topic": topic, "partition": partition, "offset": offset},
            "payload": text,
            "payload_encoding": encoding,
        }
    )
