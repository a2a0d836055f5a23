"""NAT traversal figures of issue 10, measured through the real NAT lab.

``./mtor bench nat [--quick] [--only punch,symmetric,throughput,relay] [--out PATH]
[--logs DIR]``

The lab is ``bootstrap/nat-lab.sh`` driven by ``tests/natlab.py``: network namespaces, a relay
on the "internet" (203.0.113.10) and private hosts a (10.0.1.2) and b (10.0.2.2) each behind
its own Linux NAT router (MASQUERADE, inbound from the WAN dropped). Needs root, ``ip`` and
``iptables``; where the lab cannot run this exits with code 3 and says why (``--only relay``
needs no lab and runs anyway). Every host is a real ``Libp2pNetwork`` with MTOR's NAT
traversal, in a worker process (``benchmarks/nat_peer.py``) in its namespace, driven over
JSON lines; the relay is one long-lived host.

Parts:

* ``punch``: time from first relayed contact (the dialer's relayed ``connect()`` returns) to
  a direct connection (the dialer's ``connection_kind`` says "direct", polled every 10 ms),
  both NATs port-preserving, ``--trials`` trials (default 24; ``--quick`` 6). Each trial has
  fresh hosts (opened in one long-lived worker process per namespace): new identities, listen
  port 4100+i on both sides (so the previous trial's punched 4-tuple, in TIME_WAIT, never
  interferes); a is connected to the relay (as any node
  is to its bootstrap peers), b reserves on it, a dials b's circuit address; b, the side that
  accepted the relayed connection, drives DCUtR. What b's DCUtR did is logged (its start, its
  unilateral direct dial, the exchange, the punch dials). No direct connection within 30 s is
  a failure. Baseline in the same run: the round trip a <-> relay (a 1-byte MTOR request on
  the open libp2p connection, and 8 bytes on a plain TCP connection).
* ``symmetric``: the same trials with b behind a symmetric NAT (``MASQUERADE
  --random-fully``), ``--sym-trials`` (default 5; ``--quick`` 2): each failure costs 30 s.
* ``throughput``: 16 MiB from a to b, 3 times each, over the relayed connection (hole
  punching off on both hosts) and over the punched direct connection, on a raw libp2p stream
  (``/bench/sink/1``): MTOR itself refuses requests over 64 KiB on a relay
  (``RELAYED_MAX_REQUEST_BYTES``) and the relay's default circuit limit is 8 MiB, so the relay
  runs with ``circuit_bytes`` = 64 MiB and the stream bypasses MTOR's request layer: what is
  measured is the path. Baselines: plain TCP a -> b through a port forward on b's router (the
  same NAT path as the punched connection) and plain TCP a -> relay.
* ``relay``: the relay's CPU and memory per 100 circuits, on loopback (no NAT needed): the
  relay in its own process (``max_circuits_per_peer`` 16, ``max_reservations`` 64), 10
  destination hosts reserved on it (one process), 10 dialer hosts (another process) each
  connected to the relay; then each dialer dials all 10 destinations through the relay (100
  circuits; hole punching off, so they stay relayed). Relay RSS and CPU seconds over 20 s
  (``--quick`` 10 s) before the circuits, with the 100 circuits idle, and with every circuit
  carrying a 1 KiB request and its 1 KiB answer once a second.

Writes ``benchmarks/results/nat.json`` (``--out``) after each part; a summary goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import procstats
from benchmarks.machine import machine
from benchmarks.paths import user_path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).with_name("results")
PARTS = ("punch", "symmetric", "throughput", "relay")
RELAY_PORT = 4001
TRIAL_BASE_PORT = 4100
WATCH_S = 30.0
MIB = 1 << 20
OPERAND = 16 * MIB
EXIT_NO_LAB = 3


def log(message: str) -> None:
    print(
        f"[{time.strftime('%H:%M:%S')} load {procstats.loadavg1():.2f}] {message}",
        file=sys.stderr,
        flush=True,
    )


# -- statistics ------------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` (0..1) of ``values``."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary_ms(values: Sequence[float]) -> dict[str, Any] | None:
    """n, p50, p95, min, max of ``values`` (seconds), in ms; None when there are none."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {
        "n": len(values),
        "p50_ms": round(statistics.median(values) * 1e3, 2),
        "p95_ms": round(pct(values, 0.95) * 1e3, 2),
        "min_ms": round(min(values) * 1e3, 2),
        "max_ms": round(max(values) * 1e3, 2),
    }


def throughput(seconds: Sequence[float], size: int) -> dict[str, Any]:
    """Median of the transfers, in seconds and MiB/s; every transfer listed."""
    median = statistics.median(seconds)
    return {
        "bytes": size,
        "transfers_s": [round(s, 4) for s in seconds],
        "median_s": round(median, 4),
        "median_mib_s": round(size / MIB / median, 2),
    }


# -- worker processes ------------------------------------------------------------------------


class Peer:
    """One ``benchmarks.nat_peer`` worker process, spoken to in JSON lines."""

    def __init__(self, label: str, prefix: Sequence[str], logs: Path) -> None:
        self.label = label
        self.log_path = logs / f"{label}.log"
        env = {**os.environ, "MTOR_BENCH_ROOT_PID": str(procstats.root_pid())}
        with open(self.log_path, "ab") as stderr:
            self.process = subprocess.Popen(
                [*prefix, sys.executable, "-m", "benchmarks.nat_peer"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                cwd=str(ROOT),
                env=env,
            )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._replies: dict[Any, dict[str, Any]] = {}
        self._next = 0
        threading.Thread(target=self._read, daemon=True).start()
        self.pid = int(self.recv("ready", wait=60)["pid"])

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def send(self, cmd: str, **args: Any) -> int:
        self._next += 1
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"id": self._next, "cmd": cmd, **args}) + "\n")
        self.process.stdin.flush()
        return self._next

    def recv(self, ident: Any, wait: float = 120.0) -> dict[str, Any]:
        """The answer to command ``ident`` (raises if it failed or none came in ``wait`` s)."""
        deadline = time.monotonic() + wait
        while ident not in self._replies:
            try:
                line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"{self.label}: no answer to {ident} in {wait} s") from None
            if line is None:
                raise RuntimeError(f"{self.label} exited: {self.tail()}")
            try:
                reply = json.loads(line)
            except ValueError:
                continue  # not ours (a library printing to stdout)
            self._replies[reply.get("id")] = reply
        reply = self._replies.pop(ident)
        if not reply.get("ok"):
            raise RuntimeError(f"{self.label}: {reply.get('error')}\n{reply.get('traceback', '')}")
        return reply

    def call(self, cmd: str, wait: float = 120.0, **args: Any) -> dict[str, Any]:
        return self.recv(self.send(cmd, **args), wait=wait)

    def tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-1500:]
        except OSError:
            return ""

    def cpu_seconds(self) -> float:
        import psutil

        times = psutil.Process(self.pid).cpu_times()
        return times.user + times.system

    def memory(self) -> dict[str, Any]:
        return procstats.memory(self.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.call("quit", wait=20)
            except Exception:
                pass
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


class Lab:
    """A NAT lab with the relay host running, and workers in a and b."""

    def __init__(self, lab: Any, logs: Path, circuit_bytes: int = 64 * MIB) -> None:
        self.lab = lab
        self.logs = logs
        self.peers: list[Peer] = []
        self.relay = self.peer("relay")
        ip = lab.addr("relay")
        opened = self.relay.call(
            "open",
            name="relay",
            relay=True,
            hole_punching=False,
            listen=[f"/ip4/{ip}/tcp/{RELAY_PORT}"],
            circuit_bytes=circuit_bytes,
        )
        self.relay_addr = f"/ip4/{ip}/tcp/{RELAY_PORT}/p2p/{opened['peer_id']}"
        self.relay_id = opened["peer_id"]
        self.relay.call("tcp_serve", host=ip, port=5001)
        self.a = self.peer("a")
        self.b = self.peer("b")

    def peer(self, node: str) -> Peer:
        peer = Peer(f"{self.lab.name}-{node}", self.lab.exec_args(node, []), self.logs)
        self.peers.append(peer)
        return peer

    def stop(self) -> None:
        for peer in reversed(self.peers):
            peer.stop()


def open_pair(lab: Lab, tag: str, port: int, hole_punching: bool) -> tuple[str, str]:
    """Fresh hosts ``a<tag>`` and ``b<tag>`` on ``port``; their peer IDs."""
    ia = lab.a.send(
        "open",
        name=f"a{tag}",
        listen=[f"/ip4/{lab.lab.addr('a')}/tcp/{port}"],
        hole_punching=hole_punching,
    )
    ib = lab.b.send(
        "open",
        name=f"b{tag}",
        listen=[f"/ip4/{lab.lab.addr('b')}/tcp/{port}"],
        hole_punching=hole_punching,
    )
    return lab.a.recv(ia)["peer_id"], lab.b.recv(ib)["peer_id"]


def close_pair(lab: Lab, tag: str) -> None:
    ia = lab.a.send("close", name=f"a{tag}")
    ib = lab.b.send("close", name=f"b{tag}")
    lab.a.recv(ia, wait=30)
    lab.b.recv(ib, wait=30)


def relayed_contact(lab: Lab, tag: str, watch: float) -> dict[str, Any]:
    """a<tag> joins the relay, b<tag> reserves on it, a<tag> dials b<tag> through it and
    (``watch`` > 0) waits for a direct connection."""
    ia = lab.a.send("connect", name=f"a{tag}", addr=lab.relay_addr)
    circuit = lab.b.call("reserve", name=f"b{tag}", relay_addr=lab.relay_addr)
    lab.a.recv(ia)
    if not circuit["reserved"]:
        raise RuntimeError(f"b{tag}: reservation refused")
    return lab.a.call(
        "connect", wait=watch + 30, name=f"a{tag}", addr=circuit["circuits"][0], watch=watch
    )


def punch_trial(lab: Lab, i: int, rtt_n: int) -> dict[str, Any]:
    """One trial of the punch part (see the module doc)."""
    tag = f"t{i}"
    a_id, b_id = open_pair(lab, tag, TRIAL_BASE_PORT + i, hole_punching=True)
    try:
        contact = relayed_contact(lab, tag, WATCH_S)
        # b's own verdict lands a moment after a sees the direct connection (or, on failure,
        # after its last attempt): wait for it a little.
        deadline = time.monotonic() + (5.0 if contact["t_direct"] is not None else 10.0)
        while True:
            got = lab.b.call("punch_log", name=f"b{tag}")
            ours = got["log"].get(a_id, {})
            done = "result_ok" in ours or "result_failed" in ours
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        a_side = lab.a.call("punch_log", name=f"a{tag}")
        rtt = lab.a.call("rtt", name=f"a{tag}", peer=lab.relay_id, n=rtt_n)
        tcp = lab.a.call("tcp_send", host=lab.lab.addr("relay"), port=5001, rtt_n=rtt_n, n=0)
    finally:
        close_pair(lab, tag)
    t0 = contact["t_connected"]

    def after(t: float | None) -> float | None:
        return None if t is None else round(t - t0, 4)

    events = got["log"].get(a_id, {})
    first = {k: after(v[0]) for k, v in events.items() if v}
    punch = got["punches"].get(a_id)
    return {
        "trial": i,
        "port": TRIAL_BASE_PORT + i,
        "relayed_connect_s": round(contact["t_connected"] - contact["t_call"], 4),
        "kind_at_connect": contact["kind_at_connect"],
        "direct": contact["t_direct"] is not None,
        "to_direct_s": after(contact["t_direct"]),
        # DCUtR as b (the driver) did it, from a's relayed connect() returning:
        "b_dcutr_started_s": first.get("initiate"),
        "b_unilateral_dial_s": [first.get("unilateral_start"), first.get("unilateral_end")],
        # The exchange itself: a's DCUtR handler got b's stream.
        "a_dcutr_stream_s": after(a_side["dcutr_inbound"].get(b_id, contact["dcutr_inbound"])),
        "b_punch_dials_s": first.get("dials_start"),
        "b_attempts": got["attempts"].get(a_id, 0),
        "b_results": {
            k: [after(t) for t in v] for k, v in events.items() if k.startswith("result")
        },
        "b_reported": punch,
        "b_knows_a_at": got.get("peer_addrs", {}).get(a_id, []),
        "a_punch_dials_s": [after(t) for t in a_side["log"].get(b_id, {}).get("dials_start", [])],
        "rtt_a_relay_libp2p_s": [round(s, 5) for s in rtt["seconds"]],
        "rtt_a_relay_tcp_s": [round(s, 6) for s in tcp["rtt_seconds"]],
        "a": a_id,
        "b": b_id,
    }


def _slow(trial: dict[str, Any]) -> bool:
    """Whether b's unilateral dial (DCUtR's step 0) took over a second in this trial."""
    start, end = trial["b_unilateral_dial_s"]
    return start is not None and end is not None and end - start > 1.0


def summarise_trials(trials: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [t for t in trials if t["direct"]]
    out: dict[str, Any] = {
        "trials": len(trials),
        "direct": len(ok),
        "failed": len(trials) - len(ok),
        "success_rate": round(len(ok) / len(trials), 3) if trials else None,
        "to_direct": summary_ms([t["to_direct_s"] for t in ok]),
        "relayed_connect": summary_ms([t["relayed_connect_s"] for t in trials]),
        "b_dcutr_started": summary_ms([t["b_dcutr_started_s"] for t in trials]),
        "b_unilateral_dial_end": summary_ms([t["b_unilateral_dial_s"][1] for t in trials]),
        "a_dcutr_stream": summary_ms([t["a_dcutr_stream_s"] for t in trials]),
        "b_punch_dials": summary_ms([t["b_punch_dials_s"] for t in trials]),
        # DCUtR first dials the peer's known addresses (its private ones, unreachable here)
        # with a 3 s timeout; when identify has told b a's addresses before b's DCUtR starts,
        # that costs up to 3 s before the exchange.
        "unilateral_dial_over_1s": sum(1 for t in trials if _slow(t)),
        # From a seeing b's DCUtR stream (the exchange starting) to the direct connection.
        "exchange_to_direct": summary_ms(
            [t["to_direct_s"] - t["a_dcutr_stream_s"] for t in ok if t["a_dcutr_stream_s"]]
        ),
        # The two modes: b's unilateral dial returned at once (it knew no address of a yet)
        # or waited out its 3 s timeout on a's unreachable addresses.
        "to_direct_unilateral_fast": summary_ms([t["to_direct_s"] for t in ok if not _slow(t)]),
        "to_direct_unilateral_3s": summary_ms([t["to_direct_s"] for t in ok if _slow(t)]),
        "baseline_rtt_a_relay_libp2p": summary_ms(
            [s for t in trials for s in t["rtt_a_relay_libp2p_s"]]
        ),
        "baseline_rtt_a_relay_tcp": summary_ms([s for t in trials for s in t["rtt_a_relay_tcp_s"]]),
    }
    return out


def run_trials(lab: Lab, n: int, label: str, rtt_n: int, first: int = 0) -> list[dict[str, Any]]:
    trials = []
    for i in range(first, first + n):
        trial = punch_trial(lab, i, rtt_n)
        trials.append(trial)
        what = f"direct after {trial['to_direct_s']:.3f} s" if trial["direct"] else "no direct"
        log(
            f"  {label} trial {i - first + 1}/{n}: {what} (b's DCUtR began at "
            f"{trial['b_dcutr_started_s']}, a saw its stream at {trial['a_dcutr_stream_s']})"
        )
    return trials


def logs_dir(root: Path | None, part: str) -> Path:
    """Where ``part``'s peers write their logs: under ``root`` (``--logs``), else in a fresh
    temporary directory, kept after the run for reading."""
    if root is None:
        path = Path(tempfile.mkdtemp(prefix=f"mtor-nat-{part}-"))
    else:
        path = root / part
        path.mkdir(parents=True, exist_ok=True)
    log(f"  {part}: peer logs in {path.resolve()}")
    return path


def part_punch(trials: int, rtt_n: int, logs: Path | None = None) -> dict[str, Any]:
    from tests.natlab import nat_lab

    with nat_lab() as raw:
        lab = Lab(raw, logs_dir(logs, "punch"))
        try:
            done = run_trials(lab, trials, "port-preserving", rtt_n)
        finally:
            lab.stop()
    return {
        "nat_a": "port-preserving",
        "nat_b": "port-preserving",
        "summary": summarise_trials(done),
        "trials": done,
    }


def part_symmetric(trials: int, rtt_n: int, logs: Path | None = None) -> dict[str, Any]:
    from tests.natlab import nat_lab

    with nat_lab(nat_b="symmetric") as raw:
        lab = Lab(raw, logs_dir(logs, "symmetric"))
        try:
            done = run_trials(lab, trials, "symmetric b", rtt_n)
        finally:
            lab.stop()
    return {
        "nat_a": "port-preserving",
        "nat_b": "symmetric",
        "summary": summarise_trials(done),
        "trials": done,
    }


def wait_all_direct(lab: Lab, tag: str, peer: str, timeout: float = 20.0) -> list[str]:
    """Wait until every connection a<tag> has to ``peer`` is direct (DCUtR closes the relayed
    one a grace period after the punch), so the stream cannot take the relayed one."""
    deadline = time.monotonic() + timeout
    kinds: list[str] = []
    while time.monotonic() < deadline:
        kinds = lab.a.call("conn_kinds", name=f"a{tag}", peer=peer)["kinds"]
        if kinds and all(k == "direct" for k in kinds):
            return kinds
        time.sleep(0.25)
    return kinds


def part_throughput(transfers: int, logs: Path | None = None) -> dict[str, Any]:
    from tests.natlab import nat_lab

    out: dict[str, Any] = {
        "operand_bytes": OPERAND,
        "transfers_each": transfers,
        "how": (
            "a raw libp2p stream (/bench/sink/1: 8-byte length, the bytes, 1-byte answer), "
            "not an MTOR request: MTOR refuses requests over 64 KiB on a relay by design "
            "(RELAYED_MAX_REQUEST_BYTES) and the relay's default circuit limit is 8 MiB, so "
            "the relay ran with circuit_bytes = 64 MiB; what is measured is the path"
        ),
    }
    with nat_lab() as raw:
        lab = Lab(raw, logs_dir(logs, "throughput"))
        try:
            # Relayed: hole punching off on both hosts.
            _, b_id = open_pair(lab, "rel", 4300, hole_punching=False)
            contact = relayed_contact(lab, "rel", 0)
            sent = lab.a.call(
                "stream_send", wait=900, name="arel", peer=b_id, size=OPERAND, n=transfers
            )
            out["relayed"] = {
                **throughput(sent["seconds"], OPERAND),
                "kinds": sent["kinds"],
                "kind_at_connect": contact["kind_at_connect"],
            }
            close_pair(lab, "rel")
            log(f"  relayed: {out['relayed']['median_mib_s']} MiB/s")
            # Direct: punched, and the relayed connection closed before the first byte.
            _, b_id = open_pair(lab, "dir", 4301, hole_punching=True)
            contact = relayed_contact(lab, "dir", WATCH_S)
            if contact["t_direct"] is None:
                out["direct"] = {"error": "no direct connection within 30 s"}
            else:
                kinds = wait_all_direct(lab, "dir", b_id)
                sent = lab.a.call(
                    "stream_send", wait=600, name="adir", peer=b_id, size=OPERAND, n=transfers
                )
                out["direct"] = {
                    **throughput(sent["seconds"], OPERAND),
                    "kinds": sent["kinds"],
                    "connections_before": kinds,
                    "to_direct_s": round(contact["t_direct"] - contact["t_connected"], 3),
                }
                log(f"  direct: {out['direct']['median_mib_s']} MiB/s")
            close_pair(lab, "dir")
            # Baselines: plain TCP a -> b through a port forward on b's router (the punched
            # connection's path: a's NAT, the "internet", b's NAT), and a -> relay.
            raw.forward("b", 5002)
            lab.b.call("tcp_serve", host=raw.addr("b"), port=5002)
            sent = lab.a.call(
                "tcp_send",
                wait=300,
                host=raw.wan("b"),
                port=5002,
                size=OPERAND,
                n=transfers,
                rtt_n=20,
            )
            out["baseline_tcp_a_to_b_forward"] = {
                **throughput(sent["seconds"], OPERAND),
                "rtt": summary_ms(sent["rtt_seconds"]),
            }
            sent = lab.a.call(
                "tcp_send",
                wait=300,
                host=raw.addr("relay"),
                port=5001,
                size=OPERAND,
                n=transfers,
                rtt_n=20,
            )
            out["baseline_tcp_a_to_relay"] = {
                **throughput(sent["seconds"], OPERAND),
                "rtt": summary_ms(sent["rtt_seconds"]),
            }
            log(
                f"  TCP a->b (forward): {out['baseline_tcp_a_to_b_forward']['median_mib_s']} "
                f"MiB/s; a->relay: {out['baseline_tcp_a_to_relay']['median_mib_s']} MiB/s"
            )
        finally:
            lab.stop()
    if "median_s" in out.get("direct", {}):
        out["direct_over_relayed"] = round(
            out["relayed"]["median_s"] / out["direct"]["median_s"], 2
        )
    return out


def part_relay(
    window: float, circuits_side: int = 10, settle: float = 3.0, logs: Path | None = None
) -> dict[str, Any]:
    """The relay's CPU and memory per 100 circuits, on loopback (see the module doc)."""
    logs = logs_dir(logs, "relay")
    relay = Peer("relay", [], logs)
    dests = Peer("dests", [], logs)
    dialers = Peer("dialers", [], logs)
    out: dict[str, Any] = {
        "hosts": {"destinations": circuits_side, "dialers": circuits_side},
        "window_s": window,
        "where": "loopback, three processes",
    }
    try:
        opened = relay.call(
            "open",
            name="relay",
            relay=True,
            hole_punching=False,
            max_circuits_per_peer=16,
            max_reservations=64,
            # Every dialer here comes from 127.0.0.1: the per-IP cap (2 circuits from one IP
            # to one destination) would hold it to 20 circuits.
            circuits_per_source_ip=16,
        )
        relay_addr = opened["addrs"][0]
        pending = [
            dests.send("open", name=f"d{i}", hole_punching=False) for i in range(circuits_side)
        ]
        dest_ids = [dests.recv(p)["peer_id"] for p in pending]
        pending = [
            dialers.send("open", name=f"c{i}", hole_punching=False) for i in range(circuits_side)
        ]
        for p in pending:
            dialers.recv(p)
        pending = [
            dests.send("reserve", name=f"d{i}", relay_addr=relay_addr) for i in range(circuits_side)
        ]
        circuits = [dests.recv(p)["circuits"][0] for p in pending]
        pending = [
            dialers.send("connect", name=f"c{i}", addr=relay_addr) for i in range(circuits_side)
        ]
        for p in pending:
            dialers.recv(p)
        time.sleep(settle)

        def window_cpu(label: str) -> dict[str, Any]:
            c0, t0 = relay.cpu_seconds(), time.monotonic()
            with procstats.Section() as section:
                time.sleep(window)
            cpu, wall = relay.cpu_seconds() - c0, time.monotonic() - t0
            log(f"  relay {label}: {cpu:.2f} CPU s over {wall:.1f} s")
            return {
                "cpu_s": round(cpu, 3),
                "wall_s": round(wall, 2),
                "cores": round(cpu / wall, 4),
                "section": section.result,
            }

        out["before"] = {
            "relay_stats": relay.call("relay_stats", name="relay"),
            "memory": relay.memory(),
            "cpu": window_cpu("before circuits (20 hosts connected, 10 reservations)"),
        }
        pending = [
            dialers.send("connect_many", name=f"c{i}", addrs=circuits) for i in range(circuits_side)
        ]
        dialled = [dialers.recv(p, wait=300) for p in pending]
        kinds = [k for d in dialled for k in d["kinds"]]
        errors = [e for d in dialled for e in d["errors"]]
        time.sleep(settle)
        out["circuits"] = {
            "dialled": len(kinds),
            "relayed": kinds.count("relayed"),
            "direct": kinds.count("direct"),
            "errors": errors[:5],
        }
        out["idle"] = {
            "relay_stats": relay.call("relay_stats", name="relay"),
            "memory": relay.memory(),
            "cpu": window_cpu("100 circuits idle"),
        }
        # Traffic: every circuit carries a 1 KiB request and its 1 KiB answer once a second.
        ident = dialers.send(
            "traffic",
            names=[f"c{i}" for i in range(circuits_side)],
            targets=dest_ids,
            seconds=window + 2,
            size=1024,
            interval=1.0,
        )
        time.sleep(1.0)
        cpu_procs0 = {p.label: p.cpu_seconds() for p in (dests, dialers)}
        busy = window_cpu("100 circuits, 1 KiB each way per circuit per second")
        others = {
            label: round((proc.cpu_seconds() - cpu_procs0[label]) / busy["wall_s"], 3)
            for label, proc in (("dests", dests), ("dialers", dialers))
        }
        traffic = dialers.recv(ident, wait=window + 60)
        after = [
            k
            for i in range(circuits_side)
            for p, k in dialers.call("kinds", name=f"c{i}")["kinds"].items()
            if p in dest_ids
        ]
        out["traffic"] = {
            "relay_stats": relay.call("relay_stats", name="relay"),
            "memory": relay.memory(),
            "cpu": busy,
            "requests": traffic,
            "other_processes_cores": others,
            "kinds_after": {"relayed": after.count("relayed"), "direct": after.count("direct")},
        }
        n = out["idle"]["relay_stats"]["active_circuits"]
        scale = 100.0 / n if n else None
        rss0 = out["before"]["memory"]["rss_mib"]
        if scale is not None:
            out["per_100_circuits"] = {
                "active_circuits_measured": n,
                "rss_mib": round((out["idle"]["memory"]["rss_mib"] - rss0) * scale, 1),
                "rss_mib_after_traffic": round(
                    (out["traffic"]["memory"]["rss_mib"] - rss0) * scale, 1
                ),
                "idle_cores": round(
                    (out["idle"]["cpu"]["cores"] - out["before"]["cpu"]["cores"]) * scale, 4
                ),
                "traffic_cores": round((busy["cores"] - out["before"]["cpu"]["cores"]) * scale, 4),
                "offered_requests_per_s": traffic["senders"],
                "achieved_requests_per_s": round(traffic["requests_per_s"], 1),
                "traffic_cpu_ms_per_request": round(
                    (busy["cores"] - out["before"]["cpu"]["cores"])
                    / max(traffic["requests_per_s"], 1e-9)
                    * 1e3,
                    3,
                ),
            }
            # Where the machine could not carry the offered rate: CPU per request times it.
            per_100 = out["per_100_circuits"]
            per_100["traffic_cores_at_offered_rate_linear"] = round(
                per_100["traffic_cpu_ms_per_request"] * traffic["senders"] * scale / 1e3, 3
            )
    finally:
        for peer in (dialers, dests, relay):
            peer.stop()
    return out


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=False
        )
        return done.stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty_files": git("status", "--porcelain", "--untracked-files=no").splitlines()[:20],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks nat",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="fewer trials, shorter windows")
    parser.add_argument("--only", default=",".join(PARTS), help=f"parts: {', '.join(PARTS)}")
    parser.add_argument("--trials", type=int, default=None, help="port-preserving trials")
    parser.add_argument("--sym-trials", type=int, default=None, help="symmetric-NAT trials")
    parser.add_argument("--transfers", type=int, default=3, help="16 MiB transfers per path")
    parser.add_argument("--window", type=float, default=None, help="relay CPU window, seconds")
    parser.add_argument(
        "--out",
        type=user_path,
        default=RESULTS / "nat.json",
        help="results file (default: benchmarks/results/nat.json in the checkout)",
    )
    parser.add_argument(
        "--logs",
        type=user_path,
        default=None,
        help="directory for the peers' logs, one subdirectory per part "
        "(default: a new temporary directory per part, kept after the run)",
    )
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.only.split(",") if p.strip()]
    for part in args.parts:
        if part not in PARTS:
            parser.error(f"--only: unknown part {part!r} (known: {', '.join(PARTS)})")
    if args.trials is None:
        args.trials = 6 if args.quick else 24
    if args.sym_trials is None:
        args.sym_trials = 2 if args.quick else 5
    if args.window is None:
        args.window = 10.0 if args.quick else 20.0
    if min(args.trials, args.sym_trials, args.transfers) < 0 or args.window <= 0:
        parser.error("counts must be >= 0 and --window > 0")
    return args


def lab_reason() -> str | None:
    sys.path.insert(0, str(ROOT))
    from tests.natlab import skip_reason

    return skip_reason()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    needs_lab = [p for p in args.parts if p != "relay"]
    if needs_lab:
        reason = lab_reason()
        if reason is not None:
            print(
                f"bench nat: the NAT lab cannot run here, nothing measured: {reason}",
                file=sys.stderr,
            )
            return EXIT_NO_LAB
    os.environ.setdefault("MTOR_BENCH_ROOT_PID", str(os.getpid()))
    out: dict[str, Any] = {
        "benchmark": "nat",
        "command": "python -m benchmarks nat "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "git": git_commit(),
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "results": {},
    }
    out["settings"]["out"] = str(args.out)

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2, default=str) + "\n")

    rtt_n = 5
    if "punch" in args.parts and args.trials:
        log(f"punch: {args.trials} trials, both NATs port-preserving")
        out["results"]["punch_port_preserving"] = part_punch(args.trials, rtt_n, args.logs)
        save()
    if "symmetric" in args.parts and args.sym_trials:
        log(f"symmetric: {args.sym_trials} trials, b behind a symmetric NAT (30 s per failure)")
        out["results"]["punch_symmetric_b"] = part_symmetric(args.sym_trials, rtt_n, args.logs)
        save()
    if "throughput" in args.parts and args.transfers:
        log(f"throughput: {args.transfers} x 16 MiB relayed, direct, plain TCP")
        out["results"]["throughput_16mib"] = part_throughput(args.transfers, args.logs)
        save()
    if "relay" in args.parts:
        log(f"relay: 100 circuits on loopback, {args.window:g} s windows")
        out["results"]["relay_100_circuits"] = part_relay(args.window, logs=args.logs)
        save()
    out["load1_end"] = procstats.loadavg1()
    save()
    print_summary(out)
    return 0


def print_summary(out: dict[str, Any]) -> None:
    results = out["results"]
    lines = [f"NAT traversal, {out['machine']['cores']} cores, {out['date']}"]
    for key in ("punch_port_preserving", "punch_symmetric_b"):
        if key in results:
            s = results[key]["summary"]
            d = s["to_direct"] or {}
            lines.append(
                f"{key}: {s['direct']}/{s['trials']} direct; to direct p50 {d.get('p50_ms')} "
                f"p95 {d.get('p95_ms')} ms; b's DCUtR began p50 "
                f"{(s['b_dcutr_started'] or {}).get('p50_ms')} ms; RTT a<->relay libp2p p50 "
                f"{(s['baseline_rtt_a_relay_libp2p'] or {}).get('p50_ms')} ms, TCP p50 "
                f"{(s['baseline_rtt_a_relay_tcp'] or {}).get('p50_ms')} ms"
            )
    if "throughput_16mib" in results:
        t = results["throughput_16mib"]
        for key in ("relayed", "direct", "baseline_tcp_a_to_b_forward", "baseline_tcp_a_to_relay"):
            if key in t:
                lines.append(
                    f"16 MiB {key}: {t[key].get('median_mib_s')} MiB/s "
                    f"(median {t[key].get('median_s')} s)"
                )
    if "relay_100_circuits" in results:
        lines.append(
            f"relay per 100 circuits: {results['relay_100_circuits'].get('per_100_circuits')}"
        )
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
