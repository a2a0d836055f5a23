"""``mtor-peer``: run and inspect an MTOR peer, or a local devnet of them.

Exit codes (stable, for scripts):

====  ======================================================================
0     success
1     runtime failure (the node stopped with an error, a port was taken, ...)
2     usage or configuration error (a flag, a file, the data directory, operands whose
      results cannot be verified: values near float32's limit, sums that cancel)
3     no running node answers on the data directory
4     the ngrok tunnel could not be opened
5     the devnet did not converge before its timeout
6     ``ledger verify`` found a problem (a record, a balance or a checkpoint)
7     ``run``: another running node holds the data directory
130   interrupted by Ctrl-C (``submit`` cancels its job first)
====  ======================================================================

No input shows a Python traceback: every error is one line that says what to do
(``MTOR_DEBUG=1`` shows the traceback of an unexpected one, for a bug report).
"""

from __future__ import annotations

import argparse
import errno
import html
import json
import logging
import logging.handlers
import os
import re
import shlex
import signal
import socket
import sys
import urllib.parse
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from mtor_p2p import __version__
from mtor_p2p.compute.inputs import KERNEL_INPUTS, KernelInputs
from mtor_p2p.config import (
    ConfigError,
    NodeConfig,
    check_listen_addr,
    load_config,
    split_host_port,
)
from mtor_p2p.console import (
    EXIT_CODES,
    EXIT_FAILURE,
    EXIT_IN_USE,
    EXIT_INTERRUPTED,
    EXIT_LEDGER_BAD,
    EXIT_NGROK,
    EXIT_NOT_RUNNING,
    EXIT_OK,
    EXIT_USAGE,
    GIB,
    format_credits,
    format_duration,
    format_peers_table,
    format_rate,
    invoked_as,
)
from mtor_p2p.control_client import INFO_FILE_NAME, ControlClient, ControlError, NodeNotRunning
from mtor_p2p.datadir import (
    LOCK_FILE_NAME,
    DataDirError,
    DataDirInUse,
    DataDirLock,
    lock_owner,
    prepare_data_dir,
)
from mtor_p2p.identity import KEY_FILE_NAME, IdentityError, load_or_create_identity
from mtor_p2p.ledger.names import MIN_ENTRY_PREFIX, LedgerError, is_entry_prefix
from mtor_p2p.wire import RecordError


class CliError(Exception):
    """An error with a one-line message and an exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: ``run`` logs to ``<data_dir>/logs/mtor-peer.log`` too (0600 in a 0700 directory), rotated
#: at ``log_max_bytes`` with ``log_backups`` old files kept (see NodeConfig).
LOG_DIR_NAME = "logs"
LOG_FILE_NAME = "mtor-peer.log"
#: What every LogRecord has: anything else on a record is a structured extra
#: (``log.info(..., extra={"peer_id": ...})``), which the JSON format writes as a field.
_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonLineFormatter(logging.Formatter):
    """One JSON object a line: ``time`` (ISO 8601, UTC, milliseconds), ``level``, ``logger``,
    ``message``, then the record's structured extras; an exception as the string field
    ``exception`` (its traceback), a stack as ``stack``. A value JSON cannot hold is written
    as its ``str()``."""

    def format(self, record: logging.LogRecord) -> str:
        import datetime

        when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        body: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_") and key not in body:
                body[key] = value
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            body["exception"] = record.exc_text
        if record.stack_info:
            body["stack"] = self.formatStack(record.stack_info)
        return json.dumps(body, default=str, ensure_ascii=False)


class _PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A RotatingFileHandler whose files are 0600 whatever the umask (logs name peers, jobs
    and addresses: the node's business), never opened through a symbolic link."""

    def _open(self) -> Any:
        from mtor_p2p.config import PRIVATE_FILE_MODE

        fd = os.open(
            self.baseFilename,
            os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW,
            PRIVATE_FILE_MODE,
        )
        if os.fstat(fd).st_mode & 0o777 != PRIVATE_FILE_MODE:
            os.fchmod(fd, PRIVATE_FILE_MODE)
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)


def log_file_path(data_dir: Path) -> Path:
    """Where ``mtor-peer run`` writes its log."""
    return data_dir / LOG_DIR_NAME / LOG_FILE_NAME


class _LevelFloor(logging.Filter):
    """Drops records of the loggers under ``prefix`` below ``level``, whatever level those
    loggers set for themselves (some py-libp2p modules set INFO at import)."""

    def __init__(self, prefix: str, level: int) -> None:
        super().__init__()
        self.prefix, self.level = prefix, level

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if name == self.prefix or name.startswith(self.prefix + "."):
            return record.levelno >= self.level
        return True


class _CleanEofQuiet(logging.Filter):
    """Drops py-libp2p 0.8.1's WARNING for a DHT stream its peer closed cleanly: its reader
    raises ``StreamEOF`` (pitfall 1) where the DHT handler expects an empty read, so every
    finished PUT_VALUE logged "Failed to read DHT message from stream: " (an empty reason)
    on the receiving peer, each announce interval. Other read failures still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "libp2p.kad_dht.kad_dht" or not str(record.msg).startswith(
            "Failed to read DHT message from stream"
        ):
            return True
        return not (record.args and type(record.args[0]).__name__ == "StreamEOF")


class _PeerFailureNoise(logging.Filter):
    """Drops py-libp2p's ERROR and WARNING lines for failures that peers cause and MTOR
    handles (a dial to an unreachable address, a protocol a peer lacks, a relay's stream
    closed by its peer, a hole punch that did not land), below ``level`` INFO: behind a NAT
    they come by the dozen a minute and say nothing is wrong. Our own modules report what
    matters (``reachable`` in status, a failed punch, a refused reservation). ``noisy``: the
    loggers (``mtor_p2p.libp2p_host.PEER_FAILURE_LOGGERS``, which an embedding program's
    filter names too)."""

    def __init__(self, level: int, noisy: tuple[str, ...]) -> None:
        super().__init__()
        self.quiet = level > logging.INFO
        self.noisy = frozenset(noisy)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.quiet or record.levelno >= logging.CRITICAL:
            return True
        return record.name not in self.noisy


def _setup_logging(
    level: str, *, log_format: str = "text", config: NodeConfig | None = None
) -> Path | None:
    """One format for every line, ours and py-libp2p's, on stderr and, given the node's
    ``config``, in its rotating log file (:func:`log_file_path`); the file's path.

    ``log_format``: ``text`` (time, level, logger, message) or ``json``
    (:class:`JsonLineFormatter`), for both. py-libp2p configures its ``libp2p`` logger when it
    is imported: no handler, level WARNING, no propagation, so its warnings went to Python's
    bare last-resort handler (no time, no level) whatever ``--log-level`` said, and an import
    after this set-up undid it. It is imported first here, then its loggers propagate to our
    handlers at ``--log-level`` but never below WARNING (its INFO is per-stream chatter),
    except with ``--log-level debug``. ``LIBP2P_DEBUG`` (py-libp2p's own switch) leaves its
    logging as it set it up. The filters (:class:`_LevelFloor`, :class:`_CleanEofQuiet`) sit
    on every handler.
    """
    from mtor_p2p.config import private_dir

    numeric = getattr(logging, level.upper(), logging.WARNING)
    formatter: logging.Formatter = (
        JsonLineFormatter() if log_format == "json" else logging.Formatter(LOG_FORMAT)
    )
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    path = None
    if config is not None:
        path = log_file_path(config.data_dir)
        private_dir(path.parent)
        handlers.append(
            _PrivateRotatingFileHandler(
                path,
                maxBytes=config.log_max_bytes,
                backupCount=config.log_backups,
                encoding="utf-8",
            )
        )
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(_CleanEofQuiet())
    logging.basicConfig(level=numeric, handlers=handlers, force=True)
    try:
        import libp2p  # noqa: F401  (runs py-libp2p's own logging set-up now, not later)
    except ImportError:  # pragma: no cover - a dependency; only the library may lack it
        return path
    if os.environ.get("LIBP2P_DEBUG"):
        return path
    libp2p_level = numeric if level.lower() == "debug" else max(numeric, logging.WARNING)
    libp2p_logger = logging.getLogger("libp2p")
    libp2p_logger.handlers.clear()
    libp2p_logger.propagate = True
    libp2p_logger.setLevel(libp2p_level)
    from mtor_p2p.libp2p_host import PEER_FAILURE_LOGGERS  # py-libp2p is imported by now

    for handler in handlers:
        handler.addFilter(_LevelFloor("libp2p", libp2p_level))
        handler.addFilter(_PeerFailureNoise(numeric, PEER_FAILURE_LOGGERS))
    return path


# -- configuration ----------------------------------------------------------------------------


def _path(text: str) -> Path:
    """A path argument, made absolute against the current directory (``~`` expanded) before
    it reaches a node or a child process that runs elsewhere."""
    return Path(text).expanduser().absolute()


#: Environment variables read by every command (flags win over them, they win over the file).
ENV_DATA_DIR = "MTOR_DATA_DIR"
ENV_CONFIG = "MTOR_CONFIG"
ENVIRONMENT_HELP = (
    f"Environment: {ENV_DATA_DIR} (the data directory when --data-dir is not given, as "
    f"IPFS_PATH is for kubo), {ENV_CONFIG} (the config file when --config is not given), "
    "NGROK_AUTHTOKEN (for --ngrok), MTOR_NGROK_PATH (the ngrok agent), MTOR_BOOTSTRAP_FILE "
    "(replaces the shipped bootstrap list), MTOR_DEBUG=1 (show the traceback of an "
    "unexpected error), LIBP2P_DEBUG (py-libp2p's own logging), MTOR_BLAS_THREADS (BLAS "
    "threads for kernels and checks; default: cores - 1), NUMPY_MADVISE_HUGEPAGE=1 (keep "
    "NumPy's transparent huge pages, which a peer otherwise stops where faults compact "
    "memory)."
)


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=_path,
        help=f"node data directory (identity, ledger, caches); default ${ENV_DATA_DIR}, "
        "else the config file's data_dir, else ~/.mtor",
    )
    parser.add_argument(
        "--config", type=_path, help=f"TOML configuration file (default ${ENV_CONFIG})"
    )


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name, "").strip()
    return _path(value) if value else None


def _config_from(args: argparse.Namespace, *, write: bool = False) -> NodeConfig:
    """The configuration: defaults, the file (``--config``, else ``$MTOR_CONFIG``), then
    ``$MTOR_DATA_DIR``, then flags. ``write``: the command writes in the data directory, which
    is created (0700) and checked to be writable; otherwise a file given as the data directory
    is still refused (DataDirError, exit 2)."""
    config_path = args.config if getattr(args, "config", None) else _env_path(ENV_CONFIG)
    config = load_config(config_path)
    from_env = _env_path(ENV_DATA_DIR)
    if args.data_dir is not None:
        config.data_dir = args.data_dir
    elif from_env is not None:
        config.data_dir = from_env
    config.data_dir = config.data_dir.expanduser().absolute()
    if not write and config.data_dir.exists() and not config.data_dir.is_dir():
        raise DataDirError(
            f"--data-dir {config.data_dir} is a file, not a directory: give the node's data "
            "directory"
        )
    for name in (
        "region",
        "gpu",
        "price",
        "api_port",
        "metrics_listen",
        "record_ttl",
        "announce_interval",
        "log_level",
        "log_format",
        "max_connections",
        "fault_rate",
        "lanes",
        "lane_port",
        "relay",
        "relays_wanted",
        "relay_max_reservations",
        "punch_retry",
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
    if getattr(args, "nat", None) is not None:
        config.nat = args.nat == "on"
    if getattr(args, "shared_memory", None) is not None:
        config.shared_memory = args.shared_memory == "on"
    if getattr(args, "announce", None):
        config.announce = config.announce + args.announce
    if getattr(args, "ngrok", False):
        config.ngrok.enabled = True
    if getattr(args, "genesis", None) is not None:
        config.genesis = args.genesis
    if getattr(args, "fixed_price", False):
        config.dynamic_price = False
    config.validate()
    if write:  # only once the rest is valid: a refused command leaves no directory behind
        prepare_data_dir(config.data_dir)
    return config


def _client(args: argparse.Namespace) -> ControlClient:
    data_dir = _config_from(args).data_dir
    try:
        return ControlClient.for_data_dir(data_dir)
    except NodeNotRunning:
        # Two slips a newcomer makes: a devnet's own directory, and a directory that is not.
        if (data_dir / "peer-0").is_dir():
            raise NodeNotRunning(
                f"{data_dir} is a devnet's directory; its peers run in "
                f"{data_dir / 'peer-0'}, {data_dir / 'peer-1'}, ... (--data-dir one of them)"
            ) from None
        if not data_dir.exists():
            raise NodeNotRunning(f"no running node found: {data_dir} does not exist") from None
        raise


# -- commands ---------------------------------------------------------------------------------


def cmd_id(args: argparse.Namespace) -> int:
    """Print this node's peer ID (creating the identity on first use)."""
    config = _config_from(args, write=True)
    identity = load_or_create_identity(config.data_dir)
    if args.json:
        print(json.dumps({"peer_id": identity.peer_id, "data_dir": str(config.data_dir)}))
    else:
        print(identity.peer_id)
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    """Run a node until SIGINT or SIGTERM, holding the data directory's lock."""
    config = _config_from(args)
    # The highest directory this run creates (None: the data directory exists already).
    created = next(
        (d for d in reversed([config.data_dir, *config.data_dir.parents]) if not d.exists()),
        None,
    )
    prepare_data_dir(config.data_dir)
    # The lock first: a second node on this directory must stop before it touches anything
    # (it shares the identity and the stores, and would delete the first one's control.json).
    lock = DataDirLock(config.data_dir)
    lock.acquire()
    try:
        from mtor_p2p.ledger.store import LEDGER_FILE_NAME, check_ledger_file

        # Before the ports, the logging and the GPU probe: a ledger this version refuses is
        # said first and alone (a new user saw two warnings before it).
        check_ledger_file(config.data_dir / LEDGER_FILE_NAME)
        _probe_ports(config)
        _setup_logging(config.log_level, log_format=config.log_format, config=config)
        code, stopped = _run_node(args, config, lock)
    finally:
        if created is not None:
            _remove_if_unused(config.data_dir, created)
        lock.release()
    if stopped is not None:
        # Only now (record withdrawn, ledger and receipts on disk, the directory unlocked):
        # an operator or a script waiting on it knows the stop is complete, where a clean
        # stop used to print nothing after the banner.
        if args.json:
            print(json.dumps({"stopped": True, "peer_id": stopped}), flush=True)
        else:
            print(f"mtor-peer stopped ({stopped})", flush=True)
    return code


def _remove_if_unused(data_dir: Path, created: Path) -> None:
    """Remove a data directory this run created and left holding nothing but its lock file (a
    run refused before the node started: a port in use, an address this host lacks), and the
    empty parents it created up to ``created``, so that a mistyped flag leaves nothing behind.
    Called with the lock held: a process that opens the lock file after it is unlinked finds
    no directory, and none can hold the old file."""
    try:
        if set(os.listdir(data_dir)) != {LOCK_FILE_NAME}:
            return
        os.unlink(data_dir / LOCK_FILE_NAME)
        directory = data_dir
        while True:
            os.rmdir(directory)  # fails, and stops, on a directory no longer empty
            if directory == created:
                break
            directory = directory.parent
    except OSError:
        pass  # left as it is: nothing depends on its removal


def _probe_bind(host: str, port: int) -> OSError | None:
    """Bind ``host:port`` and let go; the error, if binding fails.

    py-libp2p's listener sets SO_REUSEPORT, so a second node could share its port without a
    word; this probe does not set it, so it fails with EADDRINUSE wherever a node listens.
    SO_REUSEADDR keeps a port whose old connections linger in TIME_WAIT usable (on Linux it
    does not let a second socket bind a port that is listening)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc
    return None


def _probe_ports(config: NodeConfig) -> None:
    """Refuse, before the node starts, listen addresses this host does not have (the node
    reported "running" and listened nowhere) and ports already in use (a second node shared
    the first one's port through SO_REUSEPORT), for --listen, --lane-port, --api-port and
    --metrics-listen (which failed only once the node had started, naming the wrong flags)."""
    probes = []
    for addr in config.listen:
        host, port = check_listen_addr(addr)
        probes.append((f"--listen {addr}", host, port))
        if config.lanes != "off" and config.lane_port:
            probes.append((f"--lane-port {config.lane_port}", host, config.lane_port))
    if config.api_port:
        probes.append((f"--api-port {config.api_port}", "127.0.0.1", config.api_port))
    if config.metrics_listen is not None:
        host, port = split_host_port(config.metrics_listen)
        if port:  # 0: any free port
            probes.append((f"--metrics-listen {config.metrics_listen}", host, port))
    for flag, host, port in probes:
        error = _probe_bind(host, port)
        if error is None:
            continue
        if error.errno == errno.EADDRINUSE:
            raise CliError(
                f"{flag}: port {port} on {host} is already in use (another mtor-peer? see "
                "mtor-peer status); pick another port, or 0 for any free one",
                EXIT_FAILURE,
            )
        if error.errno == errno.EADDRNOTAVAIL:
            raise CliError(
                f"{flag}: this host has no address {host}; listen on one of its own "
                "addresses, or on 0.0.0.0 for all of them",
                EXIT_USAGE,
            )
        if error.errno == errno.EACCES:
            raise CliError(
                f"{flag}: port {port} needs privileges; use a port above 1023", EXIT_USAGE
            )
        raise CliError(f"{flag}: cannot listen on {host}:{port}: {error.strerror}", EXIT_USAGE)


def _run_node(
    args: argparse.Namespace, config: NodeConfig, lock: DataDirLock
) -> tuple[int, str | None]:
    """Run the node of ``config`` until SIGINT or SIGTERM; the exit code, and the node's peer
    ID when it stopped cleanly."""
    import trio

    from mtor_p2p.node import Node

    log = logging.getLogger("mtor_p2p.cli")

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with Node.open(config, lock=lock) as node:
                log.info(
                    "mtor-peer %s running as %s",
                    __version__,
                    node.peer_id,
                    extra={"peer_id": node.peer_id, "addrs": node.addrs(), "pid": os.getpid()},
                )
                ready = {
                    "peer_id": node.peer_id,
                    "addrs": node.addrs(),
                    "tunnel": node.tunnel_url,
                    "lane_port": node.lane_port(),
                }
                if args.json:
                    print(json.dumps(ready), flush=True)
                else:
                    print(f"mtor-peer {__version__} running as {node.peer_id}", flush=True)
                    listening = {str(a).split("/p2p/")[0] for a in config.listen}
                    for addr in node.addrs():
                        # Announced addresses (a tunnel, a port forward, a relay circuit)
                        # are where peers reach us, not where we listen.
                        bare = addr.split("/p2p/")[0]
                        word = "listening on" if bare in listening else "reachable at"
                        print(f"  {word} {addr}", flush=True)
                    if node.lane_port() is not None:
                        print(f"  lanes on TCP port {node.lane_port()}", flush=True)
                    print("  Ctrl-C to stop", flush=True)
                async with trio.open_nursery() as nursery:

                    async def stop_on_signal() -> None:
                        async for _signum in signals:
                            node.stopped.set()
                            return

                    nursery.start_soon(stop_on_signal)
                    await node.stopped.wait()
                    log.info("stopping")
                    nursery.cancel_scope.cancel()
            stopped.append(node.peer_id)

    stopped: list[str] = []  # the peer ID, once the node has closed cleanly
    try:
        trio.run(main)
    except BaseException as exc:  # unwrap trio's exception groups into one clear line
        return _exit_for(exc), None
    return EXIT_OK, stopped[0] if stopped else None


def _exit_for(exc: BaseException) -> int:
    from mtor_p2p.ngrok_tunnel import NgrokError
    from mtor_p2p.runtime import leaf_exceptions  # NumPy and trio: not for every command

    for leaf in leaf_exceptions(exc):
        if isinstance(leaf, KeyboardInterrupt):
            return EXIT_OK
        if isinstance(leaf, NgrokError):
            print(f"mtor-peer: error: ngrok: {leaf}", file=sys.stderr)
            return EXIT_NGROK
        if isinstance(leaf, ConfigError | IdentityError | LedgerError | RecordError):
            print(f"mtor-peer: error: {leaf}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(leaf, OSError):
            if leaf.errno == errno.EADDRINUSE:  # taken between the probe and the bind
                print(
                    f"mtor-peer: error: an address is already in use ({leaf.strerror}); "
                    "pick other ports (--listen, --lane-port, --api-port, --metrics-listen)",
                    file=sys.stderr,
                )
            else:
                print(f"mtor-peer: error: {leaf.strerror or leaf}", file=sys.stderr)
            return EXIT_FAILURE
    return _unexpected(leaf_exceptions(exc)[0])


def _unexpected(exc: BaseException) -> int:
    """One line for an error nobody foresaw (a bug): what it was and how to see more."""
    if os.environ.get("MTOR_DEBUG"):
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    print(
        f"mtor-peer: unexpected error: {type(exc).__name__}: {exc} (a bug: rerun with "
        "MTOR_DEBUG=1 for the traceback and report it)",
        file=sys.stderr,
    )
    return EXIT_FAILURE


# -- ledger -----------------------------------------------------------------------------------


def _ledger_call(args: argparse.Namespace, method: str, path: str, payload: Any = None) -> Any:
    """Ask the running node; None when no node runs on the data directory."""
    try:
        return _client(args).call(method, path, payload)
    except NodeNotRunning:
        return None


@contextmanager
def _offline_ledger(args: argparse.Namespace) -> Iterator[tuple[Any, Any]]:
    """The data directory's ledger (closed afterwards) and identity, for when the node is
    stopped."""
    from mtor_p2p.node import open_ledger

    config = _config_from(args)
    if not config.data_dir.exists():
        # A mistyped --data-dir would otherwise become a new node's directory, with a new
        # identity and an empty ledger, and the answer would be about that node.
        raise CliError(
            f"no data directory {config.data_dir}: no node has run there (check --data-dir)",
            EXIT_NOT_RUNNING,
        )
    from mtor_p2p.ledger.store import LEDGER_FILE_NAME

    if not any((config.data_dir / name).exists() for name in (KEY_FILE_NAME, LEDGER_FILE_NAME)):
        # Nor should a directory no node ever used (no identity, no ledger: a ledger copied
        # alone is still read) become one: a new user's `balance --data-dir` on an empty
        # directory wrote a key and a ledger there, and tightened its mode.
        where = shlex.quote(str(config.data_dir))
        raise CliError(
            f"no node has run on {config.data_dir} (no identity key or ledger there; check "
            f"--data-dir, or start one with: {invoked_as()} run --data-dir {where})",
            EXIT_NOT_RUNNING,
        )
    prepare_data_dir(config.data_dir)
    owner = lock_owner(config.data_dir)
    if owner is not None:
        # A node runs but its control API did not answer: writing its stores under it would
        # race with it.
        raise CliError(
            f"the node{f' (pid {owner})' if owner else ''} on {config.data_dir} runs but its "
            f"control API does not answer; try again, or stop it ({invoked_as()} stop "
            f"--data-dir {config.data_dir})",
            EXIT_FAILURE,
        )
    identity = load_or_create_identity(config.data_dir)
    ledger = open_ledger(config)
    try:
        yield ledger, identity
    finally:
        ledger.close()


def cmd_balance(args: argparse.Namespace) -> int:
    """Show this peer's balance and stake, derived from the ledger's verified records."""
    from mtor_p2p.ledger.genesis import nano_to_credits

    summary = _ledger_call(args, "GET", "/v1/ledger/balance" + ("?all=1" if args.all else ""))
    source = "running node"
    if summary is None:
        from mtor_p2p.node import all_accounts, ledger_summary

        with _offline_ledger(args) as (ledger, identity):
            summary = ledger_summary(ledger, identity.peer_id)
            if args.all:
                summary["accounts"] = all_accounts(ledger)
        source = "data directory (node stopped)"
    summary["source"] = source
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
        return EXIT_OK
    c = nano_to_credits
    print(f"peer       {summary['peer_id']}")
    print(f"network    {summary['network']} (genesis {summary['genesis'][:16]}…)")
    others = summary.get("sync", {}).get("other_network_peers", 0)
    if others:
        print(
            f"           {others} connected peer(s) refused this ledger's sync as another "
            "network's: they do not see these credits (to join theirs: their genesis, in a new "
            "data directory, --genesis FILE --data-dir DIR)"
        )
    print(f"balance    {c(summary['balance'])} credits (can spend {c(summary['spendable'])})")
    print(f"stake      {c(summary['stake'])} credits   slashed {c(summary['slashed'])}")
    print(
        f"ledger     {summary['entries']} entries, {summary['receipts']} receipts, "
        f"{summary['checkpoints']} checkpoint(s); supply {c(summary['supply'])}, "
        f"staked {c(summary['staked'])}, burned {c(summary['burned'])}"
    )
    print(f"source     {source}")
    for peer, account in summary.get("accounts", {}).items():
        print(
            f"  {'…' + peer[-12:]:<14} balance {c(account['balance']):>18}  "
            f"stake {c(account['stake']):>14}  slashed {c(account['slashed']):>10}"
        )
    return EXIT_OK


def _credits_argument(text: str) -> int:
    """A positive, finite amount of credits from the command line, in nano-credits (exit 2
    with one line otherwise: ``inf`` and ``nan`` are refused as what they are)."""
    from decimal import Decimal, InvalidOperation

    from mtor_p2p.ledger.genesis import MAX_AMOUNT, credits_to_nano, nano_to_credits

    example = "give a number of credits like 10 or 2.5"
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise CliError(f"AMOUNT {text!r} is not a number: {example}", EXIT_USAGE) from None
    if not value.is_finite():
        raise CliError(f"AMOUNT must be a finite number, not {text!r}: {example}", EXIT_USAGE)
    if value <= 0:
        raise CliError(f"AMOUNT must be positive, not {text}: {example}", EXIT_USAGE)
    if value > Decimal(MAX_AMOUNT) / 10**9:
        raise CliError(
            f"AMOUNT {text} is more than any account can hold ({nano_to_credits(MAX_AMOUNT)})",
            EXIT_USAGE,
        )
    try:
        return credits_to_nano(text.strip())
    except ValueError as exc:  # more than 9 decimal places
        raise CliError(f"AMOUNT {text}: {exc}", EXIT_USAGE) from None


def _refusal_in_credits(kind: str, message: str) -> str:
    """The ledger's refusal, with its nano-credit amounts said in credits (the unit of every
    human-readable line; nano-credits are for --json)."""
    import re

    from mtor_p2p.ledger.genesis import nano_to_credits

    message = re.sub(r"^\d{3}: ", "", message)
    return re.sub(
        r"(\d+) nano-credits(, cannot (?:send|stake) )?(\d+)?",
        lambda m: (
            f"{nano_to_credits(int(m[1]))} credits"
            + (f", cannot {kind} {nano_to_credits(int(m[3]))}" if m[3] else "")
        ),
        message,
    )


def _debit(args: argparse.Namespace, kind: str, amount: int, to: str | None) -> dict[str, Any]:
    """A stake or transfer through the running node, else signed into the stopped node's
    ledger."""
    body: dict[str, Any] = {"amount": amount} if to is None else {"to": to, "amount": amount}
    try:
        result = _ledger_call(args, "POST", f"/v1/ledger/{kind}", body)
    except ControlError as exc:
        raise CliError(f"{kind} refused: {_refusal_in_credits(kind, str(exc))}") from exc
    return result if result is not None else _sign_offline(args, kind, amount, to)


def _check_recipient(args: argparse.Namespace, peer: str) -> None:
    """Refuse what is not a peer ID (exit 2); warn, on stderr, about a valid peer ID that
    neither the ledger nor the capacity view knows: credits sent to a mistyped ID are lost."""
    from mtor_p2p.identity import public_key_from_peer_id

    try:
        public_key_from_peer_id(peer)
    except ValueError as exc:
        raise CliError(
            f"PEER {peer!r} is not a peer ID ({exc}); it starts with 12D3KooW "
            "(see mtor-peer peers --json or balance --all --json, which show whole IDs, "
            "or mtor-peer id on that peer)",
            EXIT_USAGE,
        ) from None
    known: set[str] = set()
    summary = _ledger_call(args, "GET", "/v1/ledger/balance?all=1")
    if summary is not None:
        known |= set(summary.get("accounts", {}))
        try:
            known |= {p["peer_id"] for p in _client(args).call("GET", "/v1/peers")["peers"]}
        except (NodeNotRunning, ControlError):
            pass
    else:
        from mtor_p2p.node import all_accounts

        with _offline_ledger(args) as (ledger, _identity):
            known |= set(all_accounts(ledger))
    if peer not in known:
        print(
            f"mtor-peer: warning: {peer} has no account in this node's ledger and is not in "
            "its capacity view; check the ID (credits sent to a wrong one are lost)",
            file=sys.stderr,
        )


def cmd_stake(args: argparse.Namespace) -> int:
    """Stake credits: they back this peer's work and are slashed if it is proven to cheat."""
    from mtor_p2p.ledger.genesis import nano_to_credits

    amount = _credits_argument(args.amount)
    result = _debit(args, "stake", amount, None)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(
            f"staked {nano_to_credits(amount)} credits: stake now "
            f"{nano_to_credits(result['stake'])}, balance {nano_to_credits(result['balance'])}"
        )
    return EXIT_OK


def cmd_transfer(args: argparse.Namespace) -> int:
    """Send credits of this peer's balance to another peer."""
    from mtor_p2p.ledger.genesis import nano_to_credits

    amount = _credits_argument(args.amount)
    _check_recipient(args, args.peer)
    result = _debit(args, "transfer", amount, args.peer)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(
            f"sent {nano_to_credits(amount)} credits to {args.peer}: "
            f"balance now {nano_to_credits(result['balance'])}"
        )
    return EXIT_OK


def _sign_offline(
    args: argparse.Namespace, kind: str, amount: int, to: str | None
) -> dict[str, Any]:
    """Sign a stake or transfer into the stopped node's ledger; peers pull it once the node
    runs again."""
    import os
    import time

    from mtor_p2p.ledger.entries import decode_entry, make_stake, make_transfer
    from mtor_p2p.ledger.genesis import nano_to_credits

    with _offline_ledger(args) as (ledger, identity):
        balance = ledger.account(identity.peer_id)["balance"]
        if amount > balance:
            raise CliError(
                f"{kind} refused: the balance is {nano_to_credits(balance)} credits, "
                f"less than {nano_to_credits(amount)}"
            )
        at, nonce = round(time.time(), 3), os.urandom(8).hex()
        if to is None:
            wire = make_stake(identity, amount, at, ledger.genesis_hash, nonce)
        else:
            wire = make_transfer(identity, to, amount, at, ledger.genesis_hash, nonce)
        result = ledger.ingest([wire])
        if result.invalid:
            raise CliError(f"{kind} refused: {result.invalid[0]}")
        entry = decode_entry(wire, ledger.genesis_hash)
        extra = {} if to is None else {"to": to}
        return {
            "entry": entry.entry_id,
            "amount": amount,
            **extra,
            **ledger.account(identity.peer_id),
        }


def cmd_ledger(args: argparse.Namespace) -> int:
    """Audit the ledger (verify) or prove that a receipt is in a checkpoint (prove)."""
    from mtor_p2p.ledger.genesis import nano_to_credits

    if args.action == "verify":
        if args.entry:
            raise CliError(f"ledger verify takes no ENTRY (got {args.entry!r})", EXIT_USAGE)
        report = _ledger_call(args, "GET", "/v1/ledger/verify")
        if report is None:
            with _offline_ledger(args) as (ledger, _):
                report = ledger.verify()
        if args.json:
            print(json.dumps(report, indent=2, sort_keys=True))
        else:
            counts = ", ".join(
                f"{n} {k}{'' if n == 1 else 's'}" for k, n in sorted(report["entries"].items())
            )
            print(f"entries      {counts or 'none'}: every signature re-checked")
            c = nano_to_credits
            print(
                f"supply       {c(report['supply'])} credits, balances+stakes+burned "
                f"{c(report['total'])}"
            )
            final_epochs = {cp["epoch"] for cp in report["checkpoints"] if cp["final"]}
            for cp in report["checkpoints"]:
                # An epoch can hold several checkpoints (signed as its entries arrived); once
                # one is final, the others list sets that no longer count.
                superseded = not cp["final"] and cp["epoch"] in final_epochs
                print(
                    f"checkpoint   epoch {cp['epoch']}{' FINAL' if cp['final'] else ''}: "
                    f"{cp['count']} entries, {cp['signers']} signers "
                    f"({cp['weight_bps'] / 100:.1f}% of weight), "
                    f"signature {'ok' if cp['signature_ok'] else 'BAD'}, "
                    f"{'matches' if cp['matches_local'] else 'differs from'} the local set"
                    + ("; an earlier one: the epoch's FINAL one counts" if superseded else "")
                )
            print(
                f"finality     {report['final_epochs']} final epoch(s); "
                f"{report['late_entries']} late entries applied after them"
            )
            for problem in report["problems"]:
                print(f"problem      {problem}")
            print("ledger OK" if report["ok"] else "ledger has problems")
        return EXIT_OK if report["ok"] else EXIT_LEDGER_BAD
    if not args.entry:
        raise CliError("ledger prove needs a receipt entry ID", EXIT_USAGE)
    # A value pasted with a table's ellipsis (the JOB column's have one): the digits before
    # it are what was meant, and the answer then says whether they name an entry.
    args.entry = args.entry.removesuffix("…").removesuffix("...")
    if not is_entry_prefix(args.entry):
        raise CliError(
            f"ENTRY is an entry's ID or a prefix of {MIN_ENTRY_PREFIX}-64 hex digits that only "
            f"it starts with (the ENTRY column of `receipts`), not {args.entry[:70]!r}",
            EXIT_USAGE,
        )
    try:
        proof = _ledger_call(
            args, "GET", f"/v1/ledger/prove?id={urllib.parse.quote(args.entry, safe='')}"
        )
    except ControlError as exc:
        raise CliError(_not_provable_yet(str(exc))) from exc
    if proof is None:
        with _offline_ledger(args) as (ledger, _):
            try:
                proof = ledger.prove(args.entry)
            except LedgerError as exc:
                raise CliError(_not_provable_yet(str(exc))) from exc
    # Checked here too: the node's answer is a claim until its path leads to the root.
    holds = _proof_holds(proof, args.entry)
    if holds and len(args.entry.strip()) < 64:
        # A prefix names whichever entry starts with it here: say which one that was.
        print(f"(ENTRY {args.entry.strip()} is {proof['entry']})", file=sys.stderr)
    if args.json:
        print(json.dumps(proof, indent=2, sort_keys=True))
    else:
        try:
            _print_proof(proof, holds)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise CliError("the node's answer is not an inclusion proof", EXIT_LEDGER_BAD) from None
    return EXIT_OK if holds else EXIT_LEDGER_BAD


def _proof_holds(proof: Any, asked: str) -> bool:
    """Whether ``proof`` is of the entry ``asked`` for (its ID or a prefix) and its path leads
    from that entry to its checkpoint's root."""
    from mtor_p2p.ledger.merkle import InclusionProof, verify_inclusion

    try:
        path = InclusionProof.from_json(proof["proof"])
        root = bytes.fromhex(proof["checkpoint"]["root"])
        entry = path.leaf.hex()
        return (
            entry == proof["entry"]
            and entry.startswith(asked.strip().lower())
            and path.count == proof["checkpoint"]["count"]
            and verify_inclusion(path, root)
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        return False


def _print_proof(proof: dict[str, Any], holds: bool) -> None:
    checkpoint, path = proof["checkpoint"], proof["proof"]
    if checkpoint["final"]:
        finality = "final"
    else:
        # Finality is judged on the signers' weight when the epoch began (stake counts from
        # the epoch after it is placed), not their weight now, shown below.
        finality = (
            "not final yet: its signers did not hold enough stake when its epoch began "
            "(the weight below is now's). Stake counts from the epoch after it is placed, "
            "less the staker's debt, and more signatures may still come. The epoch in which "
            "a network's first stakes were placed can never be final; the epochs after it "
            "can"
        )
    print(f"entry        {proof['entry']}  ({proof['kind']}, epoch {proof['epoch']})")
    print(f"checkpoint   {proof['checkpoint_entry'][:16]}…  {finality}")
    print(
        f"             {checkpoint['signers']} signer(s) holding "
        f"{checkpoint['weight_bps'] / 100:.1f}% of the weight now (stake net of debt); "
        f"{checkpoint['count']} entries, "
        f"{'matching' if checkpoint['matches_local'] else 'differing from'} the local set"
    )
    print(f"root         {checkpoint['root']}")
    print(
        f"path         {len(path['path'])} hash(es) from leaf index {path['index']} of "
        f"{path['count']} leaves, "
        + ("leading to that root" if holds else "NOT leading to that root")
    )
    print(
        "(this command checks the path against the root in the answer; `ledger verify` "
        "checks the checkpoints' signatures; --json prints the proof)",
        file=sys.stderr,
    )


def _not_provable_yet(reason: str) -> str:
    """The ledger's refusal to prove an entry, without the API's status code, and with
    what to do when the entry is simply not in a signed checkpoint yet."""
    reason = re.sub(r"^\d{3}: ", "", reason)
    if reason.startswith("no entry "):
        reason += " (ENTRY is the last column of `receipts`, not the JOB column)"
    if "no checkpoint of epoch" in reason:
        reason += (
            ": an epoch is provable once it has ended and staked peers have signed its "
            "checkpoint (on a devnet about 35 s after the entry; it needs a staked peer, "
            "mtor-peer stake); try again then"
        )
    return reason


def cmd_status(args: argparse.Namespace) -> int:
    """Show the running node's status."""
    status = _client(args).call("GET", "/v1/status")
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return EXIT_OK
    print(f"peer       {status['peer_id']}")
    rules = f"   ledger rules {status['ledger_rules']}" if "ledger_rules" in status else ""
    print(f"version    {status['version']}{rules}   uptime {status['uptime_s']:.0f} s")
    print(f"region     {status['region']}")
    ledger_line = _ledger_line(status)
    if ledger_line is not None:
        print(ledger_line)
    for addr in status["addrs"]:
        print(f"address    {addr}")
    if status.get("tunnel"):
        print(f"tunnel     {status['tunnel']}")
    print(
        f"network    {status['connected_peers']} connected, "
        f"{status['routing_table_size']} in routing table, {status['view_size']} in capacity view"
    )
    print(f"compute    {format_rate(status['tflops'])} measured")
    for device in status["devices"]:
        print(
            f"device     {device['kind']}: {device['name']} "
            f"({device['mem_free'] / GIB:.1f} GiB free)"
        )
    why = (status.get("insight") or {}).get("why_no_work")
    if why:
        print(f"work       {why['summary']}")
    if status.get("metrics_listen"):
        print(f"metrics    {status['metrics_listen']} (no token)")
    for line in _status_guard_lines(status):
        print(line)
    return EXIT_OK


def _not_used_header(count: int, out: dict[str, str], demoted_count: int | None = None) -> str:
    """The first line of a job summary's workers not used (``out``: worker -> why, the first
    20; ``demoted_count``: how many of all of them are out for a fault or a demotion, when
    the summary says). The peer book explains demotions; refusals that are no fault (another
    network, other rules, a quote gone stale, our credit) are said on the lines that follow,
    and the book has nothing on them (a new user's walkthrough)."""
    from mtor_p2p.compute.protocol import NO_FAULT_OUT

    if demoted_count is not None:
        demoted = demoted_count > 0
    else:
        demoted = any(not str(why).startswith(NO_FAULT_OUT) for why in out.values())
    where = " (see mtor-peer reputation)" if demoted else ""
    return f"not used   {count} worker(s){where}:"


def _ledger_line(status: dict[str, Any]) -> str | None:
    """``ledger     network N (genesis G…)[; K connected peer(s) of another network...]``: the
    network this node's credits and jobs belong to. Peers of another (a node joined without
    its network's genesis) share neither, and the rest of ``status`` would not say so (a new
    user's walkthrough)."""
    ledger = status.get("ledger") or {}
    if not ledger.get("network") or not ledger.get("genesis"):
        return None
    others = (ledger.get("sync") or {}).get("other_network_peers", 0)
    extra = (
        f"; {others} connected peer(s) of another network, by their ledgers' refusal of our "
        "sync (see balance)"
        if others
        else ""
    )
    return f"ledger     network {ledger['network']} (genesis {ledger['genesis'][:16]}…){extra}"


def _reachability_line(nat: dict[str, Any]) -> str:
    """``reachability public|private via relays R1, R2|unknown; NAT ...; punches ...``."""
    nat_words = {
        "none": "no NAT",
        "port-preserving": "NAT keeps ports (hole punching can work)",
        "port-changing": "NAT changes ports per destination (hole punching cannot work)",
        "unknown": "NAT behaviour unknown",
    }
    head = nat.get("summary") or nat.get("reachability", "unknown")
    punches = nat.get("hole_punches") or []
    direct = sum(1 for p in punches if p.get("direct"))
    tail = f"; hole punches {direct}/{len(punches)} direct" if punches else ""
    waits = [p["retry_in"] for p in punches if p.get("retry_in") is not None]
    if waits:
        tail += f" (next round in {min(waits):.0f} s)"
    relay = "; serving as a relay" if nat.get("relay_service") else ""
    kinds = list((nat.get("connections") or {}).values())
    links = (
        f"; connections {kinds.count('direct')} direct, {kinds.count('relayed')} relayed"
        if kinds
        else ""
    )
    return (
        f"reachable  {head} ({nat.get('reason', '')}); "
        f"{nat_words.get(nat.get('nat', 'unknown'), nat.get('nat'))}{relay}{links}{tail}"
    )


def _status_guard_lines(status: dict[str, Any]) -> list[str]:
    """One line each for the peer book, the host's guards, the mesh, the control API and the
    worker (``--json`` has every counter); a part the node does not report is left out."""
    lines = []
    reputation = status.get("reputation")
    if reputation:
        challenges = reputation.get("challenges") or {}
        lines.append(
            f"reputation {reputation.get('known', 0)} known, {reputation.get('measured', 0)} "
            f"measured, {reputation.get('demoted', 0)} demoted; challenges "
            f"{challenges.get('challenges', 0)} ({challenges.get('verified', 0)} verified)"
        )
    guards = status.get("guards")
    if guards:
        refused_peer = guards.get("requests_refused_peer_bytes", 0) + guards.get(
            "requests_refused_peer_streams", 0
        )
        lines.append(
            f"guards     requests refused: {guards.get('requests_refused_busy', 0)} busy, "
            f"{guards.get('requests_refused_size', 0)} size, {refused_peer} per-peer limit; "
            f"{guards.get('requests_cut_slow', 0)} cut slow, "
            f"{guards.get('handler_errors', 0)} handler errors"
        )
    nat = status.get("reachability")
    if nat:
        lines.append(_reachability_line(nat))
    if guards and status.get("lane_port") is not None:
        lines.append(
            f"lanes      port {status['lane_port']}; open {guards.get('lanes_open_out', 0)} out, "
            f"{guards.get('lanes_open_in', 0)} in; requests {guards.get('lane_requests_out', 0)}"
            f" out, {guards.get('lane_requests_in', 0)} in; peers without a lane (streams used) "
            f"{guards.get('lanes_failed_out', 0)}; refused {guards.get('lanes_refused_in', 0)}, "
            f"records that did not authenticate {guards.get('lane_auth_failures', 0)}"
        )
    mesh = status.get("mesh")
    if mesh:
        target = mesh.get("target")
        if target is None:
            from mtor_p2p.node import TARGET_CONNECTIONS as target
        lines.append(
            f"mesh       {status.get('connected_peers', 0)}/{target} connected, "
            f"{mesh.get('dials', 0)} dials, {mesh.get('dial_failures', 0)} failed, "
            f"{mesh.get('backed_off', 0)} backed off"
        )
    api = status.get("control_api")
    if api:
        dropped = sum(api.get(k, 0) for k in ("dropped_idle", "head_timeouts", "refused_busy"))
        lines.append(
            f"control    {api.get('open', 0)} open, {api.get('accepted', 0)} accepted, "
            f"{dropped} dropped ({api.get('dropped_idle', 0)} idle, "
            f"{api.get('head_timeouts', 0)} slow, {api.get('refused_busy', 0)} busy), "
            f"{api.get('route_errors', 0)} errors"
        )
    worker = status.get("worker")
    if worker:
        refused = sum(
            worker.get(k, 0)
            for k in ("price_refusals", "credit_refusals", "unpaid_refusals", "uploads_refused")
        )
        lines.append(
            f"worker     {worker.get('backend', '?')}: {worker.get('shards_run', 0)} shards run, "
            f"{worker.get('shards_failed', 0)} failed, {worker.get('active', 0)} active; "
            f"{refused} refused (price {worker.get('price_refusals', 0)}, "
            f"credit {worker.get('credit_refusals', 0)}, "
            f"unpaid {worker.get('unpaid_refusals', 0)}, "
            f"uploads {worker.get('uploads_refused', 0)}); " + _shared_memory_words(worker)
        )
    return lines


def _shared_memory_words(worker: dict[str, Any]) -> str:
    """The worker line's account of shared memory (requesters on this machine)."""
    if worker.get("shared_memory") is False:
        return "shared memory off"
    return (
        f"shared memory: {worker.get('local_uploads', 0)} operands taken "
        f"({worker.get('bytes_shared', 0) / (1 << 20):.0f} MiB), "
        f"{worker.get('outputs_shared', 0)} outputs handed over "
        f"({worker.get('output_bytes_shared', 0) / (1 << 20):.0f} MiB)"
    )


def cmd_peers(args: argparse.Namespace) -> int:
    """Show the capacity view (this node's own record among it), optionally filtered. Peers
    following other ledger rules (another MTOR version, which this node never schedules:
    their receipts would enter another ledger) are not listed; a line on stderr counts them,
    and ``status --json`` shows them under ``insight.peers``. Peers of another network by
    their word are listed, marked ``other_network``, and counted on stderr."""
    asked = {
        name: getattr(args, name)
        for name in ("min_mem_gib", "min_tflops", "max_price", "region")
        if getattr(args, name) is not None
    }
    query = [f"{name}={value}" for name, value in asked.items()]
    path = "/v1/peers" + ("?" + "&".join(query) if query else "")
    client = _client(args)
    answer = client.call("GET", path)
    peers = answer["peers"]
    other_rules = answer.get("other_ledger_rules", 0)
    print(json.dumps(peers, indent=2, sort_keys=True) if args.json else format_peers_table(peers))
    elsewhere = answer.get("other_network", 0)
    if elsewhere:
        print(
            f"{elsewhere} of these peer(s) follow another network (other_network in --json): "
            "their ledgers refused this node's sync, or their workers its jobs; they share no "
            f"credits with it and do not work for it (see {invoked_as()} balance)",
            file=sys.stderr,
        )
    if other_rules:
        print(
            f"{other_rules} peer(s) of other ledger rules not shown (another MTOR version: "
            f"never scheduled here; {invoked_as()} status --json lists them under insight.peers)",
            file=sys.stderr,
        )
    if args.json:
        return EXIT_OK
    if not peers and query:
        # Say what the filters left out, so that an empty list is not read as "nobody there".
        everyone = client.call("GET", "/v1/peers")["peers"]
        said_region = False
        if args.region is not None:
            # Region codes are whatever peers announce (case counts): name the ones in view,
            # so that "eus" or a typo is not read as "nobody there".
            regions = sorted({p["region"] for p in everyone})
            if regions:
                print(
                    f"no peer in region {args.region!r}; regions in view: {', '.join(regions)}",
                    file=sys.stderr,
                )
                said_region = True
        # The count too, unless the region was the only filter (it said as much: a new user
        # read the two lines as one thing said twice).
        if everyone and not (said_region and len(asked) == 1):
            filters = " ".join(f"--{n.replace('_', '-')} {v}" for n, v in asked.items())
            print(f"{len(everyone)} peer(s) in view, none matching {filters}", file=sys.stderr)
    return EXIT_OK


REPUTATION_HELP = (
    "Show what this node measured of every worker it used: verified speed, reliability, and "
    "who is demoted (unreachable, failing, slow, caught cheating), why and for how long. A "
    "worker's advertised TFLOP/s counts for nothing here until one of its results was "
    "verified. Columns: SPEED is the median speed its verified shards delivered (network and "
    "queueing included); OK verified shards; FAIL errors, timeouts, failed dials and malformed "
    "answers; SLOW attempts cut off as a straggler; WRONG results proven wrong; RELIAB the "
    "Laplace-smoothed share of verified attempts, (OK + 1) / (attempts + 2), so a worker never "
    "tried has 0.50 and one verified shard out of one has 0.67; STATE 'ok' or how long it stays "
    "demoted and why. With no node running, the peer book is read from the data directory's "
    "peers.sqlite (as last saved)."
)


def _offline_reputation(args: argparse.Namespace) -> dict[str, Any] | None:
    """The stopped node's peer book, read-only from ``<data-dir>/peers.sqlite``, in the
    control API's shape; None if there is no such file."""
    import sqlite3
    import time

    from mtor_p2p.compute.reputation import PeerBook
    from mtor_p2p.node import PEER_BOOK_FILE_NAME

    path = _config_from(args).data_dir / PEER_BOOK_FILE_NAME
    if not path.is_file():
        return None
    try:
        book = PeerBook.read_only(path)
    except sqlite3.Error as exc:
        raise CliError(f"cannot read the peer book {path}: {exc}") from None
    # The node keeps network time; the wall clock is close enough to say how long is left.
    return {"peers": book.report(time.time()), "challenger": None, "source": str(path)}


def cmd_reputation(args: argparse.Namespace) -> int:
    """Show the workers' measured speed, reliability and demotions."""
    try:
        answer = _client(args).call("GET", "/v1/reputation")
        answer.setdefault("source", "running node")
    except NodeNotRunning as exc:
        answer = _offline_reputation(args)
        if answer is None:
            raise
        print(
            f"mtor-peer: {exc}; showing the peer book as last saved ({answer['source']})",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
        return EXIT_OK
    print(
        f"{'PEER':<14} {'SPEED':>13} {'OK':>5} {'FAIL':>5} {'SLOW':>5} {'WRONG':>5} "
        f"{'RELIAB':>6}  STATE"
    )
    for peer in answer["peers"]:
        measured = peer.get("measured_tflops")
        fails = sum(peer.get(k, 0) for k in ("failed", "timeouts", "unreachable", "misbehaved"))
        if peer.get("excluded"):
            state = f"out {format_duration(peer.get('demoted_for_s', 0))}: {peer['excluded']}"
        else:
            state = "ok"
        print(
            f"{'…' + peer['peer_id'][-12:]:<14} "
            f"{'-' if measured is None else format_rate(measured):>13} {peer['accepted']:>5} "
            f"{fails:>5} {peer.get('slow', 0):>5} {peer['rejected']:>5} "
            f"{peer['reliability']:>6.2f}  {state}"
        )
        if peer.get("last_error"):
            print(f"{'':<14} last error: {peer['last_error']}")
    summary = f"{len(answer['peers'])} worker(s)"
    challenger = answer.get("challenger")
    if challenger:
        stats = challenger["stats"]
        summary += (
            f"; challenges {stats['challenges']} "
            f"({stats['verified']} verified, {stats['failed']} failed)"
        )
    print(summary)
    return EXIT_OK


def _flags(names: Iterable[str]) -> str:
    """``--a and --b``, ``--x, --w1 and --b1``: flags named in a message."""
    flags = [f"--{name.replace('_', '-')}" for name in names]
    return flags[0] if len(flags) == 1 else f"{', '.join(flags[:-1])} and {flags[-1]}"


def _dims(shape: tuple[int, ...]) -> str:
    """A shape as people write it: ``4x3``."""
    return "x".join(map(str, shape))


def _submit_sizes(args: argparse.Namespace, spec: KernelInputs) -> dict[str, int]:
    """Every size of a random-input job: the flags, else the size it follows
    (``--seq-k`` = ``--seq-q``), else the kernel's default."""
    sizes: dict[str, int] = {}
    for size in spec.sizes:
        value = getattr(args, f"size_{size}")
        if value is None:
            value = sizes[spec.same_as[size]] if size in spec.same_as else spec.defaults[size]
        sizes[size] = value
    return sizes


def _submit_files(args: argparse.Namespace, spec: KernelInputs) -> dict[str, Path]:
    """The operand files given (``--a``, ``--x``, ...), by operand name."""
    files = {name: getattr(args, f"file_{name}") for name in spec.operands}
    return {name: path for name, path in files.items() if path is not None}


def _check_submit_inputs(args: argparse.Namespace) -> None:
    """Refuse, with exit 2 and one line naming the flag, what the job would trip over after
    it was sent (or, for ``--out``, after it ran and was paid): operand files that are missing
    or not ``.npy`` arrays, shapes that do not fit together, sizes above the kernel's limits,
    an output that cannot be written, and sizes given with files (they would be ignored)."""
    from mtor_kernels import KernelError
    from mtor_p2p.compute.inputs import check_shapes
    from mtor_p2p.compute.jobs import check_out_path, npy_header

    spec = KERNEL_INPUTS[args.kernel]
    files = _submit_files(args, spec)
    if files:
        if len(files) < len(spec.operands):
            missing = [name for name in spec.operands if name not in files]
            raise CliError(
                f"{_flags(spec.operands)} go together ({_flags(missing)} missing; or give "
                "none of them for random inputs)",
                EXIT_USAGE,
            )
        sizes = [size for size in spec.sizes if getattr(args, f"size_{size}") is not None]
        if sizes:
            raise CliError(
                f"{'/'.join(_flags([s]) for s in sizes)} cannot be given with "
                f"{'/'.join(_flags([n]) for n in spec.operands)} (the shapes come from the files)",
                EXIT_USAGE,
            )
        shapes = {}
        for name, path in files.items():
            flag = _flags([name])
            try:
                shape, dtype = npy_header(path, flag)
            except ValueError as exc:
                raise CliError(str(exc), EXIT_USAGE) from None
            if dtype.kind != "f":
                what = "computes on float32 or float16 arrays"
                if spec.kernel == "matmul":
                    what = "multiplies float32 or float16 matrices"
                raise CliError(
                    f"{flag} {path} holds {dtype} values; {spec.kernel} {what}: convert it first "
                    "(numpy: np.save(path, a.astype(np.float32)))",
                    EXIT_USAGE,
                )
            axes = spec.operands[name]
            if len(shape) != len(axes):
                kind = {1: "a vector", 2: "a matrix"}.get(len(axes), f"a {len(axes)}-D array")
                raise CliError(
                    f"{flag} {path} holds an array of shape {shape}, not {kind} "
                    f"({', '.join(axes)})",
                    EXIT_USAGE,
                )
            shapes[name] = shape
        mismatch = spec.mismatch(shapes)
        if mismatch:
            size, first, other = mismatch
            where = (
                f"axis {spec.operands[first].index(size)} of {_flags([first])}, "
                f"axis {spec.operands[other].index(size)} of {_flags([other])}"
            )
            raise CliError(
                f"{_flags([first])} is {_dims(shapes[first])} but {_flags([other])} is "
                f"{_dims(shapes[other])}: they disagree on {size} ({where})",
                EXIT_USAGE,
            )
        dtype_name = "float32"  # the limits do not depend on it
    else:
        shapes = spec.shapes(_submit_sizes(args, spec))
        dtype_name = args.dtype
    try:
        check_shapes(spec.kernel, shapes, dtype_name)  # the kernel's limits, before sending
    except KernelError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    if args.out:
        try:
            check_out_path(str(args.out))
        except ValueError as exc:
            message = str(exc).replace(f"out {str(args.out)!r}", f"--out {args.out}", 1)
            raise CliError(message, EXIT_USAGE) from None


KERNEL_DTYPES = ("float32", "float16")


def _converted_operands(
    args: argparse.Namespace, data_dir: Path, stack: ExitStack
) -> dict[str, str]:
    """The paths to send for the operand files, by operand name: the files themselves when
    they hold the same kernel dtype (float32 or float16), else float32 copies, with a notice on
    stderr (float64 and other float types, or float16 beside float32). The copies are private
    files in the data directory, removed once the node has read them (``stack`` closes after
    the POST)."""
    import tempfile

    import numpy as np

    from mtor_p2p.compute.jobs import load_npy, npy_header, save_npy

    paths = _submit_files(args, KERNEL_INPUTS[args.kernel])
    dtypes = {name: npy_header(path, _flags([name]))[1] for name, path in paths.items()}
    names = {str(d) for d in dtypes.values()}
    if len(names) == 1 and names <= set(KERNEL_DTYPES):
        return {name: str(path.resolve()) for name, path in paths.items()}
    target = np.dtype("float32")
    sent = {}
    for name, path in paths.items():
        flag = _flags([name])
        if dtypes[name] == target:
            sent[name] = str(path.resolve())
            continue
        print(
            f"mtor-peer: {flag} {path} is {dtypes[name]}: sending it as float32 (kernels "
            "compute in float32 or float16, and all operands must match)",
            file=sys.stderr,
        )
        try:
            array = load_npy(path, flag).astype(target)
        except ValueError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
        fd, temporary = tempfile.mkstemp(dir=data_dir, prefix=".submit-", suffix=".npy")
        os.close(fd)
        stack.callback(Path(temporary).unlink, missing_ok=True)
        save_npy(temporary, array)
        sent[name] = temporary
    return sent


def _cancel(client: ControlClient, job_id: str) -> None:
    """Ask the node to cancel ``job_id`` (Ctrl-C on submit); say what happened."""
    try:
        job = client.call("POST", "/v1/jobs/cancel", {"id": job_id})
    except ControlError as exc:
        if str(exc).startswith(("404: no route", "405")):
            message = "this node cannot cancel jobs: it runs on (see mtor-peer status)"
        else:
            message = f"the node did not cancel it: {exc}"
        print(f"\nmtor-peer: interrupted; {job_id}: {message}", file=sys.stderr)
    except NodeNotRunning:
        print(f"\nmtor-peer: interrupted; the node no longer answers ({job_id})", file=sys.stderr)
    else:
        paid = _paid_before_the_end(job) if isinstance(job, dict) else ""
        print(f"\nmtor-peer: interrupted; {job_id} cancelled{paid}", file=sys.stderr)


def _paid_before_the_end(job: dict[str, Any]) -> str:
    """What a job cancelled or failed part way still paid for: its accepted shards, whose
    receipts were countersigned as they came (a new user saw a cancelled job's 1,690 paid
    receipts in ``receipts`` and no word of them in ``submit`` or ``jobs``)."""
    done = job.get("done") or 0
    if job.get("state") not in ("cancelled", "failed") or not done:
        return ""
    return f"; the {done} shard(s) accepted before that stay paid (receipts lists them)"


def cmd_submit(args: argparse.Namespace) -> int:
    """Run a job (matmul, mlp, attention) through the local node and report how it went."""
    _check_submit_inputs(args)
    config = _config_from(args)
    client = _client(args)  # as every command that needs the node: the same hints
    with ExitStack() as stack:
        body = _submit_body(args, config.data_dir, stack)
        job_id = client.call("POST", "/v1/jobs", body)["id"]
    try:
        return _follow_job(args, client, job_id)
    except KeyboardInterrupt:
        _cancel(client, job_id)
        return EXIT_INTERRUPTED


def _submit_body(args: argparse.Namespace, data_dir: Path, stack: ExitStack) -> dict[str, Any]:
    """The ``POST /v1/jobs`` body for the submit flags."""
    spec = KERNEL_INPUTS[args.kernel]
    body: dict[str, Any] = {"kernel": spec.kernel, "verify": args.verify, "dtype": args.dtype}
    if _submit_files(args, spec):
        # The node runs elsewhere: it gets absolute paths.
        body.update(_converted_operands(args, data_dir, stack))
    else:
        body.update(_submit_sizes(args, spec), seed=args.seed)
    if args.out:
        body["out"] = str(args.out.resolve())
    if args.max_price is not None:
        body["max_price"] = args.max_price
    if args.shards is not None:
        body["shards"] = args.shards
    return body


def _follow_job(args: argparse.Namespace, client: ControlClient, job_id: str) -> int:
    """Show the job's progress until it ends, then its summary."""
    import time

    tty = sys.stderr.isatty()
    show_progress = (not args.json and tty) or args.progress
    last_key = None
    while True:
        job = client.call("GET", f"/v1/jobs?id={job_id}")
        if job["state"] != "running":
            break
        if show_progress:
            # On a terminal one line redrawn in place; otherwise a plain line at each change.
            if tty:
                line = format_job_line(job)
                print(f"\r{line}\033[K", end="", file=sys.stderr, flush=True)
            elif _job_key(job) != last_key:
                print(format_job_line(job), file=sys.stderr, flush=True)
            last_key = _job_key(job)
        time.sleep(0.1)
    if show_progress:  # the final state, in place of the last progress line
        line = format_job_line(job)
        print(f"\r{line}\033[K" if tty else line, file=sys.stderr)
    if job["state"] in ("failed", "cancelled"):
        if args.json:
            print(json.dumps(job))
        # Operands that make the answers impossible to judge are an input problem (exit 2),
        # as the README's exit codes say (a walkthrough: 1e30 operands exited 1).
        code = EXIT_USAGE if job.get("unverifiable") else EXIT_FAILURE
        raise CliError(f"{job_id} {job['state']}: {job['error']}", code)
    result = job["result"]  # its receipts and cost count a redundant job's second workers
    if args.json:
        # The node's short ID (what `jobs --cancel` takes) and accepted shards per worker, as
        # `jobs --json` names them; "workers" stays the list of workers that contributed.
        extra = {"id": job_id, "shards_per_worker": job.get("workers", {})}
        print(json.dumps({**result, **extra}, indent=2, sort_keys=True))
        return EXIT_OK
    shape = result["output_shape"]
    print(f"job        {job_id} ({result['job_id'][:16]}…)  {result['kernel']}, output {shape}")
    print(f"shards     {result['shards']} on {len(result['workers'])} worker(s)")
    for worker in result["workers"]:
        print(f"worker     {worker}")
    out = result.get("workers_out") or {}
    if out:
        count = result.get("workers_out_count", len(out))
        print(_not_used_header(count, out, result.get("workers_out_demoted")))
        for peer, reason in out.items():
            print(f"           …{peer[-12:]}: {reason}")
    other = result.get("other_ledger_rules") or {}
    if other.get("workers"):
        rules = ", ".join(str(n) for n in other.get("rules", []))
        print(
            f"not used   {other['workers']} worker(s) of other ledger rules ({rules}): another "
            "MTOR version, whose receipts would enter another ledger"
        )
    print(f"time       {result['seconds']:.3f} s   ({format_rate(result['tflops'])} achieved)")
    print(
        f"verified   {result['verification']}: {result['checks_passed']} passed, "
        f"{result['rejected']} rejected, {result['reissued']} re-issued, "
        f"{result['hedged']} hedged, {result['fault_proofs']} fault proof(s)"
    )
    shared = result.get("shared_memory") or {}
    if shared.get("operands"):
        print(
            f"operands   {shared['operands']} to workers on this machine through shared "
            f"memory ({shared['bytes'] / (1 << 20):.0f} MiB); any others over the network"
        )
    if shared.get("outputs"):
        print(
            f"outputs    {shared['outputs']} from workers on this machine through shared "
            f"memory ({shared['output_bytes'] / (1 << 20):.0f} MiB)"
        )
    extra = result["receipts"] - result["shards"]
    copies = f" ({extra} for redundant copies)" if extra > 0 else ""
    cost = format_credits(result["cost"])
    print(f"cost       {cost} credits   receipts {result['receipts']}{copies}")
    non_finite = result.get("non_finite") or 0
    if non_finite:
        print(
            f"output     holds {non_finite} inf or NaN value(s): float32 overflowed, or the "
            "operands hold NaN or inf"
        )
    if args.out:
        print(f"output     {args.out}")
    else:
        # Said, so that a long job's product is not thrown away unnoticed (a new user's
        # walkthrough: the job ran, was paid for, and nothing said where its output went).
        print("output     not kept (give --out FILE.npy to save it)")
    return EXIT_OK


# -- jobs -------------------------------------------------------------------------------------

#: Characters in a job's progress bar.
JOB_BAR_WIDTH = 24
#: ``jobs --watch``: seconds between redraws (default), and how often a plain-line watch
#: repeats a running job's line that did not change (a heartbeat for a log reader).
WATCH_INTERVAL = 1.0
WATCH_HEARTBEAT = 10.0


def format_job_line(job: dict[str, Any]) -> str:
    """One line for a job of ``GET /v1/jobs``: its ID, a progress bar, shards done/total,
    workers, verification outcomes, re-issues, state and elapsed time. What ``jobs`` lists and
    ``submit`` shows while its job runs."""
    total, done, state = job.get("total") or 0, job.get("done") or 0, job["state"]
    if total:
        filled = min(JOB_BAR_WIDTH, round(JOB_BAR_WIDTH * done / total))
        bar = "#" * filled + "." * (JOB_BAR_WIDTH - filled)
        shards = f"{done}/{total} shards"
    else:
        bar = "." * JOB_BAR_WIDTH
        shards = "starting (choosing workers)" if state == "running" else "no shard done"
    workers = job.get("workers")
    if workers is None and job.get("result"):
        workers = job["result"].get("workers")
    return (
        f"{job['id']}: [{bar}] {shards}, {len(workers or ())} worker(s), "
        # Checks, not shards: a hedged or redundant copy is checked too (a new user read
        # "64/64 shards, 68 verified" as more shards verified than there were).
        f"{job.get('verified', 0)} check(s) passed, {job.get('rejected', 0)} rejected, "
        f"{job.get('reissued', 0)} re-issued, {state}, {job.get('elapsed_s', 0.0):.1f} s"
    )


def _job_key(job: dict[str, Any]) -> tuple[Any, ...]:
    """What a plain-line display prints again when it changes (not the elapsed time)."""
    names = ("state", "done", "total", "verified", "rejected", "reissued")
    return (*(job.get(name) for name in names), len(job.get("workers") or ()))


def _job_detail(job: dict[str, Any]) -> str:
    """The second line of a job in the ``jobs`` list: what it runs and how it ended."""
    what = job.get("kernel", "?")
    spec = KERNEL_INPUTS.get(what)
    if spec and job.get("shape"):
        # ``shape`` holds the sizes in the kernel's order (``sizes``, a JSON object, may not).
        what += "".join(f" {n}={v}" for n, v in zip(spec.sizes, job["shape"], strict=False))
    if job.get("dtype"):
        what += f" {job['dtype']}"
    verify = (
        (job.get("result") or {}).get("verification")
        or job.get("verification")
        or job.get("verify")
    )
    if verify:
        what += f", verify {verify}"
    result = job.get("result")
    if result:
        what += (
            f"; {result.get('seconds', 0):.2f} s, {format_rate(result.get('tflops', 0.0))}, "
            f"cost {format_credits(result.get('cost', 0.0))} credits"
        )
    if job.get("error"):
        what += f"; {job['error']}{_paid_before_the_end(job)}"
    if job.get("job_id"):  # how receipts name it (their JOB column)
        what = f"{job['job_id'][:16]}…  {what}"
    elif job.get("state") == "running":
        # The scheduler names a job (the hash receipts carry) once its workers are chosen.
        what = f"(no job ID yet)   {what}"
    return f"    {what}"


def _jobs_text(answer: dict[str, Any], data_dir: Path | None = None) -> list[str]:
    jobs = answer.get("jobs", [])
    # Submissions still reading their operands hold a place among the running jobs (the
    # node's cap) without being jobs yet: said, so that a 429 is not a mystery.
    reading = answer.get("reading", 0)
    still = f"; {reading} submission(s) still reading their operands" if reading else ""
    if not jobs:
        # "Since it started": the list is the running node's; receipts and the ledger keep
        # the jobs of its earlier runs.
        # The same --data-dir (a walkthrough: the hint without it pointed at ~/.mtor).
        where = f" --data-dir {shlex.quote(str(data_dir))}" if data_dir is not None else ""
        return [
            f"no jobs since this node started (run one: {invoked_as()} submit matmul{where}){still}"
        ]
    lines = []
    for job in jobs:
        lines += [format_job_line(job), _job_detail(job)]
    running = answer.get("running", sum(1 for j in jobs if j["state"] == "running"))
    remembered = answer.get("remembered", len(jobs))
    lines.append(f"{len(jobs)} of {remembered} remembered job(s) shown, {running} running{still}")
    return lines


def _cancel_job(args: argparse.Namespace, client: ControlClient, job_id: str) -> int:
    """``jobs --cancel ID``: cancel a running job (its submit may be gone: a script's
    background job, another terminal); the job once it stopped, or why it could not be."""
    try:
        job = client.call("POST", "/v1/jobs/cancel", {"id": job_id})
    except ControlError as exc:
        # 404: no such job (or a node from before cancelling); 409: it is not running.
        raise CliError(f"{job_id} was not cancelled: {exc.reason}", EXIT_FAILURE) from None
    if args.json:
        print(json.dumps(job, indent=2, sort_keys=True))
    else:
        print(format_job_line(job))
    state = job.get("state")
    if state == "running":
        print(f"mtor-peer: error: {job_id} did not stop within the node's wait", file=sys.stderr)
        return EXIT_FAILURE
    if state != "cancelled":
        print(
            f"mtor-peer: error: {job_id} ended ({state}) before it could be cancelled",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return EXIT_OK


def cmd_jobs(args: argparse.Namespace) -> int:
    """List this node's jobs, running and recent, with a progress bar each."""
    import time

    if args.cancel is not None and not re.fullmatch(r"job-[0-9]{1,12}", args.cancel):
        # Checked here: an ID of another form names no job, and would only be echoed back.
        raise CliError(f"--cancel takes a job ID as listed (job-N), not {args.cancel[:40]!r}", 2)
    client = _client(args)
    if args.cancel is not None:
        return _cancel_job(args, client, args.cancel)
    path = f"/v1/jobs?limit={args.limit}" + ("&shards=1" if args.json else "")
    if not args.watch:
        answer = client.call("GET", path)
        if args.json:
            print(json.dumps(answer, indent=2, sort_keys=True))
        else:
            print("\n".join(_jobs_text(answer, args.data_dir)))
        return EXIT_OK
    tty = sys.stdout.isatty() and not args.json
    printed: dict[str, tuple[tuple[Any, ...], float]] = {}
    last_json = None
    try:
        while True:
            answer = client.call("GET", path)
            now = time.monotonic()
            if tty:  # redraw the whole list in place
                lines = _jobs_text(answer, args.data_dir)
                lines.append(f"every {args.interval:g} s; Ctrl-C to stop")
                print("\033[H\033[J" + "\n".join(lines), flush=True)
            elif args.json:  # one JSON object a line, when something changed
                key = [_job_key(j) for j in answer.get("jobs", [])]
                if key != last_json:
                    print(json.dumps(answer, sort_keys=True), flush=True)
                    last_json = key
            else:  # plain lines: a job's line when it changes (running ones now and then)
                for job in reversed(answer.get("jobs", [])):
                    key = _job_key(job)
                    seen = printed.get(job["id"])
                    stale = job["state"] == "running" and (
                        seen is None or now - seen[1] >= WATCH_HEARTBEAT
                    )
                    if seen is None or seen[0] != key or stale:
                        print(format_job_line(job), flush=True)
                        printed[job["id"]] = (key, now)
            time.sleep(args.interval)
    except KeyboardInterrupt:
        if tty:
            print()
        return EXIT_INTERRUPTED


def cmd_receipts(args: argparse.Namespace) -> int:
    """List the contribution receipts this node holds, newest first: as a worker (paid) or
    as a requester (paying). Columns: the job (its ID's first 16 hex digits, which
    ``submit`` shows beside job-N and ``jobs`` at the start of each job's second line) and
    shard, the kernel, this node's role, the other peer, the work done (GFLOP), what it cost
    in credits, who signed it (``both``: the worker and the requester, so the ledger holds
    it; ``worker``: the requester has not countersigned it yet) and its ledger ENTRY (the
    ID's first 12 hex digits, which ``ledger prove ENTRY`` takes). With the node stopped it
    reads <data-dir>/receipts.sqlite."""
    try:
        client = _client(args)
        answer = client.call("GET", f"/v1/receipts?limit={args.limit}")
        answer.setdefault("source", "running node")
        me = client.call("GET", "/v1/status")["peer_id"]
    except NodeNotRunning as exc:
        answer = _offline_receipts(args)
        if answer is None:
            raise
        me = _stored_peer_id(_config_from(args).data_dir)
        print(f"mtor-peer: {exc}; showing the receipts as stored", file=sys.stderr)
    if answer.get("skipped"):
        print(
            f"mtor-peer: {answer['skipped']} stored row(s) hold no receipt (a damaged or "
            "hand-edited receipts.sqlite) and are left out",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
        return EXIT_OK
    print(
        f"{'JOB':<18} {'SHARD':>5} {'KERNEL':<9} {'ROLE':<9} {'PEER':<14} "
        f"{'GFLOP':>9} {'COST':>10} {'SIGNED':<6} {'ENTRY':<12}"
    )
    for r in answer["receipts"]:
        if r["worker"] == me:
            role, other = "worker", r["requester"]
        elif r["requester"] == me:
            role, other = "requester", r["worker"]
        else:  # no identity to tell by (a data directory without its key)
            role, other = "?", r["worker"]
        entry = (r.get("entry") or "-")[:12]
        gflop = r["flops"] / 1e9
        work = f"{gflop:.3f}" if gflop >= 0.01 or gflop == 0 else f"{gflop:.2g}"  # not 0.000
        print(
            f"{r['job_id'][:16] + '…':<18} {r['shard']:>5} {r['kernel']:<9} {role:<9} "
            f"{'…' + other[-12:]:<14} {work:>9} "
            f"{format_credits(r['cost']):>10} {'both' if r['complete'] else 'worker':<6} "
            f"{entry:<12}"
        )
    # Rows that hold no receipt are not counted as receipts (the note above names them).
    shown, held = len(answer["receipts"]), answer["count"] - answer.get("skipped", 0)
    if shown < held:
        count = f"{shown} of {held} receipt(s), newest first (--limit)"
    else:
        count = f"{held} receipt(s)"
    print(f"{count}; COST in credits; `ledger prove ENTRY` proves one is in the ledger")
    return EXIT_OK


def _stored_peer_id(data_dir: Path) -> str | None:
    """The peer ID of the identity kept in ``data_dir``, read without creating one or
    touching any file's mode; None if there is none (a read-only command must not make one)."""
    from mtor_p2p.identity import KEY_FILE_NAME, SEED_SIZE, Identity

    try:
        seed = (data_dir / KEY_FILE_NAME).read_bytes()
    except OSError:
        return None
    return Identity(seed).peer_id if len(seed) == SEED_SIZE else None


def _offline_receipts(args: argparse.Namespace) -> dict[str, Any] | None:
    """The stopped node's receipts, read-only from its data directory, in the control API's
    shape; None if there is no receipt store there."""
    import sqlite3

    from mtor_p2p.compute.receipt_store import RECEIPTS_FILE_NAME, ReceiptStore

    path = _config_from(args).data_dir / RECEIPTS_FILE_NAME
    if not path.is_file():
        return None
    try:
        answer = ReceiptStore.read_only_report(path, limit=args.limit)
    except (sqlite3.Error, RecordError) as exc:
        raise CliError(f"cannot read the receipts in {path}: {exc}") from None
    return answer | {"source": str(path)}


#: The page ``dashboard --open`` writes in the data directory (0600) and opens.
DASHBOARD_OPENER = "dashboard-open.html"


def cmd_dashboard(args: argparse.Namespace) -> int:
    """Print a link that opens the running node's web dashboard (and with --open, open it).

    The link carries a one-use ticket in its fragment (after '#'), which browsers never
    send to a server, so it appears in no log; the page trades it for a read-only session.
    Each link works once, within two minutes: run this again for another browser or tab."""
    client = _client(args)
    try:
        answer = client.call("POST", "/v1/dashboard/ticket")
    except ControlError as exc:
        if str(exc).startswith("404"):  # a node of a version before the dashboard
            raise CliError(
                f"the node at {client.url} serves no dashboard: it runs an older version "
                "of mtor-peer than this command; restart it",
                EXIT_FAILURE,
            ) from None
        raise
    url = f"{client.url}/dashboard#ticket={answer['ticket']}"
    if args.json:
        print(json.dumps({"url": url, "expires_in": answer["expires_in"]}, indent=2))
    else:
        print(url)
        print(
            f"(works once, within {answer['expires_in']:.0f} s; "
            "the page updates live while it is open)",
            file=sys.stderr,
        )
    if args.open:
        import webbrowser

        # Not the link itself: a browser's arguments are in /proc/PID/cmdline, which other
        # local users can read. A 0600 page in the data directory redirects to it instead.
        data_dir = _config_from(args).data_dir
        opener = data_dir / DASHBOARD_OPENER
        tmp = data_dir / f".{DASHBOARD_OPENER}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(
                '<!doctype html><meta charset="utf-8"><meta name="referrer" content="no-referrer">'
                f'<meta http-equiv="refresh" content="0;url={html.escape(url, quote=True)}">'
                "<title>MTOR dashboard</title>"
            )
        os.replace(tmp, opener)
        if not webbrowser.open(opener.resolve().as_uri()):
            raise CliError(
                "no browser found to open it: open the link above yourself", EXIT_FAILURE
            )
    return EXIT_OK


STOP_TIMEOUT = 30.0


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (an exited one its parent has not reaped does not,
    whoever's it is: /proc says so to any user)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        pass  # no /proc: ask the kernel
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive, and not ours to signal
        return True
    return True


#: After a node has let go of its data directory (its stop complete), how long ``stop`` waits
#: for its process to exit: the interpreter's own shutdown, which took over 1.5 s under CI's
#: load. A process still there after it is said, not an error.
EXIT_GRACE_S = 10.0


def _node_process(pid: int) -> int | None:
    """A pidfd for the node's process ``pid`` (from the lock it holds), or None where ``stop``
    should not wait on it: PID 1 (in a container the node is init, whose exit takes every
    process there, this command too), a process whose command line does not name MTOR (the
    lock of a node in another PID namespace gives a PID that means another process here), or
    a system without pidfds. A pidfd, not the PID: it cannot come to name another process
    once the node's is gone."""
    if pid <= 1 or not hasattr(os, "pidfd_open"):
        return None
    try:
        handle = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        if b"mtor" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return handle
    except OSError:
        pass
    os.close(handle)
    return None


def _exits_within(handle: int, seconds: float) -> bool:
    """Whether the process behind pidfd ``handle`` exits within ``seconds`` (a zombie has)."""
    import select

    poller = select.poll()
    poller.register(handle, select.POLLIN)
    return bool(poller.poll(max(0, int(seconds * 1000))))


def cmd_stop(args: argparse.Namespace) -> int:
    """Stop the node running on the data directory: through its control API
    (``POST /v1/shutdown``), else SIGTERM to the PID in its lock file; wait until its stop is
    complete (the data directory unlocked), then briefly for its process to exit.
    Either way the node withdraws its capacity record and closes cleanly."""
    import time

    data_dir = _config_from(args).data_dir
    owner = lock_owner(data_dir)
    pid = owner or None
    try:
        pid = pid or json.loads((data_dir / INFO_FILE_NAME).read_text()).get("pid")
    except (OSError, ValueError, AttributeError):
        pass
    # Taken while the lock says the PID is the node's.
    process = _node_process(owner) if owner else None
    try:
        try:
            ControlClient.for_data_dir(data_dir, timeout=5).call("POST", "/v1/shutdown")
            how = "asked it through its control API"
        except (NodeNotRunning, ControlError):
            if not owner:  # no lock held: whatever control.json says is stale
                raise NodeNotRunning(f"no running node found in {data_dir}") from None
            try:
                os.kill(owner, signal.SIGTERM)
            except ProcessLookupError:
                raise NodeNotRunning(f"no running node found in {data_dir}") from None
            except PermissionError:
                raise CliError(
                    f"the node on {data_dir} (pid {owner}) belongs to another user", EXIT_FAILURE
                ) from None
            how = f"sent SIGTERM to pid {owner}"
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            # The lock goes when the node's stop is complete (record withdrawn, ledger and
            # receipts on disk); a node without one (an older version): its PID.
            if owner is not None:
                done = lock_owner(data_dir) is None
            else:
                done = not (pid and _pid_alive(pid))
            if done:
                break
            time.sleep(0.1)
        else:
            raise CliError(
                f"the node on {data_dir}{f' (pid {pid})' if pid else ''} is still running "
                f"{args.timeout:.0f} s after being asked to stop; try again, or kill it",
                EXIT_FAILURE,
            )
        # Its interpreter exits after that: a script that goes on at once should find no
        # process of it left (the devnet's test found one 1.5 s later under CI's load).
        grace = min(EXIT_GRACE_S, max(0.0, deadline - time.monotonic()))
        lingering = process is not None and not _exits_within(process, grace)
        print(
            f"stopped the node on {data_dir} ({how})"
            + (f"; its process (pid {owner}) is still exiting" if lingering else "")
        )
        return EXIT_OK
    finally:
        if process is not None:
            os.close(process)


def cmd_devnet(args: argparse.Namespace) -> int:
    """Run a local devnet of N peer processes on loopback."""
    from mtor_p2p.devnet import run_devnet

    if args.data_dir is not None and args.data_dir.exists() and not args.data_dir.is_dir():
        # As every other command says it (a walkthrough: "devnet failed: [Errno 17]", exit 1).
        raise DataDirError(
            f"--data-dir {args.data_dir} is a file, not a directory: give a directory for the "
            "devnet's peers (it is created if missing)"
        )
    return run_devnet(
        peers=args.peers,
        base_dir=args.data_dir,
        json_output=args.json,
        timeout=args.timeout,
        record_ttl=args.record_ttl,
        announce_interval=args.announce_interval,
        log_level=args.log_level or "warning",
        log_format=args.log_format,
        shared_memory=None if args.shared_memory is None else args.shared_memory == "on",
    )


# -- parser -----------------------------------------------------------------------------------


def _positive_int(limit: int) -> Any:
    """An argparse type: an integer in [1, limit] (argparse names the flag and exits 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not 1 <= value <= limit:
            raise argparse.ArgumentTypeError(f"must be between 1 and {limit}, got {value}")
        return value

    return parse


def _non_negative_float(text: str) -> float:
    """An argparse type: a finite number, 0 or more."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number, 0 or more, got {text}")
    return value


def _port(text: str) -> int:
    """An argparse type: a TCP port, 0 (any free port) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0-65535 (0: any free port), got {value}")
    return value


def _positive_float(text: str) -> float:
    """An argparse type: a finite number above 0."""
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def _fraction(text: str) -> float:
    """An argparse type: a number from 0 to 1."""
    value = _non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _epilog() -> str:
    import textwrap

    codes = "\n".join(f"  {code:>3}  {meaning}" for code, meaning in EXIT_CODES)
    env = textwrap.fill(ENVIRONMENT_HELP, width=88)
    return (
        f"Exit codes:\n{codes}\n\n{env}\n\n"
        f"Start with: {invoked_as()} devnet --peers 4 (a local network, no GPU needed)."
    )


#: ``submit KERNEL``: (help line, what it computes, its result, the check ``auto`` picks).
SUBMIT_KERNELS = {
    "matmul": (
        "C = A @ B",
        "Run C = A @ B across the network: random inputs of the given sizes, or --a/--b .npy "
        "files. Shards are row blocks of A; every worker gets B whole.",
        "C",
        "Freivalds' for matmul",
    ),
    "mlp": (
        "y = gelu(x @ W1 + b1) @ W2 + b2",
        "Run a two-layer perceptron y = gelu(x @ W1 + b1) @ W2 + b2 (tanh GELU) across the "
        "network: random inputs of the given sizes (weights scaled by 1/sqrt(fan-in)), or "
        "--x/--w1/--b1/--w2/--b2 .npy files. Shards are row blocks of x; every worker gets the "
        "weights whole.",
        "y (batch, d_out)",
        "sample for mlp",
    ),
    "attention": (
        "softmax(q k^T / sqrt(head_dim)) v",
        "Run non-causal scaled dot-product attention softmax(q k^T / sqrt(head_dim)) v per "
        "batch entry and head across the network: random inputs of the given sizes, or "
        "--q/--k/--v .npy files. Shards are slices of the batch.",
        "the output (batch, heads, seq_q, head_dim_v)",
        "sample for attention",
    ),
}
#: What each size of ``submit KERNEL`` is, for its --help.
SUBMIT_SIZE_HELP = {
    "matmul": {"m": "rows of A", "n": "columns of B", "k": "columns of A / rows of B"},
    "mlp": {
        "batch": "rows of x",
        "d_in": "features in: columns of x, rows of w1",
        "d_hidden": "hidden units: columns of w1, rows of w2, entries of b1",
        "d_out": "features out: columns of w2, entries of b2",
    },
    "attention": {
        "batch": "batch entries, which shards cut",
        "heads": "heads per batch entry",
        "seq_q": "query positions",
        "seq_k": "key and value positions",
        "head_dim": "width of q and k per head",
        "head_dim_v": "width of v per head",
    },
}


def _add_submit_parser(kernels: Any, spec: KernelInputs) -> None:
    """``submit KERNEL`` and its flags: the kernel's sizes (random inputs) or operand files,
    and what every kernel takes (verification, price, shards, output, progress, JSON)."""
    short, description, result, auto = SUBMIT_KERNELS[spec.kernel]
    operand_flags = "/".join(f"--{name}" for name in spec.operands)
    p = kernels.add_parser(
        spec.kernel,
        help=short,
        description=(
            f"{description} Shows progress (as mtor-peer jobs does), then the shards, workers, "
            "time, achieved TFLOP/s, verification outcome, cost and receipt count. Exit 2 for "
            "bad input (a flag, a file, shapes that do not fit together), 1 if the job fails "
            "or the node refuses it (a node runs at most 16 jobs at once), 3 if no node runs, "
            "130 on Ctrl-C (the job is cancelled on the node)."
        ),
    )
    _add_data_dir(p)
    for size in spec.sizes:
        if size in spec.same_as:
            default = f"default: --{spec.same_as[size].replace('_', '-')}"
        else:
            default = f"default {spec.defaults[size]}"
        p.add_argument(
            f"--{size.replace('_', '-')}",
            dest=f"size_{size}",
            metavar=size.upper(),
            type=_positive_int(1 << 20),
            help=f"{SUBMIT_SIZE_HELP[spec.kernel][size]} ({default}; not with {operand_flags})",
        )
    p.add_argument(
        "--dtype",
        choices=["float32", "float16"],
        default="float32",
        help="element type of the random inputs (default float32); float16 files stay float16, "
        "other float files are sent as float32; outputs are float32 either way (float16 "
        "products are accumulated in float32)",
    )
    p.add_argument("--seed", type=int, help="seed for the random inputs")
    for name, axes in spec.operands.items():
        p.add_argument(
            f"--{name}",
            dest=f"file_{name}",
            metavar="FILE",
            type=Path,
            help=f"{name} as a .npy file of shape ({', '.join(axes)}{',' * (len(axes) == 1)})",
        )
    checks = ["auto", "sample", "redundant"]
    if spec.kernel == "matmul":
        checks.insert(1, "freivalds")
    p.add_argument(
        "--verify",
        choices=checks,
        default="auto",
        help=f"how every shard's result is checked: auto (default) picks the kernel's own "
        f"check, {auto};"
        + (" freivalds (a random-vector product, O(n^2));" if "freivalds" in checks else "")
        + " sample (recompute random rows); redundant (two workers must agree)",
    )
    p.add_argument(
        "--max-price",
        type=_non_negative_float,
        help="only workers asking at most this (credits per TFLOP; 0 or more)",
    )
    p.add_argument(
        "--shards",
        type=_positive_int(4096),
        help="number of shards (default: sized from the workers' capacity, and at least two "
        "per worker for a job whose shards would keep 1,024 rows and 16 GFLOP each)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help=f"write {result} to this .npy file (checked before the job runs)",
    )
    p.add_argument(
        "--progress", action="store_true", help="show progress even when not on a terminal"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_submit)


def _described(command: Any) -> str:
    """A command's docstring as its ``--help`` text: reStructuredText's literal marks become
    plain quotes (a terminal shows them as typed)."""
    return re.sub(r"``(.+?)``", r'"\1"', " ".join((command.__doc__ or "").split()))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``mtor-peer``."""
    parser = argparse.ArgumentParser(
        prog="mtor-peer",
        description=(
            "Run a peer of the MTOR compute network: it joins the libp2p overlay, finds peers "
            "through the Kademlia DHT and gossips its signed GPU capacity."
        ),
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mtor-peer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("id", help="print this node's peer ID", description=_described(cmd_id))
    _add_data_dir(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_id)

    p = sub.add_parser(
        "run",
        help="run a node until Ctrl-C",
        description=(
            "Run a node until SIGINT/SIGTERM (or mtor-peer stop); flags override the "
            "environment, which overrides the config file. The data directory is locked while "
            "the node runs: a second node on it exits 7. A listen address this host does not "
            "have exits 2, a port in use exits 1."
        ),
        epilog=ENVIRONMENT_HELP,
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
    p.add_argument(
        "--gpu",
        choices=["auto", "none"],
        help="auto: compute on the GPU CuPy can use (else NumPy); none: NumPy, advertise the CPU",
    )
    p.add_argument(
        "--price",
        type=_non_negative_float,
        help="starting asking price, credits per TFLOP delivered",
    )
    p.add_argument(
        "--fixed-price", action="store_true", help="keep the price fixed (no utilisation rule)"
    )
    p.add_argument(
        "--genesis",
        type=_path,
        help="the network's genesis file (default: the data dir's copy, else the shipped one); "
        "a data directory keeps the network it began with: another network's genesis needs "
        "another data directory",
    )
    p.add_argument("--ngrok", action="store_true", help="open an ngrok TCP tunnel and announce it")
    p.add_argument(
        "--bootstrap-node",
        action="store_true",
        help="serve as a bootstrap node (higher connection limits)",
    )
    p.add_argument(
        "--max-connections",
        type=_positive_int(1_000_000),
        help="connection limit, at least 1 (default 300)",
    )
    p.add_argument(
        "--lanes",
        choices=["auto", "eager", "off"],
        help="carry requests over fast sealed TCP lanes (auto: opened on a peer's first "
        "request; eager: the first request waits for it; off: libp2p streams only)",
    )
    p.add_argument("--lane-port", type=_port, help="TCP port for lanes (0: any free port)")
    p.add_argument(
        "--shared-memory",
        choices=["on", "off"],
        help="hand operands and outputs of 8 MiB or more between this node and workers on "
        "this machine (same user) through sealed shared memory instead of the lane, both ways "
        "(default on)",
    )
    p.add_argument(
        "--nat",
        choices=["on", "off"],
        help="NAT traversal: reachability checks, circuit relays, hole punching (default on)",
    )
    p.add_argument(
        "--relay",
        choices=["auto", "on", "off"],
        help="serve as a circuit relay for private peers (auto: once found publicly "
        "reachable, or with --bootstrap-node)",
    )
    p.add_argument(
        "--relays-wanted",
        type=int,
        help="relays to reserve on while not publicly reachable (default 2; 0: none)",
    )
    p.add_argument(
        "--relay-max-reservations",
        type=int,
        help="as a relay: peers that may hold a reservation at once (default 128)",
    )
    p.add_argument(
        "--punch-retry",
        type=float,
        metavar="SECONDS",
        help="a peer pair whose hole punches all failed tries again after this long, "
        "doubling per failed round up to an hour (default 300; 10-3600; under 120 a retry may "
        "fail on the routers' mappings of the last round). Also the window in which a peer "
        "may start 3 punch sessions with us: a peer with a shorter setting may be refused "
        "some of its tries. `status` says when the next round is due",
    )
    p.add_argument(
        "--announce",
        action="append",
        metavar="MULTIADDR",
        help="also advertise this address, e.g. a router's port forward: /ip4/IP/tcp/PORT "
        "(repeatable)",
    )
    p.add_argument("--api-port", type=_port, help="control API port on 127.0.0.1 (0: any)")
    p.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="also serve Prometheus /metrics here without the control token (opt-in: they "
        "reveal the node's business; default: only at the control API, with the token)",
    )
    p.add_argument("--record-ttl", type=_positive_float, help="capacity record lifetime in seconds")
    p.add_argument(
        "--announce-interval", type=_positive_float, help="seconds between capacity renewals"
    )
    p.add_argument(
        "--fault-rate",
        type=_fraction,
        help="testing only: return wrong results for this fraction of shards",
    )
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="log lines as text (default) or JSON objects, one a line; on stderr and in "
        f"<data-dir>/{LOG_DIR_NAME}/{LOG_FILE_NAME} (rotated at log_max_bytes, 10 MiB; "
        "log_backups, 5, kept)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON line when ready")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "stop",
        help="stop the node running on the data directory",
        description=_described(cmd_stop),
    )
    _add_data_dir(p)
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=STOP_TIMEOUT,
        help=f"seconds to wait for it to stop (default {STOP_TIMEOUT:.0f})",
    )
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser(
        "status", help="show the running node's status", description=_described(cmd_status)
    )
    _add_data_dir(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("peers", help="show the capacity view", description=_described(cmd_peers))
    _add_data_dir(p)
    p.add_argument(
        "--min-mem-gib",
        type=_non_negative_float,
        help="only peers with at least this much free memory",
    )
    p.add_argument("--min-tflops", type=_non_negative_float, help="only peers at least this fast")
    p.add_argument(
        "--max-price", type=_non_negative_float, help="only peers at most this expensive"
    )
    p.add_argument("--region", help="only peers in this region")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_peers)

    p = sub.add_parser(
        "reputation",
        help="show measured speed, reliability and demotions of workers",
        description=REPUTATION_HELP,
    )
    _add_data_dir(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_reputation)

    p = sub.add_parser(
        "submit",
        help="run a job (matmul, mlp, attention) on the network through the local node",
        description=(
            "Run a job across the network through the running node: random inputs of the "
            "given sizes, or .npy files. Shows progress, then the shards, workers, time, "
            "achieved TFLOP/s, verification outcome, cost and receipt count. "
            "The job is listed by 'mtor-peer jobs' (ID job-N, never reused on a data "
            "directory) and can be cancelled from any terminal with 'mtor-peer jobs --cancel "
            "job-N' (this command then exits 1), or here with Ctrl-C. "
            "mtor-peer submit KERNEL --help lists a kernel's flags."
        ),
    )
    kernels = p.add_subparsers(dest="kernel", required=True, metavar="KERNEL")
    for spec in KERNEL_INPUTS.values():
        _add_submit_parser(kernels, spec)

    p = sub.add_parser(
        "jobs",
        help="list this node's jobs with their progress",
        description=(
            "List the jobs submitted through this node (running ones and the last finished "
            "ones, newest first), each with a progress bar: shards verified out of the total, "
            "workers, verification outcomes (verified, rejected), re-issued shards, state "
            "(running, done, failed, cancelled) and elapsed time. Works from any terminal "
            "while the node runs; --watch redraws until Ctrl-C (plain lines, one per change, "
            "when the output is not a terminal). --cancel ID cancels a running job (shards "
            "already accepted stay paid): exit 0 once it stopped, 1 if it is unknown, not "
            "running or did not stop, 2 for an ID not of the form job-N, 3 if no node runs. "
            "Job IDs are never reused on one data directory, restarts included. Each job's "
            "second line starts with its ID's first 16 hex digits, as receipts name the job, "
            "once its workers are chosen ('(no job ID yet)' before; --watch on a pipe prints "
            "the first lines only)."
        ),
    )
    _add_data_dir(p)
    p.add_argument(
        "--watch",
        action="store_true",
        help="keep showing progress until Ctrl-C: on a terminal the list redrawn in place "
        "(newest first); piped, a line each time a job changes, as a log (oldest first); "
        "with --json, the whole list as one JSON object a line when anything changed",
    )
    p.add_argument(
        "--cancel",
        metavar="ID",
        help="cancel the running job ID (job-N, as listed) and show it once it stopped",
    )
    p.add_argument(
        "--interval",
        type=_positive_float,
        default=WATCH_INTERVAL,
        help=f"--watch: seconds between updates (default {WATCH_INTERVAL:g})",
    )
    p.add_argument(
        "--limit",
        type=_positive_int(100),
        default=20,
        help="the last N jobs (default 20; the node remembers 100)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the control API's answer, with each job's accepted shards "
        "(--watch: one JSON object a line)",
    )
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser(
        "receipts", help="list contribution receipts", description=_described(cmd_receipts)
    )
    _add_data_dir(p)
    p.add_argument(
        "--limit",
        type=_positive_int(10_000),
        default=100,
        help="at most this many, newest first (default 100)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_receipts)

    p = sub.add_parser(
        "dashboard",
        help="print a link to the running node's web dashboard",
        description=_described(cmd_dashboard),
    )
    _add_data_dir(p)
    p.add_argument("--open", action="store_true", help="also open it in the default browser")
    p.add_argument(
        "--json",
        action="store_true",
        help="print JSON: the link (url) and the seconds it stays valid (expires_in)",
    )
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser(
        "balance",
        help="show this peer's credits and stake",
        description=(
            "Show this peer's balance, stake and slashed credits, derived from the verified "
            "receipts, stakes and fault proofs in its ledger; from the running node, or from "
            "the data directory when the node is stopped. Amounts in credits (JSON: "
            "nano-credits, 1 credit = 10^9)."
        ),
    )
    _add_data_dir(p)
    p.add_argument("--all", action="store_true", help="also list every account in the ledger")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_balance)

    p = sub.add_parser(
        "stake",
        help="stake credits behind this peer's work",
        description=(
            "Lock AMOUNT credits of this peer's balance as stake. Staked peers sign epoch "
            "checkpoints; a proven fault slashes part of the stake (see docs/ledger.md). "
            "Stake stays locked: this version has no unstaking."
        ),
    )
    _add_data_dir(p)
    p.add_argument("amount", help="credits to stake, e.g. 10 or 2.5")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_stake)

    p = sub.add_parser(
        "transfer",
        help="send credits to another peer",
        description=(
            "Send AMOUNT credits of this peer's balance to PEER (a peer ID). A transfer can "
            "only spend a positive balance, never the credit limit."
        ),
    )
    _add_data_dir(p)
    p.add_argument("peer", help="the receiving peer's ID")
    p.add_argument("amount", help="credits to send, e.g. 10 or 2.5")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_transfer)

    p = sub.add_parser(
        "ledger",
        help="audit the ledger or prove a receipt's inclusion",
        description=(
            "verify: re-check every stored record's signatures (and fault proofs), recompute "
            "every balance from the records, check that the supply is conserved and that every "
            "checkpoint's aggregate BLS signature verifies; exit 6 on any problem. "
            "prove ENTRY: a Merkle path from a receipt to its epoch's signed checkpoint, "
            "checked here against the checkpoint's root (exit 6 when it does not lead there; "
            "exit 1 for an entry this node's ledger lacks or one not yet in a checkpoint, "
            "saying which; exit 2 for an ENTRY that is not 8-64 hex digits)."
        ),
    )
    _add_data_dir(p)
    p.add_argument("action", choices=["verify", "prove"], metavar="{verify,prove}")
    p.add_argument(
        "entry",
        nargs="?",
        help="prove: the entry's ID (blake3 hex) or a prefix of 8+ digits that only it starts "
        "with (the ENTRY column of `receipts`)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_ledger)

    p = sub.add_parser(
        "devnet",
        help="run N local peers on loopback until Ctrl-C",
        description=(
            "Start N peers as separate processes on loopback, wait until every peer's view "
            "holds every other peer's capacity, print the table, and stop them all on Ctrl-C. "
            "Needs no GPU, no ngrok account and no internet."
        ),
    )
    p.add_argument(
        "--peers", type=_positive_int(200), default=4, help="number of peers, 1-200 (default 4)"
    )
    p.add_argument(
        "--data-dir",
        "--dir",
        dest="data_dir",
        type=_path,
        help="keep the peers' data directories here, as peer-0, peer-1, ... (default: a "
        "temporary directory, removed at the end); --dir is the older name",
    )
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=120.0,
        help="seconds to wait for convergence (default 120)",
    )
    p.add_argument(
        "--record-ttl",
        type=_positive_float,
        default=30.0,
        help="capacity record lifetime (default 30 s)",
    )
    p.add_argument(
        "--announce-interval",
        type=_positive_float,
        default=5.0,
        help="renewal interval (default 5 s)",
    )
    p.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="every peer's log level (default warning)",
    )
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="every peer's log lines as text (default) or JSON objects, one a line: in "
        f"<data-dir>/peer-N/peer.log and <data-dir>/peer-N/{LOG_DIR_NAME}/{LOG_FILE_NAME}",
    )
    p.add_argument(
        "--shared-memory",
        choices=["on", "off"],
        help="every peer's --shared-memory: operands and outputs of 8 MiB or more between "
        "peers through sealed shared memory, as peers on one machine do (default on); off "
        "sends them over the lanes, as between machines",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the peers' API addresses and multiaddrs as JSON once ready",
    )
    p.set_defaults(func=cmd_devnet)
    return parser


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str] | None) -> Any:
    """``parser.parse_args``, except that an argument no command knows is reported with the
    usage of the command it was given to (``mtor-peer peers --bogus`` showed the top-level
    usage, which lists no flag of ``peers``: a new user's review)."""
    args, extras = parser.parse_known_args(argv)
    if extras:
        command = _innermost(parser, args)
        command.error(
            "unrecognized arguments: " + " ".join(extras) + _did_you_mean(command, extras)
        )
    return args


def _did_you_mean(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """``; did you mean --data-dir?`` for the first unknown flag close to one of the
    command's own (a walkthrough: ``--data-dri`` got the usage and nothing more)."""
    import difflib

    known = [flag for action in parser._actions for flag in action.option_strings]
    for extra in extras:
        if extra.startswith("--"):
            close = difflib.get_close_matches(extra.split("=", 1)[0], known, n=1, cutoff=0.75)
            if close:
                return f"; did you mean {close[0]}?"
    return ""


def _innermost(parser: argparse.ArgumentParser, args: Any) -> argparse.ArgumentParser:
    """The (sub)command parser that ``args`` were last parsed by."""
    current = parser
    while True:
        commands = [
            action
            for action in current._actions  # argparse keeps its subcommands nowhere public
            if isinstance(action, argparse._SubParsersAction)
        ]
        chosen = getattr(args, commands[0].dest, None) if commands else None
        if chosen not in (commands[0].choices if commands else {}):
            return current
        current = commands[0].choices[chosen]


def _start_hint(args: argparse.Namespace) -> str:
    """How to start the node a command found not running: a devnet's peer (``peer-N`` beside
    the devnet's genesis) is started by its devnet, any other by ``run``."""
    from mtor_p2p.ledger.genesis import GENESIS_FILE_NAME

    data_dir = getattr(args, "data_dir", None)
    if data_dir is not None:
        peer = Path(data_dir)
        devnet_peer = re.compile(r"peer-[0-9]+")  # the devnet's names, peer-0 to peer-N
        if devnet_peer.fullmatch(peer.name) and (peer.parent / GENESIS_FILE_NAME).exists():
            from mtor_p2p.datadir import lock_owner

            devnet = f"{invoked_as()} devnet --data-dir {shlex.quote(str(peer.parent))}"
            siblings = [
                p for p in peer.parent.glob("peer-*") if p != peer and devnet_peer.fullmatch(p.name)
            ]
            if any(lock_owner(p) is not None for p in siblings):
                # Its devnet still runs (a new user followed the hint below into exit 7).
                return (
                    "a devnet's peer, stopped while its devnet runs on: the devnet starts it "
                    f"again when it starts (stop the devnet with Ctrl-C, then: {devnet})"
                )
            return f"a devnet's peer: start its devnet with: {devnet}"
        # The same directory, or `run` would start a node on the default one.
        return f"start one with: {invoked_as()} run --data-dir {shlex.quote(str(data_dir))}"
    return f"start one with: {invoked_as()} run"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mtor-peer`` console script."""
    args = parse_command_line(build_parser(), argv)
    try:
        return int(args.func(args))
    except DataDirInUse as exc:
        print(f"mtor-peer: error: {exc}", file=sys.stderr)
        return EXIT_IN_USE
    except (ConfigError, IdentityError, LedgerError, RecordError, DataDirError) as exc:
        print(f"mtor-peer: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except NodeNotRunning as exc:
        print(f"mtor-peer: error: {exc} ({_start_hint(args)})", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except ControlError as exc:
        print(f"mtor-peer: error: the node refused: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except CliError as exc:
        print(f"mtor-peer: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `mtor-peer peers | head`: the reader left; nothing to say
        return EXIT_OK
    except OSError as exc:  # a file or directory the command needed
        where = f": {exc.filename}" if exc.filename else ""
        print(f"mtor-peer: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:
        return _unexpected(exc)


if __name__ == "__main__":
    sys.exit(main())
