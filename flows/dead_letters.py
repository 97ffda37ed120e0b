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
import logging

import orjson
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import KafkaError, Message

from crmscore.clients import producer
from crmscore.settings import Settings
from models.transaction import Rejection

log = logging.getLogger(__name__)


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


class DeadLetterSink(DynamicSink[tuple[bytes | None, bytes]]):
    """Writes ``(key, dead_letter)`` items to the DLQ topic; fails loudly if Kafka does.

    ``write_batch`` returns only once every letter of the batch is acknowledged, so a
    letter is never lost: if Kafka refuses, the flow stops and, on restart, replays
    from its last snapshot (at-least-once).
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _DeadLetterPartition:
        return _DeadLetterPartition(self._settings)


class _DeadLetterPartition(StatelessSinkPartition[tuple[bytes | None, bytes]]):
    def __init__(self, settings: Settings) -> None:
        self._topic = settings.dlq_topic
        self._producer = producer(settings)
        self._failures: list[str] = []

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._failures.append(str(err))

    def write_batch(self, items: list[tuple[bytes | None, bytes]]) -> None:
        for key, value in items:
            while True:
                try:
                    self._producer.produce(
                        self._topic, value=value, key=key, on_delivery=self._on_delivery
                    )
                    break
                except BufferError:
                    self._producer.poll(0.1)
        remaining = self._producer.flush(60)
        if remaining or self._failures:
            failures, self._failures = self._failures, []
            raise RuntimeError(
                f"dead-letter topic {self._topic!r}: {remaining} letters unsent, "
                f"{len(failures)} failed ({'; '.join(failures[:3])})"
            )

    def close(self) -> None:
        self._producer.flush(10)

