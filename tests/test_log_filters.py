"""The CLI's logging filter for py-libp2p's clean-EOF warning (mtor_p2p/cli.py)."""

from __future__ import annotations

import logging

from libp2p.network.stream.exceptions import StreamEOF

from mtor_p2p.cli import _CleanEofQuiet


def record(name: str, msg: str, arg: object) -> logging.LogRecord:
    return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, (arg,), None)


def test_a_dht_stream_closed_cleanly_is_not_a_warning_but_other_failures_are() -> None:
    quiet = _CleanEofQuiet()
    dht = "libp2p.kad_dht.kad_dht"
    failed = "Failed to read DHT message from stream: %s"
    assert not quiet.filter(record(dht, failed, StreamEOF()))
    assert quiet.filter(record(dht, failed, ValueError("bad varint")))
    assert quiet.filter(record(dht, "DHT message too large (max %s bytes)", 1))
    assert quiet.filter(record("mtor_p2p.node", failed, StreamEOF()))
