"""The requester's side of the compute protocols: one worker, one operation at a time.

The scheduler composes these: make sure a worker holds the operands (uploading in chunks only
what it lacks), run a shard, fetch its output, send the countersigned receipt.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import trio

from mtor_p2p.compute.protocol import (
    CHUNK_BYTES,
    MAX_ARRAY_BYTES,
    MAX_MESSAGE_BYTES,
    PROTOCOL_COUNTERSIGN,
    PROTOCOL_DOWNLOAD,
    PROTOCOL_HAS,
    PROTOCOL_RUN,
    PROTOCOL_UPLOAD,
)
from mtor_p2p.network import Network, NetworkError
from mtor_p2p.records.arrays import ArrayMeta, array_from_bytes, meta_of, pack, unpack
from mtor_p2p.records.receipts import Receipt, decode_receipt
from mtor_p2p.wire import RecordError


class WorkerMisbehaved(Exception):
    """The worker answered with something malformed or inconsistent (not just an error)."""


@dataclass(frozen=True)
class ShardAnswer:
    """A worker's answer to a run request: its output and the receipt it signed."""

    output: np.ndarray
    receipt: Receipt


async def missing_operands(
    network: Network, worker: str, metas: list[ArrayMeta], *, timeout: float
) -> list[ArrayMeta]:
    """Which of ``metas`` the worker does not hold."""
    reply = await network.request(
        worker, PROTOCOL_HAS, pack({"hashes": [m.digest for m in metas]}), timeout=timeout
    )
    header, _ = unpack(reply)
    have = set(header.get("have", []))
    return [m for m in metas if m.digest not in have]


async def upload(network: Network, worker: str, array: np.ndarray, *, timeout: float) -> None:
    """Send ``array`` to ``worker`` in chunks of at most CHUNK_BYTES."""
    meta = meta_of(array)
    data = memoryview(np.ascontiguousarray(array)).cast("B")
    offset = 0
    while True:
        chunk = bytes(data[offset : offset + CHUNK_BYTES])
        reply = await network.request(
            worker,
            PROTOCOL_UPLOAD,
            pack({"array": meta.to_json(), "offset": offset}, chunk),
            timeout=timeout,
        )
        header, _ = unpack(reply)
        if header.get("complete"):
            return
        offset += len(chunk)
        if offset >= meta.nbytes or header.get("received") != offset:
            raise WorkerMisbehaved("worker lost track of the upload")


async def ensure_operands(
    network: Network,
    worker: str,
    operands: dict[str, np.ndarray],
    *,
    timeout: float,
    in_flight: dict[tuple[str, str], trio.Event] | None = None,
) -> int:
    """Upload every operand the worker lacks; return how many bytes were sent.

    ``in_flight`` (shared by concurrent callers) makes a second caller wait for an upload of
    the same operand to the same worker instead of interleaving its chunks with the first.
    """
    metas = {name: meta_of(a) for name, a in operands.items()}
    by_digest = {metas[name].digest: operands[name] for name in operands}
    lacking = await missing_operands(network, worker, list(metas.values()), timeout=timeout)
    in_flight = {} if in_flight is None else in_flight
    sent = 0
    for meta in lacking:
        key = (worker, meta.digest)
        if key in in_flight:
            # If that upload fails, the run request reports the operand missing and the
            # shard is retried: no need to second-guess it here.
            await in_flight[key].wait()
            continue
        finished = in_flight[key] = trio.Event()
        try:
            await upload(network, worker, by_digest[meta.digest], timeout=timeout)
        finally:
            finished.set()
            del in_flight[key]
        sent += meta.nbytes
    return sent


async def download(network: Network, worker: str, meta: ArrayMeta, *, timeout: float) -> np.ndarray:
    """Fetch an array by hash in chunks; its hash is checked."""
    parts: list[bytes] = []
    received = 0
    while received < meta.nbytes:
        length = min(CHUNK_BYTES, meta.nbytes - received)
        reply = await network.request(
            worker,
            PROTOCOL_DOWNLOAD,
            pack({"hash": meta.digest, "offset": received, "length": length}),
            timeout=timeout,
            max_response_bytes=MAX_MESSAGE_BYTES,
        )
        _, body = unpack(reply)
        if not body:
            raise WorkerMisbehaved("worker sent an empty chunk")
        parts.append(body)
        received += len(body)
    try:
        return array_from_bytes(meta, b"".join(parts))
    except RecordError as exc:
        raise WorkerMisbehaved(f"downloaded output: {exc}") from exc


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
) -> ShardAnswer:
    """Run one shard on ``worker`` (operands must already be there) and fetch its output.

    With ``terms``, the worker's signed receipt must keep to them (price, FLOPs, requester,
    times): the requester countersigns whatever it accepts here, so it checks first.
    """
    described = {name: meta_of(array).to_json() for name, array in operands.items()}
    header: dict[str, Any] = {
        "job_id": job_id,
        "shard": shard,
        "kernel": kernel,
        "operands": described,
    }
    if terms is not None:
        header["max_price"] = terms.max_price
    reply = await network.request(
        worker, PROTOCOL_RUN, pack(header), timeout=timeout, max_response_bytes=MAX_MESSAGE_BYTES
    )
    try:
        answer, body = unpack(reply)
        meta = ArrayMeta.from_json(answer.get("output"), max_bytes=MAX_ARRAY_BYTES)
        receipt = decode_receipt(base64.b64decode(answer["receipt"]), require_complete=False)
    except (RecordError, KeyError, ValueError, TypeError) as exc:
        raise WorkerMisbehaved(f"malformed run answer: {exc}") from exc
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
    if terms is not None:
        terms.check(receipt)
    if body:
        try:
            output = array_from_bytes(meta, body)
        except RecordError as exc:
            raise WorkerMisbehaved(f"output: {exc}") from exc
    else:
        output = await download(network, worker, meta, timeout=transfer_timeout)
    return ShardAnswer(output, receipt)


async def send_countersigned(
    network: Network, worker: str, receipt: Receipt, *, timeout: float
) -> bool:
    """Give the worker its countersigned receipt; False if it could not be delivered."""
    try:
        reply = await network.request(
            worker,
            PROTOCOL_COUNTERSIGN,
            pack({"receipt": base64.b64encode(receipt.encode()).decode("ascii")}),
            timeout=timeout,
        )
    except NetworkError:
        return False
    header, _ = unpack(reply)
    return bool(header.get("stored", True))
