"""A local devnet: N ``mtor-peer run`` processes on loopback, watched until they converge.

Peer 0 starts first and every other peer bootstraps from it; the peers then find each other
through gossip, the DHT and the addresses in capacity records. The devnet is ready when every
peer's capacity view holds every peer's record. It needs no GPU, no ngrok account and no
internet, and is the README's first command.

Every peer logs at the devnet's ``--log-level`` and ``--log-format`` to its ``peer.log`` (its
stderr) and to its own ``logs/mtor-peer.log``.

A peer that exits while the devnet runs is reported once, with its exit status, and restarted
on its data directory (same identity, bootstrapping from a live peer), up to
``MAX_RESTARTS`` times; a peer that keeps exiting stops the devnet with exit 1.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mtor_p2p.config import PRIVATE_FILE_MODE, private_dir
from mtor_p2p.control_client import INFO_FILE_NAME, ControlClient, ControlError, NodeNotRunning
from mtor_p2p.datadir import lock_owner

#: Region codes of ``simulations/regions``: peers are spread over them round-robin.
REGIONS = (
    "WUS",
    "CUS",
    "EUS",
    "BRS",
    "UKS",
    "WEU",
    "GWC",
    "UAEN",
    "SAN",
    "CIN",
    "SEA",
    "EAS",
    "JPE",
    "AUE",
)
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
#: Credits each devnet peer starts with, so that it can pay for jobs and stake.
DEVNET_ALLOCATION = 1000
#: Restarts of one peer before the devnet gives up on it and stops.
MAX_RESTARTS = 3


class PeerFailed(RuntimeError):
    """A devnet's peer exited while starting: its exit code and the error it logged."""

    def __init__(self, index: int, code: int, log_path: Path, log_start: int = 0) -> None:
        self.code = code
        why = _last_error(log_path, log_start)
        super().__init__(
            f"peer {index} exited ({describe_exit(code)})"
            + (f": {why}" if why else "")
            + f" (see {log_path})"
        )


def _last_error(log_path: Path, start: int = 0) -> str | None:
    """The one-line error a peer's ``mtor-peer`` printed last to its log (``mtor-peer: ...``,
    its prefix left out) after offset ``start`` (where this run of the peer began), or None:
    what a devnet repeats when the peer fails to start (a new user had to open the log to
    read "...written under ledger rules 3...")."""
    try:
        fd = os.open(log_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with open(fd, "rb") as log:
            if not stat.S_ISREG(os.fstat(log.fileno()).st_mode):
                return None
            log.seek(max(start, os.fstat(log.fileno()).st_size - 8192))
            lines = log.read(8192).decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("mtor-peer: "):
            text = line.removeprefix("mtor-peer: ").removeprefix("error: ")[:300]
            # Printed to the user's terminal: no control characters from whatever the log
            # held (a logged message may carry text a remote peer chose).
            return "".join(ch if ch.isprintable() else "?" for ch in text)
    return None


@dataclass
class DevnetPeer:
    """One peer process of the devnet."""

    index: int
    data_dir: str
    pid: int
    peer_id: str = ""
    api: str = ""
    addrs: list[str] | None = None
    region: str = ""


class Devnet:
    """Starts, watches and stops the peer processes."""

    def __init__(
        self,
        base_dir: Path,
        *,
        record_ttl: float,
        announce_interval: float,
        log_level: str,
        log_format: str | None = None,
        shared_memory: bool | None = None,
    ) -> None:
        self.base_dir = base_dir
        #: ``--shared-memory`` of every peer (None: the peers' default, on).
        self.shared_memory = shared_memory
        self.record_ttl = record_ttl
        self.announce_interval = announce_interval
        self.log_level = log_level
        #: ``--log-format`` of every peer (``text`` or ``json``); None: the peers' default.
        self.log_format = log_format
        self.processes: list[subprocess.Popen[bytes]] = []
        self.peers: list[DevnetPeer] = []
        #: Where each peer's log ended when its process was started: its errors are after.
        self.log_starts: dict[int, int] = {}

    def write_genesis(self, peers: int) -> Path:
        """The devnet's genesis: credits for every peer and short epochs, so that a user sees
        balances move and checkpoints signed within a minute. Reused if the directory has one.
        """
        from mtor_p2p.identity import load_or_create_identity
        from mtor_p2p.ledger.genesis import GENESIS_FILE_NAME, NANO, Genesis, LedgerParams

        path = self.base_dir / GENESIS_FILE_NAME
        if path.exists():
            return path
        allocations = {}
        for index in range(peers):
            data_dir = private_dir(self.base_dir / f"peer-{index}")
            allocations[load_or_create_identity(data_dir).peer_id] = DEVNET_ALLOCATION * NANO
        params = LedgerParams(epoch_seconds=30.0, checkpoint_delay=5.0, price_interval=10.0)
        Genesis("mtor-devnet", allocations, params).save(path)
        return path

    def start_peer(self, index: int, bootstrap: str | None) -> DevnetPeer:
        """Start peer ``index`` (:meth:`wait_started` waits for its control API)."""
        process, data_dir, region = self._spawn(index, bootstrap)
        self.processes.append(process)
        peer = DevnetPeer(index=index, data_dir=str(data_dir), pid=process.pid, region=region)
        self.peers.append(peer)
        return peer

    def restart_peer(self, index: int) -> None:
        """Start peer ``index`` again on its data directory, bootstrapping from a live peer."""
        live = [
            p.addrs[0]
            for p, process in zip(self.peers, self.processes, strict=True)
            if p.index != index and p.addrs and process.poll() is None
        ]
        process, _data_dir, _region = self._spawn(index, live[0] if live else None)
        self.processes[index] = process
        self.peers[index].pid = process.pid

    def _spawn(
        self, index: int, bootstrap: str | None
    ) -> tuple[subprocess.Popen[bytes], Path, str]:
        # A data directory is 0700 and its files 0600 from the start (the node would tighten
        # them, with a warning, otherwise).
        data_dir = private_dir(self.base_dir / f"peer-{index}")
        if lock_owner(data_dir) is None:
            # Stale after a crash (the node removes it when it stops cleanly); a running
            # node's is its own (a second devnet on the same directory removed it: review).
            (data_dir / INFO_FILE_NAME).unlink(missing_ok=True)
        region = REGIONS[index % len(REGIONS)]
        # -P: not the calling directory first on sys.path, so that a peer runs the same
        # mtor_p2p as this devnet, not a checkout that happens to sit where it was called.
        command = [
            sys.executable, "-P", "-m", "mtor_p2p", "run",
            "--data-dir", str(data_dir),
            "--listen", "/ip4/127.0.0.1/tcp/0",
            "--no-default-bootstrap",
            "--region", region,
            "--gpu", "none",
            "--record-ttl", str(self.record_ttl),
            "--announce-interval", str(self.announce_interval),
            "--log-level", self.log_level,
            "--genesis", str(self.base_dir / "genesis.json"),
        ]  # fmt: skip
        if self.log_format:
            command += ["--log-format", self.log_format]
        if self.shared_memory is not None:
            command += ["--shared-memory", "on" if self.shared_memory else "off"]
        if bootstrap:
            command += ["--bootstrap", bootstrap]
        log = open_private_log(data_dir / "peer.log")
        # The log is appended to across runs: an error left by an earlier one is not this
        # run's (a hostile review: a peer killed without a word was reported with last
        # week's refusal).
        self.log_starts[index] = os.fstat(log.fileno()).st_size
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches the devnet, which then stops peers in order
        )  # fmt: skip
        log.close()
        return process, data_dir, region

    def wait_started(self, peer: DevnetPeer, deadline: float) -> None:
        """Block until ``peer`` has written its control file and answers."""
        process = self.processes[peer.index]
        info_path = Path(peer.data_dir) / INFO_FILE_NAME
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise PeerFailed(
                    peer.index,
                    process.returncode,
                    Path(peer.data_dir) / "peer.log",
                    self.log_starts.get(peer.index, 0),
                )
            if info_path.exists():
                try:
                    info = json.loads(info_path.read_text())
                    peer.peer_id, peer.api, peer.addrs = info["peer_id"], info["url"], info["addrs"]
                    return
                except (ValueError, KeyError):
                    pass
            time.sleep(0.05)
        raise TimeoutError(f"peer {peer.index} did not start in time")

    def views(self) -> list[set[str]]:
        """The peer IDs in each peer's capacity view (empty set if it does not answer)."""
        result = []
        for peer in self.peers:
            try:
                client = ControlClient.for_data_dir(Path(peer.data_dir), timeout=5)
                result.append({p["peer_id"] for p in client.call("GET", "/v1/peers")["peers"]})
            except (NodeNotRunning, ControlError):
                result.append(set())
        return result

    def table(self) -> list[dict[str, Any]]:
        """Peer 0's view, for printing."""
        client = ControlClient.for_data_dir(Path(self.peers[0].data_dir), timeout=5)
        peers: list[dict[str, Any]] = client.call("GET", "/v1/peers")["peers"]
        return peers

    def stop(self) -> None:
        """SIGTERM every peer (so it withdraws its record), then SIGKILL what is left."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def open_private_log(path: Path) -> Any:
    """``path`` opened for appending, created 0600 (an existing one is tightened to 0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, PRIVATE_FILE_MODE)
    try:
        if os.fstat(fd).st_mode & 0o777 != PRIVATE_FILE_MODE:
            os.fchmod(fd, PRIVATE_FILE_MODE)
        return os.fdopen(fd, "ab")
    except BaseException:
        os.close(fd)
        raise


def describe_exit(returncode: int) -> str:
    """A process's exit status as people read it: ``exit code 1``, ``killed by SIGKILL``."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"{returncode}: killed by {name}"
    return f"exit code {returncode}"


_last_progress = ""


def _progress(message: str) -> None:
    """One line rewritten in place on a terminal; elsewhere (a log) a line per change."""
    global _last_progress
    if sys.stderr.isatty():
        print(f"\r{message}", end="", file=sys.stderr, flush=True)
    elif message != _last_progress:
        print(message, file=sys.stderr, flush=True)
    _last_progress = message


def run_devnet(
    *,
    peers: int,
    base_dir: Path | None,
    json_output: bool,
    timeout: float,
    record_ttl: float,
    announce_interval: float,
    log_level: str,
    log_format: str | None = None,
    shared_memory: bool | None = None,
) -> int:
    """Run the devnet until SIGINT/SIGTERM; return the exit code. ``log_level``,
    ``log_format`` (``text`` or ``json``; None: the peers' default) and ``shared_memory``
    (None: the peers' default, on) are every peer's."""
    from mtor_p2p.console import (
        EXIT_FAILURE,
        EXIT_IN_USE,
        EXIT_NOT_CONVERGED,
        EXIT_OK,
        EXIT_USAGE,
        format_peers_table,
        invoked_as,
    )

    if not 1 <= peers <= 200:
        print("mtor-peer: devnet --peers must be between 1 and 200", file=sys.stderr)
        return EXIT_USAGE
    if base_dir is not None:
        # Before anything is written there (its genesis, a peer's files): a devnet already
        # running on this directory keeps running untouched.
        for index in range(peers):
            owner = lock_owner(base_dir / f"peer-{index}")
            if owner is not None:
                who = f"pid {owner}" if owner else "another process"
                print(
                    f"mtor-peer: error: {base_dir / f'peer-{index}'} is in use by {who} (another "
                    "devnet?): stop it, or give another --data-dir",
                    file=sys.stderr,
                )
                return EXIT_IN_USE
    temporary = base_dir is None
    root = Path(tempfile.mkdtemp(prefix="mtor-devnet-")) if base_dir is None else base_dir
    devnet = Devnet(
        root,
        record_ttl=record_ttl,
        announce_interval=announce_interval,
        log_level=log_level,
        log_format=log_format,
        shared_memory=shared_memory,
    )
    stop_requested = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    started = time.monotonic()
    code = EXIT_OK
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        devnet.write_genesis(peers)
        first = devnet.start_peer(0, None)
        devnet.wait_started(first, time.monotonic() + START_TIMEOUT)
        bootstrap = first.addrs[0] if first.addrs else None
        for index in range(1, peers):
            devnet.start_peer(index, bootstrap)
        deadline = time.monotonic() + START_TIMEOUT
        for peer in devnet.peers[1:]:
            devnet.wait_started(peer, deadline)
        everyone = {p.peer_id for p in devnet.peers}
        deadline = time.monotonic() + timeout
        while not stop_requested:
            complete = sum(view >= everyone for view in devnet.views())
            _progress(f"devnet: {complete}/{peers} peers see all {peers} capacity records")
            if complete == peers:
                break
            if time.monotonic() > deadline:
                print(
                    f"\nmtor-peer: devnet did not converge within {timeout:.0f} s", file=sys.stderr
                )
                return EXIT_NOT_CONVERGED
            time.sleep(0.25)
        converged = time.monotonic() - started
        print(file=sys.stderr)
        if json_output:
            payload = {
                "dir": str(root),
                "converged_s": round(converged, 2),
                "peers": [asdict(p) for p in devnet.peers],
            }
            print(json.dumps(payload), flush=True)
        else:
            print(format_peers_table(devnet.table()))
            print(f"\ndevnet of {peers} peers converged in {converged:.1f} s; data in {root}")
            data_dir = devnet.peers[0].data_dir
            # The checkout's wrapper says how it was called (./mtor): hints the user can paste.
            cmd = invoked_as()
            print(f"inspect a peer:  {cmd} peers --data-dir {data_dir}")
            print(f"run a job:       {cmd} submit matmul --m 1024 --data-dir {data_dir}")
            print(f"see credits:     {cmd} balance --all --data-dir {data_dir}")
            print(f"stake some:      {cmd} stake 10 --data-dir {data_dir}")
            print(f"what it paid:    {cmd} receipts --data-dir {data_dir}")
            print(f"audit:           {cmd} ledger verify --data-dir {data_dir}")
            print(
                f"prove a receipt: {cmd} ledger prove ENTRY --data-dir {data_dir}   "
                "(ENTRY: from receipts; once staked peers checkpoint its epoch)"
            )
            print(f"watch it:        {cmd} dashboard --open --data-dir {data_dir}")
            print(f"follow jobs:     {cmd} jobs --watch --data-dir {data_dir}")
            peer0_addrs = devnet.peers[0].addrs or []
            if peer0_addrs:
                for line in join_lines(cmd, devnet.base_dir, peer0_addrs[0], temporary):
                    print(line)
            if cmd == "mtor-peer":
                print("                 (from a checkout: ./mtor peers ..., ./mtor submit ...)")
            print("Ctrl-C stops every peer", flush=True)
        restarts = dict.fromkeys(range(peers), 0)
        #: Peers stopped on purpose (``mtor-peer stop``: exit code 0), not restarted.
        stopped: set[int] = set()
        while not stop_requested:
            for peer, process in zip(devnet.peers, devnet.processes, strict=True):
                if peer.index in stopped or process.poll() is None:
                    continue
                if process.returncode == 0:
                    # A peer exits 0 only when asked to stop (its control API or SIGTERM):
                    # restarting it undid the user's `stop` (a new user's walkthrough).
                    stopped.add(peer.index)
                    left = peers - len(stopped)
                    print(
                        f"mtor-peer: devnet peer {peer.index} stopped (exit code 0); not "
                        f"restarting it; {left} peer(s) left",
                        file=sys.stderr,
                        flush=True,
                    )
                    continue
                # Each exit is said once: the process is replaced (or the devnet stops).
                why = describe_exit(process.returncode)
                log_path = f"{peer.data_dir}/peer.log"
                if restarts[peer.index] >= MAX_RESTARTS:
                    print(
                        f"mtor-peer: devnet peer {peer.index} exited ({why}) after "
                        f"{MAX_RESTARTS} restarts; stopping the devnet (see {log_path})",
                        file=sys.stderr,
                        flush=True,
                    )
                    code = EXIT_FAILURE  # the finally stops the rest and keeps the logs
                    return code
                restarts[peer.index] += 1
                print(
                    f"mtor-peer: devnet peer {peer.index} exited ({why}); restarting it "
                    f"(restart {restarts[peer.index]} of {MAX_RESTARTS}; see {log_path})",
                    file=sys.stderr,
                    flush=True,
                )
                devnet.restart_peer(peer.index)
            if len(stopped) == peers:
                print("mtor-peer: every devnet peer was stopped; the devnet ends", file=sys.stderr)
                return code
            time.sleep(0.2)
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"\nmtor-peer: devnet failed: {exc}", file=sys.stderr)
        # A peer refusing its configuration or data (exit 2) is the devnet's too.
        code = (
            EXIT_USAGE if isinstance(exc, PeerFailed) and exc.code == EXIT_USAGE else EXIT_FAILURE
        )
    finally:
        if stop_requested:  # Ctrl-C or SIGTERM: say what happens, as every other exit does
            running = sum(1 for process in devnet.processes if process.poll() is None)
            plural = "" if running == 1 else "s"
            print(f"\nmtor-peer: stopping the devnet ({running} peer{plural})", file=sys.stderr)
        devnet.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if temporary and code == EXIT_OK:
            shutil.rmtree(root, ignore_errors=True)
        if stop_requested:
            kept = "removed" if temporary and code == EXIT_OK else f"kept in {root}"
            print(f"mtor-peer: devnet stopped; its data {kept}", file=sys.stderr, flush=True)
    return code


def join_lines(cmd: str, base_dir: Path, address: str, temporary: bool) -> list[str]:
    """The banner's ``join it:`` command for a node of one's own: this devnet's genesis and
    peer-0's address, and a data directory named after the devnet's. Its genesis too: without
    it a node follows a network of its own, whose ledger the devnet's peers never see; a data
    directory of its own: one left by an earlier devnet keeps that devnet's network (both
    from a new user's walkthrough). A devnet in a temporary directory says that the command
    works only while it runs: its genesis goes with it (a later walkthrough ran it again and
    found no file)."""
    from mtor_p2p.ledger.genesis import GENESIS_FILE_NAME

    genesis_path = shlex.quote(str(base_dir / GENESIS_FILE_NAME))
    join_dir = shlex.quote(f"{base_dir}-node")
    lines = [
        f"join it:         {cmd} run --data-dir {join_dir} --listen /ip4/127.0.0.1/tcp/0 "
        f"--genesis {genesis_path} --bootstrap {address}"
    ]
    if temporary:
        # A joined node's directory is not the devnet's: it stays, of a network then gone.
        lines.append(
            "                 (while this devnet runs: its files, its genesis too, are removed "
            f"when it stops, and {join_dir} is yours to remove; --data-dir DIR keeps them)"
        )
    return lines


def main() -> None:  # pragma: no cover - convenience for `python -m mtor_p2p.devnet`
    """Run a 4-peer devnet."""
    sys.exit(run_devnet(peers=4, base_dir=None, json_output=False, timeout=120, record_ttl=30,
                        announce_interval=5, log_level="warning"))  # fmt: skip


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
