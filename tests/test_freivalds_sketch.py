"""A job's shards share one Freivalds sketch of B (kernels/verify.py ``freivalds_sketch``):
the pass over B in float64 is made once per job instead of once per shard."""

from __future__ import annotations

import numpy as np
import pytest

from mtor_kernels import verify as checks
from mtor_kernels.base import KernelError


def blocks(seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    b = rng.standard_normal((256, 192), dtype=np.float32)
    return b, [rng.standard_normal((64, 256), dtype=np.float32) for _ in range(4)]


def test_a_shared_sketch_passes_every_honest_block_and_catches_a_wrong_one() -> None:
    b, row_blocks = blocks()
    sketch = checks.freivalds_sketch(b, rounds=20, rng=np.random.default_rng(1))
    for a in row_blocks:
        result = checks.freivalds(
            a, b, a @ b, rounds=20, rng=np.random.default_rng(2), sketch=sketch
        )
        assert result.ok, result.max_error
    a = row_blocks[0]
    wrong = a @ b
    wrong[5, 7] += 0.25 * float(np.sqrt(np.mean(wrong[5] ** 2)))
    result = checks.freivalds(a, b, wrong, rounds=20, rng=np.random.default_rng(3), sketch=sketch)
    assert not result.ok and result.row == 5


def test_with_or_without_a_sketch_the_verdict_and_margin_are_the_same() -> None:
    b, row_blocks = blocks(4)
    a = row_blocks[1]
    c = a @ b
    alone = checks.freivalds(a, b, c, rounds=8, rng=np.random.default_rng(9))
    sketch = checks.freivalds_sketch(b, rounds=8, rng=np.random.default_rng(9))
    shared = checks.freivalds(a, b, c, rounds=8, rng=np.random.default_rng(0), sketch=sketch)
    assert alone.ok and shared.ok
    assert shared.max_error == pytest.approx(alone.max_error)


def test_a_sketch_of_another_shape_or_round_count_is_refused() -> None:
    b, row_blocks = blocks()
    sketch = checks.freivalds_sketch(b, rounds=20, rng=np.random.default_rng(1))
    a = row_blocks[0]
    with pytest.raises(KernelError):
        checks.freivalds(a, b, a @ b, rounds=10, rng=np.random.default_rng(2), sketch=sketch)
    other = np.ones((256, 100), np.float32)
    with pytest.raises(KernelError):
        checks.freivalds(
            a, other, a @ other, rounds=20, rng=np.random.default_rng(2), sketch=sketch
        )


def test_a_sketch_cannot_be_changed_in_place() -> None:
    """Every check of a job reads the same sketch (on threads too): its arrays are read-only,
    so R and its float32 copy, or z and its copy, cannot drift apart."""
    b = np.random.default_rng(3).standard_normal((32, 24), dtype=np.float32)
    sketch = checks.freivalds_sketch(b, rounds=4, rng=np.random.default_rng(1))
    for array in (sketch.signs, sketch.z, sketch.z_norms, sketch.vectors32, sketch.z32):
        with pytest.raises(ValueError, match="read-only"):
            array[0] = 0


def test_a_side_made_ahead_for_all_rows_gives_each_block_the_same_verdict_and_margin() -> None:
    """A's side of the check (``freivalds_rows``) made once for the whole A, before any answer,
    then cut to each shard's rows: the same verdicts and margins as the check making it
    itself, a wrong element still caught, and rows of another size refused."""
    b, row_blocks = blocks(5)
    a = np.concatenate(row_blocks)
    sketch = checks.freivalds_sketch(b, rounds=20, rng=np.random.default_rng(1))
    ahead = checks.freivalds_rows(a, sketch)
    assert ahead is not None
    for index, block in enumerate(row_blocks):
        rows = ahead.rows(64 * index, 64 * (index + 1))
        c = block @ b
        kw = {"rounds": 20, "rng": np.random.default_rng(2), "sketch": sketch}
        made_here = checks.freivalds(block, b, c, **kw)
        with_rows = checks.freivalds(block, b, c, rows=rows, **kw)
        assert made_here.ok and with_rows.ok
        # The rows cut from A's side are this block's: the same parts as made for the block
        # alone, up to float32 rounding (BLAS may sum a block of 64 rows and all 320 in
        # different orders), and so the same margin up to that rounding's share of it (an
        # honest margin is itself rounding noise: 0.0073 against 0.0081 once on an AMD EPYC).
        alone = checks.freivalds_rows(block, sketch)
        assert alone is not None
        np.testing.assert_allclose(rows.a_norms, alone.a_norms, rtol=1e-6)
        np.testing.assert_allclose(rows.a_terms, alone.a_terms, rtol=1e-5)
        scale = float(np.max(np.abs(alone.w64)))
        np.testing.assert_allclose(rows.w64, alone.w64, rtol=1e-5, atol=1e-6 * scale)
        assert with_rows.max_error == pytest.approx(made_here.max_error, rel=0.2)
        wrong = c.copy()
        wrong[9, 3] += 0.25 * float(np.sqrt(np.mean(wrong[9] ** 2)))
        caught = checks.freivalds(block, b, wrong, rows=rows, **kw)
        assert not caught.ok and caught.row == 9
    with pytest.raises(KernelError):
        checks.freivalds(
            row_blocks[0], b, row_blocks[0] @ b, rounds=20, rng=np.random.default_rng(2),
            sketch=sketch, rows=ahead.rows(0, 32),
        )  # fmt: skip
    # Rows made against another sketch (vectors redrawn after a failed check) are not used.
    other = checks.freivalds_sketch(b, rounds=20, rng=np.random.default_rng(7))
    stale = checks.freivalds(
        row_blocks[0], b, row_blocks[0] @ b, rounds=20, rng=np.random.default_rng(2),
        sketch=other, rows=ahead.rows(0, 64),
    )  # fmt: skip
    assert stale.ok


def test_a_side_of_non_finite_rows_is_left_to_the_float64_check() -> None:
    b, row_blocks = blocks(6)
    a = row_blocks[0].copy()
    a[3, 0] = np.inf
    sketch = checks.freivalds_sketch(b, rounds=8, rng=np.random.default_rng(1))
    assert checks.freivalds_rows(a, sketch) is None


def test_a_float16_a_is_widened_block_by_block_with_the_same_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A's side of the check for a float16 A is computed a block of rows at a time (no whole
    float32 copy of A): the same products and norms as from the whole copy, and across block
    boundaries an honest product passes and one wrong element in the last block is caught."""
    rng = np.random.default_rng(9)
    a = rng.standard_normal((300, 64)).astype(np.float16)
    b = rng.standard_normal((64, 48)).astype(np.float16)
    sketch = checks.freivalds_sketch(b, rounds=20, rng=np.random.default_rng(1))
    whole = checks.freivalds_rows(a, sketch)
    monkeypatch.setattr(checks, "_BLOCK_ELEMENTS", 64 * 7)  # blocks of 7 rows: 43 of them
    blocked = checks.freivalds_rows(a, sketch)
    assert whole is not None and blocked is not None
    # The same products up to float32 rounding: BLAS may sum a block of 7 rows in another
    # order than all 300 (it does on an AMD EPYC 7003, OpenBLAS's Haswell kernels).
    a32 = a.astype(np.float32)  # what the check used before: one whole copy
    for product in (whole.w64, (a32 @ sketch.z32).astype(np.float64)):
        scale = float(np.max(np.abs(product)))
        np.testing.assert_allclose(blocked.w64, product, rtol=1e-6, atol=1e-6 * scale)
    np.testing.assert_allclose(blocked.a_norms, whole.a_norms, rtol=1e-6)
    np.testing.assert_allclose(blocked.a_norms[:, 0], checks._row_norms(a32), rtol=1e-6)
    np.testing.assert_allclose(
        blocked.a_norms[:, 0], np.linalg.norm(a.astype(np.float64), axis=1), rtol=1e-6
    )
    c = a.astype(np.float32) @ b.astype(np.float32)
    ok = checks.freivalds(a, b, c, rng=None, sketch=sketch, rows=blocked)
    assert ok.ok
    wrong = c.copy()
    wrong[-1, 5] += 1.0
    caught = checks.freivalds(a, b, wrong, rng=None, sketch=sketch, rows=blocked)
    assert not caught.ok and caught.row == 299
