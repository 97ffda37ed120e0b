"""Flow throughput: the scoring flow with everything on beside the trivial keyed count/sum
flow, on the same broker, Redis and events, in the same run.

Runs ``crmscore bench --customers N`` (crmscore/bench.py: its own private broker and
Redis, each flow in-process to the end of the topic) as a child process, quotes its
table and takes the ratio of the scoring flow with recovery snapshots (as deployed) to
the trivial flow.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.processes import command_failed, run_captured

TARGET_RATIO = 0.5
_ROW = re.compile(r"^(?P<name>\S.*?)\s+(?P<seconds>[\d.]+)\s+(?P<rate>[\d,]+)\s+(?P<ratio>[\d.]+)$")


@dataclass(frozen=True)
class Row:
    seconds: float
    events_per_s: float


@dataclass(frozen=True)
class Throughput:
    customers: int
    output: str  # crmscore bench's stdout, quoted in the report
    rows: dict[str, Row]

    @property
    def trivial(self) -> Row:
        return self.rows["trivial keyed count/sum"]

    @property
    def everything_on(self) -> Row:
        return next(row for name, row in self.rows.items()
                    if name.startswith("scoring flow, recovery"))

    @property
    def ratio(self) -> float:
        """From the rates: crmscore bench prints its ratio column rounded to 0.01."""
        return self.everything_on.events_per_s / self.trivial.events_per_s

    @property
    def met(self) -> str:
        return "met" if self.ratio >= TARGET_RATIO else "**not met**"

    def summary(self) -> list[str]:
        return [f"| flow throughput, everything on / trivial flow | "
                f"{self.everything_on.events_per_s:,.0f} / {self.trivial.events_per_s:,.0f} "
                f"events/s = **{self.ratio:.1%}** | ≥ {TARGET_RATIO:.0%} "
                f"| {self.met} |"]

    def markdown(self) -> list[str]:
        return [
            f"`crmscore bench --customers {self.customers}` (generated events, 4 partitions); "
            "its output:",
            "", "```", self.output.rstrip(), "```", "",
            f"Scoring flow with everything on (recovery snapshots): "
            f"**{self.everything_on.events_per_s:,.0f} events/s** vs "
            f"{self.trivial.events_per_s:,.0f} for the trivial flow: "
            f"**{self.ratio:.1%}** (target ≥ {TARGET_RATIO:.0%}: {self.met}).",
        ]


def measure(customers: int, workdir: Path) -> Throughput:
    log = workdir / "crmscore-bench.log"
    done = run_captured(
        [sys.executable, "-m", "crmscore.cli", "bench", "--customers", str(customers)], log)
    if done.returncode != 0:
        raise command_failed("crmscore bench", done, log)
    rows = {}
    for line in done.stdout.splitlines():
        if match := _ROW.match(line):
            rows[match["name"]] = Row(float(match["seconds"]),
                                      float(match["rate"].replace(",", "")))
    return Throughput(customers, done.stdout, rows)
