"""The NAT benchmark's smallest pieces (benchmarks/bench_nat.py): seconds, not minutes.

One punch trial through the real NAT lab (skipped with the reason where the lab cannot run),
the relay-load part shrunk to 2 x 2 circuits on loopback, and the exit code where the lab is
missing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench_nat
from tests.natlab import skip_reason

ROOT = Path(__file__).resolve().parent.parent
needs_libp2p = pytest.mark.skipif(
    __import__("importlib").util.find_spec("libp2p") is None, reason="needs py-libp2p"
)


def test_help_names_the_parts_and_measures_nothing() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "nat", "--help"],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for words in ("--quick", "--only", "punch", "symmetric", "throughput", "relay", "--out"):
        assert words in done.stdout
    args = bench_nat.parse_args(["--quick"])
    assert (args.trials, args.sym_trials, args.window) == (6, 2, 10.0)
    assert bench_nat.parse_args([]).trials >= 20
    with pytest.raises(SystemExit):
        bench_nat.parse_args(["--only", "nope"])


def test_without_the_lab_it_exits_3_and_says_why(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(bench_nat, "lab_reason", lambda: "no namespaces here (test)")
    out = tmp_path / "nat.json"
    assert bench_nat.main(["--only", "punch,throughput", "--out", str(out)]) == 3
    assert "no namespaces here (test)" in capsys.readouterr().err
    assert not out.exists()


@needs_libp2p
@pytest.mark.skipif(skip_reason() is not None, reason=f"NAT lab: {skip_reason()}")
def test_one_punch_trial_through_the_lab(tmp_path: Path) -> None:
    out, logs = tmp_path / "nat.json", tmp_path / "logs"
    argv = ["--only", "punch", "--trials", "1", "--out", str(out), "--logs", str(logs)]
    assert bench_nat.main(argv) == 0
    assert list((logs / "punch").glob("*.log")), "the peers' logs go where --logs says"
    result = json.loads(out.read_text())
    punch = result["results"]["punch_port_preserving"]
    (trial,) = punch["trials"]
    assert trial["kind_at_connect"] == "relayed"
    assert trial["direct"] and 0 < trial["to_direct_s"] < bench_nat.WATCH_S, trial
    # b (the side that accepted the relayed connection) drove DCUtR; a answered it.
    assert trial["b_dcutr_started_s"] is not None and trial["a_dcutr_stream_s"] is not None
    assert punch["summary"]["direct"] == 1 and punch["summary"]["to_direct"]["n"] == 1
    assert trial["rtt_a_relay_libp2p_s"] and trial["rtt_a_relay_tcp_s"]
    assert result["machine"]["cores"] and result["git"]["commit"]


@needs_libp2p
def test_relay_load_on_a_few_circuits(tmp_path: Path) -> None:
    got = bench_nat.part_relay(window=1.0, circuits_side=2, settle=0.5, logs=tmp_path)
    assert sorted(p.name for p in (tmp_path / "relay").glob("*.log")) == [
        "dests.log",
        "dialers.log",
        "relay.log",
    ]
    assert got["circuits"] == {"dialled": 4, "relayed": 4, "direct": 0, "errors": []}
    assert got["idle"]["relay_stats"]["active_circuits"] == 4
    assert got["traffic"]["requests"]["requests"] > 0
    assert got["traffic"]["requests"]["errors"] == 0
    assert got["traffic"]["kinds_after"] == {"relayed": 4, "direct": 0}
    per_100 = got["per_100_circuits"]
    assert per_100["active_circuits_measured"] == 4 and per_100["traffic_cores"] is not None
