"""`mtor-peer stop` waits for a node's stop to be complete, then briefly for its process.

A node lets go of its data directory's lock once its stop is complete (record withdrawn,
ledger on disk); its interpreter exits after that, which took over 1.5 s under CI's load.
These tests use a stand-in node (a real process holding the real lock, answering SIGTERM as a
node does) so that how long it lingers is under the test's control.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtor_p2p.cli import _node_process
from tests.processes import mtor


def _pidfds_work() -> bool:
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return False
    return True


# Without pidfds (an old kernel, or a seccomp filter) `stop` does not wait for the process.
pytestmark = pytest.mark.skipif(not _pidfds_work(), reason="no pidfds here: stop cannot wait")

STAND_IN = """
import signal, sys, time
from pathlib import Path
from mtor_p2p.datadir import DataDirLock

lock = DataDirLock(Path(sys.argv[1]))
lock.acquire()
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
print("ready", flush=True)
while not stopping:
    time.sleep(0.02)
lock.release()
time.sleep(float(sys.argv[2]))
"""


def stand_in_node(tmp_path: Path, linger: float) -> tuple[subprocess.Popen[str], Path]:
    """A process holding a data directory's lock that lets go on SIGTERM and then lingers
    ``linger`` seconds before it exits. Its script's name says mtor, as a node's command
    line does (``stop`` waits only on processes that look like a node)."""
    data_dir = tmp_path / "node"
    data_dir.mkdir(mode=0o700)
    script = tmp_path / "mtor_stand_in_node.py"
    script.write_text(STAND_IN)
    process = subprocess.Popen(
        [sys.executable, str(script), str(data_dir), str(linger)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    return process, data_dir


def test_stop_returns_once_the_process_has_exited(tmp_path: Path) -> None:
    process, data_dir = stand_in_node(tmp_path, linger=1.0)
    try:
        began = time.monotonic()
        result = mtor("stop", "--data-dir", str(data_dir))
        took = time.monotonic() - began
        # Nothing of it is left when stop returns: its exit is already there to collect.
        exited = process.poll()
    finally:
        process.kill()
        process.wait(timeout=10)
    assert result.returncode == 0, result.stderr
    assert f"stopped the node on {data_dir} (sent SIGTERM to pid {process.pid})" in result.stdout
    assert "still exiting" not in result.stdout
    assert exited == 0
    assert took >= 1.0  # it waited out the second the process lingered after unlocking


def test_a_process_slow_to_exit_after_its_stop_is_said_and_not_an_error(tmp_path: Path) -> None:
    process, data_dir = stand_in_node(tmp_path, linger=30.0)
    try:
        # 6 s for the stand-in to answer SIGTERM (milliseconds when quiet), then the rest of
        # them for its exit, which does not come.
        result = mtor("stop", "--data-dir", str(data_dir), "--timeout", "6")
        still_there = process.poll() is None
    finally:
        process.kill()
        process.wait(timeout=10)
    # The stop was complete (the directory unlocked): exit 0, and the lingering process said.
    assert result.returncode == 0, result.stderr
    assert f"its process (pid {process.pid}) is still exiting" in result.stdout
    assert still_there


def test_stop_waits_only_on_a_process_that_looks_like_a_node(tmp_path: Path) -> None:
    # PID 1: in a container the node is init, and its exit would take `stop` with it.
    assert _node_process(1) is None
    other = subprocess.Popen(["sleep", "30"])  # what another PID namespace's PID may name here
    node, _ = stand_in_node(tmp_path, linger=0.0)
    try:
        assert _node_process(other.pid) is None
        handle = _node_process(node.pid)
        assert handle is not None
        os.close(handle)
    finally:
        for process in (other, node):
            process.kill()
            process.wait(timeout=10)
