"""Where the service keeps things in Redis: one home for key names.

The flow writes these keys and the server reads them; both build names here.

>>> layout = RedisLayout("crm:")
>>> layout.score("c-42"), layout.status(), layout.updates("c-42")
('crm:score:c-42', 'crm:status', 'crm:updates:c-42')
>>> layout.customer_id(b"crm:score:c-42")
'c-42'
>>> layout.model_bundle(), layout.model_candidate()
('crm:{models}:bundle', 'crm:{models}:candidate')
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RedisLayout:
    prefix: str = "crm:"

    def score(self, customer_id: str) -> str:
        """HASH {v: version, doc: score document (JSON; zstd: crmscore/doc_codec.py)}."""
        return f"{self.prefix}score:{customer_id}"

    def status(self) -> str:
        """HASH {v: version, doc: JSON pipeline status}."""
        return f"{self.prefix}status"

    def updates(self, customer_id: str) -> str:
        """Pub/sub channel carrying each new score document of one customer."""
        return f"{self.prefix}updates:{customer_id}"

    def model_report(self) -> str:
        """HASH {v: version, doc: JSON model report} (GetModelReport)."""
        return f"{self.prefix}models"

    # The bundle and the candidate share the hash tag {models}: `crmscore models promote`
    # reads one and writes the other in one script, which a Redis Cluster runs only when
    # all its keys hash to one slot.
    def model_bundle(self) -> str:
        """HASH {v: version, doc: pickled models.scoring.ModelBundle} the flow scores with."""
        return f"{self.prefix}{{models}}:bundle"

    def model_candidate(self) -> str:
        """HASH {v, doc: pickled ModelBundle} learned while model updates are frozen."""
        return f"{self.prefix}{{models}}:candidate"

    def alert_report(self) -> str:
        """HASH {v: version, doc: JSON alert report: per rule, treated vs holdout}."""
        return f"{self.prefix}alerts:report"

    def store_marker(self) -> str:
        """STRING set by the flow: gone means Redis lost its data (flows/store_marker.py)."""
        return f"{self.prefix}flow:store"

    def score_pattern(self) -> str:
        return f"{self.prefix}score:*"

    def customer_id(self, score_key: bytes | str) -> str:
        key = score_key.decode() if isinstance(score_key, bytes) else score_key
        return key[len(self.prefix) + len("score:") :]
