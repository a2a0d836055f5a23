"""``mtor-sim``: run MTOR's real peer code at scale on virtual time, and report on it.

Exit codes: 0 ok, 1 the run failed, 2 usage or scenario error, 3 nothing to report on.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from mtor_p2p import __version__
from mtor_p2p.sim.scenario import ScenarioError, load_scenario, parse_value

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NO_RUNS = 3

#: Metrics a sweep summarises (mean and 95% interval over seeds), by dotted key.
SWEEP_KEYS = (
    "latency_ms.p50",
    "latency_ms.p99",
    "cost_usd_per_tflop_hour",
    "utilisation",
    "recovery_s.p50",
    "co2_g_per_pflop",
    "under_100ms_share",
)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in args.set or []:
        if "=" not in item:
            raise ScenarioError(f"--set wants KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = parse_value(value.strip())
    for key in ("peers", "hours", "seed"):
        value = getattr(args, key, None)
        if value is not None:
            overrides[key] = value
    return overrides


def cmd_run(args: argparse.Namespace) -> int:
    """Run one scenario; write run.json, metrics, plots and the report."""
    from mtor_p2p.sim.report import write_report
    from mtor_p2p.sim.runner import ProgressBar, run_scenario, write_run

    scenario = load_scenario(args.scenario, _overrides(args))
    out = Path(args.out or f"sim-out/{scenario.name}")
    bar = ProgressBar(scenario.duration, enabled=not args.json and not args.quiet)
    if not args.json:
        print(
            f"mtor-sim: {scenario.name} ({scenario.kind}), {scenario.peers} peers, "
            f"{scenario.hours:g} h, seed {scenario.seed}",
            file=sys.stderr,
        )
    try:
        record = run_scenario(scenario, progress=bar)
    finally:
        bar.close()
    path = write_run(record, out)
    report = write_report(out, _load(out))
    summary = {
        "run": str(path),
        "report": str(report),
        "kind": record["kind"],
        "peers": record["peers"],
        "wall_seconds": record["wall_seconds"],
        "events": record["events"],
        "events_per_s": record["events_per_s"],
        "requests": len(record["requests"]),
        "requests_ok": sum(1 for r in record["requests"] if r["ok"]),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"done in {record['wall_seconds']:.0f} s wall ({record['events_per_s']:,.0f} events/s):"
            f" {summary['requests_ok']}/{summary['requests']} requests ok\n"
            f"run:    {path}\nreport: {report}"
        )
    return EXIT_OK


def _load(out: Path) -> dict[str, dict[str, Any]]:
    from mtor_p2p.sim.report import load_runs

    return load_runs(out)


def cmd_report(args: argparse.Namespace) -> int:
    """(Re)write the report of the runs in a directory."""
    from mtor_p2p.sim.report import write_report

    out = Path(args.dir)
    try:
        runs = _load(out) if out.is_dir() else {}
    except FileNotFoundError:
        runs = {}
    except ValueError as exc:  # two runs of one kind: say which
        print(f"mtor-sim: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not runs:
        print(f"mtor-sim: error: no run.json under {out}", file=sys.stderr)
        return EXIT_NO_RUNS
    report = write_report(out, runs)
    if args.json:
        print(json.dumps(json.loads((out / "metrics.json").read_text()), indent=2))
    else:
        print(report)
    return EXIT_OK


#: Two-sided 95% quantiles of Student's t for 1-30 degrees of freedom (standard tables).
_T95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def _t95(degrees: int) -> float:
    return _T95[degrees - 1] if degrees <= len(_T95) else 1.96


def _dig(metrics: dict[str, Any], dotted: str) -> float | None:
    value: Any = metrics
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def summarise_sweep(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per parameter combination: mean and a 95% interval over seeds of the main metrics."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        point = {k: v for k, v in result["point"].items() if k != "seed"}
        groups.setdefault(json.dumps(point, sort_keys=True), []).append(result)
    rows = []
    for key, members in sorted(groups.items()):
        row: dict[str, Any] = {"params": json.loads(key), "seeds": len(members)}
        for metric in SWEEP_KEYS:
            values = [v for m in members if (v := _dig(m["metrics"], metric)) is not None]
            if not values:
                row[metric] = None
                continue
            mean = statistics.fmean(values)
            # Student's t: with a handful of seeds the normal 1.96 would be far too narrow.
            half = (
                _t95(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
                if len(values) > 1
                else None
            )
            row[metric] = {"mean": mean, "ci95": half, "n": len(values)}
        rows.append(row)
    return rows


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run a scenario over parameter values and seeds, in parallel."""
    from mtor_p2p.sim.runner import run_sweep

    params: dict[str, list[Any]] = {}
    for item in args.param or []:
        if "=" not in item:
            raise ScenarioError(f"--param wants NAME=V1,V2,..., got {item!r}")
        name, values = item.split("=", 1)
        params[name.strip()] = [parse_value(v.strip()) for v in values.split(",") if v.strip()]
    for key in ("peers", "hours"):
        value = getattr(args, key)
        if value is not None:
            params.setdefault(key, [value])
    if args.seeds < 1:
        raise ScenarioError("--seeds must be at least 1")
    if args.workers is not None and args.workers < 1:
        raise ScenarioError("--workers must be at least 1")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    out = Path(args.out or f"sim-out/sweep-{Path(args.scenario).stem}")
    total = max(1, math.prod(len(v) for v in params.values()) * len(seeds))
    done = 0

    def on_done(result: dict[str, Any]) -> None:
        nonlocal done
        done += 1
        if not args.json:
            print(f"[{done}/{total}] {result['folder']}", file=sys.stderr, flush=True)

    results = run_sweep(
        Path(args.scenario),
        params,
        seeds,
        out,
        workers=args.workers,
        ray_address=args.ray,
        on_done=on_done,
    )
    summary = summarise_sweep(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(summary, indent=2))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for row in summary:
            cells = []
            for metric in SWEEP_KEYS:
                value = row[metric]
                if value is None:
                    continue
                ci = f" (95% CI ±{value['ci95']:.3g})" if value["ci95"] is not None else ""
                cells.append(f"{metric}={value['mean']:.4g}{ci}")
            print(f"{json.dumps(row['params'])} n={row['seeds']}: " + ", ".join(cells))
        print(f"summary: {out / 'sweep.json'}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The ``mtor-sim`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="mtor-sim",
        description=(
            "Run MTOR's real peer code (capacity, scheduler, worker, ledger) on an in-memory "
            "network and virtual time, at 1,000+ peers in 14 world regions, and report cost "
            "per TFLOP, latency, fault recovery, carbon and utilisation against a cloud "
            "baseline. Start with: mtor-sim run simulations/smoke.toml"
        ),
        epilog="Exit codes: 0 ok, 1 run failed, 2 usage or scenario error, 3 no runs to report.",
    )
    parser.add_argument("--version", action="version", version=f"mtor-sim {__version__}")
    parser.add_argument(
        "--log-level", default="error", help="log level of the simulated peers (default: error)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "run",
        help="run one scenario",
        description=(
            "Run a scenario file and write OUT/<kind>/run.json, OUT/metrics.json, "
            "OUT/report.md and PNG plots. Run the MTOR scenario and the cloud baseline "
            "with the same --out to get them side by side in one report."
        ),
    )
    p.add_argument("scenario", help="scenario TOML file (see simulations/)")
    p.add_argument(
        "--peers",
        type=int,
        help="number of peers (overrides the scenario; a cloud run sizes itself from [cloud])",
    )
    p.add_argument("--hours", type=float, help="simulated hours (overrides the scenario)")
    p.add_argument("--seed", type=int, help="random seed (same seed, same run)")
    p.add_argument("--out", help="output directory (default: sim-out/<scenario name>)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any scenario key by dotted path, e.g. workload.batch.rate=0.5",
    )
    p.add_argument("--json", action="store_true", help="print a JSON summary, no progress bar")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "report",
        help="rewrite the report of a run directory",
        description="Compute metrics, plots and report.md from the run.json files under DIR.",
    )
    p.add_argument("dir", help="a run directory (holding mtor/run.json and/or cloud/run.json)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "sweep",
        help="run a scenario over parameter values and seeds in parallel",
        description=(
            "Run every combination of --param values for --seeds seeds each, on local "
            "processes (or a Ray cluster with --ray), and summarise mean and 95% interval "
            "per combination in OUT/sweep.json."
        ),
    )
    p.add_argument("scenario", help="scenario TOML file")
    p.add_argument(
        "--param",
        action="append",
        metavar="NAME=V1,V2,...",
        help="a scenario key (dotted path) and the values to try; repeat for a grid",
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds per combination (default 3)")
    p.add_argument("--first-seed", type=int, default=1, help="first seed (default 1)")
    p.add_argument("--peers", type=int, help="number of peers for every run")
    p.add_argument("--hours", type=float, help="simulated hours for every run")
    p.add_argument("--workers", type=int, help="local processes (default: the CPU count)")
    p.add_argument("--ray", metavar="ADDRESS", help="run on a Ray cluster (needs mtor-p2p[ray])")
    p.add_argument("--out", help="output directory (default: sim-out/sweep-<scenario>)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_sweep)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mtor-sim``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.ERROR),
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("mtor_p2p").setLevel(
        getattr(logging, str(args.log_level).upper(), logging.ERROR)
    )
    try:
        return int(args.func(args))
    except ScenarioError as exc:
        print(f"mtor-sim: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("mtor-sim: interrupted", file=sys.stderr)
        return EXIT_FAILURE
    except BaseExceptionGroup as group:  # trio wraps a Ctrl-C that lands inside the run
        if group.subgroup(KeyboardInterrupt) is not None:
            print("mtor-sim: interrupted", file=sys.stderr)
            return EXIT_FAILURE
        raise


if __name__ == "__main__":
    sys.exit(main())
