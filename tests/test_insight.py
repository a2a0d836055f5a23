"""mtor_p2p/insight.py on real nodes: a memnet cluster on virtual time runs jobs, then each
node's view of the network, its reasons for getting no work and its earnings are checked
against what the jobs did.

The cluster (tests/test_virtual_time.py's helpers): a requester that only submits, three
honest workers, one that returns wrong results, one asking ten times the others' price, and
one that NAT traversal would call private with no relay (memnet has no NATs: a stub says so).
"""

from __future__ import annotations

import statistics
from typing import Any, ClassVar

import pytest
import trio
import trio.testing

from mtor_p2p.capacity.record import CPU_CLASS, Device, gpu_class
from mtor_p2p.compute.scheduler import TRIAL_PRICE_MULTIPLE, ShardAttempt
from mtor_p2p.insight import RTT_SOURCE, earnings, peers_view, plan_history, why_no_work
from mtor_p2p.ledger.genesis import NANO
from mtor_p2p.metrics import EventWindow
from mtor_p2p.network import SMALL_EXCHANGE_BYTES, RoundTrips
from mtor_p2p.node import Node
from tests.products import assert_product_close
from tests.test_virtual_time import (  # noqa: F401 (trio_seed: a fixture, autouse there)
    ACCESS,
    CARD,
    NO_MESH,
    TABLE,
    TFLOPS,
    cluster,
    shard_operands,
    trio_seed,
)

HONEST = ["w1", "w2", "w3"]
GREEDY_PRICE = 10.0


class PrivateNoRelay:
    """What NAT traversal reports for a node behind a NAT that holds no relay reservation
    (the fields :meth:`~mtor_p2p.libp2p_nat.NatTraversal.status` gives that the node reads)."""

    def status(self) -> dict[str, Any]:
        """Private, no relay."""
        return {
            "summary": "private, no relay yet",
            "reachability": "private",
            "nat": "port-preserving",
            "relays": [],
            "relay_service": False,
        }


def by_peer(view: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """peers_view's entries by peer ID."""
    return {entry["peer_id"]: entry for entry in view}


async def test_insight_of_a_cluster_after_jobs(autojump_clock: trio.testing.MockClock) -> None:
    """Two jobs (the first with a price limit of 5, the second with none), then: the
    overpriced worker's why_no_work names its price with the class's figures, the requester's
    plan notes pass it over for price in both jobs, peers_view shows measured against
    advertised speed and the share of verified results (0 for the cheater, 1 for the honest),
    and every node's earnings lines sum to its totals, each entry in its ledger, the balance
    explained to the nano-credit."""
    names = ["requester", *HONEST, "cheater", "greedy", "hidden"]
    async with cluster(names, timing=NO_MESH) as c:
        # w1 first: everyone's bootstrap peer. Without the mesh loop, the requester connects
        # only to the bootstrap peer and to the workers its jobs dial.
        nodes: dict[str, Node] = {"w1": await c.start("w1", "WEU")}
        nodes["requester"] = await c.start("requester", "WEU", serve=False)
        for name, region in (("w2", "GWC"), ("w3", "WEU"), ("cheater", "WEU")):
            nodes[name] = await c.start(name, region)
        nodes["greedy"] = await c.start("greedy", "WEU", price=GREEDY_PRICE)
        nodes["hidden"] = await c.start("hidden", "WEU")
        nodes["cheater"].worker.fault_rate = 1.0  # every result wrong
        nodes["hidden"].network.nat = PrivateNoRelay()  # type: ignore[attr-defined]
        await c.settle()
        requester = nodes["requester"]
        ids = {name: node.peer_id for name, node in nodes.items()}
        attempts: list[ShardAttempt] = []
        requester.scheduler.observer = attempts.append
        operands = shard_operands()
        for max_price in (5.0, None):
            result = await requester.submit("matmul", operands, shards=8, max_price=max_price)
            assert_product_close(result.output, operands["a"] @ operands["b"])
        await requester.scheduler.settled()
        await trio.sleep(10)  # countersigned receipts reach their workers and ledgers

        views = {name: by_peer(peers_view(node)) for name, node in nodes.items()}
        why = {name: why_no_work(node) for name, node in nodes.items()}
        # w3's card, nearly full and busy (what its next probe could find): memory and load.
        nodes["w3"].devices = (
            Device(
                kind="gpu", name=CARD.model, mem_total=24 << 30, mem_free=64 << 20, utilization=95.0
            ),
        )
        strained = why_no_work(nodes["w3"])
        money = {name: earnings(node) for name, node in nodes.items()}
        held = {
            name: node.ledger.held([line["entry"] for line in money[name]["lines"]])
            for name, node in nodes.items()
        }

    # -- the scheduler's plan notes: the overpriced worker passed over for price, twice ----
    notes = list(requester.scheduler.plans)
    assert len(notes) == 2
    first, second = notes
    assert first.passed_over[ids["greedy"]][0] == "price"
    assert "price limit of 5" in first.passed_over[ids["greedy"]][1]
    category, detail = second.passed_over[ids["greedy"]]
    assert category == "price" and "no trial" in detail
    assert f"asks {GREEDY_PRICE:g}" in detail
    # The cheater was demoted by its fault proof after the first job, and the second passed
    # it over for that; every honest worker took part in both.
    assert second.passed_over[ids["cheater"]][0] == "demoted"
    for name in [*HONEST, "hidden"]:
        assert ids[name] in first.chosen and ids[name] in second.chosen
    assert ids["cheater"] in first.chosen and ids["cheater"] not in second.chosen

    # -- peers_view from the requester ---------------------------------------------------
    seen = views["requester"]
    assert set(seen) == {ids[n] for n in names if n != "requester"}
    book = requester.peers
    for name in HONEST:
        entry, standing = seen[ids[name]], book.get(ids[name])
        assert entry["gpu_class"] == CARD.model
        assert entry["tflops_advertised"] == TFLOPS
        # Delivered speed includes the network: below the card's, yet of its order.
        assert 0.2 * TFLOPS < entry["tflops_measured"] < TFLOPS
        assert entry["tflops_measured"] == pytest.approx(
            statistics.median(standing.delivered), rel=1e-5
        )
        assert entry["accepted"] == standing.accepted >= 1
        assert (entry["rejected"], entry["verified_share"]) == (0, 1.0)
        assert entry["connection"] == "direct"  # its jobs dialled every worker they used
        assert entry["demoted"] is False and entry["demoted_why"] is None
        assert entry["jobs_here"]["chosen"] == 2 and entry["jobs_here"]["passed_over"] == 0
    cheater = seen[ids["cheater"]]
    assert cheater["rejected"] >= 1 and cheater["verified_share"] == pytest.approx(
        cheater["accepted"] / (cheater["accepted"] + cheater["rejected"])
    )
    assert cheater["verified_share"] < 1.0
    assert cheater["demoted"] is True and "wrong result" in cheater["demoted_why"]
    assert cheater["demoted_for_s"] > 0
    greedy = seen[ids["greedy"]]
    assert greedy["price"] == GREEDY_PRICE and greedy["tflops_advertised"] == TFLOPS
    assert greedy["tflops_measured"] is None and greedy["verified_share"] is None
    assert greedy["connection"] == "none"  # never dialled: no job took it
    assert greedy["rtt_ms"] is None
    assert greedy["jobs_here"]["jobs"] == 2 and greedy["jobs_here"]["passed_over"] == 2
    assert greedy["jobs_here"]["reasons"] == {"price": 2}
    assert greedy["jobs_here"]["last"]["reason"] == "price"
    # The round trip to a worker of the requester's own region: the model's round trip
    # (two access delays at each end) and at most a few milliseconds of handling.
    w1 = seen[ids["w1"]]
    model_ms = 2 * (TABLE.one_way("WEU", "WEU") + 2 * ACCESS) * 1000
    assert w1["rtt_source"] == RTT_SOURCE
    assert model_ms <= w1["rtt_ms"] <= model_ms + 5
    far = seen[ids["w2"]]  # GWC: farther away, a longer round trip
    assert far["rtt_ms"] > w1["rtt_ms"]

    # -- why_no_work: the overpriced worker is told its price, with the figures --------------
    greedy_why = why["greedy"]
    price = greedy_why["price"]
    assert greedy_why["gpu_class"] == CARD.model
    # Its class's other sellers: the five others that serve (the requester sells nothing).
    assert (price["own"], price["peers"], price["min"], price["median"], price["max"]) == (
        GREEDY_PRICE,
        5,
        1.0,
        1.0,
        1.0,
    )
    assert (price["rank"], price["of"], price["multiple_of_median"]) == (6, 6, 10.0)
    assert price["trial_ceiling"] == TRIAL_PRICE_MULTIPLE * 1.0
    reasons = {r["reason"]: r["detail"] for r in greedy_why["reasons"]}
    assert (
        "price 10.0 is 10x the median (1.0) of 5 peers with the same GPU (test card)"
        in (reasons["price"])
    )
    assert greedy_why["summary"] == (
        "no work: price 10.0 is 10x the median (1.0) of 5 peers with the same GPU (test card)"
    )
    assert greedy_why["demand"]["requests_received"] == 0
    assert greedy_why["seen_here"]["jobs"] == 0  # greedy submitted nothing itself
    # An honest worker: work came, no price reason; its demand is the attempts it got.
    w1_why = why["w1"]
    assert "price" not in {r["reason"] for r in w1_why["reasons"]}
    to_w1 = sum(1 for a in attempts if a.worker == ids["w1"])
    assert w1_why["demand"]["requests_received"] == to_w1 >= 1
    assert w1_why["summary"].startswith(f"{to_w1} shard requests")
    # A nearly full, busy card is told both, with its figures; the others are not.
    details = {r["reason"]: r["detail"] for r in strained["reasons"]}
    assert set(details) == {"memory", "load"}
    assert details["memory"].startswith("64 MiB free for shards, under the 192 MiB")
    assert details["load"].startswith("this node is 95% busy")
    assert strained["summary"].endswith("; more would come but for its memory, load")
    assert not {"memory", "load"} & {r["reason"] for r in why["w3"]["reasons"]}
    # The private node without a relay is told so.
    assert "reachability" in {r["reason"] for r in why["hidden"]["reasons"]}
    assert "reachability" not in {r["reason"] for r in w1_why["reasons"]}
    # The requester serves nothing, and counts every shard it sent to the class.
    assert why["requester"]["reasons"][0]["reason"] == "not serving"
    assert why["requester"]["demand"]["sent_to_class"] == len(attempts) >= 16
    assert why["requester"]["seen_here"]["passed_over"] == 3  # greedy twice, cheater once

    # -- earnings: lines sum to the totals, every entry is in the ledger ----------------------
    for name, report in money.items():
        lines = report["lines"]
        assert report["shown"] == report["receipts_held"] == len(lines)
        assert not report["truncated"]
        assert all(line["countersigned"] and line["effective"] for line in lines)
        assert {line["entry"] for line in lines} == held[name]
        earned = sum(line["cost_nano"] for line in lines if line["role"] == "worker")
        paid = sum(line["cost_nano"] for line in lines if line["role"] == "requester")
        totals = report["totals"]
        assert (totals["earned_nano"], totals["paid_nano"]) == (earned, paid)
        assert (totals["earned_pending_nano"], totals["paid_pending_nano"]) == (0, 0)
        ledger = report["ledger"]
        assert (ledger["earned_nano"], ledger["paid_nano"]) == (earned, paid)
        assert ledger["receipts_not_held_here"] == 0
        reconciliation = report["reconciliation"]
        assert reconciliation["terms"][0] == {"item": "genesis grant", "nano": 1000 * NANO}
        assert reconciliation["balance_nano"] == 1000 * NANO + earned - paid
        assert reconciliation["unexplained_nano"] == 0
    assert sum(1 for line in money["requester"]["lines"]) == 16  # two jobs of 8 shards
    assert all(line["role"] == "requester" for line in money["requester"]["lines"])
    assert money["requester"]["totals"]["paid_nano"] > 0
    for name in HONEST:
        assert money[name]["totals"]["earned_nano"] > 0
    # The greedy and the cheater earned nothing: no line, the genesis grant alone.
    for name in ("greedy", "cheater"):
        assert money[name]["lines"] == []
        assert money[name]["account"]["balance"] == 1000 * NANO
    # What the requester paid is what the workers earned.
    assert money["requester"]["totals"]["paid_nano"] == sum(
        money[n]["totals"]["earned_nano"] for n in names if n != "requester"
    )


def test_plan_history_counts_chosen_and_passed_over() -> None:
    """plan_history sums a scheduler's notes per peer, the latest reason last."""
    from mtor_p2p.compute.scheduler import PlanNote

    class Notes:
        plans: ClassVar[list[PlanNote]] = [
            PlanNote("j1", 1.0, "matmul", ("a",), {"b": ("price", "first")}, 1),
            PlanNote("j2", 2.0, "matmul", ("a", "b"), {}, 0),
            PlanNote(
                "j3", 3.0, "matmul", ("a",), {"b": ("load", "third"), "c": ("kernel", "x")}, 2
            ),
        ]

    history = plan_history(Notes())  # type: ignore[arg-type]
    assert history["jobs"] == 3
    assert history["peers"]["a"] == {"chosen": 3, "passed_over": 0, "reasons": {}, "last": None}
    b = history["peers"]["b"]
    assert (b["chosen"], b["passed_over"]) == (1, 2)
    assert b["reasons"] == {"price": 1, "load": 1}
    assert b["last"] == {"reason": "load", "detail": "third"}


def test_gpu_class_is_the_best_gpu_or_cpu() -> None:
    """The GPU with the most memory names the class; no GPU: cpu."""
    small = Device(kind="gpu", name="RTX 3060", mem_total=12 << 30, mem_free=10 << 30)
    big = Device(kind="gpu", name="RTX 4090", mem_total=24 << 30, mem_free=20 << 30)
    cpu = Device(kind="cpu", name="x86_64", mem_total=64 << 30, mem_free=32 << 30, cores=16)
    assert gpu_class((small, big, cpu)) == "RTX 4090"
    assert gpu_class((cpu,)) == gpu_class(()) == CPU_CLASS


def test_event_window_counts_the_recent_buckets_only() -> None:
    """Counts per key over a window; buckets beyond the span are dropped."""
    window = EventWindow(bucket_seconds=10.0, span_seconds=60.0)
    for t in range(0, 120, 5):  # two events per bucket, 12 buckets
        window.add(float(t), "a")
    window.add(115.0, "b")
    assert window.count(119.0, 20.0, "a") == 6  # buckets 100, 110 (and the one at 99 is 90)
    assert window.count(119.0, 20.0) == 7
    assert window.count(119.0, 20.0, "c") == 0
    assert len(window.buckets) == 7  # 60 s span: buckets 50 ... 110 kept
    assert window.count(119.0, 1000.0, "a") == 14


def test_round_trips_keep_the_lowest_small_exchange() -> None:
    """Only small exchanges count; the lowest of the recent ones is the answer; the least
    recently measured peer is forgotten first."""
    trips = RoundTrips(keep=3, max_peers=2)
    trips.observe("p", 0.050, 100, 100)
    trips.observe("p", 0.020, 100, SMALL_EXCHANGE_BYTES + 1)  # a large answer: not counted
    trips.observe("p", 0.030, 100, 100)
    assert trips.lowest("p") == 0.030
    for seconds in (0.04, 0.04, 0.04):  # the 30 ms one falls out of the last three
        trips.observe("p", seconds, 10, 10)
    assert trips.lowest("p") == 0.04
    trips.observe("q", 0.01, 10, 10)
    trips.observe("r", 0.01, 10, 10)  # a third peer: p, the least recent, goes
    assert trips.lowest("p") is None and trips.lowest("q") == 0.01
    assert trips.lowest("nobody") is None
