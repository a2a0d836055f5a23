"""A Markdown report comparing an MTOR run with a cloud-baseline run, plus ``metrics.json``.

Usage: ``python -m mtor_p2p.sim.report RUN_DIR [OUT_DIR]``. ``RUN_DIR`` holds ``run.json`` or
``mtor/run.json`` and ``cloud/run.json``; the report, its metrics and its plots go to
``OUT_DIR`` (default ``RUN_DIR``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mtor_p2p.sim.metrics import (
    CLAIMS,
    COST_PARTS,
    KINDS,
    MAX_GRID_KG_PER_KWH,
    REQUESTER,
    assess_claims,
    claims_as_data,
    compare,
    compute_metrics,
    metric_value,
)
from mtor_p2p.sim.plots import (
    COST,
    COST_LABELS,
    LABELS,
    LATENCY_CDF,
    RECOVERY,
    TIMESERIES,
    write_plots,
)

Run = Mapping[str, Any]
NA = "n/a"
PLOT_CAPTIONS = {
    LATENCY_CDF: "Interactive latency per region (CDF, log ms; dotted: 100 and 150 ms)",
    TIMESERIES: "Market price and busy share of online peers over time",
    RECOVERY: "Fault recovery time (CDF, log s)",
    COST: "Cost per useful TFLOP-hour, by where the money went",
}


def load_runs(directory: Path) -> dict[str, dict[str, Any]]:
    """The runs under ``directory`` keyed by their ``kind``.

    Reads ``directory/run.json`` and ``directory/*/run.json`` (e.g. ``mtor/run.json`` and
    ``cloud/run.json``). Raises FileNotFoundError when there is none and ValueError when two
    files hold the same kind.
    """
    directory = Path(directory)
    paths = [directory / "run.json"] if (directory / "run.json").is_file() else []
    paths += sorted(directory.glob("*/run.json"))
    if not paths:
        raise FileNotFoundError(f"no run.json in {directory} or its subdirectories")
    runs: dict[str, dict[str, Any]] = {}
    sources: dict[str, Path] = {}
    for path in paths:
        run = json.loads(path.read_text())
        kind = run.get("kind")
        if kind in runs:
            raise ValueError(f"two runs of kind {kind!r}: {sources[kind]} and {path}")
        runs[kind] = run
        sources[kind] = path
    return runs


def _jsonable(value: Any) -> Any:
    """``value`` with non-finite floats as None: strict JSON has no NaN or infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# formatting


def _num(value: Any, spec: str = ".3g") -> str:
    return NA if value is None else format(value, spec)


def _pct(value: Any) -> str:
    return NA if value is None else f"{100 * value:.1f}%"


def _yes(value: Any) -> str:
    return NA if value is None else ("yes" if value else "NO")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _claim_value(value: Any, unit: str) -> str:
    """A value in the claims table, whose unit is in the claim's column: shares as %."""
    return _pct(value) if unit == "share" else _num(value)


def _claimed_text(claim: Mapping[str, Any]) -> str:
    unit, claimed = claim["unit"], claim["claimed"]
    if claimed["mtor"] is not None and claimed["cloud"] is not None:
        return (
            f"{_claim_value(claimed['mtor'], unit)} vs {_claim_value(claimed['cloud'], unit)}"
            f" (ratio {claimed['ratio']:.3g})"
        )
    bound = "≤" if claim["direction"] == "lower" else "≥"
    if claimed["mtor"] is not None:
        return f"MTOR {bound} {_claim_value(claimed['mtor'], unit)}"
    return f"MTOR/cloud {bound} {claimed['ratio']:.3g}"


# --------------------------------------------------------------------------------------------
# sections


def _header(runs: Mapping[str, Run], metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    # Every run's own scenario: a thesis and its cloud baseline run into one directory are
    # two scenarios (a new user's walkthrough: the title named only the one loaded first).
    named = [runs[k] for k in KINDS if k in runs]
    scenarios = ", ".join(dict.fromkeys(f"`{r.get('scenario')}`" for r in named))
    seeds = ", ".join(dict.fromkeys(str(r.get("seed")) for r in named))
    noun = "scenarios" if len({r.get("scenario") for r in named}) > 1 else "scenario"
    lines = [
        f"# MTOR simulation report: {noun} {scenarios}, seed {seeds}",
        "",
        "Every figure below is computed from the simulator's records (`run.json`) by "
        "`mtor_p2p.sim.metrics`; the same numbers are in `metrics.json`.",
        "",
    ]
    kinds = [k for k in KINDS if k in runs]
    rows = []
    fields: list[tuple[str, Callable[[str], str]]] = [
        ("peers", lambda k: str(runs[k].get("peers"))),
        ("simulated hours", lambda k: _num(runs[k].get("hours"))),
        ("FLOP scale", lambda k: _num(runs[k].get("flop_scale"), "g")),
        ("simulator wall time (s)", lambda k: _num(metrics[k]["simulator"]["wall_seconds"])),
        ("events", lambda k: str(metrics[k]["simulator"]["events"])),
        ("events per wall second", lambda k: _num(metrics[k]["simulator"]["events_per_s"])),
        (
            "simulated s per wall s",
            lambda k: _num(metrics[k]["simulator"]["simulated_s_per_wall_s"]),
        ),
    ]
    for label, cell in fields:
        rows.append([label, *(cell(k) for k in kinds)])
    return [*lines, *_table(["", *(LABELS[k] for k in kinds)], rows), ""]


def _claims_section(claims: Sequence[Mapping[str, Any]]) -> list[str]:
    rows, why = [], []
    for i, claim in enumerate(claims, 1):
        unit, measured = claim["unit"], claim["measured"]
        label = claim["claim"] if unit == "share" else f"{claim['claim']} ({unit})"
        rows.append(
            [
                f"{label} [{i}]",
                _claim_value(measured["mtor"], unit),
                _claim_value(measured["cloud"], unit),
                _num(measured["ratio"]),
                _claimed_text(claim),
                f"**{claim['verdict']}**",
            ]
        )
        why.append(f"{i}. {claim['why']}")
    notes = [f"- {c.text}: {c.note} (metric `{c.metric}`)." for c in CLAIMS if c.note]
    return [
        "## The seed's claims",
        "",
        "A claim holds when the measured MTOR value is at least as good as the claimed one "
        "and, for a claim against the cloud, when MTOR's measured advantage (the ratio "
        "MTOR/cloud) is at least the claimed one.",
        "",
        *_table(["Claim", "MTOR", "cloud", "ratio (MTOR/cloud)", "claimed", "verdict"], rows),
        "",
        *why,
        "",
        "How each claim is read:",
        "",
        *notes,
        f'- A "kg/kWh" figure here is the energy-weighted grid intensity of the electricity '
        f"used (CO2 / energy); no grid exceeds about {MAX_GRID_KG_PER_KWH} kg/kWh, so a larger "
        "claimed figure cannot be that. Emissions per unit of work are in g CO2 per PFLOP.",
        "",
    ]


def _all_metrics(metrics: Mapping[str, Mapping[str, Any]], ratios: Mapping[str, Any]) -> list[str]:
    rows_spec: list[tuple[str, str, Callable[[Any], str], str | None]] = [
        (
            "cost (USD per useful TFLOP-hour)",
            "cost_usd_per_tflop_hour",
            _num,
            "cost_usd_per_tflop_hour",
        ),
        ("total cost (USD)", "cost_usd", _num, None),
        ("useful TFLOP-hours", "useful_tflop_hours", _num, None),
    ]
    rows_spec += [
        (
            f"cost, {COST_LABELS[part]} (USD/TFLOP-h)",
            f"cost_breakdown_per_tflop_hour.{part}",
            _num,
            None,
        )
        for part in COST_PARTS
    ]
    rows_spec += [
        ("interactive latency p50 (ms)", "latency_ms.p50", _num, "latency_p50_ms"),
        ("interactive latency p95 (ms)", "latency_ms.p95", _num, "latency_p95_ms"),
        ("interactive latency p99 (ms)", "latency_ms.p99", _num, "latency_p99_ms"),
        ("interactive latency mean (ms)", "latency_ms.mean", _num, None),
        ("successful interactive requests", "latency_ms.count", str, None),
        ("batch latency p50 (s)", "batch_latency_s.p50", _num, None),
        ("batch latency p95 (s)", "batch_latency_s.p95", _num, None),
        ("batch latency p99 (s)", "batch_latency_s.p99", _num, None),
        ("success rate, interactive", "success_rate.interactive", _pct, None),
        ("success rate, batch", "success_rate.batch", _pct, None),
        ("interactive under 100 ms", "under_100ms_share", _pct, None),
        ("interactive under 150 ms", "under_150ms_share", _pct, None),
        ("regions populated", "regions_populated", str, None),
        (
            "regions with ≥95% under 150 ms",
            "share_of_regions_where_p_under_150_ge_0_95",
            _pct,
            None,
        ),
        (
            "regions with ≥50% under 150 ms",
            "share_of_regions_where_p_under_150_ge_0_50",
            _pct,
            None,
        ),
        ("recovery p50 (s)", "recovery_s.p50", _num, "recovery_p50_s"),
        ("recovery p95 (s)", "recovery_s.p95", _num, None),
        ("recovery max (s)", "recovery_s.max", _num, None),
        ("recoveries", "recovery_s.count", str, None),
        ("energy (kWh)", "energy_kwh", _num, None),
        ("CO2 (kg)", "co2_kg", _num, None),
        ("CO2 per kWh (kg/kWh, grid mix)", "co2_kg_per_kwh", _num, "co2_kg_per_kwh"),
        ("CO2 per useful PFLOP (g)", "co2_g_per_pflop", _num, "co2_g_per_pflop"),
        ("utilisation (busy / online)", "utilisation", _pct, "utilisation"),
        ("useful utilisation", "useful_utilisation", _pct, "useful_utilisation"),
        ("requests: total", "requests.total", str, None),
        ("requests: ok", "requests.ok", str, None),
        ("requests: failed", "requests.failed", str, None),
        ("requests: still running at the end (left out)", "requests.unfinished", str, None),
        ("requests: reissued shards", "requests.reissued", str, None),
        ("requests: rejected shards", "requests.rejected", str, None),
        ("requests: hedged shards", "requests.hedged", str, None),
    ]
    shard_outcomes: list[str] = []
    for kind_metrics in metrics.values():
        shard_outcomes += [k for k in kind_metrics["shards"] if k not in shard_outcomes]
    rows_spec += [(f"shard attempts: {o}", f"shards.{o}", str, None) for o in shard_outcomes]

    def cell(kind: str, key: str, fmt: Callable[[Any], str]) -> str:
        value = metric_value(metrics.get(kind), key)
        return NA if value is None else fmt(value)

    rows = [
        [label, cell("mtor", key, fmt), cell("cloud", key, fmt), _num(ratios.get(ratio_key))]
        if ratio_key
        else [label, cell("mtor", key, fmt), cell("cloud", key, fmt), ""]
        for label, key, fmt, ratio_key in rows_spec
    ]
    return ["## All metrics", "", *_table(["metric", "MTOR", "cloud", "MTOR/cloud"], rows), ""]


def _regions_section(
    runs: Mapping[str, Run], metrics: Mapping[str, Mapping[str, Any]]
) -> list[str]:
    kinds = [k for k in KINDS if k in metrics]
    order: list[str] = []
    for kind in kinds:
        order += [r for r in runs[kind].get("regions") or () if r not in order]
        order += [r for r in metrics[kind]["per_region"] if r not in order]
    header = ["region"]
    for kind in kinds:
        header += [f"{LABELS[kind]} n", "p50 ms", "p95 ms", "<100 ms", "<150 ms"]
    rows = []
    for region in order:
        row = [region]
        populated = False
        for kind in kinds:
            stats = metrics[kind]["per_region"].get(region)
            if stats is None:
                row += ["0", NA, NA, NA, NA]
                continue
            populated = True
            row += [
                str(stats["count"]),
                _num(stats["p50"]),
                _num(stats["p95"]),
                _pct(stats["under_100"]),
                _pct(stats["under_150"]),
            ]
        if populated:
            rows.append(row)
    return [
        "## Interactive requests per region",
        "",
        "By the requester's region. n counts every interactive request; percentiles are over "
        "the successful ones; the shares under 100 and 150 ms count a failed request as not "
        "under.",
        "",
        *(_table(header, rows) if rows else ["No interactive requests."]),
        "",
    ]


def _trust_section(metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    lines = ["## Trust and ledger", ""]
    for kind in (k for k in KINDS if k in metrics):
        trust, ledger = metrics[kind]["trust"], metrics[kind]["ledger"]
        if any(v is not None for v in trust.values()):
            lines.append(
                f"- {LABELS[kind]} trust: cheaters {trust['cheaters']}, caught "
                f"{trust['cheaters_caught']} ({_pct(trust['catch_rate'])}); wrong results "
                f"accepted: {trust['wrong_accepted']}; fault proofs: {trust['fault_proofs']}; "
                f"slashed: {trust['slashed']}."
            )
        if any(v is not None for v in ledger.values()):
            lines.append(
                f"- {LABELS[kind]} ledger: supply conserved: {_yes(ledger['conserved'])}; "
                f"{ledger['replicas']} replicas agree: {_yes(ledger['agree'])}; "
                f"{ledger['receipts']} receipts paid {_num(ledger['credits_paid'])} credits; "
                f"supply {_num(ledger['supply'])}, total {_num(ledger['total'])}, burned "
                f"{_num(ledger['burned'])} (nano-credits)."
            )
        if not any(v is not None for v in (*trust.values(), *ledger.values())):
            lines.append(f"- {LABELS[kind]}: the run carries no trust or ledger records.")
    return [*lines, ""]


def _failures_section(metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Why requests failed, by reason (their full errors are in each run.json)."""
    lines: list[str] = []
    for kind in (k for k in KINDS if k in metrics):
        reasons = metrics[kind]["requests"].get("failure_reasons") or {}
        if reasons:
            lines.append(f"- {LABELS[kind]}:")
            lines += [f"  - {count} x {reason}" for reason, count in reasons.items()]
    if not lines:
        return []
    return ["## Why requests failed", "", *lines, "", "The whole errors: `run.json`.", ""]


def _spread(values: Sequence[float], spec: str = ".3g") -> str:
    if not values:
        return NA
    lo, mid, hi = min(values), statistics.median(values), max(values)
    if lo == hi:
        return f"{lo:{spec}}"
    return f"{lo:{spec}}–{hi:{spec}} (median {mid:{spec}})"


def _assumptions(runs: Mapping[str, Run]) -> list[str]:
    kinds = [k for k in KINDS if k in runs]
    workers = {
        k: [p for p in runs[k].get("peers_info") or () if p.get("role") != REQUESTER] for k in kinds
    }
    lines = [
        "## Assumptions behind the figures",
        "",
        "Read from the runs:",
        "",
    ]
    # Device mix: what each kind computes on, at what speed, price and power.
    gpus: list[str] = []
    for kind in kinds:
        for peer in workers[kind]:
            if str(peer.get("gpu")) not in gpus:
                gpus.append(str(peer.get("gpu")))
    counts = {k: Counter(str(p.get("gpu")) for p in workers[k]) for k in kinds}
    rows = []
    for gpu in gpus:
        same = [p for k in kinds for p in workers[k] if str(p.get("gpu")) == gpu]
        rows.append(
            [
                gpu,
                *(str(counts[k][gpu]) for k in kinds),
                _spread([float(p.get("tflops") or 0) for p in same]),
                _spread([float(p.get("usd_per_hour") or 0) for p in same]),
                _spread([float(p.get("power_w") or 0) for p in same], ".0f"),
            ]
        )
    lines += [
        "Device mix (workers):",
        "",
        *_table(
            ["GPU", *(f"{LABELS[k]} workers" for k in kinds), "TFLOPS", "USD/hour", "power W"], rows
        ),
        "",
    ]
    for kind in kinds:
        run = runs[kind]
        peers = run.get("peers_info") or ()
        roles = Counter(str(p.get("role")) for p in peers)
        role_text = ", ".join(f"{n} {role}" for role, n in sorted(roles.items()))
        verification = run.get("verification") or {}
        causes = Counter(str(r.get("cause")) for r in run.get("recoveries") or ())
        cause_text = ", ".join(f"{n} {c}" for c, n in sorted(causes.items())) or "none"
        lines += [
            f"- {LABELS[kind]}: {len(peers)} peers ({role_text}); worker prices "
            f"{_spread([float(p.get('usd_per_hour') or 0) for p in workers[kind]])} USD/hour; "
            f"PUE {_spread([float(p.get('pue') or 1.0) for p in peers])}; grid intensity "
            f"{_spread([float(p.get('g_co2_per_kwh') or 0) for p in peers], '.0f')} g/kWh; "
            f"FLOPs declared at scale {run.get('flop_scale')}; verification "
            f"{_num(verification.get('seconds'))} s over {verification.get('checks')} checks; "
            f"recovery causes: {cause_text}."
        ]
    lines += [
        "",
        "How each figure is computed:",
        "",
        "- Cost per TFLOP-hour: total cost / (useful FLOPs / 3.6e15); useful FLOPs are the "
        "declared FLOPs of successful requests. MTOR pays each worker for the device-seconds "
        "of every shard attempt at its USD/hour, wasted and redundant attempts included; the "
        "cloud pays every provisioned instance for every online second, idle included. "
        "Verification seconds are valued at the median worker price in both.",
        "- Cost breakdown: useful = first accepted attempt of each shard of a successful "
        "request; redundant = later accepted copies and cancelled (hedged) attempts; wasted = "
        "failed, rejected and timed-out attempts and the work of requests that failed; idle = "
        "cloud billing not covered by any attempt.",
        "- Latency: the simulator's per-request latency (submission to result). Interactive "
        "figures are in ms over successful interactive requests; shares under 100/150 ms "
        "count failures as not under.",
        "- Recovery: from a shard's failure to the acceptance of its replacement.",
        "- Energy: busy seconds × power × PUE. MTOR counts only the marginal energy of the work "
        "(an owner's idle machine is not MTOR's); the cloud also counts idle power for every "
        "online second of its instances.",
        "- CO2: each peer's energy × its region's grid intensity; kg/kWh is CO2 / energy (the "
        "energy-weighted grid intensity); g per PFLOP divides by useful FLOPs.",
        "- Utilisation: busy seconds / online seconds over workers; useful utilisation counts "
        "only useful attempts' device-seconds.",
        "",
        "Not carried by the runs (generic, not read from the data):",
        "",
        "- Prices, power figures and grid intensities are the simulator's configured inputs; "
        "the run records their values per peer but not their sources. The repository's "
        "`simulations/data/SOURCES.md` and the scenario file say where they come from and "
        "which of them are assumptions.",
        "- Network delays, failure and churn rates and adversary behaviour are modelled by the "
        "simulator; this report sees only their outcomes.",
        "",
    ]
    return lines


def _plots_section(paths: Sequence[Path], out_dir: Path) -> list[str]:
    lines = ["## Plots", ""]
    for path in paths:
        caption = PLOT_CAPTIONS.get(path.name, path.stem)
        lines += [f"![{caption}]({path.relative_to(out_dir).as_posix()})", ""]
    return lines


def _workload_warning(runs: Mapping[str, Run]) -> list[str]:
    """A warning when the MTOR and cloud runs did not serve the same workload and window."""
    if len(runs) < 2:
        return []
    configs = {k: (r.get("config") or {}) for k, r in runs.items()}
    workloads = {k: _without_verify(c.get("workload")) for k, c in configs.items()}
    hours = {k: r.get("hours") for k, r in runs.items()}
    if len(set(map(json.dumps, workloads.values()))) == 1 and len(set(hours.values())) == 1:
        return []
    return [
        "> **Warning: these runs are not comparable.** The MTOR and cloud runs served "
        "different workloads or ran for different times (compare their `[workload]` tables "
        "and hours); run both from scenarios with the same workload, or read the two columns "
        "separately.",
        "",
    ]


def _without_verify(workloads: Any) -> Any:
    # The cloud trusts its machines (verify = "none"): that difference is the point.
    if not isinstance(workloads, dict):
        return workloads
    return {
        name: {k: v for k, v in table.items() if k != "verify"}
        if isinstance(table, dict)
        else table
        for name, table in workloads.items()
    }


def write_report(out_dir: Path, runs: Mapping[str, Run]) -> Path:
    """Write ``metrics.json``, the plots and ``report.md`` for ``runs`` into ``out_dir``.

    ``runs`` maps a kind ("mtor", "cloud") to its run; either may be missing (the comparison
    and the claims against the cloud are then n/a). Returns the path of ``report.md``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unknown = set(runs) - set(KINDS)
    if unknown or not runs:
        raise ValueError(f"runs must be keyed by {KINDS}, got {sorted(runs)}")
    metrics = {k: compute_metrics(runs[k]) for k in KINDS if k in runs}
    ratios = compare(metrics["mtor"], metrics["cloud"]) if len(metrics) == 2 else {}
    claims = assess_claims(metrics["mtor"], metrics.get("cloud")) if "mtor" in metrics else []
    document = {**metrics, "comparison": ratios, "claims": claims, "claim_specs": claims_as_data()}
    (out_dir / "metrics.json").write_text(
        json.dumps(_jsonable(document), indent=2, allow_nan=False) + "\n"
    )
    plots = write_plots(out_dir, runs, metrics)
    lines = _header(runs, metrics)
    lines += _workload_warning(runs)
    lines += _claims_section(claims) if claims else ["No MTOR run: no claims to assess.", ""]
    lines += _all_metrics(metrics, ratios)
    lines += _regions_section(runs, metrics)
    lines += _trust_section(metrics)
    lines += _failures_section(metrics)
    lines += _assumptions(runs)
    lines += _plots_section(plots, out_dir)
    report = out_dir / "report.md"
    report.write_text("\n".join(lines).rstrip() + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m mtor_p2p.sim.report RUN_DIR [OUT_DIR]``: write the report of a run directory."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out_dir", type=Path, nargs="?")
    args = parser.parse_args(argv)
    print(write_report(args.out_dir or args.run_dir, load_runs(args.run_dir)))


if __name__ == "__main__":
    main()
