"""Calibration: the same small job stream on a real devnet and in the simulator.

Eight real nodes (py-libp2p on loopback, NumPy workers, SQLite ledgers) run six matrix jobs;
then eight simulated nodes (memnet, MockClock, the simulator's device model) run the same six
jobs. The simulator's free parameters are set from *separate* measurements taken here, not
fitted to the job latencies: the per-request cost of the real stack (an echo request between
two real hosts), the workers' speed (the real nodes' own benchmark) and the requester's
verification speed (Freivalds' check timed on this machine). The test then checks:

* receipts: the same number of accepted shards and receipts, exactly;
* balances: the requester pays exactly the same (fixed prices, the same FLOPs);
* latency: the simulated median job latency is a lower bound of the real one. Only the
  bound is asserted: the real side is timed on the wall clock, and a loaded machine stretches
  it without limit (the factor, printed, was 3.4-5.6 on a quiet 2-core machine, above 10 with
  other jobs running and 22 with both cores saturated).
  The model carries round trips, the stack's measured cost per request and per
  byte, compute and verification; the real figure also carries what the model leaves out:
  eight nodes' Python work (gossip, ledger, hashing, signing, SQLite commits) sharing one
  event loop on a 2-core machine. Measured here on 2026-12-02: real 195-219 ms, simulated
  21-39 ms (a factor of 5.6-9 before the per-byte cost was measured, 5.6 after). The
  simulator therefore describes a data path several times faster per job than today's
  py-libp2p stack running eight nodes in one process; ``simulations/README.md`` says what
  that means for the latency figures.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import trio
import trio.testing

from mtor_kernels import verify as checks
from mtor_p2p.ledger.genesis import NANO
from mtor_p2p.node import Node
from mtor_p2p.sim.engine import Simulation
from mtor_p2p.sim.scenario import build_scenario
from tests.conftest import open_networks
from tests.test_compute import devnet

SIMULATIONS = Path(__file__).resolve().parent.parent / "simulations"
JOBS = 6
SHARDS = 2
PRICE = 1.0  # credits per TFLOP, every worker, fixed


def job_operands(index: int) -> dict[str, np.ndarray]:
    """The operands of job ``index`` (the same on both sides)."""
    rng = np.random.default_rng(100 + index)
    return {
        "a": rng.standard_normal((512, 256), dtype=np.float32),
        "b": rng.standard_normal((256, 256), dtype=np.float32),
    }


async def run_jobs(node: Node) -> tuple[list[float], int]:
    """Submit the jobs one after another; their latencies (trio's clock) and receipts."""
    latencies, receipts = [], 0
    for index in range(JOBS):
        started = trio.current_time()
        result = await node.submit(
            "matmul", job_operands(index), verify="freivalds", shards=SHARDS, max_workers=4
        )
        latencies.append(trio.current_time() - started)
        receipts += len(result.shards)
    return latencies, receipts


async def real_stack_costs() -> tuple[float, float]:
    """The real stack between two hosts on loopback: the median round trip of a small request
    (ms), and the rate at which a stream carries bulk bytes (Mbit/s, from a 1 MiB echo)."""
    async with open_networks(2) as (a, b):

        async def echo(sender: str, payload: bytes) -> bytes:
            return payload

        b.handle("/mtor/echo/1", echo, max_request_bytes=2 << 20)

        async def median_round_trip(size: int) -> float:
            times = []
            for _ in range(15):
                started = time.perf_counter()
                await a.request(b.peer_id, "/mtor/echo/1", b"x" * size, max_response_bytes=2 << 20)
                times.append(time.perf_counter() - started)
            return statistics.median(times)

        small = await median_round_trip(256)
        bulk = await median_round_trip(1 << 20)
    # 1 MiB each way; the small round trip's fixed cost taken out.
    mbps = 2 * (1 << 20) * 8 / max(bulk - small, 1e-6) / 1e6
    return small * 1000, mbps


def host_gflops() -> float:
    """This machine's rate on the requester's check (Freivalds, 20 rounds, float64)."""
    ops = job_operands(0)
    a, b = ops["a"][:256], ops["b"]
    c = a @ b
    rng = np.random.default_rng(1)
    # The best of seven: the rate when the check has a core. An average let one busy moment
    # of a test beside it (xdist) divide the rate by ten, and the simulated jobs, charged at
    # that rate, took 31 ms against the real devnet's 9.7 (a flaky failure, 2026-12-07).
    timings = []
    for _ in range(7):
        started = time.perf_counter()
        checks.freivalds(a, b, c, rounds=20, rng=rng)
        timings.append(time.perf_counter() - started)
    seconds = min(timings)
    m, k = a.shape
    n = b.shape[1]
    return 2.0 * 20 * (m * k + k * n + 2 * m * n) / seconds / 1e9


async def real_devnet(root: Path) -> dict[str, object]:
    """Run the jobs on 8 real nodes; return latencies, receipts, requester's payment."""
    fixed = {str(i): {"price": PRICE, "dynamic_price": False} for i in range(8)}
    async with devnet(root, 8, **fixed) as nodes:
        requester = nodes[0][0]
        # The node's challenger tests workers never measured with paid jobs of its own (its
        # first round 30 s after start, which a loaded machine's start-up can reach); the
        # simulated requester runs none, so ``paid`` would differ by their cost.
        requester.challenger.per_round = 0
        tflops = statistics.median(n.tflops for n, _ in nodes[1:])
        before = (await trio.to_thread.run_sync(requester.ledger_summary))["balance"]
        latencies, receipts = await run_jobs(requester)
        with trio.fail_after(10):
            # Receipts are stored and entered into the ledger after each job returns (its
            # courier): wait for both, not for the store alone (a busy machine showed the
            # balance read between the two).
            await requester.scheduler.settled()
            while requester.receipts.count() < receipts:
                await trio.sleep(0.05)
        after = (await trio.to_thread.run_sync(requester.ledger_summary))["balance"]
    return {"latencies": latencies, "receipts": receipts, "paid": before - after, "tflops": tflops}


def simulated(
    tflops: float, overhead_ms: float, link_mbps: float, gflops: float
) -> dict[str, object]:
    """Run the same jobs on 8 simulated nodes on a MockClock."""
    raw = {
        "name": "calibration",
        "kind": "mtor",
        "peers": 8,
        "hours": 1.0,
        "seed": 3,
        "dim_scale": 1,
        "regions": {"WEU": 1.0},
        "fleet": {"host cpu": 1.0},
        # The real workers' benchmark, as a device (efficiency 1: it is already sustained).
        "gpus": {
            "host cpu": {
                "kind": "cpu",
                "fp32_tflops": tflops,
                "fp16_tflops": tflops,
                "power_w": 65.0,
                "idle_w": 10.0,
                "mem_gib": 16.0,
                "efficiency": 1.0,
            }
        },
        "prices": {"credits_per_tflop": PRICE, "dynamic": False},
        # Loopback: no region delay, no access delay to speak of; the links carry bytes as
        # fast as the real stack does, and each request costs what a real one does.
        "network": {
            "jitter": 0.0,
            "access_ms": 0.01,
            "uplink_mbps": link_mbps,
            "downlink_mbps": link_mbps,
            "request_overhead_ms": overhead_ms,
        },
        "requesters": {"host_gflops": gflops},
        "ledger": {"credits": 1000.0},
        "timing": {
            "warmup": 30.0,
            "record_ttl": 20.0,
            "announce_interval": 2.0,
            "mesh_interval": 2.0,
            "sweep_interval": 2.0,
            "capacity_scope": "global",
        },
    }
    scenario = build_scenario(raw, base=SIMULATIONS)

    async def drive() -> dict[str, object]:
        async with Simulation(scenario).running() as sim:
            requester = sim.peers[0]
            assert requester.node is not None
            node = requester.node
            before = node.ledger.account(node.peer_id)["balance"]
            latencies, receipts = await run_jobs(node)
            await trio.sleep(5)
            after = node.ledger.account(node.peer_id)["balance"]
        return {"latencies": latencies, "receipts": receipts, "paid": before - after}

    return trio.run(drive, clock=trio.testing.MockClock(autojump_threshold=0))


def test_simulator_agrees_with_a_real_devnet(tmp_path: Path) -> None:
    overhead, link_mbps = trio.run(real_stack_costs)
    gflops = host_gflops()
    real = trio.run(real_devnet, tmp_path)
    sim = simulated(float(real["tflops"]), overhead, link_mbps, gflops)  # type: ignore[arg-type]
    real_median = statistics.median(real["latencies"])  # type: ignore[arg-type]
    sim_median = statistics.median(sim["latencies"])  # type: ignore[arg-type]
    print(
        f"request overhead {overhead:.2f} ms, stream {link_mbps:.0f} Mbit/s, "
        f"host {gflops:.1f} GFLOP/s, "
        f"worker {real['tflops']:.4f} TFLOP/s; median job latency real {real_median * 1000:.1f}"
        f" ms, simulated {sim_median * 1000:.1f} ms; receipts {real['receipts']} / "
        f"{sim['receipts']}; paid {real['paid']} / {sim['paid']} nano-credits"
    )
    assert real["receipts"] == sim["receipts"] == JOBS * SHARDS
    assert real["paid"] == sim["paid"] > 0
    assert int(real["paid"]) < 1000 * NANO  # type: ignore[call-overload]
    assert sim_median <= real_median
