"""Control API under load: ``GET /v1/status`` latency with 200 concurrent clients (issue 11).

``python -m benchmarks control [--source DIR] [--clients 200] [--seconds 10] [--json OUT]``

It starts a real node (``python -m mtor_p2p run`` on loopback, no bootstrap, ``--gpu none``) in
its own process from the checkout ``--source`` (default: this one; point it at a ``git
worktree`` of an older commit to measure that commit's server), waits for its ``control.json``,
then runs ``--clients`` clients in this process, each asking ``GET /v1/status`` in a loop for
``--seconds``, one request per connection with ``Connection: close`` as the CLI's urllib
does. It reports p50/p90/p99/max of the answered requests, requests per second, and what did
not get a 200 (503 busy, connections dropped or reset, timeouts).

Both sides share the machine's cores, so the figures are the server's latency as a local
client sees it on a busy machine, not the server alone.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import trio

from benchmarks.machine import machine
from benchmarks.paths import user_path

ROOT = Path(__file__).resolve().parent.parent
#: One request's deadline on the client side (the server's own per-connection deadline is 10 s).
REQUEST_TIMEOUT_S = 15.0
#: How long the node may take to start (device probe, cached benchmark, libp2p host).
START_TIMEOUT_S = 120.0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_node(source: Path, data_dir: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    """Start a node from ``source``; return the process, its API URL and token."""
    env = dict(os.environ, PYTHONPATH=str(source))
    command = [
        sys.executable, "-m", "mtor_p2p", "run",
        "--data-dir", str(data_dir),
        "--listen", "/ip4/127.0.0.1/tcp/0",
        "--no-default-bootstrap",
        "--gpu", "none",
        "--log-level", "warning",
    ]  # fmt: skip
    log = open(data_dir.parent / "node.log", "wb")  # the child keeps its own descriptor
    process = subprocess.Popen(
        command, cwd=source, env=env, stdout=log, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    log.close()
    deadline = time.monotonic() + START_TIMEOUT_S
    info_path = data_dir / "control.json"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"node exited with {process.returncode}; see {data_dir.parent}")
        try:
            info = json.loads(info_path.read_text())
            token = (data_dir / "control.token").read_text().strip()
            return process, info["url"], token
        except (OSError, ValueError, KeyError):
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("node did not start in time")


async def _one_request(port: int, request: bytes) -> str:
    """Send one request on a new connection; return the outcome ("200", "503", "dropped")."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await stream.send_all(request)
        data = bytearray()
        while chunk := await stream.receive_some(65536):
            data += chunk
    except (trio.BrokenResourceError, ConnectionError):
        return "dropped"
    finally:
        await stream.aclose()
    if not data.startswith(b"HTTP/1."):
        return "dropped"
    return data[9:12].decode("ascii", "replace")


async def load(url: str, token: str, clients: int, seconds: float) -> dict[str, Any]:
    """Run ``clients`` looping clients for ``seconds``; latencies of 200 answers and counts."""
    port = int(url.rsplit(":", 1)[1])
    request = (
        "GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {token}\r\nAccept-Encoding: identity\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    latencies: list[float] = []
    outcomes: Counter[str] = Counter()
    stop_at = trio.current_time() + seconds

    async def client() -> None:
        while trio.current_time() < stop_at:
            start = trio.current_time()
            outcome = "timeout"
            with trio.move_on_after(REQUEST_TIMEOUT_S):
                try:
                    outcome = await _one_request(port, request)
                except OSError:
                    outcome = "connect-error"
            elapsed = trio.current_time() - start
            outcomes[outcome] += 1
            if outcome == "200":
                latencies.append(elapsed)
            else:
                await trio.sleep(0.01)  # do not spin on a refusing server

    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(client)
    wall = trio.current_time() - started
    result: dict[str, Any] = {
        "clients": clients,
        "seconds": round(wall, 2),
        "outcomes": dict(outcomes),
        "ok": len(latencies),
        "requests_per_s": round(len(latencies) / wall, 1),
    }
    if latencies:
        for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
            result[f"{name}_ms"] = round(_percentile(latencies, q) * 1000, 1)
        result["max_ms"] = round(max(latencies) * 1000, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    """Parse the options, start the node, load it, print (and write) the figures."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks control", description=__doc__)
    parser.add_argument(
        "--source", type=user_path, default=ROOT, help="checkout to run the node from"
    )
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--label", default=None, help="a name for this run in the output")
    parser.add_argument("--json", type=user_path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    source = args.source.resolve()
    commit = subprocess.run(
        ["git", "-C", str(source), "rev-parse", "--short", "HEAD"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="mtor-bench-control-") as tmp:
        data_dir = Path(tmp) / "node"
        data_dir.mkdir(mode=0o700)
        process, url, token = start_node(source, data_dir)
        try:
            time.sleep(2.0)  # let the node's start-up work (first announce, probe) settle
            result = trio.run(load, url, token, args.clients, args.seconds)
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
    out = {
        "benchmark": "control",
        "label": args.label,
        "source": str(source),
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(),
        "result": result,
    }
    print(json.dumps(out, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0
