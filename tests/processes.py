"""Helpers to run ``mtor-peer`` as real subprocesses in tests."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest


def mtor(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mtor_p2p", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "mtor_p2p", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
    )


def read_json_line(process: subprocess.Popen[str], timeout: float = 90) -> dict[str, Any]:
    """The first stdout line of ``process``, parsed (fails with its stderr if it exits)."""
    selector = selectors.DefaultSelector()
    assert process.stdout is not None
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if selector.select(timeout=0.5):
            line = process.stdout.readline()
            if line:
                return json.loads(line)
        if process.poll() is not None:
            assert process.stderr is not None
            pytest.fail(f"process exited {process.returncode}: {process.stderr.read()[-2000:]}")
    process.kill()
    pytest.fail("no JSON line in time")


@contextmanager
def devnet(
    root: Path, peers: int, *, launch: Callable[..., subprocess.Popen[str]] = start
) -> Iterator[list[dict[str, Any]]]:
    """``mtor-peer devnet --peers N --json`` in ``root/net``, started with ``launch``: its
    peers as it prints them (data_dir, peer_id, pid, api, ...); stopped with Ctrl-C."""
    process = launch("devnet", "--peers", str(peers), "--json", "--data-dir", str(root / "net"))
    try:
        yield read_json_line(process, timeout=120)["peers"]
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is not running.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def run_flags(data_dir: Path) -> list[str]:
    """Flags of a loopback-only ``mtor-peer run`` that prints one JSON line when ready."""
    return [
        "run",
        "--data-dir", str(data_dir),
        "--listen", "/ip4/127.0.0.1/tcp/0",
        "--no-default-bootstrap",
        "--gpu", "none",
        "--json",
    ]  # fmt: skip
