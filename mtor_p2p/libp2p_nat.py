"""NAT traversal for the py-libp2p adapter: reachability, Circuit Relay v2, hole punching.

This is the libp2p adapter's second module (with :mod:`mtor_p2p.libp2p_host`, the only two
that import ``libp2p``). Services never see it: ``Network.connect`` takes relayed addresses,
requests go over whatever connection exists, and ``status`` reports what this module learnt.

* **Reachability** (``/mtor/dialback/1``): a node asks the peers it is directly connected to
  to open a *new* TCP connection to its address and check that a libp2p listener answers.
  py-libp2p's AutoNAT v1 server answers over the connection the request came on, so a
  firewalled host was told it is public (``../shared/notes/nat-traversal.md``, pitfall 3).
  A helper dials only the IP it sees the request come from (no reflection at third
  parties), at most :data:`DIALBACK_MAX_ADDRS` addresses. Two agreeing answers decide; the
  answers also say which address and port each helper saw, from which the NAT's behaviour
  follows (port kept: hole punching can work; port changed per destination: it cannot).
* **Relays** (Circuit Relay v2): public and bootstrap nodes serve ``hop`` with limits sized
  for coordination traffic (:class:`RelayLimitsConfig`) and provide :data:`RELAY_DHT_KEY` in
  the DHT. A node that is not public reserves on :attr:`NatSettings.relays_wanted` relays
  (bootstrap peers first, as soon as one is connected; relays found in the DHT only while
  still short), refreshes each reservation before
  it expires, replaces a relay that goes away, and advertises
  ``/<relay addr>/p2p/<relay>/p2p-circuit/p2p/<self>`` in identify and in its records.
* **Hole punching** (DCUtR): the side that *accepted* a relayed connection drives the
  upgrade (so the two sides do not start crossing sessions); once a direct connection
  verifies, the relayed one is closed after :data:`RELAY_CLOSE_GRACE_S`. Requests larger
  than :data:`RELAYED_MAX_REQUEST_BYTES` (operands, results) never go over a relay: they
  wait briefly for the punch and otherwise fail with a clear error.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import math
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Hashable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost, INetConn, INetStream
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import MAX_HOLE_PUNCH_ATTEMPTS, DCUtRProtocol
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode, to_proto_status
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.tools.anyio_service import background_trio_service
from libp2p.tools.constants import MAX_READ_LEN
from libp2p.transport.tcp import tcp as libp2p_tcp

from mtor_p2p.network import NetworkError, RemoteError, ip_address_of, is_loopback_ip

log = logging.getLogger(__name__)

DIALBACK_PROTOCOL = "/mtor/dialback/1"
#: DHT provider key under which relays announce themselves.
RELAY_DHT_KEY = "/mtor/relay/1"
#: Addresses one dial-back request may name; the request's size limit follows from it.
DIALBACK_MAX_ADDRS = 4
DIALBACK_MAX_REQUEST_BYTES = 2048
DIALBACK_MAX_REPLY_BYTES = 4096
#: How long a helper waits for the requester's listener to answer.
DIALBACK_TIMEOUT_S = 3.0
#: A helper serves one peer's dial-back at most this often, and this many peers' at once:
#: each request costs it up to DIALBACK_MAX_ADDRS outbound connection attempts.
DIALBACK_MIN_INTERVAL_S = 5.0
DIALBACK_CONCURRENT = 8
#: Peers whose last dial-back time is remembered (the oldest forgotten first).
DIALBACK_MEMORY = 4096
#: Addresses from a peer's DCUtR message that we dial (the message may hold hundreds).
PUNCH_MAX_ADDRS = 2
#: How long the plain dial before a hole punch may take (a reachable peer answers within a
#: round trip; behind a NAT it never answers).
UNILATERAL_DIAL_S = 1.0
#: How long the punching side waits for identify to name the peer's addresses.
IDENTIFY_WAIT_S = 2.0
#: Punches run at once, and how long one attempt may take (its own exchange included).
PUNCHES_AT_ONCE = 4
PUNCH_ATTEMPT_S = 20.0
#: DCUtR sessions a peer may start with us per window (NatSettings.punch_retry_s; each
#: makes us dial), and how many peers' session times are remembered.
PUNCH_SESSIONS_PER_WINDOW = 3
PUNCH_SESSION_MEMORY = 4096
#: The longest wait between rounds of punches for a pair that keeps failing.
PUNCH_RETRY_MAX_S = 3600.0
#: Relay: a circuit's allowance for its set-up, and how long a circuit may carry nothing
#: either way before it ends (the per-IP caps are in RelayLimitsConfig).
STREAM_SETUP_S = 15.0
CIRCUIT_IDLE_S = 120.0
#: Agreeing answers needed to call this node public or private.
REACHABILITY_CONFIRMATIONS = 2
#: How long a helper's verdict counts, and how many are kept.
VOTE_MEMORY_S = 300.0
MAX_VOTES = 64
#: Helpers asked per check (connected peers, direct connections only).
REACHABILITY_HELPERS = 4
#: Requests over a relay-only connection may carry at most this many bytes: coordination
#: (records, DHT, ledger gossip) fits, operands and results do not.
RELAYED_MAX_REQUEST_BYTES = 64 * 1024
#: Answers read over a relay-only connection may be at most this large (a DHT reply or a
#: ledger sync fits; a result does not).
RELAYED_MAX_RESPONSE_BYTES = 256 * 1024
#: How long a large request to a relay-only peer waits for the hole punch to finish.
DIRECT_WAIT_S = 5.0
#: After a direct connection verifies, the relayed one stays this long for streams in flight.
RELAY_CLOSE_GRACE_S = 5.0
#: A relay connected to us only by a connection it dialled is dialled back before we reserve
#: on it, at this many of its known addresses at most, within this long in all, once each
#: (py-libp2p's dial_addr tries an address 4 times): a circuit address is built from where we
#: reached the relay, never from its own claims. At most this many relays are dialled back
#: per keeper pass.
RELAY_DIAL_ADDRS = 3
RELAY_DIAL_S = 5.0
RELAY_DIAL_BACKS_PER_PASS = 2
#: An address a dial-back failed at is not dialled again for this long (the addresses are the
#: relay's own claims: a hostile peer could otherwise have every keeper pass dial third
#: parties), nor a relay that refused a reservation after being dialled back or none of whose
#: addresses tried answered (a peer that names new ones each pass would otherwise have 3
#: dialled every pass); at most this many of each are remembered.
RELAY_DIAL_RETRY_S = 120.0
RELAY_DIAL_MEMORY = 256
#: A reservation made again over a connection the relay dialled, with the circuit address of
#: the one before (no dial-back answered), is refreshed after this long rather than at 3/4 of
#: its life: the relay may have come back elsewhere, and identify may name it by then.
RELAY_FALLBACK_REFRESH_S = 30.0
REACHABILITY_STATES = ("unknown", "public", "private", "local")


@dataclass
class RelayLimitsConfig:
    """What a relay grants. Sized for coordination traffic, not for operands: a circuit
    carries records, DHT queries and small requests while two private peers punch a hole or
    when they cannot (about 20 KB/min per peer pair in a devnet)."""

    max_reservations: int = 128
    #: Circuits open at once to one reserved peer.
    max_circuits_per_peer: int = 8
    #: A circuit's life and bytes (both directions together); the peers redial after.
    circuit_seconds: int = 600
    circuit_bytes: int = 8 << 20
    #: How long a reservation lasts; clients refresh at 3/4 of it.
    reservation_ttl: int = 900
    #: Reservations one IP may hold (loopback exempt: a devnet), and circuits one source IP
    #: may hold to one destination: throwaway identities on one machine count as one.
    reservations_per_ip: int = 8
    circuits_per_source_ip: int = 2

    def to_libp2p(self) -> RelayLimits:
        """The same limits as py-libp2p's ``RelayLimits``."""
        return RelayLimits(
            duration=self.circuit_seconds,
            data=self.circuit_bytes,
            max_circuit_conns=self.max_circuits_per_peer,
            max_reservations=self.max_reservations,
            reservation_ttl=self.reservation_ttl,
        )


@dataclass
class NatSettings:
    """How a node deals with NATs. Defaults suit a home node and a public node alike."""

    #: Serve as a relay: "auto" (when found public, or a bootstrap node), "on", "off".
    relay_service: str = "auto"
    relay_limits: RelayLimitsConfig = field(default_factory=RelayLimitsConfig)
    #: Relays to hold reservations on while not public (0: never reserve).
    relays_wanted: int = 2
    hole_punching: bool = True
    #: A pair whose hole punches all failed (DCUtR's 3 attempts, a round) is tried again
    #: after this many seconds, doubling per failed round up to an hour: a starved peer, a
    #: firewall or a NAT mapping can change, and a relayed pair cannot carry operands. It is
    #: also the window in which a peer may start 3 sessions with us, so that the rounds of a
    #: peer with the same setting are never refused.
    punch_retry_s: float = 300.0
    #: Seconds between reachability checks (also re-checked when the observed IP changes).
    reachability_interval: float = 600.0
    #: Seconds between checks while the answer is still unknown.
    reachability_retry: float = 10.0
    #: How often the relay keeper looks at its reservations and relays.
    relay_check_interval: float = 5.0
    #: Treat loopback as a network: check reachability of a loopback-only node and dial
    #: loopback addresses back (tests). Off, a loopback-only node is "local" (a devnet) and a
    #: helper never dials loopback: a peer arriving through an ngrok agent is seen at
    #: 127.0.0.1, and "dial me back" would be "connect to any port of your own machine".
    loopback: bool = False


@dataclass
class Reservation:
    """A reservation we hold on a relay."""

    relay: str
    #: trio time at which to refresh (3/4 of the granted TTL).
    refresh_at: float
    expires_at: float
    #: Our circuit addresses through this relay.
    circuit_addrs: list[str]
    #: The connection it was made over: a relay that restarts forgets its reservations, and
    #: may be connected again (by the mesh's redial) before the keeper's next pass.
    conn: Any = field(default=None, compare=False, repr=False)


@dataclass
class DialbackAnswer:
    """One helper's answer to a dial-back request."""

    helper: str
    observed: tuple[str, int] | None
    #: addr -> "ok" | a reason it failed.
    results: dict[str, str]
    #: Our end of the connection the helper saw, (ip, port) (None: unknown).
    local: tuple[str, int] | None
    #: The helper's IP as we see it: confirmations count distinct helper IPs, so Sybils on
    #: one machine are one vote.
    helper_ip: str | None = None


def tunnel_needed(reachability: dict[str, Any] | None) -> bool:
    """Whether a node that has an ngrok tunnel still needs it (the bootstrap of last
    resort), from :meth:`NatTraversal.status`: not when it is publicly reachable, nor when
    it holds a relay reservation and its NAT lets hole punching work (peers then reach it
    through the relay and punch to a direct connection)."""
    if reachability is None:
        return True
    if reachability.get("reachability") == "public":
        return False
    has_relay = bool(reachability.get("relays"))
    return not has_relay or reachability.get("nat") == "port-changing"


class _Relay(CircuitV2Protocol):
    """py-libp2p's relay (hop and stop) with MTOR's fixes:

    * a reservation is always for the peer that asks (the library takes the peer named in
      the message: anyone could reserve slots in others' names); reservations of peers no
      longer connected are dropped before counting, and one IP holds at most
      ``reservations_per_ip`` (throwaway identities cannot fill the relay);
    * a circuit ends after its duration even when no byte moves (the library checks it only
      after a read returns), after :data:`CIRCUIT_IDLE_S` without a byte either way, and
      closes only its own two streams (the library keyed circuits by peer, so one circuit
      ending closed another to the same peer); one source IP holds at most
      ``circuits_per_source_ip`` circuits to one destination;
    * as the destination (stop), a circuit is accepted only from a relay we hold a
      reservation on (any directly connected peer could otherwise play relay for itself and
      open a DCUtR session), and its handshake has a deadline.
    """

    def __init__(
        self, host: IHost, config: RelayLimitsConfig, accept_stop_from: Callable[[str], bool]
    ) -> None:
        super().__init__(host, limits=config.to_libp2p(), allow_hop=False)
        self._config = config
        self._accept_stop_from = accept_stop_from
        #: (source IP, destination) -> circuits open now.
        self._circuits: dict[tuple[str, ID], int] = {}
        #: A circuit's (its stream pair's) last byte either way, shared by both directions.
        self._activity: dict[tuple[int, ...], list[float]] = {}

    def _remote_ip(self, stream: INetStream) -> str:
        try:
            remote = stream.muxed_conn.get_remote_address()  # type: ignore[attr-defined]
        except Exception:
            remote = None
        return str(remote[0]) if remote else "?"

    async def _handle_reserve(self, stream: INetStream, msg: HopMessage) -> None:
        peer = stream.muxed_conn.peer_id
        msg.peer.CopyFrom(CircuitPeerId(id=peer.to_bytes()))
        manager = self.resource_manager
        connected = self.host.get_network().connections
        for holder in [p for p in manager._reservations if not connected.get(p)]:
            del manager._reservations[holder]
        if manager.get_reservation(peer) is None:
            ip = self._remote_ip(stream)
            same_ip = 0
            for holder in manager._reservations:
                conns = conn_list(connected.get(holder))
                if any((remote_of(c) or ("", 0))[0] == ip for c in conns):
                    same_ip += 1
            if same_ip >= self._config.reservations_per_ip and not is_loopback_ip(ip):
                await write_delimited_msg(
                    stream,
                    HopMessage(
                        type=HopMessage.STATUS,
                        status=to_proto_status(StatusCode.RESOURCE_LIMIT_EXCEEDED),
                    ),
                )
                return
        await super()._handle_reserve(stream, msg)

    async def _handle_connect(self, stream: INetStream, msg: HopMessage) -> None:
        try:
            destination = ID(msg.peer.id)
        except Exception:
            await self._send_status(stream, StatusCode.MALFORMED_MESSAGE, "bad peer")
            await stream.reset()
            return
        key = (self._remote_ip(stream), destination)
        if self._circuits.get(key, 0) >= self._config.circuits_per_source_ip:
            await self._send_status(
                stream, StatusCode.RESOURCE_LIMIT_EXCEEDED, "too many circuits from one IP"
            )
            await stream.reset()
            return
        self._circuits[key] = self._circuits.get(key, 0) + 1
        try:
            # The whole circuit, handshake included, ends with its duration.
            with trio.move_on_after(self.limits.duration + STREAM_SETUP_S):
                await super()._handle_connect(stream, msg)
        finally:
            self._circuits[key] -= 1
            if not self._circuits[key]:
                del self._circuits[key]
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await self._close_stream(stream)

    async def _relay_data(
        self,
        src_stream: INetStream,
        dst_stream: INetStream,
        peer_id: ID,
        deadline: float | None = None,
        circuit_data_limit: list[int] | None = None,
    ) -> None:
        # One direction of a circuit. The two directions share the byte budget (as in the
        # library) and a last-activity time, kept per circuit (keyed by its stream pair).
        key = tuple(sorted((id(src_stream), id(dst_stream))))
        activity = self._activity.setdefault(key, [trio.current_time()])
        # The circuit's duration (monotonic, from the library) ends it even with no traffic.
        left = deadline - time.monotonic() if deadline is not None else math.inf
        try:
            with trio.move_on_after(max(0.0, left)):
                await self._pump(src_stream, dst_stream, activity, circuit_data_limit)
        except (trio.TooSlowError, Exception) as exc:
            log.debug("circuit for %s ends: %s: %s", peer_id, type(exc).__name__, exc)
        finally:
            self._activity.pop(key, None)
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                for s in (src_stream, dst_stream):
                    try:
                        await s.reset()
                    except Exception:
                        pass
            # The library's table of circuits by peer: drop only entries of this circuit.
            for peer, pair in list(self._active_relays.items()):
                if src_stream in pair or dst_stream in pair:
                    del self._active_relays[peer]

    async def _pump(
        self,
        src_stream: INetStream,
        dst_stream: INetStream,
        activity: list[float],
        circuit_data_limit: list[int] | None,
    ) -> None:
        while True:
            with trio.move_on_after(CIRCUIT_IDLE_S) as idle:
                data = await src_stream.read(MAX_READ_LEN)
            if idle.cancelled_caught:
                if trio.current_time() - activity[0] >= CIRCUIT_IDLE_S:
                    return  # idle both ways: the circuit ends
                continue
            if not data:
                return
            activity[0] = trio.current_time()
            if circuit_data_limit is not None:
                if len(data) > circuit_data_limit[0]:
                    await self._send_status(
                        src_stream,
                        StatusCode.RESOURCE_LIMIT_EXCEEDED,
                        "Data transfer limit exceeded",
                    )
                    return
                circuit_data_limit[0] -= len(data)
            with trio.fail_after(self.write_timeout):
                await dst_stream.write(data)

    async def _handle_stop_stream(self, stream: INetStream) -> None:
        relay = str(stream.muxed_conn.peer_id)
        if not self._accept_stop_from(relay):
            await self._send_stop_status(
                stream, StatusCode.PERMISSION_DENIED, "not a relay we reserved on"
            )
            await self._close_stream(stream)
            return
        with trio.move_on_after(STREAM_SETUP_S) as scope:
            await super()._handle_stop_stream(stream)
        if scope.cancelled_caught:
            await self._close_stream(stream)


async def _open_tcp_stream_from(host: str, port: int, source: tuple[str, int]) -> trio.SocketStream:
    """A TCP connection to ``host:port`` from ``source``, the listen address (a hole punch's
    SYN must leave from the port the peer was told), whose socket is closed however the
    attempt ends.

    py-libp2p's own closed the socket on a refusal but not when the punch's deadline
    cancelled the connect: the socket kept retransmitting its SYN until collected, and every
    later dial of the same pair of addresses, the punch's next try 7 s later and the next
    round alike, failed at once with "Cannot assign requested address" (the NAT lab,
    2026-12-07; pitfall 18). Otherwise it behaves as the library's: a source that cannot be
    bound falls back to an ephemeral port (no punching from there).
    """
    src_ip, src_port = source
    if (":" in src_ip) != (":" in host):
        raise libp2p_tcp.OpenConnectionError(f"source {src_ip} and {host} differ in IP family")
    family = trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET
    sock = trio.socket.socket(family, trio.socket.SOCK_STREAM)
    try:
        libp2p_tcp._set_reuse_flags(sock)
        try:
            await sock.bind((src_ip, src_port))
        except OSError:
            sock.close()
            return await trio.open_tcp_stream(host, port)
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def _punch_dials_close_their_sockets() -> None:
    """Have py-libp2p's TCP transport dial from a source address with
    :func:`_open_tcp_stream_from` (it calls the function of its module by name)."""
    libp2p_tcp._open_tcp_stream_from = _open_tcp_stream_from  # type: ignore[attr-defined]


class PunchRounds:
    """When a pair whose hole punches all failed is tried again: a round (DCUtR's attempts)
    ends in failure, and the next may start ``first_retry_s`` later, doubling per failed
    round up to ``max_retry_s``. Peers are forgotten on success and on disconnection."""

    def __init__(self, first_retry_s: float, max_retry_s: float = PUNCH_RETRY_MAX_S) -> None:
        self.first_retry_s = first_retry_s
        self.max_retry_s = max(max_retry_s, first_retry_s)
        #: peer -> (failed rounds, when the next may start).
        self._failed: dict[Hashable, tuple[int, float]] = {}

    def failed(self, peer: Hashable, now: float) -> float:
        """A round with ``peer`` failed at ``now``; when the next may start."""
        rounds = self._failed.get(peer, (0, 0.0))[0] + 1
        wait = min(self.first_retry_s * 2 ** min(rounds - 1, 32), self.max_retry_s)
        self._failed[peer] = (rounds, now + wait)
        return now + wait

    def due(self, peer: Hashable, now: float) -> bool:
        """Whether a new round with ``peer`` may start."""
        entry = self._failed.get(peer)
        return entry is None or now >= entry[1]

    def next_at(self, peer: Hashable) -> float | None:
        """When the next round with ``peer`` may start (None: no failed round)."""
        entry = self._failed.get(peer)
        return None if entry is None else entry[1]

    def forget(self, peer: Hashable) -> None:
        self._failed.pop(peer, None)

    def __len__(self) -> int:
        return len(self._failed)


class _HolePuncher(DCUtRProtocol):
    """DCUtR with MTOR's choices: only the side that accepted the relayed connection drives
    (both driving starts crossing sessions), each punch in its own task with a deadline
    (a peer that never answers must not hold up the others), dials time out fast
    (pitfall 5), a peer's own sessions are accepted only over a relayed connection, one at
    a time and a few per ``retry_s``, and the relayed connection closes soon after the direct
    one verifies. A pair whose attempts all failed gets another round later
    (:class:`PunchRounds`): py-libp2p alone would leave it relayed until it disconnects."""

    def __init__(
        self,
        host: IHost,
        on_result: Callable[[str, bool, float, float | None], None],
        retry_s: float,
    ) -> None:
        super().__init__(host, read_timeout=5, write_timeout=5, dial_timeout=3)
        _punch_dials_close_their_sockets()
        self._on_result = on_result
        self._session_window_s = retry_s
        self.rounds = PunchRounds(retry_s)
        self._punching: set[ID] = set()
        self._slots = trio.Semaphore(PUNCHES_AT_ONCE)
        #: peer -> when its recent sessions with us started (oldest peers forgotten first).
        self._sessions: OrderedDict[ID, list[float]] = OrderedDict()

    async def _auto_drive_loop(self) -> None:
        me = self.host.get_id()
        #: peer -> when we first saw its relayed connection: a punch's time counts from it.
        first_seen: dict[ID, float] = {}
        while True:
            await trio.sleep(0.2)
            connections = self.host.get_network().connections
            for peer_id in [p for p in first_seen if not connections.get(p)]:
                del first_seen[peer_id]
                self.rounds.forget(str(peer_id))  # as py-libp2p forgets its attempts
            for peer_id, conns in list(connections.items()):
                if peer_id == me or peer_id in self._punching or peer_id in self._in_progress:
                    continue
                # The cheap test first: nearly every peer has a direct connection.
                if _has_direct(conns) or not _we_drive(conns, me, peer_id):
                    continue
                now = trio.current_time()
                seen = first_seen.setdefault(peer_id, now)
                if self._hole_punch_attempts.get(peer_id, 0) >= MAX_HOLE_PUNCH_ATTEMPTS:
                    if not self.rounds.due(str(peer_id), now):
                        continue
                    self._hole_punch_attempts.pop(peer_id, None)  # a new round
                waited = trio.current_time() - seen
                if not _direct_addrs(self.host, peer_id) and waited < IDENTIFY_WAIT_S:
                    # Identify has not told us the peer's addresses yet: the plain dial that
                    # comes first would have nothing to dial.
                    continue
                if self._nursery is not None and _try_acquire(self._slots):
                    self._punching.add(peer_id)
                    self._nursery.start_soon(self._punch, peer_id, seen)

    async def _punch(self, peer_id: ID, seen: float) -> None:
        try:
            ok = False
            with trio.move_on_after(PUNCH_ATTEMPT_S):
                try:
                    ok = await self.initiate_hole_punch(peer_id)
                except Exception as exc:  # a peer's state must never end the loop (or host)
                    log.debug("hole punch to %s: %s: %s", peer_id, type(exc).__name__, exc)
                if not ok:
                    # The library may report failure while its punch lands a moment later
                    # (pitfall 4): look again before saying so.
                    with trio.move_on_after(2.0):
                        connections = self.host.get_network().connections
                        while not _has_direct(connections.get(peer_id)):  # noqa: ASYNC110
                            await trio.sleep(0.1)
                    ok = _has_direct(self.host.get_network().connections.get(peer_id))
            now = trio.current_time()
            retry_at = None
            if ok:
                self.rounds.forget(str(peer_id))
            elif self._hole_punch_attempts.get(peer_id, 0) >= MAX_HOLE_PUNCH_ATTEMPTS:
                retry_at = self.rounds.failed(str(peer_id), now)
            # Every attempt is reported (a later success replaces an earlier failure).
            self._on_result(
                str(peer_id), ok, now - seen, None if retry_at is None else retry_at - now
            )
        finally:
            self._punching.discard(peer_id)
            self._slots.release()

    async def _handle_dcutr_stream(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        conns = self.host.get_network().connections.get(peer)
        now = trio.current_time()
        recent = [t for t in self._sessions.get(peer, []) if now - t < self._session_window_s]
        if (
            not conn_list(conns)
            or _has_direct(conns)
            or _we_drive(conns, self.host.get_id(), peer)
            or peer in self._in_progress
            or len(recent) >= PUNCH_SESSIONS_PER_WINDOW
        ):
            # Not relayed (nothing to upgrade), relayed to us (then we drive: a peer that
            # dialled us has no session to start), already punching with it, or too often:
            # a session makes us dial the addresses the peer names.
            await stream.close()
            return
        self._sessions[peer] = [*recent, now]
        self._sessions.move_to_end(peer)
        while len(self._sessions) > PUNCH_SESSION_MEMORY:
            self._sessions.popitem(last=False)
        await super()._handle_dcutr_stream(stream)

    async def _try_unilateral_upgrade(self, peer_id: ID) -> bool:
        # DCUtR's step 0, a plain dial of the peer's known direct addresses, with a short
        # deadline of its own: behind a NAT those are a private LAN address and a router
        # that drops unsolicited SYNs, and the library's dial timeout (3 s) put that long
        # before every punch (p50 3.2 s to direct in the NAT lab); a reachable peer answers
        # within a round trip.
        addrs = _direct_addrs(self.host, peer_id)
        if addrs:
            with trio.move_on_after(UNILATERAL_DIAL_S):
                async with trio.open_nursery() as nursery:
                    for addr in addrs[:PUNCH_MAX_ADDRS]:
                        nursery.start_soon(self._dial_peer, peer_id, addr)
        return await self._verify_direct_connection(peer_id)

    def _decode_observed_addrs(self, addr_bytes: list[bytes]) -> list[multiaddr.Multiaddr]:
        # A peer's CONNECT message names the addresses we dial: keep a few plain TCP ones,
        # so that a hostile peer cannot turn us into a dialler of hundreds of third parties.
        # One IP (where the peer's NAT is: its ports may differ), plain TCP, a few ports.
        kept: list[multiaddr.Multiaddr] = []
        for addr in super()._decode_observed_addrs(addr_bytes[: 4 * PUNCH_MAX_ADDRS]):
            target = _tcp_target(str(addr))
            if target is None or (kept and not _same_ip(target[0], _tcp_target(str(kept[0]))[0])):  # type: ignore[index]
                continue
            kept.append(addr)
            if len(kept) >= PUNCH_MAX_ADDRS:
                break
        return kept

    def _schedule_relay_close(self, peer_id: ID) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(
                self._close_relayed_conns_after_grace, peer_id, RELAY_CLOSE_GRACE_S
            )


def _direct_addrs(host: IHost, peer_id: ID) -> list[multiaddr.Multiaddr]:
    """The peer's known addresses that are not relayed (none if the peerstore has none:
    py-libp2p raises PeerStoreError for a peer it holds nothing about)."""
    try:
        known = host.get_peerstore().addrs(peer_id)
    except Exception:
        return []
    return [a for a in known if "/p2p-circuit" not in str(a)]


def _try_acquire(semaphore: trio.Semaphore) -> bool:
    try:
        semaphore.acquire_nowait()
    except trio.WouldBlock:
        return False
    return True


def _dialled(conn: INetConn) -> bool:
    """Whether this side dialled ``conn`` (py-libp2p records the direction it was added in)."""
    return getattr(getattr(conn, "direction", None), "name", "") == "OUTBOUND"


def conn_list(conns: Any) -> list[INetConn]:
    """A swarm's entry for one peer (None, a connection, or a list) as a list."""
    if not conns:
        return []
    return list(conns) if isinstance(conns, list) else [conns]


#: The text of each connection's transport addresses, made once per connection: they do not
#: change, and the hole-punch loop classifies every connection five times a second (its body,
#: one host with four connections: 28.1 -> 6.6 us per tick; it grows with the connections).
_ADDRESS_TEXTS: weakref.WeakKeyDictionary[Any, tuple[str, ...]] = weakref.WeakKeyDictionary()


def _address_texts(conn: INetConn) -> tuple[str, ...]:
    """``conn``'s transport addresses as text (raises as ``get_transport_addresses`` does)."""
    try:
        return _ADDRESS_TEXTS[conn]
    except (KeyError, TypeError):
        pass
    texts = tuple(str(a) for a in conn.get_transport_addresses())
    if texts:  # none yet may mean not set up yet: asked again next time
        try:
            _ADDRESS_TEXTS[conn] = texts
        except TypeError:  # an object that takes no weak reference: not kept
            pass
    return texts


@functools.lru_cache(maxsize=16)
def _accepted_circuit_prefix(me: ID) -> str:
    """How py-libp2p labels the relayed connections we accepted (pitfall 7)."""
    return f"/p2p/{me}/p2p-circuit"


def is_relayed(conn: INetConn) -> bool:
    """Whether a connection goes through a relay (all its addresses are circuits)."""
    try:
        addrs = _address_texts(conn)
    except Exception:
        return False
    return bool(addrs) and all("/p2p-circuit" in a for a in addrs)


def _has_direct(conns: Any) -> bool:
    return any(not is_relayed(c) and not c.is_closed for c in conn_list(conns))


def connection_kind_of(conns: Any) -> str:
    """A swarm's entry for one peer as ``"direct"`` (an open direct connection),
    ``"relayed"`` (open connections, all through relays) or ``"none"``."""
    open_conns = [c for c in conn_list(conns) if not c.is_closed]
    if not open_conns:
        return "none"
    return "relayed" if all(is_relayed(c) for c in open_conns) else "direct"


def _relayed_in(conns: Any, me: ID) -> bool:
    """Whether one of ``conns`` is a relayed connection we accepted: py-libp2p labels those
    ``/p2p/<our own id>/p2p-circuit/...`` (pitfall 7), the ones we dialled name the relay."""
    mine = _accepted_circuit_prefix(me)
    for conn in conn_list(conns):
        try:
            if any(a.startswith(mine) for a in _address_texts(conn)):
                return True
        except Exception:
            continue
    return False


def _we_drive(conns: Any, me: ID, peer: ID) -> bool:
    """Whether we drive the hole punch with ``peer``: we accepted its relayed connection.
    When each side dialled the other through a relay at once (both hold an accepted and a
    dialled circuit), the smaller peer ID drives: otherwise both would drive and each refuse
    the other's session, and no punch could ever succeed."""
    if not _relayed_in(conns, me):
        return False
    mine = _accepted_circuit_prefix(me)
    dialled = False
    for conn in conn_list(conns):
        try:
            addrs = _address_texts(conn)
        except Exception:
            continue
        if addrs and all("/p2p-circuit" in a and not a.startswith(mine) for a in addrs):
            dialled = True
    return not dialled or str(me) < str(peer)


def _socket_of(conn: INetConn) -> Any:
    """The TCP socket under a direct connection, or None. Walks py-libp2p's wrappers
    (Yamux -> SecureSession -> Noise read-writer -> RawConnection -> TrioTCPStream ->
    trio SocketStream -> socket)."""
    obj: Any = getattr(conn, "muxed_conn", None)
    for _ in range(8):
        if obj is None or hasattr(obj, "getsockname"):
            return obj
        obj = next(
            (
                getattr(obj, a)
                for a in ("secured_conn", "conn", "stream", "socket")
                if hasattr(obj, a)
            ),
            None,
        )
    return None


def remote_of(conn: INetConn) -> tuple[str, int] | None:
    """The (ip, port) a connection's other end has, as we see it (None: unknown)."""
    try:
        remote = conn.muxed_conn.get_remote_address()  # type: ignore[attr-defined]
    except Exception:
        return None
    if not remote:
        return None
    return str(remote[0]), int(remote[1])


def _same_ip(a: str, b: str) -> bool:
    """Whether two IP strings name one address (an IPv4-mapped IPv6 form included)."""
    x = ip_address_of(a)
    return x is not None and x == ip_address_of(b)


#: NAT64's well-known prefix (RFC 6052): an address in it names the IPv4 address it ends in.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _dialable_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, loopback: bool) -> bool:
    """Whether a relay's claimed address may be dialled back: not unspecified, multicast,
    link-local or reserved (broadcast), nor loopback unless ``loopback`` (it stands for a
    network, in tests); an IPv4 address inside NAT64's prefix is judged as itself."""
    if isinstance(ip, ipaddress.IPv6Address) and ip in _NAT64:
        ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.is_unspecified or ip.is_multicast or ip.is_link_local or ip.is_reserved:
        return False
    return loopback or not ip.is_loopback


def _recent(memory: dict[str, float], key: str, within: float) -> bool:
    """Whether ``memory`` holds ``key`` from less than ``within`` seconds ago."""
    at = memory.get(key)
    return at is not None and trio.current_time() - at < within


def _remember(memory: dict[str, float], key: str) -> None:
    """Note ``key`` now in a memory of at most RELAY_DIAL_MEMORY keys, the oldest dropped."""
    memory.pop(key, None)  # re-inserted last: the oldest go first
    memory[key] = trio.current_time()
    while len(memory) > RELAY_DIAL_MEMORY:
        del memory[next(iter(memory))]


def _tcp_target(addr: str) -> tuple[str, int] | None:
    """(ip, port) of a plain ``/ip4|ip6/../tcp/..`` address; None for anything else."""
    try:
        ma = multiaddr.Multiaddr(addr)
        protos = [p.name for p in ma.protocols()]
        if "p2p-circuit" in protos or "tcp" not in protos:
            return None
        ip = ma.value_for_protocol("ip4") if "ip4" in protos else ma.value_for_protocol("ip6")
        return str(ip), int(ma.value_for_protocol("tcp"))
    except Exception:
        return None


class NatTraversal:
    """Reachability, relays and hole punching for one py-libp2p host (see module doc).

    ``network`` is the :class:`~mtor_p2p.libp2p_host.Libp2pNetwork` it belongs to: the
    dial-back protocol is served and asked through its request/response plumbing, so it
    gets the same admission, limits and peer-fault handling as every other protocol.
    """

    def __init__(
        self,
        host: IHost,
        network: Any,
        settings: NatSettings,
        *,
        bootstrap_node: bool,
        bootstrap_peers: Callable[[], list[str]],
        circuit_addrs: list[str],
    ) -> None:
        self._host = host
        self._network = network
        self.settings = settings
        self._bootstrap_node = bootstrap_node
        self._bootstrap_peers = bootstrap_peers
        #: The host's list of announced circuit addresses, kept equal to our reservations'.
        self._circuit_addrs = circuit_addrs
        self.reachability = "unknown"
        self.nat = "unknown"
        self.reachability_reason = "not checked yet"
        self.observed_ip: str | None = None
        self.last_check: float | None = None
        self.reservations: dict[str, Reservation] = {}
        self.relay_refusals: dict[str, str] = {}
        self.hop_enabled = False
        #: peer -> (direct?, seconds from first relayed contact, when)
        self.punches: dict[str, tuple[bool, float, float]] = {}
        self._relay: _Relay | None = None
        self._transport: CircuitV2Transport | None = None
        self._puncher: _HolePuncher | None = None
        self._check_now = trio.Event()
        #: Set when a pass of the relay keeper is worth making before its interval is up.
        self._keeper_wake = trio.Event()
        #: When the keeper last looked up relays in the DHT.
        self._looked_up_at: float | None = None
        #: When a dial-back last failed at an address ("ip:port"; see _dial_relay), when a
        #: relay was last given up on (refused us after a dial-back, or answered at none of
        #: the addresses tried), and the dial-backs left to this pass.
        self._dial_back_failed: dict[str, float] = {}
        self._dial_back_refused: dict[str, float] = {}
        self._dial_backs_left = RELAY_DIAL_BACKS_PER_PASS
        self._dialback_slots = trio.Semaphore(DIALBACK_CONCURRENT)
        #: helper IP (or peer, on loopback) -> (when, "reached"|"failed", its answer).
        self._votes: OrderedDict[str, tuple[float, str, DialbackAnswer]] = OrderedDict()
        #: peer -> when we last served its dial-back (oldest first).
        self._dialback_served: OrderedDict[str, float] = OrderedDict()

    # -- life ---------------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[NatTraversal]:
        """Serve the relay's stop (and maybe hop) side, DCUtR and the dial-back protocol,
        and run the reachability and relay-keeper loops while open."""
        limits = self.settings.relay_limits.to_libp2p()
        relay = self._relay = _Relay(
            self._host,
            self.settings.relay_limits,
            accept_stop_from=lambda relay: relay in self.reservations,
        )
        self._transport = CircuitV2Transport(
            self._host, relay, RelayConfig(roles=RelayRole.STOP, limits=limits)
        )
        self._network.handle(
            DIALBACK_PROTOCOL,
            self._serve_dialback,
            max_request_bytes=DIALBACK_MAX_REQUEST_BYTES,
            timeout=DIALBACK_TIMEOUT_S * DIALBACK_MAX_ADDRS + 5.0,
        )
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(background_trio_service(relay))
            if self.settings.hole_punching:
                self._puncher = _HolePuncher(
                    self._host, self._punch_result, self.settings.punch_retry_s
                )
                await stack.enter_async_context(background_trio_service(self._puncher))
            if self.settings.relay_service == "on" or (
                self.settings.relay_service == "auto" and self._bootstrap_node
            ):
                self._enable_hop()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reachability_loop)
                if self.settings.relays_wanted > 0:
                    nursery.start_soon(self._relay_keeper_loop)
                try:
                    yield self
                finally:
                    nursery.cancel_scope.cancel()

    def _enable_hop(self) -> None:
        if self.hop_enabled or self._relay is None:
            return
        self.hop_enabled = True
        self._host.set_stream_handler(
            HOP_PROTOCOL_ID,
            self._network._guard(str(HOP_PROTOCOL_ID), self._relay._handle_hop_stream),
        )
        log.info("serving as a relay (circuit relay v2 hop)")

    # -- what the rest of the adapter asks -------------------------------------------------

    def circuit_addrs(self) -> list[str]:
        """Our addresses through the relays we hold reservations on."""
        return [a for r in self.reservations.values() for a in r.circuit_addrs]

    def _publish_circuit_addrs(self) -> None:
        self._circuit_addrs[:] = self.circuit_addrs()

    def relay_only(self, peer_id: str) -> bool:
        """Whether every open connection to ``peer_id`` goes through a relay."""
        conns = conn_list(self._host.get_network().connections.get(ID.from_base58(peer_id)))
        return bool(conns) and not _has_direct(conns)

    def connection_kind(self, peer_id: str) -> str:
        """ "direct", "relayed" or "none" (see :func:`connection_kind_of`)."""
        return connection_kind_of(self._host.get_network().connections.get(ID.from_base58(peer_id)))

    def connection_kinds(self, limit: int = 64) -> dict[str, str]:
        """peer -> "direct" or "relayed", for (at most ``limit``) connected peers."""
        kinds = {}
        for peer_id, conns in list(self._host.get_network().connections.items())[:limit]:
            kind = connection_kind_of(conns)
            if kind != "none":
                kinds[str(peer_id)] = kind
        return kinds

    async def wait_direct(self, peer_id: str, timeout: float) -> bool:
        """Wait up to ``timeout`` for a direct connection to ``peer_id``, dialling its
        direct addresses meanwhile (a tunnel or port forward it announced works even when
        hole punching cannot, and only the punching side tries them by itself)."""
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._dial_direct, peer_id)
                while self.relay_only(peer_id):  # noqa: ASYNC110 (py-libp2p has no event)
                    await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
        return not self.relay_only(peer_id)

    async def _dial_direct(self, peer_id: str) -> None:
        pid = ID.from_base58(peer_id)
        addrs = _direct_addrs(self._host, pid)

        async def dial(addr: multiaddr.Multiaddr) -> None:
            try:
                with trio.fail_after(DIRECT_WAIT_S):
                    await self._host.get_network().dial_addr(addr, pid)
            except Exception as exc:  # unreachable addresses are the expected case
                log.debug("direct dial %s to %s failed: %s", addr, peer_id, exc)

        async with trio.open_nursery() as nursery:
            for addr in addrs[:8]:
                nursery.start_soon(dial, addr)

    async def dial_circuit(self, addr: multiaddr.Multiaddr) -> None:
        """Connect through the relay named in a ``/p2p-circuit`` address (pitfall 2: the
        host's own dialer drops such addresses)."""
        if self._transport is None:
            raise NetworkError("relayed addresses need NAT traversal, which is off")
        await self._transport.dial(addr)

    def status(self) -> dict[str, Any]:
        """What ``mtor-peer status`` shows under ``reachability``."""
        now = trio.current_time()
        relays = sorted(self.reservations)
        names = ", ".join("…" + r[-8:] for r in relays)
        if self.reachability == "private":
            summary = f"private via relays {names}" if relays else "private, no relay yet"
        elif relays:
            # Not confirmed private (a single helper, or helpers that disagree), but reachable
            # through these relays all the same.
            summary = f"{self.reachability}, reserved on relays {names}"
        else:
            summary = self.reachability
        return {
            "summary": summary,
            "reachability": self.reachability,
            "reason": self.reachability_reason,
            "nat": self.nat,
            "observed_ip": self.observed_ip,
            "relays": [
                {"relay": r.relay, "addrs": r.circuit_addrs} for r in self.reservations.values()
            ],
            "relay_refusals": dict(self.relay_refusals),
            "relay_service": self.hop_enabled,
            "connections": self.connection_kinds(),
            "hole_punches": [
                {"peer": p, "direct": ok, "seconds": round(s, 3)}
                | (
                    {"retry_in": round(max(0.0, retry_at - now), 1)}
                    if not ok
                    and self._puncher is not None
                    and (retry_at := self._puncher.rounds.next_at(p)) is not None
                    else {}
                )
                for p, (ok, s, _) in sorted(self.punches.items(), key=lambda i: -i[1][2])[:16]
            ],
        }

    def _punch_result(
        self, peer: str, ok: bool, seconds: float, retry_in: float | None = None
    ) -> None:
        """One attempt's outcome; ``retry_in``: its round failed, and the next may start in
        this many seconds (for the log; ``status`` asks the puncher's rounds)."""
        self.punches[peer] = (ok, seconds, trio.current_time())
        while len(self.punches) > 256:
            del self.punches[min(self.punches, key=lambda p: self.punches[p][2])]
        if ok:
            log.info("hole punch to %s: direct after %.2f s", peer, seconds)
        else:
            why = (
                "; our NAT changes ports per destination, which defeats hole punching"
                if self.nat == "port-changing"
                else ""
            )
            again = f"; trying again in {retry_in:.0f} s" if retry_in is not None else ""
            log.info("hole punch to %s failed: relayed for now%s%s", peer, why, again)

    # -- reachability --------------------------------------------------------------------

    async def _serve_dialback(self, sender: str, payload: bytes) -> bytes:
        """Dial the requester back on new connections, at the IP its request came from."""
        try:
            request = json.loads(payload)
            addrs = request["addrs"]
            if request.get("v") != 1 or not isinstance(addrs, list):
                raise ValueError("version or addrs")
            if len(addrs) > DIALBACK_MAX_ADDRS or not all(isinstance(a, str) for a in addrs):
                raise ValueError("too many addrs")
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            # RecursionError: JSON nested deeper than the interpreter's recursion limit
            # (2 KiB of '[' is 2,048 levels), which json's parser reports that way.
            raise RemoteError(f"malformed dial-back request: {exc}") from exc
        if not addrs:
            # "Which address do you see?" costs no dial: answered at once, not rate-limited.
            observed, results = await self._dial_back(sender, [])
            return json.dumps({"v": 1, "observed": observed, "results": results}).encode()
        now = trio.current_time()
        last = self._dialback_served.get(sender)
        if last is not None and now - last < DIALBACK_MIN_INTERVAL_S:
            raise RemoteError(
                f"dial-back asked again too soon (once per {DIALBACK_MIN_INTERVAL_S:g} s)"
            )
        try:
            self._dialback_slots.acquire_nowait()
        except trio.WouldBlock:
            raise RemoteError("busy") from None
        try:
            self._dialback_served[sender] = now
            self._dialback_served.move_to_end(sender)
            while len(self._dialback_served) > DIALBACK_MEMORY:
                self._dialback_served.popitem(last=False)
            observed, results = await self._dial_back(sender, list(dict.fromkeys(addrs)))
        finally:
            self._dialback_slots.release()
        reply = {"v": 1, "observed": list(observed) if observed else None, "results": results}
        return json.dumps(reply).encode()

    async def _dial_back(
        self, sender: str, addrs: list[str]
    ) -> tuple[tuple[str, int] | None, dict[str, str]]:
        observed = None
        for conn in conn_list(self._host.get_network().connections.get(ID.from_base58(sender))):
            if not is_relayed(conn):
                observed = remote_of(conn)
                if observed is not None:
                    break
        results: dict[str, str] = {}
        targets: dict[str, tuple[str, int]] = {}
        for addr in addrs:
            target = _tcp_target(addr)
            if observed is None:
                results[addr] = "not dialled: no direct connection to the requester"
            elif target is None:
                results[addr] = "not dialled: not a TCP address"
            elif not _same_ip(target[0], observed[0]):
                # Only the requester's own IP: a dial-back must not be a way to make this
                # node connect to third parties.
                results[addr] = "not dialled: not the IP the request came from"
            elif is_loopback_ip(target[0]) and not self.settings.loopback:
                results[addr] = "not dialled: loopback"
            else:
                targets[addr] = target

        async def probe(addr: str, target: tuple[str, int]) -> None:
            results[addr] = await self._probe_peer(*target, sender)

        async with trio.open_nursery() as nursery:
            for addr, target in targets.items():
                nursery.start_soon(probe, addr, target)
        return observed, {a: results[a] for a in addrs}

    async def _probe_peer(self, ip: str, port: int, peer: str) -> str:
        """Open a new TCP connection to ``ip:port`` and run the security handshake expecting
        ``peer``: "ok" only if that peer answers there (not just any listener). One reason
        for every failure, so that the answers say nothing about other ports."""
        proto = "ip6" if ":" in ip else "ip4"
        maddr = multiaddr.Multiaddr(f"/{proto}/{ip}/tcp/{port}/p2p/{peer}")
        swarm = self._host.get_network()
        try:
            with trio.fail_after(DIALBACK_TIMEOUT_S):
                transport = swarm.transport_manager.transport_for_dialing(maddr)
                if transport is None:
                    raise NetworkError("no transport")
                raw = await transport.dial(maddr)
                try:
                    await swarm.upgrader.upgrade_security(raw, True, ID.from_base58(peer))
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(1):
                        await raw.close()
        except Exception as exc:  # refused, dropped, timed out, or someone else answered
            log.debug("dial-back of %s at %s:%d failed: %s", peer, ip, port, exc)
            return "failed: the requester did not answer there"
        return "ok"

    def _candidate_addrs(self, observed_ip: str | None) -> list[str]:
        """Addresses to have dialled back: the observed IP with each listen port (what a
        port-preserving NAT or a plain public host would expose), and announced addresses."""
        addrs: list[str] = []
        ports = self._network.listen_ports()
        if observed_ip is not None:
            proto = "ip6" if ":" in observed_ip else "ip4"
            addrs += [f"/{proto}/{observed_ip}/tcp/{p}" for p in ports]
        for a in self._network._settings.announce_addrs:
            if _tcp_target(a) is not None:
                addrs.append(a.split("/p2p/")[0])
        return list(dict.fromkeys(addrs))[:DIALBACK_MAX_ADDRS]

    def _helpers(self) -> list[tuple[str, INetConn]]:
        me = self._host.get_id()
        found = []
        for peer_id, conns in list(self._host.get_network().connections.items()):
            if peer_id == me:
                continue
            for conn in conn_list(conns):
                if not is_relayed(conn) and not conn.is_closed:
                    found.append((str(peer_id), conn))
                    break
        return found

    async def _ask(self, helper: str, conn: INetConn, addrs: list[str]) -> DialbackAnswer | None:
        sock = _socket_of(conn)
        local = None
        if sock is not None:
            try:
                name = sock.getsockname()
                local = (str(name[0]), int(name[1]))
            except OSError:
                local = None
        payload = json.dumps({"v": 1, "addrs": addrs}).encode()
        try:
            raw = await self._network.request(
                helper,
                DIALBACK_PROTOCOL,
                payload,
                timeout=DIALBACK_TIMEOUT_S + 5.0,
                max_response_bytes=DIALBACK_MAX_REPLY_BYTES,
            )
        except (NetworkError, RemoteError) as exc:
            log.debug("dial-back via %s failed: %s", helper, exc)
            return None
        try:
            reply = json.loads(raw)
            if not isinstance(reply, dict) or not isinstance(reply.get("results"), dict):
                raise ValueError("not an object with results")
            observed = reply.get("observed")
            obs = None
            if observed is not None:
                if not isinstance(observed, list) or len(observed) != 2:
                    raise ValueError("observed is not [ip, port]")
                ip, port = str(observed[0]), int(observed[1])
                ipaddress.ip_address(ip)
                if not 0 < port < 65536:
                    raise ValueError("observed port out of range")
                obs = (ip, port)
            # Only answers about what we asked count: a result for another address is noise.
            results = {a: str(reply["results"][a])[:200] for a in addrs if a in reply["results"]}
        except Exception as exc:  # whatever a helper sends costs only its own answer
            log.info("dial-back reply from %s is malformed: %s", helper, exc)
            return None
        remote = remote_of(conn)
        return DialbackAnswer(helper, obs, results, local, remote[0] if remote else None)

    def _loopback_only(self) -> bool:
        """Whether every address we listen on or announce is loopback (a devnet on one
        machine): no NAT between us and anyone, nothing to find out."""
        addrs = [str(a) for a in self._host.get_transport_addrs()]
        addrs += list(self._network._settings.announce_addrs)
        targets = [t for a in addrs if (t := _tcp_target(a))]
        return bool(targets) and all(is_loopback_ip(ip) for ip, _ in targets)

    async def check_reachability(self) -> str:
        """Ask up to :data:`REACHABILITY_HELPERS` directly connected peers to dial us back;
        update and return :attr:`reachability`."""
        if self._loopback_only() and not self.settings.loopback:
            self.reachability = "local"
            self.reachability_reason = "listening on loopback only: no NAT to traverse"
            return self.reachability
        helpers = self._helpers()[:REACHABILITY_HELPERS]
        if not helpers:
            self.reachability_reason = "no directly connected peer to ask"
            return self.reachability
        # Which IP do they see? Every helper is asked (it costs them no dial) and the
        # most common answer is checked: one helper alone cannot steer the round.
        seen: list[DialbackAnswer] = []

        async def observe(helper: str, conn: INetConn) -> None:
            answer = await self._ask(helper, conn, [])
            if answer is not None and answer.observed is not None:
                seen.append(answer)

        async with trio.open_nursery() as nursery:
            for helper, conn in helpers:
                nursery.start_soon(observe, helper, conn)
        ips = [a.observed[0] for a in seen if a.observed]
        observed_ip = max(set(ips), key=ips.count) if ips else self.observed_ip
        addrs = self._candidate_addrs(observed_ip)
        if not addrs:
            self.reachability_reason = "no TCP address to check"
            return self.reachability
        answers: list[DialbackAnswer] = []

        async def ask(helper: str, conn: INetConn) -> None:
            answer = await self._ask(helper, conn, addrs)
            if answer is not None:
                answers.append(answer)

        async with trio.open_nursery() as nursery:
            for helper, conn in helpers:
                nursery.start_soon(ask, helper, conn)
        self._conclude(answers)
        self.last_check = trio.current_time()
        return self.reachability

    def _conclude(self, answers: list[DialbackAnswer]) -> None:
        # One vote per helper IP: Sybils on one machine cannot outvote honest helpers. On
        # loopback (a devnet: every peer on this machine) each helper is a vote.
        # Votes are remembered for VOTE_MEMORY_S: a helper that cannot answer this round
        # (busy, asked too soon) still counts with its last answer, so that fresh Sybils
        # cannot speak alone.
        now = trio.current_time()
        for answer in answers:
            ip = answer.helper_ip
            key = answer.helper if ip is None or is_loopback_ip(ip) else ip
            if "ok" in answer.results.values():
                verdict = "reached"
            elif any(not v.startswith("not dialled") for v in answer.results.values()):
                # The helper dialled (same IP) and failed: evidence of a NAT or firewall.
                verdict = "failed"
            else:
                continue  # "not dialled" answers count for nothing
            self._votes[key] = (now, verdict, answer)
            self._votes.move_to_end(key)
        for key in [k for k, (t, _, _) in self._votes.items() if now - t > VOTE_MEMORY_S]:
            del self._votes[key]
        while len(self._votes) > MAX_VOTES:
            self._votes.popitem(last=False)
        reached = [a for _, v, a in self._votes.values() if v == "reached"]
        failed = [a for _, v, a in self._votes.values() if v == "failed"]
        ips = [a.observed[0] for a in answers if a.observed]
        if ips:
            self.observed_ip = max(set(ips), key=ips.count)
        self.nat = self._nat_behaviour(answers)
        previous = self.reachability
        if reached and failed:
            # Helpers disagree: a firewall that lets some in, or someone lying. Neither way
            # is it safe to drop relays (a lie of "public") or to claim we are private.
            self.reachability = "unknown"
            self.reachability_reason = (
                f"helpers disagree: {len(reached)} dialled us back, {len(failed)} could not"
            )
        elif len(reached) >= REACHABILITY_CONFIRMATIONS:
            self.reachability = "public"
            self.reachability_reason = f"{len(reached)} peers dialled us back"
        elif len(failed) >= REACHABILITY_CONFIRMATIONS and not reached:
            self.reachability = "private"
            example = next(iter(failed[0].results.values()))
            self.reachability_reason = f"{len(failed)} peers could not dial us back ({example})"
        else:
            self.reachability_reason = (
                f"{len(reached)} dialled us back, {len(failed)} could not: "
                f"{REACHABILITY_CONFIRMATIONS} agreeing answers needed"
            )
        if self.reachability != previous:
            log.info("reachability: %s (%s)", self.reachability, self.reachability_reason)
        if (
            self.reachability == "public"
            and self.settings.relay_service == "auto"
            and not self.hop_enabled
        ):
            self._enable_hop()

    def _nat_behaviour(self, answers: list[DialbackAnswer]) -> str:
        seen = [(a.observed, a.local) for a in answers if a.observed and a.local]
        if not seen:
            return self.nat
        if all(observed == local for observed, local in seen):
            return "none"
        if all(observed[1] == local[1] for observed, local in seen):
            return "port-preserving"
        return "port-changing"

    async def _reachability_loop(self) -> None:
        last_ip = None
        while True:
            try:
                await self.check_reachability()
            except Exception as exc:  # one failed round must not end the loop
                log.info("reachability check failed: %s: %s", type(exc).__name__, exc)
            wait = (
                self.settings.reachability_retry
                if self.reachability == "unknown" or self.observed_ip != last_ip
                else self.settings.reachability_interval
            )
            last_ip = self.observed_ip
            with trio.move_on_after(wait):
                await self._check_now.wait()
            self._check_now = trio.Event()

    def request_check(self) -> None:
        """Check reachability again soon (addresses changed, a tunnel opened or closed)."""
        self._check_now.set()

    # -- relays --------------------------------------------------------------------------

    async def _relay_keeper_loop(self) -> None:
        provided_at: float | None = None
        woken = False
        while True:
            try:
                if self.hop_enabled and (
                    provided_at is None or trio.current_time() - provided_at > 600
                ):
                    with trio.move_on_after(10):
                        await self._network.provide(RELAY_DHT_KEY)
                        provided_at = trio.current_time()
                # Relays are looked up in the DHT at most once an interval, woken or not: a
                # bootstrap peer that keeps dropping our connection would otherwise cost a
                # lookup per redial, and a woken pass that never looked up would leave such a
                # node without a relay for as long as the redials came faster than that.
                since = (
                    None if self._looked_up_at is None else trio.current_time() - self._looked_up_at
                )
                look_up = not woken or since is None or since >= self.settings.relay_check_interval
                await self._keep_reservations(look_up=look_up)
            except Exception as exc:  # a relay's misbehaviour must not end the loop
                log.info("relay keeper: %s: %s", type(exc).__name__, exc)
            woken = False
            with trio.move_on_after(self.settings.relay_check_interval):
                await self._keeper_wake.wait()
                woken = True
            self._keeper_wake = trio.Event()

    def connected_to(self, peer_id: str) -> None:
        """This node dialled a direct connection to ``peer_id``. The relay keeper makes a pass
        at once when that may change its reservations: a bootstrap peer while reservations are
        short (its first pass runs as the node starts, before the bootstrap connection is up,
        and it then waited out its interval, 5 s, to reserve), and a relay it holds a
        reservation on (connected again: the connection the reservation was made over has
        closed, and a relay that restarted has forgotten it)."""
        if peer_id in self.reservations or (
            len(self.reservations) < self.settings.relays_wanted
            and peer_id in self._bootstrap_peers()
        ):
            self._keeper_wake.set()

    async def _keep_reservations(self, *, look_up: bool = True) -> None:
        try:
            await self._keep_reservations_once(look_up=look_up)
        finally:
            self._publish_circuit_addrs()

    async def _keep_reservations_once(self, *, look_up: bool = True) -> None:
        now = trio.current_time()
        self._dial_backs_left = RELAY_DIAL_BACKS_PER_PASS
        connected = set(self._network.connected_peers())
        connections = self._host.get_network().connections
        # Relays looked at here are not tried again below in the same pass (a refresh that
        # failed would otherwise dial the relay back a second time).
        tried: set[str] = set(self.reservations)
        for relay, res in list(self.reservations.items()):
            if relay not in connected or now >= res.expires_at:
                log.info("relay %s went away: its reservation is dropped", relay)
                del self.reservations[relay]
            elif res.conn is not None and res.conn not in conn_list(
                connections.get(ID.from_base58(relay))
            ):
                log.info(
                    "relay %s: the connection the reservation was made over closed "
                    "(a relay that restarts forgets it): reserving again",
                    relay,
                )
                if not await self._reserve(relay):
                    del self.reservations[relay]
            elif now >= res.refresh_at and not await self._reserve(relay):
                del self.reservations[relay]
        if self.reachability in ("public", "local"):
            self.reservations.clear()
            return
        # The bootstrap peers before any lookup: a node behind NAT reserved on its bootstrap
        # peer only after a DHT lookup of relays (up to 5 s) on every pass, 10 s after it had
        # connected (the NAT lab); relays found in the DHT only when still short.
        phases = [self._bootstrap_candidates]
        if look_up:
            phases.append(self._relay_candidates)
        for candidates in phases:
            if len(self.reservations) >= self.settings.relays_wanted:
                return
            for relay in await candidates():
                if len(self.reservations) >= self.settings.relays_wanted:
                    return
                if relay not in self.reservations and relay not in tried:
                    tried.add(relay)
                    await self._reserve(relay)

    async def _bootstrap_candidates(self) -> list[str]:
        return self._connected_first(self._bootstrap_peers())

    async def _relay_candidates(self) -> list[str]:
        """Relays found in the DHT (the bootstrap peers have had their turn)."""
        self._looked_up_at = trio.current_time()
        try:
            found = await self._network.find_providers(RELAY_DHT_KEY, timeout=5.0)
        except NetworkError:
            found = []
        return self._connected_first(found)

    def _connected_first(self, found: list[str]) -> list[str]:
        """``found`` without duplicates or this peer, the peers connected to first:
        reserving needs a direct connection anyway."""
        me = self._network.peer_id
        connected = set(self._network.connected_peers())
        unique = [p for p in dict.fromkeys(found) if p != me]
        return sorted(unique, key=lambda p: p not in connected)

    def _dial_back_targets(
        self, relay_id: ID, seen_at: str | None, previous: Reservation | None
    ) -> list[tuple[multiaddr.Multiaddr, str]]:
        """The relay's known direct TCP addresses worth dialling back, as ``(address,
        "ip:port")``, best first: where we reached it before, then those at the IP its
        connection came from, then the rest. Never an address :func:`_dialable_ip` refuses
        (unspecified, multicast, link-local, reserved; loopback unless it stands for a
        network, ``settings.loopback``): a wildcard listener advertises 0.0.0.0, which would
        have us dial ourselves."""
        before = set()
        if previous is not None:
            for circuit in previous.circuit_addrs:
                target = _tcp_target(circuit.split("/p2p/")[0])
                if target is not None:
                    before.add(target)
        ranked: dict[tuple[str, int], tuple[int, multiaddr.Multiaddr]] = {}
        for addr in _direct_addrs(self._host, relay_id):
            target = _tcp_target(str(addr))
            ip = None if target is None else ip_address_of(target[0])
            if target is None or ip is None or not _dialable_ip(ip, self.settings.loopback):
                continue
            key = (str(ip), target[1])
            rank = 0 if target in before else 1 if seen_at and _same_ip(seen_at, key[0]) else 2
            if key not in ranked or rank < ranked[key][0]:
                ranked[key] = (rank, addr)
        ordered = sorted(ranked.items(), key=lambda item: item[1][0])
        return [(addr, f"{ip}:{port}") for (ip, port), (_rank, addr) in ordered]

    async def _dial_relay(
        self, relay_id: ID, seen_at: str | None, previous: Reservation | None
    ) -> INetConn | None:
        """A connection we dial to ``relay_id`` at one of its known direct addresses
        (:meth:`_dial_back_targets`), or None. Only for reserving: the address is trusted
        because the peer that answered there proved it holds the relay's key. Only a peer
        whose identify lists the relay protocol is dialled (none before identify has run: a
        later pass tries again), each address once, within the pass's budget; an address that
        failed, and a relay given up on (refused us after a dial-back, or answered at none of
        the addresses tried), not again for RELAY_DIAL_RETRY_S."""
        try:
            protocols = self._host.get_peerstore().get_protocols(relay_id)
        except Exception:
            protocols = []
        if str(HOP_PROTOCOL_ID) not in {str(p) for p in protocols or ()}:
            return None
        if _recent(self._dial_back_refused, str(relay_id), RELAY_DIAL_RETRY_S):
            return None
        swarm = self._host.get_network()
        # One attempt per address: dial_addr retries each up to 3 times more.
        dial_once = getattr(swarm, "_dial_addr_single_attempt", None) or swarm.dial_addr
        tried = 0
        for addr, where in self._dial_back_targets(relay_id, seen_at, previous):
            if _recent(self._dial_back_failed, where, RELAY_DIAL_RETRY_S):
                continue
            if tried >= RELAY_DIAL_ADDRS:
                break
            if tried == 0:
                # The pass's budget is spent by dialling, not by asking: a peer whose
                # addresses are all filtered or remembered must not use up the turn of the
                # relays after it (a review).
                if self._dial_backs_left <= 0:
                    return None
                self._dial_backs_left -= 1
            tried += 1
            try:
                # Each its share of the time: an address that swallows packets must not
                # take the turn of the one the relay listens on.
                with trio.fail_after(RELAY_DIAL_S / RELAY_DIAL_ADDRS):
                    conn = await dial_once(addr, relay_id)
            except Exception as exc:
                log.debug("dial-back of relay %s at %s failed: %s", relay_id, addr, exc)
                conn = None
            if conn is not None and not conn.is_closed and _dialled(conn):
                self._dial_back_failed.pop(where, None)
                return conn
            _remember(self._dial_back_failed, where)
        if tried:
            _remember(self._dial_back_refused, str(relay_id))
        return None

    async def _reserve(self, relay: str) -> bool:
        """Reserve (or refresh) a slot on ``relay``; whether it was granted."""
        relay_id = ID.from_base58(relay)
        direct = [
            c
            for c in conn_list(self._host.get_network().connections.get(relay_id))
            if not is_relayed(c) and not c.is_closed
        ]
        previous = self.reservations.get(relay)
        # One we dialled first: its remote address is where the relay listens. On one the
        # relay dialled, the remote port is the relay's ephemeral source port, and a circuit
        # address built on it led nowhere (a review).
        dialled = [c for c in direct if _dialled(c)]
        ours = None
        if direct and not dialled:
            # Only the relay dialled: the address we reached it at before (if any) may be
            # stale (a relay back on another port), and with none the reservation would wait
            # for us to dial the relay for some other reason (a review). A dial of our own at
            # an address it listens on (its authenticated answer is the proof) gives one.
            seen = remote_of(direct[0])
            ours = await self._dial_relay(relay_id, seen[0] if seen else None, previous)
            if ours is not None:
                dialled = [ours]
        conn = (dialled or direct or [None])[0]
        if conn is None:
            return False
        kept = False
        try:
            kept = await self._reserve_over(relay, relay_id, conn, bool(dialled), previous)
        finally:
            if ours is not None and not kept:
                _remember(self._dial_back_refused, relay)
                # Dialled for this reservation alone: a peer that only claims to relay must
                # not turn the connection it dialled into one we hold (a review). Unless it
                # is all that is left: py-libp2p keeps one connection per peer here, and may
                # have closed the relay's to make room for ours (a second review: closing
                # ours then cut us off from the relay, every pass).
                others = [
                    c
                    for c in conn_list(self._host.get_network().connections.get(relay_id))
                    if c is not ours and not c.is_closed and not is_relayed(c)
                ]
                if others:
                    with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                        await ours.close()
        return kept

    async def _reserve_over(
        self,
        relay: str,
        relay_id: ID,
        conn: INetConn,
        dialled: bool,
        previous: Reservation | None,
    ) -> bool:
        remote = remote_of(conn) if dialled else None
        try:
            with trio.fail_after(10):
                stream = await self._host.new_stream(relay_id, [HOP_PROTOCOL_ID])
                try:
                    await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE))
                    reply = await read_delimited_msg(stream, HopMessage)
                finally:
                    await stream.close()
        except Exception as exc:
            self.relay_refusals[relay] = f"{type(exc).__name__}: {exc}"[:200]
            log.debug("reservation on %s failed: %s", relay, exc)
            return False
        status = StatusCode(reply.status) if reply.HasField("status") else StatusCode.OK
        if status != StatusCode.OK:
            why = (
                "the relay is at its reservation limit"
                if status == StatusCode.RESOURCE_LIMIT_EXCEEDED
                else f"refused with {status.name}"
            )
            self.relay_refusals[relay] = why
            log.warning("relay %s refused a reservation: %s", relay, why)
            return False
        # The relay's expiry is wall-clock seconds (the wire format); converted to a TTL once.
        ttl = float(reply.reservation.expire) - time.time() if reply.HasField("reservation") else 0
        ttl = max(30.0, min(ttl, 24 * 3600.0))
        refresh_in = 0.75 * ttl
        # Where we reached the relay is where others can: the addresses its reply lists are
        # its own claim (a hostile relay would have us advertise third parties).
        addrs = []
        if remote is not None:
            proto = "ip6" if ":" in remote[0] else "ip4"
            addrs.append(f"/{proto}/{remote[0]}/tcp/{remote[1]}")
        me = self._network.peer_id
        circuit = [f"{a}/p2p/{relay}/p2p-circuit/p2p/{me}" for a in dict.fromkeys(addrs)][:4]
        if not circuit and previous is not None:
            # Over a connection the relay dialled, none of its addresses answering: where we
            # reached it before, looked at again soon (it may have come back elsewhere).
            circuit = previous.circuit_addrs
            refresh_in = min(refresh_in, RELAY_FALLBACK_REFRESH_S)
        if not circuit:
            # Only a connection the relay dialled, and no address we reached it at: a
            # reservation nobody can be told how to use, which would count as one of
            # relays_wanted and stop the search for others (a review). Not kept; a later
            # pass reserves once there is a connection we dialled.
            log.debug("reservation on %s not kept: no address we reached it at", relay)
            return False
        now = trio.current_time()
        fresh = relay not in self.reservations
        self.reservations[relay] = Reservation(
            relay, now + refresh_in, now + ttl, circuit, conn=conn
        )
        self.relay_refusals.pop(relay, None)
        if fresh:
            log.info("reserved on relay %s for %.0f s: reachable at %s", relay, ttl, circuit[:1])
        return True
