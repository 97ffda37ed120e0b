"""API keys: ``authorization: Bearer <key>`` metadata checked against hashed entries.

``CRMSCORE_API_KEYS`` holds comma-separated ``role:sha256hex`` entries, the SHA-256
of each key and never the key itself. Role ``reader`` may read scores, watch
customers and list segments; ``admin`` may do that and read the pipeline status, model
reports and alert reports. A presented key is looked up by its SHA-256 (one hash and one
dict probe per call: the timing of the probe tells nothing about the key) and never logged.

>>> key = new_key()
>>> keys = ApiKeys.parse(entry("reader", key))
>>> keys.role_of(key), keys.role_of("crm_" + "x" * 43)
('reader', None)
>>> ApiKeys.parse("reader:abc")
Traceback (most recent call last):
...
serving.auth.AuthConfigError: CRMSCORE_API_KEYS entry 1: expected 'role:<64 hex digits of SHA-256>'
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from serving.errors import PermissionDenied, Unauthenticated

READER = "reader"
ADMIN = "admin"
RANK = {READER: 1, ADMIN: 2}
KEY_PREFIX = "crm_"
_HEX64 = re.compile(r"[0-9a-f]{64}")

_SCORING = "/crmscore.v1.Scoring/"
# The role each method needs; methods not listed (health, reflection) are public.
METHOD_ROLES = {
    _SCORING + "GetScore": READER,
    _SCORING + "BatchGetScores": READER,
    _SCORING + "WatchCustomer": READER,
    _SCORING + "ListSegments": READER,
    _SCORING + "GetPipelineStatus": ADMIN,
    _SCORING + "GetModelReport": ADMIN,
    _SCORING + "GetAlertReport": ADMIN,
}


class AuthConfigError(ValueError):
    """CRMSCORE_API_KEYS or CRMSCORE_AUTH cannot be used."""


def new_key() -> str:
    """A fresh random API key (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def entry(role: str, key: str) -> str:
    """The ``CRMSCORE_API_KEYS`` entry that accepts ``key`` with ``role``."""
    if role not in RANK:
        raise AuthConfigError(f"unknown role {role!r}; roles are {', '.join(RANK)}")
    return f"{role}:{digest(key)}"


def auth_enabled(value: str) -> bool:
    """CRMSCORE_AUTH: 'on' (default) or 'off'."""
    lowered = value.strip().lower()
    if lowered not in ("on", "off"):
        raise AuthConfigError(f"CRMSCORE_AUTH: expected 'on' or 'off', got {value!r}")
    return lowered == "on"


@dataclass(frozen=True)
class ApiKeys:
    entries: tuple[tuple[str, bytes], ...]  # (role, SHA-256 digest)
    _roles: dict[bytes, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        roles: dict[bytes, str] = {}
        for role, known in self.entries:  # a digest listed twice keeps its highest role
            if RANK[role] > RANK.get(roles.get(known, ""), 0):
                roles[known] = role
        object.__setattr__(self, "_roles", roles)

    @classmethod
    def parse(cls, text: str) -> ApiKeys:
        entries = []
        for n, raw in enumerate((e.strip() for e in text.split(",") if e.strip()), 1):
            role, _, hexdigest = raw.partition(":")
            role, hexdigest = role.strip(), hexdigest.strip().lower()
            if role not in RANK:
                raise AuthConfigError(
                    f"CRMSCORE_API_KEYS entry {n}: unknown role {role!r}; "
                    f"roles are {', '.join(RANK)}"
                )
            if not _HEX64.fullmatch(hexdigest):
                raise AuthConfigError(
                    f"CRMSCORE_API_KEYS entry {n}: expected 'role:<64 hex digits of SHA-256>'"
                )
            entries.append((role, bytes.fromhex(hexdigest)))
        return cls(tuple(entries))

    def role_of(self, key: str) -> str | None:
        """The role of ``key``, or None."""
        return self._roles.get(hashlib.sha256(key.encode()).digest())

    def authorize(self, metadata: Sequence[tuple[str, str | bytes]] | None, needed: str) -> str:
        """The caller's role if it may call a method needing ``needed``, else raise."""
        header = next((v for k, v in metadata or () if k == "authorization"), None)
        if header is None:
            raise Unauthenticated("missing API key: send 'authorization: Bearer <key>' metadata")
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        scheme, _, key = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("malformed authorization metadata: expected 'Bearer <key>'")
        role = self.role_of(key.strip())
        if role is None:
            raise Unauthenticated("unknown API key")
        if RANK[role] < RANK[needed]:
            raise PermissionDenied(f"role {role!r} may not call this method; it needs {needed!r}")
        return role
