"""Redis Cluster support end to end, against a real 3-node local Redis Cluster
(``crmscore.embedded.start_redis_cluster``) with ``CRMSCORE_REDIS_CLUSTER=on``.

- The real flow writes a generated stream (duplicates, refunds, disorder and malformed
  events included) to the cluster: counts, every customer's score document and the
  dead letters equal a batch recomputation, and the keys landed on all three nodes.
- The gRPC API over that cluster: GetScore, BatchGetScores (ids on every node and
  missing ones), ListSegments (a SCAN of every node), GetPipelineStatus, GetModelReport,
  GetAlertReport, health SERVING, and WatchCustomer receiving the update the resumed
  flow publishes from one node to a subscriber on another; ``crmscore report`` and
  ``crmscore models show`` with ``--redis-cluster on``.
- The sink: versions never go backwards across slots, a node that lost its scripts gets
  the write script again, PUBLISH from the script crosses nodes, a lost marker is noticed.
- ``crmscore models promote``: its two-key script runs on the cluster (hash tags).
- The score store follows a slot migration (ASK, then MOVED) and answers UNAVAILABLE,
  in time, for the customers of a node that is down while serving the others.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import orjson
import pytest
import redis
from redis.crc import key_slot

from crmscore.cli import main as cli_main
from crmscore.embedded import LocalCluster, start_redis_cluster
from crmscore.layout import RedisLayout
from crmscore.settings import Settings
from flows.model_registry import bundle_doc, load_published
from flows.redis_sink import WRITE_IF_NEWER, RedisDocSink, VersionedDoc
from flows.store_marker import claim_store
from models.scoring import ModelBundle
from serving.cluster_store import ClusterScoreStore
from serving.errors import Unavailable
from serving.store import open_store
from tests.pipeline import (
    FlowEnv,
    admin_client,
    check_final_state,
    generated_stream,
    publish,
)
from tests.reference import recompute

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    nodes = start_redis_cluster()
    yield nodes
    nodes.stop()


@pytest.fixture
def conn(cluster: LocalCluster) -> Iterator[redis.RedisCluster]:
    client = redis.RedisCluster.from_url(cluster.url)
    yield client
    client.close()


def node_of(conn: redis.RedisCluster, key: str) -> str:
    return str(conn.get_node_from_key(key).name)


def keys_per_node(conn: redis.RedisCluster, pattern: str) -> dict[str, int]:
    return {node.name: sum(1 for _ in conn.get_redis_connection(node).scan_iter(
        match=pattern, count=1000)) for node in conn.get_primaries()}


def subscribed_nodes(conn: redis.RedisCluster, channels: list[str]) -> set[str]:
    """The nodes holding a subscription to one of ``channels`` (PUBSUB NUMSUB is local)."""
    return {node.name for node in conn.get_primaries()
            if any(n for _, n in conn.get_redis_connection(node).pubsub_numsub(*channels))}


def wait_for(predicate: Any, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def purchase(lines: list[bytes], customer_id: str, n: int) -> bytes:
    """A new purchase of ``customer_id`` a minute ago, in the currency of their events."""
    currency = next(e["currency"] for line in lines if line.startswith(b"{")
                    and isinstance(e := orjson.loads(line), dict)
                    and e.get("customer_id") == customer_id)
    at = datetime.now(UTC) - timedelta(minutes=1)
    return orjson.dumps({
        "event_id": f"e-cluster-{n}", "customer_id": customer_id,
        "occurred_at": at.isoformat().replace("+00:00", "Z"), "type": "purchase",
        "amount": 42.5, "currency": currency, "order_id": f"o-cluster-{n}", "channel": "web"})


# -- the flow and the API ------------------------------------------------------------------


def test_flow_and_api_on_a_cluster(broker, cluster, conn, unique, tmp_path, capsys):
    lines, malformed = generated_stream(tmp_path / "events.jsonl", customers=300, seed=43)
    expected = recompute(lines, malformed)
    env = FlowEnv(broker.address, cluster.url, unique, tmp_path / "recovery", redis_cluster=True)
    publish(env, lines)
    assert env.start_flow("--until-end").wait(300) == 0
    check_final_state(env, conn, expected, len(lines))

    per_node = keys_per_node(conn, env.layout.score_pattern())
    assert len(per_node) == 3 and min(per_node.values()) > 0, per_node
    assert sum(per_node.values()) == len(expected.customers)
    assert conn.exists(env.layout.model_bundle()) and conn.exists(env.layout.store_marker())
    cluster_flags = ["--redis-url", cluster.url, "--redis-cluster", "on",
                     "--redis-prefix", env.layout.prefix]
    capsys.readouterr()
    assert cli_main(["report", "alerts", "--json", *cluster_flags]) == 0
    assert orjson.loads(capsys.readouterr().out)["rules"]
    assert cli_main(["models", "show", *cluster_flags]) == 0
    assert "served    (" in capsys.readouterr().out

    by_node: dict[str, list[str]] = {}
    for cid in sorted(expected.customers):
        by_node.setdefault(node_of(conn, env.layout.score(cid)), []).append(cid)
    spread = [cid for ids in by_node.values() for cid in ids[:3]]
    missing = [f"nobody-{unique}-{i}" for i in range(2)]
    with admin_client(env) as client:
        wait_for(lambda: client.health() == "SERVING", what="health SERVING")
        for cid in spread:
            assert client.get_score(cid).rfm.frequency == expected.customers[cid]["purchase_count"]
        with pytest.raises(grpc.RpcError) as err:
            client.get_score(missing[0])
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

        batch = client.batch_get_scores([missing[0], *spread, missing[1]])
        assert [s.customer_id for s in batch.scores] == spread
        assert list(batch.missing_ids) == missing
        for s in batch.scores:
            assert abs(s.rfm.monetary - expected.customers[s.customer_id]["net_monetary"]) < 1e-6

        st = client.pipeline_status()
        assert (st.events_applied, st.events_rejected, st.events_duplicate) == (
            expected.applied, expected.rejected, expected.duplicate)
        segments = client.list_segments()
        assert segments.customers_total == len(expected.customers)
        assert sum(c.customers for c in segments.by_rfm_segment) == len(expected.customers)
        report = orjson.loads(conn.hget(env.layout.model_report(), "doc"))
        assert client.model_report().model_version == report["model_version"]
        alerts = orjson.loads(conn.hget(env.layout.alert_report(), "doc"))
        assert {r.rule for r in client.alert_report().rules} == set(alerts["rules"])

        # Two customers whose documents live on different nodes: the hub subscribes on
        # one node, so at least one update crosses the cluster bus to reach it.
        watched = [ids[0] for ids in list(by_node.values())[:2]]
        calls = [client.watch(cid, timeout=120) for cid in watched]
        try:
            firsts = [next(call) for call in calls]
            assert [f.customer_id for f in firsts] == watched
            hub_nodes = subscribed_nodes(conn, [env.layout.updates(c) for c in watched])
            assert len(hub_nodes) == 1
            assert any(node_of(conn, env.layout.score(c)) not in hub_nodes for c in watched)
            time.sleep(1.0)  # idle longer than the Redis timeout: the subscription holds

            publish(env, [purchase(lines, cid, n) for n, cid in enumerate(watched)])
            assert env.start_flow("--until-end").wait(300) == 0  # resumes from its snapshot
            for call, first in zip(calls, firsts, strict=True):
                update = next(u for u in call if u.rfm.frequency == first.rfm.frequency + 1)
                assert update.version > first.version
                assert client.get_score(first.customer_id).version >= update.version
        finally:
            for call in calls:
                call.cancel()


# -- the sink ------------------------------------------------------------------------------


def test_sink_never_goes_back_across_slots_and_reloads_its_script(cluster, conn, unique):
    settings = Settings(redis_url=cluster.url, redis_cluster=True, redis_prefix=f"s{unique}:")
    layout = RedisLayout(settings.redis_prefix)
    claim_store(conn, layout)
    lost: list[str] = []
    sink = RedisDocSink(settings, on_lost=lost.append).build_part("redis", "0", None)
    nodes = {node.name: conn.get_redis_connection(node) for node in conn.get_primaries()}
    for node in nodes.values():
        node.script_flush()  # fresh nodes: every script call starts with NOSCRIPT

    def doc(cid: str, version: int) -> VersionedDoc:
        return VersionedDoc(layout.score(cid), version, orjson.dumps({"v": version}))

    ids = [f"c{i}" for i in range(600)]
    sink.write_batch([doc(c, 5) for c in ids])  # sent to each slot's node, not waited for
    sink.snapshot()  # the end of the epoch: refused for want of the script, so redone
    sha = hashlib.sha1(WRITE_IF_NEWER.encode()).hexdigest()
    assert all(node.script_exists(sha) == [True] for node in nodes.values())
    per_node = keys_per_node(conn, layout.score_pattern())
    assert len(per_node) == 3 and min(per_node.values()) > 0 and sum(per_node.values()) == 600

    # One node restarted and forgot its scripts; the batch mixes older versions (never
    # written), newer ones, and the same key twice.
    restarted = next(iter(nodes.values()))
    restarted.script_flush()
    batch = [doc(c, 3) for c in ids] + [doc(c, 7) for c in ids[::2]] + [doc(c, 6) for c in ids[::2]]
    random.Random(1).shuffle(batch)
    sink.write_batch(batch)
    sink.write_batch([doc(ids[1], 8)])  # the next batch confirms the one before first
    assert restarted.script_exists(sha) == [True]
    versions = {c: int(conn.hget(layout.score(c), "v")) for c in ids}
    assert versions == {c: 8 if c == ids[1] else 7 if i % 2 == 0 else 5
                        for i, c in enumerate(ids)}
    assert lost == []

    # The sink's connections dropped while idle: the next batch finds out and is redone.
    for node in nodes.values():
        node.client_kill_filter(_type="normal", skipme=True)
    sink.write_batch([doc(c, 9) for c in ids[:10]])
    sink.snapshot()
    assert [int(conn.hget(layout.score(c), "v")) for c in ids[:10]] == [9] * 10

    # PUBLISH from the script reaches a subscriber on another node than the document's.
    cid = ids[1]
    listener = next(r for name, r in nodes.items() if name != node_of(conn, layout.score(cid)))
    pubsub = listener.pubsub()
    pubsub.subscribe(layout.updates(cid))
    try:
        assert pubsub.get_message(timeout=5)["type"] == "subscribe"
        sink.write_batch([VersionedDoc(layout.score(cid), 10, b'{"v": 10}', layout.updates(cid))])
        message = pubsub.get_message(timeout=5)
        assert message is not None and message["data"] == b'{"v": 10}'
    finally:
        pubsub.close()
    sink.snapshot()

    conn.delete(layout.store_marker())  # the marker's node lost its data
    sink.write_batch([doc(ids[0], 11)])
    sink.snapshot()
    assert lost == [layout.store_marker()]
    sink.close()


# -- model promotion -----------------------------------------------------------------------


def test_models_promote_runs_its_two_key_script_on_the_cluster(cluster, conn, unique, capsys):
    layout = RedisLayout(f"m{unique}:")
    assert key_slot(layout.model_bundle().encode()) == key_slot(
        layout.model_candidate().encode())
    for version, frozen in ((2, False), (5, True)):
        d = bundle_doc(layout, ModelBundle(version=version, model_version=f"t@v{version}"),
                       frozen=frozen)
        conn.hset(d.key, mapping={"v": d.version, "doc": d.doc})
    argv = ["models", "promote", "--redis-url", cluster.url, "--redis-cluster", "on",
            "--redis-prefix", layout.prefix]
    assert cli_main(argv) == 0
    assert "promoted the candidate" in capsys.readouterr().out
    served = load_published(conn, layout.model_bundle())
    assert served is not None and served.version == 5
    assert cli_main(argv) == 0
    assert "not promoted" in capsys.readouterr().out


# -- the score store: a slot migration and a node down -------------------------------------


def test_store_follows_a_slot_migration_and_survives_a_node_down(unique):
    own = start_redis_cluster()  # this test moves a slot and stops a node
    conn = redis.RedisCluster.from_url(own.url)
    settings = Settings(redis_url=own.url, redis_cluster=True, redis_prefix=f"g{unique}:",
                        redis_timeout=0.3)
    layout = RedisLayout(settings.redis_prefix)
    store = open_store(settings)
    try:
        assert isinstance(store, ClusterScoreStore)
        ids = [f"c{i}" for i in range(60)]
        for cid in ids:
            conn.hset(layout.score(cid), mapping={"v": 1, "doc": cid})
        # The first call connects to every node: on a loaded machine that took longer
        # than the short deadline the node-down part below needs (CI, once). Warm up.
        for _ in range(5):
            try:
                store.get_many(ids)
                break
            except Unavailable:
                time.sleep(0.2)
        assert store.get_many([*ids, "nobody"]) == [cid.encode() for cid in ids] + [None]
        assert sorted(store.iter_docs()) == sorted(cid.encode() for cid in ids)
        store.ping()

        key = layout.score(ids[0])
        slot = conn.keyslot(key)
        source = conn.get_node_from_key(key)
        target = next(n for n in conn.get_primaries() if n.name != source.name)
        src, dst = conn.get_redis_connection(source), conn.get_redis_connection(target)
        src_id, dst_id = (r.execute_command("CLUSTER", "MYID") for r in (src, dst))
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        # Every key of the slot moves, not only ids[0]'s: another id may hash to the same
        # slot (0.4% of runs), and a key left behind is lost once the slot changes owner.
        in_slot = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, len(ids))
        assert key.encode() in in_slot
        src.execute_command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *in_slot)
        # Mid-migration the source answers ASK for the moved key: followed with ASKING.
        assert store.get(ids[0]) == ids[0].encode()
        for node in (target, source, *(n for n in conn.get_primaries()
                                       if n.name not in (source.name, target.name))):
            conn.get_redis_connection(node).execute_command(
                "CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        # Now it answers MOVED: the store reads the slot map again and asks the target.
        assert store.get(ids[0]) == ids[0].encode()
        assert store.get_many(ids) == [cid.encode() for cid in ids]

        # A node down (the third one: the test's client has the old slot map): its
        # customers are UNAVAILABLE within the deadline, the others are served.
        down = next(n for n in own.nodes if n.address not in (source.name, target.name))
        on_down = [c for c in ids if node_of(conn, layout.score(c)) == down.address]
        elsewhere = [c for c in ids if node_of(conn, layout.score(c)) != down.address]
        assert on_down and elsewhere
        down.stop()
        started = time.monotonic()
        with pytest.raises(Unavailable):
            store.get(on_down[0])
        assert time.monotonic() - started < 1.5
        assert store.get(elsewhere[0]) == elsewhere[0].encode()
        with pytest.raises(Unavailable):
            store.get_many([elsewhere[0], on_down[0]])
        with pytest.raises(Unavailable):
            store.ping()
    finally:
        store.close()
        conn.close()
        own.stop()
