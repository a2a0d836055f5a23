#!/usr/bin/env bash
# One short check of the GPU path on a machine lent a GPU (docs/compute.md, "GPU path").
#
#   bash benchmarks/gpu_check.sh            # from the repository root; results in $OUT
#
# What it assumes, and why: the machine may have no network at all (the lent H200 machines
# reach nothing), so this installs nothing. It needs a python3 that imports NumPy, CuPy and
# pytest (the lent H200 image has Python 3.12 with numpy, cupy-cuda13x 14.2, pytest and
# nvidia-ml-py); PYTHON=... picks another interpreter. The peer (libp2p and the rest) is not
# needed: tests/gpu and benchmarks/gpu_kernels.py load kernels/ straight from this checkout.
#
# Steps (about 5 minutes on an H200, most of it the benchmark's 240 s budget):
#   1. the interpreter, CuPy, the device (exit 3 if CuPy or a GPU is missing);
#   2. pytest -m gpu tests/gpu: the backend on the real GPU;
#   3. pytest tests/gpu -m "not gpu": the stand-in tests, whose last check compares the
#      stand-in's CuPy signatures with this real CuPy (and cuBLAS);
#   4. benchmarks/gpu_kernels.py: kernel vs CuPy's GEMM at n=4096, shard vs pinned bus
#      (GPU_BENCH_BUDGET=seconds shortens its budget, to fit a short lease).
# Everything goes to stdout and to $OUT (gpu_check.log, pytest-*.xml, gpu_kernels.json).
# Exit status: 0 all passed, 2 the interpreter cannot run or lacks numpy/pytest, 3 no usable
# GPU, else the number of failed steps.

set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

echo "== 1. environment ($(date -u +%FT%TZ), results in $OUT)"
# A broken interpreter is a set-up problem, not "no GPU": say so and exit 2.
if ! "$PYTHON" -c "import numpy, pytest" 2>&1; then
    echo "set-up problem: '$PYTHON' cannot run or lacks numpy/pytest (PYTHON=... picks another): exit 2"
    exit 2
fi
if ! "$PYTHON" - <<'EOF'
import sys

import numpy

print(f"python {sys.version.split()[0]} at {sys.executable}; numpy {numpy.__version__}")
try:
    import cupy
except ImportError as exc:
    sys.exit(f"CuPy is not importable ({exc}): nothing to check here")
print(f"cupy {cupy.__version__}; CUDA_VISIBLE_DEVICES={__import__('os').environ.get('CUDA_VISIBLE_DEVICES')!r}")
sys.path.insert(0, ".")
import benchmarks.gpu_kernels as bench  # loads kernels/ from this checkout

status = bench.mk.gpu_status()
print(f"gpu_status: {status}")
sys.exit(0 if status.usable else 3)
EOF
then
    echo "no usable GPU: stopping (exit 3)"
    exit 3
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null || true

failed=0
echo
echo "== 2. pytest -m gpu tests/gpu"
timeout 300 "$PYTHON" -m pytest -m gpu tests/gpu -p no:cacheprovider -q -rs \
    --junitxml "$OUT/pytest-gpu.xml" || failed=$((failed + 1))

echo
echo "== 3. stand-in tests, and the stand-in's signatures against this CuPy"
timeout 120 "$PYTHON" -m pytest -m "not gpu" tests/gpu -p no:cacheprovider -q -rs \
    --junitxml "$OUT/pytest-standin.xml" || failed=$((failed + 1))

echo
echo "== 4. benchmarks/gpu_kernels.py"
timeout 420 "$PYTHON" benchmarks/gpu_kernels.py --budget "${GPU_BENCH_BUDGET:-240}" --json "$OUT/gpu_kernels.json" \
    || failed=$((failed + 1))

echo
echo "== done: $failed failed step(s); files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit "$failed"
