"""A devnet's peers run the same ``mtor_p2p`` as the devnet command, whatever directory it is
called from (found by a new user: a stale checkout in the calling directory was imported by
every peer, which then served none of the new routes)."""

from __future__ import annotations

import json
import os
import shlex
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
    # Ctrl-C's stop is said, with where the data stays (it said nothing: a new user's report).
    assert process.returncode == 0
    assert process.stderr is not None
    said = process.stderr.read()
    assert "stopping the devnet (1 peer)" in said
    assert f"devnet stopped; its data kept in {tmp_path / 'net'}" in said


def test_a_second_devnet_on_a_directory_in_use_leaves_the_running_one_alone(
    tmp_path: Path,
) -> None:
    """A devnet on a directory whose peer is running (its lock held) exits 7 at once, before
    writing a thing there: it had removed the running peer's control.json (a new user then
    could not reach that peer)."""
    from mtor_p2p.control import INFO_FILE_NAME
    from mtor_p2p.datadir import DataDirLock

    peer = tmp_path / "net" / "peer-0"
    peer.mkdir(parents=True, mode=0o700)
    info = peer / INFO_FILE_NAME
    info.write_text("{}")
    with DataDirLock(peer):  # as the running peer holds it
        result = subprocess.run(
            [sys.executable, "-P", "-m", "mtor_p2p", "devnet", "--peers", "2",
             "--data-dir", str(tmp_path / "net")],
            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
    assert result.returncode == 7, result.stderr
    assert "is in use by pid" in result.stderr and "another devnet?" in result.stderr
    assert info.exists() and not (tmp_path / "net" / "genesis.json").exists()


def test_a_peer_that_fails_to_start_is_reported_with_the_error_it_logged(tmp_path):
    """The devnet repeats the peer's own one-line error (a new user had to open peer.log to
    read why), and only the last such line, without the log's noise around it."""
    from mtor_p2p.devnet import PeerFailed

    log = tmp_path / "peer.log"
    log.write_text(
        "2026-12-06 WARNING mtor_kernels.backend: no usable GPU\n"
        "mtor-peer: error: an older complaint\n"
        "mtor-peer: error: /x/ledger.sqlite was written under ledger rules '3'; upgrade\n"
        "\n"
    )
    failed = PeerFailed(2, 2, log)
    assert failed.code == 2
    assert str(failed) == (
        "peer 2 exited (exit code 2): /x/ledger.sqlite was written under ledger rules '3'; "
        f"upgrade (see {log})"
    )
    missing = str(PeerFailed(1, 1, tmp_path / "missing.log"))
    assert missing.startswith("peer 1 exited (exit code 1) (see ")
    # Only this run's part of the log: a peer killed without a word, in a log holding an
    # earlier run's refusal, is not reported with that refusal.
    this_run = log.stat().st_size
    with log.open("a") as more:
        more.write("Traceback (most recent call last):\n")
    killed = str(PeerFailed(0, -9, log, this_run))
    assert killed == f"peer 0 exited (-9: killed by SIGKILL) (see {log})"
    log.write_text("mtor-peer: error: \x1b]0;owned\x07 bad\n")  # from the start: offset 0
    assert "\x1b" not in str(PeerFailed(3, 1, log)) and "? bad" in str(PeerFailed(3, 1, log))


def test_the_devnet_says_how_to_join_it_and_that_command_joins_its_network(
    tmp_path: Path,
) -> None:
    """The devnet's banner ends with a ``join it:`` command, its genesis included: a new user
    who joined with ``run --bootstrap`` alone followed a network of its own, and nothing said
    so. The printed command, run as printed (another data directory), follows the devnet's
    network: the same genesis as its peer."""
    import shlex

    process = subprocess.Popen(
        [sys.executable, "-m", "mtor_p2p", "devnet", "--peers", "1",
         "--data-dir", str(tmp_path / "net")],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    joined = None
    try:
        assert process.stdout is not None
        banner: list[str] = []
        while not banner or not banner[-1].startswith("Ctrl-C stops every peer"):
            banner.append(process.stdout.readline())  # the devnet's own timeout bounds it
            assert banner[-1], f"the devnet ended before its banner: {banner}"
        joins = [line for line in banner if line.startswith("join it:")]
        assert len(joins) == 1, banner
        argv = shlex.split(joins[0].removeprefix("join it:"))
        assert "--genesis" in argv and "--bootstrap" in argv
        # A data directory named after this devnet's: a fixed one (/tmp/my-node) kept the
        # network of whichever devnet was joined first (a new user's walkthrough).
        assert argv[argv.index("--data-dir") + 1] == f"{tmp_path / 'net'}-node"
        argv[argv.index("--data-dir") + 1] = str(tmp_path / "mine")
        joined = subprocess.Popen(
            [sys.executable, "-m", "mtor_p2p", *argv[1:], "--json"],
            env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        read_json_line(joined, timeout=90)
        mine, theirs = (
            json.loads(
                subprocess.run(
                    [sys.executable, "-m", "mtor_p2p", "balance", "--json", "--data-dir", d],
                    env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                    text=True, timeout=60, check=True,
                ).stdout
            )
            for d in (str(tmp_path / "mine"), str(tmp_path / "net" / "peer-0"))
        )  # fmt: skip
        assert mine["genesis"] == theirs["genesis"]
        assert mine["network"] == theirs["network"]
    finally:
        if joined is not None:
            joined.send_signal(signal.SIGINT)
            joined.wait(timeout=30)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    assert process.returncode == 0


def test_a_temporary_devnet_says_its_join_command_works_only_while_it_runs() -> None:
    """A devnet in a temporary directory removes its genesis when it stops, so its ``join
    it:`` command says so; one in a directory of the user's keeps its files and says nothing
    more."""
    from mtor_p2p.devnet import join_lines

    base = Path("/tmp/mtor devnet-x")
    kept = join_lines("mtor-peer", base, "/ip4/127.0.0.1/tcp/4001/p2p/Qm", temporary=False)
    assert len(kept) == 1 and kept[0].startswith("join it:")
    argv = shlex.split(kept[0].removeprefix("join it:"))
    assert argv[argv.index("--genesis") + 1] == str(base / "genesis.json")
    assert argv[argv.index("--data-dir") + 1] == f"{base}-node"
    temporary = join_lines("mtor-peer", base, "/ip4/127.0.0.1/tcp/4001/p2p/Qm", temporary=True)
    assert temporary[0] == kept[0]
    assert "removed when it stops" in temporary[1] and "--data-dir DIR" in temporary[1]
    assert f"'{base}-node' is yours to remove" in temporary[1]
