"""Simulation metrics, claims and report, on small runs whose figures are worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mtor_p2p.sim.metrics import (
    CLAIMS,
    DOES_NOT_HOLD,
    HOLDS,
    NOT_COMPARABLE,
    assess_claims,
    classify_attempts,
    compare,
    compute_metrics,
)
from mtor_p2p.sim.report import load_runs, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
J_PER_KWH = 3.6e6


def _peer(peer: str, region: str, **fields: Any) -> dict[str, Any]:
    base = {
        "peer": peer,
        "region": region,
        "gpu": "RTX 4090",
        "tflops": 82.6,
        "power_w": 400,
        "idle_w": 20,
        "usd_per_hour": 3.6,
        "g_co2_per_kwh": 200.0,
        "role": "honest",
        "online_s": 1000.0,
        "busy_s": 0.0,
        "pue": 1.0,
    }
    return {**base, **fields}


def _request(id_: str, cls: str, region: str, ok: bool, latency: float | None, flops: float):
    return {
        "id": id_,
        "class": cls,
        "region": region,
        "submitted": 10.0,
        "finished": None if latency is None else 10.0 + latency,
        "ok": ok,
        "latency_s": latency,
        "flops": flops,
        "cost_credits": 0.5,
        "shards": 1,
        "reissued": 0,
        "rejected": 0,
        "hedged": 0,
        "error": None if ok else "no worker",
        "worker_regions": [region],
    }


def _shard(job: str, index: int, worker: str, outcome: str, device_s: float, ended: float):
    return {
        "job": job,
        "index": index,
        "worker": worker,
        "outcome": outcome,
        "started": ended - device_s,
        "ended": ended,
        "device_s": device_s,
        "flops": 1e12,
    }


def mtor_run() -> dict[str, Any]:
    """Workers A ($3.6/h = $0.001/s) and B ($7.2/h = $0.002/s); 7.2e15 useful FLOP = 2 TFLOP-h.

    Attempts: useful A10 (r1) + A20 (r2) + A50 (r5) = $0.08; redundant B5 cancelled (r1) + B10
    second accepted copy (r2) = $0.03; wasted B5 failed (r2) + A10 accepted for the failed r3 +
    A10 rejected (r5) + B5 timeout (r4) = $0.04; verification 20 s at the median $5.4/h = $0.03.
    Total $0.18, i.e. $0.09 per TFLOP-hour.
    """
    return {
        "kind": "mtor",
        "scenario": "unit",
        "seed": 7,
        "peers": 3,
        "hours": 0.5,
        "flop_scale": 4096.0,
        "wall_seconds": 4.0,
        "events": 1000,
        "regions": ["WUS", "WEU", "EAS"],
        "peers_info": [
            _peer("A", "WEU", busy_s=100.0, g_co2_per_kwh=200.0),
            _peer("B", "WUS", usd_per_hour=7.2, power_w=300, busy_s=25.0, online_s=500.0,
                  g_co2_per_kwh=500.0, role="cheat", gpu="RTX 3090", tflops=35.6),
            _peer("R", "WEU", usd_per_hour=0.0, power_w=100, role="requester"),
        ],
        "requests": [
            _request("r1", "interactive", "WEU", True, 0.050, 1.8e15),
            _request("r2", "interactive", "WEU", True, 0.120, 1.8e15),
            _request("r3", "interactive", "WEU", False, None, 1.0e15),
            _request("r4", "interactive", "WUS", True, 0.090, 0.0),
            _request("r5", "batch", "WUS", True, 10.0, 3.6e15),
        ],
        "shards": [
            _shard("r1", 0, "A", "accepted", 10.0, 11.0),
            _shard("r1", 0, "B", "cancelled", 5.0, 11.0),
            _shard("r2", 0, "B", "failed", 5.0, 12.0),
            # Listed first but ends later: the A copy (ended 20) is the useful one.
            _shard("r2", 0, "B", "accepted", 10.0, 30.0),
            _shard("r2", 0, "A", "accepted", 20.0, 20.0),
            _shard("r3", 0, "A", "accepted", 10.0, 40.0),
            _shard("r5", 0, "A", "rejected", 10.0, 50.0),
            _shard("r5", 1, "A", "accepted", 50.0, 60.0),
            _shard("r4", 0, "B", "timeout", 5.0, 70.0),
        ],
        "recoveries": [
            {"job": "r2", "shard": 0, "failed_at": 100.0, "accepted_at": 101.0, "cause": "crash"},
            {"job": "r5", "shard": 0, "failed_at": 200.0, "accepted_at": 200.5, "cause": "leave"},
            {"job": "r5", "shard": 1, "failed_at": 300.0, "accepted_at": 304.0, "cause": "stall"},
        ],
        "samples": [
            {"t": 60.0 * i, "online": 3, "busy_fraction": 0.1 * i, "price_mean": 1.0 + i,
             "price_p10": 0.5 + i, "price_p90": 1.5 + i, "view_mean": 2.0}
            for i in range(1, 5)
        ],
        "verification": {"seconds": 20.0, "checks": 4},
        "ledger": {"supply": 1.0e12, "total": 1.0e12, "burned": 0, "conserved": True,
                   "replicas": 3, "agree": True, "receipts": 4, "credits_paid": 2.5},
        "adversaries": {"cheaters": 1, "cheaters_caught": 1, "wrong_accepted": 0,
                        "fault_proofs": 2, "slashed": 1},
    }  # fmt: skip


def cloud_run() -> dict[str, Any]:
    """Two instances at $3.6/h up 1000 s each: billed $2.00, of which $0.20 did the 2 TFLOP-h."""
    return {
        "kind": "cloud",
        "scenario": "unit",
        "seed": 7,
        "peers": 3,
        "hours": 0.5,
        "flop_scale": 4096.0,
        "wall_seconds": 2.0,
        "events": 500,
        "regions": ["WUS", "WEU", "EAS"],
        "peers_info": [
            _peer("C1", "WUS", busy_s=200.0, idle_w=50, pue=1.2, g_co2_per_kwh=400.0),
            _peer("C2", "WEU", busy_s=0.0, idle_w=50, pue=1.2, g_co2_per_kwh=100.0),
            _peer("R", "WEU", usd_per_hour=0.0, power_w=100, role="requester"),
        ],
        "requests": [
            _request("c1", "interactive", "WEU", True, 0.200, 3.6e15),
            _request("c2", "interactive", "WUS", True, 0.300, 3.6e15),
        ],
        "shards": [
            _shard("c1", 0, "C1", "accepted", 100.0, 110.0),
            _shard("c2", 0, "C1", "accepted", 100.0, 220.0),
        ],
        "recoveries": [
            {"job": "c2", "shard": 0, "failed_at": 10.0, "accepted_at": 14.0, "cause": "crash"}
        ],
        "samples": [{"t": 60.0, "online": 2, "busy_fraction": 0.1}],
        "verification": {"seconds": 0.0, "checks": 0},
    }


# --------------------------------------------------------------------------------------------
# cost


def test_mtor_cost_counts_every_attempt_and_verification():
    m = compute_metrics(mtor_run())
    assert m["useful_flops"] == pytest.approx(7.2e15)
    assert m["useful_tflop_hours"] == pytest.approx(2.0)
    parts = m["cost_breakdown"]
    assert parts["useful_compute"] == pytest.approx(0.08)
    assert parts["redundant"] == pytest.approx(0.03)
    assert parts["wasted_compute"] == pytest.approx(0.04)
    assert parts["verification"] == pytest.approx(0.03)
    assert parts["idle_billed"] == 0.0
    assert m["cost_usd"] == pytest.approx(0.18)
    assert m["cost_usd"] == pytest.approx(sum(parts.values()))
    assert m["cost_usd_per_tflop_hour"] == pytest.approx(0.09)
    assert m["cost_breakdown_per_tflop_hour"]["wasted_compute"] == pytest.approx(0.02)


def test_attempt_classification():
    categories = [c for _, c in classify_attempts(mtor_run())]
    assert categories == [
        "useful_compute",  # r1 on A
        "redundant",  # r1 hedge on B, cancelled
        "wasted_compute",  # r2 failed
        "redundant",  # r2 second accepted copy (ended later)
        "useful_compute",  # r2 first accepted copy
        "wasted_compute",  # r3 accepted, but the request failed
        "wasted_compute",  # r5 rejected
        "useful_compute",  # r5 shard 1
        "wasted_compute",  # r4 timeout
    ]


def test_cloud_bills_idle_time():
    m = compute_metrics(cloud_run())
    parts = m["cost_breakdown"]
    assert parts["useful_compute"] == pytest.approx(0.2)
    assert parts["idle_billed"] == pytest.approx(1.8)
    assert parts["wasted_compute"] == parts["redundant"] == parts["verification"] == 0.0
    assert m["cost_usd"] == pytest.approx(2.0)
    assert m["cost_usd_per_tflop_hour"] == pytest.approx(1.0)


def test_unknown_worker_and_kind_are_errors():
    run = mtor_run()
    run["shards"][0]["worker"] = "nobody"
    with pytest.raises(ValueError, match="nobody"):
        compute_metrics(run)
    with pytest.raises(ValueError, match="kind"):
        compute_metrics({**mtor_run(), "kind": "grid"})


# --------------------------------------------------------------------------------------------
# latency, regions, recovery


def test_latency_percentiles_and_success():
    m = compute_metrics(mtor_run())
    lat = m["latency_ms"]  # ok interactive: 50, 90, 120 ms
    assert lat["count"] == 3
    assert lat["p50"] == pytest.approx(90.0)
    assert lat["p95"] == pytest.approx(90.0 + 0.9 * 30.0)  # linear, position 1.9
    assert lat["p99"] == pytest.approx(90.0 + 0.98 * 30.0)
    assert lat["mean"] == pytest.approx(260.0 / 3)
    assert m["batch_latency_s"] == {"p50": 10.0, "p95": 10.0, "p99": 10.0, "mean": 10.0, "count": 1}
    assert m["success_rate"] == {"interactive": 0.75, "batch": 1.0}
    # The failed request counts as not under either threshold.
    assert m["under_100ms_share"] == pytest.approx(2 / 4)
    assert m["under_150ms_share"] == pytest.approx(3 / 4)


def test_per_region_shares_count_failures():
    m = compute_metrics(mtor_run())
    assert list(m["per_region"]) == ["WUS", "WEU"]  # the run's order; EAS has no requests
    weu = m["per_region"]["WEU"]
    assert weu["count"] == 3 and weu["ok"] == 2
    assert weu["p50"] == pytest.approx(85.0)
    assert weu["p95"] == pytest.approx(50.0 + 0.95 * 70.0)
    assert weu["under_100"] == pytest.approx(1 / 3)
    assert weu["under_150"] == pytest.approx(2 / 3)
    wus = m["per_region"]["WUS"]
    assert (wus["count"], wus["p50"], wus["under_100"], wus["under_150"]) == (1, 90.0, 1.0, 1.0)
    assert m["regions_populated"] == 2
    assert m["share_of_regions_where_p_under_150_ge_0_95"] == 0.5
    assert m["share_of_regions_where_p_under_150_ge_0_50"] == 1.0
    assert m["share_of_regions_where_p_under_100_ge_0_95"] == 0.5


def test_recovery_times():
    rec = compute_metrics(mtor_run())["recovery_s"]  # 1.0, 0.5, 4.0 s
    assert rec["count"] == 3
    assert rec["p50"] == pytest.approx(1.0)
    assert rec["p95"] == pytest.approx(1.0 + 0.9 * 3.0)
    assert rec["max"] == pytest.approx(4.0)


# --------------------------------------------------------------------------------------------
# energy, CO2, utilisation


def test_mtor_energy_is_marginal_work_only():
    m = compute_metrics(mtor_run())
    a_j, b_j = 100 * 400, 25 * 300  # busy seconds × power; idle power is not MTOR's
    assert m["energy_kwh"] == pytest.approx((a_j + b_j) / J_PER_KWH)
    co2_kg = (a_j * 200 + b_j * 500) / J_PER_KWH / 1000
    assert m["co2_kg"] == pytest.approx(co2_kg)
    assert m["co2_kg_per_kwh"] == pytest.approx(co2_kg / ((a_j + b_j) / J_PER_KWH))
    assert m["co2_g_per_pflop"] == pytest.approx(co2_kg * 1000 / 7.2)


def test_cloud_energy_includes_idle_power_and_pue():
    m = compute_metrics(cloud_run())
    c1_j = (200 * 400 + 800 * 50) * 1.2
    c2_j = (1000 * 50) * 1.2
    assert m["energy_kwh"] == pytest.approx((c1_j + c2_j) / J_PER_KWH)
    assert m["co2_kg"] == pytest.approx((c1_j * 400 + c2_j * 100) / J_PER_KWH / 1000)
    assert m["co2_g_per_pflop"] == pytest.approx(m["co2_kg"] * 1000 / 7.2)


def test_utilisation_over_workers():
    m = compute_metrics(mtor_run())
    assert m["utilisation"] == pytest.approx(125 / 1500)  # the requester is not a worker
    assert m["useful_utilisation"] == pytest.approx(80 / 1500)
    c = compute_metrics(cloud_run())
    assert c["utilisation"] == pytest.approx(0.1)
    assert c["useful_utilisation"] == pytest.approx(0.1)


def test_counts_trust_ledger_simulator():
    m = compute_metrics(mtor_run())
    assert m["requests"] == {
        "total": 5,
        "ok": 4,
        "failed": 1,
        "reissued": 0,
        "rejected": 0,
        "hedged": 0,
        "unfinished": 0,
        "failure_reasons": {"no worker": 1},
    }
    assert m["shards"] == {
        "accepted": 5,
        "failed": 1,
        "rejected": 1,
        "timeout": 1,
        "cancelled": 1,
        "total": 9,
    }
    assert m["trust"]["cheaters_caught"] == 1 and m["trust"]["catch_rate"] == 1.0
    assert m["ledger"]["conserved"] is True and m["ledger"]["credits_paid"] == 2.5
    assert m["simulator"] == {
        "wall_seconds": 4.0,
        "events": 1000,
        "events_per_s": 250.0,
        "simulated_s_per_wall_s": 450.0,
    }
    cloud = compute_metrics(cloud_run())
    assert cloud["ledger"]["conserved"] is None and cloud["trust"]["cheaters"] is None


def test_empty_run_gives_nulls():
    for run in (
        {"kind": "mtor"},
        {"kind": "cloud", "requests": [], "recoveries": [], "shards": []},
    ):
        m = compute_metrics(run)
        json.dumps(m, allow_nan=False)
        assert m["cost_usd_per_tflop_hour"] is None
        assert m["latency_ms"] == {"p50": None, "p95": None, "p99": None, "mean": None, "count": 0}
        assert m["recovery_s"] == {"p50": None, "p95": None, "max": None, "count": 0}
        assert m["success_rate"] == {"interactive": None, "batch": None}
        assert m["under_100ms_share"] is None and m["per_region"] == {}
        assert m["share_of_regions_where_p_under_150_ge_0_95"] is None
        assert m["utilisation"] is None and m["co2_kg_per_kwh"] is None
        assert m["co2_g_per_pflop"] is None and m["simulator"]["events_per_s"] is None


# --------------------------------------------------------------------------------------------
# comparison and claims


def test_compare_ratios():
    ratios = compare(compute_metrics(mtor_run()), compute_metrics(cloud_run()))
    assert ratios["cost_usd_per_tflop_hour"] == pytest.approx(0.09)
    assert ratios["latency_p50_ms"] == pytest.approx(90 / 250)
    assert ratios["latency_p99_ms"] == pytest.approx(119.4 / 299.0)
    assert ratios["recovery_p50_s"] == pytest.approx(1.0 / 4.0)
    assert ratios["utilisation"] == pytest.approx((125 / 1500) / 0.1)
    assert compare({}, {})["cost_usd_per_tflop_hour"] is None


def test_claims_on_the_sample_runs():
    verdicts = {
        c["id"]: c["verdict"]
        for c in assess_claims(compute_metrics(mtor_run()), compute_metrics(cloud_run()))
    }
    assert verdicts == {
        "cost": HOLDS,  # $0.09 ≤ $0.11 and ratio 0.09 ≤ 0.11/0.49
        "p99": HOLDS,  # 119.4 ms ≤ 127 ms and 119.4/299 ≤ 127/293
        "recovery": DOES_NOT_HOLD,  # 1.0 s > 0.82 s
        "co2": NOT_COMPARABLE,  # 1.85 kg/kWh is no grid's intensity
        "under_100ms": DOES_NOT_HOLD,  # 50%
        "regions_150ms": DOES_NOT_HOLD,  # 50% of regions
        "utilisation": DOES_NOT_HOLD,  # 0.83x
    }


def test_claims_both_directions_and_reasons():
    mtor = {
        "cost_usd_per_tflop_hour": 0.10,
        "latency_ms": {"p99": 100.0},
        "recovery_s": {"p50": 0.5},
        "co2_kg_per_kwh": 0.3,
        "co2_g_per_pflop": 10.0,
        "under_100ms_share": 0.96,
        "share_of_regions_where_p_under_150_ge_0_95": 0.9,
        "utilisation": 0.66,
    }
    cloud = {
        # MTOR's cost beats the claimed $0.11, but the cloud is cheaper than claimed too.
        "cost_usd_per_tflop_hour": 0.30,
        "latency_ms": {"p99": 400.0},
        "recovery_s": {"p50": 5.0},
        "co2_kg_per_kwh": 0.5,
        "co2_g_per_pflop": 40.0,
        "utilisation": 0.2,
    }
    results = {c["id"]: c for c in assess_claims(mtor, cloud)}
    assert results["cost"]["verdict"] == DOES_NOT_HOLD
    assert "advantage" in results["cost"]["why"] and "worse" not in results["cost"]["why"]
    assert results["cost"]["measured"]["ratio"] == pytest.approx(0.10 / 0.30)
    for id_ in ("p99", "recovery", "under_100ms", "regions_150ms", "utilisation"):
        assert results[id_]["verdict"] == HOLDS, results[id_]["why"]
    assert results["co2"]["verdict"] == NOT_COMPARABLE
    assert "per useful PFLOP: MTOR 10 g, cloud 40 g (ratio 0.25)" in results["co2"]["why"]
    # A ratio is measured only for claims made against the cloud.
    assert results["under_100ms"]["measured"]["ratio"] is None

    # Without a cloud run, claims against the cloud cannot be judged; the others still can.
    alone = {c["id"]: c["verdict"] for c in assess_claims(mtor, None)}
    assert alone["cost"] == alone["p99"] == alone["utilisation"] == NOT_COMPARABLE
    assert alone["under_100ms"] == HOLDS
    # An MTOR figure worse than claimed fails even with a large advantage.
    worse = {**mtor, "latency_ms": {"p99": 130.0}}
    p99 = next(c for c in assess_claims(worse, cloud) if c["id"] == "p99")
    assert p99["verdict"] == DOES_NOT_HOLD and "worse than the claimed 127 ms" in p99["why"]


def test_claims_data():
    assert [c.id for c in CLAIMS] == [
        "cost",
        "p99",
        "recovery",
        "co2",
        "under_100ms",
        "regions_150ms",
        "utilisation",
    ]
    cost = CLAIMS[0]
    assert (cost.mtor, cost.cloud, cost.unit) == (0.11, 0.49, "USD per TFLOP-hour")
    assert CLAIMS[-1].ratio == 3.2 and CLAIMS[-1].direction == "higher"


# --------------------------------------------------------------------------------------------
# report


def _write(path: Path, run: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run))


def test_load_runs(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_runs(tmp_path)
    _write(tmp_path / "mtor" / "run.json", mtor_run())
    _write(tmp_path / "cloud" / "run.json", cloud_run())
    assert set(load_runs(tmp_path)) == {"mtor", "cloud"}
    single = tmp_path / "single"
    _write(single / "run.json", mtor_run())
    assert list(load_runs(single)) == ["mtor"]
    _write(single / "again" / "run.json", mtor_run())
    with pytest.raises(ValueError, match="two runs"):
        load_runs(single)


def test_write_report(tmp_path):
    _write(tmp_path / "runs" / "mtor" / "run.json", mtor_run())
    _write(tmp_path / "runs" / "cloud" / "run.json", cloud_run())
    out = tmp_path / "out"
    report = write_report(out, load_runs(tmp_path / "runs"))
    assert report == out / "report.md"
    text = report.read_text()
    assert "scenario `unit`, seed 7" in text
    assert "**holds**" in text and "**does not hold**" in text and "**not comparable**" in text
    assert "| WEU | 3 |" in text  # per-region row: MTOR's three WEU requests
    assert "RTX 3090" in text  # device mix read from the run
    assert "generic" in text
    doc = json.loads((out / "metrics.json").read_text())
    assert set(doc) >= {"mtor", "cloud", "comparison", "claims"}
    assert doc["comparison"]["cost_usd_per_tflop_hour"] == pytest.approx(0.09)
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 4
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 1000
        assert f"]({png.name})" in text


def test_a_report_of_two_scenarios_names_both(tmp_path):
    cloud = {**cloud_run(), "scenario": "unit-cloud"}
    report = write_report(tmp_path, {"mtor": mtor_run(), "cloud": cloud})
    assert "scenarios `unit`, `unit-cloud`, seed 7" in report.read_text()


def test_write_report_single_empty_run(tmp_path):
    run = {"kind": "mtor", "scenario": "empty", "seed": 0, "peers": 0}
    report = write_report(tmp_path, {"mtor": run})
    assert "n/a" in report.read_text()
    assert len(list(tmp_path.glob("*.png"))) == 4
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["comparison"] == {} and doc["claims"][0]["verdict"] == NOT_COMPARABLE


def test_failed_requests_are_counted_by_reason():
    from mtor_p2p.sim.metrics import failure_reasons

    requests = [
        {"ok": True},
        {"ok": False, "error": "job did not finish within 30 s; workers out: 2 failed"},
        {"ok": False, "error": "job did not finish within 30 s; workers out: 1 unreachable"},
        {"ok": False, "error": "no worker in the capacity view serves 'matmul' (3 in view)"},
        {"ok": False},
    ]
    assert failure_reasons(requests) == {
        "job did not finish within 30 s": 2,
        "no worker in the capacity view serves 'matmul'": 1,
        "no error recorded": 1,
    }
