"""Where a worker's host kernels run: on a thread, or on the event loop when they are small.

Real threads (the production runtime) and real NumPy products; nothing here asserts how long
anything took, only where it ran and what the executor concluded from the clock.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import numpy as np
import pytest
import trio

from mtor_kernels.backend import NumpyBackend
from mtor_kernels.matmul import MatmulKernel
from mtor_p2p.compute import blas, executor
from mtor_p2p.compute.executor import BackendExecutor
from mtor_p2p.runtime import Runtime
from tests.products import assert_product_close

RNG = np.random.default_rng(7)


def _operands(n: int) -> dict[str, np.ndarray]:
    return {
        "a": RNG.standard_normal((n, n), dtype=np.float32),
        "b": RNG.standard_normal((n, n), dtype=np.float32),
    }


def _know(ex: BackendExecutor, kernel: str, seconds_per_flop: float) -> None:
    """Make ``ex`` know ``kernel``'s speed: CPU and wall time alike."""
    ex.seconds_per_flop[kernel] = seconds_per_flop
    ex.wall_per_flop[kernel] = deque([seconds_per_flop], maxlen=executor.WALL_WINDOW)


def _recording(monkeypatch: pytest.MonkeyPatch) -> tuple[MatmulKernel, list[bool]]:
    """A matmul kernel that notes, for each run, whether it ran on the event loop's thread."""
    kernel = MatmulKernel()
    loop_thread = threading.get_ident()
    on_loop: list[bool] = []
    original = kernel.run

    def run(*args: Any, **kwargs: Any) -> np.ndarray:
        on_loop.append(threading.get_ident() == loop_thread)
        return original(*args, **kwargs)

    monkeypatch.setattr(kernel, "run", run)
    return kernel, on_loop


def test_small_host_shards_run_on_the_event_loop_once_the_speed_is_known(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(blas, "single_threaded", lambda: True)
    kernel, on_loop = _recording(monkeypatch)
    operands = _operands(128)
    flops = kernel.flops(operands)

    async def main() -> None:
        ex = BackendExecutor(NumpyBackend(), Runtime.production())
        first = await ex.execute(kernel, operands, {})  # no speed known yet: a thread
        assert ex.seconds_per_flop["matmul"] > 0
        assert_product_close(first, operands["a"] @ operands["b"])
        # Known fast enough: on the loop.
        _know(ex, "matmul", executor.INLINE_KERNEL_SECONDS / flops / 4)
        await ex.execute(kernel, operands, {})
        # Known too slow for this shard: a thread.
        _know(ex, "matmul", executor.INLINE_KERNEL_SECONDS / flops * 4)
        await ex.execute(kernel, operands, {})

    trio.run(main)
    assert on_loop == [False, True, False]


def test_shards_stay_on_threads_while_blas_runs_several(monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenBLAS serialises calls from several threads: a product on the loop could wait out
    a large one elsewhere in the process."""
    monkeypatch.setattr(blas, "single_threaded", lambda: False)
    kernel, on_loop = _recording(monkeypatch)
    operands = _operands(64)

    async def main() -> None:
        ex = BackendExecutor(NumpyBackend(), Runtime.production())
        _know(ex, "matmul", 1e-15)
        await ex.execute(kernel, operands, {})

    trio.run(main)
    assert on_loop == [False]


def test_a_slow_shard_counts_at_once_and_is_forgotten_slowly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A requester that alternates fast shards with slow ones (values on BLAS's slow paths)
    must not get every other one onto the worker's event loop."""
    monkeypatch.setattr(blas, "single_threaded", lambda: True)
    kernel = MatmulKernel()
    operands = _operands(128)
    flops = kernel.flops(operands)
    original = kernel.run
    slow = [True]

    def run(*args: Any, **kwargs: Any) -> np.ndarray:
        if slow[0]:
            # At least 50 ms of this thread's CPU (a kernel on BLAS's slow paths): a lower
            # bound, not a timing assertion. A sleep would not count: a 1-thread NumPy
            # kernel is timed by the thread's CPU clock, not the wall clock.
            began = time.thread_time()
            while time.thread_time() - began < 0.05:
                pass
        return original(*args, **kwargs)

    monkeypatch.setattr(kernel, "run", run)

    async def main() -> None:
        ex = BackendExecutor(NumpyBackend(), Runtime.production())
        _know(ex, "matmul", 1e-15)
        await ex.execute(kernel, operands, {})
        after_slow = ex.seconds_per_flop["matmul"]
        assert after_slow >= 0.05 / flops
        slow[0] = False
        await ex.execute(kernel, operands, {})
        # One fast shard moves the estimate back by SPEED_RECOVERY of the gap, no more.
        assert ex.seconds_per_flop["matmul"] >= after_slow * (1 - executor.SPEED_RECOVERY)
        assert not ex._fits_on_loop(kernel, operands, flops)

    trio.run(main)


def test_only_kernels_whose_time_is_their_flops_run_on_the_loop_and_only_small_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An MLP's FLOP count leaves out its GELU (a review's shard with d_in = d_out = 1 counted
    2.75e8 FLOPs and held a loop 2.2 s): such kernels always go to a thread, and so does a
    matmul over INLINE_KERNEL_ELEMENTS, however fast the host; speeds are kept per kernel."""
    from mtor_kernels import get_kernel

    monkeypatch.setattr(blas, "single_threaded", lambda: True)
    mlp = get_kernel("mlp")
    assert not mlp.cost_is_flops and MatmulKernel.cost_is_flops
    kernel = MatmulKernel()
    big = {
        "a": np.ones((1024, 512), dtype=np.float32),
        "b": np.ones((512, 1024), dtype=np.float32),
    }
    elements = sum(a.size for a in big.values()) + 1024 * 1024
    assert elements > executor.INLINE_KERNEL_ELEMENTS
    ex = BackendExecutor(NumpyBackend(), Runtime.production())
    _know(ex, "matmul", 1e-18)
    assert not ex._fits_on_loop(kernel, big, float(kernel.flops(big)))
    small = _operands(64)
    assert ex._fits_on_loop(kernel, small, float(kernel.flops(small)))
    _know(ex, "mlp", 1e-18)  # even a speed known for it: never on the loop
    assert not ex._fits_on_loop(mlp, {}, 1.0)


def test_a_host_whose_cores_are_held_elsewhere_keeps_shards_off_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The speed is CPU time, which stays low while other processes hold the cores; a
    product on the loop then holds it for its wall time (a review: 10.8 ms gaps at the median
    with 3 busy processes beside a worker on 2 cores). The wall time's median of the last
    shards decides too: mostly slow, a thread; one slow shard among fast ones, still the
    loop."""
    monkeypatch.setattr(blas, "single_threaded", lambda: True)
    kernel = MatmulKernel()
    small = _operands(64)
    flops = float(kernel.flops(small))
    fast = executor.INLINE_KERNEL_SECONDS / flops / 4
    slow = executor.INLINE_KERNEL_SECONDS / flops * 2
    ex = BackendExecutor(NumpyBackend(), Runtime.production())
    _know(ex, "matmul", fast)
    assert ex._fits_on_loop(kernel, small, flops)
    ex.wall_per_flop["matmul"].extend([slow] * 5)  # held elsewhere: 5 of the last 6 slow
    assert not ex._fits_on_loop(kernel, small, flops)
    ex.wall_per_flop["matmul"].extend([fast] * 7)  # 1 slow of the last 8: the loop again
    assert ex._fits_on_loop(kernel, small, flops)


def test_simulated_runtime_ignores_the_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a simulation every blocking call is inline anyway; the executor still computes."""
    monkeypatch.setattr(blas, "single_threaded", lambda: True)
    kernel = MatmulKernel()
    operands = _operands(32)

    async def main() -> None:
        ex = BackendExecutor(NumpyBackend(), Runtime.simulated(seed=1))
        out = await ex.execute(kernel, operands, {})
        assert_product_close(out, operands["a"] @ operands["b"])

    trio.run(main)
