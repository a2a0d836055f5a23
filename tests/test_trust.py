"""Capacity is a claim until measured: Sybils, liars, stallers and cheaters against the
scheduler, the peer book and the challenger (issue 8, items 1 and 2).

The attacks run whole nodes on memnet under ``MockClock`` (the cluster of
``tests/test_virtual_time.py``), so that timeouts and back-offs are exact and the runs replay.
The peer book's file is a real SQLite file.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
import pytest
import trio
import trio.testing

from mtor_p2p.capacity.service import CapacityTiming
from mtor_p2p.compute.challenge import Attestation, decode_attestation
from mtor_p2p.compute.reputation import (
    FAILURE_BACKOFF,
    SLOW_TRIALS_BEFORE_DEMOTION,
    STRAGGLER,
    UNMEASURED_TFLOPS_CAP,
    UNREACHABLE_BACKOFF,
    PeerBook,
)
from mtor_p2p.compute.scheduler import JobFailed, JobSpec, ShardAttempt
from mtor_p2p.node import Node, NodeTiming
from mtor_p2p.wire import RecordError
from tests.conftest import make_record
from tests.test_virtual_time import (  # noqa: F401  (trio_seed: deterministic scheduling)
    Cluster,
    cluster,
    ident,
    shard_operands,
    trio_seed,
)

#: No mesh loop and no challenges unless a test asks: the scheduler alone meets the attack.
QUIET = NodeTiming(
    mesh_interval=3600.0,
    challenge_interval=None,
    capacity=CapacityTiming(ttl=3000.0, announce_interval=600.0),
)
LIAR_TFLOPS = 10_000.0


def attempts_of(node: Node) -> list[ShardAttempt]:
    """Every shard attempt of ``node``'s scheduler, as it ends."""
    log: list[ShardAttempt] = []
    node.scheduler.observer = log.append
    return log


async def start_liars(c: Cluster, names: list[str], behaviour: str = "honest") -> list[Node]:
    """Start nodes that advertise LIAR_TFLOPS at price 0; ``behaviour``: ``honest`` (only
    the claim is a lie), ``stall`` (takes shards, never answers) or ``cheat`` (wrong results)."""
    nodes = []
    for name in names:
        device = "stall" if behaviour == "stall" else "honest"
        node = await c.start(name, "WEU", price=0.0, behaviour=device)
        if behaviour == "cheat":
            node.worker.fault_rate = 1.0
        node.tflops = LIAR_TFLOPS
        node.capacity.request_announce()
        nodes.append(node)
    return nodes


async def wait_for_claims(requester: Node, liars: list[Node]) -> None:
    """Until the requester's view holds every liar's inflated claim."""
    with trio.fail_after(120):
        while True:
            now = requester.clock.now()
            records = [requester.capacity.view.get(n.peer_id, now) for n in liars]
            if all(r is not None and r.tflops == LIAR_TFLOPS for r in records):
                return
            await trio.sleep(0.5)


def correct(result_output: np.ndarray, operands: dict[str, np.ndarray]) -> bool:
    return bool(np.allclose(result_output, operands["a"] @ operands["b"], rtol=1e-4, atol=1e-3))


# -- Sybil records with unreachable addresses ----------------------------------------------


async def test_sybil_claims_of_unreachable_peers_stop_no_job(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Eight Sybils claim 10,000 TFLOP/s at price 0 and cannot be reached (their records
    outlive them by an hour). Before: the scheduler chose the eight "best" workers once per
    job, all Sybils, and every job failed. Now every job completes with a correct result;
    Sybils cost the first job failed dials, then the peer book keeps them out."""
    honest = ["w1", "w2", "w3"]
    sybils = [f"sybil{i}" for i in range(8)]
    async with cluster(["requester", *honest, *sybils], timing=QUIET) as c:
        for name in honest:
            await c.start(name, "WEU", price=1.0)
        requester = await c.start("requester", "WEU", serve=False)
        liars = await start_liars(c, sybils)
        await c.settle()
        await wait_for_claims(requester, liars)
        for name in sybils:
            c.crash(name)  # gone: their records still claim an hour of life
        attempts = attempts_of(requester)
        dials_before = {n: 0 for n in sybils}
        for job in range(6):
            operands = shard_operands()
            result = await requester.submit("matmul", operands, shards=4)
            assert correct(result.output, operands), job
            assert set(result.workers) <= {c.peers[n].node.peer_id for n in honest}
            if job == 0:
                dials_before = {
                    n: requester.peers.get(c.peers[n].node.peer_id).unreachable for n in sybils
                }
    # Each Sybil chosen in the first job was dialled once there; later jobs (within its
    # back-off) never chose it again.
    sybil_ids = {c.peers[n].node.peer_id: n for n in sybils}
    for peer_id, name in sybil_ids.items():
        standing = requester.peers.get(peer_id)
        assert standing.unreachable == dials_before[name] <= 1
        assert standing.accepted == 0
    assert not [a for a in attempts if a.worker in sybil_ids]


async def test_sybils_are_demoted_for_every_later_job_and_come_back_on_probation(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A failed dial keeps a Sybil out for UNREACHABLE_BACKOFF, doubling on each new failure;
    a job planned after the back-off may try it once more (bounded), never more often."""
    async with cluster(["requester", "w1", "sybil"], timing=QUIET) as c:
        await c.start("w1", "WEU", price=1.0)
        requester = await c.start("requester", "WEU", serve=False)
        (liar,) = await start_liars(c, ["sybil"])
        await c.settle()
        await wait_for_claims(requester, [liar])
        c.crash("sybil")
        book = requester.peers
        result = await requester.submit("matmul", shard_operands(), shards=2)
        assert result.workers == [c.peers["w1"].node.peer_id]
        first = book.get(liar.peer_id)
        assert first.unreachable == 1
        assert first.demoted_until - requester.clock.now() <= UNREACHABLE_BACKOFF
        assert book.excluded(liar.peer_id, requester.clock.now()) == "unreachable"
        await requester.submit("matmul", shard_operands(), shards=2)
        assert book.get(liar.peer_id).unreachable == 1  # still demoted: not dialled again
        await trio.sleep(UNREACHABLE_BACKOFF)
        await requester.submit("matmul", shard_operands(), shards=2)
        second = book.get(liar.peer_id)
        assert second.unreachable == 2
        assert second.demoted_until - requester.clock.now() > 1.5 * UNREACHABLE_BACKOFF


# -- reachable liars: stallers and cheaters ------------------------------------------------


@pytest.mark.parametrize("trio_seed", [0, 3], indirect=True)
async def test_eight_live_liars_cannot_stop_or_corrupt_jobs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Eight reachable Sybils claim 10,000 TFLOP/s at price 0: four take shards and never
    answer, four return wrong results. Every job completes with a correct result; cheaters
    are excluded after their first wrong answer (a fault proof), stallers after their failed
    trial, and the liars' share of attempts falls to nothing."""
    honest = ["w1", "w2", "w3"]
    stallers = [f"staller{i}" for i in range(4)]
    cheaters = [f"cheater{i}" for i in range(4)]
    async with cluster(["requester", *honest, *stallers, *cheaters], timing=QUIET) as c:
        for name in honest:
            await c.start(name, "WEU", price=1.0)
        requester = await c.start("requester", "WEU", serve=False)
        liars = await start_liars(c, stallers, behaviour="stall")
        liars += await start_liars(c, cheaters, behaviour="cheat")
        await c.settle()
        await wait_for_claims(requester, liars)
        attempts = attempts_of(requester)
        liar_ids = {n.peer_id for n in liars}
        per_job: list[int] = []
        out_reasons: set[str] = set()
        started = trio.current_time()
        for job in range(8):
            operands = shard_operands()
            seen = len(attempts)
            result = await requester.submit("matmul", operands, shards=4)
            assert correct(result.output, operands), job
            assert not set(result.workers) & liar_ids
            summary = json.loads(json.dumps(result.summary()))  # what `submit --json` prints
            assert set(summary["workers_out"]) <= liar_ids
            assert set(summary["rejected_by"]) <= liar_ids
            out_reasons.update(summary["workers_out"].values())
            per_job.append(sum(1 for a in attempts[seen:] if a.worker in liar_ids))
    elapsed = trio.current_time() - started
    # A liar gets one trial shard per job. A cheater is out after its first (a fault proof);
    # a staller, cut off as a straggler each time a hedged twin answers, after
    # SLOW_TRIALS_BEFORE_DEMOTION of them, then for a back-off that doubles: over the run
    # each staller was tried at most that many times per back-off period.
    # The k-th back-off (FAILURE_BACKOFF * 2**(k-1)) ends at least FAILURE_BACKOFF * (2**k - 1)
    # after the first demotion: by `elapsed`, at most log2(1 + elapsed / FAILURE_BACKOFF) of
    # them have ended, each opening one more period of trials.
    periods = 1 + math.floor(math.log2(1 + elapsed / FAILURE_BACKOFF))
    trials = SLOW_TRIALS_BEFORE_DEMOTION * periods
    assert sum(per_job) <= len(stallers) * trials + len(cheaters), (per_job, elapsed)
    for node in liars:
        standing = requester.peers.get(node.peer_id)
        assert standing.accepted == 0
        assert standing.timeouts + standing.slow + standing.rejected <= trials
    # The last job tries no liar that earlier jobs had already found out: a cheater it gives a
    # shard to had never had one, a staller had fewer than SLOW_TRIALS_BEFORE_DEMOTION
    # earlier trials (whether a newcomer's slot wins a shard from the honest workers' slots
    # depends on scheduling order, so which job a liar's trial falls on varies).
    cheater_ids = {c.peers[n].node.peer_id for n in cheaters}
    last = {a.worker for a in attempts if a.job_id == result.job_id and a.worker in liar_ids}
    for liar in last:
        earlier = [a for a in attempts if a.worker == liar and a.job_id != result.job_id]
        allowed = 0 if liar in cheater_ids else SLOW_TRIALS_BEFORE_DEMOTION - 1
        assert len(earlier) <= allowed, (liar[-6:], [(a.job_id[:6], a.outcome) for a in earlier])
    # Each job's summary said which liars were out and why.
    assert "returned a wrong result" in out_reasons
    rejected = [a for a in attempts if a.outcome == "rejected"]
    assert {a.worker for a in rejected} <= cheater_ids
    for peer in {a.worker for a in rejected}:
        reason = requester.peers.excluded(peer, requester.clock.now())
        assert reason is not None and "wrong result" in reason


async def test_a_job_with_no_acceptable_worker_left_fails_and_says_why(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with cluster(["requester", "cheater", "gone"], timing=QUIET) as c:
        requester = await c.start("requester", "WEU", serve=False)
        await start_liars(c, ["cheater"], behaviour="cheat")
        gone = (await start_liars(c, ["gone"]))[0]
        await c.settle()
        c.crash("gone")
        with pytest.raises(JobFailed) as failure:
            await requester.submit("matmul", shard_operands(), shards=2)
        message = str(failure.value)
        assert "no acceptable worker left" in message
        assert "1 unreachable" in message and "1 returned a wrong result" in message
        # The next job is refused at once, with the peer book's reasons.
        with pytest.raises(JobFailed, match=r"workers out: .*unreachable"):
            await requester.submit("matmul", shard_operands(), shards=2)
        assert requester.peers.excluded(gone.peer_id, requester.clock.now()) == "unreachable"


async def test_a_job_ends_as_its_last_worker_leaves_not_at_a_later_look(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job's own task is woken by the change that leaves it without workers: it ends at
    that moment of virtual time, where it had looked every 0.2 s (a cancellation and a task
    step each, on a busy requester's loop)."""
    from mtor_p2p.compute import scheduler

    left_at: list[float] = []
    leave = scheduler._JobRun._leave

    def recorded(self: scheduler._JobRun, worker: str, reason: str) -> None:
        left_at.append(trio.current_time())
        leave(self, worker, reason)

    monkeypatch.setattr(scheduler._JobRun, "_leave", recorded)
    async with cluster(["requester", "cheater"], timing=QUIET) as c:
        requester = await c.start("requester", "WEU", serve=False)
        await start_liars(c, ["cheater"], behaviour="cheat")
        await c.settle()
        with pytest.raises(JobFailed, match="no acceptable worker left"):
            await requester.submit("matmul", shard_operands(), shards=2)
        assert left_at and trio.current_time() - left_at[-1] < 0.01, (left_at, trio.current_time())


# -- planning: measured first, a bounded trial for the rest --------------------------------


def test_unmeasured_workers_get_a_bounded_trial_share_and_no_rank_for_their_claims() -> None:
    from mtor_p2p.capacity.view import CapacityView
    from mtor_p2p.clock import NetClock
    from mtor_p2p.compute.scheduler import Scheduler
    from mtor_p2p.runtime import Runtime

    now = 1_800_000_000.0
    me = ident("planner")
    view = CapacityView()
    measured = [ident(f"measured{i}") for i in range(8)]
    claimers = [ident(f"claimer{i}") for i in range(8)]
    book = PeerBook()
    for i, worker in enumerate(measured):
        view.offer(make_record(worker, now=now, tflops=20.0, price=1.0, kernels=("matmul",)), now)
        book.accepted(worker.peer_id, flops=int(1e12), seconds=1.0 + i, now=now)
    for worker in claimers:
        view.offer(
            make_record(worker, now=now, tflops=LIAR_TFLOPS, price=0.0, kernels=("matmul",)), now
        )

    class FixedClock(NetClock):
        def now(self) -> float:
            return now

    scheduler = Scheduler(
        None,  # type: ignore[arg-type]  (planning touches no network)
        me,
        FixedClock(epoch_offset=0.0),
        view,
        None,  # type: ignore[arg-type]
        runtime=Runtime.simulated(1),
        book=book,
    )
    spec = JobSpec(kernel="matmul", operands={}, max_workers=8)
    plan = scheduler.plan_workers(spec)
    chosen = [r.peer_id for r in plan.chosen]
    claimer_ids = {w.peer_id for w in claimers}
    assert len(chosen) == 8
    assert sum(1 for p in chosen if p in claimer_ids) == 2  # a quarter of the places
    # Measured workers in order of measured value: the fastest (1 s per TFLOP) first.
    assert chosen[:6] == [w.peer_id for w in measured[:6]]
    assert {r.peer_id for r in plan.reserve} == {w.peer_id for w in measured[6:]} | (
        claimer_ids - set(chosen)
    )
    # A claim counts as at most UNMEASURED_TFLOPS_CAP until measured.
    record = view.get(claimers[0].peer_id, now)
    assert record is not None
    assert scheduler.speed_of(record) == UNMEASURED_TFLOPS_CAP
    # With nobody measured, every place may go to a newcomer.
    fresh = Scheduler(
        None,  # type: ignore[arg-type]
        me,
        FixedClock(epoch_offset=0.0),
        view,
        None,  # type: ignore[arg-type]
        runtime=Runtime.simulated(1),
    )
    assert len(fresh.plan_workers(spec).chosen) == 8


# -- the peer book survives restarts -------------------------------------------------------


def test_peer_book_keeps_measurements_and_demotions_across_restarts(tmp_path) -> None:
    path = tmp_path / "peers.sqlite"
    now = 1_800_000_000.0
    book = PeerBook(path)
    book.accepted("fast", flops=int(4e12), seconds=2.0, now=now)
    book.failed("cheat", "rejected", now)
    for _ in range(3):
        book.accepted("flaky", flops=int(1e12), seconds=1.0, now=now)
    for _ in range(3):
        book.failed("flaky", "timeout", now)
    book.close()

    again = PeerBook(path)
    assert again.get("fast").measured_tflops() == pytest.approx(2.0)
    assert "wrong result" in (again.excluded("cheat", now + 3600) or "")
    assert again.excluded("flaky", now + 1) == "3 failures in a row"
    assert again.excluded("flaky", now + FAILURE_BACKOFF + 1) is None
    assert again.get("flaky").reliability() < again.get("fast").reliability()
    assert again.forget("cheat") and again.excluded("cheat", now) is None
    again.close()
    assert PeerBook(path).excluded("cheat", now) is None


def test_peer_book_stays_bounded() -> None:
    book = PeerBook(max_peers=100)
    for i in range(1000):
        book.failed(f"sybil{i}", "unreachable", float(i))
    assert len(book.known()) <= 100


# -- challenges ----------------------------------------------------------------------------


async def test_challenges_measure_newcomers_and_catch_a_cheater_before_real_work(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """While its owner submits jobs, the challenger measures every unmeasured worker with a
    small verified product: an honest worker gets a measured rate (and a signed attestation),
    a cheater is excluded by a fault proof before any real shard of the owner's goes to it.
    To the worker a challenge is an ordinary shard: it runs it and signs a receipt."""
    timing = NodeTiming(
        mesh_interval=3600.0,
        challenge_interval=5.0,
        capacity=CapacityTiming(ttl=3000.0, announce_interval=600.0),
    )
    async with cluster(["requester", "w1", "newcomer", "cheater"], timing=timing) as c:
        w1 = await c.start("w1", "WEU", price=1.0)
        requester = await c.start("requester", "WEU", serve=False)
        # The test card computes 16 MFLOP/s: challenges of a one-second size.
        requester.challenger.shapes = ((128, 250, 250),)
        await c.settle()
        # One job makes the requester an active one (and measures w1 on the way).
        await requester.submit("matmul", shard_operands(), shards=1)
        newcomer = await c.start("newcomer", "WEU", price=1.0)
        (cheater,) = await start_liars(c, ["cheater"], behaviour="cheat")
        await c.settle()
        await wait_for_claims(requester, [cheater])
        with trio.fail_after(300):
            while not (
                requester.peers.get(newcomer.peer_id).measured
                and requester.peers.excluded(cheater.peer_id, requester.clock.now())
            ):
                await trio.sleep(1.0)
        assert newcomer.worker.stats.shards_run == 1
        assert requester.peers.get(cheater.peer_id).rejected == 1
        with trio.fail_after(10):  # its countersigned receipt follows, batched (courier)
            while not newcomer.receipts.receipts():
                await trio.sleep(0.05)
        stored = newcomer.receipts.receipts()
        assert len(stored) == 1 and len(stored[0].body.job_id) == 64
        attestations = [decode_attestation(a) for a in requester.challenger.attestations]
        subjects = {a.subject for a in attestations}
        assert newcomer.peer_id in subjects and cheater.peer_id not in subjects
        attestation = next(a for a in attestations if a.subject == newcomer.peer_id)
        assert attestation.measurer == requester.peer_id and attestation.tflops > 0
        # A real job now avoids the cheater without ever giving it a shard.
        attempts = attempts_of(requester)
        await requester.submit("matmul", shard_operands(), shards=3)
        assert cheater.peer_id not in {a.worker for a in attempts}
        assert w1.peer_id in {a.worker for a in attempts} or newcomer.peer_id in {
            a.worker for a in attempts
        }


def test_attestations_are_signed_by_their_measurer() -> None:
    measurer, other = ident("measurer"), ident("other")
    attestation = Attestation(
        subject=other.peer_id,
        measurer=measurer.peer_id,
        kernel="matmul",
        flops=10**9,
        seconds=0.5,
        at=1.0,
        receipt="ab:0",
    )
    assert decode_attestation(attestation.sign(measurer)) == attestation
    with pytest.raises(RecordError):
        attestation.sign(other)
    forged = Attestation(**{**attestation.__dict__, "measurer": other.peer_id})
    tampered = forged.sign(other).replace(b'"flops":1000000000', b'"flops":9000000000')
    with pytest.raises(RecordError):
        decode_attestation(tampered)


def test_stake_weights_the_draw_of_unmeasured_workers() -> None:
    """Among workers nobody measured yet, one with 1,000 credits at stake is drawn as if it
    were 1,001 of them: it gets one of the two trial places nearly every time, while any one
    of 20 stakeless Sybils rarely does."""
    from mtor_p2p.capacity.view import CapacityView
    from mtor_p2p.clock import NetClock
    from mtor_p2p.compute.scheduler import Scheduler
    from mtor_p2p.ledger.genesis import NANO
    from mtor_p2p.runtime import Runtime

    now = 1_800_000_000.0

    class FixedClock(NetClock):
        def now(self) -> float:
            return now

    view = CapacityView()
    book = PeerBook()
    for i in range(8):
        worker = ident(f"measured{i}")
        view.offer(make_record(worker, now=now, kernels=("matmul",)), now)
        book.accepted(worker.peer_id, flops=int(1e12), seconds=1.0, now=now)
    staked = ident("staked")
    sybils = [ident(f"stakeless{i}") for i in range(20)]
    for worker in [staked, *sybils]:
        view.offer(make_record(worker, now=now, price=0.0, kernels=("matmul",)), now)
    spec = JobSpec(kernel="matmul", operands={}, max_workers=8)
    chosen_staked = chosen_first_sybil = 0
    for seed in range(40):
        scheduler = Scheduler(
            None,  # type: ignore[arg-type]
            ident("planner"),
            FixedClock(epoch_offset=0.0),
            view,
            None,  # type: ignore[arg-type]
            runtime=Runtime.simulated(seed),
            book=book,
        )
        chosen = {
            r.peer_id for r in scheduler.plan_workers(spec, {staked.peer_id: 1000 * NANO}).chosen
        }
        chosen_staked += staked.peer_id in chosen
        chosen_first_sybil += sybils[0].peer_id in chosen
    assert chosen_staked >= 38
    assert chosen_first_sybil <= 8


# -- transient refusals and last resorts ---------------------------------------------------


async def test_busy_answers_are_waited_out_and_not_held_against_the_worker(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A worker flooded by someone else answers "busy". Before, that counted as a failed
    trial: the only worker was demoted and every job failed ("no worker ... serves") even
    after the flood. Now the shard waits for it, and its standing is untouched."""
    from mtor_p2p.compute.protocol import PROTOCOL_RUN
    from mtor_p2p.network import RemoteError

    async with cluster(["requester", "w1"], timing=QUIET) as c:
        w1 = await c.start("w1", "WEU")
        requester = await c.start("requester", "WEU", serve=False)
        await c.settle()
        refusals = [3]
        real = w1.worker._on_run

        async def busy_first(sender: str, request: bytes) -> bytes:
            if refusals[0]:
                refusals[0] -= 1
                raise RemoteError("busy: too many uploads in progress")
            return await real(sender, request)

        w1.network.handle(PROTOCOL_RUN, busy_first, max_request_bytes=64 * 1024, timeout=600)
        operands = shard_operands()
        result = await requester.submit("matmul", operands, shards=2)
        assert correct(result.output, operands) and result.workers == [w1.peer_id]
        assert refusals == [0]
        standing = requester.peers.get(w1.peer_id)
        assert standing.failed == 0 and standing.accepted == 2
        assert requester.peers.excluded(w1.peer_id, requester.clock.now()) is None


async def test_a_demoted_worker_is_a_last_resort_not_forbidden(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A demotion ranks a worker last: when nobody else can run the job, a demoted (but
    never cheating) worker is used rather than failing the job at once; a worker proven to
    return wrong results stays out."""
    async with cluster(["requester", "w1", "cheater"], timing=QUIET) as c:
        w1 = await c.start("w1", "WEU")
        requester = await c.start("requester", "WEU", serve=False)
        (cheater,) = await start_liars(c, ["cheater"], behaviour="cheat")
        await c.settle()
        now = requester.clock.now()
        requester.peers.failed(cheater.peer_id, "rejected", now)
        for _ in range(3):
            requester.peers.failed(w1.peer_id, "timeout", now, "a bad afternoon")
        assert requester.peers.excluded(w1.peer_id, now) is not None
        operands = shard_operands()
        result = await requester.submit("matmul", operands, shards=2)
        assert correct(result.output, operands) and result.workers == [w1.peer_id]
        assert requester.peers.excluded(w1.peer_id, requester.clock.now()) is None


async def test_workers_beyond_the_latency_target_are_the_last_reserve(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An interactive job prefers workers expected within its latency target. When every one
    of them fails it (here: both near workers cheat), a slower, farther worker still answers,
    late, instead of the job failing (the adversarial simulation lost 46 requests so)."""
    async with cluster(["requester", "near1", "near2", "far"], timing=QUIET) as c:
        requester = await c.start("requester", "WEU", serve=False)
        await start_liars(c, ["near1", "near2"], behaviour="cheat")
        far = await c.start("far", "JPE")
        await c.settle()
        operands = shard_operands()
        result = await requester.submit(
            "matmul", operands, shards=1, max_workers=2, latency_target=2.1
        )
        assert correct(result.output, operands) and result.workers == [far.peer_id]
        assert result.rejected >= 1


async def test_a_price_refusal_ends_the_attempt_cleanly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A worker refusing our quote (its price rose, or it lies) ends that attempt like any
    other: the observer sees it, no attempt is left behind as running, the job completes on
    another worker. (A variable shadowing the attempt's record crashed the job here.)"""
    from mtor_p2p.compute.protocol import PROTOCOL_RUN
    from mtor_p2p.compute.worker import PRICE_REFUSED
    from mtor_p2p.network import RemoteError

    async with cluster(["requester", "w1", "w2"], timing=QUIET) as c:
        w1 = await c.start("w1", "WEU", price=0.5)
        w2 = await c.start("w2", "WEU", price=1.0)
        requester = await c.start("requester", "WEU", serve=False)
        await c.settle()

        async def refuse(sender: str, request: bytes) -> bytes:
            raise RemoteError(f"{PRICE_REFUSED}: max_price 0.5 is below this worker's price 9")

        w1.network.handle(PROTOCOL_RUN, refuse, max_request_bytes=64 * 1024, timeout=600)
        attempts = attempts_of(requester)
        operands = shard_operands()
        result = await requester.submit("matmul", operands, shards=2)
        assert correct(result.output, operands) and result.workers == [w2.peer_id]
        refused = [a for a in attempts if a.worker == w1.peer_id]
        assert refused and all(a.outcome == "refused" for a in refused)
        # It refused the very price it advertises: that is held against it.
        assert requester.peers.get(w1.peer_id).failed == 1


# -- demotions while a job runs --------------------------------------------------------------


@pytest.mark.parametrize("verify", ["auto", "redundant"])
async def test_a_worker_failing_a_few_shards_is_not_dropped_from_a_job_that_needs_it(
    autojump_clock: trio.testing.MockClock, verify: str
) -> None:
    """Three transient failures spread over a worker's two slots demote it in the peer book
    ('failures in a row'); the job it serves keeps it (each slot retries) and finishes. Only a
    straggler demotion ends a worker's part in a running job, and never one the job's check
    needs (a hostile review: the one-worker job failed, the redundant one waited out its
    deadline)."""
    from mtor_p2p.compute.protocol import MAX_RUN_REQUEST_BYTES, PROTOCOL_RUN
    from mtor_p2p.network import RemoteError

    rng = np.random.default_rng(5)

    def ops(rows: int) -> dict[str, np.ndarray]:
        return {
            "a": rng.standard_normal((rows, 250)).astype("float32"),
            "b": rng.standard_normal((250, 250)).astype("float32"),
        }

    names = ["w1"] if verify == "auto" else ["w1", "w2"]
    async with cluster(["requester", *names], timing=QUIET) as c:
        workers = [await c.start(name, "WEU") for name in names]
        requester = await c.start("requester", "WEU", serve=False)
        await c.settle()
        await requester.submit("matmul", ops(512), shards=2, verify=verify)
        flaky_worker = workers[-1]
        real = flaky_worker.worker._on_run
        failures = [3]

        async def flaky(sender: str, request: bytes) -> bytes:
            if failures[0]:
                failures[0] -= 1
                await trio.sleep(0.5)
                raise RemoteError("internal error: device reset")
            return await real(sender, request)

        flaky_worker.network.handle(
            PROTOCOL_RUN, flaky, max_request_bytes=MAX_RUN_REQUEST_BYTES, timeout=600
        )
        operands = ops(256 * 6)
        started = trio.current_time()
        result = await requester.submit("matmul", operands, shards=6, verify=verify, deadline=300)
        assert correct(result.output, operands)
        assert failures == [0]  # the failures did happen
        assert trio.current_time() - started < 100


def _straggler_operands(rng: np.random.Generator, rows: int) -> dict[str, np.ndarray]:
    return {
        "a": rng.standard_normal((rows, 250)).astype("float32"),
        "b": rng.standard_normal((250, 250)).astype("float32"),
    }


@asynccontextmanager
async def _measured_flip_beside_a_good_worker() -> AsyncIterator[tuple[Cluster, Node, Node]]:
    """A memnet cluster of a requester and two workers, "flip" (the cheaper) measured by a
    first job: (cluster, flip, requester)."""
    async with cluster(["requester", "flip", "good"], timing=QUIET) as c:
        flip = await c.start("flip", "WEU", price=0.5)
        await c.start("good", "WEU", price=1.0)
        requester = await c.start("requester", "WEU", serve=False)
        await c.settle()
        operands = _straggler_operands(np.random.default_rng(0), 256 * 4)
        await requester.submit("matmul", operands, shards=4, max_workers=2)
        assert requester.peers.get(flip.peer_id).measured
        yield c, flip, requester


def _demote_as_straggler(requester: Node, worker: Node) -> None:
    for _ in range(3):  # what three cut-offs in other jobs record
        requester.peers.failed(worker.peer_id, "slow", requester.clock.now(), STRAGGLER)


async def test_a_straggler_demoted_while_a_slot_waits_gets_no_more_shards(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A slot waiting for the worker's token asks the trust rules again once it has one: a
    measured worker demoted as a straggler (here by "another job") while it holds two shards
    answers one "busy"; the token comes back, and the waiting slot must not send it another
    shard (found in review: it did, where a slot's own next turn takes the worker out)."""
    from mtor_p2p.compute.protocol import MAX_RUN_REQUEST_BYTES, PROTOCOL_RUN
    from mtor_p2p.network import RemoteError

    async with _measured_flip_beside_a_good_worker() as (c, flip, requester):
        attempts = attempts_of(requester)
        demoted = trio.Event()
        demoted_at: list[float] = []
        serve = flip.worker._on_run
        calls = 0

        async def run_or_busy(sender: str, request: bytes) -> bytes:
            nonlocal calls
            calls += 1
            if calls == 2:  # its second shard of the job: answered "busy" once demoted
                await demoted.wait()
                await trio.sleep(0.05)
                raise RemoteError("busy: queue full")
            return await serve(sender, request)

        flip.network.handle(
            PROTOCOL_RUN, run_or_busy, max_request_bytes=MAX_RUN_REQUEST_BYTES, timeout=600
        )

        async def another_job_cuts_it_off() -> None:
            await trio.sleep(0.5)
            _demote_as_straggler(requester, flip)
            demoted_at.append(trio.current_time())
            demoted.set()

        c.nursery.start_soon(another_job_cuts_it_off)
        operands = _straggler_operands(np.random.default_rng(1), 256 * 24)
        await requester.submit("matmul", operands, shards=24, max_workers=2, deadline=600)
    after = [a.outcome for a in attempts if a.worker == flip.peer_id and a.started > demoted_at[0]]
    assert after == [], after


async def test_a_stalling_straggler_stays_out_after_its_stalled_shards_time_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A worker demoted as a straggler takes no more shards of a running job, even once the
    shards it stalls on time out: their failures extend the demotion and must keep its
    reason (found in review: "2 failures in a row" replaced it, and the job sent two more)."""
    async with _measured_flip_beside_a_good_worker() as (c, flip, requester):
        c.peers["flip"].device.behaviour = "stall"  # from now on it takes shards and stalls
        attempts = attempts_of(requester)
        demoted_at: list[float] = []

        async def another_job_cuts_it_off() -> None:
            await trio.sleep(1.0)
            _demote_as_straggler(requester, flip)
            demoted_at.append(trio.current_time())

        c.nursery.start_soon(another_job_cuts_it_off)
        operands = _straggler_operands(np.random.default_rng(1), 256 * 24)
        await requester.submit("matmul", operands, shards=24, max_workers=2, deadline=600)
        reason = requester.peers.excluded(flip.peer_id, requester.clock.now())
    assert reason is not None and reason.startswith(STRAGGLER), reason
    after = [a.outcome for a in attempts if a.worker == flip.peer_id and a.started > demoted_at[0]]
    assert after == [], after
