"""The CLI's logging filter for py-libp2p's clean-EOF warning (mtor_p2p/cli.py)."""

from __future__ import annotations

import logging

from libp2p.network.stream.exceptions import StreamEOF

from mtor_p2p.cli import _CleanEofQuiet, _PeerFailureNoise
from mtor_p2p.libp2p_host import PEER_FAILURE_LOGGERS


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


def test_an_embedding_program_does_not_get_peer_failures_as_bare_warnings() -> None:
    """A program that embeds the library and leaves py-libp2p's logging as py-libp2p set it up
    does not get a dial failure on stderr through Python's last-resort handler; its CRITICAL
    lines, and warnings of other py-libp2p loggers, still show. A handler of the program's
    own gets the line unchanged, and so does logging set up after the host started (a hostile
    review: the first version rewrote such lines to DEBUG for good). A separate interpreter:
    logging's set-up is global to a process."""
    import subprocess
    import sys

    program = """
import logging, sys
import libp2p  # its own logging set-up: no handler, no propagation
from mtor_p2p.libp2p_host import quiet_peer_failures_when_embedded
quiet_peer_failures_when_embedded()
quiet_peer_failures_when_embedded()  # once per host; filters are not stacked
tcp = logging.getLogger("libp2p.transport.tcp.tcp")
assert len(tcp.filters) == 1
tcp.error("Failed to open TCP stream: unheard")
tcp.critical("critical stays")
logging.getLogger("libp2p.pubsub.gossipsub").warning("other loggers stay")
seen = []
class Keep(logging.Handler):
    def emit(self, record):
        seen.append((record.levelname, record.getMessage()))
swarm = logging.getLogger("libp2p.network.swarm")
swarm.addHandler(Keep(logging.WARNING))
swarm.error("peer id mismatch")
assert seen == [("ERROR", "peer id mismatch")], seen
# Logging set up later: the program's handlers get the lines at their own level.
logging.getLogger("libp2p").propagate = True
logging.basicConfig(stream=sys.stdout, format="%(levelname)s %(name)s %(message)s")
tcp.error("Failed to open TCP stream: heard")
"""
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "unheard" not in result.stderr + result.stdout
    assert "critical stays" in result.stderr and "other loggers stay" in result.stderr
    assert "ERROR libp2p.transport.tcp.tcp Failed to open TCP stream: heard" in result.stdout


def test_dht_value_failures_at_departed_peers_are_not_warnings_at_the_default_level() -> None:
    """py-libp2p's "Failed to store value at peer X: " (often with an empty reason) came 4-7
    times a devnet peer, and on for a peer stopped cleanly (a new user's walkthrough): dropped
    below INFO, as the other peer-caused failures; kept at INFO and for other loggers."""
    store = "libp2p.kad_dht.value_store"
    line = record(store, "Failed to store value at peer %s: ", "12D3KooWgone")
    assert not _PeerFailureNoise(logging.WARNING, PEER_FAILURE_LOGGERS).filter(line)
    assert _PeerFailureNoise(logging.INFO, PEER_FAILURE_LOGGERS).filter(line)
    other = record("libp2p.pubsub.gossipsub", "mesh trouble %s", 1)
    assert _PeerFailureNoise(logging.WARNING, PEER_FAILURE_LOGGERS).filter(other)
