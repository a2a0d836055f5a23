"""Two-layer perceptron ``y = gelu(x @ W1 + b1) @ W2 + b2`` over a batch of rows.

GELU is the tanh approximation (Hendrycks and Gimpel; the form GPT-2 and BERT use)::

    gelu(h) = 0.5 * h * (1 + tanh(sqrt(2 / pi) * (h + 0.044715 * h**3)))

It is within 1e-3 of the exact ``h * Phi(h)``; the approximation *is* the kernel's definition, so
every implementation must use it.

Precision: products accumulate in float32 and biases and GELU are applied in float32. With
float16 inputs the GELU output is rounded to float16 before the second product, as float16
inference does (the second product then runs on tensor cores); float32 inputs keep it float32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .backend import Backend
from .base import (
    ACCUMULATION_UNIT_ROUNDOFF,
    Kernel,
    Operands,
    RowExpectation,
    accumulation_error_bound,
    flushable_products,
    overflow_possible,
    round_to_dtype,
    rounding_spread,
)

__all__ = ["GELU_LIPSCHITZ", "MlpKernel", "gelu_tanh"]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715
#: Largest slope of the tanh GELU (1.1289 near h = 1.5), rounded up: how an input error grows.
GELU_LIPSCHITZ = 1.13
#: Error of evaluating the GELU formula in float32, in units of u * |h| (a few roundings, one
#: tanh of at most 2 ulp, and the cancellation in 1 + tanh for negative h), with margin.
_GELU_EVALUATION_ULPS = 8.0


def gelu_tanh(xp: Any, h: Any) -> Any:
    """The tanh GELU of ``h`` in ``h``'s float dtype, with ``xp`` = numpy or cupy.

    Overwrites nothing: returns a new array.
    """
    dtype = h.dtype.type
    inner = h * h
    inner *= dtype(_GELU_CUBIC)
    inner += dtype(1.0)
    inner *= h
    inner *= dtype(_SQRT_2_OVER_PI)
    out = xp.tanh(inner, out=inner)
    out += dtype(1.0)
    out *= h
    out *= dtype(0.5)
    return out


class MlpKernel(Kernel):
    """``y = gelu(x @ W1 + b1) @ W2 + b2``; shards are row blocks of x, weights are resident.

    Shapes: x (batch, d_in), w1 (d_in, d_hidden), b1 (d_hidden,), w2 (d_hidden, d_out),
    b2 (d_out,); output (batch, d_out) float32. Verified by sampling rows by default.
    """

    name = "mlp"
    operand_names = ("x", "w1", "b1", "w2", "b2")
    split_operand = "x"
    split_operands = ("x",)
    resident = frozenset({"w1", "b1", "w2", "b2"})
    check = "sample"

    def _check_shapes(self, operands: Operands) -> None:
        self._check_ndim(operands, {"x": 2, "w1": 2, "b1": 1, "w2": 2, "b2": 1})
        batch, d_in = operands["x"].shape
        w1_in, d_hidden = operands["w1"].shape
        w2_hidden, d_out = operands["w2"].shape
        if w1_in != d_in:
            raise self._mismatch(f"x has {d_in} features but w1 has {w1_in} rows")
        if operands["b1"].shape[0] != d_hidden:
            raise self._mismatch(f"b1 has {operands['b1'].shape[0]} entries, w1 {d_hidden} columns")
        if w2_hidden != d_hidden:
            raise self._mismatch(f"w2 has {w2_hidden} rows but w1 has {d_hidden} columns")
        if operands["b2"].shape[0] != d_out:
            raise self._mismatch(f"b2 has {operands['b2'].shape[0]} entries, w2 {d_out} columns")
        self._check_size("hidden activation", batch * d_hidden)
        self._check_size("output", batch * d_out)

    def flops(self, operands: Operands) -> int:
        """``2 batch (d_in d_hidden + d_hidden d_out)``."""
        batch, d_in = operands["x"].shape
        d_hidden, d_out = operands["w2"].shape
        return 2 * batch * (d_in * d_hidden + d_hidden * d_out)

    def output_shape(self, operands: Operands) -> tuple[int, ...]:
        """``(batch, d_out)``."""
        return (operands["x"].shape[0], operands["w2"].shape[1])

    def forward(self, backend: Backend, operands: Mapping[str, Any]) -> Any:
        xp = backend.xp
        dtype = operands["x"].dtype
        hidden = backend.matmul(operands["x"], operands["w1"])
        hidden += operands["b1"].astype(xp.float32)
        activation = gelu_tanh(xp, hidden)
        if dtype == np.float16:
            activation = activation.astype(xp.float16)
        out = backend.matmul(activation, operands["w2"])
        out += operands["b2"].astype(xp.float32)
        return out

    def recompute_elements(self, operands: Operands, n_rows: int) -> int:
        """The hidden layer's elements (and the output's) for ``n_rows`` rows."""
        return n_rows * (int(operands["w1"].shape[1]) + int(operands["w2"].shape[1]))

    def expected_rows(
        self, operands: Operands, row_indices: Sequence[int], *, worst_case: bool = False
    ) -> RowExpectation:
        """Rows of ``y`` in float64, with the bound propagated through both layers.

        Layer 1: accumulation bound of length d_in + 1 (bias), widened by GELU's slope plus its
        float32 evaluation error. float16: the rounding of the activation may differ between
        two honest workers only where the interval of possible activations straddles a rounding
        point, which :func:`~.base.rounding_spread` measures exactly. Layer 2: that spread times
        |W2|, plus the accumulation bound of length d_hidden + 1.
        """
        self.check_operands(operands)
        rows = self._row_index_array(operands, row_indices)
        dtype = operands["x"].dtype
        x = operands["x"][rows].astype(np.float64)
        w1 = operands["w1"].astype(np.float64)
        b1 = operands["b1"].astype(np.float64)
        w2 = operands["w2"].astype(np.float64)
        b2 = operands["b2"].astype(np.float64)
        d_in, d_hidden = w1.shape

        hidden = x @ w1 + b1
        hidden_magnitude = np.abs(x) @ np.abs(w1) + np.abs(b1)
        hidden_error = accumulation_error_bound(
            hidden_magnitude,
            hidden,
            d_in + 1,
            flushed=flushable_products(x, w1),
            worst_case=worst_case,
        )
        # A hidden value that may overflow float32 makes its row's honest output non-finite.
        hidden_out = overflow_possible(hidden_magnitude, d_in + 1).any(axis=-1, keepdims=True)
        activation = gelu_tanh(np, hidden)
        activation_error = (
            GELU_LIPSCHITZ * hidden_error
            + _GELU_EVALUATION_ULPS * ACCUMULATION_UNIT_ROUNDOFF * np.abs(hidden)
        )
        if dtype == np.float16:
            reference_activation = round_to_dtype(activation, dtype)
            activation_spread = rounding_spread(
                activation - activation_error, activation + activation_error, dtype
            )
        else:
            reference_activation = activation
            activation_spread = activation_error

        out = reference_activation @ w2 + b2
        magnitude = (np.abs(reference_activation) + activation_spread) @ np.abs(w2) + np.abs(b2)
        tolerance = activation_spread @ np.abs(w2) + accumulation_error_bound(
            magnitude,
            out,
            d_hidden + 1,
            flushed=flushable_products(np.abs(reference_activation) + activation_spread, w2),
            worst_case=worst_case,
        )
        unjudged = overflow_possible(magnitude, d_hidden + 1) | hidden_out
        return RowExpectation(values=out, tolerance=tolerance, unjudged=unjudged)
