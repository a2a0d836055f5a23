"""Lanes: a fast, authenticated request channel between two peers, beside the overlay.

py-libp2p's Noise and Yamux move about 74 MiB/s and cost milliseconds per stream (a stream
per request, protocol negotiation on each). A lane carries the same requests and responses
over one long-lived TCP connection per peer pair, sealed with AES-256-GCM in records of up to
:data:`RECORD_BYTES`, with many requests in flight at once (each tagged with an ID). It moves
about as fast as the socket itself (see ``BENCHMARKS.md``).

How a lane is bound to the peers' identities (no new trust assumption):

1. The client asks the server for a *ticket* over an ordinary libp2p stream
   (:data:`LANE_PROTOCOL`). That stream is Noise-encrypted and both ends are authenticated by
   their libp2p peer IDs, so the server knows who asks, and the client knows who answers.
   The server answers with its lane port, a random ticket ID and a random 32-byte secret,
   and remembers ``ticket ID -> (client peer ID, secret)`` for :data:`TICKET_TTL_S`.
2. The client opens TCP to the server's address on that port and sends the ticket ID and a
   random nonce; the server consumes the ticket (once) and answers with a random nonce.
3. Each direction's key is HKDF-SHA256 of the secret, salted with both nonces, labelled with
   both peer IDs and the direction. Nonces are record counters, one per direction, so never
   repeat under a key. Only the two peers know the secret (it crossed Noise only), so a record
   that opens is from the peer the ticket names; a recorded connection replayed later fails
   (the ticket is gone, and the server's nonce would differ).

What crosses a lane is still a peer's claim: the host applies the same admission, size
limits, deadlines and slowness cuts as on streams (:mod:`mtor_p2p.libp2p_host`). A lane that
fails to open (a NAT, a relayed or tunnelled connection: the lane port is not forwarded)
costs nothing but the attempt: requests keep using streams (see ``docs/compute.md``).

This module knows nothing of libp2p: it is given a ticket fetcher and a request dispatcher.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mtor_p2p.network import (
    MAX_ERROR_BYTES,
    MIN_REQUEST_BYTES_PER_S,
    REQUEST_GRACE_S,
    Gathered,
    HostStats,
    NetworkError,
    Payload,
    RemoteError,
    is_loopback_ip,
    remote_reason,
)

log = logging.getLogger(__name__)

LANE_PROTOCOL = "/mtor/lane/1"
#: Largest plaintext of one sealed record. A body longer than this spans several records.
RECORD_BYTES = 1 << 20
_TAG = 16
_RECORD_LENGTH = struct.Struct(">I")
#: Buffers of an idle lane; a busy one uses up to _LARGE_BUFFER each way, given back after
#: LARGE_BUFFER_KEEP_S without traffic.
SMALL_BUFFER_BYTES = 64 * 1024
_LARGE_BUFFER = 2 * (_RECORD_LENGTH.size + RECORD_BYTES + _TAG)
LARGE_BUFFER_KEEP_S = 1.0
#: A reader takes at most this many bytes beyond the record it waits for (small messages
#: still arrive several to a receive call; little is left to move when a record follows).
READ_AHEAD_BYTES = 64 * 1024
#: Bodies of several records up to this size are opened in place into one buffer (taken
#: when the body starts); larger ones record by record, then joined (see read_body).
IN_PLACE_BODY_BYTES = 8 << 20
#: Largest header record (a request's protocol name is at most MAX_PROTOCOL_BYTES).
MAX_HEADER_BYTES = 512
MAX_PROTOCOL_BYTES = 256
TICKET_BYTES = 16
NONCE_BYTES = 32
SECRET_BYTES = 32
#: A ticket must be used within this many seconds of being issued.
TICKET_TTL_S = 10.0
#: Tickets outstanding at once, per client peer and in all.
MAX_TICKETS_PER_PEER = 4
MAX_TICKETS = 1024
#: Inbound lanes held at once, per client peer and in all; more are refused.
MAX_LANES_PER_PEER = 2
MAX_INBOUND_LANES = 512
#: The client's ticket ID and nonce must arrive this soon after the TCP connection opens.
HELLO_TIMEOUT_S = 2.0
#: A client closes a lane with no request in flight for this long; a server waits longer, so
#: that it never closes a lane under a request just sent.
IDLE_TIMEOUT_S = 120.0
SERVER_IDLE_TIMEOUT_S = 2.5 * IDLE_TIMEOUT_S
#: Given-up requests whose late responses are still read and dropped (oldest forgotten first).
MAX_ABANDONED = 1024
#: A client that failed to open a lane to a peer does not try again for this long (a peer
#: whose ticket request was refused, "busy", for RETRY_BUSY_S).
RETRY_AFTER_S = 300.0
RETRY_BUSY_S = 30.0
#: Inbound connections that have not yet shown a ticket, in all and per source address.
MAX_PENDING_HELLOS = 64
MAX_PENDING_HELLOS_PER_SOURCE = 8
#: A response over its requester's limit is skipped up to this size (only that request
#: fails); a larger one closes the lane.
MAX_SKIPPED_RESPONSE_BYTES = 64 << 20
#: Records sealed under one key before the lane is closed (a new one takes its place).
MAX_RECORDS_PER_KEY = 1 << 40
#: Bytes already announced must keep at least this rate after a grace: the same rule as for
#: a request's body on a stream (mtor_p2p/network.py).
MIN_BYTES_PER_S = MIN_REQUEST_BYTES_PER_S
READ_GRACE_S = REQUEST_GRACE_S

_REQUEST = ord("Q")
_RESPONSE = ord("R")
_REQUEST_HEAD = struct.Struct(">BII")  # kind, request ID, body length; then the protocol
_RESPONSE_HEAD = struct.Struct(">BIBI")  # kind, request ID, status, body length
STATUS_OK = 0
STATUS_ERROR = 1
#: The server does not serve the protocol (the client reports it as NetworkError, like a
#: stream whose protocol negotiation failed).
STATUS_UNSUPPORTED = 2
#: The server gave up on the request (its handler's deadline passed), as a reset stream.
STATUS_RESET = 3


class LaneError(NetworkError):
    """The lane broke: closed, reset, a record that does not open, a protocol violation."""


def derive_keys(
    secret: bytes, client_nonce: bytes, server_nonce: bytes, client_id: str, server_id: str
) -> tuple[bytes, bytes]:
    """The client-to-server and server-to-client keys of one lane."""

    def one(direction: str) -> bytes:
        info = f"mtor-lane/1 {direction} {client_id} {server_id}".encode()
        return HKDF(
            algorithm=hashes.SHA256(), length=32, salt=client_nonce + server_nonce, info=info
        ).derive(secret)

    return one("client-to-server"), one("server-to-client")


class _Sealer:
    """AES-256-GCM with a counter nonce: one per direction of a lane."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._aead = AESGCM(key)
        self._counter = 0

    def _nonce(self) -> bytes:
        if self._counter >= MAX_RECORDS_PER_KEY:
            raise LaneError("lane key used up")
        nonce = self._counter.to_bytes(12, "big")
        self._counter += 1
        return nonce

    def seal_into(
        self, plaintext: memoryview | bytes, out: memoryview, length_prefix: bytes
    ) -> None:
        # The record's length prefix is associated data: a changed length does not open.
        self._aead.encrypt_into(self._nonce(), plaintext, length_prefix, out)

    def seal_parts_into(
        self, parts: list[memoryview], out: memoryview, length_prefix: bytes
    ) -> None:
        """:meth:`seal_into` of the parts' concatenation, without joining them: the same
        record (GCM is GCM, one call or several), through the incremental interface."""
        encryptor = Cipher(algorithms.AES(self._key), modes.GCM(self._nonce())).encryptor()
        encryptor.authenticate_additional_data(length_prefix)
        at = 0
        for part in parts:
            at += encryptor.update_into(part, out[at:])
        encryptor.finalize()
        out[at : at + _TAG] = encryptor.tag

    def skip(self) -> None:
        """Pass over one record without opening it."""
        self._nonce()

    def open(self, ciphertext: memoryview, length_prefix: bytes) -> bytes:
        try:
            return self._aead.decrypt(self._nonce(), ciphertext, length_prefix)
        except InvalidTag:
            raise LaneError("a record did not authenticate") from None

    def open_into(self, ciphertext: memoryview, out: memoryview, length_prefix: bytes) -> None:
        try:
            self._aead.decrypt_into(self._nonce(), ciphertext, length_prefix, out)
        except InvalidTag:
            raise LaneError("a record did not authenticate") from None


class LaneSocket:
    """Sealed records over one TCP socket: buffered reads, writes under a lock.

    A message is a header record then its body in records of at most :data:`RECORD_BYTES`;
    one message's records are written together, so messages never interleave.
    """

    def __init__(self, sock: trio.socket.SocketType, send_key: bytes, receive_key: bytes) -> None:
        self._sock = sock
        self._sealer = _Sealer(send_key)
        self._opener = _Sealer(receive_key)
        self._send_lock = trio.Lock()
        # Idle lanes hold small buffers (a host may serve hundreds); a large message gets a
        # large one, kept while the lane stays busy (see wait_readable).
        self._out = bytearray(SMALL_BUFFER_BYTES)
        self._out_used_at = 0.0  # when a message last went out through self._out
        # The reader's untimed wait (small buffers), cancelled when a send makes _out large
        # so that the wait is timed again and gives it back once quiet.
        self._untimed_wait: trio.CancelScope | None = None
        self._in = bytearray(SMALL_BUFFER_BYTES)
        self._start = 0  # unread bytes are self._in[self._start:self._end]
        self._end = 0
        self.closed = False
        #: Whether the peer's end is a loopback address (the peer is on this machine).
        self.loopback = _is_loopback(sock)

    # -- writing ---------------------------------------------------------------------------

    async def send_message(self, header: bytes, body: bytes | memoryview | Gathered) -> None:
        """Seal and send ``header`` and ``body`` as one message (a :class:`Gathered` body is
        sealed from its parts, never joined).

        Waiting for the lane (behind other messages) can be cancelled; once this message is
        taken, it goes out whole, shielded from the caller's cancellation, within its own
        deadline (:func:`read_deadline` of its size: the peer must read at the minimum rate).
        A message cut short would leave the peer's reader (and the record counter) out of
        step, so a send that fails or overruns closes the lane (:class:`LaneError`).
        """
        async with self._send_lock:
            if self.closed:
                raise LaneError("lane closed")
            parts = body.parts if isinstance(body, Gathered) else (memoryview(body).cast("B"),)
            length = sum(len(part) for part in parts)
            records = 1 + -(-length // RECORD_BYTES)
            total = len(header) + length + records * (_RECORD_LENGTH.size + _TAG)
            if total > len(self._out):
                # Kept while the lane is busy (wait_readable gives it back): a fresh, zeroed
                # 2 MiB buffer per message cost its page faults on every 512² shard.
                self._out = bytearray(min(total, _LARGE_BUFFER))
                if self._untimed_wait is not None:
                    self._untimed_wait.cancel()
            out = self._out
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + read_deadline(total)
                try:
                    used = self._seal(out, [memoryview(header)], 0)
                    for pieces, size in _records_of(parts):
                        if used + _RECORD_LENGTH.size + size + _TAG > len(out):
                            await self._flush(out, used)
                            used = 0
                        used = self._seal(out, pieces, used, size)
                    await self._flush(out, used)
                except BaseException:
                    self.close()
                    raise
            if scope.cancelled_caught:
                self.close()
                raise LaneError("the peer did not read a message in time")
            self._out_used_at = trio.current_time()

    def _seal(
        self, out: bytearray, pieces: list[memoryview], at: int, length: int | None = None
    ) -> int:
        """Seal one record whose plaintext is ``pieces`` (``length`` bytes in all) into
        ``out`` at ``at``; where it ends."""
        size = (len(pieces[0]) if length is None else length) + _TAG
        prefix = _RECORD_LENGTH.pack(size)
        out[at : at + _RECORD_LENGTH.size] = prefix
        start = at + _RECORD_LENGTH.size
        dest = memoryview(out)[start : start + size]
        if len(pieces) == 1:
            self._sealer.seal_into(pieces[0], dest, prefix)
        else:
            self._sealer.seal_parts_into(pieces, dest, prefix)
        return start + size

    async def _flush(self, out: bytearray, used: int) -> None:
        await _send_all(self._sock, memoryview(out)[:used])

    # -- reading ---------------------------------------------------------------------------

    async def _fill(self, size: int) -> None:
        """Make at least ``size`` unread bytes available in the buffer."""
        if self._end - self._start >= size:
            return
        unread = self._end - self._start
        if unread == 0:  # nothing to keep: the next bytes go to the front, no move later
            self._start = self._end = 0
        if size > len(self._in):  # a large record (already admitted): a buffer to hold it
            grown = bytearray(max(size, min(2 * size, _LARGE_BUFFER)))
            memoryview(grown)[:unread] = memoryview(self._in)[self._start : self._end]
            self._in, self._start, self._end = grown, 0, unread
        elif self._start + size > len(self._in):  # compact: unread bytes to the front
            # View to view: one memmove (overlap allowed), where a bytearray slice on
            # either side took a temporary copy first.
            buffer = memoryview(self._in)
            buffer[:unread] = buffer[self._start : self._end]
            buffer.release()
            self._start, self._end = 0, unread
        while self._end - self._start < size:
            # Read what is needed and at most READ_AHEAD_BYTES more. Reading ahead to the
            # buffer's end took in most of the next 1 MiB record, which the compaction above
            # then moved to the front: 4.4% of a requester's CPU in a B-shared job, 2% of
            # a worker's (perf, 2026-12-06).
            stop = min(len(self._in), self._start + size + READ_AHEAD_BYTES)
            try:
                got = await self._sock.recv_into(memoryview(self._in)[self._end : stop])
            except (OSError, trio.ClosedResourceError) as exc:
                raise LaneError(f"lane receive failed: {exc}") from exc
            if not got:
                raise LaneError("lane closed by the peer")
            self._end += got

    async def _next_record(self, most: int) -> tuple[bytes, memoryview]:
        """Buffer the next record of at most ``most`` plaintext bytes and consume it: its
        length prefix and its ciphertext (a view valid until the next read)."""
        await self._fill(_RECORD_LENGTH.size)
        prefix = bytes(self._in[self._start : self._start + _RECORD_LENGTH.size])
        (size,) = _RECORD_LENGTH.unpack(prefix)
        if size < _TAG or size - _TAG > most:
            raise LaneError(f"record of {size} bytes where at most {most + _TAG} fit")
        await self._fill(_RECORD_LENGTH.size + size)
        start = self._start + _RECORD_LENGTH.size
        self._start = start + size
        return prefix, memoryview(self._in)[start : start + size]

    async def _open_record(self, out: memoryview, most: int) -> int:
        """Read one record of at most ``most`` plaintext bytes into ``out``; its length."""
        prefix, ciphertext = await self._next_record(most)
        length = len(ciphertext) - _TAG
        self._opener.open_into(ciphertext, out[:length], prefix)
        return length

    async def _open_record_bytes(self, most: int) -> bytes:
        """Read one record of at most ``most`` plaintext bytes; its plaintext."""
        prefix, ciphertext = await self._next_record(most)
        return self._opener.open(ciphertext, prefix)

    async def read_header(self) -> bytes:
        """The next message's header record."""
        out = bytearray(MAX_HEADER_BYTES)
        size = await self._open_record(memoryview(out), MAX_HEADER_BYTES)
        return bytes(out[:size])

    async def read_body(self, length: int) -> bytes | bytearray:
        """The body records of a message whose header announced ``length`` bytes: ``bytes``
        for one record or more than IN_PLACE_BODY_BYTES, else a ``bytearray`` (nobody
        else's)."""
        if length == 0:
            return b""
        if length <= RECORD_BYTES:
            # One record: opened into the bytes object handed to the caller (one allocation;
            # a zeroed buffer and then its copy cost two of fresh pages).
            body = await self._open_record_bytes(length)
            if len(body) != length:
                raise LaneError("body record shorter than announced")
            return body
        if length > IN_PLACE_BODY_BYTES:
            # Large: each record opened into its own bytes as it arrives, then joined, so that
            # memory is taken as the bytes come (a zeroed buffer of the announced size would
            # be taken at once, before a byte of it is in: a review).
            parts: list[bytes] = []
            offset = 0
            while offset < length:
                want = min(RECORD_BYTES, length - offset)
                part = await self._open_record_bytes(want)
                if len(part) != want:
                    raise LaneError("body record shorter than announced")
                parts.append(part)
                offset += want
            return b"".join(parts)
        # Several records, a few MiB: each opened in place into the one buffer handed to
        # the caller. A run request with A and B (2 MiB), a shard's answer (1 MiB and its
        # header) were opened into a bytes object per record and then joined: a copy of
        # each on the shard's path.
        body = bytearray(length)
        view = memoryview(body)
        offset = 0
        while offset < length:
            want = min(RECORD_BYTES, length - offset)
            if await self._open_record(view[offset : offset + want], want) != want:
                raise LaneError("body record shorter than announced")
            offset += want
        return body

    async def skip_body(self, length: int) -> None:
        """Read and drop a body of ``length`` bytes (a refused request's) without opening
        its records: they only advance the nonce counter, and the next header must still
        open under the next nonce, so a reader out of step fails there."""
        offset = 0
        while offset < length:
            want = min(RECORD_BYTES, length - offset)
            await self._fill(_RECORD_LENGTH.size)
            (size,) = _RECORD_LENGTH.unpack_from(self._in, self._start)
            if size != want + _TAG:
                raise LaneError("body record of the wrong size")
            self._start += _RECORD_LENGTH.size
            await self._drop(size)
            self._opener.skip()
            offset += want

    async def _drop(self, size: int) -> None:
        """Read and forget ``size`` bytes through the buffer as it is (never growing it: a
        refused body is not admitted, so it must not cost memory)."""
        while size:
            if self._end == self._start:
                self._start = self._end = 0
                await self._fill(1)
            take = min(size, self._end - self._start)
            self._start += take
            size -= take

    async def wait_readable(self) -> None:
        """Return once a byte is buffered (the next message has begun). Large buffers are
        given back once the lane has been quiet for LARGE_BUFFER_KEEP_S: the receive buffer
        after that long without a byte in, the send buffer that long after its last message
        out. With both buffers small the wait has no timer (an idle lane costs nothing); a
        send that makes the send buffer large (a handler's answer, while this reader already
        waits) interrupts it, and the wait goes on timed."""
        while self._end <= self._start:
            if len(self._in) <= SMALL_BUFFER_BYTES and len(self._out) <= SMALL_BUFFER_BYTES:
                self._untimed_wait = scope = trio.CancelScope()
                try:
                    with scope:
                        await self._fill(1)  # trio's recv loses no bytes when cancelled
                finally:
                    self._untimed_wait = None
                if self._end > self._start:
                    return
                continue
            with trio.move_on_after(LARGE_BUFFER_KEEP_S):
                await self._fill(1)
                return
            if len(self._in) > SMALL_BUFFER_BYTES:
                self._in, self._start, self._end = bytearray(SMALL_BUFFER_BYTES), 0, 0
            quiet = trio.current_time() - self._out_used_at >= LARGE_BUFFER_KEEP_S
            # A send under way keeps its own reference (and sets _out_used_at).
            if len(self._out) > SMALL_BUFFER_BYTES and quiet and not self._send_lock.locked():
                self._out = bytearray(SMALL_BUFFER_BYTES)

    def close(self) -> None:
        """Close the socket; readers and writers get LaneError."""
        if not self.closed:
            self.closed = True
            self._sock.close()


def read_deadline(length: int) -> float:
    """Seconds allowed to read ``length`` announced bytes (grace plus a minimum rate)."""
    return READ_GRACE_S + length / MIN_BYTES_PER_S


# -- server --------------------------------------------------------------------------------


@dataclass
class Ticket:
    """What the server remembers of a ticket until it is used or expires."""

    client: str
    secret: bytes
    expires: float


#: ``dispatch(sender, request_id, protocol, length, lane)``: admit or refuse the request, read
#: (or skip) its body from ``lane`` and answer through :meth:`ServerLane.respond`. It must
#: read or skip the body before it returns; handling may continue in the background.
Dispatcher = Callable[[str, int, str, int, "ServerLane"], Awaitable[None]]


class ServerLane:
    """The server's end of one lane: it reads requests in order and answers in any order."""

    def __init__(self, lane: LaneSocket, client: str, nursery: trio.Nursery) -> None:
        self.lane = lane
        self.client = client
        #: Handlers of this lane's requests run here; closing the lane cancels them.
        self.nursery = nursery
        self.last_active = trio.current_time()

    async def respond(self, request_id: int, status: int, payload: Payload) -> None:
        """Send one response; a client that does not read it in time loses its lane."""
        head = _RESPONSE_HEAD.pack(_RESPONSE, request_id, status, len(payload))
        await self.lane.send_message(head, payload)
        self.last_active = trio.current_time()


@dataclass
class LaneServer:
    """Issues tickets and serves inbound lanes on one TCP port."""

    peer_id: str
    dispatch: Dispatcher
    stats: HostStats
    tickets: dict[bytes, Ticket] = field(default_factory=dict)
    lanes: dict[str, int] = field(default_factory=dict)  # client peer -> open inbound lanes
    port: int = 0
    _listeners: list[trio.socket.SocketType] = field(default_factory=list)
    _hellos_pending: int = 0
    _hellos_by_source: dict[str, int] = field(default_factory=dict)

    async def listen(self, hosts: list[str], port: int = 0) -> int:
        """Listen on ``hosts`` (one port for all); return the port."""
        for host in hosts:
            family = trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET
            sock = trio.socket.socket(family, trio.socket.SOCK_STREAM)
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
            try:
                await sock.bind((host, port))
            except OSError as exc:
                sock.close()
                raise OSError(
                    exc.errno, f"lane port {port} on {host}: {exc.strerror} (see --lane-port)"
                ) from None
            sock.listen(128)
            port = sock.getsockname()[1]
            self._listeners.append(sock)
        self.port = port
        return port

    async def serve(self, nursery: trio.Nursery) -> None:
        """Accept lanes on every listener until cancelled."""
        for sock in self._listeners:
            nursery.start_soon(self._accept_loop, sock, nursery)

    async def _accept_loop(self, listener: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        with listener:
            while True:
                try:
                    sock, _ = await listener.accept()
                except trio.ClosedResourceError:
                    return
                except OSError as exc:  # out of descriptors, say: wait, do not spin
                    log.warning("lane listener: accept failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                # Connections that have not shown a ticket yet cost a descriptor each and
                # need no identity: bounded in all and per source address.
                source = _source_of(sock)
                if (
                    self._hellos_pending >= MAX_PENDING_HELLOS
                    or self._hellos_by_source.get(source, 0) >= MAX_PENDING_HELLOS_PER_SOURCE
                ):
                    self.stats.lanes_refused_in += 1
                    sock.close()
                    continue
                self._hellos_pending += 1
                self._hellos_by_source[source] = self._hellos_by_source.get(source, 0) + 1
                nursery.start_soon(self._serve_connection, sock, source)

    def issue_ticket(self, client: str) -> tuple[bytes, bytes] | None:
        """A new ticket ID and secret for ``client``, or None if it holds too many."""
        now = trio.current_time()
        for key in [k for k, t in self.tickets.items() if t.expires <= now]:
            del self.tickets[key]
        mine = sum(1 for t in self.tickets.values() if t.client == client)
        if mine >= MAX_TICKETS_PER_PEER or len(self.tickets) >= MAX_TICKETS:
            return None
        if (
            self.lanes.get(client, 0) >= MAX_LANES_PER_PEER
            or sum(self.lanes.values()) >= MAX_INBOUND_LANES
        ):
            return None
        ticket, secret = os.urandom(TICKET_BYTES), os.urandom(SECRET_BYTES)
        self.tickets[ticket] = Ticket(client, secret, now + TICKET_TTL_S)
        return ticket, secret

    async def _serve_connection(self, sock: trio.socket.SocketType, source: str) -> None:
        with sock:
            hello = bytearray(TICKET_BYTES + NONCE_BYTES)
            try:
                sock.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
                with trio.fail_after(HELLO_TIMEOUT_S):
                    await _recv_exactly(sock, memoryview(hello))
            except (trio.TooSlowError, LaneError, OSError):
                self.stats.lanes_refused_in += 1
                return
            finally:
                self._hellos_pending -= 1
                self._hellos_by_source[source] -= 1
                if not self._hellos_by_source[source]:
                    del self._hellos_by_source[source]
            ticket = self.tickets.pop(bytes(hello[:TICKET_BYTES]), None)
            if ticket is None or ticket.expires <= trio.current_time():
                self.stats.lanes_refused_in += 1
                return
            if self.lanes.get(ticket.client, 0) >= MAX_LANES_PER_PEER or (
                sum(self.lanes.values()) >= MAX_INBOUND_LANES
            ):
                self.stats.lanes_refused_in += 1
                return
            # Counted before the next wait, so that tickets used at once cannot race past
            # the limits.
            self.lanes[ticket.client] = self.lanes.get(ticket.client, 0) + 1
            try:
                server_nonce = os.urandom(NONCE_BYTES)
                try:
                    with trio.fail_after(HELLO_TIMEOUT_S):
                        await _send_all(sock, server_nonce)
                except (trio.TooSlowError, LaneError):
                    return
                await self._run_lane(sock, ticket, bytes(hello[TICKET_BYTES:]), server_nonce)
            finally:
                self.lanes[ticket.client] -= 1
                if not self.lanes[ticket.client]:
                    del self.lanes[ticket.client]

    async def _run_lane(
        self, sock: trio.socket.SocketType, ticket: Ticket, client_nonce: bytes, server_nonce: bytes
    ) -> None:
        to_server, to_client = derive_keys(
            ticket.secret, client_nonce, server_nonce, ticket.client, self.peer_id
        )
        lane = LaneSocket(sock, send_key=to_client, receive_key=to_server)
        self.stats.lanes_opened_in += 1
        self.stats.lanes_open_in += 1
        # Only what the error says is kept, not the error: its traceback holds this frame,
        # which would hold the error, a cycle that keeps the lane's buffers and the failed
        # read's body (up to 8 MiB, already released from the peer's accounting) alive until
        # the cycle collector runs (a hostile review: 60 lanes broken mid-body, 191 MB).
        ended: str | None = None
        auth_failed = False
        try:
            async with trio.open_nursery() as nursery:
                server_lane = ServerLane(lane, ticket.client, nursery)
                try:
                    await self._read_requests(server_lane)
                except Exception as exc:  # whatever the client causes ends its lane
                    ended = repr(exc)
                    auth_failed = isinstance(exc, LaneError) and "authenticate" in str(exc)
                nursery.cancel_scope.cancel()
        except Exception as exc:  # a handler's answer that could not be sent, say
            ended = repr(exc)
            auth_failed = isinstance(exc, LaneError) and "authenticate" in str(exc)
        finally:
            lane.close()
            self.stats.lanes_open_in -= 1
        if auth_failed:
            self.stats.lane_auth_failures += 1
        if ended is not None:
            log.debug("inbound lane from %s ended: %s", ticket.client, ended)

    async def _read_requests(self, server_lane: ServerLane) -> None:
        lane = server_lane.lane
        while True:
            # A lane with nothing in flight and nothing arriving is closed after a while.
            # Idle counts from the last request or answer, whichever is later.
            quiet_until = server_lane.last_active + SERVER_IDLE_TIMEOUT_S
            with trio.move_on_at(quiet_until) as idle:
                await lane.wait_readable()
            if idle.cancelled_caught:
                quiet = trio.current_time() - server_lane.last_active >= SERVER_IDLE_TIMEOUT_S
                if quiet and len(server_lane.nursery.child_tasks) == 0:
                    return
                if not quiet:
                    continue
                await trio.sleep(min(1.0, SERVER_IDLE_TIMEOUT_S))  # handlers still running
                continue
            try:
                with trio.fail_after(READ_GRACE_S):
                    header = await lane.read_header()
            except trio.TooSlowError:
                raise LaneError("request header too slow") from None
            if len(header) < _REQUEST_HEAD.size or header[0] != _REQUEST:
                raise LaneError("malformed request header")
            _, request_id, length = _REQUEST_HEAD.unpack_from(header)
            protocol_bytes = header[_REQUEST_HEAD.size :]
            if len(protocol_bytes) > MAX_PROTOCOL_BYTES:
                raise LaneError("protocol name too long")
            try:
                protocol = protocol_bytes.decode("ascii")
            except UnicodeDecodeError:
                raise LaneError("protocol name is not ASCII") from None
            self.stats.lane_requests_in += 1
            server_lane.last_active = trio.current_time()
            await self.dispatch(server_lane.client, request_id, protocol, length, server_lane)


def _is_loopback(sock: trio.socket.SocketType) -> bool:
    try:
        return is_loopback_ip(str(sock.getpeername()[0]))
    except (OSError, TypeError, IndexError):
        return False


def _source_of(sock: trio.socket.SocketType) -> str:
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return "?"


def _records_of(parts: tuple[memoryview, ...]) -> Iterator[tuple[list[memoryview], int]]:
    """The body's records: for each, the pieces of ``parts`` it is made of and its length
    (:data:`RECORD_BYTES`, the last one shorter), as if the parts were one buffer."""
    pieces: list[memoryview] = []
    size = 0
    for part in parts:
        offset = 0
        while offset < len(part):
            piece = part[offset : offset + RECORD_BYTES - size]
            pieces.append(piece)
            size += len(piece)
            offset += len(piece)
            if size == RECORD_BYTES:
                yield pieces, size
                pieces, size = [], 0
    if size:
        yield pieces, size


async def _recv_exactly(sock: trio.socket.SocketType, out: memoryview) -> None:
    got = 0
    while got < len(out):
        try:
            n = await sock.recv_into(out[got:])
        except (OSError, trio.ClosedResourceError) as exc:
            raise LaneError(f"lane receive failed: {exc}") from exc
        if not n:
            raise LaneError("lane closed by the peer")
        got += n


async def _send_all(sock: trio.socket.SocketType, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        try:
            sent = await sock.send(view)
        except (OSError, trio.ClosedResourceError) as exc:
            raise LaneError(f"lane send failed: {exc}") from exc
        view = view[sent:]


# -- client --------------------------------------------------------------------------------


@dataclass
class _Pending:
    """A request waiting for its response."""

    max_response_bytes: int
    done: trio.Event = field(default_factory=trio.Event)
    status: int = -1
    body: bytes = b""
    error: Exception | None = None


class ClientLane:
    """The client's end of one lane: many requests in flight, responses in any order."""

    def __init__(self, lane: LaneSocket, server: str, stats: HostStats) -> None:
        self.lane = lane
        self.server = server
        self._stats = stats
        self._next_id = 0
        self._pending: dict[int, _Pending] = {}
        #: Requests given up (deadline passed) whose responses may still arrive: their limits,
        #: so that a late response is read and dropped rather than taken as a violation.
        self._abandoned: dict[int, int] = {}
        self.last_active = trio.current_time()

    @property
    def open(self) -> bool:
        """Whether the lane can carry requests."""
        return not self.lane.closed

    @property
    def in_flight(self) -> int:
        """Requests sent whose responses have not arrived."""
        return len(self._pending)

    async def request(
        self,
        protocol: str,
        payload: Payload,
        *,
        timeout: float,
        max_response_bytes: int,
        sent: trio.Event | None = None,
    ) -> bytes:
        """One request; raise RemoteError for the server's refusal, NetworkError otherwise
        (``sent``: set once the request is written to the socket in full)."""
        try:
            encoded = protocol.encode("ascii")
        except UnicodeEncodeError:
            raise NetworkError("a lane carries only ASCII protocol names") from None
        if len(encoded) > MAX_PROTOCOL_BYTES:
            raise NetworkError("protocol name too long for a lane")
        request_id = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        pending = self._pending[request_id] = _Pending(max_response_bytes)
        self.last_active = trio.current_time()
        self._stats.lane_requests_out += 1
        written = False
        try:
            with trio.fail_after(timeout):
                await self.lane.send_message(
                    _REQUEST_HEAD.pack(_REQUEST, request_id, len(payload)) + encoded, payload
                )
                written = True
                if sent is not None:
                    sent.set()
                await pending.done.wait()
        except trio.TooSlowError:
            raise NetworkError(
                f"request {protocol} to {self.server} timed out after {timeout} s"
            ) from None
        finally:
            # Given up (deadline, or the caller's own cancellation) after it was sent: its
            # answer may still come, and is then read and dropped, not taken as a violation.
            if (
                self._pending.pop(request_id, None) is not None
                and written
                and not pending.done.is_set()
            ):
                self._abandoned[request_id] = max_response_bytes
                while len(self._abandoned) > MAX_ABANDONED:
                    del self._abandoned[next(iter(self._abandoned))]
        self.last_active = trio.current_time()
        if pending.error is not None:
            try:
                raise pending.error
            finally:  # raised, the error's traceback holds this frame: not the reverse
                pending = None  # type: ignore[assignment]
        if pending.status == STATUS_OK:
            return pending.body
        reason = remote_reason(pending.body)
        if pending.status == STATUS_ERROR:
            raise RemoteError(reason)
        if pending.status == STATUS_UNSUPPORTED:
            raise NetworkError(f"{self.server} does not serve {protocol}")
        if pending.status == STATUS_RESET:
            raise NetworkError(f"request {protocol} to {self.server} was reset by the peer")
        raise NetworkError(f"peer answered with unknown status {pending.status}")

    async def read_responses(self) -> None:
        """Deliver responses until the lane ends; then fail whatever is still waiting."""
        # What the error says, not the error: kept, it would hold this frame through its
        # traceback (see LaneServer._run_lane).
        error = "lane closed"
        try:
            while True:
                with trio.move_on_after(IDLE_TIMEOUT_S) as idle:
                    await self.lane.wait_readable()
                if idle.cancelled_caught:
                    if not self._pending:
                        return
                    continue
                await self._read_one()
        except Exception as exc:  # whatever the server sends ends its lane, nothing more
            error = str(exc) if isinstance(exc, LaneError) else f"{type(exc).__name__}: {exc}"
        finally:
            self.lane.close()
            for pending in self._pending.values():
                pending.error = NetworkError(f"lane to {self.server} broke: {error}")
                pending.done.set()

    async def _read_one(self) -> None:
        try:
            with trio.fail_after(READ_GRACE_S):
                header = await self.lane.read_header()
        except trio.TooSlowError:
            raise LaneError("response header too slow") from None
        if len(header) != _RESPONSE_HEAD.size or header[0] != _RESPONSE:
            raise LaneError("malformed response header")
        _, request_id, status, length = _RESPONSE_HEAD.unpack(header)
        pending = self._pending.get(request_id)
        limit = pending.max_response_bytes if pending else self._abandoned.pop(request_id, -1)
        if limit < 0:
            raise LaneError("response to no request")
        if status != STATUS_OK:
            # As on streams: a refusal's reason may be longer than the caller's limit for an
            # answer, and must still arrive as the peer's refusal, not as a failed request.
            limit = MAX_ERROR_BYTES
        if length > limit:
            # Only that request fails (as on a stream); the body is skipped, not kept.
            if length > MAX_SKIPPED_RESPONSE_BYTES:
                raise LaneError(f"response of {length} bytes exceeds limit {limit}")
            try:
                with trio.fail_after(read_deadline(length)):
                    await self.lane.skip_body(length)
            except trio.TooSlowError:
                raise LaneError("response body too slow") from None
            if pending is not None and request_id in self._pending:
                pending.error = NetworkError(f"response of {length} bytes exceeds limit {limit}")
                pending.done.set()
            return
        try:
            with trio.fail_after(read_deadline(length)):
                body = await self.lane.read_body(length)
        except trio.TooSlowError:
            raise LaneError("response body too slow") from None
        if pending is not None and request_id in self._pending:
            pending.status, pending.body = status, body
            pending.done.set()


#: ``fetch_ticket(peer) -> (host, port, ticket, secret)``: asks the peer over the overlay.
TicketFetcher = Callable[[str], Awaitable[tuple[str, int, bytes, bytes]]]


class LaneClient:
    """Outbound lanes of one host: at most one per server peer, opened in the background."""

    def __init__(
        self, peer_id: str, fetch_ticket: TicketFetcher, stats: HostStats, *, max_lanes: int = 256
    ) -> None:
        self.peer_id = peer_id
        self._fetch_ticket = fetch_ticket
        self._stats = stats
        self._max_lanes = max_lanes
        self._lanes: dict[str, ClientLane] = {}
        self._opening: dict[str, trio.Event] = {}
        self._failed_until: dict[str, float] = {}
        self._nursery: trio.Nursery | None = None

    def attach(self, nursery: trio.Nursery) -> None:
        """Run lanes' readers (and openings) in ``nursery``."""
        self._nursery = nursery

    def get(self, peer: str) -> ClientLane | None:
        """The open lane to ``peer``, if any; start opening one if there is none."""
        lane = self._lanes.get(peer)
        if lane is not None and lane.open:
            return lane
        if lane is not None:
            del self._lanes[peer]
        self.start_opening(peer)
        return None

    def peek(self, peer: str) -> ClientLane | None:
        """The open lane to ``peer``, if any (opening none)."""
        lane = self._lanes.get(peer)
        return lane if lane is not None and lane.open else None

    def start_opening(self, peer: str) -> None:
        """Open a lane to ``peer`` in the background unless one is opening or failed lately."""
        if self._nursery is None or peer in self._opening or peer in self._lanes:
            return
        if self._failed_until.get(peer, float("-inf")) > trio.current_time():
            return
        try:
            self._nursery.start_soon(self._open_lane, peer)
        except RuntimeError:  # the host is stopping: no new lanes
            return
        self._opening[peer] = trio.Event()

    async def wait_open(self, peer: str, timeout: float = 10.0) -> ClientLane | None:
        """Open a lane to ``peer`` and wait for it (tests, benchmarks); None if it failed."""
        self.get(peer)
        event = self._opening.get(peer)
        if event is not None:
            with trio.move_on_after(timeout):
                await event.wait()
        lane = self._lanes.get(peer)
        return lane if lane is not None and lane.open else None

    async def _open_lane(self, peer: str) -> None:
        try:
            lane = await self._connect(peer)
        except Exception as exc:  # no lane: requests keep using streams
            self._stats.lanes_failed_out += 1
            # Refused for now ("busy"): try again soon. Unreachable: not for a while.
            wait = RETRY_BUSY_S if isinstance(exc, RemoteError) else RETRY_AFTER_S
            self._failed_until.pop(peer, None)
            self._failed_until[peer] = trio.current_time() + wait
            if len(self._failed_until) > 4096:
                del self._failed_until[next(iter(self._failed_until))]
            log.info("no lane to %s (requests use streams): %s", peer, exc)
            return
        finally:
            self._opening.pop(peer).set()
        self._evict_idle()
        self._lanes[peer] = lane
        self._stats.lanes_opened_out += 1
        self._stats.lanes_open_out += 1
        assert self._nursery is not None
        self._nursery.start_soon(self._run_reader, peer, lane)

    async def _connect(self, peer: str) -> ClientLane:
        with trio.fail_after(5):
            host, port, ticket, secret = await self._fetch_ticket(peer)
            family = trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET
            sock = trio.socket.socket(family, trio.socket.SOCK_STREAM)
            try:
                sock.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
                await sock.connect((host, port))
                client_nonce = os.urandom(NONCE_BYTES)
                await _send_all(sock, ticket + client_nonce)
                server_nonce = bytearray(NONCE_BYTES)
                await _recv_exactly(sock, memoryview(server_nonce))
            except BaseException:
                sock.close()
                raise
        to_server, to_client = derive_keys(
            secret, client_nonce, bytes(server_nonce), self.peer_id, peer
        )
        return ClientLane(
            LaneSocket(sock, send_key=to_server, receive_key=to_client), peer, self._stats
        )

    async def _run_reader(self, peer: str, lane: ClientLane) -> None:
        try:
            await lane.read_responses()
        finally:
            self._stats.lanes_open_out -= 1
            if self._lanes.get(peer) is lane:
                del self._lanes[peer]

    def _evict_idle(self) -> None:
        """At the lane cap, close the lane idle longest among those with nothing in flight
        (the cap is soft: lanes carrying requests are never closed for it)."""
        while len(self._lanes) >= self._max_lanes:
            idle = [item for item in self._lanes.items() if item[1].in_flight == 0]
            if not idle:
                return
            peer, lane = min(idle, key=lambda item: item[1].last_active)
            lane.lane.close()
            del self._lanes[peer]

    def close(self, peer: str) -> None:
        """Close the lane to ``peer`` (if any)."""
        lane = self._lanes.pop(peer, None)
        if lane is not None:
            lane.lane.close()
