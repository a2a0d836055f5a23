"""How peer logic touches the world outside the protocol: blocking work and randomness.

Services never call ``trio.to_thread``, ``os.urandom``, the ``random`` module or an unseeded
NumPy generator directly; they ask the :class:`Runtime` they were given. Production nodes get
:meth:`Runtime.production` (threads, OS entropy). The simulator and virtual-time tests get
:meth:`Runtime.simulated`: blocking work runs inline on the event loop, because a thread hop
lets ``trio.testing.MockClock`` jump ahead (0.3 s of thread work moved virtual time by 636 s in
a probe), and every random choice comes from one seeded generator, so the same seed gives the
same run.

Blocking work has two forms, both through the runtime: ``run_blocking`` (awaited: a thread in
production, inline in simulation) and ``beside`` (begun now, collected later with a blocking
``result()``: on a helper thread in production, inline in simulation), for short calls that
release the GIL (blake3, Ed25519) and that the event loop would otherwise make one after the
other while a core stands idle.
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import trio

T = TypeVar("T")

#: ``run_blocking(fn, *args, limiter=None, flops=0.0, cheap=False)``: run a blocking call,
#: return its result. ``flops`` estimates the host arithmetic the call does: production
#: ignores it; a simulation may charge the virtual time that work would take on the machine it
#: models. ``cheap``: the caller knows the call takes a few milliseconds at most; production
#: then runs it on the event loop (see :func:`_in_thread`), a simulation as any other.
BlockingRunner = Callable[..., Awaitable[Any]]


async def _in_thread(
    fn: Callable[..., T],
    *args: Any,
    limiter: trio.CapacityLimiter | None = None,
    flops: float = 0.0,
    cheap: bool = False,
) -> T:
    if cheap and limiter is None:
        # A thread costs more than such a call: the hop itself, and then the GIL, which a
        # busy event loop hands over only every sys.getswitchinterval() (5 ms). A 0.6 ms
        # Freivalds check of a 512³ shard took 1.5-2.3 ms on a thread inside a job.
        await trio.lowlevel.checkpoint()
        return fn(*args)
    return await trio.to_thread.run_sync(fn, *args, limiter=limiter)


async def _inline(
    fn: Callable[..., T],
    *args: Any,
    limiter: trio.CapacityLimiter | None = None,
    flops: float = 0.0,
    cheap: bool = False,
) -> T:
    if limiter is None:
        return fn(*args)
    async with limiter:
        return fn(*args)


#: A blocking call begun by :attr:`Runtime.beside`: its ``result()`` waits for it and gives its
#: value or raises its exception, ``done()`` says whether it has ended. The standard library's
#: future, whichever way the call is made.
Begun = concurrent.futures.Future


#: Helper threads of :func:`_begin_on_helper`: two, one per core of the machines this peer
#: was measured on; created with the first call.
HELPER_THREADS = 2
_helpers: concurrent.futures.ThreadPoolExecutor | None = None
_helpers_lock = threading.Lock()


#: How much nicer than the rest of its process a helper thread runs (Linux ``nice``).
HELPER_NICENESS = 10


def _yield_cores() -> None:
    """Run this helper thread at a lower priority than the event loops of this machine's
    peers: work begun beside a loop is meant for a core that would idle, and must not take
    one from a kernel or an event loop that has work (on Linux, a thread's nice value is
    its own; raising it needs no privilege). Where that cannot be done, it runs as is."""
    try:
        thread = threading.get_native_id()  # a new thread starts at its process's value
        nicer = min(19, os.getpriority(os.PRIO_PROCESS, thread) + HELPER_NICENESS)
        os.setpriority(os.PRIO_PROCESS, thread, nicer)
    except (AttributeError, OSError):
        pass


def _begin_on_helper(fn: Callable[..., T], *args: Any) -> Begun[T]:
    """Production's ``beside``: ``fn(*args)`` on a kept helper thread. Collecting it blocks
    the event loop without a wake-up through trio: a thread hop through ``trio.to_thread``
    and back cost more than a 1 MiB hash (BENCHMARKS.md), a blocking wait on a kept thread
    does not. Only for calls of a millisecond or so that release the GIL."""
    global _helpers
    if _helpers is None:
        with _helpers_lock:
            if _helpers is None:
                _helpers = concurrent.futures.ThreadPoolExecutor(
                    HELPER_THREADS, thread_name_prefix="mtor-beside", initializer=_yield_cores
                )
    return _helpers.submit(fn, *args)


def _forget_helpers() -> None:
    # A forked child has the parent's pool object but none of its threads: it makes its own.
    global _helpers
    _helpers = None


os.register_at_fork(after_in_child=_forget_helpers)


def _begin_inline(fn: Callable[..., T], *args: Any) -> Begun[T]:
    """Everywhere but production: the call made at once, inline, its outcome kept for
    ``result()`` (an exception too, raised where the caller collects it)."""
    begun: Begun[T] = Begun()
    try:
        begun.set_result(fn(*args))
    except Exception as exc:
        begun.set_exception(exc)
    return begun


#: ``beside(fn, *args)``: begin a short blocking call, returning a :class:`Begun` whose
#: ``result()`` gives its value (see the module docstring).
BesideRunner = Callable[..., Begun[Any]]


def _charged(host_flops: float, flops_scale: float, totals: dict[str, float]) -> BlockingRunner:
    async def run(
        fn: Callable[..., T],
        *args: Any,
        limiter: trio.CapacityLimiter | None = None,
        flops: float = 0.0,
        cheap: bool = False,
    ) -> T:
        result = await _inline(fn, *args, limiter=limiter)
        if flops:
            seconds = flops * flops_scale / host_flops
            totals["seconds"] += seconds
            totals["calls"] += 1
            await trio.sleep(seconds)
        return result

    return run


@dataclass
class Runtime:
    """Blocking work and randomness for one node.

    ``seeded`` is True when ``random`` is deterministic; security-relevant choices (Freivalds
    vectors, nonces) then come from it too, which is what a reproducible simulation wants and
    what a production node must never have.
    """

    run_blocking: BlockingRunner
    random: random.Random
    seeded: bool = False
    #: Host work charged so far (``seconds``, ``calls``) by a simulated runtime and its
    #: children; empty otherwise.
    host_work: dict[str, float] = field(default_factory=dict)
    #: Short blocking calls begun now and collected later (:class:`Begun`): on a helper
    #: thread in production, inline (at once, in order) everywhere else.
    beside: BesideRunner = _begin_inline

    @classmethod
    def production(cls) -> Runtime:
        """Threads for blocking work, the OS's entropy for every random choice."""
        return cls(
            run_blocking=_in_thread,
            random=random.SystemRandom(),
            seeded=False,
            beside=_begin_on_helper,
        )

    @classmethod
    def simulated(
        cls, seed: int | str | bytes, *, host_flops: float | None = None, flops_scale: float = 1.0
    ) -> Runtime:
        """Blocking work inline, randomness from ``seed``.

        Without ``host_flops`` blocking work takes no virtual time. With it, each call is
        charged ``flops x flops_scale / host_flops`` virtual seconds after it runs, so that
        host work on the critical path (a requester's verification) costs what it would on
        the machine modelled (``flops_scale``: how much larger the modelled work is).
        """
        totals = {"seconds": 0.0, "calls": 0.0}
        if host_flops is None:
            runner: BlockingRunner = _inline
        else:
            runner = _charged(host_flops, flops_scale, totals)
        return cls(run_blocking=runner, random=random.Random(seed), seeded=True, host_work=totals)

    def child(self, label: str) -> Runtime:
        """An independent runtime for one component, derived from this one's seed.

        Giving each node its own child keeps one node's extra random draws from shifting
        every other node's choices, so that a change in one place does not reshuffle a run.
        """
        if not self.seeded:
            return self
        return Runtime(
            run_blocking=self.run_blocking,
            random=random.Random(f"{self.random.getrandbits(64)}:{label}"),
            seeded=True,
            host_work=self.host_work,
            beside=self.beside,
        )

    def token_bytes(self, size: int) -> bytes:
        """``size`` random bytes (nonces)."""
        if not self.seeded:
            return os.urandom(size)
        return self.random.getrandbits(8 * size).to_bytes(size, "big")

    def token_hex(self, size: int) -> str:
        """``size`` random bytes as hex."""
        return self.token_bytes(size).hex()

    def numpy_rng(self) -> np.random.Generator:
        """A fresh NumPy generator: seeded from the OS's entropy in production, derived from
        the seed otherwise.

        A fresh one per use, because Generators are not thread-safe and blocking work may run
        on several threads at once. Each production generator takes its own entropy from the
        OS, so that none says anything of another: PCG64 is not a cryptographic generator,
        and a challenge sends a worker megabytes drawn from one, enough to recover its state.
        Two other forms were tried on 2026-12-06 and are not used:

        * children spawned off one OS-seeded ``SeedSequence`` (eac84c6): SeedSequence's
          mixing runs backwards, so one generator's state gave the root and every later
          check's vectors (a hostile review's attack, kept as a test in
          ``tests/test_runtime.py``);
        * seeds from a keyed hash of a counter (39642fc), safe, meant to spare the system
          call, which gives up the GIL: 176-273 µs of the event loop beside a thread busy in
          Python in a microbenchmark, but the same as the keyed hash inside a B-shared job
          (about 110-150 µs either way), and no gain in shards/s over 20 alternating pairs
          (BENCHMARKS.md).
        """
        if not self.seeded:
            return np.random.default_rng()
        return np.random.default_rng(self.random.getrandbits(64))


def leaf_exceptions(error: BaseException) -> list[BaseException]:
    """The exceptions inside ``error``'s groups, in order (``error`` itself if it is none):
    trio's nurseries wrap what crosses them in one group each."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaf_exceptions(inner)]
    return [error]
