"""Real py-libp2p hosts with NAT traversal, on loopback, for the NAT tests
(tests/test_nat_traversal.py, tests/test_nat_attacks.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

import trio

from mtor_p2p.identity import Identity
from mtor_p2p.libp2p_host import HostSettings, Libp2pNetwork
from mtor_p2p.libp2p_nat import NatSettings


def nat_settings(**overrides: object) -> NatSettings:
    """Checks and keepers slowed down: each test drives what it looks at."""
    base: dict[str, object] = {
        "reachability_interval": 3600.0,
        "reachability_retry": 3600.0,
        "relays_wanted": 0,
        # Loopback stands for a network here (production nodes treat it as "local").
        "loopback": True,
    }
    base.update(overrides)
    return NatSettings(**base)  # type: ignore[arg-type]


def host(listen: str = "/ip4/127.0.0.1/tcp/0", **nat: object) -> Any:
    """``Libp2pNetwork.open`` of a fresh identity listening on ``listen`` ("" for none)."""
    settings = HostSettings(listen_addrs=[listen] if listen else [], nat=nat_settings(**nat))
    return Libp2pNetwork.open(Identity.generate(), settings)


def drive_keeper(node: Any, bootstrap: list[str], **settings: float) -> None:
    """Set ``node`` (opened by :func:`host`, relays_wanted 0: no relay keeper of its own runs)
    up for a test that drives its keeper: one relay wanted, ``bootstrap`` as its bootstrap
    peers, and any other :class:`NatSettings` given."""
    node.nat.settings = dataclasses.replace(node.nat.settings, relays_wanted=1, **settings)
    node.nat._bootstrap_peers = lambda: list(bootstrap)


def relays_in_the_dht(node: Any, found: list[str] | None = None) -> list[str]:
    """Make ``node``'s DHT lookups of relays answer ``found`` (none) at once; the list of the
    keys looked up, which grows with each lookup."""
    asked: list[str] = []

    async def lookup(key: str, timeout: float = 5.0) -> list[str]:
        asked.append(key)
        return list(found or [])

    node.find_providers = lookup
    return asked


async def echo(sender: str, payload: bytes) -> bytes:
    return payload


async def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.05)
