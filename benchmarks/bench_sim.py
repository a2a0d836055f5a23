"""mtor-sim's own cost: how fast it runs the thesis scenario, and how capacity gossip grows.

``./mtor bench sim scaling [--peers 128,256,1024,4096] [--hours 1]``: the thesis scenario at each
size; wall time, CPU time, peak memory, events and events/s (one process per size, so that the
peak memory is that size's).

``./mtor bench sim dissemination [--peers 64,128,256,512,1024]``: capacity records each peer
checks per simulated second, with no workload, for two designs measured in the same sitting:
``global`` (one topic, renewal every 120 s: the design before issue 7, the baseline) and
``region`` (a topic per region, renewal stretched to a budget of 0.5 records per second). The
first grows linearly with the number of peers; the second is flat.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.machine import machine

ROOT = Path(__file__).resolve().parent.parent
THESIS = ROOT / "simulations" / "thesis.toml"
RESULTS = Path(__file__).resolve().parent / "results" / "sim.json"


def _steady_rate(samples: list[dict[str, Any]], peers: int) -> float | None:
    """Capacity records delivered per peer per simulated second between the first and the
    last sample of the measured window."""
    if len(samples) < 2:
        return None
    first, last = samples[0], samples[-1]
    seconds = last["t"] - first["t"]
    delivered = last["gossip_delivered"] - first["gossip_delivered"]
    return round(delivered / peers / max(seconds, 1e-9), 4)


def _one_run(peers: int, hours: float, overrides: dict[str, Any]) -> dict[str, Any]:
    """Run the thesis at ``peers`` in this process; return its cost and counters."""
    import logging

    logging.disable(logging.CRITICAL)
    from mtor_p2p.sim.runner import run_scenario
    from mtor_p2p.sim.scenario import load_scenario

    scenario = load_scenario(THESIS, {"peers": peers, "hours": hours, **overrides})
    started = time.perf_counter()
    record = run_scenario(scenario)
    wall = time.perf_counter() - started
    stats = record["network"]
    simulated = scenario.duration + scenario.timing.get("warmup", 60.0) + 60.0
    return {
        "peers": peers,
        "hours": hours,
        "wall_s": round(wall, 1),
        "cpu_s": record["cpu_seconds"],
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "events": record["events"],
        "events_per_s": record["events_per_s"],
        "requests": len(record["requests"]),
        "gossip_delivered": stats["gossip_delivered"],
        "gossip_per_peer_per_s": round(stats["gossip_delivered"] / peers / simulated, 4),
        # After the warm-up (joins announce at once): what a peer checks in steady state.
        "steady_gossip_per_peer_per_s": _steady_rate(record["samples"], peers),
        "simulated_s": simulated,
    }


def _in_subprocess(peers: int, hours: float, overrides: dict[str, Any]) -> dict[str, Any]:
    code = (
        "import json, sys; from benchmarks.bench_sim import _one_run; "
        f"print(json.dumps(_one_run({peers}, {hours}, {overrides!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def scaling(peers: list[int], hours: float) -> list[dict[str, Any]]:
    """The thesis scenario at each size."""
    rows = []
    for count in peers:
        row = _in_subprocess(count, hours, {})
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def dissemination(
    peers: list[int], minutes: float, only: list[str] | None = None
) -> list[dict[str, Any]]:
    """Records checked per peer per second, both designs, no workload."""
    quiet = {"workload.interactive.rate": 0.0, "workload.batch.rate": 0.0}
    designs = {
        "global": {"timing.capacity_scope": "global", "timing.capacity_receive_rate": 1e9},
        "region": {"timing.capacity_scope": "region", "timing.capacity_receive_rate": 0.5},
    }
    rows = []
    for count in peers:
        for name, overrides in designs.items():  # interleaved: both designs at each size
            if only and name not in only:
                continue
            row = _in_subprocess(count, minutes / 60, {**quiet, **overrides})
            row["design"] = name
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
    return rows


def main(argv: list[str]) -> int:
    """Entry point (``python -m benchmarks sim ...``)."""
    parser = argparse.ArgumentParser(prog="bench sim", description=__doc__)
    parser.add_argument("what", choices=("scaling", "dissemination"))
    parser.add_argument("--peers", default=None, help="comma-separated sizes")
    parser.add_argument("--hours", type=float, default=1.0, help="simulated hours (scaling)")
    parser.add_argument("--minutes", type=float, default=5.0, help="simulated minutes (gossip)")
    parser.add_argument("--designs", default=None, help="global,region (default: both)")
    args = parser.parse_args(argv)
    if args.what == "scaling":
        sizes = [int(p) for p in (args.peers or "128,256,1024,4096").split(",")]
        rows = scaling(sizes, args.hours)
    else:
        sizes = [int(p) for p in (args.peers or "64,128,256,512,1024").split(",")]
        only = args.designs.split(",") if args.designs else None
        rows = dissemination(sizes, args.minutes, only)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    key = args.what if args.what == "scaling" else f"{args.what}-{args.designs or 'both'}"
    results[key] = {"machine": machine(), "rows": rows}
    RESULTS.write_text(json.dumps(results, indent=2))
    print(json.dumps(results[key], indent=2))
    return 0
