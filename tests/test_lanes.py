"""Lanes (mtor_p2p/lane.py) between real py-libp2p hosts on loopback: what they carry, and
what a hostile peer can and cannot do to them.

The behaviour every adapter shares (limits, deadlines, refusals) is in
tests/test_network_conformance.py, which runs each test with requests on lanes as well
("libp2p-lanes"); here are the lane's own properties.
"""

from __future__ import annotations

import os
import struct

import pytest
import trio

from mtor_p2p import lane as lanes
from mtor_p2p.libp2p_host import Libp2pNetwork
from mtor_p2p.network import NetworkError, RemoteError
from tests.conftest import open_networks

ECHO = "/mtor/test/echo/1"


async def echo(sender: str, data: bytes) -> bytes:
    return data


async def until(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


async def raw_lane_socket(server: Libp2pNetwork, hello: bytes) -> trio.socket.SocketType:
    """A plain TCP connection to ``server``'s lane port that has sent ``hello``."""
    port = server.lane_port()
    assert port
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", port))
    await sock.send(hello)
    return sock


async def test_requests_on_one_lane_run_concurrently_and_answer_out_of_order() -> None:
    """A slow request does not hold up a fast one behind it: both are in flight on the same
    lane (pipelining), and each caller gets its own answer."""
    async with open_networks(2, lanes="eager") as (server, client):
        release = trio.Event()

        async def slow(sender: str, data: bytes) -> bytes:
            await release.wait()
            return b"slow:" + data

        server.handle("/mtor/test/slow/1", slow)
        server.handle(ECHO, echo)
        assert await client.open_lane(server.peer_id)
        answers: list[bytes] = []

        async def ask_slow() -> None:
            answers.append(await client.request(server.peer_id, "/mtor/test/slow/1", b"1"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask_slow)
            await until(lambda: server.stats.lane_requests_in == 1)
            answers.append(await client.request(server.peer_id, ECHO, b"fast"))
            release.set()
        assert answers == [b"fast", b"slow:1"]
        assert client.stats.lanes_opened_out == 1
        assert server.stats.lane_requests_in == 2


@pytest.mark.parametrize(
    "size", [0, 1, lanes.RECORD_BYTES - 1, lanes.RECORD_BYTES, 3 * lanes.RECORD_BYTES + 7]
)
async def test_bodies_of_any_size_cross_a_lane_intact(size: int) -> None:
    async with open_networks(2, lanes="eager", max_pending_bytes_per_peer=64 << 20) as (
        server,
        client,
    ):
        server.handle(ECHO, echo, max_request_bytes=8 << 20)
        payload = os.urandom(size)
        assert (
            await client.request(server.peer_id, ECHO, payload, max_response_bytes=8 << 20)
            == payload
        )
        assert client.stats.lane_requests_out == 1


async def test_refusals_and_errors_cross_a_lane_as_on_a_stream() -> None:
    async with open_networks(2, lanes="eager") as (server, client):

        async def refuse(sender: str, data: bytes) -> bytes:
            raise RemoteError("no thanks")

        server.handle("/mtor/test/refuse/1", refuse)
        server.handle(ECHO, echo, max_request_bytes=1024)
        with pytest.raises(RemoteError, match="no thanks"):
            await client.request(server.peer_id, "/mtor/test/refuse/1", b"")
        with pytest.raises(RemoteError, match="too large"):
            await client.request(server.peer_id, ECHO, b"x" * 4096)
        with pytest.raises(NetworkError, match="does not serve"):
            await client.request(server.peer_id, "/mtor/test/nothing/1", b"")
        with pytest.raises(NetworkError, match="exceeds limit"):
            await client.request(server.peer_id, ECHO, b"x" * 1000, max_response_bytes=10)
        # The response over the limit broke that lane (its body was not read); the next
        # request opens a new one or goes on a stream, and is answered.
        assert await client.request(server.peer_id, ECHO, b"still") == b"still"
        assert client.stats.lane_requests_out >= 4


async def test_a_refusal_longer_than_the_answers_limit_is_still_a_refusal() -> None:
    """A caller that expects a short answer ("stored") still gets the peer's reason when it
    refuses, as on a stream: a review found that on a lane the reason was held to the
    answer's limit, so the refusal arrived as a failed request."""
    async with open_networks(2, lanes="eager") as (server, client):
        reason = "refused: " + "x" * 200

        async def refuse(sender: str, data: bytes) -> bytes:
            raise RemoteError(reason)

        server.handle("/mtor/test/refuse/1", refuse)
        before = client.stats.lane_requests_out
        with pytest.raises(RemoteError, match=reason):
            await client.request(server.peer_id, "/mtor/test/refuse/1", b"", max_response_bytes=6)
        assert client.stats.lane_requests_out == before + 1


async def test_a_crashed_server_fails_pending_requests_at_once_not_at_their_deadline() -> None:
    """A worker killed mid-request: its lane's socket closes, and the requester learns it
    in milliseconds (what makes re-issuing a killed worker's shard fast)."""
    async with open_networks(1, lanes="eager") as (client,):
        async with trio.open_nursery() as nursery:
            server_scope = trio.CancelScope()
            started = trio.Event()
            holder: list[Libp2pNetwork] = []

            async def run_server() -> None:
                with server_scope:
                    async with open_networks(1) as (server,):

                        async def hang(sender: str, data: bytes) -> bytes:
                            await trio.sleep_forever()
                            return b""

                        server.handle("/mtor/test/hang/1", hang, timeout=60)
                        holder.append(server)
                        started.set()
                        await trio.sleep_forever()

            nursery.start_soon(run_server)
            await started.wait()
            server = holder[0]
            await client.connect(server.addrs()[0])
            assert await client.open_lane(server.peer_id)
            failed_after: list[float] = []

            async def ask() -> None:
                start = trio.current_time()
                with pytest.raises(NetworkError):
                    await client.request(server.peer_id, "/mtor/test/hang/1", b"", timeout=30)
                failed_after.append(trio.current_time() - start)

            nursery.start_soon(ask)
            await until(lambda: server.stats.lane_requests_in == 1)
            server_scope.cancel()
            await until(lambda: bool(failed_after))
        assert failed_after[0] < 5


async def test_a_ticket_opens_one_lane_once() -> None:
    """A ticket ID replayed (by an eavesdropper, say) finds nothing: the server drops the
    connection before sending anything, and counts the refusal."""
    async with open_networks(2) as (server, client):
        server.handle(ECHO, echo)
        _, ticket, _ = await _ticket(client, server)
        sock = await raw_lane_socket(server, ticket + os.urandom(lanes.NONCE_BYTES))
        with sock:
            assert len(await sock.recv(64)) == lanes.NONCE_BYTES  # the first use is served
        replay = await raw_lane_socket(server, ticket + os.urandom(lanes.NONCE_BYTES))
        with replay:
            assert await replay.recv(64) == b""
        assert server.stats.lanes_refused_in == 1


async def test_a_stolen_ticket_without_its_secret_cannot_send_a_request() -> None:
    """Whoever presents a ticket ID without the secret (which crossed Noise only) gets
    nothing: its records do not open, the lane closes, the host counts it and goes on."""
    async with open_networks(2) as (server, client):
        calls: list[str] = []

        async def record(sender: str, data: bytes) -> bytes:
            calls.append(sender)
            return b"ok"

        server.handle(ECHO, record)
        _, ticket, _ = await _ticket(client, server)
        client_nonce = os.urandom(lanes.NONCE_BYTES)
        sock = await raw_lane_socket(server, ticket + client_nonce)
        server_nonce = await sock.recv(lanes.NONCE_BYTES)
        # A request sealed under a key derived from a guessed secret.
        to_server, to_client = lanes.derive_keys(
            os.urandom(32), client_nonce, server_nonce, client.peer_id, server.peer_id
        )
        thief = lanes.LaneSocket(sock, send_key=to_server, receive_key=to_client)
        header = struct.pack(">BII", ord("Q"), 0, 2) + ECHO.encode()
        await thief.send_message(header, b"hi")
        await until(lambda: server.stats.lane_auth_failures == 1)
        assert calls == []
        thief.close()
        # The host is unharmed: the real client is served.
        assert await client.request(server.peer_id, ECHO, b"x") == b"ok"


async def test_a_ticket_is_bound_to_the_peer_it_was_issued_to() -> None:
    """A peer that obtained another peer's ticket and secret still cannot speak for itself
    on it: the keys are derived with the ticket holder's peer ID."""
    async with open_networks(3) as (server, client, other):
        server.handle(ECHO, echo)
        _, ticket, secret = await _ticket(client, server)
        client_nonce = os.urandom(lanes.NONCE_BYTES)
        sock = await raw_lane_socket(server, ticket + client_nonce)
        server_nonce = await sock.recv(lanes.NONCE_BYTES)
        to_server, to_client = lanes.derive_keys(
            secret, client_nonce, server_nonce, other.peer_id, server.peer_id
        )
        impostor = lanes.LaneSocket(sock, send_key=to_server, receive_key=to_client)
        await impostor.send_message(struct.pack(">BII", ord("Q"), 0, 1) + ECHO.encode(), b"x")
        await until(lambda: server.stats.lane_auth_failures == 1)
        impostor.close()


async def test_garbage_on_the_lane_port_costs_the_server_nothing() -> None:
    async with open_networks(2, lanes="eager") as (server, client):
        server.handle(ECHO, echo)
        for junk in (b"", b"x", os.urandom(48), os.urandom(100_000)):
            sock = await raw_lane_socket(server, junk)
            sock.close()
        # A connection that says nothing is dropped after the hello deadline.
        silent = await raw_lane_socket(server, b"")
        with silent, trio.fail_after(lanes.HELLO_TIMEOUT_S + 3):
            assert await silent.recv(10) == b""
        assert await client.request(server.peer_id, ECHO, b"fine") == b"fine"
        assert client.stats.lanes_opened_out == 1


async def test_requests_fall_back_to_streams_when_no_lane_can_open() -> None:
    """A lane port nobody can reach (behind a NAT or a tunnel that forwards only the libp2p
    port): requests still work, on streams, and the client does not retry at once."""
    async with open_networks(2, lanes="eager") as (server, client):
        server.handle(ECHO, echo)
        assert server._lane_server is not None
        for listener in server._lane_server._listeners:
            listener.close()
        assert await client.request(server.peer_id, ECHO, b"a") == b"a"
        assert await client.request(server.peer_id, ECHO, b"b") == b"b"
        assert client.stats.lanes_failed_out == 1
        assert client.stats.lanes_opened_out == 0


async def test_hosts_with_lanes_off_still_talk_to_hosts_with_lanes_on() -> None:
    async with open_networks(1, lanes="off") as (old,), open_networks(1) as (new,):
        await new.connect(old.addrs()[0])
        old.handle(ECHO, echo)
        new.handle(ECHO, echo)
        assert await new.request(old.peer_id, ECHO, b"1") == b"1"
        assert await new.open_lane(old.peer_id) is False
        assert await old.request(new.peer_id, ECHO, b"2") == b"2"


async def _ticket(client: Libp2pNetwork, server: Libp2pNetwork) -> tuple[int, bytes, bytes]:
    """Ask ``server`` for a lane ticket as ``client`` would, without opening the lane."""
    host, port, ticket, secret = await client._fetch_ticket(server.peer_id)
    assert host == "127.0.0.1" and port == server.lane_port()
    return port, ticket, secret


def test_a_busy_lane_keeps_its_send_buffer_and_an_idle_one_gives_it_back() -> None:
    """A 512² shard's messages each needed a fresh, zeroed 2 MiB buffer to seal into; the lane
    now keeps one while it is busy and gives it back after LARGE_BUFFER_KEEP_S of quiet
    (virtual time: the clock jumps while both ends wait)."""
    import trio.testing

    body = os.urandom(1_500_000)

    async def main() -> None:
        a, b = trio.socket.socketpair()
        k1, k2 = os.urandom(32), os.urandom(32)
        sender = lanes.LaneSocket(a, send_key=k1, receive_key=k2)
        receiver = lanes.LaneSocket(b, send_key=k2, receive_key=k1)
        received: list[bytes] = []

        async def read_two() -> None:
            for _ in range(2):
                assert await receiver.read_header() == b"head"
                received.append(await receiver.read_body(len(body)))

        async with trio.open_nursery() as nursery:
            # The sender's reader already waits, with small buffers, when the large
            # messages go out (a server lane's reader waits while a handler answers).
            nursery.start_soon(sender.wait_readable)
            nursery.start_soon(read_two)
            await trio.sleep(0.1)
            await sender.send_message(b"head", body)
            kept = sender._out
            assert len(kept) > lanes.SMALL_BUFFER_BYTES
            await trio.sleep(lanes.LARGE_BUFFER_KEEP_S / 2)  # busy: kept
            await sender.send_message(b"head", body)
            assert sender._out is kept  # the second message reused it
            # Quiet from now on: given back within about two LARGE_BUFFER_KEEP_S.
            await trio.sleep(2.5 * lanes.LARGE_BUFFER_KEEP_S)
            assert len(sender._out) == lanes.SMALL_BUFFER_BYTES
            nursery.cancel_scope.cancel()
        assert received == [body, body]
        sender.close()
        receiver.close()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


@pytest.mark.parametrize(
    "layout",
    [
        [lanes.RECORD_BYTES],
        [700, lanes.RECORD_BYTES, lanes.RECORD_BYTES],
        [0, 3, 0, 2 * lanes.RECORD_BYTES + 5],
        [lanes.RECORD_BYTES - 1, 1, 1],
    ],
)
def test_gathered_parts_are_cut_into_the_records_of_their_concatenation(
    layout: list[int],
) -> None:
    """Records are RECORD_BYTES of the parts as if joined (the last one shorter), whatever
    the parts' boundaries: a reader cannot tell a gathered message from a joined one."""
    parts = tuple(memoryview(os.urandom(size)) for size in layout)
    joined = b"".join(parts)
    records = list(lanes._records_of(parts))
    assert [size for _, size in records] == [
        min(lanes.RECORD_BYTES, len(joined) - at)
        for at in range(0, len(joined), lanes.RECORD_BYTES)
    ]
    assert b"".join(b"".join(pieces) for pieces, _ in records) == joined
    for pieces, size in records:
        assert sum(len(p) for p in pieces) == size and all(len(p) for p in pieces)


def test_a_record_sealed_from_parts_is_the_record_sealed_from_their_join() -> None:
    """The incremental GCM interface seals exactly what one call does, under the same nonce
    counter: the peer opens it with its ordinary opener."""
    key = os.urandom(32)
    parts = [memoryview(os.urandom(n)) for n in (5, 100_000, 17)]
    joined = b"".join(parts)
    prefix = struct.pack(">I", len(joined) + 16)
    one, many = bytearray(len(joined) + 16), bytearray(len(joined) + 16)
    lanes._Sealer(key).seal_into(joined, memoryview(one), prefix)
    lanes._Sealer(key).seal_parts_into(parts, memoryview(many), prefix)
    assert one == many
    assert lanes._Sealer(key).open(memoryview(many), prefix) == joined


@pytest.mark.parametrize("size", [2 * lanes.RECORD_BYTES + 3, lanes.IN_PLACE_BODY_BYTES + 5])
async def test_bodies_opened_in_place_or_record_by_record_arrive_whole(size: int) -> None:
    """A body of a few records opens in place into one buffer; a larger one record by record
    (memory taken as its bytes arrive, not all at the announcement): both arrive whole, and
    the next message opens in step."""
    a, b = trio.socket.socketpair()
    k1, k2 = os.urandom(32), os.urandom(32)
    sender = lanes.LaneSocket(a, send_key=k1, receive_key=k2)
    receiver = lanes.LaneSocket(b, send_key=k2, receive_key=k1)
    body = os.urandom(size)

    async def send_both() -> None:
        await sender.send_message(b"head", body)
        await sender.send_message(b"next", b"")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_both)
        with trio.fail_after(20):
            assert await receiver.read_header() == b"head"
            got = await receiver.read_body(size)
            assert got == body
            assert isinstance(got, bytearray) == (size <= lanes.IN_PLACE_BODY_BYTES)
            assert await receiver.read_header() == b"next"
    sender.close()
    receiver.close()


async def test_a_reader_takes_little_beyond_the_record_it_waits_for() -> None:
    """Each receive asks for what the awaited record still lacks and at most READ_AHEAD_BYTES
    more, and after a 1 MiB answer little of the next one is buffered. Reading ahead to the
    buffer's end took in most of the next 1 MiB record, which was then moved to the buffer's
    front before it could be opened: 4.4% of a requester's CPU in a B-shared job (perf)."""
    a, b = trio.socket.socketpair()
    asked: list[int] = []

    class CountingSocket:
        """The receiving socket, recording how many bytes each receive may take."""

        def __getattr__(self, name: str) -> object:
            return getattr(b, name)

        async def recv_into(self, buffer: memoryview) -> int:
            asked.append(len(buffer))
            return await b.recv_into(buffer)

    k1, k2 = os.urandom(32), os.urandom(32)
    sender = lanes.LaneSocket(a, send_key=k1, receive_key=k2)
    receiver = lanes.LaneSocket(CountingSocket(), send_key=k2, receive_key=k1)  # type: ignore[arg-type]
    bodies = [os.urandom(lanes.RECORD_BYTES) for _ in range(4)]

    async def send_all() -> None:
        for body in bodies:
            await sender.send_message(b"head", body)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_all)
        with trio.fail_after(20):
            for body in bodies:
                assert await receiver.read_header() == b"head"
                assert await receiver.read_body(len(body)) == body
                assert receiver._end - receiver._start <= lanes.READ_AHEAD_BYTES
    record = lanes.RECORD_BYTES + 4 + 16
    assert asked and max(asked) <= record + lanes.READ_AHEAD_BYTES, max(asked)
    sender.close()
    receiver.close()
