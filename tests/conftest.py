"""Session fixtures: a real Kafka-protocol broker and a private real Redis.

Both are child processes on free ports (see ``crmscore.embedded``); nothing here
mocks Kafka or Redis. Tests that need a clean slate use their own topic names
and Redis key prefix (see ``unique``).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from crmscore.embedded import Server, start_broker, start_redis


@pytest.fixture(scope="session")
def broker() -> Iterator[Server]:
    server = start_broker()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Server]:
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture
def private_redis() -> Iterator[Server]:
    """A Redis of the test's own, for tests that pause, flush or restrict it."""
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: Server) -> str:
    return f"redis://{redis_server.address}/0"


@pytest.fixture
def redis_conn(redis_url: str) -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(redis_url)
    yield conn
    conn.close()


@pytest.fixture
def unique() -> str:
    """A short unique token for topic names and key prefixes of one test."""
    return uuid.uuid4().hex[:10]


@pytest.fixture(autouse=True)
def no_flow_outlives_its_test() -> Iterator[None]:
    """A failed assertion must not leave a flow process running (and eating a core)."""
    from tests.pipeline import kill_leftovers

    yield
    kill_leftovers()
