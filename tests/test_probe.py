"""The capacity probe and benchmark cache.

This machine has no GPU and no NVIDIA driver, so the GPU branch runs against a stand-in
``pynvml`` module that answers as NVML does on a one-GPU machine; the no-driver branch runs
against the real nvidia-ml-py, which raises NVMLError here.
"""

from __future__ import annotations

import sys
import types

import pytest

from mtor_p2p.capacity import bench
from mtor_p2p.capacity.probe import probe_devices


class _Memory:
    total = 80 * 2**30
    free = 60 * 2**30


class _Utilization:
    gpu = 37


def fake_pynvml(*, fail_init: bool = False) -> types.ModuleType:
    module = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def nvml_init() -> None:
        if fail_init:
            raise NVMLError("Driver Not Loaded")

    module.NVMLError = NVMLError
    module.nvmlInit = nvml_init
    module.nvmlShutdown = lambda: None
    module.nvmlSystemGetDriverVersion = lambda: b"580.65"
    module.nvmlDeviceGetCount = lambda: 1
    module.nvmlDeviceGetHandleByIndex = lambda index: object()
    module.nvmlDeviceGetMemoryInfo = lambda handle: _Memory()
    module.nvmlDeviceGetUtilizationRates = lambda handle: _Utilization()
    module.nvmlDeviceGetCudaComputeCapability = lambda handle: (9, 0)
    module.nvmlDeviceGetName = lambda handle: b"NVIDIA H200"
    return module


def test_gpu_is_described_from_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    (gpu,) = probe_devices("auto")
    assert gpu.kind == "gpu"
    assert gpu.name == "NVIDIA H200"
    assert gpu.mem_total == 80 * 2**30 and gpu.mem_free == 60 * 2**30
    assert gpu.utilization == 37.0
    assert gpu.compute_capability == "9.0"
    assert gpu.driver == "580.65"


def test_gpu_none_skips_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    (cpu,) = probe_devices("none")
    assert cpu.kind == "cpu" and cpu.cores and cpu.mem_total > 0


def test_no_driver_falls_back_to_the_cpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(fail_init=True))
    assert [d.kind for d in probe_devices("auto")] == ["cpu"]


def test_real_nvml_without_a_driver_falls_back_to_the_cpu():
    # nvidia-ml-py is installed; with no driver on this machine nvmlInit raises NVMLError.
    assert [d.kind for d in probe_devices("auto")] == ["cpu"]


def test_probe_rejects_unknown_gpu_setting():
    with pytest.raises(ValueError):
        probe_devices("maybe")


def test_benchmark_is_cached_in_the_data_directory(tmp_path, monkeypatch):
    calls = []
    real = bench.bench_numpy

    def counting(*args: object, **kwargs: object) -> bench.BenchResult:
        calls.append(1)
        return real(n=128, repeats=1)

    monkeypatch.setattr(bench, "bench_numpy", counting)
    devices = probe_devices("none")
    first = bench.measure_tflops(devices, tmp_path)
    second = bench.measure_tflops(devices, tmp_path)
    assert first == second > 0
    assert len(calls) == 1
    assert (tmp_path / bench.CACHE_FILE_NAME).exists()
    bench.measure_tflops(devices, tmp_path, refresh=True)
    assert len(calls) == 2
