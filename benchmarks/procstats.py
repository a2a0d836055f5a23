"""Load and memory readings shared by the harness and the baseline sides (stdlib only).

``Section`` brackets one timed measurement and records the load average at its start and end
and *foreign* CPU: cores used during it by processes outside this benchmark's process tree
(other users of a shared machine). The tree's root is ``$MTOR_BENCH_ROOT_PID`` (the harness
sets it for every process it starts), so a baseline measured in a subprocess counts the same
processes as foreign as the harness does. ``memory(pid)`` reads RSS and peak RSS (VmHWM).

This file is imported by ``baseline_side.py`` inside the Ray and Dask venvs: no third-party
imports, nothing from the project.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def root_pid() -> int:
    """The benchmark's root process: the harness (or this process if run alone)."""
    try:
        return int(os.environ.get("MTOR_BENCH_ROOT_PID", ""))
    except ValueError:
        return os.getpid()


def _busy_jiffies() -> int:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    return sum(values) - values[3] - values[4]  # less idle and iowait


def _stat_fields(pid: int | str) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name (field 3 of proc(5) first)."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return stat[stat.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process ``pid`` has used so far."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / _HZ


def _processes() -> dict[tuple[int, int], tuple[int, int]]:
    """(pid, start time) -> (utime + stime jiffies, ppid) for every process."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fields = _stat_fields(name)
            out[(int(name), int(fields[19]))] = (int(fields[11]) + int(fields[12]), int(fields[1]))
        except (OSError, ValueError, IndexError):
            pass
    return out


def _tree(snapshot: dict[tuple[int, int], tuple[int, int]], root: int) -> set[tuple[int, int]]:
    parent = {pid: ppid for (pid, _), (_, ppid) in snapshot.items()}
    mine = set()
    for key in snapshot:
        pid, hops = key[0], 0
        while pid and hops < 64:
            if pid == root:
                mine.add(key)
                break
            pid = parent.get(pid, 0)
            hops += 1
    return mine


def loadavg1() -> float:
    return round(os.getloadavg()[0], 2)


class Section:
    """``with Section() as s: ...``; then ``s.result`` = wall time, load and foreign cores."""

    def __init__(self) -> None:
        self.root = root_pid()
        self.result: dict[str, Any] = {}

    def __enter__(self) -> Section:
        self._load0 = loadavg1()
        self._procs0 = _processes()
        self._busy0 = _busy_jiffies()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = max(time.perf_counter() - self._t0, 1e-6)
        busy = (_busy_jiffies() - self._busy0) / _HZ
        procs1 = _processes()
        mine = _tree(self._procs0, self.root) | _tree(procs1, self.root)
        foreign = sum(
            jiffies - self._procs0.get(key, (0, 0))[0]
            for key, (jiffies, _) in procs1.items()
            if key not in mine
        )
        self.result = {
            "wall_s": round(wall, 3),
            "load1_start": self._load0,
            "load1_end": loadavg1(),
            "machine_busy_cores": round(busy / wall, 2),
            # Processes started and ended inside the section are missed; jiffies are 10 ms.
            "foreign_cores": round(max(0, foreign) / _HZ / wall, 2),
        }


def memory(pid: int) -> dict[str, Any]:
    """RSS now, peak RSS (VmHWM) and USS of ``pid``, MiB (the kernel's own counters)."""
    out: dict[str, Any] = {"pid": pid}
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError as exc:
        return {"pid": pid, "error": str(exc)}
    out["cmd"] = cmdline.strip()[:80]
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[{"VmRSS": "rss_mib", "VmHWM": "peak_rss_mib"}[key]] = round(
                int(value.split()[0]) / 1024, 1
            )
    try:  # USS: pages only this process maps (Ray's shared object store pages excluded)
        private = 0
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                private += int(line.split()[1])
        out["uss_mib"] = round(private / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return out


def descendants(pid: int | None = None) -> list[int]:
    """Every living descendant of ``pid`` (default: this process)."""
    snapshot = _processes()
    root = pid or os.getpid()
    return sorted(key[0] for key in _tree(snapshot, root) if key[0] != root)


def memory_summary(workers: list[int], others: list[int] | None = None) -> dict[str, Any]:
    """Per-worker idle RSS and peak RSS, and the RSS of the side's other processes."""
    readings = [memory(pid) for pid in workers]
    ok = [r for r in readings if "rss_mib" in r]
    extra = [memory(pid) for pid in (others or [])]
    extra_ok = [r for r in extra if "rss_mib" in r]
    return {
        "workers": readings,
        "worker_rss_mib_max": max((r["rss_mib"] for r in ok), default=None),
        "worker_peak_rss_mib_max": max((r.get("peak_rss_mib", 0) for r in ok), default=None),
        "other_processes": extra,
        "all_processes_rss_mib": round(
            sum(r["rss_mib"] for r in ok) + sum(r["rss_mib"] for r in extra_ok), 1
        ),
    }
