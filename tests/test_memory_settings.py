"""Process-wide memory settings of a peer (mtor_p2p/memory.py)."""

from __future__ import annotations

import mmap
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
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


def _minor_faults_writing(array: np.ndarray) -> int:
    """Minor page faults this thread takes to write every byte of ``array``."""
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    array.reshape(-1)[:] = 1
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before


def test_a_populated_array_is_written_without_page_faults_and_keeps_its_values() -> None:
    size = 64 << 20
    # A fresh private mapping in small pages (no huge-page advice), as a job's output is.
    fresh = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    array = np.frombuffer(fresh, np.uint8)
    array[:: mmap.PAGESIZE * 7] = 5  # a few pages written before: their bytes must stay
    if not memory.populate_for_writing(array):
        pytest.skip("madvise(MADV_POPULATE_WRITE) is not available (Linux 5.14+)")
    assert (array[:: mmap.PAGESIZE * 7] == 5).all()
    assert not array[1 :: mmap.PAGESIZE * 7].any()  # the rest still reads as zeros
    assert _minor_faults_writing(array) < 16  # of 16,384 pages

    control = np.frombuffer(
        mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), np.uint8
    )
    assert _minor_faults_writing(control) > 1000  # the check above can fail


def test_populating_touches_only_the_arrays_own_pages() -> None:
    """Whole pages inside the array only: a view that starts or ends mid-page leaves the
    pages it shares with others alone; odd arrays are refused rather than guessed at."""
    page = mmap.PAGESIZE
    backing = np.frombuffer(
        mmap.mmap(-1, 8 * page, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), np.uint8
    )
    assert not memory.populate_for_writing(backing[10 : page - 10])  # no whole page inside
    assert not memory.populate_for_writing(backing[:0])
    assert not memory.populate_for_writing(backing.reshape(8, page)[:, :16])  # not contiguous
    if memory.populate_for_writing(backing[page // 2 : 3 * page + page // 2]):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        backing[page : 3 * page] = 1  # the two whole pages inside: populated
        assert resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before <= 1
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        backing[0] = 1  # the page the view shares at its start
        backing[3 * page + page - 1] = 1  # and the one at its end
        backing[5 * page] = 1  # and a page outside it: each still faults
        assert resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before >= 3
