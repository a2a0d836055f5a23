"""Fault proofs: evidence, checkable by any peer on its own, that a worker returned a wrong result.

A proof carries the worker's own signed claim (its half of the receipt: kernel, input hashes,
output hash), the operands and the claimed output themselves, and the witness: output rows
whose recomputation differs from what the worker claimed. For matrix products the requester
finds such a row with Freivalds' check (the row whose residual broke the tolerance); for other
kernels, by sampling rows.

Why rows and not Freivalds' random vector as the witness: a reporter could choose a vector
that lines up with an honest product's rounding errors, and the worker could not refute it.
Recomputing a row needs no trust in how the row was chosen: an honest row always matches.

The reporter (the requester) signs the proof. Checking needs no trust in the reporter: the
claim's signature binds the worker to the output hash, the hashes bind the arrays to the
claim, and the witness is re-evaluated from the arrays.

Encoding: ``arrays.pack(header, body)`` with ``body`` the operands then the output, in header
order; the header holds the claim, the arrays' descriptions, the witness, the reporter's peer
ID and signature. Size limit :data:`MAX_PROOF_BYTES`.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np

from mtor_kernels import Kernel, KernelError, get_kernel
from mtor_kernels.verify import judge_rows
from mtor_p2p.identity import Identity, public_key_from_peer_id, verify_signature
from mtor_p2p.records.arrays import ArrayMeta, array_from_bytes, meta_of, pack, unpack
from mtor_p2p.records.receipts import Receipt, decode_receipt
from mtor_p2p.wire import RecordError, canonical_json

FAULT_TYPE = "mtor/fault"
FAULT_VERSION = 1
MAX_PROOF_BYTES = 256 << 20
#: Largest recomputation a fault proof may ask of each verifier, in elements of the kernel's
#: largest intermediate (Kernel.recompute_elements): a batch entry of a 16-head attention over
#: 2,048 tokens, or 64 Mi elements of matmul rows; a few seconds of NumPy here.
MAX_PROOF_RECOMPUTE_ELEMENTS = 1 << 26
_DOMAIN = b"mtor/fault/v1\n"


@dataclass(frozen=True)
class FaultProof:
    """A verified fault proof."""

    claim: Receipt  # the worker-signed receipt half naming the wrong output
    method: str
    reporter: str

    @property
    def worker(self) -> str:
        """The peer proven to have cheated."""
        return self.claim.body.worker


def make_fault_proof(
    reporter: Identity,
    *,
    kernel: Kernel,
    operands: dict[str, np.ndarray],
    output: np.ndarray,
    claim: Receipt,
    rows: list[int] | None,
) -> bytes:
    """Build and sign a fault proof naming the output ``rows`` found wrong (None: all rows)."""
    witness = list(range(output.shape[0])) if rows is None else [int(r) for r in rows]
    # One wrong row proves the fault: name no more rows than a verifier will recompute.
    witness = list(dict.fromkeys(witness))
    per_row = max(1, kernel.recompute_elements(operands, 1))
    witness = witness[: max(1, MAX_PROOF_RECOMPUTE_ELEMENTS // per_row)]
    names = sorted(operands)
    header: dict[str, Any] = {
        "t": FAULT_TYPE,
        "v": FAULT_VERSION,
        "kernel": kernel.name,
        "method": "recompute",
        "claim": base64.b64encode(claim.encode()).decode("ascii"),
        "operands": {name: meta_of(operands[name]).to_json() for name in names},
        "output": meta_of(output).to_json(),
        "witness": witness,
        "reporter": reporter.peer_id,
    }
    signature = reporter.sign(_DOMAIN + canonical_json(header))
    header["signature"] = base64.b64encode(signature).decode("ascii")
    body = b"".join(np.ascontiguousarray(operands[n]).tobytes() for n in names)
    return pack(header, body + np.ascontiguousarray(output).tobytes())


def verify_fault_proof(data: bytes) -> FaultProof:
    """Check a fault proof from scratch; raise RecordError unless it proves a fault."""
    if len(data) > MAX_PROOF_BYTES:
        raise RecordError("fault proof too large")
    header, body = unpack(data)
    expected = {
        "t",
        "v",
        "kernel",
        "method",
        "claim",
        "operands",
        "output",
        "witness",
        "reporter",
        "signature",
    }
    if set(header) != expected or header["t"] != FAULT_TYPE or header["v"] != FAULT_VERSION:
        raise RecordError("not a version 1 fault proof")
    unsigned = {k: v for k, v in header.items() if k != "signature"}
    try:
        signature = base64.b64decode(header["signature"], validate=True)
        reporter_key = public_key_from_peer_id(header["reporter"])
        claim = decode_receipt(
            base64.b64decode(header["claim"], validate=True), require_complete=False
        )
    except (ValueError, TypeError) as exc:
        raise RecordError(f"malformed fault proof: {exc}") from exc
    if not verify_signature(reporter_key, signature, _DOMAIN + canonical_json(unsigned)):
        raise RecordError("reporter signature does not verify")
    try:
        kernel = get_kernel(str(header["kernel"]))
    except KernelError as exc:
        raise RecordError("unknown kernel") from exc
    if claim.body.kernel != kernel.name:
        raise RecordError("claim is for another kernel")
    # Rebuild the arrays; their hashes must be the ones the worker signed.
    offset = 0
    operands: dict[str, np.ndarray] = {}
    described = header["operands"]
    if not isinstance(described, dict):
        raise RecordError("operands must be an object")
    for name in sorted(described):
        meta = ArrayMeta.from_json(described[name], max_bytes=MAX_PROOF_BYTES)
        operands[name] = array_from_bytes(meta, body[offset : offset + meta.nbytes])
        offset += meta.nbytes
    output_meta = ArrayMeta.from_json(header["output"], max_bytes=MAX_PROOF_BYTES)
    output = array_from_bytes(output_meta, body[offset : offset + output_meta.nbytes])
    if offset + output_meta.nbytes != len(body):
        raise RecordError("fault proof carries extra bytes")
    if {n: meta_of(a).digest for n, a in operands.items()} != claim.body.inputs:
        raise RecordError("operands are not the ones the worker signed for")
    if output_meta.digest != claim.body.output:
        raise RecordError("output is not the one the worker signed for")
    method = header["method"]
    if method != "recompute":
        raise RecordError(f"unknown method {method!r}")
    rows = header["witness"]
    if (
        not isinstance(rows, list)
        or not 0 < len(rows) <= output.shape[0]
        or not all(isinstance(r, int) and 0 <= r < output.shape[0] for r in rows)
    ):
        raise RecordError("witness must list output rows")
    if len(set(rows)) != len(rows):
        raise RecordError("witness lists a row twice")
    # Every peer that takes the proof into its ledger recomputes these rows: bounded before
    # anything is computed (a hostile review: a 130 KiB proof of a (1, 1, 8192, 1) attention
    # cost each verifier 4.6 GiB and 12 s; its memory is now bounded by blocks, its time here).
    work = kernel.recompute_elements(operands, len(rows))
    if work > MAX_PROOF_RECOMPUTE_ELEMENTS:
        raise RecordError(
            f"fault proof's recomputation of {work} elements exceeds the limit of "
            f"{MAX_PROOF_RECOMPUTE_ELEMENTS}: name fewer witness rows"
        )
    # Each recomputed element comes with the kernel's bound on honest rounding error: a
    # difference beyond it cannot be explained by another summation order or device. Elements
    # whose sums reach float32's range prove nothing: an honest float32 result there may be
    # ±inf, NaN or whatever a partial sum's overflow left (a hostile review: operands chosen
    # to overflow made honest workers' answers "proofs" of faults, and slashed them).
    if not judge_rows(kernel, operands, output, rows).proven:
        raise RecordError("the recomputed rows match: no fault")
    return FaultProof(claim=claim, method=method, reporter=header["reporter"])
