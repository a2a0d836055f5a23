"""``python -m benchmarks NAME [options]``; names: peer, compute, ledger, sim, attacks,
control, nat, dashboard, trace."""

from __future__ import annotations

import sys


def main() -> int:
    """Dispatch to one benchmark module."""
    args = sys.argv[1:]
    name = args[0] if args else "peer"
    if name in ("-h", "--help", "help"):
        print(
            "usage: ./mtor bench NAME [options]   (or: python -m benchmarks NAME [options])\n"
            "NAME: peer (the default), compute, ledger, sim, attacks, control, nat, dashboard,\n"
            "trace;\n"
            "'./mtor bench NAME --help' explains each one. Results and baselines: BENCHMARKS.md"
        )
        return 0
    if name == "peer":
        from benchmarks.bench_peer import main as run

        return run(args[1:])
    if name == "compute":
        from benchmarks.bench_compute import main as run

        return run(args[1:])
    if name == "ledger":
        from benchmarks.bench_ledger import main as run

        return run(args[1:])
    if name == "sim":
        from benchmarks.bench_sim import main as run

        return run(args[1:])
    if name == "attacks":
        from benchmarks.bench_attacks import main as run

        return run(args[1:])
    if name == "nat":
        from benchmarks.bench_nat import main as run

        return run(args[1:])
    if name == "dashboard":
        from benchmarks.bench_dashboard import main as run

        return run(args[1:])
    if name == "trace":
        from benchmarks.bench_trace import main as run

        return run(args[1:])
    if name == "control":
        from benchmarks.bench_control import main as run

        return run(args[1:])
    print(
        f"unknown benchmark {name!r}; known: peer, compute, ledger, sim, attacks, control, "
        "nat, dashboard, trace",
        file=sys.stderr,
    )
    return 2


sys.exit(main())
