"""BLS12-381 checkpoint figures: py-ecc beside blspy, on the same keys and message.

``signers`` keys (derived with :func:`derive_secret` from fixed seeds) each sign one 60-byte
checkpoint message with both backends; the signatures are aggregated, and each backend is timed
on (median of ``repeats`` runs, milliseconds):

* ``checkpoint_verify_ms`` — ``fast_aggregate_verify`` of the aggregate against all keys, the
  check every peer makes on a checkpoint;
* ``aggregate_ms`` — aggregating the ``signers`` signatures (with subgroup checks);
* ``sign_ms`` and ``verify_ms`` — one signature and one single-key verification.

The report also says whether both backends produced identical public keys, signatures and
aggregate bytes. Run: ``python -m benchmarks.bench_bls --signers 100 --repeats 3
[--json PATH]``. py-ecc dominates the run time (about a minute for 100 signers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import sys
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

import blake3

from benchmarks.machine import machine
from benchmarks.paths import user_path
from mtor_p2p.ledger.bls import BlsBackend, backend_by_name, derive_secret

BACKENDS = ("py-ecc", "blspy")
MESSAGE_BYTES = 60


def checkpoint_message(epoch: int = 42) -> bytes:
    """A stand-in 60-byte checkpoint: tag, epoch, a 32-byte state root, an entry count."""
    root = blake3.blake3(f"state root {epoch}".encode()).digest()
    message = b"mtor-ckpt-v1" + struct.pack(">Q", epoch) + root + struct.pack(">Q", 1234)
    assert len(message) == MESSAGE_BYTES
    return message


def _median_ms(call: Callable[[], object], repeats: int, expect: object = None) -> float:
    """Median wall time of ``call`` over ``repeats`` runs; each result must equal ``expect``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
        if expect is not None and result != expect:
            raise RuntimeError(f"benchmarked call returned {result!r}, expected {expect!r}")
    return round(statistics.median(times) * 1e3, 3)


def _setup(backend: BlsBackend, secrets: list[bytes], message: bytes) -> dict[str, Any]:
    start = time.perf_counter()
    public_keys = [backend.public_key(secret) for secret in secrets]
    signatures = [backend.sign(secret, message) for secret in secrets]
    aggregate = backend.aggregate(signatures)
    return {
        "public_keys": public_keys,
        "signatures": signatures,
        "aggregate": aggregate,
        "setup_s": round(time.perf_counter() - start, 3),
    }


def _time_backend(
    backend: BlsBackend, made: dict[str, Any], secret: bytes, message: bytes, repeats: int
) -> dict[str, float]:
    keys, signatures, aggregate = made["public_keys"], made["signatures"], made["aggregate"]
    return {
        "checkpoint_verify_ms": _median_ms(
            lambda: backend.fast_aggregate_verify(keys, message, aggregate), repeats, True
        ),
        "aggregate_ms": _median_ms(lambda: backend.aggregate(signatures), repeats, aggregate),
        "sign_ms": _median_ms(lambda: backend.sign(secret, message), repeats, signatures[0]),
        "verify_ms": _median_ms(
            lambda: backend.verify(keys[0], message, signatures[0]), repeats, True
        ),
        "setup_s": made["setup_s"],
    }


def _versions() -> dict[str, str]:
    versions = {}
    for package in ("py-ecc", "blspy", "blake3"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "missing"
    return versions


def measure(signers: int = 100, repeats: int = 3) -> dict[str, Any]:
    """Time both BLS backends on a ``signers``-strong checkpoint; medians in milliseconds.

    Returns ``{"backends": {name: {checkpoint_verify_ms, aggregate_ms, sign_ms, verify_ms,
    setup_s}}, "checkpoint_verify_ratio_py_ecc_over_blspy": float, "identical_aggregate":
    bool, "identical_keys_and_signatures": bool, ...}``.
    """
    if signers < 1 or repeats < 1:
        raise ValueError("signers and repeats must be at least 1")
    message = checkpoint_message()
    secrets = [derive_secret(index.to_bytes(32, "big")) for index in range(1, signers + 1)]
    made: dict[str, dict[str, Any]] = {}
    timings: dict[str, dict[str, float]] = {}
    for name in BACKENDS:
        backend = backend_by_name(name)
        made[name] = _setup(backend, secrets, message)
        timings[name] = _time_backend(backend, made[name], secrets[0], message, repeats)
    ecc, fast = made["py-ecc"], made["blspy"]
    return {
        "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
        "signers": signers,
        "repeats": repeats,
        "message_bytes": len(message),
        "backends": timings,
        "checkpoint_verify_ratio_py_ecc_over_blspy": round(
            timings["py-ecc"]["checkpoint_verify_ms"] / timings["blspy"]["checkpoint_verify_ms"], 1
        ),
        "identical_aggregate": ecc["aggregate"] == fast["aggregate"],
        "identical_keys_and_signatures": (
            ecc["public_keys"] == fast["public_keys"] and ecc["signatures"] == fast["signatures"]
        ),
        "versions": _versions(),
        "machine": machine(),
    }


def summary(report: dict[str, Any]) -> str:
    """A short human-readable table of :func:`measure`'s report."""
    lines = [
        f"BLS12-381 checkpoint, {report['signers']} signers, {report['message_bytes']}-byte "
        f"message, median of {report['repeats']} (ms)",
        f"{'backend':<8} {'checkpoint verify':>18} {'aggregate':>10} {'sign':>8} {'verify':>8}",
    ]
    for name, row in report["backends"].items():
        lines.append(
            f"{name:<8} {row['checkpoint_verify_ms']:>18.2f} {row['aggregate_ms']:>10.2f} "
            f"{row['sign_ms']:>8.2f} {row['verify_ms']:>8.2f}"
        )
    lines.append(
        f"checkpoint verify py-ecc/blspy: {report['checkpoint_verify_ratio_py_ecc_over_blspy']}x; "
        f"identical aggregate: {report['identical_aggregate']}; identical keys and signatures: "
        f"{report['identical_keys_and_signatures']}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: measure, print a summary, optionally write the report as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--signers", type=int, default=100, help="keys signing the checkpoint")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure")
    parser.add_argument("--json", type=user_path, metavar="PATH", help="write the report here")
    args = parser.parse_args(argv)
    if args.signers < 1 or args.repeats < 1:
        parser.error("--signers and --repeats must be at least 1")
    report = measure(args.signers, args.repeats)
    print(summary(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0 if report["identical_aggregate"] and report["identical_keys_and_signatures"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
