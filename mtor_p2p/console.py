"""What the command-line tools share: exit codes and the capacity table.

Kept apart from :mod:`mtor_p2p.cli` so that the devnet runner (which ``cli`` starts) can use
them without importing ``cli`` back.
"""

from __future__ import annotations

from typing import Any

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_NGROK = 4
EXIT_NOT_CONVERGED = 5
EXIT_LEDGER_BAD = 6

GIB = 1 << 30


def format_peers_table(peers: list[dict[str, Any]]) -> str:
    """The capacity view as a fixed-width table."""
    header = (
        f"{'PEER':<14} {'REGION':<7} {'DEVICE':<28} {'TFLOP/S':>8} {'FREE GiB':>9} "
        f"{'LOAD':>5} {'PRICE':>7} {'TTL s':>6}"
    )
    lines = [header]
    for peer in peers:
        device = peer["devices"][0]["name"] if peer["devices"] else "-"
        lines.append(
            f"{'…' + peer['peer_id'][-12:]:<14} {peer['region'][:7]:<7} {device[:28]:<28} "
            f"{peer['tflops']:>8.3f} {peer['mem_free'] / GIB:>9.1f} {peer['load']:>5.2f} "
            f"{peer['price']:>7.2f} {peer['expires_in']:>6.0f}"
        )
    lines.append(f"{len(peers)} peer(s)")
    return "\n".join(lines)
