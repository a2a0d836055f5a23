"""The dashboard as an operator meets it: first paint, update latency, and what it costs the
node (issue 11). ``python -m benchmarks dashboard [--loads 5] [--seconds 30] [--json OUT]``

It starts a devnet of 3 peer processes (``mtor-peer devnet``) and a headless Chromium
(Debian's, through Selenium; ``tests/browser.py``), then measures on peer 0:

* **first paint**: from navigation to the first snapshot drawn (the page's own
  ``performance.now()`` on the animation frame after it rendered), over ``--loads`` fresh
  page loads, each with a new link. Baseline in the same run: the wall time of
  ``mtor-peer status --json``, the operator's way to see the same facts without the page.
* **update latency**: from the node sending a snapshot (its ``sent_at``) to the page having
  drawn it, for every snapshot during a job of many shards; the node sends one per ``tick``
  (1 s), so a change reaches the page within a tick plus this. Baseline in the same run:
  the wall time of ``mtor-peer jobs --json``, the way to follow a job without the page.
* **the node's cost**: peer 0's RSS and CPU share over ``--seconds`` while it runs the same
  job, with no page open and with the page open, interleaved ``--rounds`` times.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from benchmarks.machine import machine
from benchmarks.paths import user_path

ROOT = Path(__file__).resolve().parent.parent
JOB = ["--m", "4096", "--n", "256", "--k", "256", "--shards", "1024"]


def _mtor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mtor_p2p", *args],
        capture_output=True, text=True, timeout=300, check=False, cwd=ROOT,
    )  # fmt: skip


def _timed(*args: str) -> float:
    started = time.perf_counter()
    result = _mtor(*args)
    if result.returncode != 0:
        raise RuntimeError(f"mtor-peer {' '.join(args)}: {result.stderr[-500:]}")
    return (time.perf_counter() - started) * 1000


def _link(data_dir: str) -> str:
    result = _mtor("dashboard", "--json", "--data-dir", data_dir)
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    return json.loads(result.stdout)["url"]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _job_under_watch(data_dir: str, node: psutil.Process, seconds: float) -> dict[str, Any]:
    """Run the job (again and again) for ``seconds``; peer 0's RSS (max) and CPU seconds."""
    cpu_before = sum(node.cpu_times()[:2])
    rss = [node.memory_info().rss]
    started = time.monotonic()
    jobs = 0
    while time.monotonic() - started < seconds:
        submit = subprocess.Popen(
            [sys.executable, "-m", "mtor_p2p", "submit", "matmul", *JOB, "--json",
             "--data-dir", data_dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
        )  # fmt: skip
        while submit.poll() is None:
            rss.append(node.memory_info().rss)
            time.sleep(0.2)
        jobs += 1
    elapsed = time.monotonic() - started
    return {
        "jobs": jobs,
        "seconds": round(elapsed, 1),
        "rss_max_mib": round(max(rss) / 2**20, 1),
        "rss_median_mib": round(statistics.median(rss) / 2**20, 1),
        "cpu_share": round((sum(node.cpu_times()[:2]) - cpu_before) / elapsed, 3),
    }


def _snapshot_bytes(data_dir: Path) -> int:
    """The size of the JSON snapshot the page gets each second, after the jobs."""
    info = json.loads((data_dir / "control.json").read_text())
    token = (data_dir / "control.token").read_text().strip()
    request = urllib.request.Request(
        info["url"] + "/v1/dashboard/state", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return len(response.read())


def run(loads: int, seconds: float, rounds: int) -> dict[str, Any]:
    """Start the devnet and the browser; measure (see the module docstring)."""
    sys.path.insert(0, str(ROOT))
    from tests.browser import chrome, skip_reason, wait_for

    reason = skip_reason()
    if reason:
        raise SystemExit(f"cannot run: {reason}")
    with tempfile.TemporaryDirectory(prefix="mtor-bench-dashboard-") as tmp:
        devnet = subprocess.Popen(
            [sys.executable, "-m", "mtor_p2p", "devnet", "--peers", "3", "--json",
             "--data-dir", str(Path(tmp) / "net")],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
        )  # fmt: skip
        try:
            assert devnet.stdout is not None
            peer = json.loads(devnet.stdout.readline())["peers"][0]
            data_dir, node = peer["data_dir"], psutil.Process(peer["pid"])
            time.sleep(3)
            status_ms = [_timed("status", "--json", "--data-dir", data_dir) for _ in range(loads)]
            jobs_ms = [_timed("jobs", "--json", "--data-dir", data_dir) for _ in range(loads)]
            first_paint: list[float] = []
            closed, open_page, latencies, errors = [], [], [], []
            with chrome() as browser:
                # Interleaved (without, with, without, with): the node's memory grows with
                # the receipts of every job, so one side run after the other would charge
                # that growth to the page.
                for _ in range(rounds):
                    browser.get("about:blank")
                    closed.append(_job_under_watch(data_dir, node, seconds))
                    for _ in range(loads):
                        browser.get("about:blank")
                        browser.get(_link(data_dir))
                        wait_for(browser, "return window.mtorDashboard.firstPaint !== null")
                        first_paint.append(browser.execute_script(
                            "return window.mtorDashboard.firstPaint"))  # fmt: skip
                    browser.execute_script("window.mtorDashboard.latencies.length = 0")
                    open_page.append(_job_under_watch(data_dir, node, seconds))
                    latencies += browser.execute_script("return window.mtorDashboard.latencies")
                    errors += browser.execute_script("return window.mtorDashboard.errors")
            snapshot_bytes = _snapshot_bytes(Path(data_dir))
        finally:
            devnet.send_signal(signal.SIGINT)
            devnet.wait(timeout=60)
    return {
        "first_paint_ms": {
            "median": round(statistics.median(first_paint), 1),
            "max": round(max(first_paint), 1),
            "runs": [round(x, 1) for x in first_paint],
        },
        "baseline_status_cli_ms": {
            "median": round(statistics.median(status_ms), 1),
            "runs": [round(x, 1) for x in status_ms],
        },
        "update_latency_ms": {
            "p50": round(_pct(latencies, 0.5), 1),
            "p99": round(_pct(latencies, 0.99), 1),
            "max": round(max(latencies), 1),
            "snapshots": len(latencies),
            "tick_ms": 1000,
        },
        "baseline_jobs_cli_ms": {
            "median": round(statistics.median(jobs_ms), 1),
            "runs": [round(x, 1) for x in jobs_ms],
        },
        "node_without_page": closed,
        "node_with_page": open_page,
        "snapshot_bytes_after_jobs": snapshot_bytes,
        "page_errors": errors,
    }


def main(argv: list[str] | None = None) -> int:
    """Parse the options, measure, print (and write) the figures."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks dashboard", description=__doc__)
    parser.add_argument("--loads", type=int, default=5, help="fresh page loads to time")
    parser.add_argument("--seconds", type=float, default=30.0, help="job time per side")
    parser.add_argument("--rounds", type=int, default=2, help="without/with rounds")
    parser.add_argument("--json", type=user_path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    out = {"benchmark": "dashboard", "commit": commit, "machine": machine()}
    out |= run(args.loads, args.seconds, args.rounds)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0
