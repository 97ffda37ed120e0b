"""The trivial baseline flow: keyed count and sum, Kafka -> Redis.

It does the least a flow of this shape can do (parse, key by customer, count,
sum, write a hash per customer), so ``crmscore bench`` can report the full
scoring flow's throughput as a ratio of it, measured on the same broker, Redis
and events in the same run.
"""

from __future__ import annotations

import bytewax.operators as op
import orjson
from bytewax.connectors.kafka import operators as kop
from bytewax.dataflow import Dataflow
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from crmscore.clients import CONSUMER_DEFAULTS, redis_client
from crmscore.settings import Settings


def customer_and_amount(value: bytes | None) -> tuple[str, float] | None:
    try:
        event = orjson.loads(value or b"")
        return event["customer_id"], float(event["amount"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def count_and_sum(state: tuple[int, float] | None, amount: float
                  ) -> tuple[tuple[int, float], tuple[int, float]]:
    count, total = state or (0, 0.0)
    new = (count + 1, total + amount)
    return new, new


class _HashSink(DynamicSink[tuple[str, tuple[int, float]]]):
    def __init__(self, settings: Settings, prefix: str) -> None:
        self._settings, self._prefix = settings, prefix

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _HashPartition:
        return _HashPartition(self._settings, self._prefix)


class _HashPartition(StatelessSinkPartition[tuple[str, tuple[int, float]]]):
    def __init__(self, settings: Settings, prefix: str) -> None:
        self._client, self._prefix = redis_client(settings), prefix

    def write_batch(self, items: list[tuple[str, tuple[int, float]]]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for key, (count, total) in dict(items).items():
            pipe.hset(self._prefix + key, mapping={"count": count, "sum": total})
        pipe.execute()


def build_baseline_flow(settings: Settings, topic: str, prefix: str) -> Dataflow:
    config = settings.kafka_client_config()
    brokers = config.pop("bootstrap.servers").split(",")
    flow = Dataflow("baseline")
    kafka = kop.input("kafka_in", flow, brokers=brokers, topics=[topic], tail=False,
                      add_config={**CONSUMER_DEFAULTS, **config})
    parsed = op.filter_map("parse", kafka.oks, lambda m: customer_and_amount(m.value))
    # (customer_id, amount)
    totals = op.stateful_map("count_sum", parsed, count_and_sum)
    # (customer_id, (count, sum))
    op.output("redis", totals, _HashSink(settings, prefix))
    return flow
