"""Smoke tests of the compute benchmark's harness (seconds; no cluster, no baseline install)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import baselines, bench_compute, procstats

ROOT = Path(__file__).resolve().parent.parent


def test_help_explains_the_rows_and_starts_nothing() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "compute", "--help"],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for words in ("--quick", "--only", "--rounds", "interleaved", "Ray", "Dask", "DHT"):
        assert words in done.stdout
    assert "row 1 round" not in done.stderr  # nothing measured


def test_only_and_rounds_are_checked() -> None:
    args = bench_compute.parse_args(["--only", "3,1", "--rounds", "4"])
    assert args.rows == [3, 1] and args.rounds == 4
    assert bench_compute.parse_args([]).rows == [1, 2, 7, 3, 4, 5, 6, 8]
    for bad in (["--only", "9"], ["--only", "x"], ["--rounds", "0"]):
        with pytest.raises(SystemExit):
            bench_compute.parse_args(bad)


def test_section_records_load_and_foreign_cpu() -> None:
    with procstats.Section() as section:
        sum(i * i for i in range(20000))
    for key in ("wall_s", "load1_start", "load1_end", "foreign_cores", "machine_busy_cores"):
        assert key in section.result
    assert section.result["foreign_cores"] >= 0
    memory = procstats.memory(os.getpid())
    assert memory["rss_mib"] > 0 and memory["peak_rss_mib"] >= memory["rss_mib"] - 1


def test_ratios_are_per_round_and_skip_missing_sides() -> None:
    rounds = [
        {"mtor": {"p50_ms": 20.0}, "ray": {"p50_ms": 10.0}},
        {"mtor": {"p50_ms": 30.0}, "ray": {"unavailable": "baseline unavailable"}},
        {"mtor": {"p50_ms": 12.0}, "ray": {"p50_ms": 12.0}},
    ]
    table = bench_compute.ratio_table(rounds, "p50_ms", "mtor", "ray")
    assert table == {"per_round": [2.0, None, 1.0], "median": 1.5}
    assert bench_compute.ratio_table(rounds[1:2], "p50_ms", "mtor", "ray") is None


def test_an_uninstallable_baseline_is_reported_not_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(name: str, *, log: object = None) -> Path:
        raise baselines.BaselineUnavailable(f"{name}: no registry here")

    monkeypatch.setattr(baselines, "ensure", refuse)
    settings = bench_compute.Settings.make(True, 2)
    runner = bench_compute.Runner(settings, tmp_path / "compute.json")
    shutil.rmtree(runner.scratch)
    mtor = {"samples_s": [0.02, 0.03], "matches_numpy": True,
            "section": {"load1_start": 1.0, "load1_end": 1.2, "foreign_cores": 0.1}}  # fmt: skip
    raw = runner.interleave(
        1, [("mtor", lambda r: mtor), ("ray", runner.baseline_side("ray", "roundtrip", {}))]
    )
    assert raw[0]["ray"]["unavailable"].startswith("ray: no registry")
    figures = [
        {
            side: bench_compute.figure(
                a, lambda x: {"p50_ms": 25.0, **bench_compute.load_of(x["section"])}
            )
            for side, a in answers.items()
        }
        for answers in raw
    ]
    entry = bench_compute.finish_row(
        runner, 1, "test row", [], [], figures, [("p50_ms", "mtor", "ray")], raw
    )
    assert entry["ratios_median_of_rounds"]["mtor/ray p50_ms"] == "baseline unavailable or failed"
    assert entry["rounds"][0]["mtor"]["load1"] == 1.1
    assert runner.failures == []
    saved = json.loads((tmp_path / "compute.json").read_text())
    assert saved["rows"]["1_roundtrip_512"]["rounds"][1]["ray"] == {
        "unavailable": "baseline unavailable"
    }
    assert saved["baselines"]["ray"]["unavailable"].startswith("ray:")


def test_a_side_session_returns_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTOR_BASELINES_WORK", str(tmp_path))
    answer = baselines.run_side(
        sys.executable, "numpy", "product", {"n": 128, "reps": 2}, env=baselines.blas_env(1)
    )
    assert len(answer["samples_s"]) == 2
    assert answer["blas"]["OPENBLAS_NUM_THREADS"] == "1"
    assert "foreign_cores" in answer["section"]


@pytest.mark.parametrize("kind", ["tcp", "tls"])
def test_bulk_socket_baselines_move_the_bytes(tmp_path: Path, kind: str) -> None:
    from benchmarks.bulk_procs import make_certs

    make_certs(tmp_path)
    base = [sys.executable, "-m", "benchmarks.bulk_procs"]
    opts = ["--size", str(1 << 20), "--certs", str(tmp_path)]
    server = subprocess.Popen(
        [*base, "server", kind, *opts], stdout=subprocess.PIPE, stdin=subprocess.PIPE,
        text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        addr = bench_compute.ready_line(server)["addr"]
        done = subprocess.run(
            [*base, "client", kind, addr, *opts, "--count", "2"],
            capture_output=True, text=True, cwd=ROOT, timeout=60, check=True,
        )  # fmt: skip
        answer = json.loads(done.stdout.strip().splitlines()[-1])
        assert len(answer["up_s"]) == 2 and len(answer["down_s"]) == 2
        if kind == "tls":
            assert answer["cipher"][1] == "TLSv1.3"
    finally:
        bench_compute.stop([server])


def run_row_6(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    numpy_seconds: list[float],
    split_seconds: float,
    mtor_seconds: float,
) -> tuple[Any, list[str]]:
    """Row 6 with every side faked: NumPy's runs take ``numpy_seconds`` in turn, each split
    side ``split_seconds``, each MTOR side ``mtor_seconds``. The runner, and the sides' order."""
    settings = bench_compute.Settings.make(True, 1)
    runner = bench_compute.Runner(settings, tmp_path / "compute.json")
    shutil.rmtree(runner.scratch)
    section = {"load1_start": 1.0, "load1_end": 1.0, "foreign_cores": 0.0}
    numpy_times = iter(numpy_seconds)
    order: list[str] = []

    def interleave(row: int, sides: list[tuple[str, object]]) -> list[dict[str, object]]:
        answers: dict[str, object] = {}
        for name, _ in sides:
            order.append(name)
            if name.startswith("numpy"):
                answers[name] = {"samples_s": [next(numpy_times)], "section": section,
                                 "blas": {"OPENBLAS_NUM_THREADS": "2"}}  # fmt: skip
            elif name.startswith("split"):
                answers[name] = {"samples_s": [split_seconds], "section": section,
                                 "processes": 2, "blas": {"OPENBLAS_NUM_THREADS": "1"}}  # fmt: skip
            else:
                answers[name] = {"seconds": mtor_seconds, "workers_used": 1, "section": section,
                                 "blas_threads_per_worker": 1}  # fmt: skip
        return [answers]

    monkeypatch.setattr(runner, "interleave", interleave)
    bench_compute.row_scaling(runner)
    return runner, order


def test_row_6_compares_each_mtor_side_with_the_numpy_runs_around_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NumPy runs before every MTOR side and after the last; each MTOR side's ratio is
    against the mean time of its two neighbours (and, as before, the round's first)."""
    runner, order = run_row_6(tmp_path, monkeypatch, [1.0, 3.0, 2.0, 2.0], 3.0, 4.0)
    assert order == ["numpy", "mtor_1w", "numpy_after_1w", "mtor_2w", "split_2w",
                     "numpy_after_2w", "mtor_4w", "split_4w", "numpy_after_4w"]  # fmt: skip
    ratios = runner.report["rows"]["6_product_scaling"]["ratios_median_of_rounds"]
    assert ratios["mtor_1w/numpy_around_1w gflops"]["median"] == pytest.approx(0.5, rel=0.01)
    assert ratios["mtor_2w/numpy_around_2w gflops"]["median"] == pytest.approx(0.625, rel=0.01)
    assert ratios["mtor_4w/numpy_around_4w gflops"]["median"] == pytest.approx(0.5, rel=0.01)
    assert ratios["mtor_4w/numpy gflops"]["median"] == pytest.approx(0.25, rel=0.01)
    # The plain split product (3 s) against NumPy around it (2.5 s), and MTOR (4 s) against it.
    assert ratios["split_2w/numpy_around_2w gflops"]["median"] == pytest.approx(0.833, rel=0.01)
    assert ratios["mtor_2w/split_2w gflops"]["median"] == pytest.approx(0.75, rel=0.01)
    assert "split_1w/numpy_around_1w gflops" not in ratios  # one process: NumPy itself


def test_each_row_prints_what_its_sides_mean_and_whether_its_goal_was_met(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A new user read split_2w and numpy_around_2w with nothing saying what they were, and
    no line saying whether the goal was met. NumPy around a side is the mean of the measured
    times, not of the printed (rounded) ones: 0.0949 and 0.0945 s must not make 0.09."""
    runner, _ = run_row_6(tmp_path, monkeypatch, [0.0949, 0.0945, 0.0947, 0.0951], 0.1, 0.1)
    ratios = runner.report["rows"]["6_product_scaling"]["ratios_median_of_rounds"]
    # 0.1 s against the mean of 0.0949 and 0.0945 s: 0.947, where rounded seconds gave 0.9.
    assert ratios["mtor_1w/numpy_around_1w gflops"]["median"] == pytest.approx(0.947, abs=0.002)
    printed = capsys.readouterr().err
    assert "still differs: split_Nw: the same shards over N plain NumPy processes" in printed
    assert "numpy_around_Nw: the mean time" in printed
    assert "verdict: mtor_2w/numpy_around_2w gflops 0.946x, goal >= 0.8x: met" in printed
    verdicts = bench_compute.goal_verdicts(
        1, {"mtor/ray p50_ms": {"per_round": [1.1, 1.2], "median": 1.15}}
    )
    assert verdicts == ["mtor/ray p50_ms 1.15x, goal <= 1x: short"]
    assert bench_compute.goal_verdicts(2, {}) == [
        "mtor/dask b_shared_shards_per_s: not measured",
        "mtor/dask both_shipped_shards_per_s: not measured",
    ]
    # A verdict from small settings says so: a goal counts in a full run.
    quick, one_round, full = (
        bench_compute.Settings.make(quick=True, rounds=3),
        bench_compute.Settings.make(quick=False, rounds=1),
        bench_compute.Settings.make(quick=False, rounds=3),
    )
    assert "indicative only" in bench_compute.verdict_caveat(quick)
    assert bench_compute.verdict_caveat(one_round) == " (1 round: indicative only)"
    assert bench_compute.verdict_caveat(full) == ""


def test_the_split_product_runs_every_shard_on_forked_processes() -> None:
    """``product_split`` (row 6's ceiling) computes in as many processes as asked and says so;
    a tiny product, one BLAS thread."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "baseline_side.py"), "numpy",
         "product_split", json.dumps({"n": 256, "processes": 3, "shards": 6, "reps": 2})],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=True, env=env,
    )  # fmt: skip
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["processes"] == 3 and answer["shards"] == 6
    assert len(answer["samples_s"]) == 2 and all(x > 0 for x in answer["samples_s"])


def test_row_6_gives_each_worker_two_shards_of_at_least_1024_rows() -> None:
    """Two shards per worker for pipelining, none under 1024 rows (BLAS packs B once per
    shard) unless a worker would otherwise get none."""
    shards = bench_compute.product_shards
    assert [shards(8192, w) for w in (1, 2, 4)] == [2, 4, 8]
    assert [shards(2048, w) for w in (1, 2, 4)] == [2, 2, 4]  # 1024-row floor, then 1 each
    assert shards(512, 2) == 2
    for rows in (512, 2048, 8192):
        for workers in (1, 2, 4):
            count = shards(rows, workers)
            assert workers <= count <= 2 * workers
            assert count == workers or rows // count >= bench_compute.PRODUCT_SHARD_MIN_ROWS


def test_the_machine_record_tells_the_projects_same_named_cpus_apart() -> None:
    from benchmarks import machine

    text = (
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
        "model name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512bw\n\n"
        "processor\t: 1\ncpu family\t: 99\nmodel\t\t: 1\nmodel name\t: Other\n"
    )
    fields = machine._cpuinfo_fields(text)
    assert (fields["model name"], fields["cpu family"], fields["model"]) == ("AMD EPYC", "25", "17")
    assert "avx512f" in fields["flags"].split()
    record = machine.machine()
    for key in ("cpu", "cpu_family", "cpu_model", "avx512", "cores", "seconds_since_boot"):
        assert key in record
    line = machine.describe(
        {"cpu": "AMD EPYC", "cpu_family": "25", "cpu_model": "17", "avx512": True, "cores": 2,
         "seconds_since_boot": 600.0}
    )  # fmt: skip
    assert line == "AMD EPYC (family 25 model 17, AVX-512), 2 cores, booted 10 min ago"
