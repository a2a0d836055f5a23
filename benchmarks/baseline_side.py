"""One baseline session of ``./mtor bench compute``, run inside the Ray or Dask venv.

Usage: ``python baseline_side.py SYSTEM TASK PARAMS_JSON`` with SYSTEM ``ray``, ``dask`` or
``numpy`` (a plain NumPy process: any venv with NumPy). It starts a fresh local cluster
(``ray.init(num_cpus=W)`` or ``LocalCluster(n_workers=W, threads_per_worker=1)``, all on
127.0.0.1), measures, shuts the cluster down and prints one JSON line on stdout; progress
lines go to stderr. Raw samples come back in seconds: the harness summarises every side with
the same code. Tasks mirror what the MTOR side of the harness does:

* ``roundtrip``: one 512x512 float32 ``a @ b`` task at a time, fresh ``a`` and ``b`` each
  time (one element changed), both shipped with the task, the product brought back;
* ``throughput``: S such tasks submitted at once and gathered, either with B shared
  (``ray.put`` / ``client.scatter(broadcast=True)`` once, inside the timing; each block
  copied into the one product C as it completes, ``ray.wait`` / ``as_completed``, as MTOR's
  job places its answers and returns C) or with both operands shipped per task (a distinct
  B per task; each product its own result, as MTOR's one-shard jobs return them);
* ``kill``: one 2048x2048x2048 float32 task; when it starts computing (it writes its PID to a
  marker file), wait ``delay`` seconds, SIGKILL its worker process, and time the kill to the
  result in the driver (the framework's own retry);
* ``product`` (numpy only): ``a @ b`` at size n in this process, with the BLAS threads its
  environment sets;
* ``product_split`` (numpy only): the same product cut into ``shards`` row shards, computed
  by ``processes`` forked copies of this process (shard i by process i mod processes), with
  the operands already in memory: what MTOR's row 6 would take over that many workers with
  nothing to move, hash or check (its ceiling there).

Workers get the BLAS thread count of ``OPENBLAS_NUM_THREADS`` etc. from the environment the
harness sets for this process (inherited by Ray's raylet and Dask's nannies and workers; Dask
also sets them to 1 in its own ``distributed.nanny.pre-spawn-environ``); each session reports
what threadpoolctl sees inside a worker.

Standalone on purpose: it imports nothing from the project except ``procstats.py`` beside it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import procstats

WORK = Path(os.environ.get("MTOR_BASELINES_WORK") or Path.home() / ".cache/mtor/baselines")
warnings.simplefilter("ignore")  # Dask: "Large object ... detected in task graph"


def progress(message: str) -> None:
    print(f"progress: {message}", file=sys.stderr, flush=True)


def mm(a: Any, b: Any) -> Any:
    return a @ b


def mm_marked(a: Any, b: Any, marker: str) -> Any:
    # Appended once per attempt: the harness kills the first; a retry adds a second line.
    with open(marker, "a") as f:
        f.write(f"{os.getpid()} {time.time()}\n")
    return a @ b


def blas_report() -> dict[str, Any]:
    import numpy  # noqa: F401  (loads its BLAS, which threadpoolctl then sees)

    try:
        from threadpoolctl import threadpool_info

        threads: Any = [d.get("num_threads") for d in threadpool_info()]
    except ImportError:  # the project's venv has no threadpoolctl: the environment says
        threads = None
    return {
        "pid": os.getpid(),
        "blas_threads": threads,
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }


def fresh_pair(rng: Any, n: int, m: int | None = None) -> tuple[Any, Any]:
    import numpy as np

    a = rng.standard_normal((m or n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    return a, b


# -- clusters ------------------------------------------------------------------------------


def _prune_ray_sessions(root: Path, older_than_s: float = 600.0) -> None:
    """Remove Ray's session directories (logs, sockets) of earlier runs: Ray never does, and
    each run left about 0.2 MB (a new user found 104 of them). Recent ones may belong to a
    run still going, and stay."""
    cutoff = time.time() - older_than_s
    for session in root.glob("session_2*"):
        try:
            if session.is_dir() and not session.is_symlink() and session.stat().st_mtime < cutoff:
                shutil.rmtree(session, ignore_errors=True)
        except OSError:
            continue


class RayCluster:
    name = "ray"

    def __init__(self, workers: int) -> None:
        os.environ["HOME"] = str(WORK / "home")  # Ray writes ~/.ray/auth_token
        (WORK / "home").mkdir(parents=True, exist_ok=True)
        _prune_ray_sessions(WORK / "raytmp")
        import ray

        self.ray = ray
        self.version = {"ray": ray.__version__}
        ray.init(
            num_cpus=workers,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            _temp_dir=str(WORK / "raytmp"),
            object_store_memory=1 << 30,
            logging_level="WARNING",
            log_to_driver=False,
        )
        self._mm = ray.remote(mm)
        self._marked = ray.remote(max_retries=3)(mm_marked)
        self._blas = ray.remote(blas_report)
        self.workers = workers

    def run(self, a: Any, b: Any) -> Any:
        return self.ray.get(self._mm.remote(a, b))

    def many(self, pairs: list[tuple[Any, Any]], shared_b: Any = None) -> list[Any]:
        if shared_b is not None:
            ref = self.ray.put(shared_b)
            refs = [self._mm.remote(a, ref) for a, _ in pairs]
        else:
            refs = [self._mm.remote(a, b) for a, b in pairs]
        return self.ray.get(refs)

    def many_into(self, pairs: list[tuple[Any, Any]], shared_b: Any, out: Any) -> None:
        """As :meth:`many` with B shared, each product copied into its rows of ``out`` as
        it completes (while the others compute), as MTOR's scheduler places its answers."""
        ref = self.ray.put(shared_b)
        rows = len(pairs[0][0])
        index = {self._mm.remote(a, ref): i for i, (a, _) in enumerate(pairs)}
        pending = list(index)
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            for handle in done:
                i = index[handle]
                out[i * rows : (i + 1) * rows] = self.ray.get(handle)

    def start_marked(self, a: Any, b: Any, marker: str) -> Any:
        return self._marked.remote(a, b, marker)

    def result(self, handle: Any, timeout: float) -> Any:
        return self.ray.get(handle, timeout=timeout)

    def blas(self) -> dict[str, Any]:
        return self.ray.get(self._blas.remote())

    def after_kill(self) -> None:
        time.sleep(2.0)  # Ray starts a replacement worker process on demand

    def worker_pids(self) -> tuple[list[int], list[int]]:
        workers, others = [], []
        for pid in procstats.descendants():
            cmd = procstats.memory(pid).get("cmd", "")
            # Task workers are "ray::IDLE" or "ray::<task>"; the agents are services.
            agent = cmd.startswith(("ray::DashboardAgent", "ray::RuntimeEnvAgent"))
            (workers if cmd.startswith("ray::") and not agent else others).append(pid)
        return workers, others

    def close(self) -> None:
        self.ray.shutdown()


class DaskCluster:
    name = "dask"

    def __init__(self, workers: int) -> None:
        import dask
        import distributed
        from distributed import Client, LocalCluster

        dask.config.set({"temporary-directory": str(WORK / "tmp")})
        self.version = {"dask": dask.__version__, "distributed": distributed.__version__}
        self.cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            protocol="tcp://",
            host="127.0.0.1",
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
        self.client = Client(self.cluster)
        self.client.wait_for_workers(workers)
        self.workers = workers

    def run(self, a: Any, b: Any) -> Any:
        return self.client.submit(mm, a, b, pure=False).result()

    def many(self, pairs: list[tuple[Any, Any]], shared_b: Any = None) -> list[Any]:
        if shared_b is not None:
            [ref] = self.client.scatter([shared_b], broadcast=True, hash=False)
            futures = [self.client.submit(mm, a, ref, pure=False) for a, _ in pairs]
        else:
            futures = [self.client.submit(mm, a, b, pure=False) for a, b in pairs]
        return self.client.gather(futures)

    def many_into(self, pairs: list[tuple[Any, Any]], shared_b: Any, out: Any) -> None:
        """As :meth:`many` with B shared, each product copied into its rows of ``out`` as
        it completes (while the others compute), as MTOR's scheduler places its answers."""
        from distributed import as_completed

        [ref] = self.client.scatter([shared_b], broadcast=True, hash=False)
        rows = len(pairs[0][0])
        futures = [self.client.submit(mm, a, ref, pure=False) for a, _ in pairs]
        index = {future.key: i for i, future in enumerate(futures)}
        for future, product in as_completed(futures, with_results=True):
            i = index[future.key]
            out[i * rows : (i + 1) * rows] = product

    def start_marked(self, a: Any, b: Any, marker: str) -> Any:
        return self.client.submit(mm_marked, a, b, marker, pure=False)

    def result(self, handle: Any, timeout: float) -> Any:
        return handle.result(timeout=timeout)

    def blas(self) -> dict[str, Any]:
        return self.client.submit(blas_report, pure=False).result()

    def after_kill(self) -> None:
        self.client.wait_for_workers(self.workers, timeout=60)
        time.sleep(1.0)

    def worker_pids(self) -> tuple[list[int], list[int]]:
        workers = sorted(self.client.run(os.getpid).values())
        others = [p for p in procstats.descendants() if p not in workers]
        return workers, others

    def close(self) -> None:
        self.client.close()
        self.cluster.close()


def open_cluster(system: str, workers: int) -> Any:
    return {"ray": RayCluster, "dask": DaskCluster}[system](workers)


def settle_memory(cluster: Any) -> dict[str, Any]:
    """Idle RSS after a 2 s pause, and each process's peak (VmHWM) over the session."""
    time.sleep(2.0)
    workers, others = cluster.worker_pids()
    summary = procstats.memory_summary(workers, others)
    summary["driver"] = procstats.memory(os.getpid())
    return summary


# -- tasks ---------------------------------------------------------------------------------


def task_roundtrip(system: str, p: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(p.get("seed", 0))
    n = p.get("n", 512)
    cluster = open_cluster(system, p.get("workers", 1))
    try:
        out: dict[str, Any] = {"version": cluster.version, "blas": cluster.blas()}
        a, b = fresh_pair(rng, n)
        for i in range(p.get("warmup", 20)):
            a[0, 0] = b[0, 0] = i
            cluster.run(a, b)
        samples = []
        with procstats.Section() as section:
            for i in range(p["samples"]):
                a[0, 0] = b[0, 0] = 1000 + i  # new content: nothing cached by value
                start = time.perf_counter()
                c = cluster.run(a, b)
                samples.append(time.perf_counter() - start)
        out["matches_numpy"] = bool(np.allclose(c, a @ b, rtol=1e-3, atol=1e-2))
        out["samples_s"] = samples
        out["section"] = section.result
        out["memory"] = settle_memory(cluster)
        return out
    finally:
        cluster.close()


def _fault_in_small_pages() -> None:
    """Stop NumPy advising huge pages for this process's large arrays, where the kernel
    compacts memory on the spot for advised regions (the project's peers do the same)."""
    import os

    if "NUMPY_MADVISE_HUGEPAGE" in os.environ:
        return
    try:
        with open("/sys/kernel/mm/transparent_hugepage/defrag", encoding="ascii") as f:
            text = f.read()
    except OSError:
        return
    if text[text.find("[") + 1 : text.find("]")] not in {"always", "madvise", "defer+madvise"}:
        return
    try:
        try:
            from numpy._core.multiarray import _set_madvise_hugepage
        except ImportError:
            from numpy.core.multiarray import _set_madvise_hugepage  # type: ignore[no-redef]
        _set_madvise_hugepage(False)
    except Exception as exc:  # a private switch: note it, never fail the session for it
        progress(f"could not stop NumPy advising huge pages: {exc}")


def task_throughput(system: str, p: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(p.get("seed", 1))
    n, shards = p.get("n", 512), p["shards"]
    # C is assembled in this process: in small pages, as MTOR's requester writes its output
    # (mtor_p2p.memory.fault_in_small_pages; with THP defrag=madvise a fresh 200 MiB array
    # in advised huge pages cost 0.9 s here instead of about 0.1 s).
    _fault_in_small_pages()
    cluster = open_cluster(system, p.get("workers", 2))
    try:
        out: dict[str, Any] = {"version": cluster.version, "blas": cluster.blas()}
        a_all, b = fresh_pair(rng, n, n * shards)
        pairs_shared = [(a_all[i * n : (i + 1) * n], b) for i in range(shards)]
        # Warm-up: each worker's first task pays imports and allocation.
        cluster.many(pairs_shared[: 4 * cluster.workers])
        for variant in p.get("variants", ["b_shared", "both_shipped"]):
            if variant == "b_shared":
                pairs, shared = pairs_shared, b.copy()
            else:
                pairs = []
                for i in range(shards):
                    b_i = b.copy()
                    b_i[0, 0] = i  # a distinct B per task: nothing deduplicated
                    pairs.append((pairs_shared[i][0], b_i))
                shared = None
            progress(f"{variant}: {shards} shards")
            with procstats.Section() as section:
                start = time.perf_counter()
                if variant == "b_shared":
                    # One job's product C, in one array, as MTOR's job returns it: each
                    # block placed as it completes, as MTOR's scheduler does.
                    results = np.empty((n * shards, n), np.float32)
                    cluster.many_into(pairs, shared, results)
                else:
                    results = cluster.many(pairs, shared_b=shared)
                seconds = time.perf_counter() - start
            check = int(rng.integers(shards))
            rows = slice(check * n, (check + 1) * n) if variant == "b_shared" else check
            ok = bool(np.allclose(results[rows], pairs[check][0] @ pairs[check][1], 1e-3, 1e-2))
            out[variant] = {
                "seconds": seconds,
                "shards": shards,
                "matches_numpy": ok,
                "section": section.result,
            }
            del results
        out["memory"] = settle_memory(cluster)
        return out
    finally:
        cluster.close()


def task_kill(system: str, p: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(p.get("seed", 3))
    n, delay = p.get("n", 2048), p.get("delay", 0.1)
    cluster = open_cluster(system, p.get("workers", 2))
    try:
        out: dict[str, Any] = {"version": cluster.version, "blas": cluster.blas()}
        a, b = fresh_pair(rng, n)
        cluster.many([(a, b)] * cluster.workers)  # warm-up on both workers
        trials: list[dict[str, Any]] = []
        discarded: list[str] = []
        # A try counts only if the kill hit the task computing (it started again): a kill
        # that lands after the task has finished measured nothing (MTOR's side: mtor_kill).
        for trial in range(p.get("tries_per_trial", 3) * p["trials"]):
            if len(trials) == p["trials"]:
                break
            a[0, 0] = b[0, 0] = trial + 1
            marker = WORK / "tmp" / f"{system}-kill-{os.getpid()}-{trial}"
            marker.unlink(missing_ok=True)
            with procstats.Section() as section:
                submitted = time.perf_counter()
                handle = cluster.start_marked(a, b, str(marker))
                deadline = submitted + 60
                while time.perf_counter() < deadline:
                    if marker.exists() and marker.read_text().endswith("\n"):
                        break
                    time.sleep(0.002)
                else:
                    raise RuntimeError("the task never started")
                seen = time.perf_counter()
                victim = int(marker.read_text().split()[0])
                time.sleep(delay)
                os.kill(victim, signal.SIGKILL)
                killed = time.perf_counter()
                c = cluster.result(handle, timeout=120)
                done = time.perf_counter()
            attempts = len([x for x in marker.read_text().split("\n") if x.strip()])
            ok = bool(np.allclose(c[:4], a[:4] @ b, rtol=1e-3, atol=1e-2))
            marker.unlink(missing_ok=True)
            cluster.after_kill()
            if attempts < 2:
                discarded.append(f"the kill came after the task ({done - killed:.3f} s)")
                progress("kill try discarded: the kill came after the task")
                continue
            trials.append(
                {
                    "kill_to_result_s": done - killed,
                    "submit_to_start_s": seen - submitted,
                    "killed_pid": victim,
                    "attempts": attempts,
                    "matches_numpy": ok,
                    "section": section.result,
                }
            )
            progress(f"kill {len(trials)}/{p['trials']}: {done - killed:.3f} s")
        if len(trials) < p["trials"]:
            raise RuntimeError(
                f"{len(trials)} of {p['trials']} kills hit a running task: {discarded}"
            )
        out["trials"] = trials
        out["tries_discarded"] = discarded
        return out
    finally:
        cluster.close()


def task_product(p: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(p.get("seed", 6))
    n = p["n"]
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    small = a[:512, :512] @ b[:512, :512]  # warm-up: BLAS threads started
    del small
    samples = []
    with procstats.Section() as section:
        for _ in range(p.get("reps", 1)):
            start = time.perf_counter()
            a @ b
            samples.append(time.perf_counter() - start)
    return {
        "samples_s": samples,
        "section": section.result,
        "blas": blas_report(),
        "peak_rss_mib": procstats.memory(os.getpid()).get("peak_rss_mib"),
    }


def task_product_split(p: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(p.get("seed", 6))
    n, processes, shards = p["n"], p["processes"], p["shards"]
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    bounds = [n * i // shards for i in range(shards + 1)]
    samples = []
    with procstats.Section() as section:
        for _ in range(p.get("reps", 1)):
            ready_r, ready_w = os.pipe()
            go_r, go_w = os.pipe()
            children = []
            for index in range(processes):
                pid = os.fork()
                if pid == 0:  # a child: its shards, then out (no cleanup of the parent's)
                    code = 1
                    try:
                        small = a[:256, :256] @ b[:256, :256]  # BLAS threads started
                        del small
                        os.write(ready_w, b"r")
                        os.read(go_r, 1)
                        for shard in range(index, shards, processes):
                            a[bounds[shard] : bounds[shard + 1]] @ b
                        code = 0
                    finally:
                        os._exit(code)
                children.append(pid)
            for _ in children:
                os.read(ready_r, 1)
            start = time.perf_counter()
            os.write(go_w, b"g" * len(children))
            failed = [pid for pid in children if os.waitpid(pid, 0)[1] != 0]
            samples.append(time.perf_counter() - start)
            for fd in (ready_r, ready_w, go_r, go_w):
                os.close(fd)
            if failed:
                raise RuntimeError(f"{len(failed)} of {processes} product processes failed")
    return {
        "samples_s": samples,
        "section": section.result,
        "blas": blas_report(),
        "processes": processes,
        "shards": shards,
    }


def main(argv: list[str]) -> int:
    system, task, params = argv[0], argv[1], json.loads(argv[2])
    if system == "numpy":
        answer = (task_product_split if task == "product_split" else task_product)(params)
    else:
        answer = {"roundtrip": task_roundtrip, "throughput": task_throughput, "kill": task_kill}[
            task
        ](system, params)
    print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
