"""Capacity is a claim until measured: challenge workers with small verified kernels.

A :class:`Challenger` picks workers of the capacity view that this peer has never measured
(or not for a long time), sends each a small random matrix product as an ordinary one-shard
job through the scheduler, checks it with Freivalds' algorithm, times it, and enters the result
in the :class:`~mtor_p2p.compute.reputation.PeerBook` like any real shard. Because it *is* an
ordinary shard (the same protocols, a job ID made the same way, a random shard index, a price
at the worker's quote, a receipt countersigned and paid for), the worker cannot tell it from
real work, and so cannot serve it faster than it serves real work. Its only tell is its size,
drawn from the range of small real shards; and every real shard keeps updating the same
measurement, so a worker that rushes small shards gains nothing on large ones.

Each verified measurement is kept as a signed :class:`Attestation` ("I, the measurer, saw this
worker deliver these FLOPs in these seconds, verified"), checkable by anyone with the
countersigned receipt it names. Gossiping attestations, weighted so that Sybils cannot vouch
for one another, is not done yet: every peer measures for itself.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import trio

from mtor_p2p.capacity.record import CapacityRecord
from mtor_p2p.capacity.view import CapacityQuery, CapacityView
from mtor_p2p.clock import NetClock
from mtor_p2p.compute.reputation import PeerBook
from mtor_p2p.compute.scheduler import JobFailed, JobSpec, Scheduler, trial_price_ceiling
from mtor_p2p.identity import Identity
from mtor_p2p.runtime import Runtime
from mtor_p2p.wire import RecordError, open_envelope, seal

log = logging.getLogger(__name__)

ATTESTATION_TYPE = "mtor/attestation"
ATTESTATION_SCHEMA = 1
MAX_ATTESTATION_BYTES = 2048
#: Challenge shapes (rows of A, shared dimension, columns of B): small real shards' range.
CHALLENGE_SHAPES = ((128, 256, 256), (256, 256, 256), (256, 512, 256), (512, 512, 512))
#: Measurements older than this are refreshed by a new challenge (network-time seconds).
STALE_AFTER = 3600.0
#: A worker is challenged again at most this often, whatever the outcome.
RECHALLENGE_AFTER = 600.0
#: Challenges run only while this peer has submitted a job within this many seconds: it
#: measures the workers it is about to pay, not the whole network for nothing.
ACTIVE_REQUESTER_WINDOW = 3600.0
#: At most this many challenges per hour, whatever the view holds (a spending bound).
MAX_CHALLENGES_PER_HOUR = 60


@dataclass(frozen=True)
class Attestation:
    """A measurer's signed statement of one verified measurement of a worker."""

    subject: str  # the worker's peer ID
    measurer: str
    kernel: str
    flops: int
    seconds: float  # request to verified answer, as the measurer timed it
    at: float  # network time of the measurement
    receipt: str  # the countersigned receipt's ID (job_id:shard)
    schema: int = ATTESTATION_SCHEMA

    @property
    def tflops(self) -> float:
        """Delivered TFLOP/s."""
        return self.flops / max(self.seconds, 1e-9) / 1e12

    def sign(self, identity: Identity) -> bytes:
        """Seal the attestation with the measurer's identity."""
        if identity.peer_id != self.measurer:
            raise RecordError("an attestation is signed by its measurer")
        return seal(identity, ATTESTATION_TYPE, asdict(self))


def decode_attestation(data: bytes) -> Attestation:
    """Verify and decode an attestation (RecordError if anything is off)."""
    envelope = open_envelope(data, expected_type=ATTESTATION_TYPE, max_bytes=MAX_ATTESTATION_BYTES)
    body = envelope.body
    if set(body) != set(Attestation.__dataclass_fields__):
        raise RecordError("attestation has the wrong fields")
    if body["schema"] != ATTESTATION_SCHEMA:
        raise RecordError(f"unsupported attestation schema {body['schema']!r}")
    try:
        attestation = Attestation(**body)
    except TypeError as exc:
        raise RecordError(f"malformed attestation: {exc}") from exc
    if envelope.signer != attestation.measurer:
        raise RecordError("attestation not signed by its measurer")
    if not (
        isinstance(attestation.flops, int)
        and attestation.flops > 0
        and isinstance(attestation.seconds, int | float)
        and attestation.seconds > 0
    ):
        raise RecordError("attestation figures out of range")
    return attestation


class Challenger:
    """Measures unmeasured (or stale) workers of the view with small verified jobs."""

    def __init__(
        self,
        scheduler: Scheduler,
        view: CapacityView,
        identity: Identity,
        clock: NetClock,
        *,
        runtime: Runtime,
        interval: float = 30.0,
        per_round: int = 2,
        deadline: float = 60.0,
        shapes: tuple[tuple[int, int, int], ...] = CHALLENGE_SHAPES,
    ) -> None:
        self.scheduler = scheduler
        self.view = view
        self.identity = identity
        self.clock = clock
        self.runtime = runtime
        self.interval = interval
        self.per_round = per_round
        self.deadline = deadline
        self.shapes = shapes
        self.book: PeerBook = scheduler.book
        self._tried: dict[str, float] = {}  # worker -> network time of its last challenge
        self._recent: deque[float] = deque()  # trio times of the last hour's challenges
        self.attestations: deque[bytes] = deque(maxlen=256)
        self.stats = {"challenges": 0, "verified": 0, "failed": 0}

    def targets(self) -> list[CapacityRecord]:
        """Workers to challenge this round: never measured (or measured long ago), not
        demoted, not of another network by their word, not challenged recently; at most
        ``per_round``, chosen at random (a claim of speed earns no priority)."""
        now = self.clock.now()
        for peer, at in list(self._tried.items()):
            if now - at > RECHALLENGE_AFTER:
                del self._tried[peer]
        hour_ago = trio.current_time() - 3600.0
        while self._recent and self._recent[0] < hour_ago:
            self._recent.popleft()
        budget = MAX_CHALLENGES_PER_HOUR - len(self._recent)
        if budget <= 0:
            return []
        limit = self.price_limit()
        due = []
        for record in self.view.query(CapacityQuery(kernel="matmul", max_price=limit), now):
            peer = record.peer_id
            if peer == self.identity.peer_id or peer in self._tried:
                continue
            if self.book.excluded(peer, now) is not None:
                continue
            if self.scheduler.is_other_network(peer):  # it refused our network: no job of ours
                continue
            standing = self.book.get(peer)
            if standing.measured and now - standing.updated < STALE_AFTER:
                continue
            due.append(record)
        self.runtime.random.shuffle(due)
        return due[: min(self.per_round, budget)]

    def price_limit(self) -> float | None:
        """The most a challenge pays per TFLOP: what the owner's last job allowed, and never
        more than TRIAL_PRICE_MULTIPLE times the median asking price of the view (a worker
        asking far above the market is not measured at our expense)."""
        prices = [
            r.price
            for r in self.view.query(CapacityQuery(kernel="matmul"), self.clock.now())
            if r.peer_id != self.identity.peer_id
        ]
        ceiling = trial_price_ceiling(prices)
        limits = [] if ceiling is None else [ceiling]
        if self.scheduler.last_max_price is not None:
            limits.append(self.scheduler.last_max_price)
        return min(limits) if limits else None

    async def challenge(self, record: CapacityRecord) -> Attestation | None:
        """Challenge one worker; the signed attestation if it delivered a verified result."""
        peer = record.peer_id
        self._tried[peer] = self.clock.now()
        self._recent.append(trio.current_time())
        self.stats["challenges"] += 1
        m, k, n = self.runtime.random.choice(self.shapes)
        rng = self.runtime.numpy_rng()
        operands = {
            "a": rng.standard_normal((m, k), dtype="float32"),
            "b": rng.standard_normal((k, n), dtype="float32"),
        }
        spec = JobSpec(
            kernel="matmul",
            operands=operands,
            verify="freivalds",
            shards=1,
            max_workers=1,
            deadline=self.deadline,
            only=(peer,),
            max_price=self.price_limit(),
        )
        try:
            result = await self.scheduler.run(spec)
        except JobFailed as exc:
            # The scheduler has entered the failure (unreachable, timeout, wrong result...).
            self.stats["failed"] += 1
            log.info("challenge of %s failed: %s", peer[-8:], exc)
            return None
        shard = result.shards[0]
        attestation = Attestation(
            subject=peer,
            measurer=self.identity.peer_id,
            kernel="matmul",
            flops=result.flops,
            seconds=round(shard.seconds, 6),
            at=round(self.clock.now(), 3),
            receipt=shard.receipt.receipt_id,
        )
        self.attestations.append(attestation.sign(self.identity))
        self.stats["verified"] += 1
        return attestation

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Challenge a few workers every ``interval`` while this peer is an active requester."""
        task_status.started()
        while True:
            await trio.sleep(self.interval)
            last = self.scheduler.last_job_at
            if last is None or trio.current_time() - last > ACTIVE_REQUESTER_WINDOW:
                continue
            targets = self.targets()
            if not targets:
                continue
            async with trio.open_nursery() as nursery:
                for record in targets:
                    nursery.start_soon(self.challenge, record)

    def to_json(self) -> dict[str, Any]:
        """What the control API shows of the challenger."""
        return {"stats": dict(self.stats), "recent": len(self.attestations)}
