"""The control API under attack and on errors: a real ControlServer on 127.0.0.1, real sockets,
and the real ControlClient (urllib, in a thread)."""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from mtor_p2p import control
from mtor_p2p.control import (
    INFO_FILE_NAME,
    ControlClient,
    ControlError,
    ControlServer,
    Route,
    write_control_info,
)

TOKEN = "test-token"


async def status(query: dict[str, str], body: Any) -> tuple[int, Any]:
    return 200, {"ok": True}


async def missing_file(query: dict[str, str], body: Any) -> tuple[int, Any]:
    # What a job route does when the operand path it was given does not exist.
    await trio.Path("/nonexistent/mtor/operand.npy").read_bytes()
    return 200, {}


async def bug(query: dict[str, str], body: Any) -> tuple[int, Any]:
    raise ZeroDivisionError("a bug in a route")


ROUTES: dict[tuple[str, str], Route] = {
    ("GET", "/v1/status"): status,
    ("POST", "/v1/jobs"): missing_file,
    ("GET", "/v1/bug"): bug,
}


@asynccontextmanager
async def running(server: ControlServer) -> AsyncIterator[ControlClient]:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve)
        yield ControlClient(url=f"http://127.0.0.1:{port}", token=TOKEN, timeout=10)
        nursery.cancel_scope.cancel()


async def call(client: ControlClient, method: str, path: str, payload: Any = None) -> Any:
    return await trio.to_thread.run_sync(client.call, method, path, payload)


async def test_a_route_raising_a_file_error_is_a_400_with_its_message() -> None:
    """Before: ``except OSError: pass`` closed the connection without an answer, and the CLI
    reported "no node running"."""
    async with running(ControlServer(TOKEN, ROUTES)) as client:
        with pytest.raises(ControlError, match=r"^400: .*No such file.*operand\.npy"):
            await call(client, "POST", "/v1/jobs", {"a": "/nonexistent/mtor/operand.npy"})
        with pytest.raises(ControlError, match=r"^500: .*ZeroDivisionError"):
            await call(client, "GET", "/v1/bug")
        assert await call(client, "GET", "/v1/status") == {"ok": True}


async def test_status_answers_during_a_flood_of_idle_connections() -> None:
    """Hundreds of connections that never finish their request head neither starve an
    authenticated request nor stay open: beyond the cap the oldest still-reading connection
    is dropped, and every one is closed once the head deadline passes."""
    server = ControlServer(TOKEN, ROUTES, max_connections=32, head_timeout=1.5)
    async with running(server) as client:
        port = int(client.url.rsplit(":", 1)[1])
        idle = []
        for _ in range(500):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never ends
            idle.append(stream)
        start = time.monotonic()
        with trio.fail_after(5):
            assert await call(client, "GET", "/v1/status") == {"ok": True}
        assert time.monotonic() - start < 5
        assert server.stats.open <= 32 + 1
        assert server.stats.dropped_idle >= 400
        # Everyone left is cut at the head deadline, not after the 10 s connection deadline.
        with trio.fail_after(5):
            for stream in idle:
                while await stream.receive_some(4096):
                    pass
        for stream in idle:
            await stream.aclose()
        assert server.stats.open == 0


async def test_a_slowloris_client_is_cut_at_the_head_deadline() -> None:
    server = ControlServer(TOKEN, ROUTES, head_timeout=1.0)
    async with running(server) as client:
        port = int(client.url.rsplit(":", 1)[1])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        start = time.monotonic()
        with trio.fail_after(5):
            try:
                for byte in b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\n":
                    await stream.send_all(bytes([byte]))
                    await trio.sleep(0.2)
            except trio.BrokenResourceError:
                pass
            while await stream.receive_some(4096):
                pass
        assert time.monotonic() - start < 5
        assert server.stats.head_timeouts == 1
        await stream.aclose()


def test_write_control_info_is_atomic_and_private(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)  # the usual umask: a plain write would be world-readable
    try:
        path = write_control_info(tmp_path, {"url": "http://127.0.0.1:1", "pid": 1})
        assert path == tmp_path / INFO_FILE_NAME
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert json.loads(path.read_text())["url"] == "http://127.0.0.1:1"
        path.chmod(0o644)  # a file left by an older version is tightened on rewrite
        write_control_info(tmp_path, {"url": "http://127.0.0.1:2", "pid": 2})
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert json.loads(path.read_text())["pid"] == 2
        assert [p.name for p in tmp_path.iterdir()] == [INFO_FILE_NAME]
    finally:
        os.umask(old_umask)


async def raw(port: int, request: bytes) -> tuple[int, dict[str, str], Any]:
    """Send ``request`` as it is on a new connection; the answer's status, headers and JSON."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    with trio.fail_after(5):
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    await stream.aclose()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split(" ")[1]), headers, json.loads(body) if body else None


async def test_every_refusal_is_a_json_answer_and_closes_the_connection() -> None:
    """The token, unknown routes and methods, the head and body bounds: each answered in
    JSON with ``Connection: close`` (one request per connection)."""
    auth = f"Authorization: Bearer {TOKEN}\r\n"
    get = f"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}"
    post = f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}"
    async with running(ControlServer(TOKEN, ROUTES)) as client:
        port = int(client.url.rsplit(":", 1)[1])
        cases: list[tuple[bytes, int, str]] = [
            (b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 401, "missing or wrong"),
            (
                b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Authorization: Bearer t\xe9st\r\n\r\n",
                401,
                "missing or wrong",
            ),
            (f"GET /v1/nope HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}\r\n".encode(), 404, "no route"),
            (
                f"DELETE /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}\r\n".encode(),
                405,
                "no route",
            ),
            (
                f"{post}Content-Length: 999999\r\n\r\n".encode(),
                413,
                "body too large",
            ),
            (
                f"{get}X-Pad: {'a' * 20_000}\r\n\r\n".encode(),
                431,
                "head too large",
            ),
            (
                f"{post}Content-Length: 3\r\n\r\n{{x}}".encode(),
                400,
                "not JSON",
            ),
        ]
        for request, want_status, want_error in cases:
            status, headers, payload = await raw(port, request)
            assert status == want_status, (request[:40], status, payload)
            assert headers["content-type"] == "application/json"
            assert headers["connection"] == "close"
            assert want_error in payload["error"]
        # A chunked body is counted as it arrives: refused once past the bound.
        chunk = b"a" * 30_000
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(3)) + b"0\r\n\r\n"
        request = (
            f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Transfer-Encoding: chunked\r\n\r\n"
        ).encode()
        status, _headers, payload = await raw(port, request + chunked)
        assert (status, payload) == (413, {"error": "body too large"})
        assert await call(client, "GET", "/v1/status") == {"ok": True}


async def test_a_body_trickling_past_the_head_deadline_is_cut() -> None:
    """The body counts against the head deadline too: a client that sends its head at once
    and then its body a byte at a time is cut without an answer."""
    server = ControlServer(TOKEN, ROUTES, head_timeout=1.0)
    async with running(server) as client:
        port = int(client.url.rsplit(":", 1)[1])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        head = f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
        await stream.send_all((head + "Content-Length: 100\r\n\r\n").encode())
        start = time.monotonic()
        received = b""
        with trio.fail_after(5):
            try:
                for _ in range(100):
                    await stream.send_all(b" ")
                    await trio.sleep(0.2)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            while chunk := await stream.receive_some(4096):
                received += chunk
        assert time.monotonic() - start < 3
        assert received == b""
        assert server.stats.head_timeouts == 1
        await stream.aclose()


async def test_a_busy_server_answers_503_in_json() -> None:
    """When every open connection does real work, a new one is answered 503, in JSON."""
    release = trio.Event()

    async def slow(query: dict[str, str], body: Any) -> tuple[int, Any]:
        await release.wait()
        return 200, {"slow": True}

    server = ControlServer(TOKEN, {**ROUTES, ("GET", "/v1/slow"): slow}, max_connections=2)
    async with running(server) as client:
        port = int(client.url.rsplit(":", 1)[1])
        request = (
            f"GET /v1/slow HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
        )
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(raw, port, request.encode())
            with trio.fail_after(5):
                while server.stats.open < 2:
                    await trio.sleep(0.01)
            await trio.sleep(0.3)  # both requests are read and waiting in their route
            status, headers, payload = await raw(port, request.encode())
            assert (status, payload) == (503, {"error": "control API busy"})
            assert headers["content-type"] == "application/json"
            release.set()
        assert server.stats.refused_busy == 1


async def test_a_client_that_never_reads_its_answer_is_cut_at_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """hypercorn writes answers in a shielded scope; the connection deadline still holds for
    a client that never reads a large answer (its socket is closed under the write)."""
    monkeypatch.setattr(control, "_CONNECTION_DEADLINE", 1.0)

    async def large(query: dict[str, str], body: Any) -> tuple[int, Any]:
        return 200, {"pad": "x" * (32 << 20)}  # far more than the socket buffers hold

    server = ControlServer(TOKEN, {("GET", "/v1/large"): large})
    async with running(server) as client:
        port = int(client.url.rsplit(":", 1)[1])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        request = (
            f"GET /v1/large HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
        )
        await stream.send_all(request.encode())
        with trio.fail_after(5):
            while server.stats.open == 0:
                await trio.sleep(0.05)
            while server.stats.open:  # never reads; the server gives up within 1 + 1 s
                await trio.sleep(0.05)
        await stream.aclose()


async def test_query_strings_are_read_as_before() -> None:
    """Last value wins, blank values are dropped, escapes are UTF-8 (a raw non-ASCII byte in
    the target, which the hand-written server took as latin-1, is now refused by h11: 400)."""
    async with running(ControlServer(TOKEN, {("GET", "/v1/echo"): echo})) as client:
        port = int(client.url.rsplit(":", 1)[1])
        target = "/v1/echo?a=1&a=2&b=&c=%C3%A9"
        request = (
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
        )
        status, _headers, payload = await raw(port, request.encode("latin-1"))
        assert status == 200
        assert payload == {"a": "2", "c": "é"}
        status, _headers, _payload = await raw(
            port, request.replace("c=", "d=\xe9&c=").encode("latin-1")
        )
        assert status == 400


async def echo(query: dict[str, str], body: Any) -> tuple[int, Any]:
    return 200, query
