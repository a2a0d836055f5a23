"""What a new user types wrong, and where they type it from: ``mtor-peer`` refuses bad
input with exit 2 and one line naming the flag before it contacts any node, reads the peer
book of a stopped node, and the ``./mtor`` wrapper runs commands in the caller's directory.
Real subprocesses throughout."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mtor_p2p.compute.jobs import MAX_RUNNING_JOBS
from mtor_p2p.compute.reputation import PeerBook
from mtor_p2p.console import format_credits, format_duration, format_rate
from tests.processes import mtor

REPO = Path(__file__).resolve().parent.parent


def submit_refused(
    cwd: Path, kernel: str, flags: list[str], message: str
) -> subprocess.CompletedProcess[str]:
    """``mtor-peer submit KERNEL FLAGS`` run in ``cwd`` (relative paths are the caller's),
    refused before any job is sent: exit 2 and one line holding ``message``."""
    result = subprocess.run(
        [sys.executable, "-m", "mtor_p2p", "submit", kernel, *flags, "--data-dir", "node"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--m", "0"], "--m"),
        (["--m", "-5"], "--m"),
        (["--k", "x"], "--k"),
        (["--shards", "0"], "--shards"),
        (["--max-price", "-1"], "--max-price"),
        (["--max-price", "inf"], "--max-price"),
    ],
)
def test_bad_numbers_are_usage_errors_naming_the_flag(tmp_path, flags, named):
    # No node runs on tmp_path: reaching it would exit 3, not 2.
    result = mtor("submit", "matmul", *flags, "--data-dir", str(tmp_path))
    assert result.returncode == 2, result.stderr
    assert f"argument {named}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def files(tmp_path: Path) -> Path:
    np.save(tmp_path / "a.npy", np.ones((4, 3), np.float32))
    np.save(tmp_path / "b.npy", np.ones((3, 2), np.float32))
    np.save(tmp_path / "wide.npy", np.ones((5, 2), np.float32))
    (tmp_path / "junk.npy").write_text("1 2 3\n")
    return tmp_path


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--a", "nope.npy", "--b", "b.npy"], "--a nope.npy: no such file"),
        (["--a", "junk.npy", "--b", "b.npy"], "--a junk.npy is not a .npy array file"),
        (["--a", "a.npy", "--b", "junk.npy"], "--b junk.npy is not a .npy array file"),
        (["--a", "a.npy", "--b", "wide.npy"], "--a is 4x3 but --b is 5x2"),
        (["--a", "a.npy"], "--a and --b go together"),
        (["--a", "a.npy", "--b", "b.npy", "--m", "8"], "--m cannot be given with --a/--b"),
        (["--out", "/nonexistent/dir/c.npy"], "--out /nonexistent/dir/c.npy: directory"),
        (["--out", "/proc/c.npy"], "not writable"),
        (["--out", "."], "is a directory"),
    ],
)
def test_files_are_checked_before_the_job_is_sent(files, flags, message):
    result = submit_refused(files, "matmul", flags, message)
    assert "pickle" not in result.stderr


@pytest.fixture
def layer_files(tmp_path: Path) -> Path:
    """Operand files of a small mlp and an attention, and some that do not fit them."""
    shapes = {
        "x": (4, 3), "w1": (3, 8), "b1": (8,), "w2": (8, 2), "b2": (2,), "b1_2d": (8, 1),
        "q": (2, 2, 5, 4), "k": (2, 2, 6, 4), "v": (2, 2, 6, 3), "v_short": (2, 2, 7, 3),
    }  # fmt: skip
    for name, shape in shapes.items():
        np.save(tmp_path / f"{name}.npy", np.ones(shape, np.float32))
    np.save(tmp_path / "k_int.npy", np.ones((2, 2, 6, 4), np.int8))
    return tmp_path


MLP = ["--x", "x.npy", "--w1", "w1.npy", "--b1", "b1.npy", "--w2", "w2.npy", "--b2", "b2.npy"]
ATTENTION = ["--q", "q.npy", "--k", "k.npy", "--v", "v.npy"]


@pytest.mark.parametrize(
    ("kernel", "flags", "message"),
    [
        (
            "mlp",
            [*MLP[:-1], "b1.npy"],
            "--w2 is 8x2 but --b2 is 8: they disagree on d_out (axis 1 of --w2, axis 0 of --b2)",
        ),
        (
            "mlp",
            [*MLP[:5], "b1_2d.npy", *MLP[6:]],
            "--b1 b1_2d.npy holds an array of shape (8, 1), not a vector (d_hidden)",
        ),
        ("mlp", MLP[:4], "--x, --w1, --b1, --w2 and --b2 go together (--b1, --w2 and --b2 missing"),
        ("mlp", [*MLP, "--d-in", "3"], "--d-in cannot be given with --x/--w1/--b1/--w2/--b2"),
        (
            "attention",
            [*ATTENTION[:5], "v_short.npy"],
            "--k is 2x2x6x4 but --v is 2x2x7x3: they disagree on seq_k (axis 2 of --k, axis 2",
        ),
        ("attention", [*ATTENTION[:3], "k_int.npy", *ATTENTION[4:]], "holds int8 values; atten"),
        (
            "attention",
            ["--seq-q", "65536"],
            "attention: attention scores has 274877906944 elements, above the limit of 268435456",
        ),
    ],
)
def test_mlp_and_attention_inputs_are_checked_before_the_job_is_sent(
    layer_files, kernel, flags, message
):
    submit_refused(layer_files, kernel, flags, message)


def test_submit_help_explains_each_kernel_its_inputs_dtype_and_verify():
    listing = " ".join(mtor("submit", "--help").stdout.split())
    for kernel, files, auto in (
        ("matmul", "--a FILE a as a .npy file of shape (m, k)", "Freivalds' for matmul"),
        ("mlp", "--b1 FILE b1 as a .npy file of shape (d_hidden,)", "sample for mlp"),
        ("attention", "--seq-k SEQ_K key and value positions (default: --seq-q;", "sample for"),
    ):
        assert kernel in listing
        result = mtor("submit", kernel, "--help")
        assert result.returncode == 0, result.stderr
        text = " ".join(result.stdout.split())
        assert f"auto (default) picks the kernel's own check, {auto}" in text
        assert "element type of the random inputs" in text
        assert files in text
        assert "Exit 2 for bad input" in text
        # The limit it names is the node's own, not a number copied into the text.
        assert f"a node runs at most {MAX_RUNNING_JOBS} jobs at once" in text


NAMES = ("fast", "flaky", "cheat")


def test_reputation_reads_the_peer_book_of_a_stopped_node(tmp_path):
    book = PeerBook(tmp_path / "peers.sqlite")
    now = time.time()
    book.accepted("12D3KooWfast", flops=6_000_000_000, seconds=100.0, now=now)
    for _ in range(3):
        book.failed("12D3KooWflaky", "timeout", now, detail="request timed out")
    book.failed("12D3KooWcheat", "rejected", now, detail="freivalds check failed")
    book.close()
    before = sorted(p.name for p in tmp_path.iterdir())
    result = mtor("reputation", "--data-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "no running node" in result.stderr and "peers.sqlite" in result.stderr
    rows = result.stdout.splitlines()
    row = {name: next(r for r in rows if r.startswith("…") and name in r) for name in NAMES}
    assert "60.0 MFLOP/s" in row["fast"] and row["fast"].endswith("ok")
    assert "out 7 d: " in row["cheat"]
    assert re.search(r"out \d+ (s|min|h): ", row["flaky"])  # the back-off is the book's own
    assert re.search(r"last error: .*request timed out", result.stdout)
    assert "3 worker(s)" in result.stdout
    as_json = json.loads(mtor("reputation", "--json", "--data-dir", str(tmp_path)).stdout)
    assert {p["peer_id"] for p in as_json["peers"]} == {
        "12D3KooWfast",
        "12D3KooWflaky",
        "12D3KooWcheat",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # read-only: nothing written
    # Neither a node nor a peer book: exit 3 as before.
    nothing = mtor("reputation", "--data-dir", str(tmp_path / "empty"))
    assert nothing.returncode == 3


def test_reputation_help_explains_reliability():
    text = " ".join(mtor("reputation", "--help").stdout.split())
    assert "(OK + 1) / (attempts + 2)" in text and "Laplace" in text


def test_credits_read_the_same_in_the_cli_as_on_the_dashboard():
    # A devnet shard costs ~1e-7 credits: ".6f" printed "cost 0.000000 credits".
    assert format_credits(8.6e-08) == "8.6e-08"
    assert format_credits(0.000153) == "0.000153"
    assert format_credits(1.5) == "1.5000"
    assert format_credits(0) == "0.0000"


def test_rates_and_durations_read_as_people_say_them():
    assert format_rate(6e-05) == "60.0 MFLOP/s"
    assert format_rate(512.3) == "512 TFLOP/s"
    assert format_rate(0.0123) == "12.3 GFLOP/s"
    assert format_duration(604799) == "7 d"
    assert format_duration(29.4) == "29 s"
    assert format_duration(720) == "12 min"


# -- the ./mtor wrapper ------------------------------------------------------------------------


def _wrapper_ready() -> bool:
    """The wrapper would install into .venv first (minutes, network) unless it is current."""
    want = hashlib.sha256(
        (REPO / "setup.cfg").read_bytes() + (REPO / "pyproject.toml").read_bytes()
    ).hexdigest()[:16]
    stamp = REPO / ".venv" / ".mtor-installed-"
    return stamp.is_file() and stamp.read_text().strip() == want


needs_wrapper = pytest.mark.skipif(not _wrapper_ready(), reason=".venv not set up by ./mtor")


def _wrapper(cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(REPO / "mtor"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@needs_wrapper
def test_the_wrapper_runs_commands_in_the_callers_directory(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((4, 3), np.float32))
    result = _wrapper(tmp_path, "id", "--data-dir", "node")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "node" / "identity.key").is_file()
    assert not (REPO / "node").exists()
    # A file relative to the caller's directory is found (and checked) there.
    bad = _wrapper(tmp_path, "submit", "matmul", "--a", "a.npy", "--b", "a.npy")
    assert bad.returncode == 2 and "--a is 4x3 but --b is 4x3" in bad.stderr


@needs_wrapper
def test_the_wrapper_runs_the_readme_scenarios_from_anywhere(tmp_path):
    result = _wrapper(
        tmp_path, "sim", "run", "simulations/smoke.toml",
        "--peers", "6", "--hours", "0.02", "--out", "out", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "report.md").is_file()  # --out is the caller's


@needs_wrapper
def test_the_wrappers_bench_writes_a_relative_out_where_it_was_called(tmp_path):
    """`./mtor bench` runs from the checkout, but `--out rel.json` means the caller's
    directory (before: the checkout's, where a user would not look)."""
    result = _wrapper(
        tmp_path, "bench", "compute", "--only", "8", "--rounds", "1", "--quick",
        "--out", "rel.json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "rel.json").is_file()
    assert not (REPO / "rel.json").exists()


def test_a_benchmark_path_is_the_callers_when_the_wrapper_names_it(tmp_path, monkeypatch):
    from benchmarks.paths import CALLER_DIR_VARIABLE, user_path

    monkeypatch.delenv(CALLER_DIR_VARIABLE, raising=False)
    assert user_path("out.json") == Path("out.json")
    monkeypatch.setenv(CALLER_DIR_VARIABLE, str(tmp_path))
    assert user_path("out.json") == tmp_path / "out.json"
    assert user_path("/abs/out.json") == Path("/abs/out.json")


def test_py_libp2p_logs_in_our_format_at_our_level():
    """py-libp2p sets its loggers up when imported (no handler, no propagation: its warnings
    went out bare, whatever --log-level said). After the CLI's set-up, every line has a time
    and a level, and ``--log-level error`` quiets its warnings and some modules' own INFO."""
    script = """
import logging, sys
from mtor_p2p.cli import _setup_logging
_setup_logging(sys.argv[1])
logging.getLogger("libp2p.kad_dht.kad_dht").warning("Failed to read DHT message from stream")
logging.getLogger("libp2p.kad_dht.kad_dht").error("a libp2p error")
logging.getLogger("libp2p.network.auto_connector").info("chatter")
logging.getLogger("mtor_p2p.node").warning("our warning")
"""
    env = {k: v for k, v in os.environ.items() if k != "LIBP2P_DEBUG"}

    def run(level: str) -> list[str]:
        result = subprocess.run(
            [sys.executable, "-c", script, level], capture_output=True, text=True, env=env
        )
        assert result.returncode == 0, result.stderr
        return result.stderr.splitlines()

    lines = run("warning")
    assert len(lines) == 3, lines
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (WARNING|ERROR) ", x) for x in lines)
    assert "libp2p.kad_dht.kad_dht: Failed to read DHT message" in lines[0]
    assert not any("chatter" in x for x in lines)
    quiet = run("error")
    assert len(quiet) == 1 and "a libp2p error" in quiet[0]
    assert any("chatter" in x for x in run("debug"))


@needs_wrapper
def test_the_wrappers_help_names_its_own_commands_then_mtor_peers(tmp_path):
    result = _wrapper(tmp_path, "--help")
    assert result.returncode == 0, result.stderr
    for command in ("./mtor devnet", "./mtor test", "./mtor bench", "./mtor sim run"):
        assert command in result.stdout
    assert "usage: mtor-peer" in result.stdout
    bench = _wrapper(tmp_path, "bench", "--help")
    assert bench.returncode == 0 and "compute" in bench.stdout, bench.stderr
    # Hints name the wrapper as it was called (mtor-peer is not on PATH from a checkout).
    assert "Start with: " in result.stdout and "mtor devnet --peers 4" in result.stdout
    assert "Start with: mtor-peer" not in result.stdout
    missing = _wrapper(tmp_path, "peers", "--data-dir", str(tmp_path / "no-node"))
    assert missing.returncode == 3, missing.stderr
    assert "start one with: mtor-peer" not in missing.stderr
    # On the directory named: `run` alone would start a node on the default one.
    assert f"mtor run --data-dir {tmp_path / 'no-node'})" in missing.stderr, missing.stderr
