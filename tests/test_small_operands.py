"""Small operands cannot hold memory the worker does not count (a hostile review, 2026-12-07:
20,000 uploads of one element, each beside 16 KiB of header fields, held 385 MiB for 80 KB
counted, and their number had no bound)."""

from __future__ import annotations

import numpy as np

from mtor_p2p.compute.worker import VIEW_SLACK_BYTES, _holds_little_more
from mtor_p2p.records.arrays import ENTRY_OVERHEAD_BYTES, OperandStore, content_hash


def test_a_chunk_is_kept_as_a_view_only_of_a_message_little_larger_than_it():
    message = bytes(16 * 1024 + 4)
    assert not _holds_little_more(memoryview(message)[-4:])  # 4 bytes in 16 KiB
    body = bytes(1 << 20)
    assert _holds_little_more(memoryview(body)[VIEW_SLACK_BYTES // 2 :])
    assert _holds_little_more(b"1234")  # not a view: holds itself


def test_tiny_entries_count_at_least_their_overhead_so_their_number_is_bounded():
    store = OperandStore(max_bytes=10 * ENTRY_OVERHEAD_BYTES)
    for i in range(1000):
        array = np.array([i], np.float32)
        store.put(array, content_hash(array))
    assert store.nbytes <= store.max_bytes
    held = sum(1 for i in range(1000) if content_hash(np.array([i], np.float32)) in store)
    assert held == 10
    large = np.zeros(4 * ENTRY_OVERHEAD_BYTES // 4, np.float32)
    digest = store.put(large)
    store.discard(digest)
    assert store.nbytes == 6 * ENTRY_OVERHEAD_BYTES  # four small ones made room for it
