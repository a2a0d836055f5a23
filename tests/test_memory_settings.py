"""Process-wide memory settings of a peer (mtor_p2p/memory.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

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


def test_a_dropped_large_array_lends_its_memory_to_the_next() -> None:
    """Once the last array or view on a recycled region is gone, the next array of a fitting
    size is made on it (no fresh pages); while a view lives, it is not."""
    import numpy as np

    arrays = memory.RecycledArrays(min_bytes=1 << 20)
    first = arrays.empty((512, 1024), np.float32)  # 2 MiB
    first[...] = 1.0
    address = first.ctypes.data
    view = first[100:110]
    del first
    second = arrays.empty((512, 1024), np.float32)
    assert second.ctypes.data != address  # the view still holds the first region
    assert float(view.sum()) == 10 * 1024.0
    del view
    third = arrays.empty((256, 1024), np.float32)  # half the size: the region fits
    assert third.ctypes.data == address
    assert third.flags.c_contiguous and third.flags.writeable and third.shape == (256, 1024)
    third[...] = 2.0  # advised MADV_FREE while unused: still its own, writable memory
    assert float(third.sum()) == 2.0 * 256 * 1024
    assert (arrays.fresh, arrays.reused) == (2, 1)
    del second, third
    assert arrays.free_bytes() == 4 << 20


def test_recycled_arrays_keep_few_free_regions_and_leave_small_ones_to_numpy() -> None:
    import numpy as np

    arrays = memory.RecycledArrays(min_bytes=1 << 20, max_free=2, max_free_bytes=5 << 20)
    small = arrays.empty((16, 16), np.float64)
    assert small.flags.owndata and (arrays.fresh, arrays.reused) == (0, 0)
    held = [arrays.empty((1 << 20,), np.uint8) for _ in range(3)]  # 1 MiB each
    held.append(arrays.empty((4 << 20,), np.uint8))
    while held:
        held.pop(0)  # given back in this order: 1, 1, 1, 4 MiB
    # The last two given back stay (at most 2 regions, 5 MiB); the others are unmapped.
    assert arrays.free_bytes() == 5 << 20
    big = arrays.empty((3 << 20,), np.uint8)  # the 4 MiB region fits (at most twice the size)
    tiny = arrays.empty((1 << 20,), np.uint8)
    assert arrays.reused == 2 and arrays.free_bytes() == 0
    too_small = arrays.empty((1 << 19,), np.uint8)  # below min_bytes
    assert too_small.flags.owndata
    assert arrays.empty((3 << 20,), object).dtype == object  # never on raw memory
    del big, tiny


def test_a_region_given_back_while_the_lock_is_held_is_unmapped_not_waited_for() -> None:
    """A weak reference's callback may run inside any allocation, on any thread: giving a
    region back never waits for the lock (it would deadlock on the thread holding it)."""
    import numpy as np

    arrays = memory.RecycledArrays(min_bytes=1 << 20)
    region = arrays.empty((1 << 20,), np.uint8)
    with arrays._lock:
        del region  # the callback runs here, on the lock's own thread
    assert arrays.free_bytes() == 0


def test_a_region_is_advised_free_before_another_thread_can_take_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MADV_FREE comes before the region is listed for reuse: advised after, it could land
    on an output another thread had already written there, whose pages the kernel may then
    discard (a review's race, with the last reference dropped on a thread)."""
    import numpy as np

    arrays = memory.RecycledArrays(min_bytes=1 << 20)
    listed_when_advised: list[bool] = []
    advise = memory._advise_free

    def watched(region: Any) -> bool:
        listed_when_advised.append(any(region is r for r in arrays._free))
        return advise(region)

    monkeypatch.setattr(memory, "_advise_free", watched)
    region = arrays.empty((1 << 20,), np.uint8)
    del region
    assert listed_when_advised == [False] and arrays.free_bytes() == 1 << 20


def test_a_region_the_kernel_will_not_free_under_pressure_is_not_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import numpy as np

    arrays = memory.RecycledArrays(min_bytes=1 << 20)
    monkeypatch.setattr(memory, "_advise_free", lambda region: False)
    region = arrays.empty((1 << 20,), np.uint8)
    del region
    assert arrays.free_bytes() == 0
    again = arrays.empty((1 << 20,), np.uint8)
    assert (arrays.fresh, arrays.reused) == (2, 0)
    del again
