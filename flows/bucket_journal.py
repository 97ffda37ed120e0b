"""A timer bucket's registrations, kept as a journal of changes: its snapshot is a copy
of bytes.

bytewax snapshots a bucket whole at the end of every epoch it was touched in, and live
events touch most open buckets: each purchase registers its customer's next instant and
cancels the one it replaces, in two of the ~1,000 hours open at 100,000 customers, whose
buckets hold ~470 registrations each near the clock. Pickled from columns, such a bucket
took ~130 µs, growing with the population held: at 1,000 events/s, 60-90 ms of every
second went to it (session 27). The journal appends one record per change (~1 µs); its
snapshot is the bytes so far. Once it holds more than twice as many records as
registrations plus ``SLACK``, it is rewritten from the registrations held, so a change
costs O(1) amortised and the bytes stay within ~2x of the held set's.

A record is ``due_us``, ``bundle_version`` (``DROPPED``: the registration was dropped),
the customer id's length in UTF-8 bytes, then those bytes (ids are at most 128
characters: schemas/transaction.v1.json).

>>> journal = BucketJournal()
>>> journal.add("a", 5, 0); journal.add("b", 7, 2)
>>> journal.drop("a", 5), journal.drop("a", 5)
(True, False)
>>> BucketJournal(journal.snapshot()).held
{('b', 7): 2}
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

_RECORD = struct.Struct("<qqH")  # due_us, bundle_version, customer id length
DROPPED = -1
SLACK = 16  # records beyond twice the held set before a rewrite: small buckets rarely pay one


class BucketJournal:
    """The registrations a bucket holds, as (customer, due instant) -> bundle version,
    and the journal of changes that rebuilds them."""

    def __init__(self, journal: bytes = b"") -> None:
        self.held: dict[tuple[str, int], int] = {}
        self._journal = bytearray(journal)  # kept as read: within its bound when written
        self._records = 0
        for customer_id, due_us, version in _records(journal):
            self._records += 1
            if version == DROPPED:
                self.held.pop((customer_id, due_us), None)
            else:
                self.held[customer_id, due_us] = version

    def add(self, customer_id: str, due_us: int, bundle_version: int) -> None:
        self.held[customer_id, due_us] = bundle_version
        self._append(customer_id, due_us, bundle_version)

    def drop(self, customer_id: str, due_us: int) -> bool:
        """Drop the registration at ``due_us``; False when none is held."""
        if self.held.pop((customer_id, due_us), None) is None:
            return False
        self._append(customer_id, due_us, DROPPED)
        return True

    def clear(self) -> None:
        self.held = {}
        self._journal = bytearray()
        self._records = 0

    def snapshot(self) -> bytes:
        return bytes(self._journal)

    def _append(self, customer_id: str, due_us: int, version: int) -> None:
        key = customer_id.encode()
        self._journal += _RECORD.pack(due_us, version, len(key))
        self._journal += key
        self._records += 1
        if self._records > 2 * len(self.held) + SLACK:
            self._rewrite()

    def _rewrite(self) -> None:
        """The journal anew: one record per registration held."""
        self._journal = bytearray()
        self._records = 0
        for (customer_id, due_us), version in self.held.items():
            self._append(customer_id, due_us, version)


def _records(journal: bytes) -> Iterator[tuple[str, int, int]]:
    offset, end = 0, len(journal)
    while offset < end:
        due_us, version, length = _RECORD.unpack_from(journal, offset)
        offset += _RECORD.size
        yield journal[offset:offset + length].decode(), due_us, version
        offset += length
