"""The GPU path measured: kernels against CuPy's own GEMM, shards against the pinned bus.

    python benchmarks/gpu_kernels.py [--json out.json] [--budget 240] [--quick]

One command, run from a checkout on a machine with a GPU (NumPy and CuPy are all it needs; it
loads ``kernels/`` from this checkout). Without a usable GPU it says why and exits 3.

Sections, in order of what the issue 9 goals need (each later one is skipped once ``--budget``
seconds are spent):

1. ``device``: the card (CUDA and NVML) and whether float32 TF32 had to be forced off;
2. ``correct``: every kernel and dtype on the CuPy backend against the NumPy reference
   (sampled rows within the honest bound, ``compare``, Freivalds for matmul);
3. ``bus``: pinned host->device and device->host bandwidth, both directions at once, and
   pageable uploads through the staging buffers (256 MiB each);
4. ``gemm``: the matmul kernel's ``forward`` against CuPy's own ``matmul`` of the same dtype
   (the ceiling) at n = 1024, 4096, 8192; goal at n = 4096: at least 0.9 of the ceiling;
5. ``shard_e2e``: a matmul shard from host operands to a host result (``Kernel.run``, as a
   worker runs it) at n = 4096, against the pinned-bus bound measured in section 3: goal at least
   0.5 of it, B resident, A pinned, rows pipelined; other cases beside it;
6. ``mlp_shard_e2e``, ``freivalds``, ``mlp`` / ``attention`` timing.

Every record is printed as it comes; at the end one JSON document ``{"summary": ...,
"records": [...]}`` goes to stdout (and to ``--json``). Exit status: 0, 1 if a correctness
check failed, 3 without a usable GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ANCHORS = REPO.parent / "shared" / "data" / "gpu-anchors-h100.jsonl"
EXIT_NO_GPU = 3
GEMM_GOAL = 0.9
SHARD_GOAL = 0.5
#: The size of the upload chunks a worker receives (mtor_p2p.compute.protocol.CHUNK_BYTES;
#: not imported: this script needs no peer installed).
WIRE_CHUNK_BYTES = 4 << 20


def load_kernels() -> ModuleType:
    """This checkout's ``kernels/`` as ``mtor_kernels`` (what the wheel calls it): the
    installed package when it is this checkout (an editable install), else loaded from here."""
    package_dir = REPO / "kernels"
    try:
        import mtor_kernels

        if Path(mtor_kernels.__file__).resolve().parent == package_dir.resolve():
            return mtor_kernels
    except ImportError:
        pass
    spec = importlib.util.spec_from_file_location(
        "mtor_kernels", package_dir / "__init__.py", submodule_search_locations=[str(package_dir)]
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load kernels from {package_dir}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["mtor_kernels"] = module
    spec.loader.exec_module(module)
    return module


mk = load_kernels()


class Report:
    """Collects records, prints them as they come, and remembers failed checks."""

    def __init__(self, budget_s: float, json_path: Path | None = None) -> None:
        self.records: list[dict[str, Any]] = []
        self.failures: list[str] = []
        self.started = time.perf_counter()
        self.budget_s = budget_s
        self.json_path = json_path
        self.summarize: Callable[[], dict[str, Any]] = dict

    def document(self) -> str:
        """``{"summary": ..., "records": [...]}`` as JSON text."""
        document = {"summary": self.summarize(), "records": self.records}
        return json.dumps(document, indent=1, default=_json_default)

    def save(self) -> None:
        """Rewrite ``--json`` with what is known so far (a run killed midway keeps it)."""
        if self.json_path is not None:
            self.json_path.write_text(self.document() + "\n")

    def add(self, what: str, **fields: Any) -> dict[str, Any]:
        record = {"what": what, **fields}
        self.records.append(record)
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
        print(f"  {what}: {shown}", flush=True)
        return record

    def check(self, what: str, ok: bool, **fields: Any) -> None:
        self.add(what, ok=ok, **fields)
        if not ok:
            self.failures.append(f"{what} {fields}")

    def find(self, what: str, **match: Any) -> dict[str, Any] | None:
        for record in self.records:
            if record["what"] == what and all(record.get(k) == v for k, v in match.items()):
                return record
        return None

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def section(self, title: str, body: Callable[[], None]) -> None:
        """Run one section unless the time budget is spent; record an error instead of dying."""
        if self.elapsed() > self.budget_s:
            print(f"\n== {title}: skipped (time budget spent)", flush=True)
            self.add("skipped", section=title)
            return
        print(f"\n== {title} (t={self.elapsed():.0f}s)", flush=True)
        try:
            body()
        except Exception as exc:  # a broken section must not hide the others
            traceback.print_exc()
            self.failures.append(f"{title}: {type(exc).__name__}: {exc}")
            self.add("error", section=title, error=f"{type(exc).__name__}: {exc}")
        self.save()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def load_anchors() -> list[dict[str, Any]]:
    if not ANCHORS.exists():
        return []
    return [json.loads(line) for line in ANCHORS.read_text().splitlines() if line.strip()]


def anchor_value(anchors: list[dict[str, Any]], what: str, key: str, **match: Any) -> Any:
    for record in anchors:
        if record.get("what") == what and all(record.get(k) == v for k, v in match.items()):
            return record.get(key)
    return None


# -- operands ---------------------------------------------------------------------------------


def random_operands(name: str, dtype: Any, shape: dict[str, int], seed: int = 0) -> dict:
    """Operands of kernel ``name`` with unit-variance outputs (weights scaled by fan-in)."""
    rng = np.random.default_rng(seed)

    def normal(*dims: int, scale: float = 1.0) -> np.ndarray:
        out = rng.standard_normal(dims, dtype=np.float32)
        if scale != 1.0:
            out *= np.float32(scale)
        return out.astype(dtype, copy=False)

    if name == "matmul":
        m, k, n = shape["m"], shape["k"], shape["n"]
        return {"a": normal(m, k), "b": normal(k, n)}
    if name == "mlp":
        batch, d_in, d_hidden, d_out = (
            shape["batch"],
            shape["d_in"],
            shape["d_hidden"],
            shape["d_out"],
        )
        return {
            "x": normal(batch, d_in),
            "w1": normal(d_in, d_hidden, scale=d_in**-0.5),
            "b1": normal(d_hidden, scale=0.1),
            "w2": normal(d_hidden, d_out, scale=d_hidden**-0.5),
            "b2": normal(d_out, scale=0.1),
        }
    if name == "attention":
        dims = (shape["batch"], shape["heads"], shape["seq"], shape["head_dim"])
        return {"q": normal(*dims), "k": normal(*dims), "v": normal(*dims)}
    raise ValueError(name)


CHECK_SHAPES = {
    "matmul": {"m": 1024, "k": 1024, "n": 1024},
    "mlp": {"batch": 512, "d_in": 1024, "d_hidden": 4096, "d_out": 1024},
    "attention": {"batch": 2, "heads": 8, "seq": 512, "head_dim": 64},
}
SMALL_SHAPES = {
    "matmul": {"m": 128, "k": 96, "n": 64},
    "mlp": {"batch": 64, "d_in": 64, "d_hidden": 128, "d_out": 32},
    "attention": {"batch": 4, "heads": 2, "seq": 32, "head_dim": 16},
}
TIMING_SHAPES = {
    # A transformer FFN at width 4096 over 4096 tokens (weights 256 MiB in float16).
    "mlp": [{"batch": 4096, "d_in": 4096, "d_hidden": 16384, "d_out": 4096}],
    # Scores are batch*heads*seq^2 float32: 2 GiB.
    "attention": [{"batch": 4, "heads": 32, "seq": 2048, "head_dim": 128}],
}
DTYPE_NAMES = ("float16", "float32")


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one run; ``--quick`` swaps in tiny ones (a smoke test of the script)."""

    check: dict[str, dict[str, int]] = field(default_factory=lambda: CHECK_SHAPES)
    gemm: tuple[int, ...] = (1024, 4096, 8192)
    goal_n: int = 4096
    freivalds: int = 8192
    shard: int = 4096
    mlp_shard: dict[str, int] = field(
        default_factory=lambda: {"batch": 512, "d_in": 4096, "d_hidden": 16384, "d_out": 4096}
    )
    timing: dict[str, list[dict[str, int]]] = field(default_factory=lambda: TIMING_SHAPES)
    transfer_bytes: int = 256 << 20
    repeats: int = 10


QUICK = Sizes(
    check=SMALL_SHAPES,
    gemm=(64, 128),
    goal_n=128,
    freivalds=128,
    shard=512,
    mlp_shard={"batch": 16, "d_in": 64, "d_hidden": 128, "d_out": 32},
    timing={name: [SMALL_SHAPES[name]] for name in ("mlp", "attention")},
    transfer_bytes=1 << 20,
    repeats=3,
)


# -- timing -----------------------------------------------------------------------------------


def time_on_device(
    backend: Any, body: Callable[[], Any], *, warmup: int = 2, repeats: int = 10
) -> float:
    """Median milliseconds of ``body`` on the backend's stream, by CUDA events."""
    cupy = backend.xp
    with backend.activate():
        for _ in range(warmup):
            body()
        backend.synchronize()
        times = []
        for _ in range(repeats):
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record(backend.stream)
            body()
            end.record(backend.stream)
            end.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, end))
    return statistics.median(times)


def wall_ms(body: Callable[[], Any], *, warmup: int = 1, repeats: int = 5) -> float:
    """Median wall-clock milliseconds of ``body`` (which must wait for its own result)."""
    for _ in range(warmup):
        body()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        body()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def on_device(backend: Any, operands: dict) -> dict:
    with backend.activate():
        placed = {name: backend.put(array) for name, array in operands.items()}
    backend.synchronize()
    return placed


# -- sections ---------------------------------------------------------------------------------


def device_info(report: Report, cupy: Any, backend: Any) -> None:
    status = backend.status
    properties = cupy.cuda.runtime.getDeviceProperties(backend.device_id)
    report.add(
        "device",
        name=status.name,
        cc=status.compute_capability,
        sm=properties.get("multiProcessorCount"),
        pci_bus_id=status.pci_bus_id,
        mem_gib=round(status.mem_total / 2**30, 1),
        free_gib=round(status.mem_free / 2**30, 1),
        cupy=status.cupy_version,
        cuda_runtime=cupy.cuda.runtime.runtimeGetVersion(),
        driver=status.cuda_driver_version,
        fp16_gemm=backend.fp16_gemm,
        tf32_forced_off=backend.tf32_forced_off,
    )
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        nvml_name = pynvml.nvmlDeviceGetName(handle)
        report.add(
            "nvml",
            name=nvml_name.decode() if isinstance(nvml_name, bytes) else nvml_name,
            driver=pynvml.nvmlSystemGetDriverVersion(),
            power_limit_w=pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000,
            sm_clock_max=pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
            temp=pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
        )
    except Exception as exc:  # NVML is optional here
        report.add("nvml", error=f"{type(exc).__name__}: {exc}")


def correctness(report: Report, backend: Any, shapes: dict[str, dict[str, int]]) -> None:
    """Every kernel and dtype on ``backend`` against the NumPy reference."""
    rng = np.random.default_rng(42)
    for name in ("matmul", "mlp", "attention"):
        kernel = mk.get_kernel(name)
        for dtype_name in DTYPE_NAMES:
            operands = random_operands(name, np.dtype(dtype_name), shapes[name])
            started = time.perf_counter()
            result = kernel.run(operands, backend)
            run_s = time.perf_counter() - started
            reference = kernel.reference(operands)
            sampled = mk.sample_rows(kernel, operands, result, samples=16, rng=rng)
            agree, agree_error = mk.compare(reference, result, dtype_name)
            fields = {
                "kernel": name,
                "dtype": dtype_name,
                "sample_max_error": sampled.max_error,
                "compare_error": agree_error,
                "run_s": run_s,
                "fp16_gemm": backend.fp16_gemm,
            }
            if name == "matmul":
                check = mk.freivalds(operands["a"], operands["b"], result, rng=rng)
                fields["freivalds_max_error"] = check.max_error
                agree = agree and check.ok
            report.check("correct", sampled.ok and agree, **fields)


def bus(report: Report, backend: Any, sizes: Sizes) -> None:
    """Raw DMA bandwidth between pinned host memory and the device, each way and both at
    once, and a pageable upload through the backend's staging buffers."""
    cupy = backend.xp
    size = sizes.transfer_bytes
    # Buffers of their own, so that the backend's pinned budget stays for the shards.
    runtime = cupy.cuda.runtime
    pool = mk.PinnedHostPool(
        lambda nbytes: runtime.hostAlloc(nbytes, 0), runtime.freeHost, max_bytes=2 * size
    )
    host_in = pool.lease_array((size,), np.uint8)
    host_out = pool.lease_array((size,), np.uint8)
    if host_in is None or host_out is None:
        raise RuntimeError(f"could not page-lock 2 x {size >> 20} MiB of host memory")
    host_in[...] = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
    pageable = np.array(host_in)
    with backend.activate():
        device_in = cupy.empty((size,), cupy.uint8)
        device_out = cupy.empty((size,), cupy.uint8)
        other = cupy.cuda.Stream(non_blocking=True)
    stream = backend.stream

    def h2d() -> None:
        device_in.data.copy_from_host_async(host_in.ctypes.data, size, stream)

    def d2h() -> None:
        device_out.data.copy_to_host_async(host_out.ctypes.data, size, stream)

    def both() -> None:
        # Upload on the backend's stream, download on another, as the shard pipeline does.
        other.wait_event(stream.record())
        device_in.data.copy_from_host_async(host_in.ctypes.data, size, stream)
        device_out.data.copy_to_host_async(host_out.ctypes.data, size, other)
        stream.wait_event(other.record())

    h2d_ms = time_on_device(backend, h2d, repeats=sizes.repeats)
    d2h_ms = time_on_device(backend, d2h, repeats=sizes.repeats)
    both_ms = time_on_device(backend, both, repeats=sizes.repeats)

    def staged() -> None:
        backend.put(pageable)
        backend.synchronize()

    staged_ms = wall_ms(staged, repeats=sizes.repeats)
    report.add(
        "bus",
        mib=size / 2**20,
        h2d_pinned_gb_s=size / h2d_ms / 1e6,
        d2h_pinned_gb_s=size / d2h_ms / 1e6,
        both_ways_gb_s=2 * size / both_ms / 1e6,
        h2d_pageable_staged_gb_s=size / staged_ms / 1e6,
        h100_anchor_pinned_gb_s=anchor_value(ANCHORS_CACHE, "bus", "h2d_pinned_gb_s", mib=256),
    )


def gemm(report: Report, backend: Any, sizes: Sizes) -> None:
    """The kernel's product against CuPy's own GEMM of the same operands (the ceiling)."""
    cupy = backend.xp
    kernel = mk.get_kernel("matmul")
    for dtype_name in DTYPE_NAMES:
        for n in sizes.gemm:
            operands = random_operands("matmul", np.dtype(dtype_name), {"m": n, "k": n, "n": n})
            placed = on_device(backend, operands)
            a, b = placed["a"], placed["b"]
            # Interleaved, so that clocks and heat treat both alike.
            kernel_ms, cupy_ms = [], []
            for _ in range(3):
                kernel_ms.append(
                    time_on_device(
                        backend, lambda p=placed: kernel.forward(backend, p), repeats=sizes.repeats
                    )
                )
                cupy_ms.append(
                    time_on_device(
                        backend, lambda a=a, b=b: cupy.matmul(a, b), repeats=sizes.repeats
                    )
                )
            ours, ceiling = min(kernel_ms), min(cupy_ms)
            flops = 2 * n**3
            record = report.add(
                "gemm",
                dtype=dtype_name,
                n=n,
                kernel_ms=ours,
                kernel_tflops=tflops(flops, ours),
                cupy_ms=ceiling,
                cupy_tflops=tflops(flops, ceiling),
                vs_cupy=ceiling / ours,
                # CuPy's float16 product rounds its output to float16; ours stays float32.
                cupy_output_dtype=dtype_name,
                h100_anchor_tflops=anchor_value(
                    ANCHORS_CACHE, "gemm", "tflops", dtype=dtype_name, n=n
                ),
            )
            if n == sizes.goal_n:
                record["goal"] = GEMM_GOAL
                record["goal_met"] = record["vs_cupy"] >= GEMM_GOAL
            del placed, a, b
            cupy.get_default_memory_pool().free_all_blocks()


def shard_end_to_end(report: Report, backend: Any, sizes: Sizes) -> None:
    """A matmul shard from host operands to a host result, as a worker runs it, against the
    pinned-bus bound: the bytes of A in and C out at the pinned bandwidths of ``bus``."""
    link = report.find("bus")
    if link is None:
        bus(report, backend, sizes)
        link = report.find("bus")
    assert link is not None
    h2d, d2h = link["h2d_pinned_gb_s"] * 1e6, link["d2h_pinned_gb_s"] * 1e6  # bytes per ms
    n = sizes.shard
    kernel = mk.get_kernel("matmul")
    unpipelined = type(backend)(pipeline_min_bytes=1 << 62)
    for dtype_name in DTYPE_NAMES:
        operands = random_operands("matmul", np.dtype(dtype_name), {"m": n, "k": n, "n": n})
        key = {"b": mk.content_key(operands["b"])}
        pinned_a = backend.empty_host(operands["a"].shape, operands["a"].dtype)
        pinned_a[...] = operands["a"]
        pinned_operands = {"a": pinned_a, "b": operands["b"]}
        placed = on_device(backend, operands)
        compute_ms = time_on_device(
            backend, lambda p=placed: kernel.forward(backend, p), repeats=sizes.repeats
        )
        del placed
        a_bytes, b_bytes, c_bytes = operands["a"].nbytes, operands["b"].nbytes, n * n * 4
        serial_bound = a_bytes / h2d + c_bytes / d2h
        overlap_bound = max(a_bytes / h2d, c_bytes / d2h, compute_ms)

        def cold(chosen: Any = backend, key: dict = key, ops: dict = operands) -> None:
            chosen.cache.discard(key["b"])
            kernel.run(ops, chosen, keys=key)

        def as_worker(
            receive: Callable[[int], np.ndarray],
            ops: dict = operands,
            key: dict = key,
        ) -> None:
            # A worker's upload: the bytes arrive in 4 MiB chunks (the wire's CHUNK_BYTES) and
            # are copied into one buffer (the worker's is ordinary memory), then the shard runs.
            source = memoryview(ops["a"]).cast("B")
            buffer = receive(len(source))
            for offset in range(0, len(source), WIRE_CHUNK_BYTES):
                end = min(len(source), offset + WIRE_CHUNK_BYTES)
                buffer[offset:end] = np.frombuffer(source[offset:end], np.uint8)
            a = np.frombuffer(buffer, ops["a"].dtype).reshape(ops["a"].shape)
            kernel.run({"a": a, "b": ops["b"]}, backend, keys=key)

        cases = {
            "worker: a received into ordinary memory, b resident": (
                lambda: as_worker(lambda nbytes: np.empty(nbytes, np.uint8)),
                False,
            ),
            "worker, if it received into pinned memory (empty_host), b resident": (
                lambda: as_worker(lambda nbytes: backend.empty_host((nbytes,), np.uint8)),
                False,
            ),
            "pinned a, b resident, pipelined": (
                lambda ops=pinned_operands, key=key: kernel.run(ops, backend, keys=key),
                True,
            ),
            "pageable a, b resident, pipelined": (
                lambda ops=operands, key=key: kernel.run(ops, backend, keys=key),
                False,
            ),
            "pinned a, b resident, one chunk": (
                lambda ops=pinned_operands, key=key: kernel.run(ops, unpipelined, keys=key),
                False,
            ),
            "pageable a, b sent (cold)": (cold, False),
        }
        for label, (body, is_goal) in cases.items():
            ms = wall_ms(body, repeats=sizes.repeats)
            moved = a_bytes + c_bytes + (b_bytes if "cold" in label else 0)
            bound = serial_bound + (b_bytes / h2d if "cold" in label else 0)
            record = report.add(
                "shard_e2e",
                dtype=dtype_name,
                n=n,
                case=label,
                ms=ms,
                effective_tflops=tflops(kernel.flops(operands), ms),
                moved_mib=moved / 2**20,
                effective_gb_s=moved / ms / 1e6,
                pinned_bus_bound_ms=bound,
                vs_pinned_bus_bound=bound / ms,
                overlapped_bound_ms=overlap_bound,
                compute_ms=compute_ms,
            )
            if is_goal:
                record["goal"] = SHARD_GOAL
                record["goal_met"] = record["vs_pinned_bus_bound"] >= SHARD_GOAL
        del pinned_a, pinned_operands
    stats = backend.cache.stats()
    pinned = backend.pinned.stats()
    report.add(
        "memory",
        cache_hits=stats.hits,
        cache_misses=stats.misses,
        cache_mib=stats.bytes / 2**20,
        pinned_mib=pinned.bytes / 2**20,
        pinned_max_mib=pinned.max_bytes / 2**20,
        pinned_allocations=pinned.allocations,
        pinned_reuses=pinned.reuses,
        pinned_refusals=pinned.refusals,
        oom_retries=backend.oom_retries,
        fp16_fallbacks=backend.fp16_fallbacks,
    )


def mlp_shard_end_to_end(report: Report, backend: Any, sizes: Sizes) -> None:
    """The cache on an MLP shard: weights (256 MiB in float16) sent once, then only x."""
    kernel = mk.get_kernel("mlp")
    operands = random_operands("mlp", np.float16, sizes.mlp_shard)
    keys = {name: mk.content_key(operands[name]) for name in kernel.resident}

    def cold() -> None:
        for key in keys.values():
            backend.cache.discard(key)
        kernel.run(operands, backend, keys=keys)

    cold_ms = wall_ms(cold, repeats=3)
    warm_ms = wall_ms(lambda: kernel.run(operands, backend, keys=keys), repeats=3)
    report.add(
        "mlp_shard_e2e_fp16", **sizes.mlp_shard, weights_cold_ms=cold_ms, weights_cached_ms=warm_ms
    )


def freivalds_cost(report: Report, backend: Any, sizes: Sizes) -> None:
    """The host check (``verify.freivalds``, the verdict the network uses) against the product,
    and whether it accepts the GPU's product and rejects corrupted ones."""
    cupy = backend.xp
    n = sizes.freivalds
    kernel = mk.get_kernel("matmul")
    rng = np.random.default_rng(3)
    for dtype_name in DTYPE_NAMES:
        operands = random_operands("matmul", np.dtype(dtype_name), {"m": n, "k": n, "n": n})
        placed = on_device(backend, operands)
        product_ms = time_on_device(
            backend, lambda p=placed: kernel.forward(backend, p), repeats=sizes.repeats
        )
        with backend.activate():
            c = kernel.forward(backend, placed)
        c_host = np.array(backend.get(c))
        del placed, c
        cupy.get_default_memory_pool().free_all_blocks()
        started = time.perf_counter()
        honest = mk.freivalds(operands["a"], operands["b"], c_host, rng=rng)
        host_ms = (time.perf_counter() - started) * 1e3
        one_element = c_host.copy()
        one_element[n // 3, n // 2] += np.float32(0.5) * np.abs(c_host).max()
        zero_rows = c_host.copy()
        zero_rows[n // 2 : n // 2 + 8] = 0
        report.add(
            "freivalds",
            dtype=dtype_name,
            n=n,
            product_ms=product_ms,
            host_ms=host_ms,
            host_ratio=host_ms / product_ms,
            h100_anchor_ratio=anchor_value(ANCHORS_CACHE, "freivalds_fp32", "ratio", n=n),
        )
        report.check("freivalds_accepts_gpu_product", honest.ok, dtype=dtype_name, n=n)
        for label, corrupted in (("one_element", one_element), ("8_zero_rows", zero_rows)):
            caught = mk.freivalds(operands["a"], operands["b"], corrupted, rng=rng)
            report.check(f"freivalds_rejects_{label}", not caught.ok, dtype=dtype_name, n=n)


def model_timing(report: Report, backend: Any, sizes: Sizes) -> None:
    cupy = backend.xp
    for name, shapes in sizes.timing.items():
        kernel = mk.get_kernel(name)
        for shape in shapes:
            for dtype_name in DTYPE_NAMES:
                operands = random_operands(name, np.dtype(dtype_name), shape)
                placed = on_device(backend, operands)
                ms = time_on_device(
                    backend, lambda p=placed, k=kernel: k.forward(backend, p), warmup=1, repeats=5
                )
                report.add(
                    name,
                    dtype=dtype_name,
                    **shape,
                    ms=ms,
                    tflops=tflops(kernel.flops(operands), ms),
                )
                del placed, operands
                cupy.get_default_memory_pool().free_all_blocks()


# -- main -----------------------------------------------------------------------------------

ANCHORS_CACHE: list[dict[str, Any]] = []


def summarize(report: Report, sizes: Sizes) -> dict[str, Any]:
    """The goal figures of this run, for BENCHMARKS.md."""
    device = report.find("device") or {}
    link = report.find("bus") or {}
    summary: dict[str, Any] = {
        "device": device.get("name"),
        "cupy": device.get("cupy"),
        "pinned_h2d_gb_s": link.get("h2d_pinned_gb_s"),
        "pinned_d2h_gb_s": link.get("d2h_pinned_gb_s"),
        "failures": report.failures,
        "seconds": round(report.elapsed(), 1),
    }
    for dtype_name in DTYPE_NAMES:
        gemm_record = report.find("gemm", dtype=dtype_name, n=sizes.goal_n) or {}
        summary[f"gemm_{dtype_name}_n{sizes.goal_n}_vs_cupy"] = gemm_record.get("vs_cupy")
        summary[f"gemm_{dtype_name}_goal_met"] = gemm_record.get("goal_met")
        shard = report.find("shard_e2e", dtype=dtype_name, n=sizes.shard, goal=SHARD_GOAL) or {}
        summary[f"shard_{dtype_name}_n{sizes.shard}_vs_pinned_bus"] = shard.get(
            "vs_pinned_bus_bound"
        )
        summary[f"shard_{dtype_name}_goal_met"] = shard.get("goal_met")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the JSON document to this file")
    parser.add_argument("--budget", type=float, default=240.0, help="seconds before sections stop")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    report = Report(args.budget, args.json)
    report.summarize = lambda: summarize(report, sizes)
    ANCHORS_CACHE[:] = load_anchors()
    print(f"kernels from {Path(mk.__file__).parent}; anchors: {ANCHORS if ANCHORS_CACHE else '-'}")

    status = mk.gpu_status()
    if not status.usable:
        print(f"no usable GPU: {status.reason}", file=sys.stderr)
        print("nothing measured: run this on a machine with a CUDA GPU and CuPy", file=sys.stderr)
        return EXIT_NO_GPU

    import cupy

    backend = mk.select_backend("cupy")
    report.section("device", lambda: device_info(report, cupy, backend))
    report.section("correctness", lambda: correctness(report, backend, sizes.check))
    report.section("bus", lambda: bus(report, backend, sizes))
    report.section("gemm against CuPy", lambda: gemm(report, backend, sizes))
    report.section("shards end to end", lambda: shard_end_to_end(report, backend, sizes))
    report.section("mlp shard end to end", lambda: mlp_shard_end_to_end(report, backend, sizes))
    report.section("freivalds", lambda: freivalds_cost(report, backend, sizes))
    report.section("mlp and attention", lambda: model_timing(report, backend, sizes))
    print("\n== JSON")
    print(report.document())
    report.save()
    if args.json is not None:
        print(f"wrote {len(report.records)} records to {args.json}", file=sys.stderr)
    for failure in report.failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    print("OK" if not report.failures else f"{len(report.failures)} check(s) failed")
    return 1 if report.failures else 0


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
