"""The local control API: JSON over HTTP on 127.0.0.1, guarded by a bearer token.

The node writes ``control.json`` (its URL and PID) and keeps ``control.token`` (mode 0600) in
the data directory; the CLI, and later a dashboard, read both to talk to a running node. Only
a user who can read the data directory can control the node.

The server is deliberately tiny (one request per connection, bounded headers and body, a
deadline per connection) so that it needs no web framework and cannot be held open by a slow
client. Against a flood of connections (any local user can open them, token or not):

* the request head and body must arrive within ``head_timeout`` (2 s) of the connection,
  so a slowloris client is dropped quickly; a request then has the whole
  ``_CONNECTION_DEADLINE`` (10 s) for its work;
* at most ``max_connections`` are open at once; a new connection beyond that makes room by
  dropping the oldest one still sending its request (an honest client sends its request at
  once, so it is the flood that is dropped), or is answered 503 when every open connection
  is doing real work.

A route's exceptions become JSON answers: 400 with the message for bad input and file errors
(``ValueError``, ``KeyError``, ``TypeError``, ``OSError``), 500 for anything else (a bug). Only
the client going away is ignored.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trio

log = logging.getLogger(__name__)

TOKEN_FILE_NAME = "control.token"
INFO_FILE_NAME = "control.json"
_MAX_HEAD_BYTES = 16 * 1024
_MAX_BODY_BYTES = 64 * 1024
_CONNECTION_DEADLINE = 10.0
#: Seconds a connection has to send its whole request (head and body).
HEAD_TIMEOUT = 2.0
#: Connections served at once.
MAX_CONNECTIONS = 64

#: ``route(query, body) -> (status, json_object)``
Route = Callable[[dict[str, str], Any], Awaitable[tuple[int, Any]]]

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class NodeNotRunning(Exception):
    """No node answers on the data directory's control API."""


class ControlError(Exception):
    """The node answered the control request with an error."""


def load_or_create_token(data_dir: Path) -> str:
    """The control token, created (mode 0600) on first use."""
    path = data_dir / TOKEN_FILE_NAME
    if path.exists():
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token)
    return token


def write_control_info(data_dir: Path, info: dict[str, Any]) -> Path:
    """Write ``control.json`` (the API's URL, the PID...) atomically, readable by the owner only.

    The file is created 0600 under a temporary name in ``data_dir`` and renamed over the old
    one, so a reader sees the old or the new file, never half of one, and never a moment
    in which another local user could read it.
    """
    path = data_dir / INFO_FILE_NAME
    tmp = data_dir / f".{INFO_FILE_NAME}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(info))
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)  # the mode os.open was given is narrowed by the umask only
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@dataclass
class ControlStats:
    """Counters of the control server's guards."""

    #: Connections open now.
    open: int = 0
    #: Connections accepted in all.
    accepted: int = 0
    #: Connections still sending their request, dropped to make room for a new one.
    dropped_idle: int = 0
    #: Connections that had not sent their whole request by the head deadline.
    head_timeouts: int = 0
    #: Connections answered 503 because every open one was doing real work.
    refused_busy: int = 0
    #: Routes that raised something other than a bad-input or file error (answered 500).
    route_errors: int = 0


@dataclass
class _Reading:
    """A connection still sending its request: the scope that can drop it."""

    scope: trio.CancelScope
    dropped: bool = field(default=False)


def _response(status: int, payload: Any) -> bytes:
    body = json.dumps(payload, indent=None, sort_keys=True).encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


class ControlServer:
    """Serves ``routes`` (keyed by ``(METHOD, path)``) to holders of ``token``.

    ``max_connections`` and ``head_timeout`` bound what a flood of connections can hold (see
    the module docstring); ``stats`` counts what the guards did.
    """

    def __init__(
        self,
        token: str,
        routes: dict[tuple[str, str], Route],
        *,
        max_connections: int = MAX_CONNECTIONS,
        head_timeout: float = HEAD_TIMEOUT,
    ) -> None:
        if max_connections < 1 or head_timeout <= 0:
            raise ValueError("max_connections and head_timeout must be positive")
        self._token = token
        self._routes = routes
        self._max_connections = max_connections
        self._head_timeout = head_timeout
        #: Connections still sending their request, oldest first (dicts keep order).
        self._reading: dict[int, _Reading] = {}
        self._next_id = 0
        self.stats = ControlStats()

    async def serve(
        self, port: int = 0, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on 127.0.0.1:``port`` (0: any) and report the bound port to ``task_status``."""
        listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
        bound = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle_connection, listeners)
            task_status.started(bound)

    def _make_room(self) -> bool:
        """Drop the oldest connection still sending its request; False if there is none."""
        if not self._reading:
            return False
        oldest = next(iter(self._reading))
        reading = self._reading.pop(oldest)
        reading.dropped = True
        reading.scope.cancel()
        self.stats.dropped_idle += 1
        return True

    async def _handle_connection(self, stream: trio.SocketStream) -> None:
        stats = self.stats
        stats.accepted += 1
        try:
            # Connections dropped to make room close on their own task's next step, so
            # ``open`` may pass the cap by the few that have not yet: bounded by the cap.
            if stats.open >= self._max_connections and not self._make_room():
                stats.refused_busy += 1
                with trio.move_on_after(1):
                    await stream.send_all(_response(503, {"error": "control API busy"}))
                return
            stats.open += 1
            try:
                with trio.move_on_after(_CONNECTION_DEADLINE):
                    reply = await self._handle_request(stream)
                    if reply:
                        await stream.send_all(reply)
            finally:
                stats.open -= 1
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            pass  # the client went away
        except Exception:  # a bug here must not take the node down
            log.exception("control API connection failed")
        finally:
            await stream.aclose()

    async def _read_request(self, stream: trio.SocketStream) -> tuple[bytes, bytes] | bytes:
        """The request's head and body, or the error reply to send instead (b"": none)."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return b""
            data += chunk
            if len(data) > _MAX_HEAD_BYTES:
                return _response(431, {"error": "request head too large"})
        head, body = data.split(b"\r\n\r\n", 1)
        return head, body

    async def _handle_request(self, stream: trio.SocketStream) -> bytes:
        # The request must arrive within the head deadline; a connection still sending it
        # can be dropped to make room for a new one (see _make_room).
        self._next_id += 1
        key = self._next_id
        reading = _Reading(trio.CancelScope(deadline=trio.current_time() + self._head_timeout))
        self._reading[key] = reading
        try:
            with reading.scope:
                read = await self._read_request(stream)
                if isinstance(read, bytes):
                    return read
                head, body = read
                try:
                    request_line, *header_lines = head.decode("latin-1").split("\r\n")
                    method, target, _version = request_line.split(" ", 2)
                    headers = {}
                    for line in header_lines:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                    length = int(headers.get("content-length", "0"))
                except ValueError:
                    return _response(400, {"error": "malformed request"})
                if length < 0 or length > _MAX_BODY_BYTES:
                    return _response(413, {"error": "body too large"})
                while len(body) < length:
                    chunk = await stream.receive_some(length - len(body))
                    if not chunk:
                        return _response(400, {"error": "body ended early"})
                    body += chunk
        finally:
            self._reading.pop(key, None)
        if reading.scope.cancelled_caught:
            if not reading.dropped:
                self.stats.head_timeouts += 1
            return b""
        if not hmac.compare_digest(headers.get("authorization", ""), f"Bearer {self._token}"):
            return _response(401, {"error": "missing or wrong control token"})
        return await self._dispatch(method, target, body)

    async def _dispatch(self, method: str, target: str, body: bytes) -> bytes:
        url = urlsplit(target)
        route = self._routes.get((method, url.path))
        if route is None:
            known = {path for (_m, path) in self._routes}
            status = 405 if url.path in known else 404
            return _response(status, {"error": f"no route {method} {url.path}"})
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            payload = json.loads(body) if body else None
        except ValueError:
            return _response(400, {"error": "body is not JSON"})
        try:
            status, result = await route(query, payload)
        except (ValueError, KeyError, TypeError, OSError) as exc:
            # Bad input, or a file the request named that cannot be read or written: the
            # caller's to fix, so it gets the message (a FileNotFoundError names the path).
            return _response(400, {"error": str(exc) or type(exc).__name__})
        except Exception as exc:
            self.stats.route_errors += 1
            log.exception("control route %s %s failed", method, url.path)
            return _response(500, {"error": f"internal error: {type(exc).__name__}: {exc}"})
        return _response(status, result)


@dataclass(frozen=True)
class ControlClient:
    """Talks to the node that owns ``data_dir``."""

    url: str
    token: str
    timeout: float = 10.0

    @classmethod
    def for_data_dir(cls, data_dir: Path, *, timeout: float = 10.0) -> ControlClient:
        """Find the running node's API through the files in ``data_dir``."""
        try:
            info = json.loads((data_dir / INFO_FILE_NAME).read_text())
            token = (data_dir / TOKEN_FILE_NAME).read_text().strip()
        except (OSError, ValueError) as exc:
            raise NodeNotRunning(f"no running node found in {data_dir}") from exc
        return cls(url=info["url"], token=token, timeout=timeout)

    def call(self, method: str, path: str, payload: Any = None) -> Any:
        """Send one request; return the decoded JSON answer."""
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                reason = json.loads(exc.read()).get("error", exc.reason)
            except ValueError:
                reason = exc.reason
            raise ControlError(f"{exc.code}: {reason}") from exc
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            raise NodeNotRunning(f"the node at {self.url} does not answer: {exc}") from exc
