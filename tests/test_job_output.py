"""A job's ``--out`` path (issue 8, review defect): a path that cannot be written fails the
job with a clear error, or is refused at submission; it never takes the node down."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

from mtor_p2p.compute.jobs import JobBoard
from mtor_p2p.runtime import Runtime

RESULT = np.arange(12, dtype=np.float32).reshape(3, 4)


class FakeResult:
    """What the board reads of a :class:`~mtor_p2p.compute.scheduler.JobResult`."""

    output = RESULT
    shards = (object(), object())

    def summary(self) -> dict[str, Any]:
        return {"shards": 2}


@asynccontextmanager
async def board(release: trio.Event | None = None) -> AsyncIterator[JobBoard]:
    """A job board whose jobs finish at once (or when ``release`` is set), in a nursery that
    fails the test if anything escapes it."""

    async def submit(*args: object, **kwargs: object) -> FakeResult:
        if release is not None:
            await release.wait()
        return FakeResult()

    jobs = JobBoard(submit, Runtime.simulated("jobs"))
    async with trio.open_nursery() as nursery:
        jobs.nursery = nursery
        yield jobs
        nursery.cancel_scope.cancel()


async def wait_done(jobs: JobBoard, job_id: str) -> dict[str, Any]:
    with trio.fail_after(5):
        while True:
            _, state = await jobs.route_status({"id": job_id}, None)
            if state["state"] != "running":
                return state
            await trio.sleep(0.01)


BODY = {"m": 3, "n": 4, "k": 2, "seed": 1}


async def test_a_result_is_saved_to_a_writable_out_path(tmp_path: Path) -> None:
    async with board() as jobs:
        out = tmp_path / "c.npy"
        _, reply = await jobs.route_submit({}, {**BODY, "out": str(out)})
        state = await wait_done(jobs, reply["id"])
        assert state["state"] == "done", state
        np.testing.assert_array_equal(np.load(out), RESULT)


@pytest.mark.parametrize("where", ["missing-dir", "is-a-dir", "parent-is-a-file", "empty"])
async def test_an_out_path_that_cannot_be_written_is_refused_at_submission(
    tmp_path: Path, where: str
) -> None:
    out = {
        "missing-dir": str(tmp_path / "no" / "such" / "dir" / "c.npy"),
        "is-a-dir": str(tmp_path),
        "parent-is-a-file": str(tmp_path / "file" / "c.npy"),
        "empty": "",
    }[where]
    (tmp_path / "file").write_text("x")
    async with board() as jobs:
        with pytest.raises(ValueError, match="out"):
            await jobs.route_submit({}, {**BODY, "out": out})


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
async def test_an_out_path_in_a_read_only_directory_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    async with board() as jobs:
        with pytest.raises(ValueError, match="out"):
            await jobs.route_submit({}, {**BODY, "out": str(locked / "c.npy")})


async def test_a_save_that_fails_after_the_job_fails_the_job_not_the_node(
    tmp_path: Path,
) -> None:
    """The directory is there at submission and gone when the result is saved: the job ends
    ``failed`` naming the path (its summary kept), and the board goes on serving."""
    directory = tmp_path / "results"
    directory.mkdir()
    release = trio.Event()
    async with board(release) as jobs:
        _, reply = await jobs.route_submit({}, {**BODY, "out": str(directory / "c.npy")})
        directory.rmdir()
        release.set()
        state = await wait_done(jobs, reply["id"])
        assert state["state"] == "failed"
        assert str(directory / "c.npy") in state["error"]
        assert state["result"] == {"shards": 2}
        # The node (the board's nursery) is still running jobs.
        _, again = await jobs.route_submit({}, {**BODY, "out": str(tmp_path / "d.npy")})
        assert (await wait_done(jobs, again["id"]))["state"] == "done"


async def test_an_out_path_where_no_file_can_be_created_is_refused_even_for_root() -> None:
    """Permission bits do not tell (root passes ``os.access`` everywhere): the board tries to
    create a file. ``/proc`` refuses everyone."""
    async with board() as jobs:
        with pytest.raises(ValueError, match="not writable"):
            await jobs.route_submit({}, {**BODY, "out": "/proc/c.npy"})


async def test_an_out_path_that_is_a_fifo_is_refused_and_a_save_never_opens_it(
    tmp_path: Path,
) -> None:
    """A FIFO at ``out`` would block the save's open forever (a new user's job hung there,
    uncancellable, holding its place and the node's shutdown)."""
    from mtor_p2p.compute.jobs import save_npy

    fifo = tmp_path / "c.npy"
    os.mkfifo(fifo)
    async with board() as jobs:
        with pytest.raises(ValueError, match="is not a regular file"):
            await jobs.route_submit({}, {**BODY, "out": str(fifo)})
    # One that appears after the check: the result goes into a new file renamed over it.
    with trio.fail_after(5):
        await trio.to_thread.run_sync(save_npy, fifo, RESULT, abandon_on_cancel=True)
    np.testing.assert_array_equal(np.load(fifo), RESULT)
    assert os.listdir(tmp_path) == ["c.npy"]


async def test_the_result_is_saved_at_exactly_the_out_path(tmp_path: Path) -> None:
    """``np.save`` given a name without ``.npy`` appends it; the board writes the given path,
    and its writability probe leaves nothing behind."""
    async with board() as jobs:
        out = tmp_path / "result"
        _, reply = await jobs.route_submit({}, {**BODY, "out": str(out)})
        assert (await wait_done(jobs, reply["id"]))["state"] == "done"
        np.testing.assert_array_equal(np.load(out), RESULT)
        assert os.listdir(tmp_path) == ["result"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("text", "is not a .npy array file"),
        ("npz", "is not a .npy array file"),
        ("objects", "not numbers"),
        ("missing", "no such file"),
        ("truncated", "is cut short: 144 bytes, where its header needs 152"),
    ],
)
async def test_operand_files_that_are_not_npy_arrays_are_refused_clearly(
    tmp_path: Path, content: str, message: str
) -> None:
    good = tmp_path / "b.npy"
    np.save(good, np.ones((2, 3), np.float32))
    bad = tmp_path / "a.npy"
    if content == "text":
        bad.write_text("1 2 3\n4 5 6\n")
    elif content == "npz":
        np.savez(tmp_path / "a", a=np.ones(3))
        (tmp_path / "a.npz").rename(bad)
    elif content == "objects":
        np.save(bad, np.array([{}], dtype=object), allow_pickle=True)
    elif content == "truncated":  # a header promising 6 floats, with 4 of them
        np.save(bad, np.ones((2, 3), np.float32))
        bad.write_bytes(bad.read_bytes()[:-8])
    async with board() as jobs:
        with pytest.raises(ValueError, match=message) as excinfo:
            await jobs.route_submit({}, {"a": str(bad), "b": str(good)})
        assert "pickle" not in str(excinfo.value)


async def test_a_negative_max_price_is_refused(tmp_path: Path) -> None:
    async with board() as jobs:
        with pytest.raises(ValueError, match="max_price"):
            await jobs.route_submit({}, {**BODY, "max_price": -1})


async def test_a_job_is_reported_done_once_its_receipts_are_settled() -> None:
    """``submit`` prints a summary that counts the job's receipts: a ``receipts`` or
    ``balance`` right after must show them, so a job is done only once they are settled (a
    new user's ``receipts`` lagged ``submit`` by about 1.4 s, and a CLI test read it early)."""
    settle = trio.Event()
    asked: list[bool] = []

    async def submit(*args: object, **kwargs: object) -> FakeResult:
        return FakeResult()

    async def settled() -> None:
        asked.append(True)
        await settle.wait()

    jobs = JobBoard(submit, Runtime.simulated("jobs"), settled)
    async with trio.open_nursery() as nursery:
        jobs.nursery = nursery
        _, job = await jobs.route_submit({}, BODY)
        await trio.sleep(0.05)
        _, state = await jobs.route_status({"id": job["id"]}, None)
        assert asked and state["state"] == "running"
        settle.set()
        assert (await wait_done(jobs, job["id"]))["state"] == "done"
        nursery.cancel_scope.cancel()


def test_a_save_removes_partial_files_a_killed_save_left_and_nothing_else(
    tmp_path: Path,
) -> None:
    from mtor_p2p.compute.jobs import save_npy

    def part(name: str, *, age_s: float = 60.0) -> Path:
        path = tmp_path / name
        path.write_bytes(b"half a result")
        then = time.time() - age_s
        os.utime(path, (then, then))
        return path

    abandoned = part(".c.npy.4000001.0.part")  # its save was killed: unlocked, a minute old
    in_progress = part(".c.npy.4000002.0.part")  # a save in another process (or container)
    young = part(".c.npy.4000003.0.part", age_s=1.0)  # a save that has not locked it yet
    other_output = part(".d.npy.4000001.0.part")
    not_ours = [part(".c.npy.notes.part"), part(".c.npy.²³.0.part"), part(".c.npy.1.0.part.x")]
    (tmp_path / ".c.npy.4000004.0.part").symlink_to(other_output)
    # The other save holds its file locked while it writes, as save_npy does.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(in_progress)!r}, os.O_RDONLY)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        save_npy(tmp_path / "c.npy", RESULT)
        kept = {in_progress, young, other_output, *not_ours}
        assert sorted(os.listdir(tmp_path)) == sorted(
            ["c.npy", ".c.npy.4000004.0.part", *(p.name for p in kept)]
        )
        assert not abandoned.exists()
        np.testing.assert_array_equal(np.load(tmp_path / "c.npy"), RESULT)
    finally:
        holder.kill()
        holder.wait()


def test_a_save_holds_its_lock_until_renamed_and_needs_no_lock_support(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mtor_p2p.compute import jobs

    # A clean-up arriving between the last write and the rename, when the file already
    # looks old (a save stopped there for a while), must find it still locked.
    real_replace = os.replace

    def stalled_replace(source: Any, target: Any) -> None:
        then = time.time() - 60
        os.utime(source, (then, then))
        jobs._remove_abandoned_parts(Path(target))
        real_replace(source, target)

    monkeypatch.setattr(jobs.os, "replace", stalled_replace)
    jobs.save_npy(tmp_path / "c.npy", RESULT)
    np.testing.assert_array_equal(np.load(tmp_path / "c.npy"), RESULT)
    monkeypatch.setattr(jobs.os, "replace", real_replace)

    # A file system without locks (flock fails): the save still works and leaves nothing.
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(jobs.fcntl, "flock", no_locks)
    jobs.save_npy(tmp_path / "d.npy", RESULT)
    np.testing.assert_array_equal(np.load(tmp_path / "d.npy"), RESULT)
    assert sorted(os.listdir(tmp_path)) == ["c.npy", "d.npy"]
