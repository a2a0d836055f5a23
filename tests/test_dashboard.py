"""The dashboard's server side on real nodes (py-libp2p on loopback, the real control API):
its login (one-use tickets, read-only sessions), what a session may and may not reach, the
loopback ``Host`` guard, the event stream and its bound, and the snapshot after a real job
(issue 11, item 2). The page itself runs in a real browser in test_dashboard_browser.py."""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio

from mtor_p2p import control
from mtor_p2p.dashboard import ASSETS, Sessions
from tests.test_metrics import control_url, devnet_after_a_job

ROOT = Path(__file__).resolve().parent.parent


def call(
    url: str,
    *,
    method: str = "GET",
    bearer: str | None = None,
    body: Any = None,
    host: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request (blocking): status, headers (names in lower case), body."""
    headers = {"Content-Type": "application/json"}
    if bearer is not None:
        headers["Authorization"] = f"Bearer {bearer}"
    if host is not None:
        headers["Host"] = host
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            headers = {k.lower(): v for k, v in response.headers.items()}
            return response.status, headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


async def acall(url: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
    return await trio.to_thread.run_sync(lambda: call(url, **kw))


async def login(url: str, token: str) -> str:
    """A dashboard session, through a ticket as the page gets one."""
    status, _, body = await acall(f"{url}/v1/dashboard/ticket", method="POST", bearer=token)
    assert status == 200, body
    ticket = json.loads(body)["ticket"]
    status, _, body = await acall(
        f"{url}/v1/dashboard/login", method="POST", body={"ticket": ticket}
    )
    assert status == 200, body
    return json.loads(body)["session"]


async def test_tickets_work_once_and_expire(autojump_clock: trio.abc.Clock) -> None:
    sessions = Sessions(ticket_seconds=60, session_seconds=600)
    ticket = sessions.ticket()
    session = sessions.login(ticket)
    assert session is not None and sessions.valid(session)
    assert sessions.login(ticket) is None  # used up
    assert sessions.login("not-a-ticket") is None
    late = sessions.ticket()
    await trio.sleep(61)
    assert sessions.login(late) is None  # expired
    assert sessions.valid(session)
    await trio.sleep(600)
    assert not sessions.valid(session)
    assert sessions.refused == 3


async def test_sessions_read_the_dashboard_and_nothing_else(tmp_path: Path) -> None:
    async with devnet_after_a_job(tmp_path) as (requester, _worker):
        url, token = control_url(requester)
        # The page and its assets need no token: they hold no data. No CDN, no inline script.
        for path in ASSETS:
            status, headers, body = await acall(url + path)
            assert status == 200, path
            assert "default-src 'self'" in headers["content-security-policy"]
            # Nothing fetched from elsewhere (the SVG namespace is a name, not a fetch).
            body = body.replace(b'"http://www.w3.org/2000/svg"', b"")
            assert b"http://" not in body and b"https://" not in body, path
        status, _, page = await acall(url + "/dashboard")
        assert b"<script>" not in page and b'src="/dashboard/app.js"' in page
        # Without a session, or with a wrong one: no data.
        for bearer in (None, "wrong", token[:-1]):
            status, _, body = await acall(url + "/v1/dashboard/state", bearer=bearer)
            assert status == 401, body
            assert b"peer_id" not in body
        session = await login(url, token)
        status, _, body = await acall(url + "/v1/dashboard/state", bearer=session)
        assert status == 200
        state = json.loads(body)
        assert state["node"]["peer_id"] == requester.peer_id
        stats = requester.worker.stats
        assert (state["node"]["operands_shared"], state["node"]["bytes_shared"]) == (
            stats.local_uploads,
            stats.bytes_shared,
        )
        # A session is read-only: the operator's routes refuse it.
        for method, path, payload in (
            ("GET", "/v1/status", None),
            ("GET", "/v1/receipts", None),
            ("POST", "/v1/ledger/transfer", {"to": "x", "amount": 1}),
            ("POST", "/v1/shutdown", None),
            ("POST", "/v1/dashboard/ticket", None),
            ("POST", "/v1/jobs", {"kernel": "matmul", "m": 8, "n": 8, "k": 8}),
        ):
            status, _, body = await acall(url + path, method=method, bearer=session, body=payload)
            assert status == 401, (path, body)
        assert not requester.stopped.is_set()
        # The operator's token reads the dashboard too (scripts, curl).
        status, _, _ = await acall(url + "/v1/dashboard/state", bearer=token)
        assert status == 200
        # The same insight is in status --json and its own routes (the operator's only).
        status, _, body = await acall(url + "/v1/status", bearer=token)
        insight = json.loads(body)["insight"]
        assert insight["why_no_work"]["summary"] == state["why_no_work"]["summary"]
        assert {p["peer_id"] for p in insight["peers"]} == {p["peer_id"] for p in state["peers"]}
        for path in ("/v1/insight", "/v1/earnings?limit=10"):
            assert (await acall(url + path, bearer=session))[0] == 401
            status, _, body = await acall(url + path, bearer=token)
            assert status == 200, body
        assert len(json.loads(body)["lines"]) == 4  # the job's four shards, paid
        # A used ticket, a wrong one, or none: a clear refusal.
        for payload in ({"ticket": "nope"}, {}, ["x"], None):
            status, _, body = await acall(url + "/v1/dashboard/login", method="POST", body=payload)
            assert status in (400, 401), (payload, body)
            assert b"session" not in body


async def test_a_foreign_host_name_is_refused(tmp_path: Path) -> None:
    """A web page that rebinds its own name to 127.0.0.1 sends its name as Host: refused,
    page and data alike (the token would stop it at the data, not at the page)."""
    async with devnet_after_a_job(tmp_path) as (requester, _worker):
        url, token = control_url(requester)
        port = url.rsplit(":", 1)[1]
        for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}"):
            for path, bearer in (("/dashboard", None), ("/v1/status", token)):
                status, _, body = await acall(url + path, bearer=bearer, host=host)
                assert status == 403, (host, path, body)
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):
            status, _, _ = await acall(url + "/v1/status", bearer=token, host=host)
            assert status == 200, host
        assert requester.control_server is not None
        assert requester.control_server.stats.foreign_host == 6


async def read_events(url: str, session: str, wanted: int, timeout: float = 20) -> list[dict]:
    """The first ``wanted`` snapshot events of the stream, over a raw socket."""
    host, port = url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    request = (
        f"GET /v1/dashboard/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {session}\r\n\r\n"
    )
    await stream.send_all(request.encode())
    data = b""
    events: list[dict] = []
    with trio.fail_after(timeout):
        while len(events) < wanted:
            chunk = await stream.receive_some(65536)
            assert chunk, data[:300]
            data += chunk
            events = [
                json.loads(line[len(b"data: ") :])
                for line in data.split(b"\n")
                if line.startswith(b"data: ")
            ]
    await stream.aclose()
    assert b"text/event-stream" in data.split(b"\r\n\r\n")[0]
    return events


async def test_events_stream_snapshots_and_are_bounded(tmp_path: Path) -> None:
    async with devnet_after_a_job(tmp_path) as (requester, worker):
        url, token = control_url(requester)
        session = await login(url, token)
        events = await read_events(url, session, 3)
        seqs = [e["seq"] for e in events]
        assert seqs == sorted(seqs) and len(set(seqs)) == 3
        last = events[-1]
        # What the page shows after the job: the worker in view, the job, its receipts.
        assert any(p["peer_id"] == worker.peer_id for p in last["peers"])
        job_receipts = [r for r in last["receipts"]["recent"] if r["role"] == "paid"]
        assert len(job_receipts) == 4 and all(r["entry"] for r in job_receipts)
        assert {r["peer"] for r in job_receipts} == {worker.peer_id}
        # Amounts in credits, as the ledger has them.
        ledger = json.loads((await acall(url + "/v1/ledger/balance", bearer=token))[2])
        assert last["ledger"]["balance"] == pytest.approx(ledger["balance"] / 1e9)
        assert last["ledger"]["balance"] != 0
        # MAX_STREAMS streams at once; the next is refused with 503, not queued.
        host, port = url.removeprefix("http://").split(":")
        streams = []
        for _ in range(control.MAX_STREAMS):
            stream = await trio.open_tcp_stream(host, int(port))
            await stream.send_all(
                f"GET /v1/dashboard/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {session}\r\n\r\n".encode()
            )
            with trio.fail_after(10):
                assert b"200" in (await stream.receive_some(4096)).split(b"\r\n")[0]
            streams.append(stream)
        status, _, body = await acall(url + "/v1/dashboard/events", bearer=session)
        assert status == 503, body
        for stream in streams:
            await stream.aclose()
        with trio.fail_after(10):
            while requester.control_server.stats.streams:  # type: ignore[union-attr]
                await trio.sleep(0.05)
        # A slot frees when a viewer leaves.
        assert len(await read_events(url, session, 1)) == 1


async def test_the_cli_prints_a_link_that_logs_in_once(tmp_path: Path) -> None:
    async with devnet_after_a_job(tmp_path) as (requester, _worker):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        argv = [sys.executable, "-m", "mtor_p2p", "dashboard"]
        argv += ["--data-dir", str(requester.config.data_dir), "--json"]
        done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, env=env)
        assert done.returncode == 0, done.stderr
        link = json.loads(done.stdout)["url"]
        base, ticket = link.split("/dashboard#ticket=")
        assert base == control_url(requester)[0]
        for expected in (200, 401):  # the link works once
            status, _, body = await acall(
                f"{base}/v1/dashboard/login", method="POST", body={"ticket": ticket}
            )
            assert status == expected, body
        # Without a running node: exit 3 and one line.
        argv[5] = str(tmp_path / "nobody")
        done = await trio.run_process(
            argv, capture_stdout=True, capture_stderr=True, env=env, check=False
        )
        assert done.returncode == 3
        assert done.stderr.decode().strip().count("\n") == 0, done.stderr


@pytest.mark.parametrize("path", sorted(ASSETS))
def test_assets_ship_with_the_package(path: str) -> None:
    from importlib import resources

    name = ASSETS[path][0]
    assert (resources.files("mtor_p2p.dashboard") / "static" / name).read_bytes()


def test_warnings_repeated_in_a_burst_are_counted_not_listed() -> None:
    """A burst of one complaint (seen: 155 copies of a gossip queue warning in a second) must
    not push every other warning off the page; the kept set stays bounded."""
    import logging

    from mtor_p2p.dashboard import MAX_WARNINGS, WarningLog

    handler = WarningLog()
    logger = logging.getLogger("mtor_p2p.test_dashboard_burst")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("first complaint")
        for _ in range(155):
            logger.warning("queue for peer %s exceeded", "X")
        logger.info("not a warning")
        records = handler.records
        assert [(r["message"], r["count"]) for r in records] == [
            ("first complaint", 1),
            ("queue for peer X exceeded", 155),
        ]
        for index in range(MAX_WARNINGS + 10):
            logger.error("distinct %d", index)
        assert len(handler.records) == MAX_WARNINGS
        assert handler.records[-1]["message"] == f"distinct {MAX_WARNINGS + 9}"
    finally:
        logger.removeHandler(handler)
