"""BLS12-381 checkpoint signatures: py-ecc and blspy agree byte for byte and reject bad input.

py-ecc is slow (a signature ~0.1 s, a verification ~0.3 s), so the expensive outputs are
computed once per module and the py-ecc cases are kept few.
"""

from __future__ import annotations

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from py_ecc.bls.g2_primitives import pubkey_to_G1, signature_to_G2, subgroup_check

from mtor_p2p.ledger.bls import (
    CURVE_ORDER,
    DERIVE_KEY_CONTEXT,
    PUBLIC_KEY_BYTES,
    SECRET_BYTES,
    SIGNATURE_BYTES,
    BlsBackend,
    BlspyBackend,
    PyEccBackend,
    backend_by_name,
    default_backend,
    derive_secret,
)

SEEDS = [bytes([index]) * 32 for index in range(1, 6)]  # five signers
OUTSIDER_SEED = b"\x42" * 32
MESSAGE = b"mtor checkpoint epoch=000042 root=" + bytes(range(26))  # 60 bytes
OTHER_MESSAGE = MESSAGE[:-1] + b"\xff"

# Compressed encodings of the points at infinity.
G1_INFINITY = b"\xc0" + bytes(47)
G2_INFINITY = b"\xc0" + bytes(95)
# Points on the curves but outside the prime-order subgroups (x = 5 on E, x = 1 + i on E').
G1_NOT_IN_SUBGROUP = bytes.fromhex("a0" + "00" * 46 + "05")
G2_NOT_IN_SUBGROUP = bytes.fromhex("a0" + "00" * 46 + "01" + "00" * 47 + "01")

# Ethereum's bls12-381-tests (same ciphersuite, POP DST): sign_case_84d45c9c7cca6b92 et al.
KAT_SECRET = bytes.fromhex("263dbd792f5b1be47ed85f8938c0f29586af0d3ac7b977f21c278fe1462040e3")
KAT_PUBLIC_KEY = bytes.fromhex(
    "a491d1b0ecd9bb917989f0e74f0dea0422eac4a873e5e2644f368dffb9a6e20f"
    "d6e10c1b77654d067c0618f6e5a7f79a"
)
KAT_MESSAGE = bytes(32)
KAT_SIGNATURE = bytes.fromhex(
    "b6ed936746e01f8ecf281f020953fbf1f01debd5657c4a383940b020b26507f6"
    "076334f91e2366c96e9ab279fb5158090352ea1c5b0c9274504f4f0e7053af24"
    "802e51e4568d164fe986834f41e55c8e850ce1f98458c0cfc9ab380b55285a55"
)

BACKEND_NAMES = ["py-ecc", "blspy"]


def negate_public_key(public_key: bytes) -> bytes:
    """-P for a compressed non-infinity G1 point: flip the sign (a) flag."""
    return bytes([public_key[0] ^ 0x20]) + public_key[1:]


def flip_bit(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


class Outputs:
    """Everything one backend produces for the five signers."""

    def __init__(self, backend: BlsBackend) -> None:
        self.secrets = [derive_secret(seed) for seed in SEEDS]
        self.public_keys = [backend.public_key(secret) for secret in self.secrets]
        self.signatures = [backend.sign(secret, MESSAGE) for secret in self.secrets]
        self.proofs = [backend.pop_prove(secret) for secret in self.secrets]
        self.aggregate = backend.aggregate(self.signatures)


@pytest.fixture(scope="module")
def outputs() -> dict[str, Outputs]:
    return {name: Outputs(backend_by_name(name)) for name in BACKEND_NAMES}


@pytest.fixture(scope="module")
def outsider_public_key() -> bytes:
    return backend_by_name("blspy").public_key(derive_secret(OUTSIDER_SEED))


@pytest.fixture(params=BACKEND_NAMES)
def backend(request: pytest.FixtureRequest) -> BlsBackend:
    return backend_by_name(request.param)


# --- derive_secret -------------------------------------------------------------------------


def test_derive_secret_is_deterministic_in_range_and_distinct_per_seed():
    secrets = [derive_secret(seed) for seed in SEEDS]
    assert secrets == [derive_secret(seed) for seed in SEEDS]
    assert len(set(secrets)) == len(SEEDS)
    for secret in secrets:
        assert len(secret) == SECRET_BYTES
        assert 1 <= int.from_bytes(secret, "big") < CURVE_ORDER


def test_derive_secret_follows_the_documented_construction():
    seed = SEEDS[0]
    okm = blake3.blake3(seed + bytes(4), derive_key_context=DERIVE_KEY_CONTEXT).digest(length=64)
    expected = (int.from_bytes(okm, "big") % CURVE_ORDER).to_bytes(32, "big")
    assert derive_secret(seed) == expected
    # Pinned: a change here changes every node's checkpoint key.
    assert derive_secret(bytes(32)).hex() == (
        "5af7afe72b0f5d07c4e7b2310a8f4a042c9ca2a1768424dfcfe99511390a367e"
    )


@pytest.mark.parametrize("seed", [b"", bytes(31), bytes(33), "x" * 32, None])
def test_derive_secret_refuses_a_seed_that_is_not_32_bytes(seed):
    with pytest.raises(ValueError, match="32 bytes"):
        derive_secret(seed)


@settings(max_examples=200)
@given(st.binary(min_size=32, max_size=32))
def test_derive_secret_is_always_a_valid_scalar(seed):
    assert 1 <= int.from_bytes(derive_secret(seed), "big") < CURVE_ORDER


# --- backend selection ---------------------------------------------------------------------


def test_default_backend_is_cached_blspy():
    assert default_backend() is default_backend()
    assert default_backend().name == "blspy"
    assert isinstance(default_backend(), BlspyBackend)


def test_backend_by_name():
    assert isinstance(backend_by_name("py-ecc"), PyEccBackend)
    assert backend_by_name("py-ecc") is backend_by_name("py-ecc")
    assert isinstance(backend_by_name("blspy"), BlsBackend)
    with pytest.raises(ValueError, match="unknown BLS backend"):
        backend_by_name("blst")


# --- the two backends agree ----------------------------------------------------------------


def test_both_backends_produce_identical_bytes(outputs):
    ecc, fast = outputs["py-ecc"], outputs["blspy"]
    assert ecc.public_keys == fast.public_keys
    assert ecc.signatures == fast.signatures
    assert ecc.proofs == fast.proofs
    assert ecc.aggregate == fast.aggregate
    assert all(len(key) == PUBLIC_KEY_BYTES for key in fast.public_keys)
    assert all(len(sig) == SIGNATURE_BYTES for sig in fast.signatures + fast.proofs)
    assert len(fast.aggregate) == SIGNATURE_BYTES
    assert len(set(fast.public_keys)) == len(SEEDS)


def test_known_answer_from_ethereum_bls_test_vectors(backend):
    assert backend.public_key(KAT_SECRET) == KAT_PUBLIC_KEY
    assert backend.sign(KAT_SECRET, KAT_MESSAGE) == KAT_SIGNATURE


def test_each_backend_verifies_the_others_outputs(outputs):
    ecc, fast = backend_by_name("py-ecc"), backend_by_name("blspy")
    made_by_ecc, made_by_fast = outputs["py-ecc"], outputs["blspy"]
    # blspy checks everything py-ecc made; py-ecc (slow) checks two signers' outputs of blspy.
    for key, sig, proof in zip(
        made_by_ecc.public_keys, made_by_ecc.signatures, made_by_ecc.proofs, strict=True
    ):
        assert fast.verify(key, MESSAGE, sig)
        assert fast.pop_verify(key, proof)
    assert fast.fast_aggregate_verify(made_by_ecc.public_keys, MESSAGE, made_by_ecc.aggregate)
    for index in (0, 3):
        key = made_by_fast.public_keys[index]
        assert ecc.verify(key, MESSAGE, made_by_fast.signatures[index])
        assert ecc.pop_verify(key, made_by_fast.proofs[index])
    assert ecc.fast_aggregate_verify(made_by_fast.public_keys, MESSAGE, made_by_fast.aggregate)


def test_signatures_do_not_cross_keys_messages_or_the_pop_domain(backend, outputs):
    made = outputs["blspy"]
    key, sig, proof = made.public_keys[0], made.signatures[0], made.proofs[0]
    assert not backend.verify(made.public_keys[1], MESSAGE, sig)
    assert not backend.verify(key, OTHER_MESSAGE, sig)
    # The PoP is a signature over the key under another DST: not a plain signature of it.
    assert not backend.verify(key, key, proof)
    assert not backend.pop_verify(made.public_keys[1], proof)


# --- fast_aggregate_verify -----------------------------------------------------------------


def test_fast_aggregate_verify_accepts_exactly_the_signing_set(
    backend, outputs, outsider_public_key
):
    made = outputs["blspy"]
    keys, aggregate = made.public_keys, made.aggregate
    assert backend.fast_aggregate_verify(keys, MESSAGE, aggregate)
    assert backend.fast_aggregate_verify(list(reversed(keys)), MESSAGE, aggregate)
    assert backend.fast_aggregate_verify(tuple(keys), MESSAGE, aggregate)
    assert not backend.fast_aggregate_verify(keys[:-1], MESSAGE, aggregate)  # a key missing
    assert not backend.fast_aggregate_verify(
        [*keys, outsider_public_key], MESSAGE, aggregate
    )  # an extra key
    assert not backend.fast_aggregate_verify([*keys, keys[0]], MESSAGE, aggregate)  # duplicate
    assert not backend.fast_aggregate_verify(keys, OTHER_MESSAGE, aggregate)
    for index in (0, 47, 95):
        assert not backend.fast_aggregate_verify(keys, MESSAGE, flip_bit(aggregate, index))
    assert not backend.fast_aggregate_verify([], MESSAGE, aggregate)


def test_fast_aggregate_verify_rejects_a_signature_missing_from_the_aggregate(backend, outputs):
    made = outputs["blspy"]
    partial = backend_by_name("blspy").aggregate(made.signatures[:-1])
    assert not backend.fast_aggregate_verify(made.public_keys, MESSAGE, partial)
    assert backend.fast_aggregate_verify(made.public_keys[:-1], MESSAGE, partial)


def test_cancelling_keys_with_an_infinity_signature_are_refused(backend, outputs):
    key = outputs["blspy"].public_keys[0]
    assert not backend.fast_aggregate_verify([key, negate_public_key(key)], MESSAGE, G2_INFINITY)
    assert not backend.verify(G1_INFINITY, MESSAGE, G2_INFINITY)
    assert not backend.pop_verify(G1_INFINITY, G2_INFINITY)
    assert not backend.fast_aggregate_verify([G1_INFINITY], MESSAGE, G2_INFINITY)


# --- malformed input -----------------------------------------------------------------------


def test_the_non_subgroup_fixtures_are_what_they_claim():
    assert not subgroup_check(pubkey_to_G1(G1_NOT_IN_SUBGROUP))
    assert not subgroup_check(signature_to_G2(G2_NOT_IN_SUBGROUP))


BAD_PUBLIC_KEYS = [
    pytest.param(b"", id="empty"),
    pytest.param(bytes(47), id="47-bytes"),
    pytest.param(bytes(49), id="49-bytes"),
    pytest.param(bytes(48), id="all-zero"),  # no compression flag
    pytest.param(G1_INFINITY, id="infinity"),
    pytest.param(G1_NOT_IN_SUBGROUP, id="not-in-subgroup"),
    pytest.param(b"\xe0" + bytes(47), id="infinity-with-sign-flag"),
    pytest.param(b"\x80" + b"\xff" * 47, id="x-not-below-p"),
    pytest.param("a" * 48, id="str"),
    pytest.param(None, id="None"),
]
BAD_SIGNATURES = [
    pytest.param(b"", id="empty"),
    pytest.param(bytes(95), id="95-bytes"),
    pytest.param(bytes(97), id="97-bytes"),
    pytest.param(bytes(96), id="all-zero"),
    pytest.param(G2_NOT_IN_SUBGROUP, id="not-in-subgroup"),
    pytest.param(b"\xe0" + bytes(95), id="infinity-with-sign-flag"),
    pytest.param(b"\x80" + b"\xff" * 95, id="x-not-below-p"),
    pytest.param("a" * 96, id="str"),
    pytest.param(None, id="None"),
]


@pytest.mark.parametrize("bad_key", BAD_PUBLIC_KEYS)
def test_malformed_public_keys_are_refused(backend, outputs, bad_key):
    made = outputs["blspy"]
    assert backend.verify(bad_key, MESSAGE, made.signatures[0]) is False
    assert backend.pop_verify(bad_key, made.proofs[0]) is False
    assert backend.fast_aggregate_verify([bad_key], MESSAGE, made.signatures[0]) is False
    assert backend.fast_aggregate_verify([*made.public_keys, bad_key], MESSAGE, made.aggregate) is (
        False
    )


@pytest.mark.parametrize("bad_signature", BAD_SIGNATURES)
def test_malformed_signatures_are_refused(backend, outputs, bad_signature):
    made = outputs["blspy"]
    assert backend.verify(made.public_keys[0], MESSAGE, bad_signature) is False
    assert backend.pop_verify(made.public_keys[0], bad_signature) is False
    assert backend.fast_aggregate_verify(made.public_keys, MESSAGE, bad_signature) is False
    with pytest.raises(ValueError):
        backend.aggregate([made.signatures[0], bad_signature])


def test_infinity_signature_is_refused_by_verify(backend, outputs):
    made = outputs["blspy"]
    assert backend.verify(made.public_keys[0], MESSAGE, G2_INFINITY) is False
    assert backend.pop_verify(made.public_keys[0], G2_INFINITY) is False


def test_wrong_argument_types_are_refused_not_raised(backend, outputs):
    made = outputs["blspy"]
    assert backend.verify(made.public_keys[0], "not bytes", made.signatures[0]) is False
    assert backend.fast_aggregate_verify(None, MESSAGE, made.aggregate) is False
    assert backend.fast_aggregate_verify(made.public_keys, None, made.aggregate) is False


def _flagged(data: bytes) -> bytes:
    """Random bytes with the compressed flag set, non-infinity: they reach point decoding."""
    return bytes([0x80 | (data[0] & 0x3F)]) + data[1:]


RANDOM_KEYS = st.one_of(st.binary(max_size=64), st.binary(min_size=48, max_size=48).map(_flagged))
RANDOM_SIGNATURES = st.one_of(
    st.binary(max_size=128), st.binary(min_size=96, max_size=96).map(_flagged)
)


@settings(max_examples=15, deadline=None)
@given(key=RANDOM_KEYS, signature=RANDOM_SIGNATURES)
def test_random_bytes_never_verify_on_py_ecc(outputs, key, signature):
    ecc = backend_by_name("py-ecc")
    made = outputs["blspy"]
    assert ecc.verify(key, MESSAGE, made.signatures[0]) is False
    assert ecc.verify(made.public_keys[0], MESSAGE, signature) is False
    assert ecc.pop_verify(key, signature) is False


@settings(max_examples=300, deadline=None)
@given(key=RANDOM_KEYS, signature=RANDOM_SIGNATURES)
def test_random_bytes_never_verify_on_blspy(outputs, key, signature):
    fast = backend_by_name("blspy")
    made = outputs["blspy"]
    assert fast.verify(key, MESSAGE, made.signatures[0]) is False
    assert fast.verify(made.public_keys[0], MESSAGE, signature) is False
    assert fast.pop_verify(key, signature) is False
    assert fast.fast_aggregate_verify([*made.public_keys, key], MESSAGE, made.aggregate) is False
    assert fast.fast_aggregate_verify(made.public_keys, MESSAGE, signature) is False


# --- aggregate and secrets -----------------------------------------------------------------


def test_aggregate_of_nothing_is_an_error(backend):
    with pytest.raises(ValueError, match="empty"):
        backend.aggregate([])


def test_aggregate_of_infinity_is_infinity_on_both(backend, outputs):
    made = outputs["blspy"]
    assert backend.aggregate([G2_INFINITY]) == G2_INFINITY
    assert backend.aggregate([made.signatures[0], G2_INFINITY]) == made.signatures[0]


@pytest.mark.parametrize(
    "secret",
    [
        pytest.param(b"", id="empty"),
        pytest.param(bytes(31), id="31-bytes"),
        pytest.param(bytes(33), id="33-bytes"),
        pytest.param(bytes(32), id="zero"),
        pytest.param(CURVE_ORDER.to_bytes(32, "big"), id="r"),
        pytest.param((CURVE_ORDER + 1).to_bytes(32, "big"), id="r+1"),
        pytest.param(b"\xff" * 32, id="2**256-1"),
        pytest.param("x" * 32, id="str"),
    ],
)
def test_invalid_secrets_are_refused(backend, secret):
    with pytest.raises(ValueError):
        backend.public_key(secret)
    with pytest.raises(ValueError):
        backend.sign(secret, MESSAGE)
    with pytest.raises(ValueError):
        backend.pop_prove(secret)


def test_extreme_valid_secrets_agree():
    ecc, fast = backend_by_name("py-ecc"), backend_by_name("blspy")
    for scalar in (1, CURVE_ORDER - 1):
        secret = scalar.to_bytes(32, "big")
        assert ecc.public_key(secret) == fast.public_key(secret)
    one = (1).to_bytes(32, "big")
    assert ecc.sign(one, MESSAGE) == fast.sign(one, MESSAGE)


def test_the_py_ecc_backend_leaves_the_recursion_limit_and_deep_records_refused() -> None:
    """py_ecc raises the interpreter's recursion limit to 100,000 when imported; json's C
    parser recurses once per nesting level up to that limit, so a peer's 64 KiB record of
    '[' overflowed the C stack and killed the process (a segfault). The backend puts the limit
    back, and such a record is refused. In a fresh interpreter: this module imports py_ecc
    itself."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from mtor_p2p.ledger import bls\n"
        "from mtor_p2p.wire import RecordError, parse_canonical\n"
        "before = sys.getrecursionlimit()\n"
        "bls.PyEccBackend()\n"
        "assert sys.getrecursionlimit() == before, sys.getrecursionlimit()\n"
        "try:\n"
        "    parse_canonical(b'[' * 65536, max_bytes=65536)\n"
        "except RecordError:\n"
        "    print('refused')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "refused" in result.stdout, (result.returncode, result.stderr)
