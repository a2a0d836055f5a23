"""Ledger figures, each beside a baseline measured in the same run.

* **Ingest**: receipts entered per second into a fresh ledger (decode, both Ed25519 signatures,
  SQLite WAL insert with ``synchronous=FULL``, balance update), in batches of 500. Baselines:
  the same receipts decoded and verified without storing (the signature floor), and stored
  without verification (plain ``executemany`` into the same schema).
* **Sync**: time for a peer with an empty ledger to pull 100,000 receipts from another over
  ``/mtor/ledger/sync/<rules>`` (two real py-libp2p hosts on loopback, one process), verified and
  stored. Baselines: the same bytes through a plain trio TCP stream on loopback, and local
  ingest of the same entries without any network.
* **Late entries**: one receipt entered and the balances read after it, with 1,000 and
  20,000 receipts held, when the receipt sorts a few entries before the newest (as receipts of
  several workers arrive) against one that sorts after every entry (the baseline: the walk
  goes on in place). Medians of 100 of each, alternating.
* **Checkpoint**: verification of one aggregate BLS signature by 100 signers with py-ecc and
  with blspy (from ``benchmarks.bench_bls``).

Run: ``./mtor bench ledger [--receipts 100000] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import trio

from benchmarks.machine import machine
from benchmarks.paths import user_path
from mtor_p2p.clock import NetClock
from mtor_p2p.identity import Identity
from mtor_p2p.ledger.service import LedgerService
from mtor_p2p.ledger.store import SCHEMA, Ledger
from mtor_p2p.libp2p_host import HostSettings, Libp2pNetwork
from mtor_p2p.records.receipts import decode_receipt
from tests.ledger_data import PEERS, genesis, receipt

RESULTS = Path(__file__).parent / "results"


def make_receipts(count: int) -> list[bytes]:
    """``count`` distinct countersigned receipts between the four test peers."""
    job = os.urandom(32).hex()
    return [
        receipt(PEERS[i % 2], PEERS[2 + (i // 2) % 2], job=job, shard=i, price=0.5 + (i % 7))
        for i in range(count)
    ]


def forget_checks() -> None:
    """Empty the process's caches of checked signatures and decoded receipts.

    This process signed the receipts it measures (and a signer's own signatures are cached
    as checked), and measures one step after another on the same bytes: without this, a
    later step would time cache hits instead of Ed25519 checks."""
    from mtor_p2p import identity
    from mtor_p2p.records import receipts

    identity._VERIFIED.clear()
    receipts._DECODED.clear()


def _progress(message: str) -> None:
    print(f"\r{message}", end="", file=sys.stderr, flush=True)


def measure_ingest(wires: list[bytes], root: Path) -> dict[str, Any]:
    """Receipts per second: full ingest, verification only, storage only."""
    gen = genesis()
    ledger = Ledger(root / "ingest.sqlite", gen)
    forget_checks()
    started = time.perf_counter()
    for i in range(0, len(wires), 500):
        ledger.ingest(wires[i : i + 500])
    full = time.perf_counter() - started
    assert ledger.count("receipt") == len(wires)
    ledger.close()
    forget_checks()
    started = time.perf_counter()
    for wire in wires:
        decode_receipt(wire[1:])
    verify_only = time.perf_counter() - started
    db = sqlite3.connect(root / "plain.sqlite", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(SCHEMA)
    started = time.perf_counter()
    for i in range(0, len(wires), 500):
        db.execute("BEGIN IMMEDIATE")  # one transaction per batch, as the ledger does
        db.executemany(
            "INSERT INTO entries (id, kind, at, rank, payer, payee, amount, claim, epoch, "
            "bls, wire) VALUES (?, 'receipt', 0, 0, '', '', 0, '', 0, x'', ?)",
            [(f"{i}-{j}", w) for j, w in enumerate(wires[i : i + 500])],
        )
        db.execute("COMMIT")
    store_only = time.perf_counter() - started
    db.close()
    n = len(wires)
    return {
        "receipts": n,
        "ingest_per_s": round(n / full),
        "baseline_verify_only_per_s": round(n / verify_only),
        "baseline_store_only_per_s": round(n / store_only),
        "serial_verify_seconds_over_ingest_seconds": round(verify_only / full, 2),
    }


def measure_late_entries(held_counts: tuple[int, ...], root: Path) -> dict[str, Any]:
    """Entering one receipt and reading the balances after it: a receipt that sorts a few
    entries before the newest (late), against one that sorts after every entry (in order)."""
    gen = genesis([10**6, 10**6, 0, 0])
    start = 1_800_000_000.0
    out: dict[str, Any] = {}
    for held in held_counts:
        ledger = Ledger(root / f"late-{held}.sqlite", gen)
        history = [
            receipt(PEERS[0], PEERS[2], price=0.001, flops=10**9, ended=start + i)
            for i in range(held)
        ]
        for i in range(0, held, 500):
            ledger.ingest(history[i : i + 500])
        ledger.state()
        timings: dict[str, list[float]] = {"in_order": [], "late": []}
        tail = start + held
        for j in range(100):
            for kind, ended in (("in_order", tail + j), ("late", tail + j - 3.5)):
                wire = receipt(PEERS[0], PEERS[3], price=0.001, flops=10**9, ended=ended)
                forget_checks()  # checked as a receipt from elsewhere is
                began = time.perf_counter()
                ledger.ingest([wire])
                ledger.state().spendable(PEERS[0].peer_id)
                timings[kind].append(time.perf_counter() - began)
        ledger.close()
        late, in_order = (statistics.median(timings[k]) * 1e3 for k in ("late", "in_order"))
        out[str(held)] = {
            "late_entry_and_read_ms": round(late, 3),
            "baseline_in_order_entry_and_read_ms": round(in_order, 3),
            "ratio": round(late / in_order, 2),
        }
    return out


async def _raw_tcp_copy(payload: bytes) -> float:
    """Seconds to push ``payload`` through a plain loopback TCP stream (the transport floor)."""
    received = trio.Event()

    async def serve(stream: trio.SocketStream) -> None:
        got = 0
        while got < len(payload):
            chunk = await stream.receive_some(1 << 20)
            if not chunk:
                break
            got += len(chunk)
        received.set()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        started = trio.current_time()
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(payload)
        await received.wait()
        elapsed = trio.current_time() - started
        await stream.aclose()
        nursery.cancel_scope.cancel()
    return elapsed


async def measure_sync(wires: list[bytes], root: Path) -> dict[str, Any]:
    """A fresh peer pulls every entry from another over real libp2p hosts."""
    gen = genesis()
    source = Ledger(root / "source.sqlite", gen)
    for i in range(0, len(wires), 2000):
        source.ingest(wires[i : i + 2000])
    local = Ledger(root / "local.sqlite", gen)
    forget_checks()
    started = time.perf_counter()
    for i in range(0, len(wires), 2000):
        local.ingest(wires[i : i + 2000])
    local_ingest = time.perf_counter() - started
    local.close()
    settings = HostSettings(listen_addrs=["/ip4/127.0.0.1/tcp/0"])
    async with (
        Libp2pNetwork.open(Identity.generate(), settings) as net_a,
        Libp2pNetwork.open(Identity.generate(), settings) as net_b,
    ):
        LedgerService(net_a, Identity.generate(), NetClock(), source)
        target = Ledger(root / "target.sqlite", gen)
        puller = LedgerService(net_b, Identity.generate(), NetClock(), target)
        await net_b.connect(net_a.addrs()[0])
        forget_checks()  # the source (this process) checked them all as it took them in
        started = trio.current_time()
        new = await puller.sync_from(net_a.peer_id, timeout=120)
        seconds = trio.current_time() - started
        assert new == len(wires), (new, len(wires))
        agree = target.state().balances == source.state().balances
        target.close()
    source.close()
    raw = await _raw_tcp_copy(b"".join(wires))
    size = sum(len(w) for w in wires)
    return {
        "receipts": len(wires),
        "bytes": size,
        "sync_s": round(seconds, 2),
        "sync_receipts_per_s": round(len(wires) / seconds),
        "balances_agree": agree,
        "baseline_local_ingest_s": round(local_ingest, 2),
        "baseline_raw_tcp_copy_s": round(raw, 3),
    }


def main(argv: list[str]) -> int:
    """Run the ledger benchmarks; print a summary and write JSON."""
    parser = argparse.ArgumentParser(prog="bench ledger", description=__doc__)
    parser.add_argument("--receipts", type=int, default=100_000, help="receipts to sync")
    parser.add_argument("--ingest", type=int, default=20_000, help="receipts to ingest")
    parser.add_argument("--signers", type=int, default=100, help="checkpoint signers")
    parser.add_argument("--json", type=user_path, default=RESULTS / "ledger.json")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {
        "machine": machine(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _progress(f"making {max(args.receipts, args.ingest)} signed receipts...")
        wires = make_receipts(max(args.receipts, args.ingest))
        _progress("ingest...                     ")
        report["ingest"] = measure_ingest(wires[: args.ingest], root)
        _progress("late entries...               ")
        report["late_entries"] = measure_late_entries((1_000, 20_000), root)
        _progress(f"sync of {args.receipts} receipts...")
        report["sync"] = trio.run(measure_sync, wires[: args.receipts], root)
    _progress(f"checkpoint verify, {args.signers} signers (py-ecc takes a minute)...")
    from benchmarks.bench_bls import measure

    report["checkpoint"] = measure(signers=args.signers, repeats=3)
    print(file=sys.stderr)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    ingest, sync = report["ingest"], report["sync"]
    print(
        f"ingest  {ingest['ingest_per_s']} receipts/s (verify only "
        f"{ingest['baseline_verify_only_per_s']}/s, store only "
        f"{ingest['baseline_store_only_per_s']}/s)"
    )
    print(
        f"sync    {sync['receipts']} receipts ({sync['bytes'] / 1e6:.1f} MB) in {sync['sync_s']} s"
        f" (local ingest {sync['baseline_local_ingest_s']} s, raw TCP copy "
        f"{sync['baseline_raw_tcp_copy_s']} s)"
    )
    for held, late in report["late_entries"].items():
        print(
            f"late    entry + read with {held} held: {late['late_entry_and_read_ms']} ms (in order "
            f"{late['baseline_in_order_entry_and_read_ms']} ms, {late['ratio']}x)"
        )
    print(json.dumps(report["checkpoint"].get("backends", report["checkpoint"]))[:400])
    print(f"written to {args.json}")
    return 0
