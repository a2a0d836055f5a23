"""Process-wide memory settings of a peer (mtor_p2p/memory.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mtor_p2p import memory


@pytest.mark.parametrize(
    ("setting", "stalls"),
    [
        ("always defer defer+madvise [madvise] never\n", True),
        ("always defer [defer+madvise] madvise never\n", True),
        ("[always] defer defer+madvise madvise never\n", True),
        ("always [defer] defer+madvise madvise never\n", False),
        ("always defer defer+madvise madvise [never]\n", False),
        ("garbage\n", False),
    ],
)
def test_advised_faults_stall_only_where_the_kernel_compacts_on_the_spot(
    tmp_path: Path, setting: str, stalls: bool
) -> None:
    path = tmp_path / "defrag"
    path.write_text(setting)
    assert memory._advised_faults_stall(str(path)) is stalls
    assert memory._advised_faults_stall(str(tmp_path / "absent")) is False


def _madvise_after(env: dict[str, str], stalls: bool) -> str:
    """NumPy's huge-page switch in a fresh process after fault_in_small_pages() (a process
    of its own: the switch is process-wide)."""
    code = (
        "from mtor_p2p import memory\n"
        f"memory._advised_faults_stall = lambda *a: {stalls}\n"
        "memory.fault_in_small_pages()\n"
        "try:\n"
        "    from numpy._core.multiarray import _get_madvise_hugepage as g\n"
        "except ImportError:\n"
        "    from numpy.core.multiarray import _get_madvise_hugepage as g\n"
        "print(g())\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return run.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_numpy_stops_advising_huge_pages_unless_the_user_chose(monkeypatch) -> None:
    import os

    env = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    assert _madvise_after(env, stalls=True) == "False"
    assert _madvise_after(env, stalls=False) == "True"
    assert _madvise_after({**env, "NUMPY_MADVISE_HUGEPAGE": "1"}, stalls=True) == "True"
