"""Ledger entries: the signed records the ledger is made of, and their one wire form.

An entry on the wire is one tag byte and the record's own canonical bytes:

====  ============  ==================================================  ==========
tag   kind          record                                              limit
====  ============  ==================================================  ==========
R     receipt       a countersigned contribution receipt (compute)      4 KiB
F     fault         a fault proof (records.faults)                      16 MiB
T     transfer      "mtor/transfer" envelope signed by the payer        2 KiB
S     stake         "mtor/stake" envelope signed by the staker          2 KiB
V     vote          a staked peer's BLS signature on an epoch's root    1 KiB
C     checkpoint    votes on one root aggregated into one signature,    16 MiB
                    with the IDs of the epoch's entries it covers
====  ============  ==================================================  ==========

An entry's ID is the blake3 hash of its wire bytes, so inserting the same entry twice is a
no-op. Decoding checks everything that needs no ledger state (format, size, Ed25519
signatures, the fault proof's recomputation). Votes and checkpoints also need the signers' BLS
keys, which come from their stake entries: :class:`~mtor_p2p.ledger.store.Ledger` checks those.

Every entry has a position in time (``at``) that orders its effect on balances the same way on
every peer: a receipt's end time, a transfer's or stake's signed time, and for a fault proof the
end time of
the accused worker's own signed claim (so that neither reporter nor worker picks it).
"""

from __future__ import annotations

import base64
import functools
import re
from dataclasses import dataclass
from typing import Any

import blake3

from mtor_p2p.identity import Identity, public_key_from_peer_id
from mtor_p2p.ledger import bls
from mtor_p2p.ledger.genesis import MAX_AMOUNT
from mtor_p2p.ledger.merkle import merkle_root
from mtor_p2p.records.faults import verify_fault_proof
from mtor_p2p.records.receipts import Receipt, decode_receipt
from mtor_p2p.wire import (
    RecordError,
    SignedEnvelope,
    b64_field,
    canonical_json,
    open_envelope,
    parse_canonical,
    seal,
)

STAKE_TYPE = "mtor/stake"
TRANSFER_TYPE = "mtor/transfer"
VOTE_TYPE = "mtor/vote"
CHECKPOINT_TYPE = "mtor/checkpoint"
VERSION = 1
MAX_SIGNERS = 1000

KINDS = {
    b"R": "receipt",
    b"T": "transfer",
    b"F": "fault",
    b"S": "stake",
    b"V": "vote",
    b"C": "checkpoint",
}
TAGS = {kind: tag for tag, kind in KINDS.items()}
LIMITS = {
    "receipt": 4096,
    "fault": 16 << 20,
    "stake": 2048,
    "transfer": 2048,
    "vote": 1024,
    "checkpoint": 16 << 20,
}
#: Largest wire entry of any kind (tag byte included).
MAX_ENTRY_BYTES = max(LIMITS.values()) + 1
#: Rank of each kind among entries at the same instant (the balance fold's tie-break).
RANKS = {"receipt": 0, "transfer": 1, "stake": 2, "fault": 3, "vote": 4, "checkpoint": 4}
#: A fault proof that rewards nobody: after every other entry of its time (Entry.rank).
BURN_ONLY_FAULT_RANK = 5
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CHECKPOINT_DOMAIN = b"mtor/checkpoint/v1\n"


@dataclass(frozen=True)
class Entry:
    """A decoded, statelessly verified ledger entry.

    ``payer``/``payee``/``amount`` say how the entry moves credits: a receipt moves ``amount``
    from the requester (payer) to the worker (payee), a transfer from its signer (payer) to
    the named peer (payee); a stake locks ``amount`` of the payer's;
    a fault slashes the payer (the accused worker) and pays the payee (the reporter) a share.
    """

    kind: str
    wire: bytes
    at: float
    payer: str = ""
    payee: str = ""
    amount: int = 0
    #: fault: blake3 of the accused claim (one slash per wrong result); vote/checkpoint: root
    claim: str = ""
    epoch: int = -1
    count: int = 0
    signers: tuple[str, ...] = ()
    signature: bytes = b""
    bls_key: bytes = b""
    leaves: tuple[str, ...] = ()  # checkpoint: the entry IDs it covers

    @functools.cached_property
    def entry_id(self) -> str:
        """blake3 hex of the wire bytes."""
        return blake3.blake3(self.wire).hexdigest()

    @property
    def rank(self) -> int:
        """Tie-break among entries with the same ``at``. A fault proof that rewards nobody
        (its reporter is not the requester the worker answered) comes after everything else
        at its time, so after the requester's own proof of the same answer: with one rank for
        both, the lower entry ID won, and a bystander who re-signed a gossiped proof with
        other witness rows until its ID sorted first turned the requester's reward into a burn
        after the fact (a hostile review, 2026-12-06)."""
        if self.kind == "fault" and not self.payee:
            return BURN_ONLY_FAULT_RANK
        return RANKS[self.kind]


def epoch_root_of(entry_ids: list[str]) -> str:
    """Merkle root (hex) over an epoch's entries, the leaves being their IDs."""
    return merkle_root([bytes.fromhex(i) for i in entry_ids]).hex()


def checkpoint_message(genesis_hash: str, epoch: int, root: str, count: int) -> bytes:
    """What a staked peer signs (BLS) to vouch for an epoch's entry set."""
    body = {"genesis": genesis_hash, "epoch": epoch, "root": root, "count": count}
    return _CHECKPOINT_DOMAIN + canonical_json(body)


# -- making entries ------------------------------------------------------------------------


def receipt_entry(receipt: Receipt) -> bytes:
    """Wire form of a countersigned receipt."""
    return b"R" + receipt.encode()


def receipt_entry_id(receipt: Receipt) -> str:
    """The ledger's ID of a countersigned receipt."""
    return blake3.blake3(receipt_entry(receipt)).hexdigest()


def fault_entry(proof: bytes) -> bytes:
    """Wire form of a fault proof."""
    return b"F" + proof


def make_stake(identity: Identity, amount: int, at: float, genesis_hash: str, nonce: str) -> bytes:
    """A signed stake entry: ``amount`` nano-credits locked, with the staker's BLS key."""
    secret = bls.derive_secret(identity.seed)
    backend = bls.default_backend()
    body = {
        "genesis": genesis_hash,
        "amount": amount,
        "at": at,
        "nonce": nonce,
        "bls": base64.b64encode(backend.public_key(secret)).decode("ascii"),
        "pop": base64.b64encode(backend.pop_prove(secret)).decode("ascii"),
    }
    return b"S" + seal(identity, STAKE_TYPE, body)


def make_transfer(
    identity: Identity, to: str, amount: int, at: float, genesis_hash: str, nonce: str
) -> bytes:
    """A signed transfer of ``amount`` nano-credits from ``identity`` to peer ``to``."""
    body = {"genesis": genesis_hash, "to": to, "amount": amount, "at": at, "nonce": nonce}
    return b"T" + seal(identity, TRANSFER_TYPE, body)


def make_vote(identity: Identity, genesis_hash: str, epoch: int, root: str, count: int) -> bytes:
    """A staked peer's BLS signature on an epoch's receipt root."""
    secret = bls.derive_secret(identity.seed)
    signature = bls.default_backend().sign(
        secret, checkpoint_message(genesis_hash, epoch, root, count)
    )
    body = {
        "t": VOTE_TYPE,
        "v": VERSION,
        "genesis": genesis_hash,
        "epoch": epoch,
        "root": root,
        "count": count,
        "signer": identity.peer_id,
        "sig": base64.b64encode(signature).decode("ascii"),
    }
    return b"V" + canonical_json(body)


def make_checkpoint(
    genesis_hash: str, epoch: int, leaves: list[str], votes: dict[str, bytes]
) -> bytes:
    """Aggregate votes (signer -> BLS signature, all on the root of ``leaves``, the entry IDs
    of the epoch) into a checkpoint that lists those entries."""
    signers = sorted(votes)
    aggregate = bls.default_backend().aggregate([votes[s] for s in signers])
    ordered = sorted(leaves)
    body = {
        "t": CHECKPOINT_TYPE,
        "v": VERSION,
        "genesis": genesis_hash,
        "epoch": epoch,
        "root": epoch_root_of(ordered),
        "count": len(ordered),
        "leaves": ordered,
        "signers": signers,
        "sig": base64.b64encode(aggregate).decode("ascii"),
    }
    return b"C" + canonical_json(body)


# -- decoding ------------------------------------------------------------------------------


def _int(value: Any, what: str, low: int = 0, high: int = MAX_AMOUNT) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < high:
        raise RecordError(f"{what} must be an integer in [{low}, {high})")
    return value


def _time(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e11:
        raise RecordError(f"{what} must be a time in seconds since the epoch")
    return float(value)


def _peer(value: Any, what: str) -> str:
    if not isinstance(value, str) or len(value) > 64:
        raise RecordError(f"{what} must be a peer ID")
    try:
        public_key_from_peer_id(value)
    except ValueError as exc:
        raise RecordError(f"{what} is not an Ed25519 peer ID") from exc
    return value


def _check_genesis(value: Any, genesis_hash: str) -> None:
    if value != genesis_hash:
        raise RecordError("entry belongs to another network (genesis hash differs)")


def _open_signed(
    data: bytes, record_type: str, kind: str, extra: set[str], genesis_hash: str
) -> SignedEnvelope:
    """Open a payer-signed envelope (stake, transfer) of this network with exactly the common
    fields (genesis, amount, at, nonce) and ``extra``."""
    envelope = open_envelope(data, expected_type=record_type, max_bytes=LIMITS[kind])
    fields = {"genesis", "amount", "at", "nonce"} | extra
    if set(envelope.body) != fields:
        raise RecordError(f"{kind} must have exactly the fields {sorted(fields)}")
    _check_genesis(envelope.body["genesis"], genesis_hash)
    nonce = envelope.body["nonce"]
    if not isinstance(nonce, str) or not 0 < len(nonce) <= 64:
        raise RecordError("nonce must be a string of 1-64 characters")
    return envelope


def _root_fields(obj: dict[str, Any], genesis_hash: str) -> tuple[int, str, int]:
    _check_genesis(obj["genesis"], genesis_hash)
    epoch = _int(obj["epoch"], "epoch", 0, 2**40)
    root = obj["root"]
    if not isinstance(root, str) or not _HEX64.match(root):
        raise RecordError("root must be 64 lowercase hex characters")
    count = _int(obj["count"], "count", 1, 2**40)
    return epoch, root, count


def decode_entry(wire: bytes, genesis_hash: str, *, check_bls: bool = True) -> Entry:
    """Decode and check an entry as far as no ledger state is needed (raises RecordError).

    ``check_bls=False`` skips the stake's proof of possession (milliseconds of pairing work),
    for the gossip validator on the event loop; the ledger always checks it before storing.
    """
    if not wire:
        raise RecordError("empty entry")
    kind = KINDS.get(wire[:1])
    if kind is None:
        raise RecordError(f"unknown entry tag {wire[:1]!r}")
    if len(wire) - 1 > LIMITS[kind]:
        raise RecordError(f"{kind} entry is {len(wire) - 1} bytes, limit is {LIMITS[kind]}")
    data = wire[1:]
    if kind == "receipt":
        receipt = decode_receipt(data, require_complete=True)
        body = receipt.body
        if body.requester == body.worker:
            raise RecordError("a receipt between a peer and itself")
        # A receipt that moves nothing is only noise in every peer's ledger.
        cost = _int(body.cost_nano, "cost (nano-credits)", 1)
        return Entry(kind, wire, body.ended, body.requester, body.worker, cost)
    if kind == "fault":
        try:
            proof = verify_fault_proof(data)
        except RecordError:
            raise
        except Exception as exc:  # a hostile proof must cost its sender an error, nothing more
            raise RecordError(f"fault proof does not check: {type(exc).__name__}") from exc
        body = proof.claim.body
        # One slash per shard a worker answered wrongly, however the proof is dressed (with or
        # without the countersignature, another signature of the same claim, other witness
        # rows): the key is what the worker is accountable for, not the proof's bytes. The
        # requester is part of it: a job ID is the requester's own choice, so a cheating
        # worker's second identity could otherwise reuse a cheated requester's, have its own
        # backdated wrong answer proved first and take the reporter's share of the one slash
        # (a hostile review, 2026-12-06).
        claim = blake3.blake3(
            canonical_json(
                {
                    "job": body.job_id,
                    "requester": body.requester,
                    "shard": body.shard,
                    "worker": body.worker,
                }
            )
        ).hexdigest()
        # Only the requester the worker answered is rewarded; anyone else may still report
        # (the whole slash then burns), so copying someone's proof earns nothing.
        rewarded = proof.reporter if proof.reporter == body.requester else ""
        return Entry(kind, wire, body.ended, proof.worker, rewarded, 0, claim)
    if kind == "stake":
        envelope = _open_signed(data, STAKE_TYPE, kind, {"bls", "pop"}, genesis_hash)
        body = envelope.body
        key = b64_field(body["bls"], "bls key", bls.PUBLIC_KEY_BYTES)
        pop = b64_field(body["pop"], "proof of possession", bls.SIGNATURE_BYTES)
        # The proof of possession stops rogue-key attacks on aggregated checkpoints.
        if check_bls and not bls.default_backend().pop_verify(key, pop):
            raise RecordError("BLS proof of possession does not verify")
        return Entry(
            kind,
            wire,
            _time(body["at"], "at"),
            envelope.signer,
            "",
            _int(body["amount"], "amount", 1),
            bls_key=key,
        )
    if kind == "transfer":
        envelope = _open_signed(data, TRANSFER_TYPE, kind, {"to"}, genesis_hash)
        body = envelope.body
        to = _peer(body["to"], "to")
        if to == envelope.signer:
            raise RecordError("a transfer to oneself")
        return Entry(
            kind,
            wire,
            _time(body["at"], "at"),
            envelope.signer,
            to,
            _int(body["amount"], "amount", 1),
        )
    obj = parse_canonical(data, max_bytes=LIMITS[kind])
    if kind == "vote":
        fields = {"t", "v", "genesis", "epoch", "root", "count", "signer", "sig"}
        if not isinstance(obj, dict) or set(obj) != fields:
            raise RecordError(f"vote must have exactly the fields {sorted(fields)}")
        if obj["t"] != VOTE_TYPE or obj["v"] != VERSION:
            raise RecordError("not a version 1 vote")
        epoch, root, count = _root_fields(obj, genesis_hash)
        signer = _peer(obj["signer"], "signer")
        signature = b64_field(obj["sig"], "signature", bls.SIGNATURE_BYTES)
        return Entry(kind, wire, 0.0, signer, "", 0, root, epoch, count, (signer,), signature)
    fields = {"t", "v", "genesis", "epoch", "root", "count", "leaves", "signers", "sig"}
    if not isinstance(obj, dict) or set(obj) != fields:
        raise RecordError(f"checkpoint must have exactly the fields {sorted(fields)}")
    if obj["t"] != CHECKPOINT_TYPE or obj["v"] != VERSION:
        raise RecordError("not a version 1 checkpoint")
    epoch, root, count = _root_fields(obj, genesis_hash)
    signers = obj["signers"]
    if not isinstance(signers, list) or not 0 < len(signers) <= MAX_SIGNERS:
        raise RecordError(f"signers must list 1-{MAX_SIGNERS} peers")
    checked = tuple(_peer(s, "signer") for s in signers)
    if list(checked) != sorted(set(checked)):
        raise RecordError("signers must be sorted and distinct")
    signature = b64_field(obj["sig"], "signature", bls.SIGNATURE_BYTES)
    leaves = obj["leaves"]
    if (
        not isinstance(leaves, list)
        or len(leaves) != count
        or not all(isinstance(x, str) and _HEX64.match(x) for x in leaves)
        or leaves != sorted(set(leaves))
    ):
        raise RecordError("leaves must list the count entry IDs, sorted and distinct")
    if epoch_root_of(leaves) != root:
        raise RecordError("leaves do not hash to the root")
    return Entry(
        kind, wire, 0.0, "", "", 0, root, epoch, count, checked, signature, leaves=tuple(leaves)
    )
