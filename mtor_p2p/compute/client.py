"""The requester's side of the compute protocols: one worker, one operation at a time.

The scheduler composes these: make sure a worker holds the operands (uploading in chunks only
what it lacks), run a shard, fetch its output, send the countersigned receipt.

Every reply is decoded inside one peer-fault boundary (:func:`peer_fault_boundary`): whatever
is wrong with it (bytes that do not unpack, a header that is not an object, a field missing or
of the wrong type, a receipt that does not verify or is for another shard, an output of the
wrong dtype or shape or whose bytes do not match its hash) leaves these functions as
:class:`WorkerMisbehaved` naming the worker, never as another exception. Network failures stay
:class:`NetworkError`, refusals :class:`RemoteError`.
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import trio

from mtor_kernels import get_kernel
from mtor_p2p.compute import local_share
from mtor_p2p.compute.protocol import (
    CHUNK_BYTES,
    MAX_ARRAY_BYTES,
    MAX_COUNTERSIGN_BATCH,
    MAX_COUNTERSIGN_BATCH_BYTES,
    MAX_MESSAGE_BYTES,
    PROTOCOL_COUNTERSIGN,
    PROTOCOL_DOWNLOAD,
    PROTOCOL_DOWNLOAD_LOCAL,
    PROTOCOL_HAS,
    PROTOCOL_RUN,
    PROTOCOL_UPLOAD,
    PROTOCOL_UPLOAD_LOCAL,
)
from mtor_p2p.ledger.names import LEDGER_RULES
from mtor_p2p.network import Network, NetworkError, PeerMisbehaved, RemoteError
from mtor_p2p.records.arrays import (
    HASH_OFF_LOOP_BYTES,
    ArrayMeta,
    array_from_bytes,
    array_from_hashed_bytes,
    array_view_unhashed,
    as_bytes,
    check_hash,
    meta_of,
    pack,
    pack_gathered,
    unpack,
    unpack_view,
)
from mtor_p2p.records.receipts import Receipt, decode_receipt, parse_receipt, verify_receipt
from mtor_p2p.runtime import BesideRunner, BlockingRunner

log = logging.getLogger(__name__)

#: A reason longer than this is cut (it may quote what the peer sent).
MAX_REASON_CHARS = 300
#: Chunk requests of one download in flight at once.
DOWNLOAD_CHUNKS_IN_FLIGHT = 4
#: Chunks of one upload in flight at once, at most (the worker's ``window`` may say fewer).
UPLOAD_CHUNKS_IN_FLIGHT = 2


class WorkerMisbehaved(PeerMisbehaved):
    """The worker answered with something malformed or inconsistent (not just an error): the
    compute protocols' :class:`~mtor_p2p.network.PeerMisbehaved`."""


@contextmanager
def peer_fault_boundary(peer: str, what: str) -> Iterator[None]:
    """Decode a reply of ``peer`` inside this block: any exception raised in it becomes a
    :class:`WorkerMisbehaved` naming ``peer`` and saying what was wrong with ``what``.

    Only decoding belongs inside, never a request: a :class:`NetworkError` or
    :class:`RemoteError` passes through unchanged, and cancellation is not an exception here.
    """
    try:
        yield
    except (NetworkError, RemoteError):
        raise
    except PeerMisbehaved as exc:
        if exc.peer == peer:
            raise
        raise WorkerMisbehaved(f"{what}: {exc.reason}"[:MAX_REASON_CHARS], peer=peer) from exc
    except Exception as exc:
        # Anything else (RecordError, KeyError, TypeError, binascii.Error, MemoryError...) is
        # the reply's fault: nothing but the reply is decoded in here.
        reason = f"{what}: {type(exc).__name__}: {exc}"[:MAX_REASON_CHARS]
        raise WorkerMisbehaved(reason, peer=peer) from exc


def _field(header: dict[str, Any], name: str, kind: type) -> Any:
    """``header[name]`` if it is a ``kind`` (a bool is not an int), else WorkerMisbehaved."""
    value = header.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise WorkerMisbehaved(f"field {name!r} missing or not a {kind.__name__}")
    return value


@dataclass(frozen=True)
class ShardAnswer:
    """A worker's answer to a run request: its output and the receipt it signed.

    From ``run_shard(defer_verification=True)``, ``pending`` holds the answer's checks not yet
    made (the output's hash when it came in the answer, the receipt's signature): until
    :meth:`verify` has passed, neither is the worker's word."""

    output: np.ndarray
    receipt: Receipt
    pending: Callable[[], None] | None = None
    #: Whether ``pending``'s checks were begun beside the caller (``run_shard(beside=...)``)
    #: and are under way on another thread.
    begun: bool = False

    def verify(self) -> None:
        """Make the checks left pending, if any (a blocking call; fit for a thread): raises
        RecordError when the output is not the one the receipt names, or the receipt's
        signature does not hold."""
        if self.pending is not None:
            self.pending()


def _verify_later(meta: ArrayMeta, output: np.ndarray | None, receipt: Receipt) -> None:
    # What run_shard(defer_verification=True) leaves for the caller's thread.
    if output is not None:
        check_hash(meta, output)
    verify_receipt(receipt, require_complete=False)


async def missing_operands(
    network: Network, worker: str, metas: list[ArrayMeta], *, timeout: float
) -> list[ArrayMeta]:
    """Which of ``metas`` the worker does not hold."""
    reply = await network.request(
        worker, PROTOCOL_HAS, pack({"hashes": [m.digest for m in metas]}), timeout=timeout
    )
    with peer_fault_boundary(worker, "has reply"):
        header, _ = unpack(reply)
        have = _field(header, "have", list)
        if not all(isinstance(digest, str) for digest in have):
            raise WorkerMisbehaved("'have' lists something other than hashes")
    held = set(have)
    return [m for m in metas if m.digest not in held]


async def upload(
    network: Network,
    worker: str,
    array: np.ndarray,
    *,
    timeout: float,
    meta: ArrayMeta | None = None,
    local: local_share.LocalShares | None = None,
    holder: str = "",
) -> None:
    """Send ``array`` to ``worker`` in chunks of at most CHUNK_BYTES (``meta``: its
    description, if the caller already hashed it).

    With ``local`` (the requester's sealed copies), a large operand goes to a worker on this
    machine through shared memory instead, for job ``holder`` (see
    :mod:`mtor_p2p.compute.local_share`); when the worker cannot take it that way, in chunks.

    The first chunk goes alone; its reply says how many chunks the worker takes in flight
    (``window``; a worker from before windows says nothing, and gets one at a time). Up to
    the smaller of that and UPLOAD_CHUNKS_IN_FLIGHT then travel at once, each handed to the
    transport before the next is sent, so that they reach a lane in order (a worker holds a
    chunk that overtook another on its own stream until its turn)."""
    meta = meta if meta is not None else meta_of(array)
    if local is not None and await _upload_shared(
        network, worker, array, meta, timeout=timeout, local=local, holder=holder
    ):
        return
    data = memoryview(np.ascontiguousarray(array)).cast("B")
    first = data[:CHUNK_BYTES]
    reply = await _send_chunk(network, worker, meta, 0, first, timeout=timeout)
    complete, window = _chunk_reply(worker, reply, meta, len(first))
    if complete:
        return
    done = False
    failure: list[BaseException] = []
    # A slot comes back when its chunk's reply is in: with one slot, one chunk at a time.
    slots = trio.Semaphore(max(1, min(window, UPLOAD_CHUNKS_IN_FLIGHT)))

    async def send(offset: int, handed: trio.Event, nursery: trio.Nursery) -> None:
        nonlocal done
        chunk = data[offset : offset + CHUNK_BYTES]
        try:
            try:
                reply = await _send_chunk(
                    network, worker, meta, offset, chunk, timeout=timeout, sent=handed
                )
            finally:
                handed.set()  # failed before it was handed over: the next need not wait
                slots.release()
            if _chunk_reply(worker, reply, meta, offset + len(chunk))[0]:
                done = True
                nursery.cancel_scope.cancel()  # the worker has it all: stop sending
        except Exception as exc:
            # The first failure is the upload's (raised as itself, not in a group); the other
            # chunks stop.
            if not failure:
                failure.append(exc)
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        for offset in range(len(first), meta.nbytes, CHUNK_BYTES):
            await slots.acquire()
            handed = trio.Event()
            nursery.start_soon(send, offset, handed, nursery)
            await handed.wait()
    if done:
        return  # the worker has it all, whatever happened to a reply before the last
    if failure:
        try:
            raise failure[0]
        finally:  # the list is in the error's frames: emptied, it no longer holds the error
            failure.clear()
    raise WorkerMisbehaved("worker lost track of the upload", peer=worker)


async def _upload_shared(
    network: Network,
    worker: str,
    array: np.ndarray,
    meta: ArrayMeta,
    *,
    timeout: float,
    local: local_share.LocalShares,
    holder: str,
) -> bool:
    """Hand ``array`` to ``worker`` through shared memory if both are on this machine;
    whether it now holds it (False: upload it in chunks)."""
    same_host = getattr(network, "same_host", None)  # an adapter's PeerLinks, if it has it
    if not local.wanted(worker, meta) or same_host is None or not same_host(worker):
        return False
    fd = await local.descriptor(meta, array, holder)
    if fd is None:
        return False
    request = {
        "array": meta.to_json(),
        "host": local_share.host_token(network.peer_id, worker),
        "pid": os.getpid(),
        "fd": fd,
    }
    reply = await _ask_same_machine(
        network,
        worker,
        PROTOCOL_UPLOAD_LOCAL,
        request,
        timeout=timeout,
        refuse=local.refuse,
        declined="took no shared operand (%s): uploading it",
    )
    if reply is None:
        return False
    with peer_fault_boundary(worker, "shared upload reply"):
        header, _ = unpack(reply)
        if not _field(header, "complete", bool):
            raise WorkerMisbehaved("a shared operand's reply is not complete")
    local.note_handed(holder, meta.nbytes)
    return True


async def _ask_same_machine(
    network: Network,
    worker: str,
    protocol: str,
    request: dict[str, Any],
    *,
    timeout: float,
    refuse: Callable[..., None],
    declined: str,
) -> bytes | None:
    """Ask ``worker`` over one of the shared-memory protocols; None when the way is not
    taken, and the caller falls back to chunks. ``refuse(worker, for_good=...)`` records why:
    "not local" for good; a network failure (a worker from before the protocol does not serve
    it; a broken connection fails the chunks that follow, too) for a while; anything else
    ("busy", a refusal of this array) is for this time only. ``declined``: the debug log's
    words, with the error."""
    try:
        return await network.request(worker, protocol, pack(request), timeout=timeout)
    except RemoteError as exc:
        if str(exc).startswith(local_share.NOT_LOCAL):
            refuse(worker, for_good=True)
        log.debug("worker %s " + declined, worker, exc)
    except NetworkError as exc:
        refuse(worker, for_good=False)
        log.debug("worker %s " + declined, worker, exc)
    return None


async def _send_chunk(
    network: Network,
    worker: str,
    meta: ArrayMeta,
    offset: int,
    chunk: memoryview,
    *,
    timeout: float,
    sent: trio.Event | None = None,
) -> bytes:
    # The chunk is a view of the operand, sealed from where it lies.
    return await network.request(
        worker,
        PROTOCOL_UPLOAD,
        pack_gathered({"array": meta.to_json(), "offset": offset}, [chunk]),
        timeout=timeout,
        sent=sent,
    )


def _chunk_reply(worker: str, reply: bytes, meta: ArrayMeta, end: int) -> tuple[bool, int]:
    """Whether the upload is complete, and the worker's window, from its reply to the chunk
    that ends at ``end``."""
    with peer_fault_boundary(worker, "upload reply"):
        header, _ = unpack(reply)
        if _field(header, "complete", bool):
            return True, 1
        received = _field(header, "received", int)
        if end >= meta.nbytes or received != end:
            raise WorkerMisbehaved("worker lost track of the upload")
        window = header.get("window", 1)
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise WorkerMisbehaved("field 'window' is not a positive integer")
        return False, window


async def ensure_operands(
    network: Network,
    worker: str,
    operands: dict[str, np.ndarray],
    *,
    timeout: float,
    in_flight: dict[tuple[str, str], trio.Event] | None = None,
    metas: dict[str, ArrayMeta] | None = None,
    unheld: Collection[str] = (),
    local: local_share.LocalShares | None = None,
    holder: str = "",
) -> int:
    """Upload every operand the worker lacks; return how many bytes were sent.

    ``unheld`` names operands the caller knows the worker does not hold (a shard's slice: a
    worker drops those after running them): they are uploaded without asking first, beside
    the question about the others, which saves that round trip when the rest is resident (a
    worker that holds one anyway answers the upload's first chunk "complete").

    ``in_flight`` (shared by concurrent callers) makes a second caller wait for an upload of
    the same operand to the same worker instead of interleaving its chunks with the first.
    ``metas`` are the operands' descriptions if the caller already hashed them (each operand
    is hashed once per requester: the scheduler passes them to every call that needs them).
    ``local`` and ``holder``: as for :func:`upload`.
    """
    metas = metas if metas is not None else {name: meta_of(a) for name, a in operands.items()}
    by_digest = {metas[name].digest: operands[name] for name in operands}
    in_flight = {} if in_flight is None else in_flight
    sent = 0

    async def send(meta: ArrayMeta) -> None:
        nonlocal sent
        key = (worker, meta.digest)
        if key in in_flight:
            # If that upload fails, the run request reports the operand missing and the
            # shard is retried: no need to second-guess it here.
            await in_flight[key].wait()
            return
        finished = in_flight[key] = trio.Event()
        try:
            await upload(
                network,
                worker,
                by_digest[meta.digest],
                timeout=timeout,
                meta=meta,
                local=local,
                holder=holder,
            )
        finally:
            finished.set()
            del in_flight[key]
        sent += meta.nbytes

    async def ask_then_send() -> None:
        asked = [metas[name] for name in operands if name not in unheld]
        if asked:
            for meta in await missing_operands(network, worker, asked, timeout=timeout):
                nursery.start_soon(send_or_stop, meta)

    # The operands travel side by side (requests to one peer share its connection): the
    # worker hashes one while the next arrives; those in ``unheld`` go at once, beside the
    # question about the others. The first failure ends the rest and is raised as itself,
    # not as an exception group.
    failures: list[Exception] = []

    async def send_or_stop(meta: ArrayMeta) -> None:
        try:
            await send(meta)
        except Exception as exc:
            failures.append(exc)
            nursery.cancel_scope.cancel()

    async def ask_or_stop() -> None:
        try:
            await ask_then_send()
        except Exception as exc:
            failures.append(exc)
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        for name in operands:
            if name in unheld:
                nursery.start_soon(send_or_stop, metas[name])
        nursery.start_soon(ask_or_stop)
    if failures:
        try:
            raise failures[0]
        finally:  # the list is in the error's frames: emptied, it no longer holds the error
            failures.clear()
    return sent


#: How a worker's refusal to run a shard whose operands it lacks starts.
MISSING_OPERANDS = "missing operands: "
#: How every host refuses a request over a protocol's size limit (before reading it).
REQUEST_TOO_LARGE = "request too large"


def missing_in(exc: BaseException) -> list[str]:
    """The operand hashes a run refusal says the worker lacks ([] for any other error)."""
    text = str(exc)
    if not isinstance(exc, RemoteError) or not text.startswith(MISSING_OPERANDS):
        return []
    return [d for d in text[len(MISSING_OPERANDS) :].split(",") if d]


async def download(
    network: Network,
    worker: str,
    meta: ArrayMeta,
    *,
    timeout: float,
    out: np.ndarray | None = None,
    run_blocking: BlockingRunner | None = None,
    local: local_share.LocalShares | None = None,
    in_place: bool = False,
    holder: str = "",
    on_mapped: Callable[[], None] | None = None,
) -> np.ndarray:
    """Fetch an array by hash in chunks, :data:`DOWNLOAD_CHUNKS_IN_FLIGHT` at a time (on a
    lane they share one connection; each lands in place in the result); every chunk must be
    exactly what was asked for, and the whole must match ``meta`` (size and hash).

    With ``local`` (the requester's shared memory) and ``run_blocking``, an output of a
    worker on this machine is taken from the worker's sealed copy instead, when the worker
    offers one (:func:`_download_shared`); the hash is checked all the same. ``in_place``:
    ``out`` is memory the caller owns as a private mapping, which that copy may be mapped
    over (see :func:`local_share.take_shared_output`). ``holder``: the job it counts for
    (:meth:`local_share.LocalShares.taken`). ``on_mapped``: called once a copy mapped over
    ``out`` has passed its hash check (the caller then owes :func:`local_share.fresh_pages`
    before it writes those rows again).

    ``out``: a C-contiguous array of ``meta``'s size to fetch into (the caller's place for
    it, such as a job's output rows), returned as a view; else a new buffer is allocated.
    Until the hash matches, its contents are the worker's claim only.
    ``run_blocking``: the caller's runtime hook; an array of at least
    :data:`HASH_OFF_LOOP_BYTES` is then hashed through it (a thread in production) rather
    than on the event loop (a 32 MiB output: ~10 ms during which no other transfer moves)."""
    if out is not None and (not out.flags.c_contiguous or out.nbytes != meta.nbytes):
        raise ValueError("out must be C-contiguous and of the downloaded array's size")
    if local is not None and run_blocking is not None:
        shared = await _download_shared(
            network,
            worker,
            meta,
            timeout=timeout,
            out=out,
            in_place=in_place,
            local=local,
            run_blocking=run_blocking,
            holder=holder,
            on_mapped=on_mapped,
        )
        if shared is not None:
            return shared
    if out is None:
        target: bytearray | memoryview = bytearray(meta.nbytes)
    else:
        target = memoryview(out).cast("B")
    view = memoryview(target)
    failure: list[BaseException] = []
    limiter = trio.CapacityLimiter(DOWNLOAD_CHUNKS_IN_FLIGHT)

    async def fetch(offset: int, nursery: trio.Nursery) -> None:
        length = min(CHUNK_BYTES, meta.nbytes - offset)
        try:
            async with limiter:
                reply = await network.request(
                    worker,
                    PROTOCOL_DOWNLOAD,
                    pack({"hash": meta.digest, "offset": offset, "length": length}),
                    timeout=timeout,
                    max_response_bytes=MAX_MESSAGE_BYTES,
                )
            with peer_fault_boundary(worker, "download reply"):
                header, body = unpack_view(reply)  # copied once, into place below
                total = _field(header, "total", int)
                if total != meta.nbytes:
                    raise WorkerMisbehaved(f"its array has {total} bytes, {meta.nbytes} expected")
                if not body:
                    raise WorkerMisbehaved("worker sent an empty chunk")
                if len(body) != length:
                    # The worker slices exactly what is asked; anything else is padding or a
                    # trickle of tiny chunks.
                    raise WorkerMisbehaved(f"chunk of {len(body)} bytes, {length} asked for")
            view[offset : offset + length] = body
        except (NetworkError, RemoteError, PeerMisbehaved) as exc:
            # The first failure is the download's; the other chunks stop.
            if not failure:
                failure.append(exc)
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        for offset in range(0, meta.nbytes, CHUNK_BYTES):
            nursery.start_soon(fetch, offset, nursery)
    if failure:
        try:
            raise failure[0]
        finally:  # the list is in the error's frames: emptied, it no longer holds the error
            failure.clear()
    if run_blocking is not None and meta.nbytes >= HASH_OFF_LOOP_BYTES:
        # Shielded: every byte has arrived, so neither waiting for a thread nor our own hash
        # may count against the worker's deadline (a review found a full thread limiter made
        # an honest answer time out); bounded by the size of the output we asked for.
        with trio.CancelScope(shield=True):
            array, error = await run_blocking(_checked_array, meta, target)
    else:
        array, error = _checked_array(meta, target)
    # Only what the bytes themselves caused is the worker's fault: a thread that could not
    # start raises above, outside the boundary (a review found it blamed on the worker).
    with peer_fault_boundary(worker, "downloaded output"):
        if error is not None:
            try:
                raise error
            finally:  # raised, the error's traceback holds this frame: not the reverse
                error = None
        assert array is not None
        return array


async def _download_shared(
    network: Network,
    worker: str,
    meta: ArrayMeta,
    *,
    timeout: float,
    out: np.ndarray | None,
    in_place: bool,
    local: local_share.LocalShares,
    run_blocking: BlockingRunner,
    holder: str,
    on_mapped: Callable[[], None] | None,
) -> np.ndarray | None:
    """``worker``'s output ``meta`` taken from its sealed copy, if both are on this machine
    and it offers one; None when it cannot be had that way (then download it in chunks).

    Over a socket, a worker's 32 MiB output cost both peers its encryption, copies and the
    requester's fresh pages; from shared memory it costs the worker one copy into the sealed
    file and the requester a mapping (``BENCHMARKS.md``, issue 9). Anything the worker says
    that does not lead to its sealed copy of exactly those bytes is not used: a refusal or a
    copy that cannot be opened means chunks (this time, or from then on); a copy whose hash
    differs is the worker's fault, as a downloaded one would be."""
    same_host = getattr(network, "same_host", None)  # an adapter's PeerLinks, if it has it
    if not local.output_wanted(worker, meta) or same_host is None or not same_host(worker):
        return None
    request = {"hash": meta.digest, "host": local_share.host_token(network.peer_id, worker)}
    reply = await _ask_same_machine(
        network,
        worker,
        PROTOCOL_DOWNLOAD_LOCAL,
        request,
        timeout=timeout,
        refuse=local.refuse_outputs,
        declined="shared no output (%s): downloading it",
    )
    if reply is None:
        return None
    with peer_fault_boundary(worker, "shared download reply"):
        header, _ = unpack(reply)
        pid = _field(header, "pid", int)
        fd = _field(header, "fd", int)
    # Not cancelled half-way (a thread): no byte lands in ``out`` after this returns.
    try:
        target, digest, mapped = await run_blocking(
            local_share.take_shared_output, pid, fd, meta, worker, out, in_place
        )
    except local_share.LocalShareError as exc:
        # A copy that is not there or not sealed: chunks this time (the worker answers them,
        # or is judged on them), and for RETRY_OUTPUT_AFTER_S (an honest worker's store may
        # have dropped the output before we opened it); another user's process: for good.
        local.refuse_outputs(
            worker,
            for_good=isinstance(exc, local_share.NotLocal),
            retry_after=local_share.RETRY_OUTPUT_AFTER_S,
        )
        log.info("worker %s's shared output is unusable (%s): downloading it", worker, exc)
        return None
    with peer_fault_boundary(worker, "shared output"):
        array = array_from_hashed_bytes(meta, target, digest)
    if mapped and on_mapped is not None:
        on_mapped()
    if holder:
        local.note_taken(holder, meta.nbytes)
    return array


def _checked_array(
    meta: ArrayMeta, data: bytearray | memoryview
) -> tuple[np.ndarray | None, Exception | None]:
    """``array_from_bytes(meta, data)``, or the exception it raised (to be judged on the
    caller's side of the peer-fault boundary)."""
    try:
        return array_from_bytes(meta, data), None
    except Exception as exc:
        return None, exc


#: How far apart two peers' clocks may be before a receipt's times look wrong (seconds).
CLOCK_SKEW = 30.0


@dataclass(frozen=True)
class ShardTerms:
    """What a requester agreed to for one shard, checked in the worker's receipt."""

    requester: str
    max_price: float  # credits per TFLOP: the worker's advertised price when chosen
    flops: int
    sent_at: float  # network time when the run request left
    now: Callable[[], float]  # the requester's network clock

    def check(self, receipt: Receipt) -> None:
        """Raise WorkerMisbehaved unless the receipt keeps to these terms."""
        body = receipt.body
        if body.requester != self.requester:
            raise WorkerMisbehaved("receipt names another requester")
        if body.price > self.max_price * (1 + 1e-12):
            raise WorkerMisbehaved(f"receipt charges {body.price}, the quote was {self.max_price}")
        if body.flops != self.flops:
            raise WorkerMisbehaved(f"receipt claims {body.flops} FLOPs, the shard has {self.flops}")
        if body.started < self.sent_at - CLOCK_SKEW or body.ended > self.now() + CLOCK_SKEW:
            raise WorkerMisbehaved("receipt times lie outside the request")


async def run_shard(
    network: Network,
    worker: str,
    *,
    job_id: str,
    shard: int,
    kernel: str,
    operands: dict[str, np.ndarray],
    timeout: float,
    transfer_timeout: float,
    terms: ShardTerms | None = None,
    metas: dict[str, ArrayMeta] | None = None,
    wait_operands: bool = False,
    out: np.ndarray | None = None,
    inline: Collection[str] = (),
    keep: Collection[str] | None = None,
    sent: trio.Event | None = None,
    run_blocking: BlockingRunner | None = None,
    defer_verification: bool = False,
    beside: BesideRunner | None = None,
    network_id: str | None = None,
    local: local_share.LocalShares | None = None,
    in_place: bool = False,
    holder: str = "",
    on_mapped: Callable[[], None] | None = None,
) -> ShardAnswer:
    """Run one shard on ``worker`` (operands must already be there, or be named in
    ``inline``) and fetch its output.

    With ``terms``, the worker's signed receipt must keep to them (price, FLOPs, requester,
    times): the requester countersigns whatever it accepts here, so it checks first.
    ``metas``: the operands' descriptions, if the caller already hashed them.
    ``wait_operands``: the operands' uploads are under way beside this request; the worker
    waits for them (see ``WorkerService._await_operands``) instead of refusing at once.
    ``out``: where to download an output too large for the answer (see :func:`download`);
    an output that came in the answer is returned as a view of the answer instead.
    ``inline``: operands whose bytes travel in the request itself (at most
    ``INLINE_OPERAND_BYTES`` in all; see ``protocol.py``), for a worker that lacks them.
    ``keep``: of the carried operands, those the worker should keep for later shards (it
    keeps every carried weight or B when this is None, as workers did before ``keep``).
    ``sent``: set once the request (with any inline operands) is written in full.
    ``run_blocking``: the runtime hook a downloaded output is hashed through (see
    :func:`download`).
    ``defer_verification``: leave the hash of an output that came in the answer and the
    receipt's signature to :meth:`ShardAnswer.verify`, for the caller to run beside its own
    check of the output (the scheduler: on the check's thread, off the event loop). Every
    field of the receipt is still compared with the request here.
    ``beside``: with ``defer_verification``, begin those checks at once through this hook
    (``Runtime.beside``: a helper thread), so that they run while the caller goes on to its
    own check; :meth:`ShardAnswer.verify` then collects their outcome.
    ``network_id``: this requester's network (its genesis hash's first 16 hex digits), for
    the worker to refuse a requester of another network.
    ``local``, ``in_place``, ``holder``, ``on_mapped``: an output to download may come from
    the worker's shared memory (see :func:`download`).
    """
    # What an honest answer looks like is known before asking: the output's shape and dtype
    # follow from the kernel and the operands. A declared output of any other size is refused
    # before a byte of it is downloaded.
    spec = get_kernel(kernel)
    expected_shape = tuple(spec.output_shape(operands))
    expected_dtype = spec.output_dtype(operands)
    if metas is None:
        metas = {name: meta_of(array) for name, array in operands.items()}
    described = {name: metas[name].to_json() for name in operands}
    header: dict[str, Any] = {
        "job_id": job_id,
        "shard": shard,
        "kernel": kernel,
        "operands": described,
        "ledger_rules": LEDGER_RULES,
    }
    if network_id is not None:  # this requester's network (a worker refuses another's)
        header["network"] = network_id
    if terms is not None:
        header["max_price"] = terms.max_price
    if wait_operands:
        header["wait_operands"] = True
    carried = [name for name in operands if name in inline]
    if carried:
        header["inline"] = carried
        if keep is not None:
            header["keep"] = [name for name in carried if name in keep]
    request = pack_gathered(header, [as_bytes(operands[name]) for name in carried])
    reply = await network.request(
        worker,
        PROTOCOL_RUN,
        request,
        timeout=timeout,
        max_response_bytes=MAX_MESSAGE_BYTES,
        sent=sent,
    )
    with peer_fault_boundary(worker, "run answer"):
        answer, body = unpack_view(reply)
        meta = ArrayMeta.from_json(answer.get("output"), max_bytes=MAX_ARRAY_BYTES)
        encoded = base64.b64decode(_field(answer, "receipt", str), validate=True)
        if defer_verification:
            receipt = parse_receipt(encoded)
        else:
            receipt = decode_receipt(encoded, require_complete=False)
        if receipt.body.worker != worker or receipt.body.output != meta.digest:
            raise WorkerMisbehaved("receipt does not match the worker or its output")
        if (
            receipt.body.job_id != job_id
            or receipt.body.shard != shard
            or receipt.body.kernel != kernel
        ):
            raise WorkerMisbehaved("receipt is for another shard")
        if receipt.body.inputs != {name: d["hash"] for name, d in described.items()}:
            raise WorkerMisbehaved("receipt names other inputs")
        if meta.dtype != expected_dtype.name:
            raise WorkerMisbehaved(f"output dtype {meta.dtype}, expected {expected_dtype.name}")
        if meta.shape != expected_shape:
            raise WorkerMisbehaved(f"output shape {meta.shape}, expected {expected_shape}")
        if terms is not None:
            terms.check(receipt)
        output = None
        if body and defer_verification:
            output = array_view_unhashed(meta, body)
        elif body:
            output = array_from_bytes(meta, body)
    inline_output = output is not None
    if output is None:
        output = await download(
            network,
            worker,
            meta,
            timeout=transfer_timeout,
            out=out,
            run_blocking=run_blocking,
            local=local,
            in_place=in_place,
            holder=holder,
            on_mapped=on_mapped,
        )
    if not defer_verification:
        return ShardAnswer(output, receipt)
    # A downloaded output is hashed by download(); one in the answer, not yet.
    unhashed = output if inline_output else None
    if beside is not None:
        checks = beside(_verify_later, meta, unhashed, receipt)
        return ShardAnswer(output, receipt, checks.result, begun=True)
    return ShardAnswer(output, receipt, lambda: _verify_later(meta, unhashed, receipt))


async def send_countersigned(
    network: Network, worker: str, receipt: Receipt, *, timeout: float
) -> bool:
    """Give the worker its countersigned receipt; False if it could not be delivered, or if
    the worker's acknowledgement is malformed.

    A malformed acknowledgement is logged, not raised: the receipt is already countersigned
    and kept here, so nothing is lost, and the caller (the scheduler's courier, in the node's
    nursery) must not be stopped by a hostile worker. A refusal is still RemoteError.
    """
    stored = await deliver_countersigned(network, worker, [receipt], timeout=timeout, batch=False)
    return bool(stored and stored[0])


async def send_countersigned_batch(
    network: Network, worker: str, receipts: list[Receipt], *, timeout: float
) -> list[bool]:
    """Give the worker several countersigned receipts in one request (see
    :func:`countersign_batches` and ``protocol.py``): whether each was stored, all False if
    they could not be delivered or the acknowledgement is malformed (logged, as in
    :func:`send_countersigned`). RemoteError when the worker refuses, as one before batches
    does (:data:`OLD_COUNTERSIGN_REFUSAL`)."""
    stored = await deliver_countersigned(network, worker, receipts, timeout=timeout, batch=True)
    return stored if stored is not None else [False] * len(receipts)


def countersign_batches(receipts: list[Receipt]) -> Iterator[list[Receipt]]:
    """``receipts`` in batches a worker takes in one countersign request: at most
    MAX_COUNTERSIGN_BATCH receipts and MAX_COUNTERSIGN_BATCH_BYTES of them each."""
    batch: list[Receipt] = []
    size = 0
    for receipt in receipts:
        length = len(receipt.encode())
        if batch and (
            len(batch) == MAX_COUNTERSIGN_BATCH or size + length > MAX_COUNTERSIGN_BATCH_BYTES
        ):
            yield batch
            batch, size = [], 0
        batch.append(receipt)
        size += length
    if batch:
        yield batch


async def deliver_countersigned(
    network: Network, worker: str, receipts: list[Receipt], *, timeout: float, batch: bool
) -> list[bool] | None:
    """One countersign request: the single form for one receipt (``batch`` False), else the
    batch form; whether each receipt was stored (all False for a malformed acknowledgement,
    logged), None if the worker could not be reached. RemoteError when it refuses."""
    if batch:
        if not 0 < len(receipts) <= MAX_COUNTERSIGN_BATCH:
            raise ValueError(f"a batch has 1-{MAX_COUNTERSIGN_BATCH} receipts")
        encoded = [receipt.encode() for receipt in receipts]
        payload = pack({"receipts": [len(data) for data in encoded]}, b"".join(encoded))
    else:
        if len(receipts) != 1:
            raise ValueError("the single form carries one receipt")
        encoded_one = base64.b64encode(receipts[0].encode()).decode("ascii")
        payload = pack({"receipt": encoded_one})
    try:
        reply = await network.request(worker, PROTOCOL_COUNTERSIGN, payload, timeout=timeout)
    except NetworkError:
        return None
    try:
        with peer_fault_boundary(worker, "countersign reply"):
            header, _ = unpack(reply)
            stored = header.get("stored", True)
            flags = stored if batch else [stored]
            if (
                not isinstance(flags, list)
                or len(flags) != len(receipts)
                or not all(isinstance(flag, bool) for flag in flags)
            ):
                raise WorkerMisbehaved("field 'stored' is not one bool per receipt")
    except PeerMisbehaved as exc:
        log.info("%s", exc)
        return [False] * len(receipts)
    return flags
