"""PNG plots of simulated runs: latency per region, price and utilisation, recovery, cost.

Figures are built with matplotlib's object API on the Agg canvas, never through pyplot, so
plotting works headless and leaves no global state (no backend switch, no open figures).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps, ticker
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mtor_p2p.sim.metrics import COST_PARTS, INTERACTIVE, KINDS, ok_latencies_s, recovery_times_s

DPI = 110
LABELS = {"mtor": "MTOR", "cloud": "cloud"}
COLOURS = {"mtor": "tab:blue", "cloud": "tab:orange"}
REGION_COLOURS = colormaps["tab20"]
COST_LABELS = {
    "useful_compute": "useful compute",
    "wasted_compute": "wasted compute",
    "redundant": "redundant / hedged copies",
    "verification": "verification",
    "idle_billed": "idle (billed)",
}

LATENCY_CDF = "latency_cdf.png"
TIMESERIES = "price_utilisation.png"
RECOVERY = "recovery.png"
COST = "cost_breakdown.png"


def _region_colour(i: int) -> Any:
    """A distinct colour per region line.

    14 regions outrun the default 10-colour cycle. tab20 comes in dark/light pairs, so the dark
    shades go first (ten distinct hues) and the light ones after, for regions 11 to 20.
    """
    i %= 20
    return REGION_COLOURS(2 * i if i < 10 else 2 * (i - 10) + 1)


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


def _no_data(ax: Axes, what: str = "no data") -> None:
    ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes, color="grey")


def _cdf(ax: Axes, values: Sequence[float], **kwargs: Any) -> None:
    """An empirical CDF as a step line, rising from 0 at the smallest value.

    Starting at 0 keeps a one-value sample visible (a vertical step) instead of a lone point.
    """
    xs = np.sort(np.asarray(values, dtype=float))
    ys = np.arange(1, len(xs) + 1) / len(xs)
    ax.step(np.r_[xs[0], xs], np.r_[0.0, ys], where="post", **kwargs)


def _log_x(ax: Axes) -> None:
    """Log x axis labelled in plain numbers (60, 100, 200) rather than 6x10^1.

    Minor ticks at 2 and 5 are labelled only when the axis spans few decades, where the
    decade ticks alone would leave it (almost) unlabelled; wider axes would crowd.
    """
    ax.set_xscale("log")
    plain = ticker.FuncFormatter(lambda v, _pos: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    lo, hi = ax.get_xlim()
    if lo > 0 and hi / lo <= 1e3:
        ax.xaxis.set_minor_formatter(
            ticker.FuncFormatter(lambda v, _pos: f"{v:g}" if _mantissa(v) in (2, 5) else "")
        )
        ax.tick_params(axis="x", which="minor", labelsize=7)
    else:
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())


def _mantissa(value: float) -> int:
    """The leading digit of a positive tick value (2 for 0.2, 20, 200)."""
    return round(value / 10 ** np.floor(np.log10(value)))


def _positive(values: Sequence[float]) -> list[float]:
    # A log axis cannot show zero; a zero latency or recovery would only be a modelling artefact.
    return [v for v in values if v > 0]


def plot_latency_cdf(path: Path, runs: Mapping[str, Mapping[str, Any]]) -> Path:
    """One panel per kind, one CDF line per region, of successful interactive latencies (ms)."""
    kinds = [k for k in KINDS if k in runs] or ["mtor"]
    fig = _figure(5.5 * len(kinds), 4.2)
    axes = fig.subplots(1, len(kinds), squeeze=False, sharey=True)[0]
    for ax, kind in zip(axes, kinds, strict=True):
        run = runs.get(kind) or {}
        interactive = [r for r in run.get("requests") or () if r.get("class") == INTERACTIVE]
        regions = list(run.get("regions") or ())
        regions += sorted({str(r.get("region")) for r in interactive} - set(regions))
        drawn = 0
        for region in regions:
            reqs = [r for r in interactive if r.get("region") == region]
            ms = _positive([1000.0 * v for v in ok_latencies_s(reqs)])
            if ms:
                colour = _region_colour(drawn)
                _cdf(ax, ms, label=f"{region} ({len(ms)})", linewidth=1.1, color=colour)
                drawn += 1
        for limit in (100, 150):
            ax.axvline(limit, color="grey", linestyle=":", linewidth=0.9)
        ax.set_title(f"{LABELS[kind]}: interactive latency by region")
        ax.set_xlabel("latency (ms, log scale)")
        ax.set_ylim(0, 1.02)
        ax.grid(True, which="both", alpha=0.3)
        if drawn:
            _log_x(ax)
            ax.legend(
                fontsize=6.5, ncol=2, loc="lower right", title="region (n ok)", title_fontsize=7
            )
        else:
            _no_data(ax, "no successful interactive requests")
    axes[0].set_ylabel("share of successful requests")
    return _save(fig, path)


def _series(samples: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(t in minutes, values) of the samples that carry ``key``."""
    pts = [(float(s["t"]), float(s[key])) for s in samples if s.get(key) is not None and "t" in s]
    if not pts:
        return np.array([]), np.array([])
    t, v = np.array(pts).T
    return t / 60.0, v


def _marker(t: np.ndarray) -> str | None:
    # A single sample draws no line: mark the point so that it shows.
    return "o" if len(t) == 1 else None


def plot_price_utilisation(path: Path, runs: Mapping[str, Mapping[str, Any]]) -> Path:
    """Market price (mean, p10-p90 band) and busy fraction of online peers over time."""
    fig = _figure(7.0, 5.5)
    price_ax, busy_ax = fig.subplots(2, 1, sharex=True)
    any_price = any_busy = False
    for kind in KINDS:
        samples = (runs.get(kind) or {}).get("samples") or ()
        colour, label = COLOURS[kind], LABELS[kind]
        t, mean = _series(samples, "price_mean")
        if len(t):
            any_price = True
            price_ax.plot(t, mean, color=colour, marker=_marker(t), label=f"{label} mean")
            t10, p10 = _series(samples, "price_p10")
            t90, p90 = _series(samples, "price_p90")
            if len(t10) == len(t90) == len(t) and len(t):
                price_ax.fill_between(
                    t, p10, p90, color=colour, alpha=0.2, label=f"{label} p10-p90"
                )
        t, busy = _series(samples, "busy_fraction")
        if len(t):
            any_busy = True
            busy_ax.plot(t, 100.0 * busy, color=colour, marker=_marker(t), label=label)
    price_ax.set_title("Market price over time")
    price_ax.set_ylabel("price (run's credit units)")
    busy_ax.set_title("Utilisation over time (busy share of online peers)")
    busy_ax.set_ylabel("busy (%)")
    busy_ax.set_xlabel("simulated time (min)")
    for ax, drawn in ((price_ax, any_price), (busy_ax, any_busy)):
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize=7)
        else:
            _no_data(ax)
    return _save(fig, path)


def plot_recovery(path: Path, runs: Mapping[str, Mapping[str, Any]]) -> Path:
    """CDF of fault-recovery times (shard failure to accepted replacement) per kind."""
    fig = _figure(6.0, 4.0)
    ax = fig.subplots()
    drawn = 0
    for kind in KINDS:
        times = _positive(recovery_times_s(runs.get(kind) or {}))
        if times:
            _cdf(ax, times, color=COLOURS[kind], label=f"{LABELS[kind]} (n={len(times)})")
            drawn += 1
    ax.set_title("Fault recovery: failure to accepted replacement")
    ax.set_xlabel("recovery time (s, log scale)")
    ax.set_ylabel("share of recoveries")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    if drawn:
        _log_x(ax)
        ax.legend(fontsize=8)
    else:
        _no_data(ax, "no recoveries")
    return _save(fig, path)


def plot_cost_breakdown(path: Path, metrics: Mapping[str, Mapping[str, Any]]) -> Path:
    """Stacked bars per kind: what one useful TFLOP-hour cost, split by where the money went."""
    fig = _figure(5.5, 4.2)
    ax = fig.subplots()
    kinds = [
        k for k in KINDS if k in metrics and metrics[k].get("cost_usd_per_tflop_hour") is not None
    ]
    x = np.arange(len(kinds))
    bottom = np.zeros(len(kinds))
    for part in COST_PARTS:
        heights = np.array(
            [metrics[k]["cost_breakdown_per_tflop_hour"].get(part) or 0.0 for k in kinds]
        )
        if len(kinds) and heights.any():
            ax.bar(x, heights, bottom=bottom, width=0.55, label=COST_LABELS[part])
            bottom += heights
    for xi, kind in zip(x, kinds, strict=True):
        total = metrics[kind]["cost_usd_per_tflop_hour"]
        ax.annotate(f"${total:.3g}", (xi, bottom[xi]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [LABELS[k] for k in kinds])
    ax.set_title("Cost per useful TFLOP-hour")
    ax.set_ylabel("USD per TFLOP-hour")
    ax.grid(True, axis="y", alpha=0.3)
    if kinds:
        ax.set_ylim(0, max(bottom.max(), 1e-12) * 1.15)
        ax.legend(fontsize=7)
    else:
        _no_data(ax, "no useful FLOPs")
    return _save(fig, path)


def write_plots(
    out_dir: Path, runs: Mapping[str, Mapping[str, Any]], metrics: Mapping[str, Mapping[str, Any]]
) -> list[Path]:
    """Write every plot of ``runs`` ({"mtor": run, "cloud": run}, either may be missing) and
    their ``metrics`` (same keys, from :func:`compute_metrics`) into ``out_dir``.

    Returns the PNG paths, in the order the report shows them. A plot without data is still
    written, with a "no data" note, so the report's links never dangle.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        plot_latency_cdf(out_dir / LATENCY_CDF, runs),
        plot_price_utilisation(out_dir / TIMESERIES, runs),
        plot_recovery(out_dir / RECOVERY, runs),
        plot_cost_breakdown(out_dir / COST, metrics),
    ]
