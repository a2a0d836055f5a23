"""The capacity probe and benchmark cache.

The probe advertises a GPU only when the kernels' CuPy backend can compute on it, and then only
the card the backend uses. These tests pin both sides: NVML is a stand-in ``pynvml`` module
answering as NVML does, and CuPy is the stand-in of ``tests/gpu/cupy_standin.py`` (not a GPU),
so they mean the same on a machine with or without a driver. One test checks the real
environment, whatever it is, for consistency between the probe and the backend.
"""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mtor_kernels import backend as kernels_backend
from mtor_kernels import gpu_status
from mtor_p2p.capacity import bench
from mtor_p2p.capacity.probe import pci_bus_key, probe_devices
from mtor_p2p.clock import NetClock
from mtor_p2p.compute.receipt_store import ReceiptStore
from mtor_p2p.config import NodeConfig
from mtor_p2p.identity import Identity
from mtor_p2p.ledger.genesis import NANO, Genesis, LedgerParams
from mtor_p2p.ledger.store import Ledger
from mtor_p2p.memnet import LinkProfile, MemWorld
from mtor_p2p.node import Node
from tests.gpu.cupy_standin import CupyStandin, FakeGpu

H200 = FakeGpu(name="NVIDIA H200", pci_bus_id="0000:3B:00.0", mem_total=141 << 30)
L40S = FakeGpu(name="NVIDIA L40S", pci_bus_id="0000:86:00.0", major=8, minor=9, mem_total=45 << 30)


class _Memory:
    def __init__(self, total: int, free: int) -> None:
        self.total, self.free = total, free


def fake_pynvml(
    cards: tuple[tuple[str, str, int], ...] = (("NVIDIA H200", "00000000:3B:00.0", 37),),
    *,
    fail_init: bool = False,
) -> types.ModuleType:
    """A ``pynvml`` answering as NVML does; ``cards`` are (name, NVML bus id, utilisation %)."""
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
    module.nvmlDeviceGetCount = lambda: len(cards)
    module.nvmlDeviceGetHandleByIndex = lambda index: index
    module.nvmlDeviceGetMemoryInfo = lambda handle: _Memory(80 << 30, 60 << 30)
    module.nvmlDeviceGetUtilizationRates = lambda handle: types.SimpleNamespace(
        gpu=cards[handle][2]
    )
    module.nvmlDeviceGetPciInfo = lambda handle: types.SimpleNamespace(
        busId=cards[handle][1].encode()
    )
    module.nvmlDeviceGetCudaComputeCapability = lambda handle: (9, 0)
    module.nvmlDeviceGetName = lambda handle: cards[handle][0].encode()
    return module


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., CupyStandin]]:
    """Install a CuPy stand-in with the given cards (``CUDA_VISIBLE_DEVICES`` cleared)."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(kernels_backend, "_reported_fallbacks", set())
    installed: list[CupyStandin] = []

    def make(*gpus: FakeGpu, **kwargs: Any) -> CupyStandin:
        standin = CupyStandin(gpus, **kwargs).install(monkeypatch)
        installed.append(standin)
        return standin

    yield make
    for standin in installed:
        standin.uninstall()


def test_gpu_is_described_from_cuda_and_nvml(
    machine: Callable[..., CupyStandin], monkeypatch: pytest.MonkeyPatch
) -> None:
    machine(H200)
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    (gpu,) = probe_devices("auto")
    assert gpu.kind == "gpu"
    assert gpu.name == "NVIDIA H200"
    # Memory as CUDA reports it for the backend's device, not NVML's view of the card.
    assert gpu.mem_total == 141 << 30 and 0 < gpu.mem_free <= gpu.mem_total
    assert gpu.utilization == 37.0
    assert gpu.compute_capability == "9.0"
    assert gpu.driver == "580.65"


def test_only_the_backends_card_is_advertised(
    machine: Callable[..., CupyStandin], monkeypatch: pytest.MonkeyPatch
) -> None:
    machine(H200, L40S)
    cards = (("NVIDIA H200", "00000000:3B:00.0", 37), ("NVIDIA L40S", "00000000:86:00.0", 5))
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(cards))
    (gpu,) = probe_devices("auto")  # NVML sees two; the backend uses CUDA device 0
    assert (gpu.name, gpu.utilization) == ("NVIDIA H200", 37.0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # device 0 is now the L40S
    (gpu,) = probe_devices("auto")
    assert (gpu.name, gpu.utilization, gpu.compute_capability) == ("NVIDIA L40S", 5.0, "8.9")
    assert gpu.mem_total == 45 << 30


def test_nvml_without_usable_cupy_lends_the_cpu_and_says_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(kernels_backend, "_reported_fallbacks", set())
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    caplog.set_level(logging.WARNING)
    assert [d.kind for d in probe_devices("auto")] == ["cpu"]
    assert [d.kind for d in probe_devices("auto")] == ["cpu"]
    lines = [r.getMessage() for r in caplog.records if "no usable GPU" in r.getMessage()]
    assert len(lines) == 1  # once, at WARNING: visible at the default log level
    assert "NVML sees 1 GPU(s) (NVIDIA H200)" in lines[0] and "CuPy is not installed" in lines[0]


def test_cuda_without_nvml_still_describes_the_card(
    machine: Callable[..., CupyStandin], monkeypatch: pytest.MonkeyPatch
) -> None:
    machine(H200)
    monkeypatch.setitem(sys.modules, "pynvml", None)
    (gpu,) = probe_devices("auto")
    assert (gpu.kind, gpu.name, gpu.utilization, gpu.driver) == (
        "gpu",
        "NVIDIA H200",
        None,
        "CUDA 13.0",
    )


def test_gpu_none_skips_the_gpu(
    machine: Callable[..., CupyStandin], monkeypatch: pytest.MonkeyPatch
) -> None:
    machine(H200)
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    (cpu,) = probe_devices("none")
    assert cpu.kind == "cpu" and cpu.cores and cpu.mem_total > 0


def test_no_driver_falls_back_to_the_cpu(
    machine: Callable[..., CupyStandin], monkeypatch: pytest.MonkeyPatch
) -> None:
    machine(H200, driver_error=35)
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(fail_init=True))
    assert [d.kind for d in probe_devices("auto")] == ["cpu"]


def test_real_machine_probe_agrees_with_the_backend() -> None:
    # Whatever this machine has (driver or not, CuPy or not): a GPU in the record exactly when
    # the backend can compute on one, and never more than the one it uses.
    devices = probe_devices("auto")
    gpus = [d for d in devices if d.kind == "gpu"]
    assert len(gpus) == (1 if gpu_status().usable else 0)
    assert len(devices) == 1


def test_pci_bus_ids_in_both_spellings() -> None:
    assert pci_bus_key("0000:3b:00.0") == pci_bus_key("00000000:3B:00.0") == (0, 0x3B, 0, 0)
    assert pci_bus_key("garbage") is None


def test_probe_rejects_unknown_gpu_setting() -> None:
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


async def test_gpu_none_makes_the_worker_compute_with_numpy(
    machine: Callable[..., CupyStandin], tmp_path: Path
) -> None:
    machine(H200)  # a GPU the backend could use
    identities = [Identity.generate() for _ in range(2)]
    genesis = Genesis("mtor-probe", {i.peer_id: NANO for i in identities}, LedgerParams())
    world = MemWorld()
    for identity, gpu, expected in zip(
        identities, ("none", "auto"), ("numpy", "cupy"), strict=True
    ):
        node = Node(
            NodeConfig(data_dir=tmp_path / gpu, gpu=gpu),
            identity,
            world.add_peer(identity, LinkProfile("local")),
            NetClock(),
            Ledger(":memory:", genesis),
            receipts=ReceiptStore(Path(":memory:")),
        )
        assert node.worker.executor.name == expected
