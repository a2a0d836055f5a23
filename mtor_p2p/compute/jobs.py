"""Jobs submitted through the control API: started in the node's nursery, polled by the CLI.

``POST /v1/jobs`` takes ``{"kernel": "matmul", "m", "n", "k", "dtype", "verify", "max_price",
"shards", "seed"}`` (random operands) or ``{"a": path, "b": path, "out": path}`` (``.npy``
files on this machine; the API is local), starts the job and answers ``{"id": ...}``.
``GET /v1/jobs?id=...`` answers its state, progress and, once done, its summary.
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio

from mtor_p2p.compute.scheduler import JobFailed, JobResult
from mtor_p2p.runtime import Runtime

log = logging.getLogger(__name__)

MAX_REMEMBERED_JOBS = 100
MAX_RANDOM_ELEMENTS = 1 << 26  # per operand, for jobs on random inputs
DTYPES = ("float32", "float16")


@dataclass
class JobState:
    """What the control API reports about one submitted job."""

    id: str
    state: str = "running"  # running, done, failed
    done: int = 0
    total: int = 0
    result: dict[str, Any] | None = None
    error: str | None = None
    started: float = field(default_factory=trio.current_time)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "id": self.id,
            "state": self.state,
            "done": self.done,
            "total": self.total,
            "elapsed_s": round(trio.current_time() - self.started, 3),
            "result": self.result,
            "error": self.error,
        }


def _positive_int(body: dict[str, Any], name: str, limit: int = 1 << 20) -> int:
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
        raise ValueError(f"{name} must be an integer in [1, {limit}]")
    return value


def load_matmul_operands(body: dict[str, Any]) -> dict[str, np.ndarray]:
    """Operands from ``.npy`` paths, or random ones of the requested shape and dtype."""
    if "a" in body or "b" in body:
        if not (isinstance(body.get("a"), str) and isinstance(body.get("b"), str)):
            raise ValueError("a and b go together, as paths of .npy files")
        return {"a": load_npy(body["a"], "a"), "b": load_npy(body["b"], "b")}
    m, n, k = (_positive_int(body, name) for name in ("m", "n", "k"))
    dtype = body.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}")
    if max(m * k, k * n) > MAX_RANDOM_ELEMENTS:
        raise ValueError("operands too large for a random-input job")
    seed = body.get("seed")
    rng = np.random.default_rng(seed if isinstance(seed, int) else None)
    return {
        "a": rng.standard_normal((m, k), dtype=np.float32).astype(dtype),
        "b": rng.standard_normal((k, n), dtype=np.float32).astype(dtype),
    }


NPY_MAGIC = b"\x93NUMPY"


def npy_header(path: str | Path, name: str = "file") -> tuple[tuple[int, ...], np.dtype[Any]]:
    """The shape and dtype of the ``.npy`` array file ``path``, read from its header only;
    ValueError with one clear line (naming ``name``, e.g. ``a``) if it is missing, not a
    ``.npy`` array file (a text file, an ``.npz`` archive, pickled objects) or not numeric."""
    path = Path(path).expanduser()
    try:
        with open(path, "rb") as file:
            if file.read(len(NPY_MAGIC)) != NPY_MAGIC:
                raise ValueError(f"{name} {path} is not a .npy array file")
            file.seek(0)
            version = np.lib.format.read_magic(file)
            if version == (1, 0):
                shape, _fortran, dtype = np.lib.format.read_array_header_1_0(file)
            else:
                shape, _fortran, dtype = np.lib.format.read_array_header_2_0(file)
    except FileNotFoundError:
        raise ValueError(f"{name} {path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{name} {path} is a directory, not a .npy file") from None
    except OSError as exc:
        raise ValueError(f"{name} {path}: cannot read it: {exc.strerror or exc}") from None
    except ValueError as exc:
        if str(exc).startswith(name):
            raise
        raise ValueError(f"{name} {path} is not a valid .npy array file: {exc}") from None
    if dtype.hasobject or dtype.kind not in "biuf":
        raise ValueError(f"{name} {path} holds {dtype} values, not numbers")
    return shape, dtype


def load_npy(path: str | Path, name: str = "file") -> np.ndarray:
    """The array in the ``.npy`` file ``path`` (ValueError with one clear line otherwise; see
    :func:`npy_header`). Pickled data is never loaded."""
    npy_header(path, name)
    try:
        return np.load(Path(path).expanduser(), allow_pickle=False)
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
    """Write ``array`` to exactly ``path`` (``np.save`` given a name appends ``.npy``)."""
    with open(path, "wb") as file:
        np.save(file, array, allow_pickle=False)


class JobBoard:
    """Runs API-submitted jobs in the background and remembers the last few."""

    def __init__(self, submit: Callable[..., Awaitable[JobResult]], runtime: Runtime) -> None:
        # ``submit`` is the node's job entry point (``Node.submit``): the board runs jobs, it
        # does not know how.
        self._submit = submit
        self._runtime = runtime
        self._jobs: OrderedDict[str, JobState] = OrderedDict()
        self._ids = itertools.count(1)
        self.nursery: trio.Nursery | None = None

    async def route_submit(self, query: dict[str, str], body: Any) -> tuple[int, Any]:
        """``POST /v1/jobs``."""
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
        kernel = body.get("kernel", "matmul")
        if kernel != "matmul":
            raise ValueError("the control API submits matmul jobs; use the library for others")
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
        out = body.get("out")
        if out is not None:
            out = str(await self._runtime.run_blocking(check_out_path, out))
        operands = await self._runtime.run_blocking(load_matmul_operands, body)
        job = JobState(id=f"job-{next(self._ids)}")
        self._jobs[job.id] = job
        while len(self._jobs) > MAX_REMEMBERED_JOBS:
            self._jobs.popitem(last=False)
        assert self.nursery is not None
        self.nursery.start_soon(self._run, job, kernel, operands, verify, max_price, shards, out)
        return 200, {"id": job.id}

    async def route_status(self, query: dict[str, str], body: Any) -> tuple[int, Any]:
        """``GET /v1/jobs?id=...`` (without ``id``: every remembered job)."""
        if "id" not in query:
            return 200, {"jobs": [j.to_json() for j in self._jobs.values()]}
        job = self._jobs.get(query["id"])
        if job is None:
            return 404, {"error": f"no job {query['id']!r}"}
        return 200, job.to_json()

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

        try:
            result = await self._submit(
                kernel,
                operands,
                verify=verify,
                max_price=max_price,
                shards=shards,
                progress=progress,
            )
        except (JobFailed, ValueError) as exc:
            job.state, job.error = "failed", str(exc)
            return
        except Exception as exc:  # a job's failure must not take the node down
            log.exception("job %s failed", job.id)
            job.state, job.error = "failed", f"{type(exc).__name__}: {exc}"
            return
        job.result = result.summary()
        job.done = job.total = len(result.shards)
        if out:
            try:
                await self._runtime.run_blocking(save_npy, out, result.output)
            except Exception as exc:  # a full disk, a removed directory: not the node's end
                # The job ran and was paid for; its summary stays, the result is not saved.
                log.warning("job %s: result not saved to %s: %s", job.id, out, exc)
                job.state, job.error = "failed", f"result not saved to {out}: {exc}"
                return
        job.state = "done"
