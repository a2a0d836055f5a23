"""Prometheus metrics of a node (issue 11, item 4): ``GET /metrics`` in the text format.

Most figures already exist as the node's own counters (``Node.status``: the host's
:class:`~mtor_p2p.network.HostStats`, the worker's, the control API's, the ledger summary). A
custom collector, :class:`NodeCollector`, reads them at scrape time into a registry of the
node's own (never the process's default registry: tests and the simulator run many nodes in
one process), so the services carry no Prometheus objects. What did not exist is counted here:

* :class:`LatencyBuckets`: a fixed-bucket histogram (no dependency, a few integers) that the
  scheduler and the worker fill with shard durations;
* :class:`NetworkMeter`: bytes and requests through the node's ``Network`` port, DHT lookups
  and their latency, gossip messages by validation outcome. It wraps four methods of the
  network *instance* (``request``, ``handle``, ``dht_get``, ``set_topic_validator``) before
  the services use them, so the adapters (py-libp2p, memnet) stay as they are.

Names follow Prometheus' conventions: ``mtor_`` prefix, base units (seconds, bytes,
credits, ratios 0-1), ``_total`` on counters. The Grafana dashboard ``bootstrap/grafana-mtor.json``
uses these names. Scraping needs the control token, unless the operator opts in to
``--metrics-listen HOST:PORT``: a second listener that serves only ``/metrics``, without one.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector

from mtor_p2p.network import Gathered

if TYPE_CHECKING:
    from mtor_p2p.node import Node

#: Content type of the text exposition format that :func:`generate_latest` writes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Bucket bounds (seconds) of shard durations: from a small shard on loopback to a large one
#: on a slow worker.
SHARD_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
#: Bucket bounds (seconds) of DHT lookups (2-25 ms on a devnet, seconds across the world).
DHT_BUCKETS: tuple[float, ...] = (
    0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_NANO = 10**9


@dataclass
class LatencyBuckets:
    """Counts of observed durations per bucket (upper bounds ``bounds``, then +Inf), their
    sum and number: what a Prometheus histogram exposes, without a registry."""

    bounds: tuple[float, ...] = SHARD_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, seconds: float) -> None:
        """Count one duration."""
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, count)`` pairs as Prometheus wants them: cumulative, ending with +Inf."""
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return out


@dataclass
class EventWindow:
    """Recent events counted per key in fixed time buckets: "how many in the last ten
    minutes" (mtor_p2p/insight.py's demand figures) in memory bounded by the span kept, not
    by the rate (a busy worker's thousands of shard requests are a few integers per bucket).

    Times are whatever clock the caller passes (network time in the node); a count covers
    the buckets that start within the window, so it may include up to one bucket's worth of
    events older than the window.
    """

    bucket_seconds: float = 10.0
    #: Buckets older than this are dropped as new ones open.
    span_seconds: float = 3600.0
    #: (bucket number, {key: count}), oldest first.
    buckets: list[tuple[int, dict[str, int]]] = field(default_factory=list)

    def add(self, now: float, key: str = "", count: int = 1) -> None:
        """Count ``count`` events of ``key`` at ``now``."""
        number = int(now // self.bucket_seconds)
        if not self.buckets or self.buckets[-1][0] != number:
            self.buckets.append((number, {}))
            oldest = number - int(self.span_seconds // self.bucket_seconds)
            while self.buckets[0][0] < oldest:
                del self.buckets[0]
        counts = self.buckets[-1][1]
        counts[key] = counts.get(key, 0) + count

    def count(self, now: float, window: float, key: str | None = None) -> int:
        """Events (of ``key``, or of every key) in the buckets that start within ``window``
        seconds before ``now``."""
        first = int((now - window) // self.bucket_seconds)
        total = 0
        for number, counts in reversed(self.buckets):
            if number < first:
                break
            total += sum(counts.values()) if key is None else counts.get(key, 0)
        return total


@dataclass(frozen=True)
class GpuSensors:
    """What NVML reads of one card at a scrape (None: the card does not report it)."""

    index: int
    name: str
    pci_bus_id: str
    temperature_c: float | None
    power_w: float | None
    utilisation: float | None
    memory_used: int | None


def read_gpu_sensors() -> list[GpuSensors]:
    """Temperature, power, utilisation and memory of every card NVML sees; empty without
    NVML, a driver or a card. Blocking (NVML calls): run it off the event loop."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []

    def read(call: Callable[[], Any]) -> Any:
        try:
            return call()
        except pynvml.NVMLError:
            return None

    cards = []
    try:
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = read(lambda h=handle: pynvml.nvmlDeviceGetName(h))
            bus = read(lambda h=handle: pynvml.nvmlDeviceGetPciInfo(h).busId)
            temperature = read(
                lambda h=handle: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)
            )
            milliwatts = read(lambda h=handle: pynvml.nvmlDeviceGetPowerUsage(h))
            rates = read(lambda h=handle: pynvml.nvmlDeviceGetUtilizationRates(h))
            memory = read(lambda h=handle: pynvml.nvmlDeviceGetMemoryInfo(h))
            cards.append(
                GpuSensors(
                    index=index,
                    name=_text(name),
                    pci_bus_id=_text(bus),
                    temperature_c=None if temperature is None else float(temperature),
                    power_w=None if milliwatts is None else milliwatts / 1000,
                    utilisation=None if rates is None else rates.gpu / 100,
                    memory_used=None if memory is None else int(memory.used),
                )
            )
    except pynvml.NVMLError:
        pass  # a card that vanished mid-read: report the others
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass
    return cards


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _nbytes(data: Any) -> int:
    if isinstance(data, Gathered):
        return len(data)
    try:
        return memoryview(data).nbytes
    except TypeError:
        return 0


@dataclass
class NetworkMeter:
    """What passes through a node's ``Network`` port (see the module docstring)."""

    #: Payload bytes: "in" (requests served, responses received), "out" (the others).
    bytes_in: int = 0
    bytes_out: int = 0
    #: Requests by role ("client": we asked, "server": we answered) and outcome.
    requests: dict[tuple[str, str], int] = field(default_factory=dict)
    #: DHT lookups by outcome ("found", "not_found", "error") and their durations.
    dht_lookups: dict[str, int] = field(default_factory=dict)
    dht_seconds: LatencyBuckets = field(default_factory=lambda: LatencyBuckets(DHT_BUCKETS))
    #: Gossip messages received, by validation outcome ("accepted", "rejected").
    gossip: dict[str, int] = field(default_factory=dict)

    def _count(self, table: dict[Any, int], key: Any) -> None:
        table[key] = table.get(key, 0) + 1

    @classmethod
    def install(cls, network: Any) -> NetworkMeter:
        """Meter ``network`` from now on; call it before the services register handlers
        and validators (``Node.open`` does)."""
        meter = cls()
        request, handle = network.request, network.handle
        dht_get, set_validator = network.dht_get, network.set_topic_validator

        async def metered_request(peer_id: str, protocol: str, payload: bytes, **kw: Any) -> Any:
            meter.bytes_out += _nbytes(payload)
            try:
                response = await request(peer_id, protocol, payload, **kw)
            except Exception:
                meter._count(meter.requests, ("client", "error"))
                raise
            meter._count(meter.requests, ("client", "ok"))
            meter.bytes_in += _nbytes(response)
            return response

        def metered_handle(
            protocol: str, handler: Callable[[str, bytes], Awaitable[bytes]], **kw: Any
        ) -> None:
            async def counted(sender: str, data: bytes) -> bytes:
                meter.bytes_in += _nbytes(data)
                try:
                    response = await handler(sender, data)
                except Exception:
                    meter._count(meter.requests, ("server", "error"))
                    raise
                meter._count(meter.requests, ("server", "ok"))
                meter.bytes_out += _nbytes(response)
                return response

            handle(protocol, counted, **kw)

        async def metered_dht_get(key: str, **kw: Any) -> bytes | None:
            started = time.monotonic()
            outcome = "error"
            try:
                value = await dht_get(key, **kw)
                outcome = "not_found" if value is None else "found"
                return value
            finally:
                meter._count(meter.dht_lookups, outcome)
                meter.dht_seconds.observe(time.monotonic() - started)

        def metered_validator(topic: str, validator: Callable[[str, bytes], bool]) -> None:
            def counted(sender: str, data: bytes) -> bool:
                ok = False
                try:
                    ok = bool(validator(sender, data))
                    return ok
                finally:
                    meter._count(meter.gossip, "accepted" if ok else "rejected")

            set_validator(topic, counted)

        network.request = metered_request
        network.handle = metered_handle
        network.dht_get = metered_dht_get
        network.set_topic_validator = metered_validator
        return meter


def _counter(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> Any:
    family = CounterMetricFamily(name, doc, labels=list(labels or {}))
    family.add_metric(list((labels or {}).values()), value)
    return family


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _histogram(name: str, doc: str, buckets: LatencyBuckets) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc)
    family.add_metric([], buckets.cumulative(), sum_value=buckets.total)
    return family


class NodeCollector(Collector):
    """Reads a node's counters at scrape time (see the module docstring).

    ``ledger`` is the node's ledger summary, read off the event loop by the caller just before
    a scrape (it queries SQLite); everything else is read on the event loop's thread.
    """

    def __init__(self, node: Node) -> None:
        self.node = node
        self.ledger: dict[str, Any] | None = None
        #: NVML's readings of the cards, read off the event loop just before a scrape.
        self.gpus: list[GpuSensors] = []

    def collect(self) -> Iterator[Any]:
        """Every metric of the node (the registry calls this at each scrape)."""
        yield from self._identity()
        yield from self._network()
        yield from self._worker()
        yield from self._requester()
        yield from self._ledger()
        yield from self._devices()
        yield from self._control()

    def _identity(self) -> Iterator[Any]:
        from mtor_p2p import __version__

        node = self.node
        info = InfoMetricFamily("mtor_node", "This node: peer ID, version, region, backend.")
        info.add_metric(
            [],
            {
                "peer_id": node.peer_id,
                "version": __version__,
                "region": node.config.region,
                "backend": node.worker.executor.name,
            },
        )
        yield info
        yield _gauge(
            "mtor_node_start_time_seconds",
            "When the node started (seconds since the epoch).",
            node.started_at,
        )
        yield _gauge("mtor_tflops", "Measured TFLOP/s this node advertises.", node.tflops)
        yield _gauge(
            "mtor_price_credits_per_tflop", "Current asking price (credits per TFLOP).", node.price
        )
        yield _gauge(
            "mtor_load_ratio",
            "Load announced in the capacity record (0-1: devices' utilisation or busy slots).",
            node.current_offer().load,
        )

    def _network(self) -> Iterator[Any]:
        node = self.node
        network = node.network
        now = node.clock.now()
        yield _gauge(
            "mtor_connected_peers", "Peers with an open connection.", len(network.connected_peers())
        )
        yield _gauge(
            "mtor_routing_table_peers",
            "Peers in the DHT routing table.",
            network.routing_table_size(),
        )
        yield _gauge(
            "mtor_view_peers",
            "Peers in the capacity view (live records).",
            len(node.capacity.view.live(now)),
        )
        stats = network.stats
        refused = CounterMetricFamily(
            "mtor_host_requests_refused",
            "Inbound requests the host's guards refused, by reason.",
            labels=["reason"],
        )
        for reason in ("busy", "size", "peer_streams", "peer_bytes", "total_bytes", "penalised"):
            refused.add_metric([reason], getattr(stats, f"requests_refused_{reason}", 0))
        yield refused
        yield _counter(
            "mtor_host_requests_cut_slow",
            "Inbound requests cut because their sender was too slow.",
            getattr(stats, "requests_cut_slow", 0),
        )
        yield _counter(
            "mtor_host_handler_errors",
            "Request handlers that raised (answered 'internal error').",
            getattr(stats, "handler_errors", 0),
        )
        yield _counter(
            "mtor_gossip_messages_dropped",
            "Gossip messages dropped because a subscriber's buffer was full.",
            getattr(stats, "gossip_dropped", 0),
        )
        lanes_open = GaugeMetricFamily(
            "mtor_lanes_open", "Lanes open now, by direction.", labels=["direction"]
        )
        lane_requests = CounterMetricFamily(
            "mtor_lane_requests", "Requests carried on lanes, by direction.", labels=["direction"]
        )
        for direction in ("out", "in"):
            lanes_open.add_metric([direction], getattr(stats, f"lanes_open_{direction}", 0))
            lane_requests.add_metric([direction], getattr(stats, f"lane_requests_{direction}", 0))
        yield lanes_open
        yield lane_requests
        yield _counter(
            "mtor_lane_auth_failures",
            "Lane records that did not authenticate.",
            getattr(stats, "lane_auth_failures", 0),
        )
        if node.mesh is not None:
            yield _gauge("mtor_mesh_target_connections", "Connections the mesh keeps.", 8)
        meter = node.network_meter
        if meter is None:
            return
        traffic = CounterMetricFamily(
            "mtor_network_bytes",
            "Payload bytes of requests and responses through the network port, by direction.",
            labels=["direction"],
        )
        traffic.add_metric(["in"], meter.bytes_in)
        traffic.add_metric(["out"], meter.bytes_out)
        yield traffic
        requests = CounterMetricFamily(
            "mtor_network_requests",
            "Requests through the network port, by role (client: sent, server: served) and "
            "outcome.",
            labels=["role", "outcome"],
        )
        for role in ("client", "server"):
            for outcome in ("ok", "error"):
                requests.add_metric([role, outcome], meter.requests.get((role, outcome), 0))
        yield requests
        lookups = CounterMetricFamily(
            "mtor_dht_lookups", "DHT lookups (gets), by outcome.", labels=["outcome"]
        )
        for outcome in ("found", "not_found", "error"):
            lookups.add_metric([outcome], meter.dht_lookups.get(outcome, 0))
        yield lookups
        yield _histogram(
            "mtor_dht_lookup_duration_seconds", "Duration of DHT lookups.", meter.dht_seconds
        )
        gossip = CounterMetricFamily(
            "mtor_gossip_messages_received",
            "Gossip messages received and validated, by outcome.",
            labels=["outcome"],
        )
        for outcome in ("accepted", "rejected"):
            gossip.add_metric([outcome], meter.gossip.get(outcome, 0))
        yield gossip

    def _worker(self) -> Iterator[Any]:
        worker = self.node.worker
        stats = worker.stats
        served = CounterMetricFamily(
            "mtor_shards_served",
            "Shards this node was asked to run as a worker, by outcome.",
            labels=["outcome"],
        )
        served.add_metric(["ok"], stats.shards_run)
        served.add_metric(["failed"], stats.shards_failed)
        served.add_metric(["refused_price"], stats.price_refusals)
        served.add_metric(["refused_credit"], stats.credit_refusals)
        served.add_metric(["refused_unpaid"], stats.unpaid_refusals)
        yield served
        by_kernel = CounterMetricFamily(
            "mtor_shards_served_by_kernel",
            "Shards run as a worker, by kernel.",
            labels=["kernel"],
        )
        for kernel, count in sorted(stats.by_kernel.items()):
            by_kernel.add_metric([kernel], count)
        yield by_kernel
        shard_seconds = getattr(worker, "shard_seconds", None)
        if shard_seconds is not None:
            yield _histogram(
                "mtor_worker_shard_duration_seconds",
                "Compute time of each shard run as a worker.",
                shard_seconds,
            )
        yield _counter(
            "mtor_worker_compute_seconds", "Seconds spent computing shards.", stats.compute_seconds
        )
        yield _gauge("mtor_worker_active_shards", "Shards computing now.", stats.active)
        yield _gauge("mtor_worker_slots", "Shards the worker runs at once.", worker.slots)
        yield _gauge(
            "mtor_worker_utilisation_ratio", "Busy share of the worker's slots (0-1).", worker.load
        )
        yield _counter(
            "mtor_worker_upload_bytes",
            "Operand bytes uploaded to this worker.",
            stats.bytes_received,
        )
        yield _counter(
            "mtor_worker_shared_operand_bytes",
            "Operand bytes taken from a requester's shared memory on this machine.",
            stats.bytes_shared,
        )
        yield _counter(
            "mtor_worker_shared_output_bytes",
            "Output bytes a requester on this machine took from this worker's shared memory.",
            stats.output_bytes_shared,
        )
        uploads = CounterMetricFamily(
            "mtor_worker_uploads_discarded",
            "Operand uploads refused, expired or evicted.",
            labels=["reason"],
        )
        for reason in ("refused", "expired", "evicted"):
            uploads.add_metric([reason], getattr(stats, f"uploads_{reason}"))
        yield uploads

    def _requester(self) -> Iterator[Any]:
        node = self.node
        stats = getattr(node.scheduler, "stats", None)
        if stats is None:
            return
        requested = CounterMetricFamily(
            "mtor_shards_requested",
            "Shard attempts this node made as a requester, by outcome.",
            labels=["outcome"],
        )
        for outcome, count in sorted(stats.attempts.items()):
            requested.add_metric([outcome], count)
        yield requested
        yield _histogram(
            "mtor_shard_duration_seconds",
            "Time from sending a shard to accepting its verified result, as a requester.",
            stats.shard_seconds,
        )
        jobs = CounterMetricFamily(
            "mtor_jobs", "Jobs run here (challenge jobs included), by outcome.", labels=["outcome"]
        )
        jobs.add_metric(["ok"], stats.jobs_ok)
        jobs.add_metric(["failed"], stats.jobs_failed)
        yield jobs
        yield _counter(
            "mtor_verification_failures",
            "Shard results that failed verification here (wrong results).",
            stats.rejected,
        )
        yield _counter(
            "mtor_fault_proofs",
            "Fault proofs this node made against workers that returned wrong results.",
            stats.fault_proofs,
        )
        summary = node.reputation_summary()
        peers = GaugeMetricFamily(
            "mtor_workers_known",
            "Workers in the peer book, by state.",
            labels=["state"],
        )
        for state in ("known", "measured", "demoted"):
            peers.add_metric([state], summary[state])
        yield peers

    def _ledger(self) -> Iterator[Any]:
        ledger = self.ledger
        if ledger is None:
            return
        for key, doc in (
            ("balance", "Credits in this node's account."),
            ("stake", "Credits this node has staked."),
            ("slashed", "Credits slashed from this node's stake in all."),
            ("spendable", "Credits this node may spend now."),
        ):
            if key in ledger:
                yield _gauge(f"mtor_credits_{key}", doc, ledger[key] / _NANO)
        yield _gauge(
            "mtor_ledger_entries", "Entries in the ledger replica.", ledger.get("entries", 0)
        )
        yield _gauge(
            "mtor_ledger_checkpoints", "Checkpoints in the ledger.", ledger.get("checkpoints", 0)
        )
        yield _gauge(
            "mtor_ledger_receipts", "Receipts the ledger holds.", ledger.get("receipts", 0)
        )
        yield _gauge(
            "mtor_ledger_staked_credits",
            "Credits staked by all peers.",
            ledger.get("staked", 0) / _NANO,
        )

    def _devices(self) -> Iterator[Any]:
        labels = ["index", "kind", "name"]
        info = InfoMetricFamily("mtor_device", "Devices this node lends.", labels=[*labels])
        total = GaugeMetricFamily("mtor_device_memory_total_bytes", "Device memory.", labels=labels)
        free = GaugeMetricFamily(
            "mtor_device_memory_free_bytes", "Device memory free.", labels=labels
        )
        util = GaugeMetricFamily(
            "mtor_device_utilisation_ratio",
            "Device utilisation (0-1; GPUs through NVML).",
            labels=labels,
        )
        for index, device in enumerate(self.node.devices):
            values = [str(index), device.kind, device.name]
            info.add_metric(
                values,
                {
                    "compute_capability": device.compute_capability or "",
                    "driver": device.driver or "",
                    "cores": "" if device.cores is None else str(device.cores),
                },
            )
            total.add_metric(values, device.mem_total)
            free.add_metric(values, device.mem_free)
            if device.utilization is not None:
                util.add_metric(values, device.utilization / 100)
        yield from (info, total, free, util)
        labels = ["gpu", "name", "pci_bus_id"]
        sensors = {
            "temperature_c": GaugeMetricFamily(
                "mtor_gpu_temperature_celsius", "GPU temperature (NVML).", labels=labels
            ),
            "power_w": GaugeMetricFamily(
                "mtor_gpu_power_watts", "GPU power draw (NVML).", labels=labels
            ),
            "utilisation": GaugeMetricFamily(
                "mtor_gpu_utilisation_ratio", "GPU utilisation (0-1, NVML).", labels=labels
            ),
            "memory_used": GaugeMetricFamily(
                "mtor_gpu_memory_used_bytes", "GPU memory in use (NVML).", labels=labels
            ),
        }
        for card in self.gpus:
            values = [str(card.index), card.name, card.pci_bus_id]
            for field_name, family in sensors.items():
                reading = getattr(card, field_name)
                if reading is not None:
                    family.add_metric(values, reading)
        yield from sensors.values()

    def _control(self) -> Iterator[Any]:
        server = self.node.control_server
        if server is None:
            return
        stats = server.stats
        yield _gauge("mtor_control_connections_open", "Control API connections open.", stats.open)
        yield _counter(
            "mtor_control_connections", "Control API connections accepted.", stats.accepted
        )
        yield _counter("mtor_control_requests", "Control API requests answered.", stats.requests)
        refused = CounterMetricFamily(
            "mtor_control_refused",
            "Control API connections or requests refused by the guards, by reason.",
            labels=["reason"],
        )
        refused.add_metric(["dropped_idle"], stats.dropped_idle)
        refused.add_metric(["head_timeout"], stats.head_timeouts)
        refused.add_metric(["busy"], stats.refused_busy)
        refused.add_metric(["unauthorized"], stats.unauthorized)
        yield refused
        yield _counter(
            "mtor_control_route_errors",
            "Control API routes that failed with a bug (answered 500).",
            stats.route_errors,
        )


class NodeMetrics:
    """A node's metrics registry: its collector and the process's (CPU, memory, files)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = NodeCollector(node)
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)
        #: The opt-in tokenless listener and its port, once :meth:`serve_listener` runs.
        self.listener: Any = None
        self.listen_port: int | None = None

    async def render(self) -> bytes:
        """The text exposition of every metric now (the ledger read off the event loop)."""
        self.collector.ledger = await self.node.runtime.run_blocking(self.node.ledger_summary)
        if any(device.kind == "gpu" for device in self.node.devices):
            self.collector.gpus = await self.node.runtime.run_blocking(read_gpu_sensors)
        return generate_latest(self.registry)

    async def route(self, query: dict[str, str], body: Any) -> tuple[int, Any]:
        """The control API's ``GET /metrics`` route."""
        from mtor_p2p.control import TextBody

        return 200, TextBody(await self.render(), CONTENT_TYPE)

    async def serve_listener(
        self, listen: str, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The operator's opt-in listener on ``listen`` (HOST:PORT): ``GET /metrics`` only,
        without the token, with the control API's other guards (deadlines, connection cap)."""
        from mtor_p2p.config import split_host_port
        from mtor_p2p.control import ControlServer

        host, port = split_host_port(listen)
        self.listener = ControlServer(None, {("GET", "/metrics"): self.route}, host=host)
        async with trio.open_nursery() as nursery:
            self.listen_port = await nursery.start(self.listener.serve, port)
            task_status.started(self.listen_port)
