"""The requester's scheduler: split a job, spread its shards, verify, re-issue, hedge, pay.

One task per chosen worker pulls shards from a shared queue, at most ``max_in_flight`` at
the worker at a time (and ``SHARED_IN_FLIGHT`` times that across every job of this requester
that runs on it), so faster workers take more shards. A shard's uploads and its run
request leave together (the worker waits for operands on their way), so with two in flight the
next shard's operands travel while the current one computes, and each answer comes back as
soon as it is done. An answer being judged no longer counts as in flight: the worker's next
shard leaves while it is checked.

A shard whose worker fails, times out or returns a result that verification rejects goes back
to the queue for another worker; a worker caught
returning a wrong result is dropped for the rest of the job and a fault proof is made. When
the queue is empty, idle workers hedge stragglers: a shard running well past the typical shard
time gets a second copy, and the first verified answer wins.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import statistics
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import blake3
import numpy as np
import trio

from mtor_kernels import Kernel, get_kernel
from mtor_kernels import verify as checks
from mtor_kernels.base import FLOAT32_MAX
from mtor_p2p import memory
from mtor_p2p.capacity.record import CapacityRecord, gpu_class
from mtor_p2p.capacity.view import CapacityQuery, CapacityView
from mtor_p2p.clock import NetClock
from mtor_p2p.compute import blas, client, local_share
from mtor_p2p.compute.local_share import LocalShares
from mtor_p2p.compute.protocol import (
    INLINE_OPERAND_BYTES,
    INLINE_REFUSED,
    NO_FAULT_OUT,
    OLD_COUNTERSIGN_REFUSAL,
    OTHER_NETWORK_OUT,
)
from mtor_p2p.compute.receipt_store import ReceiptStore
from mtor_p2p.compute.reputation import STRAGGLER, PeerBook, Standing
from mtor_p2p.compute.worker import (
    CREDIT_REFUSED,
    PLAIN_NETWORK_NAME,
    PRICE_REFUSED,
    RULES_REFUSED,
    refusing_network,
    refusing_network_name,
)
from mtor_p2p.identity import Identity
from mtor_p2p.ledger.genesis import GENESIS_WHERE, NANO
from mtor_p2p.ledger.names import LEDGER_RULES
from mtor_p2p.metrics import EventWindow, LatencyBuckets
from mtor_p2p.network import Network, NetworkError, RemoteError
from mtor_p2p.records.arrays import BODY_ALIGNMENT, HASH_OFF_LOOP_BYTES, ArrayMeta, meta_of
from mtor_p2p.records.faults import make_fault_proof
from mtor_p2p.records.receipts import Receipt, countersign
from mtor_p2p.runtime import Begun, Runtime
from mtor_p2p.wire import canonical_json

log = logging.getLogger(__name__)

#: A Freivalds check with its sketch made of at most this much arithmetic runs on the event
#: loop (a 512³ shard's check, 42 MFLOP: 0.6 ms here) rather than on a thread
#: (see runtime.py), when BLAS runs one thread (blas.single_threaded: else it may queue
#: behind another thread's product).
CHEAP_CHECK_FLOPS = 64e6
#: A job's Freivalds sketch of a B of at most this many elements (and CHEAP_CHECK_FLOPS) is
#: made on the event loop: 512² took 0.6-1.1 ms here; 1264² 4.8 ms, 2000² 9.1 ms (measured).
CHEAP_SKETCH_ELEMENTS = 1 << 19
#: Bytes of a job's split operand hashed per call of the blocking hook ahead of its shards
#: (_JobRun.describe_ahead): 16 MiB, about 5 ms of blake3 here.
HASH_AHEAD_BYTES = 16 << 20
#: A countersigned receipt waits this long (seconds) for others to be settled with (see
#: Scheduler.courier); at most MAX_SETTLE_BATCH are settled at once.
#:
#: Why 1 s and 64 rather than 0.1 s and 16: a batch's store, ledger entry, gossip bundle and
#: delivery run on both peers while the next shards run, and every batch interrupted them.
#: One-shard 512³ jobs back to back, interleaved on one cluster (240 each): p50 13.35 ->
#: 11.73 ms, p90 21.3 -> 14.8 ms (1 s and 16: p50 -0.7 ms only; 2 s and 255: -1.8 ms).
SETTLE_DELAY = 1.0
MAX_SETTLE_BATCH = 256
#: Settle at once, without waiting out SETTLE_DELAY, when this many receipts are queued. A
#: crash loses what is held: about this many at most, at most SETTLE_DELAY old (more queue
#: while a batch commits, up to the queue's 10,000, beyond which receipts settle one by one
#: at once), as "about 16" before. A worker counts lost receipts as unpaid after 600 s, and
#: refuses a requester with worker.MAX_UNPAID_SHARDS (16) of them until they are
#: countersigned, which they no longer can be, as with 16 here before; its exposure stays
#: bounded by the requester's credit (owed work counts against it).
SETTLE_EARLY_AT = 64
#: The sketch of a B needing at most this much arithmetic (2 x rounds x its size: a 2048²
#: B at 20 rounds) is made ahead of the first answer (_JobRun.prepare_checks).
PREPARE_SKETCH_MAX_FLOPS = 2.0 * 20 * 2048 * 2048
#: (worker, operand) pairs a requester remembers having uploaded (see Scheduler.note_uploaded).
SENT_OPERANDS_KEPT = 4096

VERIFY_METHODS = ("auto", "freivalds", "sample", "redundant", "none")
#: Priors for a shard's network time before any measurement (seconds): a few round trips
#: within a region, and across regions (inter-region P95 round trips are 100-350 ms).
NEAR_ROUND_TRIPS = 0.03
#: A slow home link (8 Mbit/s): shard deadlines allow this long for the bytes to move.
SLOW_LINK_BYTES_PER_S = 1 << 20
FAR_ROUND_TRIPS = 0.3
#: Workers beyond a latency target kept at the end of a job's reserve (quickest first).
MAX_SLOWER_RESERVE = 8
#: Workers out of a job listed in its summary (the count is always given).
MAX_REPORTED_OUT = 20
#: A worker's addresses dialled at once, and the deadline of that dial (seconds).
MAX_DIAL_ADDRS = 4
DIAL_TIMEOUT = 5.0
#: With no max_price, an unmeasured worker asking more than this many times the median
#: price of the acceptable workers gets no trial place (it waits at the end of the reserve).
TRIAL_PRICE_MULTIPLE = 4.0
#: How a refusal for overload starts (the host's "busy", the worker's "busy: ...").
BUSY = "busy"
#: "busy" answers in a row (backing off 0.4 s ... 5 s, about 25 s in all) before a worker's
#: place in a job goes to another.
BUSY_ANSWERS_BEFORE_LEAVING = 8
#: A worker's shards in flight from this requester, across all its jobs, in units of
#: max_in_flight (each job still has at most max_in_flight there). One unit held a job
#: beside others to part of its pipeline: simulations/smoke.toml's batch jobs, sharing
#: workers with interactive ones, took a p50 of 54-139 s over seeds 1-5, against 49-84 s
#: with per-job counts only and 56-90 s with two units.
SHARED_IN_FLIGHT = 2
#: Jobs whose plan (who was chosen, who was passed over and why) the scheduler remembers.
PLAN_NOTES = 50
#: Workers passed over whose reason one job's note keeps (the count is always kept): in a
#: network of thousands, fifty notes of every worker would cost megabytes.
MAX_NOTED_PER_JOB = 256
#: The category of a worker of other ledger rules in plan notes.
RULES_OUT = "ledger rules"
#: Distinct ledger rules a job's count of workers of other rules keeps apart.
MAX_OTHER_RULES_SHOWN = 4
#: The category, in plan notes, of a worker that refused this requester's network.
NETWORK_OUT = "network"
#: How long a worker that refused this requester's network stays out of later jobs' plans
#: and challenges, at most, and is asked again after. It is forgotten sooner when it is found
#: disconnected (checked every OTHER_NETWORK_SWEEP_S: a worker restarted with this network's
#: genesis is down for longer than that). Capacity records do not say a peer's network;
#: without this every job asked such workers first, and uploaded them any operands it
#: carries. (A successful ledger sync is no proof of the network: any peer can answer one
#: with nothing, a review found, and a node cannot change network without a restart.)
OTHER_NETWORK_MEMORY_S = 600.0
OTHER_NETWORK_SWEEP_S = 1.0
#: Workers of another network remembered at once (the oldest forgotten first): only a
#: worker's own refusal enters it, but Sybils may refuse too.
MAX_OTHER_NETWORK_PEERS = 1024


#: A job's own task looks at whether it is done or left without workers whenever the job wakes
#: its slots, and at least this often (a backstop: every change it looks for wakes them).
UNTIL_DONE_BACKSTOP_S = 1.0


def trial_price_ceiling(prices: Iterable[float]) -> float | None:
    """The most a worker never measured here may ask and still get a trial place in a job
    without a price limit: :data:`TRIAL_PRICE_MULTIPLE` times the median of ``prices`` (the
    asking prices of the job's acceptable workers). None when there are no prices."""
    asked = list(prices)
    return TRIAL_PRICE_MULTIPLE * statistics.median(asked) if asked else None


def trial_places(max_workers: int) -> int:
    """How many of a job's ``max_workers`` places go at most to workers never measured here
    while measured workers could fill them: a quarter, at least one."""
    return max(1, max(1, max_workers) // 4)


def worker_value(record: CapacityRecord, standing: Standing, speed: float) -> float:
    """How a measured worker ranks, lower first: its price per TFLOP/s of ``speed`` (what we
    measured), times its failure penalty, times one plus the load it reports."""
    price_per_speed = (record.price + 1e-6) / max(speed, 1e-6)
    return price_per_speed * standing.penalty() * (1 + record.load)


def value_factors(record: CapacityRecord, standing: Standing, speed: float) -> dict[str, float]:
    """The factors whose product is :func:`worker_value`, by name: ``price``, ``speed`` (one
    over it), ``failures`` (the standing's penalty) and ``load`` (one plus it). Comparing two
    workers factor by factor says why one ranked below the other."""
    return {
        "price": record.price + 1e-6,
        "speed": 1 / max(speed, 1e-6),
        "failures": standing.penalty(),
        "load": 1 + record.load,
    }


def _remember(table: OrderedDict[Any, None], key: Any) -> None:
    """Put ``key`` last in ``table``, forgetting the oldest beyond SENT_OPERANDS_KEPT."""
    table[key] = None
    table.move_to_end(key)
    while len(table) > SENT_OPERANDS_KEPT:
        table.popitem(last=False)


class _InlineIgnored(RemoteError):
    """A worker answered "missing operands" for operands its run request carried: a version
    before ``inline`` (it ignores the request's body)."""


class JobFailed(Exception):
    """The job could not be completed (no workers left, or its deadline passed)."""


#: Rows holding inf or NaN judged when two redundant answers agree on them.
MAX_NON_FINITE_ROWS_JUDGED = 64


class JobUnverifiable(JobFailed):
    """The job's operands make its answers impossible to judge (values near float32's limit,
    sums that cancel to almost nothing): the requester's input, not a worker, is at fault."""


@dataclass(frozen=True)
class JobSpec:
    """What to compute and under which terms."""

    kernel: str
    operands: dict[str, np.ndarray]
    verify: str = "auto"
    max_price: float | None = None
    max_workers: int = 8
    shards: int | None = None
    freivalds_rounds: int = 20
    sample_rows: int = 4
    deadline: float = 600.0
    #: Seconds within which the requester wants each shard back (interactive work): workers
    #: expected to be slower, by their measured round trips or by region, are passed over
    #: while faster ones exist. None: rank by value alone.
    latency_target: float | None = None
    #: Run only on these workers (a challenge of one worker, or a requester's own machines).
    #: Such a job does not count as this peer's activity as a requester.
    only: tuple[str, ...] | None = None


@dataclass
class ShardResult:
    """The accepted result of one shard."""

    index: int
    rows: tuple[int, int]
    worker: str
    seconds: float
    attempts: int
    receipt: Receipt


@dataclass
class JobResult:
    """Everything a requester learns from a finished job."""

    job_id: str
    kernel: str
    #: The job's result. Above 32 MiB it lies in memory that the next job's output reuses
    #: once this array and every view of it are gone (``memory.RECYCLED``): an ordinary
    #: writable array, though one that does not own its data (``ndarray.resize`` refuses it).
    output: np.ndarray
    shards: list[ShardResult]
    seconds: float
    flops: int
    verification: str
    checks_passed: int
    rejected: int
    reissued: int
    hedged: int
    fault_proofs: list[bytes] = field(default_factory=list)
    #: Receipts paid beside the accepted shards' own: ``redundant`` verification pays the
    #: second worker of every shard too.
    extra_receipts: list[Receipt] = field(default_factory=list)
    #: Workers that left the job or were never eligible for it, and why (peer -> reason).
    workers_out: dict[str, str] = field(default_factory=dict)
    #: Wrong results proven against each worker in this job (peer -> count).
    rejected_by: dict[str, int] = field(default_factory=dict)
    #: Workers in view that follow other ledger rules (another MTOR version), never used.
    other_rules: OtherRules = field(default_factory=lambda: OtherRules())
    #: Operands that workers on this machine took through shared memory (counted once per
    #: worker), and their bytes: the rest went over the network.
    shared_operands: int = 0
    shared_bytes: int = 0
    #: Outputs taken from the sealed copies of workers on this machine, and their bytes.
    shared_outputs: int = 0
    shared_output_bytes: int = 0

    @functools.cached_property
    def non_finite(self) -> int:
        """Elements of the output that are inf or NaN: an honest float32 result where the
        operands overflow float32 or hold NaN or inf, which the checks accept as such, and
        which ``submit`` says (a new user's walkthrough: a redundant job of 1e30 operands
        returned an output of inf alone, with "3 passed" and no word)."""
        return int(self.output.size - np.count_nonzero(np.isfinite(self.output)))

    @property
    def tflops(self) -> float:
        """Achieved TFLOP/s over the whole job, transfers and verification included."""
        return self.flops / max(self.seconds, 1e-9) / 1e12

    @property
    def cost(self) -> float:
        """Credits owed for the job: every accepted shard's receipt and every redundant
        copy's (:attr:`extra_receipts`)."""
        return sum(s.receipt.body.cost for s in self.shards) + sum(
            r.body.cost for r in self.extra_receipts
        )

    @property
    def receipts_paid(self) -> int:
        """Receipts this job paid: one per shard, two with ``redundant`` verification."""
        return len(self.shards) + len(self.extra_receipts)

    @property
    def workers(self) -> list[str]:
        """Distinct workers that contributed accepted shards."""
        return sorted({s.worker for s in self.shards})

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (what ``mtor-peer submit --json`` prints)."""
        return {
            "job_id": self.job_id,
            "kernel": self.kernel,
            "shards": len(self.shards),
            "workers": self.workers,
            "seconds": round(self.seconds, 4),
            "tflops": round(self.tflops, 6),
            "flops": self.flops,
            "verification": self.verification,
            "checks_passed": self.checks_passed,
            "rejected": self.rejected,
            "reissued": self.reissued,
            "hedged": self.hedged,
            "fault_proofs": len(self.fault_proofs),
            "cost": round(self.cost, 9),
            "receipts": self.receipts_paid,
            "output_shape": list(self.output.shape),
            "non_finite": self.non_finite,
            # The first 20, so that 200 Sybils do not flood a script's output.
            "workers_out": dict(sorted(self.workers_out.items())[:MAX_REPORTED_OUT]),
            "workers_out_count": len(self.workers_out),
            # Of them, those out for a fault or a demotion (the peer book says more), not for
            # a refusal that is no fault (another network, a stale quote, our credit).
            "workers_out_demoted": sum(
                1 for why in self.workers_out.values() if not why.startswith(NO_FAULT_OUT)
            ),
            "rejected_by": dict(self.rejected_by),
            "other_ledger_rules": self.other_rules.to_json(),
            "shared_memory": {
                "operands": self.shared_operands,
                "bytes": self.shared_bytes,
                "outputs": self.shared_outputs,
                "output_bytes": self.shared_output_bytes,
            },
        }


@dataclass(frozen=True)
class OtherRules:
    """Workers in view a job could not use for their ledger rules (another MTOR version:
    their receipts would enter another ledger): how many, and up to MAX_OTHER_RULES_SHOWN
    of the rules they follow."""

    workers: int = 0
    rules: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """``{"workers": N, "rules": [...]}``."""
        return {"workers": self.workers, "rules": list(self.rules)}


@dataclass(frozen=True)
class WorkerPlan:
    """Who a job starts with, who replaces those that leave, and who is out and why."""

    chosen: list[CapacityRecord]
    reserve: list[CapacityRecord]
    excluded: dict[str, str]
    #: Every candidate not chosen (reserve and excluded): peer -> (category, detail), the
    #: category one of ``price``, ``measured speed``, ``failures``, ``load``, ``newcomer``,
    #: ``latency``, ``places``, ``reachability``, ``demoted``, ``network`` (it refused this
    #: requester's network, see OTHER_NETWORK_MEMORY_S).
    passed_over: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: Workers the job's terms would take but for their ledger rules (another MTOR version,
    #: never candidates).
    other_rules: OtherRules = field(default_factory=lambda: OtherRules())


@dataclass(frozen=True)
class PlanNote:
    """One job of this requester as planned: who it started with and why each other worker
    of the capacity view was passed over (peer -> (category, detail); the plan's categories,
    ``kernel`` or ``price`` for workers the job's terms left out, and ``ledger rules`` for
    workers of another version's rules). At most
    :data:`MAX_NOTED_PER_JOB` reasons are kept; ``passed_over_count`` counts them all."""

    job_id: str | None
    at: float
    kernel: str
    chosen: tuple[str, ...]
    passed_over: dict[str, tuple[str, str]]
    passed_over_count: int


@dataclass(frozen=True)
class ShardAttempt:
    """One attempt at one shard, as the scheduler's observer sees it when the attempt ends.

    ``outcome``: ``accepted``, ``rejected`` (verification failed), ``answered`` (a correct
    answer that another attempt beat, or a redundant first answer), ``failed`` (the worker
    answered with an error or the connection broke), ``timeout``, ``misbehaved`` (malformed
    answer), ``refused`` (credit) or ``cancelled`` (the job no longer needed it). Times are
    trio's clock.
    """

    job_id: str
    index: int
    worker: str
    started: float
    ended: float
    outcome: str
    flops: int
    hedge: bool


@dataclass
class SchedulerStats:
    """What this requester's jobs did (read by the metrics, mtor_p2p/metrics.py)."""

    #: Shard attempts by outcome (see :class:`ShardAttempt`).
    attempts: dict[str, int] = field(default_factory=dict)
    #: Durations of accepted attempts: from sending the shard to accepting its result.
    shard_seconds: LatencyBuckets = field(default_factory=LatencyBuckets)
    jobs_ok: int = 0
    jobs_failed: int = 0
    #: Results that failed verification, and the fault proofs made of them.
    rejected: int = 0
    fault_proofs: int = 0
    #: Answers that failed the cheap check but whose every element lies within half its tight
    #: bound once judged whole (its alarm came from its own slack): accepted, nobody blamed.
    accepted_on_judgement: int = 0
    #: Answers that failed the cheap check, beyond that but within the worst-case bound (and
    #: redundant answers the requester's product did not confirm, proven nothing): neither
    #: accepted nor blamed (not paid; the worker leaves the job).
    unconfirmed: int = 0
    #: Answers paid though the job's operands made them impossible to judge (the job ended
    #: "cannot be verified").
    paid_unjudgeable: int = 0


def _timed_out(exc: BaseException) -> bool:
    return isinstance(exc, trio.TooSlowError) or "timed out" in str(exc)


@dataclass
class _Attempt:
    shard: int
    worker: str
    started: float
    scope: trio.CancelScope


class WorkerTokens:
    """A worker's tokens of shards in flight from this requester (``count`` of them), shared
    by every job that runs on it, with how many each job holds (see
    :meth:`Scheduler.worker_tokens`)."""

    def __init__(self, count: int) -> None:
        self._free = trio.Semaphore(count)
        self._held: Counter[int] = Counter()  # id of the holding job -> its tokens
        self.users = 0

    async def acquire(self, holder: int) -> None:
        await self._free.acquire()
        self._held[holder] += 1  # no checkpoint between: a cancelled acquire takes nothing

    def release(self, holder: int) -> None:
        self._held[holder] -= 1
        if not self._held[holder]:
            del self._held[holder]
        self._free.release()

    def all_held_by_others(self, holder: int) -> bool:
        """True if jobs other than ``holder`` hold every token. Read from the semaphore, not
        from the hold counts alone: a task handed a token counts it only when it next runs
        (a review: for two task steps a full worker read as free)."""
        return self._free.value == 0 and self._held[holder] == 0


class JobTokens:
    """One job's hand on a worker's :class:`WorkerTokens` (what its slots acquire and its
    attempts release): a token of the job's own (``per_job`` of them) and one of the
    requester's, both held while a shard is in flight."""

    def __init__(self, tokens: WorkerTokens, holder: int, per_job: int) -> None:
        self.tokens = tokens
        self.holder = holder
        self._own = trio.Semaphore(per_job)

    async def acquire(self) -> None:
        await self._own.acquire()
        try:
            await self.tokens.acquire(self.holder)
        except BaseException:
            self._own.release()
            raise

    def release(self) -> None:
        self.tokens.release(self.holder)
        self._own.release()

    def busy_elsewhere(self) -> bool:
        """True if the requester's other jobs hold every token of the worker."""
        return self.tokens.all_held_by_others(self.holder)


class _JobRun:
    """The state of one job while it runs."""

    def __init__(
        self,
        scheduler: Scheduler,
        spec: JobSpec,
        kernel: Kernel,
        plan: WorkerPlan,
        metas: dict[str, ArrayMeta],
        ranges: list[tuple[int, int]],
    ) -> None:
        self.s = scheduler
        self.spec = spec
        self.kernel = kernel
        #: Workers taking part now; ``reserve`` replaces those that leave, best first.
        self.workers = list(plan.chosen)
        self.reserve = list(plan.reserve)
        #: Why each worker left the job (or was never eligible): the failure's explanation.
        self.left: dict[str, str] = dict(plan.excluded)
        workers = self.workers
        # The price each worker advertised when chosen: what we accept to pay it for this job.
        self.quotes = {r.peer_id: r.price for r in workers}
        self.nursery: trio.Nursery | None = None
        self.nonce = scheduler.runtime.token_hex(16)
        #: Freivalds' vectors and B R, shared by this job's shards (all of one B): made by
        #: the first check, dropped after a rejection (its witness shows one of the vectors).
        self._sketch: checks.FreivaldsSketch | None = None
        #: A's side of every shard's check against that sketch, made ahead (prepare_checks).
        self._rows: checks.FreivaldsRows | None = None
        self._sketch_lock = trio.Lock()
        #: Set once a shard's operands have all left for a worker (its run request written
        #: in full, its uploads done): the sketch ahead of the checks waits for it.
        self.operands_out = trio.Event()
        #: Each whole operand's description, hashed once for the whole job: the job ID, the
        #: uploads and the run requests all use these (and shards that span a whole operand).
        self.metas = metas
        #: shard -> its operands' descriptions (a slice of a split operand is hashed once,
        #: however many attempts the shard takes).
        self.shard_metas: dict[int, dict[str, ArrayMeta]] = {}
        #: Shards whose slices are being hashed now (by describe_shard or describe_ahead):
        #: the other waits for that rather than hashing them again.
        self._describing: dict[int, trio.Event] = {}
        # The job's description: the whole operands by content, the split ones (hashed slice
        # by slice, never whole) by shape and element type. The ID is opaque to every other
        # peer (receipts name each shard's own inputs by content), and the nonce makes it
        # unique.
        inputs = {name: metas[name].digest for name in spec.operands if name in metas}
        split = {
            name: [*array.shape, str(array.dtype)]
            for name, array in spec.operands.items()
            if name not in metas
        }
        self.job_id = blake3.blake3(
            canonical_json(
                {
                    "kernel": spec.kernel,
                    "inputs": inputs,
                    "split": split,
                    "requester": scheduler.identity.peer_id,
                    "nonce": self.nonce,
                }
            )
        ).hexdigest()
        self.method = _choose_method(spec.verify, kernel, len(workers) + len(self.reserve))
        # compare() needs the job's input dtype: float16 inputs allow more honest difference.
        self.input_dtype = spec.operands[kernel.split_operand].dtype
        self.ranges = ranges
        #: shard -> its split operands' descriptions, begun beside the event loop as the job
        #: started (see Scheduler._begin_first_slices); taken by the shard's first attempt.
        self.begun_slices: dict[int, Begun[dict[str, ArrayMeta]]] = {}
        self.pending: list[int] = list(range(len(self.ranges)))
        self.accepted: dict[int, ShardResult] = {}
        self._accepting: set[int] = set()  # being settled, about to be accepted
        self.outputs: dict[int, np.ndarray] = {}
        #: The job's output, allocated once (its pages are committed as rows arrive): each
        #: shard's rows are downloaded straight into their place by one attempt at a time, so
        #: that an 8192x8192 result is neither downloaded into buffers of its own nor copied
        #: into a concatenation after (issue 9: 0.55 s of the requester's CPU, and fresh
        #: memory costs about 3 ms per MiB on the project's VM). Redundant verification keeps
        #: two answers of a shard side by side, so it downloads into buffers of their own.
        #: Its memory is an earlier job's output where one was dropped (memory.RECYCLED: a
        #: large array's fresh pages cost 4-5 times a write to mapped ones here).
        self.output = memory.RECYCLED.empty(
            kernel.output_shape(spec.operands), kernel.output_dtype(spec.operands)
        )
        self._in_place = self.method != "redundant"
        #: shard -> the attempt whose download may write into the shard's rows of ``output``.
        self.row_owner: dict[int, _Attempt] = {}
        #: Shards whose accepted output is already in its place (others are copied at the end).
        self.placed: set[int] = set()
        #: Shards whose rows hold a worker's sealed copy, mapped there by a download
        #: (local_share.take_shared_output): given fresh pages before anything else is
        #: written into them, so that the copy is not kept alive beside the new bytes.
        self.mapped_rows: set[int] = set()
        self.running: dict[int, list[_Attempt]] = {}
        self.attempt_counts: dict[int, int] = {}
        self.redundant_answers: dict[int, list[tuple[str, np.ndarray, Receipt]]] = {}
        self.banned: set[str] = set()
        #: worker -> when its slots may send again after a busy or failed answer.
        self._resume_at: dict[str, float] = {}
        #: Wrong results proven against each worker in this job.
        self.rejected_by: dict[str, int] = {}
        #: Workers whose attempt was cancelled before their shard was accepted elsewhere.
        self.cut_off: set[str] = set()
        #: shard -> workers whose attempt at it failed (error, broken connection, timeout).
        self.failed_on: dict[int, set[str]] = {}
        #: Workers whose answer to a shard was neither confirmed nor proven wrong
        #: (_unconfirmed).
        self.unconfirmed_by: dict[int, set[str]] = {}
        #: Whether this requester's own product of a shard put its operands at fault
        #: (_operands_at_fault), once computed.
        self._own_verdicts: dict[int, bool] = {}
        #: (worker, shard) answers paid though they could not be judged (_pay_unjudgeable).
        self._paid_unjudgeable: set[tuple[str, int]] = set()
        self.checks_passed = 0
        self.rejected = 0
        self.reissued = 0
        self.hedged = 0
        self.fault_proofs: list[bytes] = []
        #: The complete receipts of redundant copies also paid for (their shard's accepted
        #: answer is another worker's): a redundant job pays both workers of every shard.
        self.extra_receipts: list[Receipt] = []
        self.credit_refusal: str | None = None
        #: Why the job cannot be verified, once an answer's check failed out of float32's
        #: range (_out_of_range): the job then ends with it.
        self.unverifiable: str | None = None
        self.durations: list[float] = []
        self.done = trio.Event()
        self.wakeup = trio.Event()
        self.progress: Callable[[int, int], None] | None = None
        #: Workers whose slots run (connected, not yet out of the job).
        self._serving: set[str] = set()
        #: This job's hand on each serving worker's tokens of shards in flight.
        self._tokens: dict[str, JobTokens] = {}
        #: A slot left a shard queued for an idle worker: wake the slots when one is taken.
        self._left_for_idle = False

    # -- queue -----------------------------------------------------------------------------

    def _wake(self) -> None:
        self.wakeup.set()
        self.wakeup = trio.Event()

    def next_shard(self, worker: str) -> tuple[int, bool] | None:
        """The next shard for ``worker``: (index, is_hedge), or None if nothing suits it now.

        A worker already running a shard of the job takes no second one from the queue while
        another worker of the job runs none and could take it: otherwise the first worker's
        pipeline (max_in_flight shards) could take every shard of a small job while the
        others idle (8192² over 2 workers in 2 shards: one worker ran both). Nothing here
        depends on times a worker reports: a worker counts as idle only while it holds no
        attempt, is not backing off after a busy or failed answer, and is still in the job,
        so a worker cannot hold the others back by stalling (it then holds a shard) or by
        answering "busy" (it then backs off).

        Speeds are not weighed: an idle worker much slower than the holder still gets the
        shard. In a review's memnet runs, a 2-shard job over a worker and one 3x slower took
        12.0 virtual s every time, where the fast one running both would take 8.0; without
        the rule it took 8.0-24.0 (mean 14.4), 24 when the slow one's pipeline took both. A
        speed-aware rule was tried and dropped: the measured speed of a small shard is its
        latency (two equal memnet workers measured 16x apart), so it let the hoarding back."""
        if self.pending and self._holding(worker) and self._idle_besides(worker):
            self._left_for_idle = True
            return None
        for index in self.pending:
            if self._wants_worker(index, worker) and not self._leave_to_others(index, worker):
                self.pending.remove(index)
                if self._left_for_idle:
                    self._left_for_idle = False
                    self._wake()  # the slot that held back may take the next one now
                return index, False
        # Nothing queued: hedge the slowest straggler that this worker is not already running.
        if self.pending or not self.running:
            return None
        now = trio.current_time()
        stragglers = []
        for index, attempts in self.running.items():
            if (
                index in self.accepted
                or len(attempts) >= 2
                or any(a.worker == worker for a in attempts)
                # Redundancy needs two workers' answers: one that answered the shard already
                # must not run it again (a hostile review: a liar hedging its own answer
                # agreed with itself, and a wrong result was accepted and paid twice).
                or not self._wants_worker(index, worker)
            ):
                continue
            elapsed = now - min(a.started for a in attempts)
            if self._straggled(elapsed):
                stragglers.append((elapsed, index))
        if not stragglers:
            return None
        return max(stragglers)[1], True

    def _holding(self, worker: str) -> int:
        """Attempts of this job that ``worker`` runs now (answers being judged included)."""
        return sum(a.worker == worker for attempts in self.running.values() for a in attempts)

    def _idle_besides(self, worker: str) -> bool:
        """True if a worker of the job other than ``worker`` runs no attempt, may be sent one
        now, and would take a shard of the queue."""
        now = trio.current_time()
        for other in self._serving:
            if (
                other == worker
                or other in self.banned
                or self._resume_at.get(other, 0.0) > now
                or self._holding(other)
                or self._busy_elsewhere(other)
            ):
                continue
            if any(
                self._wants_worker(index, other) and not self._leave_to_others(index, other)
                for index in self.pending
            ):
                return True
        return False

    def _busy_elsewhere(self, worker: str) -> bool:
        """True if the requester's other jobs hold every token of ``worker``'s shards in
        flight: it is not idle for this job, though it holds none of its attempts (a review:
        it counted as idle, and the job's other workers were held to one shard at a time for
        a worker that could send nothing, also when it stalled the other job's shards)."""
        tokens = self._tokens.get(worker)
        return tokens is not None and tokens.busy_elsewhere()

    def _straggled(self, elapsed: float) -> bool:
        """True if an attempt running ``elapsed`` seconds is a straggler (what hedging uses)."""
        if not self.durations:
            return False
        typical = statistics.median(self.durations)
        return elapsed > max(3 * typical, typical + 0.5)

    def _leave_to_others(self, index: int, worker: str) -> bool:
        """True if ``worker`` failed this shard before and another worker of the job, not
        banned, that has not failed it can take it: a re-issued shard must not go back to the
        worker that stalled or broke on it (its idle slot would often ask first)."""
        failed = self.failed_on.get(index)
        if not failed or worker not in failed:
            return False
        return any(
            r.peer_id not in failed
            and r.peer_id not in self.banned
            and self._wants_worker(index, r.peer_id)
            for r in self.workers
        )

    def _wants_worker(self, index: int, worker: str) -> bool:
        if self.method != "redundant":
            return True
        # Redundancy needs answers from distinct workers.
        answered = {w for w, _, _ in self.redundant_answers.get(index, [])}
        running = {a.worker for a in self.running.get(index, [])}
        return worker not in answered | running

    def requeue(self, index: int, *, reissue: bool = True) -> None:
        """Put a shard back at the front of the queue (``reissue``: after a failure)."""
        if (
            index not in self.accepted
            and index not in self._accepting
            and index not in self.pending
        ):
            self.pending.insert(0, index)
            self.reissued += int(reissue)
        self._wake()

    # -- one attempt -----------------------------------------------------------------------

    def _straggler_out(self, worker: str) -> bool:
        """True if the peer book has just demoted ``worker`` as a straggler and the job keeps
        enough other workers without it (two for redundant verification, else one)."""
        reason = self.s.book.excluded(worker, self.s.clock.now())
        if reason is None or not reason.startswith(STRAGGLER):
            return False
        others = [w for w in self.active() if w != worker]
        return len(others) >= (2 if self.method == "redundant" else 1)

    def _foreign_genesis(self, exc: Exception) -> str | None:
        """The genesis prefix a refusal of this requester's network names, if the refusal can
        be true: this requester sent its network, and the worker names another, well-formed.
        Any other "other network" answer (naming ours, or none) is a failure like any other
        (a review: a worker could otherwise refuse every job at no cost to its standing)."""
        theirs = refusing_network(str(exc))
        if theirs is None or self.s.network_id is None or theirs == self.s.network_id:
            return None
        return theirs

    def _leave(self, worker: str, reason: str) -> None:
        """Take ``worker`` out of this job for ``reason`` and bring in a replacement."""
        self.banned.add(worker)
        self.left.setdefault(worker, reason)
        self.refill()
        self._wake()

    def refill(self) -> None:
        """Start replacements from the reserve until as many workers take part as the job
        began with (or the reserve is empty). Replacements the peer book demoted since the
        job was planned are skipped."""
        if self.nursery is None:
            return
        now = self.s.clock.now()
        wanted = max(1, min(self.spec.max_workers, len(self.ranges)))
        while self.reserve and len(self.active()) < wanted:
            record = self.reserve.pop(0)
            why = self.s.book.excluded(record.peer_id, now)
            if why is not None:
                self.left.setdefault(record.peer_id, why)
                continue
            self.workers.append(record)
            self.quotes[record.peer_id] = record.price
            self.nursery.start_soon(self.worker_loop, record)

    def active(self) -> list[str]:
        """Workers of this job not (yet) given up on."""
        return [w.peer_id for w in self.workers if w.peer_id not in self.banned]

    async def attempt(
        self, worker: str, index: int, hedge: bool, at_worker: JobTokens | None = None
    ) -> str:
        """Run one attempt at shard ``index`` on ``worker``; return its outcome (see
        :class:`ShardAttempt`). Every outcome is entered in the peer book.

        ``at_worker``: a token of the worker's shards in flight, held by the caller; it is
        released as soon as the answer is in (or the attempt ends), before the answer is
        judged, so that the worker's next shard travels while this one is checked."""
        start, stop = self.ranges[index]
        operands = self.kernel.shard_operands(self.spec.operands, start, stop)
        scope = trio.CancelScope()
        record = _Attempt(index, worker, trio.current_time(), scope)
        self.running.setdefault(index, []).append(record)
        self.s.note_sent(worker)
        self.attempt_counts[index] = self.attempt_counts.get(index, 0) + 1
        if hedge:
            self.hedged += 1
        rejected_before = self.rejected_by.get(worker, 0)
        outcome = "cancelled"
        book = self.s.book
        out: np.ndarray | None = None
        try:
            out = self._claim_rows(index, record)
            with scope:
                metas = await self.describe_shard(index, operands)
                # The worker's time starts once its operands are ready to go: hashing them is
                # this requester's work, not to be counted against the worker's speed.
                sent = trio.current_time()
                answer = await self._compute(worker, index, operands, metas, out)
                if at_worker is not None:
                    at_worker.release()
                    at_worker = None
                if answer is None:
                    return outcome
                if out is not None and not np.may_share_memory(answer.output, out):
                    # The answer came in its run reply: this attempt writes no rows, so
                    # acceptance may copy it into them now rather than at the job's end.
                    self._release_rows(index, record)
                seconds = trio.current_time() - sent
                await self._judge(worker, index, operands, answer, seconds)
                accepted = self.accepted.get(index)
                if self.rejected_by.get(worker, 0) > rejected_before:
                    outcome = "rejected"
                elif accepted is not None and accepted.worker == worker:
                    outcome = "accepted"
                else:
                    outcome = "answered"  # a redundant first answer, or a hedged twin lost
        except RemoteError as exc:
            if str(exc).startswith(CREDIT_REFUSED):
                # Not the worker's fault: it sees that we have spent our credit. Other
                # workers may see an older balance; each refuses once and is left alone.
                outcome = "refused"
                self.credit_refusal = str(exc)
                self.banned.add(worker)
                self.left.setdefault(worker, "refused: our credit")
                self.requeue(index, reissue=False)
            elif str(exc).startswith(PRICE_REFUSED):
                outcome = "refused"
                advertised = self.s.view.get(worker, self.s.clock.now())
                if advertised is not None and self.quotes[worker] >= advertised.price * (1 - 1e-9):
                    # We quoted what it advertises now: not a stale quote but a worker that
                    # will not work at its own price (and was fed our operands first).
                    book.failed(
                        worker, "failed", self.s.clock.now(), f"refused its own price: {exc}"
                    )
                    self._leave(worker, "refused its own advertised price")
                else:
                    # Our quote is stale (its price rose since we read its record): not a
                    # fault, but this job cannot pay it.
                    self._leave(worker, "refused: its price rose above our quote")
                self.requeue(index, reissue=False)
            elif str(exc).startswith(RULES_REFUSED):
                # It follows other ledger rules than the record we hold says (restarted as
                # another version: its new record, of a schema we do not read, never
                # replaced the old one here). Not a fault; this job cannot pay it.
                outcome = "refused"
                self._leave(worker, "refused: it follows other ledger rules")
                self.requeue(index, reissue=False)
            elif (theirs := self._foreign_genesis(exc)) is not None:
                # Its ledger is another network's (a node started without its network's
                # genesis, or a worker of another network in view). Not a fault; this job
                # cannot pay it. Said in our words: of the worker's, only its genesis prefix
                # and its network's name (a plain one: refusing_network_name).
                outcome = "refused"
                reason = (
                    f"{OTHER_NETWORK_OUT}: a worker's ledger has genesis {theirs}…"
                    f"{_network_names(refusing_network_name(str(exc)), self.s.network_name)}, "
                    f"this node's {self.s.network_id}…{_our_network_name(self.s.network_name)}; "
                    "a node joins a network with that "
                    "network's genesis, in a new data directory (--genesis FILE --data-dir "
                    "DIR: a data directory keeps the network it began with; "
                    f"{GENESIS_WHERE})"
                )
                self._leave(worker, reason)
                self.s.note_other_network(worker, reason)  # and later jobs do not ask it
                self.requeue(index, reissue=False)
            elif str(exc).startswith(BUSY):
                # Overloaded (perhaps by someone else's flood): not a fault. The shard goes
                # back to the queue and this slot waits a moment before asking again.
                outcome = "busy"
                self.requeue(index, reissue=False)
            else:
                outcome = "failed"
                book.failed(worker, outcome, self.s.clock.now(), str(exc))
                self.failed_on.setdefault(index, set()).add(worker)
                log.info("shard %d on %s failed: %s", index, worker[-8:], exc)
                self.requeue(index)
        except (NetworkError, client.WorkerMisbehaved, trio.TooSlowError) as exc:
            outcome = "timeout" if _timed_out(exc) else "failed"
            if isinstance(exc, client.WorkerMisbehaved):
                outcome = "misbehaved"
            book.failed(worker, outcome, self.s.clock.now(), str(exc))
            self.failed_on.setdefault(index, set()).add(worker)
            log.info("shard %d on %s failed: %s", index, worker[-8:], exc)
            if outcome == "misbehaved":
                self._leave(worker, f"malformed answer: {exc}")
            self.requeue(index)
        finally:
            if at_worker is not None:
                at_worker.release()
            # Every write of this attempt's download is done (download() returns only once its
            # chunk tasks have): the rows may go to the next attempt unless they are accepted.
            if index not in self.placed:
                self._release_rows(index, record)
            attempts = self.running.get(index, [])
            if record in attempts:
                attempts.remove(record)
            if not attempts:
                self.running.pop(index, None)
            if scope.cancelled_caught and index not in self.accepted:
                self.requeue(index)
            if outcome == "cancelled" and index not in self.accepted:
                self.cut_off.add(worker)
            elif outcome == "cancelled" and self._straggled(trio.current_time() - record.started):
                # Its shard was answered elsewhere long after it should have answered itself:
                # slow, or stalling. Not a timeout (it had time left), but every later job
                # should know: a worker cut off like this again and again is demoted.
                book.failed(worker, "slow", self.s.clock.now(), STRAGGLER)
            self._wake()
            stats = self.s.stats
            stats.attempts[outcome] = stats.attempts.get(outcome, 0) + 1
            if outcome == "accepted":
                stats.shard_seconds.observe(trio.current_time() - record.started)
            if self.s.observer is not None:
                self.s.observer(
                    ShardAttempt(
                        job_id=self.job_id,
                        index=index,
                        worker=worker,
                        started=record.started,
                        ended=trio.current_time(),
                        outcome=outcome,
                        flops=int(self.kernel.flops(operands)),
                        hedge=hedge,
                    )
                )
        return outcome

    def _claim_rows(self, index: int, attempt: _Attempt) -> np.ndarray | None:
        """Shard ``index``'s rows of the job's output, for ``attempt`` to download into, if
        no other attempt holds them (a hedged twin downloads into a buffer of its own), the
        shard is not accepted yet, and the method keeps one answer per shard."""
        if not self._in_place or index in self.accepted or index in self.row_owner:
            return None
        self.row_owner[index] = attempt
        return self._rows_to_write(index)

    def _rows_to_write(self, index: int) -> np.ndarray:
        """Shard ``index``'s rows of the output, about to be written: first given fresh pages
        if a worker's copy was mapped there (an attempt that failed after its download)."""
        start, stop = self.ranges[index]
        rows = self.output[start:stop]
        if index in self.mapped_rows:
            self.mapped_rows.discard(index)
            local_share.fresh_pages(rows)
        return rows

    def _release_rows(self, index: int, attempt: _Attempt) -> None:
        if self.row_owner.get(index) is attempt:
            del self.row_owner[index]

    def place_outputs(self) -> np.ndarray:
        """The job's output once every shard is accepted: accepted answers that arrived
        elsewhere than in their rows (in a run answer, from a hedged twin) copied there. Call
        it only when no attempt runs any more, so that no download can write after the copy."""
        for index in range(len(self.ranges)):
            if index not in self.placed:
                self._rows_to_write(index)[:] = self.outputs.pop(index)
        return self.output

    async def describe_ahead(self) -> None:
        """Hash the split operand's slices of the shards not yet sent, on the blocking hook,
        once the first shard's operands have left, so that the event loop finds each shard's
        description made when it sends it. In B-shared 512² jobs hashing each 1 MiB slice as
        it was sent was 9% of the event loop, the requester's bottleneck (BENCHMARKS.md);
        blake3 releases the GIL, so the hashing runs on another core. A few slices a call
        (HASH_AHEAD_BYTES), so that a job that ends early waits for one call at most. A slice
        that its shard's first attempt reaches first is hashed there as before."""
        if len(self.ranges) <= 1 or not self.kernel.split_operands:
            return
        await self.operands_out.wait()
        try:
            await self._describe_rest()
        except Exception as exc:  # out of memory, say: each shard then hashes its own
            log.debug("job %s: hashing slices ahead failed: %s", self.job_id[:12], exc)

    async def _describe_rest(self) -> None:
        batch: list[int] = []
        batch_bytes = 0
        for index in range(len(self.ranges)):
            if index in self.shard_metas or index in self._describing or index in self.begun_slices:
                continue
            start, stop = self.ranges[index]
            operands = self.kernel.shard_operands(self.spec.operands, start, stop)
            batch.append(index)
            batch_bytes += sum(operands[n].nbytes for n in self.kernel.split_operands)
            if batch_bytes >= HASH_AHEAD_BYTES or index == len(self.ranges) - 1:
                await self._describe_batch(batch)
                batch, batch_bytes = [], 0

    async def _describe_batch(self, indices: list[int]) -> None:
        split = self.kernel.split_operands
        shards = {}
        for index in indices:
            # Not one described meanwhile, or being described, by its first attempt.
            if index not in self.shard_metas and index not in self._describing:
                start, stop = self.ranges[index]
                shards[index] = self.kernel.shard_operands(self.spec.operands, start, stop)
        hashing = trio.Event()
        for index in shards:
            self._describing[index] = hashing

        def hash_slices() -> dict[int, dict[str, ArrayMeta]]:
            return {
                index: {name: meta_of(operands[name]) for name in split}
                for index, operands in shards.items()
            }

        try:
            described = await self.s.runtime.run_blocking(hash_slices)
            for index, operands in shards.items():
                # As describe_shard makes it: the job's own for whole operands.
                self.shard_metas[index] = {
                    name: described[index][name] if name in split else self.metas[name]
                    for name in operands
                }
        finally:
            for index in shards:
                del self._describing[index]
            hashing.set()

    async def describe_shard(
        self, index: int, operands: dict[str, np.ndarray]
    ) -> dict[str, ArrayMeta]:
        """The descriptions of shard ``index``'s operands: the job's own for whole operands,
        a slice's hashed once (on the shard's first attempt) and kept for its retries."""
        begun = self.begun_slices.pop(index, None)
        if begun is not None:
            metas = {n: self.metas[n] for n in operands if n not in self.kernel.split_operands}
            metas.update(begun.result())  # hashed on a helper thread while the job started
            self.shard_metas[index] = metas
            return metas
        hashing = self._describing.get(index)
        if hashing is not None:
            await hashing.wait()  # describe_ahead has it in hand
        known = self.shard_metas.get(index)
        if known is not None:
            return known
        self._describing[index] = hashing = trio.Event()
        try:
            return await self._describe_now(index, operands)
        finally:
            del self._describing[index]
            hashing.set()

    async def _describe_now(
        self, index: int, operands: dict[str, np.ndarray]
    ) -> dict[str, ArrayMeta]:
        metas: dict[str, ArrayMeta] = {}
        slices: dict[str, np.ndarray] = {}
        for name, array in operands.items():
            if name not in self.kernel.split_operands:
                metas[name] = self.metas[name]  # taken whole by every shard
            else:
                slices[name] = array  # a split operand's rows (all of them in a 1-shard job)
        if slices:
            metas.update(await self.s.describe(slices))
        self.shard_metas[index] = metas
        return metas

    async def _compute(
        self,
        worker: str,
        index: int,
        operands: dict[str, np.ndarray],
        metas: dict[str, ArrayMeta],
        out: np.ndarray | None = None,
    ) -> client.ShardAnswer | None:
        unheld = self._unheld(worker, metas)
        inline = self._inline(worker, operands, metas, unheld)
        began = trio.current_time()
        try:
            return await self._compute_with(worker, index, operands, metas, out, unheld, inline)
        except RemoteError as exc:
            # Refusals of the carried operands come at once (a host refuses a request over its
            # limit after its length prefix; a worker over its cap before parsing): one that
            # took longer than the bytes' upload allowance is the worker's failure.
            inline_bytes = sum(operands[name].nbytes for name in inline)
            quick = trio.current_time() - began <= self.s.shard_timeout(worker, 0, inline_bytes)
            text = str(exc)
            if not inline or not quick:
                raise
            if text == client.REQUEST_TOO_LARGE or isinstance(exc, _InlineIgnored):
                # A worker of a version before inline operands: uploads from now on.
                _remember(self.s.no_inline, worker)
            elif not text.startswith(INLINE_REFUSED):
                raise
        return await self._compute_with(worker, index, operands, metas, out, unheld, set())

    def _inline(
        self,
        worker: str,
        operands: dict[str, np.ndarray],
        metas: dict[str, ArrayMeta],
        unheld: set[str],
    ) -> set[str]:
        """Operands to carry in the run request itself: every operand sent unasked
        (``unheld``: the shard's own slices, operands never sent to that worker), when they
        fit INLINE_OPERAND_BYTES together and none is being uploaded there already; else none
        (a run carrying operands does not wait for uploads). One message instead of the run
        request and an upload per operand, each a request and an answer on both peers' event
        loops. Two shards starting together may both carry a new B: at most one extra copy
        of 4 MiB per worker and job, where waiting for another shard's run would tie one
        shard's fate to the other's."""
        if worker in self.s.no_inline:
            return set()
        chosen: set[str] = set()
        room = INLINE_OPERAND_BYTES
        split = self.kernel.split_operands
        for name in sorted(unheld, key=lambda n: (n not in split, n)):
            nbytes, key = operands[name].nbytes, (worker, metas[name].digest)
            # Not what it holds already (a slice equal to a resident operand: its upload
            # stops at the first chunk), nor what is on its way there.
            if nbytes <= room and key not in self.s.sent_operands and key not in self.s.uploads:
                chosen.add(name)
                room -= nbytes
        return chosen if chosen == unheld else set()

    async def _compute_with(
        self,
        worker: str,
        index: int,
        operands: dict[str, np.ndarray],
        metas: dict[str, ArrayMeta],
        out: np.ndarray | None,
        unheld: set[str],
        inline: set[str],
    ) -> client.ShardAnswer | None:
        # The uploads and the run request leave together (the worker waits for operands on
        # their way: one round trip per shard, and a worker pair's next shard uploads while
        # the previous computes). Two deadlines all the same: the uploads' allows for every
        # operand's bytes (the worker may lack them all); the run's, counted from when the
        # uploads are done, for the compute and the result's bytes only, so that a shard
        # whose large operands are already resident is not given minutes to answer.
        # Operands carried in the run request count with the run's bytes; with none left to
        # upload, the run's own deadline is the only one.
        flops = int(self.kernel.flops(operands))
        uploaded = {name: array for name, array in operands.items() if name not in inline}
        # A run carrying operands carries every one the worker is not known to hold: the
        # rest were sent to it before, and are not asked about (a "has" request per shard,
        # answered on both event loops). If it dropped one since, its answer names it, and
        # that one is uploaded before the run is asked again (below).
        trusted = set(uploaded) if inline else set()
        keep = self._keep(worker, metas, inline)
        uploads_beside = bool(uploaded) and not trusted
        result_bytes = int(np.prod(self.kernel.output_shape(operands))) * 4
        run_bytes = result_bytes + sum(operands[name].nbytes for name in inline)
        upload_timeout = 0.0
        if uploaded:
            upload_bytes = sum(a.nbytes for a in uploaded.values())
            upload_timeout = self.s.shard_timeout(worker, 0, upload_bytes)
        run_timeout = self.s.shard_timeout(worker, flops, run_bytes)
        terms = client.ShardTerms(
            requester=self.s.identity.peer_id,
            max_price=self.quotes[worker],
            flops=flops,
            sent_at=self.s.clock.now(),
            now=self.s.clock.now,
        )

        async def run(timeout: float, *, wait: bool) -> client.ShardAnswer:
            return await client.run_shard(
                self.s.network,
                worker,
                job_id=self.job_id,
                shard=index,
                kernel=self.spec.kernel,
                operands=operands,
                timeout=timeout,
                transfer_timeout=timeout,
                terms=terms,
                metas=metas,
                wait_operands=wait,
                out=out,
                inline=inline,
                keep=keep,
                run_blocking=self.s.runtime.run_blocking,
                # With uploads, the operands have left when they are done (send() below).
                sent=None if uploads_beside else self.operands_out,
                # The answer's hash and receipt signature are checked in _judge, with the
                # output's own check (on its thread when that runs on one)...
                defer_verification=True,
                # ... and begun on a helper thread as the answer is read, when this shard is
                # all this requester has under way: a core is then idle (its worker's).
                beside=self.s.runtime.beside if self._only_work(index) else None,
                network_id=self.s.network_id,
                # An output too large for the answer, from a worker on this machine, comes
                # from its sealed copy; mapped over the job's rows when they are memory of
                # the job's own (see local_share.take_shared_output).
                local=self.s.local_shares,
                in_place=out is not None and memory.RECYCLED.owns(out),
                holder=self.job_id,
                on_mapped=lambda: self.mapped_rows.add(index),
            )

        answer: client.ShardAnswer | None = None
        upload_error: Exception | None = None
        run_error: Exception | None = None
        # Nothing is uploaded beside a run that trusts the worker to hold the rest: its own
        # allowance only (the uploads', |B| at the minimum rate, would hold a stalled attempt
        # 50 s for a 32 MiB B, found in review).
        first_timeout = run_timeout if trusted else upload_timeout + run_timeout
        run_scope = trio.CancelScope(deadline=trio.current_time() + first_timeout)

        kept = [m for n, m in metas.items() if n not in self.kernel.split_operands]

        async def upload(arrays: dict[str, np.ndarray], unasked: set[str]) -> None:
            with trio.fail_after(upload_timeout):
                await client.ensure_operands(
                    self.s.network,
                    worker,
                    arrays,
                    timeout=upload_timeout,
                    in_flight=self.s.uploads,
                    metas=metas,
                    unheld=unasked,
                    local=self.s.local_shares,
                    holder=self.job_id,
                )

        async def send(nursery: trio.Nursery) -> None:
            nonlocal upload_error
            try:
                await upload(uploaded, unheld - inline)
                if not inline:
                    self.s.note_uploaded(worker, kept)
                self.operands_out.set()
            except Exception as exc:  # the run cannot succeed without its operands
                upload_error = exc
                nursery.cancel_scope.cancel()
                return
            # Everything is there: from now on the run has its own deadline only.
            run_scope.deadline = trio.current_time() + self.s.shard_timeout(
                worker, flops, run_bytes
            )

        # The errors caught here were caught in this frame: held in its locals when it ends,
        # each would keep the frame (and whatever it refers to, an answer's output among
        # them) alive through its traceback until the cycle collector runs. Cleared on the
        # way out, whether the function returns or raises.
        try:
            async with trio.open_nursery() as nursery:
                if uploads_beside:
                    nursery.start_soon(send, nursery)
                with run_scope:
                    try:
                        answer = await run(first_timeout, wait=True)
                    except Exception as exc:
                        run_error = exc
                if run_scope.cancelled_caught:
                    run_error = trio.TooSlowError()
                if answer is not None or not client.missing_in(run_error or Exception()):
                    nursery.cancel_scope.cancel()  # nothing left to upload for
            if answer is None:
                if upload_error is not None:
                    raise upload_error  # it explains the run's failure (cancelled, missing)
                assert run_error is not None
                missing = client.missing_in(run_error)
                if not missing:
                    raise run_error
                if any(metas[name].digest in missing for name in inline):
                    # It lacks what this very request carried: a worker before ``inline`` that
                    # took the (small) request and ignored its body.
                    raise _InlineIgnored(str(run_error))
                lacking = {n: a for n, a in uploaded.items() if metas[n].digest in missing}
                if trusted and lacking:
                    # It dropped an operand sent to it before: send that one, then ask again.
                    await upload(lacking, set(lacking))
                # The worker did not wait (an older version), or gave up before the uploads
                # ended: they are done now, so ask once more.
                timeout = self.s.shard_timeout(worker, flops, run_bytes)
                with trio.fail_after(timeout):
                    answer = await run(timeout, wait=False)
            if inline:
                self.s.note_uploaded(worker, [metas[name] for name in keep])
                for name in inline - keep - set(self.kernel.split_operands):
                    _remember(self.s.carried_unkept, (worker, metas[name].digest))
            return answer
        finally:
            upload_error = run_error = None

    def _keep(self, worker: str, metas: dict[str, ArrayMeta], inline: set[str]) -> set[str]:
        """The carried operands ``worker`` should keep: a whole operand (B, weights) when this
        job has other shards it may run, or when this requester carried it there once before
        (the same weights for job after job). A one-shard job's B is otherwise used once:
        keeping it cost the worker a copy into fresh pages per job, and memory until evicted."""
        split = self.kernel.split_operands
        return {
            name
            for name in inline
            if name not in split
            and (len(self.ranges) > 1 or (worker, metas[name].digest) in self.s.carried_unkept)
        }

    def _unheld(self, worker: str, metas: dict[str, ArrayMeta]) -> set[str]:
        """Operands to send ``worker`` without asking first whether it holds them.

        A shard's own slice is never resident (workers drop it after the run), and an operand
        this requester never uploaded to that worker is almost never there either (only if
        another requester sent the same bytes). Asking costs a round trip before the upload
        can start (measured on a one-shard 512³ job: the second operand's upload began 4 ms
        after the first); sending costs at most one chunk when the worker does hold it: its
        answer to the first chunk says "complete" and the upload stops."""
        sent, resident = self.s.sent_operands, self.s.resident_everywhere
        return set(self.kernel.split_operands) | {
            name
            for name, meta in metas.items()
            if (worker, meta.digest) not in sent and meta.digest not in resident
        }

    async def _judge(
        self,
        worker: str,
        index: int,
        operands: dict[str, np.ndarray],
        answer: client.ShardAnswer,
        seconds: float,
    ) -> None:
        if index in self.accepted:
            # A hedged twin already won. This answer is still checked as the worker's word
            # (hash and signature, not the product): a twin that sent bytes or a receipt
            # that do not hold is blamed as before, not counted as a good answer.
            with client.peer_fault_boundary(worker, "run answer"):
                answer.verify()
            return
        expected_shape = self.kernel.output_shape(operands)
        if answer.output.shape != expected_shape:
            raise client.WorkerMisbehaved(
                f"output shape {answer.output.shape}, expected {expected_shape}"
            )
        if self.method in ("redundant", "none"):
            # The answer's hash and receipt, before anything uses them (a checked answer's
            # are verified with its check, below).
            with client.peer_fault_boundary(worker, "run answer"):
                answer.verify()
        if self.method == "redundant":
            await self._judge_redundant(worker, index, operands, answer, seconds)
            return
        if self.method == "none":
            # The requester trusts these workers (its own machines, a contracted provider).
            await self._accept(worker, index, answer.output, answer.receipt, seconds)
            return
        # The generator is made here, on the event loop: a seeded runtime's draws then happen
        # in a fixed order, and the check itself may run on a thread.
        rng = self.s.runtime.numpy_rng()
        sketch = await self._freivalds_sketch(operands, rng)
        rows = None
        if self._rows is not None and sketch is self._rows.sketch:
            rows = self._rows.rows(*self.ranges[index])
        flops = self._check_flops(operands)
        verdict, malformed = await self.s.runtime.run_blocking(
            self._verified_check,
            answer,
            operands,
            rng,
            sketch,
            rows,
            flops=flops,
            cheap=sketch is not None
            and flops <= CHEAP_CHECK_FLOPS
            and self._alone_in_the_job(index)
            and blas.single_threaded(),  # ctypes calls: 2% of a busy loop, asked last
        )
        if malformed is not None:
            try:
                with client.peer_fault_boundary(worker, "run answer"):
                    raise malformed
            finally:  # not kept in this frame once raised (see _compute_with)
                malformed = None
        assert verdict is not None
        ok, witness = verdict
        if ok:
            self.checks_passed += 1
            await self._accept(worker, index, answer.output, answer.receipt, seconds)
        else:
            judged = await self._judge_failed(operands, answer.output, witness)
            if judged.proven:
                await self._reject(worker, index, operands, answer, judged.rows)
            elif self._settled(index):
                # Another answer to the shard was accepted while this one was judged (on a
                # thread, which a cancelled attempt still waits for): nothing is left to decide
                # but a proven fault (a review: a twin's late verdict ended a finished job), and
                # the standing of a worker whose answer was not confirmed.
                if judged.beyond_tight and not judged.out_of_range:
                    self._doubted(worker, index, "an answer its check could not confirm")
            elif judged.beyond_bound or (judged.beyond_tight and not judged.out_of_range):
                # Errors where the bound can judge are not paid because other rows cannot be
                # judged (a review: one loose row paid a liar); beside such rows, by the whole
                # tight bound, as the cheap checks judge (honest float16 attention reaches 0.92
                # of it: at half, honest workers went unpaid and doubted, a later review).
                await self._unconfirmed(worker, index, operands)
            elif judged.out_of_range:
                await self._pay_unjudgeable(worker, index, answer.receipt)
                self._unverifiable(index)
            else:
                # Every element within half the tight bound once judged whole: the check's alarm
                # came from its own slack (a device reading subnormal inputs as zero failed the
                # weighted Freivalds check, a review of 2026-12-07, and was blamed).
                self.s.stats.accepted_on_judgement += 1
                log.info(
                    "job %s: shard %d failed its check, but every element is within the "
                    "honest bound: accepted",
                    self.job_id[:12],
                    index,
                )
                self.checks_passed += 1
                await self._accept(worker, index, answer.output, answer.receipt, seconds)

    async def _judge_failed(
        self, operands: dict[str, np.ndarray], output: np.ndarray, witness: Any
    ) -> checks.RowsVerdict:
        """Judge an answer that failed the cheap check, by the worst-case bound
        (:func:`~mtor_kernels.verify.judge_rows`), which is what a fault proof is checked by:
        only rows it proves wrong blame a worker (the hostile reviews of 2026-12-07: numpy's
        own product of rows whose partial sums cancel, and a device reading subnormal inputs
        as zero, failed the cheap checks and were blamed without a proof). The check's own
        witness rows first; when they prove nothing, every row of the shard (blocks of rows,
        on the blocking hook; a failure path), also against the tight bound: a cheater may
        have put inf where overflow was possible to make that row the check's worst and
        spoilt others. The verdict's ``proven``: blame its rows; ``out_of_range``: some rows
        cannot be judged (values near float32's limit, sums that cancel to almost nothing:
        the operands' failure); ``beyond_tight``: not proven, not confirmed; else every
        element is within TIGHT_SHARE_ACCEPTED (half) of the tight bound, and the answer is
        accepted."""
        run = self.s.runtime.run_blocking
        if isinstance(witness, list) and witness:
            verdict = await run(checks.judge_rows, self.kernel, operands, output, witness)
            if verdict.proven:
                return verdict
        every = list(range(output.shape[0]))
        return await run(
            functools.partial(checks.judge_rows, tight=True), self.kernel, operands, output, every
        )

    def _doubted(self, worker: str, index: int, why: str) -> None:
        """``worker``'s answer to shard ``index`` is neither accepted (nor paid) nor proven
        wrong: a failure on its record, and it leaves the job, so that one worker costs a job
        one float64 judgement (several times the shard's own work) and cannot bounce a shard
        until the deadline (a review of the redundant path)."""
        self.s.stats.unconfirmed += 1
        self.s.book.failed(worker, "failed", self.s.clock.now(), why)
        log.warning("job %s: shard %d from %s: %s", self.job_id[:12], index, worker[-8:], why)
        self.unconfirmed_by.setdefault(index, set()).add(worker)
        self.failed_on.setdefault(index, set()).add(worker)
        self._leave(worker, why)

    async def _unconfirmed(self, worker: str, index: int, operands: dict[str, np.ndarray]) -> None:
        """``worker``'s answer to shard ``index`` failed its check and is beyond the accepting
        share of the tight bound, yet within the worst-case one: nothing proves it wrong,
        nothing confirms it (a hostile review: accepting every answer within the worst-case
        bound paid a cheater's errors of 1,000-20,000 times honest rounding). Not accepted,
        nobody blamed by a fault proof (:meth:`_doubted`), and another worker runs the shard.
        From the second such answer to the shard on, the requester computes the shard itself
        and judges its own product: beyond the bound too, the operands are at fault and the
        job cannot be verified (this answer, beyond the bound where it can judge, is not paid);
        within it, the workers were (two Sybils had ended jobs of ordinary operands as "cannot
        be verified", blaming the user's data)."""
        self._doubted(worker, index, "an answer its check could neither confirm nor prove wrong")
        if len(self.unconfirmed_by[index]) >= 2 and await self._operands_at_fault(index, operands):
            if not self._settled(index):
                self._unverifiable(
                    index,
                    f"shard {index} cannot be verified: answers beyond the check's bound, this "
                    "requester's own product among them, are within what an honest float32 "
                    "order may give; rescale or reformulate the operands",
                )
            return
        self.requeue(index)

    async def _operands_at_fault(self, index: int, operands: dict[str, np.ndarray]) -> bool:
        """Whether this requester's own float32 product of shard ``index`` is beyond the tight
        bound too, the whole of it, as the cheap checks judge (or cannot be judged): then
        honest answers may be that far apart. Computed once per shard (a fourth review: each
        further Sybil made the requester compute the shard again, 26 times its cost each);
        at half the bound, honest float16 attention (up to 0.92 of it) blamed the operands."""
        cached = self._own_verdicts.get(index)
        if cached is not None:
            return cached
        run = self.s.runtime.run_blocking
        flops = float(self.kernel.flops(operands))
        own = await run(self.kernel.reference, operands, flops=flops)
        every = list(range(own.shape[0]))
        judge = functools.partial(checks.judge_rows, tight=True, tight_share=1.0)
        verdict = await run(judge, self.kernel, operands, own, every)
        at_fault = verdict.proven or verdict.out_of_range or verdict.beyond_tight
        self._own_verdicts[index] = at_fault
        return at_fault

    async def _pay_unjudgeable(self, worker: str, index: int, receipt: Receipt) -> None:
        """Pay ``worker``'s answer to shard ``index``, which the job's operands make impossible
        to judge (values near float32's limit, sums that cancel, this requester's own product
        as far off): the input is at fault, not the worker, whose work is paid though the job
        ends "cannot be verified" (a review: a requester could choose such operands, keep the
        bytes it received and pay nobody). Never an answer proven wrong; once per answer."""
        if (worker, index) in self._paid_unjudgeable or self._settled(index):
            return
        self._paid_unjudgeable.add((worker, index))
        # Held as "being accepted" while it is paid: settling may wait (no courier), and a
        # twin accepted meanwhile would be paid for the shard too (a review).
        self._accepting.add(index)
        try:
            await self.s.settle(worker, receipt)
        finally:
            self._accepting.discard(index)
        self.s.stats.paid_unjudgeable += 1

    def _settled(self, index: int) -> bool:
        """Whether shard ``index`` has an accepted answer, or one being accepted."""
        return index in self.accepted or index in self._accepting

    def _unverifiable(self, index: int, why: str | None = None) -> None:
        """End the job: shard ``index``'s answer cannot be judged (see _judge_failed); no
        worker is blamed, and the answer that showed it is paid (_pay_unjudgeable), though
        nothing was verified."""
        if self.unverifiable is None:
            self.unverifiable = why or (
                f"shard {index} cannot be verified: an honest float32 result may be inf, NaN "
                "or off by more than the values themselves (values near float32's limit of "
                f"about {FLOAT32_MAX:.1e}, or sums that cancel to almost nothing); rescale "
                "or reformulate the operands"
            )
            log.warning("job %s: %s", self.job_id[:12], self.unverifiable)
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()

    def _check_flops(self, operands: dict[str, np.ndarray]) -> float:
        """Host arithmetic of one check (what a simulation charges as verification time)."""
        if self.method == "freivalds":
            m, k = operands["a"].shape
            n = operands["b"].shape[1]
            return 2.0 * self.spec.freivalds_rounds * (m * k + k * n + 2 * m * n)
        rows = operands[self.kernel.split_operand].shape[0]
        share = min(1.0, self.spec.sample_rows / max(rows, 1))
        return float(self.kernel.flops(operands)) * share

    async def prepare_checks(self) -> None:
        """Make the job's Freivalds sketch while its first shards are out (run beside them).

        The sketch needs only B and vectors drawn here, never an answer, so it is made while
        the workers compute instead of after the first answer: a one-shard 512³ job's check
        on the critical path went from the sketch and the check (1.6 + 1.7 ms, measured) to
        the check alone. It starts once a shard's operands have left (``operands_out``):
        made as the job started, it competed with sending them for the event loop and the
        cores (interleaved one-shard 512³ jobs: p50 15.0 -> 13.5 ms with it 3 ms later).
        Vectors drawn before any answer exists are as unpredictable to the workers as those
        drawn after (they never leave this process). A failure here (out of memory) is left
        to the first check, which makes the sketch again and fails there.
        """
        b = self.spec.operands.get("b")
        if self.method != "freivalds" or "b" in self.kernel.split_operands or b is None:
            return
        if 2.0 * self.spec.freivalds_rounds * b.size > PREPARE_SKETCH_MAX_FLOPS:
            # A large B's sketch is made by the first check, as before: a job that fails or
            # is cancelled first would otherwise wait for it (a thread cannot be abandoned).
            return
        # No answer can come before some operands have left, so no check waits for this.
        await self.operands_out.wait()
        try:
            sketch = await self._freivalds_sketch(self.spec.operands, self.s.runtime.numpy_rng())
            a = self.spec.operands.get("a")
            if sketch is None or a is None or self.kernel.split_operands != ("a",):
                return
            if 2.0 * self.spec.freivalds_rounds * a.size > PREPARE_SKETCH_MAX_FLOPS:
                return  # as for B: a job ending first would wait for it (a review)
            # A's side of the checks too (A z and A's row norms, for all shards at once): a
            # one-shard 512³ job's check after its answer went from 0.77 to about 0.4 ms.
            flops = 2.0 * self.spec.freivalds_rounds * a.size
            rows = await self.s.runtime.run_blocking(
                checks.freivalds_rows,
                a,
                sketch,
                flops=flops,
                cheap=a.size <= CHEAP_SKETCH_ELEMENTS
                and flops <= CHEAP_CHECK_FLOPS
                and blas.single_threaded(),
            )
            if self._sketch is sketch:  # not redrawn meanwhile (a failed check)
                self._rows = rows
        except Exception as exc:
            log.debug("job %s: sketch ahead of the checks failed: %s", self.job_id[:12], exc)

    async def _freivalds_sketch(
        self, operands: dict[str, np.ndarray], rng: np.random.Generator
    ) -> checks.FreivaldsSketch | None:
        """The job's sketch of B (made once, on the blocking hook, with the vectors of the
        check that needs it first: ``rng``), or None when the check is not Freivalds' or this
        shard's B is not the job's."""
        if self.method != "freivalds" or operands.get("b") is not self.spec.operands.get("b"):
            return None
        async with self._sketch_lock:
            if self._sketch is None:
                b = operands["b"]
                rounds = self.spec.freivalds_rounds
                flops = 2.0 * rounds * b.size
                # A small sketch is made on the event loop, as a small check is: on a thread
                # it raced the uploads for the GIL and the cores (512²: 3.5 ms there against
                # 1.1 ms alone; the round trip's p50 fell 1.4 ms with it inline, measured).
                # Gated on B's size, not on the flops: most of its cost is B's conversion to
                # float64 and its norms, whatever the rounds.
                self._sketch = await self.s.runtime.run_blocking(
                    lambda: checks.freivalds_sketch(b, rounds=rounds, rng=rng),
                    flops=flops,
                    cheap=b.size <= CHEAP_SKETCH_ELEMENTS
                    and flops <= CHEAP_CHECK_FLOPS
                    and blas.single_threaded(),
                )
            return self._sketch

    def _only_work(self, index: int) -> bool:
        """Whether shard ``index`` is all this requester has under way (no other job, no
        other shard of this one): short GIL-free work (hashes, signatures) then goes to a
        helper thread beside the event loop (``Runtime.beside``). Beside other work both
        cores are busy already, and the hand-over only adds to it."""
        return self.s.jobs_in_flight == 1 and self._alone_in_the_job(index)

    def _alone_in_the_job(self, index: int) -> bool:
        """Whether no other shard of this job is under way: a small check then runs on the
        event loop, where it costs least (the round trip's latency). Beside other shards the
        event loop is what limits them (sending, receiving, hashing for each: it was runnable
        95% of a B-shared 512² job), and the check on a thread runs on another core. Not
        across jobs: with four one-shard jobs at once, each job's sketch, A's side and check
        on threads gave 106.7 -> 102.5 shards/s on two cores (BENCHMARKS.md)."""
        return not any(other != index for other in self.running)

    def _verified_check(
        self,
        answer: client.ShardAnswer,
        operands: dict[str, np.ndarray],
        rng: np.random.Generator,
        sketch: checks.FreivaldsSketch | None,
        rows: checks.FreivaldsRows | None,
    ) -> tuple[tuple[bool, Any] | None, Exception | None]:
        """The answer's own checks left pending (its output's hash, its receipt's signature:
        ``answer.verify()``) and :meth:`_check`, in one call of the blocking hook: beside
        other shards of the job, all of it on one thread, off the event loop (B-shared 512²
        jobs: the hash and the signature took 11% of the loop's busy time there, py-spy).
        Returns the check's verdict, or the exception the answer itself caused (for the
        caller to judge on its side of the peer-fault boundary) and no verdict. Anything else
        raised here (MemoryError) is this requester's failure, not the worker's: it is raised
        as the check's own failures are."""
        if not answer.begun:
            try:
                answer.verify()
            except ValueError as exc:  # RecordError: the worker's bytes do not hold
                return None, exc
            return self._check(operands, answer.output, rng, sketch, rows), None
        # The answer's own checks are under way on a helper thread (``run_shard(beside=...)``):
        # the check first, whose products release the GIL to them. Its verdict counts only
        # once they have passed.
        verdict: tuple[bool, Any] | None = None
        check_error: Exception | None = None
        try:
            verdict = self._check(operands, answer.output, rng, sketch, rows)
        except Exception as exc:
            check_error = exc
        try:
            answer.verify()
        except ValueError as exc:
            check_error = None  # not kept in this frame (see _compute_with)
            return None, exc
        if check_error is not None:
            try:
                raise check_error
            finally:  # not kept in this frame once raised (see _compute_with)
                check_error = None
        return verdict, None

    def _check(
        self,
        operands: dict[str, np.ndarray],
        output: np.ndarray,
        rng: np.random.Generator,
        sketch: checks.FreivaldsSketch | None = None,
        rows: checks.FreivaldsRows | None = None,
    ) -> tuple[bool, Any]:
        # May run in a worker thread: a fresh generator per check (Generators are not
        # thread-safe), from the runtime (the OS in production, so that a worker cannot
        # predict the vectors or rows checked).
        if self.method == "freivalds":
            result = checks.freivalds(
                operands["a"],
                operands["b"],
                output,
                rounds=self.spec.freivalds_rounds,
                rng=rng,
                sketch=sketch,
                rows=rows,
            )
            return result.ok, None if result.ok else [result.row]
        result = checks.sample_rows(
            self.kernel, operands, output, samples=self.spec.sample_rows, rng=rng
        )
        if result.ok:
            return True, None
        # Rows too loose to judge are the witness too: judged again (_judge_failed), they
        # prove nothing and end the job as one that cannot be verified.
        return False, [int(r) for r in np.union1d(result.bad_rows, result.loose_rows)]

    async def _judge_redundant(
        self,
        worker: str,
        index: int,
        operands: dict[str, np.ndarray],
        answer: client.ShardAnswer,
        seconds: float,
    ) -> None:
        answers = self.redundant_answers.setdefault(index, [])
        # One answer per worker: a worker's second answer to the shard replaces its first, so
        # that two answers compared always come from two workers (next_shard and
        # _wants_worker keep a worker from running a shard it answered; this holds whatever
        # path an answer took).
        answers[:] = [a for a in answers if a[0] != worker]
        answers.append((worker, answer.output, answer.receipt))
        if len(answers) < 2:
            self.requeue(index, reissue=False)  # planned: a second, independent answer
            return
        (w1, out1, r1), (w2, out2, r2) = answers[-2:]
        agree, _ = checks.compare(out1, out2, dtype=self.input_dtype)
        if agree and not np.isfinite(out2).all():
            # Two answers agreeing on inf or NaN: honest where the operands overflow float32 or
            # hold NaN, and otherwise two colluders' (a review: both all-inf on ordinary data
            # were accepted and paid). The rows holding them are judged (at most 64); a proven
            # fault goes the way of a disagreement, where each answer is judged and blamed.
            flat = out2.reshape(out2.shape[0], -1)
            rows = [int(r) for r in np.unique(np.nonzero(~np.isfinite(flat))[0])]
            if len(rows) > MAX_NON_FINITE_ROWS_JUDGED:
                # Drawn, not the first ones: colluders could hide behind rows that honestly
                # overflow (a review).
                rows = self.s.runtime.random.sample(rows, MAX_NON_FINITE_ROWS_JUDGED)
            verdict = await self.s.runtime.run_blocking(
                checks.judge_rows, self.kernel, operands, out2, rows
            )
            agree = not verdict.proven
        if agree:
            self.checks_passed += 1
            # The copy is paid only beside an answer accepted now: a shard accepted meanwhile
            # (a hedged twin's pair judged first) has paid its two workers already. (w1 and
            # w2 differ: one answer per worker, above.)
            if await self._accept(w2, index, out2, r2, seconds):
                await self._accept_extra(w1, r1)
            return
        # Disagreement: the requester recomputes the shard itself to tell who is wrong.
        reference = await self.s.runtime.run_blocking(
            self.kernel.reference, operands, flops=float(self.kernel.flops(operands))
        )
        confirmed = []
        unjudged: list[tuple[str, Receipt]] = []
        for w, out, receipt in ((w1, out1, r1), (w2, out2, r2)):
            matches, _ = checks.compare(reference, out, dtype=self.input_dtype)
            if matches:
                confirmed.append((w, receipt, out))
                continue
            # Out of the shard's answers, from the list as it is now (another answer may have
            # come while the reference was computed): a hostile review found that rebuilding
            # it from the list as it was let the first of two wrong answers back in, to be
            # accepted.
            self.redundant_answers[index] = [
                a for a in self.redundant_answers.get(index, []) if a[0] != w
            ]
            # Blamed only by the rows the worst-case bound proves wrong, as after a failed
            # check (a review: rows whose partial sums cancel made two honest orders disagree,
            # and the sequential one was rejected with a fault proof that did not verify).
            # Not proven: not accepted, not blamed; non-finite values where the sums may
            # overflow, or a bound too wide, make the shard one that cannot be verified.
            verdict = await self.s.runtime.run_blocking(
                functools.partial(checks.judge_rows, tight=True),
                self.kernel,
                operands,
                out,
                list(range(out.shape[0])),
            )
            if verdict.proven:
                await self._reject(
                    w,
                    index,
                    operands,
                    client.ShardAnswer(out, receipt),
                    verdict.rows,
                    requeue=False,
                )
            elif verdict.out_of_range and not verdict.beyond_bound:
                unjudged.append((w, receipt))
            else:
                self._doubted(w, index, "an answer the requester's own product did not confirm")
        if not confirmed:
            if unjudged and not self._settled(index):
                for w, receipt in unjudged:
                    await self._pay_unjudgeable(w, index, receipt)
                self._unverifiable(index)
            else:
                self.requeue(index)
            return
        # Only answers the requester's own product confirmed are accepted (never one that
        # came meanwhile and was compared with nothing); each other confirmed answer was
        # honest work too (the comparison is not transitive: two may differ, both right) and
        # is paid as a copy.
        w, receipt, out = confirmed[-1]
        self.checks_passed += 1
        if await self._accept(w, index, out, receipt, seconds):
            for other, other_receipt, _ in confirmed[:-1]:
                await self._accept_extra(other, other_receipt)

    async def _accept_extra(self, worker: str, receipt: Receipt) -> None:
        # The redundant copy was honest work: it is paid for too, and counted in the job's
        # receipts and cost.
        self.extra_receipts.append(await self.s.settle(worker, receipt))

    async def _accept(
        self, worker: str, index: int, output: np.ndarray, receipt: Receipt, seconds: float
    ) -> bool:
        """Accept ``worker``'s answer for shard ``index`` and settle its receipt; False if the
        shard was accepted (or is being accepted) already, and nothing was done."""
        if index in self.accepted or index in self._accepting:
            return False
        # Settling may wait (no courier: the commits happen here): a hedged twin judged
        # meanwhile must not be accepted, and paid, a second time.
        self._accepting.add(index)
        try:
            complete = await self.s.settle(worker, receipt)
        finally:
            self._accepting.discard(index)
        start, stop = self.ranges[index]
        self.accepted[index] = ShardResult(
            index, (start, stop), worker, seconds, self.attempt_counts[index], complete
        )
        if np.may_share_memory(output, self.output[start:stop]):
            # Downloaded into its rows by their owner (nothing else writes there): nothing to
            # copy at the end, and the rows stay this answer's.
            self.placed.add(index)
        elif self._in_place and index not in self.row_owner:
            # An answer that came in its run reply, with no download holding the rows (none
            # may start now that the shard is accepted): copied in now, while other shards
            # compute, rather than all at the end (200 MiB of 512² outputs took 0.69 s of a
            # 5.4 s job there, measured) and without keeping the reply until then.
            if len(self.ranges) == 1 and _owns_its_buffer(output, self.output):
                # The job's whole output, in a reply buffer nobody else holds: it becomes
                # the output, uncopied (a 512² one-shard job copied 1 MiB here: 5.5% of a
                # requester's samples with 300 such jobs under way, 2026-12-06).
                self.output = output
            else:
                self._rows_to_write(index)[:] = output
            self.placed.add(index)
        else:
            self.outputs[index] = output
        self.durations.append(seconds)
        # What this worker delivered, verified: the measurement every later job ranks it by.
        self.s.book.accepted(
            worker, flops=receipt.body.flops, seconds=seconds, now=self.s.clock.now()
        )
        for other in self.running.get(index, []):
            if other.worker != worker:
                other.scope.cancel()  # the hedged twin is no longer needed
        if self.progress is not None:
            self.progress(len(self.accepted), len(self.ranges))
        if len(self.accepted) == len(self.ranges):
            self.done.set()
            self._wake()  # the job's own task (_until_done) waits on the wakeup
        return True

    async def _reject(
        self,
        worker: str,
        index: int,
        operands: dict[str, np.ndarray],
        answer: client.ShardAnswer,
        witness: Any,
        *,
        requeue: bool = True,
    ) -> None:
        self.rejected += 1
        self.rejected_by[worker] = self.rejected_by.get(worker, 0) + 1
        self._sketch = self._rows = None  # fresh vectors for the checks after a failed one
        self.s.book.failed(worker, "rejected", self.s.clock.now())
        self._leave(worker, "returned a wrong result")
        proof = make_fault_proof(
            self.s.identity,
            kernel=self.kernel,
            operands=operands,
            output=answer.output,
            claim=answer.receipt,
            rows=witness,
        )
        self.fault_proofs.append(proof)
        self.s.stats.rejected += 1
        self.s.stats.fault_proofs += 1
        proof_id = f"{self.job_id}:{index}:{worker}"
        await self.s.runtime.run_blocking(self.s.receipts.add_fault_proof, proof_id, worker, proof)
        if self.s.on_fault is not None:
            await self.s.on_fault(proof)
        log.warning("rejected shard %d from %s: fault proof recorded", index, worker[-8:])
        if requeue:
            self.requeue(index)

    # -- per-worker loop -------------------------------------------------------------------

    async def worker_loop(self, record: CapacityRecord) -> None:
        """Feed ``record``'s worker shards until the job is done or gives up on it."""
        worker = record.peer_id
        if not await self.s.ensure_connected(record):
            # Unreachable: a replacement takes its share, and later jobs skip it for a while.
            self.s.book.failed(worker, "unreachable", self.s.clock.now())
            self._leave(worker, "unreachable")
            return
        # One slot more than the shards the worker may hold: while an answer is judged here
        # (Freivalds' check on a thread takes longer than on the event loop), the next shard
        # is already on its way to the worker, which thus keeps max_in_flight in hand.
        # No more slots than the job has shards: a worker never runs two attempts at one
        # shard, and an idle slot wakes with every attempt of the job that ends (a one-shard
        # job spent 25 task steps on six slots, four of which could never send anything).
        self._serving.add(worker)
        try:
            with self.s.worker_tokens(worker, id(self)) as at_worker:
                self._tokens[worker] = at_worker
                async with trio.open_nursery() as nursery:
                    for slot in range(min(self.s.max_in_flight + 1, len(self.ranges))):
                        nursery.start_soon(self._slot, worker, slot, at_worker)
        finally:
            self._serving.discard(worker)
            self._tokens.pop(worker, None)
            self._wake()  # a slot holding back for this worker takes the shard itself

    async def _slot(self, worker: str, slot: int, at_worker: JobTokens) -> None:
        failures_in_a_row = busy_in_a_row = 0
        # A worker the peer book demotes as a straggler while this job runs takes none of its
        # shards from then on, as later jobs will not plan it: a staller cut off on one shard
        # went on to take another (a test of eight Sybils). Other demotions (failures that a
        # retry may cure) do not end its part, nor does one that would leave the job short of
        # the workers its check needs (a review: a one-worker job failed, and a redundant
        # job waited out its deadline).
        demoted_before = self.s.book.excluded(worker, self.s.clock.now()) is not None

        def held_back() -> bool:
            # Asked again once a token is in hand: the worker's standing may have changed
            # while this slot waited for it (a review: a slot waiting beside a straggler's
            # last shard sent it another after its demotion, and one beside a "busy" answer
            # sent at once what the answered slot was backing off from).
            return (
                (not demoted_before and self._straggler_out(worker))
                or (slot > 0 and not self.s.book.get(worker).measured)
                or self._resume_at.get(worker, 0.0) > trio.current_time()
            )

        while not self.done.is_set() and worker not in self.banned:
            if not demoted_before and self._straggler_out(worker):
                self._leave(worker, f"demoted during the job: {STRAGGLER}")
                return
            if slot > 0 and not self.s.book.get(worker).measured:
                # A worker never verified here gets one shard at a time (its trial): a liar
                # or a staller holds at most one shard of the job hostage.
                wakeup = self.wakeup
                with trio.move_on_after(0.1):
                    await wakeup.wait()
                continue
            pause = self._resume_at.get(worker, 0.0) - trio.current_time()
            if pause > 0:
                await trio.sleep(pause)  # a busy or failed answer: every slot backs off
                continue
            await at_worker.acquire()
            if self.done.is_set() or worker in self.banned or held_back():
                at_worker.release()
                continue  # the loop's own checks say what comes next
            choice = self.next_shard(worker)
            if choice is None:
                at_worker.release()
                wakeup = self.wakeup
                with trio.move_on_after(0.1):
                    await wakeup.wait()
                continue
            index, hedge = choice
            outcome = await self.attempt(worker, index, hedge, at_worker)
            if outcome == "busy":
                busy_in_a_row += 1
                if busy_in_a_row >= BUSY_ANSWERS_BEFORE_LEAVING:
                    # Overloaded for long (or pretending to be): its place goes to someone
                    # else, and later jobs skip it for a short, non-growing while.
                    self.s.book.failed(worker, "busy", self.s.clock.now())
                    self._leave(worker, f"busy {busy_in_a_row} times in a row")
                    return
                self._back_off(worker, min(5.0, 0.2 * 2**busy_in_a_row))
                continue
            busy_in_a_row = 0
            if outcome in ("failed", "timeout", "misbehaved"):
                failures_in_a_row += 1
                if not self.s.book.get(worker).measured:
                    # Say why (its last error: "reachable only through a relay", a timeout):
                    # the job's error is what a user reads.
                    why = self.s.book.get(worker).last_error or outcome
                    self._leave(worker, f"failed its trial ({why})")
                    return
                if failures_in_a_row >= 3:
                    # Give up on a worker that keeps failing; a replacement takes over.
                    self._leave(worker, f"failed {failures_in_a_row} shards in a row")
                    return
                self._back_off(worker, min(2.0, 0.1 * 2**failures_in_a_row))
            else:
                failures_in_a_row = 0

    def _back_off(self, worker: str, seconds: float) -> None:
        """Send ``worker`` nothing more of this job for ``seconds`` (from any slot)."""
        until = trio.current_time() + seconds
        self._resume_at[worker] = max(self._resume_at.get(worker, 0.0), until)


class Scheduler:
    """Runs jobs for one requesting peer."""

    def __init__(
        self,
        network: Network,
        identity: Identity,
        clock: NetClock,
        view: CapacityView,
        receipts: ReceiptStore,
        *,
        max_in_flight: int = 2,
        runtime: Runtime | None = None,
        region: str | None = None,
        book: PeerBook | None = None,
    ) -> None:
        self.region = region
        #: What this peer measured of every worker; shared by all jobs, kept across restarts.
        self.book = book if book is not None else PeerBook()
        #: Bytes on the wire per byte of operand here: 1, except in the simulator, whose
        #: small operands stand for larger ones (deadlines must allow for the real transfer).
        self.byte_scale = 1.0
        self.runtime = runtime or Runtime.production()
        self.network = network
        #: This requester's network, sent with each run (workers refuse another's); None:
        #: not sent (no ledger).
        self.network_id: str | None = None
        #: Its name (the genesis's ``network``), said when a worker of another refuses.
        self.network_name: str | None = None
        self.identity = identity
        self.clock = clock
        self.view = view
        self.receipts = receipts
        self.max_in_flight = max_in_flight
        #: worker -> its tokens of shards in flight, while a job uses them (worker_tokens).
        self._tokens: dict[str, WorkerTokens] = {}
        #: Called with each countersigned receipt and each fault proof (the ledger's intake).
        self.on_settled: Callable[[Receipt], Awaitable[None]] | None = None
        self.on_fault: Callable[[bytes], Awaitable[None]] | None = None
        self.uploads: dict[tuple[str, str], trio.Event] = {}  # (worker, operand) being sent
        #: Sealed copies of large operands for workers on this machine (see local_share).
        self.local_shares = LocalShares(self.runtime.run_blocking, identity.peer_id)
        #: Hashes of operands made on threads beside the event loop (see describe).
        self._hash_limiter = trio.CapacityLimiter(blas.usable_cores())
        #: (worker, operand hash) this requester has uploaded, most recent last (at most
        #: SENT_OPERANDS_KEPT): only these are asked about before a run; the rest are sent
        #: at once (see _JobRun._compute).
        self.sent_operands: OrderedDict[tuple[str, str], None] = OrderedDict()
        #: Operand hashes that every worker holds before any job (the weights the simulator
        #: preloads onto each worker, as model hosts hold theirs): treated as sent to every
        #: worker, so never carried or uploaded unasked. Empty outside the simulator.
        self.resident_everywhere: frozenset[str] = frozenset()
        #: Workers that refused a batch of countersigned receipts (before batches).
        self._unbatched: OrderedDict[str, None] = OrderedDict()
        #: (worker, operand hash) carried in a run request without asking the worker to keep
        #: it (bounded like sent_operands): carried there again, it is kept (see _keep).
        self.carried_unkept: OrderedDict[tuple[str, str], None] = OrderedDict()
        #: Workers that refused a run request carrying operands as too large (a version
        #: before ``inline``): their operands are uploaded (bounded like sent_operands).
        self.no_inline: OrderedDict[str, None] = OrderedDict()
        #: Workers that refused this requester's network: worker -> (why it is out, when it
        #: may be asked again). See OTHER_NETWORK_MEMORY_S.
        self.other_network: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._other_network_noted = trio.Event()  # set when one is remembered
        #: Called with every :class:`ShardAttempt` as it ends (metrics, simulation, dashboards).
        self.observer: Callable[[ShardAttempt], None] | None = None
        #: Returns every peer's stake (nano-credits) from the ledger; None: no ledger.
        self.stakes: Callable[[], dict[str, int]] | None = None
        #: trio time of the last job submitted here (challenges aside); None before the first.
        #: Its price limit too: challenges never pay more than the owner was willing to.
        self.last_max_price: float | None = None
        self.last_job_at: float | None = None
        # Countersigned receipts travel to their workers off the job's critical path: a dead
        # worker must not delay the result by a delivery timeout.
        # (worker, its receipts): what one settlement gave it, delivered in one request.
        self._outbox_send, self._outbox = trio.open_memory_channel[tuple[str, list[Receipt]]](
            10_000
        )
        # Receipts countersigned and not yet stored and entered into the ledger: the courier
        # settles them after their job has its result (see settle()).
        self._settle_send, self._settle_recv = trio.open_memory_channel[tuple[str, Receipt]](10_000)
        self._settling = False
        self._unsettled = 0
        #: Receipts taken from the queue for the batch being gathered (see courier).
        self._held: list[tuple[str, Receipt]] = []
        #: Set by settled(): settle what is held now instead of after SETTLE_DELAY.
        self._flush_wanted = trio.Event()
        self._settled_changed = trio.Event()
        #: Counters of this requester's jobs and shards (the metrics read them).
        self.stats = SchedulerStats()
        #: Shard attempts sent, by the worker's GPU class (mtor_p2p/insight.py's demand).
        self.shards_sent = EventWindow()
        #: The last PLAN_NOTES jobs' plans (challenges aside), oldest first.
        self.plans: deque[PlanNote] = deque(maxlen=PLAN_NOTES)
        #: Jobs running now (run() calls under way, challenges included).
        self.jobs_in_flight = 0

    @contextlib.contextmanager
    def worker_tokens(self, worker: str, holder: int) -> Iterator[JobTokens]:
        """Job ``holder``'s hand on the tokens of ``worker``'s shards in flight from this
        requester: ``SHARED_IN_FLIGHT x max_in_flight`` shared by every job that runs on it
        now, and ``max_in_flight`` of the job's own.

        Not per job alone: with a token set per job, jobs submitted together each sent a
        worker ``max_in_flight`` shards, and all of them went to the worker ranked first,
        whose slots ask first (300 one-shard jobs at once over two workers: one ran 90%, the
        other idled). Shared, a worker holding the requester's share waits while another
        takes the shard. The shared tokens are dropped when no job uses the worker."""
        tokens = self._tokens.get(worker)
        if tokens is None:
            tokens = self._tokens[worker] = WorkerTokens(SHARED_IN_FLIGHT * self.max_in_flight)
        tokens.users += 1
        try:
            yield JobTokens(tokens, holder, self.max_in_flight)
        finally:
            tokens.users -= 1
            if tokens.users == 0:
                del self._tokens[worker]

    def note_sent(self, worker: str) -> None:
        """Count one shard attempt sent to ``worker`` under its GPU class ("unknown" if its
        record is gone)."""
        now = self.clock.now()
        record = self.view.get(worker, now)
        self.shards_sent.add(now, gpu_class(record.devices) if record is not None else "unknown")

    def note_other_network(self, worker: str, reason: str) -> None:
        """Leave ``worker``, which refused this requester's network for ``reason``, out of
        later jobs' plans while its connection lasts (at most OTHER_NETWORK_MEMORY_S)."""
        self.other_network.pop(worker, None)
        self.other_network[worker] = (reason, self.clock.now() + OTHER_NETWORK_MEMORY_S)
        while len(self.other_network) > MAX_OTHER_NETWORK_PEERS:
            self.other_network.popitem(last=False)
        self._other_network_noted.set()

    def is_other_network(self, worker: str) -> bool:
        """Whether ``worker`` is left out as a worker of another network now (see
        OTHER_NETWORK_MEMORY_S)."""
        return self._of_other_network(worker, self.clock.now(), None) is not None

    async def forget_other_networks(self) -> None:
        """Run by the node: while any worker of another network is remembered, forget those
        found disconnected and those whose time is up (a check at the next plan alone missed
        a worker restarted with this network's genesis and connected again by then, and kept
        a connected one from challenges for good: two reviews). No wake-ups otherwise (a
        simulation runs a thousand schedulers)."""
        while True:
            await self._other_network_noted.wait()
            while self.other_network:
                await trio.sleep(OTHER_NETWORK_SWEEP_S)
                now = self.clock.now()
                connected = (
                    set(self.network.connected_peers()) if self.network is not None else None
                )
                for peer in list(self.other_network):
                    self._of_other_network(peer, now, connected)  # forgets it if it is time
            self._other_network_noted = trio.Event()

    def _of_other_network(self, worker: str, now: float, connected: set[str] | None) -> str | None:
        """Why ``worker`` is out of plans as a worker of another network, or None (never
        refused, or forgotten: disconnected since, or its time is up)."""
        entry = self.other_network.get(worker)
        if entry is None:
            return None
        reason, until = entry
        if now >= until or (connected is not None and worker not in connected):
            del self.other_network[worker]
            return None
        return reason

    def speed_of(self, record: CapacityRecord) -> float:
        """TFLOP/s to plan with for ``record``'s worker: measured here, else its claim capped
        (see :meth:`PeerBook.effective_tflops`)."""
        return self.book.effective_tflops(record.peer_id, record.tflops)

    def plan_workers(self, spec: JobSpec, stakes: dict[str, int] | None = None) -> WorkerPlan:
        """Who runs ``spec``: up to ``max_workers`` chosen now, the rest of the acceptable
        workers in reserve (best first), and why the others are out.

        Measured workers are ranked by value: price per TFLOP/s delivered on our own verified
        shards, weighted by their failures and the load they report. Workers never measured
        here are not ranked by what they claim (a liar claims the most): they come in a seeded
        random order, and at most a quarter of the places (at least one) go to them while
        measured workers can fill the rest. ``stakes`` (peer -> nano-credits staked, from
        the ledger) weight that random order: a worker with S credits at stake is drawn as
        if it were 1 + S workers, since stake is what a proven wrong result costs it and
        what a swarm of fresh Sybils lacks. Workers the peer book demoted (unreachable,
        failing, caught cheating) are left out until their back-off ends. Workers of other
        ledger rules are never candidates (CapacityQuery.ledger_rules); the plan counts them.
        """
        now = self.clock.now()
        query = CapacityQuery(kernel=spec.kernel, max_price=spec.max_price)
        excluded: dict[str, str] = {}
        candidates = []
        demoted = []
        connected = set(self.network.connected_peers()) if self.network is not None else None
        for record in self.view.query(query, now):
            if record.peer_id == self.identity.peer_id:
                continue
            if spec.only is not None and record.peer_id not in spec.only:
                continue
            other_network = self._of_other_network(record.peer_id, now, connected)
            if other_network is not None:
                # Not a demotion: never a candidate, not even when nobody else is left.
                excluded[record.peer_id] = other_network
                continue
            why = self.book.excluded(record.peer_id, now)
            if why is None:
                candidates.append(record)
            else:
                excluded[record.peer_id] = why
                if self.book.get(record.peer_id).rejected == 0:
                    demoted.append(record)
        if not candidates and demoted:
            # Nobody else: a demotion (unreachable, failing, slow) ranks a worker last, it
            # does not forbid it. Those whose back-off ends first go first; workers caught
            # returning wrong results stay out.
            demoted.sort(key=lambda r: self.book.get(r.peer_id).demoted_until)
            candidates = demoted
            for record in demoted:
                excluded.pop(record.peer_id, None)

        def value(record: CapacityRecord) -> float:
            return worker_value(record, self.book.get(record.peer_id), self.speed_of(record))

        slower: list[CapacityRecord] = []
        if spec.latency_target is not None and candidates:
            flops = float(get_kernel(spec.kernel).flops(spec.operands))
            expected = {r.peer_id: self.expected_seconds(r, flops) for r in candidates}
            by_speed = sorted(candidates, key=lambda r: expected[r.peer_id])
            fast = [r for r in by_speed if expected[r.peer_id] <= spec.latency_target]
            # None fast enough: the quickest few still beat the cheapest far away.
            candidates = fast or by_speed[:8]
            # The others wait at the end of the reserve: a late answer beats no answer when
            # every fast worker failed or cheated.
            chosen_ids = {r.peer_id for r in candidates}
            slower = [r for r in by_speed if r.peer_id not in chosen_ids][:MAX_SLOWER_RESERVE]
        measured = sorted((r for r in candidates if self.book.get(r.peer_id).measured), key=value)
        unmeasured = [r for r in candidates if not self.book.get(r.peer_id).measured]
        self.runtime.random.shuffle(unmeasured)
        # Newcomers we are already connected to first: a record's addresses are a claim too,
        # and those of Sybils may swallow every dial.
        unmeasured.sort(key=lambda r: r.peer_id not in (connected or ()))
        if stakes:
            # A weighted random order (Efraimidis-Spirakis): key u^(1/w), largest first.
            draw = self.runtime.random.random
            keys = {
                r.peer_id: draw() ** (1.0 / (1.0 + stakes.get(r.peer_id, 0) / NANO))
                for r in unmeasured
            }
            unmeasured.sort(key=lambda r: -keys[r.peer_id])
        overpriced: list[CapacityRecord] = []
        if spec.max_price is None and unmeasured:
            # No price limit given: a newcomer asking far above the market gets no trial
            # (the requester would pay it before knowing what it delivers).
            ceiling = trial_price_ceiling(r.price for r in candidates)
            assert ceiling is not None  # unmeasured workers are candidates
            overpriced = [r for r in unmeasured if r.price > ceiling and measured]
            unmeasured = [r for r in unmeasured if r not in overpriced]
        places = max(1, spec.max_workers)
        trial = trial_places(places)
        take_unmeasured = min(len(unmeasured), max(trial, places - len(measured)))
        chosen = measured[: places - take_unmeasured] + unmeasured[:take_unmeasured]
        reserve = (
            measured[places - take_unmeasured :]
            + unmeasured[take_unmeasured:]
            + overpriced
            + slower
        )
        # Why each candidate not chosen was passed over (PlanNote; mtor_p2p/insight.py).
        passed: dict[str, tuple[str, str]] = {}
        for peer, why in excluded.items():
            if why.startswith(OTHER_NETWORK_OUT + ":"):
                passed[peer] = (NETWORK_OUT, why)
            else:
                unreachable = why.startswith("unreachable")
                passed[peer] = ("reachability" if unreachable else "demoted", why)
        chosen_measured = measured[: places - take_unmeasured]
        last_measured = chosen_measured[-1] if chosen_measured else None
        for record in measured[places - take_unmeasured :]:
            passed[record.peer_id] = self._ranked_below(record, last_measured)
        for record in unmeasured[take_unmeasured:]:
            passed[record.peer_id] = (
                "newcomer",
                f"never measured here: workers never measured get at most {trial} of a job's "
                f"{places} places while measured ones can fill them",
            )
        median = statistics.median(r.price for r in candidates) if candidates else 0.0
        for record in overpriced:
            passed[record.peer_id] = (
                "price",
                f"never measured here and asks {record.price:g}, over "
                f"{TRIAL_PRICE_MULTIPLE:g}x the median {median:g} of the job's workers: no "
                "trial for a job without a price limit",
            )
        for record in slower:
            passed[record.peer_id] = (
                "latency",
                f"expected to answer a shard in over the job's latency target of "
                f"{spec.latency_target:g} s",
            )
        return WorkerPlan(
            chosen=chosen,
            reserve=reserve,
            excluded=excluded,
            passed_over=passed,
            other_rules=self._other_rules_in_view(spec, now),
        )

    def _other_rules_in_view(self, spec: JobSpec, now: float) -> OtherRules:
        """Workers the job's terms would take but for their ledger rules. One pass, unsorted
        (a flood of records anyone can sign costs a job little)."""
        terms = CapacityQuery(kernel=spec.kernel, max_price=spec.max_price, ledger_rules=None)
        workers, rules = 0, set()
        for record in self.view.live_unsorted(now):
            if (
                record.ledger_rules == LEDGER_RULES
                or record.peer_id == self.identity.peer_id
                or (spec.only is not None and record.peer_id not in spec.only)
                or not terms.matches(record)
            ):
                continue
            workers += 1
            if len(rules) < MAX_OTHER_RULES_SHOWN:
                rules.add(record.ledger_rules)
        return OtherRules(workers, tuple(sorted(rules)))

    def _ranked_below(self, record: CapacityRecord, last: CapacityRecord | None) -> tuple[str, str]:
        """Why measured ``record`` ranked below ``last``, the last measured worker chosen:
        the factor of :func:`worker_value` in which it compares worst."""
        if last is None:
            return "places", "every place of the job went to workers never measured here"
        mine = value_factors(record, self.book.get(record.peer_id), self.speed_of(record))
        theirs = value_factors(last, self.book.get(last.peer_id), self.speed_of(last))
        factor = max(("price", "speed", "failures", "load"), key=lambda f: mine[f] / theirs[f])
        category = "measured speed" if factor == "speed" else factor
        return category, (
            f"ranked below the last worker chosen ({last.peer_id[-8:]}): asks {record.price:g} "
            f"vs {last.price:g}, measured {self.speed_of(record):.3g} vs "
            f"{self.speed_of(last):.3g} TFLOP/s, failure penalty "
            f"{mine['failures']:.2f} vs {theirs['failures']:.2f}, load {record.load:g} vs "
            f"{last.load:g}"
        )

    def _note_plan(self, spec: JobSpec, plan: WorkerPlan, job_id: str | None) -> None:
        """Remember who ``spec``'s job was planned with and why every other worker of the
        view was passed over: the plan's reasons, and the job's terms for the rest."""
        now = self.clock.now()
        chosen = {r.peer_id for r in plan.chosen}
        passed = dict(plan.passed_over)
        for record in self.view.live(now):
            peer = record.peer_id
            if peer == self.identity.peer_id or peer in chosen or peer in passed:
                continue
            if record.ledger_rules != LEDGER_RULES:
                passed[peer] = (RULES_OUT, _other_rules_detail(record))
            elif spec.kernel not in record.kernels:
                served = ", ".join(record.kernels) or "none"
                passed[peer] = ("kernel", f"does not serve {spec.kernel} (serves {served})")
            elif spec.max_price is not None and record.price > spec.max_price:
                passed[peer] = (
                    "price",
                    f"asks {record.price:g}, over the job's price limit of {spec.max_price:g}",
                )
        noted = dict(list(passed.items())[:MAX_NOTED_PER_JOB])
        self.plans.append(
            PlanNote(
                job_id=job_id,
                at=now,
                kernel=spec.kernel,
                chosen=tuple(r.peer_id for r in plan.chosen),
                passed_over=noted,
                passed_over_count=len(passed),
            )
        )

    def _newcomers_for(self, spec: JobSpec) -> bool:
        """True if a worker never measured here is among ``spec``'s candidates."""
        query = CapacityQuery(kernel=spec.kernel, max_price=spec.max_price)
        return any(
            r.peer_id != self.identity.peer_id
            and (spec.only is None or r.peer_id in spec.only)
            and not self.book.get(r.peer_id).measured
            for r in self.view.query(query, self.clock.now())
        )

    def _cheapest(self, spec: JobSpec) -> str:
        """A note on the cheapest ask, for a failure when a price limit left workers out."""
        if spec.max_price is None:
            return ""
        prices = [
            r.price
            for r in self.view.query(CapacityQuery(kernel=spec.kernel), self.clock.now())
            if r.peer_id != self.identity.peer_id
        ]
        if not prices:
            return ""
        return f" (the cheapest of {len(prices)} asks {min(prices):g}; raise the price limit)"

    def choose_workers(self, spec: JobSpec) -> list[CapacityRecord]:
        """The workers a job of ``spec`` would start with (see :meth:`plan_workers`)."""
        return self.plan_workers(spec).chosen

    def expected_seconds(self, record: CapacityRecord, flops: float) -> float:
        """How long a shard of ``flops`` should take on ``record``'s worker: the median of
        its recent round trips with us, else a prior from its region and planning speed.
        The region is the record's claim too; a far worker lying about it is measured, and
        ranked by its round trips, after its first shard."""
        standing = self.book.get(record.peer_id)
        if standing.seconds:
            return statistics.median(standing.seconds) * (1 + record.load)
        near = self.region is not None and record.region == self.region
        network = NEAR_ROUND_TRIPS if near else FAR_ROUND_TRIPS
        return network + flops / max(self.speed_of(record) * 1e12, 1.0)

    async def ensure_connected(self, record: CapacityRecord) -> bool:
        """Dial a worker known only from its capacity record; False if no address answers.

        Its first MAX_DIAL_ADDRS addresses are dialled at once under one deadline: a record
        full of addresses that swallow packets costs one dial timeout, not one per address.
        """
        if record.peer_id in self.network.connected_peers():
            return True
        connected = False

        async def dial(addr: str, cancel: trio.CancelScope) -> None:
            nonlocal connected
            try:
                await self.network.connect(addr, timeout=DIAL_TIMEOUT)
            except NetworkError as exc:
                log.info("cannot reach worker at %s: %s", addr, exc)
                return
            connected = True
            cancel.cancel()

        with trio.move_on_after(DIAL_TIMEOUT + 1.0):
            async with trio.open_nursery() as nursery:
                for addr in record.addrs[:MAX_DIAL_ADDRS]:
                    nursery.start_soon(dial, addr, nursery.cancel_scope)
        return connected

    def shard_timeout(self, worker: str, flops: int, nbytes: int = 0) -> float:
        """Deadline of one attempt: ten times the expected compute time, at least 10 s, plus
        the time its bytes (operands up, result down) take on a slow home link."""
        record = self.view.get(worker, self.clock.now())
        tflops = self.speed_of(record) if record is not None else 0.01
        transfer = nbytes * self.byte_scale / SLOW_LINK_BYTES_PER_S
        return max(10.0, 10 * flops / (tflops * 1e12)) + transfer

    async def run(
        self, spec: JobSpec, *, progress: Callable[[int, int], None] | None = None
    ) -> JobResult:
        """Run a job to completion; raise JobFailed if it cannot finish."""
        self.jobs_in_flight += 1
        try:
            result = await self._run(spec, progress)
        except JobFailed:
            self.stats.jobs_failed += 1
            raise
        finally:
            self.jobs_in_flight -= 1
        self.stats.jobs_ok += 1
        return result

    async def _run(self, spec: JobSpec, progress: Callable[[int, int], None] | None) -> JobResult:
        if spec.verify not in VERIFY_METHODS:
            raise ValueError(f"verify must be one of {VERIFY_METHODS}")
        kernel = get_kernel(spec.kernel)
        kernel.check_operands(spec.operands)
        if spec.only is None:
            self.last_job_at = trio.current_time()
            self.last_max_price = spec.max_price
        stakes = None
        if self.stakes is not None and self._newcomers_for(spec):
            # A ledger read may wait for a write: off the event loop. Stakes only order the
            # workers never measured here: with none among the candidates (a requester
            # working with workers it knows) the job starts without this thread hop.
            stakes = await self.runtime.run_blocking(self.stakes)
        plan = self.plan_workers(spec, stakes)
        if not plan.chosen:
            if spec.only is None:
                self._note_plan(spec, plan, None)
            within = "" if spec.max_price is None else f" at up to {spec.max_price:g}/TFLOP"
            # Some may serve it and be out (the reasons follow): not "no worker serves".
            lacking = (
                f"no acceptable worker in the capacity view for {spec.kernel!r}{within}"
                if plan.excluded
                else f"no worker in the capacity view serves {spec.kernel!r}{within}"
            )
            raise JobFailed(
                lacking
                + self._cheapest(spec)
                + _why_not(plan.excluded)
                + _other_rules_note(plan.other_rules)
            )
        speeds = [self.speed_of(r) for r in plan.chosen]
        rows = spec.operands[kernel.split_operand].shape[0]
        ranges = kernel.shard_rows(
            spec.operands, _shard_count(spec, speeds, rows, kernel.flops(spec.operands))
        )
        first_slices = self._begin_first_slices(spec, kernel, ranges[0])
        # Only the operands every shard takes whole are hashed now: a split operand is hashed
        # slice by slice as its shards are first sent (describe_shard), so hashing it whole
        # here as well would hash it twice, and before any shard could leave.
        metas = await self.describe(
            {n: a for n, a in spec.operands.items() if n not in kernel.split_operands}
        )
        job = _JobRun(self, spec, kernel, plan, metas, ranges)
        if first_slices is not None:
            job.begun_slices[0] = first_slices
        if spec.only is None:  # challenges measure one worker: not a choice among workers
            self._note_plan(spec, plan, job.job_id)
        job.progress = progress
        started = trio.current_time()
        try:
            with trio.move_on_after(spec.deadline) as deadline:
                async with trio.open_nursery() as nursery:
                    job.nursery = nursery
                    for record in job.workers:
                        nursery.start_soon(job.worker_loop, record)
                    nursery.start_soon(job.prepare_checks)
                    if len(job.ranges) > 1:  # nothing to hash ahead of a lone shard
                        nursery.start_soon(job.describe_ahead)
                    await self._until_done(job)
                    nursery.cancel_scope.cancel()
        finally:
            shared_operands, shared_bytes = self.local_shares.handed(job.job_id)
            shared_outputs, shared_output_bytes = self.local_shares.taken(job.job_id)
            self.local_shares.release(job.job_id)  # its operands' sealed copies, if any
        if deadline.cancelled_caught:
            # Workers still holding unfinished shards when time ran out count as failed:
            # a staller must not be chosen again and again.
            for worker in job.cut_off:
                self.book.failed(worker, "timeout", self.clock.now(), "held a shard past the job")
            raise JobFailed(f"job did not finish within {spec.deadline:.0f} s" + _why_not(job.left))
        # Every shard accepted wins over a late verdict on a twin's answer (a review: a hedged
        # twin judged on a thread ended a job whose shards were all accepted and paid).
        if job.unverifiable is not None and not job.done.is_set():
            raise JobUnverifiable(job.unverifiable)
        if not job.done.is_set():
            if job.credit_refusal is not None:
                raise JobFailed(f"workers refused the job: {job.credit_refusal}")
            raise JobFailed(
                f"no acceptable worker left with {len(job.ranges) - len(job.accepted)} of "
                f"{len(job.ranges)} shards to go" + _why_not(job.left)
            )
        output = job.place_outputs()
        return JobResult(
            job_id=job.job_id,
            kernel=spec.kernel,
            output=output,
            shards=[job.accepted[i] for i in range(len(job.ranges))],
            seconds=trio.current_time() - started,
            flops=int(kernel.flops(spec.operands)),
            verification=job.method,
            checks_passed=job.checks_passed,
            rejected=job.rejected,
            reissued=job.reissued,
            hedged=job.hedged,
            fault_proofs=job.fault_proofs,
            extra_receipts=list(job.extra_receipts),
            workers_out=dict(job.left),
            rejected_by=dict(job.rejected_by),
            other_rules=plan.other_rules,
            shared_operands=shared_operands,
            shared_bytes=shared_bytes,
            shared_outputs=shared_outputs,
            shared_output_bytes=shared_output_bytes,
        )

    def _begin_first_slices(
        self, spec: JobSpec, kernel: Kernel, first: tuple[int, int]
    ) -> Begun[dict[str, ArrayMeta]] | None:
        """The first shard's slices of the split operands, hashed on a helper thread while
        the event loop hashes the whole operands and starts the job, when this job is all
        this requester runs (a core is then idle: a one-shard 512² job's A and B were hashed
        one after the other, 0.3 ms each, with 0.3 ms of the job's start between them) and
        the slices are small enough to hash on the event loop anyway. None otherwise: the
        first attempt hashes them (describe_shard)."""
        if self.jobs_in_flight != 1 or not kernel.split_operands:
            return None
        slices = {
            name: array
            for name, array in kernel.shard_operands(spec.operands, *first).items()
            if name in kernel.split_operands
        }
        if sum(a.nbytes for a in slices.values()) >= HASH_OFF_LOOP_BYTES:
            return None
        return self.runtime.beside(_describe_arrays, slices)

    def note_uploaded(self, worker: str, metas: Iterable[ArrayMeta]) -> None:
        """Remember that ``worker`` holds these operands (they were just uploaded or found
        there), for :meth:`_JobRun._unheld`."""
        for meta in metas:
            _remember(self.sent_operands, (worker, meta.digest))

    async def describe(self, arrays: dict[str, np.ndarray]) -> dict[str, ArrayMeta]:
        """Hash ``arrays`` (their wire descriptions): off the event loop when they are large."""

        if sum(a.nbytes for a in arrays.values()) >= HASH_OFF_LOOP_BYTES:
            return await self.runtime.run_blocking(_describe_arrays, arrays)
        if self.jobs_in_flight > 1:
            # Beside other jobs the event loop is what limits them (it does 13-16 ms of work
            # per one-shard 512² job on the 2-core EPYC 7003), and a hash is one call that
            # gives up the GIL: on a thread it runs beside the loop's work for other jobs.
            # At most one hash per core at once. Both-shipped, alternating pairs: faster in 13
            # of 18, medians 53.9 -> 55.5 jobs/s unbounded, 50.4 -> 55.3 bounded so
            # (BENCHMARKS.md).
            return await self.runtime.run_blocking(
                _describe_arrays, arrays, limiter=self._hash_limiter
            )
        return await self.runtime.run_blocking(_describe_arrays, arrays, cheap=True)

    async def _until_done(self, job: _JobRun) -> None:
        """Return once the job is done, or early when no worker is left to run what remains.
        Looked at whenever the job wakes its slots (an attempt ends, a worker leaves or its
        loop ends, the last shard is accepted), and at least every UNTIL_DONE_BACKSTOP_S. It
        was looked at every 0.2 s: with 200 one-shard jobs under way, each such timeout that
        expired cost the requester's busy loop a cancellation and a task step. In the job's
        own task rather than one of its own: a task more to start and to cancel was about
        0.07 ms of a one-shard job's round trip."""
        while True:
            if job.done.is_set():
                return
            if not job.active() and not job.running:
                job.refill()
                if not job.active():
                    return
            wakeup = job.wakeup
            with trio.move_on_after(UNTIL_DONE_BACKSTOP_S):
                await wakeup.wait()

    async def settle(self, worker: str, receipt: Receipt) -> Receipt:
        """Countersign an accepted shard's receipt and settle it: store it, enter it into the
        ledger (which gossips it), deliver it to its worker. Returns the complete receipt.

        While :meth:`courier` runs (a node runs it), only the countersignature (an Ed25519
        signature) happens here and the rest follows in the courier's tasks, after the job
        has its result: a shard's answer does not wait for SQLite commits or gossip (issue 9).
        :meth:`settled` waits for it. Without a courier, everything happens here.
        """
        complete = countersign(self.identity, receipt)
        if self._settling:
            try:
                self._settle_send.send_nowait((worker, complete))
            except trio.WouldBlock:
                pass  # a backlog of 10,000: settle this one here
            else:
                self._unsettled += 1
                if self._unsettled >= SETTLE_EARLY_AT:
                    self._flush_wanted.set()
                return complete
        await self._settle_now(worker, complete)
        return complete

    async def _settle_now(self, worker: str, complete: Receipt, *, deliver: bool = True) -> None:
        # Group-committed with the other receipts settling meanwhile.
        await self.receipts.add_async(complete, self.runtime.run_blocking)
        if self.on_settled is not None:
            await self.on_settled(complete)
        if deliver:
            self._to_outbox(worker, [complete])

    def _to_outbox(self, worker: str, receipts: list[Receipt]) -> None:
        try:
            self._outbox_send.send_nowait((worker, receipts))
        except trio.WouldBlock:
            log.warning("countersign outbox full: %d receipts kept locally only", len(receipts))

    async def settled(self) -> None:
        """Return once every receipt countersigned so far is stored and in the ledger (its
        delivery to the worker may still be under way). Receipts held back for company
        (:data:`SETTLE_DELAY`) are settled at once."""
        while self._unsettled > 0 and self._settling:
            self._flush_wanted.set()
            await self._settled_changed.wait()
        if self._flush_wanted.is_set() and not self._held:
            self._flush_wanted = trio.Event()  # nothing gathers now: the next batch waits

    async def store_backlog(self) -> int:
        """At exit: store the receipts still queued for the courier (one group commit), so
        that none countersigned is lost; their ledger entries, gossip and delivery need the
        running node and are left (logged). Returns how many were stored here."""
        backlog: list[Receipt] = [receipt for _, receipt in self._held]
        self._held = []
        while True:
            try:
                backlog.append(self._settle_recv.receive_nowait()[1])
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        if backlog:
            await self.runtime.run_blocking(self.receipts.add_many, backlog)
            self._unsettled -= len(backlog)
            self._settled_changed.set()
            self._settled_changed = trio.Event()
            log.warning(
                "stopping: %d countersigned receipts stored without their ledger entries or "
                "delivery to their workers",
                len(backlog),
            )
        return len(backlog)

    async def courier(self, deliverers: int = 8) -> None:
        """Settle countersigned receipts (store, ledger, gossip) and deliver them to their
        workers (run by the node).

        Receipts are settled in batches: the first waits up to :data:`SETTLE_DELAY` for
        company (less if :meth:`settled` is called), then everything queued is settled at
        once, its receipts sharing the receipt store's and the ledger's group commits, and
        delivered together, so that the worker's commits are shared too. Settled one by one,
        each job's commits, ledger ingest and gossip ran on both peers during the next job:
        interleaved on one cluster, a one-shard 512³ job took 22.8 ms at p50 (mean 23.4)
        against 17.9 (18.9) with its settlement batched (issue 9). The cost: a receipt spends
        up to SETTLE_DELAY (or until SETTLE_EARLY_AT are queued) countersigned but not yet
        on disk; a stop stores it (:meth:`store_backlog`), a crash loses it here, as before
        for the milliseconds it took, and its worker keeps it as owed."""

        async def settle_one(worker: str, receipt: Receipt, settled: list[Receipt]) -> None:
            try:
                await self._settle_now(worker, receipt, deliver=False)
                settled.append(receipt)
            except Exception:
                log.exception("settling receipt %s failed", receipt.receipt_id)
            finally:
                self._unsettled -= 1
                self._settled_changed.set()
                self._settled_changed = trio.Event()

        async def settle_forever() -> None:
            async for first in self._settle_recv:
                # Held here (where store_backlog finds them) while the batch gathers.
                self._held = [first]
                with trio.move_on_after(SETTLE_DELAY):
                    await self._flush_wanted.wait()
                self._flush_wanted = trio.Event()
                while len(self._held) < MAX_SETTLE_BATCH:
                    try:
                        self._held.append(self._settle_recv.receive_nowait())
                    except trio.WouldBlock:
                        break
                batch, self._held = self._held, []
                by_worker: dict[str, list[Receipt]] = {}
                async with trio.open_nursery() as batch_nursery:
                    for worker, receipt in batch:
                        settled = by_worker.setdefault(worker, [])
                        batch_nursery.start_soon(settle_one, worker, receipt, settled)
                # Each worker's receipts of the batch go together: one request (up to
                # MAX_COUNTERSIGN_BATCH receipts), not one per receipt.
                for worker, settled in by_worker.items():
                    if settled:
                        self._to_outbox(worker, settled)

        async def deliver_forever() -> None:
            async for worker, receipts in self._outbox:
                for batch in client.countersign_batches(receipts):
                    if not await self._deliver(worker, batch):
                        break  # unreachable or stalling: the rest would wait as long each

        self._settling = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(settle_forever)
                for _ in range(deliverers):
                    nursery.start_soon(deliver_forever)
        finally:
            self._settling = False
            self._settled_changed.set()  # settled() returns: nothing settles any more

    async def _deliver(self, worker: str, receipts: list[Receipt]) -> bool:
        """Give ``worker`` its countersigned receipts: together where it takes batches, else
        one by one; False when the worker could not be reached (the rest of its receipts
        are not tried now: each would wait its deadline; they are kept here and in the
        ledger, which the worker also follows).

        A worker from before batches refuses one ("header field 'receipt' missing"): it
        gets its receipts one by one from then on. Any other refusal (busy, say) sends
        that batch one by one, and the next batch is tried again."""
        if len(receipts) > 1 and worker not in self._unbatched:
            try:
                return await self._countersign_request(worker, receipts, batch=True)
            except RemoteError as exc:
                if OLD_COUNTERSIGN_REFUSAL in str(exc):
                    log.info("worker %s takes receipts one at a time", worker[-8:])
                    _remember(self._unbatched, worker)
                else:
                    log.info("batch of receipts refused by %s: %s", worker[-8:], exc)
        for receipt in receipts:
            try:
                if not await self._countersign_request(worker, [receipt], batch=False):
                    return False
            except RemoteError as exc:
                log.info("countersigned receipt refused by %s: %s", worker[-8:], exc)
        return True

    async def _countersign_request(
        self, worker: str, receipts: list[Receipt], *, batch: bool
    ) -> bool:
        """One countersign request; whether the worker could be reached."""
        stored = await client.deliver_countersigned(
            self.network, worker, receipts, timeout=5, batch=batch
        )
        if stored is None:
            log.info("%d countersigned receipts not delivered to %s", len(receipts), worker[-8:])
        return stored is not None


def _owns_its_buffer(answer: np.ndarray, like: np.ndarray) -> bool:
    """Whether ``answer`` may stand for ``like`` as a job's output: the same shape and dtype,
    C-contiguous and writable (as an output the caller gets must be), starting at a multiple
    of BODY_ALIGNMENT as an honest worker's padded header leaves it (a worker may pad its
    header otherwise: its answer is then copied, so the caller never gets a misaligned array,
    slower in every later use; a review), and a view of a ``bytearray``: the lane hands each
    reply body over in one of its own, which nothing else holds (``Network.request``'s
    contract; ``bytes`` replies, of the streams and memnet, are read-only, so copied)."""
    if (
        answer.shape != like.shape
        or answer.dtype != like.dtype
        or not answer.flags.c_contiguous
        or not answer.flags.writeable
        or answer.ctypes.data % BODY_ALIGNMENT
    ):
        return False
    root: object = answer
    while isinstance(root, np.ndarray) and root.base is not None:
        root = root.base
    if isinstance(root, memoryview):
        root = root.obj
    return isinstance(root, bytearray)


def _describe_arrays(arrays: dict[str, np.ndarray]) -> dict[str, ArrayMeta]:
    """Each array's wire description (a blocking call: it hashes them)."""
    return {name: meta_of(array) for name, array in arrays.items()}


def _other_rules_detail(record: CapacityRecord) -> str:
    """Why a worker of other ledger rules is left out, for plan notes and a job's summary."""
    return (
        f"follows ledger rules {record.ledger_rules}, this node {LEDGER_RULES} (another MTOR "
        "version): its receipts would enter another ledger"
    )


def _other_rules_note(other: OtherRules) -> str:
    """The workers of other ledger rules a job could not use, for its failure (what a node
    sees first after upgrading ahead of its network)."""
    if not other.workers:
        return ""
    rules = ", ".join(str(n) for n in other.rules)
    return (
        f"; {other.workers} worker(s) follow other ledger rules ({rules}; this node "
        f"{LEDGER_RULES}): another MTOR version, whose receipts would enter another ledger"
    )


def _network_names(theirs: str | None, ours: str | None) -> str:
    """How a refusal of this requester's network quotes the worker's network name (a plain
    name, read by refusing_network_name), as its word: in quotes, so that a name cannot pass
    for our own text; said to be no identity when it is our name too (every devnet is named
    "mtor-devnet", and any worker may claim our name: a review)."""
    if not theirs:
        return ""
    if theirs == ours:
        return (
            f' (its network also called "{theirs}", by its word: a network is its genesis, '
            "not its name)"
        )
    return f' (its network called "{theirs}", by its word)'


def _our_network_name(name: str | None) -> str:
    """This node's network name for the same message, when it is a plain name (our genesis
    may name its network anything)."""
    return f' ("{name}")' if name and PLAIN_NETWORK_NAME.fullmatch(name) else ""


def _why_not(reasons: dict[str, str]) -> str:
    """``reasons`` (worker -> why it is out) summed up for an error message; one refusal of
    this requester's network is quoted whole (it names both networks and how to join)."""
    if not reasons:
        return ""
    counts: dict[str, int] = {}
    for reason in reasons.values():
        key = reason.split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    parts = [f"{n} {why}" for why, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    network = next((r for r in reasons.values() if r.startswith(OTHER_NETWORK_OUT + ":")), None)
    quoted = f" ({network.partition(': ')[2]})" if network else ""
    return "; workers out: " + ", ".join(parts) + quoted


def _choose_method(requested: str, kernel: Kernel, workers: int) -> str:
    if requested == "auto":
        return kernel.check
    if requested == "freivalds" and kernel.name != "matmul":
        raise ValueError("Freivalds' check applies to matmul only")
    if requested == "redundant" and workers < 2:
        raise JobFailed(f"redundant verification needs at least two workers; {workers} in view")
    return requested


#: How far the fastest worker's speed must exceed a whole multiple of the slowest's before it
#: is planned one more shard: measured speeds of equal workers differ by a few percent, and a
#: ceiling of 2.005 gave one of two equal workers a second shard (the job ran 2/3 of its rows
#: on that worker; a new user's walkthrough). Of two workers, a third shard only pays once
#: one is 1/3 faster than the other.
SPEED_RATIO_SLACK = 0.3

#: A job large enough that each of its shards keeps this many rows of the split operand and
#: this many FLOPs gets at least two shards per worker (see :func:`_shard_count`).
PIPELINE_MIN_SHARD_ROWS = 1024
PIPELINE_MIN_SHARD_FLOPS = 16e9


def _shard_count(spec: JobSpec, speeds: list[float], rows: int, flops: float) -> int:
    """Shards sized from the workers' planning speeds (measured, or capped claims): the
    slowest gets at least one, the fastest proportionally more (once clearly more:
    :data:`SPEED_RATIO_SLACK`), and never more than four per worker or one per row.

    A large job gets at least two per worker, so that each worker has its next shard's
    operands while it computes one and the requester checks one shard while the next runs;
    with one shard each, the upload before and the download and check after are not hidden.
    For workers on the requester's machine (operands through shared memory) that gain did
    not hold up: 2 pairs first favoured 4 shards over 2 for 8192² over 2 workers, 11 jobs
    of each later, in both orders, found no difference (5.83 s with 2 against 6.03 with 4;
    BENCHMARKS.md, forty-ninth sitting). Where operands cross a network, an upload is not
    hidden without it (argued, not measured here). Only
    where every shard keeps :data:`PIPELINE_MIN_SHARD_ROWS` rows (a GEMM packs all of B for
    every shard, which costs a 512-row slab of an 8192² product 9% more CPU than a 1024-row
    one) and :data:`PIPELINE_MIN_SHARD_FLOPS` (a shard's fixed costs, a few ms, stay small).
    This floor hides transfers; it does not balance unequal workers: with two shards in
    flight each, every worker takes its share at the start. Balance comes from the
    speed-based count and from hedging stragglers."""
    if spec.shards is not None:
        return max(1, min(spec.shards, rows))
    speeds = [max(s, 1e-6) for s in speeds]
    wanted = math.ceil(sum(speeds) / min(speeds) - SPEED_RATIO_SLACK)
    count = max(len(speeds), min(wanted, 4 * len(speeds)))
    pipelined = min(
        2 * len(speeds), rows // PIPELINE_MIN_SHARD_ROWS, int(flops // PIPELINE_MIN_SHARD_FLOPS)
    )
    return max(1, min(rows, max(count, pipelined)))
