"""A matmul job through the real worker on a GPU, against the same worker on NumPy.

    python benchmarks/gpu_worker_e2e.py [--n 8192] [--shards 8] [--rounds 3] [--json out.json]

What runs: one :class:`~mtor_p2p.compute.worker.WorkerService` (the peer's own worker: upload
buffers, hashing, the resident-operand cache, receipts) with a production runtime (kernels on
threads), and a requester using the peer's client (``ensure_operands``, ``run_shard``,
downloads), both in this process on memnet with no modelled latency or bandwidth limit. So
the figures are the worker's and the requester's own costs around the kernel (the protocol,
copies, hashing, signing) with the network taken out; a real network adds its transfer time.
libp2p is not needed (memnet is the simulator's network), so the script runs on a bare
machine lent a GPU with a handful of pure-Python wheels beside NumPy and CuPy.

Each round runs the job on every backend asked for, interleaved: a cold job (B uploaded and
made resident) then a warm one (the same B, already held by the worker), ``--shards`` row
blocks with two in flight. Every shard's output is checked with Freivalds on the host after
the clock stops. Exit status: 0, 1 if a check failed, 3 if the CuPy backend was asked for and
no GPU is usable.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EXIT_NO_GPU = 3


# This checkout's mtor_p2p and benchmarks, and its kernels/ as mtor_kernels (loaded by
# gpu_kernels.load_kernels when the package is not installed: a bare machine lent a GPU).
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from benchmarks.gpu_kernels import load_kernels  # noqa: E402

load_kernels()

import trio  # noqa: E402

from mtor_kernels import verify  # noqa: E402
from mtor_kernels.backend import Backend, BackendUnavailable, CupyBackend, NumpyBackend  # noqa: E402
from mtor_p2p.clock import NetClock  # noqa: E402
from mtor_p2p.compute import client  # noqa: E402
from mtor_p2p.compute.receipt_store import ReceiptStore  # noqa: E402
from mtor_p2p.compute.worker import WorkerService  # noqa: E402
from mtor_p2p.identity import Identity  # noqa: E402
from mtor_p2p.memnet import LatencyModel, MemWorld  # noqa: E402
from mtor_p2p.records.arrays import OperandStore, meta_of  # noqa: E402
from mtor_p2p.runtime import Runtime  # noqa: E402

IN_FLIGHT = 2
#: The requester's runtime (threads for blocking work, as in production).
REQUESTER_RUNTIME = Runtime.production()


def identity(label: str) -> Identity:
    return Identity(hashlib.sha256(f"gpu worker e2e {label}".encode()).digest())


async def run_on_fresh_worker(
    backend: Backend, a: np.ndarray, b: np.ndarray, shards: int, *, warm: bool
) -> dict[str, Any]:
    """Run the job (cold, then warm when ``warm``) on a fresh worker; times and outputs."""
    world = MemWorld(seed=1, latency=LatencyModel(default_rtt_ms=0.0), quantum=0.0)
    worker_identity = identity("worker")
    worker_network = world.add_peer(worker_identity)
    worker = WorkerService(
        worker_network,
        worker_identity,
        NetClock(),
        OperandStore(max_bytes=8 << 30),
        ReceiptStore(Path(":memory:")),
        price=lambda: 0.0,
        backend=backend,
        runtime=Runtime.production(),
        slots=IN_FLIGHT,
    )
    worker.register()
    requester = world.add_peer(identity("requester"))
    slices = np.array_split(a, shards)
    results: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.run)
        await requester.connect(worker_network.addrs()[0])
        for label in ("cold", "warm") if warm else ("cold",):
            job_id = hashlib.sha256(label.encode()).hexdigest()
            started = time.perf_counter()
            output = await run_job(requester, worker_network.peer_id, job_id, slices, b)
            results[label] = {"seconds": time.perf_counter() - started, "output": output}
        nursery.cancel_scope.cancel()
    results["shards_run"] = worker.stats.shards_run
    return results


async def run_job(
    requester: Any, worker: str, job_id: str, slices: list[np.ndarray], b: np.ndarray
) -> np.ndarray:
    """The product of the stacked ``slices`` and ``b``, a shard per slice, IN_FLIGHT at once;
    every operand is hashed once here, as the scheduler does."""
    output = np.empty((sum(len(s) for s in slices), b.shape[1]), np.float32)
    starts = np.cumsum([0] + [len(s) for s in slices])
    limiter = trio.CapacityLimiter(IN_FLIGHT)
    # Shared by the shards: the second waits for B's upload instead of interleaving.
    in_flight: dict[tuple[str, str], trio.Event] = {}
    b_meta = meta_of(b)

    async def shard(index: int) -> None:
        async with limiter:
            operands = {"a": slices[index], "b": b}
            metas = {"a": meta_of(slices[index]), "b": b_meta}
            await client.ensure_operands(
                requester, worker, operands, timeout=600, metas=metas, unheld=("a",),
                in_flight=in_flight,
            )  # fmt: skip
            target = output[starts[index] : starts[index + 1]]
            # The blocking hook, as a requester's scheduler passes it: a downloaded output is
            # hashed on a thread, not on the event loop between the other shard's transfers.
            answer = await client.run_shard(
                requester, worker, job_id=job_id, shard=index, kernel="matmul",
                operands=operands, timeout=600, transfer_timeout=600, metas=metas, out=target,
                run_blocking=REQUESTER_RUNTIME.run_blocking,
            )  # fmt: skip
            # An output small enough to come in the answer is not downloaded into ``out``:
            # it is a view of the answer (copied, as a requester's job does).
            if not np.shares_memory(answer.output, target):
                target[...] = answer.output

    async with trio.open_nursery() as jobs:
        for index in range(len(slices)):
            jobs.start_soon(shard, index)
    return output


def check(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[bool, float]:
    """Freivalds on the host; (accepted, seconds)."""
    started = time.perf_counter()
    result = verify.freivalds(a, b, c, rng=np.random.default_rng(7))
    return result.ok, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Exit status: 0 every output passed Freivalds, 1 a check failed, 3 the CuPy "
        "backend was asked for and no GPU is usable (--backends numpy runs without one). "
        "Progress: one JSON record per job as it ends; the summary last.",
    )
    parser.add_argument("--n", type=int, default=8192, help="m = k = n of the product")
    parser.add_argument("--shards", type=int, default=8, help="row blocks of the job")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--dtypes", default="float16,float32", help="comma-separated")
    parser.add_argument("--backends", default="cupy,numpy", help="cupy, numpy, or both")
    parser.add_argument("--json", type=Path, help="write the records here too")
    args = parser.parse_args(argv)
    backends: dict[str, Backend] = {}
    for name in args.backends.split(","):
        if name == "cupy":
            try:
                backends[name] = CupyBackend()
            except BackendUnavailable as exc:
                print(f"no usable GPU: {exc} (--backends numpy runs without one)", file=sys.stderr)
                return EXIT_NO_GPU
        elif name == "numpy":
            backends[name] = NumpyBackend()
        else:
            parser.error(f"unknown backend {name!r}")
    rng = np.random.default_rng(1)
    records: list[dict[str, Any]] = []
    failed = 0
    flops = 2.0 * args.n**3
    for dtype in args.dtypes.split(","):
        a = rng.standard_normal((args.n, args.n)).astype(dtype)
        b = rng.standard_normal((args.n, args.n)).astype(dtype)
        for round_index in range(args.rounds):
            for name, backend in backends.items():
                got = trio.run(
                    functools.partial(run_on_fresh_worker, backend, a, b, args.shards, warm=True)
                )
                record: dict[str, Any] = {
                    "backend": name,
                    "device": getattr(getattr(backend, "status", None), "name", "host"),
                    "dtype": dtype,
                    "n": args.n,
                    "shards": args.shards,
                    "round": round_index,
                    "shards_run": got["shards_run"],
                }
                for label in ("cold", "warm"):
                    seconds = got[label]["seconds"]
                    ok, check_s = check(a, b, got[label]["output"])
                    failed += not ok
                    record[f"{label}_s"] = seconds
                    record[f"{label}_tflops"] = flops / seconds / 1e12
                    record[f"{label}_freivalds_ok"] = ok
                    record[f"{label}_freivalds_s"] = check_s
                records.append(record)
                print(json.dumps(record), flush=True)
    summary: dict[str, Any] = {}
    for dtype in args.dtypes.split(","):
        for name in backends:
            mine = [r for r in records if r["backend"] == name and r["dtype"] == dtype]
            for label in ("cold", "warm"):
                summary[f"{name}_{dtype}_{label}_s_median"] = statistics.median(
                    r[f"{label}_s"] for r in mine
                )
        if {"cupy", "numpy"} <= backends.keys():
            for label in ("cold", "warm"):
                summary[f"{dtype}_{label}_numpy_over_cupy"] = (
                    summary[f"numpy_{dtype}_{label}_s_median"]
                    / summary[f"cupy_{dtype}_{label}_s_median"]
                )
    summary["failed_checks"] = failed
    document = {"summary": summary, "records": records}
    print(json.dumps({"summary": summary}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(document, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
