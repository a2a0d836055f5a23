"""DHT lookups among peers in separate processes (row 5 of the goals).

``DhtHosts(n)`` starts ``n`` processes of ``python -m benchmarks.dht_procs``, each hosting one
``Libp2pNetwork`` (its own event loop, its own interpreter), and drives them by JSON lines
over their standard input and output. Times are taken inside the process that does the work
(a ``dht_get`` in the reader, a request in the requester), so the harness's own messaging is
not counted. Commands (one JSON object a line, one answer a line):

``{"op": "connect", "addrs": [...]}``       dial these hosts
``{"op": "rt"}``                            routing table size
``{"op": "put", "key": K, "size": N}``      ``dht_put`` of N bytes ending in the key
``{"op": "get", "key": K}``                 forget any local replica, then ``dht_get``
``{"op": "echo", "peer": P, "count": N}``   N 200-byte requests to P on an open connection
``{"op": "memory"}``                        RSS and peak RSS of this process
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ECHO_PROTOCOL = "/mtor/bench/echo/1"


class AcceptAll:
    def validate(self, key: str, value: bytes) -> None:
        return None

    def select(self, key: str, values: list[bytes]) -> int:
        return 0


async def serve() -> None:
    import trio

    from benchmarks import procstats
    from mtor_p2p.identity import Identity
    from mtor_p2p.libp2p_host import Libp2pNetwork
    from mtor_p2p.network import NetworkError

    async def echo(sender: str, data: bytes) -> bytes:
        return data

    async with Libp2pNetwork.open(Identity.generate()) as network:
        network.register_dht_validator("mtor", AcceptAll())
        network.handle(ECHO_PROTOCOL, echo)
        print(json.dumps({"addr": network.addrs()[0], "peer_id": network.peer_id}), flush=True)
        while True:
            line = await trio.to_thread.run_sync(sys.stdin.readline)
            if not line:
                return
            command = json.loads(line)
            op = command["op"]
            answer: dict[str, Any] = {}
            try:
                if op == "connect":
                    for addr in command["addrs"]:
                        await network.connect(addr)
                    answer["connected"] = len(network.connected_peers())
                elif op == "rt":
                    answer["rt"] = network.routing_table_size()
                elif op == "put":
                    value = b"v" * command["size"] + command["key"].encode()
                    start = time.perf_counter()
                    await network.dht_put(command["key"], value)
                    answer["seconds"] = time.perf_counter() - start
                elif op == "get":
                    key = command["key"]
                    try:  # a replica held here would answer without a lookup
                        network._dht.value_store.remove(key.encode())
                    except Exception as exc:
                        answer["forget_error"] = repr(exc)
                    start = time.perf_counter()
                    value = await network.dht_get(key, timeout=command.get("timeout", 10))
                    answer["seconds"] = time.perf_counter() - start
                    answer["ok"] = value is not None and value.endswith(key.encode())
                elif op == "echo":
                    times, failures = [], 0
                    for _ in range(command["count"]):
                        start = time.perf_counter()
                        try:
                            await network.request(
                                command["peer"], ECHO_PROTOCOL, b"x" * 200, timeout=30
                            )
                        except NetworkError:
                            failures += 1
                            continue
                        times.append(time.perf_counter() - start)
                    answer.update(seconds=times, failures=failures)
                elif op == "peers":
                    answer["peers"] = network.connected_peers()
                elif op == "memory":
                    answer.update(procstats.memory(os.getpid()))
                else:
                    answer["error"] = f"unknown op {op!r}"
            except Exception as exc:
                answer["error"] = f"{type(exc).__name__}: {exc}"
            print(json.dumps(answer), flush=True)


class DhtHosts:
    """``n`` host processes, started on entry and stopped on exit."""

    def __init__(self, n: int, *, env: dict[str, str] | None = None, log: Any = None) -> None:
        self.n = n
        self.env = env
        self.log = log
        self.processes: list[subprocess.Popen[str]] = []
        self.info: list[dict[str, Any]] = []

    def __enter__(self) -> DhtHosts:
        root = Path(__file__).resolve().parent.parent
        try:
            for _ in range(self.n):
                self.processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "benchmarks.dht_procs"],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL,
                        text=True,
                        bufsize=1,
                        cwd=str(root),
                        env=self.env,
                    )
                )
            for index in range(self.n):
                self.info.append(self._read(index, timeout=180))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for process in self.processes:
            if process.stdin:
                try:
                    process.stdin.close()
                except OSError:
                    pass
        deadline = time.monotonic() + 20
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
                process.wait()

    def _read(self, index: int, timeout: float) -> dict[str, Any]:
        stdout = self.processes[index].stdout
        assert stdout is not None
        ready, _, _ = select.select([stdout], [], [], timeout)
        if not ready:
            raise RuntimeError(f"DHT host {index} did not answer within {timeout:.0f} s")
        line = stdout.readline()
        if not line:
            raise RuntimeError(f"DHT host {index} exited (code {self.processes[index].poll()})")
        return json.loads(line)

    def call(self, index: int, timeout: float = 120, **command: Any) -> dict[str, Any]:
        stdin = self.processes[index].stdin
        assert stdin is not None
        stdin.write(json.dumps(command) + "\n")
        stdin.flush()
        return self._read(index, timeout)


def main() -> int:
    import trio

    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    trio.run(serve)
    return 0


if __name__ == "__main__":
    sys.exit(main())
