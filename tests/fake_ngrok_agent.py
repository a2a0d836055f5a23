#!/usr/bin/env python3
"""Stand-in for the ngrok agent executable, for tests.

The real ngrok service is not reachable from CI (there is no internet access), so the tests point
pyngrok at this script instead of the ngrok binary. It speaks the parts of the agent that pyngrok
uses, with the standard library only:

* ``start --none --log stdout [--config PATH] [--authtoken TOKEN] [--region R]``: starts the local
  agent API on 127.0.0.1 and prints the logfmt lines pyngrok waits for (``starting web service``
  with ``addr=``, ``client session established``, ``tunnel session started``).
  The API serves ``/api/endpoints`` (pyngrok's config version 3) and ``/api/tunnels`` (version 2):
  POST creates a TCP tunnel whose "public" side is a listening socket on 127.0.0.1 that relays
  bytes both ways to the requested local port; GET lists; DELETE closes. SIGTERM or SIGINT closes
  everything and exits with status 0.
* ``version`` / ``--version``, ``config add-authtoken|add-api-key|check|upgrade``, ``update``:
  answered the way pyngrok parses them.

The authtoken is taken, like the real agent, from ``--authtoken``, else ``$NGROK_AUTHTOKEN``,
else the config file (``agent.authtoken`` for version 3, ``authtoken`` for version 2); without one
the agent fails the way ngrok does (``ERR_NGROK_4018``).

Switches (environment variables):

* ``FAKE_NGROK_MODE``: ``ok`` (default); ``silent`` (prints nothing and sleeps until killed);
  ``error`` (prints an ``lvl=eror ... err="authentication failed: ..."`` line and exits 1);
  ``crash`` (exits 3 at once without printing to stdout); ``reject`` (starts, but every POST is
  answered 400 with an ngrok-style error body).
* ``FAKE_NGROK_PUBLIC_HOST``: host name put in public URLs (default ``localhost``; the relay
  always listens on 127.0.0.1).
* ``FAKE_NGROK_EVENT_LOG``: a file to which one JSON object per event is appended (``start`` with
  pid/argv/token_source, ``post``, ``delete``, ``stop``, ``cli``), for tests to inspect.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

VERSION = "3.99.0-fake"
_print_lock = threading.Lock()


def log_event(event: str, **fields: Any) -> None:
    """Append one JSON line to $FAKE_NGROK_EVENT_LOG, if set."""
    path = os.environ.get("FAKE_NGROK_EVENT_LOG")
    if not path:
        return
    record = {"event": event, "pid": os.getpid(), "time": time.time(), **fields}
    with _print_lock, open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def logfmt(lvl: str, msg: str, **fields: str) -> None:
    """Print one agent log line in ngrok's logfmt format and flush it."""

    def quote(value: str) -> str:
        if value and not re.search(r'[\s"=\\]', value):
            return value
        escapes = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
        return '"' + "".join(escapes.get(ch, ch) for ch in value) + '"'

    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    parts = [f"t={stamp}", f"lvl={lvl}", f"msg={quote(msg)}"]
    parts += [f"{key}={quote(value)}" for key, value in fields.items()]
    with _print_lock:
        try:
            sys.stdout.write(" ".join(parts) + "\n")
            sys.stdout.flush()
        except (BrokenPipeError, ValueError):
            pass


def read_config(path: str | None) -> dict[str, Any]:
    """Read the agent config (JSON, or simple ``key: value`` YAML); {} if absent."""
    if not path or not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        data = json.loads(text)
        return data if isinstance(data, dict) else {}
    except ValueError:
        pass
    data: dict[str, Any] = {}
    for key in ("version", "authtoken", "web_addr", "region"):
        match = re.search(rf"^\s*{key}:\s*['\"]?([^'\"\s]+)", text, re.MULTILINE)
        if match:
            data[key] = match.group(1)
    return data


def config_value(config: dict[str, Any], key: str) -> Any:
    """A setting from the ``agent`` block (version 3) or the top level (version 2)."""
    agent = config.get("agent")
    if isinstance(agent, dict) and key in agent:
        return agent[key]
    return config.get(key)


def write_config_value(path: str, key: str, value: str) -> None:
    """Store ``key`` in the config file, like ``ngrok config add-authtoken``."""
    config = read_config(path) or {"version": "3"}
    if str(config.get("version")) == "3":
        config.setdefault("agent", {})[key] = value
    else:
        config[key] = value
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(config, handle)


# -- the relay: the fake "public" side of a tunnel ------------------------------------------------


class Relay:
    """A listening socket on 127.0.0.1 whose connections are piped to an upstream address."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port: int = self.listener.getsockname()[1]
        self.closed = threading.Event()
        self.conns: set[socket.socket] = set()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError as exc:
            logfmt("warn", "failed to dial upstream", obj="tunnels", err=str(exc))
            client.close()
            return
        upstream.settimeout(None)
        with self.lock:
            if self.closed.is_set():
                client.close()
                upstream.close()
                return
            self.conns.update((client, upstream))
        back = threading.Thread(target=self._pump, args=(upstream, client), daemon=True)
        back.start()
        self._pump(client, upstream)
        back.join()
        with self.lock:
            self.conns.difference_update((client, upstream))
        for sock in (client, upstream):
            try:
                sock.close()
            except OSError:
                pass

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
        except OSError:
            for sock in (src, dst):
                try:
                    sock.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.closed.set()
        for action in (lambda: self.listener.shutdown(socket.SHUT_RDWR), self.listener.close):
            try:
                action()
            except OSError:
                pass
        with self.lock:
            conns, self.conns = self.conns, set()
        for sock in conns:
            try:
                sock.close()
            except OSError:
                pass


# -- the local agent API ---------------------------------------------------------------------------


class Agent:
    """Tunnels by name, plus the behaviour switches."""

    def __init__(self, public_host: str, reject: bool) -> None:
        self.public_host = public_host
        self.reject = reject
        self.tunnels: dict[str, tuple[dict[str, Any], Relay]] = {}
        self.lock = threading.Lock()

    def close_all(self) -> None:
        with self.lock:
            items, self.tunnels = list(self.tunnels.values()), {}
        for _, relay in items:
            relay.close()


def parse_upstream(value: str) -> tuple[str, int] | None:
    """``"8080"``, ``"localhost:8080"`` or ``"tcp://localhost:8080"`` -> (host, port)."""
    value = value.strip()
    if "://" in value:
        scheme, value = value.split("://", 1)
        if scheme != "tcp":
            return None
    host, _, port = value.rpartition(":")
    host = host.strip("[]") or "localhost"
    if not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


class Handler(BaseHTTPRequestHandler):
    """The subset of ngrok's local agent API that pyngrok calls."""

    agent: Agent  # set on the subclass built in run_agent()
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        logfmt("dbug", "api request", obj="web", req=format % args)

    def _send(self, status: int, body: dict[str, Any] | None = None) -> None:
        payload = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _error(self, status: int, msg: str, err: str = "") -> None:
        body = {"error_code": 100 + status % 100, "status_code": status, "msg": msg}
        body["details"] = {"err": err} if err else {}
        self._send(status, body)

    def _route(self) -> tuple[str, str, str] | None:
        """-> (kind, collection key, name) for /api/endpoints[/NAME] and /api/tunnels[/NAME]."""
        match = re.fullmatch(r"/api/(endpoints|tunnels)(?:/([^/?]+))?/?", self.path.split("?")[0])
        if not match:
            return None
        return match.group(1), match.group(1), match.group(2) or ""

    def do_GET(self) -> None:
        route = self._route()
        if route is None:
            if self.path in ("/", "/api"):
                self._send(HTTPStatus.OK, {"fake": True, "version": VERSION})
            else:
                self._error(HTTPStatus.NOT_FOUND, "Not found")
            return
        kind, key, name = route
        with self.agent.lock:
            items = [item for item, _ in self.agent.tunnels.values() if item["_kind"] == kind]
        public = [{k: v for k, v in item.items() if not k.startswith("_")} for item in items]
        if not name:
            self._send(HTTPStatus.OK, {key: public, "uri": f"/api/{kind}"})
            return
        for item in public:
            if item["name"] == name:
                self._send(HTTPStatus.OK, item)
                return
        self._error(HTTPStatus.NOT_FOUND, "Tunnel not found", f"no tunnel named {name!r}")

    def do_POST(self) -> None:
        route = self._route()
        if route is None or route[2]:
            self._error(HTTPStatus.NOT_FOUND, "Not found")
            return
        kind = route[0]
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            self._error(HTTPStatus.BAD_REQUEST, "Invalid JSON body")
            return
        if self.agent.reject:
            self._error(
                HTTPStatus.BAD_REQUEST,
                "invalid tunnel configuration",
                "TCP endpoints require a verified account (fake agent rejects every tunnel)",
            )
            return
        if kind == "endpoints":
            upstream_url = str((body.get("upstream") or {}).get("url") or "")
            wanted = str(body.get("url") or "tcp://")
            is_tcp = wanted.startswith("tcp://")
        else:
            upstream_url = str(body.get("addr") or "")
            is_tcp = body.get("proto") == "tcp"
        upstream = parse_upstream(upstream_url) if is_tcp else None
        if upstream is None:
            self._error(
                HTTPStatus.BAD_REQUEST,
                "invalid tunnel configuration",
                f"the fake agent only makes TCP tunnels to host:port, got {body!r}",
            )
            return
        name = str(body.get("name") or f"tcp-{uuid.uuid4()}")
        with self.agent.lock:
            if name in self.agent.tunnels:
                self._error(HTTPStatus.BAD_REQUEST, "tunnel already exists", name)
                return
            relay = Relay(upstream)
            public_url = f"tcp://{self.agent.public_host}:{relay.port}"
            upstream_text = f"{upstream[0]}:{upstream[1]}"
            item: dict[str, Any] = {"_kind": kind, "name": name, "uri": f"/api/{kind}/{name}"}
            if kind == "endpoints":
                item.update(
                    id=f"ep_{uuid.uuid4().hex}", url=public_url, upstream={"url": upstream_text}
                )
            else:
                item.update(
                    ID=uuid.uuid4().hex,
                    public_url=public_url,
                    proto="tcp",
                    config={"addr": upstream_text, "inspect": False},
                    metrics={},
                )
            self.agent.tunnels[name] = (item, relay)
        logfmt(
            "info", "started tunnel", obj="tunnels", name=name, addr=upstream_text, url=public_url
        )
        log_event("post", kind=kind, name=name, public_url=public_url, upstream=upstream_text)
        self._send(HTTPStatus.CREATED, {k: v for k, v in item.items() if not k.startswith("_")})

    def do_DELETE(self) -> None:
        route = self._route()
        if route is None or not route[2]:
            self._error(HTTPStatus.NOT_FOUND, "Not found")
            return
        name = route[2]
        with self.agent.lock:
            entry = self.agent.tunnels.pop(name, None)
        if entry is None:
            self._error(HTTPStatus.NOT_FOUND, "Tunnel not found", f"no tunnel named {name!r}")
            return
        entry[1].close()
        logfmt("info", "stopped tunnel", obj="tunnels", name=name)
        log_event("delete", name=name, public_url=entry[0].get("url") or entry[0]["public_url"])
        self._send(HTTPStatus.NO_CONTENT)


# -- commands ------------------------------------------------------------------------------------


def run_agent(argv: list[str]) -> int:
    """``ngrok start --none --log stdout ...``."""
    parser = argparse.ArgumentParser(prog="ngrok start", add_help=False)
    parser.add_argument("--none", action="store_true")
    parser.add_argument("--log", default="false")
    parser.add_argument("--log-format", default="logfmt")
    parser.add_argument("--config", action="append", default=[])
    parser.add_argument("--authtoken")
    parser.add_argument("--region")
    args, _unknown = parser.parse_known_args(argv)

    config: dict[str, Any] = {}
    for path in args.config:
        config.update(read_config(path))
    if args.authtoken:
        token, source = args.authtoken, "flag"
    elif os.environ.get("NGROK_AUTHTOKEN"):
        token, source = os.environ["NGROK_AUTHTOKEN"], "env"
    else:
        token, source = config_value(config, "authtoken"), "config"
    mode = os.environ.get("FAKE_NGROK_MODE", "ok")
    log_event(
        "start",
        argv=sys.argv,
        mode=mode,
        config=args.config,
        token_source=source if token else None,
        token=token,
        region=args.region,
    )

    if mode == "silent":
        while True:
            time.sleep(3600)
    if mode == "crash":
        print("fake ngrok: crashing on purpose (FAKE_NGROK_MODE=crash)", file=sys.stderr)
        return 3
    for path in args.config:
        logfmt("info", "open config file", path=path, err="nil")
    if mode == "error":
        logfmt(
            "eror",
            "session closing",
            obj="tunnels.session",
            err="authentication failed: The authtoken you specified is invalid (fake agent)."
            "\r\n\r\nERR_NGROK_107\r\n",
        )
        return 1
    if not token:
        logfmt(
            "crit",
            "command failed",
            err="authentication failed: Usage of ngrok requires a verified account and authtoken."
            "\n\nSign up for an account: https://dashboard.ngrok.com/signup"
            "\r\n\r\nERR_NGROK_4018\r\n",
        )
        return 1

    agent = Agent(os.environ.get("FAKE_NGROK_PUBLIC_HOST", "localhost"), reject=mode == "reject")
    web_addr = str(config_value(config, "web_addr") or "127.0.0.1:0")
    host, _, port = web_addr.rpartition(":")
    handler = type("BoundHandler", (Handler,), {"agent": agent})
    server = ThreadingHTTPServer((host or "127.0.0.1", int(port or 0)), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()

    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    addr = f"{server.server_address[0]}:{server.server_address[1]}"
    logfmt("info", "starting web service", obj="web", addr=addr, allow_hosts="[]")
    logfmt("info", "client session established", obj="tunnels.session")
    logfmt("info", "tunnel session started", obj="tunnels.session", region=args.region or "fake")
    while not stop.wait(0.1):
        pass
    logfmt("info", "received stop request", obj="app", stopreq=received[0])
    agent.close_all()
    server.shutdown()
    server.server_close()
    log_event("stop", signal=received[0])
    return 0


def run_config(argv: list[str], config_path: str | None) -> int:
    """``ngrok config add-authtoken TOKEN`` and friends."""
    parser = argparse.ArgumentParser(prog="ngrok config", add_help=False)
    parser.add_argument("action")
    parser.add_argument("value", nargs="?")
    parser.add_argument("--config", action="append", default=[])
    parser.add_argument("--log", default="false")
    args, _unknown = parser.parse_known_args(argv)
    path = (args.config or [config_path or os.path.expanduser("~/.config/ngrok/ngrok.yml")])[0]
    if args.action in ("add-authtoken", "add-api-key") and args.value:
        key = "authtoken" if args.action == "add-authtoken" else "api_key"
        write_config_value(path, key, args.value)
        label = "Authtoken" if key == "authtoken" else "API key"
        print(f"{label} saved to configuration file: {path}")
        return 0
    if args.action in ("check", "upgrade"):
        print(f"Valid configuration file at {path}")
        return 0
    print(f"ERROR: fake ngrok does not implement 'config {args.action}'", file=sys.stderr)
    return 1


def main(argv: list[str]) -> int:
    """Dispatch on the subcommand, skipping leading global ``--config PATH`` flags."""
    config_path: str | None = None
    while len(argv) >= 2 and argv[0] == "--config":
        config_path, argv = argv[1], argv[2:]
    command = argv[0] if argv else "help"
    if command != "start":
        log_event("cli", argv=sys.argv)
    if command in ("version", "--version", "-v"):
        print(f"ngrok version {VERSION}")
        return 0
    if command == "start":
        return run_agent(argv[1:] + (["--config", config_path] if config_path else []))
    if command == "config":
        return run_config(argv[1:], config_path)
    if command == "update":
        print("No update available, this is the latest version.")
        return 0
    if command in ("help", "--help", "-h"):
        print(f"NAME:\n  ngrok - fake ngrok agent for tests\n\nVERSION:\n  {VERSION}")
        return 0
    print(f"ERROR: fake ngrok does not implement {command!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
