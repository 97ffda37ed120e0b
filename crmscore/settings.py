"""One frozen settings object, read from ``CRMSCORE_*`` environment variables.

Every setting is declared once, below, with its variable, default and help text.
The CLI builds its flags from the same declarations (see ``crmscore.cli``), so
``--help`` always names the variable behind each flag. Business code receives a
``Settings`` and never reads ``os.environ``.

>>> s = Settings.from_env({"CRMSCORE_TOPIC_PARTITIONS": "8"})
>>> s.topic_partitions, s.transactions_topic
(8, 'crm.transactions')
>>> Settings.from_env({"CRMSCORE_REDIS_CLUSTER": "on"}).redis_cluster
True
>>> Settings.from_env({"CRMSCORE_TOPIC_PARTITIONS": "many"})
Traceback (most recent call last):
...
crmscore.settings.SettingsError: CRMSCORE_TOPIC_PARTITIONS: expected an integer, got 'many'
>>> Settings.from_env({"CRMSCORE_RESCORE_RATE": "-5"})
Traceback (most recent call last):
...
crmscore.settings.SettingsError: CRMSCORE_RESCORE_RATE: must be >= 0, got -5.0
>>> Settings(redis_timeout=0.0)
Traceback (most recent call last):
...
crmscore.settings.SettingsError: CRMSCORE_REDIS_TIMEOUT: must be > 0, got 0.0
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

PREFIX = "CRMSCORE_"


class SettingsError(ValueError):
    """A setting has a value that cannot be used."""


def _setting(default: Any, help: str, *, secret: bool = False, above: float | None = None,
             at_least: float | None = None, at_most: float | None = None) -> Any:
    """A setting; a number may be bounded: ``above`` (exclusive), ``at_least`` and
    ``at_most`` (inclusive). A value out of bounds stops the settings with its variable."""
    return field(default=default, metadata={
        "help": help, "secret": secret, "above": above, "at_least": at_least, "at_most": at_most,
    })


@dataclass(frozen=True)
class Settings:
    # Kafka
    kafka_bootstrap: str = _setting("127.0.0.1:9092", "Kafka bootstrap servers (host:port,...)")
    kafka_config: str = _setting(
        "",
        "extra librdkafka settings for every client, 'key=value;key=value' "
        "(e.g. security.protocol=SASL_SSL;sasl.mechanism=SCRAM-SHA-512;...)",
        secret=True,
    )
    transactions_topic: str = _setting("crm.transactions", "topic of transaction events")
    dlq_topic: str = _setting("crm.transactions.dlq", "dead-letter topic for rejected events")
    alerts_topic: str = _setting("crm.alerts", "topic for customer alerts")
    timers_topic: str = _setting(
        "crm.timers", "internal topic carrying the flow's event-time wake-ups back to it"
    )
    topic_partitions: int = _setting(4, "partitions for topics the service creates", at_least=1)
    # Redis
    redis_url: str = _setting(
        "redis://127.0.0.1:6379/0", "Redis URL (redis:// or rediss://)", secret=True
    )
    redis_prefix: str = _setting("crm:", "prefix of every Redis key the service writes")
    doc_compression: str = _setting(
        "zstd", "how the flow stores score documents: 'zstd' (with the dictionary shipped in "
        "crmscore/score_doc.zdict: ~10x smaller) or 'off' (plain JSON); readers take both"
    )
    redis_cluster: bool = _setting(
        False, "'on': CRMSCORE_REDIS_URL names any node of a Redis Cluster (commands go to "
        "the node owning each key); 'off': a single Redis"
    )
    # Flow
    recovery_dir: str = _setting(
        ".crmscore/recovery", "bytewax recovery directory (created and initialised when empty)"
    )
    # bytewax's loader reads a partition slower than linearly in its keys: a restart took
    # 13.3 s at 100,000 customers with 1 partition and 7.4 s with 4, 630-811 s at a
    # million with 1 and 228 s with 4. Each partition commits on its own at every epoch:
    # 4 measured the freshness of 1 at 2,000 customers, 8 cost ~15 ms of p99 (README).
    recovery_partitions: int = _setting(
        4, "recovery partitions created in an empty recovery dir", at_least=1
    )
    # Each epoch ends with a pause in which bytewax stores the snapshot of every key
    # touched in it while new events wait. At 1,000 events/s, with the customers pickled
    # ahead (flows/scoring.py CustomerLogic.snapshot), the freshness p99 was 55-65 ms with
    # 1 s epochs, 48-58 ms with 0.5 s, 42-46 ms with 0.25 s; replay throughput within
    # noise of each other. Every epoch also pays a scan of all the keys held (~0.9 µs
    # each, flows/recovery_scan.py): large populations need a longer interval, which the
    # flow chooses at start (snapshot_scan_share).
    snapshot_interval: float = _setting(
        0.25, "seconds between state snapshots (bytewax epoch), the shortest: the flow "
        "lengthens it at start for CRMSCORE_SNAPSHOT_SCAN_SHARE", above=0
    )
    # 0.1: at 100,000 customers (scan ~0.1 s) 1 s epochs, the best measured there
    # (README "Freshness falls with the population held").
    snapshot_scan_share: float = _setting(
        0.1, "the most of each epoch bytewax's scan of the recovery store may take: at start "
        "the flow times the scan and lengthens the snapshot interval to match (0: keep "
        "CRMSCORE_SNAPSHOT_INTERVAL as set)", at_least=0, at_most=0.5
    )
    backup_interval: float = _setting(
        0.0, "seconds to keep old snapshots (bytewax backup interval)", at_least=0
    )
    # A customer held unpickled takes ~5 KB, pickled ~1.4 KB, and unpickling one takes
    # ~15 µs (flows/live_customers.py): the limit trades memory for that work.
    live_customers: int = _setting(
        50_000, "customers each flow worker keeps unpickled, the most recently touched; the "
        "others rest as their snapshot bytes until their next event or wake-up", at_least=1
    )
    # glibc keeps freed heap below its top: a caught-up flow held ~20-30% of its RSS as
    # free heap until trimmed (flows/heap_trim.py).
    heap_trim_seconds: float = _setting(
        60.0, "seconds between the flow's malloc_trim calls, which give the heap it freed "
        "back to the operating system (0: off)", at_least=0
    )
    flow_metrics_port: int = _setting(
        9465, "Prometheus metrics HTTP port of the flow (bytewax's Dataflow API, /metrics); "
        "process i of a cluster listens on this port + i (0: off)", at_least=0, at_most=65535
    )
    lateness_days: float = _setting(
        7.0, "event-time lateness window: duplicates are detected within it; "
        "events later than this behind their customer's newest event are rejected", at_least=0
    )
    max_future_seconds: float = _setting(
        3600.0, "events whose occurred_at is further ahead of the wall clock are rejected",
        at_least=0
    )
    churn_horizon_days: float = _setting(
        90.0, "churn_risk is the probability of no purchase within this many days", above=0
    )
    clv_horizon_days: float = _setting(
        365.0, "horizon of expected_purchases and clv_predicted, in days", above=0
    )
    model_publish_seconds: float = _setting(
        2.0, "seconds between the models step's publications of models and report to Redis",
        above=0
    )
    rescore_rate: float = _setting(
        100.0, "when the served model or its BTYD fit changes, waiting customers are rescored "
        "at most this many a second (wall clock), so the extra work does not stall live "
        "events; 0: at once",
        at_least=0
    )
    model_updates: str = _setting(
        "live", "'live': customers score with the newest learned models; 'frozen': with "
        "the models in Redis at start (scores no longer depend on when a bundle arrived; "
        "the models step publishes a candidate, see `crmscore models promote`)"
    )
    alert_rules: str = _setting(
        "", "alert rules file (TOML); empty: the packaged crmscore/alert_rules.toml"
    )
    churn_models: str = _setting(
        "logreg", "churn model families learned beside BG/NBD, champion/challenger "
        "(comma-separated: logreg, tree); a resumed flow switches to this lineup"
    )
    partition_idle_seconds: float = _setting(
        2.0, "the stream clock waits for the slowest transactions partition, unless it has "
        "delivered nothing for this many seconds (caught up, or no producer)", above=0
    )
    btyd_refit_days: float = _setting(
        7.0, "days of event time between BG/NBD + Gamma-Gamma refits (in the background)", above=0
    )
    # Serving
    grpc_address: str = _setting("127.0.0.1:50051", "gRPC listen / connect address")

    # Serving (gRPC API, issue 4): server
    grpc_workers: int = _setting(
        4, "gRPC server threads answering unary calls (streams have their own: max_watchers + 3);"
        " more threads contend for the GIL and answer fewer calls", at_least=1
    )
    grpc_max_message_bytes: int = _setting(
        4 * 1024 * 1024, "largest gRPC message the server receives or sends, in bytes",
        at_least=1024
    )
    grpc_grace_seconds: float = _setting(
        5.0, "seconds in-flight calls get to finish when the server stops", at_least=0
    )
    redis_timeout: float = _setting(
        0.5, "most seconds the server waits for Redis per call (a shorter deadline wins)", above=0
    )
    score_cache_size: int = _setting(
        100_000, "scores the server keeps in memory (~300 B each), kept exact by Redis's "
        "invalidation messages (0: off; off on a Redis Cluster)", at_least=0
    )
    health_interval: float = _setting(
        1.0, "seconds between the server's Redis health checks", above=0
    )
    max_watchers: int = _setting(
        16, "most concurrent WatchCustomer streams (each holds a server thread)", at_least=0
    )
    auth: str = _setting("on", "API key authentication: 'on', or 'off' for local demos only")
    api_keys: str = _setting(
        "", "accepted API keys, comma-separated 'role:sha256hex' entries "
        "(roles reader, admin; create with `crmscore keys new`)", secret=True
    )
    tls_cert: str = _setting("", "server certificate chain (PEM file); with tls_key enables TLS")
    tls_key: str = _setting("", "server private key (PEM file)")
    tls_client_ca: str = _setting(
        "", "CA bundle (PEM file) to verify client certificates; set to require them (mTLS)"
    )
    metrics_port: int = _setting(
        9464, "Prometheus metrics HTTP port of the server (0: off)", at_least=0, at_most=65535
    )
    log_format: str = _setting(
        "text", "log lines of every command: 'text' (readable) or 'json' (one object a line)"
    )
    # Serving: client (crmscore score)
    api_key: str = _setting("", "API key the client sends", secret=True)
    grpc_timeout: float = _setting(5.0, "client deadline per call, in seconds", above=0)
    tls_ca: str = _setting("", "CA bundle (PEM file) the client trusts; set to connect with TLS")
    tls_client_cert: str = _setting("", "client certificate (PEM file) for mTLS")
    tls_client_key: str = _setting("", "client private key (PEM file) for mTLS")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_bounds(f, getattr(self, f.name))

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: Any) -> Settings:
        """Build settings from ``env``; ``overrides`` (e.g. CLI flags) win over it."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            var = env_var(f.name)
            if overrides.get(f.name) is not None:
                values[f.name] = _convert(var, f.type, overrides[f.name])
            elif var in env:
                values[f.name] = _convert(var, f.type, env[var])
        return cls(**values)

    def kafka_client_config(self) -> dict[str, Any]:
        """librdkafka settings shared by every producer, consumer and admin client."""
        config: dict[str, Any] = {"bootstrap.servers": self.kafka_bootstrap}
        for entry in filter(None, (e.strip() for e in self.kafka_config.split(";"))):
            key, sep, value = entry.partition("=")
            if not sep or not key.strip():
                raise SettingsError(
                    f"{env_var('kafka_config')}: expected 'key=value', got {entry.split('=')[0]!r}"
                )
            config[key.strip()] = value.strip()
        return config

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict safe to log: secrets show only whether they are set."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata["secret"]:
                value = _redact(f.name, value)
            out[f.name] = value
        return out


def env_var(name: str) -> str:
    """The environment variable behind a setting: ``redis_url`` -> ``CRMSCORE_REDIS_URL``."""
    return PREFIX + name.upper()


def describe(name: str) -> tuple[str, Any]:
    """Help text and default of one setting, for CLI flags and docs."""
    f = {f.name: f for f in dataclasses.fields(Settings)}[name]
    return f.metadata["help"], f.default


_SWITCH = {"on": True, "true": True, "yes": True, "1": True,
           "off": False, "false": False, "no": False, "0": False, "": False}


def _convert(var: str, type_name: Any, raw: Any) -> Any:
    if str(type_name) == "bool":
        if isinstance(raw, bool):
            return raw
        if str(raw).strip().lower() not in _SWITCH:
            raise SettingsError(f"{var}: expected 'on' or 'off', got {raw!r}")
        return _SWITCH[str(raw).strip().lower()]
    kind = {"int": int, "float": float, "str": str}[str(type_name)]
    if isinstance(raw, kind):
        return raw
    try:
        return kind(raw)
    except ValueError:
        word = {int: "an integer", float: "a number", str: "a string"}[kind]
        raise SettingsError(f"{var}: expected {word}, got {raw!r}") from None


def _check_bounds(f: dataclasses.Field[Any], value: Any) -> None:
    rules = [(f.metadata["above"], ">", lambda bound: value > bound),
             (f.metadata["at_least"], ">=", lambda bound: value >= bound),
             (f.metadata["at_most"], "<=", lambda bound: value <= bound)]
    for bound, sign, holds in rules:
        if bound is not None and not holds(bound):  # NaN holds no bound
            raise SettingsError(f"{env_var(f.name)}: must be {sign} {bound:g}, got {value!r}")


def _redact(name: str, value: str) -> str:
    if not value:
        return value
    if name == "redis_url" and "@" in value:
        scheme, _, rest = value.partition("://")
        return f"{scheme}://***@{rest.rpartition('@')[2]}"
    if name == "redis_url":
        return value
    return "***"
