"""Attacks on the node's web dashboard (issue 11, item 2): each test reproduces a weakness
found in review, and failed before its fix. Real nodes on loopback (test_metrics'
``devnet_after_a_job``), the real control API over real HTTP.

Hostile capacity records reach the node through ``CapacityService.offer_raw``: the very call
the gossip receive loop (``_receive_loop``, with the sender as ``expected_peer``) and the
DHT sweep make for every record they get; the records are signed by fresh identities (peer
IDs cost nothing) and pass the record validator unchanged."""

from __future__ import annotations

import gc
import http.client
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from mtor_p2p.capacity.record import Device
from mtor_p2p.identity import Identity
from mtor_p2p.node import Node
from tests.conftest import CPU, make_record
from tests.test_dashboard import acall, login
from tests.test_metrics import control_url, devnet_after_a_job

ROOT = Path(__file__).resolve().parent.parent


def gossip(node: Node, count: int, **changes: object) -> list[str]:
    """``count`` hostile peers' signed capacity records, received as gossip by ``node``."""
    now = node.clock.now()
    peers = []
    for _ in range(count):
        identity = Identity.generate()
        fields: dict[str, object] = {"expires": now + 600, "kernels": ("matmul",)}
        fields.update(changes)
        record = make_record(identity, now=now, **fields)
        assert node.capacity.offer_raw(record.sign(identity), expected_peer=identity.peer_id)
        peers.append(identity.peer_id)
    return peers


def _events_blocking(url: str, session: str, wanted: int, timeout: float) -> list[dict]:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request(
            "GET", "/v1/dashboard/events", headers={"Authorization": f"Bearer {session}"}
        )
        response = connection.getresponse()
        assert response.status == 200, response.read()
        events: list[dict] = []
        while len(events) < wanted:
            line = response.readline()  # http.client undoes the chunked encoding
            assert line, f"the stream ended after {len(events)} events"
            if line.startswith(b"data: "):
                # Strict JSON, as the browser's JSON.parse reads it: no NaN, no Infinity.
                events.append(json.loads(line[6:], parse_constant=_not_json))
        return events
    finally:
        connection.close()


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (the browser's JSON.parse refuses it)")


async def events(url: str, session: str, wanted: int, timeout: float = 20) -> list[dict]:
    """The first ``wanted`` snapshots of the event stream, over real HTTP."""
    return await trio.to_thread.run_sync(_events_blocking, url, session, wanted, timeout)


# -- (a) a hostile remote peer --------------------------------------------------------------


async def test_free_peers_of_the_same_gpu_class_do_not_break_status_or_crash_the_node(
    tmp_path: Path,
) -> None:
    """Two peers (or one, where the class has no other seller) that advertise this node's
    GPU class at price 0, which the record validator and ``--price 0`` both allow."""
    async with devnet_after_a_job(tmp_path) as (requester, _worker):
        url, token = control_url(requester)
        session = await login(url, token)
        assert requester.serve
        gossip(requester, 2, devices=(CPU,), price=0.0)  # the requester's class: "cpu"
        status, _, body = await acall(url + "/v1/status", bearer=token)
        assert status == 200, body
        status, _, body = await acall(url + "/v1/dashboard/state", bearer=session)
        assert status == 200, body
        # The operator opens the page: the feed starts building snapshots each tick.
        assert len(await events(url, session, 2)) == 2
        await trio.sleep(2)
        assert not requester.stopped.is_set()
        assert (await acall(url + "/v1/status", bearer=token))[0] == 200


async def test_a_tiny_price_keeps_every_snapshot_valid_json(tmp_path: Path) -> None:
    async with devnet_after_a_job(tmp_path) as (requester, _worker):
        url, token = control_url(requester)
        session = await login(url, token)
        gossip(requester, 2, devices=(CPU,), price=5e-324)
        status, _, body = await acall(url + "/v1/dashboard/state", bearer=session)
        assert status == 200, body
        json.loads(body, parse_constant=_not_json)
        snapshot = (await events(url, session, 1))[0]
        assert snapshot["node"]["peer_id"] == requester.peer_id


async def test_many_sybil_records_do_not_blow_up_the_snapshot(tmp_path: Path) -> None:
    async with devnet_after_a_job(tmp_path) as (requester, _worker):
        url, token = control_url(requester)
        session = await login(url, token)
        status, _, before = await acall(url + "/v1/dashboard/state", bearer=session)
        assert status == 200
        gossip(requester, 3000, region="WUS", devices=(Device("gpu", "X" * 128, 1, 1),))
        status, _, after = await acall(url + "/v1/dashboard/state", bearer=session)
        assert status == 200
        # The view is the attacker's to fill: what the page gets of it must stay bounded.
        assert len(after) < len(before) + 256 * 1024, (len(before), len(after))


# -- (d) viewers that hang up ---------------------------------------------------------------


async def test_viewers_that_hang_up_at_once_do_not_use_up_the_event_streams(
    tmp_path: Path,
) -> None:
    async with devnet_after_a_job(tmp_path) as (requester, _worker):
        url, token = control_url(requester)
        session = await login(url, token)
        server = requester.control_server
        assert server is not None
        host, port = url.removeprefix("http://").split(":")
        request = (
            f"GET /v1/dashboard/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {session}\r\n\r\n"
        ).encode()
        for index in range(40):
            sock = socket.create_connection((host, int(port)))
            sock.sendall(request)
            if index % 2:  # half close with a reset, as a killed tab does
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            await trio.sleep(0.01)
        # Past the connection deadline, with the garbage collected: every slot is free.
        await trio.sleep(12)
        gc.collect()
        await trio.sleep(0.5)
        assert server.stats.streams == 0, server.stats
        assert len(await events(url, session, 1)) == 1


# -- (c) another local user -----------------------------------------------------------------


async def test_open_does_not_show_the_ticket_to_other_local_users(tmp_path: Path) -> None:
    async with devnet_after_a_job(tmp_path) as (requester, _worker):
        url, _token = control_url(requester)
        # A browser that takes a while to start, as a cold one does.
        browser = tmp_path / "slow-browser"
        browser.write_text("#!/bin/sh\nsleep 4\n")
        browser.chmod(0o755)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "BROWSER": f"{browser} %s"}
        argv = [sys.executable, "-m", "mtor_p2p", "dashboard", "--open"]
        argv += ["--data-dir", str(requester.config.data_dir)]
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(
                    trio.run_process,
                    argv,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    check=False,
                )
            )
            # What another user on the machine can do: read every process's arguments.
            stolen = None
            deadline = time.monotonic() + 10
            while stolen is None and time.monotonic() < deadline:
                stolen = _ticket_in_some_cmdline()
                await trio.sleep(0.01)
            session = None
            if stolen is not None:
                status, _, body = await acall(
                    f"{url}/v1/dashboard/login", method="POST", body={"ticket": stolen}
                )
                if status == 200:
                    session = json.loads(body)["session"]
            assert session is None, "another local user took the ticket from ps and logged in"


def _ticket_in_some_cmdline() -> str | None:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        match = re.search(rb"/dashboard#ticket=([A-Za-z0-9_-]+)", cmdline)
        if match:
            return match.group(1).decode()
    return None


async def test_connections_reset_at_once_are_not_logged_as_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with devnet_after_a_job(tmp_path) as (requester, _worker):
        url, token = control_url(requester)
        session = await login(url, token)
        host, port = url.removeprefix("http://").split(":")
        caplog.clear()
        for _ in range(500):
            sock = socket.create_connection((host, int(port)))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            await trio.lowlevel.checkpoint()
        await trio.sleep(1)
        errors = [r for r in caplog.records if r.name == "mtor_p2p.control" and r.levelno >= 40]
        assert not errors, f"{len(errors)} ERROR records, e.g. {errors[0].getMessage()!r}"
        status, _, body = await acall(url + "/v1/dashboard/state", bearer=session)
        assert status == 200
        shown = [w["message"] for w in json.loads(body)["warnings"]]
        assert not [m for m in shown if "control API connection failed" in m], shown
