"""Checking a worker's output without trusting it: pure functions of NumPy arrays.

* :func:`freivalds` checks a claimed matrix product in O(mk + kn + mn) per round.
* :func:`check_freivalds_witness` lets anyone re-check the evidence a failed check produced.
* :func:`sample_rows` recomputes a few random output rows of any kernel.
* :func:`compare` compares two workers' outputs (redundant execution).

All tolerances come from the float32-accumulation error envelope described in ``base``: they
are sized so that an honest result, whatever its summation order (cuBLAS, a BLAS library, blocks
summed separately), passes, and anything larger is reported.

Freivalds' check in float32
---------------------------
:func:`freivalds` computes in the operands' precision: float32 products and vectors (float16
operands, whose product is accumulated and returned in float32, are checked in float32 too). Only
``B R`` is formed in float64, because its rounding error would otherwise be multiplied by ``A``
(see below); it is rounded to float32 once before ``A`` multiplies it. A round's residual for row
``i`` is ``|y_i - w_i|`` with ``y = fl32(C r)``, ``z = B r`` (float64), ``w = fl32(A fl32(z))``.
Its tolerance adds four terms, with ``S`` = :data:`FREIVALDS_SAFETY`, ``u = 2**-24`` (the unit
roundoff of float32, both for the worker's accumulation and for the check's own arithmetic)::

    (a) S u ((sqrt(k) + 1) ||a_i|| ||B||_F + (k + 1) ||c_i||)    the honest result's own error
    (b) S u ((n + sqrt(n)) ||c_i|| + (n + 1) |y_i|)              computing y = C r in float32
    (c) S u ((sqrt(k) + 1) ||a_i|| ||z|| + (k + 1) |w_i|)        computing w = A z in float32
    (d) 2 u ||a_i|| ||z||                                        rounding z to float32

(a) is :func:`freivalds_row_tolerance`, unchanged: ``(C - AB) r`` for the honest rounding error
``E = C - AB``. (b) and (c) apply the per-dot-product envelope of ``base`` to the check's own two
float32 products (length n with terms ``c_ij r_j``, and length k with terms ``a_il z_l``), with
``sum_j |c_ij| <= sqrt(n) ||c_i||`` and ``sum_l |a_il z_l| <= ||a_i|| ||z||`` (Cauchy-Schwarz).
(d): ``z`` is exact to float64 precision (``B`` and ``r`` are exact in float64; its own error is
below ``2**-53 n`` relative), and rounding it to float32 moves each ``z_l`` by at most
``u |z_l|``, so ``|A (fl32(z) - z)|_i <= u ||a_i|| ||z||`` (doubled to cover the float64 error).
Had ``z`` been computed in float32, its error (up to ``u n ||b_l||``-ish per element) would be
multiplied by ``||a_i||`` with no random signs to cancel it: 20 times the other terms at
n = k = 512. The final difference ``y - w`` is taken in float64 (exact).

For N(0, 1) data with m = n = k each of (a), (b), (c) is about ``2 S u k^2`` and (d) is
negligible: the tolerance is about 3 times the float64 check's (which had (a) alone), so the
smallest single-element error caught with certainty grows by that factor (0.07 at k = 256, 1.1
at k = 1024, 18 at k = 4096, on entries of typical size sqrt(k) = 16, 32, 64). Each round draws a
fresh ±1 vector; a wrong element larger than its row's tolerance flips the verdict for one of
each pair of vectors that differ in its column's sign, so every round catches it with
probability >= 1/2 and ``rounds`` rounds miss it with probability <= ``2**-rounds`` (the
default 20 rounds: <= 9.6e-7 per wrong shard). A single wrong element larger than twice its
row's tolerance moves the residual by its full size whatever the signs, so it is caught in
every round; the 1/2 bound is for several wrong elements that could cancel. The default stays
at 20 rounds: all rounds run as one (n x rounds) block, and at m = n = k = 512 on one core the
whole check takes about 0.45 ms with 1 round, 0.85 ms with 8 and 1.2 ms with 20, so going below
20 would save at most 0.8 ms while raising the chance that cancelling errors pass from 1e-6 to
up to 0.5 per shard.

Unevenly scaled operands (:class:`Balance`): the terms above bound sums by Cauchy-Schwarz,
``||a_i|| ||B||_F``, which one huge column of B (or a huge column of A where B's row is small)
makes loose for every other element. For any positive diagonal W (n) and D (k), the check with
vectors ``v = W r`` has the same terms with ``||a_i D^-1||``, ``||D B W||_F``, ``||D z||`` and
``||c_i W||`` in their places, so W brings B's columns to one binade (powers of two: ``v`` and
``C v`` stay exact in float32) and each term takes the smaller of its bound with and without D.

Norms are taken in float32 when that is exact enough: a row whose float32 sum of squares
overflows or falls below ``2**-100`` (where squares of small entries underflow) has all norms
of that matrix recomputed in float64. Products that overflow float32 (entries beyond ~1e19 in
magnitude) or NaN/inf in any operand send the whole check to the float64 path (the check of the
earlier versions: every product in float64, tolerance (a) alone), whose treatment of
non-finite values is documented at :func:`freivalds`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .base import (
    ACCUMULATION_UNIT_ROUNDOFF,
    FLOAT32_TINY,
    RECOMPUTE_BLOCK_ELEMENTS,
    Kernel,
    KernelError,
    Operands,
    RowExpectation,
)

#: An honest row's norm may exceed ||a_i|| ||B||_F by its rounding: 1% covers that.
HONEST_NORM_SLACK = 1.01

__all__ = [
    "BALANCE_SPREAD_BINADES",
    "CHECK_UNIT_ROUNDOFF",
    "COMPARE_RTOL",
    "FREIVALDS_SAFETY",
    "Balance",
    "FreivaldsResult",
    "SampleResult",
    "balance_of",
    "check_freivalds_witness",
    "compare",
    "freivalds",
    "freivalds_row_tolerance",
    "judge_rows",
    "sample_rows",
]

#: Multiplier of the Freivalds tolerance. With 1.0, naive sequential float32 accumulation of
#: constant, rank-one data (the worst honest case measured) reached 0.45 of it up to k = 8192;
#: normal data reached 0.02, and blocked accumulation 0.05 on any data.
FREIVALDS_SAFETY = 3.0

#: :func:`compare` tolerance per *input* dtype, relative to ``|x| + rms(x)`` elementwise.
#: float32: above the systematic drift u*k/2 of sequential accumulation up to k ~ 16k (honest
#: pairs measured <= 0.01 of it). float16: the float16 rounding of intermediates (attention
#: probabilities, MLP activation) may differ between honest workers by one float16 ulp; pairs of
#: honest attention outputs (seq 2048, peaked softmax) reached 0.15 of it, and would exceed the
#: float32 value.
COMPARE_RTOL = {np.dtype(np.float32): 5e-4, np.dtype(np.float16): 5e-3}

# Rows converted to float64 at a time, so a float32 operand is never copied whole.
_BLOCK_ELEMENTS = 1 << 22

#: An answer that failed a cheap check is accepted on judging every row only where each element
#: is within this share of the tight bound. A cheater moving every element by nearly the whole
#: bound failed Freivalds, yet would have been paid twice what passes it (a review of
#: 2026-12-07). Honest answers, measured by a fourth review: matmul up to 0.054 of the bound
#: (0.116 for rows that partly cancel), MLP 0.106, float32 attention 0.014, but float16
#: attention up to 0.92 (its probabilities' rounding is a fixed amount, not a random one).
#: Only answers that failed a cheap check are judged at this share; an honest answer passes
#: those, whose bound is the whole one. The requester's own product is judged at the whole
#: bound (``tight_share=1.0``).
TIGHT_SHARE_ACCEPTED = 0.5

#: Unit roundoff of the check's own arithmetic (float32).
CHECK_UNIT_ROUNDOFF = 2.0**-24
#: A float32 sum of squares below this may have lost small entries to underflow.
_TINY_SQUARES = 2.0**-100


@dataclass(frozen=True)
class FreivaldsResult:
    """Outcome of :func:`freivalds`.

    ``max_error`` is the largest residual ``|(C r - A (B r))_i|`` in units of that row's
    tolerance: the check passes iff it is <= 1. On failure, ``witness`` is the ±1 vector ``r``
    (int8) of the worst round and ``row`` the row it exposes; both are None on success.
    """

    ok: bool
    rounds: int
    witness: np.ndarray | None
    max_error: float
    row: int | None = None


@dataclass(frozen=True)
class SampleResult:
    """Outcome of :func:`sample_rows`.

    ``rows`` are the sampled row indices; ``max_error`` is the largest deviation in units of
    its elementwise tolerance (pass iff <= 1); ``bad_rows`` the sampled rows that failed;
    ``loose_rows`` the sampled rows whose bound is too wide to judge them
    (:meth:`~.base.RowExpectation.loose`): the check does not pass with any, as it could not
    have failed there.
    """

    ok: bool
    rows: np.ndarray
    max_error: float
    bad_rows: np.ndarray
    loose_rows: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))


def _row_dots(matrix: np.ndarray) -> np.ndarray:
    """Each row's dot product with itself, in ``matrix``'s dtype.

    ``np.vecdot`` (NumPy 2: a BLAS dot per row) where there is one, else einsum: 512²
    float32, one BLAS thread, operands out of cache, 0.13 against 0.19 ms (2026-12-06, the
    2-core Xeon), with about a third of einsum's rounding error."""
    if _VECDOT is not None:
        return _VECDOT(matrix, matrix)
    return np.einsum("ij,ij->i", matrix, matrix)


_VECDOT = getattr(np, "vecdot", None)


def _float64_blocks(matrix: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, rows)``: ``matrix`` converted to float64 a block of rows at a time, into one
    buffer reused for every block (a view of it: use each block before taking the next).

    One buffer, not one per block: a block is 32 MiB, which glibc maps afresh each time (it
    is at its largest mmap threshold), to be faulted in page by page. A 8192² B's float64
    pass, 2 BLAS threads, with a peer's memory settings (mtor_p2p/memory.py): 0.30-0.35 ->
    0.12-0.19 s wall, 0.59-0.68 -> 0.25-0.35 CPU-s."""
    step = max(1, _BLOCK_ELEMENTS // max(1, matrix.shape[1]))
    buffer = np.empty((min(step, matrix.shape[0]), matrix.shape[1]), np.float64)
    for start in range(0, matrix.shape[0], step):
        block = buffer[: min(step, matrix.shape[0] - start)]
        block[...] = matrix[start : start + len(block)]
        yield start, block


def _matmul64(matrix: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """``matrix @ vectors`` in float64, converting ``matrix`` a block of rows at a time."""
    out = np.empty((matrix.shape[0], vectors.shape[1]), np.float64)
    for start, block in _float64_blocks(matrix):
        np.matmul(block, vectors, out=out[start : start + len(block)])
    return out


def _row_norms64(matrix: np.ndarray) -> np.ndarray:
    """Euclidean norm of each row, accumulated in float64 a block of rows at a time."""
    out = np.empty(matrix.shape[0], np.float64)
    for start, block in _float64_blocks(matrix):
        out[start : start + len(block)] = np.sqrt(_row_dots(block))
    return out


def _column_norms(matrix: np.ndarray) -> np.ndarray:
    """Euclidean norm of each column, as float64: summed in float32 (no copy) when every sum
    is finite and not so small that squares may have underflowed, else in float64 blocks.
    They choose :class:`Balance`'s weights, where any positive value is sound: only their
    binades matter."""
    if matrix.dtype == np.float32:
        with np.errstate(over="ignore", invalid="ignore", under="ignore"):
            squares = np.einsum("ij,ij->j", matrix, matrix)
        if squares.size == 0 or (np.isfinite(squares).all() and squares.min() >= _TINY_SQUARES):
            return np.sqrt(squares.astype(np.float64))
    out = np.zeros(matrix.shape[1], np.float64)
    for _start, block in _float64_blocks(matrix):
        out += np.einsum("ij,ij->j", block, block)
    return np.sqrt(out)


def _column_weighted_row_norms(matrix: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``||row_i diag(weights)||`` for :class:`Balance`'s column weights (powers of two), as
    float64: for a float32 ``matrix`` scaled in float32 (exact while finite: a power of two
    only moves the exponent) a block of rows at a time into one reused buffer, and summed as
    :func:`_row_norms` sums, so with the precision the plain view's norms have; a row whose
    scaled sum of squares overflows or may have underflowed (a zero row too) in float64
    (:func:`_weighted_row_norms64`), that row alone. 512² float32, one BLAS thread, AMD EPYC
    7003: 0.10 against 0.22 ms."""
    if matrix.dtype != np.float32 or matrix.ndim != 2:
        return _weighted_row_norms64(matrix, weights)
    rows, columns = matrix.shape
    out = np.empty(rows, np.float64)
    step = max(1, _BLOCK_ELEMENTS // max(1, columns))
    buffer = np.empty((min(step, rows), columns), np.float32)
    weights32 = weights.astype(np.float32)
    for start in range(0, rows, step):
        block = buffer[: min(step, rows - start)]
        with np.errstate(over="ignore", invalid="ignore"):
            np.multiply(matrix[start : start + len(block)], weights32, out=block)
            squares = _row_dots(block)
        out[start : start + len(block)] = np.sqrt(squares)
        redo = np.flatnonzero(~(np.isfinite(squares) & (squares >= _TINY_SQUARES)))
        if redo.size:
            rows_again = start + redo
            out[rows_again] = _weighted_row_norms64(matrix[rows_again], weights)
    return out


def _weighted_row_norms64(matrix: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``||row_i diag(weights)||`` for each row, in float64 a block of rows at a time."""
    out = np.empty(matrix.shape[0], np.float64)
    squared = np.square(weights)
    for start, block in _float64_blocks(matrix):
        # Squared in place: the block is the reused buffer's, and a fresh array per block
        # was a fresh mapping to fault in (a review: 2.8 against 0.36 ms a 512² shard).
        np.square(block, out=block)
        out[start : start + len(block)] = np.sqrt(block @ squared)
    return out


@dataclass(frozen=True)
class Balance:
    """Diagonal scalings of ``A B`` that keep Freivalds' tolerance tight on unevenly scaled
    operands, chosen from B alone (so anyone holding B chooses the same); a check goes
    through each of :func:`balances_of`.

    The tolerance bounds a row's honest error by Cauchy-Schwarz, ``||a_i|| ||B||_F``: one
    column of B a million times larger than the rest made every row's tolerance a million
    times what the other columns' elements could honestly be off by, and a wrong element
    there 300 times its row's typical size passed (the hostile review of 2026-12-07); a
    column of A large where B's row is zero did the same through the inner dimension. For
    any positive diagonal ``W`` (n) and ``D`` (k), checking ``C v`` against ``A (B v)`` with
    ``v = W r`` (r = ±1) has the honest residual ``sum_j E_ij w_j r_j``, bounded as before
    with ``||a_i D^-1|| ||D B W||_F`` and ``||c_i W||`` in place of ``||a_i|| ||B||_F`` and
    ``||c_i||`` (``|a_il b_lj| = |a_il / d_l| |d_l b_lj|``). So:

    * ``column_weights`` (W): each column of B scaled up to the binade of the largest, by a
      power of two (exact in float32, so ``v`` and ``C v`` lose nothing to it); a wrong
      element then shows against its own column's scale. A zero column gets the largest
      weight. None (all ones) when the columns' norms span at most
      :data:`BALANCE_SPREAD_BINADES` binades: ordinary data costs nothing more.
    * ``row_scales`` (1/D): each row's norm in ``B W`` (relative to the largest), so that
      ``||a_i D^-1||`` counts A's entries by the size of the rows of B they multiply (a zero
      row's, not at all). Each term of the tolerance takes the smaller of this bound and the
      unscaled one (both hold), since for a product dominated by one rank-one term this one
      can be the looser. None when the rows span at most that many binades and none is
      zero.
    """

    #: W's diagonal (n,), powers of two >= 1; None: all ones.
    column_weights: np.ndarray | None
    #: D's inverse (k,), in [0, 1]; None: D is not used.
    row_scales: np.ndarray | None
    #: ``||B W||_F``.
    b_frobenius: float
    #: ``||D B W||_F``: the largest row's norm in ``B W`` times the square root of the count
    #: of non-zero rows (0 without D).
    scaled_frobenius: float

    @property
    def weight_max(self) -> float:
        """The largest column weight (1 without weights)."""
        return 1.0 if self.column_weights is None else float(self.column_weights.max())


#: Column (or row) norms of B within this many binades of each other are left unscaled: the
#: tolerance is then at most ``2**(this + 1)`` times looser for the smallest than weighting
#: would make it, and nothing is spent on weighted norms.
BALANCE_SPREAD_BINADES = 2
#: Weights span at most this many binades, so that ``C W`` stays within float32's range for
#: any C a check in float32 can use (columns further apart stay that much looser).
_MAX_WEIGHT_BINADES = 64


def _spread_binades(norms: np.ndarray) -> tuple[np.ndarray, int, int] | None:
    """``(exponents, largest, smallest)`` of the non-zero ``norms``' binades, or None when
    they are all zero or any is not finite (the check's float64 path judges those as they
    are)."""
    if norms.size == 0 or not np.isfinite(norms).all():
        return None
    nonzero = norms > 0
    if not nonzero.any():
        return None
    _, exponents = np.frexp(norms)
    return exponents, int(exponents[nonzero].max()), int(exponents[nonzero].min())


def balances_of(b: np.ndarray) -> tuple[Balance, ...]:
    """The views of ``b`` a check goes through: the weighted one (:class:`Balance`) when B's
    columns spread, then always the plain one (no column weights). Each is sound alone, and a
    wrong answer must pass both: the weighted view sees a wrong element against its own
    column's scale, but lifting small columns lifts their honest flush-to-zero losses too
    (``weight_max`` times), which then hid errors in the large columns of rows of small
    scale; the plain view sees those (the hostile review of the balance, 2026-12-07). One pass
    over B for its column norms (in float32 where that is exact enough), and the row norms a
    check takes anyway."""
    column_norms = _column_norms(b)
    plain = _balance(b, None, column_norms)
    spread = _spread_binades(column_norms)
    if spread is None or spread[1] - spread[2] <= BALANCE_SPREAD_BINADES:
        return (plain,)
    exponents, largest, smallest = spread
    shift = np.where(column_norms > 0, largest - exponents, largest - smallest)
    weights = np.ldexp(1.0, np.minimum(shift, _MAX_WEIGHT_BINADES)).astype(np.float64)
    return (_balance(b, weights, column_norms), plain)


def balance_of(b: np.ndarray) -> Balance:
    """The first view of :func:`balances_of`: weighted when B's columns spread."""
    return balances_of(b)[0]


def _balance(b: np.ndarray, weights: np.ndarray | None, column_norms: np.ndarray) -> Balance:
    """The :class:`Balance` of ``b`` with these column weights (None: none)."""
    if weights is None:
        row_norms = _row_norms(b)
        b_frobenius = float(np.linalg.norm(row_norms))
    else:
        row_norms = _column_weighted_row_norms(b, weights)
        b_frobenius = float(np.sqrt(np.sum(np.square(column_norms * weights))))
    row_scales = None
    scaled_frobenius = 0.0
    spread = _spread_binades(row_norms)
    # A zero row of B is the lever as much as a small one: A's column there may be anything.
    if spread is not None and (
        spread[1] - spread[2] > BALANCE_SPREAD_BINADES or not np.all(row_norms > 0)
    ):
        largest_row = float(row_norms.max())
        row_scales = row_norms / largest_row
        # D B W's rows all have the largest row's norm (a zero row stays zero).
        scaled_frobenius = largest_row * math.sqrt(float(np.count_nonzero(row_norms)))
    for array in (weights, row_scales):
        if array is not None:
            array.setflags(write=False)
    return Balance(weights, row_scales, b_frobenius, scaled_frobenius)


def _scaled_norms(vectors: np.ndarray, row_scales: np.ndarray) -> np.ndarray:
    """``||D x||`` for each column x of ``vectors`` (k, rounds), ``D = 1 / row_scales`` and a
    zero row's entries not counted (B's zero rows give zeros there)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.where(row_scales[:, None] > 0, vectors / row_scales[:, None], 0.0)
    return np.sqrt(np.einsum("ij,ij->j", scaled, scaled))


def _effective_row_norms(
    a: np.ndarray, a_norms: np.ndarray, balance: Balance
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(e, s)``: ``e_i`` with ``e_i ||B W||_F = min(||a_i|| ||B W||_F, ||a_i D^-1||
    ||D B W||_F)``, and ``s = ||a_i D^-1||`` (None without D), each (m,) float64."""
    if balance.row_scales is None:
        return a_norms, None
    scaled = _weighted_row_norms64(a, balance.row_scales)
    if balance.b_frobenius > 0:
        bound = scaled * (balance.scaled_frobenius / balance.b_frobenius)
        return np.minimum(a_norms, bound), scaled
    return a_norms, scaled


def freivalds_row_tolerance(
    a_row_norms: np.ndarray,
    b_frobenius: float,
    c_row_norms: np.ndarray,
    k: int,
    *,
    safety: float = FREIVALDS_SAFETY,
    columns: int = 1,
    weight_max: float = 1.0,
) -> np.ndarray:
    """Per-row bound on ``|(C r - A (B r))_i|`` for an honest float32-accumulated ``C``.

    With E = C - AB the rounding error and r = ±1: ``(C r - A B r)_i = sum_j E_ij r_j``, a sum
    of n terms of random sign, of size about ``||E_i||_2``. Bounding each ``|E_ij|`` by the
    accumulation envelope of ``base`` and applying Cauchy-Schwarz
    (``sum_j (|a_i| @ |b_j|)^2 <= ||a_i||^2 ||B||_F^2``) gives::

        safety * u * ((sqrt(k) + 1) * ||a_i|| * ||B||_F + (k + 1) * ||c_i||)

    The ``||c_i||`` term uses the *claimed* C. That cannot hide a wrong result: inflating C by
    ``D`` raises the tolerance by ``safety * u * (k + 1) * ||D||``, a tiny fraction of the
    residual ``~||D||`` that D itself adds. Works on NumPy or CuPy arrays alike.

    Below float32's normal range the relative terms say nothing: each of C's ``columns``
    elements may also lose ``(k + 1)`` times :data:`~.base.FLOAT32_TINY` (flushed to zero),
    and the projections theirs (``columns + k + 2`` more); negligible otherwise. With column
    weights (:class:`Balance`: ``b_frobenius`` is then ``||B W||_F``, ``c_row_norms``
    ``||c_i W||``), C's own losses count ``weight_max`` times.
    """
    u = ACCUMULATION_UNIT_ROUNDOFF
    c_row_norms = honest_row_norms(c_row_norms, a_row_norms, b_frobenius)
    return safety * (
        u * ((math.sqrt(k) + 1.0) * a_row_norms * b_frobenius + (k + 1.0) * c_row_norms)
        + FLOAT32_TINY * ((k + 1.0) * columns * weight_max + columns + k + 2.0)
    )


def honest_row_norms(
    c_row_norms: np.ndarray, a_row_norms: np.ndarray, b_frobenius: float
) -> np.ndarray:
    """The claimed C's row norms, capped at what an honest row can have.

    ``||c_i|| = ||a_i B|| <= ||a_i|| ||B||_F`` for the exact product (1% over for rounding).
    A tolerance that grew with the claimed ``||c_i||`` without this cap would grow with the
    error itself: a wrong element large enough (over a wide enough row) would raise its own
    tolerance faster than its residual, and pass.
    """
    return np.minimum(c_row_norms, HONEST_NORM_SLACK * a_row_norms * b_frobenius)


def _check_product_shapes(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> None:
    if a.ndim != 2 or b.ndim != 2 or c.ndim != 2:
        raise KernelError("freivalds: a, b and c must be matrices")
    if a.shape[1] != b.shape[0] or c.shape != (a.shape[0], b.shape[1]):
        raise KernelError(f"freivalds: shapes {a.shape} @ {b.shape} != {c.shape}")


def _weighted_vectors(signs: np.ndarray, balance: Balance) -> np.ndarray:
    """``V = W R`` in float64: the ±1 columns of ``signs`` times the column weights."""
    vectors = signs.astype(np.float64)
    if balance.column_weights is not None:
        vectors *= balance.column_weights[:, None]
    return vectors


def _residual_ratios(
    a: np.ndarray,
    b: np.ndarray,
    c: np.ndarray,
    signs: np.ndarray,
    safety: float,
    balances: Sequence[Balance] | None = None,
) -> np.ndarray:
    """``|C V - A (B V)| / tolerance`` for ``V = W R``, R the ±1 columns of ``signs``
    (n, rounds) and W each view's weights (:func:`balances_of` B when not given), float64:
    the largest ratio over the views.

    Rows where the exact projection is non-finite (NaN or inf in the inputs) count as matching
    when C's projection is non-finite the same way (same NaN, or the same infinity).
    """
    views = balances_of(b) if balances is None else balances
    ratios = _residual_ratios_through(a, b, c, signs, safety, views[0])
    for view in views[1:]:
        np.maximum(ratios, _residual_ratios_through(a, b, c, signs, safety, view), out=ratios)
    return ratios


def _residual_ratios_through(
    a: np.ndarray,
    b: np.ndarray,
    c: np.ndarray,
    signs: np.ndarray,
    safety: float,
    balance: Balance,
) -> np.ndarray:
    """:func:`_residual_ratios` through one view."""
    vectors = _weighted_vectors(signs, balance)
    expected = _matmul64(a, _matmul64(b, vectors))
    claimed = _matmul64(c, vectors)
    a_norms, _ = _effective_row_norms(a, _row_norms64(a), balance)
    weights = balance.column_weights
    tolerance = freivalds_row_tolerance(
        a_norms,
        balance.b_frobenius,
        _row_norms64(c) if weights is None else _weighted_row_norms64(c, weights),
        a.shape[1],
        safety=safety,
        columns=c.shape[1],
        weight_max=balance.weight_max,
    )[:, None]
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        residual = np.abs(claimed - expected)
        ratios = residual / tolerance
        ratios[(residual == 0) & (tolerance == 0)] = 0.0  # exact zero rows
        both_non_finite = ~np.isfinite(expected) & ~np.isfinite(claimed)
        same_way = (np.isnan(expected) & np.isnan(claimed)) | (expected == claimed)
        ratios[both_non_finite & same_way] = 0.0
        ratios[np.isnan(ratios)] = np.inf  # e.g. a finite expectation against a NaN claim
    return ratios


def _row_norms(matrix: np.ndarray) -> np.ndarray:
    """Euclidean norm of each row as float64: summed in float32 (one pass, no copy) when
    every row's sum of squares is finite and not so small that squares may have underflowed,
    else in float64 (:func:`_row_norms64`)."""
    if matrix.dtype == np.float32:
        # Squares past float32's range are expected here (they send the rows to float64):
        # vecdot warns of them where einsum did not.
        with np.errstate(over="ignore", invalid="ignore"):
            squares = _row_dots(matrix)
        if squares.size == 0 or (np.isfinite(squares).all() and squares.min() >= _TINY_SQUARES):
            return np.sqrt(squares.astype(np.float64))
    return _row_norms64(matrix)


@dataclass(frozen=True)
class FreivaldsSketch:
    """What Freivalds' check needs of B alone, for checking many row blocks of ``A @ B``
    (a job's shards) against the same B: the ±1 vectors R (n x rounds), B's
    :class:`Balance`, ``z = B V`` in float64 (``V = W R``, the vectors weighted), its column
    norms (and with D theirs of ``D z``). Making it costs a pass over B in float64 (for
    n = k = 8192, more than the rest of a shard's check); each shard's check then costs
    O((m k + m n) rounds). R must stay secret from the workers (it is never sent), and
    should be drawn anew once a failed check has exposed one of its columns as a fault
    proof's witness."""

    signs: np.ndarray
    z: np.ndarray
    z_norms: np.ndarray
    balance: Balance
    #: ``||D z||`` per round; None without D.
    scaled_z_norms: np.ndarray | None = None
    #: The same signs through the plain view (no column weights) when this one is weighted:
    #: a check goes through both (:func:`balances_of`).
    plain: FreivaldsSketch | None = None
    #: V and z rounded to float32 once, for every shard's float32 products (V exactly: its
    #: entries are ± powers of two).
    vectors32: np.ndarray = field(init=False, repr=False, compare=False)
    z32: np.ndarray = field(init=False, repr=False, compare=False)
    #: ``vectors32`` and ``z32`` side by side with the plain view's (this view's alone
    #: without one): a check through both views takes each product in one BLAS call.
    #: 512³, both views, one thread (AMD EPYC 7003): the sketch, A's side and a check 3.6 -> 3.2 ms.
    views_vectors32: np.ndarray = field(init=False, repr=False, compare=False)
    views_z32: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        vectors32 = _weighted_vectors(self.signs, self.balance).astype(np.float32)
        z32 = self.z.astype(np.float32)
        object.__setattr__(self, "vectors32", vectors32)
        object.__setattr__(self, "z32", z32)
        if self.plain is not None:
            vectors32 = np.hstack((vectors32, self.plain.vectors32))
            z32 = np.hstack((z32, self.plain.z32))
        object.__setattr__(self, "views_vectors32", vectors32)
        object.__setattr__(self, "views_z32", z32)
        # Shared by every check of the job (and read on threads): read-only, so that no
        # caller can put R and its float32 copy, or z and its copy, out of step.
        for array in (
            self.signs,
            self.z,
            self.z_norms,
            self.vectors32,
            self.z32,
            self.views_vectors32,
            self.views_z32,
        ):
            array.setflags(write=False)
        if self.scaled_z_norms is not None:
            self.scaled_z_norms.setflags(write=False)

    @property
    def b_frobenius(self) -> float:
        """``||B W||_F`` (``||B||_F`` without column weights)."""
        return self.balance.b_frobenius

    @property
    def balances(self) -> tuple[Balance, ...]:
        """The views this sketch checks through."""
        return (self.balance,) if self.plain is None else (self.balance, self.plain.balance)


def freivalds_sketch(b: np.ndarray, *, rounds: int, rng: np.random.Generator) -> FreivaldsSketch:
    """Draw R and compute the :class:`FreivaldsSketch` of ``b``."""
    if rounds < 1:
        raise KernelError("freivalds: rounds must be >= 1")
    if b.ndim != 2:
        raise KernelError("freivalds: b must be a matrix")
    signs = (rng.integers(0, 2, size=(b.shape[1], rounds), dtype=np.int8) * 2 - 1).astype(np.int8)
    return _sketch_of(b, signs)


def _sketch_of(b: np.ndarray, signs: np.ndarray) -> FreivaldsSketch:
    views = balances_of(b)
    # z = B V in float64 (exact to 2**-53), then rounded to float32 once: term (d). Both
    # views' V in one product: one float64 pass over B.
    vectors = [_weighted_vectors(signs, view) for view in views]
    z = _matmul64(b, vectors[0] if len(vectors) == 1 else np.hstack(vectors))
    rounds = signs.shape[1]
    plain = None
    if len(views) > 1:
        plain = _sketch_from(signs, np.ascontiguousarray(z[:, rounds:]), views[1])
        z = np.ascontiguousarray(z[:, :rounds])
    return _sketch_from(signs, z, views[0], plain)


def _sketch_from(
    signs: np.ndarray, z: np.ndarray, balance: Balance, plain: FreivaldsSketch | None = None
) -> FreivaldsSketch:
    """The sketch through one view, given its ``z = B V``."""
    z_norms = np.sqrt(_row_dots(np.ascontiguousarray(z.T)))  # per round, float64
    scaled = None if balance.row_scales is None else _scaled_norms(z, balance.row_scales)
    return FreivaldsSketch(signs, z, z_norms, balance, scaled, plain)


@dataclass(frozen=True)
class FreivaldsRows:
    """What Freivalds' check needs of A's rows alone, given a sketch of B: ``w = A z``
    (float32 products, held as float64), A's row norms, and the tolerance's terms (c) and (d)
    of the module docstring, which depend on nothing else. None of it needs an answer, so a
    requester makes it while the workers compute; each shard's check takes its rows
    (:meth:`rows`) and is left with C's side (512³: 0.77 ms -> about 0.4 ms)."""

    sketch: FreivaldsSketch
    safety: float
    w64: np.ndarray  # (m, rounds)
    a_norms: np.ndarray  # (m, 1)
    a_terms: np.ndarray  # (m, rounds): (c) + (d)
    #: The same through the sketch's plain view (``sketch.plain``), when it has one.
    plain: FreivaldsRows | None = None

    def rows(self, start: int, stop: int) -> FreivaldsRows:
        """The same for rows ``start:stop`` of A (a shard's slice)."""
        return FreivaldsRows(
            self.sketch,
            self.safety,
            self.w64[start:stop],
            self.a_norms[start:stop],
            self.a_terms[start:stop],
            None if self.plain is None else self.plain.rows(start, stop),
        )


def _products_and_norms32(a: np.ndarray, z32: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``a @ z32`` in float32 and A's row norms (:func:`_row_norms`), with A in float32.

    A float16 A is widened a block of rows at a time into one reused buffer, not whole: a
    whole copy is twice A's size in fresh pages. 8192² float16 on the 2-core VM: 216-279 ->
    118-185 ms for this step, the same values bit for bit."""
    if a.dtype == np.float32:
        return a @ z32, _row_norms(a)
    rows, k = a.shape
    step = max(1, _BLOCK_ELEMENTS // max(1, k))
    buffer = np.empty((min(step, rows), k), np.float32)
    products = np.empty((rows, z32.shape[1]), np.float32)
    norms = np.empty(rows, np.float64)
    for start in range(0, rows, step):
        block = buffer[: min(step, rows - start)]
        block[...] = a[start : start + len(block)]
        np.matmul(block, z32, out=products[start : start + len(block)])
        norms[start : start + len(block)] = _row_norms(block)
    return products, norms


def freivalds_rows(
    a: np.ndarray, sketch: FreivaldsSketch, *, safety: float = FREIVALDS_SAFETY
) -> FreivaldsRows | None:
    """:class:`FreivaldsRows` of ``a`` against ``sketch`` (and its plain view); None when
    float32 cannot be used (non-finite values, overflow): the check then takes its float64
    path."""
    if a.ndim != 2 or sketch.z.shape[0] != a.shape[1]:
        raise KernelError("freivalds: A's columns are not the sketch's B's rows")
    # Both views' A z in one product, and A's row norms once.
    with np.errstate(over="ignore", invalid="ignore"):
        w, norms = _products_and_norms32(a, sketch.views_z32)
    rounds = sketch.signs.shape[1]
    plain = None
    if sketch.plain is not None:
        plain = _rows_through(a, sketch.plain, w[:, rounds:], norms, safety)
        if plain is None:
            return None
    return _rows_through(a, sketch, w[:, :rounds], norms, safety, plain)


def _rows_through(
    a: np.ndarray,
    sketch: FreivaldsSketch,
    w: np.ndarray,
    norms: np.ndarray,
    safety: float,
    plain: FreivaldsRows | None = None,
) -> FreivaldsRows | None:
    """:func:`freivalds_rows` through one view, given ``w = A z`` (float32) and A's row
    norms."""
    k = a.shape[1]
    if not (np.isfinite(w).all() and np.isfinite(sketch.z_norms).all()):
        return None
    effective, scaled = _effective_row_norms(a, norms, sketch.balance)
    # sum_l |a_il z_l| <= ||a_i|| ||z||, and <= ||a_i D^-1|| ||D z|| with D: the smaller.
    a_by_z = norms[:, None] * sketch.z_norms
    if scaled is not None and sketch.scaled_z_norms is not None:
        a_by_z = np.fmin(a_by_z, scaled[:, None] * sketch.scaled_z_norms)
    a_norms = effective[:, None]
    w64 = w.astype(np.float64)
    u = CHECK_UNIT_ROUNDOFF
    a_terms = (
        safety * u * ((math.sqrt(k) + 1.0) * a_by_z + (k + 1.0) * np.abs(w64))  # (c)
        + 2.0 * u * a_by_z  # (d)
    )
    for array in (w64, a_norms, a_terms):
        array.setflags(write=False)  # shared by every shard's check, read on threads too
    return FreivaldsRows(sketch, safety, w64, a_norms, a_terms, plain)


def _residual_ratios32(
    a: np.ndarray,
    b: np.ndarray,
    c: np.ndarray,
    signs: np.ndarray,
    safety: float,
    sketch: FreivaldsSketch | None = None,
    rows: FreivaldsRows | None = None,
) -> np.ndarray | None:
    """Like :func:`_residual_ratios` with the float32 products and tolerance of the module
    docstring; None when float32 cannot be used (non-finite values, overflow), for the caller
    to fall back to the float64 check. ``rows``: A's side, made ahead from this ``sketch``."""
    k, n = b.shape
    if sketch is None:
        sketch = _sketch_of(b, signs)
    if rows is None or rows.sketch is not sketch or rows.safety != safety:
        rows = freivalds_rows(a, sketch, safety=safety)
        if rows is None:
            return None
    if rows.w64.shape != (a.shape[0], signs.shape[1]):
        raise KernelError("freivalds: A's side made ahead is of other rows")
    if sketch.plain is not None and (rows.plain is None or rows.plain.sketch is not sketch.plain):
        raise KernelError("freivalds: A's side made ahead lacks the plain view")
    c32 = c if c.dtype == np.float32 else c.astype(np.float32)
    # Both views' C V in one product.
    with np.errstate(over="ignore", invalid="ignore"):
        y = c32 @ sketch.views_vectors32  # (m, rounds per view)
    if not np.isfinite(y).all():
        return None
    rounds = signs.shape[1]
    ratios = _ratios32_through(c32, y[:, :rounds], k, n, sketch, rows, safety)
    if ratios is not None and sketch.plain is not None and rows.plain is not None:
        plain = _ratios32_through(c32, y[:, rounds:], k, n, sketch.plain, rows.plain, safety)
        if plain is None:
            return None
        np.maximum(ratios, plain, out=ratios)
    return ratios


def _ratios32_through(
    c32: np.ndarray,
    y: np.ndarray,
    k: int,
    n: int,
    sketch: FreivaldsSketch,
    rows: FreivaldsRows,
    safety: float,
) -> np.ndarray | None:
    """:func:`_residual_ratios32` through one view (``sketch`` and its ``rows``), given
    ``y = C V`` (float32, finite)."""
    b_frobenius = sketch.b_frobenius
    a_norms, w64 = rows.a_norms, rows.w64
    # Only quantities the worker cannot inflate: C's row norms (||c_i W||) capped at an
    # honest row's, and |(C v)_i| at sqrt(n) times that (Cauchy-Schwarz with v = W r).
    weights = sketch.balance.column_weights
    c_norms = honest_row_norms(
        (_row_norms(c32) if weights is None else _column_weighted_row_norms(c32, weights))[:, None],
        a_norms,
        b_frobenius,
    )
    u = CHECK_UNIT_ROUNDOFF
    y64 = y.astype(np.float64)
    y_bound = np.minimum(np.abs(y64), math.sqrt(n) * c_norms)
    tolerance = (
        freivalds_row_tolerance(
            a_norms,
            b_frobenius,
            c_norms,
            k,
            safety=safety,
            columns=n,
            weight_max=sketch.balance.weight_max,
        )  # (a)
        + safety * u * ((n + math.sqrt(n)) * c_norms + (n + 1.0) * y_bound)  # (b)
        + rows.a_terms  # (c) + (d)
    )
    if not np.isfinite(tolerance).all():
        return None
    residual = np.abs(y64 - w64)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratios = residual / tolerance
    ratios[(residual == 0) & (tolerance == 0)] = 0.0  # exact zero rows
    ratios[np.isnan(ratios)] = np.inf
    return ratios


def freivalds(
    a: np.ndarray,
    b: np.ndarray,
    c: np.ndarray,
    *,
    rounds: int = 20,
    rng: np.random.Generator,
    safety: float = FREIVALDS_SAFETY,
    sketch: FreivaldsSketch | None = None,
    rows: FreivaldsRows | None = None,
) -> FreivaldsResult:
    """Check ``c ≈ a @ b`` with ``rounds`` random ±1 vectors (Freivalds' algorithm).

    With ``sketch`` (:func:`freivalds_sketch` of this ``b``, with ``rounds`` vectors), its
    vectors and ``B R`` are used instead of drawing and computing them: the shards of one
    job share the pass over B. With ``rows`` (:func:`freivalds_rows` of this ``a`` and that
    sketch), A's side of the check is not computed again.

    Each round draws r in {-1, +1}^n and compares ``C r`` with ``A (B r)`` row by row, in
    float32 on the host (``B r`` in float64), against the tolerance of the module docstring;
    all rounds run as one (n x rounds) block. Cost: O((mk + kn + mn) * rounds), against O(mkn)
    for the product: about 1.3 ms for m = n = k = 512 and 20 rounds on one core, against 2 ms
    for the float64 check it replaces (61 ms against 117 ms at m = 1024, n = k = 4096).
    Non-finite values or float32 overflow fall back to that float64 check (every product and
    norm in float64, tolerance :func:`freivalds_row_tolerance`).
    Run it off the event loop: it is seconds of BLAS work for large matrices.

    What the bound means with tolerances: over exact arithmetic, a wrong C passes one round with
    probability <= 1/2, so ``rounds`` rounds with <= 2**-rounds. Here a row passes when its
    residual is within tolerance ``t_i`` rather than exactly 0. The guarantee that survives: if
    some element of row i of ``C - AB`` exceeds ``t_i`` in magnitude, then flipping that
    element's sign in r moves the residual by more than ``2 t_i``, so at most one of each such
    pair of vectors passes; each round therefore rejects with probability >= 1/2 and a C with
    such an element passes all rounds with probability <= 2**-rounds (~1e-6 for 20). Errors
    spread thinly over many elements are caught when their combined effect (about their
    Euclidean norm) exceeds ``t_i``; errors below the tolerance are, by design,
    indistinguishable from honest rounding. For N(0, 1) data, k = n, the tolerance is about
    ``6 u k^2``: one element moved by more than 0.024 (k = 256), 0.38 (1024), 6 (4096) or 24
    (8192) is caught, on entries of typical size sqrt(k) = 16, 32, 64, 90. Because every
    column's rounding noise adds into one residual, a *single* wrong element must be large at
    big n to show; :func:`sample_rows` (elementwise) is the finer check for that.

    ``rng`` must be unpredictable to the worker that produced ``c`` (draw it after ``c`` is
    committed): a worker knowing r could fit its error to ``r``'s null space.
    """
    _check_product_shapes(a, b, c)
    if rounds < 1:
        raise KernelError("freivalds: rounds must be >= 1")
    n = b.shape[1]
    if sketch is not None:
        if sketch.signs.shape != (n, rounds) or sketch.z.shape != (b.shape[0], rounds):
            raise KernelError("freivalds: the sketch is of another B or another round count")
        signs = sketch.signs
    else:
        signs = (rng.integers(0, 2, size=(n, rounds), dtype=np.int8) * 2 - 1).astype(np.int8)
    ratios = _residual_ratios32(a, b, c, signs, safety, sketch, rows)
    if ratios is None:
        ratios = _residual_ratios(a, b, c, signs, safety, sketch.balances if sketch else None)
    max_error = float(ratios.max()) if ratios.size else 0.0
    if max_error <= 1.0:
        return FreivaldsResult(ok=True, rounds=rounds, witness=None, max_error=max_error)
    row, column = np.unravel_index(int(np.argmax(ratios)), ratios.shape)
    return FreivaldsResult(
        ok=False,
        rounds=rounds,
        witness=signs[:, column].copy(),
        max_error=max_error,
        row=int(row),
    )


def check_freivalds_witness(
    a: np.ndarray,
    b: np.ndarray,
    c: np.ndarray,
    witness: np.ndarray,
    *,
    safety: float = FREIVALDS_SAFETY,
) -> bool:
    """True when ``witness`` proves ``c`` is not ``a @ b``: some row's residual exceeds tolerance.

    Deterministic, so any peer reaches the same verdict. ``witness`` must be a ±1 vector of
    length n; anything else proves nothing (False). The tolerance assumes the signs were not
    chosen to line up with the honest rounding errors: a fault proof must show ``witness`` came
    from randomness fixed after ``c`` was committed (e.g. a hash of the commitment), which is
    the protocol's job, not this function's. The vector goes through each of B's views
    (:func:`balances_of`), as the check's vectors did.
    """
    _check_product_shapes(a, b, c)
    signs = np.asarray(witness)
    if signs.shape != (b.shape[1],) or not np.all((signs == 1) | (signs == -1)):
        return False
    ratios = _residual_ratios(a, b, c, signs.reshape(-1, 1), safety)
    return bool(ratios.max() > 1.0) if ratios.size else False


def sample_rows(
    kernel: Kernel,
    operands: Operands,
    output: np.ndarray,
    *,
    samples: int,
    rng: np.random.Generator,
) -> SampleResult:
    """Recompute ``samples`` random output rows with NumPy and compare elementwise.

    Rows are drawn without replacement; each element must lie within the kernel's honest-error
    bound (:meth:`Kernel.expected_rows`). An output of the wrong shape fails outright. A single
    bad row among m is caught with probability samples/m; an output that is wrong everywhere is
    caught by any sample.
    """
    kernel.check_operands(operands)
    total = kernel.n_rows(operands)
    if samples < 1:
        raise KernelError("sample_rows: samples must be >= 1")
    output = np.asarray(output)
    if output.shape != kernel.output_shape(operands):
        return SampleResult(False, np.empty(0, np.int64), math.inf, np.empty(0, np.int64))
    rows = np.sort(rng.choice(total, size=min(samples, total), replace=False))
    expected = kernel.expected_rows(operands, rows)
    got = output[rows].astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        deviation = np.abs(got - expected.values)
        ratios = deviation / expected.tolerance
        ratios[(deviation == 0) & (expected.tolerance == 0)] = 0.0
        both_nan = np.isnan(got) & np.isnan(expected.values)
        same_infinity = np.isinf(got) & (got == expected.values)
        ratios[both_nan | same_infinity] = 0.0
        ratios[np.isnan(ratios)] = np.inf
        if expected.unjudged is not None:
            # A non-finite claim where the sums may overflow: an honest result (see
            # RowExpectation.unjudged); a finite one there is judged as any other.
            ratios[~expected.judged(got)] = 0.0
    per_row = ratios.reshape(len(rows), -1).max(axis=1)
    max_error = float(per_row.max())
    bad_rows = rows[per_row > 1.0]
    loose_rows = rows[expected.loose().reshape(len(rows), -1).any(axis=1)]
    return SampleResult(
        ok=bad_rows.size == 0 and loose_rows.size == 0,
        rows=rows,
        max_error=max_error,
        bad_rows=bad_rows,
        loose_rows=loose_rows,
    )


@dataclass(frozen=True)
class RowsVerdict:
    """Outcome of :func:`judge_rows`: ``proven`` when some judged element of the rows is beyond
    the kernel's honest-error bound (or NaN where the exact value is not, or the other way);
    ``out_of_range`` when some element of the rows could not be judged (a non-finite claim
    where the sums may overflow float32, as an honest result may be there, or a bound too wide
    to judge anything: :meth:`~.base.RowExpectation.loose`)."""

    proven: bool
    out_of_range: bool
    #: The rows that prove it (empty unless ``proven``).
    rows: list[int] = field(default_factory=list)
    #: With ``tight=True``: some judged element is beyond :data:`TIGHT_SHARE_ACCEPTED` of the
    #: tight (probabilistic) bound the cheap checks use, though maybe within the worst-case
    #: one: an answer no check confirms.
    beyond_tight: bool = False
    #: With ``tight=True``: some judged element is beyond the whole tight bound, where the bound
    #: can judge: an answer the cheap checks themselves would fail there.
    beyond_bound: bool = False


def judge_rows(
    kernel: Kernel,
    operands: Operands,
    output: np.ndarray,
    rows: Sequence[int],
    *,
    tight: bool = False,
    tight_share: float | None = None,
) -> RowsVerdict:
    """Recompute output ``rows`` in float64 and say whether they prove ``output`` wrong: what
    a fault proof is checked by, and what a requester asks before it blames a worker whose
    answer failed a cheaper check. Judged by the worst-case bound (``expected_rows(...,
    worst_case=True)``), which no honest order of summation exceeds; the cheaper checks use
    the tighter probabilistic one, so an answer they fail may still prove nothing here.
    ``tight``: also say whether some element is beyond :data:`TIGHT_SHARE_ACCEPTED` of that
    tighter bound (``beyond_tight``; ``tight_share`` in its place: 1.0 judges as the cheap checks
    do;
    a second recomputation of the rows' bounds): such an answer is not proven wrong, and not
    confirmed either (a hostile review: accepting every answer within the worst-case bound
    paid errors 1,000-20,000 times honest rounding)."""
    unique = np.unique(np.asarray(rows, dtype=np.int64))
    # In blocks of rows, so that the recomputation's memory stays bounded however many rows
    # are asked (a kernel may cut one row further: attention cuts its queries).
    per_row = max(1, kernel.recompute_elements(operands, 1))
    step = max(1, RECOMPUTE_BLOCK_ELEMENTS // per_row)
    out_of_range = beyond_tight = beyond_bound = False
    proven_rows: list[int] = []
    for start in range(0, len(unique), step):
        index = unique[start : start + step]
        expected = kernel.expected_rows(operands, index, worst_case=True)
        claimed = np.asarray(output)[index].astype(np.float64)
        mismatched_nan = np.isnan(claimed) != np.isnan(expected.values)
        judged = expected.judged(claimed)
        wrong = (_beyond(claimed, expected) | mismatched_nan) & judged
        if np.any(wrong):
            proven_rows.extend(int(r) for r in index[wrong.reshape(len(index), -1).any(axis=1)])
        loose = expected.loose()
        out_of_range = out_of_range or not np.all(judged) or bool(np.any(loose))
        if tight and not beyond_bound:
            probable = kernel.expected_rows(operands, index)
            share = TIGHT_SHARE_ACCEPTED if tight_share is None else tight_share
            # Over the elements the bound can judge: a loose one says nothing either way (a
            # review: one loose row had a liar's errors on every other row paid).
            judgeable = judged & ~loose
            beyond_tight = beyond_tight or bool(
                np.any((_beyond(claimed, probable, share) | mismatched_nan) & judgeable)
            )
            beyond_bound = bool(np.any((_beyond(claimed, probable) | mismatched_nan) & judgeable))
    return RowsVerdict(
        proven=bool(proven_rows),
        out_of_range=out_of_range,
        rows=proven_rows,
        beyond_tight=beyond_tight,
        beyond_bound=beyond_bound,
    )


def _beyond(claimed: np.ndarray, expected: RowExpectation, share: float = 1.0) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        return np.abs(claimed - expected.values) > share * expected.tolerance


def compare(
    expected: np.ndarray, got: np.ndarray, dtype: np.dtype | type, *, rtol: float | None = None
) -> tuple[bool, float]:
    """Compare two workers' outputs of the same job: ``(ok, max_error)``.

    ``dtype`` is the job's *input* dtype (float32 or float16; outputs are always float32), and
    ``rtol`` defaults to :data:`COMPARE_RTOL` for it. Each element may differ by
    ``rtol * (|expected| + rms)``, where rms is the root mean square of ``expected``: the rms
    floor keeps near-zero elements (where two honest summation orders differ by more than their
    own size) from failing. ``max_error``
    is the largest difference in units of that allowance: ok iff ``max_error <= 1``. NaN
    matches NaN and an infinity matches itself; a shape mismatch fails with inf.
    """
    if rtol is None:
        try:
            rtol = COMPARE_RTOL[np.dtype(dtype)]
        except KeyError as exc:
            raise KernelError(f"compare: unsupported dtype {np.dtype(dtype)}") from exc
    x = np.asarray(expected, dtype=np.float64)
    y = np.asarray(got, dtype=np.float64)
    if x.shape != y.shape:
        return False, math.inf
    if x.size == 0:
        return True, 0.0
    finite = np.isfinite(x)
    rms = float(np.sqrt(np.mean(np.square(x[finite])))) if finite.any() else 0.0
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        difference = np.abs(x - y)
        allowed = rtol * (np.abs(x) + rms)
        ratios = difference / allowed
        ratios[(difference == 0) & (allowed == 0)] = 0.0
        matching_non_finite = (np.isnan(x) & np.isnan(y)) | (np.isinf(x) & (x == y))
        ratios[matching_non_finite] = 0.0
        ratios[np.isnan(ratios)] = np.inf
    max_error = float(ratios.max())
    return max_error <= 1.0, max_error
