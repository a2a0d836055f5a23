"""``Node.open`` holds the data directory's lock (issue 11, item 6, for library users too) and
removes ``control.json`` at exit only if it is its own."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import trio

from mtor_p2p.config import NodeConfig
from mtor_p2p.control import INFO_FILE_NAME
from mtor_p2p.datadir import DataDirInUse, DataDirLock, lock_owner
from mtor_p2p.node import Node
from tests.processes import mtor, read_json_line, run_flags, start


def config(data_dir: Path) -> NodeConfig:
    return NodeConfig(
        data_dir=data_dir,
        listen=["/ip4/127.0.0.1/tcp/0"],
        gpu="none",
        use_default_bootstrap=False,
        nat=False,
    )


async def test_a_second_node_open_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "node"
    async with Node.open(config(data_dir)) as first:
        assert lock_owner(data_dir) == os.getpid()
        info = json.loads((data_dir / INFO_FILE_NAME).read_text())
        with pytest.raises(DataDirInUse) as refused:
            async with Node.open(config(data_dir)):
                pytest.fail("a second node started on a directory in use")
        assert refused.value.pid == os.getpid()
        assert "already runs on the data directory" in str(refused.value)
        # The refused one touched nothing: the first one's control.json and API are intact.
        assert json.loads((data_dir / INFO_FILE_NAME).read_text()) == info
        assert first.status()["peer_id"] == info["peer_id"]
    # Released on exit: the directory can be used again, and control.json is gone.
    assert lock_owner(data_dir) is None
    assert not (data_dir / INFO_FILE_NAME).exists()
    async with Node.open(config(data_dir)) as again:
        assert again.peer_id == info["peer_id"]


async def test_a_lock_held_by_the_caller_is_used_not_taken_again(tmp_path: Path) -> None:
    data_dir = tmp_path / "node"
    data_dir.mkdir(mode=0o700)
    with DataDirLock(data_dir) as lock:
        async with Node.open(config(data_dir), lock=lock):
            assert lock_owner(data_dir) == os.getpid()
        assert lock.held  # the caller's to release
    with pytest.raises(ValueError, match="must be held"):
        async with Node.open(config(data_dir), lock=DataDirLock(data_dir)):
            pass


async def test_control_json_of_another_process_is_left_in_place(tmp_path: Path) -> None:
    data_dir = tmp_path / "node"
    async with Node.open(config(data_dir)):
        path = data_dir / INFO_FILE_NAME
        info = json.loads(path.read_text())
        assert info["pid"] == os.getpid()
        # Another process's file (a node of an older version that did not lock, say).
        other = {**info, "pid": os.getpid() + 1_000_000}
        path.write_text(json.dumps(other))
    assert json.loads(path.read_text()) == other


def test_run_refuses_a_directory_a_library_node_holds(tmp_path: Path) -> None:
    """Across processes: a node embedded in this process holds the lock, ``mtor-peer run``
    on the same directory exits 7 naming it; and the other way round."""
    data_dir = tmp_path / "node"

    async def embedded() -> None:
        async with Node.open(config(data_dir)):
            result = await trio.to_thread.run_sync(
                lambda: mtor(*run_flags(data_dir), "--nat", "off")
            )
            assert result.returncode == 7, result.stderr
            assert f"another node (pid {os.getpid()})" in result.stderr

    trio.run(embedded)
    process = start(*run_flags(data_dir), "--nat", "off")
    try:
        read_json_line(process)

        async def refused() -> None:
            with pytest.raises(DataDirInUse) as exc:
                async with Node.open(config(data_dir)):
                    pass
            assert exc.value.pid == process.pid

        trio.run(refused)
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0


async def test_an_error_of_the_callers_own_code_comes_out_as_itself(tmp_path: Path) -> None:
    """A library user's error inside ``async with Node.open(...)`` (a job that failed)
    crosses the node's nurseries: it comes out as itself, with its cause, not ten levels of
    exception groups deep (a new user's first failed submit showed only the groups)."""

    class JobGoneWrong(Exception):
        pass

    with pytest.raises(JobGoneWrong, match="no worker") as caught:
        async with Node.open(config(tmp_path / "node")):
            try:
                raise KeyError("the cause")
            except KeyError as cause:
                raise JobGoneWrong("no worker serves it") from cause
    assert isinstance(caught.value.__cause__, KeyError)


def test_a_node_with_no_bootstrap_peer_at_all_says_so(tmp_path: Path) -> None:
    """``mtor-peer run`` with the shipped list (empty here, as it ships until the public
    network opens) and no --bootstrap: it starts, and warns that it meets only the peers that
    dial it (a new user's node started alone without a word)."""
    empty = tmp_path / "peers.txt"
    empty.write_text("# no peers yet\n")
    flags = [f for f in run_flags(tmp_path / "node") if f != "--no-default-bootstrap"]
    process = start(*flags, env={**os.environ, "MTOR_BOOTSTRAP_FILE": str(empty)})
    try:
        read_json_line(process)
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    assert "no bootstrap peers" in stderr and "--bootstrap ADDR" in stderr
