"""Jobs submitted through the control API: started in the node's nursery, polled by the CLI.

``POST /v1/jobs`` takes ``{"kernel": "matmul", "m", "n", "k", "dtype", "verify", "max_price",
"shards", "seed"}`` (random operands) or ``{"a": path, "b": path, "out": path}`` (``.npy``
files on this machine; the API is local), starts the job and answers ``{"id": ...}``. The
other kernels take their own sizes or operand names (:data:`KERNEL_INPUTS`): ``mlp`` the sizes
``batch, d_in, d_hidden, d_out`` or the files ``x, w1, b1, w2, b2``; ``attention`` the sizes
``batch, heads, seq_q, seq_k, head_dim, head_dim_v`` (the last two default to ``seq_q`` and
``head_dim``) or the files ``q, k, v``.
``GET /v1/jobs?id=...`` answers its state, progress and, once done, its summary;
``GET /v1/jobs?limit=N`` lists the last N jobs (20 by default, at most
:data:`MAX_REMEMBERED_JOBS`), newest first; ``shards=1`` adds each job's accepted shards.
``POST /v1/jobs/cancel {"id": ...}`` cancels a running job: its shards in flight are
abandoned, it ends in state ``cancelled``, and the receipts of shards already accepted stay
countersigned and paid (the scheduler settles them as they are accepted).

At most :data:`MAX_RUNNING_JOBS` jobs run at once: a submission beyond that is answered 429
before its operands are read or made (each job holds its operands and its output in the
node's memory, so a script submitting in a loop without waiting would otherwise grow the
node until the system kills it). A running job is never forgotten to make room in the list:
only ended ones are, oldest first.

Progress comes from the scheduler's observer (every shard attempt as it ends), matched to the
board's job through a context variable that the job's tasks inherit: workers, attempts by
outcome, re-issues and each accepted shard, while the job runs.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import itertools
import logging
import math
import os
import re
import stat
import tempfile
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import trio

from mtor_kernels import get_kernel
from mtor_p2p.compute.inputs import (
    KERNEL_INPUTS,
    check_shapes,
    kernel_inputs,
    random_operands,
)
from mtor_p2p.compute.scheduler import (
    JobFailed,
    JobResult,
    JobUnverifiable,
    ShardAttempt,
    ShardResult,
)
from mtor_p2p.config import write_private
from mtor_p2p.runtime import Runtime

log = logging.getLogger(__name__)

MAX_REMEMBERED_JOBS = 100
#: Jobs running at once (their operands being read or made included); beyond it, 429.
MAX_RUNNING_JOBS = 16
#: Jobs listed by ``GET /v1/jobs`` without ``limit``.
DEFAULT_LISTED_JOBS = 20
#: The most recent jobs that keep their per-shard detail (older ones keep their counts).
MAX_JOBS_WITH_SHARDS = 20
MAX_RANDOM_ELEMENTS = 1 << 26  # per operand, for jobs on random inputs
DTYPES = ("float32", "float16")
#: Attempt outcomes after which the scheduler re-issues the shard, as its own count has it
#: (shown once the job is done): a refusal (our credit, a price, other rules, another
#: network) puts the shard back in the queue without counting it re-issued, and a failed job,
#: which has no scheduler count to show, said "4 re-issued" for four refusals (a new user's
#: walkthrough).
REISSUING_OUTCOMES = ("rejected", "failed", "timeout", "misbehaved")
#: Job states; every one but ``running`` is final.
STATES = ("running", "done", "failed", "cancelled")
#: Longest a finished job waits for its receipts' settlement before it is reported done.
SETTLED_WAIT = 5.0
#: How long ``POST /v1/jobs/cancel`` waits for the job to stop before it answers.
CANCEL_WAIT_SECONDS = 5.0
#: The data directory's file of the next unreserved job number (see :class:`JobIds`).
JOB_IDS_FILE_NAME = "job-ids"
#: Job numbers reserved per write of that file: a node that crashes skips at most this many.
JOB_ID_BLOCK = 64


@dataclass
class JobState:
    """What the control API reports about one submitted job."""

    id: str
    state: str = "running"  # one of STATES
    done: int = 0
    total: int = 0
    result: dict[str, Any] | None = None
    error: str | None = None
    #: Failed because its operands make its answers impossible to judge (JobUnverifiable).
    unverifiable: bool = False
    started: float = field(default_factory=trio.current_time)
    #: What was asked: kernel, shape, verification (shown by ``mtor-peer jobs``).
    request: dict[str, Any] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)  # wall clock, for people
    ended: float | None = None  # trio's clock
    #: The scheduler's ID of the job (its receipts name it), from its first attempt.
    job_id: str | None = None
    #: Shard attempts that ended, by outcome (see scheduler.ShardAttempt).
    attempts: dict[str, int] = field(default_factory=dict)
    #: Accepted shards per worker.
    workers: dict[str, int] = field(default_factory=dict)
    #: Workers that ran an attempt of this job.
    tried: set[str] = field(default_factory=set)
    #: Accepted shards: index -> (worker, seconds of the accepted attempt, attempts so far).
    shards: dict[int, tuple[str, float, int]] | None = field(default_factory=dict)
    _tries: dict[int, int] = field(default_factory=dict)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    finished: trio.Event = field(default_factory=trio.Event)

    def observe(self, attempt: ShardAttempt) -> None:
        """Count one shard attempt that ended (the scheduler's observer, for this job)."""
        self.job_id = attempt.job_id
        self.attempts[attempt.outcome] = self.attempts.get(attempt.outcome, 0) + 1
        self.tried.add(attempt.worker)
        tries = self._tries[attempt.index] = self._tries.get(attempt.index, 0) + 1
        if attempt.outcome == "accepted":
            self.workers[attempt.worker] = self.workers.get(attempt.worker, 0) + 1
            if self.shards is not None:
                seconds = round(attempt.ended - attempt.started, 3)
                self.shards[attempt.index] = (attempt.worker, seconds, tries)

    def finish(self, state: str, error: str | None = None) -> None:
        """End the job in ``state`` (done, failed or cancelled)."""
        self.state, self.error, self.ended = state, error, trio.current_time()
        self._tries.clear()

    def drop_shards(self) -> None:
        """Forget the per-shard detail (an old job keeps its counts)."""
        if self.state != "running":
            self.shards = None

    def to_json(self, *, shards: bool = False) -> dict[str, Any]:
        """JSON-ready form; ``shards``: with each accepted shard (index, worker, seconds,
        attempts), when this job still keeps them."""
        end = self.ended if self.ended is not None else trio.current_time()
        result = self.result or {}
        reissued = sum(self.attempts.get(outcome, 0) for outcome in REISSUING_OUTCOMES)
        body: dict[str, Any] = {
            "id": self.id,
            "state": self.state,
            "done": self.done,
            "total": self.total,
            "elapsed_s": round(end - self.started, 3),
            "created_at": round(self.created_at, 3),
            "job_id": result.get("job_id", self.job_id),
            **self.request,
            "workers": dict(sorted(self.workers.items())),
            "workers_tried": len(self.tried),
            "attempts": dict(sorted(self.attempts.items())),
            "verified": result.get("checks_passed", self.attempts.get("accepted", 0)),
            "rejected": result.get("rejected", self.attempts.get("rejected", 0)),
            # While the job runs: attempts that put their shard back in the queue; once done,
            # the scheduler's own count.
            "reissued": result.get("reissued", reissued),
            "result": self.result,
            "error": self.error,
            "unverifiable": self.unverifiable,
        }
        if shards:
            body["shards"] = (
                None
                if self.shards is None
                else [
                    {"index": i, "worker": w, "seconds": s, "attempts": n}
                    for i, (w, s, n) in sorted(self.shards.items())
                ]
            )
        return body


#: The board's job that the current task works for (inherited by the scheduler's tasks).
_current_job: contextvars.ContextVar[JobState | None] = contextvars.ContextVar(
    "mtor_board_job", default=None
)


def observe_attempt(attempt: ShardAttempt) -> None:
    """The scheduler's observer (``Node`` installs it): the attempt counts for the board's
    job whose task runs it, if any."""
    job = _current_job.get()
    if job is not None:
        job.observe(attempt)


def _positive_int(body: dict[str, Any], name: str, limit: int = 1 << 20) -> int:
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
        raise ValueError(f"{name} must be an integer in [1, {limit}]")
    return value


def load_operands(body: dict[str, Any]) -> dict[str, np.ndarray]:
    """The operands of ``body["kernel"]`` (matmul when absent) from ``.npy`` paths, one per
    operand name, or random ones of the requested sizes, dtype and seed."""
    spec = kernel_inputs(body.get("kernel", "matmul"))
    names = list(spec.operands)
    if any(name in body for name in names):
        if not all(isinstance(body.get(name), str) for name in names):
            together = " and ".join([", ".join(names[:-1]), names[-1]])
            raise ValueError(f"{together} go together, as paths of .npy files")
        headers = {name: npy_header(body[name], name) for name in names}
        # The kernel's limits (an output or an intermediate too large) from the headers alone,
        # before any file is read whole, as for random operands below.
        get_kernel(spec.kernel).check_operands(
            {
                n: np.broadcast_to(np.zeros((), dtype), shape)
                for n, (shape, dtype) in headers.items()
            }
        )
        return {name: load_npy(body[name], name, headers[name]) for name in names}
    sizes = {}
    for size in spec.sizes:
        if size in spec.same_as and body.get(size) is None:
            sizes[size] = sizes[spec.same_as[size]]
        else:
            sizes[size] = _positive_int(body, size)
    dtype = body.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}")
    shapes = spec.shapes(sizes)
    if max(math.prod(shape) for shape in shapes.values()) > MAX_RANDOM_ELEMENTS:
        raise ValueError("operands too large for a random-input job")
    check_shapes(spec.kernel, shapes, dtype)  # the kernel's limits, before allocating
    seed = body.get("seed")
    return random_operands(spec.kernel, sizes, dtype, seed if isinstance(seed, int) else None)


NPY_MAGIC = b"\x93NUMPY"


def _open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading, if it is a regular file (``IsADirectoryError`` for a
    directory, ``_NotAFile`` for anything else). Opened without blocking and checked on the
    open descriptor: opening a FIFO that has no writer waits forever (a review held every
    submission place that way), and a path checked first could be swapped before the open."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(path)
        if not stat.S_ISREG(mode):
            raise _NotAFile(path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class _NotAFile(OSError):
    """A path that names a FIFO, a device or a socket, not a file."""


class _NotNpy(ValueError):
    """A file that does not start as a ``.npy`` file does."""


def _read_npy_header(file: BinaryIO) -> tuple[tuple[int, ...], np.dtype[Any], bool]:
    if file.read(len(NPY_MAGIC)) != NPY_MAGIC:
        raise _NotNpy()
    file.seek(0)
    version = np.lib.format.read_magic(file)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(file)
    return np.lib.format.read_array_header_2_0(file)


@contextlib.contextmanager
def _npy_errors(path: Path, name: str) -> Iterator[None]:
    """Turn what opening and reading ``path`` raises into one clear ValueError line."""
    try:
        yield
    except FileNotFoundError:
        raise ValueError(f"{name} {path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{name} {path} is a directory, not a .npy file") from None
    except _NotAFile:
        raise ValueError(f"{name} {path} is not a regular file (a FIFO, a device?)") from None
    except _NotNpy:
        raise ValueError(f"{name} {path} is not a .npy array file") from None
    except OSError as exc:
        raise ValueError(f"{name} {path}: cannot read it: {exc.strerror or exc}") from None
    except ValueError as exc:
        if str(exc).startswith(name):
            raise
        raise ValueError(f"{name} {path} is not a valid .npy array file: {exc}") from None


def _checked_header(
    header: tuple[tuple[int, ...], np.dtype[Any], bool], path: Path, name: str
) -> tuple[tuple[int, ...], np.dtype[Any]]:
    shape, _fortran, dtype = header
    if dtype.hasobject or dtype.kind not in "biuf":
        raise ValueError(f"{name} {path} holds {dtype} values, not numbers")
    return shape, dtype


def npy_header(path: str | Path, name: str = "file") -> tuple[tuple[int, ...], np.dtype[Any]]:
    """The shape and dtype of the ``.npy`` array file ``path``, read from its header only;
    ValueError with one clear line (naming ``name``, e.g. ``a``) if it is missing, not a
    regular file, not a ``.npy`` array file (a text file, an ``.npz`` archive, pickled
    objects) or not numeric."""
    path = Path(path).expanduser()
    with _npy_errors(path, name), _open_regular(path) as file:
        header = _read_npy_header(file)
        shape, dtype = _checked_header(header, path, name)
        needed = file.tell() + math.prod(shape) * dtype.itemsize
        size = os.fstat(file.fileno()).st_size
    if size < needed:
        raise ValueError(
            f"{name} {path} is cut short: {size} bytes, where its header needs {needed}"
        )
    return shape, dtype


def load_npy(
    path: str | Path,
    name: str = "file",
    expect: tuple[tuple[int, ...], np.dtype[Any]] | None = None,
) -> np.ndarray:
    """The array in the ``.npy`` file ``path`` (ValueError with one clear line otherwise; see
    :func:`npy_header`). Pickled data is never loaded. ``expect``: the shape and dtype the
    caller read from the header and checked before; a file whose header says otherwise now
    (changed meanwhile) is refused before its data is read."""
    path = Path(path).expanduser()
    with _npy_errors(path, name), _open_regular(path) as file:
        found = _checked_header(_read_npy_header(file), path, name)
        if expect is not None and (tuple(found[0]), found[1]) != (tuple(expect[0]), expect[1]):
            raise ValueError(f"{name} {path} changed while it was being read")
        file.seek(0)
        try:
            return np.load(file, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:  # truncated, changed meanwhile
            raise ValueError(f"{name} {path} is not a readable .npy array file: {exc}") from None


def check_out_path(out: Any) -> Path:
    """The ``out`` path of a job if its result can be written there (ValueError otherwise): a
    non-empty string, not a directory, in an existing directory where this process can create
    a file (tried: a temporary file is created and removed, since permission bits do not tell
    for root, read-only mounts or ``/proc``). Checked at submission, so that a typo fails at
    once rather than after the job is paid for; the save itself is still guarded (the
    directory may go away meanwhile)."""
    if not isinstance(out, str) or not out:
        raise ValueError("out must be a non-empty path")
    path = Path(out).expanduser()
    if path.is_dir():
        raise ValueError(f"out {out!r} is a directory")
    if path.exists() and not path.is_file():
        # A FIFO would block the save forever (a new user's job hung there, holding its
        # place and the node's shutdown); a device is not where a result goes.
        raise ValueError(f"out {out!r} is not a regular file (a FIFO, a device?)")
    parent = path.parent
    if not parent.is_dir():
        raise ValueError(f"out {out!r}: directory {str(parent)!r} does not exist")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"out {out!r}: the file exists and is not writable")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".probe")
    except OSError as exc:
        raise ValueError(
            f"out {out!r}: directory {str(parent)!r} is not writable ({exc.strerror or exc})"
        ) from None
    os.close(fd)
    os.unlink(probe)
    return path


def save_npy(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` to exactly ``path`` (``np.save`` given a name appends ``.npy``): into a
    new file beside it, renamed over it once complete, so that a reader never sees half a
    result and ``path`` itself is never opened (whatever it has become since it was
    checked: a FIFO there would block an open for writing forever). The partial files of
    earlier saves to ``path`` whose process is gone (killed mid-save) are removed first."""
    path = Path(path)
    _remove_abandoned_parts(path)
    for attempt in itertools.count():
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{attempt}.part")
        try:
            # Created with the usual mode (0666 less the umask), as open(path, "wb") would.
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            continue
        # Held while the file is written (the kernel drops it if this process dies): what
        # tells another save's clean-up that this file is not abandoned, whatever PID
        # namespace or host it runs in. A file system without locks: no lock, and no
        # clean-up there either (its flock fails the same way).
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        break
    try:
        with os.fdopen(fd, "wb") as file:
            np.save(file, array, allow_pickle=False)
            file.flush()
            # Renamed while still open, so still locked: a save stalled between its last
            # write and the rename (stopped, swapped out) is never taken for abandoned.
            os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


#: A partial file younger than this is never taken for abandoned (its save may have only
#: just created it, not yet locked it).
ABANDONED_PART_AGE_S = 10.0
#: Partial files of one output looked at per save, at most.
MAX_PARTS_EXAMINED = 1000
_PART_SUFFIX = re.compile(r"\.[0-9]{1,10}\.[0-9]{1,6}\.part")


def _remove_abandoned_parts(path: Path) -> None:
    """Remove ``.NAME.PID.N.part`` files beside ``path`` (what :func:`save_npy` writes) that
    no save is writing: a node killed mid-save leaves one, and the next save to the same path
    is where a user would notice it. A file goes only if it is a regular file of this user,
    older than :data:`ABANDONED_PART_AGE_S`, and not locked (a save holds its file locked
    until it is renamed, in any process, container or host that shares the directory). Best
    effort: nothing here can fail the save."""
    prefix = f".{path.name}"
    examined = 0
    try:
        with os.scandir(path.parent) as entries:
            for entry in entries:
                name = entry.name
                if not (name.startswith(prefix) and _PART_SUFFIX.fullmatch(name, len(prefix))):
                    continue
                examined += 1
                if examined > MAX_PARTS_EXAMINED:
                    break
                _remove_if_abandoned(entry.path)
    except Exception as exc:  # a clean-up never costs the result its save
        log.debug("clean-up of partial files beside %s stopped: %s", path, exc)


def _remove_if_abandoned(part: str) -> None:
    """Unlink ``part`` if it is abandoned (see :func:`_remove_abandoned_parts`)."""
    try:
        fd = os.open(part, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return  # a link, gone meanwhile, or not ours to read
    try:
        info = os.fstat(fd)
        if (
            not stat.S_ISREG(info.st_mode)
            or info.st_uid != os.geteuid()
            or time.time() - info.st_mtime < ABANDONED_PART_AGE_S
        ):
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return  # a save holds it
        # Still the same file under that name (not swapped since it was opened).
        now = os.stat(part, follow_symlinks=False)
        if (now.st_dev, now.st_ino) == (info.st_dev, info.st_ino):
            os.unlink(part)
    finally:
        os.close(fd)


class JobNumbersUnavailable(RuntimeError):
    """No job number could be reserved on disk (the data directory's fault: answered 503)."""


class JobIds:
    """Job numbers that never repeat on one data directory, across restarts and crashes.

    ``mtor-peer jobs --cancel job-N`` names a job by number; numbers that started again at 1
    with each run would let an ID read before a restart cancel another job after it. The
    file ``path`` holds the first number not yet reserved; numbers are reserved
    :data:`JOB_ID_BLOCK` at a time, and each reservation is on disk (fsynced, renamed into
    place) before any of its numbers is handed out. A node that stops cleanly gives back the
    numbers it did not use (:meth:`release`), so the next run goes on from its last job; one
    that crashes skips them. ``path`` None: numbers from 1, kept in memory (tests, the
    simulator). The file is read here, once (a few bytes, as the node opens).
    """

    def __init__(self, path: Path | None = None) -> None:
        #: The file (None: in memory).
        self.path = path
        self._next = 1 if path is None else _read_next_job_number(path)
        #: The number of this run's first job (numbers below it are earlier runs').
        self.first = self._next
        self._reserved_to = self._next if path is not None else math.inf

    @property
    def next_number(self) -> int:
        """The number the next job will get."""
        return self._next

    def needs_reserve(self) -> bool:
        """Whether :meth:`take` must be preceded by :meth:`reserve` (file I/O, blocking)."""
        return self._next >= self._reserved_to

    def reserve(self) -> None:
        """Reserve the next block of numbers on disk (blocking: run it on a thread)."""
        assert self.path is not None
        end = self._next + JOB_ID_BLOCK
        write_private(self.path, f"{end}\n", durable=True)
        self._reserved_to = end

    def take(self) -> str:
        """The next job ID (``job-N``); only once :meth:`needs_reserve` is False."""
        if self.needs_reserve():
            raise RuntimeError("no job numbers reserved")
        if self._next >= MAX_JOB_NUMBER:  # what 'jobs --cancel' could not name
            raise JobNumbersUnavailable(
                f"job numbers in {self.path} have reached {MAX_JOB_NUMBER}: move the file "
                "away to start again (from the time in tenths of a second)"
            )
        number = self._next
        self._next += 1
        return f"job-{number}"

    def release(self) -> None:
        """Give back the reserved numbers not used (blocking; at a clean stop, once no job
        can be submitted any more): the file then names the next unused number."""
        if self.path is not None and self._reserved_to > self._next:
            write_private(self.path, f"{self._next}\n", durable=True)
            self._reserved_to = self._next


#: Job numbers stay below this (``jobs --cancel`` takes at most 12 digits).
MAX_JOB_NUMBER = 10**12 - 2 * JOB_ID_BLOCK


def _read_next_job_number(path: Path) -> int:
    """The number stored in ``path``; 1 if there is no file. A file that cannot be read or
    does not hold a number (a FIFO or a device there is not read) is reported, and numbers
    go on from the current time in tenths of a second, above any this directory can have
    given out."""
    try:
        with _open_regular(path) as file:  # a FIFO or a device is refused, not read
            text = file.read(32)
    except FileNotFoundError:
        return 1
    except _NotAFile:
        return _job_numbers_from_the_clock(path, "not a regular file")
    except OSError as exc:  # a directory, unreadable
        return _job_numbers_from_the_clock(path, str(exc) or type(exc).__name__)
    value = text.strip()
    if value.isdigit() and value.isascii() and 0 < int(value) < MAX_JOB_NUMBER:
        return int(value)
    return _job_numbers_from_the_clock(path, "no job number in it")


def _job_numbers_from_the_clock(path: Path, why: str) -> int:
    # The wall clock only here: a number no earlier run can have reached (that would take
    # ten jobs a second since 1970), so that IDs still do not repeat. Not proof against a
    # clock set back between two such failures of the file.
    number = min(max(1, int(time.time() * 10)), MAX_JOB_NUMBER - 1)
    log.warning(
        "cannot use %s (%s): job IDs go on from job-%d (the time in tenths of a second), "
        "so that none repeats; the file is replaced at the next job",
        path,
        why,
        number,
    )
    return number


class JobBoard:
    """Runs API-submitted jobs in the background and remembers the last few."""

    def __init__(
        self,
        submit: Callable[..., Awaitable[JobResult]],
        runtime: Runtime,
        settled: Callable[[], Awaitable[None]] | None = None,
        ids: JobIds | None = None,
    ) -> None:
        # ``submit`` is the node's job entry point (``Node.submit``): the board runs jobs, it
        # does not know how. ``settled`` (``Scheduler.settled``) returns once the receipts
        # countersigned so far are stored and in the ledger. ``ids``: where job numbers come
        # from (a node's are kept in its data directory, so they never repeat).
        self._submit = submit
        self._runtime = runtime
        self._settled = settled
        self._jobs: OrderedDict[str, JobState] = OrderedDict()
        self._ids = ids or JobIds()
        self._ids_lock = trio.Lock()
        #: Jobs admitted and not ended: counted from before their operands are read (the
        #: reading awaits, so concurrent submissions cannot all pass one check) to their end.
        self._admitted = 0
        #: Of those, the submissions still reading or making their operands (no job yet).
        self._reading = 0
        self.nursery: trio.Nursery | None = None

    async def route_submit(self, query: dict[str, str], body: Any) -> tuple[int, Any]:
        """``POST /v1/jobs``."""
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
        kernel = kernel_inputs(body.get("kernel", "matmul")).kernel
        verify = body.get("verify", "auto")
        max_price = body.get("max_price")
        shards = body.get("shards")
        if max_price is not None and (
            isinstance(max_price, bool)
            or not isinstance(max_price, int | float)
            or not 0 <= max_price < float("inf")
        ):
            raise ValueError("max_price must be a number, 0 or more")
        if shards is not None:
            shards = _positive_int(body, "shards", 4096)
        if self._admitted >= MAX_RUNNING_JOBS:
            return 429, {
                "error": f"{MAX_RUNNING_JOBS} jobs are running or having their operands read "
                "already: wait for one to end ('mtor-peer jobs' lists them), or cancel one "
                "('mtor-peer jobs --cancel ID', or Ctrl-C on its submit), then submit again"
            }
        self._admitted += 1
        self._reading += 1
        job_id: str | None = None
        try:
            job_id = await self._admit(kernel, body, verify, max_price, shards)
        except JobNumbersUnavailable as exc:  # the node's fault, not the request's
            return 503, {"error": str(exc)}
        finally:
            self._reading -= 1
            if job_id is None:  # refused or failed before the job started: not running
                self._admitted -= 1
        return 200, {"id": job_id}

    async def _next_id(self) -> str:
        """A job ID never used on this data directory (a reservation on disk, on a thread,
        once every :data:`JOB_ID_BLOCK` jobs)."""
        async with self._ids_lock:
            if self._ids.needs_reserve():
                try:
                    await self._runtime.run_blocking(self._ids.reserve)
                except OSError as exc:
                    raise JobNumbersUnavailable(
                        f"cannot reserve job numbers in {self._ids.path}: {exc}"
                    ) from exc
            return self._ids.take()

    async def _admit(
        self,
        kernel: str,
        body: dict[str, Any],
        verify: Any,
        max_price: float | None,
        shards: int | None,
    ) -> str:
        """Read or make the operands, check them, and start the job; its ID. The job's task
        gives back its admission when it ends (nothing here may fail once it is started)."""
        out = body.get("out")
        if out is not None:
            out = str(await self._runtime.run_blocking(check_out_path, out))
        operands = await self._runtime.run_blocking(load_operands, body)
        # Taken before the check below: a reservation on disk (a thread) is not interrupted
        # either, and a number taken for a job that then does not start is only skipped.
        job_id = await self._next_id()
        # A read on a thread cannot be interrupted: a request that timed out meanwhile (the
        # control server's deadline) starts no job its client was told nothing of (a review:
        # the client saw "does not answer" while the job ran, and a retry ran it twice).
        await trio.lowlevel.checkpoint_if_cancelled()
        # Refused here, with the kernel's one line (a shape mismatch between files), rather
        # than as a job that fails.
        get_kernel(kernel).check_operands(operands)
        sizes = KERNEL_INPUTS[kernel].sizes_of({n: a.shape for n, a in operands.items()})
        request = {
            "kernel": kernel,
            "shape": list(sizes.values()),
            "sizes": sizes,
            "dtype": str(next(iter(operands.values())).dtype),
        }
        # "auto" is named by the check it stands for, as the finished job's result names it
        # (a new user saw "verify auto" while a job ran and "verify freivalds" once it ended).
        check = get_kernel(kernel).check if verify == "auto" else verify
        job = JobState(id=job_id, request=request | {"verify": verify, "verification": check})
        assert self.nursery is not None
        self.nursery.start_soon(self._run, job, kernel, operands, verify, max_price, shards, out)
        self._jobs[job.id] = job
        self._forget_old_jobs()
        return job.id

    def _forget_old_jobs(self) -> None:
        # Ended jobs go first, oldest first; running ones stay (at most MAX_RUNNING_JOBS of
        # them), so that a long job stays in the list, and cancellable, behind many short ones.
        excess = len(self._jobs) - MAX_REMEMBERED_JOBS
        for job_id in [i for i, j in self._jobs.items() if j.state != "running"][: max(0, excess)]:
            del self._jobs[job_id]
        for old in list(self._jobs.values())[:-MAX_JOBS_WITH_SHARDS]:
            old.drop_shards()

    def get(self, job_id: str) -> JobState | None:
        """The remembered job ``job_id``, if any."""
        return self._jobs.get(job_id)

    def jobs(self, limit: int = DEFAULT_LISTED_JOBS) -> list[JobState]:
        """The last ``limit`` jobs, newest first."""
        return list(reversed(self._jobs.values()))[:limit]

    async def route_status(self, query: dict[str, str], body: Any) -> tuple[int, Any]:
        """``GET /v1/jobs?id=...``, or without ``id`` the last ``limit`` jobs (newest
        first); ``shards=1``: with each job's accepted shards."""
        shards = query.get("shards", "") not in ("", "0", "false")
        if "id" not in query:
            limit = query.get("limit", str(DEFAULT_LISTED_JOBS))
            if not limit.isdigit() or not 1 <= int(limit) <= MAX_REMEMBERED_JOBS:
                raise ValueError(f"limit must be an integer in [1, {MAX_REMEMBERED_JOBS}]")
            jobs = self.jobs(int(limit))
            return 200, {
                "jobs": [j.to_json(shards=shards) for j in jobs],
                "remembered": len(self._jobs),
                "running": sum(1 for j in self._jobs.values() if j.state == "running"),
                # Submissions whose operands are still being read or made: they count
                # against MAX_RUNNING_JOBS too, and are not jobs yet.
                "reading": self._reading,
            }
        job = self._jobs.get(query["id"])
        if job is None:
            return 404, {"error": self._no_job(query["id"])}
        return 200, job.to_json(shards=shards)

    async def route_cancel(self, query: dict[str, str], body: Any) -> tuple[int, Any]:
        """``POST /v1/jobs/cancel {"id": ...}``: cancel a running job; answers the job once
        it has stopped (within :data:`CANCEL_WAIT_SECONDS`; its state says if it has not)."""
        job_id = body.get("id") if isinstance(body, dict) else None
        if not isinstance(job_id, str):
            raise ValueError('body must be {"id": "<job ID>"}')
        job = self._jobs.get(job_id)
        if job is None:
            return 404, {"error": self._no_job(job_id)}
        if not self.cancel(job):
            return 409, {"error": f"{job_id} is not running: it is {job.state}"}
        with trio.move_on_after(CANCEL_WAIT_SECONDS):
            await job.finished.wait()
        return 200, job.to_json()

    def _no_job(self, job_id: str) -> str:
        """Why ``job_id`` is not listed, as far as its number tells."""
        number = job_id.removeprefix("job-")
        if job_id.startswith("job-") and number.isdigit() and len(number) <= 18:
            if int(number) < self._ids.first:
                return (
                    f"no job {job_id!r} in this run of the node: it was submitted before the "
                    "node last started (a job ends with the node that ran it, and only this "
                    "run's jobs are listed)"
                )
            if int(number) < self._ids.next_number:
                return (
                    f"no job {job_id!r} any more: it ended and was forgotten (the node "
                    f"remembers its last {MAX_REMEMBERED_JOBS} jobs)"
                )
        return f"no job {job_id!r}"

    def close(self) -> None:
        """At a clean stop, once nothing can be submitted: give back the job numbers
        reserved and not used (blocking, a few bytes)."""
        self._ids.release()

    def cancel(self, job: JobState) -> bool:
        """Cancel ``job`` if it is running (False if it already ended)."""
        if job.state != "running":
            return False
        log.info("cancelling %s", job.id)
        job.scope.cancel()
        return True

    async def _run(
        self,
        job: JobState,
        kernel: str,
        operands: dict[str, np.ndarray],
        verify: str,
        max_price: float | None,
        shards: int | None,
        out: str | None,
    ) -> None:
        def progress(done: int, total: int) -> None:
            job.done, job.total = done, total

        # The scheduler's tasks for this job inherit the variable: their attempts count here.
        token = _current_job.set(job)
        try:
            await self._run_job(job, kernel, operands, verify, max_price, shards, out, progress)
        finally:
            self._admitted -= 1
            _current_job.reset(token)
            if job.state == "running":  # the node stops under the job
                job.finish("cancelled", "the node stopped")
            job.finished.set()

    async def _run_job(
        self,
        job: JobState,
        kernel: str,
        operands: dict[str, np.ndarray],
        verify: str,
        max_price: float | None,
        shards: int | None,
        out: str | None,
        progress: Callable[[int, int], None],
    ) -> None:
        result: JobResult | None = None
        try:
            with job.scope:
                result = await self._submit(
                    kernel,
                    operands,
                    verify=verify,
                    max_price=max_price,
                    shards=shards,
                    progress=progress,
                )
        except (JobFailed, ValueError) as exc:
            if not job.scope.cancel_called:
                job.unverifiable = isinstance(exc, JobUnverifiable)
                job.finish("failed", str(exc))
                return
        except Exception as exc:  # a job's failure must not take the node down
            log.exception("job %s failed", job.id)
            job.finish("failed", f"{type(exc).__name__}: {exc}")
            return
        if result is None or job.scope.cancel_called:
            # Shards accepted before the cancel stay accepted: their receipts were
            # countersigned as they came and are settled (paid) like any other.
            job.finish("cancelled", "cancelled on request")
            log.info("%s cancelled: %d of %d shards were done", job.id, job.done, job.total)
            return
        job.result = result.summary()
        job.done = job.total = len(result.shards)
        if job.shards is not None:
            # The scheduler's own account replaces what the observer saw.
            job.shards = {
                s.index: (s.worker, round(s.seconds, 3), s.attempts)
                for s in result.shards
                if isinstance(s, ShardResult)
            }
        if out:
            try:
                await self._runtime.run_blocking(save_npy, out, result.output)
            except Exception as exc:  # a full disk, a removed directory: not the node's end
                # The job ran and was paid for; its summary stays, the result is not saved.
                log.warning("job %s: result not saved to %s: %s", job.id, out, exc)
                job.finish("failed", f"result not saved to {out}: {exc}")
                return
        if self._settled is not None:
            # Reported done once its receipts are stored and in the ledger (the batch is
            # settled at once, not after its 1 s wait for company): a user's `receipts` or
            # `balance` right after `submit` shows what the summary counted (a new user's
            # `receipts` lagged `submit` by about 1.4 s). Bounded: a slow disk delays the
            # report, it does not hold the job.
            with trio.move_on_after(SETTLED_WAIT):
                await self._settled()
        job.finish("done")
