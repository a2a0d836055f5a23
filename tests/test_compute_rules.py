"""Compute splits by ledger rules as the ledger does (mtor_p2p.ledger.names.LEDGER_RULES).

Peers of other rules do not hear each other's ledgers, so a receipt between them would be
paid in two ledgers that never meet. A requester therefore schedules only workers whose
capacity records state its rules, and says why it passed the others over; a worker refuses
a run from a requester of other rules (tests/test_worker_attacks.py). Real nodes on memnet
under virtual time (tests/test_virtual_time.py's cluster).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import trio
import trio.testing

from mtor_p2p.capacity.record import CapacityRecord
from mtor_p2p.capacity.view import CapacityQuery
from mtor_p2p.ledger.names import LEDGER_RULES
from tests.test_virtual_time import (  # noqa: F401 (trio_seed: a fixture, autouse there)
    cluster,
    shard_operands,
    trio_seed,
)


async def test_a_worker_of_other_ledger_rules_gets_no_shards(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A worker that states rules 1 (as every version before schema-3 records does: its
    records read as rules 1, tests/test_records.py) stays in the view but gets no shard; the
    plan note names the rules, and the default capacity query leaves it out."""
    async with cluster(["w1", "requester", "old"]) as c:
        w1 = await c.start("w1", "WEU")
        requester = await c.start("requester", "WEU", serve=False)
        old = await c.start("old", "WEU")
        await c.settle()
        build = old.capacity._build

        def as_rules_1(*args: Any, **kwargs: Any) -> CapacityRecord:
            return dataclasses.replace(build(*args, **kwargs), ledger_rules=1)

        old.capacity._build = as_rules_1  # type: ignore[method-assign]
        await old.capacity.announce()

        def seen_rules() -> int:
            live = requester.capacity.view.live(requester.clock.now())
            return next(r.ledger_rules for r in live if r.peer_id == old.peer_id)

        with trio.fail_after(30):
            while seen_rules() != 1:
                await trio.sleep(0.1)
        operands = shard_operands()
        result = await requester.submit("matmul", operands, shards=4)
        np.testing.assert_allclose(result.output, operands["a"] @ operands["b"], rtol=1e-4)
        now = requester.clock.now()
        found = {r.peer_id for r in requester.capacity.view.query(CapacityQuery(), now)}
        everyone = CapacityQuery(ledger_rules=None)
        found_all = {r.peer_id for r in requester.capacity.view.query(everyone, now)}

    note = requester.scheduler.plans[-1]
    assert note.chosen == (w1.peer_id,)
    category, detail = note.passed_over[old.peer_id]
    assert category == "ledger rules"
    assert f"follows ledger rules 1, this node {LEDGER_RULES}" in detail
    assert old.worker.stats.shards_run == 0 and w1.worker.stats.shards_run == 4
    assert old.peer_id not in found and w1.peer_id in found
    assert old.peer_id in found_all
