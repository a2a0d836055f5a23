"""Where a worker's kernels run: a local backend, or a simulated device.

The worker hands each shard to a :class:`ShardExecutor`. In production that is
:class:`BackendExecutor`: the kernel on NumPy or CuPy, through the runtime's blocking hook (a
thread), at most ``slots`` at once. The simulator plugs in a device that computes the same
kernel on small arrays and charges the virtual time the declared work would take on the card it
models (``mtor_p2p.sim.device``). The worker's protocol logic is the same either way.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections import deque
from typing import Protocol

import numpy as np
import trio

from mtor_kernels import Kernel
from mtor_kernels.backend import Backend, NumpyBackend, select_backend
from mtor_p2p.compute import blas
from mtor_p2p.runtime import Runtime

#: A host kernel whose time is its FLOPs (``Kernel.cost_is_flops``: matmul) expected to take at
#: most this long (seconds, from the speed measured on that kernel's shards before it) runs on
#: the event loop instead of a thread. The hop to a thread and back cost ~1.1 ms of a 3 ms 512³
#: product inside a worker; interleaved one-shard jobs on one cluster: p50 14.2 -> 13.1 ms
#: (issue 9).
INLINE_KERNEL_SECONDS = 0.008
#: ... and whose operands and output hold at most this many elements in all (512³: 786,432),
#: whatever its FLOPs: what a shard may make the loop touch is bounded even before its
#: kernel's speed is known well.
INLINE_KERNEL_ELEMENTS = 1 << 20
#: Shards smaller than this (FLOPs) say little about the host's speed: not measured.
MIN_TIMED_FLOPS = 1e6
#: How far each faster shard moves the speed estimate back (a slower one counts whole).
SPEED_RECOVERY = 0.1
#: ... and whose wall time per FLOP, the median of its kernel's last this many shards, also
#: predicts at most INLINE_KERNEL_SECONDS: the speed above is CPU time, which a host whose
#: cores other processes hold keeps low while each product holds the loop for its wall time
#: (a review: 3 busy processes beside a worker on 2 cores, every 512³ product inline and the
#: loop's gaps 10.8 ms at the median; 16.5 ms with 7). A median, not the slowest: one
#: preempted product does not send the next ones to a thread.
WALL_WINDOW = 8


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
        #: The host's speed per kernel (seconds per FLOP, see _timed), for the kernels whose
        #: time is their FLOPs; a kernel absent until one of its shards large enough to tell
        #: has run.
        self.seconds_per_flop: dict[str, float] = {}
        #: Wall seconds per FLOP of each kernel's last WALL_WINDOW timed shards.
        self.wall_per_flop: dict[str, deque[float]] = {}

    async def execute(
        self, kernel: Kernel, operands: dict[str, np.ndarray], keys: dict[str, str]
    ) -> np.ndarray:
        """Run the kernel, at most ``slots`` shards at a time: off the event loop, or on it
        when it is a host kernel expected to take at most INLINE_KERNEL_SECONDS."""
        flops = float(kernel.flops(operands))
        # Resident operands (weights, B) are keyed by content hash so that a GPU backend keeps
        # them on the device between shards of the same job.
        run = functools.partial(self._timed, kernel, operands, keys, flops)
        async with self._limiter:
            # Decided once the slot is ours, with the speed the shards before it measured: a
            # burst queued behind a slow shard sees what that shard took (a review: decided
            # on arrival, eight slow shards in a burst were all judged cheap).
            cheap = self._fits_on_loop(kernel, operands, flops)
            return await self._runtime.run_blocking(run, cheap=cheap)

    def _fits_on_loop(self, kernel: Kernel, operands: dict[str, np.ndarray], flops: float) -> bool:
        # Only NumPy on one BLAS thread: a GPU call would wait for the device, and OpenBLAS
        # with more threads serialises calls across threads (see blas.single_threaded). Only
        # a kernel whose time its FLOPs predict (an MLP's GELU or attention's softmax are
        # element-wise work its FLOP count leaves out: 300x slower per counted FLOP, measured
        # in review). The first shard of a kernel, with no speed measured, goes to a thread.
        speed = self.seconds_per_flop.get(kernel.name)
        if speed is None or not kernel.cost_is_flops or not isinstance(self.backend, NumpyBackend):
            return False
        elements = sum(a.size for a in operands.values())
        elements += math.prod(kernel.output_shape(operands))
        walls = self.wall_per_flop.get(kernel.name)
        return (
            elements <= INLINE_KERNEL_ELEMENTS
            and flops * speed <= INLINE_KERNEL_SECONDS
            and walls is not None
            and flops * statistics.median(walls) <= INLINE_KERNEL_SECONDS
            and blas.single_threaded()
        )

    def _timed(
        self, kernel: Kernel, operands: dict[str, np.ndarray], keys: dict[str, str], flops: float
    ) -> np.ndarray:
        # The host's compute speed is measured inside the call, with a process clock (not
        # protocol time): a queue for the limiter or a slow hop does not count. A slower shard
        # (operands that take BLAS's slow paths) counts at once and is forgotten slowly: a
        # requester alternating fast and slow shards holds the loop once per few dozen shards,
        # not every other one.
        #
        # With NumPy on one BLAS thread (the only case a shard may run on the loop) the
        # kernel's speed is this thread's CPU time, and its wall time is kept beside it
        # (WALL_WINDOW): on the 2-core EPYC 7003 a 512³ product takes 3.9 ms alone, 4.7 ms
        # (median) beside a requester and another worker, and over 8 ms whenever it was
        # preempted; timed by the wall clock alone, 30% of a round-trip loop's products then
        # went to a thread, each hop ~1 ms (round trips alternating, p50 19.4, 20.8, 20.8,
        # 22.9 -> 19.0, 18.6, 20.5, 23.4 ms: within that hour's noise). Elsewhere (more BLAS
        # threads, a GPU) the wall clock is the speed too.
        cpu_clock = time.perf_counter
        if isinstance(self.backend, NumpyBackend) and blas.single_threaded():
            cpu_clock = time.thread_time
        began, began_cpu = time.perf_counter(), cpu_clock()
        output = kernel.run(operands, self.backend, keys=keys)
        if flops >= MIN_TIMED_FLOPS and kernel.cost_is_flops:
            walls = self.wall_per_flop.setdefault(kernel.name, deque(maxlen=WALL_WINDOW))
            walls.append((time.perf_counter() - began) / flops)
            measured = (cpu_clock() - began_cpu) / flops
            known = self.seconds_per_flop.get(kernel.name)
            if known is None or measured >= known:
                self.seconds_per_flop[kernel.name] = measured
            else:
                self.seconds_per_flop[kernel.name] = known + (measured - known) * SPEED_RECOVERY
        return output
