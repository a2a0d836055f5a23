"""The :class:`Kernel` contract, and the rounding-error envelopes the checks rely on.

A kernel is a pure function of named NumPy arrays (its *operands*) to one float32 array. The
network never looks inside: it asks a kernel to validate operands, count FLOPs, cut the work into
row shards, run a shard on a :class:`~.backend.Backend`, glue the parts back, and recompute a few
output rows for verification.

Numerics
--------
Operands are float32, or float16 with float32 accumulation and a float32 output. Where a kernel
rounds an intermediate to the input dtype (the hidden activation of the MLP, the attention
probabilities), that rounding is part of its definition, so every honest implementation does it.

:meth:`Kernel.expected_rows` recomputes output rows in float64 ("exact" for our purposes) together
with an elementwise bound on how far any honest float32-accumulating implementation may be from
them. The bound of one accumulated dot product of length ``n`` is::

    SAFETY * u * ((sqrt(n) + 1) * sum_l |x_l * y_l| + (n + 1) * |sum_l x_l * y_l|),  u = 2**-24

The first term is the probabilistic bound of Higham and Mary (rounding errors of random sign grow
like sqrt(n)); the second covers the systematic drift of a sequential accumulation when the terms
are (nearly) constant, where all roundings go the same way and the error grows like n, relative to
the result. Measured elementwise with SAFETY = 1 on products up to n = 8192 accumulated
sequentially in float32 with one rounding per term (the worst order in practice; cuBLAS SGEMM
accumulates sequentially in each thread), the error reached 0.05 of the bound on normal and
uniform data and 0.25 on constant and rank-one constant data; accumulated in blocks, at most
0.03. SAFETY = 3 leaves a margin of 12 over the worst case measured.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .backend import Backend, NumpyBackend

__all__ = [
    "ACCUMULATION_UNIT_ROUNDOFF",
    "DEFAULT_MAX_ELEMENTS",
    "FLOAT32_MAX",
    "FLOAT32_TINY",
    "RECOMPUTE_BLOCK_ELEMENTS",
    "ROUNDING_SAFETY",
    "SUPPORTED_DTYPES",
    "Kernel",
    "KernelError",
    "Operands",
    "RowExpectation",
    "accumulation_error_bound",
    "flushable_products",
    "overflow_possible",
]

#: Unit roundoff of the float32 accumulator (half an ulp of 1.0).
ACCUMULATION_UNIT_ROUNDOFF = 2.0**-24
#: Multiplier on the rounding-error envelope (see the module docstring).
ROUNDING_SAFETY = 3.0
#: Default limit on the elements of any one operand, output or intermediate (1 GiB of float32).
DEFAULT_MAX_ELEMENTS = 2**28
#: Elements of one block of a recomputation's largest intermediate (float64, about ten arrays
#: of it alive at once: some 160 MiB): checks and fault proofs recompute rows in blocks of this.
RECOMPUTE_BLOCK_ELEMENTS = 1 << 21
#: Smallest positive normal float32. Below it, an honest device may flush products and partial
#: sums to zero (FTZ) and read inputs as zero (DAZ): GPUs do so in fast modes, and gradual
#: underflow alone loses up to half of 2**-149 per operation.
FLOAT32_TINY = float(np.finfo(np.float32).tiny)
#: Largest finite float32: a sum of products beyond it may overflow in an honest float32
#: accumulation (to ±inf, or NaN where infinities of both signs meet), in any order.
FLOAT32_MAX = float(np.finfo(np.float32).max)
#: Input dtypes every kernel accepts.
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))

Operands = Mapping[str, np.ndarray]


class KernelError(ValueError):
    """Operands or a request a kernel cannot accept; the message is one line saying why."""


#: A bound wider than this fraction of the output's scale judges nothing (``RowExpectation.
#: loose``): an honest result may then be anything near the value. Measured (2026-12-07,
#: random shapes): MLPs below 0.01 of it (float16 included), attention below 0.03 with
#: ordinary scores and 0.65 with float32 scores in the thousands (softmax one-hot, each
#: score's rounding then moves whole probabilities).
LOOSE_TOLERANCE_FRACTION = 1.0
#: ... and above this absolute size: the flush-to-zero terms of outputs below float32's normal
#: range (a few FLOAT32_TINY per accumulated term) are wide against such outputs too, but an
#: answer can be off by no more than they allow, far below any normal float32 value.
LOOSE_TOLERANCE_FLOOR = 2.0**-80


@dataclass(frozen=True)
class RowExpectation:
    """Output rows recomputed in float64, and how far an honest result may be from them.

    ``values`` and ``tolerance`` have the shape of the selected output rows; an honest output
    satisfies ``|output - values| <= tolerance`` elementwise.
    """

    values: np.ndarray
    tolerance: np.ndarray
    #: Elements whose sums may overflow float32 in an honest accumulation (None: none): an
    #: honest result there may be ±inf or NaN instead of the value. Once a partial sum has
    #: overflowed, IEEE arithmetic keeps it ±inf or NaN, so a *finite* result there is judged
    #: by :attr:`tolerance` like any other; only a non-finite one is not (:meth:`judged`).
    unjudged: np.ndarray | None = None

    def loose(self) -> np.ndarray:
        """Elementwise: True where :attr:`tolerance`, sound as it is, is too wide to tell an
        honest result from a wrong one: not finite, or above
        :data:`LOOSE_TOLERANCE_FRACTION` of the output's own scale (``|value|`` plus the root
        mean square of these rows' finite values, so that a value near zero in an ordinary
        output is not loose) and above :data:`LOOSE_TOLERANCE_FLOOR`. It arises where an
        intermediate comes near float32's limit: an MLP's hidden unit at -1e38 makes GELU's
        float32 cancellation bound ~1e31, and any output passed (a hostile review of
        2026-12-07)."""
        values = np.abs(self.values)
        finite = np.isfinite(values)
        rms = float(np.sqrt(np.mean(np.square(values[finite])))) if finite.any() else 0.0
        with np.errstate(invalid="ignore", over="ignore"):
            wide = (self.tolerance > LOOSE_TOLERANCE_FRACTION * (values + rms)) & (
                self.tolerance > LOOSE_TOLERANCE_FLOOR
            )
        return wide | ~np.isfinite(self.tolerance)

    def judged(self, claimed: np.ndarray) -> np.ndarray | bool:
        """Elementwise: True where ``claimed`` must lie within :attr:`tolerance` (everywhere
        but the non-finite claims in :attr:`unjudged` elements)."""
        if self.unjudged is None:
            return True
        return ~(self.unjudged & ~np.isfinite(claimed))


def accumulation_error_bound(
    abs_products: np.ndarray,
    exact: np.ndarray,
    length: int,
    *,
    safety: float = ROUNDING_SAFETY,
    flushed: np.ndarray | None = None,
    worst_case: bool = False,
) -> np.ndarray:
    """Elementwise bound on the error of float32-accumulated dot products (module docstring).

    ``abs_products`` is ``sum_l |x_l * y_l|`` per output element (e.g. ``|A| @ |B|``), ``exact``
    the float64 result, ``length`` the number of accumulated terms (a bias add counts as one).
    The ``+ 1`` terms also cover rounding the result to float32. Below float32's normal range
    the relative terms say nothing: each operation may also lose up to :data:`FLOAT32_TINY`
    (flushed to zero), and ``flushed`` (:func:`flushable_products`) adds the products of
    subnormal inputs, which a device reading them as zero loses whole. Where the sums reach
    float32's range the bound means nothing (:func:`overflow_possible`).

    ``worst_case``: ``(length + 1)`` in place of ``sqrt(length) + 1`` on the products' term,
    the bound that holds for every order and every rounding (``|fl(sum) - sum| <= gamma_n
    sum |terms|``), not only where rounding errors are of random sign: what blames a worker
    (:func:`~.verify.judge_rows`, fault proofs). A hostile review (2026-12-07) had numpy's own
    ``a @ b`` beyond the probabilistic bound, 1.2 times, on rows whose partial sums rise and
    then cancel (every rounding the same way, the result near zero)."""
    u = ACCUMULATION_UNIT_ROUNDOFF
    spread = (length + 1.0) if worst_case else (np.sqrt(length) + 1.0)
    bound = safety * (
        u * (spread * abs_products + (length + 1.0) * np.abs(exact)) + (length + 1.0) * FLOAT32_TINY
    )
    if flushed is not None:
        bound = bound + safety * flushed
    return bound


def overflow_possible(abs_products: np.ndarray, length: int) -> np.ndarray:
    """Elementwise: True where a float32 accumulation of these products may overflow in some
    honest order (every partial sum and product is at most ``sum_l |x_l * y_l|``, rounding
    included). NaN sums (NaN inputs) are not counted: NaN propagates in every order."""
    margin = 1.0 + ROUNDING_SAFETY * ACCUMULATION_UNIT_ROUNDOFF * (length + 2.0)
    with np.errstate(invalid="ignore", over="ignore"):
        return abs_products * margin >= FLOAT32_MAX


def flushable_products(x: np.ndarray, y: np.ndarray) -> np.ndarray | None:
    """``sum_l |x_l y_l|`` over the terms with a subnormal float32 factor (``x @ y`` shapes,
    float64 in), which a device reading subnormals as zero drops; None when neither has one
    (the common case: no extra products)."""
    x_small = _subnormal_part(x)
    y_small = _subnormal_part(y)
    if x_small is None and y_small is None:
        return None
    total = 0.0
    if x_small is not None:
        total = total + x_small @ np.abs(y)
    if y_small is not None:
        total = total + np.abs(x) @ y_small
    return np.asarray(total)


def _subnormal_part(x: np.ndarray) -> np.ndarray | None:
    magnitude = np.abs(x)
    small = (magnitude < FLOAT32_TINY) & (magnitude > 0)
    if not small.any():
        return None
    return np.where(small, magnitude, 0.0)


class Kernel(ABC):
    """A compute kernel: named operands in, one float32 array out, cut into row shards.

    Class attributes describe the kernel to the scheduler:

    * ``name``: registry name, also what a peer advertises in its capacity record;
    * ``operand_names``: exactly the operands :meth:`check_operands` accepts;
    * ``split_operand``: the operand whose axis 0 is cut into shards; its row count is the
      kernel's row count, and output row ``i`` depends only on row ``i`` of it;
    * ``split_operands``: every operand cut along axis 0 with it (attention cuts q, k and v);
    * ``resident``: operands every shard needs whole (weights, the ``B`` of a matmul); a worker
      keeps them cached on its device across shards of the same job;
    * ``check``: the default verification, ``"freivalds"`` or ``"sample"`` (see ``verify``);
    * ``cost_is_flops``: True when the kernel's time is its :meth:`flops` in BLAS and nothing
      else of note (no element-wise work its FLOP count leaves out): only then can a worker
      predict a shard's time from the speed of the shards before it (a small one may then
      run on its event loop, see ``mtor_p2p.compute.executor``).

    Subclasses implement the shape rules (:meth:`_check_shapes`), :meth:`flops`,
    :meth:`output_shape`, the backend-generic computation (:meth:`forward`) and
    :meth:`expected_rows`.
    """

    name: ClassVar[str]
    operand_names: ClassVar[tuple[str, ...]]
    split_operand: ClassVar[str]
    split_operands: ClassVar[tuple[str, ...]]
    resident: ClassVar[frozenset[str]]
    check: ClassVar[str]
    cost_is_flops: ClassVar[bool] = False

    def __init__(self, *, max_elements: int = DEFAULT_MAX_ELEMENTS) -> None:
        self.max_elements = int(max_elements)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_elements={self.max_elements})"

    # -- validation --------------------------------------------------------------------------

    def check_operands(self, operands: Operands) -> None:
        """Raise :class:`KernelError` unless ``operands`` are acceptable.

        Checks the names, that each is a NumPy array of a supported dtype (all the same), the
        number of dimensions and consistent sizes, no empty axis, and that no operand, output or
        intermediate exceeds ``max_elements``. Non-finite values are allowed (they propagate).
        """
        names = set(operands)
        expected = set(self.operand_names)
        if names != expected:
            missing = ", ".join(sorted(expected - names)) or "none"
            unexpected = ", ".join(sorted(map(str, names - expected))) or "none"
            raise KernelError(
                f"{self.name}: wrong operands (missing: {missing}; unexpected: {unexpected})"
            )
        dtype = None
        for operand_name in self.operand_names:
            array = operands[operand_name]
            if not isinstance(array, np.ndarray):
                raise KernelError(
                    f"{self.name}: operand {operand_name!r} is {type(array).__name__}, "
                    "not a numpy array"
                )
            if array.dtype not in SUPPORTED_DTYPES:
                raise KernelError(
                    f"{self.name}: operand {operand_name!r} has dtype {array.dtype}, "
                    "expected float32 or float16"
                )
            if dtype is None:
                dtype = array.dtype
            elif array.dtype != dtype:
                raise KernelError(
                    f"{self.name}: operands mix dtypes ({dtype} and {array.dtype} "
                    f"in {operand_name!r})"
                )
            if 0 in array.shape:
                raise KernelError(
                    f"{self.name}: operand {operand_name!r} is empty (shape {array.shape})"
                )
            self._check_size(f"operand {operand_name!r}", array.size)
        self._check_shapes(operands)

    def _check_size(self, what: str, elements: int) -> None:
        if elements > self.max_elements:
            raise KernelError(
                f"{self.name}: {what} has {elements} elements, above the limit "
                f"of {self.max_elements}"
            )

    def _check_ndim(self, operands: Operands, ndims: Mapping[str, int]) -> None:
        for operand_name, ndim in ndims.items():
            if operands[operand_name].ndim != ndim:
                raise KernelError(
                    f"{self.name}: operand {operand_name!r} must have {ndim} dimensions, "
                    f"got shape {operands[operand_name].shape}"
                )

    def _mismatch(self, detail: str) -> KernelError:
        return KernelError(f"{self.name}: shape mismatch: {detail}")

    @abstractmethod
    def _check_shapes(self, operands: Operands) -> None:
        """Kernel-specific dimension rules, and size limits of outputs and intermediates."""

    # -- description -------------------------------------------------------------------------

    @abstractmethod
    def flops(self, operands: Operands) -> int:
        """Floating-point operations of the matrix products (a multiply-add counts 2).

        Elementwise work (bias, GELU, softmax) is a 1/dim fraction of it and is not counted.
        """

    @abstractmethod
    def output_shape(self, operands: Operands) -> tuple[int, ...]:
        """Shape of the float32 output."""

    def output_dtype(self, operands: Operands) -> np.dtype:
        """dtype of the output: float32 for float32 and float16 operands alike (float16
        products accumulate and return in float32). A requester checks a worker's answer
        against it, as against :meth:`output_shape`."""
        return np.dtype(np.float32)

    def n_rows(self, operands: Operands) -> int:
        """Number of rows (axis 0 of ``split_operand``, and of the output)."""
        return int(operands[self.split_operand].shape[0])

    def recompute_elements(self, operands: Operands, n_rows: int) -> int:
        """Elements of the largest intermediate :meth:`expected_rows` makes for ``n_rows`` rows
        (float64 each, about ten of them at once): what recomputing them costs, in memory and,
        in proportion, in time. By default one output row's elements."""
        shape = self.output_shape(operands)
        return n_rows * int(np.prod(shape[1:], dtype=np.int64))

    # -- computation -------------------------------------------------------------------------

    def reference(self, operands: Operands) -> np.ndarray:
        """The NumPy result (float32), which every backend is checked against."""
        return self.run(operands, NumpyBackend())

    def run(
        self, operands: Operands, backend: Backend, *, keys: Mapping[str, str] | None = None
    ) -> np.ndarray:
        """Validate ``operands``, compute on ``backend``, return the float32 host result.

        ``keys`` maps resident operand names to content keys (see
        :func:`~.backend.content_key`); those operands are served from / stored in the
        backend's resident cache. Keys of non-resident operands are ignored.

        The backend moves the data (:meth:`~.backend.Backend.run`): on a GPU it may cut the rows
        into chunks and overlap their copies with :meth:`forward` on earlier chunks, which is
        sound because output row ``i`` depends only on row ``i`` of the split operands.
        """
        self.check_operands(operands)
        return backend.run(self, operands, keys or {})

    @abstractmethod
    def forward(self, backend: Backend, operands: Mapping[str, Any]) -> Any:
        """Compute on operands already on ``backend`` (see :meth:`Backend.put`).

        Returns a float32 backend array and does not validate: call :meth:`check_operands` on
        the host arrays first. Must run inside ``backend.activate()``. :meth:`run` is this with
        the validation and the copies; benchmarks time this alone.
        """

    # -- sharding ----------------------------------------------------------------------------

    def shard_rows(self, operands: Operands, n_shards: int) -> list[tuple[int, int]]:
        """Cut the rows into at most ``n_shards`` contiguous ``(start, stop)`` ranges.

        The ranges are balanced (sizes differ by at most one, larger first), cover every row in
        order, and none is empty: asking for more shards than rows gives one row per shard.
        """
        if n_shards < 1:
            raise KernelError(f"{self.name}: n_shards must be >= 1, got {n_shards}")
        rows = self.n_rows(operands)
        count = min(n_shards, rows)
        base, extra = divmod(rows, count)
        ranges = []
        start = 0
        for index in range(count):
            stop = start + base + (1 if index < extra else 0)
            ranges.append((start, stop))
            start = stop
        return ranges

    def shard_operands(self, operands: Operands, start: int, stop: int) -> dict[str, np.ndarray]:
        """The operands of rows ``start:stop``: split operands sliced (views), the rest as is."""
        rows = self.n_rows(operands)
        if not 0 <= start < stop <= rows:
            raise KernelError(f"{self.name}: bad row range {start}:{stop} of {rows} rows")
        return {
            operand_name: array[start:stop] if operand_name in self.split_operands else array
            for operand_name, array in operands.items()
        }

    def assemble(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        """Concatenate shard outputs (in row order) along axis 0."""
        if not parts:
            raise KernelError(f"{self.name}: nothing to assemble")
        return np.concatenate(parts, axis=0)

    # -- verification support ----------------------------------------------------------------

    @abstractmethod
    def expected_rows(
        self, operands: Operands, row_indices: Sequence[int], *, worst_case: bool = False
    ) -> RowExpectation:
        """Output rows ``row_indices`` in float64 with their honest-error bound (module doc);
        ``worst_case``: every accumulation bounded for any order and rounding
        (:func:`accumulation_error_bound`), as what blames a worker must be."""

    def output_rows(self, operands: Operands, row_indices: Sequence[int]) -> np.ndarray:
        """Recompute only output rows ``row_indices`` with NumPy (float32)."""
        return self.expected_rows(operands, row_indices).values.astype(np.float32)

    def _row_index_array(self, operands: Operands, row_indices: Sequence[int]) -> np.ndarray:
        rows = np.asarray(row_indices, dtype=np.int64).reshape(-1)
        total = self.n_rows(operands)
        if rows.size and (rows.min() < 0 or rows.max() >= total):
            raise KernelError(f"{self.name}: row index out of range 0..{total - 1}")
        return rows


def round_to_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``values`` (float64) rounded to ``dtype`` and widened back to float64."""
    return values.astype(dtype).astype(np.float64)


def rounding_spread(low: np.ndarray, high: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Largest gap between two roundings to ``dtype`` of values lying in ``[low, high]``.

    Rounding is monotone, so an honest value anywhere in the interval, and our reference value
    inside it, both round into ``[round(low), round(high)]``.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        return round_to_dtype(high, dtype) - round_to_dtype(low, dtype)
