"""Contribution receipts: the signed record of one accepted shard.

A receipt is created by the worker when it returns a result (it signs the body) and completed
by the requester after verification (it countersigns the body *and* the worker's signature).
Both peers store it; the ledger (issue 4) and the simulator consume it.

Encoding (version 1), canonical JSON, at most :data:`MAX_RECEIPT_BYTES`::

    {"b": <body>, "t": "mtor/receipt", "v": 1,
     "w": "<base64 worker signature>", "r": "<base64 requester signature>" | null}

* worker signature over ``"mtor/receipt/v1/worker\\n" + canonical(body)``
* requester signature over ``"mtor/receipt/v1/requester\\n" + canonical(body) + worker_sig``

Public keys are not carried: both signers are named in the body by peer ID, and an Ed25519
peer ID embeds its public key. Body fields are listed in :class:`ReceiptBody`; amounts are
derived (``cost = price * flops / 1e12``), never stored, so they cannot disagree.
"""

from __future__ import annotations

import base64
import hashlib
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from mtor_p2p.identity import Identity, public_key_from_peer_id, verify_signature
from mtor_p2p.wire import RecordError, b64_field, canonical_json, parse_canonical

RECEIPT_TYPE = "mtor/receipt"
RECEIPT_VERSION = 1
MAX_RECEIPT_BYTES = 4096
_WORKER_DOMAIN = b"mtor/receipt/v1/worker\n"
_REQUESTER_DOMAIN = b"mtor/receipt/v1/requester\n"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_MAX_OPERANDS = 16
#: Bounds that keep every derived amount finite and within a 64-bit integer.
MAX_PRICE = 1e6  # credits per TFLOP
MAX_TIME = 1e11  # seconds since the epoch (year 5138)


@dataclass(frozen=True)
class ReceiptBody:
    """What one accepted shard was: who computed what for whom, at what price."""

    job_id: str  # 64 hex chars (blake3 of the job description)
    shard: int  # shard index within the job
    kernel: str
    inputs: Mapping[str, str]  # operand name -> blake3 hex of its bytes (read-only)
    output: str  # blake3 hex of the output bytes
    flops: int
    started: float  # network time, seconds since the epoch
    ended: float
    worker: str  # peer ID
    requester: str  # peer ID
    price: float  # credits per TFLOP
    #: canonical(body), made once: the body is signed, verified, countersigned and encoded,
    #: each over these bytes (not part of the body's value).
    _canonical: bytes | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Read-only: the canonical bytes are made once and both signatures cover them, so the
        # body must not change under them (a hostile review found that a mutated ``inputs``
        # would be countersigned over the old bytes).
        object.__setattr__(self, "inputs", MappingProxyType(dict(self.inputs)))

    def canonical(self) -> bytes:
        """The body's canonical JSON bytes (what both signatures cover)."""
        if self._canonical is None:
            object.__setattr__(self, "_canonical", canonical_json(self.to_json()))
        assert self._canonical is not None
        return self._canonical

    @property
    def cost(self) -> float:
        """Credits the ledger moves from the requester to the worker for this shard:
        :attr:`cost_nano` in credits (so at least one nano-credit for a paid shard; a new
        user saw "cost 0.0000" for tiny shards that each cost 1 nano-credit)."""
        return self.cost_nano / 1e9  # nano-credits per credit (ledger.genesis.NANO)

    @property
    def cost_nano(self) -> int:
        """The same in nano-credits, as the ledger counts it: computed in IEEE doubles and
        rounded, which gives the same integer on every peer."""
        return shard_cost_nano(self.price, self.flops)

    def to_json(self) -> dict[str, Any]:
        """The body as a JSON-ready dict."""
        # Spelled out rather than dataclasses.asdict: this runs twice per verified receipt.
        return {
            "job_id": self.job_id,
            "shard": self.shard,
            "kernel": self.kernel,
            "inputs": dict(self.inputs),
            "output": self.output,
            "flops": self.flops,
            "started": self.started,
            "ended": self.ended,
            "worker": self.worker,
            "requester": self.requester,
            "price": self.price,
        }


_BODY_FIELDS = {name for name in ReceiptBody.__dataclass_fields__ if not name.startswith("_")}


def shard_cost_nano(price: float, flops: int) -> int:
    """Nano-credits for ``flops`` at ``price`` credits per TFLOP, at least one for any paid
    shard: a small shard at market prices (an inference step, ~0.3 nano-credit) would
    otherwise round to nothing, and a receipt that moves nothing never enters the ledger, so
    the work would be free. Only a worker asking 0 (a volunteer) works for nothing."""
    if price <= 0 or flops <= 0:
        return 0
    return max(1, round(price * flops / 1e3))


def _check_hex(value: Any, name: str) -> str:
    if not isinstance(value, str) or not _HEX64.match(value):
        raise RecordError(f"{name} must be 64 lowercase hex characters")
    return value


def body_from_json(obj: Any) -> ReceiptBody:
    """Validate a decoded receipt body (raises RecordError)."""
    if not isinstance(obj, dict) or set(obj) != _BODY_FIELDS:
        raise RecordError(f"receipt body must have exactly the fields {sorted(_BODY_FIELDS)}")
    inputs = obj["inputs"]
    if not isinstance(inputs, dict) or not 0 < len(inputs) <= _MAX_OPERANDS:
        raise RecordError("inputs must map 1-16 operand names to hashes")
    for name, digest in inputs.items():
        if not isinstance(name, str) or not 0 < len(name) <= 32:
            raise RecordError("operand names are 1-32 characters")
        _check_hex(digest, f"inputs.{name}")
    for name in ("shard", "flops"):
        value = obj[name]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
            raise RecordError(f"{name} must be a non-negative integer")
    for name, high in (("started", MAX_TIME), ("ended", MAX_TIME), ("price", MAX_PRICE)):
        value = obj[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= high:
            raise RecordError(f"{name} must be a number between 0 and {high:g}")
    if obj["ended"] < obj["started"]:
        raise RecordError("a shard cannot end before it starts")
    for name in ("kernel", "worker", "requester"):
        if not isinstance(obj[name], str) or not 0 < len(obj[name]) <= 64:
            raise RecordError(f"{name} must be a string of 1-64 characters")
    for name in ("worker", "requester"):
        try:
            public_key_from_peer_id(obj[name])
        except ValueError as exc:
            raise RecordError(f"{name} is not an Ed25519 peer ID") from exc
    return ReceiptBody(
        job_id=_check_hex(obj["job_id"], "job_id"),
        shard=obj["shard"],
        kernel=obj["kernel"],
        inputs=dict(inputs),
        output=_check_hex(obj["output"], "output"),
        flops=obj["flops"],
        started=float(obj["started"]),
        ended=float(obj["ended"]),
        worker=obj["worker"],
        requester=obj["requester"],
        price=float(obj["price"]),
    )


@dataclass(frozen=True)
class Receipt:
    """A receipt signed by its worker and, once verified, countersigned by its requester."""

    body: ReceiptBody
    worker_signature: bytes
    requester_signature: bytes | None = None
    #: Set by :func:`verify_receipt` once the worker's signature has verified in this process
    #: (the object is immutable, so it stays so): countersigning it need not verify it again.
    #: Never part of the receipt's value, and no constructor sets it.
    _worker_verified: bool = field(default=False, init=False, compare=False, repr=False)
    _encoded: bytes | None = field(default=None, init=False, compare=False, repr=False)

    @property
    def complete(self) -> bool:
        """True once the requester has countersigned."""
        return self.requester_signature is not None

    def encode(self) -> bytes:
        """The canonical bytes of this receipt (made once: a countersigned receipt is encoded
        for its batch's size, its request, the receipt store and the ledger)."""
        if self._encoded is not None:
            return self._encoded
        data = canonical_json(
            {
                "b": self.body.to_json(),
                "r": None
                if self.requester_signature is None
                else base64.b64encode(self.requester_signature).decode("ascii"),
                "t": RECEIPT_TYPE,
                "v": RECEIPT_VERSION,
                "w": base64.b64encode(self.worker_signature).decode("ascii"),
            }
        )
        if len(data) > MAX_RECEIPT_BYTES:
            raise RecordError(f"receipt is {len(data)} bytes, limit is {MAX_RECEIPT_BYTES}")
        object.__setattr__(self, "_encoded", data)
        return data

    @property
    def receipt_id(self) -> str:
        """Its job and shard: one accepted answer's receipt per shard, and under ``redundant``
        verification the second worker's too, with the same ID (stores key by worker,
        requester and run as well: ``mtor_p2p.compute.receipt_store.store_key``)."""
        return f"{self.body.job_id}:{self.body.shard}"


def _worker_message(body: ReceiptBody) -> bytes:
    return _WORKER_DOMAIN + body.canonical()


def _requester_message(body: ReceiptBody, worker_signature: bytes) -> bytes:
    return _REQUESTER_DOMAIN + body.canonical() + worker_signature


def sign_as_worker(identity: Identity, body: ReceiptBody) -> Receipt:
    """The worker's half: sign the body (the identity must be the body's worker)."""
    if identity.peer_id != body.worker:
        raise RecordError("only the receipt's worker can sign it as worker")
    return Receipt(body, identity.sign(_worker_message(body)))


def countersign(identity: Identity, receipt: Receipt) -> Receipt:
    """The requester's half, after verification (the identity must be the body's requester)."""
    if identity.peer_id != receipt.body.requester:
        raise RecordError("only the receipt's requester can countersign it")
    verify_receipt(receipt, require_complete=False)  # at once if verified here before
    signature = identity.sign(_requester_message(receipt.body, receipt.worker_signature))
    countersigned = Receipt(receipt.body, receipt.worker_signature, signature)
    object.__setattr__(countersigned, "_worker_verified", True)
    return countersigned


def verify_receipt(receipt: Receipt, *, require_complete: bool = True) -> None:
    """Raise RecordError unless the worker's (and, if required, requester's) signature holds.

    The worker's signature is verified once per receipt object: a receipt verified before in
    this process (it is immutable) is not verified again."""
    body = receipt.body
    if not receipt._worker_verified:
        worker_key = public_key_from_peer_id(body.worker)
        if not verify_signature(worker_key, receipt.worker_signature, _worker_message(body)):
            raise RecordError("worker signature does not verify")
        object.__setattr__(receipt, "_worker_verified", True)
    if receipt.requester_signature is None:
        if require_complete:
            raise RecordError("receipt is not countersigned")
        return
    requester_key = public_key_from_peer_id(body.requester)
    message = _requester_message(body, receipt.worker_signature)
    if not verify_signature(requester_key, receipt.requester_signature, message):
        raise RecordError("requester signature does not verify")


#: Receipts already parsed and verified, by content: a countersigned receipt reaches every
#: ledger replica (gossip, sync, the fault-proof check) and is decoded once per process.
_DECODED: OrderedDict[bytes, Receipt] = OrderedDict()
_DECODED_MAX = 16_384
_decoded_lock = threading.Lock()


def decode_receipt(data: bytes, *, require_complete: bool = True) -> Receipt:
    """Parse, validate and verify a receipt's canonical bytes (raises RecordError)."""
    _check_size(data)
    key = hashlib.blake2b(data, digest_size=32).digest()
    with _decoded_lock:
        known = _DECODED.get(key)
        if known is not None:
            _DECODED.move_to_end(key)
    if known is not None:
        if require_complete and known.requester_signature is None:
            raise RecordError("receipt is not countersigned")
        return known
    receipt = _decode_receipt(data, require_complete=require_complete)
    with _decoded_lock:
        _DECODED[key] = receipt
        if len(_DECODED) > _DECODED_MAX:
            _DECODED.popitem(last=False)
    return receipt


def parse_receipt(data: bytes) -> Receipt:
    """Parse and validate a receipt's canonical bytes without verifying its signatures
    (raises RecordError): its fields may be compared with what was asked, but nothing in it
    is the worker's word until :func:`verify_receipt` has passed (a requester verifies an
    answer's receipt beside its check, off the event loop)."""
    _check_size(data)
    return _parse_receipt(data)


def _check_size(data: bytes) -> None:
    # Before anything else is done with bytes a peer sent.
    if len(data) > MAX_RECEIPT_BYTES:
        raise RecordError(f"receipt of {len(data)} bytes exceeds the limit of {MAX_RECEIPT_BYTES}")


def _decode_receipt(data: bytes, *, require_complete: bool) -> Receipt:
    receipt = _parse_receipt(data)
    verify_receipt(receipt, require_complete=require_complete)
    return receipt


def _parse_receipt(data: bytes) -> Receipt:
    obj = parse_canonical(data, max_bytes=MAX_RECEIPT_BYTES)
    if not isinstance(obj, dict) or set(obj) != {"b", "r", "t", "v", "w"}:
        raise RecordError("receipt must have exactly the fields b, r, t, v, w")
    if obj["t"] != RECEIPT_TYPE or obj["v"] != RECEIPT_VERSION:
        raise RecordError(f"not a version {RECEIPT_VERSION} receipt")
    receipt = Receipt(
        body=body_from_json(obj["b"]),
        worker_signature=b64_field(obj["w"], "worker signature", 64),
        requester_signature=None
        if obj["r"] is None
        else b64_field(obj["r"], "requester signature", 64),
    )
    # One byte form per receipt: the signatures cover the body as this process encodes it
    # (times and price as floats), so bytes that parse to the same body another way ("price":1
    # for 1.0) would verify too, and the ledger, which names an entry by its bytes' hash, paid
    # each form again (a hostile review, 2026-12-06: one receipt in four forms, paid four times).
    if receipt.encode() != data:
        raise RecordError("receipt is not in its canonical form")
    return receipt
