"""Talking to a running node's control API: what the command line needs, and nothing of
the server (:mod:`mtor_p2p.control`), so that ``mtor-peer status`` and ``--help`` do not load
an HTTP server, trio and Starlette first (the server's imports were 0.25 s of every CLI
call's 0.55 s on the project's VM)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOKEN_FILE_NAME = "control.token"
INFO_FILE_NAME = "control.json"

__all__ = ["INFO_FILE_NAME", "TOKEN_FILE_NAME", "ControlClient", "ControlError", "NodeNotRunning"]


class NodeNotRunning(Exception):
    """No node answers on the data directory's control API."""


class ControlError(Exception):
    """The node answered the control request with an error: ``str()`` is ``"CODE: reason"``;
    ``status`` the HTTP status and ``reason`` the node's message alone."""

    def __init__(self, message: str, status: int | None = None, reason: str | None = None):
        super().__init__(message)
        self.status = status
        self.reason = message if reason is None else reason


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
            url = info["url"]
            if not isinstance(url, str):
                raise ValueError("url is not a string")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # A damaged info file is no running node either (the CLI falls back to the files).
            raise NodeNotRunning(f"no running node found in {data_dir}") from exc
        return cls(url=url, token=token, timeout=timeout)

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
            raise ControlError(f"{exc.code}: {reason}", exc.code, str(reason)) from exc
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            raise NodeNotRunning(f"the node at {self.url} does not answer: {exc}") from exc
