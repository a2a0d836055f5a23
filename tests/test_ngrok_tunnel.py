"""Tests for mtor_p2p.ngrok_tunnel.

The real ngrok service is not reachable here (no internet access in CI), so these tests run
pyngrok against a stand-in agent, tests/fake_ngrok_agent.py, which prints the log lines pyngrok
waits for, serves the agent's local API and relays a loopback port to the requested local port.
Everything else (pyngrok's process start, its log parsing, its API calls, our timeouts and error
mapping) is the real code.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.error import URLError

import pytest
from pyngrok import conf, installer, ngrok, process

from mtor_p2p.ngrok_tunnel import NgrokError, NgrokTunnelManager, Tunnel

FAKE_AGENT = Path(__file__).with_name("fake_ngrok_agent.py")
PEER_ID = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"


@pytest.fixture
def fake_ngrok(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An executable named ``ngrok`` that runs the stand-in agent with this interpreter.

    Each test gets its own path, as pyngrok keeps one agent per binary path per process.
    """
    wrapper = tmp_path / "bin" / "ngrok"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_AGENT}" "$@"\n')
    wrapper.chmod(0o755)
    for name in ("NGROK_AUTHTOKEN", "MTOR_NGROK_PATH", "FAKE_NGROK_MODE", "FAKE_NGROK_PUBLIC_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FAKE_NGROK_EVENT_LOG", str(tmp_path / "events.jsonl"))
    return wrapper


def events(tmp_path: Path) -> list[dict[str, Any]]:
    log = tmp_path / "events.jsonl"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def wait_for_event(tmp_path: Path, kind: str, timeout: float = 3.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in events(tmp_path) if e["event"] == kind]
        if found:
            return found[0]
        time.sleep(0.02)
    raise AssertionError(f"no {kind!r} event in {events(tmp_path)}")


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def assert_one_line(exc: pytest.ExceptionInfo[NgrokError]) -> str:
    message = str(exc.value)
    assert message
    assert "\n" not in message and "\\n" not in message
    assert "Traceback" not in message
    return message


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A loopback TCP echo server; yields its port."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept_loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept_loop, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(2)
    server.close()


def roundtrip(host: str, port: int, payload: bytes) -> bytes:
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_open_relays_bytes_and_close_stops_agent(
    fake_ngrok: Path, tmp_path: Path, echo_port: int
) -> None:
    node_dir = tmp_path / "node"
    manager = NgrokTunnelManager(
        authtoken="tok-secret-123",
        ngrok_path=str(fake_ngrok),
        config_dir=str(node_dir),
        start_timeout=10,
    )
    try:
        tunnel = manager.open_tcp(echo_port)
        assert tunnel == Tunnel(f"tcp://localhost:{tunnel.port}", "localhost", tunnel.port)
        assert tunnel.port != echo_port
        assert tunnel.multiaddr(PEER_ID) == f"/dns4/localhost/tcp/{tunnel.port}/p2p/{PEER_ID}"
        payload = os.urandom(200_000)
        assert roundtrip(tunnel.host, tunnel.port, payload) == payload

        start = wait_for_event(tmp_path, "start")
        post = wait_for_event(tmp_path, "post")
        assert post["upstream"] == f"localhost:{echo_port}"
        assert post["kind"] == "endpoints"  # pyngrok's config version 3 API
        # The token reached the agent through the per-node config file, not the command line.
        config_file = node_dir / "ngrok.yml"
        assert start["config"] == [str(config_file)]
        assert start["token"] == "tok-secret-123" and start["token_source"] == "config"
        assert not any("tok-secret" in arg for arg in start["argv"])
        assert stat.S_IMODE(config_file.stat().st_mode) == 0o600
        assert process.is_process_running(str(fake_ngrok))
    finally:
        manager.close()

    deleted = wait_for_event(tmp_path, "delete")
    assert deleted["name"] == post["name"]
    assert wait_for_event(tmp_path, "stop")["signal"] == "SIGTERM"  # a clean stop, not a kill
    assert pid_gone(start["pid"])
    assert not process.is_process_running(str(fake_ngrok))
    assert not (node_dir / "ngrok.yml").exists()  # the file holding the token is gone
    with pytest.raises(OSError):
        socket.create_connection((tunnel.host, tunnel.port), timeout=2).close()
    manager.close()  # idempotent
    assert manager.tunnels == ()


def test_ip_host_env_settings_and_two_tunnels(
    fake_ngrok: Path, tmp_path: Path, echo_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_NGROK_PUBLIC_HOST", "127.0.0.1")
    monkeypatch.setenv("NGROK_AUTHTOKEN", "tok-from-env")
    monkeypatch.setenv("MTOR_NGROK_PATH", str(fake_ngrok))
    with NgrokTunnelManager(region="eu", start_timeout=10) as manager:
        assert manager.ngrok_path == str(fake_ngrok)
        first = manager.open_tcp(echo_port)
        second = manager.open_tcp(echo_port)
        assert first.multiaddr(PEER_ID) == f"/ip4/127.0.0.1/tcp/{first.port}/p2p/{PEER_ID}"
        assert first.port != second.port
        assert roundtrip(second.host, second.port, b"ping") == b"ping"
        assert manager.tunnels == (first, second)
        start = wait_for_event(tmp_path, "start")
        assert start["token"] == "tok-from-env"
        assert start["region"] == "eu"
        # pyngrok runs one agent per binary path: a second manager must not share it.
        with pytest.raises(NgrokError, match="already runs the ngrok agent") as exc:
            NgrokTunnelManager(authtoken="x", ngrok_path=str(fake_ngrok)).open_tcp(echo_port)
        assert_one_line(exc)
    assert [e["event"] for e in events(tmp_path)].count("delete") == 2
    assert pid_gone(start["pid"])


def test_multiaddr_forms() -> None:
    assert Tunnel.from_public_url("tcp://0.tcp.ngrok.io:12345").multiaddr("QmPeer") == (
        "/dns4/0.tcp.ngrok.io/tcp/12345/p2p/QmPeer"
    )
    assert Tunnel("tcp://3.4.5.6:7", "3.4.5.6", 7).multiaddr("QmPeer") == (
        "/ip4/3.4.5.6/tcp/7/p2p/QmPeer"
    )
    assert Tunnel.from_public_url("tcp://[2001:db8::1]:443").multiaddr("QmPeer") == (
        "/ip6/2001:db8::1/tcp/443/p2p/QmPeer"
    )
    for bad in ("https://x.ngrok.app", "tcp://host", "tcp://:80", "tcp://h:99999"):
        with pytest.raises(NgrokError):
            Tunnel.from_public_url(bad)
    with pytest.raises(ValueError):
        Tunnel("tcp://h:1", "h", 1).multiaddr("")


def test_no_authtoken(fake_ngrok: Path, tmp_path: Path) -> None:
    manager = NgrokTunnelManager(ngrok_path=str(fake_ngrok), config_dir=str(tmp_path / "node"))
    with pytest.raises(NgrokError) as exc:
        manager.open_tcp(4001)
    assert assert_one_line(exc) == (
        "ngrok needs an authtoken: set NGROK_AUTHTOKEN or [ngrok] authtoken in the config file"
    )
    assert events(tmp_path) == []  # the agent was never started
    manager.close()


def test_silent_agent_times_out(
    fake_ngrok: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_NGROK_MODE", "silent")
    manager = NgrokTunnelManager(authtoken="tok", ngrok_path=str(fake_ngrok), start_timeout=2)
    began = time.monotonic()
    with pytest.raises(NgrokError) as exc:
        manager.open_tcp(4001)
    elapsed = time.monotonic() - began
    assert assert_one_line(exc) == "ngrok agent did not start within 2 s"
    assert 1.9 <= elapsed < 4.5
    assert pid_gone(wait_for_event(tmp_path, "start")["pid"])
    assert not process.is_process_running(str(fake_ngrok))
    manager.close()


def test_error_agent_reports_agent_error(
    fake_ngrok: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_NGROK_MODE", "error")
    manager = NgrokTunnelManager(authtoken="tok", ngrok_path=str(fake_ngrok), start_timeout=10)
    with pytest.raises(NgrokError) as exc:
        manager.open_tcp(4001)
    message = assert_one_line(exc)
    assert "authentication failed: The authtoken you specified is invalid" in message
    assert "ERR_NGROK_107" in message
    assert pid_gone(wait_for_event(tmp_path, "start")["pid"])
    manager.close()


def test_crashing_agent(fake_ngrok: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_NGROK_MODE", "crash")
    manager = NgrokTunnelManager(authtoken="tok", ngrok_path=str(fake_ngrok), start_timeout=10)
    with pytest.raises(NgrokError, match="unable to start") as exc:
        manager.open_tcp(4001)
    assert_one_line(exc)
    manager.close()


def test_rejected_tunnel_stops_agent(
    fake_ngrok: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_NGROK_MODE", "reject")
    manager = NgrokTunnelManager(authtoken="tok", ngrok_path=str(fake_ngrok), start_timeout=10)
    with pytest.raises(NgrokError) as exc:
        manager.open_tcp(4001)
    message = assert_one_line(exc)
    assert message.startswith("ngrok agent refused the tunnel (HTTP 400)")
    assert "require a verified account" in message
    assert pid_gone(wait_for_event(tmp_path, "start")["pid"])  # no tunnel: no agent left behind
    manager.close()


def test_missing_binary_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # This machine is offline anyway; make sure a networked CI does not download ngrok either.
    def offline(*_args: object, **_kwargs: object) -> None:
        raise URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(installer, "urlopen", offline)
    missing = tmp_path / "nowhere" / "ngrok"
    manager = NgrokTunnelManager(authtoken="tok", ngrok_path=str(missing), start_timeout=5)
    with pytest.raises(NgrokError) as exc:
        manager.open_tcp(4001)
    message = assert_one_line(exc)
    assert message.startswith(f"ngrok agent not found at {missing} and could not be installed")
    assert "Name or service not known" in message
    assert not missing.exists()
    manager.close()


def test_binary_not_executable(tmp_path: Path) -> None:
    not_exec = tmp_path / "ngrok"
    not_exec.write_text("not a program\n")
    manager = NgrokTunnelManager(authtoken="tok", ngrok_path=str(not_exec), start_timeout=5)
    with pytest.raises(NgrokError) as exc:
        manager.open_tcp(4001)
    assert assert_one_line(exc) == f"cannot run the ngrok agent at {not_exec}: Permission denied"
    manager.close()


def test_bad_arguments() -> None:
    manager = NgrokTunnelManager(authtoken="tok", ngrok_path="/nonexistent/ngrok")
    for port in (0, 70000, True):
        with pytest.raises(NgrokError):
            manager.open_tcp(port)
    with pytest.raises(ValueError):
        NgrokTunnelManager(start_timeout=0)


def test_fake_agent_speaks_pyngroks_other_commands(fake_ngrok: Path, tmp_path: Path) -> None:
    """The stand-in answers the other subcommands pyngrok runs, and fails like ngrok without a
    token; this keeps it honest as a stand-in."""
    config_path = tmp_path / "cfg" / "ngrok.yml"
    config = conf.PyngrokConfig(ngrok_path=str(fake_ngrok), config_path=str(config_path))
    assert ngrok.get_version(config)[0] == "3.99.0-fake"
    ngrok.set_auth_token("tok-cli", config)  # runs `config add-authtoken ... --config PATH`
    assert json.loads(config_path.read_text())["agent"]["authtoken"] == "tok-cli"

    no_token = subprocess.run(
        [str(fake_ngrok), "start", "--none", "--log", "stdout"],
        capture_output=True,
        text=True,
        timeout=10,
        env={k: v for k, v in os.environ.items() if k != "NGROK_AUTHTOKEN"}
        | {"HOME": str(tmp_path)},
    )
    assert no_token.returncode == 1
    assert "lvl=crit" in no_token.stdout and "ERR_NGROK_4018" in no_token.stdout
