"""Where a worker's kernels run: a local backend, or a simulated device.

The worker hands each shard to a :class:`ShardExecutor`. In production that is
:class:`BackendExecutor`: the kernel on NumPy or CuPy, through the runtime's blocking hook (a
thread), at most ``slots`` at once. The simulator plugs in a device that computes the same
kernel on small arrays and charges the virtual time the declared work would take on the card it
models (``mtor_p2p.sim.device``). The worker's protocol logic is the same either way.
"""

from __future__ import annotations

import functools
from typing import Protocol

import numpy as np
import trio

from mtor_kernels import Kernel
from mtor_kernels.backend import Backend, select_backend
from mtor_p2p.runtime import Runtime


class ShardExecutor(Protocol):
    """Runs kernels for a worker."""

    #: Shown in ``status`` (``numpy``, ``cupy``, ``sim:RTX 4090``...).
    name: str
    #: Shards that may compute at once.
    slots: int

    async def execute(
        self, kernel: Kernel, operands: dict[str, np.ndarray], keys: dict[str, str]
    ) -> np.ndarray:
        """Compute ``kernel`` on ``operands`` (``keys``: content hashes of resident operands)."""
        ...


class BackendExecutor:
    """A local backend (NumPy or CuPy) behind the runtime's blocking hook."""

    def __init__(self, backend: Backend | None, runtime: Runtime, *, slots: int = 1) -> None:
        self.backend = backend or select_backend("auto")
        self.name = self.backend.name
        self.slots = slots
        self._runtime = runtime
        self._limiter = trio.CapacityLimiter(slots)

    async def execute(
        self, kernel: Kernel, operands: dict[str, np.ndarray], keys: dict[str, str]
    ) -> np.ndarray:
        """Run the kernel off the event loop, at most ``slots`` shards at a time."""
        # Resident operands (weights, B) are keyed by content hash so that a GPU backend keeps
        # them on the device between shards of the same job.
        run = functools.partial(kernel.run, operands, self.backend, keys=keys)
        return await self._runtime.run_blocking(run, limiter=self._limiter)
