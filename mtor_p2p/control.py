"""The local control API: JSON over HTTP on 127.0.0.1, guarded by a bearer token.

The node writes ``control.json`` (its URL and PID) and keeps ``control.token`` (mode 0600) in
the data directory; the CLI, and later a dashboard, read both to talk to a running node. Only
a user who can read the data directory can control the node.

HTTP is spoken by well-kept libraries that run on trio: hypercorn parses requests and writes
answers (h11; its trio worker), Starlette's router dispatches them (through anyio). This module
keeps only what they do not do, around each connection and in an ASGI layer in front of the
router:

* the bearer token, compared in constant time, before a request's body is read;
* bounded request heads (16 KiB: 431) and bodies (64 KiB: 413, from the ``Content-Length``
  before any byte of the body is read, or as a chunked body grows);
* a connection reaches hypercorn only once its request head has arrived (the accept loop reads
  up to the blank line that ends it, parsing nothing; hypercorn reads those bytes again), so a
  flood of connections that never finish their head costs a read each, not an HTTP server;
* deadlines: the request head and body must arrive within ``head_timeout`` (2 s) of the
  connection, so a slowloris client is dropped quickly; a request then has the whole
  ``_CONNECTION_DEADLINE`` (10 s) for its work, and a connection still open a second after
  that (a client that does not read its answer) has its socket closed under it;
* one request per connection (every answer says ``Connection: close``), as the CLI sends;
* at most ``max_connections`` open at once: a new connection beyond that makes room by
  dropping the oldest one still sending its request (an honest client sends its request at
  once, so it is the flood that is dropped), or is answered 503 when every open connection
  is doing real work. hypercorn has no such cap, so this module runs its per-connection
  server (``hypercorn.trio.tcp_server.TCPServer``) from its own accept loop.

Every answer of the API is JSON: a route's exceptions become 400 with the message for bad
input and file errors (``ValueError``, ``KeyError``, ``TypeError``, ``OSError``), 500 for
anything else (a bug); unknown paths 404, wrong methods 405, a wrong token 401, a full server
503. Only a request that HTTP cannot parse is answered by hypercorn itself (an empty 400).

Beside the operator's routes (the bearer token), a route may be *public* (no token: the
dashboard's page and assets, which hold no data, and its login) or for *viewers* (the token,
or a dashboard session that :mod:`mtor_p2p.dashboard` issued, read-only). A route may answer
a :class:`StreamBody` (server-sent events): its connection then lives up to
``STREAM_LIFETIME`` instead of the connection deadline, and at most ``MAX_STREAMS`` are open
at once. Requests whose ``Host`` names anything but this machine's loopback are refused (a
web page that rebinds its own domain name to 127.0.0.1 must not reach the API).

The same server, without a token and with only ``GET /metrics``, is the operator's opt-in
metrics listener (``--metrics-listen``, see :mod:`mtor_p2p.metrics`).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route as StarletteRoute
from starlette.routing import Router, request_response

# The client's side lives apart, for the command line to load alone; re-exported here.
from mtor_p2p.control_client import INFO_FILE_NAME as INFO_FILE_NAME
from mtor_p2p.control_client import TOKEN_FILE_NAME as TOKEN_FILE_NAME
from mtor_p2p.control_client import ControlClient as ControlClient
from mtor_p2p.control_client import ControlError as ControlError
from mtor_p2p.control_client import NodeNotRunning as NodeNotRunning

log = logging.getLogger(__name__)

_MAX_HEAD_BYTES = 16 * 1024
_MAX_BODY_BYTES = 64 * 1024
_CONNECTION_DEADLINE = 10.0
#: After the connection deadline, how long a connection may still take to close (its answer
#: being written to a client that does not read) before its socket is closed under it.
_CLOSE_GRACE = 1.0
#: Seconds a connection has to send its whole request (head and body).
HEAD_TIMEOUT = 2.0
#: Connections served at once.
MAX_CONNECTIONS = 64
#: Event streams open at once (each holds a connection for up to STREAM_LIFETIME).
MAX_STREAMS = 8
#: Seconds an event stream stays open; the dashboard then opens a new one.
STREAM_LIFETIME = 300.0
#: ``Host`` names the API answers (any port): loopback only (see the module docstring).
_LOOPBACK_HOSTS = frozenset({b"127.0.0.1", b"localhost", b"[::1]"})

#: ``route(query, body) -> (status, json_object)``; the object may be a :class:`TextBody`
#: to answer something other than JSON (the metrics' text format, the dashboard's page) or
#: a :class:`StreamBody` (server-sent events).
Route = Callable[[dict[str, str], Any], Awaitable[tuple[int, Any]]]

#: Who may call a route: the operator (the bearer token; the default), a viewer (the token
#: or a dashboard session; read-only routes) or anyone (routes that reveal nothing).
OPERATOR, VIEWER, PUBLIC = "operator", "viewer", "public"

#: The answer to a connection beyond the cap when no open one can be dropped: written before
#: the request is read (there is no room to read it), so not through hypercorn.
_BUSY_REPLY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b'Content-Length: 29\r\nConnection: close\r\n\r\n{"error": "control API busy"}'
)
#: The answer to a connection whose head passes the bound before it ends (see _read_head).
_HEAD_TOO_LARGE_REPLY = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: application/json\r\n"
    b'Content-Length: 35\r\nConnection: close\r\n\r\n{"error": "request head too large"}'
)


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    """The bytes received up to the end of the request head (``\\r\\n\\r\\n``, perhaps
    with some of the body): hypercorn gets a connection only once its head has arrived, so a
    flood of connections that never finish theirs costs a read each, not an HTTP server's
    set-up. None: the client closed first; b"": the head passed its bound. Nothing is parsed
    here: hypercorn reads these bytes again (:class:`_Replayed`)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(4096)
        if not chunk:
            return None
        data += chunk
        if len(data) > _MAX_HEAD_BYTES and b"\r\n\r\n" not in data:
            return b""
    return data


async def _refuse(stream: trio.SocketStream, reply: bytes) -> None:
    """Answer ``reply`` to a request that will not be read, within 1 s in all. The unread
    request is drained until the client closes (at most 64 KiB): closing a socket with unread
    bytes sends a reset, which can reach the client before it has read the answer."""
    with trio.move_on_after(1):
        await stream.send_all(reply)
        await stream.send_eof()
        drained = 0
        while drained < 64 * 1024 and (chunk := await stream.receive_some(16 * 1024)):
            drained += len(chunk)


class _Replayed(trio.abc.HalfCloseableStream):
    """A connection whose first bytes, already read by :func:`_read_head`, are received again."""

    def __init__(self, stream: trio.SocketStream, first: bytes) -> None:
        self._stream = stream
        self._first = first
        #: hypercorn reads the peer's and our address from it.
        self.socket = stream.socket

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """The replayed bytes first, then the connection's."""
        if self._first:
            data, self._first = self._first, b""
            return data
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send on the connection."""
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        """As the connection's."""
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        """Shut the connection's sending side."""
        await self._stream.send_eof()

    async def aclose(self) -> None:
        """Close the connection."""
        await self._stream.aclose()


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
    #: Requests answered 401 (no token, or a wrong one).
    unauthorized: int = 0
    #: Requests answered, whatever their status.
    requests: int = 0
    #: Event streams open now, and those refused because MAX_STREAMS were.
    streams: int = 0
    streams_refused: int = 0
    #: Requests refused for a ``Host`` that is not loopback.
    foreign_host: int = 0


@dataclass(frozen=True)
class TextBody:
    """A route's answer that is not JSON (the metrics' text format, a page)."""

    content: bytes
    content_type: str
    #: Extra response headers (a page's Content-Security-Policy).
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class StreamBody:
    """A route's answer sent as it is produced (server-sent events): ``chunks`` yields the
    bytes; the server ends it at ``STREAM_LIFETIME``, or when the client goes away."""

    chunks: Callable[[], AsyncIterator[bytes]]
    content_type: str = "text/event-stream"


@dataclass
class _Connection:
    """One open connection: the scope that bounds it, and whether it still reads its request."""

    scope: trio.CancelScope
    started: float
    reading: bool = True
    dropped: bool = field(default=False)


class _Json(JSONResponse):
    """JSON as the hand-written server wrote it (sorted keys; NaN and infinities allowed, as
    Python's ``json`` reads them), not Starlette's stricter default."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, indent=None, sort_keys=True).encode()


def _error(status: int, message: str) -> Response:
    return _Json({"error": message}, status_code=status)


class ControlServer:
    """Serves ``routes`` (keyed by ``(METHOD, path)``) to holders of ``token``.

    ``max_connections`` and ``head_timeout`` bound what a flood of connections can hold (see
    the module docstring); ``stats`` counts what the guards did. ``host`` is 127.0.0.1 for the
    control API; ``token=None`` serves without a token, which only the operator's opt-in
    metrics listener does. ``access`` marks routes :data:`PUBLIC` or :data:`VIEWER` (the
    others are the operator's); ``viewer(bearer)`` says whether a bearer that is not the
    token may view (a dashboard session).
    """

    def __init__(
        self,
        token: str | None,
        routes: dict[tuple[str, str], Route],
        *,
        max_connections: int = MAX_CONNECTIONS,
        head_timeout: float = HEAD_TIMEOUT,
        host: str = "127.0.0.1",
        access: dict[tuple[str, str], str] | None = None,
        viewer: Callable[[str], bool] | None = None,
    ) -> None:
        if max_connections < 1 or head_timeout <= 0:
            raise ValueError("max_connections and head_timeout must be positive")
        self._expected = None if token is None else f"Bearer {token}".encode()
        self._access = dict(access or {})
        unknown = set(self._access.values()) - {OPERATOR, VIEWER, PUBLIC}
        if unknown:
            raise ValueError(f"unknown access levels {sorted(unknown)}")
        self._viewer = viewer
        self._loopback_only = host == "127.0.0.1"
        self._routes = routes
        self._max_connections = max_connections
        self._head_timeout = head_timeout
        self._host = host
        #: Open connections by the client's (host, port): hypercorn hands the same address to
        #: the application as ``scope["client"]``, which ties a request to its connection.
        self._connections: dict[tuple[Any, ...], _Connection] = {}
        #: Connections still sending their request, oldest first (dicts keep order).
        self._reading: dict[tuple[Any, ...], _Connection] = {}
        self.stats = ControlStats()
        self._config = HypercornConfig()
        self._config.h11_max_incomplete_size = _MAX_HEAD_BYTES
        self._config.h2_max_header_list_size = _MAX_HEAD_BYTES
        # HTTP/2 (prior knowledge) is still spoken; keep what one connection may run small.
        self._config.h2_max_concurrent_streams = 4
        # Our own head deadline (shorter) and connection deadline bound idle connections.
        self._config.keep_alive_timeout = _CONNECTION_DEADLINE
        self._config.include_server_header = False
        self._config.accesslog = None  # requests carry the token: nothing of them is logged
        self._config.errorlog = log
        self._context = WorkerContext(None)
        # Starlette's router alone, not its application: the app's middleware (error pages,
        # exception handlers) answers in plain text, and this module answers every error
        # itself, in JSON (a fifth of the time of a request went through those layers).
        # Each path takes any method; the endpoint answers 405 for one it does not serve.
        # An ASGI object (not a function) as the endpoint: Starlette then leaves every method
        # to it, where a function endpoint would get only GET and a plain-text 405.
        endpoint = _AnyMethod(request_response(self._endpoint))
        starlette = Router(
            routes=[StarletteRoute(path, endpoint) for path in {p for _m, p in routes}],
            redirect_slashes=False,
            default=self._not_found,
        )
        self._starlette = starlette
        self._app = wrap_app(self._asgi, 0, "asgi")

    async def serve(
        self, port: int = 0, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on ``host``:``port`` (0: any) and report the bound port to ``task_status``."""
        listeners = await trio.open_tcp_listeners(port, host=self._host)
        bound = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle_connection, listeners)
            task_status.started(bound)

    # -- connections -----------------------------------------------------------------------

    def _make_room(self) -> bool:
        """Drop the oldest connection still sending its request; False if there is none."""
        if not self._reading:
            return False
        oldest = next(iter(self._reading))
        connection = self._reading.pop(oldest)
        connection.dropped = True
        connection.scope.cancel()
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
                await _refuse(stream, _BUSY_REPLY)
                return
            now = trio.current_time()
            connection = _Connection(trio.CancelScope(deadline=now + self._head_timeout), now)
            try:
                key = tuple(stream.socket.getpeername()[:2])
            except OSError:  # reset before we looked: the client went away
                return
            self._connections[key] = connection
            self._reading[key] = connection
            stats.open += 1
            head: bytes | None = None
            try:
                async with trio.open_nursery() as nursery:
                    with connection.scope:
                        head = await _read_head(stream)
                        if head:
                            # The watchdog runs outside the connection's scope: it must
                            # outlive that scope's cancellation to end a shielded write.
                            nursery.start_soon(self._watchdog, stream, connection)
                            await TCPServer(
                                self._app,
                                self._config,
                                self._context,
                                ConnectionState({}),
                                _Replayed(stream, head),
                            )
                    nursery.cancel_scope.cancel()
                if head == b"" and not connection.scope.cancelled_caught:
                    await _refuse(stream, _HEAD_TOO_LARGE_REPLY)
            finally:
                stats.open -= 1
                self._connections.pop(key, None)
                self._reading.pop(key, None)
            if connection.scope.cancelled_caught and connection.reading and not connection.dropped:
                stats.head_timeouts += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            pass  # the client went away
        except Exception:  # a bug here must not take the node down
            log.exception("control API connection failed")
        finally:
            await stream.aclose()

    async def _watchdog(self, stream: trio.SocketStream, connection: _Connection) -> None:
        # hypercorn writes answers in a shielded scope: a client that does not read would hold
        # the connection past any cancellation. Closing the socket ends that write. The
        # deadline is read again after each sleep: an event stream moves it later.
        deadline = max(connection.scope.deadline, connection.started + _CONNECTION_DEADLINE)
        while trio.current_time() < deadline + _CLOSE_GRACE:
            await trio.sleep_until(deadline + _CLOSE_GRACE)
            deadline = max(connection.scope.deadline, connection.started + _CONNECTION_DEADLINE)
        stream.socket.close()

    # -- requests (ASGI, in front of Starlette) --------------------------------------------

    async def _asgi(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        client = scope.get("client")
        key = tuple(client[:2]) if client else ()
        connection = self._connections.get(key)
        if connection is None:  # cannot happen: every connection is registered first
            connection = _Connection(trio.CancelScope(), trio.current_time())
        send = _closing(send, self.stats)
        # h11 bounds a head only while it is incomplete; one that arrives whole in a read (up
        # to 64 KiB) is parsed, and refused here.
        head_bytes = len(scope.get("raw_path") or b"") + len(scope.get("query_string", b""))
        head_bytes += sum(len(name) + len(value) + 4 for name, value in scope["headers"])
        if head_bytes > _MAX_HEAD_BYTES:
            self._working(connection, key)
            await _error(431, "request head too large")(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self._loopback_only and not _loopback_host(headers.get(b"host")):
            self._working(connection, key)
            self.stats.foreign_host += 1
            await _error(403, "the control API answers only to Host 127.0.0.1 or localhost")(
                scope, receive, send
            )
            return
        if not self._authorized(scope["method"], scope["path"], headers):
            self._working(connection, key)
            self.stats.unauthorized += 1
            await _error(401, "missing or wrong control token")(scope, receive, send)
            return
        length = headers.get(b"content-length")
        try:
            declared = None if length is None else int(length)
        except ValueError:
            declared = -1
        if declared is not None and declared < 0:
            self._working(connection, key)
            await _error(400, "malformed request")(scope, receive, send)
            return
        if declared is not None and declared > _MAX_BODY_BYTES:
            self._working(connection, key)
            await _error(413, "body too large")(scope, receive, send)
            return
        body = bytearray()
        # The body must arrive by the head deadline too: past it, the connection's own scope
        # (the same deadline) cancels this read and the connection closes without an answer.
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > _MAX_BODY_BYTES:
                self._working(connection, key)
                await _error(413, "body too large")(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        self._working(connection, key)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self._starlette(scope, replay, send)

    def _authorized(self, method: str, path: str, headers: dict[bytes, bytes]) -> bool:
        """Whether the request's bearer may call ``method path`` (see :data:`Route`)."""
        if self._expected is None:
            return True
        access = self._access.get((method, path), OPERATOR)
        if access == PUBLIC:
            return True
        bearer = headers.get(b"authorization", b"")
        if hmac.compare_digest(bearer, self._expected):
            return True
        if access != VIEWER or self._viewer is None or not bearer.startswith(b"Bearer "):
            return False
        return self._viewer(bearer[7:].decode("latin-1"))

    def _working(self, connection: _Connection, key: tuple[Any, ...]) -> None:
        """The request has arrived: the connection does real work now, under the longer
        connection deadline, and can no longer be dropped to make room."""
        connection.reading = False
        self._reading.pop(key, None)
        connection.scope.deadline = connection.started + _CONNECTION_DEADLINE

    async def _endpoint(self, request: Request) -> Response:
        method, path = request.method, request.scope["path"]
        route = self._routes.get((method, path))
        if route is None:  # the path is served, not with this method
            return _error(405, f"no route {method} {path}")
        # As the hand-written server read it: the target as latin-1, escapes as UTF-8.
        query_string = request.scope["query_string"].decode("latin-1")
        query = {k: v[-1] for k, v in parse_qs(query_string).items()}
        body = await request.body()
        try:
            payload = json.loads(body) if body else None
        except ValueError:
            return _error(400, "body is not JSON")
        try:
            status, result = await route(query, payload)
        except (ValueError, KeyError, TypeError, OSError) as exc:
            # Bad input, or a file the request named that cannot be read or written: the
            # caller's to fix, so it gets the message (a FileNotFoundError names the path).
            return _error(400, str(exc) or type(exc).__name__)
        except Exception as exc:
            self.stats.route_errors += 1
            log.exception("control route %s %s failed", method, path)
            return _error(500, f"internal error: {type(exc).__name__}: {exc}")
        if isinstance(result, TextBody):
            return Response(
                result.content,
                status_code=status,
                media_type=result.content_type,
                headers=dict(result.headers),
            )
        if isinstance(result, StreamBody):
            return self._stream(request, result)
        return _Json(result, status_code=status)

    def _stream(self, request: Request, body: StreamBody) -> Response:
        """Answer with ``body``'s chunks as they come, on a connection that may now live
        ``STREAM_LIFETIME`` (at most ``MAX_STREAMS`` at once)."""
        if self.stats.streams >= MAX_STREAMS:
            self.stats.streams_refused += 1
            return _error(503, f"{MAX_STREAMS} event streams are open already")
        client = request.scope.get("client")
        connection = self._connections.get(tuple(client[:2]) if client else ())
        if connection is not None:
            connection.scope.deadline = trio.current_time() + STREAM_LIFETIME
        # no-transform: no proxy may buffer the events.
        headers = {"Cache-Control": "no-store, no-transform", "X-Accel-Buffering": "no"}
        return _CountedStream(self.stats, body.chunks(), body.content_type, headers)

    async def _not_found(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        message = f"no route {scope['method']} {scope['path']}"
        await _error(404, message)(scope, receive, send)


class _CountedStream(StreamingResponse):
    """A stream that holds one of the ``MAX_STREAMS`` places from its creation until its
    response ends, however it ends: counted around the whole response, not in its body's
    generator, which never starts (so never releases) when the client hangs up at once."""

    def __init__(
        self,
        stats: ControlStats,
        chunks: AsyncIterator[bytes],
        media_type: str,
        headers: dict[str, str],
    ) -> None:
        super().__init__(chunks, media_type=media_type, headers=headers)
        self._stats = stats
        stats.streams += 1

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._stats.streams -= 1


def _loopback_host(host: bytes | None) -> bool:
    """Whether a ``Host`` header names this machine's loopback (any port)."""
    if not host:
        return False
    name = host.rsplit(b":", 1)[0] if not host.endswith(b"]") else host
    return name.lower() in _LOOPBACK_HOSTS


class _AnyMethod:
    """An ASGI application that Starlette routes every method to (see ControlServer)."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self._app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self._app(scope, receive, send)


def _closing(send: Any, stats: ControlStats) -> Any:
    """``send``, with ``Connection: close`` on every answer: one request per connection, so
    that the connection deadline bounds each request and no idle keep-alive is held."""

    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            stats.requests += 1
            message = {
                **message,
                "headers": [*message.get("headers", []), (b"connection", b"close")],
            }
        await send(message)

    return wrapped
