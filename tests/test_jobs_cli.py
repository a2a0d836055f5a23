"""Jobs from any terminal (issue 11, item 5): ``mtor-peer jobs [--watch] [--json]``, the
progress ``submit`` shows, and ``POST /v1/jobs/cancel`` behind Ctrl-C on ``submit``; jobs of
every kernel from the command line (``submit mlp``, ``submit attention``; issue 11).

The job board on its own first (a stand-in for the scheduler), then real subprocesses
against a 2-peer devnet."""

from __future__ import annotations

import io
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

from mtor_kernels import get_kernel
from mtor_p2p.cli import (
    _job_detail,
    _jobs_text,
    _ledger_line,
    _not_used_header,
    format_job_line,
)
from mtor_p2p.compute.inputs import random_operands
from mtor_p2p.compute.jobs import (
    MAX_JOBS_WITH_SHARDS,
    MAX_REMEMBERED_JOBS,
    MAX_RUNNING_JOBS,
    JobBoard,
    JobState,
    observe_attempt,
)
from mtor_p2p.compute.scheduler import ShardAttempt
from mtor_p2p.console import invoked_as
from mtor_p2p.runtime import Runtime
from tests import processes
from tests.processes import mtor

BODY = {"m": 8, "n": 4, "k": 2, "seed": 1}


def attempt(index: int, worker: str, outcome: str) -> ShardAttempt:
    now = trio.current_time()
    return ShardAttempt(
        job_id="abc",
        index=index,
        worker=worker,
        started=now - 0.25,
        ended=now,
        outcome=outcome,
        flops=64,
        hedge=False,
    )


@asynccontextmanager
async def board(release: trio.Event) -> AsyncIterator[JobBoard]:
    """A board whose jobs report a rejected attempt and one accepted shard of four from
    tasks of their own (as the scheduler's attempts run), then wait for ``release``."""

    async def submit(*args: Any, progress: Any, **kwargs: Any) -> Any:
        async def worker() -> None:  # a task of the job, as the scheduler's attempts are
            observe_attempt(attempt(2, "peer-b", "rejected"))
            observe_attempt(attempt(0, "peer-a", "accepted"))
            progress(1, 4)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker)
        await release.wait()
        raise AssertionError("the stand-in job never finishes")

    jobs = JobBoard(submit, Runtime.simulated("jobs"))
    async with trio.open_nursery() as nursery:
        jobs.nursery = nursery
        yield jobs
        nursery.cancel_scope.cancel()


async def test_progress_comes_from_the_jobs_own_attempts_and_cancel_stops_it() -> None:
    release = trio.Event()
    async with board(release) as jobs:
        _, first = await jobs.route_submit({}, BODY)
        _, second = await jobs.route_submit({}, BODY)
        await trio.sleep(0.01)
        # Attempts outside a job's tasks count nowhere.
        observe_attempt(attempt(1, "peer-z", "accepted"))
        _, state = await jobs.route_status({"id": first["id"], "shards": "1"}, None)
        assert state["state"] == "running" and (state["done"], state["total"]) == (1, 4)
        assert state["workers"] == {"peer-a": 1} and state["workers_tried"] == 2
        assert state["attempts"] == {"accepted": 1, "rejected": 1}
        assert state["verified"] == 1 and state["rejected"] == 1 and state["reissued"] == 1
        assert state["shards"] == [{"index": 0, "worker": "peer-a", "seconds": 0.25, "attempts": 1}]
        assert state["shape"] == [8, 4, 2] and state["kernel"] == "matmul"
        line = format_job_line(state)
        assert line.startswith(f"{first['id']}: [######..................] 1/4 shards, ")
        assert "1 worker(s), 1 check(s) passed, 1 rejected, 1 re-issued, running" in line
        # A running job asked for "auto" is named by the check it stands for, as it will be
        # once done (it said "verify auto" while running, "verify freivalds" after).
        assert state["verify"] == "auto" and state["verification"] == "freivalds"
        assert "matmul m=8 n=4 k=2 float32, verify freivalds" in _job_detail(state)

        code, cancelled = await jobs.route_cancel({}, {"id": first["id"]})
        assert code == 200 and cancelled["state"] == "cancelled"
        assert cancelled["done"] == 1 and cancelled["error"] == "cancelled on request"
        # Its accepted shard stays paid, and the list says so.
        assert "cancelled on request; the 1 shard(s) accepted before that stay paid" in (
            _job_detail(cancelled)
        )
        # The other job runs on; a job can be cancelled once.
        _, other = await jobs.route_status({"id": second["id"]}, None)
        assert other["state"] == "running"
        code, again = await jobs.route_cancel({}, {"id": first["id"]})
        assert code == 409 and "is not running: it is cancelled" in again["error"]
        code, _ = await jobs.route_cancel({}, {"id": "job-99"})
        assert code == 404
        with pytest.raises(ValueError):
            await jobs.route_cancel({}, {"job": first["id"]})
        # Listed newest first, bounded.
        _, listed = await jobs.route_status({"limit": "1"}, None)
        assert [j["id"] for j in listed["jobs"]] == [second["id"]]
        assert listed["remembered"] == 2 and listed["running"] == 1
        assert "shards" not in listed["jobs"][0]
        for limit in ("0", str(MAX_REMEMBERED_JOBS + 1), "x"):
            with pytest.raises(ValueError):
                await jobs.route_status({"limit": limit}, None)


async def test_only_the_recent_jobs_keep_their_shards_and_the_board_is_bounded() -> None:
    release = trio.Event()
    async with board(release) as jobs:
        ids = []
        for _ in range(MAX_REMEMBERED_JOBS + 5):
            _, reply = await jobs.route_submit({}, BODY)
            ids.append(reply["id"])
            await jobs.route_cancel({}, reply)
        _, listed = await jobs.route_status(
            {"limit": str(MAX_REMEMBERED_JOBS), "shards": "1"}, None
        )
        assert listed["remembered"] == MAX_REMEMBERED_JOBS
        assert [j["id"] for j in listed["jobs"]] == ids[::-1][:MAX_REMEMBERED_JOBS]
        kept = [j for j in listed["jobs"] if j["shards"] is not None]
        assert len(kept) == MAX_JOBS_WITH_SHARDS
        assert all(j["state"] == "cancelled" for j in listed["jobs"])


async def test_running_jobs_are_capped_before_their_operands_are_read(tmp_path) -> None:
    release = trio.Event()
    missing = {"a": str(tmp_path / "no-a.npy"), "b": str(tmp_path / "no-b.npy")}
    async with board(release) as jobs:
        # A submission refused while reading its operands holds no place.
        with pytest.raises(ValueError, match="no such file"):
            await jobs.route_submit({}, missing)
        ids = []
        for _ in range(MAX_RUNNING_JOBS):
            code, reply = await jobs.route_submit({}, BODY)
            assert code == 200
            ids.append(reply["id"])
        # Full: answered before the operands are looked at (these files do not exist).
        code, refused = await jobs.route_submit({}, missing)
        assert code == 429 and f"{MAX_RUNNING_JOBS} jobs are running" in refused["error"]
        code, _ = await jobs.route_submit({}, BODY)
        assert code == 429
        _, listed = await jobs.route_status({}, None)
        assert (listed["running"], listed["reading"]) == (MAX_RUNNING_JOBS, 0)
        # A job that ends gives its place back.
        code, _ = await jobs.route_cancel({}, {"id": ids[0]})
        assert code == 200
        code, reply = await jobs.route_submit({}, BODY)
        assert code == 200
        code, _ = await jobs.route_submit({}, BODY)
        assert code == 429


async def test_a_submission_whose_request_ended_while_reading_starts_no_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Threads, as in production: a read on a thread runs to its end whatever happens to the
    # request meanwhile (the control server cancels a request at its deadline).
    from mtor_p2p.compute import jobs as jobs_module

    def slow_read(body: dict[str, Any]) -> dict[str, np.ndarray]:
        time.sleep(0.3)
        return random_operands("matmul", {"m": 8, "n": 4, "k": 2}, "float32", 1)

    monkeypatch.setattr(jobs_module, "load_operands", slow_read)

    async def submit(*args: Any, **kwargs: Any) -> Any:
        await trio.sleep_forever()

    jobs = JobBoard(submit, Runtime.production())
    async with trio.open_nursery() as nursery:
        jobs.nursery = nursery
        with trio.move_on_after(0.05) as scope:
            await jobs.route_submit({}, BODY)
        assert scope.cancelled_caught
        _, listed = await jobs.route_status({}, None)
        assert (listed["remembered"], listed["running"], listed["reading"]) == (0, 0, 0)
        code, reply = await jobs.route_submit({}, BODY)  # the place was given back
        assert code == 200 and reply["id"] == "job-1"  # the first job made
        nursery.cancel_scope.cancel()


async def test_file_operands_are_checked_from_their_headers_and_never_block(tmp_path) -> None:
    from mtor_p2p.compute.jobs import load_npy, npy_header

    # A header promising more than the kernel takes: refused with the kernel's line, before
    # the (absent) data is read.
    huge = tmp_path / "huge.npy"
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (70000, 70000)}
    )
    huge.write_bytes(header.getvalue())
    os.truncate(huge, len(header.getvalue()) + 70000 * 70000 * 4)  # sparse: no disk used
    with pytest.raises(ValueError, match="above the limit"):
        await JobBoard(None, Runtime.simulated("jobs")).route_submit(  # type: ignore[arg-type]
            {}, {"a": str(huge), "b": str(huge)}
        )
    # A FIFO with no writer would block an open forever: refused at once instead.
    fifo = tmp_path / "fifo.npy"
    os.mkfifo(fifo)
    with trio.fail_after(5):
        with pytest.raises(ValueError, match="is not a regular file"):
            await trio.to_thread.run_sync(npy_header, fifo, "a", abandon_on_cancel=True)
    # A file whose header changed since it was checked is not read.
    small = tmp_path / "small.npy"
    np.save(small, np.ones((3, 3), np.float32))
    assert load_npy(small, "a", ((3, 3), np.dtype(np.float32))).shape == (3, 3)
    with pytest.raises(ValueError, match="changed while it was being read"):
        load_npy(small, "a", ((2, 2), np.dtype(np.float32)))


def test_the_jobs_list_says_how_many_submissions_are_still_reading() -> None:
    assert _jobs_text({"jobs": [], "reading": 3}) == [
        f"no jobs since this node started (run one: {invoked_as()} submit matmul); 3 "
        "submission(s) still reading their "
        "operands"
    ]
    assert _jobs_text({"jobs": []}) == [
        f"no jobs since this node started (run one: {invoked_as()} submit matmul)"
    ]
    # The node's own --data-dir in the hint (a walkthrough: without it, the hint pointed at
    # the default directory, where no node ran).
    assert _jobs_text({"jobs": []}, Path("/tmp/my dev/peer-0")) == [
        f"no jobs since this node started (run one: {invoked_as()} submit matmul "
        "--data-dir '/tmp/my dev/peer-0')"
    ]


async def test_a_running_job_is_not_forgotten_behind_many_ended_ones() -> None:
    release = trio.Event()
    async with board(release) as jobs:
        _, first = await jobs.route_submit({}, BODY)
        for _ in range(MAX_REMEMBERED_JOBS + 5):
            _, reply = await jobs.route_submit({}, BODY)
            await jobs.route_cancel({}, reply)
        _, listed = await jobs.route_status({"limit": str(MAX_REMEMBERED_JOBS)}, None)
        assert listed["remembered"] == MAX_REMEMBERED_JOBS and listed["running"] == 1
        # Still listed, and so still cancellable.
        _, state = await jobs.route_status({"id": first["id"]}, None)
        assert state["state"] == "running"
        code, cancelled = await jobs.route_cancel({}, first)
        assert code == 200 and cancelled["state"] == "cancelled"


async def test_the_board_takes_every_kernel_by_its_sizes_or_its_files(tmp_path) -> None:
    rng = np.random.default_rng(0)
    files = {
        "x": (5, 3), "w1": (3, 4), "b1": (4,), "w2": (4, 2), "b2": (2,), "bad_w1": (6, 4),
    }  # fmt: skip
    for name, shape in files.items():
        np.save(tmp_path / f"{name}.npy", rng.standard_normal(shape, dtype=np.float32))
    paths = {name: str(tmp_path / f"{name}.npy") for name in files}
    release = trio.Event()
    async with board(release) as jobs:
        sizes = {"batch": 2, "heads": 3, "seq_q": 4, "head_dim": 5}
        _, reply = await jobs.route_submit({}, {"kernel": "attention", **sizes, "seed": 1})
        _, job = await jobs.route_status(reply, None)
        # Self-attention unless told otherwise: seq_k = seq_q, head_dim_v = head_dim.
        assert job["sizes"] == sizes | {"seq_k": 4, "head_dim_v": 5}
        assert job["shape"] == [2, 3, 4, 4, 5, 5] and job["kernel"] == "attention"
        mlp = {name: paths[name] for name in ("x", "w1", "b1", "w2", "b2")}
        _, reply = await jobs.route_submit({}, {"kernel": "mlp", **mlp})
        _, job = await jobs.route_status(reply, None)
        assert job["sizes"] == {"batch": 5, "d_in": 3, "d_hidden": 4, "d_out": 2}
        assert job["dtype"] == "float32"
        assert "mlp batch=5 d_in=3 d_hidden=4 d_out=2 float32" in _job_detail(job)
        # Refused before a job exists, with the kernel's one line.
        refusals = [
            ({**mlp, "w1": paths["bad_w1"]}, "mlp: shape mismatch: x has 3 features but w1 has 6"),
            ({"x": paths["x"]}, "x, w1, b1, w2 and b2 go together"),
            ({"batch": 2, "d_in": 3, "d_hidden": 4}, "d_out must be an integer"),
        ]
        for body, message in refusals:
            with pytest.raises(ValueError, match=message):
                await jobs.route_submit({}, {"kernel": "mlp", **body})
        with pytest.raises(ValueError, match="kernel must be one of matmul, mlp, attention"):
            await jobs.route_submit({}, {"kernel": "conv", "m": 1})
        _, listed = await jobs.route_status({}, None)
        assert listed["remembered"] == 2


# -- against a devnet ---------------------------------------------------------------------------


def popen(*args: str) -> subprocess.Popen[str]:
    """``mtor-peer ARGS`` with Ctrl-C delivered as Python's default (even where the test
    runner's parent ignores SIGINT)."""
    return subprocess.Popen(
        [sys.executable, "-m", "mtor_p2p", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def read_line(stream: Any, process: subprocess.Popen[str], want: Any, timeout: float) -> str:
    """The first line of ``stream`` for which ``want(line)`` is true (fails on timeout or
    exit)."""
    selector = selectors.DefaultSelector()
    selector.register(stream, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        if selector.select(timeout=0.2):
            line = stream.readline()
            if line:
                seen.append(line)
                if want(line):
                    return line
                continue
        if process.poll() is not None:
            pytest.fail(f"exited {process.returncode}; lines: {seen[-5:]}")
    pytest.fail(f"no such line in {timeout} s; lines: {seen[-5:]}")


@pytest.fixture(scope="module")
def devnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[dict[str, Any]]]:
    """A devnet of 2 peers: peer 0 submits, peer 1 works."""
    with processes.devnet(tmp_path_factory.mktemp("jobs"), 2, launch=popen) as peers:
        yield peers


@contextmanager
def long_job(requester: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``submit`` of a job of many small shards (it runs for many seconds on a 2-core
    machine), with progress: the process and its first progress line past 0 shards. Killed
    at the end, whatever happened."""
    submit = popen("submit", "matmul", "--m", "8192", "--n", "512", "--k", "512",
                   "--shards", "2000", "--progress", "--data-dir", requester)  # fmt: skip
    try:
        yield submit, read_line(submit.stderr, submit, lambda s: " 0/" not in s and "/" in s, 60)
    finally:
        submit.kill()
        submit.wait()


def jobs_json(data_dir: str) -> dict[str, Any]:
    result = mtor("jobs", "--json", "--data-dir", data_dir)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_jobs_lists_a_finished_job_with_its_shards_and_watch_stops_on_ctrl_c(devnet):
    requester, worker = devnet[0]["data_dir"], devnet[1]["peer_id"]
    empty = mtor("jobs", "--data-dir", requester)
    assert empty.returncode == 0 and "no jobs since this node started" in empty.stdout
    submit = mtor("submit", "matmul", "--m", "256", "--n", "64", "--k", "64", "--shards", "4",
                  "--progress", "--json", "--data-dir", requester)  # fmt: skip
    assert submit.returncode == 0, submit.stderr
    summary = json.loads(submit.stdout)
    # submit's progress is the jobs line (plain lines: stderr is not a terminal).
    final = submit.stderr.strip().splitlines()[-1]
    assert final.startswith("job-") and "[########################] 4/4 shards" in final
    assert ", done, " in final

    listed = jobs_json(requester)
    job = listed["jobs"][0]
    assert job["state"] == "done" and job["done"] == job["total"] == 4
    assert job["result"]["job_id"] == summary["job_id"]
    assert job["workers"] == {worker: 4} and job["verified"] == summary["checks_passed"]
    assert [s["index"] for s in job["shards"]] == [0, 1, 2, 3]
    assert all(s["worker"] == worker and s["attempts"] >= 1 for s in job["shards"])
    text = mtor("jobs", "--data-dir", requester).stdout
    assert f"{job['id']}: [########################] 4/4 shards, 1 worker(s)" in text
    assert "matmul m=256 n=64 k=64 float32, verify freivalds" in text
    assert f"    {summary['job_id'][:16]}…  matmul m=256" in text  # as receipts name it

    # --watch without a terminal: plain lines; Ctrl-C ends it with 130.
    watch = popen("jobs", "--watch", "--interval", "0.2", "--data-dir", requester)
    try:
        line = read_line(watch.stdout, watch, lambda s: s.startswith(job["id"]), timeout=30)
        assert "4/4 shards" in line and "\033" not in line
        watch.send_signal(signal.SIGINT)
        assert watch.wait(timeout=10) == 130
        assert "Traceback" not in watch.stderr.read()
    finally:
        watch.kill()
        watch.wait()


def test_ctrl_c_on_submit_cancels_the_job_and_the_node_runs_on(devnet):
    requester = devnet[0]["data_dir"]
    with long_job(requester) as (submit, line):
        assert line.startswith("job-")
        job_id = line.split(":")[0]
        submit.send_signal(signal.SIGINT)
        assert submit.wait(timeout=30) == 130
        rest = submit.stderr.read()
        assert f"interrupted; {job_id} cancelled" in rest and "Traceback" not in rest
    job = next(j for j in jobs_json(requester)["jobs"] if j["id"] == job_id)
    assert job["state"] == "cancelled", job
    assert 0 < job["done"] < job["total"] == 2000
    accepted = len(job["shards"])
    assert accepted >= job["done"]
    # The shards accepted before the cancel stay paid: their receipts are countersigned.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        receipts = json.loads(
            mtor("receipts", "--json", "--limit", "10000", "--data-dir", requester).stdout
        )["receipts"]
        paid = [r for r in receipts if r["job_id"] == job["job_id"] and r["complete"]]
        if len(paid) >= accepted:
            break
        time.sleep(0.3)
    assert len(paid) >= accepted
    # Nothing more of it runs: the count stays put, and the node takes the next job.
    time.sleep(1.0)
    assert next(j for j in jobs_json(requester)["jobs"] if j["id"] == job_id)["done"] == job["done"]
    after = mtor("submit", "matmul", "--m", "128", "--n", "32", "--k", "32", "--json",
                 "--data-dir", requester)  # fmt: skip
    assert after.returncode == 0, after.stderr
    assert jobs_json(requester)["jobs"][0]["state"] == "done"


def test_jobs_cancel_stops_a_job_whose_submit_is_elsewhere(devnet):
    requester = devnet[0]["data_dir"]
    with long_job(requester) as (submit, line):
        job_id = line.split(":")[0]
        cancel = mtor("jobs", "--cancel", job_id, "--data-dir", requester)
        assert cancel.returncode == 0, cancel.stderr
        assert cancel.stdout.startswith(f"{job_id}: [") and "cancelled" in cancel.stdout
        # The submit that followed it says so and fails.
        assert submit.wait(timeout=30) == 1
        assert "cancelled" in submit.stderr.read()
    again = mtor("jobs", "--cancel", job_id, "--data-dir", requester)
    assert again.returncode == 1 and "is not running: it is cancelled" in again.stderr
    unknown = mtor("jobs", "--cancel", "job-999", "--data-dir", requester)
    assert unknown.returncode == 1
    assert "job-999 was not cancelled: no job 'job-999'" in unknown.stderr
    odd = mtor("jobs", "--cancel", "job-1; x" + "y" * 5000, "--data-dir", requester)
    assert odd.returncode == 2 and "takes a job ID as listed (job-N)" in odd.stderr
    assert len(odd.stderr) < 300


def test_submit_mlp_from_files_returns_the_numpy_reference(devnet, tmp_path):
    requester = devnet[0]["data_dir"]
    rng = np.random.default_rng(11)
    shapes = {"x": (96, 32), "w1": (32, 48), "b1": (48,), "w2": (48, 16), "b2": (16,)}
    operands = {n: rng.standard_normal(s, dtype=np.float32) for n, s in shapes.items()}
    flags = []
    for name, array in operands.items():
        np.save(tmp_path / f"{name}.npy", array)
        flags += [f"--{name}", str(tmp_path / f"{name}.npy")]
    out = tmp_path / "y.npy"
    submit = mtor("submit", "mlp", *flags, "--out", str(out), "--shards", "4", "--progress",
                  "--json", "--data-dir", requester)  # fmt: skip
    assert submit.returncode == 0, submit.stderr
    summary = json.loads(submit.stdout)
    assert summary["kernel"] == "mlp" and summary["output_shape"] == [96, 16]
    assert summary["verification"] == "sample" and summary["rejected"] == 0
    assert summary["shards"] == summary["receipts"] == 4
    # The same progress line as matmul's, ending done.
    final = submit.stderr.strip().splitlines()[-1]
    assert "[########################] 4/4 shards" in final and ", done, " in final
    np.testing.assert_allclose(
        np.load(out), get_kernel("mlp").reference(operands), rtol=1e-5, atol=1e-5
    )
    text = mtor("jobs", "--data-dir", requester).stdout
    assert "mlp batch=96 d_in=32 d_hidden=48 d_out=16 float32, verify sample" in text
    # A shape that does not fit: one line naming it, exit 2, and no job is sent.
    before = jobs_json(requester)["remembered"]
    np.save(tmp_path / "b2.npy", np.ones(15, np.float32))
    wrong = mtor("submit", "mlp", *flags, "--data-dir", requester)
    assert wrong.returncode == 2
    assert wrong.stderr.strip() == (
        "mtor-peer: error: --w2 is 48x16 but --b2 is 15: they disagree on d_out "
        "(axis 1 of --w2, axis 0 of --b2)"
    )
    assert jobs_json(requester)["remembered"] == before


def test_submit_attention_on_random_inputs_returns_the_numpy_reference(devnet, tmp_path):
    requester = devnet[0]["data_dir"]
    sizes = {"batch": 6, "heads": 2, "seq_q": 16, "seq_k": 24, "head_dim": 8}
    flags = []
    for name, value in sizes.items():
        flags += [f"--{name.replace('_', '-')}", str(value)]
    out = tmp_path / "o.npy"
    submit = mtor("submit", "attention", *flags, "--seed", "7", "--out", str(out),
                  "--data-dir", requester)  # fmt: skip
    assert submit.returncode == 0, submit.stderr
    assert "attention, output [6, 2, 16, 8]" in submit.stdout
    assert "verified   sample:" in submit.stdout and "receipts" in submit.stdout
    # The node drew the operands from the seed; so does the reference.
    operands = random_operands("attention", sizes | {"head_dim_v": 8}, "float32", 7)
    np.testing.assert_allclose(
        np.load(out), get_kernel("attention").reference(operands), rtol=1e-5, atol=1e-5
    )
    job = jobs_json(requester)["jobs"][0]
    assert job["kernel"] == "attention" and job["state"] == "done"
    assert job["sizes"] == sizes | {"head_dim_v": 8}


def test_a_running_job_without_its_id_yet_says_so_in_the_id_column() -> None:
    """The scheduler names a job (the hash its receipts carry) once its workers are chosen:
    until then the second line says so where the ID goes (a new user found it missing)."""
    choosing = {"state": "running", "kernel": "matmul", "id": "job-1"}
    assert _job_detail(choosing).startswith("    (no job ID yet)   matmul")
    named = {**choosing, "job_id": "ab" * 32}
    assert _job_detail(named).startswith(f"    {'ab' * 8}…  matmul")
    failed = {"state": "failed", "kernel": "matmul", "id": "job-2", "error": "no workers"}
    assert _job_detail(failed).startswith("    matmul")


def test_status_names_the_network_and_counts_peers_of_another() -> None:
    """``status`` says which network the node follows, and how many connected peers follow
    another (whose workers refuse its jobs): a new user's walkthrough joined without the
    devnet's genesis and saw only a price in ``status``."""
    status = {"ledger": {"network": "mtor-devnet", "genesis": "ab" * 32, "sync": {}}}
    assert _ledger_line(status) == f"ledger     network mtor-devnet (genesis {'ab' * 8}…)"
    status["ledger"]["sync"] = {"other_network_peers": 3}
    line = _ledger_line(status)
    assert line is not None and "; 3 connected peer(s) of another network" in line
    assert _ledger_line({}) is None


async def test_refusals_are_not_counted_as_re_issued_shards() -> None:
    """A failed job whose workers all refused (another network, our credit) re-issued
    nothing, as the scheduler counts it for a job that ends: ``jobs`` said "4 re-issued"
    for four refusals (a new user's walkthrough)."""
    job = JobState("job-1", state="failed", error="no acceptable worker left")
    job.attempts = {"refused": 4}
    assert job.to_json()["reissued"] == 0
    job.attempts["failed"] = 1
    assert job.to_json()["reissued"] == 1


def test_workers_not_used_point_to_the_peer_book_only_for_demotions() -> None:
    """Workers left out by a refusal that is no fault (another network) are not in the peer
    book: the summary does not send the reader there for them."""
    network = {"w1": "of another network: a worker's ledger has genesis ab…"}
    assert _not_used_header(1, network) == "not used   1 worker(s):"
    demoted = network | {"w2": "failing: 3 in a row"}
    assert _not_used_header(2, demoted) == "not used   2 worker(s) (see mtor-peer reputation):"
    # Past the summary's first 20 workers out: the scheduler's count decides (a review).
    pointed = "not used   21 worker(s) (see mtor-peer reputation):"
    assert _not_used_header(21, network, demoted_count=1) == pointed
    assert _not_used_header(21, network, demoted_count=0) == "not used   21 worker(s):"


def test_operands_out_of_float32s_range_are_an_input_error_or_a_notice(devnet, tmp_path):
    """A new user's walkthrough: 1e30 operands ended "cannot be verified" with exit 1 (the
    README puts input problems under 2), and an accepted output of inf or NaN (redundant
    verification of 1e30 operands, a NaN in A) came with no word of it."""
    requester = devnet[0]["data_dir"]
    rng = np.random.default_rng(0)
    for name, shape in (("a", (64, 32)), ("b", (32, 16))):
        np.save(tmp_path / f"{name}.npy", (rng.uniform(1, 2, shape) * 1e30).astype(np.float32))
    files = ["--a", str(tmp_path / "a.npy"), "--b", str(tmp_path / "b.npy")]
    checked = mtor("submit", "matmul", *files, "--data-dir", requester)
    assert checked.returncode == 2, checked.stderr
    assert "cannot be verified" in checked.stderr and "rescale" in checked.stderr
    job = jobs_json(requester)["jobs"][0]
    assert job["state"] == "failed" and job["unverifiable"] is True
    # A NaN in A: its row of the product is NaN, as an honest worker's is; accepted, and said.
    a = rng.uniform(1, 2, (64, 32)).astype(np.float32)
    a[3, 5] = np.nan
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", rng.uniform(1, 2, (32, 16)).astype(np.float32))
    nan = mtor("submit", "matmul", *files, "--data-dir", requester)
    assert nan.returncode == 0, nan.stderr
    assert "output     holds 16 inf or NaN value(s)" in nan.stdout
