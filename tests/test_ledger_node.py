"""The ledger inside running nodes (4 real peers in one process, py-libp2p on loopback):
stake, slashing by a fault proof, checkpoints with inclusion proofs. How prices move with
utilisation, interval by interval, is tested on virtual time (tests/test_virtual_time.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import trio

from mtor_p2p.identity import load_or_create_identity
from mtor_p2p.ledger.genesis import NANO, Genesis, LedgerParams
from mtor_p2p.ledger.merkle import InclusionProof, merkle_root, verify_inclusion
from mtor_p2p.ledger.pricing import PriceRule
from tests.test_compute import devnet, keep_in_play

RNG = np.random.default_rng(11)


def short_epoch_genesis(tmp_path, count: int) -> dict[str, object]:
    """Genesis giving each peer 100 credits, 2-second epochs and a fast price rule."""
    ids = [load_or_create_identity(tmp_path / f"peer-{i}").peer_id for i in range(count)]
    genesis = Genesis(
        "node-test",
        {peer: 100 * NANO for peer in ids},
        LedgerParams(
            epoch_seconds=2.0,
            checkpoint_delay=3.0,  # fault proofs travel by sync: give them a moment
            price_interval=0.5,
            price=PriceRule(damping=0.5, max_step=0.5),
        ),
    )
    path = tmp_path / "genesis.json"
    genesis.save(path)
    return {"genesis": path}


async def wait_for(predicate, timeout: float, what: str) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.1)


async def test_a_proven_cheater_is_slashed_on_every_peer_and_checkpoints_prove_receipts(
    tmp_path,
):
    changes = short_epoch_genesis(tmp_path, 4)
    # Fixed prices: on a slow machine the fast price rule would otherwise take an idle
    # worker's price so low that a shard costs under the ledger's unit and no receipt is
    # entered. How prices move is tested on virtual time (tests/test_virtual_time.py).
    per_node = {str(i): {**changes, "dynamic_price": False} for i in range(4)}
    per_node["1"]["fault_rate"] = 1.0  # peer 1 returns wrong results
    async with devnet(tmp_path, **per_node) as nodes:
        peers = [n for n, _ in nodes]
        requester, cheater = peers[0], peers[1]
        for node in peers:
            await node.ledger_service.stake(20 * NANO)
        await wait_for(
            lambda: all(sum(n.ledger.state().stakes.values()) == 80 * NANO for n in peers),
            15,
            "stakes everywhere",
        )
        # Stakes count for checkpoints from the next epoch on (weight is fixed at its start).
        await trio.sleep(2.1)
        proofs = []
        for _ in range(6):  # until the cheater has served (and been caught on) a shard
            keep_in_play(requester, cheater)
            operands = {
                "a": RNG.standard_normal((64, 32)).astype("float32"),
                "b": RNG.standard_normal((32, 16)).astype("float32"),
            }
            result = await requester.submit("matmul", operands, verify="freivalds", shards=6)
            proofs += result.fault_proofs
            if proofs:
                break
        assert proofs
        await requester.scheduler.settled()  # receipts enter the ledger after the result
        # The proofs reach every ledger by sync; each (one per wrong result) slashes half of
        # what the cheater has staked at that point, 20% of it to the reporter, 80% burned.
        await wait_for(
            lambda: all(n.ledger.count("fault") == len(proofs) for n in peers),
            30,
            "fault proofs everywhere",
        )
        stake, burned, reward = 20 * NANO, 0, 0
        for _ in proofs:
            slash = stake // 2
            stake, reward, burned = stake - slash, reward + slash // 5, burned + slash - slash // 5
        for node in peers:
            state = node.ledger.state()
            assert state.stakes[cheater.peer_id] == stake
            assert state.slashed[cheater.peer_id] == 20 * NANO - stake
            assert state.burned == burned
            assert state.total() == node.ledger.genesis.supply
        # Every peer agrees on every balance once the receipts have spread.
        await wait_for(
            lambda: len({repr(sorted(n.ledger.state().balances.items())) for n in peers}) == 1,
            30,
            "balances agree",
        )
        # The reporter got its share (and paid a little for the shards).
        own = requester.ledger.account(requester.peer_id)["balance"]
        assert 80 * NANO + reward - NANO // 1000 < own < 80 * NANO + reward

        # A checkpoint of the job's epoch, signed by the staked peers, proves each receipt.
        # (An epoch that holds only the stakes may be checkpointed first: under load the
        # jobs' receipts can fall in a later epoch, so wait for one that holds receipts.)
        def final_with_receipts() -> Any:
            ledger = requester.ledger
            for epoch in ledger.entry_epochs():
                for checkpoint in ledger.checkpoints(epoch):
                    if (
                        checkpoint.final
                        and checkpoint.matches
                        and ledger.epoch_receipts(checkpoint.entry.epoch)
                    ):
                        return checkpoint
            return None

        # Up to 90 s: an epoch is final once the staked peers' signatures have spread, and
        # on a machine running the suite beside a devnet and a benchmark (load 6-7) that took
        # over 30 s once; alone it takes a few seconds.
        await wait_for(
            lambda: final_with_receipts() is not None, 90, "a final checkpoint with receipts"
        )
        final = final_with_receipts()
        receipts = requester.ledger.epoch_receipts(final.entry.epoch)
        import blake3

        proof = requester.ledger.prove(blake3.blake3(b"R" + receipts[0]).hexdigest())
        path = InclusionProof(
            bytes.fromhex(proof["proof"]["leaf"]),
            proof["proof"]["index"],
            proof["proof"]["count"],
            tuple(bytes.fromhex(h) for h in proof["proof"]["path"]),
        )
        assert verify_inclusion(path, bytes.fromhex(final.entry.claim))
        assert merkle_root([]) != bytes.fromhex(final.entry.claim)
        for node in peers:
            report = node.ledger.verify()
            assert report["ok"], report["problems"]
