"""Redundant verification compares two workers' answers: a worker never answers a shard twice
(a hostile review, 2026-12-06: the hedge of a straggling shard went back to the worker that
had answered it, whose wrong answer then agreed with itself and was accepted, and paid twice).
Whole nodes on memnet under MockClock (the cluster of ``tests/test_virtual_time.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import trio
import trio.testing

from mtor_p2p.capacity.service import CapacityTiming
from mtor_p2p.compute.protocol import MAX_RUN_REQUEST_BYTES, PROTOCOL_RUN
from mtor_p2p.compute.scheduler import JobFailed
from mtor_p2p.node import NodeTiming
from mtor_p2p.records.arrays import unpack_view
from tests.test_virtual_time import cluster, trio_seed  # noqa: F401  (trio_seed: a fixture)

QUIET = NodeTiming(
    mesh_interval=3600.0,
    challenge_interval=None,
    capacity=CapacityTiming(ttl=3000.0, announce_interval=600.0),
)


def shard_of(request: bytes) -> int:
    header, _ = unpack_view(request)
    return int(header["shard"])


async def test_a_straggling_shard_is_not_hedged_to_the_worker_that_answered_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The liar answers shard 0 wrongly and at once; the honest worker is slow on it. The
    hedge that would have sent shard 0 back to the idle liar goes nowhere: the shard waits
    for the honest answer, the two disagree, the requester's own product decides, and the
    liar's answer is rejected. Every paid receipt is one worker's answer to one shard."""
    rng = np.random.default_rng(1)
    operands = {
        "a": rng.standard_normal((512, 250)).astype("float32"),
        "b": rng.standard_normal((250, 250)).astype("float32"),
    }
    async with cluster(["requester", "liar", "honest"], timing=QUIET) as c:
        liar = await c.start("liar", "WEU", price=1.0)
        honest = await c.start("honest", "WEU", price=1.0)
        requester = await c.start("requester", "WEU", serve=False)
        await c.settle()

        def corrupt(output: np.ndarray) -> np.ndarray:
            wrong = np.array(output, copy=True)
            wrong.reshape(-1)[0] += 100.0
            return wrong

        liar.worker._corrupt = corrupt  # type: ignore[method-assign]
        liar_runs: list[int] = []
        liar_answered_0 = trio.Event()
        liar_serve = liar.worker._on_run

        async def liar_run(sender: str, request: bytes):  # type: ignore[no-untyped-def]
            shard = shard_of(request)
            liar_runs.append(shard)
            liar.worker.fault_rate = 1.0 if shard == 0 else 0.0  # wrong on shard 0 only
            try:
                return await liar_serve(sender, request)
            finally:
                if shard == 0:
                    liar_answered_0.set()

        liar.network.handle(
            PROTOCOL_RUN, liar_run, max_request_bytes=MAX_RUN_REQUEST_BYTES, timeout=600
        )
        honest_serve = honest.worker._on_run

        async def honest_run(sender: str, request: bytes):  # type: ignore[no-untyped-def]
            if shard_of(request) == 0:  # a straggler on shard 0
                await liar_answered_0.wait()
                await trio.sleep(5)
            return await honest_serve(sender, request)

        honest.network.handle(
            PROTOCOL_RUN, honest_run, max_request_bytes=MAX_RUN_REQUEST_BYTES, timeout=600
        )

        result = await requester.submit(
            "matmul", operands, shards=2, verify="redundant", deadline=600
        )
        np.testing.assert_allclose(
            result.output, operands["a"] @ operands["b"], rtol=1e-4, atol=1e-3
        )
        assert liar_runs.count(0) == 1, liar_runs  # never hedged back to the liar
        assert result.rejected == 1  # the liar's wrong answer, found by the requester's product
        paid = [(s.index, s.worker) for s in result.shards] + [
            (r.body.shard, r.body.worker) for r in result.extra_receipts
        ]
        assert len(paid) == len(set(paid)) == result.receipts_paid
        assert (0, liar.peer_id) not in paid
        await requester.scheduler.settled()
        held = requester.receipts.receipts(job_id=result.job_id)
        assert sorted((r.body.shard, r.body.worker) for r in held) == sorted(paid)


async def test_two_wrong_answers_that_disagree_are_both_rejected_and_neither_accepted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two liars, wrong in different ways: the requester's own product rejects both, and the
    job fails for want of two agreeing workers rather than accept either (a hostile review
    found the first liar's answer accepted after both were rejected)."""
    rng = np.random.default_rng(1)
    operands = {
        "a": rng.standard_normal((256, 250)).astype("float32"),
        "b": rng.standard_normal((250, 250)).astype("float32"),
    }
    async with cluster(["requester", "liar1", "liar2"], timing=QUIET) as c:
        liars = [await c.start(name, "WEU", price=1.0) for name in ("liar1", "liar2")]
        requester = await c.start("requester", "WEU", serve=False)
        await c.settle()
        for node, delta in zip(liars, (100.0, -100.0), strict=True):

            def corrupt(output: np.ndarray, delta: float = delta) -> np.ndarray:
                wrong = np.array(output, copy=True)
                wrong.reshape(-1)[0] += delta
                return wrong

            node.worker._corrupt = corrupt  # type: ignore[method-assign]
            node.worker.fault_rate = 1.0
        with pytest.raises(JobFailed):
            await requester.submit("matmul", operands, shards=1, verify="redundant", deadline=600)
        await requester.scheduler.settled()
        # Nothing of the job was paid, and both liars were caught.
        assert requester.receipts.count() == 0
        for liar in liars:
            assert requester.scheduler.book.get(liar.peer_id).rejected == 1
