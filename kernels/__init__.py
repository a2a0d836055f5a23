"""MTOR compute kernels: pure functions of NumPy arrays, run on a GPU with CuPy or on NumPy.

Shipped in the wheel as ``mtor_kernels``. The network knows kernels only by name
(:data:`KERNELS`): it validates operands, cuts them into row shards, has workers run the shards,
assembles the parts and verifies them with :mod:`.verify`.

    >>> import numpy as np
    >>> from mtor_kernels import get_kernel, select_backend
    >>> kernel = get_kernel("matmul")
    >>> operands = {"a": np.ones((4, 3), np.float32), "b": np.ones((3, 2), np.float32)}
    >>> kernel.run(operands, select_backend("numpy")).tolist()
    [[3.0, 3.0], [3.0, 3.0], [3.0, 3.0], [3.0, 3.0]]
"""

from __future__ import annotations

import logging

from .attention import AttentionKernel
from .backend import (
    Backend,
    BackendUnavailable,
    CacheStats,
    CupyBackend,
    GpuStatus,
    NumpyBackend,
    PinnedHostPool,
    PinnedStats,
    ResidentCache,
    content_key,
    force_float32_math,
    gpu_available,
    gpu_status,
    report_cpu_fallback,
    select_backend,
)
from .base import (
    ACCUMULATION_UNIT_ROUNDOFF,
    DEFAULT_MAX_ELEMENTS,
    ROUNDING_SAFETY,
    SUPPORTED_DTYPES,
    Kernel,
    KernelError,
    Operands,
    RowExpectation,
    accumulation_error_bound,
)
from .matmul import MatmulKernel
from .mlp import MlpKernel, gelu_tanh
from .verify import (
    COMPARE_RTOL,
    FREIVALDS_SAFETY,
    FreivaldsResult,
    SampleResult,
    check_freivalds_witness,
    compare,
    freivalds,
    freivalds_row_tolerance,
    sample_rows,
)

# The application decides what is shown (see mtor_p2p/__init__.py).
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "ACCUMULATION_UNIT_ROUNDOFF",
    "COMPARE_RTOL",
    "DEFAULT_MAX_ELEMENTS",
    "FREIVALDS_SAFETY",
    "KERNELS",
    "ROUNDING_SAFETY",
    "SUPPORTED_DTYPES",
    "AttentionKernel",
    "Backend",
    "BackendUnavailable",
    "CacheStats",
    "CupyBackend",
    "FreivaldsResult",
    "GpuStatus",
    "Kernel",
    "KernelError",
    "MatmulKernel",
    "MlpKernel",
    "NumpyBackend",
    "Operands",
    "PinnedHostPool",
    "PinnedStats",
    "ResidentCache",
    "RowExpectation",
    "SampleResult",
    "accumulation_error_bound",
    "check_freivalds_witness",
    "compare",
    "content_key",
    "force_float32_math",
    "freivalds",
    "freivalds_row_tolerance",
    "gelu_tanh",
    "get_kernel",
    "gpu_available",
    "gpu_status",
    "report_cpu_fallback",
    "sample_rows",
    "select_backend",
]

#: Every kernel a peer can serve, by the name it advertises.
KERNELS: dict[str, Kernel] = {
    kernel.name: kernel for kernel in (MatmulKernel(), MlpKernel(), AttentionKernel())
}


def get_kernel(name: str) -> Kernel:
    """The registered kernel called ``name``; KernelError if there is none."""
    try:
        return KERNELS[name]
    except KeyError:
        known = ", ".join(sorted(KERNELS))
        raise KernelError(f"unknown kernel {name!r} (known: {known})") from None
