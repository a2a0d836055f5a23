"""Comparing a product computed elsewhere with the test's own ``a @ b``."""

from __future__ import annotations

import numpy as np


def assert_product_close(actual: np.ndarray, expected: np.ndarray) -> None:
    """Assert that ``actual`` is ``expected`` (a float32 product) up to rounding.

    A relative tolerance alone fails on elements near zero whose terms cancel: the worker's
    BLAS sums a shard of a few rows in another order than the test's ``a @ b`` of all of them
    (seen: -0.0320274 against -0.0320267, a relative difference of 1.2e-4, in rows of size 8).
    Rounding error scales with the terms, not with their sum, so each element may also be off
    by 1e-5 of the largest element of its own row: a row's scale, not the whole product's, so
    that a small row's error is not hidden behind a large row (a review)."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    finite = np.where(np.isfinite(expected), np.abs(expected), 0.0)
    row_scale = np.max(finite, axis=-1, keepdims=True) if expected.ndim else finite
    with np.errstate(invalid="ignore"):
        error = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
        allowed = 1e-5 * np.abs(expected.astype(np.float64)) + 1e-5 * row_scale
        close = (error <= allowed) | (actual == expected) | (np.isnan(actual) & np.isnan(expected))
    if not close.all():
        wrong = np.argwhere(~close)
        first = tuple(int(i) for i in wrong[0])
        raise AssertionError(
            f"{len(wrong)} of {close.size} elements differ beyond rounding; first at {first}: "
            f"{actual[first]!r} against {expected[first]!r} (allowed {allowed[first]:.3g})"
        )
