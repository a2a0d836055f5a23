"""Issue 11, item 6: every bad input a new user types gets one line that says what to do and a
documented exit code, never a traceback. Real ``mtor-peer`` subprocesses throughout; one node
(module-scoped, to spare the CPU) serves the cases that need a running node."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mtor_p2p.console import EXIT_CODES
from tests.processes import mtor, pid_alive, read_json_line, run_flags, start

#: A valid MTOR peer ID that no node of these tests has.
STRANGER = "12D3KooWL4mr7wzqgvxNEJfvjxSEjHLXqGiNBNwdUuamTjVUoXJm"
QUIET = ["--no-default-bootstrap", "--gpu", "none"]


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The command's stderr, which must be one line and no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["run", "--listen", "bogus"], 2, "listen address 'bogus' is not a multiaddr"),
        (["run", "--listen", "/ip4/1.2.3.4/udp/9"], 2, "must be /ip4/HOST/tcp/PORT"),
        (["run", "--max-connections", "0"], 2, "argument --max-connections: must be between"),
        (["run", "--price", "nan"], 2, "argument --price"),
        (["run", "--api-port", "70000"], 2, "argument --api-port: must be 0-65535"),
        (["run", "--bootstrap", "garbage"], 2, "has no /p2p/<peer ID> at its end"),
        (["run", "--bootstrap", "/ip4/203.0.113.7/tcp/4001"], 2, "has no /p2p/<peer ID>"),
        (
            ["run", "--bootstrap", "/ip4/203.0.113.7/tcp/4001/p2p/12D3KooW..."],
            2,
            "is not a valid multiaddr (Invalid CID",
        ),
        (  # the README's example, pasted as it stands: the hint says what goes there
            ["run", "--bootstrap", "/ip4/203.0.113.7/tcp/4001/p2p/12D3KooW..."],
            2,
            "write it like /ip4/203.0.113.7/tcp/4001/p2p/<peer ID> (the peer ID is what "
            "`mtor-peer id` prints on that peer",
        ),
        (
            [
                "run",
                "--bootstrap",
                "/ip4/1.2.3.4/tcp/1/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",
            ],
            2,
            "is not an MTOR peer ID",
        ),
        (
            ["run", "--listen", "/ip4/203.0.113.5/tcp/0", *QUIET],
            2,
            "this host has no address 203.0.113.5",
        ),
        (
            ["run", "--metrics-listen", "203.0.113.5:9100", *QUIET],
            2,
            "--metrics-listen 203.0.113.5:9100: this host has no address 203.0.113.5",
        ),
        (["run", "--metrics-listen", "9100", *QUIET], 2, "--metrics-listen (metrics_listen) must"),
        (["run", "--announce", "bogus", *QUIET], 2, "announce address 'bogus' is not"),
        (["run", "--announce", "/ip4/0.0.0.0/tcp/4001", *QUIET], 2, "names no reachable"),
        (["run", "--announce", "/ip4/1.2.3.4/tcp/0", *QUIET], 2, "names no reachable"),
        (["run", "--nat", "off", "--relay", "on", *QUIET], 2, "relay 'on' needs NAT"),
        (["run", "--relays-wanted", "-1", *QUIET], 2, "relays_wanted must be 0-8"),
        (["stake", "inf"], 2, "AMOUNT must be a finite number, not 'inf'"),
        (["stake", "nan"], 2, "AMOUNT must be a finite number, not 'nan'"),
        (["stake", "-3"], 2, "AMOUNT must be positive"),
        (["stake", "ten"], 2, "AMOUNT 'ten' is not a number"),
        (["stake", "1e40"], 2, "more than any account can hold"),
        (["stake", "0.0000000001"], 2, "at most 9 decimal places"),
        (["transfer", STRANGER, "inf"], 2, "AMOUNT must be a finite number"),
        (["transfer", "bogus", "1"], 2, "PEER 'bogus' is not a peer ID"),
        (["stop"], 3, "no running node found"),
        # The same words as status and jobs (it said "found in", a new user's walkthrough).
        (["status"], 3, "does not exist (start one with: mtor-peer run"),
        (["submit", "matmul", "--m", "64"], 3, "does not exist (start one with: mtor-peer run"),
        (["receipts", "--limit", "0"], 2, "argument --limit"),
        (["devnet", "--peers", "0"], 2, "argument --peers"),
        (["ledger", "prove"], 2, "ledger prove needs a receipt entry ID"),
        (["peers", "--bogus"], 2, "mtor-peer peers: error: unrecognized arguments: --bogus"),
        (["status", "--jsno"], 2, "unrecognized arguments: --jsno; did you mean --json?"),
        (["submit", "matmul", "--bogus"], 2, "mtor-peer submit matmul: error: unrecognized"),
        (["--bogus", "peers"], 2, "error: unrecognized arguments: --bogus"),
    ],
)
def test_bad_input_is_one_line_and_its_exit_code(tmp_path, args, code, message):
    result = mtor(*args, "--data-dir", str(tmp_path / "node"))
    assert result.returncode == code, result.stderr
    line = result.stderr.strip().splitlines()[-1]  # argparse prints its usage first
    assert message in line, result.stderr
    # One form for every refusal (a walkthrough found "mtor-peer: error: ..." beside
    # "mtor-peer: ..."), argparse's own included.
    assert line.startswith("mtor-peer") and ": error: " in line, result.stderr
    assert "Traceback" not in result.stderr
    # A refused command leaves no data directory behind (a refused `run` left one holding
    # only its lock file).
    assert not (tmp_path / "node").exists()


def test_a_file_as_the_data_directory_is_refused_by_every_command(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    commands = (["id"], ["status"], ["balance"], ["run", *QUIET], ["stake", "1"], ["devnet"])
    for command in commands:
        result = mtor(*command, "--data-dir", str(afile))
        assert result.returncode == 2, (command, result.stderr)
        assert f"--data-dir {afile} is a file, not a directory" in one_line(result)
    assert afile.read_text() == "not a directory"


def test_a_data_directory_that_cannot_be_written_is_refused(tmp_path):
    if os.geteuid() == 0:  # root writes through permission bits: use a kernel directory
        target = Path("/sys/mtor-test-node")
    else:
        parent = tmp_path / "read-only"
        parent.mkdir(mode=0o500)
        target = parent / "node"
    result = mtor("id", "--data-dir", str(target))
    assert result.returncode == 2
    assert f"cannot create the data directory {target}" in one_line(result)
    assert "give a --data-dir you can write to" in result.stderr


def test_help_documents_exit_codes_environment_and_version():
    text = mtor("--help").stdout
    for code, meaning in EXIT_CODES:
        assert f"{code:>3}  {meaning}" in text
    for name in ("MTOR_DATA_DIR", "MTOR_CONFIG", "NGROK_AUTHTOKEN", "MTOR_DEBUG"):
        assert name in text
    assert "MTOR_DATA_DIR" in " ".join(mtor("run", "--help").stdout.split())
    version = mtor("--version")
    assert version.returncode == 0 and version.stdout.startswith("mtor-peer ")
    assert "--dir" in mtor("devnet", "--help").stdout
    assert "--data-dir" in mtor("devnet", "--help").stdout


def test_environment_names_the_data_directory_and_the_config(tmp_path):
    env = {**os.environ, "MTOR_DATA_DIR": str(tmp_path / "from-env")}
    first = mtor("id", "--json", env=env)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["data_dir"] == str(tmp_path / "from-env")
    assert (tmp_path / "from-env" / "identity.key").is_file()
    # The flag wins over the environment.
    flag = mtor("id", "--json", "--data-dir", str(tmp_path / "flag"), env=env)
    assert json.loads(flag.stdout)["data_dir"] == str(tmp_path / "flag")
    # MTOR_CONFIG is the config file when --config is not given.
    config = tmp_path / "mtor.toml"
    config.write_text('bootstrap = ["not-an-address"]\n')
    bad = mtor("run", env={**env, "MTOR_CONFIG": str(config)})
    assert bad.returncode == 2
    assert "bootstrap address 'not-an-address'" in one_line(bad)


def test_an_unexpected_error_is_one_line_that_says_how_to_see_more(tmp_path):
    """The safety net under every command: a bug is one line naming MTOR_DEBUG, and
    MTOR_DEBUG=1 shows its traceback."""
    script = (
        "import sys, mtor_p2p.cli as cli\n"
        "def boom(args): raise RuntimeError('a bug')\n"
        "cli.cmd_id = boom  # build_parser reads the name when main() calls it\n"
        "sys.exit(cli.main(['id', '--data-dir', sys.argv[1]]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "unexpected error: RuntimeError: a bug" in one_line(result)
    assert "MTOR_DEBUG=1" in result.stderr
    debug = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "MTOR_DEBUG": "1"},
    )
    assert "Traceback" in debug.stderr


# -- with a node running -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One running node: its ready line, data directory and process."""
    data_dir = tmp_path_factory.mktemp("errors") / "node"
    process = start(*run_flags(data_dir))
    try:
        ready = read_json_line(process)
        yield {**ready, "data_dir": data_dir, "process": process}
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=30)


def test_a_second_node_on_a_data_directory_in_use_exits_7_and_leaves_the_first_alone(node):
    data_dir = node["data_dir"]
    info = (data_dir / "control.json").read_text()
    second = mtor(*run_flags(data_dir))
    assert second.returncode == 7, second.stderr
    line = one_line(second)
    assert f"another node (pid {node['process'].pid}) already runs on the data directory" in line
    assert "mtor-peer stop --data-dir" in line
    # From a checkout, the hint names the command the user typed (the wrapper says which).
    wrapped = mtor(*run_flags(data_dir), env={**os.environ, "MTOR_INVOKED_AS": "./mtor"})
    assert wrapped.returncode == 7 and "(./mtor stop --data-dir" in one_line(wrapped)
    # The first node's control file is untouched and it still answers.
    assert (data_dir / "control.json").read_text() == info
    assert mtor("status", "--data-dir", str(data_dir)).returncode == 0


def test_a_port_in_use_is_an_address_in_use_error(node, tmp_path):
    port = node["addrs"][0].split("/tcp/")[1].split("/")[0]
    for host in ("127.0.0.1", "0.0.0.0"):
        listen = f"/ip4/{host}/tcp/{port}"
        result = mtor("run", "--data-dir", str(tmp_path / host), "--listen", listen, *QUIET)
        assert result.returncode == 1, result.stderr
        assert f"port {port} on {host} is already in use" in one_line(result)


def test_a_metrics_port_in_use_is_refused_before_the_node_starts(node, tmp_path):
    """--metrics-listen is probed as --listen and --api-port are: the running node's control
    API holds the port (before, the second node started and then failed, naming the wrong
    flags)."""
    api = json.loads((node["data_dir"] / "control.json").read_text())["url"]
    port = api.rsplit(":", 1)[1].rstrip("/")
    result = mtor(*run_flags(tmp_path / "second"), "--metrics-listen", f"127.0.0.1:{port}")
    assert result.returncode == 1, result.stderr
    assert one_line(result) == (
        f"mtor-peer: error: --metrics-listen 127.0.0.1:{port}: port {port} on 127.0.0.1 is "
        "already in use (another mtor-peer? see mtor-peer status); pick another port, or 0 for "
        "any free one"
    )
    assert result.stdout == ""  # it never said "running"


def test_npy_inputs_of_another_float_dtype_are_converted_with_a_notice(node, tmp_path):
    np.save(tmp_path / "a64.npy", np.ones((4, 3)))
    np.save(tmp_path / "b.npy", np.ones((3, 2), np.float32))
    np.save(tmp_path / "ints.npy", np.ones((4, 3), np.int32))
    data_dir = str(node["data_dir"])
    converted = mtor(
        "submit", "matmul", "--a", str(tmp_path / "a64.npy"), "--b", str(tmp_path / "b.npy"),
        "--data-dir", data_dir,
    )  # fmt: skip
    assert "--a" in converted.stderr and "is float64: sending it as float32" in converted.stderr
    # The node took it (this lone node has no worker, so the job itself fails on that).
    assert "dtype" not in converted.stderr.splitlines()[-1]
    assert "Traceback" not in converted.stderr
    assert not list(node["data_dir"].glob(".submit-*"))  # the float32 copy is removed
    refused = mtor(
        "submit", "matmul", "--a", str(tmp_path / "ints.npy"), "--b", str(tmp_path / "b.npy"),
        "--data-dir", data_dir,
    )  # fmt: skip
    assert refused.returncode == 2
    assert "holds int32 values; matmul multiplies float32 or float16" in one_line(refused)


def test_a_transfer_to_an_unknown_peer_warns_and_amounts_are_in_credits(node):
    result = mtor("transfer", STRANGER, "2.5", "--data-dir", str(node["data_dir"]))
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert "warning: " + STRANGER + " has no account in this node's ledger" in lines[0]
    # A fresh node has no credits: the refusal speaks credits, not nano-credits.
    assert result.returncode == 1
    assert "transfer refused: balance is 0 credits, cannot transfer 2.5" in lines[1]
    assert "nano" not in result.stderr


def test_stop_stops_the_node_and_a_second_stop_exits_3(node):
    data_dir = str(node["data_dir"])
    result = mtor("stop", "--data-dir", data_dir)
    assert result.returncode == 0, result.stderr
    assert "stopped the node" in result.stdout
    assert node["process"].wait(timeout=30) == 0
    assert not pid_alive(node["process"].pid)
    assert not (node["data_dir"] / "control.json").exists()
    again = mtor("stop", "--data-dir", data_dir)
    assert again.returncode == 3
    assert "no running node found" in one_line(again)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('nat = "off"', "nat must be true or false (no quotes), not 'off'"),
        ("relay = 3", "relay must be a quoted string, not 3"),
        ('relays_wanted = "2"', "relays_wanted must be a whole number (no quotes)"),
        ('announce = ["/ip4/0.0.0.0/tcp/1"]', "announce address '/ip4/0.0.0.0/tcp/1' names no"),
    ],
)
def test_a_mistyped_nat_setting_in_the_config_file_says_how_to_write_it(tmp_path, line, message):
    config = tmp_path / "mtor.toml"
    config.write_text(line + "\n")
    result = mtor("run", "--config", str(config), "--data-dir", str(tmp_path / "node"), *QUIET)
    assert result.returncode == 2, result.stderr
    assert message in one_line(result)


def test_an_entry_not_checkpointed_yet_says_when_to_try_again() -> None:
    from mtor_p2p.cli import _not_provable_yet

    said = _not_provable_yet("404: no checkpoint of epoch 59876550 lists 4f8bc7f13c519418 (yet)")
    assert not said.startswith("404")
    assert said.startswith("no checkpoint of epoch 59876550") and "try again" in said
    assert _not_provable_yet("400: bad entry ID") == "bad entry ID"


def test_devnet_progress_is_plain_lines_in_a_log(capsys) -> None:
    from mtor_p2p import devnet

    for message in ("devnet: 0/4 ready", "devnet: 0/4 ready", "devnet: 4/4 ready"):
        devnet._progress(message)
    assert capsys.readouterr().err.splitlines() == ["devnet: 0/4 ready", "devnet: 4/4 ready"]


def test_a_ledger_file_of_newer_rules_stops_every_command_that_opens_it(tmp_path):
    """A data directory last used by a newer MTOR, whose ledger follows rules this version
    does not know: one line saying so and exit code 2, the file left as it was."""
    import sqlite3

    node = str(tmp_path / "node")
    assert mtor("id", "--data-dir", node).returncode == 0  # makes the data directory
    assert mtor("balance", "--data-dir", node).returncode == 0  # and this, its ledger
    db = sqlite3.connect(tmp_path / "node" / "ledger.sqlite")
    with db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'rules'")
    db.close()
    # ``run`` without QUIET's flags: its refusal comes before the GPU probe and the bootstrap
    # peers, so no warning of theirs precedes the one line.
    for command in (["balance"], ["run", "--listen", "/ip4/127.0.0.1/tcp/0"]):
        result = mtor(*command, "--data-dir", node)
        assert result.returncode == 2, (command, result.stderr)
        assert "was written under ledger rules '99'; this version of MTOR follows rules" in (
            one_line(result)
        )
    db = sqlite3.connect(tmp_path / "node" / "ledger.sqlite")
    assert db.execute("SELECT value FROM meta WHERE key = 'rules'").fetchone() == ("99",)
    db.close()


def test_a_ledger_file_that_is_no_database_is_refused_as_data_not_as_a_bug(tmp_path):
    """A damaged ledger.sqlite (here: text) was "unexpected error ... a bug" (exit 1); it is
    the data's fault, said in one line with what to do (exit 2), and left as it was."""
    node = tmp_path / "node"
    assert mtor("id", "--data-dir", str(node)).returncode == 0
    (node / "ledger.sqlite").write_bytes(b"not a database " * 40)
    (node / "ledger.sqlite").chmod(0o600)  # as the node makes it (else it says it tightened it)
    for command in (["balance"], ["run", "--listen", "/ip4/127.0.0.1/tcp/0"]):
        result = mtor(*command, "--data-dir", str(node))
        assert result.returncode == 2, (command, result.stderr)
        assert "is not a readable ledger (file is not a database): move it aside" in one_line(
            result
        )
    assert (node / "ledger.sqlite").read_bytes() == b"not a database " * 40


def test_a_refused_run_removes_the_directories_it_created_and_nothing_else(tmp_path):
    kept = tmp_path / "kept"
    kept.mkdir()
    result = mtor(
        "run", "--data-dir", str(kept / "a" / "b" / "node"), "--listen", "/ip4/203.0.113.5/tcp/0"
    )
    assert result.returncode == 2, result.stderr
    assert kept.is_dir() and list(kept.iterdir()) == []
