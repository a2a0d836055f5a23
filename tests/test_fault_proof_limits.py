"""What verifying a fault proof may cost each peer: bounded memory, bounded work.

A hostile review (2026-12-07): anyone may sign a wrong claim as a second identity of its own
and report it; a 130 KiB proof of a (1, 1, 8192, 1) attention made every peer verifying it
(each ledger replica) allocate 4.6 GiB for 12 s.
"""

from __future__ import annotations

import base64

import blake3
import numpy as np
import pytest

import mtor_kernels.attention as attention_module
from mtor_kernels import get_kernel
from mtor_p2p.identity import Identity
from mtor_p2p.records import faults
from mtor_p2p.records.arrays import meta_of, pack, unpack
from mtor_p2p.records.faults import (
    MAX_PROOF_RECOMPUTE_ELEMENTS,
    make_fault_proof,
    verify_fault_proof,
)
from mtor_p2p.records.receipts import ReceiptBody, sign_as_worker
from mtor_p2p.wire import RecordError, canonical_json

ATTENTION = get_kernel("attention")
WORKER, REPORTER = Identity(b"\x07" * 32), Identity(b"\x08" * 32)


def _attention(seq: int, batch: int = 1, heads: int = 1, dim: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        n: rng.standard_normal((batch, heads, seq, dim)).astype(np.float32) for n in ("q", "k", "v")
    }


def _proof(operands: dict[str, np.ndarray], output: np.ndarray, rows: list[int]) -> bytes:
    body = ReceiptBody(
        job_id=blake3.blake3(b"proof").hexdigest(),
        shard=0,
        kernel="attention",
        inputs={n: meta_of(a).digest for n, a in operands.items()},
        output=meta_of(output).digest,
        flops=int(ATTENTION.flops(operands)),
        started=1_800_000_000.0,
        ended=1_800_000_001.0,
        worker=WORKER.peer_id,
        requester=REPORTER.peer_id,
        price=1.0,
    )
    return make_fault_proof(
        REPORTER,
        kernel=ATTENTION,
        operands=operands,
        output=output,
        claim=sign_as_worker(WORKER, body),
        rows=rows,
    )


def test_attention_rows_recomputed_in_query_blocks_are_the_same(monkeypatch):
    operands = _attention(seq=96, batch=3, heads=2, dim=8)
    whole = ATTENTION.expected_rows(operands, [0, 2])
    monkeypatch.setattr(attention_module, "RECOMPUTE_BLOCK_ELEMENTS", 2 * 2 * 96 * 5)  # 5 queries
    blocks = ATTENTION.expected_rows(operands, [0, 2])
    np.testing.assert_allclose(blocks.values, whole.values, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(blocks.tolerance, whole.tolerance, rtol=1e-12)


def test_a_proof_over_the_recomputation_limit_is_refused_before_recomputing():
    seq = 16384  # 2**28 scores for one batch entry: 4 times the limit
    assert seq * seq > MAX_PROOF_RECOMPUTE_ELEMENTS
    operands = _attention(seq)
    wrong = np.full((1, 1, seq, 1), 100.0, np.float32)
    with pytest.raises(RecordError, match="exceeds the limit"):
        verify_fault_proof(_proof(operands, wrong, [0]))


def test_a_proof_at_the_limit_verifies_and_a_witness_named_twice_is_refused():
    seq = 1024
    operands = _attention(seq, batch=2)
    wrong = ATTENTION.reference(operands)
    wrong[1] += 1.0  # batch entry 1 is wrong
    verify_fault_proof(_proof(operands, wrong, [1]))
    # make_fault_proof names each row once; a proof signed naming one twice is refused (each
    # name would be recomputed again).
    with pytest.raises(RecordError, match="twice"):
        verify_fault_proof(_signed_with_witness(_proof(operands, wrong, [1]), [1, 1]))


def _signed_with_witness(proof: bytes, witness: list[int]) -> bytes:
    header, body = unpack(proof)
    header = {k: v for k, v in header.items() if k != "signature"}
    header["witness"] = witness
    signature = REPORTER.sign(faults._DOMAIN + canonical_json(header))
    header["signature"] = base64.b64encode(signature).decode("ascii")
    return pack(header, bytes(body))
