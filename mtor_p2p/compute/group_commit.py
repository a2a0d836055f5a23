"""Group commit: many writers' items in one transaction, each answered after its commit.

Used for receipts (:mod:`mtor_p2p.compute.receipt_store`) and for the ledger entries of
receipts (:class:`~mtor_p2p.ledger.service.LedgerService`): a burst of N shards settling costs
one or two ``synchronous=FULL`` commits instead of N, and nothing is acknowledged before it is
on disk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import trio

from mtor_p2p.runtime import BlockingRunner

T = TypeVar("T")
R = TypeVar("R")

#: Items written by one commit at most.
MAX_GROUP = 256


@dataclass
class _Queued(Generic[T]):
    item: T
    done: trio.Event = field(default_factory=trio.Event)
    result: Any = None
    error: BaseException | None = None


class GroupCommit(Generic[T, R]):
    """Write items in batches, one call of ``write_many`` (one transaction) per batch.

    ``write_many(items)`` runs through ``run_blocking`` (a thread in production, inline in a
    simulation) and returns one result per item, or an exception instance for an item that
    failed alone. :meth:`submit` returns an item's result once the batch holding it has been
    written (committed). One writer task per trio run (a system task, started by the first
    submit, so that no nursery needs to run it) takes whatever has queued up since its last
    write: under load batches grow by themselves, and an item arriving alone is written at
    once, without waiting for company.
    """

    def __init__(
        self,
        write_many: Callable[[list[T]], Sequence[R | BaseException]],
        run_blocking: BlockingRunner,
        *,
        max_batch: int = MAX_GROUP,
    ) -> None:
        self._write_many = write_many
        self._run_blocking = run_blocking
        self._max_batch = max_batch
        self._queue: list[_Queued[T]] = []
        self._wakeup: trio.Event | None = None
        self._token: Any = None
        #: Writes done and items written (the ratio is the mean batch size).
        self.batches = 0
        self.items = 0

    async def submit(self, item: T) -> R:
        """Queue ``item``; return its result once it is committed (or raise its error)."""
        self._start_writer()
        queued = _Queued(item)
        self._queue.append(queued)
        assert self._wakeup is not None
        self._wakeup.set()
        # Cancelled here, the item is still written: only its acknowledgement is lost.
        await queued.done.wait()
        if queued.error is not None:
            try:
                raise queued.error
            finally:  # raised, the error's traceback holds this frame: not the reverse
                queued = None  # type: ignore[assignment]
        return queued.result  # type: ignore[no-any-return]

    def _start_writer(self) -> None:
        token = trio.lowlevel.current_trio_token()
        if self._token is token:
            return
        # A new trio run (tests run several): the writer of the last one is gone.
        self._token = token
        self._queue = []
        self._wakeup = trio.Event()
        trio.lowlevel.spawn_system_task(self._writer, name="mtor-group-commit")

    async def _writer(self) -> None:
        while True:
            assert self._wakeup is not None
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                try:
                    results: Sequence[Any] = await self._run_blocking(
                        self._write_many, [q.item for q in batch]
                    )
                except Exception as exc:  # the whole batch failed (a full disk...)
                    results = [exc] * len(batch)
                self.batches += 1
                self.items += len(batch)
                for queued, result in zip(batch, results, strict=True):
                    if isinstance(result, BaseException):
                        queued.error = result
                    else:
                        queued.result = result
                    queued.done.set()
