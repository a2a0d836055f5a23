"""The ledger's pure parts: Merkle trees, the price rule, the genesis file."""

from __future__ import annotations

import json

import blake3
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtor_p2p.ledger.genesis import Genesis, load_genesis
from mtor_p2p.ledger.merkle import (
    InclusionProof,
    inclusion_proof,
    leaf_hash,
    merkle_root,
    verify_inclusion,
)
from mtor_p2p.ledger.pricing import PriceRule, next_price
from mtor_p2p.wire import RecordError


def leaves(count: int) -> list[bytes]:
    return [leaf_hash(f"receipt {i}".encode()) for i in range(count)]


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33])
def test_every_leaf_proves_its_inclusion_and_nothing_else_does(count):
    tree = leaves(count)
    root = merkle_root(tree)
    for leaf in tree:
        proof = inclusion_proof(tree, leaf)
        assert verify_inclusion(proof, root)
        other = InclusionProof(leaf_hash(b"intruder"), proof.index, proof.count, proof.path)
        assert not verify_inclusion(other, root)
        if proof.path:
            bent = bytearray(proof.path[0])
            bent[0] ^= 1
            forged = InclusionProof(leaf, proof.index, proof.count, (bytes(bent), *proof.path[1:]))
            assert not verify_inclusion(forged, root)
            truncated = InclusionProof(leaf, proof.index, proof.count, proof.path[:-1])
            assert not verify_inclusion(truncated, root)
    with pytest.raises(KeyError):
        inclusion_proof(tree, leaf_hash(b"absent"))


@given(st.lists(st.binary(max_size=40), min_size=1, max_size=40, unique=True), st.randoms())
def test_the_root_depends_on_the_set_not_the_order(records, rng):
    hashed = [leaf_hash(r) for r in records]
    shuffled = hashed[:]
    rng.shuffle(shuffled)
    assert merkle_root(hashed) == merkle_root(shuffled)
    assert merkle_root(hashed[1:]) != merkle_root(hashed) or len(hashed) == 1


def test_leaves_and_inner_nodes_cannot_be_confused():
    a, b = leaf_hash(b"a"), leaf_hash(b"b")
    inner = merkle_root([a, b])
    # A "leaf" whose bytes are the two children is hashed with another domain byte.
    assert leaf_hash(min(a, b) + max(a, b)) != inner
    assert merkle_root([]) == blake3.blake3(b"\x02").digest()


RULE = PriceRule()


def test_price_holds_at_the_target_utilisation():
    assert next_price(2.0, RULE.target, RULE) == pytest.approx(2.0)


@given(
    st.floats(0.0, 2000, allow_nan=False),
    st.floats(0.0, 1.0, allow_nan=False),
    st.floats(0.0, 1.0, allow_nan=False),
)
def test_price_rule_is_bounded_damped_and_monotone(price, low, high):
    low, high = sorted((low, high))
    p_low, p_high = next_price(price, low, RULE), next_price(price, high, RULE)
    for p in (p_low, p_high):
        assert RULE.floor <= p <= RULE.ceiling
    assert p_low <= p_high  # busier never means cheaper
    inside = min(RULE.ceiling, max(RULE.floor, price))
    # One step moves the price by at most max_step of itself (before clamping).
    assert p_high <= max(RULE.floor, inside * (1 + RULE.max_step)) + 1e-9
    assert p_low >= min(RULE.ceiling, inside * (1 - RULE.max_step)) - 1e-9


def test_a_saturated_worker_rises_and_an_idle_one_falls_to_the_floor():
    busy = idle = 1.0
    for _ in range(200):
        busy, idle = next_price(busy, 1.0, RULE), next_price(idle, 0.0, RULE)
    assert busy == RULE.ceiling and idle == RULE.floor


@pytest.mark.parametrize(
    "change",
    [
        {"t": "mtor/other"},
        {"v": 2},
        {"allocations": {"not-a-peer": 5}},
        {"allocations": {"12D3KooWK99VoVxNE7XzyBwXEzW7xhK7Gpv85r9F3V3fyKSUKPH5": -1}},
        {"params": {"slash_bps": 10_001}},
        {"params": {"price": {"target": 1.5}}},
        {"params": {"surprise": 1}},
        {"extra": True},
    ],
)
def test_bad_genesis_files_are_refused(tmp_path, change):
    obj = load_genesis().to_json()
    for key, value in change.items():
        obj[key] = value
    path = tmp_path / "genesis.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(RecordError):
        load_genesis(path)


def test_genesis_hash_changes_with_any_parameter():
    base = load_genesis()
    obj = base.to_json()
    obj["params"]["credit_limit"] += 1
    assert Genesis.from_json(obj).hash != base.hash
