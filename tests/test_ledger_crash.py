"""A ledger writer killed with SIGKILL mid-write restarts consistent and loses nothing it had
acknowledged (a real subprocess, a real SQLite file in WAL mode)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtor_p2p.ledger.store import Ledger
from tests.ledger_data import genesis

ROOT = Path(__file__).resolve().parent.parent


def run_and_kill(path: Path, seed: int, seconds: float) -> list[str]:
    """Start the writer, let it write for ``seconds``, SIGKILL it; the IDs it acknowledged."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.ledger_writer", str(path), str(seed)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    acknowledged: list[str] = []
    deadline = time.monotonic() + 30
    assert process.stdout is not None
    # Wait until it has acknowledged something, then kill it at a random moment.
    first = process.stdout.readline()
    assert first, process.stderr.read() if process.stderr else "writer died"
    acknowledged += json.loads(first)
    time.sleep(seconds)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    assert time.monotonic() < deadline
    for line in process.stdout.read().splitlines():
        try:
            acknowledged += json.loads(line)
        except json.JSONDecodeError:
            break  # the line being written when the kill came
    return acknowledged


@pytest.mark.slow
def test_sigkill_while_writing_loses_nothing_acknowledged(tmp_path):
    path = tmp_path / "ledger.sqlite"
    gen = genesis()
    rng = random.Random(4)
    everything: list[str] = []
    for round_number in range(3):
        everything += run_and_kill(path, seed=round_number, seconds=rng.uniform(0.3, 1.2))
        ledger = Ledger(path, gen)
        try:
            held = ledger.held(everything)
            assert held == set(everything), f"lost {len(set(everything) - held)} entries"
            report = ledger.verify()
            assert report["ok"], report["problems"]
            assert report["total"] == gen.supply
            assert ledger.count() >= len(set(everything))
        finally:
            ledger.close()
    assert len(everything) > 50  # the writer really was writing when killed
