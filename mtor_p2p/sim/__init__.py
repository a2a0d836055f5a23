"""mtor-sim: MTOR's real peer code at 1,000+ peers on virtual time.

Researchers embedding the simulator get what the ``mtor-sim`` command does::

    from pathlib import Path
    from mtor_p2p.sim import load_scenario, run_scenario, write_report, write_run

    out = Path("sim-out/mine")
    scenario = load_scenario("simulations/thesis.toml", {"peers": 256, "hours": 0.25})
    record = run_scenario(scenario)            # the run record: requests, shards, samples...
    write_run(record, out)                     # out/<kind>/run.json
    write_report(out, {record["kind"]: record})  # metrics.json, plots, report.md

or drive a world themselves, on virtual time (trio's MockClock: simulated minutes pass in
moments, and the simulator needs it, since it waits for simulated time to pass)::

    async def main():
        async with Simulation(scenario).running() as sim:
            node = sim.peers[5].node
            result = await node.submit("matmul", {"a": a, "b": b})

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))

Each simulated peer is an unmodified :class:`mtor_p2p.node.Node` on the in-memory network
(:mod:`mtor_p2p.memnet`); devices and the world around the peers are modelled (see
``simulations/README.md``).
"""

from mtor_p2p.sim.engine import Simulation
from mtor_p2p.sim.metrics import assess_claims, compare, compute_metrics
from mtor_p2p.sim.report import load_runs, write_report
from mtor_p2p.sim.runner import run_scenario, run_sweep, write_run
from mtor_p2p.sim.scenario import Scenario, ScenarioError, load_scenario

__all__ = [
    "Scenario",
    "ScenarioError",
    "Simulation",
    "assess_claims",
    "compare",
    "compute_metrics",
    "load_runs",
    "load_scenario",
    "run_scenario",
    "run_sweep",
    "write_report",
    "write_run",
]
