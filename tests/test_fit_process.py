"""The BTYD refit worker process (models/fit_process.py): off the flow's GIL, and gone
when the flow is."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

from models import fit_process


def test_work_runs_in_another_process() -> None:
    assert fit_process.submit(os.getpid).result(timeout=60) != os.getpid()


def test_work_runs_at_a_lower_cpu_priority_than_the_flow() -> None:
    # os.nice(0) reads the niceness without changing it
    assert fit_process.submit(os.nice, 0).result(timeout=60) == os.nice(0) + fit_process.NICENESS


def test_a_worker_exits_when_its_flow_is_killed() -> None:
    # A "flow" that starts the worker, prints its pid, then dies without any clean-up.
    script = textwrap.dedent("""
        import os
        from models import fit_process
        print(fit_process.submit(os.getpid).result(timeout=60), flush=True)
        os._exit(9)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=os.getcwd())
    worker = int(done.stdout.split()[0])
    deadline = time.monotonic() + 10 * fit_process.PARENT_POLL_S
    while _running(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(worker), f"worker {worker} outlived its flow"


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False
