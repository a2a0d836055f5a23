"""What the dashboard page shows, as one JSON object (a *snapshot*) built from a running node.

Everything here reads what the node already holds; the SQLite and NVML reads arrive in
``slow`` (:meth:`Dashboard._read_blocking`, run in a thread). Amounts are in credits (the
ledger's nano-credits divided by 10^9) as the CLI shows them.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from mtor_p2p import __version__
from mtor_p2p.insight import peers_in_view, peers_view, why_no_work

if TYPE_CHECKING:
    from mtor_p2p.dashboard import Dashboard
    from mtor_p2p.node import Node

NANO = 1_000_000_000
#: Jobs and receipt lines a snapshot carries.
SNAPSHOT_JOBS = 10
#: Jobs whose accepted shards a snapshot lists (running ones always).
SNAPSHOT_JOBS_WITH_SHARDS = 2
SNAPSHOT_RECEIPTS = 30


def snapshot(node: Node, slow: dict[str, Any], dashboard: Dashboard) -> dict[str, Any]:
    """The page's snapshot of ``node`` (see the module docstring)."""
    now = node.clock.now()
    peers = peers_view(node)
    counted = peers_in_view(node)
    return finite(
        {
            "sent_at": round(time.time() * 1000, 1),  # wall clock, for the page's latency figure
            "tick": dashboard.tick,
            "node": node_summary(node, now),
            "devices": _devices(node, slow),
            "peers": peers,
            "peers_total": counted["total"],
            "regions": _regions(counted["by_region"], node),
            "jobs": _jobs(node),
            "receipts": _receipts(node, slow),
            "ledger": _ledger(slow["ledger"]),
            "history": _history(dashboard),
            "warnings": dashboard.warnings.records[-20:][::-1],
            "why_no_work": why_no_work(node),
        }
    )


def finite(value: Any) -> Any:
    """``value`` with every float that is not finite replaced by None: JSON has no NaN or
    infinity (the page's ``JSON.parse`` refuses them), and a figure computed from what a
    peer claims must not blank the page."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def node_summary(node: Node, now: float) -> dict[str, Any]:
    """The dashboard's "this node" panel: identity, reachability, what it serves and has run."""
    reachability = node.reachability()
    return {
        "peer_id": node.peer_id,
        "version": __version__,
        "region": node.config.region,
        "uptime_s": round(now - node.started_at, 1),
        "addrs": node.addrs(),
        "reachability": None if reachability is None else reachability.get("summary"),
        "tunnel": node.tunnel_url,
        "connected_peers": len(node.network.connected_peers()),
        "view_size": len(node.capacity.view.live(now)),
        "serving": node.serve,
        "kernels": list(node.worker.kernels) if node.serve else [],
        "backend": node.worker.executor.name,
        "tflops": round(node.tflops, 3),
        "price": node.price,
        "shards_run": node.worker.stats.shards_run,
        "shards_failed": node.worker.stats.shards_failed,
        # Operands requesters on this machine handed over in shared memory, not uploaded.
        "operands_shared": node.worker.stats.local_uploads,
        "bytes_shared": node.worker.stats.bytes_shared,
        "outputs_shared": node.worker.stats.outputs_shared,
        "output_bytes_shared": node.worker.stats.output_bytes_shared,
    }


def _devices(node: Node, slow: dict[str, Any]) -> list[dict[str, Any]]:
    sensors = {s.index: s for s in slow.get("sensors", [])}
    out = []
    gpu_index = 0
    for device in node.devices:
        row: dict[str, Any] = {
            "kind": device.kind,
            "name": device.name,
            "mem_total": device.mem_total,
            "mem_free": device.mem_free,
            "utilization": device.utilization,
            "cores": device.cores,
            "temperature_c": None,
            "power_w": None,
        }
        if device.kind == "gpu":
            card = sensors.get(gpu_index)
            gpu_index += 1
            if card is not None:
                row["temperature_c"] = card.temperature_c
                row["power_w"] = card.power_w
                if card.utilisation is not None:
                    row["utilization"] = round(card.utilisation * 100, 1)
        elif slow.get("cpu_percent") is not None:
            row["utilization"] = slow["cpu_percent"]
        out.append(row)
    return out


def _regions(by_region: dict[str, dict[str, Any]], node: Node) -> dict[str, dict[str, Any]]:
    """Peers in view by region (every live record, counted by :func:`peers_in_view`: their
    number, claimed TFLOP/s and median price), this node's region marked."""
    table = {region: {**entry, "self": False} for region, entry in by_region.items()}
    own = table.setdefault(
        node.config.region, {"peers": 0, "tflops": 0.0, "price_median": node.price}
    )
    own["self"] = True
    own["peers"] += 1
    own["tflops"] = (own["tflops"] or 0.0) + node.tflops
    return table


def _jobs(node: Node) -> dict[str, Any]:
    """The latest jobs; the shard by shard detail for the newest few only (the page draws
    the newest jobs' grids), in a compact form."""
    jobs = node.jobs.jobs(SNAPSHOT_JOBS)
    listed = []
    for index, job in enumerate(jobs):
        body = job.to_json(shards=index < SNAPSHOT_JOBS_WITH_SHARDS or job.state == "running")
        if body.get("shards"):
            # Compact: [index, worker number, seconds, attempts] with the workers listed once
            # (a shard as a dict repeating its worker's peer ID was ~100 bytes, this ~15).
            workers = sorted({shard["worker"] for shard in body["shards"]})
            number = {worker: i for i, worker in enumerate(workers)}
            body["shard_workers"] = workers
            body["shards"] = [
                [s["index"], number[s["worker"]], s["seconds"], s["attempts"]]
                for s in body["shards"]
            ]
        listed.append(body)
    return {"running": sum(1 for j in jobs if j.state == "running"), "list": listed}


def _receipts(node: Node, slow: dict[str, Any]) -> dict[str, Any]:
    """The receipts behind the balance, line by line (:func:`insight.earnings`), with how
    they reconcile with the ledger's account."""
    earned = slow["earnings"]
    me = node.peer_id
    lines = [
        {
            "job_id": line["job_id"],
            "shard": line["shard"],
            "kernel": line["kernel"],
            "role": "earned" if line["role"] == "worker" else "paid",
            "peer": line["requester"] if line["worker"] == me else line["worker"],
            "credits": line["cost_nano"] / NANO,
            "ended": line["ended"],
            "countersigned": line["countersigned"],
            "entry": line["entry"],
            "in_ledger": line["in_ledger"],
        }
        for line in earned["lines"]
    ]
    reconciliation = earned["reconciliation"]
    return {
        "count": earned["receipts_held"],
        "recent": lines,
        "terms": [
            {"item": t["item"], "credits": t["nano"] / NANO} for t in reconciliation["terms"]
        ],
        "unexplained": reconciliation["unexplained_nano"] / NANO,
    }


def _ledger(summary: dict[str, Any]) -> dict[str, Any]:
    return {
        "balance": summary.get("balance", 0) / NANO,
        "stake": summary.get("stake", 0) / NANO,
        "slashed": summary.get("slashed", 0) / NANO,
        "spendable": summary.get("spendable", 0) / NANO,
        "receipts": summary.get("receipts"),
        "entries": summary.get("entries"),
        "network": summary.get("network"),
    }


def _history(dashboard: Dashboard) -> dict[str, list[float]]:
    points = list(dashboard.history)
    return {
        "t": [p[0] for p in points],
        "balance": [p[1] for p in points],
        "stake": [p[2] for p in points],
        "price": [p[3] for p in points],
    }
