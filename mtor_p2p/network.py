"""The one port between peer logic and the network.

The peer's services (capacity, and later scheduler, worker, ledger) talk only to
:class:`Network`. Two adapters implement it: :mod:`mtor_p2p.libp2p_host` (real py-libp2p hosts)
and :mod:`mtor_p2p.memnet` (an in-memory network on virtual time for tests and the simulator).

Semantics every adapter keeps:

* ``request`` is one request and one response on a fresh stream, both size-limited, under a
  deadline. A handler that raises :class:`RemoteError` sends its message to the requester, who
  gets it back as :class:`RemoteError`; any other exception in a handler is reported to the
  requester as ``"internal error"`` and never stops the host.
* ``publish`` is best effort (gossip may drop); anything that must arrive needs its own
  acknowledgement or a periodic re-announcement.
* Subscriptions deliver into bounded buffers: when a consumer falls behind, messages are
  dropped and counted, never queued without bound.

Beyond the port, both adapters answer :class:`PeerLinks` (what this node knows of its link to
one peer: direct or relayed, and the round trip it measured). Callers read those methods with
``getattr``, since a test's fake network may lack them.
"""

from __future__ import annotations

import ipaddress
import re
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import trio

#: Default size limits for one request and one response.
DEFAULT_MAX_REQUEST_BYTES = 1 << 20
DEFAULT_MAX_RESPONSE_BYTES = 1 << 20
#: A request's length prefix must arrive within REQUEST_GRACE_S of its stream opening, and its
#: body within REQUEST_GRACE_S plus its size at MIN_REQUEST_BYTES_PER_S (a quarter of the
#: slowest home uplink the scheduler plans for): a peer that trickles bytes is cut instead of
#: holding a busy permit until the handler's deadline.
REQUEST_GRACE_S = 5.0
#: The first bytes of a body (64 KiB, or all of a smaller one) must follow the length prefix
#: within this many seconds: an honest requester writes both at once, and an announcement
#: with nothing behind it must not hold the host's request budget for long.
FIRST_BODY_BYTES_S = 2.0
#: A peer cut for slowness has its requests refused for this long, doubling per cut (at most
#: PENALTY_MAX_S): reopening at once after a cut gains it nothing.
PENALTY_BASE_S = 10.0
PENALTY_MAX_S = 300.0
MIN_REQUEST_BYTES_PER_S = 256 * 1024
#: A handler's error reason reaches the requester cut to this many bytes.
MAX_ERROR_BYTES = 1024
#: Inbound requests one remote peer may have open at once (being read or handled), across
#: protocols; more are refused "busy". One connection per peer, so this bounds a connection too.
DEFAULT_MAX_STREAMS_PER_PEER = 32
#: Announced bytes of one remote peer's requests admitted at once (being read or handled);
#: a request that would go beyond is refused "busy" before its body is read.
DEFAULT_MAX_PENDING_BYTES_PER_PEER = 32 << 20
#: Announced request bytes admitted from all peers together: what a host may hold in request
#: buffers whatever many identities send (many peers each within their own budget).
DEFAULT_MAX_PENDING_BYTES_TOTAL = 64 << 20
#: Answers a host has made and not yet sent (a client reads them at its own pace), in bytes:
#: one peer's at most (its 32 requests of 4 MiB downloads would be 128 MiB), all peers' at
#: most. An answer beyond either is replaced by "busy" and dropped at once. Answers up to
#: SMALL_ANSWER_BYTES are never refused (refusals, receipts, small replies).
MAX_ANSWER_BYTES_IN_HAND_PER_PEER = 64 << 20
MAX_ANSWER_BYTES_IN_HAND_TOTAL = 256 << 20
SMALL_ANSWER_BYTES = 64 * 1024


def ip_address_of(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An IP address, an IPv4-mapped IPv6 form read as the IPv4 one; None if not an IP."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_loopback_ip(text: str) -> bool:
    """Whether ``text`` is a loopback address (an IPv4-mapped IPv6 one read as IPv4)."""
    address = ip_address_of(text)
    return address is not None and address.is_loopback


class NetworkError(Exception):
    """A local failure to reach a peer: dial failed, deadline passed, stream broke."""


#: A remote reason is cut at this many characters (the longest of ours, "missing operands"
#: naming 16 hashes, is about 1,100).
MAX_REMOTE_REASON_CHARS = 4000
#: Characters a terminal or a log line would act on: C0 and C1 controls, DEL, line and
#: paragraph separators, bidirectional overrides and isolates.
_ACTIVE_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def remote_reason(body: bytes) -> str:
    """A peer's error reply as one line of inert text: decoded as UTF-8 (invalid bytes
    replaced), every control character written as its escape, cut at
    :data:`MAX_REMOTE_REASON_CHARS`. A peer's words reach job errors, the peer book and the
    operator's terminal (a hostile review: escape sequences in a refusal retitled the
    terminal that ran ``mtor-peer reputation``)."""
    text = bytes(body[: 4 * MAX_REMOTE_REASON_CHARS]).decode("utf-8", errors="replace")
    text = _ACTIVE_CHARACTERS.sub(_escaped, text)
    if len(text) > MAX_REMOTE_REASON_CHARS:
        text = text[:MAX_REMOTE_REASON_CHARS] + "…"
    return text


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


class RemoteError(Exception):
    """The remote peer answered with an error; ``str(exc)`` is its one-line reason.

    Raise it in a request handler to send that reason to the requester.
    """


class PeerMisbehaved(Exception):
    """A remote peer's reply was malformed or inconsistent: it does not unpack, a field is
    missing or of the wrong type, a signature or hash does not hold, an array does not match
    what was asked. Unlike :class:`NetworkError` (nothing arrived) or :class:`RemoteError`
    (the peer declined, in words), this is the peer's fault, and callers count it against
    that peer. Every reply from a remote peer is decoded inside a boundary that raises this
    (and nothing else) for whatever is wrong with it.

    ``peer`` is the peer's ID when known; ``reason`` the one-line description.
    """

    def __init__(self, reason: str, *, peer: str | None = None) -> None:
        super().__init__(reason if peer is None else f"peer {peer} misbehaved: {reason}")
        self.reason = reason
        self.peer = peer


@dataclass
class HostStats:
    """Counters that show an adapter's guards at work (exposed through the control API)."""

    handler_errors: int = 0
    requests_refused_busy: int = 0
    requests_refused_size: int = 0
    #: Requests refused because their peer already had its most streams open.
    requests_refused_peer_streams: int = 0
    #: Requests refused because their peer already had its most request bytes admitted.
    requests_refused_peer_bytes: int = 0
    #: Requests refused because all peers together had the most request bytes admitted.
    requests_refused_total_bytes: int = 0
    #: Answers replaced by "busy" because the answers made and not yet sent, the peer's or
    #: everyone's, held too many bytes (a client reading slowly, or many of them).
    answers_refused_in_hand: int = 0
    #: Bytes of answers made and not yet sent now, and the most there ever were.
    answer_bytes_in_hand: int = 0
    answer_bytes_in_hand_peak: int = 0
    #: Announced bytes of the requests admitted now (body being read or handled), and the
    #: most there ever were: what the host may hold in request buffers.
    request_bytes_pending: int = 0
    request_bytes_pending_peak: int = 0
    #: Requests whose sender was too slow with its length prefix or body (see
    #: :data:`MIN_REQUEST_BYTES_PER_S`): cut, so that trickling bodies cannot hold permits.
    requests_cut_slow: int = 0
    #: Requests refused because their peer was recently cut for slowness (its back-off).
    requests_refused_penalised: int = 0
    gossip_dropped: int = 0
    gossip_rejected: int = 0
    #: Lanes (mtor_p2p/lane.py; the libp2p adapter only): opened, failed and open now, out
    #: (we dial) and in (we serve); inbound attempts refused (no or spent ticket, over the
    #: limits) and records that did not authenticate; requests carried each way.
    lanes_opened_out: int = 0
    lanes_failed_out: int = 0
    lanes_open_out: int = 0
    lanes_opened_in: int = 0
    lanes_refused_in: int = 0
    lanes_open_in: int = 0
    lane_auth_failures: int = 0
    lane_requests_out: int = 0
    lane_requests_in: int = 0


@dataclass(frozen=True)
class Message:
    """A message received on a pubsub topic; ``sender`` is the signing peer's ID."""

    sender: str
    topic: str
    data: bytes


class Gathered:
    """A request or response made of several buffers, sent one after another without being
    joined first: a run request's operands after its header, a shard's output after its
    answer. A lane seals its records straight from them (a 512² run request's 2 MiB join cost
    about 0.3 ms on both operands' path, and a shard's output another copy); ``bytes()``
    joins them where a transport needs one buffer (streams, memnet).

    The buffers are referenced, not copied: they must not change until the message is sent.
    """

    __slots__ = ("_length", "parts")

    def __init__(self, parts: Iterable[bytes | bytearray | memoryview]) -> None:
        self.parts: tuple[memoryview, ...] = tuple(memoryview(p).cast("B") for p in parts)
        self._length = sum(len(p) for p in self.parts)

    def __len__(self) -> int:
        return self._length

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)


#: What a request or response may be: one buffer, or several sent as one (:class:`Gathered`).
Payload = bytes | Gathered

#: ``handler(sender_peer_id, request_bytes) -> response`` (bytes, or :class:`Gathered`)
RequestHandler = Callable[[str, bytes], Awaitable[Payload]]
#: ``validator(sender_peer_id, data) -> accept?``; runs before a message is forwarded.
TopicValidator = Callable[[str, bytes], bool]


class DhtValidator(Protocol):
    """Validates values of one DHT namespace (``/<namespace>/...`` keys)."""

    def validate(self, key: str, value: bytes) -> None:
        """Raise an exception if ``value`` must not be stored or returned under ``key``."""

    def select(self, key: str, values: list[bytes]) -> int:
        """Return the index of the best of several values for ``key``."""


@runtime_checkable
class Network(Protocol):
    """What a peer's services may ask of the network."""

    @property
    def peer_id(self) -> str:
        """This node's peer ID."""

    def addrs(self) -> list[str]:
        """Multiaddrs (with ``/p2p/<id>``) at which others can reach this node."""

    #: Counters of the adapter's guards (refused, dropped, rejected...), shown by ``status``.
    stats: Any

    def routing_table_size(self) -> int:
        """Peers this node's DHT routing table holds (for ``status``)."""

    async def connect(self, addr: str, *, timeout: float = 5.0) -> str:
        """Dial ``addr`` (a multiaddr ending in ``/p2p/<id>``); return the peer ID."""

    def connected_peers(self) -> list[str]:
        """Peer IDs with an open connection."""

    def handle(
        self,
        protocol: str,
        handler: RequestHandler,
        *,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        timeout: float = 30.0,
        max_answer_bytes: int = 0,
    ) -> None:
        """Serve requests on ``protocol``; each handler call runs under ``timeout``.
        ``max_answer_bytes``: the largest answer the handler makes, if large (reserved from
        before it runs until the answer is sent, so that answers a slow reader leaves in hand
        are bounded: beyond, the request is answered "busy")."""

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
        """Send one request; raise NetworkError or RemoteError on failure. ``sent`` is set
        once the whole request has been handed to the transport (the caller may then start
        work that would have competed with sending it).

        The answer is the caller's from then on: ``bytes``, or a ``bytearray`` that the
        transport neither keeps nor writes again (the scheduler may hand one over to its own
        caller as a job's output, uncopied)."""

    async def publish(self, topic: str, data: bytes) -> None:
        """Gossip ``data`` on ``topic`` (best effort)."""

    async def subscribe(
        self, topic: str, *, buffer: int = 256
    ) -> trio.MemoryReceiveChannel[Message]:
        """Receive messages on ``topic``; a full buffer drops the newest message."""

    def set_topic_validator(self, topic: str, validator: TopicValidator) -> None:
        """Check every message on ``topic`` before it is delivered or forwarded."""

    def register_dht_validator(self, namespace: str, validator: DhtValidator) -> None:
        """Validate every DHT value under ``/<namespace>/``."""

    async def dht_put(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key`` on the peers closest to it."""

    async def dht_get(self, key: str, *, timeout: float = 10.0) -> bytes | None:
        """The best valid value for ``key``, or None if none is found in time."""

    async def provide(self, key: str) -> None:
        """Announce that this node provides ``key``."""

    async def find_providers(self, key: str, *, timeout: float = 10.0) -> list[str]:
        """Peer IDs that announced they provide ``key``."""


#: The longest :meth:`Network.dht_put` takes in any adapter, with a second to spare
#: (py-libp2p's: 2 s for its lookup, 3 s more for a query asked by then, 3 s for that peer's
#: store). A caller that bounds a put gives it at least this: cut off sooner, a put whose late
#: stores are still going out counts as failed.
DHT_PUT_MAX_S = 9.0


#: A request and its response both at most this many bytes count as a small exchange, whose
#: time is mostly the round trip (a DHT get, an operand query, a countersign), not transfer.
SMALL_EXCHANGE_BYTES = 4096


class PeerLinks(Protocol):
    """Optional: what an adapter knows of its link to one peer (both adapters have these;
    a fake network may not, so callers use ``getattr``)."""

    def connection_kind(self, peer_id: str) -> str:
        """``"direct"``, ``"relayed"`` (every open connection to the peer goes through a
        circuit relay) or ``"none"`` (no open connection)."""

    def same_host(self, peer_id: str) -> bool:
        """Whether ``peer_id`` seems to be on this machine (memnet: never)."""

    def round_trip(self, peer_id: str) -> float | None:
        """Seconds: the lowest of the recent small request round trips to ``peer_id`` over a
        connection already open (see :class:`RoundTrips`); None if none was measured."""


class RoundTrips:
    """Recent round trips of small requests, per peer: a passive latency measure.

    Neither adapter pings; what a node does measure is how long its own requests take. A
    request whose payload and response are both small (:data:`SMALL_EXCHANGE_BYTES`), sent
    on a connection that was already open (no dial in it), takes one network round trip plus
    the remote handler's time, so the lowest of the last few is an upper bound on the round
    trip, close to it as soon as one of them was a quick handler. Bounded: ``keep`` per peer,
    ``max_peers`` peers (the least recently measured are forgotten first).
    """

    def __init__(self, *, keep: int = 8, max_peers: int = 4096) -> None:
        self._keep = keep
        self._max_peers = max_peers
        self._peers: OrderedDict[str, deque[float]] = OrderedDict()

    def observe(self, peer_id: str, seconds: float, sent: int, received: int) -> None:
        """Note one exchange with ``peer_id`` (``sent`` and ``received`` bytes) if small."""
        if sent > SMALL_EXCHANGE_BYTES or received > SMALL_EXCHANGE_BYTES or seconds < 0:
            return
        recent = self._peers.get(peer_id)
        if recent is None:
            if len(self._peers) >= self._max_peers:
                self._peers.popitem(last=False)
            recent = self._peers[peer_id] = deque(maxlen=self._keep)
        else:
            self._peers.move_to_end(peer_id)
        recent.append(seconds)

    def lowest(self, peer_id: str) -> float | None:
        """The lowest recent small round trip to ``peer_id`` (seconds), or None."""
        recent = self._peers.get(peer_id)
        return min(recent) if recent else None
