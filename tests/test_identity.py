"""Identity: key file handling and libp2p-compatible peer IDs."""

from __future__ import annotations

import os
import stat

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from mtor_p2p.identity import (
    KEY_FILE_NAME,
    Identity,
    IdentityError,
    ed25519_verify,
    load_or_create_identity,
    peer_id_from_public_key,
    public_key_from_peer_id,
    verify_signature,
)


def test_key_is_created_with_mode_0600_and_reused(tmp_path):
    data_dir = tmp_path / "node"
    first = load_or_create_identity(data_dir)
    mode = stat.S_IMODE(os.stat(data_dir / KEY_FILE_NAME).st_mode)
    assert mode == 0o600
    second = load_or_create_identity(data_dir)
    assert first.peer_id == second.peer_id
    assert first.peer_id.startswith("12D3KooW")


def test_world_readable_key_is_refused(tmp_path):
    load_or_create_identity(tmp_path)
    os.chmod(tmp_path / KEY_FILE_NAME, 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        load_or_create_identity(tmp_path)


def test_truncated_key_is_refused(tmp_path):
    (tmp_path / KEY_FILE_NAME).write_bytes(b"short")
    os.chmod(tmp_path / KEY_FILE_NAME, 0o600)
    with pytest.raises(IdentityError, match="32-byte"):
        load_or_create_identity(tmp_path)


def test_peer_id_matches_libp2p_derivation():
    identity = Identity.generate()
    key_pair = create_new_key_pair(identity.seed)
    assert identity.peer_id == str(ID.from_pubkey(key_pair.public_key))


def test_public_key_round_trips_through_peer_id():
    identity = Identity.generate()
    assert public_key_from_peer_id(identity.peer_id) == identity.public_key
    assert peer_id_from_public_key(identity.public_key) == identity.peer_id
    with pytest.raises(ValueError):
        public_key_from_peer_id("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N")  # an RSA-style ID
    with pytest.raises(ValueError):
        public_key_from_peer_id("not base58 0OIl")


def test_signatures_verify_only_for_the_signed_message():
    identity = Identity.generate()
    signature = identity.sign(b"message")
    assert verify_signature(identity.public_key, signature, b"message")
    assert not verify_signature(identity.public_key, signature, b"messagf")
    assert not verify_signature(Identity.generate().public_key, signature, b"message")
    assert not verify_signature(b"\x00" * 31, signature, b"message")


def test_our_own_signatures_are_not_checked_again(monkeypatch):
    """A record we signed comes back to us (stored, ingested, gossiped back): its check is
    answered from memory; another key's signature is still checked, and a changed message
    still fails."""
    import mtor_p2p.identity as identity_module

    ours, theirs = Identity.generate(), Identity.generate()
    their_signature = theirs.sign(b"their record")
    signature = ours.sign(b"our record")
    checks = []
    real = identity_module.ed25519_verify

    def counted(public_key, signature, message):
        checks.append(public_key)
        return real(public_key, signature, message)

    monkeypatch.setattr(identity_module, "ed25519_verify", counted)
    identity_module._VERIFIED.clear()
    assert verify_signature(ours.public_key, ours.sign(b"our record"), b"our record")
    assert checks == []
    assert verify_signature(theirs.public_key, their_signature, b"their record")
    assert not verify_signature(ours.public_key, signature, b"our record, changed")
    assert checks == [theirs.public_key, ours.public_key]


def test_signatures_are_those_of_rfc_8032_and_of_libp2p():
    """Ed25519 signatures are deterministic: libsodium's here, OpenSSL's and libp2p's agree
    byte for byte, and each verifies the others'."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    identity = Identity(bytes(range(32)))
    openssl = Ed25519PrivateKey.from_private_bytes(identity.seed)
    libp2p_key = create_new_key_pair(identity.seed).private_key
    for message in (b"", b"a receipt", os.urandom(1000)):
        signature = identity.sign(message)
        assert signature == openssl.sign(message) == libp2p_key.sign(message)
        openssl.public_key().verify(signature, message)
        assert ed25519_verify(identity.public_key, signature, message)


def test_a_short_signature_cannot_borrow_the_messages_bytes():
    """libsodium checks signature || message: a 63-byte "signature" whose message starts with
    the missing byte would make the same bytes as a valid pair, and is refused."""
    identity = Identity.generate()
    signature = identity.sign(b"pay 1 credit")
    assert ed25519_verify(identity.public_key, signature, b"pay 1 credit")
    assert not ed25519_verify(identity.public_key, signature[:63], signature[63:] + b"pay 1 credit")
    assert not ed25519_verify(identity.public_key, signature + b"p", b"ay 1 credit")
    assert not ed25519_verify(identity.public_key[:31], identity.public_key[31:] + signature, b"")


def test_a_key_anyone_can_sign_for_is_refused():
    """The neutral point as a public key, with R the neutral point and S = 0, satisfies
    Ed25519's equation for every message: anyone could sign as such a "peer". libsodium
    refuses small-order keys (OpenSSL's check accepts this one)."""
    neutral = bytes([1]) + bytes(31)
    forged = neutral + bytes(32)
    for message in (b"", b"pay me everything"):
        assert not ed25519_verify(neutral, forged, message)
        assert not verify_signature(neutral, forged, message)


def test_the_type_bytes_come_in_changes_no_outcome():
    """A signature's outcome is remembered by its bytes: handed first as a bytearray (or a
    memoryview), then as bytes, it verifies both times; anything else is a failed check."""
    import mtor_p2p.identity as identity_module

    identity = Identity.generate()
    message = b"a record from elsewhere"
    signature = Identity(identity.seed).sign(message)
    identity_module._VERIFIED.clear()
    assert verify_signature(identity.public_key, bytearray(signature), memoryview(message))
    assert verify_signature(identity.public_key, signature, message)
    for wrong in (None, "text", 5, signature[:63], signature + b"x"):
        assert not verify_signature(identity.public_key, wrong, message)
    assert not verify_signature(identity.public_key.hex(), signature, message)
