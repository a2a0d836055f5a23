"""Matrix product ``C = A @ B``: A (m, k), B (k, n); shards are row blocks of A, B is resident."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .backend import Backend
from .base import (
    Kernel,
    Operands,
    RowExpectation,
    accumulation_error_bound,
    flushable_products,
    overflow_possible,
)

__all__ = ["MatmulKernel"]


class MatmulKernel(Kernel):
    """``C = A @ B`` with float32 accumulation; float32 output for float32 or float16 inputs.

    Verified by Freivalds' check by default: O(mk + kn + mn) instead of recomputing O(mkn).
    """

    name = "matmul"
    operand_names = ("a", "b")
    split_operand = "a"
    split_operands = ("a",)
    resident = frozenset({"b"})
    check = "freivalds"
    cost_is_flops = True

    def _check_shapes(self, operands: Operands) -> None:
        self._check_ndim(operands, {"a": 2, "b": 2})
        (m, k), (k_b, n) = operands["a"].shape, operands["b"].shape
        if k != k_b:
            raise self._mismatch(f"a is {m}x{k} but b is {k_b}x{n}")
        self._check_size("output", m * n)

    def flops(self, operands: Operands) -> int:
        """``2 m k n``."""
        (m, k), n = operands["a"].shape, operands["b"].shape[1]
        return 2 * m * k * n

    def output_shape(self, operands: Operands) -> tuple[int, ...]:
        """``(m, n)``."""
        return (operands["a"].shape[0], operands["b"].shape[1])

    def forward(self, backend: Backend, operands: Mapping[str, Any]) -> Any:
        return backend.matmul(operands["a"], operands["b"])

    def expected_rows(
        self, operands: Operands, row_indices: Sequence[int], *, worst_case: bool = False
    ) -> RowExpectation:
        """Rows of ``A @ B`` in float64, each element within the bound of a length-k product."""
        self.check_operands(operands)
        rows = self._row_index_array(operands, row_indices)
        a = operands["a"][rows].astype(np.float64)
        b = operands["b"].astype(np.float64)
        exact = a @ b
        magnitude = np.abs(a) @ np.abs(b)
        tolerance = accumulation_error_bound(
            magnitude, exact, a.shape[1], flushed=flushable_products(a, b), worst_case=worst_case
        )
        return RowExpectation(
            values=exact, tolerance=tolerance, unjudged=overflow_possible(magnitude, a.shape[1])
        )
