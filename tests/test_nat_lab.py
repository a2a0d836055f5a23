"""The NAT lab itself (bootstrap/nat-lab.sh through tests/natlab.py), proved with plain sockets.

Each socket program runs as ``python -c TOOL ...`` inside a namespace and prints one JSON line.
Skipped, with the reason, where namespaces or iptables cannot be used (not root, no iptables).
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.natlab import NatLab, nat_lab, skip_reason

pytestmark = [
    pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or ""),
    pytest.mark.slow,  # about 5 s: two labs' worth of namespaces and a few dozen processes
]

# The socket programs. Every wait is bounded, so a broken lab fails a test instead of hanging it.
TOOL = r"""
import json, socket, sys, time

def out(**fields):
    print(json.dumps(fields), flush=True)

def listener(host, port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen()
    s.settimeout(20)
    return s

def bound(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if port:
        s.bind(("0.0.0.0", port))
    return s

command, args = sys.argv[1], sys.argv[2:]
if command == "echo-peer":  # HOST PORT: answer every connection with the address it came from
    s = listener(args[0], int(args[1]))
    out(ready=True)
    while True:
        c, peer = s.accept()
        c.sendall(json.dumps(list(peer)).encode())
        c.close()
elif command == "listen":  # HOST PORT: accept one connection, say who it came from
    s = listener(args[0], int(args[1]))
    out(ready=True)
    c, peer = s.accept()
    c.sendall(b"hello")
    out(peer=list(peer))
elif command == "connect":  # HOST PORT LOCAL_PORT TIMEOUT: one try; what came back, or why not
    s = bound(int(args[2]))
    s.settimeout(float(args[3]))
    try:
        s.connect((args[0], int(args[1])))
        out(ok=True, local=list(s.getsockname()), reply=s.recv(200).decode())
    except OSError as error:
        out(ok=False, error=type(error).__name__, errno=error.errno)
elif command == "simopen":  # LOCAL_PORT HOST PORT SECONDS: connect from a fixed port, retrying
    deadline = time.monotonic() + float(args[3])
    tries, last = 0, None
    while time.monotonic() < deadline:
        tries += 1
        s = bound(int(args[0]))
        s.settimeout(max(0.2, min(3.0, deadline - time.monotonic())))
        try:
            s.connect((args[1], int(args[2])))
        except OSError as error:
            last = f"{type(error).__name__} {error.errno}"
            s.close()
            time.sleep(0.1)
            continue
        s.settimeout(3)
        s.sendall(socket.gethostname().encode() or b"x")
        data = s.recv(200)
        out(ok=True, tries=tries, peer=list(s.getpeername()), received=bool(data))
        break
    else:
        out(ok=False, tries=tries, error=last)
"""

ECHO_PORT = 7000
#: How long a connection that should be dropped silently is given: an answer inside the lab
#: takes milliseconds, and a silent drop never answers.
DROP_WAIT = 0.5


def _json_line(process: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if selector.select(timeout=0.2):
            line = process.stdout.readline()
            if line:
                return json.loads(line)
        if process.poll() is not None:
            assert process.stderr is not None
            pytest.fail(f"socket tool exited {process.returncode}: {process.stderr.read()}")
    pytest.fail("socket tool printed nothing in time")


def _start(lab: NatLab, node: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        lab.exec_args(node, [sys.executable, "-c", TOOL, *map(str, args)]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


@contextmanager
def _server(lab: NatLab, node: str, *args: object) -> Iterator[subprocess.Popen[str]]:
    """A socket tool server in ``node``, listening once this yields; stopped after."""
    process = _start(lab, node, *args)
    try:
        assert _json_line(process, timeout=10) == {"ready": True}
        yield process
    finally:
        process.kill()
        process.wait(timeout=5)


def _connect(
    lab: NatLab, node: str, host: str, port: int, *, local_port: int = 0, timeout: float = 3.0
) -> dict[str, Any]:
    done = lab.run(
        node,
        [sys.executable, "-c", TOOL, "connect", host, str(port), str(local_port), str(timeout)],
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def lab() -> Iterator[NatLab]:
    """One lab with two port-preserving NATs for the tests that only read it."""
    with nat_lab() as lab:
        yield lab


def test_private_hosts_reach_the_relay_from_their_routers_address(lab: NatLab) -> None:
    with _server(lab, "relay", "echo-peer", lab.addr("relay"), ECHO_PORT):
        for side, local_port in (("a", 40001), ("b", 40002)):
            seen = _connect(lab, side, lab.addr("relay"), ECHO_PORT, local_port=local_port)
            assert seen["ok"], seen
            # Translated to the router's WAN address, the port kept (no clash: port-preserving).
            assert json.loads(seen["reply"]) == [lab.wan(side), local_port]


def test_nothing_reaches_a_private_host_unasked(lab: NatLab) -> None:
    port = 7100
    with _server(lab, "a", "listen", "0.0.0.0", port), _server(lab, "b", "listen", "0.0.0.0", port):
        for side in ("a", "b"):
            # The router drops it silently (a timeout, not a refusal) ...
            seen = _connect(lab, "relay", lab.wan(side), port, timeout=DROP_WAIT)
            assert seen == {"ok": False, "error": "TimeoutError", "errno": None}, side
            # ... and the private address does not route from the internet at all.
            seen = _connect(lab, "relay", lab.addr(side), port, timeout=DROP_WAIT)
            assert seen["ok"] is False and seen["error"] != "TimeoutError", (side, seen)


def test_a_firewalled_public_host_takes_no_unsolicited_connection(lab: NatLab) -> None:
    port = 7200
    fw = lab.addr("fw")
    with _server(lab, "fw", "listen", fw, port):
        # `up` leaves fw's firewall on.
        assert _connect(lab, "relay", fw, port, timeout=DROP_WAIT)["error"] == "TimeoutError"
        # fw's own outbound connections still get their answers.
        with _server(lab, "relay", "echo-peer", lab.addr("relay"), ECHO_PORT):
            seen = _connect(lab, "fw", lab.addr("relay"), ECHO_PORT)
            assert seen["ok"] and json.loads(seen["reply"])[0] == fw, seen
        lab.firewall("fw", False)
        try:
            assert _connect(lab, "relay", fw, port)["reply"] == "hello"
        finally:
            lab.firewall("fw", True)
    with _server(lab, "fw", "listen", fw, port):
        assert _connect(lab, "relay", fw, port, timeout=DROP_WAIT)["error"] == "TimeoutError"


def test_simultaneous_open_through_two_port_preserving_nats(lab: NatLab) -> None:
    port = 7300
    a = _start(lab, "a", "simopen", port, lab.wan("b"), port, 5)
    b = _start(lab, "b", "simopen", port, lab.wan("a"), port, 5)
    try:
        from_a, from_b = _json_line(a, timeout=10), _json_line(b, timeout=10)
    finally:
        for process in (a, b):
            process.kill()
            process.wait(timeout=5)
    assert from_a["ok"] and from_b["ok"], (from_a, from_b)
    # Each side is connected to the other's router, at the port it bound: a punched flow.
    assert from_a["peer"] == [lab.wan("b"), port] and from_a["received"]
    assert from_b["peer"] == [lab.wan("a"), port] and from_b["received"]
    assert f"dport={port}" in lab.conntrack("a")


def test_a_port_forward_reaches_the_private_listener(lab: NatLab) -> None:
    port = 7400
    with _server(lab, "b", "listen", "0.0.0.0", port) as listener:
        lab.forward("b", port)
        try:
            seen = _connect(lab, "relay", lab.wan("b"), port)
            assert seen["ok"] and seen["reply"] == "hello", seen
            # DNAT only: the private host sees the relay's own address.
            assert _json_line(listener, timeout=5)["peer"][0] == lab.addr("relay")
        finally:
            lab.unforward("b", port)
    with _server(lab, "b", "listen", "0.0.0.0", port):
        seen = _connect(lab, "relay", lab.wan("b"), port, timeout=DROP_WAIT)
        assert seen["error"] == "TimeoutError", seen


def test_symmetric_nat_changes_the_source_port_and_the_lab_goes_away() -> None:
    with nat_lab(nat_b="symmetric") as lab:
        assert (lab.nat_a, lab.nat_b) == ("port-preserving", "symmetric")
        with _server(lab, "relay", "echo-peer", lab.addr("relay"), ECHO_PORT):
            seen_a = _connect(lab, "a", lab.addr("relay"), ECHO_PORT, local_port=40100)
            seen_b = _connect(lab, "b", lab.addr("relay"), ECHO_PORT, local_port=40100)
        assert json.loads(seen_a["reply"]) == [lab.wan("a"), 40100]
        observed_ip, observed_port = json.loads(seen_b["reply"])
        assert observed_ip == lab.wan("b")
        assert observed_port != 40100
        # The same simultaneous open as through two port-preserving NATs now misses: b's SYN
        # leaves from another port than the one a aims at, and neither router lets it in.
        port = 7300
        a = _start(lab, "a", "simopen", port, lab.wan("b"), port, 2)
        b = _start(lab, "b", "simopen", port, lab.wan("a"), port, 2)
        try:
            from_a, from_b = _json_line(a, timeout=10), _json_line(b, timeout=10)
        finally:
            for process in (a, b):
                process.kill()
                process.wait(timeout=5)
        assert not from_a["ok"] and not from_b["ok"], (from_a, from_b)
        names = [lab.ns(node) for node in ("pub", "relay", "fw", "ra", "rb", "a", "b")]
        assert all(os.path.exists(f"/run/netns/{name}") for name in names)
    assert not any(os.path.exists(f"/run/netns/{name}") for name in names)
