"""The ``mtor-peer`` command line, run as real subprocesses against real peers on loopback."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtor_p2p.cli import build_parser
from mtor_p2p.control import INFO_FILE_NAME
from mtor_p2p.ledger.names import LEDGER_RULES
from tests.processes import mtor, pid_alive, read_json_line, run_flags, start

FAKE_AGENT = Path(__file__).with_name("fake_ngrok_agent.py")


#: A flag each command's --help must show (``--json`` for those not named).
HELP_FLAGS = {"run": "--ngrok", "stop": "--timeout", "jobs": "--watch", "submit": "KERNEL"}


def test_help_explains_every_command():
    """Every subcommand the parser has (taken from it, so a new one is covered too) is listed
    by ``mtor-peer --help`` and answers ``--help`` with its own flags."""
    result = mtor("--help")
    assert result.returncode == 0
    assert "Exit codes" in result.stdout
    (commands,) = [
        action.choices
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    ]
    assert {"run", "stop", "status", "jobs", "submit", "devnet"} <= set(commands)
    for command in commands:
        assert re.search(rf"^    {command}\b", result.stdout, re.MULTILINE), command
        sub = mtor(command, "--help")
        assert sub.returncode == 0, sub.stderr
        assert sub.stdout.startswith(f"usage: mtor-peer {command} "), sub.stdout
        assert HELP_FLAGS.get(command, "--json") in sub.stdout, (command, sub.stdout)
        assert "``" not in sub.stdout, (command, sub.stdout)  # docstring markup, not help


def test_the_command_line_loads_no_server_numpy_or_trio_to_parse_its_arguments():
    """``mtor-peer --help`` and ``status`` parse their arguments and call the control API
    without importing the node's server, NumPy, trio or py-libp2p: with them, every CLI call
    took 0.55-0.6 s of CPU on the project's VM (0.25 s of it the control server's HTTP
    stack), 0.14-0.16 s without. A fresh interpreter, as every CLI call is."""
    code = (
        "import sys, mtor_p2p.cli as cli; cli.build_parser(); "
        "print(sorted(m for m in ('numpy', 'trio', 'hypercorn', 'starlette', 'libp2p', "
        "'mtor_kernels', 'mtor_p2p.control', 'mtor_p2p.ledger.store') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout


def test_id_is_stable_and_the_key_is_private(tmp_path):
    first = mtor("id", "--json", "--data-dir", str(tmp_path / "d"))
    second = mtor("id", "--json", "--data-dir", str(tmp_path / "d"))
    assert first.returncode == second.returncode == 0
    assert json.loads(first.stdout)["peer_id"] == json.loads(second.stdout)["peer_id"]
    assert stat.S_IMODE((tmp_path / "d" / "identity.key").stat().st_mode) == 0o600
    assert (
        mtor("id", "--data-dir", str(tmp_path / "d")).stdout.strip()
        == json.loads(first.stdout)["peer_id"]
    )


def test_status_without_a_node_exits_3(tmp_path):
    result = mtor("status", "--data-dir", str(tmp_path))
    assert result.returncode == 3
    assert "no running node" in result.stderr
    assert "Traceback" not in result.stderr


def test_ledger_commands_on_a_directory_no_node_used_leave_it_untouched(tmp_path):
    """`balance`, `ledger verify` and `stake` read a stopped node's ledger; on an empty
    directory they say no node has run there (exit 3) and write nothing (a new user's
    `balance` created an identity and a ledger there, and changed the directory's mode)."""
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o755)
    os.chmod(empty, 0o755)
    for command in (["balance"], ["ledger", "verify"], ["stake", "1"]):
        result = mtor(*command, "--data-dir", str(empty))
        assert result.returncode == 3, (command, result.stderr)
        assert f"no node has run on {empty}" in result.stderr
        assert f"run --data-dir {empty}" in result.stderr
    assert list(empty.iterdir()) == []
    assert empty.stat().st_mode & 0o777 == 0o755


def test_a_devnet_peer_not_running_is_told_to_start_its_devnet(tmp_path):
    """A devnet's peer (peer-N beside the devnet's genesis) is started by its devnet, not by
    `run` on its own (a new user was told to `run` it)."""
    (tmp_path / "genesis.json").write_text("{}")
    (tmp_path / "peer-0").mkdir(mode=0o700)
    result = mtor("status", "--data-dir", str(tmp_path / "peer-0"))
    assert result.returncode == 3
    assert f"devnet --data-dir {tmp_path}" in result.stderr
    plain = mtor("status", "--data-dir", str(tmp_path))
    assert plain.returncode == 3 and f" run --data-dir {tmp_path})" in plain.stderr


def test_bad_config_exits_2_with_one_line(tmp_path):
    config = tmp_path / "mtor.toml"
    config.write_text('regoin = "WEU"\n')
    result = mtor("run", "--config", str(config), "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert "unknown setting 'regoin'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_config_file_is_read_and_flags_override_it(tmp_path):
    config = tmp_path / "mtor.toml"
    config.write_text(f'data_dir = "{tmp_path / "from-config"}"\nregion = "JPE"\nprice = 2.5\n')
    process = start(*run_flags(tmp_path / "from-flag"), "--config", str(config), "--price", "3")
    try:
        read_json_line(process)
        status = json.loads(
            mtor("status", "--json", "--data-dir", str(tmp_path / "from-flag")).stdout
        )
        assert status["region"] == "JPE"  # from the file
        assert status["record"]["price"] == 3.0  # the flag wins
        assert not (tmp_path / "from-config").exists()
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=20)


def test_run_serves_status_and_peers_then_stops_cleanly_on_sigterm(tmp_path):
    process = start(*run_flags(tmp_path))
    ready = read_json_line(process)
    try:
        status = mtor("status", "--json", "--data-dir", str(tmp_path))
        assert status.returncode == 0, status.stderr
        body = json.loads(status.stdout)
        assert body["peer_id"] == ready["peer_id"]
        assert body["record"]["peer_id"] == ready["peer_id"]
        # The guards' counters an operator watches: mesh, control API, peer book.
        assert body["mesh"]["rounds"] >= 0 and body["control_api"]["accepted"] >= 1
        assert body["reputation"]["known"] == 0
        # The text form sums the same counters up, one line each.
        text = mtor("status", "--data-dir", str(tmp_path)).stdout
        assert "reputation 0 known, 0 measured, 0 demoted; challenges 0 (0 verified)" in text
        assert "guards     requests refused: 0 busy, 0 size, 0 per-peer limit" in text
        assert "mesh       0/8 connected" in text
        assert "control    1 open" in text
        assert "worker     numpy: 0 shards run" in text
        assert "FLOP/s measured" in text
        # The ledger rules it follows, which its record states and peers of other rules lack.
        assert body["ledger_rules"] == LEDGER_RULES
        assert f"ledger rules {LEDGER_RULES}   uptime" in text
        # The network its credits and jobs belong to.
        ledger = body["ledger"]
        assert (
            f"ledger     network {ledger['network']} (genesis {ledger['genesis'][:16]}…)\n" in text
        )
        listed = mtor("peers", "--json", "--data-dir", str(tmp_path))
        peers = json.loads(listed.stdout)
        assert [p["peer_id"] for p in peers] == [ready["peer_id"]]
        assert peers[0]["ledger_rules"] == LEDGER_RULES
        assert "other ledger rules" not in listed.stderr
        assert "another network" not in listed.stderr and not peers[0]["other_network"]
        table = mtor("peers", "--data-dir", str(tmp_path)).stdout
        assert "TFLOP/S" in table and "1 peer(s)" in table
        none = json.loads(
            mtor("peers", "--json", "--min-mem-gib", "100000", "--data-dir", str(tmp_path)).stdout
        )
        assert none == []
        assert stat.S_IMODE((tmp_path / "control.token").stat().st_mode) == 0o600
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    assert not (tmp_path / INFO_FILE_NAME).exists()


def test_control_api_refuses_a_wrong_token(tmp_path):
    import urllib.error
    import urllib.request

    process = start(*run_flags(tmp_path))
    read_json_line(process)
    try:
        url = json.loads((tmp_path / INFO_FILE_NAME).read_text())["url"]
        request = urllib.request.Request(
            url + "/v1/status", headers={"Authorization": "Bearer wrong"}
        )
        with pytest.raises(urllib.error.HTTPError) as excinfo:
            urllib.request.urlopen(request, timeout=5)
        assert excinfo.value.code == 401
        assert mtor("status", "--data-dir", str(tmp_path)).returncode == 0
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=20)


@pytest.mark.slow
def test_devnet_of_8_converges_restarts_a_killed_peer_keeps_a_stopped_one_and_ctrl_c_stops_all(
    tmp_path,
):
    # Renewals every 3 s, not every 1 s: eight peers renewing every second kept 1.6 of the
    # CI machine's 2 cores busy for the whole test (82 CPU-s against 58 alone), starving the
    # NAT lab's hole punches that run beside it.
    devnet = start(
        "devnet", "--peers", "8", "--json", "--data-dir", str(tmp_path),
        "--record-ttl", "12", "--announce-interval", "3", "--timeout", "120",
        "--shared-memory", "off",
    )  # fmt: skip
    try:
        ready = read_json_line(devnet, timeout=150)
        peers = ready["peers"]
        assert len(peers) == 8
        # Every peer took the devnet's --shared-memory, and says so.
        shown = mtor("status", "--json", "--data-dir", peers[0]["data_dir"])
        assert json.loads(shown.stdout)["worker"]["shared_memory"] is False
        assert "shared memory off" in mtor("status", "--data-dir", peers[0]["data_dir"]).stdout
        everyone = {p["peer_id"] for p in peers}
        for peer in peers:
            view = json.loads(mtor("peers", "--json", "--data-dir", peer["data_dir"]).stdout)
            assert {p["peer_id"] for p in view} == everyone
            assert peer["api"].startswith("http://127.0.0.1:")
            assert all(a.startswith("/ip4/127.0.0.1/tcp/") for a in peer["addrs"])
        # A crash: the devnet says so once, with the signal, and restarts the peer on its
        # data directory (same identity), which rejoins every view.
        victim = peers[5]
        killed_at = time.time()
        os.kill(victim["pid"], signal.SIGKILL)
        info_path = Path(victim["data_dir"]) / INFO_FILE_NAME
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if json.loads(info_path.read_text())["pid"] != victim["pid"]:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        else:
            pytest.fail("the killed peer was not restarted")
        restarted_pid = json.loads(info_path.read_text())["pid"]

        def rejoined(view: list[dict]) -> bool:
            # Every peer, the victim by a record it issued after the kill: its old record
            # stays live for up to a TTL, and would pass for it.
            ids = {p["peer_id"] for p in view}
            return ids == everyone and any(
                p["peer_id"] == victim["peer_id"] and p["issued"] > killed_at for p in view
            )

        while time.monotonic() < deadline:
            views = [
                json.loads(mtor("peers", "--json", "--data-dir", s["data_dir"]).stdout)
                for s in peers
            ]
            if all(rejoined(view) for view in views):
                break
            time.sleep(0.5)
        else:
            pytest.fail("the restarted peer did not rejoin every view")
        # A peer stopped on purpose stays stopped: the devnet does not undo `stop`.
        stopped = next(p for p in peers if p["index"] != victim["index"])
        assert mtor("stop", "--data-dir", stopped["data_dir"]).returncode == 0
        # `stop` waits up to 10 s for the process to exit after its stop is complete; a
        # machine busier than that still sees it go (tests/test_stop.py covers the wait).
        exit_deadline = time.monotonic() + 30
        while pid_alive(stopped["pid"]) and time.monotonic() < exit_deadline:
            time.sleep(0.2)
        assert not pid_alive(stopped["pid"])
        time.sleep(1.5)  # the devnet polls its peers 5 times a second: room to repeat itself
        assert not (Path(stopped["data_dir"]) / INFO_FILE_NAME).exists()
        # Its hint says how to bring it back (starting its devnet again while it runs fails).
        asked = mtor("status", "--data-dir", stopped["data_dir"])
        assert asked.returncode == 3
        assert "stopped while its devnet runs on: the devnet starts it again" in asked.stderr
        # Data directories are private from the start: the nodes had nothing to tighten.
        for peer in peers:
            data_dir = Path(peer["data_dir"])
            assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
            assert stat.S_IMODE((data_dir / "peer.log").stat().st_mode) == 0o600
            assert "tightened" not in (data_dir / "peer.log").read_text()
    finally:
        devnet.send_signal(signal.SIGINT)
        code = devnet.wait(timeout=30)
    assert code == 0
    # The crash is reported once, with its signal, and the peers stopped on Ctrl-C are not.
    assert devnet.stderr is not None
    stderr = devnet.stderr.read()
    exits = [line for line in stderr.splitlines() if "exited" in line]
    assert len(exits) == 1, exits
    assert f"devnet peer {victim['index']} exited (-9: killed by SIGKILL); restarting" in exits[0]
    assert f"devnet peer {stopped['index']} stopped (exit code 0); not restarting it" in stderr
    time.sleep(0.5)
    assert not any(pid_alive(pid) for pid in [p["pid"] for p in peers] + [restarted_pid])


def fake_ngrok_env(tmp_path: Path) -> dict[str, str]:
    wrapper = tmp_path / "bin" / "ngrok"
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_AGENT}" "$@"\n')
    wrapper.chmod(0o755)
    env = dict(os.environ)
    env["MTOR_NGROK_PATH"] = str(wrapper)
    env["FAKE_NGROK_PUBLIC_HOST"] = "127.0.0.1"
    return env


def test_ngrok_tunnel_is_announced_dialable_and_closed(tmp_path):
    """The real ngrok service is not reachable here: a stand-in agent (tests/fake_ngrok_agent.py)
    that pyngrok starts in place of ngrok relays a loopback port, so the whole path runs offline."""
    env = fake_ngrok_env(tmp_path)
    env["NGROK_AUTHTOKEN"] = "test-token"
    tunnelled = start(*run_flags(tmp_path / "a"), "--ngrok", env=env)
    ready = read_json_line(tunnelled)
    try:
        assert ready["tunnel"].startswith("tcp://127.0.0.1:")
        port = ready["tunnel"].rsplit(":", 1)[1]
        public = f"/ip4/127.0.0.1/tcp/{port}/p2p/{ready['peer_id']}"
        assert public in ready["addrs"]
        # Another peer bootstraps through the tunnel's public address only.
        other = start(*run_flags(tmp_path / "b"), "--bootstrap", public)
        read_json_line(other)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                view = json.loads(mtor("peers", "--json", "--data-dir", str(tmp_path / "b")).stdout)
                if ready["peer_id"] in {p["peer_id"] for p in view}:
                    break
                time.sleep(0.5)
            else:
                pytest.fail("the peer behind the tunnel never reached the other view")
            record = next(p for p in view if p["peer_id"] == ready["peer_id"])
            assert public in record["addrs"]  # announced in the capacity record too
        finally:
            other.send_signal(signal.SIGINT)
            other.wait(timeout=20)
    finally:
        tunnelled.send_signal(signal.SIGINT)
        assert tunnelled.wait(timeout=30) == 0
    time.sleep(0.5)
    agents = subprocess.run(["pgrep", "-f", str(FAKE_AGENT)], capture_output=True, text=True)
    assert str(tmp_path) not in agents.stdout  # no agent left behind


def test_ngrok_without_authtoken_fails_with_one_line(tmp_path):
    env = fake_ngrok_env(tmp_path)
    env.pop("NGROK_AUTHTOKEN", None)
    result = mtor(*run_flags(tmp_path / "a"), "--ngrok", env=env)
    assert result.returncode == 4
    assert "authtoken" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_submit_and_receipts_against_a_devnet_as_a_new_user_would(tmp_path):
    import numpy as np

    devnet = start("devnet", "--peers", "3", "--json", "--dir", str(tmp_path / "net"))
    try:
        peers = read_json_line(devnet, timeout=120)["peers"]
        requester = peers[0]["data_dir"]
        # A region nobody is in: the table is empty, and stderr names the regions in view.
        nowhere = mtor("peers", "--region", "nowhere", "--data-dir", requester)
        assert nowhere.returncode == 0, nowhere.stderr
        assert "no peer in region 'nowhere'; regions in view: " in nowhere.stderr
        assert "none matching" not in nowhere.stderr  # one line says it, not two
        # Any other filter that leaves nobody says so too, with what it asked.
        huge = mtor("peers", "--min-mem-gib", "100000", "--data-dir", requester)
        assert huge.returncode == 0, huge.stderr
        assert re.search(r"\d+ peer\(s\) in view, none matching --min-mem-gib 100000", huge.stderr)
        # Random inputs: the summary a script would read.
        result = mtor("submit", "matmul", "--m", "256", "--n", "128", "--k", "64", "--json",
                      "--data-dir", requester)  # fmt: skip
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        assert summary["verification"] == "freivalds"
        assert summary["shards"] >= 2 and summary["receipts"] == summary["shards"]
        assert summary["rejected"] == 0 and summary["cost"] > 0
        assert set(summary["workers"]) <= {p["peer_id"] for p in peers[1:]}
        # The node's short ID and the shards per worker, as `jobs --json` gives them.
        assert re.fullmatch(r"job-\d+", summary["id"]), summary["id"]
        assert sum(summary["shards_per_worker"].values()) == summary["shards"]
        assert set(summary["shards_per_worker"]) == set(summary["workers"])
        # Files in, file out: the product equals NumPy's.
        rng = np.random.default_rng(3)
        a, b = (
            rng.standard_normal((100, 40), dtype=np.float32),
            rng.standard_normal((40, 30), dtype=np.float32),
        )
        np.save(tmp_path / "a.npy", a)
        np.save(tmp_path / "b.npy", b)
        files = ["--a", str(tmp_path / "a.npy"), "--b", str(tmp_path / "b.npy")]
        out = ["--out", str(tmp_path / "c.npy")]
        human = mtor(
            "submit", "matmul", *files, *out, "--verify", "sample", "--progress",
            "--data-dir", requester,
        )  # fmt: skip
        assert human.returncode == 0, human.stderr
        assert "verified   sample" in human.stdout and "receipts" in human.stdout
        # One job ID in the progress and the summary; no "0/?" before the shards are known.
        assert "/?" not in human.stderr
        progress_id = human.stderr.strip().split("\r")[-1].split(":")[0]
        assert progress_id.startswith("job-")
        assert f"job        {progress_id} (" in human.stdout
        np.testing.assert_allclose(np.load(tmp_path / "c.npy"), a @ b, rtol=1e-4, atol=1e-4)
        assert f"output     {tmp_path / 'c.npy'}" in human.stdout
        # Without --out the summary says the product was not kept (a new user's walkthrough).
        unkept = mtor("submit", "matmul", "--m", "64", "--n", "64", "--k", "64",
                      "--data-dir", requester)  # fmt: skip
        assert unkept.returncode == 0, unkept.stderr
        assert "output     not kept (give --out FILE.npy to save it)" in unkept.stdout
        # Both sides hold the receipts, countersigned.
        mine = json.loads(mtor("receipts", "--json", "--data-dir", requester).stdout)
        assert mine["count"] >= summary["shards"] + 1
        assert all(r["complete"] for r in mine["receipts"])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            theirs = sum(
                json.loads(mtor("receipts", "--json", "--data-dir", p["data_dir"]).stdout)["count"]
                for p in peers[1:]
            )
            if theirs >= mine["count"]:
                break
            time.sleep(0.3)
        assert theirs >= mine["count"]
        table = mtor("receipts", "--data-dir", requester).stdout
        assert "requester" in table and "both" in table
        # The workers it used are measured now: verified speed, no failures.
        reputation = json.loads(mtor("reputation", "--json", "--data-dir", requester).stdout)
        measured = {p["peer_id"]: p for p in reputation["peers"] if p["measured_tflops"]}
        assert set(summary["workers"]) <= set(measured)
        assert all(p["rejected"] == 0 and p["excluded"] is None for p in measured.values())
        table = mtor("reputation", "--data-dir", requester).stdout
        assert "SPEED" in table and "FLOP/s" in table and "0.000" not in table
        # A redundant job pays two workers for every shard: its summary counts both
        # receipts and their cost, and the requester keeps both (they share job and shard).
        redundant = mtor("submit", "matmul", "--m", "256", "--n", "64", "--k", "64",
                         "--verify", "redundant", "--json", "--data-dir", requester)  # fmt: skip
        assert redundant.returncode == 0, redundant.stderr
        paid = json.loads(redundant.stdout)
        assert paid["receipts"] == 2 * paid["shards"]
        deadline = time.monotonic() + 10
        while True:  # stored just after the result
            listed = mtor("receipts", "--json", "--limit", "1000", "--data-dir", requester)
            held = [r for r in json.loads(listed.stdout)["receipts"]
                    if r["job_id"] == paid["job_id"]]  # fmt: skip
            if len(held) >= paid["receipts"] or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert len(held) == paid["receipts"]
        assert len({(r["shard"], r["worker"]) for r in held}) == paid["receipts"]
        assert paid["cost"] == pytest.approx(sum(r["cost"] for r in held))
        # Nobody is that cheap: a clear failure, exit 1.
        tiny = ["--m", "8", "--n", "8", "--k", "8"]
        cheap = mtor("submit", "matmul", *tiny, "--max-price", "0.0001", "--data-dir", requester)
        assert cheap.returncode == 1
        assert "no worker" in cheap.stderr
    finally:
        devnet.send_signal(signal.SIGINT)
        devnet.wait(timeout=30)


def test_the_worker_line_says_what_went_through_shared_memory_or_that_it_is_off():
    from mtor_p2p.cli import _status_guard_lines

    counts = {
        "local_uploads": 3,
        "bytes_shared": 48 << 20,
        "outputs_shared": 2,
        "output_bytes_shared": 64 << 20,
    }
    on = "\n".join(_status_guard_lines({"worker": {**counts, "shared_memory": True}}))
    assert "shared memory: 3 operands taken (48 MiB), 2 outputs handed over (64 MiB)" in on
    off = "\n".join(_status_guard_lines({"worker": {**counts, "shared_memory": False}}))
    assert "shared memory off" in off and "operands taken" not in off
