"""Correctness and speed of the MTOR kernels on a GPU; run on a lent GPU machine.

    python benchmarks/gpu_kernels.py --json out.json

It loads ``kernels/`` from this checkout (no install needed) and, on a usable GPU:

1. prints the device (CuPy and NVML) and warns about settings that change float32 numerics;
2. checks every kernel and dtype on the CuPy backend against the NumPy reference at a moderate
   size (sampled rows within the honest-error bound, redundancy ``compare``, Freivalds for
   matmul), and which float16 GEMM path ran;
3. times each kernel on the device (CUDA events, warm-up, median): matmul float32/float16 at
   1024, 4096 and 8192 next to the H100 anchors (``../shared/data/gpu-anchors-h100.jsonl``
   when present; the H200 has the same Hopper compute, more and faster memory), MLP and
   attention at transformer sizes;
4. measures shards end to end (host operands in, host result out) with pageable and pinned
   inputs and with the resident operand cold or cached, and raw pinned/staged copy bandwidth;
5. measures the Freivalds check at n = 8192 as a share of the product (on the device in
   float64, and the host ``verify.freivalds``) and whether it accepts the GPU's product and
   rejects a corrupted one.

``--json`` writes every measurement as a JSON array of records; ``--quick`` uses tiny sizes (a
smoke test of the script itself). Sections stop being started
after ``--budget`` seconds (default 200) so the run stays within 4 minutes. Exit status: 1 if a
correctness check failed, else 0. Without a usable GPU it prints "no usable GPU", runs the NumPy
reference checks at a small size, and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
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


def load_kernels() -> ModuleType:
    """Import ``kernels/`` of this checkout as ``mtor_kernels`` (what the wheel calls it)."""
    package_dir = REPO / "kernels"
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

    def __init__(self, budget_s: float) -> None:
        self.records: list[dict[str, Any]] = []
        self.failures: list[str] = []
        self.started = time.perf_counter()
        self.budget_s = budget_s

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


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def load_anchors() -> list[dict[str, Any]]:
    if not ANCHORS.exists():
        return []
    return [json.loads(line) for line in ANCHORS.read_text().splitlines() if line.strip()]


def anchor_gemm_tflops(anchors: list[dict[str, Any]], dtype: str, n: int) -> float | None:
    for record in anchors:
        if record.get("what") == "gemm" and record.get("dtype") == dtype and record.get("n") == n:
            return float(record["tflops"])
    return None


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
    # Scores are batch*heads*seq^2 float32: 2 GiB for each of these.
    "attention": [
        {"batch": 4, "heads": 32, "seq": 2048, "head_dim": 128},
        {"batch": 1, "heads": 32, "seq": 4096, "head_dim": 128},
    ],
}
DTYPE_NAMES = ("float32", "float16")


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one run; ``--quick`` swaps in tiny ones (a smoke test of the script)."""

    check: dict[str, dict[str, int]] = field(default_factory=lambda: CHECK_SHAPES)
    gemm: tuple[int, ...] = (1024, 4096, 8192)
    freivalds: int = 8192
    shard: tuple[int, ...] = (1024, 4096)
    mlp_shard: dict[str, int] = field(
        default_factory=lambda: {"batch": 512, "d_in": 4096, "d_hidden": 16384, "d_out": 4096}
    )
    timing: dict[str, list[dict[str, int]]] = field(default_factory=lambda: TIMING_SHAPES)
    transfer_bytes: int = 256 << 20


QUICK = Sizes(
    check=SMALL_SHAPES,
    gemm=(64, 128),
    freivalds=128,
    shard=(64,),
    mlp_shard={"batch": 16, "d_in": 64, "d_hidden": 128, "d_out": 32},
    timing={name: [SMALL_SHAPES[name]] for name in ("mlp", "attention")},
    transfer_bytes=1 << 20,
)


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
                "backend": backend.name,
                "sample_max_error": sampled.max_error,
                "compare_error": agree_error,
                "run_s": run_s,
            }
            if name == "matmul":
                check = mk.freivalds(operands["a"], operands["b"], result, rng=rng)
                fields["freivalds_max_error"] = check.max_error
                agree = agree and check.ok
            report.check("correct", sampled.ok and agree, **fields)


# -- GPU sections -------------------------------------------------------------------------------


def device_info(report: Report, cupy: Any) -> None:
    properties = cupy.cuda.runtime.getDeviceProperties(0)
    name = properties["name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    free_bytes, total_bytes = cupy.cuda.runtime.memGetInfo()
    report.add(
        "device",
        name=name,
        cc=f"{properties['major']}.{properties['minor']}",
        sm=properties["multiProcessorCount"],
        mem_gib=round(total_bytes / 2**30, 1),
        free_gib=round(free_bytes / 2**30, 1),
        cupy=cupy.__version__,
        cuda_runtime=cupy.cuda.runtime.runtimeGetVersion(),
        driver=cupy.cuda.runtime.driverGetVersion(),
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
    for variable in ("CUPY_TF32", "NVIDIA_TF32_OVERRIDE"):
        if os.environ.get(variable):
            print(f"  WARNING: {variable}={os.environ[variable]} changes float32 products")


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


def wall_ms(body: Callable[[], Any], *, repeats: int = 5) -> float:
    """Median wall-clock milliseconds of ``body`` (which must wait for its own result)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        body()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def on_device(backend: Any, operands: dict) -> dict:
    with backend.activate():
        placed = {name: backend.put(array) for name, array in operands.items()}
    backend.synchronize()
    return placed


def matmul_timing(
    report: Report, backend: Any, anchors: list[dict[str, Any]], sizes: Sizes
) -> None:
    cupy = backend.xp
    kernel = mk.get_kernel("matmul")
    for dtype_name in DTYPE_NAMES:
        for n in sizes.gemm:
            operands = random_operands("matmul", np.dtype(dtype_name), {"m": n, "k": n, "n": n})
            placed = on_device(backend, operands)
            ms = time_on_device(backend, lambda p=placed: kernel.forward(backend, p))
            tflops = 2 * n**3 / (ms * 1e-3) / 1e12
            anchor = anchor_gemm_tflops(anchors, dtype_name, n)
            report.add(
                "gemm",
                dtype=dtype_name,
                n=n,
                ms=ms,
                tflops=tflops,
                h100_anchor_tflops=anchor,
                vs_anchor=None if anchor is None else tflops / anchor,
            )
            del placed
        cupy.get_default_memory_pool().free_all_blocks()
    # CuPy's own float16 matmul rounds its output to float16: the speed our float32 output
    # costs (or not) next to it.
    n = sizes.gemm[-1]
    operands = random_operands("matmul", np.float16, {"m": n, "k": n, "n": n})
    placed = on_device(backend, operands)
    ms = time_on_device(backend, lambda: cupy.matmul(placed["a"], placed["b"]))
    report.add("gemm_cupy_fp16_out", n=n, ms=ms, tflops=2 * n**3 / (ms * 1e-3) / 1e12)
    report.add("fp16_gemm_path", path=backend.fp16_gemm)


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
                flops = kernel.flops(operands)
                report.add(
                    name,
                    dtype=dtype_name,
                    **shape,
                    ms=ms,
                    tflops=flops / (ms * 1e-3) / 1e12,
                )
                del placed, operands
                cupy.get_default_memory_pool().free_all_blocks()


def transfer_timing(
    report: Report, backend: Any, anchors: list[dict[str, Any]], sizes: Sizes
) -> None:
    """Host -> device through our staging buffers and from pinned memory; device -> host."""
    size = sizes.transfer_bytes
    pageable = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
    pinned = backend.empty_host((size,), np.uint8)
    pinned[...] = pageable

    def upload(host: np.ndarray) -> None:
        with backend.activate():
            backend.put(host)
        backend.synchronize()

    staged_ms = wall_ms(lambda: upload(pageable))
    pinned_ms = wall_ms(lambda: upload(pinned))
    with backend.activate():
        device = backend.put(pinned)
    download_ms = wall_ms(lambda: backend.get(device))
    report.add(
        "bus",
        mib=size / 2**20,
        h2d_staged_gb_s=size / staged_ms / 1e6,
        h2d_pinned_gb_s=size / pinned_ms / 1e6,
        d2h_pinned_gb_s=size / download_ms / 1e6,
        h100_anchor_pinned_gb_s=anchor_value(anchors, "bus", "h2d_pinned_gb_s", mib=256),
        h100_anchor_pageable_gb_s=anchor_value(anchors, "bus", "h2d_pageable_gb_s", mib=256),
    )


def shard_end_to_end(
    report: Report, backend: Any, anchors: list[dict[str, Any]], sizes: Sizes
) -> None:
    """A float16 matmul shard from host operands to a host result, as a worker runs it."""
    for n in sizes.shard:
        matmul_shard_end_to_end(report, backend, anchors, n)
    stats = backend.cache.stats()
    report.add("resident_cache", hits=stats.hits, misses=stats.misses, bytes=stats.bytes)
    mlp_shard_end_to_end(report, backend, sizes.mlp_shard)


def matmul_shard_end_to_end(
    report: Report, backend: Any, anchors: list[dict[str, Any]], n: int
) -> None:
    kernel = mk.get_kernel("matmul")
    operands = random_operands("matmul", np.float16, {"m": n, "k": n, "n": n})
    key = mk.content_key(operands["b"])
    flops = kernel.flops(operands)
    pinned_a = backend.empty_host(operands["a"].shape, operands["a"].dtype)
    pinned_a[...] = operands["a"]
    pinned_operands = {"a": pinned_a, "b": operands["b"]}

    def cold() -> None:
        backend.cache.discard(key)
        kernel.run(operands, backend, keys={"b": key})

    kernel.run(operands, backend, keys={"b": key})  # warm-up (and b now cached)
    cases = {
        "pageable, b cold": cold,
        "pageable, b cached": lambda: kernel.run(operands, backend, keys={"b": key}),
        "pinned a, b cached": lambda: kernel.run(pinned_operands, backend, keys={"b": key}),
    }
    for label, body in cases.items():
        ms = wall_ms(body)
        report.add(
            "shard_e2e_fp16",
            n=n,
            case=label,
            ms=ms,
            effective_tflops=flops / (ms * 1e-3) / 1e12,
            h100_anchor_tflops=anchor_value(anchors, "shard_e2e_fp16", "effective_tflops", n=n),
        )


def mlp_shard_end_to_end(report: Report, backend: Any, shape: dict[str, int]) -> None:
    """The cache on an MLP shard: weights (256 MiB float16) sent once, then only x."""
    kernel = mk.get_kernel("mlp")
    operands = random_operands("mlp", np.float16, shape)
    keys = {name: mk.content_key(operands[name]) for name in kernel.resident}
    kernel.run(operands, backend, keys=keys)

    def mlp_cold() -> None:
        for key in keys.values():
            backend.cache.discard(key)
        kernel.run(operands, backend, keys=keys)

    cold_ms = wall_ms(mlp_cold, repeats=3)
    warm_ms = wall_ms(lambda: kernel.run(operands, backend, keys=keys), repeats=3)
    report.add("mlp_shard_e2e_fp16", **shape, weights_cold_ms=cold_ms, weights_cached_ms=warm_ms)


def freivalds_cost(
    report: Report, backend: Any, anchors: list[dict[str, Any]], sizes: Sizes
) -> None:
    """The check against the product at n = 8192: on the device (float32 and float64) and on
    the host (``verify.freivalds``, the verdict the network uses)."""
    cupy = backend.xp
    n = sizes.freivalds
    kernel = mk.get_kernel("matmul")
    rng = np.random.default_rng(3)
    for dtype_name in DTYPE_NAMES:
        operands = random_operands("matmul", np.dtype(dtype_name), {"m": n, "k": n, "n": n})
        placed = on_device(backend, operands)
        product_ms = time_on_device(backend, lambda p=placed: kernel.forward(backend, p))
        with backend.activate():
            c = kernel.forward(backend, placed)
        a, b = placed["a"], placed["b"]

        with backend.activate():
            signs = {
                (rounds, precision): cupy.asarray(
                    rng.integers(0, 2, (n, rounds)) * 2 - 1, dtype=precision
                )
                for rounds in (1, 20)
                for precision in ("float32", "float64")
            }

        def device_check(
            rounds: int, precision: str, c: Any = c, a: Any = a, b: Any = b, signs: dict = signs
        ) -> Any:
            """|C r - A (B r)| on the device; float32 reads each matrix once (memory bound),
            float64 first widens them (as the host check does, for the exact tolerance)."""
            r = signs[(rounds, precision)]
            a_, b_, c_ = (m.astype(precision, copy=False) for m in (a, b, c))
            return cupy.abs(c_ @ r - a_ @ (b_ @ r)).max()

        check_ms = {
            (rounds, precision): time_on_device(
                backend, lambda r=rounds, p=precision: device_check(r, p), repeats=5
            )
            for rounds in (1, 20)
            for precision in ("float32", "float64")
        }
        c_host = backend.get(c)
        started = time.perf_counter()
        honest = mk.freivalds(operands["a"], operands["b"], c_host, rng=rng)
        host_ms = (time.perf_counter() - started) * 1e3
        # Freivalds' tolerance grows with n (every column's rounding adds into one residual):
        # report it, and check two corruptions well above it.
        a64 = operands["a"].astype(np.float64)
        row_tolerance = mk.freivalds_row_tolerance(
            np.linalg.norm(a64, axis=1),
            float(np.linalg.norm(operands["b"].astype(np.float64))),
            np.linalg.norm(c_host.astype(np.float64), axis=1),
            n,
        )
        del a64
        one_element = c_host.copy()
        one_element[n // 3, n // 2] += np.float32(0.5) * np.abs(c_host).max()
        zero_rows = c_host.copy()
        zero_rows[n // 2 : n // 2 + 8] = 0
        caught_element = mk.freivalds(operands["a"], operands["b"], one_element, rng=rng)
        caught_rows = mk.freivalds(operands["a"], operands["b"], zero_rows, rng=rng)
        report.add(
            "freivalds",
            dtype=dtype_name,
            n=n,
            product_ms=product_ms,
            device_f32_1_round_ms=check_ms[(1, "float32")],
            device_f32_20_rounds_ms=check_ms[(20, "float32")],
            device_f64_1_round_ms=check_ms[(1, "float64")],
            device_f64_20_rounds_ms=check_ms[(20, "float64")],
            device_f32_ratio_1_round=check_ms[(1, "float32")] / product_ms,
            device_f64_ratio_20_rounds=check_ms[(20, "float64")] / product_ms,
            host_20_rounds_ms=host_ms,
            host_ratio=host_ms / product_ms,
            h100_anchor_ratio=anchor_value(anchors, "freivalds_fp32", "ratio", n=n),
            row_tolerance_median=float(np.median(row_tolerance)),
            tolerance_over_rms_c=float(np.median(row_tolerance) / np.sqrt(np.mean(c_host**2))),
        )
        report.check(
            "freivalds_accepts_gpu_product",
            honest.ok,
            dtype=dtype_name,
            n=n,
            max_error=honest.max_error,
        )
        report.check(
            "freivalds_rejects_one_element_off_by_half_max",
            not caught_element.ok,
            dtype=dtype_name,
            n=n,
            max_error=caught_element.max_error,
        )
        report.check(
            "freivalds_rejects_8_zero_rows",
            not caught_rows.ok,
            dtype=dtype_name,
            n=n,
            max_error=caught_rows.max_error,
        )
        del placed, c, a, b
        cupy.get_default_memory_pool().free_all_blocks()


# -- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write all records to this file (JSON array)")
    parser.add_argument("--budget", type=float, default=200.0, help="seconds before sections stop")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    report = Report(args.budget)
    anchors = load_anchors()
    print(f"kernels from {REPO / 'kernels'}; anchors: {ANCHORS if anchors else 'not found'}")

    if not mk.gpu_available():
        print("no usable GPU: checking the NumPy reference at a small size only")
        numpy_backend = mk.select_backend("numpy")
        report.section("numpy reference", lambda: correctness(report, numpy_backend, SMALL_SHAPES))
        write_json(args.json, report)
        for failure in report.failures:
            print(f"FAILED: {failure}")
        return 0

    import cupy

    backend = mk.select_backend("cupy")
    report.section("device", lambda: device_info(report, cupy))
    report.section("correctness", lambda: correctness(report, backend, sizes.check))
    report.section("matmul", lambda: matmul_timing(report, backend, anchors, sizes))
    report.section("freivalds", lambda: freivalds_cost(report, backend, anchors, sizes))
    report.section("shards end to end", lambda: shard_end_to_end(report, backend, anchors, sizes))
    report.section("transfers", lambda: transfer_timing(report, backend, anchors, sizes))
    report.section("mlp and attention", lambda: model_timing(report, backend, sizes))
    report.add("total", seconds=report.elapsed())
    write_json(args.json, report)
    for failure in report.failures:
        print(f"FAILED: {failure}")
    print("OK" if not report.failures else f"{len(report.failures)} check(s) failed")
    return 1 if report.failures else 0


def write_json(path: Path | None, report: Report) -> None:
    if path is not None:
        path.write_text(json.dumps(report.records, indent=1, default=_json_default) + "\n")
        print(f"wrote {len(report.records)} records to {path}")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
