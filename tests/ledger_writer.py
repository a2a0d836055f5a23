"""Writes ledger entries as fast as it can and prints each batch's IDs once ingested.

Run by tests/test_ledger_crash.py as a real subprocess, which SIGKILLs it mid-write. Usage:
``python -m tests.ledger_writer LEDGER_PATH SEED``.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import blake3

from mtor_p2p.ledger.store import Ledger
from tests.ledger_data import PEERS, genesis, receipt, stake


def main() -> None:
    path, seed = Path(sys.argv[1]), int(sys.argv[2])
    gen = genesis()
    ledger = Ledger(path, gen)
    rng = random.Random(seed)
    number = 0
    while True:
        batch = [
            receipt(
                PEERS[rng.randrange(2)],
                PEERS[2 + rng.randrange(2)],
                price=rng.uniform(0.1, 3.0),
                shard=number + i,
            )
            for i in range(rng.randint(1, 40))
        ]
        if rng.random() < 0.1:
            batch.append(stake(PEERS[rng.randrange(2)], 1, gen))
        number += len(batch)
        ledger.ingest(batch)
        # Acknowledged only after ingest returned: these must survive the kill.
        print(json.dumps([blake3.blake3(w).hexdigest() for w in batch]), flush=True)


if __name__ == "__main__":
    main()
