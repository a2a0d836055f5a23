"""A/B of populating a job's output on a thread (``populate_for_writing``) in the requester.

    .venv/bin/python benchmarks/ab_populate_output.py 2 8     # row 2 (B shared, both shipped)
    .venv/bin/python benchmarks/ab_populate_output.py p2 4    # row 6, 8192², 2 workers

Runs ``bench_compute``'s own MTOR sides, interleaved round by round (order alternating),
with the scheduler's ``populate_for_writing`` either the real one ("on") or a no-op ("off").
Only the requester (this process) differs: the workers are the same ``mtor-peer`` processes.
Prints one line per side and a JSON summary of every figure (shards/s or GFLOP/s).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmarks.bench_compute as bench
import mtor_p2p.compute.scheduler as scheduler


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not (argv[0] == "2" or argv[0].startswith("p")):
        print(__doc__, file=sys.stderr)
        return 2
    row, rounds = argv[0], int(argv[1])
    real = scheduler.populate_for_writing
    settings = bench.Settings.make(False, rounds)
    figures: dict[str, list[Any]] = {"on": [], "off": []}
    for index in range(rounds):
        for side in ("off", "on") if index % 2 == 0 else ("on", "off"):
            scheduler.populate_for_writing = real if side == "on" else (lambda array: False)
            root = Path(tempfile.mkdtemp())
            if row == "2":
                out = bench.run_mtor(bench.mtor_throughput, root, settings)
                figure: Any = [
                    round(out[v]["shards"] / out[v]["seconds"], 1)
                    for v in ("b_shared", "both_shipped")
                ]
            else:
                out = bench.run_mtor(bench.mtor_product, root, settings, int(row[1:]), 2)
                figure = round(out["gflops"], 1)
            figures[side].append(figure)
            print(index, side, figure, time.strftime("%H:%M:%S"), flush=True)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
