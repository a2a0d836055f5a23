"""The worker of ``benchmarks/bench_nat.py``: py-libp2p hosts with NAT traversal, driven by JSON.

Run inside a namespace of the NAT lab (``ip netns exec NS .venv/bin/python -m
benchmarks.nat_peer``) or on loopback. It reads one JSON command per line on stdin and answers
each with one JSON line on stdout carrying the command's ``id`` (commands run concurrently).
One process may hold several hosts, each under a name. Times are ``time.monotonic()``:
CLOCK_MONOTONIC is one clock for every process of the machine (network namespaces do not
change it), so the driver compares them across processes.

Commands (``cmd``):

* ``open`` name, listen, hole_punching, relay, circuit_bytes, max_circuits_per_peer,
  max_reservations: a new host (new identity). Reachability checks are slowed to once an
  hour and no relay is reserved by itself (``relays_wanted=0``): the driver reserves. Lanes
  are off, so requests stay on the libp2p connection being measured. Every host serves
  ``/bench/echo/1`` (a request echoed back) and ``/bench/sink/1`` (a raw libp2p stream: an
  8-byte length, that many bytes, one byte back).
* ``close`` name; ``quit``.
* ``reserve`` name, relay_addr: connect to the relay and reserve; our circuit addresses.
* ``connect`` name, addr, watch: dial (a circuit address goes through the relay); with
  ``watch`` > 0, poll ``nat.connection_kind`` every 10 ms until "direct" or ``watch`` s.
* ``connect_many`` name, addrs: dial each; the kinds of the connections after.
* ``punch_log`` name: what this host's DCUtR did (the side that accepted a relayed
  connection drives it): when it started, its unilateral dial, the exchange, the result.
* ``rtt`` name, peer, n: round trips of a 1-byte request on the open connection.
* ``stream_send`` name, peer, size, n: ``size`` bytes on a raw stream to the peer's sink,
  ``n`` times (seconds each, from the stream's first byte written to the answer).
* ``tcp_serve`` host, port: a plain TCP sink (same framing as the stream sink).
* ``tcp_send`` host, port, size, n, rtt_n: one TCP connection; ``rtt_n`` 8-byte round trips,
  then ``n`` transfers of ``size`` bytes.
* ``traffic`` names, targets, seconds, size, interval: every named host sends a ``size``-byte
  request to each target once per ``interval`` (answer of the same size) for ``seconds``.
* ``kinds`` name: connection kinds per peer; ``conn_kinds`` name, peer: the kind of each open
  connection to ``peer``; ``relay_stats`` name: active circuits and
  reservations of a relay host.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import struct
import sys
import time
import traceback
from typing import Any

import trio

from mtor_p2p.identity import Identity
from mtor_p2p.libp2p_host import HostSettings, Libp2pNetwork
from mtor_p2p.libp2p_nat import NatSettings, RelayLimitsConfig

ECHO = "/bench/echo/1"
SINK = "/bench/sink/1"
_LEN = struct.Struct(">Q")
_CHUNK = 1 << 20


def now() -> float:
    return time.monotonic()


class Worker:
    def __init__(self) -> None:
        self.hosts: dict[str, Libp2pNetwork] = {}
        self.closers: dict[str, trio.Event] = {}
        #: name -> what its DCUtR did: peer -> {event: [monotonic times]}
        self.punch_log: dict[str, dict[str, dict[str, list[float]]]] = {}
        self.dcutr_inbound: dict[str, dict[str, float]] = {}
        self.quit = trio.Event()
        self.nursery: trio.Nursery | None = None

    # -- hosts -------------------------------------------------------------------------

    async def _host(self, cmd: dict[str, Any], task_status: Any) -> None:
        name = cmd["name"]
        limits = RelayLimitsConfig(
            circuit_bytes=int(cmd.get("circuit_bytes", 8 << 20)),
            max_circuits_per_peer=int(cmd.get("max_circuits_per_peer", 8)),
            max_reservations=int(cmd.get("max_reservations", 128)),
            circuits_per_source_ip=int(cmd.get("circuits_per_source_ip", 2)),
        )
        nat = NatSettings(
            relay_service="on" if cmd.get("relay") else "off",
            relay_limits=limits,
            relays_wanted=0,
            hole_punching=bool(cmd.get("hole_punching", True)),
            reachability_interval=3600.0,
            reachability_retry=3600.0,
        )
        settings = HostSettings(
            listen_addrs=list(cmd.get("listen") or ["/ip4/127.0.0.1/tcp/0"]),
            nat=nat,
            lanes="off",
            bootstrap_node=bool(cmd.get("relay")),
        )
        async with Libp2pNetwork.open(Identity.generate(), settings) as net:
            await self._instrument(name, net)
            self.hosts[name] = net
            closed = self.closers[name] = trio.Event()
            task_status.started(net)
            await closed.wait()
        self.hosts.pop(name, None)

    async def _instrument(self, name: str, net: Libp2pNetwork) -> None:
        async def echo(sender: str, payload: bytes) -> bytes:
            return payload

        net.handle(ECHO, echo, max_request_bytes=1 << 20)

        async def sink(stream: Any) -> None:
            try:
                header = await _read_exactly(stream, _LEN.size)
                (size,) = _LEN.unpack(header)
                left = size
                while left:
                    chunk = await stream.read(min(left, _CHUNK))
                    if not chunk:
                        raise EOFError(f"{left} bytes short")
                    left -= len(chunk)
                await stream.write(b"k")
                await stream.close()
            except Exception:
                await stream.reset()

        net._host.set_stream_handler(SINK, sink)  # type: ignore[arg-type]
        log = self.punch_log[name] = {}
        inbound = self.dcutr_inbound[name] = {}
        puncher = net.nat._puncher if net.nat is not None else None
        if puncher is None:
            return
        from libp2p.relay.circuit_v2.dcutr import PROTOCOL_ID as DCUTR

        def mark(peer: Any, event: str) -> None:
            log.setdefault(str(peer), {}).setdefault(event, []).append(now())

        # The service registers its handler when it starts running, which may be after the
        # host opened: replace it only after that.
        with trio.fail_after(10):
            await puncher.event_started.wait()
        original_inbound = puncher._handle_dcutr_stream

        async def on_dcutr_stream(stream: Any) -> None:
            inbound.setdefault(str(stream.muxed_conn.peer_id), now())
            await original_inbound(stream)

        net._host.set_stream_handler(DCUTR, on_dcutr_stream)
        initiate = puncher.initiate_hole_punch
        unilateral = puncher._try_unilateral_upgrade
        perform = puncher._perform_hole_punch

        async def initiate_hole_punch(peer_id: Any) -> bool:
            mark(peer_id, "initiate")
            ok = await initiate(peer_id)
            mark(peer_id, "result_ok" if ok else "result_failed")
            return ok

        async def try_unilateral(peer_id: Any) -> bool:
            mark(peer_id, "unilateral_start")
            try:
                return await unilateral(peer_id)
            finally:
                mark(peer_id, "unilateral_end")

        async def perform_hole_punch(peer_id: Any, *args: Any, **kwargs: Any) -> bool:
            mark(peer_id, "dials_start")
            return await perform(peer_id, *args, **kwargs)

        puncher.initiate_hole_punch = initiate_hole_punch  # type: ignore[method-assign]
        puncher._try_unilateral_upgrade = try_unilateral  # type: ignore[method-assign]
        puncher._perform_hole_punch = perform_hole_punch  # type: ignore[method-assign]

    def net(self, cmd: dict[str, Any]) -> Libp2pNetwork:
        return self.hosts[cmd["name"]]

    # -- commands ----------------------------------------------------------------------

    async def cmd_open(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.nursery is not None
        with trio.fail_after(30):
            net = await self.nursery.start(self._host, cmd)
        return {"peer_id": net.peer_id, "addrs": net.addrs(), "pid": os.getpid()}

    async def cmd_close(self, cmd: dict[str, Any]) -> dict[str, Any]:
        name = cmd["name"]
        self.closers[name].set()
        with trio.move_on_after(15):
            while name in self.hosts:
                await trio.sleep(0.02)
        return {"closed": name not in self.hosts}

    async def cmd_quit(self, cmd: dict[str, Any]) -> dict[str, Any]:
        for closer in self.closers.values():
            closer.set()
        self.quit.set()
        return {}

    async def cmd_reserve(self, cmd: dict[str, Any]) -> dict[str, Any]:
        net = self.net(cmd)
        relay = await net.connect(cmd["relay_addr"], timeout=10)
        assert net.nat is not None
        ok = await net.nat._reserve(relay)
        net.nat._publish_circuit_addrs()
        return {"reserved": ok, "circuits": net.nat.circuit_addrs(), "relay": relay}

    async def cmd_connect(self, cmd: dict[str, Any]) -> dict[str, Any]:
        net = self.net(cmd)
        assert net.nat is not None
        t_call = now()
        peer = await net.connect(cmd["addr"], timeout=float(cmd.get("timeout", 15)))
        t_connected = now()
        kind = net.nat.connection_kind(peer)
        out: dict[str, Any] = {
            "peer": peer,
            "t_call": t_call,
            "t_connected": t_connected,
            "kind_at_connect": kind,
            "t_direct": t_connected if kind == "direct" else None,
        }
        watch = float(cmd.get("watch", 0))
        if watch > 0 and kind != "direct":
            with trio.move_on_after(watch):
                while net.nat.connection_kind(peer) != "direct":
                    await trio.sleep(0.01)
                out["t_direct"] = now()
        out["dcutr_inbound"] = self.dcutr_inbound.get(cmd["name"], {}).get(peer)
        out["kind"] = net.nat.connection_kind(peer)
        return out

    async def cmd_connect_many(self, cmd: dict[str, Any]) -> dict[str, Any]:
        net = self.net(cmd)
        assert net.nat is not None
        errors = []
        peers = []
        for addr in cmd["addrs"]:
            try:
                peers.append(await net.connect(addr, timeout=15))
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
        return {"kinds": [net.nat.connection_kind(p) for p in peers], "errors": errors}

    async def cmd_punch_log(self, cmd: dict[str, Any]) -> dict[str, Any]:
        net = self.net(cmd)
        assert net.nat is not None
        return {
            "log": self.punch_log.get(cmd["name"], {}),
            "dcutr_inbound": self.dcutr_inbound.get(cmd["name"], {}),
            "punches": {
                p: {"direct": ok, "seconds": s} for p, (ok, s, _) in net.nat.punches.items()
            },
            "peer_addrs": {p: net.peer_addrs(p) for p in self.punch_log.get(cmd["name"], {})},
            "attempts": {
                str(p): n
                for p, n in (
                    net.nat._puncher._hole_punch_attempts.items() if net.nat._puncher else []
                )
            },
        }

    async def cmd_kinds(self, cmd: dict[str, Any]) -> dict[str, Any]:
        net = self.net(cmd)
        assert net.nat is not None
        return {"kinds": net.nat.connection_kinds(limit=1000)}

    async def cmd_conn_kinds(self, cmd: dict[str, Any]) -> dict[str, Any]:
        from libp2p.peer.id import ID

        from mtor_p2p.libp2p_nat import is_relayed

        net = self.net(cmd)
        conns = _conns(net._host.get_network().connections.get(ID.from_base58(cmd["peer"])))
        return {
            "kinds": ["relayed" if is_relayed(c) else "direct" for c in conns if not c.is_closed]
        }

    async def cmd_relay_stats(self, cmd: dict[str, Any]) -> dict[str, Any]:
        net = self.net(cmd)
        assert net.nat is not None and net.nat._relay is not None
        manager = net.nat._relay.resource_manager
        reservations = list(manager._reservations.values())
        return {
            "reservations": len(reservations),
            "active_circuits": sum(r.active_connections for r in reservations),
            "connections": sum(
                len(_conns(c)) for c in net._host.get_network().connections.values()
            ),
        }

    async def cmd_rtt(self, cmd: dict[str, Any]) -> dict[str, Any]:
        net = self.net(cmd)
        samples = []
        for _ in range(int(cmd.get("n", 20))):
            began = now()
            await net.request(cmd["peer"], ECHO, b"x", timeout=10)
            samples.append(now() - began)
        return {"seconds": samples}

    async def cmd_stream_send(self, cmd: dict[str, Any]) -> dict[str, Any]:
        from libp2p.custom_types import TProtocol
        from libp2p.peer.id import ID

        net = self.net(cmd)
        assert net.nat is not None
        size = int(cmd["size"])
        payload = os.urandom(_CHUNK)
        seconds = []
        kinds = []
        for _ in range(int(cmd.get("n", 3))):
            kinds.append(net.nat.connection_kind(cmd["peer"]))
            with trio.fail_after(float(cmd.get("timeout", 300))):
                stream = await net._host.new_stream(ID.from_base58(cmd["peer"]), [TProtocol(SINK)])
                began = now()
                await stream.write(_LEN.pack(size))
                left = size
                while left:
                    piece = payload[: min(left, _CHUNK)]
                    await stream.write(piece)
                    left -= len(piece)
                ack = await _read_exactly(stream, 1)
                seconds.append(now() - began)
                await stream.close()
            if ack != b"k":
                raise RuntimeError(f"sink answered {ack!r}")
        return {"seconds": seconds, "kinds": kinds}

    async def cmd_tcp_serve(self, cmd: dict[str, Any]) -> dict[str, Any]:
        async def serve(stream: trio.SocketStream) -> None:
            try:
                while True:
                    header = await _read_socket(stream, _LEN.size)
                    if header is None:
                        return
                    (size,) = _LEN.unpack(header)
                    left = size
                    while left:
                        chunk = await stream.receive_some(min(left, _CHUNK))
                        if not chunk:
                            return
                        left -= len(chunk)
                    await stream.send_all(b"k")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        assert self.nursery is not None
        await self.nursery.start(
            functools.partial(trio.serve_tcp, serve, int(cmd["port"]), host=cmd.get("host"))
        )
        return {"serving": cmd["port"]}

    async def cmd_tcp_send(self, cmd: dict[str, Any]) -> dict[str, Any]:
        size = int(cmd.get("size", 0))
        payload = os.urandom(_CHUNK)
        with trio.fail_after(float(cmd.get("timeout", 120))):
            stream = await trio.open_tcp_stream(cmd["host"], int(cmd["port"]))
            async with stream:
                rtt = []
                for _ in range(int(cmd.get("rtt_n", 0))):
                    began = now()
                    await stream.send_all(_LEN.pack(0))
                    await _read_socket(stream, 1)
                    rtt.append(now() - began)
                seconds = []
                for _ in range(int(cmd.get("n", 0))):
                    began = now()
                    await stream.send_all(_LEN.pack(size))
                    left = size
                    while left:
                        piece = payload[: min(left, _CHUNK)]
                        await stream.send_all(piece)
                        left -= len(piece)
                    await _read_socket(stream, 1)
                    seconds.append(now() - began)
        return {"rtt_seconds": rtt, "seconds": seconds}

    async def cmd_traffic(self, cmd: dict[str, Any]) -> dict[str, Any]:
        names = cmd.get("names") or list(self.hosts)
        targets = list(cmd["targets"])
        size = int(cmd.get("size", 1024))
        interval = float(cmd.get("interval", 1.0))
        seconds = float(cmd.get("seconds", 20))
        payload = os.urandom(size)
        latencies: list[float] = []
        errors: list[str] = []

        async def one(net: Libp2pNetwork, peer: str, offset: float, until: float) -> None:
            await trio.sleep(offset)
            while now() < until:
                began = now()
                try:
                    answer = await net.request(peer, ECHO, payload, timeout=10)
                    if len(answer) != size:
                        raise RuntimeError(f"answer of {len(answer)} bytes")
                    latencies.append(now() - began)
                except Exception as exc:
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                await trio.sleep(max(0.0, interval - (now() - began)))

        began = now()
        until = began + seconds
        async with trio.open_nursery() as nursery:
            k = 0
            for name in names:
                net = self.hosts[name]
                for peer in targets:
                    if peer == net.peer_id:
                        continue
                    # Spread the senders over the interval rather than all at once.
                    nursery.start_soon(one, net, peer, (k * 0.0137) % interval, until)
                    k += 1
        wall = now() - began
        ordered = sorted(latencies)
        return {
            "senders": k,
            "requests": len(latencies),
            "errors": len(errors),
            "error_examples": errors[:3],
            "wall_s": wall,
            "requests_per_s": len(latencies) / wall if wall else 0.0,
            "latency_p50_s": statistics.median(ordered) if ordered else None,
            "latency_p95_s": ordered[int(0.95 * (len(ordered) - 1))] if ordered else None,
        }


def _conns(conns: Any) -> list[Any]:
    if not conns:
        return []
    return list(conns) if isinstance(conns, list) else [conns]


async def _read_exactly(stream: Any, size: int) -> bytes:
    got = b""
    while len(got) < size:
        chunk = await stream.read(size - len(got))
        if not chunk:
            raise EOFError(f"stream ended {size - len(got)} bytes early")
        got += chunk
    return got


async def _read_socket(stream: trio.SocketStream, size: int) -> bytes | None:
    got = b""
    while len(got) < size:
        chunk = await stream.receive_some(size - len(got))
        if not chunk:
            return None
        got += chunk
    return got


async def main() -> None:
    worker = Worker()
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    out_lock = trio.Lock()

    async def answer(reply: dict[str, Any]) -> None:
        async with out_lock:
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()

    async def run(cmd: dict[str, Any]) -> None:
        reply: dict[str, Any] = {"id": cmd.get("id")}
        try:
            handler = getattr(worker, f"cmd_{cmd['cmd']}")
            reply.update(await handler(cmd))
            reply["ok"] = True
        except Exception as exc:
            reply["ok"] = False
            reply["error"] = f"{type(exc).__name__}: {exc}"[:500]
            reply["traceback"] = traceback.format_exc()[-1500:]
        await answer(reply)

    async def read_commands(nursery: trio.Nursery) -> None:
        buffer = b""
        while not worker.quit.is_set():
            data = await stdin.receive_some(65536)
            if not data:
                worker.quit.set()
                for closer in worker.closers.values():
                    closer.set()
                return
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line.strip():
                    nursery.start_soon(run, json.loads(line))

    async with trio.open_nursery() as nursery:
        worker.nursery = nursery
        nursery.start_soon(read_commands, nursery)
        await answer({"id": "ready", "ok": True, "pid": os.getpid()})
        await worker.quit.wait()
        with trio.move_on_after(15):
            while worker.hosts:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
