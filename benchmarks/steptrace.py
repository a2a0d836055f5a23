"""Timing a peer's steps without changing its code: wrappers that stamp when a function starts
and ends, for ``./mtor bench trace``.

Stamps are ``time.perf_counter()``, which on Linux reads CLOCK_MONOTONIC: the same clock in
every process on the machine, so a worker's stamps and the requester's fall on one time line.

``python -m benchmarks.steptrace run ...`` is ``mtor-peer run ...`` with the worker's steps
(:data:`WORKER_STEPS`) wrapped; on SIGUSR1 it writes its stamps, one ``label start end`` line
each, to the file ``$MTOR_STEPTRACE_OUT`` names (whole: written aside, then renamed), and
empties its list. A measuring tool only:
no peer runs it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import signal
import time
from collections.abc import Callable
from typing import Any

#: (module, attribute path, label): the requester's steps of a one-shard job, in job order.
REQUESTER_STEPS = [
    ("mtor_p2p.compute.scheduler", "Scheduler.plan_workers", "plan the workers"),
    ("mtor_p2p.compute.scheduler", "Scheduler.describe", "hash operands (describe)"),
    ("mtor_p2p.compute.scheduler", "_describe_arrays", "hash arrays (any thread)"),
    ("mtor_p2p.compute.scheduler", "_JobRun.__init__", "set up the job"),
    ("mtor_p2p.compute.scheduler", "_JobRun._compute_with", "run the shard (send to answer)"),
    ("mtor_p2p.compute.client", "pack_gathered", "build the run request"),
    ("mtor_p2p.lane", "LaneSocket.send_message", "seal and send"),
    ("mtor_p2p.compute.scheduler", "_JobRun._freivalds_sketch", "Freivalds sketch of B"),
    ("mtor_p2p.lane", "LaneSocket.read_header", "read a header record"),
    ("mtor_p2p.lane", "LaneSocket.read_body", "read and open a body"),
    ("mtor_p2p.compute.client", "unpack_view", "unpack the answer"),
    ("mtor_p2p.compute.client", "parse_receipt", "parse the receipt"),
    ("mtor_p2p.compute.scheduler", "_JobRun._judge", "judge the answer"),
    ("mtor_p2p.compute.client", "ShardAnswer.verify", "collect the answer's own checks"),
    ("mtor_p2p.compute.client", "_verify_later", "hash output, verify receipt (any thread)"),
    ("mtor_p2p.compute.scheduler", "_JobRun._check", "Freivalds check"),
    ("mtor_p2p.compute.scheduler", "_JobRun._accept", "accept (settle, book)"),
    ("mtor_p2p.compute.scheduler", "_JobRun.place_outputs", "place the output"),
]

#: The same for a worker serving the shard.
WORKER_STEPS = [
    ("mtor_p2p.lane", "LaneSocket.read_header", "read a header record"),
    ("mtor_p2p.lane", "LaneSocket.read_body", "read and open a body"),
    ("mtor_p2p.compute.worker", "WorkerService._serve_run", "serve the run"),
    ("mtor_p2p.compute.worker", "WorkerService._inline_operands", "take the carried operands"),
    ("mtor_p2p.compute.worker", "_check_carried", "hash them (helper thread, a lone run)"),
    ("mtor_p2p.compute.worker", "WorkerService._compute_keeping", "the product"),
    ("mtor_p2p.compute.worker", "meta_of", "hash the output"),
    ("mtor_p2p.compute.worker", "sign_as_worker", "sign the receipt"),
    ("mtor_p2p.lane", "ServerLane.respond", "seal and send the answer"),
]

Event = tuple[str, float, float]


def _wrapped(function: Callable[..., Any], label: str, events: list[Event]) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(function):

        @functools.wraps(function)
        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return await function(*args, **kwargs)
            finally:
                events.append((label, start, time.perf_counter()))

        return timed_async

    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            events.append((label, start, time.perf_counter()))

    return timed


def install(steps: list[tuple[str, str, str]]) -> list[Event]:
    """Wrap every step (in place, for this process's life); the list its stamps go to."""
    events: list[Event] = []
    for module_name, path, label in steps:
        owner: Any = importlib.import_module(module_name)
        *parents, name = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        setattr(owner, name, _wrapped(getattr(owner, name), label, events))
    return events


def _traced_peer() -> int:
    from mtor_p2p.cli import main

    events = install(WORKER_STEPS)
    out = os.environ["MTOR_STEPTRACE_OUT"]

    def dump(*_: Any) -> None:
        taken = events[:]
        del events[: len(taken)]
        # Written aside, then renamed: a reader sees the whole file or none.
        with open(out + ".part", "w") as f:
            f.writelines(f"{label}\t{start!r}\t{end!r}\n" for label, start, end in taken)
        os.replace(out + ".part", out)

    signal.signal(signal.SIGUSR1, dump)
    return main()


if __name__ == "__main__":
    raise SystemExit(_traced_peer())
