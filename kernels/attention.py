"""Batched scaled dot-product attention (non-causal).

``out = softmax(q @ k^T / sqrt(head_dim)) @ v`` per batch entry and head, with
q (batch, heads, seq_q, head_dim), k (batch, heads, seq_k, head_dim), v (batch, heads, seq_k,
head_dim_v); output (batch, heads, seq_q, head_dim_v) float32. Self-attention has seq_q = seq_k.

Precision: scores accumulate in float32 with the scale applied in float32; the softmax is
evaluated in float32 and made numerically stable by subtracting each row's maximum before
``exp`` (so ``exp`` never overflows and the largest term is exactly 1). With float16 inputs the
probabilities are rounded to float16 before the product with v, as fused float16 attention
kernels do; float32 inputs keep them float32.

Shards are slices of the batch axis (of q, k and v together); nothing is resident, since every
batch entry has its own keys and values. Causal masking is not offered: it would be a separate
kernel with its own name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .backend import Backend
from .base import (
    ACCUMULATION_UNIT_ROUNDOFF,
    RECOMPUTE_BLOCK_ELEMENTS,
    Kernel,
    Operands,
    RowExpectation,
    accumulation_error_bound,
    flushable_products,
    overflow_possible,
    round_to_dtype,
    rounding_spread,
)

__all__ = ["AttentionKernel", "stable_softmax"]

#: Error of float32 ``exp`` plus the rounding of its argument and of the final division, in
#: units of u (CUDA ``expf`` and libm are within 2 ulp), with margin.
_SOFTMAX_EVALUATION_ULPS = 4.0


def stable_softmax(xp: Any, scores: Any) -> Any:
    """Softmax over the last axis of ``scores``, in place (returns ``scores``).

    Subtracting the row maximum first keeps every ``exp`` argument <= 0: no overflow, and the
    row sum is at least 1, so the division is well conditioned.
    """
    scores -= scores.max(axis=-1, keepdims=True)
    xp.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


class AttentionKernel(Kernel):
    """Non-causal batched scaled dot-product attention; shards are batch slices."""

    name = "attention"
    operand_names = ("q", "k", "v")
    split_operand = "q"
    split_operands = ("q", "k", "v")
    resident = frozenset()
    check = "sample"

    def _check_shapes(self, operands: Operands) -> None:
        self._check_ndim(operands, {"q": 4, "k": 4, "v": 4})
        batch, heads, seq_q, head_dim = operands["q"].shape
        k_batch, k_heads, seq_k, k_dim = operands["k"].shape
        v_batch, v_heads, v_seq, head_dim_v = operands["v"].shape
        if (k_batch, k_heads, k_dim) != (batch, heads, head_dim):
            raise self._mismatch(
                f"k is {operands['k'].shape}, expected ({batch}, {heads}, seq_k, {head_dim})"
            )
        if (v_batch, v_heads, v_seq) != (batch, heads, seq_k):
            raise self._mismatch(
                f"v is {operands['v'].shape}, expected ({batch}, {heads}, {seq_k}, head_dim_v)"
            )
        self._check_size("attention scores", batch * heads * seq_q * seq_k)
        self._check_size("output", batch * heads * seq_q * head_dim_v)

    def flops(self, operands: Operands) -> int:
        """``2 batch heads seq_q seq_k (head_dim + head_dim_v)``: q k^T, then p v."""
        batch, heads, seq_q, head_dim = operands["q"].shape
        seq_k, head_dim_v = operands["v"].shape[2:]
        return 2 * batch * heads * seq_q * seq_k * (head_dim + head_dim_v)

    def output_shape(self, operands: Operands) -> tuple[int, ...]:
        """``(batch, heads, seq_q, head_dim_v)``."""
        return (*operands["q"].shape[:3], operands["v"].shape[3])

    def forward(self, backend: Backend, operands: Mapping[str, Any]) -> Any:
        xp = backend.xp
        q, k, v = operands["q"], operands["k"], operands["v"]
        dtype = q.dtype
        batch, heads, seq_q, head_dim = q.shape
        seq_k, head_dim_v = v.shape[2:]
        # One batched product over (batch * heads) matrices.
        scores = backend.matmul(
            q.reshape(batch * heads, seq_q, head_dim),
            k.reshape(batch * heads, seq_k, head_dim),
            transpose_b=True,
            scale=1.0 / math.sqrt(head_dim),
        )
        probabilities = stable_softmax(xp, scores)
        if dtype == np.float16:
            probabilities = probabilities.astype(xp.float16)
        out = backend.matmul(probabilities, v.reshape(batch * heads, seq_k, head_dim_v))
        return out.reshape(batch, heads, seq_q, head_dim_v)

    def recompute_elements(self, operands: Operands, n_rows: int) -> int:
        """The scores' elements (heads x seq_q x seq_k per batch entry) for ``n_rows`` entries."""
        _, heads, seq_q, _ = operands["q"].shape
        return n_rows * heads * seq_q * int(operands["k"].shape[2])

    def expected_rows(
        self, operands: Operands, row_indices: Sequence[int], *, worst_case: bool = False
    ) -> RowExpectation:
        """Batch entries ``row_indices`` in float64, with the bound propagated through softmax.

        A score error of at most ``e_j`` (row maximum ``E``) moves probability ``p_j`` by a
        factor within ``exp(+-(e_j + E))``; evaluating softmax in float32 adds a relative
        ``u (|s_j - max| + c) + sum_l p_l u (|s_l - max| + c) + seq_k u`` (the last term bounds
        the float32 row sum of positive terms in any order). float16 probabilities then use
        :func:`~.base.rounding_spread`; the output adds spread @ |v| and the accumulation bound
        of length seq_k.
        """
        self.check_operands(operands)
        rows = self._row_index_array(operands, row_indices)
        dtype = operands["q"].dtype
        q = operands["q"][rows].astype(np.float64)
        k = operands["k"][rows].astype(np.float64)
        v = operands["v"][rows].astype(np.float64)
        # Query rows are independent (softmax runs along the keys): cut them into blocks so
        # that about ten float64 arrays of one block's scores stay within
        # RECOMPUTE_BLOCK_ELEMENTS, whatever the sequence (a hostile review: one fault proof of
        # a (1, 1, 8192, 1) attention made every peer verifying it allocate 4.6 GiB).
        seq_q = q.shape[2]
        per_query = max(1, q.shape[0] * q.shape[1] * k.shape[2])
        block = max(1, RECOMPUTE_BLOCK_ELEMENTS // per_query)
        parts = [
            _expected_block(q[:, :, start : start + block], k, v, dtype, worst_case)
            for start in range(0, seq_q, block)
        ]
        if len(parts) == 1:
            return parts[0]
        return RowExpectation(
            values=np.concatenate([p.values for p in parts], axis=2),
            tolerance=np.concatenate([p.tolerance for p in parts], axis=2),
            # Every block marks its unjudged elements (an array, never None).
            unjudged=np.concatenate([np.asarray(p.unjudged) for p in parts], axis=2),
        )


def _expected_block(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, dtype: np.dtype, worst_case: bool = False
) -> RowExpectation:
    """:meth:`AttentionKernel.expected_rows` for one block of query rows (float64 in)."""
    u = ACCUMULATION_UNIT_ROUNDOFF
    head_dim = q.shape[-1]
    seq_k = k.shape[2]
    scale = 1.0 / math.sqrt(head_dim)

    k_t = np.swapaxes(k, -1, -2)
    scores = (q @ k_t) * scale
    raw_magnitude = np.abs(q) @ np.abs(k_t)
    score_magnitude = raw_magnitude * scale
    score_error = accumulation_error_bound(
        score_magnitude,
        scores,
        head_dim + 1,
        flushed=_scaled(flushable_products(q, k_t), scale),
        worst_case=worst_case,
    )
    # A score that may overflow float32 makes its row's honest output non-finite (softmax
    # mixes every score of the row): checked on the unscaled products, since a backend may
    # scale before or after the product (a review: NumPy's scales after, and framed an honest
    # worker whose raw scores overflowed while the scaled ones did not).
    scores_out = overflow_possible(raw_magnitude, head_dim + 1).any(axis=-1, keepdims=True)
    shifted = scores - scores.max(axis=-1, keepdims=True)
    probabilities = stable_softmax(np, scores.copy())

    evaluation = u * (np.abs(shifted) + _SOFTMAX_EVALUATION_ULPS)
    normaliser = (probabilities * evaluation).sum(axis=-1, keepdims=True) + seq_k * u
    score_shift = score_error + score_error.max(axis=-1, keepdims=True)
    with np.errstate(over="ignore"):
        relative = np.expm1(score_shift) + (1.0 + np.expm1(score_shift)) * (
            evaluation + normaliser
        ) * (1.0 + 2.0 * u)
    if dtype == np.float16:
        reference_probabilities = round_to_dtype(probabilities, dtype)
        probability_spread = rounding_spread(
            probabilities * np.maximum(1.0 - relative, 0.0),
            probabilities * (1.0 + relative),
            dtype,
        )
    else:
        reference_probabilities = probabilities
        probability_spread = probabilities * relative

    out = reference_probabilities @ v
    magnitude = (reference_probabilities + probability_spread) @ np.abs(v)
    tolerance = probability_spread @ np.abs(v) + accumulation_error_bound(
        magnitude,
        out,
        seq_k,
        flushed=flushable_products(reference_probabilities + probability_spread, v),
        worst_case=worst_case,
    )
    unjudged = overflow_possible(magnitude, seq_k) | scores_out
    return RowExpectation(values=out, tolerance=tolerance, unjudged=unjudged)


def _scaled(products: np.ndarray | None, scale: float) -> np.ndarray | None:
    return None if products is None else products * scale
