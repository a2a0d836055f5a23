"""Node configuration: defaults, then a TOML file, then command-line flags.

Example ``mtor.toml``::

    data_dir = "~/.mtor"
    listen = ["/ip4/127.0.0.1/tcp/4001"]
    bootstrap = ["/ip4/203.0.113.7/tcp/4001/p2p/12D3KooW..."]
    region = "WEU"
    gpu = "auto"            # or "none"
    price = 1.0             # starting price, credits per TFLOP of delivered work
    dynamic_price = true    # move the price with utilisation (the genesis's rule)
    genesis = "genesis.json"  # default: the data dir's copy, else bootstrap/genesis.json
    bootstrap_node = false  # raise connection limits when serving as a bootstrap peer

    [ngrok]
    enabled = false
    authtoken = ""          # or set NGROK_AUTHTOKEN
    region = "eu"
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

DEFAULT_DATA_DIR = "~/.mtor"
DEFAULT_LISTEN = "/ip4/127.0.0.1/tcp/4001"
DEFAULT_REGION = "local"


class ConfigError(ValueError):
    """The configuration file or flags are invalid; the message says which setting."""


@dataclass
class NgrokConfig:
    """Settings of the optional ngrok tunnel used to become reachable from behind a NAT."""

    enabled: bool = False
    authtoken: str | None = None
    region: str | None = None
    path: str | None = None  # the agent binary; default: MTOR_NGROK_PATH or pyngrok's own


@dataclass
class NodeConfig:
    """Everything a node needs to start."""

    data_dir: Path = field(default_factory=lambda: Path(DEFAULT_DATA_DIR).expanduser())
    listen: list[str] = field(default_factory=lambda: [DEFAULT_LISTEN])
    bootstrap: list[str] = field(default_factory=list)
    use_default_bootstrap: bool = True
    region: str = DEFAULT_REGION
    gpu: str = "auto"
    price: float = 1.0
    #: Move the asking price with utilisation by the genesis's price rule (false: fixed).
    dynamic_price: bool = True
    #: The network's genesis file; None: the data directory's copy, else the shipped one.
    genesis: Path | None = None
    bootstrap_node: bool = False
    max_connections: int = 300
    api_port: int = 0  # 0: any free port, written to <data_dir>/control.json
    record_ttl: float = 60.0
    announce_interval: float = 20.0
    log_level: str = "warning"
    operand_cache_mib: int = 2048  # operands (weights) a worker keeps between shards
    #: Testing only: return a wrong result for this fraction of shards, to exercise the
    #: network's defences (verification, fault proofs, re-issue). Honest nodes keep 0.
    fault_rate: float = 0.0
    ngrok: NgrokConfig = field(default_factory=NgrokConfig)

    def validate(self) -> None:
        """Raise ConfigError for settings that cannot work."""
        if self.gpu not in ("auto", "none"):
            raise ConfigError("gpu must be 'auto' or 'none'")
        if not self.listen:
            raise ConfigError("listen needs at least one multiaddr")
        if self.price < 0:
            raise ConfigError("price must not be negative")
        if not 0 <= self.api_port <= 65535:
            raise ConfigError("api_port must be a TCP port number")
        if not 0 < self.announce_interval < self.record_ttl / 2:
            raise ConfigError("announce_interval must be positive and under half of record_ttl")
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ConfigError("fault_rate must be between 0 and 1")
        if self.operand_cache_mib < 1:
            raise ConfigError("operand_cache_mib must be at least 1")
        if len(self.region) > 32:
            raise ConfigError("region must be at most 32 characters")

    def all_bootstrap_peers(self) -> list[str]:
        """Configured bootstrap peers followed by the shipped list (unless disabled)."""
        peers = list(self.bootstrap)
        if self.use_default_bootstrap:
            peers += default_bootstrap_peers()
        return list(dict.fromkeys(peers))


def default_bootstrap_peers() -> list[str]:
    """The bootstrap list shipped in ``bootstrap/peers.txt`` (one multiaddr a line)."""
    override = os.environ.get("MTOR_BOOTSTRAP_FILE")
    if override:
        text = Path(override).read_text()
    else:
        text = (resources.files("mtor_p2p._bootstrap") / "peers.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


_SIMPLE_TYPES: dict[str, type] = {
    "listen": list,
    "bootstrap": list,
    "use_default_bootstrap": bool,
    "region": str,
    "gpu": str,
    "price": float,
    "dynamic_price": bool,
    "bootstrap_node": bool,
    "max_connections": int,
    "api_port": int,
    "record_ttl": float,
    "announce_interval": float,
    "log_level": str,
    "operand_cache_mib": int,
    "fault_rate": float,
}


def _checked(name: str, value: Any, kind: type) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name} must be a list of strings")
        return list(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{name} must be of type {kind.__name__}")
    return value


def load_config(path: Path | None) -> NodeConfig:
    """Read a TOML file into a NodeConfig (defaults when ``path`` is None)."""
    config = NodeConfig()
    if path is None:
        return config
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    for key, value in data.items():
        if key == "data_dir":
            config.data_dir = Path(_checked(key, value, str)).expanduser()
        elif key == "genesis":
            config.genesis = Path(_checked(key, value, str)).expanduser()
        elif key == "ngrok":
            if not isinstance(value, dict):
                raise ConfigError("[ngrok] must be a table")
            known = {f.name for f in fields(NgrokConfig)}
            for sub, subvalue in value.items():
                if sub not in known:
                    raise ConfigError(f"unknown setting ngrok.{sub}")
                kind = bool if sub == "enabled" else str
                setattr(config.ngrok, sub, _checked(f"ngrok.{sub}", subvalue, kind))
        elif key in _SIMPLE_TYPES:
            setattr(config, key, _checked(key, value, _SIMPLE_TYPES[key]))
        else:
            raise ConfigError(f"unknown setting {key!r} in {path}")
    return config
