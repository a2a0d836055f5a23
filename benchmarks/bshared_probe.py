"""Where a B-shared job's time goes: alternate variants of row 2's B-shared job on one cluster.

``python -m benchmarks.bshared_probe [--variants 2:auto,2:none] [--pairs 6] [--shards 200]``

Each variant is ``IN_FLIGHT:VERIFY``: shards in flight per worker (the scheduler's
``max_in_flight``, 2 by default) and the requester's check (``auto``: Freivalds', ``none``).
The variants run in turn on one settled 2-worker cluster (the requester in this process, as in
``./mtor bench compute``), each job with a fresh B, and every job prints shards/s, CPU per shard
of the requester and of each worker (from ``/proc``), the cores busy, and the seconds each
process was runnable but waiting for a core (``/proc/<pid>/task/*/schedstat``), and the same two
for the requester's event loop (its main thread) per shard. The medians of
each variant close the run. A tool for finding costs, not a goal's benchmark: no baseline."""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import trio

from benchmarks import procstats
from benchmarks.bench_compute import mtor_cluster, quiet_libp2p


def run_and_wait(pid: int) -> tuple[float, float]:
    """Seconds process ``pid`` (all its threads) has run, and waited runnable for a core."""
    ran = waited = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                fields = f.read().split()
        except OSError:  # a thread that ended meanwhile
            continue
        ran += int(fields[0])
        waited += int(fields[1])
    return ran / 1e9, waited / 1e9


def main_thread(pid: int) -> tuple[float, float]:
    """Seconds process ``pid``'s main thread (a trio program's event loop) has run, and
    waited runnable for a core: when their sum is near the job's wall time, the loop is what
    bounds the job."""
    with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
        fields = f.read().split()
    return int(fields[0]) / 1e9, int(fields[1]) / 1e9


async def probe(variants: list[tuple[int, str]], pairs: int, shards: int) -> None:
    rng = np.random.default_rng(1)
    n = 512
    a = rng.standard_normal((n * shards, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    results: dict[tuple[int, str], list[tuple[float, float, float, float]]] = {
        v: [] for v in variants
    }
    with tempfile.TemporaryDirectory() as root:
        async with mtor_cluster(Path(root), 2, 1) as cluster:
            node = cluster.node
            warm = rng.standard_normal((n * 8, n), dtype=np.float32)
            await node.submit("matmul", {"a": warm, "b": warm[:n].copy()}, shards=8)
            pids = [p.pid for p in cluster.processes]
            me = os.getpid()
            for pair in range(pairs):
                for in_flight, verify in variants:
                    node.scheduler.max_in_flight = in_flight
                    fresh_b = b.copy()
                    fresh_b[0, 0] = pair * len(variants) + len(results[(in_flight, verify)])
                    cpu0 = [procstats.cpu_seconds(p) for p in pids]
                    mine0 = time.process_time()
                    sched0 = [run_and_wait(p) for p in [me, *pids]]
                    loop0 = main_thread(me)
                    started = time.perf_counter()
                    await node.submit(
                        "matmul", {"a": a, "b": fresh_b}, shards=shards, verify=verify
                    )
                    seconds = time.perf_counter() - started
                    mine = time.process_time() - mine0
                    workers = [
                        procstats.cpu_seconds(p) - c for p, c in zip(pids, cpu0, strict=True)
                    ]
                    waits = [
                        round(run_and_wait(p)[1] - s[1], 2)
                        for p, s in zip([me, *pids], sched0, strict=True)
                    ]
                    loop1 = main_thread(me)
                    loop = [(b - a) * 1e3 / shards for a, b in zip(loop0, loop1, strict=True)]
                    busy = (mine + sum(workers)) / seconds
                    results[(in_flight, verify)].append(
                        (shards / seconds, mine * 1e3 / shards, sum(workers) * 1e3 / shards, busy)
                    )
                    print(
                        f"{in_flight}:{verify}: {shards / seconds:6.1f} shards/s, CPU per shard"
                        f" requester {mine * 1e3 / shards:.2f} ms, workers "
                        f"{' + '.join(f'{w * 1e3 / shards:.2f}' for w in workers)} ms; "
                        f"{busy:.2f} cores busy; waited for a core (s): requester {waits[0]}, "
                        f"workers {waits[1:]}; the requester's event loop ran {loop[0]:.2f} and "
                        f"waited {loop[1]:.2f} ms per shard",
                        flush=True,
                    )
                    await trio.sleep(1.5)
    print("medians:")
    for (in_flight, verify), rows in results.items():
        columns = list(zip(*rows, strict=True))
        print(
            f"  {in_flight}:{verify}: {statistics.median(columns[0]):.1f} shards/s, requester "
            f"{statistics.median(columns[1]):.2f} ms/shard, workers "
            f"{statistics.median(columns[2]):.2f} ms/shard, {statistics.median(columns[3]):.2f}"
            " cores busy"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="2:auto,2:none", help="IN_FLIGHT:VERIFY,...")
    parser.add_argument("--pairs", type=int, default=6, help="jobs of each variant")
    parser.add_argument("--shards", type=int, default=200, help="shards of 512 rows per job")
    args = parser.parse_args()
    variants = []
    for text in args.variants.split(","):
        in_flight, _, verify = text.partition(":")
        variants.append((int(in_flight), verify or "auto"))
    quiet_libp2p()
    trio.run(probe, variants, args.pairs, args.shards)


if __name__ == "__main__":
    main()
