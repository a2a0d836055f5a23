"""CPU per one-shard job: many at once over two workers, or one after another over one.

``python -m benchmarks.oneshard_probe both|rt [--rounds 3] [--n 512]``

``both``: 200 one-shard jobs submitted at once over a 2-worker cluster, each with its own A
and a fresh B (row 2's both-shipped workload as MTOR runs it). ``rt``: 60 one-shard jobs one
after another over one worker, both operands changed by one element each time (row 1's round
trip). Each round prints jobs/s (and the p50 for ``rt``), the requester's CPU per job (this
process), how long its event loop ran and waited runnable per job, the workers' CPU per job
(from ``/proc``) and the cores busy. The requester runs in this process, as in ``./mtor bench
compute``; every round runs on one settled cluster. ``--n 16`` leaves the per-job fixed cost
(bytes then cost next to nothing). A tool for finding costs, not a goal's benchmark: no
baseline; compare two trees by running it from each, alternating.
"""

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
from benchmarks.bshared_probe import main_thread

SHARDS = 200
SEQUENTIAL_JOBS = 60


async def probe(mode: str, rounds: int, n: int) -> None:
    rng = np.random.default_rng(1)
    a_all = rng.standard_normal((n * SHARDS, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    workers = 2 if mode == "both" else 1
    with tempfile.TemporaryDirectory() as root:
        async with mtor_cluster(Path(root), workers, 1) as cluster:
            node = cluster.node
            warm = rng.standard_normal((n * 8, n), dtype=np.float32)
            await node.submit("matmul", {"a": warm, "b": warm[:n].copy()}, shards=8)
            pids = [p.pid for p in cluster.processes]
            me = os.getpid()
            for round_ in range(rounds):
                workers_before = [procstats.cpu_seconds(p) for p in pids]
                mine_before = time.process_time()
                loop_before = main_thread(me)
                began = time.perf_counter()
                latencies: list[float] = []
                if mode == "both":

                    async def one(i: int, round_: int = round_) -> None:
                        b_i = b.copy()
                        b_i[0, 0] = round_ * 1000 + i
                        a_i = a_all[i * n : (i + 1) * n]
                        await node.submit("matmul", {"a": a_i, "b": b_i}, shards=1, max_workers=2)

                    async with trio.open_nursery() as nursery:
                        for i in range(SHARDS):
                            nursery.start_soon(one, i)
                    jobs = SHARDS
                else:
                    jobs = SEQUENTIAL_JOBS
                    a, bb = a_all[:n].copy(), b.copy()
                    for i in range(jobs):
                        a[0, 0] = bb[0, 0] = round_ * 1000 + i
                        start = time.perf_counter()
                        await node.submit("matmul", {"a": a, "b": bb}, shards=1, max_workers=1)
                        latencies.append(time.perf_counter() - start)
                seconds = time.perf_counter() - began
                mine = time.process_time() - mine_before
                theirs = sum(
                    procstats.cpu_seconds(p) - c for p, c in zip(pids, workers_before, strict=True)
                )
                ran, waited = main_thread(me)
                loop_ran, loop_waited = ran - loop_before[0], waited - loop_before[1]
                p50 = f" p50 {statistics.median(latencies) * 1e3:.2f} ms" if latencies else ""
                print(
                    f"{mode}: {jobs / seconds:6.1f} jobs/s{p50}; CPU per job: requester "
                    f"{mine * 1e3 / jobs:.2f} ms (its loop ran {loop_ran * 1e3 / jobs:.2f}, "
                    f"waited {loop_waited * 1e3 / jobs:.2f}), workers {theirs * 1e3 / jobs:.2f} ms;"
                    f" cores busy {(mine + theirs) / seconds:.2f}",
                    flush=True,
                )
                await trio.sleep(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["both", "rt"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=512, help="square operands' side (512)")
    args = parser.parse_args()
    quiet_libp2p()
    trio.run(probe, args.mode, args.rounds, args.n)


if __name__ == "__main__":
    main()
