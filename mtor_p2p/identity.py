"""Node identity: an Ed25519 key kept in the data directory, and libp2p-compatible peer IDs.

The peer ID is computed here, without libp2p, exactly as libp2p defines it for Ed25519 keys:
the base58btc encoding of an identity multihash over the protobuf-encoded public key. Keeping
this independent of the network adapter lets records be verified anywhere (the simulator, the
ledger) without importing libp2p.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import base58
import nacl.bindings
import nacl.exceptions

from mtor_p2p.config import secure_data_dir

KEY_FILE_NAME = "identity.key"
SEED_SIZE = 32
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64

# protobuf `PublicKey { KeyType Type = 1; bytes Data = 2; }` with Type = Ed25519 (1) and a
# 32-byte Data field: field 1 varint 1, field 2 length 32.
_ED25519_PROTOBUF_PREFIX = bytes([0x08, 0x01, 0x12, PUBLIC_KEY_SIZE])
# identity multihash: code 0x00, then the digest length (36 bytes of protobuf).
_IDENTITY_MULTIHASH_PREFIX = bytes([0x00, len(_ED25519_PROTOBUF_PREFIX) + PUBLIC_KEY_SIZE])


class IdentityError(Exception):
    """The identity key file is unreadable, malformed or unsafe."""


def peer_id_from_public_key(public_key: bytes) -> str:
    """Return the libp2p peer ID (``12D3KooW…``) of a raw 32-byte Ed25519 public key."""
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise ValueError(
            f"an Ed25519 public key has {PUBLIC_KEY_SIZE} bytes, not {len(public_key)}"
        )
    multihash = _IDENTITY_MULTIHASH_PREFIX + _ED25519_PROTOBUF_PREFIX + public_key
    return base58.b58encode(multihash).decode("ascii")


@functools.lru_cache(maxsize=4096)  # receipts name the same few peers again and again
def public_key_from_peer_id(peer_id: str) -> bytes:
    """Extract the raw Ed25519 public key from a peer ID; raise ValueError if it holds none."""
    if not isinstance(peer_id, str):
        raise ValueError("a peer ID is a string")
    try:
        raw = base58.b58decode(peer_id.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise ValueError("peer ID is not base58") from exc
    prefix = _IDENTITY_MULTIHASH_PREFIX + _ED25519_PROTOBUF_PREFIX
    if len(raw) != len(prefix) + PUBLIC_KEY_SIZE or not raw.startswith(prefix):
        raise ValueError("peer ID does not embed an Ed25519 public key")
    return raw[len(prefix) :]


#: Outcomes of recent signature checks, by a hash of (key, signature, message). The same
#: signed record reaches a peer several times (gossip, the DHT, sync, validator then store),
#: and a check of the same bytes always has the same answer, so it is done once.
_VERIFIED: OrderedDict[bytes, bool] = OrderedDict()
_VERIFIED_MAX = 65_536
_verified_lock = threading.Lock()


def _check_key(public_key: bytes, signature: bytes, message: bytes) -> bytes:
    return hashlib.blake2b(
        len(public_key).to_bytes(2, "big")
        + public_key
        + len(signature).to_bytes(2, "big")
        + signature
        + message,
        digest_size=32,
    ).digest()


def _remember(key: bytes, ok: bool) -> None:
    with _verified_lock:
        _VERIFIED[key] = ok
        if len(_VERIFIED) > _VERIFIED_MAX:
            _VERIFIED.popitem(last=False)


_BYTES_LIKE = (bytes, bytearray, memoryview)


def verify_signature(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Check an Ed25519 signature; any malformed input is simply a failed check."""
    if not all(isinstance(part, _BYTES_LIKE) for part in (public_key, signature, message)):
        return False
    # As bytes before anything else: the remembered outcome of some bytes must not depend
    # on the type they came in (a review cached a bytearray's refusal for its bytes).
    public_key, signature, message = bytes(public_key), bytes(signature), bytes(message)
    if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    key = _check_key(public_key, signature, message)
    with _verified_lock:
        known = _VERIFIED.get(key)
        if known is not None:
            _VERIFIED.move_to_end(key)
            return known
    ok = ed25519_verify(public_key, signature, message)
    _remember(key, ok)
    return ok


def ed25519_verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """libsodium's Ed25519 check (no cache): RFC 8032 signatures, refusing a non-canonical S,
    small-order keys and R (for which anyone can make a signature) and non-canonical keys.

    libsodium, not OpenSSL (``cryptography``): 57 against 107 µs per check on the project's
    VM, and both release the GIL. Every peer must check the same way (the ledger keeps what
    every peer accepts): the stricter rule refuses only signatures no signer makes."""
    # crypto_sign_open takes signature || message: the lengths are checked first, or a short
    # "signature" would borrow the message's first bytes.
    if not (
        isinstance(public_key, bytes)
        and isinstance(signature, bytes)
        and len(public_key) == PUBLIC_KEY_SIZE
        and len(signature) == SIGNATURE_SIZE
    ):
        return False
    try:
        nacl.bindings.crypto_sign_open(signature + bytes(message), public_key)
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        return False
    return True


@dataclass(frozen=True)
class Identity:
    """A node's Ed25519 key pair and the peer ID derived from it."""

    seed: bytes = field(repr=False)  # the private key: never in logs or tracebacks

    def __post_init__(self) -> None:
        if len(self.seed) != SEED_SIZE:
            raise IdentityError(f"an identity seed has {SEED_SIZE} bytes, not {len(self.seed)}")

    @classmethod
    def generate(cls) -> Identity:
        """Create a fresh random identity."""
        return cls(os.urandom(SEED_SIZE))

    @functools.cached_property
    def _keypair(self) -> tuple[bytes, bytes]:
        """libsodium's (public key, secret key) of the seed (the secret key is seed || public)."""
        public, secret = nacl.bindings.crypto_sign_seed_keypair(self.seed)
        return bytes(public), bytes(secret)

    @functools.cached_property
    def public_key(self) -> bytes:
        """The raw 32-byte public key."""
        return self._keypair[0]

    @functools.cached_property
    def peer_id(self) -> str:
        """The libp2p peer ID of this identity."""
        return peer_id_from_public_key(self.public_key)

    def sign(self, message: bytes) -> bytes:
        """Sign ``message`` with this identity's private key."""
        # RFC 8032 signatures are deterministic: the same bytes from any implementation.
        signature = nacl.bindings.crypto_sign(bytes(message), self._keypair[1])[:SIGNATURE_SIZE]
        # Our own signatures come back to us (a receipt we signed is stored, ingested and
        # gossiped back): known good, so their checks are skipped (one Ed25519 verify per
        # shard on each side of a job).
        _remember(_check_key(self.public_key, signature, message), True)
        return signature


def load_or_create_identity(data_dir: Path) -> Identity:
    """Load the identity from ``data_dir``, creating it (mode 0600) on first start.

    Refuses a key file that other users can read, as ssh does, rather than silently using a
    key that may have leaked.
    """
    # Every command starts here: make the directory 0700 and its other files 0600 (repairing
    # directories written by older versions). The key itself is not tightened silently: a
    # key others could read may have leaked, and is refused below.
    secure_data_dir(data_dir, skip=(KEY_FILE_NAME,))
    path = data_dir / KEY_FILE_NAME
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise IdentityError(
                f"{path} is readable by other users (mode {mode:o}); run: chmod 600 {path}"
            )
        seed = path.read_bytes()
        if len(seed) != SEED_SIZE:
            raise IdentityError(f"{path} does not hold a {SEED_SIZE}-byte Ed25519 seed")
        return Identity(seed)
    identity = Identity.generate()
    # O_EXCL: two processes starting on the same data directory must not both write a key.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, identity.seed)
        os.fsync(fd)
    finally:
        os.close(fd)
    return identity
