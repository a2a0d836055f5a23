"""Find the compute devices this node lends: the GPU its kernels run on, else the CPU.

A GPU is advertised only if the kernels' CuPy backend can compute on it
(:func:`mtor_kernels.gpu_status`): NVML alone would advertise cards that CuPy cannot use (not
installed, wrong CUDA, driver too old), and a record claiming "gpu" with NumPy's TFLOP/s. The
backend computes on CUDA device 0 of this process, which ``CUDA_VISIBLE_DEVICES`` chooses; NVML
ignores that variable and numbers every card, so the probe finds the backend's card in NVML by
its PCI bus id and advertises that one only. NVML adds what CuPy does not know (utilisation, the
driver version); without NVML the record still describes the card from CUDA.

``gpu="none"`` lends only the CPU (the worker then computes with NumPy too). When no GPU is
usable the reason is logged once at WARNING, so a node at the default level says why.
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import psutil

from mtor_kernels.backend import GpuStatus, gpu_status, report_cpu_fallback
from mtor_p2p.capacity.record import Device

log = logging.getLogger(__name__)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def pci_bus_key(bus_id: str) -> tuple[int, int, int, int] | None:
    """``(domain, bus, device, function)`` of a PCI bus id in CUDA's ("0000:3B:00.0") or
    NVML's ("00000000:3B:00.0") spelling; None if it does not parse."""
    try:
        domain, bus, rest = bus_id.strip().split(":")
        device, function = rest.split(".")
        return int(domain, 16), int(bus, 16), int(device, 16), int(function, 16)
    except ValueError:
        return None


@dataclass(frozen=True)
class NvmlGpu:
    """What NVML says about one physical card."""

    index: int
    name: str
    pci_bus_id: str
    mem_total: int
    mem_free: int
    utilization: float | None
    compute_capability: str
    driver: str


def nvml_gpus() -> list[NvmlGpu]:
    """Every card NVML sees (all of them, whatever ``CUDA_VISIBLE_DEVICES`` says); empty when
    there is no NVML library, driver or device."""
    try:
        import pynvml
    except ImportError:  # nvidia-ml-py is a dependency, but keep the probe total
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        log.debug("NVML unavailable: %s", exc)
        return []
    found: list[NvmlGpu] = []
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                utilization: float | None = float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except pynvml.NVMLError:
                utilization = None
            try:
                bus_id = _text(pynvml.nvmlDeviceGetPciInfo(handle).busId)
            except pynvml.NVMLError:
                bus_id = ""
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            found.append(
                NvmlGpu(
                    index=index,
                    name=_text(pynvml.nvmlDeviceGetName(handle))[:128],
                    pci_bus_id=bus_id,
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
    return found


def probe_gpus() -> list[Device]:
    """The GPU the kernels' backend computes on (at most one), described by CUDA and NVML;
    an empty list, with the reason logged, when there is none it can use."""
    status = gpu_status()
    seen = nvml_gpus()
    if not status.usable:
        detail = ""
        if seen:
            names = ", ".join(sorted({g.name for g in seen}))
            detail = f"NVML sees {len(seen)} GPU(s) ({names}) but the CuPy backend cannot use them"
        report_cpu_fallback(status.reason, detail)
        return []
    return [_describe(status, seen)]


def _describe(status: GpuStatus, seen: list[NvmlGpu]) -> Device:
    key = pci_bus_key(status.pci_bus_id)
    match = next((g for g in seen if key is not None and pci_bus_key(g.pci_bus_id) == key), None)
    if seen and match is None:
        log.info(
            "CUDA device %s (%s) is not among the %d card(s) NVML lists: described from CUDA",
            status.pci_bus_id,
            status.name,
            len(seen),
        )
    version = status.cuda_driver_version
    return Device(
        kind="gpu",
        name=status.name[:128],
        # Memory as CUDA reports it for this process's device: what the backend can use.
        mem_total=status.mem_total,
        mem_free=status.mem_free,
        utilization=match.utilization if match else None,
        compute_capability=status.compute_capability,
        driver=match.driver if match else f"CUDA {version // 1000}.{version % 1000 // 10}",
    )


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
    """The backend's GPU when ``gpu`` is ``"auto"`` and it is usable, else the CPU alone."""
    if gpu not in ("auto", "none"):
        raise ValueError("gpu must be 'auto' or 'none'")
    gpus = probe_gpus() if gpu == "auto" else []
    return gpus or [probe_cpu()]
