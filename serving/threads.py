"""Which threads answer which gRPC calls: a few for the quick unary calls, and threads of
their own for the long-lived streams.

grpc's sync server runs every call on the one executor it is given. Two kinds of call
share the server and want opposite things:

- unary calls (GetScore, BatchGetScores...) are short and wait on Redis. Every thread
  that wakes from that wait must win the GIL back, and the more threads there are, the
  longer a waking one waits: on 2 cores, 64 GetScore calls in flight gave 1,559-1,709
  QPS with 32 threads and 2,100-3,100 with 2-4 (echo: 4,200-6,500;
  ``python -m serving.bench``);
- server streams (WatchCustomer, health Watch) live for minutes, mostly asleep, and each
  holds its thread the whole time: a few threads would be taken by a few watchers.

So :class:`CallRouter` gives the streams a pool of their own, sized for the watcher cap,
and leaves ``grpc_workers`` threads to the unary calls. A behavior marked by
:func:`long_lived` (the interceptors mark every streaming one) goes to the streams' pool.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent import futures
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def long_lived(behavior: F) -> F:
    """Mark a call behavior as one that holds its thread for long (a stream)."""
    behavior.long_lived = True  # type: ignore[attr-defined]
    return behavior


class CallRouter(futures.Executor):
    """An executor for ``grpc.server``: calls whose behavior is :func:`long_lived` run on
    ``stream_workers`` threads of their own, every other call on ``unary_workers``."""

    def __init__(self, unary_workers: int, stream_workers: int) -> None:
        self.unary = futures.ThreadPoolExecutor(unary_workers, thread_name_prefix="crmscore-grpc")
        self.streams = futures.ThreadPoolExecutor(
            stream_workers, thread_name_prefix="crmscore-stream"
        )

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        # grpc submits (context.run, *_response_in_pool, rpc_event, state, behavior, ...):
        # look for the behavior among the first arguments rather than at a fixed place.
        streaming = any(getattr(arg, "long_lived", False) for arg in args[:6])
        return (self.streams if streaming else self.unary).submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.unary.shutdown(wait, cancel_futures=cancel_futures)
        self.streams.shutdown(wait, cancel_futures=cancel_futures)
