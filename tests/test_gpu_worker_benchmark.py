"""``benchmarks/gpu_worker_e2e.py`` smoke-tested on the CuPy stand-in.

The GPU is replaced by the stand-in (``tests/gpu/cupy_standin.py``): this machine has none.
What is tested is that the script runs the peer's worker and client end to end on both
backends and checks every output; its figures come from a lent GPU (BENCHMARKS.md, "GPU").
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gpu.cupy_standin import CupyStandin


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch) -> Iterator[CupyStandin]:
    """A one-GPU stand-in machine (not a GPU) for one test."""
    monkeypatch.delenv("CUPY_TF32", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    installed = CupyStandin().install(monkeypatch)
    try:
        yield installed
    finally:
        installed.uninstall()


def test_the_gpu_worker_benchmark_runs_end_to_end_on_the_standin(
    standin: CupyStandin, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real worker and client on memnet, CuPy against NumPy: every shard's output passes
    Freivalds, cold and warm jobs run on both backends."""
    from benchmarks import gpu_worker_e2e

    out = tmp_path / "e2e.json"
    argv = ["--n", "256", "--shards", "2", "--rounds", "1", "--json", str(out)]
    assert gpu_worker_e2e.main(argv) == 0
    document = json.loads(out.read_text())
    assert document["summary"]["failed_checks"] == 0
    assert {r["backend"] for r in document["records"]} == {"cupy", "numpy"}
    assert all(r["shards_run"] == 4 for r in document["records"])  # cold and warm jobs
    assert '"summary"' in capsys.readouterr().out


def test_the_gpu_worker_benchmark_without_a_gpu_exits_3(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks import gpu_worker_e2e

    broken = CupyStandin(driver_error=100).install(monkeypatch)  # no driver answers
    try:
        assert gpu_worker_e2e.main(["--n", "64", "--rounds", "1"]) == gpu_worker_e2e.EXIT_NO_GPU
    finally:
        broken.uninstall()
    assert "no usable GPU" in capsys.readouterr().err
