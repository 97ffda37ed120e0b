"""bytewax's Kafka input, read through one consumer per process that never blocks.

bytewax 0.21's Kafka source gives every partition a consumer of its own, which polls with
``consumer.consume(batch_size, 0.001)``. The flow reads eight partitions (four of
transactions, four of wake-ups, mostly empty while it runs live), so:

- each empty partition held the worker for a millisecond every time bytewax polled it,
  a millisecond later: a live flow spent a fifth of its thread asleep in those polls;
- each consumer sent the broker its own fetch request every ``fetch.wait.max.ms``
  (10 ms for transactions, 100 ms for wake-ups): an idle flow kept tansu at 22-23% of a
  core, on the two cores the flow itself needs (one consumer: 11-13%; at 1,000 events/s
  38-65% against 44-71%, most of it the producers' requests).

Here one librdkafka consumer per process (:class:`SharedConsumer`) is assigned every
partition the process reads, and one fetch request covers them all. Each bytewax
partition (:class:`PartitionReader`) takes its own messages from what that consumer has
already buffered (timeout 0): an empty poll costs microseconds, and bytewax's own
one-millisecond pause after an empty batch keeps the worker from spinning. Offsets and
recovery stay bytewax's: a partition's state is the next offset to read, as with
bytewax's own source, and the step ids are those of
``bytewax.connectors.kafka.operators.input``, so snapshots of either resume in the
other. Relies on bytewax internals of the pinned version (pyproject.toml).

*Ends of partitions.* Each time the consumer has read everything a partition held,
librdkafka says so (``enable.partition.eof``); bytewax's source takes that as the end of
input, so it turns them off when a source tails. Here they are always on, and each end
comes out of :func:`kafka_input` as a :class:`PartitionEnd` (the next offset to read: the
partition's end when it was fetched); only when the source does not tail does the
partition then stop. The stream clock uses the ends to tell a partition that is caught
up from one that merely went silent with events unread (flows/watermark.py). The
broker's high watermark cannot tell: tansu reports it too low.

*Errors.* An error about a record (it has an offset: a message that cannot be read)
comes out as bytewax's ``KafkaError``, and the flow dead-letters and counts it. An
error of the client itself (a broker unreachable: no record, no offset) is logged and
dropped, as librdkafka retries by itself; a fatal one stops the flow. Passed on, it was
counted as a refused transaction (one more consumed than the topic held) and
dead-lettered naming no message.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeGuard

import bytewax.operators as op
from bytewax.connectors.kafka import KafkaError, KafkaSource, KafkaSourceMessage
from bytewax.dataflow import Dataflow, Stream, operator
from bytewax.inputs import StatefulSourcePartition
from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka import KafkaError as ConfluentError

log = logging.getLogger(__name__)


class PartitionEnd(NamedTuple):
    """A consumer read everything ``topic``'s ``partition`` held: ``offset`` is its end
    (the next offset to read) as of the fetch that found it. ``first``: the partition
    had delivered no message before (it held nothing past where this run started
    reading)."""

    topic: str
    partition: int
    offset: int
    first: bool


Message = KafkaSourceMessage[bytes | None, bytes | None]
# What a partition reads: a message, a record that could not be read, or its end.
Read = Message | KafkaError[bytes | None, bytes | None] | PartitionEnd

FETCH_MESSAGES = 10_000  # most messages taken from librdkafka's buffer at a time
# A partition's queue this long pauses its fetching (each empty reader fetches for all:
# an idle partition's reader would otherwise pull a busy one's backlog into its queue
# without end); it resumes once its reader has taken half.
QUEUE_PAUSE = 5_000


class SharedConsumer:
    """One consumer for every partition a process reads: each partition's messages wait in
    a queue of its own until its reader takes them (:meth:`take`). Thread-safe: with
    several workers in a process (``-w``) each reads some of the partitions."""

    def __init__(self, config: dict[str, Any],
                 make: Callable[[dict[str, Any]], Any] | None = None) -> None:
        self._config = config
        self._make = make
        self._consumer: Any = None  # made with the first assignment
        self._queues: dict[tuple[str, int], deque[Any]] = {}
        self._paused: set[tuple[str, int]] = set()
        self._lock = threading.Lock()

    def assign(self, topic: str, partition: int, offset: int) -> None:
        with self._lock:
            if self._consumer is None:
                self._consumer = (self._make or Consumer)(self._config)
            self._queues[topic, partition] = deque()
            self._consumer.incremental_assign([TopicPartition(topic, partition, offset)])

    def take(self, topic: str, partition: int, most: int) -> list[Any]:
        """Up to ``most`` of the partition's messages, fetching from librdkafka's buffer
        (without waiting) when none are queued."""
        with self._lock:
            key = topic, partition
            queue = self._queues[key]
            if not queue:
                self._fetch()
            taken = [queue.popleft() for _ in range(min(most, len(queue)))]
            if key in self._paused and len(queue) < QUEUE_PAUSE // 2:
                self._paused.discard(key)
                self._consumer.resume([TopicPartition(topic, partition)])
            return taken

    def release(self, topic: str, partition: int) -> None:
        """The partition's reader is done; the consumer closes with the last one."""
        with self._lock:
            self._paused.discard((topic, partition))
            if self._queues.pop((topic, partition), None) is None or self._consumer is None:
                return
            if self._queues:
                self._consumer.incremental_unassign([TopicPartition(topic, partition)])
            else:
                self._consumer.close()
                self._consumer = None

    def _fetch(self) -> None:
        assert self._consumer is not None
        grown = set()
        for msg in self._consumer.consume(FETCH_MESSAGES, 0):
            error = msg.error()
            if (error is not None and msg.offset() is None
                    and error.code() != ConfluentError._PARTITION_EOF):
                if error.fatal():  # the client's own error, not a record's
                    raise KafkaException(error)
                log.warning("Kafka consumer error (the client retries): %s", error)
                continue
            key = msg.topic() or "", msg.partition() or 0
            queue = self._queues.get(key)
            if queue is not None:  # else fetched before its partition was released
                queue.append(msg)
                grown.add(key)
        for key in grown:
            if len(self._queues[key]) >= QUEUE_PAUSE and key not in self._paused:
                self._paused.add(key)
                self._consumer.pause([TopicPartition(*key)])


class PartitionReader(StatefulSourcePartition[Read, int]):
    """One partition, read from the :class:`SharedConsumer`; its state is the next offset
    to read. Without ``tail`` it stops at the partition's end."""

    def __init__(self, consumer: SharedConsumer, topic: str, partition: int, offset: int,
                 tail: bool, batch_size: int) -> None:
        self._consumer = consumer
        self._topic, self._partition = topic, partition
        self._offset = offset
        self._tail = tail
        self._batch_size = batch_size
        self._delivered = False  # a message, in this run
        self._ended = False
        consumer.assign(topic, partition, offset)

    def next_batch(self) -> list[Read]:
        if self._ended:
            raise StopIteration()
        out: list[Read] = []
        for msg in self._consumer.take(self._topic, self._partition, self._batch_size):
            error = msg.error()
            if error is not None and error.code() == ConfluentError._PARTITION_EOF:
                out.append(PartitionEnd(self._topic, self._partition, msg.offset(),
                                        first=not self._delivered))
                self._offset = max(self._offset, msg.offset())
                if not self._tail:  # what follows is read by the next run
                    self._ended = True
                    self._consumer.release(self._topic, self._partition)
                    break
                continue
            message: Message = KafkaSourceMessage(
                key=msg.key(), value=msg.value(), topic=msg.topic(),
                headers=msg.headers() or [], latency=msg.latency(), offset=msg.offset(),
                partition=msg.partition(), timestamp=msg.timestamp(),
            )
            if error is None:
                self._delivered = True
                out.append(message)
            else:
                out.append(KafkaError(error, message))
            self._offset = msg.offset() + 1
        return out

    def snapshot(self) -> int:
        return self._offset

    def close(self) -> None:
        self._consumer.release(self._topic, self._partition)


@dataclass(frozen=True)
class ProcessShare:
    """Which partitions a process of a bytewax cluster reads: partition p of every topic
    goes to process p % processes.

    Left to bytewax, every process lists every partition and bytewax gives each, in the
    order of their names ("0-timers", "0-transactions", "1-timers", ...), to the worker
    with the fewest so far: with two topics of as many partitions each and two processes,
    one process read every transaction partition (it parsed every event and sent half
    of them to the other) and the other every timers partition. Two processes were no
    faster than one. A process listing only its share gets exactly that share.
    """

    index: int = 0
    processes: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.processes:
            raise ValueError(f"process {self.index} of {self.processes}")

    def reads(self, part: str) -> bool:
        """Whether this process reads the input partition ``part``."""
        return partition_of(part)[0] % self.processes == self.index


def partition_of(part: str) -> tuple[int, str]:
    """An input partition's (Kafka partition, topic): "3-topic" is topic's partition 3."""
    index, topic = part.split("-", 1)
    return int(index), topic


SINGLE_PROCESS = ProcessShare()


class SharedKafkaSource(KafkaSource):
    """bytewax's source (it lists the partitions), read through one
    :class:`SharedConsumer` per process.

    ``add_config`` goes to the consumer and to the admin client that lists the
    partitions, so it holds only settings both take (librdkafka warns of the others);
    ``consumer_config`` goes to the consumer only. ``add_config`` (the user's settings)
    wins.
    """

    def __init__(self, *args: Any, consumer_config: dict[str, str],
                 share: ProcessShare | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._share = share or SINGLE_PROCESS
        self._shared = SharedConsumer(self.consumer_settings(consumer_config))

    def consumer_settings(self, consumer_config: dict[str, str]) -> dict[str, Any]:
        return {
            "group.id": "BYTEWAX_IGNORED",  # offsets are in the flow's snapshots, not a group
            "enable.auto.commit": "false",
            "bootstrap.servers": ",".join(self._brokers),
            **consumer_config, **self._add_config,
            "enable.partition.eof": "true",
        }

    def list_parts(self) -> list[str]:
        """The partitions this process reads (:class:`ProcessShare`)."""
        parts = [part for part in super().list_parts() if self._share.reads(part)]
        log.info("process %d of %d reads partitions %s", self._share.index,
                 self._share.processes, ", ".join(sorted(parts)) or "none")
        return parts

    def build_part(self, step_id: str, for_part: str,  # type: ignore[override]
                   resume_state: int | None) -> PartitionReader:
        partition, topic = partition_of(for_part)
        offset = self._starting_offset if resume_state is None else resume_state
        return PartitionReader(self._shared, topic, partition, offset, self._tail,
                               self._batch_size)


@dataclass(frozen=True)
class SourceOut:
    """What :func:`kafka_input` reads: messages, errors and ends of partitions."""

    oks: Stream[Message]
    errs: Stream[KafkaError[bytes | None, bytes | None]]
    ends: Stream[PartitionEnd]


def _is_message(item: Any) -> TypeGuard[Message]:
    return isinstance(item, KafkaSourceMessage)


def _is_end(item: Any) -> TypeGuard[PartitionEnd]:
    return isinstance(item, PartitionEnd)


@operator
def kafka_input(step_id: str, flow: Dataflow, *, brokers: list[str], topics: list[str],
                tail: bool, add_config: dict[str, str], consumer_config: dict[str, str],
                share: ProcessShare = SINGLE_PROCESS) -> SourceOut:
    """As ``bytewax.connectors.kafka.operators.input``, from the start of the topics
    (settings as in :class:`SharedKafkaSource`), with the ends of partitions apart;
    ``share``: the partitions this process of a cluster reads."""
    source = SharedKafkaSource(brokers, topics, tail, add_config=add_config,
                               raise_on_errors=False, consumer_config=consumer_config,
                               share=share)
    read = op.branch("split_err", op.input("kafka_input", flow, source), _is_message)
    ends: op.BranchOut[Any, Any] = op.branch("split_ends", read.falses, _is_end)
    return SourceOut(read.trues, ends.falses, ends.trues)
