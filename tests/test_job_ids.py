"""Job IDs never repeat on one data directory: across restarts, after a crash, and when
submissions race for the first reservation (real files, threads as in production)."""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from mtor_p2p.compute.jobs import (
    JOB_ID_BLOCK,
    JOB_IDS_FILE_NAME,
    MAX_JOB_NUMBER,
    JobBoard,
    JobIds,
)
from mtor_p2p.runtime import Runtime

BODY = {"kernel": "matmul", "m": 8, "n": 4, "k": 2, "dtype": "float32", "seed": 1}


def _take(ids: JobIds, count: int) -> list[int]:
    numbers = []
    for _ in range(count):
        if ids.needs_reserve():
            ids.reserve()
        numbers.append(int(ids.take().removeprefix("job-")))
    return numbers


async def _never_ends(*args: Any, **kwargs: Any) -> Any:
    """A job that runs until cancelled: what it computes does not matter here."""
    await trio.sleep_forever()


@asynccontextmanager
async def running_board(ids: JobIds, submit: Any = _never_ends) -> AsyncIterator[JobBoard]:
    """A board on ``ids`` with threads as in production, its jobs cancelled at the end."""
    board = JobBoard(submit, Runtime.production(), ids=ids)
    async with trio.open_nursery() as nursery:
        board.nursery = nursery
        yield board
        nursery.cancel_scope.cancel()


def test_numbers_go_on_across_restarts_and_a_crash_only_skips_some(tmp_path: Path) -> None:
    path = tmp_path / JOB_IDS_FILE_NAME
    first = _take(JobIds(path), 3)  # a run that ends (or crashes) after three jobs
    assert first == [1, 2, 3]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = _take(JobIds(path), JOB_ID_BLOCK + 2)  # past a block: a second reservation
    assert min(second) > max(first)
    assert len(set(second)) == len(second)
    third = _take(JobIds(path), 1)
    assert third[0] > max(second)
    # Only reservations are written: one per block, the file names the next free number.
    assert int(path.read_text()) == third[0] + JOB_ID_BLOCK


def test_a_clean_stop_gives_back_the_numbers_it_did_not_use(tmp_path: Path) -> None:
    path = tmp_path / JOB_IDS_FILE_NAME
    ids = JobIds(path)
    assert _take(ids, 2) == [1, 2]
    ids.release()  # a clean stop
    assert path.read_text() == "3\n"
    again = JobIds(path)
    assert (again.first, _take(again, 1)) == (3, [3])
    JobIds(path).release()  # a run that took no number leaves the file as it was
    assert int(path.read_text()) == 3 + JOB_ID_BLOCK


@pytest.mark.parametrize(
    "plant", ["text", "bad byte", "at the bound", "fifo", "directory", "link to /dev/zero"]
)
def test_a_file_that_cannot_be_used_is_reported_and_numbers_never_repeat(
    tmp_path: Path, caplog, plant: str
) -> None:
    path = tmp_path / JOB_IDS_FILE_NAME
    if plant == "text":
        path.write_text("not a number\n")
    elif plant == "bad byte":
        path.write_bytes(b"12\xff\n")
    elif plant == "at the bound":
        path.write_text(f"{MAX_JOB_NUMBER}\n")
    elif plant == "fifo":
        os.mkfifo(path)  # opened without blocking and not read
    elif plant == "directory":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")  # not followed, never read without end
    before = int(time.time() * 10)
    with caplog.at_level(logging.WARNING):
        ids = JobIds(path)
    assert "job IDs go on from" in caplog.text
    # Above anything a directory can have given out (ten jobs a second since 1970).
    assert before <= ids.first <= int(time.time() * 10)
    if plant != "directory":
        number = _take(ids, 1)[0]
        assert number == ids.first and len(str(number)) <= 12
        assert int(path.read_text()) == number + JOB_ID_BLOCK


async def test_numbers_stop_at_what_jobs_cancel_can_name(tmp_path: Path) -> None:
    path = tmp_path / JOB_IDS_FILE_NAME
    path.write_text(f"{MAX_JOB_NUMBER - 1}\n")

    async with running_board(JobIds(path)) as board:
        code, reply = await board.route_submit({}, BODY)
        assert (code, reply["id"]) == (200, f"job-{MAX_JOB_NUMBER - 1}")
        assert len(reply["id"]) <= len("job-") + 12
        code, reply = await board.route_submit({}, BODY)
        assert code == 503 and "have reached" in reply["error"]


async def test_a_reservation_that_cannot_be_written_is_a_clear_503(tmp_path: Path) -> None:
    path = tmp_path / JOB_IDS_FILE_NAME
    path.mkdir()  # the rename over it fails

    async with running_board(JobIds(path)) as board:
        code, reply = await board.route_submit({}, BODY)
        assert code == 503 and "cannot reserve job numbers in" in reply["error"]
        _, listed = await board.route_status({}, None)
        assert (listed["remembered"], listed["running"], listed["reading"]) == (0, 0, 0)
        path.rmdir()  # fixed: the next submission goes through
        code, reply = await board.route_submit({}, BODY)
        assert code == 200


def test_a_link_or_stale_file_at_the_temporary_name_is_never_written_through(
    tmp_path: Path,
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    path = tmp_path / JOB_IDS_FILE_NAME
    temporary = tmp_path / f".{JOB_IDS_FILE_NAME}.{os.getpid()}.tmp"
    os.link(victim, temporary)  # a hard link: O_NOFOLLOW alone would write through it
    _take(JobIds(path), 1)
    assert victim.read_text() == "keep me\n"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(victim)
    JobIds(path).reserve()
    assert victim.read_text() == "keep me\n"


def test_in_memory_ids_start_at_one_and_write_nothing(tmp_path: Path) -> None:
    ids = JobIds()
    assert not ids.needs_reserve()
    assert [ids.take() for _ in range(3)] == ["job-1", "job-2", "job-3"]
    assert list(tmp_path.iterdir()) == []


async def test_boards_on_one_data_directory_never_give_an_id_twice(tmp_path: Path) -> None:
    # Two node runs one after the other on the same data directory, each with submissions
    # racing for the board's first reservation (threads, as in production).
    seen: list[str] = []

    async def one(board: JobBoard) -> None:
        code, reply = await board.route_submit({}, BODY)
        assert code == 200
        seen.append(reply["id"])

    for _ in range(2):
        async with running_board(JobIds(tmp_path / JOB_IDS_FILE_NAME)) as board:
            async with trio.open_nursery() as submissions:
                for _ in range(5):
                    submissions.start_soon(one, board)
    assert len(seen) == 10 and len(set(seen)) == 10
    assert sorted(int(i.removeprefix("job-")) for i in seen)[:5] == [1, 2, 3, 4, 5]


async def test_a_request_that_times_out_during_a_reservation_starts_no_job(
    tmp_path: Path,
) -> None:
    # The reservation runs on a thread that cannot be interrupted (as a read of operands):
    # a request cut off meanwhile (the control server's deadline) must not start its job.
    class SlowDisk(JobIds):
        def reserve(self) -> None:
            time.sleep(0.3)
            super().reserve()

    started: list[object] = []

    async def submit(*args: Any, **kwargs: Any) -> Any:
        started.append(args)
        await trio.sleep_forever()

    async with running_board(SlowDisk(tmp_path / JOB_IDS_FILE_NAME), submit) as board:
        with trio.move_on_after(0.05) as scope:
            await board.route_submit({}, BODY)
        assert scope.cancelled_caught
        await trio.sleep(0.1)
        _, listed = await board.route_status({}, None)
        assert (listed["remembered"], listed["running"], started) == (0, 0, [])
        code, reply = await board.route_submit({}, BODY)  # the next one runs, number 2
        assert (code, reply["id"]) == (200, "job-2")


async def test_an_unknown_id_says_whether_it_is_from_an_earlier_run(tmp_path: Path) -> None:
    path = tmp_path / JOB_IDS_FILE_NAME
    earlier = JobIds(path)
    _take(earlier, 3)
    earlier.release()

    async with running_board(JobIds(path)) as board:
        code, reply = await board.route_submit({}, BODY)
        assert (code, reply["id"]) == (200, "job-4")
        code, answer = await board.route_cancel({}, {"id": "job-2"})
        assert code == 404 and "before the node last started" in answer["error"]
        code, answer = await board.route_status({"id": "job-9"}, None)
        assert (code, answer["error"]) == (404, "no job 'job-9'")
        code, answer = await board.route_cancel({}, {"id": "job-4"})
        assert (code, answer["state"]) == (200, "cancelled")


async def test_a_node_goes_on_from_its_last_job_after_a_clean_restart(tmp_path: Path) -> None:
    # A real node (py-libp2p on loopback), opened twice on one data directory: the board's
    # numbers come from its job-ids file, and a clean stop gives back the unused ones.
    from mtor_p2p.node import Node
    from tests.test_compute import config

    ids = []
    for _ in range(2):
        async with Node.open(config(tmp_path, 0, [])) as node:
            async with trio.open_nursery() as nursery:
                node.jobs.nursery = nursery
                code, reply = await node.jobs.route_submit({}, BODY)
                assert code == 200
                ids.append(reply["id"])
                nursery.cancel_scope.cancel()  # the job (no worker here) need not run
    assert ids == ["job-1", "job-2"]
    assert (tmp_path / "peer-0" / JOB_IDS_FILE_NAME).read_text() == "3\n"
