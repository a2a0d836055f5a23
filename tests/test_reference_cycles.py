"""Errors a remote peer causes at will must not keep the requester's buffers in reference
cycles (frames held by a traceback held by those frames), which only Python's cycle collector
frees: memory a peer could pile up between collections, beyond what admission counts."""

from __future__ import annotations

import gc
import types

import numpy as np
import pytest

from mtor_p2p.compute import client
from mtor_p2p.compute.protocol import PROTOCOL_DOWNLOAD
from mtor_p2p.identity import Identity
from mtor_p2p.memnet import MemWorld
from mtor_p2p.network import RemoteError
from mtor_p2p.records.arrays import meta_of


async def test_a_refused_download_leaves_no_buffer_for_the_cycle_collector() -> None:
    """A worker that refuses every download of an answer: each failed attempt's 4 MiB buffer
    (a new one when the job's rows are held by another attempt) goes as soon as the error is
    handled. The chunk tasks' shared failure list held the error, whose traceback held the
    list's frame: a cycle only the collector freed (a review: 160 MiB after 5 attempts of
    32 MiB, the collector off)."""
    world = MemWorld()
    requester, worker = world.add_peer(Identity.generate()), world.add_peer(Identity.generate())

    async def refuse(sender: str, request: bytes) -> bytes:
        raise RemoteError("no")

    worker.handle(PROTOCOL_DOWNLOAD, refuse)
    await requester.connect(worker.addrs()[0])
    meta = meta_of(np.zeros(1 << 20, np.float32))
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            with pytest.raises(RemoteError):
                await client.download(requester, worker.peer_id, meta, timeout=5)
        left = [
            o
            for o in gc.get_objects()
            if isinstance(o, types.FrameType) and o.f_code.co_name in {"download", "fetch"}
        ]
        assert not left, "a failed download's frames are still in memory"
    finally:
        gc.enable()
