"""The py-libp2p adapter of :class:`mtor_p2p.network.Network`: a hardened host.

This is the only module that imports ``libp2p``. It works around the pitfalls of py-libp2p
0.8.1 measured in ``shared/notes/dependencies.md`` (numbers below refer to that list):

1. An exception escaping a stream handler tears down the swarm: every handler, ours and the
   library's (identify, ping, DHT, pubsub), is wrapped in a guard that catches and resets.
2. ``connect()`` waits ~250 ms with 3 connections per peer: we allow one.
3. The default security set includes plaintext and secio: we offer Noise only.
4. Yamux resets a stream whose reader stalls for 5 s: request handlers read the whole request
   before doing any work, and requesters read the whole response. A request refused after
   its length prefix ("busy") has its body read and thrown away (bounded by the deadline),
   so that an honest requester gets its answer rather than a stall.
6/7. Routing tables are not filled from connections: connected peers are added explicitly, and
   random walk is on.
8. GossipSub's defaults drop messages and heart-beat every 120 s: heartbeat 1 s, no per-topic
   spam limit (our own validators and bounded buffers take that role). Capacity records are
   re-announced, so a dropped message costs latency, not correctness.
10. mplex hangs on large transfers: Yamux only.
13. Inbound connections are capped by default (at max_connections - min_connections):
   bootstrap nodes raise the limits and min_connections is 0.
15. (Measured here, not in the notes.) The swarm's AutoConnector aims at the midpoint of the
   connection watermarks (150+ connections by default) and starts a DHT random walk on every
   cycle in which it lacks candidates; 100 hosts in one process saturated both cores for
   minutes. It is switched off: the node keeps its own small mesh (``node.TARGET_CONNECTIONS``).
16. (Read in the 0.8.1 source, ``rcmgr/manager.py`` and ``network/connection/
   swarm_connection.py``.) The resource manager counts streams only globally (``max_streams``,
   inbound and outbound together; inbound streams beyond it queue on a semaphore, then are
   reset), has no per-peer stream limit in force, and accounts no memory for stream data.
   So per-peer limits (streams, announced request bytes) and the busy permit are ours, in
   :meth:`Libp2pNetwork.handle`, taken right after a request's length prefix and before its
   body is read. With one connection per peer they bound a connection as well.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetConn, INetStream, IRawConnection, ISecureConn
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.common import format_time_rfc3339
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.pb.kademlia_pb2 import Record
from libp2p.kad_dht.utils import sort_peer_ids_by_distance
from libp2p.network.config import ConnectionConfig
from libp2p.network.connection.exceptions import RawConnError
from libp2p.network.connection.swarm_connection import SwarmConn
from libp2p.network.stream.exceptions import StreamEOF, StreamError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.rcmgr import ResourceManager
from libp2p.rcmgr.manager import ResourceLimits
from libp2p.records.validator import Validator
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.exceptions import MuxedStreamError
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service

from mtor_p2p.identity import Identity
from mtor_p2p.lane import (
    LANE_PROTOCOL,
    SECRET_BYTES,
    STATUS_ERROR,
    STATUS_OK,
    STATUS_RESET,
    STATUS_UNSUPPORTED,
    TICKET_BYTES,
    ClientLane,
    LaneClient,
    LaneError,
    LaneServer,
    ServerLane,
    read_deadline,
)
from mtor_p2p.libp2p_nat import (
    DIRECT_WAIT_S,
    RELAYED_MAX_REQUEST_BYTES,
    RELAYED_MAX_RESPONSE_BYTES,
    NatSettings,
    NatTraversal,
    conn_list,
    connection_kind_of,
    is_relayed,
    remote_of,
)
from mtor_p2p.memory import tune_for_large_messages
from mtor_p2p.network import (
    DEFAULT_MAX_PENDING_BYTES_PER_PEER,
    DEFAULT_MAX_PENDING_BYTES_TOTAL,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_MAX_RESPONSE_BYTES,
    DEFAULT_MAX_STREAMS_PER_PEER,
    FIRST_BODY_BYTES_S,
    MAX_ANSWER_BYTES_IN_HAND_PER_PEER,
    MAX_ANSWER_BYTES_IN_HAND_TOTAL,
    MAX_ERROR_BYTES,
    MIN_REQUEST_BYTES_PER_S,
    PENALTY_BASE_S,
    PENALTY_MAX_S,
    REQUEST_GRACE_S,
    DhtValidator,
    HostStats,
    Message,
    NetworkError,
    Payload,
    PeerMisbehaved,
    RemoteError,
    RequestHandler,
    RoundTrips,
    TopicValidator,
    is_loopback_ip,
    remote_reason,
)
from mtor_p2p.wire import ABSOLUTE_MAX_RECORD_BYTES

log = logging.getLogger(__name__)

GOSSIPSUB_PROTOCOLS = [TProtocol("/meshsub/1.1.0"), TProtocol("/meshsub/1.2.0")]
_LENGTH = struct.Struct(">I")
# Streams and lanes share the status byte's meanings.
_STATUS_OK = STATUS_OK
_STATUS_ERROR = STATUS_ERROR
_READ_CHUNK = 64 * 1024
#: Peers remembered under a slowness back-off (the oldest forgotten first).
MAX_PENALISED_PEERS = 4096
#: A refused lane request's body is read and dropped (not decrypted) up to this size; a
#: larger one closes the lane. Honest requests are at most a compute chunk (4 MiB).
MAX_SKIPPED_BODY_BYTES = 64 << 20
LANE_MODES = ("auto", "eager", "off")
MAX_TICKET_REPLY_BYTES = 512
#: DHT gets (see Libp2pNetwork._get_value): valid values that decide, queries in flight at
#: once, queries at most, and each query's deadline.
DHT_GET_QUORUM = 3
DHT_GET_PARALLEL = 4
DHT_BUCKET_SIZE = 20
DHT_GET_MAX_QUERIES = 3 * DHT_BUCKET_SIZE
DHT_QUERY_TIMEOUT_S = 3.0
#: MTOR's own GET_VALUE, served on lanes (see Libp2pNetwork._ask_for_value).
DHT_GET_PROTOCOL = "/mtor/dht/get/1"
DHT_GET_MAX_KEY_BYTES = 1024
DHT_GET_MAX_REPLY_BYTES = 256 * 1024
KADEMLIA_ONLY_S = 600.0
DHT_QUORUM_GRACE_MIN_S = 0.002
DHT_QUORUM_GRACE_MAX_S = 0.025
#: MTOR's own PUT_VALUE, served on lanes (see Libp2pNetwork._put_value): the key's length
#: (2 bytes, big-endian), the key, then the value. Answered DHT_PUT_STORED or DHT_PUT_KEPT.
DHT_PUT_PROTOCOL = "/mtor/dht/put/1"
DHT_PUT_STORED = b"stored"
DHT_PUT_KEPT = b"kept"
DHT_PUT_MAX_VALUE_BYTES = ABSOLUTE_MAX_RECORD_BYTES
_DHT_KEY_LENGTH = struct.Struct(">H")
#: A put's lookup step, served on lanes (see Libp2pNetwork._ask_closest): the closest peers a
#: host knows to a key, with up to DHT_ADDRS_PER_PEER addresses each (of at most
#: DHT_ADDR_MAX_CHARS), so that the lookup can dial the peers it learns of, as FIND_NODE's
#: answers allow. A request of its own: gets keep DHT_GET_PROTOCOL's answers without
#: addresses, which cost them time (docs/peer.md, "DHT puts").
DHT_CLOSEST_PROTOCOL = "/mtor/dht/closest/1"
DHT_ADDRS_PER_PEER = 8
DHT_ADDR_MAX_CHARS = 256
#: How long a lookup keeps an address it was given for a peer it then asks (seconds).
DHT_ADDRS_TTL_S = 600
#: How long a put's lookup may take at most; the value then goes to the closest peers that
#: answered (see Libp2pNetwork._closest_peers).
DHT_PUT_LOOKUP_S = 2.0
#: A lookup query unanswered this long no longer holds one of its DHT_GET_PARALLEL slots.
DHT_LOOKUP_SLOW_S = DHT_PUT_LOOKUP_S / 8


@dataclass
class _Service:
    """One protocol's handler and limits, served on streams and lanes alike."""

    handler: RequestHandler
    max_request_bytes: int
    timeout: float
    #: Requests of this protocol handled at once; more are refused "busy".
    busy: trio.Semaphore
    #: The largest answer its handler makes, reserved before it runs (_take_answer_room);
    #: 0: small answers, not counted.
    max_answer_bytes: int = 0


@dataclass
class _Lookup:
    """What a put's lookup (:meth:`Libp2pNetwork._closest_peers`) found by its deadline."""

    #: The peers to store at now, closest first.
    closest: list[ID]
    #: The queries still open, by peer: a late answer is passed on unless cancelled.
    still_asking: dict[ID, trio.CancelScope]


@dataclass
class HostSettings:
    """How to build a host. Defaults suit an ordinary peer on loopback or a LAN."""

    listen_addrs: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    #: Extra addresses to advertise (an ngrok tunnel's public address, for example).
    announce_addrs: list[str] = field(default_factory=list)
    #: Bootstrap and relay nodes accept many more inbound connections (pitfall 13).
    bootstrap_node: bool = False
    max_connections: int = 300
    dial_timeout: float = 5.0
    #: Inbound requests handled at once, per protocol; more are refused with "busy". A
    #: request takes its permit after its length prefix, before its body is read.
    max_concurrent_requests: int = 64
    #: Inbound request streams one peer may have open at once, all protocols together.
    max_streams_per_peer: int = DEFAULT_MAX_STREAMS_PER_PEER
    #: Announced bytes of one peer's admitted requests (being read or handled) at once.
    max_pending_bytes_per_peer: int = DEFAULT_MAX_PENDING_BYTES_PER_PEER
    #: Announced request bytes admitted from all peers together.
    max_pending_bytes_total: int = DEFAULT_MAX_PENDING_BYTES_TOTAL
    gossip_heartbeat_seconds: int = 1
    routing_table_fill_interval: float = 1.0
    #: Lanes (mtor_p2p/lane.py): requests to a peer travel over one sealed TCP connection
    #: once it is open, at socket speed, instead of a Yamux stream each. "auto": the first
    #: request to a peer goes on a stream while its lane opens in the background; "eager":
    #: the first request waits for the lane (streams if it fails); "off": streams only.
    lanes: str = "auto"
    #: TCP port of the lane listener (0: any free port; peers learn it with their ticket).
    lane_port: int = 0
    #: NAT traversal (mtor_p2p/libp2p_nat.py): reachability checks, relays, hole punching.
    #: None: off (in-process test hosts); real nodes turn it on.
    nat: NatSettings | None = None
    #: Peer IDs of the bootstrap list: the first relays a private node tries.
    bootstrap_peer_ids: list[str] = field(default_factory=list)

    def effective_max_connections(self) -> int:
        """Connection limit in force: bootstrap nodes get at least 4096."""
        return max(self.max_connections, 4096) if self.bootstrap_node else self.max_connections


class _DhtValidatorBridge(Validator):
    """Adapts our :class:`DhtValidator` to py-libp2p's ``Validator`` base class."""

    def __init__(self, inner: DhtValidator) -> None:
        self._inner = inner

    def validate(self, key: str, value: bytes) -> None:
        self._inner.validate(key, value)

    def select(self, key: str, values: list[bytes]) -> int:
        return self._inner.select(key, values)


async def _read_exactly(stream: INetStream, size: int) -> bytes:
    """Read exactly ``size`` bytes, or raise NetworkError if the stream ends first."""
    chunks: list[bytes] = []
    remaining = size
    while remaining:
        try:
            chunk = await stream.read(min(remaining, _READ_CHUNK))
        except StreamEOF as exc:
            raise NetworkError(f"stream ended {remaining} bytes early") from exc
        if not chunk:
            raise NetworkError(f"stream ended {remaining} bytes early")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


async def _discard(stream: INetStream, size: int) -> None:
    """Read and drop up to ``size`` bytes (a refused request's body) without keeping them."""
    remaining = size
    while remaining > 0:
        try:
            chunk = await stream.read(min(remaining, _READ_CHUNK))
        except (StreamEOF, StreamError):
            return
        if not chunk:
            return
        remaining -= len(chunk)


class _PeerRequests:
    """Inbound requests per remote peer: open streams and admitted (announced) bytes."""

    def __init__(self, max_streams: int, max_bytes: int, max_total: int, stats: HostStats) -> None:
        self._max_streams = max_streams
        self._max_bytes = max_bytes
        self._max_total = max_total
        #: peer -> (trio time its back-off ends, cuts so far); bounded, oldest dropped.
        self._penalties: dict[str, tuple[float, int]] = {}
        self._stats = stats
        #: peer -> [open streams, admitted bytes]; a peer leaves when both are zero, so the
        #: table never holds more peers than there are streams open.
        self._open: dict[str, list[int]] = {}

    def penalised(self, peer: str) -> bool:
        """True while ``peer`` serves the back-off of a cut for slowness."""
        entry = self._penalties.get(peer)
        return entry is not None and trio.current_time() < entry[0]

    def penalise(self, peer: str) -> None:
        """``peer`` was cut for slowness: refuse it for a back-off that doubles per cut."""
        _, cuts = self._penalties.pop(peer, (0.0, 0))
        cuts += 1
        seconds = min(PENALTY_MAX_S, PENALTY_BASE_S * 2 ** (cuts - 1))
        self._penalties[peer] = (trio.current_time() + seconds, cuts)
        while len(self._penalties) > MAX_PENALISED_PEERS:
            del self._penalties[next(iter(self._penalties))]

    def open_stream(self, peer: str) -> bool:
        counts = self._open.setdefault(peer, [0, 0])
        if counts[0] >= self._max_streams:
            return False
        counts[0] += 1
        return True

    def close_stream(self, peer: str) -> None:
        counts = self._open[peer]
        counts[0] -= 1
        if counts == [0, 0]:
            del self._open[peer]

    def fits(self, peer: str, size: int) -> bool:
        """Whether ``size`` more bytes stay within the peer's budget."""
        return self._open[peer][1] + size <= self._max_bytes

    def fits_total(self, size: int) -> bool:
        """Whether ``size`` more bytes stay within the budget of all peers together."""
        return self._stats.request_bytes_pending + size <= self._max_total

    def admit(self, peer: str, size: int) -> None:
        """Count ``size`` bytes of the peer's as held (see :meth:`fits`)."""
        self._open[peer][1] += size
        stats = self._stats
        stats.request_bytes_pending += size
        stats.request_bytes_pending_peak = max(
            stats.request_bytes_pending_peak, stats.request_bytes_pending
        )

    def release(self, peer: str, size: int) -> None:
        self._open[peer][1] -= size
        self._stats.request_bytes_pending -= size


#: The longest one write to a peer's connection may take (a Yamux frame of 64 KiB at the
#: minimum rate, :class:`_WholeWritesNoise`): a reset waits behind at most that many writes'
#: worth before it is given up, and a stream open overruns its caller's deadline by at most it.
ONE_WRITE_S = read_deadline(64 * 1024 + 12)


async def _reset_quietly(stream: INetStream) -> None:
    """Reset ``stream``, shielded from the caller's cancellation: a reset given up while it
    waited behind other writes left the stream and its Yamux slot in place."""
    with trio.CancelScope(shield=True), trio.move_on_after(2 * ONE_WRITE_S):
        try:
            await stream.reset()
        except Exception:  # the stream may already be gone; nothing more to do
            pass


def _disable_auto_connector(host: IHost) -> None:
    """Pitfall 15: turn the swarm's AutoConnector into a no-op."""

    async def no_auto_connect() -> None:
        return None

    auto_connector = getattr(host.get_network(), "auto_connector", None)
    if auto_connector is not None:
        auto_connector.maybe_connect = no_auto_connect


def _parse_dht_reply(reply: bytes) -> tuple[bytes | None, list[ID]]:
    """Decode a :data:`DHT_GET_PROTOCOL` answer (the caller validates the value)."""
    try:
        answer = json.loads(reply)
        encoded = answer["value"]
        value = None if encoded is None else base64.b64decode(encoded, validate=True)
        closer = [ID.from_base58(p) for p in answer["closer"][:DHT_BUCKET_SIZE]]
    except Exception as exc:
        raise PeerMisbehaved(f"malformed DHT answer: {type(exc).__name__}") from exc
    return value, closer


def _parse_closest_reply(reply: bytes) -> tuple[list[ID], dict[ID, list[multiaddr.Multiaddr]]]:
    """Decode a :data:`DHT_CLOSEST_PROTOCOL` answer: the closer peers (at most
    DHT_BUCKET_SIZE) and the addresses it gave for them (at most DHT_ADDRS_PER_PEER each; one
    that is too long or does not parse is skipped, as Kademlia's own lookups skip it)."""
    try:
        answer = json.loads(reply)
        closer = [ID.from_base58(p) for p in answer["closer"][:DHT_BUCKET_SIZE]]
        given = answer["addrs"]
        if not isinstance(given, dict):
            raise TypeError("addrs is not an object")
    except Exception as exc:
        raise PeerMisbehaved(f"malformed DHT answer: {type(exc).__name__}") from exc
    addrs: dict[ID, list[multiaddr.Multiaddr]] = {}
    for peer in closer:
        texts = given.get(str(peer))
        if not isinstance(texts, list):
            continue
        parsed = []
        for text in texts[:DHT_ADDRS_PER_PEER]:
            if isinstance(text, str) and len(text) <= DHT_ADDR_MAX_CHARS:
                try:
                    parsed.append(multiaddr.Multiaddr(text))
                except Exception:
                    continue
        if parsed:
            addrs[peer] = parsed
    return closer, addrs


def _penalise(until: dict[str, float], name: str, seconds: float) -> None:
    """Mark ``name`` in ``until`` for ``seconds`` from now (the oldest mark forgotten first,
    past MAX_PENALISED_PEERS)."""
    until.pop(name, None)
    until[name] = trio.current_time() + seconds
    while len(until) > MAX_PENALISED_PEERS:
        del until[next(iter(until))]


def _key_to_provider_key(key: str) -> str:
    # py-libp2p accepts a hex multihash for provider keys; use sha2-256 of our key.
    return "1220" + hashlib.sha256(key.encode()).hexdigest()


#: py-libp2p's loggers whose WARNING and ERROR lines report failures that peers cause and
#: MTOR handles (a dial to an address that no longer answers, a protocol a peer lacks, a
#: relay's stream closed, a hole punch that did not land).
PEER_FAILURE_LOGGERS = (
    "libp2p.transport.tcp.tcp",
    "libp2p.host.basic_host",
    "libp2p.network.swarm",
    "libp2p.kad_dht.utils",
    # "Failed to store value at peer X: " and "Failed to get value from peer X: ", often with
    # an empty reason (a timeout's), for peers that left: 4-7 a devnet peer, and more for a
    # peer stopped cleanly (a new user's walkthrough). MTOR's own puts and gets say what failed.
    "libp2p.kad_dht.value_store",
    # "Failed to open stream to X: unable to connect ..." and "... recently failed all
    # addresses (negative cache)": a lookup asking a peer that has left (every devnet peer,
    # once a new user's library example had stopped; a walkthrough of 2026-12-07).
    "libp2p.kad_dht.peer_routing",
    *(
        f"libp2p.relay.circuit_v2.{name}"
        for name in ("dcutr", "discovery", "nat", "protocol", "resources", "transport", "utils")
    ),
)


class _PeerFailuresUnheard(logging.Filter):
    """Drops a peer-caused failure's line (see PEER_FAILURE_LOGGERS, WARNING to ERROR) that
    no handler would take but Python's last-resort one, which prints it bare on stderr; any
    handler anywhere on its way (the program's, ``mtor-peer``'s) gets it unchanged. Decided
    per line, so logging set up after the host started is honoured."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not logging.WARNING <= record.levelno < logging.CRITICAL:
            return True
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None:  # as Logger.callHandlers walks it
            if logger.handlers:
                return True
            if not logger.propagate:
                return False
            logger = logger.parent
        return False


def quiet_peer_failures_when_embedded() -> None:
    """In a program that embeds the library and leaves py-libp2p's logging as py-libp2p set it
    up (no handler, no propagation), its warnings reached Python's bare last-resort handler: a
    library example printed eight "Failed to open TCP stream: ..." lines, without a logger's
    name, for a devnet peer that had been stopped, though the job went on and succeeded (a
    new user's walkthrough). Such lines are now dropped when nothing else would take them
    (:class:`_PeerFailuresUnheard`); a program that sets up logging, and ``mtor-peer``, get
    them as before. Idempotent."""
    for name in PEER_FAILURE_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _PeerFailuresUnheard) for f in logger.filters):
            logger.addFilter(_PeerFailuresUnheard())


#: How long opening a stream may take once begun (it is not cancelled part-way, see
#: :func:`_new_stream_whole`): it waits behind other writes on the connection, each bounded
#: by its size (:class:`_WholeWritesNoise`).
STREAM_OPEN_STALL_S = 20.0


class _WholeWritesNoise(NoiseTransport):
    """Noise whose sessions write each message whole or close the connection.

    py-libp2p's Noise session encrypts (advancing its nonce) and then writes, and a large
    message goes out as several Noise frames. A request cancelled at its deadline while its
    task was writing (a Yamux SYN, a window update, a frame of its payload) left the nonce
    ahead of what the peer had received, or half a frame on the wire: the peer could decrypt
    nothing more, and every later request on that connection failed ("failed to open a
    stream"; pitfall 16). One request's deadline must cost that request only, so a write, once
    begun, finishes, shielded from the caller's cancellation, which takes effect at its next
    checkpoint. A peer must read it at the lanes' minimum rate (:func:`read_deadline` of its
    size), or the connection is closed: part of it may be on the wire.
    """

    async def secure_inbound(self, conn: IRawConnection) -> ISecureConn:
        return _whole_writes(await super().secure_inbound(conn))

    async def secure_outbound(self, conn: IRawConnection, peer_id: ID) -> ISecureConn:
        return _whole_writes(await super().secure_outbound(conn, peer_id))


def _whole_writes(session: ISecureConn) -> ISecureConn:
    """Make ``session.write`` finish what it began (see :class:`_WholeWritesNoise`)."""
    write = session.write

    async def write_whole(data: bytes) -> None:
        allowed = read_deadline(len(data))
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + allowed
            await write(data)
        if scope.cancelled_caught:
            # Part of a message may be on the wire: nothing more can be sent after it.
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await session.close()
            raise RawConnError(
                f"the peer did not read {len(data)} bytes in {allowed:.1f} s: connection closed"
            )

    session.write = write_whole  # type: ignore[method-assign]
    return session


async def _new_stream_whole(
    conn: INetConn, new_stream: Callable[[], Awaitable[INetStream]]
) -> INetStream:
    """``conn``'s ``new_stream`` (the library's, ``new_stream``), finished once begun
    (pitfall 17).

    py-libp2p's Yamux takes a backlog slot, registers the stream, then writes its SYN; the
    swarm then wraps the stream and registers it in turn. A request cancelled at its deadline
    in between lost the stream with its slot: never announced, it held the slot for the
    connection's life (40 of Yamux's 256 were gone after 400 requests with deadlines of
    0-4 ms; with none left, every later request to that peer waits out its deadline), and
    announced but never negotiated, it held the slot and a negotiation at the peer until the
    peer's negotiation timeout (30 s). The wait for a free slot can still be cancelled; the
    open then overruns its caller's deadline by one write (:data:`ONE_WRITE_S`) at most.
    """
    backlog: trio.Semaphore | None = getattr(conn.muxed_conn, "stream_backlog_semaphore", None)
    # A caller already past its deadline ends here, with nothing taken (past it by more than
    # one write, the shielded open below would fail at once as if stalled).
    await trio.lowlevel.checkpoint_if_cancelled()
    # Wait for a free slot where the wait can be cancelled. A slot given back goes to the
    # next waiter, if any (trio's semaphores hand over): wait again until one is free, so
    # that taking it inside the shield, with no checkpoint before, does not wait.
    while backlog is not None and backlog.value == 0:
        await backlog.acquire()
        backlog.release()
    # Past the caller's deadline by one write at most (a SYN behind other writes).
    limit = min(
        trio.current_time() + STREAM_OPEN_STALL_S,
        trio.current_effective_deadline() + ONE_WRITE_S,
    )
    with trio.CancelScope(shield=True, deadline=limit) as scope:
        stream = await new_stream()
    if scope.cancelled_caught:
        # The SYN waited behind other writes for that long (py-libp2p then keeps the slot: a
        # cost that stays with this connection's slow peer).
        raise MuxedStreamError("opening a stream stalled behind other writes")
    try:
        await trio.lowlevel.checkpoint_if_cancelled()
    except BaseException:
        # The caller's deadline passed meanwhile: free the stream now.
        await _reset_quietly(stream)
        raise
    return stream


def _open_streams_whole(swarm: Any) -> None:
    """Make every connection of ``swarm`` open its streams through :func:`_new_stream_whole`.

    The library's ``SwarmConn.new_stream`` is wrapped once per process, and the wrapper takes
    the whole path only for connections of a swarm marked here: other hosts in the process
    (a test's plain py-libp2p peer) keep the library's. A class-level wrap, not one per
    connection: a connection is in use before ``Swarm.add_conn`` returns (its "connected"
    notifications open streams), and a wrap applied on its return left those unguarded.
    Idempotent."""
    swarm._mtor_opens_whole = True
    if getattr(SwarmConn.new_stream, "_mtor_whole", False):
        return
    library_new_stream = SwarmConn.new_stream

    async def new_stream(self: SwarmConn) -> INetStream:
        if not getattr(self.swarm, "_mtor_opens_whole", False):
            return await library_new_stream(self)
        return await _new_stream_whole(self, lambda: library_new_stream(self))

    new_stream._mtor_whole = True  # type: ignore[attr-defined]
    SwarmConn.new_stream = new_stream  # type: ignore[method-assign]


#: How long closing the listeners may take as a host stops.
LISTENER_CLOSE_S = 5.0


async def _close_listeners(host: IHost) -> None:
    """Close the swarm's listening sockets as the host stops (pitfall 19).

    py-libp2p closes them from its swarm's stop, inside the scope being cancelled: the close
    takes a lock first, the cancellation stops it there, and the listening socket (served by
    a system task, which nothing cancels) stays open for the life of the process. Its
    listeners set SO_REUSEPORT, so a host opened again on that port in the same process
    shared it with the dead one: connections the kernel handed to the old socket were reset
    ("Cannot schedule task after service has stopped"), most reconnections within a second
    in a probe. Closed here as the host stops, after its services and before py-libp2p's own
    stop, shielded and bounded."""
    swarm = host.get_network()
    listeners = list(getattr(swarm, "listeners", {}).values())
    with trio.CancelScope(shield=True), trio.move_on_after(LISTENER_CLOSE_S):
        for listener in listeners:
            try:
                await listener.close()
            except Exception as exc:  # closing what is left must not mask the stop's cause
                log.debug("closing a listener: %s: %s", type(exc).__name__, exc)


class Libp2pNetwork:
    """A running py-libp2p host with DHT and GossipSub, behind the :class:`Network` port."""

    def __init__(
        self, host: IHost, dht: KadDHT, pubsub: Pubsub, settings: HostSettings, identity: Identity
    ) -> None:
        self._host = host
        self._dht = dht
        self._pubsub = pubsub
        self._settings = settings
        self._identity = identity
        self._nursery: trio.Nursery | None = None
        self._subscriptions: dict[str, list[trio.MemorySendChannel[Message]]] = {}
        self.stats = HostStats()
        self._services: dict[str, _Service] = {}
        #: Peers that failed DHT_GET_PROTOCOL -> until when they are asked with Kademlia
        #: instead (the oldest forgotten first).
        self._kademlia_only: dict[str, float] = {}
        #: Peers that serve neither DHT_CLOSEST_PROTOCOL nor DHT_PUT_PROTOCOL (MTOR before
        #: them, other implementations) -> until when puts use DHT_GET_PROTOCOL and Kademlia.
        self._no_mtor_put: dict[str, float] = {}
        #: Peers whose DHT answer did not parse -> until when lookups leave them out (the
        #: cost of a malformed answer to its sender; the oldest forgotten first).
        self._dht_misbehaved: dict[str, float] = {}
        #: A peer that sent a DHT put or lookup is being added to the routing table.
        self._learning_dht_peer = False
        self._lane_server: LaneServer | None = None
        #: NAT traversal, when settings.nat is set (started by :meth:`open`).
        self.nat: NatTraversal | None = None
        self._lane_client: LaneClient | None = None
        #: Bytes of answers made and not yet sent, by peer (_take_answer_room).
        self._answers_in_hand: dict[str, int] = {}
        self._peer_requests = _PeerRequests(
            settings.max_streams_per_peer,
            settings.max_pending_bytes_per_peer,
            settings.max_pending_bytes_total,
            self.stats,
        )
        #: Our small requests' round trips, per peer (see round_trip).
        self.round_trips = RoundTrips()

    # -- construction ----------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def open(
        cls, identity: Identity, settings: HostSettings | None = None
    ) -> AsyncIterator[Libp2pNetwork]:
        """Start a host listening on ``settings.listen_addrs``; stop it on exit."""
        settings = settings or HostSettings()
        quiet_peer_failures_when_embedded()
        # Messages of megabytes arrive as new bytes objects and jobs allocate large outputs:
        # keep freed memory for reuse, and fault fresh pages in without on-the-spot
        # compaction (mtor_p2p/memory.py).
        tune_for_large_messages()
        key_pair = create_new_key_pair(identity.seed)
        # Our circuit addresses (through relays we reserved on; NAT traversal keeps the list)
        # join the announced ones in identify and in our records.
        circuit_addrs: list[str] = []
        max_conns = settings.effective_max_connections()
        host = new_host(
            key_pair=key_pair,
            sec_opt={
                NOISE_PROTOCOL_ID: _WholeWritesNoise(
                    key_pair, noise_privkey=create_x25519_key_pair().private_key
                )
            },
            muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
            connection_config=ConnectionConfig(
                max_connections_per_peer=1,
                max_connections=max_conns,
                min_connections=0,
                high_watermark=max_conns,
                low_watermark=min(100, max_conns // 2),
                dial_timeout=settings.dial_timeout,
            ),
            resource_manager=ResourceManager(
                limits=ResourceLimits(max_connections=max(1000, 2 * max_conns))
            ),
            # Announced addresses (a tunnel's) go into identify as well as our records.
            addrs_factory=lambda found: (
                found + [multiaddr.Multiaddr(a) for a in settings.announce_addrs]
            ),
        )
        # Circuit addresses bypass the factory: get_addrs() cuts an address at its first
        # /p2p/ part, which in a circuit address is the relay's (the result would send
        # dialers to the relay's address expecting us). They are complete already.
        factory_addrs = host.get_addrs

        def addrs_with_circuits() -> list[multiaddr.Multiaddr]:
            return factory_addrs() + [multiaddr.Multiaddr(a) for a in circuit_addrs]

        host.get_addrs = addrs_with_circuits  # type: ignore[method-assign]
        _disable_auto_connector(host)
        _open_streams_whole(host.get_network())
        if str(host.get_id()) != identity.peer_id:
            raise RuntimeError("libp2p derived a different peer ID from our key")
        listen = [multiaddr.Multiaddr(a) for a in settings.listen_addrs]
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(host.run(listen))
            stack.push_async_callback(_close_listeners, host)
            # strict_validation: only namespaces with a validator are stored, so a remote peer
            # cannot fill our value store with keys nobody checks.
            dht = KadDHT(host, DHTMode.SERVER, enable_random_walk=True, strict_validation=True)
            gossipsub = GossipSub(
                protocols=GOSSIPSUB_PROTOCOLS,
                degree=6,
                degree_low=4,
                degree_high=12,
                heartbeat_interval=settings.gossip_heartbeat_seconds,
                spam_protection_enabled=False,
                # Loopback devnets put every peer on one IP; diversity rules would starve the mesh.
                eclipse_protection_enabled=False,
            )
            pubsub = Pubsub(host, gossipsub)
            await stack.enter_async_context(background_trio_service(dht))
            await stack.enter_async_context(background_trio_service(pubsub))
            await stack.enter_async_context(background_trio_service(gossipsub))
            with trio.fail_after(10):
                await pubsub.wait_until_ready()
            network = cls(host, dht, pubsub, settings, identity)
            network._guard_existing_handlers()
            network.handle(
                DHT_GET_PROTOCOL,
                network._serve_dht_get,
                max_request_bytes=DHT_GET_MAX_KEY_BYTES,
                timeout=5.0,
            )
            network.handle(
                DHT_CLOSEST_PROTOCOL,
                network._serve_dht_closest,
                max_request_bytes=DHT_GET_MAX_KEY_BYTES,
                timeout=5.0,
            )
            network.handle(
                DHT_PUT_PROTOCOL,
                network._serve_dht_put,
                max_request_bytes=_DHT_KEY_LENGTH.size
                + DHT_GET_MAX_KEY_BYTES
                + DHT_PUT_MAX_VALUE_BYTES,
                timeout=5.0,
            )
            async with trio.open_nursery() as nursery:
                network._nursery = nursery
                nursery.start_soon(network._fill_routing_table)
                if settings.lanes not in LANE_MODES:
                    raise ValueError(f"lanes must be one of {LANE_MODES}, not {settings.lanes!r}")
                if settings.lanes != "off":
                    await network._start_lanes(nursery, listen)
                nat: Any = nullcontext(None)
                if settings.nat is not None:
                    nat = NatTraversal(
                        host,
                        network,
                        settings.nat,
                        bootstrap_node=settings.bootstrap_node,
                        bootstrap_peers=lambda: list(settings.bootstrap_peer_ids),
                        circuit_addrs=circuit_addrs,
                    ).running()
                try:
                    # NAT traversal stops before the nursery is cancelled: its clean-up
                    # awaits, and a Cancelled there would replace the exception leaving the
                    # body (the caller would see its error vanish).
                    async with nat as network.nat:
                        yield network
                finally:
                    nursery.cancel_scope.cancel()
                    for channels in network._subscriptions.values():
                        for channel in channels:
                            channel.close()
                    # py-libp2p's host leaves its connections open when it stops: in a process
                    # that goes on (an embedding application, tests), peers would keep them,
                    # and whatever they hold for us (a relay reservation), until a timeout.
                    with trio.CancelScope(shield=True), trio.move_on_after(1):
                        await network._close_connections()

    async def _close_connections(self) -> None:
        async def close(conn: Any) -> None:
            try:
                await conn.close()
            except Exception as exc:  # closing is best effort
                log.debug("closing a connection failed: %s", exc)

        # At once: each close waits for its muxer (about 0.2 s).
        async with trio.open_nursery() as nursery:
            for conns in list(self._host.get_network().connections.values()):
                for conn in list(conns) if isinstance(conns, list) else [conns]:
                    nursery.start_soon(close, conn)

    async def _start_lanes(self, nursery: trio.Nursery, listen: list[multiaddr.Multiaddr]) -> None:
        """Listen for lanes on the IP addresses the host listens on, and serve tickets."""
        hosts = []
        for addr in listen:
            for proto in ("ip4", "ip6"):
                try:
                    hosts.append(addr.value_for_protocol(proto))
                except Exception:
                    continue
        hosts = list(dict.fromkeys(h for h in hosts if h))
        if not hosts:
            return
        server = LaneServer(self.peer_id, self._serve_lane_request, self.stats)
        await server.listen(hosts, self._settings.lane_port)
        await server.serve(nursery)
        self._lane_server = server
        self.handle(LANE_PROTOCOL, self._issue_ticket, max_request_bytes=64, timeout=5.0)
        self._lane_client = LaneClient(self.peer_id, self._fetch_ticket, self.stats)
        self._lane_client.attach(nursery)

    def lane_port(self) -> int | None:
        """The port lanes are served on (None: lanes are off)."""
        return self._lane_server.port if self._lane_server is not None else None

    # -- guards ----------------------------------------------------------------------------

    def _guard(self, protocol: str, handler: Any) -> Any:
        async def guarded(stream: INetStream) -> None:
            try:
                await handler(stream)
            except Exception as exc:  # whatever a remote peer causes stays in this stream
                self.stats.handler_errors += 1
                log.info("handler for %s failed: %s: %s", protocol, type(exc).__name__, exc)
                await _reset_quietly(stream)

        guarded.__mtor_guarded__ = True  # type: ignore[attr-defined]
        return guarded

    def _guard_existing_handlers(self) -> None:
        """Wrap the library's own handlers (identify, ping, DHT, pubsub) in the guard."""
        handlers = self._host.get_mux().handlers
        for protocol, handler in list(handlers.items()):
            if protocol is None or handler is None or getattr(handler, "__mtor_guarded__", False):
                continue
            handlers[protocol] = self._guard(str(protocol), handler)

    async def _fill_routing_table(self) -> None:
        # Pitfall 7: connections do not populate the routing table; add connected peers ourselves.
        while True:
            for peer in self._host.get_connected_peers():
                if not self._dht.routing_table.peer_in_table(peer):
                    try:
                        await self._dht.add_peer(peer)
                    except Exception as exc:  # the peer may be mid-handshake or gone
                        log.debug("routing table add failed for %s: %s", peer, exc)
            await trio.sleep(self._settings.routing_table_fill_interval)

    # -- identity and addresses ------------------------------------------------------------

    @property
    def peer_id(self) -> str:
        """This node's peer ID."""
        return self._identity.peer_id

    def addrs(self) -> list[str]:
        """Listen and announced addresses, each ending in ``/p2p/<id>``."""
        return list(dict.fromkeys(str(a) for a in self._host.get_addrs()))

    def listen_ports(self) -> list[int]:
        """TCP ports the host listens on (for tunnels)."""
        ports = []
        for addr in self._host.get_transport_addrs():
            try:
                ports.append(int(addr.value_for_protocol("tcp")))
            except Exception:
                continue
        return ports

    def add_announce_addr(self, addr: str) -> None:
        """Advertise an extra address (a tunnel's public address) in identify and records."""
        bare = addr.split("/p2p/")[0]
        if bare not in self._settings.announce_addrs:
            self._settings.announce_addrs.append(bare)

    def remove_announce_addr(self, addr: str) -> None:
        """Stop advertising ``addr`` (a tunnel that was closed)."""
        bare = addr.split("/p2p/")[0]
        if bare in self._settings.announce_addrs:
            self._settings.announce_addrs.remove(bare)

    def connected_peers(self) -> list[str]:
        """Peer IDs with an open connection."""
        return [str(p) for p in self._host.get_connected_peers()]

    def peer_addrs(self, peer_id: str) -> list[str]:
        """Addresses the peerstore holds for ``peer_id``."""
        try:
            return [str(a) for a in self._host.get_peerstore().addrs(ID.from_base58(peer_id))]
        except Exception:
            return []

    def connection_kind(self, peer_id: str) -> str:
        """``"direct"``, ``"relayed"`` (every open connection to ``peer_id`` goes through a
        circuit relay) or ``"none"`` (:class:`~mtor_p2p.network.PeerLinks`)."""
        try:
            pid = ID.from_base58(peer_id)
        except Exception:  # not a peer ID: nothing is connected under it
            return "none"
        return connection_kind_of(self._host.get_network().connections.get(pid))

    def same_host(self, peer_id: str) -> bool:
        """Whether ``peer_id`` is on this machine, as far as this node can tell: its open lane,
        else a direct connection this node dialled, is on a loopback address
        (:class:`~mtor_p2p.network.PeerLinks`). Only connections we made count: a peer
        reaching us through an ngrok agent arrives from 127.0.0.1 without being here. A
        peer may claim anything; callers use this only to try a path that checks for itself
        (mtor_p2p/compute/local_share.py)."""
        lane = self._lane_client.peek(peer_id) if self._lane_client is not None else None
        if lane is not None:
            return lane.lane.loopback
        try:
            conns = conn_list(self._host.get_network().connections.get(ID.from_base58(peer_id)))
        except Exception:  # not a peer ID
            return False
        for conn in conns:
            dialled = getattr(getattr(conn, "muxed_conn", None), "is_initiator", False)
            remote = None if conn.is_closed or is_relayed(conn) else remote_of(conn)
            if remote is not None and dialled is True:
                return is_loopback_ip(remote[0])
        return False

    def round_trip(self, peer_id: str) -> float | None:
        """The lowest recent small request round trip to ``peer_id`` in seconds, None if none
        was measured (:class:`~mtor_p2p.network.RoundTrips`; the remote handler's time is in
        it, so it is an upper bound on the network round trip)."""
        return self.round_trips.lowest(peer_id)

    def routing_table_size(self) -> int:
        """Peers in the DHT routing table."""
        return self._dht.get_routing_table_size()

    # -- dialing ---------------------------------------------------------------------------

    async def connect(self, addr: str, *, timeout: float = 5.0) -> str:
        """Dial a multiaddr with ``/p2p/<id>``; add the peer to the routing table."""
        try:
            maddr = multiaddr.Multiaddr(addr)
            info = info_from_p2p_addr(maddr)
        except Exception as exc:
            raise NetworkError(f"not a dialable multiaddr with /p2p/: {addr!r}") from exc
        relayed = "/p2p-circuit" in addr
        dialled = False
        try:
            with trio.fail_after(timeout):
                if relayed:
                    # Pitfall 2: the host's dialer drops relayed addresses.
                    if self.nat is None:
                        raise NetworkError("relayed addresses need NAT traversal (off here)")
                    if self._host.get_network().connections.get(info.peer_id):
                        return str(info.peer_id)
                    self._host.get_peerstore().add_addrs(info.peer_id, [maddr], 600)
                    await self.nat.dial_circuit(maddr)
                elif not self._host.get_network().connections.get(info.peer_id):
                    # This address, not every address the peerstore holds: the host's own
                    # connect() dials the peer's known addresses one after another (and makes
                    # concurrent callers wait for it), so a private address that swallows
                    # packets held up the tunnel address a caller dialled beside it.
                    self._host.get_peerstore().add_addrs(info.peer_id, [maddr], 120)
                    await self._host.get_network().dial_addr(maddr, info.peer_id)
                    dialled = True
        except trio.TooSlowError as exc:
            raise NetworkError(f"dial to {addr} timed out after {timeout} s") from exc
        except NetworkError:
            raise
        except Exception as exc:
            raise NetworkError(f"dial to {addr} failed: {exc}") from exc
        if self.nat is not None and dialled:
            self.nat.connected_to(str(info.peer_id))
        try:
            await self._dht.add_peer(info.peer_id)
        except Exception as exc:
            log.debug("routing table add failed after dial: %s", exc)
        return str(info.peer_id)

    # -- request / response ----------------------------------------------------------------

    def handle(
        self,
        protocol: str,
        handler: RequestHandler,
        *,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        timeout: float = 30.0,
        max_answer_bytes: int = 0,
    ) -> None:
        """Serve ``protocol``: read a length-prefixed request, answer with status + payload.

        The same service answers on streams and on lanes (:meth:`_serve_lane_request`), with
        the same admission. Admission happens before the body is read: the peer's stream slot
        on arrival, then, after the length prefix, the size limit, the peer's byte budget and
        the protocol's busy permit. A refused request costs the host no buffer: the answer
        goes out at once and the body, if any, is read and dropped. ``max_answer_bytes``
        (large answers only) is reserved for the answer from before the handler runs until
        it is sent, within the peer's and the host's allowance of answers in hand.
        """
        service = _Service(
            handler,
            max_request_bytes,
            timeout,
            trio.Semaphore(self._settings.max_concurrent_requests),
            max_answer_bytes,
        )
        self._services[protocol] = service
        peers = self._peer_requests

        async def refuse_stream(stream: INetStream) -> None:
            # Over the peer's stream limit, or the peer is under a back-off: answer, then read
            # and drop whatever it sent for a moment (an honest requester reads the answer
            # after writing its request), and reset: a stream left half-open would keep
            # Yamux's buffer for it.
            with trio.move_on_after(1):
                await self._respond(stream, _STATUS_ERROR, b"busy")
                await _discard(stream, max_request_bytes + _LENGTH.size)
            await _reset_quietly(stream)

        async def serve(stream: INetStream) -> None:
            sender = str(stream.muxed_conn.peer_id)
            if peers.penalised(sender):
                self.stats.requests_refused_penalised += 1
                await refuse_stream(stream)
                return
            if not peers.open_stream(sender):
                self.stats.requests_refused_peer_streams += 1
                await refuse_stream(stream)
                return
            try:
                with trio.fail_after(timeout):
                    await serve_admitted(stream, sender)
            finally:
                peers.close_stream(sender)

        async def serve_admitted(stream: INetStream, sender: str) -> None:
            with self._cut_if_slow(REQUEST_GRACE_S, sender):
                (length,) = _LENGTH.unpack(await _read_exactly(stream, _LENGTH.size))
            refusal = self._admit(service, sender, length)
            relayed = self._on_relayed_connection(stream)
            if refusal is None and relayed and length > RELAYED_MAX_REQUEST_BYTES:
                # Bulk bytes do not cross relays, whichever side would send them.
                self._release(service, sender, length)
                refusal = b"request too large for a relayed connection"
            if refusal is not None:
                # Answer first, then read the body and drop it, chunk by chunk: nothing is
                # buffered, and an honest requester (which reads only after writing) gets it.
                await self._respond(stream, _STATUS_ERROR, refusal)
                if refusal == b"busy":
                    await _discard(stream, length)
                return
            reserved = 0
            try:
                try:
                    # Drain the whole request before any work (pitfall 4), at a minimum rate.
                    first = min(length, _READ_CHUNK)
                    with self._cut_if_slow(FIRST_BODY_BYTES_S, sender):
                        head = await _read_exactly(stream, first)
                    rest = length - first
                    with self._cut_if_slow(
                        REQUEST_GRACE_S + rest / MIN_REQUEST_BYTES_PER_S, sender
                    ):
                        payload = head + await _read_exactly(stream, rest) if rest else head
                    if self._take_answer_room(sender, service.max_answer_bytes):
                        reserved = service.max_answer_bytes
                        status, response = await self._call(protocol, service, sender, payload)
                    else:
                        status, response = _STATUS_ERROR, b"busy"
                finally:
                    self._release(service, sender, length)
                if relayed and len(response) > RELAYED_MAX_RESPONSE_BYTES:
                    status, response = (
                        _STATUS_ERROR,
                        b"response too large for a relayed connection",
                    )
                await self._respond(stream, status, response)
            finally:
                self._give_answer_room(sender, reserved)

        self._host.set_stream_handler(TProtocol(protocol), self._guard(protocol, serve))

    def _on_relayed_connection(self, stream: INetStream) -> bool:
        """Whether ``stream`` runs on a relayed connection."""
        if self.nat is None:
            return False
        muxed = stream.muxed_conn
        for conn in conn_list(self._host.get_network().connections.get(muxed.peer_id)):
            if getattr(conn, "muxed_conn", None) is muxed:
                return is_relayed(conn)
        return False

    def _admit(self, service: _Service, sender: str, length: int) -> bytes | None:
        """Take the permits of a request of ``length`` bytes (the peer's stream slot is
        already taken); the refusal to send instead, if any."""
        peers = self._peer_requests
        if length > service.max_request_bytes:
            self.stats.requests_refused_size += 1
            return b"request too large"
        if not peers.fits(sender, length):
            self.stats.requests_refused_peer_bytes += 1
            return b"busy"
        if not peers.fits_total(length):
            self.stats.requests_refused_total_bytes += 1
            return b"busy"
        try:
            service.busy.acquire_nowait()
        except trio.WouldBlock:
            self.stats.requests_refused_busy += 1
            return b"busy"
        peers.admit(sender, length)
        return None

    def _release(self, service: _Service, sender: str, length: int) -> None:
        service.busy.release()
        self._peer_requests.release(sender, length)

    async def _call(
        self, protocol: str, service: _Service, sender: str, payload: bytes
    ) -> tuple[int, Payload]:
        """Run the handler; its answer as (status, payload)."""
        try:
            return _STATUS_OK, await service.handler(sender, payload)
        except RemoteError as exc:
            return _STATUS_ERROR, str(exc).encode()[:MAX_ERROR_BYTES]
        except Exception as exc:
            self.stats.handler_errors += 1
            log.warning("handler for %s raised %s: %s", protocol, type(exc), exc)
            return _STATUS_ERROR, b"internal error"

    async def _serve_lane_request(
        self, sender: str, request_id: int, protocol: str, length: int, lane: ServerLane
    ) -> None:
        """A request that arrived on a lane: the stream path's admission, limits and
        deadlines, with the body read here and the handler run in the lane's nursery."""
        peers = self._peer_requests
        service = self._services.get(protocol)
        if service is None or protocol == LANE_PROTOCOL:
            await self._refuse_on_lane(lane, request_id, length, STATUS_UNSUPPORTED, b"")
            return
        if peers.penalised(sender):
            # Its requests are refused on streams too; its lane is closed, not read.
            self.stats.requests_refused_penalised += 1
            raise LaneError("peer is under a slowness back-off")
        if not peers.open_stream(sender):
            self.stats.requests_refused_peer_streams += 1
            await self._refuse_on_lane(lane, request_id, length, _STATUS_ERROR, b"busy")
            return
        try:
            refusal = self._admit(service, sender, length)
            if refusal is not None:
                await self._refuse_on_lane(lane, request_id, length, _STATUS_ERROR, refusal)
                peers.close_stream(sender)
                return
        except BaseException:
            peers.close_stream(sender)
            raise
        try:
            with self._cut_if_slow(REQUEST_GRACE_S + length / MIN_REQUEST_BYTES_PER_S, sender):
                payload = await lane.lane.read_body(length)
        except BaseException:
            self._release(service, sender, length)
            peers.close_stream(sender)
            raise
        lane.nursery.start_soon(
            self._answer_on_lane, protocol, service, sender, request_id, payload, lane
        )

    async def _answer_on_lane(
        self,
        protocol: str,
        service: _Service,
        sender: str,
        request_id: int,
        payload: bytes,
        lane: ServerLane,
    ) -> None:
        length = len(payload)
        reserved = 0
        try:
            try:
                if self._take_answer_room(sender, service.max_answer_bytes):
                    reserved = service.max_answer_bytes
                    with trio.move_on_after(service.timeout) as deadline:
                        status, response = await self._call(protocol, service, sender, payload)
                    if deadline.cancelled_caught:
                        # As on a stream past its deadline: the request is reset, not
                        # answered, and counted as a handler error.
                        self.stats.handler_errors += 1
                        status, response = STATUS_RESET, b""
                else:
                    status, response = _STATUS_ERROR, b"busy"
            finally:
                del payload
                self._release(service, sender, length)
            await lane.respond(request_id, status, response)
        finally:
            self._give_answer_room(sender, reserved)
            self._peer_requests.close_stream(sender)

    def _take_answer_room(self, sender: str, size: int) -> bool:
        """Reserve ``size`` bytes of answers in hand (made, not yet sent) for ``sender``
        before its handler runs; False (answer "busy", run nothing) beyond the peer's or the
        host's allowance. A service declares its largest answer (``max_answer_bytes``): a
        hostile review had identities ask for 4 MiB downloads and read nothing, which held a
        copy per request, 1 GiB from 8 identities, uncounted once the handler returned."""
        if size <= 0:
            return True
        stats = self.stats
        mine = self._answers_in_hand.get(sender, 0)
        if (
            mine + size > MAX_ANSWER_BYTES_IN_HAND_PER_PEER
            or stats.answer_bytes_in_hand + size > MAX_ANSWER_BYTES_IN_HAND_TOTAL
        ):
            stats.answers_refused_in_hand += 1
            return False
        self._answers_in_hand[sender] = mine + size
        stats.answer_bytes_in_hand += size
        stats.answer_bytes_in_hand_peak = max(
            stats.answer_bytes_in_hand_peak, stats.answer_bytes_in_hand
        )
        return True

    def _give_answer_room(self, sender: str, size: int) -> None:
        if size <= 0:
            return
        self.stats.answer_bytes_in_hand -= size
        left = self._answers_in_hand.pop(sender) - size
        if left:
            self._answers_in_hand[sender] = left

    async def _refuse_on_lane(
        self, lane: ServerLane, request_id: int, length: int, status: int, reason: bytes
    ) -> None:
        """Answer a refused lane request, then read and drop its body (bounded)."""
        if length > MAX_SKIPPED_BODY_BYTES:
            raise LaneError(f"refused request of {length} bytes is too large to skip")
        await lane.respond(request_id, status, reason)
        with trio.fail_after(read_deadline(length)):
            await lane.lane.skip_body(length)

    @contextmanager
    def _cut_if_slow(self, seconds: float, sender: str) -> Iterator[None]:
        """Raise NetworkError (the guard resets the stream) if the block takes ``seconds``,
        and put ``sender`` under a back-off for it."""
        try:
            with trio.fail_after(seconds):
                yield
        except trio.TooSlowError:
            self.stats.requests_cut_slow += 1
            self._peer_requests.penalise(sender)
            raise NetworkError(f"request not received within {seconds:.1f} s") from None

    @staticmethod
    async def _respond(stream: INetStream, status: int, payload: Payload) -> None:
        data = bytes(payload)  # a stream takes one buffer (Gathered parts are joined here)
        if status == _STATUS_ERROR:
            data = data[:MAX_ERROR_BYTES]
        await stream.write(bytes([status]) + _LENGTH.pack(len(data)) + data)
        await stream.close()

    async def request(
        self,
        peer_id: str,
        protocol: str,
        payload: Payload,
        *,
        timeout: float = 10.0,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        sent: trio.Event | None = None,
    ) -> bytes:
        """Send one request, return the response (or raise): over the lane to ``peer_id``
        when one is open, else on a new stream (and a lane starts opening for next time).
        A small exchange on a connection already open is timed (:meth:`round_trip`).
        ``sent`` is set once the request is written in full."""
        # An open lane is a direct connection (no need to look through the swarm's).
        lane_open = self._lane_client is not None and self._lane_client.get(peer_id) is not None
        connected = lane_open or self.connection_kind(peer_id) != "none"
        began = trio.current_time()
        try:
            response = await self._request(
                peer_id,
                protocol,
                payload,
                timeout=timeout,
                max_response_bytes=max_response_bytes,
                sent=sent,
            )
        except RemoteError as exc:  # an answer all the same: a round trip
            if connected:
                elapsed = trio.current_time() - began
                self.round_trips.observe(peer_id, elapsed, len(payload), len(str(exc)))
            raise
        if connected:
            elapsed = trio.current_time() - began
            self.round_trips.observe(peer_id, elapsed, len(payload), len(response))
        return response

    async def _request(
        self,
        peer_id: str,
        protocol: str,
        payload: Payload,
        *,
        timeout: float,
        max_response_bytes: int,
        sent: trio.Event | None = None,
    ) -> bytes:
        lane = self._lane_client.get(peer_id) if self._lane_client is not None else None

        async def on_lane(lane: ClientLane) -> bytes:
            # The deadline and the response limit as they stand when it is called.
            return await lane.request(
                protocol,
                payload,
                timeout=timeout,
                max_response_bytes=max_response_bytes,
                sent=sent,
            )

        if lane is not None:
            # A lane is a direct TCP connection: no relay limits to apply.
            return await on_lane(lane)
        if (
            self.nat is not None
            and len(payload) > RELAYED_MAX_REQUEST_BYTES
            and self.nat.relay_only(peer_id)
        ):
            # Operands and results never cross a relay: wait a moment for the hole punch.
            began = trio.current_time()
            if not await self.nat.wait_direct(peer_id, min(timeout, DIRECT_WAIT_S)):
                raise NetworkError(
                    f"{peer_id} is reachable only through a relay, and requests over "
                    f"{RELAYED_MAX_REQUEST_BYTES} bytes need a direct connection"
                )
            timeout = max(0.0, timeout - (trio.current_time() - began))
        if self.nat is not None and self.nat.relay_only(peer_id):
            # Results do not cross a relay either: a large answer is refused as it arrives.
            max_response_bytes = min(max_response_bytes, RELAYED_MAX_RESPONSE_BYTES)
        if self._lane_client is not None and self._settings.lanes == "eager":
            # The wait for the lane comes out of the request's own deadline.
            began = trio.current_time()
            lane = await self._lane_client.wait_open(peer_id, timeout=min(timeout, 5.0))
            timeout = max(0.0, timeout - (trio.current_time() - began))
        if lane is not None:
            return await on_lane(lane)
        return await self._stream_request(
            peer_id,
            protocol,
            payload,
            timeout=timeout,
            max_response_bytes=max_response_bytes,
            sent=sent,
        )

    async def open_lane(self, peer_id: str, *, timeout: float = 10.0) -> bool:
        """Open the lane to ``peer_id`` now and wait for it (tests and benchmarks; requests
        open lanes by themselves); whether one is open."""
        if self._lane_client is None:
            return False
        return await self._lane_client.wait_open(peer_id, timeout) is not None

    async def _fetch_ticket(self, peer_id: str) -> tuple[str, int, bytes, bytes]:
        """Ask ``peer_id`` for a lane ticket over the overlay (Noise: both ends authenticated)."""
        # The ticket request dials if need be; the lane then goes where that connection goes.
        reply = await self._stream_request(
            peer_id, LANE_PROTOCOL, b"", timeout=5.0, max_response_bytes=MAX_TICKET_REPLY_BYTES
        )
        # Only a direct connection says where the peer is: a relayed one's remote address is
        # the relay's (a lane there would go to the relay, at a port the peer chose).
        conns = conn_list(self._host.get_network().connections.get(ID.from_base58(peer_id)))
        remote = next((r for c in conns if not is_relayed(c) and (r := remote_of(c))), None)
        if remote is None:
            raise NetworkError("no direct connection to take the lane's address from")
        try:
            answer = json.loads(reply)
            port = int(answer["port"])
            ticket = base64.b64decode(answer["ticket"], validate=True)
            secret = base64.b64decode(answer["secret"], validate=True)
        except Exception as exc:
            raise PeerMisbehaved(f"malformed lane ticket: {exc}", peer=peer_id) from exc
        if not 0 < port < 65536 or len(ticket) != TICKET_BYTES or len(secret) != SECRET_BYTES:
            raise PeerMisbehaved("malformed lane ticket", peer=peer_id)
        return str(remote[0]), port, ticket, secret

    async def _issue_ticket(self, sender: str, payload: bytes) -> bytes:
        assert self._lane_server is not None
        issued = self._lane_server.issue_ticket(sender)
        if issued is None:
            raise RemoteError("busy")
        ticket, secret = issued
        return json.dumps(
            {
                "port": self._lane_server.port,
                "ticket": base64.b64encode(ticket).decode(),
                "secret": base64.b64encode(secret).decode(),
            }
        ).encode()

    async def _stream_request(
        self,
        peer_id: str,
        protocol: str,
        payload: Payload,
        *,
        timeout: float = 10.0,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        sent: trio.Event | None = None,
    ) -> bytes:
        """Open a stream, send one request, return the response (or raise)."""
        stream: INetStream | None = None
        try:
            with trio.fail_after(timeout):
                if self.nat is not None:
                    await self._dial_relayed_if_needed(peer_id)
                stream = await self._host.new_stream(ID.from_base58(peer_id), [TProtocol(protocol)])
                await stream.write(_LENGTH.pack(len(payload)) + bytes(payload))
                if sent is not None:
                    sent.set()
                header = await _read_exactly(stream, 1 + _LENGTH.size)
                status = header[0]
                (length,) = _LENGTH.unpack(header[1:])
                limit = MAX_ERROR_BYTES if status != _STATUS_OK else max_response_bytes
                if length > limit:
                    raise NetworkError(f"response of {length} bytes exceeds limit {limit}")
                body = await _read_exactly(stream, length)
        except trio.TooSlowError as exc:
            if stream is not None:
                await _reset_quietly(stream)
            raise NetworkError(
                f"request {protocol} to {peer_id} timed out after {timeout} s"
            ) from exc
        except (NetworkError, RemoteError):
            if stream is not None:
                await _reset_quietly(stream)
            raise
        except Exception as exc:  # dial, negotiation and stream errors from the library
            if stream is not None:
                await _reset_quietly(stream)
            raise NetworkError(f"request {protocol} to {peer_id} failed: {exc}") from exc
        except BaseException:
            # Cancelled by the caller's own scope (a lookup that has its answer cancels the
            # requests still out): the stream would otherwise stay open, its slot taken, until
            # the peer answered or timed out, or for good if it never does.
            if stream is not None:
                await _reset_quietly(stream)
            raise
        with trio.move_on_after(1):
            try:
                await stream.close()
            except StreamError:
                pass
        if status == _STATUS_OK:
            return body
        if status == _STATUS_ERROR:
            raise RemoteError(remote_reason(body))
        raise NetworkError(f"peer answered with unknown status {status}")

    async def _dial_relayed_if_needed(self, peer_id: str) -> None:
        """A peer we are not connected to and know only by relayed addresses: dial one of
        them (the host's own dialer would drop them all, pitfall 2)."""
        pid = ID.from_base58(peer_id)
        if self._host.get_network().connections.get(pid) or self.nat is None:
            return
        addrs = [str(a) for a in self._host.get_peerstore().addrs(pid)]
        if any("/p2p-circuit" not in a for a in addrs):
            return  # the host dials direct addresses itself
        for addr in addrs:
            full = addr if addr.endswith(f"/p2p/{peer_id}") else f"{addr}/p2p/{peer_id}"
            try:
                await self.nat.dial_circuit(multiaddr.Multiaddr(full))
                return
            except Exception as exc:
                log.debug("relayed dial %s failed: %s", full, exc)

    # -- pubsub ----------------------------------------------------------------------------

    async def publish(self, topic: str, data: bytes) -> None:
        """Gossip ``data`` on ``topic`` (best effort)."""
        await self._pubsub.publish(topic, data)

    async def subscribe(
        self, topic: str, *, buffer: int = 256
    ) -> trio.MemoryReceiveChannel[Message]:
        """Deliver messages on ``topic`` into a bounded channel; overflow is dropped."""
        send, receive = trio.open_memory_channel[Message](buffer)
        first = topic not in self._subscriptions
        self._subscriptions.setdefault(topic, []).append(send)
        if first:
            subscription = await self._pubsub.subscribe(topic)
            assert self._nursery is not None
            self._nursery.start_soon(self._pump, topic, subscription)
        return receive

    async def _pump(self, topic: str, subscription: Any) -> None:
        while True:
            raw = await subscription.get()
            try:
                sender = str(ID(raw.from_id))
            except Exception:
                continue
            message = Message(sender=sender, topic=topic, data=bytes(raw.data))
            for channel in list(self._subscriptions.get(topic, [])):
                try:
                    channel.send_nowait(message)
                except trio.WouldBlock:
                    self.stats.gossip_dropped += 1
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    self._subscriptions[topic].remove(channel)

    def set_topic_validator(self, topic: str, validator: TopicValidator) -> None:
        """Run ``validator`` on every message of ``topic`` before delivery and forwarding."""

        def check(peer: ID, msg: Any) -> bool:
            try:
                sender = str(ID(msg.from_id))
                ok = bool(validator(sender, bytes(msg.data)))
            except Exception as exc:
                log.debug("topic validator for %s raised %s", topic, exc)
                ok = False
            if not ok:
                self.stats.gossip_rejected += 1
            return ok

        self._pubsub.set_topic_validator(topic, check, False)

    # -- DHT -------------------------------------------------------------------------------

    def register_dht_validator(self, namespace: str, validator: DhtValidator) -> None:
        """Validate every value under ``/<namespace>/`` before storing or returning it."""
        self._dht.register_validator(namespace, _DhtValidatorBridge(validator))

    async def dht_put(self, key: str, value: bytes) -> None:
        """Store ``value`` locally and on the closest peers."""
        try:
            await self._put_value(key, value)
        except Exception as exc:
            raise NetworkError(f"DHT put of {key} failed: {exc}") from exc

    async def _put_value(self, key: str, value: bytes) -> None:
        """A Kademlia put that travels on lanes where it can.

        py-libp2p's ``put_value`` opens and negotiates a new stream for every RPC of its
        FIND_NODE lookup and of every store, and each carries a signed peer record that the
        other end verifies: one capacity announcement cost five peers on loopback 73 ms of
        CPU in all that way (docs/peer.md, "DHT puts"). Here the lookup asks
        :data:`DHT_CLOSEST_PROTOCOL` and the stores go over :data:`DHT_PUT_PROTOCOL`; peers
        that serve neither are asked with :data:`DHT_GET_PROTOCOL` (whose answers name closer
        peers) or Kademlia's GET_VALUE, and stored at with Kademlia's PUT_VALUE. The same
        checks as py-libp2p's: the value is validated, and one older than the value held
        here is refused.
        """
        dht = self._dht
        if dht.validator is None:
            raise ValueError("no record validator")
        dht.validator.validate(key, value)
        key_bytes = key.encode("utf-8")
        held = dht.value_store.get(key_bytes)
        if held is not None and held.value != value:
            if dht.validator.select(key, [value, held.value]) != 0:
                raise ValueError("refusing to replace a newer value with an older one")
        dht.value_store.put(key_bytes, value)
        sent_to: set[ID] = set()

        async def store(peer: ID) -> None:
            with trio.move_on_after(DHT_QUERY_TIMEOUT_S):
                try:
                    await self._store_at(peer, key_bytes, value)
                except Exception as exc:  # a peer that fails is one copy fewer
                    log.debug("DHT store at %s failed: %s", peer, exc)

        # Stores go out at once to the closest of the peers that answered the lookup in time
        # or are connected and still to answer, then to each other peer that answers later,
        # as it answers, while fewer than DHT_BUCKET_SIZE have gone out. A put takes at most
        # DHT_PUT_LOOKUP_S + 2 * DHT_QUERY_TIMEOUT_S (a query asked by the deadline answers
        # within DHT_QUERY_TIMEOUT_S, and its store takes as long again), and about
        # DHT_PUT_LOOKUP_S + one store once every store has gone out.
        async with trio.open_nursery() as stores, trio.open_nursery() as queries:

            def send(peer: ID) -> None:
                if peer not in sent_to and len(sent_to) < DHT_BUCKET_SIZE:
                    sent_to.add(peer)
                    stores.start_soon(store, peer)
                if len(sent_to) >= DHT_BUCKET_SIZE:
                    queries.cancel_scope.cancel()  # no late answer can add a store

            lookup = await self._closest_peers(
                key_bytes, deadline=DHT_PUT_LOOKUP_S, queries=queries, answered_late=send
            )
            for peer in lookup.closest:
                send(peer)
            for peer, query in list(lookup.still_asking.items()):
                if peer in sent_to:
                    query.cancel()  # its answer would add nothing

    async def _closest_peers(
        self,
        key: bytes,
        *,
        deadline: float,
        queries: trio.Nursery,
        answered_late: Callable[[ID], None],
    ) -> _Lookup:
        """The (at most DHT_BUCKET_SIZE) closest peers to ``key`` that answered an iterative
        lookup: the closest known ones are asked, DHT_GET_PARALLEL at a time (those already
        connected first), until every one of the closest known has answered or failed, or for
        ``deadline`` seconds at most; peers that fail are dropped.

        The deadline is what bounds a hostile answer: one naming 20 made-up peers at
        addresses that never answer held a put 15 s before it (a review of the first
        version), and a chain of them up to DHT_GET_MAX_QUERIES queries; now the put goes to
        the closest of those that answered in time, which the connected ones, asked first,
        do in milliseconds. A query unanswered for DHT_LOOKUP_SLOW_S gives up its slot and
        its place among the closest to ask (a review: 20 made-up peers closer than everyone,
        never answering, held every slot to the deadline, and the value went only to the peers
        asked before). An address an answer gives is kept only for a peer the lookup then asks
        and knows no address of (DHT_ADDRS_TTL_S), so answers cannot fill the peer store.

        The answer's ``closest`` are the closest that answered or are connected (a completed
        handshake: slow on a busy machine, not made up) and still to answer at the deadline.
        The queries run in ``queries`` and each keeps its own DHT_QUERY_TIMEOUT_S past the
        deadline (``still_asking``, to cancel those no longer needed): a peer that answers
        after it is passed to ``answered_late``. A busy machine may take longer than the
        deadline to dial a peer an answer named (TCP, Noise, identify), and with the value only
        at the peers answering in time, a replayed older value won at the others (a suite run
        under load)."""
        me = self._host.get_id()
        connected = set(self._host.get_connected_peers())
        known = [
            p
            for p in self._dht.routing_table.find_local_closest_peers(key, DHT_BUCKET_SIZE)
            if p != me and self._dht_trusted(p)
        ]
        given: dict[ID, list[multiaddr.Multiaddr]] = {}
        queried: set[ID] = set()
        answered: set[ID] = set()
        failed: set[ID] = set()
        answers_in, answers_out = trio.open_memory_channel[tuple[ID, list[ID] | None]](
            DHT_GET_MAX_QUERIES
        )

        lookup_over = False
        still_asking: dict[ID, trio.CancelScope] = {}

        async def ask(peer: ID) -> None:
            closer: list[ID] | None = None
            with trio.move_on_after(DHT_QUERY_TIMEOUT_S) as query:
                still_asking[peer] = query
                try:
                    closer = await self._ask_closest(peer, key, given)
                except Exception as exc:  # a peer that fails or lies is left out
                    log.debug("DHT lookup at %s failed: %s", peer, exc)
                finally:
                    del still_asking[peer]
            if query.cancelled_caught and lookup_over:
                return  # timed out, or no longer needed
            if not lookup_over:
                answers_in.send_nowait((peer, closer))
            elif closer is not None:
                answered_late(peer)

        # Asked, not answered yet -> when. One unanswered for DHT_LOOKUP_SLOW_S frees its
        # slot and its place in the window (it may still answer and be stored at): made-up
        # peers that never answer cannot hold the lookup until its deadline.
        pending: dict[ID, float] = {}
        with trio.move_on_after(deadline):
            while True:
                now = trio.current_time()
                # As the wait below reckons it: now - asked can round below the limit when
                # now >= asked + limit, and the loop would spin without a checkpoint.
                slow = {p for p, asked in pending.items() if now >= asked + DHT_LOOKUP_SLOW_S}
                window = [p for p in known if p not in slow][:DHT_BUCKET_SIZE]
                # Stable: by distance within each group.
                for peer in sorted(window, key=lambda p: p not in connected):
                    if (
                        len(pending) - len(slow) >= DHT_GET_PARALLEL
                        or len(queried) >= DHT_GET_MAX_QUERIES
                    ):
                        break
                    if peer not in queried:
                        queried.add(peer)
                        pending[peer] = now
                        # Not for a peer with addresses already: py-libp2p keeps one
                        # lifetime per peer, and a made-up address would cut its real ones'.
                        if peer in given and not self._dialable(peer):
                            self._host.get_peerstore().add_addrs(
                                peer, given.pop(peer), DHT_ADDRS_TTL_S
                            )
                        queries.start_soon(ask, peer)
                if not pending:
                    break
                timely = [asked for p, asked in pending.items() if p not in slow]
                with trio.move_on_at(
                    min(timely) + DHT_LOOKUP_SLOW_S if timely else math.inf
                ) as wait:
                    peer, closer = await answers_out.receive()
                if wait.cancelled_caught:
                    continue  # a query turned slow: ask the next peer
                del pending[peer]
                if closer is None:
                    failed.add(peer)
                    known.remove(peer)
                    continue
                answered.add(peer)
                fresh = {
                    p
                    for p in closer
                    if p != me and p not in failed and p not in known and self._dht_trusted(p)
                }
                if fresh:
                    known = sort_peer_ids_by_distance(key, known + sorted(fresh, key=str))
        # Answers already in the channel count as in time; any later one is passed on.
        while True:
            try:
                peer, closer = answers_out.receive_nowait()
            except trio.WouldBlock:
                break
            del pending[peer]
            if closer is not None:
                answered.add(peer)
            elif peer in known:
                known.remove(peer)
        lookup_over = True
        now_connected = set(self._host.get_connected_peers())
        closest = [p for p in known if p in answered or (p in pending and p in now_connected)]
        return _Lookup(closest[:DHT_BUCKET_SIZE], still_asking)

    async def _ask_closest(
        self, peer: ID, key: bytes, given: dict[ID, list[multiaddr.Multiaddr]]
    ) -> list[ID]:
        """The closer peers ``peer`` knows to ``key``; addresses its answer gives for them
        are added to ``given`` (for peers not there yet, while it holds fewer than
        DHT_GET_MAX_QUERIES: one lookup asks no more peers than that). An MTOR
        peer answers :data:`DHT_CLOSEST_PROTOCOL` over its lane; any other is asked as a get
        asks it (:meth:`_ask_for_value`)."""
        reply = await self._mtor_dht_request(
            peer, DHT_CLOSEST_PROTOCOL, key, self._no_mtor_put, DHT_GET_MAX_REPLY_BYTES
        )
        if reply is None:
            return (await self._ask_for_value(peer, key))[1]
        try:
            closer, addrs = _parse_closest_reply(reply)
        except PeerMisbehaved as exc:
            self._dht_answer_malformed(str(peer), exc)
            raise
        for other, addresses in addrs.items():
            if other not in given and len(given) < DHT_GET_MAX_QUERIES:
                given[other] = addresses
        return closer

    async def _mtor_dht_request(
        self,
        peer: ID,
        protocol: str,
        payload: bytes,
        fallback: dict[str, float],
        max_response_bytes: int,
    ) -> bytes | None:
        """``peer``'s answer to one of MTOR's DHT requests (on its lane once open), or None
        when the caller should use the Kademlia way instead: the peer is marked in
        ``fallback``, or has just failed the request over an open connection (it does not
        serve the protocol, or the request failed), and is marked there for KADEMLIA_ONLY_S.
        A failure with no open connection (a dial to an address some lookup answer gave) says
        nothing of the protocols the peer serves: it is raised, unmarked. A refusal
        (RemoteError) is raised as it is."""
        name = str(peer)
        if fallback.get(name, -math.inf) > trio.current_time():
            return None
        try:
            return await self.request(
                name,
                protocol,
                payload,
                timeout=DHT_QUERY_TIMEOUT_S,
                max_response_bytes=max_response_bytes,
            )
        except NetworkError:
            if not self._reached(peer):
                raise
            _penalise(fallback, name, KADEMLIA_ONLY_S)
            return None

    async def _store_at(self, peer: ID, key: bytes, value: bytes) -> bool:
        """Store ``value`` at ``peer``: over :data:`DHT_PUT_PROTOCOL` (on its lane once
        open), or with Kademlia's PUT_VALUE for a peer that does not serve it. Whether it now
        holds this value (False: it refused it, or holds one as new or newer)."""
        request = _DHT_KEY_LENGTH.pack(len(key)) + key + value
        try:
            reply = await self._mtor_dht_request(
                peer,
                DHT_PUT_PROTOCOL,
                request,
                self._no_mtor_put,
                max(len(DHT_PUT_STORED), len(DHT_PUT_KEPT)),
            )
        except RemoteError as exc:
            log.debug("peer %s refused a DHT value: %s", peer, exc)
            return False
        if reply is not None:
            return bytes(reply) == DHT_PUT_STORED
        return bool(await self._dht.value_store._store_at_peer(peer, key, value))

    def _dialable(self, peer: ID) -> bool:
        """Whether this host is connected to ``peer`` or holds an address for it."""
        if peer in self._host.get_connected_peers():
            return True
        try:
            return bool(self._host.get_peerstore().addrs(peer))
        except Exception:  # none known
            return False

    def _dht_trusted(self, peer: ID) -> bool:
        """False while ``peer`` is left out of DHT lookups for a malformed answer."""
        return self._dht_misbehaved.get(str(peer), -math.inf) <= trio.current_time()

    def _dht_answer_malformed(self, name: str, exc: PeerMisbehaved) -> None:
        log.info(
            "DHT: %s sent a malformed answer (%s); left out of lookups for %.0f s",
            name[-8:],
            exc,
            KADEMLIA_ONLY_S,
        )
        _penalise(self._dht_misbehaved, name, KADEMLIA_ONLY_S)

    def _reached(self, peer: ID) -> bool:
        """Whether a connection to ``peer`` is open: only then does a failed request say that
        it lacks the protocol (an address, which any lookup answer may give, says nothing)."""
        name = str(peer)
        if self._lane_client is not None and self._lane_client.get(name) is not None:
            return True
        return peer in self._host.get_connected_peers()

    async def dht_get(self, key: str, *, timeout: float = 10.0) -> bytes | None:
        """The best valid value for ``key``, or None."""
        with trio.move_on_after(timeout):
            try:
                return await self._get_value(key)
            except Exception as exc:
                log.debug("DHT get of %s failed: %s", key, exc)
                return None
        return None

    async def _get_value(self, key: str) -> bytes | None:
        """A Kademlia GET_VALUE lookup that returns as soon as it can.

        py-libp2p's ``get_value`` first runs a whole FIND_NODE lookup, then asks the closest
        peers for the value, then stores it at stale peers, and only then returns; every RPC
        is a new stream. Here the GET_VALUE queries are the lookup (each answer names closer
        peers, as the spec allows), already-connected peers are asked first, the best (by the
        namespace's ``select``) of :data:`DHT_GET_QUORUM` valid values, or of those that
        arrive soon after the first (half its time again, 2-25 ms), is the answer, and nothing
        waits for corrections: the writer re-announces. Same messages on the wire, so other
        implementations answer it.
        """
        dht = self._dht
        key_bytes = key.encode("utf-8")
        local = dht.value_store.get(key_bytes)
        if local is not None:
            return bytes(local.value)
        me = self._host.get_id()
        # Among the closest peers known, those already connected first: a new dial costs a
        # Noise handshake and identify (tens of ms), and any holder of the value will do.
        connected = set(self._host.get_connected_peers())
        closest = dht.routing_table.find_local_closest_peers(key_bytes, DHT_BUCKET_SIZE)
        closest = [p for p in closest if self._dht_trusted(p)]
        candidates = [p for p in closest if p in connected] + [
            p for p in closest if p not in connected
        ]
        queried: set[ID] = set()
        values: list[bytes] = []
        answers_in, answers_out = trio.open_memory_channel[tuple[bytes | None, list[ID]]](
            DHT_GET_MAX_QUERIES
        )

        async def ask(peer: ID) -> None:
            value: bytes | None = None
            closer: list[ID] = []
            with trio.move_on_after(DHT_QUERY_TIMEOUT_S):
                try:
                    found, closer = await self._ask_for_value(peer, key_bytes)
                    if found is not None:
                        dht.validator.validate(key, found)
                        value = found
                except Exception as exc:  # a peer that fails or lies is skipped
                    log.debug("DHT GET_VALUE from %s failed: %s", peer, exc)
            answers_in.send_nowait((value, closer))

        in_flight = 0
        grace_ends = math.inf
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            while True:
                while (
                    candidates
                    and in_flight < DHT_GET_PARALLEL
                    and len(queried) < DHT_GET_MAX_QUERIES
                ):
                    peer = candidates.pop(0)
                    if peer in queried or peer == me:
                        continue
                    queried.add(peer)
                    in_flight += 1
                    nursery.start_soon(ask, peer)
                if in_flight == 0:
                    break
                with trio.move_on_at(grace_ends) as grace:
                    value, closer = await answers_out.receive()
                if grace.cancelled_caught:
                    break
                in_flight -= 1
                if value is not None:
                    values.append(value)
                    if len(values) >= DHT_GET_QUORUM:
                        break
                    if len(values) == 1:
                        # Queries started together answer at about the same time: the
                        # others get half as long again as the first took to confirm or
                        # better it (an older record replayed loses to a newer one in
                        # ``select``), not a wait for dials to more peers.
                        took = trio.current_time() - started
                        grace_ends = trio.current_time() + min(
                            DHT_QUORUM_GRACE_MAX_S, max(DHT_QUORUM_GRACE_MIN_S, took / 2)
                        )
                fresh = [
                    p
                    for p in closer
                    if p not in queried and p != me and p not in candidates and self._dht_trusted(p)
                ]
                if fresh:
                    candidates = sort_peer_ids_by_distance(key_bytes, candidates + fresh)
            nursery.cancel_scope.cancel()
        if not values:
            return None
        return values[dht.validator.select(key, values)]

    async def _ask_for_value(self, peer: ID, key: bytes) -> tuple[bytes | None, list[ID]]:
        """One peer's value for ``key`` (unvalidated) and the closer peers it knows.

        An MTOR peer answers :data:`DHT_GET_PROTOCOL` over its lane (a fraction of a
        millisecond once the lane is open, where a Kademlia RPC opens and negotiates a new
        stream); any other peer (or one that fails to) is asked with Kademlia's GET_VALUE.
        """
        reply = await self._mtor_dht_request(
            peer, DHT_GET_PROTOCOL, key, self._kademlia_only, DHT_GET_MAX_REPLY_BYTES
        )
        if reply is not None:
            try:
                return _parse_dht_reply(reply)
            except PeerMisbehaved as exc:
                self._dht_answer_malformed(str(peer), exc)
                raise
        record, closer = await self._dht.value_store._get_from_peer(
            peer, key, return_record=True, return_closer_peers=True
        )
        value = bytes(record.value) if record is not None else None
        return value, list(closer or [])

    async def _serve_dht_get(self, sender: str, payload: bytes) -> bytes:
        """Answer :data:`DHT_GET_PROTOCOL`: the value this host stores for the key (as its
        Kademlia handler would) and the closest peers its routing table knows."""
        record = self._dht.value_store.get(payload)
        closer = [
            str(p)
            for p in self._dht.routing_table.find_local_closest_peers(payload, DHT_BUCKET_SIZE)
            if str(p) != sender
        ]
        value = base64.b64encode(record.value).decode() if record is not None else None
        return json.dumps({"value": value, "closer": closer}).encode()

    async def _serve_dht_closest(self, sender: str, payload: bytes) -> bytes:
        """Answer :data:`DHT_CLOSEST_PROTOCOL`: the closest peers this host's routing table
        knows to the key (the sender left out) and up to DHT_ADDRS_PER_PEER of each one's
        addresses, as a FIND_NODE answer carries them."""
        self._learn_dht_peer(sender)
        closer = [
            p
            for p in self._dht.routing_table.find_local_closest_peers(payload, DHT_BUCKET_SIZE)
            if str(p) != sender
        ]
        peerstore = self._host.get_peerstore()
        addrs: dict[str, list[str]] = {}
        for peer in closer:
            try:
                known = [str(a) for a in peerstore.addrs(peer)]
            except Exception:  # none known
                continue
            given = [a for a in known if len(a) <= DHT_ADDR_MAX_CHARS][:DHT_ADDRS_PER_PEER]
            if given:
                addrs[str(peer)] = given
        return json.dumps({"closer": [str(p) for p in closer], "addrs": addrs}).encode()

    async def _serve_dht_put(self, sender: str, payload: bytes) -> bytes:
        """Answer :data:`DHT_PUT_PROTOCOL` as Kademlia's handler answers PUT_VALUE: a value
        that the key's namespace validates, and that is newer than the one held (by the
        namespace's ``select``), is stored (:data:`DHT_PUT_STORED`); a valid value no newer is
        not (:data:`DHT_PUT_KEPT`); anything else is refused, saying why."""
        self._learn_dht_peer(sender)
        if len(payload) <= _DHT_KEY_LENGTH.size:
            raise RemoteError("malformed DHT put")
        (length,) = _DHT_KEY_LENGTH.unpack_from(payload)
        key_bytes = bytes(payload[_DHT_KEY_LENGTH.size : _DHT_KEY_LENGTH.size + length])
        value = bytes(payload[_DHT_KEY_LENGTH.size + length :])
        if not 0 < length <= DHT_GET_MAX_KEY_BYTES or len(key_bytes) != length or not value:
            raise RemoteError("malformed DHT put")
        if len(value) > DHT_PUT_MAX_VALUE_BYTES:
            raise RemoteError("DHT value too large")
        try:
            key = key_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise RemoteError("DHT key is not UTF-8") from None
        validator = self._dht.validator
        if validator is None:
            raise RemoteError("this peer stores no DHT values")
        try:
            validator.validate(key, value)
            held = self._dht.value_store.get(key_bytes)
            if held is not None and (
                held.value == value or validator.select(key, [held.value, value]) == 0
            ):
                return DHT_PUT_KEPT
        except Exception as exc:
            raise RemoteError(f"invalid DHT value: {exc}") from None
        record = Record()
        record.key = key_bytes
        record.value = value
        record.timeReceived = format_time_rfc3339()
        self._dht.value_store.put_record(key_bytes, record)
        return DHT_PUT_STORED

    def _learn_dht_peer(self, sender: str) -> None:
        """As Kademlia's handler does, a peer that puts or looks up is a DHT server and goes
        in the routing table; but never on the answer's path: adding to a full bucket pings
        its oldest peer while holding the bucket's lock (over 45 s for a peer that accepts
        TCP and never speaks), which made a review's requests time out. So the add runs in
        the background, one at a time (a request while one runs adds nothing), within
        DHT_QUERY_TIMEOUT_S; a peer already in the table is left as it is. (Gets do not add
        the asker, as before: DHT_GET_PROTOCOL's answers are kept as they were.)"""
        if self._learning_dht_peer or self._nursery is None:
            return
        try:
            peer = ID.from_base58(sender)
            if self._dht.routing_table.peer_in_table(peer):
                return
        except Exception:
            return
        self._learning_dht_peer = True
        self._nursery.start_soon(self._add_dht_peer, peer)

    async def _add_dht_peer(self, peer: ID) -> None:
        try:
            with trio.move_on_after(DHT_QUERY_TIMEOUT_S):
                await self._dht.add_peer(peer, skip_server_mode_check=True)
        except Exception as exc:  # a full bucket, a peer gone meanwhile
            log.debug("routing table add failed for %s: %s", peer, exc)
        finally:
            self._learning_dht_peer = False

    async def provide(self, key: str) -> None:
        """Announce that this node provides ``key``."""
        await self._dht.provide(_key_to_provider_key(key))

    async def find_providers(self, key: str, *, timeout: float = 10.0) -> list[str]:
        """Peer IDs that announced ``key``."""
        with trio.move_on_after(timeout):
            infos = await self._dht.find_providers(_key_to_provider_key(key))
            return [str(i.peer_id) for i in infos]
        return []
