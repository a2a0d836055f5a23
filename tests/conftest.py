"""Shared helpers: real py-libp2p hosts on loopback, and capacity records to feed them.

The peer's dependencies (py-libp2p, cryptography...) are imported only where they are
installed: a machine lent a GPU runs ``tests/gpu`` with nothing but NumPy, pytest and CuPy
(``benchmarks/gpu_check.sh``), and this file is loaded there too.
"""

from __future__ import annotations

import importlib.util
import logging
import traceback
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest

#: Whether the peer's network stack is installed (False on a bare GPU test machine).
HAVE_NETWORK_STACK = importlib.util.find_spec("libp2p") is not None

if HAVE_NETWORK_STACK:
    from mtor_p2p.capacity.record import CapacityRecord, Device
    from mtor_p2p.identity import Identity
    from mtor_p2p.libp2p_host import HostSettings, Libp2pNetwork

    CPU = Device(kind="cpu", name="test cpu", mem_total=16 << 30, mem_free=8 << 30, cores=4)
    GPU = Device(
        kind="gpu",
        name="Test GPU 24GB",
        mem_total=24 << 30,
        mem_free=20 << 30,
        utilization=5.0,
        compute_capability="8.9",
        driver="550.0",
    )

# py-libp2p logs every peer that goes away at ERROR; tests assert on behaviour, not on its logs.
logging.getLogger("libp2p").setLevel(logging.CRITICAL)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with a ``slow`` test first, then the others by their number of tests (most
    first); within a file, tests keep their order. ``./mtor test`` hands whole files to its
    workers in this order (``--dist loadfile --no-loadscope-reorder``; a worker whose file has
    two tests or fewer gets the next at once): xdist's own order, by number of tests, started
    ``test_nat_peers.py`` (two tests, about 100 s of waiting) last, and the suite's end waited
    on it alone. Every pytest run is ordered so (before ``-k``, ``-m`` and ``--deselect``
    take tests out; ``--lf`` and ``--ff`` order after it)."""
    files: dict[str, list[pytest.Item]] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::", 1)[0], []).append(item)

    def order(name: str) -> tuple[bool, int]:
        tests = files[name]
        return (not any(item.get_closest_marker("slow") for item in tests), -len(tests))

    items[:] = [item for name in sorted(files, key=order) for item in files[name]]


# mtor_p2p.runtime.leaf_exceptions does this too; kept here so that this file still loads on
# a GPU machine with only CuPy, NumPy and the kernels (no trio).
def _leaf_exceptions(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaf_exceptions(inner)]
    return [exc]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Name the leaf exceptions of a failure wrapped in exception groups.

    Trio wraps a test's exception in one group per nursery it passes through; a failure
    inside a few hosts is nested deeper than Python prints (ten levels), so the report
    ended in "..." and hid the assertion that failed (a test that failed only under load).
    """
    outcome = yield
    report = outcome.get_result()
    excinfo = call.excinfo
    if report.failed and excinfo is not None and isinstance(excinfo.value, BaseExceptionGroup):
        lines = []
        for leaf in _leaf_exceptions(excinfo.value):
            lines.append(f"{type(leaf).__name__}: {leaf}")
            lines.extend(
                "    " + line.rstrip() for line in traceback.format_tb(leaf.__traceback__)[-4:]
            )
        report.sections.append(("leaf exceptions", "\n".join(lines)))


def make_record(identity: Identity, *, now: float, **changes: object) -> CapacityRecord:
    """A valid record for ``identity`` issued at ``now``; ``changes`` override fields."""
    fields: dict[str, object] = {
        "peer_id": identity.peer_id,
        "addrs": (f"/ip4/127.0.0.1/tcp/4001/p2p/{identity.peer_id}",),
        "region": "WEU",
        "devices": (GPU,),
        "tflops": 30.0,
        "mem_free": 20 << 30,
        "load": 0.1,
        "price": 1.0,
        "seq": 1,
        "issued": now,
        "expires": now + 60,
    }
    fields.update(changes)
    return CapacityRecord(**fields)  # type: ignore[arg-type]


@asynccontextmanager
async def open_networks(count: int, **settings: object) -> AsyncIterator[list[Libp2pNetwork]]:
    """``count`` real hosts on loopback, each connected to the first."""
    async with AsyncExitStack() as stack:
        networks = [
            await stack.enter_async_context(
                Libp2pNetwork.open(Identity.generate(), HostSettings(**settings))  # type: ignore[arg-type]
            )
            for _ in range(count)
        ]
        for network in networks[1:]:
            # The set-up, not what a test checks: a loopback dial under a full suite's load
            # took over the adapter's default 5 s once (three workers on two cores).
            await network.connect(networks[0].addrs()[0], timeout=30)
        yield networks


@pytest.fixture
def identity() -> Identity:
    """A fresh identity."""
    return Identity.generate()
