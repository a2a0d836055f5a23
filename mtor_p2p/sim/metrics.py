"""Metrics of one simulated run, a comparison of two runs, and the seed's claims checked.

Everything here is a pure function of the run dictionary the simulator writes (``run.json``):
no figure is set by hand, so a metric changes only when the simulated behaviour changes.

Units: times in simulated seconds (latency of interactive requests in milliseconds), money in
USD, energy in kWh, CO2 in kg (per PFLOP in grams), FLOPs as declared by the run (already
multiplied by its ``flop_scale``).
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

Run = Mapping[str, Any]
Metrics = dict[str, Any]

SECONDS_PER_HOUR = 3600.0
#: One TFLOP-hour: a device sustaining 1 TFLOP/s for an hour.
FLOP_PER_TFLOP_HOUR = 1e12 * SECONDS_PER_HOUR
FLOP_PER_PFLOP = 1e15
JOULES_PER_KWH = 3.6e6
#: The most carbon-intensive electricity grids emit about this much; a larger "kg/kWh" figure
#: cannot be a grid intensity.
MAX_GRID_KG_PER_KWH = 1.3

KINDS = ("mtor", "cloud")
INTERACTIVE = "interactive"
BATCH = "batch"
REQUESTER = "requester"
SHARD_OUTCOMES = ("accepted", "failed", "rejected", "timeout", "cancelled")
#: Latency thresholds of the seed's claims, in seconds.
UNDER_100MS = 0.100
UNDER_150MS = 0.150

COST_PARTS = ("useful_compute", "wasted_compute", "redundant", "verification", "idle_billed")

HOLDS = "holds"
DOES_NOT_HOLD = "does not hold"
NOT_COMPARABLE = "not comparable"


# --------------------------------------------------------------------------------------------
# helpers


def _num(value: Any, default: float = 0.0) -> float:
    """A record's number, with ``default`` for a missing or null field."""
    return default if value is None else float(value)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is unknown or the denominator is zero."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return float(numerator) / float(denominator)


def _percentiles(values: Sequence[float], qs: Iterable[int]) -> dict[str, float | None]:
    """``{"p50": ..., ...}`` with numpy's linear percentiles; None for an empty sample."""
    if not values:
        return {f"p{q}": None for q in qs}
    arr = np.asarray(values, dtype=float)
    return {f"p{q}": float(np.percentile(arr, q)) for q in qs}


def _latency_s(request: Mapping[str, Any]) -> float | None:
    """A finished request's latency: its ``latency_s``, else finished - submitted."""
    latency = request.get("latency_s")
    if latency is not None:
        return float(latency)
    finished, submitted = request.get("finished"), request.get("submitted")
    if finished is None or submitted is None:
        return None
    return float(finished) - float(submitted)


def ok_latencies_s(requests: Iterable[Mapping[str, Any]]) -> list[float]:
    """Latencies (seconds) of the requests that succeeded and have one, in input order."""
    out = []
    for request in requests:
        if request.get("ok"):
            latency = _latency_s(request)
            if latency is not None:
                out.append(latency)
    return out


def _under_share(requests: Sequence[Mapping[str, Any]], limit_s: float) -> float | None:
    """Share of ``requests`` that succeeded in under ``limit_s``; a failure counts as not under."""
    if not requests:
        return None
    under = sum(1 for latency in ok_latencies_s(requests) if latency < limit_s)
    return under / len(requests)


def _is_worker(peer: Mapping[str, Any]) -> bool:
    return peer.get("role") != REQUESTER


def _median_price(peers: Sequence[Mapping[str, Any]]) -> float:
    """Median USD/hour of the workers (of every peer if there are none); 0 without peers.

    Verification is compute like any other, so it is valued at the typical market price of a
    device-hour rather than at one particular peer's.
    """
    prices = [_num(p.get("usd_per_hour")) for p in peers if _is_worker(p)]
    if not prices:
        prices = [_num(p.get("usd_per_hour")) for p in peers]
    return float(statistics.median(prices)) if prices else 0.0


def classify_attempts(run: Run) -> list[tuple[Mapping[str, Any], str]]:
    """Each shard attempt with the cost category it belongs to.

    ``useful_compute``: the first accepted attempt (by end time) of a shard of a request that
    succeeded. ``redundant``: later accepted copies of the same shard (redundant execution)
    and cancelled attempts (hedged duplicates that lost the race). ``wasted_compute``: failed,
    rejected and timed-out attempts, and accepted attempts of requests that failed in the end
    (their work delivered nothing).
    """
    ok_jobs = {r.get("id") for r in run.get("requests") or () if r.get("ok")}
    shards = list(run.get("shards") or ())
    order = sorted(range(len(shards)), key=lambda i: (_num(shards[i].get("ended")), i))
    seen: set[tuple[Any, Any]] = set()
    category = [""] * len(shards)
    for i in order:
        shard = shards[i]
        outcome = shard.get("outcome")
        if outcome == "accepted" and shard.get("job") in ok_jobs:
            key = (shard.get("job"), shard.get("index"))
            category[i] = "redundant" if key in seen else "useful_compute"
            seen.add(key)
        elif outcome == "cancelled":
            category[i] = "redundant"
        else:
            category[i] = "wasted_compute"
    return list(zip(shards, category, strict=True))


# --------------------------------------------------------------------------------------------
# the metrics of one run


def _cost(run: Run, useful_flops: float) -> dict[str, Any]:
    kind = run.get("kind")
    peers = list(run.get("peers_info") or ())
    price = {p.get("peer"): _num(p.get("usd_per_hour")) for p in peers}
    parts = dict.fromkeys(COST_PARTS, 0.0)
    for shard, category in classify_attempts(run):
        worker = shard.get("worker")
        if worker not in price:
            raise ValueError(f"shard attempt on {worker!r}, which is not in peers_info")
        parts[category] += _num(shard.get("device_s")) * price[worker] / SECONDS_PER_HOUR
    verification_s = _num((run.get("verification") or {}).get("seconds"))
    parts["verification"] = verification_s * _median_price(peers) / SECONDS_PER_HOUR
    attempts = parts["useful_compute"] + parts["wasted_compute"] + parts["redundant"]
    if kind == "cloud":
        # The cloud bills every provisioned second, busy or not; what no attempt used is idle.
        # (Attempts fit inside online time in a consistent run; the clamp only guards the plot.)
        billed = sum(
            _num(p.get("online_s")) * _num(p.get("usd_per_hour")) / SECONDS_PER_HOUR
            for p in peers
            if _is_worker(p)
        )
        parts["idle_billed"] = max(0.0, billed - attempts)
        total = billed + parts["verification"]
    else:
        # MTOR pays for device time only, and for every attempt: wasted work costs too.
        total = attempts + parts["verification"]
    tflop_hours = useful_flops / FLOP_PER_TFLOP_HOUR
    return {
        "cost_usd": total,
        "cost_usd_per_tflop_hour": _ratio(total, tflop_hours),
        "cost_breakdown": parts,
        "cost_breakdown_per_tflop_hour": {k: _ratio(v, tflop_hours) for k, v in parts.items()},
    }


def _latency(run: Run) -> dict[str, Any]:
    requests = list(run.get("requests") or ())
    interactive = [r for r in requests if r.get("class") == INTERACTIVE]
    batch = [r for r in requests if r.get("class") == BATCH]

    def summary(reqs: Sequence[Mapping[str, Any]], scale: float) -> dict[str, float | None]:
        values = [latency * scale for latency in ok_latencies_s(reqs)]
        out: dict[str, Any] = _percentiles(values, (50, 95, 99))
        out["mean"] = float(np.mean(values)) if values else None
        out["count"] = len(values)
        return out

    classes = [INTERACTIVE, BATCH]
    classes += sorted({str(r.get("class")) for r in requests} - set(classes))
    success_rate = {}
    for cls in classes:
        reqs = [r for r in requests if r.get("class") == cls]
        success_rate[cls] = _ratio(sum(1 for r in reqs if r.get("ok")), len(reqs))

    # Regions in the run's own order, then any request region it did not list.
    order = list(run.get("regions") or ())
    order += sorted({str(r.get("region")) for r in interactive} - set(order))
    per_region: dict[str, dict[str, Any]] = {}
    for region in order:
        reqs = [r for r in interactive if r.get("region") == region]
        if not reqs:
            continue
        ms = [latency * 1000.0 for latency in ok_latencies_s(reqs)]
        per_region[region] = {
            "count": len(reqs),
            "ok": sum(1 for r in reqs if r.get("ok")),
            **_percentiles(ms, (50, 95)),
            "under_100": _under_share(reqs, UNDER_100MS),
            "under_150": _under_share(reqs, UNDER_150MS),
        }

    def region_share(key: str, at_least: float) -> float | None:
        rows = per_region.values()
        return _ratio(sum(1 for row in rows if row[key] >= at_least), len(per_region))

    return {
        "latency_ms": summary(interactive, 1000.0),
        "batch_latency_s": summary(batch, 1.0),
        "success_rate": success_rate,
        "under_100ms_share": _under_share(interactive, UNDER_100MS),
        "under_150ms_share": _under_share(interactive, UNDER_150MS),
        "per_region": per_region,
        "regions_populated": len(per_region),
        "share_of_regions_where_p_under_100_ge_0_95": region_share("under_100", 0.95),
        "share_of_regions_where_p_under_150_ge_0_95": region_share("under_150", 0.95),
        "share_of_regions_where_p_under_150_ge_0_50": region_share("under_150", 0.50),
    }


def recovery_times_s(run: Run) -> list[float]:
    """Seconds from each shard failure to its accepted replacement (completed recoveries)."""
    return [
        _num(r.get("accepted_at")) - _num(r.get("failed_at"))
        for r in run.get("recoveries") or ()
        if r.get("accepted_at") is not None and r.get("failed_at") is not None
    ]


def _recovery(run: Run) -> dict[str, Any]:
    times = recovery_times_s(run)
    out: dict[str, Any] = _percentiles(times, (50, 95))
    out["max"] = max(times) if times else None
    out["count"] = len(times)
    return out


def _energy(run: Run, useful_flops: float) -> dict[str, Any]:
    cloud = run.get("kind") == "cloud"
    kwh = co2_kg = 0.0
    for peer in run.get("peers_info") or ():
        busy = _num(peer.get("busy_s"))
        joules = busy * _num(peer.get("power_w"))
        if cloud and _is_worker(peer):
            # A provisioned cloud machine draws idle power for the whole time it is up; an MTOR
            # owner's idle machine would be on anyway, so MTOR counts only the work's energy.
            joules += max(0.0, _num(peer.get("online_s")) - busy) * _num(peer.get("idle_w"))
        peer_kwh = joules * _num(peer.get("pue"), 1.0) / JOULES_PER_KWH
        kwh += peer_kwh
        co2_kg += peer_kwh * _num(peer.get("g_co2_per_kwh")) / 1000.0
    pflops = useful_flops / FLOP_PER_PFLOP
    co2_per_pflop = _ratio(co2_kg * 1000.0, pflops)
    return {
        "energy_kwh": kwh,
        "co2_kg": co2_kg,
        "co2_kg_per_kwh": _ratio(co2_kg, kwh),
        "co2_g_per_pflop": co2_per_pflop,
    }


def _utilisation(run: Run) -> dict[str, Any]:
    workers = [p for p in run.get("peers_info") or () if _is_worker(p)]
    online = sum(_num(p.get("online_s")) for p in workers)
    busy = sum(_num(p.get("busy_s")) for p in workers)
    useful = sum(
        _num(shard.get("device_s"))
        for shard, category in classify_attempts(run)
        if category == "useful_compute"
    )
    # Attempts that end in the cool-down carry device time the window's busy figure does not:
    # useful work is part of busy work, never more.
    useful = min(useful, busy)
    return {"utilisation": _ratio(busy, online), "useful_utilisation": _ratio(useful, online)}


def _counts(run: Run) -> dict[str, Any]:
    requests = list(run.get("requests") or ())
    ok = sum(1 for r in requests if r.get("ok"))
    shards = dict.fromkeys(SHARD_OUTCOMES, 0)
    for shard in run.get("shards") or ():
        outcome = str(shard.get("outcome"))
        shards[outcome] = shards.get(outcome, 0) + 1
    shards["total"] = sum(shards.values())
    return {
        "requests": {
            "total": len(requests),
            "ok": ok,
            "failed": len(requests) - ok,
            "reissued": sum(int(_num(r.get("reissued"))) for r in requests),
            "rejected": sum(int(_num(r.get("rejected"))) for r in requests),
            "hedged": sum(int(_num(r.get("hedged"))) for r in requests),
            # Still running when the window closed: censored, so left out of every latency
            # and success figure (a long tail would otherwise look shorter than it is).
            "unfinished": int(_num(run.get("unfinished_requests"))),
            # Why the failed ones failed: their errors' first clauses, most common first.
            "failure_reasons": failure_reasons(requests),
        },
        "shards": shards,
    }


#: Failure reasons a report lists, at most, and the characters kept of each.
FAILURE_REASONS_KEPT = 8
FAILURE_REASON_CHARS = 120


def failure_reasons(requests: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """The failed requests counted by reason: each error's first clause (up to "; " or
    " (", where the details of one job begin), so that the same failure counts once."""
    counts: Counter[str] = Counter()
    for request in requests:
        if request.get("ok"):
            continue
        text = str(request.get("error") or "no error recorded")
        for cut in ("; ", " ("):
            text = text.split(cut, 1)[0]
        counts[text[:FAILURE_REASON_CHARS]] += 1
    return dict(counts.most_common(FAILURE_REASONS_KEPT))


def _trust_and_ledger(run: Run) -> dict[str, Any]:
    adversaries = run.get("adversaries") or {}
    trust_keys = ("cheaters", "cheaters_caught", "wrong_accepted", "fault_proofs", "slashed")
    trust = {k: adversaries.get(k) for k in trust_keys}
    trust["catch_rate"] = _ratio(trust["cheaters_caught"], trust["cheaters"])
    ledger = run.get("ledger") or {}
    ledger_keys = (
        "conserved",
        "agree",
        "credits_paid",
        "receipts",
        "replicas",
        "supply",
        "total",
        "burned",
    )
    return {"trust": trust, "ledger": {k: ledger.get(k) for k in ledger_keys}}


def _simulator(run: Run) -> dict[str, Any]:
    wall = run.get("wall_seconds")
    events = run.get("events")
    simulated = _num(run.get("hours")) * SECONDS_PER_HOUR
    return {
        "wall_seconds": wall,
        "events": events,
        "events_per_s": _ratio(events, wall),
        "simulated_s_per_wall_s": _ratio(simulated, wall),
    }


def compute_metrics(run: Run) -> Metrics:
    """Every metric of one run (a parsed ``run.json``), as a JSON-serialisable dict.

    A metric that the run has no data for (no requests, no recoveries, no useful FLOPs) is
    None rather than an error. Raises ValueError for an unknown ``kind`` or a shard attempt on
    a worker missing from ``peers_info`` (its price would be unknown).
    """
    kind = run.get("kind")
    if kind not in KINDS:
        raise ValueError(f"unknown run kind {kind!r} (expected one of {KINDS})")
    useful_flops = sum(_num(r.get("flops")) for r in run.get("requests") or () if r.get("ok"))
    metrics: Metrics = {
        "kind": kind,
        "scenario": run.get("scenario"),
        "seed": run.get("seed"),
        "peers": run.get("peers"),
        "hours": run.get("hours"),
        "flop_scale": run.get("flop_scale"),
        "useful_flops": useful_flops,
        "useful_tflop_hours": useful_flops / FLOP_PER_TFLOP_HOUR,
    }
    metrics.update(_cost(run, useful_flops))
    metrics.update(_latency(run))
    metrics["recovery_s"] = _recovery(run)
    metrics.update(_energy(run, useful_flops))
    metrics.update(_utilisation(run))
    metrics.update(_counts(run))
    metrics.update(_trust_and_ledger(run))
    metrics["simulator"] = _simulator(run)
    return metrics


# --------------------------------------------------------------------------------------------
# comparison and claims


def metric_value(metrics: Mapping[str, Any] | None, key: str) -> Any:
    """The value at a dotted key (``"latency_ms.p99"``), or None where any part is missing."""
    value: Any = metrics
    for part in key.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


#: Metrics compared as mtor / cloud ratios.
COMPARED = {
    "cost_usd_per_tflop_hour": "cost_usd_per_tflop_hour",
    "latency_p50_ms": "latency_ms.p50",
    "latency_p95_ms": "latency_ms.p95",
    "latency_p99_ms": "latency_ms.p99",
    "recovery_p50_s": "recovery_s.p50",
    "co2_g_per_pflop": "co2_g_per_pflop",
    "co2_kg_per_kwh": "co2_kg_per_kwh",
    "utilisation": "utilisation",
    "useful_utilisation": "useful_utilisation",
}


def compare(mtor: Mapping[str, Any], cloud: Mapping[str, Any]) -> dict[str, float | None]:
    """Ratios mtor / cloud of the headline metrics (None where either side has no value)."""
    return {
        name: _ratio(metric_value(mtor, key), metric_value(cloud, key))
        for name, key in COMPARED.items()
    }


@dataclass(frozen=True)
class Claim:
    """One of the seed's claims, as data.

    ``mtor``/``cloud`` are the claimed values (None where the claim states none); ``ratio`` is
    the claimed mtor/cloud ratio, stated or implied by the two values. ``direction`` says which
    way is better: "lower" or "higher". A claimed value above ``physical_max`` cannot be the
    quantity the metric measures.
    """

    id: str
    text: str
    metric: str
    unit: str
    direction: str
    mtor: float | None = None
    cloud: float | None = None
    ratio: float | None = None
    physical_max: float | None = None
    #: A related metric the verdict's sentence also quotes: (dotted key, label, unit).
    also: tuple[str, str, str] | None = None
    note: str = ""


def _pair(
    id_: str, text: str, metric: str, unit: str, mtor: float, cloud: float, **kw: Any
) -> Claim:
    """A claim of an MTOR value against a cloud value, lower being better."""
    return Claim(id_, text, metric, unit, "lower", mtor, cloud, mtor / cloud, **kw)


CLAIMS: tuple[Claim, ...] = (
    _pair(
        "cost",
        "Cost per TFLOP $0.11 (MTOR) vs $0.49 (cloud)",
        "cost_usd_per_tflop_hour",
        "USD per TFLOP-hour",
        0.11,
        0.49,
        note="read as USD per TFLOP-hour, i.e. per 3.6e15 useful FLOP delivered",
    ),
    _pair("p99", "P99 latency 127 ms vs 293 ms", "latency_ms.p99", "ms", 127.0, 293.0),
    _pair("recovery", "Fault recovery 820 ms vs 4.2 s", "recovery_s.p50", "s", 0.82, 4.2),
    _pair(
        "co2",
        "CO2 0.72 vs 1.85 kg/kWh",
        "co2_kg_per_kwh",
        "kg CO2 per kWh",
        0.72,
        1.85,
        physical_max=MAX_GRID_KG_PER_KWH,
        also=("co2_g_per_pflop", "per useful PFLOP", "g"),
        note="no grid exceeds ~1.3 kg/kWh, so the verdict also gives g CO2 per useful PFLOP",
    ),
    Claim(
        "under_100ms",
        "95% of requests under 100 ms",
        "under_100ms_share",
        "share",
        "higher",
        mtor=0.95,
        note="interactive requests; a failed request counts as not under",
    ),
    Claim(
        "regions_150ms",
        "Under 150 ms in 89% of populated regions",
        "share_of_regions_where_p_under_150_ge_0_95",
        "share",
        "higher",
        mtor=0.89,
        also=("share_of_regions_where_p_under_150_ge_0_50", "read as medians", "share"),
        note="a region counts when at least 95% of its interactive requests finish under 150 ms;"
        " the verdict also quotes the looser reading, a median under 150 ms",
    ),
    Claim(
        "utilisation",
        "3.2x utilisation",
        "utilisation",
        "share",
        "higher",
        ratio=3.2,
        also=("useful_utilisation", "useful utilisation", "share"),
        note="MTOR utilisation / cloud utilisation (busy device-seconds / online seconds)",
    ),
)


def _better_or_equal(measured: float, claimed: float, direction: str) -> bool:
    return measured <= claimed if direction == "lower" else measured >= claimed


def format_value(value: float | None, unit: str) -> str:
    """A value for a sentence or table: shares as percentages, ratios with an x, else 3 digits."""
    if value is None:
        return "n/a"
    if unit == "share":
        # Small shares (utilisation of a lightly loaded network) keep their digits.
        if value and abs(value) < 0.001:
            return f"{100 * value:.2g}%"
        return f"{100 * value:.1f}%"
    if unit == "ratio":
        return f"{value:.3g}x"
    return f"{value:.3g} {unit}"


def _measured_text(claim: Claim, mtor: Mapping[str, Any], cloud: Mapping[str, Any] | None) -> str:
    """What was measured for ``claim``, as a sentence fragment, with its context figure."""
    mtor_value = metric_value(mtor, claim.metric)
    cloud_value = metric_value(cloud, claim.metric)
    text = f"MTOR measured {format_value(mtor_value, claim.unit)}"
    if cloud_value is not None:
        text += f", cloud {format_value(cloud_value, claim.unit)}"
    ratio = _ratio(mtor_value, cloud_value)
    if ratio is not None and claim.ratio is not None:
        text += f", ratio {ratio:.3g} (claimed {claim.ratio:.3g})"
    if claim.also is not None:
        key, label, unit = claim.also
        also_mtor, also_cloud = metric_value(mtor, key), metric_value(cloud, key)
        text += f"; {label}: MTOR {format_value(also_mtor, unit)}"
        if also_cloud is not None:
            also_ratio = _ratio(also_mtor, also_cloud)
            ratio_text = "n/a" if also_ratio is None else f"{also_ratio:.3g}"
            text += f", cloud {format_value(also_cloud, unit)} (ratio {ratio_text})"
    return text


def _assess(claim: Claim, mtor: Mapping[str, Any], cloud: Mapping[str, Any] | None) -> dict:
    measured_mtor = metric_value(mtor, claim.metric)
    measured_cloud = metric_value(cloud, claim.metric)
    # A ratio means something only for a claim made against the cloud.
    measured_ratio = _ratio(measured_mtor, measured_cloud) if claim.ratio is not None else None
    result: dict[str, Any] = {
        "id": claim.id,
        "claim": claim.text,
        "metric": claim.metric,
        "unit": claim.unit,
        "direction": claim.direction,
        "claimed": {"mtor": claim.mtor, "cloud": claim.cloud, "ratio": claim.ratio},
        "measured": {"mtor": measured_mtor, "cloud": measured_cloud, "ratio": measured_ratio},
    }
    measured_text = _measured_text(claim, mtor, cloud)

    claimed_values = [v for v in (claim.mtor, claim.cloud) if v is not None]
    if claim.physical_max is not None and any(v > claim.physical_max for v in claimed_values):
        result["verdict"] = NOT_COMPARABLE
        result["why"] = (
            f"A claimed value above {claim.physical_max:g} ({claim.unit}) cannot be what this "
            f"metric measures, so the claim is not comparable as stated; {measured_text}."
        )
        return result

    needs_ratio = claim.ratio is not None
    if (claim.mtor is not None and measured_mtor is None) or (
        needs_ratio and measured_ratio is None
    ):
        no_cloud = "; no cloud run" if cloud is None and needs_ratio else ""
        result["verdict"] = NOT_COMPARABLE
        result["why"] = (
            f"The runs do not give the measurement this claim needs ({measured_text}{no_cloud})."
        )
        return result

    failures = []
    if claim.mtor is not None and not _better_or_equal(measured_mtor, claim.mtor, claim.direction):
        claimed = format_value(claim.mtor, claim.unit)
        failures.append(f"the MTOR figure is worse than the claimed {claimed}")
    if needs_ratio and not _better_or_equal(measured_ratio, claim.ratio, claim.direction):
        failures.append("MTOR's advantage over the cloud is smaller than claimed")
    if failures:
        result["verdict"] = DOES_NOT_HOLD
        result["why"] = f"{measured_text}: {' and '.join(failures)}."
    else:
        result["verdict"] = HOLDS
        result["why"] = f"{measured_text}: at least as good as claimed."
    return result


def assess_claims(mtor: Mapping[str, Any], cloud: Mapping[str, Any] | None) -> list[dict]:
    """Each of :data:`CLAIMS` checked against the metrics of an MTOR run and a cloud run.

    A claim holds when the measured MTOR value is at least as good as the claimed one and, for
    a claim made against the cloud, when the measured mtor/cloud ratio is at least as good as
    the claimed ratio. It is "not comparable" when a claimed value cannot be the quantity
    measured or a measurement is missing (for instance without a cloud run). Each result has
    the claim, ``claimed`` and ``measured`` values (mtor, cloud, ratio), ``verdict`` and ``why``.
    """
    return [_assess(claim, mtor, cloud) for claim in CLAIMS]


def claims_as_data() -> list[dict[str, Any]]:
    """:data:`CLAIMS` as plain dicts (for ``metrics.json``)."""
    return [asdict(claim) for claim in CLAIMS]
