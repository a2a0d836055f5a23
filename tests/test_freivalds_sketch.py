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
    for array in (sketch.signs, sketch.z, sketch.z_norms, sketch.signs32, sketch.z32):
        with pytest.raises(ValueError, match="read-only"):
            array[0] = 0
