"""The simulation engine: real MTOR nodes on memnet, on virtual time, with a modelled world.

Each simulated peer is an unmodified :class:`~mtor_p2p.node.Node` (capacity, worker,
scheduler, ledger services) wired to the in-memory network (:mod:`mtor_p2p.memnet`), in-memory
SQLite stores, a seeded :class:`~mtor_p2p.runtime.Runtime` and a :class:`SimulatedDevice`. The
engine only drives the world around them: who is online (churn), who misbehaves (adversaries),
who asks for work (Poisson workloads), and what it observes (requests, shard attempts,
samples). Every figure in the run record comes from those observations.

The cloud baseline runs the same nodes as data-centre GPUs in a few regions (trusted, so no
verification) serving requester-only clients spread over every region.
"""

from __future__ import annotations

import contextvars
import logging
import math
import random
import statistics
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio

from mtor_kernels import verify as checks
from mtor_p2p.capacity.record import Device
from mtor_p2p.capacity.service import CapacityTiming
from mtor_p2p.clock import NetClock
from mtor_p2p.compute.protocol import PROTOCOL_DOWNLOAD, PROTOCOL_RUN, PROTOCOL_UPLOAD
from mtor_p2p.compute.receipt_store import ReceiptStore
from mtor_p2p.compute.scheduler import JobFailed, ShardAttempt
from mtor_p2p.config import NodeConfig
from mtor_p2p.identity import Identity
from mtor_p2p.ledger.genesis import NANO, Genesis, LedgerParams
from mtor_p2p.ledger.pricing import PriceRule
from mtor_p2p.ledger.store import Ledger
from mtor_p2p.memnet import LatencyModel, LinkProfile, MemWorld
from mtor_p2p.node import Node, NodeTiming
from mtor_p2p.records.arrays import meta_of
from mtor_p2p.runtime import Runtime
from mtor_p2p.sim.device import SimulatedDevice
from mtor_p2p.sim.scenario import GpuModel, Scenario, Workload

log = logging.getLogger(__name__)

#: Protocols whose messages carry operands or results (their bytes scale with the matrices).
BULK_PROTOCOLS = (PROTOCOL_UPLOAD, PROTOCOL_DOWNLOAD, PROTOCOL_RUN)

#: Network time at the start of every run (2027-01-15T00:00:00Z): fixed, so runs repeat.
EPOCH_OFFSET = 1_800_000_000.0
#: Bootstrap peers: the first peers of the first regions, never churned.
BOOTSTRAP_PEERS = 4
#: The request a task works for: the scheduler's observer runs inside the job's tasks, which
#: inherit it, so every shard attempt is tied to its request.
_current_request: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "mtor_sim_request", default=None
)


@dataclass
class SimPeer:
    """One simulated machine and what the engine knows about it."""

    index: int
    identity: Identity
    region: str
    gpu: GpuModel
    role: str  # honest, cheat, stall, lie, requester (cloud clients)
    link: LinkProfile
    device: SimulatedDevice
    usd_per_hour: float
    g_co2_per_kwh: float
    pue: float
    price: float  # starting price, credits per real TFLOP
    runtime: Runtime
    ledger: Ledger
    ledger_light: bool
    receipts: ReceiptStore
    serve: bool = True
    stable: bool = False  # never churned (bootstrap peers, cloud machines)
    node: Node | None = None
    scope: trio.CancelScope | None = None
    online_since: float | None = None
    sessions: list[tuple[float, float]] = field(default_factory=list)
    crashes: list[float] = field(default_factory=list)

    @property
    def peer_id(self) -> str:
        """The peer's ID."""
        return self.identity.peer_id


class Simulation:
    """One run of one scenario. ``await run()`` returns the run record (a JSON-ready dict)."""

    def __init__(
        self, scenario: Scenario, *, progress: Callable[[float, dict[str, Any]], None] | None = None
    ) -> None:
        self.s = scenario
        self.progress = progress
        self.rng = random.Random(f"mtor-sim:{scenario.seed}")
        # Requesters' host work (Freivalds' check, O(n^2)) is charged at the scenario's host
        # rate for the declared sizes: dim_scale^2 times the real operands' work.
        self.runtime = Runtime.simulated(
            f"runtime:{scenario.seed}",
            host_flops=scenario.host_gflops * 1e9,
            flops_scale=float(scenario.dim_scale**2),
        )
        self.world = MemWorld(
            seed=self.rng.getrandbits(32),
            latency=LatencyModel.from_csv(scenario.data.rtt_csv),
            jitter=scenario.jitter,
            loss=scenario.loss,
            request_overhead=scenario.request_overhead_ms / 1000,
            # Operands and results are dim_scale^2 times larger on the wire than the small
            # real arrays that stand for them.
            byte_scale={p: float(scenario.dim_scale**2) for p in BULK_PROTOCOLS},
        )
        self.peers: list[SimPeer] = []
        self.by_id: dict[str, SimPeer] = {}
        self.requests: list[dict[str, Any]] = []
        self.attempts: list[dict[str, Any]] = []
        self.recoveries: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []
        self._failed_at: dict[tuple[str, int], tuple[float, str]] = {}
        self._request_ids = 0
        self.wrong_accepted = 0
        self._operand_rng = np.random.default_rng(self.rng.getrandbits(64))
        self.end = scenario.duration

    # -- building the world ----------------------------------------------------------------

    def _pick(self, shares: dict[str, float]) -> str:
        names = list(shares)
        return self.rng.choices(names, weights=[shares[n] for n in names])[0]

    def _link(self, region: str, datacenter: bool) -> LinkProfile:
        s = self.s
        if datacenter:
            return LinkProfile(
                region=region, access_delay=0.0005, uplink_bps=1.25e9, downlink_bps=1.25e9
            )
        access = self.rng.uniform(*s.access_ms) / 1000
        up = self.rng.uniform(*s.uplink_mbps) * 1e6 / 8
        down = self.rng.uniform(*s.downlink_mbps) * 1e6 / 8
        return LinkProfile(region=region, access_delay=access, uplink_bps=up, downlink_bps=down)

    def _credits_price(self, usd_per_hour: float, gpu: GpuModel) -> float:
        """Starting price in credits per *real* TFLOP: one credit is one US dollar, and a
        real FLOP stands for ``flop_scale`` declared ones."""
        if self.s.credits_per_tflop is not None:
            return self.s.credits_per_tflop * self.s.flop_scale
        declared = usd_per_hour / (gpu.effective_tflops() * 3600.0)
        return declared * self.s.flop_scale

    def _plan_peers(self) -> list[tuple[str, GpuModel, str, bool, float, float, bool]]:
        """(region, gpu, role, serve, usd/h, pue, stable) for every peer of the run."""
        s = self.s
        plans = []
        if s.kind == "cloud":
            gpu = s.data.gpu(s.cloud.gpu)
            usd = s.data.price(s.cloud.offering)
            for region in s.cloud.regions:
                for _ in range(s.cloud.gpus_per_region):
                    plans.append((region, gpu, "honest", True, usd, s.cloud.pue, True))
            client_gpu = s.data.gpu(s.consumer_price_gpu)
            for region in sorted(s.requester_shares):
                if s.requester_shares[region] <= 0:
                    continue
                for _ in range(s.cloud.clients_per_region):
                    plans.append((region, client_gpu, "requester", False, 0.0, 1.0, True))
            return plans
        reference = s.data.gpu(s.consumer_price_gpu)
        reference_usd = s.data.price(s.consumer_price_offering)
        regions = sorted(s.region_shares, key=lambda r: -s.region_shares[r])
        roles = self._roles(s.peers)
        for index in range(s.peers):
            # Bootstrap peers first, one per most populous region; then by the region shares.
            region = (
                regions[index % len(regions)]
                if index < BOOTSTRAP_PEERS
                else self._pick(s.region_shares)
            )
            gpu = s.data.gpu(self._pick(s.fleet))
            # Marketplace prices scale with speed (one quote, for the reference card).
            usd = reference_usd * gpu.effective_tflops() / reference.effective_tflops()
            plans.append((region, gpu, roles[index], True, usd, 1.0, index < BOOTSTRAP_PEERS))
        return plans

    def _roles(self, count: int) -> list[str]:
        adv = self.s.adversaries
        roles = ["honest"] * count
        candidates = list(range(BOOTSTRAP_PEERS, count))
        self.rng.shuffle(candidates)
        for role, share in (("cheat", adv.cheat), ("stall", adv.stall), ("lie", adv.lie)):
            take = round(share * count)
            for index in candidates[:take]:
                roles[index] = role
            candidates = candidates[take:]
        return roles

    def _genesis(self, identities: list[Identity]) -> Genesis:
        s = self.s
        prices = [p for p in self._planned_prices if p > 0]
        rule = PriceRule(floor=min(prices) / 20, ceiling=max(prices) * 20)
        params = LedgerParams(
            epoch_seconds=float(s.timing.get("epoch_seconds", 600.0)),
            checkpoint_delay=60.0,
            price=rule,
            price_interval=float(s.timing.get("price_interval", 60.0)),
        )
        allocations = {i.peer_id: int(s.credits * NANO) for i in identities}
        return Genesis(f"mtor-sim-{s.name}-{s.seed}", allocations, params)

    def build(self) -> None:
        """Create every peer (identities, devices, stores); nothing runs yet."""
        s = self.s
        plans = self._plan_peers()
        identities = [Identity(self.runtime.token_bytes(32)) for _ in plans]
        self._planned_prices = [
            self._credits_price(usd, gpu) if serve else 0.0
            for (_, gpu, _, serve, usd, _, _) in plans
        ]
        genesis = self._genesis(identities)
        replicas = self._replica_indices(plans)
        shared: dict[str, Ledger] = {}
        for index, ((region, gpu, role, serve, usd, pue, stable), identity) in enumerate(
            zip(plans, identities, strict=True)
        ):
            runtime = self.runtime.child(f"peer-{index}")
            if replicas is None or index in replicas:
                ledger = Ledger(":memory:", genesis, instance=runtime.token_hex(8))
                if replicas is not None:
                    shared.setdefault(region, ledger)
                light = False
            else:
                light = True
                ledger = shared.get(region) or next(iter(shared.values()))
            device = SimulatedDevice(
                gpu, flop_scale=s.flop_scale, behaviour=role if role != "requester" else "honest"
            )
            peer = SimPeer(
                index=index,
                identity=identity,
                region=region,
                gpu=gpu,
                role=role,
                link=self._link(region, datacenter=(s.kind == "cloud" and serve)),
                device=device,
                usd_per_hour=usd,
                g_co2_per_kwh=s.data.carbon_of(region),
                pue=pue,
                price=self._planned_prices[index],
                runtime=runtime,
                ledger=ledger,
                ledger_light=light,
                receipts=ReceiptStore(Path(":memory:")),
                serve=serve,
                stable=stable,
            )
            self.peers.append(peer)
            self.by_id[peer.peer_id] = peer
        self._bootstrap = [p for p in self.peers if p.stable][:BOOTSTRAP_PEERS]

    def _replica_indices(self, plans: list[Any]) -> set[int] | None:
        """Peers that keep a full ledger replica (None: all). Replicas are spread over the
        regions and preferably stable; the others read their region's replica (a modelling
        shortcut for light clients, stated in the report)."""
        wanted = self.s.ledger_replicas
        if wanted is None or wanted >= len(plans):
            return None
        by_region: dict[str, list[int]] = {}
        for index, plan in enumerate(plans):
            by_region.setdefault(plan[0], []).append(index)
        for indices in by_region.values():
            indices.sort(key=lambda i: (not plans[i][6], i))
        chosen: set[int] = set()
        while len(chosen) < wanted:
            progressed = False
            for region in sorted(by_region):
                if by_region[region] and len(chosen) < wanted:
                    chosen.add(by_region[region].pop(0))
                    progressed = True
            if not progressed:
                break
        return chosen

    # -- one peer's life -------------------------------------------------------------------

    def _timing(self) -> NodeTiming:
        t = self.s.timing
        ttl = t.get("record_ttl", 300.0)
        return NodeTiming(
            mesh_interval=t.get("mesh_interval", 10.0),
            bootstrap_retry=t.get("bootstrap_retry", 10.0),
            ledger_sync_interval=t.get("ledger_sync_interval", 30.0),
            checkpoint_tick=t.get("checkpoint_tick", 20.0),
            # Off unless a scenario asks: challenges add traffic every peer would pay for.
            challenge_interval=t.get("challenge_interval"),
            capacity=CapacityTiming(
                ttl=ttl,
                announce_interval=t.get("announce_interval", ttl / 2.5),
                change_check_interval=t.get("change_check_interval", 5.0),
                sweep_interval=t.get("sweep_interval", 10.0),
                prune_interval=t.get("prune_interval", 10.0),
                scope=str(self.s.raw.get("timing", {}).get("capacity_scope", "region")),
                max_receive_rate=t.get("capacity_receive_rate", 1.0),
            ),
        )

    def _node(self, peer: SimPeer) -> Node:
        network = (
            self.world.restart(peer.peer_id)
            if peer.peer_id in self.world.peers
            else self.world.add_peer(peer.identity, peer.link)
        )
        config = NodeConfig(
            data_dir=Path("/nonexistent/mtor-sim"),
            region=peer.region,
            price=peer.price,
            dynamic_price=self.s.dynamic_price and peer.serve and self.s.kind == "mtor",
            bootstrap=[b.node_addr for b in self._bootstrap_info if b.peer_id != peer.peer_id],
            use_default_bootstrap=False,
            fault_rate=self.s.adversaries.cheat_rate if peer.role == "cheat" else 0.0,
        )
        advertised = peer.gpu.effective_tflops()
        if peer.role == "lie":
            advertised *= self.s.adversaries.lie_factor
        device = Device(
            kind="gpu",
            name=peer.gpu.model,
            mem_total=int(peer.gpu.mem_gib * (1 << 30)),
            mem_free=int(peer.gpu.mem_gib * 0.9 * (1 << 30)),
            utilization=0.0,
        )
        node = Node(
            config,
            peer.identity,
            network,
            NetClock(epoch_offset=EPOCH_OFFSET),
            peer.ledger,
            receipts=peer.receipts,
            runtime=peer.runtime,
            devices=(device,),
            tflops=round(advertised * 1e12 / self.s.flop_scale / 1e12, 9),
            executor=peer.device,
            timing=self._timing(),
            serve=peer.serve,
            ledger_light=peer.ledger_light,
        )
        node.price = peer.price
        node.scheduler.observer = self._observe
        node.scheduler.byte_scale = float(self.s.dim_scale**2)
        # Every worker holds the preloaded weights: requesters run on them without carrying
        # them (they never uploaded them, so would otherwise send them unasked).
        node.scheduler.resident_everywhere = self._preloaded
        if peer.serve:
            self._preload(node)
        return node

    @property
    def _bootstrap_info(self) -> list[Any]:
        return self._bootstrap_addrs

    async def _life(self, peer: SimPeer, task_status: trio.TaskStatus[None]) -> None:
        """Run the peer: online sessions and offline gaps under churn, or always online."""
        churn = self.s.churn
        first = True
        while trio.current_time() < self.end:
            node = self._node(peer)
            peer.node = node
            peer.online_since = trio.current_time()
            crash = False
            with trio.CancelScope() as scope:
                peer.scope = scope
                async with node.running():
                    if first:
                        task_status.started()
                        first = False
                    if not churn.enabled or peer.stable:
                        await trio.sleep_forever()
                    await trio.sleep(self._weibull(churn.session_shape, churn.session_scale_s))
                    crash = self.rng.random() < churn.crash_share
                    if crash:
                        # No goodbye: the record stays until it expires, work in flight is lost.
                        node.withdraw_on_exit = False
                        peer.crashes.append(trio.current_time())
                        self.world.crash(peer.peer_id)
            self._went_offline(peer)
            if not crash:
                self.world.crash(peer.peer_id)  # the process exits after its goodbye
            await trio.sleep(self._weibull(churn.offline_shape, churn.offline_scale_s))

    def _went_offline(self, peer: SimPeer) -> None:
        if peer.online_since is not None:
            peer.sessions.append((peer.online_since, trio.current_time()))
            peer.online_since = None
        peer.node = None

    def _online_seconds(self, peer: SimPeer) -> float:
        """Seconds ``peer`` was online within the measured window (warm-up and cool-down
        excluded, as they are from every other figure)."""
        start, end = self._started, self.end
        return sum(max(0.0, min(off, end) - max(on, start)) for on, off in peer.sessions)

    def _weibull(self, shape: float, scale: float) -> float:
        return max(1.0, self.rng.weibullvariate(scale, shape))

    # -- observations ----------------------------------------------------------------------

    def _observe(self, attempt: ShardAttempt) -> None:
        worker = self.by_id.get(attempt.worker)
        device_s = 0.0
        if worker is not None:
            device_s = min(
                attempt.ended - attempt.started, worker.device.seconds_for(float(attempt.flops))
            )
        request_id = _current_request.get() or attempt.job_id[:16]
        self.attempts.append(
            {
                "job": request_id,
                "index": attempt.index,
                "worker": attempt.worker,
                "outcome": attempt.outcome,
                "started": round(attempt.started, 6),
                "ended": round(attempt.ended, 6),
                "device_s": round(device_s if attempt.outcome != "cancelled" else 0.0, 6),
                "flops": attempt.flops * self.s.flop_scale,
                "hedge": attempt.hedge,
            }
        )
        key = (attempt.job_id, attempt.index)
        if attempt.outcome in ("failed", "timeout", "rejected", "misbehaved"):
            cause, failed_at = attempt.outcome, attempt.ended
            if worker is not None:
                crashed = [t for t in worker.crashes if attempt.started <= t <= attempt.ended]
                if crashed:
                    cause, failed_at = "crash", crashed[-1]
                elif worker.role == "stall":
                    cause, failed_at = "stall", attempt.started
            self._failed_at.setdefault(key, (failed_at, cause))
        elif attempt.outcome == "accepted" and key in self._failed_at:
            failed_at, cause = self._failed_at.pop(key)
            self.recoveries.append(
                {
                    "job": request_id,
                    "shard": attempt.index,
                    "failed_at": round(failed_at, 6),
                    "accepted_at": round(attempt.ended, 6),
                    "cause": cause,
                }
            )

    # -- workload --------------------------------------------------------------------------

    def _requester(self) -> SimPeer | None:
        region = self._pick(self.s.requester_shares)
        online = [p for p in self._requesters_by_region.get(region, []) if p.node is not None]
        if not online:
            online = [p for p in self._requesters if p.node is not None]
        return self.rng.choice(online) if online else None

    async def _arrivals(self, workload: Workload, nursery: trio.Nursery) -> None:
        if workload.rate <= 0:
            return
        # Each workload's arrival times come from a stream of their own: the same seed gives
        # the same requests whatever the peers' code does with the shared stream meanwhile,
        # so runs of two versions of the peer compare like for like.
        arrivals = random.Random(f"mtor-sim:{self.s.seed}:arrivals:{workload.name}")
        while True:
            await trio.sleep(arrivals.expovariate(workload.rate))
            if trio.current_time() >= self.end:
                return
            requester = self._requester()
            if requester is not None:
                nursery.start_soon(self._request, requester, workload)

    def _random(self, rows: int, cols: int, dtype: str) -> np.ndarray:
        array = self._operand_rng.standard_normal((rows, cols), dtype=np.float32)
        return array.astype(np.float16) if dtype == "float16" else array

    def _operands(self, workload: Workload) -> dict[str, np.ndarray]:
        d = self.s.dim_scale
        m, k, n = workload.m // d, workload.k // d, workload.n // d
        models = self._models.get(workload.name)
        b = self.rng.choice(models) if models else self._random(k, n, workload.dtype)
        return {"a": self._random(m, k, workload.dtype), "b": b}

    def _make_models(self) -> None:
        d = self.s.dim_scale
        self._models: dict[str, list[np.ndarray]] = {
            w.name: [self._random(w.k // d, w.n // d, w.dtype) for _ in range(w.models)]
            for w in self.s.workloads
        }
        self._preloaded = frozenset(
            meta_of(b).digest
            for w in self.s.workloads
            if w.preload
            for b in self._models.get(w.name, [])
        )

    def _preload(self, node: Node) -> None:
        for workload in self.s.workloads:
            if workload.preload:
                for b in self._models.get(workload.name, []):
                    node.operands.put(b, meta_of(b).digest)

    async def _request(self, peer: SimPeer, workload: Workload) -> None:
        node = peer.node
        if node is None:
            return
        self._request_ids += 1
        record: dict[str, Any] = {
            "id": f"r{self._request_ids}",
            "class": workload.name,
            "region": peer.region,
            "requester": peer.peer_id,
            "submitted": round(trio.current_time(), 6),
            "finished": None,
            "ok": False,
            "latency_s": None,
            "flops": workload.declared_flops(),
            "cost_credits": 0.0,
            "shards": 0,
            "reissued": 0,
            "rejected": 0,
            "hedged": 0,
            "error": None,
            "worker_regions": [],
        }
        self.requests.append(record)
        _current_request.set(record["id"])
        target = workload.latency_target_ms
        operands = self._operands(workload)
        try:
            with trio.fail_after(workload.deadline_s + 5):
                result = await node.submit(
                    "matmul",
                    operands,
                    verify=workload.verify,
                    shards=workload.shards,
                    max_workers=workload.max_workers,
                    latency_target=None if target is None else target / 1000,
                    deadline=workload.deadline_s,
                    freivalds_rounds=workload.freivalds_rounds,
                )
        except (JobFailed, ValueError, trio.TooSlowError) as exc:
            record["error"] = str(exc) or type(exc).__name__
            record["finished"] = round(trio.current_time(), 6)
            return
        now = trio.current_time()
        # Ground truth, which no peer has: was the accepted answer right?
        reference = operands["a"].astype(np.float64) @ operands["b"].astype(np.float64)
        right, _ = checks.compare(reference, result.output, dtype=operands["a"].dtype)
        if not right:
            self.wrong_accepted += 1
        record.update(
            finished=round(now, 6),
            ok=True,
            wrong=not right,
            latency_s=round(now - record["submitted"], 6),
            cost_credits=round(result.cost, 9),
            shards=len(result.shards),
            reissued=result.reissued,
            rejected=result.rejected,
            hedged=result.hedged,
            worker_regions=sorted(
                {self.by_id[w].region for w in result.workers if w in self.by_id}
            ),
        )

    # -- sampling and progress -------------------------------------------------------------

    async def _sampler(self) -> None:
        interval = self.s.sample_interval
        busy_before = {p.peer_id: p.device.busy_seconds for p in self.peers}
        last = trio.current_time()
        while True:
            # The last sample falls exactly at the end of the window.
            await trio.sleep_until(min(last + interval, self.end))
            now = trio.current_time()
            elapsed, last = max(now - last, 1e-9), now
            online = [p for p in self.peers if p.node is not None and p.serve]
            busy = sum(p.device.busy_seconds - busy_before[p.peer_id] for p in online)
            busy_before = {p.peer_id: p.device.busy_seconds for p in self.peers}
            prices = sorted(p.node.price for p in online if p.node is not None)
            views = [len(p.node.capacity.view) for p in online[:64] if p.node is not None]
            sample = {
                "t": round(now, 3),
                "online": len(online),
                "busy_fraction": round(busy / max(1e-9, len(online) * elapsed), 6),
                "price_mean": statistics.fmean(prices) if prices else None,
                "price_p10": prices[len(prices) // 10] if prices else None,
                "price_p90": prices[(9 * len(prices)) // 10] if prices else None,
                "view_mean": statistics.fmean(views) if views else None,
                "requests": len(self.requests),
                "gossip_delivered": self.world.stats.gossip_delivered,
            }
            self.samples.append(sample)
            if self.progress is not None:
                self.progress(now - self._started, sample)
            if now >= self.end:
                return

    # -- the run ---------------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Simulation]:
        """Build the world, start every peer and let the overlay form (the scenario's
        ``timing.warmup``); inside the context, drive it yourself (``peers[i].node.submit``),
        on virtual time. Used by :meth:`run`, by the calibration test and by embedders."""
        self.build()
        self._make_models()
        self._bootstrap_addrs = []
        self._requesters = [
            p
            for p in self.peers
            if p.role in ("honest", "requester")
            and (self.s.kind == "mtor" or p.role == "requester")
        ]
        self._requesters_by_region: dict[str, list[SimPeer]] = {}
        for peer in self._requesters:
            self._requesters_by_region.setdefault(peer.region, []).append(peer)
        async with trio.open_nursery() as nursery:
            # Bootstrap peers first, so that everyone else has somewhere to join.
            for peer in self._bootstrap:
                await nursery.start(self._life, peer)
            self._bootstrap_addrs = [
                _Bootstrap(p.peer_id, p.node.addrs()[0]) for p in self._bootstrap if p.node
            ]
            for peer in self.peers:
                if peer not in self._bootstrap:
                    nursery.start_soon(self._start_later, peer)
            # Let the overlay form before the first request (a minute, as a real network
            # would have had long before).
            await trio.sleep(float(self.s.timing.get("warmup", 60.0)))
            self.end = trio.current_time() + self.s.duration
            self._started = trio.current_time()
            try:
                yield self
            finally:
                nursery.cancel_scope.cancel()
        for peer in self.peers:
            self._went_offline(peer)

    async def run(self) -> dict[str, Any]:
        """Build the world, run the scenario's workloads for its duration, return the run
        record."""
        async with self.running(), trio.open_nursery() as requests:
            async with trio.open_nursery() as arrivals:
                for workload in self.s.workloads:
                    arrivals.start_soon(self._arrivals, workload, requests)
                await self._sampler()
                arrivals.cancel_scope.cancel()
            # Device time within the window; what finishes in the cool-down is not counted.
            self._busy_at_end = {p.peer_id: p.device.busy_seconds for p in self.peers}
            # No new requests: let those in flight finish and the ledger replicas catch up
            # (gossip and sync) before anything is read.
            await trio.sleep(float(self.s.timing.get("cooldown", 60.0)))
            requests.cancel_scope.cancel()
            # Replicas that are offline at the end have missed entries they will sync later:
            # agreement is judged among those online.
            self._online_at_end = {p.peer_id for p in self.peers if p.node is not None}
        return self._record()

    def record(self) -> dict[str, Any]:
        """The run record of what has been observed so far (after :meth:`running` ends)."""
        return self._record()

    async def _start_later(self, peer: SimPeer) -> None:
        # Spread joins over the warm-up so that the bootstrap peers are not hit at once.
        await trio.sleep(self.rng.uniform(0.0, float(self.s.timing.get("warmup", 60.0)) / 2))
        await trio.lowlevel.checkpoint()
        async with trio.open_nursery() as nursery:
            await nursery.start(self._life, peer)

    # -- the record ------------------------------------------------------------------------

    def _record(self) -> dict[str, Any]:
        s = self.s
        start = self._started

        def rel(t: float | None) -> float | None:
            return None if t is None else round(t - start, 6)

        # Requests still running at the end are censored, not failed: they are reported
        # apart and left out of latency and success figures.
        unfinished = [r for r in self.requests if r["finished"] is None]
        self.requests = [r for r in self.requests if r["finished"] is not None]
        for r in self.requests:
            r["submitted"], r["finished"] = rel(r["submitted"]), rel(r["finished"])
        for a in self.attempts:
            a["started"], a["ended"] = rel(a["started"]), rel(a["ended"])
        for r in self.recoveries:
            r["failed_at"], r["accepted_at"] = rel(r["failed_at"]), rel(r["accepted_at"])
        for sample in self.samples:
            sample["t"] = rel(sample["t"])
        return {
            "kind": s.kind,
            "scenario": s.name,
            "seed": s.seed,
            "peers": len(self.peers),
            "hours": s.hours,
            "flop_scale": s.flop_scale,
            "regions": sorted(s.data.regions),
            "peers_info": [self._peer_info(p) for p in self.peers],
            "requests": self.requests,
            "unfinished_requests": len(unfinished),
            "shards": self.attempts,
            "recoveries": self.recoveries,
            "samples": self.samples,
            # Host work the requesters were charged (verification, and recomputation when
            # redundant answers disagree), whatever became of the job.
            "verification": {
                "seconds": round(self.runtime.host_work.get("seconds", 0.0), 6),
                "checks": int(self.runtime.host_work.get("calls", 0)),
            },
            "ledger": self._ledger_summary(),
            "adversaries": self._adversary_summary(),
            "network": dict(self.world.stats.__dict__),
            "config": s.to_json(),
        }

    def _peer_info(self, peer: SimPeer) -> dict[str, Any]:
        online = self._online_seconds(peer)
        return {
            "peer": peer.peer_id,
            "region": peer.region,
            "gpu": peer.gpu.model,
            "tflops": peer.gpu.effective_tflops(),
            "power_w": peer.gpu.power_w,
            "idle_w": peer.gpu.idle_w,
            "usd_per_hour": peer.usd_per_hour,
            "g_co2_per_kwh": peer.g_co2_per_kwh,
            "role": peer.role,
            "online_s": round(online, 3),
            "busy_s": round(
                getattr(self, "_busy_at_end", {}).get(peer.peer_id, peer.device.busy_seconds), 6
            ),
            "pue": peer.pue,
            "crashes": len(peer.crashes),
        }

    def _ledger_summary(self) -> dict[str, Any]:
        online = getattr(self, "_online_at_end", None)
        ledgers = {
            id(p.ledger): p.ledger
            for p in self.peers
            if not p.ledger_light and (online is None or p.peer_id in online)
        }
        states = [ledger.state() for ledger in ledgers.values()]
        first = states[0]
        supply = self.peers[0].ledger.genesis.supply
        balances = [dict(st.balances) for st in states]
        paid = sum(r["cost_credits"] for r in self.requests if r["ok"])
        return {
            "supply": supply,
            "total": first.total(),
            "burned": first.burned,
            "conserved": all(st.total() + st.burned == supply for st in states)
            if hasattr(first, "burned")
            else None,
            "replicas": len(states),
            "agree": all(b == balances[0] for b in balances),
            "receipts": first.receipts,
            "credits_paid": round(paid, 9),
        }

    def _adversary_summary(self) -> dict[str, Any]:
        cheaters = {p.peer_id for p in self.peers if p.role == "cheat"}
        caught = {a["worker"] for a in self.attempts if a["outcome"] == "rejected"}
        rejected = sum(1 for a in self.attempts if a["outcome"] == "rejected")
        return {
            "cheaters": len(cheaters),
            "cheaters_caught": len(cheaters & caught),
            # Every accepted job output compared with A @ B computed here (ground truth).
            "wrong_accepted": self.wrong_accepted,
            "fault_proofs": rejected,
            "stallers": sum(1 for p in self.peers if p.role == "stall"),
            "liars": sum(1 for p in self.peers if p.role == "lie"),
            "slashed": len(self._slashed()),
        }

    def _slashed(self) -> set[str]:
        ledgers = [p.ledger for p in self.peers if not p.ledger_light]
        if not ledgers:
            return set()
        state = ledgers[0].state()
        return {peer for peer, amount in getattr(state, "slashed", {}).items() if amount > 0}


@dataclass(frozen=True)
class _Bootstrap:
    peer_id: str
    node_addr: str


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
