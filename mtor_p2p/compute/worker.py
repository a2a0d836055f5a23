"""The worker side of compute: receive operands, run kernel shards, sign what it returns.

Everything a remote peer sends is checked before use: header shapes and sizes, dtypes, the
blake3 hash of every uploaded operand, the kernel's own operand checks. A bad request costs its
sender a one-line :class:`RemoteError`; the worker keeps serving.

What a requester could take without paying is bounded too (issue 8):

* **Price floor.** A run request quotes ``max_price``; the worker refuses a quote below the
  lowest price it has itself asked in the last :data:`PRICE_MEMORY_SECONDS` (less a rounding
  tolerance). Honouring a *recent* price, not only the current one, is deliberate: the
  requester quotes the price it read in our capacity record, which may be one price step old,
  and keeps that quote for a whole job. A shard that costs 0 nano-credits at the agreed price
  counts as one nano-credit against the requester (credit check, unpaid bound), so that a
  requester without credit gets no work for free, while paying requesters still get small
  shards (an inference step can cost less than a nano-credit at market prices).
* **Unpaid work.** Work done but never countersigned is owed for :data:`OWED_MEMORY_SECONDS`,
  then remembered as unpaid per requester (for :data:`UNPAID_MEMORY_SECONDS`, in a table of
  bounded size); a requester past the bound is refused until it countersigns.
* **Uploads.** The size an upload announces is reserved when it starts, per sender and in
  total, and released when it completes, fails or sits idle for :data:`UPLOAD_IDLE_TIMEOUT`
  (on the worker's own timer, :meth:`WorkerService.run`).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import mmap
import os
import re
import tempfile
import threading
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio

from mtor_kernels import KERNELS, KernelError, get_kernel
from mtor_kernels.backend import Backend
from mtor_p2p.clock import NetClock
from mtor_p2p.compute import local_share
from mtor_p2p.compute.executor import BackendExecutor, ShardExecutor
from mtor_p2p.compute.protocol import (
    CHUNK_BYTES,
    INLINE_OPERAND_BYTES,
    INLINE_REFUSED,
    MAX_ARRAY_BYTES,
    MAX_COUNTERSIGN_BATCH,
    MAX_MESSAGE_BYTES,
    MAX_PENDING_UPLOAD_BYTES,
    MAX_PENDING_UPLOAD_BYTES_PER_PEER,
    MAX_RUN_REQUEST_BYTES,
    MAX_UPLOAD_MEMORY_BYTES,
    PROTOCOL_COUNTERSIGN,
    PROTOCOL_DOWNLOAD,
    PROTOCOL_DOWNLOAD_LOCAL,
    PROTOCOL_HAS,
    PROTOCOL_RUN,
    PROTOCOL_UPLOAD,
    PROTOCOL_UPLOAD_LOCAL,
)
from mtor_p2p.compute.receipt_store import ReceiptStore
from mtor_p2p.identity import Identity
from mtor_p2p.ledger.genesis import NANO
from mtor_p2p.ledger.names import LEDGER_RULES
from mtor_p2p.metrics import EventWindow, LatencyBuckets
from mtor_p2p.network import Network, Payload, RemoteError
from mtor_p2p.records.arrays import (
    BODY_ALIGNMENT,
    HASH_OFF_LOOP_BYTES,
    ArrayMeta,
    OperandStore,
    array_from_bytes,
    array_from_hashed_bytes,
    array_view_unhashed,
    check_hash,
    content_hasher,
    meta_of,
    pack,
    pack_gathered,
    unpack,
    unpack_view,
)
from mtor_p2p.records.receipts import (
    MAX_PRICE,
    Receipt,
    ReceiptBody,
    decode_receipt,
    shard_cost_nano,
    sign_as_worker,
)
from mtor_p2p.runtime import Begun, Runtime
from mtor_p2p.wire import RecordError

log = logging.getLogger(__name__)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
#: A network's ID on the wire: its genesis hash's first NETWORK_ID_CHARS hex digits.
NETWORK_ID_CHARS = 16
_NETWORK_ID_PATTERN = f"[0-9a-f]{{{NETWORK_ID_CHARS}}}"
_NETWORK_ID = re.compile(_NETWORK_ID_PATTERN)  # fullmatch: "$" would take a final newline
#: A network's name as a refusal may state it (a genesis file's ``network``): anything else
#: is left out of the refusal, and a requester reads nothing else there.
_PLAIN_NAME_PATTERN = r"[A-Za-z0-9._-]{1,64}"
PLAIN_NETWORK_NAME = re.compile(_PLAIN_NAME_PATTERN)
#: How a refusal of a quote below the worker's price starts (a stale quote is not a fault).
PRICE_REFUSED = "price refused"
#: How a refusal for lack of credit starts, so that requesters can tell it apart.
CREDIT_REFUSED = "credit refused"
#: How a refusal of a requester following other ledger rules starts (see _check_rules).
RULES_REFUSED = "other ledger rules"
#: How a refusal of a requester of another network starts (see _check_network).
NETWORK_REFUSED = "other network"
#: Work done but never countersigned stops counting against a requester's credit after this
#: and is remembered as unpaid instead.
OWED_MEMORY_SECONDS = 600.0
#: Unpaid work is forgotten after this: honest requesters leave a little (a hedged twin that
#: lost, a countersign lost with its connection), and must not be shut out for good by it.
UNPAID_MEMORY_SECONDS = 86_400.0
#: A requester with this many unpaid shards, or this many unpaid nano-credits, is refused.
MAX_UNPAID_SHARDS = 16
MAX_UNPAID_NANO = NANO
#: Requesters whose unpaid work is remembered; past it, those owing least are forgotten first.
MAX_UNPAID_REQUESTERS = 1024
#: A quote is honoured if it is no lower than the lowest price this worker asked within this
#: window: one job keeps the quote it read in our record at its start (the default job deadline
#: is 600 s), and the record may be one price step behind.
PRICE_MEMORY_SECONDS = 600.0
#: Relative and absolute slack on that floor: capacity records carry prices rounded to 6
#: decimal places, and a float that went through JSON may differ in its last bit.
PRICE_TOLERANCE = 1e-6
PRICE_ROUNDING = 1e-6
#: Prices remembered at most (changes only); dropping the oldest only raises the floor.
MAX_PRICE_HISTORY = 1024
UPLOAD_IDLE_TIMEOUT = 60.0
#: Chunks of one upload a sender may have in flight at once, told in every reply to a chunk
#: (``window``): a chunk that arrives ahead of its turn (at most this many minus one, by at
#: most that many chunks' bytes) waits for the chunks before it, at most UPLOAD_AHEAD_WAIT
#: seconds, instead of being refused. Sent one at a time, each 4 MiB chunk's trip (sealing,
#: sending, opening, hashing and storing it here, the reply) left one side idle while the
#: other worked: an 8192² job's B took most of its first second that way.
UPLOAD_WINDOW_CHUNKS = 2
#: On one lane (or one muxed connection) chunks arrive in order, and the wait covers only
#: the scheduling of their handlers: a held chunk is refused after this long.
UPLOAD_AHEAD_WAIT = 2.0
#: Chunks of one sender held for their turn at once, all its uploads together.
MAX_AHEAD_CHUNKS_PER_SENDER = 4
#: How long a countersign waits, shielded, for its receipt's ledger write (see _on_countersign).
LEDGER_WRITE_WAIT = 10.0
#: An upload must average this rate after a grace period (a sixteenth of the slowest home link
#: the scheduler plans for: a requester on it may feed several workers at once), or it is
#: dropped and its reservation given back.
UPLOAD_GRACE_SECONDS = 30.0
UPLOAD_MIN_BYTES_PER_S = 64 * 1024
#: Shortest window over which an upload's rate is judged (seconds).
RATE_WINDOW = 10.0
RUN_TIMEOUT = 600.0
#: An upload chunk kept in memory and at most this large is hashed on the event loop (about
#: 0.3 ms for 1 MiB): handing it to a thread and back costs more than that on a busy machine
#: (measured: a 1 MiB upload over memnet 2.4 ms with the hop, see below).
INLINE_CHUNK_BYTES = 1 << 20
#: A run request sent beside its uploads waits this long for an upload of each missing operand
#: to start (the first chunk, up to 4 MiB, may arrive after the request on a slow link).
OPERAND_WAIT_GRACE = 2.0
#: A waiting run gives up after the grace plus its operands' bytes at this rate.
OPERAND_WAIT_MIN_RATE = 1 << 20
#: Runs waiting for their operands at once, per sender and from all senders (a quarter of
#: the host's run permits): idle handlers a requester can hold.
MAX_WAITING_RUNS_PER_SENDER = 4
MAX_WAITING_RUNS = 16
#: Operands in shared memory being mapped and hashed at once, per sender and in all (each a
#: thread hashing up to MAX_ARRAY_BYTES); more are refused "busy" (the sender uploads).
MAX_LOCAL_UPLOADS_PER_SENDER = 2
#: Uploads in progress at once, one sender's and everyone's, whatever their size: each costs
#: a buffer and a record, and every new one scans them all (a hostile review: 8,000 half-sent
#: 8-byte uploads reserved 64 KB in all and held 33 MiB). A requester has a few at a time.
MAX_PENDING_UPLOADS_PER_SENDER = 64
MAX_PENDING_UPLOADS = 1024
MAX_LOCAL_UPLOADS = 4
#: Outputs kept for download whose requester is remembered (only it may ask for a sealed copy
#: of one): far more than a store of outputs of at least MIN_LOCAL_BYTES holds.
MAX_OUTPUTS_REMEMBERED = 1024
#: Outputs moved into sealed copies at once (each a copy of up to MAX_ARRAY_BYTES, made on a
#: thread, within the budget of uploads in progress).
MAX_OUTPUTS_SEALING = 2
#: A sealed output's descriptor is held open this long after it is last answered with (the
#: requester opens it as the answer arrives, within milliseconds), then closed: the store
#: keeps the pages mapped. A requester at its cap has its copies older than
#: SHARED_OUTPUT_MIN_OPEN_S closed first, oldest first.
SHARED_OUTPUT_GRACE_S = 2.0
SHARED_OUTPUT_MIN_OPEN_S = 0.5
#: An output is moved into a new sealed copy at most once in this long (a copy made again
#: once the first's descriptor is closed costs the worker a copy of the output each time).
RESEAL_AFTER_S = 60.0
#: Sealed outputs whose descriptors are open at once, in all and made for one requester
#: (copies being made count): beyond, "busy", and the output is downloaded in chunks.
MAX_OPEN_COPIES = 64
MAX_OPEN_COPIES_PER_SENDER = 32
#: Bytes of run requests carrying operands (``inline``) that may be under way at once, from
#: all senders and from one: such a run holds its bytes under the host's budgets of request
#: bytes in progress (64 MiB in all by default) while it is queued and computes, so these
#: leave most of that budget to uploads and to other peers. A request past them is refused at
#: once (INLINE_REFUSED) and its requester uploads instead.
MAX_INLINE_HELD_BYTES = 16 << 20
MAX_INLINE_HELD_BYTES_PER_SENDER = 8 << 20
#: A run request up to this size carries no operands worth accounting (its header only).
SMALL_RUN_REQUEST_BYTES = 64 * 1024
#: How often the worker's own loop expires idle uploads, moves expired owed work to unpaid and
#: notes its price. A simulation with thousands of workers pays one wake-up per worker per
#: interval, so it is not shorter than it needs to be for a 60 s upload timeout.
HOUSEKEEPING_INTERVAL = 15.0


#: Requesters whose run carried an operand that did not match its hash, remembered (at most
#: this many) so that their carried operands are checked before the kernel runs again.
HASH_LIARS_KEPT = 1024
#: A run whose check beside its kernel kept the event loop waiting longer than this once the
#: kernel was done found no idle core for it (the helper thread yields to everything else):
#: the runs after it are checked first, on the event loop, for CHECK_FIRST_RUNS (doubled up
#: to CHECK_FIRST_MAX_RUNS while such waits recur, halved back by each run that did not
#: wait). Both operands shipped to two workers on two busy cores, 200 one-shard jobs at once:
#: a fifth of the checks beside were not done with their kernel, waits of up to 9 ms, and
#: 143 against 150 shards/s with the check beside every lone run (medians of 4 blocks
#: alternating); one-shard jobs one at a time: 2% not done, the longest wait 2.4 ms.
CHECK_BESIDE_MAX_WAIT = 0.5e-3
CHECK_FIRST_RUNS = 4
CHECK_FIRST_MAX_RUNS = 256


class _CarriedMismatch(RemoteError):
    """A carried operand's bytes did not match its hash, found after the kernel ran."""


def _check_carried(carried: list[tuple[str, ArrayMeta, np.ndarray]]) -> None:
    """Raise RecordError naming the first carried operand whose bytes do not match its
    description's hash (a blocking call: it hashes them)."""
    for name, meta, array in carried:
        try:
            check_hash(meta, array)
        except RecordError as exc:
            raise RecordError(f"operand {name!r}: {exc}") from exc


#: What a chunk kept as a view of its message may hold beyond its own bytes (the message's
#: header and framing); beyond, the chunk is copied out.
VIEW_SLACK_BYTES = 4096


def _holds_little_more(chunk: bytes | memoryview) -> bool:
    """True if keeping ``chunk`` alive holds at most VIEW_SLACK_BYTES more than its bytes."""
    owner = memoryview(chunk).obj
    held = memoryview(owner).nbytes if owner is not None else len(chunk)
    return held <= len(chunk) + VIEW_SLACK_BYTES


class _UploadBuffer:
    """The bytes of one upload in progress: in memory, or spooled to an unnamed file in
    ``spool_dir`` (0600, gone when closed). The worker keeps an upload in memory when it fits
    its memory share for uploads in progress (reserved when the upload starts, see
    WorkerService._memory_share), and spools the rest, so that what peers announce (up to the
    reservation cap) costs disk beyond that share, not RAM. ``spool_dir`` None keeps
    everything in memory (simulation, tests).

    Why memory first: spooling is slow on the machine measured (a 256 MiB upload in 4 MiB
    chunks, hashing included: 0.67-1.08 CPU-s into a file on ext4, 0.22 CPU-s into memory,
    with the peer's memory settings), and a large job's operands all pass through here.

    In memory, the bytes go into one buffer of the announced size, allocated at once but
    committed page by page as chunks land (no growing and copying as they arrive). Chunks
    are hashed as they arrive (in the same blocking call that stores them), so the completed
    upload is checked against its announced hash without reading it all again."""

    def __init__(self, meta: ArrayMeta, spool_dir: Path | None, *, in_memory: bool) -> None:
        self.size = 0
        self._written = 0
        self._memory: np.ndarray | None = None
        self._file: Any = None
        self._nbytes = meta.nbytes
        self._hasher = content_hasher(meta.dtype, meta.shape)
        #: An upload that arrives in one message is kept as that message's bytes (no copy).
        self._whole: bytes | memoryview | None = None
        self._open = True
        # append runs on a thread, close on the event loop (an eviction, an expiry): never
        # both at once (a review found a close landing mid-append re-allocating the buffer).
        # Nor does close wait for an append (a 4 MiB hash and store, longer when spooled):
        # the event loop would stall on it. Closed mid-append, the append gives the memory
        # back when it ends. _state guards the two flags only, never held for long.
        self._append_lock = threading.Lock()
        self._state = threading.Lock()
        self._appending = False
        if spool_dir is not None and not in_memory:
            # Unbuffered: every byte is in the file when append returns, so closing has
            # nothing left to write and cannot fail on a full disk (a review found a sender's
            # small chunks sitting in a write buffer made a drop raise on the event loop).
            self._file = tempfile.TemporaryFile(dir=spool_dir, buffering=0)

    @property
    def spooled(self) -> bool:
        """True when the bytes are in a file (reading them back is a blocking call)."""
        return self._file is not None

    def append(self, chunk: bytes | memoryview) -> None:
        """Hash and add a chunk (a blocking call: hashing, and writing when spooled);
        ValueError once the buffer is closed."""
        with self._state:  # closed: refused at once, not after an append in progress
            if not self._open:
                raise ValueError("upload buffer is closed")
        with self._append_lock:
            with self._state:
                if not self._open:
                    raise ValueError("upload buffer is closed")
                self._appending = True
            try:
                self._append(chunk)
            finally:
                with self._state:
                    self._appending = False
                    closed_meanwhile = not self._open
                if closed_meanwhile:
                    self._release()

    def _append(self, chunk: bytes | memoryview) -> None:
        self._hasher.update(chunk)
        if self._file is not None:
            view = memoryview(chunk).cast("B")
            while view:  # a raw file may write less than it is given
                written = self._file.write(view)
                if not written:  # None (would block) or 0: never for a regular file
                    raise OSError("upload spool file took no bytes")
                view = view[written:]
        elif self._written == 0 and len(chunk) == self._nbytes:
            # Kept as a view of its message only when the message is little more than the
            # chunk: a view holds the whole message, which the store does not count (a
            # hostile review: 20,000 uploads of one element, each beside 16 KiB of header
            # fields, held 385 MiB for 80 KB counted).
            self._whole = chunk if _holds_little_more(chunk) else bytes(chunk)
        else:
            if self._memory is None:
                self._memory = np.empty(self._nbytes, np.uint8)
            self._memory[self._written : self._written + len(chunk)] = np.frombuffer(
                chunk, np.uint8
            )
        self._written += len(chunk)

    @property
    def written(self) -> int:
        """Bytes appended so far (``size`` also counts chunks taken but not yet written)."""
        return self._written

    def digest(self) -> str:
        """The content hash of everything appended so far."""
        return str(self._hasher.hexdigest())

    def read_all(self) -> bytes | bytearray | memoryview:
        """Everything received (a blocking call when spooled)."""
        if self._whole is not None:
            whole = np.frombuffer(self._whole, np.uint8)
            if whole.ctypes.data % BODY_ALIGNMENT:
                # One chunk, kept as a view of its message, from a sender that did not pad
                # its header (an older peer, or one that will not): held as it is, every
                # product on it would copy it first (arrays.BODY_ALIGNMENT). NumPy's own
                # buffers are aligned at least that far.
                self._whole = memoryview(whole.copy())
            return self._whole
        if self._memory is not None:
            return memoryview(self._memory)[: self._written]
        if self._file is None:
            return b""
        # Mapped, not read: the operand is used straight from the spool file's pages (no
        # second copy, no fresh anonymous pages to fault in; the kernel may page it out).
        # The mapping outlives the file's descriptor and goes with the last array using it.
        self._file.flush()
        if self._written == 0:
            return b""
        return memoryview(mmap.mmap(self._file.fileno(), self._written, access=mmap.ACCESS_READ))

    def close(self) -> None:
        """Give back the memory or the file: now, or when an append in progress ends (never
        waiting for it). Appends after this raise ValueError."""
        with self._state:
            self._open = False
            if self._appending:
                return  # that append releases everything when it ends
        self._release()

    def _release(self) -> None:
        # Only once no append runs and none can start (closed, checked under _state). The
        # file is taken under the lock: a second close may race the append's own release.
        with self._state:
            file, self._file = self._file, None
            self._memory = None
            self._whole = None
        if file is not None:
            try:
                file.close()
            except OSError as exc:  # nothing is buffered; never worth failing a drop for
                log.warning("closing an upload's spool file failed: %s", exc)


def _map_and_hash(pid: int, fd: int, meta: ArrayMeta, sender: str) -> tuple[memoryview, str]:
    """A requester's shared operand mapped, and its content hash (a blocking call)."""
    data = local_share.map_shared(pid, fd, meta.nbytes, meta.digest, sender)
    hasher = content_hasher(meta.dtype, meta.shape)
    hasher.update(data)
    return data, str(hasher.hexdigest())


def _take_back(held: dict[str, int], sender: str, amount: int) -> None:
    """Give back ``amount`` of what ``sender`` holds in ``held``, forgetting a sender left
    holding nothing (these tables stay as small as the senders with something held)."""
    left = held.get(sender, 0) - amount
    if left > 0:
        held[sender] = left
    else:
        held.pop(sender, None)


@dataclass
class _OpenCopy:
    """A sealed copy of an output, its descriptor open for the requester it was made for."""

    fd: int
    sender: str
    #: The read-only array on the copy that the store holds in the output's place.
    array: np.ndarray
    #: When it was made, and when its descriptor is closed (trio time).
    made: float
    until: float


#: One run of a shard for a requester, owed until countersigned: (job_id, shard, started).
Reservation = tuple[str, int, float]


@dataclass
class _PendingUpload:
    sender: str
    meta: ArrayMeta  # meta.nbytes is reserved while the upload is pending
    buffer: _UploadBuffer
    last_progress: float
    started: float
    #: Bytes of the worker's memory share for uploads this one holds (0: spooled, or small).
    memory: int = 0
    #: One chunk is stored and hashed at a time: chunks sent without waiting for the previous
    #: answer must not reach the hasher out of order (or from two threads at once).
    lock: trio.Lock = field(default_factory=trio.Lock)
    #: Set (and replaced) whenever ``buffer.size`` moves or the upload ends: chunks that came
    #: ahead of their turn wait on it.
    moved: trio.Event = field(default_factory=trio.Event)
    #: Offsets of the chunks waiting for their turn (at most UPLOAD_WINDOW_CHUNKS - 1).
    ahead: set[int] = field(default_factory=set)

    def take(self, nbytes: int) -> None:
        """Count ``nbytes`` more as taken (before they are written) and wake the chunks
        waiting for their turn."""
        self.buffer.size += nbytes
        self.wake()

    def wake(self) -> None:
        """Wake the chunks waiting for their turn (to look again at where the upload is)."""
        self.moved.set()
        self.moved = trio.Event()


@dataclass
class WorkerStats:
    """What the worker has done (shown by the control API)."""

    shards_run: int = 0
    shards_failed: int = 0
    uploads_refused: int = 0
    uploads_expired: int = 0
    uploads_evicted: int = 0
    bytes_received: int = 0
    #: Of operands taken from a requester's shared memory (on this machine): how many, bytes.
    local_uploads: int = 0
    bytes_shared: int = 0
    #: Of outputs a requester on this machine took from a sealed copy: how many, bytes.
    outputs_shared: int = 0
    output_bytes_shared: int = 0
    corrupted_on_purpose: int = 0
    credit_refusals: int = 0
    price_refusals: int = 0
    unpaid_refusals: int = 0
    compute_seconds: float = 0.0
    active: int = 0
    by_kernel: dict[str, int] = field(default_factory=dict)


def _header_field(header: dict[str, Any], name: str, kind: type) -> Any:
    value = header.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise RemoteError(f"header field {name!r} missing or of the wrong type")
    return value


def _check_rules(header: dict[str, Any]) -> None:
    """Refuse a run request from a requester following other ledger rules (a header without
    ``ledger_rules``: a version before them, which followed rules 1). Its receipt would be
    paid in a ledger this worker's never hears (see :data:`LEDGER_RULES`)."""
    rules = header.get("ledger_rules", 1)
    if rules == LEDGER_RULES and type(rules) is int:
        return
    stated = rules if type(rules) is int and 1 <= rules < 10**9 else "unreadable"
    raise RemoteError(
        f"{RULES_REFUSED}: this worker follows ledger rules {LEDGER_RULES}, the requester "
        f"{stated}; one of them must upgrade MTOR"
    )


def _check_network(header: dict[str, Any], mine: str | None, name: str | None = None) -> None:
    """Refuse a run request from a requester whose ledger is another network's: its
    ``network`` (its genesis hash's first NETWORK_ID_CHARS hex digits) is not this worker's.
    Its receipt would be paid in a ledger this worker's never hears; a node started without
    its network's genesis beside a devnet was served and ran into debt in the devnet's ledger
    (a new user's walkthrough). A request without ``network`` (a version before it) and a
    worker without a ledger (``mine`` None) go on as before. ``name``: this worker's network
    name (its genesis's ``network``), said too when it is a plain name."""
    if mine is None or "network" not in header:
        return
    theirs = header["network"]
    if theirs == mine:
        return
    stated = theirs if isinstance(theirs, str) and _NETWORK_ID.fullmatch(theirs) else "unreadable"
    named = f" (network {name})" if name and PLAIN_NETWORK_NAME.fullmatch(name) else ""
    raise RemoteError(
        f"{NETWORK_REFUSED}: this worker's ledger has genesis {mine}…{named}, the requester's "
        f"{stated}; a node joins a network with that network's genesis, in a new data "
        "directory (--genesis FILE --data-dir DIR)"
    )


_REFUSING_NETWORK = re.compile(
    f"this worker's ledger has genesis ({_NETWORK_ID_PATTERN})…"
    rf"(?: \(network ({_PLAIN_NAME_PATTERN})\),)?"
)


def refusing_network(reason: str) -> str | None:
    """The network a refusal made by :func:`_check_network` names as the worker's (its
    genesis prefix), or None when ``reason`` is no such refusal (a requester reads only this
    and :func:`refusing_network_name` of a worker's words)."""
    if not reason.startswith(NETWORK_REFUSED):
        return None
    found = _REFUSING_NETWORK.search(reason)
    return found.group(1) if found else None


def refusing_network_name(reason: str) -> str | None:
    """The network name such a refusal states for the worker's network (a plain name, at
    most 64 characters), or None (none stated: a version before it, or not a plain name)."""
    if not reason.startswith(NETWORK_REFUSED):
        return None
    found = _REFUSING_NETWORK.search(reason)
    return found.group(2) if found else None


class WorkerService:
    """Serves the compute protocols on ``network``.

    ``fault_rate`` makes the worker return a wrong result for that fraction of its shards. It
    exists so that tests and devnets can exercise the network's defences (verification, fault
    proofs, re-issue); an honest node leaves it at 0.

    ``unpaid_shards``, ``unpaid_nano`` and ``unpaid_requesters`` bound unpaid work (see the
    module docstring); ``housekeeping_interval`` is the period of :meth:`run`.
    """

    def __init__(
        self,
        network: Network,
        identity: Identity,
        clock: NetClock,
        operands: OperandStore,
        receipts: ReceiptStore,
        *,
        price: Callable[[], float],
        backend: Backend | None = None,
        executor: ShardExecutor | None = None,
        runtime: Runtime | None = None,
        fault_rate: float = 0.0,
        slots: int = 1,
        credit: Callable[[str], int] | None = None,
        credit_now: Callable[[str], int | None] | None = None,
        on_receipt: Callable[[Receipt], Awaitable[None]] | None = None,
        unpaid_shards: int = MAX_UNPAID_SHARDS,
        unpaid_nano: int = MAX_UNPAID_NANO,
        unpaid_requesters: int = MAX_UNPAID_REQUESTERS,
        housekeeping_interval: float = HOUSEKEEPING_INTERVAL,
        spool_dir: Path | None = None,
        upload_memory_bytes: int = MAX_UPLOAD_MEMORY_BYTES,
        local_uploads: bool = True,
    ) -> None:
        self._network = network
        #: This worker's network (see _check_network); None: requesters' are not checked.
        self.network_id: str | None = None
        #: Its name (the genesis's ``network``), said in refusals of another network's runs.
        self.network_name: str | None = None
        self._identity = identity
        self._clock = clock
        self.operands = operands
        self.receipts = receipts
        self._price = price
        self._runtime = runtime or Runtime.production()
        # Kernels run on an executor: the local backend through the runtime's blocking hook,
        # or a simulated device that charges modelled time.
        self.executor = executor or BackendExecutor(backend, self._runtime, slots=slots)
        self.fault_rate = fault_rate
        self._rng = self._runtime.random
        self.slots = self.executor.slots
        self._pending: dict[tuple[str, str], _PendingUpload] = {}
        #: Where multi-chunk uploads in progress are spooled (None: in memory).
        self.spool_dir = spool_dir
        self._reserved_total = 0
        self._reserved_by_sender: dict[str, int] = {}
        #: Uploads in progress by sender (MAX_PENDING_UPLOADS_PER_SENDER).
        self._uploads_by_sender: dict[str, int] = {}
        #: Of uploads in progress, the bytes that may wait in memory rather than be spooled
        #: (all senders together; one sender at most half), and what is held of it now.
        self.upload_memory_bytes = upload_memory_bytes
        self._memory_total = 0
        self._memory_by_sender: dict[str, int] = {}
        #: Whether operands may come through a requester's shared memory on this machine,
        #: and the ones being mapped and hashed now: (sender, hash).
        self.local_uploads = local_uploads and local_share.usable()
        self._local_in_progress: set[tuple[str, str]] = set()
        #: Outputs kept for download (too large for their run's answer) -> the requester
        #: whose run made them: only it may have one moved into a sealed copy. Oldest first,
        #: at most MAX_OUTPUTS_REMEMBERED (an output evicted from the store is gone anyway).
        self._output_requester: OrderedDict[str, str] = OrderedDict()
        #: Outputs being moved into sealed copies now -> (set when done, for whom).
        self._sealing: dict[str, tuple[trio.Event, str]] = {}
        #: Sealed copies of outputs whose descriptors are open (see _on_download_local), in
        #: the order they were made, and when each remembered output was last sealed.
        self._open_copies: dict[str, _OpenCopy] = {}
        self._sealed_at: dict[str, float] = {}
        #: Run requests being served now: a run served alone has its carried operands
        #: hashed beside its kernel (see _inline_operands).
        self._runs_under_way = 0
        #: Requesters caught carrying operands that did not match their hashes.
        self._hash_liars: OrderedDict[str, None] = OrderedDict()
        #: Runs left to check before their kernel, and how many the next wait will add
        #: (see CHECK_BESIDE_MAX_WAIT).
        self._check_first_runs = 0
        self._check_first_backoff = CHECK_FIRST_RUNS
        #: Upload chunks of each sender held for their turn now (see _wait_for_turn).
        self._ahead_by_sender: dict[str, int] = {}
        self.stats = WorkerStats()
        #: Compute time of each shard run (the metrics' histogram, mtor_p2p/metrics.py).
        self.shard_seconds = LatencyBuckets()
        #: Run requests received, by network time, refused ones and retries included: the
        #: demand this worker sees (mtor_p2p/insight.py). Not in ``stats``: status shows
        #: those as they are.
        self.run_requests = EventWindow()
        # Credit control: ``credit(requester)`` is what the ledger lets that requester still
        # spend (nano-credits); work this worker did for it that is not yet countersigned
        # counts against that too. None: no credit check (no ledger); unpaid work is bounded
        # either way.
        self._credit = credit
        # The same figure read without waiting, or None when only a thread can read it (a
        # write holds the ledger): most runs then skip the thread hop (0.6-2.5 ms measured
        # on a 512³ shard's critical path, mostly the GIL behind the event loop).
        self._credit_now = credit_now
        #: sender -> its runs waiting for operands now (see _may_wait).
        self._waiting_runs: dict[str, int] = {}
        #: Bytes of run requests carrying operands under way, per sender and in all.
        self._inline_held: dict[str, int] = {}
        self._inline_held_total = 0
        self._on_receipt = on_receipt
        # requester -> (job_id, shard, started) -> (signed at, nano-credits): receipts handed
        # out and not yet countersigned; after OWED_MEMORY_SECONDS they move to ``_unpaid``.
        self._owed: dict[str, dict[Reservation, tuple[float, int]]] = {}
        # requester -> (job_id, shard, started) -> (expired at, nano-credits), oldest first.
        self._unpaid: dict[str, dict[Reservation, tuple[float, int]]] = {}
        #: (requester, run) -> set once the countersign storing that run's receipt has ended:
        #: a copy of it delivered meanwhile waits for that one (_take_countersigned).
        self._countersigning: dict[tuple[str, Reservation], trio.Event] = {}
        self._unpaid_shards = unpaid_shards
        self._unpaid_nano = unpaid_nano
        self._unpaid_requesters = unpaid_requesters
        self._housekeeping_interval = housekeeping_interval
        # (since, price) for each price this worker asked recently, oldest first.
        self._prices: deque[tuple[float, float]] = deque(maxlen=MAX_PRICE_HISTORY)
        self._registered = False
        self._operands_event = trio.Event()

    @property
    def kernels(self) -> tuple[str, ...]:
        """Names of the kernels this worker serves."""
        return tuple(sorted(KERNELS))

    @property
    def load(self) -> float:
        """Fraction of compute slots busy right now."""
        return min(1.0, self.stats.active / self.slots)

    def register(self) -> None:
        """Install the protocol handlers on the network."""
        handle = self._network.handle
        handle(PROTOCOL_UPLOAD, self._on_upload, max_request_bytes=MAX_MESSAGE_BYTES, timeout=60)
        handle(PROTOCOL_UPLOAD_LOCAL, self._on_upload_local, max_request_bytes=4096, timeout=60)
        handle(PROTOCOL_HAS, self._on_has, max_request_bytes=64 * 1024, timeout=10)
        # A run request may carry its shard's missing operands (``inline``): its bytes are
        # admitted under the host's per-peer and total budgets of request bytes in progress,
        # and held while it is queued and computes, within MAX_INLINE_HELD_BYTES (such a run
        # never waits for other operands: see _serve_run).
        handle(
            PROTOCOL_RUN, self._on_run, max_request_bytes=MAX_RUN_REQUEST_BYTES, timeout=RUN_TIMEOUT
        )
        # A download's answer is a chunk of array bytes, asked for free (of an operand uploaded
        # for free): reserved under the host's allowance of answers in hand (made, not yet
        # read) before the handler copies it. Run answers are not: a run costs its requester
        # credit, and holds its reservation while it waits and computes (a review: reserving
        # for runs too let a few free identities' unread downloads turn runs away).
        handle(
            PROTOCOL_DOWNLOAD,
            self._on_download,
            max_request_bytes=64 * 1024,
            timeout=60,
            max_answer_bytes=MAX_MESSAGE_BYTES,
        )
        handle(PROTOCOL_DOWNLOAD_LOCAL, self._on_download_local, max_request_bytes=4096, timeout=60)
        handle(PROTOCOL_COUNTERSIGN, self._on_countersign, max_request_bytes=64 * 1024, timeout=10)
        self._registered = True

    async def run(self) -> None:
        """The worker's own timer (run it in the node's nursery): expire idle uploads, move
        owed work that was never countersigned to unpaid, note the price. Returns at once on
        a node that does not serve (:meth:`register` never called)."""
        if not self._registered:
            return
        try:
            while True:
                self._housekeeping()
                await trio.sleep(self._housekeeping_interval)
        finally:
            self._close_lapsed_copies(every=True)

    def _housekeeping(self) -> None:
        self._close_lapsed_copies()
        self._expire_uploads()
        self._expire_owed()
        self._current_price()

    @property
    def reserved_upload_bytes(self) -> int:
        """Bytes reserved for uploads in progress (what they announced, not what arrived)."""
        return self._reserved_total

    def unpaid(self, requester: str) -> tuple[int, int]:
        """Shards done for ``requester`` and never countersigned (past OWED_MEMORY_SECONDS),
        and their nano-credits."""
        entries = self._unpaid.get(requester, {})
        return len(entries), sum(cost for _, cost in entries.values())

    # -- handlers --------------------------------------------------------------------------

    @staticmethod
    def _parse(request: bytes) -> tuple[dict[str, Any], bytes]:
        try:
            return unpack(request)
        except RecordError as exc:
            raise RemoteError(f"malformed message: {exc}") from exc

    def _expire_uploads(self) -> None:
        """Drop uploads idle for UPLOAD_IDLE_TIMEOUT, and uploads that, past
        UPLOAD_GRACE_SECONDS, have averaged under UPLOAD_MIN_BYTES_PER_S: a byte now and then
        is progress, but must not hold a reservation forever."""
        now = trio.current_time()

        def stale(p: _PendingUpload) -> bool:
            if now - p.last_progress >= UPLOAD_IDLE_TIMEOUT:
                return True
            owed = (now - p.started - UPLOAD_GRACE_SECONDS) * UPLOAD_MIN_BYTES_PER_S
            return p.buffer.size < owed

        for key in [k for k, p in self._pending.items() if stale(p)]:
            self._drop_upload(key)
            self.stats.uploads_expired += 1

    def _make_room(self, nbytes: int, sender: str) -> None:
        """Make room for ``nbytes`` more under the total cap, for ``sender``.

        First evict uploads in progress that average under UPLOAD_MIN_BYTES_PER_S (slowest
        first): a sender that trickles (and restarts whenever its upload expires) must not
        hold reservations an honest upload needs. Then, if ``sender`` holds less than an
        equal share of the cap among the senders with uploads in progress, take room from
        senders holding more than their share, their slowest uploads first (bytes per second
        since they started): many identities uploading at an honest rate cannot lock a
        newcomer out, they can only have their share; and an attacker cannot use this to
        evict a large honest upload moving faster than its own.
        """
        now = trio.current_time()

        def rate(p: _PendingUpload) -> float:
            # Over at least RATE_WINDOW seconds: one quick chunk does not make a fresh
            # upload look faster than one that has kept its pace for a while.
            return p.buffer.size / max(now - p.started, RATE_WINDOW)

        slow = sorted(
            (rate(p), key) for key, p in self._pending.items() if rate(p) < UPLOAD_MIN_BYTES_PER_S
        )
        for _, key in slow:
            if self._reserved_total + nbytes <= MAX_PENDING_UPLOAD_BYTES:
                return
            self._drop_upload(key)
            self.stats.uploads_evicted += 1
        senders = set(self._reserved_by_sender) | {sender}
        share = MAX_PENDING_UPLOAD_BYTES // len(senders)
        while (
            self._reserved_total + nbytes > MAX_PENDING_UPLOAD_BYTES
            and self._reserved_by_sender.get(sender, 0) + nbytes <= share
        ):
            over = [
                (rate(p), key)
                for key, p in self._pending.items()
                if p.sender != sender and self._reserved_by_sender[p.sender] > share
            ]
            if not over:
                return
            self._drop_upload(min(over)[1])
            self.stats.uploads_evicted += 1

    def _evict_for(self, sender: str) -> bool:
        """Make room for one more upload in progress (MAX_PENDING_UPLOADS reached) by
        dropping the least recently moved upload of the sender that holds the most, if it
        holds more than a fair share and is not ``sender``: identities that fill the table
        with tiny uploads cannot lock others out (a review)."""
        if not self._uploads_by_sender:
            return False
        most = max(self._uploads_by_sender, key=self._uploads_by_sender.__getitem__)
        fair = MAX_PENDING_UPLOADS // (len(self._uploads_by_sender) + 1)
        if most == sender or self._uploads_by_sender[most] <= fair:
            return False
        keys = [k for k, p in self._pending.items() if p.sender == most]
        if not keys:
            return False
        self._drop_upload(min(keys, key=lambda k: self._pending[k].last_progress))
        self.stats.uploads_evicted += 1
        return True

    def _drop_upload(self, key: tuple[str, str]) -> None:
        """Forget a pending upload and give back what it reserved."""
        pending = self._pending.pop(key, None)
        if pending is None:
            return
        self._release_upload(pending)

    def _release_upload(self, pending: _PendingUpload) -> None:
        """Close an upload's buffer and give back what it reserved."""
        self._operands_changed()
        try:
            pending.buffer.close()
        finally:  # whatever closing does, the reservation is given back
            pending.wake()  # chunks waiting for their turn: it will not come
            self._reserved_total -= pending.meta.nbytes
            _take_back(self._reserved_by_sender, pending.sender, pending.meta.nbytes)
            _take_back(self._uploads_by_sender, pending.sender, 1)
            if pending.memory:
                # Given back at once even when an append in progress holds the buffer's
                # memory a little longer (until it ends: one chunk's hash and copy): a short
                # overcommit of at most one upload per chunk being written, bounded.
                self._memory_total -= pending.memory
                _take_back(self._memory_by_sender, pending.sender, pending.memory)
                pending.memory = 0

    def _memory_share(self, sender: str, nbytes: int) -> int:
        """Reserve memory for a new upload of ``nbytes`` from ``sender`` and return how much
        (0: it is spooled): when it fits what is left of ``upload_memory_bytes``, and the
        sender's uploads in memory stay within half of it (so that one peer alone cannot push
        everyone else's uploads to disk). Without a spool directory everything is in memory
        and nothing is counted here, nor for an upload of one chunk or less (its bytes arrive
        as one message, which the host's request budgets bound: it is kept in memory
        whatever the share, as before the share existed).

        The share is reserved at the size an upload announces: peers that announce large
        uploads and send slowly can hold all of it, and honest large uploads then spool, as
        they all did before (measured in review: two identities, 64 KiB sent of 512 MiB
        each). Spilling slow uploads to disk to give their share back is not built."""
        if self.spool_dir is None or nbytes <= CHUNK_BYTES:
            return 0
        mine = self._memory_by_sender.get(sender, 0)
        if (
            self._memory_total + nbytes > self.upload_memory_bytes
            or mine + nbytes > self.upload_memory_bytes // 2
        ):
            return 0
        self._memory_total += nbytes
        self._memory_by_sender[sender] = mine + nbytes
        return nbytes

    async def _on_upload(self, sender: str, request: bytes) -> bytes:
        try:
            header, chunk = unpack_view(request)  # the chunk is not copied out of the message
        except RecordError as exc:
            raise RemoteError(f"malformed message: {exc}") from exc
        try:
            meta = ArrayMeta.from_json(header.get("array"), max_bytes=MAX_ARRAY_BYTES)
        except RecordError as exc:
            raise RemoteError(str(exc)) from exc
        offset = _header_field(header, "offset", int)
        if meta.digest in self.operands:
            # Held already (carried by a run, or uploaded by another sender): an upload of it
            # in progress from this sender gives its reservation back now, not when it expires.
            self._drop_upload((sender, meta.digest))
            return pack({"complete": True, "received": meta.nbytes})
        self._expire_uploads()
        key = (sender, meta.digest)
        pending = self._pending.get(key)
        started_before: float | None = None
        if pending is not None and offset == 0 and pending.meta == meta:
            # The sender starts again (an earlier try failed midway, refused "busy" or cut
            # off): a fresh upload, not a chunk out of order. Its rate is still judged from
            # the first start, so that starting again cannot hold a reservation for ever.
            started_before = pending.started
            self._drop_upload(key)
            pending = None
        if pending is None:
            if offset != 0:
                raise RemoteError("upload must start at offset 0")
            # Reserve what the upload announces, not what has arrived: uploads that start
            # empty and grow later must not all fit under the cap at their start.
            sender_reserved = self._reserved_by_sender.get(sender, 0)
            if (
                sender_reserved + meta.nbytes > MAX_PENDING_UPLOAD_BYTES_PER_PEER
                or self._uploads_by_sender.get(sender, 0) >= MAX_PENDING_UPLOADS_PER_SENDER
            ):
                self.stats.uploads_refused += 1
                raise RemoteError("busy: this peer has too many uploads in progress")
            if len(self._pending) >= MAX_PENDING_UPLOADS and not self._evict_for(sender):
                self.stats.uploads_refused += 1
                raise RemoteError("busy: too many uploads in progress")
            if self._reserved_total + meta.nbytes > MAX_PENDING_UPLOAD_BYTES:
                self._make_room(meta.nbytes, sender)
            if self._reserved_total + meta.nbytes > MAX_PENDING_UPLOAD_BYTES:
                self.stats.uploads_refused += 1
                raise RemoteError("busy: too many uploads in progress")
            memory = self._memory_share(sender, meta.nbytes)
            in_memory = memory > 0 or meta.nbytes <= CHUNK_BYTES
            buffer = _UploadBuffer(meta, self.spool_dir, in_memory=in_memory)
            now = trio.current_time()
            started = now if started_before is None else started_before
            pending = _PendingUpload(sender, meta, buffer, now, started, memory=memory)
            self._pending[key] = pending
            self._uploads_by_sender[sender] = self._uploads_by_sender.get(sender, 0) + 1
            self._operands_changed()
            self._reserved_total += meta.nbytes
            self._reserved_by_sender[sender] = sender_reserved + meta.nbytes
        if pending.meta != meta:
            self._drop_upload(key)
            raise RemoteError("upload chunks must arrive in order with the same description")
        if len(chunk) > CHUNK_BYTES or offset + len(chunk) > meta.nbytes:
            self._drop_upload(key)
            raise RemoteError("chunk overruns the announced array")
        if offset != pending.buffer.size:
            await self._wait_for_turn(key, pending, offset, len(chunk))
        # The offset is taken before the write: a second request for the same offset while
        # this one writes is out of order, not a double write. Taking it lets the next chunk,
        # if it came early, queue for the lock behind this one (the lock is FIFO).
        pending.take(len(chunk))
        written = False
        try:
            async with pending.lock:
                if pending.buffer.written != offset:
                    # A chunk before this one was taken and never written (its handler was
                    # cancelled): these bytes would land in its place.
                    raise RemoteError("upload was dropped; start again at offset 0")
                # Hashing a small chunk kept in memory takes less than a thread hop costs.
                small = not pending.buffer.spooled and len(chunk) <= INLINE_CHUNK_BYTES
                await self._runtime.run_blocking(pending.buffer.append, chunk, cheap=small)
                written = True
                # Decided under the lock: with chunks in flight, the size counts chunks
                # taken but not yet written, and only the one that wrote the last byte ends
                # the upload.
                finished = pending.buffer.written >= meta.nbytes
        except OSError as exc:  # a full disk: our fault, not the sender's
            log.warning("upload spool failed: %s", exc)
            raise RemoteError("busy: cannot store the upload now") from exc
        except (ValueError, AttributeError) as exc:
            # The upload was expired or evicted (its buffer closed) while this chunk was being
            # written on a worker thread.
            raise RemoteError("upload was dropped; start again at offset 0") from exc
        finally:
            if not written and self._pending.get(key) is pending:
                # Taken and not written (refused, failed, cancelled): the upload cannot go on.
                self._drop_upload(key)
        pending.last_progress = trio.current_time()
        self.stats.bytes_received += len(chunk)
        if not finished:
            # ``received``: where this chunk ends (what a sender of one chunk at a time
            # checks); ``window``: how many chunks it may have in flight.
            return pack(
                {
                    "complete": False,
                    "received": offset + len(chunk),
                    "window": UPLOAD_WINDOW_CHUNKS,
                }
            )
        if self._pending.get(key) is not pending:
            raise RemoteError("upload was dropped while its last chunk arrived")
        # Out of the table (no other request can touch it) but still reserved while its
        # bytes are read back and checked.
        del self._pending[key]
        try:
            if pending.buffer.spooled:
                data = await self._runtime.run_blocking(pending.buffer.read_all)
            else:
                data = pending.buffer.read_all()
            # Hashed chunk by chunk as they arrived: checked here without a second pass.
            array = array_from_hashed_bytes(meta, data, pending.buffer.digest())
            # An operand larger than the whole cache: refused in words, not "internal error".
            self.operands.put(array, meta.digest)
        except RecordError as exc:
            self.stats.uploads_refused += 1
            raise RemoteError(str(exc)) from exc
        finally:
            self._release_upload(pending)
        self._operands_changed()
        return pack({"complete": True, "received": meta.nbytes})

    async def _on_upload_local(self, sender: str, request: bytes) -> bytes:
        """An operand in the sender's sealed shared memory on this machine: map it, hash it,
        hold it as if uploaded (see mtor_p2p/compute/local_share.py)."""
        header, _ = self._parse(request)
        try:
            meta = ArrayMeta.from_json(header.get("array"), max_bytes=MAX_ARRAY_BYTES)
        except RecordError as exc:
            raise RemoteError(str(exc)) from exc
        host = _header_field(header, "host", str)
        pid = _header_field(header, "pid", int)
        fd = _header_field(header, "fd", int)
        done = pack({"complete": True, "received": meta.nbytes})
        if meta.digest in self.operands:
            return done
        if not self.local_uploads or host != local_share.host_token(sender, self._identity.peer_id):
            raise RemoteError(local_share.NOT_LOCAL + "this worker is on another machine")
        if meta.nbytes < local_share.MIN_LOCAL_BYTES:
            raise RemoteError("shared operand refused: too small to share; upload it")
        if meta.nbytes > self.operands.max_bytes:
            raise RemoteError("shared operand refused: larger than this worker's operand cache")
        key = (sender, meta.digest)
        mine = sum(1 for s, _ in self._local_in_progress if s == sender)
        sender_reserved = self._reserved_by_sender.get(sender, 0)
        if (
            key in self._local_in_progress
            or mine >= MAX_LOCAL_UPLOADS_PER_SENDER
            or len(self._local_in_progress) >= MAX_LOCAL_UPLOADS
            or sender_reserved + meta.nbytes > MAX_PENDING_UPLOAD_BYTES_PER_PEER
            or self._reserved_total + meta.nbytes > MAX_PENDING_UPLOAD_BYTES
        ):
            self.stats.uploads_refused += 1
            raise RemoteError("busy: too many shared operands being checked")
        # Reserved as an upload in progress before a byte is mapped: the pages are the
        # requester's, but reading them makes them this process's to keep.
        self._local_in_progress.add(key)
        self._reserved_total += meta.nbytes
        self._reserved_by_sender[sender] = sender_reserved + meta.nbytes
        self._operands_changed()
        try:
            data, digest = await self._runtime.run_blocking(_map_and_hash, pid, fd, meta, sender)
            array = array_from_hashed_bytes(meta, data, digest)
            self.operands.put(array, meta.digest)
        except local_share.NotLocal as exc:
            self.stats.uploads_refused += 1
            raise RemoteError(f"{local_share.NOT_LOCAL}{exc}") from exc
        except (local_share.LocalShareError, RecordError) as exc:
            self.stats.uploads_refused += 1
            raise RemoteError(f"shared operand refused: {exc}") from exc
        finally:
            self._local_in_progress.discard(key)
            self._reserved_total -= meta.nbytes
            _take_back(self._reserved_by_sender, sender, meta.nbytes)
            self._operands_changed()
        self.stats.local_uploads += 1
        self.stats.bytes_shared += meta.nbytes
        return done

    async def _wait_for_turn(
        self, key: tuple[str, str], pending: _PendingUpload, offset: int, length: int
    ) -> None:
        """Hold a chunk that came ahead of the chunks before it (sent without waiting for
        their replies, or overtaking them on another stream) until they are taken: a whole
        chunk (or the array's last), whole chunks ahead and within the window, one waiting
        per offset and at most MAX_AHEAD_CHUNKS_PER_SENDER per sender, for at most
        UPLOAD_AHEAD_WAIT seconds. Anything else (behind, too far ahead, a duplicate, a
        turn that never comes) ends the upload, as a chunk out of order always did."""
        size = pending.buffer.size
        ahead = offset - size
        sender = pending.sender
        if (
            ahead <= 0
            or ahead % CHUNK_BYTES
            or ahead > (UPLOAD_WINDOW_CHUNKS - 1) * CHUNK_BYTES
            or length != min(CHUNK_BYTES, pending.meta.nbytes - offset)
            or offset in pending.ahead
            or len(pending.ahead) >= UPLOAD_WINDOW_CHUNKS - 1
        ):
            self._drop_upload(key)
            raise RemoteError("upload chunks must arrive in order with the same description")
        if self._ahead_by_sender.get(sender, 0) >= MAX_AHEAD_CHUNKS_PER_SENDER:
            # The sender's own concurrency, not a fault: "busy" (the upload cannot go on
            # without this chunk, so it ends; the sender starts it again).
            self._drop_upload(key)
            raise RemoteError("busy: too many upload chunks waiting for their turn")
        pending.ahead.add(offset)
        self._ahead_by_sender[sender] = self._ahead_by_sender.get(sender, 0) + 1
        try:
            with trio.move_on_after(UPLOAD_AHEAD_WAIT):
                while pending.buffer.size < offset and self._pending.get(key) is pending:
                    await pending.moved.wait()
        finally:
            pending.ahead.discard(offset)
            _take_back(self._ahead_by_sender, sender, 1)
        if self._pending.get(key) is not pending:
            raise RemoteError("upload was dropped; start again at offset 0")
        if pending.buffer.size != offset:
            # A chunk before it lost or late on its way: not this worker's fault ("busy"), but
            # the upload cannot go on.
            self._drop_upload(key)
            raise RemoteError(
                f"busy: the upload's bytes before offset {offset} did not come within "
                f"{UPLOAD_AHEAD_WAIT:.0f} s; start again at offset 0"
            )

    async def _on_has(self, sender: str, request: bytes) -> bytes:
        header, _ = self._parse(request)
        hashes = _header_field(header, "hashes", list)
        if len(hashes) > 64:
            raise RemoteError("ask about at most 64 hashes at once")
        return pack({"have": [h for h in hashes if isinstance(h, str) and h in self.operands]})

    async def _on_run(self, sender: str, request: bytes) -> Payload:
        self.run_requests.add(self._clock.now())
        self._runs_under_way += 1
        try:
            return await self._admit_run(sender, request)
        finally:
            self._runs_under_way -= 1

    async def _admit_run(self, sender: str, request: bytes) -> Payload:
        held = len(request)
        if held <= SMALL_RUN_REQUEST_BYTES:
            return await self._serve_run(sender, request)
        # Operands carried in the request: bounded in bytes held by runs under way (see
        # MAX_INLINE_HELD_BYTES), refused at once beyond, before anything is parsed.
        mine = self._inline_held.get(sender, 0)
        if (
            self._inline_held_total + held > MAX_INLINE_HELD_BYTES
            or mine + held > MAX_INLINE_HELD_BYTES_PER_SENDER
        ):
            raise RemoteError(f"{INLINE_REFUSED}: too many carried bytes under way; upload them")
        self._inline_held[sender] = mine + held
        self._inline_held_total += held
        try:
            return await self._serve_run(sender, request)
        finally:
            self._inline_held_total -= held
            _take_back(self._inline_held, sender, held)

    async def _serve_run(self, sender: str, request: bytes) -> Payload:
        try:
            header, body = unpack_view(request)  # inline operands are not copied out of it
        except RecordError as exc:
            raise RemoteError(f"malformed message: {exc}") from exc
        job_id = _header_field(header, "job_id", str)
        if not _HEX64.match(job_id):
            raise RemoteError("job_id must be 64 hex characters")
        _check_rules(header)
        _check_network(header, self.network_id, self.network_name)
        shard = _header_field(header, "shard", int)
        kernel_name = _header_field(header, "kernel", str)
        try:
            kernel = get_kernel(kernel_name)
        except KernelError as exc:
            raise RemoteError(f"unknown kernel {kernel_name[:40]!r}") from exc
        described = _header_field(header, "operands", dict)
        digests: dict[str, str] = {}
        metas: dict[str, ArrayMeta] = {}
        announced = 0
        for name, meta_json in list(described.items())[:16]:
            try:
                meta = ArrayMeta.from_json(meta_json, max_bytes=MAX_ARRAY_BYTES)
            except RecordError as exc:
                raise RemoteError(f"operand {name!r}: {exc}") from exc
            digests[str(name)] = meta.digest
            metas[str(name)] = meta
            announced += meta.nbytes
        # Checked against their hashes before anything else is done with them, except in a
        # run served alone, whose hashes are checked on a helper thread while its kernel
        # runs, and before anything is kept, signed or sent (``unchecked``; nothing before
        # the kernel reads their values).
        alone = self._runs_under_way == 1 and sender not in self._hash_liars
        if self._check_first_runs:
            self._check_first_runs -= 1
            alone = False
        carried, unchecked = await self._inline_operands(header, body, metas, unchecked=alone)
        return await self._run_carried(
            sender,
            header,
            kernel,
            kernel_name,
            job_id,
            shard,
            metas,
            digests,
            announced,
            carried,
            unchecked,
        )

    async def _check_now(
        self, sender: str, carried: dict[str, np.ndarray], metas: dict[str, ArrayMeta]
    ) -> None:
        """Check carried operands left unchecked, on the event loop, before anything uses
        them; a mismatch marks the sender as for a check beside a kernel."""
        items = [(name, metas[name], array) for name, array in carried.items()]
        try:
            await self._runtime.run_blocking(_check_carried, items, cheap=True)
        except RecordError as exc:
            self._mark_liar(sender)
            raise RemoteError(str(exc)) from exc

    def _mark_liar(self, sender: str) -> None:
        """Check ``sender``'s carried operands first from now on (HASH_LIARS_KEPT)."""
        self._hash_liars[sender] = None
        self._hash_liars.move_to_end(sender)
        while len(self._hash_liars) > HASH_LIARS_KEPT:
            self._hash_liars.popitem(last=False)

    def _verified(self, sender: str, unverified: Begun[None]) -> float:
        """Collect the check of a run's carried operands begun beside its kernel: a mismatch
        refuses the run and marks its requester as one whose operands are checked first.
        Returns how long the event loop waited for it."""
        began = trio.current_time()
        try:
            unverified.result()
        except RecordError as exc:
            self._mark_liar(sender)
            raise _CarriedMismatch(str(exc)) from exc
        return trio.current_time() - began

    def _note_wait(self, waited: float) -> None:
        """Check the next runs first, on the event loop, after a check beside a kernel that
        kept the loop waiting (see CHECK_BESIDE_MAX_WAIT)."""
        if waited > CHECK_BESIDE_MAX_WAIT:
            self._check_first_runs = self._check_first_backoff
            self._check_first_backoff = min(2 * self._check_first_backoff, CHECK_FIRST_MAX_RUNS)
        else:
            self._check_first_backoff = max(CHECK_FIRST_RUNS, self._check_first_backoff // 2)

    async def _run_carried(
        self,
        sender: str,
        header: dict[str, Any],
        kernel: Any,
        kernel_name: str,
        job_id: str,
        shard: int,
        metas: dict[str, ArrayMeta],
        digests: dict[str, str],
        announced: int,
        carried: dict[str, np.ndarray],
        unchecked: bool,
    ) -> Payload:
        arrays: dict[str, np.ndarray] = {}
        inputs: dict[str, str] = {}
        wanted = self._keep_field(header, carried)
        kept = [
            name
            for name in carried
            if name in kernel.resident
            and name in wanted
            and metas[name].digest not in self.operands
        ]
        if kept and unchecked:
            await self._check_now(sender, carried, metas)  # nothing unchecked is kept
            unchecked = False
        # Kept as if uploaded, once this run computes (see _compute_keeping).
        keeping = {metas[name].digest: carried[name] for name in kept}
        # A run carrying operands never waits for others (it would hold its bytes meanwhile):
        # what it lacks is "missing operands" at once.
        if not carried and header.get("wait_operands") is True and self._may_wait(sender):
            # Pipelined: the requester sent this run together with the uploads it needs. A
            # run this worker would refuse is refused before it waits, and waiting runs are
            # bounded per sender and in all (beyond, the run is answered at once and the
            # requester asks again when its uploads are done).
            self._agreed_price(header.get("max_price"))
            self._refuse_unpaid(sender)
            self._waiting_runs[sender] = self._waiting_runs.get(sender, 0) + 1
            try:
                await self._await_operands(sender, set(digests.values()), announced)
            finally:
                self._waiting_runs[sender] -= 1
                if not self._waiting_runs[sender]:
                    del self._waiting_runs[sender]
        missing = []
        for name, digest in digests.items():
            array = carried.get(name)
            if array is None:
                array = self.operands.get(digest)
            if array is None:
                missing.append(digest)
                continue
            arrays[name] = array
            inputs[name] = digest
        if missing:
            raise RemoteError("missing operands: " + ",".join(missing))
        try:
            kernel.check_operands(arrays)
        except KernelError as exc:
            raise RemoteError(f"bad operands for {kernel_name}: {exc}") from exc
        flops = int(kernel.flops(arrays))
        price = self._agreed_price(header.get("max_price"))
        cost = shard_cost_nano(price, flops)
        # At least one nano-credit for any paid shard (see shard_cost_nano): a requester
        # with no credit gets no work, however small the pieces; a worker asking 0 (a
        # volunteer) gives its work away by its own choice.
        self._refuse_unpaid(sender)
        available = None
        if self._credit is not None:
            # A ledger read may wait for a write in progress: never on the event loop. Read
            # after any wait for operands, so that shards countersigned meanwhile are not
            # counted twice (once in the balance, once more as owed).
            available = self._credit_now(sender) if self._credit_now is not None else None
            if available is None:
                available = await self._runtime.run_blocking(self._credit, sender)
        # Each run is owed on its own, keyed like its receipt will be (job, shard, start):
        # a requester re-running one (job_id, shard), which it chooses, must not have all
        # its runs counted (and cleared by one countersign) as one.
        started = self._clock.now()
        reservation = (job_id, shard, started)
        self._reserve_credit(sender, reservation, cost, available)
        self.stats.active += 1
        signed = lied = False
        # Begun only now, once nothing but the kernel stands between the run and its answer:
        # a run refused before it (its price, its credit, a missing operand) costs no hash.
        unverified = None
        if unchecked:
            unverified = self._runtime.beside(
                _check_carried, [(name, metas[name], carried[name]) for name in carried]
            )
        try:
            # Resident operands (weights, B) are keyed by content hash so that a GPU backend
            # keeps them on the device between shards of the same job.
            # Operands not checked yet are given no content key: a GPU backend would keep
            # them on the device under it, for other runs to take as the operand it names.
            keys = (
                inputs
                if unverified is None
                else {n: d for n, d in inputs.items() if n not in carried}
            )
            output = await self._compute_keeping(kernel, arrays, keys, keeping)
            ended = self._clock.now()
            if unverified is not None:
                checked, unverified = unverified, None
                self._note_wait(self._verified(sender, checked))
            if self.fault_rate and self._rng.random() < self.fault_rate:
                output = self._corrupt(output)
            output = np.ascontiguousarray(output)
            # The output is hashed once, here (its receipt names the hash).
            output_meta = await self._runtime.run_blocking(
                meta_of, output, cheap=output.nbytes < HASH_OFF_LOOP_BYTES
            )
            body = ReceiptBody(
                job_id=job_id,
                shard=shard,
                kernel=kernel_name,
                inputs=inputs,
                output=output_meta.digest,
                flops=flops,
                started=started,
                ended=max(ended, started),
                worker=self._identity.peer_id,
                requester=sender,
                price=price,
            )
            receipt = sign_as_worker(self._identity, body)
            signed = True
        except _CarriedMismatch:
            # The requester's fault, not the kernel's: the kernel it cost stays owed, and
            # counts towards the sender's unpaid work like a shard never countersigned.
            lied = True
            raise
        except Exception as exc:
            self.stats.shards_failed += 1
            log.warning("kernel %s failed: %s", kernel_name, exc)
            raise RemoteError(f"kernel failed: {type(exc).__name__}") from exc
        finally:
            if unverified is not None:
                # The kernel failed or the run was cut off: the request's bytes (and their
                # accounting) are given back only once no thread reads them.
                with contextlib.suppress(Exception):
                    unverified.result()
            self.stats.active -= 1
            if not signed and not lied:
                # No receipt left this worker (the kernel failed, or the handler was cut off
                # by its deadline or a lost connection): nothing is owed for it.
                self._release(sender, reservation)
        # Keep what will be asked for again: resident operands (weights, B) for the next
        # shards, and an output too large to travel in the answer (it is downloaded next).
        # A shard's own slice is never reused; dropping it bounds memory by the working set.
        keep = {digest for name, digest in inputs.items() if name in kernel.resident}
        for name, digest in inputs.items():
            if name not in kernel.resident and digest not in keep:
                self.operands.discard(digest)
        if output.nbytes > CHUNK_BYTES:
            self.operands.put(output, output_meta.digest)
            self._output_requester[output_meta.digest] = sender
            self._output_requester.move_to_end(output_meta.digest)
            while len(self._output_requester) > MAX_OUTPUTS_REMEMBERED:
                forgotten, _ = self._output_requester.popitem(last=False)
                self._sealed_at.pop(forgotten, None)
        self.stats.shards_run += 1
        self.stats.compute_seconds += ended - started
        self.shard_seconds.observe(max(0.0, ended - started))
        self.stats.by_kernel[kernel_name] = self.stats.by_kernel.get(kernel_name, 0) + 1
        # A view of the (contiguous) output, sealed from where it lies (no copy into a reply).
        payload = memoryview(output).cast("B") if output.nbytes <= CHUNK_BYTES else b""
        return pack_gathered(
            {
                "output": output_meta.to_json(),
                "receipt": base64.b64encode(receipt.encode()).decode("ascii"),
            },
            [payload],
        )

    @staticmethod
    def _keep_field(header: dict[str, Any], carried: dict[str, np.ndarray]) -> Collection[str]:
        """The carried operands the requester wants kept for its later shards (``keep``):
        all of them when it does not say (requesters before ``keep``). A B used by one shard
        only is not worth its copy (fresh pages, on this worker's loop or a core)."""
        keep = header.get("keep")
        if keep is None:
            return carried.keys()
        if not isinstance(keep, list) or not all(isinstance(name, str) for name in keep):
            raise RemoteError("field 'keep' must be a list of operand names")
        return set(keep)

    async def _compute_keeping(
        self,
        kernel: Any,
        arrays: dict[str, np.ndarray],
        inputs: dict[str, str],
        keeping: dict[str, np.ndarray],
    ) -> np.ndarray:
        """Run the kernel, and keep the operands in ``keeping`` (digest -> a view of the run
        request): at once as that view (runs arriving meanwhile find it), and in memory of
        their own once a copy made on a thread while the kernel runs is done. A view alone
        would hold the whole request, its other operands too, for as long as the store keeps
        it; a copy that does not finish (the run cut off) leaves nothing behind.

        Why beside the kernel: the copy lands in fresh pages (the store keeps it), 0.78 ms per
        MiB measured against 0.22 ms into reused ones, and it was on a one-shard job's
        critical path."""
        # One larger than the whole store is not kept (its put would fail half-way, a review
        # found, leaving the views stored before it behind).
        keeping = {d: v for d, v in keeping.items() if v.nbytes <= self.operands.max_bytes}
        if not keeping:
            return await self.executor.execute(kernel, arrays, inputs)
        try:
            for digest, view in keeping.items():
                self.operands.put(view, digest)
        except BaseException:
            for digest, view in keeping.items():
                self.operands.replace(digest, view, None)
            raise
        self._operands_changed()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep_copies, keeping)
                return await self.executor.execute(kernel, arrays, inputs)
        except BaseExceptionGroup as group:
            # One task failed (the kernel, or the copy out of memory): its own error, not a
            # group, reaches the run's error handling.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise

    async def _keep_copies(self, keeping: dict[str, np.ndarray]) -> None:
        copies: dict[str, np.ndarray] = {}
        try:
            copies = await self._runtime.run_blocking(
                lambda: {digest: view.copy() for digest, view in keeping.items()}
            )
        finally:
            for digest, view in keeping.items():
                self.operands.replace(digest, view, copies.get(digest))

    async def _inline_operands(
        self,
        header: dict[str, Any],
        body: memoryview,
        metas: dict[str, ArrayMeta],
        *,
        unchecked: bool = False,
    ) -> tuple[dict[str, np.ndarray], bool]:
        """The operands a run request carries (its ``inline`` field and body), each a view of
        the request checked against its description's hash; RemoteError for anything else
        (names not described or repeated, a body of another length, a hash that differs).
        Returns them and whether they are still unchecked.

        ``unchecked``: the run is served alone, so a core is idle (its requester waits):
        when every carried operand is small enough to hash on the event loop, they are
        returned unchecked, for the caller to check beside the kernel on a helper thread
        (``Runtime.beside``) and collect before it keeps, signs or sends anything. The
        kernel's products release the GIL to it: in one-shard 512³ jobs the worker's 0.5 ms
        of hashing came off the round trip (BENCHMARKS.md)."""
        names = header.get("inline", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise RemoteError("field 'inline' must be a list of operand names")
        if len(set(names)) != len(names) or any(n not in metas for n in names):
            raise RemoteError("field 'inline' names an operand twice or one not described")
        sizes = [metas[name].nbytes for name in names]
        if sum(sizes) > INLINE_OPERAND_BYTES:
            raise RemoteError(f"inline operands over {INLINE_OPERAND_BYTES} bytes")
        if sum(sizes) != len(body):
            raise RemoteError("the body is not the inline operands' bytes")
        views: dict[str, memoryview] = {}
        offset = 0
        for name, size in zip(names, sizes, strict=True):
            views[name] = body[offset : offset + size]
            offset += size
        self.stats.bytes_received += len(body)
        if unchecked and names and all(size <= INLINE_CHUNK_BYTES for size in sizes):
            return {name: array_view_unhashed(metas[name], views[name]) for name in names}, True
        carried: dict[str, np.ndarray] = {}
        for name in names:
            try:
                carried[name] = await self._runtime.run_blocking(
                    array_from_bytes,
                    metas[name],
                    views[name],
                    cheap=metas[name].nbytes <= INLINE_CHUNK_BYTES,
                )
            except RecordError as exc:
                raise RemoteError(f"operand {name!r}: {exc}") from exc
        return carried, False

    def _operands_changed(self) -> None:
        """Wake the run requests waiting for operands (an upload started, ended or failed)."""
        self._operands_event.set()
        self._operands_event = trio.Event()

    def _may_wait(self, sender: str) -> bool:
        """Whether another run of ``sender`` may wait for its operands (see _on_run)."""
        return (
            self._waiting_runs.get(sender, 0) < MAX_WAITING_RUNS_PER_SENDER
            and sum(self._waiting_runs.values()) < MAX_WAITING_RUNS
        )

    async def _await_operands(self, sender: str, digests: set[str], announced: int) -> None:
        """Wait until every operand in ``digests`` is held, or until waiting is pointless.

        A run request may travel beside the uploads of its operands (``wait_operands``), so
        that a shard costs one round trip instead of two: an operand is waited for while an
        upload of it from ``sender`` is in progress (that upload's idle timeout and minimum
        rate bound the wait), and for OPERAND_WAIT_GRACE seconds otherwise (its first chunk
        may arrive after the run request); never longer than OPERAND_WAIT_GRACE plus the
        ``announced`` bytes at OPERAND_WAIT_MIN_RATE. What a requester can hold this way is
        MAX_WAITING_RUNS_PER_SENDER idle handlers (MAX_WAITING_RUNS from all).
        """
        grace_ends = trio.current_time() + OPERAND_WAIT_GRACE
        hard_end = grace_ends + announced / OPERAND_WAIT_MIN_RATE
        while True:
            waiting = [d for d in digests if d not in self.operands]
            if not waiting:
                return
            uploading = any(
                (sender, d) in self._pending or (sender, d) in self._local_in_progress
                for d in waiting
            )
            now = trio.current_time()
            if now >= hard_end or (not uploading and now >= grace_ends):
                return
            changed = self._operands_event
            with trio.move_on_at(hard_end if uploading else grace_ends):
                await changed.wait()

    # -- what a requester may take -----------------------------------------------------------

    def _current_price(self) -> float:
        """Our price now, noted in the recent-price history."""
        price = float(self._price())
        now = trio.current_time()
        if not self._prices or self._prices[-1][1] != price:
            self._prices.append((now, price))
        # A price counts as recent while it was in force within the window: drop the ones
        # superseded before it began.
        while len(self._prices) > 1 and self._prices[1][0] < now - PRICE_MEMORY_SECONDS:
            self._prices.popleft()
        return price

    def _agreed_price(self, quoted: Any) -> float:
        """The price of a shard quoted at ``quoted`` (None: no quote, our current price).

        The quote must be no lower than the lowest price this worker asked within
        PRICE_MEMORY_SECONDS (less the rounding slack); the shard is charged the lower of the
        quote and our current price, so a receipt never charges more than was agreed.
        """
        own = self._current_price()
        if quoted is None:
            return own
        if (
            isinstance(quoted, bool)
            or not isinstance(quoted, int | float)
            or not 0 <= quoted <= MAX_PRICE
        ):
            raise RemoteError(f"max_price must be a number between 0 and {MAX_PRICE:g}")
        lowest = min(price for _, price in self._prices)
        floor = lowest * (1 - PRICE_TOLERANCE) - PRICE_ROUNDING
        if quoted < floor or (lowest > 0 and quoted <= 0):
            self.stats.price_refusals += 1
            raise RemoteError(
                f"{PRICE_REFUSED}: max_price {quoted:.9g} is below this worker's price {own:.9g} "
                f"(lowest asked in the last {PRICE_MEMORY_SECONDS:g} s: {lowest:.9g})"
            )
        return min(own, float(quoted))

    def _refuse_unpaid(self, requester: str) -> None:
        """Refuse a requester whose unpaid work has reached the bound (RemoteError, phrased
        as a credit refusal: it is the requester's doing, not a fault of this worker)."""
        self._expire_owed()
        shards, nano = self.unpaid(requester)
        if shards >= self._unpaid_shards or nano >= self._unpaid_nano:
            self.stats.unpaid_refusals += 1
            raise RemoteError(
                f"{CREDIT_REFUSED}: {shards} shards done for this requester "
                f"({nano} nano-credits) were never countersigned; countersign them first"
            )

    def _reserve_credit(
        self, requester: str, reservation: Reservation, cost: int, credit: int | None
    ) -> None:
        """Count the shard as owed at once, so that concurrent requests cannot all pass the
        same check. With ``credit`` (what the ledger lets the requester spend), first refuse
        a shard it cannot cover less the work not yet countersigned (raises RemoteError)."""
        owed = self._owed.get(requester, {})
        if reservation in owed or reservation in self._unpaid.get(requester, {}):
            raise RemoteError("this shard is already being run for you")
        if credit is not None:
            available = credit - sum(c for _, c in owed.values())
            if cost > available:
                self.stats.credit_refusals += 1
                raise RemoteError(
                    f"{CREDIT_REFUSED}: this shard costs {cost} nano-credits, "
                    f"the requester can spend {max(0, available)}"
                )
        self._owed.setdefault(requester, {})[reservation] = (trio.current_time(), cost)

    def _release(self, requester: str, reservation: Reservation) -> None:
        owed = self._owed.get(requester)
        if owed is not None:
            owed.pop(reservation, None)
            if not owed:
                del self._owed[requester]

    def _expire_owed(self) -> None:
        """Owed work older than OWED_MEMORY_SECONDS becomes unpaid; unpaid work older than
        UNPAID_MEMORY_SECONDS is forgotten; the unpaid table keeps its size bound."""
        now = trio.current_time()
        for requester in list(self._owed):
            owed = self._owed[requester]
            expired = [k for k, (since, _) in owed.items() if now - since >= OWED_MEMORY_SECONDS]
            if not expired:
                continue
            unpaid = self._unpaid.setdefault(requester, {})
            for reservation in expired:
                _, cost = owed.pop(reservation)
                unpaid.pop(reservation, None)  # re-inserted: newest last
                unpaid[reservation] = (now, cost)
            # Past the refusal bound more entries tell nothing new: keep the newest few.
            while len(unpaid) > 4 * self._unpaid_shards:
                del unpaid[next(iter(unpaid))]
            if not owed:
                del self._owed[requester]
        for requester in list(self._unpaid):
            unpaid = self._unpaid[requester]
            while unpaid:
                oldest = next(iter(unpaid))
                if now - unpaid[oldest][0] < UNPAID_MEMORY_SECONDS:
                    break
                del unpaid[oldest]
            if not unpaid:
                del self._unpaid[requester]
        if len(self._unpaid) > self._unpaid_requesters:
            # Forget those owing least first, so that many identities each owing a little
            # cannot push out the one that owes most.
            ranked = sorted(self._unpaid, key=lambda r: (self.unpaid(r)[1], self.unpaid(r)[0]))
            for requester in ranked[: len(self._unpaid) - self._unpaid_requesters]:
                del self._unpaid[requester]

    def _corrupt(self, output: np.ndarray) -> np.ndarray:
        self.stats.corrupted_on_purpose += 1
        wrong = np.array(output, copy=True)
        flat = wrong.reshape(-1)
        index = self._rng.randrange(flat.size)
        flat[index] = flat[index] + 1.0 + abs(flat[index])
        return wrong

    async def _on_download(self, sender: str, request: bytes) -> Payload:
        header, _ = self._parse(request)
        digest = _header_field(header, "hash", str)
        offset = _header_field(header, "offset", int)
        length = _header_field(header, "length", int)
        array = self.operands.get(digest)
        if array is None:
            raise RemoteError("no such array")
        if offset < 0 or length <= 0 or length > CHUNK_BYTES:
            raise RemoteError(f"length must be in (0, {CHUNK_BYTES}] and offset non-negative")
        data = memoryview(array).cast("B")
        # Copied once (not joined again after): a view would keep the whole stored array
        # alive, evicted or not, for as long as the answer waits behind others on a slow
        # reader's lane (a review: 64 MiB held per 1-byte download).
        return pack_gathered({"total": array.nbytes}, [bytes(data[offset : offset + length])])

    async def _on_download_local(self, sender: str, request: bytes) -> bytes:
        """An output of one of the sender's runs, for a requester on this machine: moved into
        a sealed copy (the store then holds the copy in the output's place, so it costs no
        memory of its own), whose descriptor the answer names (see local_share.py). The
        descriptor is held open for SHARED_OUTPUT_GRACE_S (the requester opens it at once),
        then closed; the store keeps the copy's pages mapped for chunked downloads, and a
        requester that mapped them keeps them for as long as it needs them."""
        header, _ = self._parse(request)
        digest = _header_field(header, "hash", str)
        host = _header_field(header, "host", str)
        if not self.local_uploads or host != local_share.host_token(sender, self._identity.peer_id):
            raise RemoteError(local_share.NOT_LOCAL + "this worker is on another machine")
        while (sealing := self._sealing.get(digest)) is not None:
            await sealing[0].wait()  # another request is moving it: its copy serves this one
        self._close_lapsed_copies()
        array = self.operands.peek(digest)
        if array is None or self._output_requester.get(digest) != sender:
            raise RemoteError("no such output")
        if array.nbytes < local_share.MIN_LOCAL_BYTES:
            raise RemoteError("output refused: too small to share; download it")
        copy = self._open_copies.get(digest)
        if copy is None:
            sealed_at = self._sealed_at.get(digest)
            if sealed_at is not None and trio.current_time() - sealed_at < RESEAL_AFTER_S:
                raise RemoteError("busy: this output was shared a moment ago; download it")
            copy = await self._seal_output(sender, digest, array)
        else:  # answered with again: open for as long as a new one would be
            copy.until = max(copy.until, trio.current_time() + SHARED_OUTPUT_GRACE_S)
        self.stats.outputs_shared += 1
        self.stats.output_bytes_shared += array.nbytes
        return pack({"pid": os.getpid(), "fd": copy.fd})

    async def _seal_output(self, sender: str, digest: str, array: np.ndarray) -> _OpenCopy:
        """Move the stored output ``digest`` into a sealed copy held open for ``sender``."""
        now = trio.current_time()
        mine_open = [d for d, c in self._open_copies.items() if c.sender == sender]
        while mine_open and len(mine_open) >= MAX_OPEN_COPIES_PER_SENDER:
            oldest = mine_open[0]  # the table is in the order copies were made
            if self._open_copies[oldest].made > now - SHARED_OUTPUT_MIN_OPEN_S:
                break
            os.close(self._open_copies.pop(oldest).fd)
            mine_open.pop(0)
        mine = len(mine_open)
        mine += sum(1 for _, s in self._sealing.values() if s == sender)
        sender_reserved = self._reserved_by_sender.get(sender, 0)
        # The copy is a second one of the output until it takes the original's place:
        # reserved as an upload in progress is, within the same budgets. Copies being made
        # count as open ones.
        if (
            len(self._sealing) >= MAX_OUTPUTS_SEALING
            or len(self._open_copies) + len(self._sealing) >= MAX_OPEN_COPIES
            or mine >= MAX_OPEN_COPIES_PER_SENDER
            or sender_reserved + array.nbytes > MAX_PENDING_UPLOAD_BYTES_PER_PEER
            or self._reserved_total + array.nbytes > MAX_PENDING_UPLOAD_BYTES
        ):
            raise RemoteError("busy: too many outputs being shared; download it")
        done = trio.Event()
        self._sealing[digest] = (done, sender)
        self._reserved_total += array.nbytes
        self._reserved_by_sender[sender] = sender_reserved + array.nbytes
        try:
            fd, shared = await self._runtime.run_blocking(
                local_share.sealed_output, array, digest, self._identity.peer_id
            )
        except OSError as exc:
            raise RemoteError(f"output not shared ({exc}); download it") from exc
        finally:
            del self._sealing[digest]
            done.set()
            self._reserved_total -= array.nbytes
            _take_back(self._reserved_by_sender, sender, array.nbytes)
        # In the original's place if the store still holds it; one evicted meanwhile is gone,
        # as for a download, and one stored again meanwhile (another run with the same bytes)
        # is left as it is: a copy that is not the store's is never answered with.
        self.operands.replace(digest, array, shared)
        if self.operands.peek(digest) is not shared:
            os.close(fd)
            if digest not in self.operands:
                raise RemoteError("no such output")
            raise RemoteError("busy: the output was stored again meanwhile; download it")
        now = trio.current_time()
        copy = self._open_copies[digest] = _OpenCopy(
            fd, sender, shared, now, now + SHARED_OUTPUT_GRACE_S
        )
        self._sealed_at[digest] = now
        return copy

    def _close_lapsed_copies(self, *, every: bool = False) -> None:
        """Close the descriptors of sealed outputs past their grace, or whose output the
        store no longer holds (``every``: all of them)."""
        now = trio.current_time()
        for digest, copy in list(self._open_copies.items()):
            if every or copy.until <= now or self.operands.peek(digest) is not copy.array:
                del self._open_copies[digest]
                os.close(copy.fd)

    @property
    def open_output_copies(self) -> int:
        """Sealed copies of outputs whose descriptors are open now."""
        return len(self._open_copies)

    async def _on_countersign(self, sender: str, request: bytes) -> bytes:
        header, body = self._parse(request)
        if "receipts" in header:
            return await self._on_countersigned_batch(sender, header, body)
        encoded = _header_field(header, "receipt", str)
        try:
            data = base64.b64decode(encoded, validate=True)
        except ValueError as exc:
            raise RemoteError(f"receipt rejected: {exc}") from exc
        receipt = self._countersigned_receipt(sender, data)
        return pack({"stored": await self._take_countersigned(sender, receipt)})

    async def _on_countersigned_batch(
        self, sender: str, header: dict[str, Any], body: bytes
    ) -> bytes:
        """Several countersigned receipts in one request (the requester's courier delivers
        what one settlement batch gave each worker together: a request per receipt cost both
        peers its handling; batched, a 200-shard job ran 10-16% faster here).
        Every receipt is checked before any is taken; one that fails refuses the request."""
        sizes = header.get("receipts")
        if (
            not isinstance(sizes, list)
            or not 0 < len(sizes) <= MAX_COUNTERSIGN_BATCH
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes)
            or sum(sizes) != len(body)
        ):
            raise RemoteError(
                f"field 'receipts' must list 1-{MAX_COUNTERSIGN_BATCH} sizes of the body's receipts"
            )
        receipts: list[Receipt] = []
        offset = 0
        for size in sizes:
            data = body[offset : offset + size]
            offset += size
            receipts.append(self._countersigned_receipt(sender, data))
        stored: list[bool] = [False] * len(receipts)

        async def take(index: int) -> None:
            stored[index] = await self._take_countersigned(sender, receipts[index])

        # Together: they share the receipt store's group commit and the ledger's.
        async with trio.open_nursery() as nursery:
            for index in range(len(receipts)):
                nursery.start_soon(take, index)
        return pack({"stored": stored})

    def _countersigned_receipt(self, sender: str, data: bytes) -> Receipt:
        """A complete receipt ``sender`` countersigned for this worker, decoded and verified;
        RemoteError for anything else."""
        try:
            receipt = decode_receipt(data)
        except (RecordError, ValueError) as exc:
            raise RemoteError(f"receipt rejected: {exc}") from exc
        if receipt.body.worker != self._identity.peer_id or receipt.body.requester != sender:
            raise RemoteError("receipt names other peers")
        return receipt

    async def _take_countersigned(self, sender: str, receipt: Receipt) -> bool:
        """Store a countersigned receipt, enter it into the ledger and clear what it pays;
        whether it was new here.

        Into the ledger only when new in the store: one run's receipt countersigned again is
        not another payment, and each run of a shard is its own receipt (the store keys by
        body, so by start too), paid on its own as it was reserved. A copy arriving while
        another delivery of the same run is under way waits for that one, then goes on as its
        own delivery (finding the receipt stored, it changes nothing). It released the run at
        once before, so that a credit check while the other's ledger write was still queued
        counted the shard neither as owed nor as spent (a hostile review, 2026-12-06: a
        receipt sent twice in one batch bought a shard past the requester's credit)."""
        reservation = (receipt.body.job_id, receipt.body.shard, receipt.body.started)
        while (under_way := self._countersigning.get((sender, reservation))) is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(LEDGER_WRITE_WAIT) as late:
                await under_way.wait()
            if late.cancelled_caught:
                return False  # the other is still at it: this copy changes nothing
            # The other has ended, stored or not (its store may have failed): this copy goes
            # on as a delivery of its own, and answers what the store says.
        done = self._countersigning[(sender, reservation)] = trio.Event()
        stored = False
        try:
            # Shielded, within a bound: a handler cancelled (its stream cut, its deadline)
            # must not release the reservation while the store's or the ledger's write is
            # still queued (a review: a batch cut off mid-commit left its receipts stored
            # and their reservations held, to count as unpaid later).
            with trio.CancelScope(shield=True), trio.move_on_after(LEDGER_WRITE_WAIT):
                # Group-committed with other receipts arriving meanwhile; "stored" is
                # answered only once the commit holding this one is on disk.
                stored = await self.receipts.add_async(receipt, self._runtime.run_blocking)
                if stored and self._on_receipt is not None:
                    await self._on_receipt(receipt)
        finally:
            # Released once the receipt's ledger entry is stored (or refused), not before: a
            # credit check in between would count the shard neither as owed nor as spent.
            self._release(sender, reservation)
            unpaid = self._unpaid.get(sender)
            if unpaid is not None:
                unpaid.pop(reservation, None)  # paid late: no longer held against it
                if not unpaid:
                    del self._unpaid[sender]
            del self._countersigning[(sender, reservation)]
            done.set()
        return stored
