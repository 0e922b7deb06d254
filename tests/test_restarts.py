"""A server killed and restarted on the same port, ten times over, under real
client processes: each comes back by itself within its backoff cap, and none
of them grows in threads, file descriptors or asyncio tasks."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

from tests.measure import threads_and_handles
from tests.processes import Process, start_server

CLIENTS = ["c0", "c1", "c2"]
CYCLES = 10
MAX_BACKOFF = 1.0


def resources(process: Process) -> tuple[int, int, int]:
    """Threads, open file descriptors and asyncio tasks (at its last
    registration) of a running client. Each task is answered in a short-lived
    thread, so the least of ten samples over half a second is taken: one on
    its way out is not counted, one that stays is."""
    samples = []
    for _ in range(10):
        samples.append(threads_and_handles(process.pid))
        time.sleep(0.05)
    last = process.wait_for(r"(\d+) asyncio tasks alive", count=process.count("tasks alive"))
    return min(t for t, _ in samples), min(f for _, f in samples), int(last.group(1))


def test_clients_survive_ten_server_restarts_without_growing(
    processes: list[Process], client: Callable[..., Process]
) -> None:
    srv, port = start_server()
    processes.append(srv)
    workers = [
        client(name, port, "--max-backoff", str(MAX_BACKOFF), "--log-level", "DEBUG")
        for name in CLIENTS
    ]
    usage: list[list[tuple[int, int, int]]] = []
    for cycle in range(1, CYCLES + 1):
        srv.send(signal.SIGTERM if cycle % 2 else signal.SIGKILL)
        srv.exit_code(5)
        srv, _ = start_server(port=port)
        processes.append(srv)
        listening = time.monotonic()
        for worker in workers:
            worker.wait_for(r"registered with", count=cycle + 1, timeout=MAX_BACKOFF + 5)
        # Within the cap, plus a little for connecting and loaded machines.
        assert time.monotonic() - listening < MAX_BACKOFF + 1.5, f"cycle {cycle}"
        srv.type(*(f"@{name} cycle {cycle}" for name in CLIENTS))
        for name in CLIENTS:
            srv.wait_for(rf"result from {name}: 'CYCLE {cycle}'$")
        if cycle in (1, CYCLES):
            usage.append([resources(worker) for worker in workers])
    for index, worker in enumerate(workers):
        first, last = usage[0][index], usage[-1][index]
        assert last[0] <= first[0], f"{worker.label} threads grew: {first} -> {last}"
        assert last[1] <= first[1], f"{worker.label} file descriptors grew: {first} -> {last}"
        assert last[2] <= first[2], f"{worker.label} asyncio tasks grew: {first} -> {last}"
        assert worker.popen.poll() is None
    print("threads, fds, asyncio tasks per client after cycle 1 and 10:",
          list(zip(usage[0], usage[-1], strict=True)))  # fmt: skip
