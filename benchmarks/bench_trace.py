"""Where a one-shard job's round trip goes: a time line of the requester and the worker.

``./mtor bench trace [--jobs 300] [--json] [--out FILE]``

The workload of the round-trip row of ``./mtor bench compute`` (row 1: a 512x512 float32
product, both operands sent, a fresh B each time, one worker process with 1 BLAS thread, the
requester in this process), with the steps of both peers timed (``benchmarks/steptrace.py``:
the requester's functions wrapped here, the worker run as ``python -m benchmarks.steptrace
run``). Both processes read one clock (CLOCK_MONOTONIC), so each step is placed from the
moment ``Node.submit`` was called. A cluster starts and 30 warm-up jobs run first; 300 jobs
take about 15 s in all on a 2-core machine. Anything else running on the machine shows in the
figures: the load average is printed with them.

The table gives, per step, its median start and median end over the jobs (each a median of
its own, so end - start may differ from the median duration, "takes"), for the steps seen in
most jobs (a step run twice in a job is numbered: "Freivalds sketch of B #2" is the check
asking for the job's sketch, which returns the one made while the worker computed). Steps
nested in others are not indented: "run the shard" spans from the request's building to the
answer's receipt. Gaps between steps are the glue the wrappers do not name: task switches,
bookkeeping, waiting. Steps marked "any thread" or "helper thread" may run beside the event
loop (``Runtime.beside``).

A tool for finding costs, not a goal's benchmark: the wrappers add about a microsecond per
step, and there is no baseline. The goal's figure is row 1 of ``./mtor bench compute``.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import trio

from benchmarks import steptrace
from benchmarks.bench_compute import mtor_cluster, quiet_libp2p
from benchmarks.machine import machine
from benchmarks.paths import user_path

WARMUP_JOBS = 30


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="./mtor bench trace",
        description=__doc__.split("\n\n", 2)[2].replace("``", "'"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--jobs", type=int, default=300, help="jobs timed (default 300, at least 10)"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--out", type=user_path, help="also write the JSON result to this file")
    return parser


def timeline(
    starts: list[float], events: dict[str, list[steptrace.Event]], jobs: int
) -> list[dict[str, Any]]:
    """Steps per process, each placed in the job whose submit it follows, numbered within
    the job, summarised by medians (ms from submit) over the jobs where they occur."""
    placed: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    for process, stamps in events.items():
        per_job: dict[int, list[steptrace.Event]] = collections.defaultdict(list)
        for label, start, end in stamps:
            job = _job_of(starts, start)
            if job is not None:
                per_job[job].append((label, start - starts[job], end - starts[job]))
        for steps in per_job.values():
            seen: collections.Counter[str] = collections.Counter()
            for label, start, end in sorted(steps, key=lambda step: step[1]):
                seen[label] += 1
                name = label if seen[label] == 1 else f"{label} #{seen[label]}"
                placed[f"{process}\t{name}"].append((start, end))
    rows = []
    for key, spans in placed.items():
        if len(spans) <= jobs // 2:
            continue
        process, name = key.split("\t")
        rows.append(
            {
                "process": process,
                "step": name,
                "start_ms": round(1e3 * statistics.median(s for s, _ in spans), 3),
                "end_ms": round(1e3 * statistics.median(e for _, e in spans), 3),
                "duration_ms": round(1e3 * statistics.median(e - s for s, e in spans), 3),
                "jobs": len(spans),
            }
        )
    return sorted(rows, key=lambda row: (row["start_ms"], row["end_ms"]))


def _job_of(starts: list[float], when: float) -> int | None:
    job = bisect.bisect_right(starts, when) - 1
    return job if job >= 0 else None


async def _worker_stamps(pid: int, path: Path) -> list[steptrace.Event]:
    """Ask the traced worker for its stamps (which empties its list) and read them."""
    stamps = trio.Path(path)
    await stamps.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    with trio.fail_after(10):
        while not await stamps.exists():  # renamed into place whole by the worker
            await trio.sleep(0.05)
    return [
        (label, float(start), float(end))
        for label, start, end in (
            line.split("\t") for line in (await stamps.read_text()).splitlines()
        )
    ]


async def trace(jobs: int) -> dict[str, Any]:
    quiet_libp2p()
    requester_events = steptrace.install(steptrace.REQUESTER_STEPS)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((512, 512), dtype=np.float32)
    b = rng.standard_normal((512, 512), dtype=np.float32)
    work = Path(tempfile.mkdtemp(prefix="mtor-bench-trace-"))
    worker_out = work / "worker-steps.tsv"
    os.environ["MTOR_STEPTRACE_OUT"] = str(worker_out)
    async with mtor_cluster(work / "cluster", 1, 1, worker_module="benchmarks.steptrace") as c:
        node = c.node
        for i in range(WARMUP_JOBS):
            a[0, 0] = b[0, 0] = i
            await node.submit("matmul", {"a": a, "b": b}, shards=1, max_workers=1)
        requester_events.clear()
        await _worker_stamps(c.processes[0].pid, worker_out)  # the warm-up's: dropped
        starts: list[float] = []
        seconds: list[float] = []
        for i in range(jobs):
            a[0, 0] = b[0, 0] = WARMUP_JOBS + i  # fresh values: nothing resident or cached
            starts.append(time.perf_counter())
            await node.submit("matmul", {"a": a, "b": b}, shards=1, max_workers=1)
            seconds.append(time.perf_counter() - starts[-1])
            if sys.stderr.isatty() and i % 50 == 49:
                print(f"\r{i + 1}/{jobs} jobs", end="", file=sys.stderr, flush=True)
        if sys.stderr.isatty():
            print(file=sys.stderr)
        worker_events = await _worker_stamps(c.processes[0].pid, worker_out)
    shutil.rmtree(work, ignore_errors=True)
    rows = timeline(starts, {"requester": requester_events, "worker": worker_events}, jobs)
    seconds.sort()
    return {
        "benchmark": "trace",
        "machine": machine(),
        "jobs": jobs,
        "p50_ms": round(1e3 * statistics.median(seconds), 3),
        "p90_ms": round(1e3 * seconds[int(0.9 * (len(seconds) - 1))], 3),
        "load": os.getloadavg()[0],
        "steps": rows,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.jobs < 10:
        print("--jobs: at least 10", file=sys.stderr)
        return 2
    if args.out is not None and not os.access(args.out.parent, os.W_OK):
        # Checked before a run whose result would be lost at the end.
        print(f"--out: cannot write into {args.out.parent}", file=sys.stderr)
        return 2
    result = trio.run(trace, args.jobs)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(
        f"{result['jobs']} one-shard 512³ jobs: p50 {result['p50_ms']:.2f} ms, "
        f"p90 {result['p90_ms']:.2f} ms ({result['machine'].get('cpu', '?')}, "
        f"load {result['load']:.2f} at the end)"
    )
    print(f"{'start':>7} {'end':>7} {'takes':>6}  process    step (ms from submit, medians)")
    for row in result["steps"]:
        print(
            f"{row['start_ms']:7.2f} {row['end_ms']:7.2f} {row['duration_ms']:6.2f}  "
            f"{row['process']:<10} {row['step']}"
        )
    return 0
