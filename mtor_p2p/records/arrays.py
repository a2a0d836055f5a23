"""Arrays on the wire: content hashes, framing and a bounded operand cache.

Operands are content-addressed by the blake3 hash of their C-order bytes together with their
dtype and shape, so the same bytes with another shape are another operand. A message is a
4-byte header length, a canonical JSON header and a raw binary body.
"""

from __future__ import annotations

import math
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import blake3
import numpy as np

from mtor_p2p.network import Gathered
from mtor_p2p.wire import RecordError, canonical_json, parse_canonical

#: dtypes accepted on the wire; anything else is refused before it is allocated.
WIRE_DTYPES = ("float16", "float32", "float64", "int8", "int32", "int64")
MAX_HEADER_BYTES = 16 * 1024
MAX_DIMS = 6
_HEADER_LENGTH = struct.Struct(">I")
#: The body of a message made by :func:`pack_gathered` (a run request's operands, a shard's
#: output) starts this many bytes into the message, or a multiple of it: CPython allocates
#: ``bytes`` and ``bytearray`` data 16-byte aligned, so the body starts 16-byte aligned and the
#: arrays viewed in place in it are aligned for their dtype (operands after the first follow
#: at whole elements: aligned, though not always to 16). Unaligned, three messages in four,
#: NumPy copied them for every product (a 512² product 2.94 -> 3.16-3.26 ms, the check's row
#: norms 0.06 -> 0.12 ms, measured).
BODY_ALIGNMENT = 16
#: The header field that pads it there (sorted last; receivers ignore fields they do not read).
PAD_FIELD = "~pad"


@dataclass(frozen=True)
class ArrayMeta:
    """Identity and layout of an operand: its content hash, dtype and shape."""

    digest: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Size of the array's data in bytes (exact: Python integers, never an overflowed
        int64; and a tenth of the time NumPy's ``prod`` took, asked several times a shard)."""
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"hash": self.digest, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, obj: Any, *, max_bytes: int) -> ArrayMeta:
        """Validate a header entry; refuse unknown dtypes, odd shapes and oversized arrays."""
        if not isinstance(obj, dict) or set(obj) != {"hash", "dtype", "shape"}:
            raise RecordError("array must be described by hash, dtype and shape")
        digest, dtype, shape = obj["hash"], obj["dtype"], obj["shape"]
        if not isinstance(digest, str) or len(digest) != 64:
            raise RecordError("array hash must be 64 hex characters")
        if dtype not in WIRE_DTYPES:
            raise RecordError(f"dtype {dtype!r} is not accepted")
        if (
            not isinstance(shape, list)
            or not 0 < len(shape) <= MAX_DIMS
            or not all(
                isinstance(d, int) and not isinstance(d, bool) and 0 < d < 2**31 for d in shape
            )
        ):
            raise RecordError("shape must be 1-6 positive dimensions")
        meta = cls(digest, dtype, tuple(shape))
        if meta.nbytes > max_bytes:
            raise RecordError(f"array of {meta.nbytes} bytes exceeds the limit of {max_bytes}")
        return meta


#: Arrays at least this large are hashed off the event loop (through the runtime's blocking
#: hook) by the services that hash them: blake3 runs at about 3 GB/s on one core, so 4 MiB
#: costs ~1.3 ms, longer than a thread hop.
HASH_OFF_LOOP_BYTES = 4 << 20


def content_hasher(dtype: str, shape: tuple[int, ...] | list[int]) -> Any:
    """A blake3 hasher primed with an array's dtype and shape: feed it the C-order bytes (in
    any number of pieces, e.g. upload chunks as they arrive) to get :func:`content_hash`."""
    return blake3.blake3(f"{dtype}{list(shape)}".encode())


def content_hash(array: np.ndarray) -> str:
    """blake3 over dtype, shape and C-order bytes."""
    array = np.ascontiguousarray(array)
    hasher = content_hasher(array.dtype.name, array.shape)
    hasher.update(memoryview(array).cast("B"))
    return hasher.hexdigest()


def meta_of(array: np.ndarray) -> ArrayMeta:
    """The wire description of ``array`` (hashes it: compute it once per array and pass the
    result along, rather than calling this again where the array goes)."""
    return ArrayMeta(content_hash(array), array.dtype.name, tuple(array.shape))


def array_from_bytes(meta: ArrayMeta, data: bytes | bytearray | memoryview) -> np.ndarray:
    """Rebuild an array from its bytes, refusing data whose hash does not match ``meta``.

    No copy: the array is a view of ``data`` (read-only when ``data`` is ``bytes``)."""
    array = _array_view(meta, data)
    check_hash(meta, array)
    return array


def array_view_unhashed(meta: ArrayMeta, data: bytes | bytearray | memoryview) -> np.ndarray:
    """The array ``meta`` describes, a view of ``data`` with its size checked but not its
    hash: nothing in it may be trusted until :func:`check_hash` has passed (a requester
    hashes an answer beside its check, on a thread)."""
    return _array_view(meta, data)


def check_hash(meta: ArrayMeta, array: np.ndarray) -> None:
    """Raise RecordError unless ``array`` hashes to ``meta``'s digest."""
    digest = content_hash(array)
    if digest != meta.digest:
        raise RecordError(f"hash mismatch: announced {meta.digest[:16]}…, got {digest[:16]}…")


def array_from_hashed_bytes(
    meta: ArrayMeta, data: bytes | bytearray | memoryview, digest: str
) -> np.ndarray:
    """Like :func:`array_from_bytes` for bytes already hashed as they arrived (``digest``:
    what :func:`content_hasher` fed with them gave), so that they are not hashed twice."""
    if digest != meta.digest:
        raise RecordError(f"hash mismatch: announced {meta.digest[:16]}…, got {digest[:16]}…")
    return _array_view(meta, data)


def _array_view(meta: ArrayMeta, data: bytes | bytearray | memoryview) -> np.ndarray:
    if len(data) != meta.nbytes:
        raise RecordError(f"expected {meta.nbytes} bytes for the array, got {len(data)}")
    return np.frombuffer(data, dtype=meta.dtype).reshape(meta.shape)


def pack(header: dict[str, Any], body: bytes | bytearray | memoryview = b"") -> bytes:
    """Frame a canonical JSON header and a binary body (any bytes-like object: a memoryview
    of an array is copied once, into the message, and nowhere else)."""
    return pack_parts(header, (body,))


def pack_parts(header: dict[str, Any], parts: Sequence[bytes | bytearray | memoryview]) -> bytes:
    """:func:`pack` with a body made of ``parts`` one after another (each copied once)."""
    return b"".join((_framed_header(header), *parts))


def pack_gathered(
    header: dict[str, Any], parts: Sequence[bytes | bytearray | memoryview]
) -> Gathered:
    """:func:`pack_parts` without the join: the framed header, then ``parts`` as they are
    (referenced, not copied; see :class:`~mtor_p2p.network.Gathered`). The body starts at a
    multiple of :data:`BODY_ALIGNMENT` (the header padded by :data:`PAD_FIELD`), unless the
    padding would take the header past MAX_HEADER_BYTES."""
    return Gathered((_framed_header(header, aligned=True), *parts))


def _framed_header(header: dict[str, Any], *, aligned: bool = False) -> bytes:
    """A message's header as it leads the message: its length, then its canonical JSON;
    ``aligned``: padded so that what follows starts at a multiple of BODY_ALIGNMENT."""
    head = canonical_json(header)
    if aligned and (_HEADER_LENGTH.size + len(head)) % BODY_ALIGNMENT:
        # The field adds '"~pad":"' and '"' (9 bytes), a comma unless the header is empty,
        # and one byte per space: its length is known before it is encoded, once.
        field = len(PAD_FIELD) + 5 + (1 if header else 0)
        short = -(_HEADER_LENGTH.size + len(head) + field) % BODY_ALIGNMENT
        if len(head) + field + short <= MAX_HEADER_BYTES:  # else unpadded: still valid
            head = canonical_json({**header, PAD_FIELD: " " * short})
    return _HEADER_LENGTH.pack(len(head)) + head


def as_bytes(array: np.ndarray) -> memoryview:
    """A C-contiguous array's bytes as a flat view (a non-contiguous one is copied first)."""
    return memoryview(np.ascontiguousarray(array)).cast("B")


def unpack(data: bytes) -> tuple[dict[str, Any], bytes]:
    """Split a framed message into its header (validated JSON object) and body."""
    header, body = unpack_view(data)
    return header, bytes(body)


def unpack_view(data: bytes) -> tuple[dict[str, Any], memoryview]:
    """:func:`unpack` with the body as a view of ``data``, not a copy (operand chunks and
    shard outputs of megabytes: each copy of a fresh buffer costs its page faults too)."""
    if len(data) < _HEADER_LENGTH.size:
        raise RecordError("message too short")
    (length,) = _HEADER_LENGTH.unpack_from(data)
    if length > MAX_HEADER_BYTES or _HEADER_LENGTH.size + length > len(data):
        raise RecordError("header length is out of bounds")
    header = parse_canonical(data[4 : 4 + length], max_bytes=MAX_HEADER_BYTES)
    if not isinstance(header, dict):
        raise RecordError("header must be a JSON object")
    return header, memoryview(data)[4 + length :]


#: What the store counts at least for one entry, however small its array: the array object,
#: its slot and its upload's records cost about this much (a hostile review: 20,000 uploads of
#: one element each held 74 MiB for 80 KB counted, with no bound on their number).
ENTRY_OVERHEAD_BYTES = 4096


def _counted(array: np.ndarray) -> int:
    return max(int(array.nbytes), ENTRY_OVERHEAD_BYTES)


class OperandStore:
    """Operands held by a worker (or requester), least recently used evicted beyond a budget.

    Each entry counts its bytes, and at least :data:`ENTRY_OVERHEAD_BYTES`: the budget bounds
    the number of entries too."""

    def __init__(self, max_bytes: int = 2 << 30) -> None:
        self.max_bytes = max_bytes
        self._arrays: OrderedDict[str, np.ndarray] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def put(self, array: np.ndarray, digest: str | None = None) -> str:
        """Store ``array`` (read-only) and return its hash."""
        digest = digest or content_hash(array)
        if digest in self._arrays:
            self._arrays.move_to_end(digest)
            return digest
        if array.nbytes > self.max_bytes:
            raise RecordError("operand is larger than the whole cache")
        array = np.ascontiguousarray(array)
        array.flags.writeable = False
        self._arrays[digest] = array
        self._bytes += _counted(array)
        while self._bytes > self.max_bytes:
            _, evicted = self._arrays.popitem(last=False)
            self._bytes -= _counted(evicted)
        return digest

    def get(self, digest: str) -> np.ndarray | None:
        """The array with ``digest``, or None."""
        array = self._arrays.get(digest)
        if array is None:
            self.misses += 1
            return None
        self.hits += 1
        self._arrays.move_to_end(digest)
        return array

    def peek(self, digest: str) -> np.ndarray | None:
        """The array with ``digest``, or None, without counting a hit or a miss or moving it
        in the eviction order (for bookkeeping, not for use)."""
        return self._arrays.get(digest)

    def replace(self, digest: str, old: np.ndarray, new: np.ndarray | None) -> None:
        """Put ``new`` (an array of the same bytes) in the place of ``old`` if ``digest`` still
        holds ``old``; drop it if ``new`` is None. Nothing otherwise (evicted meanwhile)."""
        if self._arrays.get(digest) is not old:
            return
        if new is None:
            self.discard(digest)
            return
        if new.nbytes != old.nbytes or not new.flags.c_contiguous:
            raise ValueError("a replacement must be a contiguous array of the same size")
        new.flags.writeable = False
        self._arrays[digest] = new

    def discard(self, digest: str) -> None:
        """Forget an array (no error if absent)."""
        array = self._arrays.pop(digest, None)
        if array is not None:
            self._bytes -= _counted(array)

    def __contains__(self, digest: object) -> bool:
        return digest in self._arrays

    @property
    def nbytes(self) -> int:
        """Bytes currently held (each entry at least ENTRY_OVERHEAD_BYTES)."""
        return self._bytes
