"""The genesis file: the initial allocation of credits and the network's economic parameters.

Every peer of one network starts from the same genesis, so every peer derives the same balances
from the same records. The genesis is identified by the blake3 hash of its canonical encoding;
ledger records are only exchanged between peers with the same genesis hash, and checkpoint
signatures cover it, so a signature can never be replayed on another network.

Amounts are integers in **nano-credits** (1 credit = 10**9 nc): integer arithmetic makes the
ledger's sums exact and identical on every peer. File format (canonical or not; it is
re-encoded canonically for hashing)::

    {"t": "mtor/genesis", "v": 1, "network": "mtor-main",
     "allocations": {"<peer id>": <nano-credits>, ...},
     "params": {...}}  # see :class:`LedgerParams`
"""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import blake3

from mtor_p2p.config import write_private
from mtor_p2p.identity import public_key_from_peer_id
from mtor_p2p.ledger.pricing import PriceRule
from mtor_p2p.wire import RecordError, canonical_json

GENESIS_TYPE = "mtor/genesis"
GENESIS_VERSION = 1
NANO = 10**9  # nano-credits per credit
MAX_AMOUNT = 2**62  # any one amount or allocation, so that SQLite's INTEGER always holds it
GENESIS_FILE_NAME = "genesis.json"
#: Where a user finds another network's genesis, said wherever a node meets one: every node
#: keeps a copy of its network's in its data directory (``open_ledger``).
GENESIS_WHERE = (
    f"each node of a network keeps its genesis as {GENESIS_FILE_NAME} in its data directory; "
    "a devnet's `join it:` line names its file"
)


def credits_to_nano(text: str | float | int) -> int:
    """Parse a credit amount ("1.5") into nano-credits, exactly (raises ValueError)."""
    from decimal import Decimal, InvalidOperation

    try:
        value = Decimal(str(text)) * NANO
    except InvalidOperation as exc:
        raise ValueError(f"not a number of credits: {text!r}") from exc
    if value != value.to_integral_value():
        raise ValueError("credits have at most 9 decimal places")
    return int(value)


def nano_to_credits(amount: int) -> str:
    """Format nano-credits as a decimal number of credits ("-1.25")."""
    sign = "-" if amount < 0 else ""
    whole, frac = divmod(abs(amount), NANO)
    text = f"{whole}.{frac:09d}".rstrip("0").rstrip(".")
    return sign + text


@dataclass(frozen=True)
class LedgerParams:
    """The network's economic parameters (all peers use the same, from the genesis)."""

    #: How far a requester's balance may go below zero: workers refuse it new work beyond,
    #: and the ledger ignores receipts beyond (so collusion cannot mint credits from debt).
    credit_limit: int = 100 * NANO
    #: "none": every peer gets ``credit_limit``; "stake": at most its own stake (a fresh
    #: identity then gets no credit at all, which closes the Sybil route to free credit).
    credit_backing: str = "none"
    #: Share of the accused worker's stake taken by one proven fault, in basis points.
    slash_bps: int = 5000
    #: Share of the slashed amount paid to the peer that reported the fault; the rest burns.
    reporter_bps: int = 2000
    #: Smallest stake a peer may place in one stake record.
    min_stake: int = 1 * NANO
    #: Receipts are checkpointed per epoch of this many seconds (by their end time).
    epoch_seconds: float = 600.0
    #: Staked peers sign an epoch's checkpoint this long after the epoch ends (late receipts).
    checkpoint_delay: float = 60.0
    #: A checkpoint is final once its signers hold this share of all stake (basis points).
    quorum_bps: int = 6667
    #: Workers move their asking price with their utilisation by this rule.
    price: PriceRule = field(default_factory=PriceRule)
    #: ... every this many seconds.
    price_interval: float = 60.0

    def validate(self) -> None:
        """Raise RecordError for parameters that cannot work."""
        for name in ("credit_limit", "min_stake"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < MAX_AMOUNT:
                raise RecordError(f"params.{name} must be a non-negative integer (nano-credits)")
        for name in ("slash_bps", "reporter_bps", "quorum_bps"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value <= 10_000:
                raise RecordError(f"params.{name} must be basis points (0-10000)")
        if self.credit_backing not in ("none", "stake"):
            raise RecordError("params.credit_backing must be 'none' or 'stake'")
        if not 1.0 <= self.epoch_seconds <= 86_400 * 7:
            raise RecordError("params.epoch_seconds must be between 1 s and a week")
        if not 0 <= self.checkpoint_delay < 86_400:
            raise RecordError("params.checkpoint_delay must be under a day")
        if not 0.1 <= self.price_interval <= 86_400:
            raise RecordError("params.price_interval must be between 0.1 s and a day")
        self.price.validate()

    def to_json(self) -> dict[str, Any]:
        """The parameters as a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Any) -> LedgerParams:
        """Parse (and validate) parameters; missing ones take their defaults."""
        if not isinstance(obj, dict):
            raise RecordError("params must be an object")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(obj) - known
        if unknown:
            raise RecordError(f"unknown params {sorted(unknown)}")
        values = dict(obj)
        if "price" in values:
            values["price"] = PriceRule.from_json(values["price"])
        for name in ("epoch_seconds", "checkpoint_delay", "price_interval"):
            if name in values and isinstance(values[name], int):
                values[name] = float(values[name])
        try:
            params = cls(**values)
        except TypeError as exc:
            raise RecordError(f"bad params: {exc}") from exc
        params.validate()
        return params


@dataclass(frozen=True)
class Genesis:
    """A network's starting state."""

    network: str
    allocations: dict[str, int]
    params: LedgerParams

    @property
    def supply(self) -> int:
        """Total credits in existence (nano-credits): they are moved, staked or burned."""
        return sum(self.allocations.values())

    def to_json(self) -> dict[str, Any]:
        """The genesis as a JSON-ready dict."""
        return {
            "t": GENESIS_TYPE,
            "v": GENESIS_VERSION,
            "network": self.network,
            "allocations": dict(sorted(self.allocations.items())),
            "params": self.params.to_json(),
        }

    def encode(self) -> bytes:
        """The canonical bytes (what the hash covers)."""
        return canonical_json(self.to_json())

    @property
    def hash(self) -> str:
        """blake3 hex of the canonical encoding: the network's identity on the ledger."""
        return blake3.blake3(self.encode()).hexdigest()

    @classmethod
    def from_json(cls, obj: Any) -> Genesis:
        """Parse and validate a genesis object (raises RecordError)."""
        if not isinstance(obj, dict) or obj.get("t") != GENESIS_TYPE:
            raise RecordError("not an mtor genesis (field t must be 'mtor/genesis')")
        if obj.get("v") != GENESIS_VERSION:
            raise RecordError(f"unsupported genesis version {obj.get('v')!r}")
        extra = set(obj) - {"t", "v", "network", "allocations", "params"}
        if extra:
            raise RecordError(f"unknown genesis fields {sorted(extra)}")
        network = obj.get("network")
        if not isinstance(network, str) or not 0 < len(network) <= 64:
            raise RecordError("network must be a name of 1-64 characters")
        allocations = obj.get("allocations", {})
        if not isinstance(allocations, dict):
            raise RecordError("allocations must map peer IDs to nano-credits")
        for peer, amount in allocations.items():
            try:
                public_key_from_peer_id(peer)
            except ValueError as exc:
                raise RecordError(f"allocation to {peer!r}: not an Ed25519 peer ID") from exc
            if isinstance(amount, bool) or not isinstance(amount, int):
                raise RecordError(f"allocation to {peer}: must be an integer of nano-credits")
            if not 0 <= amount < MAX_AMOUNT:
                raise RecordError(f"allocation to {peer}: out of range")
        genesis = cls(network, dict(allocations), LedgerParams.from_json(obj.get("params", {})))
        if genesis.supply >= MAX_AMOUNT:
            raise RecordError("total supply is out of range")
        return genesis

    def save(self, path: Path) -> None:
        """Write the genesis as readable JSON."""
        # Data directory files are private (0600), the genesis copy included.
        write_private(path, json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")


#: A genesis file larger than this is refused unread (a devnet's is under 2 KiB).
MAX_GENESIS_BYTES = 1 << 20


def load_genesis(path: Path | None = None) -> Genesis:
    """Read a genesis file; ``None``: the one shipped in ``bootstrap/genesis.json``.

    Anything that is not a readable genesis raises RecordError, saying why: a file that is
    not a regular one (a FIFO would block the reader for ever, a device never end) or over
    :data:`MAX_GENESIS_BYTES` is refused before it is read, and text that is not UTF-8 or
    JSON nested or sized past what the parser takes is "not JSON" (a hostile review of the
    refusal of another network's data directory, which reads the directory's copy)."""
    try:
        if path is None:
            data = (resources.files("mtor_p2p._bootstrap") / GENESIS_FILE_NAME).read_bytes()
        else:
            data = _read_small_file(Path(path))
    except OSError as exc:
        raise RecordError(f"cannot read genesis {path}: {exc.strerror or exc}") from exc
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError covers json.JSONDecodeError and integers past Python's digit limit.
        raise RecordError(f"genesis {path} is not JSON: {exc}") from exc
    return Genesis.from_json(obj)


def _read_small_file(path: Path) -> bytes:
    """The bytes of a regular file of at most MAX_GENESIS_BYTES (OSError otherwise)."""
    # O_NONBLOCK: opening a FIFO for reading must not wait for a writer; a regular file
    # ignores it.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if info.st_size > MAX_GENESIS_BYTES:
            raise OSError(errno.EFBIG, f"larger than {MAX_GENESIS_BYTES} bytes")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(MAX_GENESIS_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_GENESIS_BYTES:
        raise OSError(errno.EFBIG, f"larger than {MAX_GENESIS_BYTES} bytes")
    return data
