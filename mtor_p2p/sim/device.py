"""A simulated GPU: the worker's executor in simulation.

Compute is modelled, results are real. The kernel runs on the small real operands (NumPy,
inline on the event loop, so virtual time does not move while it runs), and the device charges
the virtual time the *declared* work would take on the card: ``flops x flop_scale /
(datasheet TFLOP/s x sustained efficiency)``. Everything downstream of the result (Freivalds,
sampling, fault proofs, receipts, prices, the ledger) therefore runs for real on real arrays.
"""

from __future__ import annotations

import numpy as np
import trio

from mtor_kernels import Kernel
from mtor_kernels.backend import NumpyBackend
from mtor_p2p.sim.scenario import GpuModel

#: How a simulated worker behaves: honest, or one of the adversaries of the scenario.
BEHAVIOURS = ("honest", "cheat", "stall", "lie")


class SimulatedDevice:
    """One card, one shard at a time; counts the virtual seconds it spends computing."""

    def __init__(self, gpu: GpuModel, *, flop_scale: float, behaviour: str = "honest") -> None:
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"behaviour must be one of {BEHAVIOURS}")
        self.gpu = gpu
        self.flop_scale = flop_scale
        self.behaviour = behaviour
        self.name = f"sim:{gpu.model}"
        self.slots = 1
        self.busy_seconds = 0.0
        self.shards = 0
        self._limiter = trio.CapacityLimiter(1)
        self._backend = NumpyBackend()

    def seconds_for(self, flops: float, dtype: str = "float32") -> float:
        """Virtual seconds for ``flops`` real FLOPs (scaled to the declared size)."""
        return flops * self.flop_scale / (self.gpu.effective_tflops(dtype) * 1e12)

    async def execute(
        self, kernel: Kernel, operands: dict[str, np.ndarray], keys: dict[str, str]
    ) -> np.ndarray:
        """Wait the modelled time, then compute the real (small) result."""
        async with self._limiter:
            if self.behaviour == "stall":
                # Takes the shard and never answers: the requester's deadline must fire.
                await trio.sleep_forever()
            dtype = str(next(iter(operands.values())).dtype)
            started = trio.current_time()
            try:
                await trio.sleep(self.seconds_for(float(kernel.flops(operands)), dtype))
            finally:
                # A crash mid-shard still spent the device time up to that moment.
                self.busy_seconds += trio.current_time() - started
            self.shards += 1
            return kernel.run(operands, self._backend, keys=keys)
