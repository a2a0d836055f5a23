"""Network time read through trio, so that virtual clocks drive protocol logic.

Records carry absolute expiry times that other machines must interpret, so protocol code needs
an epoch-based clock. It must still advance with ``trio.current_time()`` so that
``trio.testing.MockClock`` (and the simulator) control it. A :class:`NetClock` therefore reads
the wall clock once, when it is created, and from then on only trio's clock.
"""

from __future__ import annotations

import time

import trio


class NetClock:
    """Seconds since the Unix epoch, advancing with trio's clock.

    ``epoch_offset`` defaults to the wall clock minus trio's clock at creation; the simulator
    passes a fixed offset so that runs are reproducible.
    """

    def __init__(self, epoch_offset: float | None = None) -> None:
        if epoch_offset is None:
            epoch_offset = time.time() - trio.current_time()
        self.epoch_offset = epoch_offset

    def now(self) -> float:
        """Current network time in seconds since the epoch."""
        return self.epoch_offset + trio.current_time()
