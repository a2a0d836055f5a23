"""A peer's error text reaches job errors, the peer book and the operator's terminal as one
line of inert text (a hostile review, 2026-12-07: escape sequences in a worker's refusal
retitled the terminal that printed the job's error or `mtor-peer reputation`)."""

from __future__ import annotations

import numpy as np
import pytest

from mtor_p2p.compute.protocol import PROTOCOL_RUN
from mtor_p2p.compute.scheduler import JobFailed
from mtor_p2p.network import MAX_REMOTE_REASON_CHARS, RemoteError, remote_reason
from tests.test_virtual_time import cluster

HOSTILE = "credit refused: \x1b]2;owned\x07\x1b[2J\nFAKE LOG LINE \u202e \x9b"


def test_control_characters_are_escaped_and_long_reasons_cut():
    text = remote_reason(HOSTILE.encode())
    assert text.startswith("credit refused: ")
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in text)
    assert "\\x1b]2;owned\\x07" in text and "\\x0aFAKE" in text and "\\u202e" in text
    assert len(remote_reason(b"x" * 100_000)) == MAX_REMOTE_REASON_CHARS + 1
    assert remote_reason(b"\xff ok") == "\ufffd ok"


async def test_a_hostile_refusal_reaches_the_job_error_and_the_peer_book_inert():
    async with cluster(["requester", "hostile"]) as c:
        hostile = await c.start("hostile", "WEU")
        requester = await c.start("requester", "WEU", serve=False)
        await c.settle()

        async def refuse(sender: str, request: bytes) -> bytes:
            raise RemoteError(HOSTILE)

        c.world.network(hostile.peer_id).handle(PROTOCOL_RUN, refuse)
        ops = {"a": np.ones((8, 8), np.float32), "b": np.ones((8, 8), np.float32)}
        with pytest.raises(JobFailed) as failed:
            await requester.submit("matmul", ops, shards=1)
        assert "\x1b" not in str(failed.value) and "\n" not in str(failed.value)

        async def fail(sender: str, request: bytes) -> bytes:
            raise RemoteError("\x1b[2J\x1b[Hfake reputation line\n")

        c.world.network(hostile.peer_id).handle(PROTOCOL_RUN, fail)
        with pytest.raises(JobFailed):
            await requester.submit("matmul", ops, shards=1)
        report = requester.scheduler.book.report(requester.clock.now())
        row = next(r for r in report if r["peer_id"] == hostile.peer_id)
        assert row["last_error"] and "\x1b" not in row["last_error"]
