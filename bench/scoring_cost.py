"""Dev-only: the scoring flow's Python work per event, in one process, without Kafka,
Redis or bytewax: where to look before optimising, and a before/after yardstick that
the broker and the machine's other work do not blur.

Generated events (the same generator as ``crmscore bench``) are parsed and go, one batch
per event, through the customers step's logic (flows/scoring.py ``CustomerLogic``,
documents encoded and customers pickled as in the flow) and, with what it emits, the
models step's (``ModelsLogic``: labels learned, population observed, BTYD refits in
their worker process). The timer buckets are a heap of registrations fired when the
stream clock (the newest event time read) passes the end of their hour, as the clock's
ticks fire them (flows/timers.py); a fired wake-up is the next batch of its customer.
A published bundle reaches the customers at once (in the flow, through Redis, within
``CRMSCORE_MODEL_PUBLISH_SECONDS`` + 0.5 s); after a promotion each customer is rescored
by its next batch, without the flow's rescore wake-ups.

Prints the µs per event spent in each step, the customers step's split between the
events and the wake-ups (wall time of this one thread: run it on a quiet machine), and
the wake-ups per event. The heap fires every registration as soon as the clock passes
its hour, as a live flow does; a full-speed replay's wake-ups trail the events and catch
up several instants at once, so it runs fewer batches than this.
``--profile`` adds the functions with the most own time (cProfile: ~2x slower).

Run: ``.venv/bin/python -m bench.scoring_cost [--customers 1500] [--days 365] [--profile]``
"""

from __future__ import annotations

import argparse
import cProfile
import heapq
import os
import pstats
import sys
import time
from typing import Any

from bytewax.connectors.kafka import KafkaSourceMessage

from crmscore.generator import GeneratorConfig, generate
from crmscore.layout import RedisLayout
from crmscore.settings import Settings
from flows.clock import Counts
from flows.live_customers import LiveCustomers
from flows.scoring import Accepted, CustomerLogic, Message, ModelsLogic, parse
from flows.timers import BUCKET_US, Cancel, Registration, Wake
from models.alert_rules import load_rules
from models.churn import DEFAULT_CHALLENGERS, LabeledExample
from models.scoring import ModelBundle, PopulationRow, ScoringConfig

TIMERS = "timers"


class Bundles:
    """What ``BundleCache`` gives the customers: here, the newest bundle published."""

    def __init__(self, bundle: ModelBundle) -> None:
        self.bundle = bundle

    def get(self) -> ModelBundle:
        return self.bundle

    def at_least(self, version: int) -> ModelBundle:
        return self.bundle


def messages(customers: int, days: float, seed: int) -> list[Accepted]:
    """The generator's valid events, parsed, in publication order."""
    config = GeneratorConfig(customers=customers, days=days, seed=seed, malformed_rate=0.0)
    out = []
    for offset, line in enumerate(generate(config).lines()):
        msg: Message = KafkaSourceMessage(key=None, value=line, topic="transactions",
                                          offset=offset, partition=0)
        item = parse(msg, 2**62, TIMERS, 0)
        if isinstance(item, Accepted):
            out.append(item)
    return out


def replay(events: list[Accepted]) -> dict[str, Any]:
    """Every event, then the wake-ups it leads to, through both steps; seconds in each."""
    config = ScoringConfig()
    layout = RedisLayout("cost:")
    rules = load_rules(None)
    bundles = Bundles(ModelBundle(config=config))
    settings = Settings.from_env(os.environ)  # CRMSCORE_LIVE_CUSTOMERS, ...
    models = ModelsLogic(None, config, layout, settings.model_publish_seconds,
                         settings.btyd_refit_days, frozen=False, challengers=DEFAULT_CHALLENGERS)
    customers: dict[str, CustomerLogic] = {}
    live = LiveCustomers(settings.live_customers)
    due: list[tuple[int, str, int]] = []  # (end of the due instant's hour, customer, due)
    cancelled: set[tuple[str, int]] = set()
    # The customers step's time on events, and on wake-ups (due instants without an event)
    spent = {"customers, events": 0.0, "customers, wake-ups": 0.0, "models": 0.0}
    batches = wakes = 0

    def run_customer(cid: str, item: Accepted | Wake) -> None:
        nonlocal batches
        logic = customers.get(cid)
        if logic is None:
            logic = customers[cid] = CustomerLogic(None, bundles, layout, rules, live)  # type: ignore[arg-type]
        started = time.perf_counter()
        emitted, _ = logic.on_batch([item])
        logic.snapshot()  # the flow pickles each customer at the end of its batch
        kind = "customers, wake-ups" if isinstance(item, Wake) else "customers, events"
        spent[kind] += time.perf_counter() - started
        batches += 1
        to_models: list[LabeledExample | PopulationRow | Counts] = []
        for e in emitted:
            if isinstance(e, Registration):
                heapq.heappush(due, ((e.due_us // BUCKET_US + 1) * BUCKET_US, e.customer_id,
                                     e.due_us))
            elif isinstance(e, Cancel):
                cancelled.add((e.customer_id, e.due_us))
            elif isinstance(e, LabeledExample | PopulationRow):
                to_models.append(e)
        if to_models:
            started = time.perf_counter()
            published = models.on_batch(to_models)[0]
            spent["models"] += time.perf_counter() - started
            if published:
                bundles.bundle = models.population.bundle()

    clock = 0
    for item in events:
        clock = max(clock, item.tx.occurred_at_us)
        while due and due[0][0] <= clock:  # the clock ticked the hour: fire its wake-ups
            _, cid, at = heapq.heappop(due)
            if (cid, at) in cancelled:
                cancelled.discard((cid, at))
                continue
            wakes += 1
            run_customer(cid, Wake(cid, max(at, clock)))
        run_customer(item.tx.customer_id, item)
        started = time.perf_counter()
        models.population.advance(clock)
        models.population.maybe_refit()
        spent["models"] += time.perf_counter() - started
    models.population.wait_for_fit(60)
    return {"spent": spent, "batches": batches, "wakes": wakes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=1500)
    parser.add_argument("--days", type=float, default=365.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="cProfile: top own times")
    args = parser.parse_args()
    events = messages(args.customers, args.days, args.seed)
    profiler = cProfile.Profile() if args.profile else None
    if profiler:
        profiler.enable()
    result = replay(events)
    if profiler:
        profiler.disable()
    n = len(events)
    spent = result["spent"]
    print(f"{n:,} events of {args.customers:,} customers over {args.days:g} days; "
          f"{result['wakes']:,} wake-ups ({result['wakes'] / n:.2f} per event)")
    for step, seconds in spent.items():
        print(f"  {step:20s} {seconds / n * 1e6:8.1f} µs/event  ({seconds:.2f} s)")
    print(f"  {'in all':20s} {sum(spent.values()) / n * 1e6:8.1f} µs/event"
          + (" (under cProfile)" if profiler else ""))
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
