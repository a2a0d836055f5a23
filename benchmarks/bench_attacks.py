"""Attack figures for issue 8 ("Trust under attack"), each beside a baseline from the same run.

Every attack gets a fresh devnet of real ``mtor-peer`` processes on loopback; the attacker runs
in this process (py-libp2p hosts from :mod:`benchmarks.attackers`, or raw sockets):

* ``sybil``: one host injects records of 8 throwaway identities (10,000 TFLOP/s, price 0, every
  kernel, unreachable addresses, 1 h lifetime). Honest jobs submitted / completed / correct
  during the attack, their latency against the no-attack baseline, how long the Sybils take to
  reach every view, and the time to route around them.
* ``sybil-live``: 8 reachable liars (4 stall every shard, 4 return wrong results) that advertise
  the same lie. Same figures.
* ``zero-price``: shards quoted at ``max_price`` 0 sent straight to a worker (never
  countersigned): did it compute, what did the receipt charge, was an honest job delayed.
* ``upload-flood``: uploads announcing 256 MiB each, started empty and grown slowly: victim
  peak RSS against its idle RSS (goal under 2x), and whether honest jobs still complete.
* ``stream-flood``: streams announcing a full-size request and sending most of it, held open:
  victim peak RSS against idle (goal under 2x), honest jobs during the flood.
* ``control-flood``: thousands of never-finished HTTP heads on the control API, then
  authenticated ``GET /v1/status`` latency against the no-flood baseline (goal p99 < 100 ms).

Run: ``./mtor bench attacks [--only NAME[,NAME]] [--quick] [--label TEXT] [--out PATH]``;
writes ``benchmarks/results/attacks.json`` (or PATH) after every attack (each entry says
whether it was a ``--quick`` run, and which code ran) and prints the figures. Exits 1 if the
harness itself broke in any attack (a devnet that would not start, an exception in the
attacker); a missed goal is a figure, not a failure.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import trio

from benchmarks.attackers import (
    ControlFlood,
    FloodCounters,
    LiarWorker,
    SybilFlood,
    ZeroPriceOutcome,
    stream_flood,
    upload_flood,
    zero_price_shard,
)
from benchmarks.machine import machine
from benchmarks.paths import user_path
from mtor_p2p.compute.protocol import MAX_MESSAGE_BYTES
from mtor_p2p.control import ControlClient, ControlError, NodeNotRunning
from mtor_p2p.devnet import Devnet
from mtor_p2p.identity import Identity
from mtor_p2p.libp2p_host import Libp2pNetwork
from mtor_p2p.network import NetworkError

RESULTS = Path(__file__).with_name("results")
ATTACKS = ("sybil", "sybil-live", "zero-price", "upload-flood", "stream-flood", "control-flood")
#: Job latency counts as recovered when within this factor of the baseline median.
RECOVERED_FACTOR = 1.5
logging.getLogger("libp2p").setLevel(logging.CRITICAL)
logging.getLogger("mtor_p2p").setLevel(logging.CRITICAL)


def progress(message: str) -> None:
    """One line of progress on stderr."""
    print(f"[attacks {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of ``values``."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary_ms(values: list[float]) -> dict[str, Any]:
    """n, p50, p95, p99 and max in milliseconds."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50_ms": round(statistics.median(values) * 1e3, 2),
        "p95_ms": round(percentile(values, 95) * 1e3, 2),
        "p99_ms": round(percentile(values, 99) * 1e3, 2),
        "max_ms": round(max(values) * 1e3, 2),
    }


# -- the devnet -------------------------------------------------------------------------------


class AttackDevnet:
    """A fresh devnet of ``peers`` real peer processes, converged, with helpers to reach them."""

    def __init__(self, peers: int, root: Path) -> None:
        self.size = peers
        self.root = root
        self.devnet = Devnet(root / "net", record_ttl=30, announce_interval=5, log_level="warning")

    def start(self, timeout: float = 120.0) -> float:
        """Start every peer and wait until every view holds every peer; return seconds."""
        started = time.monotonic()
        net = self.devnet
        net.base_dir.mkdir(parents=True, exist_ok=True)
        net.write_genesis(self.size)
        first = net.start_peer(0, None)
        net.wait_started(first, time.monotonic() + 60)
        bootstrap = first.addrs[0] if first.addrs else None
        for index in range(1, self.size):
            net.start_peer(index, bootstrap)
        for peer in net.peers[1:]:
            net.wait_started(peer, time.monotonic() + 60)
        everyone = {p.peer_id for p in net.peers}
        deadline = time.monotonic() + timeout
        while sum(view >= everyone for view in net.views()) < self.size:
            if time.monotonic() > deadline:
                raise TimeoutError(f"devnet of {self.size} did not converge in {timeout:.0f} s")
            time.sleep(0.25)
        return time.monotonic() - started

    def stop(self) -> None:
        """Stop every peer."""
        self.devnet.stop()

    def client(self, index: int, timeout: float = 10.0) -> ControlClient:
        """Control API client of peer ``index``."""
        return ControlClient.for_data_dir(Path(self.devnet.peers[index].data_dir), timeout=timeout)

    def peer_id(self, index: int) -> str:
        """Peer ID of peer ``index``."""
        return self.devnet.peers[index].peer_id

    def addrs(self, index: int) -> list[str]:
        """Listen addresses of peer ``index``."""
        return list(self.devnet.peers[index].addrs or [])

    def pid(self, index: int) -> int:
        """Process ID of peer ``index``."""
        return self.devnet.peers[index].pid

    def alive(self, index: int) -> bool:
        """True while peer ``index``'s process runs."""
        return self.devnet.processes[index].poll() is None

    def views(self) -> list[set[str]]:
        """Each peer's capacity view."""
        return self.devnet.views()


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """``field`` of ``/proc/<pid>/status`` in MiB (0 if the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class RssSampler:
    """Samples a process's RSS every ``interval`` seconds while running."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0.0
        self.series: list[tuple[float, float]] = []

    async def run(self) -> None:
        """Sample until cancelled; one point per second goes into the series."""
        start = trio.current_time()
        last_point = -1.0
        while True:
            value = rss_mib(self.pid)
            self.peak = max(self.peak, value)
            now = trio.current_time() - start
            if now - last_point >= 1.0:
                self.series.append((round(now, 1), round(value, 1)))
                last_point = now
            await trio.sleep(self.interval)


async def idle_rss(pid: int, seconds: float = 3.0) -> float:
    """Median RSS of an idle process over ``seconds``."""
    samples = []
    end = trio.current_time() + seconds
    while trio.current_time() < end:
        samples.append(rss_mib(pid))
        await trio.sleep(0.1)
    return statistics.median(samples)


# -- honest jobs ------------------------------------------------------------------------------


def expected_product(seed: int, size: int) -> np.ndarray:
    """What the control API's random matmul job with ``seed`` must return."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    return a @ b


def honest_job(
    client: ControlClient, *, seed: int, size: int, out_dir: Path, timeout: float
) -> dict[str, Any]:
    """Submit one matmul job through the control API, wait for it, check its output."""
    out = out_dir / f"job-{seed}.npy"
    body = {"kernel": "matmul", "m": size, "n": size, "k": size, "seed": seed, "out": str(out)}
    started = time.perf_counter()
    result: dict[str, Any] = {"seed": seed, "state": "submit-failed", "correct": False}
    try:
        job_id = client.call("POST", "/v1/jobs", body)["id"]
        deadline = started + timeout
        while True:
            state = client.call("GET", f"/v1/jobs?id={job_id}")
            if state["state"] != "running":
                result["state"] = state["state"]
                result["error"] = state.get("error")
                summary = state.get("result") or {}
                result["workers"] = len(summary.get("workers", []) or [])
                result["reissued"] = summary.get("reissued")
                result["rejected"] = summary.get("rejected")
                break
            if time.perf_counter() > deadline:
                result["state"] = "timeout"
                result["error"] = f"no result within {timeout:.0f} s (the harness stopped waiting)"
                break
            time.sleep(0.05)
    except (ControlError, NodeNotRunning, KeyError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"[:200]
    result["latency_s"] = round(time.perf_counter() - started, 3)
    if result["state"] == "done":
        try:
            output = np.load(out, allow_pickle=False)
            expected = expected_product(seed, size)
            result["correct"] = bool(
                output.dtype == expected.dtype
                and output.shape == expected.shape
                and np.allclose(output, expected, rtol=1e-3, atol=1e-3)
            )
        except (OSError, ValueError) as exc:
            result["error"] = f"output unreadable: {exc}"
        out.unlink(missing_ok=True)
    if result.get("error"):
        result["error"] = str(result["error"])[:200]
    return result


class JobLoop:
    """Submits honest jobs one after another from a thread, recording each."""

    def __init__(self, client: ControlClient, size: int, out_dir: Path, timeout: float) -> None:
        self.client = client
        self.size = size
        self.out_dir = out_dir
        self.timeout = timeout
        self.jobs: list[dict[str, Any]] = []
        self._seed = 1000
        #: Seconds between job starts at least (failed jobs return at once; no busy loop).
        self.pace = 1.0

    async def run_for(self, seconds: float, *, origin: float, min_jobs: int = 1) -> None:
        """Run jobs until ``seconds`` have passed (and at least ``min_jobs`` ran); each job
        records its start relative to ``origin`` (a ``trio.current_time()``)."""
        end = trio.current_time() + seconds
        while trio.current_time() < end or len(self.jobs) < min_jobs:
            self._seed += 1
            start = trio.current_time() - origin
            job = await trio.to_thread.run_sync(
                lambda seed=self._seed: honest_job(
                    self.client,
                    seed=seed,
                    size=self.size,
                    out_dir=self.out_dir,
                    timeout=self.timeout,
                )
            )
            job["t_start_s"] = round(start, 2)
            self.jobs.append(job)
            await trio.sleep(max(0.0, self.pace - job["latency_s"]))
            progress(
                f"  job t={start:6.1f}s {job['state']:<8} correct={job['correct']} "
                f"{job['latency_s']:.2f}s {job.get('error') or ''}"[:160]
            )


def job_figures(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """Submitted / completed / correct and latency of the completed ones."""
    done = [j for j in jobs if j["state"] == "done"]
    correct = [j for j in done if j["correct"]]
    errors: dict[str, int] = {}
    for job in jobs:
        if job["state"] != "done" and job.get("error"):
            key = job["error"][:80]
            errors[key] = errors.get(key, 0) + 1
    return {
        "submitted": len(jobs),
        "completed": len(done),
        "correct": len(correct),
        "correct_pct": round(100 * len(correct) / len(jobs), 1) if jobs else None,
        "latency_completed": summary_ms([j["latency_s"] for j in done]),
        "failures": errors,
    }


def latency_ratio(baseline: dict[str, Any], attack: dict[str, Any]) -> float | None:
    """Median latency of completed jobs under attack over the baseline's (None: none done)."""
    base, during = baseline["latency_completed"], attack["latency_completed"]
    if not base.get("n") or not during.get("n"):
        return None
    return round(during["p50_ms"] / base["p50_ms"], 2)


def time_to_route_around(jobs: list[dict[str, Any]], baseline_p50_s: float) -> float | None:
    """Seconds from attack start until the first job from which on every job completed
    correctly, that job within RECOVERED_FACTOR x the baseline median and the median of it and
    all later ones too (None: not in this run)."""
    limit = RECOVERED_FACTOR * baseline_p50_s
    for index, job in enumerate(jobs):
        rest = jobs[index:]
        if (
            job["latency_s"] <= limit
            and all(j["state"] == "done" and j["correct"] for j in rest)
            and statistics.median(j["latency_s"] for j in rest) <= limit
        ):
            return float(job["t_start_s"])
    return None


# -- attacker hosts ---------------------------------------------------------------------------


async def open_attacker(
    nursery: trio.Nursery, devnet: AttackDevnet, peers: list[int] | None = None
) -> Libp2pNetwork:
    """Start an attacker host in ``nursery`` and dial the given devnet peers (default all)."""

    async def host(*, task_status: trio.TaskStatus[Libp2pNetwork]) -> None:
        async with Libp2pNetwork.open(Identity.generate()) as network:
            task_status.started(network)
            await trio.sleep_forever()

    network: Libp2pNetwork = await nursery.start(host)
    for index in range(devnet.size) if peers is None else peers:
        for addr in devnet.addrs(index):
            try:
                await network.connect(addr, timeout=10)
                break
            except NetworkError as exc:
                progress(f"  attacker could not dial peer {index}: {exc}")
    return network


# -- the attacks ------------------------------------------------------------------------------


class Settings:
    """Durations and sizes of one run (quick or full)."""

    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.baseline_jobs = 4 if quick else 10
        self.attack_seconds = 30.0 if quick else 120.0
        self.job_size = 256 if quick else 512
        self.job_timeout = 20.0 if quick else 60.0
        self.upload_budget = (384 if quick else 2048) << 20
        self.flood_streams = 48 if quick else 256
        self.control_connections = 2000 if quick else 4000
        self.status_calls = 100 if quick else 300


async def sybil_views(devnet: AttackDevnet, sybils: set[str]) -> list[int]:
    """How many Sybils each honest peer's view holds."""
    views = await trio.to_thread.run_sync(devnet.views)
    return [len(view & sybils) for view in views]


async def attack_sybil(devnet: AttackDevnet, settings: Settings, *, live: bool) -> dict[str, Any]:
    """Sybil records (unreachable) or live liars; honest jobs before and during."""
    out_dir = devnet.root / "out"
    out_dir.mkdir()
    loop = JobLoop(devnet.client(0), settings.job_size, out_dir, settings.job_timeout)
    progress(f"baseline: {settings.baseline_jobs} honest jobs, no attack")
    origin = trio.current_time()
    await loop.run_for(0, origin=origin, min_jobs=settings.baseline_jobs)
    baseline = loop.jobs
    base = job_figures(baseline)
    base_p50 = statistics.median(j["latency_s"] for j in baseline if j["state"] == "done")
    result: dict[str, Any] = {"honest_peers": devnet.size, "baseline": base}
    scratch = devnet.root / "attacker"
    scratch.mkdir()
    async with trio.open_nursery() as nursery:
        liars: list[LiarWorker] = []
        if live:
            progress("attack: 8 reachable liars (4 stall, 4 wrong) advertise 10,000 TFLOP/s at 0")
            for index in range(8):
                network = await open_attacker(nursery, devnet)
                identity = network._identity
                liar = LiarWorker(network, identity, "stall" if index < 4 else "wrong", scratch)
                liars.append(liar)
                nursery.start_soon(liar.run)
            sybils = {liar.identity.peer_id for liar in liars}
            flood = None
        else:
            progress("attack: one host injects 8 Sybil records (unreachable, 10,000 TFLOP/s, 0)")
            network = await open_attacker(nursery, devnet)
            flood = SybilFlood(network, count=8)
            sybils = flood.peer_ids
            nursery.start_soon(flood.run)
        attack_start = trio.current_time()
        reach: list[tuple[float, list[int]]] = []

        async def watch_views() -> None:
            while True:
                counts = await sybil_views(devnet, sybils)
                reach.append((round(trio.current_time() - attack_start, 1), counts))
                await trio.sleep(1.0)

        nursery.start_soon(watch_views)
        loop.jobs = []
        await loop.run_for(settings.attack_seconds, origin=attack_start)
        nursery.cancel_scope.cancel()
    during = loop.jobs
    everywhere = next((t for t, counts in reach if counts and min(counts) == len(sybils)), None)
    result["attack"] = job_figures(during)
    result["attack"]["sybils"] = len(sybils)
    result["attack"]["seconds"] = settings.attack_seconds
    result["sybils_in_every_view_after_s"] = everywhere
    result["sybils_in_views_max"] = max((max(c) for _, c in reach if c), default=0)
    result["sybils_in_views_last"] = reach[-1][1] if reach else None
    result["time_to_route_around_s"] = time_to_route_around(during, base_p50)
    result["recovered_means"] = (
        f"every later job completed correctly within {RECOVERED_FACTOR}x the baseline median "
        f"({RECOVERED_FACTOR * base_p50:.2f} s)"
    )
    result["latency_ratio_p50"] = latency_ratio(base, result["attack"])
    result["job_series"] = [
        {k: j.get(k) for k in ("t_start_s", "state", "correct", "latency_s", "error")}
        for j in during
    ]
    if flood is not None:
        result["attacker"] = {
            "gossip_injected": flood.published,
            "dht_puts": flood.dht_puts,
            "errors": flood.errors,
        }
    else:
        result["attacker"] = [liar.counters() for liar in liars]
    result["goal"] = "100% of honest jobs complete with correct results while 8 Sybils lie"
    return result


async def attack_zero_price(devnet: AttackDevnet, settings: Settings) -> dict[str, Any]:
    """Shards at max_price 0 sent straight to the only worker; honest jobs before and during."""
    out_dir = devnet.root / "out"
    out_dir.mkdir()
    victim = devnet.peer_id(1)
    loop = JobLoop(devnet.client(0), settings.job_size, out_dir, settings.job_timeout)
    progress(f"baseline: {settings.baseline_jobs} honest jobs on the victim, no attack")
    await loop.run_for(0, origin=trio.current_time(), min_jobs=settings.baseline_jobs)
    base = job_figures(loop.jobs)
    outcomes: list[ZeroPriceOutcome] = []
    size = 512 if settings.quick else 768
    progress(f"attack: 2 loops of {size}^3 matmul shards at max_price 0 on the victim")
    async with trio.open_nursery() as nursery:
        network = await open_attacker(nursery, devnet, [1])
        rng = np.random.default_rng(7)

        async def free_rider() -> None:
            while True:
                outcome = await zero_price_shard(network, victim, size=size, rng=rng)
                outcomes.append(outcome)
                if not outcome.computed:
                    await trio.sleep(0.2)

        nursery.start_soon(free_rider)
        nursery.start_soon(free_rider)
        await trio.sleep(2)
        loop.jobs = []
        await loop.run_for(settings.attack_seconds * 2 / 3, origin=trio.current_time())
        nursery.cancel_scope.cancel()
    computed = [o for o in outcomes if o.computed]
    reasons: dict[str, int] = {}
    for outcome in outcomes:
        if outcome.error:
            reasons[outcome.error[:100]] = reasons.get(outcome.error[:100], 0) + 1
    during = job_figures(loop.jobs)
    status = await trio.to_thread.run_sync(lambda: devnet.client(1).call("GET", "/v1/status"))
    return {
        "zero_price_shards_sent": len(outcomes),
        "computed": len(computed),
        "charged": sorted({o.charged for o in computed if o.charged is not None}),
        "refused": len(outcomes) - len(computed),
        "refusal_reasons": reasons,
        "never_countersigned": len(computed),
        "shard": f"matmul {size}^3 float32",
        "baseline": base,
        "attack": during,
        "latency_ratio_p50": latency_ratio(base, during),
        "victim_worker_stats": status.get("worker") if isinstance(status, dict) else None,
        "goal": "a worker refuses shards below its price; honest jobs not delayed",
    }


async def _rss_attack(
    devnet: AttackDevnet,
    settings: Settings,
    flood: Callable[[list[Libp2pNetwork], str, FloodCounters], Awaitable[None]],
    description: str,
    senders: int = 4,
) -> dict[str, Any]:
    """Shared frame of the memory attacks on peer 1: idle RSS, honest jobs before and during
    and after, sampled peak RSS while ``flood`` runs from ``senders`` attacker hosts (distinct
    identities and connections, as per-peer bounds invite)."""
    out_dir = devnet.root / "out"
    out_dir.mkdir()
    pid = devnet.pid(1)
    victim = devnet.peer_id(1)
    loop = JobLoop(devnet.client(0), settings.job_size, out_dir, settings.job_timeout)
    progress(f"baseline: {settings.baseline_jobs} honest jobs on the victim, then idle RSS")
    await loop.run_for(0, origin=trio.current_time(), min_jobs=settings.baseline_jobs)
    base = job_figures(loop.jobs)
    idle = await idle_rss(pid)
    progress(f"victim idle RSS {idle:.0f} MiB; attack: {description}")
    counters = FloodCounters()
    sampler = RssSampler(pid)
    flood_seconds = 0.0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sampler.run)
        networks = [await open_attacker(nursery, devnet, [1]) for _ in range(senders)]
        start = trio.current_time()
        loop.jobs = []
        with trio.move_on_after(settings.attack_seconds * 3):

            async def attack() -> None:
                nonlocal flood_seconds
                await flood(networks, victim, counters)
                flood_seconds = trio.current_time() - start

            async with trio.open_nursery() as inner:
                inner.start_soon(attack)
                await loop.run_for(settings.attack_seconds, origin=start)
        during = list(loop.jobs)
        peak_attack = sampler.peak
        progress(f"victim peak RSS {peak_attack:.0f} MiB; honest jobs after the attack")
        loop.jobs = []
        await loop.run_for(0, origin=start, min_jobs=2)
        nursery.cancel_scope.cancel()
    return {
        "attack": description,
        "attacker_hosts": senders,
        "victim_idle_rss_mib": round(idle, 1),
        "victim_peak_rss_mib": round(peak_attack, 1),
        "peak_over_idle": round(peak_attack / idle, 2) if idle else None,
        "victim_vmhwm_mib": round(rss_mib(pid, "VmHWM"), 1),
        "victim_rss_end_mib": round(rss_mib(pid), 1),
        "rss_series": sampler.series,
        "flood_seconds": round(flood_seconds, 1),
        "flood": asdict(counters),
        "baseline": base,
        "honest_during_attack": job_figures(during),
        "honest_after_attack": job_figures(loop.jobs),
        "victim_alive": devnet.alive(1),
        "goal": "victim peak RSS under 2x idle; honest jobs complete",
    }


async def attack_upload_flood(devnet: AttackDevnet, settings: Settings) -> dict[str, Any]:
    """Uploads announcing 256 MiB each, started empty, grown 4 MiB at a time."""
    uploads = 32

    async def flood(networks: list[Libp2pNetwork], victim: str, counters: FloodCounters) -> None:
        await upload_flood(
            networks,
            victim,
            uploads=uploads,
            announced_bytes=256 << 20,
            budget_bytes=settings.upload_budget,
            counters=counters,
        )

    result = await _rss_attack(
        devnet,
        settings,
        flood,
        f"{uploads} uploads announcing 256 MiB each, started empty, grown round-robin "
        f"4 MiB at a time up to {settings.upload_budget >> 20} MiB sent",
    )
    return result


async def attack_stream_flood(devnet: AttackDevnet, settings: Settings) -> dict[str, Any]:
    """Streams announcing a full-size upload request, each sending all but a few bytes."""
    streams = settings.flood_streams
    partial = MAX_MESSAGE_BYTES - 1024

    async def flood(networks: list[Libp2pNetwork], victim: str, counters: FloodCounters) -> None:
        await stream_flood(
            networks,
            victim,
            streams=streams,
            partial_bytes=partial,
            hold=min(20.0, settings.attack_seconds / 2),
            counters=counters,
        )

    return await _rss_attack(
        devnet,
        settings,
        flood,
        f"{streams} upload streams announcing {MAX_MESSAGE_BYTES} bytes, sending "
        f"{partial} of them, held open",
    )


def timed_status(client: ControlClient, calls: int, spacing: float) -> tuple[list[float], int]:
    """Latencies of ``calls`` authenticated ``GET /v1/status``, ``spacing`` seconds apart, so
    that they span the flood's reconnections (failures count with the time they took)."""
    durations, failures = [], 0
    for _ in range(calls):
        time.sleep(spacing)
        start = time.perf_counter()
        try:
            client.call("GET", "/v1/status")
        except (ControlError, NodeNotRunning):
            failures += 1
        durations.append(time.perf_counter() - start)
    return durations, failures


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards ``wanted``; return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, max(soft, wanted)) if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def process_fd_limit(pid: int) -> int | None:
    """The soft open-files limit of process ``pid``."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return int(line.split()[3])
    except (OSError, ValueError, IndexError):
        pass
    return None


async def attack_control_flood(devnet: AttackDevnet, settings: Settings) -> dict[str, Any]:
    """Slow connections to peer 0's control API; status latency before and during."""
    client = devnet.client(0, timeout=10)
    url = urlsplit(client.url)
    wanted = settings.control_connections
    limit = raise_fd_limit(wanted + 256)
    connections = min(wanted, limit - 256)
    calls = settings.status_calls
    progress(f"baseline: {calls} status calls, no flood")
    spacing = 0.15
    base, base_failures = await trio.to_thread.run_sync(timed_status, client, calls, spacing)
    flood = ControlFlood(url.hostname or "127.0.0.1", url.port or 80, connections, trickle=1.0)
    progress(f"attack: {connections} slow connections to the control API")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flood.run)
        ramp_end = trio.current_time() + 15
        while flood.peak_open < connections * 0.95 and trio.current_time() < ramp_end:
            await trio.sleep(0.25)
        progress(f"  {flood.open_now} connections open; timing {calls} status calls")
        open_while_timing: list[int] = []

        async def watch_open() -> None:
            while True:
                open_while_timing.append(flood.open_now)
                await trio.sleep(0.5)

        nursery.start_soon(watch_open)
        during, failures = await trio.to_thread.run_sync(timed_status, client, calls, spacing)
        counters = flood.counters()
        nursery.cancel_scope.cancel()
    base_summary, attack_summary = summary_ms(base), summary_ms(during)
    return {
        "connections_wanted": wanted,
        "fd_limit_bench": limit,
        "fd_limit_victim": process_fd_limit(devnet.pid(0)),
        "flood": counters,
        "open_while_timing": {
            "min": min(open_while_timing, default=0),
            "median": statistics.median(open_while_timing) if open_while_timing else 0,
            "max": max(open_while_timing, default=0),
        },
        "status_calls_spaced_s": spacing,
        "baseline_status": {**base_summary, "failures": base_failures},
        "attack_status": {**attack_summary, "failures": failures},
        "p99_ratio": round(attack_summary["p99_ms"] / base_summary["p99_ms"], 1),
        "victim_alive": devnet.alive(0),
        "goal": "status p99 under 100 ms during the flood",
    }


# -- driver -----------------------------------------------------------------------------------

#: name -> (devnet size, attack)
PLAN: dict[str, tuple[int, Callable[[AttackDevnet, Settings], Awaitable[dict[str, Any]]]]] = {
    "sybil": (4, lambda d, s: attack_sybil(d, s, live=False)),
    "sybil-live": (4, lambda d, s: attack_sybil(d, s, live=True)),
    "zero-price": (2, attack_zero_price),
    "upload-flood": (2, attack_upload_flood),
    "stream-flood": (2, attack_stream_flood),
    "control-flood": (1, attack_control_flood),
}


def run_attack(name: str, settings: Settings) -> dict[str, Any]:
    """One attack on a fresh devnet; raises if the harness broke."""
    peers, attack = PLAN[name]
    root = Path(tempfile.mkdtemp(prefix=f"mtor-attack-{name}-"))
    devnet = AttackDevnet(peers, root)
    started = time.monotonic()
    try:
        progress(f"{name}: starting a devnet of {peers}")
        converged = devnet.start()
        progress(f"{name}: devnet converged in {converged:.1f} s")
        result = trio.run(attack, devnet, settings)
        result["devnet_peers"] = peers
        result["devnet_converged_s"] = round(converged, 1)
        result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        result["seconds"] = round(time.monotonic() - started, 1)
        return result
    finally:
        devnet.stop()
        shutil.rmtree(root, ignore_errors=True)


def code_version() -> str:
    """The commit the peers run (and whether ``mtor_p2p`` has uncommitted changes)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "mtor_p2p"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not commit:
        return "not a git checkout"
    return commit + (" + uncommitted changes in mtor_p2p" if dirty else "")


def main(argv: list[str]) -> int:
    """``python -m benchmarks attacks [--only NAME[,NAME]] [--quick] [--label TEXT]
    [--out PATH]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="./mtor bench attacks",
        description="Run the attacks of issue 8 against fresh loopback devnets of real "
        "mtor-peer processes and report each figure beside a baseline measured in the same "
        f"run. Attacks: {', '.join(ATTACKS)}. Exit 1 if the harness itself broke (a missed "
        "goal is a figure, not an error), 2 for bad arguments.",
    )
    parser.add_argument("--only", help="comma-separated attacks to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="short runs (under a minute each)")
    parser.add_argument("--label", help="a note stored with each attack's figures")
    parser.add_argument(
        "--out", type=user_path, help="results file (default: benchmarks/results/attacks.json)"
    )
    args = parser.parse_args(argv)
    quick, label = args.quick, args.label
    names = list(ATTACKS)
    if args.only:
        names = args.only.split(",")
        unknown = [n for n in names if n not in PLAN]
        if unknown:
            print(f"unknown attack(s) {unknown}; known: {', '.join(ATTACKS)}", file=sys.stderr)
            return 2
    settings = Settings(quick)
    RESULTS.mkdir(exist_ok=True)
    path = args.out or RESULTS / "attacks.json"
    report: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    report["machine"] = machine()
    broken = []
    for name in names:
        try:
            figures = run_attack(name, settings)
        except Exception as exc:  # the harness broke: say so, keep going with the next attack
            traceback.print_exc()
            figures = {"harness_error": f"{type(exc).__name__}: {exc}"}
            broken.append(name)
        figures["when"] = time.strftime("%Y-%m-%d %H:%M:%S")
        figures["quick"] = quick
        figures["code"] = code_version()
        if label:
            figures["label"] = label
        report[name] = figures
        path.write_text(json.dumps(report, indent=2))
        progress(f"{name}: done; figures in {path}")
    print(json.dumps({n: report[n] for n in names}, indent=2))
    if broken:
        progress(f"harness broke in: {', '.join(broken)}")
        return 1
    return 0
