"""Kernels' operands described by named sizes (``m, n, k`` for matmul), for jobs submitted by
size rather than as arrays: what ``POST /v1/jobs`` and ``mtor-peer submit`` take, random
operands of those sizes, and a kernel's own check of shapes without their data.

Light on purpose: ``mtor-peer`` builds its ``submit`` flags from :data:`KERNEL_INPUTS` for
every command it parses, so NumPy and the kernels are imported only by the functions that use
them (they were 90 ms of every CLI call).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

__all__ = ["KERNEL_INPUTS", "KernelInputs", "check_shapes", "kernel_inputs", "random_operands"]


@dataclass(frozen=True)
class KernelInputs:
    """A kernel's operands described by named sizes: what ``POST /v1/jobs`` and ``mtor-peer
    submit`` take for random inputs, how the CLI names a shape mismatch between files, and the
    ``sizes`` a job reports."""

    kernel: str
    #: Each operand's shape as size names, in the kernel's operand order (the order in which
    #: random operands are drawn, so that a seed gives the same operands everywhere).
    operands: dict[str, tuple[str, ...]]
    #: Sizes in the order of a job's ``shape``.
    sizes: tuple[str, ...]
    #: What ``mtor-peer submit`` uses for a size it is not given.
    defaults: dict[str, int]
    #: Sizes that default to another one when not given (self-attention: ``seq_k = seq_q``).
    same_as: dict[str, str] = field(default_factory=dict)
    #: Random weights are scaled by ``1/sqrt(size)`` (their fan-in), as a network is
    #: initialised, so that activations stay near 1 and float16 jobs neither overflow nor
    #: lose their digits to a few huge values.
    fan_in: dict[str, str] = field(default_factory=dict)

    def shapes(self, sizes: dict[str, int]) -> dict[str, tuple[int, ...]]:
        """Each operand's shape for ``sizes`` (every size named)."""
        return {name: tuple(sizes[s] for s in axes) for name, axes in self.operands.items()}

    def sizes_of(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
        """The sizes read from operand shapes (each from the first operand that has it; the
        kernel's own check says whether the others agree)."""
        found: dict[str, int] = {}
        for name, axes in self.operands.items():
            for axis, size in enumerate(axes):
                if axis < len(shapes[name]):
                    found.setdefault(size, int(shapes[name][axis]))
        return {size: found[size] for size in self.sizes if size in found}

    def mismatch(self, shapes: dict[str, tuple[int, ...]]) -> tuple[str, str, str] | None:
        """The first size on which two operands of the right dimensions disagree, as
        ``(size, operand, other operand)``; None if they all agree."""
        seen: dict[str, tuple[str, int]] = {}
        for name, axes in self.operands.items():
            if len(shapes[name]) != len(axes):
                continue
            for axis, size in enumerate(axes):
                value = int(shapes[name][axis])
                first = seen.setdefault(size, (name, value))
                if first[1] != value:
                    return size, first[0], name
        return None


#: The kernels a job of the control API runs, by name.
KERNEL_INPUTS: dict[str, KernelInputs] = {
    spec.kernel: spec
    for spec in (
        KernelInputs(
            kernel="matmul",
            operands={"a": ("m", "k"), "b": ("k", "n")},
            sizes=("m", "n", "k"),
            defaults={"m": 512, "n": 512, "k": 512},
        ),
        KernelInputs(
            kernel="mlp",
            operands={
                "x": ("batch", "d_in"),
                "w1": ("d_in", "d_hidden"),
                "b1": ("d_hidden",),
                "w2": ("d_hidden", "d_out"),
                "b2": ("d_out",),
            },
            sizes=("batch", "d_in", "d_hidden", "d_out"),
            defaults={"batch": 256, "d_in": 256, "d_hidden": 1024, "d_out": 256},
            fan_in={"w1": "d_in", "w2": "d_hidden"},
        ),
        KernelInputs(
            kernel="attention",
            operands={
                "q": ("batch", "heads", "seq_q", "head_dim"),
                "k": ("batch", "heads", "seq_k", "head_dim"),
                "v": ("batch", "heads", "seq_k", "head_dim_v"),
            },
            sizes=("batch", "heads", "seq_q", "seq_k", "head_dim", "head_dim_v"),
            defaults={"batch": 8, "heads": 8, "seq_q": 128, "head_dim": 64},
            same_as={"seq_k": "seq_q", "head_dim_v": "head_dim"},
        ),
    )
}


def kernel_inputs(kernel: Any) -> KernelInputs:
    """The :class:`KernelInputs` of ``kernel`` (ValueError naming the known ones)."""
    if not isinstance(kernel, str) or kernel not in KERNEL_INPUTS:
        raise ValueError(f"kernel must be one of {', '.join(KERNEL_INPUTS)}, not {kernel!r}")
    return KERNEL_INPUTS[kernel]


def check_shapes(kernel: str, shapes: dict[str, tuple[int, ...]], dtype: Any) -> None:
    """The kernel's own check of operands of these shapes and dtype, without their data
    (``KernelError``, a ValueError, saying what is wrong): a size limit of an output or an
    intermediate (attention's scores) is known before anything is allocated or sent."""
    import numpy as np

    from mtor_kernels import get_kernel

    # Zero-strided views of one element: arrays of the right shape that hold no memory.
    zero = np.zeros((), dtype=dtype)
    get_kernel(kernel).check_operands(
        {name: np.broadcast_to(zero, shape) for name, shape in shapes.items()}
    )


def random_operands(
    kernel: str, sizes: dict[str, int], dtype: str = "float32", seed: int | None = None
) -> dict[str, np.ndarray]:
    """Standard normal operands of ``kernel`` for ``sizes`` (weights scaled by their fan-in),
    drawn in the kernel's operand order from ``seed``: the same seed gives the same operands
    (what a test recomputes the result from)."""
    import numpy as np

    spec = kernel_inputs(kernel)
    rng = np.random.default_rng(seed)
    operands = {}
    for name, shape in spec.shapes(sizes).items():
        array = rng.standard_normal(shape, dtype=np.float32)
        if name in spec.fan_in:
            array *= np.float32(1.0 / np.sqrt(sizes[spec.fan_in[name]]))
        operands[name] = array.astype(dtype)
    return operands
