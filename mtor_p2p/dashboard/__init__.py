"""The node's web dashboard: a page served on the control API's port, updated live.

``mtor-peer dashboard`` asks the running node for a *ticket* (``POST /v1/dashboard/ticket``,
with the control token) and prints ``http://127.0.0.1:PORT/dashboard#ticket=...``. The
ticket sits in the URL's fragment, which a browser never sends, so it reaches no server log;
the page trades it once (``POST /v1/dashboard/login``) for a *session*, a bearer that can only
read the dashboard's routes, kept in the tab's ``sessionStorage`` (scoped to this origin,
port included; a cookie would be sent to every server on 127.0.0.1). A ticket lives
``TICKET_SECONDS`` and works once; a session lives ``SESSION_SECONDS``.

The page (``static/``, shipped in the wheel, no CDN: it works offline) reads
``GET /v1/dashboard/state`` once and then ``GET /v1/dashboard/events``, server-sent events
that carry a new snapshot each ``tick`` while someone watches. Snapshots are built once per
tick whatever the number of viewers (at most ``control.MAX_STREAMS``), so watching costs the
node one snapshot a second. Balance, stake and price are sampled every
``history_interval`` seconds into a bounded history for the charts; warnings logged by the
process are kept (the last ``MAX_WARNINGS``) for the page.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from importlib import resources
from typing import TYPE_CHECKING, Any

import trio

from mtor_p2p.control import PUBLIC, VIEWER, Route, StreamBody, TextBody
from mtor_p2p.dashboard.snapshot import SNAPSHOT_RECEIPTS
from mtor_p2p.dashboard.snapshot import snapshot as build
from mtor_p2p.insight import earnings

if TYPE_CHECKING:
    from mtor_p2p.node import Node

log = logging.getLogger(__name__)

#: How long a ticket from ``mtor-peer dashboard`` may wait to be used (once).
TICKET_SECONDS = 120.0
#: How long a dashboard session lasts.
SESSION_SECONDS = 12 * 3600.0
#: Outstanding tickets and live sessions kept (the oldest go first).
MAX_TICKETS = 16
MAX_SESSIONS = 32
#: Warnings kept for the page.
MAX_WARNINGS = 50
#: Seconds between reads of the receipts and the ledger's flows behind the balance.
EARNINGS_REFRESH = 3.0
#: The page's own assets: (file name, content type).
ASSETS = {
    "/dashboard": ("index.html", "text/html; charset=utf-8"),
    "/dashboard/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/dashboard/app.css": ("app.css", "text/css; charset=utf-8"),
}
#: The page loads nothing from elsewhere, runs no inline script and cannot be framed.
_PAGE_HEADERS = (
    (
        "Content-Security-Policy",
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-cache"),
)


class Sessions:
    """One-use tickets and the read-only sessions they open (times on trio's clock)."""

    def __init__(
        self,
        *,
        ticket_seconds: float = TICKET_SECONDS,
        session_seconds: float = SESSION_SECONDS,
    ) -> None:
        self.ticket_seconds = ticket_seconds
        self.session_seconds = session_seconds
        #: token -> expiry (trio time); OrderedDicts so that the oldest is evicted first.
        self._tickets: OrderedDict[str, float] = OrderedDict()
        self._sessions: OrderedDict[str, float] = OrderedDict()
        #: Logins refused (a wrong, used or expired ticket).
        self.refused = 0

    def ticket(self) -> str:
        """A new ticket, valid once for ``ticket_seconds``."""
        self._expire()
        token = secrets.token_urlsafe(32)
        self._tickets[token] = trio.current_time() + self.ticket_seconds
        while len(self._tickets) > MAX_TICKETS:
            self._tickets.popitem(last=False)
        return token

    def login(self, ticket: str) -> str | None:
        """Trade a valid ``ticket`` (used up) for a session; None if it is not one."""
        self._expire()
        if not isinstance(ticket, str) or self._tickets.pop(ticket, None) is None:
            self.refused += 1
            return None
        session = secrets.token_urlsafe(32)
        self._sessions[session] = trio.current_time() + self.session_seconds
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return session

    def valid(self, session: str) -> bool:
        """Whether ``session`` is a live session (compared as a dict key: the token's
        length and bytes are not secret-dependent work beyond a hash lookup)."""
        expiry = self._sessions.get(session)
        if expiry is None:
            return False
        if expiry <= trio.current_time():
            del self._sessions[session]
            return False
        return True

    def _expire(self) -> None:
        now = trio.current_time()
        for table in (self._tickets, self._sessions):
            for token in [t for t, expiry in table.items() if expiry <= now]:
                del table[token]

    @property
    def live(self) -> int:
        """Sessions open now."""
        self._expire()
        return len(self._sessions)


class WarningLog(logging.Handler):
    """Keeps the last ``MAX_WARNINGS`` distinct warnings and errors the process logs (for the
    page): a line logged again (a burst of the same complaint) counts on its first entry,
    which moves to the end, rather than pushing every other line out."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self._records: OrderedDict[tuple[str, str, str], dict[str, Any]] = OrderedDict()

    @property
    def records(self) -> list[dict[str, Any]]:
        """The kept warnings, oldest first: ``at`` (the last time), ``level``, ``logger``,
        ``message``, ``count``."""
        return list(self._records.values())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string in someone's log call: keep the template
            message = str(record.msg)
        level = record.levelname.lower()
        key = (level, record.name, message[:500])
        entry = self._records.pop(key, None)
        if entry is None:
            entry = {"level": level, "logger": record.name, "message": key[2], "count": 0}
        entry["count"] += 1
        entry["at"] = round(record.created, 3)
        self._records[key] = entry
        while len(self._records) > MAX_WARNINGS:
            self._records.popitem(last=False)


class Dashboard:
    """The dashboard of one node: its routes, sessions, history and live snapshots."""

    def __init__(
        self,
        node: Node,
        *,
        tick: float = 1.0,
        history_interval: float = 10.0,
        history_points: int = 720,
    ) -> None:
        self.node = node
        self.tick = tick
        self.history_interval = history_interval
        self.sessions = Sessions()
        self.warnings = WarningLog()
        #: (wall-clock seconds, balance, stake, price) samples, oldest first.
        self.history: deque[tuple[float, float, float, float]] = deque(maxlen=history_points)
        #: The latest snapshot's sequence number and its server-sent event, encoded once
        #: for every viewer.
        self._event: tuple[int, bytes] | None = None
        self._seq = 0
        self._watchers = 0
        self._watched = trio.Event()  # set when the first viewer arrives
        self._fresh = trio.Event()  # set (and replaced) at each new snapshot
        self._earnings: dict[str, Any] | None = None
        self._earnings_at = 0.0
        #: Snapshots that could not be built (logged once a minute).
        self.snapshot_errors = 0
        #: Snapshots built, and the seconds the last one took (status, benchmarks).
        self.snapshots_built = 0
        self.last_build_seconds = 0.0

    # -- routes ----------------------------------------------------------------------------

    def routes(self) -> tuple[dict[tuple[str, str], Route], dict[tuple[str, str], str]]:
        """The routes to add to the control API, and their access levels."""
        routes: dict[tuple[str, str], Route] = {
            ("POST", "/v1/dashboard/ticket"): self._route_ticket,
            ("POST", "/v1/dashboard/login"): self._route_login,
            ("GET", "/v1/dashboard/state"): self._route_state,
            ("GET", "/v1/dashboard/events"): self._route_events,
        }
        access = {
            ("POST", "/v1/dashboard/login"): PUBLIC,
            ("GET", "/v1/dashboard/state"): VIEWER,
            ("GET", "/v1/dashboard/events"): VIEWER,
        }
        # A route is told its query, not its path: one route per asset.
        for path, (name, content_type) in ASSETS.items():
            routes[("GET", path)] = _asset_route(name, content_type)
            access[("GET", path)] = PUBLIC
        return routes, access

    async def _route_ticket(self, query: dict[str, str], body: Any) -> tuple[int, Any]:
        ticket = self.sessions.ticket()
        return 200, {"ticket": ticket, "expires_in": self.sessions.ticket_seconds}

    async def _route_login(self, query: dict[str, str], body: Any) -> tuple[int, Any]:
        ticket = body.get("ticket") if isinstance(body, dict) else None
        session = self.sessions.login(ticket) if isinstance(ticket, str) else None
        if session is None:
            if not isinstance(ticket, str):
                self.sessions.refused += 1
            return 401, {
                "error": "this dashboard link is used, expired or wrong: "
                "run `mtor-peer dashboard` for a new one"
            }
        return 200, {"session": session, "expires_in": self.sessions.session_seconds}

    async def _route_state(self, query: dict[str, str], body: Any) -> tuple[int, Any]:
        return 200, await self.snapshot()

    async def _route_events(self, query: dict[str, str], body: Any) -> tuple[int, Any]:
        return 200, StreamBody(self._events)

    async def _events(self) -> AsyncIterator[bytes]:
        """Server-sent events: a ``snapshot`` event at each tick while the client reads."""
        self._watchers += 1
        self._watched.set()
        try:
            # The browser reconnects after 1 s when the stream ends (STREAM_LIFETIME).
            yield b"retry: 1000\n\n"
            seen = -1
            while True:
                event = self._event
                if event is None or event[0] == seen:
                    await self._fresh.wait()
                    continue
                seen = event[0]
                yield event[1]
        finally:
            self._watchers -= 1
            if self._watchers == 0:
                self._watched = trio.Event()

    # -- the feed --------------------------------------------------------------------------

    async def run(self) -> None:
        """Sample the history and, while someone watches, build a snapshot each tick."""
        root = logging.getLogger()
        # The page shows what the log shows: the filters of the process's own handlers (the
        # CLI's quiet peer-failure noise, say) apply to it too.
        for handler in root.handlers:
            for log_filter in handler.filters:
                self.warnings.addFilter(log_filter)
        root.addHandler(self.warnings)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._history_loop)
                while True:
                    await self._watched.wait()
                    try:
                        await self.snapshot()
                    except Exception:
                        # A snapshot that cannot be built (a bug, or something a peer sent
                        # that nobody foresaw) must cost the page an update, never the node.
                        self.snapshot_errors += 1
                        if self.snapshot_errors % 60 == 1:
                            log.exception(
                                "dashboard snapshot failed (%d so far)", self.snapshot_errors
                            )
                    await trio.sleep(self.tick)
        finally:
            root.removeHandler(self.warnings)

    async def _history_loop(self) -> None:
        while True:
            try:
                ledger = await self.node.runtime.run_blocking(self.node.ledger_summary)
                self._sample(ledger)
            except Exception:  # a ledger being closed at shutdown: skip this sample
                log.debug("dashboard history sample skipped", exc_info=True)
            await trio.sleep(self.history_interval)

    def _sample(self, ledger: dict[str, Any]) -> None:
        credits = ledger.get("credits", {})
        self.history.append(
            (
                round(time.time(), 1),
                float(credits.get("balance", 0.0)),
                float(credits.get("stake", 0.0)),
                float(self.node.price),
            )
        )

    async def snapshot(self) -> dict[str, Any]:
        """A new snapshot of the node (also published to the event streams)."""
        started = trio.current_time()
        node = self.node
        # The receipts and the ledger's flows for this peer are SQLite reads that grow with
        # the receipts held: refreshed every EARNINGS_REFRESH seconds, not at every tick.
        refresh = self._earnings is None or started - self._earnings_at >= EARNINGS_REFRESH
        slow = await node.runtime.run_blocking(self._read_blocking, refresh)
        if refresh:
            self._earnings, self._earnings_at = slow["earnings"], started
        slow["earnings"] = self._earnings
        if not self.history:
            self._sample(slow["ledger"])
        self._seq += 1
        snapshot = build(node, slow, self)
        snapshot["seq"] = self._seq
        data = json.dumps(snapshot, separators=(",", ":"), allow_nan=False, default=str)
        self._event = (self._seq, b"event: snapshot\ndata: " + data.encode() + b"\n\n")
        self.snapshots_built += 1
        self.last_build_seconds = trio.current_time() - started
        fresh, self._fresh = self._fresh, trio.Event()
        fresh.set()
        return snapshot

    def _read_blocking(self, refresh_earnings: bool) -> dict[str, Any]:
        """What a snapshot reads from SQLite and NVML (in a thread in production)."""
        from mtor_p2p.metrics import read_gpu_sensors

        node = self.node
        return {
            "ledger": node.ledger_summary(),
            "earnings": earnings(node, limit=SNAPSHOT_RECEIPTS) if refresh_earnings else None,
            "sensors": read_gpu_sensors() if any(d.kind == "gpu" for d in node.devices) else [],
            "cpu_percent": _cpu_percent(),
        }


def _asset_route(name: str, content_type: str) -> Route:
    async def route(query: dict[str, str], body: Any) -> tuple[int, Any]:
        content = (resources.files(__package__) / "static" / name).read_bytes()
        return 200, TextBody(content, content_type, _PAGE_HEADERS)

    return route


def _cpu_percent() -> float | None:
    try:
        import psutil

        return float(psutil.cpu_percent(interval=None))
    except Exception:  # psutil missing or the platform refuses: the page shows "-"
        return None
