"""Stored score documents: zstd with the shipped dictionary, plain JSON still read."""

from __future__ import annotations

import threading

import orjson
import pytest
import zstandard

from crmscore import doc_codec
from crmscore.doc_codec import ZSTD_MAGIC, DocumentError, compression_on, decode, encode
from serving.convert import score_message
from serving.errors import DataError
from tests.test_serving import score_doc


def realistic(customer_id: str, n: int) -> bytes:
    return orjson.dumps(score_doc(
        customer_id, version=n, churn_risk=0.1 + n / 1000, churn_horizon_days=90.0,
        p_alive=0.8, expected_purchases=1.5 + n / 100, clv_historic=123.45 + n,
        clv_predicted=300.0, clv_horizon_days=365.0, lifecycle_stage="active",
        value_tier="normal", model_version="bgnbd@v1", churn_risk_source="model",
        strategy={"name": "relationship", "reason": "Active buyer with normal value: keep "
                  "the relationship warm with relevant offers."}))


def test_a_document_comes_back_byte_for_byte_and_much_smaller() -> None:
    doc = realistic("c-000042", 7)
    stored = encode(doc)
    assert stored.startswith(ZSTD_MAGIC) and decode(stored) == doc
    assert len(stored) < len(doc) / 3, (len(stored), len(doc))
    assert score_message(stored) == score_message(doc)  # the server reads both


def test_plain_json_is_read_as_it_is() -> None:
    doc = realistic("c-1", 1)
    assert decode(doc) is doc


def test_a_corrupt_frame_is_a_clear_error() -> None:
    stored = bytearray(encode(realistic("c-1", 1)))
    stored[len(stored) // 2] ^= 0xFF
    stored = stored[:-3]
    with pytest.raises(DocumentError, match="corrupt compressed document"):
        decode(bytes(stored))
    with pytest.raises(DataError, match="unreadable score document"):
        score_message(bytes(stored))
    with pytest.raises(DocumentError, match="corrupt compressed document"):
        decode(ZSTD_MAGIC + b"\xff" * 3)  # not even a frame header


def test_a_frame_of_another_dictionary_names_it() -> None:
    samples = [realistic(f"other-{n}", n).replace(b"customer", b"client") for n in range(2000)]
    other = zstandard.ZstdCompressionDict(doc_codec.train(samples, 4096))
    stored = zstandard.ZstdCompressor(dict_data=other).compress(realistic("c-1", 1))
    with pytest.raises(DocumentError, match=f"dictionary {other.dict_id()}"):
        decode(stored)


def test_a_document_that_is_not_a_json_object_is_refused() -> None:
    with pytest.raises(DocumentError, match="a JSON object, got list"):
        doc_codec.load(encode(b"[1, 2]"))
    with pytest.raises(DataError, match="unreadable score document"):
        score_message(encode(b"[1, 2]"))


def test_the_setting_is_checked() -> None:
    assert compression_on("zstd") and compression_on(" ZSTD ") and not compression_on("off")
    with pytest.raises(DocumentError, match="expected 'zstd' or 'off'"):
        compression_on("gzip")


def test_threads_encode_and_decode_at_once() -> None:
    """zstd contexts are per thread: eight threads at once never mix their frames."""
    failures: list[int] = []

    def work(t: int) -> None:
        for n in range(300):
            doc = realistic(f"t{t}-{n}", n)
            if decode(encode(doc)) != doc:
                failures.append(n)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_a_bytewax_cluster_worker_keeps_its_compression_context_from_batch_to_batch() -> None:
    # A cluster worker (`crmscore flow -i/-a`) is a thread started by Rust: its
    # thread-locals are new at each call into Python, so contexts kept there were made
    # again for every batch (~40 µs each, against ~2 µs per document).
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.testing import TestingSource, cluster_main

    contexts: list[zstandard.ZstdCompressor] = []

    def compress(n: int) -> bytes:
        contexts.append(doc_codec._compressor())  # held, so no two share an address
        return encode(realistic("c-1", n))

    flow = Dataflow("doc_codec_contexts")
    numbers = op.input("numbers", flow, TestingSource(range(200), batch_size=10))
    op.inspect("stored", op.map("compress", numbers, compress), lambda *_: None)
    cluster_main(flow, [], 0)
    assert len(contexts) == 200
    assert len({id(c) for c in contexts}) == 1
