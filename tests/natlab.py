"""A real NAT for tests: ``bootstrap/nat-lab.sh`` driven from Python.

    from tests.natlab import nat_lab, skip_reason

    pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")

    with nat_lab(nat_b="symmetric") as lab:
        relay = subprocess.Popen(lab.exec_args("relay", [sys.executable, "server.py"]))
        lab.forward("b", 4001)               # 203.0.113.12:4001 -> 10.0.2.2:4001
        lab.firewall("relay", True)

Every lab gets its own short prefix (``nl<pid>x<n>``), so parallel runs never collide, and is
torn down at exit, failure included (``down`` also stops processes left in its namespaces). A
lab whose creating process died without tearing it down (SIGKILL) is removed by the next
``nat_lab()``. Nodes: ``relay`` (203.0.113.10), ``fw`` (203.0.113.20, firewall on), routers
``ra``/``rb`` (WAN 203.0.113.11/12) and private hosts ``a``/``b`` (10.0.1.2, 10.0.2.2).
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bootstrap" / "nat-lab.sh"
SYSTEM_PACKAGES = ROOT / ".ci" / "system-packages"

NatType = Literal["port-preserving", "symmetric"]
NODES = ("relay", "fw", "ra", "rb", "a", "b", "pub")
ADDRS = {
    "relay": "203.0.113.10",
    "fw": "203.0.113.20",
    "ra": "203.0.113.11",
    "rb": "203.0.113.12",
    "a": "10.0.1.2",
    "b": "10.0.2.2",
}
#: The WAN address each private host's traffic appears from (its router's).
WAN = {"a": ADDRS["ra"], "b": ADDRS["rb"]}

_PREFIX_RE = re.compile(r"^(nl(\d+)x\d+)-")
_counter = itertools.count()


def _env() -> dict[str, str]:
    """The environment with the sbin directories on PATH (ip and iptables live there)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([env.get("PATH", ""), "/usr/sbin", "/sbin"])
    return env


def _which(command: str) -> str | None:
    return shutil.which(command, path=_env()["PATH"])


def _script(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        stdin=subprocess.DEVNULL,
    )


@functools.cache
def skip_reason() -> str | None:
    """Why the NAT lab cannot run here (one line for ``pytest.skip``), or None when it can.

    Installs iptables and conntrack through ``.ci/system-packages`` when iptables is missing
    (it does so only as root with apt-get, and never fails).
    """
    if not sys.platform.startswith("linux"):
        return f"the NAT lab needs Linux network namespaces (this is {sys.platform})"
    if os.geteuid() != 0:
        return (
            f"the NAT lab needs root to create network namespaces (running as uid {os.geteuid()})"
        )
    if _which("ip") is None:
        return "the NAT lab needs ip (iproute2), which is not installed"
    if _which("iptables") is None and SYSTEM_PACKAGES.exists():
        subprocess.run(["bash", str(SYSTEM_PACKAGES)], env=_env(), capture_output=True, timeout=300)
    if _which("iptables") is None:
        return "the NAT lab needs iptables: not installed and apt-get could not install it"
    try:
        check = _script("check", timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"nat-lab.sh check did not run: {error}"
    if check.returncode != 0:
        line = (check.stdout.strip() or check.stderr.strip() or "failed").splitlines()[-1]
        return f"the NAT lab cannot run here: {line.removeprefix('nat-lab: ')}"
    return None


class NatLab:
    """One lab that is up; use it through :func:`nat_lab`."""

    def __init__(self, name: str, nat_a: NatType, nat_b: NatType) -> None:
        self.name = name
        self.nat_a = nat_a
        self.nat_b = nat_b
        self._ip = _which("ip") or "ip"

    def ns(self, node: str) -> str:
        """The namespace of ``node`` (relay, fw, ra, rb, a, b or pub)."""
        if node not in NODES:
            raise ValueError(f"node {node!r}: one of {', '.join(NODES)}")
        return f"{self.name}-{node}"

    def exec_args(self, node: str, argv: Sequence[str]) -> list[str]:
        """``argv`` as run inside ``node``'s namespace (for subprocess.run / Popen)."""
        return [self._ip, "netns", "exec", self.ns(node), *argv]

    def addr(self, node: str) -> str:
        """``node``'s IPv4 address; for a router (ra, rb), its WAN (public) address."""
        self.ns(node)
        if node not in ADDRS:
            raise ValueError(f"node {node!r} has no address")
        return ADDRS[node]

    def wan(self, side: str) -> str:
        """The public address private host ``side`` (a or b) appears from: its router's WAN."""
        return WAN[side]

    def run(
        self, node: str, argv: Sequence[str], *, timeout: float = 30, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in ``node`` and wait for it (text output captured)."""
        return subprocess.run(
            self.exec_args(node, argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            stdin=subprocess.DEVNULL,
        )

    def forward(self, side: str, port: int) -> None:
        """On ``side``'s router, forward TCP to its WAN address:port to the host's port."""
        self._do("forward", side, str(port))

    def unforward(self, side: str, port: int) -> None:
        """Remove a forward made by :meth:`forward`."""
        self._do("unforward", side, str(port))

    def firewall(self, node: str, on: bool) -> None:
        """Drop (on) or allow (off) unsolicited inbound on public host ``node`` (relay, fw)."""
        self._do("firewall", node, "on" if on else "off")

    def conntrack(self, side: str) -> str:
        """``side``'s router's conntrack table, as ``conntrack -L`` prints it."""
        return self._do("conntrack", side)

    def _do(self, *args: str) -> str:
        done = _script(args[0], "--name", self.name, *args[1:])
        if done.returncode != 0:
            raise RuntimeError(f"nat-lab.sh {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout


def _sweep_orphans() -> None:
    """Tear down test labs whose creating process is gone (a run killed before its ``down``)."""
    try:
        names = os.listdir("/run/netns")
    except OSError:
        return
    stale = set()
    for name in names:
        match = _PREFIX_RE.match(name)
        if match and not Path(f"/proc/{match.group(2)}").exists():
            stale.add(match.group(1))
    for prefix in stale:
        _script("down", "--name", prefix)


@contextmanager
def nat_lab(
    nat_a: NatType = "port-preserving", nat_b: NatType = "port-preserving"
) -> Iterator[NatLab]:
    """A fresh lab, up for the ``with`` block and deleted after it (even on failure)."""
    reason = skip_reason()
    if reason is not None:
        raise RuntimeError(reason)
    _sweep_orphans()
    name = f"nl{os.getpid()}x{next(_counter)}"
    try:
        up = _script("up", "--name", name, "--nat-a", nat_a, "--nat-b", nat_b)
        if up.returncode != 0:
            raise RuntimeError(f"nat-lab.sh up: {up.stderr.strip()}")
        yield NatLab(name, nat_a, nat_b)
    finally:
        down = _script("down", "--name", name)
        if down.returncode != 0:
            raise RuntimeError(f"nat-lab.sh down --name {name}: {down.stderr.strip()}")
