"""Running simulations: one run on virtual time, and sweeps over parameters and seeds.

A run is reproducible: the scenario's seed drives the engine, every node's runtime, memnet
and trio's own scheduling coin, and network time starts at a fixed instant, so the same
scenario and seed give the same run record (wall time aside).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import trio
import trio.testing

from mtor_p2p.sim.scenario import Scenario, ScenarioError, load_scenario

RUN_FILE = "run.json"


def _seed_trio(seed: int) -> None:
    """Make trio's scheduling reproducible. Each batch of runnable tasks runs in an order
    trio shuffles (a set's order, then a coin from its own generator): trio's hook for
    deterministic tests (the one pytest-trio turns on under Hypothesis) sorts the batch by
    task creation order first, and the coin is seeded here. Both are trio internals, checked
    by ``tests/test_sim.py`` running the CLI twice in fresh processes."""
    from trio._core import _run

    _run._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[misc]
    _run._r.seed(seed)


def run_scenario(
    scenario: Scenario, *, progress: Callable[[float, dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Run ``scenario`` on a MockClock and return its run record."""
    from mtor_p2p.sim.engine import Simulation

    _seed_trio(scenario.seed)
    simulation = Simulation(scenario, progress=progress)
    clock = trio.testing.MockClock(autojump_threshold=0)
    started = time.perf_counter()
    cpu_started = time.process_time()
    record = trio.run(simulation.run, clock=clock)
    wall = time.perf_counter() - started
    stats = record.get("network", {})
    events = int(
        sum(stats.get(k, 0) for k in ("requests", "responses", "gossip_delivered", "dht_hops"))
    )
    record["wall_seconds"] = round(wall, 3)
    record["cpu_seconds"] = round(time.process_time() - cpu_started, 3)
    record["events"] = events
    record["events_per_s"] = round(events / max(wall, 1e-9), 1)
    return record


def write_run(record: dict[str, Any], out: Path) -> Path:
    """Write ``record`` to ``out/<kind>/run.json``; return the file."""
    folder = out / record["kind"]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RUN_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, separators=(",", ":")))
    tmp.replace(path)
    return path


class ProgressBar:
    """One stderr line: simulated time, wall time, events/s, requests. Redrawn in place on a
    terminal; elsewhere (a log file, a pipe) a plain line at each tenth of the run, so that
    a log does not get one line of thousands of carriage returns."""

    def __init__(self, total: float, *, enabled: bool = True, stream: Any = None) -> None:
        self.total = total
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.started = time.perf_counter()
        isatty = getattr(self.stream, "isatty", None)
        self._terminal = bool(isatty and isatty())
        self._next_tenth = 0

    def __call__(self, now: float, sample: dict[str, Any]) -> None:
        """Show progress at ``now`` simulated seconds into the run."""
        if not self.enabled:
            return
        done = min(1.0, max(0.0, now / self.total)) if self.total else 1.0
        width = 30
        bar = "#" * int(done * width) + "." * (width - int(done * width))
        wall = time.perf_counter() - self.started
        line = (
            f"[{bar}] {done:4.0%} sim {_hms(now)}/{_hms(self.total)} "
            f"wall {wall:6.0f} s  online {sample.get('online', 0)}  "
            f"requests {sample.get('requests', 0)}  busy {sample.get('busy_fraction', 0):.0%}"
        )
        if self._terminal:
            print("\r" + line, end="", file=self.stream, flush=True)
            return
        tenth = int(done * 10 + 1e-9)
        if tenth < self._next_tenth:
            return
        self._next_tenth = tenth + 1
        print(line, file=self.stream, flush=True)

    def close(self) -> None:
        """End the progress line."""
        if self.enabled and self._terminal:
            print(file=self.stream, flush=True)


def _hms(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# -- sweeps --------------------------------------------------------------------------------


def sweep_points(params: dict[str, list[Any]], seeds: list[int]) -> list[dict[str, Any]]:
    """Every combination of parameter values, once per seed (each a dict of overrides)."""
    names = sorted(params)
    points = []
    for values in itertools.product(*(params[n] for n in names)):
        for seed in seeds:
            points.append({**dict(zip(names, values, strict=True)), "seed": seed})
    return points


def point_label(point: dict[str, Any]) -> str:
    """A folder name for one sweep point."""
    parts = [f"{k}={point[k]}" for k in sorted(point) if k != "seed"]
    return ("_".join(parts) or "base").replace("/", "-") + f"/seed-{point['seed']}"


def _run_point(scenario_path: str, point: dict[str, Any], out: str) -> dict[str, Any]:
    """One sweep point in a worker process: run, write, summarise."""
    logging.basicConfig(level=logging.ERROR)
    from mtor_p2p.sim.metrics import compute_metrics

    scenario = load_scenario(scenario_path, point)
    record = run_scenario(scenario)
    folder = Path(out) / point_label(point)
    write_run(record, folder)
    return {"point": point, "folder": str(folder), "metrics": compute_metrics(record)}


def run_sweep(
    scenario_path: Path,
    params: dict[str, list[Any]],
    seeds: list[int],
    out: Path,
    *,
    workers: int | None = None,
    ray_address: str | None = None,
    on_done: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every point of the sweep (local processes, or a Ray cluster) and return their
    metrics; each run is also written under ``out``."""
    points = sweep_points(params, seeds)
    for point in points:  # fail fast on a bad parameter, before any process starts
        load_scenario(scenario_path, point)
    results: list[dict[str, Any]] = []
    if ray_address is not None:
        try:
            import ray
        except ImportError as exc:
            raise ScenarioError("--ray needs Ray: pip install 'mtor-p2p[ray]'") from exc
        ray.init(address=ray_address, ignore_reinit_error=True, log_to_driver=False)
        remote = ray.remote(_run_point)
        pending = [remote.remote(str(scenario_path), p, str(out)) for p in points]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            result = ray.get(done[0])
            results.append(result)
            if on_done:
                on_done(result)
        return results
    workers = workers or max(1, (os.cpu_count() or 2))
    with ProcessPoolExecutor(max_workers=min(workers, len(points))) as pool:
        futures = [pool.submit(_run_point, str(scenario_path), p, str(out)) for p in points]
        for future in as_completed(futures):
            result = future.result()
            results.append(result)
            if on_done:
                on_done(result)
    return results
