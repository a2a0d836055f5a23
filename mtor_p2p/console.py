"""What the command-line tools share: exit codes, the capacity table, how to name the tool.

Kept apart from :mod:`mtor_p2p.cli` so that the devnet runner (which ``cli`` starts) can use
them without importing ``cli`` back.
"""

from __future__ import annotations

import os
from typing import Any

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_NGROK = 4
EXIT_NOT_CONVERGED = 5
EXIT_LEDGER_BAD = 6
#: ``run`` on a data directory another running node holds (see :mod:`mtor_p2p.datadir`).
EXIT_IN_USE = 7
#: Interrupted by Ctrl-C (128 + SIGINT, as shells report it); ``submit`` cancels its job.
EXIT_INTERRUPTED = 130

#: One line per exit code, for ``mtor-peer --help`` (the README has the same table).
EXIT_CODES = (
    (EXIT_OK, "ok"),
    (EXIT_FAILURE, "failure (the node or the job failed, a port is in use, ...)"),
    (
        EXIT_USAGE,
        "usage or configuration error (a flag, a file, the data directory, operands whose "
        "results cannot be verified)",
    ),
    (EXIT_NOT_RUNNING, "no node running on the data directory"),
    (EXIT_NGROK, "ngrok tunnel failed"),
    (EXIT_NOT_CONVERGED, "devnet did not converge"),
    (EXIT_LEDGER_BAD, "ledger check failed"),
    (EXIT_IN_USE, "the data directory is in use by another running node"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C; submit cancels its job)"),
)

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


def format_duration(seconds: float) -> str:
    """A duration as people say it: ``29 s``, ``12 min``, ``5 h``, ``7 d`` (rounded)."""
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 120 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} d"


def format_rate(tflops: float) -> str:
    """A speed given in TFLOP/s, with 3 significant figures in a unit that suits it:
    ``61.2 MFLOP/s`` on a CPU devnet, ``512 TFLOP/s`` on a big GPU."""
    flops = tflops * 1e12
    unit, value = "", flops
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(flops) >= scale * 0.9995:
            unit, value = prefix, flops / scale
            break
    digits = 0 if abs(value) >= 99.95 else 1 if abs(value) >= 9.995 else 2
    return f"{value:.{digits}f} {unit}FLOP/s"


def format_credits(amount: float) -> str:
    """Credits as the dashboard shows them: 4 decimals from 1 up, 6 below, and 3 significant
    figures under a thousandth (a devnet shard costs ~1e-7, which ``.6f`` showed as 0)."""
    size = abs(amount)
    if size == 0 or size >= 1:
        return f"{amount:.4f}"
    if size >= 0.001:
        return f"{amount:.6f}"
    return f"{amount:.3g}"


def invoked_as() -> str:
    """The command to print in hints the user may paste: the checkout's wrapper sets
    ``MTOR_INVOKED_AS`` (``./mtor``); installed, it is ``mtor-peer``."""
    return os.environ.get("MTOR_INVOKED_AS") or "mtor-peer"
