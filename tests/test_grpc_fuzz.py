"""Hostile gRPC input over real TCP against a real server and the real Redis: random and
oversized requests, undecodable bytes, bad and missing API keys.

Each bad call gets the status the API documents (or, for what grpc itself refuses before
the servicer runs, grpc's own documented status), never OK for a bad key and never
UNKNOWN or INTERNAL; bytes that are not the method's message get INVALID_ARGUMENT after
the key check, without a log line. The server keeps serving throughout and no API key
reaches its logs.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import redis
from google.protobuf.message import DecodeError
from hypothesis import event, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from crmscore.v1 import scoring_pb2
from crmscore.v1.scoring_pb2 import BatchGetScoresRequest, GetScoreRequest
from serving.auth import new_key
from serving.client import ScoringClient
from serving.server import MAX_BATCH, MAX_ID_LENGTH
from tests.test_serving import (
    ADMIN_KEY,
    READER_KEY,
    Running,
    score_doc,
    serving_settings,
    start,
    wait_for,
    write_score,
)

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
SCORING = scoring_pb2.DESCRIPTOR.services_by_name["Scoring"]
UNARY = [m for m in SCORING.methods if not m.server_streaming]  # every method but Watch
UNDECODABLE = "the request is not a valid message of this method's type"

# Customers with a score: odd but valid ids (control characters, astral code points,
# exactly 128 characters, glob and key-separator characters).
SEEDED = ["plain", "ünï-çødé 日本", "tab\there\x00nul\x7f", "\n", " ", "😀" * MAX_ID_LENGTH,
          "x" * MAX_ID_LENGTH, "*", "a:b:score:c", "\u200b\ufeff", "\U0010fffd"]

ids = st.one_of(
    st.sampled_from(SEEDED),
    st.text(max_size=12),  # any unicode except surrogates, control characters included
    st.text(min_size=MAX_ID_LENGTH - 8, max_size=MAX_ID_LENGTH + 8),
    st.text(min_size=MAX_ID_LENGTH + 1, max_size=400),
)
batches = st.one_of(
    st.lists(ids, max_size=30),
    st.builds(  # around the 1,000 limit, a few drawn ids first or last
        lambda n, extra, first: extra + [f"bulk-{k}" for k in range(n)] if first
        else [f"bulk-{k}" for k in range(n)] + extra,
        st.integers(MAX_BATCH - 10, MAX_BATCH + 100), st.lists(ids, max_size=3), st.booleans(),
    ),
)
FUZZ = settings(max_examples=150, deadline=None)


# -- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(redis_url: str) -> Iterator[Running]:
    running = start(serving_settings(redis_url, f"fz-{uuid.uuid4().hex[:8]}:"))
    conn = redis.Redis.from_url(redis_url)
    for customer_id in SEEDED:
        write_score(conn, running.layout, score_doc(customer_id))
    conn.close()
    yield running
    running.server.stop(0).wait(5)


@pytest.fixture(scope="module")
def reader(api: Running) -> Iterator[ScoringClient]:
    with api.client(READER_KEY) as client:
        yield client


@pytest.fixture(scope="module")
def channel(api: Running) -> Iterator[grpc.Channel]:
    """A channel of raw bytes: no (de)serializers, no key unless a call sends one."""
    with grpc.insecure_channel(api.address) as ch:
        yield ch


def outcome(call: Any, *args: Any, **kwargs: Any) -> tuple[grpc.StatusCode, str, Any]:
    """(status, details, response) of one call; never raises an RpcError."""
    try:
        return OK, "", call(*args, **kwargs)
    except grpc.RpcError as exc:
        return exc.code(), exc.details(), None


def raw(channel: grpc.Channel, method: Any) -> Any:
    return channel.unary_unary(f"/{SCORING.full_name}/{method.name}")


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def expected_for_id(customer_id: str, field: str = "customer_id") -> str | None:
    """The INVALID_ARGUMENT details ``customer_id`` deserves, or None when it is valid."""
    if not customer_id:
        return f"{field} is empty"
    if len(customer_id) > MAX_ID_LENGTH:
        return f"{field} is {len(customer_id)} characters long; at most {MAX_ID_LENGTH}"
    return None


def assert_alive(client: ScoringClient) -> None:
    """The server still answers health SERVING and a valid GetScore, nothing left in flight."""
    wait_for(lambda: client.health() == "SERVING", what="SERVING")
    assert client.health(SCORING.full_name) == "SERVING"
    assert client.get_score("plain").customer_id == "plain"
    wait_for(lambda: REGISTRY.get_sample_value(
        "crmscore_grpc_in_flight", {"method": "GetScore"}) == 0, what="no call in flight")


# -- random but well-formed requests -------------------------------------------------------


@FUZZ
@given(customer_id=ids)
def test_get_score_of_any_id_is_ok_not_found_or_invalid(reader, customer_id) -> None:
    code, details, score = outcome(reader.get_score, customer_id)
    event(code.name)
    invalid = expected_for_id(customer_id)
    if invalid is not None:
        assert (code, details[: len(invalid)]) == (INVALID, invalid)
    elif customer_id in SEEDED:
        assert code == OK and score.customer_id == customer_id
    else:
        assert (code, details) == (grpc.StatusCode.NOT_FOUND,
                                   f"customer {customer_id!r} has no score")


@FUZZ
@given(customer_ids=batches)
def test_batch_of_any_ids_is_ok_or_says_what_is_wrong(reader, customer_ids) -> None:
    code, details, response = outcome(reader.batch_get_scores, customer_ids)
    event(code.name)
    first_bad = next(((n, e) for n, c in enumerate(customer_ids)
                      if (e := expected_for_id(c, f"customer_ids[{n}]")) is not None), None)
    if not customer_ids:
        assert (code, details) == (INVALID, "customer_ids is empty: ask for 1 to 1000 customers")
    elif len(customer_ids) > MAX_BATCH:
        assert code == INVALID
        assert details.startswith(f"customer_ids has {len(customer_ids)} ids; at most 1000")
    elif first_bad is not None:
        assert code == INVALID and details.startswith(first_bad[1])
    else:
        assert code == OK, details
        asked = list(dict.fromkeys(customer_ids))
        assert [s.customer_id for s in response.scores] == [c for c in asked if c in SEEDED]
        assert list(response.missing_ids) == [c for c in asked if c not in SEEDED]


# -- raw bytes -----------------------------------------------------------------------------


def near_valid(customer_id: str, cut: int, flip: int, value: int) -> bytes:
    """A valid GetScoreRequest's bytes, truncated and with one byte replaced."""
    body = bytearray(GetScoreRequest(customer_id=customer_id).SerializeToString())
    if body:
        body[flip % len(body)] = value
    return bytes(body[: max(0, len(body) - cut)])


bodies = st.one_of(
    st.binary(max_size=300),
    st.builds(near_valid, st.text(max_size=20), st.integers(0, 3), st.integers(0, 40),
              st.integers(0, 255)),
)


@pytest.mark.parametrize("method", UNARY, ids=lambda m: m.name)
@FUZZ
@given(body=bodies)
def test_random_bytes_are_decoded_or_refused_as_invalid(api, channel, method, body) -> None:
    """Bytes that do not decode as the request type get INVALID_ARGUMENT (after the key
    check: serving/interceptors.py); bytes that do are answered exactly as the same
    message sent normally, never UNKNOWN or INTERNAL."""
    call = raw(channel, method)
    code, details, _ = outcome(call, body, metadata=bearer(ADMIN_KEY), timeout=5)
    try:
        request = getattr(scoring_pb2, method.input_type.name).FromString(body)
    except DecodeError:
        event("undecodable")
        assert (code, details) == (INVALID, UNDECODABLE)
        return
    event(f"decoded: {code.name}")
    assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), details
    same_code, same_details, _ = outcome(
        call, request.SerializeToString(), metadata=bearer(ADMIN_KEY), timeout=5)
    assert (code, details) == (same_code, same_details)


@pytest.mark.parametrize(("body", "code", "details"), [
    (b"", INVALID, "customer_id is empty"),  # every field unset
    (b"\xf8\x06\x01", INVALID, "customer_id is empty"),  # only an unknown field (111)
    (b"\x0a\x03abc", grpc.StatusCode.NOT_FOUND, "customer 'abc' has no score"),
    (b"\x0a\x05plain", OK, ""),
    (b"\x0a\x05ab", INVALID, UNDECODABLE),  # truncated
    (b"\x0a\x02\xff\xfe", INVALID, UNDECODABLE),  # string not UTF-8
    (b"\x0b", INVALID, UNDECODABLE),  # group start, never ended
    (b"\xff" * 12, INVALID, UNDECODABLE),  # endless varint
])
def test_get_score_raw_bytes(channel, reader, body, code, details) -> None:
    call = raw(channel, SCORING.methods_by_name["GetScore"])
    assert outcome(call, body, metadata=bearer(READER_KEY), timeout=5)[:2] == (code, details)
    assert outcome(call, body, timeout=5)[0] == grpc.StatusCode.UNAUTHENTICATED  # key first
    assert_alive(reader)


def test_watch_refuses_bad_bytes_and_bad_ids(channel, reader) -> None:
    path = f"/{SCORING.full_name}/WatchCustomer"
    watch = channel.unary_stream(path)
    for body, code in ((b"\x0a\x02\xff\xfe", INVALID), (b"", INVALID),
                       (GetScoreRequest(customer_id="w" * 129).SerializeToString(), INVALID)):
        got, _, _ = outcome(lambda b=body: list(watch(b, metadata=bearer(READER_KEY),
                                                      timeout=5)))
        assert got == code
    assert_alive(reader)


# -- oversized -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", UNARY, ids=lambda m: m.name)
def test_request_over_the_size_limit_is_resource_exhausted(api, channel, reader, method):
    limit = api.settings.grpc_max_message_bytes
    call = raw(channel, method)
    # The limit counts the serialized message: one byte more is refused by grpc itself,
    # before decoding and before auth.
    for metadata in (bearer(ADMIN_KEY), ()):
        code, details, _ = outcome(call, b"\x00" * (limit + 1), metadata=metadata, timeout=10)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"larger than max ({limit + 1} vs. {limit})" in details
    assert_alive(reader)


def test_size_limit_boundary_on_typed_calls(api, reader) -> None:
    limit = api.settings.grpc_max_message_bytes
    overhead = len(GetScoreRequest(customer_id="x" * limit).SerializeToString()) - limit
    at_limit = "x" * (limit - overhead)
    assert len(GetScoreRequest(customer_id=at_limit).SerializeToString()) == limit
    code, details, _ = outcome(reader.get_score, at_limit)
    assert code == INVALID and f"is {len(at_limit)} characters long" in details
    code, _, _ = outcome(reader.get_score, at_limit + "x")
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    big = ["é" * MAX_ID_LENGTH] * (limit // (2 * MAX_ID_LENGTH) + 1)  # > limit in UTF-8
    assert BatchGetScoresRequest(customer_ids=big).ByteSize() > limit
    assert outcome(reader.batch_get_scores, big)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_alive(reader)


# -- API keys ------------------------------------------------------------------------------

GET_SCORE = "/crmscore.v1.Scoring/GetScore"
ADMIN_ONLY = "/crmscore.v1.Scoring/GetPipelineStatus"
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
ANY_ID = GetScoreRequest(customer_id="plain").SerializeToString()
EMPTY = b""  # a valid GetPipelineStatusRequest

printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200)
visible = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=20)
headers = st.one_of(
    printable,
    printable.map(lambda s: f"Bearer {s}"),
    printable.map(lambda s: f"Basic {s}"),
    st.sampled_from(["Bearer", "Bearer ", "bearer", " ", "", "Bearer  ", "Token x"]),
    st.builds(lambda cut, extra: f"Bearer {READER_KEY[:cut]}{extra}",  # near the real key
              st.integers(0, len(READER_KEY)), visible),
)


@FUZZ
@given(header=headers, admin_method=st.booleans())
def test_random_authorization_is_unauthenticated(channel, header, admin_method) -> None:
    call = channel.unary_unary(ADMIN_ONLY if admin_method else GET_SCORE)
    code, details, _ = outcome(call, EMPTY if admin_method else ANY_ID,
                               metadata=(("authorization", header),), timeout=5)
    event(details)
    assert code == UNAUTH, (code, details)
    assert details in ("unknown API key",
                       "malformed authorization metadata: expected 'Bearer <key>'",
                       "missing API key: send 'authorization: Bearer <key>' metadata")


CASES = [  # (method, metadata, status)
    (GET_SCORE, (), UNAUTH),
    (GET_SCORE, (("x-api-key", READER_KEY),), UNAUTH),
    (GET_SCORE, (("authorization", "Bearer"),), UNAUTH),
    (GET_SCORE, (("authorization", f"Basic {READER_KEY}"),), UNAUTH),
    (GET_SCORE, (("authorization", f"Bearer{READER_KEY}"),), UNAUTH),
    (GET_SCORE, (("authorization", f"Bearer {READER_KEY}x"),), UNAUTH),
    (GET_SCORE, (("authorization", f"Bearer {READER_KEY.upper()}"),), UNAUTH),
    (GET_SCORE, (("authorization", f"Bearer {new_key()}"),), UNAUTH),
    (GET_SCORE, (("authorization", "Bearer x"), ("authorization", f"Bearer {READER_KEY}")),
     UNAUTH),  # the first header counts
    (GET_SCORE, (("authorization", f"Bearer {READER_KEY} {ADMIN_KEY}"),), UNAUTH),
    (GET_SCORE, (("authorization", f"Bearer {READER_KEY * 100}"),), UNAUTH),  # ~4.5 KB
    (ADMIN_ONLY, (("authorization", f"Bearer {READER_KEY}"),), grpc.StatusCode.PERMISSION_DENIED),
    (ADMIN_ONLY, (("authorization", f"Bearer {ADMIN_KEY[:-1]}"),), UNAUTH),
    # Beyond grpc's 16 KiB hard limit on metadata the transport refuses the call itself.
    (GET_SCORE, (("authorization", f"Bearer {READER_KEY * 400}"),),
     grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ADMIN_ONLY, (("authorization", f"Bearer {ADMIN_KEY * 2000}"),),
     grpc.StatusCode.RESOURCE_EXHAUSTED),
    # Controls: the same calls with the right key pass.
    (GET_SCORE, (("authorization", f"Bearer {READER_KEY}"),), OK),
    (ADMIN_ONLY, (("authorization", f"Bearer {ADMIN_KEY}"),), grpc.StatusCode.NOT_FOUND),
]


def test_bad_keys_are_refused_and_never_logged(channel, reader, caplog, capfd) -> None:
    with caplog.at_level(logging.DEBUG):
        for method, metadata, expected in CASES:
            call = channel.unary_unary(method)
            code, details, _ = outcome(call, ANY_ID if method == GET_SCORE else EMPTY,
                                       metadata=metadata, timeout=5)
            assert code == expected, (method, metadata[:1], code, details)
        # Header values grpc will not send at all (non-printable): refused in the client.
        for value in (f"Bearer {READER_KEY}\x01", f"Bearer é{ADMIN_KEY}"):
            code, _, _ = outcome(channel.unary_unary(GET_SCORE), ANY_ID,
                                 metadata=(("authorization", value),), timeout=5)
            assert code == grpc.StatusCode.INTERNAL
        # An undecodable request does not log (anyone could flood the log with them);
        # the serving loggers are captured here (caplog's handler serves every thread).
        outcome(channel.unary_unary(GET_SCORE), b"\xff", timeout=5)
        outcome(channel.unary_unary(GET_SCORE), b"\xff", metadata=bearer(READER_KEY), timeout=5)
        logging.getLogger("serving.interceptors").warning("capture probe")
        assert "capture probe" in caplog.text
        assert "deserializ" not in caplog.text
    captured = capfd.readouterr()  # grpc core's own log lines (C, on stderr)
    for key in (READER_KEY, ADMIN_KEY, READER_KEY[4:20], ADMIN_KEY[4:20]):
        assert key not in caplog.text
        assert key not in captured.err and key not in captured.out
    assert_alive(reader)


# -- after all of it -----------------------------------------------------------------------


def test_server_still_serves_after_the_hostile_calls(api, reader) -> None:
    assert_alive(reader)
    response = reader.batch_get_scores(SEEDED)
    assert [s.customer_id for s in response.scores] == SEEDED
    with api.client(ADMIN_KEY) as admin:
        assert admin.list_segments().customers_total == len(SEEDED)
