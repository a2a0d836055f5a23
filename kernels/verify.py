"""Checking a worker's output without trusting it: pure functions of NumPy arrays.

* :func:`freivalds` checks a claimed matrix product in O(mk + kn + mn) per round.
* :func:`check_freivalds_witness` lets anyone re-check the evidence a failed check produced.
* :func:`sample_rows` recomputes a few random output rows of any kernel.
* :func:`compare` compares two workers' outputs (redundant execution).

All tolerances come from the float32-accumulation error envelope described in ``base``: they
are sized so that an honest result, whatever its summation order (cuBLAS, a BLAS library, blocks
summed separately), passes, and anything larger is reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .base import ACCUMULATION_UNIT_ROUNDOFF, Kernel, KernelError, Operands

__all__ = [
    "COMPARE_RTOL",
    "FREIVALDS_SAFETY",
    "FreivaldsResult",
    "SampleResult",
    "check_freivalds_witness",
    "compare",
    "freivalds",
    "freivalds_row_tolerance",
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
    its elementwise tolerance (pass iff <= 1); ``bad_rows`` the sampled rows that failed.
    """

    ok: bool
    rows: np.ndarray
    max_error: float
    bad_rows: np.ndarray


def _matmul64(matrix: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """``matrix @ vectors`` in float64, converting ``matrix`` a block of rows at a time."""
    out = np.empty((matrix.shape[0], vectors.shape[1]), np.float64)
    step = max(1, _BLOCK_ELEMENTS // max(1, matrix.shape[1]))
    for start in range(0, matrix.shape[0], step):
        out[start : start + step] = matrix[start : start + step].astype(np.float64) @ vectors
    return out


def _row_norms64(matrix: np.ndarray) -> np.ndarray:
    """Euclidean norm of each row, accumulated in float64 a block of rows at a time."""
    out = np.empty(matrix.shape[0], np.float64)
    step = max(1, _BLOCK_ELEMENTS // max(1, matrix.shape[1]))
    for start in range(0, matrix.shape[0], step):
        block = matrix[start : start + step].astype(np.float64)
        out[start : start + step] = np.sqrt(np.einsum("ij,ij->i", block, block))
    return out


def freivalds_row_tolerance(
    a_row_norms: np.ndarray,
    b_frobenius: float,
    c_row_norms: np.ndarray,
    k: int,
    *,
    safety: float = FREIVALDS_SAFETY,
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
    """
    u = ACCUMULATION_UNIT_ROUNDOFF
    return safety * u * ((math.sqrt(k) + 1.0) * a_row_norms * b_frobenius + (k + 1.0) * c_row_norms)


def _check_product_shapes(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> None:
    if a.ndim != 2 or b.ndim != 2 or c.ndim != 2:
        raise KernelError("freivalds: a, b and c must be matrices")
    if a.shape[1] != b.shape[0] or c.shape != (a.shape[0], b.shape[1]):
        raise KernelError(f"freivalds: shapes {a.shape} @ {b.shape} != {c.shape}")


def _residual_ratios(
    a: np.ndarray, b: np.ndarray, c: np.ndarray, signs: np.ndarray, safety: float
) -> np.ndarray:
    """``|C R - A (B R)| / tolerance`` for the ±1 columns of ``signs`` (n, rounds), float64.

    Rows where the exact projection is non-finite (NaN or inf in the inputs) count as matching
    when C's projection is non-finite the same way (same NaN, or the same infinity).
    """
    vectors = signs.astype(np.float64)
    expected = _matmul64(a, _matmul64(b, vectors))
    claimed = _matmul64(c, vectors)
    tolerance = freivalds_row_tolerance(
        _row_norms64(a),
        float(np.linalg.norm(_row_norms64(b))),
        _row_norms64(c),
        a.shape[1],
        safety=safety,
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


def freivalds(
    a: np.ndarray,
    b: np.ndarray,
    c: np.ndarray,
    *,
    rounds: int = 20,
    rng: np.random.Generator,
    safety: float = FREIVALDS_SAFETY,
) -> FreivaldsResult:
    """Check ``c ≈ a @ b`` with ``rounds`` random ±1 vectors (Freivalds' algorithm).

    Each round draws r in {-1, +1}^n and compares ``C r`` with ``A (B r)`` row by row, in
    float64 on the host, against :func:`freivalds_row_tolerance`; all rounds run as one
    (n x rounds) block. Cost: O((mk + kn + mn) * rounds), against O(mkn) for the product.

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
    signs = (rng.integers(0, 2, size=(n, rounds), dtype=np.int8) * 2 - 1).astype(np.int8)
    ratios = _residual_ratios(a, b, c, signs, safety)
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
    the protocol's job, not this function's.
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
    per_row = ratios.reshape(len(rows), -1).max(axis=1)
    max_error = float(per_row.max())
    bad_rows = rows[per_row > 1.0]
    return SampleResult(ok=bad_rows.size == 0, rows=rows, max_error=max_error, bad_rows=bad_rows)


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
