"""Interoperability: an independent libp2p implementation (js-libp2p on Node.js) connects to a
running ``mtor-peer``, identifies it, pings it and fetches its capacity record from the DHT.

Runs when Node.js and the pinned npm packages are present (``./mtor test`` installs them with
``npm ci`` when Node.js is there); skipped with the reason otherwise.
"""

from __future__ import annotations

import base64
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mtor_p2p.capacity.record import capacity_key, decode_capacity_record
from tests.processes import read_json_line, run_flags, start

JS_DIR = Path(__file__).parent / "interop" / "js"
NODE = shutil.which("node")

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(NODE is None, reason="Node.js is not installed"),
    pytest.mark.skipif(
        not (JS_DIR / "node_modules" / "libp2p").exists(),
        reason="js-libp2p is not installed (run: npm ci --prefix tests/interop/js)",
    ),
]


def test_js_libp2p_connects_identifies_pings_and_reads_the_capacity_record(tmp_path):
    node = start(*run_flags(tmp_path))
    try:
        ready = read_json_line(node)
        peer_id = ready["peer_id"]
        result = subprocess.run(
            [
                str(NODE), str(JS_DIR / "client.mjs"),
                "--addr", ready["addrs"][0],
                "--key", capacity_key(peer_id),
                "--timeout-ms", "30000",
            ],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.stdout.strip(), result.stderr[-2000:]
        answer = json.loads(result.stdout.strip().splitlines()[-1])
        assert answer["ok"], answer
        assert answer["remote_peer"] == peer_id
        protocols = answer["identify"]["protocols"]
        assert "/ipfs/kad/1.0.0" in protocols
        assert "/ipfs/ping/1.0.0" in protocols
        assert any(p.startswith("/meshsub/") for p in protocols)
        assert answer["identify"]["agentVersion"].startswith("py-libp2p")
        assert answer["ping_ms"] >= 0
        # What js-libp2p fetched is our signed record, and it verifies.
        record = decode_capacity_record(
            base64.b64decode(answer["value_b64"]), now=time.time(), expected_peer=peer_id
        )
        assert record.peer_id == peer_id
        assert record.addrs == tuple(ready["addrs"])
    finally:
        node.send_signal(signal.SIGINT)
        assert node.wait(timeout=20) == 0
