"""blake3 Merkle trees over a set of records, with inclusion proofs.

Leaves are ``blake3(0x00 || record)``, sorted, so the root depends only on the *set* of records,
never on their order of arrival. Inner nodes are ``blake3(0x01 || left || right)``; the domain
bytes keep a leaf from ever being read as an inner node. A level with an odd count promotes its
last node unchanged (no duplication, so two different sets never share a root by padding).
The root of the empty set is ``blake3(0x02)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import blake3

_LEAF, _NODE, _EMPTY = b"\x00", b"\x01", b"\x02"


def leaf_hash(record: bytes) -> bytes:
    """The leaf of one record."""
    return blake3.blake3(_LEAF + record).digest()


def _parent(left: bytes, right: bytes) -> bytes:
    return blake3.blake3(_NODE + left + right).digest()


def _levels(leaves: list[bytes]) -> list[list[bytes]]:
    levels = [leaves]
    while len(levels[-1]) > 1:
        level = levels[-1]
        up = [_parent(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            up.append(level[-1])
        levels.append(up)
    return levels


def merkle_root(leaves: list[bytes]) -> bytes:
    """Root over leaf hashes (sorted here: callers may pass them in any order)."""
    if not leaves:
        return blake3.blake3(_EMPTY).digest()
    return _levels(sorted(leaves))[-1][0]


@dataclass(frozen=True)
class InclusionProof:
    """Where a leaf sits in a tree and the sibling hashes on its way to the root."""

    leaf: bytes
    index: int
    count: int
    path: tuple[bytes, ...]

    def to_json(self) -> dict[str, object]:
        """JSON-ready form (hex hashes)."""
        return {
            "leaf": self.leaf.hex(),
            "index": self.index,
            "count": self.count,
            "path": [h.hex() for h in self.path],
        }

    @classmethod
    def from_json(cls, data: object) -> InclusionProof:
        """The inverse of :meth:`to_json`; ValueError on anything malformed (a proof may come
        from a node's API, or a file: it is checked, not trusted)."""
        if not isinstance(data, dict) or set(data) != {"leaf", "index", "count", "path"}:
            raise ValueError("an inclusion proof has exactly leaf, index, count and path")
        index, count, path = data["index"], data["count"], data["path"]
        if not all(type(v) is int for v in (index, count)) or not isinstance(path, list):
            raise ValueError("an inclusion proof's index and count are integers, path a list")
        if len(path) > 64:  # a tree of 2**64 leaves is deeper than any ledger's
            raise ValueError("an inclusion proof's path is longer than any tree's")

        def digest(value: object) -> bytes:
            if not isinstance(value, str) or len(value) != 64:
                raise ValueError("an inclusion proof's hashes are 64 hex digits")
            return bytes.fromhex(value)

        return cls(digest(data["leaf"]), index, count, tuple(digest(h) for h in path))


def inclusion_proof(leaves: list[bytes], leaf: bytes) -> InclusionProof:
    """The proof that ``leaf`` is in the tree over ``leaves`` (raises KeyError if not)."""
    ordered = sorted(leaves)
    try:
        index = ordered.index(leaf)
    except ValueError:
        raise KeyError("leaf is not in the tree") from None
    path: list[bytes] = []
    position = index
    for level in _levels(ordered)[:-1]:
        sibling = position ^ 1
        if sibling < len(level):
            path.append(level[sibling])
        position //= 2
    return InclusionProof(leaf, index, len(ordered), tuple(path))


def verify_inclusion(proof: InclusionProof, root: bytes) -> bool:
    """True if ``proof`` leads from its leaf to ``root``."""
    if not 0 <= proof.index < proof.count:
        return False
    node, position, width, used = proof.leaf, proof.index, proof.count, 0
    while width > 1:
        sibling = position ^ 1
        if sibling < width:
            if used >= len(proof.path):
                return False
            other = proof.path[used]
            used += 1
            node = _parent(node, other) if position % 2 == 0 else _parent(other, node)
        position //= 2
        width = (width + 1) // 2
    return used == len(proof.path) and node == root
