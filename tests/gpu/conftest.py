"""Fixtures of the GPU tests; nothing here needs the peer (libp2p) to be installed.

``mtor_kernels`` is this checkout's ``kernels/`` folder under its wheel name. Where the package
is not installed (a bare machine lent a GPU, see ``benchmarks/gpu_check.sh``), it is loaded from
the checkout, as ``benchmarks/gpu_kernels.py`` does.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


def _ensure_kernels_importable() -> None:
    if importlib.util.find_spec("mtor_kernels") is not None:
        return
    package_dir = Path(__file__).resolve().parents[2] / "kernels"
    spec = importlib.util.spec_from_file_location(
        "mtor_kernels", package_dir / "__init__.py", submodule_search_locations=[str(package_dir)]
    )
    if spec is None or spec.loader is None:  # pragma: no cover - a broken checkout
        raise ImportError(f"cannot load kernels from {package_dir}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["mtor_kernels"] = module
    spec.loader.exec_module(module)


_ensure_kernels_importable()


@pytest.fixture
def make_standin(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Any]]:
    """Install a CuPy stand-in (``tests/gpu/cupy_standin.py``, not a GPU) for one test.

    ``CUPY_TF32`` and ``CUDA_VISIBLE_DEVICES`` are cleared; the test sets what it needs.
    """
    from mtor_kernels import backend
    from tests.gpu.cupy_standin import CupyStandin

    monkeypatch.delenv("CUPY_TF32", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    # Each test sees the "no usable GPU" line afresh.
    monkeypatch.setattr(backend, "_reported_fallbacks", set())
    installed: list[CupyStandin] = []

    def make(*args: Any, **kwargs: Any) -> CupyStandin:
        standin = CupyStandin(*args, **kwargs).install(monkeypatch)
        installed.append(standin)
        return standin

    yield make
    for standin in installed:
        standin.uninstall()


@pytest.fixture
def standin(make_standin: Callable[..., Any]) -> Any:
    """A one-GPU stand-in machine with 1 GiB of device memory."""
    return make_standin()


@pytest.fixture
def backend_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Captures the backend's log from INFO up."""
    caplog.set_level(logging.INFO, logger="mtor_kernels.backend")
    return caplog
