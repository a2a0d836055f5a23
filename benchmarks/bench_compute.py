"""Compute figures for issue 3 on loopback, to set beside Ray and Dask measured in the same run.

* round trip of one 512x512 float32 matmul shard (a one-shard job, verification included),
  with B already resident on the worker ("warm") and with both operands sent ("cold", as the
  Ray and Dask baselines do), beside the same product computed locally;
* shards per second with 2 worker processes (one job of 200 shards of 512x512x512);
* time from SIGKILLing a worker mid-shard to that shard's accepted result;
* verification cost as a share of the compute (Freivalds, 20 rounds; sampled rows for mlp);
* peak RSS of a worker process.

Workers are real ``mtor-peer run`` processes; the requester is an in-process node.
Run: ``./mtor bench compute``; writes ``benchmarks/results/compute.json``.
"""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import trio

from benchmarks.bench_peer import RESULTS, summary_ms
from benchmarks.machine import machine
from mtor_kernels import get_kernel
from mtor_kernels import verify as checks
from mtor_kernels.backend import NumpyBackend
from mtor_p2p.config import NodeConfig
from mtor_p2p.control import ControlClient
from mtor_p2p.node import Node


def start_worker(
    data_dir: Path, bootstrap: str | None
) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    command = [
        sys.executable, "-m", "mtor_p2p", "run", "--data-dir", str(data_dir),
        "--listen", "/ip4/127.0.0.1/tcp/0", "--no-default-bootstrap", "--gpu", "none", "--json",
        "--record-ttl", "30", "--announce-interval", "2",
    ]  # fmt: skip
    if bootstrap:
        command += ["--bootstrap", bootstrap]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    return process, json.loads(process.stdout.readline())


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def wait_for_workers(node: Node, count: int, timeout: float = 60) -> None:
    with trio.fail_after(timeout):
        while (
            len([r for r in node.capacity.view.live(node.clock.now()) if r.peer_id != node.peer_id])
            < count
        ):
            await trio.sleep(0.1)


def open_requester(root: Path, bootstrap: str) -> Any:
    config = NodeConfig(
        data_dir=root / "requester",
        listen=["/ip4/127.0.0.1/tcp/0"],
        bootstrap=[bootstrap],
        use_default_bootstrap=False,
        gpu="none",
        record_ttl=30,
        announce_interval=2,
    )
    return Node.open(config)


async def bench_round_trips(node: Node, samples: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((512, 512), dtype=np.float32)
    b = rng.standard_normal((512, 512), dtype=np.float32)
    local = []
    for _ in range(samples):
        start = time.perf_counter()
        a @ b
        local.append(time.perf_counter() - start)
    await node.submit("matmul", {"a": a, "b": b}, shards=1, max_workers=1)  # warm-up: b resident
    warm = []
    for _ in range(samples):
        a = rng.standard_normal((512, 512), dtype=np.float32)
        start = time.perf_counter()
        result = await node.submit("matmul", {"a": a, "b": b}, shards=1, max_workers=1)
        warm.append(time.perf_counter() - start)
    np.testing.assert_allclose(result.output, a @ b, rtol=1e-4, atol=1e-3)
    cold = []
    for _ in range(samples // 2):
        a = rng.standard_normal((512, 512), dtype=np.float32)
        b = rng.standard_normal((512, 512), dtype=np.float32)
        start = time.perf_counter()
        await node.submit("matmul", {"a": a, "b": b}, shards=1, max_workers=1)
        cold.append(time.perf_counter() - start)
    warm_s, cold_s, local_s = summary_ms(warm), summary_ms(cold), summary_ms(local)
    return {
        "shard_round_trip_warm_b_resident": warm_s,
        "shard_round_trip_cold_both_sent": cold_s,
        "baseline_local_matmul": local_s,
        "overhead_ratio_p50_cold_vs_local": round(cold_s["p50_ms"] / local_s["p50_ms"], 1),
    }


async def bench_throughput(node: Node, shards: int = 200) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((512 * shards, 512), dtype=np.float32)
    b = rng.standard_normal((512, 512), dtype=np.float32)
    start = time.perf_counter()
    result = await node.submit("matmul", {"a": a, "b": b}, shards=shards)
    seconds = time.perf_counter() - start
    ok, _ = checks.compare(a @ b, result.output, np.float32)
    return {
        "shards": shards,
        "workers": len(result.workers),
        "seconds": round(seconds, 3),
        "shards_per_s": round(shards / seconds, 1),
        "matches_numpy": ok,
        "hedged": result.hedged,
    }


def verification_share(samples: int = 30) -> dict[str, Any]:
    rng = np.random.default_rng(2)
    backend = NumpyBackend()
    matmul = get_kernel("matmul")
    out: dict[str, Any] = {}
    for n in (512, 2048):
        ops = {
            "a": rng.standard_normal((n, n), dtype=np.float32),
            "b": rng.standard_normal((n, n), dtype=np.float32),
        }
        compute, check = [], []
        for _ in range(max(3, samples // (n // 512))):
            start = time.perf_counter()
            c = matmul.run(ops, backend)
            compute.append(time.perf_counter() - start)
            start = time.perf_counter()
            assert checks.freivalds(ops["a"], ops["b"], c, rounds=20, rng=rng).ok
            check.append(time.perf_counter() - start)
        out[f"freivalds20_matmul_{n}"] = {
            "compute_p50_ms": round(statistics.median(compute) * 1e3, 3),
            "check_p50_ms": round(statistics.median(check) * 1e3, 3),
            "share": round(statistics.median(check) / statistics.median(compute), 3),
        }
    mlp = get_kernel("mlp")
    ops = {
        "x": rng.standard_normal((1024, 512), dtype=np.float32),
        "w1": rng.standard_normal((512, 2048), dtype=np.float32) / 20,
        "b1": rng.standard_normal(2048, dtype=np.float32),
        "w2": rng.standard_normal((2048, 512), dtype=np.float32) / 40,
        "b2": rng.standard_normal(512, dtype=np.float32),
    }
    compute, check = [], []
    for _ in range(5):
        start = time.perf_counter()
        y = mlp.run(ops, backend)
        compute.append(time.perf_counter() - start)
        start = time.perf_counter()
        assert checks.sample_rows(mlp, ops, y, samples=4, rng=rng).ok
        check.append(time.perf_counter() - start)
    out["sample4_mlp_1024x512x2048"] = {
        "compute_p50_ms": round(statistics.median(compute) * 1e3, 3),
        "check_p50_ms": round(statistics.median(check) * 1e3, 3),
        "share": round(statistics.median(check) / statistics.median(compute), 3),
    }
    return out


async def kill_when_busy(
    workers: list[tuple[Path, subprocess.Popen[str]]], killed_at: list[float]
) -> None:
    """SIGKILL the first worker that reports a shard in progress."""
    clients = [(ControlClient.for_data_dir(d, timeout=2), p) for d, p in workers]
    while True:
        for client, process in clients:
            status = await trio.to_thread.run_sync(client.call, "GET", "/v1/status")
            if status["worker"]["active"]:
                process.send_signal(signal.SIGKILL)
                killed_at.append(time.perf_counter())
                return
        await trio.sleep(0.005)


async def bench_kill_recovery(root: Path, iterations: int = 5) -> dict[str, Any]:
    """Two fresh workers per iteration; SIGKILL the first one seen computing a shard."""
    rng = np.random.default_rng(3)
    records = []
    for iteration in range(iterations):
        base = root / f"kill-{iteration}"
        first, first_info = start_worker(base / "w0", None)
        second, _ = start_worker(base / "w1", first_info["addrs"][0])
        try:
            async with open_requester(base, first_info["addrs"][0]) as node:
                await wait_for_workers(node, 2)
                a = rng.standard_normal((4096, 2048), dtype=np.float32)
                b = rng.standard_normal((2048, 2048), dtype=np.float32)
                killed_at: list[float] = []
                async with trio.open_nursery() as nursery:
                    workers = [(base / "w0", first), (base / "w1", second)]
                    nursery.start_soon(kill_when_busy, workers, killed_at)
                    result = await node.submit("matmul", {"a": a, "b": b}, shards=2)
                    done = time.perf_counter()
                    nursery.cancel_scope.cancel()
                if killed_at:
                    records.append(
                        {
                            "kill_to_result_s": round(done - killed_at[0], 3),
                            "reissued": result.reissued,
                            "hedged": result.hedged,
                            "workers": len(result.workers),
                        }
                    )
        finally:
            for process in (first, second):
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
                    process.wait(timeout=20)
    times = [r["kill_to_result_s"] for r in records]
    return {
        "iterations": records,
        "kill_to_result_p50_s": round(statistics.median(times), 3) if times else None,
        "note": "shards of 2048x2048x2048 float32 (~17 GFLOP, ~0.3 s on this CPU); the killed "
        "shard is re-run by the surviving worker (which may still be busy with its own)",
    }


async def run_all(root: Path) -> dict[str, Any]:
    report: dict[str, Any] = {"machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    first, first_info = start_worker(root / "w0", None)
    second, _ = start_worker(root / "w1", first_info["addrs"][0])
    try:
        async with open_requester(root, first_info["addrs"][0]) as node:
            await wait_for_workers(node, 2)
            print("round trips ...", file=sys.stderr)
            report["round_trip"] = await bench_round_trips(node, samples=60)
            print("throughput ...", file=sys.stderr)
            report["throughput_2_workers"] = await bench_throughput(node)
        report["worker_peak_rss_mib"] = [round(peak_rss_mib(p.pid), 1) for p in (first, second)]
        report["worker_rss_mib_idle_after"] = [
            round(psutil.Process(p.pid).memory_info().rss / 2**20, 1) for p in (first, second)
        ]
    finally:
        for process in (first, second):
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=20)
    print("verification share ...", file=sys.stderr)
    report["verification"] = await trio.to_thread.run_sync(verification_share)
    print("kill recovery ...", file=sys.stderr)
    report["kill_recovery"] = await bench_kill_recovery(root)
    return report


def main(argv: list[str]) -> int:
    root = Path(tempfile.mkdtemp(prefix="mtor-bench-compute-"))
    report = trio.run(run_all, root)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compute.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0
