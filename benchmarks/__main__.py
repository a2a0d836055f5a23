"""``python -m benchmarks NAME [options]``; names: peer."""

from __future__ import annotations

import sys


def main() -> int:
    """Dispatch to one benchmark module."""
    args = sys.argv[1:]
    name = args[0] if args else "peer"
    if name == "peer":
        from benchmarks.bench_peer import main as run

        return run(args[1:])
    print(f"unknown benchmark {name!r}; known: peer", file=sys.stderr)
    return 2


sys.exit(main())
