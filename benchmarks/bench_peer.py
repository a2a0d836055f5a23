"""Peer figures for issue 2, each beside a baseline measured in the same run.

* dial latency on loopback (full libp2p dial: TCP + multistream + Noise + Yamux) beside a raw
  TCP connect in the same event loop;
* DHT get p50/p99 among 20 and 100 hosts in one process, beside a raw request/response round
  trip over an already open libp2p connection (the floor one DHT hop cannot beat);
* memory per peer: marginal RSS per in-process host, and RSS of each devnet peer process;
* time until a new peer's capacity reaches every view of a 20-peer devnet;
* ``--announce-only``: CPU of one capacity announcement (DHT put and gossip) across five
  peers on loopback, MTOR's put on lanes beside py-libp2p's ``put_value``, alternating.

Run: ``./mtor bench peer`` (or ``python -m benchmarks peer``); writes
``benchmarks/results/peer.json`` and prints a Markdown summary.
"""

from __future__ import annotations

import gc
import json
import logging
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import trio

from benchmarks.machine import machine
from mtor_p2p.control import ControlClient
from mtor_p2p.identity import Identity
from mtor_p2p.libp2p_host import Libp2pNetwork
from mtor_p2p.network import NetworkError

RESULTS = Path(__file__).with_name("results")
logging.getLogger("libp2p").setLevel(logging.CRITICAL)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary_ms(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_ms": round(statistics.median(values) * 1e3, 3),
        "p99_ms": round(percentile(values, 99) * 1e3, 3),
        "mean_ms": round(statistics.fmean(values) * 1e3, 3),
    }


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


class AcceptAll:
    def validate(self, key: str, value: bytes) -> None:
        return None

    def select(self, key: str, values: list[bytes]) -> int:
        return 0


# -- dial ------------------------------------------------------------------------------------


async def bench_dial(samples: int = 40) -> dict[str, Any]:
    async with Libp2pNetwork.open(Identity.generate()) as server:
        libp2p_dials = []
        for _ in range(samples):
            async with Libp2pNetwork.open(Identity.generate()) as client:
                start = time.perf_counter()
                await client.connect(server.addrs()[0])
                libp2p_dials.append(time.perf_counter() - start)
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        raw = []
        async with trio.open_nursery() as nursery:

            async def accept_and_close(stream: trio.SocketStream) -> None:
                await stream.aclose()

            nursery.start_soon(trio.serve_listeners, accept_and_close, listeners)
            for _ in range(samples):
                start = time.perf_counter()
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                raw.append(time.perf_counter() - start)
                await stream.aclose()
            nursery.cancel_scope.cancel()
    libp2p = summary_ms(libp2p_dials)
    baseline = summary_ms(raw)
    return {
        "libp2p_dial": libp2p,
        "baseline_raw_tcp_connect": baseline,
        "ratio_p50": round(libp2p["p50_ms"] / baseline["p50_ms"], 1),
    }


# -- DHT -------------------------------------------------------------------------------------


async def run_host(*, task_status: trio.TaskStatus[Libp2pNetwork]) -> None:
    async with Libp2pNetwork.open(Identity.generate()) as network:
        task_status.started(network)
        await trio.sleep_forever()


async def bench_dht(peers: int, gets: int = 100) -> dict[str, Any]:
    rng = random.Random(peers)
    gc.collect()
    rss_before = rss_mib()
    async with trio.open_nursery() as nursery:
        # One task per host rather than 100 nested context managers: flat, and tearing the
        # hosts down does not recurse through every one of them.
        start = time.perf_counter()
        networks = [await nursery.start(run_host) for _ in range(peers)]
        for network in networks:
            network.register_dht_validator("mtor", AcceptAll())
        start_s = time.perf_counter() - start
        # Each host dials up to 4 earlier hosts: a connected graph with no central hub.
        for index, network in enumerate(networks[1:], start=1):
            for other in rng.sample(networks[:index], min(4, index)):
                await network.connect(other.addrs()[0])
        gc.collect()
        rss_per_host = (rss_mib() - rss_before) / peers
        with trio.move_on_after(30):
            while sum(n.routing_table_size() for n in networks) / peers < min(peers - 1, 8):
                await trio.sleep(0.2)
        rt_mean = statistics.fmean(n.routing_table_size() for n in networks)
        # A sample of hosts store one value each; readers that do not hold a value look it up.
        owners = rng.sample(range(peers), min(peers, 20))
        put_durations = []
        for owner in owners:
            start = time.perf_counter()
            await networks[owner].dht_put(f"/mtor/bench/{owner}", b"v" * 200 + str(owner).encode())
            put_durations.append(time.perf_counter() - start)
        # Every get is a network lookup: a reader that already holds a replica (with k = 20
        # every host holds every value in networks of 20 or fewer) forgets it first.
        durations, misses = [], 0
        for _ in range(gets):
            owner = rng.choice(owners)
            reader = rng.choice([i for i in range(peers) if i != owner])
            key = f"/mtor/bench/{owner}"
            networks[reader]._dht.value_store.remove(key.encode())
            start = time.perf_counter()
            value = await networks[reader].dht_get(key, timeout=10)
            durations.append(time.perf_counter() - start)
            if value is None or not value.endswith(str(owner).encode()):
                misses += 1

        # Baseline: one request/response on an already open connection (what a DHT hop costs
        # at the very least).
        async def echo(sender: str, data: bytes) -> bytes:
            return data

        networks[0].handle("/mtor/bench/echo/1", echo)
        peer0 = networks[0].peer_id
        partner = next(n for n in networks[1:] if peer0 in n.connected_peers())
        rtts, rtt_failures = [], 0
        for _ in range(gets):
            start = time.perf_counter()
            try:
                await partner.request(peer0, "/mtor/bench/echo/1", b"x" * 200, timeout=30)
            except NetworkError:
                rtt_failures += 1  # counted, not fatal: the loaded loop is what is measured
                continue
            rtts.append(time.perf_counter() - start)
        nursery.cancel_scope.cancel()
    return {
        "peers": peers,
        "start_ms_per_host": round(start_s / peers * 1e3, 2),
        "rss_mib_per_host_in_process": round(rss_per_host, 2),
        "routing_table_mean": round(rt_mean, 1),
        "put": summary_ms(put_durations),
        "get_by_lookup": summary_ms(durations),
        "get_misses": misses,
        "baseline_request_rtt": summary_ms(rtts),
        "baseline_request_failures": rtt_failures,
    }


# -- devnet ----------------------------------------------------------------------------------


def _views(data_dirs: list[Path]) -> list[set[str]]:
    views = []
    for data_dir in data_dirs:
        try:
            peers = ControlClient.for_data_dir(data_dir, timeout=5).call("GET", "/v1/peers")
            views.append({p["peer_id"] for p in peers["peers"]})
        except Exception:
            views.append(set())
    return views


def bench_devnet_convergence(peers: int = 20, newcomers: int = 3) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="mtor-bench-devnet-"))
    devnet = subprocess.Popen(
        [
            sys.executable, "-m", "mtor_p2p", "devnet", "--peers", str(peers), "--json",
            "--dir", str(root / "net"), "--record-ttl", "30", "--announce-interval", "5",
            "--timeout", "240",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    result: dict[str, Any] = {"peers": peers}
    try:
        assert devnet.stdout is not None
        ready = json.loads(devnet.stdout.readline())
        result["devnet_converged_s"] = ready["converged_s"]
        data_dirs = [Path(p["data_dir"]) for p in ready["peers"]]
        bootstrap = ready["peers"][0]["addrs"][0]
        result["peer_rss_mib"] = round(
            statistics.median(
                psutil.Process(p["pid"]).memory_info().rss / 2**20 for p in ready["peers"]
            ),
            1,
        )
        spawn_to_all, ready_to_all, spawn_to_ready = [], [], []
        for index in range(newcomers):
            data_dir = root / f"newcomer-{index}"
            started = time.perf_counter()
            process = subprocess.Popen(
                [
                    sys.executable, "-m", "mtor_p2p", "run", "--data-dir", str(data_dir),
                    "--listen", "/ip4/127.0.0.1/tcp/0", "--no-default-bootstrap", "--gpu", "none",
                    "--bootstrap", bootstrap, "--record-ttl", "30", "--announce-interval", "5",
                    "--json",
                ],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                text=True,
            )  # fmt: skip
            try:
                assert process.stdout is not None
                peer_id = json.loads(process.stdout.readline())["peer_id"]
                ready_at = time.perf_counter()
                deadline = ready_at + 60
                while time.perf_counter() < deadline:
                    if all(peer_id in v for v in _views(data_dirs)):
                        break
                    time.sleep(0.05)
                done = time.perf_counter()
                spawn_to_all.append(done - started)
                ready_to_all.append(done - ready_at)
                spawn_to_ready.append(ready_at - started)
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=20)
            time.sleep(2)
        result["new_peer_ready_to_every_view_s"] = {
            "median": round(statistics.median(ready_to_all), 2),
            "max": round(max(ready_to_all), 2),
            "samples": [round(x, 2) for x in ready_to_all],
        }
        result["new_peer_spawn_to_every_view_s"] = round(statistics.median(spawn_to_all), 2)
        result["baseline_process_spawn_to_ready_s"] = round(statistics.median(spawn_to_ready), 2)
    finally:
        devnet.send_signal(signal.SIGINT)
        devnet.wait(timeout=60)
    return result


def dht_only(sizes: list[int]) -> int:
    """Re-measure the DHT sections alone, updating results/peer.json in place."""
    path = RESULTS / "peer.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    report["dht_measured"] = time.strftime("%Y-%m-%d %H:%M:%S")
    for size in sizes:
        print(f"DHT among {size} hosts ...", file=sys.stderr)
        report[f"dht_{size}"] = trio.run(bench_dht, size)
        path.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k.startswith("dht")}, indent=2))
    return 0


#: Announcements per measured window, and the pause between two (a peer's own loop announces
#: every 20 s; back to back they would overlap and queue).
ANNOUNCEMENTS = 40
ANNOUNCE_GAP_S = 0.1


async def bench_announce(rounds: int) -> dict[str, Any]:
    """CPU per capacity announcement across a requester and four ``mtor-peer run`` workers.

    One announcement is a signed capacity record gossiped to the four and put in the DHT.
    Each round measures, on one cluster, ANNOUNCEMENTS announcements by the in-process node
    with MTOR's put (lookup and stores on lanes) and as many with py-libp2p's ``put_value``
    (a stream per RPC), in alternating order; CPU is that of all five processes over each
    window, less what they used idle over a window as long just after it."""
    from benchmarks import procstats
    from benchmarks.bench_compute import mtor_cluster

    def cpu(pids: list[int]) -> float:
        return sum(procstats.cpu_seconds(pid) for pid in pids) + time.process_time()

    out: dict[str, Any] = {"announcements": ANNOUNCEMENTS, "gap_s": ANNOUNCE_GAP_S, "rounds": []}
    with tempfile.TemporaryDirectory() as root:
        async with mtor_cluster(Path(root), 4, 1) as cluster:
            node = cluster.node
            network = node.network  # the py-libp2p adapter (metered in place)
            lanes_put = network._put_value

            async def kademlia_put(key: str, value: bytes) -> None:
                await network._dht.put_value(key, value)

            pids = [p.pid for p in cluster.processes]
            out["settled_s"] = cluster.settled_s
            for index in range(rounds):
                order = ["lanes", "py-libp2p"] if index % 2 == 0 else ["py-libp2p", "lanes"]
                row: dict[str, Any] = {}
                for kind in order:
                    network._put_value = lanes_put if kind == "lanes" else kademlia_put
                    took = []
                    start, started = cpu(pids), time.perf_counter()
                    for _ in range(ANNOUNCEMENTS):
                        began = time.perf_counter()
                        await node.capacity.announce()
                        took.append(time.perf_counter() - began)
                        await trio.sleep(ANNOUNCE_GAP_S)
                    window = time.perf_counter() - started
                    used = cpu(pids) - start
                    idle_start = cpu(pids)
                    await trio.sleep(window)
                    idle = cpu(pids) - idle_start
                    row[kind] = {
                        "cpu_ms_per_announcement": round((used - idle) / ANNOUNCEMENTS * 1e3, 1),
                        "cpu_ms_raw": round(used / ANNOUNCEMENTS * 1e3, 1),
                        "idle_cpu_ms_per_s": round(idle / window * 1e3, 1),
                        "announce_p50_ms": round(statistics.median(took) * 1e3, 1),
                        "announce_max_ms": round(max(took) * 1e3, 1),
                    }
                    print(f"  round {index + 1} {kind}: {row[kind]}", file=sys.stderr)
                out["rounds"].append(row)
            network._put_value = lanes_put
    for kind in ("lanes", "py-libp2p"):
        values = [r[kind]["cpu_ms_per_announcement"] for r in out["rounds"]]
        out[f"{kind}_cpu_ms_median"] = statistics.median(values)
    ratios = [
        r["lanes"]["cpu_ms_per_announcement"] / r["py-libp2p"]["cpu_ms_per_announcement"]
        for r in out["rounds"]
    ]
    out["ratio_lanes_over_py_libp2p_median"] = round(statistics.median(ratios), 2)
    return out


def announce_only(argv: list[str]) -> int:
    """Measure the announcement section alone, updating results/peer.json in place."""
    rounds = int(argv[argv.index("--rounds") + 1]) if "--rounds" in argv else 4
    path = RESULTS / "peer.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    print(f"capacity announcement CPU, {rounds} rounds ...", file=sys.stderr)
    report["announce"] = trio.run(bench_announce, rounds)
    report["announce"]["machine"] = machine()
    report["announce"]["when"] = time.strftime("%Y-%m-%d %H:%M:%S")
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["announce"], indent=2))
    return 0


def main(argv: list[str]) -> int:
    if "--help" in argv or "-h" in argv:
        print(__doc__)
        return 0
    if "--announce-only" in argv:
        return announce_only(argv)
    sizes = [8, 20, 100]
    if "--quick" in argv:
        sizes = [8]
    if "--dht-only" in argv:
        if "--sizes" in argv:
            sizes = [int(n) for n in argv[argv.index("--sizes") + 1].split(",")]
        return dht_only(sizes)
    report: dict[str, Any] = {"machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    print("dial latency ...", file=sys.stderr)
    RESULTS.mkdir(exist_ok=True)

    def save() -> None:  # after every section, so a late failure keeps the earlier figures
        (RESULTS / "peer.json").write_text(json.dumps(report, indent=2))

    report["dial"] = trio.run(bench_dial)
    save()
    for size in sizes:
        print(f"DHT among {size} hosts ...", file=sys.stderr)
        report[f"dht_{size}"] = trio.run(bench_dht, size)
        save()
    print("20-peer devnet convergence ...", file=sys.stderr)
    report["devnet"] = bench_devnet_convergence(peers=20 if "--quick" not in argv else 8)
    save()
    print(json.dumps(report, indent=2))
    return 0
