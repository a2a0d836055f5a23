"""``mtor-peer``: run and inspect an MTOR peer, or a local devnet of them.

Exit codes (stable, for scripts):

====  ======================================================================
0     success
1     runtime failure (the node stopped with an error, a port was taken, ...)
2     usage or configuration error
3     no running node answers on the data directory
4     the ngrok tunnel could not be opened
5     the devnet did not converge before its timeout
====  ======================================================================
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from mtor_p2p import __version__
from mtor_p2p.config import ConfigError, NodeConfig, load_config
from mtor_p2p.control import ControlClient, ControlError, NodeNotRunning
from mtor_p2p.identity import IdentityError, load_or_create_identity

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_NGROK = 4
EXIT_NOT_CONVERGED = 5

GIB = 1 << 30


class CliError(Exception):
    """An error with a one-line message and an exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # py-libp2p logs routine network noise (peers going away) at ERROR; keep it for debugging.
    if level.lower() != "debug":
        logging.getLogger("libp2p").setLevel(logging.CRITICAL)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


# -- configuration ----------------------------------------------------------------------------


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="node data directory (identity, ledger, caches); default ~/.mtor",
    )
    parser.add_argument("--config", type=Path, help="TOML configuration file")


def _config_from(args: argparse.Namespace) -> NodeConfig:
    config = load_config(args.config)
    if args.data_dir is not None:
        config.data_dir = args.data_dir.expanduser()
    for name in (
        "region",
        "gpu",
        "price",
        "api_port",
        "record_ttl",
        "announce_interval",
        "log_level",
        "max_connections",
        "fault_rate",
    ):
        value = getattr(args, name, None)
        if value is not None:
            setattr(config, name, value)
    if getattr(args, "listen", None):
        config.listen = args.listen
    if getattr(args, "bootstrap", None):
        config.bootstrap = config.bootstrap + args.bootstrap
    if getattr(args, "no_default_bootstrap", False):
        config.use_default_bootstrap = False
    if getattr(args, "bootstrap_node", False):
        config.bootstrap_node = True
    if getattr(args, "ngrok", False):
        config.ngrok.enabled = True
    config.validate()
    return config


def _client(args: argparse.Namespace) -> ControlClient:
    return ControlClient.for_data_dir(_config_from(args).data_dir)


# -- commands ---------------------------------------------------------------------------------


def cmd_id(args: argparse.Namespace) -> int:
    """Print this node's peer ID (creating the identity on first use)."""
    config = _config_from(args)
    identity = load_or_create_identity(config.data_dir)
    if args.json:
        print(json.dumps({"peer_id": identity.peer_id, "data_dir": str(config.data_dir)}))
    else:
        print(identity.peer_id)
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    """Run a node until SIGINT or SIGTERM."""
    import trio

    from mtor_p2p.node import Node

    config = _config_from(args)
    _setup_logging(config.log_level)

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with Node.open(config) as node:
                ready = {"peer_id": node.peer_id, "addrs": node.addrs(), "tunnel": node.tunnel_url}
                if args.json:
                    print(json.dumps(ready), flush=True)
                else:
                    print(f"mtor-peer {__version__} running as {node.peer_id}", flush=True)
                    for addr in node.addrs():
                        print(f"  listening on {addr}", flush=True)
                    print("  Ctrl-C to stop", flush=True)
                async with trio.open_nursery() as nursery:

                    async def stop_on_signal() -> None:
                        async for _signum in signals:
                            node.stopped.set()
                            return

                    nursery.start_soon(stop_on_signal)
                    await node.stopped.wait()
                    nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except BaseException as exc:  # unwrap trio's exception groups into one clear line
        return _exit_for(exc)
    return EXIT_OK


def _exit_for(exc: BaseException) -> int:
    from mtor_p2p.ngrok_tunnel import NgrokError

    for leaf in _leaves(exc):
        if isinstance(leaf, KeyboardInterrupt):
            return EXIT_OK
        if isinstance(leaf, NgrokError):
            print(f"mtor-peer: ngrok: {leaf}", file=sys.stderr)
            return EXIT_NGROK
        if isinstance(leaf, ConfigError | IdentityError):
            print(f"mtor-peer: error: {leaf}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(leaf, OSError):
            print(f"mtor-peer: error: {leaf.strerror or leaf}", file=sys.stderr)
            return EXIT_FAILURE
    logging.getLogger(__name__).error("node failed", exc_info=exc)
    print(f"mtor-peer: error: {_leaves(exc)[0]!r}", file=sys.stderr)
    return EXIT_FAILURE


def cmd_status(args: argparse.Namespace) -> int:
    """Show the running node's status."""
    status = _client(args).call("GET", "/v1/status")
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return EXIT_OK
    print(f"peer       {status['peer_id']}")
    print(f"version    {status['version']}   uptime {status['uptime_s']:.0f} s")
    print(f"region     {status['region']}")
    for addr in status["addrs"]:
        print(f"address    {addr}")
    if status.get("tunnel"):
        print(f"tunnel     {status['tunnel']}")
    print(
        f"network    {status['connected_peers']} connected, "
        f"{status['routing_table_size']} in routing table, {status['view_size']} in capacity view"
    )
    print(f"compute    {status['tflops']:.3f} TFLOP/s measured")
    for device in status["devices"]:
        print(
            f"device     {device['kind']}: {device['name']} "
            f"({device['mem_free'] / GIB:.1f} GiB free)"
        )
    return EXIT_OK


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


def cmd_peers(args: argparse.Namespace) -> int:
    """Show the capacity view, optionally filtered."""
    query = []
    for name in ("min_mem_gib", "min_tflops", "max_price", "region"):
        value = getattr(args, name)
        if value is not None:
            query.append(f"{name}={value}")
    path = "/v1/peers" + ("?" + "&".join(query) if query else "")
    peers = _client(args).call("GET", path)["peers"]
    if args.json:
        print(json.dumps(peers, indent=2, sort_keys=True))
    else:
        print(format_peers_table(peers))
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    """Run a matmul job through the local node and report how it went."""
    import time

    body: dict[str, Any] = {"kernel": "matmul", "verify": args.verify, "dtype": args.dtype}
    if args.a or args.b:
        if not (args.a and args.b):
            raise CliError("--a and --b go together", EXIT_USAGE)
        body["a"], body["b"] = str(args.a.resolve()), str(args.b.resolve())
    else:
        body.update(m=args.m, n=args.n, k=args.k, seed=args.seed)
    if args.out:
        body["out"] = str(args.out.resolve())
    if args.max_price is not None:
        body["max_price"] = args.max_price
    if args.shards is not None:
        body["shards"] = args.shards
    client = _client(args)
    job_id = client.call("POST", "/v1/jobs", body)["id"]
    started = time.monotonic()
    while True:
        job = client.call("GET", f"/v1/jobs?id={job_id}")
        if job["state"] != "running":
            break
        if (not args.json and sys.stderr.isatty()) or args.progress:
            total = job["total"] or "?"
            elapsed = time.monotonic() - started
            line = f"\r{job_id}: {job['done']}/{total} shards verified, {elapsed:.1f} s"
            print(line, end="", file=sys.stderr, flush=True)
        time.sleep(0.1)
    if (not args.json and sys.stderr.isatty()) or args.progress:
        print(file=sys.stderr)
    if job["state"] == "failed":
        if args.json:
            print(json.dumps(job))
        raise CliError(f"job failed: {job['error']}")
    result = job["result"]
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return EXIT_OK
    shape = result["output_shape"]
    print(f"job        {result['job_id'][:16]}…  ({result['kernel']}, output {shape})")
    print(f"shards     {result['shards']} on {len(result['workers'])} worker(s)")
    for worker in result["workers"]:
        print(f"worker     {worker}")
    print(f"time       {result['seconds']:.3f} s   ({result['tflops']:.4f} TFLOP/s achieved)")
    print(
        f"verified   {result['verification']}: {result['checks_passed']} passed, "
        f"{result['rejected']} rejected, {result['reissued']} re-issued, "
        f"{result['hedged']} hedged, {result['fault_proofs']} fault proof(s)"
    )
    print(f"cost       {result['cost']:.6f} credits   receipts {result['receipts']}")
    return EXIT_OK


def cmd_receipts(args: argparse.Namespace) -> int:
    """List the contribution receipts this node holds."""
    answer = _client(args).call("GET", f"/v1/receipts?limit={args.limit}")
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
        return EXIT_OK
    me = _client(args).call("GET", "/v1/status")["peer_id"]
    print(
        f"{'JOB':<18} {'SHARD':>5} {'KERNEL':<9} {'ROLE':<9} {'PEER':<14} "
        f"{'GFLOP':>9} {'COST':>10} {'SIGNED':<6}"
    )
    for r in answer["receipts"]:
        role, other = (
            ("worker", r["requester"]) if r["worker"] == me else ("requester", r["worker"])
        )
        print(
            f"{r['job_id'][:16] + '…':<18} {r['shard']:>5} {r['kernel']:<9} {role:<9} "
            f"{'…' + other[-12:]:<14} {r['flops'] / 1e9:>9.3f} {r['cost']:>10.6f} "
            f"{'both' if r['complete'] else 'worker':<6}"
        )
    print(f"{answer['count']} receipt(s)")
    return EXIT_OK


def cmd_devnet(args: argparse.Namespace) -> int:
    """Run a local devnet of N peer processes on loopback."""
    from mtor_p2p.devnet import run_devnet

    return run_devnet(
        peers=args.peers,
        base_dir=args.dir,
        json_output=args.json,
        timeout=args.timeout,
        record_ttl=args.record_ttl,
        announce_interval=args.announce_interval,
        log_level=args.log_level or "warning",
    )


# -- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``mtor-peer``."""
    parser = argparse.ArgumentParser(
        prog="mtor-peer",
        description=(
            "Run a peer of the MTOR compute network: it joins the libp2p overlay, finds peers "
            "through the Kademlia DHT and gossips its signed GPU capacity."
        ),
        epilog="Exit codes: 0 ok, 1 failure, 2 usage/config, 3 node not running, 4 ngrok, "
        "5 devnet not converged. Start with: mtor-peer devnet --peers 4",
    )
    parser.add_argument("--version", action="version", version=f"mtor-peer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("id", help="print this node's peer ID", description=cmd_id.__doc__)
    _add_data_dir(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_id)

    p = sub.add_parser(
        "run",
        help="run a node until Ctrl-C",
        description="Run a node until SIGINT/SIGTERM; flags override the config file.",
    )
    _add_data_dir(p)
    p.add_argument(
        "--listen",
        action="append",
        metavar="MULTIADDR",
        help="listen address (repeatable); default /ip4/127.0.0.1/tcp/4001",
    )
    p.add_argument(
        "--bootstrap", action="append", metavar="MULTIADDR", help="bootstrap peer (repeatable)"
    )
    p.add_argument(
        "--no-default-bootstrap", action="store_true", help="do not dial the shipped bootstrap list"
    )
    p.add_argument("--region", help="region code shown in the capacity record (e.g. WEU)")
    p.add_argument("--gpu", choices=["auto", "none"], help="use GPUs found through NVML, or none")
    p.add_argument("--price", type=float, help="asking price, credits per TFLOP delivered")
    p.add_argument("--ngrok", action="store_true", help="open an ngrok TCP tunnel and announce it")
    p.add_argument(
        "--bootstrap-node",
        action="store_true",
        help="serve as a bootstrap node (higher connection limits)",
    )
    p.add_argument("--max-connections", type=int, help="connection limit")
    p.add_argument("--api-port", type=int, help="control API port on 127.0.0.1 (0: any)")
    p.add_argument("--record-ttl", type=float, help="capacity record lifetime in seconds")
    p.add_argument("--announce-interval", type=float, help="seconds between capacity renewals")
    p.add_argument(
        "--fault-rate",
        type=float,
        help="testing only: return wrong results for this fraction of shards",
    )
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--json", action="store_true", help="print one JSON line when ready")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "status", help="show the running node's status", description=cmd_status.__doc__
    )
    _add_data_dir(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("peers", help="show the capacity view", description=cmd_peers.__doc__)
    _add_data_dir(p)
    p.add_argument(
        "--min-mem-gib", type=float, help="only peers with at least this much free memory"
    )
    p.add_argument("--min-tflops", type=float, help="only peers at least this fast")
    p.add_argument("--max-price", type=float, help="only peers at most this expensive")
    p.add_argument("--region", help="only peers in this region")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_peers)

    p = sub.add_parser(
        "submit",
        help="run a matmul job on the network through the local node",
        description=(
            "Run C = A @ B across the network through the running node: random inputs of the "
            "given shape, or --a/--b .npy files. Shows progress, then the shards, workers, "
            "time, achieved TFLOP/s, verification outcome, cost and receipt count."
        ),
    )
    _add_data_dir(p)
    p.add_argument("kernel", choices=["matmul"], help="the kernel to run")
    p.add_argument("--m", type=int, default=512, help="rows of A (default 512)")
    p.add_argument("--n", type=int, default=512, help="columns of B (default 512)")
    p.add_argument("--k", type=int, default=512, help="columns of A / rows of B (default 512)")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    p.add_argument("--verify", choices=["auto", "freivalds", "sample", "redundant"], default="auto")
    p.add_argument(
        "--max-price", type=float, help="only workers asking at most this (credits per TFLOP)"
    )
    p.add_argument(
        "--shards", type=int, help="number of shards (default: sized from the workers' capacity)"
    )
    p.add_argument("--seed", type=int, help="seed for the random inputs")
    p.add_argument("--a", type=Path, help="A as a .npy file")
    p.add_argument("--b", type=Path, help="B as a .npy file")
    p.add_argument("--out", type=Path, help="write C to this .npy file")
    p.add_argument(
        "--progress", action="store_true", help="show progress even when not on a terminal"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser(
        "receipts", help="list contribution receipts", description=cmd_receipts.__doc__
    )
    _add_data_dir(p)
    p.add_argument("--limit", type=int, default=100, help="at most this many, newest first")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_receipts)

    p = sub.add_parser(
        "devnet",
        help="run N local peers on loopback until Ctrl-C",
        description=(
            "Start N peers as separate processes on loopback, wait until every peer's view "
            "holds every other peer's capacity, print the table, and stop them all on Ctrl-C. "
            "Needs no GPU, no ngrok account and no internet."
        ),
    )
    p.add_argument("--peers", type=int, default=4, help="number of peers (default 4)")
    p.add_argument(
        "--dir",
        type=Path,
        help="keep the peers' data directories here (default: a temporary directory)",
    )
    p.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for convergence (default 120)"
    )
    p.add_argument(
        "--record-ttl", type=float, default=30.0, help="capacity record lifetime (default 30 s)"
    )
    p.add_argument(
        "--announce-interval", type=float, default=5.0, help="renewal interval (default 5 s)"
    )
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--json",
        action="store_true",
        help="print the peers' API addresses and multiaddrs as JSON once ready",
    )
    p.set_defaults(func=cmd_devnet)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mtor-peer`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, IdentityError) as exc:
        print(f"mtor-peer: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except NodeNotRunning as exc:
        print(f"mtor-peer: {exc} (start one with: mtor-peer run)", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except ControlError as exc:
        print(f"mtor-peer: the node refused: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except CliError as exc:
        print(f"mtor-peer: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
