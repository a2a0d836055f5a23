"""What every benchmark records about the machine it ran on."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def _cpuinfo_fields(text: str) -> dict[str, str]:
    """The first processor's fields of ``/proc/cpuinfo``."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the end of the first processor's block
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def _seconds_since_boot() -> float | None:
    try:
        return round(float(Path("/proc/uptime").read_text().split()[0]), 1)
    except (OSError, ValueError, IndexError):
        return None


def machine() -> dict[str, Any]:
    """CPU model, core count, Python version and the load when the run started.

    The project's VMs all report "AMD EPYC" as their model name while being different CPUs
    (a Zen 3 without AVX-512, a Zen 4 with it), so the family, model and AVX-512 flag are
    recorded too. The time since boot is there because a freshly booted VM runs large-memory
    rows slower: its host backs guest memory on first touch (BENCHMARKS.md, the
    hundred-and-third sitting)."""
    info: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        info = _cpuinfo_fields(cpuinfo.read_text())
    return {
        "cpu": info.get("model name", "unknown"),
        "cpu_family": info.get("cpu family"),
        "cpu_model": info.get("model"),
        "avx512": "avx512f" in info.get("flags", "").split(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg(),
        "seconds_since_boot": _seconds_since_boot(),
    }


def describe(record: dict[str, Any]) -> str:
    """One line for a benchmark's log: which CPU, how many cores, how long since boot."""
    cpu = str(record.get("cpu", "unknown"))
    if record.get("cpu_family") is not None:
        cpu += f" (family {record['cpu_family']} model {record.get('cpu_model')}"
        cpu += ", AVX-512)" if record.get("avx512") else ", no AVX-512)"
    line = f"{cpu}, {record.get('cores')} cores"
    booted = record.get("seconds_since_boot")
    if booted is not None:
        line += f", booted {booted / 60:.0f} min ago"
    return line
