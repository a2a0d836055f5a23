"""Work on a shard's critical path (issue 9): each operand hashed once per side, verification
in the operands' precision, receipts group-committed and settled after the result, pipelined
shards. Whole jobs run on tests/test_virtual_time.py's memnet cluster under the mock clock.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing

import mtor_p2p.compute.worker as worker_module
import mtor_p2p.records.arrays as arrays
from tests.test_virtual_time import cluster

RNG = np.random.default_rng(9)


def count_hashing(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Count whole-array hashes (``content_hash``) and incremental upload hashers."""
    counts: Counter[str] = Counter()
    whole, incremental = arrays.content_hash, worker_module.content_hasher

    def counted_whole(array: np.ndarray) -> str:
        counts["whole"] += 1
        return whole(array)

    def counted_incremental(dtype: str, shape: Any) -> Any:
        counts["upload"] += 1
        return incremental(dtype, shape)

    monkeypatch.setattr(arrays, "content_hash", counted_whole)
    monkeypatch.setattr(worker_module, "content_hasher", counted_incremental)
    return counts


async def test_each_operand_is_hashed_once_per_side(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A one-shard job with both operands sent: the requester hashes A and B once (job ID,
    uploads and run request share the descriptions) and the output once (its check against
    the receipt); the worker hashes each upload once as it arrives and its output once."""
    async with cluster(["requester", "worker"]) as c:
        await c.start("worker", "WEU")
        requester = await c.start("requester", "WEU", serve=False)
        await c.settle()
        counts = count_hashing(monkeypatch)
        operands = {
            "a": RNG.standard_normal((64, 48)).astype("float32"),
            "b": RNG.standard_normal((48, 32)).astype("float32"),
        }
        result = await requester.submit("matmul", operands, shards=1, max_workers=1)
        np.testing.assert_allclose(result.output, operands["a"] @ operands["b"], rtol=1e-5)
        # requester: a, b, output; worker: output (its uploads hash incrementally).
        assert counts == {"whole": 4, "upload": 2}


async def test_a_shard_slice_is_hashed_once_however_many_attempts(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four shards: each slice of A is hashed once by the requester, B once for the job."""
    async with cluster(["requester", "worker"]) as c:
        await c.start("worker", "WEU")
        requester = await c.start("requester", "WEU", serve=False)
        await c.settle()
        counts = count_hashing(monkeypatch)
        operands = {
            "a": RNG.standard_normal((64, 48)).astype("float32"),
            "b": RNG.standard_normal((48, 32)).astype("float32"),
        }
        await requester.submit("matmul", operands, shards=4, max_workers=1)
        # requester: a and b for the job ID, 4 slices, 4 outputs; worker: 4 outputs.
        assert counts["whole"] == 2 + 4 + 4 + 4
        # worker: b once (resident afterwards) and each slice once.
        assert counts["upload"] == 1 + 4
