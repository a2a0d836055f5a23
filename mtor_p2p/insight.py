"""The network as this node sees it, and why work does or does not come (issue 11, item 3).

Functions of a running :class:`~mtor_p2p.node.Node` that return JSON-ready dicts for
``status``, the control API and the dashboard. :func:`peers_view`, :func:`why_no_work` and
:func:`plan_history` read only what the node holds in memory (the capacity view, the peer
book, the scheduler's plan notes, the worker's and the scheduler's event windows, the network
adapter's link state): cheap enough for every status call, on the event loop.
:func:`earnings` reads SQLite (the receipt store and the ledger): run it through
``node.runtime.run_blocking``.

What the figures are, and are not:

* **Round trip** (``rtt_ms``): no adapter pings, so it is the lowest of the recent small
  request round trips this node timed to the peer on an open connection
  (:class:`~mtor_p2p.network.RoundTrips`): an upper bound on the network round trip (the
  remote handler's time is in it), close to it once one of those requests met a quick
  handler. None when the node sent the peer no small request (the peer book's shard round
  trips are not used: they hold the shard's compute time).
* **Measured TFLOP/s**: the median the peer delivered on shards this node verified, network
  and queueing included (:meth:`~mtor_p2p.compute.reputation.Standing.measured_tflops`); the
  advertised figure is the record's claim.
* **Demand**: run requests this node's worker received, and shard attempts its own scheduler
  sent to workers of the same GPU class, over :data:`DEMAND_WINDOW_S` (since start, if the
  node is younger).
* **Why no work**: a self-assessment under the scheduler's own rules
  (:func:`~mtor_p2p.compute.scheduler.trial_price_ceiling`,
  :func:`~mtor_p2p.compute.scheduler.trial_places`), from what this node can see. Another
  requester's peer book (has it measured us? demoted us?) is not visible from here; what this
  node's own jobs did with workers of its class is (``seen_here``).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from typing import TYPE_CHECKING, Any

from mtor_p2p.capacity.record import CapacityRecord, gpu_class
from mtor_p2p.capacity.view import GIB
from mtor_p2p.compute.scheduler import (
    TRIAL_PRICE_MULTIPLE,
    JobSpec,
    Scheduler,
    trial_places,
    trial_price_ceiling,
)
from mtor_p2p.console import format_duration
from mtor_p2p.ledger.entries import receipt_entry_id
from mtor_p2p.ledger.names import LEDGER_RULES

if TYPE_CHECKING:
    from mtor_p2p.node import Node

#: The window of the demand figures (seconds).
DEMAND_WINDOW_S = 600.0
#: Free memory a typical shard needs at once: a 4096-square float32 matmul's B, a slice of A
#: and the result, 64 MiB each at most. Less, and requesters that filter by free memory
#: (``peers --min-mem-gib``) pass the node over, and a large job's operands do not fit.
TYPICAL_SHARD_BYTES = 3 * 4096 * 4096 * 4
#: A reported load from which the value ranking (price x (1 + load)) holds a worker back.
HIGH_LOAD = 0.8
#: The places of a job submitted with the defaults (``JobSpec.max_workers``).
DEFAULT_PLACES: int = JobSpec.__dataclass_fields__["max_workers"].default
#: What a peer_view's ``rtt_source`` says when there is a round trip.
RTT_SOURCE = "lowest recent small request round trip (an upper bound)"


def _num(value: float | None) -> float | None:
    """A figure rounded for display (6 significant places); None for None and for what is
    not finite (a ratio over a peer's denormal price overflows: JSON has no infinity)."""
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.6g}")


def _size(nbytes: int) -> str:
    """Bytes as an operator reads them: "192 MiB", "20 GiB"."""
    return f"{nbytes / GIB:.3g} GiB" if nbytes >= GIB else f"{nbytes / (1 << 20):.0f} MiB"


def _text(value: float) -> str:
    """A price or speed as an operator reads it: 2.0, 0.75, 1e-05."""
    return str(_num(value))


# -- the scheduler's plan notes --------------------------------------------------------------


def plan_history(scheduler: Scheduler) -> dict[str, Any]:
    """What this node's last jobs (:data:`~mtor_p2p.compute.scheduler.PLAN_NOTES`, challenges
    aside) did with each worker: ``{"jobs": M, "peers": {peer: {"chosen": K,
    "passed_over": N, "reasons": {category: count}, "last": {"reason", "detail"}}}}``, where
    ``last`` is the reason of the latest job that passed the peer over."""
    peers: dict[str, dict[str, Any]] = {}

    def entry(peer: str) -> dict[str, Any]:
        return peers.setdefault(
            peer, {"chosen": 0, "passed_over": 0, "reasons": Counter(), "last": None}
        )

    for note in scheduler.plans:
        for peer in note.chosen:
            entry(peer)["chosen"] += 1
        for peer, (category, detail) in note.passed_over.items():
            seen = entry(peer)
            seen["passed_over"] += 1
            seen["reasons"][category] += 1
            seen["last"] = {"reason": category, "detail": detail}
    for seen in peers.values():
        seen["reasons"] = dict(seen["reasons"].most_common())
    return {"jobs": len(scheduler.plans), "peers": peers}


# -- 1. the peers ----------------------------------------------------------------------------


#: Peers :func:`peers_view` describes at most (records cost their senders nothing: the view
#: holds up to 100,000); :func:`peers_in_view` counts them all.
MAX_PEERS_SHOWN = 200


def _shown_first(node: Node, records: list[CapacityRecord]) -> list[CapacityRecord]:
    """The records worth showing first: peers connected now, then those measured here, then
    those of this node's GPU class, then the rest; by peer ID within each."""
    connected = set(node.network.connected_peers())
    book = node.peers
    mine = gpu_class(node.devices)

    def key(record: CapacityRecord) -> tuple[bool, bool, bool, str]:
        peer = record.peer_id
        return (
            peer not in connected,
            not book.get(peer).measured,
            gpu_class(record.devices) != mine,
            peer,
        )

    return sorted(records, key=key)


def peers_in_view(node: Node) -> dict[str, Any]:
    """Every live record but this node's, counted: ``total``, ``other_ledger_rules`` (of
    them, peers following other ledger rules: another MTOR version, never scheduled here)
    and ``by_region`` (``peers``, ``tflops`` claimed, ``price_median``), cheap enough for
    100,000 records."""
    by_region: dict[str, dict[str, Any]] = {}
    prices: dict[str, list[float]] = {}
    total = other_rules = 0
    for record in node.capacity.view.live(node.clock.now()):
        if record.peer_id == node.peer_id:
            continue
        total += 1
        other_rules += record.ledger_rules != LEDGER_RULES
        entry = by_region.setdefault(record.region, {"peers": 0, "tflops": 0.0})
        entry["peers"] += 1
        entry["tflops"] += record.tflops
        prices.setdefault(record.region, []).append(record.price)
    for region, entry in by_region.items():
        entry["tflops"] = _num(entry["tflops"])
        entry["price_median"] = _num(statistics.median(prices[region]))
    return {"total": total, "other_ledger_rules": other_rules, "by_region": by_region}


def peers_view(node: Node, limit: int = MAX_PEERS_SHOWN) -> list[dict[str, Any]]:
    """Every peer with a live record in this node's capacity view (not this node), by peer
    ID, as this node sees it. Keys:

    ``peer_id``, ``region``, ``gpu_class`` (its best GPU's model, ``cpu`` without one),
    ``connection`` (``direct``, ``relayed``, ``none``; None if the network cannot tell),
    ``rtt_ms`` and ``rtt_source`` (see the module docstring; None when not measured),
    ``tflops_advertised`` (the record's claim), ``tflops_measured`` (None if never measured),
    ``accepted``, ``rejected`` and ``verified_share`` (accepted / (accepted + rejected) of its
    results checked here; None if none), ``price``, ``load``, ``mem_free``, ``kernels``,
    ``relay`` (it offers relay service), ``ledger_rules`` (the rules it follows) and
    ``other_ledger_rules`` (they are not this node's: another MTOR version, never scheduled
    here), ``demoted`` (bool), ``demoted_why`` and
    ``demoted_for_s`` (the peer book's reason and time left; None, 0 if not demoted), and
    ``jobs_here``: what this node's last jobs did with it (``{"jobs", "chosen",
    "passed_over", "reasons", "last"}``, see :func:`plan_history`).

    At most ``limit`` peers: those connected now, measured here or of this node's GPU class
    first (a swarm of Sybil records must not make every status call and dashboard snapshot
    megabytes long); :func:`peers_in_view` counts them all.
    """
    now = node.clock.now()
    kind_of = getattr(node.network, "connection_kind", None)
    round_trip = getattr(node.network, "round_trip", None)
    history = plan_history(node.scheduler)
    book = node.peers
    out = []
    others = [r for r in node.capacity.view.live(now) if r.peer_id != node.peer_id]
    for record in _shown_first(node, others)[: max(0, limit)]:
        peer = record.peer_id
        standing = book.get(peer)
        judged = standing.accepted + standing.rejected
        seconds = round_trip(peer) if callable(round_trip) else None
        why = book.excluded(peer, now)
        seen = history["peers"].get(peer)
        out.append(
            {
                "peer_id": peer,
                "region": record.region,
                "gpu_class": gpu_class(record.devices),
                "connection": kind_of(peer) if callable(kind_of) else None,
                "rtt_ms": None if seconds is None else round(seconds * 1000, 3),
                "rtt_source": None if seconds is None else RTT_SOURCE,
                "tflops_advertised": record.tflops,
                "tflops_measured": _num(standing.measured_tflops()),
                "accepted": standing.accepted,
                "rejected": standing.rejected,
                "verified_share": _num(standing.accepted / judged) if judged else None,
                "price": record.price,
                "load": record.load,
                "mem_free": record.mem_free,
                "kernels": list(record.kernels),
                "relay": record.relay,
                "ledger_rules": record.ledger_rules,
                "other_ledger_rules": record.ledger_rules != LEDGER_RULES,
                "demoted": why is not None,
                "demoted_why": why,
                "demoted_for_s": round(max(0.0, standing.demoted_until - now), 1) if why else 0.0,
                "jobs_here": {
                    "jobs": history["jobs"],
                    "chosen": seen["chosen"] if seen else 0,
                    "passed_over": seen["passed_over"] if seen else 0,
                    "reasons": seen["reasons"] if seen else {},
                    "last": seen["last"] if seen else None,
                },
            }
        )
    return out


# -- 2. why no work ----------------------------------------------------------------------------


def _sellers(node: Node, now: float) -> list[CapacityRecord]:
    """Other peers that offer work (they serve kernels) to the requesters this node could
    serve: requesters only do not sell, and workers of other ledger rules sell to other
    requesters (see CapacityQuery.ledger_rules)."""
    return [
        r
        for r in node.capacity.view.live(now)
        if r.peer_id != node.peer_id and r.kernels and r.ledger_rules == LEDGER_RULES
    ]


def why_no_work(node: Node) -> dict[str, Any]:
    """Why this node, as a worker, gets the work it gets (or none). Keys:

    * ``peer_id``, ``serving`` (False: a requester only), ``gpu_class``;
    * ``price``: ``own``; over the other serving peers of the same GPU class ``peers``,
      ``min``, ``median``, ``max`` (None without peers), ``rank`` (1 = cheapest; ties share
      the better rank) ``of`` (peers + 1), ``multiple_of_median``; ``market_peers`` (every
      serving peer that shares a kernel with this node: a requester's candidates) and
      ``trial_ceiling``: :data:`~mtor_p2p.compute.scheduler.TRIAL_PRICE_MULTIPLE` times the
      median of those and this node's asks, over which a newcomer gets no trial from a
      requester that sets no price limit (None without peers);
    * ``demand``: ``window_s``, ``observed_s`` (the window, or the uptime if shorter),
      ``requests_received`` and ``requests_per_min`` (run requests to this worker, refusals
      and retries included), ``sent_to_class`` and ``sent_per_min`` (shard attempts this
      node's own jobs sent to workers of its class), ``class_mean_load`` (reported by the
      class's peers; None without peers);
    * ``reasons``: ``[{"reason": category, "detail": sentence}]``, most decisive first; the
      categories: ``not serving``, ``reachability``, ``kernel``, ``price``, ``memory``,
      ``newcomer``, ``load``, ``demand``;
    * ``seen_here``: what this node's own last jobs did with workers of its class
      (``{"jobs", "chosen", "passed_over", "reasons"}``);
    * ``summary``: one line for an operator.
    """
    now = node.clock.now()
    offer = node.current_offer()
    mine = gpu_class(offer.devices)
    sellers = _sellers(node, now)
    same = [r for r in sellers if gpu_class(r.devices) == mine]
    price = _price_position(offer.price, same, sellers, set(offer.kernels))
    demand = _demand(node, now, mine, same)
    reasons: list[tuple[str, str, str]] = []  # (category, headline, detail)
    if not node.serve:
        reasons.append(
            (
                "not serving",
                "this node does not serve (a requester only)",
                "this node runs as a requester only (serve off): it advertises no kernels and "
                "takes no shards",
            )
        )
    else:
        reasons += _reachability(node)
        reasons += _kernels(set(offer.kernels), sellers)
        reasons += _price_reasons(offer.price, mine, price)
        if offer.mem_free < TYPICAL_SHARD_BYTES:
            reasons.append(
                (
                    "memory",
                    f"{_size(offer.mem_free)} free for shards",
                    f"{_size(offer.mem_free)} free for shards, under the "
                    f"{_size(TYPICAL_SHARD_BYTES)} a typical shard holds at once: "
                    "requesters that filter by free memory pass it over",
                )
            )
        if node.worker.stats.shards_run == 0:
            trial = trial_places(DEFAULT_PLACES)
            reasons.append(
                (
                    "newcomer",
                    "no shard run yet: a newcomer to every requester",
                    "no shard run since this node started: to a requester that has not "
                    "verified one of its results it is a newcomer, and newcomers get at most "
                    f"{trial} of a default job's {DEFAULT_PLACES} places while measured "
                    "workers can fill them",
                )
            )
        if offer.load >= HIGH_LOAD:
            mean = demand["class_mean_load"]
            reasons.append(
                (
                    "load",
                    f"reported load {_text(offer.load)}",
                    f"this node is {offer.load:.0%} busy: requesters rank the workers they "
                    "measured by price per TFLOP/s times (1 + load)"
                    + ("" if mean is None else f" (its class averages {mean:.0%})"),
                )
            )
    if node.serve and demand["requests_received"] == 0:
        span = format_duration(demand["observed_s"])
        reasons.append(
            (
                "demand",
                f"no shard requests in the last {span}",
                f"no shard requests reached this worker in the last {span}"
                + (
                    ""
                    if demand["sent_to_class"] == 0
                    else f", while this node's own jobs sent {demand['sent_to_class']} shards "
                    f"to {mine} workers"
                ),
            )
        )
    if demand["requests_received"] and node.serve:
        summary = (
            f"{demand['requests_received']} shard requests in the last "
            f"{format_duration(demand['observed_s'])}"
        )
        held = [c for c, _, _ in reasons if c != "newcomer"]
        if held:
            # Work comes, and these keep more from coming (the reasons list says how).
            summary += "; more would come but for its " + ", ".join(dict.fromkeys(held))
    elif reasons:
        summary = "no work: " + reasons[0][1]
    else:
        summary = "no work yet: nothing here explains it"
    return {
        "peer_id": node.peer_id,
        "serving": node.serve,
        "gpu_class": mine,
        "price": price,
        "demand": demand,
        "reasons": [{"reason": c, "detail": d} for c, _, d in reasons],
        "seen_here": _seen_here(node.scheduler, {r.peer_id for r in same}),
        "summary": summary,
    }


def _price_position(
    own: float, same: list[CapacityRecord], sellers: list[CapacityRecord], kernels: set[str]
) -> dict[str, Any]:
    """This node's ask against its class's and its market's (see :func:`why_no_work`)."""
    prices = sorted(r.price for r in same)
    median = statistics.median(prices) if prices else None
    market = [r.price for r in sellers if kernels & set(r.kernels)]
    # The scheduler's median is over a job's candidates, this node among them.
    ceiling = trial_price_ceiling([*market, own]) if market else None
    return {
        "own": own,
        "peers": len(prices),
        "min": prices[0] if prices else None,
        "median": median,
        "max": prices[-1] if prices else None,
        "rank": 1 + sum(p < own for p in prices),
        "of": len(prices) + 1,
        "multiple_of_median": _num(own / median) if median else None,
        "market_peers": len(market),
        "trial_multiple": TRIAL_PRICE_MULTIPLE,
        "trial_ceiling": _num(ceiling),
    }


def _price_reasons(own: float, mine: str, price: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``price`` when the ask is over the trial ceiling, or above its class's median."""
    ceiling, median, peers = price["trial_ceiling"], price["median"], price["peers"]
    if median is None:
        return []
    multiple = price["multiple_of_median"]
    # Free peers (a median of 0) or a ratio past what a float holds: no "Nx the median".
    compared = f"{multiple:.3g}x the median" if multiple is not None else "above the median"
    headline = (
        f"price {_text(own)} is {compared} ({_text(median)}) of {peers} peers with the same "
        f"GPU ({mine})"
    )
    if ceiling is not None and own > ceiling:
        return [
            (
                "price",
                headline,
                f"{headline}: a requester without a price limit gives no trial to a worker it "
                f"has not measured that asks over {TRIAL_PRICE_MULTIPLE:g}x the median of its "
                f"candidates ({_text(ceiling)} here), and ranks those it measured by price per "
                "TFLOP/s",
            )
        ]
    if own > median:
        cheaper = price["rank"] - 1
        return [
            (
                "price",
                headline,
                f"{headline}, {cheaper} of them cheaper: requesters rank the workers they "
                "measured by price per TFLOP/s",
            )
        ]
    return []


def _reachability(node: Node) -> list[tuple[str, str, str]]:
    """``reachability`` when NAT traversal says no requester can send this node shards."""
    status = node.reachability()
    if status is None:
        return []  # no NAT traversal here (memnet, or nat off): nothing known against it
    where = status.get("reachability")
    if where == "private" and not status.get("relays"):
        return [
            (
                "reachability",
                "private with no relay: no peer can reach it",
                "behind a NAT (private) with no relay reservation: no peer can dial it, so "
                "no requester can send it work",
            )
        ]
    if where != "public" and status.get("relays") and status.get("nat") == "port-changing":
        return [
            (
                "reachability",
                "reachable only through relays, and its NAT defeats hole punching",
                "reachable only through relays, and its NAT changes ports per destination "
                "(hole punching cannot work): operands and results never cross a relay, so "
                "it gets shards only through a tunnel or port forward (--announce)",
            )
        ]
    return []


def _kernels(own: set[str], sellers: list[CapacityRecord]) -> list[tuple[str, str, str]]:
    """``kernel`` when other workers serve kernels this node does not."""
    served: Counter[str] = Counter(k for r in sellers for k in r.kernels if k not in own)
    if not served or not own:
        return []
    missing = ", ".join(f"{k} ({n} peers)" for k, n in sorted(served.items()))
    return [
        (
            "kernel",
            f"does not serve {', '.join(sorted(served))}",
            f"does not serve kernels other workers serve: {missing}; jobs of those never come here",
        )
    ]


def _demand(node: Node, now: float, mine: str, same: list[CapacityRecord]) -> dict[str, Any]:
    """Requests received and shards sent to this node's class (see :func:`why_no_work`)."""
    observed = max(1e-9, min(DEMAND_WINDOW_S, now - node.started_at))
    received = node.worker.run_requests.count(now, DEMAND_WINDOW_S)
    sent = node.scheduler.shards_sent.count(now, DEMAND_WINDOW_S, mine)
    return {
        "window_s": DEMAND_WINDOW_S,
        "observed_s": round(observed, 1),
        "requests_received": received,
        "requests_per_min": _num(received * 60 / observed),
        "sent_to_class": sent,
        "sent_per_min": _num(sent * 60 / observed),
        "class_mean_load": _num(statistics.fmean(r.load for r in same)) if same else None,
    }


def _seen_here(scheduler: Scheduler, peers: set[str]) -> dict[str, Any]:
    """What this node's own last jobs did with ``peers`` (its class): choices and reasons."""
    history = plan_history(scheduler)
    reasons: Counter[str] = Counter()
    chosen = passed = 0
    for peer in peers:
        seen = history["peers"].get(peer)
        if seen is not None:
            chosen += seen["chosen"]
            passed += seen["passed_over"]
            reasons.update(seen["reasons"])
    return {
        "jobs": history["jobs"],
        "chosen": chosen,
        "passed_over": passed,
        "reasons": dict(reasons.most_common()),
    }


# -- 3. earnings ---------------------------------------------------------------------------------


def earnings(node: Node, limit: int = 200) -> dict[str, Any]:
    """Every receipt behind this node's balance, and how they reconcile with its ledger
    account. Blocking (SQLite): run it through ``node.runtime.run_blocking``. Keys:

    * ``lines``: the ``limit`` newest receipts this node holds, each ``job_id``, ``shard``,
      ``kernel``, ``role`` (``worker``: earned, ``requester``: paid), ``requester``,
      ``worker``, ``flops``, ``price``, ``cost_nano``, ``ended``, ``countersigned``,
      ``entry`` (the ledger entry ID, ``mtor-peer ledger prove ENTRY``; None before the
      countersignature), ``in_ledger`` (this node's ledger holds it) and ``effective`` (it
      moved credits: held, and not refused by the fold for the requester's lack of credit);
    * ``receipts_held``, ``shown``, ``truncated``;
    * ``totals``: over the lines, ``earned_nano`` and ``paid_nano`` (effective lines),
      ``earned_pending_nano`` and ``paid_pending_nano`` (the others);
    * ``ledger``: every entry of the ledger that names this node, whether or not its receipt
      is held here: ``earned_nano``/``earned_receipts``, ``paid_nano``/``paid_receipts``,
      ``transfers_in_nano``, ``transfers_out_nano``, ``staked_nano``, ``fault_rewards_nano``,
      ``slashed_nano``, ``ineffective_entries``, and ``receipts_not_held_here`` /
      ``receipts_not_held_here_nano`` (receipt entries with no receipt in the store; None
      when the lines are truncated);
    * ``account``: ``balance``, ``stake``, ``slashed`` as the ledger folds them;
    * ``reconciliation``: ``terms`` (``[{"item", "nano"}]``: the genesis grant, receipts
      earned and paid, transfers, stake, fault rewards), ``expected_balance_nano``,
      ``balance_nano``, ``unexplained_nano`` (balance less the terms: 0 when the ledger's
      entries explain it all), and the same for the stake (``expected_stake_nano``,
      ``stake_nano``, ``unexplained_stake_nano``).
    """
    me = node.peer_id
    held_count = node.receipts.count()
    receipts = node.receipts.receipts(limit=max(1, limit))
    # Only a countersigned receipt is a ledger entry.
    entries = [receipt_entry_id(r) if r.complete else None for r in receipts]
    ledger = node.ledger
    in_ledger = ledger.held([e for e in entries if e is not None])
    state, rows = ledger.state_and_flows(me)
    ineffective = set(state.ineffective)
    lines = []
    totals = {"earned_nano": 0, "paid_nano": 0, "earned_pending_nano": 0, "paid_pending_nano": 0}
    for receipt, entry in zip(receipts, entries, strict=True):
        body = receipt.body
        role = "worker" if body.worker == me else "requester"
        held = entry is not None and entry in in_ledger
        effective = held and entry not in ineffective
        cost = body.cost_nano
        key = ("earned" if role == "worker" else "paid") + (
            "_nano" if effective else "_pending_nano"
        )
        totals[key] += cost
        lines.append(
            {
                "job_id": body.job_id,
                "shard": body.shard,
                "kernel": body.kernel,
                "role": role,
                "requester": body.requester,
                "worker": body.worker,
                "flops": body.flops,
                "price": body.price,
                "cost_nano": cost,
                "ended": body.ended,
                "countersigned": receipt.complete,
                "entry": entry,
                "in_ledger": held,
                "effective": effective,
            }
        )
    truncated = held_count > len(receipts)
    flows = _ledger_flows(rows, me, ineffective)
    flows["fault_rewards_nano"] = state.rewards.get(me, 0)
    flows["slashed_nano"] = state.slashed.get(me, 0)
    receipt_ids = flows.pop("receipt_ids")
    if truncated:
        flows["receipts_not_held_here"] = flows["receipts_not_held_here_nano"] = None
    else:
        stored = set(entries)
        missing = {i: n for i, n in receipt_ids.items() if i not in stored}
        flows["receipts_not_held_here"] = len(missing)
        flows["receipts_not_held_here_nano"] = sum(missing.values())
    account = state.account(me)
    genesis = ledger.genesis.allocations.get(me, 0)
    terms = [
        {"item": "genesis grant", "nano": genesis},
        {
            "item": f"earned as worker ({flows['earned_receipts']} receipts)",
            "nano": flows["earned_nano"],
        },
        {
            "item": f"paid as requester ({flows['paid_receipts']} receipts)",
            "nano": -flows["paid_nano"],
        },
        {"item": "transfers received", "nano": flows["transfers_in_nano"]},
        {"item": "transfers sent", "nano": -flows["transfers_out_nano"]},
        {"item": "staked", "nano": -flows["staked_nano"]},
        {"item": "fault-proof rewards", "nano": flows["fault_rewards_nano"]},
    ]
    expected = sum(t["nano"] for t in terms)
    expected_stake = flows["staked_nano"] - flows["slashed_nano"]
    return {
        "peer_id": me,
        "lines": lines,
        "receipts_held": held_count,
        "shown": len(lines),
        "truncated": truncated,
        "totals": totals,
        "ledger": flows,
        "account": account,
        "reconciliation": {
            "terms": terms,
            "expected_balance_nano": expected,
            "balance_nano": account["balance"],
            "unexplained_nano": account["balance"] - expected,
            "expected_stake_nano": expected_stake,
            "stake_nano": account["stake"],
            "unexplained_stake_nano": account["stake"] - expected_stake,
        },
    }


def _ledger_flows(
    rows: list[tuple[str, str, str, str, int]], me: str, ineffective: set[str]
) -> dict[str, Any]:
    """The effective entries naming ``me``, summed by what they did to its account."""
    out: dict[str, Any] = {
        "earned_nano": 0,
        "earned_receipts": 0,
        "paid_nano": 0,
        "paid_receipts": 0,
        "transfers_in_nano": 0,
        "transfers_out_nano": 0,
        "staked_nano": 0,
        "ineffective_entries": 0,
        "receipt_ids": {},
    }
    for kind, entry, _payer, payee, amount in rows:
        if entry in ineffective:
            out["ineffective_entries"] += 1
            continue
        if kind == "receipt":
            out["receipt_ids"][entry] = amount
            side = "earned" if payee == me else "paid"
            out[f"{side}_nano"] += amount
            out[f"{side}_receipts"] += 1
        elif kind == "transfer":
            out["transfers_in_nano" if payee == me else "transfers_out_nano"] += amount
        elif kind == "stake":
            out["staked_nano"] += amount
        # faults carry no amount: the fold's slashes and rewards are read from the state
    return out
