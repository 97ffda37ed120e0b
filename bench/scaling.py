"""Scaling: the flow as 1 process and as a 2-process bytewax cluster (``-i/-a``) over the
same N events on one 4-partition topic.

Each run reads the topic to its end with a fresh Redis prefix and recovery directory;
the figure is wall seconds from start to the exit of every process, and the speedup is
t(1 process) / t(2 processes). Nothing is subtracted; the wall time of a run over an
empty topic (start-up and shutdown) is shown beside them so readers can judge.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.processes import FlowRun, Pipeline, Stack
from crmscore.generator import GeneratorConfig, generate
from crmscore.replay import publish_lines


@dataclass(frozen=True)
class Scaling:
    events: int
    customers: int
    empty: FlowRun
    one: FlowRun
    two: FlowRun

    @property
    def speedup(self) -> float:
        return self.one.seconds / self.two.seconds

    def summary(self) -> list[str]:
        return [f"| scaling: 1 -> 2 flow processes, 4 partitions (t1/t2) "
                f"| **{self.speedup:.2f}x** | | |"]

    def markdown(self) -> list[str]:
        def row(name: str, run: FlowRun, events: int) -> str:
            rate = f"{events / run.seconds:,.0f}" if events else "-"
            rss = ", ".join(f"{b / 2**20:,.0f}" for b in run.peak_rss_bytes)
            return f"| {name} | {run.seconds:.1f} | {rate} | {rss} |"

        return [
            f"{self.events:,} generated events of {self.customers:,} customers on one "
            f"4-partition topic; `crmscore flow --until-end`, recovery on.",
            "",
            "| run | wall s | events/s | peak RSS MiB per process |",
            "|---|---|---|---|",
            row("empty topic, 1 process (start-up + shutdown)", self.empty, 0),
            row("1 process", self.one, self.events),
            row("2 processes (`-i 0/1 -a ...`)", self.two, self.events),
            "",
            f"Speedup t1/t2: **{self.speedup:.2f}x** (nothing subtracted; this machine has "
            f"2 cores, shared with the broker, Redis and anything else running).",
        ]


def publish_events(stack: Stack, customers: int) -> tuple[str, int]:
    """Generated events of ``customers`` on a new topic: its name and the event count."""
    pipeline = Pipeline(stack, "events")
    lines = list(generate(GeneratorConfig(customers=customers, seed=7)).lines())
    publish_lines(pipeline.settings(), lines)
    return pipeline.topic, len(lines)
