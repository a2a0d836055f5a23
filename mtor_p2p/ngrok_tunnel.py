"""Expose a node's local TCP port to the internet through an ngrok TCP tunnel (via pyngrok).

A node behind NAT can ask the ngrok agent for a public ``tcp://HOST:PORT`` endpoint that forwards
to its libp2p listen port, and then advertise ``/dns4/HOST/tcp/PORT/p2p/PEER_ID``.

:class:`NgrokTunnelManager` drives pyngrok with a per-node configuration:

* the agent's config file lives in the node's data directory (``config_dir``), so the user's
  global ``~/.config/ngrok/ngrok.yml`` is never read or written; the authtoken is written to that
  file (mode 0600) rather than passed on the command line, where other local users could see it;
* pyngrok waits for the agent's log lines without a deadline of its own (its ``startup_timeout``
  is only checked between lines), so the whole start runs in a worker thread under
  ``start_timeout``; on timeout the agent process is killed;
* every pyngrok failure is turned into :class:`NgrokError`, whose message is one line.

pyngrok keeps one agent per binary path per Python process, so two managers in one process must
use different ``ngrok_path`` values; this module refuses to share one.

This module deliberately imports neither libp2p nor trio; call the blocking methods from a worker
thread (e.g. ``trio.to_thread.run_sync``) when running inside an event loop.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pyngrok import conf, ngrok, process
from pyngrok.exception import (
    PyngrokError,
    PyngrokNgrokError,
    PyngrokNgrokHTTPError,
    PyngrokNgrokInstallError,
)

__all__ = [
    "AUTHTOKEN_ENV",
    "CONFIG_FILENAME",
    "NGROK_PATH_ENV",
    "NgrokError",
    "NgrokTunnelManager",
    "Tunnel",
]

logger = logging.getLogger(__name__)

#: Environment variable read when no ``authtoken`` argument is given.
AUTHTOKEN_ENV = "NGROK_AUTHTOKEN"
#: Environment variable read when no ``ngrok_path`` argument is given.
NGROK_PATH_ENV = "MTOR_NGROK_PATH"
#: Name of the per-node agent config file written into ``config_dir``.
CONFIG_FILENAME = "ngrok.yml"

_NO_AUTHTOKEN = (
    "ngrok needs an authtoken: set NGROK_AUTHTOKEN or [ngrok] authtoken in the config file"
)
_STOP_GRACE_S = 3.0  # how long the agent gets to exit after SIGTERM before it is killed
_ABORT_GRACE_S = 3.0  # how long a timed-out start gets to unwind after its agent is killed
_MAX_MESSAGE = 300

# pyngrok registers agents by binary path, process-wide: track which paths our managers hold.
_paths_in_use: set[str] = set()
_paths_lock = threading.Lock()


class NgrokError(Exception):
    """One-line, human-readable reason the tunnel could not be opened (never a traceback)."""


@dataclass(frozen=True)
class Tunnel:
    """A public TCP endpoint that the ngrok agent forwards to a local port.

    Attributes:
        public_url: The URL ngrok reported, e.g. ``"tcp://0.tcp.ngrok.io:12345"``.
        host: The public host name or IP literal, e.g. ``"0.tcp.ngrok.io"``.
        port: The public TCP port, e.g. ``12345``.
    """

    public_url: str
    host: str
    port: int

    @classmethod
    def from_public_url(cls, public_url: str) -> Tunnel:
        """Parse a ``tcp://HOST:PORT`` URL as reported by the agent.

        Raises:
            NgrokError: The URL is not a ``tcp://`` URL with a host and a port.
        """
        try:
            parts = urlsplit(public_url)
            host = parts.hostname
            port = parts.port
        except ValueError as exc:
            raise NgrokError(
                f"ngrok reported an unusable public URL {public_url!r}: {exc}"
            ) from None
        if parts.scheme != "tcp" or not host or port is None or port == 0:
            raise NgrokError(f"ngrok reported an unusable public URL {public_url!r}")
        return cls(public_url=public_url, host=host, port=port)

    def multiaddr(self, peer_id: str) -> str:
        """Return the libp2p multiaddr under which peers can dial this node through the tunnel.

        ``/ip4/HOST/...`` (or ``/ip6/...``) when the host is an IP literal, else
        ``/dns4/HOST/tcp/PORT/p2p/PEER_ID``.

        Raises:
            ValueError: ``peer_id`` is empty or contains ``/``.
        """
        if not peer_id or "/" in peer_id:
            raise ValueError(f"invalid peer id {peer_id!r}")
        try:
            address = ipaddress.ip_address(self.host)
        except ValueError:
            proto = "dns4"
        else:
            proto = "ip4" if address.version == 4 else "ip6"
        return f"/{proto}/{self.host}/tcp/{self.port}/p2p/{peer_id}"


class NgrokTunnelManager:
    """Starts one ngrok agent for this node, opens TCP tunnels on it, and stops it again.

    Args:
        authtoken: The ngrok authtoken; defaults to the ``NGROK_AUTHTOKEN`` environment variable.
        ngrok_path: The agent binary; defaults to ``MTOR_NGROK_PATH``, then pyngrok's default
            (``PYNGROK_NGROK_PATH`` or ``~/.config/ngrok/ngrok``). pyngrok downloads the agent
            there if it is missing, which fails without network access.
        region: An ngrok region (``us``, ``eu``, ...); ``None`` lets ngrok choose.
        config_dir: The node's data directory, where the agent's config file is written; ``None``
            uses a private temporary directory that :meth:`close` removes.
        start_timeout: Seconds :meth:`open_tcp` may take in all, agent start included.
    """

    def __init__(
        self,
        *,
        authtoken: str | None = None,
        ngrok_path: str | None = None,
        region: str | None = None,
        config_dir: str | None = None,
        start_timeout: float = 20.0,
    ) -> None:
        if not start_timeout > 0:
            raise ValueError(f"start_timeout must be positive, got {start_timeout!r}")
        token = authtoken if authtoken is not None else os.environ.get(AUTHTOKEN_ENV)
        self._authtoken: str | None = token.strip() if token and token.strip() else None
        path = ngrok_path or os.environ.get(NGROK_PATH_ENV) or conf.PyngrokConfig().ngrok_path
        self._ngrok_path: str = os.path.abspath(os.path.expanduser(path))
        self._region: str | None = region or None
        self._config_dir: str | None = config_dir
        self._start_timeout: float = float(start_timeout)

        self._lock = threading.Lock()
        self._claimed = False
        self._temp_dir: str | None = None
        self._config: conf.PyngrokConfig | None = None
        self._agent: process.NgrokProcess | None = None
        self._tunnels: list[Tunnel] = []

    @property
    def ngrok_path(self) -> str:
        """The absolute path of the agent binary this manager runs."""
        return self._ngrok_path

    @property
    def tunnels(self) -> tuple[Tunnel, ...]:
        """The tunnels opened by this manager and not yet closed."""
        return tuple(self._tunnels)

    def open_tcp(self, local_port: int) -> Tunnel:
        """Open a public TCP tunnel to ``localhost:local_port``, starting the agent if needed.

        Blocks for at most about ``start_timeout`` seconds.

        Raises:
            NgrokError: No authtoken, no agent binary, the agent failed or did not start in time,
                or the agent refused the tunnel. The message is a single line.
        """
        if isinstance(local_port, bool) or not isinstance(local_port, int):
            raise NgrokError(f"local port must be an integer, got {local_port!r}")
        if not 0 < local_port < 65536:
            raise NgrokError(f"local port {local_port} is out of range 1-65535")
        if self._authtoken is None:
            raise NgrokError(_NO_AUTHTOKEN)
        with self._lock:
            try:
                return self._open_locked(local_port)
            except BaseException:
                if not self._tunnels:
                    self._shutdown_locked()
                raise

    def close(self) -> None:
        """Close this manager's tunnels and stop its agent process. Idempotent; never raises."""
        try:
            with self._lock:
                self._shutdown_locked()
        except Exception:  # pragma: no cover - defensive: close() must never raise
            logger.debug("ngrok: error while closing", exc_info=True)

    def __enter__(self) -> NgrokTunnelManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------

    def _open_locked(self, local_port: int) -> Tunnel:
        self._claim_path()
        config = self._config if self._config is not None else self._make_config()
        self._config = config
        ngrok_tunnel = self._connect_with_timeout(config, local_port)
        public_url = str(ngrok_tunnel.public_url)
        try:
            tunnel = Tunnel.from_public_url(public_url)
        except NgrokError:
            self._disconnect(public_url)
            raise
        self._tunnels.append(tunnel)
        logger.info("ngrok: %s -> localhost:%d", public_url, local_port)
        return tunnel

    def _claim_path(self) -> None:
        if self._claimed:
            return
        with _paths_lock:
            if self._ngrok_path in _paths_in_use:
                raise NgrokError(
                    f"another NgrokTunnelManager in this process already runs the ngrok agent at "
                    f"{self._ngrok_path}; give each node its own ngrok_path"
                )
            if process.is_process_running(self._ngrok_path):
                raise NgrokError(
                    f"an ngrok agent started elsewhere in this process is already running from "
                    f"{self._ngrok_path}"
                )
            _paths_in_use.add(self._ngrok_path)
            self._claimed = True

    def _make_config(self) -> conf.PyngrokConfig:
        """Write the per-node agent config file and build the matching pyngrok configuration."""
        config_dir = self._config_dir
        if config_dir is None:
            self._temp_dir = tempfile.mkdtemp(prefix="mtor-ngrok-")
            config_dir = self._temp_dir
        config_path = os.path.join(os.path.abspath(os.path.expanduser(config_dir)), CONFIG_FILENAME)
        config = conf.PyngrokConfig(
            ngrok_path=self._ngrok_path,
            config_path=config_path,
            region=self._region,
            startup_timeout=max(1, math.ceil(self._start_timeout)),
            monitor_thread=True,  # keeps draining the agent's stdout so the agent never blocks
        )
        # PyngrokConfig falls back to $NGROK_AUTHTOKEN and would put it on the agent's command
        # line (visible in `ps`); the token goes into the 0600 config file instead.
        config.auth_token = None
        version = str(getattr(config, "config_version", "2"))
        settings: dict[str, Any]
        if version == "3":
            settings = {"version": "3", "agent": {"authtoken": self._authtoken}}
        else:
            settings = {"version": "2", "authtoken": self._authtoken}
        try:
            _write_private_file(config_path, json.dumps(settings, indent=2) + "\n")
        except OSError as exc:
            raise NgrokError(
                f"cannot write the ngrok config file {config_path}: {exc.strerror or exc}"
            ) from None
        return config

    def _connect_with_timeout(self, config: conf.PyngrokConfig, local_port: int) -> Any:
        """Run pyngrok's install/start/connect in a worker thread, bounded by start_timeout."""
        outcome: dict[str, Any] = {}
        done = threading.Event()
        abandoned = threading.Event()

        def work() -> None:
            try:
                outcome["agent"] = ngrok.get_ngrok_process(config)
                outcome["tunnel"] = ngrok.connect(str(local_port), "tcp", pyngrok_config=config)
            except BaseException as exc:
                outcome["error"] = exc
            finally:
                done.set()
                if abandoned.is_set():  # open_tcp already gave up: do not leave an agent behind
                    _kill_agent(config.ngrok_path)

        worker = threading.Thread(target=work, name=f"ngrok-start-{local_port}", daemon=True)
        worker.start()
        if not done.wait(self._start_timeout):
            abandoned.set()
            downloading = not os.path.exists(config.ngrok_path)
            self._abort_start(config.ngrok_path, done)
            if downloading:
                raise NgrokError(
                    f"ngrok agent at {config.ngrok_path} was still being downloaded after "
                    f"{self._start_timeout:g} s"
                )
            raise NgrokError(f"ngrok agent did not start within {self._start_timeout:g} s")
        if outcome.get("agent") is not None:
            self._agent = outcome["agent"]
        error = outcome.get("error")
        if error is not None:
            raise NgrokError(_describe(error, config.ngrok_path)) from None
        return outcome["tunnel"]

    def _abort_start(self, ngrok_path: str, done: threading.Event) -> None:
        """Kill the agent a stuck start is waiting on, so that pyngrok's reader sees EOF."""
        # The worker holds pyngrok's process lock while it waits for log lines, so look the
        # process up directly instead of calling pyngrok's (locking) kill_process().
        registry: dict[str, process.NgrokProcess] = getattr(process, "_current_processes", {})
        deadline = _ABORT_GRACE_S
        step = 0.05
        while not done.wait(step) and deadline > 0:
            deadline -= step
            stuck = registry.get(ngrok_path)
            if stuck is not None and stuck.proc.poll() is None:
                with contextlib.suppress(OSError):
                    stuck.proc.kill()
        if not done.is_set():
            logger.warning("ngrok: start did not unwind after the timeout; leaving it to finish")

    def _disconnect(self, public_url: str) -> None:
        if self._config is None:
            return
        try:
            ngrok.disconnect(public_url, pyngrok_config=self._config)
        except Exception as exc:
            logger.debug("ngrok: could not close %s: %s", public_url, _first_line(str(exc)))

    def _shutdown_locked(self) -> None:
        """Close tunnels, stop the agent, release the binary path and temporary files."""
        for tunnel in self._tunnels:
            self._disconnect(tunnel.public_url)
        self._tunnels.clear()
        agent, self._agent = self._agent, None
        if agent is not None:
            _stop_process(agent.proc)
        if self._claimed:
            _kill_agent(self._ngrok_path)
            with _paths_lock:
                _paths_in_use.discard(self._ngrok_path)
            self._claimed = False
        if self._config is not None and self._config.config_path:
            with contextlib.suppress(OSError):
                os.unlink(self._config.config_path)  # it holds the authtoken
        self._config = None
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None


def _write_private_file(path: str, text: str) -> None:
    """Atomically write ``text`` to ``path``, readable by the owner only."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _stop_process(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM the agent (so it closes its session cleanly), then SIGKILL if it lingers."""
    try:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(_STOP_GRACE_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.debug("ngrok: could not stop agent %s: %s", proc.pid, exc)


def _kill_agent(ngrok_path: str) -> None:
    """Make pyngrok kill (if still alive) and forget its agent for ``ngrok_path``."""
    try:
        process.kill_process(ngrok_path)
    except Exception as exc:
        logger.debug("ngrok: could not kill agent at %s: %s", ngrok_path, exc)


def _first_line(text: str) -> str:
    """First non-empty line of ``text``; ngrok's logfmt ``err`` values carry literal ``\\n``."""
    for sep in ("\\r\\n", "\\n", "\\r"):
        text = text.replace(sep, "\n")
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line if len(line) <= _MAX_MESSAGE else line[: _MAX_MESSAGE - 3] + "..."
    return ""


def _http_error_detail(exc: PyngrokNgrokHTTPError) -> str:
    """The agent's own explanation from an API error body, else pyngrok's message."""
    try:
        body = json.loads(exc.body)
    except (TypeError, ValueError):
        body = None
    if isinstance(body, dict):
        details = body.get("details")
        parts = [str(body.get("msg") or "").strip()]
        if isinstance(details, dict) and details.get("err"):
            parts.append(str(details["err"]).strip())
        text = ": ".join(p for p in parts if p)
        if text:
            return _first_line(text)
    return _first_line(str(exc))


def _describe(exc: BaseException, ngrok_path: str) -> str:
    """Turn any exception from pyngrok into a one-line reason."""
    if isinstance(exc, PyngrokNgrokInstallError):
        return (
            f"ngrok agent not found at {ngrok_path} and could not be installed "
            f"({_first_line(str(exc))}); install ngrok and set MTOR_NGROK_PATH"
        )
    if isinstance(exc, PyngrokNgrokHTTPError):
        return f"ngrok agent refused the tunnel (HTTP {exc.status_code}): {_http_error_detail(exc)}"
    if isinstance(exc, PyngrokNgrokError):
        if exc.ngrok_error:
            reason = _first_line(exc.ngrok_error)
            code = exc.ngrok_error_code
            if code and code not in reason:
                reason = f"{reason} ({code})"
            return f"ngrok agent failed: {reason}"
        return f"ngrok agent failed: {_first_line(str(exc))}"
    if isinstance(exc, PyngrokError):
        return f"ngrok: {_first_line(str(exc))}"
    if isinstance(exc, OSError):
        reason = exc.strerror or _first_line(str(exc)) or type(exc).__name__
        return f"cannot run the ngrok agent at {ngrok_path}: {reason}"
    return f"ngrok failed: {type(exc).__name__}: {_first_line(str(exc))}"
