"""``crmscore serve``: run the gRPC scoring API until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from crmscore.settings import Settings
from serving.auth import AuthConfigError
from serving.metrics import serve_metrics
from serving.server import ServerConfigError, create_server

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    from crmscore.cli import add_setting_flags

    add_setting_flags(
        parser, "grpc_address", "redis_url", "redis_prefix", "redis_cluster", "metrics_port",
        "auth", "tls_cert", "tls_key", "tls_client_ca", "grpc_workers", "redis_timeout",
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    log.info("settings %s", settings.redacted())
    try:
        server, port = create_server(settings)
    except (ServerConfigError, AuthConfigError) as exc:
        print(f"crmscore serve: {exc}", file=sys.stderr)
        return 2
    host = settings.grpc_address.rpartition(":")[0] or "0.0.0.0"
    serve_metrics(settings.metrics_port, "0.0.0.0" if host in ("", "[::]") else host)

    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, frame: object) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    server.start()
    log.info("serving port=%d", port)
    print(f"crmscore serve: listening on {host}:{port}", flush=True)
    stop.wait()
    grace = settings.grpc_grace_seconds
    log.info("stopping signal=%s grace_s=%.1f", received[0] if received else "-", grace)
    server.stop(grace).wait(grace + 5)
    log.info("stopped")
    return 0
