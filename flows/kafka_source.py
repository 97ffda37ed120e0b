"""bytewax's Kafka input, made never to block the worker on an empty partition.

bytewax 0.21's Kafka partitions poll with ``consumer.consume(batch_size, 0.001)``: each
empty partition holds the worker for a millisecond, every time it is polled, and bytewax
polls an empty partition again a millisecond later. The flow reads eight partitions
(four of transactions, four of wake-ups, mostly empty while it runs live): a live flow
spent a fifth of its thread asleep in those polls, with scoring waiting behind them.

Here each poll takes only what librdkafka's background fetcher has already buffered
(timeout 0). An empty poll costs microseconds; bytewax's own one-millisecond pause
after an empty batch keeps the worker from spinning. Offsets, recovery, end-of-partition
and error handling stay bytewax's: only the consumers' settings change. Each partition
has its own consumer (bytewax's), and some topics' consumers can be set apart (the
flow's wake-ups wait longer per fetch). Step ids are those
of ``bytewax.connectors.kafka.operators.input``, so snapshots of either resume in the
other. Relies on bytewax internals of the pinned version (pyproject.toml).

*Ends of partitions.* Each time a consumer has read everything its partition held,
librdkafka says so (``enable.partition.eof``); bytewax takes that as the end of input,
so it is off when a source tails. Here it is always on, and each end comes out of
:func:`kafka_input` as a :class:`PartitionEnd` (the next offset to read: the partition's
end when it was fetched) before bytewax sees it, and only when the source does not tail
does bytewax then stop the partition. The stream clock uses the ends to tell a partition
that is caught up from one that merely went silent with events unread
(flows/watermark.py). The broker's high watermark cannot tell: tansu reports it too low.

*Errors.* An error about a record (it has an offset: a message that cannot be read)
comes out as bytewax's ``KafkaError``, and the flow dead-letters and counts it. An
error of the client itself (a broker unreachable: no record, no offset) is logged and
dropped here, as librdkafka retries by itself; a fatal one stops the flow. Passed on,
it was counted as a refused transaction (one more consumed than the topic held) and
dead-lettered naming no message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeGuard, cast

import bytewax.operators as op
from bytewax.connectors.kafka import KafkaError, KafkaSource, KafkaSourceMessage
from bytewax.dataflow import Dataflow, Stream, operator
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaException
from confluent_kafka import KafkaError as ConfluentError

log = logging.getLogger(__name__)


class PartitionEnd(NamedTuple):
    """A consumer read everything ``topic``'s ``partition`` held: ``offset`` is its end
    (the next offset to read) as of the fetch that found it. ``first``: the consumer
    had delivered no message before (the partition held nothing past where this run
    started reading)."""

    topic: str
    partition: int
    offset: int
    first: bool


class _EndError:
    """The error of an :class:`_EndMessage`: not librdkafka's end-of-partition code, so
    that bytewax passes it on as a ``KafkaError`` instead of stopping the partition."""

    def __init__(self, end: PartitionEnd) -> None:
        self.end = end

    def code(self) -> int:
        return 0  # RD_KAFKA_RESP_ERR_NO_ERROR: never librdkafka's _PARTITION_EOF


class _EndMessage:
    """librdkafka's end-of-partition event, in the shape bytewax reads messages in. Its
    offset is the last one read, from which bytewax resumes at the next: the end."""

    def __init__(self, eof: Any, first: bool) -> None:
        self._error = _EndError(PartitionEnd(eof.topic(), eof.partition(), eof.offset(), first))

    def error(self) -> _EndError:
        return self._error

    def offset(self) -> int:
        return self._error.end.offset - 1

    def partition(self) -> int:
        return self._error.end.partition

    def topic(self) -> str:
        return self._error.end.topic

    def key(self) -> None:
        return None

    def value(self) -> None:
        return None

    def headers(self) -> None:
        return None

    def latency(self) -> None:
        return None

    def timestamp(self) -> tuple[int, int]:
        return TIMESTAMP_NOT_AVAILABLE, 0


class _NoWaitConsumer:
    """A consumer whose ``consume`` returns at once with what is buffered, each end of
    partition preceded by an :class:`_EndMessage` (and dropped when the source tails),
    errors of the client itself logged and dropped (see *Errors* above)."""

    def __init__(self, consumer: Consumer, tail: bool) -> None:
        self._consumer = consumer
        self._tail = tail
        self._delivered = False  # a message, in this run

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        out: list[Any] = []
        for msg in self._consumer.consume(num_messages, 0):
            error = msg.error()
            if error is None:
                self._delivered = True
            elif error.code() == ConfluentError._PARTITION_EOF:
                out.append(_EndMessage(msg, first=not self._delivered))
                if self._tail:
                    continue
            elif msg.offset() is None:  # the client's error, not a record's
                if error.fatal():
                    raise KafkaException(error)
                log.warning("Kafka consumer error (the client retries): %s", error)
                continue
            out.append(msg)
        return out

    def close(self) -> None:
        self._consumer.close()


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


class NoWaitKafkaSource(KafkaSource):
    """bytewax's source with consumers that never wait (:class:`_NoWaitConsumer`).

    ``add_config`` goes to the consumers and to the admin client that lists the
    partitions, so it holds only settings both take (librdkafka warns of the others);
    ``consumer_config`` goes to every consumer, ``topic_config`` to those of some topics.
    ``add_config`` (the user's settings) wins over both.
    """

    def __init__(self, *args: Any, consumer_config: dict[str, str],
                 topic_config: dict[str, dict[str, str]],
                 share: ProcessShare | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._consumer_config = consumer_config
        self._topic_config = topic_config
        self._share = share or SINGLE_PROCESS

    def list_parts(self) -> list[str]:
        """The partitions this process reads (:class:`ProcessShare`)."""
        parts = [part for part in super().list_parts() if self._share.reads(part)]
        log.info("process %d of %d reads partitions %s", self._share.index,
                 self._share.processes, ", ".join(sorted(parts)) or "none")
        return parts

    def config_for(self, for_part: str) -> dict[str, Any]:
        """The settings of a partition's consumer."""
        topic = partition_of(for_part)[1]
        return {**self._consumer_config, **self._topic_config.get(topic, {}),
                **self._add_config, "enable.partition.eof": "true"}

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> Any:
        # bytewax builds every partition's consumer from ``_add_config``: swap in this
        # partition's settings for the duration of the call.
        shared = self._add_config
        self._add_config = self.config_for(for_part)
        try:
            part = super().build_part(step_id, for_part, resume_state)
        finally:
            self._add_config = shared
        # Duck-typed: bytewax's partition calls only consume() and close() on it.
        part._consumer = _NoWaitConsumer(part._consumer, self._tail)  # type: ignore[assignment]
        return part


@dataclass(frozen=True)
class SourceOut:
    """What :func:`kafka_input` reads: messages, errors and ends of partitions."""

    oks: Stream[KafkaSourceMessage[bytes | None, bytes | None]]
    errs: Stream[KafkaError[bytes | None, bytes | None]]
    ends: Stream[PartitionEnd]


def _is_message(item: Any) -> TypeGuard[KafkaSourceMessage[bytes | None, bytes | None]]:
    return isinstance(item, KafkaSourceMessage)


def _is_end(err: Any) -> bool:
    return isinstance(err.err, _EndError)


def _end_of(err: KafkaError[bytes | None, bytes | None]) -> PartitionEnd:
    return err.err.end  # type: ignore[attr-defined,no-any-return]


@operator
def kafka_input(step_id: str, flow: Dataflow, *, brokers: list[str], topics: list[str],
                tail: bool, add_config: dict[str, str], consumer_config: dict[str, str],
                topic_config: dict[str, dict[str, str]] | None = None,
                share: ProcessShare = SINGLE_PROCESS) -> SourceOut:
    """As ``bytewax.connectors.kafka.operators.input``, from the start of the topics
    (settings as in :class:`NoWaitKafkaSource`), with the ends of partitions apart;
    ``share``: the partitions this process of a cluster reads."""
    source = NoWaitKafkaSource(brokers, topics, tail, add_config=add_config,
                               raise_on_errors=False, consumer_config=consumer_config,
                               topic_config=topic_config or {}, share=share)
    read = op.branch("split_err", op.input("kafka_input", flow, source), _is_message)
    errs = cast(Stream[KafkaError[bytes | None, bytes | None]], read.falses)
    errors: op.BranchOut[Any, Any] = op.branch("split_ends", errs, _is_end)
    return SourceOut(read.trues, errors.falses, op.map("end_of", errors.trues, _end_of))
