"""BLS12-381 signatures for ledger checkpoints, behind two interchangeable backends.

Ciphersuite: the IETF proof-of-possession scheme in its minimal-pubkey-size variant,
``BLS_SIG_BLS12381G2_XMD:SHA-256_SSWU_RO_POP_``: public keys are compressed G1 points
(48 bytes), signatures and proofs of possession compressed G2 points (96 bytes). Two
implementations are wrapped:

* :class:`PyEccBackend` — ``py_ecc.bls.G2ProofOfPossession``, the pure-Python reference
  (slow: a signature takes ~0.1 s, a verification ~0.3 s);
* :class:`BlspyBackend` — ``blspy.PopSchemeMPL`` (Chia's C++ ``bls-signatures``), which
  produces byte-identical keys, signatures, aggregates and proofs, orders of magnitude faster.

:func:`default_backend` picks blspy when it is importable and py-ecc otherwise.

Secrets. Both libraries offer a ``KeyGen`` from seed material, but their derivations differ
(py-ecc's ``G2ProofOfPossession.KeyGen`` and blspy's ``PopSchemeMPL.key_gen`` follow different
revisions of the IETF HKDF construction), so the same seed gives different keys. We therefore
never hand a seed to a library: :func:`derive_secret` turns a peer's 32-byte Ed25519 seed into
a raw 32-byte big-endian scalar with blake3, and that raw secret is what both backends accept
byte-identically (``int.from_bytes`` in py-ecc, ``PrivateKey.from_bytes`` in blspy).

Proof of possession. ``fast_aggregate_verify`` is only sound against rogue-key attacks when
every public key passed to it has been checked once with ``pop_verify``; the ledger must do
that when a key is registered, not on every checkpoint.

Error handling. Every verify-type function (``verify``, ``fast_aggregate_verify``,
``pop_verify``) returns False, and never raises, for malformed input: wrong types or lengths,
bad encodings, points not on the curve or outside the prime-order subgroup, the point at
infinity as a public key, or an empty key list. Functions that take a secret raise
:class:`ValueError` for an invalid one; ``aggregate`` raises :class:`ValueError` for an empty
list or for any signature that is not a valid subgroup point (both backends check the subgroup
here, so that they accept and reject exactly the same inputs).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import blake3

__all__ = [
    "CURVE_ORDER",
    "DERIVE_KEY_CONTEXT",
    "PUBLIC_KEY_BYTES",
    "SECRET_BYTES",
    "SEED_BYTES",
    "SIGNATURE_BYTES",
    "BlsBackend",
    "BlspyBackend",
    "PyEccBackend",
    "backend_by_name",
    "default_backend",
    "derive_secret",
]

SECRET_BYTES = 32
PUBLIC_KEY_BYTES = 48
SIGNATURE_BYTES = 96
SEED_BYTES = 32

#: r, the order of the BLS12-381 G1/G2 subgroups (and of the scalar field).
CURVE_ORDER = 0x73EDA753299D7D483339D80809A1D80553BDA402FFFE5BFEFFFFFFFF00000001

#: blake3 ``derive_key`` context for :func:`derive_secret`; changing it changes every key.
DERIVE_KEY_CONTEXT = "mtor 2026-11 bls12-381 checkpoint key"

_OKM_BYTES = 64  # 512 bits reduced mod a 255-bit r: the bias is below 2**-256.
_MAX_DERIVE_ATTEMPTS = 256


def derive_secret(seed: bytes) -> bytes:
    """Derive the 32-byte big-endian BLS secret scalar of a peer from its 32-byte Ed25519 seed.

    For ``counter = 0, 1, …`` compute 64 bytes of blake3 in ``derive_key`` mode with context
    :data:`DERIVE_KEY_CONTEXT` over ``seed || counter`` (counter as 4 bytes, big-endian),
    read them as a big-endian integer and reduce it mod r; return the first non-zero result.
    A zero is rejected and the counter increased rather than mapped to 1, so no two seeds are
    pushed onto the same fixed key; in practice the first attempt always succeeds (a zero has
    probability about 2**-255). The result lies in ``[1, r - 1]``.

    Raises ValueError if ``seed`` is not 32 bytes.
    """
    if not isinstance(seed, bytes | bytearray | memoryview) or len(seed) != SEED_BYTES:
        raise ValueError(f"the seed must be {SEED_BYTES} bytes")
    seed = bytes(seed)
    for counter in range(_MAX_DERIVE_ATTEMPTS):
        material = seed + counter.to_bytes(4, "big")
        okm = blake3.blake3(material, derive_key_context=DERIVE_KEY_CONTEXT).digest(
            length=_OKM_BYTES
        )
        scalar = int.from_bytes(okm, "big") % CURVE_ORDER
        if scalar != 0:
            return scalar.to_bytes(SECRET_BYTES, "big")
    raise AssertionError("unreachable: blake3 reduced to zero 256 times")  # pragma: no cover


def _secret_scalar(secret: bytes) -> int:
    """Check a raw secret and return it as an integer in ``[1, r - 1]``; else ValueError."""
    if not isinstance(secret, bytes | bytearray | memoryview) or len(secret) != SECRET_BYTES:
        raise ValueError(f"a BLS secret is {SECRET_BYTES} bytes")
    scalar = int.from_bytes(secret, "big")
    if not 0 < scalar < CURVE_ORDER:
        raise ValueError("a BLS secret must be a scalar in [1, r - 1]")
    return scalar


def _as_bytes(value: object, length: int | None = None) -> bytes | None:
    """``value`` as bytes if it is bytes-like (of ``length``, when given); else None."""
    if not isinstance(value, bytes | bytearray | memoryview):
        return None
    data = bytes(value)
    if length is not None and len(data) != length:
        return None
    return data


@runtime_checkable
class BlsBackend(Protocol):
    """One implementation of the BLS proof-of-possession ciphersuite (G1 keys, G2 signatures).

    Secrets are raw 32-byte big-endian scalars (see :func:`derive_secret`), public keys are
    48-byte compressed G1 points, signatures and proofs 96-byte compressed G2 points.
    """

    name: str

    def public_key(self, secret: bytes) -> bytes:
        """The 48-byte public key of ``secret``; ValueError for an invalid secret."""
        ...

    def sign(self, secret: bytes, message: bytes) -> bytes:
        """The 96-byte signature of ``message``; ValueError for an invalid secret."""
        ...

    def verify(self, public_key: bytes, message: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is a signature of ``message`` by ``public_key``; never raises."""
        ...

    def aggregate(self, signatures: Sequence[bytes]) -> bytes:
        """The sum of ``signatures``; ValueError if there are none or one is not valid."""
        ...

    def fast_aggregate_verify(
        self, public_keys: Sequence[bytes], message: bytes, signature: bytes
    ) -> bool:
        """Whether ``signature`` aggregates signatures of ``message`` by all ``public_keys``.

        False (never an exception) for an empty or malformed key list. Each key must have
        passed :meth:`pop_verify` beforehand, or rogue-key attacks become possible.
        """
        ...

    def pop_prove(self, secret: bytes) -> bytes:
        """A 96-byte proof of possession of ``secret``; ValueError for an invalid secret."""
        ...

    def pop_verify(self, public_key: bytes, proof: bytes) -> bool:
        """Whether ``proof`` proves possession of the secret of ``public_key``; never raises."""
        ...


class PyEccBackend:
    """The ciphersuite on ``py_ecc.bls.G2ProofOfPossession`` (pure Python, reference)."""

    name: str = "py-ecc"

    def __init__(self) -> None:
        import sys

        # py_ecc raises the interpreter's recursion limit to 100,000 when imported. json's C
        # parser recurses once per nesting level and stops only at that limit: a peer's
        # 64 KiB record of '[' then overflowed the C stack (a segfault at 65,536 levels,
        # found through a test that crashed the suite), where the limit of 1,000 makes it a
        # RecursionError that the record's parser refuses. The limit is put back.
        limit = sys.getrecursionlimit()
        try:
            from eth_utils import ValidationError
            from py_ecc.bls import G2ProofOfPossession
            from py_ecc.bls.g2_primitives import signature_to_G2, subgroup_check
        finally:
            sys.setrecursionlimit(limit)

        self._scheme: Any = G2ProofOfPossession
        self._signature_to_g2: Any = signature_to_G2
        self._subgroup_check: Any = subgroup_check
        self._errors: tuple[type[BaseException], ...] = (
            ValidationError,
            ValueError,
            TypeError,
            AssertionError,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def public_key(self, secret: bytes) -> bytes:
        """The 48-byte public key of ``secret``; ValueError for an invalid secret."""
        return bytes(self._scheme.SkToPk(_secret_scalar(secret)))

    def sign(self, secret: bytes, message: bytes) -> bytes:
        """The 96-byte signature of ``message``; ValueError for an invalid secret."""
        return bytes(self._scheme.Sign(_secret_scalar(secret), bytes(message)))

    def verify(self, public_key: bytes, message: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is a signature of ``message`` by ``public_key``; never raises."""
        pk = _as_bytes(public_key, PUBLIC_KEY_BYTES)
        msg = _as_bytes(message)
        sig = _as_bytes(signature, SIGNATURE_BYTES)
        if pk is None or msg is None or sig is None:
            return False
        try:
            return bool(self._scheme.Verify(pk, msg, sig))
        except self._errors:
            return False

    def aggregate(self, signatures: Sequence[bytes]) -> bytes:
        """The sum of ``signatures``; ValueError if there are none or one is not valid.

        Unlike py-ecc's own ``Aggregate`` this also rejects points outside the prime-order
        subgroup, as blspy does (it costs one scalar multiplication per signature).
        """
        decoded = [_as_bytes(signature, SIGNATURE_BYTES) for signature in signatures]
        if not decoded:
            raise ValueError("cannot aggregate an empty list of signatures")
        checked: list[bytes] = []
        for sig in decoded:
            if sig is None:
                raise ValueError(f"a BLS signature is {SIGNATURE_BYTES} bytes")
            try:
                point = self._signature_to_g2(sig)
                valid = bool(self._subgroup_check(point))
            except self._errors as exc:
                raise ValueError(f"invalid BLS signature: {exc}") from exc
            if not valid:
                raise ValueError("invalid BLS signature: not in the G2 subgroup")
            checked.append(sig)
        try:
            return bytes(self._scheme.Aggregate(checked))
        except self._errors as exc:  # pragma: no cover - inputs were checked above
            raise ValueError(f"cannot aggregate: {exc}") from exc

    def fast_aggregate_verify(
        self, public_keys: Sequence[bytes], message: bytes, signature: bytes
    ) -> bool:
        """Whether ``signature`` aggregates signatures of ``message`` by all ``public_keys``.

        False (never an exception) for an empty or malformed key list. Each key must have
        passed :meth:`pop_verify` beforehand, or rogue-key attacks become possible.
        """
        try:
            keys = [_as_bytes(key, PUBLIC_KEY_BYTES) for key in public_keys]
        except TypeError:
            return False
        msg = _as_bytes(message)
        sig = _as_bytes(signature, SIGNATURE_BYTES)
        if not keys or msg is None or sig is None:
            return False
        checked = [key for key in keys if key is not None]
        if len(checked) != len(keys):
            return False
        try:
            return bool(self._scheme.FastAggregateVerify(checked, msg, sig))
        except self._errors:
            return False

    def pop_prove(self, secret: bytes) -> bytes:
        """A 96-byte proof of possession of ``secret``; ValueError for an invalid secret."""
        return bytes(self._scheme.PopProve(_secret_scalar(secret)))

    def pop_verify(self, public_key: bytes, proof: bytes) -> bool:
        """Whether ``proof`` proves possession of the secret of ``public_key``; never raises."""
        pk = _as_bytes(public_key, PUBLIC_KEY_BYTES)
        pop = _as_bytes(proof, SIGNATURE_BYTES)
        if pk is None or pop is None:
            return False
        try:
            return bool(self._scheme.PopVerify(pk, pop))
        except self._errors:
            return False


class BlspyBackend:
    """The ciphersuite on ``blspy.PopSchemeMPL`` (Chia's C++ library, fast).

    Raises ImportError on construction when blspy is not installed.
    """

    name: str = "blspy"

    def __init__(self) -> None:
        from blspy import G1Element, G2Element, PopSchemeMPL, PrivateKey

        self._scheme: Any = PopSchemeMPL
        self._private_key: Any = PrivateKey
        self._g1: Any = G1Element
        self._g2: Any = G2Element
        # blspy raises ValueError for bad encodings and invalid points, RuntimeError from a
        # few C++ paths, TypeError for wrong argument types.
        self._errors: tuple[type[BaseException], ...] = (ValueError, RuntimeError, TypeError)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def _key(self, secret: bytes) -> Any:
        # blspy accepts an all-zero secret; _secret_scalar rejects it (and r or more) first.
        _secret_scalar(secret)
        return self._private_key.from_bytes(bytes(secret))

    def _public_key_point(self, public_key: object) -> Any | None:
        """The G1 point of a valid, non-infinity public key; else None."""
        data = _as_bytes(public_key, PUBLIC_KEY_BYTES)
        if data is None:
            return None
        try:
            point = self._g1.from_bytes(data)
        except self._errors:
            return None
        # from_bytes accepts the point at infinity, which KeyValidate must refuse.
        if point == self._g1():
            return None
        return point

    def _signature_point(self, signature: object) -> Any | None:
        """The G2 point of a well-encoded subgroup signature (infinity included); else None."""
        data = _as_bytes(signature, SIGNATURE_BYTES)
        if data is None:
            return None
        try:
            return self._g2.from_bytes(data)
        except self._errors:
            return None

    def public_key(self, secret: bytes) -> bytes:
        """The 48-byte public key of ``secret``; ValueError for an invalid secret."""
        return bytes(self._key(secret).get_g1())

    def sign(self, secret: bytes, message: bytes) -> bytes:
        """The 96-byte signature of ``message``; ValueError for an invalid secret."""
        return bytes(self._scheme.sign(self._key(secret), bytes(message)))

    def verify(self, public_key: bytes, message: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is a signature of ``message`` by ``public_key``; never raises."""
        pk = self._public_key_point(public_key)
        msg = _as_bytes(message)
        sig = self._signature_point(signature)
        if pk is None or msg is None or sig is None:
            return False
        try:
            return bool(self._scheme.verify(pk, msg, sig))
        except self._errors:
            return False

    def aggregate(self, signatures: Sequence[bytes]) -> bytes:
        """The sum of ``signatures``; ValueError if there are none or one is not valid."""
        points = []
        for signature in signatures:
            data = _as_bytes(signature, SIGNATURE_BYTES)
            if data is None:
                raise ValueError(f"a BLS signature is {SIGNATURE_BYTES} bytes")
            try:
                points.append(self._g2.from_bytes(data))
            except self._errors as exc:
                raise ValueError(f"invalid BLS signature: {exc}") from exc
        if not points:
            raise ValueError("cannot aggregate an empty list of signatures")
        return bytes(self._scheme.aggregate(points))

    def fast_aggregate_verify(
        self, public_keys: Sequence[bytes], message: bytes, signature: bytes
    ) -> bool:
        """Whether ``signature`` aggregates signatures of ``message`` by all ``public_keys``.

        False (never an exception) for an empty or malformed key list. Each key must have
        passed :meth:`pop_verify` beforehand, or rogue-key attacks become possible.
        """
        try:
            keys = [self._public_key_point(key) for key in public_keys]
        except TypeError:
            return False
        msg = _as_bytes(message)
        sig = self._signature_point(signature)
        if not keys or msg is None or sig is None:
            return False
        points = [key for key in keys if key is not None]
        if len(points) != len(keys):
            return False
        try:
            return bool(self._scheme.fast_aggregate_verify(points, msg, sig))
        except self._errors:
            return False

    def pop_prove(self, secret: bytes) -> bytes:
        """A 96-byte proof of possession of ``secret``; ValueError for an invalid secret."""
        return bytes(self._scheme.pop_prove(self._key(secret)))

    def pop_verify(self, public_key: bytes, proof: bytes) -> bool:
        """Whether ``proof`` proves possession of the secret of ``public_key``; never raises."""
        pk = self._public_key_point(public_key)
        pop = self._signature_point(proof)
        if pk is None or pop is None:
            return False
        try:
            return bool(self._scheme.pop_verify(pk, pop))
        except self._errors:
            return False


_BACKENDS: dict[str, type[PyEccBackend] | type[BlspyBackend]] = {
    PyEccBackend.name: PyEccBackend,
    BlspyBackend.name: BlspyBackend,
}


@functools.cache
def backend_by_name(name: str) -> BlsBackend:
    """The (cached) backend called ``name``: ``"py-ecc"`` or ``"blspy"``.

    Raises ValueError for an unknown name and ImportError when its library is missing.
    """
    try:
        factory = _BACKENDS[name]
    except KeyError:
        known = ", ".join(sorted(_BACKENDS))
        raise ValueError(f"unknown BLS backend {name!r}; known: {known}") from None
    return factory()


@functools.cache
def default_backend() -> BlsBackend:
    """The (cached) preferred backend: blspy when it is importable, py-ecc otherwise."""
    try:
        return backend_by_name(BlspyBackend.name)
    except ImportError:
        return backend_by_name(PyEccBackend.name)
