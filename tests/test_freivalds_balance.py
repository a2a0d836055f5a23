"""Freivalds' tolerance on unevenly scaled operands (kernels/verify.py ``Balance``).

The tolerance bounds a row's honest error by ``||a_i|| ||B||_F``. The hostile review of
2026-12-07 showed what that costs when B's columns differ in scale: with one column a million
times the rest, a wrong element 300 times its row's typical size passed. The inner dimension
has the same lever: a column of A a million times the rest, where B's row is zero, inflates
every row's tolerance while adding nothing to the product. Both pass with the unweighted check
(``_unbalanced``, the check before ``Balance``) and are caught now; honest products of such
operands, summed in any order, still pass.
"""

from __future__ import annotations

import numpy as np
import pytest

from mtor_kernels import verify as checks


def _unbalanced(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check as it was: no column weights, no row scales."""

    def no_balance(b: np.ndarray) -> tuple[checks.Balance, ...]:
        frobenius = float(np.linalg.norm(checks._row_norms64(b)))
        return (checks.Balance(None, None, frobenius, 0.0),)

    monkeypatch.setattr(checks, "balances_of", no_balance)


def _huge_column(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((64, 256), dtype=np.float32)
    b = rng.standard_normal((256, 128), dtype=np.float32)
    b[:, 0] *= 1e6
    return a, b


def _huge_inner_column(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((64, 256), dtype=np.float32)
    a[:, 0] = 1e6
    b = rng.standard_normal((256, 128), dtype=np.float32)
    b[0, :] = 0.0
    return a, b


def _wrong(c: np.ndarray, row: int, column: int, times: float) -> np.ndarray:
    """``c`` with one element moved by ``times`` its row's typical (rms) size, elsewhere than
    the huge column."""
    wrong = c.copy()
    rms = float(np.sqrt(np.mean(np.square(c[row, 1:].astype(np.float64)))))
    wrong[row, column] += times * rms
    return wrong


@pytest.mark.parametrize("operands", [_huge_column, _huge_inner_column])
def test_a_wrong_element_hidden_by_a_huge_scale_elsewhere_is_caught(
    operands, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = operands()
    c = a @ b
    wrong = _wrong(c, 5, 7, 10.0)
    assert checks.freivalds(a, b, c, rng=np.random.default_rng(2)).ok
    caught = checks.freivalds(a, b, wrong, rng=np.random.default_rng(3))
    assert not caught.ok and caught.row == 5
    # The same with a job's sketch and A's side made ahead, as the scheduler checks.
    sketch = checks.freivalds_sketch(b, rounds=20, rng=np.random.default_rng(4))
    rows = checks.freivalds_rows(a, sketch)
    assert rows is not None
    kw = {"rng": None, "sketch": sketch, "rows": rows}
    assert checks.freivalds(a, b, c, **kw).ok
    assert not checks.freivalds(a, b, wrong, **kw).ok
    # ... and a witness of the failed check proves it to anyone holding the operands.
    assert caught.witness is not None
    assert checks.check_freivalds_witness(a, b, wrong, caught.witness)
    assert not checks.check_freivalds_witness(a, b, c, caught.witness)
    # Without the balance (the check before it), the same wrong element passed.
    _unbalanced(monkeypatch)
    assert checks.freivalds(a, b, wrong, rng=np.random.default_rng(3)).ok


def _honest_orders(a: np.ndarray, b: np.ndarray) -> list[np.ndarray]:
    """Float32 products of ``a @ b`` summed in several honest orders: BLAS, blocks of the
    inner dimension summed separately, and naive sequential accumulation (the worst)."""
    blas = a @ b
    blocked = np.zeros_like(blas)
    for start in range(0, a.shape[1], 32):
        blocked += a[:, start : start + 32] @ b[start : start + 32]
    sequential = np.zeros_like(blas)
    for index in range(a.shape[1]):
        sequential += np.outer(a[:, index], b[index]).astype(np.float32)
    return [blas, blocked, sequential]


def _uneven(seed: int, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    m, k, n = 48, 96, 80
    a = rng.standard_normal((m, k))
    b = rng.standard_normal((k, n))
    b *= np.exp(rng.uniform(-9, 9, size=n))  # columns over ~8 decades
    b *= np.exp(rng.uniform(-6, 6, size=k))[:, None]  # rows over ~5
    a *= np.exp(rng.uniform(-6, 6, size=k))  # A's columns, independently
    b[:, 3] = 0.0
    b[11] = 0.0
    return a.astype(dtype), b.astype(dtype)


@pytest.mark.parametrize("seed", range(6))
def test_honest_products_of_unevenly_scaled_operands_pass_in_any_summation_order(
    seed: int,
) -> None:
    a, b = _uneven(seed, np.float32)
    balance = checks.balance_of(b)
    assert balance.column_weights is not None and balance.row_scales is not None
    sketch = checks.freivalds_sketch(b, rounds=20, rng=np.random.default_rng(seed))
    rows = checks.freivalds_rows(a, sketch)
    for c in _honest_orders(a, b):
        alone = checks.freivalds(a, b, c, rng=np.random.default_rng(seed + 100))
        shared = checks.freivalds(a, b, c, rng=None, sketch=sketch, rows=rows)
        assert alone.ok and shared.ok, (alone.max_error, shared.max_error)
    # Still a check: one element moved by a tenth of its own column's scale is caught.
    c = a @ b
    column = 17
    wrong = c.copy()
    wrong[9, column] += 0.1 * float(np.abs(c[:, column]).max())
    assert not checks.freivalds(a, b, wrong, rng=np.random.default_rng(seed)).ok


def test_honest_float16_operands_of_uneven_scale_pass() -> None:
    rng = np.random.default_rng(7)
    a = rng.standard_normal((40, 64)).astype(np.float16)
    b = rng.standard_normal((64, 50))
    b[:, :5] *= 1000.0
    b[:, 5:10] *= 0.001
    b = b.astype(np.float16)
    c = a.astype(np.float32) @ b.astype(np.float32)
    assert checks.balance_of(b).column_weights is not None
    assert checks.freivalds(a, b, c, rng=np.random.default_rng(1)).ok


def test_a_product_dominated_by_one_rank_one_term_passes() -> None:
    """Where the inner scaling is the looser bound (A's and B's weight on the same index), the
    tolerance keeps the unscaled one: an honest product passes."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((32, 128), dtype=np.float32)
    b = rng.standard_normal((128, 64), dtype=np.float32)
    a[:, 0] *= 1e4
    b[0] *= 1e4
    assert checks.balance_of(b).row_scales is not None
    for c in _honest_orders(a, b):
        assert checks.freivalds(a, b, c, rng=np.random.default_rng(5)).ok


def test_ordinary_operands_are_not_weighted() -> None:
    """Normal data (and columns within a few binades) gets no balance: its check costs what
    it did, and its verdicts and margins are unchanged."""
    rng = np.random.default_rng(0)
    b = rng.standard_normal((256, 192), dtype=np.float32)
    b[:, :10] *= 3.0
    balance = checks.balance_of(b)
    assert balance.column_weights is None and balance.row_scales is None
    assert balance.b_frobenius == pytest.approx(float(np.linalg.norm(b.astype(np.float64))))


def test_a_row_aligned_with_a_large_column_is_checked_against_its_small_columns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One column of B, large but barely moving ``||B||_F`` (the root mean square of the
    column norms under 4x the smallest), with a row of A along it (a Gram product): that
    row's tolerance counts its large element in every term that grows with C, so without
    weights a wrong element in a small column passed at 0.66 times the row's typical size,
    60x what the weighted check lets through (n = 2048: 123x). A review of a test that
    weighted only when the norms' root mean square exceeded 4x the smallest (reverted): the
    spread of the norms, the test kept, weights these operands."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 512), dtype=np.float32)
    b = rng.standard_normal((512, 512), dtype=np.float32)
    norms = np.linalg.norm(b.astype(np.float64), axis=0)
    others = np.delete(norms, 0)
    large = np.sqrt((3.99 * others.min()) ** 2 * 512 - np.sum(others**2))
    b[:, 0] *= np.float32(large / norms[0])
    a[7] = b[:, 0]
    assert len(checks.balances_of(b)) == 2
    c = a @ b
    assert checks.freivalds(a, b, c, rng=np.random.default_rng(1)).ok
    small = int(np.argmin(norms))
    wrong = _wrong(c, 7, small, 0.2)
    for seed in range(3):
        assert not checks.freivalds(a, b, wrong, rng=np.random.default_rng(seed)).ok
    _unbalanced(monkeypatch)
    assert checks.freivalds(a, b, wrong, rng=np.random.default_rng(0)).ok


def test_the_float64_path_is_balanced_too() -> None:
    """A NaN anywhere sends the check to its float64 path, which weighs the vectors and norms
    the same way: the wrong element in another row is still caught there."""
    a, b = _huge_column()
    c = a @ b
    a = a.copy()
    a[40, 3] = np.nan
    c[40] = np.nan
    assert checks.freivalds(a, b, c, rng=np.random.default_rng(2)).ok
    wrong = _wrong(c, 5, 7, 10.0)
    result = checks.freivalds(a, b, wrong, rng=np.random.default_rng(3))
    assert not result.ok and result.row == 5


def test_columns_further_apart_than_float32_can_weigh_stay_within_range() -> None:
    """Weights are capped (2**64): columns 1e-30 and 1e30 apart give finite vectors, and an
    honest product passes."""
    rng = np.random.default_rng(4)
    a = rng.standard_normal((16, 32), dtype=np.float32)
    b = rng.standard_normal((32, 24), dtype=np.float32)
    b[:, 0] *= 1e30
    b[:, 1] *= 1e-30
    balance = checks.balance_of(b)
    assert balance.column_weights is not None
    assert balance.weight_max == 2.0**64
    assert checks.freivalds(a, b, a @ b, rng=np.random.default_rng(1)).ok


def test_a_wrong_element_in_the_large_column_of_a_small_row_is_caught() -> None:
    """Lifting small columns lifts their honest flush-to-zero losses too (``weight_max``
    times), which in the weighted view alone hid an error ten times an element's own size in
    the large column of a row of small scale (the review of the balance); the plain view, which
    every check also goes through, catches it."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 128)).astype(np.float32)
    a[5] *= np.float32(1e-16)  # one row of small (normal) values
    b = (rng.standard_normal((128, 128)) * 2.0**-64).astype(np.float32)
    b[:, 0] = rng.standard_normal(128).astype(np.float32)  # 2**64 times the other columns
    assert len(checks.balances_of(b)) == 2
    c = a @ b
    assert checks.freivalds(a, b, c, rng=np.random.default_rng(1)).ok
    wrong = c.copy()
    wrong[5, 0] += np.float32(1e-14)  # about ten times the element's size
    for seed in range(5):
        assert not checks.freivalds(a, b, wrong, rng=np.random.default_rng(seed)).ok
    sketch = checks.freivalds_sketch(b, rounds=20, rng=np.random.default_rng(7))
    rows = checks.freivalds_rows(a, sketch)
    assert sketch.plain is not None and rows is not None and rows.plain is not None
    assert not checks.freivalds(a, b, wrong, rng=None, sketch=sketch, rows=rows.rows(0, 64)).ok


def test_column_weighted_row_norms_in_float32_match_float64() -> None:
    """Scaling by the column weights (powers of two) is exact in float32, so the norms summed
    there agree with the float64 ones to float32's accumulation; a scaled square past float32's
    range, or one small enough to have underflowed (a zero row too), is summed in float64."""
    rng = np.random.default_rng(5)
    c = rng.standard_normal((300, 96), dtype=np.float32)
    weights = np.ldexp(1.0, rng.integers(0, 20, 96)).astype(np.float64)
    fast = checks._column_weighted_row_norms(c, weights)
    exact = checks._weighted_row_norms64(c, weights)
    np.testing.assert_allclose(fast, exact, rtol=1e-5)
    assert not np.array_equal(fast, exact)  # the float32 path was taken
    for row, value in ((7, 1e30), (11, 1e-30), (12, 0.0)):  # beyond float32; tiny; zero
        odd = c.copy()
        odd[row] = 0.0
        odd[row, 3] = value
        norms = checks._column_weighted_row_norms(odd, weights)
        assert norms[row] == checks._weighted_row_norms64(odd[row : row + 1], weights)[0]
        assert norms[row] == abs(float(np.float32(value))) * weights[3]
        np.testing.assert_array_equal(np.delete(norms, row), np.delete(fast, row))


def test_a_two_view_sketch_is_each_view_made_alone() -> None:
    """Both views' ``z = B V`` come from one float64 product: each equals its view's own
    product, and A's side made for both at once is each view's ``A z`` in float32."""
    a, b = _huge_column(3)
    sketch = checks.freivalds_sketch(b, rounds=20, rng=np.random.default_rng(9))
    assert sketch.plain is not None and sketch.balance.column_weights is not None
    for view in (sketch, sketch.plain):
        alone = checks._matmul64(b, checks._weighted_vectors(view.signs, view.balance))
        np.testing.assert_allclose(view.z, alone, rtol=1e-12, atol=1e-9)
        assert view.z.flags.c_contiguous
    rows = checks.freivalds_rows(a, sketch)
    assert rows is not None and rows.plain is not None
    for view, side in ((sketch, rows), (sketch.plain, rows.plain)):
        # Within float32's worst-case accumulation bound of the exact A z.
        exact = a.astype(np.float64) @ view.z32.astype(np.float64)
        bound = a.shape[1] * 2.0**-24 * (np.abs(a.astype(np.float64)) @ np.abs(view.z32))
        assert np.all(np.abs(side.w64 - exact) <= bound)
    c = a @ b
    assert checks.freivalds(a, b, c, rng=None, sketch=sketch, rows=rows).ok
    assert not checks.freivalds(a, b, _wrong(c, 9, 4, 300.0), rng=None, sketch=sketch, rows=rows).ok
