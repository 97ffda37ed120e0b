"""``crmscore score CUSTOMER_ID [--watch]``: a customer's score card, or its live stream."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from datetime import UTC, datetime
from typing import Any

import grpc

from crmscore.settings import Settings
from serving.client import ScoringClient, stream


def configure(parser: argparse.ArgumentParser) -> None:
    from crmscore.cli import add_setting_flags

    parser.add_argument("customer_id", help="the customer's id")
    parser.add_argument(
        "--watch", action="store_true", help="keep printing the card at every change (Ctrl-C ends)"
    )
    add_setting_flags(
        parser, "grpc_address", "api_key", "grpc_timeout", "tls_ca", "tls_client_cert",
        "tls_client_key",
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    with ScoringClient.from_settings(settings) as client:
        try:
            if not args.watch:
                print(render(client.get_score(args.customer_id)))
                return 0
            call = client.watch(args.customer_id)
            # Ctrl-C cancels the call from another thread, and the stream then ends quietly;
            # a KeyboardInterrupt raised inside grpc's own code could leave its locks held.
            previous = signal.signal(
                signal.SIGINT,
                lambda *_: threading.Thread(target=call.cancel, daemon=True).start())
            try:
                for n, score in enumerate(stream(call)):
                    if n:
                        print("-" * 72)
                    print(render(score), flush=True)
            finally:
                signal.signal(signal.SIGINT, previous)
            return 0
        except grpc.RpcError as exc:
            print(f"crmscore score: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1


def _time(ts: Any) -> str:
    dt = datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, UTC)
    return dt.strftime("%Y-%m-%d %H:%M:%S UTC")


def _opt(msg: Any, field: str, fmt: str = "{:.2f}") -> str:
    return fmt.format(getattr(msg, field)) if msg.HasField(field) else "-"


def render(s: Any) -> str:
    """A score as a readable text card; unset fields show as '-'."""
    cur = s.currency
    rfm = s.rfm
    cell = " ".join(
        x for x in (
            f"cell {rfm.cell}" if rfm.HasField("cell") else "",
            rfm.segment if rfm.HasField("segment") else "",
        ) if x
    )
    first = _time(s.first_purchase_at) if s.HasField("first_purchase_at") else "-"
    last = _time(s.last_purchase_at) if s.HasField("last_purchase_at") else "-"
    gaps = (
        f"{s.gap_mean_days:.1f} ± {s.gap_std_days:.1f} d" if s.HasField("gap_mean_days") else "-"
    )
    windows = " | ".join(
        f"{name}: {w.purchases} bought, {w.spend:.2f} spent, {w.refunds:.2f} refunded"
        for name, w in (("30d", s.windows.last_30d), ("90d", s.windows.last_90d),
                        ("365d", s.windows.last_365d))
    )
    as_of = _time(s.as_of) if s.HasField("as_of") else "-"
    lines = [
        f"Customer {s.customer_id}   (version {s.version}, as of {as_of})",
        f"  RFM        recency {_opt(rfm, 'recency_days', '{:.1f} d')} · frequency "
        f"{rfm.frequency} · monetary {rfm.monetary:.2f} {cur}" + (f"   [{cell}]" if cell else ""),
        f"  Purchases  {s.purchase_count}   first {first}   last {last}   gaps {gaps}",
        f"  Spend      gross {s.gross_monetary:.2f} · refunds {s.refund_count} totalling "
        f"{s.refund_total:.2f} · net {s.net_monetary:.2f} {cur}",
        f"  Windows    {windows}",
        f"  Churn      risk {_opt(s, 'churn_risk', '{:.0%}')} within "
        f"{_opt(s, 'churn_horizon_days', '{:g} d')} · p(alive) {_opt(s, 'p_alive')}",
        f"  Value      CLV historic {_opt(s, 'clv_historic')} · predicted "
        f"{_opt(s, 'clv_predicted')} over {_opt(s, 'clv_horizon_days', '{:g} d')} · "
        f"expected purchases {_opt(s, 'expected_purchases')}",
        f"  Segment    lifecycle {_opt(s, 'lifecycle_stage', '{}')} · value tier "
        f"{_opt(s, 'value_tier', '{}')}",
        "  Strategy   " + (
            f"{s.strategy.name}: {s.strategy.reason}" if s.HasField("strategy") else "-"
        ),
        f"  Model      {_opt(s, 'model_version', '{}')}",
    ]
    return "\n".join(lines)
