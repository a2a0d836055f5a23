"""Find the compute devices of this machine: every GPU through NVML, else the CPU.

NVML is optional at run time: without a driver ``nvmlInit`` raises, and the probe falls back to
describing the CPU. ``gpu="none"`` skips NVML entirely (for operators who want to lend only CPU).
"""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path

import psutil

from mtor_p2p.capacity.record import Device

log = logging.getLogger(__name__)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def probe_gpus() -> list[Device]:
    """Every GPU NVML can see; an empty list when there is no driver or no device."""
    try:
        import pynvml
    except ImportError:  # nvidia-ml-py is a dependency, but keep the probe total
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        log.debug("NVML unavailable: %s", exc)
        return []
    devices: list[Device] = []
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                utilization: float | None = float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except pynvml.NVMLError:
                utilization = None
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            devices.append(
                Device(
                    kind="gpu",
                    name=_text(pynvml.nvmlDeviceGetName(handle))[:128],
                    mem_total=int(memory.total),
                    mem_free=int(memory.free),
                    utilization=utilization,
                    compute_capability=f"{major}.{minor}",
                    driver=driver[:64],
                )
            )
    except pynvml.NVMLError as exc:
        log.warning("NVML failed while listing GPUs: %s", exc)
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass
    return devices


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()[:128]
    return (platform.processor() or platform.machine() or "cpu")[:128]


def probe_cpu() -> Device:
    """The host CPU as a device."""
    memory = psutil.virtual_memory()
    try:
        utilization: float | None = min(100.0, max(0.0, float(psutil.cpu_percent(interval=None))))
    except OSError:
        utilization = None
    return Device(
        kind="cpu",
        name=cpu_name(),
        mem_total=int(memory.total),
        mem_free=int(memory.available),
        utilization=utilization,
        cores=os.cpu_count() or 1,
    )


def probe_devices(gpu: str = "auto") -> list[Device]:
    """GPUs when ``gpu`` is ``"auto"`` and NVML finds some, else the CPU alone."""
    if gpu not in ("auto", "none"):
        raise ValueError("gpu must be 'auto' or 'none'")
    gpus = probe_gpus() if gpu == "auto" else []
    return gpus or [probe_cpu()]
