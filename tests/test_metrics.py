"""``/metrics`` of real nodes (py-libp2p on loopback, the real control API) after a real job,
read over HTTP and parsed with prometheus-client's own parser (issue 11, item 4)."""

from __future__ import annotations

import json
import re
import sys
import types
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from mtor_p2p.control import INFO_FILE_NAME, TOKEN_FILE_NAME
from mtor_p2p.metrics import GpuSensors, LatencyBuckets, read_gpu_sensors
from mtor_p2p.node import Node
from tests.test_compute import config, run_node

GRAFANA_DASHBOARD = Path(__file__).resolve().parent.parent / "bootstrap" / "grafana-mtor.json"


@asynccontextmanager
async def devnet_after_a_job(
    root: Path, *, worker_changes: dict[str, object] | None = None
) -> AsyncIterator[tuple[Node, Node]]:
    """A requester and a worker (``worker_changes`` to its config) that have run one matmul
    of 4 shards, verified (the requester's price limit keeps every shard on the worker)."""

    async with trio.open_nursery() as nursery:
        requester: Node = await nursery.start(run_node, config(root, 0, [], price=50.0))
        bootstrap = [requester.addrs()[0]]
        worker: Node = await nursery.start(
            run_node, config(root, 1, bootstrap, price=1.0, **(worker_changes or {}))
        )
        with trio.fail_after(30):
            while any(len(n.capacity.view.live(n.clock.now())) < 2 for n in (requester, worker)):
                await trio.sleep(0.1)
        rng = np.random.default_rng(11)
        operands = {
            "a": rng.standard_normal((128, 64)).astype("float32"),
            "b": rng.standard_normal((64, 32)).astype("float32"),
        }
        with trio.fail_after(60):
            result = await requester.submit("matmul", operands, shards=4, max_price=10.0)
            await requester.scheduler.settled()
        assert {s.worker for s in result.shards} == {worker.peer_id}
        yield requester, worker
        nursery.cancel_scope.cancel()


def control_url(node: Node) -> tuple[str, str]:
    """The node's control API URL and token, from its data directory (as the CLI finds them)."""
    data_dir = node.config.data_dir
    info = json.loads((data_dir / INFO_FILE_NAME).read_text())
    return info["url"], (data_dir / TOKEN_FILE_NAME).read_text().strip()


def http_get(url: str, token: str | None = None) -> tuple[int, str, str]:
    """``GET url`` (with the bearer token if given): status, content type, body."""
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a text exposition, parsed by prometheus-client: ``(name, labels)``."""
    out = {}
    for family in text_string_to_metric_families(text):
        out[(family.name, ("family",))] = 0.0  # a family with no samples (no GPU) still counts
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def scrape(node: Node) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The node's ``/metrics`` through its control API, with its token, parsed."""
    url, token = control_url(node)
    status, content_type, body = await trio.to_thread.run_sync(http_get, url + "/metrics", token)
    assert status == 200, body
    assert content_type.startswith("text/plain; version=0.0.4")
    return samples(body)


def dashboard_metrics() -> set[str]:
    """The metric names bootstrap/grafana-mtor.json queries."""
    dashboard = json.loads(GRAFANA_DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"]]
    names = {n for expr in exprs for n in re.findall(r"\b((?:mtor|process)_[a-z_]+)", expr)}
    assert len(names) > 30
    return names


def value(metrics: dict, metric: str, /, **labels: str) -> float:
    return metrics[(metric, tuple(sorted(labels.items())))]


async def test_metrics_count_a_job_on_both_sides(tmp_path: Path) -> None:
    async with devnet_after_a_job(tmp_path, worker_changes={"metrics_listen": "127.0.0.1:0"}) as (
        requester,
        worker,
    ):
        # NVML's readings as a GPU machine would give them (this machine has no GPU: see
        # test_gpu_sensors_are_read_through_nvml for the reading itself).
        assert worker.metrics is not None
        worker.metrics.collector.gpus = [
            GpuSensors(0, "NVIDIA H200", "00000000:19:00.0", 41.0, 93.5, 0.25, 5 << 30)
        ]
        served = await scrape(worker)
        asked = await scrape(requester)
        gpu = {"gpu": "0", "name": "NVIDIA H200", "pci_bus_id": "00000000:19:00.0"}
        assert value(served, "mtor_gpu_temperature_celsius", **gpu) == 41.0
        assert value(served, "mtor_gpu_power_watts", **gpu) == 93.5
        assert value(served, "mtor_gpu_memory_used_bytes", **gpu) == 5 << 30

        # The worker: the shards it served, their compute time, the bytes it moved.
        assert value(served, "mtor_shards_served_total", outcome="ok") == 4
        assert value(served, "mtor_shards_served_total", outcome="failed") == 0
        assert value(served, "mtor_shards_served_by_kernel_total", kernel="matmul") == 4
        assert value(served, "mtor_worker_shard_duration_seconds_count") == 4
        assert value(served, "mtor_worker_shard_duration_seconds_bucket", le="+Inf") == 4
        assert value(served, "mtor_network_bytes_total", direction="in") > 128 * 64 * 4 // 2
        assert value(served, "mtor_network_bytes_total", direction="out") > 128 * 32 * 4 // 2
        assert value(served, "mtor_network_requests_total", role="server", outcome="ok") >= 4

        # The requester: its attempts by outcome, their latency, the job, what it paid.
        assert value(asked, "mtor_shards_requested_total", outcome="accepted") == 4
        assert value(asked, "mtor_shard_duration_seconds_count") == 4
        assert value(asked, "mtor_shard_duration_seconds_sum") > 0
        assert value(asked, "mtor_jobs_total", outcome="ok") == 1
        assert value(asked, "mtor_verification_failures_total") == 0
        assert value(asked, "mtor_fault_proofs_total") == 0
        assert value(asked, "mtor_credits_balance") < value(served, "mtor_credits_balance")

        # Every series the shipped Grafana dashboard draws exists.
        names = {name for name, _labels in served} | {name for name, _labels in asked}
        assert dashboard_metrics() - names == set()

        for metrics, node in ((served, worker), (asked, requester)):
            assert value(metrics, "mtor_view_peers") == 2
            assert value(metrics, "mtor_connected_peers") >= 1
            assert value(metrics, "mtor_price_credits_per_tflop") == node.price
            assert value(metrics, "mtor_worker_slots") >= 1
            assert (
                value(
                    metrics,
                    "mtor_node_info",
                    peer_id=node.peer_id,
                    version=__import__("mtor_p2p").__version__,
                    region="local",
                    backend=node.worker.executor.name,
                )
                == 1
            )
            assert value(metrics, "mtor_gossip_messages_received_total", outcome="accepted") > 0
            assert (
                value(
                    metrics,
                    "mtor_device_memory_total_bytes",
                    index="0",
                    kind="cpu",
                    name=(node.devices[0].name),
                )
                > 0
            )
            assert value(metrics, "mtor_control_connections_total") >= 1
            assert value(metrics, "process_resident_memory_bytes") > 0


async def test_metrics_need_the_token_unless_the_operator_opts_in(tmp_path: Path) -> None:
    async with devnet_after_a_job(tmp_path, worker_changes={"metrics_listen": "127.0.0.1:0"}) as (
        requester,
        worker,
    ):
        url, _token = control_url(worker)
        status, content_type, body = await trio.to_thread.run_sync(http_get, url + "/metrics")
        assert status == 401 and content_type == "application/json"
        assert "token" in json.loads(body)["error"]

        # The opt-in listener: /metrics without a token, and nothing else.
        assert worker.metrics is not None and worker.metrics.listen_port is not None
        public = f"http://127.0.0.1:{worker.metrics.listen_port}"
        status, content_type, body = await trio.to_thread.run_sync(http_get, public + "/metrics")
        assert status == 200 and content_type.startswith("text/plain")
        metrics = samples(body)
        assert metrics[("mtor_shards_served_total", (("outcome", "ok"),))] == 4
        for path in ("/v1/status", "/v1/ledger/balance"):
            status, _type, body = await trio.to_thread.run_sync(http_get, public + path)
            assert status == 404, (path, body)

        # A node without the option has no such listener.
        assert requester.metrics is not None and requester.metrics.listen_port is None


def test_latency_buckets_are_cumulative_as_prometheus_wants() -> None:
    buckets = LatencyBuckets((0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 3.0):
        buckets.observe(seconds)
    assert buckets.cumulative() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert buckets.count == 4 and abs(buckets.total - 3.65) < 1e-9


class _StandInNvml(types.ModuleType):
    """pynvml's calls that read_gpu_sensors makes, answering as one H200 would, except that
    it reports no power reading (as some boards do)."""

    NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        pass

    def __init__(self) -> None:
        super().__init__("pynvml")
        self.shutdown = False

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        self.shutdown = True

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> object:
        return ("card", index)

    def nvmlDeviceGetName(self, handle: object) -> bytes:
        return b"NVIDIA H200"

    def nvmlDeviceGetPciInfo(self, handle: object) -> types.SimpleNamespace:
        return types.SimpleNamespace(busId=b"00000000:19:00.0")

    def nvmlDeviceGetTemperature(self, handle: object, sensor: int) -> int:
        return 38

    def nvmlDeviceGetPowerUsage(self, handle: object) -> int:
        raise self.NVMLError("not supported")

    def nvmlDeviceGetUtilizationRates(self, handle: object) -> types.SimpleNamespace:
        return types.SimpleNamespace(gpu=75, memory=10)

    def nvmlDeviceGetMemoryInfo(self, handle: object) -> types.SimpleNamespace:
        return types.SimpleNamespace(total=141 << 30, free=140 << 30, used=1 << 30)


def test_gpu_sensors_are_read_through_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU here: a stand-in for nvidia-ml-py's module checks the calls and the units
    (milliwatts to watts, percent to a ratio); a reading the card refuses is left out."""
    nvml = _StandInNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    [card] = read_gpu_sensors()
    assert card == GpuSensors(0, "NVIDIA H200", "00000000:19:00.0", 38.0, None, 0.75, 1 << 30)
    assert nvml.shutdown


def test_gathered_messages_count_their_bytes() -> None:
    """A request or answer sent as several buffers (Gathered) counts all of them."""
    from mtor_p2p.metrics import _nbytes
    from mtor_p2p.network import Gathered

    assert _nbytes(Gathered([b"ab", memoryview(b"cde"), b""])) == 5
    assert _nbytes(b"abc") == 3
