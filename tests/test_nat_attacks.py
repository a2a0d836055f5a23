"""A hostile peer's attacks on NAT traversal (mtor_p2p/libp2p_nat.py), with real py-libp2p
hosts on loopback.

Each test is one attack and asserts what a safe node does. Twelve of them did harm when
written (a hostile review; the "Measured:" comments give what they did then) and were fixed
(docs/threat-model.md, "NAT traversal"); the others found no harm and guard against
regressions.

Loopback has no NAT; where an attack needs a node that honest helpers cannot reach, the
node listens on 127.0.0.5 while its outbound connections come from 127.0.0.1 (what a NAT
does: the address peers see is not where the node listens).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import multiaddr
import pytest
import trio

from mtor_p2p.identity import Identity
from mtor_p2p.libp2p_host import Libp2pNetwork
from mtor_p2p.libp2p_nat import (
    DIALBACK_PROTOCOL,
    RELAYED_MAX_REQUEST_BYTES,
    RelayLimitsConfig,
    tunnel_needed,
)
from mtor_p2p.network import NetworkError, RemoteError
from tests.nat_hosts import echo, host, wait_until

pytestmark = pytest.mark.skipif(
    __import__("importlib").util.find_spec("libp2p") is None, reason="needs py-libp2p"
)


# -- helpers -------------------------------------------------------------------------------


def pid(peer: str) -> Any:
    from libp2p.peer.id import ID

    return ID.from_base58(peer)


async def reserve(private: Libp2pNetwork, relay: Libp2pNetwork) -> str:
    """``private`` reserves on ``relay``; its first circuit address."""
    await private.connect(relay.addrs()[0])
    assert private.nat is not None and await private.nat._reserve(relay.peer_id)
    private.nat._publish_circuit_addrs()
    return private.nat.circuit_addrs()[0]


async def hop(attacker: Libp2pNetwork, relay: Libp2pNetwork) -> Any:
    from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID

    return await attacker._host.new_stream(pid(relay.peer_id), [PROTOCOL_ID])


async def hop_connect(attacker: Libp2pNetwork, relay: Libp2pNetwork, dest: str) -> tuple[Any, int]:
    """A raw hop CONNECT to ``dest``: the stream (left open) and the relay's status."""
    from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
    from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
    from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

    stream = await hop(attacker, relay)
    msg = HopMessage(type=HopMessage.CONNECT, peer=CircuitPeerId(id=pid(dest).to_bytes()))
    await write_delimited_msg(stream, msg)
    with trio.fail_after(20):
        reply = await read_delimited_msg(stream, HopMessage)
    return stream, reply.status


class Listeners:
    """TCP listeners standing for third parties: count the connections each receives."""

    def __init__(self) -> None:
        self.accepted: dict[tuple[str, int], int] = {}
        self.received: dict[tuple[str, int], bytes] = {}
        self.addrs: list[tuple[str, int]] = []

    @asynccontextmanager
    async def open(self, ips: list[str], per_ip: int) -> AsyncIterator[Listeners]:
        async with trio.open_nursery() as nursery:
            for ip in ips:
                for _ in range(per_ip):
                    sock = trio.socket.socket()
                    await sock.bind((ip, 0))
                    sock.listen(64)
                    addr = (ip, sock.getsockname()[1])
                    self.addrs.append(addr)
                    self.accepted[addr] = 0
                    self.received[addr] = b""
                    nursery.start_soon(self._serve, sock, addr)
            try:
                yield self
            finally:
                nursery.cancel_scope.cancel()

    async def _serve(self, sock: Any, addr: tuple[str, int]) -> None:
        listener = trio.SocketListener(sock)
        async with trio.open_nursery() as nursery:
            while True:
                stream = await listener.accept()
                self.accepted[addr] += 1
                nursery.start_soon(self._read, stream, addr)

    async def _read(self, stream: trio.SocketStream, addr: tuple[str, int]) -> None:
        with trio.move_on_after(1.0):
            try:
                data = await stream.receive_some(256)
                self.received[addr] += data
            except trio.BrokenResourceError:
                pass
        await stream.aclose()

    def total(self) -> int:
        return sum(self.accepted.values())


def free_port(ip: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


# -- reachability: hostile helpers -----------------------------------------------------------


def liar(observed: list[object] | None = None) -> Any:
    """A dial-back handler that dials nothing and says every address answered."""

    async def handler(sender: str, payload: bytes) -> bytes:
        addrs = json.loads(payload)["addrs"]
        results = {a: "ok" for a in addrs} or {"/ip4/198.51.100.1/tcp/1": "ok"}
        return json.dumps({"v": 1, "observed": observed, "results": results}).encode()

    return handler


def answer_with(payload: bytes) -> Any:
    async def handler(sender: str, request: bytes) -> bytes:
        return payload

    return handler


async def test_honest_helpers_find_a_node_that_listens_where_it_is_not_seen_private() -> None:
    """The set-up the lying-helper attack needs: a node listening on 127.0.0.5 and seen at
    127.0.0.1 is found private by honest helpers (what a NAT looks like)."""
    async with host() as one, host() as two, host("/ip4/127.0.0.5/tcp/0") as node:
        await node.connect(one.addrs()[0])
        await node.connect(two.addrs()[0])
        assert await node.nat.check_reachability() == "private"


async def test_two_lying_helpers_cannot_make_a_private_node_public() -> None:
    async with (
        host(relay_service="on") as relay,
        host() as honest,
        host() as sybil_a,
        host() as sybil_b,
        host("/ip4/127.0.0.5/tcp/0", relay_service="auto") as node,
    ):
        sybil_a.handle(DIALBACK_PROTOCOL, liar(["127.0.0.1", 1]))
        sybil_b.handle(DIALBACK_PROTOCOL, liar(["127.0.0.1", 1]))
        await reserve(node, relay)
        await node.connect(honest.addrs()[0])
        # Two honest helpers (the relay and another peer) find it private.
        assert await node.nat.check_reachability() == "private"
        # Two fresh identities from the same IP connect and lie.
        await node.connect(sybil_a.addrs()[0])
        await node.connect(sybil_b.addrs()[0])
        state = await node.nat.check_reachability()
        await node.nat._keep_reservations()
        status = node.nat.status()
        # Measured: "public" ("2 peers dialled us back"), reservations {}, no circuit
        # address left, hop served, tunnel_needed() False.
        assert state != "public", status["reason"]
        assert node.nat.reservations and not node.nat.hop_enabled
        assert tunnel_needed(status) or status["relays"]


@pytest.mark.parametrize(
    "reply",
    [
        b"[]",
        b'{"v": 1, "observed": ["127.0.0.1", Infinity], "results": {}}',
        b"{" + b" " * 8000 + b"}",
        b'{"v": 1, "observed": null, "results": {}}',
    ],
    ids=["json-list", "infinite-port", "oversized", "no-observed"],
)
async def test_one_hostile_helper_does_not_spoil_the_honest_answers(reply: bytes) -> None:
    async with host() as hostile, host() as one, host() as two, host() as node:
        hostile.handle(DIALBACK_PROTOCOL, answer_with(reply))
        for helper in (hostile, one, two):  # the hostile one is asked first
            await node.connect(helper.addrs()[0])
        # The two honest helpers dial the node back: two confirmations. Measured: an
        # exception (the first two), or "no TCP address to check" (the others); a helper
        # that answers slowly holds every round for 17 s the same way.
        assert await node.nat.check_reachability() == "public"


async def test_an_oversized_dial_back_reply_costs_only_that_answer() -> None:
    async with host() as hostile, host() as node:
        hostile.handle(DIALBACK_PROTOCOL, answer_with(b"{" + b" " * 8000 + b"}"))
        await node.connect(hostile.addrs()[0])
        conn = next(c for p, c in node.nat._helpers() if p == hostile.peer_id)
        assert await node.nat._ask(hostile.peer_id, conn, []) is None


async def test_a_deeply_nested_dial_back_request_is_refused_as_malformed() -> None:
    """2 KiB of '[' nests deeper than the recursion limit: json's parser raises
    RecursionError, which escaped the request's checks as an unexpected error."""
    from mtor_p2p.network import RemoteError

    async with host() as helper, host() as requester:
        await requester.connect(helper.addrs()[0])
        with pytest.raises(RemoteError, match="malformed dial-back request"):
            await requester.request(helper.peer_id, DIALBACK_PROTOCOL, b"[" * 2000)


async def test_dial_back_ok_means_the_requester_itself_answered() -> None:
    async with host() as helper, host() as requester, host() as someone_else:
        await requester.connect(helper.addrs()[0])
        other_port = someone_else.listen_ports()[0]
        addr = f"/ip4/127.0.0.1/tcp/{other_port}"  # same IP, another peer's listener
        request = json.dumps({"v": 1, "addrs": [addr]}).encode()
        reply = json.loads(await requester.request(helper.peer_id, DIALBACK_PROTOCOL, request))
        assert reply["results"][addr] != "ok"


async def test_dial_back_is_no_port_scanner_of_the_helpers_localhost() -> None:
    async with Listeners().open(["127.0.0.1"], 1) as local_service:
        # The production setting: loopback is not a network (tests set loopback=True).
        async with host(loopback=False) as helper, host() as requester:
            await requester.connect(helper.addrs()[0])
            ip, open_port = local_service.addrs[0]
            closed_port = free_port()
            addrs = [f"/ip4/{ip}/tcp/{open_port}", f"/ip4/{ip}/tcp/{closed_port}"]
            request = json.dumps({"v": 1, "addrs": addrs}).encode()
            reply = json.loads(await requester.request(helper.peer_id, DIALBACK_PROTOCOL, request))
            # Measured: {"...open": "closed without answering", "...closed": "refused: ..."},
            # and the local service received the helper's multistream header.
            assert reply["results"][addrs[0]] == reply["results"][addrs[1]]
            assert local_service.total() == 0


async def test_dial_back_dials_no_other_ip_in_any_spelling() -> None:
    async with Listeners().open(["127.0.0.2", "127.0.0.1"], 1) as third:
        async with host() as helper, host() as requester:
            await requester.connect(helper.addrs()[0])
            (ip2, port2), (_, port1) = third.addrs
            addrs = [
                f"/ip4/{ip2}/tcp/{port2}",  # another IP
                f"/ip6/::ffff:{ip2}/tcp/{port2}",  # the same in IPv6's spelling
                f"/dns4/localhost/tcp/{port1}",  # a hostname (resolves to the requester)
                f"/ip4/127.0.0.1/udp/{port1}",  # not TCP
            ]
            request = json.dumps({"v": 1, "addrs": addrs}).encode()
            reply = json.loads(await requester.request(helper.peer_id, DIALBACK_PROTOCOL, request))
            assert all(v.startswith("not dialled") for v in reply["results"].values()), reply
            await trio.sleep(0.2)
            assert third.total() == 0


# -- relays --------------------------------------------------------------------------------


async def test_idle_circuits_do_not_lock_a_peer_out_of_its_relay() -> None:
    from libp2p.relay.circuit_v2.protocol_buffer import StatusCode

    limits = RelayLimitsConfig(circuit_seconds=1)
    async with (
        host(relay_service="on", relay_limits=limits) as relay,
        host(hole_punching=False) as victim,
        host(hole_punching=False) as attacker,
        host(hole_punching=False) as honest,
    ):
        circuit = await reserve(victim, relay)
        await attacker.connect(relay.addrs()[0])
        held = []
        # One attacker identity, one connection, raw CONNECTs that never carry a byte: the
        # relay grants circuits_per_source_ip of them (then refuses or resets), and ends
        # them after the circuit's duration although no byte moved.
        for _ in range(limits.max_circuits_per_peer):
            try:
                stream, status = await hop_connect(attacker, relay, victim.peer_id)
            except Exception:
                break  # refused and reset
            if status != StatusCode.OK:
                break
            held.append(stream)
        assert len(held) <= limits.circuits_per_source_ip
        await trio.sleep(3 * limits.circuit_seconds)  # well past the circuit's duration
        # Measured: still refused (status 204, NO_RESERVATION) 35 s later.
        await honest.connect(circuit, timeout=10)
        assert honest.nat.connection_kind(victim.peer_id) == "relayed"


async def test_one_circuit_ending_leaves_other_circuits_to_the_same_peer() -> None:
    async with (
        host(relay_service="on") as relay,
        host(hole_punching=False) as victim,
        host(hole_punching=False) as attacker,
        host(hole_punching=False) as honest,
    ):
        circuit = await reserve(victim, relay)
        victim.handle("/echo", echo)
        await attacker.connect(circuit)
        await honest.connect(circuit)
        assert await honest.request(victim.peer_id, "/echo", b"hi") == b"hi"
        await attacker._host.disconnect(pid(victim.peer_id))
        await trio.sleep(2.0)
        assert honest.nat.connection_kind(victim.peer_id) == "relayed"


async def test_sybil_reservations_from_one_ip_do_not_exhaust_a_relay() -> None:
    limits = RelayLimitsConfig(max_reservations=16)  # 128 by default: the same in ~7 s
    async with host(relay_service="on", relay_limits=limits) as relay:
        for _ in range(limits.max_reservations):
            async with host(hole_punching=False) as sybil:  # reserves, then leaves
                await sybil.connect(relay.addrs()[0])
                await sybil.nat._reserve(relay.peer_id)
        async with host() as honest:
            await honest.connect(relay.addrs()[0])
            assert await honest.nat._reserve(relay.peer_id), honest.nat.relay_refusals


def hostile_relay_handler(relay_id: str, addrs: list[str]) -> Any:
    """A hop handler granting every reservation, with ``addrs`` as the relay's addresses."""
    import time

    from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
    from libp2p.relay.circuit_v2.pb.circuit_pb2 import Reservation as PbReservation
    from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

    async def handler(stream: Any) -> None:
        await read_delimited_msg(stream, HopMessage)
        reservation = PbReservation(
            expire=int(time.time()) + 900,
            addrs=[multiaddr.Multiaddr(f"{a}/p2p/{relay_id}").to_bytes() for a in addrs],
        )
        reply = HopMessage(type=HopMessage.STATUS, status=100, reservation=reservation)
        await write_delimited_msg(stream, reply)
        await stream.close()

    return handler


async def test_a_relay_cannot_make_us_advertise_third_party_addresses() -> None:
    from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID

    async with host() as hostile, host() as node:
        third_party = "/ip4/192.0.2.66/tcp/80"
        handler = hostile_relay_handler(hostile.peer_id, [third_party] * 3)
        hostile._host.set_stream_handler(PROTOCOL_ID, handler)
        await node.connect(hostile.addrs()[0])
        assert await node.nat._reserve(hostile.peer_id)
        node.nat._publish_circuit_addrs()
        advertised = [a for a in node.addrs() if "/p2p-circuit" in a]
        assert advertised and not any(a.startswith(third_party) for a in advertised), advertised


async def test_no_reservation_over_a_relayed_connection() -> None:
    from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
    from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
    from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

    async with (
        host(relay_service="on") as relay,
        host(relay_service="on", hole_punching=False) as second_relay,
        host(hole_punching=False) as attacker,
    ):
        circuit = await reserve(second_relay, relay)
        await attacker.connect(circuit)  # reaches the second relay only through the first
        stream = await hop(attacker, second_relay)
        await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE))
        with trio.fail_after(10):
            reply = await read_delimited_msg(stream, HopMessage)
        assert reply.status == StatusCode.PERMISSION_DENIED
        manager = second_relay.nat._relay.resource_manager  # type: ignore[union-attr]
        assert manager.get_reservation(pid(attacker.peer_id)) is None


async def test_connect_to_a_peer_without_reservation_is_refused() -> None:
    from libp2p.relay.circuit_v2.protocol_buffer import StatusCode

    async with host(relay_service="on") as relay, host() as attacker, host() as bystander:
        await attacker.connect(relay.addrs()[0])
        await bystander.connect(relay.addrs()[0])  # connected, never reserved
        _, status = await hop_connect(attacker, relay, bystander.peer_id)
        assert status == StatusCode.NO_RESERVATION
        _, status = await hop_connect(attacker, relay, Identity.generate().peer_id)
        assert status == StatusCode.NO_RESERVATION
        active = relay.nat._relay._active_relays  # type: ignore[union-attr]
        assert active.get(pid(bystander.peer_id)) is None


async def test_hop_garbage_and_other_message_types_leave_the_relay_serving() -> None:
    from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
    from libp2p.relay.circuit_v2.utils import write_delimited_msg

    async with host(relay_service="on") as relay, host() as attacker, host() as honest:
        await attacker.connect(relay.addrs()[0])
        streams = []
        for _ in range(20):
            stream = await hop(attacker, relay)
            for _ in range(50):
                await write_delimited_msg(stream, HopMessage(type=HopMessage.STATUS))
            await stream.write(b"\xff\xff\xff\xff\x0f" + b"x" * 100)  # a 4 GiB length prefix
            streams.append(stream)
        await honest.connect(relay.addrs()[0])
        assert await honest.nat._reserve(relay.peer_id)


# -- hole punching -------------------------------------------------------------------------


async def dcutr_session(attacker: Libp2pNetwork, victim: str, obs: list[bytes]) -> None:
    """Drive one DCUtR exchange as its initiator, naming ``obs`` as our addresses."""
    from libp2p.relay.circuit_v2.dcutr import PROTOCOL_ID, read_dcutr_msg
    from libp2p.relay.circuit_v2.pb.dcutr_pb2 import HolePunch
    from libp2p.relay.circuit_v2.utils import write_delimited_msg

    stream = await attacker._host.new_stream(pid(victim), [PROTOCOL_ID])
    msg = HolePunch(type=HolePunch.CONNECT)
    msg.ObsAddrs.extend(obs)
    await write_delimited_msg(stream, msg)
    with trio.fail_after(10):
        await read_dcutr_msg(stream, HolePunch)
    await write_delimited_msg(stream, HolePunch(type=HolePunch.SYNC))


async def test_a_relayed_peer_cannot_make_us_dial_third_parties() -> None:
    ips = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.6"]
    async with (
        Listeners().open(ips, 1) as third,
        host(relay_service="on") as relay,
        host() as victim,
        host(listen="", hole_punching=False) as attacker,  # no address of its own
    ):
        circuit = await reserve(victim, relay)
        await attacker.connect(circuit)
        obs = [multiaddr.Multiaddr(f"/ip4/{ip}/tcp/{port}").to_bytes() for ip, port in third.addrs]

        async def session() -> None:
            try:
                await dcutr_session(attacker, victim.peer_id, obs)
            except Exception:
                pass  # the victim refuses the session: the defence at work

        with trio.move_on_after(8):
            async with trio.open_nursery() as nursery:
                for _ in range(8):  # concurrent sessions
                    nursery.start_soon(session)
        await trio.sleep(0.5)
        # Measured: 4 sessions: 37 connections to 4 third-party IPs in 1 s, 132 in 15 s,
        # each sent "/multistream/1.0.0" from our listen port.
        reached = {addr[0] for addr, n in third.accepted.items() if n}
        assert len(reached) <= 1 and third.total() <= 3, third.accepted


async def test_an_oversized_dcutr_connect_dials_nothing() -> None:
    async with (
        Listeners().open(["127.0.0.2"], 1) as third,
        host(relay_service="on") as relay,
        host() as victim,
        host(listen="", hole_punching=False) as attacker,
    ):
        circuit = await reserve(victim, relay)
        await attacker.connect(circuit)
        ip, port = third.addrs[0]
        obs = [multiaddr.Multiaddr(f"/ip4/{ip}/tcp/{port}").to_bytes()] * 600  # > 4 KiB
        with trio.move_on_after(3):
            try:
                await dcutr_session(attacker, victim.peer_id, obs)
            except Exception:
                pass  # the victim drops the stream
        await trio.sleep(0.5)
        assert third.total() == 0
        assert victim.nat.connection_kind(attacker.peer_id) == "relayed"


async def test_a_silent_dcutr_peer_does_not_delay_other_punches() -> None:
    from libp2p.relay.circuit_v2.dcutr import PROTOCOL_ID

    async def silent(stream: Any) -> None:
        await trio.sleep_forever()

    async with (
        host(relay_service="on") as relay,
        host() as victim,
        host(listen="", hole_punching=False) as staller,
        host(hole_punching=False) as honest,
    ):
        staller._host.set_stream_handler(PROTOCOL_ID, silent)
        circuit = await reserve(victim, relay)
        await staller.connect(circuit)
        await trio.sleep(0.5)  # our punch loop has started on the staller
        await honest.connect(circuit)
        # Without the staller: direct in about 0.5 s (test_nat_traversal.py).
        await wait_until(lambda: victim.nat.connection_kind(honest.peer_id) == "direct", 8.0)


# -- bulk only over direct connections -------------------------------------------------------


async def test_large_responses_never_cross_a_relay() -> None:
    async with (
        host(relay_service="on") as relay,
        host(hole_punching=False) as private,
        host(hole_punching=False) as dialer,
    ):
        circuit = await reserve(private, relay)

        async def result(sender: str, payload: bytes) -> bytes:
            return b"r" * (3 << 20)

        private.handle("/result", result)
        await dialer.connect(circuit)

        async def no_direct_dial(peer_id: str) -> None:
            await trio.sleep_forever()

        dialer.nat._dial_direct = no_direct_dial  # type: ignore[method-assign]
        assert dialer.nat.connection_kind(private.peer_id) == "relayed"
        # Refused by the serving side ("response too large for a relayed connection"), and
        # the requester's own cap would refuse it as it arrives (a hostile server).
        with pytest.raises((NetworkError, RemoteError)):
            got = await dialer.request(
                private.peer_id, "/result", b"x", timeout=10, max_response_bytes=4 << 20
            )
            assert len(got) > RELAYED_MAX_REQUEST_BYTES  # measured: 3 MiB came over the relay


async def test_a_lane_to_a_relayed_peer_never_goes_to_the_relays_ip() -> None:
    import base64

    from mtor_p2p.lane import LANE_PROTOCOL, SECRET_BYTES, TICKET_BYTES

    async with (
        Listeners().open(["127.0.0.2"], 1) as relay_host_service,
        host("/ip4/127.0.0.2/tcp/0", relay_service="on") as relay,
        host(hole_punching=False) as hostile,
        host(hole_punching=False) as dialer,
    ):
        _, port = relay_host_service.addrs[0]

        async def ticket(sender: str, payload: bytes) -> bytes:
            return json.dumps(
                {
                    "port": port,
                    "ticket": base64.b64encode(b"t" * TICKET_BYTES).decode(),
                    "secret": base64.b64encode(b"s" * SECRET_BYTES).decode(),
                }
            ).encode()

        circuit = await reserve(hostile, relay)
        hostile.handle(LANE_PROTOCOL, ticket)
        hostile.handle("/echo", echo)
        await dialer.connect(circuit)
        assert await dialer.request(hostile.peer_id, "/echo", b"hi") == b"hi"
        await dialer.open_lane(hostile.peer_id, timeout=3)
        await trio.sleep(0.5)
        assert relay_host_service.total() == 0


# -- state and life ----------------------------------------------------------------------------


async def test_hole_punch_results_stay_bounded() -> None:
    async with host() as node:
        for i in range(2000):
            node.nat._punch_result(Identity.generate().peer_id if i < 5 else f"p{i}", False, 1.0)
        assert len(node.nat.punches) <= 256
        assert len(node.nat.status()["hole_punches"]) <= 16


async def test_a_host_with_live_circuits_and_punches_closes_promptly_when_cancelled() -> None:
    began = trio.current_time()
    with trio.move_on_after(5) as outer:
        async with (
            host(relay_service="on") as relay,
            host() as private,
            host() as dialer,
        ):
            circuit = await reserve(private, relay)
            await dialer.connect(circuit)  # the private side starts punching now
            await trio.sleep(0.3)
            outer.deadline = trio.current_time()  # cancelled mid-punch, circuits open
            await trio.sleep_forever()
    assert outer.cancelled_caught
    assert trio.current_time() - began < 5


async def test_an_error_in_the_body_with_circuits_open_is_not_replaced() -> None:
    class Boom(Exception):
        pass

    with pytest.raises(BaseException) as caught:
        async with (
            host(relay_service="on") as relay,
            host() as private,
            host() as dialer,
        ):
            circuit = await reserve(private, relay)
            await dialer.connect(circuit)
            raise Boom("from the body")
    leaves = [caught.value]
    while leaves and isinstance(leaves[0], BaseExceptionGroup):
        leaves = list(leaves[0].exceptions) + leaves[1:]
    assert any(isinstance(leaf, Boom) for leaf in leaves), caught.value
    assert not any(isinstance(leaf, trio.Cancelled) for leaf in leaves), caught.value
