"""Scenarios: what a simulation runs, read from a TOML file, and the data tables it cites.

A scenario file holds every number the run uses, or names a table in its data directory
(``simulations/data/`` beside the shipped scenarios) where each figure has its source and
date. Flags and sweeps override keys by dotted path (``workload.interactive.rate=2``) before
the file is interpreted, so that a sweep is just a set of overrides.
"""

from __future__ import annotations

import copy
import csv
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KINDS = ("mtor", "cloud")


class ScenarioError(ValueError):
    """The scenario file or an override is invalid; the message names the key."""


# -- data tables ---------------------------------------------------------------------------


def read_table(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV file whose leading ``#`` lines are comments (source, date, units)."""
    try:
        lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    except OSError as exc:
        raise ScenarioError(f"cannot read data table {path}: {exc}") from exc
    return list(csv.DictReader(line for line in lines if line.strip()))


@dataclass(frozen=True)
class GpuModel:
    """A card as the simulator models it (datasheet figures from ``gpus.csv``)."""

    model: str
    kind: str  # "consumer" or "datacenter"
    fp32_tflops: float
    fp16_tflops: float
    power_w: float
    idle_w: float
    mem_gib: float
    efficiency: float  # sustained share of the datasheet rate on a large GEMM (assumption)

    def effective_tflops(self, dtype: str = "float32") -> float:
        """TFLOP/s the card sustains on a GEMM of ``dtype``."""
        peak = self.fp16_tflops if dtype == "float16" else self.fp32_tflops
        return peak * self.efficiency


@dataclass(frozen=True)
class Region:
    """One of the world regions of the round-trip table."""

    code: str
    name: str
    country: str
    lat: float
    lon: float
    home_share: float


@dataclass
class DataTables:
    """The data directory's tables, parsed."""

    directory: Path
    regions: dict[str, Region]
    gpus: dict[str, GpuModel]
    carbon: dict[str, float]  # country ISO-3 -> gCO2/kWh
    prices: dict[str, float]  # offering -> USD per GPU-hour

    @property
    def rtt_csv(self) -> Path:
        """The region round-trip table."""
        return self.directory / "region-rtt-p95-ms.csv"

    def gpu(self, name: str) -> GpuModel:
        """The card called ``name`` (ScenarioError if the table lacks it)."""
        try:
            return self.gpus[name]
        except KeyError:
            raise ScenarioError(f"no GPU {name!r} in gpus.csv ({', '.join(self.gpus)})") from None

    def price(self, offering: str) -> float:
        """USD per GPU-hour of ``offering`` (a row of gpu-prices.csv)."""
        try:
            return self.prices[offering]
        except KeyError:
            raise ScenarioError(
                f"no offering {offering!r} in gpu-prices.csv ({', '.join(self.prices)})"
            ) from None

    def carbon_of(self, region: str) -> float:
        """Grid carbon intensity (gCO2/kWh) of the country a region is in."""
        country = self.regions[region].country
        try:
            return self.carbon[country]
        except KeyError:
            raise ScenarioError(f"no carbon intensity for {country} (region {region})") from None


def _float(row: dict[str, str], key: str, default: float | None = None) -> float:
    value = (row.get(key) or "").strip()
    if not value:
        if default is None:
            raise ScenarioError(f"missing {key!r} in row {row}")
        return default
    return float(value)


def load_data(directory: Path) -> DataTables:
    """Parse the tables a scenario cites from ``directory``."""
    regions = {
        r["region"]: Region(
            code=r["region"],
            name=r.get("name", r["region"]),
            country=r["country_iso3"],
            lat=_float(r, "lat", 0.0),
            lon=_float(r, "lon", 0.0),
            home_share=_float(r, "home_share", 0.0),
        )
        for r in read_table(directory / "regions.csv")
    }
    gpus = {}
    for row in read_table(directory / "gpus.csv"):
        gpus[row["model"]] = GpuModel(
            model=row["model"],
            kind=row.get("class", "consumer"),
            fp32_tflops=_float(row, "fp32_tflops"),
            fp16_tflops=_float(row, "fp16_tensor_tflops"),
            power_w=_float(row, "board_power_w"),
            idle_w=_float(row, "idle_power_w"),
            mem_gib=_float(row, "mem_gib"),
            efficiency=_float(row, "sustained_fp32_gemm_eff", 0.7),
        )
    carbon = {
        r["country_iso3"]: _float(r, "g_co2_per_kwh")
        for r in read_table(directory / "carbon-intensity.csv")
    }
    prices = {}
    for row in read_table(directory / "gpu-prices.csv"):
        per_gpu = (row.get("usd_per_gpu_hour") or "").strip()
        if per_gpu:
            prices[row["offering"]] = float(per_gpu)
    return DataTables(directory, regions, gpus, carbon, prices)


# -- the scenario --------------------------------------------------------------------------


@dataclass
class Workload:
    """One class of requests: Poisson arrivals of matmul jobs of a declared size."""

    name: str
    rate: float  # jobs per simulated second, network-wide
    m: int  # declared matrix dimensions: C (m x n) = A (m x k) @ B (k x n)
    k: int
    n: int
    shards: int = 1
    max_workers: int = 4
    verify: str = "freivalds"
    freivalds_rounds: int = 20
    latency_target_ms: float | None = None
    deadline_s: float = 60.0
    dtype: str = "float32"
    #: Distinct B matrices (model weights) requests draw from; 0: a fresh B per request.
    models: int = 0
    #: Workers hold every model's B before the run starts (as model hosts would).
    preload: bool = False

    def declared_flops(self) -> float:
        """FLOPs of one job at its declared size."""
        return 2.0 * self.m * self.k * self.n


@dataclass
class Churn:
    """Peer sessions: Weibull on-times and off-times; a share of departures are crashes."""

    enabled: bool = False
    session_shape: float = 0.5
    session_scale_s: float = 3600.0
    offline_shape: float = 0.6
    offline_scale_s: float = 600.0
    crash_share: float = 0.5  # the rest leave cleanly (withdraw their record)


@dataclass
class Adversaries:
    """Shares of peers that misbehave, and how."""

    cheat: float = 0.0  # return wrong results for ``cheat_rate`` of their shards
    cheat_rate: float = 0.5
    stall: float = 0.0  # accept shards and never answer
    lie: float = 0.0  # advertise ``lie_factor`` times their real TFLOP/s
    lie_factor: float = 10.0


@dataclass
class CloudSetup:
    """The centralised baseline: data-centre GPUs in a few regions, billed by the hour."""

    regions: list[str] = field(default_factory=lambda: ["EUS", "WEU", "SEA"])
    gpu: str = "A100 40GB"
    gpus_per_region: int = 16
    offering: str = "AWS p4d.24xlarge"
    pue: float = 1.15
    clients_per_region: int = 4


@dataclass
class Scenario:
    """Everything one run needs; build it with :func:`load_scenario`."""

    name: str
    description: str
    kind: str
    peers: int
    hours: float
    seed: int
    dim_scale: int
    data: DataTables
    region_shares: dict[str, float]
    requester_shares: dict[str, float]
    fleet: dict[str, float]
    consumer_price_offering: str
    consumer_price_gpu: str
    dynamic_price: bool
    credits: float
    ledger_replicas: int | None  # None: every peer keeps the whole ledger
    jitter: float
    loss: float
    access_ms: tuple[float, float]
    uplink_mbps: tuple[float, float]
    downlink_mbps: tuple[float, float]
    host_gflops: float
    workloads: list[Workload]
    churn: Churn
    adversaries: Adversaries
    cloud: CloudSetup
    timing: dict[str, float]
    sample_interval: float
    #: The protocol stack's own cost per request (ms): stream set-up, negotiation, framing.
    request_overhead_ms: float = 0.0
    #: Every worker's starting price in credits per declared TFLOP (None: from USD prices).
    credits_per_tflop: float | None = None
    source: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def flop_scale(self) -> float:
        """Declared FLOPs per FLOP actually computed (real operands are ``dim_scale`` times
        smaller in every dimension)."""
        return float(self.dim_scale**3)

    @property
    def duration(self) -> float:
        """Simulated seconds."""
        return self.hours * 3600.0

    def to_json(self) -> dict[str, Any]:
        """The scenario as the run record carries it (the raw TOML after overrides)."""
        return copy.deepcopy(self.raw)


def _pair(value: Any, key: str) -> tuple[float, float]:
    if isinstance(value, int | float):
        return float(value), float(value)
    if (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int | float) for v in value)
    ):
        low, high = float(value[0]), float(value[1])
        if low > high or low < 0:
            raise ScenarioError(f"{key}: need [low, high] with 0 <= low <= high")
        return low, high
    raise ScenarioError(f"{key}: expected a number or [low, high]")


def _shares(table: Any, key: str, known: set[str]) -> dict[str, float]:
    if not isinstance(table, dict) or not table:
        raise ScenarioError(f"[{key}] must map names to shares")
    shares = {}
    for name, share in table.items():
        if name not in known:
            raise ScenarioError(f"[{key}] {name!r} is not one of {', '.join(sorted(known))}")
        if not isinstance(share, int | float) or share < 0 or not math.isfinite(share):
            raise ScenarioError(f"[{key}] {name}: share must be a non-negative number")
        shares[name] = float(share)
    total = sum(shares.values())
    if total <= 0:
        raise ScenarioError(f"[{key}] shares sum to zero")
    return {name: share / total for name, share in shares.items()}


def apply_override(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``raw[a][b][c] = value`` for ``dotted == "a.b.c"`` (tables created as needed)."""
    parts = dotted.split(".")
    if not all(parts):
        raise ScenarioError(f"bad parameter name {dotted!r}")
    table = raw
    for part in parts[:-1]:
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            raise ScenarioError(f"{dotted}: {part} is not a table")
    table[parts[-1]] = value


def parse_value(text: str) -> Any:
    """A command-line value as TOML would read it (numbers, booleans, strings, lists)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


#: Keys a scenario may hold, per table (``None``: a free map, checked where it is used).
TIMING_KEYS = frozenset(
    {
        "warmup", "cooldown", "record_ttl", "announce_interval", "capacity_scope",
        "capacity_receive_rate", "sweep_interval", "change_check_interval", "prune_interval",
        "mesh_interval", "bootstrap_retry", "ledger_sync_interval", "checkpoint_tick",
        "epoch_seconds", "price_interval", "challenge_interval",
    }
)  # fmt: skip
SCHEMA: dict[str, Any] = {
    "name": None, "description": None, "kind": None, "peers": None, "hours": None,
    "seed": None, "data": None, "dim_scale": None, "sample_interval": None,
    "regions": "map", "fleet": "map", "gpus": "map",
    "prices": {"offering", "gpu", "dynamic", "credits_per_tflop"},
    "network": {
        "jitter", "loss", "access_ms", "uplink_mbps", "downlink_mbps", "request_overhead_ms"
    },
    "requesters": {"host_gflops", "regions"},
    "ledger": {"credits", "replicas"},
    "workload": "workloads",
    "churn": set(Churn.__dataclass_fields__),
    "adversaries": set(Adversaries.__dataclass_fields__),
    "cloud": set(CloudSetup.__dataclass_fields__),
    "timing": TIMING_KEYS,
}  # fmt: skip
WORKLOAD_KEYS = frozenset(Workload.__dataclass_fields__) - {"name"}


def check_keys(raw: dict[str, Any]) -> None:
    """Refuse any key the simulator does not read: a typo must not be silently ignored."""
    for key, value in raw.items():
        if key not in SCHEMA:
            raise ScenarioError(f"unknown key {key!r} (known: {', '.join(sorted(SCHEMA))})")
        kind = SCHEMA[key]
        if kind is None or kind == "map":
            continue
        if not isinstance(value, dict):
            raise ScenarioError(f"[{key}] must be a table")
        if kind == "workloads":
            for name, table in value.items():
                if not isinstance(table, dict):
                    raise ScenarioError(f"[workload.{name}] must be a table")
                for field_name in table:
                    if field_name not in WORKLOAD_KEYS:
                        raise ScenarioError(
                            f"unknown key workload.{name}.{field_name} "
                            f"(known: {', '.join(sorted(WORKLOAD_KEYS))})"
                        )
            continue
        for field_name in value:
            if field_name not in kind:
                raise ScenarioError(
                    f"unknown key {key}.{field_name} (known: {', '.join(sorted(kind))})"
                )


def load_scenario(path: Path | str, overrides: dict[str, Any] | None = None) -> Scenario:
    """Read a scenario file, apply ``overrides`` (dotted keys), validate, resolve its data."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ScenarioError(f"cannot read scenario {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from exc
    workloads = set((raw.get("workload") or {}).keys())
    for key, value in (overrides or {}).items():
        parts = key.split(".")
        if parts[0] == "workload" and len(parts) > 1 and parts[1] not in workloads:
            raise ScenarioError(
                f"{key}: no workload {parts[1]!r} in {path.name} "
                f"(it has: {', '.join(sorted(workloads)) or 'none'})"
            )
        apply_override(raw, key, value)
    check_keys(raw)
    try:
        return build_scenario(raw, base=path.parent, source=path)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ScenarioError):
            raise
        raise ScenarioError(f"{path.name}: a value has the wrong type or range: {exc}") from exc


def build_scenario(raw: dict[str, Any], *, base: Path, source: Path | None = None) -> Scenario:
    """Interpret a scenario's TOML table (see the shipped scenarios for every key)."""
    get = raw.get
    kind = get("kind", "mtor")
    if kind not in KINDS:
        raise ScenarioError(f"kind must be one of {KINDS}")
    data = load_data((base / get("data", "data")).resolve())
    for name, table in (get("gpus") or {}).items():
        # Devices declared in the scenario itself (a calibration host's CPU, a new card).
        try:
            data.gpus[name] = GpuModel(model=name, **table)
        except TypeError as exc:
            raise ScenarioError(f"[gpus.{name}]: {exc}") from exc
    regions = set(data.regions)
    region_table = get("regions", "data")
    if region_table == "data":
        region_shares = _shares(
            {r.code: r.home_share for r in data.regions.values()}, "regions", regions
        )
    else:
        region_shares = _shares(region_table, "regions", regions)
    requesters = get("requesters", {})
    requester_table = requesters.get("regions", "peers")
    requester_shares = (
        region_shares
        if requester_table == "peers"
        else _shares(requester_table, "requesters.regions", regions)
    )
    fleet = _shares(get("fleet", {"RTX 4090": 1.0}), "fleet", set(data.gpus))
    prices = get("prices", {})
    network = get("network", {})
    workloads = []
    for name, table in (get("workload") or {}).items():
        if not isinstance(table, dict):
            raise ScenarioError(f"[workload.{name}] must be a table")
        try:
            workload = Workload(name=name, **table)
        except TypeError as exc:
            raise ScenarioError(f"[workload.{name}]: {exc}") from exc
        if workload.rate < 0 or min(workload.m, workload.k, workload.n) < 1:
            raise ScenarioError(f"[workload.{name}]: rate >= 0 and positive dimensions")
        workloads.append(workload)
    dim_scale = int(get("dim_scale", 16))
    for workload in workloads:
        for dim in ("m", "k", "n"):
            if getattr(workload, dim) % dim_scale:
                raise ScenarioError(
                    f"[workload.{workload.name}] {dim} must be a multiple of dim_scale {dim_scale}"
                )
    try:
        churn = Churn(**get("churn", {}))
        adversaries = Adversaries(**get("adversaries", {}))
        cloud = CloudSetup(**get("cloud", {}))
    except TypeError as exc:
        raise ScenarioError(str(exc)) from exc
    if kind == "cloud":
        for region in cloud.regions:
            if region not in regions:
                raise ScenarioError(f"[cloud] region {region!r} unknown")
        data.gpu(cloud.gpu)
        data.price(cloud.offering)
    ledger = get("ledger", {})
    replicas = ledger.get("replicas", "all")
    peers = int(get("peers", 64))
    hours = float(get("hours", 1.0))
    if peers < 2 or not 0 < hours <= 1000:
        raise ScenarioError("peers must be at least 2 and hours a number in (0, 1000]")
    scenario = Scenario(
        name=str(get("name", source.stem if source else "scenario")),
        description=str(get("description", "")),
        kind=kind,
        peers=peers,
        hours=hours,
        seed=int(get("seed", 1)),
        dim_scale=dim_scale,
        data=data,
        region_shares=region_shares,
        requester_shares=requester_shares,
        fleet=fleet,
        consumer_price_offering=str(prices.get("offering", "RunPod RTX 4090 spot")),
        consumer_price_gpu=str(prices.get("gpu", "RTX 4090")),
        dynamic_price=bool(prices.get("dynamic", True)),
        credits=float(ledger.get("credits", 1000.0)),
        ledger_replicas=None if replicas == "all" else int(replicas),
        jitter=float(network.get("jitter", 0.05)),
        loss=float(network.get("loss", 0.0)),
        access_ms=_pair(network.get("access_ms", [3.0, 15.0]), "network.access_ms"),
        uplink_mbps=_pair(network.get("uplink_mbps", [20.0, 200.0]), "network.uplink_mbps"),
        downlink_mbps=_pair(network.get("downlink_mbps", [100.0, 1000.0]), "network.downlink_mbps"),
        host_gflops=float(requesters.get("host_gflops", 50.0)),
        workloads=workloads,
        churn=churn,
        adversaries=adversaries,
        cloud=cloud,
        timing={k: float(v) for k, v in get("timing", {}).items() if isinstance(v, int | float)},
        sample_interval=float(get("sample_interval", 60.0)),
        request_overhead_ms=float(network.get("request_overhead_ms", 0.0)),
        credits_per_tflop=None
        if prices.get("credits_per_tflop") is None
        else float(prices["credits_per_tflop"]),
        source=source,
        raw=copy.deepcopy(raw),
    )
    if kind == "mtor":
        data.price(scenario.consumer_price_offering)
        data.gpu(scenario.consumer_price_gpu)
    return scenario
