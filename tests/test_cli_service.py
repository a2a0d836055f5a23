"""Issue 11, item 7: running a peer as a service. The example config, the systemd unit and the
Containerfile in ``bootstrap/`` use only flags, settings and environment variables that
``mtor-peer`` has, and ``run --config bootstrap/mtor.toml`` starts a node."""

from __future__ import annotations

import json
import re
import shlex
import signal
from pathlib import Path

from mtor_p2p.config import load_config
from mtor_p2p.console import EXIT_CODES
from tests.processes import mtor, read_json_line, start

BOOTSTRAP = Path(__file__).resolve().parent.parent / "bootstrap"


def run_flags_documented() -> set[str]:
    """Every flag ``mtor-peer run --help`` lists."""
    return set(re.findall(r"--[a-z][a-z-]+", mtor("run", "--help").stdout))


def assert_known_run_command(argv: list[str]) -> None:
    """``argv`` is ``[mtor-peer, run, flags...]`` and every flag exists."""
    assert Path(argv[0]).name == "mtor-peer" and argv[1] == "run", argv
    known = run_flags_documented()
    flags = [a for a in argv[2:] if a.startswith("--")]
    assert flags, argv
    unknown = [f for f in flags if f not in known]
    assert not unknown, f"flags not in `mtor-peer run --help`: {unknown}"


def test_the_example_config_loads_and_a_node_runs_with_it(tmp_path):
    config = load_config(BOOTSTRAP / "mtor.toml")
    config.validate()
    assert config.data_dir == Path("/var/lib/mtor")
    # Flags override the file: a loopback node in a temporary directory.
    process = start(
        "run", "--config", str(BOOTSTRAP / "mtor.toml"), "--data-dir", str(tmp_path),
        "--listen", "/ip4/127.0.0.1/tcp/0", "--no-default-bootstrap", "--gpu", "none", "--json",
    )  # fmt: skip
    try:
        ready = read_json_line(process)
        status = json.loads(mtor("status", "--json", "--data-dir", str(tmp_path)).stdout)
        assert status["peer_id"] == ready["peer_id"]
        assert status["region"] == "WEU"  # from the file
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


def unit_settings(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of a systemd unit, in order (keys may repeat)."""
    section, settings = "", []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a setting: {line!r}"
        settings.append((section, key.strip(), value.strip()))
    return settings


def test_the_systemd_unit_uses_documented_flags_codes_and_environment():
    settings = unit_settings((BOOTSTRAP / "mtor-peer.service").read_text())
    sections = {s for s, _, _ in settings}
    assert {"Unit", "Service", "Install"} <= sections
    service = [(k, v) for s, k, v in settings if s == "Service"]
    [exec_start] = [v for k, v in service if k == "ExecStart"]
    assert_known_run_command(shlex.split(exec_start))
    # The codes it will not restart on are documented ones (configuration, data dir in use).
    codes = {code for code, _ in EXIT_CODES}
    [prevent] = [v for k, v in service if k == "RestartPreventExitStatus"]
    assert {int(c) for c in prevent.split()} <= codes
    # Its environment is what --help documents, and the data directory is systemd's.
    help_text = mtor("--help").stdout
    env = dict(v.split("=", 1) for k, v in service if k == "Environment")
    assert env["MTOR_DATA_DIR"] == "/var/lib/mtor"
    assert all(name in help_text for name in env if name.startswith("MTOR_"))
    assert ("StateDirectory", "mtor") in service
    assert dict(service)["KillSignal"] == "SIGTERM"


def test_the_containerfile_uses_documented_flags():
    text = (BOOTSTRAP / "Containerfile").read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M)[1])
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M)[1])
    assert_known_run_command(entrypoint + cmd)
    assert re.search(r"^ENV MTOR_DATA_DIR=/var/lib/mtor\b", text, re.M)
    assert 'VOLUME ["/var/lib/mtor"]' in text
    assert "STOPSIGNAL SIGTERM" in text
