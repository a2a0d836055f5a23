"""A real Prometheus server (Debian's ``prometheus``; ``.ci/system-packages`` installs it)
scrapes two real nodes after a job, one through the control API with the token and one
through the opt-in tokenless listener, and PromQL over its HTTP API returns the shards served
(issue 11, item 4). Without the binary the test is skipped with the reason;
tests/test_metrics.py checks the same figures with prometheus-client's parser."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio

from mtor_p2p.control import TOKEN_FILE_NAME
from tests.test_metrics import control_url, devnet_after_a_job

#: How long Prometheus may take to start, scrape (every second) and answer.
PROMETHEUS_DEADLINE_S = 60.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _query(base: str, promql: str) -> list[dict[str, Any]]:
    """An instant PromQL query through Prometheus' HTTP API: its result vector."""
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as response:
        answer = json.loads(response.read())
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def _write_config(path: Path, control: str, token_file: Path, public: str) -> None:
    # JSON is YAML: one scrape job per way in, each scraped every second.
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "mtor-control",
                "metrics_path": "/metrics",
                "authorization": {"type": "Bearer", "credentials_file": str(token_file)},
                "static_configs": [{"targets": [control]}],
            },
            {
                "job_name": "mtor-public",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [public]}],
            },
        ],
    }
    path.write_text(json.dumps(config))


@pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="Debian's prometheus is not installed (bash .ci/system-packages installs it as root); "
    "tests/test_metrics.py checks the same figures with prometheus-client's parser",
)
@pytest.mark.slow
async def test_prometheus_scrapes_the_shards_served(tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    assert binary is not None
    async with devnet_after_a_job(
        tmp_path / "net", worker_changes={"metrics_listen": "127.0.0.1:0"}
    ) as (requester, worker):
        control = control_url(requester)[0].removeprefix("http://")
        assert worker.metrics is not None and worker.metrics.listen_port is not None
        public = f"127.0.0.1:{worker.metrics.listen_port}"
        config = tmp_path / "prometheus.yml"
        _write_config(config, control, requester.config.data_dir / TOKEN_FILE_NAME, public)
        port = _free_port()
        log = (tmp_path / "prometheus.log").open("wb")
        process = await trio.lowlevel.open_process(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            served: list[dict[str, Any]] = []
            up: list[dict[str, Any]] = []
            with trio.move_on_after(PROMETHEUS_DEADLINE_S):
                while len(served) < 1 or len(up) < 2:
                    await trio.sleep(0.5)
                    if process.poll() is not None:
                        break
                    try:
                        served = await trio.to_thread.run_sync(
                            _query, base, 'mtor_shards_served_total{outcome="ok"} > 0'
                        )
                        up = await trio.to_thread.run_sync(_query, base, "up == 1")
                    except OSError:
                        continue  # not listening yet
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            # Both ways in were scraped: with the token, and the opt-in listener without one.
            assert {s["metric"]["job"] for s in up} == {"mtor-control", "mtor-public"}
            # The worker served the job's 4 shards; the requester served none.
            assert [(s["metric"]["job"], s["value"][1]) for s in served] == [("mtor-public", "4")]
            accepted = await trio.to_thread.run_sync(
                _query, base, 'sum(mtor_shards_requested_total{outcome="accepted"})'
            )
            assert accepted[0]["value"][1] == "4"
            latency = await trio.to_thread.run_sync(
                _query, base, 'mtor_shard_duration_seconds_count{job="mtor-control"}'
            )
            assert latency[0]["value"][1] == "4"
        finally:
            process.terminate()
            with trio.move_on_after(10) as waited:
                await process.wait()
            if waited.cancelled_caught:
                process.kill()
                with trio.move_on_after(10):
                    await process.wait()
            log.close()
