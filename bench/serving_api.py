"""Serving: GetScore and BatchGetScores latency at a fixed rate and peak QPS beside an
echo service on the same grpc stack.

Runs ``python -m serving.bench --seconds S`` (serving/bench.py: a private Redis seeded
with score documents, the servers in child processes, a grpc.aio client) as a child
process, quotes its table and reads its summary line.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.processes import command_failed, run_captured

TARGET_P99_MS = 2.0
TARGET_PEAK_SHARE = 0.6
_SUMMARY = re.compile(r"GetScore p99 at (?P<rate>[\d.]+)/s: (?P<p99>[\d.]+|nan) ms.*"
                      r"peak GetScore / echo: (?P<share>\d+)%")


@dataclass(frozen=True)
class Serving:
    seconds: float
    output: str
    rate: float
    p99_ms: float
    peak_share: float

    @property
    def p99_met(self) -> str:
        return "met" if self.p99_ms <= TARGET_P99_MS else "**not met**"

    @property
    def share_met(self) -> str:
        return "met" if self.peak_share >= TARGET_PEAK_SHARE else "**not met**"

    def summary(self) -> list[str]:
        return [
            f"| GetScore p99 at {self.rate:,.0f} QPS | **{self.p99_ms:.2f} ms** "
            f"| ≤ {TARGET_P99_MS:g} ms | {self.p99_met} |",
            f"| peak GetScore QPS / echo | **{self.peak_share:.0%}** "
            f"| ≥ {TARGET_PEAK_SHARE:.0%} | {self.share_met} |",
        ]

    def markdown(self) -> list[str]:
        return [
            f"`python -m serving.bench --seconds {self.seconds:g}`; its output:",
            "", "```", self.output.rstrip(), "```", "",
            f"GetScore p99 at {self.rate:,.0f} QPS: **{self.p99_ms:.2f} ms** "
            f"(target ≤ {TARGET_P99_MS:g} ms: {self.p99_met}); peak GetScore QPS / echo: "
            f"**{self.peak_share:.0%}** (target ≥ {TARGET_PEAK_SHARE:.0%}: {self.share_met}).",
        ]


def measure(seconds: float, workdir: Path) -> Serving:
    log = workdir / "serving-bench.log"
    done = run_captured([sys.executable, "-m", "serving.bench", "--seconds", str(seconds)], log)
    summary = _SUMMARY.search(done.stdout)
    if done.returncode != 0 or summary is None:
        raise command_failed("serving.bench", done, log)
    return Serving(seconds, done.stdout, float(summary["rate"]), float(summary["p99"]),
                   int(summary["share"]) / 100)
