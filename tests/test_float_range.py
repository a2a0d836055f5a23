"""Operands whose products leave float32's normal range: honest answers are never a fault.

A hostile review (2026-12-07) chose operands whose exact product overflows float32 (1e20 x
1e20) or falls below its normal range (1e-22 x 1e-22): the honest float32 answer (inf, or
subnormals) passed as a fault proof against its worker, slashing its stake, and an honest
requester with such data rejected its honest workers and sent fault proofs against them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from mtor_kernels import get_kernel
from mtor_kernels import verify as checks
from mtor_kernels.base import FLOAT32_TINY
from mtor_p2p.compute.scheduler import JobFailed
from tests.products import assert_product_close
from tests.test_virtual_time import cluster

MATMUL = get_kernel("matmul")


def _operands(scale: float, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "a": (rng.uniform(1, 2, (64, 64)) * scale).astype(np.float32),
        "b": (rng.uniform(1, 2, (64, 64)) * scale).astype(np.float32),
    }


def _answer_changed(device: Any, change: Callable[[np.ndarray], None]) -> None:
    """Make a simulated worker's device ``change`` each honest answer (in place) before it
    is returned: a cheater, or an honest worker of another summation order."""
    honest_execute = device.execute

    async def execute(kernel: Any, operands: Any, keys: Any) -> np.ndarray:
        out = np.array(await honest_execute(kernel, operands, keys), copy=True)
        change(out)
        return out

    device.execute = execute


def _honest(operands: dict[str, np.ndarray]) -> np.ndarray:
    with np.errstate(all="ignore"):
        return MATMUL.reference(operands)


@pytest.mark.parametrize("scale", [1e20, 1e-22], ids=["overflow", "subnormal"])
def test_an_honest_answer_out_of_range_proves_no_fault(scale):
    operands = _operands(scale)
    honest = _honest(operands)
    verdict = checks.judge_rows(MATMUL, operands, honest, list(range(8)))
    assert not verdict.proven
    result = checks.sample_rows(MATMUL, operands, honest, samples=16, rng=np.random.default_rng(3))
    assert result.ok, result.max_error


def test_out_of_range_rows_are_marked_and_in_range_rows_still_prove_a_fault():
    operands = _operands(1e20)
    assert checks.judge_rows(MATMUL, operands, _honest(operands), [0]).out_of_range
    normal = _operands(1.0)
    wrong = _honest(normal)
    wrong[3, 5] += 1.0
    verdict = checks.judge_rows(MATMUL, normal, wrong, [3])
    assert verdict.proven and not verdict.out_of_range
    nan = _honest(normal)
    nan[2, 0] = np.nan  # NaN where the exact value is finite: still a fault in range
    assert checks.judge_rows(MATMUL, normal, nan, [2]).proven


def test_freivalds_passes_an_honest_subnormal_answer():
    operands = _operands(1e-22)
    result = checks.freivalds(
        operands["a"], operands["b"], _honest(operands), rounds=20, rng=np.random.default_rng(2)
    )
    assert result.ok, result.max_error


def test_a_device_that_flushes_subnormal_inputs_is_not_proven_wrong():
    # a holds subnormal entries, b large ones: their products are normal numbers, which a
    # device reading subnormal inputs as zero (DAZ) loses whole.
    rng = np.random.default_rng(4)
    a = rng.uniform(1, 2, (16, 32)).astype(np.float32)
    a[:8] = np.float32(FLOAT32_TINY / 8)  # rows 0-7 all subnormal: their products are lost
    b = (rng.uniform(1, 2, (32, 16)) * 1e30).astype(np.float32)
    flushed = np.where(np.abs(a) < FLOAT32_TINY, 0, a).astype(np.float32) @ b
    operands = {"a": a, "b": b}
    assert not checks.judge_rows(MATMUL, operands, flushed, list(range(16))).proven
    # ... while an error of the size of those products elsewhere is a fault.
    wrong = _honest(operands)
    wrong[8, 0] *= 1.001
    assert checks.judge_rows(MATMUL, operands, wrong, [8]).proven


async def test_a_job_out_of_float32s_range_fails_without_blaming_its_workers():
    async with cluster(["requester", "w1", "w2"]) as c:
        w1 = await c.start("w1", "WEU")
        w2 = await c.start("w2", "WEU")
        requester = await c.start("requester", "WEU", serve=False)
        await c.settle()
        with np.errstate(all="ignore"), pytest.raises(JobFailed, match="cannot be verified"):
            await requester.submit("matmul", _operands(1e20), shards=2)
        assert requester.scheduler.stats.fault_proofs == 0
        report = requester.scheduler.book.report(requester.clock.now())
        for worker in (w1, w2):
            row = next((r for r in report if r["peer_id"] == worker.peer_id), {})
            assert not row.get("excluded"), row
        # The same cluster still serves a job in range.
        result = await requester.submit("matmul", _operands(1.0), shards=2)
        assert_product_close(result.output, _honest(_operands(1.0)))


def test_a_finite_wrong_value_where_the_sums_may_overflow_is_still_proven():
    # A partial sum that overflowed stays ±inf or NaN: a finite answer there is judged by
    # the usual bound (a second review: any finite value passed, 3e38 for -5.6e30).
    operands = _operands(1.0)
    operands["a"][:, :2] = 1e19  # |products| of 2e38 each: their sum reaches the range
    operands["b"][0, :] = 2e19
    operands["b"][1, :] = -2e19  # ... while the exact values stay finite
    honest = _honest(operands)
    assert np.isfinite(honest).all()
    assert not checks.judge_rows(MATMUL, operands, honest, [0]).proven
    wrong = honest.copy()
    wrong[0, 3] = 3e38
    assert checks.judge_rows(MATMUL, operands, wrong, [0]).proven


def test_attention_scores_that_overflow_before_scaling_do_not_frame_an_honest_worker():
    # NumPy's backend scales the scores after the product: raw scores of 1e39 overflow
    # there although the scaled ones (1.25e38) would not (a second review).
    attention = get_kernel("attention")
    q = np.full((1, 1, 3, 64), 1e19, np.float32)
    k = np.full((1, 1, 3, 64), 1e20 / 64, np.float32)
    v = np.ones((1, 1, 3, 1), np.float32)
    operands = {"q": q, "k": k, "v": v}
    with np.errstate(all="ignore"):
        honest = attention.reference(operands)
    assert not checks.judge_rows(attention, operands, honest, [0]).proven


async def test_a_cheater_cannot_hide_a_wrong_row_behind_an_overflowing_one():
    async with cluster(["requester", "cheater"]) as c:
        await c.start("cheater", "WEU")
        requester = await c.start("requester", "WEU", serve=False)
        await c.settle()

        def hide(out: np.ndarray) -> None:
            out[0, 0] = np.inf  # where overflow is possible: Freivalds' worst row
            out[5, 2] += 1.0  # the fault it would hide

        _answer_changed(c.peers["cheater"].device, hide)
        operands = _operands(1.0)
        operands["a"][0, :] = 3e18
        operands["b"][:, 0] = np.where(np.arange(64) % 2, 3e18, -3e18).astype(np.float32)
        with np.errstate(all="ignore"), pytest.raises(JobFailed, match="wrong result"):
            await requester.submit("matmul", operands, shards=1)
        assert requester.scheduler.stats.fault_proofs == 1


async def test_redundant_verification_does_not_blame_nan_where_the_sums_may_overflow():
    # Two workers' honest orders may differ there: one inf, the other NaN. The requester's
    # own product confirms the first; the second is neither accepted nor blamed.
    async with cluster(["requester", "w1", "w2"]) as c:
        await c.start("w1", "WEU")
        await c.start("w2", "WEU")
        requester = await c.start("requester", "WEU", serve=False)
        await c.settle()

        def nan_for_inf(out: np.ndarray) -> None:
            out[~np.isfinite(out)] = np.nan

        _answer_changed(c.peers["w2"].device, nan_for_inf)
        operands = _operands(1e20)
        with np.errstate(all="ignore"):
            result = await requester.submit("matmul", operands, shards=1, verify="redundant")
        assert np.array_equal(result.output, _honest(operands), equal_nan=True)
        assert requester.scheduler.stats.fault_proofs == 0
        report = requester.scheduler.book.report(requester.clock.now())
        assert not any(row.get("excluded") for row in report)


def _mlp_with_a_hidden_unit_near_the_limit(seed: int = 0) -> dict[str, np.ndarray]:
    """An MLP whose hidden unit 0 is about -1e38 on every row: GELU's float32 evaluation
    cancels there (``h (1 + tanh(...)) / 2``), so an honest output may be off by ~1e31."""
    rng = np.random.default_rng(seed)
    b1 = np.zeros(4, np.float32)
    b1[0] = -1e38
    return {
        "x": rng.standard_normal((8, 16)).astype(np.float32),
        "w1": rng.standard_normal((16, 4)).astype(np.float32),
        "b1": b1,
        "w2": rng.standard_normal((4, 8)).astype(np.float32),
        "b2": rng.standard_normal(8).astype(np.float32),
    }


def test_a_bound_too_wide_to_judge_is_not_a_pass():
    # A second review (2026-12-07): any output passed the sampled check of such an MLP, and
    # the requester was not told. Now the rows are loose: the check fails without proving
    # anything, and judging them says they are out of range (the job cannot be verified).
    mlp = get_kernel("mlp")
    operands = _mlp_with_a_hidden_unit_near_the_limit()
    expected = mlp.expected_rows(operands, list(range(8)))
    assert expected.loose().all()
    wrong = (expected.values + 1000.0).astype(np.float32)
    result = checks.sample_rows(mlp, operands, wrong, samples=4, rng=np.random.default_rng(1))
    assert not result.ok and result.bad_rows.size == 0 and result.loose_rows.size == 4
    verdict = checks.judge_rows(mlp, operands, wrong, [0, 1])
    assert verdict.out_of_range and not verdict.proven
    # Ordinary operands of the same shapes are judged as before: not loose, a wrong row caught.
    ordinary = _mlp_with_a_hidden_unit_near_the_limit()
    ordinary["b1"][0] = 0.5
    expected = mlp.expected_rows(ordinary, list(range(8)))
    assert not expected.loose().any()
    wrong = expected.values.astype(np.float32)
    wrong[3, 1] += 1.0
    verdict = checks.judge_rows(mlp, ordinary, wrong, [3])
    assert verdict.proven and not verdict.out_of_range


async def test_a_job_whose_bound_is_too_wide_fails_without_blaming_its_worker():
    async with cluster(["requester", "w1"]) as c:
        w1 = await c.start("w1", "WEU")
        requester = await c.start("requester", "WEU", serve=False)
        await c.settle()
        with np.errstate(all="ignore"), pytest.raises(JobFailed, match="cannot be verified"):
            await requester.submit(
                "mlp", _mlp_with_a_hidden_unit_near_the_limit(), shards=1, verify="sample"
            )
        assert requester.scheduler.stats.fault_proofs == 0
        report = requester.scheduler.book.report(requester.clock.now())
        row = next((r for r in report if r["peer_id"] == w1.peer_id), {})
        assert not row.get("excluded"), row
        # Its work is paid: the operands, not the worker, are at fault (a review: a requester
        # could choose such operands, keep the bytes it received and pay nobody).
        await requester.scheduler.settled()
        assert requester.scheduler.stats.paid_unjudgeable == 1
        paid = [r.body.worker for r in requester.receipts.receipts(limit=10)]
        assert paid == [w1.peer_id]
