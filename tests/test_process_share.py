"""Which process of a cluster reads which Kafka partitions and writes through which sink
partition (flows/kafka_source.py ProcessShare, flows/own_sink.py), and the batching of
items bound for one key (flows/batching.py)."""

from __future__ import annotations

from typing import Any

import pytest
from bytewax.operators import StatefulBatchLogic

from crmscore.settings import Settings
from flows.batching import Unbatched, group_by_key
from flows.kafka_sink import KafkaTopicSink
from flows.kafka_source import ProcessShare
from flows.own_sink import SINK_PARTS, OwnPartitionSink
from flows.redis_sink import RedisDocSink


@pytest.mark.parametrize("processes", [1, 2, 3, 4])
def test_every_partition_of_every_topic_is_read_by_exactly_one_process(processes: int) -> None:
    parts = [f"{p}-{topic}" for topic in ("transactions", "timers") for p in range(4)]
    readers = {part: [i for i in range(processes) if ProcessShare(i, processes).reads(part)]
               for part in parts}
    assert all(len(r) == 1 for r in readers.values()), readers
    # ... and each topic is spread: no process reads every transaction partition
    for i in range(processes):
        mine = [p for p in parts if readers[p] == [i] and p.endswith("transactions")]
        assert len(mine) == len(range(i, 4, processes))


def test_a_process_outside_the_cluster_is_refused() -> None:
    with pytest.raises(ValueError, match="process 2 of 2"):
        ProcessShare(2, 2)


@pytest.mark.parametrize("processes", [1, 2, 3, 65])
@pytest.mark.parametrize("kind", ["kafka", "redis"])
def test_sink_partitions_are_listed_by_one_process_each_and_the_set_never_shrinks(
        processes: int, kind: str) -> None:
    settings = Settings.from_env({})
    sinks: list[OwnPartitionSink[Any]] = [
        KafkaTopicSink(settings, "alerts", ProcessShare(i, processes)) if kind == "kafka"
        else RedisDocSink(settings, share=ProcessShare(i, processes))
        for i in range(processes)]
    listed = [part for sink in sinks for part in sink.list_parts()]
    assert sorted(listed, key=int) == [str(i) for i in range(max(SINK_PARTS, processes))]
    # A process writes through a partition that it alone lists: its items stay with it.
    assert all(sink.own_part in sink.list_parts() for sink in sinks)


class Recorder(StatefulBatchLogic[int, int, list[int]]):
    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_batch(self, values: list[int]) -> tuple[list[int], bool]:
        self.seen += values
        return [sum(values)], StatefulBatchLogic.RETAIN

    def snapshot(self) -> list[int]:
        return list(self.seen)


def test_a_step_fed_in_batches_sees_the_items_in_order_and_snapshots_as_before() -> None:
    grouped = group_by_key([("k", 1), ("j", 9), ("k", 2), ("k", 3)])
    assert grouped == [("k", (1, 2, 3)), ("j", (9,))]
    logic = Unbatched(Recorder())
    out, discard = logic.on_batch([grouped[0][1], (4,)])
    assert (list(out), discard) == ([10], StatefulBatchLogic.RETAIN)
    assert logic.snapshot() == [1, 2, 3, 4]
    assert logic.notify_at() is None
