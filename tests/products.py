"""Comparing a product computed elsewhere with the test's own ``a @ b``."""

from __future__ import annotations

import numpy as np


def assert_product_close(actual: np.ndarray, expected: np.ndarray) -> None:
    """Assert that ``actual`` is ``expected`` (a float32 product) up to rounding.

    A relative tolerance alone fails on elements near zero whose terms cancel: the worker's
    BLAS sums a shard of a few rows in another order than the test's ``a @ b`` of all of them
    (seen: -0.0320274 against -0.0320267, a relative difference of 1.2e-4, in rows of size 8).
    Rounding error scales with the terms, not with their sum, so the absolute part is taken
    from the product's own scale."""
    scale = float(np.max(np.abs(expected[np.isfinite(expected)]), initial=0.0))
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * scale)
