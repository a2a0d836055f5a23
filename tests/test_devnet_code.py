"""A devnet's peers run the same ``mtor_p2p`` as the devnet command, whatever directory it is
called from (found by a new user: a stale checkout in the calling directory was imported by
every peer, which then served none of the new routes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.processes import read_json_line

ROOT = Path(__file__).resolve().parent.parent


def test_peers_do_not_import_a_checkout_in_the_calling_directory(tmp_path: Path) -> None:
    decoy = tmp_path / "mtor_p2p"
    decoy.mkdir()
    (decoy / "__init__.py").write_text('raise SystemExit("the decoy mtor_p2p was imported")\n')
    (decoy / "__main__.py").write_text("")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # -P: the devnet command itself must not import the decoy either (as the mtor-peer
    # console script does not); its peers are what this test is about.
    process = subprocess.Popen(
        [sys.executable, "-P", "-m", "mtor_p2p", "devnet", "--peers", "1", "--json",
         "--data-dir", str(tmp_path / "net")],
        cwd=tmp_path, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        peers = read_json_line(process, timeout=120)["peers"]
        info = json.loads((Path(peers[0]["data_dir"]) / "control.json").read_text())
        assert info["peer_id"] == peers[0]["peer_id"]
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
