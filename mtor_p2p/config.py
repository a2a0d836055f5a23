"""Node configuration: defaults, then a TOML file, then command-line flags.

Example ``mtor.toml``::

    data_dir = "~/.mtor"
    listen = ["/ip4/127.0.0.1/tcp/4001"]
    bootstrap = ["/ip4/203.0.113.7/tcp/4001/p2p/12D3KooW..."]
    region = "WEU"
    gpu = "auto"            # or "none"
    price = 1.0             # starting price, credits per TFLOP of delivered work
    dynamic_price = true    # move the price with utilisation (the genesis's rule)
    genesis = "genesis.json"  # default: the data dir's copy, else bootstrap/genesis.json
    bootstrap_node = false  # raise connection limits when serving as a bootstrap peer
    lanes = "auto"          # fast sealed TCP lanes for requests: "auto", "eager" or "off"
    lane_port = 0           # TCP port of the lane listener (0: any; open it in a firewall)
    shared_memory = true    # operands, outputs >= 8 MiB with workers on this machine: sealed memfds
    nat = true              # find out whether we are reachable; relays and hole punching
    relay = "auto"          # serve as a circuit relay: "auto" (when public), "on", "off"
    relays_wanted = 2       # relays to reserve on while not publicly reachable
    relay_max_reservations = 128  # as a relay: peers holding a reservation at once
    punch_retry = 300.0     # a pair whose hole punches failed tries again after (10-3600 s)
    log_format = "text"     # or "json": one JSON object a line (stderr and the log file)
    log_max_bytes = 10485760  # rotate <data_dir>/logs/mtor-peer.log at this size
    log_backups = 5         # rotated files kept (mtor-peer.log.1 ... .5)
    announce = []           # extra public addresses (a port forward): /ip4/IP/tcp/PORT

    [ngrok]
    enabled = false
    authtoken = ""          # or set NGROK_AUTHTOKEN
    region = "eu"
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import stat
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

DEFAULT_DATA_DIR = "~/.mtor"

log = logging.getLogger(__name__)

#: The data directory holds the identity key, the ledger, receipts and the control API's token:
#: nobody but its owner may list or read it.
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
#: Files SQLite keeps beside a database (they hold the same data).
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")
DEFAULT_LISTEN = "/ip4/127.0.0.1/tcp/4001"
DEFAULT_REGION = "local"
LOG_FORMATS = ("text", "json")


class ConfigError(ValueError):
    """The configuration file or flags are invalid; the message says which setting."""


@dataclass
class NgrokConfig:
    """Settings of the optional ngrok tunnel used to become reachable from behind a NAT."""

    enabled: bool = False
    authtoken: str | None = None
    region: str | None = None
    path: str | None = None  # the agent binary; default: MTOR_NGROK_PATH or pyngrok's own


@dataclass
class NodeConfig:
    """Everything a node needs to start."""

    data_dir: Path = field(default_factory=lambda: Path(DEFAULT_DATA_DIR).expanduser())
    listen: list[str] = field(default_factory=lambda: [DEFAULT_LISTEN])
    bootstrap: list[str] = field(default_factory=list)
    use_default_bootstrap: bool = True
    region: str = DEFAULT_REGION
    gpu: str = "auto"
    price: float = 1.0
    #: Move the asking price with utilisation by the genesis's price rule (false: fixed).
    dynamic_price: bool = True
    #: The network's genesis file; None: the data directory's copy, else the shipped one.
    genesis: Path | None = None
    bootstrap_node: bool = False
    max_connections: int = 300
    #: Requests to a peer travel over a lane (one sealed TCP connection, mtor_p2p/lane.py)
    #: once it is open: "auto" opens one in the background on the first request, "eager"
    #: makes the first request wait for it, "off" keeps every request on libp2p streams.
    lanes: str = "auto"
    lane_port: int = 0  # 0: any free port (peers learn it with their lane ticket)
    #: NAT traversal (mtor_p2p/libp2p_nat.py): reachability checks by dial-back, circuit
    #: relays and hole punching. false: none of them (a node on a LAN or a test).
    nat: bool = True
    #: Hand large operands to workers on this machine through sealed shared memory and take
    #: their large outputs that way, and do both as a worker (docs/compute.md, "workers on
    #: this machine").
    shared_memory: bool = True
    #: Serve as a circuit relay for private peers: "auto" (once found publicly reachable, or
    #: as a bootstrap node), "on" or "off".
    relay: str = "auto"
    #: Relays to hold reservations on while not publicly reachable (0: never reserve).
    relays_wanted: int = 2
    #: As a relay: peers that may hold a reservation at once (more are refused).
    relay_max_reservations: int = 128
    #: Seconds before a pair whose hole punches all failed tries again, doubling per failed
    #: round up to an hour; also the window in which a peer may start 3 punch sessions with
    #: us (mtor_p2p/libp2p_nat.py, NatSettings.punch_retry_s). Under 120 s a retry may meet
    #: the routers' mappings of the last round and fail (docs/peer.md).
    punch_retry: float = 300.0
    #: Extra addresses to advertise, e.g. a router's port forward to our listen port.
    announce: list[str] = field(default_factory=list)
    api_port: int = 0  # 0: any free port, written to <data_dir>/control.json
    #: Opt-in: also serve /metrics without the token on this HOST:PORT (None: only through
    #: the control API, with the token: the metrics reveal the node's business).
    metrics_listen: str | None = None
    record_ttl: float = 60.0
    announce_interval: float = 20.0
    log_level: str = "warning"
    #: How log lines are written, to stderr and to ``<data_dir>/logs/mtor-peer.log``:
    #: "text" (one human-readable line each) or "json" (one JSON object a line).
    log_format: str = "text"
    #: The log file is rotated at this size and this many old files are kept
    #: (``mtor-peer.log.1`` ... ``.N``): 10 MiB x 5 by default, at most 60 MiB on disk.
    log_max_bytes: int = 10 << 20
    log_backups: int = 5
    operand_cache_mib: int = 2048  # operands (weights) a worker keeps between shards
    #: Testing only: return a wrong result for this fraction of shards, to exercise the
    #: network's defences (verification, fault proofs, re-issue). Honest nodes keep 0.
    fault_rate: float = 0.0
    ngrok: NgrokConfig = field(default_factory=NgrokConfig)

    def validate(self) -> None:
        """Raise ConfigError for settings that cannot work."""
        if self.gpu not in ("auto", "none"):
            raise ConfigError("gpu must be 'auto' or 'none'")
        if not self.listen:
            raise ConfigError("listen needs at least one multiaddr")
        for addr in self.listen:
            check_listen_addr(addr)
        for addr in self.bootstrap:
            check_peer_addr(addr)
        for name in ("price", "record_ttl", "announce_interval", "fault_rate"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number, not {getattr(self, name)}")
        if self.price < 0:
            raise ConfigError("price must not be negative")
        if not 1 <= self.max_connections <= 1_000_000:
            raise ConfigError(
                f"max_connections must be at least 1 (default 300), not {self.max_connections}"
            )
        if not 0 <= self.api_port <= 65535:
            raise ConfigError("api_port must be a TCP port number")
        if self.metrics_listen is not None:
            split_host_port(self.metrics_listen)
        if self.lanes not in ("auto", "eager", "off"):
            raise ConfigError(f"lanes must be 'auto', 'eager' or 'off', not {self.lanes!r}")
        if not 0 <= self.lane_port <= 65535:
            raise ConfigError(f"lane_port must be 0-65535 (0: any free port), not {self.lane_port}")
        if self.relay not in ("auto", "on", "off"):
            raise ConfigError(f"relay must be 'auto', 'on' or 'off', not {self.relay!r}")
        if self.relay == "on" and not self.nat:
            raise ConfigError("relay 'on' needs NAT traversal: drop --nat off (nat = false)")
        if not 0 <= self.relays_wanted <= 8:
            raise ConfigError(f"relays_wanted must be 0-8, not {self.relays_wanted}")
        if not 1 <= self.relay_max_reservations <= 100_000:
            raise ConfigError(
                f"relay_max_reservations must be 1-100000, not {self.relay_max_reservations}"
            )
        if not 10.0 <= self.punch_retry <= 3600.0:
            raise ConfigError(
                "punch_retry (--punch-retry) must be 10-3600 seconds (default 300; under 120 "
                "a retry may fail on the routers' mappings of the last round), "
                f"not {self.punch_retry:g}"
            )
        for addr in self.announce:
            check_announce_addr(addr)
        if not 0 < self.announce_interval < self.record_ttl / 2:
            raise ConfigError("announce_interval must be positive and under half of record_ttl")
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ConfigError("fault_rate must be between 0 and 1")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"log_format must be 'text' or 'json', not {self.log_format!r}")
        if not 1024 <= self.log_max_bytes <= 1 << 40:
            raise ConfigError(f"log_max_bytes must be at least 1024, not {self.log_max_bytes}")
        if not 1 <= self.log_backups <= 1000:
            raise ConfigError(f"log_backups must be 1-1000, not {self.log_backups}")
        if self.operand_cache_mib < 1:
            raise ConfigError("operand_cache_mib must be at least 1")
        if len(self.region) > 32:
            raise ConfigError("region must be at most 32 characters")

    def all_bootstrap_peers(self) -> list[str]:
        """Configured bootstrap peers followed by the shipped list (unless disabled)."""
        peers = list(self.bootstrap)
        if self.use_default_bootstrap:
            peers += default_bootstrap_peers()
        return list(dict.fromkeys(peers))


LISTEN_EXAMPLE = "/ip4/0.0.0.0/tcp/4001"
PEER_EXAMPLE = "/ip4/203.0.113.7/tcp/4001/p2p/<peer ID>"
#: Said with PEER_EXAMPLE: examples elsewhere shorten a peer ID to "12D3KooW...", which a new
#: user pasted as it stands.
PEER_ID_HINT = "(the peer ID is what `mtor-peer id` prints on that peer, 12D3KooW and 44 more)"


def _parse_multiaddr(addr: str, what: str, example: str) -> list[tuple[str, str]]:
    """``addr``'s (protocol, value) pairs; ConfigError naming ``what`` if it does not parse."""
    import multiaddr  # py-libp2p's dependency; imported here to keep config light

    if not isinstance(addr, str) or not addr.startswith("/"):
        raise ConfigError(f"{what} {addr!r} is not a multiaddr: write it like {example}")
    try:
        parsed = multiaddr.Multiaddr(addr)
        return [(p.name, parsed.value_for_protocol(p.code) or "") for p in parsed.protocols()]
    except Exception as exc:  # the library raises several kinds for a malformed address
        reason = str(exc).split(" (string:")[0]
        if reason.startswith("Invalid MultiAddr"):
            reason = reason.split("': ", 1)[-1]
        raise ConfigError(
            f"{what} {addr!r} is not a valid multiaddr ({reason}): write it like {example}"
        ) from None


def check_listen_addr(addr: str) -> tuple[str, int]:
    """The host and TCP port of the listen multiaddr ``addr`` (``/ip4|ip6/HOST/tcp/PORT``);
    ConfigError with one line saying how to write it otherwise."""
    parts = _parse_multiaddr(addr, "listen address", LISTEN_EXAMPLE)
    names = [name for name, _ in parts]
    if names[:2] not in (["ip4", "tcp"], ["ip6", "tcp"]) or len(parts) != 2:
        raise ConfigError(
            f"listen address {addr!r} must be /ip4/HOST/tcp/PORT or /ip6/HOST/tcp/PORT, "
            f"e.g. {LISTEN_EXAMPLE} (all interfaces) or /ip4/127.0.0.1/tcp/0 (any free port)"
        )
    return parts[0][1], int(parts[1][1])


ANNOUNCE_EXAMPLE = "/ip4/198.51.100.7/tcp/4001"


def check_announce_addr(addr: str) -> tuple[str, int]:
    """The host and port of an address to advertise (``/ip4|ip6|dns4|dns6/HOST/tcp/PORT``,
    a public address that reaches our listen port); ConfigError with one line otherwise.
    Unspecified hosts (0.0.0.0, ::) and port 0 reach nothing and are refused."""
    import ipaddress

    parts = _parse_multiaddr(addr, "announce address", ANNOUNCE_EXAMPLE)
    names = [name for name, _ in parts]
    if len(parts) != 2 or names[0] not in ("ip4", "ip6", "dns4", "dns6") or names[1] != "tcp":
        raise ConfigError(
            f"announce address {addr!r} must be /ip4/HOST/tcp/PORT (or ip6, dns4, dns6): "
            f"a public address that reaches this node's port, e.g. {ANNOUNCE_EXAMPLE}"
        )
    host, port = parts[0][1], int(parts[1][1])
    unspecified = names[0] in ("ip4", "ip6") and ipaddress.ip_address(host).is_unspecified
    if unspecified or port == 0:
        raise ConfigError(
            f"announce address {addr!r} names no reachable place (0.0.0.0, :: or port 0): "
            f"give the public address and port peers should dial, e.g. {ANNOUNCE_EXAMPLE}"
        )
    return host, port


def check_peer_addr(addr: str) -> str:
    """The peer ID of the bootstrap multiaddr ``addr`` (a transport address ending in
    ``/p2p/<MTOR peer ID>``); ConfigError with one line saying how to write it otherwise.
    Checked at start: a malformed bootstrap address was only ever skipped, quietly or with a
    warning at every re-dial."""
    from mtor_p2p.identity import public_key_from_peer_id

    if "/p2p/" not in str(addr):
        raise ConfigError(
            f"bootstrap address {addr!r} has no /p2p/<peer ID> at its end: write it like "
            f"{PEER_EXAMPLE} {PEER_ID_HINT}"
        )
    parts = _parse_multiaddr(addr, "bootstrap address", f"{PEER_EXAMPLE} {PEER_ID_HINT}")
    names = [name for name, _ in parts]
    if names[-1] != "p2p" or "tcp" not in names:
        raise ConfigError(
            f"bootstrap address {addr!r} must be a TCP address ending in /p2p/<peer ID>, "
            f"like {PEER_EXAMPLE}"
        )
    peer_id = parts[-1][1]
    try:
        public_key_from_peer_id(peer_id)
    except ValueError as exc:
        raise ConfigError(
            f"bootstrap address {addr!r}: {peer_id} is not an MTOR peer ID ({exc}); "
            "it starts with 12D3KooW (see `mtor-peer id` on that peer)"
        ) from None
    return peer_id


def split_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9100`` for IPv6; port 0: any free one) as ``(host, port)``;
    ConfigError if it is not one."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(
            f"--metrics-listen (metrics_listen) must be HOST:PORT, as 127.0.0.1:9100, not {text!r}"
        )
    return host, int(port)


def default_bootstrap_peers() -> list[str]:
    """The bootstrap list shipped in ``bootstrap/peers.txt`` (one multiaddr a line)."""
    override = os.environ.get("MTOR_BOOTSTRAP_FILE")
    if override:
        text = Path(override).read_text()
    else:
        text = (resources.files("mtor_p2p._bootstrap") / "peers.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


_SIMPLE_TYPES: dict[str, type] = {
    "listen": list,
    "bootstrap": list,
    "use_default_bootstrap": bool,
    "region": str,
    "gpu": str,
    "price": float,
    "dynamic_price": bool,
    "bootstrap_node": bool,
    "max_connections": int,
    "lanes": str,
    "lane_port": int,
    "nat": bool,
    "shared_memory": bool,
    "relay": str,
    "relays_wanted": int,
    "relay_max_reservations": int,
    "punch_retry": float,
    "announce": list,
    "api_port": int,
    "metrics_listen": str,
    "record_ttl": float,
    "announce_interval": float,
    "log_level": str,
    "log_format": str,
    "log_max_bytes": int,
    "log_backups": int,
    "operand_cache_mib": int,
    "fault_rate": float,
}


def _checked(name: str, value: Any, kind: type) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name} must be a list of strings")
        return list(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        # Say it the way TOML writes it: `nat = "off"` needs `nat = false`.
        spelled = {
            bool: "true or false (no quotes)",
            int: "a whole number (no quotes)",
            float: "a number (no quotes)",
            str: "a quoted string",
        }.get(kind, kind.__name__)
        raise ConfigError(f"{name} must be {spelled}, not {value!r}")
    return value


def load_config(path: Path | None) -> NodeConfig:
    """Read a TOML file into a NodeConfig (defaults when ``path`` is None)."""
    config = NodeConfig()
    if path is None:
        return config
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    for key, value in data.items():
        if key == "data_dir":
            config.data_dir = Path(_checked(key, value, str)).expanduser()
        elif key == "genesis":
            config.genesis = Path(_checked(key, value, str)).expanduser()
        elif key == "ngrok":
            if not isinstance(value, dict):
                raise ConfigError("[ngrok] must be a table")
            known = {f.name for f in fields(NgrokConfig)}
            for sub, subvalue in value.items():
                if sub not in known:
                    raise ConfigError(f"unknown setting ngrok.{sub}")
                kind = bool if sub == "enabled" else str
                setattr(config.ngrok, sub, _checked(f"ngrok.{sub}", subvalue, kind))
        elif key in _SIMPLE_TYPES:
            setattr(config, key, _checked(key, value, _SIMPLE_TYPES[key]))
        else:
            raise ConfigError(f"unknown setting {key!r} in {path}")
    return config


# -- data directory permissions ----------------------------------------------------------------
#
# Modes are set explicitly on what we create (never left to the process umask): a node may run
# embedded in a process whose umask is 022, and changing the umask would change it for the
# embedding application as well. The directory's 0700 is what keeps other local users out;
# 0600 on each file also holds when a file is copied or the directory is opened up later.


def private_dir(path: Path) -> Path:
    """Create the directory ``path`` (and its parents) if missing and make it 0700.

    An existing directory with a wider mode is tightened, with a log line. A sticky directory
    (``/tmp`` given as the data directory) or one we do not own is left as it is, with a
    warning: changing it would break other users' files.
    """
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    info = path.stat()
    mode = stat.S_IMODE(info.st_mode)
    if mode == PRIVATE_DIR_MODE:
        return path
    if info.st_mode & stat.S_ISVTX or info.st_uid != os.getuid():
        log.warning("data directory %s is shared (mode %o): not tightening it", path, mode)
        return path
    os.chmod(path, PRIVATE_DIR_MODE)
    if mode & 0o077:
        log.warning("data directory %s was mode %o; tightened to 700", path, mode)
    return path


def private_file(path: Path) -> Path:
    """Create ``path`` empty with mode 0600 if it is missing, else tighten it to 0600.

    Used on an SQLite database before it is opened: SQLite creates the ``-wal``, ``-shm``
    and ``-journal`` files with the mode of the database file itself (and sets it on them
    whatever the umask), so a 0600 database keeps its side files 0600 too.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, PRIVATE_FILE_MODE)
    try:
        # os.open's mode is narrowed by the umask only; an existing file keeps its own mode.
        if stat.S_IMODE(os.fstat(fd).st_mode) != PRIVATE_FILE_MODE:
            os.fchmod(fd, PRIVATE_FILE_MODE)
    finally:
        os.close(fd)
    return path


def private_sqlite(path: Path | str) -> None:
    """Make the SQLite database ``path`` 0600 before it is opened (creating it empty) and
    tighten side files left by an older version; ``:memory:`` is left alone."""
    if str(path) == ":memory:" or str(path).startswith("file:"):
        return
    path = Path(path)
    private_file(path)
    for suffix in SQLITE_SIDE_FILES:
        side = path.with_name(path.name + suffix)
        try:
            if stat.S_IMODE(side.lstat().st_mode) != PRIVATE_FILE_MODE:
                os.chmod(side, PRIVATE_FILE_MODE)
        except FileNotFoundError:
            pass


def read_only_sqlite(path: Path) -> sqlite3.Connection:
    """Open the SQLite database ``path`` to read a stopped node's data, writing nothing there.

    A WAL database opened with ``mode=ro`` still creates its ``-wal`` and ``-shm`` files, so
    a cleanly closed database (no ``-wal`` left) is opened as immutable; after a crash, the
    ``-wal`` holds the last commits and is read as it is. Raises ``sqlite3.Error``."""
    wal = path.with_name(path.name + "-wal").exists()
    return sqlite3.connect(f"{path.as_uri()}?mode=ro{'' if wal else '&immutable=1'}", uri=True)


@contextmanager
def sqlite_transaction(db: sqlite3.Connection) -> Iterator[None]:
    """Run the block as one transaction of ``db`` (opened with ``isolation_level=None``, which
    leaves transactions to us): committed when it ends, rolled back if it raises.

    Without it every statement commits on its own, and under ``synchronous=FULL`` each commit
    is an fsync: a receipt store writing a group-committed batch of 64 receipts made 64
    fdatasyncs (27-40 ms on the project's VM) where one was promised (found 2026-12-04)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        # A COMMIT refused (SQLITE_BUSY: a reader holds the file in rollback-journal mode)
        # leaves the transaction open: rolled back here, or every later BEGIN would fail, and
        # the next commit on the connection would write the batch its callers were told had
        # failed (found in review). After a full disk, SQLite has rolled back by itself.
        if db.in_transaction:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the first error is the one to report
        raise


def write_private(path: Path, data: str | bytes, *, durable: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (a 0600 temporary file renamed over it).

    The temporary file is always a new one: whatever lies under its name (a stale one, a
    link, symbolic or hard) is removed, never written through. ``durable``: the file is
    fsynced before the rename and the directory after it, so that the new content survives
    a crash once this returns."""
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    try:
        try:
            os.fchmod(fd, PRIVATE_FILE_MODE)
            os.write(fd, raw)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def secure_data_dir(path: Path, *, skip: tuple[str, ...] = ()) -> list[str]:
    """Make ``path`` 0700 (creating it) and every regular file directly in it 0600, except
    the names in ``skip``; return the names of the files that were tightened (logged).

    Repairs data directories written by older versions, and files that other code wrote with
    the umask's mode. Symbolic links and subdirectories are left alone.
    """
    private_dir(path)
    tightened = []
    for entry in os.scandir(path):
        if entry.name in skip or not entry.is_file(follow_symlinks=False):
            continue
        mode = stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode)
        if mode != PRIVATE_FILE_MODE:
            try:
                os.chmod(entry.path, PRIVATE_FILE_MODE, follow_symlinks=False)
            except OSError as exc:  # another user's file, or a vanished temporary file
                log.warning("cannot make %s private: %s", entry.path, exc)
                continue
            tightened.append(entry.name)
    if tightened:
        log.warning("made files in %s private (0600): %s", path, ", ".join(sorted(tightened)))
    return tightened
