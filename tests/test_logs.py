"""``mtor-peer run``'s logs (issue 11, item 5): a rotating file in the data directory (0600 in
a 0700 directory) and stderr, human-readable by default, JSON lines with ``--log-format
json``; real subprocesses."""

from __future__ import annotations

import json
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tests.processes import mtor, read_json_line, run_flags, start

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def run_briefly(data_dir: Path, *flags: str, seconds: float = 0.0) -> tuple[dict, str]:
    """Start ``mtor-peer run`` with ``flags``, wait until it is ready (and ``seconds`` more),
    stop it with SIGINT; its ready line and its stderr."""
    process = start(*run_flags(data_dir), *flags)
    try:
        ready = read_json_line(process)
        time.sleep(seconds)
    finally:
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr[-2000:]
    # The last line says the stop is complete (the data directory is unlocked by then).
    assert json.loads(stdout.splitlines()[-1]) == {"stopped": True, "peer_id": ready["peer_id"]}
    return ready, stderr


def test_run_writes_human_readable_lines_to_stderr_and_a_private_log_file(tmp_path):
    data_dir = tmp_path / "node"
    ready, stderr = run_briefly(data_dir, "--log-level", "info")
    log_file = data_dir / "logs" / "mtor-peer.log"
    assert mode(data_dir / "logs") == 0o700 and mode(log_file) == 0o600
    lines = log_file.read_text().splitlines()
    started = [line for line in lines if f"running as {ready['peer_id']}" in line]
    assert len(started) == 1 and TEXT_LINE.match(started[0]), lines
    assert " INFO mtor_p2p.cli: " in started[0]
    assert any(line.endswith("mtor_p2p.cli: stopping") for line in lines)
    # The same lines on stderr, in the same format.
    assert started[0] in stderr.splitlines()
    # A second run appends to the same file.
    run_briefly(data_dir, "--log-level", "info")
    assert len(log_file.read_text().splitlines()) > len(lines)


def test_run_in_text_says_when_its_stop_is_complete(tmp_path):
    """Without ``--json``: the banner first, and after Ctrl-C a last line saying the node
    stopped (a clean stop used to print nothing after the banner)."""
    flags = [flag for flag in run_flags(tmp_path / "node") if flag != "--json"]
    process = start(*flags)
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()
        assert " running as " in banner, banner
        peer_id = banner.split(" running as ")[1].strip()
    finally:
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr[-2000:]
    assert stdout.splitlines()[-1] == f"mtor-peer stopped ({peer_id})"


def test_log_format_json_writes_one_object_a_line_with_structured_extras(tmp_path):
    data_dir = tmp_path / "node"
    ready, stderr = run_briefly(data_dir, "--log-level", "info", "--log-format", "json")
    file_lines = (data_dir / "logs" / "mtor-peer.log").read_text().splitlines()
    stderr_lines = [line for line in stderr.splitlines() if line.strip()]
    assert file_lines and stderr_lines
    for line in file_lines + stderr_lines:
        record = json.loads(line)  # every line, in both places, is one JSON object
        assert {"time", "level", "logger", "message"} <= set(record), record
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"])
    started = [json.loads(line) for line in file_lines if "running as" in line]
    assert len(started) == 1
    assert started[0]["level"] == "INFO" and started[0]["logger"] == "mtor_p2p.cli"
    assert started[0]["peer_id"] == ready["peer_id"]  # the extras are fields
    assert started[0]["addrs"] == ready["addrs"]


def test_the_config_file_sets_the_format_and_rotation(tmp_path):
    """A small ``log_max_bytes`` (the config key a test or a small disk uses): the file is
    rotated, old files are kept up to ``log_backups``, every one is 0600 and none much bigger
    than the limit."""
    config = tmp_path / "mtor.toml"
    config.write_text('log_format = "json"\nlog_max_bytes = 2048\nlog_backups = 2\n')
    data_dir = tmp_path / "node"
    # debug: py-libp2p's chatter too, a few kB a second.
    run_briefly(data_dir, "--config", str(config), "--log-level", "debug", seconds=2)
    logs = data_dir / "logs"
    names = sorted(p.name for p in logs.iterdir())
    assert names == ["mtor-peer.log", "mtor-peer.log.1", "mtor-peer.log.2"], names
    for path in logs.iterdir():
        assert mode(path) == 0o600
        lines = path.read_text().splitlines()
        # Rotated before a line would pass the limit (a single longer line is kept whole).
        assert path.stat().st_size <= 2048 or len(lines) == 1, (path, path.stat().st_size)
        for line in lines:
            json.loads(line)


def test_a_bad_log_format_is_a_usage_error(tmp_path):
    config = tmp_path / "mtor.toml"
    config.write_text('log_format = "xml"\n')
    result = mtor("run", "--config", str(config), "--data-dir", str(tmp_path / "node"))
    assert result.returncode == 2
    assert "log_format must be 'text' or 'json'" in result.stderr
    result = mtor("run", "--log-format", "xml", "--data-dir", str(tmp_path / "node"))
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_exceptions_are_a_string_field_and_the_filters_hold_on_both_handlers(tmp_path):
    """In a fresh interpreter (the set-up replaces the root logger's handlers): an exception
    logged in JSON is the string field ``exception``; py-libp2p's clean-EOF warning
    (``_CleanEofQuiet``) and its INFO chatter (``_LevelFloor``) reach neither stderr nor the
    file, while its other warnings reach both."""
    script = textwrap.dedent(
        f"""
        import logging
        from pathlib import Path
        from mtor_p2p.cli import _setup_logging
        from mtor_p2p.config import NodeConfig

        path = _setup_logging(
            "info", log_format="json", config=NodeConfig(data_dir=Path({str(tmp_path)!r}))
        )
        print(path, flush=True)

        class StreamEOF(Exception):
            pass

        dht = logging.getLogger("libp2p.kad_dht.kad_dht")
        dht.warning("Failed to read DHT message from stream: %s", StreamEOF())
        dht.warning("Failed to read DHT message from stream: %s", ValueError("bad varint"))
        logging.getLogger("libp2p.network").info("per-stream chatter")
        try:
            1 / 0
        except ZeroDivisionError:
            logging.getLogger("mtor_p2p.test").exception("it broke", extra={{"job": "job-1"}})
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path == tmp_path / "logs" / "mtor-peer.log"
    for text in (result.stderr, path.read_text()):
        records = [json.loads(line) for line in text.splitlines()]
        messages = [r["message"] for r in records]
        assert messages == [
            "Failed to read DHT message from stream: bad varint",
            "it broke",
        ], messages
        broke = records[1]
        assert broke["level"] == "ERROR" and broke["job"] == "job-1"
        assert isinstance(broke["exception"], str)
        assert "ZeroDivisionError: division by zero" in broke["exception"]
        assert "Traceback" in broke["exception"]


def test_devnet_gives_every_peer_its_log_format_and_level(tmp_path):
    devnet = start("devnet", "--peers", "2", "--json", "--data-dir", str(tmp_path),
                   "--log-level", "info", "--log-format", "json")  # fmt: skip
    try:
        peers = read_json_line(devnet, timeout=120)["peers"]
    finally:
        devnet.send_signal(signal.SIGINT)
        assert devnet.wait(timeout=30) == 0
    for peer in peers:
        data_dir = Path(peer["data_dir"])
        # The log file holds JSON objects only, from the first line (the start line, at info).
        records = [json.loads(line) for line in (data_dir / "logs" / "mtor-peer.log").open()]
        started = [r for r in records if "running as" in r["message"]]
        assert started and started[0]["peer_id"] == peer["peer_id"], records[:3]
        # peer.log is the peer's stdout (its banner) and stderr (the same JSON lines).
        stderr = [line for line in (data_dir / "peer.log").open() if line.startswith("{")]
        assert any(json.loads(line)["message"] == started[0]["message"] for line in stderr)
