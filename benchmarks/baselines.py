"""Ray and Dask for the compute benchmark: installed on first use, run as subprocesses.

Each baseline lives in its own virtual environment under ``$MTOR_BASELINES_WORK`` (default
``~/.cache/mtor/baselines``), created with the same pip commands as
``../shared/baselines/run_all.sh`` (NumPy, psutil, threadpoolctl, then ``ray`` or
``dask distributed``). A baseline session is one run of ``benchmarks/baseline_side.py`` in that
environment: it starts its own cluster, measures, stops it and prints one JSON object.

``python -m benchmarks.baselines`` installs both and prints their versions.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SIDE_SCRIPT = HERE / "baseline_side.py"
#: pip arguments after the common ones, per baseline (as in ../shared/baselines/run_all.sh).
PACKAGES = {"ray": ["ray"], "dask": ["dask", "distributed"]}
COMMON_PACKAGES = ["numpy", "psutil", "threadpoolctl"]
INSTALL_TIMEOUT_S = 1200
#: BLAS variables that pin a process to one BLAS thread, whatever BLAS NumPy ships with.
BLAS_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


def blas_env(threads: int) -> dict[str, str]:
    """Environment variables that give a process ``threads`` BLAS threads."""
    return {name: str(threads) for name in BLAS_VARIABLES}


def work_dir() -> Path:
    """Where the baseline venvs, their temp files and logs live."""
    root = os.environ.get("MTOR_BASELINES_WORK") or "~/.cache/mtor/baselines"
    path = Path(root).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


class BaselineUnavailable(RuntimeError):
    """The baseline could not be installed; the message says why (and where the log is)."""


def _venv_python(name: str) -> Path:
    return work_dir() / f"venv-{name}" / "bin" / "python"


def ensure(name: str, *, log: Any = None) -> Path:
    """The Python of baseline ``name``'s venv, installing it first if needed.

    Raises :class:`BaselineUnavailable` if the install fails (no registry, no wheel for this
    Python, ...). Concurrent callers wait for one install.
    """
    if name not in PACKAGES:
        raise ValueError(f"unknown baseline {name!r}")
    work = work_dir()
    python = _venv_python(name)
    stamp = work / f"venv-{name}.installed"
    want = json.dumps({"common": COMMON_PACKAGES, "packages": PACKAGES[name]})
    if python.exists() and stamp.exists() and stamp.read_text() == want:
        return python
    install_log = work / f"install-{name}.log"
    with open(work / f"install-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if python.exists() and stamp.exists() and stamp.read_text() == want:
            return python
        if log:
            log(f"installing the {name} baseline into {python.parent.parent} (once; a few minutes)")
        steps = [
            [sys.executable, "-m", "venv", "--clear", str(python.parent.parent)],
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
             *COMMON_PACKAGES],
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
             *PACKAGES[name]],
        ]  # fmt: skip
        # A venv made from inside another venv must start from the base interpreter.
        base = getattr(sys, "_base_executable", sys.executable)
        steps[0][0] = base
        with open(install_log, "w") as out:
            for step in steps:
                try:
                    done = subprocess.run(
                        step, stdout=out, stderr=subprocess.STDOUT, timeout=INSTALL_TIMEOUT_S,
                        check=False, stdin=subprocess.DEVNULL,
                    )  # fmt: skip
                except (OSError, subprocess.TimeoutExpired) as exc:
                    raise BaselineUnavailable(f"{name}: {' '.join(step[:4])}: {exc}") from exc
                if done.returncode != 0:
                    tail = install_log.read_text()[-400:].strip().replace("\n", " | ")
                    raise BaselineUnavailable(
                        f"{name}: `{' '.join(step[2:5])} ...` exited {done.returncode} "
                        f"(log {install_log}): {tail}"
                    )
        stamp.write_text(want)
    return python


def versions(name: str) -> dict[str, str]:
    """Package versions inside baseline ``name``'s venv."""
    python = ensure(name)
    modules = {"ray": ["ray", "numpy"], "dask": ["dask", "distributed", "numpy"]}[name]
    code = (
        "import importlib, json; print(json.dumps({m: importlib.import_module(m).__version__ "
        f"for m in {modules!r}}}))"
    )
    out = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_side(
    python: Path | str,
    system: str,
    task: str,
    params: dict[str, Any],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 900,
    log: Any = None,
) -> dict[str, Any]:
    """Run one session of ``baseline_side.py`` and return its JSON answer.

    Its progress lines (stderr) are passed to ``log``. Raises RuntimeError with the tail of
    its output if it fails or prints no JSON.
    """
    work = work_dir()
    (work / "tmp").mkdir(exist_ok=True)
    child_env = dict(os.environ)
    child_env.update(
        {
            "MTOR_BASELINES_WORK": str(work),
            "TMPDIR": str(work / "tmp"),
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
            # The bench's own process tree: CPU used outside it is "foreign" load.
            "MTOR_BENCH_ROOT_PID": os.environ.get("MTOR_BENCH_ROOT_PID", str(os.getpid())),
        }
    )
    # The project venv's variables must not leak into the baseline's interpreter.
    for key in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
        child_env.pop(key, None)
    child_env.update(env or {})
    command = [str(python), str(SIDE_SCRIPT), system, task, json.dumps(params)]
    with tempfile.TemporaryFile("w+") as stdout:
        process = subprocess.Popen(
            command,
            stdout=stdout,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=child_env,
            cwd=str(work),
            start_new_session=True,  # a timeout kills its whole cluster
        )
        lines: list[str] = []

        def pump() -> None:
            assert process.stderr is not None
            for line in process.stderr:
                lines.append(line.rstrip())
                if log and line.startswith("progress:"):
                    log(f"  {system}: {line[len('progress:') :].strip()}")

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            process.wait()
            raise RuntimeError(
                f"{system} {task} timed out after {timeout:.0f} s; last output: {lines[-5:]}"
            ) from None
        finally:
            reader.join(timeout=5)
            _kill_group(process)  # anything its cluster left behind
        stdout.seek(0)
        output = stdout.read()
    answer = None
    for line in reversed(output.strip().splitlines()):
        if line.startswith("{"):
            answer = json.loads(line)
            break
    if process.returncode != 0 or answer is None:
        raise RuntimeError(
            f"{system} {task} exited {process.returncode}; last output: "
            + " | ".join(lines[-8:])[-1500:]
        )
    return answer


def _kill_group(process: subprocess.Popen[str]) -> None:
    try:
        os.killpg(process.pid, 9)
    except (ProcessLookupError, PermissionError):
        pass


def main() -> int:
    status = 0
    for name in PACKAGES:
        try:
            print(name, versions(name))
        except BaselineUnavailable as exc:
            print(f"{name}: baseline unavailable: {exc}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
