"""Job IDs never repeat on one data directory: across restarts, after a crash, and when
submissions race for the first reservation (real files, threads as in production)."""

from __future__ import annotations

import logging
import stat
import time
from pathlib import Path
from typing import Any

import trio

from mtor_p2p.compute.jobs import JOB_ID_BLOCK, JOB_IDS_FILE_NAME, JobBoard, JobIds
from mtor_p2p.runtime import Runtime

BODY = {"kernel": "matmul", "m": 8, "n": 4, "k": 2, "dtype": "float32", "seed": 1}


def _take(ids: JobIds, count: int) -> list[int]:
    numbers = []
    for _ in range(count):
        if ids.needs_reserve():
            ids.reserve()
        numbers.append(int(ids.take().removeprefix("job-")))
    return numbers


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


def test_a_file_without_a_number_is_reported_and_replaced(tmp_path: Path, caplog) -> None:
    path = tmp_path / JOB_IDS_FILE_NAME
    path.write_text("not a number\n")
    with caplog.at_level(logging.WARNING):
        assert _take(JobIds(path), 1) == [1]
    assert "does not hold a job number" in caplog.text
    assert int(path.read_text()) == 1 + JOB_ID_BLOCK


def test_in_memory_ids_start_at_one_and_write_nothing(tmp_path: Path) -> None:
    ids = JobIds()
    assert not ids.needs_reserve()
    assert [ids.take() for _ in range(3)] == ["job-1", "job-2", "job-3"]
    assert list(tmp_path.iterdir()) == []


async def test_boards_on_one_data_directory_never_give_an_id_twice(tmp_path: Path) -> None:
    # Two node runs one after the other on the same data directory, each with submissions
    # racing for the board's first reservation (threads, as in production).
    async def submit(*args: Any, **kwargs: Any) -> Any:
        await trio.sleep_forever()

    seen: list[str] = []
    for _ in range(2):
        board = JobBoard(submit, Runtime.production(), ids=JobIds(tmp_path / JOB_IDS_FILE_NAME))
        async with trio.open_nursery() as nursery:
            board.nursery = nursery

            async def one(board: JobBoard) -> None:
                code, reply = await board.route_submit({}, BODY)
                assert code == 200
                seen.append(reply["id"])

            async with trio.open_nursery() as submissions:
                for _ in range(5):
                    submissions.start_soon(one, board)
            nursery.cancel_scope.cancel()
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

    board = JobBoard(submit, Runtime.production(), ids=SlowDisk(tmp_path / JOB_IDS_FILE_NAME))
    async with trio.open_nursery() as nursery:
        board.nursery = nursery
        with trio.move_on_after(0.05) as scope:
            await board.route_submit({}, BODY)
        assert scope.cancelled_caught
        await trio.sleep(0.1)
        _, listed = await board.route_status({}, None)
        assert (listed["remembered"], listed["running"], started) == (0, 0, [])
        code, reply = await board.route_submit({}, BODY)  # the next one runs, number 2
        assert (code, reply["id"]) == (200, "job-2")
        nursery.cancel_scope.cancel()
