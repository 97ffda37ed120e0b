"""The benchmark harness: one command, every figure of the performance issue, results
written to bench/RESULTS.md with the machine's facts.

    .venv/bin/python -m bench.run            # full sizes, ~6-15 min on the 2-core box
    .venv/bin/python -m bench.run --quick    # smoke sizes, ~1 min

Measures, in this order (each module's docstring says how):

1. throughput: the scoring flow vs the trivial keyed count/sum flow (bench/throughput.py);
2. freshness: event produced -> score visible through gRPC, at 300, 1k and 5k events/s
   (bench/freshness.py);
3. serving: GetScore / BatchGetScores latency and peak QPS vs echo (bench/serving_api.py);
4. memory: Redis and flow bytes per customer, recovery snapshot size and resume time;
   Redis at 100k and 1M customers; the flow's RSS at 20k and 100k customers (bench/memory.py);
5. scaling: 1 vs 2 flow processes on a 4-partition topic (bench/scaling.py).

Freshness, memory and scaling share one private broker and Redis; throughput and
serving start their own (crmscore/bench.py, serving/bench.py). A section that fails is
reported as failed and the others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import freshness, memory, scaling, serving_api, throughput
from bench.machine import facts, python_probe_seconds
from bench.processes import FlowRun, Pipeline, Stack, private_stack, run_flow_to_end

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("throughput", "freshness", "serving", "memory", "scaling")


@dataclass(frozen=True)
class Sizes:
    throughput_customers: int
    freshness_customers: int
    freshness_watched: int
    freshness_seconds: float
    freshness_wait_s: float  # most time to wait for the last samples after publishing
    serving_seconds: float
    flow_customers: int  # memory and scaling
    # 300/s: a load this machine's flow keeps up with; 1k and 5k/s: the rates
    freshness_rates: tuple[float, ...] = (300.0, 1000.0, 5000.0)
    redis_scales: tuple[int, ...] = memory.SCALES
    flow_scales: tuple[int, ...] = memory.FLOW_SCALES


FULL = Sizes(throughput_customers=5000, freshness_customers=2000, freshness_watched=50,
             freshness_seconds=20, freshness_wait_s=20, serving_seconds=5,
             flow_customers=15_000)
QUICK = Sizes(throughput_customers=300, freshness_customers=300, freshness_watched=10,
              freshness_seconds=5, freshness_wait_s=8, serving_seconds=1, flow_customers=300,
              redis_scales=(10_000,), flow_scales=(500, 1_000))


@dataclass
class Report:
    command: str
    quick: bool
    machine: list[tuple[str, str]] = field(default_factory=list)
    sections: dict[str, list[str]] = field(default_factory=dict)
    summary: list[str] = field(default_factory=list)  # table rows
    failed: list[str] = field(default_factory=list)

    def section(self, title: str, body: list[str], seconds: float, load: float,
                probe_s: float) -> None:
        self.sections[title] = [*body, "",
                                f"_Section took {seconds:.0f} s; when it started, the 1-min "
                                f"load average was {load:.2f} and the speed probe took "
                                f"{probe_s:.2f} s._"]

    def markdown(self) -> str:
        lines = ["# crmscore benchmark results", ""]
        if self.quick:
            lines += ["> **`--quick` smoke run**: small sizes that only show the harness "
                      "works; not figures to quote. The full run is "
                      "`.venv/bin/python -m bench.run`.", ""]
        lines += [f"Command: `{self.command}` (from the repository root; bench/run.py "
                  "says what each section measures).", "", "## Machine", ""]
        lines += [f"- {name}: {value}" for name, value in self.machine]
        lines += ["", "Broker, Redis, flows, servers and clients all run on this machine; "
                  "other work on it skews the figures (see each section's load average). The "
                  "speed probe times a fixed pure-Python loop: the same machine type has run "
                  "it in 0.34 s and in 1.23 s on one afternoon, and the flow's figures "
                  "follow it.",
                  "", "## Summary", "", "| measurement | figure | target | |", "|---|---|---|---|",
                  *self.summary]
        if self.failed:
            lines += ["", f"**Failed sections:** {', '.join(self.failed)} (see below)."]
        for n, (title, body) in enumerate(self.sections.items(), 1):
            lines += ["", f"## {n}. {title}", "", *body]
        return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke sizes (~1 min)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="run only these sections")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    parser.add_argument("--flow-scales", nargs="+", type=int, metavar="CUSTOMERS",
                        help="customer counts of the memory section's flow-at-scale runs "
                        f"(default {' '.join(map(str, FULL.flow_scales))}; 1000000 takes "
                        "~30 min and ~17 GiB of memory at its peak)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.flow_scales:
        sizes = dataclasses.replace(sizes, flow_scales=tuple(sorted(args.flow_scales)))
    report = Report(_command(sys.argv[1:] if argv is None else argv), args.quick)
    started = time.monotonic()

    with tempfile.TemporaryDirectory(prefix="crmscore-bench-run-") as tmp, \
            private_stack(Path(tmp)) as stack:
        report.machine = facts(stack)
        if "throughput" in args.only:
            _run(report, "Throughput", lambda: _throughput(report, sizes, Path(tmp)))
        if "freshness" in args.only:
            _run(report, "Freshness", lambda: _freshness(report, sizes, stack))
        if "serving" in args.only:
            _run(report, "Serving", lambda: _serving(report, sizes, Path(tmp)))
        _flow_runs(report, sizes, stack, args.only)

    report.machine.append(("harness wall time", f"{time.monotonic() - started:.0f} s"))
    text = report.markdown()
    args.out.write_text(text)
    print(text)
    _progress(f"written to {args.out}")
    return 1 if report.failed else 0


def _throughput(report: Report, sizes: Sizes, workdir: Path) -> list[str]:
    result = throughput.measure(sizes.throughput_customers, workdir)
    report.summary += result.summary()
    return result.markdown()


def _freshness(report: Report, sizes: Sizes, stack: Stack) -> list[str]:
    results = []
    for rate in sizes.freshness_rates:
        _progress(f"  freshness at {rate:,.0f} events/s")
        results.append(freshness.measure(stack, rate, sizes.freshness_seconds,
                                         sizes.freshness_customers, sizes.freshness_watched,
                                         sizes.freshness_wait_s))
    for result in results:
        report.summary += result.summary()
    return freshness.markdown(results)


def _serving(report: Report, sizes: Sizes, workdir: Path) -> list[str]:
    result = serving_api.measure(sizes.serving_seconds, workdir)
    report.summary += result.summary()
    return result.markdown()


@dataclass(frozen=True)
class FlowRuns:
    """The runs memory and scaling share: an empty run (start-up time, baseline RSS) and
    the 1-process run over the generated topic, after which memory is measured."""

    topic: str
    events: int
    empty: FlowRun
    one_pipeline: Pipeline
    used_memory_before: int
    one: FlowRun


def _flow_runs(report: Report, sizes: Sizes, stack: Stack, only: list[str]) -> None:
    @functools.cache
    def shared() -> FlowRuns:
        _progress("  publishing the generated events; an empty run")
        topic, events = scaling.publish_events(stack, sizes.flow_customers)
        empty = run_flow_to_end(Pipeline(stack, "empty"))
        _progress("  1 process")
        one = Pipeline(stack, "one", topic)
        used_before = memory.used_memory(stack)
        return FlowRuns(topic, events, empty, one, used_before, run_flow_to_end(one))

    def measure_memory() -> list[str]:
        runs = shared()
        result = memory.measure(runs.one_pipeline, runs.one, runs.empty,
                                runs.used_memory_before, runs.events)
        report.summary += result.summary()
        scales = [memory.redis_at_scale(runs.one_pipeline, n) for n in sizes.redis_scales]
        for scale in scales:
            report.summary += scale.summary()
        flows = []
        for n in sizes.flow_scales:
            _progress(f"  the flow over {n:,} customers")
            flows.append(memory.flow_at_scale(stack, n))
        report.summary += memory.flow_scale_summary(flows)
        return [*result.markdown(), "", *memory.scale_markdown(scales), "",
                *memory.flow_scale_markdown(flows, runs.empty)]

    def measure_scaling() -> list[str]:
        runs = shared()
        _progress("  2 processes")
        two = run_flow_to_end(Pipeline(stack, "two", runs.topic), processes=2)
        result = scaling.Scaling(runs.events, sizes.flow_customers, runs.empty, runs.one, two)
        report.summary += result.summary()
        return result.markdown()

    if "memory" in only:
        _run(report, "Memory", measure_memory)
    if "scaling" in only:
        _run(report, "Scaling", measure_scaling)


def _run(report: Report, title: str, measure: Callable[[], list[str]]) -> None:
    """Run one section, adding its body (or its failure) to the report."""
    _progress(f"{title} ...")
    load, probe_s = os.getloadavg()[0], python_probe_seconds()
    started = time.monotonic()
    try:
        lines = measure()
    except Exception as exc:  # a failed section must not lose the others' figures
        traceback.print_exc()
        report.failed.append(title)
        report.section(title, ["**Failed:**", "", "```", str(exc)[-3000:], "```"],
                       time.monotonic() - started, load, probe_s)
        return
    report.section(title, lines, time.monotonic() - started, load, probe_s)
    _progress(f"{title} done in {time.monotonic() - started:.0f} s")


def _command(argv: list[str]) -> str:
    python = Path(sys.executable)
    shown = python.relative_to(REPO) if python.is_relative_to(REPO) else python
    return shlex.join([str(shown), "-m", "bench.run", *argv])


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
