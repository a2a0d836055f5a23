"""The goals table of issue 9, each row the same workload on MTOR and on its baseline.

Every row runs its sides interleaved (MTOR, baseline, MTOR, baseline, ...) for ``--rounds``
rounds; each figure carries the load average and the CPU that other processes on the machine
used while it was measured ("foreign cores"); ratios MTOR/baseline are taken within each
round (its sides run one after the other; rounds, and so a side's runs, are minutes apart)
and summarised by their median. Each side of a round starts
its own processes and stops them after, so no side runs beside another's idle cluster.

Rows (``--only 1,3``):

1. a 512x512 float32 matmul shard round trip on loopback, both operands sent (fresh values
   each time), one worker process: MTOR's ``Node.submit`` (one-shard job, verification and
   receipt included) from an in-process requester, against Ray and Dask (one task each);
2. shards per second with 2 worker processes: 512x512x512 shards, B shared (MTOR: one job of
   row shards; Ray ``ray.put``, Dask ``scatter``: the same bytes move) and both operands per
   shard (MTOR: one-shard jobs, Ray and Dask: one task each; every one submitted at once);
3. bulk bytes over one authenticated connection between two processes: MTOR
   ``Libp2pNetwork.request`` (its lane) carrying 4 MiB requests (the compute protocols' chunk)
   and 64 MiB requests each way, against one TCP socket and one TLS 1.3 connection (Python
   ``ssl``) moving the same bytes the same way;
4. a worker SIGKILLed mid-shard to the accepted result, the same 2048x2048x2048 float32 shard
   on every side, 2 workers, the kill 0.05 s after the shard starts computing;
5. DHT get with 20 peers, each in its own process (p50/p99), beside a request on an open
   connection among the same processes; hivemind is quoted from the notes (not run: it needs
   PyTorch);
6. an 8192x8192 float32 product over 1, 2 and 4 local MTOR worker processes against one NumPy
   process on the same cores, in GFLOP/s (``--quick``: 2048), each MTOR side against the
   NumPy runs just before and just after it, and against its ceiling: the same shards over
   as many plain NumPy processes, nothing moved or checked;
7. worker memory after row 2's workload, the same readings on every side: RSS once idle,
   peak RSS (VmHWM), USS (``--only 7`` runs row 2's sessions);
8. (not a goal) Freivalds' check and sampled rows timed alone beside the product they check.

Every worker process on every side gets 1 BLAS thread (``OPENBLAS_NUM_THREADS`` and friends in
its environment), except in row 6, where MTOR workers get ``cores / workers`` (at least 1) and
NumPy gets ``cores``. Ray and Dask are installed on first use into venvs under
``$MTOR_BASELINES_WORK`` (default ``~/.cache/mtor/baselines``; see ``benchmarks/baselines.py``);
if they cannot be installed, their columns say "baseline unavailable" and the run still exits 0.

Writes ``benchmarks/results/compute.json`` after every row; a summary goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import trio

from benchmarks import baselines, procstats
from benchmarks.machine import describe as describe_machine
from benchmarks.machine import machine
from benchmarks.paths import user_path

RESULTS = Path(__file__).with_name("results")
ROOT = Path(__file__).resolve().parent.parent
BASELINE_SIDES = ("ray", "dask")
ROW_NAMES = {
    1: "roundtrip_512",
    2: "shards_per_s_2_workers",
    3: "bulk_bytes",
    4: "kill_to_result",
    5: "dht_get_20_procs",
    6: "product_scaling",
    7: "memory",
    8: "verification_alone",
}
#: hivemind 1.1.12, 8 DHT nodes on loopback, each a process with its own go daemon
#: (../shared/notes/peer-baselines.md, measured 2026-11 on a project machine; not this run).
HIVEMIND_NOTES = {
    "get_p50_ms": "3-5.5",
    "get_p99_ms": "4-9",
    "store_p50_ms": "4-7",
    "nodes": 8,
    "source": "../shared/notes/peer-baselines.md (quoted, not measured in this run: hivemind "
    "needs PyTorch, a multi-GB install)",
}
GOALS = {
    1: "MTOR p50 at most 1.0x Ray's (0.7x stretch)",
    2: "MTOR shards/s at least 1.2x Dask's",
    3: "MTOR at least 500 MiB/s",
    4: "MTOR kill-to-result at most 1.0x Ray's",
    5: "MTOR get p50 at most 50 ms",
    6: "MTOR at 2 and 4 workers at least 0.8x NumPy's GFLOP/s",
    7: "(no goal: the same readings on every side)",
    8: "(no goal: what the requester's checks cost beside the product, measured alone)",
}

#: The ratios each goal is judged by (the median of rounds against the line), for the rows
#: whose goal is a ratio; rows 3 and 5 state absolute figures, read from their rounds.
GOAL_RATIOS: dict[int, list[tuple[str, str, float]]] = {
    1: [("mtor/ray p50_ms", "<=", 1.0)],
    2: [("mtor/dask b_shared_shards_per_s", ">=", 1.2),
        ("mtor/dask both_shipped_shards_per_s", ">=", 1.2)],
    4: [("mtor/ray kill_to_result_p50_s", "<=", 1.0)],
    6: [("mtor_2w/numpy_around_2w gflops", ">=", 0.8),
        ("mtor_4w/numpy_around_4w gflops", ">=", 0.8)],
}  # fmt: skip


def goal_verdicts(row: int, ratios: dict[str, Any]) -> list[str]:
    """One line per ratio the row's goal is judged by: its median against the line."""
    lines = []
    for name, sense, line in GOAL_RATIOS.get(row, []):
        found = ratios.get(name)
        if not isinstance(found, dict):
            lines.append(f"{name}: not measured")
            continue
        median = found["median"]
        met = median <= line if sense == "<=" else median >= line
        lines.append(f"{name} {median:.3g}x, goal {sense} {line:g}x: {'met' if met else 'short'}")
    return lines


#: Row 4's kill, this long after the shard is seen computing. 0.1 s until 2026-12-06: on the
#: Intel Xeon a 2048³ product takes about 0.12 s on one thread, and in the fifty-second
#: sitting 7 of 10 of Ray's tries in one round were killed after the task had finished.
KILL_DELAY_S = 0.05


@dataclass
class Settings:
    quick: bool
    rounds: int
    rt_samples: int
    rt_warmup: int
    shards: int
    #: (request size, requests each way): the compute protocols' chunk (4 MiB, what an upload
    #: or download moves per request) and a large request, the same bytes in all.
    bulk: tuple[tuple[int, int], ...]
    kill_trials: int
    kill_n: int
    kill_delay: float
    dht_peers: int
    dht_owners: int
    echo_count: int
    product_n: int
    product_workers: tuple[int, ...]

    @classmethod
    def make(cls, quick: bool, rounds: int) -> Settings:
        if quick:
            return cls(quick, rounds, 15, 3, 40, ((4 << 20, 32), (64 << 20, 2)), 1, 2048,
                       KILL_DELAY_S, 8, 2, 10, 2048, (1, 2, 4))  # fmt: skip
        return cls(quick, rounds, 60, 10, 200, ((4 << 20, 128), (64 << 20, 8)), 3, 2048,
                   KILL_DELAY_S, 20, 5, 20, 8192, (1, 2, 4))  # fmt: skip


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {procstats.loadavg1():.2f}] {message}",
          file=sys.stderr, flush=True)  # fmt: skip


def progress_log(label: str) -> Callable[[int, int], None]:
    """A ``Node.submit`` progress callback that logs at each quarter of the shards."""
    marks: set[int] = set()

    def report(done: int, total: int) -> None:
        quarter = done * 4 // max(total, 1)
        if quarter and quarter not in marks:
            marks.add(quarter)
            log(f"  {label}: {done}/{total} shards accepted")

    return report


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=False
        )
        return done.stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty_files": dirty.splitlines()[:20],
    }


def summary_ms(values: list[float]) -> dict[str, Any]:
    ordered = sorted(values)

    def pct(q: float) -> float:
        k = (len(ordered) - 1) * q
        lo = int(k)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)

    return {
        "n": len(values),
        "p50_ms": round(statistics.median(values) * 1e3, 3),
        "p99_ms": round(pct(0.99) * 1e3, 3),
        "mean_ms": round(statistics.fmean(values) * 1e3, 3),
        "min_ms": round(ordered[0] * 1e3, 3),
    }


def pooled(raw: list[dict[str, Any]], samples: Callable[[dict[str, Any]], list[float]]) -> Any:
    """Every round's samples of each side together: p50/p99 over the whole run."""
    sides: dict[str, list[float]] = {}
    for answers in raw:
        for side, answer in answers.items():
            if "error" not in answer and "unavailable" not in answer:
                sides.setdefault(side, []).extend(samples(answer))
    return {side: summary_ms(values) for side, values in sides.items() if values}


def load_of(section: dict[str, Any]) -> dict[str, Any]:
    return {
        "load1": round((section["load1_start"] + section["load1_end"]) / 2, 2),
        "foreign_cores": section["foreign_cores"],
    }


# -- MTOR clusters ---------------------------------------------------------------------------


def start_worker(
    data_dir: Path, bootstrap: str | None, blas_threads: int, module: str = "mtor_p2p"
) -> subprocess.Popen[str]:
    """An ``mtor-peer run`` process (``module``: another entry point that runs the same CLI,
    such as ``benchmarks.steptrace``, which times a worker's steps)."""
    command = [
        sys.executable, "-m", module, "run", "--data-dir", str(data_dir),
        "--listen", "/ip4/127.0.0.1/tcp/0", "--no-default-bootstrap", "--gpu", "none", "--json",
    ]  # fmt: skip
    if bootstrap:
        command += ["--bootstrap", bootstrap]
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **baselines.blas_env(blas_threads)}
    log_path = data_dir.parent / f"{data_dir.name}.log"
    with open(log_path, "w") as stderr:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=str(ROOT),
        )
    process.log_path = log_path  # type: ignore[attr-defined]
    return process


def ready_line(process: subprocess.Popen[str]) -> dict[str, Any]:
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        code = process.wait()
        log_path = getattr(process, "log_path", None)
        tail = log_path.read_text()[-1200:] if log_path and log_path.exists() else ""
        raise RuntimeError(f"process exited with {code} before it was ready: {tail}")
    return json.loads(line)


def stop(processes: list[subprocess.Popen[str]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class MtorCluster:
    node: Any
    processes: list[subprocess.Popen[str]]
    data_dirs: list[Path]
    #: Seconds waited after the cluster formed for its start-up traffic to die down.
    settled_s: float = 0.0


#: A formed cluster has settled when its processes (workers and the harness, which runs the
#: requester) used at most this share of a core each, on average over SETTLE_WINDOW_S; it is
#: waited for at most SETTLE_MAX_S.
SETTLE_BUSY_SHARE = 0.03
SETTLE_WINDOW_S = 1.0
SETTLE_MAX_S = 20.0


async def settle(pids: list[int]) -> float:
    """Wait until the processes ``pids`` and this one are near idle (see SETTLE_BUSY_SHARE);
    the seconds waited.

    For the first seconds after a cluster forms, every peer is busy joining: subscriptions
    and mesh grafts, replays of recent gossip, first ledger pulls, lanes opening, DHT puts.
    On the project's 2-core VM that was 0.3-0.45 of a core across five peers in the first
    two seconds, falling to the idle 1% of a core each about five seconds in; the rows used
    to time their jobs from about one second in. An 8192² product over 4 workers on fresh
    clusters, the two orders alternating, 2 pairs: 6.98 and 7.17 s timed at once, 6.88 and
    6.89 s after settling (which took 3.0 s each time). None of the baselines has such a
    phase, and a peer serving jobs has long passed it."""
    started = time.monotonic()
    while time.monotonic() - started < SETTLE_MAX_S:
        before = sum(procstats.cpu_seconds(pid) for pid in pids) + time.process_time()
        window_start = time.monotonic()
        await trio.sleep(SETTLE_WINDOW_S)
        used = sum(procstats.cpu_seconds(pid) for pid in pids) + time.process_time() - before
        if used / (time.monotonic() - window_start) <= SETTLE_BUSY_SHARE * (len(pids) + 1):
            break
    return time.monotonic() - started


@asynccontextmanager
async def mtor_cluster(
    root: Path, workers: int, blas_threads: int, worker_module: str = "mtor_p2p"
) -> AsyncIterator[MtorCluster]:
    """``workers`` fresh ``mtor-peer run`` processes and an in-process requester node.

    Every peer runs with the defaults an operator gets (a capacity record every 20 s, live
    60 s): the cluster still forms in about 5 s, each peer's first record going out as it
    starts; it is then given until its start-up traffic has died down (:func:`settle`).
    Until 2026-12-04 they announced every 2 s (live 30 s), a test setting: each idle peer
    then used 3.7% of a core with two workers, 5-8% with four (gossip, DHT puts and their
    checks on every other peer), taken from the cores every row measures; 1.1% with the
    defaults (two workers, one minute idle, this VM)."""
    from mtor_p2p.config import NodeConfig
    from mtor_p2p.node import Node

    processes: list[subprocess.Popen[str]] = []
    data_dirs = [root / f"w{i}" for i in range(workers)]
    try:
        processes.append(start_worker(data_dirs[0], None, blas_threads, worker_module))
        first = await trio.to_thread.run_sync(ready_line, processes[0])
        bootstrap = first["addrs"][0]
        for data_dir in data_dirs[1:]:
            processes.append(start_worker(data_dir, bootstrap, blas_threads, worker_module))
        for process in processes[1:]:
            await trio.to_thread.run_sync(ready_line, process)
        config = NodeConfig(
            data_dir=root / "requester",
            listen=["/ip4/127.0.0.1/tcp/0"],
            bootstrap=[bootstrap],
            use_default_bootstrap=False,
            gpu="none",
        )
        async with Node.open(config) as node:
            with trio.fail_after(120):
                while True:
                    live = node.capacity.view.live(node.clock.now())
                    if len([r for r in live if r.peer_id != node.peer_id]) >= workers:
                        break
                    await trio.sleep(0.1)
            settled_s = await settle([p.pid for p in processes])
            yield MtorCluster(node, processes, data_dirs, settled_s)
    finally:
        stop(processes)
        shutil.rmtree(root, ignore_errors=True)


def mtor_memory(processes: list[subprocess.Popen[str]]) -> dict[str, Any]:
    summary = procstats.memory_summary([p.pid for p in processes], [])
    summary["note"] = "the requester runs inside the harness process and is not counted"
    return summary


# -- MTOR sides of rows 1, 2, 4, 6 -----------------------------------------------------------


async def mtor_roundtrip(root: Path, s: Settings) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((512, 512), dtype=np.float32)
    b = rng.standard_normal((512, 512), dtype=np.float32)
    async with mtor_cluster(root, 1, 1) as cluster:
        node = cluster.node
        for i in range(s.rt_warmup):
            a[0, 0] = b[0, 0] = i
            await node.submit("matmul", {"a": a, "b": b}, shards=1, max_workers=1)
        samples = []
        with procstats.Section() as section:
            for i in range(s.rt_samples):
                a[0, 0] = b[0, 0] = 1000 + i  # new content: nothing resident, both sent
                start = time.perf_counter()
                result = await node.submit("matmul", {"a": a, "b": b}, shards=1, max_workers=1)
                samples.append(time.perf_counter() - start)
        ok = bool(np.allclose(result.output, a @ b, rtol=1e-3, atol=1e-2))
        await trio.sleep(2)
        return {
            "samples_s": samples,
            "section": section.result,
            "matches_numpy": ok,
            "memory": mtor_memory(cluster.processes),
            "blas_env": baselines.blas_env(1)["OPENBLAS_NUM_THREADS"],
            "settled_s": cluster.settled_s,
        }


async def mtor_throughput(root: Path, s: Settings) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    n, shards = 512, s.shards
    a_all = rng.standard_normal((n * shards, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out: dict[str, Any] = {"blas_env": "1"}
    async with mtor_cluster(root, 2, 1) as cluster:
        node = cluster.node
        out["settled_s"] = cluster.settled_s
        # Warm-up: both workers measured, imports and allocations done.
        warm = rng.standard_normal((n * 8, n), dtype=np.float32)
        await node.submit("matmul", {"a": warm, "b": warm[:n].copy()}, shards=8)

        # B shared: one job of row shards; B travels once to each worker.
        with procstats.Section() as section:
            start = time.perf_counter()
            result = await node.submit(
                "matmul", {"a": a_all, "b": b}, shards=shards, progress=progress_log("mtor")
            )
            seconds = time.perf_counter() - start
        check = int(rng.integers(shards))
        rows = slice(check * n, (check + 1) * n)
        out["b_shared"] = {
            "seconds": seconds,
            "shards": shards,
            "workers_used": len(result.workers),
            "matches_numpy": bool(np.allclose(result.output[rows], a_all[rows] @ b, 1e-3, 1e-2)),
            "hedged": result.hedged,
            "section": section.result,
        }
        del result
        log(f"  mtor: b_shared {shards / seconds:.1f} shards/s; both_shipped ...")

        # Both operands per shard: one-shard jobs with a distinct B each, all submitted at
        # once, as the baselines queue every task at once. The scheduler caps each worker's
        # shards in flight across the jobs too (Scheduler.worker_tokens). Until
        # 2026-12-05 this side ran 4 jobs at a time (2 per worker): with 300 jobs at once the
        # worker ranked first then took 90% of them.
        pairs = []
        for i in range(shards):
            b_i = b.copy()
            b_i[0, 0] = i
            pairs.append((a_all[i * n : (i + 1) * n], b_i))
        outputs: list[Any] = [None] * shards
        used: dict[str, int] = {}

        async def one(i: int) -> None:
            r = await node.submit(
                "matmul", {"a": pairs[i][0], "b": pairs[i][1]}, shards=1, max_workers=2
            )
            outputs[i] = r.output
            for w in r.workers:
                used[w] = used.get(w, 0) + 1

        with procstats.Section() as section:
            start = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for i in range(shards):
                    nursery.start_soon(one, i)
            seconds = time.perf_counter() - start
        out["both_shipped"] = {
            "seconds": seconds,
            "shards": shards,
            "shards_per_worker": sorted(used.values()),
            "matches_numpy": bool(
                np.allclose(outputs[check], pairs[check][0] @ pairs[check][1], 1e-3, 1e-2)
            ),
            "section": section.result,
        }
        await trio.sleep(2)
        out["memory"] = mtor_memory(cluster.processes)
    return out


async def kill_when_busy(
    cluster: MtorCluster, delay: float, killed: list[tuple[float, float, int]]
) -> None:
    """SIGKILL the first worker seen computing a shard, ``delay`` seconds after seeing it."""
    from mtor_p2p.control import ControlClient

    clients = [ControlClient.for_data_dir(d, timeout=2) for d in cluster.data_dirs]
    while True:
        for client, process in zip(clients, cluster.processes, strict=True):
            status = await trio.to_thread.run_sync(client.call, "GET", "/v1/status")
            if status["worker"]["active"]:
                seen = time.perf_counter()
                await trio.sleep(delay)
                process.send_signal(signal.SIGKILL)
                killed.append((seen, time.perf_counter(), process.pid))
                return
        await trio.sleep(0.002)


#: Tries per kill trial wanted: a try whose kill came too late is tried again (see mtor_kill).
KILL_TRIES_PER_TRIAL = 3


async def mtor_kill(root: Path, s: Settings) -> dict[str, Any]:
    """Row 4's MTOR side. A try counts only if the kill hit the attempt computing the shard
    (the job reissued it): on the Xeon a 2048³ product takes about 0.12 s on one thread, so
    a kill 0.1 s after the shard is seen computing (the delay until 2026-12-06) sometimes
    landed after the answer had left, or the shard was never seen computing at all; such
    tries measured nothing (a "kill to result" of 1-10 ms) and are tried again, as on the
    baselines' side (``task_kill``)."""
    rng = np.random.default_rng(3)
    n = s.kill_n
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    trials: list[dict[str, Any]] = []
    discarded: list[str] = []
    for attempt in range(KILL_TRIES_PER_TRIAL * s.kill_trials):
        if len(trials) == s.kill_trials:
            break
        # A fresh pair of workers per try: the killed one's record would linger in views.
        async with mtor_cluster(root / f"t{attempt}", 2, 1) as cluster:
            node = cluster.node
            warm = np.vstack([a, a])
            await node.submit("matmul", {"a": warm, "b": b}, shards=2)  # both workers, warm
            a[0, 0] = b[0, 0] = attempt + 1
            killed: list[tuple[float, float, int]] = []
            with procstats.Section() as section:
                submitted = time.perf_counter()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(kill_when_busy, cluster, s.kill_delay, killed)
                    result = await node.submit("matmul", {"a": a, "b": b}, shards=1, max_workers=2)
                    done = time.perf_counter()
                    nursery.cancel_scope.cancel()
        if not killed:
            discarded.append("the shard finished before any worker was seen computing")
            log("  mtor: kill try discarded: the shard was never seen computing")
            continue
        seen, at, pid = killed[0]
        if result.reissued == 0:
            discarded.append(f"the kill came after the answer ({done - at:.3f} s to the result)")
            log("  mtor: kill try discarded: the kill came after the answer")
            continue
        trials.append(
            {
                "kill_to_result_s": done - at,
                "submit_to_start_s": seen - submitted,
                "killed_pid": pid,
                "reissued": result.reissued,
                "hedged": result.hedged,
                "matches_numpy": bool(
                    np.allclose(result.output[:4], a[:4] @ b, rtol=1e-3, atol=1e-2)
                ),
                "section": section.result,
            }
        )
        log(f"  mtor: kill {len(trials)}/{s.kill_trials}: {done - at:.3f} s")
    if len(trials) < s.kill_trials:
        raise RuntimeError(
            f"{len(trials)} of {s.kill_trials} kills hit a computing shard in "
            f"{KILL_TRIES_PER_TRIAL * s.kill_trials} tries: {discarded}"
        )
    return {"trials": trials, "tries_discarded": discarded}


#: Rows below which a shard of the product pays noticeably more per FLOP (see product_shards).
PRODUCT_SHARD_MIN_ROWS = 1024


def product_shards(rows: int, workers: int) -> int:
    """Row 6's shard count: two per worker, so that each worker has its next shard's operands
    while it computes one, but no shard under :data:`PRODUCT_SHARD_MIN_ROWS` rows unless that
    leaves a worker without one. It is what the scheduler's own default gives a large job
    over equal workers (``PIPELINE_MIN_SHARD_ROWS`` in ``mtor_p2p.compute.scheduler``),
    stated here so that the row's shards do not move with the workers' measured speeds.

    Why not more: BLAS packs the whole of B for every call, so a shard of m rows pays B's
    packing once per m rows. On the Intel Xeon (2026-12-05, NumPy alone, one BLAS thread, an
    8192² B, 2048 rows of product in slabs, interleaved, medians): 512-row slabs 1.96 CPU-s
    against 1.80 for 1024-row ones (6 pairs); 2048-row slabs 1.73 against 1.74 (5 pairs). On
    the product itself, one cluster, jobs alternating: 4 workers with 8 shards against 16
    were faster in 9 of 10 pairs (5.05 against 5.23 s, medians of the last 6); 2 workers with
    4 against 8 in 7 of 10 (4.46 against 4.54 s). Until 2026-12-05 the row used four shards
    per worker. One shard per worker did as well (2026-12-05, 11 jobs of each in both orders:
    5.83 against 6.03 s with 2 workers, 5.93 against 5.91 with 4); the row keeps the
    scheduler's default."""
    return max(workers, min(2 * workers, rows // PRODUCT_SHARD_MIN_ROWS))


async def mtor_product(root: Path, s: Settings, workers: int, cores: int) -> dict[str, Any]:
    n = s.product_n
    rng = np.random.default_rng(6)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    threads = max(1, cores // workers)
    shards = product_shards(n, workers)
    async with mtor_cluster(root, workers, threads) as cluster:
        node = cluster.node
        warm = rng.standard_normal((512 * 2 * workers, 512), dtype=np.float32)
        await node.submit("matmul", {"a": warm, "b": warm[:512].copy()}, shards=2 * workers)
        with procstats.Section() as section:
            start = time.perf_counter()
            result = await node.submit(
                "matmul",
                {"a": a, "b": b},
                shards=shards,
                max_workers=workers,
                deadline=3600,
                progress=progress_log(f"mtor {workers} workers"),
            )
            seconds = time.perf_counter() - start
        rows = slice(0, 64)
        ok = bool(np.allclose(result.output[rows], a[rows] @ b, rtol=1e-3, atol=1e-1))
        return {
            "seconds": seconds,
            "gflops": 2 * n**3 / seconds / 1e9,
            "workers": workers,
            "workers_used": len(result.workers),
            "shards": shards,
            "blas_threads_per_worker": threads,
            "matches_numpy": ok,
            "hedged": result.hedged,
            "section": section.result,
            "settled_s": cluster.settled_s,
        }


def run_mtor(fn: Callable[..., Any], *args: Any, timeout: float = 3600) -> dict[str, Any]:
    """Run one MTOR session in its own event loop, bounded by ``timeout``."""

    async def bounded() -> dict[str, Any]:
        with trio.fail_after(timeout):
            return await fn(*args)

    return trio.run(bounded)


# -- interleaving ----------------------------------------------------------------------------


class Runner:
    """Runs sides in rounds, keeps every answer or error, and writes the report as it goes."""

    def __init__(self, s: Settings, out: Path) -> None:
        self.s = s
        self.out = out
        self.scratch = Path(tempfile.mkdtemp(prefix="mtor-bench-compute-"))
        self.report: dict[str, Any] = {
            "benchmark": "compute (issue 9 goals table)",
            "machine": machine(),
            "git": git_commit(),
            "when": time.strftime("%Y-%m-%d %H:%M:%S"),
            "settings": {k: v for k, v in s.__dict__.items()},
            "load_series": [],
            "baselines": {},
            "rows": {},
        }
        self.failures: list[str] = []
        self._pythons: dict[str, Path | None] = {}

    def note_load(self, label: str) -> None:
        self.report["load_series"].append(
            {"t": time.strftime("%H:%M:%S"), "what": label, "loadavg": os.getloadavg()}
        )

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.report, indent=1, default=str))

    def baseline_python(self, name: str) -> Path | None:
        if name not in self._pythons:
            try:
                self._pythons[name] = baselines.ensure(name, log=log)
                self.report["baselines"][name] = baselines.versions(name)
            except baselines.BaselineUnavailable as exc:
                log(f"{name}: baseline unavailable: {exc}")
                self._pythons[name] = None
                self.report["baselines"][name] = {"unavailable": str(exc)}
        return self._pythons[name]

    def interleave(
        self, row: int, sides: list[tuple[str, Callable[[int], dict[str, Any]]]]
    ) -> list[dict[str, Any]]:
        """``rounds`` times each side in order; a side's answer or {"error"|"unavailable"}."""
        rounds: list[dict[str, Any]] = []
        for r in range(self.s.rounds):
            answers: dict[str, Any] = {}
            for name, fn in sides:
                label = f"row {row} round {r + 1}/{self.s.rounds}: {name}"
                log(label + " ...")
                self.note_load(label)
                try:
                    answers[name] = fn(r)
                except baselines.BaselineUnavailable as exc:
                    answers[name] = {"unavailable": str(exc)}
                except Exception as exc:
                    log(f"{label} FAILED: {type(exc).__name__}: {exc}")
                    answers[name] = {"error": f"{type(exc).__name__}: {exc}",
                                     "traceback": traceback.format_exc()[-3000:]}  # fmt: skip
                    self.failures.append(f"row {row} {name}: {exc}")
            rounds.append(answers)
        return rounds

    def baseline_side(
        self, name: str, task: str, params: dict[str, Any], timeout: float = 1200
    ) -> Callable[[int], dict[str, Any]]:
        def run(r: int) -> dict[str, Any]:
            python = self.baseline_python(name)
            if python is None:
                raise baselines.BaselineUnavailable(self.report["baselines"][name]["unavailable"])
            return baselines.run_side(
                python, name, task, {**params, "seed": r}, env=baselines.blas_env(1),
                timeout=timeout, log=log,
            )  # fmt: skip

        return run


# -- figures and ratios ----------------------------------------------------------------------


def figure(answer: dict[str, Any], extract: Callable[[dict[str, Any]], dict[str, Any]]) -> Any:
    """The side's figures for one round (with its load), or why there are none."""
    if "unavailable" in answer:
        return {"unavailable": "baseline unavailable"}
    if "error" in answer:
        return {"error": answer["error"]}
    return extract(answer)


def ratio_table(
    rounds: list[dict[str, Any]], metric: str, num: str, den: str
) -> dict[str, Any] | None:
    per_round = []
    for figures in rounds:
        a, b = figures.get(num, {}), figures.get(den, {})
        if metric in a and metric in b and b[metric]:
            per_round.append(round(a[metric] / b[metric], 3))
        else:
            per_round.append(None)
    valid = [x for x in per_round if x is not None]
    if not valid:
        return None
    return {"per_round": per_round, "median": round(statistics.median(valid), 3)}


def finish_row(
    runner: Runner,
    row: int,
    what: str,
    equal: list[str],
    differs: list[str],
    figures: list[dict[str, Any]],
    ratios: list[tuple[str, str, str]],
    raw: Any,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    table = {}
    for metric, num, den in ratios:
        found = ratio_table(figures, metric, num, den)
        table[f"{num}/{den} {metric}"] = found if found else "baseline unavailable or failed"
    entry = {
        "what": what,
        "goal": GOALS[row],
        "same_on_both_sides": equal,
        "still_differs": differs,
        "rounds": figures,
        "ratios_median_of_rounds": table,
        **(extra or {}),
        "raw": raw,
    }
    runner.report["rows"][f"{row}_{ROW_NAMES[row]}"] = entry
    runner.save()
    print_row(row, entry, caveat=verdict_caveat(runner.s))
    return entry


def verdict_caveat(s: Settings) -> str:
    """What to add to a verdict from small settings: a goal counts in a full run (3 rounds at
    least, without ``--quick``), where every row has its samples."""
    if s.quick:
        return " (--quick: small settings, indicative only)"
    if s.rounds < 3:
        return f" ({s.rounds} round{'s' if s.rounds > 1 else ''}: indicative only)"
    return ""


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def print_row(row: int, entry: dict[str, Any], *, caveat: str = "") -> None:
    lines = [f"\n== row {row}: {entry['what']}", f"   goal: {entry['goal']}"]
    # What the sides' names and the comparison mean, as the results file has it.
    lines += [f"   same on every side: {text}" for text in entry.get("same_on_both_sides", [])]
    lines += [f"   still differs: {text}" for text in entry.get("still_differs", [])]
    for index, figures in enumerate(entry["rounds"], start=1):
        parts = []
        for side, values in figures.items():
            if not isinstance(values, dict):
                continue
            if "unavailable" in values or "error" in values:
                parts.append(f"{side}: {values.get('unavailable') or 'FAILED'}")
                continue
            shown = ", ".join(
                f"{k} {fmt(v)}" for k, v in values.items() if k not in ("load1", "foreign_cores")
            )
            if "load1" not in values:  # derived from other sides (row 6's numpy_around)
                parts.append(f"{side}: {shown}")
                continue
            parts.append(
                f"{side}: {shown} (load {values.get('load1')}, foreign "
                f"{values.get('foreign_cores')})"
            )
        lines.append(f"   round {index}: " + " | ".join(parts))
    for side, stats in (entry.get("pooled_all_rounds") or {}).items():
        lines.append(
            f"   all rounds pooled, {side}: p50 {stats['p50_ms']:.4g} ms, p99 "
            f"{stats['p99_ms']:.4g} ms (n {stats['n']})"
        )
    if "hivemind_quoted" in entry:
        quoted = entry["hivemind_quoted"]
        lines.append(
            f"   hivemind ({quoted['nodes']} nodes, quoted, not run): get p50 "
            f"{quoted['get_p50_ms']} ms, p99 {quoted['get_p99_ms']} ms; {quoted['source']}"
        )
    for name, value in entry["ratios_median_of_rounds"].items():
        if isinstance(value, dict):
            rounds = ", ".join("-" if x is None else f"{x:.3g}" for x in value["per_round"])
            lines.append(f"   ratio {name}: median {value['median']:.3g}x (rounds: {rounds})")
        else:
            lines.append(f"   ratio {name}: {value}")
    verdicts = goal_verdicts(row, entry["ratios_median_of_rounds"])
    lines += [f"   verdict: {text}{caveat}" for text in verdicts]
    print("\n".join(lines), file=sys.stderr, flush=True)


# -- rows ------------------------------------------------------------------------------------


def row_roundtrip(runner: Runner) -> None:
    s = runner.s
    params = {"samples": s.rt_samples, "warmup": s.rt_warmup, "workers": 1, "n": 512}
    sides = [
        ("mtor", lambda r: run_mtor(mtor_roundtrip, runner.scratch / f"rt{r}", s)),
        ("ray", runner.baseline_side("ray", "roundtrip", params)),
        ("dask", runner.baseline_side("dask", "roundtrip", params)),
    ]
    raw = runner.interleave(1, sides)

    def extract(answer: dict[str, Any]) -> dict[str, Any]:
        stats = summary_ms(answer["samples_s"])
        return {"p50_ms": stats["p50_ms"], "p99_ms": stats["p99_ms"],
                "matches_numpy": answer["matches_numpy"], **load_of(answer["section"])}  # fmt: skip

    figures = [{side: figure(a, extract) for side, a in answers.items()} for answers in raw]
    finish_row(
        runner,
        1,
        "512x512 float32 matmul shard round trip on loopback, both operands sent, 1 worker",
        [
            "shapes, dtype, fresh operand values every sample (one element changed: nothing "
            "cached by content), both operands shipped per task, product returned to the driver",
            "one worker process, 1 BLAS thread in it (OPENBLAS_NUM_THREADS=1 etc.; Ray/Dask "
            "report threadpoolctl's count in 'blas')",
            f"{s.rt_warmup} warm-up tasks, then {s.rt_samples} sequential samples, same percentile "
            "code",
        ],
        [
            "MTOR verifies every result (Freivalds on the requester), signs and countersigns a "
            "receipt and stores it durably; Ray and Dask check nothing",
            "MTOR's operands cross an authenticated, encrypted libp2p connection; Ray's go "
            "through its shared-memory object store, Dask's over plain TCP",
            "the MTOR requester runs in the harness process; Ray's and Dask's drivers are their "
            "own processes",
        ],
        figures,
        [
            ("p50_ms", "mtor", "ray"),
            ("p50_ms", "mtor", "dask"),
            ("p99_ms", "mtor", "ray"),
            ("p99_ms", "mtor", "dask"),
        ],
        raw,
        {"pooled_all_rounds": pooled(raw, lambda a: a["samples_s"])},
    )


def row_throughput(runner: Runner) -> None:
    s = runner.s
    params = {"shards": s.shards, "workers": 2, "n": 512,
              "variants": ["b_shared", "both_shipped"]}  # fmt: skip
    sides = [
        ("mtor", lambda r: run_mtor(mtor_throughput, runner.scratch / f"tp{r}", s)),
        ("ray", runner.baseline_side("ray", "throughput", params)),
        ("dask", runner.baseline_side("dask", "throughput", params)),
    ]
    raw = runner.interleave(2, sides)

    def extract(answer: dict[str, Any]) -> dict[str, Any]:
        shared, both = answer["b_shared"], answer["both_shipped"]
        return {
            "b_shared_shards_per_s": round(shared["shards"] / shared["seconds"], 2),
            "both_shipped_shards_per_s": round(both["shards"] / both["seconds"], 2),
            "matches_numpy": shared["matches_numpy"] and both["matches_numpy"],
            **load_of(shared["section"]),
        }

    figures = [{side: figure(a, extract) for side, a in answers.items()} for answers in raw]
    finish_row(
        runner,
        2,
        f"shards/s with 2 worker processes, {s.shards} shards of 512x512x512 float32",
        [
            "b_shared: the same bytes move on every side: each 512x512 A block per shard, B "
            "once per worker (MTOR: one job of row shards, B resident; Ray: ray.put(B) once; "
            "Dask: client.scatter(B, broadcast=True)), every product back to the driver and "
            "copied into the one C as it completes (MTOR's job returns C; the baselines "
            "place each block on ray.wait / as_completed), the put/scatter inside the timing",
            "both_shipped: a distinct A and B per shard on every side, every shard submitted at "
            "once (MTOR: one one-shard job each; Ray/Dask: one task each)",
            "2 worker processes with 1 BLAS thread each; a warm-up before timing",
        ],
        [
            "MTOR verifies, signs and stores a receipt for every shard",
            "MTOR's both_shipped runs one job per shard (job set-up each time); until "
            "2026-12-05 it ran 4 jobs at a time while the baselines queued every task",
            "load and foreign cores shown are those of the b_shared measurement",
        ],
        figures,
        [
            ("b_shared_shards_per_s", "mtor", "dask"),
            ("b_shared_shards_per_s", "mtor", "ray"),
            ("both_shipped_shards_per_s", "mtor", "dask"),
            ("both_shipped_shards_per_s", "mtor", "ray"),
        ],
        raw,
    )
    runner.row2_raw = raw  # type: ignore[attr-defined]


def row_memory(runner: Runner) -> None:
    raw = getattr(runner, "row2_raw", None)
    if raw is None:
        row_throughput(runner)
        raw = runner.row2_raw  # type: ignore[attr-defined]

    def extract(answer: dict[str, Any]) -> dict[str, Any]:
        memory = answer["memory"]
        workers = [w for w in memory["workers"] if "rss_mib" in w]
        others = [w for w in memory["other_processes"] if "rss_mib" in w]
        return {
            "worker_idle_rss_mib_max": max(w["rss_mib"] for w in workers),
            "worker_peak_rss_mib_max": max(w["peak_rss_mib"] for w in workers),
            "worker_uss_mib_max": max(w.get("uss_mib", 0) for w in workers),
            "worker_processes": len(workers),
            "other_processes_rss_mib": round(sum(w["rss_mib"] for w in others), 1),
            "all_processes_rss_mib": memory["all_processes_rss_mib"],
            **load_of(answer["b_shared"]["section"]),
        }

    figures = [{side: figure(a, extract) for side, a in answers.items()} for answers in raw]
    finish_row(
        runner,
        7,
        "worker memory after row 2's workload (2 workers, both variants), readings from "
        "/proc on every side",
        [
            "the same kernel counters on every side: VmRSS 2 s after the last task (idle), "
            "VmHWM (peak over the session), USS from smaps_rollup",
            "the same workload before the reading (row 2, both variants)",
        ],
        [
            "Ray's worker RSS includes pages of its shared-memory object store (USS excludes "
            "them); Ray also runs services (GCS, raylet, agents: other_processes); Dask's "
            "scheduler and nannies live in its driver process (not counted); MTOR's requester "
            "lives in the harness (not counted)",
            "an MTOR worker is a whole peer (libp2p host, DHT, gossip, ledger), a Ray or Dask "
            "worker only executes tasks",
        ],
        figures,
        [
            ("worker_idle_rss_mib_max", "mtor", "ray"),
            ("worker_idle_rss_mib_max", "mtor", "dask"),
            ("worker_peak_rss_mib_max", "mtor", "ray"),
            ("worker_peak_rss_mib_max", "mtor", "dask"),
            ("worker_uss_mib_max", "mtor", "ray"),
            ("worker_uss_mib_max", "mtor", "dask"),
        ],
        {"from": "row 2's sessions (see its raw answers)"},
    )


def bulk_side(runner: Runner, kind: str, size: int, count: int) -> Callable[[int], dict[str, Any]]:
    def run(r: int) -> dict[str, Any]:
        certs = runner.scratch / "certs"
        if kind == "tls" and not certs.exists():
            from benchmarks.bulk_procs import make_certs

            make_certs(certs)
        base = [sys.executable, "-m", "benchmarks.bulk_procs"]
        opts = ["--size", str(size), "--certs", str(certs)]
        server = subprocess.Popen(
            [*base, "server", kind, *opts], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, cwd=str(ROOT),
        )  # fmt: skip
        try:
            addr = ready_line(server)["addr"]
            with procstats.Section() as section:
                done = subprocess.run(
                    [*base, "client", kind, addr, *opts, "--count", str(count)],
                    capture_output=True, text=True, cwd=str(ROOT), timeout=1200, check=False,
                )  # fmt: skip
            if done.returncode != 0:
                raise RuntimeError(f"{kind} client exited {done.returncode}: {done.stderr[-800:]}")
            answer = json.loads(done.stdout.strip().splitlines()[-1])
            answer["section"] = section.result
            answer["server_memory"] = procstats.memory(server.pid)
            return answer
        finally:
            if server.stdin:
                server.stdin.close()
            stop([server])

    return run


def row_bulk(runner: Runner) -> None:
    s = runner.s
    sides = [
        (f"{kind}_{size >> 20}MiB", bulk_side(runner, kind, size, count))
        for size, count in s.bulk
        for kind in ("mtor", "tcp", "tls")
    ]
    raw = runner.interleave(3, sides)
    sizes = {f"{size >> 20}MiB": size for size, _ in s.bulk}

    def extract_for(mib: float) -> Callable[[dict[str, Any]], dict[str, Any]]:
        def extract(answer: dict[str, Any]) -> dict[str, Any]:
            up, down = answer["up_s"], answer["down_s"]
            return {
                "up_MiB_s": round(mib * len(up) / sum(up), 1),
                "down_MiB_s": round(mib * len(down) / sum(down), 1),
                "both_MiB_s": round(mib * (len(up) + len(down)) / (sum(up) + sum(down)), 1),
                **load_of(answer["section"]),
            }

        return extract

    figures = [
        {
            side: figure(a, extract_for(sizes[side.split("_", 1)[1]] / 2**20))
            for side, a in answers.items()
        }
        for answers in raw
    ]
    described = ", ".join(
        f"{count} requests of {size >> 20} MiB up then {count} down" for size, count in s.bulk
    )
    ratios = []
    for label in sizes:
        ratios += [
            ("both_MiB_s", f"mtor_{label}", f"tcp_{label}"),
            ("both_MiB_s", f"mtor_{label}", f"tls_{label}"),
        ]
    finish_row(
        runner,
        3,
        f"bulk bytes over one authenticated connection between two processes: {described}",
        [
            "two processes (server and client) per side, one connection, the same sizes and "
            "count, request then response, every request timed in the client",
            "random payloads prepared before timing; the client keeps every downloaded byte "
            "until the request ends",
            "4 MiB is the compute protocols' chunk (an upload or download moves one per "
            "request); 64 MiB requests show the cost of a fresh 64 MiB buffer per message",
        ],
        [
            "MTOR: a lane (AES-256-GCM over TCP, keys bound to the peer IDs through Noise) "
            "with MTOR's admission guards, each message a new bytes object; tls: TLS 1.3 via "
            "OpenSSL with pinned self-signed P-256 certificates into a reused buffer; tcp: no "
            "authentication or encryption at all (the floor)",
        ],
        figures,
        ratios,
        raw,
    )


def row_kill(runner: Runner) -> None:
    s = runner.s
    params = {"trials": s.kill_trials, "n": s.kill_n, "delay": s.kill_delay, "workers": 2}
    sides = [
        ("mtor", lambda r: run_mtor(mtor_kill, runner.scratch / f"kill{r}", s)),
        ("ray", runner.baseline_side("ray", "kill", params)),
        ("dask", runner.baseline_side("dask", "kill", params)),
    ]
    raw = runner.interleave(4, sides)

    def extract(answer: dict[str, Any]) -> dict[str, Any]:
        times = [t["kill_to_result_s"] for t in answer["trials"]]
        sections = [t["section"] for t in answer["trials"]]
        return {
            "kill_to_result_p50_s": round(statistics.median(times), 3),
            "kill_to_result_max_s": round(max(times), 3),
            "trials": len(times),
            "matches_numpy": all(t["matches_numpy"] for t in answer["trials"]),
            "load1": round(statistics.fmean(x["load1_end"] for x in sections), 2),
            "foreign_cores": round(statistics.fmean(x["foreign_cores"] for x in sections), 2),
        }

    figures = [{side: figure(a, extract) for side, a in answers.items()} for answers in raw]
    finish_row(
        runner,
        4,
        f"worker SIGKILLed {s.kill_delay} s into a {s.kill_n}x{s.kill_n}x{s.kill_n} float32 "
        "shard, to the accepted result",
        [
            f"the same shard ({s.kill_n}^3 float32 matmul, fresh values), 2 worker processes with "
            "1 BLAS thread each, both warmed up, the other worker idle",
            "SIGKILL from outside the worker, the delay after the shard is seen computing, the "
            "time from the kill to the result in the driver/requester",
            "the retry is each system's own (MTOR re-issue, Ray task retry, Dask rescheduling)",
            "a trial counts only if the kill hit the shard while it computed (MTOR: the job "
            "reissued it; Ray/Dask: the task started twice); a try whose kill came after the "
            "answer is tried again, up to 3 tries per trial, and listed in 'tries_discarded'",
        ],
        [
            "'seen computing': MTOR's control API reports the shard active (polled, operands "
            "already received); Ray/Dask tasks write their PID to a file when they start",
            "MTOR starts 2 fresh workers per trial (a killed worker's capacity record would "
            "linger); Ray and Dask keep their cluster and wait for it to recover between trials",
            "MTOR verifies the re-run result before accepting it; Ray/Dask accept it as is",
        ],
        figures,
        [("kill_to_result_p50_s", "mtor", "ray"), ("kill_to_result_p50_s", "mtor", "dask")],
        raw,
        {"pooled_all_rounds": pooled(raw, lambda a: [t["kill_to_result_s"] for t in a["trials"]])},
    )


def row_dht(runner: Runner) -> None:
    from benchmarks.dht_procs import DhtHosts

    s = runner.s
    peers = s.dht_peers
    rng = random.Random(peers)
    log(f"row 5: starting {peers} host processes ...")
    env = {**os.environ, **baselines.blas_env(1)}
    rounds_raw: list[dict[str, Any]] = []
    with DhtHosts(peers, env=env) as hosts:
        for index in range(1, peers):
            earlier = rng.sample(range(index), min(4, index))
            answer = hosts.call(index, op="connect", addrs=[hosts.info[j]["addr"] for j in earlier])
            if "error" in answer:
                raise RuntimeError(f"host {index} could not connect: {answer['error']}")
        # Routing tables fill from connections (and random walks): wait until they reach
        # min(peers - 1, 8) on average or stop growing for 3 s (at most 30 s).
        started, best, best_at = time.monotonic(), -1.0, time.monotonic()
        while True:
            rt_mean = statistics.fmean(hosts.call(i, op="rt")["rt"] for i in range(peers))
            now = time.monotonic()
            if rt_mean > best:
                best, best_at = rt_mean, now
            if rt_mean >= min(peers - 1, 8) or now - best_at > 3 or now - started > 30:
                break
            time.sleep(0.5)
        log(f"row 5: routing tables hold {rt_mean:.1f} peers on average")
        owners = rng.sample(range(peers), s.dht_owners)
        puts = []
        for owner in owners:
            answer = hosts.call(owner, op="put", key=f"/mtor/bench/{owner}", size=200)
            if "error" in answer:
                raise RuntimeError(f"put from host {owner} failed: {answer['error']}")
            puts.append(answer["seconds"])
        # The floor: a request on an open connection between two of the same processes.
        pairs = []
        for index in range(peers):
            connected = hosts.call(index, op="peers")["peers"]
            if connected:
                pairs.append((index, rng.choice(connected)))
        for r in range(s.rounds):
            label = f"row 5 round {r + 1}/{s.rounds}"
            runner.note_load(label)
            log(f"{label}: mtor DHT gets ({len(owners)} keys x {peers - 1} readers) ...")
            gets, misses, not_dropped = [], 0, 0
            with procstats.Section() as get_section:
                for owner in owners:
                    for reader in range(peers):
                        if reader == owner:
                            continue
                        answer = hosts.call(reader, op="get", key=f"/mtor/bench/{owner}")
                        if "seconds" in answer:
                            gets.append(answer["seconds"])
                        misses += int(not answer.get("ok"))
                        # A replica the reader could not drop answers without a lookup.
                        not_dropped += int("forget_error" in answer)
            log(f"{label}: request on an open connection (floor) ...")
            echoes, failures = [], 0
            with procstats.Section() as echo_section:
                for requester, peer in rng.sample(pairs, min(len(pairs), 5)):
                    answer = hosts.call(requester, op="echo", peer=peer, count=s.echo_count)
                    echoes += answer.get("seconds", [])
                    failures += answer.get("failures", 0)
            rounds_raw.append(
                {
                    "mtor_get": {
                        "samples_s": gets,
                        "misses": misses,
                        "replica_not_dropped": not_dropped,
                        "section": get_section.result,
                    },
                    "floor_request": {
                        "samples_s": echoes,
                        "failures": failures,
                        "section": echo_section.result,
                    },
                }
            )
        memory = [hosts.call(i, op="memory") for i in range(peers)]

    def extract(answer: dict[str, Any]) -> dict[str, Any]:
        if not answer["samples_s"]:
            return {"error": "no successful samples"}
        stats = summary_ms(answer["samples_s"])
        return {"p50_ms": stats["p50_ms"], "p99_ms": stats["p99_ms"], "n": stats["n"],
                "misses": answer.get("misses", answer.get("failures", 0)),
                **({"replica_not_dropped": answer["replica_not_dropped"]}
                   if answer.get("replica_not_dropped") else {}),
                **load_of(answer["section"])}  # fmt: skip

    figures = [{side: extract(a) for side, a in answers.items()} for answers in rounds_raw]
    all_gets = [x for answers in rounds_raw for x in answers["mtor_get"]["samples_s"]]
    finish_row(
        runner,
        5,
        f"DHT get among {peers} peers, each a separate process (forced network lookups)",
        [
            "baseline in this run: a 200-byte request/response on an already open connection "
            "between the same processes (the floor one DHT hop cannot beat)",
        ],
        [
            "hivemind is not run here: " + HIVEMIND_NOTES["source"] + f"; its figures (8 nodes): "
            f"get p50 {HIVEMIND_NOTES['get_p50_ms']} ms, p99 {HIVEMIND_NOTES['get_p99_ms']} ms",
            "each reader drops its own replica before the get, so every get is a lookup",
        ],
        figures,
        [("p50_ms", "mtor_get", "floor_request")],
        rounds_raw,
        {
            "all_rounds_get": summary_ms(all_gets) if all_gets else None,
            "put": summary_ms(puts),
            "routing_table_mean": round(rt_mean, 1),
            "host_rss_mib_median": statistics.median(m.get("rss_mib", 0) for m in memory),
            "host_peak_rss_mib_max": max(m.get("peak_rss_mib", 0) for m in memory),
            "hivemind_quoted": HIVEMIND_NOTES,
        },
    )


def row_scaling(runner: Runner) -> None:
    s = runner.s
    cores = os.cpu_count() or 1
    n = s.product_n

    def numpy_side(r: int) -> dict[str, Any]:
        return baselines.run_side(
            sys.executable, "numpy", "product", {"n": n, "reps": 1 if n >= 4096 else 3},
            env=baselines.blas_env(cores), timeout=1800, log=log,
        )  # fmt: skip

    # NumPy runs before every MTOR side and after the last: each MTOR figure is compared with
    # the NumPy runs on either side of it (their mean time), as well as with the round's
    # first (the only one before 2026-12-05). On the project's VM one NumPy product took 3.7
    # s in one round and 5.3 s in the next, and an MTOR side ran up to a minute after the
    # round's first NumPy run.
    def split_side(workers: int) -> Callable[[int], dict[str, Any]]:
        params = {"n": n, "processes": workers, "shards": product_shards(n, workers)}

        def run(r: int) -> dict[str, Any]:
            return baselines.run_side(
                sys.executable, "numpy", "product_split", params,
                env=baselines.blas_env(max(1, cores // workers)), timeout=1800, log=log,
            )  # fmt: skip

        return run

    sides: list[tuple[str, Callable[[int], dict[str, Any]]]] = [("numpy", numpy_side)]
    before = "numpy"
    around: dict[int, tuple[str, str]] = {}
    for workers in s.product_workers:
        sides.append(
            (
                f"mtor_{workers}w",
                lambda r, w=workers: run_mtor(
                    mtor_product, runner.scratch / f"p{r}-{w}", s, w, cores
                ),
            )
        )
        if workers > 1:
            # The same shards over as many plain NumPy processes, nothing moved or checked:
            # MTOR's ceiling at that many workers on these cores (2026-12-06).
            sides.append((f"split_{workers}w", split_side(workers)))
        after = f"numpy_after_{workers}w"
        sides.append((after, numpy_side))
        around[workers] = (before, after)
        before = after
    raw = runner.interleave(6, sides)

    def extract(answer: dict[str, Any]) -> dict[str, Any]:
        if "samples_s" in answer:
            seconds = statistics.median(answer["samples_s"])
            extra = {"blas_threads": answer["blas"]["OPENBLAS_NUM_THREADS"]}
            if "processes" in answer:
                extra["processes"] = answer["processes"]
        else:
            seconds = answer["seconds"]
            extra = {"workers_used": answer["workers_used"],
                     "blas_threads_per_worker": answer["blas_threads_per_worker"]}  # fmt: skip
        return {"gflops": round(2 * n**3 / seconds / 1e9, 1), "seconds": round(seconds, 2),
                **extra, **load_of(answer["section"])}  # fmt: skip

    def raw_seconds(answer: Any) -> float | None:
        # The figures' seconds are rounded for print; the mean is taken of the measured ones
        # (with --quick's 0.09 s runs, rounding moved numpy_around by up to 5%: a review).
        if not isinstance(answer, dict) or "samples_s" not in answer:
            return None
        return float(statistics.median(answer["samples_s"]))

    figures = []
    for answers in raw:
        sides_figures = {side: figure(a, extract) for side, a in answers.items()}
        for workers, (first, second) in around.items():
            pair = [raw_seconds(answers.get(first)), raw_seconds(answers.get(second))]
            if all(x is not None for x in pair):
                seconds = statistics.mean(x for x in pair if x is not None)
                sides_figures[f"numpy_around_{workers}w"] = {
                    "gflops": round(2 * n**3 / seconds / 1e9, 1), "seconds": round(seconds, 2)
                }  # fmt: skip
        figures.append(sides_figures)
    finish_row(
        runner,
        6,
        f"{n}x{n} float32 product: MTOR over 1, 2, 4 local worker processes vs one NumPy "
        f"process, GFLOP/s (2 n^3 / wall time)",
        [
            f"the same product ({n}^3, float32, same operands) on the same {cores} cores",
            f"NumPy: {cores} BLAS threads in one process; MTOR: {cores} BLAS threads in total "
            "at 1 and 2 workers (cores // workers each, at least 1)",
        ],
        [
            "at 4 workers MTOR has 4 BLAS threads on the cores (1 each: no fewer is possible)",
            "MTOR's time includes sending A and B to the workers, the results back and "
            "Freivalds' check on the requester; NumPy's operands are already in its memory",
            "MTOR splits the job into 2 row shards per worker, none under "
            f"{PRODUCT_SHARD_MIN_ROWS} rows unless a worker would get none "
            "(max_workers = workers)",
            "numpy_around_Nw: the mean time of the NumPy runs just before mtor_Nw and just "
            "after it (and after split_Nw) (numpy: the round's first run)",
            "split_Nw: the same shards over N plain NumPy processes (forked, operands in "
            "memory, shard i on process i mod N, the workers' BLAS threads): the ceiling for "
            "MTOR at N workers; mtor/split is what moving, hashing and checking cost",
        ],
        figures,
        [("gflops", f"mtor_{w}w", f"numpy_around_{w}w") for w in s.product_workers]
        + [("gflops", f"mtor_{w}w", "numpy") for w in s.product_workers]
        + [("gflops", f"split_{w}w", f"numpy_around_{w}w") for w in s.product_workers if w > 1]
        + [("gflops", f"mtor_{w}w", f"split_{w}w") for w in s.product_workers if w > 1],
        raw,
    )


def verification_share(s: Settings) -> dict[str, Any]:
    """Freivalds (20 rounds) and sampled rows timed alone against the product they check."""
    from mtor_kernels import get_kernel
    from mtor_kernels import verify as checks
    from mtor_kernels.backend import NumpyBackend

    rng = np.random.default_rng(2)
    backend = NumpyBackend()
    matmul = get_kernel("matmul")
    out: dict[str, Any] = {}

    def timed(compute: Callable[[], Any], check: Callable[[Any], Any], reps: int) -> Any:
        computes, checks_ = [], []
        with procstats.Section() as section:
            for _ in range(reps):
                start = time.perf_counter()
                result = compute()
                computes.append(time.perf_counter() - start)
                start = time.perf_counter()
                assert check(result).ok
                checks_.append(time.perf_counter() - start)
        return {
            "compute_p50_ms": round(statistics.median(computes) * 1e3, 3),
            "check_p50_ms": round(statistics.median(checks_) * 1e3, 3),
            "share": round(statistics.median(checks_) / statistics.median(computes), 3),
            **load_of(section.result),
        }

    for n in (512, 2048):
        ops = {
            "a": rng.standard_normal((n, n), dtype=np.float32),
            "b": rng.standard_normal((n, n), dtype=np.float32),
        }
        out[f"freivalds20_matmul_{n}"] = timed(
            lambda ops=ops: matmul.run(ops, backend),
            lambda c, ops=ops: checks.freivalds(ops["a"], ops["b"], c, rounds=20, rng=rng),
            10 if s.quick else (30 if n == 512 else 8),
        )
    mlp = get_kernel("mlp")
    ops = {
        "x": rng.standard_normal((1024, 512), dtype=np.float32),
        "w1": rng.standard_normal((512, 2048), dtype=np.float32) / 20,
        "b1": rng.standard_normal(2048, dtype=np.float32),
        "w2": rng.standard_normal((2048, 512), dtype=np.float32) / 40,
        "b2": rng.standard_normal(512, dtype=np.float32),
    }
    out["sample4_mlp_1024x512x2048"] = timed(
        lambda: mlp.run(ops, backend),
        lambda y: checks.sample_rows(mlp, ops, y, samples=4, rng=rng),
        5,
    )
    return out


def row_verification(runner: Runner) -> None:
    s = runner.s
    raw = []
    for r in range(s.rounds):
        log(f"row 8 round {r + 1}/{s.rounds}: verification alone ...")
        runner.note_load(f"row 8 round {r + 1}/{s.rounds}")
        raw.append({"alone": verification_share(s)})
    figures = []
    for answers in raw:
        checks = answers["alone"]
        shares: dict[str, Any] = {f"{name} share": v["share"] for name, v in checks.items()}
        first = next(iter(checks.values()))
        shares.update(load1=first["load1"], foreign_cores=first["foreign_cores"])
        figures.append({"alone": shares})
    finish_row(
        runner,
        8,
        "cost of the requester's checks against the product they check (NumPy, this process)",
        ["check and product timed back to back in one process, same operands"],
        [
            "timed alone, on the main thread with nothing else running: inside a requester "
            "the check shares the cores with the event loop (rows 1 and 2 include it)",
            f"BLAS threads: whatever this process has ({os.environ.get('OPENBLAS_NUM_THREADS')} "
            "from the environment, else MTOR's own cap once a Node has opened here)",
        ],
        figures,
        [],
        raw,
    )


ROWS: dict[int, Callable[[Runner], None]] = {
    1: row_roundtrip,
    2: row_throughput,
    3: row_bulk,
    4: row_kill,
    5: row_dht,
    6: row_scaling,
    7: row_memory,
    8: row_verification,
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="./mtor bench compute",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("Writes ``benchmarks")[0].replace("``", "'"),
        epilog="Figures carry the 1-minute load average and the CPU cores used by processes "
        "outside the benchmark while they were measured. Output: benchmarks/results/"
        "compute.json (machine, git commit, load series, every raw sample) and a summary on "
        "stderr. Exit status 0 unless an MTOR or baseline side failed (an uninstallable "
        "baseline is reported as unavailable, not a failure).",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="small settings for development: 15 round trips, 40 shards, 32 requests of 4 MiB "
        "and 2 of 64 MiB each way, "
        "1 kill per round, 8 DHT peers, n = 2048 for row 6",
    )  # fmt: skip
    parser.add_argument(
        "--only", type=str, default="",
        help="comma-separated rows to run, e.g. 1,3 (default: all, in order 1 2 7 3 4 5 6 8)",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, default=3,
        help="interleaved rounds per row (each side once per round; default 3)",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=user_path, default=None,
        help="where to write the JSON (default: benchmarks/results/compute.json for a full run, "
        "benchmarks/results/compute-partial.json (not tracked) with --quick or --only)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.out is None:
        partial = args.quick or bool(args.only.strip())
        args.out = RESULTS / ("compute-partial.json" if partial else "compute.json")
    try:
        args.rows = [int(x) for x in args.only.split(",") if x.strip()] or [1, 2, 7, 3, 4, 5, 6, 8]
    except ValueError:
        parser.error("--only takes row numbers, e.g. 1,3")
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; rows are 1-8")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def quiet_libp2p() -> None:
    """Our warnings on stderr, py-libp2p's (a busy DHT logs many) dropped."""
    import mtor_p2p.node  # noqa: F401  (py-libp2p sets up its loggers on import)

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    handler.addFilter(lambda record: not record.name.startswith("libp2p"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    # py-libp2p resets its top logger's level when it sets itself up again; levels set on its
    # children stay.
    children = {
        "libp2p.kad_dht",
        "libp2p.pubsub",
        "libp2p.network",
        "libp2p.host",
        "libp2p.transport",
        "libp2p.stream_muxer",
        "libp2p.security",
        "libp2p.tools",
    }
    children |= {name for name in logging.root.manager.loggerDict if name.startswith("libp2p")}
    for name in children | {"libp2p"}:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    quiet_libp2p()
    os.environ["MTOR_BENCH_ROOT_PID"] = str(os.getpid())
    settings = Settings.make(args.quick, args.rounds)
    runner = Runner(settings, args.out)
    log(f"compute benchmark: rows {args.rows}, {args.rounds} rounds"
        f"{' (quick)' if args.quick else ''}; writing {args.out}")  # fmt: skip
    # A VM booted minutes ago runs the large-memory rows slower (BENCHMARKS.md, 103rd sitting).
    log(f"machine: {describe_machine(runner.report['machine'])}")
    try:
        for row in args.rows:
            started = time.perf_counter()
            try:
                ROWS[row](runner)
            except Exception as exc:
                log(f"row {row} FAILED: {type(exc).__name__}: {exc}")
                runner.failures.append(f"row {row}: {exc}")
                runner.report["rows"][f"{row}_{ROW_NAMES[row]}"] = {
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc()[-3000:],
                }
            log(f"row {row} took {time.perf_counter() - started:.0f} s")
            runner.save()
    finally:
        runner.report["failures"] = runner.failures
        runner.note_load("end")
        runner.save()
        shutil.rmtree(runner.scratch, ignore_errors=True)
    log(f"wrote {args.out}" + (f"; {len(runner.failures)} failures" if runner.failures else ""))
    return 1 if runner.failures else 0
