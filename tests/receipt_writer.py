"""Stores receipts through the receipt store's group commit as fast as it can, many at once,
and prints each receipt's ID as soon as its ``add_async`` returns (acknowledged).

Run by tests/test_critical_path.py as a real subprocess, which SIGKILLs it mid-write. Usage:
``python -m tests.receipt_writer RECEIPTS_PATH SEED``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

from mtor_p2p.compute.receipt_store import ReceiptStore
from mtor_p2p.identity import Identity
from mtor_p2p.records.receipts import ReceiptBody, countersign, sign_as_worker
from mtor_p2p.runtime import Runtime

WORKER = Identity(b"\x01" * 32)
REQUESTER = Identity(b"\x02" * 32)


def make_receipt(seed: int, number: int) -> object:
    body = ReceiptBody(
        job_id=f"{seed:02x}" * 32,
        shard=number,
        kernel="matmul",
        inputs={"a": "01" * 32, "b": "02" * 32},
        output="03" * 32,
        flops=2 * 512**3,
        started=1_800_000_000.0,
        ended=1_800_000_000.5,
        worker=WORKER.peer_id,
        requester=REQUESTER.peer_id,
        price=1.5,
    )
    half = sign_as_worker(WORKER, body)
    return countersign(REQUESTER, half) if number % 2 else half


async def main() -> None:
    path, seed = Path(sys.argv[1]), int(sys.argv[2])
    store = ReceiptStore(path)
    runtime = Runtime.production()
    counter = iter(range(10**9))

    async def writer() -> None:
        while True:
            receipt = make_receipt(seed, next(counter))
            await store.add_async(receipt, runtime.run_blocking)  # type: ignore[arg-type]
            # Acknowledged only now: this receipt must survive the kill.
            print(receipt.receipt_id, flush=True)  # type: ignore[attr-defined]

    async with trio.open_nursery() as nursery:
        for _ in range(16):
            nursery.start_soon(writer)


if __name__ == "__main__":
    trio.run(main)
