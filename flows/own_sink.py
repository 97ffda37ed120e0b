"""Sinks whose items stay in the process that emits them, and that wait for their writes
once an epoch rather than once a batch.

Each process of a cluster writes what it emits itself: its items go to a sink partition
that only it lists (:class:`flows.kafka_source.ProcessShare`), so they never cross to
another process (when the Kafka sink had a single partition, every alert and wake-up of
the other process crossed: 38,588 items in a 71,000-event replay).

A partitioned sink is also snapshotted: bytewax snapshots every sink partition written in
an epoch before it commits the epoch. So a partition's ``write_batch`` may send its
writes and return, and its ``snapshot`` wait for them all: an epoch is committed only once
every write of it is acknowledged (flows/kafka_sink.py, flows/redis_sink.py).
"""

from __future__ import annotations

from typing import TypeVar

import bytewax.operators as op
from bytewax.dataflow import Stream
from bytewax.outputs import FixedPartitionedSink

from flows.kafka_source import SINGLE_PROCESS, ProcessShare

X = TypeVar("X")

# Sink partitions "0".."63", partition i listed by process i % processes. bytewax stops a
# flow whose recovery store holds a partition no process lists, so the set stays the
# same whatever the process count (a cluster of more processes lists one each).
SINK_PARTS = 64


class OwnPartitionSink(FixedPartitionedSink[X, None]):
    """A sink partitioned by process: each process writes through the partition named by
    its index (:func:`output_here`)."""

    def __init__(self, share: ProcessShare = SINGLE_PROCESS) -> None:
        self._share = share

    @property
    def own_part(self) -> str:
        """The partition this process writes through: its index."""
        return str(self._share.index)

    def list_parts(self) -> list[str]:
        parts = max(SINK_PARTS, self._share.processes)
        return [str(i) for i in range(parts) if i % self._share.processes == self._share.index]


def output_here(step_id: str, stream: Stream[X], sink: OwnPartitionSink[X]) -> None:
    """Write ``stream`` to ``sink`` through this process's own partition (a partitioned
    sink takes ``(routing key, item)``)."""
    part = sink.own_part
    op.output(step_id, op.map(f"{step_id}_route", stream, lambda x: (part, x)), sink)
