"""Hostile *replies* to a requester (issue 8, item 5), tested as thoroughly as hostile requests
to a worker are.

A fake worker registers handlers on memnet that answer the requester's has, upload, run,
download and countersign requests with garbage: bytes that do not unpack, a header that is a
list, missing or forged receipts, outputs of the wrong dtype or shape, truncated bodies, huge
declared sizes, empty or oversized download chunks. Every client function must turn each into
:class:`~mtor_p2p.network.PeerMisbehaved` (as ``client.WorkerMisbehaved``) naming the peer,
never into another exception; a whole job with one hostile and one honest worker completes
with the honest worker's correct result.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing

from mtor_kernels import get_kernel
from mtor_p2p.clock import NetClock
from mtor_p2p.compute import client
from mtor_p2p.compute.protocol import (
    PROTOCOL_COUNTERSIGN,
    PROTOCOL_DOWNLOAD,
    PROTOCOL_HAS,
    PROTOCOL_RUN,
    PROTOCOL_UPLOAD,
)
from mtor_p2p.identity import Identity
from mtor_p2p.memnet import MemNetwork, MemWorld
from mtor_p2p.network import PeerMisbehaved
from mtor_p2p.node import Node
from mtor_p2p.records.arrays import (
    HASH_OFF_LOOP_BYTES,
    ArrayMeta,
    array_from_bytes,
    meta_of,
    pack,
    unpack,
)
from mtor_p2p.records.receipts import (
    Receipt,
    ReceiptBody,
    countersign,
    decode_receipt,
    sign_as_worker,
)
from mtor_p2p.runtime import _begin_on_helper
from mtor_p2p.wire import canonical_json
from tests.products import assert_product_close
from tests.test_virtual_time import cluster

EPOCH = 1_800_000_000.0
JOB = "cd" * 32
RNG = np.random.default_rng(5)

Handler = Callable[[str, bytes], Awaitable[bytes]]


def ident(label: str) -> Identity:
    """A deterministic identity."""
    return Identity(hashlib.sha256(f"hostile replies {label}".encode()).digest())


def framed(header: Any, body: bytes = b"") -> bytes:
    """A frame whose header may be any JSON value (``pack`` only frames objects)."""
    head = canonical_json(header)
    return struct.pack(">I", len(head)) + head + body


GARBAGE = b"\x00\x01garbage"
LIST_HEADER = framed([1, 2, 3])
NOT_JSON = struct.pack(">I", 9) + b"{not json"
HUGE_HEADER_LENGTH = struct.pack(">I", 1 << 30) + b"{}"


def operands() -> dict[str, np.ndarray]:
    return {
        "a": RNG.standard_normal((8, 16)).astype("float32"),
        "b": RNG.standard_normal((16, 12)).astype("float32"),
    }


@dataclass
class Pair:
    """A requester and a fake worker on one memnet world."""

    requester: MemNetwork
    requester_identity: Identity
    worker: MemNetwork
    worker_identity: Identity
    clock: NetClock

    @property
    def worker_id(self) -> str:
        return self.worker_identity.peer_id

    def serve(self, protocol: str, handler: Handler) -> None:
        self.worker.handle(protocol, handler)


@asynccontextmanager
async def pair() -> AsyncIterator[Pair]:
    world = MemWorld(seed=2)
    requester_identity, worker_identity = ident("requester"), ident("worker")
    requester = world.add_peer(requester_identity)
    worker = world.add_peer(worker_identity)
    await requester.connect(worker.addrs()[0])
    yield Pair(requester, requester_identity, worker, worker_identity, NetClock(EPOCH))


def replying(answer: bytes) -> Handler:
    async def handler(sender: str, request: bytes) -> bytes:
        return answer

    return handler


def answer_run(
    p: Pair,
    request: bytes,
    result: np.ndarray,
    *,
    body: bytes | None = None,
    meta: dict[str, Any] | None = None,
    signer: Identity | None = None,
    **changes: Any,
) -> bytes:
    """A run answer for ``request`` carrying ``result``, its receipt signed by the worker;
    ``changes`` alter the receipt's body, ``meta`` and ``body`` what is sent."""
    header, _ = unpack(request)
    output_meta = meta_of(result)
    signer = signer or p.worker_identity
    fields: dict[str, Any] = {
        "job_id": header["job_id"],
        "shard": header["shard"],
        "kernel": header["kernel"],
        "inputs": {name: d["hash"] for name, d in header["operands"].items()},
        "output": (meta or output_meta.to_json())["hash"],
        "flops": int(get_kernel("matmul").flops({"a": np.zeros((8, 16)), "b": np.zeros((16, 12))})),
        "started": p.clock.now(),
        "ended": p.clock.now(),
        "worker": signer.peer_id,
        "requester": p.requester_identity.peer_id,
        "price": 1.0,
    }
    fields.update(changes)
    receipt = sign_as_worker(signer, ReceiptBody(**fields))
    return pack(
        {
            "output": meta or output_meta.to_json(),
            "receipt": base64.b64encode(receipt.encode()).decode("ascii"),
        },
        result.tobytes() if body is None else body,
    )


async def run_shard(p: Pair, ops: dict[str, np.ndarray], **terms: Any) -> client.ShardAnswer:
    shard_terms = None
    if terms:
        shard_terms = client.ShardTerms(
            requester=p.requester_identity.peer_id,
            max_price=terms["max_price"],
            flops=int(get_kernel("matmul").flops(ops)),
            sent_at=p.clock.now(),
            now=p.clock.now,
        )
    return await client.run_shard(
        p.requester,
        p.worker_id,
        job_id=JOB,
        shard=0,
        kernel="matmul",
        operands=ops,
        timeout=10,
        transfer_timeout=10,
        terms=shard_terms,
    )


def misbehaved(p: Pair, match: str | None = None) -> Any:
    """``pytest.raises`` for the peer-fault boundary: WorkerMisbehaved, a PeerMisbehaved."""
    return pytest.raises(client.WorkerMisbehaved, match=match)


def check_names_peer(p: Pair, info: Any) -> None:
    exc = info.value
    assert isinstance(exc, PeerMisbehaved)
    assert exc.peer == p.worker_id
    assert p.worker_id in str(exc)


# -- what the requester expects -----------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("kernel", ["matmul", "mlp", "attention"])
def test_every_kernel_declares_the_dtype_it_returns(kernel: str, dtype: str) -> None:
    """``Kernel.output_dtype`` is what the kernel really returns (float32 for float16 inputs
    too): the requester refuses any other dtype, so it must never refuse an honest answer."""
    from tests.test_compute import random_operands

    spec = get_kernel(kernel)
    ops = random_operands(kernel, dtype)
    output = spec.reference(ops)
    assert output.dtype == spec.output_dtype(ops) == np.float32
    assert output.shape == spec.output_shape(ops)


# -- has ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        GARBAGE,
        LIST_HEADER,
        NOT_JSON,
        HUGE_HEADER_LENGTH,
        b"",
        pack({"have": 5}),
        pack({"have": [[1, 2]]}),
        pack({"have": {"a": 1}}),
        pack({"have": "abc"}),
        pack({}),
    ],
    ids=[
        "garbage",
        "list",
        "not-json",
        "huge-length",
        "empty",
        "int",
        "nested",
        "dict",
        "str",
        "missing",
    ],
)
async def test_a_malformed_has_reply_is_a_peer_fault(
    autojump_clock: trio.testing.MockClock, reply: bytes
) -> None:
    async with pair() as p:
        p.serve(PROTOCOL_HAS, replying(reply))
        ops = operands()
        with misbehaved(p) as info:
            await client.missing_operands(
                p.requester, p.worker_id, [meta_of(a) for a in ops.values()], timeout=5
            )
        check_names_peer(p, info)
        with misbehaved(p):
            await client.ensure_operands(p.requester, p.worker_id, ops, timeout=5)


# -- upload ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        GARBAGE,
        LIST_HEADER,
        NOT_JSON,
        pack({"complete": "yes"}),
        pack({"complete": 1}),
        pack({"complete": False, "received": "many"}),
        pack({"complete": False, "received": 7}),
        pack({"complete": False}),
    ],
    ids=[
        "garbage",
        "list",
        "not-json",
        "str-complete",
        "int-complete",
        "str-received",
        "wrong-received",
        "no-received",
    ],
)
async def test_a_malformed_upload_reply_is_a_peer_fault(
    autojump_clock: trio.testing.MockClock, reply: bytes
) -> None:
    async with pair() as p:
        p.serve(PROTOCOL_UPLOAD, replying(reply))
        with misbehaved(p) as info:
            await client.upload(p.requester, p.worker_id, operands()["a"], timeout=5)
        check_names_peer(p, info)


# -- run ------------------------------------------------------------------------------------


def run_cases() -> dict[str, Callable[[Pair, bytes, dict[str, np.ndarray]], bytes]]:
    """How a hostile worker answers a run request, by name."""

    def right(ops: dict[str, np.ndarray]) -> np.ndarray:
        return ops["a"] @ ops["b"]

    other = ident("someone else")
    return {
        "garbage": lambda p, r, ops: GARBAGE,
        "list-header": lambda p, r, ops: LIST_HEADER,
        "not-json": lambda p, r, ops: NOT_JSON,
        "empty": lambda p, r, ops: b"",
        "no-receipt": lambda p, r, ops: pack({"output": meta_of(right(ops)).to_json()}),
        "no-output": lambda p, r, ops: pack({"receipt": "AAAA"}),
        "receipt-not-base64": lambda p, r, ops: pack(
            {"output": meta_of(right(ops)).to_json(), "receipt": "not base64 !"}
        ),
        "receipt-an-int": lambda p, r, ops: pack(
            {"output": meta_of(right(ops)).to_json(), "receipt": 5}
        ),
        "receipt-garbage": lambda p, r, ops: pack(
            {"output": meta_of(right(ops)).to_json(), "receipt": base64.b64encode(b"x").decode()}
        ),
        "output-a-string": lambda p, r, ops: pack({"output": "x", "receipt": "AAAA"}),
        "receipt-for-another-shard": lambda p, r, ops: answer_run(p, r, right(ops), shard=1),
        "receipt-for-another-job": lambda p, r, ops: answer_run(p, r, right(ops), job_id="ef" * 32),
        "receipt-by-another-peer": lambda p, r, ops: answer_run(p, r, right(ops), signer=other),
        "receipt-for-another-output": lambda p, r, ops: answer_run(
            p, r, right(ops), output="0" * 64
        ),
        "wrong-dtype": lambda p, r, ops: answer_run(p, r, right(ops).astype("float64")),
        "wrong-dtype-float16": lambda p, r, ops: answer_run(p, r, right(ops).astype("float16")),
        "wrong-shape": lambda p, r, ops: answer_run(p, r, right(ops)[:-1]),
        "transposed": lambda p, r, ops: answer_run(p, r, np.ascontiguousarray(right(ops).T)),
        "truncated-body": lambda p, r, ops: answer_run(
            p, r, right(ops), body=right(ops).tobytes()[:-4]
        ),
        "body-too-long": lambda p, r, ops: answer_run(
            p, r, right(ops), body=right(ops).tobytes() + b"\0\0\0\0"
        ),
        "body-of-other-bytes": lambda p, r, ops: answer_run(
            p, r, right(ops), body=np.zeros_like(right(ops)).tobytes()
        ),
    }


@pytest.mark.parametrize("case", list(run_cases()))
async def test_a_malformed_run_reply_is_a_peer_fault(
    autojump_clock: trio.testing.MockClock, case: str
) -> None:
    answer = run_cases()[case]
    async with pair() as p:
        ops = operands()

        async def hostile(sender: str, request: bytes) -> bytes:
            return answer(p, request, ops)

        p.serve(PROTOCOL_RUN, hostile)
        with misbehaved(p) as info:
            await run_shard(p, ops)
        check_names_peer(p, info)


async def test_an_honest_run_reply_passes_the_boundary(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The fake worker's honest answer is accepted: the cases above fail for their flaw."""
    async with pair() as p:
        ops = operands()

        async def honest(sender: str, request: bytes) -> bytes:
            return answer_run(p, request, ops["a"] @ ops["b"])

        p.serve(PROTOCOL_RUN, honest)
        answer = await run_shard(p, ops, max_price=1.0)
        np.testing.assert_array_equal(answer.output, ops["a"] @ ops["b"])
        assert answer.output.dtype == np.float32


async def test_a_receipt_that_overcharges_is_a_peer_fault(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with pair() as p:
        ops = operands()

        async def greedy(sender: str, request: bytes) -> bytes:
            return answer_run(p, request, ops["a"] @ ops["b"], price=5.0)

        p.serve(PROTOCOL_RUN, greedy)
        with misbehaved(p, "charges"):
            await run_shard(p, ops, max_price=1.0)


async def test_a_huge_declared_output_is_refused_before_any_download(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An answer that declares a 1 GiB output (and sends none of it) for an 8x12 shard must
    not make the requester download anything: the declared shape is checked first."""
    async with pair() as p:
        ops = operands()
        huge = {"hash": "1" * 64, "dtype": "float32", "shape": [1 << 14, 1 << 14]}
        downloads = 0

        async def hostile(sender: str, request: bytes) -> bytes:
            return answer_run(p, request, ops["a"] @ ops["b"], meta=huge, body=b"")

        async def serve_download(sender: str, request: bytes) -> bytes:
            nonlocal downloads
            downloads += 1
            header, _ = unpack(request)
            return pack({"total": 1 << 30}, b"\0" * header["length"])

        p.serve(PROTOCOL_RUN, hostile)
        p.serve(PROTOCOL_DOWNLOAD, serve_download)
        with misbehaved(p, "shape"):
            await run_shard(p, ops)
        assert downloads == 0


# -- download -------------------------------------------------------------------------------


async def chunk_reply(request: bytes, data: bytes) -> bytes:
    """A download reply with the chunk of ``data`` that ``request`` asks for."""
    header, _ = unpack(request)
    offset, length = header["offset"], header["length"]
    return pack({"total": len(data)}, data[offset : offset + length])


def download_cases() -> dict[str, Callable[[bytes, np.ndarray], bytes]]:
    """How a hostile worker answers a download request for ``output``, by name."""

    def chunk(request: bytes, output: np.ndarray) -> tuple[int, int, bytes]:
        header, _ = unpack(request)
        offset, length = header["offset"], header["length"]
        return offset, length, output.tobytes()[offset : offset + length]

    return {
        "garbage": lambda r, out: GARBAGE,
        "list-header": lambda r, out: framed(["total"], chunk(r, out)[2]),
        "empty-chunk": lambda r, out: pack({"total": out.nbytes}, b""),
        "chunk-too-long": lambda r, out: pack({"total": out.nbytes}, chunk(r, out)[2] + b"\0"),
        "chunk-too-short": lambda r, out: pack({"total": out.nbytes}, chunk(r, out)[2][:1]),
        "other-bytes": lambda r, out: pack({"total": out.nbytes}, b"\0" * chunk(r, out)[1]),
        "total-a-string": lambda r, out: pack({"total": "big"}, chunk(r, out)[2]),
        "total-wrong": lambda r, out: pack({"total": out.nbytes + 1}, chunk(r, out)[2]),
    }


@pytest.mark.parametrize("case", list(download_cases()))
async def test_a_malformed_download_reply_is_a_peer_fault(
    autojump_clock: trio.testing.MockClock, case: str
) -> None:
    answer = download_cases()[case]
    async with pair() as p:
        ops = operands()
        output = ops["a"] @ ops["b"]

        async def run_without_body(sender: str, request: bytes) -> bytes:
            return answer_run(p, request, output, body=b"")  # "download it"

        async def hostile(sender: str, request: bytes) -> bytes:
            return answer(request, output)

        p.serve(PROTOCOL_RUN, run_without_body)
        p.serve(PROTOCOL_DOWNLOAD, hostile)
        with misbehaved(p) as info:
            await run_shard(p, ops)
        check_names_peer(p, info)
        with misbehaved(p):
            await client.download(p.requester, p.worker_id, meta_of(output), timeout=5)


async def test_an_honest_download_passes_the_boundary(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with pair() as p:
        ops = operands()
        output = ops["a"] @ ops["b"]

        async def run_without_body(sender: str, request: bytes) -> bytes:
            return answer_run(p, request, output, body=b"")

        p.serve(PROTOCOL_RUN, run_without_body)
        p.serve(PROTOCOL_DOWNLOAD, lambda sender, request: chunk_reply(request, output.tobytes()))
        answer = await run_shard(p, ops)
        np.testing.assert_array_equal(answer.output, output)


@pytest.mark.parametrize("tampered", [False, True], ids=["honest", "tampered"])
async def test_a_large_download_is_hashed_through_the_runtime_hook(
    autojump_clock: trio.testing.MockClock, tampered: bool
) -> None:
    """An output of HASH_OFF_LOOP_BYTES or more is hashed through the caller's blocking hook
    (a thread in production: ~10 ms for 32 MiB during which the event loop moves nothing
    else), and a hash that does not match is still the worker's fault."""
    output = np.random.default_rng(3).standard_normal((1024, 1025)).astype(np.float32)
    assert output.nbytes >= HASH_OFF_LOOP_BYTES
    served = bytearray(output.tobytes())
    if tampered:
        served[-1] ^= 1
    hooked: list[Any] = []

    async def hook(fn: Any, *args: Any, **kwargs: Any) -> Any:
        hooked.append(fn)
        return fn(*args)

    async with pair() as p:
        p.serve(PROTOCOL_DOWNLOAD, lambda sender, request: chunk_reply(request, bytes(served)))
        meta = meta_of(output)
        if tampered:
            with misbehaved(p, match="hash mismatch") as info:
                await client.download(p.requester, p.worker_id, meta, timeout=5, run_blocking=hook)
            check_names_peer(p, info)
        else:
            got = await client.download(
                p.requester, p.worker_id, meta, timeout=5, run_blocking=hook
            )
            np.testing.assert_array_equal(got, output)
        assert hooked == [client._checked_array]
        # A small one stays on the loop: a thread hop costs more than its hash.
        hooked.clear()
        small = output[:8]
        p.serve(
            PROTOCOL_DOWNLOAD,
            lambda sender, request: chunk_reply(request, small.tobytes()),
        )
        await client.download(
            p.requester, p.worker_id, meta_of(small), timeout=5, run_blocking=hook
        )
        assert hooked == []


async def test_a_large_downloads_hash_is_ours_not_the_workers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Once every byte has arrived the worker has answered: waiting for a thread (here: a
    hook that takes a second) does not count against its deadline, and a hook that fails by
    itself (no thread could start) is a local error, not the worker's fault."""
    output = np.random.default_rng(4).standard_normal((1024, 1025)).astype(np.float32)

    async def slow(fn: Any, *args: Any, **kwargs: Any) -> Any:
        await trio.sleep(1.0)  # a thread slot comes free late
        return fn(*args)

    async def broken(fn: Any, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("can't start new thread")

    async with pair() as p:
        p.serve(PROTOCOL_DOWNLOAD, lambda sender, request: chunk_reply(request, output.tobytes()))
        meta = meta_of(output)
        with trio.move_on_after(0.5):
            got = await client.download(
                p.requester, p.worker_id, meta, timeout=5, run_blocking=slow
            )
        np.testing.assert_array_equal(got, output)
        with pytest.raises(RuntimeError, match="start new thread"):
            await client.download(p.requester, p.worker_id, meta, timeout=5, run_blocking=broken)


# -- countersign ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [GARBAGE, LIST_HEADER, NOT_JSON, pack({"stored": "yes"})],
    ids=["garbage", "list", "not-json", "str-stored"],
)
async def test_a_malformed_countersign_reply_is_not_a_crash(
    autojump_clock: trio.testing.MockClock, reply: bytes
) -> None:
    """The receipt is countersigned already; a malformed acknowledgement means only that
    delivery is not confirmed (False), never an exception: the scheduler's courier, which
    delivers receipts in the node's nursery, must not die of it."""
    async with pair() as p:
        ops = operands()

        async def honest(sender: str, request: bytes) -> bytes:
            return answer_run(p, request, ops["a"] @ ops["b"])

        p.serve(PROTOCOL_RUN, honest)
        p.serve(PROTOCOL_COUNTERSIGN, replying(reply))
        answer = await run_shard(p, ops)
        complete = countersign(p.requester_identity, answer.receipt)
        assert await client.send_countersigned(p.requester, p.worker_id, complete, timeout=5) is (
            False
        )


# -- a whole job (the nodes of tests/test_virtual_time.py's cluster) ------------------------


def wrong_dtype_run(node: Node) -> Handler:
    """The node's own run handler, its output widened to float64 and the receipt re-signed:
    the right values in the wrong dtype (the attack that was accepted)."""
    honest = node.worker._on_run

    async def hostile(sender: str, request: bytes) -> bytes:
        # The handler answers with a Gathered (header and output unjoined): bytes() joins it.
        # Until 2026-12-05 unpack() got the Gathered itself and raised TypeError, so the
        # attack was never sent and the test passed on the honest worker alone (a review).
        header, body = unpack(bytes(await honest(sender, request)))
        meta = ArrayMeta.from_json(header["output"], max_bytes=1 << 30)
        output = array_from_bytes(meta, body).astype("float64")
        receipt = decode_receipt(base64.b64decode(header["receipt"]), require_complete=False)
        wide = meta_of(output)
        body_fields = dataclasses.replace(receipt.body, output=wide.digest)
        forged = sign_as_worker(node.identity, body_fields)
        return pack(
            {
                "output": wide.to_json(),
                "receipt": base64.b64encode(forged.encode()).decode("ascii"),
            },
            output.tobytes(),
        )

    return hostile


@pytest.mark.parametrize("attack", ["has-garbage", "run-list-header", "run-wrong-dtype"])
async def test_a_job_with_one_hostile_worker_completes_on_the_honest_one(
    autojump_clock: trio.testing.MockClock, attack: str
) -> None:
    """The hostile worker is cheaper, so it is tried; its malformed replies end its attempts
    as misbehaviour (not an ExceptionGroup out of the job), and the honest worker's correct
    float32 result is what the job returns."""
    async with cluster(["requester", "hostile", "honest"]) as c:
        hostile = await c.start("hostile", "WEU", price=0.5)
        requester = await c.start("requester", "WEU", serve=False)
        honest = await c.start("honest", "WEU", price=2.0)
        await c.settle()
        calls = 0
        hostile_network = c.world.network(hostile.peer_id)
        if attack == "has-garbage":
            protocol, handler = PROTOCOL_HAS, replying(GARBAGE)
        elif attack == "run-list-header":
            protocol, handler = PROTOCOL_RUN, replying(LIST_HEADER)
        else:
            protocol, handler = PROTOCOL_RUN, wrong_dtype_run(hostile)

        async def counted(sender: str, request: bytes) -> bytes:
            nonlocal calls
            if sender == requester.peer_id:
                calls += 1
            return await handler(sender, request)

        hostile_network.handle(protocol, counted)
        ops = {
            "a": RNG.standard_normal((256, 250)).astype("float32"),
            "b": RNG.standard_normal((250, 250)).astype("float32"),
        }
        if attack == "has-garbage":
            # Operands a requester never uploaded to a worker are sent without asking, and a
            # run carrying the rest inline does not ask about those it did upload: make it
            # believe both workers hold B, and upload (not carry) the slices, so that it asks.
            for worker in (hostile, honest):
                requester.scheduler.note_uploaded(worker.peer_id, [meta_of(ops["b"])])
                requester.scheduler.no_inline[worker.peer_id] = None
        result = await requester.submit("matmul", ops, shards=4)
        assert calls >= 1, "the hostile worker was never tried"
        assert result.output.dtype == np.float32
        np.testing.assert_allclose(result.output, ops["a"] @ ops["b"], rtol=1e-4, atol=1e-4)
        assert set(result.workers) == {honest.peer_id}
        if attack == "run-wrong-dtype":  # refused for what it sent, not for a crash
            reason = result.workers_out.get(hostile.peer_id, "")
            assert "dtype float64, expected float32" in reason, result.workers_out


def tampered_run(node: Node, how: str) -> Handler:
    """The node's own run handler, its answer spoilt after the fact in a way only the answer's
    own checks see (Freivalds' check passes): ``output-bytes`` flips the lowest bit of the
    output's last element (the receipt names the honest output's hash), ``signature`` puts
    zeros where the worker's signature was."""
    honest = node.worker._on_run

    async def hostile(sender: str, request: bytes) -> bytes:
        header, body = unpack(bytes(await honest(sender, request)))
        if how == "output-bytes":
            spoilt = bytearray(body)
            spoilt[0] ^= 1  # little-endian: the first element's lowest mantissa bit
            return pack(header, bytes(spoilt))
        receipt = decode_receipt(base64.b64decode(header["receipt"]), require_complete=False)
        unsigned = Receipt(receipt.body, bytes(len(receipt.worker_signature)))
        header["receipt"] = base64.b64encode(unsigned.encode()).decode("ascii")
        return pack(header, body)

    return hostile


@pytest.mark.parametrize("how", ["output-bytes", "signature"])
async def test_an_answer_whose_own_checks_fail_on_a_helper_thread_is_the_workers_fault(
    autojump_clock: trio.testing.MockClock, how: str
) -> None:
    """A one-shard job, the requester's only one: its answer's hash and signature are
    checked on a helper thread (production's ``Runtime.beside``) while Freivalds' check runs
    on the event loop, and the check comes first. An answer whose values pass the check but
    whose bytes or signature do not hold must still end the hostile worker's part in the job
    (named for its malformed answer, no receipt countersigned for it), and the job completes
    on the honest worker."""
    async with cluster(["requester", "hostile", "honest"]) as c:
        hostile = await c.start("hostile", "WEU", price=0.5)
        requester = await c.start("requester", "WEU", serve=False)
        honest = await c.start("honest", "WEU", price=2.0)
        await c.settle()
        requester.scheduler.runtime.beside = _begin_on_helper  # a real helper thread
        begun: list[str] = []
        spy_of = requester.scheduler.runtime.beside

        def spy(fn: Any, *args: Any) -> Any:
            begun.append(fn.__name__)
            return spy_of(fn, *args)

        requester.scheduler.runtime.beside = spy
        c.world.network(hostile.peer_id).handle(PROTOCOL_RUN, tampered_run(hostile, how))
        ops = {
            "a": RNG.standard_normal((64, 48)).astype("float32"),
            "b": RNG.standard_normal((48, 32)).astype("float32"),
        }
        result = await requester.submit("matmul", ops, shards=1, max_workers=2)
        assert_product_close(result.output, ops["a"] @ ops["b"])
        assert set(result.workers) == {honest.peer_id}
        assert "malformed answer" in result.workers_out.get(hostile.peer_id, ""), result
        assert result.checks_passed == 1  # the honest answer's; the hostile one's is void
        assert begun.count("_verify_later") == 2  # each answer's own checks, on the helper
        await requester.scheduler.settled()
        stored = [r.body.worker for r in requester.scheduler.receipts.receipts()]
        assert stored == [honest.peer_id]
