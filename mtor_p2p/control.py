"""The local control API: JSON over HTTP on 127.0.0.1, guarded by a bearer token.

The node writes ``control.json`` (its URL and PID) and keeps ``control.token`` (mode 0600) in
the data directory; the CLI, and later a dashboard, read both to talk to a running node. Only
a user who can read the data directory can control the node.

The server is deliberately tiny (one request per connection, bounded headers and body, a
deadline per connection) so that it needs no web framework and cannot be held open by a slow
client.
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
from dataclasses import dataclass
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
    """Serves ``routes`` (keyed by ``(METHOD, path)``) to holders of ``token``."""

    def __init__(self, token: str, routes: dict[tuple[str, str], Route]) -> None:
        self._token = token
        self._routes = routes

    async def serve(
        self, port: int = 0, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on 127.0.0.1:``port`` (0: any) and report the bound port to ``task_status``."""
        listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
        bound = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle_connection, listeners)
            task_status.started(bound)

    async def _handle_connection(self, stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(_CONNECTION_DEADLINE):
                reply = await self._handle_request(stream)
                await stream.send_all(reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away
        except Exception:  # a bug here must not take the node down
            log.exception("control API connection failed")
        finally:
            await stream.aclose()

    async def _handle_request(self, stream: trio.SocketStream) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return b""
            data += chunk
            if len(data) > _MAX_HEAD_BYTES:
                return _response(431, {"error": "request head too large"})
        head, body = data.split(b"\r\n\r\n", 1)
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
        if not hmac.compare_digest(headers.get("authorization", ""), f"Bearer {self._token}"):
            return _response(401, {"error": "missing or wrong control token"})
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
        except (ValueError, KeyError, TypeError) as exc:
            return _response(400, {"error": str(exc)})
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
