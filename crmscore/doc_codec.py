"""How score documents are stored: JSON, compressed with zstd and a shipped dictionary.

A score document is ~1.2 KB of JSON whose keys and words repeat from one customer to the
next. zstd with a dictionary trained on such documents (``score_doc.zdict``, 8 KB, in
this package: 1,500 generated and 1,500 CDNOW documents) stores it in 120-195 bytes, in
3-5 µs, and reads it back in ~2 µs (measured on documents not used in training; zlib
gave ~590 bytes in 37-51 µs). Redis then holds ~490 bytes per customer instead of
~1,520 (MEMORY USAGE, `python -m bench.run --only memory`).

The flow compresses what it writes (``CRMSCORE_DOC_COMPRESSION=zstd``, the default;
``off`` writes plain JSON). Readers take both: a zstd frame starts with its magic number,
a JSON document with ``{``. A document compressed with another dictionary is refused
with the dictionary's id, never misread.

    python -m crmscore.doc_codec train OUT.zdict REDIS_URL PREFIX  # a new dictionary
    python -m crmscore.doc_codec show REDIS_URL KEY                # one stored document

>>> doc = b'{"customer_id":"c-1","version":3,"lifecycle_stage":"active"}'
>>> stored = encode(doc)
>>> stored[:4] == ZSTD_MAGIC, decode(stored) == doc, decode(doc) == doc
(True, True, True)
>>> load(stored)["version"]
3
"""

from __future__ import annotations

import sys
import threading
from functools import cache
from importlib import resources
from typing import Any, cast

import orjson
import zstandard

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
LEVEL = 3  # measured: level 3 is as fast as 1 with a dictionary, and a little smaller
DICTIONARY = "score_doc.zdict"


class DocumentError(ValueError):
    """A stored document that cannot be decoded."""


@cache
def dictionary() -> zstandard.ZstdCompressionDict:
    data = resources.files("crmscore").joinpath(DICTIONARY).read_bytes()
    return zstandard.ZstdCompressionDict(data)


# zstd contexts are not thread-safe: one of each per thread, found by the OS thread's id.
# Not threading.local: a thread that Rust started (a bytewax cluster worker, `-i/-a`) may
# get a new Python thread state, with empty thread-locals, at each call into Python (the
# flow keeps its workers' states: flows/worker_thread.py); a context made again per batch
# cost ~40 µs against ~2 µs reused. An id reused by a later thread inherits the contexts
# of one that has ended.
_compressors: dict[int, zstandard.ZstdCompressor] = {}
_decompressors: dict[int, zstandard.ZstdDecompressor] = {}


def _compressor() -> zstandard.ZstdCompressor:
    thread = threading.get_ident()
    c = _compressors.get(thread)
    if c is None:
        c = _compressors[thread] = zstandard.ZstdCompressor(
            level=LEVEL, dict_data=dictionary(), write_checksum=False
        )
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    thread = threading.get_ident()
    d = _decompressors.get(thread)
    if d is None:
        d = _decompressors[thread] = zstandard.ZstdDecompressor(dict_data=dictionary())
    return d


def compression_on(value: str) -> bool:
    """CRMSCORE_DOC_COMPRESSION: 'zstd' (True) or 'off' (False)."""
    lowered = value.strip().lower()
    if lowered not in ("zstd", "off"):
        raise DocumentError(f"CRMSCORE_DOC_COMPRESSION: expected 'zstd' or 'off', got {value!r}")
    return lowered == "zstd"


def encode(doc: bytes) -> bytes:
    """A JSON document -> its stored form (a zstd frame)."""
    return _compressor().compress(doc)


def decode(stored: bytes) -> bytes:
    """A stored document (a zstd frame, or plain JSON) -> JSON bytes."""
    if not stored.startswith(ZSTD_MAGIC):
        return stored
    try:
        return _decompressor().decompress(stored)
    except zstandard.ZstdError as exc:
        try:
            frame_dict = zstandard.get_frame_parameters(stored).dict_id
        except zstandard.ZstdError:  # not even a readable frame header
            frame_dict = 0
        ours = dictionary().dict_id()
        if frame_dict not in (0, ours):
            raise DocumentError(f"document compressed with dictionary {frame_dict}, this "
                                f"version knows {ours}: upgrade the reader") from exc
        raise DocumentError(f"corrupt compressed document: {exc}") from exc


def load(stored: bytes) -> dict[str, Any]:
    """A stored document -> the parsed JSON object (DocumentError, or orjson's
    JSONDecodeError, a ValueError too, when it cannot be read)."""
    doc = orjson.loads(decode(stored))
    if not isinstance(doc, dict):
        raise DocumentError(f"a score document is a JSON object, got {type(doc).__name__}")
    return doc


def train(samples: list[bytes], size: int = 8192) -> bytes:
    """A dictionary trained on ``samples`` (stored score documents: several thousand)."""
    return zstandard.train_dictionary(size, cast("list[bytes | bytearray | memoryview]", samples)
                                      ).as_bytes()


def main(argv: list[str] | None = None) -> int:
    import argparse

    import redis

    parser = argparse.ArgumentParser(prog="python -m crmscore.doc_codec",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a dictionary on the score documents in a Redis")
    t.add_argument("out")
    t.add_argument("redis_url")
    t.add_argument("prefix", help="key prefix of the service (CRMSCORE_REDIS_PREFIX)")
    t.add_argument("--size", type=int, default=8192)
    s = sub.add_parser("show", help="print one stored document as JSON")
    s.add_argument("redis_url")
    s.add_argument("key")
    args = parser.parse_args(argv)
    conn = redis.Redis.from_url(args.redis_url)
    if args.command == "show":
        raw = cast(bytes | None, conn.hget(args.key, "doc"))
        if raw is None:
            print(f"no document at {args.key!r}", file=sys.stderr)
            return 1
        print(decode(raw).decode())
        return 0
    samples = [decode(d) for key in conn.scan_iter(match=f"{args.prefix}score:*", count=1000)
               if (d := cast(bytes | None, conn.hget(key, "doc"))) is not None]
    with open(args.out, "wb") as out:
        out.write(train(samples, args.size))
    print(f"trained a {args.size}-byte dictionary on {len(samples):,} documents: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
