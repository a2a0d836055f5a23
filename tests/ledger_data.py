"""Valid ledger entries for tests: receipts, stakes and fault proofs between fixed peers."""

from __future__ import annotations

import os

import blake3
import numpy as np

from mtor_kernels import get_kernel
from mtor_p2p.identity import Identity
from mtor_p2p.ledger.entries import (
    decode_entry,
    fault_entry,
    make_checkpoint,
    make_stake,
    make_transfer,
    make_vote,
    receipt_entry,
)
from mtor_p2p.ledger.genesis import NANO, Genesis, LedgerParams
from mtor_p2p.ledger.store import Ledger
from mtor_p2p.records.arrays import meta_of
from mtor_p2p.records.faults import make_fault_proof
from mtor_p2p.records.receipts import ReceiptBody, countersign, sign_as_worker

PEERS = [Identity(bytes([index + 1]) * 32) for index in range(4)]
_HASH = "ab" * 32


def genesis(allocations: list[int] | None = None, **params: object) -> Genesis:
    """A test network: ``allocations[i]`` credits (whole) to ``PEERS[i]``."""
    amounts = allocations if allocations is not None else [1000, 1000, 0, 0]
    return Genesis(
        network="mtor-test",
        allocations={p.peer_id: a * NANO for p, a in zip(PEERS, amounts, strict=False) if a},
        params=LedgerParams(**params),  # type: ignore[arg-type]
    )


def receipt(
    requester: Identity,
    worker: Identity,
    *,
    price: float = 1.0,
    flops: int = 10**12,
    ended: float = 1_800_000_000.0,
    job: str | None = None,
    shard: int = 0,
) -> bytes:
    """A countersigned receipt entry: ``price`` credits per TFLOP for ``flops``."""
    body = ReceiptBody(
        job_id=job or os.urandom(32).hex(),
        shard=shard,
        kernel="matmul",
        inputs={"a": _HASH, "b": _HASH},
        output=_HASH,
        flops=flops,
        started=ended - 1.0,
        ended=ended,
        worker=worker.peer_id,
        requester=requester.peer_id,
        price=price,
    )
    return receipt_entry(countersign(requester, sign_as_worker(worker, body)))


def stake(peer: Identity, credits: float, gen: Genesis, *, at: float = 1_800_000_000.0) -> bytes:
    """A stake entry of ``credits`` by ``peer``."""
    return make_stake(peer, round(credits * NANO), at, gen.hash, os.urandom(4).hex())


def transfer(
    payer: Identity, payee: Identity, credits: float, gen: Genesis, *, at: float = 1_800_000_000.0
) -> bytes:
    """A transfer entry of ``credits`` from ``payer`` to ``payee``."""
    return make_transfer(
        payer, payee.peer_id, round(credits * NANO), at, gen.hash, os.urandom(4).hex()
    )


def fault(
    worker: Identity,
    reporter: Identity,
    *,
    ended: float = 1_800_000_000.0,
    seed: int = 0,
    requester: Identity | None = None,
) -> bytes:
    """A fault proof entry: ``worker`` signed a wrong 4x4 product for ``requester`` (by
    default the reporter), and ``reporter`` proves it."""
    rng = np.random.default_rng(seed)
    operands = {
        "a": rng.standard_normal((4, 3)).astype("float32"),
        "b": rng.standard_normal((3, 4)).astype("float32"),
    }
    wrong = operands["a"] @ operands["b"]
    wrong[1, 2] += 5.0
    body = ReceiptBody(
        job_id=blake3.blake3(f"job {seed}".encode()).hexdigest(),
        shard=0,
        kernel="matmul",
        inputs={name: meta_of(array).digest for name, array in operands.items()},
        output=meta_of(wrong).digest,
        flops=96,
        started=ended - 1.0,
        ended=ended,
        worker=worker.peer_id,
        requester=(requester or reporter).peer_id,
        price=1.0,
    )
    claim = sign_as_worker(worker, body)
    proof = make_fault_proof(
        reporter, kernel=get_kernel("matmul"), operands=operands, output=wrong, claim=claim,
        rows=[1],
    )  # fmt: skip
    return fault_entry(proof)


def checkpointed_epoch(ledger: Ledger, gen: Genesis, at: float) -> list[str]:
    """Six receipts (PEERS[0] paying PEERS[3]) in ``at``'s epoch, stakes for PEERS[0:3], their
    votes and the final checkpoint over the receipts; the epoch's leaves (entry IDs). ``gen``
    must give PEERS[0:3] at least 100 credits each."""
    epoch = int(at // gen.params.epoch_seconds)
    signers = PEERS[:3]
    ledger.ingest([receipt(PEERS[0], PEERS[3], ended=at + n) for n in range(6)])
    ledger.ingest([stake(p, 100, gen, at=at - 3600) for p in signers])
    root, count = ledger.epoch_root(epoch)
    votes = [make_vote(p, gen.hash, epoch, root, count) for p in signers]
    ledger.ingest(votes)
    signatures = {e.payer: e.signature for e in (decode_entry(v, gen.hash) for v in votes)}
    leaves = ledger.epoch_leaves(epoch)
    if ledger.ingest([make_checkpoint(gen.hash, epoch, leaves, signatures)]).new != 1:
        raise AssertionError("the checkpoint was not stored")
    return leaves
