"""The peer: identity, hardened host, capacity service and control API, run together.

Embedders start one with::

    async with Node.open(NodeConfig(data_dir=Path("/tmp/n1"))) as node:
        print(node.peer_id, node.addrs())
        await node.stopped.wait()
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
from collections.abc import AsyncIterator, Awaitable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from mtor_kernels.backend import NumpyBackend
from mtor_p2p import __version__
from mtor_p2p.capacity.bench import measure_tflops
from mtor_p2p.capacity.probe import probe_devices
from mtor_p2p.capacity.record import CapacityRecord, Device
from mtor_p2p.capacity.service import CapacityService, CapacityTiming, Offer
from mtor_p2p.capacity.view import GIB, CapacityQuery
from mtor_p2p.clock import NetClock
from mtor_p2p.compute.blas import limit_blas_threads
from mtor_p2p.compute.challenge import Challenger
from mtor_p2p.compute.executor import ShardExecutor
from mtor_p2p.compute.jobs import JOB_IDS_FILE_NAME, JobBoard, JobIds, observe_attempt
from mtor_p2p.compute.receipt_store import RECEIPTS_FILE_NAME, ReceiptStore
from mtor_p2p.compute.reputation import PeerBook
from mtor_p2p.compute.scheduler import JobResult, JobSpec, Scheduler
from mtor_p2p.compute.worker import NETWORK_ID_CHARS, WorkerService
from mtor_p2p.config import NodeConfig, private_dir
from mtor_p2p.control import (
    INFO_FILE_NAME,
    ControlServer,
    load_or_create_token,
    write_control_info,
)
from mtor_p2p.dashboard import Dashboard
from mtor_p2p.datadir import DataDirLock
from mtor_p2p.identity import Identity, load_or_create_identity
from mtor_p2p.insight import earnings, peers_in_view, peers_view, why_no_work
from mtor_p2p.ledger.genesis import GENESIS_FILE_NAME, Genesis, load_genesis, nano_to_credits
from mtor_p2p.ledger.names import LEDGER_RULES, OtherNetworkLedger
from mtor_p2p.ledger.pricing import next_price
from mtor_p2p.ledger.service import LedgerService
from mtor_p2p.ledger.store import LEDGER_FILE_NAME, Ledger, LedgerError
from mtor_p2p.mesh import Candidate, MeshKeeper, MeshSettings
from mtor_p2p.metrics import NetworkMeter, NodeMetrics
from mtor_p2p.network import Network, NetworkError
from mtor_p2p.records.arrays import OperandStore
from mtor_p2p.runtime import Runtime, leaf_exceptions
from mtor_p2p.wire import RecordError

log = logging.getLogger(__name__)

#: Where a worker spools multi-chunk uploads in progress (unnamed files, gone when closed).
UPLOAD_SPOOL_DIR_NAME = "uploads"
#: The peer book's file in the data directory (see :mod:`mtor_p2p.compute.reputation`).
PEER_BOOK_FILE_NAME = "peers.sqlite"
#: On a clean exit, how long the node waits for receipts still settling (stored, entered into
#: the ledger) before it stops.
SETTLE_ON_EXIT_SECONDS = 5.0
#: How often a node with an ngrok tunnel checks whether it still needs it, and how long it
#: must be unneeded before it is closed (hysteresis: reachability answers can flap).
TUNNEL_CHECK_SECONDS = 10.0
TUNNEL_IDLE_SECONDS = 60.0
#: Keep dialing peers from the capacity view until this many connections are open, so the
#: overlay does not hang off the bootstrap peers alone.
TARGET_CONNECTIONS = 8


@dataclass(frozen=True)
class NodeTiming:
    """How often the node's own loops run (seconds). Production uses the defaults; a large
    simulation slows the housekeeping down, since every wake-up of every peer costs CPU."""

    mesh_interval: float = 2.0
    bootstrap_retry: float = 5.0
    probe_interval: float = 15.0
    #: Ledger pull from a random peer; None: half an epoch, at most 10 s.
    ledger_sync_interval: float | None = None
    checkpoint_tick: float = 2.0
    capacity: CapacityTiming | None = None  # None: from the config's TTL and announce interval
    #: Challenge a few unmeasured workers this often while we submit jobs; None: never.
    challenge_interval: float | None = 30.0
    #: Write the peer book's changes to its file this often.
    book_flush_interval: float = 10.0


def record_to_json(record: CapacityRecord, now: float) -> dict[str, Any]:
    """A capacity record as the control API shows it."""
    body = record.to_body()
    body["expires_in"] = round(record.expires - now, 1)
    return body


class Node:
    """A running MTOR peer: a composition root that owns no protocol logic.

    It wires the services (capacity, worker, scheduler, ledger) to the parts it is given: a
    :class:`~mtor_p2p.network.Network` (py-libp2p, or the simulator's memnet), a clock, the
    ledger and receipt stores (SQLite files, or in memory), the devices it advertises, the
    executor its kernels run on and the :class:`~mtor_p2p.runtime.Runtime` for blocking work
    and randomness. :meth:`open` assembles a production node from a configuration;
    :meth:`running` runs any node's loops.
    """

    def __init__(
        self,
        config: NodeConfig,
        identity: Identity,
        network: Network,
        clock: NetClock,
        ledger: Ledger,
        *,
        receipts: ReceiptStore | None = None,
        runtime: Runtime | None = None,
        devices: tuple[Device, ...] = (),
        tflops: float = 0.0,
        executor: ShardExecutor | None = None,
        timing: NodeTiming | None = None,
        serve: bool = True,
        ledger_light: bool = False,
        peers: PeerBook | None = None,
        upload_spool: Path | None = None,
    ) -> None:
        self.config = config
        self.timing = timing or NodeTiming()
        #: False: a requester only (no worker protocols, no kernels in its record).
        self.serve = serve
        #: True: keep no replica of our own; the ledger given is another node's (a light
        #: client, as the simulator models them), so its gossip and sync loops do not run.
        self.ledger_light = ledger_light
        #: Withdraw the capacity record on exit (a simulated crash turns this off).
        self.withdraw_on_exit = True
        self.runtime = runtime or Runtime.production()
        self.price = config.price
        self.identity = identity
        self.network = network
        self.clock = clock
        self.devices: tuple[Device, ...] = devices
        self.tflops = tflops
        self.started_at = clock.now()
        self.tunnel_url: str | None = None
        self.stopped = trio.Event()  # set when someone asks the node to stop
        self.operands = OperandStore(max_bytes=config.operand_cache_mib << 20)
        self.receipts = receipts or ReceiptStore(config.data_dir / RECEIPTS_FILE_NAME)
        self.ledger = ledger
        self.ledger_service = LedgerService(
            network,
            identity,
            clock,
            ledger,
            sync_interval=self.timing.ledger_sync_interval
            or min(10.0, ledger.genesis.params.epoch_seconds / 2),
            checkpoint_tick=self.timing.checkpoint_tick,
            runtime=self.runtime,
        )
        self.worker = WorkerService(
            network,
            identity,
            clock,
            self.operands,
            self.receipts,
            price=lambda: self.price,
            executor=executor,
            # --gpu none lends only the CPU: the worker computes with NumPy too, not only the
            # probe leaving the GPU out of the record.
            backend=NumpyBackend() if config.gpu == "none" else None,
            runtime=self.runtime,
            fault_rate=config.fault_rate,
            credit=self.ledger_service.available_credit,
            credit_now=self.ledger_service.available_credit_now,
            on_receipt=self._worker_receipt,
            spool_dir=upload_spool,
            local_uploads=config.shared_memory,
        )
        if serve:
            self.worker.register()
        self.capacity = CapacityService(
            network,
            identity,
            clock,
            region=config.region,
            offer=self.current_offer,
            timing=self.timing.capacity
            or CapacityTiming(ttl=config.record_ttl, announce_interval=config.announce_interval),
        )
        #: What this node measured of every worker it used (kept across restarts by open()).
        self.peers = peers if peers is not None else PeerBook()
        self.scheduler = Scheduler(
            network,
            identity,
            clock,
            self.capacity.view,
            self.receipts,
            runtime=self.runtime,
            region=config.region,
            book=self.peers,
        )
        self.scheduler.local_shares.enabled &= config.shared_memory
        self.challenger = Challenger(
            self.scheduler,
            self.capacity.view,
            identity,
            clock,
            runtime=self.runtime,
            interval=self.timing.challenge_interval or 30.0,
        )
        self.scheduler.on_settled = self.ledger_service.record_receipt
        # Runs name this node's network; its worker refuses another network's requesters.
        network_id = ledger.genesis_hash[:NETWORK_ID_CHARS]
        self.scheduler.network_id = self.worker.network_id = network_id
        self.scheduler.network_name = self.worker.network_name = ledger.genesis.network
        self.scheduler.stakes = lambda: dict(self.ledger.state().stakes)
        self.scheduler.on_fault = self._record_fault
        # Job numbers continue across restarts of this data directory (never reused).
        self.jobs = JobBoard(
            self.submit,
            self.runtime,
            self.scheduler.settled,
            JobIds(config.data_dir / JOB_IDS_FILE_NAME),
        )
        # Shard attempts of the board's jobs count in their progress (the simulator and tests
        # may put their own observer here instead).
        self.scheduler.observer = observe_attempt
        #: The control API's URL once it serves (control.json is ours only if it names it).
        self._control_url: str | None = None
        #: Set when their loops start (status shows their guards' counters).
        self.mesh: MeshKeeper | None = None
        self.control_server: ControlServer | None = None
        #: What passes through the network port (Node.open installs it) and the metrics the
        #: control API serves at /metrics (mtor_p2p/metrics.py).
        self.network_meter: NetworkMeter | None = None
        self.metrics: NodeMetrics | None = None
        #: The web dashboard, once the control API serves (mtor_p2p/dashboard).
        self.dashboard: Dashboard | None = None

    async def _worker_receipt(self, receipt: Any) -> None:
        # The requester gossips it; the worker only enters its copy (sync repairs gaps).
        await self.ledger_service.record_receipt(receipt, announce=False)

    async def _record_fault(self, proof: bytes) -> None:
        await self.ledger_service.record_fault(proof)

    @property
    def peer_id(self) -> str:
        """This node's peer ID."""
        return self.identity.peer_id

    def reachability(self) -> dict[str, Any] | None:
        """What NAT traversal found (reachability, NAT behaviour, relays, hole punches);
        None where the network has none (memnet, or ``nat = false``)."""
        nat = getattr(self.network, "nat", None)
        return nat.status() if nat is not None else None

    def lane_port(self) -> int | None:
        """The TCP port this node serves lanes on (None: lanes are off, or the network has
        none, as memnet)."""
        port = getattr(self.network, "lane_port", None)
        return port() if callable(port) else None

    def addrs(self) -> list[str]:
        """Addresses at which other peers can dial this node."""
        return self.network.addrs()

    # -- what we offer ---------------------------------------------------------------------

    def current_offer(self) -> Offer:
        """The offer announced in our capacity record, from the latest device probe."""
        utilizations = [d.utilization for d in self.devices if d.utilization is not None]
        device_load = sum(utilizations) / len(utilizations) / 100 if utilizations else 0.0
        load = min(1.0, max(0.0, device_load, self.worker.load))
        return Offer(
            devices=self.devices,
            tflops=round(self.tflops, 6),
            mem_free=sum(d.mem_free for d in self.devices),
            load=round(load, 3),
            price=round(self.price, 6),
            kernels=self.worker.kernels if self.serve else (),
            relay=bool((self.reachability() or {}).get("relay_service")),
        )

    async def submit(
        self,
        kernel: str,
        operands: dict[str, Any],
        *,
        verify: str = "auto",
        max_price: float | None = None,
        shards: int | None = None,
        max_workers: int = 8,
        sample_rows: int = 4,
        progress: Any = None,
        latency_target: float | None = None,
        deadline: float = 600.0,
        freivalds_rounds: int = 20,
    ) -> JobResult:
        """Run ``kernel`` on ``operands`` across the network and return the verified result.

        ``verify``: ``auto`` (the kernel's own check), ``freivalds`` (matmul), ``sample``
        (recompute random output rows here), ``redundant`` (two workers must agree) or
        ``none`` (trusted workers only: nothing is checked; the simulator's cloud baseline).
        ``progress(done, total)`` is called as shards are accepted; ``latency_target``
        (seconds) prefers workers expected to answer within it; ``deadline`` bounds the whole
        job. Raises
        :class:`~mtor_p2p.compute.scheduler.JobFailed` when the job cannot finish.
        """
        spec = JobSpec(
            kernel=kernel,
            operands=operands,
            verify=verify,
            max_price=max_price,
            shards=shards,
            max_workers=max_workers,
            sample_rows=sample_rows,
            latency_target=latency_target,
            deadline=deadline,
            freivalds_rounds=freivalds_rounds,
        )
        return await self.scheduler.run(spec, progress=progress)

    async def _price_loop(self) -> None:
        """Move the asking price with our utilisation (the genesis's rule, a pure function)."""
        rule = self.ledger.genesis.params.price
        interval = self.ledger.genesis.params.price_interval
        busy_before, then = self.worker.stats.compute_seconds, trio.current_time()
        while True:
            await trio.sleep(interval)
            busy, now = self.worker.stats.compute_seconds, trio.current_time()
            utilisation = (busy - busy_before) / max(1e-9, (now - then) * self.worker.slots)
            busy_before, then = busy, now
            self.price = next_price(self.price, utilisation, rule)
            self.capacity.request_announce()

    async def _book_loop(self) -> None:
        """Keep the peer book's file current (a crash loses one interval of measurements)."""
        while True:
            await trio.sleep(self.timing.book_flush_interval)
            await self.runtime.run_blocking(self.peers.flush)

    async def _probe_loop(self) -> None:
        while True:
            await trio.sleep(self.timing.probe_interval)
            self.devices = tuple(await self.runtime.run_blocking(probe_devices, self.config.gpu))

    # -- start and stop --------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def open(
        cls, config: NodeConfig, *, lock: DataDirLock | None = None
    ) -> AsyncIterator[Node]:
        """Start a production node from ``config``: py-libp2p host, SQLite files in the data
        directory, probed devices, the control API; on exit withdraw its record and stop.

        The node holds the data directory's lock (:class:`~mtor_p2p.datadir.DataDirLock`)
        while it runs: a second node on the same directory, in this process or another, gets
        :class:`~mtor_p2p.datadir.DataDirInUse` before anything is touched. ``lock``: one the
        caller already holds (``mtor-peer run`` takes it before it sets anything up); it is
        left to the caller to release.
        """
        config.validate()
        if lock is not None and (not lock.held or lock.data_dir != config.data_dir):
            raise ValueError(f"the lock given to Node.open must be held on {config.data_dir}")
        lone: Exception | None = None
        try:
            if lock is None:
                private_dir(config.data_dir)
                with DataDirLock(config.data_dir):
                    async with cls._open(config) as node:
                        yield node
            else:
                async with cls._open(config) as node:
                    yield node
        except BaseExceptionGroup as group:
            # An error of the caller's own code (a JobFailed from submit) crosses the node's
            # nurseries, and each wraps it in a group: ten levels deep, Python's traceback
            # never reached it. One error alone is raised as itself (below, outside this
            # handler, so that its own cause and context are what it carries).
            leaves = leaf_exceptions(group)
            if len(leaves) != 1 or not isinstance(leaves[0], Exception):
                raise
            lone = leaves[0]
        if lone is not None:
            raise lone

    @classmethod
    @asynccontextmanager
    async def _open(cls, config: NodeConfig) -> AsyncIterator[Node]:
        from mtor_p2p.libp2p_host import HostSettings, Libp2pNetwork
        from mtor_p2p.libp2p_nat import NatSettings, RelayLimitsConfig

        # Kernels and the requester's checks run on threads: BLAS gets one core fewer than
        # the process may use, so that the event loop keeps one (issue 9).
        blas_threads = limit_blas_threads()
        if blas_threads is not None:
            log.info("BLAS capped at %d thread(s)", blas_threads)
        runtime = Runtime.production()
        # The ledger first: a data directory of another network is refused before any
        # warning of what a running node would lack, or a device probe (a new user's
        # walkthrough read two warnings before the refusal).
        ledger = open_ledger(config)
        try:
            if config.use_default_bootstrap and not config.bootstrap_node:
                if not config.all_bootstrap_peers():
                    # A new user's first `run` otherwise starts alone and says nothing of it.
                    log.warning(
                        "no bootstrap peers: none given (--bootstrap ADDR, or bootstrap = [...] "
                        "in the config file) and the shipped list is empty; this node meets only "
                        "the peers that dial it"
                    )
            identity = load_or_create_identity(config.data_dir)
            devices = await runtime.run_blocking(probe_devices, config.gpu)
            tflops = await runtime.run_blocking(measure_tflops, devices, config.data_dir)
            settings = HostSettings(
                listen_addrs=list(config.listen),
                bootstrap_node=config.bootstrap_node,
                max_connections=config.max_connections,
                lanes=config.lanes,
                lane_port=config.lane_port,
                announce_addrs=list(config.announce),
                nat=(
                    NatSettings(
                        relay_service=config.relay,
                        relays_wanted=config.relays_wanted,
                        relay_limits=RelayLimitsConfig(
                            max_reservations=config.relay_max_reservations
                        ),
                        punch_retry_s=config.punch_retry,
                    )
                    if config.nat
                    else None
                ),
                bootstrap_peer_ids=[
                    a.rsplit("/p2p/", 1)[-1] for a in config.all_bootstrap_peers() if "/p2p/" in a
                ],
            )
            tunnels = None
            peers = PeerBook(config.data_dir / PEER_BOOK_FILE_NAME)
        except BaseException:
            ledger.close()
            raise
        async with AsyncExitStack() as stack:
            stack.callback(ledger.close)
            stack.callback(peers.close)
            network = await stack.enter_async_context(Libp2pNetwork.open(identity, settings))
            # Metered before the services register their handlers and topic validators.
            meter = NetworkMeter.install(network)
            node = cls(
                config,
                identity,
                network,
                NetClock(),
                ledger,
                runtime=runtime,
                devices=tuple(devices),
                tflops=tflops,
                peers=peers,
                # Uploads in progress wait on disk, not in memory (private, emptied on start).
                upload_spool=private_dir(config.data_dir / UPLOAD_SPOOL_DIR_NAME),
            )
            node.network_meter = meter
            try:
                if config.ngrok.enabled:
                    tunnels = await node._open_tunnel(network)
                async with node.running(probe=True, control=True), trio.open_nursery() as extra:
                    if tunnels is not None:
                        extra.start_soon(node._tunnel_keeper, tunnels, network)
                    yield node
                    extra.cancel_scope.cancel()
            finally:
                node.receipts.close()
                try:
                    node.jobs.close()  # the numbers it did not use, for the next run
                except OSError as exc:  # the next run only skips them
                    log.warning("could not give back unused job numbers: %s", exc)
                if tunnels is not None:
                    await runtime.run_blocking(tunnels.close)

    @asynccontextmanager
    async def running(self, *, probe: bool = False, control: bool = False) -> AsyncIterator[Node]:
        """Run the node's services and loops while the context is open.

        ``probe``: re-probe the local devices periodically; ``control``: serve the control API
        and write ``control.json`` (both only make sense for a real node). On exit the node
        withdraws its capacity record and every loop stops.
        """
        async with trio.open_nursery() as nursery:
            self.jobs.nursery = nursery
            await nursery.start(self.capacity.run)
            nursery.start_soon(self._mesh_loop)  # also dials the bootstrap list
            if probe:
                nursery.start_soon(self._probe_loop)
            nursery.start_soon(self.scheduler.courier)
            nursery.start_soon(self.scheduler.forget_other_networks)
            nursery.start_soon(self.worker.run)  # expires idle uploads, unpaid work on a timer
            if self.timing.challenge_interval is not None:
                await nursery.start(self.challenger.run)
            if self.peers.path is not None:
                nursery.start_soon(self._book_loop)
            if not self.ledger_light:
                await nursery.start(self.ledger_service.run)
            if self.config.dynamic_price:
                nursery.start_soon(self._price_loop)
            if control:
                api_port = await nursery.start(self._serve_control)
                self._write_control_info(api_port)
            try:
                yield self
            finally:
                if self.withdraw_on_exit:
                    with trio.CancelScope(shield=True):
                        # Receipts of jobs that already returned are settled after their
                        # result (scheduler.settle): store them before the courier stops.
                        with trio.move_on_after(SETTLE_ON_EXIT_SECONDS):
                            await self.scheduler.settled()
                        await self.scheduler.store_backlog()
                        await self.capacity.withdraw(timeout=3.0)
                if control:
                    self._remove_control_info()
                nursery.cancel_scope.cancel()

    async def _open_tunnel(self, network: Any) -> Any:
        """Open the ngrok tunnel to our TCP port and announce its public address."""
        from mtor_p2p.ngrok_tunnel import NgrokTunnelManager

        ports = network.listen_ports()
        if not ports:
            raise NetworkError("ngrok needs a TCP listen address")
        manager = NgrokTunnelManager(
            authtoken=self.config.ngrok.authtoken,
            ngrok_path=self.config.ngrok.path,
            region=self.config.ngrok.region,
            config_dir=str(self.config.data_dir),
        )
        try:
            tunnel = await self.runtime.run_blocking(manager.open_tcp, ports[0])
        except BaseException:
            await self.runtime.run_blocking(manager.close)
            raise
        self.tunnel_url = tunnel.public_url
        network.add_announce_addr(tunnel.multiaddr(self.peer_id))
        return manager

    async def _tunnel_keeper(self, manager: Any, network: Any) -> None:
        """ngrok is the bootstrap of last resort: close the tunnel once NAT traversal makes
        it unneeded for a while (public, or a relay and a NAT that hole punching gets
        through), open it again when it is needed again (libp2p_nat.tunnel_needed)."""
        from mtor_p2p.libp2p_nat import tunnel_needed

        unneeded_since: float | None = None
        while True:
            await trio.sleep(TUNNEL_CHECK_SECONDS)
            needed = tunnel_needed(self.reachability())
            now = self.clock.now()
            if needed or self.tunnel_url is None:
                unneeded_since = None
            if self.tunnel_url is not None and not needed:
                unneeded_since = unneeded_since if unneeded_since is not None else now
                if now - unneeded_since >= TUNNEL_IDLE_SECONDS:
                    log.info("ngrok tunnel %s no longer needed: closing it", self.tunnel_url)
                    for tunnel in manager.tunnels:
                        network.remove_announce_addr(tunnel.multiaddr(self.peer_id))
                    await self.runtime.run_blocking(manager.close)
                    self.tunnel_url = None
                    self.capacity.request_announce()
            elif self.tunnel_url is None and needed:
                log.info("no relay or direct reachability: opening the ngrok tunnel again")
                try:
                    tunnel = await self.runtime.run_blocking(
                        manager.open_tcp, network.listen_ports()[0]
                    )
                except Exception as exc:  # the agent may be unreachable now: try later
                    log.warning("ngrok tunnel could not be opened again: %s", exc)
                    continue
                self.tunnel_url = tunnel.public_url
                network.add_announce_addr(tunnel.multiaddr(self.peer_id))
                self.capacity.request_announce()

    async def _mesh_loop(self) -> None:
        """Keep TARGET_CONNECTIONS open: re-dial known peers, peers from capacity records and
        the bootstrap list whenever below it, backing off from addresses that fail
        (:mod:`mtor_p2p.mesh`)."""

        def candidates() -> list[Candidate]:
            return [(r.peer_id, r.addrs) for r in self.capacity.view.live(self.clock.now())]

        keeper = self.mesh = MeshKeeper(
            self.network,
            candidates=candidates,
            bootstrap=self.config.all_bootstrap_peers(),
            rng=self.runtime.random,
            settings=MeshSettings(
                target=TARGET_CONNECTIONS,
                interval=self.timing.mesh_interval,
                isolated_interval=self.timing.bootstrap_retry,
                backoff_base=self.timing.bootstrap_retry,
            ),
        )
        await keeper.run()

    # -- control API -----------------------------------------------------------------------

    def status(self, ledger: dict[str, Any] | None = None) -> dict[str, Any]:
        """What ``mtor-peer status`` shows (``ledger``: the ledger summary, if already read)."""
        now = self.clock.now()
        own = self.capacity.own_record
        return {
            "version": __version__,
            "ledger_rules": LEDGER_RULES,
            "peer_id": self.peer_id,
            "addrs": self.addrs(),
            "region": self.config.region,
            "uptime_s": round(now - self.started_at, 1),
            "connected_peers": len(self.network.connected_peers()),
            "routing_table_size": self.network.routing_table_size(),
            "view_size": len(self.capacity.view.live(now)),
            "tflops": self.tflops,
            "devices": [d.__dict__ for d in self.devices],
            "record": None if own is None else record_to_json(own, now),
            "tunnel": self.tunnel_url,
            "lane_port": self.lane_port(),
            "reachability": self.reachability(),
            "guards": self.network.stats.__dict__,
            "mesh": None
            if self.mesh is None
            else {**self.mesh.stats.__dict__, "target": TARGET_CONNECTIONS},
            "control_api": None
            if self.control_server is None
            else self.control_server.stats.__dict__,
            "worker": {
                "kernels": list(self.worker.kernels),
                "backend": self.worker.executor.name,
                # Whether requesters on this machine may hand operands and take outputs
                # through shared memory (config shared_memory, and the platform).
                "shared_memory": self.worker.local_uploads,
                **self.worker.stats.__dict__,
            },
            "receipts": self.receipts.count(),
            "reputation": self.reputation_summary(),
            "ledger": ledger if ledger is not None else self.ledger_summary(),
            "insight": self.insight(),
            "metrics_listen": None
            if self.metrics is None or self.metrics.listen_port is None
            else f"http://{self.config.metrics_listen.rsplit(':', 1)[0]}:"
            f"{self.metrics.listen_port}/metrics",
            "dashboard": None
            if self.dashboard is None
            else {
                "sessions": self.dashboard.sessions.live,
                "snapshots_built": self.dashboard.snapshots_built,
                "last_build_s": round(self.dashboard.last_build_seconds, 4),
            },
            "pid": os.getpid(),
        }

    def insight(self) -> dict[str, Any]:
        """The network as this node sees it, and why work does or does not come
        (:mod:`mtor_p2p.insight`)."""
        peers = peers_view(self)
        return {
            "why_no_work": why_no_work(self),
            "peers": peers,
            # peers_view shows the first MAX_PEERS_SHOWN (connected, measured, same GPU)
            "peers_total": peers_in_view(self)["total"],
        }

    async def _route_insight(self, query: dict[str, str], body: Any) -> tuple[int, Any]:
        return 200, self.insight()

    async def _route_earnings(self, query: dict[str, str], body: Any) -> tuple[int, Any]:
        limit = max(1, min(10_000, int(query.get("limit", 200))))
        return 200, await self.runtime.run_blocking(earnings, self, limit)

    async def _route_status(self, query: dict[str, str], body: Any) -> tuple[int, Any]:
        ledger = await self.runtime.run_blocking(self.ledger_summary)
        return 200, self.status(ledger)

    def reputation_summary(self) -> dict[str, Any]:
        """Counts of the peer book (for ``status``)."""
        now = self.clock.now()
        known = self.peers.known()
        return {
            "known": len(known),
            "measured": sum(1 for s in known if s.measured),
            "demoted": sum(1 for s in known if self.peers.excluded(s.peer_id, now)),
            "challenges": dict(self.challenger.stats),
        }

    async def _route_reputation(self, query: dict[str, str], body: Any) -> tuple[int, Any]:
        peers = self.peers.report(self.clock.now())
        return 200, {"peers": peers, "challenger": self.challenger.to_json()}

    async def _route_peers(self, query: dict[str, str], body: Any) -> tuple[int, Any]:
        capacity_query = CapacityQuery(
            min_mem_free=int(float(query.get("min_mem_gib", 0)) * GIB),
            min_tflops=float(query.get("min_tflops", 0)),
            max_price=float(query["max_price"]) if "max_price" in query else None,
            region=query.get("region"),
            kernel=query.get("kernel"),
        )
        now = self.clock.now()
        records = self.capacity.view.query(capacity_query, now)
        # Peers of other ledger rules the same filters would have matched: not listed (this
        # node never schedules them), counted so that the list is not read as all there is.
        anyone = dataclasses.replace(capacity_query, ledger_rules=None)
        other_rules = sum(
            1
            for r in self.capacity.view.live_unsorted(now)
            if r.ledger_rules != LEDGER_RULES and anyone.matches(r)
        )
        # Peers of another network by their own word: their ledgers refused our sync, or
        # their workers our runs. Listed (they are in the view and the same rules), marked:
        # a node joined without its network's genesis saw them unmarked while every job
        # failed (a new user's walkthrough).
        elsewhere = self.ledger_service.other_network_peers()
        peers = []
        for record in records:
            entry = record_to_json(record, now)
            entry["other_network"] = record.peer_id in elsewhere or (
                self.scheduler.is_other_network(record.peer_id)
            )
            peers.append(entry)
        return 200, {
            "peers": peers,
            "other_ledger_rules": other_rules,
            "other_network": sum(1 for p in peers if p["other_network"]),
        }

    async def _route_receipts(self, query: dict[str, str], body: Any) -> tuple[int, Any]:
        limit = max(1, min(10_000, int(query.get("limit", 100))))
        return 200, await self.runtime.run_blocking(lambda: self.receipts.report(limit=limit))

    def ledger_summary(self) -> dict[str, Any]:
        """Our account and the ledger's totals (amounts in nano-credits)."""
        return ledger_summary(self.ledger, self.peer_id) | {
            "price": self.price,
            "sync": dict(self.ledger_service.stats),
        }

    async def _route_balance(self, query: dict[str, str], body: Any) -> tuple[int, Any]:
        def read() -> dict[str, Any]:
            summary = self.ledger_summary()
            if query.get("all"):
                summary["accounts"] = all_accounts(self.ledger)
            return summary

        return 200, await self.runtime.run_blocking(read)

    async def _route_stake(self, query: dict[str, str], body: Any) -> tuple[int, Any]:
        amount = _positive_amount(body)
        if amount is None:
            return 400, {"error": "amount must be a positive integer of nano-credits"}
        return await _refusal_as_409(self.ledger_service.stake(amount))

    async def _route_transfer(self, query: dict[str, str], body: Any) -> tuple[int, Any]:
        amount = _positive_amount(body)
        if amount is None:
            return 400, {"error": "amount must be a positive integer of nano-credits"}
        to = body.get("to")
        if not isinstance(to, str):
            return 400, {"error": "to must be a peer ID"}
        return await _refusal_as_409(self.ledger_service.transfer(to, amount))

    async def _route_ledger_verify(self, query: dict[str, str], body: Any) -> tuple[int, Any]:
        return 200, await self.runtime.run_blocking(self.ledger.verify)

    async def _route_ledger_prove(self, query: dict[str, str], body: Any) -> tuple[int, Any]:
        try:
            return 200, await self.runtime.run_blocking(self.ledger.prove, query.get("id", ""))
        except LedgerError as exc:
            return 404, {"error": str(exc)}

    async def _route_shutdown(self, query: dict[str, str], body: Any) -> tuple[int, Any]:
        self.stopped.set()
        return 200, {"stopping": True}

    async def _serve_control(self, *, task_status: trio.TaskStatus[int]) -> None:
        token = load_or_create_token(self.config.data_dir)
        metrics = self.metrics = NodeMetrics(self)
        dashboard = self.dashboard = Dashboard(self)
        dashboard_routes, access = dashboard.routes()
        server = ControlServer(
            token,
            dashboard_routes
            | {
                ("GET", "/v1/status"): self._route_status,
                ("GET", "/v1/peers"): self._route_peers,
                ("GET", "/v1/reputation"): self._route_reputation,
                ("POST", "/v1/shutdown"): self._route_shutdown,
                ("POST", "/v1/jobs"): self.jobs.route_submit,
                ("GET", "/v1/jobs"): self.jobs.route_status,
                ("POST", "/v1/jobs/cancel"): self.jobs.route_cancel,
                ("GET", "/v1/receipts"): self._route_receipts,
                ("GET", "/v1/insight"): self._route_insight,
                ("GET", "/v1/earnings"): self._route_earnings,
                ("GET", "/v1/ledger/balance"): self._route_balance,
                ("POST", "/v1/ledger/stake"): self._route_stake,
                ("POST", "/v1/ledger/transfer"): self._route_transfer,
                ("GET", "/v1/ledger/verify"): self._route_ledger_verify,
                ("GET", "/v1/ledger/prove"): self._route_ledger_prove,
                ("GET", "/metrics"): metrics.route,
            },
            access=access,
            viewer=dashboard.sessions.valid,
        )
        self.control_server = server
        async with trio.open_nursery() as nursery:
            nursery.start_soon(dashboard.run)
            if self.config.metrics_listen is not None:
                await nursery.start(metrics.serve_listener, self.config.metrics_listen)
            await server.serve(self.config.api_port, task_status=task_status)

    def _write_control_info(self, port: int) -> None:
        self._control_url = f"http://127.0.0.1:{port}"
        write_control_info(
            self.config.data_dir,
            {
                "url": self._control_url,
                "pid": os.getpid(),
                "peer_id": self.peer_id,
                "addrs": self.addrs(),
            },
        )

    def _remove_control_info(self) -> None:
        """Delete ``control.json`` if it is still ours (our PID and our API's URL): a node
        started on the directory since (the lock keeps others out, but a file copied in, or a
        node of an older version, may name another) keeps its own."""
        path = self.config.data_dir / INFO_FILE_NAME
        try:
            info = json.loads(path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("%s not removed: cannot read it (%s)", path, exc)
            return
        if not isinstance(info, dict) or info.get("pid") != os.getpid():
            log.warning(
                "%s names another process (pid %s): left in place",
                path,
                info.get("pid") if isinstance(info, dict) else None,
            )
            return
        if self._control_url is not None and info.get("url") != self._control_url:
            log.warning("%s names another control API (%s): left in place", path, info.get("url"))
            return
        path.unlink(missing_ok=True)


def _positive_amount(body: Any) -> int | None:
    """The request body's ``amount`` if it is a positive integer (nano-credits), else None."""
    amount = body.get("amount") if isinstance(body, dict) else None
    if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
        return None
    return amount


async def _refusal_as_409(debit: Awaitable[dict[str, Any]]) -> tuple[int, Any]:
    """Run a stake or transfer; the ledger's refusal (RecordError) becomes a 409."""
    try:
        return 200, await debit
    except RecordError as exc:
        return 409, {"error": str(exc)}


def resolve_genesis(config: NodeConfig) -> Genesis:
    """The node's genesis: ``config.genesis``, else the data directory's copy, else the one
    shipped in ``bootstrap/``. The data directory keeps a copy so that the CLI can read the
    ledger while the node is stopped."""
    stored = config.data_dir / GENESIS_FILE_NAME
    if config.genesis is not None:
        genesis = load_genesis(config.genesis)
    elif stored.exists():
        genesis = load_genesis(stored)
    else:
        genesis = load_genesis(None)
    return genesis


def open_ledger(config: NodeConfig) -> Ledger:
    """Open the data directory's ledger under the node's genesis (LedgerError if the ledger
    belongs to another network) and keep a copy of that genesis beside it (written again
    when missing, damaged or another's)."""
    genesis = resolve_genesis(config)
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    stored = config.data_dir / GENESIS_FILE_NAME
    try:
        ledger = Ledger(config.data_dir / LEDGER_FILE_NAME, genesis)
    except OtherNetworkLedger as exc:
        raise _named_networks(exc, genesis, stored) from None
    try:
        if _stored_genesis(stored) != genesis.hash:
            genesis.save(stored)
    except BaseException:
        ledger.close()  # opened: not left to the garbage collector (a review)
        raise
    return ledger


def _stored_genesis(stored: Path) -> str | None:
    """The hash of the data directory's copy of its genesis; None when there is no readable
    one (missing, damaged, not a regular file: ``load_genesis`` says which)."""
    try:
        return load_genesis(stored).hash
    except RecordError:
        return None


def _named_networks(exc: OtherNetworkLedger, genesis: Genesis, stored: Path) -> LedgerError:
    """``exc`` with both networks named, and what to run instead: the data directory's copy
    of its own genesis says which network its ledger follows (a new user's walkthrough: the
    refusal named two hashes and nothing else). Two networks may share a name (every devnet
    is called the same): their hashes tell them apart then. The genesis may come from
    ``--genesis`` or the config file, so the advice names both (a review)."""
    try:
        own = load_genesis(stored)
    except RecordError:
        return exc
    if own.hash != exc.held:
        return exc
    where = shlex.quote(str(stored.parent))
    ours = f"{own.network!r} (genesis {exc.held[:16]}...)"
    theirs = f"{genesis.network!r} (genesis {exc.wanted[:16]}...)"
    if own.network == genesis.network:
        ours = f"another network named {ours}"
        theirs = f"the one of genesis {exc.wanted[:16]}..."
        go_on = f"the network of genesis {exc.held[:16]}..."
        other = "this genesis"
    else:
        ours, go_on, other = f"the network {ours}", repr(own.network), repr(genesis.network)
    return OtherNetworkLedger(
        f"the data directory {stored.parent} follows {ours}, not {theirs}: to go on in "
        f"{go_on}, start without a genesis (no --genesis, no genesis in the config file: "
        f"the directory's copy {shlex.quote(str(stored))} is used); for {other}, use "
        "another --data-dir (a data directory keeps the network it began with; to keep "
        f"this node's peer ID, move {where}/identity.key to the new directory and run only "
        "the new one)",
        exc.held,
        exc.wanted,
    )


def ledger_summary(ledger: Ledger, peer_id: str) -> dict[str, Any]:
    """What ``mtor-peer balance`` shows: one account and the ledger's totals."""
    state = ledger.state()
    account = state.account(peer_id)
    return {
        "peer_id": peer_id,
        "network": ledger.genesis.network,
        "genesis": ledger.genesis_hash,
        **account,
        "spendable": state.spendable(peer_id),
        "credit_limit": state.credit_limit(peer_id),
        "credits": {k: nano_to_credits(v) for k, v in account.items()},
        "supply": ledger.genesis.supply,
        "total": state.total(),
        "burned": state.burned,
        "staked": sum(state.stakes.values()),
        "receipts": state.receipts,
        "entries": ledger.count(),
        "checkpoints": ledger.count("checkpoint"),
    }


def all_accounts(ledger: Ledger) -> dict[str, dict[str, int]]:
    """Every account the ledger knows (balance, stake, slashed), by peer ID."""
    state = ledger.state()
    peers = sorted(set(state.balances) | set(state.stakes))
    return {peer: state.account(peer) for peer in peers}
