"""bytewax's Kafka input, made never to block the worker on an empty partition.

bytewax 0.21's Kafka partitions poll with ``consumer.consume(batch_size, 0.001)``: each
empty partition holds the worker for a millisecond, every time it is polled, and bytewax
polls an empty partition again a millisecond later. The flow reads eight partitions
(four of transactions, four of wake-ups, mostly empty while it runs live): a live flow
spent a fifth of its thread asleep in those polls, with scoring waiting behind them.

Here each poll takes only what librdkafka's background fetcher has already buffered
(timeout 0). An empty poll costs microseconds; bytewax's own one-millisecond pause
after an empty batch keeps the worker from spinning. Offsets, recovery, end-of-partition
and error handling stay bytewax's: only the consumer's wait changes. Step ids are those
of ``bytewax.connectors.kafka.operators.input``, so snapshots of either resume in the
other. Relies on bytewax internals of the pinned version (pyproject.toml).
"""

from __future__ import annotations

from typing import Any

import bytewax.operators as op
from bytewax.connectors.kafka import KafkaSource
from bytewax.connectors.kafka import operators as kop
from bytewax.dataflow import Dataflow, operator
from confluent_kafka import Consumer


class _NoWaitConsumer:
    """A consumer whose ``consume`` returns at once with what is buffered."""

    def __init__(self, consumer: Consumer) -> None:
        self._consumer = consumer

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        return self._consumer.consume(num_messages, 0)

    def close(self) -> None:
        self._consumer.close()


class NoWaitKafkaSource(KafkaSource):
    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> Any:
        part = super().build_part(step_id, for_part, resume_state)
        # Duck-typed: bytewax's partition calls only consume() and close() on it.
        part._consumer = _NoWaitConsumer(part._consumer)  # type: ignore[assignment]
        return part


@operator
def kafka_input(step_id: str, flow: Dataflow, *, brokers: list[str], topics: list[str],
                tail: bool, add_config: dict[str, str]) -> kop.KafkaOpOut:
    """As ``bytewax.connectors.kafka.operators.input``, from the start of the topics."""
    source = NoWaitKafkaSource(brokers, topics, tail, add_config=add_config,
                               raise_on_errors=False)
    return op.input("kafka_input", flow, source).then(kop._kafka_error_split, "split_err")
