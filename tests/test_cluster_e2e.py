"""Scale-out on bytewax's cluster mode: a 4-partition topic read by 2 flow processes, then
rescaled to 1 and up to 3 (stop, change the count, start), ends exact. Three processes
split the partitions unevenly (0 and 3, 1, 2: flows/kafka_source.py ProcessShare).

Each phase publishes a third of a generated stream (duplicates, refunds, disorder and
malformed events included) and runs the flow to the end of the topic; the final counts,
every customer's score document and the dead letters must equal a batch recomputation of
the whole stream, as for a single process (tests/test_pipeline_e2e.py). Rescaling keeps
state exact because bytewax routes each key's recovered state to whichever worker owns
the key in the new cluster.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from crmscore.embedded import free_port
from tests.pipeline import FlowEnv, check_final_state, generated_stream, log_tail, publish, status
from tests.reference import recompute

pytestmark = [pytest.mark.e2e]


def run_cluster(env: FlowEnv, processes: int) -> None:
    """The flow as a cluster of ``processes`` processes, to the end of the topic."""
    if processes == 1:
        assert env.start_flow("--until-end").wait(300) == 0
        return
    addresses = ";".join(f"127.0.0.1:{free_port()}" for _ in range(processes))
    procs = [env.start_flow("--until-end", "-i", str(i), "-a", addresses)
             for i in range(processes)]
    assert [p.wait(300) for p in procs] == [0] * processes


def test_two_processes_then_rescaled_to_one_and_up_to_three_end_exact(broker, redis_url, unique,
                                                                      tmp_path: Path):
    lines, malformed = generated_stream(tmp_path / "events.jsonl", customers=600, seed=31)
    assert malformed and len(lines) > 5_000
    env = FlowEnv(broker.address, redis_url, unique, tmp_path / "recovery")
    conn = redis.Redis.from_url(redis_url)

    thirds = [len(lines) // 3, 2 * len(lines) // 3, len(lines)]
    start = 0
    for processes, end in zip((2, 1, 3), thirds, strict=True):
        publish(env, lines[start:end])
        run_cluster(env, processes)
        st = status(conn, env.layout)
        assert st is not None and st["events_consumed"] == end, (processes, st)
        start = end
    check_final_state(env, conn, recompute(lines, malformed), len(lines))


def test_a_process_index_outside_the_addresses_is_refused_with_a_clear_error(
        broker, redis_url, unique, tmp_path: Path):
    env = FlowEnv(broker.address, redis_url, unique, tmp_path / "recovery")
    addresses = ";".join(f"127.0.0.1:{free_port()}" for _ in range(2))
    proc = env.start_flow("--until-end", "-i", "2", "-a", addresses)
    assert proc.wait(120) == 2
    assert "-i/--process-id is process 2 of 2" in log_tail(proc)
