"""``crmscore flow``: run the scoring dataflow, with recovery on by default.

Single process by default; ``-i/-a`` run one process of a bytewax cluster (one per
host:port in ``--addresses``), exactly as ``python -m bytewax.run`` does. The
recovery directory is initialised when empty, so a restarted flow resumes from
its last snapshot: per-customer state, status counts and Kafka offsets together.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import gc
import logging
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path

from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.run import cli_main

from crmscore.clients import ensure_topics
from crmscore.doc_codec import DocumentError
from crmscore.settings import Settings
from flows.heap_trim import HeapTrimmer
from flows.kafka_source import ProcessShare
from flows.metrics import SNAPSHOT_INTERVAL
from flows.metrics import serve as serve_metrics
from flows.model_registry import ModelRegistryError, restore_frozen_bundle
from flows.recovery_scan import WARN_SHARE, ScanWatch
from flows.scoring import build_flow
from models.alert_rules import AlertRulesError
from models.churn import ChurnModelsError

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    from crmscore.cli import add_setting_flags

    add_setting_flags(
        parser, "kafka_bootstrap", "redis_url", "redis_prefix", "redis_cluster",
        "transactions_topic", "dlq_topic", "alerts_topic", "timers_topic", "topic_partitions",
        "recovery_dir", "recovery_partitions", "snapshot_interval", "snapshot_scan_share",
        "backup_interval", "flow_metrics_port", "lateness_days", "max_future_seconds",
        "churn_horizon_days", "clv_horizon_days", "alert_rules", "churn_models",
    )
    parser.add_argument("--until-end", action="store_true",
                        help="stop at the end of the topic instead of waiting for new events")
    parser.add_argument("--no-recovery", action="store_true",
                        help="keep no snapshots: a restart starts from the beginning")
    parser.add_argument("--rewrite-store", action="store_true",
                        help="rewrite every customer's score document from the recovered "
                             "state (done by itself when Redis lost the flow's data)")
    parser.add_argument("-w", "--workers-per-process", type=int, default=1)
    parser.add_argument("-i", "--process-id", type=int, default=None,
                        help="this process's index in --addresses (cluster mode)")
    parser.add_argument("-a", "--addresses", default=None,
                        help="cluster mode: 'host:port;host:port', one per process")


def recovery_config(settings: Settings) -> RecoveryConfig:
    """The recovery config, creating the recovery partitions if the directory is empty.

    The processes of a cluster on one host share the directory: a lock file makes one of
    them create the partitions and the others find them.
    """
    db_dir = Path(settings.recovery_dir)
    db_dir.mkdir(parents=True, exist_ok=True)
    with open(db_dir / ".init.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not any(db_dir.glob("*.sqlite3")):
            init_db_dir(db_dir, settings.recovery_partitions)
            log.info("initialised %d recovery partitions in %s",
                     settings.recovery_partitions, db_dir)
    return RecoveryConfig(str(db_dir), backup_interval=timedelta(seconds=settings.backup_interval))


def tune_gc() -> None:
    """Make CPython's cyclic garbage collector run rarely.

    The flow holds one long-lived state object per customer and allocates many
    short-lived tuples per event; with the default thresholds, full collections keep
    re-scanning every customer's state (11% of the flow's time at 20k customers,
    growing with the population). Per-customer state has no reference cycles, so
    collecting seldom costs little memory.
    """
    gc.collect()
    gc.freeze()  # what exists at start-up is never garbage: keep it out of every scan
    gc.set_threshold(100_000, 50, 100)


def run(args: argparse.Namespace, settings: Settings) -> int:
    # A flow started in the background of a shell ignores SIGINT; make SIGTERM and
    # SIGINT both stop it at once. That is safe by design: a stop is a crash the flow
    # recovers from (state, counts and offsets resume from the last snapshot, and every
    # sink write is idempotent), and it spares bytewax's traceback of an exit raised
    # inside an operator.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, _exit_on_signal)
    ensure_topics(settings, [settings.transactions_topic, settings.dlq_topic,
                             settings.timers_topic, settings.alerts_topic])
    addresses = args.addresses.split(";") if args.addresses else None
    try:
        share = ProcessShare(args.process_id or 0, len(addresses) if addresses else 1)
    except ValueError as exc:
        log.error("-i/--process-id is %s: it counts from 0, below the number of --addresses",
                  exc)
        return 2
    try:
        flow = build_flow(settings, tail=not args.until_end,
                          on_lost=functools.partial(restart_on_store_lost, settings),
                          rewrite_store=args.rewrite_store, share=share)
    except (AlertRulesError, ModelRegistryError, ChurnModelsError, DocumentError) as exc:
        log.error("%s", exc)
        return 2
    tune_gc()
    recovery = None if args.no_recovery else recovery_config(settings)
    epoch_s = settings.snapshot_interval
    if recovery is not None:
        # Before bytewax opens the store: the interval is fixed for the run.
        watch = ScanWatch(Path(settings.recovery_dir), epoch_s,
                          share=settings.snapshot_scan_share or WARN_SHARE,
                          workers=share.processes * args.workers_per_process)
        epoch_s = watch.choose_interval(lengthen=settings.snapshot_scan_share > 0)
        watch.start()
    SNAPSHOT_INTERVAL.set(epoch_s)
    serve_metrics(settings.flow_metrics_port, share.index, Path(settings.recovery_dir).parent)
    if settings.heap_trim_seconds:
        HeapTrimmer(settings.heap_trim_seconds).start()
    log.info("flow starting: %s", settings.redacted())
    cli_main(
        flow,
        workers_per_process=args.workers_per_process,
        process_id=args.process_id,
        addresses=addresses,
        epoch_interval=timedelta(seconds=epoch_s),
        recovery_config=recovery,
    )
    return 0


def restart_on_store_lost(settings: Settings, marker: str) -> None:
    """Redis lost the flow's data: start again from the last snapshot, which rewrites
    every document from the recovered state and re-applies what came after it
    (flows/store_marker.py). Like a crash, and as safe."""
    log.error("Redis lost the flow's data (the key %r is gone): restarting from the last "
              "snapshot to write it again", marker)
    restore_frozen_bundle(settings)
    logging.shutdown()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def _exit_on_signal(signum: int, frame: object) -> None:
    log.info("flow stopping on signal %d; the next start resumes from the last snapshot",
             signum)
    logging.shutdown()
    os._exit(128 + signum)
