"""The round-trip trace tool (``./mtor bench trace``): its wrappers and its time line, without
a cluster (the tool itself takes a minute and starts a worker process)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import trio

from benchmarks import bench_trace, steptrace

ROOT = Path(__file__).resolve().parent.parent


class _Service:
    def step(self, x: int) -> int:
        return x + 1

    async def awaited(self, x: int) -> int:
        await trio.lowlevel.checkpoint()
        return x * 2

    def fails(self) -> None:
        raise ValueError("no")


def test_wrappers_stamp_sync_async_and_failing_steps_and_keep_results(monkeypatch) -> None:
    module = type(sys)("fake_service_module")
    module.Service = _Service  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_service_module", module)
    for name in ("step", "awaited", "fails"):
        monkeypatch.setattr(_Service, name, getattr(_Service, name))  # restored after
    events = steptrace.install(
        [
            ("fake_service_module", "Service.step", "one step"),
            ("fake_service_module", "Service.awaited", "an awaited step"),
            ("fake_service_module", "Service.fails", "a failing step"),
        ]
    )
    service = _Service()
    assert service.step(1) == 2
    assert trio.run(service.awaited, 3) == 6
    try:
        service.fails()
    except ValueError:
        pass
    assert [label for label, _, _ in events] == ["one step", "an awaited step", "a failing step"]
    assert all(end >= start for _, start, end in events)


def test_every_named_step_exists() -> None:
    # A renamed function would otherwise fail only when the tool runs (a minute in).
    for module_name, path, _ in steptrace.REQUESTER_STEPS + steptrace.WORKER_STEPS:
        owner = __import__(module_name, fromlist=["_"])
        for part in path.split("."):
            owner = getattr(owner, part)
        assert callable(owner), path


def test_timeline_places_steps_in_their_jobs_and_takes_medians() -> None:
    starts = [10.0, 20.0, 30.0, 40.0]
    requester = [
        ("hash", 10.001, 10.002),
        ("hash", 10.005, 10.006),  # the same step again in one job: numbered
        ("hash", 20.001, 20.003),
        ("hash", 20.004, 20.005),
        ("hash", 30.001, 30.004),
        ("hash", 30.005, 30.006),
        ("rare", 40.001, 40.002),  # in one job of four: left out
        ("before", 9.0, 9.5),  # before the first job: not placed
    ]
    worker = [("product", t + 0.002, t + 0.005) for t in starts]
    rows = bench_trace.timeline(starts, {"requester": requester, "worker": worker}, 4)
    by_step = {(row["process"], row["step"]): row for row in rows}
    assert set(by_step) == {("requester", "hash"), ("requester", "hash #2"), ("worker", "product")}
    first = by_step[("requester", "hash")]
    assert first["jobs"] == 3
    assert first["start_ms"] == 1.0 and first["end_ms"] == 3.0 and first["duration_ms"] == 2.0
    assert by_step[("worker", "product")]["duration_ms"] == 3.0
    assert [row["start_ms"] for row in rows] == sorted(row["start_ms"] for row in rows)


def test_help_starts_nothing() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "trace", "--help"],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for words in ("--jobs", "--json", "CLOCK_MONOTONIC", "not a goal"):
        assert words in done.stdout


def test_an_out_path_that_cannot_be_written_is_refused_before_the_run(tmp_path) -> None:
    """A new user's report: the whole run went by, then a traceback lost its result."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "trace", "--jobs", "10",
         "--out", str(tmp_path / "missing" / "trace.json")],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "--out: cannot write into" in done.stderr and "Traceback" not in done.stderr
