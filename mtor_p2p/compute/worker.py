"""The worker side of compute: receive operands, run kernel shards, sign what it returns.

Everything a remote peer sends is checked before use: header shapes and sizes, dtypes, the
blake3 hash of every uploaded operand, the kernel's own operand checks. A bad request costs its
sender a one-line :class:`RemoteError`; the worker keeps serving.
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio

from mtor_kernels import KERNELS, KernelError, get_kernel
from mtor_kernels.backend import Backend
from mtor_p2p.clock import NetClock
from mtor_p2p.compute.executor import BackendExecutor, ShardExecutor
from mtor_p2p.compute.protocol import (
    CHUNK_BYTES,
    MAX_ARRAY_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_PENDING_UPLOAD_BYTES,
    PROTOCOL_COUNTERSIGN,
    PROTOCOL_DOWNLOAD,
    PROTOCOL_HAS,
    PROTOCOL_RUN,
    PROTOCOL_UPLOAD,
)
from mtor_p2p.compute.receipt_store import ReceiptStore
from mtor_p2p.identity import Identity
from mtor_p2p.network import Network, RemoteError
from mtor_p2p.records.arrays import (
    ArrayMeta,
    OperandStore,
    array_from_bytes,
    meta_of,
    pack,
    unpack,
)
from mtor_p2p.records.receipts import (
    MAX_PRICE,
    Receipt,
    ReceiptBody,
    decode_receipt,
    shard_cost_nano,
    sign_as_worker,
)
from mtor_p2p.runtime import Runtime
from mtor_p2p.wire import RecordError

log = logging.getLogger(__name__)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
#: How a refusal for lack of credit starts, so that requesters can tell it apart.
CREDIT_REFUSED = "credit refused"
#: Work done but never countersigned stops counting against a requester's credit after this.
OWED_MEMORY_SECONDS = 600.0
UPLOAD_IDLE_TIMEOUT = 60.0
RUN_TIMEOUT = 600.0


@dataclass
class _PendingUpload:
    meta: ArrayMeta
    buffer: bytearray
    last_progress: float


@dataclass
class WorkerStats:
    """What the worker has done (shown by the control API)."""

    shards_run: int = 0
    shards_failed: int = 0
    uploads_refused: int = 0
    bytes_received: int = 0
    corrupted_on_purpose: int = 0
    credit_refusals: int = 0
    compute_seconds: float = 0.0
    active: int = 0
    by_kernel: dict[str, int] = field(default_factory=dict)


def _header_field(header: dict[str, Any], name: str, kind: type) -> Any:
    value = header.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise RemoteError(f"header field {name!r} missing or of the wrong type")
    return value


class WorkerService:
    """Serves the compute protocols on ``network``.

    ``fault_rate`` makes the worker return a wrong result for that fraction of its shards. It
    exists so that tests and devnets can exercise the network's defences (verification, fault
    proofs, re-issue); an honest node leaves it at 0.
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
        on_receipt: Callable[[Receipt], Awaitable[None]] | None = None,
    ) -> None:
        self._network = network
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
        self.stats = WorkerStats()
        # Credit control: ``credit(requester)`` is what the ledger lets that requester still
        # spend (nano-credits); work this worker did for it that is not yet countersigned
        # counts against that too. None: serve everyone (no ledger).
        self._credit = credit
        self._on_receipt = on_receipt
        self._owed: dict[str, dict[tuple[str, int], tuple[float, int]]] = {}

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
        handle(PROTOCOL_HAS, self._on_has, max_request_bytes=64 * 1024, timeout=10)
        handle(PROTOCOL_RUN, self._on_run, max_request_bytes=64 * 1024, timeout=RUN_TIMEOUT)
        handle(PROTOCOL_DOWNLOAD, self._on_download, max_request_bytes=64 * 1024, timeout=60)
        handle(PROTOCOL_COUNTERSIGN, self._on_countersign, max_request_bytes=64 * 1024, timeout=10)

    # -- handlers --------------------------------------------------------------------------

    @staticmethod
    def _parse(request: bytes) -> tuple[dict[str, Any], bytes]:
        try:
            return unpack(request)
        except RecordError as exc:
            raise RemoteError(f"malformed message: {exc}") from exc

    def _expire_uploads(self) -> None:
        now = trio.current_time()
        for key in [
            k for k, p in self._pending.items() if now - p.last_progress > UPLOAD_IDLE_TIMEOUT
        ]:
            del self._pending[key]

    async def _on_upload(self, sender: str, request: bytes) -> bytes:
        header, chunk = self._parse(request)
        try:
            meta = ArrayMeta.from_json(header.get("array"), max_bytes=MAX_ARRAY_BYTES)
        except RecordError as exc:
            raise RemoteError(str(exc)) from exc
        offset = _header_field(header, "offset", int)
        if meta.digest in self.operands:
            return pack({"complete": True, "received": meta.nbytes})
        self._expire_uploads()
        key = (sender, meta.digest)
        pending = self._pending.get(key)
        if pending is None:
            if offset != 0:
                raise RemoteError("upload must start at offset 0")
            reserved = sum(len(p.buffer) for p in self._pending.values())
            if reserved + meta.nbytes > MAX_PENDING_UPLOAD_BYTES:
                self.stats.uploads_refused += 1
                raise RemoteError("busy: too many uploads in progress")
            pending = _PendingUpload(meta, bytearray(), trio.current_time())
            self._pending[key] = pending
        if pending.meta != meta or offset != len(pending.buffer):
            del self._pending[key]
            raise RemoteError("upload chunks must arrive in order with the same description")
        if len(chunk) > CHUNK_BYTES or offset + len(chunk) > meta.nbytes:
            del self._pending[key]
            raise RemoteError("chunk overruns the announced array")
        pending.buffer += chunk
        pending.last_progress = trio.current_time()
        self.stats.bytes_received += len(chunk)
        if len(pending.buffer) < meta.nbytes:
            return pack({"complete": False, "received": len(pending.buffer)})
        del self._pending[key]
        try:
            array = array_from_bytes(meta, bytes(pending.buffer))
        except RecordError as exc:
            self.stats.uploads_refused += 1
            raise RemoteError(str(exc)) from exc
        self.operands.put(array, meta.digest)
        return pack({"complete": True, "received": meta.nbytes})

    async def _on_has(self, sender: str, request: bytes) -> bytes:
        header, _ = self._parse(request)
        hashes = _header_field(header, "hashes", list)
        if len(hashes) > 64:
            raise RemoteError("ask about at most 64 hashes at once")
        return pack({"have": [h for h in hashes if isinstance(h, str) and h in self.operands]})

    async def _on_run(self, sender: str, request: bytes) -> bytes:
        header, _ = self._parse(request)
        job_id = _header_field(header, "job_id", str)
        if not _HEX64.match(job_id):
            raise RemoteError("job_id must be 64 hex characters")
        shard = _header_field(header, "shard", int)
        kernel_name = _header_field(header, "kernel", str)
        try:
            kernel = get_kernel(kernel_name)
        except KernelError as exc:
            raise RemoteError(f"unknown kernel {kernel_name[:40]!r}") from exc
        described = _header_field(header, "operands", dict)
        arrays: dict[str, np.ndarray] = {}
        inputs: dict[str, str] = {}
        missing = []
        for name, meta_json in list(described.items())[:16]:
            try:
                meta = ArrayMeta.from_json(meta_json, max_bytes=MAX_ARRAY_BYTES)
            except RecordError as exc:
                raise RemoteError(f"operand {name!r}: {exc}") from exc
            array = self.operands.get(meta.digest)
            if array is None:
                missing.append(meta.digest)
                continue
            arrays[str(name)] = array
            inputs[str(name)] = meta.digest
        if missing:
            raise RemoteError("missing operands: " + ",".join(missing))
        try:
            kernel.check_operands(arrays)
        except KernelError as exc:
            raise RemoteError(f"bad operands for {kernel_name}: {exc}") from exc
        # The requester quotes the price it accepted (our advertised one when it chose us);
        # we never charge more than that, so a price that rose since does not surprise it.
        quoted = header.get("max_price", float(self._price()))
        if (
            isinstance(quoted, bool)
            or not isinstance(quoted, int | float)
            or not 0 <= quoted <= MAX_PRICE
        ):
            raise RemoteError(f"max_price must be a number between 0 and {MAX_PRICE:g}")
        price = min(float(self._price()), float(quoted))
        reservation = (job_id, shard)
        if self._credit is not None:
            # A ledger read may wait for a write in progress: never on the event loop.
            available = await self._runtime.run_blocking(self._credit, sender)
            cost = shard_cost_nano(price, int(kernel.flops(arrays)))
            self._reserve_credit(sender, reservation, cost, available)
        started = self._clock.now()
        self.stats.active += 1
        try:
            # Resident operands (weights, B) are keyed by content hash so that a GPU backend
            # keeps them on the device between shards of the same job.
            output = await self.executor.execute(kernel, arrays, inputs)
        except Exception as exc:
            self._owed.get(sender, {}).pop(reservation, None)
            self.stats.shards_failed += 1
            log.warning("kernel %s failed: %s", kernel_name, exc)
            raise RemoteError(f"kernel failed: {type(exc).__name__}") from exc
        finally:
            self.stats.active -= 1
        ended = self._clock.now()
        if self.fault_rate and self._rng.random() < self.fault_rate:
            output = self._corrupt(output)
        output = np.ascontiguousarray(output)
        output_meta = meta_of(output)
        # Keep what will be asked for again: resident operands (weights, B) for the next
        # shards, and an output too large to travel in the answer (it is downloaded next).
        # A shard's own slice is never reused; dropping it bounds memory by the working set.
        keep = {digest for name, digest in inputs.items() if name in kernel.resident}
        for name, digest in inputs.items():
            if name not in kernel.resident and digest not in keep:
                self.operands.discard(digest)
        if output.nbytes > CHUNK_BYTES:
            self.operands.put(output, output_meta.digest)
        body = ReceiptBody(
            job_id=job_id,
            shard=shard,
            kernel=kernel_name,
            inputs=inputs,
            output=output_meta.digest,
            flops=int(kernel.flops(arrays)),
            started=started,
            ended=max(ended, started),
            worker=self._identity.peer_id,
            requester=sender,
            price=price,
        )
        receipt = sign_as_worker(self._identity, body)
        self.stats.shards_run += 1
        self.stats.compute_seconds += ended - started
        self.stats.by_kernel[kernel_name] = self.stats.by_kernel.get(kernel_name, 0) + 1
        payload = output.tobytes() if output.nbytes <= CHUNK_BYTES else b""
        return pack(
            {
                "output": output_meta.to_json(),
                "receipt": base64.b64encode(receipt.encode()).decode("ascii"),
            },
            payload,
        )

    def _reserve_credit(self, requester: str, key: tuple[str, int], cost: int, credit: int) -> None:
        """Refuse a shard whose cost the requester cannot cover with ``credit`` (what the
        ledger lets it spend) less the work not yet countersigned (raises RemoteError);
        otherwise count the shard as owed at once, so that concurrent requests cannot all pass
        the same check."""
        owed = self._owed.setdefault(requester, {})
        now = trio.current_time()
        for key in [k for k, (since, _) in owed.items() if now - since > OWED_MEMORY_SECONDS]:
            del owed[key]  # never countersigned: the requester rejected or dropped it
        available = credit - sum(c for k, (_, c) in owed.items() if k != key)
        if cost > available:
            self.stats.credit_refusals += 1
            raise RemoteError(
                f"{CREDIT_REFUSED}: this shard costs {cost} nano-credits, "
                f"the requester can spend {max(0, available)}"
            )
        owed[key] = (now, cost)

    def _corrupt(self, output: np.ndarray) -> np.ndarray:
        self.stats.corrupted_on_purpose += 1
        wrong = np.array(output, copy=True)
        flat = wrong.reshape(-1)
        index = self._rng.randrange(flat.size)
        flat[index] = flat[index] + 1.0 + abs(flat[index])
        return wrong

    async def _on_download(self, sender: str, request: bytes) -> bytes:
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
        return pack({"total": array.nbytes}, bytes(data[offset : offset + length]))

    async def _on_countersign(self, sender: str, request: bytes) -> bytes:
        header, _ = self._parse(request)
        encoded = _header_field(header, "receipt", str)
        try:
            receipt = decode_receipt(base64.b64decode(encoded, validate=True))
        except (RecordError, ValueError) as exc:
            raise RemoteError(f"receipt rejected: {exc}") from exc
        if receipt.body.worker != self._identity.peer_id or receipt.body.requester != sender:
            raise RemoteError("receipt names other peers")
        stored = await self._runtime.run_blocking(self.receipts.add, receipt)
        self._owed.get(sender, {}).pop((receipt.body.job_id, receipt.body.shard), None)
        if self._on_receipt is not None:
            await self._on_receipt(receipt)
        return pack({"stored": stored})
